//! Swap-aware ordering of waiting work, with a bound on how long any of it waits.
//!
//! Waiting tasks (one per job and base model) are kept in arrival order. The worker takes:
//!
//! 1. the oldest task, when it has waited at least [`Policy::max_wait`] or has been passed over
//!    [`Policy::max_passes`] times already;
//! 2. otherwise the oldest task whose model is loaded (no checkpoint swap);
//! 3. otherwise the oldest task.
//!
//! Whenever a task is taken ahead of older ones, each of those older tasks counts one pass.
//! So a task is overtaken at most `max_passes` times, and not at all once it has waited
//! `max_wait`: its longest wait is the time to run the tasks that arrived before it plus at most
//! `max_passes` younger tasks (each at most one job's images of one model).

use std::time::Duration;

/// The starvation bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Once the oldest task has waited this long, it goes next.
    pub max_wait: Duration,
    /// Once the oldest task has been passed over this many times, it goes next.
    pub max_passes: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_wait: Duration::from_secs(120),
            max_passes: 4,
        }
    }
}

/// What the scheduler needs to know of one waiting task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waiting<'a> {
    /// The base model the task runs.
    pub model: &'a str,
    /// How long it has waited.
    pub waited: Duration,
    /// How many times younger work went before it.
    pub passed_over: u32,
}

/// Which waiting task goes next (an index into `waiting`, which is in arrival order), given
/// which models are loaded now. `None` when nothing waits.
pub fn pick(
    waiting: &[Waiting<'_>],
    loaded: impl Fn(&str) -> bool,
    policy: Policy,
) -> Option<usize> {
    let head = waiting.first()?;
    if head.waited >= policy.max_wait || head.passed_over >= policy.max_passes {
        return Some(0);
    }
    Some(waiting.iter().position(|w| loaded(w.model)).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(model: &str, secs: u64, passed: u32) -> Waiting<'_> {
        Waiting {
            model,
            waited: Duration::from_secs(secs),
            passed_over: passed,
        }
    }

    #[test]
    fn empty_queue_has_nothing() {
        assert_eq!(pick(&[], |_| true, Policy::default()), None);
    }

    #[test]
    fn prefers_the_loaded_model_then_the_oldest() {
        let q = [w("a", 5, 0), w("b", 4, 0), w("b", 3, 0)];
        assert_eq!(pick(&q, |m| m == "b", Policy::default()), Some(1));
        assert_eq!(pick(&q, |m| m == "a", Policy::default()), Some(0));
        assert_eq!(pick(&q, |_| false, Policy::default()), Some(0));
    }

    #[test]
    fn the_oldest_goes_next_after_its_bound() {
        let p = Policy {
            max_wait: Duration::from_secs(60),
            max_passes: 3,
        };
        assert_eq!(
            pick(&[w("a", 60, 0), w("b", 1, 0)], |m| m == "b", p),
            Some(0)
        );
        assert_eq!(
            pick(&[w("a", 1, 3), w("b", 1, 0)], |m| m == "b", p),
            Some(0)
        );
        assert_eq!(
            pick(&[w("a", 59, 2), w("b", 1, 0)], |m| m == "b", p),
            Some(1)
        );
    }

    /// A simulation: a stream of work on the loaded model never starves an older job on another.
    #[test]
    fn no_task_is_passed_over_more_than_the_bound() {
        let p = Policy {
            max_wait: Duration::from_secs(3600),
            max_passes: 4,
        };
        // (model, passed_over); "b" arrives first, then a long stream of "a" while "a" is loaded.
        let mut queue: Vec<(String, u32)> = vec![("b".into(), 0)];
        let mut loaded = "a".to_string();
        let mut served = Vec::new();
        for step in 0..20 {
            queue.push(("a".into(), 0));
            if step % 2 == 0 {
                queue.push(("a".into(), 0));
            }
            let view: Vec<Waiting<'_>> = queue.iter().map(|(m, n)| w(m, 1, *n)).collect();
            let i = pick(&view, |m| m == loaded, p).unwrap();
            for older in &mut queue[..i] {
                older.1 += 1;
            }
            let (m, _) = queue.remove(i);
            loaded = m.clone();
            served.push(m);
            assert!(queue.iter().all(|(_, n)| *n <= p.max_passes));
        }
        let pos = served.iter().position(|m| m == "b").unwrap();
        assert_eq!(
            pos, 4,
            "b goes after exactly max_passes younger tasks: {served:?}"
        );
    }
}

//! The one worker: a std thread that owns the device and the loaded models, takes tasks in
//! swap-aware order ([`super::queue::pick`]) and runs them with the campaign executor.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::jobs::{ImageState, JobState};
use super::queue::{pick, Waiting};
use super::state::{Running, Shared, Task};
use crate::output::ImageStatus;
use crate::plan::{plan_indices, ModelSizes};
use crate::run::campaign::Campaign;
use crate::run::events::{Event, Reporter};
use crate::run::execute::{Executor, Resident};
use crate::spec::ModelDecl;

/// What was loaded under a model name: its declaration and safety checker folder. A job whose
/// declaration differs (a client override of dtype or memory) unloads it first; one whose
/// checker folder differs unloads the checker.
type LoadedAs = HashMap<String, (ModelDecl, Option<PathBuf>)>;

/// Starts the worker thread (marked up from now on); it runs until [`Shared::drain`].
pub fn spawn(
    shared: Arc<Shared>,
    resident: Resident,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    shared.lock().worker_up = true;
    std::thread::Builder::new()
        .name("sd-run-worker".into())
        .spawn(move || run(&shared, resident))
}

/// Marks the worker down however its thread ends.
struct Down<'a>(&'a Shared);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        self.0.lock().worker_up = false;
    }
}

fn run(shared: &Shared, mut resident: Resident) {
    let _down = Down(shared);
    let mut loaded_as: LoadedAs = HashMap::new();
    while let Some((task, campaign, interrupt)) = next_task(shared, &resident) {
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_task(
                shared,
                &task,
                &campaign,
                interrupt.clone(),
                resident,
                &mut loaded_as,
            )
        }));
        resident = match outcome {
            Ok(r) => r,
            Err(panic) => {
                // A bug, not bad input: fail the task's images, start afresh, keep serving.
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "panic".into());
                let error = format!("internal error: {what}");
                eprintln!("sd-run serve: job {}: {error}", task.job);
                for &i in &task.indices {
                    settle(
                        shared,
                        &task.job,
                        &campaign.keys[i],
                        ImageState::Failed,
                        None,
                        Some(&error),
                    );
                }
                finish_task(shared, &task, &campaign, &interrupt);
                loaded_as.clear();
                match Resident::new(shared.settings.device, shared.settings.memory_budget) {
                    Ok(r) => r,
                    Err(e) => {
                        eprintln!("sd-run serve: the worker cannot go on: {e}");
                        return;
                    }
                }
            }
        };
    }
}

/// Waits for a task and takes it (None when the server drains).
fn next_task(
    shared: &Shared,
    resident: &Resident,
) -> Option<(Task, Arc<Campaign>, Arc<AtomicBool>)> {
    let mut g = shared.lock();
    loop {
        if g.draining {
            return None;
        }
        if g.tasks.is_empty() {
            g = shared.wait(g, Duration::from_secs(1));
            continue;
        }
        let view: Vec<Waiting<'_>> = g
            .tasks
            .iter()
            .map(|t| Waiting {
                model: &t.model,
                waited: t.since.elapsed(),
                passed_over: t.passed_over,
            })
            .collect();
        let loaded = |m: &str| resident.pool.is_loaded(m);
        let i = pick(&view, loaded, shared.settings.policy).unwrap_or(0);
        for older in &mut g.tasks[..i] {
            older.passed_over += 1;
        }
        let task = g.tasks.remove(i);
        let Some(job) = g.jobs.get_mut(&task.job) else {
            continue;
        };
        let Some(campaign) = job.campaign.clone() else {
            continue;
        };
        job.state = JobState::Running;
        let keys: HashSet<String> = task.indices.iter().map(|&i| job.keys[i].clone()).collect();
        for (k, s) in job.keys.iter().zip(job.images.iter_mut()) {
            if *s == ImageState::Queued && keys.contains(k) {
                *s = ImageState::Running;
            }
        }
        let interrupt = Arc::new(AtomicBool::new(false));
        g.running = Some(Running {
            job: task.job.clone(),
            keys,
            interrupt: interrupt.clone(),
        });
        return Some((task, campaign, interrupt));
    }
}

/// Runs one task: what the store has by now counts as made, the rest goes through the
/// executor; then the images it did not reach are settled and a finished job is written.
fn run_task(
    shared: &Shared,
    task: &Task,
    c: &Arc<Campaign>,
    interrupt: Arc<AtomicBool>,
    mut resident: Resident,
    loaded_as: &mut LoadedAs,
) -> Resident {
    let _ = c.store.refresh();
    let mut todo = Vec::new();
    let mut cached = vec![false; c.keys.len()];
    for &i in &task.indices {
        match c.store.lookup(&c.keys[i]) {
            Some(rec) => {
                cached[i] = true;
                let path = rec.path.clone();
                let state = if rec.status == ImageStatus::Flagged {
                    ImageState::Flagged
                } else {
                    ImageState::Ok
                };
                settle(shared, &task.job, &c.keys[i], state, path.as_deref(), None);
                shared.lock().metrics.cached += 1;
            }
            None => todo.push(i),
        }
    }
    if !todo.is_empty() {
        // A model whose declaration or checker changed since it was loaded is loaded again.
        let mut names: Vec<&str> = todo.iter().map(|&i| c.requests[i].model.as_str()).collect();
        names.extend(todo.iter().filter_map(|&i| {
            c.requests[i]
                .params
                .refiner
                .as_ref()
                .map(|r| r.model.as_str())
        }));
        names.sort_unstable();
        names.dedup();
        for m in &names {
            let Some(decl) = c.spec.models.get(*m) else {
                continue;
            };
            let checker = c.checkers.get(*m);
            match loaded_as.get_mut(*m) {
                Some((d, _)) if d != decl => {
                    resident.forget(m);
                    loaded_as.insert(m.to_string(), (decl.clone(), checker.cloned()));
                }
                Some((_, ch)) => {
                    // A checker that is not used leaves the loaded one as it is.
                    if checker.is_some() && ch.as_ref() != checker {
                        resident.forget_checker(m);
                        *ch = checker.cloned();
                    }
                }
                None => {
                    resident.forget(m);
                    loaded_as.insert(m.to_string(), (decl.clone(), checker.cloned()));
                }
            }
        }
        let mut sizes = ModelSizes::new();
        for (name, m) in &c.models {
            sizes.insert(name.clone(), ModelSizes::weights_size(&m.dir));
        }
        let plan = plan_indices(
            &c.requests,
            &c.keys,
            &cached,
            c.spec.memory_budget,
            &sizes,
            todo.iter().copied(),
        );
        let mut reporter = JobReporter {
            shared,
            job: task.job.clone(),
            campaign: c.clone(),
        };
        let (_, back) = Executor::with_resident(c, &mut reporter, interrupt.clone(), resident)
            .run_resident(&plan);
        resident = back;
    }
    finish_task(shared, task, c, &interrupt);
    resident
}

/// Sets the state of every image of `job` with `key` that is still pending.
fn settle(
    shared: &Shared,
    job: &str,
    key: &str,
    state: ImageState,
    path: Option<&str>,
    error: Option<&str>,
) {
    let mut g = shared.lock();
    let Some(j) = g.jobs.get_mut(job) else { return };
    for (k, s) in j.keys.iter().zip(j.images.iter_mut()) {
        if k == key && (s.is_pending() || *s == ImageState::Failed) {
            *s = state;
        }
    }
    if state.is_made() && path.is_none_or(|p| !p.starts_with("images/")) {
        j.withheld.insert(key.to_string());
    }
    if let Some(e) = error {
        j.errors.insert(key.to_string(), e.to_string());
    }
}

/// After the executor: images it did not reach go back to the queue (shutdown), are cancelled
/// (cancel) or failed; a job with no task left ends and its file is written.
fn finish_task(shared: &Shared, task: &Task, c: &Campaign, interrupt: &AtomicBool) {
    let _ = c.store.refresh();
    let mut g = shared.lock();
    g.running = None;
    let draining = g.draining;
    let Some(j) = g.jobs.get_mut(&task.job) else {
        return;
    };
    let cancelled = j.state == JobState::Cancelled;
    let keys: HashSet<&str> = task.indices.iter().map(|&i| c.keys[i].as_str()).collect();
    for (k, s) in j.keys.iter().zip(j.images.iter_mut()) {
        if !s.is_pending() || !keys.contains(k.as_str()) {
            continue;
        }
        if cancelled {
            *s = ImageState::Cancelled;
        } else if draining && interrupt.load(Ordering::SeqCst) {
            *s = ImageState::Queued;
        } else if let Some(rec) = c.store.lookup(k) {
            *s = if rec.status == ImageStatus::Flagged {
                ImageState::Flagged
            } else {
                ImageState::Ok
            };
        } else {
            *s = ImageState::Failed;
            j.errors
                .entry(k.clone())
                .or_insert_with(|| "not made (another process held its lock)".into());
        }
    }
    if draining && !cancelled && j.images.iter().any(|s| s.is_pending()) {
        // Parked: the job file still says queued, so a restart resumes it.
        j.state = JobState::Queued;
        return;
    }
    j.tasks_left = j.tasks_left.saturating_sub(1);
    if j.tasks_left > 0 {
        if !cancelled {
            j.state = JobState::Queued;
        }
        return;
    }
    if !cancelled {
        j.state = if j.images.contains(&ImageState::Failed) {
            JobState::Failed
        } else {
            JobState::Done
        };
    }
    let file = g.snapshot_of(&task.job);
    if let Some(j) = g.jobs.get_mut(&task.job) {
        j.campaign = None;
    }
    drop(g);
    if let Some(f) = file {
        if let Err(e) = f.save(&shared.settings.store_root) {
            eprintln!("sd-run serve: job {}: cannot write its file: {e}", task.job);
        }
    }
}

/// Turns the executor's events into image states and metrics.
struct JobReporter<'a> {
    shared: &'a Shared,
    job: String,
    campaign: Arc<Campaign>,
}

impl JobReporter<'_> {
    fn model_of(&self, key: &str) -> String {
        self.campaign
            .keys
            .iter()
            .position(|k| k == key)
            .map(|i| self.campaign.requests[i].model.clone())
            .unwrap_or_default()
    }
}

impl Reporter for JobReporter<'_> {
    fn event(&mut self, event: &Event) {
        match event {
            Event::Image {
                key,
                status,
                seconds,
                path,
                ..
            } => {
                let state = match status.as_str() {
                    "ok" => ImageState::Ok,
                    "flagged" => ImageState::Flagged,
                    _ => ImageState::Failed,
                };
                settle(self.shared, &self.job, key, state, path.as_deref(), None);
                if state.is_made() {
                    let model = self.model_of(key);
                    let mut g = self.shared.lock();
                    *g.metrics.made.entry(model.clone()).or_default() += 1;
                    let e = g.metrics.image_seconds.entry(model).or_default();
                    e.0 += seconds;
                    e.1 += 1;
                }
            }
            Event::Failed { key, error, .. } => {
                settle(
                    self.shared,
                    &self.job,
                    key,
                    ImageState::Failed,
                    None,
                    Some(error),
                );
                self.shared.lock().metrics.failed += 1;
            }
            Event::Flagged { .. } => self.shared.lock().metrics.flagged += 1,
            Event::Skipped { key, .. } => {
                let _ = self.campaign.store.refresh();
                if let Some(rec) = self.campaign.store.lookup(key) {
                    let state = if rec.status == ImageStatus::Flagged {
                        ImageState::Flagged
                    } else {
                        ImageState::Ok
                    };
                    settle(
                        self.shared,
                        &self.job,
                        key,
                        state,
                        rec.path.as_deref(),
                        None,
                    );
                    self.shared.lock().metrics.cached += 1;
                }
            }
            Event::ModelLoaded { model, .. } => {
                *self
                    .shared
                    .lock()
                    .metrics
                    .model_loads
                    .entry(model.clone())
                    .or_default() += 1
            }
            _ => {}
        }
    }
}

//! Counters of the server, rendered in the Prometheus text exposition format.

use std::collections::BTreeMap;
use std::fmt::Write;

/// What the server counts (all since it started).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    /// Jobs accepted (202).
    pub jobs_accepted: u64,
    /// Images made, by model.
    pub made: BTreeMap<String, u64>,
    /// Images answered from the store (at submission, or found made when their turn came).
    pub cached: u64,
    /// Images the safety stage flagged.
    pub flagged: u64,
    /// Images that failed.
    pub failed: u64,
    /// Seconds spent making images, by model (sum, count).
    pub image_seconds: BTreeMap<String, (f64, u64)>,
    /// Checkpoint loads, by model.
    pub model_loads: BTreeMap<String, u64>,
    /// Refused requests, by reason.
    pub refusals: BTreeMap<&'static str, u64>,
}

/// A snapshot of the gauges that are not counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    /// Images waiting or being made.
    pub queued_images: usize,
    /// Jobs waiting or running.
    pub active_jobs: usize,
    /// Whether the server takes new work.
    pub ready: bool,
}

fn escape(label: &str) -> String {
    label
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

impl Metrics {
    /// Counts one refusal.
    pub fn refuse(&mut self, reason: &'static str) {
        *self.refusals.entry(reason).or_default() += 1;
    }

    /// Mean seconds per made image over all models (None before the first image).
    pub fn mean_seconds_per_image(&self) -> Option<f64> {
        let (s, n) = self
            .image_seconds
            .values()
            .fold((0.0, 0), |(s, n), (a, b)| (s + a, n + b));
        (n > 0).then(|| s / n as f64)
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self, g: Gauges) -> String {
        let mut o = String::new();
        let head = |o: &mut String, name: &str, kind: &str, help: &str| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} {kind}");
        };
        head(
            &mut o,
            "sdrun_queue_images",
            "gauge",
            "Images waiting or being made.",
        );
        let _ = writeln!(o, "sdrun_queue_images {}", g.queued_images);
        head(
            &mut o,
            "sdrun_queue_jobs",
            "gauge",
            "Jobs waiting or running.",
        );
        let _ = writeln!(o, "sdrun_queue_jobs {}", g.active_jobs);
        head(
            &mut o,
            "sdrun_ready",
            "gauge",
            "1 when the server takes new work.",
        );
        let _ = writeln!(o, "sdrun_ready {}", u8::from(g.ready));
        head(
            &mut o,
            "sdrun_jobs_accepted_total",
            "counter",
            "Jobs accepted.",
        );
        let _ = writeln!(o, "sdrun_jobs_accepted_total {}", self.jobs_accepted);
        head(
            &mut o,
            "sdrun_images_made_total",
            "counter",
            "Images made, by model.",
        );
        for (m, n) in &self.made {
            let _ = writeln!(o, "sdrun_images_made_total{{model=\"{}\"}} {n}", escape(m));
        }
        head(
            &mut o,
            "sdrun_images_cached_total",
            "counter",
            "Images answered from the store.",
        );
        let _ = writeln!(o, "sdrun_images_cached_total {}", self.cached);
        head(
            &mut o,
            "sdrun_images_flagged_total",
            "counter",
            "Images flagged by the safety stage.",
        );
        let _ = writeln!(o, "sdrun_images_flagged_total {}", self.flagged);
        head(
            &mut o,
            "sdrun_images_failed_total",
            "counter",
            "Images that failed.",
        );
        let _ = writeln!(o, "sdrun_images_failed_total {}", self.failed);
        head(
            &mut o,
            "sdrun_seconds_per_image",
            "gauge",
            "Mean seconds per made image, by model.",
        );
        for (m, (s, n)) in &self.image_seconds {
            if *n > 0 {
                let _ = writeln!(
                    o,
                    "sdrun_seconds_per_image{{model=\"{}\"}} {}",
                    escape(m),
                    s / *n as f64
                );
            }
        }
        head(
            &mut o,
            "sdrun_image_seconds",
            "summary",
            "Seconds spent making images, by model.",
        );
        for (m, (s, n)) in &self.image_seconds {
            let m = escape(m);
            let _ = writeln!(o, "sdrun_image_seconds_sum{{model=\"{m}\"}} {s}\nsdrun_image_seconds_count{{model=\"{m}\"}} {n}");
        }
        head(
            &mut o,
            "sdrun_model_loads_total",
            "counter",
            "Checkpoint loads, by model.",
        );
        for (m, n) in &self.model_loads {
            let _ = writeln!(o, "sdrun_model_loads_total{{model=\"{}\"}} {n}", escape(m));
        }
        head(
            &mut o,
            "sdrun_refusals_total",
            "counter",
            "Refused requests, by reason.",
        );
        for (r, n) in &self.refusals {
            let _ = writeln!(o, "sdrun_refusals_total{{reason=\"{r}\"}} {n}");
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_labels() {
        let mut m = Metrics::default();
        m.made.insert("demo".into(), 3);
        m.image_seconds.insert("demo".into(), (1.5, 3));
        m.model_loads.insert("demo".into(), 1);
        m.cached = 2;
        m.refuse("queue_full");
        let text = m.render(Gauges {
            queued_images: 7,
            active_jobs: 2,
            ready: true,
        });
        for line in [
            "sdrun_queue_images 7",
            "sdrun_ready 1",
            "sdrun_images_made_total{model=\"demo\"} 3",
            "sdrun_images_cached_total 2",
            "sdrun_seconds_per_image{model=\"demo\"} 0.5",
            "sdrun_model_loads_total{model=\"demo\"} 1",
            "sdrun_refusals_total{reason=\"queue_full\"} 1",
            "# TYPE sdrun_images_failed_total counter",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(m.mean_seconds_per_image(), Some(0.5));
    }

    #[test]
    fn labels_are_escaped() {
        assert_eq!(escape("a\"b\\c"), "a\\\"b\\\\c");
    }
}

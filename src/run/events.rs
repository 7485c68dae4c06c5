//! Run events and the reporters that listen to them: a progress bar on a terminal, one JSON
//! object per line elsewhere (or with `--log json`).

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Instant;

/// Something that happened during a run.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Planned {
        images: usize,
        cached: usize,
        to_make: usize,
        model_loads: usize,
        batches: usize,
    },
    ModelLoading {
        model: String,
    },
    ModelLoaded {
        model: String,
        seconds: f64,
    },
    Warning {
        message: String,
    },
    Batch {
        model: String,
        role: String,
        images: usize,
    },
    Image {
        key: String,
        job: String,
        path: Option<String>,
        status: String,
        seconds: f64,
    },
    Flagged {
        key: String,
        job: String,
        action: String,
    },
    Failed {
        key: String,
        job: String,
        error: String,
    },
    Skipped {
        key: String,
        reason: String,
    },
    Summary(Summary),
}

/// The end-of-run summary.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub made: usize,
    pub cached: usize,
    pub flagged: usize,
    pub failed: usize,
    pub skipped: usize,
    pub seconds: f64,
    /// Seconds per made image, by model.
    pub seconds_per_image: BTreeMap<String, f64>,
    pub interrupted: bool,
}

/// Where events go.
pub trait Reporter {
    fn event(&mut self, event: &Event);
}

/// One JSON object per line on stdout.
pub struct JsonReporter;

impl Reporter for JsonReporter {
    fn event(&mut self, event: &Event) {
        if let Ok(line) = serde_json::to_string(event) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// A progress bar with images done, images per minute and ETA; messages above it.
pub struct BarReporter {
    bar: ProgressBar,
    started: Instant,
    done: u64,
}

impl BarReporter {
    fn new() -> Self {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} images  {msg}  ETA {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        Self {
            bar,
            started: Instant::now(),
            done: 0,
        }
    }
}

impl Reporter for BarReporter {
    fn event(&mut self, event: &Event) {
        match event {
            Event::Planned {
                images,
                cached,
                to_make,
                model_loads,
                batches,
            } => {
                self.bar.println(format!(
                    "{images} images: {cached} cached, {to_make} to make in {batches} batches, {model_loads} model loads"
                ));
                self.bar.set_length(*to_make as u64);
            }
            Event::ModelLoading { model } => self.bar.set_message(format!("loading {model}")),
            Event::ModelLoaded { model, seconds } => {
                self.bar.println(format!("loaded {model} in {seconds:.1}s"))
            }
            Event::Warning { message } => self.bar.println(format!("warning: {message}")),
            Event::Batch {
                model,
                role,
                images,
            } => self
                .bar
                .set_message(format!("{model} ({role}): batch of {images}")),
            Event::Image { .. } | Event::Skipped { .. } => {
                self.done += 1;
                self.bar.inc(1);
                let minutes = self.started.elapsed().as_secs_f64() / 60.0;
                if minutes > 0.0 {
                    self.bar
                        .set_message(format!("{:.1} images/min", self.done as f64 / minutes));
                }
            }
            Event::Flagged { key, job, action } => self.bar.println(format!(
                "flagged {job} {} ({action})",
                &key[..12.min(key.len())]
            )),
            Event::Failed { key, job, error } => self.bar.println(format!(
                "failed {job} {}: {error}",
                &key[..12.min(key.len())]
            )),
            Event::Summary(s) => {
                self.bar.finish_and_clear();
                eprintln!("{}", render_summary(s));
            }
        }
    }
}

/// Plain lines on stderr (`--log text`).
pub struct TextReporter;

impl Reporter for TextReporter {
    fn event(&mut self, event: &Event) {
        match event {
            Event::Summary(s) => eprintln!("{}", render_summary(s)),
            Event::Image { .. } => {}
            other => {
                if let Ok(line) = serde_json::to_string(other) {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// The summary as a few readable lines.
pub fn render_summary(s: &Summary) -> String {
    let mut out = format!(
        "made {}, cached {}, flagged {}, failed {}, skipped {} in {:.1}s",
        s.made, s.cached, s.flagged, s.failed, s.skipped, s.seconds
    );
    for (model, secs) in &s.seconds_per_image {
        out.push_str(&format!("\n  {model}: {secs:.2} s/image"));
    }
    if s.interrupted {
        out.push_str("\ninterrupted: run the same command again to finish the rest");
    }
    out
}

/// The reporter for a `--log` choice: a bar on a terminal, JSON otherwise.
pub fn reporter(format: super::LogFormat) -> Box<dyn Reporter> {
    match format {
        super::LogFormat::Json => Box::new(JsonReporter),
        super::LogFormat::Text => Box::new(TextReporter),
        super::LogFormat::Auto if std::io::stderr().is_terminal() => Box::new(BarReporter::new()),
        super::LogFormat::Auto => Box::new(JsonReporter),
    }
}

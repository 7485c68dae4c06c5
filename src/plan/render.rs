//! `sd-run plan` output: the JSON object and the text summary, with time estimates from
//! measured rates.
//!
//! An estimate is Σ over a stage's images of `steps × (width × height / REFERENCE_PIXELS) ×
//! rate(model)`, where `rate` is seconds per image-step at [`REFERENCE_PIXELS`] as the runner
//! measured it (`<output>/.sd-run/rates.json`). A base stage followed by a refiner runs
//! `steps × switch_at` steps, the refiner `steps × (1 − switch_at)`; img2img runs
//! `steps × strength`. A stage whose model has no rate is "unknown", and so is the total.

use super::{Plan, Role, Stage};
use crate::cache::CacheError;
use crate::spec::ImageRequest;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The pixel count rates refer to (512 × 512).
pub const REFERENCE_PIXELS: u64 = 512 * 512;

/// One model's measured speed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Rate {
    /// Seconds per image-step at the reference pixel count.
    pub seconds_per_step: f64,
    /// How many measurements went into it.
    pub samples: u64,
}

/// Measured speeds by model name, kept in `<output>/.sd-run/rates.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    pub reference_pixels: u64,
    pub models: BTreeMap<String, Rate>,
}

impl Default for Rates {
    fn default() -> Self {
        Self {
            reference_pixels: REFERENCE_PIXELS,
            models: BTreeMap::new(),
        }
    }
}

impl Rates {
    /// The rates file of an output root.
    pub fn file(output: &Path) -> PathBuf {
        output.join(".sd-run").join("rates.json")
    }

    /// Loads the output root's rates; a missing or damaged file gives no rates.
    pub fn load(output: &Path) -> Result<Self, CacheError> {
        let path = Self::file(output);
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Rates>(&bytes) {
                Ok(r) if r.reference_pixels > 0 => Ok(r),
                Ok(_) => Ok(Self::default()),
                Err(e) => {
                    tracing::warn!("{}: damaged rates file ignored: {e}", path.display());
                    Ok(Self::default())
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(CacheError::io(path, e)),
        }
    }

    /// Writes the rates file (temp file + rename).
    pub fn save(&self, output: &Path) -> Result<(), CacheError> {
        let path = Self::file(output);
        let json = serde_json::to_vec_pretty(self)
            .map_err(|e| CacheError::invalid(&path, format!("cannot encode rates: {e}")))?;
        crate::cache::write_atomic(&path, &json)
    }

    /// Records a measurement: `seconds` of wall time for `images` images of `steps` steps each
    /// at `pixels` pixels. Blends into the model's rate (moving average weighting the new
    /// measurement by 1/3 once a rate exists). Ignores empty or non-finite measurements.
    pub fn record(&mut self, model: &str, seconds: f64, images: usize, steps: f64, pixels: u64) {
        let work = images as f64 * steps * pixels as f64 / self.reference_pixels as f64;
        if work.is_nan() || work <= 0.0 || !seconds.is_finite() || seconds < 0.0 {
            return;
        }
        let measured = seconds / work;
        let entry = self.models.entry(model.to_string()).or_insert(Rate {
            seconds_per_step: measured,
            samples: 0,
        });
        if entry.samples > 0 {
            entry.seconds_per_step = entry.seconds_per_step * (2.0 / 3.0) + measured / 3.0;
        }
        entry.samples += 1;
    }

    /// A model's seconds per image-step at the reference pixel count.
    pub fn rate(&self, model: &str) -> Option<f64> {
        self.models.get(model).map(|r| r.seconds_per_step)
    }

    /// Estimated seconds of one stage, or `None` without a rate for its model.
    pub fn estimate_stage(&self, stage: &Stage, requests: &[ImageRequest]) -> Option<f64> {
        let rate = self.rate(&stage.model)?;
        let mut work = 0.0;
        for b in &stage.batches {
            for &i in &b.items {
                let Some(r) = requests.get(i) else { continue };
                work +=
                    stage_steps(r, stage.role) * (r.params.width as f64 * r.params.height as f64);
            }
        }
        Some(work / self.reference_pixels as f64 * rate)
    }
}

/// Denoising steps an image takes in a stage of `role`.
pub fn stage_steps(r: &ImageRequest, role: Role) -> f64 {
    let p = &r.params;
    let mut steps = p.steps as f64;
    if p.init_image.is_some() {
        steps *= p.strength.clamp(0.0, 1.0);
    }
    match (role, &p.refiner) {
        (Role::Base, Some(rf)) => steps * rf.switch_at.clamp(0.0, 1.0),
        (Role::Base, None) => steps,
        (Role::Refiner, Some(rf)) => steps * (1.0 - rf.switch_at.clamp(0.0, 1.0)),
        (Role::Refiner, None) => 0.0,
    }
}

impl Plan {
    /// Each stage's estimate, and the total (`None` when any stage is unknown).
    pub fn estimates(
        &self,
        requests: &[ImageRequest],
        rates: Option<&Rates>,
    ) -> (Vec<Option<f64>>, Option<f64>) {
        let per: Vec<Option<f64>> = self
            .stages
            .iter()
            .map(|s| rates.and_then(|r| r.estimate_stage(s, requests)))
            .collect();
        let total = per.iter().try_fold(0.0, |acc, s| s.map(|v| acc + v));
        (per, total)
    }

    /// The `sd-run plan --json` object.
    pub fn to_json(&self, requests: &[ImageRequest], rates: Option<&Rates>) -> Value {
        let (per, total) = self.estimates(requests, rates);
        let stages: Vec<Value> = self
            .stages
            .iter()
            .zip(&per)
            .map(|(s, est)| {
                json!({
                    "model": s.model,
                    "role": s.role.as_str(),
                    "images": s.images(),
                    "batches": s.batches.len(),
                    "loads": s.load,
                    "evict": s.evict,
                    "estimated_seconds": est,
                })
            })
            .collect();
        json!({
            "images": self.images,
            "cached": self.cached,
            "duplicates": self.duplicates,
            "to_make": self.to_make,
            "model_loads": self.model_loads,
            "batches": self.batches(),
            "estimated_seconds": total,
            "stages": stages,
        })
    }

    /// A readable summary: totals, then one line per stage.
    pub fn summary(&self, requests: &[ImageRequest], rates: Option<&Rates>) -> String {
        let (per, total) = self.estimates(requests, rates);
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{} images: {} cached, {} to make{}; {} batches, {} model load{}, estimated time {}",
            self.images,
            self.cached,
            self.to_make,
            if self.duplicates > 0 {
                format!(" ({} duplicates)", self.duplicates)
            } else {
                String::new()
            },
            self.batches(),
            self.model_loads,
            if self.model_loads == 1 { "" } else { "s" },
            fmt_secs(total)
        );
        for (i, (st, est)) in self.stages.iter().zip(&per).enumerate() {
            let load = if st.load {
                if st.evict.is_empty() {
                    "load".to_string()
                } else {
                    format!("load (unload {})", st.evict.join(", "))
                }
            } else {
                "resident".to_string()
            };
            let _ = writeln!(
                s,
                "  {:>2}. {} [{}]: {} images in {} batches, {}, {}",
                i + 1,
                st.model,
                st.role.as_str(),
                st.images(),
                st.batches.len(),
                load,
                fmt_secs(*est)
            );
        }
        s
    }
}

fn fmt_secs(s: Option<f64>) -> String {
    match s {
        None => "unknown".into(),
        Some(s) if s < 60.0 => format!("{s:.1}s"),
        Some(s) if s < 3600.0 => format!("{}m{:02}s", (s / 60.0) as u64, (s % 60.0) as u64),
        Some(s) => format!(
            "{}h{:02}m",
            (s / 3600.0) as u64,
            ((s % 3600.0) / 60.0) as u64
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{plan, tests::spec};
    use crate::spec::{GenParams, RefinerStage};

    fn req(model: &str, seed: u64, refiner: bool) -> ImageRequest {
        ImageRequest {
            job: "j".into(),
            job_index: 0,
            prompt_index: 0,
            grid_index: 0,
            model: model.into(),
            prompt: "p".into(),
            seed,
            params: GenParams {
                steps: 10,
                width: 1024,
                height: 512,
                refiner: refiner.then(|| RefinerStage {
                    model: "ref".into(),
                    switch_at: 0.8,
                }),
                ..GenParams::default()
            },
            grid_point: vec![],
        }
    }

    #[test]
    fn json_and_estimates() {
        let reqs = vec![req("xl", 1, true), req("xl", 2, true), req("sd", 1, false)];
        let keys: Vec<String> = (0..3).map(|i| format!("{i:064x}")).collect();
        let p = plan(&reqs, &keys, &[false, false, false], &spec(None));
        let j = p.to_json(&reqs, None);
        assert_eq!(j["images"], 3);
        assert_eq!(j["to_make"], 3);
        assert_eq!(j["model_loads"], 3);
        assert_eq!(j["batches"], 3);
        assert!(j["estimated_seconds"].is_null());
        assert_eq!(j["stages"][1]["role"], "refiner");
        assert_eq!(j["stages"][1]["images"], 2);
        assert!(p.summary(&reqs, None).contains("unknown"));

        let mut rates = Rates::default();
        rates.record("xl", 4.0, 2, 4.0, REFERENCE_PIXELS); // 0.5 s per step
        rates.record("ref", 1.0, 1, 1.0, REFERENCE_PIXELS);
        let j = p.to_json(&reqs, Some(&rates));
        // xl base: 2 images × 8 steps × 2 (pixels) × 0.5 = 16 s
        assert!((j["stages"][0]["estimated_seconds"].as_f64().unwrap() - 16.0).abs() < 1e-9);
        // refiner: 2 × 2 steps × 2 × 1.0 = 8 s
        assert!((j["stages"][1]["estimated_seconds"].as_f64().unwrap() - 8.0).abs() < 1e-9);
        assert!(j["estimated_seconds"].is_null(), "sd has no rate");
        rates.record("sd", 2.0, 1, 10.0, REFERENCE_PIXELS * 2);
        let j = p.to_json(&reqs, Some(&rates));
        assert!((j["estimated_seconds"].as_f64().unwrap() - 26.0).abs() < 1e-9);
        assert!(p.summary(&reqs, Some(&rates)).contains("26.0s"));
    }

    #[test]
    fn rates_roundtrip_and_damage() {
        let dir = std::env::temp_dir().join(format!("sd-run-rates-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(Rates::load(&dir).unwrap(), Rates::default());
        let mut r = Rates::default();
        r.record("m", 10.0, 1, 10.0, REFERENCE_PIXELS);
        r.record("m", 4.0, 1, 10.0, REFERENCE_PIXELS);
        assert!((r.rate("m").unwrap() - (1.0 * 2.0 / 3.0 + 0.4 / 3.0)).abs() < 1e-12);
        r.record("m", f64::NAN, 1, 10.0, REFERENCE_PIXELS);
        r.record("m", 1.0, 0, 10.0, REFERENCE_PIXELS);
        assert_eq!(r.models["m"].samples, 2);
        r.save(&dir).unwrap();
        assert_eq!(Rates::load(&dir).unwrap(), r);
        std::fs::write(Rates::file(&dir), b"{broken").unwrap();
        assert_eq!(Rates::load(&dir).unwrap(), Rates::default());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

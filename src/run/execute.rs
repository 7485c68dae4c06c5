//! Executes a plan with the engine: model residency, batches, the base → refiner handoff, the
//! safety stage, atomic outputs and manifest lines, events.

use candle_core::{Device, IndexOp, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::campaign::{effective_dtype, Campaign};
use super::events::{Event, Reporter, Summary};
use super::pool::ModelPool;
use super::RunError;
use crate::cache::{DeviceKind, KeyLock};
use crate::engine::pipeline::{Conditioning, GenerateRequest, LoadOptions, StartFrom};
use crate::engine::safety::{RgbImage, SafetyChecker, SafetyVerdict};
use crate::engine::EngineError;
use crate::output::{self, ImageStatus, ManifestRecord, SafetyRecord};
use crate::plan::{Plan, Rates, Role, Stage};
use crate::spec::{ImageRequest, Precision, SafetyAction};

/// The candle device for a device kind.
pub fn candle_device(kind: DeviceKind) -> Result<Device, RunError> {
    let dev = match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda => Device::new_cuda(0),
        DeviceKind::Metal => Device::new_metal(0),
    };
    dev.map_err(|e| {
        RunError::Device(format!(
            "{}: {e} (was sd-run built with --features {}?)",
            kind.as_str(),
            kind.as_str()
        ))
    })
}

fn candle_dtype(p: Precision) -> candle_core::DType {
    match p {
        Precision::F32 => candle_core::DType::F32,
        Precision::F16 => candle_core::DType::F16,
        Precision::Bf16 => candle_core::DType::BF16,
    }
}

/// Runs a plan.
pub struct Executor<'a> {
    campaign: &'a Campaign,
    device: Device,
    pool: ModelPool,
    checkers: HashMap<String, SafetyChecker>,
    embeddings: HashMap<(String, String, String), Conditioning>,
    /// Base latents waiting for their refiner pass, by image key.
    handoff: HashMap<String, Tensor>,
    reporter: &'a mut dyn Reporter,
    interrupt: Arc<AtomicBool>,
    summary: Summary,
    rates: Rates,
    per_model: BTreeMap<String, (f64, usize)>,
    /// Keep models loaded when the plan is done with them (serve mode).
    keep_models: bool,
}

/// What serve mode keeps between runs: the device, the loaded models (within the memory budget)
/// and the loaded safety checkers.
pub struct Resident {
    pub device: Device,
    pub pool: ModelPool,
    checkers: HashMap<String, SafetyChecker>,
}

impl Resident {
    /// Nothing loaded yet, on `kind`, models bounded by `budget` bytes.
    pub fn new(kind: DeviceKind, budget: Option<u64>) -> Result<Self, RunError> {
        Ok(Self {
            device: candle_device(kind)?,
            pool: ModelPool::new(budget),
            checkers: HashMap::new(),
        })
    }

    /// Unloads a model and its safety checker (its declaration changed).
    pub fn forget(&mut self, model: &str) {
        self.pool.release(model);
        self.checkers.remove(model);
    }

    /// Unloads a model's safety checker only (the checker folder changed).
    pub fn forget_checker(&mut self, model: &str) {
        self.checkers.remove(model);
    }
}

/// Where base latents wait for the refiner (content-keyed, so a crash between the stages keeps
/// them).
fn handoff_file(root: &Path, key: &str) -> PathBuf {
    root.join(".sd-run")
        .join("latents")
        .join(format!("{key}.safetensors"))
}

impl<'a> Executor<'a> {
    /// An executor over a prepared campaign.
    pub fn new(
        campaign: &'a Campaign,
        reporter: &'a mut dyn Reporter,
        interrupt: Arc<AtomicBool>,
    ) -> Result<Self, RunError> {
        let device = candle_device(campaign.device)?;
        let budget = campaign.spec.memory_budget;
        let rates = Rates::load(&campaign.spec.output).unwrap_or_default();
        Ok(Self {
            campaign,
            device,
            pool: ModelPool::new(budget),
            checkers: HashMap::new(),
            embeddings: HashMap::new(),
            handoff: HashMap::new(),
            reporter,
            interrupt,
            summary: Summary::default(),
            rates,
            per_model: BTreeMap::new(),
            keep_models: false,
        })
    }

    /// An executor that reuses (and keeps) `resident`'s device, models and safety checkers.
    pub fn with_resident(
        campaign: &'a Campaign,
        reporter: &'a mut dyn Reporter,
        interrupt: Arc<AtomicBool>,
        resident: Resident,
    ) -> Self {
        Self {
            campaign,
            device: resident.device,
            pool: resident.pool,
            checkers: resident.checkers,
            embeddings: HashMap::new(),
            handoff: HashMap::new(),
            reporter,
            interrupt,
            summary: Summary::default(),
            rates: Rates::load(&campaign.spec.output).unwrap_or_default(),
            per_model: BTreeMap::new(),
            keep_models: true,
        }
    }

    /// Runs `plan` and hands back what stays loaded for the next one.
    pub fn run_resident(mut self, plan: &Plan) -> (Summary, Resident) {
        let summary = self.run_plan(plan);
        (
            summary,
            Resident {
                device: self.device,
                pool: self.pool,
                checkers: self.checkers,
            },
        )
    }

    /// Runs every stage of `plan`; returns the summary.
    pub fn run(mut self, plan: &Plan) -> Summary {
        self.run_plan(plan)
    }

    fn run_plan(&mut self, plan: &Plan) -> Summary {
        let started = Instant::now();
        self.summary.cached = plan.cached;
        for (si, stage) in plan.stages.iter().enumerate() {
            if self.interrupt.load(Ordering::SeqCst) {
                break;
            }
            for name in &stage.evict {
                self.pool.release(name);
            }
            if let Err(e) = self.run_stage(stage) {
                // A model that cannot load fails every image of its stage; the run goes on.
                for b in &stage.batches {
                    for &i in &b.items {
                        self.fail(i, &e.to_string());
                    }
                }
            }
            let later = plan.stages[si + 1..].iter().any(|s| s.model == stage.model);
            if !later && !self.keep_models {
                self.pool.release(&stage.model);
                self.embeddings.retain(|k, _| k.0 != stage.model);
            }
        }
        self.summary.interrupted = self.interrupt.load(Ordering::SeqCst);
        self.summary.seconds = started.elapsed().as_secs_f64();
        for (model, (secs, n)) in &self.per_model {
            if *n > 0 {
                self.summary
                    .seconds_per_image
                    .insert(model.clone(), secs / *n as f64);
            }
        }
        let _ = self.rates.save(&self.campaign.spec.output);
        std::mem::take(&mut self.summary)
    }

    fn load_options(&self, model: &str) -> LoadOptions {
        let decl = self.campaign.spec.models.get(model);
        let dtype = effective_dtype(
            decl.map(|d| d.dtype).unwrap_or_default(),
            self.campaign.device,
        );
        LoadOptions {
            device: self.device.clone(),
            dtype: candle_dtype(dtype),
            memory: decl.map(|d| d.memory.clone()).unwrap_or_default(),
        }
    }

    fn run_stage(&mut self, stage: &Stage) -> Result<(), RunError> {
        let resolved = self
            .campaign
            .models
            .get(&stage.model)
            .ok_or_else(|| RunError::Model {
                model: stage.model.clone(),
                message: "not resolved".into(),
            })?;
        let dir = resolved.dir.clone();
        let opts = self.load_options(&stage.model);
        // Load (or reuse) the pipeline, reporting the load.
        {
            let reporter = &mut *self.reporter;
            let model = stage.model.clone();
            let (_, seconds) = self
                .pool
                .get(&stage.model, &dir, &opts, || {
                    reporter.event(&Event::ModelLoading { model })
                })
                .map_err(|e| RunError::Model {
                    model: stage.model.clone(),
                    message: e.to_string(),
                })?;
            if seconds > 0.0 {
                self.reporter.event(&Event::ModelLoaded {
                    model: stage.model.clone(),
                    seconds,
                });
            }
        }
        for batch in &stage.batches {
            if self.interrupt.load(Ordering::SeqCst) {
                break;
            }
            self.run_batch(stage, &batch.items, &dir, &opts);
        }
        Ok(())
    }

    /// Takes each item's lock and drops the ones another process is making or has made.
    fn claim(&mut self, items: &[usize]) -> Vec<(usize, Option<KeyLock>)> {
        let store = &self.campaign.store;
        let mut out = Vec::new();
        for &i in items {
            let key = &self.campaign.keys[i];
            match store.lock_key(key) {
                Ok(Some(lock)) => match store.lookup_fresh(key) {
                    Ok(Some(_)) => {
                        self.summary.skipped += 1;
                        self.reporter.event(&Event::Skipped {
                            key: key.clone(),
                            reason: "made by another run".into(),
                        });
                    }
                    _ => out.push((i, Some(lock))),
                },
                Ok(None) => {
                    self.summary.skipped += 1;
                    self.reporter.event(&Event::Skipped {
                        key: key.clone(),
                        reason: "another run is making it".into(),
                    });
                }
                Err(e) => self.fail(i, &e.to_string()),
            }
        }
        out
    }

    fn run_batch(&mut self, stage: &Stage, items: &[usize], dir: &Path, opts: &LoadOptions) {
        // Base latents kept from an earlier (killed) run need no second base pass.
        let c = self.campaign;
        let pending: Vec<usize> = items
            .iter()
            .copied()
            .filter(|&i| {
                let waits_for_refiner = c.requests[i].params.refiner.is_some();
                !(stage.role == Role::Base
                    && waits_for_refiner
                    && handoff_file(c.store.root(), &c.keys[i]).is_file())
            })
            .collect();
        let claimed = self.claim(&pending);
        if claimed.is_empty() {
            return;
        }
        let idx: Vec<usize> = claimed.iter().map(|(i, _)| *i).collect();
        self.reporter.event(&Event::Batch {
            model: stage.model.clone(),
            role: stage.role.as_str().into(),
            images: idx.len(),
        });
        let started = Instant::now();
        let result = self.compute_batch(stage, &idx, dir, opts);
        let seconds = started.elapsed().as_secs_f64();
        let images = match result {
            Ok(images) => images,
            Err(e) => {
                for &i in &idx {
                    self.fail(i, &e.to_string());
                }
                return;
            }
        };
        let r = &self.campaign.requests[idx[0]];
        let steps = crate::plan::render::stage_steps(r, stage.role);
        let pixels = r.params.width as u64 * r.params.height as u64;
        self.rates
            .record(&stage.model, seconds, idx.len(), steps, pixels);
        // A base pass whose latents wait for the refiner has no images yet.
        if let Some(images) = images {
            let each = seconds / idx.len() as f64;
            for (n, &i) in idx.iter().enumerate() {
                let image = images
                    .i(n)
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1::<f32>());
                match image {
                    Ok(data) => self.finish_image(i, &data, each),
                    Err(e) => self.fail(i, &e.to_string()),
                }
            }
            let e = self.per_model.entry(stage.model.clone()).or_default();
            e.0 += seconds;
            e.1 += idx.len();
        }
        drop(claimed);
    }

    /// Runs one batch through the pipeline: decoded images (B, H, W, 3), or `None` for a base
    /// pass whose latents were handed to the refiner.
    fn compute_batch(
        &mut self,
        stage: &Stage,
        idx: &[usize],
        dir: &Path,
        opts: &LoadOptions,
    ) -> Result<Option<Tensor>, EngineError> {
        let c = self.campaign;
        let first = &c.requests[idx[0]];
        let p = &first.params;
        let negative = &p.negative_prompt;
        let (pipeline, _) = self.pool.get(&stage.model, dir, opts, || {})?;
        let ekey = (stage.model.clone(), first.prompt.clone(), negative.clone());
        if !self.embeddings.contains_key(&ekey) {
            let cond = pipeline.encode_prompt(&first.prompt, negative)?;
            self.embeddings.insert(ekey.clone(), cond);
        }
        let cond = &self.embeddings[&ekey];
        let mut req = GenerateRequest {
            seeds: idx.iter().map(|&i| c.requests[i].seed).collect(),
            steps: p.steps as usize,
            guidance: p.guidance,
            scheduler: p.scheduler,
            width: p.width as usize,
            height: p.height as usize,
            noise: p.noise,
            sdxl: p.sdxl.clone(),
            denoising_end: None,
            start: None,
        };
        match stage.role {
            Role::Base => {
                if let Some(path) = &p.init_image {
                    req.start = Some(StartFrom::Image {
                        image: load_init_image(path, &self.device, p.width, p.height)?,
                        strength: p.strength,
                    });
                }
                if let Some(rf) = &p.refiner {
                    req.denoising_end = Some(rf.switch_at);
                    let latents = pipeline.generate(&req, cond)?;
                    for (n, &i) in idx.iter().enumerate() {
                        let l = latents.i(n..n + 1)?;
                        let file = handoff_file(c.store.root(), &c.keys[i]);
                        save_latents(&file, &l)?;
                        self.handoff.insert(c.keys[i].clone(), l);
                    }
                    return Ok(None);
                }
                let latents = pipeline.generate(&req, cond)?;
                Ok(Some(pipeline.decode(&latents)?))
            }
            Role::Refiner => {
                let switch_at = p.refiner.as_ref().map(|r| r.switch_at).unwrap_or(0.8);
                let mut parts = Vec::new();
                for &i in idx {
                    let key = &c.keys[i];
                    let l = match self.handoff.get(key) {
                        Some(l) => l.clone(),
                        None => load_latents(&handoff_file(c.store.root(), key), &self.device)?,
                    };
                    parts.push(l);
                }
                let latents = Tensor::cat(&parts, 0)?;
                req.start = Some(StartFrom::Latents {
                    latents,
                    denoising_start: switch_at,
                });
                let latents = pipeline.generate(&req, cond)?;
                let images = pipeline.decode(&latents)?;
                for &i in idx {
                    self.handoff.remove(&c.keys[i]);
                }
                Ok(Some(images))
            }
        }
    }

    /// The safety checker for images of `model`, loaded on first use.
    fn checker(&mut self, model: &str) -> Result<Option<&SafetyChecker>, EngineError> {
        let Some(folder) = self.campaign.checkers.get(model) else {
            return Ok(None);
        };
        if !self.checkers.contains_key(model) {
            let fe = folder
                .parent()
                .map(|p| p.join("feature_extractor"))
                .unwrap_or_default();
            let checker = SafetyChecker::load(folder, &fe, &self.device)?;
            self.checkers.insert(model.to_string(), checker);
        }
        Ok(self.checkers.get(model))
    }

    fn base_record(&self, i: usize) -> ManifestRecord {
        let c = self.campaign;
        let r: &ImageRequest = &c.requests[i];
        let p = &r.params;
        ManifestRecord {
            key: c.keys[i].clone(),
            path: None,
            file_sha256: None,
            job: r.job.clone(),
            model: r.model.clone(),
            prompt: r.prompt.clone(),
            negative_prompt: p.negative_prompt.clone(),
            seed: r.seed,
            steps: p.steps,
            guidance: p.guidance,
            scheduler: p.scheduler.as_str().into(),
            width: p.width,
            height: p.height,
            noise: p.noise.as_str().into(),
            refiner: p.refiner.clone(),
            safety: SafetyRecord::default(),
            status: ImageStatus::Ok,
            seconds: 0.0,
            model_hash: c
                .models
                .get(&r.model)
                .map(|m| m.digest.a1111_hash().to_string())
                .unwrap_or_default(),
            grid: r.grid_point.clone(),
            error: None,
        }
    }

    fn fail(&mut self, i: usize, error: &str) {
        let mut rec = self.base_record(i);
        rec.status = ImageStatus::Failed;
        rec.error = Some(error.to_string());
        let _ = self.campaign.store.append_manifest(&rec);
        self.summary.failed += 1;
        self.reporter.event(&Event::Failed {
            key: rec.key.clone(),
            job: rec.job.clone(),
            error: error.to_string(),
        });
        self.reporter.event(&Event::Image {
            key: rec.key,
            job: rec.job,
            path: None,
            status: "failed".into(),
            seconds: 0.0,
        });
    }

    /// Safety stage, PNG with metadata, atomic write, manifest line.
    fn finish_image(&mut self, i: usize, image: &[f32], seconds: f64) {
        if image.iter().any(|x| !x.is_finite()) {
            return self.fail(i, "the image has NaN or infinite values");
        }
        let mut rec = self.base_record(i);
        rec.seconds = seconds;
        let (w, h) = (rec.width, rec.height);
        let mut rgb = output::pixels::to_rgb8(image);
        let policy = self.campaign.spec.safety.clone();
        let model = rec.model.clone();
        let verdict: Option<SafetyVerdict> = match self.checker(&model) {
            Ok(Some(checker)) => {
                let img = RgbImage {
                    width: w as usize,
                    height: h as usize,
                    data: rgb.clone(),
                };
                match checker.check(&[img], policy.threshold_adjust) {
                    Ok(mut v) => v.pop(),
                    Err(e) => return self.fail(i, &format!("safety checker: {e}")),
                }
            }
            Ok(None) => None,
            Err(e) => return self.fail(i, &format!("safety checker: {e}")),
        };
        let mut folder = format!("images/{}", &rec.key[..2]);
        if let Some(v) = &verdict {
            rec.safety.checked = true;
            rec.safety.flagged = v.flagged;
            for (n, s) in v.concept_scores.iter().enumerate() {
                rec.safety.scores.insert(format!("concept_{n}"), *s);
            }
            for (n, s) in v.special_scores.iter().enumerate() {
                rec.safety.scores.insert(format!("special_{n}"), *s);
            }
            if v.flagged {
                rec.status = ImageStatus::Flagged;
                rec.safety.action = Some(policy.action.as_str().into());
                self.summary.flagged += 1;
                self.reporter.event(&Event::Flagged {
                    key: rec.key.clone(),
                    job: rec.job.clone(),
                    action: policy.action.as_str().into(),
                });
                match policy.action {
                    SafetyAction::Tag => {}
                    SafetyAction::Blur => output::pixels::blur(w, h, &mut rgb),
                    SafetyAction::Black => output::pixels::black(&mut rgb),
                    SafetyAction::Quarantine => folder = "quarantine".into(),
                    SafetyAction::Drop => {
                        return self.land(rec, None);
                    }
                }
            }
        }
        rec.path = Some(format!("{folder}/{}.png", rec.key));
        let r = &self.campaign.requests[i];
        let extra: Vec<(&str, String)> = match &r.params.init_image {
            Some(_) => vec![("Denoising strength", format!("{}", r.params.strength))],
            None => Vec::new(),
        };
        match output::png_meta::encode_png_with(w, h, &rgb, &rec, &extra) {
            Ok(png) => self.land(rec, Some((folder, png))),
            Err(e) => self.fail(i, &e.to_string()),
        }
    }

    /// Writes the PNG (if any) atomically, then its manifest line.
    fn land(&mut self, mut rec: ManifestRecord, png: Option<(String, Vec<u8>)>) {
        if let Some((folder, bytes)) = png {
            match self.campaign.store.write_image(&rec.key, &folder, &bytes) {
                Ok((path, sha)) => {
                    rec.path = Some(path);
                    rec.file_sha256 = Some(sha);
                }
                Err(e) => {
                    self.summary.failed += 1;
                    self.reporter.event(&Event::Failed {
                        key: rec.key.clone(),
                        job: rec.job.clone(),
                        error: e.to_string(),
                    });
                    return;
                }
            }
        } else {
            rec.path = None;
        }
        if let Err(e) = self.campaign.store.append_manifest(&rec) {
            self.summary.failed += 1;
            self.reporter.event(&Event::Failed {
                key: rec.key.clone(),
                job: rec.job.clone(),
                error: e.to_string(),
            });
            return;
        }
        if rec.refiner.is_some() {
            let _ = std::fs::remove_file(handoff_file(self.campaign.store.root(), &rec.key));
        }
        self.summary.made += 1;
        let status = match rec.status {
            ImageStatus::Ok => "ok",
            ImageStatus::Flagged => "flagged",
            ImageStatus::Failed => "failed",
        };
        self.reporter.event(&Event::Image {
            key: rec.key,
            job: rec.job,
            path: rec.path,
            status: status.into(),
            seconds: rec.seconds,
        });
    }
}

/// Saves one image's latents atomically (unique temp file in the same folder, fsync, rename).
fn save_latents(file: &Path, latents: &Tensor) -> Result<(), EngineError> {
    let bytes =
        safetensors::serialize([("latents", latents)], None).map_err(|e| EngineError::Load {
            file: file.to_path_buf(),
            message: e.to_string(),
        })?;
    crate::cache::write_atomic(file, &bytes).map_err(|e| EngineError::Load {
        file: file.to_path_buf(),
        message: e.to_string(),
    })
}

fn load_latents(file: &Path, device: &Device) -> Result<Tensor, EngineError> {
    let mut map = candle_core::safetensors::load(file, device).map_err(|e| EngineError::Load {
        file: file.to_path_buf(),
        message: format!("base latents missing: {e}"),
    })?;
    map.remove("latents").ok_or_else(|| EngineError::Load {
        file: file.to_path_buf(),
        message: "no `latents` tensor".into(),
    })
}

/// Reads an init image, resized to the job's size, as (1, 3, H, W) in [-1, 1].
fn load_init_image(
    path: &Path,
    device: &Device,
    width: u32,
    height: u32,
) -> Result<Tensor, EngineError> {
    let img = image::open(path).map_err(|e| EngineError::Load {
        file: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let img = img
        .resize_exact(width, height, image::imageops::FilterType::Lanczos3)
        .to_rgb8();
    let data: Vec<f32> = img
        .into_raw()
        .into_iter()
        .map(|v| v as f32 / 127.5 - 1.0)
        .collect();
    let t = Tensor::from_vec(data, (height as usize, width as usize, 3), device)?;
    Ok(t.permute((2, 0, 1))?.unsqueeze(0)?)
}

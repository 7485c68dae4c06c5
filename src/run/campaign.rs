//! A campaign made ready to plan: the validated spec, its images, where each model's files are,
//! their digests, each image's cache key, and what the store already has.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::RunError;
use crate::cache::{
    digest_folder, digest_model, image_keys, DeviceKind, DigestIndex, KeyContext, ModelDigest,
    SafetyKey, Store,
};
use crate::engine::hub::{self, HubOptions};
use crate::spec::{self, CheckerChoice, ImageRequest, Offload, Precision, Spec};

/// How hard to try to find a model's files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fetch {
    /// Download what is missing (a run).
    Download,
    /// Only what is on disk already (plan, status): never touches the network.
    LocalOnly,
}

/// A model's files on disk and their digests.
#[derive(Debug, Clone)]
pub struct ResolvedModel {
    pub dir: PathBuf,
    pub digest: ModelDigest,
}

/// A campaign ready to plan and run.
pub struct Campaign {
    pub spec: Spec,
    pub requests: Vec<ImageRequest>,
    pub keys: Vec<String>,
    /// Models found on disk, by name; a model missing here (not downloaded yet) has no keys
    /// that can hit the store.
    pub models: BTreeMap<String, ResolvedModel>,
    /// The safety checker folder for each model, when the safety stage runs on it.
    pub checkers: BTreeMap<String, PathBuf>,
    pub store: Store,
    pub device: DeviceKind,
    pub warnings: Vec<String>,
}

/// Where a safety checker folder is, given a path to it or to a model folder that has one.
fn checker_folder(path: &Path) -> Option<PathBuf> {
    if path.join("config.json").is_file() && path.join("model.safetensors").is_file() {
        return Some(path.to_path_buf());
    }
    let inner = path.join("safety_checker");
    inner.is_dir().then_some(inner)
}

/// The dtype a model computes in on `device` (CPU always computes in f32).
pub fn effective_dtype(asked: Precision, device: DeviceKind) -> Precision {
    match device {
        DeviceKind::Cpu => Precision::F32,
        _ => asked,
    }
}

impl Campaign {
    /// Loads and validates the spec, finds the models, digests them, keys every image and
    /// opens the store.
    pub fn prepare(spec_path: &Path, device: DeviceKind, fetch: Fetch) -> Result<Self, RunError> {
        let spec = spec::load(spec_path).map_err(RunError::Spec)?;
        Self::from_spec(spec, device, fetch)
    }

    /// Like [`Campaign::prepare`] for a spec already validated.
    pub fn from_spec(spec: Spec, device: DeviceKind, fetch: Fetch) -> Result<Self, RunError> {
        let requests = spec::expand(&spec);
        let index = DigestIndex::open_default().unwrap_or_else(|_| DigestIndex::in_memory());
        let mut hub_opts = HubOptions::from_env();
        if fetch == Fetch::LocalOnly {
            hub_opts.offline = true;
        }
        let mut warnings = Vec::new();
        let mut models = BTreeMap::new();
        for (name, decl) in &spec.models {
            let used = requests.iter().any(|r| {
                r.model == *name || r.params.refiner.as_ref().is_some_and(|x| x.model == *name)
            });
            if !used {
                continue;
            }
            let dir = match hub::resolve(&decl.source, decl.dtype, &hub_opts) {
                Ok(dir) => dir,
                Err(_) if fetch == Fetch::LocalOnly => {
                    warnings.push(format!(
                        "model {name}: not on this machine yet (`sd-run run` downloads it); its images count as to make"
                    ));
                    continue;
                }
                Err(e) => {
                    return Err(RunError::Model {
                        model: name.clone(),
                        message: e.to_string(),
                    })
                }
            };
            let digest = digest_model(&dir, &index).map_err(|e| RunError::Model {
                model: name.clone(),
                message: e.to_string(),
            })?;
            if decl.memory.flash_attention || decl.memory.offload == Offload::Model {
                let why = if device == DeviceKind::Cpu {
                    "do not apply on CPU"
                } else {
                    "are not implemented yet"
                };
                warnings.push(format!(
                    "model {name}: memory.flash_attention and memory.offload {why}; ignored"
                ));
            }
            if device == DeviceKind::Cpu && decl.dtype != Precision::F32 {
                warnings.push(
                    format!(
                        "model {name}: dtype {:?} asked, CPU computes in f32",
                        decl.dtype
                    )
                    .to_lowercase(),
                );
            }
            models.insert(name.clone(), ResolvedModel { dir, digest });
        }
        let _ = index.save();

        // The safety checker each base model's images go through.
        let mut checkers = BTreeMap::new();
        let mut checker_digests = BTreeMap::new();
        for (name, m) in &models {
            let folder = match &spec.safety.checker {
                CheckerChoice::Off => None,
                CheckerChoice::Model => checker_folder(&m.dir),
                CheckerChoice::Path(p) => checker_folder(p),
            };
            let is_base = requests.iter().any(|r| r.model == *name);
            match folder {
                Some(f) => {
                    let d = digest_folder(&f, &index).map_err(|e| RunError::Model {
                        model: name.clone(),
                        message: e.to_string(),
                    })?;
                    checker_digests.insert(name.clone(), d);
                    checkers.insert(name.clone(), f);
                }
                None if is_base && spec.safety.checker == CheckerChoice::Model => {
                    warnings.push(format!("model {name} has no safety_checker/: its images are not checked (safety.checker: model)"));
                }
                None if is_base && matches!(spec.safety.checker, CheckerChoice::Path(_)) => {
                    return Err(RunError::Model {
                        model: name.clone(),
                        message: "safety.checker path has no safety checker".into(),
                    });
                }
                None => {}
            }
        }

        // One key context per (model, refiner) pair.
        let mut contexts: BTreeMap<(String, Option<String>), KeyContext> = BTreeMap::new();
        for r in &requests {
            let refiner = r.params.refiner.as_ref().map(|x| x.model.clone());
            let k = (r.model.clone(), refiner.clone());
            if contexts.contains_key(&k) {
                continue;
            }
            let digest_of = |m: &str| {
                models
                    .get(m)
                    .map(|x| x.digest.combined.clone())
                    .unwrap_or_else(|| format!("unresolved:{m}"))
            };
            let dtype_of = |m: &str| {
                effective_dtype(
                    spec.models.get(m).map(|d| d.dtype).unwrap_or_default(),
                    device,
                )
            };
            let safety = match checker_digests.get(&r.model) {
                Some(d) => SafetyKey {
                    checker: d.clone(),
                    action: spec.safety.action,
                    threshold_adjust: spec.safety.threshold_adjust,
                },
                None => SafetyKey::off(),
            };
            let ctx = KeyContext {
                model_digest: digest_of(&r.model),
                refiner_digest: refiner.as_deref().map(digest_of),
                dtype: dtype_of(&r.model),
                refiner_dtype: refiner.as_deref().map(dtype_of),
                device,
                safety,
                init_image_digests: BTreeMap::new(),
            };
            contexts.insert(k, ctx);
        }
        for ctx in contexts.values_mut() {
            ctx.add_init_images(&requests)
                .map_err(|e| RunError::Io(e.to_string()))?;
        }
        let keys = image_keys(&requests, |r| {
            let k = (
                r.model.clone(),
                r.params.refiner.as_ref().map(|x| x.model.clone()),
            );
            &contexts[&k]
        });
        let store = Store::open(&spec.output).map_err(|e| RunError::Io(e.to_string()))?;
        Ok(Self {
            spec,
            requests,
            keys,
            models,
            checkers,
            store,
            device,
            warnings,
        })
    }

    /// Which images the store already has, whole.
    pub fn cached(&self) -> Vec<bool> {
        self.store.cached_flags(&self.keys)
    }
}

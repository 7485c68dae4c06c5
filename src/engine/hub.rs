//! Model sources: a folder on disk, or `hf:ORG/NAME[@REV]` resolved through the standard Hugging
//! Face cache (downloading only the files the pipeline reads, unless offline).

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{weights, EngineError};
use crate::spec::{ModelSource, Precision};

/// Where the Hugging Face cache lives and whether the network may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache (the folder holding `models--ORG--NAME`).
    pub cache_dir: PathBuf,
    /// Read only what is already cached.
    pub offline: bool,
}

impl HubOptions {
    /// `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`; offline when
    /// `HF_HUB_OFFLINE` is `1`/`true`/`yes`/`on`.
    pub fn from_env() -> Self {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
        let cache_dir = if let Some(c) = var("HF_HUB_CACHE") {
            PathBuf::from(c)
        } else if let Some(h) = var("HF_HOME") {
            PathBuf::from(h).join("hub")
        } else {
            let home = var("HOME")
                .or_else(|| var("USERPROFILE"))
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("."));
            home.join(".cache").join("huggingface").join("hub")
        };
        let offline = std::env::var("HF_HUB_OFFLINE")
            .map(|v| {
                matches!(
                    v.trim().to_ascii_lowercase().as_str(),
                    "1" | "true" | "yes" | "on"
                )
            })
            .unwrap_or(false);
        Self { cache_dir, offline }
    }
}

/// Weight file names of a component folder, in order of preference for `prefer_fp16`.
fn weight_names(prefer_fp16: bool) -> [&'static str; 4] {
    let plain = ["diffusion_pytorch_model.safetensors", "model.safetensors"];
    let fp16 = [
        "diffusion_pytorch_model.fp16.safetensors",
        "model.fp16.safetensors",
    ];
    if prefer_fp16 {
        [fp16[0], fp16[1], plain[0], plain[1]]
    } else {
        [plain[0], plain[1], fp16[0], fp16[1]]
    }
}

/// The weights of a component folder: the `*.fp16.safetensors` variant first when
/// `prefer_fp16`, else the plain file ([`weights::component_file`]), else the variant.
pub fn component_weights(dir: &Path, prefer_fp16: bool) -> Result<PathBuf, EngineError> {
    for name in weight_names(prefer_fp16) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    weights::component_file(dir)
}

/// What one component of `model_index.json` is, from its class name.
enum Kind {
    Scheduler,
    Tokenizer,
    FeatureExtractor,
    Model,
}

fn kind(class: &str) -> Kind {
    if class.contains("Scheduler") {
        Kind::Scheduler
    } else if class.contains("Tokenizer") {
        Kind::Tokenizer
    } else if class.contains("FeatureExtractor") || class.contains("Processor") {
        Kind::FeatureExtractor
    } else {
        Kind::Model
    }
}

/// The component folders of a `model_index.json` whose class is not null, with their class.
fn components(index_file: &Path) -> Result<Vec<(String, String)>, EngineError> {
    let v: serde_json::Value = weights::read_json(index_file)?;
    let obj = v.as_object().ok_or_else(|| EngineError::Load {
        file: index_file.to_path_buf(),
        message: "not a JSON object".into(),
    })?;
    let mut out = Vec::new();
    for (name, value) in obj {
        if name.starts_with('_') {
            continue;
        }
        if let Some(arr) = value.as_array() {
            if let Some(class) = arr.get(1).and_then(|c| c.as_str()) {
                out.push((name.clone(), class.to_string()));
            }
        }
    }
    Ok(out)
}

/// The files of the repo the pipeline needs, chosen among `available` (repo-relative paths).
/// Errors name the first required file that is missing (and what would also do).
fn needed_files(
    comps: &[(String, String)],
    available: &BTreeSet<String>,
    prefer_fp16: bool,
) -> Result<Vec<String>, (String, &'static str)> {
    let mut out = vec!["model_index.json".to_string()];
    for (comp, class) in comps {
        let has = |f: &str| available.contains(&format!("{comp}/{f}"));
        let mut take = |f: &str| out.push(format!("{comp}/{f}"));
        match kind(class) {
            Kind::Scheduler => {
                if !has("scheduler_config.json") {
                    return Err((format!("{comp}/scheduler_config.json"), ""));
                }
                take("scheduler_config.json");
            }
            Kind::Tokenizer => {
                let files = [
                    "tokenizer.json",
                    "vocab.json",
                    "merges.txt",
                    "tokenizer_config.json",
                    "special_tokens_map.json",
                ];
                let bpe = has("vocab.json") && has("merges.txt");
                if !has("tokenizer.json") && !bpe {
                    return Err((
                        format!("{comp}/tokenizer.json"),
                        " (nor vocab.json + merges.txt)",
                    ));
                }
                for f in files.iter().filter(|f| has(f)) {
                    take(f);
                }
            }
            Kind::FeatureExtractor => {
                if !has("preprocessor_config.json") {
                    return Err((format!("{comp}/preprocessor_config.json"), ""));
                }
                take("preprocessor_config.json");
            }
            Kind::Model => {
                if !has("config.json") {
                    return Err((format!("{comp}/config.json"), ""));
                }
                take("config.json");
                match weight_names(prefer_fp16).into_iter().find(|f| has(f)) {
                    Some(w) => take(w),
                    None => {
                        return Err((
                            format!("{comp}/diffusion_pytorch_model.safetensors"),
                            " (nor model.safetensors; .bin/.ckpt are not read)",
                        ))
                    }
                }
            }
        }
    }
    Ok(out)
}

/// All files under `dir`, as `/`-separated paths relative to it.
fn list_files(dir: &Path) -> BTreeSet<String> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeSet<String>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else if p.is_file() {
                if let Ok(rel) = p.strip_prefix(root) {
                    out.insert(
                        rel.components()
                            .map(|c| c.as_os_str().to_string_lossy().into_owned())
                            .collect::<Vec<_>>()
                            .join("/"),
                    );
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(dir, dir, &mut out);
    out
}

/// Resolves a model source to a diffusers-layout folder. A path source returns its folder; an
/// `hf:` source returns the cache snapshot (`.../models--ORG--NAME/snapshots/<commit>/`) after
/// downloading what the pipeline reads (online) or checking it is all cached (offline).
pub fn resolve(
    source: &ModelSource,
    dtype: Precision,
    opts: &HubOptions,
) -> Result<PathBuf, EngineError> {
    match source {
        ModelSource::Path { path } => {
            if path.is_dir() {
                Ok(path.clone())
            } else {
                Err(EngineError::Load {
                    file: path.clone(),
                    message: "model folder not found".into(),
                })
            }
        }
        ModelSource::Hf { repo, revision } => {
            let rev = revision.clone().unwrap_or_else(|| "main".to_string());
            let prefer_fp16 = dtype == Precision::F16;
            if opts.offline {
                resolve_offline(repo, &rev, prefer_fp16, &opts.cache_dir)
            } else {
                resolve_online(repo, &rev, prefer_fp16, &opts.cache_dir)
            }
        }
    }
}

fn hf_name(repo: &str, rev: &str) -> String {
    format!("hf:{repo}@{rev}")
}

fn resolve_offline(
    repo: &str,
    rev: &str,
    prefer_fp16: bool,
    cache_dir: &Path,
) -> Result<PathBuf, EngineError> {
    let r = Repo::with_revision(repo.to_string(), RepoType::Model, rev.to_string());
    let repo_dir = cache_dir.join(r.folder_name());
    let snapshots = repo_dir.join("snapshots");
    // A ref name (refs/<rev> holds the commit) or a commit hash (snapshots/<rev> exists).
    let commit = match Cache::new(cache_dir.to_path_buf())
        .repo(r.clone())
        .get("model_index.json")
    {
        Some(p) => p
            .parent()
            .and_then(|s| s.file_name())
            .map(|s| s.to_string_lossy().into_owned()),
        None => None,
    };
    let commit = match commit {
        Some(c) => c,
        None => {
            let ref_file = repo_dir.join("refs").join(rev);
            if let Ok(c) = std::fs::read_to_string(&ref_file) {
                c.trim().to_string()
            } else if !rev.is_empty() && snapshots.join(rev).is_dir() {
                rev.to_string()
            } else {
                return Err(EngineError::Load {
                    file: repo_dir,
                    message: format!("{} is not in the Hugging Face cache (offline: HF_HUB_OFFLINE is set or --offline given)", hf_name(repo, rev)),
                });
            }
        }
    };
    let snapshot = snapshots.join(&commit);
    let index = snapshot.join("model_index.json");
    if !index.is_file() {
        return Err(EngineError::Load {
            file: index,
            message: format!(
                "{}: model_index.json is not cached (offline)",
                hf_name(repo, rev)
            ),
        });
    }
    let comps = components(&index)?;
    let available = list_files(&snapshot);
    needed_files(&comps, &available, prefer_fp16).map_err(|(missing, note)| EngineError::Load {
        file: snapshot.join(&missing),
        message: format!(
            "{}: `{missing}` is not cached{note} (offline)",
            hf_name(repo, rev)
        ),
    })?;
    Ok(snapshot)
}

fn resolve_online(
    repo: &str,
    rev: &str,
    prefer_fp16: bool,
    cache_dir: &Path,
) -> Result<PathBuf, EngineError> {
    let cache = Cache::new(cache_dir.to_path_buf());
    let token = std::env::var("HF_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or_else(|| cache.token());
    let mut builder = ApiBuilder::from_cache(cache)
        .with_progress(false)
        .with_token(token);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    let name = hf_name(repo, rev);
    let net = |file: &str, e: hf_hub::api::sync::ApiError| EngineError::Load {
        file: PathBuf::from(file),
        message: format!("{name}: {e}"),
    };
    let api = builder.build().map_err(|e| net("(hub client)", e))?;
    let api_repo = api.repo(Repo::with_revision(
        repo.to_string(),
        RepoType::Model,
        rev.to_string(),
    ));
    let info = api_repo.info().map_err(|e| net("(repo info)", e))?;
    let available: BTreeSet<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();
    if !available.contains("model_index.json") {
        return Err(EngineError::Load {
            file: PathBuf::from("model_index.json"),
            message: format!("{name}: the repo has no model_index.json (not a diffusers pipeline)"),
        });
    }
    let index = api_repo
        .get("model_index.json")
        .map_err(|e| net("model_index.json", e))?;
    let comps = components(&index)?;
    let files = needed_files(&comps, &available, prefer_fp16).map_err(|(missing, note)| {
        EngineError::Load {
            file: PathBuf::from(&missing),
            message: format!("{name}: the repo has no `{missing}`{note}"),
        }
    })?;
    for f in &files {
        api_repo.get(f).map_err(|e| net(f, e))?;
    }
    let snapshot = index
        .parent()
        .map(Path::to_path_buf)
        .ok_or_else(|| EngineError::Load {
            file: index.clone(),
            message: format!("{name}: unexpected cache layout"),
        })?;
    Ok(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn comps() -> Vec<(String, String)> {
        [
            ("scheduler", "DDIMScheduler"),
            ("tokenizer", "CLIPTokenizer"),
            ("feature_extractor", "CLIPImageProcessor"),
            ("text_encoder", "CLIPTextModel"),
            ("unet", "UNet2DConditionModel"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
    }

    fn repo_files(extra: &[&str]) -> BTreeSet<String> {
        let mut s: BTreeSet<String> = [
            "model_index.json",
            "README.md",
            "scheduler/scheduler_config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json",
            "feature_extractor/preprocessor_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "text_encoder/pytorch_model.bin",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "v1-5-pruned.ckpt",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        s.extend(extra.iter().map(|s| s.to_string()));
        s
    }

    #[test]
    fn only_what_the_pipeline_reads() {
        let got = needed_files(&comps(), &repo_files(&[]), false).unwrap();
        let want = [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "tokenizer/vocab.json",
            "tokenizer/merges.txt",
            "tokenizer/tokenizer_config.json",
            "feature_extractor/preprocessor_config.json",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
        ];
        assert_eq!(got, want);
        // f16 prefers the fp16 variant where there is one.
        let got = needed_files(&comps(), &repo_files(&[]), true).unwrap();
        assert!(got.contains(&"unet/diffusion_pytorch_model.fp16.safetensors".to_string()));
        assert!(got.contains(&"text_encoder/model.safetensors".to_string()));
        assert!(!got
            .iter()
            .any(|f| f.ends_with(".bin") || f.ends_with(".ckpt")));
    }

    #[test]
    fn missing_weights_are_named() {
        let mut files = repo_files(&[]);
        files.remove("text_encoder/model.safetensors");
        let (missing, note) = needed_files(&comps(), &files, false).unwrap_err();
        assert_eq!(missing, "text_encoder/diffusion_pytorch_model.safetensors");
        assert!(note.contains("model.safetensors"));
    }

    #[test]
    fn fp16_only_component_is_found_by_component_weights() {
        let dir = std::env::temp_dir().join(format!("sd-run-hub-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("diffusion_pytorch_model.fp16.safetensors"), b"x").unwrap();
        assert!(component_weights(&dir, false)
            .unwrap()
            .ends_with("diffusion_pytorch_model.fp16.safetensors"));
        std::fs::write(dir.join("diffusion_pytorch_model.safetensors"), b"x").unwrap();
        assert!(component_weights(&dir, false)
            .unwrap()
            .ends_with("diffusion_pytorch_model.safetensors"));
        assert!(component_weights(&dir, true)
            .unwrap()
            .ends_with("diffusion_pytorch_model.fp16.safetensors"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

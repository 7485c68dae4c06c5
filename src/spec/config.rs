//! `sd-run.toml`: where and how this machine makes images (device, budget, store, server,
//! server-side models).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::diag::{line_col, Diagnostic, SpecErrors};
use super::types::{DeviceChoice, MemoryPolicy, ModelDecl, ModelSource};
use super::validate::check_model_dir;
use super::values;

/// `[store]`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StoreConfig {
    /// Serve mode's store (resolved against the config's folder); a spec's `output:` wins for `run`.
    pub output: Option<PathBuf>,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Listen address (default `127.0.0.1:7860`).
    pub addr: String,
    /// When set, every `/v1` request needs `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// Queued images beyond this get 429 (default 64).
    pub queue_limit: usize,
    /// Largest job a client may submit, in images (default 1000).
    pub max_images_per_job: usize,
    /// Whether client specs may bring their own model `source`s (default false).
    pub allow_client_models: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: "127.0.0.1:7860".into(),
            token: None,
            queue_limit: 64,
            max_images_per_job: 1000,
            allow_client_models: false,
        }
    }
}

/// A parsed `sd-run.toml`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MachineConfig {
    /// The file it was read from, when it came from one.
    pub file: Option<PathBuf>,
    pub device: DeviceChoice,
    /// Bytes resident models may take together.
    pub memory_budget: Option<u64>,
    pub store: StoreConfig,
    pub server: ServerConfig,
    /// `[models.NAME]`, same fields as a spec's models (paths relative to the config's folder).
    pub models: BTreeMap<String, ModelDecl>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    device: Option<Spanned<String>>,
    memory_budget: Option<Spanned<toml::Value>>,
    store: Option<RawStore>,
    server: Option<RawServer>,
    models: Option<BTreeMap<Spanned<String>, RawModel>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStore {
    output: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    addr: Option<Spanned<String>>,
    token: Option<String>,
    queue_limit: Option<Spanned<i64>>,
    max_images_per_job: Option<Spanned<i64>>,
    allow_client_models: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    source: Spanned<String>,
    dtype: Option<Spanned<String>>,
    memory: Option<RawMemory>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMemory {
    attention_slicing: Option<Spanned<toml::Value>>,
    flash_attention: Option<bool>,
    vae_tiling: Option<bool>,
    offload: Option<Spanned<String>>,
}

struct Report<'a> {
    file: &'a str,
    text: &'a str,
    diags: Vec<Diagnostic>,
}

impl Report<'_> {
    fn at(&mut self, span: std::ops::Range<usize>, message: impl Into<String>) {
        let (line, col) = line_col(self.text, span.start);
        self.diags.push(Diagnostic {
            file: self.file.to_string(),
            line,
            col,
            message: message.into(),
        });
    }
    fn check<T>(&mut self, span: std::ops::Range<usize>, r: Result<T, String>) -> Option<T> {
        r.map_err(|e| self.at(span, e)).ok()
    }
}

fn value_text(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl MachineConfig {
    /// Reads and validates `path`; relative paths in it resolve against its folder.
    pub fn load(path: &Path) -> Result<MachineConfig, SpecErrors> {
        let label = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|e| SpecErrors::one(&label, 1, 1, format!("cannot read config: {e}")))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut cfg = Self::load_str(&text, &label, base)?;
        cfg.file = Some(path.to_path_buf());
        Ok(cfg)
    }

    /// Validates config text; `file_label` names it in messages, `base_dir` anchors its paths.
    pub fn load_str(
        text: &str,
        file_label: &str,
        base_dir: &Path,
    ) -> Result<MachineConfig, SpecErrors> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
            SpecErrors::one(file_label, line, col, e.message().trim().to_string())
        })?;
        let mut r = Report {
            file: file_label,
            text,
            diags: Vec::new(),
        };
        let mut cfg = MachineConfig::default();

        if let Some(d) = raw.device {
            let span = d.span();
            let v = d.into_inner();
            cfg.device = r
                .check(
                    span,
                    DeviceChoice::parse(&v).ok_or_else(|| {
                        format!("unknown device `{v}`; valid: auto, cpu, cuda, metal")
                    }),
                )
                .unwrap_or_default();
        }
        if let Some(m) = raw.memory_budget {
            let span = m.span();
            let t = value_text(m.get_ref());
            cfg.memory_budget = r.check(span, values::parse_bytes("memory_budget", &t));
        }
        if let Some(s) = raw.store {
            cfg.store.output = s.output.map(|o| {
                let j = base_dir.join(o);
                std::path::absolute(&j).unwrap_or(j)
            });
        }
        if let Some(s) = raw.server {
            if let Some(a) = s.addr {
                let span = a.span();
                let v = a.into_inner();
                let ok = v
                    .rsplit_once(':')
                    .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
                if ok {
                    cfg.server.addr = v;
                } else {
                    r.at(
                        span,
                        format!("`addr` must be HOST:PORT (e.g. 127.0.0.1:7860), got `{v}`"),
                    );
                }
            }
            cfg.server.token = s.token.filter(|t| !t.is_empty());
            for (field, val, slot) in [
                ("queue_limit", s.queue_limit, &mut cfg.server.queue_limit),
                (
                    "max_images_per_job",
                    s.max_images_per_job,
                    &mut cfg.server.max_images_per_job,
                ),
            ] {
                if let Some(v) = val {
                    let span = v.span();
                    match usize::try_from(*v.get_ref()) {
                        Ok(n) if n >= 1 => *slot = n,
                        _ => r.at(
                            span,
                            format!("`{field}` must be at least 1, got {}", v.get_ref()),
                        ),
                    }
                }
            }
            if let Some(a) = s.allow_client_models {
                cfg.server.allow_client_models = a;
            }
        }
        for (name, m) in raw.models.unwrap_or_default() {
            let name_span = name.span();
            let name = name.into_inner();
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            {
                r.at(
                    name_span,
                    format!("model name `{name}` must match [A-Za-z0-9_-]+"),
                );
            }
            let span = m.source.span();
            let s = m.source.into_inner();
            let source = match values::parse_hf_source(&s) {
                Err(e) => r.check::<ModelSource>(span, Err(e)),
                Ok(Some(src)) => Some(src),
                Ok(None) => {
                    let j = base_dir.join(&s);
                    let p = std::fs::canonicalize(&j).unwrap_or(j);
                    r.check(span, check_model_dir(&p, &s))
                        .map(|path| ModelSource::Path { path })
                }
            };
            let dtype = match m.dtype {
                Some(d) => {
                    let span = d.span();
                    r.check(span, values::parse_dtype(d.get_ref()))
                        .unwrap_or_default()
                }
                None => Default::default(),
            };
            let mut memory = MemoryPolicy::default();
            if let Some(mem) = m.memory {
                if let Some(a) = mem.attention_slicing {
                    let span = a.span();
                    let t = value_text(a.get_ref());
                    if let Some(v) = r.check(span, values::parse_slicing(&t)) {
                        memory.attention_slicing = v;
                    }
                }
                memory.flash_attention = mem.flash_attention.unwrap_or(false);
                memory.vae_tiling = mem.vae_tiling.unwrap_or(false);
                if let Some(o) = mem.offload {
                    let span = o.span();
                    if let Some(v) = r.check(span, values::parse_offload(o.get_ref())) {
                        memory.offload = v;
                    }
                }
            }
            if let Some(source) = source {
                cfg.models.insert(
                    name.clone(),
                    ModelDecl {
                        name,
                        source,
                        dtype,
                        memory,
                    },
                );
            }
        }
        if r.diags.is_empty() {
            Ok(cfg)
        } else {
            r.diags.sort_by_key(|d| (d.line, d.col));
            Err(SpecErrors(r.diags))
        }
    }
}

/// The `sd-run.toml` next to a spec, if there is one.
pub fn find_config(spec_path: &Path) -> Option<PathBuf> {
    let dir = match spec_path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let p = dir.join("sd-run.toml");
    p.is_file().then_some(p)
}

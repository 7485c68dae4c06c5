//! YAML + TOML parsing, validation with FILE:LINE:COL errors, expansion to images.
//!
//! [`load`] / [`load_str`] turn a spec into a validated [`Spec`] or every problem at once
//! ([`SpecErrors`]); [`expand()`] turns a [`Spec`] into one [`ImageRequest`] per image;
//! [`MachineConfig`] reads `sd-run.toml`. The full field reference is `docs/spec-reference.md`.

pub mod config;
pub mod diag;
pub mod expand;
pub mod types;
pub mod validate;
pub mod values;
pub mod yaml;

use std::collections::BTreeMap;
use std::path::Path;

pub use config::{find_config, MachineConfig, ServerConfig, StoreConfig};
pub use diag::{Diagnostic, SpecErrors};
pub use expand::{expand, grid_points, image_count, job_image_count};
pub use types::*;
pub use values::apply_grid_value;

/// Most diagnostics reported for one spec (the rest are counted).
pub const MAX_DIAGNOSTICS: usize = 200;

/// Largest spec file [`load`] reads.
pub const MAX_SPEC_BYTES: u64 = 16 << 20;

/// How a spec is loaded: the CLI allows everything; serve mode restricts client specs.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Whether the spec may name files on this machine: model `source`s, `init_image`, a
    /// safety checker path. Serve mode sets this to `allow_client_models`.
    pub allow_sources: bool,
    /// Models the spec may name without declaring them (the server's `[models.*]`). A `models:`
    /// entry without `source` that names one of these takes its source (and may override
    /// `dtype` / `memory`). When set, `models:` may be omitted.
    pub known_models: Option<BTreeMap<String, ModelDecl>>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            allow_sources: true,
            known_models: None,
        }
    }
}

/// Reads, parses and validates the spec at `path` (relative paths resolve against its folder).
pub fn load(path: &Path) -> Result<Spec, SpecErrors> {
    let label = path.display().to_string();
    let read_err = |m: String| SpecErrors::one(&label, 1, 1, m);
    let meta = std::fs::metadata(path).map_err(|e| read_err(format!("cannot read spec: {e}")))?;
    if meta.len() > MAX_SPEC_BYTES {
        return Err(read_err(format!(
            "spec is too large ({} bytes; at most {MAX_SPEC_BYTES})",
            meta.len()
        )));
    }
    let bytes = std::fs::read(path).map_err(|e| read_err(format!("cannot read spec: {e}")))?;
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let valid = e.utf8_error().valid_up_to();
            let prefix = String::from_utf8_lossy(&e.as_bytes()[..valid]).into_owned();
            let (line, col) = diag::line_col(&prefix, valid);
            return Err(SpecErrors::one(
                &label,
                line,
                col,
                "the spec is not valid UTF-8",
            ));
        }
    };
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    load_str(&text, &label, base)
}

/// Parses and validates spec text. `file_label` names it in messages and gives the default
/// output folder's name; `base_dir` anchors its relative paths.
pub fn load_str(text: &str, file_label: &str, base_dir: &Path) -> Result<Spec, SpecErrors> {
    load_str_with(text, file_label, base_dir, &LoadOptions::default())
}

/// [`load_str`] with [`LoadOptions`] (serve mode).
pub fn load_str_with(
    text: &str,
    file_label: &str,
    base_dir: &Path,
    opts: &LoadOptions,
) -> Result<Spec, SpecErrors> {
    let root = match yaml::parse(text) {
        Ok(Some(root)) => root,
        Ok(None) => return Err(SpecErrors::one(file_label, 1, 1, "the spec is empty")),
        Err(e) => return Err(SpecErrors::one(file_label, e.line, e.col, e.message)),
    };
    let mut cx = validate::Ctx::new(file_label, base_dir, opts);
    let spec = validate::validate(&mut cx, &root, Path::new(file_label));
    let mut diags = std::mem::take(&mut cx.diags);
    match spec {
        Some(spec) if diags.is_empty() => Ok(spec),
        _ => {
            diags.sort_by_key(|d| (d.line, d.col));
            if diags.len() > MAX_DIAGNOSTICS {
                let more = diags.len() - MAX_DIAGNOSTICS;
                diags.truncate(MAX_DIAGNOSTICS);
                let last = &diags[MAX_DIAGNOSTICS - 1];
                let (line, col) = (last.line, last.col);
                diags.push(Diagnostic {
                    file: file_label.to_string(),
                    line,
                    col,
                    message: format!("... and {more} more problems"),
                });
            }
            if diags.is_empty() {
                diags.push(Diagnostic {
                    file: file_label.to_string(),
                    line: 1,
                    col: 1,
                    message: "the spec is invalid".into(),
                });
            }
            Err(SpecErrors(diags))
        }
    }
}

//! Turns a YAML node tree into a validated [`Spec`], collecting every problem with its position.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use super::diag::Diagnostic;
use super::types::*;
use super::values::{self, did_you_mean};
use super::yaml::{Node, NodeKind};
use super::LoadOptions;

/// Most images one spec may ask for (expansion holds them all in memory).
pub const MAX_IMAGES: u64 = 10_000_000;

const TOP_KEYS: &[&str] = &[
    "version",
    "output",
    "defaults",
    "models",
    "memory_budget",
    "safety",
    "jobs",
];
const MODEL_KEYS: &[&str] = &["source", "dtype", "memory"];
const MEMORY_KEYS: &[&str] = &[
    "attention_slicing",
    "flash_attention",
    "vae_tiling",
    "offload",
];
const SAFETY_KEYS: &[&str] = &["checker", "action", "threshold_adjust"];
const REFINER_KEYS: &[&str] = &["model", "switch_at"];
const PROMPT_KEYS: &[&str] = &["prompt", "negative_prompt"];
const SEED_RANGE_KEYS: &[&str] = &["from", "count"];
/// Fields of a job that shape its images (also allowed under `defaults:`).
pub const PARAM_KEYS: &[&str] = &[
    "steps",
    "guidance",
    "scheduler",
    "size",
    "negative_prompt",
    "batch_size",
    "noise",
    "refiner",
    "original_size",
    "crop",
    "aesthetic_score",
    "negative_aesthetic_score",
    "init_image",
    "strength",
];
const JOB_ONLY_KEYS: &[&str] = &["name", "prompts", "grid"];
const SHARED_JOB_KEYS: &[&str] = &["model", "seeds"];

/// Common names from other tools, and the spec key they mean.
const ALIASES: &[(&str, &str)] = &[
    ("guidance_scale", "guidance"),
    ("cfg", "guidance"),
    ("cfg_scale", "guidance"),
    ("num_inference_steps", "steps"),
    ("sampler", "scheduler"),
    ("seed", "seeds"),
    ("prompt", "prompts"),
    ("negative", "negative_prompt"),
    ("width", "size"),
    ("height", "size"),
    ("precision", "dtype"),
    ("path", "source"),
];

/// One field-level setting of `defaults:` or a job, applied in order over the built-ins.
#[derive(Debug, Clone)]
enum Param {
    Model(String),
    Seeds(Vec<u64>),
    Steps(u32),
    Guidance(f64),
    Scheduler(SchedulerName),
    Size(u32, u32),
    NegativePrompt(String),
    BatchSize(u32),
    Noise(NoiseSource),
    Refiner(Option<RefinerStage>),
    OriginalSize(Option<(u32, u32)>),
    Crop(u32, u32),
    Aesthetic(f64),
    NegativeAesthetic(f64),
    InitImage(Option<PathBuf>),
    Strength(f64),
}

impl Param {
    fn apply(&self, p: &mut GenParams, model: &mut Option<String>, seeds: &mut Option<Vec<u64>>) {
        match self {
            Param::Model(m) => *model = Some(m.clone()),
            Param::Seeds(s) => *seeds = Some(s.clone()),
            Param::Steps(v) => p.steps = *v,
            Param::Guidance(v) => p.guidance = *v,
            Param::Scheduler(v) => p.scheduler = *v,
            Param::Size(w, h) => (p.width, p.height) = (*w, *h),
            Param::NegativePrompt(v) => p.negative_prompt = v.clone(),
            Param::BatchSize(v) => p.batch_size = *v,
            Param::Noise(v) => p.noise = *v,
            Param::Refiner(v) => p.refiner = v.clone(),
            Param::OriginalSize(v) => p.sdxl.original_size = *v,
            Param::Crop(t, l) => p.sdxl.crop = (*t, *l),
            Param::Aesthetic(v) => p.sdxl.aesthetic_score = *v,
            Param::NegativeAesthetic(v) => p.sdxl.negative_aesthetic_score = *v,
            Param::InitImage(v) => p.init_image = v.clone(),
            Param::Strength(v) => p.strength = *v,
        }
    }
}

/// The checked keys of one mapping.
struct Fields<'a> {
    pairs: Vec<(&'a str, &'a Node, &'a Node)>,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Node> {
        self.pairs
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, _, v)| *v)
    }
    fn key(&self, key: &str) -> Option<&'a Node> {
        self.pairs
            .iter()
            .find(|(k, _, _)| *k == key)
            .map(|(_, k, _)| *k)
    }
}

fn suggest(word: &str, known: &[&str]) -> String {
    if let Some((_, to)) = ALIASES
        .iter()
        .find(|(from, to)| *from == word && known.contains(to))
    {
        return format!(" (did you mean `{to}`?)");
    }
    did_you_mean(word, known.iter().copied())
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Validation state: the diagnostics so far and what the rest of the spec needs to know.
pub(crate) struct Ctx<'o> {
    file: String,
    base_dir: PathBuf,
    opts: &'o LoadOptions,
    pub(crate) diags: Vec<Diagnostic>,
    model_names: BTreeSet<String>,
}

impl<'o> Ctx<'o> {
    pub(crate) fn new(file: &str, base_dir: &Path, opts: &'o LoadOptions) -> Self {
        Ctx {
            file: file.to_string(),
            base_dir: base_dir.to_path_buf(),
            opts,
            diags: Vec::new(),
            model_names: BTreeSet::new(),
        }
    }

    fn err(&mut self, n: &Node, message: impl Into<String>) {
        self.diags.push(Diagnostic {
            file: self.file.clone(),
            line: n.line,
            col: n.col,
            message: message.into(),
        });
    }

    fn check<T>(&mut self, n: &Node, r: Result<T, String>) -> Option<T> {
        match r {
            Ok(v) => Some(v),
            Err(e) => {
                self.err(n, e);
                None
            }
        }
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let joined = self.base_dir.join(p);
        std::fs::canonicalize(&joined)
            .or_else(|_| std::path::absolute(&joined))
            .unwrap_or(joined)
    }

    /// Checks a mapping's keys: type, duplicates, unknown keys (with suggestions).
    fn map<'a>(&mut self, n: &'a Node, what: &str, known: Option<&[&str]>) -> Option<Fields<'a>> {
        let NodeKind::Map(pairs) = &n.kind else {
            self.err(n, format!("{what} must be a mapping"));
            return None;
        };
        let mut out: Vec<(&'a str, &'a Node, &'a Node)> = Vec::with_capacity(pairs.len());
        let mut seen: HashSet<&'a str> = HashSet::with_capacity(pairs.len());
        for (k, v) in pairs {
            let Some(name) = k.scalar() else {
                self.err(
                    k,
                    format!("keys of {what} must be names, got {}", k.kind_name()),
                );
                continue;
            };
            if !seen.insert(name) {
                self.err(k, format!("duplicate key `{name}`"));
                continue;
            }
            if let Some(known) = known {
                if !known.contains(&name) {
                    let hint = suggest(name, known);
                    if hint.is_empty() {
                        self.err(
                            k,
                            format!(
                                "unknown key `{name}`; known keys here: {}",
                                known.join(", ")
                            ),
                        );
                    } else {
                        self.err(k, format!("unknown key `{name}`{hint}"));
                    }
                    continue;
                }
            }
            out.push((name, k, v));
        }
        Some(Fields { pairs: out })
    }

    /// A non-null scalar, as a string.
    fn string<'a>(&mut self, n: &'a Node, field: &str) -> Option<&'a str> {
        match &n.kind {
            NodeKind::Scalar { text, .. } if !n.is_null() => Some(text),
            _ => {
                self.err(n, format!("`{field}` must be a string"));
                None
            }
        }
    }

    /// A non-null scalar (quoted or not), or the type error `msg`.
    fn scalar_or<'a>(&mut self, n: &'a Node, msg: &str) -> Option<&'a str> {
        match &n.kind {
            NodeKind::Scalar { text, .. } if !n.is_null() => Some(text),
            _ => {
                self.err(n, msg.to_string());
                None
            }
        }
    }

    /// A plain (unquoted) scalar, or the type error `msg`.
    fn plain<'a>(&mut self, n: &'a Node, msg: &str) -> Option<&'a str> {
        match &n.kind {
            NodeKind::Scalar { text, plain: true } if !n.is_null() => Some(text),
            _ => {
                self.err(n, msg.to_string());
                None
            }
        }
    }

    fn integer<'a>(&mut self, n: &'a Node, field: &str) -> Option<&'a str> {
        self.plain(n, &format!("`{field}` must be an integer"))
    }

    fn number(&mut self, n: &Node, field: &str) -> Option<f64> {
        let t = self.plain(n, &format!("`{field}` must be a number"))?;
        self.check(n, values::parse_number(field, t))
    }

    fn boolean(&mut self, n: &Node, field: &str) -> Option<bool> {
        let msg = format!("`{field}` must be true or false");
        let t = self.plain(n, &msg)?;
        match values::bool_text(t) {
            Some(b) => Some(b),
            None => {
                self.err(n, msg);
                None
            }
        }
    }

    fn list<'a>(&mut self, n: &'a Node, field: &str) -> Option<&'a [Node]> {
        match &n.kind {
            NodeKind::Seq(items) => Some(items),
            _ => {
                self.err(n, format!("`{field}` must be a list"));
                None
            }
        }
    }

    fn model_ref(&mut self, n: &Node, field: &str) -> Option<String> {
        let name = self.string(n, field)?;
        if self.model_names.contains(name) {
            return Some(name.to_string());
        }
        let names: Vec<&str> = self.model_names.iter().map(String::as_str).collect();
        let msg = if names.is_empty() {
            format!("unknown model `{name}`: no models are declared under `models:`")
        } else {
            format!(
                "unknown model `{name}`{}; declared models: {}",
                did_you_mean(name, names.iter().copied()),
                names.join(", ")
            )
        };
        self.err(n, msg);
        None
    }

    fn file_path(&mut self, n: &Node, field: &str) -> Option<PathBuf> {
        let t = self.string(n, field)?;
        if !self.opts.allow_sources {
            self.err(
                n,
                format!("`{field}` is not allowed here: this server reads no client-chosen files"),
            );
            return None;
        }
        let p = self.resolve(t);
        if !p.is_file() {
            self.err(n, format!("`{field}` file `{t}` does not exist"));
            return None;
        }
        Some(p)
    }

    fn seeds(&mut self, n: &Node) -> Option<Vec<u64>> {
        match &n.kind {
            NodeKind::Seq(items) => {
                if items.is_empty() {
                    self.err(n, "`seeds` is empty");
                    return None;
                }
                let mut out = Vec::with_capacity(items.len());
                let mut ok = true;
                for it in items {
                    match self.seed(it) {
                        Some(s) => out.push(s),
                        None => ok = false,
                    }
                }
                ok.then_some(out)
            }
            NodeKind::Map(_) => {
                let f = self.map(n, "`seeds`", Some(SEED_RANGE_KEYS))?;
                let from = match f.get("from") {
                    Some(v) => self.seed(v),
                    None => {
                        self.err(n, "`seeds` range is missing `from`");
                        None
                    }
                };
                let count = match f.get("count") {
                    Some(v) => {
                        let t = self.integer(v, "count");
                        match t.map(values::int_text) {
                            Some(Some(c)) if c >= 1 && c <= MAX_IMAGES as i128 => {
                                Some((c as u64, v))
                            }
                            Some(Some(c)) if c < 1 => {
                                self.err(v, format!("`count` must be at least 1, got {c}"));
                                None
                            }
                            Some(_) => {
                                self.err(v, format!("`count` must be at most {MAX_IMAGES}"));
                                None
                            }
                            None => None,
                        }
                    }
                    None => {
                        self.err(n, "`seeds` range is missing `count`");
                        None
                    }
                };
                let (from, (count, count_node)) = (from?, count?);
                if from.checked_add(count - 1).is_none() {
                    self.err(count_node, "`from + count - 1` must be below 2^64");
                    return None;
                }
                Some((from..=from + (count - 1)).collect())
            }
            _ => {
                self.err(n, "`seeds` must be a list of integers or {from, count}");
                None
            }
        }
    }

    fn seed(&mut self, n: &Node) -> Option<u64> {
        let bad = |t: &str| format!("seed must be an integer in 0..2^64, got `{t}`");
        let NodeKind::Scalar { text, plain } = &n.kind else {
            self.err(
                n,
                format!("seed must be an integer in 0..2^64, got {}", n.kind_name()),
            );
            return None;
        };
        if !plain {
            self.err(n, bad(text));
            return None;
        }
        match values::int_text(text) {
            Some(v) if (0..=u64::MAX as i128).contains(&v) => Some(v as u64),
            _ => {
                self.err(n, bad(text));
                None
            }
        }
    }

    /// Validates one image-shaping field (of a job, `defaults:` or a grid value).
    fn param(&mut self, field: &str, n: &Node) -> Option<Param> {
        Some(match field {
            "model" => Param::Model(self.model_ref(n, "model")?),
            "seeds" => Param::Seeds(self.seeds(n)?),
            "steps" => {
                let t = self.integer(n, field)?;
                Param::Steps(self.check(n, values::parse_steps(t))?)
            }
            "guidance" => {
                let t = self.plain(n, "`guidance` must be a number")?;
                Param::Guidance(self.check(n, values::parse_guidance(t))?)
            }
            "scheduler" => {
                let t = self.string(n, field)?;
                Param::Scheduler(self.check(n, values::parse_scheduler(t))?)
            }
            "size" => {
                let t = self.scalar_or(n, "`size` must be WIDTHxHEIGHT (e.g. 512x768)")?;
                let (w, h) = self.check(n, values::parse_size("size", t))?;
                Param::Size(w, h)
            }
            "negative_prompt" => Param::NegativePrompt(self.string(n, field)?.to_string()),
            "batch_size" => {
                let t = self.integer(n, field)?;
                Param::BatchSize(self.check(n, values::parse_batch_size(t))?)
            }
            "noise" => {
                let t = self.string(n, field)?;
                Param::Noise(self.check(n, values::parse_noise(t))?)
            }
            "refiner" => {
                if n.is_null() {
                    return Some(Param::Refiner(None));
                }
                let f = self.map(n, "`refiner`", Some(REFINER_KEYS))?;
                let model = match f.get("model") {
                    Some(m) => self.model_ref(m, "refiner.model"),
                    None => {
                        self.err(n, "`refiner` is missing `model`");
                        None
                    }
                };
                let switch_at = match f.get("switch_at") {
                    Some(v) => {
                        let t = self.plain(v, "`switch_at` must be a number")?;
                        self.check(v, values::parse_switch_at(t))
                    }
                    None => Some(0.8),
                };
                Param::Refiner(Some(RefinerStage {
                    model: model?,
                    switch_at: switch_at?,
                }))
            }
            "original_size" => {
                if n.is_null() {
                    return Some(Param::OriginalSize(None));
                }
                let t =
                    self.scalar_or(n, "`original_size` must be WIDTHxHEIGHT (e.g. 1024x1024)")?;
                Param::OriginalSize(Some(self.check(n, values::parse_original_size(t))?))
            }
            "crop" => {
                let items = match &n.kind {
                    NodeKind::Seq(items) if items.len() == 2 => items,
                    _ => {
                        self.err(n, "`crop` must be a list [top, left]");
                        return None;
                    }
                };
                let mut c = [0u32; 2];
                for (i, it) in items.iter().enumerate() {
                    let t = self.plain(it, "`crop` values must be integers >= 0")?;
                    c[i] = self.check(it, values::parse_crop_coord(t))?;
                }
                Param::Crop(c[0], c[1])
            }
            "aesthetic_score" => Param::Aesthetic(self.number(n, field)?),
            "negative_aesthetic_score" => Param::NegativeAesthetic(self.number(n, field)?),
            "init_image" => {
                if n.is_null() {
                    return Some(Param::InitImage(None));
                }
                Param::InitImage(Some(self.file_path(n, field)?))
            }
            "strength" => {
                let t = self.plain(n, "`strength` must be a number")?;
                Param::Strength(self.check(n, values::parse_strength(t))?)
            }
            _ => return None,
        })
    }

    /// The value of a grid point as written (what [`values::apply_grid_value`] reads back).
    fn grid_value(&mut self, field: &str, n: &Node) -> Option<String> {
        self.param(field, n)?;
        Some(match (&n.kind, field) {
            (NodeKind::Seq(items), "crop") => {
                let t: Vec<&str> = items.iter().filter_map(Node::scalar).collect();
                let top = values::parse_crop_coord(t.first()?).ok()?;
                let left = values::parse_crop_coord(t.get(1)?).ok()?;
                values::render_crop(top, left)
            }
            (NodeKind::Scalar { text, .. }, _) => text.clone(),
            _ => return None,
        })
    }

    fn model_decl(&mut self, name: &str, key: &Node, n: &Node) -> Option<ModelDecl> {
        if !valid_name(name) {
            self.err(
                key,
                format!("model name `{name}` must match [A-Za-z0-9_-]+"),
            );
        }
        let f = self.map(n, &format!("model `{name}`"), Some(MODEL_KEYS))?;
        let known = self
            .opts
            .known_models
            .as_ref()
            .and_then(|m| m.get(name))
            .cloned();
        let mut source = None;
        match (f.get("source"), known.as_ref()) {
            (Some(s), _) if !self.opts.allow_sources => {
                let names: Vec<&str> = self
                    .opts
                    .known_models
                    .iter()
                    .flat_map(|m| m.keys().map(String::as_str))
                    .collect();
                let key = f.key("source").unwrap_or(s);
                self.err(
                    key,
                    format!(
                        "`source` is not allowed here: name one of the server's models ({})",
                        names.join(", ")
                    ),
                );
            }
            (Some(s), _) => source = self.source(s),
            (None, Some(k)) => source = Some(k.source.clone()),
            (None, None) => self.err(key, format!("model `{name}` is missing `source`")),
        }
        let mut dtype = known.as_ref().map(|k| k.dtype).unwrap_or_default();
        if let Some(d) = f.get("dtype") {
            if let Some(t) = self.string(d, "dtype") {
                if let Some(v) = self.check(d, values::parse_dtype(t)) {
                    dtype = v;
                }
            }
        }
        let mut memory = known.map(|k| k.memory).unwrap_or_default();
        if let Some(m) = f.get("memory") {
            self.memory(m, &mut memory);
        }
        Some(ModelDecl {
            name: name.to_string(),
            source: source?,
            dtype,
            memory,
        })
    }

    fn memory(&mut self, n: &Node, memory: &mut MemoryPolicy) {
        let Some(f) = self.map(n, "`memory`", Some(MEMORY_KEYS)) else {
            return;
        };
        if let Some(v) = f.get("attention_slicing") {
            let r = match v.scalar().filter(|_| !v.is_null()) {
                Some(t) => values::parse_slicing(t),
                None => {
                    Err("`attention_slicing` must be off, auto or a positive slice size".into())
                }
            };
            if let Some(s) = self.check(v, r) {
                memory.attention_slicing = s;
            }
        }
        if let Some(v) = f
            .get("flash_attention")
            .and_then(|v| self.boolean(v, "flash_attention"))
        {
            memory.flash_attention = v;
        }
        if let Some(v) = f
            .get("vae_tiling")
            .and_then(|v| self.boolean(v, "vae_tiling"))
        {
            memory.vae_tiling = v;
        }
        if let Some(v) = f.get("offload") {
            if let Some(t) = self.string(v, "offload") {
                if let Some(o) = self.check(v, values::parse_offload(t)) {
                    memory.offload = o;
                }
            }
        }
    }

    fn source(&mut self, n: &Node) -> Option<ModelSource> {
        let t = self.string(n, "source")?;
        match values::parse_hf_source(t) {
            Err(e) => {
                self.err(n, e);
                None
            }
            Ok(Some(s)) => Some(s),
            Ok(None) => {
                let r = check_model_dir(&self.resolve(t), t);
                self.check(n, r).map(|path| ModelSource::Path { path })
            }
        }
    }

    fn safety(&mut self, n: &Node) -> SafetyPolicy {
        let mut policy = SafetyPolicy::default();
        let Some(f) = self.map(n, "`safety`", Some(SAFETY_KEYS)) else {
            return policy;
        };
        if let Some(c) = f.get("checker") {
            match c.scalar().filter(|_| !c.is_null()) {
                Some("model") => policy.checker = CheckerChoice::Model,
                Some("off") => policy.checker = CheckerChoice::Off,
                Some("false") if matches!(c.kind, NodeKind::Scalar { plain: true, .. }) => {
                    policy.checker = CheckerChoice::Off
                }
                Some(p) if !self.opts.allow_sources => self.err(
                    c,
                    format!("safety checker path `{p}` is not allowed here: use `model` or `off`"),
                ),
                Some(p) => {
                    let r = check_checker_dir(&self.resolve(p), p);
                    if let Some(path) = self.check(c, r) {
                        policy.checker = CheckerChoice::Path(path);
                    }
                }
                None => self.err(c, "`checker` must be model, off or a path"),
            }
        }
        if let Some(a) = f.get("action") {
            if let Some(t) = self.string(a, "action") {
                let all = [
                    SafetyAction::Tag,
                    SafetyAction::Blur,
                    SafetyAction::Black,
                    SafetyAction::Quarantine,
                    SafetyAction::Drop,
                ];
                match all.into_iter().find(|x| x.as_str() == t) {
                    Some(x) => policy.action = x,
                    None => self.err(
                        a,
                        format!(
                            "unknown safety action `{t}`{}; valid: tag, blur, black, quarantine, drop",
                            did_you_mean(t, all.iter().map(|x| x.as_str()))
                        ),
                    ),
                }
            }
        }
        if let Some(t) = f
            .get("threshold_adjust")
            .and_then(|t| self.number(t, "threshold_adjust"))
        {
            policy.threshold_adjust = t;
        }
        policy
    }
}

/// Checks that `dir` is a diffusers-layout model folder; returns it resolved.
pub fn check_model_dir(dir: &Path, as_written: &str) -> Result<PathBuf, String> {
    if !dir.exists() {
        return Err(format!("model folder `{as_written}` does not exist"));
    }
    if !dir.is_dir() {
        return Err(format!("model source `{as_written}` is not a folder"));
    }
    let mut missing: Vec<&str> = Vec::new();
    let index = dir.join("model_index.json");
    let mut needs_text_encoder = true;
    if index.is_file() {
        match std::fs::read(&index).map(|b| serde_json::from_slice::<serde_json::Value>(&b)) {
            Ok(Ok(v)) => {
                let te = v.get("text_encoder");
                let null = |v: &serde_json::Value| {
                    v.is_null() || v.as_array().is_some_and(|a| a.iter().all(|x| x.is_null()))
                };
                if te.is_some_and(null) {
                    needs_text_encoder = false;
                }
            }
            Ok(Err(e)) => {
                return Err(format!(
                    "`{as_written}/model_index.json` is not valid JSON: {e}"
                ))
            }
            Err(e) => return Err(format!("cannot read `{as_written}/model_index.json`: {e}")),
        }
    } else {
        missing.push("model_index.json");
    }
    for f in [
        "unet/config.json",
        "vae/config.json",
        "scheduler/scheduler_config.json",
    ] {
        if !dir.join(f).is_file() {
            missing.push(f);
        }
    }
    if needs_text_encoder && !dir.join("text_encoder/config.json").is_file() {
        missing.push("text_encoder/config.json");
    }
    if !missing.is_empty() {
        return Err(format!(
            "model folder `{as_written}` is not a diffusers layout: missing {}",
            missing.join(", ")
        ));
    }
    Ok(dir.to_path_buf())
}

/// Checks a safety checker path: a `safety_checker` folder or a model folder that has one.
pub fn check_checker_dir(dir: &Path, as_written: &str) -> Result<PathBuf, String> {
    if !dir.is_dir() {
        return Err(format!(
            "safety checker folder `{as_written}` does not exist"
        ));
    }
    if dir.join("config.json").is_file() || dir.join("safety_checker/config.json").is_file() {
        return Ok(dir.to_path_buf());
    }
    Err(format!(
        "`{as_written}` is neither a safety_checker folder (config.json) nor a model folder with safety_checker/"
    ))
}

/// Validates the whole tree. Diagnostics are left in `cx.diags`; the spec is returned when the
/// tree was complete enough to build one (the caller discards it if any diagnostic exists).
pub(crate) fn validate(cx: &mut Ctx<'_>, root: &Node, file: &Path) -> Option<Spec> {
    let top = cx.map(root, "the spec", Some(TOP_KEYS))?;

    match top.get("version") {
        None => cx.err(root, "missing `version: 1`"),
        Some(v) => {
            let ok = matches!(&v.kind, NodeKind::Scalar { text, plain: true } if values::int_text(text) == Some(1));
            if !ok {
                let shown = v.scalar().unwrap_or("?").to_string();
                cx.err(v, format!("`version` must be 1, got `{shown}`"));
            }
        }
    }

    let stem = Path::new(file)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("spec")
        .to_string();
    let output = match top.get("output") {
        Some(o) => cx.string(o, "output").map(str::to_string),
        None => None,
    };
    let output = {
        let rel = output
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new("out").join(&stem));
        let joined = cx.base_dir.join(rel);
        std::path::absolute(&joined).unwrap_or(joined)
    };

    let memory_budget = top.get("memory_budget").and_then(|m| {
        let t = m.scalar().filter(|_| !m.is_null());
        match t {
            Some(t) => cx.check(m, values::parse_bytes("memory_budget", t)),
            None => {
                cx.err(
                    m,
                    "`memory_budget` must be a size like 12GiB, 512MiB, 2GB or a byte count",
                );
                None
            }
        }
    });

    let safety = top.get("safety").map(|s| cx.safety(s)).unwrap_or_default();

    // Models first: jobs refer to them wherever they are written.
    let mut models: BTreeMap<String, ModelDecl> = BTreeMap::new();
    let mut declared: BTreeSet<String> = BTreeSet::new();
    match top.get("models") {
        Some(m) => {
            if let Some(f) = cx.map(m, "`models`", None) {
                for (name, key, decl) in &f.pairs {
                    declared.insert(name.to_string());
                    if let Some(d) = cx.model_decl(name, key, decl) {
                        models.insert(name.to_string(), d);
                    }
                }
            }
        }
        None if cx.opts.known_models.is_none() => cx.err(root, "missing `models`"),
        None => {}
    }
    let mut names = declared;
    if let Some(known) = &cx.opts.known_models {
        names.extend(known.keys().cloned());
    }
    cx.model_names = names;

    // defaults:
    let mut base = GenParams::default();
    let mut base_model: Option<String> = None;
    let mut base_seeds: Option<Vec<u64>> = None;
    let mut defaults_name_model = false;
    if let Some(d) = top.get("defaults") {
        let known: Vec<&str> = PARAM_KEYS
            .iter()
            .chain(SHARED_JOB_KEYS)
            .chain(JOB_ONLY_KEYS)
            .copied()
            .collect();
        if let Some(f) = cx.map(d, "`defaults`", Some(&known)) {
            for (name, key, v) in &f.pairs {
                if JOB_ONLY_KEYS.contains(name) {
                    cx.err(
                        key,
                        format!("`{name}` cannot be set in `defaults` (set it on each job)"),
                    );
                    continue;
                }
                defaults_name_model |= *name == "model";
                if let Some(p) = cx.param(name, v) {
                    p.apply(&mut base, &mut base_model, &mut base_seeds);
                }
            }
        }
    }
    if base_model.is_none() && cx.model_names.len() == 1 {
        base_model = cx.model_names.iter().next().cloned();
    }

    // jobs:
    let mut jobs = Vec::new();
    let mut total: u64 = 0;
    let jobs_node = match top.get("jobs") {
        None => {
            cx.err(root, "missing `jobs`");
            None
        }
        Some(j) => cx.list(j, "jobs").map(|items| (j, items)),
    };
    if let Some((jnode, items)) = jobs_node {
        if items.is_empty() {
            cx.err(jnode, "`jobs` is empty");
        }
        let mut seen: HashMap<String, usize> = HashMap::new();
        for item in items {
            let b = Base {
                params: &base,
                model: &base_model,
                seeds: &base_seeds,
                model_given: defaults_name_model,
            };
            if let Some(job) = job(cx, item, &b, &mut seen) {
                let points: u64 = job
                    .grid
                    .iter()
                    .fold(1u64, |acc, a| acc.saturating_mul(a.values.len() as u64));
                let n = (job.prompts.len() as u64)
                    .saturating_mul(points)
                    .saturating_mul(job.seeds.len() as u64);
                total = total.saturating_add(n);
                jobs.push(job);
            }
            if total > MAX_IMAGES {
                // Stop here: later jobs would only hold more seeds in memory.
                break;
            }
        }
        if total > MAX_IMAGES {
            cx.err(
                jnode,
                format!("this spec asks for {total} images; at most {MAX_IMAGES} are allowed"),
            );
        }
    }

    // Server models the jobs use become part of the spec, so later stages find them.
    if let Some(known) = &cx.opts.known_models {
        for j in &jobs {
            let refiner = j.params.refiner.as_ref().map(|r| r.model.as_str());
            for m in std::iter::once(j.model.as_str()).chain(refiner) {
                if !models.contains_key(m) {
                    if let Some(d) = known.get(m) {
                        models.insert(m.to_string(), d.clone());
                    }
                }
            }
        }
    }

    Some(Spec {
        file: file.to_path_buf(),
        output,
        models,
        memory_budget,
        safety,
        jobs,
    })
}

/// What `defaults:` contributes to every job.
struct Base<'a> {
    params: &'a GenParams,
    model: &'a Option<String>,
    seeds: &'a Option<Vec<u64>>,
    /// `defaults:` names a model (even an invalid one, already reported there).
    model_given: bool,
}

fn job(
    cx: &mut Ctx<'_>,
    n: &Node,
    base: &Base<'_>,
    seen: &mut HashMap<String, usize>,
) -> Option<Job> {
    let known: Vec<&str> = JOB_ONLY_KEYS
        .iter()
        .chain(SHARED_JOB_KEYS)
        .chain(PARAM_KEYS)
        .copied()
        .collect();
    let f = cx.map(n, "a job", Some(&known))?;
    let mut ok = true;

    let name = match f.get("name") {
        None => {
            cx.err(n, "job is missing `name`");
            None
        }
        Some(v) => match cx.string(v, "name") {
            None => None,
            Some(s) if !valid_name(s) => {
                cx.err(v, format!("job name `{s}` must match [A-Za-z0-9_-]+"));
                None
            }
            Some(s) => {
                if let Some(line) = seen.get(s) {
                    cx.err(
                        v,
                        format!("duplicate job name `{s}` (first used on line {line})"),
                    );
                    ok = false;
                } else {
                    seen.insert(s.to_string(), v.line);
                }
                Some(s.to_string())
            }
        },
    };
    let label = name
        .clone()
        .map(|n| format!("job `{n}`"))
        .unwrap_or_else(|| "job".into());

    let mut params = base.params.clone();
    let mut model = base.model.clone();
    let mut seeds = base.seeds.clone();
    for (field, _, v) in &f.pairs {
        if JOB_ONLY_KEYS.contains(field) {
            continue;
        }
        match cx.param(field, v) {
            Some(p) => p.apply(&mut params, &mut model, &mut seeds),
            None => ok = false,
        }
    }
    if f.get("model").is_none() && model.is_none() {
        if !base.model_given {
            cx.err(n, format!("{label} is missing `model`"));
        }
        ok = false;
    }

    let mut prompts = Vec::new();
    match f.get("prompts") {
        None => {
            cx.err(n, format!("{label} is missing `prompts`"));
            ok = false;
        }
        Some(p) => match cx.list(p, "prompts") {
            None => ok = false,
            Some([]) => {
                cx.err(p, "`prompts` is empty: a job needs at least one prompt");
                ok = false;
            }
            Some(items) => {
                for it in items {
                    match prompt(cx, it) {
                        Some(e) => prompts.push(e),
                        None => ok = false,
                    }
                }
            }
        },
    }

    let mut grid = Vec::new();
    if let Some(g) = f.get("grid") {
        match cx.map(g, "`grid`", None) {
            None => ok = false,
            Some(axes) => {
                if axes.pairs.is_empty() {
                    cx.err(g, "`grid` is empty");
                    ok = false;
                }
                for (field, key, vals) in &axes.pairs {
                    if *field == "batch_size" {
                        cx.err(key, values::batch_size_not_sweepable());
                        ok = false;
                        continue;
                    }
                    if !values::SWEEPABLE.contains(field) {
                        cx.err(
                            key,
                            format!(
                                "`{field}` cannot be swept{}; sweepable fields: {}",
                                did_you_mean(field, values::SWEEPABLE),
                                values::SWEEPABLE.join(", ")
                            ),
                        );
                        ok = false;
                        continue;
                    }
                    let NodeKind::Seq(items) = &vals.kind else {
                        cx.err(
                            vals,
                            format!("grid axis `{field}` must be a list of values"),
                        );
                        ok = false;
                        continue;
                    };
                    if items.is_empty() {
                        cx.err(vals, format!("grid axis `{field}` is empty"));
                        ok = false;
                        continue;
                    }
                    let mut values_out = Vec::with_capacity(items.len());
                    for it in items {
                        match cx.grid_value(field, it) {
                            Some(v) => values_out.push(v),
                            None => ok = false,
                        }
                    }
                    grid.push(GridAxis {
                        field: field.to_string(),
                        values: values_out,
                    });
                }
            }
        }
    }

    if ok && name.is_some() {
        Some(Job {
            name: name?,
            model: model?,
            prompts,
            seeds: seeds.unwrap_or_else(|| vec![0]),
            grid,
            params,
        })
    } else {
        None
    }
}

fn prompt(cx: &mut Ctx<'_>, n: &Node) -> Option<PromptEntry> {
    let (text, at, negative) = match &n.kind {
        NodeKind::Map(_) => {
            let f = cx.map(n, "a prompt", Some(PROMPT_KEYS))?;
            let negative = match f.get("negative_prompt") {
                Some(v) => Some(cx.string(v, "negative_prompt")?.to_string()),
                None => None,
            };
            let Some(p) = f.get("prompt") else {
                cx.err(n, "prompt is missing `prompt`");
                return None;
            };
            (cx.string(p, "prompt")?, p, negative)
        }
        NodeKind::Scalar { .. } if !n.is_null() => (n.scalar().unwrap_or_default(), n, None),
        _ => {
            cx.err(n, "a prompt must be a string or {prompt, negative_prompt}");
            return None;
        }
    };
    if text.trim().is_empty() {
        cx.err(at, "prompt is empty");
        return None;
    }
    Some(PromptEntry {
        prompt: text.to_string(),
        negative_prompt: negative,
    })
}

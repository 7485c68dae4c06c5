//! The image cache key: a hex sha256 over a canonical, versioned encoding of every input that
//! changes an image's pixels.
//!
//! # Encoding (format `sd-run/image-key/v1`)
//!
//! The key is `sha256(item_1 ‖ item_2 ‖ …)` where every item is its byte length as a u64
//! little-endian followed by its bytes. Item values are encoded as:
//! - strings: their UTF-8 bytes;
//! - integers: 8 bytes, u64 little-endian (u32 values widened);
//! - floats: `f64::to_bits` as 8 bytes little-endian, after mapping `-0.0` to `0.0` and every
//!   NaN to `f64::NAN`;
//! - enums: their spec spelling (`ddim`, `torch-cpu`, `f16`, `cuda`, `blur`, ...);
//! - a flag: one byte, 0 or 1; the items that depend on it follow only when it is 1.
//!
//! Items, in this order:
//! 1. the format tag `sd-run/image-key/v1`
//! 2. the model's combined weight digest
//! 3. prompt
//! 4. negative prompt
//! 5. seed
//! 6. steps
//! 7. guidance
//! 8. scheduler
//! 9. width
//! 10. height
//! 11. noise source
//! 12. refiner flag; when 1: refiner weight digest, refiner dtype, `switch_at`
//! 13. SDXL `original_size` width, height (the image size when unset); crop top, crop left,
//!     aesthetic score, negative aesthetic score
//! 14. init-image flag; when 1: the init image file's sha256, strength
//! 15. dtype computed in
//! 16. device kind
//! 17. safety checker digest, or `off`; when not `off`: action, threshold adjustment
//!
//! Not in the key: job name, job/prompt/grid order, output folder, `batch_size` (batching never
//! changes pixels), grid labels, comments, `strength` of a text-to-image request.
//!
//! A digest that the context lacks (a refiner's or an init image's) is encoded as
//! `unresolved:<name or path>` by [`image_key`]; [`try_image_key`] refuses it instead.

use super::CacheError;
use crate::spec::{CheckerChoice, ImageRequest, Precision, SafetyAction, SafetyPolicy};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::PathBuf;

/// The key format tag, hashed first: bump it when the encoding changes.
pub const KEY_FORMAT: &str = "sd-run/image-key/v1";

/// The kind of device images are computed on (pixels differ between kinds).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    #[default]
    Cpu,
    Cuda,
    Metal,
}

impl DeviceKind {
    /// `cpu`, `cuda` or `metal`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cpu => "cpu",
            Self::Cuda => "cuda",
            Self::Metal => "metal",
        }
    }
}

/// The safety settings as they enter the key (default: checker off).
#[derive(Debug, Clone, PartialEq)]
pub struct SafetyKey {
    /// The checker's weight digest, or `"off"` when no checker runs.
    pub checker: String,
    pub action: SafetyAction,
    pub threshold_adjust: f64,
}

impl Default for SafetyKey {
    fn default() -> Self {
        Self::off()
    }
}

impl SafetyKey {
    /// The key's safety settings for a policy: `checker_digest` is the digest of the checker
    /// that will actually run (`None` when none runs: `checker: off`, or a model without one).
    pub fn from_policy(policy: &SafetyPolicy, checker_digest: Option<&str>) -> Self {
        match (&policy.checker, checker_digest) {
            (CheckerChoice::Off, _) | (_, None) => Self::off(),
            (_, Some(d)) => Self {
                checker: d.to_string(),
                action: policy.action,
                threshold_adjust: policy.threshold_adjust,
            },
        }
    }

    /// No checker: action and threshold then do not enter the key.
    pub fn off() -> Self {
        Self {
            checker: "off".into(),
            action: SafetyAction::default(),
            threshold_adjust: 0.0,
        }
    }
}

/// What a key needs beyond the request: digests of the files it reads and how it is computed.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct KeyContext {
    /// Combined digest of the request's model (`ModelDigest::combined`).
    pub model_digest: String,
    /// Combined digest of the refiner's model, when the request has a refiner.
    pub refiner_digest: Option<String>,
    /// The dtype the model actually computes in (CPU: f32 whatever was asked).
    pub dtype: Precision,
    /// The refiner's dtype when it differs from `dtype` (`None` = same).
    pub refiner_dtype: Option<Precision>,
    pub device: DeviceKind,
    pub safety: SafetyKey,
    /// sha256 of init-image files, by the path the request names.
    pub init_image_digests: BTreeMap<PathBuf, String>,
}

impl KeyContext {
    /// Hashes every init image that `requests` name and the context lacks.
    pub fn add_init_images<'a>(
        &mut self,
        requests: impl IntoIterator<Item = &'a ImageRequest>,
    ) -> Result<(), CacheError> {
        for r in requests {
            if let Some(p) = &r.params.init_image {
                if !self.init_image_digests.contains_key(p) {
                    let d = super::sha256_file(p)?;
                    self.init_image_digests.insert(p.clone(), d);
                }
            }
        }
        Ok(())
    }
}

fn precision_str(p: Precision) -> &'static str {
    match p {
        Precision::F32 => "f32",
        Precision::F16 => "f16",
        Precision::Bf16 => "bf16",
    }
}

fn canonical_f64(x: f64) -> u64 {
    if x.is_nan() {
        f64::NAN.to_bits()
    } else if x == 0.0 {
        0.0f64.to_bits()
    } else {
        x.to_bits()
    }
}

/// Builds the encoding in one buffer, hashed once at the end (faster than many small updates).
struct Enc {
    buf: Vec<u8>,
}

impl Enc {
    fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(&(b.len() as u64).to_le_bytes());
        self.buf.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.bytes(&v.to_le_bytes());
    }
    fn f64(&mut self, v: f64) {
        self.bytes(&canonical_f64(v).to_le_bytes());
    }
    fn flag(&mut self, v: bool) {
        self.bytes(&[v as u8]);
    }
}

fn encode(req: &ImageRequest, ctx: &KeyContext, strict: bool) -> Result<String, CacheError> {
    let p = &req.params;
    let mut e = Enc {
        buf: Vec::with_capacity(512),
    };
    e.str(KEY_FORMAT);
    e.str(&ctx.model_digest);
    e.str(&req.prompt);
    e.str(&p.negative_prompt);
    e.u64(req.seed);
    e.u64(p.steps as u64);
    e.f64(p.guidance);
    e.str(p.scheduler.as_str());
    e.u64(p.width as u64);
    e.u64(p.height as u64);
    e.str(p.noise.as_str());
    match &p.refiner {
        Some(r) => {
            e.flag(true);
            match &ctx.refiner_digest {
                Some(d) => e.str(d),
                None if strict => {
                    return Err(CacheError::Key(format!(
                        "no weight digest for refiner model '{}'",
                        r.model
                    )))
                }
                None => e.str(&format!("unresolved:{}", r.model)),
            }
            e.str(precision_str(ctx.refiner_dtype.unwrap_or(ctx.dtype)));
            e.f64(r.switch_at);
        }
        None => e.flag(false),
    }
    let s = &p.sdxl;
    // `None` means the image size: encode what the model is actually given.
    let (ow, oh) = s.original_size.unwrap_or((p.width, p.height));
    e.u64(ow as u64);
    e.u64(oh as u64);
    e.u64(s.crop.0 as u64);
    e.u64(s.crop.1 as u64);
    e.f64(s.aesthetic_score);
    e.f64(s.negative_aesthetic_score);
    match &p.init_image {
        Some(path) => {
            e.flag(true);
            match ctx.init_image_digests.get(path) {
                Some(d) => e.str(d),
                None if strict => {
                    return Err(CacheError::Key(format!(
                        "no digest for init image {}",
                        path.display()
                    )))
                }
                None => e.str(&format!("unresolved:{}", path.display())),
            }
            e.f64(p.strength);
        }
        None => e.flag(false),
    }
    e.str(precision_str(ctx.dtype));
    e.str(ctx.device.as_str());
    if ctx.safety.checker == "off" {
        e.str("off");
    } else {
        e.str(&ctx.safety.checker);
        e.str(ctx.safety.action.as_str());
        e.f64(ctx.safety.threshold_adjust);
    }
    Ok(hex::encode(Sha256::digest(&e.buf)))
}

/// The request's cache key (hex sha256; see the module docs for the encoding).
pub fn image_key(req: &ImageRequest, ctx: &KeyContext) -> String {
    // The non-strict encoding has no failure path.
    encode(req, ctx, false).unwrap_or_default()
}

/// Like [`image_key`], but fails when the context lacks a digest the request needs (its
/// refiner's, its init image's) instead of encoding the name.
pub fn try_image_key(req: &ImageRequest, ctx: &KeyContext) -> Result<String, CacheError> {
    encode(req, ctx, true)
}

/// A model as keys see it: its weights' combined digest and the dtype it computes in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelKeyInfo {
    pub digest: String,
    pub dtype: Precision,
}

/// Keys of every request (on all cores), with contexts built from each model's digest and
/// dtype by name (base and refiner alike). Fails, naming it, when a model or init image that a
/// request uses has no digest.
pub fn request_keys(
    requests: &[ImageRequest],
    models: &BTreeMap<String, ModelKeyInfo>,
    device: DeviceKind,
    safety: &SafetyKey,
    init_image_digests: &BTreeMap<PathBuf, String>,
) -> Result<Vec<String>, CacheError> {
    let model = |name: &str| {
        models
            .get(name)
            .ok_or_else(|| CacheError::Key(format!("no weight digest for model '{name}'")))
    };
    let mut ids: BTreeMap<(&str, Option<&str>), usize> = BTreeMap::new();
    let mut contexts: Vec<KeyContext> = Vec::new();
    let mut which: Vec<usize> = Vec::with_capacity(requests.len());
    for r in requests {
        let refiner = r.params.refiner.as_ref().map(|x| x.model.as_str());
        if let Some(p) = &r.params.init_image {
            if !init_image_digests.contains_key(p) {
                return Err(CacheError::Key(format!(
                    "no digest for init image {}",
                    p.display()
                )));
            }
        }
        if let Some(&id) = ids.get(&(r.model.as_str(), refiner)) {
            which.push(id);
            continue;
        }
        let base = model(&r.model)?;
        let (refiner_digest, refiner_dtype) = match refiner {
            Some(name) => {
                let m = model(name)?;
                (Some(m.digest.clone()), Some(m.dtype))
            }
            None => (None, None),
        };
        let ctx = KeyContext {
            model_digest: base.digest.clone(),
            refiner_digest,
            dtype: base.dtype,
            refiner_dtype,
            device,
            safety: safety.clone(),
            init_image_digests: init_image_digests.clone(),
        };
        ids.insert((r.model.as_str(), refiner), contexts.len());
        which.push(contexts.len());
        contexts.push(ctx);
    }
    // Every digest is present, so the lenient encoding equals the strict one.
    Ok(par_keys(requests, |i, r| image_key(r, &contexts[which[i]])))
}

/// Keys of many requests, computed on all cores; `ctx_for` gives each request's context.
pub fn image_keys<'c, F>(requests: &[ImageRequest], ctx_for: F) -> Vec<String>
where
    F: Fn(&ImageRequest) -> &'c KeyContext + Sync,
{
    par_keys(requests, |_, r| image_key(r, ctx_for(r)))
}

/// Maps `(index, request)` to a key on all cores, keeping the order.
fn par_keys<F>(requests: &[ImageRequest], key: F) -> Vec<String>
where
    F: Fn(usize, &ImageRequest) -> String + Sync,
{
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(64);
    if threads <= 1 || requests.len() < 4096 {
        return requests
            .iter()
            .enumerate()
            .map(|(i, r)| key(i, r))
            .collect();
    }
    let chunk = requests.len().div_ceil(threads);
    let mut out: Vec<Vec<String>> = Vec::new();
    std::thread::scope(|s| {
        let handles: Vec<_> = requests
            .chunks(chunk)
            .enumerate()
            .map(|(c, part)| {
                let f = &key;
                s.spawn(move || {
                    part.iter()
                        .enumerate()
                        .map(|(j, r)| f(c * chunk + j, r))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(v) => out.push(v),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
    });
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{GenParams, NoiseSource, RefinerStage, SchedulerName};

    fn req() -> ImageRequest {
        ImageRequest {
            job: "j".into(),
            job_index: 0,
            prompt_index: 0,
            grid_index: 0,
            model: "m".into(),
            prompt: "a fox".into(),
            seed: 7,
            params: GenParams::default(),
            grid_point: vec![],
        }
    }

    fn ctx() -> KeyContext {
        KeyContext {
            model_digest: "aa".repeat(32),
            refiner_digest: Some("bb".repeat(32)),
            safety: SafetyKey {
                checker: "cc".repeat(32),
                action: SafetyAction::Blur,
                threshold_adjust: 0.0,
            },
            ..Default::default()
        }
    }

    #[test]
    fn stable_and_hex() {
        let k = image_key(&req(), &ctx());
        assert_eq!(k.len(), 64);
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(k, image_key(&req(), &ctx()));
        assert_eq!(k, try_image_key(&req(), &ctx()).unwrap());
    }

    #[test]
    fn pixel_fields_change_the_key() {
        let base = image_key(&req(), &ctx());
        let mut variants: Vec<(&str, ImageRequest, KeyContext)> = Vec::new();
        let mut add = |name: &'static str, f: &dyn Fn(&mut ImageRequest, &mut KeyContext)| {
            let (mut r, mut c) = (req(), ctx());
            f(&mut r, &mut c);
            variants.push((name, r, c));
        };
        add("model", &|_, c| c.model_digest = "ab".repeat(32));
        add("prompt", &|r, _| r.prompt = "a fox ".into());
        add("negative", &|r, _| r.params.negative_prompt = "x".into());
        add("seed", &|r, _| r.seed = 8);
        add("steps", &|r, _| r.params.steps = 26);
        add("guidance", &|r, _| r.params.guidance = 7.500000001);
        add("scheduler", &|r, _| {
            r.params.scheduler = SchedulerName::Ddim
        });
        add("width", &|r, _| r.params.width = 520);
        add("height", &|r, _| r.params.height = 520);
        add("noise", &|r, _| r.params.noise = NoiseSource::Device);
        add("refiner", &|r, _| {
            r.params.refiner = Some(RefinerStage {
                model: "r".into(),
                switch_at: 0.8,
            })
        });
        add("sdxl.original", &|r, _| {
            r.params.sdxl.original_size = Some((1024, 1024))
        });
        add("sdxl.crop", &|r, _| r.params.sdxl.crop = (0, 8));
        add("sdxl.aesthetic", &|r, _| {
            r.params.sdxl.aesthetic_score = 6.5
        });
        add("sdxl.neg_aesthetic", &|r, _| {
            r.params.sdxl.negative_aesthetic_score = 2.0
        });
        add("init", &|r, c| {
            r.params.init_image = Some("/x.png".into());
            c.init_image_digests
                .insert("/x.png".into(), "dd".repeat(32));
        });
        add("dtype", &|_, c| c.dtype = Precision::F16);
        add("device", &|_, c| c.device = DeviceKind::Cuda);
        add("checker", &|_, c| c.safety = SafetyKey::off());
        add("action", &|_, c| c.safety.action = SafetyAction::Black);
        add("threshold", &|_, c| c.safety.threshold_adjust = 0.01);
        let mut seen = std::collections::HashSet::new();
        seen.insert(base.clone());
        for (name, r, c) in &variants {
            let k = image_key(r, c);
            assert!(seen.insert(k), "changing {name} did not give a new key");
        }

        // Refiner fields, relative to a request with a refiner.
        let mut with_ref = req();
        with_ref.params.refiner = Some(RefinerStage {
            model: "r".into(),
            switch_at: 0.8,
        });
        let k0 = image_key(&with_ref, &ctx());
        let mut r2 = with_ref.clone();
        r2.params.refiner = Some(RefinerStage {
            model: "r".into(),
            switch_at: 0.7,
        });
        assert_ne!(image_key(&r2, &ctx()), k0);
        let mut c2 = ctx();
        c2.refiner_digest = Some("be".repeat(32));
        assert_ne!(image_key(&with_ref, &c2), k0);
        c2 = ctx();
        c2.refiner_dtype = Some(Precision::F16);
        assert_ne!(image_key(&with_ref, &c2), k0);

        // Init image digest and strength, relative to an img2img request.
        let mut i2i = req();
        i2i.params.init_image = Some("/x.png".into());
        let mut ci = ctx();
        ci.init_image_digests
            .insert("/x.png".into(), "dd".repeat(32));
        let k1 = image_key(&i2i, &ci);
        let mut i2 = i2i.clone();
        i2.params.strength = 0.5;
        assert_ne!(image_key(&i2, &ci), k1);
        let mut ci2 = ci.clone();
        ci2.init_image_digests
            .insert("/x.png".into(), "de".repeat(32));
        assert_ne!(image_key(&i2i, &ci2), k1);
        // The same bytes under another path give the same key.
        let mut i3 = i2i.clone();
        i3.params.init_image = Some("/elsewhere/y.png".into());
        let mut ci3 = ctx();
        ci3.init_image_digests
            .insert("/elsewhere/y.png".into(), "dd".repeat(32));
        assert_eq!(image_key(&i3, &ci3), k1);
    }

    #[test]
    fn non_pixel_fields_keep_the_key() {
        let base = image_key(&req(), &ctx());
        let mut r = req();
        r.job = "other".into();
        r.job_index = 3;
        r.prompt_index = 2;
        r.grid_index = 5;
        r.model = "renamed".into();
        r.params.batch_size = 1;
        r.params.strength = 0.3; // no init image: strength is unused
        r.grid_point = vec![("steps".into(), "25".into())];
        assert_eq!(image_key(&r, &ctx()), base);
        let mut c = ctx();
        c.refiner_digest = None; // no refiner in the request
        c.init_image_digests
            .insert("/unused.png".into(), "ee".repeat(32));
        assert_eq!(image_key(&req(), &c), base);
        // An unset SDXL original size is the image size.
        let mut orig = req();
        orig.params.sdxl.original_size = Some((orig.params.width, orig.params.height));
        assert_eq!(image_key(&orig, &ctx()), base);
        // -0.0 and 0.0 are one value.
        let mut z = req();
        z.params.guidance = 0.0;
        let mut nz = req();
        nz.params.guidance = -0.0;
        assert_eq!(image_key(&z, &ctx()), image_key(&nz, &ctx()));
        // With the checker off, action and threshold do not matter.
        let mut off1 = ctx();
        off1.safety = SafetyKey::off();
        let mut off2 = off1.clone();
        off2.safety.action = SafetyAction::Drop;
        off2.safety.threshold_adjust = 1.0;
        assert_eq!(image_key(&req(), &off1), image_key(&req(), &off2));
    }

    #[test]
    fn request_keys_by_model_name() {
        let info = |d: &str| ModelKeyInfo {
            digest: d.repeat(32),
            dtype: Precision::F32,
        };
        let models: BTreeMap<String, ModelKeyInfo> =
            [("m".to_string(), info("aa")), ("r".to_string(), info("bb"))]
                .into_iter()
                .collect();
        let mut with_ref = req();
        with_ref.params.refiner = Some(RefinerStage {
            model: "r".into(),
            switch_at: 0.8,
        });
        let reqs = vec![req(), with_ref.clone()];
        let safety = ctx().safety;
        let none = BTreeMap::new();
        let keys = request_keys(&reqs, &models, DeviceKind::Cpu, &safety, &none).unwrap();
        assert_eq!(keys[0], image_key(&req(), &ctx()));
        assert_eq!(keys[1], try_image_key(&with_ref, &ctx()).unwrap());
        // Many requests, two contexts interleaved: the parallel path keeps each one's context.
        let many: Vec<ImageRequest> = (0..6000u64)
            .map(|i| {
                let mut r = if i % 3 == 0 { with_ref.clone() } else { req() };
                r.seed = i;
                r
            })
            .collect();
        let par = request_keys(&many, &models, DeviceKind::Cpu, &safety, &none).unwrap();
        for (r, k) in many.iter().zip(&par) {
            assert_eq!(&image_key(r, &ctx()), k);
        }
        let mut unknown = req();
        unknown.model = "zz".into();
        let err = request_keys(&[unknown], &models, DeviceKind::Cpu, &safety, &none).unwrap_err();
        assert!(err.to_string().contains("'zz'"), "{err}");
        let mut i2i = req();
        i2i.params.init_image = Some("/i.png".into());
        assert!(request_keys(&[i2i], &models, DeviceKind::Cpu, &safety, &none).is_err());
    }

    #[test]
    fn safety_from_policy() {
        let mut pol = SafetyPolicy {
            threshold_adjust: 0.5,
            ..SafetyPolicy::default()
        };
        let k = SafetyKey::from_policy(&pol, Some("abc"));
        assert_eq!(
            (k.checker.as_str(), k.action, k.threshold_adjust),
            ("abc", SafetyAction::Blur, 0.5)
        );
        assert_eq!(SafetyKey::from_policy(&pol, None), SafetyKey::off());
        pol.checker = CheckerChoice::Off;
        assert_eq!(SafetyKey::from_policy(&pol, Some("abc")), SafetyKey::off());
    }

    #[test]
    fn missing_digests() {
        let mut r = req();
        r.params.refiner = Some(RefinerStage {
            model: "r".into(),
            switch_at: 0.8,
        });
        let mut c = ctx();
        c.refiner_digest = None;
        assert!(try_image_key(&r, &c).is_err());
        assert_eq!(image_key(&r, &c).len(), 64);
        let mut i = req();
        i.params.init_image = Some("/nope.png".into());
        let err = try_image_key(&i, &ctx()).unwrap_err().to_string();
        assert!(err.contains("/nope.png"), "{err}");
    }

    #[test]
    fn parallel_keys_match_serial() {
        let c = ctx();
        let reqs: Vec<ImageRequest> = (0..5000u64)
            .map(|s| {
                let mut r = req();
                r.seed = s;
                r
            })
            .collect();
        let par = image_keys(&reqs, |_| &c);
        assert_eq!(par.len(), reqs.len());
        for (r, k) in reqs.iter().zip(&par).step_by(97) {
            assert_eq!(&image_key(r, &c), k);
        }
    }
}

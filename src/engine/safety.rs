//! Stable Diffusion's CLIP safety checker (`StableDiffusionSafetyChecker`) and the CLIP image
//! preprocessing of `feature_extractor/preprocessor_config.json` (PIL-exact resampling).

use candle_core::{DType, Device, IndexOp, Module, Tensor};
use candle_nn::{
    conv2d_no_bias, layer_norm, linear_no_bias, Conv2d, Conv2dConfig, LayerNorm, Linear, VarBuilder,
};
use serde::Deserialize;
use serde_json::Value;
use std::path::{Path, PathBuf};

use super::clip::{load_error, Activation, EncoderLayer};
use super::weights::{component_file, open, read_json};
use super::EngineError;

/// An 8-bit RGB image, rows top to bottom, `data.len() == width * height * 3`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Interleaved RGB8 pixels.
    pub data: Vec<u8>,
}

impl RgbImage {
    /// Converts an `(H, W, 3)` float image in [0, 1] (diffusers' output) the way
    /// `numpy_to_pil` does: `round(x * 255)`, clamped.
    pub fn from_unit_floats(
        width: usize,
        height: usize,
        values: &[f32],
    ) -> Result<Self, EngineError> {
        if values.len() != width * height * 3 {
            return Err(EngineError::Other(format!(
                "image of {width}x{height} needs {} values, got {}",
                width * height * 3,
                values.len()
            )));
        }
        let data = values
            .iter()
            .map(|&v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        Ok(Self {
            width,
            height,
            data,
        })
    }

    fn check(&self) -> Result<(), EngineError> {
        if self.width == 0 || self.height == 0 || self.data.len() != self.width * self.height * 3 {
            return Err(EngineError::Other(format!(
                "bad RGB image: {}x{} with {} bytes",
                self.width,
                self.height,
                self.data.len()
            )));
        }
        Ok(())
    }
}

/// PIL's resampling filters, by PIL's `Resampling` numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resample {
    /// 0: nearest neighbour.
    Nearest,
    /// 1: Lanczos (a = 3).
    Lanczos,
    /// 2: bilinear (triangle).
    Bilinear,
    /// 3: bicubic (a = -0.5).
    Bicubic,
    /// 4: box.
    Box,
    /// 5: Hamming.
    Hamming,
}

impl Resample {
    /// Maps PIL's resample number (`resample` in preprocessor configs).
    pub fn from_pil(n: u64) -> Option<Self> {
        Some(match n {
            0 => Self::Nearest,
            1 => Self::Lanczos,
            2 => Self::Bilinear,
            3 => Self::Bicubic,
            4 => Self::Box,
            5 => Self::Hamming,
            _ => return None,
        })
    }

    fn support(self) -> f64 {
        match self {
            Self::Nearest | Self::Box => 0.5,
            Self::Bilinear | Self::Hamming => 1.0,
            Self::Bicubic => 2.0,
            Self::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        fn sinc(x: f64) -> f64 {
            if x == 0.0 {
                1.0
            } else {
                let px = std::f64::consts::PI * x;
                px.sin() / px
            }
        }
        match self {
            Self::Nearest | Self::Box => {
                if x > -0.5 && x <= 0.5 {
                    1.0
                } else {
                    0.0
                }
            }
            Self::Bilinear => (1.0 - x.abs()).max(0.0),
            Self::Hamming => {
                let x = x.abs();
                if x == 0.0 {
                    1.0
                } else if x >= 1.0 {
                    0.0
                } else {
                    let px = x * std::f64::consts::PI;
                    px.sin() / px * (0.54 + 0.46 * px.cos())
                }
            }
            Self::Bicubic => {
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Self::Lanczos => {
                if x > -3.0 && x < 3.0 {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

/// Fixed-point precision of PIL's 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc`: for each output index, the first input
/// index and the fixed-point weights.
fn coefficients(in_size: usize, out_size: usize, filter: Resample) -> Vec<(usize, Vec<i32>)> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64)
                .min(in_size as i64)
                .max(xmin as i64) as usize;
            let w: Vec<f64> = (xmin..xmax)
                .map(|x| filter.weight((x as f64 - center + 0.5) * ss))
                .collect();
            let total: f64 = w.iter().sum();
            let one = (1u32 << PRECISION_BITS) as f64;
            let fixed = w
                .iter()
                .map(|&k| {
                    let k = if total != 0.0 { k / total } else { k };
                    if k < 0.0 {
                        (-0.5 + k * one).trunc() as i32
                    } else {
                        (0.5 + k * one).trunc() as i32
                    }
                })
                .collect();
            (xmin, fixed)
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes `img` to `width`x`height` exactly as PIL's `Image.resize` does for RGB images
/// (horizontal pass first, each pass rounded to 8 bits; antialiased when downscaling).
pub fn resize(
    img: &RgbImage,
    width: usize,
    height: usize,
    filter: Resample,
) -> Result<RgbImage, EngineError> {
    img.check()?;
    if width == 0 || height == 0 {
        return Err(EngineError::Other(format!(
            "cannot resize to {width}x{height}"
        )));
    }
    if filter == Resample::Nearest {
        let mut data = Vec::with_capacity(width * height * 3);
        for y in 0..height {
            let sy = (((y as f64 + 0.5) * img.height as f64 / height as f64) as usize)
                .min(img.height - 1);
            for x in 0..width {
                let sx = (((x as f64 + 0.5) * img.width as f64 / width as f64) as usize)
                    .min(img.width - 1);
                let p = (sy * img.width + sx) * 3;
                data.extend_from_slice(&img.data[p..p + 3]);
            }
        }
        return Ok(RgbImage {
            width,
            height,
            data,
        });
    }
    let mut cur = img.clone();
    if width != cur.width {
        let coeffs = coefficients(cur.width, width, filter);
        let mut data = vec![0u8; width * cur.height * 3];
        for y in 0..cur.height {
            for (x, (xmin, k)) in coeffs.iter().enumerate() {
                for c in 0..3 {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &w) in k.iter().enumerate() {
                        acc += cur.data[(y * cur.width + xmin + i) * 3 + c] as i64 * w as i64;
                    }
                    data[(y * width + x) * 3 + c] = clip8(acc);
                }
            }
        }
        cur = RgbImage {
            width,
            height: cur.height,
            data,
        };
    }
    if height != cur.height {
        let coeffs = coefficients(cur.height, height, filter);
        let mut data = vec![0u8; cur.width * height * 3];
        for (y, (ymin, k)) in coeffs.iter().enumerate() {
            for x in 0..cur.width {
                for c in 0..3 {
                    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
                    for (i, &w) in k.iter().enumerate() {
                        acc += cur.data[((ymin + i) * cur.width + x) * 3 + c] as i64 * w as i64;
                    }
                    data[(y * cur.width + x) * 3 + c] = clip8(acc);
                }
            }
        }
        cur = RgbImage {
            width: cur.width,
            height,
            data,
        };
    }
    Ok(cur)
}

/// Crops the centre `width`x`height` of `img` as transformers' `center_crop` does (offsets
/// `(size - crop) / 2` rounded down; zero padding where the image is smaller).
pub fn center_crop(img: &RgbImage, width: usize, height: usize) -> Result<RgbImage, EngineError> {
    img.check()?;
    let top = (img.height as i64 - height as i64).div_euclid(2);
    let left = (img.width as i64 - width as i64).div_euclid(2);
    let mut data = vec![0u8; width * height * 3];
    for y in 0..height {
        let sy = y as i64 + top;
        if sy < 0 || sy >= img.height as i64 {
            continue;
        }
        for x in 0..width {
            let sx = x as i64 + left;
            if sx < 0 || sx >= img.width as i64 {
                continue;
            }
            let s = (sy as usize * img.width + sx as usize) * 3;
            data[(y * width + x) * 3..(y * width + x) * 3 + 3].copy_from_slice(&img.data[s..s + 3]);
        }
    }
    Ok(RgbImage {
        width,
        height,
        data,
    })
}

/// `preprocessor_config.json` of a `CLIPImageProcessor`.
#[derive(Debug, Clone, Deserialize)]
pub struct PreprocessorConfig {
    /// Whether to resize.
    #[serde(default = "yes")]
    pub do_resize: bool,
    /// `{"shortest_edge": n}`, `{"height": h, "width": w}` or a number.
    #[serde(default)]
    pub size: Option<Value>,
    /// PIL resample number (3 = bicubic).
    #[serde(default = "bicubic")]
    pub resample: u64,
    /// Whether to centre-crop.
    #[serde(default = "yes")]
    pub do_center_crop: bool,
    /// `{"height": h, "width": w}` or a number.
    #[serde(default)]
    pub crop_size: Option<Value>,
    /// Whether to multiply by `rescale_factor`.
    #[serde(default = "yes")]
    pub do_rescale: bool,
    /// Usually 1/255.
    #[serde(default = "inv255")]
    pub rescale_factor: f64,
    /// Whether to normalize with `image_mean` / `image_std`.
    #[serde(default = "yes")]
    pub do_normalize: bool,
    /// Per-channel mean.
    #[serde(default = "clip_mean")]
    pub image_mean: Vec<f64>,
    /// Per-channel standard deviation.
    #[serde(default = "clip_std")]
    pub image_std: Vec<f64>,
}

fn yes() -> bool {
    true
}
fn bicubic() -> u64 {
    3
}
fn inv255() -> f64 {
    1.0 / 255.0
}
fn clip_mean() -> Vec<f64> {
    vec![0.48145466, 0.4578275, 0.40821073]
}
fn clip_std() -> Vec<f64> {
    vec![0.26862954, 0.26130258, 0.27577711]
}

/// How an image is resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SizeRule {
    ShortestEdge(usize),
    Exact { width: usize, height: usize },
}

fn parse_size(v: &Value, file: &Path, what: &str) -> Result<SizeRule, EngineError> {
    let bad = || EngineError::Load {
        file: file.to_path_buf(),
        message: format!("unsupported `{what}`: {v}"),
    };
    let num = |x: &Value| x.as_u64().filter(|&n| n > 0).map(|n| n as usize);
    if let Some(n) = num(v) {
        return Ok(SizeRule::Exact {
            width: n,
            height: n,
        });
    }
    if let Some(n) = v.get("shortest_edge").and_then(num) {
        return Ok(SizeRule::ShortestEdge(n));
    }
    match (v.get("height").and_then(num), v.get("width").and_then(num)) {
        (Some(height), Some(width)) => Ok(SizeRule::Exact { width, height }),
        _ => Err(bad()),
    }
}

/// `config.json` `vision_config` of the checker's CLIP vision tower.
#[derive(Debug, Clone, Deserialize)]
pub struct VisionConfig {
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Input resolution (square).
    pub image_size: usize,
    /// Patch size (the patch convolution's kernel and stride).
    pub patch_size: usize,
    /// Activation name.
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Input channels.
    #[serde(default = "three")]
    pub num_channels: usize,
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}
fn three() -> usize {
    3
}

#[derive(Debug, Clone, Deserialize)]
struct CheckerConfig {
    vision_config: VisionConfig,
    projection_dim: usize,
}

/// The checker's verdict on one image, scores as diffusers computes them (rounded to 3 places).
#[derive(Debug, Clone, PartialEq)]
pub struct SafetyVerdict {
    /// Whether any concept score is above zero.
    pub flagged: bool,
    /// Per concept: cosine - (threshold + threshold_adjust) + special-care adjustment.
    pub concept_scores: Vec<f64>,
    /// Per special-care concept: cosine - (threshold + threshold_adjust) + running adjustment.
    pub special_scores: Vec<f64>,
}

/// The CLIP vision tower + projection + concept embeddings of a `safety_checker/` folder.
#[derive(Debug)]
pub struct SafetyChecker {
    patch_embedding: Conv2d,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<EncoderLayer>,
    post_layernorm: LayerNorm,
    visual_projection: Linear,
    concept_embeds: Tensor,
    special_care_embeds: Tensor,
    concept_thresholds: Vec<f32>,
    special_thresholds: Vec<f32>,
    vision: VisionConfig,
    pre: PreprocessorConfig,
    pre_file: PathBuf,
    device: Device,
}

impl SafetyChecker {
    /// Loads `checker_dir/config.json` + weights and `feature_extractor_dir/preprocessor_config.json`.
    pub fn load(
        checker_dir: &Path,
        feature_extractor_dir: &Path,
        device: &Device,
    ) -> Result<Self, EngineError> {
        let config_file = checker_dir.join("config.json");
        let config: CheckerConfig = read_json(&config_file)?;
        let pre_file = feature_extractor_dir.join("preprocessor_config.json");
        let pre: PreprocessorConfig = read_json(&pre_file)?;
        if pre.image_mean.len() != 3 || pre.image_std.len() != 3 || pre.image_std.contains(&0.0) {
            return Err(EngineError::Load {
                file: pre_file,
                message: "image_mean / image_std must have 3 entries, std non-zero".into(),
            });
        }
        let v = config.vision_config.clone();
        let bad = |message: String| EngineError::Load {
            file: config_file.clone(),
            message,
        };
        let activation = Activation::parse(&v.hidden_act)
            .ok_or_else(|| bad(format!("unsupported hidden_act `{}`", v.hidden_act)))?;
        if v.patch_size == 0
            || !v.image_size.is_multiple_of(v.patch_size)
            || v.num_attention_heads == 0
            || !v.hidden_size.is_multiple_of(v.num_attention_heads)
        {
            return Err(bad(
                "inconsistent vision_config (image/patch size or heads)".into(),
            ));
        }
        let file = component_file(checker_dir)?;
        let root = open(&file, DType::F32, device)?;
        let build = || -> candle_core::Result<Self> {
            // Older diffusers checkpoints nest the tower as `vision_model.vision_model.*`.
            let vb: VarBuilder =
                if root.contains_tensor("vision_model.vision_model.embeddings.class_embedding") {
                    root.pp("vision_model").pp("vision_model")
                } else {
                    root.pp("vision_model")
                };
            let h = v.hidden_size;
            let patches = (v.image_size / v.patch_size).pow(2);
            let conv = Conv2dConfig {
                stride: v.patch_size,
                ..Default::default()
            };
            let emb = vb.pp("embeddings");
            let patch_embedding = conv2d_no_bias(
                v.num_channels,
                h,
                v.patch_size,
                conv,
                emb.pp("patch_embedding"),
            )?;
            let class_embedding = emb.get(h, "class_embedding")?;
            let position_embedding = emb.get((patches + 1, h), "position_embedding.weight")?;
            let pre_layrnorm = layer_norm(h, v.layer_norm_eps, vb.pp("pre_layrnorm"))?;
            let layers = (0..v.num_hidden_layers)
                .map(|i| {
                    EncoderLayer::load(
                        vb.pp(format!("encoder.layers.{i}")),
                        h,
                        v.intermediate_size,
                        v.num_attention_heads,
                        v.layer_norm_eps,
                        activation,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let post_layernorm = layer_norm(h, v.layer_norm_eps, vb.pp("post_layernorm"))?;
            let visual_projection =
                linear_no_bias(h, config.projection_dim, root.pp("visual_projection"))?;
            let concept_embeds = root.get_unchecked("concept_embeds")?;
            let special_care_embeds = root.get_unchecked("special_care_embeds")?;
            let concept_thresholds = root
                .get_unchecked("concept_embeds_weights")?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let special_thresholds = root
                .get_unchecked("special_care_embeds_weights")?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for (name, t, n) in [
                ("concept_embeds", &concept_embeds, concept_thresholds.len()),
                (
                    "special_care_embeds",
                    &special_care_embeds,
                    special_thresholds.len(),
                ),
            ] {
                if t.dims() != [n, config.projection_dim] {
                    return Err(candle_core::Error::Msg(format!(
                        "tensor `{name}`: expected shape ({n}, {}) (one row per threshold), the file has {:?}",
                        config.projection_dim,
                        t.dims()
                    )));
                }
            }
            Ok(Self {
                patch_embedding,
                class_embedding,
                position_embedding,
                pre_layrnorm,
                layers,
                post_layernorm,
                visual_projection,
                concept_embeds,
                special_care_embeds,
                concept_thresholds,
                special_thresholds,
                vision: v.clone(),
                pre: pre.clone(),
                pre_file: pre_file.clone(),
                device: device.clone(),
            })
        };
        build().map_err(|e| load_error(&file, e))
    }

    /// The vision tower's configuration.
    pub fn vision_config(&self) -> &VisionConfig {
        &self.vision
    }

    /// Preprocesses images as `CLIPImageProcessor` does: resize (PIL resampling), centre crop,
    /// rescale, normalize. Returns `(B, 3, crop_h, crop_w)` f32 on the checker's device.
    pub fn preprocess(&self, images: &[RgbImage]) -> Result<Tensor, EngineError> {
        let p = &self.pre;
        let filter = Resample::from_pil(p.resample).ok_or_else(|| EngineError::Load {
            file: self.pre_file.clone(),
            message: format!("unsupported resample {}", p.resample),
        })?;
        let size = match &p.size {
            Some(v) => parse_size(v, &self.pre_file, "size")?,
            None => SizeRule::ShortestEdge(self.vision.image_size),
        };
        let crop = match &p.crop_size {
            Some(v) => match parse_size(v, &self.pre_file, "crop_size")? {
                SizeRule::Exact { width, height } => (width, height),
                SizeRule::ShortestEdge(n) => (n, n),
            },
            None => (self.vision.image_size, self.vision.image_size),
        };
        let mut out = Vec::new();
        let (mut ow, mut oh) = (0, 0);
        for img in images {
            img.check()?;
            let mut im = img.clone();
            if p.do_resize {
                let (w, h) = match size {
                    SizeRule::Exact { width, height } => (width, height),
                    SizeRule::ShortestEdge(s) => {
                        // transformers: the short side becomes `s`, the long side int(s * long / short).
                        if im.width <= im.height {
                            (s, (s as f64 * im.height as f64 / im.width as f64) as usize)
                        } else {
                            ((s as f64 * im.width as f64 / im.height as f64) as usize, s)
                        }
                    }
                };
                if (w, h) != (im.width, im.height) {
                    im = resize(&im, w.max(1), h.max(1), filter)?;
                }
            }
            if p.do_center_crop {
                im = center_crop(&im, crop.0, crop.1)?;
            }
            if !out.is_empty() && (im.width, im.height) != (ow, oh) {
                return Err(EngineError::Other(
                    "preprocessed images differ in size; set crop_size".into(),
                ));
            }
            (ow, oh) = (im.width, im.height);
            let plane = im.width * im.height;
            let mut chw = vec![0f32; 3 * plane];
            for (i, px) in im.data.chunks_exact(3).enumerate() {
                for c in 0..3 {
                    let mut x = px[c] as f64;
                    if p.do_rescale {
                        x *= p.rescale_factor;
                    }
                    if p.do_normalize {
                        x = (x - p.image_mean[c]) / p.image_std[c];
                    }
                    chw[c * plane + i] = x as f32;
                }
            }
            out.extend(chw);
        }
        Ok(Tensor::from_vec(
            out,
            (images.len(), 3, oh, ow),
            &self.device,
        )?)
    }

    /// Projected image embeddings `(B, projection_dim)` of a preprocessed batch.
    pub fn image_embeds(&self, clip_input: &Tensor) -> Result<Tensor, EngineError> {
        let (_, _, h, w) = clip_input.dims4()?;
        if h != self.vision.image_size || w != self.vision.image_size {
            return Err(EngineError::Other(format!(
                "safety checker expects {0}x{0} inputs, got {w}x{h}",
                self.vision.image_size
            )));
        }
        let x = clip_input.to_dtype(DType::F32)?.to_device(&self.device)?;
        let b = x.dim(0)?;
        let h = self.vision.hidden_size;
        let patches = self
            .patch_embedding
            .forward(&x)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self
            .class_embedding
            .reshape((1, 1, h))?
            .broadcast_as((b, 1, h))?;
        let mut x = Tensor::cat(&[&cls, &patches], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        x = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        let pooled = self
            .post_layernorm
            .forward(&x.i((.., 0, ..))?.contiguous()?)?;
        Ok(self.visual_projection.forward(&pooled)?)
    }

    /// Cosine similarities `(special (B, S), concept (B, C))` of image embeddings with the
    /// special-care and concept embeddings.
    pub fn cosines(&self, image_embeds: &Tensor) -> Result<(Tensor, Tensor), EngineError> {
        let normalize = |t: &Tensor| -> candle_core::Result<Tensor> {
            let norm = t
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12, f64::INFINITY)?;
            t.broadcast_div(&norm)
        };
        let img = normalize(image_embeds)?;
        let special = img.matmul(&normalize(&self.special_care_embeds)?.t()?)?;
        let concept = img.matmul(&normalize(&self.concept_embeds)?.t()?)?;
        Ok((special, concept))
    }

    /// Scores cosines as diffusers' `StableDiffusionSafetyChecker.forward`, with
    /// `threshold_adjust` added to every threshold (> 0 flags less, < 0 flags more).
    pub fn verdicts(
        &self,
        special: &Tensor,
        concept: &Tensor,
        threshold_adjust: f64,
    ) -> Result<Vec<SafetyVerdict>, EngineError> {
        let special = special.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let concept = concept.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        Ok(special
            .iter()
            .zip(&concept)
            .map(|(s, c)| {
                score(
                    s,
                    c,
                    &self.special_thresholds,
                    &self.concept_thresholds,
                    threshold_adjust,
                )
            })
            .collect())
    }

    /// Preprocesses, embeds and scores `images`.
    pub fn check(
        &self,
        images: &[RgbImage],
        threshold_adjust: f64,
    ) -> Result<Vec<SafetyVerdict>, EngineError> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let input = self.preprocess(images)?;
        let embeds = self.image_embeds(&input)?;
        let (special, concept) = self.cosines(&embeds)?;
        self.verdicts(&special, &concept, threshold_adjust)
    }
}

/// numpy's `round(float32, 3)`: scale, round half to even, unscale, in f32.
fn round3(x: f32) -> f32 {
    (x * 1000.0).round_ties_even() / 1000.0
}

fn score(
    special: &[f32],
    concept: &[f32],
    special_thr: &[f32],
    concept_thr: &[f32],
    threshold_adjust: f64,
) -> SafetyVerdict {
    let mut adjustment = 0.0f32;
    let mut special_scores = Vec::with_capacity(special.len());
    for (&cos, &thr) in special.iter().zip(special_thr) {
        let s = round3(cos - (thr as f64 + threshold_adjust) as f32 + adjustment);
        if s > 0.0 {
            adjustment = 0.01;
        }
        special_scores.push(s as f64);
    }
    let concept_scores: Vec<f64> = concept
        .iter()
        .zip(concept_thr)
        .map(|(&cos, &thr)| {
            round3(cos - (thr as f64 + threshold_adjust) as f32 + adjustment) as f64
        })
        .collect();
    let flagged = concept_scores.iter().any(|&s| s > 0.0);
    SafetyVerdict {
        flagged,
        concept_scores,
        special_scores,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn special_care_raises_concept_scores() {
        let v = score(&[0.5], &[0.295], &[0.4], &[0.3], 0.0);
        assert!((v.special_scores[0] - 0.1).abs() < 1e-6);
        assert!((v.concept_scores[0] - 0.005).abs() < 1e-6);
        assert!(v.flagged);
        let v = score(&[0.1], &[0.295], &[0.4], &[0.3], 0.0);
        assert!(!v.flagged);
        // A positive adjustment raises the thresholds: fewer flags.
        let v = score(&[0.1], &[0.35], &[0.4], &[0.3], 0.1);
        assert!(!v.flagged);
        let v = score(&[0.1], &[0.35], &[0.4], &[0.3], -0.1);
        assert!(v.flagged);
    }

    #[test]
    fn resize_identity_and_constant() {
        let img = RgbImage {
            width: 7,
            height: 5,
            data: vec![77; 7 * 5 * 3],
        };
        for f in [
            Resample::Bicubic,
            Resample::Bilinear,
            Resample::Lanczos,
            Resample::Nearest,
        ] {
            let r = resize(&img, 3, 9, f).unwrap();
            assert_eq!((r.width, r.height), (3, 9));
            assert!(r.data.iter().all(|&v| v == 77), "{f:?}");
        }
        let grad = RgbImage {
            width: 4,
            height: 1,
            data: (0..12).map(|i| (i * 20) as u8).collect(),
        };
        let c = center_crop(&grad, 2, 1).unwrap();
        assert_eq!(c.data, grad.data[3..9].to_vec());
        assert!(resize(
            &RgbImage {
                width: 2,
                height: 2,
                data: vec![0; 5]
            },
            1,
            1,
            Resample::Bicubic
        )
        .is_err());
    }
}

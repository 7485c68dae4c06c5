//! A loaded diffusers-layout pipeline (SD 1.x / 2.x, SDXL base, SDXL refiner) and the denoising
//! loop: text conditioning, torch-compatible noise, the scheduler loop with classifier-free
//! guidance, the SDXL refiner handoff, VAE decoding and the safety checker.

use candle_core::{DType, Device, IndexOp, Tensor, D};
use std::path::Path;

use super::clip::TextEncoder;
use super::rng::{DeviceNoise, TorchNoise};
use super::schedulers::{self, NoiseFn, SchedulerConfig};
use super::tokenizer::ClipTokenizer;
use super::unet::{AddedCond, UNet};
use super::vae::Vae;
use super::weights::read_json;
use super::EngineError;
use crate::spec::{MemoryPolicy, NoiseSource, SchedulerName, SdxlConditioning};

/// Which kind of pipeline a folder holds, from its `model_index.json` and UNet config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    /// SD 1.x / 2.x: one CLIP text encoder, no added conditioning.
    Sd,
    /// SDXL base: two text encoders, `text_time` conditioning with target size.
    SdxlBase,
    /// SDXL refiner: `text_encoder_2` only, aesthetic-score conditioning.
    SdxlRefiner,
}

/// How to load a pipeline.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    pub dtype: DType,
    pub memory: MemoryPolicy,
}

/// `model_index.json`, the fields the pipeline reads.
#[derive(Debug, serde::Deserialize)]
struct ModelIndex {
    #[serde(default)]
    force_zeros_for_empty_prompt: Option<bool>,
    #[serde(default)]
    requires_aesthetics_score: Option<bool>,
    #[serde(default)]
    text_encoder: Option<serde_json::Value>,
}

/// One tokenizer + text encoder pair.
struct TextStack {
    tokenizer: ClipTokenizer,
    encoder: TextEncoder,
}

/// A prompt pair's conditioning, computed once per prompt and reused across batches.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// (1, 77, D) prompt embeddings.
    pub prompt: Tensor,
    /// (1, 77, D) negative prompt embeddings.
    pub negative: Tensor,
    /// SDXL pooled embeddings (1, P) for the prompt and the negative prompt.
    pub pooled: Option<(Tensor, Tensor)>,
}

/// One batch of images that share everything but their seeds.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub seeds: Vec<u64>,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: SchedulerName,
    pub width: usize,
    pub height: usize,
    pub noise: NoiseSource,
    pub sdxl: SdxlConditioning,
    /// SDXL base: stop at this fraction of the schedule (`denoising_end`).
    pub denoising_end: Option<f64>,
    /// Start from these latents (the refiner handoff, `denoising_start`) instead of noise.
    pub start: Option<StartFrom>,
}

/// Where an image-to-image pass starts.
#[derive(Debug, Clone)]
pub enum StartFrom {
    /// Latents handed over by a base stage at `denoising_start`; no noise is added.
    Latents {
        latents: Tensor,
        denoising_start: f64,
    },
    /// An image in [-1, 1] (1, 3, H, W), encoded with the VAE, noised to `strength`.
    Image { image: Tensor, strength: f64 },
}

/// A loaded pipeline.
pub struct Pipeline {
    kind: PipelineKind,
    text: Vec<TextStack>,
    unet: UNet,
    vae: Vae,
    scheduler_config: SchedulerConfig,
    device: Device,
    dtype: DType,
    force_zeros_for_empty_prompt: bool,
}

impl Pipeline {
    /// Loads a diffusers-layout folder; every shape comes from its config files.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self, EngineError> {
        let index: ModelIndex = read_json(&dir.join("model_index.json"))?;
        let (device, dtype) = (opts.device.clone(), opts.dtype);
        let mut text = Vec::new();
        // `"text_encoder": [null, null]` in model_index.json (the SDXL refiner) means none.
        let te1_declared = index
            .text_encoder
            .as_ref()
            .is_none_or(|v| v.as_array().is_some_and(|a| a.iter().any(|x| !x.is_null())));
        if te1_declared && dir.join("text_encoder").is_dir() {
            text.push(TextStack {
                tokenizer: ClipTokenizer::load(&dir.join("tokenizer"))?,
                encoder: TextEncoder::load(&dir.join("text_encoder"), &device, dtype)?,
            });
        }
        if dir.join("text_encoder_2").is_dir() {
            text.push(TextStack {
                tokenizer: ClipTokenizer::load(&dir.join("tokenizer_2"))?,
                encoder: TextEncoder::load(&dir.join("text_encoder_2"), &device, dtype)?,
            });
        }
        if text.is_empty() {
            return Err(EngineError::Load {
                file: dir.join("text_encoder"),
                message: "the model has no text encoder".into(),
            });
        }
        let mut unet = UNet::load(&dir.join("unet"), &device, dtype)?;
        let slice = match opts.memory.attention_slicing {
            crate::spec::AttentionSlicing::Off => None,
            crate::spec::AttentionSlicing::Auto => None,
            crate::spec::AttentionSlicing::Size(n) => Some(n),
        };
        unet.set_attention_slice(slice);
        let mut vae = Vae::load(&dir.join("vae"), &device, dtype)?;
        vae.set_tiling(opts.memory.vae_tiling);
        let scheduler_config = schedulers::load_config(&dir.join("scheduler"))?;
        let kind = match (unet.config().addition_embed_type.as_deref(), text.len()) {
            (Some("text_time"), 2) => PipelineKind::SdxlBase,
            (Some("text_time"), _) => PipelineKind::SdxlRefiner,
            _ => PipelineKind::Sd,
        };
        let requires_aesthetics = index
            .requires_aesthetics_score
            .unwrap_or(kind == PipelineKind::SdxlRefiner);
        let kind = if kind != PipelineKind::Sd && requires_aesthetics {
            PipelineKind::SdxlRefiner
        } else {
            kind
        };
        Ok(Self {
            kind,
            text,
            unet,
            vae,
            scheduler_config,
            device,
            dtype,
            force_zeros_for_empty_prompt: index.force_zeros_for_empty_prompt.unwrap_or(false),
        })
    }

    /// SD, SDXL base or SDXL refiner.
    pub fn kind(&self) -> PipelineKind {
        self.kind
    }

    /// Encodes one text with every text encoder: (hidden states to condition on, pooled output of
    /// the last encoder).
    fn encode_text(&self, text: &str) -> Result<(Tensor, Tensor), EngineError> {
        let mut hidden = Vec::new();
        let mut pooled = None;
        for stack in &self.text {
            let ids = stack.tokenizer.encode(text)?;
            let ids = Tensor::new(ids.as_slice(), &self.device)?.unsqueeze(0)?;
            let out = stack.encoder.forward(&ids)?;
            hidden.push(match self.kind {
                PipelineKind::Sd => out.last_hidden,
                _ => out.penultimate,
            });
            pooled = Some(out.pooled);
        }
        let hidden = Tensor::cat(&hidden, D::Minus1)?;
        let pooled = pooled.ok_or_else(|| EngineError::Other("no text encoder".into()))?;
        Ok((hidden, pooled))
    }

    /// Computes a prompt pair's conditioning (once per prompt; reuse it for every batch).
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative_prompt: &str,
    ) -> Result<Conditioning, EngineError> {
        let (prompt_embeds, pooled) = self.encode_text(prompt)?;
        let zero_negative = self.kind == PipelineKind::SdxlBase
            && self.force_zeros_for_empty_prompt
            && negative_prompt.is_empty();
        let (negative, negative_pooled) = if zero_negative {
            (prompt_embeds.zeros_like()?, pooled.zeros_like()?)
        } else {
            self.encode_text(negative_prompt)?
        };
        let pooled = match self.kind {
            PipelineKind::Sd => None,
            _ => Some((pooled, negative_pooled)),
        };
        Ok(Conditioning {
            prompt: prompt_embeds,
            negative,
            pooled,
        })
    }

    /// SDXL `time_ids` for the prompt and the negative prompt, (1, 6) or (1, 5) each.
    fn time_ids(&self, req: &GenerateRequest) -> Result<(Tensor, Tensor), EngineError> {
        let s = &req.sdxl;
        let (ow, oh) = s
            .original_size
            .unwrap_or((req.width as u32, req.height as u32));
        let (ct, cl) = s.crop;
        let base = [oh as f32, ow as f32, ct as f32, cl as f32];
        let (pos, neg): (Vec<f32>, Vec<f32>) = match self.kind {
            PipelineKind::SdxlRefiner => {
                let mut p = base.to_vec();
                p.push(s.aesthetic_score as f32);
                let mut n = base.to_vec();
                n.push(s.negative_aesthetic_score as f32);
                (p, n)
            }
            _ => {
                let mut p = base.to_vec();
                p.extend([req.height as f32, req.width as f32]);
                (p.clone(), p)
            }
        };
        let n = pos.len();
        let pos = Tensor::from_vec(pos, (1, n), &self.device)?.to_dtype(self.dtype)?;
        let neg = Tensor::from_vec(neg, (1, n), &self.device)?.to_dtype(self.dtype)?;
        Ok((pos, neg))
    }

    /// Runs the denoising loop for one batch and returns its final latents (B, C, H/8, W/8).
    pub fn generate(
        &self,
        req: &GenerateRequest,
        cond: &Conditioning,
    ) -> Result<Tensor, EngineError> {
        let b = req.seeds.len();
        if b == 0 {
            return Err(EngineError::Other("empty batch".into()));
        }
        let cfg = req.guidance > 1.0;
        let mut scheduler = schedulers::build(req.scheduler, &self.scheduler_config, req.steps)?;
        let timesteps = scheduler.timesteps().to_vec();
        let train_steps = scheduler.num_train_timesteps() as f64;
        let mut noise: Box<dyn NoiseFn> = match req.noise {
            NoiseSource::TorchCpu => Box::new(TorchNoise::new(&req.seeds)),
            NoiseSource::Device => Box::new(DeviceNoise),
        };
        let c = self.unet.config().in_channels;
        let (h, w) = (req.height / 8, req.width / 8);
        // The shape, dtype and device every draw of this batch takes.
        let latent_like = Tensor::zeros((b, c, h, w), self.dtype, &self.device)?;

        // The range of the schedule this pass runs, and its starting latents.
        let mut first = 0usize;
        let mut last = timesteps.len();
        if let Some(end) = req.denoising_end.filter(|e| *e > 0.0 && *e < 1.0) {
            let cutoff = (train_steps - end * train_steps).round();
            last = timesteps.iter().filter(|t| **t >= cutoff).count();
        }
        let mut latents = match &req.start {
            None => (noise.randn_like(&latent_like)? * scheduler.init_noise_sigma())?,
            Some(StartFrom::Latents {
                latents,
                denoising_start,
            }) => {
                let cutoff = (train_steps - denoising_start * train_steps).round();
                let mut n = timesteps.iter().filter(|t| **t < cutoff).count();
                if scheduler.order() == 2 && n % 2 == 0 {
                    n += 1;
                }
                first = timesteps.len().saturating_sub(n);
                latents.to_device(&self.device)?.to_dtype(self.dtype)?
            }
            Some(StartFrom::Image { image, strength }) => {
                let steps = timesteps.len() / scheduler.order().max(1);
                let init = ((steps as f64 * strength) as usize).min(steps);
                let t_start = steps - init;
                first = t_start * scheduler.order();
                if first >= timesteps.len() {
                    return Err(EngineError::Other(format!(
                        "strength {strength} leaves no step to run"
                    )));
                }
                let image = image.to_device(&self.device)?.to_dtype(self.dtype)?;
                let mut encoded = Vec::with_capacity(b);
                let mut sample_noise = noise.randn_like(&latent_like)?;
                for i in 0..b {
                    encoded.push(self.vae.encode(&image, Some(&sample_noise.i(i..i + 1)?))?);
                }
                let init_latents = Tensor::cat(&encoded, 0)?;
                sample_noise = noise.randn_like(&latent_like)?;
                scheduler.add_noise(&init_latents, &sample_noise, first)?
            }
        };

        let batch = |t: &Tensor| -> candle_core::Result<Tensor> { t.repeat((b, 1, 1)) };
        let context = if cfg {
            Tensor::cat(&[batch(&cond.negative)?, batch(&cond.prompt)?], 0)?
        } else {
            batch(&cond.prompt)?
        };
        let added = match &cond.pooled {
            None => None,
            Some((pooled, neg_pooled)) => {
                let (ids, neg_ids) = self.time_ids(req)?;
                let rep = |t: &Tensor| t.repeat((b, 1));
                Some(if cfg {
                    AddedCond {
                        text_embeds: Tensor::cat(&[rep(neg_pooled)?, rep(pooled)?], 0)?,
                        time_ids: Tensor::cat(&[rep(&neg_ids)?, rep(&ids)?], 0)?,
                    }
                } else {
                    AddedCond {
                        text_embeds: rep(pooled)?,
                        time_ids: rep(&ids)?,
                    }
                })
            }
        };

        for (i, &t) in timesteps.iter().enumerate().take(last).skip(first) {
            let input = if cfg {
                Tensor::cat(&[&latents, &latents], 0)?
            } else {
                latents.clone()
            };
            let input = scheduler.scale_model_input(&input, i)?;
            let out = self.unet.forward(&input, t, &context, added.as_ref())?;
            let eps = if cfg {
                let uncond = out.i(0..b)?;
                let text = out.i(b..2 * b)?;
                (&uncond + ((text - &uncond)? * req.guidance)?)?
            } else {
                out
            };
            latents = scheduler.step(&eps, i, &latents, noise.as_mut())?;
        }
        Ok(latents)
    }

    /// Decodes latents to images: (B, H, W, 3) f32 in [0, 1]. Each image is decoded on its own
    /// (as diffusers' `enable_slicing`): the same numbers as diffusers' per-image results, and
    /// the decoder's peak memory is that of one image.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, EngineError> {
        let b = latents.dim(0)?;
        let mut parts = Vec::with_capacity(b);
        for i in 0..b {
            parts.push(self.vae.decode(&latents.i(i..i + 1)?)?);
        }
        let image = Tensor::cat(&parts, 0)?;
        let image = ((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
        Ok(image.permute((0, 2, 3, 1))?.to_dtype(DType::F32)?)
    }
}

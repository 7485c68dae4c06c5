//! diffusers' `AutoencoderKL`: the decoder (latents → image in [-1, 1]) and the encoder
//! (image → latents, for img2img), with every shape read from `vae/config.json`.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::{Deserialize, Serialize};
use std::path::Path;

use super::ops::{conv2d, group_norm, Conv2d, GroupNorm};
use super::unet::blocks::{
    Activation, Attention, Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D,
};
use super::unet::PerBlock;
use super::{weights, EngineError};

/// The fields of a diffusers `AutoencoderKL` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
    pub force_upcast: bool,
    /// Image size the VAE was trained on; sets the tile size of tiled decoding.
    pub sample_size: PerBlock<usize>,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            force_upcast: true,
            sample_size: PerBlock::One(32),
        }
    }
}

const EPS: f64 = 1e-6;

/// The VAE's `UNetMidBlock2D`: resnet, (attention, resnet).
#[derive(Debug)]
struct Mid {
    resnet0: ResnetBlock2D,
    attn: Option<(GroupNorm, Attention)>,
    resnet1: ResnetBlock2D,
}

impl Mid {
    fn new(
        vb: VarBuilder,
        ch: usize,
        groups: usize,
        act: Activation,
        attention: bool,
    ) -> Result<Self> {
        let rc = ResnetConfig {
            in_channels: ch,
            out_channels: ch,
            temb_channels: None,
            groups,
            eps: EPS,
            act,
            output_scale_factor: 1.0,
        };
        let resnet0 = ResnetBlock2D::new(vb.pp("resnets").pp(0), rc)?;
        let attn = if attention {
            let va = vb.pp("attentions").pp(0);
            // diffusers: heads = channels / attention_head_dim with attention_head_dim = channels.
            Some((
                group_norm(groups, ch, EPS, va.pp("group_norm"))?,
                Attention::new(va, ch, None, 1, ch, true)?,
            ))
        } else {
            None
        };
        let resnet1 = ResnetBlock2D::new(vb.pp("resnets").pp(1), rc)?;
        Ok(Self {
            resnet0,
            attn,
            resnet1,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut x = self.resnet0.forward(xs, None)?;
        if let Some((norm, attn)) = &self.attn {
            let (b, c, h, w) = x.dims4()?;
            let seq = norm.forward(&x)?.reshape((b, c, h * w))?.transpose(1, 2)?;
            let out = attn
                .forward(&seq, None, None)?
                .transpose(1, 2)?
                .reshape((b, c, h, w))?;
            x = (out + x)?;
        }
        self.resnet1.forward(&x, None)
    }
}

#[derive(Debug)]
struct Encoder {
    conv_in: Conv2d,
    down: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: Mid,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

#[derive(Debug)]
struct Decoder {
    conv_in: Conv2d,
    mid: Mid,
    up: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
}

fn conv3(i: usize, o: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(
        i,
        o,
        3,
        Conv2dConfig {
            padding: 1,
            ..Default::default()
        },
        vb,
    )
}

impl Encoder {
    fn new(vb: VarBuilder, c: &VaeConfig, act: Activation) -> Result<Self> {
        let boc = &c.block_out_channels;
        let g = c.norm_num_groups;
        let conv_in = conv3(c.in_channels, boc[0], vb.pp("conv_in"))?;
        let mut down = Vec::new();
        let mut out_c = boc[0];
        for (i, &ch) in boc.iter().enumerate() {
            let in_c = out_c;
            out_c = ch;
            let vbb = vb.pp("down_blocks").pp(i);
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let rc = ResnetConfig {
                        in_channels: if j == 0 { in_c } else { out_c },
                        out_channels: out_c,
                        temb_channels: None,
                        groups: g,
                        eps: EPS,
                        act,
                        output_scale_factor: 1.0,
                    };
                    ResnetBlock2D::new(vbb.pp("resnets").pp(j), rc)
                })
                .collect::<Result<Vec<_>>>()?;
            let ds = if i + 1 < boc.len() {
                Some(Downsample2D::new(
                    vbb.pp("downsamplers").pp(0),
                    out_c,
                    out_c,
                    0,
                )?)
            } else {
                None
            };
            down.push((resnets, ds));
        }
        let last = boc[boc.len() - 1];
        let mid = Mid::new(vb.pp("mid_block"), last, g, act, c.mid_block_add_attention)?;
        let norm_out = group_norm(g, last, EPS, vb.pp("conv_norm_out"))?;
        let conv_out = conv3(last, 2 * c.latent_channels, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            down,
            mid,
            norm_out,
            conv_out,
            // diffusers' Encoder and Decoder end with nn.SiLU whatever act_fn says.
            act: Activation::Silu,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(xs)?;
        for (resnets, ds) in &self.down {
            for r in resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(d) = ds {
                x = d.forward(&x)?;
            }
        }
        x = self.mid.forward(&x)?;
        x = self.act.after_norm(&self.norm_out, &x)?;
        self.conv_out.forward(&x)
    }
}

impl Decoder {
    fn new(vb: VarBuilder, c: &VaeConfig, act: Activation) -> Result<Self> {
        let rev: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let g = c.norm_num_groups;
        let conv_in = conv3(c.latent_channels, rev[0], vb.pp("conv_in"))?;
        let mid = Mid::new(
            vb.pp("mid_block"),
            rev[0],
            g,
            act,
            c.mid_block_add_attention,
        )?;
        let mut up = Vec::new();
        let mut out_c = rev[0];
        for (i, &ch) in rev.iter().enumerate() {
            let prev = out_c;
            out_c = ch;
            let vbb = vb.pp("up_blocks").pp(i);
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| {
                    let rc = ResnetConfig {
                        in_channels: if j == 0 { prev } else { out_c },
                        out_channels: out_c,
                        temb_channels: None,
                        groups: g,
                        eps: EPS,
                        act,
                        output_scale_factor: 1.0,
                    };
                    ResnetBlock2D::new(vbb.pp("resnets").pp(j), rc)
                })
                .collect::<Result<Vec<_>>>()?;
            let us = if i + 1 < rev.len() {
                Some(Upsample2D::new(vbb.pp("upsamplers").pp(0), out_c, out_c)?)
            } else {
                None
            };
            up.push((resnets, us));
        }
        let first = c.block_out_channels[0];
        let norm_out = group_norm(g, first, EPS, vb.pp("conv_norm_out"))?;
        let conv_out = conv3(first, c.out_channels, vb.pp("conv_out"))?;
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out,
            conv_out,
            // diffusers' Encoder and Decoder end with nn.SiLU whatever act_fn says.
            act: Activation::Silu,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(xs)?;
        x = self.mid.forward(&x)?;
        for (resnets, us) in &self.up {
            for r in resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(u) = us {
                x = u.forward(&x, None)?;
            }
        }
        x = self.act.after_norm(&self.norm_out, &x)?;
        self.conv_out.forward(&x)
    }
}

/// A loaded `AutoencoderKL`.
#[derive(Debug)]
pub struct Vae {
    config: VaeConfig,
    dtype: DType,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    tiling: bool,
}

impl Vae {
    /// Loads `dir/config.json` and the weights of `dir` (a diffusers `vae/` folder).
    pub fn load(
        dir: &Path,
        device: &Device,
        dtype: DType,
    ) -> std::result::Result<Self, EngineError> {
        let cfg_file = dir.join("config.json");
        let config: VaeConfig = weights::read_json(&cfg_file)?;
        let bad = |field: &str, message: String| EngineError::Load {
            file: cfg_file.clone(),
            message: format!("field `{field}`: {message}"),
        };
        let act = Activation::parse(&config.act_fn).ok_or_else(|| {
            bad(
                "act_fn",
                format!("unsupported activation {:?}", config.act_fn),
            )
        })?;
        if config.block_out_channels.is_empty() {
            return Err(bad("block_out_channels", "empty".into()));
        }
        let g = config.norm_num_groups;
        if g == 0 || config.block_out_channels.iter().any(|c| c % g != 0) {
            return Err(bad(
                "norm_num_groups",
                format!("{g} does not divide every block_out_channels entry"),
            ));
        }
        for t in &config.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(bad(
                    "down_block_types",
                    format!("unsupported {t:?} (DownEncoderBlock2D)"),
                ));
            }
        }
        for t in &config.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(bad(
                    "up_block_types",
                    format!("unsupported {t:?} (UpDecoderBlock2D)"),
                ));
            }
        }
        if !(config.scaling_factor.is_finite() && config.scaling_factor != 0.0) {
            return Err(bad(
                "scaling_factor",
                format!("{} is not a usable scale", config.scaling_factor),
            ));
        }
        let file = super::hub::component_weights(dir, dtype == DType::F16)?;
        let vb = weights::open(&file, dtype, device)?;
        let build = || -> Result<Self> {
            let lc = config.latent_channels;
            let cfg = Conv2dConfig::default();
            let quant_conv = if config.use_quant_conv {
                Some(conv2d(2 * lc, 2 * lc, 1, cfg, vb.pp("quant_conv"))?)
            } else {
                None
            };
            let post_quant_conv = if config.use_post_quant_conv {
                Some(conv2d(lc, lc, 1, cfg, vb.pp("post_quant_conv"))?)
            } else {
                None
            };
            Ok(Self {
                encoder: Encoder::new(vb.pp("encoder"), &config, act)?,
                decoder: Decoder::new(vb.pp("decoder"), &config, act)?,
                quant_conv,
                post_quant_conv,
                dtype,
                config: config.clone(),
                tiling: false,
            })
        };
        build().map_err(|e| {
            let m = e.to_string();
            let prefix = format!("{}: ", file.display());
            EngineError::Load {
                file: file.clone(),
                message: m.strip_prefix(&prefix).unwrap_or(&m).to_string(),
            }
        })
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// `scaling_factor` of the config (0.18215 when absent).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// `shift_factor` of the config, if any.
    pub fn shift_factor(&self) -> Option<f64> {
        self.config.shift_factor
    }

    /// Tiled decoding and encoding as diffusers' `enable_tiling()`: inputs larger than one tile
    /// (`sample_size` pixels) are processed in overlapping tiles (25% overlap) blended linearly,
    /// which bounds peak memory; the result differs slightly from untiled processing, as in
    /// diffusers.
    pub fn set_tiling(&mut self, on: bool) {
        self.tiling = on;
    }

    /// Whether tiling is on (see [`Vae::set_tiling`]).
    pub fn tiling(&self) -> bool {
        self.tiling
    }

    /// Decodes denoised latents (B, latent_channels, h, w) into an image (B, 3, 8h, 8w) in
    /// [-1, 1] (not clamped), in the latents' dtype.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let in_dtype = latents.dtype();
        let mut z = (latents.to_dtype(self.dtype)? / self.config.scaling_factor)?;
        if let Some(shift) = self.config.shift_factor {
            z = (z + shift)?;
        }
        let decode = |z: &Tensor| -> Result<Tensor> {
            match &self.post_quant_conv {
                Some(p) => self.decoder.forward(&p.forward(z)?),
                None => self.decoder.forward(z),
            }
        };
        let (_, _, h, w) = z.dims4()?;
        let (sample_tile, latent_tile) = self.tile_sizes();
        let out = if self.tiling && (h > latent_tile || w > latent_tile) {
            tiled(&z, latent_tile, sample_tile, decode)?
        } else {
            decode(&z)?
        };
        out.to_dtype(in_dtype)
    }

    /// diffusers' tile sizes: (`sample_size`, `sample_size / 2^(levels - 1)`).
    fn tile_sizes(&self) -> (usize, usize) {
        let sample = match &self.config.sample_size {
            PerBlock::One(s) => *s,
            PerBlock::Each(v) => v.first().copied().unwrap_or(32),
        };
        let levels = self.config.block_out_channels.len().saturating_sub(1) as u32;
        (sample, (sample >> levels).max(1))
    }

    /// Encodes an image (B, 3, H, W) in [-1, 1] into scaled latents: the posterior mean, plus
    /// `std * noise` when `noise` (shaped like the latents) is given, minus `shift_factor`,
    /// times `scaling_factor`.
    pub fn encode(&self, image: &Tensor, noise: Option<&Tensor>) -> Result<Tensor> {
        let in_dtype = image.dtype();
        let encode = |x: &Tensor| -> Result<Tensor> {
            match &self.quant_conv {
                Some(q) => q.forward(&self.encoder.forward(x)?),
                None => self.encoder.forward(x),
            }
        };
        let x = image.to_dtype(self.dtype)?;
        let (_, _, ih, iw) = x.dims4()?;
        let (sample_tile, latent_tile) = self.tile_sizes();
        let h = if self.tiling && (ih > sample_tile || iw > sample_tile) {
            tiled(&x, sample_tile, latent_tile, encode)?
        } else {
            encode(&x)?
        };
        let lc = self.config.latent_channels;
        let mean = h.narrow(1, 0, lc)?;
        let mut z = match noise {
            Some(n) => {
                let logvar = h.narrow(1, lc, lc)?.clamp(-30f32, 20f32)?;
                let std = (logvar * 0.5)?.exp()?;
                (mean + (std * n.to_dtype(self.dtype)?)?)?
            }
            None => mean,
        };
        if let Some(shift) = self.config.shift_factor {
            z = (z - shift)?;
        }
        (z * self.config.scaling_factor)?.to_dtype(in_dtype)
    }
}

/// diffusers' `blend_v`/`blend_h` on dimension `dim` (2 or 3): the first `extent` rows of `b`
/// fade in from the last `extent` rows of `a`.
fn blend(a: &Tensor, b: &Tensor, extent: usize, dim: usize) -> Result<Tensor> {
    let e = extent.min(a.dim(dim)?).min(b.dim(dim)?);
    if e == 0 {
        return Ok(b.clone());
    }
    let wb: Vec<f32> = (0..e).map(|y| (y as f64 / e as f64) as f32).collect();
    let wa: Vec<f32> = (0..e).map(|y| (1.0 - y as f64 / e as f64) as f32).collect();
    let mut shape = [1usize; 4];
    shape[dim] = e;
    let wb = Tensor::from_vec(wb, &shape[..], b.device())?.to_dtype(b.dtype())?;
    let wa = Tensor::from_vec(wa, &shape[..], b.device())?.to_dtype(b.dtype())?;
    let a_tail = a.narrow(dim, a.dim(dim)? - e, e)?;
    let b_head = b.narrow(dim, 0, e)?;
    let head = (a_tail.broadcast_mul(&wa)? + b_head.broadcast_mul(&wb)?)?;
    let rest = b.dim(dim)? - e;
    if rest == 0 {
        Ok(head)
    } else {
        Tensor::cat(&[&head, &b.narrow(dim, e, rest)?], dim)
    }
}

/// diffusers' `tiled_decode`/`tiled_encode`: `f` maps tiles of `tile_in` to tiles of
/// `tile_out`; tiles start every `tile_in * 3/4`, are blended over `tile_out / 4` and cropped
/// to `tile_out - blend`.
fn tiled(
    x: &Tensor,
    tile_in: usize,
    tile_out: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    let overlap = ((tile_in as f64 * 0.75) as usize).max(1);
    let blend_extent = (tile_out as f64 * 0.25) as usize;
    let row_limit = tile_out - blend_extent;
    let mut rows: Vec<Vec<Tensor>> = Vec::new();
    for i in (0..h).step_by(overlap) {
        let mut row = Vec::new();
        for j in (0..w).step_by(overlap) {
            let tile = x
                .narrow(2, i, tile_in.min(h - i))?
                .narrow(3, j, tile_in.min(w - j))?;
            row.push(f(&tile)?);
        }
        rows.push(row);
    }
    // Blend in place, in order, as diffusers does (later tiles blend against blended ones).
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            let mut tile = rows[i][j].clone();
            if i > 0 {
                tile = blend(&rows[i - 1][j], &tile, blend_extent, 2)?;
            }
            if j > 0 {
                tile = blend(&rows[i][j - 1], &tile, blend_extent, 3)?;
            }
            rows[i][j] = tile;
        }
    }
    let mut out_rows = Vec::with_capacity(rows.len());
    for row in &rows {
        let cropped = row
            .iter()
            .map(|t| {
                let (_, _, th, tw) = t.dims4()?;
                t.narrow(2, 0, row_limit.min(th))?
                    .narrow(3, 0, row_limit.min(tw))
            })
            .collect::<Result<Vec<_>>>()?;
        out_rows.push(Tensor::cat(&cropped, 3)?);
    }
    Tensor::cat(&out_rows, 2)
}

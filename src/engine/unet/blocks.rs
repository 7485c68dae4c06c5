//! Building blocks shared by the UNet and the VAE, built as diffusers builds them:
//! `ResnetBlock2D`, `Downsample2D`, `Upsample2D`, `Attention`, `Transformer2DModel`
//! (with `BasicTransformerBlock` and a GEGLU feed-forward), and the sinusoidal `Timesteps`
//! with its `TimestepEmbedding`.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{layer_norm, Conv2dConfig, LayerNorm, VarBuilder};

use crate::engine::ops::{self, conv2d, group_norm, linear, linear_b, Conv2d, GroupNorm, Linear};

/// An activation function named by a diffusers config (`act_fn`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `silu` / `swish`.
    Silu,
    /// `gelu` (exact, erf based).
    Gelu,
    /// `relu`.
    Relu,
    /// `mish`.
    Mish,
}

impl Activation {
    /// Parses a diffusers activation name; `None` when unknown.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "relu" => Some(Self::Relu),
            "mish" => Some(Self::Mish),
            _ => None,
        }
    }

    /// `act(norm(xs))`, fused into one pass for SiLU.
    pub fn after_norm(&self, norm: &GroupNorm, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => norm.forward_silu(xs),
            _ => self.apply(&norm.forward(xs)?),
        }
    }

    /// Applies the activation.
    pub fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => candle_nn::ops::silu(xs),
            Self::Gelu => xs.gelu_erf(),
            Self::Relu => xs.relu(),
            Self::Mish => {
                // x * tanh(softplus(x)), softplus(x) = ln(1 + e^x)
                let sp = (xs.exp()? + 1.0)?.log()?;
                xs * sp.tanh()?
            }
        }
    }
}

fn conv(
    in_c: usize,
    out_c: usize,
    k: usize,
    stride: usize,
    padding: usize,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding,
        stride,
        ..Default::default()
    };
    conv2d(in_c, out_c, k, cfg, vb)
}

/// diffusers' `ResnetBlock2D` (`resnet_time_scale_shift = "default"`).
#[derive(Debug)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    act: Activation,
    output_scale_factor: f64,
}

/// Settings of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Width of the time embedding, `None` for the VAE.
    pub temb_channels: Option<usize>,
    /// Group count of both group norms.
    pub groups: usize,
    /// Epsilon of both group norms.
    pub eps: f64,
    /// Non-linearity.
    pub act: Activation,
    /// The output is divided by this.
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Builds the block from `vb` (`norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`).
    pub fn new(vb: VarBuilder, c: ResnetConfig) -> Result<Self> {
        let norm1 = group_norm(c.groups, c.in_channels, c.eps, vb.pp("norm1"))?;
        let conv1 = conv(c.in_channels, c.out_channels, 3, 1, 1, vb.pp("conv1"))?;
        let time_emb_proj = match c.temb_channels {
            Some(t) => Some(linear(t, c.out_channels, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let norm2 = group_norm(c.groups, c.out_channels, c.eps, vb.pp("norm2"))?;
        let conv2 = conv(c.out_channels, c.out_channels, 3, 1, 1, vb.pp("conv2"))?;
        let conv_shortcut = if c.in_channels != c.out_channels {
            Some(conv(
                c.in_channels,
                c.out_channels,
                1,
                1,
                0,
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            act: c.act,
            output_scale_factor: c.output_scale_factor,
        })
    }

    /// Runs the block on `xs` (NCHW) with the optional time embedding `temb` (B, T).
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.act.after_norm(&self.norm1, xs)?;
        h = self.conv1.forward(&h)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj
                .forward(&self.act.apply(temb)?)?
                .unsqueeze(2)?
                .unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        h = self.act.after_norm(&self.norm2, &h)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(xs)?,
            None => xs.clone(),
        };
        let out = self.conv2.forward_add(&h, &shortcut)?;
        if self.output_scale_factor != 1.0 {
            out / self.output_scale_factor
        } else {
            Ok(out)
        }
    }
}

/// diffusers' `Downsample2D` with a convolution (stride 2); padding 0 pads right/bottom by one.
#[derive(Debug)]
pub struct Downsample2D {
    conv: Conv2d,
    padding: usize,
}

impl Downsample2D {
    /// Builds `conv` from `vb` (the caller passes `downsamplers.0`).
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        Ok(Self {
            conv: conv(in_channels, out_channels, 3, 2, padding, vb.pp("conv"))?,
            padding,
        })
    }

    /// Halves the spatial size.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let xs = xs
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// diffusers' `Upsample2D` with a convolution: nearest neighbour then a 3x3 conv.
#[derive(Debug)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    /// Builds `conv` from `vb` (the caller passes `upsamplers.0`).
    pub fn new(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv(in_channels, out_channels, 3, 1, 1, vb.pp("conv"))?,
        })
    }

    /// Upsamples to `size` (H, W) when given, else doubles the spatial size.
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let xs = xs.upsample_nearest2d(th, tw)?;
        self.conv.forward(&xs)
    }
}

/// Scaled dot-product attention over (B, heads, N, d) tensors, softmax in f32, optionally in
/// chunks of `slice` query rows.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    slice: Option<usize>,
) -> Result<Tensor> {
    let dtype = q.dtype();
    let kt = k.to_dtype(DType::F32)?.t()?.contiguous()?;
    let v32 = v.to_dtype(DType::F32)?.contiguous()?;
    let one = |q: &Tensor| -> Result<Tensor> {
        let q = q.to_dtype(DType::F32)?.contiguous()?;
        let scores = (q.matmul(&kt)? * scale)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        probs.matmul(&v32)
    };
    let n = q.dim(2)?;
    let out = match slice {
        Some(s) if s > 0 && s < n => {
            let mut parts = Vec::with_capacity(n.div_ceil(s));
            let mut start = 0;
            while start < n {
                let len = s.min(n - start);
                parts.push(one(&q.narrow(2, start, len)?)?);
                start += len;
            }
            Tensor::cat(&parts, 2)?
        }
        _ => one(q)?,
    };
    out.to_dtype(dtype)
}

/// diffusers' `Attention` (`to_q`, `to_k`, `to_v`, `to_out.0`) on (B, N, C) sequences.
#[derive(Debug)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

impl Attention {
    /// `query_dim` → `heads * dim_head`; keys/values from `cross_dim` (or `query_dim`);
    /// `bias` for the q/k/v projections, `to_out.0` always has one.
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        cross_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        bias: bool,
    ) -> Result<Self> {
        let inner = heads * dim_head;
        let kv_dim = cross_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: linear_b(query_dim, inner, bias, vb.pp("to_q"))?,
            to_k: linear_b(kv_dim, inner, bias, vb.pp("to_k"))?,
            to_v: linear_b(kv_dim, inner, bias, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            scale: 1.0 / (dim_head as f64).sqrt(),
        })
    }

    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        xs.reshape((b, n, self.heads, c / self.heads))?
            .transpose(1, 2)
    }

    /// Attends `xs` (B, N, C) to `context` (B, M, C') or to itself.
    pub fn forward(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        slice: Option<usize>,
    ) -> Result<Tensor> {
        self.forward_residual(xs, context, slice, None)
    }

    /// [`Attention::forward`] plus `residual` (B, N, query_dim), added by the output projection.
    pub fn forward_residual(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        slice: Option<usize>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let project = |out: &Tensor| match residual {
            Some(r) => self.to_out.forward_add(out, r),
            None => self.to_out.forward(out),
        };
        let ctx = context.unwrap_or(xs);
        let (q, k, v) = (
            self.to_q.forward(xs)?,
            self.to_k.forward(ctx)?,
            self.to_v.forward(ctx)?,
        );
        // On the CPU in f32: blocked attention, never the full score matrix (slicing moot).
        if let Some(out) = ops::attention(&q, &k, &v, self.heads, self.scale)? {
            return project(&out);
        }
        let (q, k, v) = (
            self.split_heads(&q)?,
            self.split_heads(&k)?,
            self.split_heads(&v)?,
        );
        let out = attention(&q, &k, &v, self.scale, slice)?;
        let (b, h, n, d) = out.dims4()?;
        let out = out.transpose(1, 2)?.reshape((b, n, h * d))?;
        project(&out)
    }
}

/// GEGLU feed-forward (`net.0.proj`, `net.2`).
#[derive(Debug)]
struct FeedForward {
    proj: Linear,
    out: Linear,
}

impl FeedForward {
    fn new(vb: VarBuilder, dim: usize, mult: usize) -> Result<Self> {
        let inner = dim * mult;
        let vb = vb.pp("net");
        Ok(Self {
            proj: linear(dim, inner * 2, vb.pp("0").pp("proj"))?,
            out: linear(inner, dim, vb.pp("2"))?,
        })
    }

    /// `out(geglu(proj(xs))) + residual`.
    fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        let h = ops::geglu(&self.proj.forward(xs)?)?;
        self.out.forward_add(&h, residual)
    }
}

/// diffusers' `BasicTransformerBlock` (layer norms, self attention, cross attention, GEGLU).
#[derive(Debug)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    only_cross_attention: bool,
}

impl BasicTransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_dim: usize,
        only_cross: bool,
    ) -> Result<Self> {
        let attn1_cross = if only_cross { Some(cross_dim) } else { None };
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, attn1_cross, heads, dim_head, false)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(vb.pp("attn2"), dim, Some(cross_dim), heads, dim_head, false)?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim, 4)?,
            only_cross_attention: only_cross,
        })
    }

    fn forward(&self, xs: &Tensor, context: &Tensor, slice: Option<usize>) -> Result<Tensor> {
        let ctx1 = if self.only_cross_attention {
            Some(context)
        } else {
            None
        };
        let xs = self
            .attn1
            .forward_residual(&self.norm1.forward(xs)?, ctx1, slice, Some(xs))?;
        let xs = self.attn2.forward_residual(
            &self.norm2.forward(&xs)?,
            Some(context),
            slice,
            Some(&xs),
        )?;
        self.ff.forward_add(&self.norm3.forward(&xs)?, &xs)
    }
}

/// Settings of a [`Transformer2D`].
#[derive(Debug, Clone, Copy)]
pub struct TransformerConfig {
    /// Channels in and out.
    pub in_channels: usize,
    /// Attention heads.
    pub heads: usize,
    /// Width of one head.
    pub dim_head: usize,
    /// Number of `BasicTransformerBlock`s.
    pub layers: usize,
    /// Width of the text states.
    pub cross_attention_dim: usize,
    /// Groups of the input group norm (eps 1e-6).
    pub groups: usize,
    /// `proj_in`/`proj_out` as linear layers rather than 1x1 convolutions.
    pub use_linear_projection: bool,
    /// attn1 attends to the text states too.
    pub only_cross_attention: bool,
}

#[derive(Debug)]
enum Proj {
    Linear(Linear),
    Conv(Conv2d),
}

/// diffusers' `Transformer2DModel` for continuous (image) inputs.
#[derive(Debug)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    /// Builds the model from `vb` (`norm`, `proj_in`, `transformer_blocks.N`, `proj_out`).
    pub fn new(vb: VarBuilder, c: TransformerConfig) -> Result<Self> {
        let inner = c.heads * c.dim_head;
        let norm = group_norm(c.groups, c.in_channels, 1e-6, vb.pp("norm"))?;
        let (proj_in, proj_out) = if c.use_linear_projection {
            (
                Proj::Linear(linear(c.in_channels, inner, vb.pp("proj_in"))?),
                Proj::Linear(linear(inner, c.in_channels, vb.pp("proj_out"))?),
            )
        } else {
            (
                Proj::Conv(conv(c.in_channels, inner, 1, 1, 0, vb.pp("proj_in"))?),
                Proj::Conv(conv(inner, c.in_channels, 1, 1, 0, vb.pp("proj_out"))?),
            )
        };
        let blocks = (0..c.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    inner,
                    c.heads,
                    c.dim_head,
                    c.cross_attention_dim,
                    c.only_cross_attention,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out,
        })
    }

    /// Runs the transformer on `xs` (NCHW) with text states `context` (B, M, C').
    pub fn forward(&self, xs: &Tensor, context: &Tensor, slice: Option<usize>) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let residual = xs;
        let xs = self.norm.forward(xs)?;
        let to_seq = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(1)?;
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))
        };
        let mut hs = match &self.proj_in {
            Proj::Conv(p) => to_seq(p.forward(&xs)?)?,
            Proj::Linear(p) => p.forward(&to_seq(xs)?)?,
        };
        for block in &self.blocks {
            hs = block.forward(&hs, context, slice)?;
        }
        let from_seq = |t: Tensor| -> Result<Tensor> {
            let ch = t.dim(2)?;
            t.reshape((b, h, w, ch))?
                .permute((0, 3, 1, 2))?
                .contiguous()
        };
        let out = match &self.proj_out {
            Proj::Conv(p) => p.forward_add(&from_seq(hs)?, residual)?,
            Proj::Linear(p) => (from_seq(p.forward(&hs)?)? + residual)?,
        };
        debug_assert_eq!(out.dim(1)?, c);
        Ok(out)
    }
}

/// diffusers' `get_timestep_embedding`: sinusoidal features of float timesteps `t` (N,),
/// computed in f32 and returned as (N, dim).
pub fn timestep_embedding(
    t: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let denom = half as f32 - freq_shift as f32;
    let ln = (10000f64).ln() as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-ln * i as f32) / denom).exp())
        .collect();
    let mut data = Vec::with_capacity(t.len() * dim);
    for &ti in t {
        let ti = ti as f32;
        let args: Vec<f32> = freqs.iter().map(|f| ti * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            data.extend(cos.chain(sin));
        } else {
            data.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Tensor::from_vec(data, (t.len(), dim), device)
}

/// diffusers' `TimestepEmbedding`: `linear_1`, activation, `linear_2`.
#[derive(Debug)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    act: Activation,
}

impl TimestepEmbedding {
    /// `in_dim` → `out_dim` → `out_dim`.
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize, act: Activation) -> Result<Self> {
        Ok(Self {
            linear_1: linear(in_dim, out_dim, vb.pp("linear_1"))?,
            linear_2: linear(out_dim, out_dim, vb.pp("linear_2"))?,
            act,
        })
    }

    /// Embeds (B, in_dim) features.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2
            .forward(&self.act.apply(&self.linear_1.forward(xs)?)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestep_embedding_matches_the_formula() {
        // dim 6, half 3: freqs exp(-ln(1e4) * i / (3 - shift)).
        for (flip, shift) in [(true, 0.0), (false, 1.0)] {
            let t = 621.5;
            let e = timestep_embedding(&[t, 0.0], 7, flip, shift, &Device::Cpu).unwrap();
            assert_eq!(e.dims(), &[2, 7]);
            let rows: Vec<Vec<f32>> = e.to_vec2().unwrap();
            for i in 0..3 {
                let f = (-(10000f64.ln()) * i as f64 / (3.0 - shift)).exp();
                let (s, c) = ((t * f).sin() as f32, (t * f).cos() as f32);
                let (first, second) = if flip { (c, s) } else { (s, c) };
                assert!((rows[0][i] - first).abs() < 2e-4, "{i}");
                assert!((rows[0][3 + i] - second).abs() < 2e-4, "{i}");
            }
            assert_eq!(rows[0][6], 0.0, "odd dims are zero padded");
        }
    }

    #[test]
    fn sliced_attention_equals_full_attention() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 37, 8), &dev).unwrap();
        let k = Tensor::randn(0f32, 1.0, (2, 3, 11, 8), &dev).unwrap();
        let v = Tensor::randn(0f32, 1.0, (2, 3, 11, 8), &dev).unwrap();
        let full = attention(&q, &k, &v, 0.35, None).unwrap();
        for s in [1, 5, 36, 37, 100] {
            let sliced = attention(&q, &k, &v, 0.35, Some(s)).unwrap();
            let d = crate::engine::max_abs_diff(&full, &sliced);
            assert!(d < 1e-6, "slice {s}: {d}");
        }
    }
}

//! diffusers' `UNet2DConditionModel` (SD 1.x/2.x and SDXL base/refiner), built from candle-nn
//! layers with every shape read from `unet/config.json`.

pub mod blocks;
pub mod config;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use std::path::Path;

use crate::engine::ops::{conv2d, group_norm, Conv2d, GroupNorm};
use crate::engine::{weights, EngineError};
use blocks::{
    Activation, Downsample2D, ResnetBlock2D, ResnetConfig, TimestepEmbedding, Transformer2D,
    TransformerConfig, Upsample2D,
};
pub use config::{PerBlock, UNetConfig};

/// SDXL's extra conditioning (`addition_embed_type: text_time`).
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// Pooled text embeddings, (B, pooled).
    pub text_embeds: Tensor,
    /// Size/crop (and aesthetic score) ids: (B, 6) for the base, (B, 5) for the refiner.
    pub time_ids: Tensor,
}

#[derive(Debug)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Downsample2D>,
}

#[derive(Debug)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Upsample2D>,
}

#[derive(Debug)]
struct MidBlock {
    resnet0: ResnetBlock2D,
    layers: Vec<(Transformer2D, ResnetBlock2D)>,
}

/// A loaded UNet.
#[derive(Debug)]
pub struct UNet {
    config: UNetConfig,
    dtype: DType,
    device: Device,
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    timestep_post_act: Option<Activation>,
    time_embedding_act: Option<Activation>,
    add_embedding: Option<(TimestepEmbedding, usize, usize)>,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    up: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    act: Activation,
    attention_slice: Option<usize>,
}

fn conv_k(in_c: usize, out_c: usize, k: usize, vb: VarBuilder) -> Result<Conv2d> {
    conv2d(
        in_c,
        out_c,
        k,
        Conv2dConfig {
            padding: (k - 1) / 2,
            ..Default::default()
        },
        vb,
    )
}

impl UNet {
    /// Loads `dir/config.json` and the weights of `dir` (a diffusers `unet/` folder).
    pub fn load(
        dir: &Path,
        device: &Device,
        dtype: DType,
    ) -> std::result::Result<Self, EngineError> {
        let cfg_file = dir.join("config.json");
        let text = std::fs::read_to_string(&cfg_file).map_err(|e| EngineError::Load {
            file: cfg_file.clone(),
            message: e.to_string(),
        })?;
        let config = UNetConfig::from_json(&text, &cfg_file)?;
        let file = crate::engine::hub::component_weights(dir, dtype == DType::F16)?;
        let vb = weights::open(&file, dtype, device)?;
        Self::build(config, &cfg_file, vb).map_err(|e| match e {
            // The VarBuilder's messages already name the file and the tensor.
            candle_core::Error::Msg(m) => EngineError::Load {
                file: file.clone(),
                message: strip_file(&m, &file),
            },
            other => EngineError::Load {
                file: file.clone(),
                message: other.to_string(),
            },
        })
    }

    /// Builds the model from a parsed config and a `VarBuilder` over its weights.
    pub fn build(
        config: UNetConfig,
        cfg_file: &Path,
        vb: VarBuilder,
    ) -> std::result::Result<Self, candle_core::Error> {
        let r = config
            .resolve(cfg_file)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let boc = &config.block_out_channels;
        let n = boc.len();
        let groups = config.norm_num_groups;
        let eps = config.norm_eps;
        let c0 = boc[0];
        let time_dim = config.time_embedding_dim.unwrap_or(c0 * 4);
        let conv_in = conv_k(
            config.in_channels,
            c0,
            config.conv_in_kernel,
            vb.pp("conv_in"),
        )?;
        let time_embedding = TimestepEmbedding::new(vb.pp("time_embedding"), c0, time_dim, r.act)?;
        let add_embedding = match r.text_time {
            Some((tdim, pdim)) => Some((
                TimestepEmbedding::new(vb.pp("add_embedding"), pdim, time_dim, r.act)?,
                tdim,
                pdim,
            )),
            None => None,
        };
        let resnet = |vb: VarBuilder, i: usize, o: usize, scale: f64| {
            ResnetBlock2D::new(
                vb,
                ResnetConfig {
                    in_channels: i,
                    out_channels: o,
                    temb_channels: Some(time_dim),
                    groups,
                    eps,
                    act: r.act,
                    output_scale_factor: scale,
                },
            )
        };
        let transformer = |vb: VarBuilder,
                           ch: usize,
                           heads: usize,
                           layers: usize,
                           cross: usize,
                           only_cross: bool| {
            Transformer2D::new(
                vb,
                TransformerConfig {
                    in_channels: ch,
                    heads,
                    dim_head: ch / heads,
                    layers,
                    cross_attention_dim: cross,
                    groups,
                    use_linear_projection: config.use_linear_projection,
                    only_cross_attention: only_cross,
                },
            )
        };
        let rs = config.resnet_out_scale_factor;

        let mut down = Vec::with_capacity(n);
        let mut out_c = c0;
        for (i, &block_c) in boc.iter().enumerate() {
            let vbb = vb.pp("down_blocks").pp(i);
            let in_c = out_c;
            out_c = block_c;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..r.layers[i] {
                resnets.push(resnet(
                    vbb.pp("resnets").pp(j),
                    if j == 0 { in_c } else { out_c },
                    out_c,
                    rs,
                )?);
                if r.down_attn[i] {
                    attentions.push(transformer(
                        vbb.pp("attentions").pp(j),
                        out_c,
                        r.heads[i],
                        r.down_tl[i][j],
                        r.cross[i],
                        r.only_cross[i],
                    )?);
                }
            }
            let downsample = if i + 1 < n {
                Some(Downsample2D::new(
                    vbb.pp("downsamplers").pp(0),
                    out_c,
                    out_c,
                    config.downsample_padding,
                )?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                attentions,
                downsample,
            });
        }

        let mid = if r.mid {
            let vbm = vb.pp("mid_block");
            let ch = boc[n - 1];
            let scale = config.mid_block_scale_factor;
            let resnet0 = resnet(vbm.pp("resnets").pp(0), ch, ch, scale)?;
            let tl = r.down_tl[n - 1].first().copied().unwrap_or(1);
            let t = transformer(
                vbm.pp("attentions").pp(0),
                ch,
                r.heads[n - 1],
                tl,
                r.cross[n - 1],
                false,
            )?;
            let r1 = resnet(vbm.pp("resnets").pp(1), ch, ch, scale)?;
            Some(MidBlock {
                resnet0,
                layers: vec![(t, r1)],
            })
        } else {
            None
        };

        let rev_boc: Vec<usize> = boc.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = r.heads.iter().rev().copied().collect();
        let rev_cross: Vec<usize> = r.cross.iter().rev().copied().collect();
        let rev_only: Vec<bool> = r.only_cross.iter().rev().copied().collect();
        let mut up = Vec::with_capacity(n);
        let mut out_c = rev_boc[0];
        for i in 0..n {
            let vbb = vb.pp("up_blocks").pp(i);
            let prev_c = out_c;
            out_c = rev_boc[i];
            let in_c = rev_boc[(i + 1).min(n - 1)];
            let layers = r.layers[n - 1 - i] + 1;
            let mut resnets = Vec::new();
            let mut attentions = Vec::new();
            for j in 0..layers {
                let skip = if j + 1 == layers { in_c } else { out_c };
                let res_in = if j == 0 { prev_c } else { out_c };
                resnets.push(resnet(vbb.pp("resnets").pp(j), res_in + skip, out_c, rs)?);
                if r.up_attn[i] {
                    attentions.push(transformer(
                        vbb.pp("attentions").pp(j),
                        out_c,
                        rev_heads[i],
                        r.up_tl[i][j],
                        rev_cross[i],
                        rev_only[i],
                    )?);
                }
            }
            let upsample = if i + 1 < n {
                Some(Upsample2D::new(vbb.pp("upsamplers").pp(0), out_c, out_c)?)
            } else {
                None
            };
            up.push(UpBlock {
                resnets,
                attentions,
                upsample,
            });
        }

        let conv_norm_out = group_norm(groups, c0, eps, vb.pp("conv_norm_out"))?;
        let conv_out = conv_k(
            c0,
            config.out_channels,
            config.conv_out_kernel,
            vb.pp("conv_out"),
        )?;
        Ok(Self {
            dtype: vb.dtype(),
            device: vb.device().clone(),
            config,
            conv_in,
            time_embedding,
            timestep_post_act: r.timestep_post_act,
            time_embedding_act: r.time_embedding_act,
            add_embedding,
            down,
            mid,
            up,
            conv_norm_out,
            conv_out,
            act: r.act,
            attention_slice: None,
        })
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Computes attention in chunks of `slice` query rows (same result, lower peak memory);
    /// `None` computes it in one go.
    pub fn set_attention_slice(&mut self, slice: Option<usize>) {
        self.attention_slice = slice.filter(|&s| s > 0);
    }

    /// Predicts the noise (or v) for `sample` (B, C, H, W) at the float `timestep`, given text
    /// states (B, M, cross_attention_dim) and, for SDXL, the added conditioning.
    pub fn forward(
        &self,
        sample: &Tensor,
        timestep: f64,
        encoder_hidden_states: &Tensor,
        added: Option<&AddedCond>,
    ) -> Result<Tensor> {
        let in_dtype = sample.dtype();
        let (b, _, _, _) = sample.dims4()?;
        let mut x = sample.to_dtype(self.dtype)?;
        let ctx = encoder_hidden_states.to_dtype(self.dtype)?;
        if self.config.center_input_sample {
            x = ((x * 2.0)? - 1.0)?;
        }
        let slice = self.attention_slice;

        // Time embedding.
        let c0 = self.config.block_out_channels[0];
        let t = blocks::timestep_embedding(
            &[timestep],
            c0,
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
            &self.device,
        )?
        .to_dtype(self.dtype)?
        .broadcast_as((b, c0))?
        .contiguous()?;
        let mut emb = self.time_embedding.forward(&t)?;
        if let Some(a) = self.timestep_post_act {
            emb = a.apply(&emb)?;
        }
        if let Some((add, tdim, pdim)) = &self.add_embedding {
            let added = added.ok_or_else(|| {
                candle_core::Error::Msg(
                    "this UNet (addition_embed_type text_time) needs text_embeds and time_ids"
                        .into(),
                )
            })?;
            let ids: Vec<f64> = added
                .time_ids
                .to_dtype(DType::F64)?
                .flatten_all()?
                .to_vec1()?;
            let (ib, _) = added.time_ids.dims2()?;
            let time_embeds = blocks::timestep_embedding(
                &ids,
                *tdim,
                self.config.flip_sin_to_cos,
                self.config.freq_shift,
                &self.device,
            )?
            .reshape((ib, ()))?
            .to_dtype(self.dtype)?;
            let text = added.text_embeds.to_dtype(self.dtype)?;
            let cat = Tensor::cat(&[&text, &time_embeds], 1)?;
            let got = cat.dim(1)?;
            if got != *pdim {
                return Err(candle_core::Error::Msg(format!(
                    "text_embeds ({}) + time_ids ({} x {tdim}) give {got} features, the UNet's projection_class_embeddings_input_dim is {pdim}",
                    text.dim(1)?,
                    added.time_ids.dim(1)?
                )));
            }
            emb = (emb + add.forward(&cat)?)?;
        }
        if let Some(a) = self.time_embedding_act {
            emb = a.apply(&emb)?;
        }

        // Down.
        x = self.conv_in.forward(&x)?;
        let mut skips = vec![x.clone()];
        for block in &self.down {
            for (j, resnet) in block.resnets.iter().enumerate() {
                x = resnet.forward(&x, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, &ctx, slice)?;
                }
                skips.push(x.clone());
            }
            if let Some(d) = &block.downsample {
                x = d.forward(&x)?;
                skips.push(x.clone());
            }
        }

        // Mid.
        if let Some(mid) = &self.mid {
            x = mid.resnet0.forward(&x, Some(&emb))?;
            for (attn, resnet) in &mid.layers {
                x = attn.forward(&x, &ctx, slice)?;
                x = resnet.forward(&x, Some(&emb))?;
            }
        }

        // Up.
        for block in &self.up {
            for (j, resnet) in block.resnets.iter().enumerate() {
                let skip = skips.pop().ok_or_else(|| {
                    candle_core::Error::Msg("UNet skip connections exhausted".into())
                })?;
                x = Tensor::cat(&[&x, &skip], 1)?;
                x = resnet.forward(&x, Some(&emb))?;
                if let Some(attn) = block.attentions.get(j) {
                    x = attn.forward(&x, &ctx, slice)?;
                }
            }
            if let Some(u) = &block.upsample {
                let size = match skips.last() {
                    Some(s) => {
                        let (_, _, h, w) = s.dims4()?;
                        Some((h, w))
                    }
                    None => None,
                };
                x = u.forward(&x, size)?;
            }
        }

        x = self.act.after_norm(&self.conv_norm_out, &x)?;
        self.conv_out.forward(&x)?.to_dtype(in_dtype)
    }
}

/// Drops a leading "FILE: " from a VarBuilder message, since the error names the file already.
fn strip_file(message: &str, file: &Path) -> String {
    let prefix = format!("{}: ", file.display());
    message.strip_prefix(&prefix).unwrap_or(message).to_string()
}

//! `unet/config.json` as diffusers' `UNet2DConditionModel` reads it, and its resolution into
//! per-block settings (with diffusers' quirks: `num_attention_heads` null means
//! `attention_head_dim` heads; up blocks use reversed lists).

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

use super::blocks::Activation;
use crate::engine::EngineError;

/// A config value given once for all blocks or once per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// One value per block.
    Each(Vec<T>),
    /// The same value for every block.
    One(T),
}

impl<T: Clone> PerBlock<T> {
    /// The per-block list for `n` blocks, or `None` when a list has another length.
    pub fn expand(&self, n: usize) -> Option<Vec<T>> {
        match self {
            Self::One(v) => Some(vec![v.clone(); n]),
            Self::Each(v) if v.len() == n => Some(v.clone()),
            Self::Each(_) => None,
        }
    }
}

/// The fields of a diffusers `UNet2DConditionModel` config, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub sample_size: Option<usize>,
    pub center_input_sample: bool,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub layers_per_block: PerBlock<usize>,
    pub attention_head_dim: PerBlock<usize>,
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub transformer_layers_per_block: PerBlock<PerBlock<usize>>,
    pub reverse_transformer_layers_per_block: Option<Vec<PerBlock<usize>>>,
    pub cross_attention_dim: PerBlock<usize>,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub act_fn: String,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: PerBlock<bool>,
    pub mid_block_only_cross_attention: Option<bool>,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub mid_block_scale_factor: f64,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub addition_time_embed_dim: Option<usize>,
    pub projection_class_embeddings_input_dim: Option<usize>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
}

fn get<T: serde::de::DeserializeOwned>(
    obj: &serde_json::Map<String, Value>,
    file: &Path,
    name: &str,
    default: T,
) -> Result<T, EngineError> {
    match obj.get(name) {
        None => Ok(default),
        Some(v) => serde_json::from_value(v.clone()).map_err(|e| EngineError::Load {
            file: file.to_path_buf(),
            message: format!("field `{name}`: {e} (got {v})"),
        }),
    }
}

/// Fields whose only supported value is their default (null, false, "default", ...).
const MUST_BE: &[(&str, &str)] = &[
    ("num_class_embeds", "null"),
    ("encoder_hid_dim", "null"),
    ("encoder_hid_dim_type", "null"),
    ("dual_cross_attention", "false"),
    ("resnet_skip_time_act", "false"),
    ("cross_attention_norm", "null"),
    ("attention_type", "\"default\""),
    ("class_embeddings_concat", "false"),
];

impl UNetConfig {
    /// Parses `config.json` text; `file` names it in errors.
    pub fn from_json(text: &str, file: &Path) -> Result<Self, EngineError> {
        let value: Value = serde_json::from_str(text).map_err(|e| EngineError::Load {
            file: file.to_path_buf(),
            message: format!("bad JSON: {e}"),
        })?;
        let Value::Object(o) = value else {
            return Err(EngineError::Load {
                file: file.to_path_buf(),
                message: "not a JSON object".into(),
            });
        };
        for (name, allowed) in MUST_BE {
            if let Some(v) = o.get(*name) {
                let ok = match *allowed {
                    "null" => v.is_null(),
                    "false" => v.is_null() || v.as_bool() == Some(false),
                    other => v.is_null() || v.as_str() == Some(other.trim_matches('"')),
                };
                if !ok {
                    return Err(EngineError::Load {
                        file: file.to_path_buf(),
                        message: format!(
                            "field `{name}`: unsupported value {v} (only {allowed} is supported)"
                        ),
                    });
                }
            }
        }
        let f = file;
        let c = UNetConfig {
            in_channels: get(&o, f, "in_channels", 4)?,
            out_channels: get(&o, f, "out_channels", 4)?,
            sample_size: get(&o, f, "sample_size", None)?,
            center_input_sample: get(&o, f, "center_input_sample", false)?,
            block_out_channels: get(&o, f, "block_out_channels", vec![320, 640, 1280, 1280])?,
            down_block_types: get(
                &o,
                f,
                "down_block_types",
                [
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "CrossAttnDownBlock2D",
                    "DownBlock2D",
                ]
                .map(String::from)
                .to_vec(),
            )?,
            up_block_types: get(
                &o,
                f,
                "up_block_types",
                [
                    "UpBlock2D",
                    "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D",
                ]
                .map(String::from)
                .to_vec(),
            )?,
            mid_block_type: get(
                &o,
                f,
                "mid_block_type",
                Some("UNetMidBlock2DCrossAttn".to_string()),
            )?,
            layers_per_block: get(&o, f, "layers_per_block", PerBlock::One(2))?,
            attention_head_dim: get(&o, f, "attention_head_dim", PerBlock::One(8))?,
            num_attention_heads: get(&o, f, "num_attention_heads", None)?,
            transformer_layers_per_block: get(
                &o,
                f,
                "transformer_layers_per_block",
                PerBlock::One(PerBlock::One(1)),
            )?,
            reverse_transformer_layers_per_block: get(
                &o,
                f,
                "reverse_transformer_layers_per_block",
                None,
            )?,
            cross_attention_dim: get(&o, f, "cross_attention_dim", PerBlock::One(1280))?,
            norm_num_groups: get(&o, f, "norm_num_groups", 32)?,
            norm_eps: get(&o, f, "norm_eps", 1e-5)?,
            act_fn: get(&o, f, "act_fn", "silu".to_string())?,
            flip_sin_to_cos: get(&o, f, "flip_sin_to_cos", true)?,
            freq_shift: get(&o, f, "freq_shift", 0.0)?,
            downsample_padding: get(&o, f, "downsample_padding", 1)?,
            use_linear_projection: get(&o, f, "use_linear_projection", false)?,
            only_cross_attention: get(&o, f, "only_cross_attention", PerBlock::One(false))?,
            mid_block_only_cross_attention: get(&o, f, "mid_block_only_cross_attention", None)?,
            upcast_attention: get::<Option<bool>>(&o, f, "upcast_attention", None)?
                .unwrap_or(false),
            resnet_time_scale_shift: get(&o, f, "resnet_time_scale_shift", "default".to_string())?,
            resnet_out_scale_factor: get(&o, f, "resnet_out_scale_factor", 1.0)?,
            time_embedding_type: get(&o, f, "time_embedding_type", "positional".to_string())?,
            time_embedding_dim: get(&o, f, "time_embedding_dim", None)?,
            time_embedding_act_fn: get(&o, f, "time_embedding_act_fn", None)?,
            timestep_post_act: get(&o, f, "timestep_post_act", None)?,
            mid_block_scale_factor: get(&o, f, "mid_block_scale_factor", 1.0)?,
            class_embed_type: get(&o, f, "class_embed_type", None)?,
            addition_embed_type: get(&o, f, "addition_embed_type", None)?,
            addition_time_embed_dim: get(&o, f, "addition_time_embed_dim", None)?,
            projection_class_embeddings_input_dim: get(
                &o,
                f,
                "projection_class_embeddings_input_dim",
                None,
            )?,
            time_cond_proj_dim: get(&o, f, "time_cond_proj_dim", None)?,
            conv_in_kernel: get(&o, f, "conv_in_kernel", 3)?,
            conv_out_kernel: get(&o, f, "conv_out_kernel", 3)?,
        };
        c.resolve(file)?;
        Ok(c)
    }

    /// Checks every field and computes the per-block settings.
    pub(crate) fn resolve(&self, file: &Path) -> Result<Resolved, EngineError> {
        let bad = |field: &str, msg: String| EngineError::Load {
            file: file.to_path_buf(),
            message: format!("field `{field}`: {msg}"),
        };
        let n = self.down_block_types.len();
        if n == 0 {
            return Err(bad("down_block_types", "empty".into()));
        }
        if self.block_out_channels.len() != n {
            return Err(bad(
                "block_out_channels",
                format!(
                    "has {} entries, down_block_types has {n}",
                    self.block_out_channels.len()
                ),
            ));
        }
        if self.up_block_types.len() != n {
            return Err(bad(
                "up_block_types",
                format!(
                    "has {} entries, down_block_types has {n}",
                    self.up_block_types.len()
                ),
            ));
        }
        let mut down_attn = Vec::with_capacity(n);
        for t in &self.down_block_types {
            down_attn.push(match t.as_str() {
                "CrossAttnDownBlock2D" => true,
                "DownBlock2D" => false,
                other => {
                    return Err(bad(
                        "down_block_types",
                        format!(
                            "unsupported block type {other:?} (CrossAttnDownBlock2D, DownBlock2D)"
                        ),
                    ))
                }
            });
        }
        let mut up_attn = Vec::with_capacity(n);
        for t in &self.up_block_types {
            up_attn.push(match t.as_str() {
                "CrossAttnUpBlock2D" => true,
                "UpBlock2D" => false,
                other => {
                    return Err(bad(
                        "up_block_types",
                        format!("unsupported block type {other:?} (CrossAttnUpBlock2D, UpBlock2D)"),
                    ))
                }
            });
        }
        let mid = match self.mid_block_type.as_deref() {
            None => false,
            Some("UNetMidBlock2DCrossAttn") => true,
            Some(other) => {
                return Err(bad(
                    "mid_block_type",
                    format!("unsupported {other:?} (UNetMidBlock2DCrossAttn or null)"),
                ))
            }
        };
        let per = |field: &str, v: &PerBlock<usize>| {
            v.expand(n).ok_or_else(|| {
                bad(
                    field,
                    format!("a list must have one entry per down block ({n})"),
                )
            })
        };
        let layers = per("layers_per_block", &self.layers_per_block)?;
        let head_dim = per("attention_head_dim", &self.attention_head_dim)?;
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
        let heads = match &self.num_attention_heads {
            Some(h) => per("num_attention_heads", h)?,
            None => head_dim.clone(),
        };
        if heads.contains(&0) {
            return Err(bad("num_attention_heads", "zero heads".into()));
        }
        let cross = per("cross_attention_dim", &self.cross_attention_dim)?;
        let only_cross = self.only_cross_attention.expand(n).ok_or_else(|| {
            bad(
                "only_cross_attention",
                format!("a list must have one entry per down block ({n})"),
            )
        })?;
        let tl = self.transformer_layers_per_block.expand(n).ok_or_else(|| {
            bad(
                "transformer_layers_per_block",
                format!("a list must have one entry per down block ({n})"),
            )
        })?;
        let down_tl = tl
            .iter()
            .zip(&layers)
            .map(|(t, &l)| {
                t.expand(l).ok_or_else(|| {
                    bad(
                        "transformer_layers_per_block",
                        format!("a nested list must have layers_per_block ({l}) entries"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let up_layers: Vec<usize> = layers.iter().rev().map(|l| l + 1).collect();
        let rev_tl: Vec<PerBlock<usize>> = match &self.reverse_transformer_layers_per_block {
            Some(r) if r.len() == n => r.clone(),
            Some(_) => {
                return Err(bad(
                    "reverse_transformer_layers_per_block",
                    format!("must have one entry per up block ({n})"),
                ))
            }
            None => {
                if tl.iter().any(|t| matches!(t, PerBlock::Each(_))) && up_attn.iter().any(|&a| a) {
                    return Err(bad(
                        "reverse_transformer_layers_per_block",
                        "required when transformer_layers_per_block is nested".into(),
                    ));
                }
                tl.iter().rev().cloned().collect()
            }
        };
        let up_tl = rev_tl
            .iter()
            .zip(&up_layers)
            .map(|(t, &l)| {
                t.expand(l).ok_or_else(|| {
                    bad(
                        "reverse_transformer_layers_per_block",
                        format!("a nested list must have {l} entries"),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let act = Activation::parse(&self.act_fn).ok_or_else(|| {
            bad(
                "act_fn",
                format!("unsupported activation {:?}", self.act_fn),
            )
        })?;
        let act_opt =
            |field: &str, v: &Option<String>| -> Result<Option<Activation>, EngineError> {
                match v {
                    None => Ok(None),
                    Some(s) => Activation::parse(s)
                        .map(Some)
                        .ok_or_else(|| bad(field, format!("unsupported activation {s:?}"))),
                }
            };
        let time_embedding_act = act_opt("time_embedding_act_fn", &self.time_embedding_act_fn)?;
        let timestep_post_act = act_opt("timestep_post_act", &self.timestep_post_act)?;
        if self.resnet_time_scale_shift != "default" {
            return Err(bad(
                "resnet_time_scale_shift",
                format!(
                    "unsupported {:?} (only \"default\")",
                    self.resnet_time_scale_shift
                ),
            ));
        }
        if self.time_embedding_type != "positional" {
            return Err(bad(
                "time_embedding_type",
                format!(
                    "unsupported {:?} (only \"positional\")",
                    self.time_embedding_type
                ),
            ));
        }
        if let Some(c) = &self.class_embed_type {
            return Err(bad(
                "class_embed_type",
                format!("unsupported {c:?} (only null)"),
            ));
        }
        if let Some(d) = self.time_cond_proj_dim {
            return Err(bad(
                "time_cond_proj_dim",
                format!("unsupported {d} (only null)"),
            ));
        }
        let text_time = match self.addition_embed_type.as_deref() {
            None => None,
            Some("text_time") => {
                let tdim = self.addition_time_embed_dim.ok_or_else(|| {
                    bad(
                        "addition_time_embed_dim",
                        "required by addition_embed_type text_time".into(),
                    )
                })?;
                let pdim = self.projection_class_embeddings_input_dim.ok_or_else(|| {
                    bad(
                        "projection_class_embeddings_input_dim",
                        "required by addition_embed_type text_time".into(),
                    )
                })?;
                Some((tdim, pdim))
            }
            Some(other) => {
                return Err(bad(
                    "addition_embed_type",
                    format!("unsupported {other:?} (null or \"text_time\")"),
                ))
            }
        };
        if self.norm_num_groups == 0
            || self
                .block_out_channels
                .iter()
                .any(|c| c % self.norm_num_groups != 0)
        {
            return Err(bad(
                "norm_num_groups",
                format!(
                    "{} does not divide every block_out_channels entry",
                    self.norm_num_groups
                ),
            ));
        }
        for (field, k) in [
            ("conv_in_kernel", self.conv_in_kernel),
            ("conv_out_kernel", self.conv_out_kernel),
        ] {
            if k.is_multiple_of(2) {
                return Err(bad(field, format!("{k}: kernels must be odd")));
            }
        }
        Ok(Resolved {
            down_attn,
            up_attn,
            mid,
            layers,
            heads,
            cross,
            only_cross,
            down_tl,
            up_tl,
            act,
            time_embedding_act,
            timestep_post_act,
            text_time,
        })
    }
}

/// Per-block settings derived from a [`UNetConfig`].
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub down_attn: Vec<bool>,
    pub up_attn: Vec<bool>,
    pub mid: bool,
    pub layers: Vec<usize>,
    pub heads: Vec<usize>,
    pub cross: Vec<usize>,
    pub only_cross: Vec<bool>,
    pub down_tl: Vec<Vec<usize>>,
    pub up_tl: Vec<Vec<usize>>,
    pub act: Activation,
    pub time_embedding_act: Option<Activation>,
    pub timestep_post_act: Option<Activation>,
    pub text_time: Option<(usize, usize)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<(UNetConfig, Resolved), EngineError> {
        let f = Path::new("unet/config.json");
        let c = UNetConfig::from_json(json, f)?;
        let r = c.resolve(f)?;
        Ok((c, r))
    }

    #[test]
    fn diffusers_defaults_are_sd15() {
        let (c, r) = parse("{}").unwrap();
        assert_eq!(c.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(r.heads, vec![8; 4]);
        assert_eq!(r.layers, vec![2; 4]);
        assert_eq!(r.cross, vec![1280; 4]);
        assert_eq!(r.down_attn, vec![true, true, true, false]);
        assert_eq!(r.up_attn, vec![false, true, true, true]);
        assert_eq!(r.up_tl, vec![vec![1; 3]; 4]);
        assert!(r.mid && r.text_time.is_none());
    }

    #[test]
    fn heads_come_from_attention_head_dim_when_num_attention_heads_is_null() {
        let (_, r) =
            parse(r#"{"attention_head_dim": [5, 10, 20, 20], "num_attention_heads": null}"#)
                .unwrap();
        assert_eq!(r.heads, vec![5, 10, 20, 20]);
        let (_, r) =
            parse(r#"{"attention_head_dim": 8, "num_attention_heads": [2, 4, 8, 8]}"#).unwrap();
        assert_eq!(r.heads, vec![2, 4, 8, 8]);
    }

    #[test]
    fn transformer_layers_per_block_int_list_and_nested() {
        let base = r#""down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "block_out_channels": [32, 64]"#;
        let (_, r) = parse(&format!(
            r#"{{{base}, "transformer_layers_per_block": [1, 3]}}"#
        ))
        .unwrap();
        assert_eq!(r.down_tl, vec![vec![1, 1], vec![3, 3]]);
        assert_eq!(r.up_tl, vec![vec![3, 3, 3], vec![1, 1, 1]]);
        // Nested without a reverse list: diffusers refuses too.
        let err = parse(&format!(
            r#"{{{base}, "transformer_layers_per_block": [[1, 1], [2, 3]]}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("reverse_transformer_layers_per_block"),
            "{err}"
        );
        let (_, r) = parse(&format!(
            r#"{{{base}, "transformer_layers_per_block": [[1, 1], [2, 3]], "reverse_transformer_layers_per_block": [[4, 5, 6], [1, 1, 1]]}}"#
        ))
        .unwrap();
        assert_eq!(r.down_tl, vec![vec![1, 1], vec![2, 3]]);
        assert_eq!(r.up_tl, vec![vec![4, 5, 6], vec![1, 1, 1]]);
    }

    #[test]
    fn text_time_needs_its_dims() {
        let err = parse(r#"{"addition_embed_type": "text_time", "addition_time_embed_dim": 256}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unet/config.json")
                && err.contains("projection_class_embeddings_input_dim"),
            "{err}"
        );
        let (_, r) = parse(r#"{"addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816}"#).unwrap();
        assert_eq!(r.text_time, Some((256, 2816)));
    }

    #[test]
    fn unsupported_values_name_the_field() {
        for (field, json) in [
            ("attention_type", r#"{"attention_type": "gated"}"#),
            (
                "encoder_hid_dim_type",
                r#"{"encoder_hid_dim_type": "text_proj"}"#,
            ),
            (
                "mid_block_type",
                r#"{"mid_block_type": "UNetMidBlock2DSimpleCrossAttn"}"#,
            ),
            (
                "time_embedding_type",
                r#"{"time_embedding_type": "fourier"}"#,
            ),
            ("act_fn", r#"{"act_fn": "tanh"}"#),
            ("norm_num_groups", r#"{"norm_num_groups": 7}"#),
            ("time_cond_proj_dim", r#"{"time_cond_proj_dim": 256}"#),
        ] {
            let err = parse(json).unwrap_err().to_string();
            assert!(
                err.contains("unet/config.json") && err.contains(field),
                "{field}: {err}"
            );
        }
        assert!(!parse(r#"{"mid_block_type": null}"#).unwrap().1.mid);
    }
}

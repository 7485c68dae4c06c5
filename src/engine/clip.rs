//! CLIP text encoders (`CLIPTextModel`, `CLIPTextModelWithProjection`) built from candle-nn
//! blocks, giving what SD 1.x/2.x and SDXL need: the final-normed hidden states, the output of
//! the second-to-last layer, and the (projected) pooled output at the EOS position.
//! The transformer layer is shared with the safety checker's vision tower.

use candle_core::{DType, Device, IndexOp, Module, Tensor, D};
use candle_nn::{
    embedding, layer_norm, linear, linear_no_bias, Embedding, LayerNorm, Linear, VarBuilder,
};
use serde::Deserialize;
use std::path::Path;

use super::tokenizer::ClipTokenizer;
use super::weights::{component_file, open, read_json};
use super::EngineError;

/// The activation of CLIP's MLP, from `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `quick_gelu`: `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// `gelu`: the exact (erf) GELU.
    Gelu,
    /// `gelu_new` / `gelu_pytorch_tanh` / `gelu_fast`: the tanh approximation.
    GeluTanh,
    /// `relu`.
    Relu,
}

impl Activation {
    /// Parses a transformers `hidden_act` name.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Self::QuickGelu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "relu" => Some(Self::Relu),
            _ => None,
        }
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::Relu => x.relu(),
        }
    }
}

/// Self-attention + MLP block of a CLIP transformer (pre-norm, residual).
#[derive(Debug, Clone)]
pub(crate) struct EncoderLayer {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    layer_norm1: LayerNorm,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    heads: usize,
    activation: Activation,
}

impl EncoderLayer {
    /// Loads `layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`, `mlp.fc{1,2}` under `vb`.
    pub(crate) fn load(
        vb: VarBuilder,
        hidden: usize,
        intermediate: usize,
        heads: usize,
        eps: f64,
        activation: Activation,
    ) -> candle_core::Result<Self> {
        let attn = vb.pp("self_attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            q_proj: linear(hidden, hidden, attn.pp("q_proj"))?,
            k_proj: linear(hidden, hidden, attn.pp("k_proj"))?,
            v_proj: linear(hidden, hidden, attn.pp("v_proj"))?,
            out_proj: linear(hidden, hidden, attn.pp("out_proj"))?,
            layer_norm1: layer_norm(hidden, eps, vb.pp("layer_norm1"))?,
            layer_norm2: layer_norm(hidden, eps, vb.pp("layer_norm2"))?,
            fc1: linear(hidden, intermediate, mlp.pp("fc1"))?,
            fc2: linear(intermediate, hidden, mlp.pp("fc2"))?,
            heads,
            activation,
        })
    }

    fn attention(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let d = c / self.heads;
        let scale = (d as f64).powf(-0.5);
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, n, self.heads, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split((self.q_proj.forward(x)? * scale)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let dtype = q.dtype();
        let mut scores = q.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        if let Some(mask) = mask {
            scores = scores.broadcast_add(mask)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?;
        self.out_proj.forward(&out)
    }

    /// Runs the block; `mask` (f32, broadcastable to `(B, heads, N, N)`) is added to the scores.
    pub(crate) fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let h = (x + self.attention(&self.layer_norm1.forward(x)?, mask)?)?;
        let m = self.fc2.forward(
            &self
                .activation
                .apply(&self.fc1.forward(&self.layer_norm2.forward(&h)?)?)?,
        )?;
        h + m
    }
}

/// `config.json` of a transformers CLIP text model.
#[derive(Debug, Clone, Deserialize)]
pub struct TextConfig {
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of transformer layers.
    pub num_hidden_layers: usize,
    /// Number of attention heads.
    pub num_attention_heads: usize,
    /// Number of position embeddings (the longest sequence).
    pub max_position_embeddings: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Activation name (`quick_gelu`, `gelu`, ...).
    #[serde(default = "default_act")]
    pub hidden_act: String,
    /// Layer-norm epsilon.
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Output width of `text_projection` (models with projection).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// Model classes; `CLIPTextModelWithProjection` has a `text_projection`.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// End-of-text id used to find the pooled position.
    #[serde(default)]
    pub eos_token_id: Option<u32>,
}

fn default_act() -> String {
    "quick_gelu".into()
}

fn default_eps() -> f64 {
    1e-5
}

/// What a text encoder computes for a batch of id sequences.
#[derive(Debug, Clone)]
pub struct TextOutput {
    /// `(B, N, hidden)`: the last layer's output after the final layer norm.
    pub last_hidden: Tensor,
    /// `(B, N, hidden)`: `hidden_states[-2]`, the second-to-last layer's output (no final norm).
    pub penultimate: Tensor,
    /// `(B, hidden)` or `(B, projection_dim)`: the final-normed state at the EOS position, through
    /// `text_projection` when the model has one.
    pub pooled: Tensor,
}

/// A CLIP text encoder loaded from a diffusers `text_encoder/` folder.
#[derive(Debug)]
pub struct TextEncoder {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<EncoderLayer>,
    final_layer_norm: LayerNorm,
    text_projection: Option<Linear>,
    eos_token_id: Option<u32>,
    config: TextConfig,
    device: Device,
    dtype: DType,
}

impl TextEncoder {
    /// Loads `config.json` and the safetensors weights of `dir` onto `device` in `dtype`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self, EngineError> {
        let config_file = dir.join("config.json");
        let config: TextConfig = read_json(&config_file)?;
        let bad = |message: String| EngineError::Load {
            file: config_file.clone(),
            message,
        };
        let activation = Activation::parse(&config.hidden_act)
            .ok_or_else(|| bad(format!("unsupported hidden_act `{}`", config.hidden_act)))?;
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                config.hidden_size, config.num_attention_heads
            )));
        }
        if config.num_hidden_layers == 0 {
            return Err(bad("num_hidden_layers is 0".into()));
        }
        let file = component_file(dir)?;
        let root = open(&file, dtype, device)?;
        let with_projection = config
            .architectures
            .iter()
            .any(|a| a.contains("WithProjection"));
        let build = || -> candle_core::Result<Self> {
            // transformers saves `text_model.`-prefixed names; some exports drop the prefix.
            let vb = if root.contains_tensor("text_model.embeddings.token_embedding.weight") {
                root.pp("text_model")
            } else {
                root.clone()
            };
            let h = config.hidden_size;
            let token_embedding =
                embedding(config.vocab_size, h, vb.pp("embeddings.token_embedding"))?;
            let position_embedding = embedding(
                config.max_position_embeddings,
                h,
                vb.pp("embeddings.position_embedding"),
            )?;
            let layers = (0..config.num_hidden_layers)
                .map(|i| {
                    EncoderLayer::load(
                        vb.pp(format!("encoder.layers.{i}")),
                        h,
                        config.intermediate_size,
                        config.num_attention_heads,
                        config.layer_norm_eps,
                        activation,
                    )
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            let final_layer_norm = layer_norm(h, config.layer_norm_eps, vb.pp("final_layer_norm"))?;
            let text_projection =
                if with_projection || root.contains_tensor("text_projection.weight") {
                    let p = config.projection_dim.unwrap_or(h);
                    Some(linear_no_bias(h, p, root.pp("text_projection"))?)
                } else {
                    None
                };
            Ok(Self {
                token_embedding,
                position_embedding,
                layers,
                final_layer_norm,
                text_projection,
                eos_token_id: config.eos_token_id,
                config: config.clone(),
                device: device.clone(),
                dtype,
            })
        };
        build().map_err(|e| load_error(&file, e))
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &TextConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype of the weights and outputs.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the model has a `text_projection` (pooled output is projected).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// Width of the hidden states.
    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    /// Runs the encoder on `ids` (`(B, N)` u32, N ≤ max_position_embeddings) with a causal mask.
    pub fn forward(&self, ids: &Tensor) -> Result<TextOutput, EngineError> {
        let (b, n) = ids.dims2()?;
        if n == 0 || n > self.config.max_position_embeddings {
            return Err(EngineError::Other(format!(
                "text encoder: sequence length {n} is outside 1..={}",
                self.config.max_position_embeddings
            )));
        }
        let ids = ids.to_dtype(DType::U32)?.to_device(&self.device)?;
        let rows = ids.to_vec2::<u32>()?;
        if let Some(bad) = rows
            .iter()
            .flatten()
            .find(|&&i| i as usize >= self.config.vocab_size)
        {
            return Err(EngineError::Other(format!(
                "text encoder: token id {bad} is outside the vocabulary"
            )));
        }
        let positions = Tensor::arange(0u32, n as u32, &self.device)?;
        let mut x = self
            .token_embedding
            .forward(&ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        let mask = causal_mask(n, &self.device)?;
        let mut previous = x.clone();
        for layer in &self.layers {
            previous = x;
            x = layer.forward(&previous, Some(&mask))?;
        }
        let last_hidden = self.final_layer_norm.forward(&x)?;
        // transformers: with eos_token_id == 2 (legacy configs) the EOS is the largest id;
        // otherwise the first position holding eos_token_id (0 when there is none).
        let eos = self.eos_token_id;
        let picks = rows
            .iter()
            .map(|row| {
                let argmax = |r: &[u32]| {
                    r.iter()
                        .enumerate()
                        .fold(0, |best, (i, &v)| if v > r[best] { i } else { best })
                };
                match eos {
                    Some(e) if e != 2 => row.iter().position(|&v| v == e).unwrap_or(0),
                    _ => argmax(row),
                }
            })
            .collect::<Vec<_>>();
        let pooled = (0..b)
            .map(|i| last_hidden.i((i, picks[i])))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut pooled = Tensor::stack(&pooled, 0)?;
        if let Some(p) = &self.text_projection {
            pooled = p.forward(&pooled)?;
        }
        Ok(TextOutput {
            last_hidden,
            penultimate: previous,
            pooled,
        })
    }

    /// Tokenizes `prompts` with `tokenizer` and runs the encoder on the batch.
    pub fn encode(
        &self,
        tokenizer: &ClipTokenizer,
        prompts: &[&str],
    ) -> Result<TextOutput, EngineError> {
        let ids = token_batch(tokenizer, prompts, &self.device)?;
        self.forward(&ids)
    }
}

/// Wraps a candle error raised while building a model from `file`, naming the file once
/// (the weights backend's messages already name it).
pub(crate) fn load_error(file: &Path, e: candle_core::Error) -> EngineError {
    let message = e.to_string();
    if message.contains(&file.display().to_string()) {
        EngineError::Other(message)
    } else {
        EngineError::Load {
            file: file.to_path_buf(),
            message,
        }
    }
}

/// Tokenizes `prompts` into a `(B, max_length)` u32 tensor on `device`.
pub fn token_batch(
    tokenizer: &ClipTokenizer,
    prompts: &[&str],
    device: &Device,
) -> Result<Tensor, EngineError> {
    let n = tokenizer.max_length();
    let mut all = Vec::with_capacity(prompts.len() * n);
    for p in prompts {
        all.extend(tokenizer.encode(p)?);
    }
    Ok(Tensor::from_vec(all, (prompts.len(), n), device)?)
}

/// `(N, N)` f32 mask: 0 on and below the diagonal, -inf above it.
fn causal_mask(n: usize, device: &Device) -> candle_core::Result<Tensor> {
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..n).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(mask, (n, n), device)
}

/// SDXL conditioning from one or more (tokenizer, encoder) pairs.
#[derive(Debug, Clone)]
pub struct SdxlText {
    /// `(B, N, Σ hidden)`: the encoders' penultimate hidden states concatenated on the last dim.
    pub prompt_embeds: Tensor,
    /// `(B, projection_dim)`: the last encoder's pooled (projected) output.
    pub pooled: Tensor,
}

/// SDXL prompt embeddings as diffusers computes them: for the base, `encoders` is
/// `[(tokenizer, text_encoder), (tokenizer_2, text_encoder_2)]`; for the refiner only the second.
/// The pooled output comes from the last pair.
pub fn sdxl_embeddings(
    encoders: &[(&ClipTokenizer, &TextEncoder)],
    prompts: &[&str],
) -> Result<SdxlText, EngineError> {
    let mut hidden = Vec::with_capacity(encoders.len());
    let mut pooled = None;
    for (tokenizer, encoder) in encoders {
        let out = encoder.encode(tokenizer, prompts)?;
        hidden.push(out.penultimate);
        pooled = Some(out.pooled);
    }
    let pooled = pooled.ok_or_else(|| {
        EngineError::Other("SDXL conditioning needs at least one text encoder".into())
    })?;
    let device = pooled.device().clone();
    let hidden = hidden
        .iter()
        .map(|h| h.to_device(&device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let prompt_embeds = Tensor::cat(&hidden, D::Minus1)?;
    Ok(SdxlText {
        prompt_embeds,
        pooled,
    })
}

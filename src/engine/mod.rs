//! The candle pipeline: model loading from `config.json`, CLIP, UNet, VAE, schedulers, noise,
//! SDXL conditioning and the safety checker. Nothing here reads YAML.

pub mod clip;
pub mod hub;
pub mod ops;
pub mod pipeline;
pub mod rng;
pub mod safety;
pub mod schedulers;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

use std::path::PathBuf;

/// Errors of model loading and generation; each names the file (and tensor) at fault.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{}: {message}", file.display())]
    Load { file: PathBuf, message: String },
    #[error("{0}")]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Other(String),
}

/// The largest absolute difference between two tensors of one shape (for the engine's tests).
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("tensors of one shape and dtype f32")
}

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

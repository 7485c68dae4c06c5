//! Diffusion schedulers reproducing diffusers' `Class.from_config(config)` + `set_timesteps(N)`
//! + `scale_model_input` + `step` + `add_noise`, with diffusers' float32/float64 arithmetic.
//!
//! `SchedulerConfig` is the raw `scheduler/scheduler_config.json`: absent keys stay `None` and are
//! resolved to the defaults of the class being built, because diffusers' defaults differ per class
//! (`Euler.from_config(ddim_config)` keeps the DDIM file's shared keys and takes Euler's defaults
//! for the rest).

mod common;
mod ddim;
mod dpmsolver;
mod euler;
mod pndm;
mod unipc;

use crate::engine::EngineError;
use crate::spec::types::SchedulerName;
use candle_core::Tensor;
use serde::Deserialize;
use std::path::Path;

pub use common::Prediction;

/// Source of per-image Gaussian noise for ancestral / SDE steps (the pipeline implements it so
/// each image of a batch continues its own torch-compatible stream).
pub trait NoiseFn {
    /// Standard normal noise with the shape (and device) of `like`.
    fn randn_like(&mut self, like: &Tensor) -> candle_core::Result<Tensor>;
}

/// A scheduler with its timesteps already set.
pub trait Scheduler: Send {
    /// The timesteps of the denoising loop; the loop runs `i in 0..timesteps().len()`.
    fn timesteps(&self) -> &[f64];
    /// Scale of the initial noise (multiply the `randn` latents by it).
    fn init_noise_sigma(&self) -> f64;
    /// The UNet input for step `i` (identity for most schedulers).
    fn scale_model_input(&self, sample: &Tensor, i: usize) -> candle_core::Result<Tensor>;
    /// One denoising step at index `i`; called in order, possibly starting at `i > 0` (SDXL
    /// refiner, img2img), in which case multistep schedulers start at lower order.
    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseFn,
    ) -> candle_core::Result<Tensor>;
    /// `original` noised to the level of `timesteps()[i]` (img2img start).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, i: usize)
        -> candle_core::Result<Tensor>;
    /// Model evaluations per step as diffusers reports it (`scheduler.order`).
    fn order(&self) -> usize;
    /// `num_train_timesteps` of the config.
    fn num_train_timesteps(&self) -> usize;
    /// The sigmas after `set_timesteps` (length `timesteps().len() + 1`), for sigma schedulers.
    fn sigmas(&self) -> Option<&[f64]> {
        None
    }
}

/// `scheduler_config.json` as written by diffusers. Each field is the diffusers key of the same
/// name (`class_name` = `_class_name`); `None` = absent, so the default of the class being built
/// applies. Unknown keys are ignored.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub steps_offset: Option<i64>,
    pub set_alpha_to_one: Option<bool>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    pub dynamic_thresholding_ratio: Option<f64>,
    pub sample_max_value: Option<f64>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub interpolation_type: Option<String>,
    pub use_karras_sigmas: Option<bool>,
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub final_sigmas_type: Option<String>,
    pub timestep_type: Option<String>,
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub lambda_min_clipped: Option<f64>,
    pub variance_type: Option<String>,
    pub predict_x0: Option<bool>,
    pub disable_corrector: Option<Vec<usize>>,
    pub solver_p: Option<serde_json::Value>,
    pub skip_prk_steps: Option<bool>,
}

impl SchedulerConfig {
    /// `num_train_timesteps` with diffusers' default (1000).
    pub fn train_timesteps(&self) -> usize {
        self.num_train_timesteps.unwrap_or(1000)
    }

    /// Parses the JSON text of a `scheduler_config.json` (Python's `Infinity`/`NaN` tokens, which
    /// diffusers writes for e.g. `lambda_min_clipped`, read as absent).
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(&replace_non_finite(text))
    }
}

/// Replaces bare `-Infinity`, `Infinity` and `NaN` tokens (outside strings) by `null`.
fn replace_non_finite(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = text;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
            continue;
        }
        if c == '"' {
            in_string = true;
        } else {
            let token = ["-Infinity", "Infinity", "NaN"]
                .into_iter()
                .find(|t| rest.starts_with(t));
            if let Some(t) = token {
                out.push_str("null");
                rest = &rest[t.len()..];
                continue;
            }
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// Reads `scheduler_config.json` from a `scheduler/` folder (or the file itself).
pub fn load_config(dir: &Path) -> Result<SchedulerConfig, EngineError> {
    let file = if dir.is_dir() {
        dir.join("scheduler_config.json")
    } else {
        dir.to_path_buf()
    };
    let text = std::fs::read_to_string(&file).map_err(|e| EngineError::Load {
        file: file.clone(),
        message: e.to_string(),
    })?;
    SchedulerConfig::from_json(&text).map_err(|e| EngineError::Load {
        file,
        message: format!("invalid scheduler config: {e}"),
    })
}

/// The diffusers classes sd-run implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Ddim,
    Euler,
    EulerAncestral,
    DpmSolverMultistep,
    UniPc,
    Pndm,
}

impl Class {
    fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "DDIMScheduler" => Class::Ddim,
            "EulerDiscreteScheduler" => Class::Euler,
            "EulerAncestralDiscreteScheduler" => Class::EulerAncestral,
            "DPMSolverMultistepScheduler" => Class::DpmSolverMultistep,
            "UniPCMultistepScheduler" => Class::UniPc,
            "PNDMScheduler" => Class::Pndm,
            _ => return None,
        })
    }
}

/// Builds scheduler `name` from a model's config and sets `steps` inference steps.
pub fn build(
    name: SchedulerName,
    config: &SchedulerConfig,
    steps: usize,
) -> Result<Box<dyn Scheduler>, EngineError> {
    if steps == 0 {
        return Err(EngineError::Other(
            "scheduler: the number of steps must be at least 1".into(),
        ));
    }
    let mut config = config.clone();
    let class = match name {
        SchedulerName::Default => {
            let class_name = config.class_name.as_deref().ok_or_else(|| {
                EngineError::Other(
                    "scheduler `default`: scheduler_config.json has no `_class_name`".into(),
                )
            })?;
            Class::from_name(class_name).ok_or_else(|| {
                EngineError::Other(format!(
                    "scheduler `default`: unsupported scheduler class `{class_name}` \
                     (supported: DDIMScheduler, EulerDiscreteScheduler, \
                     EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler, \
                     UniPCMultistepScheduler, PNDMScheduler)"
                ))
            })?
        }
        SchedulerName::Ddim => Class::Ddim,
        SchedulerName::Euler => Class::Euler,
        SchedulerName::EulerA => Class::EulerAncestral,
        SchedulerName::DpmPp2m => Class::DpmSolverMultistep,
        SchedulerName::DpmPp2mKarras => {
            config.use_karras_sigmas = Some(true);
            Class::DpmSolverMultistep
        }
        SchedulerName::Unipc => Class::UniPc,
        SchedulerName::Pndm => {
            config.skip_prk_steps = Some(true);
            Class::Pndm
        }
    };
    let err = |e: String| EngineError::Other(format!("scheduler `{}`: {e}", name.as_str()));
    Ok(match class {
        Class::Ddim => Box::new(ddim::Ddim::new(&config, steps).map_err(err)?),
        Class::Euler => Box::new(euler::Euler::new(&config, steps, false).map_err(err)?),
        Class::EulerAncestral => Box::new(euler::Euler::new(&config, steps, true).map_err(err)?),
        Class::DpmSolverMultistep => {
            Box::new(dpmsolver::DpmSolver::new(&config, steps).map_err(err)?)
        }
        Class::UniPc => Box::new(unipc::UniPc::new(&config, steps).map_err(err)?),
        Class::Pndm => Box::new(pndm::Pndm::new(&config, steps).map_err(err)?),
    })
}

#[cfg(test)]
mod tests;

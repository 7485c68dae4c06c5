//! diffusers' `DDIMScheduler` (eta = 0, as the Stable Diffusion pipelines call it).

use super::common::{
    check_index, div_s, f32t, mul_s, np_arange, np_linspace, np_round, Prediction, Spacing,
    Threshold, TrainSchedule,
};
use super::{NoiseFn, Scheduler, SchedulerConfig};
use candle_core::Tensor;

/// DDIM timesteps for `n` steps (shared with PNDM's spacing rules except trailing order).
pub(crate) fn ddim_timesteps(
    spacing: Spacing,
    num_train: usize,
    n: usize,
    steps_offset: i64,
) -> Vec<i64> {
    match spacing {
        Spacing::Linspace => np_linspace(0.0, (num_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| np_round(t) as i64)
            .collect(),
        Spacing::Leading => {
            let ratio = (num_train / n) as i64;
            (0..n as i64)
                .rev()
                .map(|k| k * ratio + steps_offset)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = num_train as f64 / n as f64;
            np_arange(num_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| np_round(t) as i64 - 1)
                .collect()
        }
    }
}

/// DDIM with its timesteps set.
pub struct Ddim {
    train: TrainSchedule,
    timesteps: Vec<i64>,
    timesteps_f: Vec<f64>,
    num_inference_steps: usize,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    clip: Option<f32>,
    threshold: Option<Threshold>,
}

impl Ddim {
    /// `DDIMScheduler.from_config(cfg)` + `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self, String> {
        let train = TrainSchedule::new(cfg, cfg.rescale_betas_zero_snr.unwrap_or(false))?;
        let n_train = train.num_train_timesteps;
        if steps > n_train {
            return Err(format!(
                "{steps} steps exceed num_train_timesteps = {n_train}"
            ));
        }
        let spacing = Spacing::parse(cfg.timestep_spacing.as_deref(), Spacing::Leading)?;
        let timesteps = ddim_timesteps(spacing, n_train, steps, cfg.steps_offset.unwrap_or(0));
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            train.alphas_cumprod[0]
        };
        let clip =
            (cfg.clip_sample.unwrap_or(true)).then(|| cfg.clip_sample_range.unwrap_or(1.0) as f32);
        Ok(Ddim {
            timesteps_f: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
            num_inference_steps: steps,
            final_alpha_cumprod,
            prediction: Prediction::parse(cfg.prediction_type.as_deref())?,
            clip,
            threshold: Threshold::from_config(cfg),
            train,
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps_f
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _i: usize) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseFn,
    ) -> candle_core::Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        let dtype = sample.dtype();
        let sample = f32t(sample)?;
        let model_output = f32t(model_output)?;
        let t = self.timesteps[i];
        let prev_t = t - (self.train.num_train_timesteps / self.num_inference_steps) as i64;
        let alpha_prod_t = self.train.alpha_cumprod(t)?;
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.train.alpha_cumprod(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0f32 - alpha_prod_t;
        let (sa, sb) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
        let (mut pred_x0, pred_eps) = match self.prediction {
            Prediction::Epsilon => (
                div_s(&(&sample - mul_s(&model_output, sb)?)?, sa)?,
                model_output.clone(),
            ),
            Prediction::Sample => (
                model_output.clone(),
                div_s(&(&sample - mul_s(&model_output, sa)?)?, sb)?,
            ),
            Prediction::VPrediction => (
                (mul_s(&sample, sa)? - mul_s(&model_output, sb)?)?,
                (mul_s(&model_output, sa)? + mul_s(&sample, sb)?)?,
            ),
        };
        if let Some(th) = &self.threshold {
            pred_x0 = th.apply(&pred_x0)?;
        } else if let Some(r) = self.clip {
            pred_x0 = pred_x0.clamp(-r, r)?;
        }
        // eta = 0: std_dev_t = 0.
        let dir_coeff = (1.0f32 - alpha_prod_t_prev - 0.0).sqrt();
        let direction = mul_s(&pred_eps, dir_coeff)?;
        let prev = (mul_s(&pred_x0, alpha_prod_t_prev.sqrt())? + direction)?;
        prev.to_dtype(dtype)
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        i: usize,
    ) -> candle_core::Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        ddpm_add_noise(&self.train, original, noise, self.timesteps[i])
    }

    fn order(&self) -> usize {
        1
    }

    fn num_train_timesteps(&self) -> usize {
        self.train.num_train_timesteps
    }
}

/// `sqrt(ac[t]) * x0 + sqrt(1 - ac[t]) * noise` (DDIM/PNDM `add_noise`).
pub(crate) fn ddpm_add_noise(
    train: &TrainSchedule,
    original: &Tensor,
    noise: &Tensor,
    t: i64,
) -> candle_core::Result<Tensor> {
    let dtype = original.dtype();
    let ac = train.alpha_cumprod(t)?;
    let a = mul_s(&f32t(original)?, ac.sqrt())?;
    let b = mul_s(&f32t(noise)?, (1.0f32 - ac).sqrt())?;
    (a + b)?.to_dtype(dtype)
}

//! diffusers' `EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler`.

use super::common::{
    check_index, div_s, f32t, final_sigma_zero, karras, log_f32, mul_s, np_arange, np_interp,
    np_linspace, np_round, reject_unsupported_sigmas, sigma_to_t, Prediction, Spacing,
    TrainSchedule,
};
use super::{NoiseFn, Scheduler, SchedulerConfig};
use candle_core::Tensor;

/// Euler (ancestral or not) with its sigmas set.
pub struct Euler {
    ancestral: bool,
    num_train: usize,
    timesteps: Vec<f64>,
    /// float32 sigmas, `timesteps.len() + 1` of them (the last is the final sigma).
    sigmas: Vec<f32>,
    sigmas_f64: Vec<f64>,
    init_noise_sigma: f32,
    prediction: Prediction,
}

/// Timesteps of the discrete Euler schedulers, as float32 values.
fn euler_timesteps(spacing: Spacing, num_train: usize, n: usize, steps_offset: i64) -> Vec<f32> {
    match spacing {
        Spacing::Linspace => np_linspace(0.0, (num_train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t as f32)
            .collect(),
        Spacing::Leading => {
            let ratio = (num_train / n) as f64;
            (0..n)
                .rev()
                .map(|k| np_round(k as f64 * ratio) as f32 + steps_offset as f32)
                .collect()
        }
        Spacing::Trailing => {
            let ratio = num_train as f64 / n as f64;
            np_arange(num_train as f64, 0.0, -ratio)
                .into_iter()
                .map(|t| np_round(t) as f32 - 1.0)
                .collect()
        }
    }
}

impl Euler {
    /// `(EulerDiscrete|EulerAncestralDiscrete)Scheduler.from_config(cfg)` + `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, steps: usize, ancestral: bool) -> Result<Self, String> {
        let rescale = cfg.rescale_betas_zero_snr.unwrap_or(false);
        let mut train = TrainSchedule::new(cfg, rescale)?;
        if rescale {
            // Close to 0 without being 0, so the first sigma is finite.
            if let Some(last) = train.alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let prediction = Prediction::parse(cfg.prediction_type.as_deref())?;
        if ancestral && prediction == Prediction::Sample {
            return Err(
                "EulerAncestralDiscreteScheduler does not implement prediction_type `sample`"
                    .into(),
            );
        }
        if !ancestral {
            reject_unsupported_sigmas(cfg)?;
            if let Some(it) = cfg.interpolation_type.as_deref() {
                if it != "linear" {
                    return Err(format!("unsupported interpolation_type `{it}` (linear)"));
                }
            }
        }
        let num_train = train.num_train_timesteps;
        let spacing = Spacing::parse(cfg.timestep_spacing.as_deref(), Spacing::Linspace)?;
        let ts32 = euler_timesteps(spacing, num_train, steps, cfg.steps_offset.unwrap_or(0));
        let train_sigmas = train.sigmas();
        let log_sigmas = log_f32(&train_sigmas);
        let ts64: Vec<f64> = ts32.iter().map(|&t| t as f64).collect();
        let mut sigmas = np_interp(&ts64, &train_sigmas);
        let mut timesteps = ts64;
        let karras_on = !ancestral && cfg.use_karras_sigmas.unwrap_or(false);
        if karras_on {
            let lo = cfg.sigma_min.unwrap_or(sigmas[sigmas.len() - 1]);
            let hi = cfg.sigma_max.unwrap_or(sigmas[0]);
            sigmas = karras(lo, hi, steps);
            timesteps = sigmas
                .iter()
                .map(|&s| sigma_to_t(s, &log_sigmas) as f32 as f64)
                .collect();
        }
        let last = if ancestral || final_sigma_zero(cfg)? {
            0.0f32
        } else {
            train_sigmas[0]
        };
        let mut sigmas32: Vec<f32> = sigmas.iter().map(|&s| s as f32).collect();
        sigmas32.push(last);
        let continuous = !ancestral
            && cfg.timestep_type.as_deref() == Some("continuous")
            && prediction == Prediction::VPrediction;
        if continuous {
            timesteps = sigmas32[..sigmas32.len() - 1]
                .iter()
                .map(|s| (0.25f32 * s.ln()) as f64)
                .collect();
        }
        let max_sigma = sigmas32.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            Spacing::Linspace | Spacing::Trailing => max_sigma,
            Spacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Euler {
            ancestral,
            num_train,
            timesteps,
            sigmas_f64: sigmas32.iter().map(|&s| s as f64).collect(),
            sigmas: sigmas32,
            init_noise_sigma,
            prediction,
        })
    }

    /// x0 from the model output at sigma (float32 tensors).
    fn pred_original(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        sigma: f32,
    ) -> candle_core::Result<Tensor> {
        match self.prediction {
            Prediction::Sample => Ok(model_output.clone()),
            Prediction::Epsilon => sample - mul_s(model_output, sigma)?,
            Prediction::VPrediction => {
                let c = -sigma / (sigma * sigma + 1.0).sqrt();
                mul_s(model_output, c)? + div_s(sample, sigma * sigma + 1.0)?
            }
        }
    }
}

impl Scheduler for Euler {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma as f64
    }

    fn scale_model_input(&self, sample: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        let sigma = self.sigmas[i];
        let dtype = sample.dtype();
        div_s(&f32t(sample)?, (sigma * sigma + 1.0).sqrt())?.to_dtype(dtype)
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseFn,
    ) -> candle_core::Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        let dtype = model_output.dtype();
        let sample = f32t(sample)?;
        let model_output = f32t(model_output)?;
        let sigma = self.sigmas[i];
        let sigma_next = self.sigmas[i + 1];
        let pred_x0 = self.pred_original(&model_output, &sample, sigma)?;
        let derivative = div_s(&(&sample - &pred_x0)?, sigma)?;
        if !self.ancestral {
            // s_churn = 0: sigma_hat = sigma.
            let dt = sigma_next - sigma;
            let prev = (&sample + mul_s(&derivative, dt)?)?;
            return prev.to_dtype(dtype);
        }
        let (from, to) = (sigma, sigma_next);
        let sigma_up = (to * to * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).sqrt();
        let dt = sigma_down - sigma;
        let prev = (&sample + mul_s(&derivative, dt)?)?;
        let n = f32t(&noise.randn_like(&model_output)?)?;
        let prev = (prev + mul_s(&n, sigma_up)?)?;
        prev.to_dtype(dtype)
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        i: usize,
    ) -> candle_core::Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        let dtype = original.dtype();
        let out = (f32t(original)? + mul_s(&f32t(noise)?, self.sigmas[i])?)?;
        out.to_dtype(dtype)
    }

    fn order(&self) -> usize {
        1
    }

    fn num_train_timesteps(&self) -> usize {
        self.num_train
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sigmas_f64)
    }
}

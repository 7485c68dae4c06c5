//! diffusers' `PNDMScheduler`: PLMS (linear multistep on epsilon), with the Runge-Kutta (PRK)
//! warm-up steps when `skip_prk_steps` is false.

use super::common::{check_index, div_s, f32t, mul_s, Prediction, Spacing, TrainSchedule};
use super::ddim::{ddim_timesteps, ddpm_add_noise};
use super::{NoiseFn, Scheduler, SchedulerConfig};
use candle_core::Tensor;

/// PNDM's `pndm_order`: PRK runs on the last 4 timesteps.
const PNDM_ORDER: usize = 4;

/// PLMS with its timesteps set.
pub struct Pndm {
    train: TrainSchedule,
    timesteps: Vec<i64>,
    timesteps_f: Vec<f64>,
    num_inference_steps: usize,
    final_alpha_cumprod: f32,
    prediction: Prediction,
    /// Number of leading PRK timesteps (0 with `skip_prk_steps`).
    prk_len: usize,
    ets: Vec<Tensor>,
    counter: usize,
    cur_sample: Option<Tensor>,
    cur_model_output: Option<Tensor>,
}

impl Pndm {
    /// `PNDMScheduler.from_config(cfg)` + `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self, String> {
        let prediction = Prediction::parse(cfg.prediction_type.as_deref())?;
        if prediction == Prediction::Sample {
            return Err("PNDMScheduler does not support prediction_type `sample`".into());
        }
        let train = TrainSchedule::new(cfg, false)?;
        let n_train = train.num_train_timesteps;
        if steps > n_train {
            return Err(format!(
                "{steps} steps exceed num_train_timesteps = {n_train}"
            ));
        }
        let spacing = Spacing::parse(cfg.timestep_spacing.as_deref(), Spacing::Leading)?;
        let mut asc = ddim_timesteps(spacing, n_train, steps, cfg.steps_offset.unwrap_or(0));
        asc.reverse();
        let k = asc.len();
        let (prk, plms) = if cfg.skip_prk_steps.unwrap_or(false) {
            // PLMS: all but the last, the second-to-last again, the last; reversed.
            let mut plms: Vec<i64> = asc[..k - 1].to_vec();
            if k >= 2 {
                plms.push(asc[k - 2]);
            }
            plms.push(asc[k - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            // PRK on the last 4 timesteps, each with its half step, repeated as RK4 needs.
            if k < PNDM_ORDER {
                return Err(format!(
                    "the Runge-Kutta warm-up (skip_prk_steps = false) needs at least \
                     {PNDM_ORDER} steps, got {steps}"
                ));
            }
            let half = (n_train / steps / 2) as i64;
            let tail = &asc[k - PNDM_ORDER..];
            let pairs: Vec<i64> = tail.iter().flat_map(|&t| [t, t + half]).collect();
            let doubled: Vec<i64> = pairs[..pairs.len() - 1]
                .iter()
                .flat_map(|&t| [t, t])
                .collect();
            let mut prk: Vec<i64> = doubled[1..doubled.len() - 1].to_vec();
            prk.reverse();
            let mut plms: Vec<i64> = asc[..k.saturating_sub(3)].to_vec();
            plms.reverse();
            (prk, plms)
        };
        let prk_len = prk.len();
        let timesteps = [prk, plms].concat();
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            train.alphas_cumprod[0]
        };
        Ok(Pndm {
            timesteps_f: timesteps.iter().map(|&t| t as f64).collect(),
            timesteps,
            num_inference_steps: steps,
            final_alpha_cumprod,
            prediction,
            prk_len,
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
            cur_model_output: None,
            train,
        })
    }

    /// One Runge-Kutta warm-up step (`step_prk`).
    fn step_prk(
        &mut self,
        mo: &Tensor,
        t: i64,
        sample: &Tensor,
        ratio: i64,
    ) -> candle_core::Result<Tensor> {
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { ratio / 2 };
        let prev_t = t - diff_to_prev;
        let t = self.timesteps[self.counter / 4 * 4];
        let sixth = (1.0f64 / 6.0) as f32;
        let third = (1.0f64 / 3.0) as f32;
        let accumulate = |cur: Option<Tensor>, w: f32| -> candle_core::Result<Tensor> {
            let term = mul_s(mo, w)?;
            match cur {
                Some(c) => c + term,
                None => Ok(term),
            }
        };
        let mut model_output = mo.clone();
        match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(accumulate(self.cur_model_output.take(), sixth)?);
                self.ets.push(mo.clone());
                self.cur_sample = Some(sample.clone());
            }
            1 | 2 => {
                self.cur_model_output = Some(accumulate(self.cur_model_output.take(), third)?);
            }
            _ => {
                model_output = accumulate(self.cur_model_output.take(), sixth)?;
            }
        }
        let cur_sample = self.cur_sample.clone().unwrap_or_else(|| sample.clone());
        let prev = self.prev_sample(&cur_sample, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    /// `_get_prev_sample`: formula (9) of the PNDM paper.
    fn prev_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        model_output: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let alpha_prod_t = self.train.alpha_cumprod(t)?;
        let alpha_prod_t_prev = if prev_t >= 0 {
            self.train.alpha_cumprod(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0f32 - alpha_prod_t;
        let beta_prod_t_prev = 1.0f32 - alpha_prod_t_prev;
        let model_output = match self.prediction {
            Prediction::VPrediction => {
                (mul_s(model_output, alpha_prod_t.sqrt())? + mul_s(sample, beta_prod_t.sqrt())?)?
            }
            _ => model_output.clone(),
        };
        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let denom = alpha_prod_t * beta_prod_t_prev.sqrt()
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        let num = mul_s(&model_output, alpha_prod_t_prev - alpha_prod_t)?;
        mul_s(sample, sample_coeff)? - div_s(&num, denom)?
    }
}

impl Scheduler for Pndm {
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
        let mut sample = f32t(sample)?;
        let mut mo = f32t(model_output)?;
        let ratio = (self.train.num_train_timesteps / self.num_inference_steps) as i64;
        if self.counter < self.prk_len {
            let prev = self.step_prk(&mo, self.timesteps[i], &sample, ratio)?;
            return prev.to_dtype(dtype);
        }
        if self.prk_len > 0 && self.ets.len() < 3 {
            return Err(candle_core::Error::Msg(
                "PNDM: PLMS step before the Runge-Kutta warm-up finished".into(),
            ));
        }
        let mut t = self.timesteps[i];
        let mut prev_t = t - ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(mo.clone());
        } else {
            prev_t = t;
            t += ratio;
        }
        let e = &self.ets;
        let n = e.len();
        if n == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
        } else if n == 1 && self.counter == 1 {
            mo = div_s(&(&mo + &e[0])?, 2.0)?;
            sample = self.cur_sample.take().ok_or_else(|| {
                candle_core::Error::Msg("PLMS: missing the sample of the first step".into())
            })?;
        } else if n == 2 {
            mo = div_s(&(mul_s(&e[1], 3.0)? - &e[0])?, 2.0)?;
        } else if n == 3 {
            let a = (mul_s(&e[2], 23.0)? - mul_s(&e[1], 16.0)?)?;
            mo = div_s(&(a + mul_s(&e[0], 5.0)?)?, 12.0)?;
        } else {
            let a = (mul_s(&e[n - 1], 55.0)? - mul_s(&e[n - 2], 59.0)?)?;
            let a = (a + mul_s(&e[n - 3], 37.0)?)?;
            let a = (a - mul_s(&e[n - 4], 9.0)?)?;
            mo = mul_s(&a, (1.0f64 / 24.0) as f32)?;
        }
        let prev = self.prev_sample(&sample, t, prev_t, &mo)?;
        self.counter += 1;
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

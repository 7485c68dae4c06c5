//! diffusers' `DPMSolverMultistepScheduler` (DPM-Solver / DPM-Solver++, ODE and SDE variants,
//! orders 1-3, midpoint or heun second-order), and the sigma schedule it shares with UniPC.

use super::common::{
    alpha_sigma_t, check_index, div_s, f32t, final_sigma_zero, karras, lambda, log_f32, mul_s,
    np_arange, np_interp, np_linspace, np_round, reject_unsupported_sigmas, sigma_to_t, Prediction,
    Spacing, Threshold, TrainSchedule,
};
use super::{NoiseFn, Scheduler, SchedulerConfig};
use candle_core::Tensor;

/// Timesteps and float32 sigmas of the multistep solvers (DPM-Solver, UniPC).
pub(crate) struct MultistepSchedule {
    pub train: TrainSchedule,
    pub timesteps: Vec<f64>,
    pub sigmas: Vec<f32>,
    pub sigmas_f64: Vec<f64>,
}

impl MultistepSchedule {
    /// The shared `set_timesteps` of DPMSolverMultistep / UniPCMultistep.
    pub(crate) fn new(
        cfg: &SchedulerConfig,
        steps: usize,
        lambda_min_clipped: f64,
    ) -> Result<Self, String> {
        reject_unsupported_sigmas(cfg)?;
        let rescale = cfg.rescale_betas_zero_snr.unwrap_or(false);
        let mut train = TrainSchedule::new(cfg, rescale)?;
        if rescale {
            if let Some(last) = train.alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let n_train = train.num_train_timesteps;
        // lambda_t = log(sqrt(ac)) - log(sqrt(1 - ac)), float32; clip its minimum.
        let lambdas: Vec<f32> = train
            .alphas_cumprod
            .iter()
            .map(|&a| a.sqrt().ln() - (1.0f32 - a).sqrt().ln())
            .collect();
        let clip = lambda_min_clipped as f32;
        let clipped_idx = lambdas.iter().rev().take_while(|&&l| l < clip).count();
        let last_timestep = n_train - clipped_idx;
        let spacing = Spacing::parse(cfg.timestep_spacing.as_deref(), Spacing::Linspace)?;
        let mut timesteps: Vec<f64> = match spacing {
            Spacing::Linspace => {
                let v = np_linspace(0.0, last_timestep as f64 - 1.0, steps + 1);
                v.into_iter()
                    .rev()
                    .take(steps)
                    .map(|t| np_round(t).trunc())
                    .collect()
            }
            Spacing::Leading => {
                let ratio = (last_timestep / (steps + 1)) as i64;
                let offset = cfg.steps_offset.unwrap_or(0);
                (1..=steps as i64)
                    .rev()
                    .map(|k| (k * ratio + offset) as f64)
                    .collect()
            }
            Spacing::Trailing => {
                let ratio = n_train as f64 / steps as f64;
                np_arange(last_timestep as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| np_round(t).trunc() - 1.0)
                    .collect()
            }
        };
        let train_sigmas = train.sigmas();
        let zero_final = final_sigma_zero(cfg)?;
        let mut sigmas: Vec<f32>;
        if cfg.use_karras_sigmas.unwrap_or(false) {
            let log_sigmas = log_f32(&train_sigmas);
            let lo = train_sigmas[0] as f64;
            let hi = train_sigmas[n_train - 1] as f64;
            let k = karras(lo, hi, steps);
            timesteps = k
                .iter()
                .map(|&s| np_round(sigma_to_t(s, &log_sigmas)).trunc())
                .collect();
            sigmas = k.iter().map(|&s| s as f32).collect();
            let last = if zero_final {
                0.0
            } else {
                k[k.len() - 1] as f32
            };
            sigmas.push(last);
        } else {
            sigmas = np_interp(&timesteps, &train_sigmas)
                .into_iter()
                .map(|s| s as f32)
                .collect();
            sigmas.push(if zero_final { 0.0 } else { train_sigmas[0] });
        }
        if timesteps.is_empty() {
            return Err(format!("{steps} steps give an empty schedule"));
        }
        Ok(MultistepSchedule {
            train,
            sigmas_f64: sigmas.iter().map(|&s| s as f64).collect(),
            sigmas,
            timesteps,
        })
    }

    /// `alpha_t * x0 + sigma_t * noise` at `sigmas[i]`.
    pub(crate) fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        i: usize,
    ) -> candle_core::Result<Tensor> {
        check_index(i, self.timesteps.len())?;
        let dtype = original.dtype();
        let (alpha, sigma) = alpha_sigma_t(self.sigmas[i]);
        let out = (mul_s(&f32t(original)?, alpha)? + mul_s(&f32t(noise)?, sigma)?)?;
        out.to_dtype(dtype)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Algorithm {
    DpmSolver,
    DpmSolverPp,
    SdeDpmSolver,
    SdeDpmSolverPp,
}

/// DPM-Solver multistep with its schedule set.
pub struct DpmSolver {
    sched: MultistepSchedule,
    prediction: Prediction,
    threshold: Option<Threshold>,
    algorithm: Algorithm,
    heun: bool,
    solver_order: usize,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigma_zero: bool,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
}

impl DpmSolver {
    /// `DPMSolverMultistepScheduler.from_config(cfg)` + `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self, String> {
        let algorithm = match cfg.algorithm_type.as_deref().unwrap_or("dpmsolver++") {
            "dpmsolver" => Algorithm::DpmSolver,
            "dpmsolver++" | "deis" => Algorithm::DpmSolverPp,
            "sde-dpmsolver" => Algorithm::SdeDpmSolver,
            "sde-dpmsolver++" => Algorithm::SdeDpmSolverPp,
            other => return Err(format!("unsupported algorithm_type `{other}`")),
        };
        let heun = match cfg.solver_type.as_deref().unwrap_or("midpoint") {
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            "heun" => true,
            other => return Err(format!("unsupported solver_type `{other}`")),
        };
        let final_zero = final_sigma_zero(cfg)?;
        if final_zero && matches!(algorithm, Algorithm::DpmSolver | Algorithm::SdeDpmSolver) {
            return Err(
                "final_sigmas_type `zero` is not supported with algorithm_type dpmsolver / sde-dpmsolver"
                    .into(),
            );
        }
        if let Some(v) = cfg.variance_type.as_deref() {
            return Err(format!("variance_type `{v}` is not supported"));
        }
        let solver_order = cfg.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            return Err(format!(
                "solver_order {solver_order} is not supported (1-3)"
            ));
        }
        let sched = MultistepSchedule::new(
            cfg,
            steps,
            cfg.lambda_min_clipped.unwrap_or(f64::NEG_INFINITY),
        )?;
        Ok(DpmSolver {
            sched,
            prediction: Prediction::parse(cfg.prediction_type.as_deref())?,
            threshold: Threshold::from_config(cfg),
            algorithm,
            heun,
            solver_order,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            euler_at_final: cfg.euler_at_final.unwrap_or(false),
            final_sigma_zero: final_zero,
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
        })
    }

    fn is_pp(&self) -> bool {
        matches!(
            self.algorithm,
            Algorithm::DpmSolverPp | Algorithm::SdeDpmSolverPp
        )
    }

    /// `convert_model_output`: x0 for the ++ variants, epsilon otherwise.
    fn convert(&self, mo: &Tensor, sample: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        let (alpha, sigma) = alpha_sigma_t(self.sched.sigmas[i]);
        if self.is_pp() {
            let x0 = match self.prediction {
                Prediction::Epsilon => div_s(&(sample - mul_s(mo, sigma)?)?, alpha)?,
                Prediction::Sample => mo.clone(),
                Prediction::VPrediction => (mul_s(sample, alpha)? - mul_s(mo, sigma)?)?,
            };
            return match &self.threshold {
                Some(th) => th.apply(&x0),
                None => Ok(x0),
            };
        }
        let eps = match self.prediction {
            Prediction::Epsilon => mo.clone(),
            Prediction::Sample => div_s(&(sample - mul_s(mo, alpha)?)?, sigma)?,
            Prediction::VPrediction => (mul_s(mo, alpha)? + mul_s(sample, sigma)?)?,
        };
        match &self.threshold {
            Some(th) => {
                let x0 = div_s(&(sample - mul_s(&eps, sigma)?)?, alpha)?;
                let x0 = th.apply(&x0)?;
                div_s(&(sample - mul_s(&x0, alpha)?)?, sigma)
            }
            None => Ok(eps),
        }
    }

    fn first_order(
        &self,
        m: &Tensor,
        sample: &Tensor,
        i: usize,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma_t(self.sched.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma_t(self.sched.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        match self.algorithm {
            Algorithm::DpmSolverPp => {
                mul_s(sample, sigma_t / sigma_s)? - mul_s(m, alpha_t * ((-h).exp() - 1.0))?
            }
            Algorithm::DpmSolver => {
                mul_s(sample, alpha_t / alpha_s)? - mul_s(m, sigma_t * (h.exp() - 1.0))?
            }
            Algorithm::SdeDpmSolverPp => {
                let noise = need(noise)?;
                let x = (mul_s(sample, sigma_t / sigma_s * (-h).exp())?
                    + mul_s(m, alpha_t * (1.0 - (-2.0 * h).exp()))?)?;
                x + mul_s(noise, sigma_t * (1.0 - (-2.0 * h).exp()).sqrt())?
            }
            Algorithm::SdeDpmSolver => {
                let noise = need(noise)?;
                let x = (mul_s(sample, alpha_t / alpha_s)?
                    - mul_s(m, 2.0 * (sigma_t * (h.exp() - 1.0)))?)?;
                x + mul_s(noise, sigma_t * ((2.0 * h).exp() - 1.0).sqrt())?
            }
        }
    }

    fn second_order(
        &self,
        sample: &Tensor,
        i: usize,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let s = &self.sched.sigmas;
        let (alpha_t, sigma_t) = alpha_sigma_t(s[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma_t(s[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma_t(s[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let n = self.model_outputs.len();
        let m0 = history(&self.model_outputs, n - 1)?;
        let m1 = history(&self.model_outputs, n - 2)?;
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let d0 = m0;
        let d1 = mul_s(&(m0 - m1)?, 1.0 / r0)?;
        match (self.algorithm, self.heun) {
            (Algorithm::DpmSolverPp, false) => {
                let c = alpha_t * ((-h).exp() - 1.0);
                (mul_s(sample, sigma_t / sigma_s0)? - mul_s(d0, c)?)? - mul_s(&d1, 0.5 * c)?
            }
            (Algorithm::DpmSolverPp, true) => {
                let c = alpha_t * ((-h).exp() - 1.0);
                let c1 = alpha_t * (((-h).exp() - 1.0) / h + 1.0);
                (mul_s(sample, sigma_t / sigma_s0)? - mul_s(d0, c)?)? + mul_s(&d1, c1)?
            }
            (Algorithm::DpmSolver, false) => {
                let c = sigma_t * (h.exp() - 1.0);
                (mul_s(sample, alpha_t / alpha_s0)? - mul_s(d0, c)?)? - mul_s(&d1, 0.5 * c)?
            }
            (Algorithm::DpmSolver, true) => {
                let c = sigma_t * (h.exp() - 1.0);
                let c1 = sigma_t * ((h.exp() - 1.0) / h - 1.0);
                (mul_s(sample, alpha_t / alpha_s0)? - mul_s(d0, c)?)? - mul_s(&d1, c1)?
            }
            (Algorithm::SdeDpmSolverPp, heun) => {
                let noise = need(noise)?;
                let e2 = 1.0 - (-2.0 * h).exp();
                let c = alpha_t * e2;
                let c1 = if heun {
                    alpha_t * (e2 / (-2.0 * h) + 1.0)
                } else {
                    0.5 * c
                };
                let x = ((mul_s(sample, sigma_t / sigma_s0 * (-h).exp())? + mul_s(d0, c)?)?
                    + mul_s(&d1, c1)?)?;
                x + mul_s(noise, sigma_t * e2.sqrt())?
            }
            (Algorithm::SdeDpmSolver, heun) => {
                let noise = need(noise)?;
                let c = sigma_t * (h.exp() - 1.0);
                let c1 = if heun {
                    2.0 * (sigma_t * ((h.exp() - 1.0) / h - 1.0))
                } else {
                    c
                };
                let x = ((mul_s(sample, alpha_t / alpha_s0)? - mul_s(d0, 2.0 * c)?)?
                    - mul_s(&d1, c1)?)?;
                x + mul_s(noise, sigma_t * ((2.0 * h).exp() - 1.0).sqrt())?
            }
        }
    }

    fn third_order(
        &self,
        sample: &Tensor,
        i: usize,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        let s = &self.sched.sigmas;
        let (alpha_t, sigma_t) = alpha_sigma_t(s[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma_t(s[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma_t(s[i - 1]);
        let (alpha_s2, sigma_s2) = alpha_sigma_t(s[i - 2]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let lambda_s2 = lambda(alpha_s2, sigma_s2);
        let n = self.model_outputs.len();
        let m0 = history(&self.model_outputs, n - 1)?;
        let m1 = history(&self.model_outputs, n - 2)?;
        let m2 = history(&self.model_outputs, n - 3)?;
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let h_1 = lambda_s1 - lambda_s2;
        let r0 = h_0 / h;
        let r1 = h_1 / h;
        let d0 = m0;
        let d1_0 = mul_s(&(m0 - m1)?, 1.0 / r0)?;
        let d1_1 = mul_s(&(m1 - m2)?, 1.0 / r1)?;
        let diff = (&d1_0 - &d1_1)?;
        let d1 = (&d1_0 + mul_s(&diff, r0 / (r0 + r1))?)?;
        let d2 = mul_s(&diff, 1.0 / (r0 + r1))?;
        match self.algorithm {
            Algorithm::DpmSolverPp => {
                let em = (-h).exp() - 1.0;
                let x = (mul_s(sample, sigma_t / sigma_s0)? - mul_s(d0, alpha_t * em)?)?;
                let x = (x + mul_s(&d1, alpha_t * (em / h + 1.0))?)?;
                x - mul_s(&d2, alpha_t * (((-h).exp() - 1.0 + h) / (h * h) - 0.5))?
            }
            Algorithm::DpmSolver => {
                let ep = h.exp() - 1.0;
                let x = (mul_s(sample, alpha_t / alpha_s0)? - mul_s(d0, sigma_t * ep)?)?;
                let x = (x - mul_s(&d1, sigma_t * (ep / h - 1.0))?)?;
                x - mul_s(&d2, sigma_t * ((h.exp() - 1.0 - h) / (h * h) - 0.5))?
            }
            Algorithm::SdeDpmSolverPp => {
                let noise = need(noise)?;
                let e2 = 1.0 - (-2.0 * h).exp();
                let x =
                    (mul_s(sample, sigma_t / sigma_s0 * (-h).exp())? + mul_s(d0, alpha_t * e2)?)?;
                let x = (x + mul_s(&d1, alpha_t * (e2 / (-2.0 * h) + 1.0))?)?;
                let two_h = 2.0 * h;
                let x = (x + mul_s(
                    &d2,
                    alpha_t * ((1.0 - (-2.0 * h).exp() - 2.0 * h) / (two_h * two_h) - 0.5),
                )?)?;
                x + mul_s(noise, sigma_t * e2.sqrt())?
            }
            Algorithm::SdeDpmSolver => Err(candle_core::Error::Msg(
                "third-order sde-dpmsolver is not implemented by diffusers".into(),
            )),
        }
    }
}

fn need(noise: Option<&Tensor>) -> candle_core::Result<&Tensor> {
    noise.ok_or_else(|| candle_core::Error::Msg("SDE step without noise".into()))
}

/// The stored model output `k` of the history, which must exist at this order.
pub(crate) fn history(outputs: &[Option<Tensor>], k: usize) -> candle_core::Result<&Tensor> {
    outputs
        .get(k)
        .and_then(|o| o.as_ref())
        .ok_or_else(|| candle_core::Error::Msg("multistep history is missing a step".into()))
}

impl Scheduler for DpmSolver {
    fn timesteps(&self) -> &[f64] {
        &self.sched.timesteps
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
        noise: &mut dyn NoiseFn,
    ) -> candle_core::Result<Tensor> {
        let len = self.sched.timesteps.len();
        check_index(i, len)?;
        let dtype = model_output.dtype();
        let sample = f32t(sample)?;
        let mo = f32t(model_output)?;
        let lower_order_final = i == len - 1
            && (self.euler_at_final
                || (self.lower_order_final && len < 15)
                || self.final_sigma_zero);
        let lower_order_second = i + 2 == len && self.lower_order_final && len < 15;
        let converted = self.convert(&mo, &sample, i)?;
        self.model_outputs.rotate_left(1);
        if let Some(last) = self.model_outputs.last_mut() {
            *last = Some(converted.clone());
        }
        let noise_t = match self.algorithm {
            Algorithm::SdeDpmSolver | Algorithm::SdeDpmSolverPp => {
                Some(f32t(&noise.randn_like(&mo)?)?)
            }
            _ => None,
        };
        let prev = if self.solver_order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&converted, &sample, i, noise_t.as_ref())?
        } else if self.solver_order == 2 || self.lower_order_nums < 2 || lower_order_second {
            self.second_order(&sample, i, noise_t.as_ref())?
        } else {
            self.third_order(&sample, i, noise_t.as_ref())?
        };
        if self.lower_order_nums < self.solver_order {
            self.lower_order_nums += 1;
        }
        prev.to_dtype(dtype)
    }

    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        i: usize,
    ) -> candle_core::Result<Tensor> {
        self.sched.add_noise(original, noise, i)
    }

    fn order(&self) -> usize {
        1
    }

    fn num_train_timesteps(&self) -> usize {
        self.sched.train.num_train_timesteps
    }

    fn sigmas(&self) -> Option<&[f64]> {
        Some(&self.sched.sigmas_f64)
    }
}

//! diffusers' `UniPCMultistepScheduler` (UniPC predictor + UniC corrector, bh1/bh2).

use super::common::{
    alpha_sigma_t, check_index, div_s, f32t, lambda, mul_s, Prediction, Threshold,
};
use super::dpmsolver::{history, MultistepSchedule};
use super::{NoiseFn, Scheduler, SchedulerConfig};
use candle_core::Tensor;

/// UniPC with its schedule set.
pub struct UniPc {
    sched: MultistepSchedule,
    prediction: Prediction,
    threshold: Option<Threshold>,
    predict_x0: bool,
    bh2: bool,
    solver_order: usize,
    lower_order_final: bool,
    disable_corrector: Vec<usize>,
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    this_order: usize,
    last_sample: Option<Tensor>,
}

/// Solves `a x = b` (row-major `a`, n×n) in float32 by Gaussian elimination with partial
/// pivoting, as LAPACK's `sgesv` does.
fn solve(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> candle_core::Result<Vec<f32>> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&x, &y| a[x][col].abs().total_cmp(&a[y][col].abs()))
            .unwrap_or(col);
        if a[pivot][col] == 0.0 {
            return Err(candle_core::Error::Msg(
                "UniPC: singular coefficient matrix".into(),
            ));
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let (top, bottom) = a.split_at_mut(col + 1);
        let pivot_row = &top[col];
        for (offset, row) in bottom.iter_mut().enumerate() {
            let f = row[col] / pivot_row[col];
            for (v, p) in row.iter_mut().zip(pivot_row).skip(col) {
                *v -= f * p;
            }
            b[col + 1 + offset] -= f * b[col];
        }
    }
    let mut x = vec![0f32; n];
    for row in (0..n).rev() {
        let mut s = b[row];
        for k in row + 1..n {
            s -= a[row][k] * x[k];
        }
        x[row] = s / a[row][row];
    }
    Ok(x)
}

/// `R` (rows `rks^(i-1)`), `b` and `h_phi_1`, `B_h` of the UniPC update.
struct Coeffs {
    r: Vec<Vec<f32>>,
    b: Vec<f32>,
    h_phi_1: f32,
    b_h: f32,
}

fn coeffs(rks: &[f32], h: f32, order: usize, predict_x0: bool, bh2: bool) -> Coeffs {
    let hh = if predict_x0 { -h } else { h };
    let h_phi_1 = hh.exp_m1();
    let mut h_phi_k = h_phi_1 / hh - 1.0;
    let mut factorial: u64 = 1;
    let b_h = if bh2 { hh.exp_m1() } else { hh };
    let mut r = Vec::with_capacity(order);
    let mut b = Vec::with_capacity(order);
    for i in 1..=order {
        r.push(rks.iter().map(|&v| v.powi(i as i32 - 1)).collect());
        b.push(h_phi_k * factorial as f32 / b_h);
        factorial *= i as u64 + 1;
        h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
    }
    Coeffs { r, b, h_phi_1, b_h }
}

/// `sum_k rhos[k] * d1s[k]`.
fn weighted_sum(rhos: &[f32], d1s: &[Tensor]) -> candle_core::Result<Option<Tensor>> {
    let mut acc: Option<Tensor> = None;
    for (r, d) in rhos.iter().zip(d1s) {
        let term = mul_s(d, *r)?;
        acc = Some(match acc {
            None => term,
            Some(a) => (a + term)?,
        });
    }
    Ok(acc)
}

impl UniPc {
    /// `UniPCMultistepScheduler.from_config(cfg)` + `set_timesteps(steps)`.
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self, String> {
        let bh2 = match cfg.solver_type.as_deref().unwrap_or("bh2") {
            "bh1" => false,
            "bh2" | "midpoint" | "heun" | "logrho" => true,
            other => return Err(format!("unsupported solver_type `{other}` (bh1 or bh2)")),
        };
        if cfg.solver_p.as_ref().is_some_and(|v| !v.is_null()) {
            return Err("solver_p is not supported".into());
        }
        let solver_order = cfg.solver_order.unwrap_or(2);
        if solver_order == 0 {
            return Err("solver_order must be at least 1".into());
        }
        let sched = MultistepSchedule::new(cfg, steps, f64::NEG_INFINITY)?;
        Ok(UniPc {
            sched,
            prediction: Prediction::parse(cfg.prediction_type.as_deref())?,
            threshold: Threshold::from_config(cfg),
            predict_x0: cfg.predict_x0.unwrap_or(true),
            bh2,
            solver_order,
            lower_order_final: cfg.lower_order_final.unwrap_or(true),
            disable_corrector: cfg.disable_corrector.clone().unwrap_or_default(),
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
            this_order: 1,
            last_sample: None,
        })
    }

    fn convert(&self, mo: &Tensor, sample: &Tensor, i: usize) -> candle_core::Result<Tensor> {
        let (alpha, sigma) = alpha_sigma_t(self.sched.sigmas[i]);
        if self.predict_x0 {
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
        match self.prediction {
            Prediction::Epsilon => Ok(mo.clone()),
            Prediction::Sample => div_s(&(sample - mul_s(mo, alpha)?)?, sigma),
            Prediction::VPrediction => mul_s(mo, alpha)? + mul_s(sample, sigma)?,
        }
    }

    /// `x_t_` of both updates: the first-order part from `x` at `s0` to `t`.
    fn base(
        &self,
        x: &Tensor,
        m0: &Tensor,
        (alpha_t, sigma_t): (f32, f32),
        (alpha_s0, sigma_s0): (f32, f32),
        h_phi_1: f32,
    ) -> candle_core::Result<Tensor> {
        if self.predict_x0 {
            mul_s(x, sigma_t / sigma_s0)? - mul_s(m0, alpha_t * h_phi_1)?
        } else {
            mul_s(x, alpha_t / alpha_s0)? - mul_s(m0, sigma_t * h_phi_1)?
        }
    }

    /// The UniP predictor from step `i` to `i + 1` (`multistep_uni_p_bh_update`).
    fn predict(&self, sample: &Tensor, i: usize, order: usize) -> candle_core::Result<Tensor> {
        let s = &self.sched.sigmas;
        let n = self.model_outputs.len();
        let m0 = history(&self.model_outputs, n - 1)?;
        let at = alpha_sigma_t(s[i + 1]);
        let as0 = alpha_sigma_t(s[i]);
        let lambda_s0 = lambda(as0.0, as0.1);
        let h = lambda(at.0, at.1) - lambda_s0;
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for k in 1..order {
            let si = i.checked_sub(k).ok_or_else(|| {
                candle_core::Error::Msg("UniPC: predictor order exceeds history".into())
            })?;
            let mi = history(&self.model_outputs, n - 1 - k)?;
            let (a, sg) = alpha_sigma_t(s[si]);
            let rk = (lambda(a, sg) - lambda_s0) / h;
            rks.push(rk);
            d1s.push(div_s(&(mi - m0)?, rk)?);
        }
        rks.push(1.0);
        let c = coeffs(&rks, h, order, self.predict_x0, self.bh2);
        let x_t_ = self.base(sample, m0, at, as0, c.h_phi_1)?;
        let rhos: Vec<f32> = if d1s.is_empty() {
            Vec::new()
        } else if order == 2 {
            vec![0.5]
        } else {
            let m = order - 1;
            let a: Vec<Vec<f32>> = c.r[..m].iter().map(|row| row[..m].to_vec()).collect();
            solve(a, c.b[..m].to_vec())?
        };
        let scale = if self.predict_x0 { at.0 } else { at.1 } * c.b_h;
        match weighted_sum(&rhos, &d1s)? {
            Some(pred_res) => x_t_ - mul_s(&pred_res, scale)?,
            None => Ok(x_t_),
        }
    }

    /// The UniC corrector of the sample at step `i` (`multistep_uni_c_bh_update`).
    fn correct(
        &self,
        model_t: &Tensor,
        last_sample: &Tensor,
        i: usize,
        order: usize,
    ) -> candle_core::Result<Tensor> {
        let s = &self.sched.sigmas;
        let n = self.model_outputs.len();
        let m0 = history(&self.model_outputs, n - 1)?;
        let at = alpha_sigma_t(s[i]);
        let as0 = alpha_sigma_t(s[i - 1]);
        let lambda_s0 = lambda(as0.0, as0.1);
        let h = lambda(at.0, at.1) - lambda_s0;
        let mut rks = Vec::with_capacity(order);
        let mut d1s = Vec::with_capacity(order);
        for k in 1..order {
            let si = i.checked_sub(k + 1).ok_or_else(|| {
                candle_core::Error::Msg("UniPC: corrector order exceeds history".into())
            })?;
            let mi = history(&self.model_outputs, n - 1 - k)?;
            let (a, sg) = alpha_sigma_t(s[si]);
            let rk = (lambda(a, sg) - lambda_s0) / h;
            rks.push(rk);
            d1s.push(div_s(&(mi - m0)?, rk)?);
        }
        rks.push(1.0);
        let c = coeffs(&rks, h, order, self.predict_x0, self.bh2);
        let x_t_ = self.base(last_sample, m0, at, as0, c.h_phi_1)?;
        let rhos = if order == 1 {
            vec![0.5f32]
        } else {
            solve(c.r.clone(), c.b.clone())?
        };
        let d1_t = (model_t - m0)?;
        let last = mul_s(&d1_t, rhos[rhos.len() - 1])?;
        let inner = match weighted_sum(&rhos[..rhos.len() - 1], &d1s)? {
            Some(corr_res) => (corr_res + last)?,
            None => last,
        };
        let scale = if self.predict_x0 { at.0 } else { at.1 } * c.b_h;
        x_t_ - mul_s(&inner, scale)?
    }
}

impl Scheduler for UniPc {
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
        _noise: &mut dyn NoiseFn,
    ) -> candle_core::Result<Tensor> {
        let len = self.sched.timesteps.len();
        check_index(i, len)?;
        let dtype = sample.dtype();
        let mut sample = f32t(sample)?;
        let mo = f32t(model_output)?;
        let use_corrector = i > 0 && !self.disable_corrector.contains(&(i - 1));
        let converted = self.convert(&mo, &sample, i)?;
        if use_corrector {
            if let Some(last) = &self.last_sample {
                sample = self.correct(&converted, last, i, self.this_order)?;
            }
        }
        self.model_outputs.rotate_left(1);
        if let Some(slot) = self.model_outputs.last_mut() {
            *slot = Some(converted);
        }
        let this_order = if self.lower_order_final {
            self.solver_order.min(len - i)
        } else {
            self.solver_order
        };
        self.this_order = this_order.min(self.lower_order_nums + 1);
        let prev = self.predict(&sample, i, self.this_order)?;
        self.last_sample = Some(sample);
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

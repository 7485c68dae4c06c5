//! Expansion of a validated spec into one [`ImageRequest`] per image.

use super::types::{GenParams, ImageRequest, Job, Spec};
use super::values::apply_grid_value;

/// The grid points of a job, in expansion order: the cartesian product of its axes, the first
/// axis outermost, each axis's values in the order written. A job without a grid has one point.
///
/// Each point is the job's params with the point's values applied, and its (field, value) pairs.
/// Values [`values::apply_grid_value`](super::values::apply_grid_value) rejects (only possible in
/// a hand-built `Spec`) leave the field as it was.
pub fn grid_points(job: &Job) -> Vec<(GenParams, Vec<(String, String)>)> {
    let mut points = vec![(job.params.clone(), Vec::new())];
    for axis in &job.grid {
        if axis.values.is_empty() {
            continue;
        }
        let mut next = Vec::with_capacity(points.len().saturating_mul(axis.values.len()));
        for (params, labels) in &points {
            for value in &axis.values {
                let mut p = params.clone();
                let _ = apply_grid_value(&mut p, &axis.field, value);
                let mut l = labels.clone();
                l.push((axis.field.clone(), value.clone()));
                next.push((p, l));
            }
        }
        points = next;
    }
    points
}

/// How many images a job asks for: prompts × grid points × seeds.
pub fn job_image_count(job: &Job) -> usize {
    let points = job
        .grid
        .iter()
        .filter(|a| !a.values.is_empty())
        .fold(1usize, |acc, a| acc.saturating_mul(a.values.len()));
    job.prompts
        .len()
        .saturating_mul(points)
        .saturating_mul(job.seeds.len())
}

/// How many images a spec asks for (the length of [`expand`]'s result).
pub fn image_count(spec: &Spec) -> usize {
    spec.jobs
        .iter()
        .fold(0usize, |acc, j| acc.saturating_add(job_image_count(j)))
}

/// Expands a spec into its images, in this order:
///
/// for each job (in spec order) → for each prompt (in order) → for each grid point (cartesian
/// product, first axis outermost, values in written order) → for each seed (in order).
///
/// Each image's params are the job's (defaults already merged), then the grid point's values.
/// The negative prompt is, from strongest to weakest: a `negative_prompt` grid value, the
/// prompt's own `negative_prompt`, the job's (or `defaults:`') `negative_prompt`.
pub fn expand(spec: &Spec) -> Vec<ImageRequest> {
    let total = spec
        .jobs
        .iter()
        .fold(0usize, |acc, j| acc.saturating_add(job_image_count(j)));
    let mut out = Vec::with_capacity(total.min(1 << 26));
    for (job_index, job) in spec.jobs.iter().enumerate() {
        let points = grid_points(job);
        for (prompt_index, entry) in job.prompts.iter().enumerate() {
            for (grid_index, (point, labels)) in points.iter().enumerate() {
                let mut params = point.clone();
                let grid_negative = labels.iter().any(|(f, _)| f == "negative_prompt");
                if !grid_negative {
                    if let Some(n) = &entry.negative_prompt {
                        params.negative_prompt.clone_from(n);
                    }
                }
                for &seed in &job.seeds {
                    out.push(ImageRequest {
                        job: job.name.clone(),
                        job_index,
                        prompt_index,
                        grid_index,
                        model: job.model.clone(),
                        prompt: entry.prompt.clone(),
                        seed,
                        params: params.clone(),
                        grid_point: labels.clone(),
                    });
                }
            }
        }
    }
    out
}

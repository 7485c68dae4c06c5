//! Planning a million images: build the requests, compute their keys, plan.
//! `cargo bench --bench plan` prints the time of each part and the peak RSS.

use sd_run::cache::{image_keys, KeyContext, SafetyKey};
use sd_run::plan::plan;
use sd_run::spec::{GenParams, ImageRequest, SafetyPolicy, Spec};
use std::collections::BTreeMap;
use std::time::Instant;

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    const PROMPTS: usize = 1000;
    const SEEDS: u64 = 1000;
    let total = Instant::now();

    let t = Instant::now();
    let params = GenParams::default();
    let prompts: Vec<String> = (0..PROMPTS)
        .map(|i| format!("prompt number {i}, a detailed illustration"))
        .collect();
    let mut requests = Vec::with_capacity(PROMPTS * SEEDS as usize);
    for (pi, prompt) in prompts.iter().enumerate() {
        for seed in 0..SEEDS {
            requests.push(ImageRequest {
                job: "bench".to_string(),
                job_index: 0,
                prompt_index: pi,
                grid_index: 0,
                model: "sd15".to_string(),
                prompt: prompt.clone(),
                seed,
                params: params.clone(),
                grid_point: Vec::new(),
            });
        }
    }
    let t_build = t.elapsed();

    let t = Instant::now();
    let ctx = KeyContext {
        model_digest: "ab".repeat(32),
        safety: SafetyKey::off(),
        ..KeyContext::default()
    };
    let keys = image_keys(&requests, |_| &ctx);
    let t_keys = t.elapsed();

    let t = Instant::now();
    let cached = vec![false; requests.len()];
    let spec = Spec {
        file: "bench.yaml".into(),
        output: "out".into(),
        models: BTreeMap::new(),
        memory_budget: None,
        safety: SafetyPolicy::default(),
        jobs: vec![],
    };
    let p = plan(&requests, &keys, &cached, &spec);
    let t_plan = t.elapsed();

    let total = total.elapsed();
    println!(
        "requests: {} built in {:.3} s",
        requests.len(),
        t_build.as_secs_f64()
    );
    println!("keys:     {} in {:.3} s", keys.len(), t_keys.as_secs_f64());
    println!(
        "plan:     {} to make, {} batches, {} stages, {} loads in {:.3} s",
        p.to_make,
        p.batches(),
        p.stages.len(),
        p.model_loads,
        t_plan.as_secs_f64()
    );
    println!("total:    {:.3} s", total.as_secs_f64());
    match peak_rss_kib() {
        Some(k) => println!("peak RSS: {:.1} MiB", k as f64 / 1024.0),
        None => println!("peak RSS: unknown"),
    }
    drop((requests, keys, p));
    // Weight digests: sha256 of a 256 MiB file (page-cached, so this is the hashing speed).
    let file = std::env::temp_dir().join(format!("sd-run-bench-digest-{}", std::process::id()));
    let data: Vec<u8> = (0..256u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    if std::fs::write(&file, &data).is_ok() {
        drop(data);
        let _ = sd_run::cache::sha256_file(&file);
        let t = Instant::now();
        let ok = sd_run::cache::sha256_file(&file).is_ok();
        let secs = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_file(&file);
        if ok {
            println!(
                "digest:   256 MiB in {secs:.3} s ({:.0} MiB/s)",
                256.0 / secs
            );
        }
    }
}

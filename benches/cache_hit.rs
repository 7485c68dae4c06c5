//! Re-running a finished 10,000-image campaign: everything is cached, so the run is
//! `Campaign::prepare` (parse, expand, digest the model, key every image, open the store) +
//! the cached flags (each PNG checked against its recorded digest) + the plan. Goal: under 2 s.
//!
//! The store is filled directly through the store API (`write_image`, `append_manifest`) with
//! small PNGs, one per image, so no image is generated. `cargo bench --bench cache_hit`.

use sd_run::cache::{DeviceKind, Store};
use sd_run::output::record::{ImageStatus, ManifestRecord, SafetyRecord};
use sd_run::plan::{plan_with, ModelSizes};
use sd_run::run::campaign::{Campaign, Fetch};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const PROMPTS: usize = 100;
const SEEDS: usize = 100;

fn peak_rss_mib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(line.split_whitespace().nth(1)?.parse::<u64>().ok()? / 1024)
}

/// An 8x8 RGB PNG whose pixels depend on `i` (so every file differs).
fn small_png(i: usize) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, 8, 8);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc.write_header().expect("png header");
        let data: Vec<u8> = (0..8 * 8 * 3)
            .map(|j| ((i * 31 + j * 7) % 251) as u8)
            .collect();
        w.write_image_data(&data).expect("png data");
    }
    out
}

fn write_spec(dir: &Path, model: &Path) -> PathBuf {
    let prompts: Vec<String> = (0..PROMPTS)
        .map(|i| format!("      - \"prompt {i}: a lighthouse at dusk, oil painting\""))
        .collect();
    let spec = format!(
        "version: 1\noutput: {out}\ndefaults:\n  steps: 4\n  size: 64x64\n  batch_size: 4\nmodels:\n  tiny:\n    source: {model}\nsafety:\n  checker: off\njobs:\n  - name: big\n    model: tiny\n    prompts:\n{prompts}\n    seeds: {{ from: 0, count: {SEEDS} }}\n",
        out = dir.join("out").display(),
        model = model.display(),
        prompts = prompts.join("\n"),
    );
    let path = dir.join("campaign.yaml");
    std::fs::write(&path, spec).expect("write spec");
    path
}

/// prepare + cached flags + plan; returns (prepare, cached, plan) times and the hit count.
fn rerun(spec: &Path) -> (Duration, Duration, Duration, usize) {
    let t = Instant::now();
    let c = Campaign::prepare(spec, DeviceKind::Cpu, Fetch::LocalOnly).expect("prepare");
    let t_prepare = t.elapsed();
    let t = Instant::now();
    let cached = c.cached();
    let t_cached = t.elapsed();
    let t = Instant::now();
    let mut sizes = ModelSizes::new();
    for (name, m) in &c.models {
        sizes.insert(name.clone(), ModelSizes::weights_size(&m.dir));
    }
    let plan = plan_with(&c.requests, &c.keys, &cached, &c.spec, &sizes);
    let t_plan = t.elapsed();
    assert_eq!(plan.to_make, 0, "every image is cached");
    (
        t_prepare,
        t_cached,
        t_plan,
        cached.iter().filter(|h| **h).count(),
    )
}

fn main() {
    let root = std::env::temp_dir().join(format!("sd-run-bench-cache-hit-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("temp dir");
    // Digests are remembered in the cache folder: keep this bench's own.
    std::env::set_var("SD_RUN_CACHE", root.join("cache"));
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/models/tiny-sd15");
    let spec = write_spec(&root, &model);

    let t = Instant::now();
    let c = Campaign::prepare(&spec, DeviceKind::Cpu, Fetch::LocalOnly).expect("prepare");
    assert_eq!(c.requests.len(), PROMPTS * SEEDS);
    let store = Store::open(c.store.root()).expect("store");
    for (i, (r, key)) in c.requests.iter().zip(&c.keys).enumerate() {
        let png = small_png(i);
        let (path, sha) = store
            .write_image(key, &Store::image_dir(key), &png)
            .expect("write image");
        let rec = ManifestRecord {
            key: key.clone(),
            path: Some(path),
            file_sha256: Some(sha),
            job: r.job.clone(),
            model: r.model.clone(),
            prompt: r.prompt.clone(),
            negative_prompt: String::new(),
            seed: r.seed,
            steps: 4,
            guidance: 7.5,
            scheduler: "ddim".into(),
            width: 64,
            height: 64,
            noise: "torch-cpu".into(),
            refiner: None,
            safety: SafetyRecord::default(),
            status: ImageStatus::Ok,
            seconds: 0.0,
            model_hash: String::new(),
            grid: Vec::new(),
            error: None,
        };
        store.append_manifest(&rec).expect("append manifest");
    }
    drop(c);
    println!(
        "cache_hit: filled a store with {} images in {:.1} s",
        PROMPTS * SEEDS,
        t.elapsed().as_secs_f64()
    );

    let mut totals = Vec::new();
    for run in 1..=3 {
        let (p, c, pl, hits) = rerun(&spec);
        let total = p + c + pl;
        totals.push(total);
        println!(
            "cache_hit: re-run {run}: prepare {:.3} s, cached flags {:.3} s ({hits} hits), plan {:.3} s, total {:.3} s",
            p.as_secs_f64(),
            c.as_secs_f64(),
            pl.as_secs_f64(),
            total.as_secs_f64()
        );
    }
    totals.sort();
    let median = totals[totals.len() / 2].as_secs_f64();
    println!(
        "cache_hit: median {median:.3} s for {} images (goal < 2 s): {}",
        PROMPTS * SEEDS,
        if median < 2.0 { "met" } else { "NOT met" }
    );
    if let Some(rss) = peak_rss_mib() {
        println!("cache_hit: peak RSS {rss} MiB");
    }
    let _ = std::fs::remove_dir_all(&root);
}

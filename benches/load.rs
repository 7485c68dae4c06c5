//! Model load, memory-mapped safetensors to a ready pipeline (`Pipeline::load`): the tiny
//! golden model (median of 20 loads) and, when `scripts/bench-vs-diffusers.sh` has made it,
//! the random-weight model with SD 1.5 dimensions in `.bench/sd15-random` (or
//! `SD_RUN_BENCH_MODEL`). `cargo bench --bench load`.

use candle_core::{DType, Device};
use sd_run::engine::pipeline::{LoadOptions, Pipeline};
use sd_run::spec::MemoryPolicy;
use std::path::{Path, PathBuf};
use std::time::Instant;

fn weights_mib(dir: &Path) -> f64 {
    let mut total = 0u64;
    for comp in ["unet", "vae", "text_encoder", "text_encoder_2"] {
        if let Ok(rd) = std::fs::read_dir(dir.join(comp)) {
            for e in rd.flatten() {
                if e.path().extension().is_some_and(|x| x == "safetensors") {
                    total += e.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
        }
    }
    total as f64 / (1 << 20) as f64
}

fn time_loads(name: &str, dir: &Path, runs: usize) {
    let opts = LoadOptions {
        device: Device::Cpu,
        dtype: DType::F32,
        memory: MemoryPolicy::default(),
    };
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let pipe = Pipeline::load(dir, &opts).expect("load");
        times.push(t.elapsed().as_secs_f64());
        drop(pipe);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    let mib = weights_mib(dir);
    println!(
        "load: {name}: {mib:.0} MiB of weights, median {median:.3} s over {runs} loads ({:.0} MiB/s), min {:.3} s",
        mib / median,
        times[0]
    );
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    time_loads(
        "tiny-sd15",
        &root.join("tests/fixtures/golden/models/tiny-sd15"),
        20,
    );
    let big = std::env::var_os("SD_RUN_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join(".bench/sd15-random"));
    if big.join("model_index.json").is_file() {
        // Read once so every load comes from the page cache, as a warm re-run would.
        for comp in ["unet", "vae", "text_encoder"] {
            if let Ok(rd) = std::fs::read_dir(big.join(comp)) {
                for e in rd.flatten() {
                    let _ = std::fs::read(e.path());
                }
            }
        }
        time_loads("sd15-random (SD 1.5 dimensions)", &big, 3);
    } else {
        println!(
            "load: {} not found (scripts/bench-vs-diffusers.sh makes it): skipped",
            big.display()
        );
    }
}

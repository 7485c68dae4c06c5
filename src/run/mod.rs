//! Executes a campaign: `sd-run run`, `plan`, `validate` and `status`, with the exit codes of
//! the spec (0 all images present, 1 some failed, 2 invalid spec or command line).

pub mod campaign;
pub mod events;
pub mod execute;
pub mod gallery;
pub mod pool;
pub mod status;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::cache::DeviceKind;
use crate::plan::{plan_shard, ModelSizes, Plan, Rates, Shard};
use crate::spec::{self, MachineConfig, SpecErrors};
use campaign::{Campaign, Fetch};
use events::Event;

/// Why a command could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Spec(SpecErrors),
    #[error("model {model}: {message}")]
    Model { model: String, message: String },
    #[error("device {0}")]
    Device(String),
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Io(String),
}

impl RunError {
    /// The exit code: 2 for what the user must fix in the spec or command line, 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Spec(_) | RunError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// A progress bar on a terminal, JSON lines otherwise.
    Auto,
    Json,
    Text,
}

/// `sd-run run` options.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub spec: PathBuf,
    pub config: Option<PathBuf>,
    pub shard: Option<String>,
    pub device: Option<String>,
    pub dry_run: bool,
    pub log: LogFormat,
}

/// The machine config: `--config`, else `sd-run.toml` next to the spec, else defaults.
fn machine_config(spec: &Path, config: Option<&Path>) -> Result<Option<MachineConfig>, RunError> {
    let path = match config {
        Some(p) => Some(p.to_path_buf()),
        None => spec::find_config(spec),
    };
    match path {
        Some(p) => MachineConfig::load(&p).map(Some).map_err(RunError::Spec),
        None => Ok(None),
    }
}

/// Chooses the device: the flag, else the config, else auto (the best this build supports).
pub fn device_kind(
    flag: Option<&str>,
    config: Option<&MachineConfig>,
) -> Result<DeviceKind, RunError> {
    let asked = flag
        .map(str::to_string)
        .or_else(|| config.map(|c| c.device.as_str().to_string()))
        .unwrap_or_else(|| "auto".into());
    match asked.as_str() {
        "cpu" => Ok(DeviceKind::Cpu),
        "cuda" => Ok(DeviceKind::Cuda),
        "metal" => Ok(DeviceKind::Metal),
        "auto" => Ok(
            if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                DeviceKind::Cuda
            } else if cfg!(feature = "metal") && candle_core::utils::metal_is_available() {
                DeviceKind::Metal
            } else {
                DeviceKind::Cpu
            },
        ),
        other => Err(RunError::Usage(format!(
            "--device {other}: expected cpu, cuda, metal or auto"
        ))),
    }
}

/// Parses `--shard K/N` or `--shard auto` (Kubernetes Indexed Jobs: `JOB_COMPLETION_INDEX` with
/// `SD_RUN_SHARD_COUNT`; Slurm arrays: `SLURM_ARRAY_TASK_ID` with `SLURM_ARRAY_TASK_COUNT`, from
/// `SLURM_ARRAY_TASK_MIN`).
pub fn parse_shard(s: Option<&str>) -> Result<Shard, RunError> {
    let Some(s) = s else { return Ok(Shard::ALL) };
    if s != "auto" && !s.starts_with("auto/") {
        return Shard::parse(s).map_err(|e| RunError::Usage(e.to_string()));
    }
    let env = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    let count_flag = s
        .strip_prefix("auto/")
        .and_then(|n| n.parse::<usize>().ok());
    let (index, count) = if let Some(i) = env("JOB_COMPLETION_INDEX") {
        (Some(i), count_flag.or_else(|| env("SD_RUN_SHARD_COUNT")))
    } else if let Some(id) = env("SLURM_ARRAY_TASK_ID") {
        let min = env("SLURM_ARRAY_TASK_MIN").unwrap_or(0);
        (
            id.checked_sub(min),
            count_flag.or_else(|| env("SLURM_ARRAY_TASK_COUNT")),
        )
    } else {
        (None, None)
    };
    match (index, count) {
        (Some(k), Some(n)) => Shard::parse(&format!("{k}/{n}")).map_err(|e| RunError::Usage(e.to_string())),
        _ => Err(RunError::Usage(
            "--shard auto: set JOB_COMPLETION_INDEX with SD_RUN_SHARD_COUNT (or --shard auto/N), or run as a Slurm array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT)".into(),
        )),
    }
}

/// Plans a prepared campaign (one shard of it).
fn make_plan(c: &Campaign, shard: Shard) -> Plan {
    let cached = c.cached();
    let mut sizes = ModelSizes::new();
    for (name, m) in &c.models {
        sizes.insert(name.clone(), ModelSizes::weights_size(&m.dir));
    }
    plan_shard(&c.requests, &c.keys, &cached, &c.spec, &sizes, shard)
}

fn report_error(e: &RunError) -> u8 {
    eprintln!("{e}");
    e.exit_code()
}

/// `sd-run validate SPEC`.
pub fn validate_command(spec_path: &Path) -> u8 {
    match spec::load(spec_path) {
        Ok(s) => {
            let n = spec::expand(&s).len();
            println!(
                "{}: ok ({} jobs, {n} images)",
                spec_path.display(),
                s.jobs.len()
            );
            0
        }
        Err(e) => {
            eprintln!("{e}");
            2
        }
    }
}

/// `sd-run plan SPEC [--json] [--shard K/N]`.
pub fn plan_command(
    spec_path: &Path,
    config: Option<&Path>,
    shard: Option<&str>,
    json: bool,
) -> u8 {
    let go = || -> Result<(), RunError> {
        let shard = parse_shard(shard)?;
        let mc = machine_config(spec_path, config)?;
        let device = device_kind(None, mc.as_ref())?;
        let c = Campaign::prepare(spec_path, device, Fetch::LocalOnly)?;
        let plan = make_plan(&c, shard);
        let rates = Rates::load(&c.spec.output).ok();
        if json {
            let mut v = plan.to_json(&c.requests, rates.as_ref());
            v["warnings"] = serde_json::json!(c.warnings);
            println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        } else {
            for w in &c.warnings {
                eprintln!("warning: {w}");
            }
            print!("{}", plan.summary(&c.requests, rates.as_ref()));
        }
        Ok(())
    };
    match go() {
        Ok(()) => 0,
        Err(e) => report_error(&e),
    }
}

/// `sd-run run SPEC`.
pub fn run_command(opts: &RunOptions) -> u8 {
    let interrupt = Arc::new(AtomicBool::new(false));
    {
        let flag = interrupt.clone();
        let _ = ctrlc::set_handler(move || {
            if flag.swap(true, Ordering::SeqCst) {
                eprintln!("\ninterrupted again: stopping now; images already written are kept");
                std::process::exit(130);
            }
            eprintln!("\ninterrupt: finishing the current batch, then stopping; run the same command again to make the rest (Ctrl-C again stops at once)");
        });
    }
    let go = || -> Result<u8, RunError> {
        let shard = parse_shard(opts.shard.as_deref())?;
        let mc = machine_config(&opts.spec, opts.config.as_deref())?;
        let device = device_kind(opts.device.as_deref(), mc.as_ref())?;
        let mut reporter = events::reporter(opts.log);
        let fetch = if opts.dry_run {
            Fetch::LocalOnly
        } else {
            Fetch::Download
        };
        let mut c = Campaign::prepare(&opts.spec, device, fetch)?;
        if shard.count > 1 {
            let name = crate::cache::Store::shard_manifest_name(shard.index, shard.count);
            c.store = c.store.with_manifest_name(name);
        }
        for w in &c.warnings {
            reporter.event(&Event::Warning { message: w.clone() });
        }
        let plan = make_plan(&c, shard);
        if opts.dry_run {
            let rates = Rates::load(&c.spec.output).ok();
            print!("{}", plan.summary(&c.requests, rates.as_ref()));
            return Ok(0);
        }
        reporter.event(&Event::Planned {
            images: plan.images,
            cached: plan.cached,
            to_make: plan.to_make,
            model_loads: plan.model_loads,
            batches: plan.batches(),
        });
        let summary = execute::Executor::new(&c, reporter.as_mut(), interrupt.clone())?.run(&plan);
        if let Err(e) = gallery::write_gallery(&c) {
            reporter.event(&Event::Warning {
                message: format!("report: {e}"),
            });
        }
        let code = if summary.failed > 0 || summary.interrupted {
            1
        } else {
            0
        };
        reporter.event(&Event::Summary(summary));
        Ok(code)
    };
    match go() {
        Ok(code) => code,
        Err(e) => report_error(&e),
    }
}

/// `sd-run status SPEC [--json] [--shards N]`: how much of the campaign exists, per job and per
/// shard (for N, else for every N found in `manifest.d/`), from the store alone.
pub fn status_command(spec_path: &Path, json: bool, shards: Option<usize>) -> u8 {
    let go = || -> Result<(), RunError> {
        let mc = machine_config(spec_path, None)?;
        let device = device_kind(None, mc.as_ref())?;
        status::status(spec_path, device, shards, json)
    };
    match go() {
        Ok(()) => 0,
        Err(e) => report_error(&e),
    }
}

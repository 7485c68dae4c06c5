//! The `sd-run` command line: parses arguments, calls the library, maps outcomes to exit codes
//! (0 all images present, 1 some images failed, 2 invalid spec or command line).

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

use sd_run::run::{self, LogFormat, RunOptions};

#[derive(Parser)]
#[command(
    name = "sd-run",
    version,
    about = "Declarative Stable Diffusion campaigns: a YAML spec in, images out"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Make every image the spec asks for that is not already in its output folder.
    Run(RunArgs),
    /// Show what a run would make, what is cached, the batches and model loads; runs nothing.
    Plan {
        spec: PathBuf,
        /// One JSON object instead of the readable summary.
        #[arg(long)]
        json: bool,
        /// Plan one shard K/N of the campaign.
        #[arg(long)]
        shard: Option<String>,
        #[command(flatten)]
        machine: MachineArgs,
    },
    /// Check a spec: exit 0, or print every problem as FILE:LINE:COL: message and exit 2.
    Validate { spec: PathBuf },
    /// How much of the campaign exists, per job and per shard, from the store alone.
    Status {
        spec: PathBuf,
        #[arg(long)]
        json: bool,
        /// Report shards K/N for this N (default: every N found in manifest.d/).
        #[arg(long)]
        shards: Option<usize>,
    },
    /// Serve the engine over HTTP: jobs in, images out, from one queue and one worker.
    Serve {
        /// Listen address (default: the config's `server.addr`, else 127.0.0.1:7860).
        #[arg(long)]
        addr: Option<String>,
        /// Machine settings: models, store, limits (default: ./sd-run.toml if present).
        #[arg(long)]
        config: Option<PathBuf>,
        /// cpu | cuda | metal (default: the config's `device`, else auto).
        #[arg(long)]
        device: Option<String>,
        /// On SIGTERM, how long to wait for the current batch before exiting anyway.
        #[arg(long, default_value_t = 60)]
        drain_seconds: u64,
    },
}

#[derive(Args)]
struct MachineArgs {
    /// Machine settings (default: sd-run.toml next to the spec, if any).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Args)]
struct RunArgs {
    spec: PathBuf,
    /// Make only shard K of N (K in 0..N), or `auto` from the scheduler's environment.
    #[arg(long)]
    shard: Option<String>,
    /// cpu | cuda | metal (default: the config's `device`, else auto).
    #[arg(long)]
    device: Option<String>,
    /// Plan and print what would be made; make nothing.
    #[arg(long)]
    dry_run: bool,
    /// Progress as a bar on a terminal (auto), or one JSON event per line.
    #[arg(long, value_parser = ["auto", "json", "text"], default_value = "auto")]
    log: String,
    #[command(flatten)]
    machine: MachineArgs,
}

/// Subcommand names; anything else in first position is taken as a spec path (`sd-run SPEC`).
const COMMANDS: [&str; 6] = ["run", "plan", "validate", "status", "serve", "help"];

fn main() -> ExitCode {
    let mut args: Vec<String> = std::env::args().collect();
    if let Some(first) = args.get(1) {
        let is_flag = first.starts_with('-');
        if !is_flag && !COMMANDS.contains(&first.as_str()) {
            args.insert(1, "run".into());
        }
    }
    let cli = Cli::parse_from(args);
    let code = match cli.command {
        Command::Run(a) => {
            let log = match a.log.as_str() {
                "json" => LogFormat::Json,
                "text" => LogFormat::Text,
                _ => LogFormat::Auto,
            };
            let opts = RunOptions {
                spec: a.spec,
                config: a.machine.config,
                shard: a.shard,
                device: a.device,
                dry_run: a.dry_run,
                log,
            };
            run::run_command(&opts)
        }
        Command::Plan {
            spec,
            json,
            shard,
            machine,
        } => run::plan_command(&spec, machine.config.as_deref(), shard.as_deref(), json),
        Command::Validate { spec } => run::validate_command(&spec),
        Command::Status { spec, json, shards } => run::status_command(&spec, json, shards),
        Command::Serve {
            addr,
            config,
            device,
            drain_seconds,
        } => sd_run::serve::serve_command(&sd_run::serve::ServeOptions {
            addr,
            config,
            device,
            drain_seconds,
        }),
    };
    ExitCode::from(code)
}

//! `sd-run serve`: the campaign engine behind an HTTP API.
//!
//! - [`http`]: the routes (axum on tokio), bearer token, body limit, JSON refusals.
//! - [`state`]: jobs, the queue, limits and metrics behind one mutex; submission validates a
//!   client spec against the server's models, keys its images, answers what the store has and
//!   writes the job file (`<store>/.sd-run/jobs/<id>.json`) before the 202.
//! - [`worker`]: one std thread owns the device and the loaded models and drains the queue in
//!   swap-aware order ([`queue`]); models stay loaded across jobs within the memory budget.
//! - [`jobs`]: job states and files; a restart resumes every job whose file is not final.
//!
//! SIGTERM or Ctrl-C: `/readyz` turns false and submissions get 503, the worker finishes its
//! current batch and parks the rest (their files stay queued), then the process exits; if the
//! batch outlasts `--drain-seconds` the process exits anyway (nothing partial is ever written).

pub mod http;
pub mod jobs;
pub mod metrics;
pub mod queue;
pub mod state;
pub mod worker;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::cache::Store;
use crate::run::execute::Resident;
use crate::spec::MachineConfig;
use state::{Settings, Shared};

/// Largest request body by default (specs are small; 1 MiB is plenty).
pub const DEFAULT_MAX_BODY: usize = 1 << 20;

/// Why a request is refused; each becomes a status and a JSON body `{error, message}`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    #[error("missing or wrong `Authorization: Bearer` token")]
    Unauthorized,
    #[error("the spec is invalid")]
    Invalid(Vec<String>),
    #[error("{0}")]
    BadRequest(String),
    #[error("the body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    #[error("the job asks for {images} images; this server takes at most {limit} per job")]
    TooManyImages { images: usize, limit: usize },
    #[error("the job needs {to_make} images made; the queue holds at most {limit}: split it")]
    JobTooBig { to_make: usize, limit: usize },
    #[error("the queue is full ({queued} images waiting, limit {limit}); retry in {retry_after}s")]
    QueueFull {
        queued: usize,
        limit: usize,
        retry_after: u64,
    },
    #[error("the server is shutting down and takes no new work")]
    Draining,
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// A short machine-readable reason (the `error` field, and the metrics label).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::Invalid(_) => "invalid_spec",
            Self::BadRequest(_) => "bad_request",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::TooManyImages { .. } => "too_many_images",
            Self::JobTooBig { .. } => "job_too_big",
            Self::QueueFull { .. } => "queue_full",
            Self::Draining => "draining",
            Self::NotFound(_) => "not_found",
            Self::Conflict(_) => "conflict",
            Self::Forbidden(_) => "forbidden",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::Internal(_) => "internal",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Invalid(_) | Self::TooManyImages { .. } | Self::JobTooBig { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::BadRequest(_) => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Draining => StatusCode::SERVICE_UNAVAILABLE,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::Forbidden(_) => StatusCode::FORBIDDEN,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": self.reason(), "message": self.to_string()});
        match &self {
            Self::Invalid(messages) => body["messages"] = json!(messages),
            Self::QueueFull {
                queued,
                limit,
                retry_after,
            } => {
                body["queued"] = json!(queued);
                body["queue_limit"] = json!(limit);
                body["retry_after"] = json!(retry_after);
            }
            Self::TooManyImages { images, limit } => {
                body["images"] = json!(images);
                body["limit"] = json!(limit);
            }
            _ => {}
        }
        let mut resp = (self.status(), axum::Json(body)).into_response();
        let h = resp.headers_mut();
        match &self {
            Self::QueueFull { retry_after, .. } => {
                if let Ok(v) = retry_after.to_string().parse() {
                    h.insert(header::RETRY_AFTER, v);
                }
            }
            Self::Draining => {
                h.insert(header::RETRY_AFTER, header::HeaderValue::from_static("30"));
            }
            Self::Unauthorized => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    header::HeaderValue::from_static("Bearer"),
                );
            }
            _ => {}
        }
        resp
    }
}

/// `sd-run serve` options.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Listen address (default: the config's `server.addr`, else 127.0.0.1:7860).
    pub addr: Option<String>,
    /// `sd-run.toml` (default: `./sd-run.toml` when it exists).
    pub config: Option<PathBuf>,
    /// cpu | cuda | metal | auto (default: the config's `device`).
    pub device: Option<String>,
    /// Longest wait for the current batch on shutdown before exiting anyway.
    pub drain_seconds: u64,
}

fn load_config(opts: &ServeOptions) -> Result<MachineConfig, String> {
    let path = opts
        .config
        .clone()
        .or_else(|| Some(PathBuf::from("sd-run.toml")).filter(|p| p.is_file()));
    match path {
        Some(p) => MachineConfig::load(&p).map_err(|e| e.to_string()),
        None => Ok(MachineConfig::default()),
    }
}

/// Builds the settings from the config and options.
fn settings(cfg: &MachineConfig, opts: &ServeOptions) -> Result<Settings, String> {
    let device =
        crate::run::device_kind(opts.device.as_deref(), Some(cfg)).map_err(|e| e.to_string())?;
    let base_dir = cfg
        .file
        .as_deref()
        .and_then(Path::parent)
        .filter(|p| !p.as_os_str().is_empty())
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let base_dir = std::path::absolute(&base_dir).unwrap_or(base_dir);
    let store_root = cfg
        .store
        .output
        .clone()
        .unwrap_or_else(|| base_dir.join("sd-run-store"));
    Ok(Settings {
        token: cfg.server.token.clone(),
        queue_limit: cfg.server.queue_limit,
        max_images_per_job: cfg.server.max_images_per_job,
        allow_client_models: cfg.server.allow_client_models,
        store_root,
        base_dir,
        models: cfg.models.clone(),
        device,
        memory_budget: cfg.memory_budget,
        policy: queue::Policy::default(),
        max_body_bytes: DEFAULT_MAX_BODY,
    })
}

/// Waits for SIGTERM or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

/// `sd-run serve`: exit code 0 after a clean shutdown, 1 when the server cannot run, 2 for a
/// bad config or command line.
pub fn serve_command(opts: &ServeOptions) -> u8 {
    let cfg = match load_config(opts) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let settings = match settings(&cfg, opts) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{e}");
            return 2;
        }
    };
    let addr = opts.addr.clone().unwrap_or_else(|| cfg.server.addr.clone());
    if settings.models.is_empty() {
        eprintln!("sd-run serve: warning: the config declares no [models.*]; jobs can only name their own sources");
    }
    // Download what the server's hub models lack now, not inside a client's request.
    let hub = crate::engine::hub::HubOptions::from_env();
    for (name, decl) in &settings.models {
        if let Err(e) = crate::engine::hub::resolve(&decl.source, decl.dtype, &hub) {
            eprintln!("sd-run serve: warning: model {name}: {e}");
        }
    }
    let store = match Store::open(&settings.store_root) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sd-run serve: store {}: {e}", settings.store_root.display());
            return 1;
        }
    };
    let _ = store.clean_temp_files();
    let resident = match Resident::new(settings.device, settings.memory_budget) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sd-run serve: {e}");
            return 1;
        }
    };
    let shared = Arc::new(Shared::new(settings, store));
    for p in shared.resume() {
        eprintln!("sd-run serve: warning: {p}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("sd-run serve: cannot start the runtime: {e}");
            return 1;
        }
    };
    let listener = match runtime.block_on(tokio::net::TcpListener::bind(&addr)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sd-run serve: cannot listen on {addr}: {e}");
            return 1;
        }
    };
    let worker = match worker::spawn(shared.clone(), resident) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("sd-run serve: cannot start the worker: {e}");
            return 1;
        }
    };
    let bound = listener.local_addr().map(|a| a.to_string()).unwrap_or(addr);
    eprintln!(
        "sd-run serve: listening on http://{bound} (store {})",
        shared.settings.store_root.display()
    );
    let drain = Duration::from_secs(opts.drain_seconds);
    let app = http::router(shared.clone());
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let code = runtime.block_on(async move {
        let drained = {
            let shared = shared.clone();
            async move {
                shutdown_signal().await;
                eprintln!("sd-run serve: stopping: finishing the current batch, parking the rest");
                shared.drain();
                let joined = tokio::task::spawn_blocking(move || {
                    let _ = worker.join();
                });
                if tokio::time::timeout(drain, joined).await.is_err() {
                    eprintln!("sd-run serve: the current batch outlasted {}s; exiting anyway (its jobs resume on restart)", drain.as_secs());
                }
                let _ = stopped_tx.send(());
            }
        };
        let server = axum::serve(listener, app).with_graceful_shutdown(drained);
        let bounded = async {
            let _ = stopped_rx.await;
            // Open connections get a moment to finish.
            tokio::time::sleep(Duration::from_secs(3)).await;
        };
        tokio::select! {
            r = server => match r {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("sd-run serve: {e}");
                    1
                }
            },
            _ = bounded => 0,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    eprintln!("sd-run serve: stopped");
    code
}

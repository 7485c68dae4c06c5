//! The HTTP API (axum): routes, bearer-token check, body limits, refusals as JSON.
//!
//! ```text
//! POST   /v1/jobs            a spec (YAML or JSON; `output` ignored) → 202 {id, state, images, cached, keys, url}
//! GET    /v1/jobs/{id}       {id, state, created, images: [{key, status, url}], counts}
//! DELETE /v1/jobs/{id}       cancels what has not started → the job as GET shows it
//! POST   /v1/generate        {model, prompt, negative_prompt, steps, guidance_scale, width, height, seed}
//! GET    /v1/images/{key}    the PNG
//! GET    /healthz, /readyz, /metrics
//! ```

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

use super::state::Shared;
use super::ApiError;

/// The router over the shared state.
pub fn router(shared: Arc<Shared>) -> Router {
    let v1 = Router::new()
        .route("/v1/jobs", post(submit_job))
        .route("/v1/jobs/{id}", get(get_job).delete(delete_job))
        .route("/v1/generate", post(generate))
        .route("/v1/images/{key}", get(get_image))
        .route_layer(axum::middleware::from_fn_with_state(shared.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/healthz", get(|| async { Json(json!({"ok": true})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(shared)
}

/// Compares two byte strings in time independent of where they differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn auth(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    if let Some(token) = &shared.settings.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        if !given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
            shared.refuse(ApiError::Unauthorized.reason());
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Reads a body up to the configured limit.
async fn read_body(shared: &Shared, headers: &HeaderMap, body: Body) -> Result<Vec<u8>, ApiError> {
    let limit = shared.settings.max_body_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::BodyTooLarge { limit });
    }
    match axum::body::to_bytes(body, limit).await {
        Ok(b) => Ok(b.to_vec()),
        Err(_) => Err(ApiError::BodyTooLarge { limit }),
    }
}

/// Validates and queues a spec off the async runtime.
async fn submit_text(shared: Arc<Shared>, text: String, label: &'static str) -> Response {
    let s = shared.clone();
    let result = tokio::task::spawn_blocking(move || s.submit(&text, label)).await;
    match result {
        Ok(Ok(a)) => {
            let location = format!("/v1/jobs/{}", a.id);
            (
                StatusCode::ACCEPTED,
                [(header::LOCATION, location)],
                Json(a.to_json()),
            )
                .into_response()
        }
        Ok(Err(e)) => refuse(&shared, e),
        Err(e) => refuse(&shared, ApiError::Internal(format!("submission task: {e}"))),
    }
}

fn refuse(shared: &Shared, e: ApiError) -> Response {
    shared.refuse(e.reason());
    e.into_response()
}

async fn submit_job(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let bytes = match read_body(&shared, &headers, body).await {
        Ok(b) => b,
        Err(e) => return refuse(&shared, e),
    };
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(_) => {
            return refuse(
                &shared,
                ApiError::BadRequest("the body is not UTF-8 text".into()),
            )
        }
    };
    submit_text(shared, text, "spec").await
}

/// `POST /v1/generate`: the single-request fields of the seed's API.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GenerateBody {
    model: Option<String>,
    prompt: String,
    #[serde(default)]
    negative_prompt: Option<String>,
    steps: Option<Value>,
    guidance_scale: Option<Value>,
    width: Option<Value>,
    height: Option<Value>,
    seed: Option<Value>,
    scheduler: Option<Value>,
}

/// A one-image spec from `/v1/generate` fields, as JSON text (one field per line so that
/// validation messages point at the field). A missing model is the server's only model; a
/// missing seed is drawn at random; a missing width or height is the other one.
fn generate_spec(g: GenerateBody, models: &[&str]) -> String {
    let mut job = serde_json::Map::new();
    job.insert("name".into(), json!("generate"));
    let model = g
        .model
        .or_else(|| (models.len() == 1).then(|| models[0].to_string()));
    if let Some(m) = model {
        job.insert("model".into(), json!(m));
    }
    let mut prompt = json!({"prompt": g.prompt});
    if let Some(n) = g.negative_prompt {
        prompt["negative_prompt"] = json!(n);
    }
    job.insert("prompts".into(), json!([prompt]));
    let seed = g.seed.unwrap_or_else(|| json!(random_seed()));
    job.insert("seeds".into(), json!([seed]));
    if let Some(s) = g.steps {
        job.insert("steps".into(), s);
    }
    if let Some(s) = g.guidance_scale {
        job.insert("guidance".into(), s);
    }
    if let Some(s) = g.scheduler {
        job.insert("scheduler".into(), s);
    }
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    if let (Some(w), Some(h)) = (
        g.width.as_ref().or(g.height.as_ref()),
        g.height.as_ref().or(g.width.as_ref()),
    ) {
        job.insert("size".into(), json!(format!("{}x{}", text(w), text(h))));
    }
    job.insert("batch_size".into(), json!(1));
    let spec = json!({"version": 1, "jobs": [Value::Object(job)]});
    serde_json::to_string_pretty(&spec).unwrap_or_default()
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let h =
        crate::cache::sha256_bytes(format!("{}:{}", t.as_nanos(), std::process::id()).as_bytes());
    u64::from_str_radix(&h[..8], 16).unwrap_or(0)
}

async fn generate(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    let bytes = match read_body(&shared, &headers, body).await {
        Ok(b) => b,
        Err(e) => return refuse(&shared, e),
    };
    let g: GenerateBody = match serde_json::from_slice(&bytes) {
        Ok(g) => g,
        Err(e) => return refuse(&shared, ApiError::Invalid(vec![format!("generate: {e}")])),
    };
    let models: Vec<&str> = shared.settings.models.keys().map(String::as_str).collect();
    let text = generate_spec(g, &models);
    submit_text(shared, text, "generate").await
}

async fn get_job(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match shared.job_view(&id) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn delete_job(State(shared): State<Arc<Shared>>, Path(id): Path<String>) -> Response {
    match shared.cancel(&id) {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn get_image(State(shared): State<Arc<Shared>>, Path(key): Path<String>) -> Response {
    if key.is_empty() || key.len() > 128 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return ApiError::NotFound(format!("no image `{key}`")).into_response();
    }
    let s = shared.clone();
    let found = tokio::task::spawn_blocking(move || {
        let rec = match s.store.lookup(&key) {
            Some(r) => Some(r),
            None => {
                let _ = s.store.refresh();
                s.store.lookup(&key)
            }
        };
        match rec {
            None => Err(ApiError::NotFound(format!("no image `{key}` in the store"))),
            Some(r) => match r.path {
                Some(p) if p.starts_with("images/") => std::fs::read(s.store.root().join(&p))
                    .map_err(|e| ApiError::Internal(format!("{p}: {e}"))),
                _ => Err(ApiError::Forbidden(format!(
                    "image `{key}` is withheld by the safety stage"
                ))),
            },
        }
    })
    .await;
    match found {
        Ok(Ok(bytes)) => (
            [
                (header::CONTENT_TYPE, "image/png"),
                (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            ],
            bytes,
        )
            .into_response(),
        Ok(Err(e)) => e.into_response(),
        Err(e) => ApiError::Internal(e.to_string()).into_response(),
    }
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let (up, draining) = {
        let g = shared.lock();
        (g.worker_up, g.draining)
    };
    if up && !draining {
        Json(json!({"ready": true})).into_response()
    } else {
        let reason = if draining {
            "draining"
        } else {
            "the worker is not running"
        };
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "reason": reason})),
        )
            .into_response()
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics_text(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_exactly() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }

    #[test]
    fn generate_fields_become_a_one_image_spec() {
        let g: GenerateBody = serde_json::from_value(json!({
            "prompt": "a red circle", "negative_prompt": "blur", "steps": 4, "guidance_scale": 6.5,
            "width": 64, "height": 32, "seed": 7
        }))
        .unwrap();
        let text = generate_spec(g, &["demo"]);
        let spec = crate::spec::load_str_with(
            &text,
            "generate",
            std::path::Path::new("."),
            &crate::spec::LoadOptions {
                allow_sources: false,
                known_models: Some(demo_models()),
            },
        )
        .unwrap();
        let job = &spec.jobs[0];
        assert_eq!(job.model, "demo");
        assert_eq!(job.seeds, vec![7]);
        assert_eq!(
            (job.params.width, job.params.height, job.params.steps),
            (64, 32, 4)
        );
        assert_eq!(job.params.guidance, 6.5);
        assert_eq!(job.prompts[0].negative_prompt.as_deref(), Some("blur"));
        assert_eq!(crate::spec::image_count(&spec), 1);
    }

    #[test]
    fn generate_errors_name_the_field() {
        let g: GenerateBody =
            serde_json::from_value(json!({"prompt": "x", "steps": 0, "width": 63})).unwrap();
        let text = generate_spec(g, &["demo"]);
        let opts = crate::spec::LoadOptions {
            allow_sources: false,
            known_models: Some(demo_models()),
        };
        let err = crate::spec::load_str_with(&text, "generate", std::path::Path::new("."), &opts)
            .unwrap_err();
        let all = err.to_string();
        assert!(all.contains("steps") || all.contains("size"), "{all}");
        assert!(all.starts_with("generate:"), "{all}");
        assert!(
            serde_json::from_value::<GenerateBody>(json!({"prompt": "x", "bogus": 1})).is_err()
        );
    }

    fn demo_models() -> std::collections::BTreeMap<String, crate::spec::ModelDecl> {
        let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/demo");
        let decl = crate::spec::ModelDecl {
            name: "demo".into(),
            source: crate::spec::ModelSource::Path { path },
            dtype: Default::default(),
            memory: Default::default(),
        };
        [("demo".to_string(), decl)].into_iter().collect()
    }
}

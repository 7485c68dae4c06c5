//! `sd-run serve` over real HTTP on loopback, with the tiny demo model: the happy path to a PNG,
//! refusals (401, 422, 429, 413, 404), idempotent resubmission, restart after a crash, SIGTERM
//! mid-batch; and an `#[ignore]`d load test (`cargo test --release --test serve -- --ignored
//! --nocapture`).

use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The binary under test, copied once per test run: a target folder shared by several
/// checkouts may see the built binary replaced while servers restart.
fn bin() -> &'static Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(|| {
        let tmp = std::env::temp_dir();
        // Copies left by earlier runs (an hour old) go.
        for e in std::fs::read_dir(&tmp).into_iter().flatten().flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok());
            if e.file_name()
                .to_string_lossy()
                .starts_with("sd-run-serve-bin-")
                && old.is_some_and(|d| d > Duration::from_secs(3600))
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let to = tmp.join(format!("sd-run-serve-bin-{}", std::process::id()));
        std::fs::copy(env!("CARGO_BIN_EXE_sd-run"), &to).unwrap();
        to
    })
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh temp folder for one test.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sd-run-serve-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Writes `sd-run.toml` for the demo model with `server` lines added to `[server]`.
fn write_config(dir: &Path, server: &str) -> PathBuf {
    write_config_with(dir, "", server, &["demo"])
}

/// Writes `sd-run.toml` with `top` lines first and each of `models` naming the demo model.
fn write_config_with(dir: &Path, top: &str, server: &str, models: &[&str]) -> PathBuf {
    let mut text = format!(
        "device = \"cpu\"\n{top}\n[store]\noutput = \"{}\"\n[server]\n{server}\n",
        dir.join("store").display()
    );
    for m in models {
        text.push_str(&format!(
            "[models.{m}]\nsource = \"{}\"\n",
            root().join("models/demo").display()
        ));
    }
    let p = dir.join("sd-run.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// An HTTP answer.
struct Resp {
    status: u16,
    headers: HashMap<String, String>,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&self.body)))
    }
}

/// A minimal HTTP/1.1 client: one request per connection (`Connection: close`).
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Resp> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    exchange(port, &bytes)
}

/// Sends raw request bytes and reads the whole answer.
fn exchange(port: u16, request: &[u8]) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.write_all(request)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if headers
        .get("transfer-encoding")
        .is_some_and(|t| t.contains("chunked"))
    {
        let mut out = Vec::new();
        let mut rest = &body[..];
        while let Some(nl) = rest.windows(2).position(|w| w == b"\r\n") {
            let size =
                usize::from_str_radix(String::from_utf8_lossy(&rest[..nl]).trim(), 16).unwrap_or(0);
            if size == 0 {
                break;
            }
            out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
            rest = &rest[nl + 2 + size + 2..];
        }
        body = out;
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

fn get(port: u16, path: &str) -> Resp {
    http(port, "GET", path, &[], b"").unwrap()
}

fn post(port: u16, path: &str, body: &str) -> Resp {
    http(port, "POST", path, &[], body.as_bytes()).unwrap()
}

/// A running `sd-run serve`; killed when dropped.
struct Server {
    child: Child,
    port: u16,
    log: mpsc::Receiver<String>,
}

impl Server {
    fn start(config: &Path, cache: &Path) -> Server {
        let mut child = Command::new(bin())
            .args([
                "serve",
                "--addr",
                "127.0.0.1:0",
                "--drain-seconds",
                "60",
                "--config",
            ])
            .arg(config)
            .env("SD_RUN_CACHE", cache)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(rest) = line.split("listening on http://127.0.0.1:").nth(1) {
                        let port = rest
                            .split_whitespace()
                            .next()
                            .and_then(|p| p.parse().ok())
                            .unwrap();
                        return Server {
                            child,
                            port,
                            log: rx,
                        };
                    }
                    seen.push(line);
                }
                Err(_) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("the server did not start: {seen:?}");
                }
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit, at most `limit`.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// Polls a job until `done(job)` or the timeout.
fn poll_until(port: u16, id: &str, limit: Duration, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + limit;
    loop {
        let r = get(port, &format!("/v1/jobs/{id}"));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let v = r.json();
        if done(&v) {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} did not get there in {limit:?}: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn finished(v: &Value) -> bool {
    matches!(v["state"].as_str(), Some("done" | "failed" | "cancelled"))
}

/// Keys of every manifest line of a store (with repeats).
fn manifest_keys(store: &Path) -> Vec<String> {
    std::fs::read_to_string(store.join("manifest.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["status"] != "failed")
        .filter_map(|v| v["key"].as_str().map(str::to_string))
        .collect()
}

fn spec(steps: u32, batch: u32, prompts: &[&str], seeds: &str) -> String {
    let prompts: Vec<String> = prompts.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "version: 1\noutput: /should/be/ignored\ndefaults:\n  steps: {steps}\n  guidance: 6\n  size: 64x64\n  batch_size: {batch}\nsafety:\n  checker: off\njobs:\n  - name: shapes\n    model: demo\n    prompts: [{}]\n    seeds: {seeds}\n",
        prompts.join(", ")
    )
}

#[test]
fn happy_path_to_png_then_idempotent_resubmission() {
    let dir = temp_dir("happy");
    let config = write_config(&dir, "queue_limit = 16");
    let server = Server::start(&config, &dir.join("cache"));
    let port = server.port;
    assert_eq!(get(port, "/healthz").status, 200);
    let ready = get(port, "/readyz");
    assert_eq!(
        (ready.status, ready.json()["ready"].clone()),
        (200, json!(true))
    );

    let body = spec(
        4,
        2,
        &[
            "a yellow star on a purple background",
            "a white circle on a black background",
        ],
        "[1, 2]",
    );
    let r = post(port, "/v1/jobs", &body);
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let a = r.json();
    assert_eq!(
        (a["images"].clone(), a["cached"].clone()),
        (json!(4), json!(0))
    );
    let id = a["id"].as_str().unwrap().to_string();
    assert_eq!(
        r.headers.get("location").map(String::as_str),
        Some(format!("/v1/jobs/{id}").as_str())
    );
    assert!(
        dir.join(format!("store/.sd-run/jobs/{id}.json")).is_file(),
        "the job is on disk once accepted"
    );

    let job = poll_until(port, &id, Duration::from_secs(120), finished);
    assert_eq!(job["state"], "done", "{job}");
    let images = job["images"].as_array().unwrap();
    assert_eq!(images.len(), 4);
    let keys: Vec<String> = images
        .iter()
        .map(|i| i["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(json!(keys), a["keys"]);
    for im in images {
        assert_eq!(im["status"], "ok", "{im}");
        let png = get(port, im["url"].as_str().unwrap());
        assert_eq!(png.status, 200);
        assert_eq!(
            png.headers.get("content-type").map(String::as_str),
            Some("image/png")
        );
        let img = image::load_from_memory(&png.body).unwrap();
        assert_eq!((img.width(), img.height()), (64, 64));
    }
    // The client's `output:` is ignored: images land in the server's store.
    assert!(!Path::new("/should/be/ignored").exists());
    assert_eq!(manifest_keys(&dir.join("store")).len(), 4);

    // The same content: the same keys, answered from the store at once.
    let again = post(port, "/v1/jobs", &body);
    assert_eq!(again.status, 202);
    let b = again.json();
    assert_eq!(b["keys"], a["keys"]);
    assert_eq!(
        (b["cached"].clone(), b["state"].clone()),
        (json!(4), json!("done"))
    );
    let job_b = get(port, &format!("/v1/jobs/{}", b["id"].as_str().unwrap())).json();
    assert!(
        job_b["images"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["status"] == "ok" && i["url"].is_string()),
        "{job_b}"
    );
    assert_eq!(
        manifest_keys(&dir.join("store")).len(),
        4,
        "nothing made twice"
    );

    // The seed's single-request API.
    let g = post(
        port,
        "/v1/generate",
        r#"{"model": "demo", "prompt": "a green triangle on a white background", "negative_prompt": "", "steps": 3, "guidance_scale": 6, "width": 64, "height": 64, "seed": 9}"#,
    );
    assert_eq!(g.status, 202, "{}", String::from_utf8_lossy(&g.body));
    let gid = g.json()["id"].as_str().unwrap().to_string();
    let gj = poll_until(port, &gid, Duration::from_secs(60), finished);
    assert_eq!(gj["state"], "done", "{gj}");
    assert_eq!(gj["images"].as_array().unwrap().len(), 1);

    let metrics = String::from_utf8(get(port, "/metrics").body).unwrap();
    for want in [
        "sdrun_images_made_total{model=\"demo\"} 5",
        "sdrun_images_cached_total 4",
        "sdrun_model_loads_total{model=\"demo\"} 1",
        "sdrun_queue_images 0",
    ] {
        assert!(
            metrics.lines().any(|l| l == want),
            "missing {want} in\n{metrics}"
        );
    }
    assert!(
        metrics.contains("sdrun_seconds_per_image{model=\"demo\"}"),
        "{metrics}"
    );
}

#[test]
fn refusals_say_why() {
    let dir = temp_dir("refuse");
    let config = write_config(
        &dir,
        "token = \"s3cret\"\nqueue_limit = 2\nmax_images_per_job = 6",
    );
    let server = Server::start(&config, &dir.join("cache"));
    let port = server.port;
    let auth = [("Authorization", "Bearer s3cret")];
    let send = |path: &str, body: &str| http(port, "POST", path, &auth, body.as_bytes()).unwrap();

    // 401 without (or with a wrong) token; health checks stay open.
    for h in [&[][..], &[("Authorization", "Bearer nope")][..]] {
        let r = http(
            port,
            "POST",
            "/v1/jobs",
            h,
            spec(2, 1, &["a"], "[1]").as_bytes(),
        )
        .unwrap();
        assert_eq!(r.status, 401);
        assert_eq!(r.json()["error"], "unauthorized");
    }
    assert_eq!(
        http(port, "GET", "/v1/jobs/0123456789abcdef0123", &[], b"")
            .unwrap()
            .status,
        401
    );
    assert_eq!(get(port, "/healthz").status, 200);

    // 422 with the validator's messages, positions included.
    let r = send("/v1/jobs", "version: 1\ndefaults:\n  steps: 0\n  size: 60x64\njobs:\n  - name: a\n    model: nope\n    prompts: [x]\n    seeds: [1]\n");
    assert_eq!(r.status, 422);
    let v = r.json();
    assert_eq!(v["error"], "invalid_spec");
    let msgs: Vec<&str> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("spec:3:") && m.contains("steps")),
        "{msgs:?}"
    );
    assert!(
        msgs.iter()
            .any(|m| m.starts_with("spec:4:") && m.contains("size")),
        "{msgs:?}"
    );
    assert!(msgs.iter().any(|m| m.contains("nope")), "{msgs:?}");
    // A client cannot bring its own model files.
    let r = send("/v1/jobs", "version: 1\nmodels:\n  mine:\n    source: /etc\njobs:\n  - name: a\n    model: mine\n    prompts: [x]\n    seeds: [1]\n");
    assert_eq!(r.status, 422);
    assert!(
        r.json()["messages"][0]
            .as_str()
            .unwrap()
            .contains("`source` is not allowed"),
        "{}",
        r.json()
    );
    // Images per job.
    let r = send("/v1/jobs", &spec(2, 1, &["a"], "{from: 1, count: 7}"));
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (422, json!("too_many_images"))
    );
    // /v1/generate: bad fields are 422 too.
    let r = send(
        "/v1/generate",
        r#"{"prompt": "x", "steps": 5000, "width": 64, "height": 64}"#,
    );
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.json()["messages"][0].as_str().unwrap().contains("steps"));
    // Body size.
    // (The body is announced, not sent: the server answers from the header.)
    let head = format!("POST /v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer s3cret\r\nContent-Length: {}\r\n\r\n", 2 << 20);
    let r = exchange(port, head.as_bytes()).unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (413, json!("body_too_large"))
    );
    // 404s.
    let r = http(port, "GET", "/v1/jobs/0123456789abcdef0123", &auth, b"").unwrap();
    assert_eq!(
        (r.status, r.json()["error"].clone()),
        (404, json!("not_found"))
    );
    assert_eq!(
        http(
            port,
            "GET",
            &format!("/v1/images/{}", "ab".repeat(32)),
            &auth,
            b""
        )
        .unwrap()
        .status,
        404
    );

    // 429 with Retry-After once the queue holds `queue_limit` images.
    let slow = send(
        "/v1/jobs",
        &spec(150, 1, &["a blue square on a red background"], "[1, 2]"),
    );
    assert_eq!(slow.status, 202, "{}", String::from_utf8_lossy(&slow.body));
    let r = send("/v1/jobs", &spec(2, 1, &["a"], "[5]"));
    assert_eq!(r.status, 429, "{}", String::from_utf8_lossy(&r.body));
    let retry: u64 = r
        .headers
        .get("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(retry >= 1);
    let v = r.json();
    assert_eq!(
        (v["error"].clone(), v["queue_limit"].clone()),
        (json!("queue_full"), json!(2))
    );
    // Cancel: what has not started is dropped, the job says so.
    let id = slow.json()["id"].as_str().unwrap().to_string();
    let r = http(port, "DELETE", &format!("/v1/jobs/{id}"), &auth, b"").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["state"], "cancelled");
    let done = {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let v = http(port, "GET", &format!("/v1/jobs/{id}"), &auth, b"")
                .unwrap()
                .json();
            if v["images"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["status"] != "running")
                || Instant::now() > deadline
            {
                break v;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert_eq!(done["state"], "cancelled");
    assert!(
        done["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["status"] == "cancelled"),
        "{done}"
    );
    // With room again, the small job is taken.
    let r = send("/v1/jobs", &spec(2, 1, &["a"], "[5]"));
    assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
    let metrics = String::from_utf8(get(port, "/metrics").body).unwrap();
    assert!(
        metrics.contains("sdrun_refusals_total{reason=\"queue_full\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("sdrun_refusals_total{reason=\"unauthorized\"} 3"),
        "{metrics}"
    );
}

#[test]
fn a_restart_after_a_crash_resumes_queued_jobs() {
    let dir = temp_dir("restart");
    let config = write_config(&dir, "queue_limit = 32");
    let cache = dir.join("cache");
    let ids: Vec<String>;
    {
        let mut server = Server::start(&config, &cache);
        let a = post(
            server.port,
            "/v1/jobs",
            &spec(30, 1, &["a red circle on a blue background"], "[1, 2, 3]"),
        );
        let b = post(
            server.port,
            "/v1/generate",
            r#"{"prompt": "an orange square on a green background", "steps": 5, "width": 64, "height": 64, "seed": 3}"#,
        );
        assert_eq!((a.status, b.status), (202, 202));
        ids = vec![
            a.json()["id"].as_str().unwrap().into(),
            b.json()["id"].as_str().unwrap().into(),
        ];
        // Crash: no chance to clean up.
        signal(server.pid(), "-KILL");
        assert!(server.wait_exit(Duration::from_secs(10)).is_some());
    }
    let made_before = manifest_keys(&dir.join("store")).len();
    assert!(
        made_before < 4,
        "the crash came before the jobs were done ({made_before} made)"
    );
    let server = Server::start(&config, &cache);
    for id in &ids {
        let v = poll_until(server.port, id, Duration::from_secs(180), finished);
        assert_eq!(v["state"], "done", "{v}");
        assert!(
            v["images"]
                .as_array()
                .unwrap()
                .iter()
                .all(|i| i["status"] == "ok" || i["status"] == "flagged"),
            "{v}"
        );
    }
    let keys = manifest_keys(&dir.join("store"));
    assert_eq!(keys.len(), 4, "every image made once: {keys:?}");
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 4);
}

#[test]
fn sigterm_mid_batch_parks_the_rest_and_a_restart_finishes() {
    let dir = temp_dir("sigterm");
    let config = write_config(&dir, "queue_limit = 32");
    let cache = dir.join("cache");
    let store = dir.join("store");
    let mut server = Server::start(&config, &cache);
    let port = server.port;
    let r = post(
        port,
        "/v1/jobs",
        &spec(
            40,
            1,
            &["a purple star on a yellow background"],
            "{from: 1, count: 6}",
        ),
    );
    assert_eq!(r.status, 202);
    let id = r.json()["id"].as_str().unwrap().to_string();
    poll_until(port, &id, Duration::from_secs(120), |v| {
        v["images"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["status"] == "ok")
    });
    let sent = Instant::now();
    signal(server.pid(), "-TERM");
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("the server exits in bounded time after SIGTERM");
    assert!(status.success(), "{status:?}");
    let log = server.log_lines().join("\n");
    assert!(log.contains("stopping"), "{log}");
    eprintln!(
        "sigterm: exited {:.2}s after the signal",
        sent.elapsed().as_secs_f64()
    );
    let made = manifest_keys(&store).len();
    assert!(
        (1..6).contains(&made),
        "the rest was parked ({made} of 6 made)"
    );
    let file: Value = serde_json::from_slice(
        &std::fs::read(store.join(format!(".sd-run/jobs/{id}.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(file["state"], "queued");
    drop(server);

    let server = Server::start(&config, &cache);
    let v = poll_until(server.port, &id, Duration::from_secs(180), finished);
    assert_eq!(v["state"], "done", "{v}");
    let keys = manifest_keys(&store);
    assert_eq!(keys.len(), 6, "each image made once: {keys:?}");
    assert_eq!(keys.iter().collect::<HashSet<_>>().len(), 6);
}

/// The safety stage's verdicts reach the client: a quarantined image has no URL and is not
/// served, now or when the same content is asked for again.
#[test]
fn quarantined_images_are_withheld() {
    let dir = temp_dir("quarantine");
    let config = write_config(&dir, "");
    let server = Server::start(&config, &dir.join("cache"));
    let port = server.port;
    let body = "version: 1\ndefaults:\n  steps: 10\n  guidance: 6\n  size: 64x64\nsafety:\n  checker: model\n  action: quarantine\njobs:\n  - name: red\n    model: demo\n    prompts: [\"a red square on a green background\"]\n    seeds: [5]\n  - name: clean\n    model: demo\n    prompts: [\"a yellow circle on a blue background\"]\n    seeds: [5]\n";
    for round in 0..2 {
        let r = post(port, "/v1/jobs", body);
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        assert_eq!(r.json()["cached"], json!(round * 2));
        let id = r.json()["id"].as_str().unwrap().to_string();
        let v = poll_until(port, &id, Duration::from_secs(120), finished);
        assert_eq!(v["state"], "done", "{v}");
        let (red, clean) = (&v["images"][0], &v["images"][1]);
        assert_eq!(
            (red["status"].clone(), red["url"].clone()),
            (json!("flagged"), Value::Null),
            "{v}"
        );
        assert_eq!(clean["status"], "ok", "{v}");
        assert_eq!(get(port, clean["url"].as_str().unwrap()).status, 200);
        let r = get(
            port,
            &format!("/v1/images/{}", red["key"].as_str().unwrap()),
        );
        assert_eq!(
            (r.status, r.json()["error"].clone()),
            (403, json!("forbidden"))
        );
    }
    let metrics = String::from_utf8(get(port, "/metrics").body).unwrap();
    assert!(
        metrics.lines().any(|l| l == "sdrun_images_flagged_total 1"),
        "{metrics}"
    );
}

/// With room for one checkpoint, waiting work on the loaded one goes first: A (demo) runs, B
/// (demo2) and C (demo) wait; C goes before B, so each checkpoint loads once.
#[test]
fn waiting_work_on_the_loaded_checkpoint_goes_first() {
    let dir = temp_dir("swap");
    let config = write_config_with(
        &dir,
        "memory_budget = \"40MiB\"",
        "queue_limit = 32",
        &["demo", "demo2"],
    );
    let server = Server::start(&config, &dir.join("cache"));
    let port = server.port;
    let job = |model: &str, prompt: &str, steps: u32, seeds: &str| {
        let body =
            spec(steps, 1, &[prompt], seeds).replace("model: demo", &format!("model: {model}"));
        let r = post(port, "/v1/jobs", &body);
        assert_eq!(r.status, 202, "{}", String::from_utf8_lossy(&r.body));
        r.json()
    };
    let a = job("demo", "a red circle on a blue background", 30, "[1, 2, 3]");
    let b = job("demo2", "a green triangle on a white background", 4, "[1]");
    let c = job("demo", "a blue square on a red background", 4, "[1]");
    for j in [&a, &b, &c] {
        let v = poll_until(
            port,
            j["id"].as_str().unwrap(),
            Duration::from_secs(180),
            finished,
        );
        assert_eq!(v["state"], "done", "{v}");
    }
    let order = manifest_keys(&dir.join("store"));
    let key = |j: &Value| j["keys"][0].as_str().unwrap().to_string();
    let pos = |k: String| order.iter().position(|x| *x == k).unwrap();
    assert!(
        pos(key(&c)) < pos(key(&b)),
        "C (loaded model) before B: {order:?}"
    );
    let metrics = String::from_utf8(get(port, "/metrics").body).unwrap();
    for want in [
        "sdrun_model_loads_total{model=\"demo\"} 1",
        "sdrun_model_loads_total{model=\"demo2\"} 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == want),
            "missing {want} in\n{metrics}"
        );
    }
}

/// Many concurrent clients submitting and polling while the worker is busy: every accepted job
/// finishes, nothing is lost or made twice (half the clients resubmit the same seeds), refusals
/// are 429 only. Prints the figures.
#[test]
#[ignore]
fn load_test() {
    const CLIENTS: usize = 16;
    const SUBMIT_SECONDS: u64 = 20;
    struct Client {
        accepted: Vec<(String, String)>,
        refused: usize,
        submits: Vec<Duration>,
        polls: Vec<Duration>,
    }
    let dir = temp_dir("load");
    let config = write_config(&dir, "queue_limit = 24");
    let server = Server::start(&config, &dir.join("cache"));
    let port = server.port;
    let started = Instant::now();
    let clients: Vec<Client> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..CLIENTS)
            .map(|c| {
                s.spawn(move || {
                    let mut me = Client {
                        accepted: vec![],
                        refused: 0,
                        submits: vec![],
                        polls: vec![],
                    };
                    let mut n = 0u64;
                    while started.elapsed() < Duration::from_secs(SUBMIT_SECONDS) {
                        n += 1;
                        // Even clients share seeds: the same content from many clients.
                        let seed = if c % 2 == 0 {
                            n % 64
                        } else {
                            c as u64 * 1_000_000 + n
                        };
                        let body = spec(
                            2,
                            1,
                            &["a white circle on a black background"],
                            &format!("[{seed}]"),
                        );
                        let t = Instant::now();
                        let r = post(port, "/v1/jobs", &body);
                        me.submits.push(t.elapsed());
                        match r.status {
                            202 => {
                                let v = r.json();
                                let key = v["keys"][0].as_str().unwrap().to_string();
                                me.accepted
                                    .push((v["id"].as_str().unwrap().to_string(), key));
                            }
                            429 => {
                                assert!(r.headers.contains_key("retry-after"));
                                me.refused += 1;
                            }
                            other => panic!(
                                "refusals must be 429, got {other}: {}",
                                String::from_utf8_lossy(&r.body)
                            ),
                        }
                        for (id, _) in me.accepted.iter().rev().take(4) {
                            let t = Instant::now();
                            let r = get(port, &format!("/v1/jobs/{id}"));
                            me.polls.push(t.elapsed());
                            assert_eq!(r.status, 200);
                        }
                    }
                    me
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = started.elapsed().as_secs_f64();
    let accepted: Vec<(String, String)> = clients.iter().flat_map(|c| c.accepted.clone()).collect();
    let refused: usize = clients.iter().map(|c| c.refused).sum();
    let pct = |mut v: Vec<Duration>, q: f64| {
        v.sort();
        v[((v.len() as f64 * q) as usize).min(v.len() - 1)].as_secs_f64() * 1e3
    };
    let polls: Vec<Duration> = clients.iter().flat_map(|c| c.polls.clone()).collect();
    let submits: Vec<Duration> = clients.iter().flat_map(|c| c.submits.clone()).collect();
    let requests = polls.len() + submits.len();
    // Every accepted job finishes.
    for (id, _) in &accepted {
        let v = poll_until(port, id, Duration::from_secs(600), finished);
        assert_eq!(v["state"], "done", "{v}");
    }
    let drained = started.elapsed().as_secs_f64();
    let keys = manifest_keys(&dir.join("store"));
    let distinct: HashSet<&String> = accepted.iter().map(|(_, k)| k).collect();
    assert_eq!(
        keys.iter().collect::<HashSet<_>>().len(),
        keys.len(),
        "nothing made twice"
    );
    assert_eq!(
        keys.iter().collect::<HashSet<_>>(),
        distinct,
        "every accepted image made"
    );
    let metrics = String::from_utf8(get(port, "/metrics").body).unwrap();
    let cached = metrics
        .lines()
        .find(|l| l.starts_with("sdrun_images_cached_total"))
        .unwrap_or("")
        .to_string();
    println!(
        "load: {CLIENTS} clients, {elapsed:.1}s: {requests} requests ({:.0}/s) while the worker was busy: {} submissions ({:.0}/s; {} accepted, {refused} refused with 429; p50 {:.2} ms, p99 {:.2} ms), {} status polls ({:.0}/s; p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms); {} images made once each ({cached}); queue drained after {drained:.1}s",
        requests as f64 / elapsed,
        submits.len(),
        submits.len() as f64 / elapsed,
        accepted.len(),
        pct(submits.clone(), 0.5),
        pct(submits, 0.99),
        polls.len(),
        polls.len() as f64 / elapsed,
        pct(polls.clone(), 0.5),
        pct(polls.clone(), 0.99),
        pct(polls, 1.0),
        keys.len(),
    );
}

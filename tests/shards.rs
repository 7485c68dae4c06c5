//! Scale-out on the real `sd-run` binary and the tiny demo model: N shard processes over one
//! output folder (one killed and rerun), one shard run twice at once, `--shard auto` from the
//! Kubernetes and Slurm environments, `sd-run status` per job and per shard, and the deploy
//! files (Kubernetes manifests parsed and checked, the Slurm script run as an array task).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::Digest;
use yaml_rust2::{Yaml, YamlLoader};

const BIN: &str = env!("CARGO_BIN_EXE_sd-run");

/// Scheduler variables that must not leak into the tests from the machine running them.
const SCHEDULER_VARS: [&str; 6] = [
    "JOB_COMPLETION_INDEX",
    "SD_RUN_SHARD_COUNT",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_ARRAY_TASK_COUNT",
    "SLURM_ARRAY_TASK_MIN",
    "SLURM_ARRAY_TASK_STEP",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("sd-run-shards-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A spec in `dir` whose models `demo_a` and `demo_b` (two checkpoint groups) are the demo
/// model, or `source` when given.
fn write_spec(dir: &Path, body: &str, source: Option<&str>) -> PathBuf {
    let demo = root().join("models/demo");
    let src = source
        .map(str::to_string)
        .unwrap_or_else(|| demo.display().to_string());
    let text = format!(
        "version: 1\noutput: out\nmodels:\n  demo_a:\n    source: {src}\n  demo_b:\n    source: {src}\n\
         defaults:\n  steps: 4\n  guidance: 6\n  size: 64x64\n  batch_size: 2\nsafety:\n  checker: off\n{body}"
    );
    let p = dir.join("spec.yaml");
    std::fs::write(&p, text).unwrap();
    p
}

/// 24 images on demo_a, 24 on demo_b.
const BIG: &str = "jobs:\n  - name: shapes\n    model: demo_a\n    prompts:\n      - a yellow star on a purple background\n      - a white circle on a black background\n      - a green triangle on a white background\n      - an orange square on a green background\n    seeds: [1, 2, 3, 4, 5, 6]\n  - name: sweep\n    model: demo_b\n    prompts: [\"a purple star on a yellow background\", \"a blue square on a white background\"]\n    seeds: [7, 8, 9]\n    grid:\n      guidance: [2, 4, 6, 8]\n";

/// 12 images on demo_a only.
const SMALL: &str = "jobs:\n  - name: shapes\n    model: demo_a\n    prompts: [\"a yellow star on a purple background\", \"a white circle on a black background\"]\n    seeds: [1, 2, 3, 4, 5, 6]\n";

/// `sd-run ARGS` in `dir` with a private machine cache and no scheduler variables, plus `env`.
fn command(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args)
        .current_dir(dir)
        .env("SD_RUN_CACHE", dir.join("cache"));
    for v in SCHEDULER_VARS {
        c.env_remove(v);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn run(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    command(dir, args, env).output().unwrap()
}

fn spawn(dir: &Path, args: &[&str]) -> Child {
    command(dir, args, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        text(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o.stdout)))
}

/// The summary event of a `--log json` run.
fn summary(o: &Output) -> serde_json::Value {
    text(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "summary")
        .unwrap_or_else(|| panic!("no summary: {}\n{}", text(&o.stdout), text(&o.stderr)))
}

fn plan(dir: &Path, spec: &Path, shard: &str) -> serde_json::Value {
    json(&run(
        dir,
        &["plan", spec.to_str().unwrap(), "--json", "--shard", shard],
        &[],
    ))
}

fn status(dir: &Path, spec: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec!["status", spec.to_str().unwrap(), "--json"];
    args.extend(extra);
    json(&run(dir, &args, &[]))
}

/// Every record of every manifest under `out`.
fn records(out: &Path) -> Vec<serde_json::Value> {
    let mut files = vec![out.join("manifest.jsonl")];
    if let Ok(d) = std::fs::read_dir(out.join("manifest.d")) {
        files.extend(d.flatten().map(|e| e.path()));
    }
    let mut out = Vec::new();
    for f in files {
        if let Ok(t) = std::fs::read_to_string(f) {
            out.extend(t.lines().filter_map(|l| serde_json::from_str(l).ok()));
        }
    }
    out
}

fn shard_records(out: &Path, k: usize, n: usize) -> usize {
    std::fs::read_to_string(out.join(format!("manifest.d/shard-{k}-of-{n}.jsonl")))
        .map(|t| {
            t.lines()
                .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
                .count()
        })
        .unwrap_or(0)
}

/// PNG files under `images/` (temp files of killed writers excluded).
fn image_files(out: &Path) -> usize {
    let mut n = 0;
    for d in std::fs::read_dir(out.join("images"))
        .into_iter()
        .flatten()
        .flatten()
    {
        for f in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
            let name = f.file_name().to_string_lossy().into_owned();
            n += usize::from(!name.starts_with('.') && name.ends_with(".png"));
        }
    }
    n
}

/// The union of the manifests is the whole campaign, each image made once: exactly `images`
/// keys with a non-failed record, one such record per key, each naming a whole file.
fn assert_whole_campaign_made_once(out: &Path, images: usize) {
    let mut by_key: BTreeMap<String, usize> = BTreeMap::new();
    for r in records(out) {
        if r["status"] == "failed" {
            continue;
        }
        let key = r["key"].as_str().unwrap().to_string();
        *by_key.entry(key.clone()).or_default() += 1;
        let path = out.join(r["path"].as_str().expect("a path"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            hex::encode(sha2::Sha256::digest(&bytes)),
            r["file_sha256"].as_str().unwrap(),
            "{key}"
        );
    }
    let twice: Vec<_> = by_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "images made more than once: {twice:?}");
    assert_eq!(by_key.len(), images, "images made");
    assert_eq!(image_files(out), images, "PNG files");
}

fn shard_entry(st: &serde_json::Value, k: usize, n: usize) -> serde_json::Value {
    st["shards"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["index"] == k && s["count"] == n)
        .unwrap_or_else(|| panic!("no shard {k}/{n} in {st}"))
        .clone()
}

#[test]
fn three_shards_at_once_one_killed_and_rerun() {
    let dir = temp_dir("three");
    let spec = write_spec(&dir, BIG, None);
    let out = dir.join("out");
    let total = 48;
    let sizes: Vec<u64> = (0..3)
        .map(|k| {
            plan(&dir, &spec, &format!("{k}/3"))["images"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(sizes.iter().sum::<u64>(), total as u64, "{sizes:?}");

    let s = spec.to_str().unwrap();
    let mut children: Vec<Child> = (0..3)
        .map(|k| {
            spawn(
                &dir,
                &["run", s, "--shard", &format!("{k}/3"), "--log", "json"],
            )
        })
        .collect();
    // Kill shard 1 (SIGKILL) as soon as it has landed two images.
    let started = Instant::now();
    while shard_records(&out, 1, 3) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "shard 1 made nothing"
        );
        if let Ok(Some(st)) = children[1].try_wait() {
            panic!("shard 1 ended before it was killed: {st}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    children[1].kill().unwrap();
    let killed = children.remove(1).wait_with_output().unwrap();
    assert!(!killed.status.success());
    for (k, c) in [0, 2].into_iter().zip(children) {
        let o = c.wait_with_output().unwrap();
        assert!(o.status.success(), "shard {k}: {}", text(&o.stderr));
        assert_eq!(summary(&o)["made"], sizes[k]);
    }
    let landed = shard_records(&out, 1, 3);
    assert!(
        landed >= 2 && (landed as u64) < sizes[1],
        "killed mid-way: {landed} of {}",
        sizes[1]
    );

    // Status from the store alone: shards 0 and 2 whole, shard 1 partial.
    let st = status(&dir, &spec, &[]);
    assert_eq!(st["images"], total);
    assert_eq!(
        st["done"].as_u64().unwrap(),
        sizes[0] + sizes[2] + landed as u64
    );
    assert_eq!(
        st["shards"].as_array().unwrap().len(),
        3,
        "N read from manifest.d: {st}"
    );
    for (k, &size) in sizes.iter().enumerate() {
        let e = shard_entry(&st, k, 3);
        assert_eq!(e["images"], size);
        let done = if k == 1 { landed as u64 } else { size };
        assert_eq!(e["done"], done, "shard {k}");
        assert_eq!(e["missing"].as_u64().unwrap(), size - done);
        assert_eq!(e["records"].as_u64().unwrap(), done);
    }

    // The scheduler retries index 1 (`--shard auto`, as a Kubernetes Indexed Job would): it
    // makes only what its shard is missing.
    let rerun = run(
        &dir,
        &["run", s, "--shard", "auto", "--log", "json"],
        &[("JOB_COMPLETION_INDEX", "1"), ("SD_RUN_SHARD_COUNT", "3")],
    );
    assert!(rerun.status.success(), "{}", text(&rerun.stderr));
    let sum = summary(&rerun);
    assert_eq!(sum["made"].as_u64().unwrap(), sizes[1] - landed as u64);
    assert_eq!(sum["cached"].as_u64().unwrap(), landed as u64);
    assert_eq!(shard_records(&out, 1, 3) as u64, sizes[1]);
    assert_whole_campaign_made_once(&out, total);

    let st = status(&dir, &spec, &[]);
    assert_eq!(
        (
            st["done"].as_u64(),
            st["missing"].as_u64(),
            st["failed"].as_u64()
        ),
        (Some(total as u64), Some(0), Some(0))
    );
    assert_eq!(st["jobs"]["shapes"]["done"], 24);
    assert_eq!(st["jobs"]["sweep"]["done"], 24);
    for (k, &size) in sizes.iter().enumerate() {
        let e = shard_entry(&st, k, 3);
        assert_eq!(
            (e["done"].as_u64(), e["missing"].as_u64()),
            (Some(size), Some(0))
        );
    }
    // A rerun of the whole campaign makes nothing.
    let again = run(&dir, &["run", s, "--log", "json"], &[]);
    assert_eq!(summary(&again)["made"], 0);
    // The readable status names every job and shard.
    let t = run(&dir, &["status", s], &[]);
    assert!(t.status.success());
    let t = text(&t.stdout);
    assert!(t.contains("48/48 made, complete"), "{t}");
    assert!(
        t.contains("shards (N=3):")
            && t.contains("1/3")
            && t.contains("shapes")
            && t.contains("sweep"),
        "{t}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn one_shard_twice_at_once_makes_no_image_twice() {
    let dir = temp_dir("twice");
    let spec = write_spec(&dir, SMALL, None);
    let out = dir.join("out");
    let size = plan(&dir, &spec, "0/2")["images"].as_u64().unwrap();
    assert!(size >= 4);
    let s = spec.to_str().unwrap();
    let a = spawn(&dir, &["run", s, "--shard", "0/2", "--log", "json"]);
    let b = spawn(&dir, &["run", s, "--shard", "0/2", "--log", "json"]);
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    assert!(a.status.success(), "{}", text(&a.stderr));
    assert!(b.status.success(), "{}", text(&b.stderr));
    let (sa, sb) = (summary(&a), summary(&b));
    assert_eq!(sa["failed"], 0);
    assert_eq!(sb["failed"], 0);
    assert_eq!(
        sa["made"].as_u64().unwrap() + sb["made"].as_u64().unwrap(),
        size,
        "{sa}\n{sb}"
    );
    assert_whole_campaign_made_once(&out, size as usize);
    assert_eq!(shard_records(&out, 0, 2) as u64, size);

    let st = status(&dir, &spec, &["--shards", "2"]);
    let (s0, s1) = (shard_entry(&st, 0, 2), shard_entry(&st, 1, 2));
    assert_eq!(
        (s0["done"].as_u64(), s0["missing"].as_u64()),
        (Some(size), Some(0))
    );
    assert_eq!(
        (s1["done"].as_u64(), s1["records"].as_u64()),
        (Some(0), Some(0))
    );
    assert_eq!(s1["images"].as_u64().unwrap(), 12 - size);
    // Shard counts that were never run are reported too when asked for.
    let st = status(&dir, &spec, &["--shards", "4"]);
    assert_eq!(st["shards"].as_array().unwrap().len(), 4);
    let done: u64 = st["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["done"].as_u64().unwrap())
        .sum();
    assert_eq!(done, size);
    assert_eq!(
        run(&dir, &["status", s, "--shards", "0"], &[])
            .status
            .code(),
        Some(2)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn shard_auto_reads_kubernetes_and_slurm_environments() {
    let dir = temp_dir("auto");
    let spec = write_spec(&dir, SMALL, None);
    let out = dir.join("out");
    let s = spec.to_str().unwrap();
    let auto_plan = |env: &[(&str, &str)], flag: &str| {
        json(&run(&dir, &["plan", s, "--json", "--shard", flag], env))
    };
    type Env<'a> = &'a [(&'a str, &'a str)];
    let cases: [(Env, &str, usize); 4] = [
        (
            &[("JOB_COMPLETION_INDEX", "2"), ("SD_RUN_SHARD_COUNT", "4")],
            "auto",
            2,
        ),
        (&[("JOB_COMPLETION_INDEX", "1")], "auto/4", 1),
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "7"),
                ("SLURM_ARRAY_TASK_MIN", "4"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
            "auto",
            3,
        ),
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "0"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
            "auto",
            0,
        ),
    ];
    let plans: Vec<serde_json::Value> = (0..4)
        .map(|k| plan(&dir, &spec, &format!("{k}/4")))
        .collect();
    for (env, flag, k) in cases {
        assert_eq!(auto_plan(env, flag), plans[k], "{env:?} {flag}");
    }
    // A real run under each scheduler's variables writes the shard's manifest and makes exactly
    // that shard's images.
    for (env, flag, k) in &cases[..3] {
        let o = run(&dir, &["run", s, "--shard", flag, "--log", "json"], env);
        assert!(o.status.success(), "{env:?}: {}", text(&o.stderr));
        assert_eq!(summary(&o)["made"], plans[*k]["images"], "{env:?}");
        assert_eq!(
            shard_records(&out, *k, 4) as u64,
            plans[*k]["images"].as_u64().unwrap()
        );
    }
    let names: BTreeSet<String> = std::fs::read_dir(out.join("manifest.d"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let want: BTreeSet<String> = [1, 2, 3]
        .iter()
        .map(|k| format!("shard-{k}-of-4.jsonl"))
        .collect();
    assert_eq!(names, want);
    // Missing or inconsistent variables are command-line errors (exit 2), nothing runs.
    let bad: [(Env, &str); 4] = [
        (&[], "auto"),
        (&[("JOB_COMPLETION_INDEX", "1")], "auto"),
        (
            &[("JOB_COMPLETION_INDEX", "4"), ("SD_RUN_SHARD_COUNT", "4")],
            "auto",
        ),
        (
            &[
                ("SLURM_ARRAY_TASK_ID", "9"),
                ("SLURM_ARRAY_TASK_MIN", "4"),
                ("SLURM_ARRAY_TASK_COUNT", "4"),
            ],
            "auto",
        ),
    ];
    for (env, flag) in bad {
        let o = run(&dir, &["run", s, "--shard", flag], env);
        assert_eq!(o.status.code(), Some(2), "{env:?}: {}", text(&o.stderr));
        assert!(text(&o.stderr).contains("--shard"), "{}", text(&o.stderr));
    }
    assert!(!out.join("manifest.d/shard-0-of-4.jsonl").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn status_matches_by_parameters_when_the_model_is_not_here() {
    let dir = temp_dir("nomodel");
    // A Hugging Face cache holding the demo model as `hf:test/demo`.
    let hf = dir.join("hf");
    let repo = hf.join("hub/models--test--demo");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    std::os::unix::fs::symlink(root().join("models/demo"), repo.join("snapshots/0123abcd"))
        .unwrap();
    let spec = write_spec(&dir, SMALL, Some("hf:test/demo"));
    let s = spec.to_str().unwrap();
    let hf_home = hf.to_str().unwrap();
    let env = [("HF_HOME", hf_home), ("HF_HUB_OFFLINE", "1")];
    let o = run(&dir, &["run", s, "--shard", "1/2", "--log", "json"], &env);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let made = summary(&o)["made"].as_u64().unwrap();
    assert!(made > 0);
    let here = json(&run(&dir, &["status", s, "--json"], &env));
    assert_eq!(here["done"].as_u64(), Some(made));
    assert_eq!(here["matched_by_parameters"].as_array().unwrap().len(), 0);
    // A login node without the checkpoint: the keys are unknown, the records still tell.
    let empty = dir.join("empty-hf");
    let env = [
        ("HF_HOME", empty.to_str().unwrap()),
        ("HF_HUB_OFFLINE", "1"),
    ];
    let away = json(&run(&dir, &["status", s, "--json"], &env));
    assert_eq!(away["matched_by_parameters"], serde_json::json!(["demo_a"]));
    assert_eq!(away["done"], here["done"]);
    assert_eq!(away["shards"], here["shards"]);
    assert_eq!(away["jobs"], here["jobs"]);
    let t = run(&dir, &["status", s], &env);
    assert!(
        text(&t.stdout).contains("matched by their parameters"),
        "{}",
        text(&t.stdout)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Deploy files.

fn load_yaml_docs(file: &Path) -> Vec<Yaml> {
    let t = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    YamlLoader::load_from_str(&t).unwrap_or_else(|e| panic!("{}: {e}", file.display()))
}

fn s<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {y:?}"))
}

fn list<'a>(y: &'a Yaml, what: &str) -> &'a [Yaml] {
    y.as_vec()
        .map(Vec::as_slice)
        .unwrap_or_else(|| panic!("{what}: expected a list, got {y:?}"))
}

fn env_value<'a>(container: &'a Yaml, name: &str) -> Option<&'a str> {
    container["env"]
        .as_vec()?
        .iter()
        .find(|e| e["name"].as_str() == Some(name))?["value"]
        .as_str()
}

/// Checks a pod template against the objects defined: every mount names a volume, every claim a
/// PVC, every config map a ConfigMap. Returns (mount path, volume) pairs.
fn check_pod(
    pod: &Yaml,
    what: &str,
    pvcs: &BTreeSet<String>,
    configmaps: &BTreeMap<String, Yaml>,
) -> Vec<(String, Yaml)> {
    let containers = list(&pod["containers"], &format!("{what} containers"));
    assert!(!containers.is_empty());
    let volumes = list(&pod["volumes"], &format!("{what} volumes"));
    let mut mounts = Vec::new();
    for c in containers {
        assert!(!s(&c["image"], "image").is_empty());
        assert!(!s(&c["name"], "container name").is_empty());
        for m in list(&c["volumeMounts"], "volumeMounts") {
            let name = s(&m["name"], "mount name");
            let v = volumes
                .iter()
                .find(|v| v["name"].as_str() == Some(name))
                .unwrap_or_else(|| panic!("{what}: mount {name} has no volume"));
            mounts.push((s(&m["mountPath"], "mountPath").to_string(), v.clone()));
        }
    }
    for v in volumes {
        if let Some(claim) = v["persistentVolumeClaim"]["claimName"].as_str() {
            assert!(pvcs.contains(claim), "{what}: claim {claim} is not defined");
        } else if let Some(cm) = v["configMap"]["name"].as_str() {
            assert!(
                configmaps.contains_key(cm),
                "{what}: config map {cm} is not defined"
            );
        } else {
            panic!("{what}: volume {v:?} is neither a PVC nor a config map");
        }
    }
    mounts
}

#[test]
fn kubernetes_manifests_are_valid_indexed_jobs_with_shared_storage() {
    let dir = root().join("deploy/kubernetes");
    let mut docs = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
            for d in load_yaml_docs(&p) {
                if !d.is_null() {
                    docs.push((p.file_name().unwrap().to_string_lossy().into_owned(), d));
                }
            }
        }
    }
    let mut pvcs = BTreeSet::new();
    let mut configmaps = BTreeMap::new();
    let mut jobs = Vec::new();
    for (file, d) in &docs {
        let kind = s(&d["kind"], file);
        let api = s(&d["apiVersion"], file);
        let name = s(&d["metadata"]["name"], file).to_string();
        match kind {
            "PersistentVolumeClaim" => {
                assert_eq!(api, "v1");
                let modes: Vec<&str> = list(&d["spec"]["accessModes"], "accessModes")
                    .iter()
                    .map(|m| s(m, "mode"))
                    .collect();
                assert!(
                    modes.contains(&"ReadWriteMany"),
                    "{name}: every shard pod mounts it at once"
                );
                assert!(!s(&d["spec"]["resources"]["requests"]["storage"], "storage").is_empty());
                pvcs.insert(name);
            }
            "ConfigMap" => {
                assert_eq!(api, "v1");
                configmaps.insert(name, d["data"].clone());
            }
            "Job" => {
                assert_eq!(api, "batch/v1", "{file}");
                jobs.push(d.clone());
            }
            other => panic!("{file}: unexpected kind {other}"),
        }
    }
    assert!(pvcs.len() >= 2, "output and HF cache claims: {pvcs:?}");
    let indexed: Vec<&Yaml> = jobs
        .iter()
        .filter(|j| j["spec"]["completionMode"].as_str() == Some("Indexed"))
        .collect();
    assert_eq!(indexed.len(), 1, "one Indexed Job");
    let job = &indexed[0]["spec"];
    let completions = job["completions"].as_i64().expect("completions");
    let parallelism = job["parallelism"].as_i64().expect("parallelism");
    assert!(completions >= 1 && (1..=completions).contains(&parallelism));
    assert!(
        job["backoffLimitPerIndex"]
            .as_i64()
            .expect("backoffLimitPerIndex")
            >= 1
    );
    let pod = &job["template"]["spec"];
    // The Job API requires Never with backoffLimitPerIndex (and podFailurePolicy).
    assert_eq!(s(&pod["restartPolicy"], "restartPolicy"), "Never");
    let c = &list(&pod["containers"], "containers")[0];
    let cmd: Vec<&str> = list(&c["command"], "command")
        .iter()
        .map(|a| s(a, "arg"))
        .collect();
    assert_eq!(&cmd[..2], ["sd-run", "run"]);
    let at = cmd.iter().position(|a| *a == "--shard").expect("--shard");
    assert_eq!(cmd.get(at + 1), Some(&"auto"));
    assert_eq!(
        env_value(c, "SD_RUN_SHARD_COUNT"),
        Some(completions.to_string().as_str()),
        "N must equal completions"
    );
    for rule in job["podFailurePolicy"]["rules"]
        .as_vec()
        .into_iter()
        .flatten()
    {
        if let Some(name) = rule["onExitCodes"]["containerName"].as_str() {
            assert_eq!(name, s(&c["name"], "name"));
        }
    }
    let mounts = check_pod(pod, "job", &pvcs, &configmaps);
    let pvc_mount = |path: &str| {
        mounts
            .iter()
            .any(|(m, v)| path.starts_with(m.as_str()) && !v["persistentVolumeClaim"].is_badvalue())
    };
    let hf_home = env_value(c, "HF_HOME").expect("HF_HOME");
    assert!(pvc_mount(hf_home), "HF_HOME on a PVC");
    // The spec comes from the config map, its output lies on a PVC, and it is a valid spec.
    let spec_path = cmd[2];
    let (mount, vol) = mounts
        .iter()
        .find(|(m, _)| spec_path.starts_with(m.as_str()))
        .expect("the spec is mounted");
    let cm = &configmaps[s(&vol["configMap"]["name"], "configMap")];
    let spec_text = s(
        &cm[spec_path[mount.len()..].trim_start_matches('/')],
        "spec in the config map",
    );
    let spec_yaml = &YamlLoader::load_from_str(spec_text).unwrap()[0];
    assert!(
        pvc_mount(s(&spec_yaml["output"], "output")),
        "output on a PVC"
    );
    let tmp = temp_dir("k8s-spec");
    std::fs::write(tmp.join("campaign.yaml"), spec_text).unwrap();
    let v = run(
        &tmp,
        &["validate", tmp.join("campaign.yaml").to_str().unwrap()],
        &[],
    );
    assert!(v.status.success(), "{}{}", text(&v.stdout), text(&v.stderr));
    std::fs::remove_dir_all(&tmp).unwrap();
    // The prefetch Job fills the same HF cache.
    for j in jobs
        .iter()
        .filter(|j| j["spec"]["completionMode"].is_badvalue())
    {
        let pod = &j["spec"]["template"]["spec"];
        assert!(matches!(
            pod["restartPolicy"].as_str(),
            Some("Never" | "OnFailure")
        ));
        let mounts = check_pod(pod, "prefetch", &pvcs, &configmaps);
        let c = &list(&pod["containers"], "containers")[0];
        let home = env_value(c, "HF_HOME").expect("prefetch HF_HOME");
        assert!(mounts.iter().any(
            |(m, v)| home.starts_with(m.as_str()) && !v["persistentVolumeClaim"].is_badvalue()
        ));
    }
}

#[test]
fn slurm_array_script_is_valid_and_runs_its_shard() {
    let script = root().join("deploy/slurm/sd-run-array.sbatch");
    let t = std::fs::read_to_string(&script).unwrap();
    assert!(t.starts_with("#!/bin/bash"));
    let array = t
        .lines()
        .find(|l| l.starts_with("#SBATCH --array="))
        .expect("#SBATCH --array");
    assert!(t.lines().any(|l| l.trim() == "#SBATCH --requeue"));
    assert!(t
        .lines()
        .any(|l| l.trim_start().starts_with("sd-run run ") && l.contains("--shard auto")));
    let syntax = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(syntax.status.success(), "{}", text(&syntax.stderr));
    // The array range: N tasks from MIN.
    let range = array["#SBATCH --array=".len()..].split('%').next().unwrap();
    let (lo, hi) = range.split_once('-').unwrap();
    let (lo, hi): (u64, u64) = (lo.parse().unwrap(), hi.parse().unwrap());
    assert!(hi > lo);

    // Run it as array task 4 (first ID 3, 2 tasks) runs: shard 1/2, on the CPU, with the real
    // binary on PATH and a stand-in `scontrol` that records its arguments.
    let dir = temp_dir("slurm");
    let spec = write_spec(&dir, BIG, None);
    let out = dir.join("out");
    let fake = dir.join("fake-bin");
    std::fs::create_dir_all(&fake).unwrap();
    std::fs::write(
        fake.join("scontrol"),
        "#!/bin/sh\necho \"$@\" >> \"$SCONTROL_LOG\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        fake.join("scontrol"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let path = format!(
        "{}:{}",
        fake.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let task = || {
        let mut c = Command::new("bash");
        c.arg(&script)
            .current_dir(&dir)
            .env("SD_RUN_CACHE", dir.join("cache"));
        for v in SCHEDULER_VARS {
            c.env_remove(v);
        }
        c.env("SPEC", &spec)
            .env("PATH", &path)
            .env("SCONTROL_LOG", dir.join("scontrol.log"))
            .env("SD_RUN_BIN", Path::new(BIN).parent().unwrap())
            .env("SD_RUN_DEVICE", "cpu")
            .env("HF_HOME", dir.join("hf"))
            .env("SLURM_ARRAY_JOB_ID", "77")
            .env("SLURM_ARRAY_TASK_ID", "4")
            .env("SLURM_ARRAY_TASK_MIN", "3")
            .env("SLURM_ARRAY_TASK_COUNT", "2")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    let want = plan(&dir, &spec, "1/2")["images"].as_u64().unwrap();
    // The time limit nears (Slurm sends SIGUSR1 to the batch shell): sd-run stops after its
    // batch, the task requeues itself and exits 0.
    let child = task().spawn().unwrap();
    let started = Instant::now();
    while shard_records(&out, 1, 2) < 2 {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the task made nothing"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let usr1 = Command::new("kill")
        .args(["-USR1", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(usr1.success());
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert!(
        text(&o.stderr).contains("requeueing"),
        "{}",
        text(&o.stderr)
    );
    let log = std::fs::read_to_string(dir.join("scontrol.log")).expect("scontrol was called");
    assert_eq!(log.trim(), "requeue 77_4");
    assert!(summary(&o)["interrupted"] == true, "{}", text(&o.stdout));
    let first = shard_records(&out, 1, 2) as u64;
    assert!(first < want, "stopped mid-way: {first} of {want}");
    // The requeued task finishes the shard, making only what is missing.
    let o = task().output().unwrap();
    assert!(
        o.status.success(),
        "{}\n{}",
        text(&o.stdout),
        text(&o.stderr)
    );
    assert_eq!(summary(&o)["made"].as_u64().unwrap(), want - first);
    assert_eq!(shard_records(&out, 1, 2) as u64, want);
    assert!(!out.join("manifest.d/shard-0-of-2.jsonl").exists());
    // Not an array task: refused.
    let mut c = Command::new("bash");
    c.arg(&script).current_dir(&dir);
    for v in SCHEDULER_VARS {
        c.env_remove(v);
    }
    assert_eq!(c.output().unwrap().status.code(), Some(2));
    std::fs::remove_dir_all(&dir).unwrap();
}

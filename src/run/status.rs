//! `sd-run status SPEC`: how much of a campaign exists, per job and per shard, read from the
//! output folder alone (no running process is asked).
//!
//! An image counts as made when the store holds a whole file under its cache key. The key
//! includes the device kind that made it, so a campaign made on CUDA machines and checked from a
//! CPU login node is looked up under the keys of every device kind. When a model is not on this
//! machine (its digest, hence the key, is unknown), its images are matched by the parameters
//! their manifest records carry (job, model, prompt, seed, steps, size, ...) instead.
//!
//! Shards are reported for the shard counts given with `--shards N`, else for every N found in
//! `manifest.d/shard-K-of-N.jsonl` file names; the split is recomputed from the spec, exactly as
//! each shard computed it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use super::campaign::{Campaign, Fetch};
use super::RunError;
use crate::cache::store::MANIFEST_DIR;
use crate::cache::{DeviceKind, Store};
use crate::output::{ImageStatus, ManifestRecord};
use crate::plan::assign_shards;
use crate::spec::ImageRequest;

/// Counts of one slice of the campaign (the whole of it, a job, a shard).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Images the spec asks for.
    pub images: usize,
    /// Images in the store, whole.
    pub done: usize,
    /// Images not made whose latest record says `failed`.
    pub failed: usize,
}

impl Counts {
    /// Images not in the store (failed ones included).
    pub fn missing(&self) -> usize {
        self.images - self.done
    }

    fn add(&mut self, state: ImageState) {
        self.images += 1;
        match state {
            ImageState::Done => self.done += 1,
            ImageState::Failed => self.failed += 1,
            ImageState::Missing => {}
        }
    }

    fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "images": self.images,
            "done": self.done,
            "failed": self.failed,
            "missing": self.missing(),
        })
    }
}

/// Where one image stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageState {
    Done,
    Failed,
    Missing,
}

/// One shard's counts, with what its own manifest holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardStatus {
    pub index: usize,
    pub count: usize,
    pub counts: Counts,
    /// `manifest.d/shard-K-of-N.jsonl`, relative to the output root.
    pub manifest: String,
    /// Readable records in that manifest (0 when the shard never wrote one).
    pub records: usize,
}

/// The status of a campaign.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub output: std::path::PathBuf,
    pub total: Counts,
    /// By job name, in spec order.
    pub jobs: Vec<(String, Counts)>,
    /// Per shard, for each shard count, by count then index.
    pub shards: Vec<ShardStatus>,
    /// Models whose images were matched by parameters (not on this machine).
    pub matched_by_parameters: Vec<String>,
}

/// The shard counts N of `manifest.d/shard-K-of-N.jsonl` files under `root`, sorted.
pub fn shard_counts_in(root: &Path) -> Vec<usize> {
    let mut out = BTreeSet::new();
    if let Ok(entries) = std::fs::read_dir(root.join(MANIFEST_DIR)) {
        for e in entries.flatten() {
            if let Some((_, n)) = parse_shard_manifest_name(&e.file_name().to_string_lossy()) {
                out.insert(n);
            }
        }
    }
    out.into_iter().collect()
}

/// `(K, N)` of a file name `shard-K-of-N.jsonl` with `K < N`.
pub fn parse_shard_manifest_name(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("shard-")?.strip_suffix(".jsonl")?;
    let (k, n) = rest.split_once("-of-")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(k) || !digits(n) {
        return None;
    }
    let (k, n) = (k.parse().ok()?, n.parse().ok()?);
    (k < n).then_some((k, n))
}

/// Whether `rec` is a record of `req`, by the parameters records carry.
pub fn record_matches(rec: &ManifestRecord, req: &ImageRequest) -> bool {
    let p = &req.params;
    rec.job == req.job
        && rec.model == req.model
        && rec.prompt == req.prompt
        && rec.negative_prompt == p.negative_prompt
        && rec.seed == req.seed
        && rec.steps == p.steps
        && rec.guidance == p.guidance
        && rec.scheduler == p.scheduler.as_str()
        && rec.width == p.width
        && rec.height == p.height
        && rec.noise == p.noise.as_str()
        && rec.refiner == p.refiner
        && rec.grid == req.grid_point
}

/// The identity of a request (or record) for matching by parameters.
fn identity(
    job: &str,
    model: &str,
    prompt: &str,
    negative: &str,
    seed: u64,
    grid: &[(String, String)],
) -> String {
    serde_json::json!([job, model, prompt, negative, seed, grid]).to_string()
}

/// Counts lines of `file` that are manifest records.
fn count_records(file: &Path) -> usize {
    std::fs::read_to_string(file)
        .map(|t| {
            t.lines()
                .filter(|l| serde_json::from_str::<ManifestRecord>(l.trim()).is_ok())
                .count()
        })
        .unwrap_or(0)
}

/// Computes the status of a prepared campaign. `other_keys` are the keys of the same requests
/// for other device kinds; `shard_counts` the N to report shards for (none: every N found in
/// `manifest.d`).
pub fn campaign_status(c: &Campaign, other_keys: &[Vec<String>], shard_counts: &[usize]) -> Status {
    let store = &c.store;
    let made = |keys: &[String]| store.cached_flags(keys);
    let mut done = made(&c.keys);
    for keys in other_keys {
        if keys.len() != done.len() {
            continue;
        }
        for (d, hit) in done.iter_mut().zip(made(keys)) {
            *d |= hit;
        }
    }
    let failed_key = |k: &str| {
        store
            .record(k)
            .is_some_and(|r| r.status == ImageStatus::Failed)
    };

    // Requests whose model is not on this machine: match records by parameters.
    let unresolved: BTreeSet<&str> = c
        .requests
        .iter()
        .flat_map(|r| {
            std::iter::once(r.model.as_str())
                .chain(r.params.refiner.as_ref().map(|x| x.model.as_str()))
        })
        .filter(|m| !c.models.contains_key(*m))
        .collect();
    let mut by_identity: HashMap<String, Vec<ManifestRecord>> = HashMap::new();
    if !unresolved.is_empty() {
        for rec in store.records() {
            if unresolved.contains(rec.model.as_str()) {
                let id = identity(
                    &rec.job,
                    &rec.model,
                    &rec.prompt,
                    &rec.negative_prompt,
                    rec.seed,
                    &rec.grid,
                );
                by_identity.entry(id).or_default().push(rec);
            }
        }
    }
    let states: Vec<ImageState> = c
        .requests
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if done[i] {
                return ImageState::Done;
            }
            let key_failed = std::iter::once(&c.keys[i])
                .chain(other_keys.iter().filter_map(|k| k.get(i)))
                .any(|k| failed_key(k));
            let needs_match = unresolved.contains(r.model.as_str())
                || r.params
                    .refiner
                    .as_ref()
                    .is_some_and(|x| unresolved.contains(x.model.as_str()));
            if needs_match {
                let id = identity(
                    &r.job,
                    &r.model,
                    &r.prompt,
                    &r.params.negative_prompt,
                    r.seed,
                    &r.grid_point,
                );
                let recs = by_identity.get(&id).map(Vec::as_slice).unwrap_or_default();
                let matching: Vec<&ManifestRecord> =
                    recs.iter().filter(|rec| record_matches(rec, r)).collect();
                if matching.iter().any(|rec| store.lookup(&rec.key).is_some()) {
                    return ImageState::Done;
                }
                if key_failed || matching.iter().any(|rec| rec.status == ImageStatus::Failed) {
                    return ImageState::Failed;
                }
                return ImageState::Missing;
            }
            if key_failed {
                ImageState::Failed
            } else {
                ImageState::Missing
            }
        })
        .collect();

    let mut total = Counts::default();
    let mut jobs: Vec<(String, Counts)> = c
        .spec
        .jobs
        .iter()
        .map(|j| (j.name.clone(), Counts::default()))
        .collect();
    let job_pos: BTreeMap<&str, usize> = c
        .spec
        .jobs
        .iter()
        .enumerate()
        .map(|(i, j)| (j.name.as_str(), i))
        .collect();
    for (r, s) in c.requests.iter().zip(&states) {
        total.add(*s);
        match job_pos.get(r.job.as_str()) {
            Some(&j) => jobs[j].1.add(*s),
            None => {
                let mut counts = Counts::default();
                counts.add(*s);
                jobs.push((r.job.clone(), counts));
            }
        }
    }

    let counts: Vec<usize> = if shard_counts.is_empty() {
        shard_counts_in(store.root())
    } else {
        let mut v: Vec<usize> = shard_counts.iter().copied().filter(|&n| n > 0).collect();
        v.sort_unstable();
        v.dedup();
        v
    };
    let mut shards = Vec::new();
    for n in counts {
        let assigned = assign_shards(&c.requests, n);
        let mut per = vec![Counts::default(); n];
        for (s, state) in assigned.iter().zip(&states) {
            if let Some(p) = per.get_mut(*s) {
                p.add(*state);
            }
        }
        for (k, counts) in per.into_iter().enumerate() {
            let manifest = Store::shard_manifest_name(k, n);
            let records = count_records(&store.root().join(&manifest));
            shards.push(ShardStatus {
                index: k,
                count: n,
                counts,
                manifest,
                records,
            });
        }
    }
    Status {
        output: store.root().to_path_buf(),
        total,
        jobs,
        shards,
        matched_by_parameters: unresolved.into_iter().map(str::to_string).collect(),
    }
}

impl Status {
    /// One JSON object: `images`, `done`, `failed`, `missing`, `output`, `jobs` (by name), and
    /// `shards` (a list of `{shard: "K/N", index, count, images, done, failed, missing,
    /// manifest, records}`).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = self.total.to_json();
        v["output"] = serde_json::json!(self.output.display().to_string());
        let jobs: serde_json::Map<String, serde_json::Value> = self
            .jobs
            .iter()
            .map(|(j, c)| (j.clone(), c.to_json()))
            .collect();
        v["jobs"] = serde_json::Value::Object(jobs);
        v["shards"] = self
            .shards
            .iter()
            .map(|s| {
                let mut o = s.counts.to_json();
                o["shard"] = serde_json::json!(format!("{}/{}", s.index, s.count));
                o["index"] = serde_json::json!(s.index);
                o["count"] = serde_json::json!(s.count);
                o["manifest"] = serde_json::json!(s.manifest);
                o["records"] = serde_json::json!(s.records);
                o
            })
            .collect();
        v["matched_by_parameters"] = serde_json::json!(self.matched_by_parameters);
        v
    }

    /// The readable summary.
    pub fn text(&self) -> String {
        use std::fmt::Write;
        let line = |c: &Counts| {
            let mut s = format!("{}/{} made", c.done, c.images);
            if c.failed > 0 {
                let _ = write!(s, ", {} failed", c.failed);
            }
            if c.missing() > c.failed {
                let _ = write!(s, ", {} to make", c.missing() - c.failed);
            }
            if c.missing() == 0 {
                s.push_str(", complete");
            }
            s
        };
        let mut out = format!("{}: {}\n", self.output.display(), line(&self.total));
        for m in &self.matched_by_parameters {
            let _ = writeln!(out, "note: model {m} is not on this machine: its images are matched by their parameters");
        }
        let width = self.jobs.iter().map(|(j, _)| j.len()).max().unwrap_or(0);
        let _ = writeln!(out, "jobs:");
        for (j, c) in &self.jobs {
            let _ = writeln!(out, "  {j:width$}  {}", line(c));
        }
        let mut last = 0;
        for s in &self.shards {
            if s.count != last {
                let _ = writeln!(out, "shards (N={}):", s.count);
                last = s.count;
            }
            let started = if s.records > 0 {
                format!("{} ({} records)", s.manifest, s.records)
            } else {
                "not started".to_string()
            };
            let _ = writeln!(
                out,
                "  {:>7}  {}  {started}",
                format!("{}/{}", s.index, s.count),
                line(&s.counts)
            );
        }
        out
    }
}

/// `sd-run status SPEC [--json] [--shards N]`: prepares the campaign without the network, looks
/// its images up under the keys of every device kind, prints the status. `device` is the kind
/// whose keys come first (the others are tried too).
pub fn status(
    spec_path: &Path,
    device: DeviceKind,
    shards: Option<usize>,
    json: bool,
) -> Result<(), RunError> {
    if shards == Some(0) {
        return Err(RunError::Usage(
            "--shards 0: the shard count must be at least 1".into(),
        ));
    }
    let c = Campaign::prepare(spec_path, device, Fetch::LocalOnly)?;
    let mut other_keys = Vec::new();
    if !c.models.is_empty() {
        for kind in [DeviceKind::Cpu, DeviceKind::Cuda, DeviceKind::Metal] {
            if kind == device {
                continue;
            }
            let other = Campaign::from_spec(c.spec.clone(), kind, Fetch::LocalOnly)?;
            other_keys.push(other.keys);
        }
    }
    let st = campaign_status(&c, &other_keys, shards.as_slice());
    if json {
        let mut v = st.to_json();
        v["warnings"] = serde_json::json!(c.warnings);
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        for w in &c.warnings {
            eprintln!("warning: {w}");
        }
        print!("{}", st.text());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_manifest_names() {
        assert_eq!(
            parse_shard_manifest_name("shard-0-of-3.jsonl"),
            Some((0, 3))
        );
        assert_eq!(
            parse_shard_manifest_name("shard-12-of-16.jsonl"),
            Some((12, 16))
        );
        for bad in [
            "shard-3-of-3.jsonl",
            "shard--of-3.jsonl",
            "shard-a-of-3.jsonl",
            "shard-1-of-3.json",
            "x-1-of-3.jsonl",
            "shard-1-of-+3.jsonl",
        ] {
            assert_eq!(parse_shard_manifest_name(bad), None, "{bad}");
        }
        let root = std::env::temp_dir().join(format!("sd-run-status-names-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        assert!(shard_counts_in(&root).is_empty());
        std::fs::create_dir_all(root.join(MANIFEST_DIR)).unwrap();
        for name in [
            "shard-0-of-4.jsonl",
            "shard-3-of-4.jsonl",
            "shard-1-of-2.jsonl",
            "notes.txt",
        ] {
            std::fs::write(root.join(MANIFEST_DIR).join(name), b"").unwrap();
        }
        assert_eq!(shard_counts_in(&root), vec![2, 4]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn records_match_requests_by_parameters() {
        use crate::output::SafetyRecord;
        use crate::spec::GenParams;
        let req = ImageRequest {
            job: "j".into(),
            job_index: 0,
            prompt_index: 0,
            grid_index: 1,
            model: "m".into(),
            prompt: "a red circle".into(),
            seed: 7,
            params: GenParams::default(),
            grid_point: vec![("guidance".into(), "4".into())],
        };
        let p = &req.params;
        let rec = ManifestRecord {
            key: "ab".into(),
            path: None,
            file_sha256: None,
            job: "j".into(),
            model: "m".into(),
            prompt: "a red circle".into(),
            negative_prompt: p.negative_prompt.clone(),
            seed: 7,
            steps: p.steps,
            guidance: p.guidance,
            scheduler: p.scheduler.as_str().into(),
            width: p.width,
            height: p.height,
            noise: p.noise.as_str().into(),
            refiner: None,
            safety: SafetyRecord::default(),
            status: ImageStatus::Ok,
            seconds: 0.0,
            model_hash: String::new(),
            grid: vec![("guidance".into(), "4".into())],
            error: None,
        };
        assert!(record_matches(&rec, &req));
        let mut other = rec.clone();
        other.seed = 8;
        assert!(!record_matches(&other, &req));
        let mut other = rec.clone();
        other.steps += 1;
        assert!(!record_matches(&other, &req));
        let mut other = rec;
        other.grid.clear();
        assert!(!record_matches(&other, &req));
    }

    #[test]
    fn counts() {
        let mut c = Counts::default();
        for s in [
            ImageState::Done,
            ImageState::Failed,
            ImageState::Missing,
            ImageState::Done,
        ] {
            c.add(s);
        }
        assert_eq!(
            c,
            Counts {
                images: 4,
                done: 2,
                failed: 1
            }
        );
        assert_eq!(c.missing(), 2);
        assert_eq!(c.to_json()["missing"], 2);
    }
}

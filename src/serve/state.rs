//! The server's shared state: jobs, the queue of waiting tasks, limits, metrics; and the
//! operations the HTTP handlers and the worker perform on it.
//!
//! One `Mutex` guards it all and is held only for bookkeeping (never while a model runs, a spec
//! is validated or a file is written); the worker sleeps on a `Condvar` until work arrives.

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::jobs::{
    is_job_id, new_job_id, unix_now, ImageState, JobFile, JobState, JOB_FILE_FORMAT,
};
use super::metrics::{Gauges, Metrics};
use super::queue::Policy;
use super::ApiError;
use crate::cache::{DeviceKind, Store};
use crate::output::ImageStatus;
use crate::run::campaign::{Campaign, Fetch};
use crate::run::RunError;
use crate::spec::{self, ModelDecl};

/// How the server was configured (from `sd-run.toml` and the command line).
#[derive(Debug, Clone)]
pub struct Settings {
    /// When set, every `/v1` request needs `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
    /// Images waiting or being made beyond which submissions get 429.
    pub queue_limit: usize,
    /// Most images one job may ask for.
    pub max_images_per_job: usize,
    /// Whether client specs may name files (`source`, `init_image`, a checker path).
    pub allow_client_models: bool,
    /// The store's root.
    pub store_root: PathBuf,
    /// Where relative paths in client specs resolve (the config's folder).
    pub base_dir: PathBuf,
    /// The server's models (`[models.*]`).
    pub models: BTreeMap<String, ModelDecl>,
    pub device: DeviceKind,
    pub memory_budget: Option<u64>,
    /// Starvation bounds of the swap-aware order.
    pub policy: Policy,
    /// Largest request body.
    pub max_body_bytes: usize,
}

/// One job the server knows.
pub struct JobEntry {
    pub id: String,
    pub created: u64,
    pub state: JobState,
    /// The prepared campaign while the job has work left (dropped when it ends).
    pub campaign: Option<Arc<Campaign>>,
    pub keys: Vec<String>,
    pub images: Vec<ImageState>,
    pub withheld: HashSet<String>,
    pub errors: BTreeMap<String, String>,
    pub cached: usize,
    /// Tasks of this job waiting or running.
    pub tasks_left: usize,
}

/// Work the worker takes in one go: one job's images of one base model (its refiner included).
#[derive(Debug, Clone)]
pub struct Task {
    pub job: String,
    pub model: String,
    /// Request indices to make (one per distinct key, none cached at acceptance).
    pub indices: Vec<usize>,
    pub since: Instant,
    pub passed_over: u32,
}

/// The task being made now.
pub struct Running {
    pub job: String,
    pub keys: HashSet<String>,
    /// Set to stop after the current batch (cancel, shutdown).
    pub interrupt: Arc<AtomicBool>,
}

/// Everything behind the lock.
#[derive(Default)]
pub struct Inner {
    pub jobs: HashMap<String, JobEntry>,
    /// Waiting tasks in arrival order.
    pub tasks: Vec<Task>,
    pub running: Option<Running>,
    /// Images of jobs being accepted (counted against the limit before they are queued).
    pub reserved: usize,
    pub metrics: Metrics,
    /// The worker is up and taking work.
    pub worker_up: bool,
    /// New work is refused; the worker stops after its current batch.
    pub draining: bool,
}

/// The state shared by the HTTP handlers and the worker.
pub struct Shared {
    pub settings: Settings,
    inner: Mutex<Inner>,
    /// Wakes the worker when work arrives or the server drains.
    pub wake: Condvar,
    /// The store, for serving images.
    pub store: Store,
}

/// The answer to an accepted submission.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub id: String,
    pub images: usize,
    pub cached: usize,
    pub keys: Vec<String>,
    pub state: JobState,
    /// What the client should know (a model without a safety checker, CPU computing in f32).
    pub warnings: Vec<String>,
}

impl Accepted {
    /// The JSON body of the 202.
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "state": self.state,
            "images": self.images,
            "cached": self.cached,
            "keys": self.keys,
            "url": format!("/v1/jobs/{}", self.id),
            "warnings": self.warnings,
        })
    }
}

/// A job's images split into tasks: statuses, withheld keys, tasks by base model.
struct Prepared {
    images: Vec<ImageState>,
    withheld: HashSet<String>,
    cached: usize,
    tasks: Vec<(String, Vec<usize>)>,
}

/// Classifies each image of a campaign: made already (from the store) or to make, and groups
/// the distinct keys to make by base model, in order of first appearance.
fn prepare(c: &Campaign) -> Prepared {
    let hits = c.cached();
    let mut images = Vec::with_capacity(c.keys.len());
    let mut withheld = HashSet::new();
    let mut cached = 0;
    let mut seen = HashSet::new();
    let mut tasks: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, key) in c.keys.iter().enumerate() {
        if hits.get(i).copied().unwrap_or(false) {
            let rec = c.store.record(key);
            let flagged = rec
                .as_ref()
                .is_some_and(|r| r.status == ImageStatus::Flagged);
            if rec
                .as_ref()
                .is_none_or(|r| r.path.as_deref().is_none_or(|p| !p.starts_with("images/")))
            {
                withheld.insert(key.clone());
            }
            images.push(if flagged {
                ImageState::Flagged
            } else {
                ImageState::Ok
            });
            cached += 1;
            continue;
        }
        images.push(ImageState::Queued);
        if !seen.insert(key.as_str()) {
            continue;
        }
        let model = &c.requests[i].model;
        match tasks.iter_mut().find(|(m, _)| m == model) {
            Some((_, v)) => v.push(i),
            None => tasks.push((model.clone(), vec![i])),
        }
    }
    Prepared {
        images,
        withheld,
        cached,
        tasks,
    }
}

fn to_make(p: &Prepared) -> usize {
    p.tasks.iter().map(|(_, v)| v.len()).sum()
}

impl Shared {
    /// A server state with nothing queued.
    pub fn new(settings: Settings, store: Store) -> Self {
        Self {
            settings,
            inner: Mutex::new(Inner::default()),
            wake: Condvar::new(),
            store,
        }
    }

    /// Locks the state (a panic elsewhere never makes it unusable).
    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits on the worker's condition variable.
    pub fn wait<'a>(
        &self,
        guard: MutexGuard<'a, Inner>,
        timeout: Duration,
    ) -> MutexGuard<'a, Inner> {
        match self.wake.wait_timeout(guard, timeout) {
            Ok((g, _)) => g,
            Err(p) => p.into_inner().0,
        }
    }

    /// Whether the server takes new work.
    pub fn ready(&self) -> bool {
        let g = self.lock();
        g.worker_up && !g.draining
    }

    /// Counts a refusal in the metrics.
    pub fn refuse(&self, reason: &'static str) {
        self.lock().metrics.refuse(reason);
    }

    /// Validates a client spec, keys its images and queues what the store lacks. The job file is
    /// on disk before this returns `Ok`. Blocking (digests, store reads): call it off the
    /// async runtime.
    pub fn submit(&self, text: &str, label: &str) -> Result<Accepted, ApiError> {
        if self.lock().draining {
            return Err(ApiError::Draining);
        }
        let s = &self.settings;
        let opts = spec::LoadOptions {
            allow_sources: s.allow_client_models,
            known_models: Some(s.models.clone()),
        };
        let mut spec = spec::load_str_with(text, label, &s.base_dir, &opts)
            .map_err(|e| ApiError::Invalid(e.0.iter().map(|d| d.to_string()).collect()))?;
        let count = spec::image_count(&spec);
        if count > s.max_images_per_job {
            return Err(ApiError::TooManyImages {
                images: count,
                limit: s.max_images_per_job,
            });
        }
        spec.output = s.store_root.clone();
        spec.memory_budget = s.memory_budget;
        let campaign =
            Campaign::from_spec(spec, s.device, Fetch::Download).map_err(|e| match e {
                RunError::Spec(e) => ApiError::Invalid(e.0.iter().map(|d| d.to_string()).collect()),
                RunError::Model { .. } => ApiError::Invalid(vec![format!("{label}: {e}")]),
                other => ApiError::Internal(other.to_string()),
            })?;
        let prepared = prepare(&campaign);
        let n = to_make(&prepared);

        // Reserve room in the queue, then write the job file, then queue it.
        {
            let mut g = self.lock();
            if g.draining {
                return Err(ApiError::Draining);
            }
            let queued = g.queued_images() + g.reserved;
            if n > 0 && queued + n > s.queue_limit {
                if n > s.queue_limit {
                    return Err(ApiError::JobTooBig {
                        to_make: n,
                        limit: s.queue_limit,
                    });
                }
                let per_image = g.metrics.mean_seconds_per_image().unwrap_or(1.0);
                let retry_after = ((queued + n - s.queue_limit) as f64 * per_image)
                    .ceil()
                    .clamp(1.0, 3600.0) as u64;
                return Err(ApiError::QueueFull {
                    queued,
                    limit: s.queue_limit,
                    retry_after,
                });
            }
            g.reserved += n;
        }
        let id = new_job_id();
        let created = unix_now();
        let state = if n == 0 {
            JobState::Done
        } else {
            JobState::Queued
        };
        let file = JobFile {
            format: JOB_FILE_FORMAT,
            id: id.clone(),
            created,
            state,
            spec: campaign.spec.clone(),
            keys: campaign.keys.clone(),
            images: prepared.images.clone(),
            withheld: prepared.withheld.iter().cloned().collect(),
            errors: BTreeMap::new(),
            cached: prepared.cached,
        };
        let saved = file.save(&s.store_root);
        let mut g = self.lock();
        g.reserved -= n;
        if let Err(e) = saved {
            return Err(ApiError::Internal(format!(
                "cannot write the job file: {e}"
            )));
        }
        g.metrics.jobs_accepted += 1;
        g.metrics.cached += prepared.cached as u64;
        let accepted = Accepted {
            id: id.clone(),
            images: campaign.keys.len(),
            cached: prepared.cached,
            keys: campaign.keys.clone(),
            state,
            warnings: campaign.warnings.clone(),
        };
        g.insert(id, created, Arc::new(campaign), prepared);
        drop(g);
        self.wake.notify_all();
        Ok(accepted)
    }

    /// Loads the job files of the store: finished jobs as they were, the others queued again
    /// (what the store already has counts as made). Returns the problems met.
    pub fn resume(&self) -> Vec<String> {
        let (files, mut problems) = JobFile::load_all(&self.settings.store_root);
        for f in files {
            if f.state.is_terminal() {
                // A job cancelled while its batch ran may have been cut short before its last write.
                let images = f
                    .images
                    .iter()
                    .map(|s| {
                        if s.is_pending() {
                            ImageState::Cancelled
                        } else {
                            *s
                        }
                    })
                    .collect();
                let entry = JobEntry {
                    id: f.id.clone(),
                    created: f.created,
                    state: f.state,
                    campaign: None,
                    keys: f.keys,
                    images,
                    withheld: f.withheld.into_iter().collect(),
                    errors: f.errors,
                    cached: f.cached,
                    tasks_left: 0,
                };
                self.lock().jobs.insert(f.id, entry);
                continue;
            }
            let mut spec = f.spec.clone();
            spec.output = self.settings.store_root.clone();
            spec.memory_budget = self.settings.memory_budget;
            match Campaign::from_spec(spec, self.settings.device, Fetch::Download) {
                Ok(c) => {
                    let prepared = prepare(&c);
                    if to_make(&prepared) == 0 {
                        let file = JobFile {
                            state: JobState::Done,
                            keys: c.keys.clone(),
                            images: prepared.images.clone(),
                            withheld: prepared.withheld.iter().cloned().collect(),
                            ..f.clone()
                        };
                        if let Err(e) = file.save(&self.settings.store_root) {
                            problems.push(format!("job {}: {e}", f.id));
                        }
                    }
                    self.lock()
                        .insert(f.id.clone(), f.created, Arc::new(c), prepared);
                }
                Err(e) => {
                    problems.push(format!("job {}: {e}", f.id));
                    let mut errors = f.errors.clone();
                    let mut images = f.images.clone();
                    for (k, s) in f.keys.iter().zip(images.iter_mut()) {
                        if s.is_pending() {
                            *s = ImageState::Failed;
                            errors.insert(k.clone(), format!("cannot resume: {e}"));
                        }
                    }
                    let file = JobFile {
                        state: JobState::Failed,
                        images: images.clone(),
                        errors: errors.clone(),
                        ..f.clone()
                    };
                    let _ = file.save(&self.settings.store_root);
                    let entry = JobEntry {
                        id: f.id.clone(),
                        created: f.created,
                        state: JobState::Failed,
                        campaign: None,
                        keys: f.keys,
                        images,
                        withheld: f.withheld.into_iter().collect(),
                        errors,
                        cached: f.cached,
                        tasks_left: 0,
                    };
                    self.lock().jobs.insert(f.id, entry);
                }
            }
        }
        self.wake.notify_all();
        problems
    }

    /// The JSON view of a job.
    pub fn job_view(&self, id: &str) -> Result<Value, ApiError> {
        if !is_job_id(id) {
            return Err(ApiError::NotFound(format!("no job `{id}`")));
        }
        let g = self.lock();
        let j = g
            .jobs
            .get(id)
            .ok_or_else(|| ApiError::NotFound(format!("no job `{id}`")))?;
        Ok(view(j))
    }

    /// Cancels what has not started of a job: its waiting tasks, and the rest of its running
    /// task after the current batch. Images already made are kept.
    pub fn cancel(&self, id: &str) -> Result<Value, ApiError> {
        if !is_job_id(id) {
            return Err(ApiError::NotFound(format!("no job `{id}`")));
        }
        let mut g = self.lock();
        let Some(j) = g.jobs.get(id) else {
            return Err(ApiError::NotFound(format!("no job `{id}`")));
        };
        match j.state {
            JobState::Cancelled => return Ok(view(j)),
            JobState::Done | JobState::Failed => {
                return Err(ApiError::Conflict(format!(
                    "job `{id}` has ended ({}); nothing to cancel",
                    json!(j.state).as_str().unwrap_or("")
                )))
            }
            JobState::Queued | JobState::Running => {}
        }
        let before = g.tasks.len();
        g.tasks.retain(|t| t.job != id);
        let removed = before - g.tasks.len();
        let running_here = g.running.as_ref().is_some_and(|r| r.job == id);
        if let Some(r) = g.running.as_ref().filter(|r| r.job == id) {
            r.interrupt.store(true, Ordering::SeqCst);
        }
        let Some(j) = g.jobs.get_mut(id) else {
            return Err(ApiError::NotFound(format!("no job `{id}`")));
        };
        j.tasks_left -= removed.min(j.tasks_left);
        j.state = JobState::Cancelled;
        for s in j.images.iter_mut() {
            if *s == ImageState::Queued {
                *s = ImageState::Cancelled;
            }
        }
        let out = view(j);
        // Written under the lock (cancels are rare) so that the worker's final write, if the
        // running task ends later, is the last one.
        if let Some(f) = g.snapshot_of(id) {
            if let Err(e) = f.save(&self.settings.store_root) {
                return Err(ApiError::Internal(format!(
                    "cannot write the job file: {e}"
                )));
            }
        }
        if !running_here {
            if let Some(j) = g.jobs.get_mut(id) {
                j.campaign = None;
            }
        }
        Ok(out)
    }

    /// Refuses new work and asks the worker to stop after its current batch.
    pub fn drain(&self) {
        let mut g = self.lock();
        g.draining = true;
        if let Some(r) = &g.running {
            r.interrupt.store(true, Ordering::SeqCst);
        }
        drop(g);
        self.wake.notify_all();
    }

    /// The metrics in Prometheus text.
    pub fn metrics_text(&self) -> String {
        let g = self.lock();
        let gauges = Gauges {
            queued_images: g.queued_images(),
            active_jobs: g.jobs.values().filter(|j| !j.state.is_terminal()).count(),
            ready: g.worker_up && !g.draining,
        };
        g.metrics.render(gauges)
    }
}

/// The JSON view of a job: `{id, state, created, images: [{key, status, url}], counts}`.
fn view(j: &JobEntry) -> Value {
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let images: Vec<Value> = j
        .keys
        .iter()
        .zip(&j.images)
        .map(|(k, s)| {
            let status = json!(s);
            *counts.entry(status_name(*s)).or_default() += 1;
            let url = (s.is_made() && !j.withheld.contains(k)).then(|| format!("/v1/images/{k}"));
            let mut v = json!({"key": k, "status": status, "url": url});
            if let Some(e) = j.errors.get(k).filter(|_| *s == ImageState::Failed) {
                v["error"] = json!(e);
            }
            v
        })
        .collect();
    json!({"id": j.id, "state": j.state, "created": j.created, "images": images, "counts": counts})
}

fn status_name(s: ImageState) -> &'static str {
    match s {
        ImageState::Queued => "queued",
        ImageState::Running => "running",
        ImageState::Ok => "ok",
        ImageState::Flagged => "flagged",
        ImageState::Failed => "failed",
        ImageState::Cancelled => "cancelled",
    }
}

impl Inner {
    /// Images waiting or being made.
    pub fn queued_images(&self) -> usize {
        let waiting: usize = self.tasks.iter().map(|t| t.indices.len()).sum();
        let running = self.running.as_ref().map_or(0, |r| {
            self.jobs.get(&r.job).map_or(0, |j| {
                let mut seen = HashSet::new();
                j.keys
                    .iter()
                    .zip(&j.images)
                    .filter(|(k, s)| {
                        **s == ImageState::Running && r.keys.contains(*k) && seen.insert(*k)
                    })
                    .count()
            })
        });
        waiting + running
    }

    /// Adds a prepared job and its tasks.
    fn insert(&mut self, id: String, created: u64, campaign: Arc<Campaign>, p: Prepared) {
        let now = Instant::now();
        let n_tasks = p.tasks.len();
        for (model, indices) in p.tasks {
            self.tasks.push(Task {
                job: id.clone(),
                model,
                indices,
                since: now,
                passed_over: 0,
            });
        }
        let state = if n_tasks == 0 {
            JobState::Done
        } else {
            JobState::Queued
        };
        let entry = JobEntry {
            id: id.clone(),
            created,
            state,
            campaign: (n_tasks > 0).then_some(campaign.clone()),
            keys: campaign.keys.clone(),
            images: p.images,
            withheld: p.withheld,
            errors: BTreeMap::new(),
            cached: p.cached,
            tasks_left: n_tasks,
        };
        self.jobs.insert(id, entry);
    }

    /// The job file of a job that still has its campaign.
    fn snapshot(&self, j: &JobEntry) -> Option<JobFile> {
        let c = j.campaign.as_ref()?;
        Some(JobFile {
            format: JOB_FILE_FORMAT,
            id: j.id.clone(),
            created: j.created,
            state: j.state,
            spec: c.spec.clone(),
            keys: j.keys.clone(),
            images: j.images.clone(),
            withheld: j.withheld.iter().cloned().collect(),
            errors: j.errors.clone(),
            cached: j.cached,
        })
    }

    /// [`snapshot`](Self::snapshot) by id.
    pub fn snapshot_of(&self, id: &str) -> Option<JobFile> {
        self.jobs.get(id).and_then(|j| self.snapshot(j))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ModelSource;

    fn settings(root: &std::path::Path, queue_limit: usize) -> Settings {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/demo");
        let decl = ModelDecl {
            name: "demo".into(),
            source: ModelSource::Path { path },
            dtype: Default::default(),
            memory: Default::default(),
        };
        Settings {
            token: None,
            queue_limit,
            max_images_per_job: 5,
            allow_client_models: false,
            store_root: root.to_path_buf(),
            base_dir: root.to_path_buf(),
            models: [("demo".to_string(), decl)].into_iter().collect(),
            device: DeviceKind::Cpu,
            memory_budget: None,
            policy: Policy::default(),
            max_body_bytes: 1 << 20,
        }
    }

    /// A server state over the store at `root`.
    fn shared_at(root: &std::path::Path, queue_limit: usize) -> Shared {
        Shared::new(settings(root, queue_limit), Store::open(root).unwrap())
    }

    /// A server state over a fresh store.
    fn shared(name: &str, queue_limit: usize) -> (Shared, PathBuf) {
        let root =
            std::env::temp_dir().join(format!("sd-run-serve-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        (shared_at(&root, queue_limit), root)
    }

    fn spec(seeds: &str) -> String {
        format!("version: 1\ndefaults:\n  steps: 2\n  size: 64x64\njobs:\n  - name: a\n    model: demo\n    prompts: [\"a red circle\"]\n    seeds: {seeds}\n")
    }

    #[test]
    fn limits_reserve_room_and_say_when_to_retry() {
        let (s, root) = shared("limits", 3);
        // Duplicate seeds make one image: the job needs 2 made.
        let a = s.submit(&spec("[1, 2, 2]"), "spec").unwrap();
        assert_eq!((a.images, a.cached, a.state), (3, 0, JobState::Queued));
        assert_eq!(a.keys[1], a.keys[2]);
        assert!(
            JobFile::path(&root, &a.id).is_file(),
            "the job file is written before the answer"
        );
        assert_eq!(s.lock().queued_images(), 2);
        assert_eq!(s.lock().tasks.len(), 1);
        match s.submit(&spec("[3, 4]"), "spec") {
            Err(ApiError::QueueFull {
                queued: 2,
                limit: 3,
                retry_after,
            }) => assert!(retry_after >= 1),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.submit(&spec("[5, 6, 7, 8]"), "spec"),
            Err(ApiError::JobTooBig {
                to_make: 4,
                limit: 3
            })
        ));
        assert!(matches!(
            s.submit(&spec("{from: 1, count: 6}"), "spec"),
            Err(ApiError::TooManyImages {
                images: 6,
                limit: 5
            })
        ));
        match s.submit("version: 1\njobs:\n  - name: a\n    model: demo\n    prompts: [x]\n    seeds: [1]\n    steps: 0\n", "spec") {
            Err(ApiError::Invalid(m)) => assert!(m[0].starts_with("spec:7:") && m[0].contains("steps"), "{m:?}"),
            other => panic!("{other:?}"),
        }
        s.submit(&spec("[9]"), "spec").unwrap();
        assert_eq!(s.lock().queued_images(), 3);

        // Cancelling frees the room and ends the job.
        let v = s.cancel(&a.id).unwrap();
        assert_eq!(v["state"], "cancelled");
        assert!(v["images"]
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["status"] == "cancelled"));
        assert_eq!(s.lock().queued_images(), 1);
        let (files, _) = JobFile::load_all(&root);
        assert_eq!(
            files.iter().find(|f| f.id == a.id).map(|f| f.state),
            Some(JobState::Cancelled)
        );
        assert!(matches!(s.job_view("../x"), Err(ApiError::NotFound(_))));
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn draining_refuses_work_and_a_restart_resumes_it() {
        let (s, root) = shared("drain", 10);
        assert!(!s.ready(), "not ready before the worker is up");
        s.lock().worker_up = true;
        assert!(s.ready());
        let a = s.submit(&spec("[1, 2]"), "spec").unwrap();
        s.drain();
        assert!(!s.ready());
        assert_eq!(
            s.submit(&spec("[3]"), "spec").unwrap_err(),
            ApiError::Draining
        );
        drop(s);

        let s2 = shared_at(&root, 10);
        assert!(s2.resume().is_empty());
        let g = s2.lock();
        assert_eq!(g.jobs[&a.id].state, JobState::Queued);
        assert_eq!(g.tasks.iter().map(|t| t.indices.len()).sum::<usize>(), 2);
        drop(g);
        let _ = std::fs::remove_dir_all(&root);
    }
}

//! Jobs as the server knows them, and their files in the store
//! (`<store>/.sd-run/jobs/<id>.json`, written atomically) that let a restart resume them.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::cache::CacheError;
use crate::spec::Spec;

/// Version of the job file layout.
pub const JOB_FILE_FORMAT: u32 = 1;

/// A job's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    /// Whether nothing more will happen to the job.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
    }
}

/// One image's state within a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageState {
    Queued,
    Running,
    Ok,
    Flagged,
    Failed,
    Cancelled,
}

impl ImageState {
    /// Whether the image is waiting or being made.
    pub fn is_pending(self) -> bool {
        matches!(self, Self::Queued | Self::Running)
    }

    /// Whether the image exists in the store (possibly withheld by the safety stage).
    pub fn is_made(self) -> bool {
        matches!(self, Self::Ok | Self::Flagged)
    }
}

/// What `<store>/.sd-run/jobs/<id>.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobFile {
    pub format: u32,
    pub id: String,
    /// Unix seconds of acceptance.
    pub created: u64,
    /// The state when the file was last written: `queued` until the job ends.
    pub state: JobState,
    /// The validated spec with the server's models and store filled in.
    pub spec: Spec,
    /// Each image's key and state (states are final only in a terminal file).
    pub keys: Vec<String>,
    pub images: Vec<ImageState>,
    /// Keys whose image is withheld (dropped or quarantined by the safety stage).
    #[serde(default)]
    pub withheld: Vec<String>,
    /// Errors of failed images, by key.
    #[serde(default)]
    pub errors: BTreeMap<String, String>,
    /// Images already in the store when the job was accepted.
    #[serde(default)]
    pub cached: usize,
}

/// The folder of job files under a store root.
pub fn jobs_dir(store_root: &Path) -> PathBuf {
    store_root.join(".sd-run").join("jobs")
}

/// Whether `id` has the shape of a job id (so it is safe in a file name).
pub fn is_job_id(id: &str) -> bool {
    id.len() == 20
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A new job id: 12 hex digits of Unix milliseconds (ids sort by arrival), then 8 of a hash of
/// the time, the process and a counter.
pub fn new_job_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let salt = crate::cache::sha256_bytes(
        format!("{}:{}:{n}", now.as_nanos(), std::process::id()).as_bytes(),
    );
    format!(
        "{:012x}{}",
        now.as_millis() as u64 & 0xffff_ffff_ffff,
        &salt[..8]
    )
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl JobFile {
    /// The file's path under a store root.
    pub fn path(store_root: &Path, id: &str) -> PathBuf {
        jobs_dir(store_root).join(format!("{id}.json"))
    }

    /// Writes the file atomically (temp file, fsync, rename).
    pub fn save(&self, store_root: &Path) -> Result<(), CacheError> {
        let path = Self::path(store_root, &self.id);
        let bytes =
            serde_json::to_vec(self).map_err(|e| CacheError::invalid(&path, e.to_string()))?;
        crate::cache::write_atomic(&path, &bytes)
    }

    /// Every job file under a store root, oldest first; unreadable files are reported, not fatal.
    pub fn load_all(store_root: &Path) -> (Vec<JobFile>, Vec<String>) {
        let dir = jobs_dir(store_root);
        let mut jobs = Vec::new();
        let mut problems = Vec::new();
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return (jobs, problems);
        };
        for e in entries.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".json") else {
                continue;
            };
            if !is_job_id(id) {
                continue;
            }
            match std::fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<JobFile>(&b).map_err(|e| e.to_string()))
            {
                Ok(f)
                    if f.format == JOB_FILE_FORMAT
                        && f.id == id
                        && f.keys.len() == f.images.len() =>
                {
                    jobs.push(f)
                }
                Ok(_) => problems.push(format!("{}: not a job file of this version", p.display())),
                Err(e) => problems.push(format!("{}: {e}", p.display())),
            }
        }
        jobs.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        (jobs, problems)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Spec {
        Spec {
            file: "job".into(),
            output: "/tmp/x".into(),
            models: Default::default(),
            memory_budget: None,
            safety: Default::default(),
            jobs: vec![],
        }
    }

    #[test]
    fn ids_are_unique_sortable_and_safe() {
        let a = new_job_id();
        let b = new_job_id();
        assert_ne!(a, b);
        assert!(is_job_id(&a) && is_job_id(&b));
        assert!(a[..12] <= b[..12]);
        assert!(!is_job_id("../../etc/passwd"));
        assert!(!is_job_id("0123456789ABCDEF0123"));
    }

    #[test]
    fn files_round_trip_and_bad_ones_are_reported() {
        let root = std::env::temp_dir().join(format!("sd-run-serve-jobs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mut f = JobFile {
            format: JOB_FILE_FORMAT,
            id: new_job_id(),
            created: 5,
            state: JobState::Queued,
            spec: spec(),
            keys: vec!["ab".into()],
            images: vec![ImageState::Queued],
            withheld: vec![],
            errors: Default::default(),
            cached: 0,
        };
        f.save(&root).unwrap();
        let older = JobFile {
            id: new_job_id(),
            created: 1,
            ..f.clone()
        };
        older.save(&root).unwrap();
        std::fs::write(
            jobs_dir(&root).join("00000000000000000000.json"),
            b"{not json",
        )
        .unwrap();
        let (all, problems) = JobFile::load_all(&root);
        assert_eq!(
            all.iter().map(|j| j.id.clone()).collect::<Vec<_>>(),
            vec![older.id.clone(), f.id.clone()]
        );
        assert_eq!(problems.len(), 1, "{problems:?}");
        f.state = JobState::Done;
        f.images = vec![ImageState::Ok];
        f.save(&root).unwrap();
        let (all, _) = JobFile::load_all(&root);
        assert_eq!(all[1].state, JobState::Done);
        assert_eq!(all[1].images, vec![ImageState::Ok]);
        let _ = std::fs::remove_dir_all(&root);
    }
}

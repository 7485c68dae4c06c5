//! The model pool: loaded pipelines by model name, kept until the plan is done with them and
//! evicted (least recently used first) when the memory budget needs room.

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use crate::engine::pipeline::{LoadOptions, Pipeline};
use crate::engine::EngineError;

struct Entry {
    pipeline: Pipeline,
    bytes: u64,
    last_used: u64,
}

/// Loaded pipelines, bounded by a memory budget.
pub struct ModelPool {
    entries: HashMap<String, Entry>,
    budget: Option<u64>,
    clock: u64,
}

/// The resident size of a model: the total size of its weight files.
pub fn model_bytes(dir: &Path) -> u64 {
    fn walk(dir: &Path, total: &mut u64) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(&p, total);
            } else if p.extension().is_some_and(|x| x == "safetensors") {
                *total += e.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    let mut total = 0;
    walk(dir, &mut total);
    total
}

impl ModelPool {
    /// An empty pool; `budget` in bytes (None: keep everything loaded).
    pub fn new(budget: Option<u64>) -> Self {
        Self {
            entries: HashMap::new(),
            budget,
            clock: 0,
        }
    }

    /// Whether `name` is loaded now.
    pub fn is_loaded(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// The loaded pipeline for `name`, loading it from `dir` first when needed. `on_load` is
    /// called before a load starts. Returns the pipeline and the seconds its load took (0 when
    /// it was resident).
    pub fn get(
        &mut self,
        name: &str,
        dir: &Path,
        opts: &LoadOptions,
        on_load: impl FnOnce(),
    ) -> Result<(&Pipeline, f64), EngineError> {
        self.clock += 1;
        let clock = self.clock;
        let mut seconds = 0.0;
        if !self.entries.contains_key(name) {
            on_load();
            let bytes = model_bytes(dir);
            self.make_room(bytes);
            let started = Instant::now();
            let pipeline = Pipeline::load(dir, opts)?;
            seconds = started.elapsed().as_secs_f64();
            self.entries.insert(
                name.to_string(),
                Entry {
                    pipeline,
                    bytes,
                    last_used: clock,
                },
            );
        }
        let entry = self
            .entries
            .get_mut(name)
            .ok_or_else(|| EngineError::Other(format!("model {name} not loaded")))?;
        entry.last_used = clock;
        Ok((&entry.pipeline, seconds))
    }

    /// Drops a model the plan no longer needs.
    pub fn release(&mut self, name: &str) {
        self.entries.remove(name);
    }

    /// Evicts least recently used models until `incoming` bytes fit in the budget.
    fn make_room(&mut self, incoming: u64) {
        let Some(budget) = self.budget else { return };
        loop {
            let used: u64 = self.entries.values().map(|e| e.bytes).sum();
            if used + incoming <= budget || self.entries.is_empty() {
                return;
            }
            let oldest = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.entries.remove(&k);
            }
        }
    }
}

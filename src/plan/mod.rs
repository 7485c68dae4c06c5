//! The planner: which images to make, in which stages and batches, so that each checkpoint
//! loads as few times as the memory budget allows.
//!
//! - Cached images drop out; requests with the same cache key are made once (`duplicates`).
//! - Work is grouped by model. A job with a refiner runs stage-major: a base stage
//!   (`role: base`) makes every image of that base model, then a refiner stage (`role: refiner`)
//!   finishes the images that have that refiner. Models connected by base→refiner pairs form a
//!   component: all its base stages run first, then all its refiner stages, so each model of the
//!   component has one stage per role.
//! - Images that share every batching field (model, prompt, negative prompt, size, steps,
//!   guidance, scheduler, noise, refiner, SDXL conditioning, init image, strength, batch size)
//!   are batched together, up to `batch_size`.
//! - Model loads are counted by simulating residency under `memory_budget` with model sizes from
//!   [`ModelSizes`], evicting the model needed furthest in the future; each [`Stage`] says whether
//!   it loads its model and what it evicts first. Without a budget every model stays resident, so
//!   loads equal the number of distinct models.
//!
//! Plans are pure data and never touch candle or the disk.

pub mod render;
pub mod shard;

pub use render::{Rates, REFERENCE_PIXELS};
pub use shard::{assign_shards, plan_shard, shard_indices, Shard, ShardError};

use crate::spec::{ImageRequest, NoiseSource, SchedulerName, Spec};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

/// Which pass of a model a stage runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Text-to-image (or img2img) from noise, up to `switch_at` when a refiner follows.
    Base,
    /// The refiner's pass from `switch_at` on the base stage's latents.
    Refiner,
}

impl Role {
    /// `base` or `refiner`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Base => "base",
            Self::Refiner => "refiner",
        }
    }
}

/// Images computed in one UNet forward (indices into the requests).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Batch {
    pub items: Vec<usize>,
}

/// One model in one role, with its batches, in execution order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stage {
    pub model: String,
    pub role: Role,
    pub batches: Vec<Batch>,
    /// Whether the model must be loaded for this stage (it is not resident yet).
    pub load: bool,
    /// Models to unload before loading this one, to stay within the memory budget.
    pub evict: Vec<String>,
}

impl Stage {
    /// Number of images in this stage.
    pub fn images(&self) -> usize {
        self.batches.iter().map(|b| b.items.len()).sum()
    }
}

/// What a run will do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Plan {
    /// Stages in execution order.
    pub stages: Vec<Stage>,
    /// Images the (shard of the) spec asks for.
    pub images: usize,
    /// Of those, already in the store.
    pub cached: usize,
    /// Requests whose key another (earlier) request of this plan already makes.
    pub duplicates: usize,
    /// Images to make (`images = cached + duplicates + to_make`).
    pub to_make: usize,
    /// How many times a checkpoint will be loaded, given the order and the budget.
    pub model_loads: usize,
}

impl Plan {
    /// Total number of batches over all stages.
    pub fn batches(&self) -> usize {
        self.stages.iter().map(|s| s.batches.len()).sum()
    }
}

/// Estimated resident sizes of models (bytes), by model name; an unknown size counts as 0.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelSizes {
    sizes: BTreeMap<String, u64>,
}

impl ModelSizes {
    /// No sizes known.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a model's size in bytes.
    pub fn insert(&mut self, model: impl Into<String>, bytes: u64) {
        self.sizes.insert(model.into(), bytes);
    }

    /// A model's size, if known.
    pub fn get(&self, model: &str) -> Option<u64> {
        self.sizes.get(model).copied()
    }

    /// Estimates a diffusers folder's resident size: the total size of its `*.safetensors` files,
    /// one level of component folders deep (fp16 variants are not double-counted when the
    /// full-precision file exists).
    pub fn weights_size(dir: &Path) -> u64 {
        let mut total = 0;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return 0;
        };
        for e in entries.flatten() {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            let Ok(files) = std::fs::read_dir(&p) else {
                continue;
            };
            let names: Vec<_> = files.flatten().map(|f| f.path()).collect();
            for f in &names {
                let name = f
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                if !name.ends_with(".safetensors") {
                    continue;
                }
                if let Some(stem) = name.strip_suffix(".fp16.safetensors") {
                    if names.iter().any(|o| {
                        o.file_name()
                            .is_some_and(|n| n.to_string_lossy() == format!("{stem}.safetensors"))
                    }) {
                        continue;
                    }
                }
                total += std::fs::metadata(f).map(|m| m.len()).unwrap_or(0);
            }
        }
        total
    }
}

impl FromIterator<(String, u64)> for ModelSizes {
    fn from_iter<T: IntoIterator<Item = (String, u64)>>(iter: T) -> Self {
        Self {
            sizes: iter.into_iter().collect(),
        }
    }
}

/// A small fast hasher (FxHash) for the planner's in-memory maps: the data is local, so there
/// is no flooding to defend against, and SipHash dominated planning time.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w) ^ ((rest.len() as u64) << 56));
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.add(i as u64);
    }
    fn write_u32(&mut self, i: u32) {
        self.add(i as u64);
    }
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, w: u64) {
        self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
}

pub(crate) type FxBuild = std::hash::BuildHasherDefault<FxHasher>;

/// SDXL conditioning as hashable values: original size, crop, aesthetic scores' bits.
type SdxlBits = (Option<(u32, u32)>, (u32, u32), u64, u64);

/// The batching fields of a request: requests with equal keys may share a UNet forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct BatchKey<'a> {
    model: &'a str,
    prompt: &'a str,
    negative: &'a str,
    width: u32,
    height: u32,
    steps: u32,
    guidance: u64,
    scheduler: SchedulerName,
    noise: NoiseSource,
    refiner: Option<(&'a str, u64)>,
    sdxl: SdxlBits,
    init: Option<(&'a Path, u64)>,
    batch_size: u32,
}

fn bits(x: f64) -> u64 {
    if x == 0.0 {
        0
    } else {
        x.to_bits()
    }
}

impl<'a> BatchKey<'a> {
    pub(crate) fn of(r: &'a ImageRequest) -> Self {
        let p = &r.params;
        Self {
            model: &r.model,
            prompt: &r.prompt,
            negative: &p.negative_prompt,
            width: p.width,
            height: p.height,
            steps: p.steps,
            guidance: bits(p.guidance),
            scheduler: p.scheduler,
            noise: p.noise,
            refiner: p
                .refiner
                .as_ref()
                .map(|s| (s.model.as_str(), bits(s.switch_at))),
            sdxl: (
                p.sdxl.original_size,
                p.sdxl.crop,
                bits(p.sdxl.aesthetic_score),
                bits(p.sdxl.negative_aesthetic_score),
            ),
            init: p.init_image.as_deref().map(|i| (i, bits(p.strength))),
            batch_size: p.batch_size.max(1),
        }
    }
}

/// Requests grouped by batching key in first-appearance order (members in the given order).
pub(crate) fn batch_groups(
    requests: &[ImageRequest],
    indices: impl Iterator<Item = usize>,
) -> Vec<Vec<usize>> {
    let mut ids: HashMap<BatchKey<'_>, usize, FxBuild> = HashMap::default();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for i in indices {
        let k = BatchKey::of(&requests[i]);
        let id = *ids.entry(k).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[id].push(i);
    }
    groups
}

/// Splits groups into batches of at most each group's `batch_size`.
pub(crate) fn chunk_groups<'g>(
    requests: &[ImageRequest],
    groups: impl IntoIterator<Item = &'g [usize]>,
) -> Vec<Batch> {
    let mut out = Vec::new();
    for g in groups {
        let Some(&first) = g.first() else { continue };
        let size = requests[first].params.batch_size.max(1) as usize;
        out.extend(g.chunks(size).map(|c| Batch { items: c.to_vec() }));
    }
    out
}

/// Plans every request (see the module docs); the budget is ignored for lack of model sizes.
/// `keys[i]` and `cached[i]` belong to `requests[i]`; a missing entry counts as unique and not
/// cached.
pub fn plan(requests: &[ImageRequest], keys: &[String], cached: &[bool], spec: &Spec) -> Plan {
    plan_with(requests, keys, cached, spec, &ModelSizes::default())
}

/// Like [`plan`], with model sizes for the memory budget.
pub fn plan_with(
    requests: &[ImageRequest],
    keys: &[String],
    cached: &[bool],
    spec: &Spec,
    sizes: &ModelSizes,
) -> Plan {
    plan_indices(
        requests,
        keys,
        cached,
        spec.memory_budget,
        sizes,
        0..requests.len(),
    )
}

/// Plans the requests at `indices` (in that order); batch items index `requests`.
pub fn plan_indices(
    requests: &[ImageRequest],
    keys: &[String],
    cached: &[bool],
    memory_budget: Option<u64>,
    sizes: &ModelSizes,
    indices: impl IntoIterator<Item = usize>,
) -> Plan {
    let mut plan = Plan::default();
    let mut seen: HashSet<&str, FxBuild> = HashSet::default();
    let mut make = Vec::new();
    for i in indices {
        if i >= requests.len() {
            continue;
        }
        plan.images += 1;
        if cached.get(i).copied().unwrap_or(false) {
            plan.cached += 1;
            continue;
        }
        if let Some(k) = keys.get(i) {
            if !seen.insert(k.as_str()) {
                plan.duplicates += 1;
                continue;
            }
        }
        make.push(i);
    }
    plan.to_make = make.len();
    drop(seen);

    let groups = batch_groups(requests, make.iter().copied());

    // Stages by (model, role), in first-appearance order of their groups.
    let mut base_groups: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut refiner_groups: Vec<(&str, Vec<usize>)> = Vec::new();
    let mut base_pos: HashMap<&str, usize> = HashMap::new();
    let mut refiner_pos: HashMap<&str, usize> = HashMap::new();
    let mut uf = UnionFind::default();
    for (gi, g) in groups.iter().enumerate() {
        let r = &requests[g[0]];
        let model = r.model.as_str();
        let p = *base_pos.entry(model).or_insert_with(|| {
            base_groups.push((model, Vec::new()));
            base_groups.len() - 1
        });
        base_groups[p].1.push(gi);
        uf.add(model);
        if let Some(rf) = &r.params.refiner {
            let rm = rf.model.as_str();
            let p = *refiner_pos.entry(rm).or_insert_with(|| {
                refiner_groups.push((rm, Vec::new()));
                refiner_groups.len() - 1
            });
            refiner_groups[p].1.push(gi);
            uf.union(model, rm);
        }
    }

    // Components in first-appearance order of their base models.
    let mut comp_order: Vec<usize> = Vec::new();
    for (m, _) in &base_groups {
        let c = uf.find_name(m);
        if !comp_order.contains(&c) {
            comp_order.push(c);
        }
    }
    let stage_of = |model: &str, role: Role, gids: &[usize]| -> Stage {
        let gs = gids.iter().map(|&g| groups[g].as_slice());
        Stage {
            model: model.to_string(),
            role,
            batches: chunk_groups(requests, gs),
            load: false,
            evict: Vec::new(),
        }
    };
    for c in comp_order {
        let refiners_here: Vec<&(&str, Vec<usize>)> = refiner_groups
            .iter()
            .filter(|(m, _)| uf.find_name(m) == c)
            .collect();
        let mut bases: Vec<&(&str, Vec<usize>)> = base_groups
            .iter()
            .filter(|(m, _)| uf.find_name(m) == c)
            .collect();
        // A model that is also a refiner here runs its base stage last, next to its refiner stage.
        bases.sort_by_key(|(m, _)| refiners_here.iter().any(|(r, _)| r == m));
        let mut refiners = refiners_here;
        if let Some((last, _)) = bases.last() {
            refiners.sort_by_key(|(m, _)| m != last);
        }
        for (m, gids) in bases {
            plan.stages.push(stage_of(m, Role::Base, gids));
        }
        for (m, gids) in refiners {
            plan.stages.push(stage_of(m, Role::Refiner, gids));
        }
    }
    plan.model_loads = schedule_loads(&mut plan.stages, memory_budget, sizes);
    plan
}

/// Marks which stages load their model and what they evict; returns the number of loads.
fn schedule_loads(stages: &mut [Stage], budget: Option<u64>, sizes: &ModelSizes) -> usize {
    let size = |m: &str| sizes.get(m).unwrap_or(0);
    let models: Vec<String> = stages.iter().map(|s| s.model.clone()).collect();
    let mut resident: Vec<String> = Vec::new();
    let mut loads = 0;
    for (i, stage) in stages.iter_mut().enumerate() {
        stage.evict.clear();
        if resident.contains(&stage.model) {
            stage.load = false;
            continue;
        }
        stage.load = true;
        loads += 1;
        if let Some(budget) = budget {
            let need = size(&stage.model);
            while !resident.is_empty()
                && resident.iter().map(|m| size(m)).sum::<u64>() + need > budget
            {
                // Evict the model whose next use is furthest away (never used again = furthest).
                let next_use = |m: &String| {
                    models[i + 1..]
                        .iter()
                        .position(|x| x == m)
                        .unwrap_or(usize::MAX)
                };
                let Some(victim) = (0..resident.len())
                    .max_by_key(|&j| (next_use(&resident[j]), std::cmp::Reverse(j)))
                else {
                    break;
                };
                stage.evict.push(resident.remove(victim));
            }
        }
        resident.push(stage.model.clone());
    }
    loads
}

#[derive(Default)]
struct UnionFind<'a> {
    ids: HashMap<&'a str, usize>,
    parent: Vec<usize>,
}

impl<'a> UnionFind<'a> {
    fn add(&mut self, name: &'a str) -> usize {
        if let Some(&i) = self.ids.get(name) {
            return i;
        }
        let i = self.parent.len();
        self.parent.push(i);
        self.ids.insert(name, i);
        i
    }
    fn find(&mut self, mut i: usize) -> usize {
        while self.parent[i] != i {
            self.parent[i] = self.parent[self.parent[i]];
            i = self.parent[i];
        }
        i
    }
    fn union(&mut self, a: &'a str, b: &'a str) {
        let (a, b) = (self.add(a), self.add(b));
        let (ra, rb) = (self.find(a), self.find(b));
        if ra != rb {
            self.parent[rb.max(ra)] = rb.min(ra);
        }
    }
    fn find_name(&self, name: &str) -> usize {
        let Some(&(mut i)) = self.ids.get(name) else {
            return usize::MAX;
        };
        while self.parent[i] != i {
            i = self.parent[i];
        }
        i
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{GenParams, RefinerStage, SafetyPolicy};

    pub(crate) fn spec(budget: Option<u64>) -> Spec {
        Spec {
            file: "s.yaml".into(),
            output: "out".into(),
            models: BTreeMap::new(),
            memory_budget: budget,
            safety: SafetyPolicy::default(),
            jobs: vec![],
        }
    }

    fn req(
        model: &str,
        prompt: &str,
        seed: u64,
        refiner: Option<&str>,
        batch: u32,
    ) -> ImageRequest {
        ImageRequest {
            job: "j".into(),
            job_index: 0,
            prompt_index: 0,
            grid_index: 0,
            model: model.into(),
            prompt: prompt.into(),
            seed,
            params: GenParams {
                batch_size: batch,
                refiner: refiner.map(|m| RefinerStage {
                    model: m.into(),
                    switch_at: 0.8,
                }),
                ..GenParams::default()
            },
            grid_point: vec![],
        }
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{i:064x}")).collect()
    }

    #[test]
    fn shared_refiner_runs_after_all_bases() {
        let reqs = vec![
            req("xl", "a", 1, Some("ref"), 2),
            req("sd15", "b", 1, None, 2),
            req("xl2", "a", 1, Some("ref"), 2),
            req("xl", "a", 2, Some("ref"), 2),
            req("xl", "a", 3, Some("ref"), 2),
        ];
        let p = plan(&reqs, &keys(5), &[false; 5], &spec(None));
        let names: Vec<_> = p
            .stages
            .iter()
            .map(|s| (s.model.as_str(), s.role))
            .collect();
        assert_eq!(
            names,
            vec![
                ("xl", Role::Base),
                ("xl2", Role::Base),
                ("ref", Role::Refiner),
                ("sd15", Role::Base)
            ]
        );
        assert_eq!(p.model_loads, 4);
        assert_eq!(
            p.stages[0].batches,
            vec![Batch { items: vec![0, 3] }, Batch { items: vec![4] }]
        );
        assert_eq!(p.stages[2].images(), 4);
        assert_eq!((p.images, p.cached, p.to_make, p.duplicates), (5, 0, 5, 0));
    }

    #[test]
    fn cached_and_duplicates_drop_out() {
        let reqs: Vec<_> = (0..6).map(|s| req("m", "a", s, None, 4)).collect();
        let mut ks = keys(6);
        ks[5] = ks[1].clone();
        let cached = [true, false, false, true, false, false];
        let p = plan(&reqs, &ks, &cached, &spec(None));
        assert_eq!((p.images, p.cached, p.duplicates, p.to_make), (6, 2, 1, 3));
        assert_eq!(p.stages.len(), 1);
        assert_eq!(
            p.stages[0].batches,
            vec![Batch {
                items: vec![1, 2, 4]
            }]
        );
        let all = plan(&reqs, &ks, &[true; 6], &spec(None));
        assert!(all.stages.is_empty());
        assert_eq!(all.model_loads, 0);
    }

    #[test]
    fn budget_forces_reloads_only_when_needed() {
        // A model used as a base and as another job's refiner.
        let reqs = vec![
            req("a", "p", 1, Some("b"), 4),
            req("b", "q", 1, None, 4),
            req("c", "r", 1, None, 4),
        ];
        let mut sizes = ModelSizes::new();
        for m in ["a", "b", "c"] {
            sizes.insert(m, 10);
        }
        let p = plan_with(&reqs, &keys(3), &[false; 3], &spec(Some(15)), &sizes);
        let names: Vec<_> = p
            .stages
            .iter()
            .map(|s| (s.model.as_str(), s.role))
            .collect();
        assert_eq!(
            names,
            vec![
                ("a", Role::Base),
                ("b", Role::Base),
                ("b", Role::Refiner),
                ("c", Role::Base)
            ]
        );
        assert_eq!(p.model_loads, 3);
        assert_eq!(p.stages[1].evict, vec!["a".to_string()]);
        assert!(!p.stages[2].load);
        // Everything fits: no evictions.
        let p = plan_with(&reqs, &keys(3), &[false; 3], &spec(Some(30)), &sizes);
        assert!(p.stages.iter().all(|s| s.evict.is_empty()));
        assert_eq!(p.model_loads, 3);
    }

    #[test]
    fn eviction_keeps_the_model_needed_next() {
        // Stages: x base, y base, r refiner (x and y both feed r), budget fits two models.
        let reqs = vec![
            req("x", "p", 1, Some("r"), 1),
            req("y", "p", 1, Some("r"), 1),
        ];
        let sizes: ModelSizes = [
            ("x".to_string(), 10),
            ("y".to_string(), 10),
            ("r".to_string(), 10),
        ]
        .into_iter()
        .collect();
        let p = plan_with(&reqs, &keys(2), &[false; 2], &spec(Some(20)), &sizes);
        assert_eq!(p.model_loads, 3);
        assert_eq!(p.stages[2].evict.len(), 1);
    }

    #[test]
    fn weights_size_of_golden_model() {
        let dir =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/models/tiny-sd15");
        if dir.is_dir() {
            let unet = std::fs::metadata(dir.join("unet/diffusion_pytorch_model.safetensors"))
                .unwrap()
                .len();
            assert!(ModelSizes::weights_size(&dir) > unet);
        }
        assert_eq!(ModelSizes::weights_size(Path::new("/nonexistent/x")), 0);
    }
}

//! Properties of the planner, the shards and the store over many generated campaigns.

use sd_run::cache::{image_key, KeyContext, Store};
use sd_run::output::{ImageStatus, ManifestRecord, SafetyRecord};
use sd_run::plan::{
    assign_shards, plan, plan_indices, plan_shard, plan_with, ModelSizes, Plan, Role, Shard,
};
use sd_run::spec::{
    GenParams, ImageRequest, NoiseSource, RefinerStage, SafetyPolicy, SchedulerName, Spec,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

/// A small deterministic generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const MODELS: [&str; 5] = ["sd15", "sd21", "xl", "xl2", "refiner"];

struct Campaign {
    spec: Spec,
    requests: Vec<ImageRequest>,
    keys: Vec<String>,
    cached: Vec<bool>,
}

fn spec(budget: Option<u64>) -> Spec {
    Spec {
        file: "campaign.yaml".into(),
        output: "out".into(),
        models: BTreeMap::new(),
        memory_budget: budget,
        safety: SafetyPolicy::default(),
        jobs: vec![],
    }
}

fn campaign(rng: &mut Rng) -> Campaign {
    let prompts = ["a fox", "an owl", "a meadow", "a city at night"];
    let jobs = 1 + rng.below(5);
    let mut requests = Vec::new();
    for j in 0..jobs {
        let model = rng.pick(&MODELS).to_string();
        let refiner = if rng.chance(35) {
            Some(RefinerStage {
                model: rng.pick(&MODELS).to_string(),
                switch_at: *rng.pick(&[0.7, 0.8]),
            })
        } else {
            None
        };
        let batch_size = 1 + rng.below(4) as u32;
        let n_prompts = 1 + rng.below(3);
        let n_seeds = 1 + rng.below(6);
        let first_seed = rng.below(4) as u64;
        let grid_steps: Vec<u32> = if rng.chance(40) {
            vec![10, 20]
        } else {
            vec![10]
        };
        let scheduler = *rng.pick(&[
            SchedulerName::Ddim,
            SchedulerName::Euler,
            SchedulerName::EulerA,
        ]);
        let size = *rng.pick(&[(64u32, 64u32), (64, 128)]);
        let guidance = *rng.pick(&[5.0, 7.5]);
        let noise = if rng.chance(10) {
            NoiseSource::Device
        } else {
            NoiseSource::TorchCpu
        };
        for (pi, prompt) in prompts.iter().take(n_prompts).enumerate() {
            for (gi, &steps) in grid_steps.iter().enumerate() {
                for s in 0..n_seeds as u64 {
                    requests.push(ImageRequest {
                        job: format!("job{j}"),
                        job_index: j,
                        prompt_index: pi,
                        grid_index: gi,
                        model: model.clone(),
                        prompt: prompt.to_string(),
                        seed: first_seed + s,
                        params: GenParams {
                            steps,
                            guidance,
                            scheduler,
                            width: size.0,
                            height: size.1,
                            batch_size,
                            noise,
                            refiner: refiner.clone(),
                            ..GenParams::default()
                        },
                        grid_point: vec![("steps".into(), steps.to_string())],
                    });
                }
            }
        }
    }
    // The same images asked for again by another job (same keys: made once).
    if rng.chance(25) {
        let copies: Vec<ImageRequest> = requests
            .iter()
            .filter(|r| r.job_index == 0)
            .map(|r| ImageRequest {
                job: "copy".into(),
                job_index: jobs,
                ..r.clone()
            })
            .collect();
        requests.extend(copies);
    }
    // One context per model (its digest stands for its weights).
    let contexts: HashMap<&str, KeyContext> = MODELS
        .iter()
        .map(|m| {
            let ctx = KeyContext {
                model_digest: sd_run::cache::sha256_bytes(m.as_bytes()),
                refiner_digest: Some(sd_run::cache::sha256_bytes(b"any refiner")),
                ..KeyContext::default()
            };
            (*m, ctx)
        })
        .collect();
    let keys: Vec<String> = requests
        .iter()
        .map(|r| {
            let mut ctx = contexts[r.model.as_str()].clone();
            if let Some(rf) = &r.params.refiner {
                ctx.refiner_digest = Some(sd_run::cache::sha256_bytes(rf.model.as_bytes()));
            }
            image_key(r, &ctx)
        })
        .collect();
    let cached = (0..requests.len()).map(|_| rng.chance(20)).collect();
    let budget = if rng.chance(50) {
        Some(10 + rng.below(30) as u64)
    } else {
        None
    };
    Campaign {
        spec: spec(budget),
        requests,
        keys,
        cached,
    }
}

fn sizes() -> ModelSizes {
    MODELS
        .iter()
        .enumerate()
        .map(|(i, m)| (m.to_string(), 5 + 3 * i as u64))
        .collect()
}

/// The batching fields, rendered (f64s by bits).
fn batch_fields(r: &ImageRequest) -> String {
    let p = &r.params;
    format!(
        "{}|{}|{}|{}x{}|{}|{}|{:?}|{:?}|{:?}|{:?}|{:?}|{}|{}",
        r.model,
        r.prompt,
        p.negative_prompt,
        p.width,
        p.height,
        p.steps,
        p.guidance.to_bits(),
        p.scheduler,
        p.noise,
        p.refiner
            .as_ref()
            .map(|x| (&x.model, x.switch_at.to_bits())),
        p.sdxl,
        p.init_image,
        p.strength.to_bits(),
        p.batch_size
    )
}

/// Checks every structural property of a plan over the requests at `indices`.
fn check_plan(c: &Campaign, p: &Plan, indices: &[usize], budget: Option<u64>, sizes: &ModelSizes) {
    let reqs = &c.requests;
    // Which requests must be made: uncached, first of their key.
    let mut seen = HashSet::new();
    let mut expect_make = BTreeSet::new();
    let mut cached = 0;
    for &i in indices {
        if c.cached[i] {
            cached += 1;
        } else if seen.insert(c.keys[i].clone()) {
            expect_make.insert(i);
        }
    }
    assert_eq!(p.images, indices.len());
    assert_eq!(p.cached, cached);
    assert_eq!(p.to_make, expect_make.len());
    assert_eq!(p.images, p.cached + p.duplicates + p.to_make);

    let mut base_seen: HashMap<usize, usize> = HashMap::new();
    let mut refiner_seen: HashMap<usize, usize> = HashMap::new();
    let mut stage_ids = HashSet::new();
    for (si, st) in p.stages.iter().enumerate() {
        assert!(
            stage_ids.insert((st.model.clone(), st.role)),
            "one stage per (model, role)"
        );
        assert!(!st.batches.is_empty());
        for b in &st.batches {
            assert!(!b.items.is_empty());
            let first = &reqs[b.items[0]];
            assert!(
                b.items.len() <= first.params.batch_size.max(1) as usize,
                "batch too big"
            );
            let f = batch_fields(first);
            for &i in &b.items {
                assert_eq!(batch_fields(&reqs[i]), f, "batch mixes batching fields");
                match st.role {
                    Role::Base => {
                        assert_eq!(reqs[i].model, st.model);
                        assert!(
                            base_seen.insert(i, si).is_none(),
                            "image in two base batches"
                        );
                    }
                    Role::Refiner => {
                        assert_eq!(
                            reqs[i].params.refiner.as_ref().map(|r| r.model.as_str()),
                            Some(st.model.as_str())
                        );
                        assert!(
                            refiner_seen.insert(i, si).is_none(),
                            "image in two refiner batches"
                        );
                    }
                }
            }
        }
    }
    let made: BTreeSet<usize> = base_seen.keys().copied().collect();
    assert_eq!(
        made, expect_make,
        "every to-make image in exactly one base batch"
    );
    for &i in &expect_make {
        match &reqs[i].params.refiner {
            Some(_) => {
                let r = refiner_seen
                    .get(&i)
                    .expect("refined image in a refiner stage");
                assert!(*r > base_seen[&i], "refiner stage after its base stage");
            }
            None => assert!(!refiner_seen.contains_key(&i)),
        }
    }

    // Loads: replay the plan's residency instructions.
    let distinct: BTreeSet<&str> = p.stages.iter().map(|s| s.model.as_str()).collect();
    let mut resident: Vec<String> = Vec::new();
    let mut loads = 0;
    for st in &p.stages {
        for e in &st.evict {
            let pos = resident
                .iter()
                .position(|m| m == e)
                .expect("evicts a resident model");
            resident.remove(pos);
        }
        if st.load {
            assert!(!resident.contains(&st.model));
            loads += 1;
            resident.push(st.model.clone());
        } else {
            assert!(
                resident.contains(&st.model),
                "stage without load needs a resident model"
            );
        }
        if let Some(b) = budget {
            let used: u64 = resident.iter().map(|m| sizes.get(m).unwrap_or(0)).sum();
            assert!(
                used <= b || resident.len() == 1,
                "resident models exceed the budget"
            );
        }
    }
    assert_eq!(loads, p.model_loads);
    match budget {
        None => assert_eq!(
            p.model_loads,
            distinct.len(),
            "no budget: each model loads once"
        ),
        Some(_) => assert!(p.model_loads >= distinct.len()),
    }
}

#[test]
fn planner_properties_over_random_campaigns() {
    let mut rng = Rng(0x5d_2026);
    let sizes = sizes();
    let (mut evicting, mut refined, mut duplicated) = (0, 0, 0);
    for _ in 0..200 {
        let c = campaign(&mut rng);
        let all: Vec<usize> = (0..c.requests.len()).collect();
        let p = plan(&c.requests, &c.keys, &c.cached, &c.spec);
        check_plan(&c, &p, &all, None, &sizes);
        let pb = plan_with(&c.requests, &c.keys, &c.cached, &c.spec, &sizes);
        check_plan(&c, &pb, &all, c.spec.memory_budget, &sizes);
        evicting += pb.stages.iter().any(|s| !s.evict.is_empty()) as usize;
        refined += p.stages.iter().any(|s| s.role == Role::Refiner) as usize;
        duplicated += (p.duplicates > 0) as usize;
        // Deterministic.
        assert_eq!(plan(&c.requests, &c.keys, &c.cached, &c.spec), p);
        // JSON has the documented fields.
        let j = p.to_json(&c.requests, None);
        for f in [
            "images",
            "cached",
            "to_make",
            "model_loads",
            "batches",
            "stages",
            "estimated_seconds",
        ] {
            assert!(j.get(f).is_some(), "{f}");
        }
        assert_eq!(
            j["stages"].as_array().map(|s| s.len()),
            Some(p.stages.len())
        );
    }
    // The generator exercises budgets, refiners and duplicate keys.
    assert!(
        evicting > 20 && refined > 50 && duplicated > 20,
        "{evicting} {refined} {duplicated}"
    );
}

#[test]
fn shards_are_disjoint_complete_and_cache_independent() {
    let mut rng = Rng(77);
    let sizes = sizes();
    for _ in 0..200 {
        let c = campaign(&mut rng);
        let n_req = c.requests.len();
        for n in 1..=5usize {
            let assigned = assign_shards(&c.requests, n);
            assert_eq!(assigned.len(), n_req);
            assert!(assigned.iter().all(|&s| s < n));
            let mut covered = vec![0u32; n_req];
            let mut total_make = BTreeSet::new();
            for k in 0..n {
                let shard = Shard { index: k, count: n };
                let p = plan_shard(&c.requests, &c.keys, &c.cached, &c.spec, &sizes, shard);
                let idx: Vec<usize> = (0..n_req).filter(|&i| assigned[i] == k).collect();
                for &i in &idx {
                    covered[i] += 1;
                }
                check_plan(&c, &p, &idx, c.spec.memory_budget, &sizes);
                for st in p.stages.iter().filter(|s| s.role == Role::Base) {
                    for b in &st.batches {
                        total_make.extend(b.items.iter().map(|&i| c.keys[i].clone()));
                    }
                }
            }
            assert!(
                covered.iter().all(|&x| x == 1),
                "shards disjoint and complete"
            );
            let want: BTreeSet<String> = (0..n_req)
                .filter(|&i| !c.cached[i])
                .map(|i| c.keys[i].clone())
                .collect();
            assert_eq!(
                total_make, want,
                "shards together make every uncached image"
            );
        }
        // The split ignores the cache.
        assert_eq!(assign_shards(&c.requests, 3), assign_shards(&c.requests, 3));
        let whole = plan_indices(&c.requests, &c.keys, &c.cached, None, &sizes, 0..n_req);
        // Without model sizes the budget cannot force anything.
        assert_eq!(whole, plan(&c.requests, &c.keys, &c.cached, &c.spec));
    }
}

#[test]
fn shards_balance_a_single_model() {
    let mut rng = Rng(3);
    let mut c = campaign(&mut rng);
    for r in &mut c.requests {
        r.model = "sd15".into();
        r.params.refiner = None;
        r.params.batch_size = 1;
    }
    let n = 4;
    let a = assign_shards(&c.requests, n);
    let mut cost = vec![0u64; n];
    for (r, &s) in c.requests.iter().zip(&a) {
        cost[s] += r.params.steps as u64 * r.params.width as u64 * r.params.height as u64;
    }
    let max = *cost.iter().max().unwrap_or(&0);
    let biggest = c
        .requests
        .iter()
        .map(|r| r.params.steps as u64 * r.params.width as u64 * r.params.height as u64)
        .max()
        .unwrap_or(0);
    let mean = cost.iter().sum::<u64>() / n as u64;
    assert!(max <= mean + biggest, "unbalanced: {cost:?}");
}

fn record(key: &str, rel: String, sha: String) -> ManifestRecord {
    ManifestRecord {
        key: key.into(),
        path: Some(rel),
        file_sha256: Some(sha),
        job: "j".into(),
        model: "m".into(),
        prompt: "p".into(),
        negative_prompt: String::new(),
        seed: 0,
        steps: 1,
        guidance: 1.0,
        scheduler: "ddim".into(),
        width: 8,
        height: 8,
        noise: "torch-cpu".into(),
        refiner: None,
        safety: SafetyRecord::default(),
        status: ImageStatus::Ok,
        seconds: 0.0,
        model_hash: String::new(),
        grid: vec![],
        error: None,
    }
}

#[test]
fn store_feeds_the_planner_and_concurrent_appends_do_not_interleave() {
    let root = std::env::temp_dir().join(format!("sd-run-plan-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let mut rng = Rng(11);
    let c = campaign(&mut rng);
    let store = Store::open(&root).unwrap();
    // Make the first half of the images.
    let half = c.requests.len() / 2;
    for k in &c.keys[..half] {
        if store.lookup(k).is_some() {
            continue;
        }
        let lock = store.lock_key(k).unwrap().expect("free lock");
        let (rel, sha) = store
            .write_image(k, &Store::image_dir(k), k.as_bytes())
            .unwrap();
        store.append_manifest(&record(k, rel, sha)).unwrap();
        drop(lock);
    }
    let reopened = Store::open(&root).unwrap();
    let cached = reopened.cached_flags(&c.keys);
    let p = plan(&c.requests, &c.keys, &cached, &c.spec);
    let made: HashSet<&String> = c.keys[..half].iter().collect();
    for st in &p.stages {
        for b in &st.batches {
            for &i in &b.items {
                assert!(
                    !made.contains(&c.keys[i]),
                    "a stored image is planned again"
                );
            }
        }
    }

    // Eight writers append 200 records each to one manifest at once.
    std::thread::scope(|s| {
        for t in 0..8u32 {
            let root = &root;
            s.spawn(move || {
                let st = Store::open(root).unwrap();
                for i in 0..200u32 {
                    let key = format!("{:064x}", (t as u64) << 32 | i as u64);
                    st.append_manifest(&record(&key, "none.png".into(), "00".into()))
                        .unwrap();
                }
            });
        }
    });
    let text = std::fs::read_to_string(root.join("manifest.jsonl")).unwrap();
    let mut n = 0;
    for line in text.lines().filter(|l| !l.is_empty()) {
        serde_json::from_str::<ManifestRecord>(line).expect("whole lines only");
        n += 1;
    }
    assert_eq!(n, half_made(&c.keys[..half]) + 8 * 200);
    let st = Store::open(&root).unwrap();
    assert_eq!(st.bad_lines(), 0);
    assert_eq!(st.records().len(), half_made(&c.keys[..half]) + 8 * 200);
    std::fs::remove_dir_all(&root).unwrap();
}

fn half_made(keys: &[String]) -> usize {
    keys.iter().collect::<HashSet<_>>().len()
}

//! `--shard K/N`: splitting a campaign between N machines that never talk.
//!
//! The split depends only on the requests (never on what is cached), so every machine computes
//! the same one. Whole checkpoint groups (requests sharing a base model and refiner model) go to
//! shards largest first, each to the least-loaded shard, balancing estimated cost
//! (Σ steps × width × height). A group is split only when it does not fit (within 10%) beside
//! the others: then its batch-sized chunks fill the least-loaded shard up to the target, then the
//! next. Shards are disjoint and together hold every request.

use super::{batch_groups, chunk_groups, plan_indices, ModelSizes, Plan};
use crate::spec::{ImageRequest, Spec};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// One part of a sharded run: part `index` (0-based) of `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// Why a `--shard` value is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShardError {
    #[error("--shard '{0}': expected K/N with whole numbers, e.g. 0/4")]
    Format(String),
    #[error("--shard {index}/{count}: N must be at least 1")]
    ZeroCount { index: usize, count: usize },
    #[error("--shard {index}/{count}: K must satisfy 0 <= K < N (shards are numbered from 0)")]
    OutOfRange { index: usize, count: usize },
}

impl Shard {
    /// The whole campaign as one shard.
    pub const ALL: Shard = Shard { index: 0, count: 1 };

    /// Parses `K/N` with `0 <= K < N`.
    pub fn parse(s: &str) -> Result<Self, ShardError> {
        let bad = || ShardError::Format(s.to_string());
        let (k, n) = s.trim().split_once('/').ok_or_else(bad)?;
        let index: usize = k.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(ShardError::ZeroCount { index, count });
        }
        if index >= count {
            return Err(ShardError::OutOfRange { index, count });
        }
        Ok(Self { index, count })
    }
}

impl FromStr for Shard {
    type Err = ShardError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for Shard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

fn cost(r: &ImageRequest) -> u128 {
    let p = &r.params;
    (p.steps.max(1) as u128) * (p.width.max(1) as u128) * (p.height.max(1) as u128)
}

/// The shard (0..count) of every request; `count` 0 is treated as 1.
pub fn assign_shards(requests: &[ImageRequest], count: usize) -> Vec<usize> {
    let count = count.max(1);
    let mut out = vec![0usize; requests.len()];
    if count == 1 {
        return out;
    }
    // Checkpoint groups in first-appearance order.
    let mut ids: HashMap<(&str, Option<&str>), usize> = HashMap::new();
    let mut groups: Vec<Vec<usize>> = Vec::new();
    for (i, r) in requests.iter().enumerate() {
        let k = (
            r.model.as_str(),
            r.params.refiner.as_ref().map(|x| x.model.as_str()),
        );
        let id = *ids.entry(k).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[id].push(i);
    }
    let costs: Vec<u128> = groups
        .iter()
        .map(|g| g.iter().map(|&i| cost(&requests[i])).sum())
        .collect();
    let total: u128 = costs.iter().sum();
    let target = total.div_ceil(count as u128);
    let slack = target + target / 10;
    let mut order: Vec<usize> = (0..groups.len()).collect();
    order.sort_by(|&a, &b| costs[b].cmp(&costs[a]).then(a.cmp(&b)));
    let mut load = vec![0u128; count];
    let least = |load: &[u128]| (0..load.len()).min_by_key(|&s| (load[s], s)).unwrap_or(0);
    for g in order {
        let s = least(&load);
        if load[s] + costs[g] <= slack {
            for &i in &groups[g] {
                out[i] = s;
            }
            load[s] += costs[g];
            continue;
        }
        // Split by batch-sized chunks: fill the least-loaded shard to the target, then the next.
        let bg = batch_groups(requests, groups[g].iter().copied());
        let batches = chunk_groups(requests, bg.iter().map(Vec::as_slice));
        let mut s = s;
        for b in batches {
            let c: u128 = b.items.iter().map(|&i| cost(&requests[i])).sum();
            if load[s] + c > target {
                s = least(&load);
            }
            for &i in &b.items {
                out[i] = s;
            }
            load[s] += c;
        }
    }
    out
}

/// Indices of the requests in `shard`, in request order.
pub fn shard_indices(requests: &[ImageRequest], shard: Shard) -> Vec<usize> {
    assign_shards(requests, shard.count)
        .into_iter()
        .enumerate()
        .filter(|&(_, s)| s == shard.index)
        .map(|(i, _)| i)
        .collect()
}

/// Plans one shard's requests (batch items index `requests`), under the spec's memory budget.
pub fn plan_shard(
    requests: &[ImageRequest],
    keys: &[String],
    cached: &[bool],
    spec: &Spec,
    sizes: &ModelSizes,
    shard: Shard,
) -> Plan {
    plan_indices(
        requests,
        keys,
        cached,
        spec.memory_budget,
        sizes,
        shard_indices(requests, shard),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::GenParams;

    #[test]
    fn parse_shards() {
        assert_eq!(Shard::parse("0/1").unwrap(), Shard::ALL);
        assert_eq!(
            "2/5".parse::<Shard>().unwrap(),
            Shard { index: 2, count: 5 }
        );
        assert_eq!(Shard { index: 2, count: 5 }.to_string(), "2/5");
        assert!(matches!(
            Shard::parse("5/5"),
            Err(ShardError::OutOfRange { .. })
        ));
        assert!(matches!(
            Shard::parse("0/0"),
            Err(ShardError::ZeroCount { .. })
        ));
        for bad in ["", "1", "a/b", "-1/3", "1/2/3", "1/"] {
            let e = Shard::parse(bad).unwrap_err();
            assert!(e.to_string().contains("--shard"), "{e}");
        }
        assert!(Shard::parse(" 1 / 3 ").is_ok());
    }

    fn req(model: &str, seed: u64) -> ImageRequest {
        ImageRequest {
            job: "j".into(),
            job_index: 0,
            prompt_index: 0,
            grid_index: 0,
            model: model.into(),
            prompt: "p".into(),
            seed,
            params: GenParams {
                batch_size: 2,
                ..GenParams::default()
            },
            grid_point: vec![],
        }
    }

    #[test]
    fn whole_groups_when_balanced_split_when_needed() {
        let mut reqs: Vec<_> = (0..8).map(|s| req("a", s)).collect();
        reqs.extend((0..8).map(|s| req("b", s)));
        let a = assign_shards(&reqs, 2);
        assert!(a[..8].iter().all(|&s| s == a[0]));
        assert!(a[8..].iter().all(|&s| s == a[8]));
        assert_ne!(a[0], a[8]);
        // One model only: split in batch-sized chunks, balanced.
        let one: Vec<_> = (0..8).map(|s| req("a", s)).collect();
        let a = assign_shards(&one, 2);
        assert_eq!(a, vec![0, 0, 0, 0, 1, 1, 1, 1]);
        let a = assign_shards(&one, 3);
        for s in 0..3 {
            let n = a.iter().filter(|&&x| x == s).count();
            assert!((2..=4).contains(&n), "{a:?}");
        }
    }
}

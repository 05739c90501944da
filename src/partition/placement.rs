//! Placement: which accelerators an instance's functions go to.
//!
//! A request lists functions (queues + operations); each function goes to one
//! accelerator, and two functions may share one if its pool allows. Every
//! constraint is checked per accelerator first (allow-list, operations, free
//! queue pairs, a free PASID slot, distance to the VM's NUMA node), then the
//! combinations of the survivors are searched exhaustively with pruning
//! (requests have at most [`MAX_FUNCTIONS`] functions and hosts tens of
//! accelerators).
//!
//! **Best** is the lexicographic minimum of
//! 1. the *total distance*: the sum of the distances between every pair of
//!    distinct accelerators used, plus each one's distance to the VM's NUMA
//!    node when the request names one;
//! 2. the *maximum* of those same distances;
//! 3. the most free queue pairs left on the busiest accelerator used (so
//!    equally close placements spread over the pools);
//! 4. the most free PASID slots left on the busiest accelerator used;
//! 5. the first in input order (deterministic).
//!
//! Sharing one accelerator between two functions costs distance 0 between
//! them, so a single accelerator that runs everything wins when it has room.

use std::cmp::Reverse;
use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use super::error::{PlacementError, Reason, Rejection, RequestError};
use super::graph::{KNOWN_OPS, Topology};
use super::pasid::PASID_MAX;

/// Most functions one instance type may combine (the search is
/// accelerators^functions before pruning).
pub const MAX_FUNCTIONS: usize = 8;

/// One function of an instance type: `queues` queue pairs on one accelerator
/// that runs every operation in `ops` (bit n = opcode n).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionRequest {
    pub queues: u32,
    pub ops: u32,
}

/// What an instance type asks of placement.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRequest {
    pub functions: Vec<FunctionRequest>,
    /// Largest distance allowed between every pair of the chosen
    /// accelerators, and from each to `numa_node` when given.
    pub max_distance: Option<u64>,
    /// Only these accelerators may be used (`None`: any).
    pub accelerators: Option<Vec<String>>,
    /// The VM's NUMA node.
    pub numa_node: Option<u32>,
}

/// A request checked against a topology: names resolved to indexes.
#[derive(Clone, Debug)]
pub(crate) struct Checked {
    pub functions: Vec<FunctionRequest>,
    pub max: Option<u64>,
    /// Per accelerator index.
    pub allowed: Vec<bool>,
    pub numa: Option<u32>,
}

impl PlacementRequest {
    pub(crate) fn check(&self, topo: &Topology) -> Result<Checked, RequestError> {
        match self.functions.len() {
            0 => return Err(RequestError::NoFunctions),
            n if n > MAX_FUNCTIONS => return Err(RequestError::TooManyFunctions(n)),
            _ => {}
        }
        for (i, func) in self.functions.iter().enumerate() {
            if func.queues == 0 {
                return Err(RequestError::NoQueues(i));
            }
            if func.ops == 0 {
                return Err(RequestError::NoOperations(i));
            }
            if func.ops & !KNOWN_OPS != 0 {
                return Err(RequestError::UnknownOperations {
                    function: i,
                    bits: func.ops & !KNOWN_OPS,
                });
            }
        }
        let n = topo.accelerators().len();
        let allowed = match &self.accelerators {
            None => vec![true; n],
            Some(list) if list.is_empty() => return Err(RequestError::EmptyAllowList),
            Some(list) => {
                let mut allowed = vec![false; n];
                for name in list {
                    let i = topo
                        .accelerator_index(name)
                        .ok_or_else(|| RequestError::UnknownAccelerator(name.clone()))?;
                    allowed[i] = true;
                }
                allowed
            }
        };
        if let Some(node) = self.numa_node
            && !topo.has_numa(node)
        {
            return Err(RequestError::UnknownNumaNode(node));
        }
        Ok(Checked {
            functions: self.functions.clone(),
            max: self.max_distance,
            allowed,
            numa: self.numa_node,
        })
    }
}

/// What is free right now, per accelerator index.
#[derive(Clone, Debug)]
pub(crate) struct Capacity {
    pub free_qp: Vec<u32>,
    pub free_slots: Vec<u32>,
}

impl Capacity {
    /// Everything free: what a host with no instance offers.
    pub fn empty_host(topo: &Topology) -> Capacity {
        Capacity {
            free_qp: topo.accelerators().iter().map(|a| a.queue_pairs).collect(),
            free_slots: topo.accelerators().iter().map(|a| a.pasids).collect(),
        }
    }

    /// Takes `choice` out of the capacity (for counting successive placements).
    pub fn consume(&mut self, req: &Checked, choice: &Choice) {
        for (func, &a) in req.functions.iter().zip(&choice.accel_of) {
            self.free_qp[a] -= func.queues;
        }
        for &a in &choice.distinct {
            self.free_slots[a] -= 1;
        }
    }
}

/// The chosen accelerator (index) of each function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Choice {
    pub accel_of: Vec<usize>,
    /// The accelerators used, in first-use order.
    pub distinct: Vec<usize>,
    pub total: u64,
    pub max: u64,
    /// Search steps taken (see [`SEARCH_BUDGET`]).
    pub steps: u64,
}

/// Lexicographic order = "better first" (see the module doc).
type Score = (u64, u64, Reverse<u32>, Reverse<u32>);

fn within(d: Option<u64>, max: Option<u64>) -> bool {
    match (d, max) {
        (_, None) => true,
        (Some(d), Some(max)) => d <= max,
        (None, Some(_)) => false,
    }
}

/// Why accelerator `a` cannot take function `i` on its own.
fn single_reasons(
    topo: &Topology,
    cap: &Capacity,
    req: &Checked,
    i: usize,
    a: usize,
) -> Vec<Reason> {
    let accel = &topo.accelerators()[a];
    let func = &req.functions[i];
    let mut reasons = Vec::new();
    if !req.allowed[a] {
        // The operator excluded it: anything else about it is noise.
        return vec![Reason::NotAllowed];
    }
    if func.ops & !accel.ops != 0 {
        reasons.push(Reason::MissingOps {
            missing: func.ops & !accel.ops,
        });
    }
    if cap.free_qp[a] < func.queues {
        reasons.push(Reason::QueuePairs {
            free: cap.free_qp[a],
            total: accel.queue_pairs,
            need: func.queues,
        });
    }
    if cap.free_slots[a] == 0 {
        reasons.push(Reason::PasidsExhausted {
            capacity: accel.pasids,
        });
    }
    if let (Some(node), Some(max)) = (req.numa, req.max) {
        let distance = topo.numa_distance(a, node);
        if !within(distance, Some(max)) {
            reasons.push(Reason::NumaDistance {
                node,
                distance,
                max,
            });
        }
    }
    reasons
}

/// Whether a reason depends on the function (and so is worth naming it).
fn per_function(reason: &Reason) -> bool {
    matches!(
        reason,
        Reason::MissingOps { .. } | Reason::QueuePairs { .. }
    )
}

struct Dfs<'a> {
    topo: &'a Topology,
    cap: &'a Capacity,
    req: &'a Checked,
    cands: Vec<Vec<usize>>,
    must: Option<usize>,
    assign: Vec<usize>,
    distinct: Vec<usize>,
    qp_used: Vec<u32>,
    best: Option<(Score, Choice)>,
    /// Candidates tried, against [`SEARCH_BUDGET`].
    visited: u64,
}

impl Dfs<'_> {
    fn go(&mut self, i: usize, total: u64, max: u64) {
        if i == self.req.functions.len() {
            return self.leaf(total, max);
        }
        for k in 0..self.cands[i].len() {
            if self.visited >= SEARCH_BUDGET {
                return;
            }
            self.visited += 1;
            let a = self.cands[i][k];
            // Identical consecutive functions are interchangeable: try each
            // multiset of accelerators once (non-decreasing indexes).
            if i > 0 && self.req.functions[i] == self.req.functions[i - 1] && a < self.assign[i - 1]
            {
                continue;
            }
            let need = self.req.functions[i].queues;
            if self.qp_used[a].saturating_add(need) > self.cap.free_qp[a] {
                continue;
            }
            // queues >= 1, so an accelerator is in use iff it has queues here.
            let new = self.qp_used[a] == 0;
            let (mut t, mut m) = (total, max);
            if new {
                let mut fits = true;
                for &b in &self.distinct {
                    let d = self.topo.accel_distance(a, b);
                    if !within(d, self.req.max) {
                        fits = false;
                        break;
                    }
                    // Not connected and no maximum: allowed, but last choice.
                    let d = d.unwrap_or(u64::MAX);
                    t = t.saturating_add(d);
                    m = m.max(d);
                }
                if !fits {
                    continue;
                }
                if let Some(node) = self.req.numa {
                    let d = self.topo.numa_distance(a, node).unwrap_or(u64::MAX);
                    t = t.saturating_add(d);
                    m = m.max(d);
                }
            }
            // Total and maximum only grow as functions are added: a partial
            // (total, max) already worse than the best complete one cannot win.
            if self.best.as_ref().is_some_and(|(s, _)| (t, m) > (s.0, s.1)) {
                continue;
            }
            self.assign.push(a);
            if new {
                self.distinct.push(a);
            }
            self.qp_used[a] += need;
            self.go(i + 1, t, m);
            self.qp_used[a] -= need;
            if new {
                self.distinct.pop();
            }
            self.assign.pop();
        }
    }

    fn leaf(&mut self, total: u64, max: u64) {
        if self.must.is_some_and(|m| !self.distinct.contains(&m)) {
            return;
        }
        let qp_left = self
            .distinct
            .iter()
            .map(|&a| self.cap.free_qp[a] - self.qp_used[a]);
        let slots_left = self.distinct.iter().map(|&a| self.cap.free_slots[a] - 1);
        let score: Score = (
            total,
            max,
            Reverse(qp_left.min().unwrap_or(0)),
            Reverse(slots_left.min().unwrap_or(0)),
        );
        if self.best.as_ref().is_none_or(|(s, _)| score < *s) {
            let choice = Choice {
                accel_of: self.assign.clone(),
                distinct: self.distinct.clone(),
                total,
                max,
                steps: 0,
            };
            self.best = Some((score, choice));
        }
    }
}

/// Candidates one placement may try (one step = one accelerator considered
/// for one function). Pruning keeps ordinary requests far below it (tens to
/// hundreds of steps); it bounds the time spent under the partitioner's lock
/// when many accelerators tie for many functions. Past it, the best
/// placement found so far is taken.
pub const SEARCH_BUDGET: u64 = 1_000_000;

/// The best placement of `req` in `cap`, or per accelerator why not.
/// `must`: only placements that use this accelerator (for per-accelerator
/// `available_instances`).
pub(crate) fn search(
    topo: &Topology,
    cap: &Capacity,
    req: &Checked,
    must: Option<usize>,
) -> Result<Choice, PlacementError> {
    let n = topo.accelerators().len();
    let nf = req.functions.len();
    let name = |a: usize| topo.accelerators()[a].name.clone();
    let mut cands = vec![Vec::new(); nf];
    let mut singles = Vec::new();
    for (i, cand) in cands.iter_mut().enumerate() {
        let mut per = Vec::new();
        for a in 0..n {
            let reasons = single_reasons(topo, cap, req, i, a);
            if reasons.is_empty() {
                cand.push(a);
            }
            per.push(reasons);
        }
        singles.push(per);
    }
    // The single-accelerator reasons of accelerators `accels` for functions
    // `funcs` that pass `keep`, each once, in accelerator order.
    let reasons_of = |accels: &mut dyn Iterator<Item = usize>,
                      funcs: &[usize],
                      keep: &dyn Fn(&Reason) -> bool| {
        let mut out: Vec<Rejection> = Vec::new();
        for a in accels {
            for &i in funcs {
                for reason in singles[i][a].iter().filter(|r| keep(r)) {
                    let r = Rejection {
                        accelerator: name(a),
                        function: (nf > 1 && per_function(reason)).then_some(i),
                        reason: reason.clone(),
                    };
                    if !out.contains(&r) {
                        out.push(r);
                    }
                }
            }
        }
        out
    };
    let all_functions: Vec<usize> = (0..nf).collect();
    let empty: Vec<usize> = (0..nf).filter(|&i| cands[i].is_empty()).collect();
    if !empty.is_empty() {
        // Some function fits nowhere: say why, per accelerator, for those
        // functions only (the others are not the problem).
        let rejections = reasons_of(&mut (0..n), &empty, &|_| true);
        return Err(PlacementError::NoFit { rejections });
    }
    // Accelerators that are a candidate for no function at all never appear
    // in a pair or pool refusal: say what ruled them out (other than missing
    // operations, which the type's other accelerators explain), so every
    // accelerator that could have served is named.
    let excluded = |later: Vec<Rejection>| {
        let mut unused = (0..n).filter(|a| cands.iter().all(|c| !c.contains(a)));
        let mut out = reasons_of(&mut unused, &all_functions, &|r| {
            !matches!(r, Reason::MissingOps { .. })
        });
        let later: Vec<Rejection> = later.into_iter().filter(|r| !out.contains(r)).collect();
        out.extend(later);
        out
    };
    let pruned =
        consistent(topo, cap, req, &cands).map_err(|rejections| PlacementError::NoFit {
            rejections: excluded(rejections),
        })?;
    let mut dfs = Dfs {
        topo,
        cap,
        req,
        cands: pruned,
        must,
        assign: Vec::new(),
        distinct: Vec::new(),
        qp_used: vec![0; n],
        best: None,
        visited: 0,
    };
    dfs.go(0, 0, 0);
    if let Some((_, mut choice)) = dfs.best {
        choice.steps = dfs.visited;
        if dfs.visited >= SEARCH_BUDGET {
            tracing::warn!(
                visited = dfs.visited,
                "placement: search budget spent; taking the best found"
            );
        }
        return Ok(choice);
    }
    if dfs.visited >= SEARCH_BUDGET {
        return Err(PlacementError::SearchBudget {
            visited: dfs.visited,
        });
    }
    Err(PlacementError::NoFit {
        rejections: excluded(combination_rejections(topo, cap, req, &cands)),
    })
}

/// Drops every candidate that no candidate of some other function can go
/// with (too far, or the same accelerator without room for both), until
/// nothing changes. Cheap (functions² × accelerators² per round), and it
/// spares the search whole subtrees, e.g. a function whose only
/// accelerators are far from all the others'. When a function is left with
/// none, the error names, for each of its last candidates, every partner
/// that failed it.
fn consistent(
    topo: &Topology,
    cap: &Capacity,
    req: &Checked,
    cands: &[Vec<usize>],
) -> Result<Vec<Vec<usize>>, Vec<Rejection>> {
    let f = &req.functions;
    let goes_with = |i: usize, a: usize, j: usize, b: usize| {
        if a == b {
            cap.free_qp[a] >= f[i].queues.saturating_add(f[j].queues)
        } else {
            within(topo.accel_distance(a, b), req.max)
        }
    };
    let mut cands = cands.to_vec();
    loop {
        let mut changed = false;
        for i in 0..cands.len() {
            // The first other function that leaves `a` with no partner.
            let lonely = |a: usize| {
                (0..cands.len())
                    .find(|&j| j != i && !cands[j].iter().any(|&b| goes_with(i, a, j, b)))
            };
            let keep: Vec<usize> = cands[i]
                .iter()
                .copied()
                .filter(|&a| lonely(a).is_none())
                .collect();
            if keep.is_empty() {
                let mut pairs = BTreeSet::new();
                let mut shared = Vec::new();
                for &a in &cands[i] {
                    let Some(j) = lonely(a) else { continue };
                    for &b in &cands[j] {
                        if a == b {
                            shared.push((a, i.min(j), i.max(j)));
                        } else {
                            pairs.insert((a.min(b), a.max(b)));
                        }
                    }
                }
                let mut out = pair_rejections(topo, req, pairs);
                for (a, i, j) in shared {
                    out.push(shared_rejection(topo, cap, req, a, vec![i, j]));
                }
                return Err(out);
            }
            changed |= keep.len() != cands[i].len();
            cands[i] = keep;
        }
        if !changed {
            return Ok(cands);
        }
    }
}

/// "a–b distance d > max m" for each pair (in input order).
fn pair_rejections(
    topo: &Topology,
    req: &Checked,
    pairs: BTreeSet<(usize, usize)>,
) -> Vec<Rejection> {
    let accels = topo.accelerators();
    pairs
        .into_iter()
        .map(|(a, b)| Rejection {
            accelerator: accels[a].name.clone(),
            function: None,
            reason: Reason::PairDistance {
                other: accels[b].name.clone(),
                distance: topo.accel_distance(a, b),
                // Only a maximum makes a pair fail on distance.
                max: req.max.unwrap_or(0),
            },
        })
        .collect()
}

fn shared_rejection(
    topo: &Topology,
    cap: &Capacity,
    req: &Checked,
    a: usize,
    functions: Vec<usize>,
) -> Rejection {
    let accel = &topo.accelerators()[a];
    Rejection {
        accelerator: accel.name.clone(),
        function: None,
        reason: Reason::SharedQueuePairs {
            need: functions
                .iter()
                .fold(0u32, |sum, &i| sum.saturating_add(req.functions[i].queues)),
            functions,
            free: cap.free_qp[a],
            total: accel.queue_pairs,
        },
    }
}

/// Every candidate passes alone but no combination does: name the pairs too
/// far apart and the shared accelerators too small for their functions.
fn combination_rejections(
    topo: &Topology,
    cap: &Capacity,
    req: &Checked,
    cands: &[Vec<usize>],
) -> Vec<Rejection> {
    let mut pairs = BTreeSet::new();
    for i in 0..cands.len() {
        for j in i + 1..cands.len() {
            for &a in &cands[i] {
                for &b in &cands[j] {
                    if a != b && !within(topo.accel_distance(a, b), req.max) {
                        pairs.insert((a.min(b), a.max(b)));
                    }
                }
            }
        }
    }
    let mut out = pair_rejections(topo, req, pairs);
    for a in 0..topo.accelerators().len() {
        let functions: Vec<usize> = (0..cands.len())
            .filter(|&i| cands[i].contains(&a))
            .collect();
        let need = functions
            .iter()
            .fold(0u32, |sum, &i| sum.saturating_add(req.functions[i].queues));
        if functions.len() > 1 && need > cap.free_qp[a] {
            out.push(shared_rejection(topo, cap, req, a, functions));
        }
    }
    out
}

/// (total, max) distance of a set of accelerators, as "best" counts them:
/// every pair, plus each to `numa` if given.
pub(crate) fn span_distances(topo: &Topology, distinct: &[usize], numa: Option<u32>) -> (u64, u64) {
    let (mut total, mut max) = (0u64, 0u64);
    for (k, &a) in distinct.iter().enumerate() {
        let to_numa = numa.map(|n| topo.numa_distance(a, n));
        for d in distinct[..k]
            .iter()
            .map(|&b| topo.accel_distance(a, b))
            .chain(to_numa)
        {
            let d = d.unwrap_or(u64::MAX);
            total = total.saturating_add(d);
            max = max.max(d);
        }
    }
    (total, max)
}

/// How many instances successive placements would fit into `cap`
/// (each taking one host PASID of `host_free`).
pub(crate) fn count_successive(
    topo: &Topology,
    mut cap: Capacity,
    req: &Checked,
    mut host_free: u32,
    must: Option<usize>,
) -> u32 {
    let mut count = 0;
    // Each round takes at least one queue pair, so this ends.
    while host_free > 0 {
        let Ok(choice) = search(topo, &cap, req, must) else {
            break;
        };
        cap.consume(req, &choice);
        host_free -= 1;
        count += 1;
    }
    count
}

impl Topology {
    /// Whether `req` fits on this host with nothing else placed: a type
    /// that fails here can never be hosted (the config layer refuses it).
    pub fn check_hostable(&self, req: &PlacementRequest) -> Result<(), PlacementError> {
        let checked = req.check(self)?;
        search(self, &Capacity::empty_host(self), &checked, None).map(drop)
    }
}

/// One instance a dry run placed: each function's accelerator, and the
/// distances "best" counts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlannedInstance {
    pub accelerators: Vec<String>,
    pub total_distance: u64,
    pub max_distance: u64,
}

/// What a dry run of successive placements found (`wdvirt plan`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// How many instances fit now, in all (successive placements).
    pub fit: u32,
    /// The first `count` of them (or fewer, if fewer fit).
    pub placed: Vec<PlannedInstance>,
    /// Why the next instance does not fit, when fewer than `count` fit.
    pub refusal: Option<String>,
    /// The same, per accelerator (placement's reasons).
    pub rejections: Vec<Rejection>,
}

impl Topology {
    /// A dry run: places `req` up to `count` times on what is free (`free`:
    /// per accelerator in [`Topology::accelerators`] order, free queue pairs
    /// and free PASID slots; accelerators past its end are taken as empty),
    /// without taking anything, and says how many fit in all and why the
    /// next does not. One run of successive placements: the first `count`
    /// are listed, the rest only counted.
    pub fn plan(
        &self,
        req: &PlacementRequest,
        free: &[(u32, u32)],
        count: u32,
    ) -> Result<Plan, RequestError> {
        let checked = req.check(self)?;
        let mut cap = Capacity::empty_host(self);
        for (i, &(qp, slots)) in free.iter().enumerate().take(cap.free_qp.len()) {
            cap.free_qp[i] = qp.min(cap.free_qp[i]);
            cap.free_slots[i] = slots.min(cap.free_slots[i]);
        }
        let mut fit = 0u32;
        let mut placed = Vec::new();
        let mut refusal = None;
        let mut rejections = Vec::new();
        // Each round takes at least one queue pair, so this ends; at most one
        // instance per host PASID, as count_successive.
        while fit < PASID_MAX {
            match search(self, &cap, &checked, None) {
                Ok(choice) => {
                    cap.consume(&checked, &choice);
                    fit += 1;
                    if placed.len() < count as usize {
                        placed.push(PlannedInstance {
                            accelerators: choice
                                .accel_of
                                .iter()
                                .map(|&a| self.accelerators()[a].name.clone())
                                .collect(),
                            total_distance: choice.total,
                            max_distance: choice.max,
                        });
                    }
                }
                Err(e) => {
                    if placed.len() < count as usize {
                        if let PlacementError::NoFit { rejections: r } = &e {
                            rejections = r.clone();
                        }
                        refusal = Some(e.to_string());
                    }
                    break;
                }
            }
        }
        Ok(Plan {
            fit,
            placed,
            refusal,
            rejections,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::graph::{AcceleratorSpec, LinkSpec, Node, NumaSpec, TopologySpec};
    use super::*;
    use crate::partition::error::render;
    use wdvirt_abi::Opcode;

    fn accel(name: &str, ops: u32, queue_pairs: u32) -> AcceleratorSpec {
        AcceleratorSpec {
            name: name.into(),
            backend: "soft".into(),
            engines: 1,
            queue_pairs,
            ops,
            pasids: 4,
        }
    }

    fn link(a: &str, b: Node, distance: i64) -> LinkSpec {
        LinkSpec {
            a: Node::Accelerator(a.into()),
            b,
            distance,
        }
    }

    const ZIP: u32 = Opcode::DeflateCompress.bit() | Opcode::DeflateDecompress.bit();
    const SHA: u32 = Opcode::Sha256.bit();

    /// x: compression and hashing, far; y, z: one kind each, close.
    fn topo() -> Topology {
        Topology::new(TopologySpec {
            numa_nodes: vec![NumaSpec {
                id: 0,
                cpus: vec![0],
            }],
            accelerators: vec![
                accel("x", ZIP | SHA, 4),
                accel("y", ZIP, 8),
                accel("z", SHA, 8),
            ],
            links: vec![
                link("x", Node::Numa(0), 50),
                link("y", Node::Numa(0), 10),
                link("z", Node::Numa(0), 10),
            ],
        })
        .unwrap()
    }

    fn req(functions: &[(u32, u32)]) -> PlacementRequest {
        PlacementRequest {
            functions: functions
                .iter()
                .map(|&(queues, ops)| FunctionRequest { queues, ops })
                .collect(),
            ..PlacementRequest::default()
        }
    }

    fn place(t: &Topology, r: &PlacementRequest) -> Result<Choice, Vec<Rejection>> {
        search(t, &Capacity::empty_host(t), &r.check(t).unwrap(), None).map_err(|e| match e {
            PlacementError::NoFit { rejections } => rejections,
            other => panic!("{other}"),
        })
    }

    #[test]
    fn one_accelerator_for_both_functions_wins_when_it_has_room() {
        let t = topo();
        let c = place(&t, &req(&[(2, ZIP), (2, SHA)])).unwrap();
        assert_eq!(c.accel_of, vec![0, 0]);
        assert_eq!((c.total, c.max), (0, 0));
        // x has 4 queue pairs: 3+2 do not fit, so y and z (20 apart) do.
        let c = place(&t, &req(&[(3, ZIP), (2, SHA)])).unwrap();
        assert_eq!(c.accel_of, vec![1, 2]);
        assert_eq!((c.total, c.max), (20, 20));
    }

    #[test]
    fn numa_distance_counts_in_the_total() {
        let t = topo();
        let mut r = req(&[(1, ZIP), (1, SHA)]);
        r.numa_node = Some(0);
        // x alone: 50 to node0; y+z: 20 + 10 + 10 = 40.
        let c = place(&t, &r).unwrap();
        assert_eq!(c.accel_of, vec![1, 2]);
        assert_eq!((c.total, c.max), (40, 20));
    }

    #[test]
    fn ties_go_to_the_pool_with_more_room() {
        let t = Topology::new(TopologySpec {
            accelerators: vec![accel("small", ZIP, 2), accel("big", ZIP, 8)],
            ..TopologySpec::default()
        })
        .unwrap();
        let c = place(&t, &req(&[(1, ZIP)])).unwrap();
        assert_eq!(c.accel_of, vec![1]);
    }

    #[test]
    fn bad_requests_are_refused_by_name() {
        let t = topo();
        let check = |r: PlacementRequest| r.check(&t).unwrap_err();
        assert_eq!(check(req(&[])), RequestError::NoFunctions);
        assert_eq!(
            check(req(&[(1, SHA); 9])),
            RequestError::TooManyFunctions(9)
        );
        assert_eq!(check(req(&[(1, SHA), (0, SHA)])), RequestError::NoQueues(1));
        assert_eq!(check(req(&[(1, 0)])), RequestError::NoOperations(0));
        assert_eq!(
            check(req(&[(1, 1 << 20)])),
            RequestError::UnknownOperations {
                function: 0,
                bits: 1 << 20
            }
        );
        let mut r = req(&[(1, SHA)]);
        r.accelerators = Some(vec!["w".into()]);
        assert_eq!(
            check(r.clone()),
            RequestError::UnknownAccelerator("w".into())
        );
        r.accelerators = Some(vec![]);
        assert_eq!(check(r.clone()), RequestError::EmptyAllowList);
        r.accelerators = None;
        r.numa_node = Some(3);
        assert_eq!(check(r), RequestError::UnknownNumaNode(3));
    }

    #[test]
    fn a_function_that_fits_nowhere_is_explained_per_accelerator() {
        let t = topo();
        let mut r = req(&[(1, ZIP), (6, SHA)]);
        r.accelerators = Some(vec!["x".into(), "y".into()]);
        let e = place(&t, &r).unwrap_err();
        let text = render(&e);
        assert_eq!(
            text,
            "x: 4 of 4 queue pairs free, need 6 (function 1); y: no sha256 (function 1); \
             z: not in the accelerator list"
        );
    }

    #[test]
    fn combination_failures_name_the_pair_and_the_shared_pool() {
        let t = topo();
        let mut r = req(&[(3, ZIP), (2, SHA)]);
        r.max_distance = Some(15);
        // y–z are 20 apart, x alone has 4 queue pairs for 3+2.
        let e = place(&t, &r).unwrap_err();
        assert_eq!(
            render(&e),
            "x–y distance 60 > max 15; x–z distance 60 > max 15; y–z distance 20 > max 15; \
             x: 4 of 4 queue pairs free, need 5 for functions 0+1"
        );
        // Each pair once, in input order; x is no pair problem with itself
        // (x–y and x–z are 60 apart, through node0).
    }

    /// `n` accelerators on a line, each `step` from the next, one queue pair
    /// each, every operation.
    fn line(n: usize, step: i64) -> Topology {
        let name = |i: usize| format!("a{i}");
        Topology::new(TopologySpec {
            accelerators: (0..n).map(|i| accel(&name(i), KNOWN_OPS, 1)).collect(),
            links: (1..n)
                .map(|i| link(&name(i), Node::Accelerator(name(i - 1)), step))
                .collect(),
            ..TopologySpec::default()
        })
        .unwrap()
    }

    /// Eight functions that cannot share an accelerator nor be swapped.
    fn eight_distinct() -> PlacementRequest {
        req(&Opcode::ALL[1..9]
            .iter()
            .map(|op| (1, op.bit()))
            .collect::<Vec<_>>())
    }

    #[test]
    fn a_huge_search_space_ends_within_the_budget() {
        // 60 accelerators, 8 distinct functions: 60^8 assignments. Feasible:
        // the best found within the budget is taken, and is valid.
        let t = line(60, 1);
        let mut r = eight_distinct();
        r.max_distance = Some(7);
        let c = place(&t, &r).unwrap();
        assert_eq!(c.distinct.len(), 8);
        assert!(c.max <= 7);
        // Infeasible: any 8 distinct accelerators span at least 7 > 6, but
        // every pair of candidates passes (each has neighbours within 6).
        r.max_distance = Some(6);
        let e = search(&t, &Capacity::empty_host(&t), &r.check(&t).unwrap(), None).unwrap_err();
        assert_eq!(
            e,
            PlacementError::SearchBudget {
                visited: SEARCH_BUDGET
            }
        );
    }

    #[test]
    fn identical_functions_are_tried_in_one_order_only() {
        // Ten accelerators, one queue pair each, all 20 apart: eight
        // identical functions need eight distinct accelerators, every choice
        // ties. In one order only: C(10, 8) leaves, not 10!/2! (1.8 million).
        let t = Topology::new(TopologySpec {
            numa_nodes: vec![NumaSpec {
                id: 0,
                cpus: vec![],
            }],
            accelerators: (0..10).map(|i| accel(&format!("a{i}"), SHA, 1)).collect(),
            links: (0..10)
                .map(|i| link(&format!("a{i}"), Node::Numa(0), 10))
                .collect(),
        })
        .unwrap();
        let c = place(&t, &req(&[(1, SHA); 8])).unwrap();
        assert_eq!(c.accel_of, [0, 1, 2, 3, 4, 5, 6, 7]);
        assert!(c.steps < 10_000, "{}", c.steps);
    }

    #[test]
    fn huge_queue_counts_are_refused_not_overflowed() {
        let t = topo();
        let e = place(&t, &req(&[(u32::MAX, SHA), (u32::MAX, SHA)])).unwrap_err();
        assert!(
            render(&e).contains("z: 8 of 8 queue pairs free, need 4294967295 (function 0)"),
            "{}",
            render(&e)
        );
        let e = place(&t, &req(&[(4, SHA), (u32::MAX - 1, ZIP)])).unwrap_err();
        assert!(render(&e).contains("need 4294967294"), "{}", render(&e));
    }

    #[test]
    fn ordinary_requests_take_few_steps() {
        let t = topo();
        let mut r = req(&[(1, ZIP), (1, SHA)]);
        r.numa_node = Some(0);
        let c = place(&t, &r).unwrap();
        assert!(c.steps <= 9, "{}", c.steps);
    }

    #[test]
    fn unreachable_accelerators_are_named_not_connected() {
        let t = Topology::new(TopologySpec {
            numa_nodes: vec![NumaSpec {
                id: 0,
                cpus: vec![0],
            }],
            accelerators: vec![accel("island", SHA, 4), accel("other", SHA, 4)],
            ..TopologySpec::default()
        })
        .unwrap();
        let mut r = req(&[(1, SHA)]);
        r.numa_node = Some(0);
        r.max_distance = Some(100);
        assert_eq!(
            render(&place(&t, &r).unwrap_err()),
            "island–node0 not connected; other–node0 not connected"
        );
        // With no maximum, an unreachable accelerator is allowed.
        r.max_distance = None;
        assert!(place(&t, &r).is_ok());
        // Two functions that cannot share an accelerator, on islands.
        let r = PlacementRequest {
            max_distance: Some(100),
            ..req(&[(3, SHA), (3, SHA)])
        };
        assert_eq!(
            render(&place(&t, &r).unwrap_err()),
            "island–other not connected; island: 4 of 4 queue pairs free, need 6 for functions 0+1; \
             other: 4 of 4 queue pairs free, need 6 for functions 0+1"
        );
    }

    #[test]
    fn candidates_with_no_partner_are_dropped_before_the_search() {
        // Seven functions can go on a0..a13 (close together), the eighth
        // only on "far", 100 away from all of them: no search needed.
        let t = Topology::new(TopologySpec {
            accelerators: (0..14)
                .map(|i| accel(&format!("a{i}"), KNOWN_OPS & !Opcode::Compare.bit(), 1))
                .chain([accel("far", Opcode::Compare.bit(), 1)])
                .collect(),
            links: (1..14)
                .map(|i| link(&format!("a{i}"), Node::Accelerator("a0".into()), 1))
                .chain([link("far", Node::Accelerator("a0".into()), 100)])
                .collect(),
            ..TopologySpec::default()
        })
        .unwrap();
        let mut r = req(&Opcode::ALL[4..12]
            .iter()
            .map(|op| (1, op.bit()))
            .collect::<Vec<_>>());
        r.max_distance = Some(10);
        let e = place(&t, &r).unwrap_err();
        assert_eq!(e.len(), 14, "{}", render(&e));
        assert_eq!(e[0].to_string(), "a0–far distance 100 > max 10");
    }

    #[test]
    fn counting_successive_placements_stops_at_the_scarcest_resource() {
        let t = topo();
        let r = req(&[(1, SHA)]).check(&t).unwrap();
        let cap = Capacity::empty_host(&t);
        // PASID slots (4 per accelerator) run out before queue pairs: x 4, z 4.
        assert_eq!(count_successive(&t, cap.clone(), &r, u32::MAX, None), 8);
        assert_eq!(count_successive(&t, cap.clone(), &r, u32::MAX, Some(2)), 4);
        assert_eq!(count_successive(&t, cap.clone(), &r, u32::MAX, Some(1)), 0);
        assert_eq!(
            count_successive(&t, cap, &r, 3, None),
            3,
            "host PASIDs bound it"
        );
    }

    #[test]
    fn check_hostable_refuses_a_type_nothing_can_host() {
        let t = topo();
        t.check_hostable(&req(&[(8, SHA)])).unwrap();
        let e = t.check_hostable(&req(&[(9, SHA)])).unwrap_err();
        assert_eq!(
            e.to_string(),
            "no placement fits: x: 4 of 4 queue pairs free, need 9; y: no sha256; \
             y: 8 of 8 queue pairs free, need 9; z: 8 of 8 queue pairs free, need 9"
        );
    }
}

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
use std::fmt;

use serde::{Deserialize, Serialize};

use super::graph::{KNOWN_OPS, Topology, ops_names};

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

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RequestError {
    #[error("the request has no function")]
    NoFunctions,
    #[error("the request has {0} functions; at most {max} are supported", max = MAX_FUNCTIONS)]
    TooManyFunctions(usize),
    #[error("function {0} asks for no queue")]
    NoQueues(usize),
    #[error("function {0} asks for no operation")]
    NoOperations(usize),
    #[error("function {function}: unknown operation bits {bits:#x}")]
    UnknownOperations { function: usize, bits: u32 },
    #[error("the accelerator list is empty")]
    EmptyAllowList,
    #[error("unknown accelerator {0:?} in the accelerator list")]
    UnknownAccelerator(String),
    #[error("unknown NUMA node {0}")]
    UnknownNumaNode(u32),
}

/// Why one accelerator cannot take (a function of) the instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "constraint", rename_all = "snake_case")]
pub enum Reason {
    /// Not in the request's accelerator list.
    NotAllowed,
    /// Lacks these operations (a mask).
    MissingOps { missing: u32 },
    /// Too few free queue pairs for one function.
    QueuePairs { free: u32, total: u32, need: u32 },
    /// Every PASID slot is live or draining.
    PasidsExhausted { capacity: u32 },
    /// Too far from the VM's NUMA node (`distance: None`: not connected).
    NumaDistance {
        node: u32,
        distance: Option<u64>,
        max: u64,
    },
    /// Too far from `other`, a candidate for another function.
    PairDistance {
        other: String,
        distance: Option<u64>,
        max: u64,
    },
    /// A candidate for several functions without room for all of them.
    SharedQueuePairs {
        functions: Vec<usize>,
        free: u32,
        total: u32,
        need: u32,
    },
}

/// One accelerator ruled out, and why. `function` is set when the reason
/// concerns one function of a multi-function request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejection {
    pub accelerator: String,
    pub function: Option<usize>,
    #[serde(flatten)]
    pub reason: Reason,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.accelerator;
        let too_far =
            |f: &mut fmt::Formatter<'_>, other: &dyn fmt::Display, d: &Option<u64>, max| match d {
                Some(d) => write!(f, "{a}–{other} distance {d} > max {max}"),
                None => write!(f, "{a}–{other} not connected"),
            };
        match &self.reason {
            Reason::NotAllowed => write!(f, "{a}: not in the accelerator list")?,
            Reason::MissingOps { missing } => write!(f, "{a}: no {}", ops_names(*missing))?,
            Reason::QueuePairs { free, total, need } => {
                write!(f, "{a}: {free} of {total} queue pairs free, need {need}")?
            }
            Reason::PasidsExhausted { capacity } => {
                write!(f, "{a}: PASIDs exhausted ({capacity})")?
            }
            Reason::NumaDistance {
                node,
                distance,
                max,
            } => too_far(f, &format_args!("node{node}"), distance, max)?,
            Reason::PairDistance {
                other,
                distance,
                max,
            } => too_far(f, other, distance, max)?,
            Reason::SharedQueuePairs {
                functions,
                free,
                total,
                need,
            } => {
                let list: Vec<String> = functions.iter().map(usize::to_string).collect();
                write!(
                    f,
                    "{a}: {free} of {total} queue pairs free, need {need} for functions {}",
                    list.join("+")
                )?
            }
        }
        if let Some(function) = self.function {
            write!(f, " (function {function})")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PlacementError {
    #[error(transparent)]
    Request(#[from] RequestError),
    /// Nothing fits; `rejections` names, per accelerator, what rules it out.
    /// Empty when every pairwise check passes but no combination does.
    #[error("no placement fits: {}", render(rejections))]
    NoFit { rejections: Vec<Rejection> },
    #[error("the host's PASID space is exhausted ({max})")]
    HostPasidsExhausted { max: u32 },
}

fn render(rejections: &[Rejection]) -> String {
    if rejections.is_empty() {
        return "no combination of the candidate accelerators meets every constraint together"
            .to_string();
    }
    rejections
        .iter()
        .map(Rejection::to_string)
        .collect::<Vec<_>>()
        .join("; ")
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
}

impl Dfs<'_> {
    fn go(&mut self, i: usize, total: u64, max: u64) {
        if i == self.req.functions.len() {
            return self.leaf(total, max);
        }
        for k in 0..self.cands[i].len() {
            let a = self.cands[i][k];
            let need = self.req.functions[i].queues;
            if self.qp_used[a] + need > self.cap.free_qp[a] {
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
            // Distances only add up: a partial total already worse than the
            // best complete one cannot win.
            if self.best.as_ref().is_some_and(|(s, _)| t > s.0) {
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
            };
            self.best = Some((score, choice));
        }
    }
}

/// The best placement of `req` in `cap`, or per accelerator why not.
/// `must`: only placements that use this accelerator (for per-accelerator
/// `available_instances`).
pub(crate) fn search(
    topo: &Topology,
    cap: &Capacity,
    req: &Checked,
    must: Option<usize>,
) -> Result<Choice, Vec<Rejection>> {
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
    let empty: Vec<usize> = (0..nf).filter(|&i| cands[i].is_empty()).collect();
    if !empty.is_empty() {
        // Some function fits nowhere: say why, per accelerator, for those
        // functions only (the others are not the problem).
        let mut out: Vec<Rejection> = Vec::new();
        for a in 0..n {
            for &i in &empty {
                let per_accel: &Vec<Vec<Reason>> = &singles[i];
                for reason in &per_accel[a] {
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
        return Err(out);
    }
    let mut dfs = Dfs {
        topo,
        cap,
        req,
        cands,
        must,
        assign: Vec::new(),
        distinct: Vec::new(),
        qp_used: vec![0; n],
        best: None,
    };
    dfs.go(0, 0, 0);
    if let Some((_, choice)) = dfs.best {
        return Ok(choice);
    }
    Err(combination_rejections(topo, cap, req, &dfs.cands))
}

/// Every candidate passes alone but no combination does: name the pairs too
/// far apart and the shared accelerators too small for their functions.
fn combination_rejections(
    topo: &Topology,
    cap: &Capacity,
    req: &Checked,
    cands: &[Vec<usize>],
) -> Vec<Rejection> {
    let accels = topo.accelerators();
    let mut out: Vec<Rejection> = Vec::new();
    // Each pair once, in input order.
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
    for (a, b) in pairs {
        out.push(Rejection {
            accelerator: accels[a].name.clone(),
            function: None,
            reason: Reason::PairDistance {
                other: accels[b].name.clone(),
                distance: topo.accel_distance(a, b),
                // `within` fails only with a maximum.
                max: req.max.unwrap_or(0),
            },
        });
    }
    for (a, accel) in accels.iter().enumerate() {
        let functions: Vec<usize> = (0..cands.len())
            .filter(|&i| cands[i].contains(&a))
            .collect();
        let need: u32 = functions.iter().map(|&i| req.functions[i].queues).sum();
        if functions.len() > 1 && need > cap.free_qp[a] {
            out.push(Rejection {
                accelerator: accel.name.clone(),
                function: None,
                reason: Reason::SharedQueuePairs {
                    functions,
                    free: cap.free_qp[a],
                    total: accel.queue_pairs,
                    need,
                },
            });
        }
    }
    out
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
        search(self, &Capacity::empty_host(self), &checked, None)
            .map(drop)
            .map_err(|rejections| PlacementError::NoFit { rejections })
    }
}

#[cfg(test)]
mod tests {
    use super::super::graph::{AcceleratorSpec, LinkSpec, Node, NumaSpec, TopologySpec};
    use super::*;
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
        search(t, &Capacity::empty_host(t), &r.check(t).unwrap(), None)
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

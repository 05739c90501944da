//! Placement's errors: a bad request, or — when nothing fits — per
//! accelerator, the constraint that rules it out, with a readable `Display`
//! (`soft0: 2 of 64 queue pairs free, need 4`, `zip1–sec0 distance 4 > max 3`).

use std::fmt;

use serde::Serialize;

use super::graph::ops_names;
use super::placement::MAX_FUNCTIONS;

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
    #[error(
        "placement gave up after {visited} search steps without a fit; \
         narrow the type's accelerator list"
    )]
    SearchBudget { visited: u64 },
}

pub(crate) fn render(rejections: &[Rejection]) -> String {
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

//! The VFIO migration v2 state machine as the vfio-user specification
//! (`docs/interop/vfio-user.rst`, "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE")
//! defines it.
//!
//! Direct arcs (each one is an action the device takes):
//!
//! | from        | to          | action                                          |
//! |-------------|-------------|-------------------------------------------------|
//! | RUNNING     | STOP        | stop the device                                 |
//! | STOP_COPY   | STOP        | end the data transfer session                   |
//! | RESUMING    | STOP        | end the session, load the state (may fail)      |
//! | PRE_COPY    | RUNNING     | end the session; fully operational              |
//! | STOP        | RUNNING     | start the device                                |
//! | RUNNING     | PRE_COPY    | begin saving; the device keeps running          |
//! | STOP        | STOP_COPY   | begin saving a stopped device                   |
//! | PRE_COPY    | STOP_COPY   | go on saving, stop the device                   |
//! | STOP        | RESUMING    | begin loading a new state                       |
//!
//! Every other transition is a combination of these, chosen by the
//! specification's two rules: the shortest path, and no state of the saving
//! group (PRE_COPY, STOP_COPY) inside a path, only at its ends. STOP_COPY →
//! PRE_COPY is refused outright. ERROR cannot be asked for, and is left only by
//! a device reset. RUNNING_P2P and PRE_COPY_P2P exist in `<linux/vfio.h>` but
//! the vfio-user specification marks them "not used in vfio-user", so they are
//! refused as targets like any unknown number.
//!
//! The table below is written out by hand, like the kernel's
//! `vfio_mig_get_next_state`; the tests derive the same answers by a
//! breadth-first search over the arcs for every pair of states.

use serde::{Deserialize, Serialize};

/// A migration state, numbered as `enum vfio_device_mig_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[repr(u32)]
pub enum MigState {
    Error = 0,
    Stop = 1,
    Running = 2,
    StopCopy = 3,
    Resuming = 4,
    RunningP2p = 5,
    PreCopy = 6,
    PreCopyP2p = 7,
}

/// Every state, in number order.
pub const ALL_STATES: [MigState; 8] = [
    MigState::Error,
    MigState::Stop,
    MigState::Running,
    MigState::StopCopy,
    MigState::Resuming,
    MigState::RunningP2p,
    MigState::PreCopy,
    MigState::PreCopyP2p,
];

/// Why a requested transition is refused. Each maps to the errno the reply
/// carries (EINVAL, as the kernel's `vfio_mig_get_next_state` returns).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("migration state {0} does not exist")]
    Unknown(u32),
    #[error("{0:?} is not used in vfio-user")]
    NotInVfioUser(MigState),
    #[error("ERROR cannot be requested; a device enters it only when an arc fails")]
    ErrorRequested,
    #[error("the device is in ERROR; only a device reset leaves it")]
    InError,
    #[error("STOP_COPY -> PRE_COPY is not allowed (the specification refuses it)")]
    StopCopyToPreCopy,
}

impl Refusal {
    /// The positive errno for the error reply.
    pub fn errno(&self) -> u32 {
        libc::EINVAL as u32
    }
}

impl MigState {
    /// The state with this number, if vfio-user knows it.
    pub fn from_u32(n: u32) -> Result<MigState, Refusal> {
        ALL_STATES
            .get(n as usize)
            .copied()
            .ok_or(Refusal::Unknown(n))
    }

    /// PRE_COPY and STOP_COPY: the device's state is being read out.
    pub fn is_saving(self) -> bool {
        matches!(self, MigState::PreCopy | MigState::StopCopy)
    }

    /// Whether the device runs guest work in this state.
    pub fn is_running(self) -> bool {
        matches!(self, MigState::Running | MigState::PreCopy)
    }

    /// The specification's name for the state.
    pub fn name(self) -> &'static str {
        match self {
            MigState::Error => "ERROR",
            MigState::Stop => "STOP",
            MigState::Running => "RUNNING",
            MigState::StopCopy => "STOP_COPY",
            MigState::Resuming => "RESUMING",
            MigState::RunningP2p => "RUNNING_P2P",
            MigState::PreCopy => "PRE_COPY",
            MigState::PreCopyP2p => "PRE_COPY_P2P",
        }
    }
}

/// The one direct arc to take next on the way from `from` to `to`, or `to`
/// itself when `from == to` (nothing to do). The caller applies arcs one at a
/// time until it arrives, so each arc's action runs exactly once.
pub fn next_step(from: MigState, to: MigState) -> Result<MigState, Refusal> {
    use MigState::*;
    match to {
        Error => return Err(Refusal::ErrorRequested),
        RunningP2p | PreCopyP2p => return Err(Refusal::NotInVfioUser(to)),
        _ => {}
    }
    let next = match (from, to) {
        (Error, _) => return Err(Refusal::InError),
        (RunningP2p | PreCopyP2p, _) => return Err(Refusal::NotInVfioUser(from)),
        (StopCopy, PreCopy) => return Err(Refusal::StopCopyToPreCopy),
        (f, t) if f == t => t,
        // From STOP every state is one arc away, except PRE_COPY (via RUNNING).
        (Stop, PreCopy) => Running,
        (Stop, t) => t,
        // RUNNING reaches STOP and PRE_COPY directly, the rest through STOP.
        (Running, PreCopy) => PreCopy,
        (Running, _) => Stop,
        // STOP_COPY and RESUMING only ever leave for STOP.
        (StopCopy | Resuming, _) => Stop,
        // PRE_COPY: STOP_COPY directly, everything else through RUNNING.
        (PreCopy, StopCopy) => StopCopy,
        (PreCopy, _) => Running,
    };
    Ok(next)
}

/// The whole path of direct arcs from `from` to `to` (empty when equal).
pub fn path(from: MigState, to: MigState) -> Result<Vec<MigState>, Refusal> {
    let mut at = from;
    let mut steps = Vec::new();
    while at != to {
        at = next_step(at, to)?;
        steps.push(at);
        debug_assert!(steps.len() <= ALL_STATES.len(), "the table loops");
    }
    // `next_step` refuses the pair itself even when from == to.
    next_step(from, to)?;
    Ok(steps)
}

/// The direct arcs of the specification (PRE_COPY supported).
pub fn is_arc(from: MigState, to: MigState) -> bool {
    use MigState::*;
    matches!(
        (from, to),
        (Running, Stop)
            | (StopCopy, Stop)
            | (Resuming, Stop)
            | (PreCopy, Running)
            | (Stop, Running)
            | (Running, PreCopy)
            | (Stop, StopCopy)
            | (PreCopy, StopCopy)
            | (Stop, Resuming)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// The oracle: breadth-first search over the direct arcs, never passing
    /// through a saving state, with the specification's explicit refusals.
    fn oracle(from: MigState, to: MigState) -> Option<Vec<MigState>> {
        use MigState::*;
        let usable = |s: MigState| !matches!(s, Error | RunningP2p | PreCopyP2p);
        if !usable(from) || !usable(to) || (from, to) == (StopCopy, PreCopy) {
            return None;
        }
        let mut prev: Vec<Option<MigState>> = vec![None; ALL_STATES.len()];
        let mut seen = [false; 8];
        let mut queue = VecDeque::from([from]);
        seen[from as usize] = true;
        while let Some(at) = queue.pop_front() {
            if at == to {
                break;
            }
            // A saving state may start a path but not sit inside one.
            if at != from && at.is_saving() {
                continue;
            }
            for next in ALL_STATES {
                if is_arc(at, next) && !seen[next as usize] {
                    seen[next as usize] = true;
                    prev[next as usize] = Some(at);
                    queue.push_back(next);
                }
            }
        }
        if !seen[to as usize] {
            return None;
        }
        let mut steps = Vec::new();
        let mut at = to;
        while at != from {
            steps.push(at);
            at = prev[at as usize].expect("a reached state has a predecessor");
        }
        steps.reverse();
        Some(steps)
    }

    /// Every shortest admissible path, to prove the oracle's answer is the
    /// only one (so the table cannot be right by a tie-break of luck).
    fn shortest_count(from: MigState, to: MigState, len: usize) -> usize {
        fn walk(at: MigState, to: MigState, left: usize, first: bool) -> usize {
            if left == 0 {
                return usize::from(at == to);
            }
            if !first && (at == to || at.is_saving()) {
                return 0;
            }
            ALL_STATES
                .iter()
                .filter(|n| is_arc(at, **n))
                .map(|n| walk(*n, to, left - 1, false))
                .sum()
        }
        walk(from, to, len, true)
    }

    #[test]
    fn the_table_is_the_breadth_first_oracle_for_every_pair() {
        for from in ALL_STATES {
            for to in ALL_STATES {
                let table = path(from, to).ok();
                let oracle = oracle(from, to);
                assert_eq!(table, oracle, "{} -> {}", from.name(), to.name());
                if let Some(steps) = oracle.filter(|s| !s.is_empty()) {
                    assert_eq!(
                        shortest_count(from, to, steps.len()),
                        1,
                        "{} -> {} has one shortest path",
                        from.name(),
                        to.name()
                    );
                }
            }
        }
    }

    #[test]
    fn each_step_is_a_direct_arc_and_no_saving_state_is_passed_through() {
        for from in ALL_STATES {
            for to in ALL_STATES {
                let Ok(steps) = path(from, to) else { continue };
                let mut at = from;
                for (i, s) in steps.iter().enumerate() {
                    assert!(is_arc(at, *s), "{} -> {}", at.name(), s.name());
                    if i + 1 < steps.len() {
                        assert!(!s.is_saving(), "{} inside {:?}", s.name(), steps);
                    }
                    at = *s;
                }
            }
        }
    }

    #[test]
    fn refusals_name_their_reason_and_carry_einval() {
        use MigState::*;
        assert_eq!(
            next_step(StopCopy, PreCopy),
            Err(Refusal::StopCopyToPreCopy)
        );
        assert_eq!(next_step(Running, Error), Err(Refusal::ErrorRequested));
        assert_eq!(next_step(Error, Running), Err(Refusal::InError));
        assert_eq!(next_step(Error, Error), Err(Refusal::ErrorRequested));
        assert_eq!(
            next_step(Running, RunningP2p),
            Err(Refusal::NotInVfioUser(RunningP2p))
        );
        assert_eq!(MigState::from_u32(8), Err(Refusal::Unknown(8)));
        assert_eq!(MigState::from_u32(0xabcd), Err(Refusal::Unknown(0xabcd)));
        for r in [
            Refusal::Unknown(9),
            Refusal::InError,
            Refusal::StopCopyToPreCopy,
            Refusal::ErrorRequested,
        ] {
            assert_eq!(r.errno(), libc::EINVAL as u32);
            assert!(!r.to_string().is_empty());
        }
    }

    #[test]
    fn the_numbers_are_the_specifications() {
        for (n, s) in ALL_STATES.iter().enumerate() {
            assert_eq!(*s as u32, n as u32);
            assert_eq!(MigState::from_u32(n as u32), Ok(*s));
        }
        assert_eq!(MigState::StopCopy as u32, 3);
        assert_eq!(MigState::PreCopy as u32, 6);
    }

    #[test]
    fn the_paths_an_orchestrator_takes() {
        use MigState::*;
        // Source: RUNNING -> PRE_COPY -> STOP_COPY -> STOP.
        assert_eq!(path(Running, PreCopy).unwrap(), [PreCopy]);
        assert_eq!(path(PreCopy, StopCopy).unwrap(), [StopCopy]);
        assert_eq!(path(StopCopy, Stop).unwrap(), [Stop]);
        // A source told to resume after a failed migration.
        assert_eq!(path(StopCopy, Running).unwrap(), [Stop, Running]);
        assert_eq!(path(PreCopy, Stop).unwrap(), [Running, Stop]);
        // Destination: RUNNING -> RESUMING -> RUNNING.
        assert_eq!(path(Running, Resuming).unwrap(), [Stop, Resuming]);
        assert_eq!(path(Resuming, Running).unwrap(), [Stop, Running]);
        assert_eq!(path(Resuming, PreCopy).unwrap(), [Stop, Running, PreCopy]);
        assert_eq!(path(Running, StopCopy).unwrap(), [Stop, StopCopy]);
        assert!(path(Stop, Stop).unwrap().is_empty());
    }
}

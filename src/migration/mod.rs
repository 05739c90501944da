//! Live migration of an instance with its queue state (VFIO migration v2 over
//! vfio-user).
//!
//! `fsm` is the device's migration state machine: the arcs the vfio-user
//! specification lists, every other transition taken by the shortest path the
//! specification's rules allow, and the refusals with their errno. It is a
//! table, checked in its tests against a breadth-first search over the arcs
//! for every pair of states.

pub mod fsm;
pub mod stream;

pub use fsm::{MigState, Refusal};

//! libvirt integration: a domain asks for instances in its XML, and the
//! hook libvirt runs around QEMU creates them before QEMU starts and
//! releases them after it stops.
//!
//! Files by role: `metadata` (reading a domain's XML: wdvirt's namespace
//! under `<metadata>`, shared memory, the sockets `<qemu:commandline>`
//! names; instance names and socket paths from the domain's name), `hook`
//! (what each hook operation does, as [`crate::daemon::action::Action`]s
//! handed to a daemon), `snippet` (the XML an operator adds to a domain),
//! `install` (the hook script). Neighbours: `daemon` (its actions and
//! views) below; `cli` above, which reaches the daemon over its API.

pub mod hook;
pub mod install;
pub mod metadata;
pub mod snippet;

//! Restart survival: what outlives the daemon process. The daemon's fds
//! (instance sockets, VMM connections, guest memory, its state memfd) wait
//! in a separate holder process while the daemon is dead, and a restarted
//! daemon takes them back.

pub mod adopt;
pub mod holder;
pub mod keep;
pub mod state;

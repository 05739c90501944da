//! The daemon: instances and their lifecycle.
pub mod instance;

//! Guest driver core.

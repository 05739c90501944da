//! Soft accel.

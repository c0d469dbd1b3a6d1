//! Control plane (to come).

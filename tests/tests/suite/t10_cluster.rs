//! Control-plane cluster tests.

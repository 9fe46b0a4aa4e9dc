//! Real control-plane nodes for tests (written with the control plane).

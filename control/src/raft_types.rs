//! openraft's type configuration for Blixard: commands in, responses out, `u64` node ids,
//! nodes addressed by their base URL, snapshots as in-memory byte buffers.

use std::io::Cursor;

use crate::state_machine::{Command, Response};

openraft::declare_raft_types!(
    /// Blixard's Raft type configuration.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = u64,
        Node = openraft::BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

pub type NodeId = u64;
pub type Node = openraft::BasicNode;
pub type Entry = openraft::Entry<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig>;

//! What containerd may do with a snapshot ([`SnapshotKind`]): stored in its record
//! ([`crate::store`]) and deciding its directories and mounts ([`crate::layer`]).

use serde::{Deserialize, Serialize};

/// What containerd may do with a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotKind {
    /// Writable, may be committed.
    Active,
    /// Read-only view of its parent; never committed.
    View,
    /// Immutable; may be a parent.
    Committed,
}

impl SnapshotKind {
    /// The name containerd's filters use (`kind==committed`).
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotKind::Active => "active",
            SnapshotKind::View => "view",
            SnapshotKind::Committed => "committed",
        }
    }
}

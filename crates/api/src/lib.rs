//! The controller's REST API types (`/v1/...`), shared by the controller (server), the agent
//! (client of the agent-sync endpoint) and the CLI (client of everything else).
//!
//! Contract (DESIGN section 5): field names are stable, sizes are integers in bytes, every
//! object that is printed by the CLI is printed from these types with `-o json` verbatim.
//! Errors are [`ApiError`] bodies with a stable `code`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Default address of the controller, used by `tandem up` and as the CLI's default.
pub const DEFAULT_CONTROLLER_PORT: u16 = 7450;
pub const DEFAULT_CONTROLLER_URL: &str = "http://127.0.0.1:7450";

/// Every error response of the API.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApiError {
    /// Stable machine-readable code, e.g. `not_found`, `invalid_name`, `already_exists`,
    /// `invalid_size`, `no_capacity`, `bad_request`, `unsupported`, `conflict`, `internal`.
    pub code: String,
    /// Human-readable explanation of what was wrong and what to do.
    pub message: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// Stores replicas.
    #[default]
    Diskful,
    /// Stores no data; votes as a quorum tiebreaker.
    Witness,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// The agent synced with the controller recently.
    Online,
    /// The agent has not synced for longer than the offline timeout.
    Offline,
}

/// A host running an agent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Node {
    pub name: String,
    /// Address the agent advertises for replication and NBD over TCP (host part).
    pub address: String,
    pub role: NodeRole,
    pub state: NodeState,
    /// Seconds since the agent last synced with the controller.
    pub last_seen_secs: u64,
    /// Unix socket the agent serves NBD on.
    pub nbd_socket: Option<String>,
    /// `host:port` the agent serves NBD on over TCP (loopback unless TLS is configured).
    pub nbd_tcp: Option<String>,
    pub agent_version: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum PoolKind {
    /// A directory of sparse files.
    #[default]
    Dir,
}

/// Storage on one node that replicas are placed in. Capacity is reported by the agent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Pool {
    pub node: String,
    pub name: String,
    pub kind: PoolKind,
    pub path: String,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
    /// Sum of the sizes of the volumes placed here (thin: may exceed capacity).
    pub provisioned_bytes: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Default)]
pub enum Protocol {
    /// Synchronous: acknowledged when on every reachable UpToDate replica.
    #[default]
    C,
    /// Asynchronous: acknowledged after the local write.
    A,
}

/// `POST /v1/volumes`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeCreate {
    pub name: String,
    pub size_bytes: u64,
    /// Diskful replicas (default 1).
    #[serde(default)]
    pub replicas: Option<u32>,
    /// Pool name to place replicas in (default: the pool with the most free space).
    #[serde(default)]
    pub pool: Option<String>,
    /// Nodes to place replicas on (default: nodes with the most free space).
    #[serde(default)]
    pub nodes: Option<Vec<String>>,
    #[serde(default)]
    pub protocol: Option<Protocol>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum VolumeState {
    /// Replicas are being created.
    Creating,
    /// Every replica exists and reports a disk state.
    Ready,
    /// Replicas are being removed.
    Deleting,
}

/// DRBD-style disk state of one replica.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub enum DiskState {
    UpToDate,
    Inconsistent,
    Outdated,
    Diskless,
    Failed,
    /// The agent has not (yet) reported this replica.
    Unknown,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
    Unknown,
}

/// One copy of a volume on one node.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Replica {
    pub node: String,
    pub pool: String,
    pub diskless: bool,
    pub role: Role,
    pub disk_state: DiskState,
    /// Replication state towards peers (`StandAlone` while the volume has one replica).
    pub repl_state: String,
    pub out_of_sync_bytes: u64,
    pub resync_bytes_per_sec: u64,
    /// Bytes the most recent resync into this replica transferred.
    pub last_resync_bytes: u64,
    /// Bytes allocated in the backing store (sparse files: less than the size).
    pub allocated_bytes: u64,
    /// Consumers connected to this replica's export right now.
    pub connections: u32,
}

/// A multi-step change in progress or recently finished.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Operation {
    pub kind: String,
    /// `pending`, `running`, `done`, `failed`.
    pub state: String,
    /// 0.0 to 1.0.
    pub progress: f64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Volume {
    pub name: String,
    /// Stable identity, different for a volume re-created under the same name.
    pub uuid: String,
    pub size_bytes: u64,
    pub protocol: Protocol,
    pub replica_count: u32,
    pub state: VolumeState,
    /// Whether the volume's voters have a majority (always true with one replica).
    pub quorum: bool,
    pub replicas: Vec<Replica>,
    pub operations: Vec<Operation>,
}

/// `GET /v1/volumes/{name}/connect`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ConnectInfo {
    /// NBD URI as understood by qemu, libnbd and nbdinfo.
    pub uri: String,
    /// The same export over TCP (loopback), if the agent listens on TCP.
    pub tcp_uri: Option<String>,
    pub node: String,
    pub export: String,
}

/// `GET /v1/status`: everything at a glance.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ClusterStatus {
    pub cluster_id: String,
    pub controller_version: String,
    pub nodes: Vec<Node>,
    pub pools: Vec<Pool>,
    pub volumes: Vec<Volume>,
}

// ---------------------------------------------------------------------------------------------
// Agent <-> controller: `POST /v1/agents/{node}/sync`. The agent pushes what it has (its report)
// and receives what it should have (desired state). The agent never deletes a replica unless the
// desired state lists it with `present: false`: an empty or rebuilt controller cannot wipe data.
// ---------------------------------------------------------------------------------------------

/// A pool as the agent sees it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct PoolReport {
    pub name: String,
    pub kind: PoolKind,
    pub path: String,
    pub capacity_bytes: u64,
    pub free_bytes: u64,
}

/// A replica as the agent sees it (read from its metadata and live state).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ReplicaReport {
    pub volume: String,
    pub volume_uuid: String,
    pub pool: String,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    pub role: Role,
    pub disk_state: DiskState,
    pub connections: u32,
    /// Last error applying the desired state to this replica, if any.
    pub last_error: Option<String>,
}

/// Body of `POST /v1/agents/{node}/sync`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentReport {
    pub node: String,
    pub address: String,
    pub role: NodeRole,
    pub agent_version: String,
    pub nbd_socket: Option<String>,
    pub nbd_tcp: Option<String>,
    pub pools: Vec<PoolReport>,
    pub replicas: Vec<ReplicaReport>,
    /// Desired-state revision the agent has applied; the controller may hold the response
    /// (long poll, up to `wait_ms` of the query) until its revision differs.
    pub applied_revision: u64,
}

/// One replica the controller wants on the agent's node.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DesiredReplica {
    pub volume: String,
    pub volume_uuid: String,
    pub pool: String,
    pub size_bytes: u64,
    /// `false`: delete this replica (volume `volume_uuid`) if it exists.
    pub present: bool,
}

/// Response of `POST /v1/agents/{node}/sync`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DesiredState {
    pub cluster_id: String,
    pub revision: u64,
    pub replicas: Vec<DesiredReplica>,
}

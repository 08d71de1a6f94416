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
    /// Small id of the node in the cluster (0..=31), assigned by the controller at first
    /// registration and never reused while the node exists.
    #[serde(default)]
    pub node_id: Option<u8>,
    /// `host:port` the agent listens on for replication links from its peers.
    #[serde(default)]
    pub repl_addr: Option<String>,
}

/// `POST /v1/nodes`: declare a node before its agent first syncs (`node add`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeAdd {
    pub name: String,
    /// Host name or IP address the node's agent reports (no port).
    pub address: String,
    /// A witness node: it only ever gets witnesses (diskless voters), never data.
    #[serde(default)]
    pub witness: bool,
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

/// What a Primary without quorum does with its consumers' I/O (DRBD's `on-no-quorum`).
/// Serialized `io-error` / `suspend`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum OnNoQuorum {
    /// Requests fail (EIO) once quorum cannot come back over the current links (the
    /// default).
    #[default]
    IoError,
    /// Requests are held, neither completed nor failed, until quorum is back (then they
    /// complete) or the node stops being Primary (then they fail): the consumer's I/O hangs,
    /// as with a lost path to a SAN.
    Suspend,
}

impl OnNoQuorum {
    /// The policy's name as the API and the CLI spell it (`io-error`, `suspend`).
    pub fn as_str(self) -> &'static str {
        match self {
            OnNoQuorum::IoError => "io-error",
            OnNoQuorum::Suspend => "suspend",
        }
    }

    fn is_default(&self) -> bool {
        *self == OnNoQuorum::IoError
    }
}

impl std::fmt::Display for OnNoQuorum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for OnNoQuorum {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "io-error" => Ok(OnNoQuorum::IoError),
            "suspend" => Ok(OnNoQuorum::Suspend),
            other => Err(format!(
                "unknown on-no-quorum policy '{other}': use io-error or suspend"
            )),
        }
    }
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
    /// Resync rate limit, bytes per second (default 0: unlimited).
    #[serde(default)]
    pub resync_rate_bytes_per_sec: Option<u64>,
    /// The dynamic resync controller's floor, bytes per second: while the consumer does I/O
    /// the resync runs at most this fast (default 16 MiB/s; 0: never yield).
    #[serde(default)]
    pub resync_min_rate_bytes_per_sec: Option<u64>,
    /// Automatic split-brain policy: `disconnect` (default), `discard-zero-changes`,
    /// `discard-younger-primary`,
    /// `discard-node:NODE`.
    #[serde(default)]
    pub after_split_brain: Option<String>,
    /// Checksum-based resync: compare BLAKE3 digests per 4 KiB block first and transfer only
    /// the blocks that differ (default false).
    #[serde(default)]
    pub resync_checksums: Option<bool>,
    /// What a Primary without quorum does with consumer I/O: `io-error` (default) or
    /// `suspend` (multi-replica volumes only: `not_replicated` otherwise).
    #[serde(default)]
    pub on_no_quorum: Option<OnNoQuorum>,
}

/// Body of `PATCH /v1/volumes/{name}`: options changeable while the volume runs. Absent
/// fields stay as they are.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeUpdate {
    /// Resync rate limit, bytes per second; 0 = unlimited. Takes effect at once, also for a
    /// resync that is running.
    #[serde(default)]
    pub resync_rate_bytes_per_sec: Option<u64>,
    /// The dynamic resync controller's floor, bytes per second: while the consumer does I/O
    /// the resync runs at most this fast (default 16 MiB/s; 0: never yield).
    #[serde(default)]
    pub resync_min_rate_bytes_per_sec: Option<u64>,
    /// Automatic split-brain policy: `disconnect`, `discard-zero-changes`,
    /// `discard-younger-primary`,
    /// `discard-node:NODE`; applies from the next handshake.
    #[serde(default)]
    pub after_split_brain: Option<String>,
    /// Checksum-based resync on or off; applies at once.
    #[serde(default)]
    pub resync_checksums: Option<bool>,
    /// Open (`true`) or close (`false`) the dual-primary window for live migration: while
    /// it is open a second node may be Primary (`volume promote` of another node, or a
    /// consumer opening its export) and the two hand a write token back and forth. Protocol
    /// C only (`protocol_a` otherwise); closing is refused while two nodes are Primary
    /// (`two_primaries`).
    #[serde(default)]
    pub allow_two_primaries: Option<bool>,
    /// What a Primary without quorum does with consumer I/O: `io-error` (fail it) or
    /// `suspend` (hold it until quorum is back); applies at once. `suspend` is refused on a
    /// single-replica volume (`not_replicated`). Back to `io-error`, requests held now fail.
    #[serde(default)]
    pub on_no_quorum: Option<OnNoQuorum>,
}

/// Body of `POST /v1/volumes/{name}/resize`: the new size of every replica (online). The
/// call returns once the controller recorded it (a `resize` operation); the resize is done
/// when every diskful replica reports `size_bytes` equal to the new size.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeResize {
    /// New size in bytes: a multiple of 512, at most the maximum volume size.
    pub size_bytes: u64,
    /// Allow a size smaller than the current one (data past the new end is lost).
    #[serde(default)]
    pub allow_shrink: bool,
}

/// `POST /v1/volumes/{name}/move`: move one replica (or the witness) to another node, online.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeMove {
    /// The node whose replica (or witness) moves.
    pub from_node: String,
    /// Its pool, when given (must match).
    #[serde(default)]
    pub from_pool: Option<String>,
    /// The node that gets it (online, not holding the volume; a diskful node for a replica).
    pub to_node: String,
    /// The pool there (default: the one with most free space that fits).
    #[serde(default)]
    pub to_pool: Option<String>,
}

/// `POST /v1/volumes/{name}/replicas`: add one diskful replica to a volume, online.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicaAdd {
    /// The node that gets it (default: the online diskful node with most free space that does
    /// not hold the volume; else the node holding its witness, which becomes a replica).
    #[serde(default)]
    pub node: Option<String>,
    /// The pool there (default: the one with most free space that fits).
    #[serde(default)]
    pub pool: Option<String>,
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
    /// Why this replica's disk is `Failed`: the I/O error of its backing store that detached
    /// it (the volume keeps serving from its peers); `null` when none.
    #[serde(default)]
    pub disk_error: Option<String>,
    /// Replication state towards peers (`StandAlone` while the volume has one replica).
    pub repl_state: String,
    pub out_of_sync_bytes: u64,
    /// Measured rate of the resync running into this replica (0 when none runs).
    pub resync_bytes_per_sec: u64,
    /// The resync into this replica currently yields to consumer I/O (held at the volume's
    /// `resync_min_rate_bytes_per_sec`).
    #[serde(default)]
    pub resync_yielding: bool,
    /// Bytes the most recent resync into this replica transferred.
    pub last_resync_bytes: u64,
    /// Size of this replica as its agent reports it (the committed size of its backing
    /// store; a witness reports the volume's desired size); 0 while not reported. A resize
    /// is complete when every replica reports the volume's `size_bytes`.
    #[serde(default)]
    pub size_bytes: u64,
    /// Size new NBD connections to this replica's export see (replicated volumes: the
    /// smallest size of the connected diskful replicas); `null` when not exported here.
    #[serde(default)]
    pub export_size_bytes: Option<u64>,
    /// Bytes allocated in the backing store (sparse files: less than the size).
    pub allocated_bytes: u64,
    /// Consumers connected to this replica's export right now.
    pub connections: u32,
    /// Replication towards each peer, as the agent's replication driver reports it (empty
    /// until the agent drives replication).
    #[serde(default)]
    pub peers: Vec<PeerReplState>,
    /// Whether this replica's node sees a quorum of the volume's voters, as its replication
    /// driver reports it; `null` when not reported.
    #[serde(default)]
    pub quorum: Option<bool>,
    /// Why the replication engine refuses the role the controller asks for (e.g.
    /// "promotion refused: no quorum"), as the agent reports it; `null` when none.
    #[serde(default)]
    pub role_error: Option<String>,
    /// Bytes still to copy into this replica by the running resync (`null`: none runs).
    #[serde(default)]
    pub resync_bytes_left: Option<u64>,
    /// Estimated seconds until that resync ends at the current rate (`null`: unknown).
    #[serde(default)]
    pub resync_eta_secs: Option<u64>,
    /// The online verify this replica's node runs (or ran last) as verify source; `null`
    /// when none.
    #[serde(default)]
    pub verify: Option<VerifyReport>,
    /// Split brains this replica found with its peers (until settled).
    #[serde(default)]
    pub split_brain: Vec<SplitBrainReport>,
    /// Bytes the most recent checksum-based resync into this replica found identical and did
    /// not transfer.
    #[serde(default)]
    pub last_resync_skipped_bytes: u64,
    /// Who the `connections` are, as the agent sees them: `pid N (command)` for unix socket
    /// clients, `host:port` for TCP ones.
    #[serde(default)]
    pub clients: Vec<String>,
    /// The dual-primary window is open on this node's replication engine (the agent applied
    /// the volume's `allow_two_primaries`).
    #[serde(default)]
    pub allow_two_primaries: bool,
    /// This replica's node is one of the two Primaries of the volume's dual-primary window;
    /// this is the other one (`null`: not in a dual-primary pair). `role` shows `Primary` for
    /// both.
    #[serde(default)]
    pub dual_primary_partner: Option<String>,
    /// This node holds the dual-primary window's write token (it is the one writing now);
    /// false outside a dual-primary pair.
    #[serde(default)]
    pub write_token: bool,
    /// The on-no-quorum policy this node's replication engine applies (the agent applied
    /// the volume's `on_no_quorum`); `null` when not reported (no replication driver).
    #[serde(default)]
    pub on_no_quorum: Option<OnNoQuorum>,
    /// Consumer requests this node holds for quorum (`on_no_quorum` `suspend`, a Primary
    /// without quorum): its consumers' I/O is suspended while this is above 0.
    #[serde(default)]
    pub suspended_requests: u64,
}

/// A split brain between a replica and one peer, as the replica's node reports it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct SplitBrainReport {
    /// The peer's node name.
    pub peer: String,
    /// The handshake rule that found it (e.g. `SplitBrainSameBitmap`).
    pub rule: String,
    /// Bytes this replica's node wrote since the split (its out-of-sync bits toward the peer).
    pub our_bytes: u64,
    /// Bytes the peer wrote since the split.
    pub peer_bytes: u64,
    /// How it is being resolved (policy or manual resolution); `null`: disconnected, waiting
    /// for `volume resolve-split-brain`.
    #[serde(default)]
    pub resolution: Option<String>,
}

/// Body of `POST /v1/volumes/{name}/resolve-split-brain`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ResolveSplitBrain {
    /// The node whose changes since the split are discarded (it becomes sync target).
    pub discard: String,
}

/// A split-brain resolution the controller asks an agent to carry out.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct DesiredResolve {
    /// Unique id (an agent acts on each id once).
    pub id: String,
    /// This node is the victim: discard its changes since the split.
    pub discard: bool,
}

/// Body of `POST /v1/volumes/{name}/verify`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// When the verify is done, resync the differing blocks from the verify source (the
    /// Primary, else an UpToDate replica) to the replicas that differ. Without it they stay
    /// marked out of sync (`out_of_sync_bytes`) until the next reconnect resyncs them.
    #[serde(default)]
    pub resync: bool,
}

/// A byte range of a volume.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

/// An online verify as its source node reports it: progress while it runs, the result after.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct VerifyReport {
    /// The id of the `verify` operation it belongs to.
    pub id: String,
    /// The verify source (its replica is compared with the others).
    pub node: String,
    /// `running`, `done` (compared the whole volume), `failed` (refused or ended early; see
    /// `error`).
    pub state: String,
    /// Whether differing blocks are resynced when it is done.
    #[serde(default)]
    pub resync: bool,
    /// Nodes compared with.
    #[serde(default)]
    pub peers: Vec<String>,
    /// The volume size.
    pub total_bytes: u64,
    /// Bytes compared so far (with every peer still in the run).
    pub checked_bytes: u64,
    /// Bytes found different on at least one peer (4 KiB blocks).
    pub different_bytes: u64,
    /// The first differing byte ranges (merged, at most 32).
    #[serde(default)]
    pub ranges: Vec<ByteRange>,
    /// More differing ranges exist than `ranges` lists.
    #[serde(default)]
    pub ranges_truncated: bool,
    /// Nodes a resync of the differences was started toward.
    #[serde(default)]
    pub resync_started: Vec<String>,
    /// Compare rate, bytes per second.
    #[serde(default)]
    pub bytes_per_sec: u64,
    /// Estimated seconds until done (`null` when unknown or finished).
    #[serde(default)]
    pub eta_secs: Option<u64>,
    #[serde(default)]
    pub error: Option<String>,
    /// When the verify started / finished (unix seconds).
    #[serde(default)]
    pub started_unix: u64,
    #[serde(default)]
    pub finished_unix: Option<u64>,
}

/// A verify the controller asks the agent of the verify source to run.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct DesiredVerify {
    /// The `verify` operation's id (an agent runs each id once).
    pub id: String,
    pub resync: bool,
}

/// Replication state of one replica towards one peer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct PeerReplState {
    /// The peer's node name.
    pub node: String,
    /// DRBD-style replication state, e.g. `Established`, `Connecting`, `SyncSource`,
    /// `SyncTarget`, `StandAlone`.
    pub repl_state: String,
    /// Bytes this replica knows to be out of sync with that peer.
    #[serde(default)]
    pub out_of_sync_bytes: u64,
}

/// A multi-step change in progress or recently finished (`create`, `delete`, `adopt`).
///
/// Persisted in the controller's store with its volume: a restarted controller resumes it.
/// Fields after `last_error` were added later and default when absent.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Operation {
    /// `create`, `delete`, `adopt` (a volume learnt from an agent's report).
    pub kind: String,
    /// `pending`, `running`, `retrying` (the last attempt failed; the next one is scheduled
    /// at `next_retry_unix`), `done`, `failed` (given up; see `last_error`).
    pub state: String,
    /// 0.0 to 1.0 (the share of steps done).
    pub progress: f64,
    pub last_error: Option<String>,
    /// Unique id of the operation.
    #[serde(default)]
    pub id: String,
    /// The steps, in order.
    #[serde(default)]
    pub steps: Vec<OperationStep>,
    /// Attempts made so far (the first one included).
    #[serde(default)]
    pub attempts: u32,
    /// When the operation started (unix seconds).
    #[serde(default)]
    pub started_unix: u64,
    /// When the current (or last) attempt started (unix seconds).
    #[serde(default)]
    pub last_attempt_unix: Option<u64>,
    /// When the controller will retry (state `retrying`), unix seconds.
    #[serde(default)]
    pub next_retry_unix: Option<u64>,
    /// When the operation reached `done` or `failed` (unix seconds).
    #[serde(default)]
    pub finished_unix: Option<u64>,
    /// Estimated seconds until done, where the controller can tell (long copies); `null`
    /// when unknown.
    #[serde(default)]
    pub eta_secs: Option<u64>,
    /// The most recent failed attempts, oldest first (bounded).
    #[serde(default)]
    pub retry_history: Vec<AttemptRecord>,
}

/// One step of an [`Operation`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct OperationStep {
    /// What the step does, e.g. `create replica on node1:default`.
    pub name: String,
    /// Node the step waits for, if any.
    #[serde(default)]
    pub node: Option<String>,
    /// `pending`, `running`, `done`, `failed`.
    pub state: String,
    #[serde(default)]
    pub last_error: Option<String>,
}

/// A failed attempt of an [`Operation`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct AttemptRecord {
    /// Attempt number (1 = the first attempt).
    pub attempt: u32,
    /// When it failed (unix seconds).
    pub failed_unix: u64,
    pub error: String,
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
    /// The node the controller wants Primary (multi-replica volumes; `null`: none, e.g.
    /// after `volume demote`). Each replica's `role` is what its agent reports.
    #[serde(default)]
    pub primary_node: Option<String>,
    /// Resync rate limit, bytes per second (0: unlimited); `volume set --resync-rate`.
    #[serde(default)]
    pub resync_rate_bytes_per_sec: u64,
    /// The dynamic resync controller's floor, bytes per second: the resync rate while the
    /// consumer does I/O (0: never yield); `volume set --resync-min-rate`.
    #[serde(default = "default_resync_min_rate")]
    pub resync_min_rate_bytes_per_sec: u64,
    /// The result of the last finished online verify (`volume verify`); `null` before the
    /// first one.
    #[serde(default)]
    pub last_verify: Option<VerifyReport>,
    /// Automatic split-brain policy: `disconnect`, `discard-zero-changes`,
    /// `discard-younger-primary`,
    /// `discard-node:NODE`.
    #[serde(default = "default_split_brain")]
    pub after_split_brain: String,
    /// Checksum-based resync (`volume set --resync-checksums`).
    #[serde(default)]
    pub resync_checksums: bool,
    /// The dual-primary window is open (`volume set --allow-two-primaries on`): a second
    /// node may be Primary, for live migration.
    #[serde(default)]
    pub allow_two_primaries: bool,
    /// The second node the controller wants Primary inside the dual-primary window (`volume
    /// promote` of another node while `primary_node` is Primary and the window is open);
    /// `null`: none.
    #[serde(default)]
    pub second_primary_node: Option<String>,
    /// What a Primary without quorum does with consumer I/O: `io-error` (the default) or
    /// `suspend` (`volume set --on-no-quorum`).
    #[serde(default)]
    pub on_no_quorum: OnNoQuorum,
}

fn default_split_brain() -> String {
    "disconnect".into()
}

/// Body of `POST /v1/volumes/{name}/promote` and `POST /v1/volumes/{name}/demote`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RoleChange {
    /// The node whose replica changes role.
    pub node: String,
    /// Go ahead although consumers have the volume open on the node losing the Primary role
    /// (their further I/O fails there).
    #[serde(default)]
    pub force: bool,
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
    /// What the controller could not reconcile with the agents' reports (see
    /// `GET /v1/reconcile`).
    #[serde(default)]
    pub issues: Vec<ReconcileIssue>,
}

/// Something an agent reports that the controller cannot reconcile with its desired state,
/// e.g. two nodes claiming one volume name with different uuids. Recomputed from every
/// report: an issue disappears once its cause is gone.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq, PartialOrd, Ord)]
pub struct ReconcileIssue {
    /// Node whose report shows the problem.
    pub node: String,
    /// Volume concerned, if any.
    pub volume: Option<String>,
    /// Stable code: `foreign_cluster`, `uuid_mismatch`, `size_mismatch`, `extra_replica`,
    /// `unreadable_replica`.
    pub code: String,
    pub message: String,
}

/// `GET /v1/reconcile`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct ReconcileReport {
    pub cluster_id: String,
    pub issues: Vec<ReconcileIssue>,
}

// ---------------------------------------------------------------------------------------------
// State export / import: `GET /v1/state`, `POST /v1/state`.
// ---------------------------------------------------------------------------------------------

/// The only `format_version` of [`StateDocument`] this release reads and writes.
pub const STATE_FORMAT_VERSION: u32 = 1;

/// The controller's whole desired state (no live data): `GET /v1/state` returns it,
/// `POST /v1/state` imports it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StateDocument {
    /// Version of this document's format; must be [`STATE_FORMAT_VERSION`] (1).
    pub format_version: u32,
    pub cluster_id: String,
    /// When the document was exported (unix seconds; informational).
    #[serde(default)]
    pub exported_unix: u64,
    /// Version of the controller that exported it (informational).
    #[serde(default)]
    pub controller_version: String,
    pub nodes: Vec<NodeSpec>,
    pub volumes: Vec<VolumeSpec>,
}

/// A node in a [`StateDocument`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    pub address: String,
    pub role: NodeRole,
    /// The node's id (kept by an import; absent in older documents: assigned on import).
    #[serde(default)]
    pub node_id: Option<u8>,
}

/// Where one replica of a volume lives, in a [`StateDocument`].
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlacementSpec {
    pub node: String,
    pub pool: String,
    pub diskless: bool,
}

/// A volume in a [`StateDocument`]: identity, size, options, placement and operations.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VolumeSpec {
    pub name: String,
    pub uuid: String,
    pub size_bytes: u64,
    pub protocol: Protocol,
    pub replica_count: u32,
    pub state: VolumeState,
    pub placements: Vec<PlacementSpec>,
    #[serde(default)]
    pub operations: Vec<Operation>,
    #[serde(default)]
    pub created_unix: u64,
    /// The node chosen Primary by `volume promote` / `volume demote` (`primary_explicit`
    /// true; `null` then means: no Primary). Without `primary_explicit` the first diskful
    /// placement of a multi-replica volume is its Primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_node: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub primary_explicit: bool,
    /// Resync rate limit, bytes per second (0: unlimited).
    #[serde(default)]
    pub resync_rate_bytes_per_sec: u64,
    /// The dynamic resync controller's floor, bytes per second: the resync rate while the
    /// consumer does I/O (0: never yield); `volume set --resync-min-rate`.
    #[serde(default = "default_resync_min_rate")]
    pub resync_min_rate_bytes_per_sec: u64,
    /// Split-brain policy (absent: `disconnect`).
    #[serde(default = "default_split_brain", skip_serializing_if = "is_disconnect")]
    pub after_split_brain: String,
    /// Checksum-based resync (absent: off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resync_checksums: bool,
    /// The dual-primary window is open (absent: closed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_two_primaries: bool,
    /// The second Primary inside the dual-primary window (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub second_primary_node: Option<String>,
    /// The on-no-quorum policy (absent: `io-error`).
    #[serde(default, skip_serializing_if = "OnNoQuorum::is_default")]
    pub on_no_quorum: OnNoQuorum,
}

fn is_disconnect(s: &String) -> bool {
    s == "disconnect"
}

/// Answer of `POST /v1/state`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct StateImportResult {
    /// The controller's cluster id after the import (the document's).
    pub cluster_id: String,
    /// Volumes written from the document.
    pub volumes_imported: u32,
    /// Volumes the store already held identically (same uuid, size and placement); the
    /// document's copy (options, operations) replaced them.
    pub volumes_matched: u32,
    /// Nodes registered from the document (nodes already known keep their live record).
    pub nodes_imported: u32,
    /// Whether the import replaced a non-empty store (`replace=true`).
    pub replaced: bool,
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
    /// Size of the export new NBD connections see (`null`: not exported here).
    #[serde(default)]
    pub export_size_bytes: Option<u64>,
    pub allocated_bytes: u64,
    pub role: Role,
    pub disk_state: DiskState,
    /// Why the disk is `Failed` (the backing store's I/O error that detached it); `null`
    /// when none.
    #[serde(default)]
    pub disk_error: Option<String>,
    pub connections: u32,
    /// Last error applying the desired state to this replica, if any.
    pub last_error: Option<String>,
    /// `false` when nothing is on disk: the controller asked for this replica and creating
    /// it failed (`last_error` says why). Only replicas on disk are adopted by a controller
    /// rebuilding its state.
    #[serde(default = "default_true")]
    pub on_disk: bool,
    /// A diskless placement (witness or diskless client): no files, `pool` is empty,
    /// `disk_state` is `Diskless`.
    #[serde(default)]
    pub diskless: bool,
    /// Replication towards each peer (filled by the replication driver; empty before).
    #[serde(default)]
    pub peers: Vec<PeerReplState>,
    /// Bytes out of sync with any peer (filled by the replication driver).
    #[serde(default)]
    pub out_of_sync_bytes: u64,
    /// Measured rate of the resync running into this replica, bytes per second (0 when
    /// none runs).
    #[serde(default)]
    pub resync_bytes_per_sec: u64,
    /// The resync into this replica currently yields to consumer I/O (held at the volume's
    /// `resync_min_rate_bytes_per_sec`).
    #[serde(default)]
    pub resync_yielding: bool,
    /// Bytes the most recent resync into this replica transferred.
    #[serde(default)]
    pub last_resync_bytes: u64,
    /// Whether this node sees a quorum of the volume's voters; `null` until the replication
    /// driver reports it.
    #[serde(default)]
    pub quorum: Option<bool>,
    /// Why the replication engine refuses the role the controller asks for; `null` when
    /// none.
    #[serde(default)]
    pub role_error: Option<String>,
    /// Bytes still to copy into this replica by the running resync (`null`: none runs).
    #[serde(default)]
    pub resync_bytes_left: Option<u64>,
    /// Estimated seconds until that resync ends at the current rate (`null`: unknown).
    #[serde(default)]
    pub resync_eta_secs: Option<u64>,
    /// The online verify this node runs or ran last as verify source (`null`: none since the
    /// agent started).
    #[serde(default)]
    pub verify: Option<VerifyReport>,
    /// Split brains found with peers (until settled).
    #[serde(default)]
    pub split_brain: Vec<SplitBrainReport>,
    /// This node discards its changes at its next split-brain handshake (a resolution in
    /// progress).
    #[serde(default)]
    pub discard_pending: bool,
    /// Bytes the most recent checksum-based resync into this replica skipped (identical).
    #[serde(default)]
    pub last_resync_skipped_bytes: u64,
    /// Who is connected to the export (`pid N (command)` / `host:port`), one per connection.
    #[serde(default)]
    pub clients: Vec<String>,
    /// The replication engine's dual-primary window is open here.
    #[serde(default)]
    pub allow_two_primaries: bool,
    /// This node is one of the two Primaries of a dual-primary window (then `role` is
    /// `Primary`); the other one's node name. `null`: not in a dual-primary pair.
    #[serde(default)]
    pub dual_primary_partner: Option<String>,
    /// This node holds the dual-primary window's write token.
    #[serde(default)]
    pub write_token: bool,
    /// The on-no-quorum policy the replication engine applies here; `null`: no replication
    /// driver.
    #[serde(default)]
    pub on_no_quorum: Option<OnNoQuorum>,
    /// Consumer requests held for quorum (`suspend`): I/O is suspended while above 0.
    #[serde(default)]
    pub suspended_requests: u64,
}

fn default_true() -> bool {
    true
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
    /// Cluster the agent is bound to (remembered from the first controller it joined, or
    /// read from its replicas' metadata); `null` for an agent that never joined one. A
    /// controller whose store is empty adopts it, so a controller rebuilt on an empty store
    /// keeps the cluster's identity.
    #[serde(default)]
    pub cluster_id: Option<String>,
    /// `host:port` the agent accepts replication links from peers on (`null`: an agent that
    /// does not listen for replication).
    #[serde(default)]
    pub repl_addr: Option<String>,
}

/// One replica the controller wants on the agent's node.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DesiredReplica {
    pub volume: String,
    pub volume_uuid: String,
    /// Pool holding the replica's files; empty for a diskless placement.
    pub pool: String,
    pub size_bytes: u64,
    /// `false`: delete this replica (volume `volume_uuid`) if it exists.
    pub present: bool,
    /// A diskless placement (witness): no files; the node votes for quorum.
    #[serde(default)]
    pub diskless: bool,
    #[serde(default)]
    pub protocol: Protocol,
    /// This node's id (the same as [`DesiredState::node_id`]).
    #[serde(default)]
    pub node_id: Option<u8>,
    /// Every other placement of the volume.
    #[serde(default)]
    pub peers: Vec<DesiredPeer>,
    /// This placement should be the volume's Primary (`volume promote`; at creation the
    /// first diskful placement); the agent promotes it once the replication engine allows it
    /// and demotes a Primary not marked so.
    #[serde(default)]
    pub primary: bool,
    /// `primary` was set by `volume promote --force`: an Outdated replica is declared
    /// UpToDate to become Primary (the writes it missed are lost).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force_primary: bool,
    /// Resync rate limit, bytes per second (0: unlimited); applied to a running driver.
    #[serde(default)]
    pub resync_rate_bytes_per_sec: u64,
    /// The dynamic resync controller's floor, bytes per second: the resync rate while the
    /// consumer does I/O (0: never yield); `volume set --resync-min-rate`.
    #[serde(default = "default_resync_min_rate")]
    pub resync_min_rate_bytes_per_sec: u64,
    /// A replica added to an existing volume: create it without data (Inconsistent, no
    /// generation), so it receives a full resync instead of counting as in sync.
    #[serde(default)]
    pub join: bool,
    /// Run this online verify from this replica (once per id); `null`: none wanted.
    #[serde(default)]
    pub verify: Option<DesiredVerify>,
    /// The volume's split-brain policy: `disconnect`, `discard-zero-changes`,
    /// `discard-younger-primary`,
    /// `discard-node:NODE` (a node name).
    #[serde(default = "default_split_brain")]
    pub after_split_brain: String,
    /// A split-brain resolution to carry out (once per id).
    #[serde(default)]
    pub resolve_split_brain: Option<DesiredResolve>,
    /// Checksum-based resync.
    #[serde(default)]
    pub resync_checksums: bool,
    /// The volume's dual-primary window is open (`volume set --allow-two-primaries`); the
    /// agent opens or closes it on its replication engine (closing is retried while this
    /// node is one of two Primaries).
    #[serde(default)]
    pub allow_two_primaries: bool,
    /// The volume's on-no-quorum policy; the agent applies it to its replication engine at
    /// once (no restart).
    #[serde(default)]
    pub on_no_quorum: OnNoQuorum,
}

/// Answer of `POST /v1/nodes/{name}/lost`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct NodeLostResult {
    pub node: String,
    /// Every volume that had a replica or witness there, with what was done for it.
    pub volumes: Vec<NodeLostVolume>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct NodeLostVolume {
    pub volume: String,
    /// E.g. "new replica on node4:default", "new witness on node3", "Primary moves to node2".
    pub actions: Vec<String>,
}

/// Another placement of a volume, as the agents of its replicas must know it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct DesiredPeer {
    pub node: String,
    pub node_id: u8,
    /// `host:port` of the peer's replication listener (`null` until that agent reported one).
    #[serde(default)]
    pub repl_addr: Option<String>,
    #[serde(default)]
    pub diskless: bool,
}

/// Response of `POST /v1/agents/{node}/sync`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct DesiredState {
    pub cluster_id: String,
    pub revision: u64,
    pub replicas: Vec<DesiredReplica>,
    /// This node's id in the cluster (`null` from a controller that assigns none).
    #[serde(default)]
    pub node_id: Option<u8>,
    /// The cluster secret (64 hex digits) replication links authenticate with. Sent over the
    /// loopback-only REST API; the agent keeps it in `state_dir/cluster_secret` (mode 0600).
    #[serde(default)]
    pub cluster_secret: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Grow journal (`tandem volume grow`): kept by the controller so that an interrupted grow can be
// resumed or undone after the CLI, the controller or an agent died.
// ---------------------------------------------------------------------------------------------

/// `GET/PUT/DELETE /v1/volumes/{name}/grow`: the journal of a `volume grow` in progress. The CLI
/// drives the grow and writes this record before it touches the partition table; the
/// controller only stores it (it is deleted when the grow finished or was undone).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GrowJournal {
    /// The volume (must equal the path's name).
    pub volume: String,
    /// Uuid of the volume when the grow started (the controller refuses another).
    pub volume_uuid: String,
    /// Size the grow goes to (bytes).
    pub target_bytes: u64,
    /// Size of the volume when the grow started (bytes).
    pub start_bytes: u64,
    /// `gpt`, `mbr` or `none`.
    pub table: String,
    /// Partition holding the filesystem (`null`: the whole volume).
    #[serde(default)]
    pub partition: Option<u32>,
    /// Byte offset of the filesystem on the volume.
    pub fs_offset_bytes: u64,
    /// `ext2`, `ext3`, `ext4`, `xfs` or `unknown`.
    pub filesystem: String,
    /// Bytes of the partition (or volume) that held the filesystem before the grow: undoing
    /// the table is refused once the filesystem is larger than this.
    pub old_partition_bytes: u64,
    /// Steps finished, in order: `block`, `partition`, `fsck`, `filesystem`.
    #[serde(default)]
    pub steps_done: Vec<String>,
    /// The partition-table undo record (`tandem_grow::UndoRecord` as JSON), written before
    /// the first byte of the table changes; `null` until then.
    #[serde(default)]
    pub undo: Option<String>,
    /// Why the last attempt stopped, if it failed.
    #[serde(default)]
    pub last_error: Option<String>,
    /// When the grow started and when the journal was last written (unix seconds).
    pub started_unix: u64,
    pub updated_unix: u64,
}

/// Default floor of the dynamic resync controller: 16 MiB/s.
pub const DEFAULT_RESYNC_MIN_RATE: u64 = 16 << 20;

/// Serde default of `resync_min_rate_bytes_per_sec`.
pub fn default_resync_min_rate() -> u64 {
    DEFAULT_RESYNC_MIN_RATE
}

//! The controller's model: records in the state store, their views as API objects, and the
//! state transitions (volume create/delete, agent sync).
//!
//! Store layout (values are JSON):
//!
//! | key                | value                                                          |
//! |--------------------|----------------------------------------------------------------|
//! | `cluster/id`       | the cluster id (a JSON string), generated once                 |
//! | `cluster/secret`   | the cluster secret (64 hex digits, a JSON string), generated once |
//! | `nodes/<node>`     | [`NodeRecord`]: what the node's agent last reported            |
//! | `volumes/<volume>` | [`VolumeRecord`]: the desired volume, its placement, operations |
//! | `desired/<node>`   | marker: its modification revision is the node's desired revision |
//!
//! The desired state of a node is computed from the volume records; every change to it writes
//! the node's `desired/` marker in the same transaction, so the marker's revision (the store
//! revision of that transaction) is the revision the agent must reach (`applied_revision`).
//!
//! All writes happen under one write lock and use compare-and-swap on the records' revisions,
//! so the logic stays correct when a second controller shares an etcd store later.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tandem_api::{
    AgentReport, ClusterStatus, ConnectInfo, DesiredPeer, DesiredReplica, DesiredState, DiskState,
    Node, NodeAdd, NodeLostResult, NodeLostVolume, NodeRole, NodeState, OnNoQuorum, Operation,
    Pool, PoolReport, Protocol, ReconcileIssue, ReconcileReport, Replica, ReplicaAdd,
    ReplicaReport, Role, Volume, VolumeCreate, VolumeMove, VolumeResize, VolumeState, VolumeUpdate,
};
use tandem_store::{Expect, StateStore, TxnOp};
use tandem_types::{format_size, validate_name};
use tokio::sync::watch;

use crate::error::Failure;
use crate::ops;

mod split_brain;
mod verify;
pub use split_brain::ResolveRecord;
pub use verify::VerifyRecord;

pub(crate) const CLUSTER_ID_KEY: &str = "cluster/id";
pub(crate) const CLUSTER_SECRET_KEY: &str = "cluster/secret";
/// Largest node id the controller assigns: replica metadata (`tandem_meta`) holds node
/// ids 0..=31 only, so a 33rd node is refused with `no_node_id`.
pub const MAX_NODE_ID: u8 = 31;
/// Most replicas (diskful) a volume may have.
pub const MAX_REPLICAS: u32 = 3;
pub(crate) const NODES: &str = "nodes/";
pub(crate) const VOLUMES: &str = "volumes/";
pub(crate) const DESIRED: &str = "desired/";

/// Sizes must be a multiple of this (the NBD block size every client handles).
pub const SIZE_ALIGN: u64 = 512;
/// Largest volume accepted: file offsets are signed 64-bit on every node.
pub const MAX_VOLUME_SIZE: u64 = 1 << 62;

/// What the agent of a node last reported (persisted so a restarted controller still knows
/// pools and replica states until the agent syncs again).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    pub name: String,
    pub address: String,
    pub role: NodeRole,
    pub agent_version: String,
    pub nbd_socket: Option<String>,
    pub nbd_tcp: Option<String>,
    pub pools: Vec<PoolReport>,
    pub replicas: Vec<ReplicaReport>,
    /// Last time this record was written (unix seconds); seeds `last_seen` after a restart.
    pub last_seen_unix: u64,
    /// Assigned at first registration (records of older versions get one when the
    /// controller opens the store); never changes and is never reused while the node exists.
    #[serde(default)]
    pub node_id: Option<u8>,
    /// Replication listen address the agent last reported.
    #[serde(default)]
    pub repl_addr: Option<String>,
    /// Declared with `node add` (address and role are the operator's): an agent registering
    /// under this name must report the same address; its reported role is not taken.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub added: bool,
}

/// A node address for `node add`: a host name or IP address, no port, no spaces.
fn validate_address(a: &str) -> Result<(), Failure> {
    let ok = !a.is_empty()
        && a.len() <= 253
        && (a.parse::<std::net::IpAddr>().is_ok()
            || a.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !l.starts_with('-')
                    && !l.ends_with('-')
            }));
    if ok {
        Ok(())
    } else {
        Err(Failure::bad_request(
            "invalid_address",
            format!("'{a}' is not a host name or IP address (no port)"),
        ))
    }
}

/// The lowest node id not in `used`.
pub(crate) fn free_node_id(used: &std::collections::BTreeSet<u8>) -> Result<u8, Failure> {
    (0..=MAX_NODE_ID)
        .find(|i| !used.contains(i))
        .ok_or_else(|| {
            Failure::conflict(
                "no_node_id",
                format!(
                    "every node id 0..={MAX_NODE_ID} is taken; remove a node before adding another"
                ),
            )
        })
}

/// 32 random bytes from the operating system, as 64 hex digits.
fn generate_secret() -> Result<String, Failure> {
    use std::io::Read;
    let mut b = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| Failure::internal(format!("no randomness for the cluster secret: {e}")))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl NodeRecord {
    fn same_report(&self, other: &NodeRecord) -> bool {
        NodeRecord {
            last_seen_unix: 0,
            ..self.clone()
        } == NodeRecord {
            last_seen_unix: 0,
            ..other.clone()
        }
    }

    fn replica(&self, volume: &str, uuid: &str) -> Option<&ReplicaReport> {
        self.replicas
            .iter()
            .find(|r| r.volume == volume && r.volume_uuid == uuid)
    }
}

/// Where one replica of a volume lives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Placement {
    pub node: String,
    pub pool: String,
    pub diskless: bool,
    /// A replica added to an existing volume (`node lost`): its agent creates it without data
    /// (Inconsistent, no generation) and it receives a full resync from its peers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub join: bool,
    /// Being moved off its node (`node evacuate`): still a full member until the replicas
    /// replacing it are in sync, then it moves to [`VolumeRecord::removing`].
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeRecord {
    pub name: String,
    pub uuid: String,
    pub size_bytes: u64,
    pub protocol: Protocol,
    pub replica_count: u32,
    pub state: VolumeState,
    pub placements: Vec<Placement>,
    pub operations: Vec<Operation>,
    pub created_unix: u64,
    /// The node that should be Primary (multi-replica volumes), set by `volume promote` /
    /// `volume demote` (`primary_explicit`). Records written before those commands existed
    /// have `primary_explicit == false`: the first diskful placement is the Primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_node: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub primary_explicit: bool,
    /// The node named by the last `volume promote --force` (its agent may declare an Outdated
    /// replica UpToDate to become Primary); only while it is still the desired Primary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_forced: Option<String>,
    /// Resync rate limit, bytes per second (0: unlimited).
    #[serde(default)]
    pub resync_rate: u64,
    /// The dynamic resync controller's floor, bytes per second (0: never yield).
    #[serde(default = "tandem_api::default_resync_min_rate")]
    pub resync_min_rate: u64,
    /// Former placements (evacuated) whose replica or witness their node must delete; no
    /// longer members (no peer lists name them). Dropped once their node reports it gone.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removing: Vec<Placement>,
    /// The verify its source's agent should run (`volume verify`), while it runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_request: Option<VerifyRecord>,
    /// The result of the last finished verify.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verify: Option<tandem_api::VerifyReport>,
    /// Split-brain policy (`disconnect`, `discard-zero-changes`, `discard-node:NODE`).
    #[serde(default = "default_split_brain")]
    pub after_split_brain: String,
    /// The latest manual split-brain resolution.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolve: Option<ResolveRecord>,
    /// Checksum-based resync.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub resync_checksums: bool,
    /// The dual-primary window is open (`volume set --allow-two-primaries on`; live
    /// migration): a second node may be Primary besides `primary_node`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_two_primaries: bool,
    /// The second node wanted Primary inside the dual-primary window (`volume promote` of
    /// another node while the window is open and `primary_node` is Primary). Only set while
    /// the window is open (closing is refused while it is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub second_primary: Option<String>,
    /// What a Primary without quorum does with consumer I/O (`volume set --on-no-quorum`):
    /// `io-error` (the default) or `suspend`.
    #[serde(default, skip_serializing_if = "is_io_error")]
    pub on_no_quorum: OnNoQuorum,
}

fn default_split_brain() -> String {
    "disconnect".into()
}

fn is_io_error(p: &OnNoQuorum) -> bool {
    *p == OnNoQuorum::IoError
}

impl VolumeRecord {
    /// The node the controller wants Primary, if any (only volumes with several placements
    /// have one).
    pub fn desired_primary(&self) -> Option<&str> {
        if self.placements.len() < 2 {
            return None;
        }
        if self.primary_explicit {
            return self
                .primary_node
                .as_deref()
                .filter(|n| self.placements.iter().any(|p| &p.node == n));
        }
        self.placements
            .iter()
            .find(|p| !p.diskless)
            .map(|p| p.node.as_str())
    }

    /// The second node the controller wants Primary inside the dual-primary window, if any:
    /// only while the window is open, a first Primary is wanted and the node holds a
    /// placement.
    pub fn second_primary(&self) -> Option<&str> {
        if !self.allow_two_primaries {
            return None;
        }
        let first = self.desired_primary()?;
        self.second_primary
            .as_deref()
            .filter(|n| *n != first && self.placements.iter().any(|p| &p.node == n))
    }

    /// Whether the controller wants `node` Primary (the Primary, or the second one inside the
    /// dual-primary window).
    pub fn wants_primary(&self, node: &str) -> bool {
        self.desired_primary() == Some(node) || self.second_primary() == Some(node)
    }

    /// Advances the open `node-lost` / `evacuate` operations with what `node` reported
    /// (`reported`: its replica of this volume, if any; `current`: the report reflects the
    /// node's current desired state). Steps: a joining replica is done once UpToDate (its
    /// `join` mark goes), a new witness once Diskless, a Primary move once that node is
    /// Primary; when every such step of an evacuation is done, the leaving placements move to
    /// `removing` and their removal steps start, done once their node no longer reports them.
    /// Returns true when the membership changed (every node's desired state must be bumped).
    fn advance_membership(
        &mut self,
        node: &str,
        reported: Option<&ReplicaReport>,
        current: bool,
        now: u64,
    ) -> bool {
        let mut membership = false;
        let mut joined = false;
        for op in self
            .operations
            .iter_mut()
            .filter(|o| changes_members(&o.kind) && !ops::is_finished(o))
        {
            for idx in 0..op.steps.len() {
                let st = &op.steps[idx];
                if st.node.as_deref() != Some(node)
                    || st.state == ops::DONE
                    || st.state == ops::PENDING
                {
                    continue;
                }
                let name = st.name.clone();
                let done = if name.starts_with(STEP_CREATE) {
                    reported.is_some_and(|r| r.disk_state == DiskState::UpToDate)
                } else if name.starts_with(STEP_WITNESS) {
                    reported.is_some_and(|r| r.disk_state == DiskState::Diskless)
                } else if name.starts_with(STEP_PRIMARY) {
                    reported.is_some_and(|r| r.role == Role::Primary)
                } else if name.starts_with(STEP_REMOVE) {
                    placement_gone(reported, name.starts_with(STEP_REMOVE_WITNESS), current)
                } else {
                    false
                };
                if done {
                    ops::step_done(op, idx, now);
                    joined |= name.starts_with(STEP_CREATE);
                } else if let Some(err) = reported
                    .and_then(|r| r.last_error.clone().or_else(|| r.role_error.clone()))
                    .filter(|_| !name.starts_with(STEP_REMOVE))
                {
                    op.steps[idx].last_error = Some(err.clone());
                    op.last_error = Some(err);
                }
            }
        }
        if joined {
            for p in self.placements.iter_mut().filter(|p| p.node == node) {
                p.join = false;
            }
        }
        // A Primary move whose turn came (the new replica is in sync).
        let target = self
            .operations
            .iter()
            .filter(|o| moves(&o.kind) && !ops::is_finished(o))
            .flat_map(|o| o.steps.iter())
            .find(|s| s.name.starts_with(STEP_PRIMARY) && s.state == ops::RUNNING)
            .and_then(|s| s.node.clone());
        if let Some(t) = target
            && self.desired_primary() != Some(t.as_str())
        {
            self.primary_node = Some(t);
            self.primary_explicit = true;
            membership = true;
        }
        let before = self.removing.len();
        self.removing
            .retain(|p| p.node != node || !placement_gone(reported, p.diskless, current));
        membership |= before != self.removing.len();
        // An evacuation (or a replica addition) whose new members are in sync: the leaving
        // placements go.
        let leaves = |kind: &str| moves(kind) || kind == OP_ADD_REPLICA;
        let ready = self
            .operations
            .iter()
            .filter(|o| leaves(&o.kind) && !ops::is_finished(o))
            .any(|o| {
                o.steps
                    .iter()
                    .filter(|s| !s.name.starts_with(STEP_REMOVE))
                    .all(|s| s.state == ops::DONE)
            })
            && self.placements.iter().any(|p| p.leaving);
        if ready
            && self
                .desired_primary()
                .is_none_or(|p| !self.placements.iter().any(|q| q.node == p && q.leaving))
        {
            let (gone, stay): (Vec<Placement>, Vec<Placement>) =
                self.placements.drain(..).partition(|p| p.leaving);
            self.placements = stay;
            for mut p in gone {
                p.leaving = false;
                self.removing.push(p);
            }
            for op in self
                .operations
                .iter_mut()
                .filter(|o| leaves(&o.kind) && !ops::is_finished(o))
            {
                for st in op.steps.iter_mut().filter(|s| s.state == ops::PENDING) {
                    st.state = ops::RUNNING.to_string();
                }
            }
            membership = true;
        }
        membership
    }

    /// The newest unfinished operation of this kind.
    fn open_operation_mut(&mut self, kind: &str) -> Option<&mut Operation> {
        self.operations
            .iter_mut()
            .rev()
            .find(|o| o.kind == kind && !ops::is_finished(o))
    }
}

const OP_NODE_LOST: &str = "node-lost";
const OP_EVACUATE: &str = "evacuate";
const OP_MOVE: &str = "move";
const OP_ADD_REPLICA: &str = "add-replica";
const OP_REMOVE_REPLICA: &str = "remove-replica";

/// Operations that add a member and then remove a leaving one (`node evacuate`, `volume move`).
fn moves(kind: &str) -> bool {
    kind == OP_EVACUATE || kind == OP_MOVE
}

/// Operations that change a volume's members (advanced by
/// [`VolumeRecord::advance_membership`]); one at a time per volume.
fn changes_members(kind: &str) -> bool {
    moves(kind) || kind == OP_NODE_LOST || kind == OP_ADD_REPLICA || kind == OP_REMOVE_REPLICA
}

/// Whether `node`'s report (`reported`: its replica of the volume, if any) shows that a
/// placement of this kind (`diskless`: a witness) is gone from it. A node can hold the old
/// kind while it gets the new one (a witness becoming a replica, or back): the agent reports
/// a diskful replica first, so a witness is gone once a diskful replica is reported, a
/// diskful replica once only a witness (or nothing) is.
fn placement_gone(reported: Option<&ReplicaReport>, diskless: bool, current: bool) -> bool {
    current && reported.is_none_or(|r| r.diskless != diskless)
}
/// Step name prefixes of membership operations (matched by [`VolumeRecord::advance_membership`]).
const STEP_CREATE: &str = "create a replica on ";
const STEP_WITNESS: &str = "add a witness on ";
const STEP_PRIMARY: &str = "move the Primary to ";
const STEP_REMOVE: &str = "remove the ";
const STEP_REMOVE_WITNESS: &str = "remove the witness";

/// A new witness on `w` joins `v`: its placement, the step that waits for it, the note.
fn add_witness(
    v: &mut VolumeRecord,
    w: String,
    steps: &mut Vec<tandem_api::OperationStep>,
    note: &mut Vec<String>,
) {
    steps.push(ops::step(
        format!("{STEP_WITNESS}{w}"),
        Some(&w),
        ops::RUNNING,
    ));
    note.push(format!("new witness on {w}"));
    v.placements.push(Placement {
        node: w,
        pool: String::new(),
        diskless: true,
        join: false,
        leaving: false,
    });
}

#[derive(Debug, Default, Clone, Copy)]
struct Liveness {
    last_seen: Option<SystemTime>,
    /// Sync requests of this node being answered right now (long polls count as contact).
    active: u32,
    /// Its agent said it stops (`POST /v1/agents/{node}/leave`): offline at once, whatever
    /// else, until its next sync request.
    left: bool,
}

/// The controller's state and logic. Methods are synchronous (the store is); the HTTP layer
/// calls them on the blocking pool.
pub struct Controller {
    pub(crate) store: Arc<dyn StateStore>,
    /// Generated on first use, adopted from the first agent's report while the store is
    /// empty (rebuild), or taken from an imported state document.
    cluster_id: RwLock<String>,
    offline_after: Duration,
    write_lock: Mutex<()>,
    live: Mutex<HashMap<String, Liveness>>,
    /// Reconciliation issues per node, recomputed from each of its reports.
    issues: Mutex<BTreeMap<String, Vec<ReconcileIssue>>>,
    /// Bumped after every change of some node's desired state; long polls wait on it.
    desired_changed: watch::Sender<u64>,
    /// The cluster secret (hex), generated once and kept in the store.
    cluster_secret: String,
    /// Allow volumes with more than one replica before the agents drive replication.
    experimental_replication: bool,
}

pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, Failure> {
    serde_json::from_slice(value).map_err(|e| {
        tracing::error!(key, error = %e, "unreadable record in the state store");
        Failure::internal(format!(
            "record '{key}' in the state store is unreadable: {e}"
        ))
    })
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Failure> {
    serde_json::to_vec(value).map_err(|e| Failure::internal(format!("cannot encode record: {e}")))
}

pub(crate) fn validate_size(size: u64) -> Result<(), Failure> {
    if size == 0 {
        return Err(Failure::bad_request(
            "invalid_size",
            "size_bytes must be greater than 0",
        ));
    }
    if !size.is_multiple_of(SIZE_ALIGN) {
        let down = size / SIZE_ALIGN * SIZE_ALIGN;
        let up = down.saturating_add(SIZE_ALIGN);
        return Err(Failure::bad_request(
            "invalid_size",
            format!(
                "size {} is not a multiple of {SIZE_ALIGN} bytes; use {} or {}",
                format_size(size),
                format_size(down),
                format_size(up)
            ),
        ));
    }
    if size > MAX_VOLUME_SIZE {
        return Err(Failure::bad_request(
            "invalid_size",
            format!(
                "size {} is larger than the maximum {}",
                format_size(size),
                format_size(MAX_VOLUME_SIZE)
            ),
        ));
    }
    Ok(())
}

/// Percent-encodes a unix socket path for an NBD URI query value.
fn encode_query_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Controller {
    /// Opens the controller's state in `store`, generating the cluster id on first use.
    pub fn open(store: Arc<dyn StateStore>, offline_after: Duration) -> Result<Self, Failure> {
        let cluster_id = match store.get(CLUSTER_ID_KEY)? {
            Some((_, v)) => decode::<String>(CLUSTER_ID_KEY, &v)?,
            None => {
                let id = uuid::Uuid::new_v4().to_string();
                match store.put(CLUSTER_ID_KEY, &encode(&id)?, Expect::Absent) {
                    Ok(_) => id,
                    // Someone else created it first: use theirs.
                    Err(e) if e.is_conflict() => match store.get(CLUSTER_ID_KEY)? {
                        Some((_, v)) => decode::<String>(CLUSTER_ID_KEY, &v)?,
                        None => return Err(Failure::internal("cluster id vanished")),
                    },
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let cluster_secret = match store.get(CLUSTER_SECRET_KEY)? {
            Some((_, v)) => decode::<String>(CLUSTER_SECRET_KEY, &v)?,
            None => {
                let secret = generate_secret()?;
                match store.put(CLUSTER_SECRET_KEY, &encode(&secret)?, Expect::Absent) {
                    Ok(_) => secret,
                    Err(e) if e.is_conflict() => match store.get(CLUSTER_SECRET_KEY)? {
                        Some((_, v)) => decode::<String>(CLUSTER_SECRET_KEY, &v)?,
                        None => return Err(Failure::internal("cluster secret vanished")),
                    },
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let (desired_changed, _) = watch::channel(0);
        let ctl = Controller {
            store,
            cluster_id: RwLock::new(cluster_id),
            offline_after,
            write_lock: Mutex::new(()),
            live: Mutex::new(HashMap::new()),
            issues: Mutex::new(BTreeMap::new()),
            desired_changed,
            cluster_secret,
            experimental_replication: false,
        };
        ctl.assign_missing_node_ids()?;
        // Seed liveness from the persisted records so a quick restart does not show every
        // node offline.
        for n in ctl.node_records()? {
            let seen = UNIX_EPOCH + Duration::from_secs(n.last_seen_unix);
            ctl.live_lock().insert(
                n.name.clone(),
                Liveness {
                    last_seen: Some(seen),
                    active: 0,
                    left: false,
                },
            );
        }
        Ok(ctl)
    }

    /// Allows `replicas > 1` (the agents create every replica's files, but do not replicate
    /// yet). Off by default.
    pub fn with_experimental_replication(mut self, on: bool) -> Self {
        self.experimental_replication = on;
        self
    }

    /// The cluster secret (64 hex digits) handed to agents.
    pub fn cluster_secret(&self) -> &str {
        &self.cluster_secret
    }

    /// Gives every node record without a node id one (records written by older versions).
    fn assign_missing_node_ids(&self) -> Result<(), Failure> {
        let _guard = self.write_guard();
        let entries = self.store.list(NODES)?;
        let mut records: Vec<(u64, String, NodeRecord)> = Vec::new();
        for e in entries {
            records.push((e.revision, e.key.clone(), decode(&e.key, &e.value)?));
        }
        let mut used: std::collections::BTreeSet<u8> =
            records.iter().filter_map(|(_, _, r)| r.node_id).collect();
        let mut changed = false;
        for (rev, key, mut r) in records {
            if r.node_id.is_some() {
                continue;
            }
            let id = free_node_id(&used)?;
            used.insert(id);
            r.node_id = Some(id);
            tracing::info!(node = %r.name, node_id = id, "node id assigned");
            self.store.txn(vec![
                TxnOp::put(key, encode(&r)?, Expect::Revision(rev)),
                Self::bump(&r.name),
            ])?;
            changed = true;
        }
        if changed {
            self.notify();
        }
        Ok(())
    }

    pub fn cluster_id(&self) -> String {
        self.cluster_id
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the cluster id in the store and in memory (caller holds the write lock).
    pub(crate) fn set_cluster_id(&self, id: &str) -> Result<(), Failure> {
        let expect = match self.store.get(CLUSTER_ID_KEY)? {
            Some((rev, _)) => Expect::Revision(rev),
            None => Expect::Absent,
        };
        self.store
            .put(CLUSTER_ID_KEY, &encode(&id.to_string())?, expect)?;
        self.set_cluster_id_in_memory(id);
        Ok(())
    }

    pub(crate) fn set_cluster_id_in_memory(&self, id: &str) {
        *self.cluster_id.write().unwrap_or_else(|e| e.into_inner()) = id.to_string();
    }

    /// No node and no volume recorded: the controller may adopt a cluster id.
    pub(crate) fn store_is_empty(&self) -> Result<bool, Failure> {
        Ok(self.store.list(NODES)?.is_empty() && self.store.list(VOLUMES)?.is_empty())
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.desired_changed.subscribe()
    }

    pub(crate) fn notify(&self) {
        self.desired_changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub(crate) fn write_guard(&self) -> MutexGuard<'_, ()> {
        self.write_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn issues_lock(&self) -> MutexGuard<'_, BTreeMap<String, Vec<ReconcileIssue>>> {
        self.issues.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every current reconciliation issue, by node.
    pub fn issues(&self) -> Vec<ReconcileIssue> {
        self.issues_lock().values().flatten().cloned().collect()
    }

    pub fn reconcile_report(&self) -> ReconcileReport {
        ReconcileReport {
            cluster_id: self.cluster_id(),
            issues: self.issues(),
        }
    }

    fn live_lock(&self) -> MutexGuard<'_, HashMap<String, Liveness>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    // ----- reads -------------------------------------------------------------------------

    pub(crate) fn node_records(&self) -> Result<Vec<NodeRecord>, Failure> {
        self.store
            .list(NODES)?
            .iter()
            .map(|e| decode(&e.key, &e.value))
            .collect()
    }

    fn node_record(&self, name: &str) -> Result<Option<(u64, NodeRecord)>, Failure> {
        let key = format!("{NODES}{name}");
        match self.store.get(&key)? {
            Some((rev, v)) => Ok(Some((rev, decode(&key, &v)?))),
            None => Ok(None),
        }
    }

    pub(crate) fn volume_records(&self) -> Result<Vec<(u64, VolumeRecord)>, Failure> {
        self.store
            .list(VOLUMES)?
            .iter()
            .map(|e| Ok((e.revision, decode(&e.key, &e.value)?)))
            .collect()
    }

    fn volume_record(&self, name: &str) -> Result<Option<(u64, VolumeRecord)>, Failure> {
        let key = format!("{VOLUMES}{name}");
        match self.store.get(&key)? {
            Some((rev, v)) => Ok(Some((rev, decode(&key, &v)?))),
            None => Ok(None),
        }
    }

    /// The revision of a node's desired state (0 before the node ever registered).
    fn desired_revision(&self, node: &str) -> Result<u64, Failure> {
        Ok(self
            .store
            .get(&format!("{DESIRED}{node}"))?
            .map(|(rev, _)| rev)
            .unwrap_or(0))
    }

    /// A transaction op that bumps a node's desired revision.
    pub(crate) fn bump(node: &str) -> TxnOp {
        TxnOp::put(
            format!("{DESIRED}{node}"),
            node.as_bytes().to_vec(),
            Expect::Any,
        )
    }

    fn liveness(&self, node: &str) -> (NodeState, u64) {
        let l = self.live_lock().get(node).copied().unwrap_or_default();
        let since = l
            .last_seen
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .unwrap_or(Duration::ZERO);
        let online =
            !l.left && (l.active > 0 || (l.last_seen.is_some() && since <= self.offline_after));
        let state = if online {
            NodeState::Online
        } else {
            NodeState::Offline
        };
        let secs = if l.last_seen.is_some() {
            since.as_secs()
        } else {
            u64::MAX
        };
        (state, secs)
    }

    fn is_online(&self, node: &str) -> bool {
        self.liveness(node).0 == NodeState::Online
    }

    fn node_view(&self, r: &NodeRecord) -> Node {
        let (state, last_seen_secs) = self.liveness(&r.name);
        Node {
            name: r.name.clone(),
            address: r.address.clone(),
            role: r.role,
            state,
            last_seen_secs,
            nbd_socket: r.nbd_socket.clone(),
            nbd_tcp: r.nbd_tcp.clone(),
            agent_version: r.agent_version.clone(),
            node_id: r.node_id,
            repl_addr: r.repl_addr.clone(),
        }
    }

    fn volume_view(&self, v: &VolumeRecord, nodes: &BTreeMap<String, NodeRecord>) -> Volume {
        let replicas: Vec<Replica> = v
            .placements
            .iter()
            .map(|p| {
                // An offline node's last report is history, not state: its replica shows
                // Unknown (role, disk state) until its agent syncs again.
                let report = nodes
                    .get(&p.node)
                    .filter(|_| self.is_online(&p.node))
                    .and_then(|n| n.replica(&v.name, &v.uuid));
                let peers = report.map(|r| r.peers.clone()).unwrap_or_default();
                Replica {
                    node: p.node.clone(),
                    pool: p.pool.clone(),
                    diskless: p.diskless,
                    role: report.map(|r| r.role).unwrap_or(Role::Unknown),
                    disk_state: report.map(|r| r.disk_state).unwrap_or(DiskState::Unknown),
                    disk_error: report.and_then(|r| r.disk_error.clone()),
                    repl_state: if v.placements.len() == 1 {
                        "StandAlone".to_string()
                    } else {
                        repl_summary(&peers)
                    },
                    out_of_sync_bytes: report.map(|r| r.out_of_sync_bytes).unwrap_or(0),
                    resync_bytes_per_sec: report.map(|r| r.resync_bytes_per_sec).unwrap_or(0),
                    resync_yielding: report.is_some_and(|r| r.resync_yielding),
                    last_resync_bytes: report.map(|r| r.last_resync_bytes).unwrap_or(0),
                    size_bytes: report.map(|r| r.size_bytes).unwrap_or(0),
                    export_size_bytes: report.and_then(|r| r.export_size_bytes),
                    allocated_bytes: report.map(|r| r.allocated_bytes).unwrap_or(0),
                    connections: report.map(|r| r.connections).unwrap_or(0),
                    peers,
                    quorum: report.and_then(|r| r.quorum),
                    role_error: report.and_then(|r| r.role_error.clone()),
                    resync_bytes_left: report.and_then(|r| r.resync_bytes_left),
                    resync_eta_secs: report.and_then(|r| r.resync_eta_secs),
                    verify: verify::live_verify(report),
                    split_brain: report.map(|r| r.split_brain.clone()).unwrap_or_default(),
                    last_resync_skipped_bytes: report
                        .map(|r| r.last_resync_skipped_bytes)
                        .unwrap_or(0),
                    clients: report.map(|r| r.clients.clone()).unwrap_or_default(),
                    allow_two_primaries: report.is_some_and(|r| r.allow_two_primaries),
                    dual_primary_partner: report.and_then(|r| r.dual_primary_partner.clone()),
                    write_token: report.is_some_and(|r| r.write_token),
                    on_no_quorum: report.and_then(|r| r.on_no_quorum),
                    suspended_requests: report.map(|r| r.suspended_requests).unwrap_or(0),
                }
            })
            .collect();
        // Until the agents drive replication: a majority of the voters must be reported (a
        // diskful replica with data, a witness as Diskless; a Failed or unreported replica
        // does not vote). One replica: quorum is having it.
        let reported = replicas
            .iter()
            .filter(|r| {
                matches!(
                    r.disk_state,
                    DiskState::UpToDate | DiskState::Inconsistent | DiskState::Outdated
                ) || (r.diskless && r.disk_state == DiskState::Diskless)
            })
            .count();
        let quorum = !replicas.is_empty() && reported * 2 > replicas.len();
        Volume {
            name: v.name.clone(),
            uuid: v.uuid.clone(),
            size_bytes: v.size_bytes,
            protocol: v.protocol,
            replica_count: v.replica_count,
            state: v.state,
            quorum,
            replicas,
            operations: v.operations.clone(),
            primary_node: v.desired_primary().map(str::to_string),
            resync_rate_bytes_per_sec: v.resync_rate,
            resync_min_rate_bytes_per_sec: v.resync_min_rate,
            last_verify: v.last_verify.clone(),
            after_split_brain: v.after_split_brain.clone(),
            resync_checksums: v.resync_checksums,
            allow_two_primaries: v.allow_two_primaries,
            second_primary_node: v.second_primary().map(str::to_string),
            on_no_quorum: v.on_no_quorum,
        }
    }

    fn nodes_by_name(&self) -> Result<BTreeMap<String, NodeRecord>, Failure> {
        Ok(self
            .node_records()?
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect())
    }

    pub fn nodes(&self) -> Result<Vec<Node>, Failure> {
        Ok(self
            .node_records()?
            .iter()
            .map(|n| self.node_view(n))
            .collect())
    }

    pub fn pools(&self) -> Result<Vec<Pool>, Failure> {
        let volumes = self.volume_records()?;
        let mut provisioned: HashMap<(&str, &str), u64> = HashMap::new();
        for (_, v) in &volumes {
            for p in v.placements.iter().filter(|p| !p.diskless) {
                *provisioned.entry((&p.node, &p.pool)).or_default() += v.size_bytes;
            }
        }
        let mut out = Vec::new();
        for n in self.node_records()? {
            for p in &n.pools {
                out.push(Pool {
                    node: n.name.clone(),
                    name: p.name.clone(),
                    kind: p.kind,
                    path: p.path.clone(),
                    capacity_bytes: p.capacity_bytes,
                    free_bytes: p.free_bytes,
                    provisioned_bytes: provisioned
                        .get(&(n.name.as_str(), p.name.as_str()))
                        .copied()
                        .unwrap_or(0),
                });
            }
        }
        Ok(out)
    }

    pub fn volumes(&self) -> Result<Vec<Volume>, Failure> {
        let nodes = self.nodes_by_name()?;
        Ok(self
            .volume_records()?
            .iter()
            .map(|(_, v)| self.volume_view(v, &nodes))
            .collect())
    }

    pub fn volume(&self, name: &str) -> Result<Volume, Failure> {
        validate_name("volume", name)?;
        let (_, v) = self
            .volume_record(name)?
            .ok_or_else(|| Failure::not_found(format!("volume '{name}' does not exist")))?;
        Ok(self.volume_view(&v, &self.nodes_by_name()?))
    }

    pub fn status(&self) -> Result<ClusterStatus, Failure> {
        Ok(ClusterStatus {
            cluster_id: self.cluster_id(),
            controller_version: env!("CARGO_PKG_VERSION").to_string(),
            nodes: self.nodes()?,
            pools: self.pools()?,
            volumes: self.volumes()?,
            issues: self.issues(),
        })
    }

    pub fn connect(&self, name: &str, node: Option<&str>) -> Result<ConnectInfo, Failure> {
        validate_name("volume", name)?;
        if let Some(n) = node {
            validate_name("node", n)?;
        }
        let (_, v) = self
            .volume_record(name)?
            .ok_or_else(|| Failure::not_found(format!("volume '{name}' does not exist")))?;
        if v.state == VolumeState::Deleting {
            return Err(Failure::conflict(
                "not_ready",
                format!("volume '{name}' is being deleted"),
            ));
        }
        let placement = match node {
            Some(n) => {
                if self.node_record(n)?.is_none() {
                    return Err(Failure::not_found(format!("node '{n}' is not registered")));
                }
                v.placements.iter().find(|p| p.node == n).ok_or_else(|| {
                    let holders: Vec<&str> = v.placements.iter().map(|p| p.node.as_str()).collect();
                    Failure::conflict(
                        "no_replica",
                        format!(
                            "volume '{name}' has no replica on node '{n}' (it is on: {}); \
                             serving it from a node without a replica arrives with replication",
                            holders.join(", ")
                        ),
                    )
                })?
            }
            // The designated Primary, where writes are accepted (else the first diskful
            // placement).
            None => v
                .desired_primary()
                .and_then(|n| v.placements.iter().find(|p| p.node == n))
                .or_else(|| v.placements.iter().find(|p| !p.diskless))
                .or(v.placements.first())
                .ok_or_else(|| {
                    Failure::conflict("not_ready", format!("volume '{name}' has no replica"))
                })?,
        };
        let not_ready = |why: String| Failure::conflict("not_ready", why);
        let (_, record) = self.node_record(&placement.node)?.ok_or_else(|| {
            not_ready(format!(
                "node '{}' holding volume '{name}' has not registered",
                placement.node
            ))
        })?;
        let report = record.replica(&v.name, &v.uuid).ok_or_else(|| {
            not_ready(format!(
                "the agent on node '{}' has not reported volume '{name}' yet; retry shortly",
                placement.node
            ))
        })?;
        // A witness serves the volume too (a diskless Primary, through the diskful replicas).
        let diskless_export = placement.diskless
            && v.placements.len() > 1
            && report.disk_state == DiskState::Diskless;
        if report.disk_state != DiskState::UpToDate && !diskless_export {
            return Err(not_ready(format!(
                "the replica of volume '{name}' on node '{}' is {:?}, not UpToDate",
                placement.node, report.disk_state
            )));
        }
        let socket = record.nbd_socket.as_deref().ok_or_else(|| {
            not_ready(format!(
                "the agent on node '{}' does not report an NBD socket",
                placement.node
            ))
        })?;
        Ok(ConnectInfo {
            uri: format!("nbd+unix:///{name}?socket={}", encode_query_value(socket)),
            tcp_uri: record
                .nbd_tcp
                .as_deref()
                .map(|hp| format!("nbd://{hp}/{name}")),
            node: placement.node.clone(),
            export: name.to_string(),
        })
    }

    // ----- volume lifecycle ---------------------------------------------------------------

    /// Picks `replicas` distinct online diskful nodes (each with its pool of most free space
    /// that can hold the volume; the nodes with the most free space win), plus a witness on
    /// another online node when `replicas` is even.
    fn place(&self, req: &VolumeCreate, replicas: u32) -> Result<Vec<Placement>, Failure> {
        let nodes = self.node_records()?;
        if let Some(wanted) = &req.nodes {
            for w in wanted {
                if !nodes.iter().any(|n| &n.name == w) {
                    return Err(Failure::not_found(format!("node '{w}' is not registered")));
                }
            }
        }
        let want = replicas as usize;
        let candidates: Vec<&NodeRecord> = nodes
            .iter()
            .filter(|n| n.role == NodeRole::Diskful)
            .filter(|n| req.nodes.as_ref().is_none_or(|w| w.contains(&n.name)))
            .filter(|n| self.is_online(&n.name))
            .collect();
        let scope = match &req.nodes {
            Some(w) => format!("among the requested nodes ({})", w.join(", ")),
            None => format!("among {} registered node(s)", nodes.len()),
        };
        if candidates.is_empty() {
            return Err(Failure::conflict(
                "no_nodes",
                format!("no online diskful node {scope}; start an agent or wait until it syncs"),
            ));
        }
        if candidates.len() < want {
            return Err(Failure::conflict(
                "no_nodes",
                format!(
                    "{replicas} replicas need {replicas} online diskful nodes, found {} {scope}",
                    candidates.len()
                ),
            ));
        }
        // Space promised to replicas counts as used: the whole size of replicas the agents
        // have not created yet, and the part of thin (sparse) replicas not allocated yet, which
        // their consumers may still write. Without the latter every new volume would land on
        // the same nodes of pools that share a filesystem (same free space).
        let mut pending: HashMap<(String, String), u64> = HashMap::new();
        for (_, v) in self.volume_records()? {
            if v.state == VolumeState::Deleting {
                continue;
            }
            for p in v.placements.iter().filter(|p| !p.diskless) {
                let allocated = nodes
                    .iter()
                    .find(|n| n.name == p.node)
                    .and_then(|n| n.replica(&v.name, &v.uuid))
                    .map(|r| r.allocated_bytes)
                    .unwrap_or(0);
                *pending.entry((p.node.clone(), p.pool.clone())).or_default() +=
                    v.size_bytes.saturating_sub(allocated);
            }
        }
        // The best pool of every candidate node: (free, node, pool).
        let mut best: Vec<(i128, &NodeRecord, &PoolReport)> = Vec::new();
        let mut largest = 0u64;
        let mut pools_seen = 0usize;
        for n in &candidates {
            let mut node_best: Option<(i128, &PoolReport)> = None;
            for p in &n.pools {
                if req.pool.as_ref().is_some_and(|w| w != &p.name) {
                    continue;
                }
                pools_seen += 1;
                largest = largest.max(p.capacity_bytes);
                // Pools are thin (sparse files): a volume must fit the pool's capacity, and
                // the pool with the most free space wins.
                if p.capacity_bytes < req.size_bytes {
                    continue;
                }
                // Signed: overcommitted pools still compare by how far they are committed.
                let free = i128::from(p.free_bytes)
                    - i128::from(
                        pending
                            .get(&(n.name.clone(), p.name.clone()))
                            .copied()
                            .unwrap_or(0),
                    );
                let better = match &node_best {
                    None => true,
                    Some((bf, bp)) => free > *bf || (free == *bf && p.name < bp.name),
                };
                if better {
                    node_best = Some((free, p));
                }
            }
            if let Some((free, p)) = node_best {
                best.push((free, n, p));
            }
        }
        best.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
        if best.len() < want {
            let why = if pools_seen == 0 {
                match &req.pool {
                    Some(w) => format!("no online diskful node has a pool named '{w}'"),
                    None => "no online diskful node reports a storage pool".to_string(),
                }
            } else if best.is_empty() {
                format!(
                    "no pool can hold {}: the largest online pool has a capacity of {}",
                    format_size(req.size_bytes),
                    format_size(largest)
                )
            } else {
                format!(
                    "{replicas} replicas of {} need {replicas} online diskful nodes with a pool \
                     that can hold it, found {} {scope}",
                    format_size(req.size_bytes),
                    best.len()
                )
            };
            return Err(Failure::conflict("no_capacity", why));
        }
        let mut out: Vec<Placement> = best
            .iter()
            .take(want)
            .map(|(_, n, p)| Placement {
                node: n.name.clone(),
                pool: p.name.clone(),
                diskless: false,
                join: false,
                leaving: false,
            })
            .collect();
        if replicas.is_multiple_of(2) {
            // A diskless tiebreaker on another online node: nodes of role witness first,
            // then nodes the request named, then any other.
            let mut others: Vec<&NodeRecord> = nodes
                .iter()
                .filter(|n| !out.iter().any(|p| p.node == n.name))
                .filter(|n| self.is_online(&n.name))
                .collect();
            others.sort_by_key(|n| {
                (
                    n.role != NodeRole::Witness,
                    !req.nodes.as_ref().is_some_and(|w| w.contains(&n.name)),
                    n.name.clone(),
                )
            });
            let Some(w) = others.first() else {
                return Err(Failure::conflict(
                    "no_nodes",
                    format!(
                        "{replicas} replicas need a witness (diskless tiebreaker) on another \
                         online node: {} online diskful + witness nodes needed, found {} online \
                         node(s)",
                        want + 1,
                        want
                    ),
                ));
            };
            out.push(Placement {
                node: w.name.clone(),
                pool: String::new(),
                diskless: true,
                join: false,
                leaving: false,
            });
        }
        Ok(out)
    }

    pub fn create_volume(&self, req: VolumeCreate) -> Result<Volume, Failure> {
        validate_name("volume", &req.name)?;
        validate_size(req.size_bytes)?;
        let replicas = req.replicas.unwrap_or(1);
        if replicas != 1 && !self.experimental_replication {
            return Err(Failure::bad_request(
                "unsupported",
                format!(
                    "replicas = {replicas} is not supported yet: this release places exactly 1 \
                     replica; replication arrives with a later release"
                ),
            ));
        }
        if replicas == 0 || replicas > MAX_REPLICAS {
            return Err(Failure::bad_request(
                "bad_request",
                format!("replicas must be between 1 and {MAX_REPLICAS}, got {replicas}"),
            ));
        }
        if let Some(p) = &req.pool {
            validate_name("pool", p)?;
        }
        if let Some(ns) = &req.nodes {
            if ns.is_empty() {
                return Err(Failure::bad_request(
                    "bad_request",
                    "nodes must name at least one node when given",
                ));
            }
            for n in ns {
                validate_name("node", n)?;
            }
        }
        let _guard = self.write_guard();
        if let Some((_, existing)) = self.volume_record(&req.name)? {
            let why = if existing.state == VolumeState::Deleting {
                " and is being deleted; retry when it is gone"
            } else {
                ""
            };
            return Err(Failure::conflict(
                "already_exists",
                format!("volume '{}' already exists{why}", req.name),
            ));
        }
        let placements = self.place(&req, replicas)?;
        let now = now_unix();
        let where_ = |p: &Placement| {
            if p.diskless {
                format!("{} (witness)", p.node)
            } else {
                format!("{}:{}", p.node, p.pool)
            }
        };
        let mut steps = vec![ops::step(
            format!(
                "place on {}",
                placements.iter().map(where_).collect::<Vec<_>>().join(", ")
            ),
            None,
            ops::DONE,
        )];
        for p in &placements {
            steps.push(ops::step(
                if p.diskless {
                    format!("set up witness on {}", p.node)
                } else {
                    format!("create replica on {}:{}", p.node, p.pool)
                },
                Some(&p.node),
                ops::RUNNING,
            ));
        }
        let record = VolumeRecord {
            name: req.name.clone(),
            uuid: uuid::Uuid::new_v4().to_string(),
            size_bytes: req.size_bytes,
            protocol: req.protocol.unwrap_or_default(),
            replica_count: replicas,
            state: VolumeState::Creating,
            placements: placements.clone(),
            operations: vec![ops::new("create", steps, now)],
            created_unix: now,
            primary_node: None,
            primary_explicit: false,
            primary_forced: None,
            resync_rate: req.resync_rate_bytes_per_sec.unwrap_or(0),
            resync_min_rate: req
                .resync_min_rate_bytes_per_sec
                .unwrap_or(tandem_api::DEFAULT_RESYNC_MIN_RATE),
            removing: Vec::new(),
            verify_request: None,
            last_verify: None,
            after_split_brain: req
                .after_split_brain
                .clone()
                .unwrap_or_else(default_split_brain),
            resolve: None,
            resync_checksums: req.resync_checksums.unwrap_or(false),
            allow_two_primaries: false,
            second_primary: None,
            on_no_quorum: req.on_no_quorum.unwrap_or_default(),
        };
        split_brain::validate_policy(&record.after_split_brain, &record.placements)?;
        if record.on_no_quorum == OnNoQuorum::Suspend {
            Self::check_suspend_allowed(&record)?;
        }
        let mut txn = vec![TxnOp::put(
            format!("{VOLUMES}{}", record.name),
            encode(&record)?,
            Expect::Absent,
        )];
        txn.extend(placements.iter().map(|p| Self::bump(&p.node)));
        self.store.txn(txn)?;
        self.notify();
        tracing::info!(volume = %record.name,
            placement = %placements.iter().map(where_).collect::<Vec<_>>().join(", "),
            size = record.size_bytes, "volume created");
        Ok(self.volume_view(&record, &self.nodes_by_name()?))
    }

    pub fn delete_volume(&self, name: &str, force: bool) -> Result<Volume, Failure> {
        validate_name("volume", name)?;
        let _guard = self.write_guard();
        let (rev, mut v) = self
            .volume_record(name)?
            .ok_or_else(|| Failure::not_found(format!("volume '{name}' does not exist")))?;
        let nodes = self.nodes_by_name()?;
        if v.state == VolumeState::Deleting {
            return Ok(self.volume_view(&v, &nodes));
        }
        if !force {
            for p in &v.placements {
                let report = nodes.get(&p.node).and_then(|n| n.replica(&v.name, &v.uuid));
                if let Some(r) = report.filter(|r| r.connections > 0) {
                    return Err(Failure::conflict(
                        "in_use",
                        format!(
                            "volume '{name}' has {} connected consumer(s) on node '{}'; \
                             disconnect them or delete with force",
                            r.connections, p.node
                        ),
                    ));
                }
            }
        }
        v.state = VolumeState::Deleting;
        let now = now_unix();
        for op in v.operations.iter_mut() {
            ops::abort(op, "the volume was deleted", now);
        }
        let mut steps = vec![ops::step("mark the volume deleting", None, ops::DONE)];
        for p in &v.placements {
            steps.push(ops::step(
                if p.diskless {
                    format!("remove witness on {}", p.node)
                } else {
                    format!("delete replica on {}:{}", p.node, p.pool)
                },
                Some(&p.node),
                ops::RUNNING,
            ));
        }
        steps.push(ops::step("forget the volume", None, ops::PENDING));
        v.operations.push(ops::new("delete", steps, now));
        let mut ops = vec![TxnOp::put(
            format!("{VOLUMES}{name}"),
            encode(&v)?,
            Expect::Revision(rev),
        )];
        for p in &v.placements {
            ops.push(Self::bump(&p.node));
        }
        self.store.txn(ops)?;
        self.notify();
        tracing::info!(volume = name, force, "volume deletion requested");
        Ok(self.volume_view(&v, &nodes))
    }

    /// A volume a command may change: it exists and is not being deleted.
    fn volume_to_change(&self, name: &str) -> Result<(u64, VolumeRecord), Failure> {
        let (rev, v) = self
            .volume_record(name)?
            .ok_or_else(|| Failure::not_found(format!("volume '{name}' does not exist")))?;
        if v.state == VolumeState::Deleting {
            return Err(Failure::conflict(
                "not_ready",
                format!("volume '{name}' is being deleted"),
            ));
        }
        Ok((rev, v))
    }

    /// Writes a changed volume record (compare-and-swap on `rev`) and bumps the desired
    /// revision of every node it is placed on, so their agents pick it up.
    fn write_volume(&self, rev: u64, v: &VolumeRecord) -> Result<(), Failure> {
        let mut ops = vec![TxnOp::put(
            format!("{VOLUMES}{}", v.name),
            encode(v)?,
            Expect::Revision(rev),
        )];
        ops.extend(v.placements.iter().map(|p| Self::bump(&p.node)));
        self.store.txn(ops)?;
        self.notify();
        Ok(())
    }

    /// Writes a volume record whose members changed (compare-and-swap on `rev`) and bumps
    /// the desired revision of every node it is placed on or being removed from.
    fn write_members(&self, rev: u64, v: &VolumeRecord) -> Result<(), Failure> {
        let mut nodes: Vec<&str> = v
            .placements
            .iter()
            .chain(&v.removing)
            .map(|p| p.node.as_str())
            .collect();
        nodes.sort();
        nodes.dedup();
        let mut txn: Vec<TxnOp> = nodes.into_iter().map(Self::bump).collect();
        txn.push(TxnOp::put(
            format!("{VOLUMES}{}", v.name),
            encode(v)?,
            Expect::Revision(rev),
        ));
        self.store.txn(txn)?;
        self.notify();
        Ok(())
    }

    /// `volume promote` (`promote == true`: make `node` the Primary) and `volume demote`
    /// (`node` should not be Primary; the volume then has none). Records the intent; the
    /// agents carry it out (the old Primary demotes, then the new one promotes once its
    /// replication engine allows it) and report the roles. Refused up front when the
    /// reports already show it cannot work: a witness, a replica that is not UpToDate, a
    /// node without quorum, an offline node, or consumers connected to the Primary that
    /// would lose it (unless `force`).
    ///
    /// With the dual-primary window open (`allow_two_primaries`), promoting another node
    /// while one is Primary adds it as the second Primary (`second_primary`; nobody loses
    /// the role, `force` is refused: `window_open`); a third one is refused
    /// (`two_primaries`). Demoting one of two Primaries leaves the other one the Primary.
    pub fn set_primary(
        &self,
        name: &str,
        node: &str,
        promote: bool,
        force: bool,
    ) -> Result<Volume, Failure> {
        validate_name("volume", name)?;
        validate_name("node", node)?;
        let _guard = self.write_guard();
        let (rev, mut v) = self.volume_to_change(name)?;
        let nodes = self.nodes_by_name()?;
        if v.placements.len() < 2 {
            return Err(Failure::conflict(
                "not_replicated",
                format!(
                    "volume '{name}' has a single replica (on '{}'): it has no Primary/Secondary \
                     roles; its node always serves it",
                    v.placements.first().map(|p| p.node.as_str()).unwrap_or("?")
                ),
            ));
        }
        if !nodes.contains_key(node) {
            return Err(Failure::not_found(format!(
                "node '{node}' is not registered"
            )));
        }
        let placement = v
            .placements
            .iter()
            .find(|p| p.node == node)
            .ok_or_else(|| {
                let holders: Vec<&str> = v.placements.iter().map(|p| p.node.as_str()).collect();
                Failure::conflict(
                    "no_replica",
                    format!(
                        "volume '{name}' has no replica on node '{node}' (it is on: {})",
                        holders.join(", ")
                    ),
                )
            })?;
        let current = v.desired_primary().map(str::to_string);
        let second = v.second_primary().map(str::to_string);
        let diskless = placement.diskless;
        // The wanted Primary and second Primary after the change, and the node that loses
        // the Primary role (if any). Without the dual-primary window `second` is always
        // None and this is the plain move of the one Primary.
        let adds_second = promote
            && v.allow_two_primaries
            && current.is_some()
            && current.as_deref() != Some(node)
            && second.as_deref() != Some(node);
        let (target, target_second, losing) = if adds_second {
            if let (Some(first), Some(other)) = (&current, &second) {
                return Err(Failure::conflict(
                    "two_primaries",
                    format!(
                        "volume '{name}' already has two Primaries ('{first}' and '{other}', \
                         dual-primary window): demote one of them first"
                    ),
                ));
            }
            if force {
                return Err(Failure::conflict(
                    "window_open",
                    format!(
                        "the dual-primary window of volume '{name}' is open: promoting '{node}' \
                         makes it a second Primary next to '{}' and needs no --force. To move \
                         the Primary role to '{node}' instead, demote '{}' first (with --force \
                         if its consumers are to lose it)",
                        current.as_deref().unwrap_or("?"),
                        current.as_deref().unwrap_or("?")
                    ),
                ));
            }
            (current.clone(), Some(node.to_string()), None)
        } else if promote {
            // A witness may be Primary too (diskless: it serves the volume through the
            // diskful replicas it is connected to), checked below.
            if current.as_deref() == Some(node) || second.as_deref() == Some(node) {
                (current.clone(), second.clone(), None)
            } else {
                (Some(node.to_string()), None, current.clone())
            }
        } else if current.as_deref() == Some(node) {
            // The second Primary, if any, stays: it becomes the Primary.
            (second.clone(), None, current.clone())
        } else if second.as_deref() == Some(node) {
            (current.clone(), None, second.clone())
        } else {
            (current.clone(), second.clone(), None)
        };
        if target == current && target_second == second {
            // Nothing to change (repeating the command is harmless).
            return Ok(self.volume_view(&v, &nodes));
        }
        if promote {
            let report = nodes.get(node).and_then(|n| n.replica(&v.name, &v.uuid));
            if self.liveness(node).0 != NodeState::Online {
                return Err(Failure::conflict(
                    "node_offline",
                    format!("node '{node}' is offline: its agent cannot take the Primary role"),
                ));
            }
            let Some(report) = report else {
                return Err(Failure::conflict(
                    "not_ready",
                    format!("the agent on node '{node}' has not reported volume '{name}' yet"),
                ));
            };
            if diskless {
                // Serves data only through a connected UpToDate diskful replica.
                let data_peer = v.placements.iter().filter(|p| !p.diskless).any(|p| {
                    nodes
                        .get(&p.node)
                        .and_then(|n| n.replica(&v.name, &v.uuid))
                        .is_some_and(|r| r.disk_state == DiskState::UpToDate)
                        && report.peers.iter().any(|pr| {
                            pr.node == p.node
                                && !matches!(
                                    pr.repl_state.as_str(),
                                    "Off" | "StandAlone" | "Connecting" | "SplitBrain"
                                )
                        })
                });
                if !data_peer {
                    return Err(Failure::conflict(
                        "no_data_peer",
                        format!(
                            "node '{node}' is a witness of volume '{name}' (no data): it can be \
                             Primary only while connected to an UpToDate diskful replica, and \
                             none is"
                        ),
                    ));
                }
            } else if report.disk_state == DiskState::Outdated && !force {
                return Err(Failure::conflict(
                    "outdated",
                    format!(
                        "the replica of volume '{name}' on node '{node}' is Outdated: a Primary \
                         completed writes without it. Bring back a replica with those writes \
                         (it resyncs this one), or use --force if they are gone for good \
                         (the writes this replica missed are then lost)"
                    ),
                ));
            }
            if !diskless
                && report.disk_state != DiskState::UpToDate
                && !(force && report.disk_state == DiskState::Outdated)
            {
                return Err(Failure::conflict(
                    "not_up_to_date",
                    format!(
                        "the replica of volume '{name}' on node '{node}' is {:?}, not UpToDate \
                         ({} out of sync): it cannot be Primary until its resync finishes",
                        report.disk_state,
                        tandem_types::format_size(report.out_of_sync_bytes)
                    ),
                ));
            }
            if report.quorum == Some(false) {
                return Err(Failure::conflict(
                    "no_quorum",
                    format!(
                        "node '{node}' does not reach a majority of the voters of volume \
                         '{name}': a Primary without quorum could diverge"
                    ),
                ));
            }
        }
        // Consumers on the node that loses the Primary role.
        if let Some(old) = losing.as_deref()
            && !force
            && self.liveness(old).0 == NodeState::Online
            && let Some(r) = nodes.get(old).and_then(|n| n.replica(&v.name, &v.uuid))
            && r.connections > 0
        {
            return Err(Failure::conflict(
                "in_use",
                format!(
                    "volume '{name}' is open by {} consumer(s) on node '{old}', its Primary; \
                     disconnect them first, or use --force (their further I/O fails there)",
                    r.connections
                ),
            ));
        }
        if !adds_second {
            v.primary_forced = (promote && force).then(|| node.to_string());
        }
        v.primary_node = target.clone();
        v.primary_explicit = true;
        v.second_primary = target_second.clone();
        self.write_volume(rev, &v)?;
        if adds_second || second.is_some() {
            tracing::info!(volume = name, from = ?current, to = ?target, second_from = ?second,
                second_to = ?target_second, force, "Primaries changed (dual-primary window)");
        } else {
            tracing::info!(volume = name, from = ?current, to = ?target, force, "Primary changed");
        }
        Ok(self.volume_view(&v, &nodes))
    }

    /// `volume set`: changes options of a running volume (the resync rate limit); the
    /// agents apply them without restarting anything. Opening the dual-primary window is
    /// refused on a single-replica volume (`not_replicated`) and with protocol A
    /// (`protocol_a`); closing it while two nodes are (or are wanted) Primary is refused
    /// (`two_primaries`). A refused request changes nothing.
    pub fn update_volume(&self, name: &str, req: &VolumeUpdate) -> Result<Volume, Failure> {
        validate_name("volume", name)?;
        let _guard = self.write_guard();
        let (rev, mut v) = self.volume_to_change(name)?;
        let nodes = self.nodes_by_name()?;
        let mut changed = false;
        if let Some(on) = req.allow_two_primaries
            && on != v.allow_two_primaries
        {
            if on {
                self.check_window_opens(&v)?;
            } else {
                self.check_window_closes(&v, &nodes)?;
            }
            tracing::info!(
                volume = name,
                "dual-primary window {}",
                if on { "opened" } else { "closed" }
            );
            v.allow_two_primaries = on;
            v.second_primary = None;
            changed = true;
        }
        if let Some(policy) = req.on_no_quorum
            && policy != v.on_no_quorum
        {
            if policy == OnNoQuorum::Suspend {
                Self::check_suspend_allowed(&v)?;
            }
            tracing::info!(volume = name, from = %v.on_no_quorum, to = %policy, "on-no-quorum policy changed");
            v.on_no_quorum = policy;
            changed = true;
        }
        let mut set_rate = |field: &mut u64, want: Option<u64>, what: &str| {
            if let Some(rate) = want
                && rate != *field
            {
                tracing::info!(volume = name, from = *field, to = rate, "{what} changed");
                *field = rate;
                changed = true;
            }
        };
        set_rate(
            &mut v.resync_rate,
            req.resync_rate_bytes_per_sec,
            "resync rate",
        );
        set_rate(
            &mut v.resync_min_rate,
            req.resync_min_rate_bytes_per_sec,
            "resync minimum rate (yield to consumer I/O)",
        );
        if let Some(p) = &req.after_split_brain
            && *p != v.after_split_brain
        {
            split_brain::validate_policy(p, &v.placements)?;
            tracing::info!(volume = name, from = %v.after_split_brain, to = %p, "split-brain policy changed");
            v.after_split_brain = p.clone();
            changed = true;
        }
        if let Some(on) = req.resync_checksums
            && on != v.resync_checksums
        {
            tracing::info!(volume = name, on, "checksum-based resync changed");
            v.resync_checksums = on;
            changed = true;
        }
        if changed {
            self.write_volume(rev, &v)?;
        }
        Ok(self.volume_view(&v, &nodes))
    }

    /// Why `v` cannot take `on_no_quorum` `suspend`, if it cannot: a single-replica volume
    /// has no quorum to lose (and no replication engine to hold its I/O).
    fn check_suspend_allowed(v: &VolumeRecord) -> Result<(), Failure> {
        if v.placements.len() < 2 {
            return Err(Failure::conflict(
                "not_replicated",
                format!(
                    "volume '{}' has a single replica: it has no quorum to lose, so \
                     on-no-quorum suspend does not apply (its node always serves it)",
                    v.name
                ),
            ));
        }
        Ok(())
    }

    /// Why the dual-primary window of `v` cannot open, if it cannot.
    fn check_window_opens(&self, v: &VolumeRecord) -> Result<(), Failure> {
        let name = &v.name;
        if v.placements.len() < 2 {
            return Err(Failure::conflict(
                "not_replicated",
                format!(
                    "volume '{name}' has a single replica: it has no Primary/Secondary roles, \
                     so no dual-primary window (its node always serves it)"
                ),
            ));
        }
        if v.protocol != Protocol::C {
            return Err(Failure::conflict(
                "protocol_a",
                format!(
                    "volume '{name}' uses protocol {:?}: the dual-primary window needs protocol \
                     C (two writers must see each other's writes acknowledged everywhere)",
                    v.protocol
                ),
            ));
        }
        Ok(())
    }

    /// Why the dual-primary window of `v` cannot close, if it cannot: two nodes are wanted
    /// Primary, or two online nodes report being Primary (or one of a dual-primary pair).
    fn check_window_closes(
        &self,
        v: &VolumeRecord,
        nodes: &BTreeMap<String, NodeRecord>,
    ) -> Result<(), Failure> {
        let name = &v.name;
        if let (Some(first), Some(second)) = (v.desired_primary(), v.second_primary()) {
            return Err(Failure::conflict(
                "two_primaries",
                format!(
                    "volume '{name}' has two Primaries ('{first}' and '{second}'): demote one of \
                     them before closing the dual-primary window (`tandem volume demote {name} \
                     --node NODE`)"
                ),
            ));
        }
        let primaries: Vec<&str> = v
            .placements
            .iter()
            .filter(|p| self.is_online(&p.node))
            .filter(|p| {
                nodes
                    .get(&p.node)
                    .and_then(|n| n.replica(&v.name, &v.uuid))
                    .is_some_and(|r| r.role == Role::Primary || r.dual_primary_partner.is_some())
            })
            .map(|p| p.node.as_str())
            .collect();
        if primaries.len() >= 2 {
            return Err(Failure::conflict(
                "two_primaries",
                format!(
                    "nodes {} report being Primary of volume '{name}': wait until only one is \
                     (the other demotes once its consumer left, or `tandem volume demote {name} \
                     --node NODE`) before closing the dual-primary window",
                    primaries
                        .iter()
                        .map(|n| format!("'{n}'"))
                        .collect::<Vec<_>>()
                        .join(" and ")
                ),
            ));
        }
        Ok(())
    }

    /// `volume resize`: records a new size for every replica (online). Refused: a size that
    /// is not a multiple of 512 or above the maximum (`invalid_size`), a smaller size without
    /// `allow_shrink` (`shrink_refused`), growth that a replica's pool cannot hold by the thin
    /// accounting placement uses (`no_capacity`), a volume being deleted (`not_ready`). The
    /// same size again is a success without a new operation. A resize while another one (or
    /// the resync after it) still runs supersedes it: the agents converge to the newest size.
    pub fn resize_volume(&self, name: &str, req: &VolumeResize) -> Result<Volume, Failure> {
        validate_name("volume", name)?;
        validate_size(req.size_bytes)?;
        let _guard = self.write_guard();
        let (rev, mut v) = self.volume_to_change(name)?;
        let nodes = self.nodes_by_name()?;
        let new = req.size_bytes;
        let old = v.size_bytes;
        if new == old {
            return Ok(self.volume_view(&v, &nodes));
        }
        if new < old && !req.allow_shrink {
            return Err(Failure::conflict(
                "shrink_refused",
                format!(
                    "volume '{name}' has {}; shrinking it to {} loses the data past the new end; \
                     pass allow_shrink (CLI: --allow-shrink) if that is intended",
                    format_size(old),
                    format_size(new)
                ),
            ));
        }
        if new > old {
            // Thin accounting as in placement: space promised to other replicas of the pool
            // (their size not allocated yet) counts as used; this replica needs its new size
            // minus what it already allocated.
            let mut pending: HashMap<(String, String), u64> = HashMap::new();
            for (_, o) in self.volume_records()? {
                if o.state == VolumeState::Deleting || o.name == v.name {
                    continue;
                }
                for p in o.placements.iter().filter(|p| !p.diskless) {
                    let allocated = nodes
                        .get(&p.node)
                        .and_then(|n| n.replica(&o.name, &o.uuid))
                        .map(|r| r.allocated_bytes)
                        .unwrap_or(0);
                    *pending.entry((p.node.clone(), p.pool.clone())).or_default() +=
                        o.size_bytes.saturating_sub(allocated);
                }
            }
            for p in v.placements.iter().filter(|p| !p.diskless) {
                let node = nodes.get(&p.node);
                let Some(pool) = node.and_then(|n| n.pools.iter().find(|x| x.name == p.pool))
                else {
                    return Err(Failure::conflict(
                        "no_capacity",
                        format!(
                            "node '{}' has not reported pool '{}': its free space is unknown",
                            p.node, p.pool
                        ),
                    ));
                };
                let allocated = node
                    .and_then(|n| n.replica(&v.name, &v.uuid))
                    .map(|r| r.allocated_bytes)
                    .unwrap_or(0);
                let need = new.saturating_sub(allocated);
                let promised = pending
                    .get(&(p.node.clone(), p.pool.clone()))
                    .copied()
                    .unwrap_or(0);
                let free = pool.free_bytes.saturating_sub(promised);
                if pool.capacity_bytes < new || free < need {
                    return Err(Failure::conflict(
                        "no_capacity",
                        format!(
                            "pool '{}' on node '{}' cannot hold volume '{name}' at {}: capacity \
                             {}, free {} of which {} is promised to other volumes, this replica \
                             needs {} more",
                            p.pool,
                            p.node,
                            format_size(new),
                            format_size(pool.capacity_bytes),
                            format_size(pool.free_bytes),
                            format_size(promised),
                            format_size(need)
                        ),
                    ));
                }
            }
        }
        let now = now_unix();
        let why = format!("superseded by the resize to {}", format_size(new));
        for op in v.operations.iter_mut().filter(|o| o.kind == "resize") {
            ops::supersede(op, &why, now);
        }
        let verb = if new > old { "grow" } else { "shrink" };
        let mut steps = vec![ops::step(
            format!(
                "record size {} (was {})",
                format_size(new),
                format_size(old)
            ),
            None,
            ops::DONE,
        )];
        for p in v.placements.iter().filter(|p| !p.diskless) {
            steps.push(ops::step(
                format!("{verb} backing store on {}:{}", p.node, p.pool),
                Some(&p.node),
                ops::RUNNING,
            ));
            steps.push(ops::step(
                format!("volume size on {}", p.node),
                Some(&p.node),
                ops::PENDING,
            ));
        }
        v.size_bytes = new;
        v.operations.push(ops::new("resize", steps, now));
        // Bounded history: old finished resizes go first.
        let finished_resizes = v
            .operations
            .iter()
            .filter(|o| o.kind == "resize" && ops::is_finished(o))
            .count();
        if finished_resizes > 10 {
            let mut drop = finished_resizes - 10;
            v.operations.retain(|o| {
                if drop > 0 && o.kind == "resize" && ops::is_finished(o) {
                    drop -= 1;
                    false
                } else {
                    true
                }
            });
        }
        self.write_volume(rev, &v)?;
        tracing::info!(volume = name, from = old, to = new, "resize recorded");
        Ok(self.volume_view(&v, &nodes))
    }

    /// `node remove NAME`: forgets a node that holds nothing (no replica, no witness of any
    /// volume). Refused otherwise, naming the volumes (move them first, or `node lost` for a
    /// dead node). An agent still running there registers again at its next sync.
    /// `node add NAME ADDR [--witness]`: declares a node before its agent first syncs (it
    /// shows offline until then). The node gets its id now; its agent must report this
    /// address; a witness node only ever gets witnesses. Repeating it with the same values
    /// changes nothing; other values are refused (`node_exists`).
    pub fn node_add(&self, req: &NodeAdd) -> Result<Node, Failure> {
        validate_name("node", &req.name)?;
        validate_address(&req.address)?;
        let role = if req.witness {
            NodeRole::Witness
        } else {
            NodeRole::Diskful
        };
        let _guard = self.write_guard();
        if let Some((_, old)) = self.node_record(&req.name)? {
            if old.address == req.address && old.role == role {
                return Ok(self.node_view(&old));
            }
            return Err(Failure::conflict(
                "node_exists",
                format!(
                    "node '{}' exists with address {} and role {:?}; `node remove` it first to \
                     add it with address {} and role {role:?}",
                    req.name, old.address, old.role, req.address
                ),
            ));
        }
        let used = self
            .node_records()?
            .iter()
            .filter_map(|n| n.node_id)
            .collect();
        let record = NodeRecord {
            name: req.name.clone(),
            address: req.address.clone(),
            role,
            agent_version: String::new(),
            nbd_socket: None,
            nbd_tcp: None,
            pools: Vec::new(),
            replicas: Vec::new(),
            last_seen_unix: 0,
            node_id: Some(free_node_id(&used)?),
            repl_addr: None,
            added: true,
        };
        self.store.txn(vec![TxnOp::put(
            format!("{NODES}{}", req.name),
            encode(&record)?,
            Expect::Absent,
        )])?;
        tracing::info!(node = %req.name, address = %req.address, ?role, node_id = ?record.node_id, "node added (waiting for its agent)");
        Ok(self.node_view(&record))
    }

    pub fn node_remove(&self, name: &str) -> Result<(), Failure> {
        validate_name("node", name)?;
        let _guard = self.write_guard();
        let (node_rev, _) = self
            .node_record(name)?
            .ok_or_else(|| Failure::not_found(format!("node '{name}' is not registered")))?;
        let held: Vec<String> = self
            .volume_records()?
            .into_iter()
            .filter(|(_, v)| {
                v.placements
                    .iter()
                    .chain(&v.removing)
                    .any(|p| p.node == name)
            })
            .map(|(_, v)| v.name)
            .collect();
        if !held.is_empty() {
            let shown: Vec<&str> = held.iter().take(10).map(String::as_str).collect();
            return Err(Failure::conflict(
                "node_in_use",
                format!(
                    "node '{name}' holds replicas or witnesses of {} volume(s) ({}{}): delete or \
                     move them first, or declare a dead node lost (`tandem node lost {name}`)",
                    held.len(),
                    shown.join(", "),
                    if held.len() > shown.len() {
                        ", ..."
                    } else {
                        ""
                    }
                ),
            ));
        }
        if self.liveness(name).0 == NodeState::Online {
            return Err(Failure::conflict(
                "node_online",
                format!(
                    "node '{name}' is online (its agent syncs) and would register again at \
                     once: stop its agent first, then remove the node"
                ),
            ));
        }
        self.store.txn(vec![
            TxnOp::delete(format!("{NODES}{name}"), Expect::Revision(node_rev)),
            TxnOp::delete(format!("{DESIRED}{name}"), Expect::Any),
        ])?;
        self.live_lock().remove(name);
        self.notify();
        tracing::info!(node = name, "node removed");
        Ok(())
    }

    /// `node lost NAME`: the node is gone for good. Its replicas are dropped from every
    /// volume; each volume gets a new diskful replica on another online node (most free
    /// space) that joins with a full resync, and a new witness when its witness was there;
    /// a Primary there moves to a surviving UpToDate replica. The node record is removed.
    /// Refused while the node is online (that is `node evacuate`, not this).
    pub fn node_lost(&self, name: &str) -> Result<NodeLostResult, Failure> {
        validate_name("node", name)?;
        let _guard = self.write_guard();
        let (node_rev, _) = self
            .node_record(name)?
            .ok_or_else(|| Failure::not_found(format!("node '{name}' is not registered")))?;
        if self.liveness(name).0 == NodeState::Online {
            return Err(Failure::conflict(
                "node_online",
                format!(
                    "node '{name}' is online (its agent syncs): a node is declared lost only when \
                     it is gone; stop its agent first"
                ),
            ));
        }
        let nodes = self.nodes_by_name()?;
        let now = now_unix();
        let mut txn = vec![
            TxnOp::delete(format!("{NODES}{name}"), Expect::Revision(node_rev)),
            TxnOp::delete(format!("{DESIRED}{name}"), Expect::Any),
        ];
        let mut result = NodeLostResult {
            node: name.to_string(),
            volumes: Vec::new(),
        };
        // Space promised per (node, pool) by this call's new placements.
        let mut promised: HashMap<(String, String), u64> = HashMap::new();
        for (rev, mut v) in self.volume_records()? {
            let Some(idx) = v.placements.iter().position(|p| p.node == name) else {
                continue;
            };
            if v.state == VolumeState::Deleting {
                v.placements.remove(idx);
                txn.push(TxnOp::put(
                    format!("{VOLUMES}{}", v.name),
                    encode(&v)?,
                    Expect::Revision(rev),
                ));
                continue;
            }
            let primary_before = v.desired_primary().map(str::to_string);
            let second_before = v.second_primary().map(str::to_string);
            let lost = v.placements.remove(idx);
            if second_before.as_deref() == Some(name) {
                // The second Primary of the dual-primary window was there.
                v.second_primary = None;
            }
            let mut steps = vec![ops::step(
                format!(
                    "drop the {} on {name}",
                    if lost.diskless { "witness" } else { "replica" }
                ),
                None,
                ops::DONE,
            )];
            let mut note = Vec::new();
            if !lost.diskless {
                let best = self.best_pool(&nodes, &v, &promised, name);
                match best {
                    Some((node, pool)) => {
                        *promised.entry((node.clone(), pool.clone())).or_default() += v.size_bytes;
                        steps.push(ops::step(
                            format!("create a replica on {node}:{pool} and resync it fully"),
                            Some(&node),
                            ops::RUNNING,
                        ));
                        note.push(format!("new replica on {node}:{pool}"));
                        v.placements.push(Placement {
                            node,
                            pool,
                            diskless: false,
                            join: true,
                            leaving: false,
                        });
                    }
                    None => note.push(
                        "no online diskful node without a replica of it: the volume stays one \
                         replica short"
                            .to_string(),
                    ),
                }
            }
            let diskful = v.placements.iter().filter(|p| !p.diskless).count();
            let witnesses = v.placements.iter().filter(|p| p.diskless).count();
            if diskful % 2 == 0 && witnesses == 0 {
                match self.witness_node(&nodes, &v, name, None) {
                    Some(w) => {
                        add_witness(&mut v, w, &mut steps, &mut note);
                    }
                    None => note.push("no online node left for a witness".to_string()),
                }
            }
            if v.desired_primary().is_none() && v.primary_node.as_deref() == Some(name)
                || (!v.primary_explicit && lost.node == name && !lost.diskless)
            {
                // The Primary was there: the second Primary of the dual-primary window if
                // there is one, else the first surviving UpToDate diskful replica.
                let survivor = second_before.clone().filter(|s| s != name).or_else(|| {
                    v.placements
                        .iter()
                        .filter(|p| !p.diskless && !p.join)
                        .find(|p| Self::up_to_date(&nodes, &v, &p.node))
                        .map(|p| p.node.clone())
                });
                v.second_primary = None;
                if let Some(s) = &survivor
                    && primary_before.as_deref() != Some(s.as_str())
                {
                    note.push(format!("Primary moves to {s}"));
                }
                v.primary_node = survivor;
                v.primary_explicit = true;
            }
            v.operations.push(ops::new(OP_NODE_LOST, steps, now));
            for p in &v.placements {
                txn.push(Self::bump(&p.node));
            }
            txn.push(TxnOp::put(
                format!("{VOLUMES}{}", v.name),
                encode(&v)?,
                Expect::Revision(rev),
            ));
            tracing::warn!(volume = %v.name, node = name, "replica on a lost node dropped: {}", note.join("; "));
            result.volumes.push(NodeLostVolume {
                volume: v.name.clone(),
                actions: note,
            });
        }
        self.store.txn(txn)?;
        self.live_lock().remove(name);
        self.notify();
        tracing::warn!(
            node = name,
            volumes = result.volumes.len(),
            "node declared lost"
        );
        Ok(result)
    }

    /// The pool with most free space (less what `promised` already reserves) on an online
    /// diskful node other than `exclude` that holds no placement of `v` and fits its size.
    fn best_pool(
        &self,
        nodes: &BTreeMap<String, NodeRecord>,
        v: &VolumeRecord,
        promised: &HashMap<(String, String), u64>,
        exclude: &str,
    ) -> Option<(String, String)> {
        let mut best: Option<(i128, String, String)> = None;
        for n in nodes.values() {
            if n.name == exclude
                || n.role != NodeRole::Diskful
                || v.placements.iter().any(|p| p.node == n.name)
                || v.removing.iter().any(|p| p.node == n.name)
                || !self.is_online(&n.name)
            {
                continue;
            }
            for p in n.pools.iter().filter(|p| p.capacity_bytes >= v.size_bytes) {
                let free = i128::from(p.free_bytes)
                    - i128::from(
                        promised
                            .get(&(n.name.clone(), p.name.clone()))
                            .copied()
                            .unwrap_or(0),
                    );
                if best.as_ref().is_none_or(|b| free > b.0) {
                    best = Some((free, n.name.clone(), p.name.clone()));
                }
            }
        }
        best.map(|(_, n, p)| (n, p))
    }

    /// The diskful part of a move off `from`: a new member on `node:pool` joins with a full
    /// resync, and when the Primary is on `from`, it then moves to a replica that stays and is
    /// UpToDate now (only after the new member is in sync: moving it earlier would restart
    /// the new member's full resync under a new Primary). Err: why it cannot move.
    fn plan_replica_move(
        nodes: &BTreeMap<String, NodeRecord>,
        v: &mut VolumeRecord,
        from: &str,
        node: &str,
        pool: &str,
        steps: &mut Vec<tandem_api::OperationStep>,
        note: &mut Vec<String>,
    ) -> Result<(), String> {
        let mut primary_to = None;
        if v.second_primary().is_some() && v.wants_primary(from) {
            return Err(format!(
                "{from} is one of the two Primaries of the dual-primary window: demote one of \
                 them first"
            ));
        }
        if v.desired_primary() == Some(from) {
            let stays = v
                .placements
                .iter()
                .filter(|p| !p.diskless && !p.join && !p.leaving && p.node != from)
                .find(|p| Self::up_to_date(nodes, v, &p.node))
                .map(|p| p.node.clone());
            let Some(to) = stays else {
                return Err(format!(
                    "the Primary is on {from} and no other replica is UpToDate"
                ));
            };
            primary_to = Some(to);
        }
        steps.push(ops::step(
            format!("{STEP_CREATE}{node}:{pool} and resync it fully"),
            Some(node),
            ops::RUNNING,
        ));
        note.push(format!("new replica on {node}:{pool}"));
        v.placements.push(Placement {
            node: node.to_string(),
            pool: pool.to_string(),
            diskless: false,
            join: true,
            leaving: false,
        });
        if let Some(to) = primary_to {
            steps.push(ops::step(
                format!("{STEP_PRIMARY}{to}"),
                Some(&to),
                ops::PENDING,
            ));
            note.push(format!("then the Primary moves to {to}"));
        }
        Ok(())
    }

    /// `volume move NAME --from NODE[:POOL] --to NODE[:POOL]`: one replica (or the witness)
    /// moves, online, as a `move` operation with the steps of `node evacuate`: the new member
    /// joins with a full resync (a witness: a new witness), the Primary moves to a replica
    /// that stays when it was on `from`, then the old placement leaves and its node deletes
    /// it. Refused up front when it cannot work.
    pub fn volume_move(&self, name: &str, req: &VolumeMove) -> Result<Volume, Failure> {
        validate_name("volume", name)?;
        validate_name("node", &req.from_node)?;
        validate_name("node", &req.to_node)?;
        for p in [&req.from_pool, &req.to_pool].into_iter().flatten() {
            validate_name("pool", p)?;
        }
        let _guard = self.write_guard();
        let (rev, mut v) = self.volume_to_change(name)?;
        let nodes = self.nodes_by_name()?;
        let conflict = |code: &'static str, msg: String| Err(Failure::conflict(code, msg));
        let Some(idx) = v.placements.iter().position(|p| {
            p.node == req.from_node && req.from_pool.as_ref().is_none_or(|pool| &p.pool == pool)
        }) else {
            let holders: Vec<String> = v
                .placements
                .iter()
                .map(|p| {
                    if p.diskless {
                        format!("{} (witness)", p.node)
                    } else {
                        format!("{}:{}", p.node, p.pool)
                    }
                })
                .collect();
            return conflict(
                "no_replica",
                format!(
                    "volume '{name}' has no replica on {}{} (it is on: {})",
                    req.from_node,
                    req.from_pool
                        .as_ref()
                        .map(|p| format!(":{p}"))
                        .unwrap_or_default(),
                    holders.join(", ")
                ),
            );
        };
        Self::refuse_busy(&v)?;
        if req.to_node == req.from_node {
            return conflict(
                "same_node",
                format!(
                    "moving a replica between pools of one node ('{}') is not supported yet: \
                     move it to another node and back",
                    req.to_node
                ),
            );
        }
        let Some(target) = nodes.get(&req.to_node) else {
            return Err(Failure::not_found(format!(
                "node '{}' is not registered",
                req.to_node
            )));
        };
        if v.placements.iter().any(|p| p.node == req.to_node)
            || v.removing.iter().any(|p| p.node == req.to_node)
        {
            return conflict(
                "already_placed",
                format!(
                    "node '{}' already holds volume '{name}' (or is still deleting its old copy)",
                    req.to_node
                ),
            );
        }
        if !self.is_online(&req.to_node) {
            return conflict(
                "node_offline",
                format!(
                    "node '{}' is offline: it cannot take the replica",
                    req.to_node
                ),
            );
        }
        let now = now_unix();
        let from = req.from_node.clone();
        let diskless = v.placements[idx].diskless;
        let mut steps = Vec::new();
        let mut note = Vec::new();
        if diskless {
            steps.push(ops::step(
                format!("{STEP_WITNESS}{}", req.to_node),
                Some(&req.to_node),
                ops::RUNNING,
            ));
            v.placements.push(Placement {
                node: req.to_node.clone(),
                pool: String::new(),
                diskless: true,
                join: false,
                leaving: false,
            });
        } else {
            if target.role != NodeRole::Diskful {
                return conflict(
                    "witness_node",
                    format!(
                        "node '{}' is a witness node: it holds no data, only witnesses",
                        req.to_node
                    ),
                );
            }
            let pool = Self::pool_for(target, v.size_bytes, req.to_pool.as_deref())?;
            let to = req.to_node.clone();
            if let Err(why) =
                Self::plan_replica_move(&nodes, &mut v, &from, &to, &pool, &mut steps, &mut note)
            {
                return conflict("not_ready", format!("cannot move volume '{name}': {why}"));
            }
        }
        steps.push(ops::step(
            format!(
                "{STEP_REMOVE}{} on {from}",
                if diskless { "witness" } else { "replica" }
            ),
            Some(&from),
            ops::PENDING,
        ));
        v.placements[idx].leaving = true;
        v.operations.push(ops::new(OP_MOVE, steps, now));
        let mut txn: Vec<TxnOp> = v.placements.iter().map(|p| Self::bump(&p.node)).collect();
        txn.push(TxnOp::put(
            format!("{VOLUMES}{}", v.name),
            encode(&v)?,
            Expect::Revision(rev),
        ));
        self.store.txn(txn)?;
        self.notify();
        tracing::info!(volume = name, from = %from, to = %req.to_node, "moving: {}", note.join("; "));
        Ok(self.volume_view(&v, &nodes))
    }

    /// Refuses a membership change while another one runs on the volume.
    fn refuse_busy(v: &VolumeRecord) -> Result<(), Failure> {
        let running = v
            .operations
            .iter()
            .find(|o| changes_members(&o.kind) && !ops::is_finished(o));
        if running.is_some() || v.placements.iter().any(|p| p.leaving || p.join) {
            return Err(Failure::conflict(
                "busy",
                format!(
                    "volume '{}' is already changing its replicas ({} running); wait for it \
                     to finish (or `volume abort` a move)",
                    v.name,
                    running.map_or("a replica joining", |o| o.kind.as_str())
                ),
            ));
        }
        Ok(())
    }

    /// The pool on `target` for a new replica of `size` bytes: `want`, or the one with most
    /// free space that fits; refused when it does not fit.
    fn pool_for(target: &NodeRecord, size: u64, want: Option<&str>) -> Result<String, Failure> {
        let pool = match want {
            Some(want) => target
                .pools
                .iter()
                .find(|p| p.name == want)
                .ok_or_else(|| {
                    Failure::not_found(format!("node '{}' has no pool '{want}'", target.name))
                })?,
            None => target
                .pools
                .iter()
                .filter(|p| p.capacity_bytes >= size)
                .max_by_key(|p| p.free_bytes)
                .ok_or_else(|| {
                    Failure::conflict(
                        "no_capacity",
                        format!("node '{}' has no pool that fits the volume", target.name),
                    )
                })?,
        };
        if pool.free_bytes < size || pool.capacity_bytes < size {
            return Err(Failure::conflict(
                "no_capacity",
                format!(
                    "pool '{}' on node '{}' has {} free, the volume needs {}",
                    pool.name,
                    target.name,
                    tandem_types::format_size(pool.free_bytes),
                    tandem_types::format_size(size)
                ),
            ));
        }
        Ok(pool.name.clone())
    }

    /// An online node for a new witness of `v`: one holding nothing of it (nodes of role
    /// witness first), else one of `fallback` (online), else none.
    fn witness_node(
        &self,
        nodes: &BTreeMap<String, NodeRecord>,
        v: &VolumeRecord,
        exclude: &str,
        fallback: Option<&str>,
    ) -> Option<String> {
        let mut others: Vec<&NodeRecord> = nodes
            .values()
            .filter(|n| {
                n.name != exclude
                    && !v.placements.iter().any(|p| p.node == n.name)
                    && !v.removing.iter().any(|p| p.node == n.name)
                    && self.is_online(&n.name)
            })
            .collect();
        others.sort_by_key(|n| (n.role != NodeRole::Witness, n.name.clone()));
        others
            .first()
            .map(|n| n.name.clone())
            .or_else(|| fallback.filter(|f| self.is_online(f)).map(str::to_string))
    }

    /// Refuses a replica change that switches `v` between a single replica (served from its
    /// file) and a replicated one (served through the replication driver) while consumers
    /// are connected to the replica that stays: their connection holds the old export, whose
    /// writes would bypass replication or fail.
    fn refuse_export_switch(
        nodes: &BTreeMap<String, NodeRecord>,
        v: &VolumeRecord,
        node: &str,
    ) -> Result<(), Failure> {
        let n = nodes
            .get(node)
            .and_then(|n| n.replica(&v.name, &v.uuid))
            .map_or(0, |r| r.connections);
        if n > 0 {
            return Err(Failure::conflict(
                "in_use",
                format!(
                    "volume '{}' has {n} consumer connection(s) on node '{node}': going between \
                     one replica and several switches its export there; disconnect them first \
                     (they reconnect to the new export)",
                    v.name
                ),
            ));
        }
        Ok(())
    }

    /// Whether `node` last reported its replica of `v` UpToDate.
    fn up_to_date(nodes: &BTreeMap<String, NodeRecord>, v: &VolumeRecord, node: &str) -> bool {
        nodes
            .get(node)
            .and_then(|n| n.replica(&v.name, &v.uuid))
            .is_some_and(|r| r.disk_state == DiskState::UpToDate)
    }

    /// `volume add-replica NAME [--to NODE[:POOL]]`: one more diskful replica, online, as an
    /// `add-replica` operation. The new replica joins with a full resync. The voters stay odd:
    /// with an even diskful count a witness is added; with an odd one the witness leaves once
    /// the new replica is in sync, or at once when the new replica goes on the witness's node
    /// (the witness becomes the replica: a three-node cluster going from 2 to 3 replicas).
    pub fn add_replica(&self, name: &str, req: &ReplicaAdd) -> Result<Volume, Failure> {
        validate_name("volume", name)?;
        for n in [&req.node, &req.pool].into_iter().flatten() {
            validate_name("name", n)?;
        }
        if req.pool.is_some() && req.node.is_none() {
            return Err(Failure::bad_request(
                "bad_request",
                "a pool needs a node: give both (NODE:POOL)",
            ));
        }
        let _guard = self.write_guard();
        let (rev, mut v) = self.volume_to_change(name)?;
        let nodes = self.nodes_by_name()?;
        let conflict = |code: &'static str, msg: String| Err(Failure::conflict(code, msg));
        Self::refuse_busy(&v)?;
        let diskful = v.placements.iter().filter(|p| !p.diskless).count() as u32;
        if diskful >= MAX_REPLICAS {
            return conflict(
                "too_many",
                format!("volume '{name}' has {diskful} replicas, the most supported"),
            );
        }
        if !self.experimental_replication {
            return Err(Failure::bad_request(
                "unsupported",
                "more than one replica is not supported yet: replication arrives with a later \
                 release",
            ));
        }
        if diskful == 1
            && let Some(only) = v.placements.iter().find(|p| !p.diskless)
        {
            Self::refuse_export_switch(&nodes, &v, &only.node)?;
        }
        let witness = v
            .placements
            .iter()
            .find(|p| p.diskless)
            .map(|p| p.node.clone());
        let (node, pool) = match &req.node {
            Some(n) => {
                let Some(target) = nodes.get(n) else {
                    return Err(Failure::not_found(format!("node '{n}' is not registered")));
                };
                if v.placements.iter().any(|p| &p.node == n && !p.diskless)
                    || v.removing.iter().any(|p| &p.node == n)
                {
                    return conflict(
                        "already_placed",
                        format!(
                            "node '{n}' already holds a replica of volume '{name}' (or is still \
                             deleting an old one)"
                        ),
                    );
                }
                if target.role != NodeRole::Diskful {
                    return conflict(
                        "witness_node",
                        format!("node '{n}' is a witness node: it holds no data"),
                    );
                }
                if !self.is_online(n) {
                    return conflict(
                        "node_offline",
                        format!("node '{n}' is offline: it cannot take a replica"),
                    );
                }
                (
                    n.clone(),
                    Self::pool_for(target, v.size_bytes, req.pool.as_deref())?,
                )
            }
            None => match self.best_pool(&nodes, &v, &HashMap::new(), "") {
                Some(x) => x,
                None => {
                    // The witness's node, when it can hold data.
                    let w = witness
                        .as_ref()
                        .and_then(|w| nodes.get(w))
                        .filter(|n| n.role == NodeRole::Diskful && self.is_online(&n.name))
                        .and_then(|n| {
                            Self::pool_for(n, v.size_bytes, None)
                                .ok()
                                .map(|p| (n.name.clone(), p))
                        });
                    match w {
                        Some(x) => x,
                        None => {
                            return conflict(
                                "no_nodes",
                                format!(
                                    "no online diskful node without a replica of volume \
                                     '{name}' has a pool that fits it ({})",
                                    tandem_types::format_size(v.size_bytes)
                                ),
                            );
                        }
                    }
                }
            },
        };
        let now = now_unix();
        let mut steps = Vec::new();
        let mut note = Vec::new();
        if witness.as_deref() == Some(node.as_str()) {
            // The witness there becomes the replica: it goes first (one placement per node).
            let i = v
                .placements
                .iter()
                .position(|p| p.node == node)
                .unwrap_or(0);
            let w = v.placements.remove(i);
            v.removing.push(w);
            steps.push(ops::step(
                format!("{STEP_REMOVE_WITNESS} on {node}"),
                Some(&node),
                ops::RUNNING,
            ));
            note.push(format!("the witness on {node} becomes a replica"));
        }
        steps.push(ops::step(
            format!("{STEP_CREATE}{node}:{pool} and resync it fully"),
            Some(&node),
            ops::RUNNING,
        ));
        note.push(format!("new replica on {node}:{pool}"));
        v.placements.push(Placement {
            node: node.clone(),
            pool,
            diskless: false,
            join: true,
            leaving: false,
        });
        let diskful = diskful + 1;
        let witness_now = v.placements.iter().position(|p| p.diskless);
        match witness_now {
            None if diskful.is_multiple_of(2) => {
                let Some(w) = self.witness_node(&nodes, &v, "", None) else {
                    return conflict(
                        "no_nodes",
                        format!(
                            "{diskful} replicas need a witness (diskless tiebreaker) on another \
                             online node, and there is none"
                        ),
                    );
                };
                add_witness(&mut v, w, &mut steps, &mut note);
            }
            Some(i) if !diskful.is_multiple_of(2) => {
                // No tiebreaker needed any more: it leaves once the new replica is in sync.
                let w = v.placements[i].node.clone();
                v.placements[i].leaving = true;
                steps.push(ops::step(
                    format!("{STEP_REMOVE_WITNESS} on {w}"),
                    Some(&w),
                    ops::PENDING,
                ));
                note.push(format!("then the witness on {w} goes"));
            }
            _ => {}
        }
        v.replica_count = diskful;
        v.operations.push(ops::new(OP_ADD_REPLICA, steps, now));
        self.write_members(rev, &v)?;
        tracing::info!(volume = name, "adding a replica: {}", note.join("; "));
        Ok(self.volume_view(&v, &nodes))
    }

    /// `volume remove-replica NAME NODE`: one diskful replica fewer, online, as a
    /// `remove-replica` operation: the replica leaves the volume at once and its node deletes
    /// it. The voters stay odd: with an even diskful count left a witness is added (on that
    /// very node when no other is free), with an odd one the witness goes. Refused for the
    /// last replica, the Primary's (promote another first) and the last UpToDate one.
    pub fn remove_replica(&self, name: &str, node: &str) -> Result<Volume, Failure> {
        validate_name("volume", name)?;
        validate_name("node", node)?;
        let _guard = self.write_guard();
        let (rev, mut v) = self.volume_to_change(name)?;
        let nodes = self.nodes_by_name()?;
        let conflict = |code: &'static str, msg: String| Err(Failure::conflict(code, msg));
        let Some(idx) = v.placements.iter().position(|p| p.node == node) else {
            return conflict(
                "no_replica",
                format!("volume '{name}' has no replica on node '{node}'"),
            );
        };
        if v.placements[idx].diskless {
            return conflict(
                "is_witness",
                format!(
                    "node '{node}' holds the witness of volume '{name}', not a replica: the \
                     witness follows the replica count (`volume move` moves it)"
                ),
            );
        }
        Self::refuse_busy(&v)?;
        let diskful = v.placements.iter().filter(|p| !p.diskless).count() as u32;
        if diskful <= 1 {
            return conflict(
                "last_replica",
                format!(
                    "node '{node}' holds the only replica of volume '{name}' (`volume delete` \
                     deletes the volume)"
                ),
            );
        }
        if v.wants_primary(node) {
            return conflict(
                "is_primary",
                format!(
                    "the replica on '{node}' is the Primary of volume '{name}': make another \
                     replica Primary first (`tandem volume promote {name} OTHER-NODE`)"
                ),
            );
        }
        if !v
            .placements
            .iter()
            .filter(|p| !p.diskless && p.node != node)
            .any(|p| Self::up_to_date(&nodes, &v, &p.node))
        {
            return conflict(
                "last_up_to_date",
                format!(
                    "no other replica of volume '{name}' is UpToDate: removing the one on \
                     '{node}' could lose data; wait for the resync"
                ),
            );
        }
        if diskful == 2
            && let Some(stays) = v.placements.iter().find(|p| !p.diskless && p.node != node)
        {
            Self::refuse_export_switch(&nodes, &v, &stays.node)?;
        }
        let now = now_unix();
        let gone = v.placements.remove(idx);
        v.removing.push(gone);
        let mut steps = vec![ops::step(
            format!("{STEP_REMOVE}replica on {node}"),
            Some(node),
            ops::RUNNING,
        )];
        let mut note = vec![format!("the replica on {node} goes")];
        let diskful = diskful - 1;
        match v.placements.iter().position(|p| p.diskless) {
            None if diskful.is_multiple_of(2) => {
                match self.witness_node(&nodes, &v, node, Some(node)) {
                    Some(w) => {
                        add_witness(&mut v, w, &mut steps, &mut note);
                    }
                    None => note.push("no online node for a witness".to_string()),
                }
            }
            Some(i) if !diskful.is_multiple_of(2) => {
                let w = v.placements.remove(i);
                steps.push(ops::step(
                    format!("{STEP_REMOVE_WITNESS} on {}", w.node),
                    Some(&w.node),
                    ops::RUNNING,
                ));
                note.push(format!("the witness on {} goes", w.node));
                v.removing.push(w);
            }
            _ => {}
        }
        v.replica_count = diskful;
        v.operations.push(ops::new(OP_REMOVE_REPLICA, steps, now));
        self.write_members(rev, &v)?;
        tracing::info!(volume = name, "removing a replica: {}", note.join("; "));
        Ok(self.volume_view(&v, &nodes))
    }

    /// `volume abort NAME`: stops the volume's running move or evacuation and undoes it, while
    /// that is safe: before the old copy left the volume. The new member (or witness) is
    /// dropped (its node deletes what it has), the leaving placement stays; a Primary already
    /// moved stays where it is. Other operations are refused: a node replacement (the lost
    /// node's copy is gone), a resize (run another one), create, delete and verify.
    pub fn abort_operation(&self, name: &str) -> Result<Volume, Failure> {
        validate_name("volume", name)?;
        let _guard = self.write_guard();
        let (rev, mut v) = self.volume_to_change(name)?;
        let nodes = self.nodes_by_name()?;
        let Some(i) = v.operations.iter().rposition(|o| !ops::is_finished(o)) else {
            return Err(Failure::conflict(
                "no_operation",
                format!("volume '{name}' has no operation running"),
            ));
        };
        let kind = v.operations[i].kind.clone();
        if !moves(&kind) {
            let why = match kind.as_str() {
                OP_NODE_LOST => "the lost node's replicas are gone: the replacement must finish",
                "resize" => "a resize is not undone: run `volume resize` to the size you want",
                OP_ADD_REPLICA => "undo it with `volume remove-replica` once it is done",
                OP_REMOVE_REPLICA => {
                    "the replica is being deleted: `volume add-replica` adds one back"
                }
                _ => "only a move or an evacuation can be aborted",
            };
            return Err(Failure::conflict(
                "not_abortable",
                format!("the {kind} operation of volume '{name}' cannot be aborted: {why}"),
            ));
        }
        if !v.placements.iter().any(|p| p.leaving) {
            return Err(Failure::conflict(
                "too_late",
                format!(
                    "the {kind} of volume '{name}' is past the point of return: the old copy \
                     already left the volume (it is being deleted)"
                ),
            ));
        }
        let added: Vec<String> = v.operations[i]
            .steps
            .iter()
            .filter(|s| s.name.starts_with(STEP_CREATE) || s.name.starts_with(STEP_WITNESS))
            .filter_map(|s| s.node.clone())
            .collect();
        let before: Vec<String> = v.placements.iter().map(|p| p.node.clone()).collect();
        let (dropped, kept): (Vec<Placement>, Vec<Placement>) = v
            .placements
            .drain(..)
            .partition(|p| added.contains(&p.node) && !p.leaving);
        v.placements = kept;
        for p in v.placements.iter_mut() {
            p.leaving = false;
        }
        let why = format!(
            "aborted by the operator: {} dropped, the volume stays on {}",
            if dropped.is_empty() {
                "nothing new".to_string()
            } else {
                dropped
                    .iter()
                    .map(|p| p.node.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            v.placements
                .iter()
                .map(|p| p.node.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
        let now = now_unix();
        ops::aborted(&mut v.operations[i], &why, now);
        v.removing.extend(dropped.into_iter().map(|mut p| {
            p.join = false;
            p
        }));
        let mut txn: Vec<TxnOp> = before.iter().map(|n| Self::bump(n)).collect();
        txn.push(TxnOp::put(
            format!("{VOLUMES}{}", v.name),
            encode(&v)?,
            Expect::Revision(rev),
        ));
        self.store.txn(txn)?;
        self.notify();
        tracing::info!(volume = name, kind = %kind, "{why}");
        Ok(self.volume_view(&v, &nodes))
    }

    /// `node evacuate NAME`: moves every replica and witness off a node, online. Per volume:
    /// a new replica on the online diskful node with most free space joins with a full
    /// resync (a witness moves to another online node), the Primary moves to a replica that
    /// stays, and once the new members are in sync the old placement is removed from the
    /// volume and its node deletes it. Volumes that cannot move are listed and left alone:
    /// a single-replica volume, or no node to move to.
    pub fn node_evacuate(&self, name: &str) -> Result<NodeLostResult, Failure> {
        validate_name("node", name)?;
        let _guard = self.write_guard();
        if self.node_record(name)?.is_none() {
            return Err(Failure::not_found(format!(
                "node '{name}' is not registered"
            )));
        }
        let nodes = self.nodes_by_name()?;
        let now = now_unix();
        let mut txn = Vec::new();
        let mut result = NodeLostResult {
            node: name.to_string(),
            volumes: Vec::new(),
        };
        let mut promised: HashMap<(String, String), u64> = HashMap::new();
        for (rev, mut v) in self.volume_records()? {
            let Some(idx) = v.placements.iter().position(|p| p.node == name) else {
                continue;
            };
            if v.state == VolumeState::Deleting {
                continue;
            }
            let mut note = Vec::new();
            if v.placements[idx].leaving {
                note.push("already being evacuated".to_string());
                result.volumes.push(NodeLostVolume {
                    volume: v.name.clone(),
                    actions: note,
                });
                continue;
            }
            let diskless = v.placements[idx].diskless;
            let mut steps = Vec::new();
            if !diskless {
                if v.placements.iter().filter(|p| !p.diskless).count() < 2 {
                    note.push(format!(
                        "not moved: its only replica is on {name} (single-replica volumes \
                         cannot move yet)"
                    ));
                    result.volumes.push(NodeLostVolume {
                        volume: v.name.clone(),
                        actions: note,
                    });
                    continue;
                }
                let Some((node, pool)) = self.best_pool(&nodes, &v, &promised, name) else {
                    note.push(
                        "not moved: no online diskful node without a replica of it".to_string(),
                    );
                    result.volumes.push(NodeLostVolume {
                        volume: v.name.clone(),
                        actions: note,
                    });
                    continue;
                };
                if let Err(why) = Self::plan_replica_move(
                    &nodes, &mut v, name, &node, &pool, &mut steps, &mut note,
                ) {
                    note.push(format!("not moved: {why}"));
                    result.volumes.push(NodeLostVolume {
                        volume: v.name.clone(),
                        actions: note,
                    });
                    continue;
                }
                *promised.entry((node, pool)).or_default() += v.size_bytes;
            } else {
                let Some(w) = self.witness_node(&nodes, &v, name, None) else {
                    note.push("not moved: no online node left for its witness".to_string());
                    result.volumes.push(NodeLostVolume {
                        volume: v.name.clone(),
                        actions: note,
                    });
                    continue;
                };
                add_witness(&mut v, w, &mut steps, &mut note);
            }
            steps.push(ops::step(
                format!(
                    "{STEP_REMOVE}{} on {name}",
                    if diskless { "witness" } else { "replica" }
                ),
                Some(name),
                ops::PENDING,
            ));
            v.placements[idx].leaving = true;
            v.operations.push(ops::new(OP_EVACUATE, steps, now));
            for p in &v.placements {
                txn.push(Self::bump(&p.node));
            }
            txn.push(TxnOp::put(
                format!("{VOLUMES}{}", v.name),
                encode(&v)?,
                Expect::Revision(rev),
            ));
            tracing::info!(volume = %v.name, node = name, "evacuating: {}", note.join("; "));
            result.volumes.push(NodeLostVolume {
                volume: v.name.clone(),
                actions: note,
            });
        }
        if !txn.is_empty() {
            self.store.txn(txn)?;
            self.notify();
        }
        Ok(result)
    }

    // ----- agents --------------------------------------------------------------------------

    /// Marks a node as being in contact until the returned guard is dropped.
    pub fn contact(self: &Arc<Self>, node: &str) -> ContactGuard {
        {
            let mut live = self.live_lock();
            let l = live.entry(node.to_string()).or_default();
            l.active += 1;
            l.last_seen = Some(SystemTime::now());
            l.left = false;
        }
        ContactGuard {
            ctl: Arc::clone(self),
            node: node.to_string(),
        }
    }

    /// `node`'s agent stops in an orderly way: the node is offline now (not only once
    /// `offline_after` has passed without contact), until the agent's next sync request.
    /// Sync requests it left unanswered (a long poll) do not keep it online.
    pub fn leave(&self, node: &str) {
        let mut live = self.live_lock();
        let l = live.entry(node.to_string()).or_default();
        l.left = true;
        l.last_seen = Some(SystemTime::now());
    }

    /// Forgets that `node` was in contact (an agent refused as not being that node).
    pub fn forget_contact(&self, node: &str) {
        self.live_lock().remove(node);
    }

    fn validate_report(node: &str, report: &AgentReport) -> Result<(), Failure> {
        validate_name("node", node)?;
        if report.node != node {
            return Err(Failure::bad_request(
                "bad_request",
                format!(
                    "the report is for node '{}' but was sent to the sync URL of node '{node}'",
                    report.node
                ),
            ));
        }
        for p in &report.pools {
            validate_name("pool", &p.name)?;
        }
        for r in &report.replicas {
            validate_name("volume", &r.volume)?;
            if !(r.diskless && r.pool.is_empty()) {
                validate_name("pool", &r.pool)?;
            }
        }
        Ok(())
    }

    /// Records an agent's report, advances volume states and operations from it, adopts
    /// replicas the controller does not know (rebuild), and returns the node's desired state.
    pub fn agent_sync(&self, node: &str, report: &AgentReport) -> Result<DesiredState, Failure> {
        Self::validate_report(node, report)?;
        let _guard = self.write_guard();
        if let Some(theirs) = report.cluster_id.as_deref().filter(|c| !c.is_empty()) {
            let ours = self.cluster_id();
            if theirs != ours {
                if self.store_is_empty()? {
                    tracing::warn!(node, ours = %ours, theirs,
                        "the store is empty: adopting the cluster id the agent is bound to (rebuild)");
                    self.set_cluster_id(theirs)?;
                } else {
                    tracing::warn!(node, ours = %ours, theirs, "agent of another cluster refused");
                    self.issues_lock().insert(
                        node.to_string(),
                        vec![ReconcileIssue {
                            node: node.to_string(),
                            volume: None,
                            code: "foreign_cluster".into(),
                            message: format!(
                                "node '{node}' is bound to cluster {theirs}, this controller \
                                 manages cluster {ours}; its report is ignored (point the agent \
                                 at its own controller, or import that cluster's state)"
                            ),
                        }],
                    );
                    return Ok(DesiredState {
                        cluster_id: ours,
                        revision: 0,
                        replicas: Vec::new(),
                        node_id: None,
                        cluster_secret: None,
                    });
                }
            }
        }
        let now = now_unix();
        let mut record = NodeRecord {
            name: node.to_string(),
            address: report.address.clone(),
            role: report.role,
            agent_version: report.agent_version.clone(),
            nbd_socket: report.nbd_socket.clone(),
            nbd_tcp: report.nbd_tcp.clone(),
            pools: report.pools.clone(),
            replicas: report.replicas.clone(),
            last_seen_unix: now,
            node_id: None,
            repl_addr: report.repl_addr.clone(),
            added: false,
        };
        let key = format!("{NODES}{node}");
        let mut changed_desired = false;
        match self.node_record(node)? {
            None => {
                let used = self
                    .node_records()?
                    .iter()
                    .filter_map(|n| n.node_id)
                    .collect();
                let id = free_node_id(&used)?;
                record.node_id = Some(id);
                tracing::info!(node, node_id = id, address = %report.address, "node registered");
                self.store.txn(vec![
                    TxnOp::put(key, encode(&record)?, Expect::Absent),
                    Self::bump(node),
                ])?;
                changed_desired = true;
            }
            Some((rev, old)) => {
                record.node_id = old.node_id;
                if old.added {
                    if old.address != record.address {
                        tracing::warn!(node, added = %old.address, reported = %record.address, "agent refused: not the address the node was added with");
                        return Err(Failure::conflict(
                            "address_mismatch",
                            format!(
                                "node '{node}' was added with address {} but its agent reports \
                                 {}: fix the agent's address, or `node remove` and `node add` \
                                 the node again",
                                old.address, record.address
                            ),
                        ));
                    }
                    record.role = old.role;
                    record.added = true;
                }
                if !old.same_report(&record) {
                    let mut txn = vec![TxnOp::put(
                        key.clone(),
                        encode(&record)?,
                        Expect::Revision(rev),
                    )];
                    if old.repl_addr != record.repl_addr {
                        // Every node sharing a volume with this one must learn the new address.
                        let mut peers: Vec<String> = Vec::new();
                        for (_, v) in self.volume_records()? {
                            if v.placements.iter().any(|p| p.node == node) {
                                peers.extend(v.placements.iter().map(|p| p.node.clone()));
                            }
                        }
                        peers.sort();
                        peers.dedup();
                        txn.extend(peers.iter().map(|n| Self::bump(n)));
                        changed_desired |= !peers.is_empty();
                    }
                    self.store.txn(txn)?;
                }
            }
        }
        let desired_rev = self.desired_revision(node)?;
        // The report reflects the node's current desired state (not one from before the
        // latest change): only then an error counts as a failed attempt, and a missing
        // replica as deleted.
        let current = report.applied_revision == desired_rev;
        // What the controller knows after this pass: name -> (uuid, size, nodes).
        let mut known: HashMap<String, (String, u64, Vec<String>)> = HashMap::new();
        for (rev, mut v) in self.volume_records()? {
            let here = v.placements.iter().any(|p| p.node == node);
            let reported = record.replica(&v.name, &v.uuid);
            let vkey = format!("{VOLUMES}{}", v.name);
            if here && v.state == VolumeState::Deleting && reported.is_none() && current {
                // Gone from the agent, and the agent has applied the desired state that
                // says so (not merely a report that predates the delete). The volume is
                // forgotten once every placement's replica is gone.
                let before = v.clone();
                if let Some(op) = v.open_operation_mut("delete")
                    && let Some(idx) = ops::open_step(op, node)
                {
                    ops::step_done(op, idx, now);
                }
                let waiting = v.open_operation_mut("delete").is_some_and(|op| {
                    op.steps
                        .iter()
                        .any(|s| s.node.is_some() && s.state != ops::DONE)
                });
                if waiting {
                    if before != v {
                        self.store.put(&vkey, &encode(&v)?, Expect::Revision(rev))?;
                    }
                    known.insert(
                        v.name.clone(),
                        (
                            v.uuid.clone(),
                            v.size_bytes,
                            v.placements.iter().map(|p| p.node.clone()).collect(),
                        ),
                    );
                    continue;
                }
                let mut txn = vec![TxnOp::delete(vkey, Expect::Revision(rev))];
                for p in &v.placements {
                    txn.push(Self::bump(&p.node));
                }
                self.store.txn(txn)?;
                changed_desired = true;
                tracing::info!(volume = %v.name, "volume deleted");
                continue;
            }
            known.insert(
                v.name.clone(),
                (
                    v.uuid.clone(),
                    v.size_bytes,
                    v.placements
                        .iter()
                        .chain(&v.removing)
                        .map(|p| p.node.clone())
                        .collect(),
                ),
            );
            if v.state != VolumeState::Deleting
                && (here || v.removing.iter().any(|p| p.node == node))
            {
                let orig = v.clone();
                if v.advance_membership(node, reported, current, now) {
                    // Members changed: every node of the volume (old and new) re-applies.
                    let mut txn =
                        vec![TxnOp::put(vkey.clone(), encode(&v)?, Expect::Revision(rev))];
                    let mut nodes: Vec<&str> = orig
                        .placements
                        .iter()
                        .chain(&orig.removing)
                        .chain(&v.placements)
                        .map(|p| p.node.as_str())
                        .collect();
                    nodes.sort();
                    nodes.dedup();
                    txn.extend(nodes.into_iter().map(Self::bump));
                    self.store.txn(txn)?;
                    changed_desired = true;
                    tracing::info!(volume = %v.name, node, "membership changed");
                    // The next report continues from the stored record.
                    continue;
                } else if orig != v {
                    self.store.put(&vkey, &encode(&v)?, Expect::Revision(rev))?;
                    continue;
                }
            }
            let Some(r) = reported.filter(|_| here) else {
                // Something else of this name is in the way on this node (files without
                // metadata, an older volume's replica): the create step fails with its error.
                if here
                    && v.state == VolumeState::Creating
                    && let Some(other) = record.replicas.iter().find(|r| r.volume == v.name)
                {
                    let err = other.last_error.clone().unwrap_or_else(|| {
                        format!(
                            "node '{node}' holds another replica named '{}' (uuid {})",
                            v.name,
                            if other.volume_uuid.is_empty() {
                                "unreadable"
                            } else {
                                &other.volume_uuid
                            }
                        )
                    });
                    let before = v.clone();
                    if let Some(op) = v.open_operation_mut("create")
                        && let Some(idx) = ops::open_step(op, node)
                    {
                        ops::step_failed(op, idx, &err, current, now);
                    }
                    if before != v {
                        self.store.put(&vkey, &encode(&v)?, Expect::Revision(rev))?;
                    }
                }
                continue;
            };
            let before = v.clone();
            match v.state {
                VolumeState::Deleting => {
                    if let Some(op) = v.open_operation_mut("delete")
                        && let Some(idx) = ops::open_step(op, node)
                        && let Some(err) = &r.last_error
                        && ops::step_failed(op, idx, err, current, now)
                    {
                        tracing::warn!(volume = %before.name, node, attempt = op.attempts,
                            retry_in = ops::backoff_secs(op.attempts), "delete step failed: {err}");
                    }
                }
                VolumeState::Creating | VolumeState::Ready => {
                    let diskless_here = v.placements.iter().any(|p| p.node == node && p.diskless);
                    if let Some(op) = v.open_operation_mut("create")
                        && let Some(idx) = ops::open_step(op, node)
                    {
                        if r.disk_state == DiskState::UpToDate
                            || (diskless_here && r.disk_state == DiskState::Diskless)
                        {
                            ops::step_done(op, idx, now);
                        } else if let Some(err) = r.last_error.clone().or_else(|| {
                            (r.disk_state == DiskState::Failed)
                                .then(|| format!("replica on node '{node}' is Failed"))
                        }) && ops::step_failed(op, idx, &err, current, now)
                        {
                            tracing::warn!(volume = %before.name, node, attempt = op.attempts,
                                retry_in = ops::backoff_secs(op.attempts), "create step failed: {err}");
                        }
                    }
                    // Resize: the backing store step is done once the replica reports the
                    // new size (committed in its metadata), the volume size step once its
                    // export (if any) shows it too.
                    let target = v.size_bytes;
                    if let Some(op) = v.open_operation_mut("resize") {
                        while let Some(idx) = ops::open_step(op, node) {
                            let size_step = op.steps[idx].name.starts_with("volume size");
                            let ok = r.size_bytes == target
                                && (!size_step || r.export_size_bytes.is_none_or(|s| s == target));
                            if ok {
                                ops::step_done(op, idx, now);
                                continue;
                            }
                            if let Some(err) =
                                r.last_error.clone().filter(|e| e.starts_with("resize"))
                                && ops::step_failed(op, idx, &err, current, now)
                            {
                                tracing::warn!(volume = %before.name, node, attempt = op.attempts,
                                    retry_in = ops::backoff_secs(op.attempts), "resize step failed: {err}");
                            }
                            break;
                        }
                    }
                    // Ready once every placement's step is done (each replica exists).
                    if v.state == VolumeState::Creating
                        && (r.disk_state == DiskState::UpToDate
                            || (diskless_here && r.disk_state == DiskState::Diskless))
                        && v.open_operation_mut("create").is_none()
                    {
                        v.state = VolumeState::Ready;
                        tracing::info!(volume = %v.name, node, "volume ready");
                    }
                    Self::verify_progress(&mut v, node, r, current, now);
                    Self::resolve_progress(&mut v, node, r, now);
                }
            }
            if before != v {
                self.store.put(&vkey, &encode(&v)?, Expect::Revision(rev))?;
            }
        }
        // Volumes with a resize under way: replicas of different sizes are expected.
        let resizing: std::collections::HashSet<String> = self
            .volume_records()?
            .into_iter()
            .filter(|(_, v)| {
                v.operations
                    .iter()
                    .any(|o| o.kind == "resize" && !ops::is_finished(o))
            })
            .map(|(_, v)| v.name)
            .collect();
        let (issues, adopted) = self.adopt_unknown(node, &record, &mut known, &resizing, now)?;
        changed_desired |= adopted;
        self.issues_lock().insert(node.to_string(), issues);
        if changed_desired {
            self.notify();
        }
        self.desired_state(node)
    }

    /// Rebuild: creates volumes for replicas on disk the controller does not know; returns the
    /// node's reconciliation issues and whether a volume was adopted.
    fn adopt_unknown(
        &self,
        node: &str,
        record: &NodeRecord,
        known: &mut HashMap<String, (String, u64, Vec<String>)>,
        resizing: &std::collections::HashSet<String>,
        now: u64,
    ) -> Result<(Vec<ReconcileIssue>, bool), Failure> {
        let mut issues = Vec::new();
        let mut adopted = false;
        let issue = |volume: &str, code: &str, message: String| ReconcileIssue {
            node: node.to_string(),
            volume: Some(volume.to_string()),
            code: code.to_string(),
            message,
        };
        for r in &record.replicas {
            match known.get_mut(&r.volume) {
                Some((uuid, size, nodes)) if *uuid == r.volume_uuid => {
                    if !nodes.iter().any(|n| n == node)
                        && r.on_disk
                        && !r.diskless
                        && r.size_bytes == *size
                        && self.adopt_more(node, r)?
                    {
                        nodes.push(node.to_string());
                        adopted = true;
                    } else if !nodes.iter().any(|n| n == node) {
                        issues.push(issue(
                            &r.volume,
                            "extra_replica",
                            format!(
                                "node '{node}' has a replica of volume '{}' (uuid {uuid}) that \
                                 the controller places on {} only; it is left alone",
                                r.volume,
                                nodes.join(", ")
                            ),
                        ));
                    } else if r.on_disk && r.size_bytes != *size && !resizing.contains(&r.volume) {
                        issues.push(issue(
                            &r.volume,
                            "size_mismatch",
                            format!(
                                "the replica of volume '{}' on node '{node}' has {}, the volume \
                                 has {}",
                                r.volume,
                                format_size(r.size_bytes),
                                format_size(*size)
                            ),
                        ));
                    }
                }
                Some((uuid, _, nodes)) => {
                    if r.on_disk {
                        issues.push(issue(
                            &r.volume,
                            "uuid_mismatch",
                            format!(
                                "node '{node}' has a replica of volume '{}' with uuid {}, but the \
                                 controller knows '{}' as uuid {uuid} (on {}); not adopted: \
                                 delete one of them, or export the state, fix it and import it",
                                r.volume,
                                if r.volume_uuid.is_empty() {
                                    "(unreadable)"
                                } else {
                                    &r.volume_uuid
                                },
                                r.volume,
                                nodes.join(", ")
                            ),
                        ));
                    }
                }
                None => {
                    if !r.on_disk {
                        // A failed creation the controller no longer asks for: the agent
                        // drops it with its next apply.
                        continue;
                    }
                    if uuid::Uuid::parse_str(&r.volume_uuid).is_err() {
                        issues.push(issue(
                            &r.volume,
                            "unreadable_replica",
                            format!(
                                "node '{node}' reports files of volume '{}' without a readable \
                                 volume uuid ({}); not adopted",
                                r.volume,
                                r.last_error.as_deref().unwrap_or("no metadata")
                            ),
                        ));
                        continue;
                    }
                    if let Err(f) = validate_size(r.size_bytes) {
                        issues.push(issue(
                            &r.volume,
                            "unreadable_replica",
                            format!(
                                "node '{node}' reports volume '{}' with an unusable size: {}; not adopted",
                                r.volume, f.message
                            ),
                        ));
                        continue;
                    }
                    let v = VolumeRecord {
                        name: r.volume.clone(),
                        uuid: r.volume_uuid.clone(),
                        size_bytes: r.size_bytes,
                        protocol: Protocol::default(),
                        replica_count: 1,
                        state: VolumeState::Ready,
                        placements: vec![Placement {
                            node: node.to_string(),
                            pool: r.pool.clone(),
                            diskless: false,
                            join: false,
                            leaving: false,
                        }],
                        operations: vec![ops::new(
                            "adopt",
                            vec![ops::step(
                                format!("adopt the replica reported by {node}:{}", r.pool),
                                None,
                                ops::DONE,
                            )],
                            now,
                        )],
                        created_unix: now,
                        primary_node: None,
                        primary_explicit: false,
                        primary_forced: None,
                        resync_rate: 0,
                        resync_min_rate: tandem_api::DEFAULT_RESYNC_MIN_RATE,
                        removing: Vec::new(),
                        verify_request: None,
                        last_verify: None,
                        after_split_brain: default_split_brain(),
                        resolve: None,
                        resync_checksums: false,
                        allow_two_primaries: false,
                        second_primary: None,
                        on_no_quorum: OnNoQuorum::IoError,
                    };
                    self.store.txn(vec![
                        TxnOp::put(format!("{VOLUMES}{}", v.name), encode(&v)?, Expect::Absent),
                        Self::bump(node),
                    ])?;
                    tracing::info!(volume = %v.name, uuid = %v.uuid, node, pool = %r.pool,
                        size = v.size_bytes, "volume adopted from the agent's report");
                    known.insert(
                        v.name.clone(),
                        (v.uuid.clone(), v.size_bytes, vec![node.to_string()]),
                    );
                    adopted = true;
                }
            }
        }
        Ok((issues, adopted))
    }

    /// Rebuild of a volume with several replicas: another node reports a replica (same uuid and
    /// size) of a volume that was itself learnt from a report; it becomes one more placement.
    /// Returns whether it was added.
    fn adopt_more(&self, node: &str, r: &ReplicaReport) -> Result<bool, Failure> {
        let Some((rev, mut v)) = self.volume_record(&r.volume)? else {
            return Ok(false);
        };
        let learnt = v.operations.first().is_some_and(|o| o.kind == "adopt");
        if !learnt || v.uuid != r.volume_uuid || v.state == VolumeState::Deleting {
            return Ok(false);
        }
        if v.placements.iter().any(|p| p.node == node) {
            return Ok(false);
        }
        v.placements.push(Placement {
            node: node.to_string(),
            pool: r.pool.clone(),
            diskless: false,
            join: false,
            leaving: false,
        });
        v.replica_count = v.placements.iter().filter(|p| !p.diskless).count() as u32;
        if let Some(op) = v.operations.first_mut() {
            op.steps.push(ops::step(
                format!("adopt the replica reported by {node}:{}", r.pool),
                None,
                ops::DONE,
            ));
        }
        let mut txn = vec![TxnOp::put(
            format!("{VOLUMES}{}", v.name),
            encode(&v)?,
            Expect::Revision(rev),
        )];
        txn.extend(v.placements.iter().map(|p| Self::bump(&p.node)));
        self.store.txn(txn)?;
        tracing::info!(volume = %v.name, node, pool = %r.pool,
            "another replica of an adopted volume added from the agent's report");
        Ok(true)
    }

    /// Starts every operation attempt whose retry time has come; returns how many volumes
    /// changed. Called by the controller's retry timer.
    pub fn retry_due(&self) -> Result<usize, Failure> {
        let now = now_unix();
        let _guard = self.write_guard();
        let mut changed = 0;
        for (rev, mut v) in self.volume_records()? {
            if !v.operations.iter().any(|o| ops::retry_due(o, now)) {
                continue;
            }
            let mut nodes: Vec<String> = Vec::new();
            for op in v.operations.iter_mut().filter(|o| ops::retry_due(o, now)) {
                let n = ops::start_retry(op, now);
                tracing::info!(volume = %v.name, kind = %op.kind, attempt = op.attempts, "retrying");
                nodes.extend(n);
            }
            nodes.sort();
            nodes.dedup();
            let mut txn = vec![TxnOp::put(
                format!("{VOLUMES}{}", v.name),
                encode(&v)?,
                Expect::Revision(rev),
            )];
            txn.extend(nodes.iter().map(|n| Self::bump(n)));
            self.store.txn(txn)?;
            changed += 1;
        }
        if changed > 0 {
            self.notify();
        }
        Ok(changed)
    }

    /// What the node's agent should have.
    pub fn desired_state(&self, node: &str) -> Result<DesiredState, Failure> {
        let revision = self.desired_revision(node)?;
        let nodes = self.nodes_by_name()?;
        let node_id = nodes.get(node).and_then(|n| n.node_id);
        let mut replicas = Vec::new();
        for (_, v) in self.volume_records()? {
            // Evacuated from this node: delete it here (no peers: it is no member any more).
            for p in v.removing.iter().filter(|p| p.node == node) {
                replicas.push(DesiredReplica {
                    volume: v.name.clone(),
                    volume_uuid: v.uuid.clone(),
                    pool: p.pool.clone(),
                    size_bytes: v.size_bytes,
                    present: false,
                    diskless: p.diskless,
                    protocol: v.protocol,
                    node_id,
                    peers: Vec::new(),
                    primary: false,
                    force_primary: false,
                    join: false,
                    resync_rate_bytes_per_sec: v.resync_rate,
                    resync_min_rate_bytes_per_sec: v.resync_min_rate,
                    verify: None,
                    after_split_brain: v.after_split_brain.clone(),
                    resolve_split_brain: None,
                    resync_checksums: v.resync_checksums,
                    allow_two_primaries: v.allow_two_primaries,
                    on_no_quorum: v.on_no_quorum,
                });
            }
            for p in v.placements.iter().filter(|p| p.node == node) {
                let mut peers = Vec::new();
                for o in v.placements.iter().filter(|o| o.node != node) {
                    let Some(id) = nodes.get(&o.node).and_then(|n| n.node_id) else {
                        tracing::warn!(volume = %v.name, peer = %o.node,
                            "peer has no node id (not registered): left out of the peer list");
                        continue;
                    };
                    peers.push(DesiredPeer {
                        node: o.node.clone(),
                        node_id: id,
                        repl_addr: nodes.get(&o.node).and_then(|n| n.repl_addr.clone()),
                        diskless: o.diskless,
                    });
                }
                replicas.push(DesiredReplica {
                    volume: v.name.clone(),
                    volume_uuid: v.uuid.clone(),
                    pool: p.pool.clone(),
                    size_bytes: v.size_bytes,
                    present: v.state != VolumeState::Deleting,
                    diskless: p.diskless,
                    protocol: v.protocol,
                    node_id,
                    peers,
                    primary: v.wants_primary(&p.node),
                    force_primary: v.desired_primary() == Some(p.node.as_str())
                        && v.primary_forced.as_deref() == Some(p.node.as_str()),
                    join: p.join,
                    resync_rate_bytes_per_sec: v.resync_rate,
                    resync_min_rate_bytes_per_sec: v.resync_min_rate,
                    verify: Self::desired_verify(&v, node),
                    after_split_brain: v.after_split_brain.clone(),
                    resolve_split_brain: Self::desired_resolve(&v, node),
                    resync_checksums: v.resync_checksums,
                    allow_two_primaries: v.allow_two_primaries,
                    on_no_quorum: v.on_no_quorum,
                });
            }
        }
        Ok(DesiredState {
            cluster_id: self.cluster_id(),
            revision,
            replicas,
            node_id,
            cluster_secret: Some(self.cluster_secret.clone()),
        })
    }

    /// The node's desired revision (cheap; used by long polls).
    pub fn node_desired_revision(&self, node: &str) -> Result<u64, Failure> {
        self.desired_revision(node)
    }
}

/// Keeps a node online while one of its sync requests is in flight.
pub struct ContactGuard {
    ctl: Arc<Controller>,
    node: String,
}

impl Drop for ContactGuard {
    fn drop(&mut self) {
        let mut live = self.ctl.live_lock();
        if let Some(l) = live.get_mut(&self.node) {
            l.active = l.active.saturating_sub(1);
            l.last_seen = Some(SystemTime::now());
        }
    }
}

/// Status helper for failures that are not the caller's fault.
pub fn join_failure(e: tokio::task::JoinError) -> Failure {
    Failure::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal",
        format!("request handler failed: {e}"),
    )
}

/// One word for a replica's replication towards all its peers: `Unknown` before the agent
/// reports peers, the common state when all agree, else the first peer not `Established`.
fn repl_summary(peers: &[tandem_api::PeerReplState]) -> String {
    let Some(first) = peers.first() else {
        return "Unknown".to_string();
    };
    if peers.iter().all(|p| p.repl_state == first.repl_state) {
        return first.repl_state.clone();
    }
    peers
        .iter()
        .find(|p| p.repl_state != "Established")
        .map(|p| p.repl_state.clone())
        .unwrap_or_else(|| first.repl_state.clone())
}

#[cfg(test)]
mod node_id_tests {
    use super::*;

    #[test]
    fn node_ids_capped_at_replica_metadata_limit() {
        assert_eq!(MAX_NODE_ID, 31);
        let mut used = std::collections::BTreeSet::new();
        for i in 0..=31u8 {
            assert_eq!(free_node_id(&used).unwrap(), i);
            used.insert(i);
        }
        let err = free_node_id(&used).unwrap_err();
        let text = format!("{err:?}");
        assert!(text.contains("no_node_id"), "{text}");
        assert!(text.contains("0..=31"), "{text}");
        // a freed id is reused only once its node is gone
        used.remove(&7);
        assert_eq!(free_node_id(&used).unwrap(), 7);
    }
}

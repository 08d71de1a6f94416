//! State export and import (`GET /v1/state`, `POST /v1/state`): the whole desired state as a
//! versioned [`StateDocument`] (cluster id, nodes, volumes with uuids, placements, options and
//! operations; no live data such as pool usage or replica states).
//!
//! Import rules:
//! * the document is validated completely first (format version, names, uuids, sizes,
//!   duplicates, placements); nothing is written unless all of it is acceptable;
//! * into an empty store (no node, no volume) it is written as is, and the controller takes
//!   the document's cluster id;
//! * into a non-empty store it is refused with `import_conflict` when anything conflicts: a
//!   different cluster id, a volume of the same name with another uuid, size or placement.
//!   Volumes that match (same uuid, size and placement) take the document's copy (options,
//!   operations); volumes only in the store stay; nodes already known keep their live record;
//! * `replace=true` drops every node and volume record first, then writes the document. The
//!   agents are not touched: a replica the document does not mention stays on its node and is
//!   adopted again from the agent's next report.

use std::collections::{BTreeMap, BTreeSet};

use tandem_api::{
    NodeSpec, PlacementSpec, STATE_FORMAT_VERSION, StateDocument, StateImportResult, VolumeSpec,
};
use tandem_store::{Expect, TxnOp};
use tandem_types::validate_name;

use crate::error::Failure;
use crate::state::{
    CLUSTER_ID_KEY, Controller, DESIRED, NODES, NodeRecord, Placement, VOLUMES, VolumeRecord,
    encode, now_unix, validate_size,
};

/// Most problems listed in one refusal message.
const MAX_LISTED: usize = 10;

fn invalid(msg: impl Into<String>) -> Failure {
    Failure::bad_request("invalid_state", msg)
}

fn spec_of(v: &VolumeRecord) -> VolumeSpec {
    VolumeSpec {
        name: v.name.clone(),
        uuid: v.uuid.clone(),
        size_bytes: v.size_bytes,
        protocol: v.protocol,
        replica_count: v.replica_count,
        state: v.state,
        placements: v
            .placements
            .iter()
            .map(|p| PlacementSpec {
                node: p.node.clone(),
                pool: p.pool.clone(),
                diskless: p.diskless,
            })
            .collect(),
        operations: v.operations.clone(),
        created_unix: v.created_unix,
        primary_node: v.primary_node.clone(),
        primary_explicit: v.primary_explicit,
        resync_rate_bytes_per_sec: v.resync_rate,
        resync_min_rate_bytes_per_sec: v.resync_min_rate,
        after_split_brain: v.after_split_brain.clone(),
        resync_checksums: v.resync_checksums,
        allow_two_primaries: v.allow_two_primaries,
        second_primary_node: v.second_primary().map(str::to_string),
        on_no_quorum: v.on_no_quorum,
    }
}

fn record_of(v: &VolumeSpec) -> VolumeRecord {
    VolumeRecord {
        name: v.name.clone(),
        uuid: v.uuid.clone(),
        size_bytes: v.size_bytes,
        protocol: v.protocol,
        replica_count: v.replica_count,
        state: v.state,
        placements: v
            .placements
            .iter()
            .map(|p| Placement {
                node: p.node.clone(),
                pool: p.pool.clone(),
                diskless: p.diskless,
                join: false,
                leaving: false,
            })
            .collect(),
        operations: v.operations.clone(),
        created_unix: v.created_unix,
        primary_node: v.primary_node.clone(),
        primary_explicit: v.primary_explicit,
        primary_forced: None,
        resync_rate: v.resync_rate_bytes_per_sec,
        resync_min_rate: v.resync_min_rate_bytes_per_sec,
        removing: Vec::new(),
        verify_request: None,
        last_verify: None,
        after_split_brain: v.after_split_brain.clone(),
        resolve: None,
        resync_checksums: v.resync_checksums,
        allow_two_primaries: v.allow_two_primaries,
        second_primary: v.second_primary_node.clone(),
        on_no_quorum: v.on_no_quorum,
    }
}

fn joined(problems: &[String]) -> String {
    let mut s = problems
        .iter()
        .take(MAX_LISTED)
        .cloned()
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > MAX_LISTED {
        s.push_str(&format!("; and {} more", problems.len() - MAX_LISTED));
    }
    s
}

/// Checks a document on its own (no store access).
pub fn validate(doc: &StateDocument) -> Result<(), Failure> {
    if doc.format_version != STATE_FORMAT_VERSION {
        return Err(Failure::bad_request(
            "unsupported_format_version",
            format!(
                "state document format_version {} is not supported: this controller reads \
                 format_version {STATE_FORMAT_VERSION} (export the state again with a matching \
                 release)",
                doc.format_version
            ),
        ));
    }
    validate_name("cluster id", &doc.cluster_id)
        .map_err(|e| invalid(format!("cluster_id: {e}")))?;
    let mut nodes = BTreeSet::new();
    for n in &doc.nodes {
        validate_name("node", &n.name).map_err(|e| invalid(e.to_string()))?;
        if !nodes.insert(n.name.as_str()) {
            return Err(invalid(format!("node '{}' appears twice", n.name)));
        }
        if n.address.is_empty() || n.address.len() > 255 {
            return Err(invalid(format!(
                "node '{}' has an empty or overlong address",
                n.name
            )));
        }
    }
    let mut names = BTreeSet::new();
    let mut uuids = BTreeSet::new();
    for v in &doc.volumes {
        validate_name("volume", &v.name).map_err(|e| invalid(e.to_string()))?;
        if !names.insert(v.name.as_str()) {
            return Err(invalid(format!("volume '{}' appears twice", v.name)));
        }
        if uuid::Uuid::parse_str(&v.uuid).is_err() {
            return Err(invalid(format!(
                "volume '{}' has an invalid uuid '{}'",
                v.name, v.uuid
            )));
        }
        if !uuids.insert(v.uuid.as_str()) {
            return Err(invalid(format!(
                "uuid {} is used by more than one volume",
                v.uuid
            )));
        }
        validate_size(v.size_bytes)
            .map_err(|f| invalid(format!("volume '{}': {}", v.name, f.message)))?;
        if v.replica_count == 0 || v.replica_count > 16 {
            return Err(invalid(format!(
                "volume '{}' has replica_count {}; it must be 1 to 16",
                v.name, v.replica_count
            )));
        }
        if v.placements.is_empty() {
            return Err(invalid(format!("volume '{}' has no placement", v.name)));
        }
        let mut on = BTreeSet::new();
        for p in &v.placements {
            validate_name("node", &p.node).map_err(|e| invalid(e.to_string()))?;
            if p.diskless {
                if !p.pool.is_empty() {
                    return Err(invalid(format!(
                        "volume '{}': the diskless placement on node '{}' names a pool",
                        v.name, p.node
                    )));
                }
            } else {
                validate_name("pool", &p.pool).map_err(|e| invalid(e.to_string()))?;
            }
            if !on.insert(p.node.as_str()) {
                return Err(invalid(format!(
                    "volume '{}' is placed twice on node '{}'",
                    v.name, p.node
                )));
            }
            if !nodes.contains(p.node.as_str()) {
                return Err(invalid(format!(
                    "volume '{}' is placed on node '{}', which the document does not list",
                    v.name, p.node
                )));
            }
        }
        if let Some(n) = &v.primary_node
            && !v.placements.iter().any(|p| &p.node == n && !p.diskless)
        {
            return Err(invalid(format!(
                "volume '{}': primary_node '{n}' holds no diskful placement of it",
                v.name
            )));
        }
        if let Some(n) = &v.second_primary_node {
            if !v.allow_two_primaries {
                return Err(invalid(format!(
                    "volume '{}': second_primary_node '{n}' without allow_two_primaries (the \
                     dual-primary window is closed)",
                    v.name
                )));
            }
            if !v.placements.iter().any(|p| &p.node == n) {
                return Err(invalid(format!(
                    "volume '{}': second_primary_node '{n}' holds no placement of it",
                    v.name
                )));
            }
            if v.primary_node.as_ref() == Some(n) {
                return Err(invalid(format!(
                    "volume '{}': second_primary_node '{n}' is its primary_node too",
                    v.name
                )));
            }
        }
        if v.allow_two_primaries && v.protocol != tandem_api::Protocol::C {
            return Err(invalid(format!(
                "volume '{}': allow_two_primaries needs protocol C",
                v.name
            )));
        }
        for o in &v.operations {
            if !(0.0..=1.0).contains(&o.progress) {
                return Err(invalid(format!(
                    "volume '{}': operation '{}' has progress {} outside 0..1",
                    v.name, o.kind, o.progress
                )));
            }
        }
    }
    Ok(())
}

impl Controller {
    /// The whole desired state.
    pub fn export_state(&self) -> Result<StateDocument, Failure> {
        let nodes = self
            .node_records()?
            .into_iter()
            .map(|n| NodeSpec {
                name: n.name,
                address: n.address,
                role: n.role,
                node_id: n.node_id,
            })
            .collect();
        let volumes = self
            .volume_records()?
            .iter()
            .map(|(_, v)| spec_of(v))
            .collect();
        Ok(StateDocument {
            format_version: STATE_FORMAT_VERSION,
            cluster_id: self.cluster_id(),
            exported_unix: now_unix(),
            controller_version: env!("CARGO_PKG_VERSION").to_string(),
            nodes,
            volumes,
        })
    }

    /// Imports a state document (see the module docs for the rules).
    pub fn import_state(
        &self,
        doc: &StateDocument,
        replace: bool,
    ) -> Result<StateImportResult, Failure> {
        validate(doc)?;
        let _guard = self.write_guard();
        let ours = self.cluster_id();
        let empty = self.store_is_empty()?;
        let existing_nodes: BTreeMap<String, NodeRecord> = self
            .node_records()?
            .into_iter()
            .map(|n| (n.name.clone(), n))
            .collect();
        let existing_volumes: BTreeMap<String, (u64, VolumeRecord)> = self
            .volume_records()?
            .into_iter()
            .map(|(rev, v)| (v.name.clone(), (rev, v)))
            .collect();

        let mut txn: Vec<TxnOp> = Vec::new();
        let mut touched_nodes = BTreeSet::new();
        let mut imported = 0u32;
        let mut matched = 0u32;
        let mut nodes_imported = 0u32;
        if replace {
            for key in self
                .store
                .list(NODES)?
                .into_iter()
                .chain(self.store.list(VOLUMES)?)
                .map(|e| e.key)
            {
                txn.push(TxnOp::delete(key, Expect::Any));
            }
            for (_, v) in existing_volumes.values() {
                touched_nodes.extend(v.placements.iter().map(|p| p.node.clone()));
            }
            touched_nodes.extend(existing_nodes.keys().cloned());
        } else if !empty {
            let mut problems = Vec::new();
            if doc.cluster_id != ours {
                problems.push(format!(
                    "the document is of cluster {}, this controller manages cluster {ours}",
                    doc.cluster_id
                ));
            }
            for v in &doc.volumes {
                let Some((_, have)) = existing_volumes.get(&v.name) else {
                    continue;
                };
                let same_place = have.placements.len() == v.placements.len()
                    && have.placements.iter().zip(&v.placements).all(|(a, b)| {
                        a.node == b.node && a.pool == b.pool && a.diskless == b.diskless
                    });
                if have.uuid != v.uuid {
                    problems.push(format!(
                        "volume '{}' exists with uuid {} (the document has {})",
                        v.name, have.uuid, v.uuid
                    ));
                } else if have.size_bytes != v.size_bytes {
                    problems.push(format!(
                        "volume '{}' has {} bytes here, {} in the document",
                        v.name, have.size_bytes, v.size_bytes
                    ));
                } else if !same_place {
                    problems.push(format!(
                        "volume '{}' is placed differently here than in the document",
                        v.name
                    ));
                }
            }
            for v in existing_volumes.values().map(|(_, v)| v) {
                if let Some(other) = doc
                    .volumes
                    .iter()
                    .find(|d| d.uuid == v.uuid && d.name != v.name)
                {
                    problems.push(format!(
                        "uuid {} is volume '{}' here but '{}' in the document",
                        v.uuid, v.name, other.name
                    ));
                }
            }
            if !problems.is_empty() {
                return Err(Failure::conflict(
                    "import_conflict",
                    format!(
                        "the controller's store is not empty and conflicts with the document: \
                         {}. Import into an empty store, or replace the store's nodes and \
                         volumes with the document (`tandem state import --replace FILE`, \
                         POST /v1/state?replace=true)",
                        joined(&problems)
                    ),
                ));
            }
        }

        // Node ids: the document's where they are free, otherwise the lowest free one.
        let mut used_ids: BTreeSet<u8> = if replace {
            BTreeSet::new()
        } else {
            existing_nodes.values().filter_map(|n| n.node_id).collect()
        };
        for n in &doc.nodes {
            if !replace && existing_nodes.contains_key(&n.name) {
                continue;
            }
            let node_id = match n.node_id {
                Some(id) if id <= crate::state::MAX_NODE_ID && !used_ids.contains(&id) => id,
                _ => crate::state::free_node_id(&used_ids)?,
            };
            used_ids.insert(node_id);
            let record = NodeRecord {
                node_id: Some(node_id),
                repl_addr: None,
                name: n.name.clone(),
                address: n.address.clone(),
                role: n.role,
                agent_version: String::new(),
                nbd_socket: None,
                nbd_tcp: None,
                pools: Vec::new(),
                replicas: Vec::new(),
                last_seen_unix: 0,
                added: false,
            };
            let expect = if replace { Expect::Any } else { Expect::Absent };
            if replace {
                // The delete of this key is already in the transaction: replace it.
                let key = format!("{NODES}{}", n.name);
                txn.retain(|op| op.key() != key);
            }
            txn.push(TxnOp::put(
                format!("{NODES}{}", n.name),
                encode(&record)?,
                expect,
            ));
            touched_nodes.insert(n.name.clone());
            nodes_imported += 1;
        }
        for v in &doc.volumes {
            let key = format!("{VOLUMES}{}", v.name);
            let expect = match existing_volumes.get(&v.name) {
                _ if replace => {
                    txn.retain(|op| op.key() != key);
                    Expect::Any
                }
                Some((rev, _)) => {
                    matched += 1;
                    Expect::Revision(*rev)
                }
                None => Expect::Absent,
            };
            if !matches!(expect, Expect::Revision(_)) {
                imported += 1;
            }
            txn.push(TxnOp::put(key, encode(&record_of(v))?, expect));
            touched_nodes.extend(v.placements.iter().map(|p| p.node.clone()));
        }
        if doc.cluster_id != ours {
            let expect = match self.store.get(CLUSTER_ID_KEY)? {
                Some((rev, _)) => Expect::Revision(rev),
                None => Expect::Absent,
            };
            txn.push(TxnOp::put(CLUSTER_ID_KEY, encode(&doc.cluster_id)?, expect));
        }
        for n in &touched_nodes {
            let key = format!("{DESIRED}{n}");
            txn.retain(|op| op.key() != key);
            txn.push(Self::bump(n));
        }
        self.store.txn(txn)?;
        if doc.cluster_id != ours {
            self.set_cluster_id_in_memory(&doc.cluster_id);
        }
        self.notify();
        tracing::info!(cluster_id = %doc.cluster_id, imported, matched, nodes_imported, replace,
            "state imported");
        Ok(StateImportResult {
            cluster_id: doc.cluster_id.clone(),
            volumes_imported: imported,
            volumes_matched: matched,
            nodes_imported,
            replaced: replace,
        })
    }
}

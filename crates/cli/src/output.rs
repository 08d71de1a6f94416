//! Human output: aligned tables and size formatting. JSON output is the API types verbatim.

use tandem_api::{ClusterStatus, Node, Operation, Pool, Volume};
use tandem_types::{format_iec, format_size};

/// A plain aligned table with a header row.
pub struct Table {
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(header: &[&str]) -> Self {
        Table {
            header: header.iter().map(|s| s.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let cols = self.header.len();
        let mut width = vec![0usize; cols];
        for r in std::iter::once(&self.header).chain(self.rows.iter()) {
            for (i, c) in r.iter().enumerate().take(cols) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let mut out = String::new();
        for r in std::iter::once(&self.header).chain(self.rows.iter()) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(cols) {
                if i + 1 == cols {
                    line.push_str(c);
                } else {
                    line.push_str(&format!("{c:<w$}  ", w = width[i]));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// `1073741824 (1.00 GiB)`: exact bytes and an IEC value, for table cells.
pub fn size_cell(bytes: u64) -> String {
    if bytes < 1024 {
        format!("{bytes} B")
    } else {
        format!("{bytes} ({})", format_iec(bytes))
    }
}

pub fn nodes_table(nodes: &[Node]) -> String {
    let mut t = Table::new(&[
        "NODE",
        "ROLE",
        "STATE",
        "ADDRESS",
        "LAST SEEN",
        "NBD SOCKET",
        "NBD TCP",
        "ID",
        "REPLICATION",
    ]);
    for n in nodes {
        t.row(vec![
            n.name.clone(),
            format!("{:?}", n.role).to_lowercase(),
            format!("{:?}", n.state).to_lowercase(),
            n.address.clone(),
            if n.last_seen_secs == u64::MAX {
                "never".to_string()
            } else {
                format!("{}s ago", n.last_seen_secs)
            },
            n.nbd_socket.clone().unwrap_or_else(|| "-".into()),
            n.nbd_tcp.clone().unwrap_or_else(|| "-".into()),
            n.node_id.map_or_else(|| "-".into(), |i| i.to_string()),
            n.repl_addr.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    t.render()
}

pub fn pools_table(pools: &[Pool]) -> String {
    let mut t = Table::new(&[
        "NODE",
        "POOL",
        "KIND",
        "CAPACITY",
        "FREE",
        "PROVISIONED",
        "PATH",
    ]);
    for p in pools {
        t.row(vec![
            p.node.clone(),
            p.name.clone(),
            format!("{:?}", p.kind).to_lowercase(),
            size_cell(p.capacity_bytes),
            size_cell(p.free_bytes),
            size_cell(p.provisioned_bytes),
            p.path.clone(),
        ]);
    }
    t.render()
}

/// The role of a replica for people: `Primary (dual, token)` / `Primary (dual)` for the two
/// Primaries of a dual-primary window (the one holding the write token writes now), else
/// the role as reported.
pub fn role_text(r: &tandem_api::Replica) -> String {
    match (&r.dual_primary_partner, r.write_token) {
        (Some(_), true) => "Primary (dual, token)".into(),
        (Some(_), false) => "Primary (dual)".into(),
        (None, _) => format!("{:?}", r.role),
    }
}

pub fn volumes_table(volumes: &[Volume]) -> String {
    let mut t = Table::new(&["VOLUME", "SIZE", "STATE", "REPLICAS", "QUORUM", "PROTOCOL"]);
    for v in volumes {
        let reps = v
            .replicas
            .iter()
            .map(|r| {
                format!(
                    "{}:{:?}/{}",
                    r.node,
                    r.disk_state,
                    role_text(r).replace(", ", ",").replace(" (", "(")
                )
            })
            .collect::<Vec<_>>()
            .join(" ");
        t.row(vec![
            v.name.clone(),
            size_cell(v.size_bytes),
            format!("{:?}", v.state).to_lowercase(),
            if reps.is_empty() { "-".into() } else { reps },
            if v.quorum { "yes".into() } else { "NO".into() },
            format!("{:?}", v.protocol),
        ]);
    }
    t.render()
}

pub fn volume_detail(v: &Volume) -> String {
    volume_detail_at(v, crate::now_unix())
}

pub fn volume_detail_at(v: &Volume, now: u64) -> String {
    let mut out = String::new();
    out.push_str(&format!("Volume:    {}\n", v.name));
    out.push_str(&format!("UUID:      {}\n", v.uuid));
    out.push_str(&format!("Size:      {}\n", format_size(v.size_bytes)));
    out.push_str(&format!(
        "State:     {}\n",
        format!("{:?}", v.state).to_lowercase()
    ));
    out.push_str(&format!("Protocol:  {:?}\n", v.protocol));
    out.push_str(&format!(
        "Quorum:    {}\n",
        if v.quorum { "yes" } else { "NO" }
    ));
    out.push_str(&format!("Replicas:  {} wanted\n", v.replica_count));
    if v.replicas.len() > 1 {
        out.push_str(&format!(
            "Primary:   {}{}\n",
            v.primary_node.as_deref().unwrap_or("none (volume demote)"),
            v.second_primary_node
                .as_deref()
                .map(|n| format!(" and {n} (dual-primary window)"))
                .unwrap_or_default()
        ));
        out.push_str(&format!(
            "Resync:    limit {}, {}\n",
            crate::commands::rate_text(v.resync_rate_bytes_per_sec),
            crate::commands::min_rate_text(v.resync_min_rate_bytes_per_sec)
        ));
    }
    out.push('\n');
    let mut t = Table::new(&[
        "NODE",
        "POOL",
        "ROLE",
        "DISK",
        "REPLICATION",
        "OUT OF SYNC",
        "ALLOCATED",
        "CONNECTIONS",
    ]);
    for r in &v.replicas {
        t.row(vec![
            r.node.clone(),
            if r.diskless {
                "(diskless)".into()
            } else {
                r.pool.clone()
            },
            role_text(r),
            format!("{:?}", r.disk_state),
            r.repl_state.clone(),
            size_cell(r.out_of_sync_bytes),
            size_cell(r.allocated_bytes),
            r.connections.to_string(),
        ]);
    }
    out.push_str(&t.render());
    for r in &v.replicas {
        if let Some(e) = &r.disk_error {
            out.push_str(&format!(
                "{}: disk detached after an I/O error ({e}); served by its peers until the \
                 replica is re-attached (restart its agent once the storage is repaired)\n",
                r.node
            ));
        }
    }
    for r in &v.replicas {
        if let Some(left) = r.resync_bytes_left {
            out.push_str(&format!(
                "{}: resyncing, {} left at {}, ETA {}{}\n",
                r.node,
                format_size(left),
                if r.resync_bytes_per_sec > 0 {
                    format!("{}/s", format_size(r.resync_bytes_per_sec))
                } else {
                    "(measuring)".to_string()
                },
                r.resync_eta_secs
                    .map(|s| format!("{s} s"))
                    .unwrap_or_else(|| "unknown".into()),
                if r.resync_yielding {
                    " (yielding to consumer I/O)"
                } else {
                    ""
                }
            ));
        }
    }
    for x in v
        .replicas
        .iter()
        .filter_map(|r| r.verify.as_ref())
        .filter(|x| x.state == "running")
    {
        out.push_str(&format!(
            "{}: verifying, {} of {} compared at {}/s, {} different, ETA {}\n",
            x.node,
            format_size(x.checked_bytes),
            format_size(x.total_bytes),
            format_size(x.bytes_per_sec),
            format_size(x.different_bytes),
            x.eta_secs
                .map(|s| format!("{s} s"))
                .unwrap_or_else(|| "unknown".into())
        ));
    }
    if let Some(x) = &v.last_verify {
        out.push_str(&format!(
            "Last verify: {} from {}: {} compared, {} different{}{}\n",
            ago(x.finished_unix, now),
            x.node,
            size_cell(x.checked_bytes),
            size_cell(x.different_bytes),
            if x.ranges.is_empty() {
                String::new()
            } else {
                format!(
                    " at {}{}",
                    x.ranges
                        .iter()
                        .take(4)
                        .map(|r| format!("{}+{}", r.offset, r.len))
                        .collect::<Vec<_>>()
                        .join(", "),
                    if x.ranges.len() > 4 || x.ranges_truncated {
                        ", ..."
                    } else {
                        ""
                    }
                )
            },
            match (&x.error, x.resync_started.is_empty()) {
                (Some(e), _) => format!(" (failed: {e})"),
                (None, false) => format!("; resync toward {}", x.resync_started.join(", ")),
                _ => String::new(),
            }
        ));
    }
    for r in &v.replicas {
        for sb in &r.split_brain {
            out.push_str(&format!(
                "SPLIT BRAIN {} / {} (rule {}): {} wrote {} since the split, {} wrote {}; {}\n",
                r.node,
                sb.peer,
                sb.rule,
                r.node,
                size_cell(sb.our_bytes),
                sb.peer,
                size_cell(sb.peer_bytes),
                sb.resolution.clone().unwrap_or_else(|| format!(
                    "disconnected, data not merged: `tandem volume resolve-split-brain {} --discard NODE`",
                    v.name
                ))
            ));
        }
    }
    if v.replicas.len() > 1 && v.after_split_brain != "disconnect" {
        out.push_str(&format!("After split brain: {}\n", v.after_split_brain));
    }
    if v.allow_two_primaries {
        out.push_str(
            "Dual-primary window: open (a second node may be Primary; one writes at a time, \
             holding the write token)\n",
        );
    }
    for r in &v.replicas {
        if let Some(partner) = &r.dual_primary_partner {
            out.push_str(&format!(
                "{}: Primary together with {partner} (dual-primary window), {}\n",
                r.node,
                if r.write_token {
                    "holds the write token"
                } else {
                    "waits for the write token to write"
                }
            ));
        }
    }
    if v.replicas.len() > 1 && v.on_no_quorum == tandem_api::OnNoQuorum::Suspend {
        out.push_str(
            "On no quorum: suspend (a Primary without quorum holds I/O until it is back)\n",
        );
    }
    for r in v.replicas.iter().filter(|r| r.suspended_requests > 0) {
        // A diskless Primary with quorum waits for a replica that holds the data.
        let what = if r.diskless && r.quorum == Some(true) {
            "for a replica that holds the data"
        } else {
            "for quorum"
        };
        out.push_str(&format!(
            "{}: I/O suspended: {} request{} wait{} {what}\n",
            r.node,
            r.suspended_requests,
            if r.suspended_requests == 1 { "" } else { "s" },
            if r.suspended_requests == 1 { "s" } else { "" },
        ));
    }
    if v.replicas.len() > 1 && v.resync_checksums {
        out.push_str("Resync:    checksum-based (identical blocks are not transferred)\n");
    }
    for r in v.replicas.iter().filter(|r| r.role_error.is_some()) {
        out.push_str(&format!(
            "{}: {}\n",
            r.node,
            r.role_error.as_deref().unwrap_or_default()
        ));
    }
    if v.replicas.iter().any(|r| !r.peers.is_empty()) {
        out.push('\n');
        let mut t = Table::new(&["NODE", "PEER", "REPLICATION", "OUT OF SYNC"]);
        for r in &v.replicas {
            for p in &r.peers {
                t.row(vec![
                    r.node.clone(),
                    p.node.clone(),
                    p.repl_state.clone(),
                    size_cell(p.out_of_sync_bytes),
                ]);
            }
        }
        out.push_str(&t.render());
    }
    if !v.operations.is_empty() {
        out.push('\n');
        out.push_str(&operations_table(v, now));
    }
    out
}

/// `[########............]` for a share from 0.0 to 1.0.
pub fn bar(share: f64, width: usize) -> String {
    let share = if share.is_finite() {
        share.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let full = (share * width as f64).round() as usize;
    format!("[{}{}]", "#".repeat(full), ".".repeat(width - full))
}

/// `12s ago`, `3m ago`, or `-`.
fn ago(t: Option<u64>, now: u64) -> String {
    match t {
        Some(t) if t > 0 => format!("{} ago", duration(now.saturating_sub(t))),
        _ => "-".into(),
    }
}

fn duration(secs: u64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s => format!("{}h", s / 3600),
    }
}

fn next_retry(o: &Operation, now: u64) -> String {
    match o.next_retry_unix {
        Some(t) if o.state == "retrying" => format!("in {}", duration(t.saturating_sub(now))),
        _ => "-".into(),
    }
}

fn eta(o: &Operation) -> String {
    match (o.state.as_str(), o.eta_secs) {
        ("done", _) => "-".into(),
        (_, Some(s)) => duration(s),
        (_, None) => "?".into(),
    }
}

/// Operations of a volume; steps and failed attempts of unfinished ones below the table.
pub fn operations_table(v: &Volume, now: u64) -> String {
    let mut t = Table::new(&[
        "OPERATION",
        "STATE",
        "PROGRESS",
        "ATTEMPTS",
        "LAST ATTEMPT",
        "NEXT RETRY",
        "LAST ERROR",
    ]);
    for o in &v.operations {
        t.row(vec![
            o.kind.clone(),
            o.state.clone(),
            format!("{:>3.0}%", o.progress * 100.0),
            o.attempts.to_string(),
            ago(o.last_attempt_unix, now),
            next_retry(o, now),
            o.last_error.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    let mut out = t.render();
    for o in v.operations.iter().filter(|o| {
        !matches!(
            o.state.as_str(),
            "done" | "failed" | "superseded" | "aborted"
        )
    }) {
        out.push_str(&format!("\n{} steps:\n", o.kind));
        for (i, s) in o.steps.iter().enumerate() {
            out.push_str(&format!("  {}. {:<44} {}", i + 1, s.name, s.state));
            if let Some(e) = &s.last_error {
                out.push_str(&format!(": {e}"));
            }
            out.push('\n');
        }
        if !o.retry_history.is_empty() {
            out.push_str("failed attempts (newest last):\n");
            for a in o.retry_history.iter().rev().take(3).rev() {
                out.push_str(&format!(
                    "  #{} {}: {}\n",
                    a.attempt,
                    ago(Some(a.failed_unix), now),
                    a.error
                ));
            }
        }
    }
    out
}

/// Operations still running, or finished less than this long ago, show in `status`.
const RECENT_SECS: u64 = 30;

pub fn status(s: &ClusterStatus, now: u64) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Cluster {} (controller {})\n\n",
        s.cluster_id, s.controller_version
    ));
    if s.nodes.is_empty() {
        out.push_str(
            "No nodes. Start an agent (`tandem agent run`) or a local cluster (`tandem up`).\n",
        );
    } else {
        let mut t = Table::new(&["NODE", "ROLE", "STATE", "LAST SEEN", "ADDRESS", "VERSION"]);
        for n in &s.nodes {
            t.row(vec![
                n.name.clone(),
                format!("{:?}", n.role).to_lowercase(),
                format!("{:?}", n.state).to_lowercase(),
                if n.last_seen_secs == u64::MAX {
                    "never".into()
                } else {
                    format!("{} ago", duration(n.last_seen_secs))
                },
                n.address.clone(),
                if n.agent_version.is_empty() {
                    "-".into()
                } else {
                    n.agent_version.clone()
                },
            ]);
        }
        out.push_str(&t.render());
    }
    if !s.pools.is_empty() {
        out.push('\n');
        let mut t = Table::new(&["POOL", "USED", "", "FREE", "CAPACITY", "PROVISIONED"]);
        for p in &s.pools {
            let used = p.capacity_bytes.saturating_sub(p.free_bytes);
            let share = if p.capacity_bytes == 0 {
                0.0
            } else {
                used as f64 / p.capacity_bytes as f64
            };
            t.row(vec![
                format!("{}/{}", p.node, p.name),
                bar(share, 20),
                format!("{:>3.0}%", share * 100.0),
                format_iec(p.free_bytes),
                format_iec(p.capacity_bytes),
                format_iec(p.provisioned_bytes),
            ]);
        }
        out.push_str(&t.render());
    }
    out.push('\n');
    if s.volumes.is_empty() {
        out.push_str("No volumes. Create one with: tandem volume create NAME SIZE (e.g. 10GiB)\n");
    } else {
        out.push_str(&volumes_table(&s.volumes));
    }
    let mut t = Table::new(&[
        "VOLUME",
        "OPERATION",
        "STATE",
        "PROGRESS",
        "",
        "ETA",
        "ATTEMPTS",
        "NEXT RETRY",
        "LAST ERROR",
    ]);
    let mut shown = 0;
    for v in &s.volumes {
        for o in &v.operations {
            let finished = matches!(
                o.state.as_str(),
                "done" | "failed" | "superseded" | "aborted"
            );
            if finished
                && o.finished_unix
                    .is_none_or(|f| now.saturating_sub(f) > RECENT_SECS)
            {
                continue;
            }
            shown += 1;
            t.row(vec![
                v.name.clone(),
                o.kind.clone(),
                o.state.clone(),
                bar(o.progress, 20),
                format!("{:>3.0}%", o.progress * 100.0),
                eta(o),
                o.attempts.to_string(),
                next_retry(o, now),
                o.last_error.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
    }
    out.push('\n');
    if shown == 0 {
        out.push_str("No operations in progress.\n");
    } else {
        out.push_str(&t.render());
    }
    if !s.issues.is_empty() {
        out.push_str("\nISSUES (the controller could not reconcile these reports)\n");
        let mut t = Table::new(&["NODE", "VOLUME", "CODE", "MESSAGE"]);
        for i in &s.issues {
            t.row(vec![
                i.node.clone(),
                i.volume.clone().unwrap_or_else(|| "-".into()),
                i.code.clone(),
                i.message.clone(),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

/// The result of a verify, for people.
pub fn verify_result(volume: &str, r: &tandem_api::VerifyReport) -> String {
    let mut out = format!(
        "Verify of volume {volume} from {} against {}: {} compared, {} different{}.\n",
        r.node,
        if r.peers.is_empty() {
            "no peer".to_string()
        } else {
            r.peers.join(", ")
        },
        size_cell(r.checked_bytes),
        size_cell(r.different_bytes),
        if r.state == "done" {
            String::new()
        } else {
            format!(
                " ({}: {})",
                r.state,
                r.error.as_deref().unwrap_or("no details")
            )
        }
    );
    if !r.ranges.is_empty() {
        out.push_str("Differing ranges (offset, length):\n");
        for x in &r.ranges {
            out.push_str(&format!("  {} +{}\n", x.offset, size_cell(x.len)));
        }
        if r.ranges_truncated {
            out.push_str("  ... (more)\n");
        }
    }
    if r.different_bytes > 0 {
        if r.resync_started.is_empty() {
            out.push_str(&format!(
                "The differing blocks are marked out of sync; `tandem volume verify {volume} --resync` copies them from {}.\n",
                r.node
            ));
        } else {
            out.push_str(&format!(
                "Resync from {} started toward {}.\n",
                r.node,
                r.resync_started.join(", ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let mut t = Table::new(&["A", "LONGER"]);
        t.row(vec!["xxxx".into(), "y".into()]);
        assert_eq!(t.render(), "A     LONGER\nxxxx  y\n");
    }

    #[test]
    fn bars_are_clamped() {
        assert_eq!(bar(0.5, 4), "[##..]");
        assert_eq!(bar(2.0, 4), "[####]");
        assert_eq!(bar(f64::NAN, 4), "[....]");
    }

    #[test]
    fn volume_detail_lists_peers_when_reported() {
        let replica = |node: &str, peers: Vec<tandem_api::PeerReplState>| tandem_api::Replica {
            node: node.into(),
            pool: "default".into(),
            diskless: false,
            role: tandem_api::Role::Secondary,
            disk_state: tandem_api::DiskState::UpToDate,
            disk_error: None,
            repl_state: "Established".into(),
            out_of_sync_bytes: 0,
            resync_bytes_per_sec: 0,
            resync_yielding: false,
            last_resync_bytes: 0,
            size_bytes: 0,
            export_size_bytes: None,
            allocated_bytes: 0,
            connections: 0,
            peers,
            quorum: Some(true),
            role_error: None,
            resync_bytes_left: None,
            resync_eta_secs: None,
            verify: None,
            split_brain: vec![],
            last_resync_skipped_bytes: 0,
            clients: Vec::new(),
            allow_two_primaries: false,
            dual_primary_partner: None,
            write_token: false,
            on_no_quorum: None,
            suspended_requests: 0,
        };
        let peer = |node: &str, state: &str| tandem_api::PeerReplState {
            node: node.into(),
            repl_state: state.into(),
            out_of_sync_bytes: 4096,
        };
        let mut v = Volume {
            name: "v".into(),
            uuid: "u".into(),
            size_bytes: 1 << 20,
            protocol: tandem_api::Protocol::C,
            replica_count: 2,
            state: tandem_api::VolumeState::Ready,
            quorum: true,
            replicas: vec![replica("n1", vec![]), replica("n2", vec![])],
            operations: vec![],
            primary_node: Some("n1".into()),
            resync_rate_bytes_per_sec: 0,
            resync_min_rate_bytes_per_sec: 0,
            last_verify: None,
            after_split_brain: "disconnect".into(),
            resync_checksums: false,
            allow_two_primaries: false,
            second_primary_node: None,
            on_no_quorum: tandem_api::OnNoQuorum::IoError,
        };
        assert!(!volume_detail_at(&v, 0).contains("PEER"));
        v.replicas[0].peers = vec![peer("n2", "SyncSource")];
        let text = volume_detail_at(&v, 0);
        assert!(text.contains("PEER"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("n1") && l.contains("n2") && l.contains("SyncSource")),
            "{text}"
        );
    }

    #[test]
    fn volume_detail_shows_the_dual_primary_window_and_the_write_token() {
        let v: Volume = serde_json::from_value(serde_json::json!({
            "name": "v", "uuid": "u", "size_bytes": 1048576, "protocol": "C",
            "replica_count": 2, "state": "ready", "quorum": true, "operations": [],
            "primary_node": "n1", "second_primary_node": "n2", "allow_two_primaries": true,
            "replicas": [
                {"node": "n1", "pool": "default", "diskless": false, "role": "Primary",
                 "disk_state": "UpToDate", "repl_state": "Established", "out_of_sync_bytes": 0,
                 "resync_bytes_per_sec": 0, "last_resync_bytes": 0, "allocated_bytes": 0,
                 "connections": 1, "dual_primary_partner": "n2", "write_token": true},
                {"node": "n2", "pool": "default", "diskless": false, "role": "Primary",
                 "disk_state": "UpToDate", "repl_state": "Established", "out_of_sync_bytes": 0,
                 "resync_bytes_per_sec": 0, "last_resync_bytes": 0, "allocated_bytes": 0,
                 "connections": 1, "dual_primary_partner": "n1"}
            ]
        }))
        .unwrap();
        let text = volume_detail_at(&v, 0);
        assert!(
            text.contains("Primary:   n1 and n2 (dual-primary window)"),
            "{text}"
        );
        assert!(text.contains("Dual-primary window: open"), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with("n1 ") && l.contains("Primary (dual, token)")),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("n2 ") && l.contains("Primary (dual)")),
            "{text}"
        );
        assert!(text.contains("n1: Primary together with n2"), "{text}");
        assert!(text.contains("n2: Primary together with n1 (dual-primary window), waits"));
        let list = volumes_table(&[v]);
        assert!(
            list.contains("n1:UpToDate/Primary(dual,token) n2:UpToDate/Primary(dual)"),
            "{list}"
        );
    }

    #[test]
    fn volume_detail_shows_the_on_no_quorum_policy_and_suspended_io() {
        let mut v: Volume = serde_json::from_value(serde_json::json!({
            "name": "v", "uuid": "u", "size_bytes": 1048576, "protocol": "C",
            "replica_count": 2, "state": "ready", "quorum": false, "operations": [],
            "primary_node": "n1",
            "replicas": [
                {"node": "n1", "pool": "default", "diskless": false, "role": "Primary",
                 "disk_state": "UpToDate", "repl_state": "Connecting", "out_of_sync_bytes": 0,
                 "resync_bytes_per_sec": 0, "last_resync_bytes": 0, "allocated_bytes": 0,
                 "connections": 1, "on_no_quorum": "io-error"},
                {"node": "n2", "pool": "default", "diskless": false, "role": "Secondary",
                 "disk_state": "UpToDate", "repl_state": "Connecting", "out_of_sync_bytes": 0,
                 "resync_bytes_per_sec": 0, "last_resync_bytes": 0, "allocated_bytes": 0,
                 "connections": 0}
            ]
        }))
        .unwrap();
        // io-error is the default and not worth a line.
        let text = volume_detail_at(&v, 0);
        assert!(!text.contains("On no quorum"), "{text}");
        assert!(!text.contains("suspended"), "{text}");
        v.on_no_quorum = tandem_api::OnNoQuorum::Suspend;
        v.replicas[0].suspended_requests = 3;
        let text = volume_detail_at(&v, 0);
        assert!(text.contains("On no quorum: suspend"), "{text}");
        assert!(
            text.contains("n1: I/O suspended: 3 requests wait for quorum"),
            "{text}"
        );
        v.replicas[0].suspended_requests = 1;
        let text = volume_detail_at(&v, 0);
        assert!(
            text.contains("n1: I/O suspended: 1 request waits for quorum"),
            "{text}"
        );
        // A witness as diskless Primary with quorum waits for a replica holding the data.
        v.replicas[0].diskless = true;
        v.replicas[0].quorum = Some(true);
        let text = volume_detail_at(&v, 0);
        assert!(
            text.contains("n1: I/O suspended: 1 request waits for a replica that holds the data"),
            "{text}"
        );
    }

    #[test]
    fn sizes_show_bytes_and_iec() {
        assert_eq!(size_cell(1 << 30), "1073741824 (1.00 GiB)");
        assert_eq!(size_cell(10), "10 B");
    }
}

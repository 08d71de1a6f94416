//! `tandem volume resize NAME SIZE [--allow-shrink] [--timeout D]`: records the new size with
//! the controller, waits until every replica reports it, and prints what happened per replica.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::Serialize;
use tandem_api::{Operation, Volume, VolumeResize};
use tandem_types::{format_size, parse_size};

use crate::client::Client;
use crate::commands::{path_segment, print_json};

/// One replica after the resize.
#[derive(Debug, Serialize)]
struct ReplicaResult {
    node: String,
    pool: String,
    diskless: bool,
    /// Size before / after as the agent reported it.
    old_size_bytes: u64,
    size_bytes: u64,
    /// What new NBD connections to this node's export see (`null`: not exported there).
    export_size_bytes: Option<u64>,
    old_allocated_bytes: u64,
    allocated_bytes: u64,
    /// NBD clients connected now: they keep the size they negotiated until they reconnect.
    connections: u32,
}

/// `-o json` output.
#[derive(Debug, Serialize)]
struct ResizeResult {
    name: String,
    old_size_bytes: u64,
    size_bytes: u64,
    /// Bytes resynced because of the resize: 0 on directory pools (sparse files read as zeros
    /// on every replica, so the grown area is in sync by construction).
    grown_area_resync_bytes: u64,
    replicas: Vec<ReplicaResult>,
    /// NBD clients connected during the resize (they see the new size after reconnecting).
    connected_clients: u32,
    operation: Option<Operation>,
}

fn parse_timeout(s: &str) -> Result<Duration> {
    let t = s.trim();
    let (num, mult) = if let Some(n) = t.strip_suffix('h') {
        (n, 3600)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1)
    } else {
        (t, 1)
    };
    let n: u64 = num
        .trim()
        .parse()
        .with_context(|| format!("invalid timeout '{s}': use seconds, or 90s, 5m, 1h"))?;
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

/// Refuses a shrink that would cut a partition or a filesystem: probes the volume through
/// its NBD export (as a consumer would see it).
fn check_shrink(client: &Client, name: &str, new: u64) -> Result<Option<String>> {
    let info: tandem_api::ConnectInfo =
        client.get(&format!("/v1/volumes/{}/connect", path_segment(name)))?;
    let nbd = tandem_nbd_client::Client::connect_uri(&info.uri)
        .with_context(|| format!("connecting to the export of volume '{name}' to check it"))?;
    let probe = tandem_grow::probe(&nbd)
        .with_context(|| format!("probing the partition table of volume '{name}'"))?;
    let past = |what: String, end: u64| -> Result<Option<String>> {
        if end > new {
            bail!(
                "shrink refused: {what} ends at {}, past the new end {}; shrink it first (or \
                 choose a size of at least {})",
                format_size(end),
                format_size(new),
                format_size(end.div_ceil(512) * 512)
            );
        }
        Ok(None)
    };
    let sector = probe.sector_size;
    match &probe.table {
        tandem_grow::Table::Gpt(g) => {
            for p in &g.partitions {
                past(
                    format!("GPT partition {} ('{}')", p.number, p.name),
                    (p.last_lba + 1) * sector,
                )?;
            }
            Ok(Some(
                "the GPT backup header at the old end is cut off: repair it with `sgdisk -e` \
                 (or `tandem volume grow` later)"
                    .into(),
            ))
        }
        tandem_grow::Table::Mbr(m) => {
            for p in &m.partitions {
                past(
                    format!("MBR partition {}", p.number),
                    (p.end_lba() + 1) * sector,
                )?;
            }
            Ok(None)
        }
        tandem_grow::Table::None { filesystem } => {
            if let Some(end) = filesystem.size_bytes() {
                past("the filesystem on the volume".into(), end)?;
            }
            Ok(None)
        }
        tandem_grow::Table::Unknown { reason } => Ok(Some(format!(
            "the start of the volume holds something partition-table-like that could not be \
             checked ({reason})"
        ))),
    }
}

pub fn run(
    client: &Client,
    json: bool,
    name: &str,
    size: &str,
    allow_shrink: bool,
    timeout: &str,
) -> Result<()> {
    let new = parse_size(size).with_context(|| format!("invalid size '{size}'"))?;
    let timeout = parse_timeout(timeout)?;
    let path = format!("/v1/volumes/{}", path_segment(name));
    let before: Volume = client.get(&path)?;
    let mut warning = None;
    if new < before.size_bytes && allow_shrink {
        warning = check_shrink(client, name, new)?;
    }
    let _: Volume = client.post(
        &format!("{path}/resize"),
        &VolumeResize {
            size_bytes: new,
            allow_shrink,
        },
    )?;
    let deadline = Instant::now() + timeout;
    let v = loop {
        let v: Volume = client.get(&path)?;
        if v.size_bytes != new {
            bail!(
                "volume {name} was resized to {} by another request meanwhile",
                format_size(v.size_bytes)
            );
        }
        let replicas_done = v
            .replicas
            .iter()
            .all(|r| r.size_bytes == new && r.export_size_bytes.is_none_or(|s| s == new));
        let op_done = v
            .operations
            .iter()
            .rev()
            .find(|o| o.kind == "resize")
            .is_none_or(|o| o.state == "done" || before.size_bytes == new);
        if replicas_done && op_done {
            break v;
        }
        if Instant::now() > deadline {
            let waiting: Vec<String> = v
                .replicas
                .iter()
                .filter(|r| r.size_bytes != new || r.export_size_bytes.is_some_and(|s| s != new))
                .map(|r| {
                    format!(
                        "{} reports {}{}",
                        r.node,
                        if r.size_bytes == 0 {
                            "nothing (offline?)".to_string()
                        } else {
                            format_size(r.size_bytes)
                        },
                        r.export_size_bytes
                            .map(|e| format!(", export {}", format_size(e)))
                            .unwrap_or_default()
                    )
                })
                .collect();
            let err = v
                .operations
                .iter()
                .rev()
                .find(|o| o.kind == "resize")
                .and_then(|o| o.last_error.clone());
            bail!(
                "volume {name} is not {} on every replica after {}s ({}){}; the controller keeps \
                 retrying: `tandem volume show {name}` shows the resize operation",
                format_size(new),
                timeout.as_secs(),
                waiting.join("; "),
                err.map(|e| format!(", last error: {e}"))
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let replicas: Vec<ReplicaResult> = v
        .replicas
        .iter()
        .map(|r| {
            let old = before.replicas.iter().find(|b| b.node == r.node);
            ReplicaResult {
                node: r.node.clone(),
                pool: r.pool.clone(),
                diskless: r.diskless,
                old_size_bytes: old.map_or(0, |o| o.size_bytes),
                size_bytes: r.size_bytes,
                export_size_bytes: r.export_size_bytes,
                old_allocated_bytes: old.map_or(0, |o| o.allocated_bytes),
                allocated_bytes: r.allocated_bytes,
                connections: r.connections,
            }
        })
        .collect();
    let result = ResizeResult {
        name: v.name.clone(),
        old_size_bytes: before.size_bytes,
        size_bytes: v.size_bytes,
        grown_area_resync_bytes: 0,
        connected_clients: replicas.iter().map(|r| r.connections).sum(),
        replicas,
        operation: v
            .operations
            .iter()
            .rev()
            .find(|o| o.kind == "resize")
            .cloned()
            .filter(|_| before.size_bytes != new),
    };
    if json {
        return print_json(&result);
    }
    if before.size_bytes == new {
        println!(
            "Volume {name} already has {}: nothing to do.",
            format_size(new)
        );
        return Ok(());
    }
    let verb = if new > before.size_bytes {
        "Grew"
    } else {
        "Shrank"
    };
    println!(
        "{verb} volume {name} from {} to {} online.",
        format_size(before.size_bytes),
        format_size(new)
    );
    for r in &result.replicas {
        if r.diskless {
            println!("  {} (witness): no data; records the size", r.node);
            continue;
        }
        println!(
            "  {}:{}: backing store {} -> {} (allocated {} -> {}); export size {}",
            r.node,
            r.pool,
            format_size(r.old_size_bytes),
            format_size(r.size_bytes),
            format_size(r.old_allocated_bytes),
            format_size(r.allocated_bytes),
            r.export_size_bytes
                .map(format_size)
                .unwrap_or_else(|| "(not exported here)".into())
        );
    }
    if new > before.size_bytes {
        println!(
            "  resync of the grown area: {} (sparse files read as zeros on every replica)",
            format_size(result.grown_area_resync_bytes)
        );
    }
    if result.connected_clients > 0 {
        println!(
            "  {} NBD client(s) connected: they keep the old size {} until they reconnect (NBD \
             cannot announce a new size); new connections see {}.",
            result.connected_clients,
            format_size(before.size_bytes),
            format_size(new)
        );
    } else {
        println!(
            "  New NBD connections see {}; a client connected before keeps the old size until \
             it reconnects.",
            format_size(new)
        );
    }
    if let Some(w) = warning {
        println!("  Note: {w}.");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_parse_with_units() {
        assert_eq!(parse_timeout("300").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_timeout("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_timeout("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_timeout("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_timeout("soon").is_err());
    }
}

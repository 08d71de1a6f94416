//! Human output: aligned tables and size formatting. JSON output is the API types verbatim.

use tandem_api::{ClusterStatus, Node, Pool, Volume};
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
    ]);
    for n in nodes {
        t.row(vec![
            n.name.clone(),
            format!("{:?}", n.role).to_lowercase(),
            format!("{:?}", n.state).to_lowercase(),
            n.address.clone(),
            format!("{}s ago", n.last_seen_secs),
            n.nbd_socket.clone().unwrap_or_else(|| "-".into()),
            n.nbd_tcp.clone().unwrap_or_else(|| "-".into()),
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

pub fn volumes_table(volumes: &[Volume]) -> String {
    let mut t = Table::new(&["VOLUME", "SIZE", "STATE", "REPLICAS", "QUORUM", "PROTOCOL"]);
    for v in volumes {
        let reps = v
            .replicas
            .iter()
            .map(|r| format!("{}:{:?}/{:?}", r.node, r.disk_state, r.role))
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
    out.push_str(&format!("Replicas:  {} wanted\n\n", v.replica_count));
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
            format!("{:?}", r.role),
            format!("{:?}", r.disk_state),
            r.repl_state.clone(),
            size_cell(r.out_of_sync_bytes),
            size_cell(r.allocated_bytes),
            r.connections.to_string(),
        ]);
    }
    out.push_str(&t.render());
    if !v.operations.is_empty() {
        out.push('\n');
        let mut t = Table::new(&["OPERATION", "STATE", "PROGRESS", "LAST ERROR"]);
        for o in &v.operations {
            t.row(vec![
                o.kind.clone(),
                o.state.clone(),
                format!("{:>3.0}%", o.progress * 100.0),
                o.last_error.clone().unwrap_or_else(|| "-".into()),
            ]);
        }
        out.push_str(&t.render());
    }
    out
}

pub fn status(s: &ClusterStatus) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "Cluster {} (controller {})\n\n",
        s.cluster_id, s.controller_version
    ));
    out.push_str(&nodes_table(&s.nodes));
    out.push('\n');
    out.push_str(&pools_table(&s.pools));
    out.push('\n');
    if s.volumes.is_empty() {
        out.push_str("No volumes. Create one with: tandem volume create NAME SIZE (e.g. 10GiB)\n");
    } else {
        out.push_str(&volumes_table(&s.volumes));
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
    fn sizes_show_bytes_and_iec() {
        assert_eq!(size_cell(1 << 30), "1073741824 (1.00 GiB)");
        assert_eq!(size_cell(10), "10 B");
    }
}

//! A small cluster of real nodes on loopback: one `NodeReplication` + `VolumeDriver` per node,
//! replicas in temp dirs.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tandem_blockdev::FileDevice;
use tandem_meta::{Bitmap, DEFAULT_PEER_SLOTS, ReplicaFiles, ReplicaMeta};
use tandem_repl_proto::ClusterSecret;
use tandem_transport::Timers;
use tandem_volume::{
    NodeConfig, NodeReplication, VolumeDriver, VolumeOptions, VolumePeer, VolumeSpec,
};

pub const MIB: u64 = 1 << 20;
pub const VOL: &str = "vol0";
pub const UUID: &str = "5b0c9a1e-0000-4000-8000-000000000001";

/// Creates a replica's files the way the agent does.
pub fn create_replica(dir: &Path, size: u64) {
    let files = ReplicaFiles::new(dir, VOL);
    FileDevice::create(&files.data(), size).unwrap();
    let mut meta = ReplicaMeta::new("c1", VOL, UUID, size, "n", 0, DEFAULT_PEER_SLOTS, 0);
    Bitmap::create(
        &files.bitmap(),
        UUID,
        size,
        meta.bitmap_granularity,
        DEFAULT_PEER_SLOTS,
    )
    .unwrap();
    files.write_meta(&mut meta).unwrap();
}

pub fn timers() -> Timers {
    Timers {
        dial_backoff_min: Duration::from_millis(20),
        dial_backoff_max: Duration::from_millis(200),
        handshake_timeout: Duration::from_secs(2),
        ping_interval: Duration::from_millis(200),
        ping_timeout: Duration::from_secs(2),
        close_grace: Duration::from_millis(500),
    }
}

pub struct NodeDef {
    pub id: u8,
    pub diskful: bool,
    pub dir: PathBuf,
    pub addr: SocketAddr,
}

pub struct Cluster {
    pub rt: tokio::runtime::Runtime,
    pub size: u64,
    pub defs: Vec<NodeDef>,
    pub nodes: Vec<Option<(Arc<NodeReplication>, VolumeDriver)>>,
    /// Options of drivers started (or restarted) from now on.
    pub options: VolumeOptions,
    _tmp: tempfile::TempDir,
}

impl Cluster {
    /// Nodes 1..=diskful are diskful, then `witnesses` witnesses.
    pub fn start(diskful: usize, witnesses: usize, size: u64) -> Cluster {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let mut defs = Vec::new();
        let mut nodes = Vec::new();
        for i in 0..diskful + witnesses {
            let id = i as u8 + 1;
            let dir = tmp.path().join(format!("node{id}"));
            std::fs::create_dir_all(&dir).unwrap();
            let is_diskful = i < diskful;
            if is_diskful {
                create_replica(&dir, size);
            }
            let node = rt
                .block_on(NodeReplication::start(node_config(
                    id,
                    "127.0.0.1:0".parse().unwrap(),
                )))
                .unwrap();
            defs.push(NodeDef {
                id,
                diskful: is_diskful,
                dir,
                addr: node.local_addr(),
            });
            nodes.push(Some(node));
        }
        let mut c = Cluster {
            rt,
            size,
            defs,
            nodes: Vec::new(),
            options: VolumeOptions::default(),
            _tmp: tmp,
        };
        for (i, n) in nodes.into_iter().enumerate() {
            let n = n.unwrap();
            let d = c.driver(i, &n);
            c.nodes.push(Some((n, d)));
        }
        c
    }

    fn spec(&self, i: usize) -> VolumeSpec {
        let me = &self.defs[i];
        VolumeSpec {
            name: VOL.into(),
            uuid: UUID.into(),
            dir: me.dir.clone(),
            diskful: me.diskful,
            // After an online resize the replica's metadata has the size.
            size_bytes: ReplicaFiles::new(&me.dir, VOL)
                .read_meta()
                .map(|m| m.size_bytes)
                .unwrap_or(self.size),
            peers: self
                .defs
                .iter()
                .filter(|d| d.id != me.id)
                .map(|d| VolumePeer {
                    node_id: d.id,
                    name: format!("node{}", d.id),
                    addr: d.addr.to_string(),
                    diskful: d.diskful,
                })
                .collect(),
            options: self.options,
        }
    }

    fn driver(&self, i: usize, node: &Arc<NodeReplication>) -> VolumeDriver {
        VolumeDriver::start(node, self.spec(i)).unwrap()
    }

    /// Node `id`'s driver.
    pub fn d(&self, id: u8) -> &VolumeDriver {
        &self.nodes[usize::from(id) - 1]
            .as_ref()
            .expect("node running")
            .1
    }

    /// Stops node `id` abruptly: its driver and its transport are dropped (no demotion).
    pub fn crash(&mut self, id: u8) {
        let (node, driver) = self.nodes[usize::from(id) - 1].take().expect("running");
        drop(driver);
        let _g = self.rt.enter();
        drop(node);
    }

    /// Restarts node `id` from its files, on the same replication address.
    pub fn restart(&mut self, id: u8) {
        let i = usize::from(id) - 1;
        let addr = self.defs[i].addr;
        let deadline = Instant::now() + Duration::from_secs(10);
        let node = loop {
            match self
                .rt
                .block_on(NodeReplication::start(node_config(id, addr)))
            {
                Ok(n) => break n,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding {addr}: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("cannot rebind {addr}: {e}"),
            }
        };
        let d = self.driver(i, &node);
        self.nodes[i] = Some((node, d));
    }

    pub fn data_path(&self, id: u8) -> PathBuf {
        ReplicaFiles::new(&self.defs[usize::from(id) - 1].dir, VOL).data()
    }

    /// The replica metadata of node `id` as it is on disk now.
    pub fn meta(&self, id: u8) -> tandem_meta::ReplicaMeta {
        ReplicaFiles::new(&self.defs[usize::from(id) - 1].dir, VOL)
            .read_meta()
            .unwrap()
    }

    pub fn data(&self, id: u8) -> Vec<u8> {
        std::fs::read(self.data_path(id)).unwrap()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _g = self.rt.enter();
        for n in self.nodes.iter_mut() {
            if let Some((node, d)) = n.take() {
                drop(d);
                drop(node);
            }
        }
    }
}

pub fn node_config(id: u8, listen: SocketAddr) -> NodeConfig {
    NodeConfig {
        cluster_id: "c1".into(),
        secret: ClusterSecret::new(b"0123456789abcdef0123456789abcdef".to_vec()).unwrap(),
        node_id: id,
        node_name: format!("node{id}"),
        listen,
        timers: timers(),
        // Small send queues: writes meet a full link often (the driver's backlog path).
        limits: tandem_transport::Limits {
            send_queue_frames: 8,
            send_queue_bytes: 1 << 20,
            ..Default::default()
        },
    }
}

/// Polls `f` until it returns Some, failing with `what` after `secs` seconds.
pub fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Deterministic bytes for a write: `seed` names the write.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

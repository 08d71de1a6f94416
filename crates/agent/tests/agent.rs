//! The agent in-process against a stub of the controller's sync endpoint.
//!
//! NBD serving is not exercised here: the NBD server crate is developed separately (these tests
//! pass whether or not its listeners work); real-client tests live in the e2e suite.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Json, State};
use tandem_agent::{AgentError, Config, PoolConfig};
use tandem_api::{AgentReport, DesiredReplica, DesiredState, DiskState, ReplicaReport, Role};
use tandem_blockdev::FileDevice;
use tandem_meta::{ReplicaFiles, ReplicaMeta};

#[derive(Default)]
struct StubState {
    desired: Option<DesiredState>,
    last: Option<AgentReport>,
    reports: u64,
}

/// A controller stub: records every report, answers with the current desired state.
struct Stub {
    url: String,
    state: Arc<Mutex<StubState>>,
}

async fn sync_handler(
    State(state): State<Arc<Mutex<StubState>>>,
    Json(report): Json<AgentReport>,
) -> Json<DesiredState> {
    let (desired, unchanged) = {
        let mut s = state.lock().unwrap();
        let d = s.desired.clone().expect("desired state set");
        let unchanged = report.applied_revision == d.revision;
        s.last = Some(report);
        s.reports += 1;
        (d, unchanged)
    };
    if unchanged {
        // A short long-poll.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    Json(desired)
}

impl Stub {
    async fn start(desired: DesiredState) -> Stub {
        let state = Arc::new(Mutex::new(StubState {
            desired: Some(desired),
            ..Default::default()
        }));
        let app = axum::Router::new()
            .route("/v1/agents/{node}/sync", axum::routing::post(sync_handler))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Stub { url, state }
    }

    fn set(&self, desired: DesiredState) {
        self.state.lock().unwrap().desired = Some(desired);
    }

    fn reports(&self) -> u64 {
        self.state.lock().unwrap().reports
    }

    /// Polls the reports until one satisfies `pred` (reports that came after `after`).
    async fn wait_report(
        &self,
        what: &str,
        after: u64,
        pred: impl Fn(&AgentReport) -> bool,
    ) -> AgentReport {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            {
                let s = self.state.lock().unwrap();
                if s.reports > after
                    && let Some(r) = &s.last
                    && pred(r)
                {
                    return r.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for: {what}; last report: {:#?}",
                self.state.lock().unwrap().last
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

fn desired(cluster: &str, revision: u64, replicas: Vec<DesiredReplica>) -> DesiredState {
    DesiredState {
        cluster_id: cluster.into(),
        revision,
        replicas,
        node_id: None,
        cluster_secret: None,
    }
}

fn want(volume: &str, uuid: &str, size: u64, present: bool) -> DesiredReplica {
    DesiredReplica {
        volume: volume.into(),
        volume_uuid: uuid.into(),
        pool: "p1".into(),
        size_bytes: size,
        present,
        diskless: false,
        protocol: Default::default(),
        node_id: None,
        peers: vec![],
        primary: false,
        force_primary: false,
        resync_rate_bytes_per_sec: 0,
        resync_min_rate_bytes_per_sec: 0,
        join: false,
        verify: None,
        after_split_brain: "disconnect".into(),
        resolve_split_brain: None,
        resync_checksums: false,
        allow_two_primaries: false,
        on_no_quorum: Default::default(),
    }
}

struct Node {
    dir: PathBuf,
    config: Config,
}

impl Node {
    fn new(dir: &Path, controller: &str) -> Node {
        let config = Config {
            node: "node-a".into(),
            controller: controller.into(),
            address: "127.0.0.1".into(),
            role: Default::default(),
            state_dir: dir.join("state"),
            nbd_socket: dir.join("run/nbd.sock"),
            nbd_tcp: None,
            repl_listen: None,
            repl_advertise: None,
            nbd_io_threads: tandem_agent::DEFAULT_NBD_IO_THREADS,
            pools: vec![PoolConfig {
                name: "p1".into(),
                path: dir.join("pool1"),
            }],
        };
        Node {
            dir: dir.to_path_buf(),
            config,
        }
    }

    fn pool(&self) -> PathBuf {
        self.dir.join("pool1")
    }
}

/// A running agent; `stop` shuts it down and returns run's result.
struct Running {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), AgentError>>,
}

impl Running {
    fn start(config: Config) -> Running {
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tandem_agent::run(config, async move {
            let _ = rx.await;
        }));
        Running {
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(15), self.task)
            .await
            .expect("agent stops promptly")
            .unwrap()
            .expect("agent run returns Ok");
    }
}

fn replica<'a>(r: &'a AgentReport, volume: &str) -> Option<&'a ReplicaReport> {
    r.replicas.iter().find(|x| x.volume == volume)
}

/// Writes a replica the way the agent does (used to seed pools before the agent starts).
fn seed_replica(pool: &Path, volume: &str, uuid: &str, size: u64) -> ReplicaFiles {
    std::fs::create_dir_all(pool).unwrap();
    let files = ReplicaFiles::new(pool, volume);
    FileDevice::create(&files.data(), size).unwrap();
    let mut meta = ReplicaMeta::new("cluster-1", volume, uuid, size, "node-a", 0, 3, 1);
    files.write_meta(&mut meta).unwrap();
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scans_pools_and_reports_replicas() {
    let tmp = tempfile::tempdir().unwrap();
    let stub = Stub::start(desired("cluster-1", 1, vec![])).await;
    let node = Node::new(tmp.path(), &stub.url);
    seed_replica(&node.pool(), "vol-a", "uuid-a", 8 << 20);

    let agent = Running::start(node.config.clone());
    let r = stub
        .wait_report("vol-a reported", 0, |r| replica(r, "vol-a").is_some())
        .await;
    assert_eq!(r.node, "node-a");
    assert_eq!(r.pools.len(), 1);
    assert_eq!(r.pools[0].name, "p1");
    assert!(r.pools[0].capacity_bytes > 0);
    assert!(r.pools[0].free_bytes <= r.pools[0].capacity_bytes);
    assert_eq!(
        r.nbd_socket.as_deref(),
        Some(node.config.nbd_socket.to_str().unwrap())
    );
    let v = replica(&r, "vol-a").unwrap();
    assert_eq!(v.volume_uuid, "uuid-a");
    assert_eq!(v.pool, "p1");
    assert_eq!(v.size_bytes, 8 << 20);
    assert_eq!(v.role, Role::Secondary);
    assert_eq!(v.disk_state, DiskState::UpToDate);
    assert_eq!(v.last_error, None);
    assert!(v.allocated_bytes < 8 << 20, "sparse");
    assert!(v.on_disk);
    // The report says which cluster the agent is bound to (a rebuilt controller adopts it).
    stub.wait_report("cluster id in the report", 0, |r| {
        r.cluster_id.as_deref() == Some("cluster-1")
    })
    .await;
    // The socket exists with mode 0660 while running.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&node.config.nbd_socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);
    // The agent learnt the cluster id.
    assert_eq!(
        std::fs::read_to_string(node.config.state_dir.join("cluster_id"))
            .unwrap()
            .trim(),
        "cluster-1"
    );

    agent.stop().await;
    assert!(
        !node.config.nbd_socket.exists(),
        "socket removed at shutdown"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn creates_on_desired_state_and_survives_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let stub = Stub::start(desired(
        "cluster-1",
        1,
        vec![want("vol-new", "uuid-new", 64 << 20, true)],
    ))
    .await;
    let node = Node::new(tmp.path(), &stub.url);
    let agent = Running::start(node.config.clone());
    let r = stub
        .wait_report("vol-new created", 0, |r| replica(r, "vol-new").is_some())
        .await;
    let v = replica(&r, "vol-new").unwrap();
    assert_eq!(v.volume_uuid, "uuid-new");
    assert_eq!(v.size_bytes, 64 << 20);
    assert_eq!(v.disk_state, DiskState::UpToDate);
    assert_eq!(v.last_error, None);

    let files = ReplicaFiles::new(&node.pool(), "vol-new");
    assert_eq!(
        std::fs::metadata(files.data()).unwrap().len(),
        64 << 20,
        "data file has the volume size"
    );
    let meta = files.read_meta().unwrap();
    assert_eq!(meta.volume_uuid, "uuid-new");
    assert_eq!(meta.cluster_id, "cluster-1");
    assert_eq!(meta.node_name, "node-a");
    assert!(files.bitmap().exists());
    assert!(!files.data_creating().exists());

    // Re-applying the same desired state changes nothing (metadata not rewritten).
    let n = stub.reports();
    stub.wait_report("a few more syncs", n + 3, |_| true).await;
    assert_eq!(files.read_meta().unwrap(), meta);

    // Write some data, stop, restart against a controller that knows nothing.
    {
        use tandem_blockdev::BlockDevice;
        let dev = FileDevice::open(&files.data()).unwrap();
        dev.write_at(b"survives", 4096).unwrap();
        dev.flush().unwrap();
    }
    agent.stop().await;
    stub.set(desired("cluster-1", 7, vec![]));
    let n = stub.reports();
    let agent = Running::start(node.config.clone());
    let r = stub
        .wait_report("vol-new reported after restart", n, |r| {
            r.applied_revision == 7 && replica(r, "vol-new").is_some()
        })
        .await;
    let v = replica(&r, "vol-new").unwrap();
    assert_eq!(v.volume_uuid, "uuid-new");
    assert_eq!(v.disk_state, DiskState::UpToDate);
    agent.stop().await;
    let mut buf = [0u8; 8];
    {
        use tandem_blockdev::BlockDevice;
        FileDevice::open(&files.data())
            .unwrap()
            .read_at(&mut buf, 4096)
            .unwrap();
    }
    assert_eq!(&buf, b"survives", "an empty controller does not wipe data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deletes_only_on_present_false_with_matching_uuid() {
    let tmp = tempfile::tempdir().unwrap();
    let stub = Stub::start(desired(
        "cluster-1",
        1,
        vec![
            want("vol-a", "uuid-a", 1 << 20, true),
            want("vol-b", "uuid-b", 1 << 20, true),
        ],
    ))
    .await;
    let node = Node::new(tmp.path(), &stub.url);
    let agent = Running::start(node.config.clone());
    stub.wait_report("both created", 0, |r| {
        replica(r, "vol-a").is_some() && replica(r, "vol-b").is_some()
    })
    .await;

    // Wrong uuid (another incarnation of vol-a) and vol-b unmentioned: nothing is deleted.
    stub.set(desired(
        "cluster-1",
        2,
        vec![want("vol-a", "uuid-OTHER", 1 << 20, false)],
    ));
    let n = stub.reports();
    // A report carrying applied_revision 2 is built after revision 2 was applied.
    let r2 = stub
        .wait_report("revision 2 applied", n, |r| r.applied_revision == 2)
        .await;
    assert!(replica(&r2, "vol-a").is_some() && replica(&r2, "vol-b").is_some());
    let a = ReplicaFiles::new(&node.pool(), "vol-a");
    let b = ReplicaFiles::new(&node.pool(), "vol-b");
    assert!(a.data().exists() && a.meta().exists());
    assert!(b.data().exists() && b.meta().exists());

    // Matching uuid: deleted, files gone; vol-b untouched.
    stub.set(desired(
        "cluster-1",
        3,
        vec![want("vol-a", "uuid-a", 1 << 20, false)],
    ));
    let r = stub
        .wait_report("vol-a deleted", 0, |r| {
            r.applied_revision == 3 && replica(r, "vol-a").is_none()
        })
        .await;
    assert!(replica(&r, "vol-b").is_some());
    for p in [a.data(), a.meta(), a.bitmap(), a.data_deleting()] {
        assert!(!p.exists(), "{} removed", p.display());
    }
    assert!(b.data().exists() && b.meta().exists());

    // Repeating the delete is harmless.
    stub.set(desired(
        "cluster-1",
        4,
        vec![want("vol-a", "uuid-a", 1 << 20, false)],
    ));
    stub.wait_report("revision 4", 0, |r| r.applied_revision == 4)
        .await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_metadata_is_reported_failed_never_served_never_deleted() {
    let tmp = tempfile::tempdir().unwrap();
    let stub = Stub::start(desired("cluster-1", 1, vec![])).await;
    let node = Node::new(tmp.path(), &stub.url);
    let files = seed_replica(&node.pool(), "vol-bad", "uuid-bad", 1 << 20);
    seed_replica(&node.pool(), "vol-good", "uuid-good", 1 << 20);
    let mut bytes = std::fs::read(files.meta()).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(files.meta(), &bytes).unwrap();

    let agent = Running::start(node.config.clone());
    let r = stub
        .wait_report("both reported", 0, |r| {
            replica(r, "vol-bad").is_some() && replica(r, "vol-good").is_some()
        })
        .await;
    let bad = replica(&r, "vol-bad").unwrap();
    assert_eq!(bad.disk_state, DiskState::Failed);
    let err = bad.last_error.as_deref().unwrap();
    assert!(err.contains("checksum"), "{err}");
    assert_eq!(bad.connections, 0);
    assert_eq!(
        replica(&r, "vol-good").unwrap().disk_state,
        DiskState::UpToDate
    );

    // Even a delete request for it does not remove its files (its uuid is unknown).
    stub.set(desired(
        "cluster-1",
        2,
        vec![want("vol-bad", "uuid-bad", 1 << 20, false)],
    ));
    stub.wait_report("revision 2", 0, |r| r.applied_revision == 2)
        .await;
    agent.stop().await;
    assert!(files.data().exists() && files.meta().exists());
    assert_eq!(std::fs::read(files.meta()).unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refuses_a_controller_of_another_cluster() {
    let tmp = tempfile::tempdir().unwrap();
    let stub = Stub::start(desired(
        "cluster-1",
        1,
        vec![want("vol-a", "uuid-a", 1 << 20, true)],
    ))
    .await;
    let node = Node::new(tmp.path(), &stub.url);
    let agent = Running::start(node.config.clone());
    stub.wait_report("created", 0, |r| replica(r, "vol-a").is_some())
        .await;

    // Another cluster's controller asks to delete it: refused, and told nothing.
    stub.set(desired(
        "cluster-2",
        2,
        vec![
            want("vol-a", "uuid-a", 1 << 20, false),
            want("vol-x", "uuid-x", 1 << 20, true),
        ],
    ));
    let n = stub.reports();
    let r = stub
        .wait_report("empty report to the foreign controller", n, |r| {
            r.replicas.is_empty() && r.pools.is_empty()
        })
        .await;
    assert_eq!(r.applied_revision, 1);
    assert_eq!(
        r.cluster_id.as_deref(),
        Some("cluster-1"),
        "the cluster it is bound to"
    );
    let a = ReplicaFiles::new(&node.pool(), "vol-a");
    assert!(a.data().exists() && a.meta().exists());
    assert!(!ReplicaFiles::new(&node.pool(), "vol-x").meta().exists());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn recovers_interrupted_creations() {
    let tmp = tempfile::tempdir().unwrap();
    let stub = Stub::start(desired("cluster-1", 1, vec![])).await;
    let node = Node::new(tmp.path(), &stub.url);
    std::fs::create_dir_all(node.pool()).unwrap();
    // Crash before the metadata was written: a leftover data file under its temporary name.
    let x = ReplicaFiles::new(&node.pool(), "vol-x");
    std::fs::write(x.data_creating(), b"partial").unwrap();
    // Crash after the metadata was written, before the rename.
    let y = ReplicaFiles::new(&node.pool(), "vol-y");
    FileDevice::create(&y.data_creating(), 1 << 20).unwrap();
    let mut meta = ReplicaMeta::new("cluster-1", "vol-y", "uuid-y", 1 << 20, "node-a", 0, 3, 1);
    y.write_meta(&mut meta).unwrap();

    stub.set(desired(
        "cluster-1",
        1,
        vec![want("vol-x", "uuid-x", 2 << 20, true)],
    ));
    let agent = Running::start(node.config.clone());
    let r = stub
        .wait_report("both present", 0, |r| {
            replica(r, "vol-x").is_some() && replica(r, "vol-y").is_some()
        })
        .await;
    assert_eq!(replica(&r, "vol-x").unwrap().size_bytes, 2 << 20);
    assert_eq!(replica(&r, "vol-x").unwrap().last_error, None);
    assert_eq!(
        replica(&r, "vol-y").unwrap().disk_state,
        DiskState::UpToDate
    );
    assert!(!x.data_creating().exists() && !y.data_creating().exists());
    assert!(y.data().exists());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn orphan_data_without_metadata_is_kept_and_not_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let stub = Stub::start(desired(
        "cluster-1",
        1,
        vec![want("vol-o", "uuid-o", 1 << 20, true)],
    ))
    .await;
    let node = Node::new(tmp.path(), &stub.url);
    std::fs::create_dir_all(node.pool()).unwrap();
    let o = ReplicaFiles::new(&node.pool(), "vol-o");
    std::fs::write(o.data(), b"precious").unwrap();
    let agent = Running::start(node.config.clone());
    let r = stub
        .wait_report("orphan reported", 0, |r| {
            replica(r, "vol-o").is_some_and(|v| v.last_error.is_some())
        })
        .await;
    let v = replica(&r, "vol-o").unwrap();
    assert_eq!(v.disk_state, DiskState::Failed);
    assert!(v.on_disk, "files are on disk");
    assert_eq!(v.volume_uuid, "", "without a readable uuid");
    agent.stop().await;
    assert_eq!(std::fs::read(o.data()).unwrap(), b"precious");
    assert!(!o.meta().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keeps_running_without_a_controller_and_a_second_agent_is_locked_out() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing listens on this port (bound then dropped).
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let node = Node::new(tmp.path(), &dead);
    seed_replica(&node.pool(), "vol-a", "uuid-a", 1 << 20);
    let agent = Running::start(node.config.clone());
    // The socket appears although the controller is unreachable.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !node.config.nbd_socket.exists() {
        assert!(Instant::now() < deadline, "socket never appeared");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut second = node.config.clone();
    second.nbd_socket = tmp.path().join("run/other.sock");
    let err = tandem_agent::run(second, async {}).await.unwrap_err();
    assert!(matches!(err, AgentError::Locked(_)), "{err}");
    assert!(err.to_string().contains("another agent"), "{err}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_non_loopback_tcp() {
    let tmp = tempfile::tempdir().unwrap();
    let mut node = Node::new(tmp.path(), "http://127.0.0.1:9");
    node.config.nbd_tcp = Some("192.0.2.1:10809".into());
    let err = tandem_agent::run(node.config.clone(), async {})
        .await
        .unwrap_err();
    assert!(err.to_string().contains("loopback"), "{err}");
}

fn have(tool: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool} >/dev/null"))
        .status()
        .is_ok_and(|s| s.success())
}

/// A real NBD client (qemu-io) against the agent's unix socket: a created replica is
/// exported under its volume name, writes land in the data file, and a delete is refused while
/// a client is connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serves_replicas_over_nbd_and_refuses_delete_while_connected() {
    assert!(
        have("qemu-io"),
        "qemu-io is needed; ./scripts/test installs it"
    );
    let tmp = tempfile::tempdir().unwrap();
    let stub = Stub::start(desired(
        "cluster-1",
        1,
        vec![want("vol-n", "uuid-n", 4 << 20, true)],
    ))
    .await;
    let node = Node::new(tmp.path(), &stub.url);
    let agent = Running::start(node.config.clone());
    stub.wait_report("vol-n created", 0, |r| replica(r, "vol-n").is_some())
        .await;
    let uri = format!(
        "nbd+unix:///vol-n?socket={}",
        node.config.nbd_socket.display()
    );

    let out = tokio::process::Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0xab 1048576 65536",
            "-c",
            "flush",
        ])
        .arg(&uri)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-io: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(ReplicaFiles::new(&node.pool(), "vol-n").data()).unwrap();
    assert!(data[1 << 20..(1 << 20) + 65536].iter().all(|b| *b == 0xab));
    assert!(data[..1 << 20].iter().all(|b| *b == 0));

    // Hold a connection open: interactive qemu-io stays connected until its stdin closes.
    let mut holder = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &uri])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    stub.wait_report("connection counted", stub.reports(), |r| {
        replica(r, "vol-n").is_some_and(|v| v.connections == 1)
    })
    .await;
    stub.set(desired(
        "cluster-1",
        2,
        vec![want("vol-n", "uuid-n", 4 << 20, false)],
    ));
    let r = stub
        .wait_report("delete refused", 0, |r| {
            replica(r, "vol-n").is_some_and(|v| v.last_error.is_some())
        })
        .await;
    let err = replica(&r, "vol-n").unwrap().last_error.clone().unwrap();
    assert!(err.contains("connection"), "{err}");
    let files = ReplicaFiles::new(&node.pool(), "vol-n");
    assert!(files.data().exists() && files.meta().exists());

    // The client goes away: the delete goes through.
    drop(holder.stdin.take());
    let status = tokio::task::spawn_blocking(move || holder.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    stub.wait_report("deleted", 0, |r| replica(r, "vol-n").is_none())
        .await;
    assert!(!files.data().exists() && !files.meta().exists());
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_with_peers_gets_node_id_and_witness_creates_no_files() {
    use std::os::unix::fs::PermissionsExt;
    use tandem_api::DesiredPeer;
    let tmp = tempfile::tempdir().unwrap();
    let peer = |node: &str, id: u8, diskless: bool| DesiredPeer {
        node: node.into(),
        node_id: id,
        repl_addr: Some(format!("127.0.0.1:{}", 7000 + u16::from(id))),
        diskless,
    };
    let mut diskful = want("vol-r", "uuid-r", 4 << 20, true);
    diskful.node_id = Some(2);
    diskful.peers = vec![peer("node-b", 5, false), peer("node-c", 7, true)];
    let mut witness = want("vol-w", "uuid-w", 4 << 20, true);
    witness.pool = String::new();
    witness.diskless = true;
    witness.node_id = Some(2);
    witness.peers = vec![peer("node-b", 5, false), peer("node-c", 7, false)];
    let secret = "ab".repeat(32);
    let mut d = desired("cluster-1", 3, vec![diskful, witness]);
    d.node_id = Some(2);
    d.cluster_secret = Some(secret.clone());
    let stub = Stub::start(d).await;
    let node = Node::new(tmp.path(), &stub.url);
    let agent = Running::start(node.config.clone());
    let r = stub
        .wait_report("both placements reported", 0, |r| {
            replica(r, "vol-r").is_some_and(|x| x.disk_state == DiskState::UpToDate)
                && replica(r, "vol-w").is_some()
        })
        .await;
    let w = replica(&r, "vol-w").unwrap();
    assert!(w.diskless && !w.on_disk && w.pool.is_empty());
    assert_eq!(w.disk_state, DiskState::Diskless);
    let addr = r.repl_addr.clone().expect("replication address reported");
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{addr}"
    );

    let meta = ReplicaFiles::new(&node.pool(), "vol-r")
        .read_meta()
        .unwrap();
    assert_eq!(meta.node_id, 2);
    let peers: Vec<u8> = meta
        .peers
        .iter()
        .filter(|p| !p.is_free())
        .map(|p| p.node_id)
        .collect();
    assert_eq!(
        peers,
        vec![5],
        "diskful peers get bitmap slots, the witness none"
    );
    let names: Vec<String> = std::fs::read_dir(node.pool())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with("vol-w")),
        "a witness creates no files: {names:?}"
    );
    let state = tmp.path().join("state");
    assert_eq!(
        std::fs::read_to_string(state.join("node_id"))
            .unwrap()
            .trim(),
        "2"
    );
    let sp = state.join("cluster_secret");
    assert_eq!(std::fs::read_to_string(&sp).unwrap().trim(), secret);
    assert_eq!(
        std::fs::metadata(&sp).unwrap().permissions().mode() & 0o777,
        0o600
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resizes_a_replica_online_and_resumes_an_interrupted_resize() {
    let tmp = tempfile::tempdir().unwrap();
    let stub = Stub::start(desired(
        "cluster-1",
        1,
        vec![want("vol-r", "uuid-r", 8 << 20, true)],
    ))
    .await;
    let node = Node::new(tmp.path(), &stub.url);
    let agent = Running::start(node.config.clone());
    stub.wait_report("vol-r created", 0, |r| {
        replica(r, "vol-r").is_some_and(|v| v.export_size_bytes == Some(8 << 20))
    })
    .await;
    let files = ReplicaFiles::new(&node.pool(), "vol-r");
    {
        use tandem_blockdev::BlockDevice;
        let dev = FileDevice::open(&files.data()).unwrap();
        dev.write_at(b"keep", 8 << 20).unwrap_err();
        dev.write_at(b"keep", 4096).unwrap();
        dev.flush().unwrap();
    }
    // Grow.
    stub.set(desired(
        "cluster-1",
        2,
        vec![want("vol-r", "uuid-r", 24 << 20, true)],
    ));
    let n = stub.reports();
    let r = stub
        .wait_report("vol-r grown", n, |r| {
            r.applied_revision == 2
                && replica(r, "vol-r").is_some_and(|v| {
                    v.size_bytes == 24 << 20 && v.export_size_bytes == Some(24 << 20)
                })
        })
        .await;
    let v = replica(&r, "vol-r").unwrap();
    assert_eq!(v.last_error, None);
    assert!(
        v.allocated_bytes < 1 << 20,
        "grown sparse: {}",
        v.allocated_bytes
    );
    assert_eq!(std::fs::metadata(files.data()).unwrap().len(), 24 << 20);
    let meta = files.read_meta().unwrap();
    assert_eq!(meta.size_bytes, 24 << 20);
    let bm = tandem_meta::Bitmap::open(&files.bitmap()).unwrap();
    assert_eq!(bm.size_bytes(), 24 << 20);
    assert_eq!(
        meta.peers[1].bitmap_offset,
        tandem_meta::Bitmap::region(24 << 20, 4096, 1).0
    );
    assert!(!files.bitmap_tmp().exists());
    agent.stop().await;

    // A crash in the middle of the next grow (data file extended, nothing committed): the
    // next start cuts it back to the committed size and the desired state grows it again.
    std::fs::OpenOptions::new()
        .write(true)
        .open(files.data())
        .unwrap()
        .set_len(40 << 20)
        .unwrap();
    stub.set(desired(
        "cluster-1",
        3,
        vec![want("vol-r", "uuid-r", 40 << 20, true)],
    ));
    let n = stub.reports();
    let agent = Running::start(node.config.clone());
    let r = stub
        .wait_report("vol-r grown after restart", n, |r| {
            r.applied_revision == 3 && replica(r, "vol-r").is_some_and(|v| v.size_bytes == 40 << 20)
        })
        .await;
    let v = replica(&r, "vol-r").unwrap();
    assert_eq!(v.disk_state, DiskState::UpToDate);
    assert_eq!(v.last_error, None);
    // Shrink (the controller only asks for it with allow_shrink).
    stub.set(desired(
        "cluster-1",
        4,
        vec![want("vol-r", "uuid-r", 16 << 20, true)],
    ));
    let n = stub.reports();
    stub.wait_report("vol-r shrunk", n, |r| {
        r.applied_revision == 4
            && replica(r, "vol-r")
                .is_some_and(|v| v.size_bytes == 16 << 20 && v.export_size_bytes == Some(16 << 20))
    })
    .await;
    agent.stop().await;
    assert_eq!(std::fs::metadata(files.data()).unwrap().len(), 16 << 20);
    let mut buf = [0u8; 4];
    {
        use tandem_blockdev::BlockDevice;
        FileDevice::open(&files.data())
            .unwrap()
            .read_at(&mut buf, 4096)
            .unwrap();
    }
    assert_eq!(&buf, b"keep");
}

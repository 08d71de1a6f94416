//! Test harness: the real controller (axum server + redb store) in-process on 127.0.0.1:0,
//! talked to over HTTP.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use tandem_api::{
    AgentReport, ApiError, DesiredState, DiskState, NodeRole, PoolKind, PoolReport, ReplicaReport,
    Role,
};
use tandem_controller::{Config, ControllerError};

pub const GIB: u64 = 1 << 30;

pub struct Server {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ControllerError>>>,
    http: ureq::Agent,
}

impl Server {
    pub fn start(dir: &Path) -> Server {
        Self::start_with(dir, 10)
    }

    pub fn start_with(dir: &Path, offline_after_secs: u64) -> Server {
        Self::start_opts(dir, offline_after_secs, false)
    }

    /// With `experimental_replication` on (multi-replica volumes allowed).
    pub fn start_experimental(dir: &Path) -> Server {
        Self::start_opts(dir, 10, true)
    }

    /// An experimental-replication controller with nodes n1, n2, n3 (30, 10, 20 GiB free) and
    /// volume `a` of 1 GiB with 2 replicas: n1 (its Primary) and n3 hold the data, n2 is the
    /// witness. `extra`: more fields of the create request. Returns the created volume.
    pub fn three_nodes_with_volume_a(dir: &Path, extra: Value) -> (Server, tandem_api::Volume) {
        let s = Self::start_experimental(dir);
        for (n, free) in [("n1", 30), ("n2", 10), ("n3", 20)] {
            let mut r = report(n, 0);
            r.pools[0].free_bytes = free * GIB;
            s.sync(&r, 0);
        }
        let mut body = serde_json::json!({"name": "a", "size_bytes": GIB, "replicas": 2});
        for (k, v) in extra.as_object().expect("extra is an object") {
            body[k] = v.clone();
        }
        let (st, v) = s.post("/v1/volumes", &body);
        assert_eq!(st, 201, "{v}");
        let v: tandem_api::Volume = serde_json::from_value(v).unwrap();
        assert_eq!(v.primary_node.as_deref(), Some("n1"), "{v:?}");
        let diskful: Vec<&str> = v
            .replicas
            .iter()
            .filter(|r| !r.diskless)
            .map(|r| r.node.as_str())
            .collect();
        assert_eq!(diskful, ["n1", "n3"], "{v:?}");
        (s, v)
    }

    pub fn start_opts(
        dir: &Path,
        offline_after_secs: u64,
        experimental_replication: bool,
    ) -> Server {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let config = Config {
            listen: "127.0.0.1:0".into(),
            data_dir: dir.to_path_buf(),
            offline_after_secs,
            experimental_replication,
        };
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let listener = tandem_controller::bind("127.0.0.1:0").await?;
                addr_tx
                    .send(listener.local_addr().expect("addr"))
                    .expect("send addr");
                tandem_controller::run_with_listener(config, listener, async move {
                    let _ = stop_rx.await;
                })
                .await
            })
        });
        let addr = addr_rx
            .recv_timeout(Duration::from_secs(30))
            .expect("server did not start");
        let http: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        let s = Server {
            addr,
            dir: dir.to_path_buf(),
            stop: Some(stop_tx),
            thread: Some(thread),
            http,
        };
        // The store is opened after the address is known: wait until the API answers (a
        // connection refused or reset before then is retried, not a failure).
        wait_for("controller answers /v1/health", || {
            s.http
                .get(&s.url("/v1/health"))
                .call()
                .is_ok_and(|r| r.status().as_u16() == 200)
        });
        s
    }

    /// Stops the server and waits until it released its state file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let r = t.join().expect("server thread panicked");
            r.expect("server failed");
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn finish(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> (u16, Value) {
        let mut resp = r.expect("HTTP request failed");
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().expect("body");
        if status == 204 && text.is_empty() {
            return (status, Value::Null);
        }
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("status {status}: body is not JSON ({e}): {text:?}"));
        (status, v)
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        Self::finish(self.http.get(&self.url(path)).call())
    }

    pub fn post<T: Serialize>(&self, path: &str, body: &T) -> (u16, Value) {
        Self::finish(self.http.post(&self.url(path)).send_json(body))
    }

    pub fn patch<T: Serialize>(&self, path: &str, body: &T) -> (u16, Value) {
        Self::finish(self.http.patch(&self.url(path)).send_json(body))
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        Self::finish(self.http.delete(&self.url(path)).call())
    }

    /// GET expecting 200, decoded.
    pub fn get_ok<T: DeserializeOwned>(&self, path: &str) -> T {
        let (status, v) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {v}");
        serde_json::from_value(v).expect("decode")
    }

    pub fn sync(&self, report: &AgentReport, wait_ms: u64) -> DesiredState {
        let (status, v) = self.post(
            &format!("/v1/agents/{}/sync?wait_ms={wait_ms}", report.node),
            report,
        );
        assert_eq!(status, 200, "sync: {v}");
        serde_json::from_value(v).expect("decode DesiredState")
    }

    /// Sends raw bytes as one HTTP request and returns (status, body).
    pub fn raw(&self, request: &[u8]) -> (u16, String) {
        let mut s = TcpStream::connect(self.addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(request).expect("write");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).to_string();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status line in {text:?}"));
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Some(tx) = self.stop.take() {
                let _ = tx.send(());
            }
            return;
        }
        self.shutdown();
    }
}

/// Builds a raw HTTP/1.1 request.
pub fn request(method: &str, path: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(ct) = content_type {
        r.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    r.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut out = r.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Polls `cond` until it holds, failing after a deadline.
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("timed out waiting for: {what}");
}

pub fn assert_api_error(status: u16, v: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "body: {v}");
    let e: ApiError = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v}"));
    assert_eq!(e.code, want_code, "{}", e.message);
    assert!(!e.message.is_empty());
}

pub fn pool(name: &str, free: u64) -> PoolReport {
    PoolReport {
        name: name.into(),
        kind: PoolKind::Dir,
        path: format!("/srv/tandem/{name}"),
        capacity_bytes: 100 * GIB,
        free_bytes: free,
    }
}

pub fn report(node: &str, applied_revision: u64) -> AgentReport {
    AgentReport {
        node: node.into(),
        address: "127.0.0.1".into(),
        role: NodeRole::Diskful,
        agent_version: "0.1.0-test".into(),
        nbd_socket: Some(format!("/run/tandem/{node}/nbd.sock")),
        nbd_tcp: Some("127.0.0.1:10809".into()),
        pools: vec![pool("default", 50 * GIB)],
        replicas: vec![],
        applied_revision,
        cluster_id: None,
        repl_addr: Some(format!("127.0.0.1:{}", 7800 + node.len())),
    }
}

pub fn replica(volume: &str, uuid: &str, size: u64, state: DiskState) -> ReplicaReport {
    ReplicaReport {
        volume: volume.into(),
        volume_uuid: uuid.into(),
        pool: "default".into(),
        size_bytes: size,
        export_size_bytes: None,
        allocated_bytes: 0,
        role: Role::Secondary,
        disk_state: state,
        disk_error: None,
        connections: 0,
        last_error: None,
        on_disk: true,
        diskless: false,
        peers: vec![],
        out_of_sync_bytes: 0,
        resync_bytes_per_sec: 0,
        resync_yielding: false,
        last_resync_bytes: 0,
        quorum: None,
        role_error: None,
        resync_bytes_left: None,
        resync_eta_secs: None,
        verify: None,
        split_brain: vec![],
        discard_pending: false,
        last_resync_skipped_bytes: 0,
        clients: vec![],
        allow_two_primaries: false,
        dual_primary_partner: None,
        write_token: false,
        on_no_quorum: None,
        suspended_requests: 0,
    }
}

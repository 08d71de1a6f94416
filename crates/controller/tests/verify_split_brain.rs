//! `volume verify` and `volume resolve-split-brain` in the controller: operations, what the
//! agents are asked to do, progress from their reports, refusals.

mod common;

use common::*;
use serde_json::json;
use tandem_api::{DesiredState, DiskState, ReplicaReport, SplitBrainReport, Volume};

struct Setup {
    s: Server,
    uuid: String,
    _dir: tempfile::TempDir,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let (s, v) = Server::three_nodes_with_volume_a(dir.path(), json!({}));
    Setup {
        s,
        uuid: v.uuid,
        _dir: dir,
    }
}

impl Setup {
    fn rep(&self, node: &str, state: DiskState) -> ReplicaReport {
        let mut r = replica("a", &self.uuid, GIB, state);
        if node == "n2" {
            r.pool = String::new();
            r.diskless = true;
            r.on_disk = false;
        }
        r
    }

    /// Syncs `node` with `rep` as applied at its current desired revision.
    fn send(&self, node: &str, rep: ReplicaReport) -> DesiredState {
        let d = self.s.sync(&report(node, 0), 0);
        let mut r = report(node, d.revision);
        r.replicas = vec![rep];
        self.s.sync(&r, 0)
    }

    fn healthy(&self) {
        self.send("n1", self.rep("n1", DiskState::UpToDate));
        self.send("n2", self.rep("n2", DiskState::Diskless));
        self.send("n3", self.rep("n3", DiskState::UpToDate));
    }

    fn volume(&self) -> Volume {
        self.s.get_ok("/v1/volumes/a")
    }
}

fn verify_report(id: &str, state: &str, checked: u64, different: u64) -> tandem_api::VerifyReport {
    tandem_api::VerifyReport {
        id: id.into(),
        node: "n1".into(),
        state: state.into(),
        resync: true,
        peers: vec!["n3".into()],
        total_bytes: GIB,
        checked_bytes: checked,
        different_bytes: different,
        ranges: if different > 0 {
            vec![tandem_api::ByteRange {
                offset: 8192,
                len: different,
            }]
        } else {
            vec![]
        },
        ranges_truncated: false,
        resync_started: vec![],
        bytes_per_sec: 1 << 20,
        eta_secs: Some(10),
        error: None,
        started_unix: 1,
        finished_unix: None,
    }
}

#[test]
fn verify_is_an_operation_run_by_the_source_and_followed_to_its_result() {
    let t = setup();
    t.healthy();
    let (st, op) = t.s.post("/v1/volumes/a/verify", &json!({"resync": true}));
    assert_eq!(st, 202, "{op}");
    assert_eq!(op["kind"], "verify");
    assert_eq!(op["steps"][0]["node"], "n1", "the Primary verifies: {op}");
    let id = op["id"].as_str().unwrap().to_string();
    let (st, e) = t.s.post("/v1/volumes/a/verify", &json!({}));
    assert_api_error(st, &e, 409, "verify_running");
    // Only the source is asked, with the id and the resync flag (a report of an older
    // revision: the agent has not applied it yet).
    let d1 = t.s.sync(&report("n1", 0), 0);
    let want = d1.replicas[0].verify.clone().expect("verify asked of n1");
    assert_eq!((want.id.as_str(), want.resync), (id.as_str(), true));
    let d3 = t.send("n3", t.rep("n3", DiskState::UpToDate));
    assert!(d3.replicas[0].verify.is_none());

    // Progress from the source's report.
    let mut r = t.rep("n1", DiskState::UpToDate);
    r.verify = Some(verify_report(&id, "running", GIB / 2, 0));
    t.send("n1", r.clone());
    let v = t.volume();
    let o = v.operations.iter().find(|o| o.id == id).unwrap();
    assert_eq!(
        (o.state.as_str(), o.progress, o.eta_secs),
        ("running", 0.5, Some(10))
    );
    assert_eq!(
        v.replicas[0].verify.as_ref().unwrap().checked_bytes,
        GIB / 2
    );

    // Done: the result stays with the volume, the agent is no longer asked.
    r.verify = Some(verify_report(&id, "done", GIB, 4096));
    let d1 = t.send("n1", r);
    assert!(d1.replicas[0].verify.is_none());
    let v = t.volume();
    let o = v.operations.iter().find(|o| o.id == id).unwrap();
    assert_eq!((o.state.as_str(), o.progress), ("done", 1.0));
    let last = v.last_verify.expect("last verify kept");
    assert_eq!((last.checked_bytes, last.different_bytes), (GIB, 4096));

    // A source that applied the request but reports nothing for it: failed, not stuck.
    let (st, op) = t.s.post("/v1/volumes/a/verify", &json!({}));
    assert_eq!(st, 202, "{op}");
    let id2 = op["id"].as_str().unwrap();
    t.send("n1", t.rep("n1", DiskState::UpToDate));
    let v = t.volume();
    let o = v.operations.iter().find(|o| o.id == id2).unwrap();
    assert_eq!(o.state, "failed", "{o:?}");
    assert!(
        o.last_error.as_ref().unwrap().contains("did not start"),
        "{o:?}"
    );

    // Single replica: nothing to compare with.
    let (st, _) =
        t.s.post("/v1/volumes", &json!({"name": "one", "size_bytes": GIB}));
    assert_eq!(st, 201);
    let (st, e) = t.s.post("/v1/volumes/one/verify", &json!({}));
    assert_api_error(st, &e, 409, "not_replicated");
}

#[test]
fn split_brain_resolution_is_refused_unless_it_can_work_and_followed_to_the_end() {
    let t = setup();
    t.healthy();
    let resolve = |node: &str| {
        t.s.post(
            "/v1/volumes/a/resolve-split-brain",
            &json!({"discard": node}),
        )
    };
    let (st, e) = resolve("n3");
    assert_api_error(st, &e, 409, "no_split_brain");
    let (st, e) = resolve("n2");
    assert_api_error(st, &e, 409, "no_replica");

    // Both diskful replicas report the split brain with each other.
    let split = |node: &str, peer: &str, state: DiskState| {
        let mut r = t.rep(node, state);
        r.split_brain = vec![SplitBrainReport {
            peer: peer.into(),
            rule: "SplitBrainSameBitmap".into(),
            our_bytes: 4096,
            peer_bytes: 8192,
            resolution: None,
        }];
        r.peers = vec![tandem_api::PeerReplState {
            node: peer.into(),
            repl_state: "SplitBrain".into(),
            out_of_sync_bytes: 4096,
        }];
        r
    };
    t.send("n1", split("n1", "n3", DiskState::Inconsistent));
    t.send("n3", split("n3", "n1", DiskState::UpToDate));
    let v = t.volume();
    assert_eq!(v.replicas[0].split_brain.len(), 1, "{v:?}");
    assert!(
        v.replicas
            .iter()
            .any(|r| r.repl_state.contains("SplitBrain")),
        "{v:?}"
    );
    // n1 is not UpToDate: discarding n3 would drop the only good data.
    let (st, e) = resolve("n3");
    assert_api_error(st, &e, 409, "only_up_to_date");
    t.send("n1", split("n1", "n3", DiskState::UpToDate));

    // Discard n1 (the Primary): the Primary moves, n1 is asked to discard, n3 to reconnect.
    let (st, v) = resolve("n1");
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["primary_node"], "n3");
    let d1 = t.send("n1", split("n1", "n3", DiskState::UpToDate));
    let r1 = d1.replicas[0]
        .resolve_split_brain
        .clone()
        .expect("asked of n1");
    assert!(r1.discard && !d1.replicas[0].primary);
    let d3 = t.send("n3", split("n3", "n1", DiskState::UpToDate));
    let r3 = d3.replicas[0]
        .resolve_split_brain
        .clone()
        .expect("asked of n3");
    assert!(!r3.discard && r3.id == r1.id);
    // Resyncing: not done yet; then settled.
    let mut r = t.rep("n1", DiskState::Inconsistent);
    r.discard_pending = true;
    t.send("n1", r);
    let op = |v: &Volume| {
        v.operations
            .iter()
            .find(|o| o.kind == "resolve-split-brain")
            .unwrap()
            .state
            .clone()
    };
    assert_eq!(op(&t.volume()), "running");
    let mut r = t.rep("n1", DiskState::UpToDate);
    r.peers = vec![tandem_api::PeerReplState {
        node: "n3".into(),
        repl_state: "Established".into(),
        out_of_sync_bytes: 0,
    }];
    t.send("n1", r);
    assert_eq!(op(&t.volume()), "done");

    // Policies are validated.
    let (st, e) = t.s.patch(
        "/v1/volumes/a",
        &json!({"after_split_brain": "discard-node:n2"}),
    );
    assert_api_error(st, &e, 400, "invalid_policy");
    let (st, e) =
        t.s.patch("/v1/volumes/a", &json!({"after_split_brain": "merge"}));
    assert_api_error(st, &e, 400, "invalid_policy");
    let (st, v) = t.s.patch(
        "/v1/volumes/a",
        &json!({"after_split_brain": "discard-zero-changes"}),
    );
    assert_eq!(st, 200, "{v}");
    let d = t.send("n3", t.rep("n3", DiskState::UpToDate));
    assert_eq!(d.replicas[0].after_split_brain, "discard-zero-changes");
    // State export keeps it.
    let (st, doc) = t.s.get("/v1/state");
    assert_eq!(st, 200);
    let a = doc["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "a")
        .unwrap();
    assert_eq!(a["after_split_brain"], "discard-zero-changes", "{a}");
}

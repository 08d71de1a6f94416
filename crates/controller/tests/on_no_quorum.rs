//! The on-no-quorum policy in the controller: `volume set --on-no-quorum` (and at `volume
//! create`), shown on the volume, pushed in every desired state, kept by state export/import,
//! the per-replica `on_no_quorum` / `suspended_requests` the agents report, and the refusals
//! (`suspend` on a single-replica volume, a value that is no policy).

mod common;

use common::*;
use serde_json::json;
use tandem_api::{DesiredReplica, DiskState, OnNoQuorum, Role, Volume};

struct Setup {
    s: Server,
    uuid: String,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// n1 and n3 hold replicas of `a` (n1 Primary), n2 its witness; `extra` goes into the
    /// create request.
    fn new(extra: serde_json::Value) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let (s, v) = Server::three_nodes_with_volume_a(dir.path(), extra);
        Setup {
            s,
            uuid: v.uuid,
            _dir: dir,
        }
    }

    /// Syncs `node` reporting its replica of `a` (the engine's policy and held requests as
    /// given); returns its desired replica of `a`.
    fn send(&self, node: &str, policy: Option<OnNoQuorum>, held: u64) -> DesiredReplica {
        let mut r = report(node, 0);
        let mut x = replica("a", &self.uuid, GIB, DiskState::UpToDate);
        x.role = if node == "n1" {
            Role::Primary
        } else {
            Role::Secondary
        };
        x.quorum = Some(held == 0);
        x.on_no_quorum = policy;
        x.suspended_requests = held;
        if node == "n2" {
            x.pool = String::new();
            x.diskless = true;
            x.on_disk = false;
            x.disk_state = DiskState::Diskless;
        }
        r.replicas = vec![x];
        let d = self.s.sync(&r, 0);
        d.replicas.into_iter().find(|r| r.volume == "a").unwrap()
    }

    /// The policy every node's desired state carries for `a`.
    fn pushed(&self) -> Vec<OnNoQuorum> {
        ["n1", "n2", "n3"]
            .into_iter()
            .map(|n| self.send(n, None, 0).on_no_quorum)
            .collect()
    }

    fn set(&self, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.s.patch("/v1/volumes/a", &body)
    }

    fn volume(&self) -> Volume {
        self.s.get_ok("/v1/volumes/a")
    }
}

#[test]
fn on_no_quorum_is_set_shown_pushed_reported_and_exported() {
    let t = Setup::new(json!({}));
    // The default: io-error, everywhere.
    let v = t.volume();
    assert_eq!(v.on_no_quorum, OnNoQuorum::IoError);
    let raw: serde_json::Value = t.s.get_ok("/v1/volumes/a");
    assert_eq!(raw["on_no_quorum"], "io-error", "{raw}");
    assert_eq!(t.pushed(), [OnNoQuorum::IoError; 3]);

    let before = t.s.sync(&report("n2", 0), 0).revision;
    let (st, v) = t.set(json!({"on_no_quorum": "suspend"}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["on_no_quorum"], "suspend");
    let after = t.s.sync(&report("n2", 0), 0).revision;
    assert!(after > before, "the desired states changed");
    assert_eq!(t.pushed(), [OnNoQuorum::Suspend; 3]);
    // Repeating is harmless and changes no desired state.
    let (st, _) = t.set(json!({"on_no_quorum": "suspend"}));
    assert_eq!(st, 200);
    assert_eq!(t.s.sync(&report("n2", 0), 0).revision, after);

    // What the agents report shows per replica: the policy their engines apply and the
    // requests the Primary holds for quorum; an unreported policy is null.
    t.send("n1", Some(OnNoQuorum::Suspend), 2);
    t.send("n3", Some(OnNoQuorum::Suspend), 0);
    let v = t.volume();
    let r = |n: &str| v.replicas.iter().find(|r| r.node == n).unwrap().clone();
    assert_eq!(r("n1").on_no_quorum, Some(OnNoQuorum::Suspend));
    assert_eq!(r("n1").suspended_requests, 2);
    assert_eq!(r("n3").on_no_quorum, Some(OnNoQuorum::Suspend));
    assert_eq!(r("n3").suspended_requests, 0);
    assert_eq!(r("n2").on_no_quorum, None);
    let raw: serde_json::Value = t.s.get_ok("/v1/volumes/a");
    let n1 = raw["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["node"] == "n1")
        .unwrap();
    assert_eq!(n1["on_no_quorum"], "suspend", "{n1}");
    assert_eq!(n1["suspended_requests"], 2, "{n1}");

    // The state document carries the policy (omitted while io-error) and an import keeps it.
    let doc: serde_json::Value = t.s.get_ok("/v1/state");
    assert_eq!(doc["volumes"][0]["on_no_quorum"], "suspend", "{doc}");
    let dir2 = tempfile::tempdir().unwrap();
    let s2 = Server::start_experimental(dir2.path());
    let (st, r) = s2.post("/v1/state", &doc);
    assert_eq!(st, 200, "{r}");
    let v2: Volume = s2.get_ok("/v1/volumes/a");
    assert_eq!(v2.on_no_quorum, OnNoQuorum::Suspend);

    // Back to io-error, together with another option: both apply, and reach every node.
    let (st, v) = t.set(json!({"on_no_quorum": "io-error", "resync_rate_bytes_per_sec": 1000}));
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["on_no_quorum"], "io-error");
    assert_eq!(v["resync_rate_bytes_per_sec"], 1000);
    assert_eq!(t.pushed(), [OnNoQuorum::IoError; 3]);
    let doc: serde_json::Value = t.s.get_ok("/v1/state");
    assert!(
        doc["volumes"][0].get("on_no_quorum").is_none(),
        "io-error is the default, left out: {doc}"
    );
}

#[test]
fn on_no_quorum_given_at_create() {
    let t = Setup::new(json!({"on_no_quorum": "suspend"}));
    assert_eq!(t.volume().on_no_quorum, OnNoQuorum::Suspend);
    assert_eq!(t.pushed(), [OnNoQuorum::Suspend; 3]);
    // Other nodes' volumes are not touched: a second volume keeps the default.
    let (st, v) = t.s.post(
        "/v1/volumes",
        &json!({"name": "b", "size_bytes": GIB, "replicas": 2}),
    );
    assert_eq!(st, 201, "{v}");
    assert_eq!(v["on_no_quorum"], "io-error");
}

#[test]
fn suspend_is_refused_for_a_single_replica_and_bad_values_are_refused() {
    let t = Setup::new(json!({}));
    let (st, v) =
        t.s.post("/v1/volumes", &json!({"name": "one", "size_bytes": GIB}));
    assert_eq!(st, 201, "{v}");
    let (st, e) = t.s.patch(
        "/v1/volumes/one",
        &json!({"on_no_quorum": "suspend", "resync_rate_bytes_per_sec": 5000}),
    );
    assert_api_error(st, &e, 409, "not_replicated");
    assert!(
        e["message"].as_str().unwrap().contains("single replica"),
        "{e}"
    );
    // A refused request changes nothing.
    let v: Volume = t.s.get_ok("/v1/volumes/one");
    assert_eq!(v.on_no_quorum, OnNoQuorum::IoError);
    assert_eq!(v.resync_rate_bytes_per_sec, 0);
    // io-error (the default) is no change there.
    let (st, _) =
        t.s.patch("/v1/volumes/one", &json!({"on_no_quorum": "io-error"}));
    assert_eq!(st, 200);

    // At create: refused, nothing created.
    let (st, e) = t.s.post(
        "/v1/volumes",
        &json!({"name": "two", "size_bytes": GIB, "on_no_quorum": "suspend"}),
    );
    assert_api_error(st, &e, 409, "not_replicated");
    let (st, _) = t.s.get("/v1/volumes/two");
    assert_eq!(st, 404);

    // Not a policy: malformed body, at set and at create.
    let (st, e) = t.set(json!({"on_no_quorum": "hang"}));
    assert_api_error(st, &e, 422, "invalid_body");
    let (st, e) = t.set(json!({"on_no_quorum": "IoError"}));
    assert_api_error(st, &e, 422, "invalid_body");
    let (st, e) = t.s.post(
        "/v1/volumes",
        &json!({"name": "three", "size_bytes": GIB, "replicas": 2, "on_no_quorum": "off"}),
    );
    assert_api_error(st, &e, 422, "invalid_body");
    assert_eq!(t.volume().on_no_quorum, OnNoQuorum::IoError);
}

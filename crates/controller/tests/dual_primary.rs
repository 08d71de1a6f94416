//! The dual-primary window (live migration) in the controller: `volume set
//! --allow-two-primaries`, shown on the volume, pushed in every desired state, the second
//! Primary of `volume promote`, and the refusals (one replica, protocol A, closing while two
//! nodes are Primary, a third Primary, --force with the window open).

mod common;

use std::cell::RefCell;
use std::collections::BTreeMap;

use common::*;
use serde_json::json;
use tandem_api::{DesiredReplica, DiskState, Role, Volume};

/// What a node reports for volume `a`: disk state, role, consumers, dual-primary partner.
#[derive(Clone)]
struct Rep {
    state: DiskState,
    role: Role,
    connections: u32,
    partner: Option<&'static str>,
    token: bool,
}

struct Setup {
    s: Server,
    uuid: String,
    reports: RefCell<BTreeMap<&'static str, Rep>>,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// n1 and n3 hold replicas of `a` (n1 Primary), n2 its witness.
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let (s, v) = Server::three_nodes_with_volume_a(dir.path(), json!({}));
        let setup = Setup {
            s,
            uuid: v.uuid,
            reports: RefCell::new(BTreeMap::new()),
            _dir: dir,
        };
        setup.set("n1", DiskState::UpToDate, Role::Primary, 1);
        setup.set("n2", DiskState::Diskless, Role::Secondary, 0);
        setup.set("n3", DiskState::UpToDate, Role::Secondary, 0);
        setup
    }

    fn set(&self, node: &'static str, state: DiskState, role: Role, connections: u32) {
        self.reports.borrow_mut().insert(
            node,
            Rep {
                state,
                role,
                connections,
                partner: None,
                token: false,
            },
        );
        self.send(node);
    }

    fn dual(&self, node: &'static str, partner: Option<&'static str>, token: bool) {
        {
            let mut r = self.reports.borrow_mut();
            let rep = r.get_mut(node).unwrap();
            rep.partner = partner;
            rep.token = token;
            if partner.is_some() {
                rep.role = Role::Primary;
            }
        }
        self.send(node);
    }

    /// Syncs `node` with its report; returns its desired replica of `a`.
    fn send(&self, node: &str) -> DesiredReplica {
        let rep = self.reports.borrow()[node].clone();
        let mut r = report(node, 0);
        let mut x = replica("a", &self.uuid, GIB, rep.state);
        x.role = rep.role;
        x.connections = rep.connections;
        x.quorum = Some(true);
        x.allow_two_primaries = rep.partner.is_some();
        x.dual_primary_partner = rep.partner.map(str::to_string);
        x.write_token = rep.token;
        if node == "n2" {
            x.pool = String::new();
            x.diskless = true;
            x.on_disk = false;
        }
        r.replicas = vec![x];
        let d = self.s.sync(&r, 0);
        d.replicas.into_iter().find(|r| r.volume == "a").unwrap()
    }

    fn window(&self, on: bool) -> (u16, serde_json::Value) {
        self.s
            .patch("/v1/volumes/a", &json!({"allow_two_primaries": on}))
    }

    fn role(&self, verb: &str, node: &str, force: bool) -> (u16, serde_json::Value) {
        self.s.post(
            &format!("/v1/volumes/a/{verb}"),
            &json!({"node": node, "force": force}),
        )
    }

    /// Which nodes the desired states mark Primary.
    fn wanted_primary(&self) -> Vec<&'static str> {
        ["n1", "n2", "n3"]
            .into_iter()
            .filter(|n| self.send(n).primary)
            .collect()
    }

    fn volume(&self) -> Volume {
        self.s.get_ok("/v1/volumes/a")
    }
}

#[test]
fn the_window_is_set_shown_pushed_and_allows_a_second_primary() {
    let t = Setup::new();
    let v = t.volume();
    assert!(!v.allow_two_primaries && v.second_primary_node.is_none());
    assert!(!t.send("n3").allow_two_primaries);
    // Closed: promoting n3 moves the Primary (n1 has a consumer: refused as before).
    let (st, e) = t.role("promote", "n3", false);
    assert_api_error(st, &e, 409, "in_use");

    let before = t.s.sync(&report("n2", 0), 0).revision;
    let (st, v) = t.window(true);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["allow_two_primaries"], true);
    assert!(v["second_primary_node"].is_null(), "{v}");
    assert!(t.s.sync(&report("n2", 0), 0).revision > before);
    for n in ["n1", "n2", "n3"] {
        assert!(t.send(n).allow_two_primaries, "{n}");
    }
    // Repeating is harmless.
    let (st, _) = t.window(true);
    assert_eq!(st, 200);

    // Open: n3 becomes the second Primary; n1 keeps the role (its consumer is not touched).
    let (st, v) = t.role("promote", "n3", false);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["primary_node"], "n1");
    assert_eq!(v["second_primary_node"], "n3");
    assert_eq!(t.wanted_primary(), ["n1", "n3"]);
    let (st, _) = t.role("promote", "n3", false);
    assert_eq!(st, 200, "repeating is harmless");
    let (st, _) = t.role("promote", "n1", false);
    assert_eq!(st, 200, "so is promoting the first one");
    assert_eq!(t.wanted_primary(), ["n1", "n3"]);
    // A third one is refused.
    t.set("n2", DiskState::Diskless, Role::Secondary, 0);
    let (st, e) = t.role("promote", "n2", false);
    assert_api_error(st, &e, 409, "two_primaries");
    // Closing while two are wanted Primary is refused, and changes nothing else.
    let (st, e) = t.s.patch(
        "/v1/volumes/a",
        &json!({"allow_two_primaries": false, "resync_rate_bytes_per_sec": 1000}),
    );
    assert_api_error(st, &e, 409, "two_primaries");
    assert!(e["message"].as_str().unwrap().contains("n3"), "{e}");
    assert_eq!(t.volume().resync_rate_bytes_per_sec, 0);

    // What the agents report shows per replica.
    t.dual("n1", Some("n3"), true);
    t.dual("n3", Some("n1"), false);
    let v = t.volume();
    let r = |n: &str| v.replicas.iter().find(|r| r.node == n).unwrap().clone();
    assert_eq!(r("n1").dual_primary_partner.as_deref(), Some("n3"));
    assert!(r("n1").write_token && r("n1").allow_two_primaries);
    assert_eq!(r("n3").dual_primary_partner.as_deref(), Some("n1"));
    assert_eq!(r("n3").role, Role::Primary);
    assert!(!r("n3").write_token);
    assert!(r("n2").dual_primary_partner.is_none() && !r("n2").write_token);

    // The state document carries the window and the second Primary.
    let doc: serde_json::Value = t.s.get_ok("/v1/state");
    let a = &doc["volumes"][0];
    assert_eq!(a["allow_two_primaries"], true, "{a}");
    assert_eq!(a["second_primary_node"], "n3", "{a}");

    // Demoting the first Primary (the migration's source) leaves n3 the Primary; its
    // consumer is checked as for any demotion.
    let (st, e) = t.role("demote", "n1", false);
    assert_api_error(st, &e, 409, "in_use");
    t.set("n1", DiskState::UpToDate, Role::Primary, 0);
    t.dual("n1", Some("n3"), false);
    let (st, v) = t.role("demote", "n1", false);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["primary_node"], "n3");
    assert!(v["second_primary_node"].is_null(), "{v}");
    assert_eq!(t.wanted_primary(), ["n3"]);
    // Two nodes still report being Primary (n1 has not demoted yet): closing waits.
    let (st, e) = t.window(false);
    assert_api_error(st, &e, 409, "two_primaries");
    assert!(e["message"].as_str().unwrap().contains("report"), "{e}");
    t.set("n1", DiskState::UpToDate, Role::Secondary, 0);
    t.dual("n3", None, false);
    let (st, v) = t.window(false);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["allow_two_primaries"], false);
    for n in ["n1", "n2", "n3"] {
        assert!(!t.send(n).allow_two_primaries, "{n}");
    }

    // Closed again: promote moves the role, exactly as before.
    let (st, v) = t.role("promote", "n1", false);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["primary_node"], "n1");
    assert!(v["second_primary_node"].is_null(), "{v}");
    assert_eq!(t.wanted_primary(), ["n1"]);
}

#[test]
fn demoting_the_second_primary_and_force_with_the_window_open() {
    let t = Setup::new();
    let (st, v) = t.window(true);
    assert_eq!(st, 200, "{v}");
    // --force would take the role from n1: with the window open that is a demotion first.
    let (st, e) = t.role("promote", "n3", true);
    assert_api_error(st, &e, 409, "window_open");
    assert!(e["message"].as_str().unwrap().contains("demote"), "{e}");
    let (st, _) = t.role("promote", "n3", false);
    assert_eq!(st, 200);
    // A move of either Primary waits until one of them is demoted.
    let mut n4 = report("n4", 0);
    n4.pools[0].free_bytes = 40 * GIB;
    t.s.sync(&n4, 0);
    for from in ["n1", "n3"] {
        let (st, e) = t.s.post(
            "/v1/volumes/a/move",
            &json!({"from_node": from, "to_node": "n4"}),
        );
        assert_api_error(st, &e, 409, "not_ready");
        assert!(
            e["message"].as_str().unwrap().contains("dual-primary"),
            "{e}"
        );
    }
    // Demoting the second Primary (migration abandoned) leaves n1 alone.
    let (st, v) = t.role("demote", "n3", false);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["primary_node"], "n1");
    assert!(v["second_primary_node"].is_null(), "{v}");
    assert_eq!(t.wanted_primary(), ["n1"]);
    let (st, _) = t.window(false);
    assert_eq!(st, 200);
    // Nobody Primary with the window open: promote simply makes one.
    let (st, _) = t.window(true);
    assert_eq!(st, 200);
    t.set("n1", DiskState::UpToDate, Role::Primary, 0);
    let (st, _) = t.role("demote", "n1", false);
    assert_eq!(st, 200);
    let (st, v) = t.role("promote", "n3", false);
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["primary_node"], "n3");
    assert!(v["second_primary_node"].is_null(), "{v}");
}

#[test]
fn the_window_is_refused_for_one_replica_and_protocol_a() {
    let t = Setup::new();
    let (st, v) =
        t.s.post("/v1/volumes", &json!({"name": "one", "size_bytes": GIB}));
    assert_eq!(st, 201, "{v}");
    let (st, e) =
        t.s.patch("/v1/volumes/one", &json!({"allow_two_primaries": true}));
    assert_api_error(st, &e, 409, "not_replicated");
    let (st, v) = t.s.post(
        "/v1/volumes",
        &json!({"name": "pa", "size_bytes": GIB, "replicas": 2, "protocol": "A"}),
    );
    assert_eq!(st, 201, "{v}");
    let (st, e) =
        t.s.patch("/v1/volumes/pa", &json!({"allow_two_primaries": true}));
    assert_api_error(st, &e, 409, "protocol_a");
    assert!(e["message"].as_str().unwrap().contains("protocol C"), "{e}");
    let v: Volume = t.s.get_ok("/v1/volumes/pa");
    assert!(!v.allow_two_primaries);
    // Closing a closed window is no change.
    let (st, _) =
        t.s.patch("/v1/volumes/pa", &json!({"allow_two_primaries": false}));
    assert_eq!(st, 200);
    let (st, e) =
        t.s.patch("/v1/volumes/a", &json!({"allow_two_primaries": "yes"}));
    assert_api_error(st, &e, 422, "invalid_body");
}

#[test]
fn an_imported_second_primary_needs_the_open_window_and_a_placement() {
    let t = Setup::new();
    let (st, _) = t.window(true);
    assert_eq!(st, 200);
    let (st, _) = t.role("promote", "n3", false);
    assert_eq!(st, 200);
    let doc: serde_json::Value = t.s.get_ok("/v1/state");
    // Round trip into an empty controller.
    let dir2 = tempfile::tempdir().unwrap();
    let s2 = Server::start_experimental(dir2.path());
    let (st, r) = s2.post("/v1/state", &doc);
    assert_eq!(st, 200, "{r}");
    let v: Volume = s2.get_ok("/v1/volumes/a");
    assert!(v.allow_two_primaries);
    assert_eq!(v.primary_node.as_deref(), Some("n1"));
    assert_eq!(v.second_primary_node.as_deref(), Some("n3"));
    // Inconsistent documents are refused.
    for (field, value) in [
        ("allow_two_primaries", json!(false)),
        ("second_primary_node", json!("n9")),
        ("second_primary_node", json!("n1")),
    ] {
        let mut bad = doc.clone();
        bad["volumes"][0][field] = value;
        let (st, e) = s2.post("/v1/state?replace=true", &bad);
        assert_api_error(st, &e, 400, "invalid_state");
    }
}

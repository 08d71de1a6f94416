//! State export/import, rebuild from agents' reports, and operations with retries, against
//! the real server and redb store over HTTP (agents are simulated by their reports).

mod common;

use common::*;
use serde_json::{Value, json};
use tandem_api::{
    ClusterStatus, DiskState, ReconcileReport, StateDocument, StateImportResult, Volume,
    VolumeState,
};

fn create(s: &Server, name: &str, size: u64) -> Volume {
    let (status, v) = s.post("/v1/volumes", &json!({"name": name, "size_bytes": size}));
    assert_eq!(status, 201, "{v}");
    serde_json::from_value(v).unwrap()
}

/// Registers n1, creates `names`, and reports them UpToDate; returns the report.
fn populated(s: &Server, names: &[&str]) -> tandem_api::AgentReport {
    let d = s.sync(&report("n1", 0), 0);
    let mut r = report("n1", d.revision);
    for n in names {
        let v = create(s, n, GIB);
        r.replicas
            .push(replica(n, &v.uuid, GIB, DiskState::UpToDate));
    }
    let d = s.sync(&r, 0);
    r.applied_revision = d.revision;
    r
}

#[test]
fn export_import_round_trip_into_an_empty_store() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let mut r = populated(&s, &["a", "b", "c"]);
    let before: Vec<Volume> = s.get_ok("/v1/volumes");
    let doc: StateDocument = s.get_ok("/v1/state");
    assert_eq!(doc.format_version, 1);
    assert_eq!(doc.volumes.len(), 3);
    assert_eq!(doc.nodes.len(), 1);
    let cluster = doc.cluster_id.clone();
    s.stop();

    // A new controller on a new, empty store.
    let dir2 = tempfile::tempdir().unwrap();
    let s = Server::start(dir2.path());
    let (status, v) = s.post("/v1/state", &doc);
    assert_eq!(status, 200, "{v}");
    let res: StateImportResult = serde_json::from_value(v).unwrap();
    assert_eq!(res.cluster_id, cluster);
    assert_eq!((res.volumes_imported, res.nodes_imported), (3, 1));
    let st: ClusterStatus = s.get_ok("/v1/status");
    assert_eq!(st.cluster_id, cluster);
    // The agent reports again (bound to the cluster): everything looks as before.
    r.cluster_id = Some(cluster.clone());
    let d = s.sync(&r, 0);
    assert_eq!(d.cluster_id, cluster);
    assert_eq!(d.replicas.len(), 3);
    assert!(d.replicas.iter().all(|x| x.present));
    let after: Vec<Volume> = s.get_ok("/v1/volumes");
    assert_eq!(after, before);
    // Exporting again gives the same desired state.
    let again: StateDocument = s.get_ok("/v1/state");
    assert_eq!(again.volumes, doc.volumes);
    assert_eq!(again.nodes, doc.nodes);
}

#[test]
fn import_into_a_used_store_refuses_conflicts_unless_replace() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    populated(&s, &["a", "b"]);
    let doc: StateDocument = s.get_ok("/v1/state");

    // The same document again: no conflict, both volumes match.
    let (status, v) = s.post("/v1/state", &doc);
    assert_eq!(status, 200, "{v}");
    let res: StateImportResult = serde_json::from_value(v).unwrap();
    assert_eq!((res.volumes_imported, res.volumes_matched), (0, 2));

    // Another uuid for 'a', and another cluster: refused, nothing written.
    let mut other = doc.clone();
    other.volumes[0].uuid = "11111111-2222-4333-8444-555555555555".into();
    other.cluster_id = "0f0f0f0f-1111-4222-8333-444444444444".into();
    let (status, v) = s.post("/v1/state", &other);
    assert_api_error(status, &v, 409, "import_conflict");
    let msg = v["message"].as_str().unwrap();
    assert!(msg.contains("volume 'a' exists with uuid"), "{msg}");
    assert!(
        msg.contains("another cluster") || msg.contains("manages cluster"),
        "{msg}"
    );
    assert!(msg.contains("--replace"), "{msg}");
    let still: StateDocument = s.get_ok("/v1/state");
    assert_eq!(still.volumes, doc.volumes);
    assert_eq!(still.cluster_id, doc.cluster_id);

    // With replace: the document wins (volume 'b' dropped from it is gone too).
    other.volumes.truncate(1);
    let (status, v) = s.post("/v1/state?replace=true", &other);
    assert_eq!(status, 200, "{v}");
    let now: StateDocument = s.get_ok("/v1/state");
    assert_eq!(now.cluster_id, other.cluster_id);
    assert_eq!(now.volumes, other.volumes);
}

#[test]
fn rebuild_from_agent_reports_adopts_cluster_and_volumes() {
    // The "old" controller, whose store will be lost.
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let r1 = populated(&s, &["a", "b"]);
    let before: Vec<Volume> = s.get_ok("/v1/volumes");
    let cluster: ClusterStatus = s.get_ok("/v1/status");
    let cluster = cluster.cluster_id;
    s.stop();

    let dir2 = tempfile::tempdir().unwrap();
    let s = Server::start(dir2.path());
    let fresh: ClusterStatus = s.get_ok("/v1/status");
    assert_ne!(fresh.cluster_id, cluster);
    // The agent is bound to the old cluster and reports its replicas.
    let mut r = r1.clone();
    r.cluster_id = Some(cluster.clone());
    r.applied_revision = 0;
    let d = s.sync(&r, 0);
    assert_eq!(
        d.cluster_id, cluster,
        "the empty controller adopts the agents' cluster"
    );
    assert_eq!(d.replicas.len(), 2);
    assert!(d.replicas.iter().all(|x| x.present));
    let after: Vec<Volume> = s.get_ok("/v1/volumes");
    assert_eq!(after.len(), 2);
    for (a, b) in after.iter().zip(&before) {
        assert_eq!(
            (&a.name, &a.uuid, a.size_bytes),
            (&b.name, &b.uuid, b.size_bytes)
        );
        assert_eq!(a.replicas, b.replicas);
        assert_eq!(a.state, VolumeState::Ready);
        assert_eq!(a.operations.len(), 1);
        assert_eq!(
            (
                a.operations[0].kind.as_str(),
                a.operations[0].state.as_str()
            ),
            ("adopt", "done")
        );
    }

    // A second node claims 'a' with another uuid: reported, not adopted.
    let mut r2 = report("n2", 0);
    r2.cluster_id = Some(cluster.clone());
    r2.replicas = vec![
        replica(
            "a",
            "99999999-8888-4777-8666-555555555555",
            GIB,
            DiskState::UpToDate,
        ),
        replica("z", "not-a-uuid", GIB, DiskState::Failed),
    ];
    let d2 = s.sync(&r2, 0);
    assert!(d2.replicas.is_empty(), "{d2:?}");
    let rep: ReconcileReport = s.get_ok("/v1/reconcile");
    let codes: Vec<(&str, &str)> = rep
        .issues
        .iter()
        .map(|i| (i.node.as_str(), i.code.as_str()))
        .collect();
    assert_eq!(
        codes,
        [("n2", "uuid_mismatch"), ("n2", "unreadable_replica")],
        "{rep:?}"
    );
    let st: ClusterStatus = s.get_ok("/v1/status");
    assert_eq!(st.issues, rep.issues);
    let a: Volume = s.get_ok("/v1/volumes/a");
    assert_eq!(a.uuid, before[0].uuid);
    // The cause goes away: so does the issue.
    r2.replicas.clear();
    s.sync(&r2, 0);
    let rep: ReconcileReport = s.get_ok("/v1/reconcile");
    assert!(rep.issues.is_empty(), "{rep:?}");

    // An agent of yet another cluster is refused now that the store is not empty.
    let mut r3 = report("n3", 0);
    r3.cluster_id = Some("0f0f0f0f-1111-4222-8333-444444444444".into());
    r3.replicas = vec![replica(
        "x",
        "77777777-8888-4777-8666-555555555555",
        GIB,
        DiskState::UpToDate,
    )];
    let d3 = s.sync(&r3, 0);
    assert_eq!(d3.cluster_id, cluster);
    assert!(d3.replicas.is_empty());
    let rep: ReconcileReport = s.get_ok("/v1/reconcile");
    assert_eq!(rep.issues.len(), 1);
    assert_eq!(rep.issues[0].code, "foreign_cluster");
    let (status, _) = s.get("/v1/volumes/x");
    assert_eq!(status, 404, "nothing of a foreign agent is adopted");
    let nodes: Vec<Value> = s.get_ok("/v1/nodes");
    assert!(nodes.iter().all(|n| n["name"] != "n3"), "{nodes:?}");
}

#[test]
fn failed_creation_not_on_disk_is_not_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let mut r = report("n1", 0);
    let mut ghost = replica(
        "g",
        "12345678-8888-4777-8666-555555555555",
        GIB,
        DiskState::Failed,
    );
    ghost.on_disk = false;
    ghost.last_error = Some("no pool named 'x'".into());
    r.replicas = vec![ghost];
    s.sync(&r, 0);
    let list: Vec<Volume> = s.get_ok("/v1/volumes");
    assert!(list.is_empty(), "{list:?}");
}

#[test]
fn failed_steps_retry_with_backoff_and_resume_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let d = s.sync(&report("n1", 0), 0);
    let v = create(&s, "flaky", GIB);
    let created_rev = s.sync(&report("n1", d.revision), 0).revision;
    // The agent applied the create and failed.
    let failing = |applied: u64| {
        let mut r = report("n1", applied);
        let mut rep = replica("flaky", &v.uuid, GIB, DiskState::Failed);
        rep.on_disk = false;
        rep.last_error = Some("creating flaky.data: Read-only file system".into());
        r.replicas = vec![rep];
        r
    };
    s.sync(&failing(created_rev), 0);
    let v1: Volume = s.get_ok("/v1/volumes/flaky");
    let op = &v1.operations[0];
    assert_eq!(op.state, "retrying", "{op:?}");
    assert_eq!(op.attempts, 1);
    assert_eq!(op.retry_history.len(), 1);
    assert!(op.next_retry_unix.is_some());
    assert_eq!(
        op.last_error.as_deref(),
        Some("creating flaky.data: Read-only file system")
    );
    assert_eq!(op.steps[1].state, "failed");

    // The controller starts attempt 2 by itself: the node's desired revision moves.
    let mut rev2 = 0;
    wait_for("attempt 2", || {
        let v: Volume = s.get_ok("/v1/volumes/flaky");
        rev2 = s.sync(&report("n1", created_rev), 0).revision;
        v.operations[0].attempts == 2 && v.operations[0].state == "running"
    });
    assert!(rev2 > created_rev);
    s.sync(&failing(rev2), 0);
    let v2: Volume = s.get_ok("/v1/volumes/flaky");
    assert_eq!(v2.operations[0].state, "retrying");
    assert_eq!(v2.operations[0].retry_history.len(), 2);
    let wait1 =
        v1.operations[0].next_retry_unix.unwrap() - v1.operations[0].retry_history[0].failed_unix;
    let wait2 =
        v2.operations[0].next_retry_unix.unwrap() - v2.operations[0].retry_history[1].failed_unix;
    assert!(wait2 > wait1, "backoff grows: {wait1}s then {wait2}s");

    // Controller restart in the middle: the operation is persisted and resumes.
    s.stop();
    let s = Server::start(dir.path());
    let v3: Volume = s.get_ok("/v1/volumes/flaky");
    assert_eq!(v3.operations, v2.operations);
    wait_for("attempt 3 after the restart", || {
        let v: Volume = s.get_ok("/v1/volumes/flaky");
        v.operations[0].attempts == 3
    });
    // This attempt succeeds.
    let rev3 = s.sync(&report("n1", rev2), 0).revision;
    let mut ok = report("n1", rev3);
    ok.replicas = vec![replica("flaky", &v.uuid, GIB, DiskState::UpToDate)];
    s.sync(&ok, 0);
    let done: Volume = s.get_ok("/v1/volumes/flaky");
    assert_eq!(done.state, VolumeState::Ready);
    let op = &done.operations[0];
    assert_eq!(
        (op.state.as_str(), op.progress, op.attempts),
        ("done", 1.0, 3)
    );
    assert_eq!(op.last_error, None);
    assert_eq!(op.next_retry_unix, None);
    assert_eq!(
        op.retry_history.len(),
        2,
        "the history of failed attempts stays"
    );
}

#[test]
fn delete_is_an_operation_with_steps() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let r = populated(&s, &["d"]);
    let (status, v) = s.delete("/v1/volumes/d");
    assert_eq!(status, 202, "{v}");
    let v: Volume = serde_json::from_value(v).unwrap();
    let op = v.operations.last().unwrap();
    assert_eq!((op.kind.as_str(), op.state.as_str()), ("delete", "running"));
    assert_eq!(op.steps.len(), 3);
    assert!(op.progress > 0.0 && op.progress < 1.0);
    // The agent refuses (a consumer is connected) after applying the delete.
    let rev = s.sync(&r, 0).revision;
    let mut busy = r.clone();
    busy.applied_revision = rev;
    busy.replicas[0].last_error =
        Some("delete refused: 1 NBD connection(s) to 'd' are open".into());
    s.sync(&busy, 0);
    let v: Volume = s.get_ok("/v1/volumes/d");
    let op = v.operations.last().unwrap();
    assert_eq!(op.state, "retrying");
    assert!(op.last_error.as_deref().unwrap().contains("delete refused"));
    // Gone on the agent: the volume disappears.
    let mut gone = busy.clone();
    gone.replicas.clear();
    wait_for("volume gone", || {
        gone.applied_revision = s.sync(&report("n1", 0), 0).revision;
        s.sync(&gone, 0);
        s.get("/v1/volumes/d").0 == 404
    });
}

#[test]
fn files_in_the_way_fail_the_create_step_and_show_as_an_issue() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let d = s.sync(&report("n1", 0), 0);
    let _v = create(&s, "o", GIB);
    let rev = s.sync(&report("n1", d.revision), 0).revision;
    let mut r = report("n1", rev);
    let mut orphan = replica("o", "", GIB, DiskState::Failed);
    orphan.last_error = Some("o.data exists without metadata; refusing to overwrite it".into());
    r.replicas = vec![orphan];
    s.sync(&r, 0);
    let v: Volume = s.get_ok("/v1/volumes/o");
    let op = &v.operations[0];
    assert_eq!(op.state, "retrying", "{op:?}");
    assert!(
        op.last_error
            .as_deref()
            .unwrap()
            .contains("without metadata")
    );
    let rep: ReconcileReport = s.get_ok("/v1/reconcile");
    assert_eq!(rep.issues.len(), 1, "{rep:?}");
    assert_eq!(rep.issues[0].code, "uuid_mismatch");
}

//! `POST /v1/volumes/{name}/resize`: validation, refusals with their codes, the `resize`
//! operation and its steps advanced by agent reports, and a second resize superseding the first.

mod common;

use common::*;
use serde_json::json;
use tandem_api::{DiskState, Volume};

const MIB: u64 = 1 << 20;

#[test]
fn resize_validates_records_and_converges_from_reports() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(dir.path());
    let mut r = report("n1", 0);
    let d = s.sync(&r, 0);
    r.applied_revision = d.revision;
    let (code, v) = s.post(
        "/v1/volumes",
        &json!({"name": "vol", "size_bytes": 64 * MIB}),
    );
    assert_eq!(code, 201, "{v}");
    let v: Volume = serde_json::from_value(v).unwrap();
    let d = s.sync(&r, 0);
    r.applied_revision = d.revision;
    r.replicas = vec![replica("vol", &v.uuid, 64 * MIB, DiskState::UpToDate)];
    s.sync(&r, 0);

    // Refusals.
    let (code, e) = s.post(
        "/v1/volumes/vol/resize",
        &json!({"size_bytes": 64 * MIB + 1}),
    );
    assert_api_error(code, &e, 400, "invalid_size");
    let (code, e) = s.post("/v1/volumes/vol/resize", &json!({"size_bytes": 32 * MIB}));
    assert_api_error(code, &e, 409, "shrink_refused");
    let (code, e) = s.post("/v1/volumes/vol/resize", &json!({"size_bytes": 200 * GIB}));
    assert_api_error(code, &e, 409, "no_capacity");
    // 50 GiB free: 40 GiB fits, 60 GiB does not (capacity is 100 GiB).
    let (code, e) = s.post("/v1/volumes/vol/resize", &json!({"size_bytes": 60 * GIB}));
    assert_api_error(code, &e, 409, "no_capacity");
    let (code, e) = s.post(
        "/v1/volumes/vol/resize",
        &json!({"size_bytes": 128 * MIB, "extra": 1}),
    );
    assert_eq!(code, 422, "{e}");
    let (code, e) = s.post("/v1/volumes/nope/resize", &json!({"size_bytes": 128 * MIB}));
    assert_eq!(code, 404, "{e}");
    // Same size: success, no operation.
    let (code, v) = s.post("/v1/volumes/vol/resize", &json!({"size_bytes": 64 * MIB}));
    assert_eq!(code, 200, "{v}");
    let v: Volume = serde_json::from_value(v).unwrap();
    assert!(v.operations.iter().all(|o| o.kind != "resize"));

    // Grow: recorded, desired state carries the new size.
    let (code, v) = s.post("/v1/volumes/vol/resize", &json!({"size_bytes": 128 * MIB}));
    assert_eq!(code, 200, "{v}");
    let v: Volume = serde_json::from_value(v).unwrap();
    assert_eq!(v.size_bytes, 128 * MIB);
    let op = v.operations.iter().find(|o| o.kind == "resize").unwrap();
    assert_eq!(op.state, "running");
    assert_eq!(op.steps.len(), 3, "{op:?}");
    assert!(op.steps[1].name.starts_with("grow backing store on n1"));
    assert!(op.steps[2].name.starts_with("volume size on n1"));
    let d = s.sync(&r, 0);
    assert_eq!(d.replicas[0].size_bytes, 128 * MIB);
    r.applied_revision = d.revision;

    // A second, larger resize while the first runs supersedes it.
    let (code, v) = s.post("/v1/volumes/vol/resize", &json!({"size_bytes": 192 * MIB}));
    assert_eq!(code, 200, "{v}");
    let v: Volume = serde_json::from_value(v).unwrap();
    let resizes: Vec<_> = v.operations.iter().filter(|o| o.kind == "resize").collect();
    assert_eq!(resizes.len(), 2);
    assert_eq!(resizes[0].state, "superseded");
    assert_eq!(resizes[1].state, "running");
    let d = s.sync(&r, 0);
    assert_eq!(d.replicas[0].size_bytes, 192 * MIB);
    r.applied_revision = d.revision;

    // The agent reports an error: the step fails and a retry is scheduled.
    r.replicas[0].last_error = Some("resize to 192 MiB: disk full".into());
    s.sync(&r, 0);
    let v: Volume = s.get_ok("/v1/volumes/vol");
    let op = v
        .operations
        .iter()
        .rev()
        .find(|o| o.kind == "resize")
        .unwrap();
    assert_eq!(op.state, "retrying", "{op:?}");
    assert_eq!(op.retry_history.len(), 1);

    // Backing store grown, export not yet: one step done.
    r.replicas[0].last_error = None;
    r.replicas[0].size_bytes = 192 * MIB;
    r.replicas[0].export_size_bytes = Some(128 * MIB);
    s.sync(&r, 0);
    let v: Volume = s.get_ok("/v1/volumes/vol");
    let op = v
        .operations
        .iter()
        .rev()
        .find(|o| o.kind == "resize")
        .unwrap();
    assert_eq!(op.steps[1].state, "done");
    assert_ne!(op.steps[2].state, "done");
    assert_eq!(v.replicas[0].size_bytes, 192 * MIB);
    assert_eq!(v.replicas[0].export_size_bytes, Some(128 * MIB));
    // Export follows: done.
    r.replicas[0].export_size_bytes = Some(192 * MIB);
    s.sync(&r, 0);
    let v: Volume = s.get_ok("/v1/volumes/vol");
    let op = v
        .operations
        .iter()
        .rev()
        .find(|o| o.kind == "resize")
        .unwrap();
    assert_eq!((op.state.as_str(), op.progress), ("done", 1.0), "{op:?}");
    let (code, issues) = s.get("/v1/reconcile");
    assert_eq!(code, 200);
    assert!(!issues.to_string().contains("size_mismatch"), "{issues}");

    // Shrink with allow_shrink is recorded.
    let (code, v) = s.post(
        "/v1/volumes/vol/resize",
        &json!({"size_bytes": 96 * MIB, "allow_shrink": true}),
    );
    assert_eq!(code, 200, "{v}");
    let v: Volume = serde_json::from_value(v).unwrap();
    assert_eq!(v.size_bytes, 96 * MIB);
    let op = v
        .operations
        .iter()
        .rev()
        .find(|o| o.kind == "resize")
        .unwrap();
    assert!(
        op.steps[1].name.starts_with("shrink backing store"),
        "{op:?}"
    );

    // Deleting: refused.
    let (code, _) = s.delete("/v1/volumes/vol");
    assert_eq!(code, 202);
    let (code, e) = s.post("/v1/volumes/vol/resize", &json!({"size_bytes": 256 * MIB}));
    assert_api_error(code, &e, 409, "not_ready");
}

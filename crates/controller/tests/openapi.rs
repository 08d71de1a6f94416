//! The committed OpenAPI document must match the one generated from the code.
//! Regenerate with: `UPDATE_OPENAPI=1 cargo test -p tandem-controller openapi`

use std::path::PathBuf;

#[test]
fn openapi_document_is_committed_and_current() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let generated = tandem_controller::openapi_json();
    let doc: serde_json::Value = serde_json::from_str(&generated).expect("valid JSON");
    for p in [
        "/v1/health",
        "/v1/volumes",
        "/v1/volumes/{name}",
        "/v1/agents/{node}/sync",
    ] {
        assert!(doc["paths"].get(p).is_some(), "missing path {p}");
    }
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).expect("write docs/openapi.json");
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "docs/openapi.json is out of date with the code (or missing). Regenerate it with:\n\
         \n    UPDATE_OPENAPI=1 cargo test -p tandem-controller openapi\n\nand commit the result."
    );
}

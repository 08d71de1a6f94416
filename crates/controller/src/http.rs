//! The REST API: routes, extractors that turn every rejection into an [`ApiError`] body, and
//! the OpenAPI document.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tandem_api::{
    AgentReport, ApiError, ClusterStatus, ConnectInfo, DesiredState, Node, NodeAdd, NodeLostResult,
    Pool, ReconcileReport, ReplicaAdd, RoleChange, StateDocument, StateImportResult, Volume,
    VolumeCreate, VolumeMove, VolumeResize, VolumeUpdate,
};
use tokio::sync::watch;
use utoipa::{IntoParams, OpenApi, ToSchema};

use crate::error::Failure;
use crate::state::{Controller, join_failure};

/// Longest a sync request is held (long poll).
pub const MAX_WAIT_MS: u64 = 30_000;

#[derive(Clone)]
pub struct AppState {
    pub ctl: Arc<Controller>,
    /// Becomes true when the server shuts down; ends held long polls.
    pub stopping: watch::Receiver<bool>,
}

/// Runs `f` on the blocking pool (the state store may fsync).
async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Controller) -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    let ctl = Arc::clone(&state.ctl);
    tokio::task::spawn_blocking(move || f(&ctl))
        .await
        .map_err(join_failure)?
}

// ----- extractors ------------------------------------------------------------------------

/// A JSON body. Unlike `axum::Json`, every failure is an [`ApiError`]; a request without a
/// content type is read as JSON (curl's `-d` sends a form type: that one is refused).
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = Failure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
            let essence = ct.split(';').next().unwrap_or("").trim();
            if !(essence == "application/json" || essence.ends_with("+json")) {
                return Err(Failure::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported_media_type",
                    format!("the body must be JSON (content-type application/json), not '{ct}'"),
                ));
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            Failure::new(
                e.status(),
                "bad_request",
                format!("cannot read the body: {}", e.body_text()),
            )
        })?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(Failure::bad_request(
                "missing_body",
                "the request needs a JSON body",
            ));
        }
        serde_json::from_slice(&bytes).map(ApiJson).map_err(|e| {
            use serde_json::error::Category;
            match e.classify() {
                Category::Data => Failure::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_body",
                    format!("the JSON body does not match the expected object: {e}"),
                ),
                Category::Syntax | Category::Eof | Category::Io => {
                    Failure::bad_request("invalid_json", format!("the body is not valid JSON: {e}"))
                }
            }
        })
    }
}

/// Query parameters, with failures as [`ApiError`].
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|q| ApiQuery(q.0))
            .map_err(|e| {
                Failure::bad_request(
                    "bad_request",
                    format!("bad query string: {}", e.body_text()),
                )
            })
    }
}

/// Path parameters, with failures as [`ApiError`].
pub struct ApiPath<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for ApiPath<T> {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| {
                Failure::bad_request("bad_request", format!("bad path: {}", e.body_text()))
            })
    }
}

// ----- handlers ------------------------------------------------------------------------------

/// `GET /v1/health`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    /// Always `ok` when the controller answers.
    pub status: String,
}

#[utoipa::path(get, path = "/v1/health", tag = "cluster",
    responses((status = 200, description = "The controller is up", body = Health)))]
async fn health() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".into(),
    })
}

#[utoipa::path(get, path = "/openapi.json", tag = "cluster",
    responses((status = 200, description = "This OpenAPI document", content_type = "application/json")))]
async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi_json(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/v1/status", tag = "cluster",
    responses((status = 200, description = "Everything at a glance", body = ClusterStatus),
              (status = 500, description = "State store failure", body = ApiError)))]
async fn status(State(s): State<AppState>) -> Result<axum::Json<ClusterStatus>, Failure> {
    blocking(&s, |c| c.status()).await.map(axum::Json)
}

#[utoipa::path(get, path = "/v1/nodes", tag = "nodes",
    responses((status = 200, description = "Registered nodes", body = [Node])))]
async fn nodes(State(s): State<AppState>) -> Result<axum::Json<Vec<Node>>, Failure> {
    blocking(&s, |c| c.nodes()).await.map(axum::Json)
}

#[utoipa::path(get, path = "/v1/pools", tag = "pools",
    responses((status = 200, description = "Storage pools reported by the agents", body = [Pool])))]
async fn pools(State(s): State<AppState>) -> Result<axum::Json<Vec<Pool>>, Failure> {
    blocking(&s, |c| c.pools()).await.map(axum::Json)
}

#[utoipa::path(get, path = "/v1/volumes", tag = "volumes",
    responses((status = 200, description = "Every volume", body = [Volume])))]
async fn list_volumes(State(s): State<AppState>) -> Result<axum::Json<Vec<Volume>>, Failure> {
    blocking(&s, |c| c.volumes()).await.map(axum::Json)
}

#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", request_body = VolumeCreate,
    responses(
        (status = 201, description = "Created; replicas are being created (state `creating`)", body = Volume),
        (status = 400, description = "Invalid name (`invalid_name`), size (`invalid_size`) or option (`unsupported`), or malformed JSON (`invalid_json`)", body = ApiError),
        (status = 404, description = "A requested node is not registered (`not_found`)", body = ApiError),
        (status = 409, description = "Exists (`already_exists`), no node (`no_nodes`) or pool (`no_capacity`) can take it, or `on_no_quorum` `suspend` for a single replica (`not_replicated`)", body = ApiError),
        (status = 422, description = "JSON of the wrong shape: unknown or missing fields, wrong types (`invalid_body`)", body = ApiError)))]
async fn create_volume(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<VolumeCreate>,
) -> Result<(StatusCode, axum::Json<Volume>), Failure> {
    let v = blocking(&s, move |c| c.create_volume(req)).await?;
    Ok((StatusCode::CREATED, axum::Json(v)))
}

#[utoipa::path(get, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    responses((status = 200, description = "The volume", body = Volume),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such volume", body = ApiError)))]
async fn show_volume(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<axum::Json<Volume>, Failure> {
    blocking(&s, move |c| c.volume(&name)).await.map(axum::Json)
}

/// Query of `DELETE /v1/volumes/{name}`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeleteQuery {
    /// Delete even while consumers are connected.
    #[serde(default)]
    pub force: bool,
}

#[utoipa::path(delete, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "Volume name"), DeleteQuery),
    responses((status = 202, description = "Deletion started (state `deleting`); the volume disappears once its agent removed the replica", body = Volume),
              (status = 400, description = "Invalid name or query", body = ApiError),
              (status = 404, description = "No such volume", body = ApiError),
              (status = 409, description = "Consumers are connected (`in_use`); use force", body = ApiError)))]
async fn delete_volume(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<DeleteQuery>,
) -> Result<(StatusCode, axum::Json<Volume>), Failure> {
    let v = blocking(&s, move |c| c.delete_volume(&name, q.force)).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(v)))
}

#[utoipa::path(post, path = "/v1/nodes", tag = "nodes", request_body = NodeAdd,
    responses((status = 200, description = "Declared (or already declared with the same values): offline until its agent syncs; that agent must report this address", body = Node),
              (status = 400, description = "Invalid name (`invalid_name`) or address (`invalid_address`)", body = ApiError),
              (status = 409, description = "The node exists with another address or role (`node_exists`), or no node id is free (`no_node_id`)", body = ApiError),
              (status = 422, description = "Malformed body", body = ApiError)))]
async fn node_add(
    State(s): State<AppState>,
    ApiJson(req): ApiJson<NodeAdd>,
) -> Result<axum::Json<Node>, Failure> {
    blocking(&s, move |c| c.node_add(&req))
        .await
        .map(axum::Json)
}

#[utoipa::path(delete, path = "/v1/nodes/{name}", tag = "nodes",
    params(("name" = String, Path, description = "Node name")),
    responses((status = 204, description = "The node is forgotten"),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such node", body = ApiError),
              (status = 409, description = "The node holds replicas or witnesses (`node_in_use`), or its agent still syncs (`node_online`: stop it first)", body = ApiError)))]
async fn node_remove(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, Failure> {
    blocking(&s, move |c| c.node_remove(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/nodes/{name}/lost", tag = "nodes",
    params(("name" = String, Path, description = "Node name")),
    responses((status = 200, description = "The node is forgotten; every affected volume gets its replica count back elsewhere", body = NodeLostResult),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such node", body = ApiError),
              (status = 409, description = "The node is online (`node_online`)", body = ApiError)))]
async fn node_lost(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<axum::Json<NodeLostResult>, Failure> {
    blocking(&s, move |c| c.node_lost(&name))
        .await
        .map(axum::Json)
}

#[utoipa::path(post, path = "/v1/nodes/{name}/evacuate", tag = "nodes",
    params(("name" = String, Path, description = "Node name")),
    responses((status = 200, description = "Every volume that can move got a new replica (or witness) elsewhere; the old one goes once the new one is in sync. Volumes that cannot move are listed with the reason", body = NodeLostResult),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such node", body = ApiError)))]
async fn node_evacuate(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<axum::Json<NodeLostResult>, Failure> {
    blocking(&s, move |c| c.node_evacuate(&name))
        .await
        .map(axum::Json)
}

#[utoipa::path(patch, path = "/v1/volumes/{name}", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    request_body = VolumeUpdate,
    responses((status = 200, description = "Options changed (the agents apply them at once)", body = Volume),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such volume", body = ApiError),
              (status = 409, description = "The volume is being deleted (`not_ready`), or the dual-primary window cannot open (`not_replicated`: one replica; `protocol_a`: it needs protocol C) or close (`two_primaries`: two nodes are Primary, demote one first), or `on_no_quorum` `suspend` on a single-replica volume (`not_replicated`)", body = ApiError),
              (status = 422, description = "Malformed body", body = ApiError)))]
async fn update_volume(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<VolumeUpdate>,
) -> Result<axum::Json<Volume>, Failure> {
    blocking(&s, move |c| c.update_volume(&name, &req))
        .await
        .map(axum::Json)
}

#[utoipa::path(post, path = "/v1/volumes/{name}/resize", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    request_body = VolumeResize,
    responses((status = 200, description = "Recorded (a `resize` operation; the same size again changes nothing): done when every replica reports `size_bytes` equal to the new size", body = Volume),
              (status = 400, description = "Invalid name or size (`invalid_size`)", body = ApiError),
              (status = 404, description = "No such volume", body = ApiError),
              (status = 409, description = "Refused: `shrink_refused` (smaller without allow_shrink), `no_capacity` (a replica's pool cannot hold the growth), `not_ready` (being deleted)", body = ApiError),
              (status = 422, description = "Malformed body", body = ApiError)))]
async fn resize_volume(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<VolumeResize>,
) -> Result<axum::Json<Volume>, Failure> {
    blocking(&s, move |c| c.resize_volume(&name, &req))
        .await
        .map(axum::Json)
}

#[utoipa::path(post, path = "/v1/volumes/{name}/move", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    request_body = VolumeMove,
    responses((status = 200, description = "Recorded as a `move` operation: a new replica (or witness) on the target, resynced fully, the Primary moved to a replica that stays when it was on the source, then the source's copy removed", body = Volume),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such volume, node or pool", body = ApiError),
              (status = 409, description = "Refused: `no_replica` (nothing on the source), `already_placed` (the target holds it), `same_node`, `witness_node` (a witness node cannot hold data), `node_offline`, `no_capacity`, `busy` (a move or node replacement runs), `not_ready` (e.g. the Primary is on the source and no other replica is UpToDate)", body = ApiError),
              (status = 422, description = "Malformed body", body = ApiError)))]
async fn move_volume(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<VolumeMove>,
) -> Result<axum::Json<Volume>, Failure> {
    blocking(&s, move |c| c.volume_move(&name, &req))
        .await
        .map(axum::Json)
}

#[utoipa::path(post, path = "/v1/volumes/{name}/replicas", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    request_body = ReplicaAdd,
    responses((status = 200, description = "Recorded as an `add-replica` operation: a new replica joins with a full resync; the witness is added or dropped so that the voters stay odd (a witness on the chosen node becomes the replica)", body = Volume),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such volume, node or pool", body = ApiError),
              (status = 409, description = "Refused: `already_placed`, `witness_node`, `node_offline`, `no_capacity`, `too_many` (the volume has the most replicas supported), `no_nodes` (no node for the replica or a needed witness), `busy` (a membership operation runs), `in_use` (consumers are connected to a single replica, whose export the change switches)", body = ApiError),
              (status = 422, description = "Malformed body", body = ApiError)))]
async fn add_replica(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<ReplicaAdd>,
) -> Result<axum::Json<Volume>, Failure> {
    blocking(&s, move |c| c.add_replica(&name, &req))
        .await
        .map(axum::Json)
}

#[utoipa::path(delete, path = "/v1/volumes/{name}/replicas/{node}", tag = "volumes",
    params(("name" = String, Path, description = "Volume name"), ("node" = String, Path, description = "The node whose replica goes")),
    responses((status = 200, description = "Recorded as a `remove-replica` operation: the replica leaves the volume and its node deletes it; the witness is added (possibly on that node) or dropped so that the voters stay odd", body = Volume),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such volume", body = ApiError),
              (status = 409, description = "Refused: `no_replica`, `is_witness`, `last_replica`, `is_primary` (promote another replica first), `last_up_to_date` (no other replica is UpToDate), `busy`, `in_use` (consumers are connected to the replica left alone, whose export the change switches)", body = ApiError)))]
async fn remove_replica(
    State(s): State<AppState>,
    ApiPath((name, node)): ApiPath<(String, String)>,
) -> Result<axum::Json<Volume>, Failure> {
    blocking(&s, move |c| c.remove_replica(&name, &node))
        .await
        .map(axum::Json)
}

#[utoipa::path(post, path = "/v1/volumes/{name}/abort", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    responses((status = 200, description = "The running move or evacuation was stopped and undone (state `aborted`): the new member dropped and deleted by its node, the old placement kept", body = Volume),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such volume", body = ApiError),
              (status = 409, description = "`no_operation` (nothing running), `not_abortable` (node replacement, resize, create, delete, verify), `too_late` (the old copy already left the volume)", body = ApiError)))]
async fn abort_volume(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<axum::Json<Volume>, Failure> {
    blocking(&s, move |c| c.abort_operation(&name))
        .await
        .map(axum::Json)
}

#[utoipa::path(post, path = "/v1/volumes/{name}/promote", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    request_body = RoleChange,
    responses((status = 200, description = "Recorded: the node becomes Primary (watch its replica's `role`); with the dual-primary window open and another node Primary, the second Primary (`second_primary_node`)", body = Volume),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such volume or node", body = ApiError),
              (status = 422, description = "Malformed body", body = ApiError),
              (status = 409, description = "Refused: `not_replicated`, `no_replica`, `no_data_peer` (a witness without a connected UpToDate diskful replica), `node_offline`, `not_ready`, `not_up_to_date`, `no_quorum`, `in_use`, `two_primaries` (the dual-primary window already has two Primaries), `window_open` (--force while the dual-primary window is open and another node is Primary: demote it first)", body = ApiError)))]
async fn promote_volume(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<RoleChange>,
) -> Result<axum::Json<Volume>, Failure> {
    blocking(&s, move |c| {
        c.set_primary(&name, &req.node, true, req.force)
    })
    .await
    .map(axum::Json)
}

#[utoipa::path(post, path = "/v1/volumes/{name}/demote", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    request_body = RoleChange,
    responses((status = 200, description = "Recorded: the node is not Primary (the volume then has none)", body = Volume),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such volume or node", body = ApiError),
              (status = 422, description = "Malformed body", body = ApiError),
              (status = 409, description = "Refused: `not_replicated`, `no_replica`, `in_use`", body = ApiError)))]
async fn demote_volume(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<RoleChange>,
) -> Result<axum::Json<Volume>, Failure> {
    blocking(&s, move |c| {
        c.set_primary(&name, &req.node, false, req.force)
    })
    .await
    .map(axum::Json)
}

#[utoipa::path(post, path = "/v1/volumes/{name}/verify", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    request_body = tandem_api::VerifyRequest,
    responses((status = 202, description = "Started: the `verify` operation (follow it in the volume's `operations`; the result becomes its `last_verify`)", body = tandem_api::Operation),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such volume", body = ApiError),
              (status = 422, description = "Malformed body", body = ApiError),
              (status = 409, description = "Refused: `not_replicated` (one diskful replica), `verify_running`, `not_ready` (no replica online and UpToDate)", body = ApiError)))]
async fn verify_volume(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<tandem_api::VerifyRequest>,
) -> Result<(StatusCode, axum::Json<tandem_api::Operation>), Failure> {
    let op = blocking(&s, move |c| c.start_verify(&name, &req)).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(op)))
}

#[utoipa::path(post, path = "/v1/volumes/{name}/resolve-split-brain", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    request_body = tandem_api::ResolveSplitBrain,
    responses((status = 200, description = "Started: the node's changes since the split are discarded, it resyncs from the others (a `resolve-split-brain` operation follows it)", body = Volume),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such volume", body = ApiError),
              (status = 422, description = "Malformed body", body = ApiError),
              (status = 409, description = "Refused: `no_replica`, `no_split_brain`, `only_up_to_date` (discarding would drop the only UpToDate data)", body = ApiError)))]
async fn resolve_split_brain(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(req): ApiJson<tandem_api::ResolveSplitBrain>,
) -> Result<axum::Json<Volume>, Failure> {
    blocking(&s, move |c| c.resolve_split_brain(&name, &req))
        .await
        .map(axum::Json)
}

/// Query of `GET /v1/volumes/{name}/connect`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ConnectQuery {
    /// Node to connect through (default: the Primary, i.e. the first diskful replica).
    #[serde(default)]
    pub node: Option<String>,
}

#[utoipa::path(get, path = "/v1/volumes/{name}/connect", tag = "volumes",
    params(("name" = String, Path, description = "Volume name"), ConnectQuery),
    responses((status = 200, description = "NBD URIs of the volume's export", body = ConnectInfo),
              (status = 400, description = "Invalid name or query", body = ApiError),
              (status = 404, description = "No such volume or node", body = ApiError),
              (status = 409, description = "The replica is not reported yet (`not_ready`) or not on that node (`no_replica`)", body = ApiError)))]
async fn connect(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiQuery(q): ApiQuery<ConnectQuery>,
) -> Result<axum::Json<ConnectInfo>, Failure> {
    blocking(&s, move |c| c.connect(&name, q.node.as_deref()))
        .await
        .map(axum::Json)
}

#[utoipa::path(get, path = "/v1/reconcile", tag = "cluster",
    responses((status = 200, description = "What the controller could not reconcile with the agents' reports", body = ReconcileReport)))]
async fn reconcile(State(s): State<AppState>) -> axum::Json<ReconcileReport> {
    axum::Json(s.ctl.reconcile_report())
}

#[utoipa::path(get, path = "/v1/state", tag = "state",
    responses((status = 200, description = "The whole desired state as a versioned document", body = StateDocument),
              (status = 500, description = "State store failure", body = ApiError)))]
async fn export_state(State(s): State<AppState>) -> Result<axum::Json<StateDocument>, Failure> {
    blocking(&s, |c| c.export_state()).await.map(axum::Json)
}

/// Query of `POST /v1/state`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ImportQuery {
    /// Drop every node and volume record of the store first (agents keep their replicas).
    #[serde(default)]
    pub replace: bool,
}

/// Largest state document accepted.
pub const MAX_STATE_BYTES: usize = 64 << 20;

#[utoipa::path(post, path = "/v1/state", tag = "state", request_body = StateDocument,
    params(ImportQuery),
    responses((status = 200, description = "Imported", body = StateImportResult),
              (status = 400, description = "Unsupported `format_version` (`unsupported_format_version`), invalid content (`invalid_state`, `invalid_json`)", body = ApiError),
              (status = 409, description = "The store is not empty and conflicts with the document (`import_conflict`); use replace", body = ApiError),
              (status = 422, description = "JSON of the wrong shape: unknown or missing fields (`invalid_body`)", body = ApiError)))]
async fn import_state(
    State(s): State<AppState>,
    ApiQuery(q): ApiQuery<ImportQuery>,
    ApiJson(doc): ApiJson<StateDocument>,
) -> Result<axum::Json<StateImportResult>, Failure> {
    blocking(&s, move |c| c.import_state(&doc, q.replace))
        .await
        .map(axum::Json)
}

#[utoipa::path(post, path = "/v1/agents/{node}/leave", tag = "agents",
    params(("node" = String, Path, description = "Node name")),
    responses((status = 204, description = "The node shows offline until its agent syncs again"),
              (status = 400, description = "Invalid node name", body = ApiError)))]
/// An agent that stops in an orderly way says so last: its node shows offline at once
/// instead of after `offline_after_secs` without contact.
async fn agent_leave(
    State(s): State<AppState>,
    ApiPath(node): ApiPath<String>,
) -> Result<StatusCode, Failure> {
    tandem_types::validate_name("node", &node)?;
    s.ctl.leave(&node);
    tracing::info!(node = %node, "agent stopped (it said so): node offline");
    Ok(StatusCode::NO_CONTENT)
}

/// Query of `POST /v1/agents/{node}/sync`.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SyncQuery {
    /// Hold the answer up to this long (milliseconds, at most 30000) while the desired
    /// revision equals the report's `applied_revision`.
    #[serde(default)]
    pub wait_ms: u64,
}

#[utoipa::path(post, path = "/v1/agents/{node}/sync", tag = "agents", request_body = AgentReport,
    params(("node" = String, Path, description = "Node name (must equal the report's `node`)"), SyncQuery),
    responses((status = 200, description = "The node's desired state", body = DesiredState),
              (status = 400, description = "Invalid names or a report for another node", body = ApiError),
              (status = 422, description = "JSON of the wrong shape", body = ApiError)))]
async fn agent_sync(
    State(s): State<AppState>,
    ApiPath(node): ApiPath<String>,
    ApiQuery(q): ApiQuery<SyncQuery>,
    ApiJson(report): ApiJson<AgentReport>,
) -> Result<axum::Json<DesiredState>, Failure> {
    tandem_types::validate_name("node", &node)?;
    // Subscribe before computing, so a change between the answer and the wait is not missed.
    let mut changes = s.ctl.subscribe();
    let _contact = s.ctl.contact(&node);
    let applied = report.applied_revision;
    let desired = {
        let n = node.clone();
        match blocking(&s, move |c| c.agent_sync(&n, &report)).await {
            Ok(d) => d,
            Err(e) => {
                if e.code == "address_mismatch" {
                    // Not the declared node: it must not look online.
                    drop(_contact);
                    s.ctl.forget_contact(&node);
                }
                return Err(e);
            }
        }
    };
    let wait = Duration::from_millis(q.wait_ms.min(MAX_WAIT_MS));
    if desired.revision != applied || wait.is_zero() {
        return Ok(axum::Json(desired));
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut stopping = s.stopping.clone();
    loop {
        if *stopping.borrow_and_update() {
            break;
        }
        tokio::select! {
            r = changes.changed() => { if r.is_err() { break; } }
            _ = stopping.changed() => break,
            _ = tokio::time::sleep_until(deadline) => break,
        }
        let n = node.clone();
        if blocking(&s, move |c| c.node_desired_revision(&n)).await? != applied {
            break;
        }
    }
    blocking(&s, move |c| c.desired_state(&node))
        .await
        .map(axum::Json)
}

async fn not_found(req: Request) -> Failure {
    Failure::not_found(format!(
        "no such endpoint: {} {} (the API lives under /v1; see /openapi.json)",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request) -> Failure {
    Failure::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/openapi.json", get(openapi))
        .route("/v1/status", get(status))
        .route("/v1/nodes", get(nodes).post(node_add))
        .route("/v1/nodes/{name}", axum::routing::delete(node_remove))
        .route("/v1/nodes/{name}/lost", post(node_lost))
        .route("/v1/nodes/{name}/evacuate", post(node_evacuate))
        .route("/v1/pools", get(pools))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route(
            "/v1/volumes/{name}",
            get(show_volume).delete(delete_volume).patch(update_volume),
        )
        .route("/v1/volumes/{name}/connect", get(connect))
        .route(
            "/v1/volumes/{name}/grow",
            get(crate::grow::get_grow)
                .put(crate::grow::put_grow)
                .delete(crate::grow::delete_grow),
        )
        .route("/v1/volumes/{name}/promote", post(promote_volume))
        .route("/v1/volumes/{name}/resize", post(resize_volume))
        .route("/v1/volumes/{name}/move", post(move_volume))
        .route("/v1/volumes/{name}/abort", post(abort_volume))
        .route("/v1/volumes/{name}/replicas", post(add_replica))
        .route(
            "/v1/volumes/{name}/replicas/{node}",
            axum::routing::delete(remove_replica),
        )
        .route("/v1/volumes/{name}/demote", post(demote_volume))
        .route("/v1/volumes/{name}/verify", post(verify_volume))
        .route(
            "/v1/volumes/{name}/resolve-split-brain",
            post(resolve_split_brain),
        )
        .route("/v1/agents/{node}/sync", post(agent_sync))
        .route("/v1/agents/{node}/leave", post(agent_leave))
        .route("/v1/reconcile", get(reconcile))
        .route(
            "/v1/state",
            get(export_state)
                .post(import_state)
                .layer(axum::extract::DefaultBodyLimit::max(MAX_STATE_BYTES)),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tandem controller",
        description = "REST API of the tandem controller. Every error is an ApiError body with a stable `code`.",
        license(name = "Apache-2.0")
    ),
    paths(crate::grow::get_grow, crate::grow::put_grow, crate::grow::delete_grow,
          health, openapi, status, nodes, node_add, node_remove, node_lost, node_evacuate, pools, list_volumes, create_volume, show_volume,
          delete_volume, update_volume, resize_volume, move_volume, abort_volume, add_replica, remove_replica, connect, promote_volume, demote_volume, verify_volume, resolve_split_brain, agent_sync, agent_leave, reconcile, export_state, import_state),
    components(schemas(ApiError, Health)),
    tags(
        (name = "cluster", description = "Health and cluster status"),
        (name = "nodes", description = "Hosts running an agent"),
        (name = "pools", description = "Storage pools on the nodes"),
        (name = "volumes", description = "Volumes and their replicas"),
        (name = "agents", description = "Agent synchronisation (used by agents, not people)"),
        (name = "state", description = "Export and import of the whole desired state")
    )
)]
pub struct ApiDoc;

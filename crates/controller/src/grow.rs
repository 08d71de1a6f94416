//! The grow journal of `tandem volume grow` (see `docs/grow.md`): one JSON record per volume
//! under `grow/<volume>`, written by the CLI before it touches the partition table, read back
//! to resume or undo an interrupted grow, deleted when the grow finished or was undone. The
//! controller only stores it; the CLI drives every step.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use tandem_api::{ApiError, GrowJournal};
use tandem_store::Expect;
use tandem_types::validate_name;

use crate::error::Failure;
use crate::http::{ApiJson, ApiPath, AppState};
use crate::state::{Controller, decode, encode, join_failure};

/// Store prefix of grow journals.
pub(crate) const GROWS: &str = "grow/";

impl Controller {
    /// The journal of a grow of `name` in progress. `not_found` when the volume does not
    /// exist, `no_grow` when no grow is recorded (a journal of an older volume of the same
    /// name counts as none).
    pub fn grow_journal(&self, name: &str) -> Result<GrowJournal, Failure> {
        let v = self.volume(name)?;
        let key = format!("{GROWS}{name}");
        let none = || {
            Failure::new(
                StatusCode::NOT_FOUND,
                "no_grow",
                format!("volume '{name}' has no grow in progress"),
            )
        };
        let (_, value) = self.store.get(&key)?.ok_or_else(none)?;
        let j: GrowJournal = decode(&key, &value)?;
        if j.volume_uuid != v.uuid {
            return Err(none());
        }
        Ok(j)
    }

    /// Records (replaces) the grow journal of `name`.
    pub fn put_grow_journal(&self, name: &str, j: &GrowJournal) -> Result<GrowJournal, Failure> {
        let v = self.volume(name)?;
        if j.volume != name {
            return Err(Failure::bad_request(
                "bad_request",
                format!("the journal names volume '{}', the path '{name}'", j.volume),
            ));
        }
        if j.volume_uuid != v.uuid {
            return Err(Failure::conflict(
                "uuid_mismatch",
                format!(
                    "the journal belongs to volume uuid {}, but '{name}' is now {}",
                    j.volume_uuid, v.uuid
                ),
            ));
        }
        let _guard = self.write_guard();
        self.store
            .put(&format!("{GROWS}{name}"), &encode(j)?, Expect::Any)?;
        Ok(j.clone())
    }

    /// Forgets the grow journal of `name` (no error when there is none).
    pub fn delete_grow_journal(&self, name: &str) -> Result<(), Failure> {
        validate_name("volume", name)?;
        let _guard = self.write_guard();
        self.store.delete(&format!("{GROWS}{name}"), Expect::Any)?;
        Ok(())
    }
}

async fn blocking<T: Send + 'static>(
    state: &AppState,
    f: impl FnOnce(&Controller) -> Result<T, Failure> + Send + 'static,
) -> Result<T, Failure> {
    let ctl = Arc::clone(&state.ctl);
    tokio::task::spawn_blocking(move || f(&ctl))
        .await
        .map_err(join_failure)?
}

#[utoipa::path(get, path = "/v1/volumes/{name}/grow", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    responses((status = 200, description = "The journal of the grow in progress", body = GrowJournal),
              (status = 400, description = "Invalid name", body = ApiError),
              (status = 404, description = "No such volume (`not_found`) or no grow in progress (`no_grow`)", body = ApiError)))]
pub(crate) async fn get_grow(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<axum::Json<GrowJournal>, Failure> {
    blocking(&s, move |c| c.grow_journal(&name))
        .await
        .map(axum::Json)
}

#[utoipa::path(put, path = "/v1/volumes/{name}/grow", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    request_body = GrowJournal,
    responses((status = 200, description = "Recorded", body = GrowJournal),
              (status = 400, description = "Invalid name, or the journal names another volume", body = ApiError),
              (status = 404, description = "No such volume", body = ApiError),
              (status = 409, description = "The journal belongs to another volume of that name (`uuid_mismatch`)", body = ApiError),
              (status = 422, description = "Malformed body", body = ApiError)))]
pub(crate) async fn put_grow(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
    ApiJson(j): ApiJson<GrowJournal>,
) -> Result<axum::Json<GrowJournal>, Failure> {
    blocking(&s, move |c| c.put_grow_journal(&name, &j))
        .await
        .map(axum::Json)
}

#[utoipa::path(delete, path = "/v1/volumes/{name}/grow", tag = "volumes",
    params(("name" = String, Path, description = "Volume name")),
    responses((status = 204, description = "Forgotten (also when there was none)"),
              (status = 400, description = "Invalid name", body = ApiError)))]
pub(crate) async fn delete_grow(
    State(s): State<AppState>,
    ApiPath(name): ApiPath<String>,
) -> Result<StatusCode, Failure> {
    blocking(&s, move |c| c.delete_grow_journal(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

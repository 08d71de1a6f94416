//! The error every handler returns: an HTTP status plus an [`ApiError`] body.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tandem_api::ApiError;
use tandem_store::StoreError;

/// An API failure: status + stable code + message. Rendered as an [`ApiError`] JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl Failure {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Failure {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
    pub fn body(&self) -> ApiError {
        ApiError {
            code: self.code.to_string(),
            message: self.message.clone(),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict { .. } => Failure::conflict(
                "conflict",
                format!("the state changed while this request was applied, retry it ({e})"),
            ),
            other => {
                tracing::error!(error = %other, "state store failure");
                Failure::internal(format!("state store failure: {other}"))
            }
        }
    }
}

impl From<tandem_types::NameError> for Failure {
    fn from(e: tandem_types::NameError) -> Self {
        Failure::bad_request("invalid_name", e.to_string())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code, message = %self.message, "request failed");
        } else {
            tracing::debug!(code = self.code, message = %self.message, "request refused");
        }
        (self.status, axum::Json(self.body())).into_response()
    }
}

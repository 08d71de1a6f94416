//! A small blocking client of the controller's REST API.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tandem_api::ApiError;

/// What can go wrong talking to the controller, phrased for the operator.
#[derive(Debug)]
pub enum ClientError {
    /// The controller answered with an error body.
    Api { status: u16, error: ApiError },
    /// The controller could not be reached or answered garbage.
    Transport(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Api { error, .. } => write!(f, "{} ({})", error.message, error.code),
            ClientError::Transport(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ClientError {}

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(60)))
            .build()
            .into();
        Client {
            base: base.trim_end_matches('/').to_string(),
            agent,
        }
    }

    fn transport(&self, e: ureq::Error) -> ClientError {
        ClientError::Transport(format!(
            "cannot reach the controller at {}: {e}. Is it running? (`tandem up` starts one; --controller or TANDEM_CONTROLLER points elsewhere)",
            self.base
        ))
    }

    fn decode<T: DeserializeOwned>(
        &self,
        mut resp: ureq::http::Response<ureq::Body>,
    ) -> Result<T, ClientError> {
        let status = resp.status().as_u16();
        let body = resp
            .body_mut()
            .read_to_string()
            .map_err(|e| ClientError::Transport(format!("reading the controller's answer: {e}")))?;
        if (200..300).contains(&status) {
            // An empty answer (204) decodes as JSON null, e.g. into `()`.
            let body = if body.trim().is_empty() {
                "null"
            } else {
                body.as_str()
            };
            serde_json::from_str(body).map_err(|e| {
                ClientError::Transport(format!(
                    "the controller at {} answered something unexpected ({e}): {body}",
                    self.base
                ))
            })
        } else {
            let error = serde_json::from_str::<ApiError>(&body).unwrap_or(ApiError {
                code: format!("http_{status}"),
                message: format!("the controller answered HTTP {status}: {}", body.trim()),
            });
            Err(ClientError::Api { status, error })
        }
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self
            .agent
            .get(format!("{}{path}", self.base))
            .call()
            .map_err(|e| self.transport(e))?;
        self.decode(resp)
    }

    pub fn patch<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let resp = self
            .agent
            .patch(format!("{}{path}", self.base))
            .send_json(body)
            .map_err(|e| self.transport(e))?;
        self.decode(resp)
    }

    pub fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let resp = self
            .agent
            .post(format!("{}{path}", self.base))
            .send_json(body)
            .map_err(|e| self.transport(e))?;
        self.decode(resp)
    }

    pub fn put<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let resp = self
            .agent
            .put(format!("{}{path}", self.base))
            .send_json(body)
            .map_err(|e| self.transport(e))?;
        self.decode(resp)
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let resp = self
            .agent
            .delete(format!("{}{path}", self.base))
            .call()
            .map_err(|e| self.transport(e))?;
        self.decode(resp)
    }

    /// True when the controller answers its health endpoint.
    pub fn healthy(&self) -> bool {
        self.get::<serde_json::Value>("/v1/health").is_ok()
    }
}

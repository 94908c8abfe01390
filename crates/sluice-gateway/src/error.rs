//! Errors as clients see them: OpenAI's `{"error": {message, type, param,
//! code}}` with the matching HTTP status.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;
use sluice_core::chat::InvalidRequest;
use sluice_providers::ProviderError;

/// An error answer in OpenAI's shape.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// OpenAI error type (`invalid_request_error`, `authentication_error`, ...).
    pub kind: &'static str,
    /// Human-readable message.
    pub message: String,
    /// Parameter at fault.
    pub param: Option<String>,
    /// Machine-readable code.
    pub code: Option<&'static str>,
    /// Seconds for `Retry-After`.
    pub retry_after: Option<u64>,
    /// What sluice records as the error kind.
    pub record_kind: &'static str,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
            record_kind: "invalid_request",
        }
    }

    /// 400: the request is malformed or a field is invalid.
    pub fn invalid(e: InvalidRequest) -> Self {
        ApiError {
            param: e.param,
            code: None,
            ..Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", e.message)
        }
    }

    /// 401: no key, or an unknown one.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("invalid_api_key"),
            record_kind: "unauthorized",
            ..Self::new(StatusCode::UNAUTHORIZED, "authentication_error", message)
        }
    }

    /// 403: authenticated, but not allowed to do this.
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError {
            code: Some("forbidden"),
            record_kind: "forbidden",
            ..Self::new(StatusCode::FORBIDDEN, "permission_error", message)
        }
    }

    /// 404: unknown deployment (or one this key may not use).
    pub fn model_not_found(model: &str) -> Self {
        ApiError {
            param: Some("model".into()),
            code: Some("model_not_found"),
            record_kind: "model_not_found",
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("The model `{model}` does not exist or you do not have access to it."),
            )
        }
    }

    /// 404 for an unknown route.
    pub fn route_not_found(method: &str, path: &str) -> Self {
        ApiError {
            code: Some("unknown_url"),
            record_kind: "not_found",
            ..Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                format!("Unrecognized request URL ({method} {path})."),
            )
        }
    }

    /// 405 for a known route with the wrong method.
    pub fn method_not_allowed() -> Self {
        ApiError {
            code: Some("method_not_allowed"),
            ..Self::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "Method not allowed for this URL.",
            )
        }
    }

    /// 413: body over `max_body_bytes`.
    pub fn too_large(limit: usize) -> Self {
        ApiError {
            code: Some("request_too_large"),
            record_kind: "request_too_large",
            ..Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                format!("Request body is larger than the configured limit of {limit} bytes (max_body_bytes)."),
            )
        }
    }

    /// 503: the request's handler was cut because the server is stopping
    /// and its grace period ran out.
    pub fn shutting_down() -> Self {
        ApiError {
            code: Some("server_shutting_down"),
            retry_after: Some(1),
            record_kind: "shutting_down",
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                "sluice is stopping and could not finish this request within its shutdown grace period; retry on another instance.",
            )
        }
    }

    /// 503: the gateway is at its `max_in_flight` limit.
    pub fn overloaded(limit: usize) -> Self {
        ApiError {
            code: Some("server_overloaded"),
            retry_after: Some(1),
            record_kind: "overloaded",
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "api_error",
                format!(
                    "sluice is handling its limit of {limit} requests at once (max_in_flight); retry shortly."
                ),
            )
        }
    }

    /// 429: a deployment is at its `max_in_flight` limit.
    pub fn deployment_busy(deployment: &str, limit: usize) -> Self {
        ApiError {
            code: Some("deployment_busy"),
            retry_after: Some(1),
            record_kind: "deployment_busy",
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                format!(
                    "Deployment `{deployment}` is handling its limit of {limit} requests at once \
                     (deployments.{deployment}.max_in_flight); retry shortly."
                ),
            )
        }
    }

    /// 408: the client took too long to send its body.
    pub fn body_timeout(after: std::time::Duration) -> Self {
        ApiError {
            code: Some("body_timeout"),
            record_kind: "body_timeout",
            ..Self::new(
                StatusCode::REQUEST_TIMEOUT,
                "invalid_request_error",
                format!("The request body did not arrive within {after:?} (body_timeout)."),
            )
        }
    }

    /// 400: the body could not be read.
    pub fn unreadable_body(e: &dyn std::fmt::Display) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            format!("Could not read the request body: {e}"),
        )
    }

    /// 409 for a rollout changed concurrently; 500 `store_error` for any
    /// other failure of the store (the message says what SQLite reported).
    pub fn store(e: &sluice_store::StoreError) -> Self {
        let (status, kind, code) = match e {
            sluice_store::StoreError::Conflict(_) => {
                (StatusCode::CONFLICT, "invalid_request_error", "conflict")
            }
            _ => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "store_error",
            ),
        };
        ApiError {
            code: Some(code),
            record_kind: "store_error",
            ..Self::new(status, kind, e.to_string())
        }
    }

    /// 500 `internal`: a background task sluice started failed (it
    /// panicked or was cancelled).
    pub fn internal(e: &dyn std::fmt::Display) -> Self {
        ApiError {
            code: Some("internal"),
            record_kind: "internal",
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                e.to_string(),
            )
        }
    }

    /// Maps an upstream failure to what the client receives.
    pub fn upstream(e: &ProviderError) -> Self {
        let record_kind = e.kind();
        match e {
            ProviderError::Timeout { .. } => ApiError {
                code: Some("upstream_timeout"),
                record_kind,
                ..Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", e.to_string())
            },
            ProviderError::CircuitOpen { retry_after_s, .. } => ApiError {
                code: Some("upstream_circuit_open"),
                retry_after: Some(*retry_after_s),
                record_kind,
                ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "api_error", e.to_string())
            },
            ProviderError::Unsupported { param, message } => ApiError {
                param: Some(param.clone()),
                record_kind,
                ..Self::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_request_error",
                    message.clone(),
                )
            },
            ProviderError::Status {
                status,
                retry_after,
                ..
            } => match *status {
                // The upstream refused the request itself: the client can fix it.
                400 | 413 | 422 => ApiError {
                    code: Some("upstream_rejected_request"),
                    record_kind,
                    ..Self::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        e.to_string(),
                    )
                },
                429 => ApiError {
                    code: Some("upstream_rate_limited"),
                    retry_after: *retry_after,
                    record_kind,
                    ..Self::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        "rate_limit_error",
                        e.to_string(),
                    )
                },
                _ => ApiError {
                    code: Some("upstream_error"),
                    record_kind,
                    ..Self::new(StatusCode::BAD_GATEWAY, "api_error", e.to_string())
                },
            },
            _ => ApiError {
                code: Some("upstream_error"),
                record_kind,
                ..Self::new(StatusCode::BAD_GATEWAY, "api_error", e.to_string())
            },
        }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
        }
        r
    }
}

//! `POST /v1/feedback`: thumbs or a score on a served request, from the same
//! API key that made it. Feedback counts toward the rollout stage the request
//! was served in, even when it arrives late; the latest feedback on a request
//! replaces earlier feedback.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use sluice_core::chat::InvalidRequest;
use sluice_store::Feedback;

use crate::error::ApiError;
use crate::AppState;

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(InvalidRequest {
        param: Some(param.to_string()),
        message: message.into(),
    })
}

fn not_found(id: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        kind: "invalid_request_error",
        message: format!("No request with id `{id}` was made with this API key."),
        param: Some("request_id".into()),
        code: Some("request_not_found"),
        retry_after: None,
        record_kind: "request_not_found",
    }
}

/// The parsed body.
#[derive(Debug, PartialEq)]
struct FeedbackBody {
    request_id: String,
    thumbs_down: Option<bool>,
    score: Option<f64>,
    comment: Option<String>,
}

fn parse(bytes: &[u8]) -> Result<FeedbackBody, ApiError> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::invalid(InvalidRequest {
            param: None,
            message: format!("We could not parse the JSON body of your request: {e}."),
        })
    })?;
    let Value::Object(m) = v else {
        return Err(ApiError::invalid(InvalidRequest {
            param: None,
            message: "The request body must be a JSON object.".into(),
        }));
    };
    for k in m.keys() {
        if !["request_id", "thumbs", "score", "comment"].contains(&k.as_str()) {
            return Err(bad(
                k,
                format!("Unrecognized request argument supplied: {k}"),
            ));
        }
    }
    let request_id = match m.get("request_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(_) => {
            return Err(bad(
                "request_id",
                "'request_id' must be a non-empty string.",
            ))
        }
        None => {
            return Err(bad(
                "request_id",
                "Missing required parameter: 'request_id'.",
            ))
        }
    };
    let thumbs_down = match m.get("thumbs") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s == "up" => Some(false),
        Some(Value::String(s)) if s == "down" => Some(true),
        Some(other) => {
            return Err(bad(
                "thumbs",
                format!("Invalid 'thumbs': expected \"up\" or \"down\", got {other}."),
            ))
        }
    };
    let score = match m.get("score") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_f64() {
            Some(x) if (0.0..=1.0).contains(&x) => Some(x),
            _ => {
                return Err(bad(
                    "score",
                    format!("Invalid 'score': expected a number from 0.0 to 1.0, got {n}."),
                ))
            }
        },
        Some(other) => {
            return Err(bad(
                "score",
                format!("Invalid 'score': expected a number from 0.0 to 1.0, got {other}."),
            ))
        }
    };
    let comment = match m.get("comment") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.chars().count() <= 4096 => Some(s.clone()),
        Some(Value::String(_)) => {
            return Err(bad("comment", "'comment' must be at most 4096 characters."))
        }
        Some(_) => return Err(bad("comment", "'comment' must be a string.")),
    };
    if thumbs_down.is_none() && score.is_none() && comment.is_none() {
        return Err(bad(
            "thumbs",
            "Give at least one of 'thumbs' (\"up\" or \"down\"), 'score' or 'comment'.",
        ));
    }
    Ok(FeedbackBody {
        request_id,
        thumbs_down,
        score,
        comment,
    })
}

/// `POST /v1/feedback`.
pub async fn feedback(
    State(app): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match handle(&app, &headers, body).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

async fn handle(app: &Arc<AppState>, headers: &HeaderMap, body: Body) -> Result<Value, ApiError> {
    let snap = app.snapshot.load_full();
    let key = crate::pipeline::authenticate(&snap, headers)?.map(|k| k.name.clone());
    let bytes = crate::pipeline::read_body(headers, body, 64 * 1024).await?;
    let fb = parse(&bytes)?;
    let lookup = |id: String| {
        let store = app.store.clone();
        async move { tokio::task::spawn_blocking(move || store.get(&id)).await }
    };
    let mut rec = lookup(fb.request_id.clone())
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(|e| ApiError::store(&e))?;
    if rec.is_none() {
        // A request answered a moment ago may still be on its way to the store.
        app.events.flush().await;
        rec = lookup(fb.request_id.clone())
            .await
            .map_err(|e| ApiError::internal(&e))?
            .map_err(|e| ApiError::store(&e))?;
    }
    let Some(rec) = rec.filter(|r| r.api_key == key) else {
        return Err(not_found(&fb.request_id));
    };
    let now = crate::now_ms();
    let stored = Feedback {
        request_id: fb.request_id.clone(),
        ts_ms: now,
        api_key: key,
        thumbs_down: fb.thumbs_down,
        score: fb.score,
        comment: fb.comment.clone(),
    };
    let store = app.store.clone();
    let previous = tokio::task::spawn_blocking(move || store.put_feedback(&stored))
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(|e| ApiError::store(&e))?;
    // Count it toward the stage the request was served in, if that stage is
    // still being judged.
    let mut counted = Value::Null;
    if let (Some(name), Some(stage)) = (rec.rollout.as_deref(), rec.stage) {
        if matches!(
            rec.assignment.as_deref(),
            Some("cohort" | "bucket" | "stable")
        ) {
            let rollouts = app.rollouts.load();
            if let Some(e) = rollouts.entries.get(name) {
                if e.state.status.is_active() && u32::try_from(e.state.stage).ok() == Some(stage) {
                    let cand = rec.variant.as_deref() == Some(e.config.candidate.as_str());
                    let mut aggs = e.aggregates.lock().unwrap_or_else(|p| p.into_inner());
                    let arm = aggs.arm_mut(cand);
                    if let Some(down) = fb.thumbs_down {
                        arm.thumbs(previous.as_ref().and_then(|p| p.thumbs_down), down);
                    }
                    if let Some(s) = fb.score {
                        arm.scores.add(s);
                    }
                }
            }
            counted = json!({"rollout": name, "stage": stage, "variant": rec.variant});
        }
    }
    Ok(json!({
        "object": "feedback",
        "request_id": fb.request_id,
        "thumbs": fb.thumbs_down.map(|d| if d { "down" } else { "up" }),
        "score": fb.score,
        "replaced_earlier_feedback": previous.is_some(),
        "rollout_stage": counted,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_names_bad_fields() {
        let ok = parse(br#"{"request_id":"req_1","thumbs":"down","comment":"wrong"}"#).expect("ok");
        assert_eq!(ok.thumbs_down, Some(true));
        for (body, param) in [
            (r#"{"thumbs":"up"}"#, "request_id"),
            (r#"{"request_id":"r","thumbs":"sideways"}"#, "thumbs"),
            (r#"{"request_id":"r","score":1.5}"#, "score"),
            (r#"{"request_id":"r","score":"high"}"#, "score"),
            (r#"{"request_id":"r","stars":5}"#, "stars"),
            (r#"{"request_id":"r"}"#, "thumbs"),
        ] {
            let e = parse(body.as_bytes()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
    }
}

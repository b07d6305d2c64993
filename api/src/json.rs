//! Strict JSON request bodies: the right content type, bounded nesting, no unknown fields, the
//! right types; each refusal a problem with its own code.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

use crate::problem::ApiError;

/// Deepest nesting of arrays and objects a body may have.
pub const MAX_DEPTH: usize = 16;

/// A JSON body, parsed strictly (the wire types refuse unknown fields).
pub struct StrictJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for StrictJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| {
                let v = v.trim();
                v == "application/json" || v.ends_with("+json")
            });
        if !json {
            return Err(ApiError::new(
                axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Unsupported media type",
                "the body must be JSON (Content-Type: application/json)",
            ));
        }
        let bytes = Bytes::from_request(request, state).await.map_err(|e| {
            if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::new(
                    e.status(),
                    "body_too_large",
                    "Payload too large",
                    e.body_text(),
                )
            } else {
                ApiError::bad_request("unreadable_body", e.body_text())
            }
        })?;
        parse(&bytes).map(StrictJson)
    }
}

/// An optional JSON body: empty means `T::default()`; otherwise as [`StrictJson`].
pub struct OptionalJson<T>(pub T);

impl<T: DeserializeOwned + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let empty = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() == "0")
            || (request.headers().get(header::CONTENT_TYPE).is_none()
                && request.headers().get(header::TRANSFER_ENCODING).is_none()
                && request.headers().get(header::CONTENT_LENGTH).is_none());
        if empty {
            return Ok(OptionalJson(T::default()));
        }
        StrictJson::from_request(request, state)
            .await
            .map(|StrictJson(value)| OptionalJson(value))
    }
}

/// Parses a body: depth first (before serde builds anything), then syntax (400), then shape (422).
pub fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let Scan { depth, nul } = scan(bytes);
    if nul {
        return Err(ApiError::unprocessable(
            "invalid_character",
            "the body contains a NUL character (\\u0000), which Stele does not store",
        ));
    }
    if depth > MAX_DEPTH {
        return Err(ApiError::bad_request(
            "json_too_deep",
            format!("the body nests {depth} levels deep; at most {MAX_DEPTH} are allowed"),
        ));
    }
    serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::unprocessable("invalid_body", e.to_string()),
        _ => ApiError::bad_request("malformed_json", e.to_string()),
    })
}

/// What [`scan`] finds in a body before it is parsed.
struct Scan {
    /// The deepest nesting of `[` and `{` outside strings.
    depth: usize,
    /// A string holds the escape `\u0000` (a raw NUL byte is a syntax error anyway).
    nul: bool,
}

/// One pass over a body's bytes. Written by hand: serde_json's own recursion limit (128) is fixed
/// and answers with a syntax error, not a clear refusal, and finding NUL after parsing would mean
/// walking every string of every type.
fn scan(bytes: &[u8]) -> Scan {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    let mut nul = false;
    for (i, &byte) in bytes.iter().enumerate() {
        if in_string {
            match (escaped, byte) {
                (true, b'u') => {
                    escaped = false;
                    nul |= bytes.get(i + 1..i + 5) == Some(b"0000".as_slice());
                }
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Scan {
        depth: deepest,
        nul,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_counts_nesting_outside_strings() {
        assert_eq!(scan(br#"{"a": [1, {"b": "[[[{{"}]}"#).depth, 3);
        assert_eq!(scan(br#""just \" a [ string""#).depth, 0);
        assert_eq!(scan(b"[[[[]]]]").depth, 4);
    }

    #[test]
    fn nul_escapes_are_found_and_look_alikes_are_not() {
        assert!(scan(br#"{"input": "a\u0000b"}"#).nul);
        assert!(scan(br#"{"a\u0000": 1}"#).nul);
        assert!(
            !scan(br#"{"input": "a\\u0000b"}"#).nul,
            "an escaped backslash"
        );
        assert!(!scan(br#"{"input": "u0000 \u0041"}"#).nul);
    }
}

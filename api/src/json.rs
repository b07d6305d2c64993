//! Strict JSON request bodies: the right content type, bounded nesting, then the body's schema in
//! the OpenAPI document, which is the contract (no unknown fields, the right types and shapes,
//! the documented lengths and patterns); each refusal a problem with its own code.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;
use serde_json::Value;
use utoipa::ToSchema;

use crate::problem::{ApiError, Code};

/// Deepest nesting of arrays and objects a body may have.
pub const MAX_DEPTH: usize = 16;

/// A request body type. Its schema in the document decides what is accepted; [`Body::check`]
/// names the refusals that have a code of their own.
pub trait Body: DeserializeOwned + ToSchema {
    /// Refusals with a specific code (e.g. `input_too_long`), tried before the schema so that
    /// their code wins over the general `invalid_body`.
    fn check(&self) -> Result<(), ApiError> {
        Ok(())
    }
}

/// A JSON body, parsed strictly: exactly what the document's schema for `T` allows.
pub struct StrictJson<T>(pub T);

impl<T: Body, S: Send + Sync> FromRequest<S> for StrictJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = read(request, state).await?;
        parse(&bytes).map(StrictJson)
    }
}

/// An optional JSON body: none (an empty body) means `T::default()`; otherwise as
/// [`StrictJson`] (so `null`, which is not a `T`, is refused). The document declares such a body
/// as not required.
pub struct OptionalJson<T>(pub T);

impl<T: Body + Default, S: Send + Sync> FromRequest<S> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let headers = request.headers();
        let empty = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim() == "0")
            || (headers.get(header::CONTENT_TYPE).is_none()
                && headers.get(header::TRANSFER_ENCODING).is_none()
                && headers.get(header::CONTENT_LENGTH).is_none());
        if empty {
            return Ok(OptionalJson(T::default()));
        }
        let bytes = read(request, state).await?;
        parse(&bytes).map(OptionalJson)
    }
}

/// The body's bytes, if it is declared JSON (415) and within the size limit (413).
async fn read<S: Send + Sync>(request: Request, state: &S) -> Result<Bytes, ApiError> {
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
            Code::UnsupportedMediaType,
            "the body must be JSON (Content-Type: application/json)",
        ));
    }
    Bytes::from_request(request, state).await.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(Code::BodyTooLarge, e.body_text())
        } else {
            ApiError::new(Code::UnreadableBody, e.body_text())
        }
    })
}

/// Parses a body: depth and NUL first (before serde builds anything), then syntax (400), then
/// types (422), then the checks with codes of their own, then the schema (422).
pub fn parse<T: Body>(bytes: &[u8]) -> Result<T, ApiError> {
    let Scan { depth, nul } = scan(bytes);
    if nul {
        return Err(ApiError::new(
            Code::InvalidCharacterInBody,
            "the body contains a NUL character (\\u0000), which Stele does not store",
        ));
    }
    if depth > MAX_DEPTH {
        return Err(ApiError::new(
            Code::JsonTooDeep,
            format!("the body nests {depth} levels deep; at most {MAX_DEPTH} are allowed"),
        ));
    }
    let body: T = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::new(Code::InvalidBody, e.to_string()),
        _ => ApiError::new(Code::MalformedJson, e.to_string()),
    })?;
    body.check()?;
    // serde is more lenient than the schema in places (a struct from an array, for one): the
    // schema has the last word.
    let value: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::new(Code::MalformedJson, e.to_string()))?;
    let validator = validator(&T::name())?;
    if let Err(error) = validator.validate(&value) {
        let at = error.instance_path().to_string();
        let at = if at.is_empty() {
            "the body".into()
        } else {
            format!("`{at}`")
        };
        return Err(ApiError::new(
            Code::InvalidBody,
            format!("{at}: {}", error.masked()),
        ));
    }
    Ok(body)
}

/// The validator of the component schema `name` of the API's own document, compiled once.
fn validator(name: &str) -> Result<Arc<jsonschema::Validator>, ApiError> {
    static COMPONENTS: LazyLock<Value> = LazyLock::new(|| {
        serde_json::to_value(crate::server::openapi().components).unwrap_or_default()
    });
    static VALIDATORS: LazyLock<Mutex<HashMap<String, Arc<jsonschema::Validator>>>> =
        LazyLock::new(Default::default);
    if let Some(validator) = VALIDATORS.lock().expect("lock").get(name) {
        return Ok(validator.clone());
    }
    let schema = serde_json::json!({
        "$ref": format!("#/components/schemas/{name}"),
        "components": *COMPONENTS,
    });
    let validator =
        Arc::new(jsonschema::draft202012::new(&schema).map_err(|e| {
            ApiError::internal(format!("the schema of {name} does not compile: {e}"))
        })?);
    VALIDATORS
        .lock()
        .expect("lock")
        .insert(name.to_owned(), validator.clone());
    Ok(validator)
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

/// An optional whole number in a body, as JSON Schema counts one: `3` and `3.0` alike (a number
/// with a zero fraction is an integer there, and clients may send either).
pub fn optional_whole<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error as _;
    let Some(number) =
        <Option<serde_json::Number> as serde::Deserialize>::deserialize(deserializer)?
    else {
        return Ok(None);
    };
    let whole = number.as_u64().or_else(|| {
        number
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f <= u64::MAX as f64)
            .map(|f| f as u64)
    });
    whole
        .and_then(|n| T::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("{number} is not a whole number in range")))
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

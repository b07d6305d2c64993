//! The console: a web page for operators, served by the API server itself at `/console/`.
//!
//! It is one static page, a script and a style sheet, embedded in the binary (no build step, no
//! network): the script calls the same JSON API as every client, so the console can do exactly
//! what the API does and nothing the API does not. Signing in with an API key sets an
//! `HttpOnly`, `SameSite=Strict` cookie that holds the key; [`cookie_auth`] turns that cookie into
//! the key for the API's gate on every request (so revoking the key ends the session, and any
//! number of stateless servers serve it). A state-changing request that authenticates by the
//! cookie must carry `X-Csrf-Token`, a value derived from the key that only a page of this origin
//! can read (from `GET /console/session`), and must not come from another origin.
//!
//! These routes are the console's, not the API's: they are not in the OpenAPI document.

use axum::extract::{Request, State};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::problem::{ApiError, Code};
use crate::state::AppState;

/// The session cookie's name.
pub const COOKIE: &str = "stele_session";
/// How long a session lasts (the key itself may be revoked sooner).
const SESSION_SECONDS: u64 = 12 * 3600;

const INDEX: &str = include_str!("assets/index.html");
const SCRIPT: &str = include_str!("assets/app.js");
const AUDIT_SCRIPT: &str = include_str!("assets/verify.js");
const STYLE: &str = include_str!("assets/app.css");

/// What the page may load and where it may connect: itself only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The console's routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(|| async { Redirect::to("/console/") }))
        .route("/console", get(|| async { Redirect::to("/console/") }))
        .route(
            "/console/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/console/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/verify.js",
            get(|| async { asset(AUDIT_SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/console/app.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/console/session",
            get(session).post(sign_in).delete(sign_out),
        )
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The token a cookie session's state-changing requests carry: derived from the key, so a page
/// of another origin, which cannot read it, cannot forge one.
pub fn csrf_token(key: &str) -> String {
    hex::encode(Sha256::digest(format!("stele-console-csrf\n{key}")))
}

/// The key in the session cookie, if any.
fn cookie_key(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_owned())
        .filter(|value| !value.is_empty())
}

/// Whether the request's `Origin` (when it has one) is this server's own host (as the client
/// addressed it: `Host`, or `X-Forwarded-Host` behind a proxy).
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
        return true;
    };
    let Some((_, origin_host)) = origin.split_once("://") else {
        return false;
    };
    [header::HOST.as_str(), "x-forwarded-host"]
        .into_iter()
        .filter_map(|name| headers.get(name).and_then(|v| v.to_str().ok()))
        .any(|host| host.eq_ignore_ascii_case(origin_host))
}

/// A request without a key of its own but with the console's cookie is authenticated with the
/// cookie's key; a state-changing one must also carry the session's CSRF token and come from
/// this origin (`csrf_failed` otherwise).
pub async fn cookie_auth(mut request: Request, next: Next) -> Response {
    let headers = request.headers();
    let has_key = headers.contains_key(header::AUTHORIZATION) || headers.contains_key("x-api-key");
    let is_session_route = request.uri().path() == "/console/session";
    if has_key || is_session_route {
        return next.run(request).await;
    }
    let Some(key) = cookie_key(headers) else {
        return next.run(request).await;
    };
    let safe = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS
    );
    if !same_origin(headers) {
        return ApiError::new(
            Code::CsrfFailed,
            "a request of the console's session came from another origin",
        )
        .into_response();
    }
    if !safe {
        let token = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
        if token != Some(csrf_token(&key).as_str()) {
            return ApiError::new(
                Code::CsrfFailed,
                "a change by the console's session needs its X-Csrf-Token",
            )
            .into_response();
        }
    }
    match HeaderValue::from_str(&format!("Bearer {key}")) {
        Ok(value) => {
            request.headers_mut().insert(header::AUTHORIZATION, value);
        }
        Err(_) => {
            return ApiError::new(Code::Unauthorized, "the session's key is not valid")
                .into_response()
        }
    }
    next.run(request).await
}

/// Who is signed in.
#[derive(Debug, Serialize, Deserialize)]
pub struct SessionBody {
    /// The key's label.
    pub name: String,
    pub key_id: String,
    /// What the key may do (`admin` holds them all).
    pub scopes: Vec<String>,
    /// To send as `X-Csrf-Token` with every change.
    pub csrf: String,
    /// Where a run's trace is shown: a URL with `{trace_id}` in it, when the node has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_url: Option<String>,
}

async fn describe(state: &AppState, key: &str) -> Result<SessionBody, ApiError> {
    let (caller, scopes) = state.gate.scopes(key).await?;
    Ok(SessionBody {
        name: caller.name,
        key_id: caller.key_id,
        scopes: scopes.iter().map(|s| s.as_str().to_owned()).collect(),
        csrf: csrf_token(key),
        trace_url: state.trace_url.clone(),
    })
}

/// Who is signed in; `204 No Content` when no one is (not an error: the page asks it first).
async fn session(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let Some(key) = cookie_key(&headers) else {
        return StatusCode::NO_CONTENT.into_response();
    };
    match describe(&state, &key).await {
        Ok(body) => Json(body).into_response(),
        Err(e) => (clear_cookie(), e).into_response(),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SignIn {
    key: String,
}

async fn sign_in(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Json<SignIn>, axum::extract::rejection::JsonRejection>,
) -> Response {
    if !same_origin(&headers) {
        return ApiError::new(Code::CsrfFailed, "signing in from another origin").into_response();
    }
    let Ok(Json(SignIn { key })) = body else {
        return ApiError::new(Code::InvalidBody, "send {\"key\": \"<an API key>\"}")
            .into_response();
    };
    let key = key.trim().to_owned();
    // Only a key's own characters go into the cookie (it is `stele_<id>_<secret>`).
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return ApiError::new(Code::Unauthorized, "this API key is not valid").into_response();
    }
    match describe(&state, &key).await {
        Ok(body) => {
            let secure = headers
                .get("x-forwarded-proto")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"https"));
            let cookie = format!(
                "{COOKIE}={key}; Path=/; HttpOnly; SameSite=Strict; Max-Age={SESSION_SECONDS}{}",
                if secure { "; Secure" } else { "" }
            );
            let mut response = Json(body).into_response();
            if let Ok(value) = HeaderValue::from_str(&cookie) {
                response.headers_mut().insert(header::SET_COOKIE, value);
            }
            response
        }
        Err(e) => e.into_response(),
    }
}

fn clear_cookie() -> [(header::HeaderName, &'static str); 1] {
    [(
        header::SET_COOKIE,
        "stele_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
    )]
}

async fn sign_out(headers: HeaderMap) -> Response {
    if let Some(key) = cookie_key(&headers) {
        let token = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
        if token != Some(csrf_token(&key).as_str()) {
            return ApiError::new(Code::CsrfFailed, "signing out needs the X-Csrf-Token")
                .into_response();
        }
    }
    (StatusCode::NO_CONTENT, clear_cookie()).into_response()
}

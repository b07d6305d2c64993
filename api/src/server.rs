//! The router, its OpenAPI document, and serving with graceful shutdown.
//!
//! The document is generated from the handlers' `#[utoipa::path]` attributes (`utoipa-axum`), then
//! [`Contract`] adds what every operation shares, declared once here: the problems of the key
//! gate (401, 403, 429), of the query and path (400) and of JSON bodies (400, 413, 415, 422), the
//! 500 any operation may answer, both ways of presenting a key, and the rule that every field of
//! a JSON response is always present.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use serde_json::Value;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::Instrument;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, Parameter, ParameterIn};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::schema::{Object, ObjectBuilder, Schema, SchemaType, Type};
use utoipa::openapi::security::{
    ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme,
};
use utoipa::openapi::{Content, ContentBuilder, OpenApi, Ref, RefOr, Required};
use utoipa::{Modify, OpenApi as _};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::problem::{ApiError, Code, CHALLENGE};
use crate::routes::{
    audit, channels, conversations, health, memory, ops, rooms, schedules, stream, subjects, tasks,
    workspace,
};
use crate::state::AppState;

/// Largest request body accepted.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Stele API",
        version = "1.0.0",
        description = "Tasks, workflow runs and their live progress; operators' views of the log, jobs and projections. \
Every route but `/health/*` needs an API key (`Authorization: Bearer <key>` or `X-Api-Key`) with the route's scope. \
Errors are `application/problem+json` with a stable `code`; each response lists the codes it may carry. \
Text never holds a NUL character (U+0000), which Stele does not store: it is refused in paths, queries and bodies.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    modifiers(&Security),
    tags(
        (name = "tasks", description = "Create and follow tasks"),
        (name = "subjects", description = "People: consents, export and erasure of their data"),
        (name = "audit", description = "The audit log: signed checkpoints and proofs"),
        (name = "memory", description = "The memory: remember facts, search by meaning and words, forget"),
        (name = "schedules", description = "Workflows started on a timetable"),
        (name = "rooms", description = "Rooms: several agents and people in one conversation"),
        (name = "conversations", description = "Telegram chats and email threads, read-only"),
        (name = "operators", description = "The log, jobs, projections and workflows"),
        (name = "health", description = "Liveness, readiness and metrics"),
    )
)]
struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key from `stele keys create`"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "api_key_header",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-Api-Key",
                "The same API key, in a header of its own",
            ))),
        );
    }
}

/// What every operation of the document shares, added to each (see the module doc).
pub struct Contract;

impl Modify for Contract {
    fn modify(&self, openapi: &mut OpenApi) {
        let mut request_schemas = BTreeSet::new();
        let mut response_schemas = BTreeSet::new();
        for (path, item) in openapi.paths.paths.iter_mut() {
            let has_path_params = path.contains('{');
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for operation in operations.into_iter().flatten() {
                share(operation, has_path_params);
                collect_refs(&to_json(&operation.request_body), &mut request_schemas);
                for response in operation.responses.responses.values() {
                    collect_refs(
                        &to_json(response)["content"]["application/json"],
                        &mut response_schemas,
                    );
                }
            }
        }
        // The schemas that JSON responses use, and requests do not: the server sends every
        // field of these, `null` when it has no value, so every field is required (and typed
        // clients need not guess whether one was left out).
        let Some(components) = openapi.components.as_mut() else {
            return;
        };
        let reachable = |roots: BTreeSet<String>| {
            let mut seen = BTreeSet::new();
            let mut pending: Vec<String> = roots.into_iter().collect();
            while let Some(name) = pending.pop() {
                if let Some(schema) = components.schemas.get(&name) {
                    if seen.insert(name) {
                        let mut refs = BTreeSet::new();
                        collect_refs(&to_json(schema), &mut refs);
                        pending.extend(refs);
                    }
                }
            }
            seen
        };
        let in_responses = reachable(response_schemas);
        let in_requests = reachable(request_schemas);
        for name in in_responses.difference(&in_requests) {
            if let Some(RefOr::T(Schema::Object(object))) = components.schemas.get_mut(name) {
                object.required = object.properties.keys().cloned().collect();
            }
        }
    }
}

fn to_json(value: &impl serde::Serialize) -> Value {
    serde_json::to_value(value).unwrap_or_default()
}

fn problem(description: &str) -> ResponseBuilder {
    ResponseBuilder::new().description(description).content(
        "application/problem+json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .build(),
    )
}

/// Adds to one operation the parameters' types, the responses and the security it shares with
/// the others.
fn share(operation: &mut Operation, has_path_params: bool) {
    for parameter in operation.parameters.iter_mut().flatten() {
        if let RefOr::T(Parameter {
            schema: Some(RefOr::T(Schema::Object(object))),
            parameter_in,
            ..
        }) = parameter
        {
            // A parameter is a string in a URL or a header: never `null`.
            if let SchemaType::Array(types) = &object.schema_type {
                let types: Vec<Type> = types
                    .iter()
                    .filter(|t| **t != Type::Null)
                    .cloned()
                    .collect();
                object.schema_type = match types.as_slice() {
                    [one] => SchemaType::Type(one.clone()),
                    _ => SchemaType::Array(types),
                };
            }
            // `%00` in a path or a query is refused (`invalid_character`): a free text there
            // has no NUL.
            let free_text = object.schema_type == SchemaType::Type(Type::String)
                && object.pattern.is_none()
                && object.format.is_none()
                && object.enum_values.is_none();
            if free_text && matches!(parameter_in, ParameterIn::Query | ParameterIn::Path) {
                object.pattern = Some(crate::wire::NO_NUL.to_owned());
            }
        }
    }
    let scopes: Option<Vec<String>> = operation
        .security
        .as_ref()
        .and_then(|requirements| requirements.first())
        .and_then(|requirement| {
            serde_json::from_value(to_json(requirement)["api_key"].clone()).ok()
        });
    // An optional body is one that is left out, not `null` (`Option<T>` bodies come out of
    // utoipa as "T or null"): what the server takes, and what generated clients handle.
    if let Some(RefOr::T(body)) = operation.request_body.as_mut() {
        if body.required != Some(Required::True) {
            body.required = Some(Required::False);
            for content in body.content.values_mut() {
                if let RefOr::T(Content {
                    schema: Some(schema),
                    ..
                }) = content
                {
                    if let RefOr::T(Schema::OneOf(one_of)) = schema {
                        let is_null = |item: &RefOr<Schema>| {
                            matches!(item, RefOr::T(Schema::Object(o))
                                if o.schema_type == SchemaType::Type(Type::Null))
                        };
                        let mut items = one_of.items.iter().filter(|item| !is_null(item));
                        if let (Some(item), None) = (items.next(), items.next()) {
                            *schema = item.clone();
                        }
                    }
                }
            }
        }
    }
    let has_body = operation.request_body.is_some();
    let responses = &mut operation.responses.responses;
    let mut add = |status: &str, response: ResponseBuilder| {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| RefOr::T(response.build()));
    };
    add(
        "400",
        problem(if has_path_params {
            "`invalid_query`: an unknown query parameter, a wrong type or a value out of range; \
             `invalid_path`: a path segment that is not UTF-8; `invalid_character`: `%00` in the \
             path or query"
        } else {
            "`invalid_query`: an unknown query parameter, a wrong type or a value out of range; \
             `invalid_character`: `%00` in the query"
        }),
    );
    if has_body {
        add("413", problem("`body_too_large`: the body is over 64 KiB"));
        add(
            "415",
            problem("`unsupported_media_type`: a body that is not `application/json`"),
        );
        add(
            "422",
            problem(
                "`invalid_body`: the body breaks its schema (unknown fields, wrong types or \
                 shapes); `invalid_character`: `\\u0000` in the body",
            ),
        );
    }
    if let Some(scopes) = &scopes {
        add(
            "401",
            problem("`unauthorized`: no API key, or a key that is malformed, unknown or revoked")
                .header(
                    "WWW-Authenticate",
                    HeaderBuilder::new()
                        .schema(Some(Object::with_type(Type::String)))
                        .description(Some(format!(
                            "The scheme to authenticate with: `{CHALLENGE}`"
                        )))
                        .build(),
                ),
        );
        add(
            "403",
            problem(&format!(
                "`forbidden`: the key lacks the scope {}",
                scopes.join(", ")
            )),
        );
        add(
            "429",
            problem("`rate_limited`: the key's rate limit is exhausted; retry after `Retry-After`")
                .header(
                    "Retry-After",
                    HeaderBuilder::new()
                        .schema(Some(
                            ObjectBuilder::new()
                                .schema_type(Type::Integer)
                                .minimum(Some(1)),
                        ))
                        .description(Some("Seconds to wait before the next request"))
                        .build(),
                ),
        );
        // Either way of presenting a key will do.
        operation.security = Some(vec![
            SecurityRequirement::new("api_key", scopes.clone()),
            SecurityRequirement::new("api_key_header", scopes.clone()),
        ]);
    }
    add(
        "500",
        problem("`internal`: an unexpected failure; `detail` gives an error id to find in the server log"),
    );
}

/// The names of the component schemas `value` refers to.
fn collect_refs(value: &Value, names: &mut BTreeSet<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value.as_str()) {
                    ("$ref", Some(target)) => {
                        if let Some(name) = target.strip_prefix("#/components/schemas/") {
                            names.insert(name.to_owned());
                        }
                    }
                    _ => collect_refs(value, names),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| collect_refs(v, names)),
        _ => {}
    }
}

fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(tasks::create_task, tasks::list_tasks))
        .routes(routes!(tasks::get_task))
        .routes(routes!(tasks::task_events))
        .routes(routes!(workspace::task_workspace))
        .routes(routes!(workspace::workspace_file))
        .routes(routes!(tasks::cancel_task))
        .routes(routes!(tasks::signal_task))
        .routes(routes!(stream::sse))
        .routes(routes!(stream::ws))
        .routes(routes!(subjects::list_subjects, subjects::register_subject))
        .routes(routes!(subjects::get_subject))
        .routes(routes!(subjects::record_consent))
        .routes(routes!(subjects::merge_subject))
        .routes(routes!(subjects::export_subject))
        .routes(routes!(subjects::erase_subject))
        .routes(routes!(audit::audit_checkpoints))
        .routes(routes!(audit::audit_events))
        .routes(routes!(audit::inclusion_proof))
        .routes(routes!(audit::consistency_proof))
        .routes(routes!(memory::store_memory))
        .routes(routes!(memory::search_memory))
        .routes(routes!(memory::forget_memory))
        .routes(routes!(
            schedules::list_schedules,
            schedules::create_schedule
        ))
        .routes(routes!(schedules::get_schedule, schedules::remove_schedule))
        .routes(routes!(schedules::pause_schedule))
        .routes(routes!(schedules::resume_schedule))
        .routes(routes!(rooms::list_rooms, rooms::create_room))
        .routes(routes!(rooms::get_room))
        .routes(routes!(rooms::post_message))
        .routes(routes!(rooms::take_turn))
        .routes(routes!(rooms::moderate))
        .routes(routes!(rooms::room_ws))
        .routes(routes!(conversations::list_conversations))
        .routes(routes!(conversations::get_conversation))
        .routes(routes!(channels::telegram_access))
        .routes(routes!(channels::change_telegram_access))
        .routes(routes!(ops::workflows))
        .routes(routes!(ops::models))
        .routes(routes!(ops::choose_role_model))
        .routes(routes!(ops::chat_completions))
        .routes(routes!(ops::events))
        .routes(routes!(ops::jobs))
        .routes(routes!(ops::retry_job))
        .routes(routes!(ops::projections))
        .routes(routes!(ops::rebuild))
        .routes(routes!(health::live))
        .routes(routes!(health::ready))
        .routes(routes!(health::metrics))
}

/// The router and the OpenAPI document it serves (what `stele openapi` prints and
/// `openapi/openapi.json` holds).
fn parts() -> (Router<AppState>, OpenApi) {
    let (router, mut document) = api().split_for_parts();
    Contract.modify(&mut document);
    (router, document)
}

/// The OpenAPI document (what `stele openapi` prints and `openapi/openapi.json` holds).
pub fn openapi() -> OpenApi {
    parts().1
}

/// The whole application: the API, `/openapi.json` and Swagger UI at `/docs`.
pub fn app(state: AppState) -> Router {
    describe_metrics();
    let (router, document) = parts();
    router
        .merge(SwaggerUi::new("/docs").url("/openapi.json", document))
        .merge(crate::console::router())
        .fallback(|| async { ApiError::new(Code::RouteNotFound, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                Code::MethodNotAllowed,
                "this route does not answer that method",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::from_fn(crate::console::cookie_auth))
        .layer(middleware::from_fn(refuse_nul))
        .layer(middleware::from_fn(measure))
        .layer(CatchPanicLayer::custom(panicked))
        .with_state(state)
}

/// A handler that panicked answers a problem, never a dropped connection or a bare 500.
fn panicked(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a handler panicked".into());
    axum::response::IntoResponse::into_response(ApiError::internal(format!(
        "handler panicked: {message}"
    )))
}

/// A NUL character (`%00`) in a path or a query cannot be stored or even looked up on
/// PostgreSQL (and would be on the embedded store): refused before any route sees it, the same on
/// both stores.
async fn refuse_nul(request: Request, next: Next) -> Response {
    let uri = request.uri();
    let has_nul = |s: &str| {
        s.as_bytes()
            .windows(3)
            .any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0')
    };
    if has_nul(uri.path()) || uri.query().is_some_and(has_nul) {
        return axum::response::IntoResponse::into_response(ApiError::new(
            Code::InvalidCharacterInUri,
            "the path or query contains a NUL character (%00), which Stele does not store",
        ));
    }
    next.run(request).await
}

/// Describes the API's metrics to the recorder installed (their `# HELP` lines): once the
/// recorder is in place, before the first request.
pub fn describe_metrics() {
    metrics::describe_histogram!(
        "stele_http_request_duration_seconds",
        metrics::Unit::Seconds,
        "Time to answer an HTTP request, by method, route template and status"
    );
    metrics::describe_counter!(
        "stele_ratelimit_limited_total",
        "Requests refused because their key's rate limit was exhausted (429)"
    );
    metrics::describe_counter!(
        "stele_ratelimit_redis_errors_total",
        "Rate-limit checks that failed to reach Redis (the limit then fails open)"
    );
}

/// The methods that get their own metrics label; any other shares `other`, so that made-up
/// methods cannot grow the number of series.
const KNOWN_METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];

/// Records `stele_http_request_duration_seconds` by method, route and status. Every label has a
/// bounded set of values: known methods (else `other`), route templates (else `unmatched`),
/// status codes.
async fn measure(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = KNOWN_METHODS
        .into_iter()
        .find(|m| *m == request.method().as_str())
        .unwrap_or("other");
    // The request's span: a command it issues records it as its trace (see
    // `stele_engine::trace`), continuing the caller's when it sent a `traceparent`.
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        http.request.method = method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
    );
    if let Some(parent) = request
        .headers()
        .get("traceparent")
        .and_then(|value| value.to_str().ok())
    {
        stele_engine::trace::follow(&span, parent);
    }
    let started = Instant::now();
    let response = next.run(request).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    if response.status().is_server_error() {
        span.record("otel.status_code", "error");
    }
    metrics::histogram!(
        "stele_http_request_duration_seconds",
        "method" => method,
        "route" => route,
        "status" => response.status().as_u16().to_string()
    )
    .record(started.elapsed().as_secs_f64());
    response
}

/// Serves `app` on `listener` until `shutdown` resolves, then stops accepting and lets requests
/// in flight finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_an_internal_problem() {
        let response = panicked(Box::new("boom"));
        assert_eq!(
            response.status(),
            axum::http::StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(
            response.headers()[axum::http::header::CONTENT_TYPE],
            "application/problem+json"
        );
    }
}

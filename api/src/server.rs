//! The router, its OpenAPI document, and serving with graceful shutdown.

use std::future::Future;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, MatchedPath, Request};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::OpenApi;
use utoipa::{Modify, OpenApi as _};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;
use utoipa_swagger_ui::SwaggerUi;

use crate::problem::ApiError;
use crate::routes::{health, ops, stream, tasks};
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
Errors are `application/problem+json` with a stable `code`.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    modifiers(&Security),
    tags(
        (name = "tasks", description = "Create and follow tasks"),
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
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-Api-Key"))),
        );
    }
}

fn api() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(tasks::create_task, tasks::list_tasks))
        .routes(routes!(tasks::get_task))
        .routes(routes!(tasks::task_events))
        .routes(routes!(tasks::cancel_task))
        .routes(routes!(tasks::signal_task))
        .routes(routes!(stream::sse))
        .routes(routes!(stream::ws))
        .routes(routes!(ops::workflows))
        .routes(routes!(ops::events))
        .routes(routes!(ops::jobs))
        .routes(routes!(ops::retry_job))
        .routes(routes!(ops::projections))
        .routes(routes!(ops::rebuild))
        .routes(routes!(health::live))
        .routes(routes!(health::ready))
        .routes(routes!(health::metrics))
}

/// The OpenAPI document (what `stele openapi` prints and `openapi/openapi.json` holds).
pub fn openapi() -> OpenApi {
    api().split_for_parts().1
}

/// The whole application: the API, `/openapi.json` and Swagger UI at `/docs`.
pub fn app(state: AppState) -> Router {
    let (router, document) = api().split_for_parts();
    router
        .merge(SwaggerUi::new("/docs").url("/openapi.json", document))
        .fallback(|| async { ApiError::not_found("route_not_found", "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "Method not allowed",
                "this route does not answer that method",
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
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
        return axum::response::IntoResponse::into_response(ApiError::bad_request(
            "invalid_character",
            "the path or query contains a NUL character (%00), which Stele does not store",
        ));
    }
    next.run(request).await
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
    let started = Instant::now();
    let response = next.run(request).await;
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

//! Distributed traces across the log and the queue.
//!
//! A command records the trace it was issued in (a W3C `traceparent`: trace id and the issuing
//! span's id) in its metadata, so every event it appends carries it; a job that follows an event
//! carries the event's (under [`PAYLOAD_KEY`] in its payload), and the worker runs it in a span
//! whose parent is that one. One task's HTTP request or channel message, its step jobs, their
//! model calls and the reply so form one trace, whichever processes ran them.
//!
//! The spans are `tracing` spans; they become OpenTelemetry spans only where the process installs
//! an OpenTelemetry layer (the binary does when `OTEL_EXPORTER_OTLP_ENDPOINT` is set). Without
//! one, [`current`] finds no trace and [`follow`] does nothing.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The key of a job payload's `traceparent`.
pub const PAYLOAD_KEY: &str = "traceparent";

const HEADER: &str = "traceparent";

/// The `traceparent` of the current span, when it belongs to a trace.
pub fn current() -> Option<String> {
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(HEADER)
}

/// Makes `span` (not yet entered) a child of the span `traceparent` names; an invalid value is
/// ignored, and `span` then starts a trace of its own.
pub fn follow(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(HEADER.to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        // Fails only when the span is disabled or already started: it then keeps its parent.
        let _ = span.set_parent(context);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The trace id (32 hex digits) of a `traceparent`.
    fn trace_id(traceparent: &str) -> Option<&str> {
        let id = traceparent.split('-').nth(1)?;
        (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
    }

    #[test]
    fn without_a_layer_there_is_no_trace_and_following_one_is_harmless() {
        let span = tracing::info_span!("job");
        follow(
            &span,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        );
        follow(&span, "not a traceparent");
        assert_eq!(span.in_scope(current), None);
    }

    #[test]
    fn the_trace_id_is_the_second_field() {
        assert_eq!(
            trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("00-xyz-00f067aa0ba902b7-01"), None);
    }

    #[test]
    fn a_followed_span_continues_the_trace_and_its_commands_carry_it() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::layer::SubscriberExt;

        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, || {
            let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
            let span = tracing::info_span!("job");
            follow(&span, parent);
            let own = span.in_scope(current).expect("the span is in a trace");
            assert_eq!(trace_id(&own), trace_id(parent));
            assert_ne!(own, parent, "the span is the parent of what it issues");
            let meta = span.in_scope(|| crate::CommandMeta::new("agent:a", "system"));
            assert_eq!(meta.trace_id, Some(own));

            let root = tracing::info_span!("request");
            let started = root.in_scope(current).expect("a root span starts a trace");
            assert_ne!(trace_id(&started), trace_id(parent));
        });
    }
}

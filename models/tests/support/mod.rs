//! A fake OpenAI-compatible server: real HTTP on `127.0.0.1:0`, the real chat-completions JSON
//! (plain and server-sent events), and behaviours scripted per test. It records every request
//! it receives so tests can check the JSON that was sent.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde_json::{json, Value};

/// What the server does with one request.
#[derive(Debug, Clone)]
pub enum Behaviour {
    /// Answers (as SSE when the request asks for `stream: true`).
    Reply(Reply),
    /// Answers with this status and body.
    Status(u16, &'static str),
    /// Answers 429, with `Retry-After` when given.
    RateLimited(Option<&'static str>),
    /// Waits, then behaves as told.
    Slow(Duration, Box<Behaviour>),
    /// Answers 200 with a body that is not JSON.
    Malformed,
}

/// A reply's content, tool calls and token counts.
#[derive(Debug, Clone)]
pub struct Reply {
    pub content: String,
    /// `(id, name, arguments as JSON text)`.
    pub tool_calls: Vec<(String, String, String)>,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
}

impl Reply {
    pub fn text(content: &str) -> Self {
        Self {
            content: content.to_owned(),
            tool_calls: Vec::new(),
            prompt_tokens: 11,
            completion_tokens: 7,
        }
    }

    pub fn tool_call(mut self, id: &str, name: &str, arguments: Value) -> Self {
        self.tool_calls
            .push((id.to_owned(), name.to_owned(), arguments.to_string()));
        self
    }

    fn finish_reason(&self) -> &'static str {
        if self.tool_calls.is_empty() {
            "stop"
        } else {
            "tool_calls"
        }
    }
}

/// A request the server received.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Value,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

#[derive(Debug)]
struct Shared {
    received: Mutex<Vec<Received>>,
    /// Behaviours for the next requests, in order; then `otherwise` for every later one.
    script: Mutex<VecDeque<Behaviour>>,
    otherwise: Mutex<Behaviour>,
}

/// A running fake server; it stops with the test's runtime.
#[derive(Debug, Clone)]
pub struct FakeOpenAi {
    /// The API root to configure, e.g. `http://127.0.0.1:40123/v1`.
    pub base_url: String,
    shared: Arc<Shared>,
}

impl FakeOpenAi {
    /// Starts a server that answers every request as `otherwise` says.
    pub async fn start(otherwise: Behaviour) -> Self {
        let shared = Arc::new(Shared {
            received: Mutex::new(Vec::new()),
            script: Mutex::new(VecDeque::new()),
            otherwise: Mutex::new(otherwise),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(completions))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a local port");
        let address = listener.local_addr().expect("local address");
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            base_url: format!("http://{address}/v1"),
            shared,
        }
    }

    /// A server that answers `content` to everything.
    pub async fn replying(content: &str) -> Self {
        Self::start(Behaviour::Reply(Reply::text(content))).await
    }

    /// Makes the next request (after those already scripted) behave as `behaviour`.
    pub fn then(&self, behaviour: Behaviour) -> &Self {
        self.shared.script.lock().unwrap().push_back(behaviour);
        self
    }

    /// Changes how requests are answered once the script is used up.
    pub fn otherwise(&self, behaviour: Behaviour) {
        *self.shared.otherwise.lock().unwrap() = behaviour;
    }

    /// The requests received so far.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    /// How many requests were received.
    pub fn count(&self) -> usize {
        self.shared.received.lock().unwrap().len()
    }
}

async fn completions(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    shared.received.lock().unwrap().push(Received {
        headers,
        body: body.clone(),
    });
    let behaviour = shared
        .script
        .lock()
        .unwrap()
        .pop_front()
        .unwrap_or_else(|| shared.otherwise.lock().unwrap().clone());
    respond(behaviour, &body).await
}

async fn respond(mut behaviour: Behaviour, request: &Value) -> Response {
    while let Behaviour::Slow(delay, then) = behaviour {
        tokio::time::sleep(delay).await;
        behaviour = *then;
    }
    let model = request["model"].as_str().unwrap_or("unknown").to_owned();
    match behaviour {
        Behaviour::Reply(reply) if request["stream"] == json!(true) => {
            let include_usage = request["stream_options"]["include_usage"] == json!(true);
            let events = sse_events(&reply, &model, include_usage);
            let body = Body::from_stream(futures::stream::iter(
                events.into_iter().map(Ok::<_, Infallible>),
            ));
            ([("content-type", "text/event-stream")], body).into_response()
        }
        Behaviour::Reply(reply) => axum::Json(completion(&reply, &model)).into_response(),
        Behaviour::Status(status, body) => (
            StatusCode::from_u16(status).unwrap(),
            [("content-type", "application/json")],
            body,
        )
            .into_response(),
        Behaviour::RateLimited(retry_after) => {
            let mut response = (
                StatusCode::TOO_MANY_REQUESTS,
                r#"{"error":{"message":"slow down"}}"#,
            )
                .into_response();
            if let Some(seconds) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", seconds.parse().unwrap());
            }
            response
        }
        Behaviour::Malformed => (
            [("content-type", "application/json")],
            r#"{"choices": [{"message": "#,
        )
            .into_response(),
        Behaviour::Slow(..) => unreachable!("unwrapped above"),
    }
}

fn usage(reply: &Reply) -> Value {
    json!({
        "prompt_tokens": reply.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": reply.prompt_tokens + reply.completion_tokens,
    })
}

fn completion(reply: &Reply, model: &str) -> Value {
    let mut message = json!({
        "role": "assistant",
        "content": if reply.content.is_empty() { Value::Null } else { json!(reply.content) },
    });
    if !reply.tool_calls.is_empty() {
        message["tool_calls"] = reply
            .tool_calls
            .iter()
            .map(|(id, name, arguments)| {
                json!({"id": id, "type": "function", "function": {"name": name, "arguments": arguments}})
            })
            .collect();
    }
    json!({
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason()}],
        "usage": usage(reply),
    })
}

/// The reply as the OpenAI API streams it: a role chunk, content a word at a time, each tool
/// call as a header fragment then its arguments in 5-byte pieces, a finish chunk, a usage chunk
/// (when asked for), `[DONE]`. Events are sent as separate body chunks, and one is cut in the
/// middle, so the client's SSE parser has to join lines across reads.
fn sse_events(reply: &Reply, model: &str, include_usage: bool) -> Vec<String> {
    let chunk = |choices: Value, usage: Value| {
        json!({
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 1_700_000_000,
            "model": model,
            "choices": choices,
            "usage": usage,
        })
    };
    let delta = |delta: Value, finish: Value| {
        chunk(
            json!([{"index": 0, "delta": delta, "finish_reason": finish}]),
            Value::Null,
        )
    };
    let mut chunks = vec![delta(
        json!({"role": "assistant", "content": ""}),
        Value::Null,
    )];
    for word in reply.content.split_inclusive(' ') {
        chunks.push(delta(json!({"content": word}), Value::Null));
    }
    for (index, (id, name, arguments)) in reply.tool_calls.iter().enumerate() {
        chunks.push(delta(
            json!({"tool_calls": [{"index": index, "id": id, "type": "function",
                                   "function": {"name": name, "arguments": ""}}]}),
            Value::Null,
        ));
        for piece in arguments.as_bytes().chunks(5) {
            let piece = std::str::from_utf8(piece).expect("ASCII arguments in tests");
            chunks.push(delta(
                json!({"tool_calls": [{"index": index, "function": {"arguments": piece}}]}),
                Value::Null,
            ));
        }
    }
    chunks.push(delta(json!({}), json!(reply.finish_reason())));
    if include_usage {
        chunks.push(chunk(json!([]), usage(reply)));
    }

    let mut events: Vec<String> = chunks
        .iter()
        .map(|chunk| format!("data: {chunk}\n\n"))
        .collect();
    events.push("data: [DONE]\n\n".to_owned());
    let cut = events.remove(1);
    let (head, tail) = cut.split_at(cut.len() / 2);
    events.insert(1, tail.to_owned());
    events.insert(1, head.to_owned());
    events
}

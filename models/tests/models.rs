//! The model layer against a real (fake) OpenAI-compatible HTTP server: the JSON sent and read,
//! streaming, retries, timeouts, fallbacks, circuit breakers, configuration and the scripted
//! model. No trait is mocked: every OpenAI call crosses a socket.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use stele_models::config::DEFAULT_AGENTS_TOML;
use stele_models::scripted::example_for_schema;
use stele_models::{
    collect_stream, AgentReply, CallOverrides, ChatChunk, ChatMessage, ChatModel, ChatRequest,
    CircuitState, ManualClock, ModelCall, ModelError, ModelRoute, ModelRouter, ModelsConfig,
    OpenAiConfig, OpenAiModel, ToolCall, ToolSpec,
};
use support::{Behaviour, FakeOpenAi, Reply};

/// Retries fast enough for tests: 1 ms base, 5 ms cap, `Retry-After` capped at 60 ms.
const FAST_RETRY: &str = r#"
[retry]
max_retries = 2
base_delay_ms = 1
max_delay_ms = 5
max_retry_after_ms = 60
"#;

fn openai_provider(name: &str, server: &FakeOpenAi, timeout_ms: u64) -> String {
    format!(
        "[providers.{name}]\nkind = \"openai\"\nbase_url = \"{}\"\ntimeout_ms = {timeout_ms}\n",
        server.base_url
    )
}

fn config(text: &str) -> ModelsConfig {
    ModelsConfig::from_toml_str(text).unwrap_or_else(|error| panic!("{error}"))
}

fn router(text: &str) -> ModelRouter {
    ModelRouter::new(config(text)).expect("router")
}

async fn ask(router: &ModelRouter, agent: &str, text: &str) -> AgentReply {
    router
        .call(
            agent,
            vec![ChatMessage::user(text)],
            &CallOverrides::default(),
        )
        .await
}

fn errors(calls: &[ModelCall]) -> Vec<Option<&str>> {
    calls.iter().map(|call| call.error.as_deref()).collect()
}

fn weather_tool() -> ToolSpec {
    ToolSpec {
        name: "weather".into(),
        description: "Current weather in a city".into(),
        parameters: json!({
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"]
        }),
    }
}

// ---- the OpenAI adapter ---------------------------------------------------------------------

#[tokio::test]
async fn completion_sends_the_standard_json_and_reads_the_reply() {
    let server = FakeOpenAi::replying("It is sunny in Lyon.").await;
    let mut provider = OpenAiConfig::new(&server.base_url);
    provider.api_key = Some(stele_models::config::ApiKey::new("sk-test"));
    let model = OpenAiModel::new("fake", &provider).unwrap();
    assert_eq!(model.provider(), "fake");

    let schema = json!({"type": "object", "required": ["answer"],
                        "properties": {"answer": {"type": "string"}}});
    let request = ChatRequest {
        model: "gpt-test".into(),
        messages: vec![
            ChatMessage::system("Be brief."),
            ChatMessage::user("Weather in Lyon?"),
            ChatMessage::assistant_with_tools(
                "",
                vec![ToolCall {
                    id: "call_1".into(),
                    name: "weather".into(),
                    arguments: json!({"city": "Lyon"}),
                }],
            ),
            ChatMessage::tool("call_1", "sunny, 24°C"),
        ],
        tools: vec![weather_tool()],
        temperature: Some(0.5),
        max_tokens: Some(64),
        output_schema: Some(schema.clone()),
        agent: Some("vox".into()),
    };
    let response = model.complete(request).await.unwrap();

    assert_eq!(response.content, "It is sunny in Lyon.");
    assert_eq!(response.model, "gpt-test");
    assert_eq!(response.finish_reason.as_deref(), Some("stop"));
    assert_eq!(
        (response.usage.input_tokens, response.usage.output_tokens),
        (11, 7)
    );
    assert!(response.tool_calls.is_empty());

    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].header("authorization"), Some("Bearer sk-test"));
    assert_eq!(
        received[0].body,
        json!({
            "model": "gpt-test",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Weather in Lyon?"},
                {"role": "assistant", "content": null, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "weather", "arguments": "{\"city\":\"Lyon\"}"}}
                ]},
                {"role": "tool", "content": "sunny, 24°C", "tool_call_id": "call_1"}
            ],
            "tools": [{"type": "function", "function": {
                "name": "weather",
                "description": "Current weather in a city",
                "parameters": weather_tool().parameters
            }}],
            "temperature": 0.5,
            "max_tokens": 64,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "output", "schema": schema}}
        })
    );
}

#[tokio::test]
async fn no_authorization_header_without_a_key() {
    let server = FakeOpenAi::replying("hi").await;
    let model = OpenAiModel::new("fake", &OpenAiConfig::new(&server.base_url)).unwrap();
    model
        .complete(ChatRequest::new("m", vec![ChatMessage::user("hello")]))
        .await
        .unwrap();
    assert_eq!(server.received()[0].header("authorization"), None);
}

#[tokio::test]
async fn streaming_assembles_the_same_reply_as_completion() {
    let server = FakeOpenAi::replying("The quick brown fox jumps over the lazy dog.").await;
    let model = OpenAiModel::new("fake", &OpenAiConfig::new(&server.base_url)).unwrap();
    let request = ChatRequest::new("llama-test", vec![ChatMessage::user("Say the pangram.")]);

    let completed = model.complete(request.clone()).await.unwrap();
    let chunks: Vec<ChatChunk> = model
        .stream(request)
        .await
        .unwrap()
        .map(|chunk| chunk.unwrap())
        .collect()
        .await;

    let deltas: Vec<&str> = chunks
        .iter()
        .filter_map(|chunk| match chunk {
            ChatChunk::Delta(text) => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert!(deltas.len() > 3, "the reply came in pieces: {deltas:?}");
    assert_eq!(deltas.concat(), completed.content);
    let Some(ChatChunk::Done(streamed)) = chunks.last() else {
        panic!("the last chunk is Done: {chunks:?}");
    };
    assert_eq!(streamed, &completed);

    let streamed_request = &server.received()[1];
    assert_eq!(streamed_request.body["stream"], json!(true));
    assert_eq!(
        streamed_request.body["stream_options"],
        json!({"include_usage": true})
    );
    assert_eq!(streamed_request.header("accept"), Some("text/event-stream"));
    assert_eq!(server.received()[0].body.get("stream"), None);
}

#[tokio::test]
async fn streamed_tool_calls_are_assembled_into_json_arguments() {
    let reply = Reply::text("")
        .tool_call(
            "call_a",
            "weather",
            json!({"city": "Lyon", "unit": "celsius"}),
        )
        .tool_call("call_b", "search", json!({"query": "rust sse", "limit": 3}));
    let server = FakeOpenAi::start(Behaviour::Reply(reply)).await;
    let model = OpenAiModel::new("fake", &OpenAiConfig::new(&server.base_url)).unwrap();
    let request = ChatRequest {
        tools: vec![weather_tool()],
        ..ChatRequest::new("m", vec![ChatMessage::user("Weather in Lyon?")])
    };

    let chunks: Vec<ChatChunk> = model
        .stream(request.clone())
        .await
        .unwrap()
        .map(|chunk| chunk.unwrap())
        .collect()
        .await;
    let fragments = chunks
        .iter()
        .filter(|chunk| matches!(chunk, ChatChunk::ToolCallDelta { .. }))
        .count();
    assert!(fragments > 4, "arguments came in fragments ({fragments})");

    let expected = vec![
        ToolCall {
            id: "call_a".into(),
            name: "weather".into(),
            arguments: json!({"city": "Lyon", "unit": "celsius"}),
        },
        ToolCall {
            id: "call_b".into(),
            name: "search".into(),
            arguments: json!({"query": "rust sse", "limit": 3}),
        },
    ];
    let Some(ChatChunk::Done(streamed)) = chunks.last() else {
        panic!("the last chunk is Done");
    };
    assert_eq!(streamed.tool_calls, expected);
    assert_eq!(streamed.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(streamed.content, "");

    let completed = model.complete(request).await.unwrap();
    assert_eq!(completed.tool_calls, expected);
}

#[tokio::test]
async fn a_stream_that_stalls_times_out() {
    let server = FakeOpenAi::start(Behaviour::Slow(
        Duration::from_secs(2),
        Box::new(Behaviour::Reply(Reply::text("late"))),
    ))
    .await;
    let mut provider = OpenAiConfig::new(&server.base_url);
    provider.timeout_ms = 50;
    let model = OpenAiModel::new("fake", &provider).unwrap();
    let request = ChatRequest::new("m", vec![ChatMessage::user("hi")]);

    let started = Instant::now();
    let error = match model.stream(request.clone()).await {
        Ok(stream) => collect_stream(stream).await.unwrap_err(),
        Err(error) => error,
    };
    assert_eq!(
        error,
        ModelError::Timeout {
            after: Duration::from_millis(50)
        }
    );
    assert_eq!(
        model.complete(request).await.unwrap_err(),
        ModelError::Timeout {
            after: Duration::from_millis(50)
        }
    );
    assert!(started.elapsed() < Duration::from_millis(1_500));
}

#[tokio::test]
async fn a_refused_connection_is_a_retryable_connect_error() {
    // Bind a port, then free it: nothing listens there any more.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    drop(listener);
    let model =
        OpenAiModel::new("gone", &OpenAiConfig::new(format!("http://{address}/v1"))).unwrap();
    let error = model
        .complete(ChatRequest::new("m", vec![ChatMessage::user("hi")]))
        .await
        .unwrap_err();
    assert!(matches!(error, ModelError::Connect(_)), "{error:?}");
    assert!(error.is_retryable());
}

// ---- the router: retries, timeouts, fallbacks, circuit breakers ----------------------------

#[tokio::test]
async fn a_500_is_retried_then_succeeds_and_every_attempt_is_recorded() {
    let server = FakeOpenAi::replying("fixed it").await;
    server.then(Behaviour::Status(500, r#"{"error":{"message":"boom"}}"#));
    let router = router(&format!(
        "{FAST_RETRY}{}
        [agents.coder]
        system_prompt = \"You write code.\"
        route = [\"primary/code-model\"]",
        openai_provider("primary", &server, 2_000)
    ));

    let reply = ask(&router, "coder", "Fix the bug").await;

    assert_eq!(reply.result.unwrap().content, "fixed it");
    assert_eq!(reply.served_by, Some(0));
    assert_eq!(server.count(), 2);
    let calls = &reply.calls;
    assert_eq!(calls.len(), 2);
    assert_eq!(
        calls[0].error.as_deref(),
        Some(r#"HTTP 500: {"error":{"message":"boom"}}"#)
    );
    assert_eq!((calls[0].attempt, calls[1].attempt), (1, 2));
    assert_eq!(calls[1].error, None);
    assert_eq!(calls[1].output.as_deref(), Some("fixed it"));
    assert_eq!((calls[1].input_tokens, calls[1].output_tokens), (11, 7));
    for call in calls {
        assert_eq!(call.agent, "coder");
        assert_eq!(call.provider, "primary");
        assert_eq!(call.model, "code-model");
        assert_eq!(call.fallback_index, 0);
        assert_eq!(
            call.messages,
            vec![
                ChatMessage::system("You write code."),
                ChatMessage::user("Fix the bug")
            ]
        );
    }
    // What the server saw: the system prompt first, then the conversation.
    assert_eq!(
        server.received()[1].body["messages"],
        json!([{"role": "system", "content": "You write code."},
               {"role": "user", "content": "Fix the bug"}])
    );
    // The record survives the event log's JSON round trip.
    let stored = serde_json::to_value(&calls[1]).unwrap();
    assert_eq!(
        serde_json::from_value::<ModelCall>(stored).unwrap(),
        calls[1]
    );
}

#[tokio::test]
async fn a_timeout_is_retried_then_the_next_provider_answers() {
    let slow = FakeOpenAi::start(Behaviour::Slow(
        Duration::from_secs(2),
        Box::new(Behaviour::Reply(Reply::text("too late"))),
    ))
    .await;
    let backup = FakeOpenAi::replying("from the backup").await;
    let router = router(&format!(
        "[retry]
        max_retries = 1
        base_delay_ms = 1
        {}{}
        [agents.vox]
        route = [\"slow/big\", \"backup/small\"]",
        openai_provider("slow", &slow, 50),
        openai_provider("backup", &backup, 2_000)
    ));

    let started = Instant::now();
    let reply = ask(&router, "vox", "hello").await;

    assert_eq!(reply.result.unwrap().content, "from the backup");
    assert_eq!(reply.served_by, Some(1));
    assert!(started.elapsed() < Duration::from_millis(1_500));
    let timeout = "the provider did not answer within 50 ms";
    assert_eq!(
        errors(&reply.calls),
        vec![Some(timeout), Some(timeout), None]
    );
    let places: Vec<(usize, u32, &str)> = reply
        .calls
        .iter()
        .map(|call| (call.fallback_index, call.attempt, call.model.as_str()))
        .collect();
    assert_eq!(places, vec![(0, 1, "big"), (0, 2, "big"), (1, 1, "small")]);
    assert!(reply.calls[0].latency_ms >= 50);
    assert_eq!((slow.count(), backup.count()), (2, 1));
}

/// Three failures open the primary's circuit (3 attempts with 2 retries); the backup answers.
async fn open_the_primary_circuit() -> (FakeOpenAi, FakeOpenAi, ModelRouter, Arc<ManualClock>) {
    let primary = FakeOpenAi::start(Behaviour::Status(503, "overloaded")).await;
    let backup = FakeOpenAi::replying("backup answer").await;
    let clock = Arc::new(ManualClock::new());
    let config = config(&format!(
        "{FAST_RETRY}
        [circuit]
        failure_threshold = 3
        cooldown_ms = 60000
        {}{}
        [agents.brain]
        route = [\"primary/m\", \"backup/m\"]",
        openai_provider("primary", &primary, 2_000),
        openai_provider("backup", &backup, 2_000)
    ));
    let router = ModelRouter::builder(config)
        .clock(clock.clone())
        .build()
        .unwrap();

    assert_eq!(router.circuit_state("primary"), Some(CircuitState::Closed));
    let reply = ask(&router, "brain", "first").await;
    assert_eq!(reply.served_by, Some(1));
    assert_eq!(primary.count(), 3);
    assert_eq!(router.circuit_state("primary"), Some(CircuitState::Open));
    assert_eq!(router.circuit_state("backup"), Some(CircuitState::Closed));
    (primary, backup, router, clock)
}

#[tokio::test]
async fn an_open_circuit_skips_the_provider_then_a_trial_closes_it() {
    let (primary, backup, router, clock) = open_the_primary_circuit().await;

    // Open: the primary is skipped without an HTTP request, and the skip is recorded.
    let reply = ask(&router, "brain", "second").await;
    assert_eq!(reply.result.unwrap().content, "backup answer");
    assert_eq!(reply.served_by, Some(1));
    assert_eq!(primary.count(), 3);
    assert_eq!(
        errors(&reply.calls),
        vec![Some("circuit open for provider `primary`"), None]
    );
    assert_eq!(reply.calls[0].latency_ms, 0);
    assert_eq!(backup.count(), 2);

    // After the cool-down one trial goes through; the primary has recovered, so it closes.
    clock.advance(Duration::from_secs(59));
    assert_eq!(router.circuit_state("primary"), Some(CircuitState::Open));
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        router.circuit_state("primary"),
        Some(CircuitState::HalfOpen)
    );
    primary.otherwise(Behaviour::Reply(Reply::text("primary is back")));

    let reply = ask(&router, "brain", "third").await;
    assert_eq!(reply.result.unwrap().content, "primary is back");
    assert_eq!(reply.served_by, Some(0));
    assert_eq!(primary.count(), 4);
    assert_eq!(router.circuit_state("primary"), Some(CircuitState::Closed));
}

#[tokio::test]
async fn a_failed_trial_reopens_the_circuit_and_allows_no_second_try() {
    let (primary, _backup, router, clock) = open_the_primary_circuit().await;
    clock.advance(Duration::from_secs(60));

    let reply = ask(&router, "brain", "still down?").await;

    // One trial request only: its retry finds the circuit open again.
    assert_eq!(primary.count(), 4);
    assert_eq!(
        errors(&reply.calls),
        vec![
            Some("HTTP 503: overloaded"),
            Some("circuit open for provider `primary`"),
            None
        ]
    );
    assert_eq!(reply.served_by, Some(1));
    assert_eq!(router.circuit_state("primary"), Some(CircuitState::Open));
}

#[tokio::test]
async fn a_client_error_is_not_retried_and_does_not_count_against_the_circuit() {
    let server = FakeOpenAi::start(Behaviour::Status(
        400,
        r#"{"error":{"message":"unknown model"}}"#,
    ))
    .await;
    let router = router(&format!(
        "{FAST_RETRY}
        [circuit]
        failure_threshold = 1
        {}
        [agents.coder]
        route = [\"primary/nope\"]",
        openai_provider("primary", &server, 2_000)
    ));

    let reply = ask(&router, "coder", "hello").await;

    assert_eq!(server.count(), 1);
    assert_eq!(reply.calls.len(), 1);
    assert_eq!(reply.served_by, None);
    let error = reply.result.unwrap_err();
    assert!(
        matches!(error, ModelError::Exhausted { attempts: 1, .. }),
        "{error:?}"
    );
    assert_eq!(
        error.root(),
        &ModelError::Status {
            status: 400,
            body: r#"{"error":{"message":"unknown model"}}"#.into()
        }
    );
    assert!(!error.is_retryable());
    assert_eq!(router.circuit_state("primary"), Some(CircuitState::Closed));
}

#[tokio::test]
async fn a_429_waits_for_retry_after_within_the_cap() {
    let server = FakeOpenAi::replying("done").await;
    server.then(Behaviour::RateLimited(Some("5")));
    let router = router(&format!(
        "{FAST_RETRY}{}
        [agents.worker]
        route = [\"primary/m\"]",
        openai_provider("primary", &server, 2_000)
    ));

    let started = Instant::now();
    let reply = ask(&router, "worker", "go").await;
    let elapsed = started.elapsed();

    assert_eq!(reply.result.unwrap().content, "done");
    assert_eq!(
        errors(&reply.calls),
        vec![Some("rate limited (retry after 5000 ms)"), None]
    );
    // Retry-After said 5 s; the configured cap (60 ms) bounds it, and the backoff (≤ 1 ms)
    // alone would not have waited that long.
    assert!(elapsed >= Duration::from_millis(60), "{elapsed:?}");
    assert!(elapsed < Duration::from_secs(2), "{elapsed:?}");
}

#[tokio::test]
async fn malformed_json_is_a_decode_error_and_is_not_retried() {
    let server = FakeOpenAi::start(Behaviour::Malformed).await;
    let router = router(&format!(
        "{FAST_RETRY}{}
        [agents.worker]
        route = [\"primary/m\"]",
        openai_provider("primary", &server, 2_000)
    ));

    let reply = ask(&router, "worker", "go").await;

    assert_eq!(server.count(), 1);
    let error = reply.result.unwrap_err();
    assert!(matches!(error.root(), ModelError::Decode(_)), "{error:?}");
    assert!(reply.calls[0]
        .error
        .as_deref()
        .unwrap()
        .starts_with("could not decode the reply"));
}

#[tokio::test]
async fn overrides_escalate_and_replace_prompt_route_temperature_and_tools() {
    let server = FakeOpenAi::replying("escalated").await;
    let router = router(&format!(
        "{}
        [providers.scripted]
        kind = \"scripted\"
        [agents.worker]
        system_prompt = \"worker prompt\"
        route = [\"scripted/worker\"]
        [agents.coder]
        system_prompt = \"coder prompt\"
        route = [\"scripted/coder\"]
        temperature = 0.1",
        openai_provider("remote", &server, 2_000)
    ));

    // Escalation: the worker's call is made as the coder.
    let overrides = CallOverrides {
        agent: Some("coder".into()),
        ..CallOverrides::default()
    };
    let reply = router
        .call("worker", vec![ChatMessage::user("hard task")], &overrides)
        .await;
    assert_eq!(reply.calls[0].agent, "coder");
    assert_eq!(
        reply.calls[0].messages[0],
        ChatMessage::system("coder prompt")
    );
    assert_eq!(reply.result.unwrap().content, "[coder] hard task");

    // Route, prompt, temperature and tools replaced for one call.
    let overrides = CallOverrides {
        route: Some(vec![ModelRoute::new("remote", "big-model")]),
        system_prompt: Some("custom prompt".into()),
        temperature: Some(0.9),
        tools: vec![weather_tool()],
        ..CallOverrides::default()
    };
    let reply = router
        .call("coder", vec![ChatMessage::user("hi")], &overrides)
        .await;
    assert_eq!(reply.result.unwrap().content, "escalated");
    let body = &server.received()[0].body;
    assert_eq!(body["model"], json!("big-model"));
    assert_eq!(
        body["messages"][0],
        json!({"role": "system", "content": "custom prompt"})
    );
    assert_eq!(
        body["temperature"].as_f64().map(|t| (t * 10.0).round()),
        Some(9.0)
    );
    assert_eq!(body["tools"][0]["function"]["name"], json!("weather"));
}

#[tokio::test]
async fn unknown_agents_and_providers_are_reported_without_calls() {
    let router = router("[providers.scripted]\nkind = \"scripted\"");
    let reply = ask(&router, "ghost", "boo").await;
    assert_eq!(reply.result, Err(ModelError::UnknownAgent("ghost".into())));
    assert!(reply.calls.is_empty());

    let router = ModelRouter::new(ModelsConfig::default()).unwrap();
    let overrides = CallOverrides {
        route: Some(vec![ModelRoute::new("nowhere", "m")]),
        ..CallOverrides::default()
    };
    let reply = router
        .call("vox", vec![ChatMessage::user("hi")], &overrides)
        .await;
    assert_eq!(
        reply.result,
        Err(ModelError::UnknownProvider("nowhere".into()))
    );
    assert!(reply.calls.is_empty());
}

#[tokio::test]
async fn router_calls_can_run_on_spawned_tasks() {
    let router = Arc::new(ModelRouter::new(ModelsConfig::default()).unwrap());
    let tasks: Vec<_> = ["vox", "memory", "worker"]
        .into_iter()
        .map(|agent| {
            let router = router.clone();
            tokio::spawn(async move { ask(&router, agent, "hi").await })
        })
        .collect();
    for (task, agent) in tasks.into_iter().zip(["vox", "memory", "worker"]) {
        let reply = task.await.unwrap();
        assert_eq!(reply.result.unwrap().content, format!("[{agent}] hi"));
    }
}

// ---- configuration ---------------------------------------------------------------------------

fn parse_error(text: &str) -> String {
    ModelsConfig::from_toml_str(text).unwrap_err().to_string()
}

#[test]
fn configuration_errors_name_the_problem() {
    let cases = [
        (
            "[providers.s]\nkind = \"scripted\"\n[agents.a]\nroute = [\"nowhere/m\"]",
            "agent `a`: route entry 0 (`nowhere/m`) names provider `nowhere`, which is not defined (defined: `s`)",
        ),
        (
            "[providers.s]\nkind = \"scripted\"\n[agents.a]\nroute = [\"s/m\"]\nsystemprompt = \"x\"",
            "unknown field `systemprompt`",
        ),
        ("[providers.o]\nkind = \"openai\"", "missing field `base_url`"),
        ("[providers.o]\nkind = \"anthropic\"", "unknown variant `anthropic`"),
        (
            "[providers.o]\nkind = \"openai\"\nbase_url = \"http://x/v1\"\ntimeout = 5",
            "unknown field `timeout`",
        ),
        (
            "[providers.s]\nkind = \"scripted\"\n[agents.a]\nroute = [\"just-a-model\"]",
            "route entry `just-a-model` is not of the form \"provider/model\"",
        ),
        (
            "[providers.s]\nkind = \"scripted\"\n[agents.a]\nroute = []",
            "agent `a`: route is empty",
        ),
        (
            "[providers.o]\nkind = \"openai\"\nbase_url = \"localhost:11434\"",
            "provider `o`: base_url `localhost:11434` must be http or https",
        ),
        (
            "[providers.s]\nkind = \"scripted\"\n[agents.a]\nroute = [\"s/m\"]\ntemperature = 3.0",
            "agent `a`: temperature 3 is outside 0..=2",
        ),
        ("[retry\nmax_retries = 2", "line 1"),
    ];
    for (text, expected) in cases {
        let message = parse_error(text);
        assert!(
            message.contains(expected),
            "for\n{text}\nexpected `{expected}` in:\n{message}"
        );
        assert!(message.starts_with("models configuration: "), "{message}");
    }
}

#[test]
fn loading_a_file_names_the_file() {
    let dir = std::env::temp_dir().join(format!("stele-models-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("agents.toml");

    let missing = ModelsConfig::load(dir.join("missing.toml"))
        .unwrap_err()
        .to_string();
    assert!(
        missing.starts_with(&dir.join("missing.toml").display().to_string()),
        "{missing}"
    );
    assert!(missing.contains("cannot read"), "{missing}");

    std::fs::write(&path, "[agents.a]\nroute = [\"x/y\"]\n").unwrap();
    let invalid = ModelsConfig::load(&path).unwrap_err().to_string();
    assert!(
        invalid.starts_with(&path.display().to_string()),
        "{invalid}"
    );
    assert!(
        invalid.contains("provider `x`, which is not defined (defined: none)"),
        "{invalid}"
    );

    std::fs::write(&path, DEFAULT_AGENTS_TOML).unwrap();
    assert_eq!(ModelsConfig::load(&path).unwrap(), ModelsConfig::default());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_shipped_configuration_defines_every_role() {
    let config = ModelsConfig::default();
    let roles = [
        "planner", "coder", "executor", "tester", "reviewer", "vox", "brain", "memory", "worker",
        "noop",
    ];
    for name in roles {
        let role = config
            .agents
            .get(name)
            .unwrap_or_else(|| panic!("role `{name}`"));
        assert_eq!(role.name, name);
        assert_eq!(
            role.route,
            vec![ModelRoute::new("scripted", name)],
            "{name}"
        );
        assert!(!role.description.is_empty(), "{name} has a description");
        assert!(
            name == "noop" || !role.system_prompt.is_empty(),
            "{name} has a system prompt"
        );
    }
    assert_eq!(config.agents.len(), roles.len());
    assert!(config.agents["noop"].pinned);
    assert_eq!(config.retry.max_retries, 2);
    assert_eq!(config.circuit.failure_threshold, 5);
    assert_eq!(config.circuit.cooldown_ms, 60_000);
    ModelRouter::new(config).expect("the shipped configuration builds a router");
}

#[tokio::test]
async fn the_shipped_roles_answer_offline() {
    let router = ModelRouter::new(ModelsConfig::default()).unwrap();

    let noop = ask(&router, "noop", "anything").await;
    assert_eq!(noop.result.unwrap().content, "ok");

    for (request, route) in [
        ("What time is it?", "simple"),
        ("Write code for a parser", "delegate"),
        ("Plan my trip step by step", "decompose"),
    ] {
        let reply = ask(&router, "brain", request).await;
        let decision: Value = serde_json::from_str(&reply.result.unwrap().content).unwrap();
        assert_eq!(decision["route"], json!(route), "{request}");
        assert!(decision["reason"].is_string());
    }

    let review: Value = serde_json::from_str(
        &ask(&router, "reviewer", "diff")
            .await
            .result
            .unwrap()
            .content,
    )
    .unwrap();
    assert_eq!(review, json!({"verdict": "approve", "comments": []}));
    let plan: Value = serde_json::from_str(
        &ask(&router, "planner", "build it")
            .await
            .result
            .unwrap()
            .content,
    )
    .unwrap();
    assert_eq!(plan["steps"].as_array().map(Vec::len), Some(1));
}

#[tokio::test]
async fn the_environment_routes_every_agent_to_one_server() {
    let server = FakeOpenAi::replying("from the local server").await;
    let env = [
        ("STELE_MODEL_PROVIDER", server.base_url.as_str()),
        ("STELE_MODEL_BASE_URL", server.base_url.as_str()),
        ("STELE_MODEL_API_KEY", "sk-env"),
        ("STELE_MODEL_NAME", "llama3.1:8b"),
    ];
    // `STELE_MODEL_PROVIDER` names a provider; the URL is not one.
    let error = ModelsConfig::default()
        .with_env(env)
        .unwrap_err()
        .to_string();
    assert!(
        error.starts_with("environment variable STELE_MODEL_PROVIDER: no provider named"),
        "{error}"
    );

    let mut env = env;
    env[0].1 = "openai";
    let config = ModelsConfig::default().with_env(env).unwrap();
    for role in config.agents.values() {
        let expected = if role.name == "noop" {
            ModelRoute::new("scripted", "noop")
        } else {
            ModelRoute::new("openai", "llama3.1:8b")
        };
        assert_eq!(role.route, vec![expected], "{}", role.name);
    }
    let router = ModelRouter::new(config).unwrap();

    let reply = ask(&router, "coder", "hello").await;
    assert_eq!(reply.result.unwrap().content, "from the local server");
    let received = server.received();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].header("authorization"), Some("Bearer sk-env"));
    assert_eq!(received[0].body["model"], json!("llama3.1:8b"));
    assert_eq!(
        received[0].body["messages"][0]["content"],
        json!(router.agent("coder").unwrap().system_prompt)
    );

    // The pinned benchmark role stays offline.
    assert_eq!(
        ask(&router, "noop", "x").await.result.unwrap().content,
        "ok"
    );
    assert_eq!(server.count(), 1);
}

#[tokio::test]
async fn per_provider_variables_and_key_variables_apply() {
    let server = FakeOpenAi::replying("hello from local").await;
    let config = config(
        "[providers.local-llm]
        kind = \"openai\"
        base_url = \"http://127.0.0.1:9/v1\"
        api_key_env = \"LOCAL_LLM_KEY\"
        [agents.worker]
        route = [\"local-llm/qwen\"]",
    );
    let config = config
        .with_env([
            ("STELE_PROVIDER_LOCAL_LLM_BASE_URL", server.base_url.clone()),
            ("STELE_PROVIDER_LOCAL_LLM_TIMEOUT_MS", "1500".into()),
            ("LOCAL_LLM_KEY", "sk-local".into()),
            ("UNRELATED", "ignored".into()),
        ])
        .unwrap();
    let reply = ask(&ModelRouter::new(config).unwrap(), "worker", "hi").await;
    assert_eq!(reply.result.unwrap().content, "hello from local");
    assert_eq!(
        server.received()[0].header("authorization"),
        Some("Bearer sk-local")
    );

    let env_error = |env: &[(&str, &str)]| {
        ModelsConfig::default()
            .with_env(env.iter().copied())
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        env_error(&[("STELE_PROVIDER_GHOST_BASE_URL", "http://x")]),
        "environment variable STELE_PROVIDER_GHOST_BASE_URL: no provider is named like `ghost` \
         (defined: `openai`, `scripted`)"
    );
    assert_eq!(
        env_error(&[("STELE_MODEL_PROVIDER", "openai")]),
        "environment variable STELE_MODEL_NAME: required to route agents to the \
         OpenAI-compatible provider `openai`"
    );
    assert!(env_error(&[("STELE_PROVIDER_SCRIPTED_API_KEY", "k")]).contains("of kind `scripted`"));
    assert!(env_error(&[("STELE_PROVIDER_OPENAI_TIMEOUT_MS", "soon")])
        .contains("`soon` is not a whole number of milliseconds"));
    assert!(env_error(&[("STELE_MODEL_NAME", "m")]).contains("set without STELE_MODEL_PROVIDER"));
    // Empty values count as unset.
    assert!(ModelsConfig::default()
        .with_env([("STELE_MODEL_PROVIDER", "")])
        .is_ok());
}

#[tokio::test]
async fn the_scripted_provider_can_stand_in_for_every_role() {
    let config = ModelsConfig::default()
        .with_env([("STELE_MODEL_PROVIDER", "scripted")])
        .unwrap();
    assert_eq!(
        config.agents["vox"].route,
        vec![ModelRoute::new("scripted", "vox")]
    );
}

// ---- the scripted model ----------------------------------------------------------------------

const SCRIPTED: &str = r#"
[retry]
max_retries = 2
base_delay_ms = 1

[providers.scripted]
kind = "scripted"

[[providers.scripted.rules]]
agent = "flaky"
fail = "overloaded"
times = 2

[[providers.scripted.rules]]
model = "broken"
fail = "bad request"
retryable = false

[[providers.scripted.rules]]
contains = "weather"
reply = "{agent} on {model} heard: {input}"

[[providers.scripted.rules]]
agent = "tools"
tool_calls = [{ name = "weather", arguments = { city = "Lyon" } }]

[agents.flaky]
route = ["scripted/flaky-model"]

[agents.fragile]
route = ["scripted/broken", "scripted/spare"]

[agents.echo]
route = ["scripted/echo-model"]

[agents.tools]
route = ["scripted/t"]

[agents.classifier]
route = ["scripted/c"]
output_schema = { type = "object", required = ["route", "reason"], properties = { route = { enum = ["simple", "delegate", "decompose"] }, reason = { type = "string" } } }
"#;

#[tokio::test]
async fn scripted_failures_stop_after_times_and_are_retried() {
    let router = router(SCRIPTED);
    let reply = ask(&router, "flaky", "please").await;
    assert_eq!(
        errors(&reply.calls),
        vec![
            Some("scripted failure: overloaded"),
            Some("scripted failure: overloaded"),
            None
        ]
    );
    assert_eq!(reply.result.unwrap().content, "[flaky-model] please");
    // The budget is spent: the next call answers at once.
    assert_eq!(ask(&router, "flaky", "again").await.calls.len(), 1);
}

#[tokio::test]
async fn a_non_retryable_scripted_failure_falls_back_at_once() {
    let router = router(SCRIPTED);
    let reply = ask(&router, "fragile", "go").await;
    assert_eq!(
        errors(&reply.calls),
        vec![Some("scripted failure: bad request"), None]
    );
    assert_eq!(reply.served_by, Some(1));
    assert_eq!(reply.result.unwrap().content, "[spare] go");
}

#[tokio::test]
async fn scripted_replies_fill_in_echo_and_follow_the_schema() {
    let router = router(SCRIPTED);

    let reply = ask(&router, "echo", "what is the weather like").await;
    let response = reply.result.unwrap();
    assert_eq!(
        response.content,
        "echo on echo-model heard: what is the weather like"
    );
    assert_eq!(response.usage.input_tokens, 5);
    assert_eq!(response.usage.output_tokens, 9);

    let reply = ask(&router, "echo", "plain words").await;
    assert_eq!(reply.result.unwrap().content, "[echo-model] plain words");

    let reply = ask(&router, "classifier", "anything").await;
    let content = reply.result.unwrap().content;
    let value: Value = serde_json::from_str(&content).unwrap();
    assert_eq!(value, json!({"route": "simple", "reason": "text"}));
    assert_eq!(
        value,
        example_for_schema(
            router
                .agent("classifier")
                .unwrap()
                .output_schema
                .as_ref()
                .unwrap()
        )
    );

    let reply = ask(&router, "tools", "go").await;
    let response = reply.result.unwrap();
    assert_eq!(
        response.tool_calls,
        vec![ToolCall {
            id: "call_0".into(),
            name: "weather".into(),
            arguments: json!({"city": "Lyon"}),
        }]
    );
    assert_eq!(response.finish_reason.as_deref(), Some("tool_calls"));
    assert_eq!(reply.calls[0].tool_calls, response.tool_calls);
}

#[tokio::test]
async fn the_scripted_stream_yields_deltas_then_the_same_reply() {
    let config = config(SCRIPTED);
    let stele_models::ProviderConfig::Scripted(scripted) = &config.providers["scripted"] else {
        panic!("scripted provider");
    };
    let model = stele_models::ScriptedModel::new("scripted", scripted);
    let request = ChatRequest {
        agent: Some("echo".into()),
        ..ChatRequest::new("m", vec![ChatMessage::user("one two three four")])
    };

    let completed = model.complete(request.clone()).await.unwrap();
    let chunks: Vec<ChatChunk> = model
        .stream(request)
        .await
        .unwrap()
        .map(|chunk| chunk.unwrap())
        .collect()
        .await;
    let deltas: String = chunks
        .iter()
        .filter_map(|chunk| match chunk {
            ChatChunk::Delta(text) => Some(text.as_str()),
            _ => None,
        })
        .collect();
    assert!(chunks.len() > 3);
    assert_eq!(deltas, "[m] one two three four");
    assert_eq!(chunks.last(), Some(&ChatChunk::Done(completed)));
}

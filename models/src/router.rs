//! The router: calls an agent role through its route (primary model, then fallbacks), with
//! retries of retryable errors and a circuit breaker per provider, and reports every attempt as
//! a [`ModelCall`] for the event log.
//!
//! For each route entry in order:
//! 1. if the provider's circuit refuses the call, the skip is recorded and the next entry is
//!    tried;
//! 2. otherwise the call is made; a retryable error is retried at the same provider after an
//!    exponential, jittered backoff (or the provider's `Retry-After`), up to
//!    `retry.max_retries` times; any other error moves on to the next entry at once.
//!
//! The first success is the reply. When every entry failed, the reply is
//! [`ModelError::Exhausted`] holding the last error.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use rand::Rng;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::circuit::{CircuitBreaker, CircuitState};
use crate::clock::{Clock, SystemClock};
use crate::config::{AgentRole, ModelRoute, ModelsConfig, ProviderConfig};
use crate::openai::OpenAiModel;
use crate::scripted::ScriptedModel;
use crate::{ChatMessage, ChatModel, ChatRequest, ChatResponse, ModelCall, ModelError, ToolSpec};

/// The name calls made by [`ModelRouter::call_route`] are recorded under.
pub const GATEWAY: &str = "gateway";

/// What a caller may change for one call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CallOverrides {
    /// Call this role instead (escalation, e.g. from `worker` to `coder`): its prompt, route,
    /// schema and temperature apply.
    pub agent: Option<String>,
    /// Use this route instead of the role's.
    pub route: Option<Vec<ModelRoute>>,
    /// Use this temperature instead of the role's.
    pub temperature: Option<f32>,
    /// Use this system prompt instead of the role's.
    pub system_prompt: Option<String>,
    /// Upper bound on generated tokens, instead of the role's.
    pub max_tokens: Option<u32>,
    /// The tools to offer. The role lists tool *names*; the caller, who owns the tool registry,
    /// resolves them to specifications. No tools are offered when empty.
    pub tools: Vec<ToolSpec>,
}

/// The outcome of [`ModelRouter::call`].
#[derive(Debug, Clone, PartialEq)]
pub struct AgentReply {
    /// The reply, or why there is none.
    pub result: Result<ChatResponse, ModelError>,
    /// Every attempt, in order: failures, circuit-open skips, and the success.
    pub calls: Vec<ModelCall>,
    /// The route position that answered: 0 for the primary, 1 for the first fallback, …
    pub served_by: Option<usize>,
}

/// What [`ModelRouter::overview`] shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overview {
    /// The providers, by name.
    pub providers: Vec<ProviderOverview>,
    /// The agent roles, by name.
    pub roles: Vec<RoleOverview>,
}

/// A provider: how it is reached, the models routes name there, its circuit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderOverview {
    /// Its name in the configuration.
    pub name: String,
    /// `openai` (an OpenAI-compatible server), `scripted`, or `plugged-in` (an adapter given in
    /// code).
    pub kind: String,
    /// Where an OpenAI-compatible provider is reached.
    pub base_url: Option<String>,
    /// The models the roles' routes name at this provider.
    pub models: Vec<String>,
    /// Closed: calls go through; open: refused until the cool-down passed; half-open: the next
    /// call is a trial. Healthy means closed.
    pub circuit: CircuitState,
}

/// An agent role: its models in order (primary, then fallbacks) and its tools.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoleOverview {
    /// Its name.
    pub name: String,
    /// What it is for.
    pub description: String,
    /// `provider/model`, the primary first.
    pub route: Vec<String>,
    /// The tools it may call.
    pub tools: Vec<String>,
}

struct Provider {
    model: Arc<dyn ChatModel>,
    breaker: CircuitBreaker,
}

/// Routes agent roles' calls to models. Cheap to share behind an `Arc`; calls may run
/// concurrently.
pub struct ModelRouter {
    config: ModelsConfig,
    providers: BTreeMap<String, Provider>,
}

impl std::fmt::Debug for ModelRouter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRouter")
            .field("providers", &self.providers.keys().collect::<Vec<_>>())
            .field("agents", &self.config.agents.keys().collect::<Vec<_>>())
            .finish()
    }
}

/// Builds a [`ModelRouter`] with a chosen clock or extra adapters.
pub struct ModelRouterBuilder {
    config: ModelsConfig,
    clock: Arc<dyn Clock>,
    models: BTreeMap<String, Arc<dyn ChatModel>>,
}

impl ModelRouterBuilder {
    /// The clock of the circuit breakers (a [`ManualClock`](crate::ManualClock) in tests).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// Serves the provider `name` with `model` instead of the adapter its configuration
    /// describes (or adds a provider that overriding routes can name).
    pub fn model(mut self, name: impl Into<String>, model: Arc<dyn ChatModel>) -> Self {
        self.models.insert(name.into(), model);
        self
    }

    /// Builds the adapters and checks that every route names a provider.
    pub fn build(self) -> Result<ModelRouter, ModelError> {
        let Self {
            config,
            clock,
            mut models,
        } = self;
        for (name, provider) in &config.providers {
            if models.contains_key(name) {
                continue;
            }
            let model: Arc<dyn ChatModel> = match provider {
                ProviderConfig::OpenAi(openai) => Arc::new(OpenAiModel::new(name, openai)?),
                ProviderConfig::Scripted(scripted) => Arc::new(ScriptedModel::new(name, scripted)),
            };
            models.insert(name.clone(), model);
        }
        for role in config.agents.values() {
            if let Some(entry) = role
                .route
                .iter()
                .find(|e| !models.contains_key(&e.provider))
            {
                return Err(ModelError::UnknownProvider(entry.provider.clone()));
            }
        }
        let providers = models
            .into_iter()
            .map(|(name, model)| {
                let breaker = CircuitBreaker::new(
                    config.circuit.failure_threshold,
                    config.circuit.cooldown(),
                    clock.clone(),
                );
                (name, Provider { model, breaker })
            })
            .collect();
        Ok(ModelRouter { config, providers })
    }
}

impl ModelRouter {
    /// A router over the adapters `config` describes, on the system clock.
    pub fn new(config: ModelsConfig) -> Result<Self, ModelError> {
        Self::builder(config).build()
    }

    /// A builder, to choose the clock or plug in adapters.
    pub fn builder(config: ModelsConfig) -> ModelRouterBuilder {
        ModelRouterBuilder {
            config,
            clock: Arc::new(SystemClock),
            models: BTreeMap::new(),
        }
    }

    /// The configuration the router was built from.
    pub fn config(&self) -> &ModelsConfig {
        &self.config
    }

    /// The role named `name`.
    pub fn agent(&self, name: &str) -> Option<&AgentRole> {
        self.config.agents.get(name)
    }

    /// Every role, by name.
    pub fn agents(&self) -> impl Iterator<Item = &AgentRole> {
        self.config.agents.values()
    }

    /// The providers with their circuits, and the roles with their routes, for operators (no
    /// secret: an API key is never shown).
    pub fn overview(&self) -> Overview {
        let mut models: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for role in self.config.agents.values() {
            for entry in &role.route {
                let list = models.entry(entry.provider.as_str()).or_default();
                if !list.contains(&entry.model) {
                    list.push(entry.model.clone());
                }
            }
        }
        let providers = self
            .providers
            .iter()
            .map(|(name, provider)| {
                let (kind, base_url) = match self.config.providers.get(name) {
                    Some(ProviderConfig::OpenAi(openai)) => {
                        ("openai", Some(openai.base_url.clone()))
                    }
                    Some(ProviderConfig::Scripted(_)) => ("scripted", None),
                    None => ("plugged-in", None),
                };
                ProviderOverview {
                    name: name.clone(),
                    kind: kind.to_owned(),
                    base_url,
                    models: models.remove(name.as_str()).unwrap_or_default(),
                    circuit: provider.breaker.state(),
                }
            })
            .collect();
        let roles = self
            .config
            .agents
            .values()
            .map(|role| RoleOverview {
                name: role.name.clone(),
                description: role.description.clone(),
                route: role.route.iter().map(ToString::to_string).collect(),
                tools: role.tools.clone(),
            })
            .collect();
        Overview { providers, roles }
    }

    /// The state of the provider's circuit, or `None` for an unknown provider.
    pub fn circuit_state(&self, provider: &str) -> Option<CircuitState> {
        self.providers
            .get(provider)
            .map(|provider| provider.breaker.state())
    }

    /// Calls the role `agent` (or `overrides.agent`) with `messages`, after its system prompt.
    /// See the module documentation for the order of attempts.
    pub async fn call(
        &self,
        agent: &str,
        messages: Vec<ChatMessage>,
        overrides: &CallOverrides,
    ) -> AgentReply {
        let failed = |error| AgentReply {
            result: Err(error),
            calls: Vec::new(),
            served_by: None,
        };
        let name = overrides.agent.as_deref().unwrap_or(agent);
        let Some(role) = self.config.agents.get(name) else {
            return failed(ModelError::UnknownAgent(name.to_owned()));
        };
        let route = overrides.route.as_ref().unwrap_or(&role.route);
        if route.is_empty() {
            return failed(ModelError::EmptyRoute(name.to_owned()));
        }
        if let Some(entry) = route
            .iter()
            .find(|entry| !self.providers.contains_key(&entry.provider))
        {
            return failed(ModelError::UnknownProvider(entry.provider.clone()));
        }

        let system_prompt = overrides
            .system_prompt
            .as_deref()
            .unwrap_or(&role.system_prompt);
        let mut full = Vec::with_capacity(messages.len() + 1);
        if !system_prompt.is_empty() {
            full.push(ChatMessage::system(system_prompt));
        }
        full.extend(messages);
        let template = ChatRequest {
            model: String::new(),
            messages: full,
            tools: overrides.tools.clone(),
            temperature: overrides.temperature.or(role.temperature),
            max_tokens: overrides.max_tokens.or(role.max_tokens),
            output_schema: role.output_schema.clone(),
            agent: Some(name.to_owned()),
        };

        self.attempt(name, route, template).await
    }

    /// Calls the models of `route` in order (retries, breakers and fallbacks as for a role)
    /// with `messages` as they are: no role, so no system prompt, tools or output schema but
    /// the caller's. What an OpenAI-compatible gateway serves.
    pub async fn call_route(
        &self,
        route: &[ModelRoute],
        messages: Vec<ChatMessage>,
        temperature: Option<f32>,
        max_tokens: Option<u32>,
    ) -> AgentReply {
        let failed = |error| AgentReply {
            result: Err(error),
            calls: Vec::new(),
            served_by: None,
        };
        if route.is_empty() {
            return failed(ModelError::EmptyRoute(GATEWAY.to_owned()));
        }
        if let Some(entry) = route
            .iter()
            .find(|entry| !self.providers.contains_key(&entry.provider))
        {
            return failed(ModelError::UnknownProvider(entry.provider.clone()));
        }
        let template = ChatRequest {
            model: String::new(),
            messages,
            tools: Vec::new(),
            temperature,
            max_tokens,
            output_schema: None,
            agent: None,
        };
        self.attempt(GATEWAY, route, template).await
    }

    /// Tries each entry of `route` in turn with `template`'s request.
    async fn attempt(&self, name: &str, route: &[ModelRoute], template: ChatRequest) -> AgentReply {
        let mut calls = Vec::new();
        let mut last_error = None;
        for (index, entry) in route.iter().enumerate() {
            let provider = &self.providers[&entry.provider];
            let request = ChatRequest {
                model: entry.model.clone(),
                ..template.clone()
            };
            match self
                .call_provider(name, index, entry, provider, request, &mut calls)
                .await
            {
                Ok(response) => {
                    return AgentReply {
                        result: Ok(response),
                        calls,
                        served_by: Some(index),
                    }
                }
                Err(error) => last_error = Some(error),
            }
        }
        AgentReply {
            result: Err(ModelError::Exhausted {
                agent: name.to_owned(),
                attempts: calls.len(),
                last: Box::new(last_error.expect("the route is not empty")),
            }),
            calls,
            served_by: None,
        }
    }

    /// The attempts at one provider: the first, then retries of retryable errors.
    async fn call_provider(
        &self,
        agent: &str,
        index: usize,
        entry: &ModelRoute,
        provider: &Provider,
        request: ChatRequest,
        calls: &mut Vec<ModelCall>,
    ) -> Result<ChatResponse, ModelError> {
        let record = |attempt: u32| ModelCall {
            agent: agent.to_owned(),
            provider: entry.provider.clone(),
            model: entry.model.clone(),
            messages: request.messages.clone(),
            output: None,
            tool_calls: Vec::new(),
            input_tokens: 0,
            output_tokens: 0,
            latency_ms: 0,
            error: None,
            fallback_index: index,
            attempt,
        };
        let retry = &self.config.retry;
        let mut attempt = 1;
        loop {
            let Some(permit) = provider.breaker.try_acquire() else {
                let error = ModelError::CircuitOpen {
                    provider: entry.provider.clone(),
                };
                tracing::debug!(agent, provider = %entry.provider, "skipped: circuit open");
                calls.push(ModelCall {
                    error: Some(error.to_string()),
                    ..record(attempt)
                });
                return Err(error);
            };

            // A span per call, named and described as OpenTelemetry's GenAI conventions say.
            let span = tracing::info_span!(
                "model",
                otel.name = %format_args!("chat {}", entry.model),
                otel.kind = "client",
                gen_ai.operation.name = "chat",
                gen_ai.provider.name = %entry.provider,
                gen_ai.request.model = %entry.model,
                gen_ai.agent.name = agent,
                stele.fallback_index = index,
                stele.attempt = attempt,
                gen_ai.usage.input_tokens = tracing::field::Empty,
                gen_ai.usage.output_tokens = tracing::field::Empty,
                error.type = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            let started = Instant::now();
            let outcome = provider
                .model
                .complete(request.clone())
                .instrument(span.clone())
                .await;
            let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            match &outcome {
                Ok(response) => {
                    span.record("gen_ai.usage.input_tokens", response.usage.input_tokens);
                    span.record("gen_ai.usage.output_tokens", response.usage.output_tokens);
                }
                Err(error) => {
                    span.record("error.type", error.kind());
                    span.record("otel.status_code", "error");
                }
            }
            let error = match outcome {
                Ok(response) => {
                    permit.record(true);
                    calls.push(ModelCall {
                        output: Some(response.content.clone()),
                        tool_calls: response.tool_calls.clone(),
                        input_tokens: response.usage.input_tokens,
                        output_tokens: response.usage.output_tokens,
                        latency_ms,
                        ..record(attempt)
                    });
                    return Ok(response);
                }
                Err(error) => error,
            };
            permit.record(!error.is_provider_fault());
            tracing::warn!(
                agent, provider = %entry.provider, model = %entry.model, attempt, %error,
                "model call failed"
            );
            calls.push(ModelCall {
                error: Some(error.to_string()),
                latency_ms,
                ..record(attempt)
            });
            if !error.is_retryable() || attempt > retry.max_retries {
                return Err(error);
            }
            // Jitter is the one random input; it changes only how long we wait.
            let jitter = rand::rng().random_range(0.0..=1.0);
            tokio::time::sleep(retry.delay(attempt, error.retry_after(), jitter)).await;
            attempt += 1;
        }
    }
}

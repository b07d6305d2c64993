//! The model configuration: providers (how to reach a model), agent roles (prompt, route,
//! tools, output schema), retry and circuit-breaker settings. Read from TOML (`agents.toml`),
//! then adjusted by environment variables; see [`ModelsConfig::with_env`].
//!
//! Durations are whole milliseconds (`timeout_ms`, `cooldown_ms`, …): TOML has no duration
//! type, and a unit in the key name leaves nothing to guess.
//!
//! One file on purpose (about 750 lines): every type here is a part of one TOML document, and
//! validating it (routes naming providers, roles naming routes and tools) reads across all of
//! them; splitting it would scatter one schema over several files.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

/// The configuration shipped with the crate (`models/agents.toml`), which
/// [`ModelsConfig::default`] parses.
pub const DEFAULT_AGENTS_TOML: &str = include_str!("../agents.toml");

/// Prefix of the per-provider environment variables (`STELE_PROVIDER_<NAME>_BASE_URL`, …).
pub const PROVIDER_ENV_PREFIX: &str = "STELE_PROVIDER_";

/// Why a configuration was refused. Every message names where the configuration came from (a
/// file path, or the environment variable at fault) and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{}: cannot read the models configuration: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The text is not valid TOML, or does not have the expected shape.
    #[error("{origin}: {message}")]
    Parse {
        /// Where the text came from.
        origin: String,
        /// The parser's message (with line and column).
        message: String,
    },
    /// The configuration parsed but is inconsistent (e.g. a route names an unknown provider).
    #[error("{origin}: {message}")]
    Invalid {
        /// Where the configuration came from.
        origin: String,
        /// What is wrong.
        message: String,
    },
    /// An environment variable has a value that cannot be used.
    #[error("environment variable {variable}: {message}")]
    Env {
        /// The variable.
        variable: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole model configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelsConfig {
    /// Providers by name; routes refer to them by that name.
    #[serde(default)]
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Agent roles by name.
    #[serde(default)]
    pub agents: BTreeMap<String, AgentRole>,
    /// Retries at one provider.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Circuit breakers (one per provider).
    #[serde(default)]
    pub circuit: CircuitConfig,
}

/// How to reach one provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ProviderConfig {
    /// An OpenAI-compatible HTTP server (OpenAI, Ollama, vLLM, llama.cpp server, …).
    #[serde(rename = "openai")]
    OpenAi(OpenAiConfig),
    /// The deterministic offline model (see [`crate::scripted`]).
    Scripted(ScriptedConfig),
}

impl ProviderConfig {
    /// The `kind` as written in TOML.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::OpenAi(_) => "openai",
            Self::Scripted(_) => "scripted",
        }
    }
}

fn default_timeout_ms() -> u64 {
    60_000
}

/// An OpenAI-compatible provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenAiConfig {
    /// The API root, up to and including the version (`https://api.openai.com/v1`,
    /// `http://localhost:11434/v1`); requests go to `{base_url}/chat/completions`.
    pub base_url: String,
    /// The API key, sent as `Authorization: Bearer`. Prefer `api_key_env` in files.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key: Option<ApiKey>,
    /// The environment variable holding the API key, read by [`ModelsConfig::with_env`] when
    /// `api_key` is not set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_env: Option<String>,
    /// Per-request timeout; for streams, the longest wait for the headers and between two
    /// events.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

impl OpenAiConfig {
    /// A provider at `base_url` with no key and the default timeout.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            api_key: None,
            api_key_env: None,
            timeout_ms: default_timeout_ms(),
        }
    }

    /// The per-request timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

/// An API key. Its `Debug` output is redacted so that it never reaches a log.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct ApiKey(String);

impl ApiKey {
    /// Wraps a key.
    pub fn new(key: impl Into<String>) -> Self {
        Self(key.into())
    }

    /// The key itself, for the `Authorization` header.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

// Serialized redacted too: a configuration printed for a person must not carry the secret.
impl Serialize for ApiKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("***")
    }
}

/// The scripted provider's rules, tried in order; the first that matches answers.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedConfig {
    /// The rules.
    #[serde(default)]
    pub rules: Vec<ScriptRule>,
}

fn default_true() -> bool {
    true
}

/// One scripted behaviour. Every condition given must hold for the rule to match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptRule {
    /// Only for calls made by this agent role.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Only for calls asking for this model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Only when the last user message contains this text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub contains: Option<String>,
    /// The reply. `{input}` is replaced by the last user message, `{agent}` and `{model}` by
    /// the caller's role and the model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// Tool calls to return.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ScriptedToolCall>,
    /// Fail with this message instead of replying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail: Option<String>,
    /// Whether the failure is retryable (like a 5xx) or not (like a 4xx). Default true.
    #[serde(default = "default_true")]
    pub retryable: bool,
    /// Match only the first `times` matching calls, then stand aside (for retry and fallback
    /// tests: "fail twice, then answer").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,
}

/// A tool call returned by a scripted rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScriptedToolCall {
    /// The tool's name.
    pub name: String,
    /// The arguments (a TOML table becomes a JSON object).
    #[serde(default = "empty_object")]
    pub arguments: Value,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

/// An agent role: what the model is told, which models serve it, what it may use.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRole {
    /// The role's name (its key in `[agents]`).
    #[serde(skip_deserializing)]
    pub name: String,
    /// What the role is for, for people.
    #[serde(default)]
    pub description: String,
    /// The system prompt put before every conversation of this role.
    #[serde(default)]
    pub system_prompt: String,
    /// The models to try, in order: the primary, then fallbacks.
    pub route: Vec<ModelRoute>,
    /// Names of the tools the role may call; the caller resolves them to specifications.
    #[serde(default)]
    pub tools: Vec<String>,
    /// A JSON schema the role's replies must follow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_schema: Option<Value>,
    /// Sampling temperature.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// Upper bound on generated tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Keep this route when the environment reroutes every agent (`STELE_MODEL_PROVIDER`):
    /// for roles that must stay offline, like `noop`, which benchmarks use.
    #[serde(default)]
    pub pinned: bool,
}

/// One entry of a route: a model at a provider. In TOML either `"provider/model"` (split at
/// the first `/`, so `"openai/meta-llama/Llama-3-8B"` works) or
/// `{ provider = "…", model = "…" }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelRoute {
    /// The provider's name.
    pub provider: String,
    /// The model name at that provider.
    pub model: String,
}

impl ModelRoute {
    /// A route entry.
    pub fn new(provider: impl Into<String>, model: impl Into<String>) -> Self {
        Self {
            provider: provider.into(),
            model: model.into(),
        }
    }
}

impl fmt::Display for ModelRoute {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.provider, self.model)
    }
}

impl std::str::FromStr for ModelRoute {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text.split_once('/') {
            Some((provider, model)) if !provider.is_empty() && !model.is_empty() => {
                Ok(Self::new(provider, model))
            }
            _ => Err(format!(
                "route entry `{text}` is not of the form \"provider/model\""
            )),
        }
    }
}

impl<'de> Deserialize<'de> for ModelRoute {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            provider: String,
            model: String,
        }

        struct RouteVisitor;

        impl<'de> Visitor<'de> for RouteVisitor {
            type Value = ModelRoute;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"provider/model\" or { provider = \"…\", model = \"…\" }")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<ModelRoute, E> {
                text.parse().map_err(E::custom)
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ModelRoute, A::Error> {
                let table = Table::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(ModelRoute::new(table.provider, table.model))
            }
        }

        deserializer.deserialize_any(RouteVisitor)
    }
}

/// Retries of retryable errors at one provider, with exponential backoff and jitter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries after the first attempt (so `max_retries + 1` attempts per provider).
    pub max_retries: u32,
    /// Delay before the first retry; doubled for each further one.
    pub base_delay_ms: u64,
    /// Upper bound of the backoff delay.
    pub max_delay_ms: u64,
    /// Upper bound of a wait asked for by `Retry-After`, so a provider cannot stall a run.
    pub max_retry_after_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 2,
            base_delay_ms: 200,
            max_delay_ms: 5_000,
            max_retry_after_ms: 30_000,
        }
    }
}

impl RetryConfig {
    /// The wait before retry number `retry` (1 for the first retry).
    ///
    /// The backoff is `base · 2^(retry-1)`, capped at `max_delay`, then scaled into
    /// `[backoff/2, backoff]` by `jitter` (in `0..=1`, random in production) so that callers
    /// that failed together do not retry together. A `Retry-After` from the provider, capped
    /// at `max_retry_after`, is waited at least.
    pub fn delay(&self, retry: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        let exponent = retry.saturating_sub(1).min(20);
        let backoff = self
            .base_delay_ms
            .saturating_mul(1 << exponent)
            .min(self.max_delay_ms);
        let jittered = (backoff as f64 * (0.5 + 0.5 * jitter.clamp(0.0, 1.0))) as u64;
        let asked = retry_after
            .map(|after| after.min(Duration::from_millis(self.max_retry_after_ms)))
            .unwrap_or_default();
        Duration::from_millis(jittered).max(asked)
    }
}

/// Circuit-breaker settings, the same for every provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CircuitConfig {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// How long an open circuit refuses calls before letting a trial through.
    pub cooldown_ms: u64,
}

impl Default for CircuitConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cooldown_ms: 60_000,
        }
    }
}

impl CircuitConfig {
    /// The cool-down.
    pub fn cooldown(&self) -> Duration {
        Duration::from_millis(self.cooldown_ms)
    }
}

/// The shipped configuration (`models/agents.toml`). A test parses it, so the `expect`
/// cannot fire in a released build.
impl Default for ModelsConfig {
    fn default() -> Self {
        Self::from_toml_named(DEFAULT_AGENTS_TOML, "agents.toml (shipped)")
            .expect("the shipped agents.toml is valid")
    }
}

impl ModelsConfig {
    /// Parses and validates a configuration given as text.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Self::from_toml_named(text, "models configuration")
    }

    /// Parses and validates a configuration; `origin` (a path, "defaults", …) starts every
    /// error message.
    pub fn from_toml_named(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let mut config: Self = toml::from_str(text).map_err(|error| ConfigError::Parse {
            origin: origin.to_owned(),
            message: error.to_string().trim_end().to_owned(),
        })?;
        for (name, role) in &mut config.agents {
            role.name.clone_from(name);
        }
        config.validate().map_err(|message| ConfigError::Invalid {
            origin: origin.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_named(&text, &path.display().to_string())
    }

    /// Checks what the types cannot: routes name defined providers, URLs and numbers are
    /// usable. Returns the first problem found.
    pub fn validate(&self) -> Result<(), String> {
        for (name, provider) in &self.providers {
            if let ProviderConfig::OpenAi(openai) = provider {
                let url = reqwest::Url::parse(&openai.base_url).map_err(|error| {
                    format!(
                        "provider `{name}`: base_url `{}` is not a URL ({error})",
                        openai.base_url
                    )
                })?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(format!(
                        "provider `{name}`: base_url `{}` must be http or https",
                        openai.base_url
                    ));
                }
                if openai.timeout_ms == 0 {
                    return Err(format!("provider `{name}`: timeout_ms must be above 0"));
                }
            }
        }
        for (name, role) in &self.agents {
            if role.route.is_empty() {
                return Err(format!("agent `{name}`: route is empty"));
            }
            for (index, entry) in role.route.iter().enumerate() {
                if !self.providers.contains_key(&entry.provider) {
                    return Err(format!(
                        "agent `{name}`: route entry {index} (`{entry}`) names provider `{}`, \
                         which is not defined (defined: {})",
                        entry.provider,
                        self.provider_names()
                    ));
                }
            }
            if let Some(temperature) = role.temperature {
                if !(0.0..=2.0).contains(&temperature) {
                    return Err(format!(
                        "agent `{name}`: temperature {temperature} is outside 0..=2"
                    ));
                }
            }
            if let Some(schema) = &role.output_schema {
                if !schema.is_object() {
                    return Err(format!("agent `{name}`: output_schema must be a table"));
                }
            }
        }
        if self.circuit.failure_threshold == 0 {
            return Err("circuit: failure_threshold must be at least 1".to_owned());
        }
        Ok(())
    }

    fn provider_names(&self) -> String {
        if self.providers.is_empty() {
            return "none".to_owned();
        }
        self.providers
            .keys()
            .map(|name| format!("`{name}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The configuration adjusted by the process environment: `with_env(std::env::vars())`.
    pub fn with_process_env(self) -> Result<Self, ConfigError> {
        self.with_env(std::env::vars())
    }

    /// The configuration adjusted by environment variables, given as `(name, value)` pairs so
    /// that tests need not touch the process environment. Empty values count as unset.
    ///
    /// - `STELE_PROVIDER_<NAME>_BASE_URL`, `…_API_KEY`, `…_TIMEOUT_MS` set those fields of the
    ///   OpenAI-compatible provider `<name>` (upper case, `-` written `_`).
    /// - `STELE_MODEL_PROVIDER` routes every agent (except `pinned` ones) to that one provider,
    ///   with the model `STELE_MODEL_NAME` (required for an OpenAI-compatible provider; a
    ///   scripted one defaults to the agent's name). `openai` may be named without being
    ///   configured: it is then created. `STELE_MODEL_BASE_URL`, `STELE_MODEL_API_KEY` and
    ///   `STELE_MODEL_TIMEOUT_MS` set that provider's fields; `STELE_MODEL_BASE_URL` alone
    ///   implies `STELE_MODEL_PROVIDER=openai`.
    /// - Finally, a provider with `api_key_env` and no `api_key` takes its key from that
    ///   variable.
    pub fn with_env<I, K, V>(mut self, env: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        let env: BTreeMap<String, String> = env
            .into_iter()
            .map(|(key, value)| (key.into(), value.into()))
            .filter(|(_, value)| !value.trim().is_empty())
            .collect();

        self.apply_provider_env(&env)?;
        self.apply_model_env(&env)?;

        for provider in self.providers.values_mut() {
            if let ProviderConfig::OpenAi(openai) = provider {
                if openai.api_key.is_none() {
                    if let Some(key) = openai.api_key_env.as_ref().and_then(|var| env.get(var)) {
                        openai.api_key = Some(ApiKey::new(key.clone()));
                    }
                }
            }
        }

        self.validate().map_err(|message| ConfigError::Invalid {
            origin: "models configuration after environment overrides".to_owned(),
            message,
        })?;
        Ok(self)
    }

    fn apply_provider_env(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        const FIELDS: [&str; 3] = ["_BASE_URL", "_API_KEY", "_TIMEOUT_MS"];
        for (variable, value) in env {
            let Some(rest) = variable.strip_prefix(PROVIDER_ENV_PREFIX) else {
                continue;
            };
            let Some((env_name, field)) = FIELDS
                .iter()
                .find_map(|field| rest.strip_suffix(field).map(|name| (name, *field)))
            else {
                continue;
            };
            let name = self
                .providers
                .keys()
                .find(|name| env_name_of(name) == env_name)
                .cloned()
                .ok_or_else(|| ConfigError::Env {
                    variable: variable.clone(),
                    message: format!(
                        "no provider is named like `{}` (defined: {})",
                        env_name.to_lowercase(),
                        self.provider_names()
                    ),
                })?;
            let provider = self.providers.get_mut(&name).expect("found above");
            set_openai_field(provider, &name, variable, field, value)?;
        }
        Ok(())
    }

    fn apply_model_env(&mut self, env: &BTreeMap<String, String>) -> Result<(), ConfigError> {
        let provider_name = match (
            env.get("STELE_MODEL_PROVIDER"),
            env.get("STELE_MODEL_BASE_URL"),
        ) {
            (Some(name), _) => name.clone(),
            (None, Some(_)) => "openai".to_owned(),
            (None, None) => {
                for variable in [
                    "STELE_MODEL_NAME",
                    "STELE_MODEL_API_KEY",
                    "STELE_MODEL_TIMEOUT_MS",
                ] {
                    if env.contains_key(variable) {
                        return Err(ConfigError::Env {
                            variable: variable.to_owned(),
                            message: "set without STELE_MODEL_PROVIDER or STELE_MODEL_BASE_URL"
                                .to_owned(),
                        });
                    }
                }
                return Ok(());
            }
        };

        if !self.providers.contains_key(&provider_name) {
            if provider_name != "openai" {
                return Err(ConfigError::Env {
                    variable: "STELE_MODEL_PROVIDER".to_owned(),
                    message: format!(
                        "no provider named `{provider_name}` (defined: {}; `openai` may be \
                         named without being defined)",
                        self.provider_names()
                    ),
                });
            }
            self.providers.insert(
                provider_name.clone(),
                ProviderConfig::OpenAi(OpenAiConfig::new("https://api.openai.com/v1")),
            );
        }
        let provider = self.providers.get_mut(&provider_name).expect("present");
        for (variable, field) in [
            ("STELE_MODEL_BASE_URL", "_BASE_URL"),
            ("STELE_MODEL_API_KEY", "_API_KEY"),
            ("STELE_MODEL_TIMEOUT_MS", "_TIMEOUT_MS"),
        ] {
            if let Some(value) = env.get(variable) {
                set_openai_field(provider, &provider_name, variable, field, value)?;
            }
        }

        let model = env.get("STELE_MODEL_NAME").cloned();
        if model.is_none() && matches!(provider, ProviderConfig::OpenAi(_)) {
            return Err(ConfigError::Env {
                variable: "STELE_MODEL_NAME".to_owned(),
                message: format!(
                    "required to route agents to the OpenAI-compatible provider `{provider_name}`"
                ),
            });
        }
        for role in self.agents.values_mut().filter(|role| !role.pinned) {
            let model = model.clone().unwrap_or_else(|| role.name.clone());
            role.route = vec![ModelRoute::new(provider_name.clone(), model)];
        }
        Ok(())
    }
}

/// How a provider's name appears in environment variable names.
fn env_name_of(provider: &str) -> String {
    provider
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

fn set_openai_field(
    provider: &mut ProviderConfig,
    name: &str,
    variable: &str,
    field: &str,
    value: &str,
) -> Result<(), ConfigError> {
    let ProviderConfig::OpenAi(openai) = provider else {
        return Err(ConfigError::Env {
            variable: variable.to_owned(),
            message: format!(
                "provider `{name}` is of kind `{}`, which has no base URL, key or timeout",
                provider.kind()
            ),
        });
    };
    match field {
        "_BASE_URL" => openai.base_url = value.trim().to_owned(),
        "_API_KEY" => openai.api_key = Some(ApiKey::new(value.trim())),
        "_TIMEOUT_MS" => {
            openai.timeout_ms = value.trim().parse().map_err(|_| ConfigError::Env {
                variable: variable.to_owned(),
                message: format!("`{value}` is not a whole number of milliseconds"),
            })?;
        }
        _ => unreachable!("fields are listed by the callers"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_is_capped_and_honours_retry_after() {
        let retry = RetryConfig {
            max_retries: 5,
            base_delay_ms: 100,
            max_delay_ms: 1_000,
            max_retry_after_ms: 2_000,
        };
        let ms = Duration::from_millis;
        assert_eq!(retry.delay(1, None, 1.0), ms(100));
        assert_eq!(retry.delay(1, None, 0.0), ms(50));
        assert_eq!(retry.delay(3, None, 1.0), ms(400));
        assert_eq!(retry.delay(9, None, 1.0), ms(1_000));
        assert_eq!(retry.delay(1, Some(ms(700)), 0.0), ms(700));
        assert_eq!(
            retry.delay(1, Some(Duration::from_secs(60)), 0.0),
            ms(2_000)
        );
    }

    #[test]
    fn routes_read_both_forms() {
        let config = ModelsConfig::from_toml_str(
            r#"
            [providers.local]
            kind = "openai"
            base_url = "http://localhost:11434/v1"
            [agents.a]
            route = ["local/meta-llama/Llama-3-8B", { provider = "local", model = "qwen" }]
            "#,
        )
        .unwrap();
        assert_eq!(
            config.agents["a"].route,
            vec![
                ModelRoute::new("local", "meta-llama/Llama-3-8B"),
                ModelRoute::new("local", "qwen")
            ]
        );
        assert_eq!(config.agents["a"].name, "a");
    }

    #[test]
    fn api_keys_never_show() {
        let key = ApiKey::new("sk-secret");
        assert!(!format!("{key:?}").contains("secret"));
        assert_eq!(serde_json::to_string(&key).unwrap(), "\"***\"");
    }
}

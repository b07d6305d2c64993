//! Per-key rate limiting: a token bucket per API key, kept in this process or shared through Redis.
//!
//! A bucket holds up to `burst` tokens and gains `per_second` tokens a second; each request takes
//! one, and a request that finds less than one token is refused with the time until one is there.
//!
//! - **In process** (no Redis configured): [`governor`]'s keyed limiter (GCRA, equivalent to a
//!   token bucket). Each server process then has its own budget per key: N processes allow N times
//!   the rate.
//! - **Redis** (a Redis URL configured): one bucket per key in Redis (`stele:ratelimit:<key id>`),
//!   updated by a Lua script that Redis runs atomically, so every process draws on the same budget.
//!   The script takes the time from the Redis server (`TIME`), not from the callers, so processes
//!   whose clocks disagree still share one consistent bucket. Each bucket expires once it would be
//!   full again (idle keys leave nothing behind: an absent bucket is a full one).
//!
//! **Redis failures let requests through** (fail open), with a warning and the counter
//! `stele_ratelimit_redis_errors_total`. The limiter protects capacity from a misbehaving client;
//! it is not an authorization check (authentication and scopes still apply). Refusing every
//! request while Redis is down would turn a cache outage into an API outage, a worse failure than
//! a few minutes without limits. After a failure, Redis is not asked again for
//! [`REDIS_RETRY_INTERVAL`], so an outage adds no latency to requests (no connection attempt or
//! timeout per request).

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use std::sync::Arc;

use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::Quota;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// The prefix of the Redis keys of buckets: `stele:ratelimit:<key id>`.
pub const REDIS_KEY_PREFIX: &str = "stele:ratelimit:";

/// After a Redis failure, how long requests are let through without asking Redis.
pub const REDIS_RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// How long a Redis command may take before the request is let through (fail open).
const REDIS_RESPONSE_TIMEOUT: Duration = Duration::from_millis(250);
const REDIS_CONNECTION_TIMEOUT: Duration = Duration::from_millis(500);

/// The atomic token bucket. `KEYS[1]`: the bucket; `ARGV`: rate (tokens per second), burst
/// (capacity), expiry (ms). Returns `{allowed (1 or 0), µs until a token is there (0 if allowed)}`.
///
/// The bucket is a hash `{tokens, ts}` (tokens as a float, ts in µs of server time). Numbers are
/// written with `string.format` because Lua's default conversion keeps 14 digits, too few for µs.
const TOKEN_BUCKET_LUA: &str = r#"
if redis.replicate_commands then redis.replicate_commands() end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local expiry = tonumber(ARGV[3])
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local bucket = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(bucket[1])
local ts = tonumber(bucket[2])
if tokens == nil or ts == nil then
  tokens = burst
  ts = now
end
-- A server clock that went back refills nothing (and keeps the later ts).
if now > ts then
  tokens = math.min(burst, tokens + (now - ts) * rate / 1000000)
  ts = now
end
local allowed = 0
local wait = 0
if tokens >= 1 then
  allowed = 1
  tokens = tokens - 1
else
  wait = math.ceil((1 - tokens) * 1000000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens), 'ts', string.format('%.0f', ts))
redis.call('PEXPIRE', KEYS[1], expiry)
return {allowed, wait}
"#;

/// A budget: `burst` requests at once, refilled at `per_second` requests a second.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second (may be fractional: 0.5 is one request every two seconds).
    pub per_second: f64,
    /// The bucket's capacity: how many requests may come at once after a quiet period.
    pub burst: u32,
}

impl RateLimit {
    /// The time in which one token comes back, if the limit is valid.
    fn period(&self) -> Result<Duration, RateLimitError> {
        if self.burst == 0 {
            return Err(RateLimitError::InvalidLimit(
                "burst must be at least 1".into(),
            ));
        }
        if !(self.per_second.is_finite() && self.per_second > 0.0) {
            return Err(RateLimitError::InvalidLimit(format!(
                "per_second must be a positive number, not {}",
                self.per_second
            )));
        }
        Duration::try_from_secs_f64(1.0 / self.per_second)
            .ok()
            .filter(|period| !period.is_zero())
            .ok_or_else(|| {
                RateLimitError::InvalidLimit(format!(
                    "per_second {} is out of range",
                    self.per_second
                ))
            })
    }
}

/// A refused request: retry after `retry_after` (HTTP 429 with `Retry-After`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rate limit exceeded: retry after {retry_after:?}")]
pub struct Limited {
    /// How long until the key's bucket holds a token again.
    pub retry_after: Duration,
}

/// Why a limiter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// `burst` is 0, or `per_second` is not a positive number in range.
    #[error("invalid rate limit: {0}")]
    InvalidLimit(String),
    /// The Redis URL cannot be used.
    #[error("invalid Redis URL: {0}")]
    InvalidRedisUrl(String),
}

/// Checks requests against each key's budget. See the module documentation.
pub struct RateLimiter {
    limit: RateLimit,
    backend: Backend,
}

/// The in-process limiter's view of time: Stele's injected clock (the system's, or a test's
/// that moves when told), in the form governor reads.
#[derive(Clone, Debug)]
struct LimiterClock(Arc<dyn stele_models::Clock>);

impl governor::clock::Clock for LimiterClock {
    type Instant = Instant;

    fn now(&self) -> Instant {
        self.0.now()
    }
}

type KeyedLimiter = governor::RateLimiter<
    String,
    DefaultKeyedStateStore<String>,
    LimiterClock,
    NoOpMiddleware<Instant>,
>;

enum Backend {
    Local {
        limiter: KeyedLimiter,
        clock: LimiterClock,
        checks: AtomicU64,
    },
    Redis(RedisBuckets),
}

impl RateLimiter {
    /// A limiter shared through Redis when `redis_url` is given, else in this process.
    ///
    /// With Redis, call this within a Tokio runtime: the connection is made lazily, on the first
    /// check, by a task on that runtime. An unreachable Redis is not an error here (see
    /// [`RateLimiter::redis`]).
    pub fn new(limit: RateLimit, redis_url: Option<&str>) -> Result<Self, RateLimitError> {
        match redis_url {
            Some(url) => Self::redis(limit, url),
            None => Self::in_process(limit),
        }
    }

    /// A limiter whose buckets live in this process.
    pub fn in_process(limit: RateLimit) -> Result<Self, RateLimitError> {
        Self::in_process_with_clock(limit, Arc::new(stele_models::SystemClock))
    }

    /// [`RateLimiter::in_process`] on a given clock (a [`stele_models::ManualClock`] in tests).
    pub fn in_process_with_clock(
        limit: RateLimit,
        clock: Arc<dyn stele_models::Clock>,
    ) -> Result<Self, RateLimitError> {
        let period = limit.period()?;
        let burst = NonZeroU32::new(limit.burst).expect("checked by period()");
        let quota = Quota::with_period(period)
            .expect("period is not zero")
            .allow_burst(burst);
        Ok(Self {
            limit,
            backend: Backend::Local {
                limiter: governor::RateLimiter::dashmap_with_clock(
                    quota,
                    LimiterClock(clock.clone()),
                ),
                clock: LimiterClock(clock),
                checks: AtomicU64::new(0),
            },
        })
    }

    /// A limiter whose buckets live in Redis at `url` (`redis://…` or `rediss://…`), shared by
    /// every process using it. Call within a Tokio runtime. Only a malformed URL fails here: the
    /// connection is made on the first check, and while Redis cannot be reached checks fail open.
    pub fn redis(limit: RateLimit, url: &str) -> Result<Self, RateLimitError> {
        Self::redis_with_clock(limit, url, Arc::new(stele_models::SystemClock))
    }

    /// [`RateLimiter::redis`] on a given clock, which times the pause after a failure (the
    /// buckets themselves refill on Redis's clock, shared by every process).
    pub fn redis_with_clock(
        limit: RateLimit,
        url: &str,
        clock: Arc<dyn stele_models::Clock>,
    ) -> Result<Self, RateLimitError> {
        limit.period()?;
        let client =
            redis::Client::open(url).map_err(|e| RateLimitError::InvalidRedisUrl(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(REDIS_RESPONSE_TIMEOUT))
            .set_connection_timeout(Some(REDIS_CONNECTION_TIMEOUT))
            // A failed connection is retried by the next check after REDIS_RETRY_INTERVAL, not
            // in a loop that requests would wait on.
            .set_number_of_retries(0);
        let connection = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| RateLimitError::InvalidRedisUrl(e.to_string()))?;
        // Buckets are full again after burst / rate; an expired bucket reads as a full one.
        let refill_ms = (f64::from(limit.burst) / limit.per_second * 1000.0).ceil();
        let expiry_ms = (refill_ms as u64).saturating_add(1000);
        Ok(Self {
            limit,
            backend: Backend::Redis(RedisBuckets {
                connection,
                script: redis::Script::new(TOKEN_BUCKET_LUA),
                expiry_ms,
                started: clock.now(),
                clock,
                skip_until_ms: AtomicU64::new(0),
            }),
        })
    }

    /// The budget this limiter enforces.
    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Whether the budget is shared through Redis (rather than kept per process).
    pub fn is_shared(&self) -> bool {
        matches!(self.backend, Backend::Redis(_))
    }

    /// Takes one request from `key_id`'s budget, or says how long until there is one.
    ///
    /// Call it after authentication, with the authenticated key's id: the in-process backend keeps
    /// a bucket per id it sees, so ids must come from a bounded set.
    pub async fn check(&self, key_id: &str) -> Result<(), Limited> {
        let result = match &self.backend {
            Backend::Local {
                limiter,
                clock,
                checks,
            } => {
                // Forget buckets that are full again, now and then, so memory follows active keys.
                if checks.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
                    limiter.retain_recent();
                }
                limiter
                    .check_key(&key_id.to_owned())
                    .map_err(|not_until| Limited {
                        retry_after: not_until.wait_time_from(clock.now()),
                    })
            }
            Backend::Redis(buckets) => buckets.check(key_id, self.limit).await,
        };
        if result.is_err() {
            metrics::counter!("stele_ratelimit_limited_total").increment(1);
        }
        result
    }
}

struct RedisBuckets {
    connection: ConnectionManager,
    script: redis::Script,
    expiry_ms: u64,
    started: Instant,
    clock: Arc<dyn stele_models::Clock>,
    /// Until when (ms since `started`) checks skip Redis after a failure.
    skip_until_ms: AtomicU64,
}

impl RedisBuckets {
    async fn check(&self, key_id: &str, limit: RateLimit) -> Result<(), Limited> {
        let now_ms = (self.clock.now() - self.started).as_millis() as u64;
        let skip_until = self.skip_until_ms.load(Ordering::Relaxed);
        if now_ms < skip_until {
            return Ok(());
        }
        let result: redis::RedisResult<(i64, i64)> = self
            .script
            .key(format!("{REDIS_KEY_PREFIX}{key_id}"))
            .arg(limit.per_second)
            .arg(limit.burst)
            .arg(self.expiry_ms)
            .invoke_async(&mut self.connection.clone())
            .await;
        match result {
            Ok((1, _)) => Ok(()),
            Ok((_, wait_us)) => Err(Limited {
                retry_after: Duration::from_micros(wait_us.max(1) as u64),
            }),
            Err(error) => {
                metrics::counter!("stele_ratelimit_redis_errors_total").increment(1);
                let until = now_ms + REDIS_RETRY_INTERVAL.as_millis() as u64;
                // One warning per failed attempt window, not one per request that saw it fail.
                if self
                    .skip_until_ms
                    .compare_exchange(skip_until, until, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                {
                    tracing::warn!(
                        %error,
                        retry_in = ?REDIS_RETRY_INTERVAL,
                        "rate limiting through Redis failed: letting requests through"
                    );
                }
                Ok(())
            }
        }
    }
}

//! Rate limiting in process and through the real Redis (`REDIS_URL`). Each test uses key ids of
//! its own, so tests sharing the Redis server do not draw on each other's budgets.

use std::sync::Arc;
use std::time::Duration;

use stele_api::ratelimit::{Limited, RateLimit, RateLimitError, RateLimiter, REDIS_KEY_PREFIX};

fn redis_url() -> String {
    std::env::var("REDIS_URL").expect(
        "REDIS_URL is not set: run the test suite with scripts/test (see README), \
         which provisions Redis",
    )
}

/// A key id no other test (or run) uses.
fn unique_key() -> String {
    format!("test-{:016x}", rand::random::<u64>())
}

/// A budget that does not refill during a test: one token per 100 s.
fn no_refill(burst: u32) -> RateLimit {
    RateLimit {
        per_second: 0.01,
        burst,
    }
}

fn assert_limited(result: Result<(), Limited>, at_most: Duration) -> Duration {
    let Err(Limited { retry_after }) = result else {
        panic!("expected the request to be limited");
    };
    assert!(
        retry_after > Duration::ZERO && retry_after <= at_most,
        "retry_after {retry_after:?} not in (0, {at_most:?}]"
    );
    retry_after
}

#[tokio::test]
async fn in_process_allows_the_burst_then_refuses() {
    let limiter = RateLimiter::in_process(no_refill(3)).unwrap();
    assert!(!limiter.is_shared());
    let key = unique_key();
    for _ in 0..3 {
        limiter.check(&key).await.unwrap();
    }
    assert_limited(limiter.check(&key).await, Duration::from_secs(100));
    assert_limited(limiter.check(&key).await, Duration::from_secs(100));
}

#[tokio::test]
async fn in_process_refills_over_time() {
    // One token every 50 ms, on a clock that moves when told.
    let clock = Arc::new(stele_models::ManualClock::new());
    let limiter = RateLimiter::in_process_with_clock(
        RateLimit {
            per_second: 20.0,
            burst: 2,
        },
        clock.clone(),
    )
    .unwrap();
    let key = unique_key();
    limiter.check(&key).await.unwrap();
    limiter.check(&key).await.unwrap();
    let wait = assert_limited(limiter.check(&key).await, Duration::from_millis(50));
    clock.advance(wait / 2);
    assert_limited(limiter.check(&key).await, wait / 2);
    clock.advance(wait / 2);
    limiter.check(&key).await.unwrap();
    assert_limited(limiter.check(&key).await, Duration::from_millis(50));
}

#[tokio::test]
async fn in_process_keys_have_separate_budgets() {
    let limiter = RateLimiter::in_process(no_refill(1)).unwrap();
    let (a, b) = (unique_key(), unique_key());
    limiter.check(&a).await.unwrap();
    assert_limited(limiter.check(&a).await, Duration::from_secs(100));
    limiter.check(&b).await.unwrap();
}

#[tokio::test]
async fn invalid_limits_are_refused() {
    for limit in [
        RateLimit {
            per_second: 1.0,
            burst: 0,
        },
        RateLimit {
            per_second: 0.0,
            burst: 1,
        },
        RateLimit {
            per_second: -1.0,
            burst: 1,
        },
        RateLimit {
            per_second: f64::NAN,
            burst: 1,
        },
        RateLimit {
            per_second: f64::INFINITY,
            burst: 1,
        },
        RateLimit {
            per_second: 1e-30,
            burst: 1,
        },
    ] {
        assert!(
            matches!(
                RateLimiter::in_process(limit),
                Err(RateLimitError::InvalidLimit(_))
            ),
            "{limit:?}"
        );
        assert!(
            matches!(
                RateLimiter::new(limit, Some(&redis_url())),
                Err(RateLimitError::InvalidLimit(_))
            ),
            "{limit:?}"
        );
    }
    assert!(matches!(
        RateLimiter::new(no_refill(1), Some("http://127.0.0.1:6379")),
        Err(RateLimitError::InvalidRedisUrl(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_limiters_sharing_redis_enforce_one_budget() {
    let url = redis_url();
    // Two server processes, each with its own limiter and connection.
    let a = RateLimiter::new(no_refill(4), Some(&url)).unwrap();
    let b = RateLimiter::new(no_refill(4), Some(&url)).unwrap();
    assert!(a.is_shared() && b.is_shared());
    let key = unique_key();
    for limiter in [&a, &b, &a, &b] {
        limiter.check(&key).await.unwrap();
    }
    // The budget of 4 is spent, whichever process asks.
    assert_limited(a.check(&key).await, Duration::from_secs(100));
    assert_limited(b.check(&key).await, Duration::from_secs(100));

    // Concurrent requests from both, on several threads, draw exactly the budget too.
    let (a, b) = (Arc::new(a), Arc::new(b));
    let key = unique_key();
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let limiter = if i % 2 == 0 { a.clone() } else { b.clone() };
            let key = key.clone();
            tokio::spawn(async move { limiter.check(&key).await })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        allowed += usize::from(task.await.unwrap().is_ok());
    }
    assert_eq!(allowed, 4);
}

#[tokio::test]
async fn redis_buckets_refill_over_time() {
    let limiter = RateLimiter::new(
        RateLimit {
            per_second: 20.0,
            burst: 2,
        },
        Some(&redis_url()),
    )
    .unwrap();
    let key = unique_key();
    limiter.check(&key).await.unwrap();
    limiter.check(&key).await.unwrap();
    let wait = assert_limited(limiter.check(&key).await, Duration::from_millis(50));
    // The bucket lives in Redis and refills on Redis's clock: the only clock this test cannot
    // move, so it waits the refill it was told (50 ms at most).
    tokio::time::sleep(wait).await;
    limiter.check(&key).await.unwrap();
}

#[tokio::test]
async fn redis_keys_have_separate_budgets_that_expire() {
    let url = redis_url();
    let limiter = RateLimiter::new(no_refill(1), Some(&url)).unwrap();
    let (a, b) = (unique_key(), unique_key());
    limiter.check(&a).await.unwrap();
    assert_limited(limiter.check(&a).await, Duration::from_secs(100));
    limiter.check(&b).await.unwrap();

    // The bucket expires once it would be full again (100 s for one token, plus a second).
    let mut redis = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl_ms: i64 = redis::cmd("PTTL")
        .arg(format!("{REDIS_KEY_PREFIX}{a}"))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(
        (90_000..=101_000).contains(&ttl_ms),
        "bucket expires in {ttl_ms} ms"
    );
}

#[tokio::test]
async fn an_unreachable_redis_lets_requests_through() {
    // A port nothing listens on.
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let limiter =
        RateLimiter::new(no_refill(1), Some(&format!("redis://127.0.0.1:{port}"))).unwrap();
    let key = unique_key();
    let checks = async {
        for _ in 0..5 {
            limiter.check(&key).await.unwrap();
        }
    };
    tokio::time::timeout(Duration::from_secs(5), checks)
        .await
        .expect("failing open is quick");
}

/// A Redis server of this test's own, to stop and start again.
struct OwnRedis {
    child: std::process::Child,
    port: u16,
}

impl OwnRedis {
    fn start(port: u16) -> OwnRedis {
        use std::io::{BufRead, BufReader};
        let mut child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("redis-server (scripts/test installs it)");
        // Wait for its own word that it accepts connections.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.contains("Ready to accept connections") {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "redis-server exited");
        }
        std::thread::spawn(move || {
            let mut sink = String::new();
            while out.read_line(&mut sink).unwrap_or(0) > 0 {
                sink.clear();
            }
        });
        OwnRedis { child, port }
    }

    fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Redis goes away: checks fail open at once and nothing else stops. It comes back (empty, as
/// after a restart): the shared budget is enforced again, without restarting the limiter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_limits_fail_open_while_redis_is_away_and_resume_when_it_returns() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let redis = OwnRedis::start(port);
    let clock = Arc::new(stele_models::ManualClock::new());
    let limiter = RateLimiter::redis_with_clock(
        no_refill(2),
        &format!("redis://127.0.0.1:{port}"),
        clock.clone(),
    )
    .unwrap();
    let key = unique_key();
    limiter.check(&key).await.unwrap();
    limiter.check(&key).await.unwrap();
    assert_limited(limiter.check(&key).await, Duration::from_secs(200));

    let port = redis.stop();
    let away = async {
        for _ in 0..20 {
            limiter.check(&key).await.unwrap();
            clock.advance(stele_api::ratelimit::REDIS_RETRY_INTERVAL);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), away)
        .await
        .expect("failing open is quick");

    let _redis = OwnRedis::start(port);
    // After each failure, checks skip Redis for the retry interval (moved past here); then they
    // reach it again, with a fresh bucket of 2, so a third check within its window is refused.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut allowed_since_back = 0;
    loop {
        clock.advance(stele_api::ratelimit::REDIS_RETRY_INTERVAL);
        match limiter.check(&key).await {
            Ok(()) => allowed_since_back += 1,
            Err(limited) => {
                assert!(limited.retry_after > Duration::ZERO);
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the shared limit never came back ({allowed_since_back} allowed)"
        );
        tokio::task::yield_now().await;
    }
}

//! The event-log port's conformance suite, run unchanged against PostgreSQL and SQLite.

mod support;

use support::for_each_backend;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use serde_json::json;
use stele_engine::log::{subscribe, SubscriptionOptions};
use stele_engine::queue::NewJob;
use stele_engine::store::StorePool;
use stele_engine::{
    AppendOutcome, AppendRequest, CommandMeta, EventLog, LogError, NewEvent, Position, Store,
    StreamId,
};
use uuid::Uuid;

fn event(n: u64) -> NewEvent {
    NewEvent {
        event_type: "Noted".into(),
        event_version: "1.0".into(),
        payload: json!({ "n": n }),
        metadata: CommandMeta::new("test", "test").for_event(Uuid::now_v7()),
    }
}

fn request(stream: &StreamId, expected: i64, events: usize) -> AppendRequest {
    let meta = CommandMeta::new("user:1", "test").with_trace_id("trace-1");
    AppendRequest {
        command_id: meta.command_id,
        stream: stream.clone(),
        expected_sequence: expected,
        events: (0..events)
            .map(|n| NewEvent {
                metadata: meta.for_event(Uuid::now_v7()),
                ..event(n as u64)
            })
            .collect(),
    }
}

fn appended(outcome: Result<AppendOutcome, LogError>) -> stele_engine::CommandOutcome {
    match outcome.expect("append") {
        AppendOutcome::Appended(o) => o,
        AppendOutcome::Duplicate(o) => panic!("unexpected duplicate: {o:?}"),
    }
}

/// Everything committed so far.
async fn read_everything(log: &dyn EventLog) -> Vec<stele_engine::RecordedEvent> {
    read_settled(log, Position::START, 1_000_000).await
}

async fn read_settled(
    log: &dyn EventLog,
    after: Position,
    limit: usize,
) -> Vec<stele_engine::RecordedEvent> {
    log.read_all(after, limit).await.expect("read_all")
}

/// On PostgreSQL, transactions of other programs that stay open: one in another database of the
/// same server, one in the log's own database on a table of its own. Both have written (so they
/// hold a transaction id) and stay open until [`Foreign::end`].
struct Foreign {
    open: Vec<sqlx::PgConnection>,
    admin: Option<(sqlx::PgConnection, String)>,
}

impl Foreign {
    async fn start(store: &Store) -> Foreign {
        use sqlx::{Connection, Executor};
        let StorePool::Postgres(pool) = &store.pool else {
            return Foreign {
                open: Vec::new(),
                admin: None,
            };
        };
        let url = pool.connect_options().as_ref().clone();
        let other_db = format!("stele_foreign_{}", Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect_with(&url).await.unwrap();
        admin
            .execute(format!("CREATE DATABASE {other_db}").as_str())
            .await
            .unwrap();
        let mut open = Vec::new();
        for options in [url.clone().database(&other_db), url] {
            let mut conn = sqlx::PgConnection::connect_with(&options).await.unwrap();
            conn.execute("CREATE TABLE IF NOT EXISTS foreign_app (n int)")
                .await
                .unwrap();
            conn.execute("BEGIN").await.unwrap();
            conn.execute("INSERT INTO foreign_app VALUES (1)")
                .await
                .unwrap();
            open.push(conn);
        }
        Foreign {
            open,
            admin: Some((admin, other_db)),
        }
    }

    async fn end(self) {
        use sqlx::{Connection, Executor};
        for conn in self.open {
            let _ = conn.close().await;
        }
        if let Some((mut admin, db)) = self.admin {
            let _ = admin
                .execute(format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)").as_str())
                .await;
        }
    }
}

async fn appends_and_reads_a_stream(store: &Store) {
    let log = &store.log;
    let stream = StreamId::new("note", "n-1");
    let req = request(&stream, 0, 2);
    let outcome = appended(log.append(req.clone()).await);
    assert_eq!((outcome.first_sequence, outcome.last_sequence), (1, 2));
    assert_eq!(outcome.positions.len(), 2);

    let events = log.read_stream(&stream, 0).await.unwrap();
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].sequence, 1);
    assert_eq!(events[1].sequence, 2);
    assert_eq!(events[0].payload, json!({ "n": 0 }));
    assert_eq!(events[0].metadata, req.events[0].metadata);
    assert_eq!(
        events[0].metadata.command.trace_id.as_deref(),
        Some("trace-1")
    );
    assert_eq!(events[0].position, outcome.positions[0]);
    assert_eq!(log.read_stream(&stream, 1).await.unwrap().len(), 1);
    assert!(log
        .read_stream(&StreamId::new("note", "missing"), 0)
        .await
        .unwrap()
        .is_empty());
    // The event id is UUIDv7 and unique.
    assert_eq!(events[0].metadata.event_id.get_version_num(), 7);
    assert_ne!(events[0].metadata.event_id, events[1].metadata.event_id);
}

async fn reads_the_global_log_in_order_with_limits(store: &Store) {
    let log = &store.log;
    let mut expected = Vec::new();
    for i in 0..5 {
        let outcome = appended(
            log.append(request(&StreamId::new("note", format!("s{i}")), 0, 2))
                .await,
        );
        expected.extend(outcome.positions);
    }
    let all = read_everything(log.as_ref()).await;
    assert_eq!(all.iter().map(|e| e.position).collect::<Vec<_>>(), expected);

    let first_three = read_settled(log.as_ref(), Position::START, 3).await;
    assert_eq!(first_three.len(), 3);
    let rest = read_settled(log.as_ref(), first_three[2].position, 100).await;
    assert_eq!(rest.len(), 7);
    assert_eq!(rest[0].position, expected[3]);
    let none = log.read_all(*expected.last().unwrap(), 100).await.unwrap();
    assert!(none.is_empty());
}

async fn an_unknown_position_is_an_error(store: &Store) {
    let log = &store.log;
    appended(log.append(request(&StreamId::new("note", "a"), 0, 1)).await);
    match log.read_all(Position(987_654), 10).await {
        Err(LogError::UnknownPosition(Position(987_654))) => {}
        other => panic!("expected UnknownPosition, got {other:?}"),
    }
}

async fn a_stale_append_conflicts(store: &Store) {
    let log = &store.log;
    let stream = StreamId::new("note", "c");
    appended(log.append(request(&stream, 0, 1)).await);
    match log.append(request(&stream, 0, 1)).await {
        Err(LogError::Conflict {
            stream: s,
            sequence,
        }) => {
            assert_eq!(s, stream);
            assert_eq!(sequence, 1);
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    // A conflict in the middle of a multi-event append writes none of it.
    appended(log.append(request(&stream, 1, 1)).await);
    assert!(matches!(
        log.append(request(&stream, 1, 3)).await,
        Err(LogError::Conflict { .. })
    ));
    assert_eq!(log.read_stream(&stream, 0).await.unwrap().len(), 2);
}

async fn racing_appends_one_wins(store: &Store) {
    let log = store.log.clone();
    let stream = StreamId::new("note", "race");
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let log = log.clone();
            let req = request(&stream, 0, 2);
            tokio::spawn(async move { log.append(req).await })
        })
        .collect();
    let mut wins = 0;
    for racer in racers {
        match racer.await.unwrap() {
            Ok(AppendOutcome::Appended(_)) => wins += 1,
            Err(LogError::Conflict { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(wins, 1);
    assert_eq!(log.read_stream(&stream, 0).await.unwrap().len(), 2);
}

async fn a_repeated_command_id_returns_the_first_outcome(store: &Store) {
    let log = &store.log;
    let stream = StreamId::new("note", "idem");
    let first = request(&stream, 0, 2);
    let outcome = appended(log.append(first.clone()).await);
    // Same command id, different events and expectations: nothing is appended.
    let mut again = request(&stream, 2, 1);
    again.command_id = first.command_id;
    match log.append(again).await.unwrap() {
        AppendOutcome::Duplicate(o) => assert_eq!(o, outcome),
        other => panic!("expected duplicate, got {other:?}"),
    }
    assert_eq!(log.read_stream(&stream, 0).await.unwrap().len(), 2);
    assert_eq!(
        log.command_outcome(first.command_id).await.unwrap(),
        Some(outcome)
    );
    assert_eq!(log.command_outcome(Uuid::now_v7()).await.unwrap(), None);

    // The same command submitted concurrently: one append, every caller gets that outcome.
    let twin = request(&StreamId::new("note", "twin"), 0, 1);
    let calls: Vec<_> = (0..6)
        .map(|_| {
            let log = store.log.clone();
            let twin = twin.clone();
            tokio::spawn(async move { log.append(twin).await })
        })
        .collect();
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.unwrap().unwrap());
    }
    assert_eq!(outcomes.iter().filter(|o| !o.is_duplicate()).count(), 1);
    assert!(outcomes
        .windows(2)
        .all(|w| w[0].outcome() == w[1].outcome()));
}

async fn invalid_appends_are_refused(store: &Store) {
    let log = &store.log;
    let mut empty = request(&StreamId::new("note", "x"), 0, 1);
    empty.events.clear();
    assert!(matches!(
        log.append(empty).await,
        Err(LogError::InvalidAppend(_))
    ));
    assert!(matches!(
        log.append(request(&StreamId::new("", "x"), 0, 1)).await,
        Err(LogError::InvalidAppend(_))
    ));
    assert!(matches!(
        log.append(request(&StreamId::new("note", "x"), -1, 1))
            .await,
        Err(LogError::InvalidAppend(_))
    ));
    // What one store could not keep, neither accepts: NUL in a payload, a key, a stream id; names
    // too long to index; nesting too deep to read back; sequences past the end of i64.
    let mut nul = request(&StreamId::new("note", "x"), 0, 1);
    nul.events[0].payload = json!({ "text": "a\u{0}b" });
    let mut nul_key = request(&StreamId::new("note", "x"), 0, 1);
    nul_key.events[0].payload = json!({ "a\u{0}": 1 });
    let mut deep = request(&StreamId::new("note", "x"), 0, 1);
    deep.events[0].payload = (0..200).fold(json!(1), |inner, _| json!([inner]));
    let refused = [
        nul,
        nul_key,
        deep,
        request(&StreamId::new("note", "x\u{0}"), 0, 1),
        request(&StreamId::new("note", "x".repeat(600)), 0, 1),
        request(&StreamId::new("note", "x"), i64::MAX, 1),
    ];
    for bad in refused {
        match log.append(bad.clone()).await {
            Err(LogError::InvalidAppend(why)) => assert!(!why.is_empty()),
            other => panic!("{:?}: expected a refusal, got {other:?}", bad.stream),
        }
        let mut tx = log.begin().await.unwrap();
        assert!(matches!(
            tx.append(bad).await,
            Err(LogError::InvalidAppend(_))
        ));
    }
    assert!(read_everything(log.as_ref()).await.is_empty());
}

/// Commands whose events the database itself refuses (here: a trigger that rejects one event
/// type), mixed into a burst of concurrent valid ones that share group commits: each refused
/// command fails alone, every valid one is appended.
async fn one_commands_refused_data_fails_that_command_alone(store: &Store) {
    match &store.pool {
        StorePool::Postgres(pool) => {
            sqlx::raw_sql(
                "CREATE FUNCTION poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
                   IF NEW.event_type = 'Poison' THEN \
                     RAISE EXCEPTION 'poisoned' USING ERRCODE = 'check_violation'; \
                   END IF; RETURN NEW; END $$; \
                 CREATE TRIGGER poison BEFORE INSERT ON events \
                   FOR EACH ROW EXECUTE FUNCTION poison();",
            )
            .execute(pool)
            .await
            .unwrap();
        }
        StorePool::Sqlite(pool) => {
            sqlx::raw_sql(
                "CREATE TRIGGER poison BEFORE INSERT ON events WHEN NEW.event_type = 'Poison' \
                 BEGIN SELECT RAISE(ABORT, 'poisoned'); END;",
            )
            .execute(pool)
            .await
            .unwrap();
        }
    }
    let log = store.log.clone();
    let tasks: Vec<_> = (0..120)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move {
                let mut req = request(&StreamId::new("note", format!("p{i}")), 0, 2);
                let poisoned = i % 6 == 0;
                if poisoned {
                    req.events[1].event_type = "Poison".into();
                }
                (poisoned, log.append(req).await)
            })
        })
        .collect();
    let (mut valid, mut refused) = (0, 0);
    for task in tasks {
        match task.await.unwrap() {
            (false, outcome) => {
                appended(outcome);
                valid += 1;
            }
            (true, Err(LogError::InvalidAppend(why))) => {
                assert!(why.contains("poisoned"), "{why}");
                refused += 1;
            }
            (true, other) => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert_eq!((valid, refused), (100, 20));
    let all = read_everything(log.as_ref()).await;
    assert_eq!(all.len(), 200);
    assert!(all.iter().all(|e| e.event_type != "Poison"));
}

async fn transactions_commit_or_roll_back(store: &Store) {
    let log = &store.log;
    let stream = StreamId::new("note", "tx");
    {
        let mut tx = log.begin().await.unwrap();
        appended(tx.append(request(&stream, 0, 1)).await);
        // dropped: rolled back
    }
    assert!(log.read_stream(&stream, 0).await.unwrap().is_empty());

    let mut tx = log.begin().await.unwrap();
    appended(tx.append(request(&stream, 0, 1)).await);
    // A conflict inside the transaction leaves it usable.
    assert!(matches!(
        tx.append(request(&stream, 0, 1)).await,
        Err(LogError::Conflict { .. })
    ));
    appended(
        tx.append(request(&StreamId::new("note", "tx2"), 0, 2))
            .await,
    );
    tx.commit().await.unwrap();
    assert_eq!(log.read_stream(&stream, 0).await.unwrap().len(), 1);
    assert_eq!(read_everything(log.as_ref()).await.len(), 3);
}

/// An append that starts while a transaction that appended is still open waits for it: positions
/// become visible in order, so a reader never passes the open transaction's events.
async fn the_global_log_does_not_pass_an_open_transaction(store: &Store) {
    let log = store.log.clone();
    let mut tx = log.begin().await.unwrap();
    let held = appended(
        tx.append(request(&StreamId::new("note", "held"), 0, 1))
            .await,
    );
    let later = {
        let log = log.clone();
        tokio::spawn(async move {
            log.append(request(&StreamId::new("note", "later"), 0, 1))
                .await
        })
    };
    assert!(read_everything(log.as_ref()).await.is_empty());
    tx.commit().await.unwrap();
    let later = appended(later.await.unwrap());
    let all: Vec<Position> = read_everything(log.as_ref())
        .await
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(all, vec![held.positions[0], later.positions[0]]);
    assert!(held.positions[0] < later.positions[0]);
}

/// Other programs' open transactions (another database on the server, another table of the same
/// database) hold no reader back: an append is readable as soon as it is committed.
async fn foreign_open_transactions_hold_no_reader_back(store: &Store) {
    let foreign = Foreign::start(store).await;
    let log = store.log.clone();
    let before = appended(
        log.append(request(&StreamId::new("note", "f1"), 0, 1))
            .await,
    );
    let after = appended(
        log.append(request(&StreamId::new("note", "f2"), 0, 2))
            .await,
    );
    let all: Vec<Position> = read_everything(log.as_ref())
        .await
        .iter()
        .map(|e| e.position)
        .collect();
    let mut expected = before.positions.clone();
    expected.extend(after.positions);
    assert_eq!(all, expected);
    // A subscription that waits on its notifications sees the next append at once, too.
    let options = SubscriptionOptions {
        batch_size: 10,
        poll_interval: Duration::from_secs(30),
        linger: Duration::ZERO,
    };
    let mut subscription = subscribe(log.clone(), *expected.last().unwrap(), options);
    let next = tokio::spawn(async move { subscription.next().await.unwrap() });
    let third = appended(
        log.append(request(&StreamId::new("note", "f3"), 0, 1))
            .await,
    );
    let seen = tokio::time::timeout(Duration::from_secs(10), next)
        .await
        .expect("seen while the foreign transactions are still open")
        .unwrap();
    assert_eq!(seen.position, third.positions[0]);
    foreign.end().await;
}

async fn events_are_append_only(store: &Store) {
    appended(
        store
            .log
            .append(request(&StreamId::new("note", "ro"), 0, 1))
            .await,
    );
    let statements = [
        "UPDATE events SET event_type = 'Tampered'",
        "DELETE FROM events",
    ];
    for sql in statements {
        let error = match &store.pool {
            StorePool::Postgres(pool) => sqlx::query(sql).execute(pool).await.unwrap_err(),
            StorePool::Sqlite(pool) => sqlx::query(sql).execute(pool).await.unwrap_err(),
        };
        assert!(error.to_string().contains("append-only"), "{sql}: {error}");
    }
    if let StorePool::Postgres(pool) = &store.pool {
        let error = sqlx::query("TRUNCATE events")
            .execute(pool)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("append-only"), "{error}");
    }
    assert_eq!(read_everything(store.log.as_ref()).await.len(), 1);
}

async fn a_subscription_catches_up_then_follows(store: &Store) {
    let log = store.log.clone();
    for i in 0..3 {
        appended(
            log.append(request(&StreamId::new("note", format!("old{i}")), 0, 1))
                .await,
        );
    }
    let options = SubscriptionOptions {
        batch_size: 2,
        // Long enough that only a notification can explain a prompt wake-up.
        poll_interval: Duration::from_secs(30),
        linger: Duration::ZERO,
    };
    let mut subscription = subscribe(log.clone(), Position::START, options);
    for _ in 0..3 {
        subscription.next().await.unwrap();
    }
    let reader = tokio::spawn(async move {
        let mut seen = Vec::new();
        for _ in 0..4 {
            seen.push(subscription.next().await.unwrap().stream.aggregate_id);
        }
        seen
    });
    for i in 0..4 {
        appended(
            log.append(request(&StreamId::new("note", format!("new{i}")), 0, 1))
                .await,
        );
    }
    let seen = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("woken by appends, not by polling")
        .unwrap();
    assert_eq!(seen, vec!["new0", "new1", "new2", "new3"]);
}

/// A lingering subscription reads at once after a quiet moment, then no sooner than its linger
/// after a read that reached the head: appends meanwhile are all in its next read, none lost.
async fn a_lingering_subscription_reads_at_most_once_per_linger(store: &Store) {
    let log = store.log.clone();
    let options = SubscriptionOptions {
        batch_size: 100,
        poll_interval: Duration::from_secs(30),
        linger: Duration::from_millis(300),
    };
    let mut subscription = subscribe(log.clone(), Position::START, options);
    appended(
        log.append(request(&StreamId::new("note", "l0"), 0, 1))
            .await,
    );
    let started = std::time::Instant::now();
    let first = subscription.next().await.unwrap();
    assert_eq!(first.stream.aggregate_id, "l0");
    let first_read = started.elapsed();
    for i in 1..4 {
        appended(
            log.append(request(&StreamId::new("note", format!("l{i}")), 0, 1))
                .await,
        );
    }
    let mut seen = Vec::new();
    for _ in 1..4 {
        seen.push(subscription.next().await.unwrap().stream.aggregate_id);
    }
    assert_eq!(seen, ["l1", "l2", "l3"]);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the next read waited for the linger ({:?} after the first, read in {first_read:?})",
        started.elapsed()
    );
}

async fn concurrent_appends_are_all_recorded(store: &Store) {
    let log = store.log.clone();
    let tasks: Vec<_> = (0..64)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move {
                let stream = StreamId::new("note", format!("c{i}"));
                let mut outcomes = Vec::new();
                for seq in 0..5 {
                    outcomes.push(appended(log.append(request(&stream, seq, 1)).await));
                }
                outcomes
            })
        })
        .collect();
    let mut positions = HashSet::new();
    for task in tasks {
        for outcome in task.await.unwrap() {
            assert!(positions.insert(outcome.positions[0]));
        }
    }
    let all = read_everything(log.as_ref()).await;
    assert_eq!(all.len(), 320);
    assert_eq!(
        all.iter().map(|e| e.position).collect::<HashSet<_>>(),
        positions
    );
}

for_each_backend!(
    appends_and_reads_a_stream,
    reads_the_global_log_in_order_with_limits,
    an_unknown_position_is_an_error,
    a_stale_append_conflicts,
    racing_appends_one_wins,
    a_repeated_command_id_returns_the_first_outcome,
    invalid_appends_are_refused,
    one_commands_refused_data_fails_that_command_alone,
    transactions_commit_or_roll_back,
    the_global_log_does_not_pass_an_open_transaction,
    foreign_open_transactions_hold_no_reader_back,
    events_are_append_only,
    a_subscription_catches_up_then_follows,
    a_lingering_subscription_reads_at_most_once_per_linger,
    concurrent_appends_are_all_recorded,
);

/// One generated scenario: several appending processes with concurrent writers each, one
/// transaction held open while they start, and (on PostgreSQL) other programs' transactions open
/// throughout.
#[derive(Debug, Clone)]
struct Scenario {
    /// Stores opened on the same database, each with its own pool and group committer, as
    /// separate processes would (PostgreSQL; the embedded store has one process).
    processes: usize,
    writers: usize,
    appends_per_writer: usize,
    events_per_append: usize,
    held_events: usize,
}

fn scenarios() -> impl Strategy<Value = Scenario> {
    (1usize..4, 2usize..8, 1usize..12, 1usize..4, 1usize..4).prop_map(
        |(processes, writers, appends_per_writer, events_per_append, held_events)| Scenario {
            processes,
            writers,
            appends_per_writer,
            events_per_append,
            held_events,
        },
    )
}

/// Runs a scenario; checks that a live subscriber sees every committed event exactly once, each
/// stream in sequence order, in the order a later read from the start gives.
async fn check_scenario(stores: &[Store], scenario: Scenario) {
    let logs: Vec<Arc<dyn EventLog>> = stores.iter().map(|s| s.log.clone()).collect();
    let log = logs[0].clone();
    let case = Uuid::new_v4().simple().to_string();
    let start = read_everything(log.as_ref())
        .await
        .last()
        .map_or(Position::START, |e| e.position);
    let total = scenario.writers * scenario.appends_per_writer * scenario.events_per_append
        + scenario.held_events;

    let reader = {
        let log = log.clone();
        let case = case.clone();
        let options = SubscriptionOptions {
            batch_size: 7,
            poll_interval: Duration::from_millis(500),
            linger: Duration::ZERO,
        };
        tokio::spawn(async move {
            let mut subscription = subscribe(log, start, options);
            let mut seen = Vec::new();
            while seen.len() < total {
                let event = subscription.next().await.unwrap();
                assert_eq!(event.stream.aggregate_type, case, "only this case writes");
                seen.push(event);
            }
            seen
        })
    };

    let processes = scenario.processes.min(logs.len());
    let mut tx = logs[processes - 1].begin().await.unwrap();
    // Events and jobs in one transaction, as process managers and step handlers write them.
    stores[processes - 1]
        .queue
        .enqueue_in(
            tx.as_mut(),
            vec![NewJob::new("held", "held", json!({ "case": case }))],
        )
        .await
        .unwrap();
    let held = appended(
        tx.append(request(
            &StreamId::new(case.clone(), "held"),
            0,
            scenario.held_events,
        ))
        .await,
    );
    let writers: Vec<_> = (0..scenario.writers)
        .map(|w| {
            let (log, case) = (logs[w % processes].clone(), case.clone());
            let scenario = scenario.clone();
            tokio::spawn(async move {
                let stream = StreamId::new(case, format!("w{w}"));
                let mut positions = Vec::new();
                for i in 0..scenario.appends_per_writer {
                    let expected = (i * scenario.events_per_append) as i64;
                    let outcome = appended(
                        log.append(request(&stream, expected, scenario.events_per_append))
                            .await,
                    );
                    positions.extend(outcome.positions);
                }
                positions
            })
        })
        .collect();
    tokio::task::yield_now().await;
    tx.commit().await.unwrap();

    let mut committed_positions: HashSet<Position> = held.positions.iter().copied().collect();
    for writer in writers {
        committed_positions.extend(writer.await.unwrap());
    }
    let seen = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .expect("the subscriber sees every event")
        .unwrap();

    let seen_positions: Vec<Position> = seen.iter().map(|e| e.position).collect();
    let unique: HashSet<Position> = seen_positions.iter().copied().collect();
    assert_eq!(unique.len(), seen.len(), "no event twice");
    assert_eq!(unique, committed_positions, "every committed event");
    assert!(
        seen_positions.windows(2).all(|w| w[0] < w[1]),
        "positions increase along the log"
    );
    let mut last_sequence: HashMap<String, i64> = HashMap::new();
    for event in &seen {
        let last = last_sequence
            .entry(event.stream.aggregate_id.clone())
            .or_default();
        assert_eq!(event.sequence, *last + 1, "stream order");
        *last = event.sequence;
    }
    // A re-read from the start of the case gives the same order (the order is stable).
    let again: Vec<Position> = read_settled(log.as_ref(), start, total + 10)
        .await
        .iter()
        .map(|e| e.position)
        .collect();
    assert_eq!(again, seen_positions);
}

fn property(kind: support::Kind) {
    let runtime = support::runtime();
    let (db, stores, foreign) = runtime.block_on(async {
        let db = support::test_db(kind).await;
        let first = db.open().await;
        let mut stores = vec![first];
        if matches!(kind, support::Kind::Postgres) {
            for _ in 1..3 {
                stores.push(db.open().await);
            }
        }
        let foreign = Foreign::start(&stores[0]).await;
        (db, stores, foreign)
    });
    let config = ProptestConfig {
        cases: 12,
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(scenario in scenarios())| {
        runtime.block_on(check_scenario(&stores, scenario));
    });
    runtime.block_on(async {
        foreign.end().await;
        for store in stores {
            store.close().await;
        }
    });
    drop(db);
}

#[test]
fn property_subscriber_sees_every_event_once_in_order_postgres() {
    property(support::Kind::Postgres);
}

#[test]
fn property_subscriber_sees_every_event_once_in_order_sqlite() {
    property(support::Kind::Sqlite);
}

//! The job-queue port's conformance suite, run unchanged against PostgreSQL and SQLite.

mod support;

use support::for_each_backend;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde_json::json;
use stele_engine::queue::{Enqueued, JobFilter, JobQueue, JobState, NewJob, Outcome, QueueError};
use stele_engine::store::StorePool;
use stele_engine::{AppendRequest, CommandMeta, NewEvent, Store, StreamId};
use uuid::Uuid;

const LEASE: Duration = Duration::from_secs(30);

fn job(kind: &str) -> NewJob {
    NewJob::new("default", kind, json!({ "kind": kind }))
}

/// A new stream's first event.
fn created(stream: StreamId) -> AppendRequest {
    let meta = CommandMeta::new("user:1", "test");
    AppendRequest {
        command_id: meta.command_id,
        stream,
        expected_sequence: 0,
        events: vec![NewEvent {
            event_type: "TaskCreated".into(),
            event_version: "1.0".into(),
            payload: json!({}),
            metadata: meta.for_event(Uuid::now_v7()),
        }],
    }
}

async fn enqueue_one(queue: &dyn JobQueue, new: NewJob) -> Uuid {
    match queue.enqueue(vec![new]).await.unwrap().pop().unwrap() {
        Enqueued::Inserted(job) => job.id,
        Enqueued::Existing(job) => panic!("unexpected existing job {}", job.id),
    }
}

async fn claim_ids(queue: &dyn JobQueue, worker: &str, limit: usize) -> Vec<Uuid> {
    queue
        .claim("default", worker, limit, LEASE)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect()
}

/// Moves a job's run time to now, standing in for the passing of its backoff.
async fn make_due(store: &Store, id: Uuid) {
    match &store.pool {
        StorePool::Postgres(pool) => {
            sqlx::query("UPDATE jobs SET run_at = now() WHERE id = $1")
                .bind(id)
                .execute(pool)
                .await
                .unwrap();
        }
        StorePool::Sqlite(pool) => {
            sqlx::query("UPDATE jobs SET run_at = ? WHERE id = ?")
                .bind(Utc::now().timestamp_micros())
                .bind(id.to_string())
                .execute(pool)
                .await
                .unwrap();
        }
    }
}

async fn jobs_are_claimed_by_priority_then_age(store: &Store) {
    let queue = store.queue.as_ref();
    let low = enqueue_one(queue, job("a")).await;
    let high = enqueue_one(queue, job("b").priority(5)).await;
    let low2 = enqueue_one(queue, job("c")).await;
    let other_queue = NewJob::new("elsewhere", "x", json!({}));
    enqueue_one(queue, other_queue).await;

    let claimed = queue.claim("default", "w1", 2, LEASE).await.unwrap();
    assert_eq!(
        claimed.iter().map(|j| j.id).collect::<Vec<_>>(),
        vec![high, low]
    );
    for job in &claimed {
        assert_eq!(job.state, JobState::Running);
        assert_eq!(job.attempt, 1);
        assert_eq!(job.locked_by.as_deref(), Some("w1"));
        assert!(job.lease_expires_at.unwrap() > Utc::now());
    }
    assert_eq!(claim_ids(queue, "w2", 10).await, vec![low2]);
    assert!(claim_ids(queue, "w2", 10).await.is_empty());
    let stored = queue.get(high).await.unwrap().unwrap();
    assert_eq!(stored.payload, json!({ "kind": "b" }));
}

async fn delayed_jobs_wait_for_their_time(store: &Store) {
    let queue = store.queue.as_ref();
    let later = enqueue_one(
        queue,
        job("later").run_at(Utc::now() + chrono::Duration::hours(1)),
    )
    .await;
    assert!(claim_ids(queue, "w", 10).await.is_empty());
    make_due(store, later).await;
    assert_eq!(claim_ids(queue, "w", 10).await, vec![later]);
}

async fn an_idempotency_key_returns_the_unfinished_job(store: &Store) {
    let queue = store.queue.as_ref();
    let first = enqueue_one(queue, job("send").idempotency_key("reply-1")).await;
    let again = queue
        .enqueue(vec![
            job("send").idempotency_key("reply-1"),
            job("send").idempotency_key("reply-1"),
        ])
        .await
        .unwrap();
    assert!(again
        .iter()
        .all(|e| matches!(e, Enqueued::Existing(j) if j.id == first)));
    // Once it finished, the key may be used again.
    assert_eq!(claim_ids(queue, "w", 10).await, vec![first]);
    queue
        .finish("w", vec![(first, Outcome::Completed)])
        .await
        .unwrap();
    let next = enqueue_one(queue, job("send").idempotency_key("reply-1")).await;
    assert_ne!(next, first);
}

async fn jobs_enqueued_in_a_transaction_exist_only_if_it_commits(store: &Store) {
    let queue = store.queue.as_ref();
    let request = |id: &str| created(StreamId::new("task", id));
    {
        let mut tx = store.log.begin().await.unwrap();
        tx.append(request("rolled-back")).await.unwrap();
        queue
            .enqueue_in(tx.as_mut(), vec![job("step")])
            .await
            .unwrap();
        // dropped without commit
    }
    assert!(claim_ids(queue, "w", 10).await.is_empty());

    let mut tx = store.log.begin().await.unwrap();
    tx.append(request("committed")).await.unwrap();
    let enqueued = queue
        .enqueue_in(tx.as_mut(), vec![job("step")])
        .await
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(claim_ids(queue, "w", 10).await, vec![enqueued[0].job().id]);
    assert_eq!(
        store
            .log
            .read_stream(&StreamId::new("task", "committed"), 0)
            .await
            .unwrap()
            .len(),
        1
    );
}

async fn jobs_with_one_ordering_key_run_one_at_a_time_in_order(store: &Store) {
    let queue = store.queue.as_ref();
    let a1 = enqueue_one(queue, job("m").ordering_key("chat-1")).await;
    let a2 = enqueue_one(queue, job("m").ordering_key("chat-1").priority(9)).await;
    let a3 = enqueue_one(queue, job("m").ordering_key("chat-1")).await;
    let b1 = enqueue_one(queue, job("m").ordering_key("chat-2")).await;

    let first: HashSet<Uuid> = claim_ids(queue, "w", 10).await.into_iter().collect();
    assert_eq!(first, HashSet::from([a1, b1]));
    assert!(
        claim_ids(queue, "w", 10).await.is_empty(),
        "a2 waits for a1"
    );
    queue
        .finish("w", vec![(a1, Outcome::Completed)])
        .await
        .unwrap();
    assert_eq!(claim_ids(queue, "w", 10).await, vec![a2]);
    // A failed head keeps the order: a3 waits for a2's retry.
    queue
        .finish(
            "w",
            vec![(
                a2,
                Outcome::Failed {
                    error: "boom".into(),
                },
            )],
        )
        .await
        .unwrap();
    make_due(store, a2).await;
    assert_eq!(claim_ids(queue, "w", 10).await, vec![a2]);
    queue
        .finish("w", vec![(a2, Outcome::Completed)])
        .await
        .unwrap();
    assert_eq!(claim_ids(queue, "w", 10).await, vec![a3]);
}

/// A chat's backlog: the jobs queued behind the first of their key do not hide a runnable job
/// queued after all of them, however many there are, and they run in order as each finishes.
async fn a_backlog_behind_one_key_hides_no_runnable_job(store: &Store) {
    let queue = store.queue.as_ref();
    let mut busy = Vec::new();
    for i in 0..100 {
        busy.push(enqueue_one(queue, job(&format!("busy-{i}")).ordering_key("busy")).await);
    }
    let quiet = enqueue_one(queue, job("quiet").ordering_key("quiet")).await;
    let first: HashSet<Uuid> = claim_ids(queue, "w", 2).await.into_iter().collect();
    assert_eq!(first, HashSet::from([busy[0], quiet]));
    assert!(claim_ids(queue, "w", 10).await.is_empty());
    for (i, &id) in busy.iter().enumerate() {
        if i > 0 {
            assert_eq!(claim_ids(queue, "w", 10).await, vec![id], "busy-{i} next");
        }
        assert!(claim_ids(queue, "w", 10).await.is_empty());
        queue
            .finish("w", vec![(id, Outcome::Completed)])
            .await
            .unwrap();
    }
    assert!(claim_ids(queue, "w", 10).await.is_empty());
}

/// A job right behind a running one of its key (checked by every claim, see the PostgreSQL
/// queue) does not stop a claim for one job short of a runnable job after it.
async fn a_job_behind_a_running_one_hides_no_runnable_job(store: &Store) {
    let queue = store.queue.as_ref();
    let head = enqueue_one(queue, job("head").ordering_key("k")).await;
    enqueue_one(queue, job("behind").ordering_key("k")).await;
    let other = enqueue_one(queue, job("other").ordering_key("other")).await;
    assert_eq!(claim_ids(queue, "w", 1).await, vec![head]);
    assert_eq!(claim_ids(queue, "w", 1).await, vec![other]);
    assert!(claim_ids(queue, "w", 1).await.is_empty());
}

/// However a job of a key ends — completed, dead after its last attempt, given up by its
/// handler, cancelled while running, cancelled by its idempotency key, rescued dead after its
/// worker stopped — the next job of its key can be claimed at once, also when a claim marked it
/// waiting (on PostgreSQL: the third job of a key, behind the second while that was available).
async fn every_way_a_job_ends_lets_the_next_of_its_key_run(store: &Store) {
    let queue = store.queue.as_ref();
    let ways = [
        "completed",
        "dead",
        "given-up",
        "cancelled",
        "cancelled-by-key",
        "rescued",
    ];
    let (mut firsts, mut seconds, mut thirds) = (Vec::new(), Vec::new(), Vec::new());
    for way in ways {
        firsts.push(enqueue_one(queue, job(way).ordering_key(way)).await);
        let second = job(way)
            .ordering_key(way)
            .max_attempts(1)
            .idempotency_key(format!("{way}:second"));
        seconds.push(enqueue_one(queue, second).await);
        thirds.push(enqueue_one(queue, job(way).ordering_key(way)).await);
    }
    let claimed: HashSet<Uuid> = claim_ids(queue, "w", 100).await.into_iter().collect();
    assert_eq!(claimed, firsts.iter().copied().collect::<HashSet<_>>());
    let done = firsts.iter().map(|&id| (id, Outcome::Completed)).collect();
    queue.finish("w", done).await.unwrap();
    // The seconds, the rescued one's on a lease that has run out already.
    let rescued = *seconds.last().unwrap();
    let mut claimed: HashSet<Uuid> = claim_ids(queue, "w", seconds.len() - 1)
        .await
        .into_iter()
        .collect();
    claimed.extend(
        queue
            .claim("default", "dying", 10, Duration::ZERO)
            .await
            .unwrap()
            .iter()
            .map(|j| j.id),
    );
    assert_eq!(claimed, seconds.iter().copied().collect::<HashSet<_>>());
    let failed = Outcome::Failed {
        error: "boom".into(),
    };
    let given_up = Outcome::Cancelled {
        reason: "no".into(),
    };
    queue
        .finish(
            "w",
            vec![
                (seconds[0], Outcome::Completed),
                (seconds[1], failed),
                (seconds[2], given_up),
            ],
        )
        .await
        .unwrap();
    queue.cancel(seconds[3]).await.unwrap();
    queue
        .cancel_keyed(&["cancelled-by-key:second".to_owned()])
        .await
        .unwrap();
    assert_eq!(
        queue.get(seconds[1]).await.unwrap().unwrap().state,
        JobState::Dead
    );
    // Before the rescue (which also clears stray marks), every other third can run.
    let released: HashSet<Uuid> = claim_ids(queue, "w", 100).await.into_iter().collect();
    let rescued_third = thirds.pop().unwrap();
    assert_eq!(released, thirds.into_iter().collect::<HashSet<_>>());
    assert_eq!(queue.rescue_expired().await.unwrap(), 1);
    assert_eq!(
        queue.get(rescued).await.unwrap().unwrap().state,
        JobState::Dead
    );
    assert_eq!(claim_ids(queue, "w", 10).await, vec![rescued_third]);
}

/// Workers claiming and finishing jobs of a few keys while more are enqueued: every job runs,
/// promptly (no finished job leaves the next of its key waiting), each key's in order.
async fn concurrent_claims_keep_each_key_in_order_and_leave_none_behind(store: &Store) {
    const KEYS: usize = 8;
    const PER_KEY: usize = 40;
    let queue = store.queue.clone();
    let producer = {
        let queue = queue.clone();
        tokio::spawn(async move {
            for round in 0..PER_KEY {
                let jobs = (0..KEYS)
                    .map(|key| {
                        NewJob::new("default", "m", json!({ "key": key, "n": round }))
                            .ordering_key(format!("key-{key}"))
                    })
                    .collect();
                queue.enqueue(jobs).await.unwrap();
                tokio::task::yield_now().await;
            }
        })
    };
    let ran = Arc::new(std::sync::Mutex::new(vec![Vec::new(); KEYS]));
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (queue, ran) = (queue.clone(), ran.clone());
            tokio::spawn(async move {
                let worker = format!("w{w}");
                let mut wakeups = queue.wakeups_of("default");
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                loop {
                    let done: usize = ran.lock().unwrap().iter().map(Vec::len).sum();
                    if done == KEYS * PER_KEY {
                        return;
                    }
                    assert!(std::time::Instant::now() < deadline, "{done} jobs ran");
                    wakeups.borrow_and_update();
                    let jobs = queue.claim("default", &worker, 3, LEASE).await.unwrap();
                    if jobs.is_empty() {
                        // Woken by an enqueue or by a finish that lets a key's next job run;
                        // bounded, as the last worker out has no one left to wake it.
                        let _ =
                            tokio::time::timeout(Duration::from_secs(1), wakeups.changed()).await;
                        continue;
                    }
                    for job in &jobs {
                        let key = job.payload["key"].as_u64().unwrap() as usize;
                        let n = job.payload["n"].as_u64().unwrap() as usize;
                        ran.lock().unwrap()[key].push(n);
                    }
                    let outcomes = jobs.iter().map(|j| (j.id, Outcome::Completed)).collect();
                    queue.finish(&worker, outcomes).await.unwrap();
                }
            })
        })
        .collect();
    producer.await.unwrap();
    for worker in workers {
        worker.await.unwrap();
    }
    let ran = ran.lock().unwrap();
    for (key, order) in ran.iter().enumerate() {
        assert_eq!(*order, (0..PER_KEY).collect::<Vec<_>>(), "key {key}");
    }
}

async fn failures_back_off_then_go_dead_with_every_error(store: &Store) {
    let queue = store.queue.as_ref();
    let id = enqueue_one(queue, job("flaky").max_attempts(2)).await;
    assert_eq!(claim_ids(queue, "w", 1).await, vec![id]);
    queue
        .finish(
            "w",
            vec![(
                id,
                Outcome::Failed {
                    error: "first".into(),
                },
            )],
        )
        .await
        .unwrap();
    let retrying = queue.get(id).await.unwrap().unwrap();
    assert_eq!(retrying.state, JobState::Available);
    assert!(retrying.run_at > Utc::now(), "backed off");
    assert_eq!(retrying.last_error.as_deref(), Some("first"));
    assert!(claim_ids(queue, "w", 1).await.is_empty());

    make_due(store, id).await;
    assert_eq!(claim_ids(queue, "w", 1).await, vec![id]);
    queue
        .finish(
            "w",
            vec![(
                id,
                Outcome::Failed {
                    error: "second".into(),
                },
            )],
        )
        .await
        .unwrap();
    let dead = queue.get(id).await.unwrap().unwrap();
    assert_eq!(dead.state, JobState::Dead);
    assert_eq!(dead.attempt, 2);
    assert!(dead.finished_at.is_some());
    let errors: Vec<(i32, &str)> = dead
        .errors
        .iter()
        .map(|e| (e.attempt, e.error.as_str()))
        .collect();
    assert_eq!(errors, vec![(1, "first"), (2, "second")]);
    let listed = queue
        .list(JobFilter {
            state: Some(JobState::Dead),
            limit: 10,
            ..JobFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(listed.iter().map(|j| j.id).collect::<Vec<_>>(), vec![id]);

    // An operator retries it: a fresh set of attempts.
    let retried = queue.retry(id).await.unwrap();
    assert_eq!((retried.state, retried.attempt), (JobState::Available, 0));
    assert_eq!(claim_ids(queue, "w", 1).await, vec![id]);
}

async fn cancel_and_its_refusals(store: &Store) {
    let queue = store.queue.as_ref();
    let waiting = enqueue_one(queue, job("x")).await;
    assert_eq!(
        queue.cancel(waiting).await.unwrap().state,
        JobState::Cancelled
    );
    assert!(matches!(
        queue.cancel(waiting).await,
        Err(QueueError::WrongState {
            state: JobState::Cancelled,
            ..
        })
    ));
    assert!(matches!(
        queue.cancel(Uuid::now_v7()).await,
        Err(QueueError::NotFound(_))
    ));
    assert!(claim_ids(queue, "w", 10).await.is_empty());

    // Cancelling a running job takes it from its worker: the worker's lease check says so.
    let running = enqueue_one(queue, job("y")).await;
    assert_eq!(claim_ids(queue, "w", 10).await, vec![running]);
    queue.cancel(running).await.unwrap();
    assert_eq!(
        queue.extend_leases("w", &[running], LEASE).await.unwrap(),
        vec![running]
    );
    // Its late outcome changes nothing.
    queue
        .finish("w", vec![(running, Outcome::Completed)])
        .await
        .unwrap();
    assert_eq!(
        queue.get(running).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
    assert!(matches!(
        queue.retry(enqueue_one(queue, job("z")).await).await,
        Err(QueueError::WrongState {
            state: JobState::Available,
            ..
        })
    ));
}

async fn jobs_are_cancelled_by_idempotency_key(store: &Store) {
    let queue = store.queue.as_ref();
    let waiting = enqueue_one(queue, job("x").idempotency_key("run:1:a:1")).await;
    let running = enqueue_one(queue, job("x").idempotency_key("run:1:b:1")).await;
    let other = enqueue_one(queue, job("x").idempotency_key("run:2:a:1")).await;
    // The oldest is claimed: one running, one waiting, both cancelled by key.
    assert_eq!(claim_ids(queue, "w", 1).await, vec![waiting]);
    let keys = ["run:1:a:1", "run:1:b:1", "run:9:z:1"].map(String::from);
    let mut cancelled: Vec<Uuid> = queue
        .cancel_keyed(&keys)
        .await
        .unwrap()
        .iter()
        .map(|j| j.id)
        .collect();
    cancelled.sort();
    let mut expected = vec![waiting, running];
    expected.sort();
    assert_eq!(cancelled, expected);
    assert_eq!(
        queue.get(other).await.unwrap().unwrap().state,
        JobState::Available
    );
    assert!(queue.cancel_keyed(&keys).await.unwrap().is_empty());
    assert!(queue.cancel_keyed(&[]).await.unwrap().is_empty());
    let mut depth = queue.depth().await.unwrap();
    depth.sort_by_key(|(queue, state, _)| (queue.clone(), state.as_str()));
    assert_eq!(
        depth,
        vec![
            ("default".to_owned(), JobState::Available, 1),
            ("default".to_owned(), JobState::Cancelled, 2),
        ]
    );
}

async fn expired_leases_are_rescued(store: &Store) {
    let queue = store.queue.as_ref();
    let id = enqueue_one(queue, job("long")).await;
    let claimed = queue
        .claim("default", "dying", 1, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(claimed[0].id, id);
    // A live worker's lease is not touched.
    let kept = enqueue_one(queue, job("kept")).await;
    assert_eq!(claim_ids(queue, "alive", 1).await, vec![kept]);

    assert_eq!(queue.rescue_expired().await.unwrap(), 1);
    let rescued = queue.get(id).await.unwrap().unwrap();
    assert_eq!(rescued.state, JobState::Available);
    assert!(rescued.last_error.unwrap().contains("lease expired"));
    // The dead worker's late lease extension learns the job is gone.
    assert_eq!(
        queue.extend_leases("dying", &[id], LEASE).await.unwrap(),
        vec![id]
    );
    assert!(queue
        .extend_leases("alive", &[kept], LEASE)
        .await
        .unwrap()
        .is_empty());
    let again = queue.claim("default", "other", 1, LEASE).await.unwrap();
    assert_eq!((again[0].id, again[0].attempt), (id, 2));
}

async fn snoozing_does_not_use_an_attempt(store: &Store) {
    let queue = store.queue.as_ref();
    let id = enqueue_one(queue, job("wait")).await;
    claim_ids(queue, "w", 1).await;
    queue
        .finish("w", vec![(id, Outcome::Snoozed { until: Utc::now() })])
        .await
        .unwrap();
    let snoozed = queue.get(id).await.unwrap().unwrap();
    assert_eq!((snoozed.state, snoozed.attempt), (JobState::Available, 0));
    // Outcomes from a worker that does not hold the job are ignored.
    claim_ids(queue, "w", 1).await;
    queue
        .finish("intruder", vec![(id, Outcome::Completed)])
        .await
        .unwrap();
    assert_eq!(
        queue.get(id).await.unwrap().unwrap().state,
        JobState::Running
    );
}

async fn finished_jobs_are_pruned(store: &Store) {
    let queue = store.queue.as_ref();
    let done = enqueue_one(queue, job("done")).await;
    let dead = enqueue_one(queue, job("dead").max_attempts(1)).await;
    let claimed = claim_ids(queue, "w", 10).await;
    assert_eq!(claimed.len(), 2);
    queue
        .finish(
            "w",
            vec![
                (done, Outcome::Completed),
                (dead, Outcome::Failed { error: "x".into() }),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        queue
            .prune(Utc::now() - chrono::Duration::hours(1))
            .await
            .unwrap(),
        0
    );
    assert_eq!(
        queue
            .prune(Utc::now() + chrono::Duration::seconds(1))
            .await
            .unwrap(),
        1
    );
    assert!(queue.get(done).await.unwrap().is_none());
    assert_eq!(
        queue.get(dead).await.unwrap().unwrap().state,
        JobState::Dead,
        "dead jobs are kept"
    );
}

async fn concurrent_claims_never_share_a_job(store: &Store) {
    let queue = store.queue.clone();
    queue
        .enqueue((0..200).map(|i| job(&format!("k{i}"))).collect())
        .await
        .unwrap();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let queue: Arc<dyn JobQueue> = queue.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let batch = claim_ids(queue.as_ref(), &format!("w{w}"), 7).await;
                    if batch.is_empty() {
                        return mine;
                    }
                    mine.extend(batch);
                }
            })
        })
        .collect();
    let mut all = Vec::new();
    for worker in workers {
        all.extend(worker.await.unwrap());
    }
    assert_eq!(all.len(), 200);
    assert_eq!(all.iter().collect::<HashSet<_>>().len(), 200);
}

async fn invalid_jobs_are_refused(store: &Store) {
    let queue = store.queue.as_ref();
    let mut no_kind = job("x");
    no_kind.kind.clear();
    assert!(matches!(
        queue.enqueue(vec![no_kind]).await,
        Err(QueueError::Invalid(_))
    ));
    let mut no_time = job("x");
    no_time.timeout = Duration::ZERO;
    assert!(matches!(
        queue.enqueue(vec![no_time]).await,
        Err(QueueError::Invalid(_))
    ));
}

async fn enqueues_wake_waiting_workers(store: &Store) {
    let queue = store.queue.clone();
    let mut wakeups = queue.wakeups();
    wakeups.borrow_and_update();
    enqueue_one(queue.as_ref(), job("ping")).await;
    tokio::time::timeout(Duration::from_secs(10), wakeups.changed())
        .await
        .expect("woken")
        .unwrap();
}

/// A worker waits on its own queue's wake-ups: an enqueue, in a transaction with an append or
/// not, wakes that queue's waiters (and on PostgreSQL, which tells queues apart, no other's).
/// Counted, not waited for: the notification listener's first connection may wake every queue
/// once (for what it may have missed), whenever it comes.
async fn a_queue_wakes_its_own_workers(store: &Store) {
    let queue = store.queue.clone();
    let (mine, other) = (queue.wakeups_of("mine"), queue.wakeups_of("other"));
    let count = |receiver: &tokio::sync::watch::Receiver<u64>| *receiver.borrow();
    let (mine_at, other_at) = (count(&mine), count(&other));
    for _ in 0..5 {
        enqueue_one(queue.as_ref(), NewJob::new("mine", "ping", json!({}))).await;
    }
    for i in 0..5 {
        let events = created(StreamId::new("note", format!("woken-{i}")));
        let jobs = vec![NewJob::new("other", "ping", json!({}))];
        store.log.append_with_jobs(events, jobs).await.unwrap();
    }
    let (woke_mine, woke_other) = (count(&mine) - mine_at, count(&other) - other_at);
    assert!(
        woke_mine >= 5,
        "woken by each of its queue's jobs: {woke_mine}"
    );
    assert!(
        woke_other >= 5,
        "woken by jobs enqueued with appends: {woke_other}"
    );
    if matches!(store.pool, StorePool::Postgres(_)) {
        assert!(
            woke_mine <= 6 && woke_other <= 6,
            "{woke_mine}, {woke_other}"
        );
    }
}

/// Queue calls given up at any moment (a caller's future dropped: a timeout, a stopped worker)
/// leave no transaction open on a pooled connection: the queue's and the log's later calls on
/// that connection would otherwise run inside it and never commit.
async fn calls_given_up_half_way_leave_no_transaction_behind(store: &Store) {
    let queue = store.queue.clone();
    for i in 0..200u64 {
        let pause = Duration::from_micros(i % 40 * 25);
        let _ = tokio::time::timeout(pause, queue.enqueue(vec![job("given-up")])).await;
        let _ = tokio::time::timeout(pause, queue.claim("default", "w", 4, LEASE)).await;
    }
    let calls = (0..16).map(|i| {
        let (queue, log) = (queue.clone(), store.log.clone());
        async move {
            queue
                .enqueue(vec![job(&format!("after-{i}"))])
                .await
                .unwrap();
            log.append(created(StreamId::new("task", format!("after-{i}"))))
                .await
                .unwrap();
        }
    });
    tokio::time::timeout(Duration::from_secs(20), futures::future::join_all(calls))
        .await
        .expect("no call waits for a transaction left open");
    // Committed: every job enqueued after is there to claim.
    let kinds: HashSet<String> = queue
        .claim("default", "after", 1_000, LEASE)
        .await
        .unwrap()
        .into_iter()
        .map(|job| job.kind)
        .collect();
    assert!(
        (0..16).all(|i| kinds.contains(&format!("after-{i}"))),
        "{kinds:?}"
    );
}

for_each_backend!(
    calls_given_up_half_way_leave_no_transaction_behind,
    jobs_are_claimed_by_priority_then_age,
    delayed_jobs_wait_for_their_time,
    an_idempotency_key_returns_the_unfinished_job,
    jobs_enqueued_in_a_transaction_exist_only_if_it_commits,
    jobs_with_one_ordering_key_run_one_at_a_time_in_order,
    a_backlog_behind_one_key_hides_no_runnable_job,
    a_job_behind_a_running_one_hides_no_runnable_job,
    every_way_a_job_ends_lets_the_next_of_its_key_run,
    concurrent_claims_keep_each_key_in_order_and_leave_none_behind,
    failures_back_off_then_go_dead_with_every_error,
    cancel_and_its_refusals,
    jobs_are_cancelled_by_idempotency_key,
    expired_leases_are_rescued,
    snoozing_does_not_use_an_attempt,
    finished_jobs_are_pruned,
    concurrent_claims_never_share_a_job,
    invalid_jobs_are_refused,
    enqueues_wake_waiting_workers,
    a_queue_wakes_its_own_workers,
);

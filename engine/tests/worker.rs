//! Workers on both backends: handlers' outcomes, panics, timeouts, the run loop, graceful
//! shutdown and cancellation of running jobs. No test sleeps to wait: they step the worker or
//! await signals from handlers.

mod support;

use support::for_each_backend;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use stele_engine::queue::worker::{Done, HandlerError, Worker, WorkerOptions};
use stele_engine::queue::{completing, Job, JobFilter, JobQueue, JobState, NewJob};
use stele_engine::{AppendRequest, CommandMeta, NewEvent, Store, StreamId};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

fn options() -> WorkerOptions {
    WorkerOptions {
        poll_interval: Duration::from_secs(30),
        ..WorkerOptions::new("default")
    }
}

async fn enqueue(queue: &dyn JobQueue, kind: &str) -> Uuid {
    queue
        .enqueue(vec![NewJob::new("default", kind, json!({}))])
        .await
        .unwrap()[0]
        .job()
        .id
}

async fn enqueue_to(queue: &dyn JobQueue, job: NewJob) -> Uuid {
    queue.enqueue(vec![job]).await.unwrap()[0].job().id
}

/// Up to 100 jobs that `filter` lets through.
async fn listed(store: &Store, filter: JobFilter) -> Vec<Job> {
    store
        .queue
        .list(JobFilter {
            limit: 100,
            ..filter
        })
        .await
        .unwrap()
}

async fn completed(store: &Store) -> Vec<Job> {
    let filter = JobFilter {
        state: Some(JobState::Completed),
        ..JobFilter::default()
    };
    listed(store, filter).await
}

async fn state(queue: &dyn JobQueue, id: Uuid) -> (JobState, Option<String>) {
    let job = queue.get(id).await.unwrap().unwrap();
    (job.state, job.last_error)
}

async fn a_step_runs_handlers_and_records_their_outcomes(store: &Store) {
    let queue = store.queue.as_ref();
    let ok = enqueue(queue, "ok").await;
    let failing = enqueue(queue, "fail").await;
    let panicking = enqueue(queue, "panic").await;
    let unknown = enqueue(queue, "unknown").await;
    let slow = queue
        .enqueue(vec![
            NewJob::new("default", "slow", json!({})).timeout(Duration::from_millis(50))
        ])
        .await
        .unwrap()[0]
        .job()
        .id;
    let worker = Worker::new(store.queue.clone(), options())
        .handle("ok", |_| async { Ok(Done::Complete) })
        .handle("fail", |_| async {
            Err(stele_engine::queue::worker::HandlerError::msg("nope"))
        })
        .handle("panic", |_| async { panic!("boom") })
        .handle("slow", |_| async {
            std::future::pending::<()>().await;
            Ok(Done::Complete)
        });
    assert_eq!(worker.step().await.unwrap(), 5);
    assert_eq!(worker.step().await.unwrap(), 0, "failed jobs back off");

    assert_eq!(state(queue, ok).await.0, JobState::Completed);
    assert_eq!(
        state(queue, failing).await,
        (JobState::Available, Some("nope".into()))
    );
    let (s, error) = state(queue, panicking).await;
    assert_eq!(s, JobState::Available);
    let error = error.unwrap();
    assert!(error.contains("handler panicked: boom"), "{error}");
    assert!(state(queue, unknown)
        .await
        .1
        .unwrap()
        .contains("no handler"));
    assert!(state(queue, slow).await.1.unwrap().contains("timed out"));
}

async fn the_run_loop_works_until_shutdown(store: &Store) {
    let (seen, mut done) = mpsc::unbounded_channel();
    let worker = Worker::new(store.queue.clone(), options()).handle("ok", move |job| {
        let seen = seen.clone();
        async move {
            seen.send(job.id).unwrap();
            Ok(Done::Complete)
        }
    });
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    // Enqueued after the worker started waiting: woken by the enqueue, not the 30 s poll.
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(enqueue(store.queue.as_ref(), "ok").await);
    }
    for _ in 0..20 {
        tokio::time::timeout(Duration::from_secs(10), done.recv())
            .await
            .expect("jobs run promptly")
            .unwrap();
    }
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    let completed = completed(store).await;
    assert_eq!(completed.len(), 20);
}

async fn shutdown_releases_jobs_that_outlive_the_grace_period(store: &Store) {
    let (started, mut running_now) = mpsc::unbounded_channel();
    let worker = Worker::new(
        store.queue.clone(),
        WorkerOptions {
            shutdown_grace: Duration::from_millis(100),
            ..options()
        },
    )
    .handle("stuck", move |_| {
        let started = started.clone();
        async move {
            started.send(()).unwrap();
            std::future::pending::<()>().await;
            Ok(Done::Complete)
        }
    });
    let id = enqueue(store.queue.as_ref(), "stuck").await;
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    running_now.recv().await.unwrap();
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    let job = store.queue.get(id).await.unwrap().unwrap();
    assert_eq!(
        (job.state, job.attempt),
        (JobState::Available, 0),
        "released, attempt not counted"
    );
}

async fn cancelling_a_running_job_stops_its_handler(store: &Store) {
    struct Dropped(Option<oneshot::Sender<()>>);
    impl Drop for Dropped {
        fn drop(&mut self) {
            if let Some(tx) = self.0.take() {
                let _ = tx.send(());
            }
        }
    }
    let (started, mut running_now) = mpsc::unbounded_channel();
    let (dropped_tx, dropped) = oneshot::channel();
    let dropped_tx = Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
    let worker = Worker::new(
        store.queue.clone(),
        WorkerOptions {
            lease: Duration::from_millis(300),
            ..options()
        },
    )
    .handle("long", move |_| {
        let started = started.clone();
        let guard = Dropped(dropped_tx.lock().unwrap().take());
        async move {
            let _guard = guard;
            started.send(()).unwrap();
            std::future::pending::<()>().await;
            Ok(Done::Complete)
        }
    });
    let id = enqueue(store.queue.as_ref(), "long").await;
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    running_now.recv().await.unwrap();
    store.queue.cancel(id).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), dropped)
        .await
        .expect("the handler is stopped at the next lease check")
        .unwrap();
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(
        store.queue.get(id).await.unwrap().unwrap().state,
        JobState::Cancelled
    );
}

/// A step's next job, enqueued with the step's append on the worker's own queue, is handed to
/// that worker already claimed: a chain of such jobs runs on the worker that ran its first, each
/// at its first attempt, while a second worker of the queue, idle all along, claims none of them.
/// A job with an ordering key, or one due later, is claimed as usual.
async fn a_job_enqueued_by_a_running_job_runs_next_on_its_worker(store: &Store) {
    const LINKS: u64 = 6;
    let (ran, mut runs) = mpsc::unbounded_channel::<Job>();
    let worker = |id: &str| {
        let (log, ran) = (store.log.clone(), ran.clone());
        Worker::new(
            store.queue.clone(),
            WorkerOptions {
                id: id.into(),
                ..options()
            },
        )
        .handle("link", move |job: Job| {
            let (log, ran) = (log.clone(), ran.clone());
            async move {
                let n = job.payload["n"].as_u64().unwrap();
                ran.send(job).unwrap();
                if n < LINKS {
                    let meta = CommandMeta::new("user:1", "test");
                    let append = AppendRequest {
                        command_id: meta.command_id,
                        stream: StreamId::new("chain", format!("link-{}", Uuid::now_v7())),
                        expected_sequence: 0,
                        events: vec![NewEvent {
                            event_type: "Linked".into(),
                            event_version: "1.0".into(),
                            payload: json!({ "n": n }),
                            metadata: meta.for_event(Uuid::now_v7()),
                        }],
                    };
                    let next = NewJob::new("default", "link", json!({ "n": n + 1 }));
                    log.append_with_jobs(append, vec![next]).await?;
                }
                Ok(Done::Complete)
            }
        })
    };
    let (first, second) = (worker("first"), worker("second"));
    let first_job = enqueue_to(
        store.queue.as_ref(),
        NewJob::new("default", "link", json!({ "n": 1 })),
    )
    .await;
    // The first worker claims the first link alone; the second starts once it runs.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
        let _ = stopped.wait_for(|stop| *stop).await;
    };
    let one = tokio::spawn(first.run(until_stopped(stopped.clone())));
    let job = runs.recv().await.unwrap();
    assert_eq!(job.id, first_job);
    let two = tokio::spawn(second.run(until_stopped(stopped.clone())));
    for n in 2..=LINKS {
        let job = tokio::time::timeout(Duration::from_secs(10), runs.recv())
            .await
            .expect("each link runs promptly")
            .unwrap();
        assert_eq!(job.payload["n"], n);
        assert_eq!(
            (job.locked_by.as_deref(), job.attempt, job.state),
            (Some("first"), 1, JobState::Running),
            "link {n} is handed to the worker that enqueued it"
        );
    }
    stop.send(true).unwrap();
    one.await.unwrap().unwrap();
    two.await.unwrap().unwrap();
    let completed = completed(store).await;
    assert_eq!(completed.len() as u64, LINKS, "every link completed once");
    assert!(completed.iter().all(|job| job.attempt == 1));

    // Not handed off: a job with an ordering key (here blocked by an older job of its key on
    // another queue), or one due later, waits for a claim that may take it.
    enqueue_to(
        store.queue.as_ref(),
        NewJob::new("elsewhere", "link", json!({})).ordering_key("k"),
    )
    .await;
    let meta = CommandMeta::new("user:1", "test");
    let jobs = vec![
        NewJob::new("default", "link", json!({})).ordering_key("k"),
        NewJob::new("default", "link", json!({}))
            .run_at(chrono::Utc::now() + chrono::Duration::hours(1)),
    ];
    let (offered, mut appended) = mpsc::unbounded_channel::<()>();
    let log = store.log.clone();
    let offer = Worker::new(store.queue.clone(), options())
        .handle("link", |_| async { Ok(Done::Complete) })
        .handle("offer", move |_| {
            let (log, jobs, meta, offered) =
                (log.clone(), jobs.clone(), meta.clone(), offered.clone());
            async move {
                let append = AppendRequest {
                    command_id: meta.command_id,
                    stream: StreamId::new("chain", "not-handed"),
                    expected_sequence: 0,
                    events: vec![NewEvent {
                        event_type: "Linked".into(),
                        event_version: "1.0".into(),
                        payload: json!({}),
                        metadata: meta.for_event(Uuid::now_v7()),
                    }],
                };
                log.append_with_jobs(append, jobs).await?;
                offered.send(()).unwrap();
                Ok(Done::Complete)
            }
        });
    enqueue(store.queue.as_ref(), "offer").await;
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(offer.run(async {
        let _ = stopped.await;
    }));
    tokio::time::timeout(Duration::from_secs(10), appended.recv())
        .await
        .expect("the offer runs")
        .unwrap();
    let links = listed(
        store,
        JobFilter {
            kind: Some("link".into()),
            ..JobFilter::default()
        },
    )
    .await;
    let waiting: Vec<_> = links
        .iter()
        .filter(|job| job.queue == "default" && job.state != JobState::Completed)
        .map(|job| job.state)
        .collect();
    assert_eq!(waiting, [JobState::Available, JobState::Available]);
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
}

/// One event on `stream`, expected at `expected_sequence`.
fn one_event(stream: &str, expected_sequence: i64) -> AppendRequest {
    let meta = CommandMeta::new("user:1", "test");
    AppendRequest {
        command_id: meta.command_id,
        stream: StreamId::new("record", stream),
        expected_sequence,
        events: vec![NewEvent {
            event_type: "Recorded".into(),
            event_version: "1.0".into(),
            payload: json!({}),
            metadata: meta.for_event(Uuid::now_v7()),
        }],
    }
}

/// A handler's last append, made under `completing`, records its job completed in the append's
/// own commit: the job is completed while the handler still runs, and the worker writes no
/// outcome after (an error returned later changes nothing). An append that does not commit (a
/// conflict) completes nothing, and the handler's outcome is written as usual. A completed job
/// with an ordering key lets the key's next job run at once.
async fn a_job_whose_last_append_commits_is_completed_by_it(store: &Store) {
    let (seen, mut states) = mpsc::unbounded_channel::<(Uuid, JobState)>();
    let (log, queue) = (store.log.clone(), store.queue.clone());
    // No rescue after the first, which would also release a job left waiting.
    let options = WorkerOptions {
        rescue_interval: Duration::from_secs(600),
        ..options()
    };
    let worker = Worker::new(store.queue.clone(), options).handle("record", move |job: Job| {
        let (log, queue, seen) = (log.clone(), queue.clone(), seen.clone());
        async move {
            let stream = job.payload["stream"].as_str().unwrap().to_owned();
            let expected = job.payload["expected"].as_i64().unwrap();
            let appended = completing(log.append(one_event(&stream, expected))).await;
            let state = queue.get(job.id).await?.unwrap().state;
            seen.send((job.id, state)).unwrap();
            match appended {
                // Too late to matter: the append completed the job.
                Ok(_) => Err(HandlerError::msg("failed after the append")),
                Err(_) => Ok(Done::Complete),
            }
        }
    });
    let record = |stream: &str, expected: i64| {
        NewJob::new(
            "default",
            "record",
            json!({ "stream": stream, "expected": expected }),
        )
    };
    let appended = enqueue_to(store.queue.as_ref(), record("a", 0)).await;
    // Stream b's first event is taken: the job's append conflicts.
    store.log.append(one_event("b", 0)).await.unwrap();
    let conflicted = enqueue_to(store.queue.as_ref(), record("b", 0)).await;
    let first = enqueue_to(store.queue.as_ref(), record("c", 0).ordering_key("k")).await;
    let second = enqueue_to(store.queue.as_ref(), record("d", 0).ordering_key("k")).await;
    let (stop, stopped) = oneshot::channel::<()>();
    let running = tokio::spawn(worker.run(async {
        let _ = stopped.await;
    }));
    let mut during = std::collections::HashMap::new();
    while during.len() < 4 {
        // The key's second job runs long before the worker's next poll (30 s).
        let (id, state) = tokio::time::timeout(Duration::from_secs(10), states.recv())
            .await
            .expect("every job runs promptly")
            .unwrap();
        during.insert(id, state);
    }
    stop.send(()).unwrap();
    running.await.unwrap().unwrap();
    assert_eq!(
        during[&appended],
        JobState::Completed,
        "completed by its append"
    );
    assert_eq!(during[&conflicted], JobState::Running, "nothing committed");
    assert_eq!(during[&first], JobState::Completed);
    for id in [appended, conflicted, first, second] {
        let job = store.queue.get(id).await.unwrap().unwrap();
        assert_eq!(
            (job.state, job.attempt, job.last_error),
            (JobState::Completed, 1, None),
            "job {id} completed once, at its first attempt"
        );
    }
}

for_each_backend!(
    a_job_enqueued_by_a_running_job_runs_next_on_its_worker,
    a_job_whose_last_append_commits_is_completed_by_it,
    a_step_runs_handlers_and_records_their_outcomes,
    the_run_loop_works_until_shutdown,
    shutdown_releases_jobs_that_outlive_the_grace_period,
    cancelling_a_running_job_stops_its_handler,
);

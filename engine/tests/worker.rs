//! Workers on both backends: handlers' outcomes, panics, timeouts, the run loop, graceful
//! shutdown and cancellation of running jobs. No test sleeps to wait: they step the worker or
//! await signals from handlers.

mod support;

use support::for_each_backend;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use stele_engine::queue::worker::{Done, Worker, WorkerOptions};
use stele_engine::queue::{JobFilter, JobQueue, JobState, NewJob};
use stele_engine::Store;
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
    let completed = store
        .queue
        .list(JobFilter {
            state: Some(JobState::Completed),
            limit: 100,
            ..JobFilter::default()
        })
        .await
        .unwrap();
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

for_each_backend!(
    a_step_runs_handlers_and_records_their_outcomes,
    the_run_loop_works_until_shutdown,
    shutdown_releases_jobs_that_outlive_the_grace_period,
    cancelling_a_running_job_stops_its_handler,
);

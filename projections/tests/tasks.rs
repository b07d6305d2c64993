//! The tasks view on both backends: built from real task and run events, listed with filters and
//! cursors, rebuilt.

use std::collections::BTreeSet;
use std::sync::Arc;

use chrono::Utc;
use serde_json::{json, Value};
use stele_aggregates::personal::Personal;
use stele_aggregates::task::{Requester, Task, TaskCommand, TaskEvent, TaskInput};
use stele_aggregates::workflow_run::RunEvent;
use stele_engine::command::new_event;
use stele_engine::for_each_backend;
use stele_engine::projection::{ProjectionRunner, Stepped};
use stele_engine::store::StorePool;
use stele_engine::{AppendRequest, CommandBus, CommandMeta, NewEvent, Store, StreamId};
use stele_projections::{
    get_task_row, list_tasks, TaskPage, TaskQuery, TaskRow, TaskViewError, TasksView, MAX_LIMIT,
};

/// Steps until the projection has read everything committed.
async fn drain(runner: &ProjectionRunner) {
    for _ in 0..10_000 {
        match runner.step("task_list").await.unwrap() {
            Stepped { read: 0 } => return,
            _ => tokio::task::yield_now().await,
        }
    }
    panic!("the tasks view did not settle");
}

async fn runner(store: &Store, batch_size: usize) -> ProjectionRunner {
    let runner =
        ProjectionRunner::new(store, vec![Arc::new(TasksView)]).with_batch_size(batch_size);
    runner.setup().await.unwrap();
    runner
}

fn bus(store: &Store) -> CommandBus<Task> {
    CommandBus::new(store.log.clone(), ())
}

async fn command(store: &Store, task_id: &str, command: TaskCommand) {
    bus(store)
        .execute(task_id, command, CommandMeta::new("user:1", "test"))
        .await
        .unwrap();
}

async fn create(store: &Store, task_id: &str, user: &str, channel: &str, workflow: Option<&str>) {
    let create = TaskCommand::Create {
        input: TaskInput::parse(format!("input of {task_id}")).unwrap(),
        requester: Requester::parse(user, channel).unwrap(),
        subject: Some(format!("subject-{user}")),
        workflow: workflow.map(str::to_owned),
        origin: None,
        models: Default::default(),
        screening: Default::default(),
        routed: None,
    };
    command(store, task_id, create).await;
}

/// Appends `event` to `stream`, after its last event.
async fn append(store: &Store, stream: StreamId, event: NewEvent, meta: &CommandMeta) {
    let version = store
        .log
        .read_stream(&stream, 0)
        .await
        .unwrap()
        .last()
        .map_or(0, |e| e.sequence);
    store
        .log
        .append(AppendRequest {
            command_id: meta.command_id,
            stream,
            expected_sequence: version,
            events: vec![event],
        })
        .await
        .unwrap();
}

/// Appends a run event to the run `run_id`, as the workflow runtime records it.
async fn run_event(store: &Store, run_id: &str, event: RunEvent) {
    let meta = CommandMeta::new("user:1", "test");
    let event = new_event(&event, &meta).unwrap();
    append(store, StreamId::new("workflow_run", run_id), event, &meta).await;
}

fn scheduled(step: &str) -> RunEvent {
    RunEvent::StepScheduled {
        step: step.into(),
        attempt: 1,
        not_before: None,
        escalation: 0,
        timeout_ms: 1000,
    }
}

async fn row(store: &Store, task_id: &str) -> TaskRow {
    get_task_row(&store.pool, task_id)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no row for {task_id}"))
}

/// What a personal value in a row holds (this store does not seal: it keeps the readable form).
fn value(stored: &Value) -> &Value {
    stored.pointer("/$personal/value").unwrap_or(stored)
}

fn text(stored: &Option<Value>) -> Option<&str> {
    stored.as_ref().and_then(|v| value(v).as_str())
}

fn ids(page: &TaskPage) -> Vec<&str> {
    page.tasks.iter().map(|t| t.task_id.as_str()).collect()
}

async fn list(store: &Store, query: TaskQuery) -> TaskPage {
    list_tasks(&store.pool, &query).await.unwrap()
}

fn query(limit: usize) -> TaskQuery {
    TaskQuery {
        limit,
        ..TaskQuery::default()
    }
}

async fn a_task_is_followed_through_its_lifecycle(store: &Store) {
    // One event per batch: every change lands on a row written by an earlier batch.
    let runner = runner(store, 1).await;
    create(store, "t1", "42", "telegram", None).await;
    drain(&runner).await;
    let created = row(store, "t1").await;
    assert_eq!(created.status, "pending");
    assert_eq!(value(&created.input), "input of t1");
    assert_eq!(
        (
            value(&created.requester)["user_id"].as_str(),
            created.requester_channel.as_str(),
            created.subject.as_deref()
        ),
        (Some("42"), "telegram", Some("subject-42"))
    );
    assert_eq!(
        (created.workflow.as_deref(), created.run_id.as_deref()),
        (None, None)
    );
    assert_eq!(created.current_step, None);
    assert_eq!(created.updated_at, created.created_at);
    assert!(created.created_position > 0);

    command(store, "t1", TaskCommand::StartRouting).await;
    drain(&runner).await;
    assert_eq!(row(store, "t1").await.status, "routing");

    let route = TaskCommand::Route {
        workflow: "research".into(),
        run_id: "t1".into(),
    };
    command(store, "t1", route).await;
    drain(&runner).await;
    let routed = row(store, "t1").await;
    assert_eq!(routed.status, "executing");
    assert_eq!(routed.workflow.as_deref(), Some("research"));
    assert_eq!(routed.run_id.as_deref(), Some("t1"));
    assert!(routed.updated_at >= created.updated_at);

    // The run's steps move the task's current step; child runs and unknown runs do not.
    let steps = [
        (scheduled("draft"), Some("draft")),
        (
            RunEvent::WaitStarted {
                step: "approve".into(),
                signal: "approval".into(),
                timeout_at: None,
            },
            Some("approve"),
        ),
        (
            RunEvent::TimerArmed {
                step: "later".into(),
                fire_at: Utc::now(),
            },
            Some("later"),
        ),
        (
            RunEvent::ChildrenStarted {
                step: "fanout".into(),
                children: Vec::new(),
            },
            Some("fanout"),
        ),
    ];
    for (event, step) in steps {
        run_event(store, "t1", event).await;
        run_event(store, "t1.fanout.0", scheduled("child-step")).await;
        run_event(store, "stranger", scheduled("elsewhere")).await;
        drain(&runner).await;
        assert_eq!(row(store, "t1").await.current_step.as_deref(), step);
    }
    assert!(get_task_row(&store.pool, "t1.fanout.0")
        .await
        .unwrap()
        .is_none());
    assert!(get_task_row(&store.pool, "stranger")
        .await
        .unwrap()
        .is_none());

    run_event(
        store,
        "t1",
        RunEvent::RunCompleted {
            output: Personal::plain(json!("done")),
        },
    )
    .await;
    drain(&runner).await;
    assert_eq!(row(store, "t1").await.current_step, None);
    let result = json!({"answer": 42, "sources": ["a", "b"]});
    command(
        store,
        "t1",
        TaskCommand::Complete {
            result: result.clone(),
        },
    )
    .await;
    drain(&runner).await;
    let completed = row(store, "t1").await;
    assert_eq!(completed.status, "completed");
    assert_eq!(completed.result.as_ref().map(value), Some(&result));
    assert_eq!(completed.error, None);
    assert_eq!(completed.created_at, created.created_at);
    assert_eq!(completed.created_position, created.created_position);

    // A failed task and a cancelled one; a run event after the end changes nothing.
    create(store, "t2", "42", "api", Some("research")).await;
    command(store, "t2", TaskCommand::StartRouting).await;
    command(
        store,
        "t2",
        TaskCommand::Fail {
            error: "no model answered".into(),
        },
    )
    .await;
    create(store, "t3", "7", "email", None).await;
    let route = TaskCommand::Route {
        workflow: "triage".into(),
        run_id: "t3".into(),
    };
    command(store, "t3", route).await;
    run_event(store, "t3", scheduled("read")).await;
    drain(&runner).await;
    assert_eq!(row(store, "t3").await.current_step.as_deref(), Some("read"));
    command(
        store,
        "t3",
        TaskCommand::Cancel {
            reason: "asked to stop".into(),
        },
    )
    .await;
    run_event(store, "t3", scheduled("late")).await;
    drain(&runner).await;
    let failed = row(store, "t2").await;
    assert_eq!(
        (failed.status.as_str(), text(&failed.error)),
        ("failed", Some("no model answered"))
    );
    assert_eq!(failed.workflow.as_deref(), Some("research"));
    let cancelled = row(store, "t3").await;
    assert_eq!(
        (cancelled.status.as_str(), text(&cancelled.error)),
        ("cancelled", Some("asked to stop"))
    );
    assert_eq!(cancelled.current_step, None);

    // A task event whose TaskCreated is missing makes no row.
    let meta = CommandMeta::new("user:1", "test");
    let orphan = new_event(&TaskEvent::TaskRoutingStarted, &meta).unwrap();
    append(store, StreamId::new("task", "ghost"), orphan, &meta).await;
    drain(&runner).await;
    assert!(get_task_row(&store.pool, "ghost").await.unwrap().is_none());

    // All in one batch: the same rows.
    let mut live = list(store, query(100)).await.tasks;
    let whole = ProjectionRunner::new(store, vec![Arc::new(TasksView)]).with_batch_size(1000);
    runner.release_all().await.unwrap();
    whole.rebuild("task_list", |_| {}).await.unwrap();
    let mut rebuilt = list(store, query(100)).await.tasks;
    live.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    rebuilt.sort_by(|a, b| a.task_id.cmp(&b.task_id));
    assert_eq!(rebuilt, live);
    assert_eq!(live.len(), 3);
}

async fn filters_select_tasks(store: &Store) {
    let runner = runner(store, 50).await;
    // (id, user, channel, workflow, routed)
    let tasks = [
        ("a", "ana", "telegram", None, false),
        ("b", "ana", "email", Some("research"), true),
        ("c", "bob", "telegram", Some("research"), false),
        ("d", "bob", "api", Some("triage"), true),
        ("e", "ana", "telegram", Some("triage"), true),
        ("f", "cid", "email", None, false),
    ];
    for (id, user, channel, workflow, routed) in tasks {
        create(store, id, user, channel, workflow).await;
        if routed {
            let route = TaskCommand::Route {
                workflow: workflow.unwrap().into(),
                run_id: id.into(),
            };
            command(store, id, route).await;
        }
    }
    command(
        store,
        "e",
        TaskCommand::Complete {
            result: json!(null),
        },
    )
    .await;
    drain(&runner).await;

    let filtered = |status: Option<&str>,
                    workflow: Option<&str>,
                    requester: Option<&str>,
                    channel: Option<&str>| TaskQuery {
        status: status.map(str::to_owned),
        workflow: workflow.map(str::to_owned),
        subject: requester.map(|user| format!("subject-{user}")),
        channel: channel.map(str::to_owned),
        limit: 50,
        ..TaskQuery::default()
    };
    let cases: [(TaskQuery, &[&str]); 10] = [
        (
            filtered(None, None, None, None),
            &["f", "e", "d", "c", "b", "a"],
        ),
        (
            filtered(Some("pending"), None, None, None),
            &["f", "c", "a"],
        ),
        (filtered(Some("executing"), None, None, None), &["d", "b"]),
        (filtered(Some("completed"), None, None, None), &["e"]),
        (filtered(Some("failed"), None, None, None), &[]),
        (filtered(None, Some("research"), None, None), &["c", "b"]),
        (filtered(None, None, Some("ana"), None), &["e", "b", "a"]),
        (
            filtered(None, None, None, Some("telegram")),
            &["e", "c", "a"],
        ),
        (
            filtered(None, Some("triage"), Some("ana"), Some("telegram")),
            &["e"],
        ),
        (
            filtered(Some("pending"), None, Some("bob"), Some("telegram")),
            &["c"],
        ),
    ];
    for (query, expected) in cases {
        let page = list(store, query.clone()).await;
        assert_eq!(ids(&page), expected, "{query:?}");
        assert_eq!(page.next_cursor, None);
    }
}

async fn pages_follow_the_cursor(store: &Store) {
    let runner = runner(store, 10).await;
    for i in 0..21 {
        let channel = if i % 3 == 0 { "email" } else { "telegram" };
        create(store, &format!("task-{i:02}"), "ana", channel, None).await;
    }
    drain(&runner).await;
    let newest_first: Vec<String> = (0..21).rev().map(|i| format!("task-{i:02}")).collect();

    // Tasks created while paging come before the first page: the pages keep their rows.
    let mut seen = Vec::new();
    let mut cursor = None;
    let mut pages = 0;
    loop {
        let page = list(
            store,
            TaskQuery {
                cursor: cursor.clone(),
                ..query(7)
            },
        )
        .await;
        pages += 1;
        assert!(page.tasks.len() <= 7);
        seen.extend(page.tasks.iter().map(|t| t.task_id.clone()));
        create(store, &format!("later-{pages}"), "ana", "email", None).await;
        drain(&runner).await;
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 3, "21 rows in pages of 7: no empty page at the end");
    assert_eq!(seen, newest_first);

    // With a filter.
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = list(
            store,
            TaskQuery {
                channel: Some("telegram".into()),
                cursor: cursor.clone(),
                ..query(4)
            },
        )
        .await;
        seen.extend(page.tasks.iter().map(|t| t.task_id.clone()));
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    let telegram: Vec<&String> = newest_first
        .iter()
        .filter(|id| id[5..].parse::<u32>().unwrap() % 3 != 0)
        .collect();
    assert_eq!(seen.iter().collect::<Vec<_>>(), telegram);
    assert_eq!(
        seen.iter().collect::<BTreeSet<_>>().len(),
        seen.len(),
        "no duplicates"
    );
}

async fn a_time_window_selects_tasks_by_creation(store: &Store) {
    let runner = runner(store, 1).await;
    for i in 0..6 {
        create(store, &format!("w-{i}"), "ana", "api", None).await;
        // Creation times come from the store's clock: apart, so the window's bounds split them.
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    drain(&runner).await;
    let all = list(store, query(50)).await;
    assert_eq!(all.tasks.len(), 6);
    let (from, to) = (all.tasks[4].created_at, all.tasks[1].created_at);
    let window = list(
        store,
        TaskQuery {
            created_after: Some(from),
            created_before: Some(to),
            ..query(50)
        },
    )
    .await;
    let expected: Vec<&str> = all
        .tasks
        .iter()
        .filter(|t| t.created_at >= from && t.created_at < to)
        .map(|t| t.task_id.as_str())
        .collect();
    assert_eq!(ids(&window), expected);
    assert_eq!(ids(&window), ["w-3", "w-2", "w-1"]);
    // Paged, the window holds: its cursor keeps the bounds.
    let first = list(
        store,
        TaskQuery {
            created_after: Some(from),
            ..query(2)
        },
    )
    .await;
    assert_eq!(ids(&first), ["w-5", "w-4"]);
    let second = list(
        store,
        TaskQuery {
            created_after: Some(from),
            cursor: first.next_cursor,
            ..query(2)
        },
    )
    .await;
    assert_eq!(ids(&second), ["w-3", "w-2"]);
    let last = list(
        store,
        TaskQuery {
            created_after: Some(from),
            cursor: second.next_cursor,
            ..query(2)
        },
    )
    .await;
    assert_eq!(ids(&last), ["w-1"]);
    assert_eq!(last.next_cursor, None);
}

async fn limits_are_clamped_and_bad_cursors_refused(store: &Store) {
    let runner = runner(store, 1000).await;
    for i in 0..=MAX_LIMIT {
        create(store, &format!("bulk-{i:03}"), "ana", "api", None).await;
    }
    drain(&runner).await;

    let one = list(store, query(0)).await;
    assert_eq!(ids(&one), ["bulk-500"]);
    let most = list(store, query(usize::MAX)).await;
    assert_eq!(most.tasks.len(), MAX_LIMIT);
    let rest = list(
        store,
        TaskQuery {
            cursor: most.next_cursor.clone(),
            ..query(MAX_LIMIT)
        },
    )
    .await;
    assert_eq!(ids(&rest), ["bulk-000"]);
    assert_eq!(rest.next_cursor, None);

    let cursor = one.next_cursor.unwrap();
    for bad in [
        String::new(),
        "nope".into(),
        "12".into(),
        "x.74".into(),
        "-3.74".into(),
        format!("{cursor}0"),
        cursor.to_uppercase() + "G",
    ] {
        let refused = list_tasks(
            &store.pool,
            &TaskQuery {
                cursor: Some(bad.clone()),
                ..query(10)
            },
        )
        .await;
        assert!(
            matches!(refused, Err(TaskViewError::InvalidCursor)),
            "{bad:?}: {refused:?}"
        );
    }
}

/// The names of the live table's own indexes (not the primary key's).
async fn indexes(pool: &StorePool) -> Vec<String> {
    match pool {
        StorePool::Postgres(pool) => sqlx::query_scalar(
            "SELECT indexname::text FROM pg_indexes \
             WHERE tablename = 'task_list' AND indexname NOT LIKE '%pkey%'",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
        StorePool::Sqlite(pool) => sqlx::query_scalar(
            "SELECT name FROM sqlite_master \
             WHERE type = 'index' AND tbl_name = 'task_list' AND sql IS NOT NULL",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
    }
}

fn index_parts(names: &[String]) -> Vec<&'static str> {
    let mut parts: Vec<&'static str> = [
        "by_position",
        "by_status",
        "by_workflow",
        "by_subject",
        "by_channel",
    ]
    .into_iter()
    .flat_map(|part| {
        names
            .iter()
            .filter(move |n| n.contains(part))
            .map(move |_| part)
    })
    .collect();
    parts.sort();
    parts
}

async fn a_rebuild_equals_the_live_view(store: &Store) {
    let runner = runner(store, 3).await;
    for i in 0..12 {
        let id = format!("r{i:02}");
        create(store, &id, ["ana", "bob"][i % 2], "telegram", None).await;
        if i % 3 > 0 {
            let route = TaskCommand::Route {
                workflow: "research".into(),
                run_id: id.clone().into(),
            };
            command(store, &id, route).await;
            run_event(store, &id, scheduled("draft")).await;
        }
        if i % 3 == 2 {
            run_event(
                store,
                &id,
                RunEvent::RunFailed {
                    error: Personal::plain("boom".into()),
                    step: Some("draft".into()),
                },
            )
            .await;
            command(
                store,
                &id,
                TaskCommand::Fail {
                    error: "boom".into(),
                },
            )
            .await;
        }
    }
    drain(&runner).await;
    let live = list(store, query(100)).await;
    assert_eq!(live.tasks.len(), 12);
    let expected_indexes = index_parts(&indexes(&store.pool).await);
    assert_eq!(
        expected_indexes,
        [
            "by_channel",
            "by_position",
            "by_status",
            "by_subject",
            "by_workflow"
        ]
    );

    // Rebuilt more than once: each swap leaves the live table with its indexes, once each.
    for _ in 0..3 {
        runner.rebuild("task_list", |_| {}).await.unwrap();
        assert_eq!(list(store, query(100)).await, live);
        runner.setup().await.unwrap();
        assert_eq!(index_parts(&indexes(&store.pool).await), expected_indexes);
    }

    // It keeps following afterwards.
    create(store, "after", "cid", "api", None).await;
    drain(&runner).await;
    let after = list(store, query(100)).await;
    assert_eq!(ids(&after)[0], "after");
    assert_eq!(after.tasks[1..], live.tasks[..]);
}

for_each_backend!(
    a_task_is_followed_through_its_lifecycle,
    filters_select_tasks,
    pages_follow_the_cursor,
    a_time_window_selects_tasks_by_creation,
    limits_are_clamped_and_bad_cursors_refused,
    a_rebuild_equals_the_live_view,
);

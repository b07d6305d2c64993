//! Property: for any sequence of task commands, the state replayed from a store that seals the
//! person's values equals the state replayed from one that keeps them plain, except the values an
//! erasure made unreadable (which read `[erased]`, with the rest of the state unchanged).

use proptest::prelude::*;
use serde_json::json;
use stele_aggregates::task::{Requester, Task, TaskCommand, TaskInput};
use stele_engine::testing::TestDb;
use stele_engine::{CommandBus, CommandMeta, Store};
use stele_privacy::{private_store, Kek, Policy, Private};

#[derive(Clone, Debug)]
enum Step {
    Route,
    StartRouting,
    Complete(String),
    Fail(String),
    Cancel(String),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        Just(Step::Route),
        Just(Step::StartRouting),
        "[a-zé ]{0,12}".prop_map(Step::Complete),
        "[a-z ]{0,12}".prop_map(Step::Fail),
        "[a-z]{1,8}".prop_map(Step::Cancel),
    ]
}

fn command(step: &Step, id: &str) -> TaskCommand {
    match step {
        Step::Route => TaskCommand::Route {
            workflow: "assistant".into(),
            run_id: id.into(),
        },
        Step::StartRouting => TaskCommand::StartRouting,
        Step::Complete(text) => TaskCommand::Complete {
            result: json!({ "text": text }),
        },
        Step::Fail(text) => TaskCommand::Fail {
            error: text.clone(),
        },
        Step::Cancel(text) => TaskCommand::Cancel {
            reason: text.clone(),
        },
    }
}

/// Runs `steps` on a new task of `subject` (none: plain), and returns the task replayed.
async fn replayed(store: &Store, subject: Option<&str>, input: &str, steps: &[Step]) -> Task {
    let bus = CommandBus::<Task>::new(store.log.clone(), ());
    let id = uuid::Uuid::now_v7().to_string();
    let create = TaskCommand::Create {
        input: TaskInput::parse(input).unwrap(),
        requester: Requester::parse("ana", "api").unwrap(),
        subject: subject.map(str::to_owned),
        workflow: None,
        origin: None,
        models: Default::default(),
        screening: Default::default(),
        routed: None,
    };
    bus.execute(&id, create, CommandMeta::new("t", "t"))
        .await
        .unwrap();
    for step in steps {
        // Refusals are part of the sequence: both stores refuse the same ones.
        let _ = bus
            .execute(&id, command(step, &id), CommandMeta::new("t", "t"))
            .await;
    }
    bus.load(&id).await.unwrap().0
}

/// What a task reads as, personal values shown as text.
fn readable(
    task: &Task,
) -> (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
) {
    (
        format!("{:?}", task.status),
        task.input.text().to_owned(),
        task.result.as_ref().map(|r| r.json().to_string()),
        task.error.as_ref().map(|e| e.text().to_owned()),
        task.workflow.clone(),
    )
}

struct Stores {
    plain: Store,
    sealed: Private,
    _dbs: (TestDb, TestDb),
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn sealing_changes_nothing_but_what_erasure_takes(
        input in "[a-zA-Z0-9][a-zA-Z0-9 ]{0,19}",
        steps in proptest::collection::vec(step(), 0..8),
        erase in any::<bool>(),
    ) {
        let runtime = stele_engine::testing::runtime();
        runtime.block_on(async {
            let stores = {
                let (a, b) = (TestDb::sqlite(), TestDb::sqlite());
                let plain = a.open().await;
                let sealed = private_store(&b.open().await, &Kek::generate(), Policy::default())
                    .await
                    .unwrap();
                Stores { plain, sealed, _dbs: (a, b) }
            };
            let subject = uuid::Uuid::now_v7().to_string();
            stores.sealed.subjects.sealer().keys().data_key(&subject).await.unwrap();
            let plain = replayed(&stores.plain, None, &input, &steps).await;
            let sealed = replayed(&stores.sealed.store, Some(&subject), &input, &steps).await;
            let (plain_view, sealed_view) = (readable(&plain), readable(&sealed));
            prop_assert_eq!(&plain_view, &sealed_view);
            prop_assert_eq!(&plain.requester, &sealed.requester);
            if erase {
                stores.sealed.subjects.sealer().keys().shred(&subject).await.unwrap();
                stores.sealed.subjects.sealer().forget(&subject);
                let bus = CommandBus::<Task>::new(stores.sealed.store.log.clone(), ());
                let id = sealed_task_id(&stores.sealed.store).await;
                let erased = bus.load(&id).await.unwrap().0;
                let view = readable(&erased);
                prop_assert_eq!(&view.0, &plain_view.0);
                prop_assert_eq!(view.1.as_str(), "[erased]");
                prop_assert_eq!(view.2.is_some(), plain_view.2.is_some());
                prop_assert!(view.2.iter().all(|r| r == "\"[erased]\""));
                prop_assert!(erased.requester.is_none());
                prop_assert_eq!(&view.4, &plain_view.4);
            }
            stores.plain.close().await;
            stores.sealed.store.close().await;
            Ok(())
        })?;
    }
}

/// The one task of the sealed store.
async fn sealed_task_id(store: &Store) -> String {
    store
        .log
        .read_all(stele_engine::Position::START, 1000)
        .await
        .unwrap()
        .into_iter()
        .find(|e| e.stream.aggregate_type == "task")
        .unwrap()
        .stream
        .aggregate_id
}

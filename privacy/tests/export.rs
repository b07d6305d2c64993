//! The export bundle's format, held by a snapshot (`snapshots/`): a person registered with two
//! identifiers, consents given (one by a guardian) and withdrawn, a task of theirs completed;
//! then the same after their erasure. Ids and times are replaced by placeholders.

use std::sync::Arc;

use serde_json::{json, Value};
use stele_aggregates::channel::Channel;
use stele_aggregates::subject::{Identifier, Purpose};
use stele_aggregates::task::{Requester, Task, TaskCommand, TaskInput};
use stele_engine::projection::ProjectionRunner;
use stele_engine::testing::TestDb;
use stele_engine::{CommandBus, CommandMeta};
use stele_privacy::index::SubjectIndex;
use stele_privacy::{private_store, Kek, Policy};

/// `value` with ids and times replaced by placeholders (the same id, the same placeholder).
fn normalized(value: &Value, ids: &mut Vec<String>) -> Value {
    let uuid =
        regex::Regex::new(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").unwrap();
    let time = regex::Regex::new(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)").unwrap();
    match value {
        Value::String(text) => {
            let text = uuid.replace_all(text, |found: &regex::Captures| {
                let id = found[0].to_owned();
                let index = ids
                    .iter()
                    .position(|known| *known == id)
                    .unwrap_or_else(|| {
                        ids.push(id);
                        ids.len() - 1
                    });
                format!("[id {index}]")
            });
            Value::String(time.replace_all(&text, "[time]").into_owned())
        }
        Value::Array(items) => Value::Array(items.iter().map(|v| normalized(v, ids)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), normalized(v, ids)))
                .collect(),
        ),
        other => other.clone(),
    }
}

#[test]
fn the_bundle_keeps_its_format() {
    stele_engine::testing::runtime().block_on(async {
        let db = TestDb::sqlite();
        let opened = db.open().await;
        let private = private_store(&opened, &Kek::generate(), Policy::default())
            .await
            .unwrap();
        let store = &private.store;
        let subjects = private.subjects.clone();
        let meta = || CommandMeta::new("user:dpo", "cli");
        let ana = subjects
            .register(
                &[
                    Identifier::parse("email:ana@example.org").unwrap(),
                    Identifier::parse("telegram:42").unwrap(),
                ],
                false,
                meta(),
            )
            .await
            .unwrap();
        let purpose = |name: &str| Purpose::parse(name).unwrap();
        for (name, given, guardian) in [
            ("processing", true, None),
            ("memory", true, Some("Ana's mother".to_owned())),
            ("memory", false, None),
        ] {
            subjects
                .consent(&ana, purpose(name), given, guardian, Channel::EMAIL, meta())
                .await
                .unwrap();
        }
        let tasks = CommandBus::<Task>::new(store.log.clone(), ());
        let task = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b";
        for command in [
            TaskCommand::Create {
                input: TaskInput::parse("book a table for two").unwrap(),
                requester: Requester::parse("ana@example.org", "email").unwrap(),
                subject: Some(ana.clone()),
                workflow: Some("assistant".into()),
                origin: None,
                models: Default::default(),
                screening: Default::default(),
                routed: None,
            },
            TaskCommand::Route {
                workflow: "assistant".into(),
                run_id: task.into(),
            },
            TaskCommand::Complete {
                result: json!({ "booked": "Friday, 8 pm" }),
            },
        ] {
            tasks
                .execute(task, command, CommandMeta::new("key:k1", "api"))
                .await
                .unwrap();
        }
        let runner = ProjectionRunner::new(store, vec![Arc::new(SubjectIndex)]);
        runner.setup().await.unwrap();
        let export = |by: &'static str| {
            let subjects = subjects.clone();
            let runner = &runner;
            let ana = ana.clone();
            async move {
                while runner.step("subjects").await.unwrap().read > 0 {}
                let head = store.log.head().await.unwrap();
                let bundle = subjects
                    .export(store.log.as_ref(), &ana, head, by, meta())
                    .await
                    .unwrap();
                serde_json::to_value(bundle).unwrap()
            }
        };
        let before = export("user:dpo").await;
        subjects
            .erase(&ana, "user:dpo", "asked to be forgotten", meta())
            .await
            .unwrap();
        let after = export("user:dpo").await;
        let mut ids = Vec::new();
        insta::assert_json_snapshot!("bundle", normalized(&before, &mut ids));
        insta::assert_json_snapshot!("bundle_after_erasure", normalized(&after, &mut ids));
        runner.release_all().await.unwrap();
        opened.close().await;
    });
}

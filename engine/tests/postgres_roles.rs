//! The least-privilege role documented in the README: it can append and read, not rewrite.

use std::str::FromStr;

use serde_json::json;
use sqlx::postgres::PgConnectOptions;
use stele_engine::log::postgres::{PgEventLog, PgLogOptions};
use stele_engine::store::{Migrate, Store};
use stele_engine::testing::TestDb;
use stele_engine::{AppendRequest, CommandMeta, EventLog, NewEvent, StreamId};
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_insert_and_select_role_can_append_but_not_rewrite() {
    let db = TestDb::postgres().await;
    let store = Store::open(db.location.clone(), Migrate::Apply)
        .await
        .unwrap();
    let stele_engine::store::StorePool::Postgres(admin) = &store.pool else {
        unreachable!()
    };
    let role = format!("stele_app_{}", Uuid::new_v4().simple());
    // The statements from the README.
    for sql in [
        format!("CREATE ROLE {role} LOGIN PASSWORD 'secret'"),
        format!("GRANT SELECT, INSERT ON events, commands TO {role}"),
        format!("GRANT USAGE ON SEQUENCE events_global_position_seq TO {role}"),
    ] {
        sqlx::query(&sql).execute(admin).await.unwrap();
    }

    let options = PgConnectOptions::from_str(db.url().unwrap())
        .unwrap()
        .username(&role)
        .password("secret");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .connect_with(options)
        .await
        .unwrap();
    let log = PgEventLog::new(pool.clone(), PgLogOptions::default());
    let meta = CommandMeta::new("user:1", "test");
    log.append(AppendRequest {
        command_id: meta.command_id,
        stream: StreamId::new("note", "n"),
        expected_sequence: 0,
        events: vec![NewEvent {
            event_type: "Noted".into(),
            event_version: "1.0".into(),
            payload: json!({}),
            metadata: meta.for_event(Uuid::now_v7()),
        }],
    })
    .await
    .unwrap();
    assert_eq!(
        log.read_stream(&StreamId::new("note", "n"), 0)
            .await
            .unwrap()
            .len(),
        1
    );

    for sql in [
        "UPDATE events SET payload = '{}'",
        "DELETE FROM events",
        "TRUNCATE events",
    ] {
        let error = sqlx::query(sql).execute(&pool).await.unwrap_err();
        assert!(
            error.to_string().contains("permission denied"),
            "{sql}: {error}"
        );
    }
    log.close().await;
    sqlx::query(&format!("DROP OWNED BY {role}"))
        .execute(admin)
        .await
        .unwrap();
    sqlx::query(&format!("DROP ROLE {role}"))
        .execute(admin)
        .await
        .unwrap();
    store.close().await;
}

//! Runs one test body against a fresh store of each backend.

#![allow(dead_code)]

use std::future::Future;

use stele_engine::testing::TestDb;
use stele_engine::Store;

pub enum Kind {
    Postgres,
    Sqlite,
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

pub async fn test_db(kind: Kind) -> TestDb {
    match kind {
        Kind::Postgres => TestDb::postgres().await,
        Kind::Sqlite => TestDb::sqlite(),
    }
}

/// Opens a fresh migrated store of `kind`, runs `body` with it, closes it.
pub fn with_store<F, Fut>(kind: Kind, body: F)
where
    F: FnOnce(Store) -> Fut,
    Fut: Future<Output = Store>,
{
    runtime().block_on(async {
        let db = test_db(kind).await;
        let store = db.open().await;
        let store = body(store).await;
        store.close().await;
        drop(db);
    });
}

/// Instantiates each listed `async fn(&Store)` once per backend.
#[macro_export]
macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[test]
                fn $name() {
                    $crate::support::with_store($crate::support::Kind::Postgres, |store| async move {
                        super::$name(&store).await;
                        store
                    });
                }
            )*
        }
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    $crate::support::with_store($crate::support::Kind::Sqlite, |store| async move {
                        super::$name(&store).await;
                        store
                    });
                }
            )*
        }
    };
}

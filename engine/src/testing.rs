//! Test support: every test gets a store of its own.
//!
//! PostgreSQL tests create a fresh database on the server named by `DATABASE_URL` (the test command
//! in the README provisions one) and drop it afterwards; SQLite tests use a temporary directory.

use std::path::PathBuf;
use std::str::FromStr;

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

use crate::store::{Migrate, Store, StoreLocation};

/// A database that exists for one test.
pub struct TestDb {
    pub location: StoreLocation,
    cleanup: Cleanup,
}

enum Cleanup {
    Postgres { admin_url: String, name: String },
    Dir(#[allow(dead_code)] tempfile_dir::TempDir),
}

mod tempfile_dir {
    /// A temporary directory removed on drop.
    pub struct TempDir(pub std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The server the PostgreSQL tests run on.
pub fn admin_url() -> String {
    std::env::var("DATABASE_URL").expect(
        "DATABASE_URL is not set: run the test suite with scripts/test (see README), \
         which provisions PostgreSQL",
    )
}

impl TestDb {
    /// A fresh, empty PostgreSQL database (not migrated).
    pub async fn postgres() -> TestDb {
        let admin_url = admin_url();
        let name = format!("stele_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = PgConnectOptions::from_str(&admin_url)
            .expect("DATABASE_URL")
            .connect()
            .await
            .expect("connect to DATABASE_URL");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut admin)
            .await
            .expect("create test database");
        let _ = admin.close().await;
        let url = crate::store::with_database(&admin_url, &name).expect("DATABASE_URL");
        TestDb {
            location: StoreLocation::Postgres(url),
            cleanup: Cleanup::Postgres { admin_url, name },
        }
    }

    /// A fresh embedded store directory (nothing created in it yet).
    pub fn sqlite() -> TestDb {
        let dir: PathBuf =
            std::env::temp_dir().join(format!("stele-test-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create test directory");
        TestDb {
            location: StoreLocation::Embedded(dir.clone()),
            cleanup: Cleanup::Dir(tempfile_dir::TempDir(dir)),
        }
    }

    /// Opens the store, migrated.
    pub async fn open(&self) -> Store {
        Store::open(self.location.clone(), Migrate::Apply)
            .await
            .expect("open test store")
    }

    /// The PostgreSQL URL, for tests that need one.
    pub fn url(&self) -> Option<&str> {
        match &self.location {
            StoreLocation::Postgres(url) => Some(url),
            StoreLocation::Embedded(_) => None,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Cleanup::Postgres { admin_url, name } = &self.cleanup {
            let (admin_url, name) = (admin_url.clone(), name.clone());
            // Drop runs outside async: drop the database from a thread with its own runtime.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(runtime) = runtime {
                    runtime.block_on(async {
                        if let Ok(mut admin) = PgConnectOptions::from_str(&admin_url)
                            .expect("DATABASE_URL")
                            .connect()
                            .await
                        {
                            let _ = sqlx::query(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .execute(&mut admin)
                            .await;
                        }
                    });
                }
            })
            .join();
        }
    }
}

/// The backends a test can run on.
#[derive(Clone, Copy, Debug)]
pub enum Kind {
    Postgres,
    Sqlite,
}

/// A multi-threaded runtime for one test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// A fresh database of `kind`.
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
    Fut: std::future::Future<Output = Store>,
{
    runtime().block_on(async {
        let db = test_db(kind).await;
        let store = db.open().await;
        let store = body(store).await;
        store.close().await;
        drop(db);
    });
}

/// Instantiates each listed `async fn(&Store)` once per backend, as `postgres::NAME` and
/// `sqlite::NAME` tests: one conformance suite, every adapter.
#[macro_export]
macro_rules! for_each_backend {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[test]
                fn $name() {
                    $crate::testing::with_store($crate::testing::Kind::Postgres, |store| async move {
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
                    $crate::testing::with_store($crate::testing::Kind::Sqlite, |store| async move {
                        super::$name(&store).await;
                        store
                    });
                }
            )*
        }
    };
}

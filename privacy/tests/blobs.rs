//! The stores of people's files, one suite for all: the database's table (on both stores), a
//! folder, and an S3-compatible bucket (the test server `scripts/services.sh` starts, at
//! `STELE_S3_ENDPOINT`). Then the sealing on top of them: a store holds no plaintext, files kept
//! before a change of store stay readable, and erasure empties every store.

use std::sync::Arc;

use stele_aggregates::subject::Identifier;
use stele_engine::for_each_backend;
use stele_engine::testing::TestDb;
use stele_engine::{CommandMeta, Store};
use stele_privacy::blobs::{blob_store, BlobStore, ObjectBlobs, TableBlobs};
use stele_privacy::{private_store, private_store_with_blobs, Kek, Policy};

const A: &str = "sha256:aaaa";
const B: &str = "sha256:bbbb";

async fn conformance(blobs: &dyn BlobStore) {
    blobs
        .put("s-1", A, "text/plain", b"first".to_vec())
        .await
        .unwrap();
    // Content-addressed: a second put of the same digest keeps the first.
    blobs
        .put("s-1", A, "text/plain", b"other".to_vec())
        .await
        .unwrap();
    assert_eq!(
        blobs.get("s-1", A).await.unwrap(),
        Some(("text/plain".to_owned(), b"first".to_vec()))
    );
    assert_eq!(blobs.get("s-2", A).await.unwrap(), None, "another person's");
    assert_eq!(blobs.get("s-1", B).await.unwrap(), None, "not kept");

    // Bytes of any kind, and a content type with odd characters, come back as they were.
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    blobs
        .put("s-1", B, "image/png; name=\"a\nb\"", bytes.clone())
        .await
        .unwrap();
    let (kind, back) = blobs.get("s-1", B).await.unwrap().unwrap();
    assert_eq!(back, bytes);
    assert!(kind.starts_with("image/png"), "{kind}");
    let mut listed = blobs.list("s-1").await.unwrap();
    listed.sort();
    assert_eq!(listed, vec![A.to_owned(), B.to_owned()]);

    // Subject ids are names, not paths: none reaches another's files.
    for odd in ["..", "../s-1", "s-1/..", "a/b", "s 1", "s%2F1"] {
        assert_eq!(
            blobs.list(odd).await.unwrap(),
            Vec::<String>::new(),
            "{odd}"
        );
        blobs
            .put(odd, A, "text/plain", b"odd".to_vec())
            .await
            .unwrap();
        assert_eq!(
            blobs.get(odd, A).await.unwrap().map(|(_, b)| b),
            Some(b"odd".to_vec()),
            "{odd}"
        );
    }
    assert_eq!(
        blobs.get("s-1", A).await.unwrap().map(|(_, b)| b),
        Some(b"first".to_vec())
    );

    blobs
        .put("s-2", A, "text/plain", b"hers".to_vec())
        .await
        .unwrap();
    blobs.forget("s-1").await.unwrap();
    assert_eq!(blobs.list("s-1").await.unwrap(), Vec::<String>::new());
    assert_eq!(blobs.get("s-1", A).await.unwrap(), None);
    assert_eq!(
        blobs.get("s-2", A).await.unwrap().map(|(_, b)| b),
        Some(b"hers".to_vec()),
        "another person's files stay"
    );
    // Forgetting someone with no files is fine.
    blobs.forget("s-none").await.unwrap();
}

async fn the_database_table_keeps_files(store: &Store) {
    conformance(&TableBlobs::new(store.pool.clone())).await;
}

for_each_backend!(the_database_table_keeps_files);

fn runtime() -> tokio::runtime::Runtime {
    stele_engine::testing::runtime()
}

#[test]
fn a_folder_keeps_files() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let blobs = ObjectBlobs::folder(&dir.path().join("blobs")).unwrap();
        conformance(&blobs).await;
    });
}

/// A new bucket on the test server (moto takes unsigned requests).
fn bucket() -> (String, String) {
    let endpoint = std::env::var("STELE_S3_ENDPOINT")
        .expect("STELE_S3_ENDPOINT names the S3-compatible test server (scripts/services.sh)");
    let name = format!("stele-{}", uuid::Uuid::new_v4().simple());
    let url = format!("{endpoint}/{name}");
    let status = std::process::Command::new("python3")
        .args([
            "-c",
            "import sys, urllib.request as u; u.urlopen(u.Request(sys.argv[1], method='PUT'))",
            &url,
        ])
        .status()
        .unwrap();
    assert!(status.success(), "could not create the bucket {url}");
    (endpoint, name)
}

fn with_s3_env(endpoint: &str) {
    // Each test runs in its own process (nextest), so the variables are this test's alone.
    for (key, value) in [
        ("AWS_ENDPOINT_URL", endpoint),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "stele-test"),
        ("AWS_SECRET_ACCESS_KEY", "stele-test"),
    ] {
        std::env::set_var(key, value);
    }
}

#[test]
fn an_s3_bucket_keeps_files() {
    let (endpoint, name) = bucket();
    with_s3_env(&endpoint);
    runtime().block_on(async {
        let blobs = ObjectBlobs::s3(&format!("s3://{name}")).unwrap();
        conformance(&blobs).await;
        // Under a prefix: the same, and nothing outside it is touched.
        let under = ObjectBlobs::s3(&format!("s3://{name}/tenant-a/files")).unwrap();
        conformance(&under).await;
        let outside = ObjectBlobs::s3(&format!("s3://{name}")).unwrap();
        assert_eq!(
            outside.get("s-2", A).await.unwrap().map(|(_, b)| b),
            Some(b"hers".to_vec())
        );
    });
}

#[test]
fn a_store_is_named_by_a_url_and_a_wrong_one_is_refused_in_a_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let (endpoint, name) = bucket();
    with_s3_env(&endpoint);
    stele_engine::testing::with_store(stele_engine::testing::Kind::Sqlite, |store| {
        let folder = dir.path().join("files");
        async move {
            let database = blob_store("database", &store.pool).unwrap();
            assert_eq!(database.describe(), "the database");
            let url = format!("file://{}", folder.display());
            let files = blob_store(&url, &store.pool).unwrap();
            assert!(files.describe().contains("files"), "{}", files.describe());
            files
                .put("s-1", A, "text/plain", b"x".to_vec())
                .await
                .unwrap();
            assert!(folder.is_dir());
            let s3 = blob_store(&format!("s3://{name}/p"), &store.pool).unwrap();
            s3.put("s-1", A, "text/plain", b"x".to_vec()).await.unwrap();
            for wrong in ["ftp://x", "nowhere", ""] {
                let Err(e) = blob_store(wrong, &store.pool) else {
                    panic!("{wrong:?} was taken");
                };
                let text = e.to_string();
                assert!(text.contains("s3://bucket"), "{text}");
                assert!(!text.contains('\n'), "{text}");
            }
            store
        }
    });
}

#[test]
fn sealed_files_move_stores_readably_and_erasure_empties_every_store() {
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let db = TestDb::sqlite();
        let opened = db.open().await;
        let kek = Kek::generate();
        let meta = || CommandMeta::new("user:dpo", "cli");
        // Kept in the database (as before a change of store)…
        let before = private_store(&opened, &kek, Policy::default())
            .await
            .unwrap();
        let ana = before
            .subjects
            .register(&[Identifier::parse("telegram:42").unwrap()], false, meta())
            .await
            .unwrap();
        let kept_before = before
            .subjects
            .blobs()
            .put(&ana, b"Ana, 12 rue des Lilas", "text/plain")
            .await
            .unwrap();
        // …then in a folder: both read, new files go to the folder.
        let folder = dir.path().join("blobs");
        let folder_store: Arc<dyn BlobStore> = Arc::new(ObjectBlobs::folder(&folder).unwrap());
        let after =
            private_store_with_blobs(&opened, &kek, Policy::default(), Some(folder_store.clone()))
                .await
                .unwrap();
        let blobs = after.subjects.blobs();
        let kept_after = blobs
            .put(&ana, b"the lighthouse keeper", "text/plain")
            .await
            .unwrap();
        assert_eq!(
            blobs.list(&ana).await.unwrap(),
            vec![kept_after.clone(), kept_before.clone()]
        );
        for (digest, text) in [
            (&kept_before, &b"Ana, 12 rue des Lilas"[..]),
            (&kept_after, &b"the lighthouse keeper"[..]),
        ] {
            let (_, bytes) = blobs.get(&ana, digest).await.unwrap().unwrap();
            assert_eq!(bytes, text);
        }
        let table = TableBlobs::new(opened.pool.clone());
        assert_eq!(table.list(&ana).await.unwrap(), vec![kept_before.clone()]);
        // The folder holds ciphertext only.
        let (_, raw) = folder_store.get(&ana, &kept_after).await.unwrap().unwrap();
        assert!(!raw.windows(10).any(|w| w == b"lighthouse"));

        after
            .subjects
            .erase(&ana, "user:dpo", "asked", meta())
            .await
            .unwrap();
        assert_eq!(blobs.get(&ana, &kept_after).await.unwrap(), None);
        assert_eq!(folder_store.list(&ana).await.unwrap(), Vec::<String>::new());
        assert_eq!(table.list(&ana).await.unwrap(), Vec::<String>::new());
        opened.close().await;
    });
}

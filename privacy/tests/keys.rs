//! The key store on both stores: data keys made once per subject, sealing and opening, erasure by
//! crypto-shredding, and a store that refuses another key-encryption key.

use stele_engine::for_each_backend;
use stele_engine::Store;
use stele_privacy::blobs::{BlobStore, Blobs, TableBlobs};
use stele_privacy::{Kek, KeyState, KeyStore, PrivacyError};

const KEK: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

fn live(state: KeyState) -> stele_privacy::DataKey {
    match state {
        KeyState::Live(key) => key,
        KeyState::Shredded => panic!("shredded"),
        KeyState::None => panic!("no key"),
    }
}

async fn a_subjects_key_seals_and_opens_their_data(store: &Store) {
    let keys = KeyStore::open(store.pool.clone(), Kek::from_hex(KEK).unwrap())
        .await
        .unwrap();
    assert!(matches!(keys.key("s-1").await.unwrap(), KeyState::None));
    let key = live(keys.data_key("s-1").await.unwrap());
    let sealed = key.seal("Ana, 12 rue des Lilas".as_bytes(), b"message.text");
    assert!(!String::from_utf8_lossy(&sealed).contains("Ana"));
    // The same key again, from another opening of the store (another process).
    let again = KeyStore::open(store.pool.clone(), Kek::from_hex(KEK).unwrap())
        .await
        .unwrap();
    let same = live(again.data_key("s-1").await.unwrap());
    assert_eq!(
        same.open(&sealed, b"message.text").unwrap(),
        "Ana, 12 rue des Lilas".as_bytes()
    );
    // Another context, another subject's key, or altered bytes do not open it.
    assert!(matches!(
        same.open(&sealed, b"message.other"),
        Err(PrivacyError::Unreadable)
    ));
    let other = live(keys.data_key("s-2").await.unwrap());
    assert!(other.open(&sealed, b"message.text").is_err());
    let mut altered = sealed.clone();
    *altered.last_mut().unwrap() ^= 1;
    assert!(same.open(&altered, b"message.text").is_err());
}

async fn erasure_shreds_the_key_for_good(store: &Store) {
    let keys = KeyStore::open(store.pool.clone(), Kek::from_hex(KEK).unwrap())
        .await
        .unwrap();
    let key = live(keys.data_key("s-1").await.unwrap());
    let sealed = key.seal(b"secret", b"f");
    assert!(keys.shred("s-1").await.unwrap());
    assert!(!keys.shred("s-1").await.unwrap(), "once");
    assert!(matches!(keys.key("s-1").await.unwrap(), KeyState::Shredded));
    // No new key is made for an erased subject: what was sealed stays unreadable.
    assert!(matches!(
        keys.data_key("s-1").await.unwrap(),
        KeyState::Shredded
    ));
    assert!(!sealed.is_empty());
    // Others keep theirs.
    live(keys.data_key("s-2").await.unwrap());
}

async fn another_key_encryption_key_is_refused(store: &Store) {
    KeyStore::open(store.pool.clone(), Kek::from_hex(KEK).unwrap())
        .await
        .unwrap();
    let wrong = KeyStore::open(store.pool.clone(), Kek::generate()).await;
    assert!(
        matches!(wrong, Err(PrivacyError::WrongKek)),
        "{:?}",
        wrong.err()
    );
    assert!(matches!(
        Kek::from_hex("abc"),
        Err(PrivacyError::MalformedKek)
    ));
}

async fn a_persons_files_are_sealed_kept_once_and_unreadable_after_erasure(store: &Store) {
    let keys = KeyStore::open(store.pool.clone(), Kek::from_hex(KEK).unwrap())
        .await
        .unwrap();
    let stores: [std::sync::Arc<dyn BlobStore>; 1] =
        [std::sync::Arc::new(TableBlobs::new(store.pool.clone()))];
    let blobs = Blobs::new(&stores, &keys);
    let mail = b"From: ana@example.org\r\n\r\nAna, 12 rue des Lilas";
    let digest = blobs.put("s-1", mail, "message/rfc822").await.unwrap();
    assert_eq!(digest, stele_privacy::blobs::digest_of(mail));
    // The same file again is the same file.
    assert_eq!(
        blobs.put("s-1", mail, "message/rfc822").await.unwrap(),
        digest
    );
    assert_eq!(blobs.list("s-1").await.unwrap(), vec![digest.clone()]);
    let (kind, bytes) = blobs.get("s-1", &digest).await.unwrap().unwrap();
    assert_eq!(
        (kind.as_str(), bytes.as_slice()),
        ("message/rfc822", &mail[..])
    );
    // Another person does not read it under their id.
    assert!(blobs.get("s-2", &digest).await.unwrap().is_none());
    let too_big = vec![0u8; stele_privacy::blobs::MAX_BLOB_BYTES + 1];
    assert!(blobs.put("s-1", &too_big, "x/y").await.is_err());
    // Shredded: unreadable at once, and nothing new is kept of them.
    keys.shred("s-1").await.unwrap();
    assert!(blobs.get("s-1", &digest).await.unwrap().is_none());
    assert!(blobs.put("s-1", b"more", "text/plain").await.is_err());
}

for_each_backend!(
    a_subjects_key_seals_and_opens_their_data,
    erasure_shreds_the_key_for_good,
    another_key_encryption_key_is_refused,
    a_persons_files_are_sealed_kept_once_and_unreadable_after_erasure,
);

#[test]
fn the_embedded_mode_makes_its_key_once_readable_by_its_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kek");
    let first = Kek::load_or_create(&path).unwrap();
    let again = Kek::load_or_create(&path).unwrap();
    assert_eq!(format!("{first:?}"), "Kek(<redacted>)");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    drop((first, again));
}

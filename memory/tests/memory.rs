//! The memory on both stores, one suite: facts stored and found by meaning and by words, scope
//! filters, superseding and forgetting, time travel, erasure (and a rebuild after it), the
//! vector cache. Embeddings come from all-MiniLM-L6-v2 run locally (`STELE_EMBEDDING_MODEL`).

mod support;

use sha2::Digest;
use stele_aggregates::memory::MemoryScope;
use stele_aggregates::subject::Identifier;
use stele_engine::projection::ProjectionRunner;
use stele_engine::store::Store;
use stele_engine::CommandMeta;
use stele_memory::{Filter, Memories, Mode, NewMemory, Scope, Search, MEMORY};
use stele_privacy::{private_store, Kek, Policy, Private};
use support::model;

fn meta() -> CommandMeta {
    CommandMeta::new("user:test", "api")
}

fn fact(content: &str, scope: MemoryScope, key: Option<&str>) -> NewMemory {
    NewMemory {
        content: content.to_owned(),
        importance: 0.5,
        tags: vec!["test".into()],
        scope,
        key: key.map(str::to_owned),
        sources: vec![],
    }
}

async fn catch_up(runner: &ProjectionRunner) {
    while runner.step(MEMORY).await.unwrap().read > 0 {}
}

fn search(query: &str, filter: Filter, mode: Mode) -> Search {
    Search {
        query: query.to_owned(),
        filter,
        limit: 5,
        mode,
    }
}

/// `store` with personal data sealed, its memory and the memory's projection, set up.
async fn memory_of(store: &Store) -> (Private, Memories, ProjectionRunner) {
    let private = private_store(store, &Kek::generate(), Policy::default())
        .await
        .unwrap();
    let memories = Memories::new(&private.store, model(), private.subjects.sealer().clone());
    let runner = ProjectionRunner::new(&private.store, vec![memories.projection()]);
    runner.setup().await.unwrap();
    (private, memories, runner)
}

async fn remembers_finds_supersedes_forgets_and_erases(store: &Store) {
    let (private, memories, runner) = memory_of(store).await;

    let alice = private
        .subjects
        .register(
            &[Identifier::parse("email:alice@example.com").unwrap()],
            false,
            meta(),
        )
        .await
        .unwrap();
    let of_alice = MemoryScope {
        subject: Some(alice.clone()),
        tenant: Some("family".into()),
        ..MemoryScope::default()
    };
    let global = MemoryScope {
        agent: Some("planner".into()),
        ..MemoryScope::default()
    };
    let lyon = memories
        .store(
            fact("Alice lives in Lyon", of_alice.clone(), Some("home_city")),
            meta(),
        )
        .await
        .unwrap();
    memories
        .store(
            fact("Alice is allergic to peanuts", of_alice.clone(), None),
            meta(),
        )
        .await
        .unwrap();
    memories
        .store(
            fact(
                "Deployments happen on Tuesdays after the E-4021 incident",
                global.clone(),
                None,
            ),
            meta(),
        )
        .await
        .unwrap();
    let forgotten = memories
        .store(
            fact("The wifi password is on the fridge", global.clone(), None),
            meta(),
        )
        .await
        .unwrap();
    catch_up(&runner).await;

    // By meaning: no word in common with the fact.
    let found = memories
        .search(&search(
            "which food must she avoid?",
            Filter::default(),
            Mode::Dense,
        ))
        .await
        .unwrap();
    assert_eq!(
        found[0].content, "Alice is allergic to peanuts",
        "{found:?}"
    );
    // By a rare word.
    let found = memories
        .search(&search("E-4021", Filter::default(), Mode::Text))
        .await
        .unwrap();
    assert!(found[0].content.contains("E-4021"), "{found:?}");
    // Hybrid, filtered by scope: only the planner's memories.
    let planner = Filter {
        scope: Scope {
            agent: Some("planner".into()),
            ..Scope::default()
        },
        ..Filter::default()
    };
    let found = memories
        .search(&search("where does Alice live", planner, Mode::Hybrid))
        .await
        .unwrap();
    assert!(!found.is_empty());
    assert!(
        found.iter().all(|h| h.agent.as_deref() == Some("planner")),
        "{found:?}"
    );
    // Each memory cites its event.
    let found = memories
        .search(&search(
            "where does Alice live",
            Filter::default(),
            Mode::Dense,
        ))
        .await
        .unwrap();
    assert_eq!(found[0].memory_id, lyon);
    assert!(found[0].position > 0 && !found[0].sources.is_empty());

    // A later fact with the same key supersedes; the earlier one stays answerable for its time.
    memories
        .store(
            fact("Alice moved to Nantes", of_alice.clone(), Some("home_city")),
            meta(),
        )
        .await
        .unwrap();
    memories
        .forget(&forgotten, "no longer true", meta())
        .await
        .unwrap();
    catch_up(&runner).await;
    let now = memories
        .search(&search(
            "where does Alice live",
            Filter::default(),
            Mode::Dense,
        ))
        .await
        .unwrap();
    assert_eq!(now[0].content, "Alice moved to Nantes", "{now:?}");
    // Just before the move was recorded (the embedded log keeps milliseconds).
    let before_move = now[0].valid_from - chrono::Duration::milliseconds(1);
    assert!(now
        .iter()
        .all(|h| h.memory_id != lyon && h.memory_id != forgotten));
    let then = memories
        .search(&search(
            "where does Alice live",
            Filter {
                at: Some(before_move),
                ..Filter::default()
            },
            Mode::Dense,
        ))
        .await
        .unwrap();
    assert_eq!(then[0].memory_id, lyon, "{then:?}");
    let stats = memories.stats().await.unwrap();
    assert_eq!((stats.memories, stats.valid), (5, 3));
    assert_eq!(stats.cached_vectors, 5);

    // Erased: her memories, vectors and terms go, and a rebuild brings none back.
    private
        .subjects
        .erase(&alice, "operator", "art. 17", meta())
        .await
        .unwrap();
    catch_up(&runner).await;
    for mode in [Mode::Dense, Mode::Text, Mode::Hybrid] {
        let found = memories
            .search(&search(
                "Alice peanuts Lyon Nantes",
                Filter::default(),
                mode,
            ))
            .await
            .unwrap();
        assert!(
            found
                .iter()
                .all(|h| h.subject.is_none() && !h.content.contains("Alice")),
            "{mode:?}: {found:?}"
        );
    }
    let stats = memories.stats().await.unwrap();
    assert_eq!((stats.memories, stats.cached_vectors), (2, 2));
    runner.rebuild(MEMORY, |_| {}).await.unwrap();
    let stats = memories.stats().await.unwrap();
    assert_eq!(stats.memories, 2, "{stats:?}");
    let found = memories
        .search(&search("deployments", Filter::default(), Mode::Hybrid))
        .await
        .unwrap();
    assert!(found[0].content.contains("Tuesdays"), "{found:?}");
}

/// One batch holding plain memories, facts superseding one another and a forgetting is
/// applied as the log orders it (memories are written a run at a time), and a rebuild, which
/// reads it all as one batch again, comes to the same.
async fn one_batch_keeps_the_log_order(store: &Store) {
    let (_private, memories, runner) = memory_of(store).await;
    let scope = MemoryScope {
        agent: Some("planner".into()),
        ..MemoryScope::default()
    };
    let mut ids = Vec::new();
    for (content, key) in [
        ("The release train leaves on Mondays", Some("release_day")),
        ("The staging database is called orca", None),
        (
            "The release train leaves on Wednesdays",
            Some("release_day"),
        ),
        ("The build cache lives in the attic", None),
        ("The release train leaves on Fridays", Some("release_day")),
    ] {
        let id = memories
            .store(fact(content, scope.clone(), key), meta())
            .await
            .unwrap();
        ids.push(id);
    }
    memories.forget(&ids[3], "moved", meta()).await.unwrap();
    for round in ["first", "rebuilt"] {
        match round {
            "first" => catch_up(&runner).await,
            _ => {
                runner.rebuild(MEMORY, |_| {}).await.unwrap();
            }
        }
        let stats = memories.stats().await.unwrap();
        assert_eq!((stats.memories, stats.valid), (5, 2), "{round}: {stats:?}");
        let found = memories
            .search(&search(
                "when does the release train leave",
                Filter::default(),
                Mode::Dense,
            ))
            .await
            .unwrap();
        let current: Vec<&str> = found.iter().map(|h| h.content.as_str()).collect();
        assert!(
            current.contains(&"The release train leaves on Fridays"),
            "{round}: {current:?}"
        );
        assert!(
            current.contains(&"The staging database is called orca")
                && !current.iter().any(|c| c.contains("Mondays")
                    || c.contains("Wednesdays")
                    || c.contains("attic")),
            "{round}: {current:?}"
        );
        // Each superseded fact was valid until the next one.
        let rows = stele_memory::index::for_pool(&store.pool)
            .fetch(&store.pool, &ids)
            .await
            .unwrap();
        let row = |id: &str| rows.iter().find(|r| r.memory_id == id).unwrap();
        assert_eq!(
            row(&ids[0]).valid_until,
            Some(row(&ids[2]).valid_from),
            "{round}"
        );
        assert_eq!(
            row(&ids[2]).valid_until,
            Some(row(&ids[4]).valid_from),
            "{round}"
        );
        assert_eq!(row(&ids[4]).valid_until, None, "{round}");
        assert!(row(&ids[3]).forgotten && !row(&ids[1]).forgotten, "{round}");
    }
}

/// The full-text side of hybrid search reads only the rarest terms' rows, and finds the rows
/// a scan of every row would; fresh memories are found before and after they settle into the
/// approximate index (and a missing index is built anew); approximate and exact vector search
/// agree on a small store.
async fn rare_terms_and_fresh_memories_find_what_a_full_scan_finds(store: &Store) {
    let (_private, memories, runner) = memory_of(store).await;
    // Which of the words "team", "meeting", "budget", "zanzibar" each memory holds.
    let words = ["team", "meeting", "budget", "zanzibar"];
    let mut expected = Vec::new();
    for i in 0..40usize {
        let held: Vec<&str> = words
            .iter()
            .enumerate()
            .filter(|(w, _)| (i >> w) & 1 == 1 || (*w < 2 && i % 3 == 0))
            .map(|(_, word)| *word)
            .collect();
        let content = format!("note {i}: {} and other things", held.join(" "));
        let id = memories
            .store(fact(&content, MemoryScope::default(), None), meta())
            .await
            .unwrap();
        if held.len() >= 3 {
            expected.push(id);
        }
    }
    expected.sort();
    catch_up(&runner).await;
    let index = stele_memory::index::for_pool(&store.pool);
    let query = "the team meeting about the Zanzibar budget";
    let text = || async {
        let mut found = index
            .text_search(&store.pool, query, &Filter::default(), 100, 0.75)
            .await
            .unwrap();
        found.sort();
        found
    };
    assert_eq!(text().await, expected);
    if let stele_engine::store::StorePool::Postgres(pool) = &store.pool {
        // With the planner's statistics of the terms, other terms are the rarest.
        sqlx::query("ANALYZE memories").execute(pool).await.unwrap();
        assert_eq!(text().await, expected);
    }

    let dense = || async {
        memories
            .search(&search(
                "budget of the Zanzibar team",
                Filter::default(),
                Mode::Dense,
            ))
            .await
            .unwrap()
            .into_iter()
            .map(|h| h.memory_id)
            .collect::<Vec<_>>()
    };
    let before = dense().await;
    assert_eq!(before.len(), 5);
    let vector = model()
        .embed(&["budget of the Zanzibar team".to_owned()])
        .await
        .unwrap()
        .remove(0);
    let exact = index
        .vector_search(&store.pool, &vector, &Filter::default(), 5, true)
        .await
        .unwrap();
    assert_eq!(before, exact);
    // A filtered search, approximate and exact, on both stores.
    let none = Filter {
        scope: MemoryScope {
            tenant: Some("nobody".into()),
            ..MemoryScope::default()
        },
        ..Filter::default()
    };
    for exact in [false, true] {
        let found = index
            .vector_search(&store.pool, &vector, &none, 5, exact)
            .await
            .unwrap();
        assert!(found.is_empty(), "{found:?}");
    }
    match &store.pool {
        stele_engine::store::StorePool::Postgres(pool) => {
            let fresh = || async {
                sqlx::query_scalar::<_, i64>("SELECT count(*) FROM memories WHERE NOT indexed")
                    .fetch_one(pool)
                    .await
                    .unwrap()
            };
            assert_eq!(fresh().await, 40);
            let mut settled = 0;
            loop {
                match memories.settle().await.unwrap() {
                    0 => break,
                    n => settled += n,
                }
            }
            assert_eq!((settled, fresh().await), (40, 0));
            assert_eq!(dense().await, before);
            // An index lost (a build interrupted): the next settle builds it anew.
            let name: String = sqlx::query_scalar(
                "SELECT indexname::text FROM pg_indexes \
                 WHERE tablename = 'memories' AND indexdef LIKE '%hnsw%'",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            sqlx::query(&format!("DROP INDEX \"{name}\""))
                .execute(pool)
                .await
                .unwrap();
            assert!(memories.settle().await.unwrap() > 0);
            let valid: bool = sqlx::query_scalar(
                "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid \
                 JOIN pg_am a ON a.oid = c.relam \
                 WHERE i.indrelid = 'memories'::regclass AND a.amname = 'hnsw'",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            assert!(valid);
            assert_eq!(memories.settle().await.unwrap(), 0);
            assert_eq!(dense().await, before);
        }
        stele_engine::store::StorePool::Sqlite(_) => {
            assert_eq!(memories.settle().await.unwrap(), 0);
        }
    }
}

/// The exact vector search's nearest for few and many candidates are the nearest a computation
/// here finds, in order (to float rounding), and the approximate search finds most of them; on
/// SQLite, `vec0`'s nearest signs over more than one of its chunks (1,024 rows) are the nearest
/// there are, in order.
async fn many_candidates_are_the_nearest(store: &Store) {
    let (_private, memories, runner) = memory_of(store).await;
    const ROWS: usize = 1_500;
    const DIMENSIONS: usize = 384;
    // Vectors from a small generator of our own (no randomness crate needed): deterministic,
    // spread over the sphere.
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let mut vector = || {
        let v: Vec<f32> = (0..DIMENSIONS).map(|_| next()).collect();
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.into_iter().map(|x| x / norm).collect::<Vec<f32>>()
    };
    let rows: Vec<(String, Vec<f32>)> = (0..ROWS).map(|i| (format!("row {i}"), vector())).collect();
    // The rows' vectors in the embedding cache: the projection takes them from there.
    let mut db = stele_engine::store::sql::Db::from(&store.pool);
    for (text, v) in &rows {
        db.execute(
            "INSERT INTO embedding_cache (model, text_sha256, vector) VALUES ($1, $2, $3)",
            &[
                model().name().into(),
                (&hex::encode(sha2::Sha256::digest(text.as_bytes()))).into(),
                (&stele_memory::index::vector_text(v)).into(),
            ],
        )
        .await
        .unwrap();
    }
    drop(db); // the embedded store's one writer connection
    let mut ids = std::collections::HashMap::new();
    for (text, v) in &rows {
        let id = memories
            .store(fact(text, MemoryScope::default(), None), meta())
            .await
            .unwrap();
        ids.insert(id, v.clone());
    }
    catch_up(&runner).await;
    let index = stele_memory::index::for_pool(&store.pool);
    let distance = |a: &[f32], b: &[f32]| {
        1.0 - a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum::<f64>()
    };
    for _ in 0..3 {
        let query = vector();
        if matches!(store.pool, stele_engine::store::StorePool::Sqlite(_)) {
            // Hamming distances of the signs (a bit set where a component is positive).
            let signs = |v: &[f32]| v.iter().map(|x| *x > 0.0).collect::<Vec<bool>>();
            let q = signs(&query);
            let mut nearest: Vec<f64> = ids
                .values()
                .map(|v| signs(v).iter().zip(&q).filter(|(a, b)| a != b).count() as f64)
                .collect();
            nearest.sort_by(f64::total_cmp);
            let found: Vec<f64> = stele_engine::store::sql::Db::from(&store.pool)
                .fetch_all(
                    "SELECT distance FROM memory_bits \
                     WHERE bits MATCH vec_quantize_binary(vec_f32($1)) AND k = 400",
                    &[(&stele_memory::index::vector_text(&query)).into()],
                )
                .await
                .unwrap()
                .iter()
                .map(|row| row.get::<f64>("distance").unwrap())
                .collect();
            assert_eq!(found, nearest[..400]);
        }
        let mut expected: Vec<f64> = ids.values().map(|v| distance(v, &query)).collect();
        expected.sort_by(f64::total_cmp);
        for k in [10, 300] {
            let exact = index
                .vector_search(&store.pool, &query, &Filter::default(), k, true)
                .await
                .unwrap();
            assert_eq!(exact.len(), k);
            for (rank, id) in exact.iter().enumerate() {
                let d = distance(&ids[id], &query);
                assert!(
                    (d - expected[rank]).abs() < 1e-5,
                    "rank {rank} of {k}: distance {d}, the nearest there is {}",
                    expected[rank]
                );
            }
            let approximate = index
                .vector_search(&store.pool, &query, &Filter::default(), k, false)
                .await
                .unwrap();
            let found = approximate.iter().filter(|id| exact.contains(id)).count();
            assert!(found * 10 >= k * 9, "{found} of the {k} nearest found");
        }
    }
}

/// An embedded store from before the vectors' signs (vectors and scope in a `vec0` table of
/// floats, none in `memories`) is moved to the current layout when its memory is set up: the
/// vectors into `memories`, their signs (current or not, as they were) into `memory_bits`.
#[test]
fn an_embedded_store_from_before_is_moved_to_the_signs() {
    stele_engine::testing::with_store(stele_engine::testing::Kind::Sqlite, |store| async move {
        let mut db = stele_engine::store::sql::Db::from(&store.pool);
        for sql in [
            "CREATE TABLE memories (id INTEGER PRIMARY KEY, memory_id TEXT NOT NULL UNIQUE, \
             kind TEXT NOT NULL, position INTEGER NOT NULL, content TEXT NOT NULL, \
             text_sha256 TEXT NOT NULL, agent TEXT, conversation TEXT, subject_id TEXT, \
             workflow TEXT, tenant TEXT, importance REAL NOT NULL, tags TEXT NOT NULL, \
             fact_key TEXT, sources TEXT NOT NULL, valid_from INTEGER NOT NULL, \
             valid_until INTEGER, forgotten INTEGER NOT NULL DEFAULT 0)",
            "CREATE VIRTUAL TABLE memory_vectors USING vec0(embedding float[384] \
             distance_metric=cosine, agent text, conversation text, subject_id text, \
             workflow text, tenant text, current integer)",
            "CREATE VIRTUAL TABLE memory_terms USING fts5(text, content='', \
             contentless_delete=1, tokenize='porter unicode61 remove_diacritics 2')",
        ] {
            db.execute(sql, &[]).await.unwrap();
        }
        // Two memories with the same vector: the first superseded (valid until 2), the other
        // current.
        let vector = stele_memory::index::vector_text(&[0.05; 384]);
        for (id, until, current) in [(1i64, Some(2i64), 0i64), (2, None, 1)] {
            db.execute(
                "INSERT INTO memories (id, memory_id, kind, position, content, text_sha256, \
                 importance, tags, sources, valid_from, valid_until) \
                 VALUES ($1, 'm' || $1, 'fact', $1, '\"old\"', 'x', 0.5, '[]', '[]', 1, $2)",
                &[id.into(), stele_engine::store::sql::Value::Int(until)],
            )
            .await
            .unwrap();
            db.execute(
                "INSERT INTO memory_vectors (rowid, embedding, agent, conversation, \
                 subject_id, workflow, tenant, current) VALUES ($1, $2, '', '', '', '', '', $3)",
                &[id.into(), (&vector).into(), current.into()],
            )
            .await
            .unwrap();
        }
        drop(db);
        let (_private, _memories, _runner) = memory_of(&store).await;
        let mut db = stele_engine::store::sql::Db::from(&store.pool);
        let row = db
            .fetch_one(
                "SELECT (SELECT count(*) FROM memories WHERE embedding IS NOT NULL) AS embedded, \
                        (SELECT group_concat(rowid || ':' || current) FROM memory_bits) AS bits, \
                        (SELECT sql FROM sqlite_master WHERE name = 'memory_vectors') AS vectors",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(row.get::<i64>("embedded").unwrap(), 2);
        assert_eq!(row.get::<String>("bits").unwrap(), "1:0,2:1");
        assert!(!row.get::<String>("vectors").unwrap().contains("vec0"));
        drop(db);
        let index = stele_memory::index::for_pool(&store.pool);
        for exact in [false, true] {
            let found = index
                .vector_search(&store.pool, &[0.05; 384], &Filter::default(), 5, exact)
                .await
                .unwrap();
            assert_eq!(found, ["m2"], "exact: {exact}");
        }
        store
    });
}

stele_engine::for_each_backend!(
    remembers_finds_supersedes_forgets_and_erases,
    one_batch_keeps_the_log_order,
    rare_terms_and_fresh_memories_find_what_a_full_scan_finds,
    many_candidates_are_the_nearest
);

//! The memory's index: one row per memory with its scope, validity, sealed content, vector and
//! full-text terms, on PostgreSQL (pgvector HNSW + `tsvector`/GIN) or SQLite (sqlite-vec `vec0` +
//! contentless FTS5). [`VectorIndex`] is the port; [`for_pool`] picks the adapter.
//!
//! Neither index keeps the memory's text: the content column holds it sealed (with the person's
//! key when it is theirs), the full-text side holds only terms (a `tsvector`, or FTS5 without
//! content), and a person's rows, vectors and terms are deleted when they are erased.
//!
//! **Filters keep recall.** pgvector 0.6's HNSW scan stops after `hnsw.ef_search` candidates and
//! filters afterwards, so a selective filter would come back short. The PostgreSQL adapter counts
//! the rows the filter keeps (up to [`EXACT_BELOW`]): below that it searches exactly (the scope
//! columns' b-tree indexes find the rows; sorting a few thousand distances is cheap), above it
//! raises `ef_search` in proportion to the filter's selectivity. On SQLite, `vec0` scans every
//! row's signs (binary quantisation: 48 bytes for 384 dimensions, a 32nd of the vectors) with
//! the scope as metadata columns, and the closest candidates (8 × the limit, at least 400) are
//! ranked by their vectors, read from their rows. An exact search compares every vector.
//!
//! **Fresh memories.** Inserting into PostgreSQL's HNSW graph costs far more than the row, so
//! the projection stores rows unindexed (`indexed = false`: the HNSW index is partial) and
//! [`VectorIndex::settle`] moves them into the graph behind it; a search reads the graph for the
//! settled rows and the fresh ones exactly, and ranks both together.
//!
//! **Rare terms first.** Hybrid search's full-text side keeps rows holding most of the query's
//! terms; such a row holds one of the query's rarest terms, so only those terms' rows are read.

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use stele_engine::projection::Tables;
use stele_engine::store::sql::{Db, Dialect, Value};
use stele_engine::store::StorePool;

/// Below this many rows kept by a filter, PostgreSQL searches exactly.
pub const EXACT_BELOW: i64 = 5_000;

/// The fewest candidates PostgreSQL's approximate search considers (`hnsw.ef_search`). On
/// clusters of ~330 near-duplicates, 100,000 vectors, recall@10 of questions falling between
/// clusters was 0.84 at 100, 0.91 at 300, 0.94 at 400 and 0.97 at 800, for 1.3, 3.2, 4.1 and
/// 8 ms of index scan.
pub const MIN_EF_SEARCH: i64 = 400;

/// The query's vector in PostgreSQL's searches, bound as text (`$1`) and parsed once: a bare
/// `$1::vector` in a prepared statement's generic plan (chosen after five runs) is parsed
/// again for every row it is compared with — an exact search over 100,000 rows took 2 s
/// instead of 0.19 s, an approximate one 7 ms instead of 1.5.
const QUERY_VECTOR: &str = "(SELECT $1::vector)";

/// Fresh memories `settle` moves into PostgreSQL's HNSW index in one transaction.
const SETTLE_BATCH: i64 = 500;

/// From this many fresh memories, when they are at least half of all, `settle` builds the HNSW
/// index anew instead of inserting them one by one (a build is several times faster).
const BUILD_FROM: i64 = 10_000;

/// PostgreSQL's approximate index: HNSW over the settled rows. `ef_construction` 128 (pgvector's
/// default is 64): on clusters of ~330 near-duplicates, 100,000 vectors, recall@10 at
/// `ef_search` 100 went from 0.84–0.87 to 0.91–0.94 for about a quarter more build time (200
/// did no better; `m` 24 or 32 cost more time).
const HNSW: &str = "USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 128) \
                    WHERE indexed";

/// Where SQLite stops counting a query term's rows to find its rarest terms.
const RARE_CAP: i64 = 2_000;

/// The tables' base names.
pub const MEMORIES: &str = "memories";
/// PostgreSQL and SQLite: unused (exists empty; the vectors are a column of `memories`).
pub const VECTORS: &str = "memory_vectors";
pub const TERMS: &str = "memory_terms";
/// SQLite: each vector's signs (binary quantisation), scanned first; PostgreSQL: unused.
pub const BITS: &str = "memory_bits";

/// The fewest candidates SQLite's scan of signs hands over to be ranked by their vectors.
const RESCORED: usize = 400;

/// One memory as indexed.
#[derive(Clone, Debug)]
pub struct Doc {
    pub memory_id: String,
    /// `fact`, `message` or `reply`, or `step`.
    pub kind: String,
    /// The position of the event it came from.
    pub position: i64,
    /// The content as recorded (a sealed personal value, or plain JSON text).
    pub content: String,
    /// The text, for the terms only (never stored as such).
    pub text: String,
    /// sha256 of the text: the key of its cached vector.
    pub text_sha256: String,
    pub scope: Scope,
    pub importance: f64,
    pub tags: Vec<String>,
    pub key: Option<String>,
    pub sources: Vec<String>,
    pub valid_from: DateTime<Utc>,
    pub vector: Vec<f32>,
}

/// Where a memory belongs (each part optional): the aggregate's scope.
pub use stele_aggregates::memory::MemoryScope as Scope;

/// The scope's columns and values.
fn columns(scope: &Scope) -> [(&'static str, &Option<String>); 5] {
    [
        ("agent", &scope.agent),
        ("conversation", &scope.conversation),
        ("subject_id", &scope.subject),
        ("workflow", &scope.workflow),
        ("tenant", &scope.tenant),
    ]
}

/// Which memories a search considers.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only memories whose scope has these values (unset parts match anything).
    pub scope: Scope,
    /// Only memories of no person (the scope's subject unset): what a run for no one may see.
    pub no_subject: bool,
    /// Memories valid at this time (stored by then, not yet superseded or forgotten); `None`:
    /// valid now.
    pub at: Option<DateTime<Utc>>,
}

/// A memory as read back.
#[derive(Clone, Debug)]
pub struct Row {
    pub memory_id: String,
    pub kind: String,
    pub position: i64,
    pub content: String,
    pub scope: Scope,
    pub importance: f64,
    pub tags: Vec<String>,
    pub key: Option<String>,
    pub sources: Vec<String>,
    pub valid_from: DateTime<Utc>,
    pub valid_until: Option<DateTime<Utc>>,
    pub forgotten: bool,
}

/// The port: one adapter per store, the same behaviour (`tests/index.rs` runs one suite on both).
#[async_trait]
pub trait VectorIndex: Send + Sync {
    /// Creates the tables for vectors of `dimensions` components, if missing.
    async fn create(
        &self,
        db: &mut Db<'_>,
        tables: &Tables,
        dimensions: usize,
    ) -> Result<(), sqlx::Error>;
    /// Adds a memory (a memory already there is left as it is).
    async fn insert(&self, db: &mut Db<'_>, tables: &Tables, doc: &Doc) -> Result<(), sqlx::Error>;
    /// Adds memories, as [`VectorIndex::insert`] each in turn would.
    async fn insert_all(
        &self,
        db: &mut Db<'_>,
        tables: &Tables,
        docs: &[Doc],
    ) -> Result<(), sqlx::Error> {
        for doc in docs {
            self.insert(db, tables, doc).await?;
        }
        Ok(())
    }
    /// Ends the validity, at `doc.valid_from`, of the current memories with `doc`'s key in
    /// `doc`'s exact scope (other than `doc`).
    async fn supersede(
        &self,
        db: &mut Db<'_>,
        tables: &Tables,
        doc: &Doc,
    ) -> Result<(), sqlx::Error>;
    /// Marks a memory forgotten at `at`.
    async fn forget(
        &self,
        db: &mut Db<'_>,
        tables: &Tables,
        memory_id: &str,
        at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error>;
    /// Deletes every memory of `subjects` (rows, vectors, terms); returns their texts' hashes.
    async fn erase(
        &self,
        db: &mut Db<'_>,
        tables: &Tables,
        subjects: &[String],
    ) -> Result<Vec<String>, sqlx::Error>;
    /// Memory ids best matching `query`'s words, best first: those holding at least
    /// `min_match` (0 to 1) of its distinct terms (stop words aside), at least one.
    async fn text_search(
        &self,
        pool: &StorePool,
        query: &str,
        filter: &Filter,
        limit: usize,
        min_match: f64,
    ) -> Result<Vec<String>, sqlx::Error>;
    /// Memory ids nearest to `vector` (cosine), best first; `exact` forces an exhaustive search
    /// (the reference for recall).
    async fn vector_search(
        &self,
        pool: &StorePool,
        vector: &[f32],
        filter: &Filter,
        limit: usize,
        exact: bool,
    ) -> Result<Vec<String>, sqlx::Error>;
    /// The memories with these ids (in no particular order).
    async fn fetch(&self, pool: &StorePool, ids: &[String]) -> Result<Vec<Row>, sqlx::Error>;
    /// How many memories there are, and how many are valid now.
    async fn count(&self, pool: &StorePool) -> Result<(i64, i64), sqlx::Error>;
    /// Moves memories stored since the last call into the approximate index, some at a time;
    /// returns how many (0: none left, or another process is at it). Until then they are
    /// searched exactly.
    async fn settle(&self, _pool: &StorePool) -> Result<usize, sqlx::Error> {
        Ok(0)
    }
}

/// The PostgreSQL adapter.
pub static POSTGRES: &dyn VectorIndex = &Postgres;
/// The SQLite adapter.
pub static SQLITE: &dyn VectorIndex = &Sqlite;

/// The adapter for `pool`'s store.
pub fn for_pool(pool: &StorePool) -> &'static dyn VectorIndex {
    match pool {
        StorePool::Postgres(_) => POSTGRES,
        StorePool::Sqlite(_) => SQLITE,
    }
}

/// A suffix that keeps index names apart: a rebuild creates the tables anew beside the live
/// ones, then renames the tables but not their indexes.
fn unique() -> String {
    uuid::Uuid::now_v7().simple().to_string()[20..].to_owned()
}

/// A vector as sqlite-vec reads a blob: its floats' bytes in the machine's order. Bound so, a
/// vector is neither written out as text nor parsed back (at 100,000 memories' ingest, that
/// writing and parsing was a tenth of the time).
pub fn vector_blob(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|x| x.to_ne_bytes()).collect()
}

/// A vector as pgvector and sqlite-vec both read it from text: `[0.1,0.2,…]`.
pub fn vector_text(vector: &[f32]) -> String {
    use std::fmt::Write;
    let mut out = String::with_capacity(vector.len() * 12 + 2);
    out.push('[');
    for (i, x) in vector.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        let _ = write!(out, "{x}");
    }
    out.push(']');
    out
}

/// English stop words: PostgreSQL's `english` list (Snowball's), so that SQLite leaves out the
/// same words PostgreSQL does when it counts a query's terms.
const STOP_WORDS: &[&str] = &[
    "i",
    "me",
    "my",
    "myself",
    "we",
    "our",
    "ours",
    "ourselves",
    "you",
    "your",
    "yours",
    "yourself",
    "yourselves",
    "he",
    "him",
    "his",
    "himself",
    "she",
    "her",
    "hers",
    "herself",
    "it",
    "its",
    "itself",
    "they",
    "them",
    "their",
    "theirs",
    "themselves",
    "what",
    "which",
    "who",
    "whom",
    "this",
    "that",
    "these",
    "those",
    "am",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "have",
    "has",
    "had",
    "having",
    "do",
    "does",
    "did",
    "doing",
    "a",
    "an",
    "the",
    "and",
    "but",
    "if",
    "or",
    "because",
    "as",
    "until",
    "while",
    "of",
    "at",
    "by",
    "for",
    "with",
    "about",
    "against",
    "between",
    "into",
    "through",
    "during",
    "before",
    "after",
    "above",
    "below",
    "to",
    "from",
    "up",
    "down",
    "in",
    "out",
    "on",
    "off",
    "over",
    "under",
    "again",
    "further",
    "then",
    "once",
    "here",
    "there",
    "when",
    "where",
    "why",
    "how",
    "all",
    "any",
    "both",
    "each",
    "few",
    "more",
    "most",
    "other",
    "some",
    "such",
    "no",
    "nor",
    "not",
    "only",
    "own",
    "same",
    "so",
    "than",
    "too",
    "very",
    "s",
    "t",
    "can",
    "will",
    "just",
    "don",
    "should",
    "now",
];

/// The words of `query` that count (no stop words), for an OR of terms (`tsquery` or FTS5).
fn words(query: &str) -> Vec<String> {
    let mut words: Vec<String> = query
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(|w| w.to_lowercase())
        .filter(|w| !STOP_WORDS.contains(&w.as_str()))
        .collect();
    words.sort();
    words.dedup();
    words.truncate(64);
    words
}

/// A `WHERE` clause under construction: its conditions and their values.
struct Where<'v> {
    conditions: Vec<String>,
    values: Vec<Value<'v>>,
}

impl<'v> Where<'v> {
    fn new(values: Vec<Value<'v>>) -> Self {
        Where {
            conditions: vec!["TRUE".into()],
            values,
        }
    }

    fn bind(&mut self, value: Value<'v>) -> String {
        self.values.push(value);
        format!("${}", self.values.len())
    }

    /// The filter's conditions on the memories table aliased `m`.
    fn filter(&mut self, filter: &'v Filter, dialect: Dialect) {
        for (column, value) in columns(&filter.scope) {
            if let Some(value) = value {
                let p = self.bind(value.into());
                self.conditions.push(format!("m.{column} = {p}"));
            }
        }
        if filter.no_subject {
            self.conditions.push("m.subject_id IS NULL".into());
        }
        match filter.at {
            None => self
                .conditions
                .push("m.valid_until IS NULL AND m.forgotten = FALSE".into()),
            Some(at) => {
                let p = self.bind(match dialect {
                    Dialect::Postgres => Value::Time(Some(at)),
                    Dialect::Sqlite => Value::Int(Some(at.timestamp_micros())),
                });
                self.conditions.push(format!(
                    "m.valid_from <= {p} AND (m.valid_until IS NULL OR m.valid_until > {p})"
                ));
            }
        }
    }

    fn sql(&self) -> String {
        self.conditions.join(" AND ")
    }
}

/// How [`list`] orders memories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    /// Most important first (then newest).
    Importance,
    /// Newest first.
    Recent,
}

/// The ids of the first `limit` memories `filter` keeps, in `order` (the same SQL on both
/// stores: the scope and validity columns are the memories table's).
pub async fn list(
    pool: &StorePool,
    filter: &Filter,
    order: Order,
    limit: usize,
) -> Result<Vec<String>, sqlx::Error> {
    let dialect = match pool {
        StorePool::Postgres(_) => Dialect::Postgres,
        StorePool::Sqlite(_) => Dialect::Sqlite,
    };
    let mut w = Where::new(vec![(limit as i64).into()]);
    w.filter(filter, dialect);
    let order = match order {
        Order::Importance => "m.importance DESC, m.position DESC",
        Order::Recent => "m.position DESC",
    };
    let sql = format!(
        "SELECT m.memory_id FROM {MEMORIES} m WHERE {} ORDER BY {order} LIMIT $1",
        w.sql()
    );
    ids(Db::from(pool).fetch_all(&sql, &w.values).await?)
}

fn tags_json(tags: &[String]) -> String {
    serde_json::to_string(tags).unwrap_or_else(|_| "[]".into())
}

fn row(row: &stele_engine::store::sql::Row) -> Result<Row, sqlx::Error> {
    let list = |column: &str| -> Result<Vec<String>, sqlx::Error> {
        let text: String = row.get(column)?;
        serde_json::from_str(&text).map_err(|e| sqlx::Error::Decode(e.into()))
    };
    Ok(Row {
        memory_id: row.get("memory_id")?,
        kind: row.get("kind")?,
        position: row.get("position")?,
        content: row.get("content")?,
        scope: Scope {
            agent: row.get("agent")?,
            conversation: row.get("conversation")?,
            subject: row.get("subject_id")?,
            workflow: row.get("workflow")?,
            tenant: row.get("tenant")?,
        },
        importance: row.get("importance")?,
        tags: list("tags")?,
        key: row.get("fact_key")?,
        sources: list("sources")?,
        valid_from: row.time("valid_from")?,
        valid_until: row.optional_time("valid_until")?,
        forgotten: row.get::<bool>("forgotten")?,
    })
}

const COLUMNS: &str = "memory_id, kind, position, content, text_sha256, agent, conversation, \
                       subject_id, workflow, tenant, importance, tags, fact_key, sources, \
                       valid_from";

fn insert_values(doc: &Doc) -> Vec<Value<'_>> {
    vec![
        (&doc.memory_id).into(),
        (&doc.kind).into(),
        doc.position.into(),
        (&doc.content).into(),
        (&doc.text_sha256).into(),
        (&doc.scope.agent).into(),
        (&doc.scope.conversation).into(),
        (&doc.scope.subject).into(),
        (&doc.scope.workflow).into(),
        (&doc.scope.tenant).into(),
        doc.importance.into(),
    ]
}

/// A lexeme `r.lexeme` as a `tsquery` operand: quoted, its quotes and backslashes doubled.
const QUOTED_LEXEME: &str = r"'''' || replace(replace(r.lexeme, '\', '\\'), '''', '''''') || ''''";

/// pgvector HNSW (cosine) + `tsvector` with a GIN index.
struct Postgres;

#[async_trait]
impl VectorIndex for Postgres {
    async fn create(
        &self,
        db: &mut Db<'_>,
        tables: &Tables,
        dimensions: usize,
    ) -> Result<(), sqlx::Error> {
        let m = tables.name(MEMORIES);
        db.execute("CREATE EXTENSION IF NOT EXISTS vector", &[])
            .await?;
        // Vectors and terms are columns of `memories` here; the other two tables exist (empty)
        // so that both stores have the projection's tables.
        for base in [VECTORS, TERMS, BITS] {
            db.execute(
                &format!(
                    "CREATE TABLE IF NOT EXISTS {} (unused int)",
                    tables.name(base)
                ),
                &[],
            )
            .await?;
        }
        let exists = db
            .fetch_one(
                "SELECT to_regclass($1) IS NOT NULL AS found",
                &[m.as_str().into()],
            )
            .await?
            .get::<bool>("found")?;
        if exists {
            let settled = db
                .fetch_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_attribute \
                       WHERE attrelid = $1::regclass AND attname = 'indexed') AS found",
                    &[m.as_str().into()],
                )
                .await?
                .get::<bool>("found")?;
            if !settled {
                // A table from before fresh memories: its HNSW index holds every row, and
                // goes on doing so (new rows too are inserted into it as they come).
                db.execute(
                    &format!("ALTER TABLE {m} ADD COLUMN indexed boolean NOT NULL DEFAULT true"),
                    &[],
                )
                .await?;
                db.execute(
                    &format!(
                        "CREATE INDEX {m}_fresh_{} ON {m} (position) WHERE NOT indexed",
                        unique()
                    ),
                    &[],
                )
                .await?;
            }
            return Ok(());
        }
        db.execute(
            &format!(
                "CREATE TABLE IF NOT EXISTS {m} (
                    memory_id text PRIMARY KEY,
                    kind text NOT NULL,
                    position bigint NOT NULL,
                    content text NOT NULL,
                    text_sha256 text NOT NULL,
                    agent text, conversation text, subject_id text, workflow text, tenant text,
                    importance float8 NOT NULL,
                    tags text NOT NULL,
                    fact_key text,
                    sources text NOT NULL,
                    valid_from timestamptz NOT NULL,
                    valid_until timestamptz,
                    forgotten boolean NOT NULL DEFAULT false,
                    indexed boolean NOT NULL DEFAULT false,
                    embedding vector({dimensions}) NOT NULL,
                    terms tsvector NOT NULL)"
            ),
            &[],
        )
        .await?;
        for (suffix, definition) in [
            ("embedding", HNSW),
            ("fresh", "(position) WHERE NOT indexed"),
            ("terms", "USING gin (terms)"),
            ("agent", "(agent)"),
            ("conversation", "(conversation)"),
            ("subject", "(subject_id)"),
            ("workflow", "(workflow)"),
            ("tenant", "(tenant)"),
            ("key", "(fact_key) WHERE fact_key IS NOT NULL"),
        ] {
            db.execute(
                &format!("CREATE INDEX {m}_{suffix}_{} ON {m} {definition}", unique()),
                &[],
            )
            .await?;
        }
        Ok(())
    }

    async fn insert(&self, db: &mut Db<'_>, tables: &Tables, doc: &Doc) -> Result<(), sqlx::Error> {
        self.insert_all(db, tables, std::slice::from_ref(doc)).await
    }

    /// One statement for the batch, each column bound as an array (a statement per memory
    /// cost a round trip each: most of the ingest's time at 100,000 memories).
    async fn insert_all(
        &self,
        db: &mut Db<'_>,
        tables: &Tables,
        docs: &[Doc],
    ) -> Result<(), sqlx::Error> {
        let m = tables.name(MEMORIES);
        let texts: Vec<[String; 3]> = docs
            .iter()
            .map(|doc| {
                [
                    tags_json(&doc.tags),
                    tags_json(&doc.sources),
                    vector_text(&doc.vector),
                ]
            })
            .collect();
        let rows: Vec<Vec<Value<'_>>> = docs
            .iter()
            .zip(&texts)
            .map(|(doc, [tags, sources, vector])| {
                let mut values = insert_values(doc);
                values.extend([
                    Value::from(tags),
                    (&doc.key).into(),
                    sources.into(),
                    Value::Time(Some(doc.valid_from)),
                    vector.into(),
                    (&doc.text).into(),
                ]);
                values
            })
            .collect();
        db.execute_rows(
            &format!(
                "INSERT INTO {m} ({COLUMNS}, embedding, terms) \
                 SELECT {COLUMNS}, e::vector, to_tsvector('english', t) \
                 FROM UNNEST($1::text[], $2::text[], $3::int8[], $4::text[], $5::text[], \
                   $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], $11::float8[], \
                   $12::text[], $13::text[], $14::text[], $15::timestamptz[], $16::text[], \
                   $17::text[]) \
                   AS r({COLUMNS}, e, t) \
                 ON CONFLICT (memory_id) DO NOTHING"
            ),
            &rows,
        )
        .await
    }

    async fn supersede(
        &self,
        db: &mut Db<'_>,
        tables: &Tables,
        doc: &Doc,
    ) -> Result<(), sqlx::Error> {
        supersede(
            db,
            tables,
            doc,
            "IS NOT DISTINCT FROM",
            Value::Time(Some(doc.valid_from)),
            "position",
        )
        .await?;
        Ok(())
    }

    async fn forget(
        &self,
        db: &mut Db<'_>,
        tables: &Tables,
        memory_id: &str,
        at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let m = tables.name(MEMORIES);
        db.execute(
            &format!(
                "UPDATE {m} SET forgotten = true, valid_until = COALESCE(valid_until, $2) \
                 WHERE memory_id = $1"
            ),
            &[memory_id.into(), Value::Time(Some(at))],
        )
        .await?;
        Ok(())
    }

    async fn erase(
        &self,
        db: &mut Db<'_>,
        tables: &Tables,
        subjects: &[String],
    ) -> Result<Vec<String>, sqlx::Error> {
        let m = tables.name(MEMORIES);
        db.fetch_all(
            &format!("DELETE FROM {m} WHERE subject_id = ANY($1) RETURNING text_sha256"),
            &[Value::Texts(subjects)],
        )
        .await?
        .iter()
        .map(|r| r.get("text_sha256"))
        .collect()
    }

    async fn text_search(
        &self,
        pool: &StorePool,
        query: &str,
        filter: &Filter,
        limit: usize,
        min_match: f64,
    ) -> Result<Vec<String>, sqlx::Error> {
        let words = words(query).join(" ");
        if words.is_empty() {
            return Ok(Vec::new());
        }
        let mut w = Where::new(vec![
            (&words).into(),
            (limit as i64).into(),
            min_match.clamp(0.0, 1.0).into(),
        ]);
        w.filter(filter, Dialect::Postgres);
        // Rows holding at least `min_match` of the query's lexemes (`ts_delete` takes them out:
        // the row's lexemes that go are those it holds), ranked over all of them (an OR of
        // terms) by frequency over the log of the memory's length (normalisation 1, as BM25
        // weighs long texts down). A row holding `need` of `n` lexemes holds one of any
        // `n - need + 1` of them, so the index is asked only for rows holding one of the
        // rarest `n - need + 1`: the same rows, without reading the common terms' long lists.
        // Rarity is the planner's statistics of the column (`most_common_elems`, kept by
        // ANALYZE; a lexeme not among them is rarer than all that are).
        let sql = format!(
            "WITH l AS (SELECT lexeme, COALESCE(s.freq, 0) AS freq \
                        FROM unnest(tsvector_to_array(to_tsvector('english', $1))) AS lexeme \
                        LEFT JOIN (SELECT u.elem, u.freq FROM pg_stats p, \
                                     unnest(p.most_common_elems::text::text[], \
                                            p.most_common_elem_freqs) AS u(elem, freq) \
                                   WHERE p.schemaname = current_schema() \
                                     AND p.tablename = '{MEMORIES}' AND p.attname = 'terms') s \
                          ON s.elem = lexeme), \
                  n AS (SELECT count(*) AS n, ceil($3 * count(*)) AS need FROM l), \
                  q AS (SELECT replace(plainto_tsquery('english', $1)::text, '&', '|')::tsquery AS q, \
                               (SELECT array_agg(lexeme) FROM l) AS lexemes, \
                               (SELECT string_agg({QUOTED_LEXEME}, ' | ') \
                                FROM (SELECT lexeme FROM l ORDER BY freq, lexeme \
                                      LIMIT (SELECT n - need + 1 FROM n)) r)::tsquery AS rare) \
             SELECT m.memory_id FROM {MEMORIES} m \
             WHERE m.terms @@ (SELECT rare FROM q) AND {} \
               AND length(m.terms) - length(ts_delete(m.terms, (SELECT lexemes FROM q))) \
                   >= (SELECT need FROM n) \
             ORDER BY ts_rank(m.terms, (SELECT q FROM q), 1) DESC, m.memory_id LIMIT $2",
            w.sql()
        );
        ids(Db::from(pool).fetch_all(&sql, &w.values).await?)
    }

    async fn vector_search(
        &self,
        pool: &StorePool,
        vector: &[f32],
        filter: &Filter,
        limit: usize,
        exact: bool,
    ) -> Result<Vec<String>, sqlx::Error> {
        let text = vector_text(vector);
        let mut db = Db::from(pool);
        let mut w = Where::new(vec![(&text).into(), (limit as i64).into()]);
        w.filter(filter, Dialect::Postgres);
        let unfiltered = columns(&filter.scope).iter().all(|(_, v)| v.is_none())
            && !filter.no_subject
            && filter.at.is_none();
        // What share of the rows the filter keeps: all but the few superseded or forgotten
        // when it names no scope, else counted up to EXACT_BELOW (below that, exact).
        let selectivity = if exact {
            None
        } else if unfiltered {
            Some(1.0)
        } else {
            let mut only = Where::new(Vec::new());
            only.filter(filter, Dialect::Postgres);
            let sql = format!(
                "SELECT count(*) AS n FROM (SELECT 1 FROM {MEMORIES} m WHERE {} LIMIT {EXACT_BELOW}) t",
                only.sql()
            );
            let kept = db.fetch_one(&sql, &only.values).await?.get::<i64>("n")?;
            if kept < EXACT_BELOW {
                None
            } else {
                // The count stopped at EXACT_BELOW, so this errs low (more candidates); the
                // table's size is the planner's estimate (counted only while the table was
                // never analysed), not a count on every search.
                let total: f64 = db
                    .fetch_one(
                        &format!(
                            "SELECT GREATEST(CASE WHEN reltuples < 0 \
                               THEN (SELECT count(*) FROM {MEMORIES}) ELSE reltuples END, 1)::float8 \
                             AS total FROM pg_class WHERE oid = '{MEMORIES}'::regclass"
                        ),
                        &[],
                    )
                    .await?
                    .get("total")?;
                Some(kept as f64 / total)
            }
        };
        let Some(selectivity) = selectivity else {
            // Exact: no index on the distance, so every kept row is compared.
            let sql = format!(
                "SELECT m.memory_id FROM {MEMORIES} m WHERE {} \
                 ORDER BY (m.embedding <=> {QUERY_VECTOR}) + 0, m.memory_id LIMIT $2",
                w.sql()
            );
            return ids(db.fetch_all(&sql, &w.values).await?);
        };
        // Approximate over the settled rows (the HNSW index holds those only): enough
        // candidates that the filter leaves `limit` of them; exact over the fresh ones (few:
        // `settle` moves them into the index behind the ingest), both ranked together. The
        // index scan weighs at least MIN_EF_SEARCH candidates but hands over only as many as
        // the filter needs (each one handed over is read from the table: 400 instead of 100
        // cost 2.5 ms more).
        let candidates = ((limit as f64 / selectivity.clamp(0.001, 1.0)) * 2.0)
            .ceil()
            .clamp(100.0, 1_000.0) as i64;
        let ef_search = candidates.max(MIN_EF_SEARCH);
        let sql = format!(
            "SELECT memory_id FROM ( \
               SELECT m.memory_id, m.embedding <=> {QUERY_VECTOR} AS d FROM ( \
                 SELECT * FROM {MEMORIES} WHERE indexed \
                 ORDER BY embedding <=> {QUERY_VECTOR} LIMIT {candidates}) m WHERE {w} \
               UNION \
               SELECT m.memory_id, (m.embedding <=> {QUERY_VECTOR}) + 0 AS d FROM {MEMORIES} m \
               WHERE NOT m.indexed AND {w}) t \
             ORDER BY d, memory_id LIMIT $2",
            w = w.sql()
        );
        db.execute(&format!("SET hnsw.ef_search = {ef_search}"), &[])
            .await?;
        let found = db.fetch_all(&sql, &w.values).await;
        db.execute("RESET hnsw.ef_search", &[]).await?;
        ids(found?)
    }

    async fn fetch(&self, pool: &StorePool, ids: &[String]) -> Result<Vec<Row>, sqlx::Error> {
        Db::from(pool)
            .fetch_all(
                &format!("SELECT {COLUMNS}, valid_until, forgotten FROM {MEMORIES} WHERE memory_id = ANY($1)"),
                &[Value::Texts(ids)],
            )
            .await?
            .iter()
            .map(row)
            .collect()
    }

    async fn count(&self, pool: &StorePool) -> Result<(i64, i64), sqlx::Error> {
        counts(&mut Db::from(pool)).await
    }

    async fn settle(&self, pool: &StorePool) -> Result<usize, sqlx::Error> {
        let mut db = Db::from(pool);
        let exists = db
            .fetch_one(
                &format!("SELECT to_regclass('{MEMORIES}') IS NOT NULL AS found"),
                &[],
            )
            .await?
            .get::<bool>("found")?;
        if !exists {
            return Ok(0);
        }
        // One settler at a time on the whole store (a session lock, on the connection `db`
        // holds; PostgreSQL lets it go if the process dies).
        let locked = db
            .fetch_one(
                "SELECT pg_try_advisory_lock(hashtext('stele.memories.settle')) AS locked",
                &[],
            )
            .await?
            .get::<bool>("locked")?;
        if !locked {
            return Ok(0);
        }
        let settled = settle_locked(&mut db).await;
        let unlocked = db
            .execute(
                "SELECT pg_advisory_unlock(hashtext('stele.memories.settle'))",
                &[],
            )
            .await;
        let settled = settled?;
        unlocked?;
        Ok(settled)
    }
}

/// [`VectorIndex::settle`] on PostgreSQL, under its lock: fresh rows flagged `indexed` in
/// batches (each flag inserts the row into the partial HNSW index), or, when they are many and
/// most of the table (a rebuild, a bulk load), the index dropped, all rows flagged and the
/// index built anew — also when a build was interrupted (no valid index left).
async fn settle_locked(db: &mut Db<'_>) -> Result<usize, sqlx::Error> {
    let index = db
        .fetch_optional(
            &format!(
                "SELECT c.relname AS name, i.indisvalid AS valid FROM pg_index i \
                 JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam \
                 WHERE i.indrelid = '{MEMORIES}'::regclass AND a.amname = 'hnsw'"
            ),
            &[],
        )
        .await?;
    let valid = match &index {
        Some(row) => row.get::<bool>("valid")?,
        None => false,
    };
    let fresh = db
        .fetch_one(
            &format!(
                "SELECT count(*) AS n FROM \
                 (SELECT 1 FROM {MEMORIES} WHERE NOT indexed LIMIT {BUILD_FROM}) t"
            ),
            &[],
        )
        .await?
        .get::<i64>("n")?;
    let build = !valid || {
        fresh >= BUILD_FROM && {
            let counts = db
                .fetch_one(
                    &format!(
                        "SELECT count(*) AS total, count(*) FILTER (WHERE NOT indexed) AS fresh \
                         FROM {MEMORIES}"
                    ),
                    &[],
                )
                .await?;
            counts.get::<i64>("fresh")? * 2 >= counts.get::<i64>("total")?
        }
    };
    if !build {
        if fresh == 0 {
            return Ok(0);
        }
        let flagged = db
            .execute(
                &format!(
                    "UPDATE {MEMORIES} SET indexed = true WHERE memory_id IN \
                     (SELECT memory_id FROM {MEMORIES} WHERE NOT indexed \
                      ORDER BY position LIMIT {SETTLE_BATCH})"
                ),
                &[],
            )
            .await?;
        return Ok(flagged as usize);
    }
    if let Some(row) = index {
        let name: String = row.get("name")?;
        db.execute(
            &format!("DROP INDEX CONCURRENTLY IF EXISTS \"{name}\""),
            &[],
        )
        .await?;
    }
    let flagged = db
        .execute(
            &format!("UPDATE {MEMORIES} SET indexed = true WHERE NOT indexed"),
            &[],
        )
        .await?;
    // A graph that fits in `maintenance_work_mem` is built in memory (much faster).
    db.execute("SET maintenance_work_mem = '1GB'", &[]).await?;
    let built = db
        .execute(
            &format!(
                "CREATE INDEX CONCURRENTLY {MEMORIES}_embedding_{} ON {MEMORIES} {HNSW}",
                unique()
            ),
            &[],
        )
        .await;
    db.execute("RESET maintenance_work_mem", &[]).await?;
    built?;
    Ok(flagged.max(1) as usize)
}

async fn counts(db: &mut Db<'_>) -> Result<(i64, i64), sqlx::Error> {
    let row = db
        .fetch_one(
            &format!(
                "SELECT count(*) AS total, \
                 count(*) FILTER (WHERE valid_until IS NULL AND forgotten = FALSE) AS valid \
                 FROM {MEMORIES}"
            )
            .replace(
                "count(*) FILTER (WHERE valid_until IS NULL AND forgotten = FALSE)",
                match db.dialect() {
                    Dialect::Postgres => {
                        "count(*) FILTER (WHERE valid_until IS NULL AND forgotten = FALSE)"
                    }
                    Dialect::Sqlite => "COALESCE(SUM(valid_until IS NULL AND forgotten = 0), 0)",
                },
            ),
            &[],
        )
        .await?;
    Ok((row.get("total")?, row.get("valid")?))
}

fn ids(rows: Vec<stele_engine::store::sql::Row>) -> Result<Vec<String>, sqlx::Error> {
    rows.iter().map(|r| r.get("memory_id")).collect()
}

/// Ends the validity of the memories `doc` supersedes; returns their row ids (`id` on SQLite).
async fn supersede(
    db: &mut Db<'_>,
    tables: &Tables,
    doc: &Doc,
    same: &str,
    at: Value<'_>,
    returning: &str,
) -> Result<Vec<i64>, sqlx::Error> {
    let Some(key) = &doc.key else {
        return Ok(Vec::new());
    };
    let m = tables.name(MEMORIES);
    let mut values = vec![key.into(), (&doc.memory_id).into(), at];
    let mut conditions = Vec::new();
    for (column, value) in columns(&doc.scope) {
        values.push(value.into());
        conditions.push(format!("{column} {same} ${}", values.len()));
    }
    db.fetch_all(
        &format!(
            "UPDATE {m} SET valid_until = $3 WHERE fact_key = $1 AND memory_id <> $2 \
             AND valid_until IS NULL AND {} RETURNING {returning} AS id",
            conditions.join(" AND ")
        ),
        &values,
    )
    .await?
    .iter()
    .map(|r| r.get("id"))
    .collect()
}

/// The vectors as a column of `memories` (`f32` blobs, compared with sqlite-vec's
/// `vec_distance_cosine`), their signs in a `vec0` table (the scope as metadata columns),
/// FTS5 without content.
struct Sqlite;

/// The scope as `vec0` metadata columns hold it (they hold no NULL: none is "").
fn meta(value: &Option<String>) -> &str {
    value.as_deref().unwrap_or("")
}

#[async_trait]
impl VectorIndex for Sqlite {
    async fn create(
        &self,
        db: &mut Db<'_>,
        tables: &Tables,
        dimensions: usize,
    ) -> Result<(), sqlx::Error> {
        let (m, v, t) = (
            tables.name(MEMORIES),
            tables.name(VECTORS),
            tables.name(TERMS),
        );
        let b = tables.name(BITS);
        let present = db
            .fetch_one(
                "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = $1) AS memories, \
                        EXISTS (SELECT 1 FROM sqlite_master WHERE name = $2) AS bits, \
                        EXISTS (SELECT 1 FROM pragma_table_info($1) WHERE name = 'embedding') \
                          AS embedded",
                &[m.as_str().into(), b.as_str().into()],
            )
            .await?;
        let bits_table = format!(
            "CREATE VIRTUAL TABLE IF NOT EXISTS {b} USING vec0(
                bits bit[{}],
                agent text, conversation text, subject_id text, workflow text, tenant text,
                current integer)",
            // Signs of a vector whose length is no multiple of 8 are not kept (never searched).
            if dimensions.is_multiple_of(8) {
                dimensions
            } else {
                8
            }
        );
        // The vectors are a column of `memories` (read by row id to rank candidates); the
        // table of that name exists (empty) so that both stores have the projection's tables.
        let vectors_table = format!("CREATE TABLE IF NOT EXISTS {v} (unused int)");
        if present.get::<bool>("memories")? {
            if present.get::<bool>("embedded")? {
                return Ok(());
            }
            // A store from before: the vectors (and the scope, current or not) were in a
            // `vec0` table of floats; the signs are made from it (unless a store in between
            // made them), the vectors move into `memories`, and it goes.
            if !present.get::<bool>("bits")? {
                db.execute(&bits_table, &[]).await?;
                if dimensions.is_multiple_of(8) {
                    db.execute(
                        &format!(
                            "INSERT INTO {b} (rowid, bits, agent, conversation, subject_id, \
                             workflow, tenant, current) SELECT rowid, \
                             vec_quantize_binary(embedding), agent, conversation, subject_id, \
                             workflow, tenant, current FROM {v}"
                        ),
                        &[],
                    )
                    .await?;
                }
            }
            db.execute(&format!("ALTER TABLE {m} ADD COLUMN embedding BLOB"), &[])
                .await?;
            db.execute(
                &format!(
                    "UPDATE {m} SET embedding = (SELECT embedding FROM {v} WHERE rowid = {m}.id)"
                ),
                &[],
            )
            .await?;
            db.execute(&format!("DROP TABLE {v}"), &[]).await?;
            db.execute(&vectors_table, &[]).await?;
            return Ok(());
        }
        db.execute(
            &format!(
                "CREATE TABLE IF NOT EXISTS {m} (
                    id INTEGER PRIMARY KEY,
                    memory_id TEXT NOT NULL UNIQUE,
                    kind TEXT NOT NULL,
                    position INTEGER NOT NULL,
                    content TEXT NOT NULL,
                    text_sha256 TEXT NOT NULL,
                    agent TEXT, conversation TEXT, subject_id TEXT, workflow TEXT, tenant TEXT,
                    importance REAL NOT NULL,
                    tags TEXT NOT NULL,
                    fact_key TEXT,
                    sources TEXT NOT NULL,
                    valid_from INTEGER NOT NULL,
                    valid_until INTEGER,
                    forgotten INTEGER NOT NULL DEFAULT 0,
                    embedding BLOB)"
            ),
            &[],
        )
        .await?;
        for (suffix, column) in [
            ("agent", "agent"),
            ("conversation", "conversation"),
            ("subject", "subject_id"),
            ("workflow", "workflow"),
            ("tenant", "tenant"),
            ("key", "fact_key"),
        ] {
            db.execute(
                &format!("CREATE INDEX {m}_{suffix}_{} ON {m} ({column})", unique()),
                &[],
            )
            .await?;
        }
        db.execute(&vectors_table, &[]).await?;
        db.execute(
            &format!(
                "CREATE VIRTUAL TABLE IF NOT EXISTS {t} USING fts5(text, content='', \
                 contentless_delete=1, tokenize='porter unicode61 remove_diacritics 2')"
            ),
            &[],
        )
        .await?;
        db.execute(&bits_table, &[]).await?;
        Ok(())
    }

    async fn insert(&self, db: &mut Db<'_>, tables: &Tables, doc: &Doc) -> Result<(), sqlx::Error> {
        let (m, t, b) = (tables.name(MEMORIES), tables.name(TERMS), tables.name(BITS));
        let tags = tags_json(&doc.tags);
        let sources = tags_json(&doc.sources);
        let mut values = insert_values(doc);
        let vector = vector_blob(&doc.vector);
        values.extend([
            Value::from(&tags),
            (&doc.key).into(),
            (&sources).into(),
            Value::Int(Some(doc.valid_from.timestamp_micros())),
            Value::Bytes(&vector),
        ]);
        let inserted = db
            .fetch_optional(
                &format!(
                    "INSERT INTO {m} ({COLUMNS}, embedding) VALUES ($1, $2, $3, $4, $5, $6, $7, \
                     $8, $9, $10, $11, $12, $13, $14, $15, vec_f32($16)) \
                     ON CONFLICT (memory_id) DO NOTHING RETURNING id"
                ),
                &values,
            )
            .await?;
        let Some(inserted) = inserted else {
            return Ok(());
        };
        let id: i64 = inserted.get("id")?;
        let s = &doc.scope;
        if doc.vector.len().is_multiple_of(8) {
            db.execute(
                &format!(
                    "INSERT INTO {b} (rowid, bits, agent, conversation, subject_id, workflow, \
                     tenant, current) VALUES ($1, vec_quantize_binary(vec_f32($2)), $3, $4, $5, \
                     $6, $7, 1)"
                ),
                &[
                    id.into(),
                    Value::Bytes(&vector),
                    meta(&s.agent).into(),
                    meta(&s.conversation).into(),
                    meta(&s.subject).into(),
                    meta(&s.workflow).into(),
                    meta(&s.tenant).into(),
                ],
            )
            .await?;
        }
        db.execute(
            &format!("INSERT INTO {t} (rowid, text) VALUES ($1, $2)"),
            &[id.into(), (&doc.text).into()],
        )
        .await?;
        Ok(())
    }

    async fn supersede(
        &self,
        db: &mut Db<'_>,
        tables: &Tables,
        doc: &Doc,
    ) -> Result<(), sqlx::Error> {
        let ended = supersede(
            db,
            tables,
            doc,
            "IS",
            Value::Int(Some(doc.valid_from.timestamp_micros())),
            "id",
        )
        .await?;
        not_current(db, tables, &ended).await
    }

    async fn forget(
        &self,
        db: &mut Db<'_>,
        tables: &Tables,
        memory_id: &str,
        at: DateTime<Utc>,
    ) -> Result<(), sqlx::Error> {
        let m = tables.name(MEMORIES);
        let ended: Vec<i64> = db
            .fetch_all(
                &format!(
                    "UPDATE {m} SET forgotten = 1, valid_until = COALESCE(valid_until, $2) \
                     WHERE memory_id = $1 RETURNING id"
                ),
                &[memory_id.into(), Value::Int(Some(at.timestamp_micros()))],
            )
            .await?
            .iter()
            .map(|r| r.get("id"))
            .collect::<Result<_, _>>()?;
        not_current(db, tables, &ended).await
    }

    async fn erase(
        &self,
        db: &mut Db<'_>,
        tables: &Tables,
        subjects: &[String],
    ) -> Result<Vec<String>, sqlx::Error> {
        let (m, t, b) = (tables.name(MEMORIES), tables.name(TERMS), tables.name(BITS));
        let gone = db
            .fetch_all(
                &format!(
                    "DELETE FROM {m} WHERE subject_id IN (SELECT value FROM json_each($1)) \
                     RETURNING id, text_sha256"
                ),
                &[Value::Texts(subjects)],
            )
            .await?;
        let mut hashes = Vec::with_capacity(gone.len());
        for row in &gone {
            let id: i64 = row.get("id")?;
            db.execute(&format!("DELETE FROM {t} WHERE rowid = $1"), &[id.into()])
                .await?;
            db.execute(&format!("DELETE FROM {b} WHERE rowid = $1"), &[id.into()])
                .await?;
            hashes.push(row.get("text_sha256")?);
        }
        Ok(hashes)
    }

    async fn text_search(
        &self,
        pool: &StorePool,
        query: &str,
        filter: &Filter,
        limit: usize,
        min_match: f64,
    ) -> Result<Vec<String>, sqlx::Error> {
        let words = words(query);
        if words.is_empty() {
            return Ok(Vec::new());
        }
        let quoted: Vec<String> = words
            .iter()
            .map(|w| format!("\"{}\"", w.replace('"', "\"\"")))
            .collect();
        let any = quoted.join(" OR ");
        let mut db = Db::from(pool);
        let need = (min_match.clamp(0.0, 1.0) * quoted.len() as f64).ceil() as usize;
        // A row holding `need` of the terms holds one of any `len - need + 1` of them: the rows
        // holding one of the rarest that many are all there is to rank (each term's rows
        // counted up to a cap, in one statement), and the terms held are counted in those only.
        let rare = if need > 1 {
            let counts: Vec<String> = (1..=quoted.len())
                .map(|i| {
                    format!(
                        "(SELECT count(*) FROM (SELECT 1 FROM {TERMS} WHERE {TERMS} MATCH ${i} \
                         LIMIT {RARE_CAP})) AS n{i}"
                    )
                })
                .collect();
            let values: Vec<Value<'_>> = quoted.iter().map(|q| q.into()).collect();
            let row = db
                .fetch_one(&format!("SELECT {}", counts.join(", ")), &values)
                .await?;
            let mut by_count = Vec::with_capacity(quoted.len());
            for (i, term) in quoted.iter().enumerate() {
                by_count.push((row.get::<i64>(&format!("n{}", i + 1))?, term));
            }
            by_count.sort();
            let rare: Vec<&str> = by_count
                .iter()
                .take(quoted.len() - need + 1)
                .map(|(_, term)| term.as_str())
                .collect();
            Some(format!("({})", rare.join(" OR ")))
        } else {
            None
        };
        let held_in: Vec<String> = match &rare {
            Some(rare) => quoted.iter().map(|t| format!("{rare} AND {t}")).collect(),
            None => Vec::new(),
        };
        let mut w = Where::new(vec![(&any).into(), (limit as i64).into()]);
        w.filter(filter, Dialect::Sqlite);
        if let Some(rare) = &rare {
            // `+`: not a constraint FTS5 is asked to use (it would run the ranked query once
            // per row), a filter on its rows.
            let p = w.bind(rare.into());
            w.conditions.push(format!(
                "+t.rowid IN (SELECT rowid FROM {TERMS} WHERE {TERMS} MATCH {p})"
            ));
            // How many of the terms a row holds: one set of rows per term, among the rare
            // terms' rows (SQLite evaluates each `IN (SELECT …)` once).
            let held: Vec<String> = held_in
                .iter()
                .map(|term| {
                    let p = w.bind(term.into());
                    format!("(m.id IN (SELECT rowid FROM {TERMS} WHERE {TERMS} MATCH {p}))")
                })
                .collect();
            w.conditions.push(format!("{} >= {need}", held.join(" + ")));
        }
        let sql = format!(
            "SELECT m.memory_id FROM {TERMS} t JOIN {MEMORIES} m ON m.id = t.rowid \
             WHERE {TERMS} MATCH $1 AND {} ORDER BY bm25({TERMS}), m.memory_id LIMIT $2",
            w.sql()
        );
        ids(db.fetch_all(&sql, &w.values).await?)
    }

    async fn vector_search(
        &self,
        pool: &StorePool,
        vector: &[f32],
        filter: &Filter,
        limit: usize,
        exact: bool,
    ) -> Result<Vec<String>, sqlx::Error> {
        let blob = vector_blob(vector);
        let mut db = Db::from(pool);
        if exact || filter.at.is_some() || !vector.len().is_multiple_of(8) {
            // Every vector the filter keeps compared (another moment: the validity is in the
            // memories table).
            let mut w = Where::new(vec![Value::Bytes(&blob), (limit as i64).into()]);
            w.filter(filter, Dialect::Sqlite);
            let sql = format!(
                "SELECT m.memory_id FROM {MEMORIES} m WHERE {} AND m.embedding IS NOT NULL \
                 ORDER BY vec_distance_cosine(m.embedding, vec_f32($1)), m.memory_id LIMIT $2",
                w.sql()
            );
            return ids(db.fetch_all(&sql, &w.values).await?);
        }
        // `vec0` scans every row's signs (48 bytes for 384 dimensions, compared by Hamming
        // distance) applying the metadata conditions as it goes; the closest candidates are
        // ranked by their vectors (cosine), each read from its row by id.
        let mut values: Vec<Value<'_>> = vec![Value::Bytes(&blob), (limit as i64).into()];
        let mut conditions = vec!["v.current = 1".to_owned()];
        for (column, value) in columns(&filter.scope) {
            if let Some(value) = value {
                values.push(value.into());
                conditions.push(format!("v.{column} = ${}", values.len()));
            }
        }
        if filter.no_subject {
            // Metadata columns hold '' for an unset part.
            conditions.push("v.subject_id = ''".to_owned());
        }
        let candidates = (limit * 8).clamp(RESCORED, 4_096) as i64;
        values.push(candidates.into());
        let sql = format!(
            "WITH c AS (SELECT v.rowid FROM {BITS} v \
               WHERE v.bits MATCH vec_quantize_binary(vec_f32($1)) AND v.k = ${} AND {}) \
             SELECT m.memory_id FROM c JOIN {MEMORIES} m ON m.id = c.rowid \
             ORDER BY vec_distance_cosine(m.embedding, vec_f32($1)), m.memory_id LIMIT $2",
            values.len(),
            conditions.join(" AND ")
        );
        ids(db.fetch_all(&sql, &values).await?)
    }

    async fn fetch(&self, pool: &StorePool, ids: &[String]) -> Result<Vec<Row>, sqlx::Error> {
        Db::from(pool)
            .fetch_all(
                &format!(
                    "SELECT {COLUMNS}, valid_until, forgotten FROM {MEMORIES} \
                     WHERE memory_id IN (SELECT value FROM json_each($1))"
                ),
                &[Value::Texts(ids)],
            )
            .await?
            .iter()
            .map(row)
            .collect()
    }

    async fn count(&self, pool: &StorePool) -> Result<(i64, i64), sqlx::Error> {
        counts(&mut Db::from(pool)).await
    }
}

/// Takes these rows out of the current signs (`vec0`), which approximate searches scan.
async fn not_current(db: &mut Db<'_>, tables: &Tables, ids: &[i64]) -> Result<(), sqlx::Error> {
    let b = tables.name(BITS);
    for id in ids {
        db.execute(
            &format!("UPDATE {b} SET current = 0 WHERE rowid = $1"),
            &[(*id).into()],
        )
        .await?;
    }
    Ok(())
}

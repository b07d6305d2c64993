//! Fakes for the embedding adapters, real HTTP on `127.0.0.1:0`:
//!
//! - [`FakeEmbeddings`] speaks the OpenAI embeddings JSON and records what it receives;
//! - [`FakeHub`] serves a model folder the way the Hugging Face hub does (file list, `resolve`
//!   URLs with ranges, etag and commit headers), for the `hf:` download.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::{json, Value};

/// How the fake embeddings server answers.
#[derive(Debug, Clone)]
pub enum Answer {
    /// 200 with one vector per input, listed in reverse order (clients must follow `index`).
    /// Input `i`'s vector is `[len(text), i + 1, 0, …]` with `dimensions` components.
    Vectors { dimensions: usize },
    /// This status and body.
    Status(u16, &'static str),
}

/// A request the server received.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Value,
}

#[derive(Debug)]
struct Shared {
    answer: Answer,
    received: Mutex<Vec<Received>>,
}

/// A running fake OpenAI embeddings server; it stops with the test's runtime.
#[derive(Debug, Clone)]
pub struct FakeEmbeddings {
    /// The server's root, e.g. `http://127.0.0.1:40123` (requests go to `/v1/embeddings`).
    pub base_url: String,
    shared: Arc<Shared>,
}

impl FakeEmbeddings {
    pub async fn start(answer: Answer) -> Self {
        let shared = Arc::new(Shared {
            answer,
            received: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/embeddings", post(embeddings))
            .with_state(shared.clone());
        Self {
            base_url: serve(app).await,
            shared,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }
}

async fn embeddings(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    shared.received.lock().unwrap().push(Received {
        headers,
        body: body.clone(),
    });
    match &shared.answer {
        Answer::Status(status, text) => (
            StatusCode::from_u16(*status).unwrap(),
            [(header::CONTENT_TYPE, "application/json")],
            *text,
        )
            .into_response(),
        Answer::Vectors { dimensions } => {
            let inputs = body["input"].as_array().cloned().unwrap_or_default();
            let mut data: Vec<Value> = inputs
                .iter()
                .enumerate()
                .map(|(index, text)| {
                    let mut vector = vec![0.0f32; *dimensions];
                    vector[0] = text.as_str().unwrap_or("").len() as f32;
                    vector[1] = (index + 1) as f32;
                    json!({"object": "embedding", "index": index, "embedding": vector})
                })
                .collect();
            data.reverse();
            axum::Json(json!({
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": 8, "total_tokens": 8},
            }))
            .into_response()
        }
    }
}

/// A fake Hugging Face hub holding one repository, whose files are those of `folder`.
#[derive(Debug, Clone)]
pub struct FakeHub {
    /// The endpoint, e.g. `http://127.0.0.1:40123`.
    pub endpoint: String,
}

/// The commit every file of the fake repository belongs to.
pub const FAKE_COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

#[derive(Debug)]
struct Hub {
    repo: String,
    folder: PathBuf,
    files: Vec<String>,
}

impl FakeHub {
    /// Serves `files` of `folder` as the repository `repo` (`owner/name`).
    pub async fn start(repo: &str, folder: PathBuf, files: &[&str]) -> Self {
        let hub = Arc::new(Hub {
            repo: repo.to_owned(),
            folder,
            files: files.iter().map(|file| (*file).to_owned()).collect(),
        });
        let app = Router::new()
            .route("/api/models/{owner}/{name}/revision/{revision}", get(info))
            .route("/{owner}/{name}/resolve/{revision}/{*file}", get(resolve))
            .with_state(hub);
        Self {
            endpoint: serve(app).await,
        }
    }
}

async fn info(
    State(hub): State<Arc<Hub>>,
    Path((owner, name, _revision)): Path<(String, String, String)>,
) -> Response {
    if format!("{owner}/{name}") != hub.repo {
        return StatusCode::NOT_FOUND.into_response();
    }
    let siblings: Vec<Value> = hub
        .files
        .iter()
        .map(|file| json!({"rfilename": file}))
        .collect();
    axum::Json(json!({"id": hub.repo, "sha": FAKE_COMMIT, "siblings": siblings})).into_response()
}

async fn resolve(
    State(hub): State<Arc<Hub>>,
    Path((owner, name, _revision, file)): Path<(String, String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if format!("{owner}/{name}") != hub.repo || !hub.files.contains(&file) {
        return StatusCode::NOT_FOUND.into_response();
    }
    let bytes = std::fs::read(hub.folder.join(&file)).unwrap();
    let size = bytes.len();
    // `bytes=a-b` or `bytes=a-`, as the hub client asks; no header means the whole file.
    let range = headers
        .get(header::RANGE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("bytes="))
        .and_then(|value| value.split_once('-'))
        .map(|(start, end)| {
            let start: usize = start.parse().unwrap();
            let end: usize = if end.is_empty() {
                size - 1
            } else {
                end.parse().unwrap()
            };
            (start, end.min(size - 1))
        });
    // The hub's etag for a file stored with LFS is its sha256; any stable, distinct name works
    // for the client, which stores the file under it.
    let etag: String = file.bytes().map(|byte| format!("{byte:02x}")).collect();
    let common = [
        ("x-repo-commit".to_owned(), FAKE_COMMIT.to_owned()),
        ("etag".to_owned(), format!("\"{etag}\"")),
    ];
    match range {
        Some((start, end)) => {
            let mut response =
                (StatusCode::PARTIAL_CONTENT, bytes[start..=end].to_vec()).into_response();
            let headers = response.headers_mut();
            for (name, value) in common {
                headers.insert(
                    header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value.parse().unwrap(),
                );
            }
            headers.insert(
                header::CONTENT_RANGE,
                format!("bytes {start}-{end}/{size}").parse().unwrap(),
            );
            response
        }
        None => {
            let mut response = bytes.into_response();
            for (name, value) in common {
                response.headers_mut().insert(
                    header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value.parse().unwrap(),
                );
            }
            response
        }
    }
}

async fn serve(app: Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a local port");
    let address = listener.local_addr().expect("local address");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}")
}

//! Errors as `application/problem+json` (RFC 9457) with a stable `code`: clients branch on the
//! code, people read the detail. [`Code`] declares every code once, with its status and title;
//! `docs/api-errors.md` documents each (a test holds the two together).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Problem {
    /// `urn:stele:problem:<code>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A short, fixed summary of the code.
    pub title: String,
    /// The HTTP status.
    pub status: u16,
    /// What went wrong in this case.
    pub detail: String,
    /// The stable error code (`docs/api-errors.md` lists them).
    pub code: String,
}

/// Declares [`Code`]: each variant is one (code, status, title) row. A code may have a row per
/// status it is answered with (`invalid_character` is 400 in a path and 422 in a body).
macro_rules! codes {
    ($($(#[$doc:meta])* $variant:ident = ($code:literal, $status:ident, $title:literal),)+) => {
        /// Every problem the API answers.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Code {
            $($(#[$doc])* $variant,)+
        }

        impl Code {
            /// Every row, in declaration order.
            pub const ALL: &'static [Code] = &[$(Code::$variant,)+];

            /// The stable code clients branch on.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Code::$variant => $code,)+
                }
            }

            pub fn status(self) -> StatusCode {
                match self {
                    $(Code::$variant => StatusCode::$status,)+
                }
            }

            /// A short, fixed summary (the problem's `title`).
            pub fn title(self) -> &'static str {
                match self {
                    $(Code::$variant => $title,)+
                }
            }
        }
    };
}

codes! {
    /// No API key, a malformed or unknown key, a revoked key.
    Unauthorized = ("unauthorized", UNAUTHORIZED, "Unauthorized"),
    /// The key lacks the route's scope.
    Forbidden = ("forbidden", FORBIDDEN, "Forbidden"),
    /// A change by the console's session without its `X-Csrf-Token`, or from another origin.
    CsrfFailed = ("csrf_failed", FORBIDDEN, "Cross-site request refused"),
    /// The key's token bucket is empty.
    RateLimited = ("rate_limited", TOO_MANY_REQUESTS, "Too many requests"),
    /// The body is not JSON (syntax).
    MalformedJson = ("malformed_json", BAD_REQUEST, "Malformed JSON"),
    /// The body nests deeper than [`crate::json::MAX_DEPTH`].
    JsonTooDeep = ("json_too_deep", BAD_REQUEST, "JSON nested too deep"),
    /// The body could not be read.
    UnreadableBody = ("unreadable_body", BAD_REQUEST, "Unreadable body"),
    /// An unknown query parameter, a wrong type, a value out of range.
    InvalidQuery = ("invalid_query", BAD_REQUEST, "Invalid query"),
    /// A cursor this server did not give.
    InvalidCursor = ("invalid_cursor", BAD_REQUEST, "Invalid cursor"),
    /// `%00` in a path or a query.
    InvalidCharacterInUri = ("invalid_character", BAD_REQUEST, "Invalid character"),
    /// `\u0000` in a body.
    InvalidCharacterInBody = ("invalid_character", UNPROCESSABLE_ENTITY, "Invalid character"),
    /// A task or job id that is not a UUID.
    InvalidId = ("invalid_id", BAD_REQUEST, "Invalid id"),
    /// A path segment that is not UTF-8 once percent-decoded.
    InvalidPath = ("invalid_path", BAD_REQUEST, "Invalid path"),
    /// An `Idempotency-Key` that is too long or not visible ASCII.
    InvalidIdempotencyKey = ("invalid_idempotency_key", BAD_REQUEST, "Invalid idempotency key"),
    /// A log position that holds no event.
    UnknownPosition = ("unknown_position", BAD_REQUEST, "Unknown position"),
    /// The WebSocket route without an upgrade.
    NotWebsocket = ("not_websocket", BAD_REQUEST, "Not a WebSocket request"),
    TaskNotFound = ("task_not_found", NOT_FOUND, "Task not found"),
    JobNotFound = ("job_not_found", NOT_FOUND, "Job not found"),
    ProjectionNotFound = ("projection_not_found", NOT_FOUND, "Projection not found"),
    SubjectNotFound = ("subject_not_found", NOT_FOUND, "Subject not found"),
    /// No proof can be made: no sealed event at that position, no checkpoint of that size, or
    /// the event was sealed after the checkpoint.
    ProofUnavailable = ("proof_unavailable", NOT_FOUND, "Proof unavailable"),
    /// The requester has not consented to what the request needs (the refusal is recorded).
    ConsentRequired = ("consent_required", FORBIDDEN, "Consent required"),
    /// The identifier leads to another subject.
    IdentifierTaken = ("identifier_taken", CONFLICT, "Identifier taken"),
    /// The subject cannot do that now (erased, merged, a minor's own consent, nothing to
    /// withdraw).
    SubjectState = ("subject_state", CONFLICT, "Not possible in the subject's state"),
    /// Not `telegram:<digits>`, `email:<address>` or `api:<id>`.
    InvalidIdentifier = ("invalid_identifier", UNPROCESSABLE_ENTITY, "Invalid identifier"),
    /// Not a purpose name.
    InvalidPurpose = ("invalid_purpose", UNPROCESSABLE_ENTITY, "Invalid purpose"),
    /// Not a channel name.
    InvalidChannel = ("invalid_channel", UNPROCESSABLE_ENTITY, "Invalid channel"),
    /// No model of the route answered (gateway calls).
    ModelUnavailable = ("model_unavailable", BAD_GATEWAY, "Model unavailable"),
    /// No embedding model is configured, or it failed to answer.
    MemoryUnavailable = ("memory_unavailable", SERVICE_UNAVAILABLE, "Memory unavailable"),
    /// A fact the memory refuses: empty, too long, importance out of range, bad tags or key.
    InvalidMemory = ("invalid_memory", UNPROCESSABLE_ENTITY, "Invalid memory"),
    /// No stored fact with that id (messages and step outputs are forgotten with their person).
    MemoryNotFound = ("memory_not_found", NOT_FOUND, "Memory not found"),
    ScheduleNotFound = ("schedule_not_found", NOT_FOUND, "Schedule not found"),
    RoomNotFound = ("room_not_found", NOT_FOUND, "Room not found"),
    ConversationNotFound = ("conversation_not_found", NOT_FOUND, "Conversation not found"),
    /// No such file in the task's workspaces (or its person was erased).
    FileNotFound = ("file_not_found", NOT_FOUND, "File not found"),
    RouteNotFound = ("route_not_found", NOT_FOUND, "Route not found"),
    MethodNotAllowed = ("method_not_allowed", METHOD_NOT_ALLOWED, "Method not allowed"),
    /// The task cannot do that now (it is finished).
    TaskState = ("task_state", CONFLICT, "Not possible in the task's state"),
    /// The run cannot do that now (it is finished).
    RunState = ("run_state", CONFLICT, "Not possible in the run's state"),
    /// The task has no run yet.
    RunNotStarted = ("run_not_started", CONFLICT, "Run not started"),
    /// Retrying a job that is neither dead nor cancelled.
    JobState = ("job_state", CONFLICT, "Not possible in the job's state"),
    /// Rebuilding a process manager.
    NotRebuildable = ("not_rebuildable", CONFLICT, "Not rebuildable"),
    /// A rebuild of that projection is under way.
    ProjectionBusy = ("projection_busy", CONFLICT, "Projection busy"),
    /// A schedule of that name exists (or existed: removed ones keep their name).
    ScheduleExists = ("schedule_exists", CONFLICT, "Schedule exists"),
    /// The schedule cannot do that now (removed; resuming one that is not paused).
    ScheduleState = ("schedule_state", CONFLICT, "Not possible in the schedule's state"),
    /// A room of that name exists.
    RoomExists = ("room_exists", CONFLICT, "Room exists"),
    /// The room cannot do that now: the member is muted or removed, no such message, no agent
    /// may speak, the hour's turns are used.
    RoomState = ("room_state", CONFLICT, "Not possible in the room's state"),
    /// Muting, removing or pinning by someone who is not one of the room's moderators.
    NotModerator = ("not_moderator", FORBIDDEN, "Not a moderator"),
    BodyTooLarge = ("body_too_large", PAYLOAD_TOO_LARGE, "Payload too large"),
    UnsupportedMediaType = ("unsupported_media_type", UNSUPPORTED_MEDIA_TYPE, "Unsupported media type"),
    /// The body does not match its schema: unknown fields, wrong types, a wrong shape.
    InvalidBody = ("invalid_body", UNPROCESSABLE_ENTITY, "Invalid body"),
    /// An empty task input.
    InvalidInput = ("invalid_input", UNPROCESSABLE_ENTITY, "Invalid input"),
    /// A task input over [`crate::wire::MAX_INPUT_CHARS`] characters.
    InputTooLong = ("input_too_long", UNPROCESSABLE_ENTITY, "Input too long"),
    /// An empty requester user id or channel.
    InvalidRequester = ("invalid_requester", UNPROCESSABLE_ENTITY, "Invalid requester"),
    UnknownWorkflow = ("unknown_workflow", UNPROCESSABLE_ENTITY, "Unknown workflow"),
    UnknownModel = ("unknown_model", UNPROCESSABLE_ENTITY, "Unknown agent role or model"),
    /// The input sanitiser blocked the input (prompt or SQL injection, …); recorded on the task's
    /// stream as `InputBlocked`.
    InputBlocked = ("input_blocked", UNPROCESSABLE_ENTITY, "Input blocked"),
    /// A cron pattern, time zone or interval that does not parse; both or neither of `cron`
    /// and `every`.
    InvalidSchedule = ("invalid_schedule", UNPROCESSABLE_ENTITY, "Invalid schedule"),
    /// A room, seat, message or action the room refuses: names, agents, policy, text.
    InvalidRoom = ("invalid_room", UNPROCESSABLE_ENTITY, "Invalid room"),
    /// The log refuses to store the request's data.
    UnstorableInput = ("unstorable_input", UNPROCESSABLE_ENTITY, "Unstorable input"),
    /// An `Idempotency-Key` used before with another body.
    IdempotencyKeyReused = ("idempotency_key_reused", UNPROCESSABLE_ENTITY, "Idempotency key reused"),
    /// An unexpected failure.
    Internal = ("internal", INTERNAL_SERVER_ERROR, "Internal error"),
}

/// The challenge a 401 carries (RFC 6750): keys are bearer tokens.
pub const CHALLENGE: &str = "Bearer realm=\"stele\"";

/// An error answered as a problem.
#[derive(Debug)]
pub struct ApiError {
    pub code: Code,
    pub detail: String,
    /// Seconds, for `Retry-After` (429).
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(code: Code, detail: impl Into<String>) -> Self {
        Self {
            code,
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        self.code.status()
    }

    pub fn rate_limited(retry_after_secs: u64) -> Self {
        let mut error = Self::new(
            Code::RateLimited,
            format!("this key's rate limit is exhausted; retry in {retry_after_secs} s"),
        );
        error.retry_after = Some(retry_after_secs);
        error
    }

    /// An unexpected failure: logged in full, answered without internals.
    pub fn internal(error: impl std::fmt::Display) -> Self {
        let id = uuid::Uuid::now_v7();
        tracing::error!(error_id = %id, error = %error, "request failed");
        Self::new(
            Code::Internal,
            format!("the request failed; the server log has the details under error id {id}"),
        )
    }

    pub fn problem(&self) -> Problem {
        Problem {
            kind: format!("urn:stele:problem:{}", self.code.as_str()),
            title: self.code.title().to_owned(),
            status: self.status().as_u16(),
            detail: self.detail.clone(),
            code: self.code.as_str().to_owned(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&self.problem()).unwrap_or_default();
        let mut response = (self.status(), body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if self.code == Code::Unauthorized {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(CHALLENGE),
            );
        }
        if let Some(seconds) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<stele_workflows::runtime::RuntimeError> for ApiError {
    fn from(e: stele_workflows::runtime::RuntimeError) -> Self {
        use stele_workflows::runtime::RuntimeError as E;
        match e {
            E::UnknownTask(id) => ApiError::new(Code::TaskNotFound, format!("no task {id}")),
            e @ E::UnknownWorkflow { .. } => ApiError::new(Code::UnknownWorkflow, e.to_string()),
            E::UnknownModel(why) => ApiError::new(Code::UnknownModel, why),
            E::InputBlocked { task_id, screening } => ApiError::new(
                Code::InputBlocked,
                format!(
                    "the input was blocked: it contains {}; recorded as task/{task_id}",
                    screening.summary()
                ),
            ),
            E::Task(e) => ApiError::new(Code::TaskState, e.to_string()),
            E::Run(e) => ApiError::new(Code::RunState, e.to_string()),
            E::NotStarted(id) => ApiError::new(
                Code::RunNotStarted,
                format!("task {id} has no workflow run yet"),
            ),
            E::Log(e) => e.into(),
            E::Subject(stele_privacy::SubjectsError::Privacy(
                stele_privacy::PrivacyError::Malformed(why),
            )) => ApiError::new(Code::InvalidRequester, format!("`requester`: {why}")),
            E::Subject(e) => e.into(),
            other => ApiError::internal(other),
        }
    }
}

impl From<stele_privacy::SubjectsError> for ApiError {
    fn from(e: stele_privacy::SubjectsError) -> Self {
        use stele_privacy::SubjectsError as E;
        match e {
            e @ E::NotFound(_) => ApiError::new(Code::SubjectNotFound, e.to_string()),
            e @ E::Refused(_) | e @ E::SelfMerge => {
                ApiError::new(Code::SubjectState, e.to_string())
            }
            e @ E::IdentifierTaken(_) => ApiError::new(Code::IdentifierTaken, e.to_string()),
            e @ E::ConsentRequired { .. } => ApiError::new(Code::ConsentRequired, e.to_string()),
            E::Privacy(stele_privacy::PrivacyError::Malformed(why)) => {
                ApiError::new(Code::InvalidIdentifier, why)
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<stele_engine::queue::QueueError> for ApiError {
    fn from(e: stele_engine::queue::QueueError) -> Self {
        use stele_engine::queue::QueueError as E;
        match e {
            E::NotFound(id) => ApiError::new(Code::JobNotFound, format!("no job {id}")),
            e @ E::WrongState { .. } => ApiError::new(Code::JobState, e.to_string()),
            other => ApiError::internal(other),
        }
    }
}

impl From<stele_engine::LogError> for ApiError {
    fn from(e: stele_engine::LogError) -> Self {
        match e {
            e @ stele_engine::LogError::UnknownPosition(_) => {
                ApiError::new(Code::UnknownPosition, e.to_string())
            }
            // What the log refuses to store (its rules are the same on both stores): the
            // request's own data, never a server fault.
            stele_engine::LogError::InvalidAppend(why) => ApiError::new(Code::UnstorableInput, why),
            other => ApiError::internal(other),
        }
    }
}

impl From<stele_engine::projection::ProjectionError> for ApiError {
    fn from(e: stele_engine::projection::ProjectionError) -> Self {
        use stele_engine::projection::ProjectionError as E;
        match e {
            e @ E::Unknown(_) => ApiError::new(Code::ProjectionNotFound, e.to_string()),
            e @ E::NotRebuildable(_) => ApiError::new(Code::NotRebuildable, e.to_string()),
            e @ E::Busy(_) => ApiError::new(Code::ProjectionBusy, e.to_string()),
            other => ApiError::internal(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    /// `docs/api-errors.md`'s table: each code with its statuses.
    fn documented() -> BTreeMap<String, BTreeSet<u16>> {
        let text = include_str!("../../docs/api-errors.md");
        let mut table = BTreeMap::new();
        for line in text.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let statuses: BTreeSet<u16> = cells[2]
                .split(',')
                .map(|s| s.trim().parse().expect(line))
                .collect();
            for code in cells[1].split(',') {
                let code = code.trim().trim_matches('`').to_owned();
                assert!(
                    table.insert(code.clone(), statuses.clone()).is_none(),
                    "{code} is documented twice"
                );
            }
        }
        table
    }

    #[test]
    fn every_code_is_documented_with_its_statuses_and_none_is_stale() {
        let mut declared: BTreeMap<String, BTreeSet<u16>> = BTreeMap::new();
        for code in Code::ALL {
            declared
                .entry(code.as_str().to_owned())
                .or_default()
                .insert(code.status().as_u16());
        }
        let documented = documented();
        let undocumented: Vec<_> = declared
            .iter()
            .filter(|(code, statuses)| documented.get(*code) != Some(statuses))
            .collect();
        let stale: Vec<_> = documented
            .iter()
            .filter(|(code, statuses)| declared.get(*code) != Some(statuses))
            .collect();
        assert!(
            undocumented.is_empty() && stale.is_empty(),
            "declared in Code but not so in docs/api-errors.md: {undocumented:?}; \
             documented but not so declared: {stale:?}"
        );
    }

    #[test]
    fn one_code_has_one_title_and_each_row_is_distinct() {
        let mut titles = BTreeMap::new();
        let mut rows = BTreeSet::new();
        for code in Code::ALL {
            assert!(rows.insert((code.as_str(), code.status())), "{code:?}");
            let title = titles.entry(code.as_str()).or_insert(code.title());
            assert_eq!(*title, code.title(), "{code:?}");
        }
    }

    #[test]
    fn a_401_carries_a_bearer_challenge() {
        let response = ApiError::new(Code::Unauthorized, "no key").into_response();
        assert_eq!(response.headers()[header::WWW_AUTHENTICATE], CHALLENGE);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }
}

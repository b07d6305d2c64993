//! The people Stele knows: register, consent, merge, export (GDPR art. 15 and 20) and erase
//! (art. 17). Reading needs `subjects:read`, changing `subjects:write`, erasing
//! `subjects:erase`. Every export and erasure is recorded as an event.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde_json::Value;
use stele_aggregates::channel::Channel;
use stele_aggregates::subject::{Identifier, Purpose, Subject};
use stele_engine::CommandMeta;
use stele_privacy::Subjects;

use crate::json::{OptionalJson, StrictJson};
use crate::problem::{ApiError, Code, Problem};
use crate::routes::ops::bounded;
use crate::routes::{
    parse_id, ApiPath, CanEraseSubjects, CanReadSubjects, CanWriteSubjects, NoQuery, StrictQuery,
};
use crate::state::AppState;
use crate::wire::{
    ConsentBody, EraseSubject, ErasureBody, MergeSubject, RecordConsent, RegisterSubject,
    SubjectBody, SubjectListQuery, SubjectPage, SubjectSummary,
};

/// How long an export or erasure waits for the subjects index to reach the log's head.
const INDEX_PATIENCE: Duration = Duration::from_secs(10);

fn meta(caller: &crate::auth::Caller) -> CommandMeta {
    CommandMeta::new(format!("key:{}", caller.key_id), "api")
}

pub(crate) fn service(state: &AppState) -> Result<&Arc<Subjects>, ApiError> {
    state.runtime.subjects().ok_or_else(|| {
        ApiError::internal("this server keeps no personal data (no subjects service)")
    })
}

/// The subject as the API shows it.
pub fn subject_body(id: &str, subject: &Subject) -> SubjectBody {
    SubjectBody {
        id: id.to_owned(),
        identifiers: subject.identifiers.iter().map(|i| i.to_string()).collect(),
        minor: subject.minor,
        consents: subject
            .consents
            .iter()
            .map(|(purpose, consent)| ConsentBody {
                purpose: purpose.as_str().to_owned(),
                given: consent.given,
                guardian: match &consent.by {
                    stele_aggregates::subject::ConsentBy::Guardian { name } => {
                        Some(name.text().to_owned())
                    }
                    stele_aggregates::subject::ConsentBy::Subject => None,
                },
                channel: consent.channel.to_string(),
                at: consent.at,
            })
            .collect(),
        merged_from: subject.absorbed.iter().cloned().collect(),
        merged_into: subject.merged_into.clone(),
        erased: subject.erased.as_ref().map(|e| ErasureBody {
            keys: e.keys.clone(),
            by: e.by.clone(),
            reason: e.reason.clone(),
            at: e.at,
        }),
    }
}

pub(crate) async fn existing(subjects: &Subjects, id: &str) -> Result<Subject, ApiError> {
    subjects
        .get(id)
        .await?
        .ok_or_else(|| ApiError::new(Code::SubjectNotFound, format!("no subject {id}")))
}

/// Waits until the subjects index has read the log up to its head now.
async fn index_caught_up(state: &AppState) -> Result<(), ApiError> {
    let head = state.log.head().await?;
    let deadline = tokio::time::Instant::now() + INDEX_PATIENCE;
    loop {
        let at = state
            .runner
            .status()
            .await?
            .into_iter()
            .find(|s| s.checkpoint.name == "subjects")
            .map(|s| s.checkpoint.position);
        if at.is_some_and(|at| at >= head) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(ApiError::internal(
                "the subjects index did not catch up with the log in time",
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// List the people Stele knows (ids, never names).
#[utoipa::path(
    get, path = "/v1/subjects", tag = "subjects",
    params(SubjectListQuery),
    responses((status = 200, description = "A page of subjects", body = SubjectPage)),
    security(("api_key" = ["subjects:read"]))
)]
pub async fn list_subjects(
    State(state): State<AppState>,
    _caller: CanReadSubjects,
    StrictQuery(query): StrictQuery<SubjectListQuery>,
) -> Result<Json<SubjectPage>, ApiError> {
    if let Some(after) = &query.after {
        parse_id("subject", after)?;
    }
    let limit = bounded(query.limit, 100, 500)?;
    let mut rows =
        stele_privacy::index::list_subjects(&state.pool, query.after.as_deref(), limit + 1)
            .await
            .map_err(ApiError::internal)?;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|r| r.subject_id.clone())
    } else {
        None
    };
    Ok(Json(SubjectPage {
        subjects: rows
            .into_iter()
            .map(|r| SubjectSummary {
                id: r.subject_id,
                registered_at: r.registered_at,
                minor: r.minor,
                merged_into: r.merged_into,
                erased_at: r.erased_at,
                last_seen_at: r.last_seen_at,
                events: r.events,
            })
            .collect(),
        next_cursor,
    }))
}

/// Register a person by their identifiers; a person the first identifier already leads to is
/// that person (200).
#[utoipa::path(
    post, path = "/v1/subjects", tag = "subjects",
    request_body = RegisterSubject,
    responses(
        (status = 201, description = "Registered", body = SubjectBody),
        (status = 200, description = "Known already: the subject", body = SubjectBody),
        (status = 409, description = "`identifier_taken`: another identifier leads to someone else; `subject_state`: the subject was erased or merged", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_body`, `invalid_character`; `invalid_identifier`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["subjects:write"]))
)]
pub async fn register_subject(
    State(state): State<AppState>,
    CanWriteSubjects(caller): CanWriteSubjects,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    StrictJson(request): StrictJson<RegisterSubject>,
) -> Result<(StatusCode, Json<SubjectBody>), ApiError> {
    let subjects = service(&state)?;
    let identifiers = request
        .identifiers
        .iter()
        .map(|text| {
            Identifier::parse(&text.0)
                .map_err(|e| ApiError::new(Code::InvalidIdentifier, e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let known = subjects.find(&identifiers[0]).await?.is_some();
    let id = subjects
        .register(&identifiers, request.minor.unwrap_or(false), meta(&caller))
        .await?;
    let subject = existing(subjects, &id).await?;
    let status = if known {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(subject_body(&id, &subject))))
}

/// A subject: identifiers, consents, merges, erasure.
#[utoipa::path(
    get, path = "/v1/subjects/{id}", tag = "subjects",
    params(("id" = Uuid, Path, description = "The subject's id")),
    responses(
        (status = 200, description = "The subject", body = SubjectBody),
        (status = 404, description = "`subject_not_found`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["subjects:read"]))
)]
pub async fn get_subject(
    State(state): State<AppState>,
    _caller: CanReadSubjects,
    ApiPath(id): ApiPath<String>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<Json<SubjectBody>, ApiError> {
    let id = parse_id("subject", &id)?.to_string();
    let subject = existing(service(&state)?, &id).await?;
    Ok(Json(subject_body(&id, &subject)))
}

/// Record a consent given or withdrawn, by the person or their guardian.
#[utoipa::path(
    post, path = "/v1/subjects/{id}/consents", tag = "subjects",
    params(("id" = Uuid, Path, description = "The subject's id")),
    request_body = RecordConsent,
    responses(
        (status = 200, description = "Recorded (or already so): the subject", body = SubjectBody),
        (status = 404, description = "`subject_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`subject_state`: erased or merged, a minor's own consent, nothing to withdraw", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "`invalid_body`, `invalid_character`; `invalid_purpose`, `invalid_channel`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["subjects:write"]))
)]
pub async fn record_consent(
    State(state): State<AppState>,
    CanWriteSubjects(caller): CanWriteSubjects,
    ApiPath(id): ApiPath<String>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    StrictJson(request): StrictJson<RecordConsent>,
) -> Result<Json<SubjectBody>, ApiError> {
    let id = parse_id("subject", &id)?.to_string();
    let subjects = service(&state)?;
    let purpose = Purpose::parse(&request.purpose)
        .map_err(|e| ApiError::new(Code::InvalidPurpose, e.to_string()))?;
    let channel = match &request.channel {
        Some(name) => {
            Channel::parse(name).map_err(|e| ApiError::new(Code::InvalidChannel, e.to_string()))?
        }
        None => Channel::API,
    };
    let guardian = request
        .guardian
        .map(|name| name.trim().to_owned())
        .filter(|name| !name.is_empty());
    subjects
        .consent(
            &id,
            purpose,
            request.given,
            guardian,
            channel,
            meta(&caller),
        )
        .await?;
    let subject = existing(subjects, &id).await?;
    Ok(Json(subject_body(&id, &subject)))
}

/// Merge this subject into another: two identifiers found to be one person.
#[utoipa::path(
    post, path = "/v1/subjects/{id}/merge", tag = "subjects",
    params(("id" = Uuid, Path, description = "The subject merged away")),
    request_body = MergeSubject,
    responses(
        (status = 200, description = "Merged: the surviving subject", body = SubjectBody),
        (status = 404, description = "`subject_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`subject_state`: erased, merged already, or into itself", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["subjects:write"]))
)]
pub async fn merge_subject(
    State(state): State<AppState>,
    CanWriteSubjects(caller): CanWriteSubjects,
    ApiPath(id): ApiPath<String>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    StrictJson(request): StrictJson<MergeSubject>,
) -> Result<Json<SubjectBody>, ApiError> {
    let id = parse_id("subject", &id)?.to_string();
    let into = parse_id("subject", &request.into)
        .map_err(|e| ApiError::new(Code::InvalidBody, e.detail))?
        .to_string();
    let subjects = service(&state)?;
    subjects.merge(&id, &into, meta(&caller)).await?;
    let survivor = existing(subjects, &into).await?;
    Ok(Json(subject_body(&into, &survivor)))
}

/// Everything Stele holds about a person (GDPR art. 15 and 20): a JSON bundle of every event
/// that concerns them (their data readable, or `[erased]`), their consents and tasks, with a
/// human-readable timeline (HTML) inside. The format is `stele.subject-export/1`
/// (`docs/subject-export.md`). The export is recorded.
#[utoipa::path(
    get, path = "/v1/subjects/{id}/export", tag = "subjects",
    params(("id" = Uuid, Path, description = "The subject's id")),
    responses(
        (status = 200, description = "The bundle (`stele.subject-export/1`)", body = Object),
        (status = 404, description = "`subject_not_found`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["subjects:read"]))
)]
pub async fn export_subject(
    State(state): State<AppState>,
    CanReadSubjects(caller): CanReadSubjects,
    ApiPath(id): ApiPath<String>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
) -> Result<Json<Value>, ApiError> {
    let id = parse_id("subject", &id)?.to_string();
    let subjects = service(&state)?;
    existing(subjects, &id).await?;
    let head = state.log.head().await?;
    index_caught_up(&state).await?;
    let mut bundle = subjects
        .export(
            state.log.as_ref(),
            &id,
            head,
            &format!("key:{}", caller.key_id),
            meta(&caller),
        )
        .await?;
    let positions: Vec<_> = bundle.events.iter().map(|e| e.position).collect();
    let attestation = stele_audit::proof::attest(state.stored.as_ref(), &state.pool, &positions)
        .await
        .map_err(ApiError::internal)?;
    bundle.audit = attestation
        .map(serde_json::to_value)
        .transpose()
        .map_err(ApiError::internal)?;
    Ok(Json(
        serde_json::to_value(bundle).map_err(ApiError::internal)?,
    ))
}

/// Erase a person (GDPR art. 17): their data keys are destroyed, so nothing of theirs can be
/// read again anywhere (the log, read models, jobs); their running tasks are cancelled. The
/// erasure is recorded; erasing again changes nothing.
#[utoipa::path(
    post, path = "/v1/subjects/{id}/erasure", tag = "subjects",
    params(("id" = Uuid, Path, description = "The subject's id")),
    request_body(content = Option<EraseSubject>, description = "Optional: a reason. Leave the body out for the default"),
    responses(
        (status = 200, description = "Erased", body = ErasureBody),
        (status = 404, description = "`subject_not_found`", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "`subject_state`: merged into another subject (erase that one)", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["subjects:erase"]))
)]
pub async fn erase_subject(
    State(state): State<AppState>,
    CanEraseSubjects(caller): CanEraseSubjects,
    ApiPath(id): ApiPath<String>,
    StrictQuery(NoQuery {}): StrictQuery<NoQuery>,
    OptionalJson(request): OptionalJson<EraseSubject>,
) -> Result<Json<ErasureBody>, ApiError> {
    let id = parse_id("subject", &id)?.to_string();
    existing(service(&state)?, &id).await?;
    index_caught_up(&state).await?;
    let reason = request
        .reason
        .unwrap_or_else(|| "erased at the person's request".into());
    let erasure = state
        .runtime
        .erase_subject(
            &id,
            &format!("key:{}", caller.key_id),
            &reason,
            meta(&caller),
        )
        .await?;
    Ok(Json(ErasureBody {
        keys: erasure.keys,
        by: erasure.by,
        reason: erasure.reason,
        at: erasure.at,
    }))
}

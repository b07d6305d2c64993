//! The audit log over HTTP (scope `audit:read`): its signed checkpoints, and proofs that an event
//! is in one (inclusion) or that one extends another (consistency), which a third party checks
//! with the verifier key alone (`docs/audit-log.md`).

use axum::extract::State;
use axum::Json;
use serde_json::Value;
use stele_audit::proof;
use stele_engine::Position;

use crate::problem::{ApiError, Code, Problem};
use crate::routes::ops::bounded;
use crate::routes::{CanReadAudit, StrictQuery};
use crate::state::AppState;
use crate::wire::{
    AuditEventBody, AuditEventPage, AuditEventQuery, CheckpointBody, CheckpointPage,
    CheckpointQuery, ConsistencyQuery, InclusionQuery,
};

fn unavailable(e: stele_audit::AuditError) -> ApiError {
    match e {
        stele_audit::AuditError::Tree(why) => ApiError::new(Code::ProofUnavailable, why),
        other => ApiError::internal(other),
    }
}

/// The audit log's signed checkpoints (the newest `limit`, oldest first), with the key that
/// signs them.
#[utoipa::path(
    get, path = "/v1/audit/checkpoints", tag = "audit",
    params(CheckpointQuery),
    responses((status = 200, description = "The checkpoints", body = CheckpointPage)),
    security(("api_key" = ["audit:read"]))
)]
pub async fn audit_checkpoints(
    State(state): State<AppState>,
    _caller: CanReadAudit,
    StrictQuery(query): StrictQuery<CheckpointQuery>,
) -> Result<Json<CheckpointPage>, ApiError> {
    let limit = bounded(query.limit, 100, 1000)?;
    let mut db = stele_engine::store::sql::Db::from(&state.pool);
    let all = stele_audit::tree::checkpoints(&mut db)
        .await
        .map_err(ApiError::internal)?;
    let skip = all.len().saturating_sub(limit);
    Ok(Json(CheckpointPage {
        verifier_key: state.audit_key.clone().unwrap_or_default(),
        checkpoints: all
            .into_iter()
            .skip(skip)
            .map(|c| CheckpointBody {
                size: c.size,
                root: c.root,
                signed_at: c.signed_at,
                note: c.note,
            })
            .collect(),
    }))
}

/// A proof that the event at `position` is in the checkpoint of `size` (the newest by default):
/// its canonical bytes and the audit path to the signed root (`stele.audit-proof/1`,
/// `stele audit check-proof` checks it offline).
#[utoipa::path(
    get, path = "/v1/audit/proofs/inclusion", tag = "audit",
    params(InclusionQuery),
    responses(
        (status = 200, description = "The proof (`stele.audit-proof/1`, kind `inclusion`)", body = Object),
        (status = 404, description = "`proof_unavailable`: no sealed event there, no such checkpoint, or sealed after it", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["audit:read"]))
)]
pub async fn inclusion_proof(
    State(state): State<AppState>,
    _caller: CanReadAudit,
    StrictQuery(query): StrictQuery<InclusionQuery>,
) -> Result<Json<Value>, ApiError> {
    let proof = proof::prove_inclusion(
        state.stored.as_ref(),
        &state.pool,
        Position(query.position),
        query.size,
    )
    .await
    .map_err(unavailable)?;
    Ok(Json(
        serde_json::to_value(proof).map_err(ApiError::internal)?,
    ))
}

/// A proof that the checkpoint of size `to` extends the one of size `from` (RFC 6962 §2.1.2).
#[utoipa::path(
    get, path = "/v1/audit/proofs/consistency", tag = "audit",
    params(ConsistencyQuery),
    responses(
        (status = 200, description = "The proof (`stele.audit-proof/1`, kind `consistency`)", body = Object),
        (status = 404, description = "`proof_unavailable`: no checkpoint of one of the sizes, or `from` above `to`", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = ["audit:read"]))
)]
pub async fn consistency_proof(
    State(state): State<AppState>,
    _caller: CanReadAudit,
    StrictQuery(query): StrictQuery<ConsistencyQuery>,
) -> Result<Json<Value>, ApiError> {
    let proof = proof::prove_consistency(&state.pool, query.from, query.to)
        .await
        .map_err(unavailable)?;
    Ok(Json(
        serde_json::to_value(proof).map_err(ApiError::internal)?,
    ))
}

/// Who did what, when, through which channel, as part of which task or conversation: the audit
/// view (write-once, a projection of the log), in log order, filtered.
#[utoipa::path(
    get, path = "/v1/audit/events", tag = "audit",
    params(AuditEventQuery),
    responses((status = 200, description = "A page of the audit view", body = AuditEventPage)),
    security(("api_key" = ["audit:read"]))
)]
pub async fn audit_events(
    State(state): State<AppState>,
    _caller: CanReadAudit,
    StrictQuery(query): StrictQuery<AuditEventQuery>,
) -> Result<Json<AuditEventPage>, ApiError> {
    let limit = bounded(query.limit, 100, 1000)?;
    if query.after.is_some_and(|after| after < 0) {
        return Err(ApiError::new(
            Code::InvalidQuery,
            "`after` is a position: 0 or more",
        ));
    }
    let filter = stele_audit::view::AuditFilter {
        actor: query.actor,
        subject: query.subject,
        task: query.task,
        stream: query.stream,
        since: query.since,
        until: query.until,
        after: query.after,
        limit: limit + 1,
    };
    let mut rows = stele_audit::view::list(&state.pool, &filter)
        .await
        .map_err(ApiError::internal)?;
    let next_cursor = if rows.len() > limit {
        rows.truncate(limit);
        rows.last().map(|r| r.position)
    } else {
        None
    };
    Ok(Json(AuditEventPage {
        events: rows
            .into_iter()
            .map(|r| AuditEventBody {
                position: r.position,
                recorded_at: r.recorded_at,
                actor: r.actor,
                channel: r.channel,
                stream: r.stream,
                event_type: r.event_type,
                task_id: r.task_id,
                conversation_id: r.conversation_id,
                subject: r.subject,
                correlation_id: r.correlation_id,
                causation_id: r.causation_id,
            })
            .collect(),
        next_cursor,
    }))
}

"""Schemathesis hooks for the API's run (`api/tests/schemathesis.rs`).

What the document cannot say, and only that, is let through:

- refusals that depend on the server's state: a workflow that does not exist
  (`unknown_workflow`), a model its agent role does not have (`unknown_model`), an `Idempotency-Key` used before with another body
  (`idempotency_key_reused`), a log position that holds no event (`unknown_position`);
- input the sanitiser blocks (`input_blocked`): what reads as an injection is a matter of the
  text's words, which no schema can say;
- a schedule's timing whose grammar no schema says (`invalid_schedule`): a cron pattern that does
  not parse or never fires, a time zone that is not an IANA name, a duration that is not one;
- a room's rules that span fields or the room's state (`invalid_room` on `/v1/rooms…`): agents'
  names unique, a `moderator_agent` exactly with the `moderator` policy and among two agents or
  more, a person posting under an agent's name, `pin` with `seq` and the other actions with
  `member`;
- a workspace file's path the document's pattern cannot rule out (`invalid_query` on
  `/v1/tasks/{id}/workspace/file`): absolute, with a `..` segment, or naming no file (`.`, `//`);
- a NUL character inside a signal's payload (`invalid_character`): the payload is free-form JSON,
  whose nested strings no schema of the document patterns (every other string has a pattern that
  excludes NUL);
- a schema-breaking body refused for its size first (413 `body_too_large`, documented): a
  refusal all the same, which `negative_data_rejection` does not count among its statuses.

Every other failure stands.
"""

import json

import schemathesis

STATE_DEPENDENT = {"unknown_workflow", "unknown_model", "idempotency_key_reused", "unknown_position"}


def _nul_in_payload(case):
    body = case.body if isinstance(case.body, dict) else {}
    return "\\u0000" in json.dumps(body.get("payload"))


@schemathesis.hook
def filter_failure(context, failure, case, response):
    """Keeps every failure but those for the reasons above."""
    kind = type(failure).__name__
    if kind == "AcceptedNegativeData":
        return response.status_code != 413
    if kind != "RejectedPositiveData":
        return True
    try:
        code = json.loads(response.content).get("code")
    except (ValueError, AttributeError):
        return True
    if code in STATE_DEPENDENT:
        return False
    if code == "input_blocked" and case.operation.path == "/v1/tasks":
        return False
    if code == "invalid_schedule" and case.operation.path == "/v1/schedules":
        return False
    if code == "invalid_room" and case.operation.path.startswith("/v1/rooms"):
        return False
    if code == "invalid_query" and case.operation.path == "/v1/tasks/{id}/workspace/file":
        return False
    if code == "invalid_character" and case.operation.path.endswith("/signals/{name}"):
        return not _nul_in_payload(case)
    return True

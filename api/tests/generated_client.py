"""Drives the API through a client generated from the committed document
(`api/tests/contract.rs` generates it with openapi-python-client and runs this).

    python generated_client.py <package dir> <base URL> <key with every scope>

The client raises on any status its document does not list, and parses every body into the
document's models: a field declared with the wrong type, or a response left out, fails here as
it would for anyone using such a client.
"""

import sys
import uuid

package_dir, base_url, key = sys.argv[1:4]
sys.path.insert(0, package_dir)

from stele_client import AuthenticatedClient  # noqa: E402
from stele_client.api.health import live  # noqa: E402
from stele_client.api.operators import events, jobs, projections, workflows  # noqa: E402
from stele_client.api.tasks import (  # noqa: E402
    cancel_task,
    create_task,
    get_task,
    list_tasks,
    signal_task,
    sse,
    task_events,
)
from stele_client.models import (  # noqa: E402
    Accepted,
    CancelBody,
    CreateTask,
    EventBody,
    JobList,
    ListTasksStatus,
    LogPage,
    Problem,
    ProjectionList,
    RequesterBody,
    SignalBody,
    SignalBodyPayloadType0,
    TaskBody,
    TaskEvents,
    TaskPage,
)

client = AuthenticatedClient(base_url=base_url, token=key, raise_on_unexpected_status=True)
# The other documented way of presenting a key.
header_client = AuthenticatedClient(
    base_url=base_url,
    token=key,
    prefix="",
    auth_header_name="X-Api-Key",
    raise_on_unexpected_status=True,
)


def expect(value, kind):
    assert isinstance(value, kind), f"expected {kind.__name__}, got {value!r}"
    return value


def problem(response, status, code):
    assert response.status_code == status, (response.status_code, response.content)
    parsed = expect(response.parsed, Problem)
    assert parsed.code == code, parsed
    assert parsed.status == status, parsed
    return parsed


# Create a task, then the same again with an idempotency key.
created = create_task.sync_detailed(
    client=client,
    body=CreateTask(input_="hello from a generated client", workflow="assistant"),
)
assert created.status_code == 201, created.content
task = expect(created.parsed, TaskBody)
assert isinstance(task.id, uuid.UUID) and task.status == "executing" and task.result is None
assert task.workflow == "assistant"
assert created.headers["location"] == f"/v1/tasks/{task.id}"
body = CreateTask(
    input_="once",
    workflow="assistant",
    requester=RequesterBody(user_id="ana", channel="api"),
)
first = create_task.sync_detailed(client=client, body=body, idempotency_key="client-1")
again = create_task.sync_detailed(client=client, body=body, idempotency_key="client-1")
assert (first.status_code, again.status_code) == (201, 200)
assert expect(again.parsed, TaskBody).id == expect(first.parsed, TaskBody).id
problem(
    create_task.sync_detailed(client=client, body=CreateTask(input_="   ")),
    422,
    "invalid_input",
)

# Follow it to its end (the stream ends when the task and its run are finished): the body is
# the whole stream as text.
stream = expect(sse.sync(task.id, client=client), str)
assert "event: TaskCompleted" in stream and "event: end" in stream, stream

# Read it: its result and its steps' outputs are JSON values (strings here).
done = expect(get_task.sync(task.id, client=client, consistent=True), TaskBody)
assert done.status == "completed", done
assert isinstance(done.result, str) and done.result, done
assert done.run is not None and done.run.steps, done
for step in done.run.steps:
    assert step.output is None or isinstance(step.output, (str, dict, list, int, float, bool))
assert any(isinstance(step.output, str) for step in done.run.steps), done.run
history = expect(task_events.sync(task.id, client=client), TaskEvents)
assert history.events and all(isinstance(e, EventBody) for e in history.events)
assert history.events[0].type_ == "TaskCreated"
problem(get_task.sync_detailed(uuid.uuid4(), client=client), 404, "task_not_found")

# List tasks: the finished one is there once the list has caught up with the log; every row
# parses, results included.
page = expect(list_tasks.sync(client=client, limit=500), TaskPage)
for row in page.tasks:
    assert isinstance(row.id, uuid.UUID)
    assert row.result is None or isinstance(row.result, (str, dict, list, int, float, bool))
completed = expect(
    list_tasks.sync(client=header_client, status=ListTasksStatus.COMPLETED, limit=1), TaskPage
)
assert all(row.status == "completed" for row in completed.tasks)
problem(list_tasks.sync_detailed(client=client, cursor="nope"), 400, "invalid_cursor")

# Cancel one that is not finished (its run waits for an approval), with a reason and with no
# body at all, and one that is.
for reason in (CancelBody(reason="not needed"), None):
    pending = expect(
        create_task.sync(
            client=client, body=CreateTask(input_="to cancel", workflow="approval")
        ),
        TaskBody,
    )
    kwargs = {} if reason is None else {"body": reason}
    accepted = expect(cancel_task.sync(pending.id, client=client, **kwargs), Accepted)
    assert accepted.status == "cancelling", accepted
problem(cancel_task.sync_detailed(task.id, client=client), 409, "task_state")

# Signal a finished run: refused with the documented conflict.
problem(
    signal_task.sync_detailed(
        task.id,
        "approval",
        client=header_client,
        body=SignalBody(payload=SignalBodyPayloadType0.from_dict({"by": "ana"})),
    ),
    409,
    "run_state",
)

# Operators' views.
listed = expect(projections.sync(client=header_client), ProjectionList)
names = {p.name for p in listed.projections}
assert {"task_list", "subjects", "audit_events", "workflow-runtime"} <= names, names
assert all(isinstance(p.lag_seconds, float) for p in listed.projections)
log = expect(events.sync(client=client, limit=5), LogPage)
assert len(log.events) == 5 and log.next_after == log.events[-1].position
expect(jobs.sync(client=client, limit=5), JobList)
assert any(w.name == "assistant" for w in workflows.sync(client=client))
assert live.sync(client=client).status == "ok"

# A key the server does not know.
stranger = AuthenticatedClient(
    base_url=base_url, token="stele_nope", raise_on_unexpected_status=True
)
problem(get_task.sync_detailed(task.id, client=stranger), 401, "unauthorized")

print("generated client: every call answered as documented")

"""Fuzz the whole REST API through its OpenAPI schema with Schemathesis.

The API's promises, checked on every generated request:

* no input ever produces a 5xx;
* every 4xx body is JSON ``{"error": {"code", "message", "details"}}``;
* the status code is one the route documents (``responses=``) and the body matches the documented
  schema for that status (Schemathesis's ``status_code_conformance``, ``content_type_conformance``
  and ``response_schema_conformance``). Not ``negative_data_rejection``: FastAPI ignores unknown
  query parameters and headers, which that check counts as accepting invalid input.

How it runs: the schema is loaded from ``app.openapi()``. For each operation, first the
deterministic cases: Schemathesis's coverage phase (boundary values, missing and wrong-typed
fields, unexpected methods) plus 64-bit overflow probes for unbounded integer query parameters,
each sent as the user and as the admin; then Hypothesis draws a bounded, derandomized set of
schema-valid and schema-invalid cases. Hypothesis runs in a worker thread; each case is sent to
the app on the test's own event loop through the ``client`` fixture (``httpx.ASGITransport``), so
the app's lifespan, database and bus are the fixtures' own. A fuzzed case goes out as one of: a
user who owns an organization (with a second member, a pending invite and an API key, whose ids
are fed to path parameters besides random ones), a platform admin, that user's read-only API key,
or nobody. Failures are collected rather than raised inside Hypothesis (no shrinking), so one run
reports every distinct failure with its request, response and the server's logged traceback.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.core.failures import FailureGroup
from schemathesis.openapi.checks import UndefinedStatusCode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.factories import PASSWORD, make_org, make_user

pytestmark = [
    pytest.mark.parametrize("backend", ["sqlite+memory"], indirect=True),
    # About 80 s alone on the 2-core machine (every operation of the API, both modes), more
    # inside the whole suite: past the suite's default of 120 s.
    pytest.mark.timeout(400),
]

BASE_URL = "http://testserver"
MAX_EXAMPLES = 20  # per operation and generation mode, on top of the deterministic cases
FIXED_CASE_IDENTITIES = ("user", "admin")
MAX_REPORTED = 25
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
SCHEMA_CHECKS = [
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# A known, reported gap tolerated here: a JSON body that is not valid UTF-8 gets FastAPI's 400
# "There was an error parsing the body" (in our error shape), which no route documents, while
# malformed JSON gets the documented 422. Delete this once the app answers 422 or documents 400.
TOLERATED_UNDOCUMENTED = {400: "bad_request"}
#: The only 5xx allowed: a feature the server was deliberately set up without (no Stripe keys).
DELIBERATE_UNAVAILABLE = frozenset({"payments_not_configured"})


@schemathesis.serializer("application/zip")
def _zip_body(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """Bundle uploads are raw bytes (the schema says ``format: binary``)."""
    return value if isinstance(value, bytes) else str(value).encode()


HYPOTHESIS_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],  # no shrinking: failures are collected, not raised
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


@dataclass
class Failure:
    operation: str
    source: str
    identity: str
    reason: str
    request: str
    response: str
    server_log: str

    def render(self) -> str:
        parts = [
            f"--- {self.operation} [{self.source}, as {self.identity}]: {self.reason}",
            f"request:  {self.request}",
            f"response: {self.response}",
        ]
        if self.server_log:
            parts.append("server log:\n" + self.server_log)
        return "\n".join(parts)


class Recorder(logging.Handler):
    """Keeps the ERROR records (with tracebacks) that the app logs while a request runs."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> str:
        text = "\n".join(self.format(record) for record in self.records)
        self.records.clear()
        return text


async def test_fuzz_whole_api(app: FastAPI, client: httpx.AsyncClient) -> None:
    identities, known_ids = await _seed(app, client)
    document = app.openapi()
    # Signed-URL storage routes ({key:path}, a Starlette path convertor) are not part of the
    # client API and have their own tests (tests/storage); OpenAPI has no such template.
    document["paths"] = {p: ops for p, ops in document["paths"].items() if "/storage/" not in p}
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 20, [op.label for op in operations]

    loop = asyncio.get_running_loop()
    recorder = Recorder()
    root = logging.getLogger()
    root.addHandler(recorder)
    failures: dict[tuple[str, ...], Failure] = {}
    counts = {"sent": 0, "unsendable": 0}
    started = time.monotonic()

    def exercise(source: str, operation: Any, case: schemathesis.Case, identity: str) -> None:
        """Send one case as ``identity`` and record what is wrong with the answer."""
        request = _to_httpx(client, case, identities[identity])
        if request is None:  # not expressible as an HTTP request (e.g. a NUL in a header)
            counts["unsendable"] += 1
            return
        recorder.take()
        response = asyncio.run_coroutine_threadsafe(client.send(request), loop).result()
        counts["sent"] += 1
        server_log = recorder.take()
        for reason in _problems(case, response):
            key = (operation.label, source, reason.partition(":")[0])
            failures.setdefault(
                key,
                Failure(
                    operation=operation.label,
                    source=source,
                    identity=identity,
                    reason=reason,
                    request=_describe_request(request),
                    response=f"{response.status_code} {response.text[:2000]}",
                    server_log=server_log,
                ),
            )

    def fuzz_operation(operation: Any, mode: schemathesis.GenerationMode) -> None:
        strategies = [operation.as_strategy(generation_mode=mode)]
        if mode is schemathesis.GenerationMode.POSITIVE:
            strategies += [
                operation.as_strategy(generation_mode=mode, path_parameters=values)
                for values in _known_path_values(operation, known_ids)
            ]

        @HYPOTHESIS_SETTINGS
        @given(case=st.one_of(strategies), identity=st.sampled_from(list(identities)))
        def fuzz(case: schemathesis.Case, identity: str) -> None:
            exercise(f"fuzz, {mode.value} data", operation, case, identity)

        fuzz()

    def run_all() -> None:
        for operation in operations:
            # Deterministic first: Schemathesis's coverage cases (boundaries, missing and
            # wrong-typed fields, unexpected methods) and 64-bit overflow probes.
            fixed = [
                ("coverage", case)
                for case in schema.iter_coverage_cases(
                    operation,
                    generation_modes=list(MODES),
                    generation_config=schema.config.generation_for(
                        operation=operation, phase="coverage"
                    ),
                )
            ]
            fixed += [("64-bit overflow probe", case) for case in _overflow_probes(operation)]
            for (source, case), identity in itertools.product(fixed, FIXED_CASE_IDENTITIES):
                exercise(source, operation, case, identity)
            for mode in MODES:
                try:
                    fuzz_operation(operation, mode)
                except Unsatisfiable:
                    # Nothing in this operation can be made invalid (no parameters or body).
                    assert mode is schemathesis.GenerationMode.NEGATIVE, operation.label

    try:
        await asyncio.to_thread(run_all)
    finally:
        root.removeHandler(recorder)

    summary = (
        f"{counts['sent']} requests to {len(operations)} operations in"
        f" {time.monotonic() - started:.1f}s; {counts['unsendable']} generated cases could not"
        " be sent over HTTP"
    )
    assert counts["sent"] >= len(operations) * MAX_EXAMPLES * 2, summary
    if failures:
        shown = list(failures.values())[:MAX_REPORTED]
        report = "\n\n".join(f.render() for f in shown)
        if len(failures) > len(shown):
            report += f"\n\n... and {len(failures) - len(shown)} more"
        pytest.fail(f"{len(failures)} distinct API contract failures ({summary}):\n\n{report}")


async def _seed(
    app: FastAPI, client: httpx.AsyncClient
) -> tuple[dict[str, dict[str, str]], dict[str, list[str]]]:
    """A user who owns an org with a second member, an invite and an API key; and an admin."""
    from peergpu.server.db.models import UserRole
    from peergpu.server.services.accounts import create_user

    owner = await make_user(client, roles=["renter", "host"])
    member = await make_user(client)
    org = await make_org(client, owner)
    org_path = f"/api/v1/orgs/{org['id']}"
    invited = await client.post(
        f"{org_path}/invites", json={"email": member.email}, headers=owner.headers
    )
    assert invited.status_code == 201, invited.text
    token = invited.json()["accept_url"].split("token=")[1]
    accepted = await client.post(
        "/api/v1/invites/accept", json={"token": token}, headers=member.headers
    )
    assert accepted.status_code == 200, accepted.text
    pending = await client.post(
        f"{org_path}/invites", json={"email": "pending@example.com"}, headers=owner.headers
    )
    assert pending.status_code == 201, pending.text
    key = await client.post(
        "/api/v1/keys", json={"name": "fuzz", "scopes": ["read"]}, headers=owner.headers
    )
    assert key.status_code == 201, key.text

    context = app.state.context
    async with context.sessionmaker() as session:
        await create_user(
            session=session,
            passwords=context.passwords,
            email="fuzz-admin@example.com",
            password=PASSWORD,
            roles=[UserRole.admin],
        )
    login = await client.post(
        "/api/v1/auth/login", json={"email": "fuzz-admin@example.com", "password": PASSWORD}
    )
    assert login.status_code == 200, login.text

    identities = {
        "user": owner.headers,
        "admin": {"Authorization": f"Bearer {login.json()['access_token']}"},
        "api key": {"Authorization": f"Bearer {key.json()['key']}"},
        "anonymous": {},
    }
    known_ids = {
        "org_id": [org["id"]],
        "user_id": [owner.id, member.id],
        "invite_id": [pending.json()["id"]],
        "key_id": [key.json()["id"]],
    }
    return identities, known_ids


def _known_path_values(operation: Any, known_ids: dict[str, list[str]]) -> Iterator[dict[str, str]]:
    names = [p.name for p in operation.path_parameters]
    if not names or any(name not in known_ids for name in names):
        return
    for values in itertools.product(*(known_ids[name] for name in names)):
        yield dict(zip(names, values, strict=True))


def _overflow_probes(operation: Any) -> Iterator[schemathesis.Case]:
    """Schema-valid integers past 64 bits for every integer query parameter with no maximum:
    the database cannot store them, so the API must refuse them rather than crash."""
    for parameter in operation.query:
        schema = parameter.definition.get("schema", {})
        if schema.get("type") == "integer" and "maximum" not in schema:
            for value in (2**63, 2**64):
                yield operation.Case(query={parameter.name: value})


def _to_httpx(
    client: httpx.AsyncClient, case: schemathesis.Case, auth: dict[str, str]
) -> httpx.Request | None:
    kwargs = case.as_transport_kwargs(base_url=BASE_URL, headers=dict(auth))
    headers = dict(kwargs["headers"])
    if kwargs.get("cookies"):
        headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in kwargs["cookies"].items())
    content: bytes | None = None
    if "json" in kwargs:
        content = json.dumps(kwargs["json"]).encode()
    elif isinstance(kwargs.get("data"), bytes | str):
        content = kwargs["data"] if isinstance(kwargs["data"], bytes) else kwargs["data"].encode()
    elif kwargs.get("data") is not None or kwargs.get("files") is not None:
        raise AssertionError(f"unexpected body kind for {case.operation.label}: {sorted(kwargs)}")
    try:
        return client.build_request(
            kwargs["method"],
            kwargs["url"],
            params=kwargs.get("params"),
            headers=headers,
            content=content,
        )
    except (httpx.InvalidURL, UnicodeEncodeError, ValueError):
        return None


def _problems(case: schemathesis.Case, response: httpx.Response) -> Iterator[str]:
    status = response.status_code
    if status >= 500 and not (status == 503 and _error_code(response) in DELIBERATE_UNAVAILABLE):
        yield f"server error: {status}"
        return
    if 400 <= status < 500:
        yield from _error_shape_problems(response)
    try:
        case.validate_response(response, checks=SCHEMA_CHECKS)
    except FailureGroup as group:
        for failure in group.exceptions:
            if isinstance(failure, UndefinedStatusCode) and _tolerated(response):
                continue
            yield f"{type(failure).__name__}: {failure.title}: {failure.message}"
    except AssertionError as exc:
        yield f"{type(exc).__name__}: {exc}"


def _error_code(response: httpx.Response) -> str | None:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return None


def _tolerated(response: httpx.Response) -> bool:
    code = TOLERATED_UNDOCUMENTED.get(response.status_code)
    try:
        return code is not None and response.json()["error"]["code"] == code
    except (ValueError, KeyError, TypeError):
        return False


def _error_shape_problems(response: httpx.Response) -> Iterator[str]:
    """Every 4xx is JSON ``{"error": {"code": str, "message": str, "details": object}}``."""
    prefix = f"error body shape ({response.status_code})"
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith("application/json"):
        yield f"{prefix}: content-type is {content_type!r}"
        return
    try:
        body = response.json()
    except ValueError:
        yield f"{prefix}: not JSON"
        return
    if not isinstance(body, dict) or set(body) != {"error"}:
        yield f"{prefix}: top level is not exactly {{'error'}}"
        return
    error = body["error"]
    if not isinstance(error, dict) or set(error) != {"code", "message", "details"}:
        yield f"{prefix}: 'error' does not have exactly code, message, details"
        return
    if not (isinstance(error["code"], str) and error["code"]):
        yield f"{prefix}: code is not a non-empty string"
    if not (isinstance(error["message"], str) and error["message"]):
        yield f"{prefix}: message is not a non-empty string"
    if not isinstance(error["details"], dict):
        yield f"{prefix}: details is not an object"


def _describe_request(request: httpx.Request) -> str:
    headers = {
        name: value
        for name, value in request.headers.items()
        if name.lower()
        not in {
            "user-agent",
            "x-schemathesis-testcaseid",
            "host",
            "accept",
            "accept-encoding",
            "connection",
            "content-length",
        }
    }
    if "authorization" in headers:
        headers["authorization"] = headers["authorization"][:16] + "..."
    body = request.content.decode("utf-8", "backslashreplace")
    return (
        f"{request.method} {request.url.raw_path.decode()} headers={headers} body={body[:2000]!r}"
    )

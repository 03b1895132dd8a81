"""Jobs API: submit (validation, idempotency), bundles, list/get/visibility, cancel, history,
the marketplace. The scheduler and real agents are covered in tests/integration."""

from __future__ import annotations

import io
import uuid
import zipfile
from typing import Any

import httpx
import pytest

from tests.factories import ApiUser, assert_error, grant_credit, make_org, make_user

pytestmark = pytest.mark.timeout(60)


def _zip(files: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


async def _submit(
    client: httpx.AsyncClient, user: ApiUser, headers: dict[str, str] | None = None, **body: Any
) -> httpx.Response:
    payload: dict[str, Any] = {"command": ["echo", "hi"], **body}
    return await client.post(
        "/api/v1/jobs", json=payload, headers={**user.headers, **(headers or {})}
    )


async def test_submit_queues_a_job_with_defaults_and_history(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    response = await _submit(client, user, name="hello", gpu_models=["H100"], tags=["eu", "eu"])
    assert response.status_code == 201, response.text
    job = response.json()
    assert job["state"] == "queued"
    assert job["owner_id"] == user.id
    assert (job["gpu_count"], job["max_duration_seconds"], job["max_retries"]) == (1, 3600, 2)
    assert job["tags"] == ["eu"]
    assert job["attempt"] == 0 and job["host_id"] is None

    fetched = await client.get(f"/api/v1/jobs/{job['id']}", headers=user.headers)
    assert fetched.status_code == 200 and fetched.json()["id"] == job["id"]
    events = (await client.get(f"/api/v1/jobs/{job['id']}/events", headers=user.headers)).json()
    assert [(e["from_state"], e["to_state"], e["reason"]) for e in events["data"]] == [
        (None, "queued", "submit")
    ]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"command": []}, 422, None),
        ({"gpu_count": 0}, 422, None),
        ({"gpu_count": 17}, 422, None),
        ({"priority": 11}, 422, None),
        ({"env": {"1BAD": "x"}}, 422, None),
        ({"env": {"PEERGPU_TOKEN": "x"}}, 422, "invalid_input"),
        ({"image": "Not A Valid/Image!"}, 422, "invalid_image"),
        ({"image": "python:3.12", "bundle_sha256": "a" * 64}, 422, "invalid_input"),
        ({"bundle_sha256": "b" * 64}, 422, "unknown_bundle"),
        ({"bundle_sha256": "xyz"}, 422, None),
        ({"max_duration_seconds": 8 * 24 * 3600}, 422, "invalid_input"),
        ({"max_price_per_gpu_hour_micros": -1}, 422, None),
        ({"tags": ["Not OK"]}, 422, None),
        ({"surprise": True}, 422, None),
    ],
)
async def test_bad_submissions_are_clear_4xx(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, code: str | None
) -> None:
    user = await make_user(client)
    assert_error(await _submit(client, user, **body), status, code)


async def test_idempotency_key_returns_the_same_job(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    key = {"Idempotency-Key": "submit-42"}
    first = await _submit(client, user, key, name="once")
    again = await _submit(client, user, key, name="once")
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    assert_error(await _submit(client, user, key, name="other"), 409, "idempotency_key_reused")
    # Keys are per user: someone else's identical key is a different job.
    other = await make_user(client)
    theirs = await _submit(client, other, key, name="once")
    assert theirs.status_code == 201 and theirs.json()["id"] != first.json()["id"]
    listed = (await client.get("/api/v1/jobs", headers=user.headers)).json()
    assert listed["count"] == 1


async def test_jobs_are_visible_to_their_owner_and_org_only(
    client: httpx.AsyncClient, app: Any
) -> None:
    owner = await make_user(client)
    stranger = await make_user(client)
    mine = (await _submit(client, owner)).json()
    assert_error(await client.get(f"/api/v1/jobs/{mine['id']}", headers=stranger.headers), 404)
    assert_error(
        await client.post(f"/api/v1/jobs/{mine['id']}/cancel", headers=stranger.headers), 404
    )
    for path in ("events", "artifacts"):
        assert_error(
            await client.get(f"/api/v1/jobs/{mine['id']}/{path}", headers=stranger.headers), 404
        )
    assert (await client.get("/api/v1/jobs", headers=stranger.headers)).json()["count"] == 0

    org = await make_org(client, owner)
    assert_error(await _submit(client, stranger, org_id=org["id"]), 404)
    assert_error(await _submit(client, owner, org_id=org["id"]), 402)  # the org has no credit
    await grant_credit(app.state.context, f"org:{org['id']}", 10_000_000)
    shared = (await _submit(client, owner, org_id=org["id"])).json()
    assert shared["org_id"] == org["id"]
    member = await make_user(client)
    invite = await client.post(
        f"/api/v1/orgs/{org['id']}/invites", json={"email": member.email}, headers=owner.headers
    )
    assert invite.status_code == 201, invite.text
    accepted = await client.post(
        "/api/v1/invites/accept",
        json={"token": invite.json()["accept_url"].split("token=")[1]},
        headers=member.headers,
    )
    assert accepted.status_code == 200, accepted.text
    assert (await client.get(f"/api/v1/jobs/{shared['id']}", headers=member.headers)).is_success
    assert_error(await client.get(f"/api/v1/jobs/{mine['id']}", headers=member.headers), 404)
    listed = (await client.get("/api/v1/jobs", headers=member.headers)).json()
    assert [j["id"] for j in listed["data"]] == [shared["id"]]


async def test_list_filters_and_pages(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    ids = [(await _submit(client, user, name=f"j{i}")).json()["id"] for i in range(5)]
    await client.post(f"/api/v1/jobs/{ids[0]}/cancel", headers=user.headers)
    page = (await client.get("/api/v1/jobs?limit=2&offset=1", headers=user.headers)).json()
    assert page["count"] == 5
    assert [j["id"] for j in page["data"]] == [ids[3], ids[2]]
    cancelled = (await client.get("/api/v1/jobs?state=cancelled", headers=user.headers)).json()
    assert [j["id"] for j in cancelled["data"]] == [ids[0]]
    assert_error(await client.get("/api/v1/jobs?state=bogus", headers=user.headers), 422)


async def test_cancel_a_queued_job_once(client: httpx.AsyncClient) -> None:
    user = await make_user(client)
    job = (await _submit(client, user)).json()
    cancelled = await client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=user.headers)
    assert cancelled.status_code == 200, cancelled.text
    assert cancelled.json()["state"] == "cancelled"
    assert cancelled.json()["finished_at"] is not None
    again = await client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=user.headers)
    assert_error(again, 409, "job_finished")
    events = (await client.get(f"/api/v1/jobs/{job['id']}/events", headers=user.headers)).json()
    assert [e["to_state"] for e in events["data"]] == ["queued", "cancelled"]


async def test_bundle_upload_is_validated_and_content_addressed(
    client: httpx.AsyncClient,
) -> None:
    user = await make_user(client)
    data = _zip({"main.py": b"print('hi')\n", "data/x.txt": b"x"})
    headers = {**user.headers, "Content-Type": "application/zip"}
    first = await client.post("/api/v1/bundles", content=data, headers=headers)
    assert first.status_code == 201, first.text
    bundle = first.json()
    assert bundle["members"] == 2 and bundle["size"] == len(data)
    again = await client.post("/api/v1/bundles", content=data, headers=headers)
    assert again.status_code == 200 and again.json()["sha256"] == bundle["sha256"]

    job = await _submit(client, user, bundle_sha256=bundle["sha256"])
    assert job.status_code == 201, job.text
    # Knowing the digest is not enough: another renter must upload it themselves.
    other = await make_user(client)
    assert_error(await _submit(client, other, bundle_sha256=bundle["sha256"]), 422)

    slip = _zip({"../evil.py": b"x"})
    refused = await client.post("/api/v1/bundles", content=slip, headers=headers)
    assert assert_error(refused, 422, "invalid_bundle")["details"]["reason"] == "path_traversal"
    not_zip = await client.post("/api/v1/bundles", content=b"hello", headers=headers)
    assert assert_error(not_zip, 422, "invalid_bundle")["details"]["reason"] == "not_a_zip"
    empty = await client.post("/api/v1/bundles", content=b"", headers=headers)
    assert_error(empty, 422, "invalid_bundle")
    anonymous = await client.post("/api/v1/bundles", content=data)
    assert_error(anonymous, 401)


async def test_bundle_over_the_limit_is_413(
    client: httpx.AsyncClient, settings: Any, app: Any
) -> None:
    app.state.context.settings.bundle_max_bytes = 2048
    user = await make_user(client)
    big = _zip({f"f{i}.bin": bytes(range(256)) * 8 for i in range(4)})
    response = await client.post(
        "/api/v1/bundles", content=big, headers={**user.headers, "Content-Type": "application/zip"}
    )
    assert_error(response, 413)


async def test_marketplace_lists_priced_online_hosts(client: httpx.AsyncClient, app: Any) -> None:
    from peergpu.server.db.base import utcnow
    from peergpu.server.db.host_models import HostGpuModel, HostModel

    context = app.state.context
    owner = await make_user(client, roles=["host"])
    async with context.sessionmaker() as session:
        for n, (price, model, memory, online) in enumerate(
            [
                (2_000_000, "NVIDIA H100 80GB HBM3", 81559, True),
                (500_000, "NVIDIA GeForce RTX 4090", 24564, True),
                (100_000, "NVIDIA A100", 40960, False),
            ]
        ):
            host = HostModel(
                owner_id=uuid.UUID(owner.id),
                name=f"h{n}",
                region="eu" if n else "us",
                tags=["nvlink"] if n == 0 else [],
                price_per_gpu_hour_micros=price,
                status="online" if online else "offline",
                credential_prefix=f"pfx{n}{owner.id[:8]}",
                credential_hash="x" * 64,
                last_seen_at=utcnow(),
                runners=["process"],
            )
            session.add(host)
            await session.flush()
            session.add(
                HostGpuModel(
                    host_id=host.id, index=0, uuid=f"GPU-{n}", model=model, memory_total_mib=memory
                )
            )
        await session.commit()
    renter = await make_user(client)

    async def names(query: str) -> list[str]:
        response = await client.get(f"/api/v1/marketplace/hosts?{query}", headers=renter.headers)
        assert response.status_code == 200, response.text
        return [h["name"] for h in response.json()["data"]]

    assert await names("") == ["h1", "h0"]
    assert await names("online=false") == ["h2", "h1", "h0"]
    assert await names("gpu_model=h100") == ["h0"]
    assert await names("min_vram_mib=30000") == ["h0"]
    assert await names("max_price_per_gpu_hour_micros=600000") == ["h1"]
    assert await names("tag=nvlink") == ["h0"]
    assert await names("region=eu") == ["h1"]
    assert await names("min_gpus=2") == []
    assert await names("gpu_model=%25") == []  # a literal %, not a wildcard
    listing = (await client.get("/api/v1/marketplace/hosts", headers=renter.headers)).json()
    assert listing["data"][0]["free_gpus"] == 1
    assert listing["data"][0]["gpus"][0]["model"] == "NVIDIA GeForce RTX 4090"

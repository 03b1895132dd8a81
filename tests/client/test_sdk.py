"""The SDK against a real server (uvicorn in a thread), on SQLite + in-process bus and on
PostgreSQL + Redis: accounts, token refresh, errors, hosts, bundles and jobs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from peergpu.client import PeerGPU, PeerGPUError, PeerGPUUnavailable, zip_directory
from peergpu.server.security.tokens import AccessTokens
from tests.client.conftest import (
    Account,
    dead_server_url,
    needs_jobs_api,
    register,
    running_agent,
)
from tests.integration.harness import ThreadedServer, wait_for


def expired_access_token(server: ThreadedServer, user_id: str) -> str:
    """A genuine access token of this server whose lifetime ended an hour ago."""
    tokens = AccessTokens(secret=server.settings.resolved_secret_key(), ttl_seconds=60)
    return tokens.issue(uuid.UUID(user_id), now=datetime.now(UTC) - timedelta(hours=1))


def refresh_works(server: ThreadedServer, refresh_token: str) -> bool:
    response = httpx.post(
        f"{server.url}/api/v1/auth/refresh", json={"refresh_token": refresh_token}, timeout=10
    )
    return response.status_code == 200


def test_login_and_me(server: ThreadedServer, account: Account) -> None:
    seen: list[tuple[str, str]] = []
    with PeerGPU(server.url, on_tokens=lambda a, r: seen.append((a, r))) as client:
        pair = client.login(account.email, account.password)
        me = client.me()
    assert me.email == account.email and me.id == account.id
    assert set(me.roles) == {"renter", "host"}
    assert seen == [(pair.access_token, pair.refresh_token)]


def test_an_expired_access_token_is_refreshed_once_and_rotated(
    server: ThreadedServer, account: Account
) -> None:
    with PeerGPU(server.url) as first:
        pair = first.login(account.email, account.password)
    rotated: list[tuple[str, str]] = []
    client = PeerGPU(
        server.url,
        access_token=expired_access_token(server, account.id),
        refresh_token=pair.refresh_token,
        on_tokens=lambda a, r: rotated.append((a, r)),
    )
    with client:
        assert client.me().email == account.email
        assert client.me().email == account.email  # the new token is reused, no second refresh
    assert len(rotated) == 1
    new_access, new_refresh = rotated[0]
    assert new_refresh != pair.refresh_token
    assert (client.access_token, client.refresh_token) == (new_access, new_refresh)
    assert refresh_works(server, new_refresh)  # (this rotates it again; the SDK is done)


def test_a_401_from_the_server_triggers_the_refresh(
    server: ThreadedServer, account: Account
) -> None:
    with PeerGPU(server.url) as first:
        pair = first.login(account.email, account.password)
    # signed with another secret: looks current to the client, the server answers 401
    forged = AccessTokens(secret="another-secret-" + "y" * 40, ttl_seconds=900).issue(
        uuid.UUID(account.id)
    )
    rotated: list[tuple[str, str]] = []
    with PeerGPU(
        server.url,
        access_token=forged,
        refresh_token=pair.refresh_token,
        on_tokens=lambda a, r: rotated.append((a, r)),
    ) as client:
        assert client.me().id == account.id
    assert len(rotated) == 1
    assert not refresh_works(server, pair.refresh_token)  # the old refresh token is spent


def test_a_failed_refresh_is_an_authentication_error(
    server: ThreadedServer, account: Account
) -> None:
    client = PeerGPU(
        server.url,
        access_token=expired_access_token(server, account.id),
        refresh_token="not-a-refresh-token",
    )
    with client, pytest.raises(PeerGPUError) as raised:
        client.me()
    assert raised.value.status == 401 and raised.value.code == "invalid_refresh_token"


def test_api_keys_authenticate_without_refreshing(server: ThreadedServer, account: Account) -> None:
    with PeerGPU(server.url) as client:
        client.login(account.email, account.password)
        key = client._http.request("POST", "/keys", json_body={"name": "sdk"}).json()["key"]
    with PeerGPU(server.url, api_key=key) as keyed:
        assert keyed.me().email == account.email
    with PeerGPU(server.url, api_key=key[:-3] + "xyz", refresh_token="r") as bad:
        with pytest.raises(PeerGPUError) as raised:
            bad.me()
    assert raised.value.status == 401


def test_errors_carry_the_servers_code_and_message(
    server: ThreadedServer, account: Account
) -> None:
    with PeerGPU(server.url) as client:
        with pytest.raises(PeerGPUError) as raised:
            client.login(account.email, "wrong password!")
        assert raised.value.status == 401
        assert raised.value.code == "invalid_credentials"
        assert raised.value.message
        client.login(account.email, account.password)
        with pytest.raises(PeerGPUError) as missing:
            client.get_job(uuid.uuid4())
        assert (missing.value.status, missing.value.code) == (404, "not_found")


def test_an_unreachable_server_is_peergpu_unavailable() -> None:
    with PeerGPU(dead_server_url(), api_key="pgk_x", retries=1) as client:
        with pytest.raises(PeerGPUUnavailable, match="could not reach") as raised:
            client.me()
    assert isinstance(raised.value, ConnectionError)


def test_enrollment_token_then_my_hosts(server: ThreadedServer, account: Account) -> None:
    with PeerGPU(server.url) as client:
        client.login(account.email, account.password)
        token = client.create_enrollment_token(
            name="rig-7", region="eu-west", tags=["nvlink"], price_per_gpu_hour="1.25"
        )
        assert token.command == f"peergpu agent enroll --server {server.url} --token {token.token}"
        assert client.list_my_hosts() == []
        enrolled = httpx.post(
            f"{server.url}/api/v1/agent/enroll",
            json={"token": token.token, "hostname": "box"},
            timeout=10,
        )
        assert enrolled.status_code == 200, enrolled.text
        [host] = client.list_my_hosts()
    assert (host.name, host.region, host.tags) == ("rig-7", "eu-west", ["nvlink"])
    assert host.price_per_gpu_hour_micros == 1_250_000
    assert host.status == "offline"


def test_a_renter_cannot_create_an_enrollment_token(server: ThreadedServer) -> None:
    renter = register(server, roles=["renter"])
    with PeerGPU(server.url) as client:
        client.login(renter.email, renter.password)
        with pytest.raises(PeerGPUError) as raised:
            client.create_enrollment_token(name="x")
    assert raised.value.status == 403


@needs_jobs_api
def test_bundle_submit_list_get_events_cancel(
    server: ThreadedServer, account: Account, tmp_path: Path
) -> None:
    tree = tmp_path / "code"
    tree.mkdir()
    (tree / "main.py").write_text("print('hello')\n")
    archive = zip_directory(tree, tmp_path / "bundle.zip")
    with PeerGPU(server.url) as client:
        client.login(account.email, account.password)
        uploaded: list[tuple[int, int]] = []
        bundle = client.upload_bundle(archive, progress=lambda d, t: uploaded.append((d, t)))
        assert bundle.size == archive.stat().st_size and bundle.members == 1
        assert uploaded[-1] == (bundle.size, bundle.size)
        assert client.upload_bundle(archive.read_bytes()).sha256 == bundle.sha256

        job = client.submit_job(
            ["python", "main.py"],
            bundle_sha256=bundle.sha256,
            name="hello",
            env={"MODE": "test"},
            gpu_models=["H100"],
            max_price_per_gpu_hour_micros=3_000_000,
            idempotency_key="submit-1",
        )
        assert job.state == "queued" and job.bundle_sha256 == bundle.sha256
        assert job.env == {"MODE": "test"} and job.gpu_models == ["H100"]
        again = client.submit_job(
            ["python", "main.py"],
            bundle_sha256=bundle.sha256,
            name="hello",
            env={"MODE": "test"},
            gpu_models=["H100"],
            max_price_per_gpu_hour_micros=3_000_000,
            idempotency_key="submit-1",
        )
        assert again.id == job.id
        with pytest.raises(PeerGPUError) as reused:
            client.submit_job(["other"], idempotency_key="submit-1")
        assert (reused.value.status, reused.value.code) == (409, "idempotency_key_reused")

        page = client.list_jobs()
        assert [j.id for j in page.items] == [job.id] and page.total == 1
        assert client.list_jobs(state="running").items == []
        assert client.get_job(job.id).name == "hello"
        assert client.list_artifacts(job.id) == []

        cancelled = client.cancel_job(job.id)
        assert cancelled.state == "cancelled" and cancelled.is_final
        with pytest.raises(PeerGPUError) as finished:
            client.cancel_job(job.id)
        assert (finished.value.status, finished.value.code) == (409, "job_finished")
        states = [e.to_state for e in client.job_events(job.id)]
        assert states[0] == "queued" and states[-1] == "cancelled"


@needs_jobs_api
def test_an_invalid_bundle_is_refused(server: ThreadedServer, account: Account) -> None:
    with PeerGPU(server.url) as client:
        client.login(account.email, account.password)
        with pytest.raises(PeerGPUError) as raised:
            client.upload_bundle(b"this is not a zip")
    assert raised.value.code == "invalid_bundle"
    assert raised.value.details.get("reason") == "not_a_zip"


@needs_jobs_api
def test_marketplace_lists_online_hosts_with_their_gpus(
    server: ThreadedServer, account: Account, tmp_path: Path
) -> None:
    with PeerGPU(server.url) as client:
        client.login(account.email, account.password)
        token = client.create_enrollment_token(
            name="market-rig", region="eu", tags=["fast"], price_per_gpu_hour="0.5"
        )
        with running_agent(server, token.token, tmp_path, simulate="H100x2") as agent:
            wait_for(
                lambda: [h for h in client.list_my_hosts() if h.status == "online"],
                what="the agent to come online",
                context=agent.log,
            )
            [host] = client.list_marketplace_hosts(gpu_model="h100", tags=["fast"]).items
            assert (host.name, host.region, host.free_gpus) == ("market-rig", "eu", 2)
            assert host.price_per_gpu_hour_micros == 500_000
            assert [g.index for g in host.gpus] == [0, 1] and "H100" in host.gpus[0].model
            assert client.list_marketplace_hosts(gpu_model="A100").items == []
            assert client.list_marketplace_hosts(max_price_per_gpu_hour_micros=1).items == []
            assert client.list_marketplace_hosts(min_gpus=3).items == []
            assert client.list_marketplace_hosts(region="us").items == []
        wait_for(lambda: not client.list_marketplace_hosts().items, what="the host to go offline")
        assert [h.name for h in client.list_marketplace_hosts(online=False).items] == ["market-rig"]

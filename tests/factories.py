"""Factories for API-level tests: users with tokens, organizations, keys."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from peergpu.server.context import ServerContext
from peergpu.server.services.billing import ledger, postings

PASSWORD = "correct horse battery"
_counter = itertools.count()


@dataclass
class ApiUser:
    id: str
    email: str
    password: str
    access_token: str
    refresh_token: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


def unique_email(stem: str = "user") -> str:
    return f"{stem}{next(_counter)}@example.com"


async def make_user(
    client: httpx.AsyncClient, *, email: str | None = None, roles: list[str] | None = None
) -> ApiUser:
    email = email or unique_email()
    body: dict[str, Any] = {"email": email, "password": PASSWORD, "display_name": email[:10]}
    if roles is not None:
        body["roles"] = roles
    registered = await client.post("/api/v1/auth/register", json=body)
    assert registered.status_code == 201, registered.text
    tokens = (
        await client.post("/api/v1/auth/login", json={"email": email, "password": PASSWORD})
    ).json()
    return ApiUser(
        id=registered.json()["id"],
        email=email,
        password=PASSWORD,
        access_token=tokens["access_token"],
        refresh_token=tokens["refresh_token"],
    )


async def make_org(client: httpx.AsyncClient, owner: ApiUser, name: str = "Lab") -> dict[str, Any]:
    response = await client.post("/api/v1/orgs", json={"name": name}, headers=owner.headers)
    assert response.status_code == 201, response.text
    return dict(response.json())


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    """Assert the response is our error shape with this status (and code); return the error."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return dict(error)


async def grant_credit(context: ServerContext, wallet: str, amount: int) -> None:
    """Promotional credit for a wallet (``user:<id>`` or ``org:<id>``), straight in the ledger."""
    async with context.sessionmaker() as session:
        await ledger.post(
            session,
            postings.grant(wallet=wallet, amount=amount, key=f"test-grant:{uuid.uuid4()}"),
        )
        await session.commit()

"""Seed data for ``peergpu demo``: accounts for each role and a fresh renter API key.

Idempotent: running the demo again reuses the accounts and replaces the demo API key (a key's
secret is shown only once, so a new one is minted for every start).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.config import ServerSettings
from peergpu.server.context import ServerContext
from peergpu.server.db import migrate
from peergpu.server.db.base import utcnow
from peergpu.server.db.models import ApiKeyModel, UserModel, UserRole
from peergpu.server.schemas.api_keys import ApiKeyCreate
from peergpu.server.security.principal import Principal
from peergpu.server.services import accounts, api_keys

DEMO_PASSWORD = "peergpu-demo"
DEMO_KEY_NAME = "demo"


@dataclass(frozen=True, slots=True)
class DemoAccount:
    role: str
    email: str
    password: str
    api_key: str | None = None


_ACCOUNTS = (
    ("renter", "renter@demo.peergpu.dev", [UserRole.renter]),
    ("host", "host@demo.peergpu.dev", [UserRole.host]),
    ("admin", "admin@demo.peergpu.dev", [UserRole.admin, UserRole.renter, UserRole.host]),
)


async def seed_demo(settings: ServerSettings) -> list[DemoAccount]:
    context = ServerContext.build(settings)
    try:
        await migrate.upgrade(context.engine)
        seeded: list[DemoAccount] = []
        async with context.sessionmaker() as session:
            for label, email, roles in _ACCOUNTS:
                user = await session.scalar(select(UserModel).where(UserModel.email == email))
                if user is None:
                    user = await accounts.create_user(
                        session=session,
                        passwords=context.passwords,
                        email=email,
                        password=DEMO_PASSWORD,
                        roles=roles,
                        display_name=f"Demo {label}",
                    )
                key = None
                if label == "renter":
                    key = await _fresh_demo_key(session=session, user=user)
                seeded.append(DemoAccount(label, email, DEMO_PASSWORD, key))
        return seeded
    finally:
        await context.close()


def wipe(data_dir: Path) -> None:
    if data_dir.exists():
        shutil.rmtree(data_dir)


async def _fresh_demo_key(*, session: AsyncSession, user: UserModel) -> str:
    await session.execute(
        update(ApiKeyModel)
        .where(
            ApiKeyModel.user_id == user.id,
            ApiKeyModel.name == DEMO_KEY_NAME,
            ApiKeyModel.revoked_at.is_(None),
        )
        .values(revoked_at=utcnow())
    )
    await session.commit()
    _key, plaintext = await api_keys.create_key(
        session=session,
        principal=Principal.for_session(user),
        data=ApiKeyCreate(name=DEMO_KEY_NAME),
    )
    return plaintext

"""Seed data for ``peergpu demo``: accounts for each role, a fresh renter API key, and three
simulated hosts (enrolled like real ones; their agents run as separate processes).

Idempotent: running the demo again reuses the accounts and hosts and replaces the demo API key
(a key's secret is shown only once, so a new one is minted for every start).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession

from peergpu.agent import credentials
from peergpu.config import ServerSettings
from peergpu.protocol.manifest import encode_public_key, key_id
from peergpu.server.api.hosts import WEBSOCKET_PATH
from peergpu.server.context import ServerContext
from peergpu.server.db import migrate
from peergpu.server.db.base import utcnow
from peergpu.server.db.host_models import HostModel
from peergpu.server.db.models import ApiKeyModel, UserModel, UserRole
from peergpu.server.schemas.api_keys import ApiKeyCreate
from peergpu.server.security.principal import Principal
from peergpu.server.services import accounts, api_keys, hosts
from peergpu.server.services.hosts import HostSettings

DEMO_PASSWORD = "peergpu-demo"
#: Demo credit: the demo accounts start with $100, anyone who registers in the demo with $25.
#: The demo runs on the ledger alone (no Stripe keys); this is promotional credit.
DEMO_ACCOUNT_CREDIT_MICROS = 100_000_000
DEMO_SIGNUP_CREDIT_MICROS = 25_000_000
DEMO_KEY_NAME = "demo"


@dataclass(frozen=True, slots=True)
class DemoHost:
    name: str
    simulate: str
    state_dir: Path


#: name, simulated GPUs, price per GPU-hour in micro-dollars, region.
DEMO_HOSTS = (
    ("demo-h100", "H100x2", 2_490_000, "us-east"),
    ("demo-a100", "A100", 1_290_000, "eu-west"),
    ("demo-4090", "RTX4090", 390_000, "eu-central"),
)


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


async def seed_demo(settings: ServerSettings) -> tuple[list[DemoAccount], list[DemoHost]]:
    context = ServerContext.build(settings)
    try:
        await migrate.upgrade(context.engine)
        seeded: list[DemoAccount] = []
        host_owner: UserModel | None = None
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
                        signup_credit_micros=DEMO_ACCOUNT_CREDIT_MICROS,
                    )
                key = None
                if label == "renter":
                    key = await _fresh_demo_key(session=session, user=user)
                if label == "host":
                    host_owner = user
                seeded.append(DemoAccount(label, email, DEMO_PASSWORD, key))
            assert host_owner is not None
            demo_hosts = await _seed_hosts(context, session, host_owner)
        return seeded, demo_hosts
    finally:
        await context.close()


async def _seed_hosts(
    context: ServerContext, session: AsyncSession, owner: UserModel
) -> list[DemoHost]:
    """Enrol each demo host once (the agent's credential file is kept in the data dir)."""
    demo_hosts: list[DemoHost] = []
    for name, simulate, price, region in DEMO_HOSTS:
        state_dir = context.settings.data_dir / "agents" / name
        path = state_dir / "credentials.json"
        if path.exists():
            existing = credentials.load(path)
            host = await session.get(HostModel, existing.host_id)
            if host is not None and host.revoked_at is None:
                if existing.server_url != context.settings.effective_public_url:
                    credentials.save(
                        path, replace(existing, server_url=context.settings.effective_public_url)
                    )
                demo_hosts.append(DemoHost(name, simulate, state_dir))
                continue
        _row, token = await hosts.create_enrollment_token(
            session=session,
            principal=Principal.for_session(owner),
            settings=HostSettings(
                name=name, region=region, tags=["demo"], price_per_gpu_hour_micros=price
            ),
            ttl_seconds=600,
        )
        enrollment = await hosts.enroll(session=session, token=token, hostname=name)
        public_key = context.signing_key.public_key()
        credentials.save(
            path,
            credentials.Credentials(
                server_url=context.settings.effective_public_url,
                host_id=enrollment.host.id,
                credential=enrollment.credential,
                server_public_key=encode_public_key(public_key),
                key_id=key_id(public_key),
                heartbeat_interval=context.settings.agent_heartbeat_seconds,
                websocket_path=WEBSOCKET_PATH,
            ),
        )
        demo_hosts.append(DemoHost(name, simulate, state_dir))
    return demo_hosts


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

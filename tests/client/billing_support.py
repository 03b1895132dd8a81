"""Steps the SDK and CLI billing tests share, run on the threaded server's own loop: hosts,
a job run and settled by hand, an admin, an empty wallet, host earnings, and a server whose
Stripe is the loopback fake from tests/billing."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta

import httpx
from pydantic import SecretStr
from sqlalchemy import func, select, update

from peergpu.config import ServerSettings
from peergpu.server.context import ServerContext
from peergpu.server.db.base import utcnow
from peergpu.server.db.billing_models import JobChargeModel
from peergpu.server.db.job_models import JobModel
from peergpu.server.db.models import UserModel
from peergpu.server.services import scheduler
from peergpu.server.services.billing import accounts, ledger, settlement
from tests.billing.stripe_fake import FakeStripe
from tests.client.conftest import Account
from tests.integration.harness import ThreadedServer, free_port, wait_for
from tests.unit.scheduling import make_host

SIGNUP = 1_000_000_000  # what tests/conftest.py gives every new account ($1,000)
PRICE = 3_600_000  # $3.60 per GPU-hour: 1,000 micro-dollars per GPU-second
WEBHOOK = "/api/v1/billing/stripe/webhook"


def add_host(server: ThreadedServer, owner: Account, *, price: int = PRICE) -> uuid.UUID:
    """An online host with one A100 (no agent: the tests play its part in the database)."""
    owner_id = uuid.UUID(owner.id)
    return server.call(lambda ctx: make_host(ctx, owner_id, price=price, gpus=[("A100", 40960)]))


def schedule(server: ThreadedServer, job_id: str) -> None:
    """Scheduler passes until the job is assigned (its hold placed). The server's own
    scheduler loop runs too, and on PostgreSQL a pass skips the rows another pass holds, so
    one pass of ours may find nothing to do while the loop's has not committed yet."""

    async def attempt(context: ServerContext) -> bool:
        await scheduler.schedule_once(context)
        async with context.sessionmaker() as session:
            job = await session.get(JobModel, uuid.UUID(job_id))
            return job is not None and job.state != "queued"

    wait_for(lambda: server.call(attempt), what=f"job {job_id} to be assigned")


def run_and_settle(server: ThreadedServer, job_id: str, *, seconds: int) -> None:
    """Assign the job (the hold goes on), end it after ``seconds`` of running, and settle:
    the renter pays the seconds, the host owner earns them less the platform fee."""
    schedule(server, job_id)

    async def end(context: ServerContext) -> None:
        now = utcnow()
        async with context.sessionmaker() as session:
            await session.execute(
                update(JobModel)
                .where(JobModel.id == uuid.UUID(job_id))
                .values(
                    state="succeeded",
                    started_at=now - timedelta(seconds=seconds),
                    finished_at=now,
                )
            )
            await session.commit()

    async def settled(context: ServerContext) -> bool:
        await settlement.settle_open(context)  # (or the server's own sweep did it)
        async with context.sessionmaker() as session:
            open_charges = await session.scalar(
                select(func.count())
                .select_from(JobChargeModel)
                .where(
                    JobChargeModel.job_id == uuid.UUID(job_id),
                    JobChargeModel.settled_at.is_(None),
                )
            )
            return open_charges == 0

    server.call(end)
    wait_for(lambda: server.call(settled), what=f"job {job_id} to be settled")


def make_admin(server: ThreadedServer, account: Account) -> None:
    async def promote(context: ServerContext) -> None:
        async with context.sessionmaker() as session:
            await session.execute(
                update(UserModel).where(UserModel.id == uuid.UUID(account.id)).values(is_admin=True)
            )
            await session.commit()

    server.call(promote)


def spend_everything(server: ThreadedServer, account: Account) -> None:
    """Move all available credit away (a balanced ledger transfer), leaving $0."""
    available = accounts.available(_wallet(account))

    async def balance(context: ServerContext) -> int:
        async with context.sessionmaker() as session:
            return (await ledger.balances(session, [available]))[available]

    _transfer(server, available, accounts.PROMOTIONS, server.call(balance))


def give_payable(server: ThreadedServer, owner: Account, amount: int) -> None:
    """Host earnings without a job (straight from promotions)."""
    _transfer(server, accounts.PROMOTIONS, accounts.host_payable(uuid.UUID(owner.id)), amount)


def create_org(server: ThreadedServer, account: Account) -> str:
    tokens = httpx.post(
        f"{server.url}/api/v1/auth/login",
        json={"email": account.email, "password": account.password},
        timeout=10,
    ).json()
    created = httpx.post(
        f"{server.url}/api/v1/orgs",
        json={"name": "Lab"},
        headers={"Authorization": f"Bearer {tokens['access_token']}"},
        timeout=10,
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


@contextmanager
def stripe_server(settings: ServerSettings) -> Iterator[tuple[ThreadedServer, FakeStripe]]:
    """A server whose Stripe is the fake (keys, webhook secret, API base), and the fake."""
    with FakeStripe() as fake:
        port = free_port()
        configured = settings.model_copy(
            update={
                "port": port,
                "public_url": f"http://127.0.0.1:{port}",
                "stripe_secret_key": SecretStr(fake.api_key),
                "stripe_webhook_secret": SecretStr(fake.webhook_secret),
                "stripe_api_base": fake.base_url,
                "stripe_connect_base": fake.base_url,
            }
        )
        server = ThreadedServer(configured).start()
        try:
            yield server, fake
        finally:
            server.stop()


def enable_payouts(server: ThreadedServer, fake: FakeStripe, stripe_account_id: str) -> None:
    """Play Stripe: the host finished onboarding, and Stripe says so by webhook."""
    account = fake.update(stripe_account_id, details_submitted=True, payouts_enabled=True)
    payload, signature = fake.event("account.updated", account, account=stripe_account_id)
    delivered = httpx.post(
        server.url + WEBHOOK,
        content=payload,
        headers={"Content-Type": "application/json", "Stripe-Signature": signature},
        timeout=10,
    )
    assert delivered.status_code == 200, delivered.text
    assert delivered.json()["outcome"] == "payouts enabled", delivered.text


def _wallet(account: Account) -> str:
    return accounts.user_wallet(uuid.UUID(account.id))


def _transfer(server: ThreadedServer, source: str, target: str, amount: int) -> None:
    async def post(context: ServerContext) -> None:
        async with context.sessionmaker() as session:
            await ledger.post(
                session,
                ledger.transfer(
                    f"test:{uuid.uuid4()}", "grant", source=source, target=target, amount=amount
                ),
            )
            await session.commit()

    server.call(post)

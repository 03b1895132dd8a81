"""Everything a running server holds, built once from settings and kept on ``app.state``."""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from peergpu.config import ServerSettings
from peergpu.server.bus import Bus, create_bus
from peergpu.server.db.session import create_engine, create_sessionmaker
from peergpu.server.ratelimit import RateLimiter, create_rate_limiter
from peergpu.server.security.manifest_keys import load_signing_key
from peergpu.server.security.passwords import PasswordHashing
from peergpu.server.security.tokens import AccessTokens
from peergpu.server.services.billing.usage_writer import CreditCache, UsageRecorder
from peergpu.server.services.callers import PrincipalCache
from peergpu.server.services.email import Mailer, create_mailer
from peergpu.server.services.job_writer import JobWriter
from peergpu.server.storage import ObjectStore, create_object_store, derive_storage_secret

#: Seconds a wallet found with credit is not asked again by submit's no-credit check.
SUBMIT_CREDIT_TTL = 2.0


@dataclass(slots=True)
class ServerContext:
    settings: ServerSettings
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    bus: Bus
    rate_limiter: RateLimiter
    passwords: PasswordHashing
    access_tokens: AccessTokens
    mailer: Mailer
    signing_key: Ed25519PrivateKey
    storage: ObjectStore
    #: Inference usage rows, group-committed (the app's lifespan starts and closes it).
    usage: UsageRecorder
    #: New jobs, group-committed (``services.job_writer``).
    job_writer: JobWriter
    #: Callers of the hot routes, remembered for a few seconds (``services.callers``).
    principals: PrincipalCache = field(default_factory=PrincipalCache)
    #: Wallets that had some credit a moment ago: submit's no-credit check skips its query.
    credit_seen: CreditCache = field(default_factory=lambda: CreditCache(ttl=SUBMIT_CREDIT_TTL))

    @classmethod
    def build(cls, settings: ServerSettings) -> ServerContext:
        engine = create_engine(settings)
        sessionmaker = create_sessionmaker(engine)
        bus = create_bus(settings)
        return cls(
            settings=settings,
            engine=engine,
            sessionmaker=sessionmaker,
            bus=bus,
            rate_limiter=create_rate_limiter(settings),
            passwords=PasswordHashing(
                time_cost=settings.argon2_time_cost,
                memory_cost_kib=settings.argon2_memory_cost_kib,
            ),
            access_tokens=AccessTokens(
                secret=settings.resolved_secret_key(),
                ttl_seconds=settings.access_token_ttl_seconds,
            ),
            mailer=create_mailer(settings),
            signing_key=load_signing_key(settings),
            storage=create_object_store(
                settings, secret=derive_storage_secret(settings.resolved_secret_key())
            ),
            usage=UsageRecorder(sessionmaker),
            job_writer=JobWriter(sessionmaker, bus, sqlite=settings.is_sqlite),
        )

    async def close(self) -> None:
        await self.job_writer.close()  # writes what is queued: needs the database and bus
        await self.usage.close()  # writes what is buffered: needs the database
        await self.storage.close()
        await self.rate_limiter.close()
        await self.bus.close()
        await self.engine.dispose()

"""Imports every model module so ``Base.metadata`` knows all tables (Alembic, tests)."""

from peergpu.server.db import host_models, job_models, models

__all__ = ["host_models", "job_models", "models"]

"""Imports every model module so ``Base.metadata`` knows all tables (Alembic, tests)."""

from peergpu.server.db import billing_models, host_models, job_models, models, usage_models

__all__ = ["billing_models", "host_models", "job_models", "models", "usage_models"]

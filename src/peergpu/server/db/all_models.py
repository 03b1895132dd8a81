"""Imports every model module so ``Base.metadata`` knows all tables (Alembic, tests)."""

from peergpu.server.db import models

__all__ = ["models"]

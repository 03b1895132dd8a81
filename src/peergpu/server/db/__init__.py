"""Database layer: SQLAlchemy 2 models, engine/session handling and migrations."""

"""Alembic migrations of the builder registry's tables (version table ``alembic_version_registry``)."""

"""The scorer's Alembic migrations (applied by ftps.common.db.Database.migrate)."""

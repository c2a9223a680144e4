from ftps.common.db import run_migrations

run_migrations()

#!/usr/bin/env bash
# Run once by the postgres image's entrypoint, when it initialises an empty volume (mounted at
# /docker-entrypoint-initdb.d from the ConfigMap postgres-init). One role and one database per service,
# taken from the URLs the services themselves read (Secret ftps-database), so that the two cannot
# disagree: postgresql+psycopg://ROLE:PASSWORD@postgres:5432/DATABASE. Each role owns its database
# (and so its public schema) and may connect to no other: no service reads another's tables.
# Changing a password later: ALTER ROLE in psql as well as the Secret (this script does not run again).
set -euo pipefail

create() {
    local url=$1 rest creds role password db
    rest=${url#*://}
    creds=${rest%%@*}
    role=${creds%%:*}
    password=${creds#*:}
    db=${rest#*/}
    db=${db%%\?*}
    # The URL carries the password percent-encoded; the role gets the decoded one.
    password=$(printf '%b' "${password//%/\\x}")
    if [[ -z $role || -z $password || $creds != *:* || -z $db || $db == "$rest" ]]; then
        echo "postgres-init: cannot read role, password and database from a database URL" >&2
        return 1
    fi
    # psql variables quote the names and the password (no string pasting into SQL).
    psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname postgres \
        --set=role="$role" --set=password="$password" --set=db="$db" <<'EOSQL'
CREATE ROLE :"role" LOGIN PASSWORD :'password';
CREATE DATABASE :"db" OWNER :"role" ENCODING 'UTF8';
REVOKE ALL ON DATABASE :"db" FROM PUBLIC;
GRANT CONNECT, TEMPORARY ON DATABASE :"db" TO :"role";
EOSQL
    echo "postgres-init: database $db owned by role $role"
}

create "$FTPS_REGISTRY_DATABASE_URL"
create "$FTPS_GATEWAY_DATABASE_URL"
create "$FTPS_SCORER_DATABASE_URL"

#!/usr/bin/env bash
# First start: create the cluster in $PGDATA with $POSTGRES_USER (password $POSTGRES_PASSWORD, required) and
# the database $POSTGRES_DB (default: the user's name). Every start: run the server on all interfaces of the
# container, password (SCRAM) authentication for every TCP client.
set -euo pipefail
: "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD must be set (the MLflow store password)}"
db=${POSTGRES_DB:-$POSTGRES_USER}

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    trap 'rm -f "$pwfile"' EXIT
    printf '%s\n' "$POSTGRES_PASSWORD" >"$pwfile"
    initdb -D "$PGDATA" --username="$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=scram-sha-256 --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    if [ "$db" != "postgres" ]; then
        pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start >/dev/null
        createdb --username="$POSTGRES_USER" "$db"
        pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
    fi
    echo "slak-postgres: created the cluster in $PGDATA (user $POSTGRES_USER, database $db)"
fi
exec postgres -D "$PGDATA" -c listen_addresses='*' "$@"

#!/bin/sh
# Entrypoint of the locally built Postgres image (`cargo xtask image`).
# It follows the official postgres image's contract closely enough for pgharness:
# POSTGRES_USER, POSTGRES_PASSWORD (or POSTGRES_PASSWORD_FILE), POSTGRES_DB,
# POSTGRES_HOST_AUTH_METHOD and PGDATA, and `docker run IMAGE postgres -c key=value ...`
# passes server options through. Unlike it, the server never sees the password in its
# environment (anyone with the server's uid on the host could read /proc/<pid>/environ),
# and it runs as a uid that no host account has: a container's uid is the host's, and the
# Debian package's `postgres` uid is a system account's on most hosts (messagebus, …).
set -eu
if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
    POSTGRES_PASSWORD=$(cat "$POSTGRES_PASSWORD_FILE")
fi
PG_UID=2000001
if [ "$(id -u postgres)" != "$PG_UID" ]; then
    sed -i "s/^postgres:x:[0-9]*:[0-9]*:/postgres:x:$PG_UID:$PG_UID:/" /etc/passwd
    sed -i "s/^postgres:x:[0-9]*:/postgres:x:$PG_UID:/" /etc/group
fi
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
: "${PGDATA:=/var/lib/postgresql/data}"
: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
auth="${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}"

mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"

as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups "$@"; }

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ "$auth" != trust ] && [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "error: set POSTGRES_PASSWORD, or POSTGRES_HOST_AUTH_METHOD=trust" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "${POSTGRES_PASSWORD:-}" > "$pwfile"
    chown postgres "$pwfile"
    as_postgres "$PGBIN/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host="$auth" --encoding=UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    printf 'host all all all %s\n' "$auth" >> "$PGDATA/pg_hba.conf"
    if [ "$POSTGRES_DB" != postgres ]; then
        as_postgres "$PGBIN/postgres" --single -D "$PGDATA" postgres >/dev/null <<SQL
CREATE DATABASE "$POSTGRES_DB";
SQL
    fi
fi

unset POSTGRES_PASSWORD POSTGRES_PASSWORD_FILE
# Like the official image: flags alone (`-c fsync=off`) are flags for postgres.
case "${1:-}" in -*) set -- postgres "$@" ;; esac
if [ "${1:-postgres}" = postgres ]; then
    [ $# -gt 0 ] && shift
    exec setpriv --reuid=postgres --regid=postgres --init-groups \
        "$PGBIN/postgres" -D "$PGDATA" -c listen_addresses='*' "$@"
fi
exec "$@"

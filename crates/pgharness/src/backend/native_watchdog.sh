#!/bin/sh
# Owns a native pgharness Postgres server: starts it, stops it on SIGTERM/SIGINT/SIGHUP,
# and stops it after PGH_IDLE seconds with no client connected. Written out and started
# by crates/pgharness/src/backend/native.rs; runs as the server's (unprivileged) user.
# PGH_LISTEN is empty (the Unix socket in PGH_SOCK only) or 127.0.0.1 (`native_tcp`).
set -u
"$PGH_BIN/postgres" -D "$PGH_DATA" -k "$PGH_SOCK" -p "$PGH_PORT" -c hba_file="$PGH_HBA" \
    -c listen_addresses="$PGH_LISTEN" -c fsync=off -c synchronous_commit=off \
    -c full_page_writes=off -c max_connections="$PGH_MAX_CONNECTIONS" &
pg=$!
stop() { kill -INT "$pg" 2>/dev/null; wait "$pg"; exit 0; }
trap stop TERM INT HUP
if [ ! -x "$PGH_BIN/psql" ]; then
    echo "pgharness watchdog: no psql in $PGH_BIN, so no idle shutdown" >&2
    wait "$pg"
    exit 0
fi
idle=0
step=5
while kill -0 "$pg" 2>/dev/null; do
    sleep "$step" &
    wait $!
    clients=$("$PGH_BIN/psql" -h "$PGH_SOCK" -p "$PGH_PORT" -U postgres -d postgres -XAtq -c \
        "select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()" \
        2>/dev/null || echo 1)
    if [ "$clients" = 0 ]; then idle=$((idle + step)); else idle=0; fi
    if [ "$idle" -ge "$PGH_IDLE" ]; then
        echo "pgharness watchdog: no client for ${idle}s, stopping" >&2
        kill -INT "$pg" 2>/dev/null
        wait "$pg"
        # The whole directory goes, not only its data: nothing of a stopped server stays.
        rm -rf "$PGH_BASE"
        exit 0
    fi
done

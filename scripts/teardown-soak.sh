#!/usr/bin/env bash
# Teardowns under load (issue 26): 500 tests that query with parameters (prepared
# statements, closed just before each test's teardown) at THREADS threads, RUNS times under
# plain `cargo nextest run` and RUNS times under `cargo pgharness test`, on BACKEND (native
# by default: a Unix socket, where a teardown lost behind a statement's Close showed).
# Per run it prints the teardowns lost (acquires the server never finished itself: no
# outcome once the run's sessions are gone, or finished later by a sweep) and the role's
# schema count; it fails when a teardown was lost or the schema count grew run over run.
#
#   scripts/teardown-soak.sh                 # the long form: 10 + 10 runs
#   RUNS=1 scripts/teardown-soak.sh          # CI's size
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-10}
THREADS=${THREADS:-4}
BACKEND=${BACKEND:-native}
TESTS=500
FILTER='test(/^soak_/)'

cargo build -q -p cargo-pgharness
cargo nextest run --cargo-quiet -p pgharness-bench-suite --test soak --no-run
cargo pgharness up --backend "$BACKEND" >/dev/null
trap 'cargo pgharness down >/dev/null 2>&1 || true' EXIT
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
export PGSERVICEFILE="$target_dir/pgharness/pg_service.conf" PGSERVICE=pgharness
ns=$(psql -XAtc "SELECT 'pgharness_' || current_user")

# The run's sessions gone (at most 20 s), then what the server recorded for the acquires
# made since `since` (the runner names its runs itself).
figures() {
    local since=$1
    for _ in $(seq 200); do
        busy=$(psql -XAtc "SELECT count(*) FROM $ns.ledger l WHERE claimed_at >= '$since' AND status = 'active'
            AND EXISTS (SELECT 1 FROM pg_locks k WHERE k.locktype = 'advisory' AND k.granted
                        AND k.objsubid = 2 AND k.classid::bigint = 1885825024 AND k.objid::bigint = l.lock_key)")
        [ "$busy" = 0 ] && break
        sleep 0.1
    done
    psql -XAtF ' ' -c "SELECT
        (SELECT count(*) FROM $ns.acquires WHERE at >= '$since' AND outcome IS NOT NULL AND path <> 'lost'),
        (SELECT count(*) FROM $ns.acquires WHERE at >= '$since' AND path = 'lost'),
        (SELECT count(*) FROM $ns.ledger WHERE status <> 'dropped')"
}

lost_total=0
for mode in nextest runner; do
    previous=""
    for i in $(seq "$RUNS"); do
        run="soak-$mode-$$-$i"
        since=$(psql -XAtc "SELECT now()")
        started=$(date +%s%N)
        if [ "$mode" = nextest ]; then
            PGHARNESS_BACKEND=$BACKEND PGHARNESS_RUN_ID=$run cargo nextest run --cargo-quiet -p pgharness-bench-suite --test soak \
                --run-ignored only -E "$FILTER" --test-threads "$THREADS" --no-fail-fast \
                >/dev/null 2>"$target_dir/soak-$run.log" || { cat "$target_dir/soak-$run.log"; exit 1; }
        else
            cargo pgharness test --backend "$BACKEND" -p pgharness-bench-suite \
                --test soak --run-ignored only -E "$FILTER" --test-threads "$THREADS" \
                >/dev/null 2>"$target_dir/soak-$run.log" || { cat "$target_dir/soak-$run.log"; exit 1; }
        fi
        read -r recorded swept schemas < <(figures "$since")
        lost=$((TESTS - recorded))
        lost_total=$((lost_total + lost))
        printf 'soak %-7s run %2d: %3d tests, %3d teardowns recorded, %3d lost (%s finished by a sweep), %3d schemas, %.1f s\n' \
            "$mode" "$i" "$TESTS" "$recorded" "$lost" "$swept" "$schemas" \
            "$(awk -v a="$started" -v b="$(date +%s%N)" 'BEGIN { print (b - a) / 1e9 }')"
        if [ -n "$previous" ] && [ "$schemas" -gt $((previous + THREADS * 2)) ]; then
            echo "soak: the schema count grew from $previous to $schemas" >&2
            exit 1
        fi
        previous=$schemas
    done
done
echo "soak: $((RUNS * 2)) runs of $TESTS tests at $THREADS threads on $BACKEND: $lost_total teardowns lost"
[ "$lost_total" = 0 ]

#!/usr/bin/env bash
# The figures of issue 16 that a benchmark inside this workspace cannot show, measured as a
# user meets them. Run from the repository root on an otherwise idle machine:
#
#   scripts/adoption-figures.sh connect     # a dependent crate's dev profile, url server, 4096-round SCRAM
#   scripts/adoption-figures.sh first-run   # `cargo xtask test -p todo-app` on a fresh clone (cold target)
#   scripts/adoption-figures.sh rds-cold    # todo-app at 30 ms RTT: fresh emulated cluster vs a warm one
#
# Each prints what it measured; nothing here is a pass/fail test.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-}

p50() { sort -n | awk '{a[NR]=$1} END {if (NR) print a[int(NR/2)+1]; else print "-"}'; }

case "$what" in
connect)
    # A server a user gives: the workspace's container, and a role whose password Postgres
    # stores as it does by default (SCRAM-SHA-256, 4096 iterations).
    (cd "$root" && cargo xtask up --backend container >/dev/null)
    port=$(sed -n 's/^DATABASE_URL=.*@127\.0\.0\.1:\([0-9]*\)\/.*/\1/p' "$root/target/pgharness/env")
    export PGPASSFILE="$root/target/pgharness/pgpass"
    role=adoption_$$
    password="pw-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"
    psql -qX -h 127.0.0.1 -p "$port" -U postgres -d postgres \
        -c "CREATE ROLE $role LOGIN PASSWORD '$password'" \
        -c "GRANT CREATE ON DATABASE postgres TO $role" >/dev/null
    work=$(mktemp -d /tmp/pgharness-adoption-XXXXXX)
    mkdir -p "$work/src" "$work/tests" "$work/migrations"
    cat >"$work/Cargo.toml" <<EOF
[package]
name = "adoption"
version = "0.1.0"
edition = "2021"

[workspace]

[dev-dependencies]
pgharness = { path = "$root/crates/pgharness", default-features = false }
tokio = { version = "1", features = ["macros", "rt"] }
EOF
    echo '//! A dependent crate.' >"$work/src/lib.rs"
    echo 'CREATE TABLE t (id int);' >"$work/migrations/0001_t.sql"
    printf 'migrations = "migrations"\nbackend = "url"\n' >"$work/pgharness.toml"
    for i in $(seq 1 24); do
        cat >>"$work/tests/acquire.rs" <<EOF
#[tokio::test]
async fn acquire_$i() {
    let started = std::time::Instant::now();
    let db = pgharness::TestDb::builder().build().await.unwrap();
    db.client().simple_query("SELECT 1").await.unwrap();
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).create(true).open(env!("CARGO_MANIFEST_DIR").to_owned() + "/times").unwrap();
    writeln!(f, "{ms:.2}").unwrap();
}
EOF
    done
    export PGHARNESS_URL="postgres://$role:$password@127.0.0.1:$port/postgres"
    cd "$work"
    cargo nextest run >/dev/null 2>&1 # builds in the default dev profile, fills the pool
    rm -f times
    for _ in 1 2; do cargo nextest run --test-threads 1 >/dev/null 2>&1; done
    echo "TestDb build + first query, p50 of $(wc -l <times) (dev profile of a dependent crate): $(p50 <times) ms"
    PGPASSWORD=$password psql -qXAt -h 127.0.0.1 -p "$port" -U "$role" -d postgres -c \
        "SELECT 'pgharness acquire p50 ' || round(percentile_cont(0.5) WITHIN GROUP (ORDER BY acquire_ms)::numeric, 1) || ' ms (connect ' || round(percentile_cont(0.5) WITHIN GROUP (ORDER BY connect_ms)::numeric, 1) || ', claim ' || round(percentile_cont(0.5) WITHIN GROUP (ORDER BY claim_ms)::numeric, 1) || ')' FROM (SELECT * FROM pgharness_$role.acquires ORDER BY at DESC LIMIT 48) a"
    psql -qX -h 127.0.0.1 -p "$port" -U postgres -d postgres \
        -c "DROP OWNED BY $role CASCADE" -c "REVOKE CREATE ON DATABASE postgres FROM $role" -c "DROP ROLE $role" >/dev/null
    rm -rf "$work"
    ;;
first-run)
    clone=$(mktemp -d /tmp/pgharness-clone-XXXXXX)
    git clone -q "$root" "$clone"
    cd "$clone"
    start=$(date +%s.%N)
    cargo xtask test -p todo-app >"$clone.log" 2>&1
    end=$(date +%s.%N)
    echo "cargo xtask test -p todo-app on a fresh clone: $(echo "$end - $start" | bc) s (log: $clone.log)"
    cargo xtask down >/dev/null 2>&1 || true
    ;;
rds-cold)
    cd "$root"
    cargo xtask down >/dev/null 2>&1 || true
    cold=$(cargo xtask test --backend rds --emulated --rtt 30ms -p todo-app 2>&1 | sed -n 's/.*Summary \[ *\([0-9.]*\)s\].*/\1/p')
    cargo xtask up --backend rds --emulated --rtt 30ms >/dev/null 2>&1
    cargo xtask test --backend rds --emulated --rtt 30ms -p todo-app >/dev/null 2>&1
    warm=$(cargo xtask test --backend rds --emulated --rtt 30ms -p todo-app 2>&1 | sed -n 's/.*Summary \[ *\([0-9.]*\)s\].*/\1/p')
    cargo xtask down >/dev/null 2>&1 || true
    echo "todo-app at 30 ms RTT, nextest's wall time: fresh emulated cluster ${cold} s, warm ${warm} s"
    ;;
*)
    echo "usage: $0 connect | first-run | rds-cold" >&2
    exit 2
    ;;
esac

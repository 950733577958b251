#!/usr/bin/env bash
# Instructions per request, counted by callgrind: a proxy's user-space work on
# the hot path, measured exactly where req/s swings with the machine. Runs
# nginx (single process) and Lacewing (one worker; no filter, then one
# header-echo filter, then the telemetry filter) in front of an nginx upstream,
# then two Lacewing hops plaintext, over mutual TLS, and over mutual TLS with
# the bench's mesh chain of first-party plugins (each side in turn under
# callgrind), drives the same keep-alive GETs through each, and writes the
# totals and the heaviest functions (inclusive) to bench/results/profile.md.
#
# Usage: bench/profile.sh [--requests N] [--skip-build] [--binary PATH]
#                         [--wasm-dir DIR] [--out FILE]
# Needs valgrind (installed with apt-get when missing), nginx, python3 and openssl.
# The kernel's share (syscalls, loopback) is not counted: see bench/run.sh for
# CPU time per request.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=$ROOT/bench/work/profile
OUT=$ROOT/bench/results/profile.md
REQUESTS=4000
CONNECTIONS=8
SKIP_BUILD=0
LACEWING=$ROOT/target/dist/lacewing
WASM=$ROOT/target/wasm32-wasip1/wasm
while [ $# -gt 0 ]; do
  case "$1" in
    --requests) REQUESTS=${2:?}; shift 2 ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --binary) LACEWING=${2:?}; SKIP_BUILD=1; shift 2 ;;
    --wasm-dir) WASM=${2:?}; shift 2 ;;
    --out) OUT=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "profile: unknown argument '$1'" >&2; exit 2 ;;
  esac
done

say() { echo "profile: $*" >&2; }
fail() { say "$*"; exit 1; }

missing=()
command -v valgrind >/dev/null || missing+=(valgrind)
command -v nginx >/dev/null || missing+=(nginx)
command -v python3 >/dev/null || missing+=(python3)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]} with apt-get"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" \
    || fail "cannot install ${missing[*]}"
fi

if [ "$SKIP_BUILD" = 0 ]; then
  (cd "$ROOT" && cargo xtask build-filters && cargo build --profile dist -p lacewing) \
    || fail "build failed"
fi
[ -x "$LACEWING" ] || fail "no $LACEWING (run without --skip-build)"

rm -rf "$WORK"
mkdir -p "$WORK"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

nginx_conf() { # nginx_conf DIR PORT [UPSTREAM_PORT]
  local dir=$1 port=$2 upstream=${3:-}
  mkdir -p "$dir/tmp"
  {
    echo "worker_processes 1; daemon off; master_process off; pid $dir/nginx.pid;"
    echo "error_log $dir/error.log warn; events { worker_connections 1024; }"
    echo "http { access_log off; keepalive_requests 1000000; keepalive_timeout 75s;"
    for t in client_body proxy fastcgi uwsgi scgi; do echo "  ${t}_temp_path $dir/tmp/$t;"; done
    if [ -n "$upstream" ]; then
      echo "  upstream backend { server 127.0.0.1:$upstream; keepalive 64; }"
      echo "  server { listen 127.0.0.1:$port; location / { proxy_pass http://backend;"
      echo "    proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
    else
      echo "  server { listen 127.0.0.1:$port; default_type text/plain;"
      echo "    location / { return 200 \"hello\\n\"; } }"
    fi
    echo "}"
  } >"$dir/nginx.conf"
}

# load PORT N: N keep-alive GETs over $CONNECTIONS connections; fails on any non-200.
load() {
  python3 - "$1" "$2" "$CONNECTIONS" <<'EOF'
import http.client, sys, threading
port, n, conns = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
bad = []
def worker(count):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for _ in range(count):
        c.request("GET", "/", headers={"x-request-id": "bench-0001"})
        r = c.getresponse(); r.read()
        if r.status != 200: bad.append(r.status)
threads = [threading.Thread(target=worker, args=(n // conns,)) for _ in range(conns)]
for t in threads: t.start()
for t in threads: t.join()
sys.exit(1 if bad else 0)
EOF
}

wait_ready() { # wait_ready PORT
  for _ in $(seq 1 600); do
    curl -fs -o /dev/null "http://127.0.0.1:$1/" && return 0
    sleep 0.1
  done
  return 1
}

UPSTREAM_PORT=$(free_port)
nginx_conf "$WORK/upstream" "$UPSTREAM_PORT"
nginx -c "$WORK/upstream/nginx.conf" -p "$WORK/upstream" >/dev/null 2>&1 &
PIDS+=($!)
wait_ready "$UPSTREAM_PORT" || fail "upstream nginx did not start"

declare -A TOTAL
ROWS=()
# profile_row KEY LABEL PORT COMMAND...: the command runs under callgrind.
profile_row() {
  local key=$1 label=$2 port=$3 pid out
  shift 3
  out=$WORK/$key.callgrind
  valgrind --tool=callgrind --callgrind-out-file="$out" --smc-check=all-non-file \
    --dump-instr=no --collect-atstart=yes "$@" >"$WORK/$key.log" 2>&1 &
  pid=$!
  PIDS+=($pid)
  wait_ready "$port" || fail "$label did not start under valgrind: $(tail -3 "$WORK/$key.log")"
  load "$port" 400 || fail "$label: warm-up requests failed"
  callgrind_control -z "$pid" >/dev/null
  load "$port" "$REQUESTS" || fail "$label: requests failed"
  callgrind_control -d "$pid" >/dev/null
  sleep 1
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  local dump
  dump=$(ls -t "$out".* 2>/dev/null | head -1)
  [ -n "$dump" ] || fail "$label: no callgrind dump"
  TOTAL[$key]=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",","",$1); print $1}')
  callgrind_annotate --inclusive=yes --threshold=100 "$dump" 2>/dev/null >"$WORK/$key.inclusive.txt"
  ROWS+=("$key|$label")
  say "$label: $(( TOTAL[$key] / REQUESTS )) instructions per request"
}

P=$(free_port); nginx_conf "$WORK/nginx" "$P" "$UPSTREAM_PORT"
profile_row nginx "nginx reverse proxy" "$P" nginx -c "$WORK/nginx/nginx.conf" -p "$WORK/nginx"
P=$(free_port)
profile_row lacewing "lacewing" "$P" "$LACEWING" proxy --workers 1 \
  --listen "127.0.0.1:$P" --upstream "127.0.0.1:$UPSTREAM_PORT"
P=$(free_port)
profile_row lacewing_wasm1 "lacewing + header-echo" "$P" "$LACEWING" proxy --workers 1 \
  --listen "127.0.0.1:$P" --upstream "127.0.0.1:$UPSTREAM_PORT" --wasm "$WASM/header_echo.wasm"
P=$(free_port)
profile_row lacewing_telemetry "lacewing + telemetry" "$P" "$LACEWING" proxy --workers 1 \
  --listen "127.0.0.1:$P" --upstream "127.0.0.1:$UPSTREAM_PORT" \
  --wasm "$WASM/telemetry.wasm" --wasm-config '{"destination":"orders"}'

# Two hops, as between sidecars: "frontend" (plaintext listener, cluster to
# orders) and "orders" (listener, upstream nginx), plaintext and then mutual
# TLS with static identity files; one of the two runs under callgrind, so
# each side's cost of TLS is the difference to its plaintext row.
CERTS=$WORK/certs
TD=bench.mesh
make_certs() {
  mkdir -p "$CERTS"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$CERTS/ca.key" \
    -out "$CERTS/ca.pem" -days 2 -subj "/O=$TD/CN=profile CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign || return 1
  local svc
  for svc in frontend orders; do
    printf 'subjectAltName=URI:spiffe://%s/ns/default/sa/%s\nbasicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\n' \
      "$TD" "$svc" >"$CERTS/$svc.ext"
    openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$CERTS/$svc.key" \
      -out "$CERTS/$svc.csr" -subj "/O=$TD/CN=$svc" &&
      openssl x509 -req -in "$CERTS/$svc.csr" -CA "$CERTS/ca.pem" -CAkey "$CERTS/ca.key" \
        -set_serial "0x$(openssl rand -hex 8)" -days 2 -sha256 -extfile "$CERTS/$svc.ext" \
        -out "$CERTS/$svc.pem" || return 1
  done
}
# With CHAIN=1 the sidecars run the bench's mesh chain as the mesh would:
# telemetry on both, and on orders authz (the bench's TrafficTarget) and a
# headers plugin naming the peer, first-party modules from $WASM.
hop_conf() { # hop_conf FILE SERVICE(frontend|orders) LISTEN_PORT NEXT_PORT TLS(0|1) [CHAIN(0|1)]
  local file=$1 svc=$2 port=$3 next=$4 tls=$5 chain=${6:-0}
  {
    echo "admin: { address: 127.0.0.1:$(free_port) }"
    echo "workers: 1"
    if [ "$tls" = 1 ]; then
      echo "tls: { cert_file: $CERTS/$svc.pem, key_file: $CERTS/$svc.key, trust_file: $CERTS/ca.pem }"
    fi
    echo "listeners:"
    echo "  - name: $svc"
    echo "    address: 127.0.0.1:$port"
    if [ "$svc" = orders ] && [ "$tls" = 1 ]; then echo "    tls: { mode: strict }"; fi
    echo "    routes: [{ name: all, cluster: next }]"
    if [ "$chain" = 1 ]; then
      if [ "$svc" = orders ]; then echo "    filters: [authz, peer, telemetry]"; else echo "    filters: [telemetry]"; fi
    fi
    echo "clusters:"
    echo "  - name: next"
    echo "    endpoints: ['127.0.0.1:$next']"
    if [ "$svc" = frontend ] && [ "$tls" = 1 ]; then
      echo "    tls: { peer: 'spiffe://$TD/ns/default/sa/orders' }"
    fi
    if [ "$chain" = 1 ]; then
      echo "plugins:"
      echo "  - { name: telemetry, module: $WASM/telemetry.wasm, configuration: { destination: orders } }"
      if [ "$svc" = orders ]; then
        echo "  - name: authz"
        echo "    module: $WASM/authz.wasm"
        echo "    configuration: { trust_domain: $TD, rules: [{ name: frontend-to-orders, sources: [default/frontend], routes: [{ path: '/.*', methods: [GET] }] }] }"
        echo "  - name: peer"
        echo "    module: $WASM/headers.wasm"
        echo "    configuration: { response: { set: { x-bench-peer: '%{source.principal}' } } }"
      fi
    fi
  } >"$file"
}
# hop_rows TLS(0|1) SUFFIX LABEL [CHAIN(0|1)]: the frontend side, then the orders side, under callgrind
hop_rows() {
  local tls=$1 suffix=$2 label=$3 chain=${4:-0} side other key pf po helper
  for side in frontend orders; do
    if [ "$side" = frontend ]; then other=orders key=hop_client; else other=frontend key=hop_server; fi
    pf=$(free_port); po=$(free_port)
    hop_conf "$WORK/frontend$suffix.yaml" frontend "$pf" "$po" "$tls" "$chain"
    hop_conf "$WORK/orders$suffix.yaml" orders "$po" "$UPSTREAM_PORT" "$tls" "$chain"
    "$LACEWING" proxy --config "$WORK/$other$suffix.yaml" >"$WORK/$other$suffix.log" 2>&1 &
    helper=$!; PIDS+=($helper)
    profile_row "$key$suffix" "two hops, $label: $side side" "$pf" \
      "$LACEWING" proxy --config "$WORK/$side$suffix.yaml"
    kill "$helper" 2>/dev/null; wait "$helper" 2>/dev/null
  done
}
if command -v openssl >/dev/null && make_certs >"$WORK/openssl.log" 2>&1; then
  hop_rows 0 _plain plaintext
  hop_rows 1 _mtls "mutual TLS"
  hop_rows 1 _chain "mutual TLS + authz, headers, telemetry" 1
else
  say "no certificates (openssl): the two-hop rows are skipped; see $WORK/openssl.log"
fi

# Top inclusive frames of a row, paths shortened, the runtime's outer frames skipped.
top_frames() {
  python3 - "$1" "$2" <<'EOF'
import re, sys
path, requests = sys.argv[1], int(sys.argv[2])
seen, rows = set(), []
for line in open(path):
    m = re.match(r"\s*([\d,]+)\s+\(\s*([\d.]+)%\)\s+(.*)", line)
    if not m or "PROGRAM TOTALS" in line:
        continue
    count, share, where = int(m.group(1).replace(",", "")), float(m.group(2)), m.group(3)
    where = re.sub(r"\s*\[[^\]]*\]\s*$", "", where)
    name = where.split(":", 1)[-1] if ":" in where and not where.startswith("???") else where.replace("???:", "")
    name = re.sub(r"<[^<>]*>", "", name)
    # Plugin code shows as bare JIT addresses here: left out (see docs/sdk.md, "Profiling").
    if share > 60 or share < 1.5 or name in seen or re.fullmatch(r"0x[0-9a-f]+", name):
        continue
    seen.add(name)
    rows.append((share, count // requests, name[:110]))
for share, per, name in rows[:25]:
    print(f"| {share:.1f}% | {per} | `{name}` |")
EOF
}

{
  echo "# Instructions per request (callgrind)"
  echo
  echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); lacewing $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'); $(nginx -v 2>&1 | sed 's/^nginx version: //'); $(valgrind --version)"
  echo "- $REQUESTS keep-alive GETs over $CONNECTIONS connections after 400 of warm-up; upstream nginx answers \`200 hello\\n\`; user-space instructions of the proxy process only (the kernel's loopback and syscall work is not counted); produced by \`bench/profile.sh\`"
  echo
  echo "| Proxy | Instructions per request | vs nginx |"
  echo "|---|---:|---:|"
  for row in "${ROWS[@]}"; do
    key=${row%%|*}; label=${row#*|}
    per=$(( TOTAL[$key] / REQUESTS ))
    ratio=$(awk -v a="${TOTAL[$key]}" -v b="${TOTAL[nginx]}" 'BEGIN{printf "%.2f×", a/b}')
    echo "| $label | $per | $ratio |"
  done
  for row in "${ROWS[@]}"; do
    key=${row%%|*}; label=${row#*|}
    [ "$key" = nginx ] && continue
    echo
    echo "## $label: heaviest functions, inclusive"
    echo
    echo "| Share | Instructions per request | Function |"
    echo "|---:|---:|---|"
    top_frames "$WORK/$key.inclusive.txt" "$REQUESTS"
  done
} >"$OUT"
say "wrote $OUT"

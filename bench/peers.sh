#!/usr/bin/env bash
# Measures the systems a user would otherwise pick, on this machine, for the
# side-by-side tables of BENCHMARKS.md: Erlang distribution (TCP and mutual
# TLS) and HashiCorp Serf. Prints Markdown on standard output, progress on
# standard error. See bench/README.md.
#
#   bench/peers.sh [--quick] > bench/results/peers.md
#
# Everything runs on loopback (127.0.0.0/8) in a temporary directory. On exit,
# error or Ctrl-C it ends exactly the processes it started (recorded pids),
# deletes the nft table it created and removes the directory.
set -euo pipefail

usage() {
    echo "usage: $0 [--quick] [--only erlang|serf]" >&2
    echo "  --quick        a short smoke run (a few samples each, no 60 s SIGSTOP, no 24-agent Serf)" >&2
    echo "  --only SYSTEM  measure only Erlang distribution or only Serf" >&2
}

ARGS="$*"
QUICK=false
ONLY=all
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=true ;;
        --only)
            ONLY=${2:-}
            shift
            case "$ONLY" in erlang | serf) ;; *) echo "--only takes erlang or serf" >&2; exit 2 ;; esac
            ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage; exit 2 ;;
    esac
    shift
done

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PACKAGES=(erlang-base erlang-ssl serf openssl nftables)

log() { echo "==> $*" >&2; }
die() { echo "error: $*" >&2; exit 1; }

# Samples for a quick or a full run.
n() { if $QUICK; then echo "$1"; else echo "$2"; fi; }

# --------------------------------------------------------------- installing

missing_packages() {
    local p
    for p in "${PACKAGES[@]}"; do
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] || echo "$p"
    done
}

install_missing() {
    local missing
    missing=$(missing_packages | tr '\n' ' ')
    [ -z "$missing" ] && return 0
    if [ "$(id -u)" -ne 0 ]; then
        die "missing packages: $missing
  install them as root first:  apt-get install -y $missing
  (root is needed only for apt-get and for the nft byte counters)"
    fi
    log "installing $missing"
    apt-get update -q >&2
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >&2
}

# --------------------------------------------------------------- cleanup

WORK=""
RUN=""
EPMD_PID=""
NFT_TABLE=""

# End one recorded process, but only if it is still ours: its command line
# must name this run (the pid may have been reused after it exited).
end_pid() {
    local pid=$1
    local cmd
    cmd=$( { tr '\0' ' ' <"/proc/$pid/cmdline"; } 2>/dev/null) || return 0
    [[ "$cmd" == *"$RUN"* ]] || return 0
    kill -CONT "$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "$WORK" ] && [ -f "$WORK/pids" ]; then
        local pid
        while read -r pid; do
            [ -n "$pid" ] && end_pid "$pid"
        done <"$WORK/pids"
    fi
    if [ -n "$EPMD_PID" ]; then
        kill -TERM "$EPMD_PID" 2>/dev/null || true
    fi
    if [ -n "$NFT_TABLE" ]; then
        nft delete table inet "$NFT_TABLE" 2>/dev/null || true
    fi
    # Let the log stampers see end of file and exit.
    wait 2>/dev/null || true
    if [ -n "${PEERS_KEEP:-}" ]; then
        log "kept $WORK"
    elif [ -n "$WORK" ]; then
        rm -rf "$WORK"
    fi
    exit "$status"
}

# --------------------------------------------------------------- statistics

# now_us: wall clock in microseconds.
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }

# row NAME SCALE VALUES...: a Markdown row of p50, p99 (nearest rank) and
# max of VALUES divided by SCALE.
row() {
    local name=$1 scale=$2
    shift 2
    if [ $# -eq 0 ]; then
        echo "| $name | no samples | | | 0 |"
        return
    fi
    printf '%s\n' "$@" | sort -g | awk -v name="$name" -v scale="$scale" '
        function fmt(x) {
            x = x / scale
            if (x >= 1000 || x <= -1000) return sprintf("%d", x + 0.5)
            if (x >= 100 || x <= -100) return sprintf("%.1f", x)
            if (x >= 1 || x <= -1) return sprintf("%.2f", x)
            return sprintf("%.3f", x)
        }
        function rank(q,   r) { r = int(q * NR); if (r < q * NR) r++; if (r < 1) r = 1; return v[r] }
        { v[NR] = $1 }
        END { printf "| %s | %s | %s | %s | %d |\n", name, fmt(rank(0.5)), fmt(rank(0.99)), fmt(v[NR]), NR }'
}

row_text() { echo "| $1 | $2 | | | 0 |"; }

table_head() {
    echo
    echo "### $1"
    echo
    echo "| measurement | p50 | p99 | max | samples |"
    echo "|---|---|---|---|---|"
}

# --------------------------------------------------------------- Erlang

free_port() {
    local port
    for port in $(seq "$1" "$(($1 + 50))"); do
        ss -Htan "sport = :$port" | grep -q . || { echo "$port"; return 0; }
    done
    die "no free TCP port in $1..$(($1 + 50)) on this machine"
}

start_epmd() {
    ERL_EPMD_PORT=$(free_port 24369)
    export ERL_EPMD_PORT
    epmd -port "$ERL_EPMD_PORT" -address 127.0.0.1 >"$WORK/epmd.log" 2>&1 &
    EPMD_PID=$!
    local i
    for i in $(seq 1 100); do
        epmd -port "$ERL_EPMD_PORT" -names >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    die "epmd did not start on 127.0.0.1:$ERL_EPMD_PORT (see $WORK/epmd.log)"
}

# A CA and one node certificate (ECDSA P-256) for 127.0.0.1, used by every
# node as server and as client; both sides verify the peer. The node names
# are n@127.0.0.1 and Erlang's ssl checks that host as a DNS name, so the
# certificate carries DNS:127.0.0.1 beside IP:127.0.0.1.
make_certs() {
    local d=$WORK/tls
    mkdir -p "$d"
    (
        cd "$d"
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key
        openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=peers bench CA" -out ca.pem
        openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out node.key
        openssl req -new -key node.key -subj "/CN=127.0.0.1" -out node.csr
        printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=digitalSignature" \
            "extendedKeyUsage=serverAuth,clientAuth" "subjectAltName=IP:127.0.0.1,DNS:127.0.0.1,DNS:localhost" >node.ext
        openssl x509 -req -in node.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
            -sha256 -extfile node.ext -out node.pem
    ) >"$d/openssl.log" 2>&1 || die "openssl failed (see $d/openssl.log)"
    local common="{certfile, \"$d/node.pem\"}, {keyfile, \"$d/node.key\"}, {cacertfile, \"$d/ca.pem\"}, {verify, verify_peer}, {secure_renegotiate, true}"
    cat >"$d/dist.conf" <<EOF
[{server, [$common, {fail_if_no_peer_cert, true}]},
 {client, [$common]}].
EOF
    # The same without a client certificate: the nodes must refuse it.
    cat >"$d/nocert.conf" <<EOF
[{server, [$common, {fail_if_no_peer_cert, true}]},
 {client, [{cacertfile, "$d/ca.pem"}, {verify, verify_peer}]}].
EOF
}

# erlang_driver LABEL DIST PHASE TICKTIME: run one driver, print its rows.
erlang_driver() {
    local label=$1 dist=$2 phase=$3 tick=$4
    local dist_args erl_call reject_args=none cfg=$WORK/$dist-$phase.config
    if [ "$dist" = tls ]; then
        dist_args="[\"-proto_dist\", \"inet_tls\", \"-ssl_dist_optfile\", \"$WORK/tls/dist.conf\"]"
        reject_args="[\"-proto_dist\", \"inet_tls\", \"-ssl_dist_optfile\", \"$WORK/tls/nocert.conf\"]"
        erl_call=none
    else
        dist_args="[]"
        erl_call="\"$(command -v erl_call)\""
    fi
    cat >"$cfg" <<EOF
{dir, "$WORK"}.
{erl, "$(command -v erl)"}.
{erl_call, $erl_call}.
{reject_args, $reject_args}.
{cookie, "$RUN"}.
{dist_args, $dist_args}.
{ticktime, $tick}.
{phase, $phase}.
{quick, $QUICK}.
{label, "$label"}.
EOF
    local tick_args=()
    [ "$tick" != default ] && tick_args=(-kernel net_ticktime "$tick")
    local extra=()
    # shellcheck disable=SC2207
    [ "$dist" = tls ] && extra=(-proto_dist inet_tls -ssl_dist_optfile "$WORK/tls/dist.conf")
    erl -noshell -noinput -hidden -name "driver_${dist}_$phase@127.0.0.1" -setcookie "$RUN" \
        -pa "$WORK" -start_epmd false -kernel inet_dist_use_interface '{127,0,0,1}' \
        "${extra[@]}" "${tick_args[@]}" -s peerbench driver "$cfg" \
        >"$WORK/rows" 2>&2 &
    local drv=$!
    echo "$drv" >>"$WORK/pids"
    wait "$drv" || die "the Erlang $label driver failed (its log is above; node logs were in $WORK)"
    cat "$WORK/rows"
}

erlang_bench() {
    start_epmd
    make_certs
    erlc -o "$WORK" "$HERE/peers/peerbench.erl" || die "erlc failed on $HERE/peers/peerbench.erl"
    local dist label
    for dist in ${PEERS_DISTS:-tcp tls}; do
        if [ $dist = tcp ]; then
            label="Erlang distribution over TCP (inet_tcp_dist)"
        else
            label="Erlang distribution over TLS (inet_tls_dist, ECDSA P-256, verify_peer + fail_if_no_peer_cert)"
        fi
        log "$label"
        table_head "$label"
        erlang_driver "$dist" "$dist" main default
        erlang_driver "$dist" "$dist" stop 4
    done
}

# --------------------------------------------------------------- Serf

SERF_PORT=17946
SERF_RPC=17373
declare -A SERF_PID SERF_ADDR

# Each agent's log lines, prefixed with the wall clock in microseconds at
# which they were read (serf's own log stamps have one-second resolution).
stamp() {
    local line t
    while IFS= read -r line; do
        t=$EPOCHREALTIME
        printf '%s %s\n' "${t/./}" "$line"
    done
}

# serf_start NAME ADDR [JOIN_ADDR]: start an agent in the background.
serf_start() {
    local name=$1 addr=$2 join=${3:-}
    local args=(agent "-node=$name" "-bind=$addr:$SERF_PORT" "-rpc-addr=$addr:$SERF_RPC"
        "-tag" "bench=$RUN" "-event-handler=query:peerbench=echo ok")
    [ -n "$join" ] && args+=("-join=$join:$SERF_PORT")
    serf "${args[@]}" > >(stamp >"$WORK/serf/$name.log") 2>&1 &
    SERF_PID[$name]=$!
    SERF_ADDR[$name]=$addr
    echo "$!" >>"$WORK/pids"
}

serf_kill() {
    local name=$1
    kill -KILL "${SERF_PID[$name]}" 2>/dev/null || true
    wait "${SERF_PID[$name]}" 2>/dev/null || true
    unset "SERF_PID[$name]"
}

# serf_event_time KIND NAME TIMEOUT_S AGENTS...: the latest of the times at
# which each agent logged "serf: Event<KIND>: NAME", in microseconds. Serf
# logs that line where it sets the member's status that `serf members` shows.
serf_event_time() {
    local kind=$1 subject=$2 timeout=$3
    shift 3
    local deadline=$(($(now_us) + timeout * 1000000)) latest=0 agent t
    for agent in "$@"; do
        while :; do
            t=$(grep -m1 -F "serf: Event$kind: $subject " "$WORK/serf/$agent.log" 2>/dev/null | cut -d' ' -f1 || true)
            [ -n "$t" ] && break
            [ "$(now_us)" -gt "$deadline" ] && die "$agent did not log Event$kind for $subject within ${timeout}s (see $WORK/serf/$agent.log)"
            sleep 0.05
        done
        [ "$t" -gt "$latest" ] && latest=$t
    done
    echo "$latest"
}

# serf_cluster PREFIX COUNT NET: start COUNT agents NET.1.. that join the
# first, and wait until every agent logged every other one.
serf_cluster() {
    local prefix=$1 count=$2 net=$3 i names=()
    for i in $(seq 1 "$count"); do
        names+=("$prefix$i")
        if [ "$i" -eq 1 ]; then
            serf_start "$prefix$i" "$net.1"
            sleep 0.3
        else
            serf_start "$prefix$i" "$net.$i" "$net.1"
        fi
    done
    for i in $(seq 1 "$count"); do
        serf_event_time MemberJoin "$prefix$i" 60 "${names[@]}" >/dev/null
    done
}

# Gossip traffic counters: bytes sent by each agent address on lo, without
# the RPC port (CLI traffic). Agents bind their address, but the kernel gives
# the TCP connections they dial (push-pull) the source 127.0.0.1: those bytes
# are counted by one more rule, "dialled", for the whole cluster NET.0/24.
nft_setup() {
    local net=$1
    shift
    if [ "$(id -u)" -ne 0 ]; then
        log "not root: the Serf byte counters (nft) are skipped"
        return 1
    fi
    NFT_TABLE="peers_bench_$$"
    nft add table inet "$NFT_TABLE"
    nft add chain inet "$NFT_TABLE" out '{ type filter hook output priority 0; policy accept; }'
    local name
    for name in "$@"; do
        nft add rule inet "$NFT_TABLE" out oifname lo ip saddr "${SERF_ADDR[$name]}" \
            meta l4proto '{ tcp, udp }' th sport != $SERF_RPC th dport != $SERF_RPC counter
    done
    nft add rule inet "$NFT_TABLE" out oifname lo ip saddr 127.0.0.1 ip daddr "$net.0/24" \
        tcp dport $SERF_PORT counter comment '"dialled"'
}

# nft_bytes ADDR|dialled: the byte counter of ADDR's rule, or of the rule
# for TCP dialled from 127.0.0.1.
nft_bytes() {
    local match="saddr $1 "
    [ "$1" = dialled ] && match='comment "dialled"'
    nft list chain inet "$NFT_TABLE" out | awk -v m="$match" 'index($0, m) { for (i = 1; i < NF; i++) if ($i == "bytes") print $(i + 1) }'
}

nft_teardown() {
    nft delete table inet "$NFT_TABLE"
    NFT_TABLE=""
}

cpu_ticks() {
    local f
    read -r -a f <"/proc/$1/stat"
    echo $((f[13] + f[14]))
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# serf_idle LABEL AGENTS...: gossip bytes over 30 s, CPU over 10 s of it,
# RSS at its end, all while nothing polls the agents.
serf_idle() {
    local label=$1
    shift
    local name before=() after=() t1=() t2=() rss=() bytes=() cpu=() i
    local hz
    hz=$(getconf CLK_TCK)
    local counting=false
    local agents=$# dialled_before dialled_after dialled=0
    nft_setup "${SERF_ADDR[$1]%.*}" "$@" && counting=true
    sleep 5
    if $counting; then
        for name in "$@"; do before+=("$(nft_bytes "${SERF_ADDR[$name]}")"); done
        dialled_before=$(nft_bytes dialled)
    fi
    sleep 10
    for name in "$@"; do t1+=("$(cpu_ticks "${SERF_PID[$name]}")"); done
    sleep 10
    for name in "$@"; do t2+=("$(cpu_ticks "${SERF_PID[$name]}")"); done
    sleep 10
    if $counting; then
        for name in "$@"; do after+=("$(nft_bytes "${SERF_ADDR[$name]}")"); done
        dialled_after=$(nft_bytes dialled)
        dialled=$(((dialled_after - dialled_before) / agents))
    fi
    for name in "$@"; do rss+=("$(rss_kib "${SERF_PID[$name]}")"); done
    for i in "${!t1[@]}"; do cpu+=("$(((t2[i] - t1[i]) * 100000 / hz))"); done
    if $counting; then
        for i in "${!before[@]}"; do bytes+=("$(((after[i] - before[i] + dialled) / 30))"); done
        nft_teardown
        row "gossip bytes sent per agent per second, $label, idle 30 s (IP bytes, RPC port excluded; incl. an even share of the next row), B/s" 1 "${bytes[@]}"
        row "gossip TCP sent from 127.0.0.1 (dials not bound to an agent address; shared evenly in the row above), per agent, B/s" 1 "$((dialled / 30))"
    else
        row_text "gossip bytes sent per agent per second, $label, B/s" "n/a: needs root for nft"
    fi
    row "agent resident memory idle (VmRSS), $label, MiB" 1024 "${rss[@]}"
    # cpu holds thousandths of a percent of one core over 10 s.
    row "agent CPU idle over 10 s, $label, % of one core" 1000 "${cpu[@]}"
}

# serf_rounds NET FIRST_IDX ROUNDS LABEL EXTRA BASE...: rounds of "kill -9
# the current extra agent (first EXTRA), wait until every BASE agent marks it
# failed; start a new one at NET.(FIRST_IDX + round) joining the first BASE
# agent, wait until every agent has it alive".
serf_rounds() {
    local net=$1 idx=$2 rounds=$3 label=$4 extra=$5
    shift 5
    local base=("$@")
    local joins=() fails=() r t0 t name
    for r in $(seq 1 "$rounds"); do
        t0=$(now_us)
        serf_kill "$extra"
        t=$(serf_event_time MemberFailed "$extra" 120 "${base[@]}")
        fails+=("$((t - t0))")
        sleep 1
        name="j$label$r"
        t0=$(now_us)
        serf_start "$name" "$net.$((idx + r))" "${SERF_ADDR[${base[0]}]}"
        t=$(serf_event_time MemberJoin "$name" 60 "${base[@]}" "$name")
        joins+=("$((t - t0))")
        log "round $r: $extra marked failed after $((fails[-1] / 1000)) ms; $name alive everywhere after $((joins[-1] / 1000)) ms"
        extra=$name
        sleep 2
    done
    local n=$((${#base[@]} + 1))
    row "join: agent started with -join to one of $((n - 1)), until all $n have it alive (incl. process start), ms" 1000 "${joins[@]}"
    row "failure detection after kill -9, until all $((n - 1)) others mark it failed, s" 1000000 "${fails[@]}"
    serf_kill "$extra"
}

# serf_members_time AGENT COUNT: `serf members` against AGENT, whole command.
serf_members_time() {
    local agent=$1 count=$2 i t0 t=()
    for i in $(seq 1 "$count"); do
        t0=$(now_us)
        serf members "-rpc-addr=${SERF_ADDR[$agent]}:$SERF_RPC" >/dev/null
        t+=("$(($(now_us) - t0))")
    done
    row "serf members, whole command, ms" 1000 "${t[@]}"
}

# serf_query_time AGENT AGENTS COUNT: `serf query` through AGENT; time until
# all AGENTS acked, until all responded (handler `echo ok`), and the whole
# command, which waits for the query timeout.
serf_query_time() {
    local agent=$1 agents=$2 count=$3 i t0 out=$WORK/serf/query.out
    local acks=() resps=() whole=() last_ack last_resp n_ack n_resp missed=0
    for i in $(seq 1 "$count"); do
        t0=$(now_us)
        serf query "-rpc-addr=${SERF_ADDR[$agent]}:$SERF_RPC" peerbench "q$i" | stamp >"$out"
        whole+=("$(($(now_us) - t0))")
        n_ack=$(grep -c " Ack from " "$out" || true)
        n_resp=$(grep -c " Response from " "$out" || true)
        if [ "$n_ack" -ne "$agents" ] || [ "$n_resp" -ne "$agents" ]; then
            log "query $i: $n_ack acks and $n_resp responses of $agents; sample left out"
            missed=$((missed + 1))
            continue
        fi
        last_ack=$(grep " Ack from " "$out" | tail -1 | cut -d' ' -f1)
        last_resp=$(grep " Response from " "$out" | tail -1 | cut -d' ' -f1)
        acks+=("$((last_ack - t0))")
        resps+=("$((last_resp - t0))")
    done
    local note="$missed of $count queries missed an agent before the timeout and are left out"
    row "serf query, until all $agents agents acked (incl. CLI start; $note), ms" 1000 "${acks[@]}"
    row "serf query, until all $agents agents responded (handler: echo ok; $note), ms" 1000 "${resps[@]}"
    row "serf query, whole command (waits for the default query timeout), ms" 1000 "${whole[@]}"
}

serf_stop_all() {
    local name
    for name in "${!SERF_PID[@]}"; do serf_kill "$name"; done
}

serf_bench() {
    mkdir -p "$WORK/serf"
    local label
    label="Serf $(serf version | sed -n 1p) (default LAN profile)"
    log "$label, 6 agents"
    table_head "$label"
    # 127.0.0.1 is left to everything else on the machine: agents use 127.0.1.x.
    serf_cluster s 6 127.0.1
    serf_idle "6 agents" s1 s2 s3 s4 s5 s6
    serf_members_time s1 "$(n 10 50)"
    serf_query_time s1 6 "$(n 2 10)"
    serf_rounds 127.0.1 10 "$(n 2 10)" a s6 s1 s2 s3 s4 s5
    serf_stop_all
    if $QUICK; then
        row_text "24 agents" "skipped in --quick"
        return
    fi
    log "$label, 24 agents"
    local names=() i
    for i in $(seq 1 24); do names+=("t$i"); done
    serf_cluster t 24 127.0.2
    serf_idle "24 agents" "${names[@]}"
    serf_rounds 127.0.2 30 5 b t24 "${names[@]:0:23}"
    serf_stop_all
}

main() {
    install_missing
    command -v erl >/dev/null && command -v serf >/dev/null ||
        die "erl or serf not found on PATH although their packages are installed"
    if [ "$(id -u)" -eq 0 ] && ! command -v nft >/dev/null; then
        die "nft not found on PATH although nftables is installed"
    fi
    WORK=$(mktemp -d /tmp/peers-bench.XXXXXX)
    RUN=$(basename "$WORK")
    RUN=${RUN//./_}
    trap cleanup EXIT INT TERM

    local cpu otp erts serf_v serf_pkg
    cpu=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    otp=$(cat "$(dirname "$(readlink -f "$(command -v erl)")")/../releases/"*/OTP_VERSION 2>/dev/null | head -1 || true)
    [ -z "$otp" ] && otp=$(erl -noshell -eval 'io:format("~s", [erlang:system_info(otp_release)]), halt().')
    erts=$(erl -noshell -eval 'io:format("~s", [erlang:system_info(version)]), halt().')
    serf_v="Serf $(serf version | sed -n 1p)"
    serf_pkg=$(dpkg-query -W -f='${Version}' serf)
    echo "## Peers on this machine ($(date -u +%Y-%m-%d), $($QUICK && echo "quick smoke run" || echo "full run"))"
    echo
    echo "Machine: $(nproc) cores, $cpu, Linux $(uname -r). Versions: Erlang/OTP $otp (erts $erts, Debian erlang-base $(dpkg-query -W -f='${Version}' erlang-base)), $serf_v (Debian serf $serf_pkg)."
    echo "Generated by \`bench/peers.sh${ARGS:+ $ARGS}\`; all traffic on loopback."

    [ "$ONLY" = serf ] || erlang_bench
    [ "$ONLY" = erlang ] || serf_bench
}

main "$@"

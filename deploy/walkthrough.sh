#!/usr/bin/env bash
# docs/deploy.md's three-machine walkthrough (section 2), executed on one machine, command by command as
# the doc prints them, with podman.
#
#   deploy/walkthrough.sh           (or `make deploy-walkthrough`; `make deploy-test` runs it after ci.sh)
#   deploy/walkthrough.sh --list    print the blocks it would run, per machine, and exit (no podman)
#
# Each machine is a copy of the repository (tracked and untracked, not ignored, files) in its own
# folder, so each is its own compose project: fedlora-walk-operator, fedlora-walk-owner-a,
# fedlora-walk-owner-b, with its own HOME. The doc's fenced blocks whose info string has
# `walkthrough=operator`, `walkthrough=owner` (run for owner A as printed, then for owner B with
# supernode-0 -> supernode-1 and owner-a -> owner-b) or `walkthrough=each` (every machine) run in the
# doc's order, each in a bash with `set -e` that starts from that machine's environment as the last
# block left it (so `export` carries over, as in one terminal per machine); blocks marked
# `engine=docker` are skipped (their podman twins run). What the doc leaves to people happens here:
# `operator.example.org:8000` is the host's address and a free port (the operator's SuperLink is
# published there, FEDLORA_PUBLISH), the transfers of steps 3 and 5 are copies, each owner's data file is
# written from the tweets, `sudo` is a no-op for root, and the script waits for both nodes to be online
# before the run, as a person re-running `flwr supernode list` would. After every block that starts
# containers it checks they run (podman-compose can exit 0 when they did not); at the end, that the run
# directory the operator copied out has every round with two clients, and that nothing is left: every
# container, volume and network of the three projects is removed by name (also on failure or Ctrl-C),
# and the image tag fedlora:latest if this script made it.
#
# The doc must hold a block for every step (the image, the certificates, the SuperLink, the keys, the
# registrations, the nodes, the run, the copy, the stop): a step whose block is gone is an error.
# Environment (defaults in brackets): PYTHON [.venv/bin/python] (its folder gives flwr, fedlora and
# make's VENV), FEDLORA_CI_CACHE [.cache/deploy] (base image tarball, wheelhouse, shared with ci.sh),
# FEDLORA_WALKTHROUGH_DOC [docs/deploy.md], FEDLORA_DEPLOY_REQUIRED=1 to fail rather than skip where
# podman cannot run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
CACHE=${FEDLORA_CI_CACHE:-$ROOT/.cache/deploy}
DOC=${FEDLORA_WALKTHROUGH_DOC:-$ROOT/docs/deploy.md}
PREFIX=fedlora-walk
OWNERS=(owner-a owner-b)
ROUNDS=3   # the doc's run (checked against its command below)

say() { printf '[walkthrough %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
fail() { printf 'walkthrough: error: %s\n' "$*" >&2; exit 1; }
skip() {
  if [[ "${FEDLORA_DEPLOY_REQUIRED:-0}" == 1 ]]; then fail "$* (FEDLORA_DEPLOY_REQUIRED=1)"; fi
  echo "walkthrough: skipped: $*"
  exit 0
}
list_only=0
case "${1:-}" in
  --list) list_only=1 ;;
  "") ;;
  *) fail "unknown argument '$1'; usage: deploy/walkthrough.sh [--list]" ;;
esac

# -- inputs, checked before any work -----------------------------------------------------------------
[[ -x "$PY" ]] || fail "no Python at $PY; run 'make setup' first or set PYTHON=/path/to/venv/bin/python"
[[ -f "$DOC" ]] || fail "no walkthrough document at $DOC"
blocks=$(mktemp -d "${TMPDIR:-/tmp}/fedlora-walk-blocks.XXXXXX")
trap 'rm -rf "$blocks"' EXIT
# The doc's marked blocks, in order: blocks/NN.sh and a line "NN ROLE" in blocks/index.
"$PY" - "$DOC" "$blocks" <<'EOF' || fail "cannot read the walkthrough blocks of $DOC"
import re, sys
from pathlib import Path
doc, out = Path(sys.argv[1]).read_text(encoding="utf-8"), Path(sys.argv[2])
index = []
for n, (info, body) in enumerate(re.findall(r"^```([^\n]*)\n(.*?)^```\s*$", doc, flags=re.S | re.M)):
    words = dict(w.split("=", 1) for w in info.split()[1:] if "=" in w)
    if "walkthrough" not in words or words.get("engine") == "docker":
        continue
    role = words["walkthrough"]
    if role not in ("operator", "owner", "each"):
        sys.exit(f"unknown walkthrough={role} in block {n} (operator, owner or each)")
    (out / f"{len(index):02d}.sh").write_text(body, encoding="utf-8")
    index.append(f"{len(index):02d} {role}")
(out / "index").write_text("\n".join(index) + "\n", encoding="utf-8")
EOF
# Every step must still be there: a block that runs each of these (by the command it contains).
required=(
  "operator:podman build" "operator:deploy/certs.sh" "operator:up -d superlink"
  "owner:deploy keygen" "operator:flwr supernode register owner-a.pub"
  "operator:flwr supernode register owner-b.pub" "owner:up -d supernode-0" "operator:flwr run ."
  "operator:/data/runs ./runs" "each:down -v" "each:CONTAINERS_CONF"
)
for need in "${required[@]}"; do
  role=${need%%:*} text=${need#*:}
  found=0
  while read -r n r; do
    [[ "$r" == "$role" ]] && grep -qF -- "$text" "$blocks/$n.sh" && found=1
  done <"$blocks/index"
  ((found)) || fail "$DOC has no walkthrough=$role block that runs '$text' (a step is missing or unmarked)"
done
grep -hq "federation.rounds=$ROUNDS" "$blocks"/*.sh || fail "the doc's run no longer has federation.rounds=$ROUNDS"

# What differs when one machine plays three: the operator's address, and owner B's names.
host_ip=$(hostname -I 2>/dev/null | awk '{ print $1 }')
[[ -n "$host_ip" ]] || host_ip=$(ip -4 route get 1.1.1.1 2>/dev/null | awk '{ for (i = 1; i < NF; i++) if ($i == "src") print $(i + 1) }')
port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('0.0.0.0', 0)); print(s.getsockname()[1])")
substitute() {  # substitute ROLE FILE: the block as that machine runs it
  local role=$1 file=$2
  local edits=(-e "s/operator\.example\.org:8000/$host_ip:$port/g" -e "s/operator\.example\.org/$host_ip/g")
  if [[ "$role" == owner-b ]]; then edits+=(-e "s/supernode-0/supernode-1/g" -e "s/owner-a/owner-b/g"); fi
  sed "${edits[@]}" "$file"
}
machines_for() {  # the machines a block's role runs on, in order
  case "$1" in
    operator) echo operator ;;
    owner) echo "${OWNERS[@]}" ;;
    each) echo operator "${OWNERS[@]}" ;;
  esac
}
if ((list_only)); then
  while read -r n role; do
    for machine in $(machines_for "$role"); do
      echo "### $machine (block $n, walkthrough=$role)"
      substitute "$machine" "$blocks/$n.sh"
    done
  done <"$blocks/index"
  exit 0
fi

# -- podman ------------------------------------------------------------------------------------------
for tool in podman podman-compose; do
  command -v "$tool" >/dev/null || skip "$tool is missing (deploy/ci.sh installs it: make deploy-test)"
done
export CONTAINERS_CONF=$ROOT/deploy/containers.conf   # for this script's own podman calls
podman info >/dev/null 2>&1 || skip "podman is installed but cannot run here ('podman info' fails)"
ours() {  # containers, volumes and networks of the three projects
  podman ps -a --format '{{.Names}}' | grep -E "^${PREFIX}-" || true
  podman volume ls --format '{{.Name}}' | grep -E "^${PREFIX}-" || true
  podman network ls --format '{{.Name}}' | grep -E "^${PREFIX}-" || true
}
existing=$(ours | head -n 3 | tr '\n' ' ')
[[ -z "$existing" ]] || fail "containers, volumes or networks named ${PREFIX}-* exist already (${existing% }); another walkthrough? remove them first"
made_image=1
if podman image exists localhost/fedlora:latest; then made_image=0; fi
work=$(mktemp -d "${TMPDIR:-/tmp}/fedlora-walk.XXXXXX")
teardown() {
  local code=$?
  set +e
  say "tearing down"
  for machine in operator "${OWNERS[@]}"; do
    dir=$work/$PREFIX-$machine
    [[ -d "$dir" ]] && (cd "$dir" && podman-compose down -v -t 2 >>"$work/down.log" 2>&1)
  done
  for c in $(podman ps -a --format '{{.Names}}' | grep -E "^${PREFIX}-"); do podman rm -f -t 2 "$c" >/dev/null; done
  for v in $(podman volume ls --format '{{.Name}}' | grep -E "^${PREFIX}-"); do podman volume rm -f "$v" >/dev/null; done
  for n in $(podman network ls --format '{{.Name}}' | grep -E "^${PREFIX}-"); do podman network rm -f "$n" >/dev/null; done
  ((made_image)) && podman image exists localhost/fedlora:latest && podman rmi localhost/fedlora:latest >/dev/null
  left=$(ours)
  if [[ -n "$left" ]]; then
    echo "walkthrough: error: left behind: $left" >&2
    code=1
  else
    say "nothing left: no container, volume or network of ${PREFIX}-*"
  fi
  rm -rf "$work" "$blocks"
  exit "$code"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# -- three machines: a copy of the repository each, its own HOME and shell environment ---------------
say "machines in $work; the operator at $host_ip:$port"
bin=$(cd "$(dirname "$PY")" && pwd)
for machine in operator "${OWNERS[@]}"; do
  dir=$work/$PREFIX-$machine
  mkdir -p "$dir" "$work/home-$machine"
  git ls-files -z -c -o --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$dir"
  ln -s "$ROOT/.cache" "$dir/.cache"   # the base image tarball and the wheelhouse, shared with ci.sh
  {
    echo "export HOME=$work/home-$machine PATH=$bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    echo "export VENV=$(dirname "$bin") FEDLORA_CI_CACHE=$CACHE FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1"
    if [[ "$machine" == operator ]]; then echo "export FEDLORA_PUBLISH=$port"; fi
  } >"$work/env-$machine"
done
mkdir -p "$ROOT/.cache/deploy"
# Each owner's own file (step 7 leaves it to the owner): 400 tweets each, different ones.
"$PY" - "$work" "$PREFIX" "${OWNERS[@]}" <<'EOF' || fail "writing the owners' files failed"
import csv, sys
from pathlib import Path
from fedlora.core.data.tweets import LABELS, load_corpus
work, prefix, owners = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
corpus = load_corpus().shuffle(seed=7)
for i, owner in enumerate(owners):
    rows = corpus.select(range(400 * i, 400 * (i + 1)))
    folder = work / f"{prefix}-{owner}" / "deploy" / "data" / f"supernode-{i}"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "data.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows((t, LABELS[y]) for t, y in zip(rows["text"], rows["label"]))
EOF

run_block() {  # run_block MACHINE BLOCK_FILE: as printed (after substitution), in that machine's shell
  local machine=$1 file=$2 dir=$work/$PREFIX-$1
  local script=$work/step.sh
  {
    echo "set -eo pipefail"
    echo "source '$work/env-$machine'"
    echo "cd '$dir'"
    if [[ $(id -u) == 0 ]] && ! command -v sudo >/dev/null; then echo 'sudo() { "$@"; }'; fi
    echo "set -x"
    substitute "$machine" "$file"
    echo "{ set +x; } 2>/dev/null"
    echo "export -p >'$work/env-$machine'"
  } >"$script"
  (cd "$dir" && env -i bash --noprofile --norc "$script") 2>&1 | sed "s/^/  [$machine] /"
}
running_ok() {  # every container of MACHINE's compose project is running
  local dir=$work/$PREFIX-$1 states="" name
  for name in $(podman ps -a --filter "label=com.docker.compose.project.working_dir=$dir" --format '{{.Names}}'); do
    states+="$name=$(podman inspect --format '{{.State.Status}}' "$name")"$'\n'
  done
  states=${states%$'\n'}
  [[ -n "$states" ]] || fail "$1: no container started"
  if grep -v '=running$' <<<"$states" | grep -q .; then
    for c in $(grep -v '=running$' <<<"$states" | cut -d= -f1); do podman logs "$c" 2>&1 | tail -n 20; done
    fail "$1: not running: $(grep -v '=running$' <<<"$states" | tr '\n' ' ')"
  fi
}
transfer() {  # what moves between machines (steps 3 and 5), by copy
  local i
  if [[ -f "$work/$PREFIX-operator/deploy/certs/ca.crt" ]]; then
    for i in "${!OWNERS[@]}"; do
      mkdir -p "$work/$PREFIX-${OWNERS[$i]}/deploy/certs"
      cp "$work/$PREFIX-operator/deploy/certs/ca.crt" "$work/$PREFIX-${OWNERS[$i]}/deploy/certs/ca.crt"
      pub=$work/$PREFIX-${OWNERS[$i]}/deploy/keys/supernode-$i.pub
      if [[ -f "$pub" ]]; then cp "$pub" "$work/$PREFIX-operator/${OWNERS[$i]}.pub"; fi
    done
  fi
}
wait_online() {
  local deadline=$((SECONDS + 240)) online=0
  while ((SECONDS < deadline)); do
    online=$( (source "$work/env-operator" && cd "$work/$PREFIX-operator" \
      && flwr supernode list fedlora --format json 2>/dev/null) | grep -c '"status": "online"' || true)
    ((online >= ${#OWNERS[@]})) && return 0
    sleep 2
  done
  fail "only $online of ${#OWNERS[@]} SuperNodes online after 240 s"
}

t0=$SECONDS
while read -r n role; do
  for machine in $(machines_for "$role"); do
    transfer
    if grep -q "flwr run \." "$blocks/$n.sh"; then wait_online; fi
    say "$machine: block $n"
    run_block "$machine" "$blocks/$n.sh" || fail "$machine: a command of block $n failed (see above); the doc's step does not work as printed"
    if grep -qE "(podman-compose|docker compose) up" "$blocks/$n.sh"; then running_ok "$machine"; fi
  done
done <"$blocks/index"

# -- what the operator copied out: every round, both owners' nodes -------------------------------------
"$PY" - "$work/$PREFIX-operator/runs" "$ROUNDS" "${#OWNERS[@]}" <<'EOF' || fail "the copied run directory is not a complete run"
import json, sys
from pathlib import Path
runs, rounds, nodes = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
(run,) = [p for p in runs.iterdir() if (p / "rounds.jsonl").is_file()]
rows = [json.loads(line) for line in (run / "rounds.jsonl").read_text().splitlines()]
assert [r["round"] for r in rows] == list(range(1, rounds + 1)), rows
assert all(r["num_clients"] == nodes for r in rows), rows
summary = json.loads((run / "summary.json").read_text())
print(f"walkthrough run: {[(r['round'], r['num_clients'], round(r['eval_accuracy'], 3)) for r in rows]}, "
      f"majority class {summary['majority_accuracy']:.3f}")
EOF
say "passed: every step of $(basename "$DOC")'s walkthrough ran as printed ($((SECONDS - t0)) s)"

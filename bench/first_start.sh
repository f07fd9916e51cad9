#!/usr/bin/env bash
# First start: `./dev run` on a fresh clone until the listener answers C-ECHO (target: 90 s).
#
#   bench/first_start.sh [--reuse-venv PATH] [--timeout SECONDS]
#
# Clones this repository (its committed HEAD) into a temporary folder, with no model bundle, and
# runs `./dev run` there on free ports (the repository's config.yaml, ports changed), timing the
# moment DCMTK's echoscu gets an answer. Prints the seconds, their ratio to the 90 s target, and
# what /readyz says then (torch and the inference dependencies are still being installed in the
# background on a new virtualenv, then demo weights are trained). Stops the node and deletes the
# clone at the end.
#
# --reuse-venv PATH: the clone's .venv is PATH (an existing virtualenv with the node's
# dependencies, e.g. a checkout's .venv) instead of a new one, and the output says so: a new
# virtualenv costs whatever pip needs to install the node's own dependencies on that machine. The
# clone's code is what runs (PYTHONPATH), and PATH itself is not changed.
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
REUSE=""
TIMEOUT=900
while [ $# -gt 0 ]; do
  case "$1" in
    --reuse-venv) REUSE=$(cd "$2" && pwd); shift 2 ;;
    --timeout) TIMEOUT=$2; shift 2 ;;
    *) echo "usage: $0 [--reuse-venv PATH] [--timeout SECONDS]" >&2; exit 2 ;;
  esac
done
command -v echoscu >/dev/null || { echo "needs DCMTK's echoscu (Debian package dcmtk)" >&2; exit 2; }

WORK=$(mktemp -d -t pacsnode-first-start-XXXXXX)
NODE_PID=""
cleanup() {
  if [ -n "$NODE_PID" ] && kill -0 "$NODE_PID" 2>/dev/null; then
    kill -TERM -- "-$NODE_PID" 2>/dev/null || true   # the node, its workers and the demo training
    for _ in $(seq 1 60); do kill -0 "$NODE_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$NODE_PID" 2>/dev/null || true
  fi
  rm -rf "$WORK"
}
trap cleanup EXIT
trap "exit 143" INT TERM  # so that the EXIT trap stops the node

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
DICOM_PORT=$(free_port)
API_PORT=$(free_port)

t0=$(date +%s.%N)
git clone -q "$REPO" "$WORK/pacsnode"
CLONE="$WORK/pacsnode"
# The repository's own config, on free ports (11112 and 8040 may be taken here).
sed "s/^  port: 11112$/  port: $DICOM_PORT/" "$CLONE/config.yaml" > "$CLONE/bench-config.yaml"
printf '\napi:\n  port: %s\n' "$API_PORT" >> "$CLONE/bench-config.yaml"
grep -q "port: $DICOM_PORT" "$CLONE/bench-config.yaml" || { echo "config.yaml has no 'port: 11112' line to replace" >&2; exit 1; }

if [ -n "$REUSE" ]; then
  [ -x "$REUSE/bin/python" ] && [ -e "$REUSE/.installed" ] || { echo "$REUSE is not a set-up .venv (no bin/python or .installed)" >&2; exit 2; }
  ln -s "$REUSE" "$CLONE/.venv"
  # ./dev reinstalls when pyproject.toml is newer than the venv's marker: not into a borrowed venv.
  touch -r "$REUSE/.installed" "$CLONE/pyproject.toml"
  export PYTHONPATH="$CLONE"
  echo "virtualenv: REUSED $REUSE (not created by this run; the clone's code runs through PYTHONPATH)"
else
  echo "virtualenv: new (./dev creates it, installs the node's dependencies, then torch and the inference dependencies in the background)"
fi

cd "$CLONE"
PACSNODE_CONFIG=bench-config.yaml setsid ./dev run > "$WORK/node.log" 2>&1 &
NODE_PID=$!

answered=""
while :; do
  now=$(date +%s.%N)
  elapsed=$(python3 -c "print(f'{$now - $t0:.1f}')")
  # STORESCU: the calling AE title config.yaml allows (deny by default)
  if echoscu -to 2 -ta 2 -td 2 -aet STORESCU -aec PACSNODE 127.0.0.1 "$DICOM_PORT" >/dev/null 2>&1; then
    answered=$elapsed; break
  fi
  if ! kill -0 "$NODE_PID" 2>/dev/null; then
    echo "./dev run exited before answering; its log:" >&2; tail -40 "$WORK/node.log" >&2; exit 1
  fi
  if python3 -c "import sys; sys.exit(0 if $elapsed > $TIMEOUT else 1)"; then
    echo "no C-ECHO answer after $TIMEOUT s; log:" >&2; tail -40 "$WORK/node.log" >&2; exit 1
  fi
  sleep 0.25
done

echo "fresh clone -> C-ECHO answered: $answered s (target 90 s; ratio $(python3 -c "print(f'{$answered / 90:.2f}')"))"
bundle_state="missing"; [ -e models/chest_xray/configs/metadata.json ] && bundle_state="present"
echo "model bundle at that moment: $bundle_state"
for _ in $(seq 1 120); do   # the API process may start a few seconds after the listener
  if ready=$(curl -s -m 5 "http://127.0.0.1:$API_PORT/readyz"); then
    [ -n "$ready" ] && { echo "/readyz then: $ready"; break; }
  fi
  sleep 0.5
done
grep '^dev: ' "$WORK/node.log" || true   # ./dev's own steps (virtualenv, pip) and their seconds
grep -m1 "installing the inference dependencies" "$WORK/node.log" \
  || grep -m1 "training .*demo weights in the background" "$WORK/node.log" \
  || echo "(the log mentions neither a background install nor a background training)"
echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg) (shared machines inflate the figure)"

#!/usr/bin/env bash
# Side-by-side speed benchmark (issue 3, item 6): pyroflows vs Pyro, zuko, nflows, normflows and the
# conditioner-only `floor`, eager and under torch.compile.  Run from the repository root:
#     bash benchmarks/peers.sh [extra peers.py args, e.g. --budget 300 --cases A,C]
# Needs the harness checkout ../shared/bench (override with PEERS_DIR=...).
set -euo pipefail
PY=${PYTHON:-python}
PEERS_DIR=${PEERS_DIR:-../shared/bench}
[ -f "$PEERS_DIR/peers.py" ] || PEERS_DIR=/work/shared/bench
export PEERS_DIR OMP_NUM_THREADS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
A=benchmarks/peers_pyroflows.py
MODE=${MODE:-eager}   # eager | compiled
if [ "$MODE" = compiled ]; then
  "$PY" "$PEERS_DIR/peers.py" \
    --adapter pyroflows_compiled=$A:build_pyroflows_compiled --adapter zuko_compiled=$A:build_zuko_compiled \
    --adapter pyroflows=$A:build_pyroflows \
    --libs pyroflows_compiled,zuko_compiled,pyroflows,floor \
    --json /tmp/peers_compiled.json --md docs/bench_peers_compiled_raw.md "$@"
else
  "$PY" "$PEERS_DIR/peers.py" --adapter pyroflows=$A:build_pyroflows \
    --libs pyroflows,pyro,zuko,nflows,normflows,floor \
    --json /tmp/peers_eager.json --md docs/bench_peers_eager_raw.md "$@"
fi

"""The memory measurements shared by the depth benchmarks (``reversible_memory.py``,
``glow_memory.py``): the peak RSS of one training step, the activation bytes a forward pass
saves for backward, and each configuration run in a fresh process (a clean allocator)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_step(step, x) -> tuple[float, float]:
    """``(peak RSS growth in MB, seconds)`` of ``step(x)``, after a tiny warm-up step that
    initialises torch's lazy state (and, for a training step, the optimizer's)."""
    step(x[:8])
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kb("VmRSS")
    t0 = time.perf_counter()
    step(x)
    seconds = time.perf_counter() - t0
    return (_status_kb("VmHWM") - base) / 1024, seconds


def saved_activation_mb(loss_fn, parameters) -> float:
    """MB of tensors (other than ``parameters``) that the forward pass of
    ``loss_fn()`` (a scalar loss) saves for its backward pass, which then runs."""
    import torch

    params = {p.data_ptr() for p in parameters}
    saved = {}

    def pack(t):
        if t.data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    loss.backward()
    return sum(saved.values()) / 2**20


def run_fresh(script: str, *args) -> dict:
    """Run ``script --one ARGS`` in a fresh process; its last output line is the JSON result."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, script, "--one", *map(str, args)],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])

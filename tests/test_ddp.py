"""Two-process training with torchrun (gloo on CPU): both ranks end with identical parameters."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    from pyroflows import Flow
    from pyroflows.train import fit
    from pyroflows.transforms.elementwise import elementwise
    from pyroflows.transforms.normalization import actnorm

    out = sys.argv[1]
    rank = int(os.environ["RANK"])
    torch.manual_seed(100 + rank)            # different initial parameters: DDP must broadcast rank 0's
    # ActNorm initialises itself from the first batch it sees: the ranks' shards differ
    flow = Flow([elementwise(2, kind="piecewise_linear"), elementwise(2, kind="affine"), actnorm(2)])
    x = torch.randn(400, 2, generator=torch.Generator().manual_seed(0)) * 2 + 1
    hist = fit(flow, x, epochs=3, batch_size=50, lr=0.02, progress=False, seed=0,
               checkpoint=os.path.join(out, "ck.pt"))
    state = {k: v.tolist() for k, v in flow.state_dict().items()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"state": state, "train_nll": hist.train_nll,
                   "world": int(os.environ["WORLD_SIZE"])}, f)
''')


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed not available")
def test_torchrun_two_processes_identical_parameters(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), str(tmp_path)], check=False, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    a, b = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert a["world"] == b["world"] == 2
    assert a["state"] == b["state"]                      # bit-identical parameters
    assert a["train_nll"] == b["train_nll"]              # the epoch NLL is averaged over both ranks
    assert a["train_nll"][-1] < a["train_nll"][0]        # and it trained
    assert (tmp_path / "ck.pt").exists()                 # rank 0 wrote the checkpoint
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)  # plain data (pyroflows.io)
    assert ck["format"] == "pyroflows-checkpoint"
    assert {k: v.tolist() for k, v in ck["flow"].items()} == a["state"]

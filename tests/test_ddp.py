"""Data parallelism: two torchrun processes give the gradients and router biases of one process
that sees both of their batches (train.py's DDP setting: no buffer broadcast, loads all-reduced)."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_two_ranks_match_one_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    os.path.join(ROOT, "tests", "ddp_worker.py"), out], check=True, env=env, cwd=ROOT,
                   capture_output=True, timeout=300)
    r = torch.load(out, weights_only=True)
    torch.testing.assert_close(r["loss"], r["ref_loss"], rtol=1e-12, atol=1e-12)
    for name, g in r["ref_grads"].items():
        torch.testing.assert_close(r["grads"][name], g, rtol=1e-10, atol=1e-12, msg=name)
    for name, b in r["ref_biases"].items():
        assert torch.equal(r["biases"][name], b), name  # the update saw the global loads
    assert any(b.abs().sum() > 0 for b in r["ref_biases"].values())

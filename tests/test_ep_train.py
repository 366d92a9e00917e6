"""train.py with expert parallelism under torchrun (gloo, CPU): it follows the single-process run on
the same global batch, its checkpoint resumes on another layout and is read by sample.py on one
device, and two simulated nodes train with the hierarchical dispatch and node-limited routing."""

import json
import os
import shutil
import socket
import subprocess
import sys

import torch

import data
import sample
from test_ddp import ROOT, train_py
from test_train import TINY, assert_same_checkpoints, train_steps, vals

CLOSE = dict(rtol=2e-4, atol=2e-5)  # the same sums in another order (float32)


def corpus(tmp_path):
    (tmp_path / "text.txt").write_text(data.corpus_text("shakespeare")[1][:60_000])
    return [f"--data={tmp_path / 'text.txt'}", f"--cache_dir={tmp_path / 'cache'}"]


def assert_same_curve(a, b, steps):
    for step in steps:
        torch.testing.assert_close(train_steps(a)[step], train_steps(b)[step], **CLOSE, msg=f"step {step}")


def test_ep2_follows_one_process_resumes_with_ep1_and_samples(tmp_path, capsys):
    common = [*corpus(tmp_path), "--max_iters=8", "--eval_interval=4", "--ema_interval=2", "--batch_size=2"]
    one = train_py(tmp_path / "one", *common, "--grad_accum=2")
    ep = train_py(tmp_path / "ep", *common, "--ep=2", "--stop_iter=4", nproc=2)
    assert sorted(os.listdir(tmp_path / "ep")) == ["ckpt.pt", "ckpt.pt.step4.part1", "log.jsonl", "tokenizer.tiktoken"]
    assert_same_curve(one, ep, range(1, 5))
    torch.testing.assert_close(vals(one)[4], vals(ep)[4], **CLOSE)
    assert all(r["bytes_intra_node"] > 0 and r["bytes_inter_node"] == 0 for r in ep if "loss" in r)

    # sample.py reads the expert-parallel checkpoint (each rank wrote its experts) on one device
    sample.main([f"--ckpt={tmp_path / 'ep'}", "--prompt=KING:", "--max_new_tokens=5", "--device=cpu"])
    assert capsys.readouterr().out.startswith("KING:")

    # resumed on the same layout it continues bit for bit, like the uninterrupted run
    shutil.copytree(tmp_path / "ep", tmp_path / "ep_again")
    again = train_py(tmp_path / "ep_again", "--resume", nproc=2)
    full = train_py(tmp_path / "ep_full", *common, "--ep=2", nproc=2)
    assert train_steps(again) == train_steps(full) and vals(again) == vals(full)
    assert_same_checkpoints(tmp_path / "ep_again" / "ckpt.pt", tmp_path / "ep_full" / "ckpt.pt")

    # the same run continues on one process without expert parallelism: the same curve
    resumed = train_py(tmp_path / "ep", "--resume", "--ep=1", "--grad_accum=2")
    assert sorted(train_steps(resumed)) == list(range(1, 9))
    assert_same_curve(one, resumed, range(5, 9))
    torch.testing.assert_close(vals(one)[8], vals(resumed)[8], **CLOSE)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_simulated_nodes_hierarchical_dispatch(tmp_path):
    """Two torchrun launches of two processes each, as two hosts would run them: --ep=4 spans both
    "nodes", --dispatch=hierarchical, and n_expert_groups=2 (one per node) with M=1, so each token's
    experts sit on one node. It follows one process on the same global batch."""
    model = ["--n_expert_groups=2", "--n_limited_groups=1"]
    common = [*TINY, *corpus(tmp_path), *model, "--max_iters=6", "--eval_interval=6", "--batch_size=1"]
    one = train_py(tmp_path / "one", *common[len(TINY):], "--grad_accum=4")
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1"}
    launches = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=2",
         "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "train.py", *common, "--ep=4",
         "--dispatch=hierarchical", f"--out_dir={tmp_path / 'nodes'}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for p in launches:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    nodes = [json.loads(line) for line in open(tmp_path / "nodes" / "log.jsonl")]
    assert_same_curve(one, nodes, range(1, 7))
    assert all(r["bytes_inter_node"] > 0 and r["bytes_intra_node"] > 0 for r in nodes if "loss" in r)

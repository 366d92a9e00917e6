"""train.py with pipeline parallelism under torchrun (gloo, CPU): DualPipe and 1F1B follow the
single-process run on the same micro-batches, alone and with expert parallelism, and a checkpoint
written by the pipeline resumes on one process and continues the same curve."""

import shutil

import pytest
import torch

from test_ddp import train_py
from test_ep_train import assert_same_curve, corpus
from test_train import assert_same_checkpoints, train_steps, vals


@pytest.mark.parametrize("pipeline", ["dualpipe", "1f1b"])
def test_pp2_follows_one_process_and_resumes_on_one(tmp_path, pipeline):
    common = [*corpus(tmp_path), "--max_iters=6", "--eval_interval=3", "--ema_interval=2", "--batch_size=1",
              "--grad_accum=4"]
    one = train_py(tmp_path / "one", *common)
    pp = train_py(tmp_path / "pp", *common, "--pp=2", f"--pipeline={pipeline}", "--stop_iter=3", nproc=2)
    assert_same_curve(one, pp, range(1, 4))
    torch.testing.assert_close(vals(one)[3], vals(pp)[3], rtol=2e-4, atol=2e-5)  # evaluation, EMA included
    shutil.copytree(tmp_path / "pp", tmp_path / "pp_again")  # on the same layout: bit for bit
    again = train_py(tmp_path / "pp_again", "--resume", nproc=2)
    full = train_py(tmp_path / "pp_full", *common, "--pp=2", f"--pipeline={pipeline}", nproc=2)
    assert train_steps(again) == train_steps(full) and vals(again) == vals(full)
    assert_same_checkpoints(tmp_path / "pp_again" / "ckpt.pt", tmp_path / "pp_full" / "ckpt.pt")
    resumed = train_py(tmp_path / "pp", "--resume", "--pp=1")  # the pipeline's checkpoint on one process
    assert sorted(train_steps(resumed)) == list(range(1, 7))
    assert_same_curve(one, resumed, range(4, 7))


def test_pp4_and_pp2_with_ep2(tmp_path):
    """DualPipe over four stages; and two stages, each expert parallel over two ranks (4 processes), in
    both rank orders."""
    common = [*corpus(tmp_path), "--n_layers=4", "--max_iters=3", "--eval_interval=3", "--batch_size=1",
              "--grad_accum=8"]
    one = train_py(tmp_path / "one", *common)
    # pp=2 x ep=2: 2 data-parallel ranks x 4 micro-batches, the same 8 windows per step
    for name, layout in [("pp4", ["--pp=4"]), ("pp2ep2", ["--pp=2", "--ep=2", "--grad_accum=4"])]:
        log = train_py(tmp_path / name, *common, *layout, nproc=4)
        assert_same_curve(one, log, range(1, 4))
        assert log[0]["groups"]["ep"] == ([0, 1] if "ep2" in name else [0])
    # the other rank order (stage 0 on ranks 0 and 2, its ep pair [0, 2]), stopped at step 2; its
    # checkpoint resumes on one process and the curve goes on
    inner = train_py(tmp_path / "inner", *common, "--pp=2", "--ep=2", "--grad_accum=4", "--pp_inner=True",
                     "--stop_iter=2", nproc=4)
    assert inner[0]["groups"]["ep"] == [0, 2] and inner[0]["groups"]["pp"] == [0, 1]
    assert_same_curve(one, inner, range(1, 3))
    resumed = train_py(tmp_path / "inner", "--resume", "--pp=1", "--ep=1", "--pp_inner=False", "--grad_accum=8")
    assert sorted(train_steps(resumed)) == [1, 2, 3]
    assert_same_curve(one, resumed, range(3, 4))

"""checkpoint.py: one format for every layout; split tensors joined; atomic; weights_only."""

import os
import subprocess
import sys

import pytest
import torch

import checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_with_three_ranks(path, step):
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3",
                    os.path.join(ROOT, "tests", "checkpoint_worker.py"), path, str(step)], check=True, env=env,
                   capture_output=True, timeout=120)


def test_three_writers_read_back_by_one_process_and_by_rows(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    write_with_three_ranks(path, 1)
    write_with_three_ranks(path, 2)  # the next checkpoint replaces the first one's parts
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt", "ckpt.pt.step2.part1", "ckpt.pt.step2.part2"]
    meta, tensors = checkpoint.load(path)
    full = torch.arange(18, dtype=torch.float32).view(6, 3) * 3
    assert meta["step"] == 2 and meta["parts"] == ["ckpt.pt.step2.part1", "ckpt.pt.step2.part2"]
    assert torch.equal(tensors["model"]["experts.w1"], full)
    assert torch.equal(tensors["ema"]["experts.w1"], full + 0.5)
    assert torch.equal(tensors["model"]["dense.weight"], torch.ones(4))
    # a reader holding rows 1..4 (another layout: 2 ranks of 3 experts would ask for 0..3 and 3..6)
    _, some = checkpoint.load(path, rows=lambda name: (1, 4))
    assert torch.equal(some["model"]["experts.w1"], full[1:4])
    _, ranks_of_one = checkpoint.load(path, rows=lambda name: (1, 4) if name == "experts.w1" else None)
    assert torch.equal(ranks_of_one["model"]["dense.weight"], torch.ones(4))  # the others whole
    with pytest.raises(ValueError, match="has 6 rows; rows 4..8 were asked for"):
        checkpoint.load(path, rows=lambda name: (4, 8))
    os.remove(tmp_path / "ckpt.pt.step2.part2")
    with pytest.raises(ValueError, match="names a part file ckpt.pt.step2.part2 that is missing"):
        checkpoint.load(path)


def test_one_writer_is_one_file(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    w = torch.randn(5, 2)
    checkpoint.save(path, dict(model_args=dict(dim=2), step=7), dict(model={"w": w}))
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    meta, tensors = checkpoint.load(path)
    assert meta == dict(model_args=dict(dim=2), step=7, parts=[])
    assert torch.equal(tensors["model"]["w"], w) and tensors["ema"] == {}
    _, rows = checkpoint.load(path, rows=lambda name: (2, 4))  # a later layout that splits it
    assert torch.equal(rows["model"]["w"], w[2:4])
    assert checkpoint.load_meta(path) == meta


def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load(path)
    checkpoint.save(path, dict(model_args={}, step=3), dict(model={"w": torch.zeros(1000)}))
    data_bytes = open(path, "rb").read()
    open(path, "wb").write(data_bytes[: len(data_bytes) // 2])  # truncated, as by a crash mid-write
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.load(path)
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a checkpoint written by train.py"):
        checkpoint.load_meta(path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"model_args": Evil()}, path, _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match="not a readable checkpoint"):  # weights_only refuses code
        checkpoint.load(path)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save(path, dict(model_args={}, step=1), dict(model={"w": torch.ones(3)}))

    def crash(obj, f, *a, **k):
        open(f, "wb").write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save(path, dict(model_args={}, step=2), dict(model={"w": torch.zeros(3)}))
    meta, tensors = checkpoint.load(path)  # the old checkpoint survived intact
    assert meta["step"] == 1 and torch.equal(tensors["model"]["w"], torch.ones(3))

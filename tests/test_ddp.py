"""Data parallelism: two torchrun processes give the gradients and router biases of one process
that sees both of their batches (gradients averaged by comm.reduce_gradients, loads all-reduced),
and train.py under torchrun resumes exactly and matches one process."""

import json
import os
import subprocess
import sys

import torch

import checkpoint
import data

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


def train_py(out, *args, nproc=1):
    """train.py in new processes (torchrun for nproc > 1), a fresh run on the tiny model of
    test_train.py or a resumed one with only the arguments given; its log."""
    from test_train import TINY
    args = args if "--resume" in args else (*TINY, *args)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, *launcher, "train.py", f"--out_dir={out}", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_ranks_resume_exactly_and_match_one_process(tmp_path):
    """Under torchrun: a run stopped at an evaluation and resumed logs the uninterrupted run's numbers
    bit for bit; one process with the same global batch (2 micro-batches of the same windows) follows
    the same curve, EMA included (each rank's EMA starts from the weights training starts from); and
    the two-rank checkpoint resumes on one process, continuing that curve."""
    from test_train import assert_same_checkpoints, train_steps, vals
    corpus = [f"--data={tmp_path / 'text.txt'}", f"--cache_dir={tmp_path / 'cache'}"]
    (tmp_path / "text.txt").write_text(data.corpus_text("shakespeare")[0][:60_000])
    common = [*corpus, "--max_iters=8", "--eval_interval=4", "--ema_interval=2", "--batch_size=2"]
    full = train_py(tmp_path / "full", *common, nproc=2)
    train_py(tmp_path / "split", *common, "--stop_iter=4", nproc=2)
    split = train_py(tmp_path / "split", "--resume", nproc=2)
    assert train_steps(full) == train_steps(split) and sorted(train_steps(split)) == list(range(1, 9))
    assert vals(full) == vals(split)
    assert_same_checkpoints(tmp_path / "full" / "ckpt.pt", tmp_path / "split" / "ckpt.pt")

    one = train_py(tmp_path / "one", *common, "--grad_accum=2")
    for (step, a), b in zip(train_steps(full).items(), train_steps(one).values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"step {step}")
    for step, (val, val_ema) in vals(full).items():  # a rank whose EMA started elsewhere would show here
        torch.testing.assert_close((val, val_ema), vals(one)[step], rtol=1e-4, atol=1e-5)

    train_py(tmp_path / "moved", *common, "--stop_iter=4", nproc=2)
    moved = train_py(tmp_path / "moved", "--resume", "--batch_size=1", "--grad_accum=4")  # one process now
    for step in range(5, 9):
        torch.testing.assert_close(train_steps(moved)[step], train_steps(full)[step], rtol=1e-4, atol=1e-5)


def test_sigterm_under_torchrun_checkpoints_every_rank_at_one_step(tmp_path):
    """SIGTERM to torchrun (what a scheduler sends before preemption): the agent passes it to both
    ranks, they agree on the step, write one checkpoint and exit; the resume continues exactly."""
    import signal

    from test_train import TINY, assert_same_checkpoints, train_steps
    (tmp_path / "text.txt").write_text(data.corpus_text("shakespeare")[0][:60_000])
    common = [*TINY, f"--data={tmp_path / 'text.txt'}", f"--cache_dir={tmp_path / 'cache'}", "--max_iters=400",
              "--eval_interval=1000", "--batch_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "train.py", *common, f"--out_dir={tmp_path / 'run'}"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        if line.startswith("step 3:"):
            break
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=120)
    assert p.returncode != 0 and "--resume" in out
    stopped = checkpoint.load_meta(str(tmp_path / "run" / "ckpt.pt"))["step"]
    assert 3 <= stopped < 400
    resumed = train_py(tmp_path / "run", "--resume", f"--stop_iter={stopped + 2}", nproc=2)
    full = train_py(tmp_path / "full", *common[len(TINY):], f"--stop_iter={stopped + 2}", nproc=2)
    assert train_steps(resumed) == train_steps(full)
    assert_same_checkpoints(tmp_path / "run" / "ckpt.pt", tmp_path / "full" / "ckpt.pt")

"""train.py and sample.py end to end on a tiny model: learning, resuming, checkpoints, sampling."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

import checkpoint
import comm
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dim=64", "--inter_dim=128", "--moe_inter_dim=32", "--n_layers=2", "--n_heads=2", "--q_lora_rank=32",
        "--kv_lora_rank=16", "--qk_nope_head_dim=16", "--qk_rope_head_dim=8", "--v_head_dim=16", "--vocab_size=512",
        "--init_std=0.02", "--batch_size=4", "--seq_len=32", "--eval_iters=2", "--log_interval=1", "--warmup_iters=3",
        "--compile=false", "--device=cpu"]


def run(out_dir, corpus, *extra):
    train.main(TINY + corpus + [f"--out_dir={out_dir}", *extra])
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_few_steps_lower_the_loss(tmp_path, corpus):
    log = run(tmp_path, corpus, "--max_iters=30", "--eval_interval=30", "--lr=3e-3")
    losses = [r["main"] for r in log if "main" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5  # learned something: at least 0.5 nats
    val = [r for r in log if "val_loss" in r][-1]
    assert val["val_loss"] < losses[0] - 0.5 and val["val_loss_ema"] < losses[0]
    assert all(r["maxvio"] >= 0 for r in log if "maxvio" in r)


def train_steps(log):
    """step -> (loss, main, mtp, balance, maxvio, the run's MaxVio per layer) of the logged training
    steps; every step once."""
    steps = [r["step"] for r in log if "loss" in r]
    assert len(steps) == len(set(steps)), f"duplicate steps in the log: {steps}"
    return {r["step"]: (r["loss"], r["main"], r["mtp"], r["balance"], r["maxvio"], r.get("maxvio_global_layers"))
            for r in log if "loss" in r}


def vals(log):
    return {r["step"]: (r["val_loss"], r["val_loss_ema"]) for r in log if "val_loss" in r}


def assert_same_checkpoints(path_a, path_b):
    """Weights, router biases, EMA, optimizer moments and data position equal, bit for bit."""
    (meta_a, a), (meta_b, b) = checkpoint.load(str(path_a)), checkpoint.load(str(path_b))
    assert meta_a["step"] == meta_b["step"]
    for kind in checkpoint.KINDS:
        assert a[kind].keys() == b[kind].keys() and len(a[kind]) > 0, kind
        for name, t in a[kind].items():
            assert torch.equal(t, b[kind][name]), (kind, name)
    assert torch.equal(meta_a["data"]["generator"], meta_b["data"]["generator"])


def test_ema_applied_and_then_removed():
    """Evaluating the average leaves the weights and the average as they were, bit for bit, whatever
    the parameters' device and dtype (an FP32 CPU parameter once aliased its 'copy')."""
    for device in ["cpu"] + ["cuda"] * torch.cuda.is_available():
        for dtype in (torch.float32, torch.bfloat16):
            net = torch.nn.Linear(8, 4).to(device, dtype)
            ema = train.EMA(net, 0.9)
            ema.shadow = [torch.randn_like(s) for s in ema.shadow]  # an average unlike the weights
            weights = [p.detach().clone() for p in net.parameters()]
            average = [s.clone() for s in ema.shadow]
            with ema.applied(net):
                for p, a in zip(net.parameters(), average):
                    assert torch.equal(p, a.to(device, dtype)), (device, dtype)
            for p, s, w, a in zip(net.parameters(), ema.shadow, weights, average):
                assert torch.equal(p, w) and torch.equal(s, a), (device, dtype)


def test_evaluation_does_not_change_training(tmp_path, corpus):
    common = ["--max_iters=8", "--lr=3e-3", "--ema_interval=2"]
    often = run(tmp_path / "often", corpus, *common, "--eval_interval=2")
    never = run(tmp_path / "never", corpus, *common, "--eval_interval=1000")
    unsaved = run(tmp_path / "unsaved", corpus, *common, "--eval_interval=2", "--save_checkpoints=False")
    assert len(vals(often)) == 4 and len(vals(never)) == 1  # the last step evaluates in both
    assert train_steps(often) == train_steps(never) == train_steps(unsaved)
    assert vals(often)[8] == vals(never)[8] and vals(often) == vals(unsaved)
    assert not (tmp_path / "unsaved" / "ckpt.pt").exists()  # an ablation run: the log only
    assert_same_checkpoints(tmp_path / "often" / "ckpt.pt", tmp_path / "never" / "ckpt.pt")


@pytest.mark.parametrize("stop", [4, 5], ids=["at-an-evaluation", "between-evaluations"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus, stop):
    common = ["--max_iters=8", "--eval_interval=4", "--lr=3e-3", "--ema_interval=2"]
    full = run(tmp_path / "full", corpus, *common)
    run(tmp_path / "split", corpus, *common, f"--stop_iter={stop}")
    with open(tmp_path / "split" / "log.jsonl", "a") as f:  # what a crash after the checkpoint leaves
        f.write(json.dumps(dict(step=stop + 1, loss=0.0, main=0.0, mtp=0.0, balance=0.0, maxvio=0.0)) + "\n{\"ste")
    # only --resume: every setting (max_iters, the schedules, ema_interval ...) comes from the checkpoint
    split = run(tmp_path / "split", [], "--resume", "--device=cpu")
    a, b = train_steps(full), train_steps(split)
    assert sorted(b) == list(range(1, 9))
    assert a == b  # before and after the restart: the same numbers, bit for bit
    assert vals(full)[8] == vals(split)[8]  # the EMA was restored too
    assert_same_checkpoints(tmp_path / "full" / "ckpt.pt", tmp_path / "split" / "ckpt.pt")


def test_resume_takes_the_checkpoints_settings(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    run(out, corpus, "--max_iters=6", "--eval_interval=3", "--stop_iter=3")
    files = {f: (out / f).read_bytes() for f in ("ckpt.pt", "tokenizer.tiktoken", "log.jsonl")}
    refused = [("--seed=7", "--seed=7: the checkpoint's run has seed=1337"),
               ("--n_layers=4", "--n_layers=4: the checkpoint's model has n_layers=2"),
               ("--balance=aux", "--balance=aux: the checkpoint's model has balance=bias"),
               ("--preset=small", "--preset=small: the checkpoint's run has preset=nano"),
               ("--data=elsewhere.txt", "--data=elsewhere.txt: the checkpoint's run has data="),
               ("--batch_size=8", "gives 8 sequences per step; the checkpoint's run took 4")]
    for arg, message in refused:
        with pytest.raises(SystemExit, match=re.escape(message)):
            train.main([f"--out_dir={out}", "--resume", arg])
    with pytest.raises(SystemExit, match="holds a run already: continue it with --resume"):
        train.main(TINY + corpus + [f"--out_dir={out}"])
    assert {f: (out / f).read_bytes() for f in files} == files  # nothing in out_dir was touched
    capsys.readouterr()
    log = run(out, [], "--resume", "--max_iters=9", "--batch_size=2", "--grad_accum=2", "--log_interval=3")
    printed = capsys.readouterr().out
    for change in ("resume: max_iters 6 -> 9", "resume: batch_size 4 -> 2", "resume: grad_accum 1 -> 2"):
        assert change in printed
    assert "model: nano" in printed
    assert sorted(train_steps(log)) == [1, 2, 3, 6, 9]  # log_interval 1 before the restart, 3 after
    assert checkpoint.load_meta(str(out / "ckpt.pt"))["config"]["max_iters"] == 9
    with pytest.raises(SystemExit, match="at step 9, the end of its max_iters=9"):
        train.main([f"--out_dir={out}", "--resume"])


def test_interrupt_finishes_the_step_and_checkpoints(tmp_path, corpus):
    """Ctrl-C or SIGTERM in the middle of a run: a checkpoint of the last whole step, a non-zero exit,
    and a resume that continues exactly like the uninterrupted run."""
    common = TINY + corpus + ["--max_iters=400", "--eval_interval=1000", "--ema_interval=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    for sig in (signal.SIGINT, signal.SIGTERM):
        out = tmp_path / sig.name
        p = subprocess.Popen([sys.executable, "train.py", *common, f"--out_dir={out}"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in p.stdout:  # wait until training is under way
            if line.startswith("step 3:"):
                break
        p.send_signal(sig)
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 128 + sig, stderr
        assert f"--out_dir={out} --resume" in stdout
        stopped = checkpoint.load_meta(str(out / "ckpt.pt"))["step"]
        assert 3 <= stopped < 400
        log = [json.loads(line) for line in open(out / "log.jsonl")]
        assert max(train_steps(log)) == stopped  # the stopping step is logged
    # the uninterrupted run and the resume in processes like the interrupted one (same threads, same bits)
    subprocess.run([sys.executable, "train.py", f"--out_dir={out}", "--resume", f"--stop_iter={stopped + 3}"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    subprocess.run([sys.executable, "train.py", *common, f"--out_dir={tmp_path / 'full'}", f"--stop_iter={stopped + 3}"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    resumed, full = ([json.loads(line) for line in open(d / "log.jsonl")] for d in (out, tmp_path / "full"))
    assert sorted(train_steps(resumed)) == list(range(1, stopped + 4))
    assert train_steps(resumed) == train_steps(full)
    assert_same_checkpoints(out / "ckpt.pt", tmp_path / "full" / "ckpt.pt")


def test_nan_stops_the_run_naming_step_and_quantity(tmp_path, corpus):
    with pytest.raises(FloatingPointError, match=r"step 1: non-finite loss, main"):
        run(tmp_path, corpus, "--max_iters=3", "--init_std=1e38")
    with pytest.raises(FloatingPointError, match="step 7: non-finite mtp"):
        train.check_finite(torch.tensor([1.0, 2.0, float("inf"), 0.1]), 7)


@pytest.mark.parametrize("eval_interval", [3, 4])
def test_a_loss_that_is_not_finite_stops_before_anything_is_written(tmp_path, corpus, monkeypatch, eval_interval):
    """A NaN learning rate at step 5 makes the weights NaN, so step 6's loss is NaN. The check runs a step
    late (FiniteCheck, so the host does not wait for the GPU every step) yet before every checkpoint: the
    error names step 6, whether step 6 writes a checkpoint (eval_interval 3) or not (4), and the checkpoint
    on disk is the one before, with finite weights."""
    lr_at = train.lr_at
    monkeypatch.setattr(train, "lr_at", lambda step, c: float("nan") if step == 4 else lr_at(step, c))
    with pytest.raises(FloatingPointError, match=r"step 6: non-finite loss, main"):
        run(tmp_path, corpus, "--max_iters=9", f"--eval_interval={eval_interval}", "--log_interval=100")
    ckpt, tensors = checkpoint.load(os.path.join(tmp_path, "ckpt.pt"))
    assert ckpt["step"] == {3: 3, 4: 4}[eval_interval]
    assert all(torch.isfinite(t).all() for t in tensors["model"].values())


def test_bad_settings_name_the_key():
    with pytest.raises(SystemExit, match="unknown setting --batchsize"):
        train.main(["--batchsize=3"])
    with pytest.raises(SystemExit, match="--max_iters=ten: expected a int"):
        train.main(["--max_iters=ten"])
    with pytest.raises(SystemExit, match="--compile=maybe: expected one of auto, true, false, graphs"):
        train.main(["--compile=maybe"])
    with pytest.raises(SystemExit, match=r"--compile=graphs \(CUDA graphs\) runs one process on a GPU with "
                       r"grad_accum=1; this run has device cpu, 1 process\(es\), grad_accum=2: use --compile=true"):
        train.main(["--compile=graphs", "--device=cpu", "--grad_accum=2", "--out_dir=/nonexistent/never/created"])
    with pytest.raises(SystemExit, match="--n_heads=two: expected a int"):
        train.main(["--n_heads=two"])
    with pytest.raises(SystemExit, match="unknown preset 'huge'"):
        train.main(["--preset=huge", "--device=cpu", "--out_dir=/nonexistent/never/created"])
    with pytest.raises(SystemExit, match="--preset=nano .*dim=192 .* multiple of 128 with fp8=True"):
        train.main(["--fp8=True", "--device=cpu", "--out_dir=/nonexistent/never/created"])


def test_a_model_whose_state_cannot_fit_is_refused_up_front(tmp_path, corpus, monkeypatch):
    """check_fits: FP32 weights and gradients, two AdamW moments and on the CPU the EMA copy, counted
    from a model on the meta device; over the free memory the run stops with the numbers and the
    presets that fit, before it writes anything; under it the run starts."""
    with torch.device("meta"):
        params = sum(p.numel() for p in train.model_lib.Transformer(train.model_lib.preset("small")).parameters())
    c = train.SimpleNamespace(preset="small", moments_dtype="bfloat16")
    for moments, per in (("bfloat16", 4 + 4 + 2 * 2 + 4), ("float32", 4 + 4 + 2 * 4 + 4)):
        c.moments_dtype = moments
        need = params * per
        monkeypatch.setattr(train, "available_memory", lambda device: need - 1)
        with pytest.raises(SystemExit, match=rf"--preset=small: {params / 1e9:.2f}B parameters need {need / 1e9:.1f} "
                           rf"GB .* this cpu has {(need - 1) / 1e9:.1f} GB free\. Presets whose state fits: nano;"):
            train.check_fits(c, train.model_lib.preset("small"), torch.device("cpu"))
        monkeypatch.setattr(train, "available_memory", lambda device: need + 1)
        train.check_fits(c, train.model_lib.preset("small"), torch.device("cpu"))  # fits: no exit
    monkeypatch.setattr(train, "available_memory", lambda device: 10**6)  # 1 MB: not even TINY fits
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match="GB for weights, gradients and AdamW moments .* Presets whose state fits: none"):
        run(out, corpus, "--max_iters=2")
    assert not out.exists()
    monkeypatch.setattr(train, "available_memory", lambda device: None)  # unknown: no check
    assert run(out, corpus, "--max_iters=2", "--eval_interval=2")[-1]["step"] == 2


def test_adamw_with_fp32_moments_is_torch_adamw():
    """Our AdamW, its gradients clipped by the factor it applies as it reads them (train.py's
    step), against torch.optim.AdamW after torch.nn.utils.clip_grad_norm_."""
    torch.manual_seed(0)
    net = torch.nn.Linear(5, 8)
    copy = torch.nn.Linear(5, 8)
    copy.load_state_dict(net.state_dict())
    w, ref = list(net.parameters()), list(copy.parameters())
    ours = train.AdamW([dict(params=w[:1], weight_decay=0.1), dict(params=w[1:], weight_decay=0.0)], lr=1e-2,
                       betas=(0.9, 0.95), weight_decay=0.1, moments_dtype=torch.float32)
    theirs = torch.optim.AdamW([dict(params=ref[:1], weight_decay=0.1), dict(params=ref[1:], weight_decay=0.0)],
                               lr=1e-2, betas=(0.9, 0.95))
    clipped = 0
    for step in range(6):
        g = [torch.randn_like(p) * (3.0 if step % 2 else 0.1) for p in w]  # every other step above the clip
        for p, q, gi in zip(w, ref, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        norm = comm.grad_norm(net)
        torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(copy.parameters(), 2.0))
        clipped += norm.item() > 2.0
        ours.step(grad_scale=comm.clip_coefficient(norm, 2.0))
        theirs.step()
    assert clipped == 3
    for p, q in zip(w, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert ours.state[w[0]]["exp_avg"].dtype == torch.float32
    bf16 = train.AdamW([torch.zeros(3, requires_grad=True)], lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    bf16.param_groups[0]["params"][0].grad = torch.ones(3)
    bf16.step()
    assert bf16.state[bf16.param_groups[0]["params"][0]]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("moments", [torch.bfloat16, torch.float32])
def test_compiled_adamw_matches_the_foreach_one(moments):
    """The fused, compiled update (train.adamw_update) against the foreach twin: same weights and
    moments after steps with changing learning rates and shapes of several sizes and ranks."""
    shapes = [(64, 48), (48,), (3, 16, 8), (1,)]
    w = [torch.randn(*s, requires_grad=True) for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in w]
    make = lambda ps, compiled: train.AdamW(  # noqa: E731
        [dict(params=ps[:2], weight_decay=0.1), dict(params=ps[2:], weight_decay=0.0)], lr=1e-2,
        betas=(0.9, 0.95), weight_decay=0.1, moments_dtype=moments, compiled=compiled)
    fused, foreach = make(w, True), make(ref, False)
    for step in range(4):
        for opt in (fused, foreach):
            for group in opt.param_groups:
                group["lr"] = 1e-2 / (step + 1)
        for p, q in zip(w, ref):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        scale = torch.tensor(0.37) if step % 2 else None  # a clipping factor on every other step
        fused.step(grad_scale=scale)
        foreach.step(grad_scale=scale)
    for p, q in zip(w, ref):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = fused.state[p][key], foreach.state[q][key]
            assert a.dtype == b.dtype == moments
            # FP32: a few ulps of the moments' scale (about 0.1-1) from the order of the operations;
            # BF16: an FP32 value a few ulps off may round to a neighbouring BF16 value
            tol = dict(rtol=8e-3, atol=1e-6) if moments == torch.bfloat16 else dict(rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(a.float(), b.float(), **tol)


def test_sample_generates_from_a_trained_checkpoint(tmp_path, corpus, capsys):
    run(tmp_path, corpus, "--max_iters=4", "--eval_interval=4")
    sample.main([f"--ckpt={tmp_path / 'ckpt.pt'}", "--prompt=KING:", "--max_new_tokens=20", "--num_samples=2",
                 "--device=cpu", "--temperature=1.0", "--top_p=0.9"])
    out, err = capsys.readouterr()
    assert out.count("KING:") == 2
    n = int(re.search(r"(\d+) tokens in", err).group(1))
    assert 2 <= n <= 40  # up to 20 per sample, fewer if <|endoftext|> came first
    assert "tokens/s" in err

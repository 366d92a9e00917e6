"""train.py and sample.py end to end on a tiny model: learning, resuming, checkpoints, sampling."""

import json
import os
import re

import pytest
import torch

import data
import sample
import train

TINY = ["--dim=64", "--inter_dim=128", "--moe_inter_dim=32", "--n_layers=2", "--n_heads=2", "--q_lora_rank=32",
        "--kv_lora_rank=16", "--qk_nope_head_dim=16", "--qk_rope_head_dim=8", "--v_head_dim=16", "--vocab_size=512",
        "--init_std=0.02", "--batch_size=4", "--seq_len=32", "--eval_iters=2", "--log_interval=1", "--warmup_iters=3",
        "--compile=false", "--device=cpu"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    plays = data.corpus_text("shakespeare")
    for i, text in enumerate(plays[:3]):
        (root / f"play{i}.txt").write_text(text[:60_000])
    return [f"--data={root}/*.txt", f"--cache_dir={tmp_path_factory.mktemp('cache')}"]


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


def test_resume_reproduces_the_uninterrupted_run(tmp_path, corpus):
    common = ["--max_iters=8", "--eval_interval=4", "--lr=3e-3"]
    full = run(tmp_path / "full", corpus, *common)
    run(tmp_path / "split", corpus, *common, "--stop_iter=4")
    split = run(tmp_path / "split", corpus, *common, "--resume")
    train_steps = lambda log: {r["step"]: (r["loss"], r["main"], r["mtp"], r["balance"]) for r in log if "loss" in r}  # noqa: E731
    a, b = train_steps(full), train_steps(split)
    assert sorted(b) == list(range(1, 9))
    for step in range(5, 9):  # after the restart: the same numbers, bit for bit
        assert a[step] == b[step], (step, a[step], b[step])
    vals = lambda log: [(r["val_loss"], r["val_loss_ema"]) for r in log if "val_loss" in r]  # noqa: E731
    assert vals(full)[-1] == vals(split)[-1]  # the EMA was restored too
    ck_a = train.load_checkpoint(str(tmp_path / "full" / "ckpt.pt"))
    ck_b = train.load_checkpoint(str(tmp_path / "split" / "ckpt.pt"))
    for name, t in ck_a["model"].items():  # weights and router biases
        assert torch.equal(t, ck_b["model"][name]), name


def test_corrupt_or_foreign_checkpoints_are_refused(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train.load_checkpoint(path)
    torch.save(dict(model_args={}, model={}, step=3), path)
    data_bytes = open(path, "rb").read()
    open(path, "wb").write(data_bytes[: len(data_bytes) // 2])  # truncated, as by a crash mid-write
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        train.load_checkpoint(path)
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match="not a checkpoint written by train.py"):
        train.load_checkpoint(path)

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"model_args": Evil()}, path, _use_new_zipfile_serialization=True)
    with pytest.raises(ValueError, match="not a readable checkpoint"):  # weights_only refuses code
        train.load_checkpoint(path)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    train.save_checkpoint(path, dict(model_args={}, model={}, step=1))

    def crash(obj, f, *a, **k):
        open(f, "wb").write(b"half a checkpoint")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        train.save_checkpoint(path, dict(model_args={}, model={}, step=2))
    assert train.load_checkpoint(path)["step"] == 1  # the old checkpoint survived intact


def test_nan_stops_the_run_naming_step_and_quantity(tmp_path, corpus):
    with pytest.raises(FloatingPointError, match=r"step 1: non-finite loss, main"):
        run(tmp_path, corpus, "--max_iters=3", "--init_std=1e38")
    with pytest.raises(FloatingPointError, match="step 7: non-finite mtp"):
        train.check_finite(torch.tensor([1.0, 2.0, float("inf"), 0.1]), 7)


def test_bad_settings_name_the_key():
    with pytest.raises(SystemExit, match="unknown setting --batchsize"):
        train.main(["--batchsize=3"])
    with pytest.raises(SystemExit, match="--max_iters=ten: expected a int"):
        train.main(["--max_iters=ten"])
    with pytest.raises(SystemExit, match="--compile=maybe: expected one of auto, true, false"):
        train.main(["--compile=maybe"])
    with pytest.raises(SystemExit, match="--n_heads=two: expected a int"):
        train.main(["--n_heads=two"])
    with pytest.raises(SystemExit, match="unknown preset 'huge'"):
        train.main(["--preset=huge", "--device=cpu", "--out_dir=/nonexistent/never/created"])
    with pytest.raises(SystemExit, match="--preset=nano .*dim=192 .* multiple of 128 with fp8=True"):
        train.main(["--fp8=True", "--device=cpu", "--out_dir=/nonexistent/never/created"])


def test_adamw_with_fp32_moments_is_torch_adamw():
    torch.manual_seed(0)
    w = [torch.randn(8, 5, requires_grad=True), torch.randn(5, requires_grad=True)]
    ref = [p.detach().clone().requires_grad_() for p in w]
    ours = train.AdamW([dict(params=w[:1], weight_decay=0.1), dict(params=w[1:], weight_decay=0.0)], lr=1e-2,
                       betas=(0.9, 0.95), weight_decay=0.1, moments_dtype=torch.float32)
    theirs = torch.optim.AdamW([dict(params=ref[:1], weight_decay=0.1), dict(params=ref[1:], weight_decay=0.0)],
                               lr=1e-2, betas=(0.9, 0.95))
    for _ in range(5):
        g = [torch.randn_like(p) for p in w]
        for p, q, gi in zip(w, ref, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        ours.step()
        theirs.step()
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
        fused.step()
        foreach.step()
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

"""The model: MLA paths, the latent cache, YaRN, MTP, recompute, parameter counts (model.py)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

import model
from model import ModelArgs, Transformer


def tiny(**kw):
    base = dict(vocab_size=97, dim=48, inter_dim=64, moe_inter_dim=24, n_layers=3, n_dense_layers=1, n_heads=3,
                q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=12,
                n_routed_experts=8, n_shared_experts=1, n_activated_experts=2, n_expert_groups=4,
                n_limited_groups=2, route_scale=1.5, n_mtp=1, max_seq_len=64, init_std=0.1)
    return ModelArgs(**{**base, **kw})


def make(args, dtype=torch.float64):
    m = Transformer(args).to(dtype)
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.bias.normal_(std=0.05)
    return m.eval()


@pytest.mark.parametrize("q_lora_rank", [24, 0])
def test_causal(q_lora_rank):
    m = make(tiny(q_lora_rank=q_lora_rank))
    idx = torch.randint(0, 97, (2, 20))
    changed = idx.clone()
    changed[:, 13:] = torch.randint(0, 97, (2, 7))
    with torch.no_grad():
        a, b = m(idx), m(changed)
    torch.testing.assert_close(a[:, :13], b[:, :13], rtol=0, atol=1e-12)
    assert (a[:, 13:] - b[:, 13:]).abs().max() > 1e-3


@pytest.mark.parametrize("q_lora_rank", [24, 0])
@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_incremental_decode_matches_full_forward(impl, q_lora_rank, monkeypatch):
    monkeypatch.setattr(model, "attn_impl", impl)
    m = make(tiny(q_lora_rank=q_lora_rank))
    idx = torch.randint(0, 97, (3, 24))
    with torch.no_grad():
        full = m(idx)
        cache = m.new_cache(3, 24)
        steps = [m(idx[:, :9], cache=cache)]  # a prompt of 9, then chunks of 1 and 3 tokens
        pos = 9
        while pos < 24:
            n = 1 if pos % 2 else 3
            steps.append(m(idx[:, pos:pos + n], start_pos=pos, cache=cache))
            pos += n
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-9)


def test_absorbed_equals_naive_attention(monkeypatch):
    m = make(tiny())
    attn = m.layers[0].attn
    B, T, S = 2, 5, 11
    a = attn.args
    q_nope = torch.randn(B, T, a.n_heads, a.qk_nope_head_dim, dtype=torch.float64)
    q_rope = torch.randn(B, T, a.n_heads, a.qk_rope_head_dim, dtype=torch.float64)
    c_kv = torch.randn(B, S, a.kv_lora_rank, dtype=torch.float64)
    k_rope = torch.randn(B, S, a.qk_rope_head_dim, dtype=torch.float64)
    mask = torch.rand(T, S) > 0.3
    mask[:, 0] = True
    naive = attn.attend_naive(q_nope, q_rope, c_kv, k_rope, mask)
    absorbed = attn.attend_absorbed(q_nope, q_rope, c_kv, k_rope, mask)
    torch.testing.assert_close(absorbed, naive, rtol=1e-10, atol=1e-10)
    # the same logits from generation with either path
    idx = torch.randint(0, 97, (2, 7))
    outs = {}
    for impl in ("absorb", "naive"):
        monkeypatch.setattr(model, "attn_impl", impl)
        cache = m.new_cache(2, 12)
        with torch.no_grad():
            outs[impl] = torch.cat([m(idx, cache=cache), m(idx[:, :3], start_pos=7, cache=cache)], 1)
    torch.testing.assert_close(outs["absorb"], outs["naive"], rtol=1e-10, atol=1e-10)


def test_generate_over_the_cache_matches_greedy_full_forward():
    m = make(tiny())
    prompt = torch.randint(0, 97, (2, 5))
    with torch.no_grad():
        got = torch.stack(list(m.generate(prompt, 12, temperature=0)), 1)  # (B, 12)
        seq = prompt
        for _ in range(12):  # the slow twin: the whole sequence through the model every time
            seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(got, seq[:, 5:])
    with torch.no_grad():  # at max_seq_len generation stops instead of overflowing the cache
        assert len(list(m.generate(torch.randint(0, 97, (1, 60)), 20, temperature=0))) == 5


def test_cache_holds_only_latent_and_rope_key():
    args = model.preset("v3")
    with torch.device("meta"):
        m = Transformer(model.preset("nano"))
    cache = m.new_cache(1, 8)
    assert set(cache[0]) == {"c_kv", "k_rope"}
    assert args.kv_lora_rank + args.qk_rope_head_dim == 576  # numbers per token per layer at V3 shapes
    assert cache[0]["c_kv"].shape[-1] + cache[0]["k_rope"].shape[-1] == 64 + 16


def test_yarn_frequencies_follow_the_formula():
    args = model.preset("v3")
    base = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    freqs = model.rope_frequencies(args)
    # the correction range from the paper's formula: d * ln(L / (2 pi beta)) / (2 ln base)
    low = math.floor(64 * math.log(4096 / (2 * math.pi * 32)) / (2 * math.log(10000)))
    high = math.ceil(64 * math.log(4096 / (2 * math.pi * 1)) / (2 * math.log(10000)))
    assert (low, high) == (10, 23) == model.yarn_correction_range(args, 64)
    torch.testing.assert_close(freqs[:11], base[:11], rtol=0, atol=0)  # dims up to 10 keep their frequency
    torch.testing.assert_close(freqs[23:], base[23:] / 40, rtol=1e-15, atol=0)  # from 23 on fully interpolated
    ramp = (torch.arange(11, 23, dtype=torch.float64) - 10) / 13
    torch.testing.assert_close(freqs[11:23], base[11:23] * (1 - ramp) + base[11:23] / 40 * ramp)
    # attention temperature: sqrt(1/t) = 0.1 ln(s) + 1 on both q and k
    assert model.softmax_scale(args) == pytest.approx((0.1 * math.log(40) + 1) ** 2 / math.sqrt(192))
    # within the original context nothing changes
    short = model.preset("nano")
    assert short.max_seq_len <= short.original_seq_len
    assert model.softmax_scale(short) == pytest.approx(1 / math.sqrt(48))


def test_rope_rotates_interleaved_pairs():
    x = torch.randn(1, 3, 2, 8, dtype=torch.float64)
    angles = torch.rand(3, 4, dtype=torch.float64)
    out = model.apply_rope(x, angles.cos(), angles.sin())
    z = torch.view_as_complex(x.view(1, 3, 2, 4, 2)) * torch.polar(torch.ones_like(angles), angles)[:, None]
    torch.testing.assert_close(out, torch.view_as_real(z).flatten(-2))


def test_mtp_losses_use_targets_shifted_by_k_plus_one():
    m = make(tiny(n_mtp=2))
    tokens = torch.randint(0, 97, (2, 17))
    idx, targets = tokens[:, :-1], tokens[:, 1:]
    with torch.no_grad():
        logits, losses = m(idx, targets, lam=0.5)
        # the equations written out: depth k at position i sees h^{k-1}_i and t_{i+k}, predicts t_{i+k+1}
        T = idx.shape[1]
        h, emb = m.embed(idx), m.embed(idx)
        for layer in m.layers:
            h = layer(h, m.cos[:T], m.sin[:T])
        main = F.cross_entropy(m.head(m.norm(h)).flatten(0, 1), tokens[:, 1:].flatten())
        per_depth = []
        for k in (1, 2):
            mod = m.mtp[k - 1]
            h = mod(h[:, :T - k], emb[:, k:T], m.cos[:T - k], m.sin[:T - k])
            per_depth.append(F.cross_entropy(m.head(mod.norm(h)).flatten(0, 1), tokens[:, k + 1:].flatten()))
    torch.testing.assert_close(losses["main"], main)
    torch.testing.assert_close(losses["mtp"], (per_depth[0] + per_depth[1]) / 2)
    torch.testing.assert_close(losses["loss"], main + 0.5 / 2 * sum(per_depth) + losses["balance"])
    assert losses["balance"] > 0


def test_mtp_never_sees_the_token_it_predicts():
    m = make(tiny(n_mtp=1))
    idx = torch.randint(0, 97, (1, 12))
    targets = torch.full_like(idx, -1)
    targets[0, 5] = 3  # depth 1 at position 4 predicts t_6 = targets[5]; position 5's input is t_6
    with torch.no_grad():
        _, a = m(idx, targets)
        changed = idx.clone()
        changed[0, 6:] = (changed[0, 6:] + 1) % 97  # t_6 and later; the main loss at 5 must not move
        _, b = m(changed, targets)
    torch.testing.assert_close(a["main"], b["main"], rtol=0, atol=1e-12)
    torch.testing.assert_close(a["mtp"], b["mtp"], rtol=0, atol=1e-12)


def test_recompute_gives_the_same_gradients():
    args = tiny()
    torch.manual_seed(1)
    ref = make(args).train()
    other = make(ModelArgs(**{**args.__dict__, "recompute": True})).train()
    other.load_state_dict(ref.state_dict())
    tokens = torch.randint(0, 97, (2, 21))
    for m in (ref, other):
        _, losses = m(tokens[:, :-1], tokens[:, 1:])
        losses["loss"].backward()
    for (name, a), (_, b) in zip(ref.named_parameters(), other.named_parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-10, atol=1e-12, msg=name)
    assert sum(p.grad.abs().sum() for p in ref.parameters()) > 0


def test_count_params_v3_and_v2_lite():
    v3 = model.count_params(model.preset("v3"))
    assert round(v3["total"] / 1e9) == 671  # the report: 671B total
    assert round(v3["activated"] / 1e9) == 37  # ... 37B activated per token
    assert 11e9 < v3["mtp"] < 14e9  # one MTP module: a full MoE block plus M_k and norms
    lite = model.count_params(model.preset("v2-lite"))
    assert round(lite["total"] / 1e8) == 157 and 2.4e9 <= lite["activated"] < 2.5e9  # 15.7B / 2.4B
    nano = model.count_params(model.preset("nano"))
    with torch.device("meta"):
        m = Transformer(model.preset("nano"))
    assert nano["total"] + nano["mtp"] == sum(p.numel() for p in m.parameters())


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        tiny(qk_rope_head_dim=5)
    with pytest.raises(ValueError, match="n_dense_layers"):
        tiny(n_dense_layers=4)
    with pytest.raises(ValueError, match="n_heads"):
        tiny(n_heads=0)
    m = make(tiny())
    with pytest.raises(ValueError, match="max_seq_len"):
        m(torch.zeros(1, 65, dtype=torch.long))


def test_training_cost_by_hand(capsys):
    """model.py's cost printout on nano: FLOPs per token counted from the built model's parameters
    (6 per activated weight, each MTP module with the output head once more, causal attention at 4K),
    then the totals, the MFU the report's hours imply and the hours at a given MFU, by hand."""
    import random
    args = model.preset("nano")
    m = model.Transformer(args)
    K_over_E = args.n_activated_experts / args.n_routed_experts
    weights = lambda named: sum(p.numel() * (K_over_E if ".experts." in n else 1) for n, p in named)  # noqa: E731
    main = weights((n, p) for n, p in m.named_parameters() if not n.startswith(("mtp.", "embed.")))
    mtp = weights((n, p) for n, p in m.named_parameters() if n.startswith("mtp.")) + args.n_mtp * m.head.weight.numel()
    heads = args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim)
    attention = (args.n_layers + args.n_mtp) * 6 * heads * 4096 / 2
    per_token = 6 * (main + mtp) + attention
    tokens, mfu = random.randint(10**9, 10**12), round(random.uniform(0.1, 0.6), 3)
    cost = model.training_cost(args, tokens, mfu)
    assert cost["flops_per_token"] == pytest.approx(per_token, rel=1e-12)
    assert cost["total_flops"] == pytest.approx(per_token * tokens, rel=1e-12)
    seconds = 2.664e6 * 3600
    assert cost["mfu_bf16"] == pytest.approx(per_token * tokens / (seconds * 989.5e12), rel=1e-12)
    assert cost["mfu_fp8"] == pytest.approx(cost["mfu_bf16"] / 2, rel=1e-3)  # 1979 = 2 x 989.5
    hours = per_token * tokens / (mfu * 989.5e12) / 3600
    assert cost["gpu_hours_at_mfu"] == pytest.approx(hours, rel=1e-12)
    model.main(["nano", f"--tokens={tokens}", f"--mfu={mfu}"])
    printed = capsys.readouterr().out
    assert f"training FLOPs per token: {per_token:.4g}" in printed
    assert f"at MFU {mfu:.1%} of BF16: {hours:,.0f} H800 GPU-hours" in printed
    assert "report's" not in printed  # the report's hours are v3's only
    model.main(["v3"])
    v3 = model.training_cost(model.preset("v3"), 14.8e12)
    assert f"mean a sustained MFU of {v3['mfu_bf16']:.1%} of the dense BF16 rate" in capsys.readouterr().out
    for bad, message in [("--mfu=0", "--mfu=0: expected a fraction in (0, 1]"), ("--tokens=x", "--tokens=x: expected a number"),
                         ("--size=3", "usage: python model.py")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            model.main(["nano", bad])

"""DeepSeekMoE: routing, bias, group limits, grouped GEMM, balance loss (moe.py)."""

import pytest
import torch

import model
import moe
from model import ModelArgs


def moe_args(**kw):
    base = dict(dim=64, moe_inter_dim=32, n_routed_experts=16, n_shared_experts=1, n_activated_experts=4,
                n_expert_groups=4, n_limited_groups=2, route_scale=2.5)
    return ModelArgs(**{**base, **kw})


def kept_groups_reference(biased, n_groups, topk_groups):
    """Group choice written the slow way: score each group by its two best biased affinities."""
    N, E = biased.shape
    kept = []
    for t in range(N):
        scores = [sorted(biased[t, g * E // n_groups:(g + 1) * E // n_groups].tolist())[-2:] for g in range(n_groups)]
        order = sorted(range(n_groups), key=lambda g: -sum(scores[g]))
        kept.append(set(order[:topk_groups]))
    return kept


def test_gates_sum_to_route_scale_and_are_unbiased_affinities():
    gate = moe.Gate(moe_args())
    torch.nn.init.normal_(gate.weight, std=0.5)
    gate.bias.normal_(std=0.3)
    h = torch.randn(200, 64)
    s, idx, g = gate(h)
    torch.testing.assert_close(g.sum(-1), torch.full((200,), 2.5), rtol=1e-6, atol=1e-6)
    s_chosen = s.gather(1, idx)
    torch.testing.assert_close(g, s_chosen / s_chosen.sum(-1, keepdim=True) * 2.5)
    assert idx.unique(dim=1).shape == idx.shape  # K distinct experts per token


def test_bias_changes_choice_but_not_gate_values_of_a_choice():
    gate = moe.Gate(moe_args(n_expert_groups=1, n_limited_groups=1))
    torch.nn.init.normal_(gate.weight, std=0.5)
    h = torch.randn(300, 64)
    s = gate.affinities(h)
    idx0, g0 = gate.route(s)
    gate.bias[3] = 10.0  # expert 3 now wins every selection
    idx1, g1 = gate.route(s)
    assert (idx1 == 3).any(-1).all()
    changed = (idx0.sort(-1).values != idx1.sort(-1).values).any(-1)
    assert changed.sum() > 100  # the choice moved for most tokens...
    same = ~changed
    assert same.sum() > 0
    # ...but for a token whose choice did not move, the gates are exactly the same numbers.
    torch.testing.assert_close(g0[same].gather(1, idx0[same].argsort(-1)), g1[same].gather(1, idx1[same].argsort(-1)))
    # and gates are always the unbiased affinities of the chosen experts, renormalized
    chosen = s.gather(1, idx1)
    torch.testing.assert_close(g1, chosen / chosen.sum(-1, keepdim=True) * gate.route_scale)


def test_group_limiting_never_selects_outside_kept_groups():
    args = moe_args(n_routed_experts=32, n_expert_groups=8, n_limited_groups=3, n_activated_experts=6)
    gate = moe.Gate(args)
    torch.nn.init.normal_(gate.weight, std=1.0)
    gate.bias.normal_(std=0.2)
    h = torch.randn(500, 64)
    s, idx, _ = gate(h)
    kept = kept_groups_reference(s + gate.bias, 8, 3)
    per_group = 32 // 8
    for t in range(500):
        assert {e // per_group for e in idx[t].tolist()} <= kept[t]
    # and within the kept groups the top-6 biased scores are chosen
    biased = s + gate.bias
    for t in range(0, 500, 50):
        eligible = [e for e in range(32) if e // per_group in kept[t]]
        best = sorted(eligible, key=lambda e: -biased[t, e].item())[:6]
        assert set(best) == set(idx[t].tolist())


ROUTE_DEVICES = (["cuda"] if torch.cuda.is_available() else []) + (["cpu"] if moe.fp8.INTERPRET else [])


@pytest.mark.parametrize("E, G, TOPK_G, K", [(256, 8, 4, 8), (64, 1, 1, 6), (8, 2, 2, 2)])
def test_fused_router_kernel_compiles_for_hopper_without_spills(sm90, E, G, TOPK_G, K):
    """The router kernel at V3's routing (256 experts, 8 groups, top 4 groups, top 8), small's and
    nano's, compiled for sm_90 here (tests/conftest.py): no spills, no ptxas advisory."""
    u = sm90(moe._route_topk_kernel, dict(s_ptr="*fp32", bias_ptr="*fp32", idx_ptr="*i64"),
             dict(E=E, G=G, TOPK_G=TOPK_G, K=K, BLOCK_N=32), 4, 3)
    assert u["stack"] == 0 and u["regs"] <= 255 and "Performance Loss" not in u["ptxas"], u["regs"]


@pytest.mark.parametrize("device", ROUTE_DEVICES or [pytest.param("none", marks=pytest.mark.skip(
    reason="needs CUDA, or TRITON_INTERPRET=1 with Triton installed"))])
@pytest.mark.parametrize("E, G, M, K", [(64, 8, 4, 6), (256, 8, 4, 8), (8, 4, 2, 2), (64, 1, 1, 6), (16, 2, 1, 3)])
def test_fused_router_kernel_chooses_what_torch_does(device, E, G, M, K, monkeypatch):
    """route_impl="triton" (one kernel: bias, group scores, best groups, top K) against Gate.choose
    (three torch.topk calls), on random affinities and bias, a token count that is not a multiple
    of the kernel's rows: the same experts in the same order (best first), hence the same gates;
    the group limit holds (checked the slow way on some tokens)."""
    args = moe_args(dim=64, n_routed_experts=E, n_expert_groups=G, n_limited_groups=M, n_activated_experts=K)
    gate = moe.Gate(args).to(device)
    gate.bias.normal_(std=0.05)
    s = torch.sigmoid(torch.randn(1001, E, device=device))
    monkeypatch.setattr(moe, "route_impl", "torch")  # the default, "auto", is the kernel on a GPU
    idx_ref, g_ref = gate.route(s)
    monkeypatch.setattr(moe, "route_impl", "triton")
    idx, g = gate.route(s)
    assert idx.dtype == torch.int64 and torch.equal(idx, idx_ref)
    torch.testing.assert_close(g, g_ref, rtol=0, atol=0)
    kept = kept_groups_reference((s + gate.bias)[:40].cpu(), G, M)
    assert all({e // (E // G) for e in idx[t].tolist()} <= kept[t] for t in range(40))


def test_grouped_experts_match_per_expert_loop(monkeypatch):
    experts = moe.Experts(8, 64, 48)
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.1)
    counts = torch.tensor([5, 0, 17, 1, 0, 9, 30, 2])  # uneven, with empty experts
    x = torch.randn(int(counts.sum()), 64, requires_grad=True)
    r = torch.randn(x.shape[0], 64)  # a fixed random upstream gradient
    results = {}
    for impl in ("grouped", "loop"):
        monkeypatch.setattr(moe, "expert_impl", impl)
        x.grad = None
        experts.zero_grad()
        y = experts(x, counts)
        (y * r).sum().backward()
        results[impl] = (y.detach(), x.grad.clone(), [p.grad.clone() for p in experts.parameters()])
    yg, xg, wg = results["grouped"]
    yl, xl, wl = results["loop"]
    torch.testing.assert_close(yg, yl, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xg, xl, rtol=1e-5, atol=1e-5)
    for a, b in zip(wg, wl):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_dispatch_combine_round_trip():
    d = moe.LocalDispatcher(6)
    h = torch.randn(10, 4)
    idx = torch.stack([torch.randperm(6)[:3] for _ in range(10)])
    x, counts, handle = d.dispatch(h, idx)
    assert counts.tolist() == torch.bincount(idx.flatten(), minlength=6).tolist()
    # rows arrive grouped by expert, in expert order
    expert_of_row = torch.repeat_interleave(torch.arange(6), counts)
    torch.testing.assert_close(x, h[torch.arange(10).repeat_interleave(3)][handle.order])
    assert (idx.flatten()[handle.order] == expert_of_row).all()
    back = d.combine(x, handle).view(10, 3, 4)
    torch.testing.assert_close(back, h.unsqueeze(1).expand(10, 3, 4))
    # with the gates, combine returns the routed sum: sum_k g_tk y_tk
    g = torch.rand(10, 3)
    x, _, handle = d.dispatch_async(h, idx, g)()
    y = x * torch.arange(1, 31.0).unsqueeze(-1)  # expert outputs that differ per row
    per_pair = d.combine(y, moe.LocalHandle(handle.order, None)).view(10, 3, 4)
    torch.testing.assert_close(d.combine(y, handle), (per_pair * g.unsqueeze(-1)).sum(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_replicated_rows_match_indexing_forward_and_backward(dtype):
    """ReplicateRows (a gather-and-sum backward) against plain indexing (a scatter-add backward)."""
    N, K, D = 37, 3, 5
    order = torch.randperm(N * K)
    h = torch.randn(N, D, dtype=torch.float64)
    dx = torch.randn(N * K, D, dtype=torch.float64)
    fast, plain = (h.clone().to(dtype).requires_grad_() for _ in range(2))
    x = moe.replicate_rows(fast, order, K)
    assert torch.equal(x, plain[order // K])
    x.backward(dx.to(dtype))
    plain[order // K].backward(dx.to(dtype))
    assert fast.grad.dtype == dtype
    by_hand = torch.zeros(N, D, dtype=torch.float64).index_add_(0, order // K, dx.to(dtype).double())
    if dtype == torch.float64:
        torch.testing.assert_close(fast.grad, plain.grad, rtol=0, atol=1e-12)
        torch.testing.assert_close(fast.grad, by_hand, rtol=0, atol=1e-12)
    else:  # the K rows summed in FP32 and rounded once: within half a BF16 step of the exact sum
        assert ((fast.grad.double() - by_hand).abs() <= by_hand.abs() * 2 ** -8 + 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_gather_matches_the_scatter(dtype):
    """combine puts the rows back by a gather (UnsortRows: y[position], backward dy[order]); its twin
    is the scatter index_copy_(0, order, y) under autograd. A permutation either way: the routed sum,
    and the gradients of y and of the gates, are the same bits."""
    N, K, D = 41, 3, 6
    order = torch.randperm(N * K)
    y0, g0, dout = torch.randn(N * K, D), torch.rand(N, K), torch.randn(N, D)
    handle = moe.LocalHandle(order, None)
    assert torch.equal(handle.position[order], torch.arange(N * K))
    outs = []
    for fast in (True, False):
        y, g = y0.to(dtype).requires_grad_(), g0.clone().requires_grad_()
        rows = moe.unsort_rows(y, order, handle.position) if fast else torch.empty_like(y).index_copy(0, order, y)
        out = (rows.view(N, K, D) * g.unsqueeze(-1).to(dtype)).sum(1)
        out.backward(dout.to(dtype))
        outs.append((out, y.grad, g.grad))
    for a, b in zip(*outs):
        assert a.dtype == b.dtype and torch.equal(a, b)
    d = moe.LocalDispatcher(8)                                   # and the dispatcher's own combine
    x, _, handle = d.dispatch(torch.randn(N, D), torch.stack([torch.randperm(8)[:K] for _ in range(N)]))
    assert torch.equal(d.combine(x, handle), torch.empty_like(x).index_copy_(0, handle.order, x))


def test_bias_update_sign_and_size():
    layer = moe.MoE(moe_args(n_routed_experts=4, n_expert_groups=1, n_limited_groups=1, n_activated_experts=2))
    layer.gate.bias.copy_(torch.tensor([0.1, -0.2, 0.0, 0.3]))
    layer.load.copy_(torch.tensor([10.0, 2.0, 6.0, 6.0]))  # mean 6
    maxvio = moe.update_bias([layer], gamma=0.001)
    torch.testing.assert_close(layer.gate.bias, torch.tensor([0.1 - 0.001, -0.2 + 0.001, 0.0, 0.3]))
    assert isinstance(maxvio, torch.Tensor) and maxvio.shape == (1,)  # a tensor: nothing read on the host
    assert maxvio.item() == pytest.approx(10 / 6 - 1, rel=1e-12)
    assert layer.load.sum() == 0  # counting restarts for the next step
    # all_reduce sees the local counts and its result drives the update
    layer.load.copy_(torch.tensor([1.0, 1.0, 1.0, 5.0]))
    moe.update_bias([layer], gamma=0.5, all_reduce=lambda t: t.mul_(2))
    torch.testing.assert_close(layer.gate.bias, torch.tensor([0.1 - 0.001 + 0.5, -0.2 + 0.001 + 0.5, 0.5, 0.3 - 0.5]))
    # the step's summed load and the run's sum, as integers
    assert layer.last_load.tolist() == [2, 2, 2, 10] and layer.run_load.tolist() == [12, 4, 8, 16]
    assert moe.maxvio(layer.run_load).item() == pytest.approx(16 / 10 - 1, rel=1e-12)
    # nothing routed: MaxVio 0, not nan
    assert moe.update_bias([layer], gamma=0.5).tolist() == [0.0]


def test_balance_loss_by_hand():
    # one sequence, T=2 tokens, E=3 experts, K=1
    s = torch.tensor([[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]])
    idx = torch.tensor([[[0], [2]]])
    # f_i = E / (K T) * count_i = 1.5 * [1, 0, 1];  s' rows already sum to 1, P = mean = [0.3, 0.2, 0.5]
    expected = 0.01 * (1.5 * 0.3 + 0 * 0.2 + 1.5 * 0.5)
    got = moe.sequence_balance_loss(s, idx, alpha=0.01)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # batch of two: the mean of the two sequences' losses; unnormalized s is normalized first
    s2 = torch.tensor([[[1.0, 1.0, 2.0], [3.0, 0.5, 0.5]]])
    idx2 = torch.tensor([[[1], [1]]])
    f2 = torch.tensor([0.0, 3.0, 0.0])
    P2 = torch.tensor([0.25 * 0.5 + 0.75 * 0.5, 0.25 * 0.5 + 0.125 * 0.5, 0.5 * 0.5 + 0.125 * 0.5])
    both = moe.sequence_balance_loss(torch.cat([s, s2]), torch.cat([idx, idx2]), alpha=0.01)
    assert both.item() == pytest.approx((expected + 0.01 * (f2 * P2).sum().item()) / 2, rel=1e-6)


def test_gradients_reach_every_expert_that_got_tokens():
    args = moe_args()
    layer = moe.MoE(args)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    layer.gate.bias[[5, 11]] = -10.0  # two experts that no token will choose
    x = torch.randn(2, 6, 64)
    layer(x).square().sum().backward()
    got_tokens = layer.load > 0
    assert not got_tokens[[5, 11]].any() and got_tokens.sum() >= 4
    grad_norm = layer.experts.w1.grad.flatten(1).norm(dim=1)
    assert (grad_norm[got_tokens] > 0).all()
    assert (grad_norm[~got_tokens] == 0).all()
    assert layer.gate.weight.grad.abs().sum() > 0  # the gates carry gradient to the router
    assert layer.gate.bias.grad is None  # the bias is a buffer: never trained


def test_load_counts_and_maxvio_of_a_moe_layer():
    args = moe_args(n_expert_groups=1, n_limited_groups=1)
    layer = moe.MoE(args)
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(3, 10, 64)
    layer(x)
    layer(x)
    assert layer.load.sum() == 2 * 30 * 4  # two micro-batches, 30 tokens, K=4
    expected = (layer.load.double().max() / layer.load.double().mean() - 1).item()
    assert moe.update_bias([layer], gamma=0.0)[0].item() == pytest.approx(expected, rel=1e-12)


def test_bad_routing_arguments_name_the_argument():
    with pytest.raises(ValueError, match="n_activated_experts"):
        moe_args(n_routed_experts=16, n_expert_groups=4, n_limited_groups=1, n_activated_experts=5)
    with pytest.raises(ValueError, match="n_expert_groups"):
        moe_args(n_routed_experts=16, n_expert_groups=5)
    with pytest.raises(ValueError, match="n_limited_groups"):
        moe_args(n_expert_groups=4, n_limited_groups=5)
    with pytest.raises(ValueError, match="unknown ModelArgs key"):
        ModelArgs.from_dict(dict(dim=64, n_experts=3))
    with pytest.raises(ValueError, match="allowed"):
        model.preset("huge")

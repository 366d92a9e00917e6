"""--balance=bias|aux|none (moe.py): each choice's loss and bias update do what its equation says."""

import os

import pytest
import torch

import checkpoint
import moe
import train
from model import ModelArgs
from test_train import TINY, run


def layer_of(balance, **kw):
    args = ModelArgs(dim=32, moe_inter_dim=16, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                     n_expert_groups=1, n_limited_groups=1, balance=balance, aux_alpha=0.01, **kw)
    layer = moe.MoE(args).double()
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return layer


def test_aux_loss_and_its_router_gradient_by_hand():
    """L = alpha sum_i f_i P_i over all N tokens of the batch, f_i = E/(K N) count_i (no gradient),
    P_i = mean_t s_it / sum_j s_jt; its gradient on the centroids e_i derived by hand, in float64."""
    layer = layer_of("aux")
    B, T, D, E, K, alpha = 3, 7, 32, 8, 2, 0.01
    x = torch.randn(B * T, D, dtype=torch.float64)
    _, idx, _ = layer.route(x, B)
    layer.balance_loss.backward()
    W = layer.gate.weight.detach()
    h = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + layer.args.norm_eps) * layer.norm.weight.detach()
    s = torch.sigmoid(h @ W.T)  # (N, E)
    assert torch.equal(idx.sort(-1).values, s.topk(K, -1).indices.sort(-1).values)  # bias 0: plain top-K
    N = B * T
    f = torch.bincount(idx.flatten(), minlength=E).double() * E / (K * N)
    S = s.sum(-1, keepdim=True)  # (N, 1)
    expected = alpha * (f * (s / S).mean(0)).sum()
    # dL/ds_jt = alpha/N (f_j / S_t - sum_i f_i s_it / S_t^2); ds/dz = s (1 - s); z = h W^T
    dL_ds = alpha / N * (f / S - (s * f).sum(-1, keepdim=True) / S ** 2)
    expected_grad = (dL_ds * s * (1 - s)).T @ h  # (E, D)
    torch.testing.assert_close(layer.balance_loss, expected, rtol=1e-12, atol=0)
    assert layer.gate.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.gate.weight.grad, expected_grad, rtol=1e-10, atol=1e-16)
    # over the whole batch, not per sequence: one sequence of all N tokens gives the same number
    pooled = moe.sequence_balance_loss(s.view(1, N, E), idx.view(1, N, K), alpha)
    per_sequence = moe.sequence_balance_loss(s.view(B, T, E), idx.view(B, T, K), alpha)
    torch.testing.assert_close(layer.balance_loss.detach(), pooled, rtol=1e-12, atol=0)
    assert abs(per_sequence - pooled) > 1e-6


def test_each_choice_adds_its_own_loss():
    x = torch.randn(2 * 5, 32, dtype=torch.float64)
    losses = {}
    for balance in ("bias", "aux", "none"):
        torch.manual_seed(0)
        layer = layer_of(balance)
        _, idx, _ = layer.route(x, 2)
        losses[balance] = layer.balance_loss
        s = layer.gate.affinities(layer.norm(x))
    assert losses["none"].item() == 0.0 and not losses["none"].requires_grad
    want = moe.sequence_balance_loss(s.view(2, 5, -1), idx.view(2, 5, -1), 1e-4)  # eqs. 17-20, balance_alpha
    torch.testing.assert_close(losses["bias"], want, rtol=1e-12, atol=0)
    want = moe.sequence_balance_loss(s.view(1, 10, -1), idx.view(1, 10, -1), 0.01)  # the whole batch, aux_alpha
    torch.testing.assert_close(losses["aux"], want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("balance", ["aux", "none"])
def test_aux_and_none_leave_the_bias_at_zero(tmp_path, corpus, balance):
    """Through train.py: the router biases of every MoE layer exactly 0 after training steps; the
    logged balance loss 0 exactly for none, the expert-level loss for aux; gamma logged as 0."""
    log = run(tmp_path, corpus, "--max_iters=3", "--eval_interval=3", f"--balance={balance}")
    _, tensors = checkpoint.load(str(tmp_path / "ckpt.pt"))
    biases = {n: t for n, t in tensors["model"].items() if n.endswith("gate.bias")}
    assert len(biases) == 2  # the MoE block of the main model and the MTP module's
    assert all(torch.equal(b, torch.zeros(8)) for b in biases.values())
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 3 and all(r["gamma"] == 0.0 for r in steps)
    if balance == "none":
        assert all(r["balance"] == 0.0 for r in steps)
    else:  # two layers, each about alpha when balanced, more when not: alpha * E * sum_i f_i P_i / E
        assert all(2 * 0.001 * 0.9 < r["balance"] < 2 * 0.001 * 8 for r in steps)
    assert log[0]["model_args"]["balance"] == balance


def test_bias_moves_the_bias(tmp_path, corpus):
    run(tmp_path, corpus, "--max_iters=3", "--eval_interval=3", "--bias_gamma=0.01")
    _, tensors = checkpoint.load(str(tmp_path / "ckpt.pt"))
    for n, b in tensors["model"].items():
        if n.endswith("gate.bias"):  # three steps of +-0.01 (or 0 where a load sat at the mean): odd unless so
            k = (b / 0.01).round()
            torch.testing.assert_close(b, k * 0.01, rtol=0, atol=1e-6)
            assert k.abs().max() <= 3 and k.abs().sum() > 0


def test_bad_balance_is_refused_in_one_line(tmp_path):
    with pytest.raises(SystemExit, match="^--balance=sometimes: expected one of bias, aux, none$"):
        train.main(TINY + ["--balance=sometimes", f"--out_dir={tmp_path}"])
    with pytest.raises(ValueError, match="balance='sometimes' is not allowed"):
        ModelArgs(balance="sometimes")
    assert not os.listdir(tmp_path)

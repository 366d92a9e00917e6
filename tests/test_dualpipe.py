"""DualPipe's schedule as data, 1F1B, and the simulator (dualpipe.py). Pure Python, no tensors."""

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import dualpipe
from dualpipe import Deadlock, schedule, schedule_1f1b, simulate, table2_bubble

SIZES = [(pp, c) for pp in (2, 4, 6, 8) for c in sorted({2 * pp, 2 * pp + 2, 3 * pp, 4 * pp})]


def parse(row):
    """'0F0 0F3+1B1 0W2' -> [(("F", 0, 0),), (("F", 0, 3), ("B", 1, 1)), (("W", 0, 2),)]"""
    return [tuple((cell[1], int(cell[0]), int(cell[2:])) for cell in step.split("+")) for step in row.split()]


def times(F, B, W, FB):
    return {"F": F, "B": B, "W": W, "F&B": FB}


def half_rank(rank, pp):
    return min(rank, pp - 1 - rank)


# The order of deepseek-ai/DualPipe's DualPipe.step() (dualpipe/dualpipe.py), worked out by hand from
# its eight phase loops for PP=4, 10 micro-batches: half_rank = min(rank, 3 - rank), phase 0 is
# direction 0 on ranks 0-1 and direction 1 on ranks 2-3, the loop counts are step_1 = 2(1 - half_rank),
# step_2 = half_rank + 1, step_3 = 1 - half_rank, step_4 = 5 - 4 + half_rank + 1 (its first pair split
# on the middle ranks 1 and 2), step_5 = 1 - half_rank, step_6 = half_rank + 1 (zero bubble switched on
# at i = step_6 // 2: before B1 for odd half_rank, between B1 and B0 for even), step_7 = 1 - half_rank,
# step_8 = half_rank + 1; W pops the weight-gradient queue in FIFO order.
DEEPSEEK_PP4_C10 = [
    "0F0 0F1  0F2 1F0  1B0 1W0 1F1  0F3+1B1 1F2+0B0 0F4+1B2 1F3+0B1  1B3 1F4+0B2  1B4 0B3  0W3 0B4  0W4",
    "0F0 1F0 0F1 1F1  0F2 1B0 1F2+0B0 0F3+1B1 1F3+0B1 0F4+1B2 1F4+0B2  1B3 0B3 1B4 0B4  1W4 0W4",
    "1F0 0F0 1F1 0F1  1F2 0B0 0F2+1B0 1F3+0B1 0F3+1B1 1F4+0B2 0F4+1B2  0B3 1B3 0B4 1B4  0W4 1W4",
    "1F0 1F1  1F2 0F0  0B0 0W0 0F1  1F3+0B1 0F2+1B0 1F4+0B2 0F3+1B1  0B3 0F4+1B2  0B4 1B3  1W3 1B4  1W4",
]
# PP=2, 4 micro-batches: both ranks are middle ranks (half_rank 0): step_2 = 1, step_4 = 1 (split),
# step_6 = 1 (zero bubble on between B1 and B0), step_8 = 1; steps 1, 3, 5, 7 are empty.
DEEPSEEK_PP2_C4 = ["0F0 1F0  0F1 1B0 1F1+0B0  1B1 0B1  0W1",
                   "1F0 0F0  1F1 0B0 0F1+1B0  0B1 1B1  1W1"]


def test_schedule_is_deepseeks_order_pp4_chunks10():
    assert schedule(4, 10) == [parse(row) for row in DEEPSEEK_PP4_C10]


def test_schedule_is_deepseeks_order_pp2_chunks4():
    assert schedule(2, 4) == [parse(row) for row in DEEPSEEK_PP2_C4]


def test_module_docstring_draws_the_pp4_schedule():
    rows = [[], [], [], []]                 # drawn in two blocks, phases 1-4 and 5-8
    for line in dualpipe.__doc__.splitlines():
        if line.split()[:1] == ["rank"]:
            rows[int(line.split()[1])] += line.split()[2:]
    assert rows == [["+".join(map(dualpipe.label, s)) for s in steps] for steps in schedule(4, 10)]


@pytest.mark.parametrize("pp, c", SIZES)
def test_every_rank_runs_F_and_B_once_per_chunk_of_both_its_stages(pp, c):
    every_chunk = Counter((d, i) for d in (0, 1) for i in range(c // 2))
    for steps in schedule(pp, c):
        for kind in "FB":
            assert Counter(a[1:] for s in steps for a in s if a[0] == kind) == every_chunk


@pytest.mark.parametrize("pp, c", SIZES)
def test_W_once_for_each_deferred_B_and_after_it(pp, c):
    for rank, steps in enumerate(schedule(pp, c)):
        actions = [a for s in steps for a in s]
        ws = [a[1:] for a in actions if a[0] == "W"]
        assert len(ws) == len(set(ws)) == pp - 1 - half_rank(rank, pp)   # steps 3, 7 and 8 of DeepSeek's loop
        for w in ws:
            assert actions.index(("B", *w)) < actions.index(("W", *w))
        # a B in an overlapped pair never defers its W
        assert not {a[1:] for s in steps if len(s) == 2 for a in s if a[0] == "B"} & set(ws)


@pytest.mark.parametrize("pp, c", SIZES)
def test_pairs_are_one_F_and_one_B_of_the_two_directions(pp, c):
    for rank, steps in enumerate(schedule(pp, c)):
        pairs = [s for s in steps if len(s) == 2]
        for f, b in pairs:
            assert (f[0], b[0]) == ("F", "B") and f[1] != b[1]
        split = half_rank(rank, pp) == pp // 2 - 1          # the middle ranks' first pair runs as two steps
        assert len(pairs) == c - 3 * pp // 2 + half_rank(rank, pp) + 1 - split
        assert all(len(s) in (1, 2) for s in steps)


@pytest.mark.parametrize("pp, c", [(2, 4), (4, 10), (6, 14), (8, 24)])
@pytest.mark.parametrize("t", [times(1, 1, 1, 3), times(1, 2, 0.5, 2.5), times(2, 1, 1, 2)])
def test_simulation_meets_every_dependency_and_does_not_deadlock(pp, c, t):
    p2p = 0.25
    for steps in (schedule(pp, c), schedule_1f1b(pp, c)):
        tl = simulate(steps, t, p2p=p2p)
        assert len(tl.end) == sum(len(s) for rank_steps in steps for s in rank_steps)
        assert tl.makespan == max(tl.end.values())
        for (r, kind, d, i), start in tl.start.items():
            stage = r if d == 0 else pp - 1 - r
            prev, nxt = (r - 1, r + 1) if d == 0 else (r + 1, r - 1)
            if kind == "F" and stage > 0:
                assert start >= tl.end[(prev, "F", d, i)] + p2p
            if kind == "B":
                assert start >= tl.end[(r, "F", d, i)]
                if stage < pp - 1:
                    assert start >= tl.end[(nxt, "B", d, i)] + p2p
            if kind == "W":
                assert start >= tl.end[(r, "B", d, i)]
        for r, rank_steps in enumerate(steps):          # in order, one step at a time
            spans = [(tl.start[(r, *s[0])], tl.end[(r, *s[0])]) for s in rank_steps]
            assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


# F&B from its floor, max(F, B + W) (the pair overlaps all of the shorter part), to its ceiling F + B + W
EQUAL_F_B = [times(F, F, W, FB) for F in (0.5, 1, 2) for W in (0, F / 2, F)
             for FB in (F + W, 1.5 * F + W, 2 * F + W)]


@pytest.mark.parametrize("pp", [2, 4, 6, 8])
@pytest.mark.parametrize("t", EQUAL_F_B)
def test_bubble_is_table2_when_F_equals_B_and_W_at_most_B(pp, t):
    for c in (2 * pp, 3 * pp):
        assert simulate(schedule(pp, c), t).bubble == pytest.approx(table2_bubble("dualpipe", pp, t), abs=1e-12)


def found_relation(pp, t):
    """The module docstring's bubble for any times: table 2 plus what F != B and W > B add."""
    F, B, W, k = t["F"], t["B"], t["W"], pp // 2 - 1
    return table2_bubble("dualpipe", pp, t) + k * (max(0, F - B) + max(0, W - B)) - min(F, k * max(0, B - F))


OTHER_TIMES = [times(F, B, W, FB) for F, B, W in [(2, 1, 1), (1.5, 1, 0.5), (1, 2, 1), (1, 1.25, 1), (0.5, 1, 0),
                                                  (1, 1, 2), (1, 0.5, 1.5), (0.5, 1.5, 2)]
               for FB in (max(F, B + W), F + B + W)]


@pytest.mark.parametrize("pp", [2, 4, 6, 8, 10])
@pytest.mark.parametrize("t", OTHER_TIMES)
def test_bubble_for_other_times_follows_the_found_relation(pp, t):
    for c in (2 * pp, 2 * pp + 2, 3 * pp):
        bubble = simulate(schedule(pp, c), t).bubble
        assert bubble == pytest.approx(found_relation(pp, t), abs=1e-12)
        if pp >= 4 and t["F"] >= t["B"] and (t["F"] > t["B"] or t["W"] > t["B"]):
            assert bubble > table2_bubble("dualpipe", pp, t)     # table 2 undercounts there
        if pp >= 4 and t["F"] < t["B"] and t["W"] <= t["B"]:
            assert bubble < table2_bubble("dualpipe", pp, t)     # and overcounts by up to one F there


def test_bubble_is_the_idle_time_of_the_innermost_ranks():
    t = times(1, 1, 1, 2)                                           # a pair faster than F then B+W
    tl = simulate(schedule(8, 16), t)
    assert tl.idle == [1, 2, 3, 3, 3, 3, 2, 1]
    assert tl.bubble == 3 == table2_bubble("dualpipe", 8, t)
    # an innermost rank's work: C - PP - 1 pairs and PP + 1 forwards and full backwards alone
    assert tl.makespan == 44 == (16 - 8 - 1) * 2 + (8 + 1) * (1 + 2) + tl.bubble


@pytest.mark.parametrize("pp", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("t", [times(1, 1, 1, None), times(2, 1, 0, None), times(0.5, 2, 1.5, None)])
def test_1f1b_idle_is_table2_on_every_rank_for_any_times(pp, t):
    for c in (1, pp, 2 * pp + 1, 4 * pp):
        tl = simulate(schedule_1f1b(pp, c), t)
        assert tl.idle == pytest.approx([table2_bubble("1f1b", pp, t)] * pp, abs=1e-12)
        assert tl.makespan == pytest.approx((c + pp - 1) * (t["F"] + t["B"] + t["W"]), abs=1e-12)


@pytest.mark.parametrize("pp", [4, 6, 8])
@pytest.mark.parametrize("t", [times(1, 1, 1, 3), times(1, 1, 1, 2), times(2, 1, 1, 3), times(1, 2, 0.5, 3.5)])
def test_dualpipe_bubble_and_makespan_below_1f1b(pp, t):
    for c in (2 * pp, 4 * pp):
        dual, base = simulate(schedule(pp, c), t), simulate(schedule_1f1b(pp, c), t)
        assert dual.bubble < base.bubble
        assert dual.makespan < base.makespan


def test_1f1b_order_pp4_chunks6():
    assert schedule_1f1b(4, 6) == [parse(row) for row in [
        "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0F5 0B2 0B3 0B4 0B5",
        "0F0 0F1 0F2 0B0 0F3 0B1 0F4 0B2 0F5 0B3 0B4 0B5",
        "0F0 0F1 0B0 0F2 0B1 0F3 0B2 0F4 0B3 0F5 0B4 0B5",
        "0F0 0B0 0F1 0B1 0F2 0B2 0F3 0B3 0F4 0B4 0F5 0B5"]]


def unsplit(steps, pp):
    """DualPipe with the middle ranks' first step-4 F0, B1 run as one overlapped pair."""
    out = []
    for rank, rank_steps in enumerate(steps):
        rank_steps = list(rank_steps)
        if half_rank(rank, pp) == pp // 2 - 1:
            i = next(i for i, (a, b) in enumerate(zip(rank_steps, rank_steps[1:]))
                     if len(a) == len(b) == 1 and a[0][0] == "F" and b[0][0] == "B")
            rank_steps[i:i + 2] = [rank_steps[i] + rank_steps[i + 1]]
        out.append(rank_steps)
    return out


def test_middle_ranks_split_first_pair_as_deepseek_and_what_it_does():
    steps = schedule(4, 10)
    assert steps[1][4:6] == [(("F", 0, 2),), (("B", 1, 0),)] and steps[2][4:6] == [(("F", 1, 2),), (("B", 0, 0),)]
    slow_b = times(1, 2, 1, 4)                                      # B > F: the split pays
    assert simulate(steps, slow_b).makespan == 43
    assert simulate(unsplit(steps, 4), slow_b).makespan == 44
    fast_pair = times(1, 1, 1, 2)                                   # a pair 1 faster than its parts: it costs 1
    assert simulate(steps, fast_pair).makespan == 26
    assert simulate(unsplit(steps, 4), fast_pair).makespan == 25


@pytest.mark.parametrize("make", [schedule, schedule_1f1b])
def test_p2p_latency_delays_each_hop(make):
    pp, F, p2p = 8, 1.0, 0.5
    tl = simulate(make(pp, 2 * pp), times(F, 1, 1, 3), p2p=p2p)
    assert [tl.start[(r, "F", 0, 0)] for r in range(pp)] == [r * (F + p2p) for r in range(pp)]
    assert tl.makespan > simulate(make(pp, 2 * pp), times(F, 1, 1, 3)).makespan


def test_deadlock_is_reported_with_the_waiting_ops():
    # rank 1 wants 0B0 before its own 0F0, and rank 0's 0B0 waits on rank 1's
    broken = [parse("0F0 0B0"), parse("0B0 0F0")]
    with pytest.raises(Deadlock) as e:
        simulate(broken, times(1, 1, 1, 3))
    assert str(e.value) == "deadlock: rank 0 waits at 0B0 for 0B0 on rank 1; rank 1 waits at 0B0 for 0F0 on rank 1"


def test_deadlock_on_an_op_that_never_comes():
    steps = schedule(4, 8)
    steps[0] = [s for s in steps[0] if s != (("F", 0, 1),)]         # rank 0 drops a forward
    with pytest.raises(Deadlock, match=r"rank 1 waits at 0F1 for 0F1 on rank 0"):
        simulate(steps, times(1, 1, 1, 3))


def test_bad_steps_are_refused():
    with pytest.raises(ValueError, match="one F and one B"):
        simulate([parse("0F0+0F1")], times(1, 1, 1, 3))
    with pytest.raises(ValueError, match="rank 0 runs 0F0 twice"):
        simulate([parse("0F0 0F0")], times(1, 1, 1, 3))


@pytest.mark.parametrize("pp, c, message", [
    (3, 12, "num_ranks (PP) must be an even integer >= 2, got 3"),
    (0, 4, "num_ranks (PP) must be an even integer >= 2, got 0"),
    (4.0, 8, "num_ranks (PP) must be an even integer >= 2, got 4.0"),
    (4, 7, "num_chunks must be an even integer >= 2 * num_ranks = 8, got 7"),
    (4, 6, "num_chunks must be an even integer >= 2 * num_ranks = 8, got 6"),
    (8, 14, "num_chunks must be an even integer >= 2 * num_ranks = 16, got 14"),
])
def test_bad_sizes_stop_with_the_message(pp, c, message):
    with pytest.raises(ValueError) as e:
        schedule(pp, c)
    assert str(e.value) == message


def test_1f1b_bad_sizes():
    with pytest.raises(ValueError, match=r"num_ranks must be an integer >= 1, got 0"):
        schedule_1f1b(0, 4)
    with pytest.raises(ValueError, match=r"num_chunks must be an integer >= 1, got 0"):
        schedule_1f1b(2, 0)


def test_main_prints_timeline_and_bubbles(capsys):
    assert dualpipe.main(["4", "10"]) == 0
    out = capsys.readouterr().out
    dual_rows = [line for line in out.split("1f1b")[0].splitlines() if line.startswith("rank ")]
    assert len(dual_rows) == 4 and len({len(row) for row in dual_rows}) == 1   # time-aligned rows
    tl = simulate(schedule(4, 10), times(1, 1, 1, 3))
    assert [row.count(".") for row in dual_rows] == [4 * i for i in tl.idle] == [8, 8, 8, 8]
    assert "0F3+1B1" in dual_rows[0]
    assert "makespan 32, idle per rank 2 2 2 2, bubble 2, table 2: 2" in out
    assert "makespan 39, idle per rank 9 9 9 9, bubble 9, table 2: 9" in out


def test_command_line_bad_argument_prints_the_message_not_a_traceback():
    script = Path(dualpipe.__file__)
    for args, message in [(["3", "10"], "num_ranks (PP) must be an even integer >= 2, got 3"),
                          (["4", "x"], "must be integers"),
                          (["4"], "usage: python dualpipe.py PP num_chunks")]:
        run = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)
        assert run.returncode == 2 and message in run.stderr and "Traceback" not in run.stderr


# -----------------------------------------------------------------------------
# Stages, the B/W split, the executor's clock and messages (one process), the executor under torchrun

import os
import random

import torch

import comm
import model
from dualpipe import Pipeline, Stage, backward_input, comm_plan, stage_layers, ticks

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(vocab_size=61, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=4, n_dense_layers=1, n_heads=2,
            q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
            n_activated_experts=2, n_expert_groups=2, n_limited_groups=1, n_mtp=1, max_seq_len=32, init_std=0.1)


def tiny(**overrides):
    return model.ModelArgs(**{**TINY, **overrides})


def fresh_tokens(n, T=9, vocab=61):
    g = torch.Generator().manual_seed(random.randrange(2 ** 31))
    tokens = torch.randint(0, vocab, (n, T), generator=g)
    return tokens[:, :-1], tokens[:, 1:]


def stages_of(args, num_stages, state_dict):
    stages = [Stage(args, i, num_stages).double() for i in range(num_stages)]
    for stage in stages:   # strict: each stage takes exactly its own keys
        stage.load_state_dict({k: v for k, v in state_dict.items() if k in stage.state_dict()}, strict=True)
    return stages


def test_stage_layers_balance_the_last_stages_head_and_mtp():
    assert stage_layers(model.preset("nano"), 2) == [3, 1]          # the head and MTP weigh 3.6 blocks
    assert stage_layers(model.preset("nano"), 4) == [1, 1, 1, 1]
    assert stage_layers(model.preset("v3"), 16) == [4] * 15 + [1]
    assert stage_layers(tiny(n_layers=5), 2) == [3, 2] and stage_layers(tiny(n_layers=5), 4) == [2, 1, 1, 1]
    assert stage_layers(tiny(n_layers=8, n_mtp=0), 4) == [2, 2, 2, 2] and stage_layers(tiny(), 1) == [4]
    with pytest.raises(ValueError, match="5 pipeline stages need at least one block each, and n_layers=4"):
        stage_layers(tiny(), 5)
    with pytest.raises(ValueError, match="split"):
        Stage(tiny(), 0, 2, split=[4, 0])


@pytest.mark.parametrize("num_stages", [1, 2, 4])
def test_stages_hold_only_their_blocks_under_the_transformers_names(num_stages):
    args = tiny()
    ref = model.Transformer(args).double()
    stages = stages_of(args, num_stages, ref.state_dict())
    keys = [set(s.state_dict()) for s in stages]
    assert set().union(*keys) == set(ref.state_dict())
    assert all(not (a & b) - {"embed.weight"} for i, a in enumerate(keys) for b in keys[i + 1:])  # only embed twice
    split = stage_layers(args, num_stages)
    for i, stage in enumerate(stages):
        assert list(stage.layers) == [str(n) for n in range(sum(split[:i]), sum(split[:i + 1]))]
        assert hasattr(stage, "embed") == (i in (0, num_stages - 1))
        assert hasattr(stage, "head") == hasattr(stage, "mtp") == (i == num_stages - 1)
        if num_stages > 1:
            assert sum(p.numel() for p in stage.parameters()) < sum(p.numel() for p in ref.parameters())
    assert not hasattr(Stage(tiny(n_mtp=0), 1, 2), "embed")                 # no MTP: the last stage needs none


@pytest.mark.parametrize("num_stages", [1, 2, 4])
def test_stages_in_a_chain_compute_the_transformers_losses(num_stages):
    args = tiny()
    ref = model.Transformer(args).double()
    stages = stages_of(args, num_stages, ref.state_dict())
    x, y = fresh_tokens(3)
    h, balance = stages[0].embed(x), 0.0
    for stage in stages:
        h, parts = stage(h, x, y, lam=0.25)
        balance = balance + parts["balance"]
    _, want = ref(x, y, lam=0.25)
    assert balance.item() == pytest.approx(want["balance"].item(), rel=1e-14) and balance > 0  # another sum order
    for k in ("main", "mtp"):
        assert parts[k].item() == want[k].item()
    torch.testing.assert_close(parts["loss"] - parts["balance"] + balance, want["loss"], rtol=1e-15, atol=0)


def test_init_weights_depend_on_the_name_only():
    args = tiny(init_std=0.02)
    a, b = Stage(args, 0, 1), Stage(args, 2, 4)
    a.init_weights(seed=5)
    b.init_weights(seed=5)
    own = dict(a.named_parameters())
    for name, p in b.named_parameters():
        assert torch.equal(p, own[name]), name
    w = a.layers["2"].ffn.experts.w1
    assert abs(w.std().item() - 0.02) < 0.002 and torch.equal(a.norm.weight, torch.ones(args.dim))
    other = Stage(args, 0, 1)
    other.init_weights(seed=6)
    assert not torch.equal(other.layers["2"].ffn.experts.w1, w)


def split_vs_full(stage, make_roots):
    """A full backward's input and weight gradients, then B (backward_input) and W separately."""
    h, roots, grads = make_roots()
    full_dx, = torch.autograd.grad(roots, [h], grads, retain_graph=True)
    torch.autograd.backward(roots, grads)
    full = {n: p.grad.clone() for n, p in stage.named_parameters()}
    stage.zero_grad(set_to_none=True)
    h, roots, grads = make_roots()
    (dx,), W = backward_input(roots, grads, [h])
    untouched = all(p.grad is None for p in stage.parameters())
    W()
    return full_dx, dx, full, {n: p.grad for n, p in stage.named_parameters()}, untouched


@pytest.mark.parametrize("index, num_stages", [(0, 4), (1, 4), (3, 4), (0, 1)])
def test_backward_input_leaves_the_weights_to_W_and_together_they_are_the_backward(index, num_stages):
    args = tiny()
    stage = stages_of(args, num_stages, model.Transformer(args).double().state_dict())[index]
    x, y = fresh_tokens(2)
    h0 = torch.randn(2, 8, args.dim, dtype=torch.float64)

    def make_roots():
        h = stage.embed(x) if stage.first else h0.clone().requires_grad_()
        out, parts = stage(h, x, y)
        if stage.last:
            return h, [parts["loss"]], [torch.tensor(0.25, dtype=torch.float64)]
        pairs = [(out, torch.ones_like(out)), (parts["balance"], torch.tensor(0.5, dtype=torch.float64))]
        return h, [t for t, _ in pairs if t.requires_grad], [g for t, g in pairs if t.requires_grad]
    full_dx, dx, full, split, untouched = split_vs_full(stage, make_roots)
    assert untouched                                    # B computed no weight gradient
    torch.testing.assert_close(dx, full_dx, rtol=1e-13, atol=1e-15)
    assert full.keys() == split.keys()
    for name, g in full.items():
        torch.testing.assert_close(split[name], g, rtol=1e-13, atol=1e-15, msg=name)


def test_W_runs_only_the_weight_side_of_the_graph():
    """A linear layer's W is its one dW GEMM: backward_input's B runs the input side alone."""
    w = torch.nn.Parameter(torch.randn(5, 4, dtype=torch.float64))
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 5, dtype=torch.float64)
    y = x @ w.T
    with torch.autograd.profiler.profile() as prof_b:
        (dx,), W = backward_input([y], [g], [x])
    with torch.autograd.profiler.profile() as prof_w:
        W()
    assert torch.equal(dx, g @ w) and torch.allclose(w.grad, g.T @ x)
    mms = lambda prof: sum(e.name == "aten::mm" for e in prof.function_events)  # noqa: E731
    assert mms(prof_b) == mms(prof_w) == 1


SCHEDULES = [(name, make, pp, c) for pp in (2, 4, 6, 8) for c in (2 * pp, 3 * pp + (pp % 2 == 1), 4 * pp + 2)
             for name, make in (("dualpipe", schedule), ("1f1b", schedule_1f1b))]


@pytest.mark.parametrize("name, make, pp, c", SCHEDULES)
def test_comm_plan_posts_both_ends_of_every_message_in_one_tick(name, make, pp, c):
    steps = make(pp, c)
    plans = [comm_plan(steps, r) for r in range(pp)]
    at = ticks(steps)
    for r, plan in enumerate(plans):
        assert [s for s, _, _ in plan if s] == steps[r]               # its steps in order, one per tick
        assert [t for t, (s, _, _) in enumerate(plan) if s] == at[r]
    sent = Counter()
    for t in range(len(plans[0])):
        for a in range(pp):
            for b in range(pp):
                a_to_b = [m for peer, m in plans[a][t][1] if peer == b]
                assert a_to_b == [m for peer, m in plans[b][t][2] if peer == a]   # same tick, same order
                assert not a_to_b or abs(a - b) == 1
                sent.update((a, m) for m in a_to_b)
    consumers = {}
    for r, plan in enumerate(plans):
        for t, (step, _, receives) in enumerate(plan):
            for peer, msg in receives:
                consumers[msg, r] = t
    assert all(n == 1 for n in sent.values())
    for r, plan in enumerate(plans):      # every input arrives before its use, a step as early as they allow
        previous = -1
        for t, (step, _, _) in enumerate(plan):
            if step:
                arrivals = [consumers[n[1:], r] for a in step for n in dualpipe._needs(r, a, pp) if n[0] != r]
                assert all(t_in < t for t_in in arrivals)
                assert t == previous + 1 or t - 1 in arrivals
                previous = t


def test_pipeline_on_one_process_is_grad_accumulation():
    """1F1B with one stage (no torch.distributed): the executor's step is one process's grad accumulation."""
    args = tiny()
    ref = model.Transformer(args).double()
    pipe = Pipeline(args, "1f1b", dtype=torch.float64)
    pipe.load_state_dict(ref.state_dict())
    assert {n for n, _ in pipe.named_parameters()} == {n for n, _ in ref.named_parameters()}
    x, y = fresh_tokens(6)
    losses = pipe.step(list(x.tensor_split(3)), list(y.tensor_split(3)), lam=0.3)
    want = torch.zeros(4, dtype=torch.float64)
    for xm, ym in zip(x.tensor_split(3), y.tensor_split(3)):
        _, parts = ref(xm, ym, lam=0.3)
        (parts["loss"] / 3).backward()
        want += torch.stack([parts[k].detach() for k in ("loss", "main", "mtp", "balance")]) / 3
    torch.testing.assert_close(torch.stack([losses[k] for k in ("loss", "main", "mtp", "balance")]), want,
                               rtol=1e-14, atol=0)
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in pipe.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-13, atol=1e-16, msg=name)
    for a, b in zip(pipe.moe_layers(), ref.moe_layers()):
        assert torch.equal(a.load, b.load)   # K per token: 6 x 8 of them, 6 x 7 in the MTP module
        assert a.load.sum() in (6 * 8 * args.n_activated_experts, 6 * 7 * args.n_activated_experts)
    with pytest.raises(RuntimeError, match="every .grad None"):
        pipe.step(x, y, 3)


def test_pipeline_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match="overlap=True needs schedule='dualpipe'"):
        Pipeline(tiny(), "1f1b", overlap=True)
    with pytest.raises(ValueError, match="schedule must be 'dualpipe' or '1f1b'"):
        Pipeline(tiny(), "gpipe")
    with pytest.raises(ValueError, match=r"num_ranks \(PP\) must be an even integer >= 2, got 1"):
        Pipeline(tiny())                                            # DualPipe on one process
    pipe = Pipeline(tiny(), "1f1b")
    with pytest.raises(ValueError, match="needs the tokens, not a shape"):
        pipe.step(torch.Size((4, 8)), None, 2)
    with pytest.raises(ValueError, match="needs the targets"):
        pipe.step(torch.zeros(4, 8, dtype=torch.long), None, 2)
    with pytest.raises(ValueError, match="micro-batches"):
        pipe.step(torch.zeros(5, 8, dtype=torch.long), torch.zeros(5, 8, dtype=torch.long), 2)


def test_evaluate_on_one_process_is_the_transformers_mean_main_loss():
    args = tiny()
    ref = model.Transformer(args).double()
    pipe = Pipeline(args, "1f1b", dtype=torch.float64)
    pipe.load_state_dict(ref.state_dict())
    x, y = fresh_tokens(6)
    with torch.no_grad():
        want = torch.stack([ref(a, b)[1]["main"] for a, b in zip(x.tensor_split(3), y.tensor_split(3))]).mean()
    got = pipe.evaluate(x, y, 3)
    assert got.item() == pytest.approx(want.item(), rel=1e-15) and got.dtype == torch.float64
    assert all(m.load.sum() == 0 for m in pipe.moe_layers())       # no grad, no load counted
    assert all(p.grad is None for p in pipe.parameters())
    with torch.no_grad():                                           # the parameters of the moment (an EMA's)
        pipe.stages[0].head.weight.mul_(2)
    assert pipe.evaluate(x, y, 3).item() != pytest.approx(want.item(), rel=1e-3)


# -----------------------------------------------------------------------------
# The overlapped F&B pair: pieces through a tape against plain autograd (one process)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def assert_rounding_apart(got, want, name):
    """float64 sums of the same terms in another order: within 1e-13 of the tensor's largest entry."""
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert want.abs().max() > 0 and err <= 1e-13, f"{name}: {err:.2e}"


def log_pieces(monkeypatch):
    """The order in which tapes run their pieces: ("F", kind) per forward piece, ("B", kind) per piece's
    backward, ("W", kind) per W it left."""
    log, run, backward = [], dualpipe.Tape.run, dualpipe.Tape.backward

    def logged_run(self, kind, fn, *args):
        log.append(("F", kind))
        return run(self, kind, fn, *args)

    def logged_backward(self, piece, split):
        log.append(("B", piece.kind))
        W = backward(self, piece, split)
        return W and (lambda: (log.append(("W", piece.kind)), W()))
    monkeypatch.setattr(dualpipe.Tape, "run", logged_run)
    monkeypatch.setattr(dualpipe.Tape, "backward", logged_backward)
    return log


def count_backward_transfers(monkeypatch):
    """Calls of comm.py's routes' backward transfers, by name."""
    calls = Counter()
    for route in (comm.FlatRoute, comm.HierarchicalRoute):
        for name in ("dispatch_grad", "combine_grad"):
            def counted(self, *a, _plain=getattr(route, name), _name=name):
                calls[_name] += 1
                return _plain(self, *a)
            monkeypatch.setattr(route, name, counted)
    return calls


def moe_block(kind, args):
    layer = model.Block(0 if kind == "dense" else 1, args)
    model.init_weights(layer, args, seed=3)
    with torch.no_grad():
        if kind != "dense":
            layer.ffn.gate.bias.normal_(0, 0.05)                    # routing steered by the biases too
    if kind in ("flat", "hierarchical"):                            # comm.py's dispatcher, a group of one
        layer.ffn.dispatcher = comm.AllToAllDispatcher(comm.Grid.single(), args.n_routed_experts,
                                                       hierarchical=kind == "hierarchical")
    return layer


def plain_step(layer, x, grad, cos, sin):
    """Block.forward, then backward of <out, grad> + 0.5 * balance loss: out, dL/dx."""
    x = x.clone().requires_grad_()
    out = layer(x, cos, sin)
    balance = [layer.ffn.balance_loss] if isinstance(layer.ffn, dualpipe.MoE) else []
    half = torch.tensor(0.5, dtype=grad.dtype, device=grad.device)
    torch.autograd.backward([out] + balance, [grad] + [half] * len(balance))
    return out.detach(), x.grad


def piece_forward(layer, x, cos, sin, streams):
    tape, balances, x = dualpipe.Tape(streams), [], x.clone().requires_grad_()
    return tape, x, dualpipe.Forward(dualpipe.block_pieces(layer, tape, (x,), cos, sin, balances)), balances


def seed(tape, forward, balances, grad):
    tape.seed(forward.result, grad)
    for b in balances:
        tape.seed(b, torch.tensor(0.5, dtype=grad.dtype, device=grad.device))


# One round of overlapped(). An MoE block: the order of DeepSeek's training profile (profile-data's
# train.json, read with its user annotations): combine(B), attn(F), mlp(B), dispatch(F), dispatch(B),
# mlp(W), mlp(F), attn(B), attn(W), combine(F). Under recompute no W is split off; a dense block has
# attention and MLP only.
PROFILE = [("B", "combine"), ("F", "attn"), ("B", "mlp"), ("F", "dispatch"), ("B", "dispatch"), ("W", "mlp"),
           ("F", "mlp"), ("B", "attn"), ("W", "attn"), ("F", "combine")]
ROUNDS = {"moe": PROFILE, "recompute": [s for s in PROFILE if s[0] != "W"],
          "dense": [("F", "attn"), ("B", "mlp"), ("W", "mlp"), ("F", "mlp"), ("B", "attn"), ("W", "attn")]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["local", "flat", "hierarchical", "recompute", "dense"])
def test_pieces_in_the_profiles_order_give_the_gradients_of_backward_then_forward(kind, device, monkeypatch):
    """Two micro-batches a and b through one block (MoE: local, comm.py's flat and hierarchical
    dispatchers with a group of one, recompute; dense). Pieces: a's forward, then a's backward
    interleaved with b's forward in the profile's order (one round of overlapped()), then b's backward.
    Plain: a's forward and backward, then b's. The forward is the same computation, so the same bits
    (on the CPU); the gradients are sums of the same terms, h's three (router, dispatch, shared
    experts) added in another order than autograd's: equal but for float64 rounding."""
    args = tiny(recompute=kind == "recompute")
    layer = moe_block(kind, args).to(device, torch.float64)
    cos, sin = (t[:8].to(device) for t in model.precompute_rope(args))
    xa, xb, ga, gb = (torch.randn(2, 8, args.dim, dtype=torch.float64, device=device) for _ in range(4))
    out_a, dx_a = plain_step(layer, xa, ga, cos, sin)
    after_a = {n: p.grad.clone() for n, p in layer.named_parameters()}
    out_b, dx_b = plain_step(layer, xb, gb, cos, sin)
    after_b = {n: p.grad.clone() for n, p in layer.named_parameters()}
    layer.zero_grad(set_to_none=True)

    log, streams = log_pieces(monkeypatch), dualpipe.Streams(torch.device(device))
    transfers = count_backward_transfers(monkeypatch)
    tape_a, leaf_a, fwd_a, bal_a = piece_forward(layer, xa, cos, sin, streams)
    dualpipe.overlapped(fwd_a, dualpipe.Backward(None, False))
    seed(tape_a, fwd_a, bal_a, ga)
    tape_b, leaf_b, fwd_b, bal_b = piece_forward(layer, xb, cos, sin, streams)
    del log[:]
    dualpipe.overlapped(fwd_b, dualpipe.Backward(tape_a, split=kind != "recompute"))
    assert log == ROUNDS[{"dense": "dense", "recompute": "recompute"}.get(kind, "moe")]
    for got, want in ((fwd_a.result, out_a), (fwd_b.result, out_b)):   # CUDA: its kernels' own order
        assert torch.equal(got, want) if device == "cpu" else torch.allclose(got, want, rtol=1e-13, atol=0)
    assert_rounding_apart(tape_a.gradient(leaf_a), dx_a, "dx")
    for name, p in layer.named_parameters():                    # a's B and W both ran inside the pair
        assert_rounding_apart(p.grad, after_a[name], name)
    seed(tape_b, fwd_b, bal_b, gb)
    dualpipe.overlapped(dualpipe.Forward(iter(())), dualpipe.Backward(tape_b, split=False))
    assert_rounding_apart(tape_b.gradient(leaf_b), dx_b, "dx")
    for name, p in layer.named_parameters():
        assert_rounding_apart(p.grad, after_b[name], name)
    assert not tape_a.grads and not tape_b.grads and not tape_a.made_by and not tape_b.made_by
    # each piece backwards its own graph: one transfer back per micro-batch, in dispatch(B) and combine(B)
    assert transfers == ({"dispatch_grad": 2, "combine_grad": 2} if kind in ("flat", "hierarchical") else {})


@pytest.mark.parametrize("device", DEVICES)
def test_a_whole_stage_through_the_pieces_is_the_transformer(device):
    """The whole model as one stage (embedding, dense and MoE blocks, output head, MTP, the loss) through
    the pieces, b's forward overlapped with a's backward (deferred W, then flushed), against
    model.Transformer's forward and backward of a, then of b: the losses' bits, the gradients."""
    args = tiny()
    ref = model.Transformer(args).to(device, torch.float64)
    stage = Stage(args, 0, 1).to(device, torch.float64)
    stage.load_state_dict(ref.state_dict())
    x, y = (t.to(device) for t in fresh_tokens(4))
    (xa, xb), (ya, yb) = x.tensor_split(2), y.tensor_split(2)
    want = []
    for xm, ym in ((xa, ya), (xb, yb)):
        _, parts = ref(xm, ym, lam=0.3)
        (parts["loss"] / 2).backward()
        want.append(parts)
    streams, half = dualpipe.Streams(torch.device(device)), torch.tensor(0.5, dtype=torch.float64, device=device)
    tapes = [dualpipe.Tape(streams) for _ in range(2)]
    fwd = [dualpipe.Forward(stage.pieces(t, None, xm, ym, 0.3)) for t, xm, ym in zip(tapes, (xa, xb), (ya, yb))]
    dualpipe.overlapped(fwd[0], dualpipe.Backward(None, False))
    tapes[0].seed(fwd[0].result[1]["loss"], half)
    backward_a = dualpipe.Backward(tapes[0], split=True)
    dualpipe.overlapped(fwd[1], backward_a)
    backward_a.flush()
    tapes[1].seed(fwd[1].result[1]["loss"], half)
    dualpipe.overlapped(dualpipe.Forward(iter(())), dualpipe.Backward(tapes[1], split=False))
    for f, parts in zip(fwd, want):
        for k in ("loss", "main", "mtp", "balance"):
            assert f.result[1][k].item() == pytest.approx(parts[k].item(), rel=1e-15, abs=0), k
    grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in stage.named_parameters():
        assert_rounding_apart(p.grad, grads[name], name)


# -----------------------------------------------------------------------------
# The executor under torchrun (gloo), against one process

def run_pipeline_worker(tmp_path, nproc, device="cpu", dtype="float64", ep=1):
    seed = random.randrange(2 ** 31)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        str(ROOT / "tests" / "pipeline_worker.py"), str(tmp_path), str(seed), f"--device={device}",
                        f"--dtype={dtype}", f"--ep={ep}"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, f"seed {seed}: " + p.stderr[-3000:]
    return seed, [torch.load(tmp_path / f"rank{r}.pt", map_location="cpu", weights_only=False) for r in range(nproc)]


# How far a pipeline's numbers may be from one process's. float64: the same sums in other orders,
# elementwise. float32 (the CUDA check): unit roundoff 6e-8; the pipeline adds each parameter's
# micro-batch and stage-copy gradients, and the overlapped pair its pieces' gradients, in other orders
# than grad accumulation: measured on the CPU in float32, up to 8e-7 of a tensor's largest entry (3
# seeds); CUDA's index_add (the backward of the rows' gather) adds in the order its atomics land: 1e-5.
# The forward is the same computation on both sides, so the routing, the loads and the biases are equal.
REL = {"float64": 1e-13, "float32": 1e-6}


def assert_grad_close(got, want, dtype, msg):
    if dtype == "float64":
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15, msg=msg)
    else:
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), msg


@pytest.mark.parametrize("pp, device, dtype", [(2, "cpu", "float64"), (4, "cpu", "float64"),
                                               pytest.param(2, "cuda", "float32", marks=CUDA)])
def test_pipeline_step_under_torchrun_is_the_single_process_step(tmp_path, pp, device, dtype):
    """DualPipe (pairs as F then B, and overlapped) and 1F1B on PP gloo processes against
    model.Transformer on one (the same weights and micro-batches as grad accumulation): losses, every
    copy's gradient, the gradient norm and the clipped gradients, the router loads and the biases
    update_bias makes from them, and evaluate()'s mean main loss. On CUDA every rank shares cuda:0,
    gloo's point-to-point goes through the CPU and the overlapped pairs use the communication stream."""
    seed, ranks = run_pipeline_worker(tmp_path, pp, device, dtype)
    variants = [k for k in ranks[0] if k[1] != "single"]
    assert variants == [("", "dualpipe"), ("", "dualpipe-overlap"), ("", "1f1b")] + (
        [("recompute", "dualpipe"), ("recompute", "dualpipe-overlap")] if pp == 2 else [])
    for variant, kind in variants:
        want = ranks[0][(variant, "single")]
        where = f"seed {seed}, {variant or 'plain'} {kind}"
        dual, seen = kind.startswith("dualpipe"), set()
        for r, saved in enumerate(ranks):
            got = saved[(variant, kind)]
            assert got["stages"] == ([r, pp - 1 - r] if dual else [r])
            for k, v in want["losses"].items():
                assert got["losses"][k] == pytest.approx(v, rel=REL[dtype], abs=1e-15), (where, k)
            assert got["evaluated"] == pytest.approx(want["evaluated"], rel=REL[dtype], abs=0), where
            for name, g in got["grads"].items():
                assert_grad_close(g, want["grads"][name], dtype, f"{where}: {name}")
                assert_grad_close(got["clipped"][name], want["clipped"][name], dtype, f"{where}: clipped {name}")
                if dual:                                 # the two copies of a stage: the same bits
                    assert torch.equal(g, ranks[pp - 1 - r][(variant, kind)]["grads"][name]), (where, name)
            torch.testing.assert_close(got["norm"], want["norm"], rtol=REL[dtype], atol=0)
            assert got["norm"] > 0.05                    # so clipping scaled the gradients
            for name, load in got["loads"].items():
                assert torch.equal(load, want["loads"][name]), (where, name)
                assert torch.equal(got["biases"][name], want["biases"][name]), (where, name)
            seen |= got["grads"].keys() | got["loads"].keys()
            end = r in (0, pp - 1)
            if dual:                                     # the end ranks' two stages share one embedding
                assert got["embeds"] == 2 * end and got["shared_embed"] == end
            else:                                        # 1F1B: the last stage's own, tied copy
                assert got["embeds"] == end and not got["shared_embed"]
            if pp > 2 or kind == "1f1b":
                assert got["numel"] < want["numel"]
        assert seen == want["grads"].keys() | want["loads"].keys()
        assert any(b.abs().sum() > 0 for b in want["biases"].values())


@pytest.mark.parametrize("device, dtype", [("cpu", "float64"), pytest.param("cuda", "float32", marks=CUDA)])
def test_pipeline_pp2_x_ep2_on_four_processes_is_the_single_process_step(tmp_path, device, dtype):
    """PP=2 x EP=2 (comm.init(pp=2, ep=2)): two DualPipe pipelines, each stage's experts sharded over the
    ep group of the two ranks at its pipeline position, one data shard per pipeline, the gradients
    reduced over dp/edp (comm.reduce_gradients), the biases updated from the loads summed over dp;
    flat and hierarchical dispatch (every rank its own node), the pairs as F then B and overlapped.
    Against one process over both shards' micro-batches: each pipeline's losses (its shard's), every
    gradient (an expert's: the rows this rank holds), the loads summed over dp, the biases, evaluate().
    The members of an ep group run their all-to-alls in one order, from the same call sites (they run
    the same schedule in lockstep), and the overlapped step runs the same ones as F then B does."""
    seed, ranks = run_pipeline_worker(tmp_path, 4, device, dtype, ep=2)
    want = ranks[0]["single"]
    C = len(want["per_batch"]) // 2
    for variant in ("flat", "flat-overlap", "hierarchical", "hierarchical-overlap"):
        where = f"seed {seed}, {variant}"
        for r, saved in enumerate(ranks):
            got = saved[variant]
            assert got["groups"]["ep"] == got["groups"]["dp"] == [r - r % 2, r - r % 2 + 1]
            assert got["groups"]["pp"] == [r % 2, r % 2 + 2] and got["dp_rank"] == r % 2
            assert got["hierarchical"] == variant.startswith("hierarchical")
            shard = want["per_batch"][got["dp_rank"] * C:(got["dp_rank"] + 1) * C].mean(0)
            for k, v in zip(("loss", "main", "mtp", "balance"), shard.tolist()):
                assert got["losses"][k] == pytest.approx(v, rel=REL[dtype], abs=1e-15), (where, k)
            assert got["evaluated"] == pytest.approx(want["evaluated"], rel=REL[dtype], abs=0), where
            for name, g in got["grads"].items():
                full = want["grads"][name]
                start, stop = got["slices"].get(name, (0, len(full)))
                assert stop - start == (len(full) // 2 if name in got["slices"] else len(full))
                assert_grad_close(g, full[start:stop], dtype, f"{where}: {name}")
            partner = ranks[got["groups"]["dp"][1 - r % 2]][variant]
            for name, load in got["loads"].items():
                assert torch.equal(load + partner["loads"][name], want["loads"][name]), (where, name)
                assert torch.equal(got["biases"][name], want["biases"][name]), (where, name)
            assert got["all_to_alls"] and got["all_to_alls"] == partner["all_to_alls"], where
            group = got["groups"]["rail" if got["hierarchical"] else "ep"]   # hierarchical: the node hop has one rank
            assert {ranks_ for _, ranks_ in got["all_to_alls"]} == {tuple(group)}, where
        if variant.endswith("overlap"):             # the same transfers as the pairs run as F then B
            for r in range(4):
                assert Counter(ranks[r][variant]["all_to_alls"]) == Counter(
                    ranks[r][variant.removesuffix("-overlap")]["all_to_alls"]), where
        experts = [n for n in want["grads"] if ".experts." in n]
        assert experts and all(n in ranks[0][variant]["slices"] for n in experts)
        assert any(b.abs().sum() > 0 for b in want["biases"].values())


def bench(*args, nproc=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    return subprocess.run([sys.executable, *launcher, "bench.py", "pipeline", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_bench_pipeline_one_process_prints_the_simulated_bubbles():
    p = bench("--seq_len=16", "--batch_size=1")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [line.split() for line in p.stdout.splitlines() if line.split()[:1] in (["4"], ["8"])]
    assert [r[:2] for r in rows] == [["4", "8"], ["8", "16"]]
    for r in rows:         # overlapped, F then B, 1F1B: DualPipe's bubble and makespan (F then B) below 1F1B's
        (ovl_bubble, ovl_span), (dual_bubble, dual_span), (base_bubble, base_span) = (
            (float(r[i]), float(r[i + 1])) for i in (3, 6, 9))
        assert 0 < dual_bubble < base_bubble and dual_span < base_span and 0 < ovl_bubble < ovl_span
    pair = next(line for line in p.stdout.splitlines() if "an F&B pair overlapped" in line)
    assert float(pair.split("overlapped ")[1].split()[0]) > 0
    p = bench("--overlap=1")
    assert p.returncode == 1 and "unknown ModelArgs key(s) ['overlap']" in p.stderr and "Traceback" not in p.stderr


def test_bench_pipeline_under_torchrun_times_both_pair_kinds_and_1f1b():
    p = bench("--seq_len=16", "--batch_size=1", "--steps=1", nproc=2)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert "PP=2 (gloo, cpu), 4 micro-batches of 1 x 16" in lines[0]
    table = lines[lines.index(next(x for x in lines if x.split()[:1] == ["rank"])):]
    for label in ("0", "1", "bubble", "step"):         # measured and simulated, for each of the three
        row = next(x for x in table if x.split()[:1] == [label])
        assert len([float(v) for v in row.replace("|", " ").split()[1:]]) == 6
    assert any(x.startswith("dualpipe overlapped / dualpipe step time: measured") for x in lines)

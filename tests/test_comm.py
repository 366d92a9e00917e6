"""Expert parallelism (comm.py): layouts and groups, all-to-all dispatch and combine (flat and
hierarchical, BF16 and FP8) against the single-process MoE layer, empty ranks, node-limited routing
and the bytes per link class, and the gradient reduction of an expert-parallel training step.

The multi-process tests run tests/comm_worker.py under torchrun once per world size (gloo, CPU,
float64). On a GPU machine the same tests run the CUDA path with every rank on cuda:0:
    COMM_TEST_DEVICE=cuda [COMM_TEST_DTYPE=float32|bfloat16] python -m pytest tests/test_comm.py
"""

import copy
import os
import subprocess
import sys

import pytest
import torch

import comm
import fp8
import model
import moe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICE = os.environ.get("COMM_TEST_DEVICE", "cpu")
DTYPE = os.environ.get("COMM_TEST_DTYPE", "float64" if DEVICE == "cpu" else "float32")
# Same math in a different order: float64 rounding on the CPU; on the GPU the GEMM kernels may pick
# other tilings for other row counts, and BF16 rounds partial sums (hierarchical combine) to 8 bits.
TOL = {"float64": 1e-12, "float32": 1e-5 if DEVICE == "cpu" else 1e-3, "bfloat16": 3e-2}[DTYPE]
# FP8 Wgrads quantize 128-token tiles along the tokens a GPU holds: a dense layer's per-rank tiles (as in
# plain data parallelism), or an expert's rows in another order (hierarchical). With power-of-two scales
# E4M3 is the same 3-bit-mantissa grid whatever the scale, so only elements that fall into the subnormals
# of one tiling and not the other differ: measured 6e-7 and 4e-9 on the CPU.
FP8_TILES_TOL = max(TOL, 1e-5)
# Hierarchical FP8 quantizes a token's gradient dy once, before the gate multiplies it on the expert's
# GPU; the single-process layer quantizes g * dy per (token, expert). Two E4M3 roundings of at most
# 2^-4 each: measured 5% relative on the CPU.
FP8_TWO_ROUNDINGS = 2 * 2 ** -4


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def run_worker(n, tmp_path_factory):
    if DEVICE == "cuda" and not torch.cuda.is_available():
        pytest.skip("COMM_TEST_DEVICE=cuda needs CUDA")
    out = str(tmp_path_factory.mktemp("comm") / f"w{n}.pt")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           os.path.join(ROOT, "tests", "comm_worker.py"), out, f"--device={DEVICE}", f"--dtype={DTYPE}"]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return torch.load(out, weights_only=False)["results"]


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    return run_worker(4, tmp_path_factory)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return run_worker(2, tmp_path_factory)


def ep_errors(case, ref_name="local"):
    """Relative error of every output of an expert-parallel MoE case against a single-process run:
    outputs and input gradients concatenated over the ranks, dense gradients summed over the ranks,
    expert gradients summed over the copies of each expert block (edp) and stacked in expert order."""
    layout, ep, ref = case["layout"], case["ep"], case["ref"][ref_name]
    assert all(r["grads"].keys() == ref["grads"].keys() for r in ep)  # every parameter, incl. gate and shared
    errs = {"y": rel(torch.cat([r["y"] for r in ep]), ref["y"]),
            "dx": rel(torch.cat([r["dx"] for r in ep]), ref["dx"])}
    for name, g in ref["grads"].items():
        if name.startswith("experts."):
            blocks = []
            for ep_rank in range(layout.ep):
                copies = [r for i, r in enumerate(ep) if layout.coords(i)[2] == ep_rank]
                assert all(r["slices"][name][0] == copies[0]["slices"][name][0] for r in copies)
                blocks.append(sum(r["grads"][name] for r in copies))
            errs[name] = rel(torch.cat(blocks), g)
        else:
            errs[name] = rel(sum(r["grads"][name] for r in ep), g)
    return errs


# -----------------------------------------------------------------------------
# Layouts (pure python)

def test_docstring_layout_16_ranks_2_nodes_pp2_dp8_ep4():
    lay = comm.Layout(16, 8, pp=2, ep=4, n_experts=256)
    assert (lay.dp, lay.edp, lay.nodes_per_ep) == (8, 2, 1)
    g = lay.groups(5)
    assert g["dp"] == list(range(8)) and g["ep"] == [4, 5, 6, 7] and g["edp"] == [1, 5] and g["pp"] == [5, 13]
    grid = comm.Grid(lay, 5, {k: None for k in comm.GROUPS})
    assert comm.expert_range(grid, 256) == (64, 128) and grid.dp_rank == 5 and grid.pp_rank == 0
    for kind in comm.GROUPS:  # every kind of group partitions the world
        assert sorted(r for group in lay.all_groups(kind) for r in group) == list(range(16)), kind
    for group in lay.all_groups("ep"):  # contiguous ranks on one node
        assert group == list(range(group[0], group[0] + 4)) and len({lay.node(r) for r in group}) == 1


def test_docstring_layout_ep_group_across_nodes():
    lay = comm.Layout(16, 4, pp=1, ep=8)
    g = lay.groups(5)
    assert g["ep"] == list(range(8)) and g["node"] == [4, 5, 6, 7] and g["rail"] == [1, 5] and g["edp"] == [5, 13]
    assert (lay.nodes_per_ep, lay.ranks_per_node_ep) == (2, 4)
    grid = comm.Grid(lay, 5, {k: None for k in comm.GROUPS})
    assert grid.node_in_ep == 1 and grid.links("rail") == ["inter", "self"]
    assert grid.links("ep") == ["inter"] * 4 + ["intra", "self", "intra", "intra"]


def test_pp_inner_layout_puts_whole_pipelines_on_a_node_and_ep_across_nodes():
    """8 ranks on 2 nodes of 4, PP=4, EP=2 with pp_inner (issue 14's layout): each node holds one whole
    pipeline, and every stage's expert-parallel pair spans the two nodes."""
    lay = comm.Layout(8, 4, pp=4, ep=2, pp_inner=True)
    assert (lay.dp, lay.edp, lay.nodes_per_ep, lay.ranks_per_node_ep) == (2, 1, 2, 1)
    g = lay.groups(5)
    assert g["pp"] == [4, 5, 6, 7] and g["ep"] == [1, 5] and g["dp"] == [1, 5] and g["rail"] == [1, 5]
    assert g["node"] == [5] and g["edp"] == [5]
    grid = comm.Grid(lay, 5, {k: None for k in comm.GROUPS})
    assert (grid.pp_rank, grid.ep_rank, grid.dp_rank, grid.node_in_ep) == (1, 1, 1, 1)
    assert grid.links("ep") == ["inter", "self"] and grid.links("pp") == ["intra", "self", "intra", "intra"]


@pytest.mark.parametrize("world, local, pp, ep", [(8, 4, 4, 2), (8, 8, 2, 4), (16, 4, 2, 4), (16, 8, 2, 2),
                                                  (8, 2, 4, 2), (16, 4, 4, 4), (8, 4, 2, 4)])
@pytest.mark.parametrize("pp_inner", [False, True])
def test_every_layout_is_consistent(world, local, pp, ep, pp_inner):
    """Whatever the rank order: every kind of group partitions the world; coords inverts the grid;
    an ep group's members sit on nodes_per_ep nodes, ranks_per_node_ep on each, in node order; the
    node groups are those pieces and the rail groups one member per node."""
    lay = comm.Layout(world, local, pp=pp, ep=ep, pp_inner=pp_inner)
    grid = lay.grid()
    for rank in range(world):
        assert grid[lay.coords(rank)].item() == rank
    for kind in comm.GROUPS:
        assert sorted(r for group in lay.all_groups(kind) for r in group) == list(range(world)), kind
    for group in lay.all_groups("ep"):
        nodes = [lay.node(r) for r in group]
        assert nodes == sorted(nodes) and len(set(nodes)) == lay.nodes_per_ep
        assert all(nodes.count(n) == lay.ranks_per_node_ep for n in set(nodes))
    for group in lay.all_groups("node"):
        assert len({lay.node(r) for r in group}) == 1 and len(group) == lay.ranks_per_node_ep
    for group in lay.all_groups("rail"):
        assert len({lay.node(r) for r in group}) == len(group) == lay.nodes_per_ep
    for group in lay.all_groups("pp"):  # one rank of each stage, in stage order
        assert [lay.coords(r)[0] for r in group] == list(range(pp))


@pytest.mark.parametrize("kw, message", [
    (dict(world=8, local_world=4, pp=3, ep=1, pp_inner=True), "pp=3 must divide the world size 8"),
    (dict(world=24, local_world=4, pp=3, pp_inner=True), "pp=3 and local_world=4 must divide one another"),
    (dict(world=12, local_world=6, pp=2, ep=2, pp_inner=True), "ep=2 and local_world=6 / pp=2 must divide"),
    (dict(world=16, local_world=8, pp=3), "pp=3 must divide the world size 16"),
    (dict(world=16, local_world=8, ep=3), "ep=3 must divide dp = world/pp = 16"),
    (dict(world=16, local_world=8, pp=2, ep=16), "ep=16 must divide dp = world/pp = 8"),
    (dict(world=16, local_world=8, ep=8, n_experts=12), "ep=8 must divide n_routed_experts=12"),
    (dict(world=16, local_world=8, pp=0), "pp=0 and ep=1 must be >= 1"),
    (dict(world=16, local_world=8, ep=0), "pp=1 and ep=0 must be >= 1"),
    (dict(world=12, local_world=8), "local_world=8 .* must divide the world size 12"),
    (dict(world=24, local_world=8, ep=12), "ep=12 and local_world=8 must divide one another"),
])
def test_bad_layouts_raise_one_message(kw, message):
    with pytest.raises(ValueError, match="parallel layout world=.*" + message):
        comm.Layout(**kw)


def test_init_reads_torchrun_env_and_checks_before_any_process_group(monkeypatch):
    for var in comm.NCCL_CHANNEL_VARS:  # recorded as absent, so that teardown removes what init sets
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="ep=3 must divide dp = world/pp = 8"):
        comm.init(pp=2, ep=3)
    with pytest.raises(ValueError, match="ep=8 must divide n_routed_experts=12"):
        comm.init(ep=8, n_experts=12)
    assert not torch.distributed.is_initialized()  # refused before any process group was started
    for var in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(var)
    grid = comm.init(nccl_channels=20)  # plain python: one process, no process group
    assert grid.layout.world == 1 and all(g is None for g in grid.groups.values())
    assert all(os.environ[var] == "20" for var in comm.NCCL_CHANNEL_VARS)  # set before any communicator


def test_node_limited_routing_needs_groups_inside_nodes():
    lay = comm.Layout(8, 2, ep=8)  # 4 nodes in the ep group
    comm.check_node_limited(model.ModelArgs(n_routed_experts=16, n_expert_groups=4, n_limited_groups=2), lay)
    comm.check_node_limited(model.ModelArgs(n_routed_experts=16, n_expert_groups=8, n_limited_groups=2), lay)
    no_limit = model.ModelArgs(n_routed_experts=16, n_expert_groups=1, n_limited_groups=1)
    comm.check_node_limited(no_limit, lay)
    with pytest.raises(ValueError, match="n_expert_groups=2 must be a multiple of the 4 nodes"):
        comm.check_node_limited(model.ModelArgs(n_routed_experts=16, n_expert_groups=2, n_limited_groups=1), lay)


@pytest.mark.parametrize("nodes, per_node_groups", [(2, 1), (4, 1), (8, 1), (4, 2)])
def test_each_token_reaches_at_most_M_nodes(nodes, per_node_groups):
    torch.manual_seed(nodes * 10 + per_node_groups)
    E = 8 * nodes
    E_node = E // nodes  # experts a node holds when the ep group spans `nodes` nodes
    for M in range(1, nodes + 1):  # M groups; a group lies on one node, so at most M nodes
        args = model.ModelArgs(dim=32, n_routed_experts=E, n_expert_groups=nodes * per_node_groups,
                               n_limited_groups=M, n_activated_experts=min(8, M * E_node // per_node_groups))
        gate = moe.Gate(args)
        torch.nn.init.normal_(gate.weight, std=1.0)
        gate.bias.normal_(std=0.3)
        _, idx, _ = gate(torch.randn(400, 32))
        reached = torch.zeros(400, nodes, dtype=torch.bool).scatter_(1, idx // E_node, True).sum(1)
        assert reached.max() <= M
        if M <= 2:  # the limit binds: tokens do use the nodes they are allowed (M = nodes: no limit at all)
            assert reached.max() == M
    assert reached.max() >= min(nodes, 3)  # without a limit (M = nodes) tokens spread wider


def test_shard_experts_keeps_names_and_takes_this_ranks_slice():
    args = model.ModelArgs(vocab_size=64, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=3, n_heads=2,
                           q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                           n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1)
    torch.manual_seed(0)
    full = model.Transformer(args)
    lay = comm.Layout(8, 8, pp=1, ep=4)
    grid = comm.Grid(lay, 6, {k: None for k in comm.GROUPS})  # ep rank 2: experts 4 and 5
    sharded = comm.shard_experts(copy.deepcopy(full), grid)
    before, after = dict(full.named_parameters()), dict(sharded.named_parameters())
    assert before.keys() == after.keys()
    slices = comm.expert_slices(sharded, grid)
    assert len(slices) == 3 * (args.n_layers - args.n_dense_layers + args.n_mtp)
    for name, p in after.items():
        if name in slices:
            assert slices[name] == (4, 6, 8) and p.shape[0] == 2
            assert torch.equal(p, before[name][4:6])
        else:
            assert torch.equal(p, before[name])
    assert all(isinstance(m.dispatcher, comm.AllToAllDispatcher) for m in sharded.moe_layers())
    with pytest.raises(ValueError, match="ep=16 must divide n_routed_experts=8"):
        comm.shard_experts(copy.deepcopy(full), comm.Grid(comm.Layout(16, 16, ep=16), 0, dict.fromkeys(comm.GROUPS)))


# -----------------------------------------------------------------------------
# One process: the all-to-all dispatcher on a grid of one (collectives skipped) vs LocalDispatcher

@pytest.mark.parametrize("fp8_on", [False, True])
def test_single_process_dispatcher_matches_local_dispatcher(fp8_on, monkeypatch):
    monkeypatch.setattr(fp8, "pow2_scales", True)
    args = model.ModelArgs(dim=128, inter_dim=128, moe_inter_dim=128, n_routed_experts=8, n_activated_experts=3,
                           n_expert_groups=2, n_limited_groups=2, route_scale=2.5, fp8=fp8_on)
    torch.manual_seed(1)
    local = moe.MoE(args, linear=model.linear_cls(args)).double()
    for p in local.parameters():
        torch.nn.init.normal_(p, std=0.1)
    layers = {h: comm.shard_experts(copy.deepcopy(local), comm.Grid.single(), hierarchical=h) for h in (False, True)}
    x, w = torch.randn(2, 9, 128, dtype=torch.float64), torch.randn(2, 9, 128, dtype=torch.float64)

    def run(layer):
        xx = x.clone().requires_grad_(True)
        (layer(xx) * w).sum().backward()
        return [layer(x).detach(), xx.grad] + [p.grad for p in layer.parameters()]
    ref = run(local)
    for hierarchical, layer in layers.items():
        got = run(layer)
        assert rel(got[0], ref[0]) <= 1e-12  # forward: the same quantization of the same rows
        for a, b in zip(got[1:], ref[1:]):
            assert rel(a, b) <= (FP8_TWO_ROUNDINGS if fp8_on and hierarchical else 1e-12)


def test_dispatch_counts_and_rows_like_local_dispatcher():
    d = comm.AllToAllDispatcher(comm.Grid.single(), 6)
    h = torch.randn(10, 4)
    idx = torch.stack([torch.randperm(6)[:3] for _ in range(10)])
    x, counts, handle = d.dispatch(h, idx)
    x_ref, counts_ref, order = moe.LocalDispatcher(6).dispatch(h, idx)
    assert torch.equal(counts, counts_ref) and torch.equal(x, x_ref)
    assert torch.equal(d.combine(x, handle), moe.LocalDispatcher(6).combine(x_ref, order))
    with pytest.raises(ValueError, match="pass g"):
        comm.AllToAllDispatcher(comm.Grid.single(), 6, hierarchical=True).dispatch(h, idx)


# -----------------------------------------------------------------------------
# Several processes (tests/comm_worker.py under torchrun)

MOE_CASES = ["ep2_edp2", "ep4_flat", "ep4_hier", "ep4_hier_m1", "forced_flat", "forced_hier"]


@pytest.mark.parametrize("name", MOE_CASES)
def test_expert_parallel_moe_matches_single_process(four, name):
    errs = ep_errors(four[name])
    assert max(errs.values()) <= TOL, errs


def test_two_ranks_ep2_matches_single_process(two):
    errs = ep_errors(two["ep2_w2"])
    assert max(errs.values()) <= TOL, errs


def test_hierarchical_equals_flat(four):
    flat, hier = four["ep4_flat"]["ep"], four["ep4_hier"]["ep"]
    for a, b in zip(hier, flat):
        assert rel(a["y"], b["y"]) <= TOL and rel(a["dx"], b["dx"]) <= TOL
        for name in b["grads"]:
            assert rel(a["grads"][name], b["grads"][name]) <= TOL, name


def test_fp8_flat_dispatch_matches_single_process_fp8_layer(four):
    errs = ep_errors(four["fp8_flat"])
    for name, e in errs.items():
        assert e <= (FP8_TILES_TOL if name.startswith("shared.") else TOL), (name, e)


def test_fp8_hierarchical_dispatch(four):
    case = four["fp8_hier"]
    # against the same dispatcher in one process: the same quantization points
    for name, e in ep_errors(case, "twin").items():
        assert e <= (FP8_TILES_TOL if name.startswith(("shared.", "experts.")) else TOL), (name, e)
    # against the single-process FP8 layer: the forward is the same; the backward's dy is rounded
    # to FP8 once per token instead of once per (token, expert)
    errs = ep_errors(case, "local")
    assert errs.pop("y") <= TOL
    assert max(errs.values()) <= FP8_TWO_ROUNDINGS, errs
    assert all(rel(a["y"], b["y"]) <= TOL for a, b in zip(case["ep"], four["fp8_flat"]["ep"]))


def row_bytes(case):
    """Bytes of one row as it travels: (towards the experts, back, one gate or one idx entry)."""
    args = case["args"]
    elt = {"float64": 8, "float32": 4, "bfloat16": 2}[DTYPE]
    g_bytes = 4 if DTYPE == "bfloat16" else elt  # the router runs in FP32 or wider
    x_bytes = args.dim + 4 * args.dim // 128 if case["fp8"] else args.dim * elt  # FP8: bytes + an FP32 scale per 128
    return x_bytes, args.dim * elt, g_bytes


def routed_bytes(case, backward=False):
    """The bytes per rank, direction and link of one forward (and backward), from the routing alone."""
    layout, ep, args = case["layout"], case["ep"], case["args"]
    K, n_local, L = args.n_activated_experts, args.n_routed_experts // layout.ep, layout.ranks_per_node_ep
    x, y, g = row_bytes(case)
    # per hop: (bytes towards the experts, bytes back). Forward: rows (+ idx and gates), then outputs.
    # Backward: the output gradient travels like x (FP8 with FP8 dispatch), the input gradient like
    # y, with the gates' gradients where the gates travelled.
    hops = dict(flat=(x, y), first=(x + 4 * K + g * K, y), second=(x + g, y))
    if backward:
        hops = dict(flat=(2 * x, 2 * y), first=(hops["first"][0] + x, 2 * y + g * K), second=(2 * x + g, 2 * y + g))
    out = [dict(dispatch_intra=0, dispatch_inter=0, combine_intra=0, combine_inter=0) for _ in ep]

    def move(src, dst, hop):
        link = "self" if src == dst else "intra" if layout.node(src) == layout.node(dst) else "inter"
        if link != "self":
            out[src][f"dispatch_{link}"] += hops[hop][0]
            out[dst][f"combine_{link}"] += hops[hop][1]

    for rank, r in enumerate(ep):
        members = layout.groups(rank)["ep"]
        for experts in r["idx"].tolist():
            if not case["hierarchical"]:
                for e in experts:
                    move(rank, members[e // n_local], "flat")
                continue
            for node in sorted({e // (n_local * L) for e in experts}):
                middle = members[node * L + members.index(rank) % L]  # same local index, destination node
                move(rank, middle, "first")
                for e in experts:
                    if e // (n_local * L) == node:
                        move(middle, members[e // n_local], "second")
    return out


@pytest.mark.parametrize("name", ["ep4_flat", "ep4_hier", "ep4_hier_m1", "fp8_flat", "fp8_hier", "forced_flat"])
def test_traffic_counts_match_an_independent_count(four, name):
    case = four[name]
    forward, step = routed_bytes(case), routed_bytes(case, backward=True)
    for rank, r in enumerate(case["ep"]):
        assert r["traffic"] == forward[rank], rank
        assert r["step_traffic"] == step[rank], rank
    total = lambda key: sum(r["traffic"][key] for r in case["ep"])  # noqa: E731
    assert total("dispatch_inter") > 0 or case["layout"].nodes_per_ep == 1
    if name == "forced_flat":  # rank 0 keeps its own rows; the others hold no expert rows to send back
        assert case["ep"][0]["traffic"]["dispatch_intra"] == 0 and total("dispatch_intra") > 0
        assert all(r["traffic"]["combine_intra"] == 0 for r in case["ep"][1:])


@pytest.mark.parametrize("name, M", [("ep4_hier_m1", 1), ("ep4_hier", 2)])
def test_hierarchical_dispatch_crosses_once_per_token_and_node(four, name, M):
    """Expert groups = the 2 nodes, n_limited_groups = M: a token reaches at most M nodes, and one
    row per (token, other node) crosses, where the flat route sends one per (token, expert there)."""
    case = four[name]
    layout, E = case["layout"], case["args"].n_routed_experts
    x_bytes, _, g_bytes = row_bytes(case)
    row = x_bytes + (4 + g_bytes) * case["args"].n_activated_experts
    once = per_expert = 0
    for rank, r in enumerate(case["ep"]):
        node = r["idx"] // (E // layout.nodes_per_ep)  # (N, K): the ep group is all 4 ranks, nodes 0 and 1
        reached = torch.zeros(len(node), layout.nodes_per_ep, dtype=torch.bool).scatter_(1, node, True)
        assert reached.sum(1).max() <= M
        crossings = reached.sum().item() - reached[:, layout.node(rank)].sum().item()
        assert r["traffic"]["dispatch_inter"] == crossings * row
        once, per_expert = once + crossings, per_expert + (node != layout.node(rank)).sum().item()
    assert 0 < once < per_expert


@pytest.mark.parametrize("name", ["empty_flat", "empty_hier", "ungated_flat"])
def test_ranks_that_send_or_receive_nothing(four, name):
    """Rank 1 has no tokens, no token picks rank 3's experts; expert e multiplies its rows by 1 + e,
    so the combined output and both gradients have a closed form."""
    case = four[name]
    assert case["ep"][1]["h"].shape[0] == 0 and case["ep"][3]["rows"] == 0 and case["ep"][1]["rows"] > 0
    for r in case["ep"]:
        h, idx, g, w = r["h"].double(), r["idx"], r["g"].double(), r["w"].double()
        scale = 1.0 + idx.double()  # (N, K)
        if case["gated"]:
            out = (g * scale).sum(1, keepdim=True) * h  # sum_k g_tk (1 + e_tk) h_t
            dh = (g * scale).sum(1, keepdim=True) * w
            dg = scale * (h * w).sum(1, keepdim=True)
            assert rel(r["dg"], dg) <= TOL or dg.numel() == 0
        else:  # one row per (token, k), in (token, k) order
            out = (scale.unsqueeze(-1) * h.unsqueeze(1)).flatten(0, 1)
            dh = (scale.unsqueeze(-1) * w.view(-1, idx.shape[1], h.shape[1])).sum(1)
        assert r["out"].shape == out.shape
        if out.numel():
            assert rel(r["out"], out) <= TOL and rel(r["dh"], dh) <= TOL


@pytest.mark.parametrize("world, name", [(2, "step_dp2_ep2"), (4, "step_dp4_ep2")])
def test_expert_parallel_step_matches_single_process(four, two, world, name):
    """Dense gradients averaged over dp, expert gradients summed over edp and divided by dp, the
    global clipping norm, and the bias update from loads summed over dp, all as one process sees
    them over every rank's batch."""
    case = (two if world == 2 else four)[name]
    ref, ep, layout = case["ref"], case["ep"], case["layout"]
    tol = max(TOL, 1e-10)
    assert abs(sum(r["loss"] for r in ep) / world - ref["loss"]) <= tol * abs(ref["loss"])
    for r in ep:
        assert abs(r["norm"] - ref["norm"]) <= tol * ref["norm"]
        for name, g in ref["grads"].items():
            if name in r["slices"]:
                start, stop, full = r["slices"][name]
                assert full == g.shape[0] and stop - start == full // layout.ep
                g = g[start:stop]
            assert rel(r["grads"][name], g) <= tol, name
        for name, b in ref["biases"].items():
            assert torch.equal(r["biases"][name], b), name  # loads are integers: the same signs exactly
    assert any(b.abs().sum() > 0 for b in ref["biases"].values())


@pytest.mark.parametrize("name", ["groups_pp2_ep2", "groups_ep4_2nodes"])
def test_process_groups_hold_the_layouts_ranks(four, name):
    case = four[name]
    for rank, seen in enumerate(case["ep"]):
        for kind, members in seen.items():
            assert members == case["layout"].groups(rank)[kind], (rank, kind)
    if name == "groups_pp2_ep2":  # arange(4).view(pp=2, edp=1, ep=2), 2 ranks per node
        assert [seen["pp"] for seen in case["ep"]] == [[0, 2], [1, 3], [0, 2], [1, 3]]
        assert [seen["ep"] for seen in case["ep"]] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    else:  # one ep group over 2 nodes of 2
        assert [seen["rail"] for seen in case["ep"]] == [[0, 2], [1, 3], [0, 2], [1, 3]]
        assert [seen["node"] for seen in case["ep"]] == [[0, 1], [0, 1], [2, 3], [2, 3]]

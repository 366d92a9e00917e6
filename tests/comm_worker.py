"""Run under torchrun by tests/test_comm.py (gloo; CPU, or every rank on cuda:0 with --device=cuda).

Each case runs an expert-parallel MoE layer or training step on every rank, gathers what each rank
got, and on rank 0 runs the same computation in one process over all ranks' tokens. Rank 0 saves
both to OUT for the test to compare; this file asserts nothing itself.

    python -m torch.distributed.run --standalone --nproc_per_node=4 tests/comm_worker.py OUT \
        [--device=cpu|cuda] [--dtype=float64|float32|bfloat16]     (bfloat16: FP32 weights, BF16 autocast)
"""

import argparse
import copy

import torch
import torch.distributed as dist

import comm
import fp8
import model
import moe
import train

D = 128  # FP8 tiles need whole 128-wide rows


def moe_args(fp8_on=False, groups=2, limited=2, topk=3, experts=8):
    return model.ModelArgs(dim=D, inter_dim=D, moe_inter_dim=D, n_routed_experts=experts, n_shared_experts=1,
                           n_activated_experts=topk, n_expert_groups=groups, n_limited_groups=limited,
                           route_scale=2.5, fp8=fp8_on)


def make_layer(args, dtype, device, bias=None):
    """The same random MoE layer on every rank."""
    torch.manual_seed(0)
    layer = moe.MoE(args, linear=model.linear_cls(args))
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(std=0.1) if p.dim() >= 2 else p.uniform_(0.5, 1.5)
        layer.gate.bias.normal_(std=0.05)
        if bias is not None:
            layer.gate.bias += bias
    return layer.to(device, dtype if dtype != torch.bfloat16 else torch.float32)


def tokens(r, batch, dtype, device):
    """Rank r's tokens and a fixed upstream gradient for them (every rank can make every rank's)."""
    g = torch.Generator().manual_seed(100 + r)
    x = torch.randn(batch, 8, D, generator=g, dtype=torch.float64)
    w = torch.randn(batch, 8, D, generator=g, dtype=torch.float64)
    dt = dtype if dtype != torch.bfloat16 else torch.float32
    return x.to(device, dt), w.to(device, dt)


def forward_backward(layer, x, w, autocast):
    """y, dL/dx and every parameter gradient for L = sum(y * w)."""
    x = x.clone().requires_grad_(True)
    with autocast():
        y = layer(x)
    (y.to(w.dtype) * w).sum().backward()
    grads = {n: p.grad.detach().clone().cpu() for n, p in layer.named_parameters()}
    return dict(y=y.detach().to(w.dtype).cpu(), dx=x.grad.cpu(), grads=grads)


def moe_case(name, layout, hierarchical=False, fp8_on=False, batches=None, bias=None, limited=2, topk=3):
    """One expert-parallel MoE layer vs the single-process layer on the concatenated tokens."""
    args = moe_args(fp8_on, limited=limited, topk=topk)
    batches = batches or [2] * WORLD
    layer = make_layer(args, DTYPE, DEVICE, bias)
    refs = dict(local=copy.deepcopy(layer), twin=copy.deepcopy(layer))  # deep copies before any forward
    grid = comm.make_grid(layout, RANK)
    comm.shard_experts(layer, grid, hierarchical=hierarchical)
    x, w = tokens(RANK, batches[RANK], DTYPE, DEVICE)
    out = forward_backward(layer, x, w, AUTOCAST)
    step_traffic = dict(grid.traffic.bytes)  # forward and backward
    # the bytes of one forward, counted by the dispatcher, and the routing they came from
    grid.traffic.reset()
    with torch.no_grad(), AUTOCAST():
        layer(x)
        h = layer.norm(x.view(-1, D))
        idx, _ = layer.gate.route(layer.gate.affinities(h))
    out.update(traffic=dict(grid.traffic.bytes), step_traffic=step_traffic, idx=idx.cpu(),
               slices=comm.expert_slices(layer, grid))
    gathered = [None] * WORLD if RANK == 0 else None
    dist.gather_object(out, gathered, dst=0)
    if RANK == 0:
        xs, ws = zip(*(tokens(r, batches[r], DTYPE, DEVICE) for r in range(WORLD)))
        x_all, w_all = torch.cat(xs), torch.cat(ws)
        # twin: the same dispatcher in one process (collectives skipped): the same quantization points
        comm.shard_experts(refs["twin"], comm.Grid.single(), hierarchical=hierarchical)
        ref = {k: forward_backward(m, x_all, w_all, AUTOCAST) for k, m in refs.items()}
        RESULTS[name] = dict(ep=gathered, ref=ref, layout=layout, hierarchical=hierarchical, fp8=fp8_on,
                             batches=batches, args=args)


def dispatcher_case(name, layout, hierarchical, sizes, gated=True):
    """The dispatcher alone, with a closed-form reference: "expert" e multiplies its rows by 1 + e.
    Rank 1 has no tokens (sends nothing) and no token picks rank 3's experts (it receives nothing)."""
    K, E = 2, 8
    n_local = E // layout.ep
    gen = torch.Generator().manual_seed(300 + RANK)
    N = sizes[RANK]
    dt = torch.float64 if DTYPE == torch.float64 else torch.float32
    h = torch.randn(N, D, generator=gen, dtype=dt).to(DEVICE).requires_grad_(True)
    idx = torch.rand(N, E - n_local, generator=gen).argsort(-1)[:, :K].to(DEVICE)  # K distinct, none of rank 3's
    g = torch.rand(N, K, generator=gen, dtype=dt).to(DEVICE).requires_grad_(True)
    w = torch.randn(N * (1 if gated else K), D, generator=gen, dtype=dt).to(DEVICE)
    grid = comm.make_grid(layout, RANK)
    d = comm.AllToAllDispatcher(grid, E, hierarchical=hierarchical)
    x, counts, handle = d.dispatch(h, idx, g if gated else None)
    start = grid.ep_rank * n_local
    scale = 1.0 + torch.repeat_interleave(torch.arange(start, start + n_local, device=DEVICE), counts)  # (M,)
    out = d.combine(x * scale.to(x.dtype).unsqueeze(-1), handle)
    (out * w).sum().backward()
    res = dict(h=h.detach().cpu(), idx=idx.cpu(), g=g.detach().cpu(), w=w.cpu(), out=out.detach().cpu(),
               dh=h.grad.cpu(), dg=None if g.grad is None else g.grad.cpu(), counts=counts.cpu(), rows=x.shape[0])
    gathered = [None] * WORLD if RANK == 0 else None
    dist.gather_object(res, gathered, dst=0)
    if RANK == 0:
        RESULTS[name] = dict(ep=gathered, layout=layout, gated=gated)


def step_case(name, layout):
    """One training step of a tiny Transformer: dense grads over dp, expert grads over edp, global
    gradient clipping, and the bias update from loads summed over dp, against one process."""
    args = model.ModelArgs(vocab_size=61, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=2, n_heads=2, q_lora_rank=16,
                           kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                           n_activated_experts=2, n_expert_groups=2, n_limited_groups=1, max_seq_len=32, init_std=0.1)
    torch.manual_seed(0)
    net = model.Transformer(args).to(DEVICE, torch.float64 if DTYPE == torch.float64 else torch.float32)
    single = copy.deepcopy(net)
    batches = [torch.randint(0, 61, (3, 17), generator=torch.Generator().manual_seed(200 + r)).to(DEVICE)
               for r in range(WORLD)]
    grid = comm.make_grid(layout, RANK)
    comm.shard_experts(net, grid)

    def step(m, b, reduce, clip, all_reduce):
        _, losses = m(b[:, :-1], b[:, 1:])
        losses["loss"].backward()
        reduce()
        norm = clip()
        grads = {n: p.grad.detach().clone().cpu() for n, p in m.named_parameters()}
        moe.update_bias(m.moe_layers(), gamma=0.01, all_reduce=all_reduce)
        biases = {n: b.clone().cpu() for n, b in m.named_buffers() if n.endswith("gate.bias")}
        return dict(grads=grads, biases=biases, norm=float(norm), loss=float(losses["loss"]))

    owned, _ = train.ownership(net, [net], grid)  # each gradient counted on one rank, as train.py counts it

    def clip():  # train.py's clipping, its factor applied to the gradients here rather than inside AdamW
        total = comm.grad_norm(net, owned)
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, comm.clip_coefficient(total, 1e-3))
        return total

    out = step(net, batches[RANK], lambda: comm.reduce_gradients(net, grid), clip, grid.sum_over_dp)
    out["slices"] = comm.expert_slices(net, grid)
    gathered = [None] * WORLD if RANK == 0 else None
    dist.gather_object(out, gathered, dst=0)
    if RANK == 0:
        ref = step(single, torch.cat(batches), lambda: None,
                   lambda: torch.nn.utils.clip_grad_norm_(single.parameters(), 1e-3), None)
        RESULTS[name] = dict(ep=gathered, ref=ref, layout=layout)


def groups_case(name, layout):
    """Each group that make_grid created holds exactly the ranks the layout lists."""
    grid = comm.make_grid(layout, RANK)
    seen = {}
    for kind in comm.GROUPS:
        g = grid.groups[kind]
        members = [RANK] if g is None else [None] * dist.get_world_size(g)
        if g is not None:
            dist.all_gather_object(members, RANK, group=g)
        seen[kind] = members
    gathered = [None] * WORLD if RANK == 0 else None
    dist.gather_object(seen, gathered, dst=0)
    if RANK == 0:
        RESULTS[name] = dict(ep=gathered, layout=layout)


def main():
    to_rank0 = torch.zeros(8)
    to_rank0[:8 // WORLD] = 5.0  # every token's top-2 are rank 0's experts
    if WORLD == 4:
        one_node, two_nodes = comm.Layout(4, 4, ep=4), comm.Layout(4, 2, ep=4)  # two_nodes: 2 nodes x 2 GPUs
        moe_case("ep2_edp2", comm.Layout(4, 4, ep=2))
        moe_case("ep4_flat", two_nodes)
        moe_case("ep4_hier", two_nodes, hierarchical=True)
        moe_case("ep4_hier_m1", two_nodes, hierarchical=True, limited=1)
        moe_case("fp8_flat", two_nodes, fp8_on=True)
        moe_case("fp8_hier", two_nodes, hierarchical=True, fp8_on=True)
        moe_case("forced_flat", one_node, bias=to_rank0, limited=1, topk=2)
        moe_case("forced_hier", two_nodes, hierarchical=True, bias=to_rank0, limited=1, topk=2)
        for hierarchical in (False, True):
            dispatcher_case(f"empty_{'hier' if hierarchical else 'flat'}", two_nodes, hierarchical, sizes=[5, 0, 3, 4])
        dispatcher_case("ungated_flat", two_nodes, False, sizes=[5, 0, 3, 4], gated=False)
        step_case("step_dp4_ep2", comm.Layout(4, 4, ep=2, n_experts=8))
        groups_case("groups_pp2_ep2", comm.Layout(4, 2, pp=2, ep=2))
        groups_case("groups_ep4_2nodes", two_nodes)
    else:
        moe_case("ep2_w2", comm.Layout(2, 2, ep=2))
        step_case("step_dp2_ep2", comm.Layout(2, 2, ep=2, n_experts=8))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32", "bfloat16"])
    opts = p.parse_args()
    dist.init_process_group("gloo")
    RANK, WORLD = dist.get_rank(), dist.get_world_size()
    DEVICE = torch.device("cuda", 0) if opts.device == "cuda" else torch.device("cpu")
    DTYPE = getattr(torch, opts.dtype)
    bf16 = DTYPE == torch.bfloat16
    AUTOCAST = lambda: torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731
    fp8.pow2_scales = True  # the single-process FP8 layer then quantizes as FP8 dispatch does (3.3.3)
    RESULTS = {}
    main()
    if RANK == 0:
        torch.save(dict(results=RESULTS, device=str(DEVICE), dtype=opts.dtype, world=WORLD), opts.out)
    dist.destroy_process_group()

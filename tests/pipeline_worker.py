"""Run under torchrun by test_dualpipe.py: one training step of a pipeline on PP processes (gloo), DualPipe
(pairs as F then B, and overlapped) and 1F1B, an evaluation, and on rank 0 the same step in one process
(model.Transformer, the same micro-batches as grad accumulation). Every rank saves what the test compares:
    python pipeline_worker.py OUT_DIR SEED [--device=cpu|cuda] [--dtype=float64|float32] [--ep=1|2]
--device=cuda: every rank computes on cuda:0, gloo's point-to-point staged through the CPU.
--ep=2 (4 processes): PP=2 x EP=2 (comm.init(pp=2, ep=2)): each pipeline's stages shard their experts
(comm.shard_experts), the two pipelines take one data shard each, the gradients are reduced over dp/edp
(comm.reduce_gradients) and the biases updated from the loads summed over dp; every all_to_all_single is
logged with its group, so the test can check that an ep group's members run them in one order."""

import argparse
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

import comm
import dualpipe
import model
import moe

p = argparse.ArgumentParser()
p.add_argument("out_dir")
p.add_argument("seed", type=int)
p.add_argument("--device", default="cpu")
p.add_argument("--dtype", default="float64")
p.add_argument("--ep", type=int, default=1)
cli = p.parse_args()
dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a hang fails the test, and soon
rank, world = dist.get_rank(), dist.get_world_size()
pp = world // cli.ep
device, dtype, seed = torch.device(cli.device), getattr(torch, cli.dtype), cli.seed
# PP=2: 5 blocks split 3 + 2; PP=4: 4 blocks, one each, the first stage dense only (no balance loss)
ARGS = dict(vocab_size=61, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=5 if pp == 2 else 4, n_dense_layers=1,
            n_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1, n_mtp=1,
            max_seq_len=32, init_std=0.1)
C, LAM, GAMMA, MAX_NORM = 2 * pp + 2, 0.3, 0.01, 0.05    # MAX_NORM below the gradient's norm: clipping acts
DP = cli.ep                                              # data shards: one per pipeline (PP x EP: dp = ep)
g = torch.Generator().manual_seed(seed)                  # the same fresh batches on every rank
tokens = torch.randint(0, ARGS["vocab_size"], (DP * C * 2, 9), generator=g)
x, y = tokens[:, :-1], tokens[:, 1:]
C_EVAL = 3                                               # evaluate() takes any number of micro-batches
eval_tokens = torch.randint(0, ARGS["vocab_size"], (C_EVAL * 2, 9), generator=g)
ex, ey = eval_tokens[:, :-1], eval_tokens[:, 1:]


def moe_names(modules):
    return [name for module in modules for name, m in module.named_modules() if isinstance(m, moe.MoE)]


def finish(m, names, moe_layers, clip, all_reduce=None):
    """Gradients, norm and clipped gradients, loads, then biases after update_bias: by full name."""
    grads = {n: p.grad.clone().cpu() for n, p in names}
    norm = clip().cpu() if clip else None
    clipped = {n: p.grad.clone().cpu() for n, p in names}
    loads = {n: layer.load.clone().cpu() for n, layer in zip(moe_names(m), moe_layers)}
    moe.update_bias(moe_layers, GAMMA, all_reduce)
    biases = {n: layer.gate.bias.clone().cpu() for n, layer in zip(moe_names(m), moe_layers)}
    return dict(grads=grads, norm=norm, clipped=clipped, loads=loads, biases=biases)


def clip_pipeline(pipe):
    """train.py's clipping over the pipeline: the global norm, each gradient counted on the rank that
    Pipeline.owns it, and every gradient held here (copies too) times the factor, applied here rather
    than inside AdamW. The norm in the gradients' dtype, as torch.nn.utils.clip_grad_norm_ returns it."""
    total = comm.grad_norm(pipe, pipe.owns)
    grads = [p.grad for p in pipe.parameters() if p.grad is not None]
    torch._foreach_mul_(grads, comm.clip_coefficient(total, MAX_NORM))
    return total.to(dtype)


def make_pipeline(args, schedule, overlap, group=None):
    pipe = dualpipe.Pipeline(args, schedule, group=group, device=device, dtype=dtype, seed=seed, overlap=overlap)
    pipe.load_state_dict(reference.state_dict())
    return pipe


def pipeline_step(args, schedule, overlap):
    pipe = make_pipeline(args, schedule, overlap)
    losses = pipe.step(x if pipe.needs_data else x.shape, y if pipe.needs_data else None, C, lam=LAM)
    evaluated = pipe.evaluate(ex if pipe.needs_data else ex.shape, ey if pipe.needs_data else None, C_EVAL)
    stages = sorted(pipe.stages, key=lambda s: s.index)
    r = finish(stages, list(pipe.named_parameters()), pipe.moe_layers(), lambda: clip_pipeline(pipe))
    embeds = [s.embed for s in pipe.stages if hasattr(s, "embed")]
    return dict(r, losses={k: v.item() for k, v in losses.items()}, stages=[s.index for s in pipe.stages],
                embeds=len(embeds), shared_embed=len(embeds) == 2 and embeds[0] is embeds[1],
                numel=sum(p.numel() for p in pipe.parameters()), evaluated=evaluated.item())


def single_process_step(args, xs, ys, clip=True):
    """train.py's step on one process: (loss / n).backward() per micro-batch, losses averaged; each
    micro-batch's losses kept; then the mean main loss of the evaluation micro-batches."""
    m = model.Transformer(args).to(device, dtype)
    m.load_state_dict(reference.state_dict())
    per_batch = []
    for xm, ym in zip(xs, ys):
        _, parts = m(xm.to(device), ym.to(device), lam=LAM)
        (parts["loss"] / len(xs)).backward()
        per_batch.append(torch.stack([parts[k].detach().double() for k in ("loss", "main", "mtp", "balance")]))
    losses = torch.stack(per_batch).mean(0)
    with torch.no_grad():
        evaluated = torch.stack([m(a.to(device), b.to(device))[1]["main"].double()
                                 for a, b in zip(ex.tensor_split(C_EVAL), ey.tensor_split(C_EVAL))]).mean()
    r = finish([m], list(m.named_parameters()), m.moe_layers(),
               (lambda: torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM)) if clip else None)
    return dict(r, losses=dict(zip(("loss", "main", "mtp", "balance"), losses.tolist())),
                per_batch=torch.stack(per_batch).cpu(), numel=sum(p.numel() for p in m.parameters()),
                evaluated=evaluated.item())


def pp_runs():
    """DualPipe (F then B, and overlapped) and 1F1B on the PP ranks; recompute too at PP=2."""
    global reference
    runs = {"": model.ModelArgs(**ARGS)}
    if pp == 2:  # recompute (3.2.3) under the zero-bubble split: checkpointed regions rerun in B and in W
        runs["recompute"] = model.ModelArgs(**ARGS, recompute=True)
    saved = {}
    for variant, args in runs.items():
        torch.manual_seed(seed)
        reference = model.Transformer(args).to(dtype)  # the same weights on every rank
        kinds = [("dualpipe", False), ("dualpipe", True)] + ([("1f1b", False)] if not variant else [])
        for schedule, overlap in kinds:
            saved[(variant, schedule + "-overlap" * overlap)] = pipeline_step(args, schedule, overlap)
        if rank == 0:
            saved[(variant, "single")] = single_process_step(args, list(x.tensor_split(C)), list(y.tensor_split(C)))
    return saved


def log_all_to_alls():
    """Every all_to_all_single until restore() appends to the returned list where it was called from (the
    comm.py function and its caller: a count exchange, a hop's start or back) and its group's ranks."""
    log, plain = [], dist.all_to_all_single

    def logged(*a, group=None, **kw):
        site = (sys._getframe(1).f_code.co_name, sys._getframe(2).f_code.co_name)
        log.append((site, tuple(dist.get_process_group_ranks(group))))
        return plain(*a, group=group, **kw)

    def restore():
        dist.all_to_all_single = plain
    dist.all_to_all_single = logged
    return log, restore


def ep_step(args, grid, hierarchical, overlap):
    """One PP x EP step as train.py runs it: shard_experts on each stage, step on this pipeline's data
    shard, reduce_gradients over dp/edp, update_bias with the loads summed over dp."""
    pipe = make_pipeline(args, "dualpipe", overlap, group=grid.groups["pp"])
    for stage in pipe.stages:
        comm.shard_experts(stage, grid, hierarchical=hierarchical)
    shard = slice(grid.dp_rank * C, (grid.dp_rank + 1) * C)
    log, restore = log_all_to_alls()
    losses = pipe.step(list(x.tensor_split(DP * C)[shard]), list(y.tensor_split(DP * C)[shard]), lam=LAM)
    evaluated = pipe.evaluate(ex, ey, C_EVAL)
    restore()
    comm.reduce_gradients(nn.ModuleList(pipe.stages), grid)
    stages = sorted(pipe.stages, key=lambda s: s.index)
    r = finish(stages, list(pipe.named_parameters()), pipe.moe_layers(), None, grid.sum_over_dp)
    slices = {n: comm.expert_range(grid, args.n_routed_experts) for n, _ in pipe.named_parameters() if ".experts." in n}
    return dict(r, losses={k: v.item() for k, v in losses.items()}, evaluated=evaluated.item(), slices=slices,
                all_to_alls=log, groups=grid.ranks, dp_rank=grid.dp_rank,
                hierarchical=all(m.dispatcher.hierarchical for m in pipe.moe_layers()))


def ep_runs():
    global reference
    args = model.ModelArgs(**ARGS)
    torch.manual_seed(seed)
    reference = model.Transformer(args).to(dtype)
    saved = {}
    flat = comm.init(pp=pp, ep=cli.ep)           # torchrun's one node: the ep group inside it
    across = comm.make_grid(comm.Layout(world, 1, pp, cli.ep), rank)  # every rank its own node
    for name, grid, hierarchical, overlap in [("flat", flat, False, False), ("flat-overlap", flat, False, True),
                                              ("hierarchical", across, True, False),
                                              ("hierarchical-overlap", across, True, True)]:
        saved[name] = ep_step(args, grid, hierarchical, overlap)
    if rank == 0:
        saved["single"] = single_process_step(args, list(x.tensor_split(DP * C)), list(y.tensor_split(DP * C)),
                                              clip=False)
    return saved


saved = ep_runs() if cli.ep > 1 else pp_runs()
torch.save(saved, f"{cli.out_dir}/rank{rank}.pt")
dist.destroy_process_group()

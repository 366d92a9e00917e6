"""Run under torchrun by test_dualpipe.py: one training step of a pipeline on PP CPU processes (gloo),
DualPipe and 1F1B, and on rank 0 the same step in one process (model.Transformer, the same micro-batches
as grad accumulation). Every rank saves what the test compares:
    python pipeline_worker.py OUT_DIR SEED [DEVICE]
DEVICE cuda: both ranks compute on the GPU, gloo's point-to-point staged through the CPU."""

import sys
from datetime import timedelta

import torch
import torch.distributed as dist

import dualpipe
import model
import moe

dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # a hang fails the test, and soon
rank, pp = dist.get_rank(), dist.get_world_size()
out_dir, seed = sys.argv[1], int(sys.argv[2])
device = torch.device(sys.argv[3] if len(sys.argv) > 3 else "cpu")
# PP=2: 5 blocks split 3 + 2; PP=4: 4 blocks, one each, the first stage dense only (no balance loss)
ARGS = dict(vocab_size=61, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=5 if pp == 2 else 4, n_dense_layers=1,
            n_heads=2, q_lora_rank=16, kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
            n_routed_experts=8, n_activated_experts=2, n_expert_groups=2, n_limited_groups=1, n_mtp=1,
            max_seq_len=32, init_std=0.1)
C, LAM, GAMMA, MAX_NORM = 2 * pp + 2, 0.3, 0.01, 0.05    # MAX_NORM below the gradient's norm: clipping acts
g = torch.Generator().manual_seed(seed)                  # the same fresh batch on every rank
tokens = torch.randint(0, ARGS["vocab_size"], (C * 2, 9), generator=g)
x, y = tokens[:, :-1], tokens[:, 1:]


def moe_names(modules):
    return [name for module in modules for name, m in module.named_modules() if isinstance(m, moe.MoE)]


def finish(m, names, moe_layers, clip):
    """Gradients, norm and clipped gradients, loads, then biases after update_bias: by full name."""
    grads = {n: p.grad.clone() for n, p in names}
    norm = clip()
    clipped = {n: p.grad.clone() for n, p in names}
    loads = {n: layer.load.clone() for n, layer in zip(moe_names(m), moe_layers)}
    moe.update_bias(moe_layers, GAMMA)
    biases = {n: layer.gate.bias.clone() for n, layer in zip(moe_names(m), moe_layers)}
    return dict(grads=grads, norm=norm, clipped=clipped, loads=loads, biases=biases)


def pipeline_step(args, schedule):
    pipe = dualpipe.Pipeline(args, schedule, device=device, dtype=torch.float64, seed=seed)
    pipe.load_state_dict(reference.state_dict())
    losses = pipe.step(x if pipe.needs_data else x.shape, y if pipe.needs_data else None, C, lam=LAM)
    stages = sorted(pipe.stages, key=lambda s: s.index)
    r = finish(stages, list(pipe.named_parameters()), pipe.moe_layers(), lambda: pipe.clip_grad_norm_(MAX_NORM))
    embeds = [s.embed for s in pipe.stages if hasattr(s, "embed")]
    return dict(r, losses={k: v.item() for k, v in losses.items()}, stages=[s.index for s in pipe.stages],
                embeds=len(embeds), shared_embed=len(embeds) == 2 and embeds[0] is embeds[1],
                numel=sum(p.numel() for p in pipe.parameters()))


def single_process_step(args):
    """train.py's step on one process: (loss / C).backward() per micro-batch, losses averaged."""
    m = model.Transformer(args).double().to(device)
    m.load_state_dict(reference.state_dict())
    losses = torch.zeros(4, dtype=torch.float64, device=device)
    for xm, ym in zip(x.tensor_split(C), y.tensor_split(C)):
        _, parts = m(xm.to(device), ym.to(device), lam=LAM)
        (parts["loss"] / C).backward()
        losses += torch.stack([parts[k].detach() for k in ("loss", "main", "mtp", "balance")]) / C
    r = finish([m], list(m.named_parameters()), m.moe_layers(),
               lambda: torch.nn.utils.clip_grad_norm_(m.parameters(), MAX_NORM))
    return dict(r, losses=dict(zip(("loss", "main", "mtp", "balance"), losses.tolist())),
                numel=sum(p.numel() for p in m.parameters()))


runs = {"": model.ModelArgs(**ARGS)}
if pp == 2:  # recompute (3.2.3) under the zero-bubble split: checkpointed regions rerun in B and in W
    runs["recompute"] = model.ModelArgs(**ARGS, recompute=True)
saved = {}
for variant, args in runs.items():
    torch.manual_seed(seed)
    reference = model.Transformer(args).double()  # the same weights on every rank
    for schedule in ("dualpipe", "1f1b") if not variant else ("dualpipe",):
        saved[(variant, schedule)] = pipeline_step(args, schedule)
    if rank == 0:
        saved[(variant, "single")] = single_process_step(args)
torch.save(saved, f"{out_dir}/rank{rank}.pt")
dist.destroy_process_group()

"""Run under torchrun by test_ddp.py: one data-parallel step on 2 CPU processes (gloo), reduced as
train.py does (comm.reduce_gradients, loads summed before the bias update), and on rank 0 the same
step in a single process over both ranks' batches. Saves both results for the test."""

import copy
import sys

import torch
import torch.distributed as dist

import comm
import model
import moe

grid = comm.init(backend="gloo")
rank, world = dist.get_rank(), dist.get_world_size()
args = model.ModelArgs(vocab_size=61, dim=32, inter_dim=48, moe_inter_dim=16, n_layers=2, n_heads=2, q_lora_rank=16,
                       kv_lora_rank=8, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8,
                       n_activated_experts=2, n_expert_groups=2, n_limited_groups=1, max_seq_len=32, init_std=0.1)
torch.manual_seed(0)  # the same initial weights on every rank
net = model.Transformer(args).double()
single = copy.deepcopy(net)
batches = [torch.randint(0, 61, (3, 17), generator=torch.Generator().manual_seed(100 + r)) for r in range(world)]


def step(m, tokens, all_reduce):
    _, losses = m(tokens[:, :-1], tokens[:, 1:])
    losses["loss"].backward()
    if all_reduce is not None:
        comm.reduce_gradients(m, grid)
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    moe.update_bias(m.moe_layers(), gamma=0.01, all_reduce=all_reduce)
    return grads, {n: b.clone() for n, b in m.named_buffers() if n.endswith("gate.bias")}, losses["loss"].detach()


grads, biases, loss = step(net, batches[rank], grid.sum_over_dp)
dist.all_reduce(loss)
if rank == 0:
    ref_grads, ref_biases, ref_loss = step(single, torch.cat(batches), None)
    torch.save(dict(grads=grads, biases=biases, loss=loss / world, ref_grads=ref_grads, ref_biases=ref_biases,
                    ref_loss=ref_loss), sys.argv[1])
dist.destroy_process_group()

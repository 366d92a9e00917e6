"""Run under torchrun by test_checkpoint.py: three ranks write one checkpoint, as expert parallelism
does: a dense tensor written by rank 0 alone, and an "experts" tensor of 6 rows of which each rank
holds 2 (rank r: rows 2r..2r+1). argv: the checkpoint path, the step."""

import sys

import torch
import torch.distributed as dist

import checkpoint

dist.init_process_group("gloo")
rank = dist.get_rank()
full = torch.arange(6 * 3, dtype=torch.float32).view(6, 3) * (int(sys.argv[2]) + 1)
mine = full[2 * rank:2 * rank + 2].clone()
tensors = dict(model={"experts.w1": mine}, ema={"experts.w1": mine + 0.5})
if rank == 0:
    tensors["model"]["dense.weight"] = torch.ones(4)
checkpoint.save(sys.argv[1], dict(model_args={}, step=int(sys.argv[2])), tensors,
                slices={"experts.w1": (2 * rank, 2 * rank + 2)})
dist.destroy_process_group()

"""
Train a DeepSeek-V3-style model (arXiv 2412.19437) on one CPU, one GPU, or many GPUs.

    python train.py                                   # the nano preset on Shakespeare, CPU or GPU
    python train.py --preset=small --seq_len=2048     # one GPU
    torchrun --standalone --nproc_per_node=8 train.py --preset=small      # one node, data parallel
    torchrun --standalone --nproc_per_node=8 train.py --preset=small --ep=8   # experts over the 8 GPUs
    torchrun --standalone --nproc_per_node=8 train.py --preset=small --pp=4 --ep=2 --grad_accum=8  # DualPipe
    # two nodes: run on each, with --node_rank=0 on the first and --node_rank=1 on the second
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=10.0.0.1:29500 \\
        train.py --preset=small --ep=16 --dispatch=hierarchical --n_expert_groups=2 --n_limited_groups=1

Every setting below can be overridden with --key=value, and so can every ModelArgs field of the
preset (--n_layers=2, --dim=256, ...); --resume alone means --resume=True.

What the paper's training recipe contributes here:
    AdamW (0.9, 0.95, weight decay 0.1), FP32 master weights and gradients, BF16 moments     3.3.3
    BF16 autocast on the GPU (FP8 GEMMs with --fp8=True, fp8.py)                             3.3
    the auxiliary-loss-free bias update after each step, gamma on a schedule                 2.1.2, 4.2
      (--balance=aux: the expert-level auxiliary loss instead, the ablation's baseline; none: neither)
    the MTP loss weight lambda on a schedule                                                 2.2, 4.2
    an exponential moving average of the weights kept in CPU memory, updated off the GPU     3.2.3
    expert parallelism with all-to-all dispatch, node-limited routing (comm.py)              2.1.2, 3.2.2
    DualPipe pipeline parallelism with overlapped forward/backward pairs (dualpipe.py)       3.2.1
    checkpoints any layout can resume and one process can read (checkpoint.py)
Simplified: warmup then cosine decay instead of the paper's constant-then-cosine schedule;
optimizer state is not sharded (no ZeRO-1).
"""

import difflib
import json
import math
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, fields
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import checkpoint as checkpoint_lib
import comm
import data as data_lib
import dualpipe
import model as model_lib
import moe as moe_lib
from moe import update_bias

# -----------------------------------------------------------------------------
# settings (--key=value overrides any of them; --help lists them)
# data
data = "shakespeare"        # "shakespeare", a text file / directory / glob, or modded-nanogpt .bin shards
tokenizer = "bpe"           # "bpe" trains the project's byte-level BPE to the model's vocab_size; "gpt2"; a .tiktoken file
cache_dir = "data"          # prepared token files, reused across runs
val_fraction = 0.05         # the last part of every document, held out for validation
# model
preset = "nano"             # nano | small | v3-gpu | v2-lite | v3 (model.PRESETS); any ModelArgs field overrides it
# batch
batch_size = 8              # sequences per micro-batch per process
seq_len = 256               # tokens per sequence (raises the preset's max_seq_len if longer)
grad_accum = 1              # micro-batches per optimizer step (--micro_batches is the same setting)
# optimizer (3.3.3)
max_iters = 300             # optimizer steps of the whole run (the schedules below are fractions of it)
lr = 3e-3                   # peak learning rate, after warmup
min_lr = 3e-4               # learning rate at max_iters, the end of the cosine decay
warmup_iters = 30           # linear warmup steps
weight_decay = 0.1          # decoupled (AdamW), on matrices and embeddings only
beta1 = 0.9                 # AdamW
beta2 = 0.95                # AdamW
grad_clip = 1.0             # global gradient-norm clip
moments_dtype = "bfloat16"  # AdamW's first and second moments: "bfloat16" (the paper) or "float32"
# schedules (4.2): MTP weight lambda, then the bias update speed gamma
mtp_lambda = 0.3            # MTP loss weight lambda until mtp_switch
mtp_lambda_final = 0.1      # ... and after it
mtp_switch = 0.7            # fraction of max_iters after which lambda = mtp_lambda_final
bias_gamma = 0.01           # bias update speed; the paper uses 0.001 over ~10^6 steps, short runs need more
bias_gamma_final = 0.0      # bias update speed after gamma_switch
gamma_switch = 0.95         # fraction of max_iters after which gamma = bias_gamma_final
# EMA of the weights (3.2.3)
ema_decay = 0.99            # per step
ema_interval = 10           # steps between EMA updates (each applies ema_decay ** ema_interval)
# evaluation, logging, checkpoints
eval_interval = 100         # steps between evaluations, each followed by a checkpoint
eval_iters = 10             # validation steps per evaluation, each the size of a training step
log_interval = 10           # steps between log lines (out_dir/log.jsonl)
out_dir = "out"             # checkpoint, tokenizer and log of this run
resume = False              # continue the run in out_dir from its checkpoint, with its settings
stop_iter = 0               # if > 0, end this run at this iteration with a checkpoint (--resume continues)
save_checkpoints = True     # False: no checkpoint at all, only the log (ablation runs); an interrupt just stops
# parallelism, under torchrun (comm.py, dualpipe.py): pipeline stages x data parallel, and within the latter
pp = 1                      # pipeline parallelism: the blocks split into this many stages (DualPipe: even)
pipeline = "dualpipe"       # the pipeline schedule: dualpipe (3.2.1) | 1f1b; grad_accum micro-batches per step
overlap = True              # DualPipe's overlapped forward/backward pairs (the all-to-all hidden behind compute)
ep = 1                      # expert parallelism: each MoE layer's routed experts split over this many ranks
pp_inner = False            # rank order. True: a pipeline's stages on consecutive ranks (a node), dp and ep across nodes
dispatch = "flat"           # expert-parallel all-to-all: flat | hierarchical (3.2.2: a node once, then NVLink)
nccl_channels = 0           # cap on NCCL's channels (one thread block, i.e. one SM, each) per kernel; 0: NCCL's choice
# system
device = "auto"             # auto | cpu | cuda | cuda:N
dtype = "auto"              # auto (bfloat16 autocast on the GPU, float32 on the CPU) | float32 | bfloat16
compile = "auto"            # auto (on CUDA) | true | false | graphs (compiled, replayed as CUDA graphs: one GPU)
seed = 1337                 # weights and data order

SETTINGS = {k: v for k, v in list(globals().items()) if not k.startswith("_") and type(v) in (int, float, bool, str)}
CHOICES = dict(compile=("auto", "true", "false", "graphs"), dtype=("auto", "bfloat16", "float32"),
               moments_dtype=("bfloat16", "float32"), dispatch=("flat", "hierarchical"), pipeline=("dualpipe", "1f1b"),
               balance=("bias", "aux", "none"))  # balance: a ModelArgs field (moe.py), checked here too
ALIASES = dict(micro_batches="grad_accum")  # the pipeline's name for the micro-batches of a step
H200_BF16_FLOPS = 989e12    # dense BF16 datasheet rate, the denominator of MFU
LOSS_NAMES = ("loss", "main", "mtp", "balance")


def parse_value(key, text, like):
    """text -> the type of `like`; a value that does not fit names the setting."""
    if isinstance(like, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise SystemExit(f"--{key}={text}: expected true or false")
    try:
        return type(like)(text)
    except ValueError:
        raise SystemExit(f"--{key}={text}: expected a {type(like).__name__}") from None


def parse_args(settings, argv, model_fields=(), choices=None, script=None):
    """--key=value arguments -> (settings namespace, overrides of the fields in model_fields, the
    keys given). -h / --help prints the settings block of `script` and exits."""
    config, model_overrides, given = dict(settings), {}, []
    model_fields = {f.name: f.default for f in fields(model_lib.ModelArgs) if f.name in model_fields}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(settings_help(script or __file__, settings, model_fields))
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise SystemExit(f"arguments look like --key=value, got {arg!r} (--help lists the settings)")
        key, eq, text = arg[2:].partition("=")
        key = ALIASES.get(key, key) if key not in config else key
        if key in config:
            like = config[key]
        elif key in model_fields:
            like = model_fields[key]
        else:
            near = difflib.get_close_matches(key, [*config, *model_fields], n=3)
            raise SystemExit(f"unknown setting --{key}" + (f"; did you mean {' or '.join('--' + k for k in near)}?"
                                                           if near else "") + " (--help lists the settings)")
        if not eq and not isinstance(like, bool):
            raise SystemExit(f"--{key} needs a value: --{key}=...")
        value = parse_value(key, text, like) if eq else True
        if choices and key in choices and value not in choices[key]:
            raise SystemExit(f"--{key}={value}: expected one of {', '.join(choices[key])}")
        if key in config:
            config[key] = value
            given.append(key)
        else:
            model_overrides[key] = value
    return SimpleNamespace(**config), model_overrides, given


def settings_help(script, settings, model_fields=()):
    """What --help prints: the settings block at the top of `script` (each setting, its default and
    the comment beside it, under the block's section titles), then ModelArgs' fields and the presets."""
    out = [f"usage: python {os.path.basename(script)} [--key=value ...]", ""]
    assignment = re.compile(r"(\w+)\s*=\s*(.+?)\s*(?:#\s?(.*))?$")
    for line in open(script):
        m = assignment.match(line)
        if m and m[1] in settings:
            out.append(f"  --{m[1]}={settings[m[1]]}".ljust(32) + f" {m[3] or ''}".rstrip())
        elif line.startswith("# ") and out[-1:] != [""] and not line.startswith("# ---"):
            out.append(line[2:].rstrip())
        elif line.startswith("SETTINGS ="):
            break
    if model_fields:
        out += ["", "model (ModelArgs in model.py, nano's values; the preset sets them, --key=value overrides):"]
        for line in open(model_lib.__file__):
            m = re.match(r"    (\w+): \w+ = .+?(?:#\s?(.*))?$", line)
            if m and m[1] in model_fields and m[1] not in settings:
                out.append(f"  --{m[1]}={model_fields[m[1]]}".ljust(32) + f" {m[2] or ''}".rstrip())
        out += ["", "presets (parameters without the MTP module: total, activated per token):"]
        for name in model_lib.PRESETS:
            n = model_lib.count_params(model_lib.preset(name))
            out.append(f"  {name:8} {n['total'] / 1e6:>10,.1f}M {n['activated'] / 1e6:>10,.1f}M")
    return "\n".join(out)


# Checked before anything runs: (setting, test, what is allowed).
LIMITS = [("batch_size", lambda v: v >= 1, "at least 1"), ("seq_len", lambda v: v >= 1, "at least 1"),
          ("grad_accum", lambda v: v >= 1, "at least 1"), ("max_iters", lambda v: v >= 1, "at least 1"),
          ("eval_interval", lambda v: v >= 1, "at least 1"), ("eval_iters", lambda v: v >= 1, "at least 1"),
          ("log_interval", lambda v: v >= 1, "at least 1"), ("ema_interval", lambda v: v >= 1, "at least 1"),
          ("warmup_iters", lambda v: v >= 0, "0 or more"), ("stop_iter", lambda v: v >= 0, "0 (off) or more"),
          ("lr", lambda v: v > 0, "above 0"), ("min_lr", lambda v: v >= 0, "0 or more"),
          ("grad_clip", lambda v: v > 0, "above 0"), ("weight_decay", lambda v: v >= 0, "0 or more"),
          ("beta1", lambda v: 0 <= v < 1, "in [0, 1)"), ("beta2", lambda v: 0 <= v < 1, "in [0, 1)"),
          ("ema_decay", lambda v: 0 <= v <= 1, "in [0, 1]"), ("val_fraction", lambda v: 0 < v < 1, "in (0, 1)"),
          ("mtp_switch", lambda v: 0 <= v <= 1, "in [0, 1]"), ("gamma_switch", lambda v: 0 <= v <= 1, "in [0, 1]"),
          ("ep", lambda v: v >= 1, "at least 1"), ("pp", lambda v: v >= 1, "at least 1"), ("nccl_channels", lambda v: v >= 0, "0 (NCCL's choice) or more"),
          ("device", lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v), "auto, cpu, cuda or cuda:N")]


def check_settings(c):
    for key, ok, allowed in LIMITS:
        if not ok(getattr(c, key)):
            raise SystemExit(f"--{key}={getattr(c, key)}: expected {allowed}")
    if c.stop_iter and not c.save_checkpoints:
        raise SystemExit(f"--stop_iter={c.stop_iter} ends the run with a checkpoint to resume from, "
                         f"and --save_checkpoints=False writes none: drop one of the two")


# On --resume every setting comes from the checkpoint; these may be given anew (each change is printed).
# Settings of the parallel layout join them as they come (comm.py, dualpipe.py).
RESUMABLE = {"max_iters", "eval_interval", "eval_iters", "log_interval", "device", "dtype", "compile", "cache_dir",
             "save_checkpoints", "batch_size", "grad_accum", "ep", "dispatch", "nccl_channels", "pp", "pipeline",
             "overlap", "pp_inner"}
# Settings of one invocation, never taken from the checkpoint (out_dir is where it was found).
PER_RUN = {"resume", "stop_iter", "out_dir"}


def resume_settings(c, given, model_overrides, ckpt, world):
    """The checkpoint's settings, with the changes the command line may make; anything else differing
    from the checkpoint stops the run with one line naming the setting."""
    saved = {**SETTINGS, **ckpt.get("config", {})}  # settings newer than the checkpoint keep their default
    resolved = dict(saved)
    for key in given:
        new, old = getattr(c, key), saved[key]
        if new == old:
            continue
        if key not in RESUMABLE:
            raise SystemExit(f"--{key}={new}: the checkpoint's run has {key}={old}, and a resumed run keeps it; "
                             f"on --resume only these may change: {', '.join(sorted(RESUMABLE | PER_RUN))}")
        print0(f"resume: {key} {old} -> {new}")
        resolved[key] = new
    for key, new in model_overrides.items():
        if ckpt["model_args"].get(key) != new:
            raise SystemExit(f"--{key}={new}: the checkpoint's model has {key}={ckpt['model_args'].get(key)}, "
                             f"and a resumed run cannot change the model")
    r = SimpleNamespace(**resolved)
    old_batch, dp = ckpt.get("global_batch", saved["batch_size"] * saved["grad_accum"]), world // r.pp
    if r.batch_size * r.grad_accum * dp != old_batch:
        raise SystemExit(f"--batch_size={r.batch_size} x --grad_accum={r.grad_accum} x {dp} data-parallel rank(s) "
                         f"gives {r.batch_size * r.grad_accum * dp} sequences per step; the checkpoint's run took "
                         f"{old_batch}: keep the global batch when resuming (e.g. with --grad_accum)")
    return r


# -----------------------------------------------------------------------------
# processes and devices

CONTROL = None  # a gloo group for the stop flag (any_rank): CPU messages that do not wait on the GPU


def compute_init(c, args):
    """(grid, device): the process grid of comm.py from torchrun's environment (WORLD_SIZE, RANK,
    LOCAL_RANK, LOCAL_WORLD_SIZE; plain python is one process), a layout that does not fit refused."""
    global CONTROL
    world = int(os.environ.get("WORLD_SIZE", 1))
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={c.device}: CUDA is not available here; use --device=cpu")
    cuda = torch.cuda.is_available() and c.device != "cpu"
    if world > 1 and cuda:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    else:
        device = torch.device(c.device if c.device != "auto" else "cuda" if cuda else "cpu")
    try:
        if c.pp > 1:  # a schedule and a split of the blocks that fit, before any process starts talking
            (dualpipe.schedule if c.pipeline == "dualpipe" else dualpipe.schedule_1f1b)(c.pp, c.grad_accum)
            dualpipe.stage_layers(args, c.pp)
    except ValueError as e:
        raise SystemExit(f"--pp={c.pp} --pipeline={c.pipeline} with --grad_accum={c.grad_accum} micro-batches: "
                         f"{e}") from None
    try:
        grid = comm.init(pp=c.pp, ep=c.ep, nccl_channels=c.nccl_channels or None, n_experts=args.n_routed_experts,
                         backend="nccl" if cuda else "gloo", pp_inner=c.pp_inner)
        if c.ep > 1:
            comm.check_node_limited(args, grid.layout)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if dist.is_initialized() and dist.get_backend() == "nccl":
        CONTROL = dist.new_group(backend="gloo")
    return grid, device


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        tqdm.write(" ".join(str(a) for a in args), **kwargs)


def any_rank(flag):
    """True on every rank when `flag` is true on any: ranks agree on when to stop."""
    if not dist.is_initialized():
        return bool(flag)
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=CONTROL)
    return bool(t.item())


class Interrupt:
    """Ctrl-C (SIGINT) or SIGTERM, what a cluster scheduler sends before preemption (torchrun's
    agent too, 30 s before it kills): the step in progress finishes, a checkpoint is written and the
    run exits with 128 + the signal number. A second Ctrl-C exits at once, without a checkpoint."""

    def __init__(self, checkpoint=True):
        self.signum, self.then = 0, "then a checkpoint" if checkpoint else "then stopping (--save_checkpoints=False)"
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def handle(self, signum, frame):
        if not self.signum:
            self.signum = signum
            print0(f"\n{signal.Signals(signum).name}: finishing this step, {self.then} "
                   f"(Ctrl-C again to exit at once)")
        elif signum == signal.SIGINT:
            print("second interrupt: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


# -----------------------------------------------------------------------------
# optimizer

class AdamW(torch.optim.Optimizer):
    """AdamW with decoupled weight decay whose moments are stored in `moments_dtype` (BF16 in the
    paper, 3.3.3) while the update itself is computed in FP32 against FP32 master weights.
    With FP32 moments it is torch.optim.AdamW, which the tests hold it against. compiled=True runs
    the same arithmetic as one fused kernel per parameter (adamw_update), the GPU default; the
    foreach path below is its twin: on the H200 it spent 27 ms of a 167 ms step, the fused one 6.5."""

    def __init__(self, params, lr, betas, weight_decay, eps=1e-8, moments_dtype=torch.bfloat16, compiled=False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps))
        self.moments_dtype = moments_dtype
        # compiled: one fused kernel per parameter (adamw_update) instead of a dozen foreach passes
        self.fused_update = torch.compile(adamw_update, dynamic=True) if compiled else None

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # which casts every state tensor to its parameter's dtype...
        for state in self.state.values():  # ...so put the moments back into theirs
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = state[key].to(self.moments_dtype)

    @torch.no_grad()
    def step(self, grad_scale=None):
        """grad_scale (a 0-dim tensor, e.g. gradient clipping's coefficient): every gradient is taken
        times it, inside the fused update (one pass less over the gradients than scaling them first)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p] = dict(step=torch.zeros((), dtype=torch.float32),
                                         exp_avg=torch.zeros_like(p, dtype=self.moments_dtype),
                                         exp_avg_sq=torch.zeros_like(p, dtype=self.moments_dtype))
            states = [self.state[p] for p in params]
            torch._foreach_add_([s["step"] for s in states], 1)
            t = states[0]["step"].item()
            beta1, beta2 = group["betas"]
            decay = 1 - group["lr"] * group["weight_decay"]  # decoupled weight decay
            step_size = group["lr"] / (1 - beta1 ** t)  # with the bias correction of m
            bc2_sqrt = math.sqrt(1 - beta2 ** t)  # the bias correction of v, under the root
            if self.fused_update is not None:
                # the scalars as 0-dim tensors: the compiled kernel reads them instead of being
                # recompiled whenever the learning rate or the step changes
                *h, one = to_device(torch.tensor([1 - beta1, beta2, 1 - beta2, bc2_sqrt, group["eps"], decay,
                                                  step_size, 1.0]), params[0].device).unbind()
                scale = one if grad_scale is None else grad_scale
                for p, s in zip(params, states):
                    self.fused_update(p.view(-1), p.grad.view(-1), s["exp_avg"].view(-1), s["exp_avg_sq"].view(-1),
                                      *h, scale)
                continue
            if grad_scale is not None:
                torch._foreach_mul_([p.grad for p in params], grad_scale)
            grads = [p.grad.float() for p in params]
            # FP32 working copies of BF16 moments; FP32 moments are updated in place (.float() is then
            # the moment itself, and the copies back below copy a tensor onto itself)
            m = [s["exp_avg"].float() for s in states]
            v = [s["exp_avg_sq"].float() for s in states]
            torch._foreach_lerp_(m, grads, 1 - beta1)  # m = beta1 m + (1 - beta1) g
            torch._foreach_mul_(v, beta2)
            torch._foreach_addcmul_(v, grads, grads, value=1 - beta2)  # v = beta2 v + (1 - beta2) g^2
            torch._foreach_copy_([s["exp_avg"] for s in states], m)
            torch._foreach_copy_([s["exp_avg_sq"] for s in states], v)
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, group["eps"])
            torch._foreach_mul_(params, decay)
            torch._foreach_addcdiv_(params, m, denom, value=-step_size)


def to_device(t, device):
    """t (CPU) on device, without waiting for the GPU: a copy from pageable memory to the GPU first
    lets the GPU drain (torch.tensor(x, device="cuda") too), which takes away the host's lead over
    the GPU in every step; from pinned memory the copy is queued like a kernel."""
    if device.type != "cuda":
        return t.to(device)
    # contiguous first: a strided source would be made contiguous again by the copy, in pageable memory
    return t.contiguous().pin_memory().to(device, non_blocking=True)


def adamw_update(p, g, m, v, one_minus_beta1, beta2, one_minus_beta2, bc2_sqrt, eps, decay, step_size, scale):
    """AdamW.step's arithmetic for one parameter, in FP32, the moments stored back in their own
    dtype; torch.compile fuses it into one pass over p, g, m and v. The scalars are the ones
    AdamW.step computes for both paths; scale multiplies the gradient (clipping)."""
    g = g.float() * scale
    m32 = m.float().lerp(g, one_minus_beta1)
    v32 = v.float() * beta2 + one_minus_beta2 * g * g
    m.copy_(m32)
    v.copy_(v32)
    p.copy_(p * decay - step_size * m32 / (v32.sqrt() / bc2_sqrt + eps))


def make_optimizer(model, c, compiled=False):
    decay = [p for p in model.parameters() if p.dim() >= 2]  # matrices and embeddings
    no_decay = [p for p in model.parameters() if p.dim() < 2]  # norm gains
    groups = [dict(params=decay, weight_decay=c.weight_decay), dict(params=no_decay, weight_decay=0.0)]
    dtype = dict(bfloat16=torch.bfloat16, float32=torch.float32)[c.moments_dtype]
    return AdamW(groups, lr=c.lr, betas=(c.beta1, c.beta2), weight_decay=c.weight_decay, moments_dtype=dtype,
                 compiled=compiled)


def lr_at(step, c):
    """Linear warmup, then cosine decay from lr to min_lr at max_iters."""
    if step < c.warmup_iters:
        return c.lr * (step + 1) / c.warmup_iters
    progress = (step - c.warmup_iters) / max(1, c.max_iters - c.warmup_iters)
    return c.min_lr + 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))) * (c.lr - c.min_lr)


# -----------------------------------------------------------------------------
# EMA in CPU memory (3.2.3)

class EMA:
    """Exponential moving average of the parameters, held in CPU memory.

    On the GPU, update() copies the weights into pinned CPU buffers on a side stream, and a CPU
    thread folds them into the average once the copy has landed, while the GPU trains on; the next
    optimizer step waits (on the GPU, not the CPU) for the copy to finish reading the weights.
    """

    def __init__(self, model, decay):
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.shadow = [p.detach().float().cpu().clone() for p in model.parameters()]
        cuda = next(model.parameters()).is_cuda
        self.staged = [torch.empty_like(s, pin_memory=cuda) for s in self.shadow]
        self.stream = torch.cuda.Stream() if cuda else None
        self.copied = None  # CUDA event: the staged copy is complete
        self.worker = None

    def update(self, model, decay):
        self.wait()
        params = [p.detach() for p in model.parameters()]
        if self.stream is None:
            torch._foreach_lerp_(self.shadow, [p.float() for p in params], 1 - decay)
            return
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            for buf, p in zip(self.staged, params):
                buf.copy_(p, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()
        copied = self.copied

        def fold():
            copied.synchronize()
            torch._foreach_lerp_(self.shadow, self.staged, 1 - decay)

        self.worker = threading.Thread(target=fold)
        self.worker.start()

    def before_optimizer_step(self):
        """The optimizer must not write the weights while they are being copied out."""
        if self.copied is not None:
            torch.cuda.current_stream().wait_event(self.copied)

    def wait(self):
        if self.worker is not None:
            self.worker.join()
            self.worker = None

    @contextmanager
    def applied(self, model):
        """Inside the block the model holds the average (rounded to its dtype); after it, its own
        weights again, bit for bit. The average itself is only read."""
        self.wait()
        # copy=True: .to() of a CPU tensor that has the dtype already would return the tensor itself
        own = [p.detach().to("cpu", copy=True) for p in model.parameters()]
        with torch.no_grad():
            for s, p in zip(self.shadow, model.parameters()):
                p.copy_(s)
        try:
            yield model
        finally:
            with torch.no_grad():
                for w, p in zip(own, model.parameters()):
                    p.copy_(w)

    def state_dict(self):
        self.wait()
        return dict(zip(self.names, self.shadow))

    def load_state_dict(self, sd):
        for name, s in zip(self.names, self.shadow):
            s.copy_(sd[name])


# -----------------------------------------------------------------------------
# checkpoints (checkpoint.py: the format)

def adam_moments(model, optimizer):
    """AdamW's moments by parameter name, the way checkpoint.py stores them."""
    named = [(n, optimizer.state[p]) for n, p in model.named_parameters() if optimizer.state.get(p)]
    return dict(exp_avg={n: s["exp_avg"] for n, s in named}, exp_avg_sq={n: s["exp_avg_sq"] for n, s in named})


def load_adam_moments(model, optimizer, tensors, step):
    for n, p in model.named_parameters():
        if n in tensors["exp_avg"]:
            optimizer.state[p] = dict(step=torch.tensor(float(step)),
                                      **{k: tensors[k][n].to(p.device, optimizer.moments_dtype, copy=True)
                                         for k in ("exp_avg", "exp_avg_sq")})


@torch.no_grad()
def evaluate(main_loss, loader_factory, steps, grad_accum, grid):
    """Mean main-model cross-entropy over `steps` evaluation steps of one global batch each, drawn the
    same way every time; main_loss(micro-batches) -> their mean main loss."""
    loader = loader_factory()
    total = sum(main_loss([loader.next_batch() for _ in range(grad_accum)]).double() for _ in range(steps))
    grid.all_reduce(total, "dp")
    return (total / grid.layout.dp / steps).item()


class FiniteCheck:
    """check_finite on every step's losses without making the host wait for the GPU each step: on
    CUDA the losses are copied into pinned host memory as the GPU reaches them (non_blocking, with an
    event) and checked at the next step, once that step's work is queued behind them, so the GPU
    never runs dry. done() checks the pending step at once: before a log line or a checkpoint, which
    therefore never hold the weights of a step whose loss was not finite."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.pending = None  # (losses on the host, the event after their copy or None, step)

    def submit(self, losses, step):
        previous = self.pending
        if self.cuda:
            host = torch.empty(losses.shape, dtype=losses.dtype, pin_memory=True)
            host.copy_(losses, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending = (host, event, step)
        else:
            self.pending = (losses.clone(), None, step)
        if previous is not None:
            self._check(*previous)

    def done(self):
        pending, self.pending = self.pending, None
        if pending is not None:
            self._check(*pending)

    @staticmethod
    def _check(losses, event, step):
        if event is not None:
            event.synchronize()  # only as far as that step's losses: later work keeps the GPU busy
        check_finite(losses, step)


def check_finite(losses, step):
    bad = [name for name, v in zip(LOSS_NAMES, losses.tolist()) if not math.isfinite(v)]
    if bad:
        raise FloatingPointError(f"step {step}: non-finite {', '.join(bad)} "
                                 f"({', '.join(f'{n}={v}' for n, v in zip(LOSS_NAMES, losses.tolist()))}); stopping")



def configure(argv):
    """(settings, model arguments, checkpoint or None), every one checked before anything is written:
    a fresh run's from the command line, a resumed run's from its checkpoint."""
    model_fields = [f.name for f in fields(model_lib.ModelArgs)]
    c, model_overrides, given = parse_args(SETTINGS, argv, model_fields, CHOICES)
    check_settings(c)
    ckpt_path = os.path.join(c.out_dir, "ckpt.pt")
    if c.resume:
        if not os.path.isfile(ckpt_path):
            raise SystemExit(f"--resume: no checkpoint at {ckpt_path} (start a new run without --resume, "
                             f"or point --out_dir at the run's folder)")
        try:
            ckpt = checkpoint_lib.load_meta(ckpt_path)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        world = int(os.environ.get("WORLD_SIZE", 1))
        given = [k for k in given if k not in PER_RUN]
        c = SimpleNamespace(**{**vars(resume_settings(c, given, model_overrides, ckpt, world)),
                               **{k: getattr(c, k) for k in PER_RUN}})
        if ckpt["step"] >= c.max_iters:
            raise SystemExit(f"the checkpoint in {c.out_dir} is at step {ckpt['step']}, the end of its "
                             f"max_iters={c.max_iters}: pass a larger --max_iters to train on")
        return c, model_lib.ModelArgs.from_dict(ckpt["model_args"]), ckpt
    if os.path.exists(ckpt_path):
        raise SystemExit(f"{ckpt_path} holds a run already: continue it with --resume, or choose another --out_dir")
    try:
        args = model_lib.preset(c.preset, **model_overrides)
    except ValueError as e:  # a setting the model refuses: say which, without a traceback
        raise SystemExit(f"--preset={c.preset} with these settings: {e}") from None
    if c.seq_len > args.max_seq_len:
        print0(f"note: --seq_len={c.seq_len} is longer than the preset's max_seq_len={args.max_seq_len}; "
               f"max_seq_len raised to {c.seq_len}")
        args = model_lib.ModelArgs.from_dict({**asdict(args), "max_seq_len": c.seq_len})
    return c, args, None


def prepare_data(c, args, rank, world, fresh):
    """Token files (prepared once by rank 0, the others wait and reuse the cache), the train loader
    and a factory of identical validation loaders; a split too small for one window stops here."""
    try:
        if rank == 0:
            info = data_lib.prepare(c.data, c.tokenizer, args.vocab_size, c.val_fraction, c.cache_dir)
        if dist.is_initialized():
            dist.barrier()
        if rank != 0:
            info = data_lib.prepare(c.data, c.tokenizer, args.vocab_size, c.val_fraction, c.cache_dir)
        if info["vocab_size"] > args.vocab_size:  # e.g. GPT-2's 50257 ids: round up to a multiple of 64
            if not fresh:
                raise ValueError(f"the checkpoint's vocab_size {args.vocab_size} is smaller than the "
                                 f"tokenizer's {info['vocab_size']}")
            args = model_lib.ModelArgs.from_dict({**asdict(args), "vocab_size": -(-info["vocab_size"] // 64) * 64})
        train = data_lib.DataLoader(info["train"], c.batch_size, c.seq_len, rank, world, c.seed, grad_accum=c.grad_accum)
        # an evaluation batch is a step's global batch, so every layout evaluates on the same windows
        val = lambda: data_lib.DataLoader(info["val"], c.batch_size, c.seq_len, rank, world, c.seed + 1,  # noqa: E731
                                          grad_accum=c.grad_accum)
        val()
    except (ValueError, RuntimeError, OSError) as e:
        hint = ""
        if "window needs" in str(e):
            hint = " (a larger --val_fraction or a smaller --seq_len)" if "val" in str(e).split("holds")[0][-12:] \
                else " (more text or a smaller --seq_len)"
        raise SystemExit(("" if str(e).startswith("data=") else f"--data={c.data}: ") + f"{e}{hint}") from None
    return info, args, train, val


def open_log(path, start, header):
    """The run's log.jsonl: a fresh run starts it anew; a resumed one keeps the records up to its
    checkpoint's step (a later record, from steps after the last checkpoint, would come twice).
    Its first line is `header` ({"settings": ..., "model_args": ..., "moe_layers": ...}, what plot.py
    reads), written anew: a resumed run's settings may differ in the RESUMABLE ones."""
    kept = []
    if start and os.path.exists(path):
        for line in open(path):
            try:
                if json.loads(line)["step"] <= start:
                    kept.append(line)
            except (ValueError, KeyError, TypeError):  # the old header, or a line cut short by a crash
                pass
    with open(path + ".tmp", "w") as f:
        f.write(json.dumps(header) + "\n")
        f.writelines(kept)
    os.replace(path + ".tmp", path)
    return open(path, "a")


def available_memory(device):
    """Bytes this process may still allocate on device: the GPU's free memory, or the host's
    MemAvailable (Linux); None where that is unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(c, args, device):
    """A one-process run stops with a clear message when its training state alone cannot fit, rather
    than being killed by the out-of-memory killer mid-allocation: FP32 weights and gradients, AdamW's
    two moments, and on the CPU the EMA copy too. Activations come on top and are not counted."""
    def n_params(a):
        n = model_lib.count_params(a)
        return n["total"] + n["mtp"]
    per_param = 4 + 4 + 2 * (2 if c.moments_dtype == "bfloat16" else 4) + (4 if device.type == "cpu" else 0)
    params = n_params(args)
    need, free = params * per_param, available_memory(device)
    if free is not None and need > free:
        fits = [name for name in model_lib.PRESETS if n_params(model_lib.preset(name)) * per_param < free]
        raise SystemExit(
            f"--preset={c.preset}: {params / 1e9:.2f}B parameters need {need / 1e9:.1f} GB for weights, gradients "
            f"and AdamW moments before any activation, and this {device.type} has {free / 1e9:.1f} GB free. "
            f"Presets whose state fits: {', '.join(fits) or 'none'}; or spread the model over GPUs with "
            f"torchrun and --ep / --pp (README, Scaling out)")


def build_model(c, args, grid, device):
    """(model, modules): this rank's part of the model, the whole Transformer or its pipeline stages
    (dualpipe.Pipeline, which has the Transformer's parameter names); with --ep only this rank's routed
    experts (comm.py). Each weight is seeded by its name: every layout starts from the same weights."""
    if c.pp > 1:
        model = dualpipe.Pipeline(args, c.pipeline, group=grid.groups["pp"], device=device, seed=c.seed,
                                  overlap=c.overlap and c.pipeline == "dualpipe")
        modules = model.stages
    else:
        model = model_lib.Transformer(args, seed=c.seed)
        modules = [model]
    for m in modules:
        if c.ep > 1:  # this rank keeps its E/ep experts of each MoE layer, tokens travel by all-to-all
            comm.shard_experts(m, grid, hierarchical=c.dispatch == "hierarchical")
        m.to(device)
    return model, modules


def ownership(model, modules, grid):
    """(owned(name), expert slices): which rank writes each tensor to a checkpoint and counts it in the
    gradient norm (comm.grad_norm), exactly one: of a pipeline's stage copies the one Pipeline.owns, of
    data-parallel copies the first, of the copies of an expert slice the first of the ranks holding it
    (edp rank 0).
    slices: {name: (start, stop)} the rows of the stacked expert weights this rank holds."""
    slices = {n: (a, b) for m in modules for n, (a, b, _) in comm.expert_slices(m, grid).items()} \
        if grid.layout.ep > 1 else {}
    in_pipeline = model.owns if isinstance(model, dualpipe.Pipeline) else (lambda name: True)
    return (lambda name: in_pipeline(name) and (grid.edp_rank == 0 if name in slices else grid.dp_rank == 0)), slices


def checkpoint_share(model, ema, optimizer, owned):
    """This rank's tensors of a checkpoint (checkpoint.py), under the single-process model's names."""
    everything = dict(model=model.state_dict(), ema=ema.state_dict(), **adam_moments(model, optimizer))
    return {kind: {n: t for n, t in named.items() if owned(n)} for kind, named in everything.items()}


def moe_layer_ids(args):
    """The block index of every MoE layer of the whole model, in the log's order: the main model's
    blocks after the dense ones, then the MTP modules' blocks (layer n_layers + k)."""
    return [*range(args.n_dense_layers, args.n_layers), *(args.n_layers + k for k in range(args.n_mtp))]


def balance_metrics(moe_layers, ids, n_experts):
    """(the log's balance fields, the run's loads (L, E)), every MoE layer of the whole model in `ids`
    order, read to the host here (at log steps only; update_bias leaves everything on the device).
    Under a pipeline each rank holds some of the layers: the ranks' tables, zeros where a rank lacks
    a layer, are combined with MAX over the CPU control group; every value is >= 0 and the copies of
    a layer are equal (update_bias saw the loads summed over the ranks), so the MAX is each layer's.
    The batch's MaxVio follows from the last step's loads, as update_bias computed it."""
    load, run = (torch.zeros(len(ids), n_experts, dtype=torch.int64) for _ in range(2))
    for m in moe_layers:
        i = ids.index(m.layer_id)
        load[i], run[i] = m.last_load.cpu(), m.run_load.cpu()
    if dist.is_initialized():
        for t in (load, run):
            dist.all_reduce(t, op=dist.ReduceOp.MAX, group=CONTROL)
    batch, run_vio = moe_lib.maxvio(load), moe_lib.maxvio(run)
    worst = lambda v: v.max().item() if len(ids) else 0.0  # noqa: E731
    return dict(maxvio=worst(batch), maxvio_layers=batch.tolist(), maxvio_global=worst(run_vio),
                maxvio_global_layers=run_vio.tolist(), load=load.tolist()), run


def main(argv=None):
    c, args, ckpt = configure(sys.argv[1:] if argv is None else argv)
    grid, device = compute_init(c, args)
    world, dp = grid.layout.world, grid.layout.dp
    if c.compile == "graphs" and (device.type != "cuda" or world > 1 or c.grad_accum > 1):
        raise SystemExit(f"--compile=graphs (CUDA graphs) runs one process on a GPU with grad_accum=1; this run "
                         f"has device {device.type}, {world} process(es), grad_accum={c.grad_accum}: use --compile=true")
    master = grid.rank == 0
    torch.manual_seed(c.seed)
    use_bf16 = c.dtype == "bfloat16" or (c.dtype == "auto" and device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if c.warmup_iters >= c.max_iters:
        print0(f"note: warmup_iters={c.warmup_iters} is not shorter than max_iters={c.max_iters}: the learning "
               f"rate climbs for the whole run and never reaches lr={c.lr:g}")
    if c.ema_interval > c.max_iters:
        print0(f"note: ema_interval={c.ema_interval} is longer than max_iters={c.max_iters}: the EMA is never "
               f"updated, so its validation loss is that of the initial weights")
    info, args, train_loader, val_loader = prepare_data(c, args, grid.dp_rank, dp, ckpt is None)
    ckpt_path = os.path.join(c.out_dir, "ckpt.pt")

    if world == 1:
        check_fits(c, args, device)
    model, modules = build_model(c, args, grid, device)
    owned, slices = ownership(model, modules, grid)
    compile_optimizer = c.compile in ("true", "graphs") or (c.compile == "auto" and device.type == "cuda")
    optimizer = make_optimizer(model, c, compiled=compile_optimizer)
    moe_ids = moe_layer_ids(args)  # every MoE layer of the whole model, in the log's order
    start = 0
    if ckpt is not None:  # written by any layout: this rank reads the rows of the experts it holds
        _, tensors = checkpoint_lib.load(ckpt_path, rows=slices.get)
        model.load_state_dict(tensors["model"])
        start = ckpt["step"]
        load_adam_moments(model, optimizer, tensors, start)
        train_loader.load_state_dict(ckpt["data"])
        torch.set_rng_state(ckpt["rng"]["cpu"])
        for m in model.moe_layers() if "run_load" in ckpt else []:  # the global MaxVio goes on counting
            m.run_load.copy_(torch.tensor(ckpt["run_load"][moe_ids.index(m.layer_id)]))
    ema = EMA(model, c.ema_decay)  # from the weights training starts from, the same on every rank
    if ckpt is not None:
        ema.load_state_dict(tensors["ema"])
        del tensors  # copied into place: let the loaded ones go

    # Everything is checked: from here on the run writes into out_dir.
    os.makedirs(c.out_dir, exist_ok=True)
    tokenizer_file = os.path.join(c.out_dir, "tokenizer.tiktoken")
    if master and info["tokenizer"] != "gpt2" and (ckpt is None or not os.path.exists(tokenizer_file)):
        data_lib.save_ranks(data_lib.load_ranks(info["tokenizer"]), tokenizer_file)
    header = dict(settings=vars(c), model_args=asdict(args), moe_layers=moe_ids,
                  tokens_per_step=c.batch_size * c.seq_len * c.grad_accum * dp,
                  groups=grid.ranks)  # the process groups of rank 0, the one that writes the log
    log_file = open_log(os.path.join(c.out_dir, "log.jsonl"), start, header) if master else None
    if ckpt is not None:
        print0(f"resumed from {ckpt_path} at step {start}")

    # FP8 too: fp8.py's steps are custom ops, so an FP8 model compiles as one graph (`small`: first step
    # 110 s, then 324 ms per step against 383 ms eager on the same batch, H200; README, FP8).
    compiled = compile_optimizer and c.pp == 1
    # compile=graphs: torch.compile's "reduce-overhead" mode replays forward and backward as CUDA graphs
    # (the shapes are static: the experts' row counts stay on the GPU), so the host no longer paces the
    # GPU (bench.py step --graphs=1: 73.1 against 87.3 ms on `small`, README). A replay overwrites the
    # last one's outputs: each step is marked, and the losses are copied out before the next one.
    graphs = c.compile == "graphs"
    train_model = torch.compile(model, mode="reduce-overhead" if graphs else None) if compiled else model
    new_replay = torch.compiler.cudagraph_mark_step_begin if graphs else (lambda: None)
    # Gradients: averaged over the data-parallel ranks after the last micro-batch, the experts' over
    # the ranks holding copies of them (comm.py says why not DDP); loads summed before the bias update.
    reduce_gradients = (lambda: comm.reduce_gradients(nn.ModuleList(modules), grid)) if dp > 1 else (lambda: None)
    norm = lambda: comm.grad_norm(model, owned if world > 1 else None)  # noqa: E731
    all_reduce = grid.sum_over_dp if dp > 1 else None
    flops_per_token = model_lib.flops_per_token(args, c.seq_len)
    tokens_per_step = c.batch_size * c.seq_len * c.grad_accum * dp
    n = model_lib.count_params(args)
    layout = f"{world} process(es)" + (f", {c.pipeline} over {c.pp} stages" if c.pp > 1 else "") + \
        (f", expert parallel {c.ep} ({c.dispatch})" if c.ep > 1 else "")
    print0(f"model: {c.preset}, {n['total'] / 1e6:.1f}M parameters ({n['activated'] / 1e6:.1f}M activated, "
           f"MTP {n['mtp'] / 1e6:.1f}M more), vocab {args.vocab_size}; {layout} on {device.type}, "
           f"{'bf16 autocast' if use_bf16 else 'fp32'}{', compiled' if compiled else ''}; "
           f"{tokens_per_step:,} tokens per step")

    def checkpoint(step):
        if not c.save_checkpoints:
            return
        _, run_load = balance_metrics(model.moe_layers(), moe_ids, args.n_routed_experts)
        meta = dict(model_args=asdict(args), step=step, data=train_loader.state_dict(), rng=dict(cpu=torch.get_rng_state()),
                    config=vars(c), global_batch=c.batch_size * c.grad_accum * dp, run_load=run_load.tolist(),
                    tokenizer="gpt2" if info["tokenizer"] == "gpt2" else "tokenizer.tiktoken", eot=info["eot"])
        checkpoint_lib.save(ckpt_path, meta, checkpoint_share(model, ema, optimizer, owned), slices, group=CONTROL)

    # One forward+backward per mode, chosen once: micro-batches accumulated one after the other, or
    # run through the pipeline's schedule (each returns the losses averaged over the micro-batches).
    def accumulate(lam):
        losses = torch.zeros(len(LOSS_NAMES), device=device)
        for micro in range(c.grad_accum):
            x, y = (to_device(t, device) for t in train_loader.next_batch())
            new_replay()
            with autocast:
                # lambda as a tensor: torch.compile traces it instead of recompiling when the schedule moves it
                _, parts = train_model(x, y, lam=to_device(torch.tensor(lam), device))
            (parts["loss"] / c.grad_accum).backward()
            losses += torch.stack([parts[k].detach().float() for k in LOSS_NAMES]) / c.grad_accum
        return losses

    def through_pipeline(lam):
        xs, ys = zip(*(train_loader.next_batch() for _ in range(c.grad_accum)))
        with autocast:
            parts = model.step(list(xs), list(ys), lam=lam)
        return torch.stack([parts[k].float() for k in LOSS_NAMES]).to(device)

    forward_backward = through_pipeline if c.pp > 1 else accumulate

    def main_loss(batches):  # for evaluate: the mean main loss of a step's micro-batches
        if c.pp > 1:
            xs, ys = zip(*batches)
            with autocast:
                return torch.as_tensor(model.evaluate(list(xs), list(ys), len(batches)))
        with autocast:
            return torch.stack([model(x.to(device), y.to(device))[1]["main"].float() for x, y in batches]).mean()

    def train_step(step):
        """One optimizer step over grad_accum micro-batches; the losses averaged over them."""
        lr = lr_at(step, c)
        lam = c.mtp_lambda if step < c.mtp_switch * c.max_iters else c.mtp_lambda_final
        gamma = c.bias_gamma if step < c.gamma_switch * c.max_iters else c.bias_gamma_final
        gamma = gamma if args.balance == "bias" else 0.0  # aux, none: the bias stays 0
        for group in optimizer.param_groups:
            group["lr"] = lr
        losses = forward_backward(lam)
        finite.submit(losses, step + 1)  # checked at the next step, or before a log line or checkpoint
        reduce_gradients()
        total_norm = norm()
        ema.before_optimizer_step()
        # clipped as it is read; the factor in FP32, as AdamW's other scalars (several ranks' norm is float64)
        optimizer.step(grad_scale=comm.clip_coefficient(total_norm, c.grad_clip).float())
        optimizer.zero_grad(set_to_none=True)
        update_bias(model.moe_layers(), gamma, all_reduce)  # after the step, from this step's loads
        if (step + 1) % c.ema_interval == 0:
            ema.update(model, c.ema_decay ** c.ema_interval)
        return losses, dict(lr=lr, lam=lam, gamma=gamma, grad_norm=total_norm)

    def log(rec):
        if log_file:
            log_file.write(json.dumps(rec) + "\n")
            log_file.flush()

    last_stop = c.stop_iter if 0 < c.stop_iter < c.max_iters else c.max_iters
    finite = FiniteCheck(device)
    t0, steps_since, stopped = time.time(), 0, False
    grid.traffic.reset()
    bar = tqdm(range(start, last_stop), initial=start, total=c.max_iters, disable=not master, dynamic_ncols=True)
    interrupt = Interrupt(c.save_checkpoints)
    try:
        for step in bar:
            losses, rec = train_step(step)
            steps_since += 1
            stopped = any_rank(interrupt.signum)
            if (step + 1) % c.log_interval == 0 or step + 1 == last_stop or stopped:
                finite.done()
                # per step, summed over the ranks: expert-parallel bytes that stayed in a node / crossed nodes
                traffic = torch.tensor([grid.traffic.intra, grid.traffic.inter], dtype=torch.float64) / steps_since
                if world > 1:
                    grid.all_reduce(losses, "dp")
                    losses /= dp
                    dist.all_reduce(traffic, group=CONTROL)
                balance_rec, _ = balance_metrics(model.moe_layers(), moe_ids, args.n_routed_experts)
                loss, main, mtp, balance = losses.tolist()
                tps = steps_since * tokens_per_step / (time.time() - t0)
                rec = dict(step=step + 1, loss=loss, main=main, mtp=mtp, balance=balance,
                           **rec, tokens_per_s=tps, **balance_rec)
                rec["grad_norm"] = rec["grad_norm"].item()
                if c.ep > 1:
                    rec["bytes_intra_node"], rec["bytes_inter_node"] = (int(b) for b in traffic.tolist())
                if device.type == "cuda":
                    rec["mfu"] = tps * flops_per_token / world / H200_BF16_FLOPS
                    rec["memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
                bar.set_postfix(main=f"{main:.3f}", tok_s=f"{tps:,.0f}")
                print0(f"step {step + 1}: main loss {main:.4f} (total {loss:.4f}, mtp {mtp:.4f}, balance "
                       f"{balance:.2e}), maxvio {rec['maxvio']:.3f} (run {rec['maxvio_global']:.3f}), lr {rec['lr']:.2e}, {tps:,.0f} tokens/s"
                       + (f", MFU {rec['mfu']:.1%}, {rec['memory_gb']:.1f} GB" if "mfu" in rec else ""))
                log(rec)
                t0, steps_since = time.time(), 0
                grid.traffic.reset()
            if not stopped and ((step + 1) % c.eval_interval == 0 or step + 1 == last_stop):
                val = evaluate(main_loss, val_loader, c.eval_iters, c.grad_accum, grid)
                with ema.applied(model):
                    val_ema = evaluate(main_loss, val_loader, c.eval_iters, c.grad_accum, grid)
                print0(f"step {step + 1}: val loss {val:.4f}, EMA val loss {val_ema:.4f}")
                log(dict(step=step + 1, val_loss=val, val_loss_ema=val_ema))
            if stopped or (step + 1) % c.eval_interval == 0 or step + 1 == last_stop:
                finite.done()
                checkpoint(step + 1)
                t0, steps_since = time.time(), 0  # evaluation and checkpoint time is not training time
                grid.traffic.reset()
            if stopped:
                break
    finally:
        interrupt.restore()
        bar.close()
        ema.wait()
        if log_file:
            log_file.close()
        if dist.is_initialized():
            dist.destroy_process_group()
    if stopped:
        print0(f"stopped at step {step + 1}, checkpoint written to {ckpt_path}; continue with:\n"
               f"    python train.py --out_dir={c.out_dir} --resume" if c.save_checkpoints else
               f"stopped at step {step + 1}, no checkpoint written (--save_checkpoints=False)")
        raise SystemExit(128 + (interrupt.signum or signal.SIGTERM))


if __name__ == "__main__":
    main()

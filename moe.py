"""
DeepSeekMoE with auxiliary-loss-free load balancing (DeepSeek-V3 report, arXiv 2412.19437, section 2.1.2).

    h'_t  = u_t + sum_i FFN^(s)_i(u_t) + sum_i g_it FFN^(r)_i(u_t)                    eq. 12
    s_it  = sigmoid(u_t^T e_i)                                                         eq. 15
    g'_it = s_it  if  s_it + b_i  is in the top K_r of {s_jt + b_j}, else 0           eq. 16
    g_it  = g'_it / sum_j g'_jt   (times route_scale, 2.5 in V3)                       eq. 13
    b_i  += gamma * sign(mean_load - load_i)   after each step (no gradient)           2.1.2
    L_Bal = alpha * sum_i f_i P_i,  per sequence                                       eqs. 17-20

Balancing, args.balance (train.py --balance), each choice one function below:
    bias   the auxiliary-loss-free update of b (update_bias) and the small sequence-wise loss
           (sequence_balance_loss, eqs. 17-20, alpha = balance_alpha): V3's recipe
    aux    no bias update (b stays 0); the conventional expert-level loss over the whole batch
           (expert_balance_loss, alpha = aux_alpha): the baseline of the aux-loss-free paper
    none   neither: no balance loss, b stays 0 (routing is free to collapse)

Pieces, top to bottom:
    MLP             the SwiGLU expert (also the dense FFN of the first blocks, and the shared experts)
    Gate            the router: sigmoid affinities s, the bias b used only to choose, group (node)
                    limited selection, normalized gates g
    route_topk_op   the router's choice as one Triton kernel (route_impl "auto" on a GPU), Gate.choose's twin
    LocalDispatcher moves each token to its K experts on this process (sort by expert) and back
    Experts         the routed experts' weights stacked as [E, out, in], one grouped GEMM each
    MoE             norm -> gate -> dispatch -> experts -> combine, plus shared experts
    balance_loss    the loss args.balance adds per layer: sequence-wise, expert-level, or none
    update_bias     the auxiliary-loss-free bias update, with MaxVio as the balance metric (per step
                    and over the run), read by train.py without a host synchronization
    recompute       selective activation recomputation (section 3.2.3), shared with model.py

Seams: `Experts` is where FP8 grouped GEMMs plug in (fp8.py; `x_q` takes rows that arrived in
FP8); the dispatcher is an object with `dispatch` / `combine`, and expert parallelism (comm.py)
swaps in an all-to-all one: when it has `dispatch_async`, MoE.forward starts the transfer, runs
the shared experts while the rows travel, and lets its combine apply the gates (eq. 12's sum,
formed on the way back); `MoE.forward` is a short sequence of calls (MoE.route: norm, router, load,
balance loss; dispatch; experts; combine) that dualpipe.block_pieces cuts into attention / dispatch /
experts / combine pieces. A handle keeps the gates its combine applies in `handle.g` (comm.py's also
`g_rows`), so a driver that runs each piece on leaves of its own can put its leaves there.

Simplified: no token is ever dropped (neither does V3); the router runs in FP32.
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts

import fp8

# Routed experts: "grouped" runs one torch._grouped_mm per weight; "loop" is its plain twin.
expert_impl = "grouped"
# The router's choice (Gate.route): "torch" is three torch.topk calls (top-2 in each group, the best
# groups, the top K_r experts); "triton" is one fused kernel per layer (route_topk below; on the CPU
# under TRITON_INTERPRET=1), held equal to "torch" by the tests; "auto" is the kernel on a GPU and
# "torch" elsewhere. On the H200 the kernel took the small step's top-k time from 5.0 to 0.6 ms.
route_impl = "auto"
ROUTE_IMPLS = ("auto", "torch", "triton")

# -----------------------------------------------------------------------------
# Selective activation recomputation (3.2.3): inside a region only the outputs of the ops named in
# `keep` are stored for backward; everything else (RMSNorms, RoPE, casts, and whatever GEMM is not
# kept) is recomputed from the region's inputs when backward reaches it.

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
           torch.ops.aten._grouped_mm.default, *fp8.FPROP_OPS}  # FP8's forward GEMMs are custom ops
ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_cudnn_attention.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default}


def recompute(fn, *args, keep=frozenset(), enabled=True):
    """fn(*args), storing for backward only the outputs of the ops in `keep`."""
    if not (enabled and torch.is_grad_enabled()):
        return fn(*args)
    context = functools.partial(create_selective_checkpoint_contexts, list(keep))  # keep these, recompute the rest
    return checkpoint(fn, *args, use_reentrant=False, context_fn=context)


def compute_dtype(x):
    """The dtype GEMMs run in: autocast's where it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


# -----------------------------------------------------------------------------

class MLP(nn.Module):
    """SwiGLU feed-forward: w2(silu(w1 x) * w3 x). One expert, the shared experts, or a dense FFN."""

    def __init__(self, dim, inter_dim, linear=nn.Linear):
        super().__init__()
        self.w1 = linear(dim, inter_dim, bias=False)  # gate_proj
        self.w2 = linear(inter_dim, dim, bias=False)  # down_proj
        self.w3 = linear(dim, inter_dim, bias=False)  # up_proj

    def forward(self, x):
        h1, h3 = fp8.linears(x, self.w1, self.w3)   # in FP8: x quantized once, one GEMM of [w1; w3]
        return self.w2(F.silu(h1) * h3)


class Gate(nn.Module):
    """The router: chooses K_r experts per token and their gates (eqs. 13, 15, 16)."""

    def __init__(self, args):
        super().__init__()
        self.topk = args.n_activated_experts
        self.n_groups = args.n_expert_groups
        self.topk_groups = args.n_limited_groups
        self.route_scale = args.route_scale
        self.weight = nn.Parameter(torch.empty(args.n_routed_experts, args.dim))  # centroids e_i
        # b_i: steers selection only, updated by update_bias(), never by the optimizer.
        self.register_buffer("bias", torch.zeros(args.n_routed_experts, dtype=torch.float32))

    def affinities(self, h):
        """s_it = sigmoid(u_t . e_i), in FP32 whatever autocast says (the router stays precise)."""
        with torch.autocast(h.device.type, enabled=False):
            dtype = torch.promote_types(h.dtype, torch.float32)
            return torch.sigmoid(F.linear(h.to(dtype), self.weight.to(dtype)))  # (N, E)

    def choose(self, s):
        """The experts of eq. 16 with node-limited routing: top-K_r by s + b within the best groups."""
        N, E = s.shape
        biased = s + self.bias  # (N, E)
        if self.n_groups > 1:
            # Node-limited routing: a group's score is the sum of its two best biased affinities;
            # only the best `topk_groups` groups stay eligible.
            grouped = biased.view(N, self.n_groups, E // self.n_groups)  # (N, G, E/G)
            group_score = grouped.topk(2, dim=-1).values.sum(-1)  # (N, G)
            kept = group_score.topk(self.topk_groups, dim=-1).indices  # (N, topk_groups)
            dropped = torch.ones_like(group_score, dtype=torch.bool).scatter_(1, kept, False)
            biased = grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view(N, E)
        idx = biased.topk(self.topk, dim=-1).indices  # (N, K)
        return idx

    def route(self, s):
        """Top-K_r experts by s + b within the best groups; gates from the unbiased s."""
        if route_impl not in ROUTE_IMPLS:
            raise ValueError(f"moe.route_impl={route_impl!r}: choose one of {', '.join(ROUTE_IMPLS)}")
        kernel = route_impl == "triton" or (route_impl == "auto" and s.is_cuda)
        if kernel and _route_fits(s, self.n_groups):
            idx = route_topk_op(s.detach(), self.bias, self.n_groups, self.topk_groups, self.topk)  # (N, K), one kernel
        else:
            idx = self.choose(s)
        g = s.gather(1, idx)  # (N, K): unbiased affinities of the chosen experts
        g = g / g.sum(-1, keepdim=True) * self.route_scale
        return idx, g

    def forward(self, h):
        s = self.affinities(h)
        idx, g = self.route(s)
        return s, idx, g


# The router's choice as one kernel: a program takes BLOCK_N tokens' rows of E affinities, adds the
# bias, scores each group by its two best, keeps the best TOPK_G groups and picks the top K experts
# among them, one argmax at a time (K is 6-8: selection beats sorting). The same sums and
# comparisons as Gate.choose, so the same experts; E and the groups must be powers of two
# (Triton's shapes), else Gate.route falls back to Gate.choose.

def _route_fits(s, n_groups):
    E = s.shape[-1]
    pow2 = lambda n: n & (n - 1) == 0  # noqa: E731
    return fp8.HAS_TRITON and (s.is_cuda or fp8.INTERPRET) and pow2(E) and pow2(n_groups)


if fp8.HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _route_topk_kernel(s_ptr, bias_ptr, idx_ptr, N, stride_s, E: tl.constexpr, G: tl.constexpr,
                           TOPK_G: tl.constexpr, K: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.arange(0, E)
        live = rows < N
        x = tl.load(s_ptr + rows[:, None] * stride_s + cols[None, :], mask=live[:, None], other=0.0)
        x = x + tl.load(bias_ptr + cols)[None, :]                              # s + b, (BLOCK_N, E)
        if G > 1:
            xg = tl.reshape(x, (BLOCK_N, G, E // G))                           # (BLOCK_N, G, E/G)
            best = tl.argmax(xg, axis=2)
            j = tl.arange(0, E // G)
            second = tl.max(tl.where(j[None, None, :] == best[:, :, None], float("-inf"), xg), axis=2)
            score = tl.max(xg, axis=2) + second                                # a group's two best, (BLOCK_N, G)
            gid = tl.arange(0, G)
            keep = tl.zeros((BLOCK_N, G), dtype=tl.int1)                       # the kept groups
            for _ in tl.static_range(TOPK_G):
                hit = gid[None, :] == tl.argmax(score, axis=1)[:, None]
                keep = keep | hit
                score = tl.where(hit, float("-inf"), score)
            x = tl.reshape(tl.where(keep[:, :, None], xg, float("-inf")), (BLOCK_N, E))
        for k in tl.static_range(K):                                          # the top K, best first
            pick = tl.argmax(x, axis=1)                                        # (BLOCK_N,)
            tl.store(idx_ptr + rows * K + k, pick.to(tl.int64), mask=live)
            x = tl.where(cols[None, :] == pick[:, None], float("-inf"), x)


@torch.library.custom_op("moe::route_topk", mutates_args=())
def route_topk_op(s: torch.Tensor, bias: torch.Tensor, n_groups: int, topk_groups: int, k: int) -> torch.Tensor:
    """Gate.choose in one kernel: s (N, E) FP32 affinities, bias (E,) -> idx (N, k) int64."""
    s = s.contiguous()
    N, E = s.shape
    idx = torch.empty(N, k, dtype=torch.int64, device=s.device)
    block = 32
    _route_topk_kernel[(triton.cdiv(N, block),)](s, bias.float(), idx, N, s.stride(0), E=E, G=n_groups,
                                                 TOPK_G=topk_groups, K=k, BLOCK_N=block)
    return idx


@route_topk_op.register_fake
def _(s, bias, n_groups, topk_groups, k):
    return s.new_empty(s.shape[0], k, dtype=torch.int64)


def tokens_per_expert(idx, n_experts):
    """How many of the entries of idx name each expert (a bincount of static shape, which
    torch.compile keeps in one graph)."""
    return torch.zeros(n_experts, dtype=torch.int64, device=idx.device).scatter_add_(0, idx, torch.ones_like(idx))


class LocalDispatcher:
    """Token movement when every routed expert lives on this process.

    dispatch: (h (N, D), idx (N, K), g=None) -> x (N*K, D) sorted by expert, counts (E,), handle
    combine:  (y (N*K, D) in the sorted order, handle) -> y (N*K, D) in the (token, k) order, or,
              when dispatch was given the gates g (N, K), the routed sum (N, D) = sum_k g_tk y_tk
    dispatch_async: the same as dispatch, started; wait() returns its result. Here nothing travels,
    so it is done at once; comm.py's all-to-all dispatcher keeps this interface, with counts for its
    local experts, and moves the rows while MoE.forward computes the shared experts.
    """

    def __init__(self, n_experts):
        self.n_experts = n_experts

    def dispatch(self, h, idx, g=None):
        K = idx.shape[1]
        flat = idx.flatten()  # (N*K,) expert of each (token, k) pair
        order = flat.argsort(stable=True)  # pairs grouped by expert
        counts = tokens_per_expert(flat, self.n_experts)  # (E,)
        handle = LocalHandle(order, g)
        return replicate_rows(h, order, K, handle.position), counts, handle

    def dispatch_async(self, h, idx, g=None):
        result = self.dispatch(h, idx, g)
        return lambda: result

    def combine(self, y, handle):
        y = unsort_rows(y, handle.order, handle.position)  # (N*K, D) in (token, k) order
        if handle.g is None:
            return y
        N, K = handle.g.shape
        return (y.view(N, K, -1) * handle.g.unsqueeze(-1).to(y.dtype)).sum(1)  # (N, D)


def inverse_order(order):
    """position with position[order[i]] = i: where each (token, k) pair went in the sorted order."""
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=order.device)
    return position


class ReplicateRows(torch.autograd.Function):
    """h[order // K]: each token's row once per chosen expert, in the sorted order. The same as the
    indexing, with another backward: each token's K gradient rows are gathered back into (token, k)
    order and summed, where autograd's indexing backward scatter-adds them (atomic adds, in an order
    that varies from run to run on the GPU; the compiled `small` step's profile had an index_put
    kernel of this kind at 2.4 ms of 89 ms, not yet re-timed with this backward)."""

    @staticmethod
    def forward(ctx, h, order, K, position):
        ctx.save_for_backward(position)
        ctx.K = K
        return h[order // K]

    @staticmethod
    def backward(ctx, dx):
        (position,) = ctx.saved_tensors
        N, D = position.numel() // ctx.K, dx.shape[-1]
        total = dx[position].view(N, ctx.K, D).sum(1, dtype=torch.promote_types(dx.dtype, torch.float32))
        return total.to(dx.dtype), None, None, None


def replicate_rows(h, order, K, position=None):
    """h (N, D) -> (N*K, D): row order[i] // K of h at i (ReplicateRows; its plain twin is the indexing).
    position: inverse_order(order), if the caller has it."""
    return ReplicateRows.apply(h, order, K, inverse_order(order) if position is None else position)


class UnsortRows(torch.autograd.Function):
    """y[position]: the rows of y (sorted by expert) back in (token, k) order, as a gather, whose
    backward is the gather dy[order]. Its plain twin is the scatter torch.empty_like(y).index_copy_(0,
    order, y), the same rows; as a gather, torch.compile fuses it into the weighted sum over each
    token's K rows that follows in combine (the scatter wrote all N*K rows, and the sum read them back)."""

    @staticmethod
    def forward(ctx, y, order, position):
        ctx.save_for_backward(order)
        return y[position]

    @staticmethod
    def backward(ctx, dy):
        (order,) = ctx.saved_tensors
        return dy[order], None, None


def unsort_rows(y, order, position):
    return UnsortRows.apply(y, order, position)


class LocalHandle:
    """What combine needs: the sort order and its inverse, the gates if given; x_q: no rows arrived
    in FP8 here."""

    def __init__(self, order, g):
        self.order, self.g, self.x_q = order, g, None
        self.position = inverse_order(order)


class Experts(nn.Module):
    """E routed SwiGLU experts with weights stacked [E, out, in] (the Linear layout, per expert)."""

    def __init__(self, n_experts, dim, inter_dim, fp8=False):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.w2 = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        self.w3 = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.fp8 = fp8

    def forward(self, x, counts, x_q=None):
        """x: (M, D) rows sorted by expert, counts: (E,) rows per expert -> (M, D). x_q: x already
        in FP8, (x_fp8, x_s) in 1x128 tiles (comm.py's FP8 dispatch), for the up-projections."""
        if self.fp8:  # all nine GEMMs in FP8, x quantized once, the SwiGLU inputs cached in FP8 (fp8.py)
            offs = counts.cumsum(0).to(torch.int32)
            return fp8.fp8_experts(x, self.w1, self.w2, self.w3, offs, x_q)
        dtype = compute_dtype(x)
        x = x.to(dtype)
        w1, w2, w3 = (w.to(dtype) for w in (self.w1, self.w2, self.w3))
        if expert_impl == "grouped" and grouped_mm_runs(x, w1):
            return grouped_swiglu(x, w1, w2, w3, counts.cumsum(0).to(torch.int32))
        out, start = [], 0
        for e, n in enumerate(counts.tolist()):
            xe = x[start:start + n]
            out.append((F.silu(xe @ w1[e].T) * (xe @ w3[e].T)) @ w2[e].T)
            start += n
        return torch.cat(out)


def grouped_swiglu(x, w1, w2, w3, offs):
    """The routed experts by torch._grouped_mm: x (M, D) sorted by expert, offs (E,) int32 the row
    end of each expert's group. (w1 and w3 as one GEMM of [w1; w3], as fp8.fp8_experts runs them,
    measured slower in BF16 on the H200: the SwiGLU forward+backward compiled 7.35 ms against 6.70
    for this, in two runs of bench.py fp8 on 2026-12-02; it was not kept.)"""
    mm = lambda a, w: torch._grouped_mm(a, w.transpose(-2, -1), offs=offs)  # noqa: E731
    return mm(F.silu(mm(x, w1)) * mm(x, w3), w2)


def grouped_mm_runs(x, w):
    """torch._grouped_mm takes FP32/BF16/FP16 on the CPU and on Hopper, with 16-byte aligned rows;
    under torch.compile only BF16 (its shape function says so)."""
    aligned = all(n * x.element_size() % 16 == 0 for n in w.shape[1:])
    device_ok = x.device.type == "cpu" or (x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0))
    dtype_ok = x.dtype == torch.bfloat16 or (x.dtype in (torch.float32, torch.float16) and not torch.compiler.is_compiling())
    return dtype_ok and aligned and device_ok


class MoE(nn.Module):
    """A DeepSeekMoE layer with its pre-norm: x -> sum of shared and gated routed experts (eq. 12)."""

    def __init__(self, args, dispatcher=None, linear=nn.Linear):
        super().__init__()
        self.args = args
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.gate = Gate(args)
        self.experts = Experts(args.n_routed_experts, args.dim, args.moe_inter_dim, fp8=args.fp8)
        self.shared = MLP(args.dim, args.n_shared_experts * args.moe_inter_dim, linear) if args.n_shared_experts else None
        self.dispatcher = dispatcher or LocalDispatcher(args.n_routed_experts)
        # Tokens routed to each expert since the last update_bias(): the "load" of 2.1.2.
        self.register_buffer("load", torch.zeros(args.n_routed_experts), persistent=False)
        # update_bias() keeps the last step's load (summed over ranks) and the sum over the run, on device
        self.register_buffer("last_load", torch.zeros(args.n_routed_experts, dtype=torch.int64), persistent=False)
        self.register_buffer("run_load", torch.zeros(args.n_routed_experts, dtype=torch.int64), persistent=False)
        self.layer_id = None  # the block this layer belongs to (model.Block sets it): its name in the log
        self.balance_loss = None

    def norm_score(self, x):
        h = self.norm(x)
        return h, self.gate.affinities(h)

    def shared_experts(self, x, h):
        """sum_i FFN^(s)_i(u_t) on h = norm(x). Under recompute the norm is redone from x inside
        the region: passing h in would store it, which is what recomputation avoids."""
        if self.shared is None:
            return torch.zeros_like(h)
        if self.args.recompute:
            return recompute(lambda x: self.shared(self.norm(x)), x, keep=MATMULS)
        return self.shared(h)

    def route(self, x, B):
        """x: (N, D), the tokens of B sequences -> h = norm(x) (N, D), the chosen experts idx (N, K) and
        their gates g (N, K); counts the load (under grad) and sets self.balance_loss. The part of
        forward before the dispatch (a pipeline's attention piece ends with it, dualpipe.py)."""
        # The RMSNorm output is not stored: only the GEMM outputs in this region are.
        h, s = recompute(self.norm_score, x, keep=MATMULS, enabled=self.args.recompute)
        idx, g = self.gate.route(s)  # (N, K), (N, K)
        if torch.is_grad_enabled():  # a training step: count the load for update_bias()
            self.load += tokens_per_expert(idx.flatten(), self.load.numel())
        self.balance_loss = balance_loss(self.args, s.view(B, -1, s.shape[-1]), idx.view(B, -1, idx.shape[-1]))
        return h, idx, g

    def forward(self, x):
        B, T, D = x.shape
        x = x.view(B * T, D)
        h, idx, g = self.route(x, B)
        wait = self.dispatcher.dispatch_async(h, idx, g)  # comm.py: the rows travel meanwhile...
        shared = self.shared_experts(x, h)  # ...while the shared experts compute
        xs, counts, handle = wait()  # (M, D) sorted by (local) expert
        y = self.dispatcher.combine(self.experts(xs, counts, handle.x_q), handle)  # (N, D), gates applied
        return (y + shared).view(B, T, D)


def sequence_balance_loss(s, idx, alpha):
    """Complementary sequence-wise balance loss, eqs. 17-20, averaged over the batch's sequences.

    s: (B, T, E) affinities, idx: (B, T, K) the experts actually chosen. f carries no gradient.
    """
    B, T, E = s.shape
    K = idx.shape[-1]
    chosen = s.new_zeros(B, E).scatter_add_(1, idx.reshape(B, -1), s.new_ones(B, T * K))  # in s's dtype: FP64 tests
    f = chosen * E / (K * T)  # (B, E)  eq. 18
    P = (s / s.sum(-1, keepdim=True)).mean(1)  # (B, E)  eqs. 19-20
    return alpha * (f * P).sum(-1).mean()  # eq. 17


def expert_balance_loss(s, idx, alpha):
    """The conventional expert-level auxiliary loss, over the whole batch as one sequence:
    L_Bal = alpha * sum_i f_i P_i, f_i = E / (K T) * count_i, P_i = mean_t s'_it with T all the
    batch's tokens (DeepSeekMoE, arXiv 2401.06066 eq. 12; the baseline of arXiv 2408.15664 eq. 2).
    Those papers' softmax affinities sum to 1 per token; the sigmoid ones here are normalized first,
    s' = s / sum_j s_j, as eq. 19 does. s: (B, T, E), idx: (B, T, K)."""
    B, T, E = s.shape
    return sequence_balance_loss(s.reshape(1, B * T, E), idx.reshape(1, B * T, -1), alpha)


def balance_loss(args, s, idx):
    """The balance loss args.balance adds for this layer: a 0-dim tensor (0 for "none")."""
    if args.balance == "bias":
        return sequence_balance_loss(s, idx, args.balance_alpha)
    if args.balance == "aux":
        return expert_balance_loss(s, idx, args.aux_alpha)
    return s.new_zeros(())


@torch.no_grad()
def update_bias(moe_layers, gamma, all_reduce=None):
    """b_i += gamma * sign(mean_load - load_i) per layer; returns each layer's MaxVio, a (L,) tensor
    on the loads' device (read it only when logging: .item() here would wait for the GPU every step).

    Call after the optimizer step, gamma = 0 for --balance=aux|none (b then stays exactly 0).
    `all_reduce` sums the loads over every rank first, so the update sees the whole global batch
    (data or expert parallel); one process needs none. MaxVio = max_i load_i / mean_i load_i - 1
    (the balance metric of the aux-loss-free paper). Each layer keeps the summed load in last_load
    and adds it to run_load, from which the run's MaxVio (maxvio(run_load)) follows.
    """
    out = []
    for moe in moe_layers:
        load = moe.load.clone()
        if all_reduce is not None:
            all_reduce(load)
        if gamma:
            moe.gate.bias += gamma * torch.sign(load.mean() - load)
        out.append(maxvio(load))
        moe.last_load.copy_(load)
        moe.run_load += moe.last_load
        moe.load.zero_()
    return torch.stack(out) if out else torch.zeros(0)


def maxvio(load):
    """max_i load_i / mean_i load_i - 1 over the last dim; 0 where nothing was routed (no host sync)."""
    load = load.double()
    mean = load.mean(-1)
    return torch.where(mean > 0, load.amax(-1) / mean.clamp(min=1e-30) - 1, torch.zeros_like(mean))

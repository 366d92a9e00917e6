"""
Expert parallelism (DeepSeek-V3 report, arXiv 2412.19437): the process grid, the all-to-all token
dispatcher (flat or node-hierarchical, BF16 or FP8), node-limited routing, overlap of the shared
experts with the transfer, the gradient reduction of an expert-parallel step, and the global gradient
norm of any layout.

Where each idea of the paper lives
    Layout, Grid, init    the parallel layout of 3.2 ("64-way EP spanning 8 nodes", PP, ZeRO-1 DP),
                          every process group cut from one grid
    check_node_limited    node-limited routing (2.1.2): expert group = node, each token reaches at
                          most M = n_limited_groups nodes; moe.Gate.route does the limiting
    Hop                   one all_to_all_single: count matrix exchange, rows sorted by destination,
                          received rows sorted by local expert (for the grouped GEMM)
    FlatRoute             the simple twin: one row per (token, expert) pair straight to its GPU
    HierarchicalRoute     3.2.2: a token crosses to each destination node once, to the GPU with its
                          own local index there, which forwards it over NVLink to the experts' GPUs;
                          combine comes back the same way, summed inside the node before crossing
    AllToAllDispatcher    moe.LocalDispatcher's interface over the expert-parallel group, FP8
                          dispatch (3.3.3), overlap with the shared experts (3.2.2)
    Traffic               bytes sent per link class (intra-node NVLink, inter-node IB)
    shard_experts         a single-process model -> this rank's expert-parallel model
    reduce_gradients      the gradients of an expert-parallel step (below)
    grad_norm             the global gradient norm on any layout, each gradient counted once (below)
    clip_coefficient      gradient clipping's factor, min(1, max_norm / (norm + 1e-6))

The grid (picotron's idea: every group comes from one tensor of ranks)
======================================================================
    ranks = arange(world).view(pp, edp, ep)           dp = edp * ep ranks per pipeline stage
    dp  group: ranks[p].flatten()      one pipeline stage; dense gradients, router loads
    ep  group: ranks[p, e, :]          contiguous ranks (inside a node where ep <= ranks per node)
                                       that together hold all E routed experts, E/ep each
    edp group: ranks[p, :, r]          the ranks holding copies of the same experts
    pp  group: ranks[:, e, r]          one rank per stage, for the pipeline (dualpipe.py)
    node / rail (hierarchical dispatch): the members of my ep group on my node / with my local
                                       index on every node of the group
A node is the LOCAL_WORLD_SIZE ranks of one host. 16 ranks on 2 nodes, PP=2, DP=8, EP=4:

        node 0: stage 0                         node 1: stage 1
        +-------------+-------------+           +-------------+-------------+
        |  0  1  2  3 |  4  5  6  7 |           |  8  9 10 11 | 12 13 14 15 |
        +-------------+-------------+           +-------------+-------------+
          ep group      ep group                  ep group      ep group
    rank 5: dp [0..7], ep [4 5 6 7] (experts 64..127 of 256 sit on rank 5), edp [1 5], pp [5 13]

An expert-parallel group that spans nodes (16 ranks on 4 nodes of 4, PP=1, DP=16, EP=8):

        node 0        node 1        node 2        node 3
        0  1  2  3 |  4  5  6  7 |  8  9 10 11 | 12 13 14 15
        ep group [0..7]           | ep group [8..15]
    rank 5: ep [0..7], node [4 5 6 7], rail [1 5], edp [5 13]; with n_expert_groups = 2 (one per
    node of the ep group) and M = 1, every token of rank 5 is served by one node.

pp_inner=True orders the ranks the other way, ranks = arange(world).view(edp, ep, pp) with the
stage varying fastest: a pipeline's stages sit on consecutive ranks, inside one node, and the dp
and ep groups of a stage span the nodes (8 ranks on 2 nodes of 4, PP=4, DP=2, EP=2):

        node 0: one pipeline            node 1: the other
        0  1  2  3                      4  5  6  7        (stage = rank % 4)
    rank 5: pp [4 5 6 7], ep [1 5] (across the nodes: node-limited routing has 2 nodes to choose
    from), node [5], rail [1 5]

Dispatch and combine (3.2.2); h (N, D) tokens, idx (N, K) their experts, E_l = E/ep experts a GPU
    1. count the rows for each destination expert, exchange the count matrix (all_to_all_single of
       (ep, E_l) counts; a host sync, as in any implementation without DeepEP's kernels)
    2. permute rows so each destination's share is contiguous and send them (all_to_all_single with
       those split sizes); the receiver orders them by local expert for the grouped GEMM
    3. combine is the mirror image: rows go back the way they came and are summed per token
    Hierarchical: step 1-2 run twice, first over the rail group (one row per (token, node), with the
    token's idx and g), then over the node group (one row per (token, expert on this node)). The gate
    multiplies each expert's output on the expert's GPU, so the node's partial sum is formed before
    the row crosses back; moe.MoE's math is unchanged (eq. 12), only the order of the sum differs.
    The flat route leaves g at the token side and returns one row per (token, k), as LocalDispatcher.

FP8 dispatch (3.3.3), when the model has fp8=True
    Forward: h is quantized once at the source in 1x128 tiles with power-of-two scales
    (fp8.act_quant(pow2=True)); the FP8 bytes and the scales travel in one buffer and feed the
    experts' up-projections (w1, w3) as they are (Experts.forward(x, counts, x_q)). Backward: the
    activation gradient before the down-projection is what moves towards the experts, so it travels
    quantized the same way; the gradient of the dispatched rows travels back in BF16. So: rows moving
    towards the experts are FP8, rows moving back ("combine", both passes) are BF16. gloo has no
    float8 dtype, so every payload travels as its bytes (a uint8 view; NCCL moves the same bytes).
    The down-projection's backward quantizes the arrived (dequantized) gradient again. With
    power-of-two scales (fp8.pow2_scales=True) E4M3 is one 3-bit-mantissa grid whatever the scale,
    so this is exact for its Dgrad (1x128 tiles: the tile quantizes to itself) and, for its Wgrad's
    128x1 tiles, exact but for elements in the subnormals of one tiling; the flat route then equals
    the single-process FP8 layer (tests/test_comm.py). The hierarchical route sends a token's
    gradient once per node, before the gate multiplies it, so it is rounded before, not after, that
    product: one more E4M3 rounding (~5% relative in the tests) than the single-process layer.

Overlap (3.2.2, the shared experts while tokens are in flight): dispatch_async starts the (first)
all-to-all with async_op=True and returns; MoE.forward computes the shared experts, then waits. On
the GPU NCCL moves the rows on its own stream while the shared experts' GEMMs run on the compute
stream; under gloo a background thread moves them. The hierarchical second hop and the backward
all-to-alls run synchronously (overlapping them is DualPipe's job, dualpipe.py).

SM budget (3.2.2: 20 of 132 SMs for communication): NCCL runs one thread block (CTA) per channel.
init(nccl_channels=N) sets NCCL_MIN_NCHANNELS = NCCL_MAX_NCHANNELS = N and NCCL_MIN_CTAS =
NCCL_MAX_CTAS = N before the first communicator exists (NCCL reads them once per process); a
communicator with its own cap is ProcessGroupNCCL.Options().config.min_ctas / max_ctas (bench.py).

Gradients of an expert-parallel step (the global loss is the mean over the dp ranks of each rank's
loss, L = 1/dp sum_d L_d)
    dense parameters (attention, shared experts, gate, norms, embeddings): each rank has dL_d/dtheta;
        dL/dtheta = the mean over the dp group.
    expert parameters: the all-to-all backward already brings to the expert's GPU the gradient of
        every token of its ep group, sum_{d in ep group} dL_d/dtheta_e. Summing that over the edp
        group covers all dp ranks once, so dL/dtheta_e = (sum over edp) / dp.
    router loads (moe.update_bias): summed over the dp group (grid.sum_over_dp).
    the global norm (grad_norm, for clipping): after the reduction the copies of a gradient are equal,
        so each is counted on one rank only (train.ownership: dp rank 0 for dense tensors, edp rank 0
        for an expert slice, Pipeline.owns for a pipeline's stages) and the squares summed over all.
We reduce explicitly, one flat buffer per group and dtype, both all-reduces in flight together,
after the last micro-batch, rather than through DDP: it behaves the same under gradient
accumulation and under dualpipe.py's hand-driven backward (no hooks, no no_sync), and one flat
buffer per group is the layout ZeRO-1 shards. The price: no overlap of the dense all-reduce with
backward (DDP's buckets give that). Optimizer state is not sharded yet; ZeRO-1 (3.2) would
reduce_scatter each flat buffer over its group instead of all-reducing it, let every rank update
its 1/dp (experts: 1/edp) share of the parameters and AdamW moments, and all_gather the result.

Simplified against the paper: NCCL's all_to_all_single instead of DeepEP's warp-specialized
kernels (the count exchange is a host sync; no chunked IB/NVLink pipelining); the hierarchical
second hop sends one row per (token, expert) rather than one per (token, GPU); only the forward
dispatch overlaps (with the shared experts); no token is ever dropped.
"""

import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from moe import MoE, Experts, compute_dtype, tokens_per_expert

GROUPS = ("dp", "ep", "edp", "pp", "node", "rail")
NCCL_CHANNEL_VARS = ("NCCL_MIN_NCHANNELS", "NCCL_MAX_NCHANNELS", "NCCL_MIN_CTAS", "NCCL_MAX_CTAS")


# -----------------------------------------------------------------------------
# 1. The process grid

@dataclass(frozen=True)
class Layout:
    """Which ranks form which group, in pure python (no processes): world = pp * dp, dp = edp * ep."""
    world: int
    local_world: int      # ranks per node
    pp: int = 1
    ep: int = 1
    n_experts: int = 0    # routed experts per MoE layer; 0: not checked here
    pp_inner: bool = False  # rank order: False stage-major (a stage's dp ranks consecutive); True
                            # the stages of one pipeline on consecutive ranks (a node holds whole
                            # pipelines, and the dp and ep groups span the nodes)

    def __post_init__(self):
        bad = []
        if self.pp < 1 or self.ep < 1:
            bad.append(f"pp={self.pp} and ep={self.ep} must be >= 1")
        elif self.world % self.pp:
            bad.append(f"pp={self.pp} must divide the world size {self.world} (pp x dp = world)")
        elif (self.world // self.pp) % self.ep:
            bad.append(f"ep={self.ep} must divide dp = world/pp = {self.world // self.pp}")
        if self.n_experts and self.ep >= 1 and self.n_experts % self.ep:
            bad.append(f"ep={self.ep} must divide n_routed_experts={self.n_experts}")
        if self.local_world < 1 or self.world % self.local_world:
            bad.append(f"local_world={self.local_world} (ranks per node) must divide the world size {self.world}")
        elif self.pp_inner and self.local_world % self.pp and self.pp % self.local_world:
            bad.append(f"with pp_inner a node holds whole pipelines or a pipeline whole nodes: pp={self.pp} "
                       f"and local_world={self.local_world} must divide one another")
        elif self.ep > 1 and self.per_node % self.ep and self.ep % self.per_node:
            bad.append(f"an expert-parallel group must sit inside one node or span whole nodes: ep={self.ep} "
                       f"and local_world={self.local_world}" + (f" / pp={self.pp}" if self.pp_inner else "")
                       + " must divide one another")
        if bad:
            raise ValueError(f"parallel layout world={self.world}, local_world={self.local_world}, pp={self.pp}, "
                             f"ep={self.ep}: " + "; ".join(bad))

    @property
    def dp(self):
        return self.world // self.pp

    @property
    def edp(self):
        return self.dp // self.ep

    @property
    def per_node(self):
        """Consecutive members of a stage's dp group that one node holds (pp_inner: one per pipeline)."""
        return max(1, self.local_world // self.pp) if self.pp_inner else self.local_world

    @property
    def nodes_per_ep(self):
        return self.ep // self.ranks_per_node_ep

    @property
    def ranks_per_node_ep(self):
        return min(self.ep, self.per_node)

    def grid(self):
        """(pp, edp, ep) tensor of ranks: stage-major, or with the stage varying fastest (pp_inner)."""
        if self.pp_inner:
            return torch.arange(self.world).view(self.edp, self.ep, self.pp).permute(2, 0, 1)
        return torch.arange(self.world).view(self.pp, self.edp, self.ep)

    def coords(self, rank):
        """(pipeline stage, index among copies of the experts, rank inside the ep group)."""
        if self.pp_inner:
            rest, p = divmod(rank, self.pp)
        else:
            p, rest = divmod(rank, self.dp)
        e, r = divmod(rest, self.ep)
        return p, e, r

    def all_groups(self, kind):
        """Every group of one kind, as lists of ranks (all ranks create them in this order)."""
        g, L = self.grid(), self.ranks_per_node_ep
        if kind == "dp":
            lists = g.flatten(1)  # (pp, dp)
        elif kind == "ep":
            lists = g.flatten(0, 1)  # (pp * edp, ep)
        elif kind == "edp":
            lists = g.permute(0, 2, 1).flatten(0, 1)  # (pp * ep, edp)
        elif kind == "pp":
            lists = g.flatten(1).t()  # (dp, pp)
        elif kind == "node":  # ep groups cut into their node-sized pieces
            lists = g.reshape(-1, L)  # (world / L, L)
        elif kind == "rail":  # the same local index on each node of an ep group
            lists = g.reshape(-1, self.nodes_per_ep, L).transpose(1, 2).flatten(0, 1)  # (world / nodes, nodes)
        else:
            raise ValueError(f"unknown group kind {kind!r}; kinds: {GROUPS}")
        return lists.tolist()

    def groups(self, rank):
        """The ranks of each group that `rank` belongs to."""
        return {kind: next(r for r in self.all_groups(kind) if rank in r) for kind in GROUPS}

    def node(self, rank):
        return rank // self.local_world


class Grid:
    """This rank's place in a Layout and its process groups. A group of one member is None: its
    collectives are skipped, so a Grid.single() runs the expert-parallel code in one process."""

    def __init__(self, layout, rank, groups):
        self.layout, self.rank, self.groups = layout, rank, groups
        self.ranks = layout.groups(rank)
        self.pp_rank, self.edp_rank, self.ep_rank = layout.coords(rank)
        self.dp_rank = self.edp_rank * layout.ep + self.ep_rank  # data shard index inside the stage
        self.node_in_ep = self.ep_rank // layout.ranks_per_node_ep  # which node of my ep group I am on
        self.traffic = Traffic()

    @classmethod
    def single(cls):
        return cls(Layout(1, 1), 0, {kind: None for kind in GROUPS})

    def links(self, kind):
        """The link from this rank to each member of one of its groups: self, intra or inter (node)."""
        node = self.layout.node
        return ["self" if r == self.rank else "intra" if node(r) == node(self.rank) else "inter"
                for r in self.ranks[kind]]

    def all_reduce(self, t, kind, op=dist.ReduceOp.SUM, async_op=False):
        if self.groups[kind] is None:
            return None
        return dist.all_reduce(t, op=op, group=self.groups[kind], async_op=async_op)

    def sum_over_dp(self, t):
        """moe.update_bias's all_reduce: router loads summed over every data-parallel rank."""
        self.all_reduce(t, "dp")
        return t


def make_grid(layout, rank):
    """Create every group of the layout (a collective call: all ranks, same order) -> this rank's Grid."""
    groups = {}
    for kind in GROUPS:
        lists = layout.all_groups(kind)
        if all(len(r) == 1 for r in lists):
            groups[kind] = None
            continue
        mine, _ = dist.new_subgroups_by_enumeration(lists)
        groups[kind] = mine if len(layout.groups(rank)[kind]) > 1 else None
    return Grid(layout, rank, groups)


def init(pp=1, ep=1, nccl_channels=None, local_world=None, n_experts=0, backend=None, pp_inner=False):
    """The grid from torchrun's environment (WORLD_SIZE, RANK, LOCAL_WORLD_SIZE, LOCAL_RANK).
    Checks the layout before any process group exists; starts the default group if needed.
    nccl_channels=N caps NCCL at N channels / CTAs (SMs) per kernel; local_world overrides the
    ranks per node (tests simulate nodes with it)."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    layout = Layout(world, local_world or int(os.environ.get("LOCAL_WORLD_SIZE", world)), pp, ep, n_experts, pp_inner)
    if nccl_channels:
        if dist.is_initialized() and dist.get_backend() == "nccl":
            raise RuntimeError("init(nccl_channels=...) must run before the NCCL process group exists: "
                               "NCCL reads NCCL_MAX_NCHANNELS once, when its first communicator is created")
        for var in NCCL_CHANNEL_VARS:
            os.environ[var] = str(nccl_channels)
    if world == 1 and not dist.is_initialized():
        return Grid.single()
    if not dist.is_initialized():
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return make_grid(layout, rank)


def check_node_limited(args, layout):
    """Node-limited routing (2.1.2) needs each expert group inside one node: n_expert_groups a
    multiple of the nodes an ep group spans. With n_expert_groups = nodes a token reaches at most
    M = n_limited_groups nodes (moe.Gate.route keeps M groups); n_expert_groups = 1 means no limit."""
    nodes = layout.nodes_per_ep
    if nodes > 1 and args.n_expert_groups > 1 and args.n_expert_groups % nodes:
        raise ValueError(f"node-limited routing: n_expert_groups={args.n_expert_groups} must be a multiple of the "
                         f"{nodes} nodes an expert-parallel group spans (ep={layout.ep}, local_world="
                         f"{layout.local_world}), so that every expert group lives on one node")


# -----------------------------------------------------------------------------
# 2. One all-to-all: rows to slots, slots owned by the members of a group

class Traffic:
    """Bytes this rank sent through the dispatchers since reset(), by direction (dispatch: towards
    the experts, in forward and in combine's backward; combine: back to the tokens) and link
    (intra: NVLink inside a node, inter: across nodes). Rows a GPU keeps for itself are not counted."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.bytes = {f"{d}_{link}": 0 for d in ("dispatch", "combine") for link in ("intra", "inter")}

    def add(self, direction, links, splits, row_bytes):
        for link, rows in zip(links, splits):
            if link != "self":
                self.bytes[f"{direction}_{link}"] += rows * row_bytes

    @property
    def intra(self):
        return self.bytes["dispatch_intra"] + self.bytes["combine_intra"]

    @property
    def inter(self):
        return self.bytes["dispatch_inter"] + self.bytes["combine_inter"]


def pack(rows):
    """Tensors with the same number of rows -> one (R, bytes) uint8 buffer: a single message per
    peer, and float8 (which gloo refuses) travels as its bytes. One tensor: a view, no copy."""
    flat = [t.reshape(t.shape[0], math.prod(t.shape[1:])).view(torch.uint8) for t in rows]
    return flat[0] if len(flat) == 1 else torch.cat(flat, 1)


def unpack(buf, like):
    """The inverse of pack for tensors shaped and typed like `like` (all but the first dim)."""
    out, col = [], 0
    for t in like:
        n = math.prod(t.shape[1:]) * t.element_size()
        part = buf[:, col:col + n] if len(like) > 1 else buf
        out.append(part.contiguous().view(t.dtype).view(buf.shape[0], *t.shape[1:]))
        col += n
    return out


def sum_rows(x, index, n):
    """out[index[p]] += x[p] into n rows, accumulated in FP32 or wider (the sum of a token's pieces)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return torch.zeros(n, *x.shape[1:], dtype=dtype, device=x.device).index_add_(0, index, x.to(dtype))


class Pending:
    """Rows in flight: wait() completes the transfer and returns what finish() makes of it."""

    def __init__(self, work, finish):
        self.work, self.finish = work, finish

    def wait(self):
        if self.work is not None:
            self.work.wait()
        return self.finish()


class Hop:
    """One all_to_all_single over a group for P rows, row p bound for slot dest[p]; member j of the
    group owns slots j*n_local .. (j+1)*n_local - 1 (its experts; one slot per node for the first
    hierarchical hop). send() delivers rows sorted by local slot, back() is its exact inverse."""

    def __init__(self, dest, n_local, grid, kind, traffic):
        self.group, self.links, self.traffic = grid.groups[kind], grid.links(kind), traffic
        G = len(self.links)
        self.order = dest.argsort(stable=True)  # (P,) rows by destination slot, so by member
        sent = tokens_per_expert(dest, G * n_local).view(G, n_local)  # (G, n_local)
        got = exchange_counts(sent, self.group)  # (G, n_local): rows from member j for each slot of mine
        splits = torch.stack([sent.sum(1), got.sum(1)]).tolist()  # the one host sync of the hop
        self.send_splits, self.recv_splits = splits
        self.counts = got.sum(0)  # (n_local,) rows per local slot
        slot = torch.arange(n_local, device=dest.device).repeat(G).repeat_interleave(  # (R,), no second sync
            got.flatten(), output_size=sum(self.recv_splits))
        self.by_slot = slot.argsort(stable=True)  # arrival order (member, slot) -> slot order
        self.unsort = torch.empty_like(self.by_slot)
        self.unsort[self.by_slot] = torch.arange(len(slot), device=dest.device)

    def start(self, rows, src=None):
        """rows: tensors of P rows, or source rows that src (one index, or one per tensor) picks
        per row. Starts the transfer; Pending.wait() returns them at the receivers in slot order."""
        srcs = src if isinstance(src, (list, tuple)) else [src] * len(rows)
        picked = [t[self.order if s is None else s[self.order]] for t, s in zip(rows, srcs)]
        buf = pack(picked)
        self.traffic.add("dispatch", self.links, self.send_splits, buf.shape[1])
        moved, work = all_to_all(buf, self.recv_splits, self.send_splits, self.group, async_op=True)
        return Pending(work, lambda: [t[self.by_slot] for t in unpack(moved, picked)])

    def send(self, rows, src=None):
        return self.start(rows, src).wait()

    def back(self, rows, into=None):
        """Rows in slot order back to their senders: in the senders' row order (P rows), or, with
        into=(n, src), summed into n rows, row p landing on src[p]."""
        arrived = [t[self.unsort] for t in rows]
        buf = pack(arrived)
        self.traffic.add("combine", self.links, self.recv_splits, buf.shape[1])
        moved, _ = all_to_all(buf, self.send_splits, self.recv_splits, self.group)
        moved = unpack(moved, arrived)
        if into is not None:
            n, src = into
            return [sum_rows(m, src[self.order], n) for m in moved]
        return [torch.empty_like(m).index_copy_(0, self.order, m) for m in moved]


def exchange_counts(sent, group):
    """The count matrix: row j of `sent` goes to member j, row j of the result came from member j."""
    if group is None:
        return sent
    got = torch.empty_like(sent)
    dist.all_to_all_single(got, sent, group=group)
    return got


def all_to_all(buf, out_splits, in_splits, group, async_op=False):
    """all_to_all_single over rows of a uint8 buffer -> (received buffer, work or None)."""
    if group is None:  # a group of one: the rows stay where they are
        return buf, None
    out = buf.new_empty(sum(out_splits), buf.shape[1])
    work = dist.all_to_all_single(out, buf.contiguous(), out_splits, in_splits, group=group, async_op=async_op)
    return out, work


# -----------------------------------------------------------------------------
# 3. Routes: the token side (N rows) to the expert side (M rows, sorted by local expert) and back

class FlatRoute:
    """One hop over the ep group, one row per (token, expert) pair: the simple twin."""

    def __init__(self, grid, idx, n_local, traffic):
        N, K = idx.shape
        self.N = N
        self.token = torch.arange(N * K, device=idx.device) // K  # (N*K,) token of each (token, k) pair
        self.hop = Hop(idx.flatten(), n_local, grid, "ep", traffic)
        self.counts = self.hop.counts

    def dispatch(self, payload, g=None):
        return self.hop.start(payload, src=self.token)  # g stays at the token side (combine applies it)

    def dispatch_grad(self, grads):
        return self.hop.back(grads, into=(self.N, self.token))  # a token's K gradients summed: (N, D)

    def combine(self, rows):
        return self.hop.back(rows)  # (N*K, D) in (token, k) order, as moe.LocalDispatcher

    def combine_grad(self, payload):
        return self.hop.send(payload)  # payload: (N*K, ...) rows in (token, k) order


class HierarchicalRoute:
    """3.2.2: over the rail group once per (token, destination node), to the GPU with this GPU's
    local index there; then over the node group once per (token, expert on that node)."""

    def __init__(self, grid, idx, n_local, traffic):
        N, K = idx.shape
        self.grid, self.traffic, self.n_local, self.N, self.K, self.idx = grid, traffic, n_local, N, K, idx
        self.E_node = grid.layout.ranks_per_node_ep * n_local  # experts per node of the ep group
        node = idx // self.E_node  # (N, K) node of each chosen expert
        reach = torch.zeros(N, grid.layout.nodes_per_ep, dtype=torch.bool, device=idx.device).scatter_(1, node, True)
        self.t1, b1 = reach.nonzero(as_tuple=True)  # (T1,) one row per (token, node it reaches): <= M per token
        self.hop1 = Hop(b1, 1, grid, "rail", traffic)

    def dispatch(self, payload, g):
        """Start the cross-node hop; Pending.wait() runs the in-node hop and returns the expert side."""
        first = self.hop1.start([*payload, self.idx.to(torch.int32), g], src=self.t1)
        return Pending(None, lambda: self.forward_inside(first.wait()))

    def forward_inside(self, arrived):
        *x, idx, g = arrived  # (R1, ...) rows that crossed to this GPU, each with its token's idx and g
        base = self.grid.node_in_ep * self.E_node
        here = (idx >= base) & (idx < base + self.E_node)  # (R1, K) the experts on this node
        self.r2, k2 = here.nonzero(as_tuple=True)  # (P2,) one row per (arrived row, expert here)
        self.R1, self.g_at = idx.shape[0], self.r2 * self.K + k2  # g_at: the pair's entry of g (R1*K)
        self.hop2 = Hop(idx[self.r2, k2].long() - base, self.n_local, self.grid, "node", self.traffic)
        self.counts = self.hop2.counts
        return self.hop2.send([*x, g.flatten()], src=[self.r2] * len(x) + [self.g_at])

    def dispatch_grad(self, grads):
        dx, dg = grads  # (M, D), (M,) at the experts
        dx_p, dg_p = self.hop2.back([dx, dg])  # (P2, D), (P2,)
        dx_r = sum_rows(dx_p, self.r2, self.R1).to(dx.dtype)  # summed inside the node, crosses in BF16
        dg_r = sum_rows(dg_p, self.g_at, self.R1 * self.K).view(self.R1, self.K).to(dg.dtype)
        return self.hop1.back([dx_r, dg_r], into=(self.N, self.t1))  # (N, D), (N, K)

    def combine(self, rows):
        (y,) = rows  # (M, D), already times g
        (y_p,) = self.hop2.back([y])  # (P2, D)
        y_r = sum_rows(y_p, self.r2, self.R1).to(y.dtype)  # the node's partial sum, before it crosses
        return self.hop1.back([y_r], into=(self.N, self.t1))  # (N, D)

    def combine_grad(self, payload):
        return self.hop2.send(self.hop1.send(payload, src=self.t1), src=self.r2)  # payload: (N, ...) rows


# -----------------------------------------------------------------------------
# 4. The dispatcher

@dataclass
class Handle:
    """What combine and the backward passes need from one dispatch."""
    route: object
    g: torch.Tensor = None          # (N, K) token-side gates (flat: combine applies them)
    dtype: torch.dtype = None       # the dtype rows travel and compute in (BF16 under autocast)
    g_rows: torch.Tensor = None     # (M,) the gate of each expert-side row (hierarchical)
    x_q: tuple = None               # (x_fp8 (M, D), x_s (M, D/128)) with FP8 dispatch


class _Dispatch(torch.autograd.Function):
    """h (N, D) [and g (N, K)] at the token side -> x (M, D) [and g_rows (M,)] at the experts. The
    transfer was started before (dispatch_async); backward sends the gradients back, summed."""

    @staticmethod
    def forward(ctx, pending, handle, dispatcher, h, *g):
        ctx.handle, ctx.dtypes = handle, (h.dtype, *(t.dtype for t in g))
        rows = pending.wait()
        if g:
            *rows, handle.g_rows = rows
        x, handle.x_q = dispatcher.arrive(rows, handle.dtype)
        return (x, handle.g_rows) if g else x

    @staticmethod
    def backward(ctx, dx, dg_rows=None):
        grads = [dx] + ([dg_rows] if dg_rows is not None else [])
        out = ctx.handle.route.dispatch_grad(grads)  # combine direction: the rows' dtype (BF16)
        return (None, None, None, *(o.to(dtype) for o, dtype in zip(out, ctx.dtypes)))


class _Combine(torch.autograd.Function):
    """Expert-side rows -> the token side; backward moves the gradient towards the experts, in FP8
    when the dispatcher is (3.3.3: the activation gradient before the down-projection)."""

    @staticmethod
    def forward(ctx, y, handle, dispatcher):
        ctx.handle, ctx.dispatcher, ctx.dtype = handle, dispatcher, y.dtype
        (out,) = handle.route.combine([y])
        return out.to(y.dtype)

    @staticmethod
    def backward(ctx, dout):
        d = ctx.dispatcher
        rows = ctx.handle.route.combine_grad(d.leave(dout.contiguous(), dout.dtype))
        dy, _ = d.arrive(rows, ctx.dtype)
        return dy, None, None


class AllToAllDispatcher:
    """moe.LocalDispatcher's interface across an expert-parallel group: this GPU's Experts hold
    experts ep_rank*E/ep .. (ep_rank+1)*E/ep - 1; the gate still scores all E.

    dispatch(h (N, D), idx (N, K), g=None) -> x (M, D) sorted by local expert, counts (E/ep,), handle
    combine(y (M, D), handle) -> (N*K, D) in (token, k) order, or with g given to dispatch the
                                 routed sum (N, D) = sum_k g_tk y_tk
    dispatch_async(h, idx, g) -> wait(), which returns dispatch's result: the rows travel between.
    hierarchical=True needs g. fp8=True: FP8 dispatch (3.3.3); handle.x_q then holds the FP8 rows.
    overlap=False waits for the rows before dispatch_async returns (the bench's "no overlap").
    """

    def __init__(self, grid, n_experts, hierarchical=False, fp8=False, overlap=True, traffic=None):
        if n_experts % grid.layout.ep:
            raise ValueError(f"ep={grid.layout.ep} must divide n_routed_experts={n_experts}")
        self.grid, self.n_local = grid, n_experts // grid.layout.ep
        self.hierarchical, self.fp8, self.overlap = hierarchical, fp8, overlap
        self.traffic = traffic if traffic is not None else grid.traffic

    def leave(self, x, dtype):
        """The payload a tensor travels as: (x in dtype,) or, FP8, (bytes of x_fp8, scales x_s)."""
        if not self.fp8:
            return [x.to(dtype)]
        from fp8 import act_quant
        with torch.autocast(x.device.type, enabled=False):
            x_fp8, x_s = act_quant(x, pow2=True)  # 1x128 tiles, power-of-two scales (3.3.3)
        return [x_fp8.view(torch.uint8), x_s]  # gloo has no float8: the bytes travel as uint8

    def arrive(self, rows, dtype):
        """A payload -> (x in dtype, (x_fp8, x_s) or None)."""
        if not self.fp8:
            return rows[0].to(dtype), None
        from fp8 import FP8, act_dequant
        x_fp8, x_s = rows[0].view(FP8), rows[1]
        return act_dequant(x_fp8, x_s).to(dtype), (x_fp8, x_s)

    @torch.compiler.disable  # host syncs and collectives: eager, like the FP8 layers
    def dispatch_async(self, h, idx, g=None):
        if self.hierarchical and g is None:
            raise ValueError("the hierarchical dispatcher applies the gates before the rows cross back: pass g")
        route = (HierarchicalRoute if self.hierarchical else FlatRoute)(self.grid, idx, self.n_local, self.traffic)
        handle = Handle(route, g=g, dtype=compute_dtype(h))
        with torch.no_grad():
            pending = route.dispatch(self.leave(h, handle.dtype), None if g is None else g.detach())
        if not self.overlap:
            rows = pending.wait()
            pending = Pending(None, lambda: rows)
        gates = [g] if self.hierarchical else []

        @torch.compiler.disable
        def wait():
            out = _Dispatch.apply(pending, handle, self, h, *gates)
            return (out[0] if gates else out), route.counts, handle
        return wait

    def dispatch(self, h, idx, g=None):
        return self.dispatch_async(h, idx, g)()

    @torch.compiler.disable
    def combine(self, y, handle):
        if self.hierarchical:  # g_it FFN_i(u_t) on the expert's GPU: the sums can form on the way back
            return _Combine.apply(y * handle.g_rows.to(y.dtype).unsqueeze(-1), handle, self)  # (N, D)
        pairs = _Combine.apply(y, handle, self)  # (N*K, D) in (token, k) order
        if handle.g is None:
            return pairs
        N, K = handle.g.shape
        return (pairs.view(N, K, y.shape[-1]) * handle.g.unsqueeze(-1).to(pairs.dtype)).sum(1)  # as moe.MoE: (N, D)


# -----------------------------------------------------------------------------
# 5. A single-process model -> this rank's expert-parallel model

def expert_range(grid, n_experts):
    n_local = n_experts // grid.layout.ep
    return grid.ep_rank * n_local, (grid.ep_rank + 1) * n_local


def moe_layers(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def shard_experts(model, grid, hierarchical=False, overlap=True):
    """Keep this rank's E/ep experts of every MoE layer (parameters keep their names, shapes
    [E/ep, ...]) and install the all-to-all dispatcher (FP8 dispatch where the experts are FP8).
    For a model too large for one GPU, build it on the meta device, shard it, then to_empty() and
    initialize (or load expert_slices' rows)."""
    for _, moe in moe_layers(model):
        E = moe.args.n_routed_experts
        lay = grid.layout
        Layout(lay.world, lay.local_world, lay.pp, lay.ep, E, lay.pp_inner)  # raises if ep does not divide E
        check_node_limited(moe.args, grid.layout)
        start, stop = expert_range(grid, E)
        for name in ("w1", "w2", "w3"):
            w = getattr(moe.experts, name)
            setattr(moe.experts, name, nn.Parameter(w.detach()[start:stop].clone(), requires_grad=w.requires_grad))
        moe.dispatcher = AllToAllDispatcher(grid, E, hierarchical, fp8=moe.experts.fp8, overlap=overlap)
    return model


def expert_slices(model, grid):
    """{parameter name: (start, stop, full)}: the rows of dim 0 of each expert parameter this rank holds."""
    out = {}
    for name, moe in moe_layers(model):
        start, stop = expert_range(grid, moe.args.n_routed_experts)
        for w in ("w1", "w2", "w3"):
            out[f"{name}.experts.{w}" if name else f"experts.{w}"] = (start, stop, moe.args.n_routed_experts)
    return out


# -----------------------------------------------------------------------------
# 6. Gradients of an expert-parallel step (the docstring derives the factors)

def split_parameters(model):
    """(dense, expert) parameters that train: expert = the weights of the routed experts."""
    routed = {id(p) for m in model.modules() if isinstance(m, Experts) for p in m.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    return [p for p in params if id(p) not in routed], [p for p in params if id(p) in routed]


def start_reduce(params, grid, kind, scale):
    """All-reduce the gradients of params over one group as flat buffers (one per dtype), in flight;
    the returned finish() waits, scales and writes them back."""
    finishers = []
    for dtype in sorted({p.dtype for p in params}, key=str):
        ps = [p for p in params if p.dtype == dtype]
        for p in ps:
            if p.grad is None:  # a parameter no token reached: its gradient is zero
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.flatten() for p in ps])
        work = grid.all_reduce(flat, kind, async_op=True)
        finishers.append((work, flat, ps))

    def finish():
        for work, flat, ps in finishers:
            if work is not None:
                work.wait()
            flat.mul_(scale)
            for p, g in zip(ps, flat.split([p.numel() for p in ps])):
                p.grad.copy_(g.view_as(p))
    return finish


def reduce_gradients(model, grid):
    """After backward (the last micro-batch): dense gradients averaged over the dp group, expert
    gradients summed over the edp group and divided by dp."""
    dense, routed = split_parameters(model)
    dp = grid.layout.dp
    pending = [start_reduce(dense, grid, "dp", 1 / dp), start_reduce(routed, grid, "edp", 1 / dp)]
    for finish in pending:
        finish()


# Home: beside reduce_gradients, a collective; moe.py/model.py stay off torch.distributed, dualpipe.py needs no norm.
def grad_norm(model, owned=None):
    """torch.nn.utils.clip_grad_norm_'s norm of the whole model on any layout, after reduce_gradients:
    each parameter's gradient counted once, on the rank where owned(name) (train.ownership: one copy of
    each dense tensor, expert slice and pipeline stage entry), the squares summed in float64 over every
    rank. One process: owned=None, torch's fused norm in the gradients' dtype (no float64, no collective)."""
    grads = [p.grad for n, p in model.named_parameters() if p.grad is not None and (owned is None or owned(n))]
    if owned is None:
        return torch.nn.utils.get_total_norm(grads)
    device = next(model.parameters()).device
    norms = [torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]
    total = torch.stack(norms).square().sum() if norms else torch.zeros((), dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.sqrt()


def clip_coefficient(total, max_norm):
    """torch.nn.utils.clip_grad_norm_'s factor, min(1, max_norm / (norm + 1e-6)), in the norm's dtype and
    on its device (no host sync): every gradient held here, copies too, is multiplied by it (train.py:
    inside AdamW.step, as it reads them)."""
    return (max_norm / (total + 1e-6)).clamp(max=1.0)

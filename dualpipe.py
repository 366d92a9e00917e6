"""
DualPipe, DeepSeek-V3's bidirectional pipeline schedule (technical report arXiv 2412.19437, section 3.2.1,
figure 5, table 2), as data, with a simulator and 1F1B beside it as the baseline; the executor that
runs either schedule with the model cut into stages (3.2.1, 3.2.3); and the overlapped F&B pair, one
micro-batch's forward interleaved with another's backward piece by piece (3.2.1, figure 4).

    schedule(PP, C)         DualPipe: each rank's ordered steps, in the eight phases of DeepSeek's
                            public DualPipe.step() (github.com/deepseek-ai/DualPipe), special cases included
    schedule_1f1b(PP, C)    1F1B (one direction, full backward, nothing overlapped), same format
    simulate(steps, times)  start and end of every op, each rank's busy and idle time, makespan, bubble
    table2_bubble(...)      the paper's table 2 bubbles, to hold the simulator against
    python dualpipe.py 4 10 prints both timelines and their bubbles

    stage_layers(args, PP)  blocks per stage: balanced, the last stage lighter by its head and MTP
    Stage                   one stage of model.Transformer: its own blocks only, under the Transformer's
                            parameter names; the first holds the embedding, the last the final norm, the
                            output head, the MTP modules and an embedding for MTP's shifted tokens
    backward_input          B and W: the backward split in two over autograd's graph (zero bubble)
    Stage.pieces, block_pieces   a stage's forward cut into attention / dispatch / mlp / combine pieces
    Tape, overlapped        the pieces run and backpropagated one at a time, a pair interleaved in the
                            order of DeepSeek's training profile (PROFILE_ORDER), Streams for CUDA
    ticks, comm_plan        the executor's clock, and the messages each tick ends with
    Pipeline                one rank's stages; step(): one optimizer step's forward and backward under
                            schedule() or schedule_1f1b(), no optimizer inside, overlap=True: DualPipe's
                            pairs through overlapped(); evaluate(): the mean main loss, forward only

The data. Micro-batches enter from both ends: direction 0 flows from rank 0 to rank PP-1, direction 1
from rank PP-1 to rank 0, C/2 micro-batches ("chunks") each. Rank i holds stage i of direction 0 and
stage PP-1-i of direction 1, so rank 0 holds the first stage of direction 0 and the last of direction 1.
A step is a tuple of one or two actions that run together (two: an overlapped F&B pair, one F and one
B); an action is (kind, direction, chunk). "F" is a forward chunk; "B" is the backward for the input,
and for the weights too unless a "W" of the same (direction, chunk) comes later on that rank (the
zero-bubble split that lets W fill bubbles). In the timeline a cell reads direction, kind, chunk:
"0F3" is the forward of direction 0's micro-batch 3, "1B2" a backward, "0W1" a deferred weight gradient,
"0F3+1B1" an overlapped pair. PP=4, C=10, one cell per step (figure 5 draws PP=8, C=20):

    phase  1        2                3            4
    rank 0 0F0 0F1  0F2 1F0          1B0 1W0 1F1  0F3+1B1 1F2+0B0 0F4+1B2 1F3+0B1
    rank 1          0F0 1F0 0F1 1F1               0F2 1B0 1F2+0B0 0F3+1B1 1F3+0B1 0F4+1B2 1F4+0B2
    rank 2          1F0 0F0 1F1 0F1               1F2 0B0 0F2+1B0 1F3+0B1 0F3+1B1 1F4+0B2 0F4+1B2
    rank 3 1F0 1F1  1F2 0F0          0B0 0W0 0F1  1F3+0B1 0F2+1B0 1F4+0B2 0F3+1B1

    phase  5            6                7        8
    rank 0 1B3 1F4+0B2  1B4 0B3          0W3 0B4  0W4
    rank 1              1B3 0B3 1B4 0B4           1W4 0W4
    rank 2              0B3 1B3 0B4 1B4           0W4 1W4
    rank 3 0B3 0F4+1B2  0B4 1B3          1W3 1B4  1W4

`python dualpipe.py 4 10` draws the same steps against time, with the idle time as dots.

The bubble, precisely. simulate() gives each rank r its busy time (the sum of its steps' durations) and
idle[r] = makespan - busy[r]. In 1F1B every rank does the same work, and the simulator gives
idle[r] = (PP-1)(F + B + W) on every rank for any times (p2p = 0): table 2's 1F1B row, whose B is the
whole backward, B + W here. In DualPipe the ranks run the same chunks but not the same number of
overlapped pairs: rank r runs C - 3PP/2 + h + 1 of them, h = min(r, PP-1-r), one fewer on the two
middle ranks (their first pair is split, see step 4), so an end rank runs C - 3PP/2 + 1 and the four
innermost ranks C - PP - 1. When F&B < F + B + W the ranks nearer the ends are therefore busier and
idle less. Table 2 counts the idle time of the innermost ranks, which do the least work:

    bubble = makespan - min_r busy[r] = max_r idle[r]

so the makespan is their work plus the bubble. With F = B (the input-gradient B) and W <= B the
simulator gives table 2's number exactly, for every C:

    bubble = (PP/2 - 1)(F&B + (B + W) - 3W)

Other times (found with the simulator: 8100 runs with exact times, F and B in 1/4 .. 11/4, W in 0 .. 5/2,
F&B at both ends and the middle of max(F, B+W) .. F+B+W, PP 2-12, C = 2PP, 2PP+2, 3PP; the tests hold
it on a smaller grid), with k = PP/2 - 1:

    bubble = table 2 + k (max(0, F - B) + max(0, W - B)) - min(F, k max(0, B - F))

independent of C: a forward longer than the input-gradient backward adds k(F - B), a W longer than B
adds k(W - B), and a forward shorter than B takes a constant min(F, k(B - F)) off, never more than one
F. So table 2 holds exactly for F = B, W <= B; for F < B, W <= B it holds up to that constant.
With p2p > 0 every cross-rank dependency waits p2p more, and the bubbles of both schedules grow with C
(no formula is claimed there: in the paper the overlapped pair hides these transfers, and the
simulator does not model that).

The stages. The Transformer is cut into PP stages of whole blocks (stage_layers: a block counts 1, the
last stage's head and MTP modules their share of activated weights, 3.6 blocks for nano, so nano splits
3 + 1 at PP=2 and 1 + 1 + 1 + 1 at PP=4). A Stage builds only its own layers, and names them as the
Transformer does ("layers.3.attn.w_dq.weight": an nn.ModuleDict keyed by the layer index), so the
stages' state dicts merged are the Transformer's and checkpoints need no renaming. The last stage needs
the token embeddings too: MTP module k combines h^{k-1}_i with Emb(t_{i+k}) (eq. 21). Under DualPipe
the end ranks hold the first stage of one direction and the last of the other, so, as in 3.2.3, the
embedding, the output head and MTP sit on one rank, and its two stages share one embedding Parameter.
Under 1F1B the last rank holds its own copy, tied: step() adds the two copies' gradients, and equal
optimizer steps keep the copies equal.

The executor. Pipeline(args, "dualpipe" | "1f1b", group) holds rank r's stages: stage r of direction 0
and, for DualPipe, stage PP-1-r of direction 1. step(inputs, targets, C, lam) runs one optimizer step's
C micro-batches (DualPipe: the first half enter as direction 0 at rank 0, the second half as
direction 1 at rank PP-1; only the end ranks read tokens and targets):
    the clock   ticks(): every step lasts one tick and starts as early as its inputs allow; at the end
                of each tick the neighbours exchange what it produced (activations forward along a
                direction, input gradients backward), both ends of a message in the same tick's
                dist.batch_isend_irecv, so no batch waits for one posted later (comm_plan)
    F           the stage's blocks; on the last stage the losses, main + lam * MTP + balance as
                Transformer.forward computes them; the sequence-wise balance loss of each MoE layer is
                computed, and backpropagated, on the stage that holds the layer
    B           backward of [stage output, its balance loss] with [received gradient, 1/C] (the loss
                with 1/C on the last stage), so the micro-batches' gradients sum to the mean loss's,
                as grad accumulation over C micro-batches gives; a B with a W later computes only the
                input gradient (backward_input) and queues the weights' part, which W pops, oldest first
    after       each stage's gradients and router loads summed over its two copies (ranks r and PP-1-r
                send each other theirs), so update_bias() sees the whole batch; the losses all-reduced
    evaluate    forward only, through direction 0 alone (stage r on rank r under either schedule): at
                tick t rank r runs micro-batch t - r and sends it on, C + PP - 1 ticks; the last rank's
                main losses (no MTP; no load counted under no_grad) all-reduced, the same on every rank
Expert parallelism inside the stages (PP x EP): comm.shard_experts(stage, grid) on each of
pipe.stages, grid.groups["pp"] the pipeline's group; the members of an ep group sit at one pipeline
position, so they run the same schedule in lockstep and their all-to-alls come in one order (the tests
log them); after step(), comm.reduce_gradients(nn.ModuleList(pipe.stages), grid) and update_bias(
pipe.moe_layers(), gamma, grid.sum_over_dp).
Simplified: with overlap=False an F&B pair runs as F then B; a step waits for each tick's messages
(the pipeline's sends are not overlapped with the next pair, as figure 4's PP lane would have them);
sent activations are kept, not freed; with args.recompute a deferred B computes the weights too (PyTorch
lets a selectively recomputed region backward once), so W is empty there.

How the overlapped F&B pair is written (3.2.1, figure 4). DeepSeek hides the all-to-alls of expert
parallelism behind computation by running the forward chunk of one micro-batch and the backward chunk of
another together: each MoE block is cut into attention, dispatch, MLP (the experts) and combine, and in
their published training profile (github.com/deepseek-ai/profile-data, train.json: a pair of chunks of
four MoE layers, EP64) one block of each runs as

    combine(B) attn(F) mlp(B) dispatch(F) dispatch(B) mlp(W) mlp(F) attn(B) attn(W) combine(F)

where B is a piece's backward for its inputs and W for its weights, and dispatch and combine run on a
communication stream beside the computation, so each all-to-all of one micro-batch moves while the other
computes. DeepSeek's public DualPipe leaves this step to the model (overlapped_forward_backward, an
example that runs F then B). Here it takes four small parts:
    pieces      Stage.pieces: the stage's forward as a Python generator that yields the kind of each
                piece before running it, so a driver can stop between any two. block_pieces cuts an MoE
                block into attn (MLA, the residual, the MoE's norm and router: MoE.route, the seam in
                moe.py), dispatch (the dispatcher's dispatch_async and its wait), mlp (routed and shared
                experts) and combine (the dispatcher's combine, both residual adds), a dense block into
                attn and mlp; the same calls MoE.forward and Block.forward make, so the same numbers.
    the tape    Tape.run hands each piece fresh leaves for its inputs (detach().requires_grad_()): that
                cuts autograd's graph at the piece, and the piece's backward is an ordinary backward of
                its own small graph, from its outputs' gradients to its leaves'. The tape sums the
                gradients a tensor gets from the pieces that read it and hands the sum to the piece
                that made it, pieces going backward in the reverse of their forward order. A split
                piece's B is backward_input and its W the rest: the zero-bubble split, piece by piece.
    the order   overlapped(forward, backward) runs rounds of PROFILE_ORDER. In each round each side runs,
                at the slots of their kinds, the pieces of its next unit, skipping the kinds it lacks:
                a dense block's round is attn(F) mlp(B) mlp(W) mlp(F) attn(B) attn(W); the embedding,
                the output head with the main loss, MTP's embedding, each MTP depth's head and loss and
                the total loss are units of one piece (an MTP depth's projection M_k opens its block's
                attention piece). So the i-th unit forward meets the i-th unit from the end backward;
                the longer of the two stages runs its last units alone. A lone F or B is a pair with an
                empty side.
    streams     Streams: on CUDA dispatch and combine run on a stream of their own; a tensor passed
                between the streams makes the reader wait for its maker's event, and record_stream keeps
                the caching allocator from handing its memory out while the reader may still use it.
                With NCCL the all-to-alls then overlap the other micro-batch's compute; gloo's
                collectives block the host (the same code runs, nothing overlaps); the CPU runs in order.
Without expert parallelism dispatch and combine are moe.LocalDispatcher's permutations, no all-to-all.
Pipeline(overlap=True) runs every F and B of DualPipe through the pieces and each pair of schedule()
through overlapped(); the B of a pair computes its W inside the pair (schedule() defers no paired B's
W), a lone B with a W later keeps its pieces' Ws for that step. Under recompute each piece backwards
whole and the W slots are empty. Left as in comm.py: each all-to-all's count exchange syncs the host
(DeepEP has no such sync), so a dispatch(F) waits on the host for its own attention piece; the split
B walks autograd's graph in Python, piece by piece (host time, hidden while the GPU has work queued).
"""

import contextlib
import copy
import functools
import math
import sys
import time
from collections import deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.autograd.graph import GradientEdge, get_gradient_edge

import model
from model import Block, MTPModule, balance_loss, cross_entropy, init_weights, output_losses, precompute_rope
from moe import MoE

KINDS = ("F", "B", "W")


def _check_sizes(num_ranks, num_chunks):
    if not isinstance(num_ranks, int) or num_ranks < 2 or num_ranks % 2:
        raise ValueError(f"num_ranks (PP) must be an even integer >= 2, got {num_ranks!r}")
    if not isinstance(num_chunks, int) or num_chunks % 2 or num_chunks < 2 * num_ranks:
        raise ValueError(f"num_chunks must be an even integer >= 2 * num_ranks = {2 * num_ranks}, "
                         f"got {num_chunks!r}")


def schedule(num_ranks, num_chunks) -> list[list[tuple]]:
    """DualPipe's steps for each of num_ranks (PP, even) ranks, num_chunks (C, even, >= 2 PP) micro-batches
    in all, C/2 in each direction. Returns one list of steps per rank (format: the module docstring)."""
    _check_sizes(num_ranks, num_chunks)
    return [_dualpipe_rank(rank, num_ranks, num_chunks) for rank in range(num_ranks)]


def _dualpipe_rank(rank, num_ranks, num_chunks):
    """One rank's steps, phase by phase as in DeepSeek's DualPipe.step(). The 0 and 1 in the phase names
    are the rank's own: 0 is the direction that enters at its end of the pipeline (direction 0 on the
    first half of the ranks, direction 1 on the second), 1 the other one."""
    half = num_ranks // 2
    h = min(rank, num_ranks - 1 - rank)             # how far the rank is from its end of the pipeline
    d0, d1 = (0, 1) if rank < half else (1, 0)
    is_middle = h == half - 1
    steps, next_f, next_b, deferred = [], [0, 0], [0, 0], deque()

    def F(d):                                       # each direction's chunks go forward in order
        next_f[d] += 1
        return ("F", d, next_f[d] - 1)

    def B(d, defer_w=False):                        # and backward in order
        next_b[d] += 1
        if defer_w:
            deferred.append((d, next_b[d] - 1))
        return ("B", d, next_b[d] - 1)

    def W():                                        # the oldest deferred weight gradient (a FIFO queue)
        return ("W", *deferred.popleft())

    def run(*actions):
        steps.append(actions)

    # Step 1: nF0. Only this rank's own direction has reached it; the nearer the end, the longer the
    # other direction takes to arrive.
    for _ in range(2 * (half - h - 1)):
        run(F(d0))
    # Step 2: nF0F1. Both directions' forwards, alternating, until the first B1 can start here.
    for _ in range(h + 1):
        run(F(d0))
        run(F(d1))
    # Step 3: nB1W1F1. Zero bubble: W follows its B at once; splitting them lets the input gradient go
    # to the next rank a W earlier.
    for _ in range(half - h - 1):
        run(B(d1, defer_w=True))
        run(W())
        run(F(d1))
    # Step 4 (main step): nF0B1F1B0, forward of one direction overlapped with backward of the other.
    for i in range(num_chunks // 2 - num_ranks + h + 1):
        if i == 0 and is_middle:
            # The two middle ranks feed each other: this F0 is the input of the other middle rank's
            # next pair, so DeepSeek runs it alone and sends it a B earlier than a pair would. In the
            # simulator that never costs when F&B = F + B + W and shortens the makespan for some B > F;
            # when a pair runs faster than its two parts in turn it costs up to F + B + W - F&B.
            run(F(d0))
            run(B(d1))
        else:
            run(F(d0), B(d1))
        run(F(d1), B(d0))
    # Step 5: nB1F1B0. The F0s are done; the last F1s still pair with B0s.
    for _ in range(half - h - 1):
        run(B(d1))
        run(F(d1), B(d0))
    # Step 6: nB1B0. The second half of these 2(h+1) backwards defer W, to fill the drain's bubbles.
    for i in range(h + 1):
        run(B(d1, defer_w=2 * i >= h + 1))
        run(B(d0, defer_w=2 * i + 1 >= h + 1))
    # Step 7: nWB0. A deferred W fills each wait for the gradient of one of the last B0s.
    for _ in range(half - h - 1):
        run(W())
        run(B(d0, defer_w=True))
    # Step 8: nW. The remaining deferred weight gradients.
    for _ in range(h + 1):
        run(W())
    return steps


def schedule_1f1b(num_ranks, num_chunks) -> list[list[tuple]]:
    """1F1B: every chunk in direction 0, each rank warms up with PP-1-rank forwards, then alternates one
    forward and one backward, then drains; every B computes its W too, nothing is overlapped."""
    if not isinstance(num_ranks, int) or num_ranks < 1:
        raise ValueError(f"num_ranks must be an integer >= 1, got {num_ranks!r}")
    if not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks must be an integer >= 1, got {num_chunks!r}")
    return [_1f1b_rank(rank, num_ranks, num_chunks) for rank in range(num_ranks)]


def _1f1b_rank(rank, num_ranks, num_chunks):
    warmup = min(num_ranks - 1 - rank, num_chunks)
    steps = [(("F", 0, c),) for c in range(warmup)]
    for c in range(num_chunks - warmup):
        steps += [(("F", 0, warmup + c),), (("B", 0, c),)]
    steps += [(("B", 0, c),) for c in range(num_chunks - warmup, num_chunks)]
    return steps


# -----------------------------------------------------------------------------
# The simulator

class Deadlock(RuntimeError):
    """Every rank with steps left waits on an op that can never finish."""


@dataclass
class Timeline:
    """simulate()'s answer. Ops are keyed (rank, kind, direction, chunk); both actions of a pair share
    their step's start and end."""
    start: dict
    end: dict
    busy: list          # per rank, the sum of its steps' durations
    makespan: float     # when the last step on any rank ends

    @property
    def idle(self):
        """Per rank, the time within the makespan that it runs nothing."""
        return [self.makespan - b for b in self.busy]

    @property
    def bubble(self):
        """The idle time of the rank with the least work, the bubble as table 2 counts it (see the module
        docstring): for 1F1B every rank's, for DualPipe the innermost ranks'."""
        return max(self.idle)


def label(action):
    kind, d, c = action
    return f"{d}{kind}{c}"


def _check_steps(steps):
    for rank, rank_steps in enumerate(steps):
        for step in rank_steps:
            if not 1 <= len(step) <= 2 or any(a[0] not in KINDS or a[1] not in (0, 1) for a in step):
                raise ValueError(f"rank {rank}: bad step {step!r}")
            if len(step) == 2 and sorted(a[0] for a in step) != ["B", "F"]:
                raise ValueError(f"rank {rank}: an overlapped pair is one F and one B, got {step!r}")


def _needs(rank, action, num_ranks):
    """What must have finished before `action` starts on `rank`, as (rank, kind, direction, chunk)."""
    kind, d, c = action
    stage = rank if d == 0 else num_ranks - 1 - rank
    ahead = 1 if d == 0 else -1                     # where the next stage of direction d is
    if kind == "F":
        return [] if stage == 0 else [(rank - ahead, "F", d, c)]
    if kind == "B":                                 # the last stage starts backward from its own loss
        own = [(rank, "F", d, c)]
        return own if stage == num_ranks - 1 else own + [(rank + ahead, "B", d, c)]
    return [(rank, "B", d, c)]


def _duration(step, times, deferred):
    """A B without a later W computes the weight gradient too; F&B is a pair whose B does (a pair that
    defers its W is charged F&B - W)."""
    if len(step) == 2:
        b = next(a for a in step if a[0] == "B")
        return times["F&B"] - (times["W"] if b[1:] in deferred else 0)
    kind, d, c = step[0]
    if kind == "B" and (d, c) not in deferred:
        return times["B"] + times["W"]
    return times[kind]


def simulate(steps, times, p2p=0.0) -> "Timeline":
    """Run `steps` (schedule()'s format) against the clock. times: {"F", "B", "W", "F&B"} durations, B
    the input-gradient backward alone (B + W for a B without a later W); "F&B" only if there are pairs.
    p2p: the latency of each send, added to every dependency between two ranks. Dependencies: F of
    (direction, chunk) needs the previous stage's F of it, B needs its own F and the next stage's B,
    W its own B; each rank runs its steps in order, a step as soon as it and all its needs are done.
    Returns a Timeline; raises Deadlock naming the waiting ops when no rank can go on."""
    _check_steps(steps)
    num_ranks = len(steps)
    deferred = [{a[1:] for step in rank_steps for a in step if a[0] == "W"} for rank_steps in steps]
    start, end = {}, {}
    free, busy, pos = [0.0] * num_ranks, [0.0] * num_ranks, [0] * num_ranks
    progress = True
    while progress:                                 # sweep until no rank can start its next step
        progress = False
        for r in range(num_ranks):
            while pos[r] < len(steps[r]):
                step = steps[r][pos[r]]
                needs = [n for a in step for n in _needs(r, a, num_ranks)]
                if any(n not in end for n in needs):
                    break
                t0 = max([free[r]] + [end[n] + (p2p if n[0] != r else 0.0) for n in needs])
                t1 = t0 + _duration(step, times, deferred[r])
                for a in step:
                    key = (r, *a)
                    if key in end:
                        raise ValueError(f"rank {r} runs {label(a)} twice")
                    start[key], end[key] = t0, t1
                busy[r] += t1 - t0
                free[r], pos[r], progress = t1, pos[r] + 1, True
    waiting = [_waiting(r, steps[r][pos[r]], num_ranks, end) for r in range(num_ranks) if pos[r] < len(steps[r])]
    if waiting:
        raise Deadlock("deadlock: " + "; ".join(waiting))
    return Timeline(start, end, busy, max(free, default=0.0))


def _waiting(rank, step, num_ranks, end):
    missing = [n for a in step for n in _needs(rank, a, num_ranks) if n not in end]
    names = ", ".join(f"{label(n[1:])} on rank {n[0]}" for n in missing)
    return f"rank {rank} waits at {'+'.join(label(a) for a in step)} for {names}"


def table2_bubble(pipeline, num_ranks, times):
    """The paper's table 2 bubble for "dualpipe" or "1f1b"; its B, the whole backward, is B + W here."""
    B = times["B"] + times["W"]
    if pipeline == "dualpipe":
        return (num_ranks // 2 - 1) * (times["F&B"] + B - 3 * times["W"])
    if pipeline == "1f1b":
        return (num_ranks - 1) * (times["F"] + B)
    raise ValueError(f"pipeline must be 'dualpipe' or '1f1b', got {pipeline!r}")


def format_timeline(steps, timeline, unit=1.0, width=4):
    """One row per rank, time left to right, `width` characters per `unit` of time: each step a cell
    from its start to its end, an overlapped pair as "0F3+1B1", idle time as dots."""
    def col(t):
        return round(t / unit * width)
    rows = []
    for r, rank_steps in enumerate(steps):
        row = ["."] * col(timeline.makespan)
        for step in rank_steps:
            a, b = col(timeline.start[(r, *step[0])]), col(timeline.end[(r, *step[0])])
            if b > a:                               # a zero-length step (W = 0) has no cell
                row[a:b] = "+".join(label(x) for x in step)[:b - a - 1].ljust(b - a - 1) + "|"
        rows.append(f"rank {r:<3}" + "".join(row))
    return "\n".join(rows)


# -----------------------------------------------------------------------------
# Stages: the Transformer cut into PP pieces of whole blocks

def stage_layers(args, num_stages):
    """Blocks per stage: contiguous, at least one each. A block costs 1; the last stage also runs the
    output head and the MTP modules, `tail` blocks' worth of activated weights (the head is vocab x dim,
    an MTP module a block, its projection M_k and the head once more: 3.6 blocks for nano, 4.3 for V3),
    so it takes the number of blocks that brings its cost nearest the average, at least one. The other
    stages share the rest evenly, the first ones taking the remainder (the first stage's embedding is
    a lookup, no GEMM). The costs count GEMM weights only: attention's T^2 part and the softmax over the
    vocabulary are left out."""
    L, S = args.n_layers, num_stages
    if not isinstance(S, int) or not 1 <= S <= L:
        raise ValueError(f"{S!r} pipeline stages need at least one block each, and n_layers={L}")
    if S == 1:
        return [L]
    n = model.count_params(args)
    block = (n["activated"] - n["output_head"]) / L
    tail = ((1 + args.n_mtp) * n["output_head"] + args.n_mtp * 2 * args.dim ** 2) / block + args.n_mtp
    last = min(max(1, math.floor((L + tail) / S - tail + 0.5)), L - (S - 1))
    q, r = divmod(L - last, S - 1)
    return [q + (i < r) for i in range(S - 1)] + [last]


class Stage(nn.Module):
    """Stage `index` of `num_stages` of model.Transformer: its own blocks only (memory shrinks with PP),
    and
        the first stage: the embedding
        the last stage:  the final norm, the output head, the MTP modules, and an embedding too, for the
                         MTP modules' shifted tokens (eq. 21 embeds t_{i+k})
    under the Transformer's parameter names ("layers.3.attn.w_dq.weight", "mtp.0.proj.weight"), so the
    stages' state dicts merged are the Transformer's. split: blocks per stage (stage_layers() by default).
    embed: an nn.Embedding to hold instead of a new one, how two stages on one rank share it (3.2.3)."""

    def __init__(self, args, index, num_stages, split=None, embed=None):
        super().__init__()
        split = list(split or stage_layers(args, num_stages))
        if len(split) != num_stages or sum(split) != args.n_layers or min(split) < 1:
            raise ValueError(f"split {split} must give each of {num_stages} stages at least one block, "
                             f"n_layers={args.n_layers} in all")
        if not 0 <= index < num_stages:
            raise ValueError(f"stage index {index} is not in 0..{num_stages - 1}")
        self.args, self.index = args, index
        self.first, self.last = index == 0, index == num_stages - 1
        if self.first or (self.last and args.n_mtp):
            self.embed = embed if embed is not None else nn.Embedding(args.vocab_size, args.dim)
        start = sum(split[:index])
        # keyed by the layer index, a ModuleDict names the parameters as the Transformer's ModuleList does
        self.layers = nn.ModuleDict({str(i): Block(i, args) for i in range(start, start + split[index])})
        if self.last:
            self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
            self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
            self.mtp = nn.ModuleList(MTPModule(args.n_layers + k, args) for k in range(args.n_mtp))
        cos, sin = precompute_rope(args)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def init_weights(self, seed=0):
        """model.init_weights: each tensor drawn from a generator seeded by its name, so every copy of a
        stage, on any rank, in any split, starts from the weights model.Transformer starts from."""
        init_weights(self, self.args, seed)

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, h, tokens=None, targets=None, lam=None):
        """h: (B, T, D), the hidden state entering this stage's first block (embed(tokens) on the first
        stage). Returns the hidden state leaving the stage and its parts: balance, the sequence-wise
        balance loss (eq. 17) summed over the MoE layers that ran here; on the last stage given targets
        (and tokens, for MTP) also main, mtp and loss = main + lam * mtp + balance, the lines of
        Transformer.forward (the tests hold the two equal)."""
        T = h.shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.args.max_seq_len}")
        cos, sin = self.cos[:T], self.sin[:T]
        x, blocks = h, list(self.layers.values())
        for layer in blocks:
            h = layer(h, cos, sin)
        parts = {}
        if self.last and targets is not None:
            emb = x if self.first else self.embed(tokens)  # (B, T, D); one stage: its input is the embedding
            parts["main"], parts["mtp"] = output_losses(self.head(self.norm(h)), h, emb, targets, self.head,
                                                        self.mtp, cos, sin)
            blocks += [module.block for module in self.mtp]
        parts["balance"] = balance_loss(blocks, h)
        if "main" in parts:
            lam = self.args.mtp_lambda if lam is None else lam
            parts["loss"] = parts["main"] + lam * parts["mtp"] + parts["balance"]
        return h, parts

    def pieces(self, tape, h=None, tokens=None, targets=None, lam=None):
        """forward() cut into pieces run through `tape`, for the overlapped F&B pair: a generator that
        yields the kind of each piece before it runs it (overlapped() steps it). h: the received hidden
        state, None on the first stage, which embeds the tokens in a piece of its own. The units, each
        a round of overlapped(): the embedding (attn), the blocks (block_pieces), then on the last stage
        the output head and main loss (mlp), the embedding for MTP (attn), per MTP depth its block (its
        projection M_k inside the attention piece) and its head and loss (mlp), and the total loss (mlp).
        Returns forward()'s (h, parts), and parts["balances"]: each MoE layer's balance loss, the
        roots of a stage before the last beside h (parts["balance"], their sum, is then detached)."""
        T = (tokens if self.first else h).shape[1]
        if T > self.args.max_seq_len:
            raise ValueError(f"sequence of {T} tokens exceeds max_seq_len={self.args.max_seq_len}")
        cos, sin = self.cos[:T], self.sin[:T]
        if self.first:
            yield "attn"
            h = tape.run("attn", self.embed, tokens)
        x, balances = h, []
        for layer in self.layers.values():
            h = yield from block_pieces(layer, tape, (h,), cos, sin, balances)
        if not (self.last and targets is not None):
            return h, dict(balance=sum((b.detach() for b in balances), h.new_zeros(())), balances=balances)
        yield "mlp"
        main = tape.run("mlp", lambda h: cross_entropy(self.head(self.norm(h)), targets), h)
        emb = x                     # one stage: its input is the embedding; else MTP embeds the tokens again
        if self.mtp and not self.first:
            yield "attn"
            emb = tape.run("attn", self.embed, tokens)
        mtp, h_k = [], h
        for k, module in enumerate(self.mtp, start=1):
            # depth k: position i sees h^{k-1}_i and token t_{i+k}, and predicts t_{i+k+1} (output_losses)
            h_k = yield from block_pieces(module.block, tape, (h_k, emb), cos[:T - k], sin[:T - k], balances,
                                          enter=_mtp_input(module, k))
            yield "mlp"
            mtp.append(tape.run("mlp", _mtp_loss(self.head, module, targets[:, k:]), h_k))
        yield "mlp"
        lam = self.args.mtp_lambda if lam is None else lam
        n = len(mtp)
        loss, mtp, balance = tape.run("mlp", lambda main, *rest: _total(main, rest[:n], rest[n:], lam),
                                      main, *mtp, *balances)
        return h, dict(main=main, mtp=mtp, balance=balance, loss=loss, balances=balances)


def _mtp_input(module, k):
    return lambda h_prev, emb: module.project(h_prev[:, :-1], emb[:, k:])  # (B, T-k, D)


def _mtp_loss(head, module, targets):
    return lambda h: cross_entropy(head(module.norm(h)), targets)


def _total(main, mtp, balances, lam):
    """loss = main + lam * mean_k mtp_k + balance, as output_losses and Stage.forward form it."""
    mtp = torch.stack(mtp).mean() if mtp else main.new_zeros(())
    balance = sum(balances, main.new_zeros(()))
    return main + lam * mtp + balance, mtp, balance


# -----------------------------------------------------------------------------
# B and W: the backward split in two (zero bubble, 3.2.1)

def backward_input(outputs, grads, inputs):
    """B: the gradients of sum_i <outputs_i, grads_i> with respect to `inputs` alone; and W, a function
    that later adds to the parameters' .grad what a full backward would have added.

    Autograd's graph under the outputs has two parts. The nodes with a path to an input carry the
    activation gradients, and torch.autograd.grad(..., inputs) runs only those; of a node that also
    feeds a parameter (an mm whose other operand is a weight, a norm's gain) it computes only the input
    side. A pre-hook on each such node keeps the gradient arriving there. W feeds it into the node
    again with the parameters below that node as `inputs`, and autograd then runs only the weight side:
    the dW GEMM and whatever lies between it and the parameter (a transpose, a cast). B keeps the graph
    (retain_graph) for W; it is freed once W and the outputs are dropped. Assumed: no parameter is used
    twice in series (reached again below another use, it would be counted twice); a stage uses each
    weight once, or in parallel branches (the head for the main and the MTP logits)."""
    pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad]
    input_nodes = {get_gradient_edge(x).node for x in inputs}
    on_path = _leading_to([o.grad_fn for o, _ in pairs], input_nodes)
    captured, handles, jobs = {}, [], []
    stop = on_path | input_nodes
    for node in on_path:
        weight_side = [m for m, _ in node.next_functions if m is not None and m not in stop]
        if weight_side:
            handles.append(node.register_prehook(functools.partial(captured.__setitem__, node)))
            jobs.append((node, _leaves(weight_side)))
    dx = ()
    if inputs:  # an input the outputs do not reach gets None (an overlap piece may not use all it is given)
        dx = torch.autograd.grad([o for o, _ in pairs], inputs, [g for _, g in pairs], retain_graph=True,
                                 allow_unused=True)
    for handle in handles:
        handle.remove()
    # Whole subgraphs of weights only: an output that does not depend on the inputs, and what lies
    # below an input that is not a leaf (the embedding under its output, on the first stage).
    whole = [(o, g) for o, g in pairs if o.grad_fn not in on_path]
    whole += [(x, g) for x, g in zip(inputs, dx) if x.grad_fn is not None and g is not None]

    def W():
        for node, params in jobs:
            edges = [(GradientEdge(node, i), g) for i, g in enumerate(captured.get(node, ())) if g is not None]
            if edges:
                torch.autograd.backward([e for e, _ in edges], [g for _, g in edges], inputs=params,
                                        retain_graph=True)
        for t, g in whole:
            torch.autograd.backward(t, g, inputs=_leaves([t.grad_fn]), retain_graph=True)
    return dx, W


def _leading_to(roots, targets):
    """The nodes under roots with a path to one of targets (targets excluded); iterative, for deep graphs."""
    leads, stack = {}, list(roots)
    while stack:
        node = stack[-1]
        if node in leads:
            stack.pop()
            continue
        children = [m for m, _ in node.next_functions if m is not None and m not in targets]
        pending = [m for m in children if m not in leads]
        if pending:
            stack += pending
            continue
        stack.pop()
        leads[node] = any(m in targets for m, _ in node.next_functions) or any(leads[m] for m in children)
    return {node for node, ok in leads.items() if ok}


def _leaves(nodes):
    """The tensors (parameters) whose gradient accumulators lie under nodes."""
    seen, stack, out = set(), list(nodes), []
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            if hasattr(node, "variable"):           # an AccumulateGrad node
                out.append(node.variable)
            stack += [m for m, _ in node.next_functions if m is not None]
    return out


# -----------------------------------------------------------------------------
# The overlapped F&B pair (3.2.1, figure 4): pieces, a tape that drives autograd piece by piece, two streams

COMM = ("dispatch", "combine")      # the pieces that move rows between the GPUs of an expert-parallel group
# One MoE block of each micro-batch, in the order of DeepSeek's training profile (github.com/deepseek-ai/
# profile-data, train.json: a pair of chunks of 4 MoE layers, EP64): F runs a forward piece, B a piece's
# backward for its inputs, W the same piece's backward for its weights.
PROFILE_ORDER = (("B", "combine"), ("F", "attn"), ("B", "mlp"), ("F", "dispatch"), ("B", "dispatch"),
                 ("W", "mlp"), ("F", "mlp"), ("B", "attn"), ("W", "attn"), ("F", "combine"))


def overlapped(forward, backward):
    """Run one micro-batch's forward pieces (a Forward) interleaved with another's backward pieces
    (a Backward), in rounds of PROFILE_ORDER: in each round each side runs, at the slots of its kinds,
    the pieces of its next unit (a block; the embedding, the output head, the loss), skipping the kinds
    the unit has not. A unit's forward pieces come in the order of the slots (attn, dispatch, mlp,
    combine) and its backward pieces in the reverse, so a round ends a unit on each side; a dense
    block's round is attn(F), mlp(B), mlp(W), mlp(F), attn(B), attn(W). Either side may be empty: a
    lone F or B runs its pieces in order."""
    while forward.next or backward.next:
        for side, kind in PROFILE_ORDER:
            if side == "F":
                forward.run(kind)
            elif side == "B":
                backward.run(kind)
            else:
                backward.weights(kind)


class Forward:
    """A stage's forward as a generator of pieces (Stage.pieces), run one piece at a time: `next` is the
    kind of the piece it runs next (None when done), `result` what the generator returned."""

    def __init__(self, pieces):
        self.pieces, self.result = pieces, None
        self.next = self._advance()

    def _advance(self):
        try:
            return next(self.pieces)
        except StopIteration as done:
            self.result = done.value
            return None

    def run(self, kind):
        if self.next == kind:
            self.next = self._advance()


class Backward:
    """A tape's pieces backward, the last first, one at a time. split: each compute piece's backward in
    two (backward_input), its W queued for weights(kind) or, all of them, for flush(); otherwise each
    piece's whole backward at once."""

    def __init__(self, tape, split):
        self.tape, self.split = tape, split
        self.todo = list(reversed(tape.pieces)) if tape else []
        self.queued = []                                # (kind, W) in the order of their Bs

    @property
    def next(self):
        return self.todo[0].kind if self.todo else None

    def run(self, kind):
        if self.next == kind:
            W = self.tape.backward(self.todo.pop(0), self.split)
            if W is not None:
                self.queued.append((kind, W))

    def weights(self, kind):
        for W in [W for k, W in self.queued if k == kind]:
            W()
        self.queued = [(k, W) for k, W in self.queued if k != kind]

    def flush(self):
        for _, W in self.queued:
            W()
        self.queued = []


class _Piece:
    """One piece's forward, kept for its backward: its stream, the event that ends it there, its inputs
    as (tensor given, the leaf the piece read instead), every tensor it made, and those that need a
    gradient (its outputs in autograd's sense)."""

    def __init__(self, kind, stream):
        self.kind, self.stream, self.event = kind, stream, None
        self.inputs, self.made, self.outputs = [], [], []


class Tape:
    """One micro-batch's forward through one stage, run piece by piece and kept for its backward piece
    by piece: the machinery behind overlapped().

    run(kind, fn, *args) cuts autograd's graph at the piece's inputs: every tensor argument that needs a
    gradient enters fn as a fresh leaf (detach().requires_grad_()), so the piece's graph stops there.
    backward(piece) then runs that graph alone, from the gradients of the piece's outputs to those of
    its leaves. The tape adds each input's gradients up over the pieces that read it (x after the
    attention feeds the router and the residual add of the combine piece) and hands the sum to the
    piece that made the tensor, whose backward comes later, pieces going backward in the reverse of
    their forward order. seed() puts in the gradients from outside: the loss's 1/C, the received
    activation gradient. The parameters' gradients accumulate in .grad as in any backward; with split
    they wait for the piece's W (backward_input). Non-tensor arguments (the dispatcher's handle) pass
    unchanged, and nothing that needs a gradient may reach fn other than through its arguments."""

    def __init__(self, streams):
        self.streams = streams
        self.pieces = []
        self.made_by = {}               # id(tensor) -> (stream, event) where and after which it is ready
        self.grads = {}                 # id(tensor) -> [(gradient, stream, event)], summed when needed

    def run(self, kind, fn, *args):
        piece = _Piece(kind, self.streams.of(kind))
        given = []
        for a in args:
            if isinstance(a, torch.Tensor):
                self.streams.handover(a, *self.made_by.get(id(a), (None, None)), piece.stream)
                if a.requires_grad:
                    leaf = a.detach().requires_grad_()
                    piece.inputs.append((a, leaf))
                    a = leaf
            given.append(a)
        with self.streams.on(piece.stream):
            out = fn(*given)
        piece.event = self.streams.mark(piece.stream)
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor):
                piece.made.append(t)
                self.made_by[id(t)] = (piece.stream, piece.event)
                if t.requires_grad:
                    piece.outputs.append(t)
        self.pieces.append(piece)
        return out

    def seed(self, t, grad):
        """A gradient for t from outside the tape (made on the compute stream)."""
        self.grads.setdefault(id(t), []).append((grad, None, None))

    def gradient(self, t, stream=None):
        """The sum of t's gradients so far, on `stream` (default: compute), or None; consumed."""
        stream = stream or self.streams.of("attn")
        parts = self.grads.pop(id(t), [])
        for g, made_on, event in parts:
            self.streams.handover(g, made_on, event, stream)
        with self.streams.on(stream):
            return functools.reduce(torch.add, (g for g, _, _ in parts)) if parts else None

    def output(self, t):
        """t, handed over to the compute stream: what leaves the tape (the stage's output, the losses)."""
        self.streams.handover(t, *self.made_by.get(id(t), (None, None)), self.streams.of("attn"))
        return t

    def backward(self, piece, split):
        """B of one piece: its inputs' gradients from its outputs', added to the tape; returns its W when
        split (compute pieces only: dispatch and combine have no weights), else None."""
        pairs = [(t, self.gradient(t, piece.stream)) for t in piece.outputs]
        pairs = [(t, g) for t, g in pairs if g is not None]
        leaves = [leaf for _, leaf in piece.inputs]
        W = None
        with self.streams.on(piece.stream):
            if not pairs:
                dx = [None] * len(leaves)
            elif split and piece.kind not in COMM:
                dx, W = backward_input([t for t, _ in pairs], [g for _, g in pairs], leaves)
            else:
                torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
                dx = [leaf.grad for leaf in leaves]
        event = self.streams.mark(piece.stream)
        for (given, _), g in zip(piece.inputs, dx):
            if g is not None:
                self.grads.setdefault(id(given), []).append((g, piece.stream, event))
        for t in piece.made:
            self.made_by.pop(id(t), None)
        piece.inputs = piece.made = piece.outputs = None     # the graph lives on in W only
        return W


class Streams:
    """Where the pieces run (figure 4: computation and communication side by side). On CUDA the compute
    pieces run on the current stream and dispatch and combine on a stream of their own, so one
    micro-batch's all-to-all moves while the other micro-batch computes (NCCL enqueues its kernels and
    returns; under gloo the collectives block the host, so nothing overlaps, but the same streams and
    events run). A tensor made on one stream and read on the other: the reader waits for the event
    that ended its maker, and record_stream tells the caching allocator that the reader uses it, so
    its memory is not handed out again while the reader may still be reading. On the CPU everything
    runs in order on the host and this does nothing."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.comm = torch.cuda.Stream(device) if self.cuda else None

    def of(self, kind):
        if not self.cuda:
            return None
        return self.comm if kind in COMM else torch.cuda.current_stream(self.device)

    def on(self, stream):
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def mark(self, stream):
        return stream.record_event() if stream is not None else None

    def handover(self, t, made_on, event, stream):
        """t (made on made_on, None: the compute stream, ready after event, None: now) is read on stream."""
        if stream is None:
            return
        made_on = made_on or self.of("attn")
        if made_on == stream:
            return
        if event is None:
            stream.wait_stream(made_on)
        else:
            stream.wait_event(event)
        t.record_stream(stream)


def block_pieces(block, tape, inputs, cos, sin, balances, enter=None):
    """model.Block.forward as pieces through `tape`, a generator as Stage.pieces. An MoE block:
        attn      x + MLA(x), then the MoE's norm and router (MoE.route): h, idx, g, the balance loss
        dispatch  h's rows to their experts (the all-to-all under expert parallelism)
        mlp       the routed experts on the rows that arrived, and the shared experts on h
        combine   the rows back, gated (eq. 12's sum), plus the shared experts and the residual x
    A dense block: attn and mlp (x + FFN(x)). enter: makes the block's input from `inputs` inside the
    attention piece (an MTP module's projection M_k); without it inputs is (x,). The balance loss of
    an MoE block is appended to balances."""
    enter = enter or (lambda x: x)
    moe = block.ffn if isinstance(block.ffn, MoE) else None
    yield "attn"
    if moe is None:
        x = tape.run("attn", lambda *xs: _attention(block, enter(*xs), cos, sin), *inputs)
        yield "mlp"
        return tape.run("mlp", lambda x: x + block.ffn(x), x)

    def attention_route(*xs):
        x = _attention(block, enter(*xs), cos, sin)
        h, idx, g = moe.route(x.view(-1, x.shape[-1]), x.shape[0])  # (N, D), (N, K), (N, K)
        return x, h, idx, g, moe.balance_loss

    def dispatch(h, idx, g):            # the wait too: with NCCL it only orders the streams
        xs, counts, handle = moe.dispatcher.dispatch_async(h, idx, g)()
        return xs, counts, getattr(handle, "g_rows", None), handle

    def experts(xs, counts, x, h, *x_q):
        return moe.experts(xs, counts, x_q or None), moe.shared_experts(x.view(-1, x.shape[-1]), h)

    def combine(ys, shared, x, g, g_rows):  # MoE.forward's last lines, then Block.forward's residual
        y = moe.dispatcher.combine(ys, _gated(handle, g, g_rows))
        return x + (y + shared).view_as(x)
    x, h, idx, g, balance = tape.run("attn", attention_route, *inputs)
    balances.append(balance)
    yield "dispatch"
    xs, counts, g_rows, handle = tape.run("dispatch", dispatch, h, idx, g)
    yield "mlp"
    ys, shared = tape.run("mlp", experts, xs, counts, x, h, *(handle.x_q or ()))
    yield "combine"
    return tape.run("combine", combine, ys, shared, x, g, g_rows)


def _attention(block, x, cos, sin):
    return x + block.attn(x, cos, sin)


def _gated(handle, g, g_rows):
    """The dispatch's handle with the combine piece's own leaves for the gates it applies (g on the token
    side, g_rows on the experts' side, hierarchical): their gradients then come back through this piece."""
    handle = copy.copy(handle)
    handle.g = g
    if g_rows is not None:
        handle.g_rows = g_rows
    return handle


# -----------------------------------------------------------------------------
# The executor: a clock, the messages of each tick, and the steps run with real stages

def ticks(steps):
    """The executor's clock: rank r runs its step k at tick ticks(steps)[r][k], one tick per step, as
    early as its previous step and every input from another rank (produced at an earlier tick) allow."""
    num_ranks = len(steps)
    at, tick_of, pos, free = [[] for _ in steps], {}, [0] * num_ranks, [0] * num_ranks
    progress = True
    while progress:
        progress = False
        for r in range(num_ranks):
            while pos[r] < len(steps[r]):
                needs = [n for a in steps[r][pos[r]] for n in _needs(r, a, num_ranks)]
                if any(n not in tick_of for n in needs):
                    break
                t = max([free[r]] + [tick_of[n] + 1 for n in needs])
                tick_of.update({(r, *a): t for a in steps[r][pos[r]]})
                at[r].append(t)
                free[r], pos[r], progress = t + 1, pos[r] + 1, True
    if any(pos[r] < len(steps[r]) for r in range(num_ranks)):
        raise Deadlock("deadlock: " + "; ".join(_waiting(r, steps[r][pos[r]], num_ranks, tick_of)
                                                for r in range(num_ranks) if pos[r] < len(steps[r])))
    return at


def _sends(rank, action, num_ranks):
    """Where an action's output goes, [(rank, message)]: an F's activation to the next stage of its
    direction, a B's input gradient to the previous one. A message is named by the action making it."""
    kind, d, c = action
    stage = rank if d == 0 else num_ranks - 1 - rank
    ahead = 1 if d == 0 else -1
    if kind == "F" and stage < num_ranks - 1:
        return [(rank + ahead, action)]
    if kind == "B" and stage > 0:
        return [(rank - ahead, action)]
    return []


def comm_plan(steps, rank):
    """What `rank` does at each tick of ticks(steps): [step or None, sends, receives], the last two lists
    of (peer, message). At the end of every tick each rank sends what its step made for a neighbour and
    receives what the neighbours' steps made for it, all in one batch_isend_irecv. Both ends of a message
    post it in the same tick's batch, so every batch can complete once the ranks reach that tick (no
    deadlock, by induction over the ticks), and a pair's messages are posted in one order on both sides
    (point-to-point pairs sends and receives in order; NCCL has no tags)."""
    num_ranks, at = len(steps), ticks(steps)
    plan = [[None, [], []] for _ in range(1 + max(t for rank_ticks in at for t in rank_ticks))]
    for r, rank_steps in enumerate(steps):
        for step, t in zip(rank_steps, at[r]):
            if r == rank:
                plan[t][0] = step
            for peer, msg in (m for a in step for m in _sends(r, a, num_ranks)):
                if r == rank:
                    plan[t][1].append((peer, msg))
                elif peer == rank:
                    plan[t][2].append((r, msg))
    return plan


class Pipeline:
    """One rank's part of the pipeline-parallel model, and the executor that runs `schedule` over it.

    schedule="dualpipe": the rank holds stage r of direction 0 and stage PP-1-r of direction 1 (see
    schedule()); on the end ranks these are the first and the last stage, which share one embedding
    Parameter there (3.2.3: embedding, output head and MTP on one rank). "1f1b": stage r alone; its last
    stage keeps its own copy of the embedding for MTP, tied to the first stage's: step() sums the two
    copies' gradients, so identical optimizer steps keep the weights equal.
    group: the pipeline's process group (default: every rank), group rank r holding stage r; with expert
    parallelism grid.groups["pp"], and comm.shard_experts(stage, grid) on each of stages (module docstring).
    split: blocks per stage (stage_layers() by default). Weights: init_weights(seed) per parameter name,
    or load_state_dict() of a Transformer state dict. No optimizer here; see step() for what it leaves.
    overlap=True (DualPipe only): every F and B runs through the pieces, and each F&B pair of the
    schedule as one overlapped pair (overlapped(), figure 4); False: a pair runs as F then B. The two
    give the same gradients, up to the order of float sums.
    """

    def __init__(self, args, schedule="dualpipe", group=None, device="cpu", dtype=None, split=None, seed=0,
                 overlap=False):
        if schedule not in ("dualpipe", "1f1b"):
            raise ValueError(f"schedule must be 'dualpipe' or '1f1b', got {schedule!r}")
        if overlap and schedule != "dualpipe":
            raise ValueError("overlap=True needs schedule='dualpipe': 1F1B has no F&B pairs to overlap")
        self.args, self.dualpipe, self.group, self.overlap = args, schedule == "dualpipe", group, overlap
        self.device = torch.device(device)
        distributed = dist.is_initialized()
        self.rank = dist.get_rank(group) if distributed else 0
        self.num_ranks = dist.get_world_size(group) if distributed else 1
        self.backend = dist.get_backend(group) if distributed else None
        r, pp = self.rank, self.num_ranks
        if self.dualpipe:
            _check_sizes(pp, 2 * pp)
        indices = [r, pp - 1 - r] if self.dualpipe else [r]
        first = Stage(args, indices[0], pp, split)
        self.stages = [first] + [Stage(args, i, pp, split, getattr(first, "embed", None)) for i in indices[1:]]
        self.init_weights(seed)
        for stage in self.stages:
            stage.to(self.device, dtype)
        self.dtype = next(first.parameters()).dtype     # of the hidden states and their gradients
        self.ranks = dist.get_process_group_ranks(group or dist.group.WORLD) if distributed else [0]
        self._owned = {k for k in first.state_dict() if first.first or not k.startswith("embed.")}
        self.plans = {}                     # num_chunks -> (this rank's comm_plan, its deferred Bs)
        self.streams = Streams(self.device)  # overlap: the pieces' compute and communication streams
        # timed=True: step() records in times (actions, start, end) for each action, an overlapped pair as
        # one entry of its two actions, and ("step", start, end)
        self.timed, self.times = False, []

    # -- the rank's parameters, under the Transformer's names

    def named_parameters(self):
        """(Transformer name, parameter) of this rank's stages in stage order, a shared one once."""
        out = {}
        for stage in sorted(self.stages, key=lambda s: s.index):
            for name, p in stage.named_parameters():
                out.setdefault(name, p)
        return iter(out.items())

    def parameters(self):
        return (p for _, p in self.named_parameters())

    def moe_layers(self):
        return [m for stage in sorted(self.stages, key=lambda s: s.index) for m in stage.moe_layers()]

    def state_dict(self, owned=False):
        """This rank's entries of the Transformer's state dict (the ranks' dicts merged are the whole
        Transformer's, every copy of an entry equal); owned=True: only those this rank owns (owns())."""
        return {k: v for stage in self.stages for k, v in stage.state_dict().items() if not owned or self.owns(k)}

    def load_state_dict(self, state_dict):
        """Each stage takes its own entries of a Transformer state dict; a missing one is an error."""
        for stage in self.stages:
            stage.load_state_dict({k: state_dict[k] for k in stage.state_dict() if k in state_dict}, strict=True)

    def init_weights(self, seed=0):
        for stage in self.stages:
            stage.init_weights(seed)

    @property
    def needs_data(self):
        """Whether step() reads the tokens and targets here: on the ranks holding a first or last stage."""
        return any(s.first or s.last for s in self.stages)

    def owns(self, name):
        """Whether this rank owns Transformer entry `name`, each owned by one rank of the pipeline (for
        checkpoints written once, and comm.grad_norm's gradient norm): rank r owns its stage r (direction
        0), the embedding only where that stage is the first."""
        return name in self._owned

    # -- one optimizer step's forward and backward

    def step(self, inputs, targets=None, num_chunks=None, lam=None):
        """Forward and backward of one optimizer step's batch, in num_chunks micro-batches run by the
        schedule. inputs, targets: (num_chunks * b, T) token ids, or lists of num_chunks (b, T)
        micro-batches; read only where needs_data (the end ranks); the other ranks pass anything with
        the inputs' shape (the batch itself, or just the torch.Size), targets None. DualPipe feeds
        micro-batches 0 .. C/2-1 to direction 0 and C/2 .. C-1 to direction 1; 1F1B all to direction 0.

        Leaves in .grad, on every copy of every parameter, the gradient of the mean over micro-batches
        of loss = main + lam * mtp + balance, what one process accumulating the same micro-batches
        computes (train.py's loss / grad_accum), the copies' gradients summed; and in each MoE layer's
        `load` the whole batch's counts (copies summed), so update_bias(pipeline.moe_layers(), gamma,
        dp_all_reduce) follows as with one process. Every .grad must be None before (zero_grad(
        set_to_none=True)): the copies' sum would count an earlier gradient twice. Returns loss, main,
        mtp and balance averaged over the micro-batches, as train.py logs them, the same on every rank."""
        micro_x, micro_y, shape = self._micro_batches(inputs, targets, num_chunks)
        C = len(micro_x)
        if any(p.grad is not None for p in self.parameters()):
            raise RuntimeError("step() needs every .grad None (optimizer.zero_grad(set_to_none=True)): it sums "
                               "the stage copies' gradients, and would count an earlier gradient twice")
        plan, deferred = self._plan(C)
        run = _Run(micro_x, micro_y, C, self.args.mtp_lambda if lam is None else lam, deferred, self.device)
        message = (*shape, self.args.dim)     # every message: an activation or its gradient, (b, T, D)
        t_start = self._clock()
        for step, sends, receives in plan:
            for actions in self._together(step):
                t0 = self._clock()
                if len(actions) == 2:
                    self._FB(run, *actions)
                else:
                    getattr(self, "_" + actions[0][0])(run, *actions[0][1:])
                if self.timed:
                    self.times.append((actions, t0, self._clock()))
            if sends or receives:
                got = self._p2p([(self._outgoing(run, msg, message), peer) for peer, msg in sends],
                                [(peer, message, self.dtype) for peer, _ in receives])
                run.inbox.update(zip((msg for _, msg in receives), got))
        if self.timed:
            self.times.append(("step", t_start, self._clock()))
        assert not (run.saved or run.weight_grads or run.made or run.inbox), "the schedule left work undone"
        self._sum_copies()
        sums = run.sums / C
        if self.num_ranks > 1:
            dist.all_reduce(sums, group=self.group)
        main, mtp, balance = sums.unbind()
        return dict(loss=main + run.lam * mtp + balance, main=main, mtp=mtp, balance=balance)

    @torch.no_grad()
    def evaluate(self, inputs, targets=None, num_chunks=None):
        """The mean over num_chunks micro-batches of the main loss (eq. 25's L_Main, no MTP), forward only,
        what model.Transformer gives for each micro-batch averaged; the same on every rank. inputs,
        targets as for step(). Every micro-batch goes through direction 0 (stage r on rank r, under
        either schedule): at tick t rank r runs micro-batch t - r and passes it on, PP - 1 + C ticks,
        the bubble of a forward-only pipeline, which an evaluation can afford. Under no_grad the MoE
        layers count no load; the stages' current parameters are used (an EMA swapped in, say)."""
        micro_x, micro_y, shape = self._micro_batches(inputs, targets, num_chunks)
        C, stage, r = len(micro_x), self.stages[0], self.rank
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        received = None
        for t in range(C + self.num_ranks - 1):
            out = None
            if 0 <= t - r < C:                          # this rank's micro-batch of the tick
                out, _ = stage(stage.embed(micro_x[t - r]) if stage.first else received)
                if stage.last:
                    total += cross_entropy(stage.head(stage.norm(out)), micro_y[t - r]).double()
            sends = [(out, r + 1)] if out is not None and not stage.last else []
            receives = [(r - 1, (*shape, self.args.dim), self.dtype)] if r > 0 and 0 <= t - (r - 1) < C else []
            if sends or receives:
                received = (self._p2p(sends, receives) or [None])[0]
        if self.num_ranks > 1:
            dist.all_reduce(total, group=self.group)    # the last rank's sum, zeros elsewhere
        return total / C

    def _micro_batches(self, inputs, targets, num_chunks):
        """Micro-batch lists of inputs and targets (None where not read) and the micro-batch shape (b, T)."""
        if isinstance(inputs, list):
            num_chunks = len(inputs)
        if not isinstance(num_chunks, int) or num_chunks < 1:
            raise ValueError(f"num_chunks must be a positive integer (or inputs a list), got {num_chunks!r}")
        if isinstance(inputs, torch.Size):
            if self.needs_data:
                raise ValueError("this rank holds a first or last stage: step() needs the tokens, not a shape")
            if len(inputs) != 2 or inputs[0] % num_chunks:
                raise ValueError(f"a batch of shape {tuple(inputs)} does not split into {num_chunks} micro-batches")
            return [None] * num_chunks, [None] * num_chunks, (inputs[0] // num_chunks, inputs[1])
        xs = inputs if isinstance(inputs, list) else list(inputs.tensor_split(num_chunks))
        if len({x.shape for x in xs}) != 1 or xs[0].dim() != 2 or xs[0].numel() == 0:
            raise ValueError(f"the batch must split into {num_chunks} micro-batches (b, T) of one shape, got "
                             f"{[tuple(x.shape) for x in xs]}")
        shape, last = tuple(xs[0].shape), any(s.last for s in self.stages)
        if not self.needs_data:
            return [None] * num_chunks, [None] * num_chunks, shape
        if last and targets is None:
            raise ValueError("this rank holds the last stage: step() needs the targets")
        ys = [None] * num_chunks
        if last:
            ys = targets if isinstance(targets, list) else list(targets.tensor_split(num_chunks))
        return [x.to(self.device) for x in xs], [y if y is None else y.to(self.device) for y in ys], shape

    def _plan(self, C):
        if C not in self.plans:
            steps = (schedule if self.dualpipe else schedule_1f1b)(self.num_ranks, C)
            self.plans[C] = comm_plan(steps, self.rank), {a[1:] for s in steps[self.rank] for a in s if a[0] == "W"}
        return self.plans[C]

    def _together(self, step):
        """What of a step runs at once: an overlapped pair as one (_FB), else each action alone (a pair as
        F then B)."""
        if self.overlap and step and len(step) == 2:
            return [step]
        return [(action,) for action in step or ()]

    def _micro(self, run, d, c):
        """The micro-batch index of chunk c of direction d."""
        return c + d * run.C // 2 if self.dualpipe else c

    def _F(self, run, d, c):
        if self.overlap:                    # every chunk through the pieces, so that any B can pair
            return self._FB(run, ("F", d, c), None)
        stage, m = self.stages[d], self._micro(run, d, c)
        h = stage.embed(run.x[m]) if stage.first else run.inbox.pop(("F", d, c)).requires_grad_()
        out, parts = stage(h, run.x[m], run.y[m], run.lam)
        if stage.last:
            roots = [parts["loss"]]
            run.sums[0] += parts["main"].detach()
            run.sums[1] += parts["mtp"].detach()
        else:
            roots = [out, parts["balance"]]  # the balance loss of this stage's MoE layers backward here
            run.made[("F", d, c)] = out.detach()
        run.sums[2] += parts["balance"].detach()
        run.saved[(d, c)] = (h, roots)

    def _B(self, run, d, c):
        if self.overlap:
            return self._FB(run, None, ("B", d, c))
        stage = self.stages[d]
        h, roots = run.saved.pop((d, c))
        # 1/C on the loss (and on the balance loss of a stage before the last): the mean over micro-batches
        if stage.last:
            grads = [torch.full_like(roots[0], 1 / run.C)]
        else:
            grads = [run.inbox.pop(("B", d, c)), torch.full_like(roots[1], 1 / run.C)]
        pairs = [(t, g) for t, g in zip(roots, grads) if t.requires_grad]
        # Zero bubble: the input gradient now, the weights' at this chunk's W. Not under recompute: PyTorch
        # lets a selectively checkpointed region backward once, and the split needs two passes, so B
        # computes the weights' gradients too and the W finds nothing left to do.
        if (d, c) in run.deferred and not self.args.recompute:
            (dx,), weight_grad = backward_input([t for t, _ in pairs], [g for _, g in pairs], [h])
        else:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
            dx = None if stage.first else h.grad  # h: the received activation, a leaf, past the first stage
            weight_grad = lambda: None  # noqa: E731
        if (d, c) in run.deferred:
            run.weight_grads.append(((d, c), weight_grad))
        if not stage.first:
            run.made[("B", d, c)] = dx

    def _FB(self, run, f=None, b=None):
        """overlap=True: the forward of chunk f and the backward of chunk b, each (kind, direction, chunk)
        or None, through their pieces, interleaved in the profile's order (overlapped()). A paired B
        computes its weights' gradients inside the pair (W after each piece's B); a lone B defers them
        when a W of its chunk comes later (zero bubble), else runs each piece's whole backward."""
        forward = self._forward_pieces(run, *f[1:]) if f else Forward(iter(()))
        backward = self._backward_pieces(run, *b[1:], paired=f is not None) if b else Backward(None, False)
        overlapped(forward, backward)
        if f:
            self._forwarded(run, *f[1:], forward.result)
        if b:
            self._backwarded(run, *b[1:], backward)

    def _forward_pieces(self, run, d, c):
        stage, m = self.stages[d], self._micro(run, d, c)
        h = None if stage.first else run.inbox.pop(("F", d, c)).requires_grad_()
        tape = Tape(self.streams)
        run.saved[(d, c)] = (h, tape)
        return Forward(stage.pieces(tape, h, run.x[m], run.y[m], run.lam))

    def _forwarded(self, run, d, c, result):
        """What an F through the pieces leaves: the roots of its B (as _F), the losses summed, the output."""
        stage, (h, tape) = self.stages[d], run.saved[(d, c)]
        out, parts = result
        if stage.last:
            roots = [tape.output(parts["loss"])]
            run.sums[0] += tape.output(parts["main"]).detach()
            run.sums[1] += tape.output(parts["mtp"]).detach()
        else:
            roots = [tape.output(out), *parts["balances"]]
            run.made[("F", d, c)] = out.detach()
        run.sums[2] += tape.output(parts["balance"]).detach()
        run.saved[(d, c)] = (h, tape, roots)

    def _backward_pieces(self, run, d, c, paired):
        stage = self.stages[d]
        h, tape, roots = run.saved[(d, c)]
        if stage.last:                      # 1/C: the mean over micro-batches, as in _B
            grads = [torch.full_like(roots[0], 1 / run.C)]
        else:
            grads = [run.inbox.pop(("B", d, c))] + [torch.full_like(b, 1 / run.C) for b in roots[1:]]
        for t, g in zip(roots, grads):
            tape.seed(t, g)
        # Under recompute every piece backwards whole (a checkpointed region backwards once, see _B)
        split = (paired or (d, c) in run.deferred) and not self.args.recompute
        return Backward(tape, split)

    def _backwarded(self, run, d, c, backward):
        h, tape, _ = run.saved.pop((d, c))
        assert not backward.todo and not tape.grads.keys() - ({id(h)} if h is not None else set()), \
            "a piece's gradient was left unused"
        if (d, c) in run.deferred:
            run.weight_grads.append(((d, c), backward.flush))
        else:
            backward.flush()                # nothing queued: paired Ws ran in the pair, unsplit Bs have none
        if not self.stages[d].first:
            run.made[("B", d, c)] = tape.gradient(h)

    def _outgoing(self, run, msg, shape):
        t = run.made.pop(msg)
        if t.shape != shape or t.dtype != self.dtype:   # the receiver has allocated shape and dtype
            raise RuntimeError(f"{label(msg)} sends a {tuple(t.shape)} {t.dtype} tensor, the receiver expects "
                               f"{shape} {self.dtype}")
        return t

    def _W(self, run, d, c):
        chunk, weight_grad = run.weight_grads.popleft()  # the oldest deferred B, as the simulator has it
        assert chunk == (d, c), f"W of {d},{c} finds {chunk} first in the queue"
        weight_grad()

    def _p2p(self, sends, receives):
        """One batch_isend_irecv of sends [(tensor, peer)] and receives [(peer, shape, dtype)], peers as
        ranks of the pipeline's group; waits for all of them and returns the received tensors."""
        # gloo's point-to-point takes no CUDA tensors ("Bad address", GPU.md): stage them through the CPU,
        # which lets the CUDA path run with several ranks on one GPU
        via_cpu = self.backend == "gloo" and self.device.type == "cuda"
        ops, bufs = [], []
        for t, r in sends:
            t = t.detach().cpu() if via_cpu else t.detach().contiguous()
            ops.append(dist.P2POp(dist.isend, t, self.ranks[r], self.group))
        for r, shape, dtype in receives:
            bufs.append(torch.empty(shape, dtype=dtype, device="cpu" if via_cpu else self.device))
            ops.append(dist.P2POp(dist.irecv, bufs[-1], self.ranks[r], self.group))
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        return [b.to(self.device) for b in bufs]

    def _sum_copies(self):
        """Each parameter's gradient and each MoE layer's load summed over the copies of its stage.
        DualPipe: ranks r and PP-1-r hold the same two stages, so each adds the other's; 1F1B: only the
        embedding has two copies, on the first rank and, for MTP, the last."""
        peer = self.num_ranks - 1 - self.rank
        if self.dualpipe:
            params, loads = list(self.parameters()), [m.load for m in self.moe_layers()]
        elif self.num_ranks > 1 and self.args.n_mtp and self.rank in (0, self.num_ranks - 1):
            params, loads = [self.stages[0].embed.weight], []
        else:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        tensors = [p.grad for p in params] + loads
        for dtype in sorted({t.dtype for t in tensors}, key=str):   # one message per dtype
            same = [t for t in tensors if t.dtype == dtype]
            flat = torch.cat([t.reshape(-1) for t in same])
            (other,) = self._p2p([(flat, peer)], [(peer, flat.shape, dtype)])
            flat += other                                      # a + b here, b + a there: equal bits
            for t, new in zip(same, flat.split([t.numel() for t in same])):
                t.copy_(new.view_as(t))

    def _clock(self):
        if self.timed and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class _Run:
    """What one step() carries between its actions."""

    def __init__(self, x, y, C, lam, deferred, device):
        self.x, self.y, self.C, self.lam, self.deferred = x, y, C, lam, deferred
        self.inbox, self.made, self.saved = {}, {}, {}   # received, to send, kept for B: by message / chunk
        self.weight_grads = deque()                       # ((direction, chunk), W) of the deferred Bs
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # main, mtp, balance, summed here


def _parse(argv):
    if len(argv) not in (2, 6):
        raise ValueError("usage: python dualpipe.py PP num_chunks [F B W F&B]")
    try:
        num_ranks, num_chunks = int(argv[0]), int(argv[1])
        values = [float(x) for x in argv[2:]] or [1.0, 1.0, 1.0, 3.0]
    except ValueError:
        raise ValueError(f"PP and num_chunks must be integers and the times numbers, got {' '.join(argv)}") from None
    if min(values) < 0:
        raise ValueError(f"times must be >= 0, got {' '.join(argv[2:])}")
    return num_ranks, num_chunks, dict(zip(("F", "B", "W", "F&B"), values))


def main(argv):
    """python dualpipe.py PP num_chunks [F B W F&B]: both timelines and their bubbles. The default times,
    F = B = W = 1 and F&B = 3, are a pair that only hides communication, its compute adding up."""
    try:
        num_ranks, num_chunks, times = _parse(argv)
        pipelines = {"dualpipe": schedule(num_ranks, num_chunks), "1f1b": schedule_1f1b(num_ranks, num_chunks)}
    except ValueError as e:
        print(f"dualpipe.py: {e}", file=sys.stderr)
        return 2
    unit = min(t for t in times.values() if t > 0)
    print("times: " + " ".join(f"{k}={v:g}" for k, v in times.items()) + f" (full backward B+W = "
          f"{times['B'] + times['W']:g}); one cell per step, '.' is idle, 4 characters per {unit:g} of time")
    for name, steps in pipelines.items():
        timeline = simulate(steps, times)
        print(f"\n{name}, PP={num_ranks}, {num_chunks} micro-batches:")
        print(format_timeline(steps, timeline, unit))
        print(f"makespan {timeline.makespan:g}, idle per rank " + " ".join(f"{t:g}" for t in timeline.idle)
              + f", bubble {timeline.bubble:g}, table 2: {table2_bubble(name, num_ranks, times):g}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

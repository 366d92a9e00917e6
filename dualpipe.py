"""
DualPipe, DeepSeek-V3's bidirectional pipeline schedule (technical report arXiv 2412.19437, section 3.2.1,
figure 5, table 2), as data, with a simulator and 1F1B beside it as the baseline.

    schedule(PP, C)         DualPipe: each rank's ordered steps, in the eight phases of DeepSeek's
                            public DualPipe.step() (github.com/deepseek-ai/DualPipe), special cases included
    schedule_1f1b(PP, C)    1F1B (one direction, full backward, nothing overlapped), same format
    simulate(steps, times)  start and end of every op, each rank's busy and idle time, makespan, bubble
    table2_bubble(...)      the paper's table 2 bubbles, to hold the simulator against
    python dualpipe.py 4 10 prints both timelines and their bubbles

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

Later phases of the issue (not here yet; see the marked section at the end): the stages, the executor
that runs these steps with real modules, and the overlapped F&B step itself.
"""

import sys
from collections import deque
from dataclasses import dataclass

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
# Later phases of issue 10, not written yet:
#   stages    the Transformer cut into PP stages of whole blocks, each building only its own layers and
#             keeping the unsplit parameter names; the end ranks hold embedding, head and MTP (3.2.3).
#   executor  runs schedule()'s steps with real modules: the two stage copies per rank, batched
#             dist.batch_isend_irecv sends and receives, a store of weight-gradient closures that W pops,
#             losses where each direction ends, each stage's gradients summed over its two copies.
#   overlap   the F&B pair itself: MoE blocks cut into attention / dispatch / experts / combine, one
#             micro-batch's backward interleaved with the other's forward, communication on its own stream.


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

"""
Checkpoints: one format for every parallel layout, written without gathering the model on one rank,
read by one process or by any other layout.

    out/ckpt.pt                      the step, settings, data position, RNG, ... and rank 0's tensors,
                                     and the names of the other ranks' part files
    out/ckpt.pt.step400.part3        rank 3's tensors (say, its routed experts)

Every tensor is stored under its name in the single-process model (`Transformer.state_dict()`), in
four kinds: the weights ("model"), their moving average ("ema") and AdamW's two moments. A tensor that
is split over ranks (expert parallelism splits dim 0 of the stacked expert weights, comm.py) is
stored as the slices the ranks hold, each with the rows it covers; `load` joins the rows a reader asks
for (all of them for one process), so a run written with one layout resumes on another and sample.py
reads it on one device. A replicated tensor (a dense weight under data parallelism) is written by
one rank only. With one writer, the whole checkpoint is the one file ckpt.pt.

Nothing is lost on a crash: each file is written to a temporary name and renamed; the parts come
first, ckpt.pt (which names them) last, and the parts of the previous checkpoint are removed only
after that, so ckpt.pt always names files that exist. Files are read with torch.load(weights_only=
True): tensors and plain containers only, never code.
"""

import glob
import os

import torch
import torch.distributed as dist

KINDS = ("model", "ema", "exp_avg", "exp_avg_sq")


def _atomic_save(obj, path):
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ValueError(f"{path} is not a readable checkpoint (truncated, corrupt, or not written by "
                         f"torch.save with plain tensors): {type(e).__name__}: {str(e)[:200]}") from None


def save(path, meta, tensors, slices=None, group=None):
    """Write this rank's share of a checkpoint. Under torch.distributed every rank of `group` (default:
    all) calls it; it all-gathers the part names, so give a gloo group when the default is NCCL.

    meta: what ckpt.pt holds besides tensors (rank 0's is the one kept). tensors: {kind: {name: tensor}},
    only what this rank writes (nothing is fine). slices: {name: (start, stop)}: this rank's tensor of
    that name holds rows start:stop of dim 0 of the whole."""
    part = dict(tensors={k: dict(v) for k, v in tensors.items()}, slices=dict(slices or {}))
    distributed = dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    mine = None  # this rank's part file, if it has tensors to write and is not rank 0 (ckpt.pt holds those)
    if rank != 0 and any(part["tensors"].values()):
        mine = f"{os.path.basename(path)}.step{meta['step']}.part{rank}"
        _atomic_save(part, os.path.join(os.path.dirname(path), mine))
    names = [mine]
    if distributed:
        names = [None] * dist.get_world_size(group)
        dist.all_gather_object(names, mine, group=group)
    if rank == 0:
        parts = [n for n in names if n]
        _atomic_save(dict(meta, **part, parts=parts), path)
        for old in glob.glob(glob.escape(path) + ".step*.part*"):
            if os.path.basename(old) not in parts:
                os.remove(old)
    if distributed:
        dist.barrier(group)  # no rank goes on (and may write again) before ckpt.pt names the new parts


def _read_main(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    main = _read(path)
    missing = {"model_args", "step", "tensors"} - set(main) if isinstance(main, dict) else {"everything"}
    if missing:
        raise ValueError(f"{path} is not a checkpoint written by train.py: missing {sorted(missing)}")
    return main


def load_meta(path):
    """The checkpoint's meta dict alone (step, settings, model arguments, ...): no tensor is read."""
    return {k: v for k, v in _read_main(path).items() if k not in ("tensors", "slices")}


def load(path, rows=None):
    """(meta, tensors): the checkpoint's meta dict and {kind: {name: tensor}} with split tensors joined.
    rows(name) -> (start, stop) or None: only those rows of dim 0 of that tensor, split or whole (a
    rank that holds some of the experts); None, or no `rows`, gives the whole tensor."""
    meta = _read_main(path)
    parts = [meta]
    for name in meta.get("parts", []):
        part_path = os.path.join(os.path.dirname(path), name)
        if not os.path.isfile(part_path):
            raise ValueError(f"{path} names a part file {name} that is missing from {os.path.dirname(path) or '.'}")
        parts.append(_read(part_path))
    tensors = {kind: {} for kind in KINDS}
    pieces = {}  # (kind, name) -> [(start, stop, tensor)] of a split tensor
    for part in parts:
        for kind, named in part["tensors"].items():
            for name, t in named.items():
                if name in part["slices"]:
                    start, stop = part["slices"][name]
                    pieces.setdefault((kind, name), []).append((start, stop, t))
                else:  # stored whole (written by one rank), maybe read by a rank that holds some rows
                    want = rows(name) if rows else None
                    tensors[kind][name] = t[want[0]:want[1]] if want else t
    for (kind, name), found in pieces.items():
        tensors[kind][name] = _join(sorted(found, key=lambda p: p[0]), rows(name) if rows else None, name)
    return {k: v for k, v in meta.items() if k not in ("tensors", "slices")}, tensors


def _join(found, want, name):
    """The rows `want` (start, stop) of a tensor stored as row slices [(start, stop, tensor)]."""
    end = found[-1][1]
    start, stop = want or (0, end)
    covered = 0
    for lo, hi, _ in found:
        if lo != covered:
            raise ValueError(f"checkpoint tensor {name}: rows {covered}..{lo} are in no part file")
        covered = hi
    if not 0 <= start < stop <= end:
        raise ValueError(f"checkpoint tensor {name} has {end} rows; rows {start}..{stop} were asked for")
    return torch.cat([t[max(start, lo) - lo:min(stop, hi) - lo] for lo, hi, t in found if lo < stop and hi > start])

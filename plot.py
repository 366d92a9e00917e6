"""
Figures of one or more training runs from their logs (train.py's out_dir/log.jsonl), for the balance
and MTP ablations of the report (section 4.5) and of the aux-loss-free paper (arXiv 2408.15664).

    python plot.py out/log.jsonl                                  # one run
    python plot.py runs/*/log.jsonl --out=plots                   # runs overlaid

writes into --out (default: plots/)
    loss.png     training main loss (thin) and validation loss (dots) against tokens seen
    maxvio.png   MaxVio of each logged batch (thin) and over the run so far (thick), the worst
                 MoE layer, against tokens: max_i load_i / mean_i load_i - 1
    load.png     per run, the expert load of every MoE layer at the last logged step, as load / the
                 layer's mean load: experts across, layers down (1 everywhere is perfect balance)
Each run is named in the legends by the settings in which the runs differ (the log's first line,
{"settings": ..., "model_args": ...}); one run by its folder. matplotlib is the only dependency,
and an optional one: pip install matplotlib.
"""

import json
import os
import sys

# Settings that change nothing in what a run computes, so never name a run.
NOT_NAMES = {"out_dir", "resume", "stop_iter", "cache_dir", "device", "compile", "eval_interval", "log_interval",
             "nccl_channels", "save_checkpoints"}


def read_log(path):
    """(header or {}, training records, validation records) of one log.jsonl."""
    header, train, val = {}, [], []
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        raise SystemExit(f"{path}: cannot read the log ({e.strerror})") from None
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError:
            if n == len(lines):  # the last line, cut short by a crash
                break
            raise SystemExit(f"{path}:{n}: not a JSON line") from None
        if "settings" in rec:
            header = rec
        elif "val_loss" in rec:
            val.append(rec)
        elif "loss" in rec:
            train.append(rec)
    if not train:
        raise SystemExit(f"{path}: no training records (is it a train.py log.jsonl?)")
    return header, train, val


def run_names(paths, headers):
    """A legend entry per run: key=value of every setting that differs between the runs."""
    flat = [{**h.get("model_args", {}), **h.get("settings", {})} for h in headers]
    keys = sorted({k for f in flat for k in f} - NOT_NAMES)
    differ = [k for k in keys if len({json.dumps(f.get(k)) for f in flat}) > 1]
    names = [", ".join(f"{k}={f.get(k)}" for k in differ) for f in flat]
    if len(paths) == 1 or len(set(names)) < len(names):
        return [os.path.basename(os.path.dirname(os.path.abspath(p))) + (f" ({n})" if n else "")
                for p, n in zip(paths, names)]
    return names


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    out = "plots"
    paths = []
    for arg in argv:
        if arg.startswith("--out="):
            out = arg.split("=", 1)[1]
        elif arg.startswith("-"):
            raise SystemExit(f"usage: python plot.py LOG.jsonl [LOG.jsonl ...] [--out=DIR]; got {arg!r}")
        else:
            paths.append(arg)
    if not paths:
        raise SystemExit("usage: python plot.py LOG.jsonl [LOG.jsonl ...] [--out=DIR]")
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot.py needs matplotlib: pip install matplotlib", file=sys.stderr)
        raise SystemExit(1)
    runs = [read_log(p) for p in paths]
    names = run_names(paths, [h for h, _, _ in runs])
    # tokens seen at a step: steps x the global batch; a log without its header is drawn against steps
    per_step = [h.get("tokens_per_step") for h, _, _ in runs]
    unit = "tokens" if all(per_step) else "steps"
    x = lambda recs, k: [r["step"] * (k if unit == "tokens" else 1) for r in recs]  # noqa: E731
    os.makedirs(out, exist_ok=True)
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (_, train, val), k, name, color in zip(runs, per_step, names, colors(len(runs))):
        ax.plot(x(train, k), [r["main"] for r in train], lw=0.8, alpha=0.6, color=color, label=f"{name}: train")
        if val:
            ax.plot(x(val, k), [r["val_loss"] for r in val], "o-", ms=3, color=color, label=f"{name}: validation")
    finish(ax, unit, "main-model cross-entropy (nats)", "training and validation loss")
    written.append(save(fig, plt, out, "loss.png"))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (_, train, _), k, name, color in zip(runs, per_step, names, colors(len(runs))):
        ax.plot(x(train, k), [r["maxvio"] for r in train], lw=0.8, alpha=0.5, color=color, label=f"{name}: batch")
        if "maxvio_global" in train[-1]:
            steps = [r for r in train if "maxvio_global" in r]
            ax.plot(x(steps, k), [r["maxvio_global"] for r in steps], lw=2, color=color, label=f"{name}: run so far")
    ax.set_yscale("symlog", linthresh=0.1)
    finish(ax, unit, "MaxVio (worst MoE layer)", "load imbalance")
    written.append(save(fig, plt, out, "maxvio.png"))

    loaded = [(r, n) for r, n in zip(runs, names) if "load" in r[1][-1]]
    if loaded:
        cols = min(3, len(loaded))  # three runs to a row
        rows = -(-len(loaded) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.5 * rows), squeeze=False)
        for ax in axes.flat[len(loaded):]:
            ax.set_visible(False)
        ratios = [[[n / (sum(row) / len(row)) if sum(row) else 0.0 for n in row] for row in train[-1]["load"]]
                  for (_, train, _), _ in loaded]
        top = max(max(max(row) for row in ratio) for ratio in ratios)  # one colour scale: runs compare
        for ax, ((header, train, _), name), ratio in zip(axes.flat, loaded, ratios):
            last = train[-1]
            image = ax.imshow(ratio, aspect="auto", cmap="viridis", vmin=0, vmax=top)
            ids = header.get("moe_layers", list(range(len(ratio))))
            n_layers = header.get("model_args", {}).get("n_layers", max(ids) + 1)
            ax.set_yticks(range(len(ids)), [str(i) if i < n_layers else f"MTP {i - n_layers + 1}" for i in ids])
            ax.set(xlabel="expert", ylabel="block", title=f"{name}\nstep {last['step']}")
            ax.title.set_fontsize(8)
            fig.colorbar(image, ax=ax, label="load / mean load")
        written.append(save(fig, plt, out, "load.png"))
    print("wrote " + ", ".join(written))


def colors(n):
    return [f"C{i % 10}" for i in range(n)]


def finish(ax, unit, ylabel, title):
    ax.set(xlabel=unit, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def save(fig, plt, out, name):
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main()

"""plot.py on synthetic and real logs; the balance fields train.py writes into log.jsonl."""

import json
import random
import struct
import sys

import pytest

import plot
from test_train import run

pytest.importorskip("matplotlib")


def png_size(path):
    """(width, height) from a PNG's IHDR chunk, after checking the signature."""
    data = open(path, "rb").read()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n", path
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def synthetic_log(path, balance, seed):
    rng = random.Random(seed)
    E, ids = 8, [1, 2, 3]
    header = dict(settings=dict(seed=seed, out_dir=str(path.parent), max_iters=20), model_args=dict(balance=balance,
                  n_layers=3), moe_layers=ids, tokens_per_step=1024)
    lines = [header]
    for step in range(1, 21):
        load = [[rng.randint(0, 50) for _ in range(E)] for _ in ids]
        lines.append(dict(step=step, loss=5 - step / 10, main=4 - step / 10 + rng.random() / 10, mtp=4.5, balance=0.0,
                          maxvio=rng.random(), maxvio_layers=[rng.random() for _ in ids], maxvio_global=rng.random() / 2,
                          maxvio_global_layers=[rng.random() / 2 for _ in ids], load=load))
        if step % 5 == 0:
            lines.append(dict(step=step, val_loss=4 - step / 12, val_loss_ema=4.1 - step / 12))
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 21, "lo')  # a crash's cut line


def test_figures_from_synthetic_logs(tmp_path, capsys):
    seed = random.randrange(1000)
    paths = []
    for balance in ("bias", "aux"):
        (tmp_path / balance).mkdir()
        synthetic_log(tmp_path / balance / "log.jsonl", balance, seed)
        paths.append(str(tmp_path / balance / "log.jsonl"))
    plot.main(paths + [f"--out={tmp_path / 'figs'}"])
    assert "wrote" in capsys.readouterr().out
    # figsize x dpi 110: 7 x 4.5 inches, and the heat maps 4.5 x 3.5 each, side by side
    assert png_size(tmp_path / "figs" / "loss.png") == (770, 495)
    assert png_size(tmp_path / "figs" / "maxvio.png") == (770, 495)
    assert png_size(tmp_path / "figs" / "load.png") == (990, 385)
    headers = [plot.read_log(p)[0] for p in paths]
    assert plot.run_names(paths, headers) == ["balance=bias", "balance=aux"]  # only what differs
    _, train, val = plot.read_log(paths[0])
    assert len(train) == 20 and len(val) == 4


def test_without_matplotlib_it_says_so(tmp_path, monkeypatch, capsys):
    synthetic_log(tmp_path / "log.jsonl", "bias", 0)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as e:
        plot.main([str(tmp_path / "log.jsonl"), f"--out={tmp_path / 'figs'}"])
    assert e.value.code == 1
    assert capsys.readouterr().err.strip() == "plot.py needs matplotlib: pip install matplotlib"
    assert not (tmp_path / "figs").exists()


def test_a_real_runs_log_has_the_balance_fields(tmp_path, corpus):
    """Every logged step (log_interval 1): MaxVio per layer is max/mean - 1 of that step's integer
    loads, the run's MaxVio that of the loads summed so far, each step's loads sum to tokens x K."""
    log = run(tmp_path / "run", corpus, "--max_iters=3", "--eval_interval=3")
    header = log[0]
    assert header["moe_layers"] == [1, 2] and header["tokens_per_step"] == 4 * 32  # block 1, the MTP block
    assert header["settings"]["max_iters"] == 3 and header["model_args"]["balance"] == "bias"
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    total = [[0] * 8 for _ in range(2)]
    for r in steps:
        assert all(type(n) is int for row in r["load"] for n in row) and len(r["load"]) == 2
        # the main block sees every token, the MTP block all but the last of each sequence; K = 2
        assert [sum(row) for row in r["load"]] == [4 * 32 * 2, 4 * 31 * 2]
        for i, row in enumerate(r["load"]):
            mean = sum(row) / 8
            assert r["maxvio_layers"][i] == pytest.approx(max(row) / mean - 1, rel=1e-12)
            total[i] = [a + b for a, b in zip(total[i], row)]
            assert r["maxvio_global_layers"][i] == pytest.approx(max(total[i]) / (sum(total[i]) / 8) - 1, rel=1e-12)
        assert r["maxvio"] == max(r["maxvio_layers"]) and r["maxvio_global"] == max(r["maxvio_global_layers"])
        assert isinstance(r["maxvio"], float) and isinstance(r["maxvio_global"], float)
    plot.main([str(tmp_path / "run" / "log.jsonl"), f"--out={tmp_path / 'figs'}"])
    assert png_size(tmp_path / "figs" / "load.png") == (495, 385)

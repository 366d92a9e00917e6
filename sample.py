"""
Sample text from a checkpoint, decoding over MLA's latent KV cache (model.py, 2.1.1), with the MTP
module proposing the token after next (speculative decoding, 5.4.3).

    python sample.py                                  # from out/, the folder train.py wrote
    python sample.py --prompt="ROMEO:\\n" --max_new_tokens=200 --temperature=0.8 --top_k=50
    python sample.py --prompt=FILE:prompt.txt         # the prompt from a file
    python sample.py --ckpt=path/to/DeepSeek-V3-format-dir
    python sample.py --speculative=none               # one token per forward of the model
    python sample.py --device=cuda --cuda_graph       # each decoding step replayed as a CUDA graph
    python sample.py --device=cuda --cuda_graph --compile  # ... and compiled first (fewer, fused kernels)

--speculative=mtp (the default when the checkpoint has an MTP module) runs model.decode: each step
the main model verifies the MTP module's proposal and gives the token after it, so one forward yields
one or two tokens. The output follows the same distribution as --speculative=none (greedy: the same
tokens); the acceptance rate is printed at the end. --cuda_graph (GPU only) captures the model's part
of each decoding step, over a static cache, as one CUDA graph; --compile runs it through torch.compile
first (the first tokens then wait for the compilation). README.md has the measured speeds.

A checkpoint is train.py's ckpt.pt (its tokenizer sits beside it), the folder that holds it, or a
Hugging Face-format DeepSeek-V3 directory (config.json + *.safetensors) loaded with
Transformer.from_pretrained, whose tokenizer.json is used unless --tokenizer names another.
In --prompt, the two characters \\n stand for a newline: the training text has a speaker's name
followed by ":\\n", so a prompt that ends in a bare ":" starts from a token pair it rarely saw.
Tokens are printed as they come; the throughput is reported at the end.
"""

import json
import os
import re
import sys
import time

import torch

import data as data_lib
import model as model_lib
import checkpoint as checkpoint_lib
from train import parse_args

# settings (--key=value; --help lists them)
ckpt = "out"                 # train.py's out_dir or its ckpt.pt, or a Hugging Face-format checkpoint directory
tokenizer = ""               # default: the checkpoint's own; else a .tiktoken file, a tokenizer.json, or gpt2
prompt = "\\n"               # text (\n is a newline), or FILE:path
num_samples = 1              # samples, one after the other
max_new_tokens = 300         # tokens per sample, at most (fewer if the model's max_seq_len is reached)
temperature = 0.8            # 0 is greedy
top_k = 50                   # keep the k most likely tokens; 0 keeps every token
top_p = 1.0                  # nucleus sampling: keep the smallest set with this much probability
ema = True                   # use the EMA weights of a train.py checkpoint
device = "auto"              # auto | cpu | cuda | cuda:N
seed = 1337                  # sampling RNG
speculative = "mtp"          # mtp: the MTP module proposes the token after next (5.4.3), if the checkpoint has one; none
cuda_graph = False           # replay each decoding step as one CUDA graph (GPU only)
compile = False              # torch.compile each decoding step (fused kernels; compiles at the first tokens)

SETTINGS = {k: v for k, v in list(globals().items()) if not k.startswith("_") and type(v) in (int, float, bool, str)}
LIMITS = [("num_samples", lambda v: v >= 1, "at least 1"), ("max_new_tokens", lambda v: v >= 1, "at least 1"),
          ("temperature", lambda v: v >= 0, "0 (greedy) or more"), ("top_k", lambda v: v >= 0, "0 (off) or more"),
          ("top_p", lambda v: 0 < v <= 1, "in (0, 1]")]


def check_settings(c):
    for key, ok, allowed in LIMITS:
        if not ok(getattr(c, key)):
            raise SystemExit(f"--{key}={getattr(c, key)}: expected {allowed}")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", c.device):
        raise SystemExit(f"--device={c.device}: expected auto, cpu, cuda or cuda:N")
    if c.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device={c.device}: CUDA is not available here; use --device=cpu")


def find_checkpoint(path):
    """('train', ckpt.pt path) or ('hf', directory) for what --ckpt names."""
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "ckpt.pt")):
            return "train", os.path.join(path, "ckpt.pt")
        if os.path.isfile(os.path.join(path, "config.json")):
            return "hf", path
        raise SystemExit(f"--ckpt={path}: the folder holds neither train.py's ckpt.pt nor a Hugging Face "
                         f"config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"--ckpt={path}: no such file or folder (train a model with `python train.py`, "
                         f"which writes out/ckpt.pt, or pass --ckpt=...)")
    return "train", path


def load_tokenizer(given, own, folder):
    """The encoding --tokenizer names, else the checkpoint's own (a file name in its folder)."""
    name = given or (own if own == "gpt2" else os.path.join(folder, own))
    if name != "gpt2" and not os.path.isfile(name):
        raise SystemExit(f"--tokenizer={given}: no such file" if given else
                         f"{name} not found beside the checkpoint: pass --tokenizer=a .tiktoken file or tokenizer.json")
    try:
        if name.endswith(".json"):
            return data_lib.load_hf_tokenizer(name)
        return data_lib.load_tokenizer(name)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(str(e)) from None


def load_model(c):
    """(model, tokenizer, end-of-text id, beginning-of-text id) from --ckpt."""
    kind, path = find_checkpoint(c.ckpt)
    if kind == "hf":
        try:
            model = model_lib.Transformer.from_pretrained(path)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(f"--ckpt={path}: {e}") from None
        enc = load_tokenizer(c.tokenizer, "tokenizer.json", path)
        with open(os.path.join(path, "config.json")) as f:
            config = json.load(f)
        eot = config.get("eos_token_id")
        return model, enc, eot, config.get("bos_token_id", eot)
    try:
        meta, tensors = checkpoint_lib.load(path)  # whatever layout wrote it
    except ValueError as e:
        raise SystemExit(str(e)) from None
    model = model_lib.Transformer(model_lib.ModelArgs.from_dict(meta["model_args"]))
    model.load_state_dict(tensors["model"])
    if c.ema:  # the EMA holds parameters only; the router biases come from the model state
        model.load_state_dict(tensors["ema"], strict=False)
    enc = load_tokenizer(c.tokenizer, meta["tokenizer"], os.path.dirname(path))
    return model, enc, enc.eot_token, enc.eot_token


def read_prompt(c):
    if c.prompt.startswith("FILE:"):
        try:
            with open(c.prompt[5:], encoding="utf-8") as f:
                return f.read()
        except OSError as e:
            raise SystemExit(f"--prompt={c.prompt}: cannot read {c.prompt[5:]} ({e.strerror})") from None
    return c.prompt.replace("\\n", "\n")


def decoding(c, model, given, dev):
    """Whether to speculate with the MTP module: --speculative=mtp when the checkpoint has one
    (asked for explicitly without one, an error); --cuda_graph only on CUDA."""
    if c.cuda_graph and dev.type != "cuda":
        raise SystemExit(f"--cuda_graph: CUDA graphs need a CUDA device; this run is on {dev.type} (use --device=cuda)")
    if c.speculative == "mtp" and not len(model.mtp):
        if "speculative" in given:
            raise SystemExit("--speculative=mtp: the checkpoint has no MTP module (n_mtp=0); use --speculative=none")
        return False
    return c.speculative == "mtp"


def stream_tokens(c, model, idx, new_tokens, eot, speculative, stats):
    """The new token ids one at a time: generate() one token per forward, or decode() (speculative,
    or over the static cache for CUDA graphs), one or two per step."""
    top = dict(temperature=c.temperature, top_k=c.top_k or None, top_p=c.top_p, eot=eot)
    if not (speculative or c.cuda_graph or c.compile):
        for tok in model.generate(idx, new_tokens, **top):
            yield tok.item()
        return
    for tokens, counts in model_lib.decode(model, idx, new_tokens, **top, speculative=speculative,
                                           cuda_graph=c.cuda_graph, compile=c.compile, stats=stats):
        yield from tokens[0, :counts[0]].tolist()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(a.startswith("--out_dir") for a in argv):  # train.py's name for the folder
        raise SystemExit("--out_dir is train.py's setting; sample.py reads that folder with --ckpt=DIR "
                         "(or --ckpt=DIR/ckpt.pt)")
    c, _, given = parse_args(SETTINGS, argv, script=__file__, choices=dict(speculative=("mtp", "none")))
    check_settings(c)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device)
    torch.manual_seed(c.seed)
    text = read_prompt(c)
    model, enc, eot, bos = load_model(c)
    speculative = decoding(c, model, given, dev)
    model.to(dev).eval()
    if dev.type == "cuda":
        model.to(torch.bfloat16)
    ids = enc.encode(text, allowed_special="all") or [bos]
    room = model.args.max_seq_len - len(ids)
    if room < 1:
        raise SystemExit(f"the prompt has {len(ids)} tokens; the model's max_seq_len={model.args.max_seq_len} "
                         f"leaves no room for a new one")
    new_tokens = min(c.max_new_tokens, room)
    if new_tokens < c.max_new_tokens:
        print(f"note: {len(ids)} prompt tokens + --max_new_tokens={c.max_new_tokens} exceed max_seq_len="
              f"{model.args.max_seq_len}: generating at most {new_tokens} tokens", file=sys.stderr)
    idx = torch.tensor([ids], device=dev)
    generated, t0, stats, proposed, accepted = 0, time.time(), {}, 0, 0
    for _ in range(c.num_samples):
        sys.stdout.write(text)
        pending = b""
        for t in stream_tokens(c, model, idx, new_tokens, eot, speculative, stats):
            generated += 1
            if t == eot:
                break
            pending += enc.decode_single_token_bytes(t)
            try:  # print whole UTF-8 characters as soon as they are complete
                sys.stdout.write(pending.decode("utf-8"))
                pending = b""
            except UnicodeDecodeError:
                pass
            sys.stdout.flush()
        sys.stdout.write(pending.decode("utf-8", errors="replace") + "\n" + "-" * 40 + "\n")
        proposed, accepted = proposed + stats.get("proposed", 0), accepted + stats.get("accepted", 0)
    dt = time.time() - t0
    print(f"{generated} tokens in {dt:.2f}s: {generated / dt:.1f} tokens/s ({dev.type}"
          f"{', compiled: the compilation counts in the time' if c.compile else ''}"
          f"{', CUDA graphs' if c.cuda_graph else ''})", file=sys.stderr)
    if speculative:
        print(f"speculative decoding (MTP): {accepted} of {proposed} proposals accepted, acceptance rate "
              f"{accepted / max(proposed, 1):.1%}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""
Sample text from a checkpoint, decoding over MLA's latent KV cache (model.py, 2.1.1).

    python sample.py                                  # from out/ckpt.pt, the one train.py wrote
    python sample.py --prompt="ROMEO:" --max_new_tokens=200 --temperature=0.8 --top_k=50
    python sample.py --prompt=FILE:prompt.txt         # the prompt from a file
    python sample.py --ckpt=path/to/DeepSeek-V3-format-dir --tokenizer=path/to/tokenizer.tiktoken

A checkpoint is train.py's ckpt.pt (its tokenizer sits beside it), or a Hugging Face-format
DeepSeek-V3 directory (config.json + *.safetensors) loaded with Transformer.from_pretrained; the
latter needs --tokenizer (a .tiktoken rank file) since no tokenizer can be downloaded here.
Tokens are printed as they come; the throughput is reported at the end.
"""

import os
import sys
import time

import torch

import data as data_lib
import model as model_lib
from train import load_checkpoint, parse_args

# settings (--key=value)
ckpt = "out/ckpt.pt"         # train.py's checkpoint, or a Hugging Face-format checkpoint directory
tokenizer = ""               # default: the one beside train.py's checkpoint; else a .tiktoken path or gpt2
prompt = "\n"                # text, or FILE:path
num_samples = 1
max_new_tokens = 300
temperature = 0.8            # 0 is greedy
top_k = 50                   # 0 keeps every token
top_p = 1.0                  # nucleus sampling: keep the smallest set with this much probability
ema = True                   # use the EMA weights of a train.py checkpoint
device = "auto"
seed = 1337

SETTINGS = {k: v for k, v in list(globals().items()) if not k.startswith("_") and type(v) in (int, float, bool, str)}


def load_model(c, device):
    """(model, tokenizer) from train.py's checkpoint or a Hugging Face-format directory."""
    if os.path.isdir(c.ckpt):
        if not c.tokenizer:
            raise SystemExit(f"{c.ckpt} is a Hugging Face-format directory: pass --tokenizer=path/to/file.tiktoken")
        return model_lib.Transformer.from_pretrained(c.ckpt).to(device), data_lib.load_tokenizer(c.tokenizer)
    ck = load_checkpoint(c.ckpt)
    model = model_lib.Transformer(model_lib.ModelArgs.from_dict(ck["model_args"]))
    model.load_state_dict(ck["model"])
    if c.ema:  # the EMA holds parameters only; the router biases come from the model state
        model.load_state_dict(ck["ema"], strict=False)
    name = c.tokenizer or ck["tokenizer"]
    if name != "gpt2" and not os.path.isabs(name) and not os.path.exists(name):
        name = os.path.join(os.path.dirname(c.ckpt), name)
    return model.to(device), data_lib.load_tokenizer(name)


def main(argv=None):
    c, _ = parse_args(SETTINGS, sys.argv[1:] if argv is None else argv)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if c.device == "auto" else c.device)
    torch.manual_seed(c.seed)
    model, enc = load_model(c, dev)
    model.eval()
    if dev.type == "cuda":
        model.to(torch.bfloat16)
    text = open(c.prompt[5:]).read() if c.prompt.startswith("FILE:") else c.prompt
    ids = enc.encode(text, allowed_special="all") or [enc.eot_token]
    idx = torch.tensor([ids] * c.num_samples, device=dev)
    generated, t0 = 0, time.time()
    for i in range(c.num_samples):
        row = idx[i:i + 1]
        sys.stdout.write(text)
        stream = model.generate(row, c.max_new_tokens, temperature=c.temperature, top_k=c.top_k or None,
                                top_p=c.top_p, eot=enc.eot_token)
        pending = b""
        for tok in stream:
            generated += 1
            t = tok.item()
            if t == enc.eot_token:
                break
            pending += enc.decode_single_token_bytes(t)
            try:  # print whole UTF-8 characters as soon as they are complete
                sys.stdout.write(pending.decode("utf-8"))
                pending = b""
            except UnicodeDecodeError:
                pass
            sys.stdout.flush()
        sys.stdout.write(pending.decode("utf-8", errors="replace") + "\n" + "-" * 40 + "\n")
    dt = time.time() - t0
    print(f"{generated} tokens in {dt:.2f}s: {generated / dt:.1f} tokens/s ({dev.type})", file=sys.stderr)


if __name__ == "__main__":
    main()

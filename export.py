"""
Export a train.py checkpoint as a Hugging Face-format DeepSeek-V3 folder, which transformers loads
(AutoModelForCausalLM, AutoTokenizer) and Transformer.from_pretrained reads back bit for bit.

    python export.py out/ckpt.pt out/hf        # or train.py's folder: python export.py out out/hf
    python export.py out out/hf --ema=False --dtype=float32 --max_shard_gb=2

The folder:
    config.json             DeepSeek-V3's schema (model_type deepseek_v3, num_nextn_predict_layers,
                            rope_scaling when YaRN is on), made by model.hf_config
    model.safetensors       the weights under the released checkpoints' names, BF16 (the router's
                            bias b stays FP32); above --max_shard_gb, model-0000i-of-0000n.safetensors
                            and model.safetensors.index.json. Written by hand (model.write_safetensors):
                            no safetensors package at run time
    tokenizer.json          the byte-level BPE: the tiktoken ranks as vocabulary and merges, the split
    tokenizer_config.json   pattern, <|endoftext|> as bos and eos (data.save_hf_tokenizer)

The MTP module (2.2) is layer num_hidden_layers, with its own copies of the embedding and the output
head, as DeepSeek releases V3. transformers' DeepseekV3ForCausalLM has no MTP layer: it loads the rest
and lists that layer's tensors as UNEXPECTED; from_pretrained and sample.py load it and decode
speculatively with it (5.4.3).

EMA: like sample.py, the EMA weights are exported by default, --ema=False exports the raw ones; the
router biases come from the model state either way (the EMA holds parameters only).
"""

import os
import sys
from types import SimpleNamespace

import torch

import data as data_lib
import sample
from train import parse_args

# settings (--key=value after the two folders; --help lists them)
ema = True                   # export the EMA weights, as sample.py samples them; False: the raw weights
dtype = "bfloat16"           # bfloat16 | float32: how the weights are stored (the router bias stays float32)
max_shard_gb = 5.0           # safetensors files of at most this many GB (10^9 bytes); more: shards with an index

SETTINGS = {k: v for k, v in list(globals().items()) if not k.startswith("_") and type(v) in (int, float, bool, str)}
USAGE = "usage: python export.py CHECKPOINT OUT_DIR [--ema=True --dtype=bfloat16 --max_shard_gb=5.0]"


def load(src, use_ema):
    """(model, tokenizer) of a train.py checkpoint: its ckpt.pt or the folder holding it."""
    if not os.path.exists(src):
        raise SystemExit(f"{src}: no such file or folder (train.py writes out/ckpt.pt)")
    kind, _ = sample.find_checkpoint(src)
    if kind == "hf":
        raise SystemExit(f"{src} is a Hugging Face-format folder already; export.py reads train.py's checkpoints")
    model, enc, _, _ = sample.load_model(SimpleNamespace(ckpt=src, tokenizer="", ema=use_ema))
    return model, enc


def export(src, dst, use_ema=True, dtype=torch.bfloat16, max_shard_bytes=5 * 10**9):
    """Write src's model and tokenizer into the new (or empty) folder dst; returns the files written."""
    if os.path.isdir(dst) and os.listdir(dst):
        raise SystemExit(f"{dst} already holds files; export into a new or empty folder")
    model, enc = load(src, use_ema)
    model.save_pretrained(dst, dtype=dtype, max_shard_bytes=max_shard_bytes, bos_token_id=enc.eot_token,
                          eos_token_id=enc.eot_token)
    data_lib.save_hf_tokenizer(enc, dst, model.args.max_seq_len)
    return model, sorted(os.listdir(dst))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:  # the folders first; parse_args then lists the settings
        print(f"{USAGE}\n  CHECKPOINT: train.py's ckpt.pt or the folder holding it; OUT_DIR: a new or empty folder\n")
    folders = [a for a in argv if not a.startswith("-")]
    c, _, _ = parse_args(SETTINGS, [a for a in argv if a.startswith("-")], script=__file__,
                         choices=dict(dtype=("bfloat16", "float32")))
    if len(folders) != 2:
        raise SystemExit(f"{USAGE}: expected a checkpoint and an output folder, got {len(folders)} path(s)")
    if c.max_shard_gb <= 0:
        raise SystemExit(f"--max_shard_gb={c.max_shard_gb}: expected above 0")
    model, files = export(*folders, c.ema, getattr(torch, c.dtype), int(c.max_shard_gb * 10**9))
    shards = [f for f in files if f.endswith(".safetensors")]
    size = sum(os.path.getsize(os.path.join(folders[1], f)) for f in shards) / 1e6
    print(f"wrote {folders[1]}: {', '.join(files)}; {len(shards)} safetensors file(s), {size:.1f} MB in "
          f"{c.dtype}, {'EMA' if c.ema else 'raw'} weights, MTP layers: {model.args.n_mtp}")


if __name__ == "__main__":
    main()

"""export.py and model.save_pretrained: a Hugging Face-format DeepSeek-V3 folder that transformers loads
with our logits, whose tokenizer.json encodes as our tiktoken encoding does, and that from_pretrained
reads back bit for bit.

transformers, tokenizers and safetensors are test-only extras (requirements-test.txt); without them the
tests that need them skip. As in test_pretrained.py, the router biases are non-negative wherever our
logits are held against transformers' (it fills dropped expert groups with 0, the paper with -inf).
"""

import json
import os
import re
from dataclasses import asdict

import pytest
import torch

import checkpoint
import data
import export
import model
from model import ModelArgs, Transformer
from test_cli import sample_texts, script
from test_train import run


def tiny(**kw):
    base = dict(vocab_size=97, dim=64, inter_dim=96, moe_inter_dim=32, n_layers=3, n_dense_layers=1, n_heads=4,
                q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                n_routed_experts=8, n_shared_experts=1, n_activated_experts=3, n_expert_groups=4, n_limited_groups=2,
                route_scale=2.5, n_mtp=1, max_seq_len=128, init_std=0.2)
    return ModelArgs(**{**base, **kw})


def make(args):
    m = Transformer(args, seed=int(torch.randint(1 << 30, ())))
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.bias.uniform_(0.0, 0.3)  # non-negative: see the module docstring
    return m.eval()


YARN = dict(max_seq_len=256, original_seq_len=64, rope_factor=4.0, mscale=0.707)


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=0, n_mtp=2)], ids=["v3", "no-q-lora-2-mtp"])
def test_released_names_round_trip(kw):
    """Every tensor's released name maps back to it: ours_to_hf and hf_to_ours are inverses."""
    m = make(tiny(**kw))
    names = [name for name, _ in model.hf_tensors(m)]
    assert len(names) == len(set(names))
    back = {}
    for name in names:
        ours, e = model.hf_to_ours(name, m.args)
        if ours is not None:
            back.setdefault(ours, set()).add(e)
    state = m.state_dict()
    assert back.keys() == state.keys()
    for ours, experts in back.items():
        assert experts == (set(range(8)) if ".ffn.experts." in ours else {None}), ours
    L = m.args.n_layers
    assert f"model.layers.{L}.eh_proj.weight" in names and f"model.layers.{L}.shared_head.head.weight" in names
    assert f"model.layers.{L}.mlp.experts.7.down_proj.weight" in names and "lm_head.weight" in names


@pytest.mark.parametrize("kw", [dict(), dict(n_mtp=0), dict(q_lora_rank=0, **YARN)], ids=["mtp", "no-mtp", "yarn"])
def test_transformers_loads_the_export_with_our_logits(tmp_path, kw):
    """AutoModelForCausalLM on the BF16 export: nothing missing or mismatched, the MTP layer (and only
    it) unused, and in float64 the logits of our model on the same stored weights."""
    transformers = pytest.importorskip("transformers")
    m = make(tiny(**kw))
    m.save_pretrained(str(tmp_path), bos_token_id=96, eos_token_id=96)
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), output_loading_info=True,
                                                                 dtype=torch.float64)
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    L = m.args.n_layers
    assert info["unexpected_keys"] and all(k.startswith(f"model.layers.{L}.") for k in info["unexpected_keys"]) \
        if m.args.n_mtp else not info["unexpected_keys"]
    hf.config._experts_implementation = "eager"  # its plain loop: grouped_mm has no float64
    ours = model.Transformer.from_pretrained(str(tmp_path)).double()
    idx = torch.randint(0, 97, (2, 50))
    with torch.no_grad():
        expected, got = hf.eval()(idx).logits, ours(idx)
    # transformers computes the RoPE angles in FP32 even in a float64 model: 1e-5, not 1e-9
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got.std() > 0.1  # logits that say something, not a near-constant
    # and what both read is the model's weights rounded to BF16 (the router bias kept in FP32)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.bfloat16())
        torch.testing.assert_close(m.double()(idx), got, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_from_pretrained_reads_the_export_back_exactly(tmp_path, dtype):
    """Sharded at a small limit: every tensor bit for bit as stored (FP32, or BF16 with the router bias
    FP32), the index naming each tensor's file, the files as the safetensors package reads them, and
    the same model arguments (but the training-only fields)."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    m = make(tiny(**YARN))
    limit = sum(t.numel() for _, t in model.hf_tensors(m)) * dtype.itemsize // 4  # about 4 files
    m.save_pretrained(str(tmp_path), dtype=dtype, max_shard_bytes=limit)
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(files) >= 3 and set(index["weight_map"].values()) == set(files)
    stored = {}
    for f in files:
        shard = safetensors_torch.load_file(str(tmp_path / f))
        assert all(index["weight_map"][name] == f for name in shard)
        assert sum(t.numel() * t.element_size() for t in shard.values()) <= limit or len(shard) == 1
        stored.update(shard)
    assert stored.keys() == index["weight_map"].keys() == {name for name, _ in model.hf_tensors(m)}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    assert stored[bias].dtype == torch.float32 and stored["lm_head.weight"].dtype == dtype
    back = model.Transformer.from_pretrained(str(tmp_path))
    for name, t in m.state_dict().items():
        want = t if name.endswith("gate.bias") else t.to(dtype).float()
        assert torch.equal(back.state_dict()[name], want), name
    training_only = {"init_std", "mtp_lambda", "balance", "balance_alpha", "aux_alpha", "recompute", "fp8"}
    assert {k: v for k, v in asdict(back.args).items() if k not in training_only} == \
        {k: v for k, v in asdict(m.args).items() if k not in training_only}


def bpe_encoding(tmp_path, vocab_size=400):
    ranks = data.train_bpe([t[:80_000] for t in data.corpus_text("shakespeare")[:2]], vocab_size - 1)
    data.save_ranks(ranks, str(tmp_path / "tokenizer.tiktoken"))
    return data.load_tokenizer(str(tmp_path / "tokenizer.tiktoken"))


TEXT = ("KING HENRY:\nOnce more unto the breach, dear friends, once more;\r\n\tOr close the wall up  with our "
        "English dead!<|endoftext|>  héllo wörld 12345, naïve café's 日本語 ok?!\n\n  end ")


def test_exported_tokenizer_gives_our_ids(tmp_path):
    """AutoTokenizer (and tokenizers itself) on the exported tokenizer.json: the ids of our tiktoken
    encoding for text with contractions, digits, punctuation runs, CRLF, tabs, non-Latin and a special
    token, the same text decoded back, <|endoftext|> as bos and eos; load_hf_tokenizer reads it too."""
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    enc = bpe_encoding(tmp_path)
    data.save_hf_tokenizer(enc, str(tmp_path), 128)
    ids = enc.encode(TEXT, allowed_special="all")
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert auto(TEXT)["input_ids"] == ids and auto.decode(ids) == TEXT
    assert auto.eos_token_id == auto.bos_token_id == enc.eot_token == 399 and len(auto) == enc.n_vocab
    plain = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    shakespeare = data.corpus_text("shakespeare")[5][:20_000]
    assert plain.encode(shakespeare).ids == enc.encode(shakespeare)
    assert len({i for i in enc.encode(shakespeare) if i >= 256}) > 100  # most of the 143 merges take part
    again = data.load_hf_tokenizer(str(tmp_path / "tokenizer.json"))
    assert again.encode(TEXT, allowed_special="all") == ids


def test_a_rank_table_that_is_not_bpe_is_refused(tmp_path):
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"abc"] = 256  # no two lower-ranked tokens make it
    enc = data.tiktoken.Encoding("x", pat_str=data.PAT, mergeable_ranks=ranks, special_tokens={data.EOT: 257})
    with pytest.raises(ValueError, match=r"token b'abc' \(rank 256\) is not the merge of two lower-ranked tokens"):
        data.save_hf_tokenizer(enc, str(tmp_path), 16)


def test_export_script_end_to_end(tmp_path, corpus, capsys):
    """python export.py out out/hf on train.py's folder: the EMA weights by default (--ema=False the raw
    ones), a folder sample.py reads with the same greedy text as the checkpoint itself (float32), and
    one-line refusals of what it cannot do."""
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    run(out, corpus, "--max_iters=3", "--eval_interval=3")
    code, stdout, stderr = script("export.py", str(out), str(tmp_path / "hf"))
    assert code == 0, stderr
    assert re.search(r"wrote .*hf: config\.json, model\.safetensors, tokenizer\.json, tokenizer_config\.json; "
                     r"1 safetensors file\(s\), [\d.]+ MB in bfloat16, EMA weights, MTP layers: 1", stdout)
    export.main([str(out / "ckpt.pt"), str(tmp_path / "raw"), "--ema=False", "--dtype=float32"])
    export.main([str(out), str(tmp_path / "f32"), "--dtype=float32", "--max_shard_gb=0.0002"])
    _, tensors = checkpoint.load(str(out / "ckpt.pt"))
    ema, raw = model.Transformer.from_pretrained(str(tmp_path / "hf")), model.Transformer.from_pretrained(str(tmp_path / "raw"))
    name = "layers.1.attn.w_dq.weight"
    assert torch.equal(ema.state_dict()[name], tensors["ema"][name].to(torch.bfloat16).float())
    assert torch.equal(raw.state_dict()[name], tensors["model"][name])
    assert not torch.equal(tensors["ema"][name], tensors["model"][name])
    assert len([f for f in os.listdir(tmp_path / "f32") if f.endswith(".safetensors")]) > 1
    texts = sample_texts(capsys, [out, tmp_path / "f32"], "--max_new_tokens=30", "--temperature=0")
    assert texts[0] == texts[1] and texts[0].startswith("KING:\n")
    for args, message in [([str(out), str(tmp_path / "hf")], "already holds files; export into a new or empty folder"),
                          ([str(tmp_path / "nothing"), str(tmp_path / "x")], "no such file or folder"),
                          ([str(tmp_path / "hf"), str(tmp_path / "y")], "is a Hugging Face-format folder already"),
                          ([str(out), str(tmp_path / "z"), "--dtype=fp8"], "--dtype=fp8: expected one of bfloat16, float32"),
                          ([str(out)], "expected a checkpoint and an output folder, got 1 path(s)"),
                          ([str(out), str(tmp_path / "z"), "--max_shard_gb=0"], "--max_shard_gb=0.0: expected above 0")]:
        with pytest.raises(SystemExit, match=re.escape(message)):
            export.main(args)
    assert not (tmp_path / "z").exists()

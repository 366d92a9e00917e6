"""from_pretrained: a Hugging Face-format DeepSeek-V3 checkpoint gives the same logits as transformers.

transformers and safetensors are test-only extras (requirements-test.txt); without them these tests
skip. Note on parity: transformers fills the dropped expert groups with 0 before the top-k, where the
paper's -inf is right. With sigmoid affinities and a non-negative bias every kept score is positive,
so the two agree; the tests use such biases.
"""

import json
import os

import pytest
import torch

import model

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")


def hf_config(**kw):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=3,
                n_group=4, topk_group=2, routed_scaling_factor=2.5, max_position_embeddings=128, rms_norm_eps=1e-6)
    return transformers.DeepseekV3Config(**{**base, **kw})


def save_hf_model(cfg, path):
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.normal_(std=0.2) if p.dim() >= 2 else p.uniform_(0.5, 1.5)
        for name, b in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(0.0, 0.3)  # non-negative: see the module docstring
    hf.save_pretrained(path)
    hf.config._experts_implementation = "eager"  # its plain loop: grouped_mm has no float64
    return hf.eval()


@pytest.mark.parametrize("kw", [
    dict(),
    dict(q_lora_rank=None),  # a plain query projection, as in V2-Lite
    dict(rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=32, beta_slow=1,
                           mscale=1.0, mscale_all_dim=1.0)),
], ids=["v3", "no-q-lora", "yarn"])
def test_logits_match_transformers(tmp_path, kw):
    hf = save_hf_model(hf_config(**kw), tmp_path)
    ours = model.Transformer.from_pretrained(str(tmp_path)).eval()
    assert ours.args.n_mtp == 0  # transformers saves no MTP layer
    idx = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        expected = hf(idx).logits.double()
        hf_model = hf.double()
        expected64 = hf_model(idx).logits
        got = ours.double()(idx)
    assert (expected - expected64).abs().max() < 1e-3  # the float32 and float64 runs agree
    # transformers computes the RoPE angles in FP32 even in a float64 model, hence 1e-5 and not 1e-9
    torch.testing.assert_close(got, expected64, rtol=1e-5, atol=1e-5)
    # and decoding over the latent cache, with absorption, gives the same last-position logits
    cache = ours.new_cache(2, 40)
    with torch.no_grad():
        ours(idx[:, :39], cache=cache)
        last = ours(idx[:, 39:], start_pos=39, cache=cache)
    torch.testing.assert_close(last[:, 0], expected64[:, -1], rtol=1e-5, atol=1e-5)


def test_fp8_block_scaled_checkpoint_is_dequantized(tmp_path):
    cfg = hf_config(hidden_size=256, q_lora_rank=160, intermediate_size=320)
    save_hf_model(cfg, tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = safetensors_torch.load_file(path)
    name = "model.layers.0.self_attn.q_a_proj.weight"  # (160, 256): 2 x 2 blocks, one of them ragged
    w = tensors[name]
    # weight_scale_inv: real = fp8 * scale, one scale per 128x128 block, max |w| of the block / 448
    padded = torch.zeros(256, 256).index_put_((torch.arange(160)[:, None], torch.arange(256)), w)
    scale = padded.abs().view(2, 128, 2, 128).amax((1, 3)) / 448
    full_scale = scale.repeat_interleave(128, 0)[:160].repeat_interleave(128, 1)[:, :256]
    w_fp8 = (w / full_scale).to(torch.float8_e4m3fn)
    tensors[name] = w_fp8
    tensors[name + "_scale_inv"] = scale
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    ours = model.Transformer.from_pretrained(str(tmp_path))
    loaded = ours.layers[0].attn.w_dq.weight
    torch.testing.assert_close(loaded, w_fp8.float() * full_scale, rtol=0, atol=0)
    # within E4M3's rounding: half a unit in the last of 3 mantissa bits, 2^-9 absolute below 2^-6
    assert ((loaded - w).abs() <= w.abs() / 16 + 2.0 ** -9 * full_scale).all()


def test_mtp_layer_loads_into_the_mtp_module(tmp_path):
    cfg = hf_config(num_nextn_predict_layers=1)
    save_hf_model(cfg, tmp_path)
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = safetensors_torch.load_file(path)
    # the released layout: layer num_hidden_layers is the MTP module, a full MoE block plus these
    for k, v in list(tensors.items()):
        if k.startswith("model.layers.2."):
            tensors[k.replace("model.layers.2.", "model.layers.3.")] = v.clone() + 0.01
    extra = {"enorm.weight": torch.rand(64), "hnorm.weight": torch.rand(64), "eh_proj.weight": torch.randn(64, 128),
             "shared_head.norm.weight": torch.rand(64), "shared_head.head.weight": tensors["lm_head.weight"].clone(),
             "embed_tokens.weight": tensors["model.embed_tokens.weight"].clone()}
    for k, v in extra.items():
        tensors[f"model.layers.3.{k}"] = v
    safetensors_torch.save_file(tensors, path, metadata={"format": "pt"})
    ours = model.Transformer.from_pretrained(str(tmp_path))
    assert ours.args.n_mtp == 1
    torch.testing.assert_close(ours.mtp[0].proj.weight, extra["eh_proj.weight"])
    torch.testing.assert_close(ours.mtp[0].e_norm.weight, extra["enorm.weight"])
    torch.testing.assert_close(ours.mtp[0].block.attn.w_dkv.weight,
                               tensors["model.layers.3.self_attn.kv_a_proj_with_mqa.weight"])
    torch.testing.assert_close(ours.mtp[0].block.ffn.experts.w2[5], tensors["model.layers.3.mlp.experts.5.down_proj.weight"])
    idx = torch.randint(0, 97, (1, 10))
    _, losses = ours(idx, idx.roll(-1, 1))
    assert torch.isfinite(losses["mtp"]) and losses["mtp"] > 0


def test_bad_checkpoints_are_refused_with_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        model.Transformer.from_pretrained(str(tmp_path))
    save_hf_model(hf_config(), tmp_path)
    cfg_path = os.path.join(tmp_path, "config.json")
    cfg = json.load(open(cfg_path))
    for key, value, match in [("scoring_func", "softmax", "scoring_func"), ("frobnicate", 3, "unknown config.json key 'frobnicate'"),
                              ("n_group", 3, "n_expert_groups")]:
        json.dump({**cfg, key: value}, open(cfg_path, "w"))
        with pytest.raises(ValueError, match=match):
            model.Transformer.from_pretrained(str(tmp_path))
    json.dump(cfg, open(cfg_path, "w"))
    os.remove(os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        model.Transformer.from_pretrained(str(tmp_path))

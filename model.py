"""
The DeepSeek-V3 model (technical report arXiv 2412.19437), in one file beside moe.py.

    ModelArgs, preset()       every dimension, named as in the paper; named sizes from CPU demo to V3
    precompute_rope, YaRN     decoupled RoPE on qk_rope_head_dim only, YaRN for long context   2.1.1, 4.3
    MLA                       Multi-head Latent Attention, eqs. 1-11, with a latent KV cache     2.1.1
                              and weight absorption for decoding
    Block                     MLA + (dense SwiGLU MLP | DeepSeekMoE from moe.py), pre-norm      2.1
    MTPModule                 one multi-token prediction depth, eqs. 21-24                      2.2
    Transformer               embedding, blocks, final norm, output head, D MTP modules, eq. 25
    count_params              total / activated / MTP parameter counts, on the meta device
    generate                  decoding over the latent cache, one token per forward
    decode, Decoder           batched decoding over a static cache, each row at its own position,  5.4.3
                              speculative with the MTP module's proposals; CUDA-graph steps (GPU)
    from_pretrained           builds the model from a Hugging Face-format DeepSeek-V3 checkpoint
    save_pretrained           writes one (config.json, BF16 safetensors under the released names,
                              the MTP module as layer num_hidden_layers), which transformers loads

Implementation switches, as module-level choices so tests can hold one path against the other:
    attn_impl = "absorb" | "naive"   how decoding attends over the latent cache (training always runs
                                     the naive path through scaled_dot_product_attention)
    moe.expert_impl = "grouped" | "loop"

Seams for later work: every Linear inside the blocks is built by `linear_cls(args)`, so FP8 swaps
in there (fp8.py); the MoE layer takes a dispatcher (comm.py); `Block.forward` is attention then
feed-forward, and MoE.forward is gate -> dispatch -> experts -> combine, the pieces a pipeline
schedule overlaps (dualpipe.block_pieces); MTPModule.project and cross_entropy are the MTP input and
the loss those pieces share with output_losses.

Simplified against the paper: no tensor parallelism (neither has V3; expert parallelism is comm.py's,
installed into a built model by comm.shard_experts); the attention core is PyTorch's
scaled_dot_product_attention, so with recompute=True it is recomputed too (PyTorch does not expose
its backward on its own); the residual stream stays FP32 under BF16 autocast.
"""

import json
import math
import os
import struct
import zlib
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import fp8
from moe import ATTENTION, MATMULS, MLP, MoE, recompute

attn_impl = "absorb"  # decoding over the latent cache: "absorb" (W^UK, W^UV folded in) or "naive"

# On the GPU choose the attention kernel deliberately: cuDNN takes MLA's shapes (q/k head dim 192,
# v head dim 128) as they are and is the fastest; flash refuses unequal head dims.
SDPA_BACKENDS = [torch.nn.attention.SDPBackend.CUDNN_ATTENTION, torch.nn.attention.SDPBackend.FLASH_ATTENTION,
                 torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION, torch.nn.attention.SDPBackend.MATH]


@dataclass
class ModelArgs:
    vocab_size: int = 2048          # token ids, <|endoftext|> included
    dim: int = 192                  # d, hidden size
    inter_dim: int = 512            # dense SwiGLU MLP hidden size
    moe_inter_dim: int = 128        # hidden size of each expert
    n_layers: int = 4               # transformer blocks of the main model
    n_dense_layers: int = 1         # the first blocks use a dense MLP instead of MoE
    n_heads: int = 4                # n_h
    # MLA (2.1.1)
    q_lora_rank: int = 96           # d'_c; 0 means a plain query projection (V2-Lite)
    kv_lora_rank: int = 64          # d_c
    qk_nope_head_dim: int = 32      # d_h
    qk_rope_head_dim: int = 16      # d^R_h
    v_head_dim: int = 32            # d_h of the values
    # DeepSeekMoE (2.1.2)
    n_routed_experts: int = 8       # N_r
    n_shared_experts: int = 1       # N_s
    n_activated_experts: int = 2    # K_r
    n_expert_groups: int = 4        # groups (nodes in V3) the routed experts are split into
    n_limited_groups: int = 2       # M: groups a token may be routed to
    route_scale: float = 1.0        # scales the normalized gates (2.5 in V3)
    balance: str = "bias"           # bias (aux-loss-free, V3) | aux (expert-level loss) | none (moe.py)
    balance_alpha: float = 1e-4     # alpha, sequence-wise balance loss weight (balance=bias)
    aux_alpha: float = 0.001        # alpha of the expert-level loss (balance=aux; DeepSeekMoE's 0.001)
    # MTP (2.2)
    n_mtp: int = 1                  # D, prediction depth
    mtp_lambda: float = 0.3         # lambda, MTP loss weight (train.py schedules it)
    # RoPE and YaRN (4.3)
    max_seq_len: int = 1024         # longest sequence (RoPE table, decoding cache)
    original_seq_len: int = 4096    # context length the RoPE frequencies were trained for
    rope_theta: float = 10000.0     # RoPE base
    rope_factor: float = 40.0       # YaRN scale s, used when max_seq_len > original_seq_len
    beta_fast: int = 32             # YaRN: pairs turning more often than this are kept
    beta_slow: int = 1              # YaRN: pairs turning less often than this are interpolated
    mscale: float = 1.0             # sqrt(t) = 0.1 * mscale * ln(s) + 1
    # everything else
    norm_eps: float = 1e-6          # RMSNorm epsilon
    init_std: float = 0.006         # std of the initial weights (4.2)
    recompute: bool = False         # recompute RMSNorms and MLA up-projections in backward (3.2.3)
    fp8: bool = False               # FP8 GEMMs inside the blocks (fp8.py)

    def __post_init__(self):
        check(self.n_heads > 0, "n_heads", self.n_heads, "a positive number of attention heads")
        check(self.balance in ("bias", "aux", "none"), "balance", self.balance, "bias, aux or none")
        check(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", self.qk_rope_head_dim,
              "an even number (RoPE rotates pairs)")
        check(0 <= self.n_dense_layers <= self.n_layers, "n_dense_layers", self.n_dense_layers,
              f"0..n_layers={self.n_layers}")
        check(self.n_routed_experts % self.n_expert_groups == 0, "n_expert_groups", self.n_expert_groups,
              f"a divisor of n_routed_experts={self.n_routed_experts}")
        check(1 <= self.n_limited_groups <= self.n_expert_groups, "n_limited_groups", self.n_limited_groups,
              f"1..n_expert_groups={self.n_expert_groups}")
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.n_expert_groups > 1:
            check(per_group >= 2, "n_expert_groups", self.n_expert_groups,
                  "at most n_routed_experts/2 groups (a group is scored by its two best experts)")
        if self.fp8:  # the routed experts' grouped FP8 GEMMs and the FP8 dispatch take whole tiles
            for name in ("dim", "moe_inter_dim"):
                check(getattr(self, name) % 128 == 0, name, getattr(self, name),
                      "a multiple of 128 with fp8=True (FP8 scales cover 128-element blocks)")
        eligible = per_group * self.n_limited_groups
        check(1 <= self.n_activated_experts <= eligible, "n_activated_experts", self.n_activated_experts,
              f"1..{eligible} (the experts in the n_limited_groups={self.n_limited_groups} kept groups)")

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelArgs key(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)


def check(ok, name, value, allowed):
    if not ok:
        raise ValueError(f"{name}={value!r} is not allowed: expected {allowed}")


PRESETS = {
    # The CPU demo: about 3M parameters, learns Shakespeare in a few minutes on 2 cores.
    "nano": dict(),
    # One GPU, in the spirit of the 1B MoE of the auxiliary-loss-free paper (arXiv 2408.15664).
    "small": dict(vocab_size=8192, dim=1024, inter_dim=2816, moe_inter_dim=512, n_layers=10, n_dense_layers=1,
                  n_heads=8, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=128, qk_rope_head_dim=64,
                  v_head_dim=128, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
                  n_expert_groups=8, n_limited_groups=4, route_scale=1.0, max_seq_len=2048),
    # One GPU's share of V3 under expert parallelism (issue 11's FP8-against-BF16 preset): V3's widths
    # (hidden 7168, its MLA ranks and 128 heads, expert width 2048) and its per-GPU expert shapes: V3's
    # EP=32 leaves 8 of the 256 routed experts on a GPU, about 32k routed rows per step; the top-2 of
    # 8 experts over batch 8 x 2048 gives the same rows. Four blocks (one dense) with FP32 master
    # weights and AdamW states: 2.45B parameters, 39 GB of state on one H200.
    "v3-gpu": dict(vocab_size=8192, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=4, n_dense_layers=1,
                   n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                   v_head_dim=128, n_routed_experts=8, n_shared_experts=1, n_activated_experts=2,
                   n_expert_groups=1, n_limited_groups=1, route_scale=2.5, n_mtp=0, max_seq_len=4096),
    # The released shapes, for reference (config.json of each model on the Hugging Face hub).
    "v2-lite": dict(vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27, n_dense_layers=1,
                    n_heads=16, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                    v_head_dim=128, n_routed_experts=64, n_shared_experts=2, n_activated_experts=6,
                    n_expert_groups=1, n_limited_groups=1, route_scale=1.0, n_mtp=0, max_seq_len=163840,
                    rope_factor=40.0, mscale=0.707),
    "v3": dict(vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61, n_dense_layers=3,
               n_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
               v_head_dim=128, n_routed_experts=256, n_shared_experts=1, n_activated_experts=8,
               n_expert_groups=8, n_limited_groups=4, route_scale=2.5, n_mtp=1, max_seq_len=163840,
               rope_factor=40.0, mscale=1.0),
}


def preset(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    return ModelArgs.from_dict({**PRESETS[name], **overrides})


def linear_cls(args):
    """The Linear used inside the blocks, Linear(in, out, bias=False, pow2=False): BF16/FP32
    nn.Linear, or FP8Linear (3.3) when args.fp8, every one of them: FP8Linear pads a dim that is
    not whole 128-blocks (W^DKV: 576 rows at V3 shapes), as the released FP8 weights do. pow2: the
    input's FP8 scales are powers of two (3.3.3, W^O); nothing in BF16."""
    if args.fp8:
        return fp8.FP8Linear
    return lambda in_features, out_features, bias=False, pow2=False: nn.Linear(in_features, out_features, bias=bias)


# -----------------------------------------------------------------------------
# Rotary embedding on the decoupled RoPE dims, with YaRN (4.3)

def yarn_correction_range(args, dim):
    """The pair indices where YaRN's ramp starts (beta_fast) and ends (beta_slow)."""
    def pair_index(n_rotations):  # the pair that turns n_rotations times over original_seq_len
        return dim * math.log(args.original_seq_len / (n_rotations * 2 * math.pi)) / (2 * math.log(args.rope_theta))
    low = math.floor(pair_index(args.beta_fast))
    high = math.ceil(pair_index(args.beta_slow))
    return max(low, 0), min(high, dim // 2 - 1)


def rope_frequencies(args):
    """theta_i = base^(-2i/d); YaRN keeps the fast pairs, divides the slow ones by the factor s."""
    dim = args.qk_rope_head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (dim/2,)
    if args.max_seq_len > args.original_seq_len:
        low, high = yarn_correction_range(args, dim)
        ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
        freqs = freqs * (1 - ramp) + freqs / args.rope_factor * ramp  # ramp 0: keep, 1: interpolate
    return freqs


def precompute_rope(args):
    """cos and sin tables, (max_seq_len, qk_rope_head_dim/2) each, in FP32."""
    t = torch.arange(args.max_seq_len, dtype=torch.float64)
    angles = torch.outer(t, rope_frequencies(args))
    return angles.cos().float(), angles.sin().float()


def fp32_or_wider(x):
    return x if x.dtype == torch.float64 else x.float()


def apply_rope(x, cos, sin):
    """Rotate consecutive pairs (x0, x1), (x2, x3), ... as in the released weights. x: (B, T, H, R);
    cos, sin: (T, R/2), or (B, T, R/2) when each row sits at its own position (static-cache decode)."""
    x1, x2 = fp32_or_wider(x).unflatten(-1, (-1, 2)).unbind(-1)  # (B, T, H, R/2) each
    cos, sin = cos[..., None, :], sin[..., None, :]  # (T, 1, R/2) or (B, T, 1, R/2)
    return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).type_as(x)


def softmax_scale(args):
    scale = (args.qk_nope_head_dim + args.qk_rope_head_dim) ** -0.5
    if args.max_seq_len > args.original_seq_len:  # YaRN's attention temperature, on both q and k
        scale *= (0.1 * args.mscale * math.log(args.rope_factor) + 1.0) ** 2
    return scale


def sdpa(q, k, v, mask, scale):
    """softmax(q k^T * scale + mask) v; q, k: (B, H, T, d_qk), v: (B, H, S, d_v); mask None = causal."""
    if q.is_cuda:
        with torch.nn.attention.sdpa_kernel(SDPA_BACKENDS, set_priority=True):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale)


# -----------------------------------------------------------------------------
# Multi-head Latent Attention (2.1.1)

class MLA(nn.Module):
    """Multi-head Latent Attention with its pre-norm.

    Keys and values come from one compressed latent c_kv (eq. 1) plus one RoPE key shared by all
    heads (eq. 3); queries from their own latent c_q (eq. 6). Decoding caches only the normed c_kv
    and the rotated k_rope: kv_lora_rank + qk_rope_head_dim numbers per token per layer.
    """

    def __init__(self, args):
        super().__init__()
        Linear = linear_cls(args)
        self.args = args
        H, qk_head_dim = args.n_heads, args.qk_nope_head_dim + args.qk_rope_head_dim
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        if args.q_lora_rank > 0:
            self.w_dq = Linear(args.dim, args.q_lora_rank, bias=False)  # W^DQ
            self.q_norm = nn.RMSNorm(args.q_lora_rank, eps=args.norm_eps)
            self.w_uq = Linear(args.q_lora_rank, H * qk_head_dim, bias=False)  # W^UQ and W^QR, per head
        else:
            self.w_q = Linear(args.dim, H * qk_head_dim, bias=False)
        self.w_dkv = Linear(args.dim, args.kv_lora_rank + args.qk_rope_head_dim, bias=False)  # W^DKV and W^KR
        self.kv_norm = nn.RMSNorm(args.kv_lora_rank, eps=args.norm_eps)
        self.w_ukv = Linear(args.kv_lora_rank, H * (args.qk_nope_head_dim + args.v_head_dim), bias=False)  # W^UK, W^UV
        self.w_o = Linear(H * args.v_head_dim, args.dim, bias=False, pow2=True)  # W^O (3.3.3: its input has power-of-two scales)
        self.scale = softmax_scale(args)

    def down(self, x):
        """Pre-norm and down-projections: c_q (B, T, d'_c) and [c_kv, k_rope] (B, T, d_c + d^R_h)."""
        h = self.norm(x)   # in FP8 quantized once for both: one GEMM of [W^DQ; W^DKV] (fp8.linears)
        q, kv = fp8.linears(h, self.w_dq if self.args.q_lora_rank > 0 else self.w_q, self.w_dkv)
        return q, kv

    def queries(self, q, cos, sin):
        """[q^C; q^R] per head (eqs. 7-8): (B, T, H, d_h) and (B, T, H, d^R_h) rotated."""
        a = self.args
        if a.q_lora_rank > 0:
            q = self.w_uq(self.q_norm(q))
        q_nope, q_rope = q.unflatten(-1, (a.n_heads, -1)).split([a.qk_nope_head_dim, a.qk_rope_head_dim], -1)
        return q_nope, apply_rope(q_rope, cos, sin)

    def latents(self, kv, cos, sin):
        """c_kv normed (B, T, d_c) and k_rope rotated (B, T, d^R_h): what the cache holds."""
        c_kv, k_rope = kv.split([self.args.kv_lora_rank, self.args.qk_rope_head_dim], -1)
        return self.kv_norm(c_kv), apply_rope(k_rope.unsqueeze(2), cos, sin).squeeze(2)

    def attend_naive(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Up-project keys and values (eqs. 2, 4, 5) and attend: (B, T, H, d_v)."""
        a = self.args
        B, S, _ = c_kv.shape
        k_nope, v = self.w_ukv(c_kv).unflatten(-1, (a.n_heads, -1)).split([a.qk_nope_head_dim, a.v_head_dim], -1)
        q = torch.cat([q_nope, q_rope], -1)  # (B, T, H, d_h + d^R_h)
        k = torch.cat([k_nope, k_rope.unsqueeze(2).expand(B, S, a.n_heads, -1)], -1)  # (B, S, H, d_h + d^R_h)
        o = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, self.scale)  # (B, H, T, d_v)
        return o.transpose(1, 2)

    def attend_absorbed(self, q_nope, q_rope, c_kv, k_rope, mask):
        """Attend in the latent space: W^UK folds into the query, W^UV into the output. (B, T, H, d_v)."""
        a = self.args
        w_ukv = self.w_ukv.weight.unflatten(0, (a.n_heads, -1))  # (H, d_h + d_v, d_c)
        w_uk, w_uv = w_ukv.split([a.qk_nope_head_dim, a.v_head_dim], 1)
        q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w_uk.to(q_nope.dtype))  # (B, T, H, d_c)
        scores = (torch.einsum("bthc,bsc->bhts", q_latent, c_kv.to(q_latent.dtype))
                  + torch.einsum("bthr,bsr->bhts", q_rope, k_rope.to(q_rope.dtype)))
        scores = fp32_or_wider(scores) * self.scale
        if mask is None:  # causal over the whole sequence
            T, S = scores.shape[-2:]
            mask = torch.ones(T, S, dtype=torch.bool, device=scores.device).tril(S - T)
        p = scores.masked_fill(~mask, float("-inf")).softmax(-1).type_as(c_kv)  # (B, H, T, S)
        o_latent = torch.einsum("bhts,bsc->bthc", p, c_kv)  # (B, T, H, d_c)
        return torch.einsum("bthc,hdc->bthd", o_latent, w_uv.to(o_latent.dtype))

    def attend(self, q, kv, cos, sin, start_pos, cache):
        q_nope, q_rope = self.queries(q, cos, sin)
        c_kv, k_rope = self.latents(kv, cos, sin)
        if cache is None:
            return self.attend_naive(q_nope, q_rope, c_kv, k_rope, None)
        attend = self.attend_absorbed if attn_impl == "absorb" else self.attend_naive
        if torch.is_tensor(start_pos):  # per-row positions over a static cache (decode())
            return attend(q_nope, q_rope, *write_rows(cache, c_kv, k_rope, start_pos))
        B, T, _ = c_kv.shape
        end = start_pos + T
        cache["c_kv"][:B, start_pos:end] = c_kv
        cache["k_rope"][:B, start_pos:end] = k_rope
        c_kv, k_rope = cache["c_kv"][:B, :end], cache["k_rope"][:B, :end]
        mask = torch.ones(T, end, dtype=torch.bool, device=c_kv.device).tril(start_pos)  # new token t sees <= start_pos + t
        return attend(q_nope, q_rope, c_kv, k_rope, mask)

    def forward(self, x, cos, sin, start_pos=0, cache=None):
        # Recompute (3.2.3): the RMSNorm outputs are not stored, and neither are the up-projected
        # queries, keys and values; only the latents and the attention output are.
        q, kv = recompute(self.down, x, keep=MATMULS, enabled=self.args.recompute)
        o = recompute(self.attend, q, kv, cos, sin, start_pos, cache, keep=ATTENTION,
                      enabled=self.args.recompute)  # (B, T, H, d_v)
        return self.w_o(o.flatten(2))


def write_rows(cache, c_kv, k_rope, start_pos):
    """The static cache's write and read for one layer: row b's T new latents go to slots
    start_pos[b] + 0..T-1, and every one of the S slots is read, those past a row's position masked.
    Shapes never depend on the positions, so a CUDA graph can replay it. A slot past a row's position
    may hold anything (a prompt's padding, a rejected proposal): it is written before it is unmasked.
    -> c_kv (B, S, d_c), k_rope (B, S, d^R_h), mask (B, 1, T, S)."""
    B, T, _ = c_kv.shape
    S = cache["c_kv"].shape[1]
    pos = start_pos[:, None] + torch.arange(T, device=c_kv.device)  # (B, T)
    rows = torch.arange(B, device=c_kv.device)[:, None].expand(B, T)
    slots = pos.clamp(max=S - 1)  # only a finished row gets here (decode() sizes S), whose cache is done with
    cache["c_kv"][rows, slots] = c_kv.to(cache["c_kv"].dtype)
    cache["k_rope"][rows, slots] = k_rope.to(cache["k_rope"].dtype)
    mask = torch.arange(S, device=c_kv.device) <= pos[:, :, None]  # (B, T, S): token t sees slots <= its position
    return cache["c_kv"][:B], cache["k_rope"][:B], mask[:, None]


class DenseFFN(nn.Module):
    """Pre-norm and a dense SwiGLU MLP: the feed-forward of the first n_dense_layers blocks."""

    def __init__(self, args):
        super().__init__()
        self.args = args
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.mlp = MLP(args.dim, args.inter_dim, linear_cls(args))

    def forward(self, x):
        return recompute(lambda x: self.mlp(self.norm(x)), x, keep=MATMULS, enabled=self.args.recompute)


class Block(nn.Module):
    """x + MLA(norm(x)), then + FFN(norm(x)): dense for the first n_dense_layers, MoE after."""

    def __init__(self, layer_id, args):
        super().__init__()
        self.attn = MLA(args)
        self.ffn = DenseFFN(args) if layer_id < args.n_dense_layers else MoE(args, linear=linear_cls(args))
        self.ffn.layer_id = layer_id

    def forward(self, x, cos, sin, start_pos=0, cache=None):
        x = x + self.attn(x, cos, sin, start_pos, cache)
        return x + self.ffn(x)


class MTPModule(nn.Module):
    """Multi-token prediction depth k (eqs. 21-23): combine h^{k-1}_i with Emb(t_{i+k}), one block.

    The projection M_k takes [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)], embedding first, the order
    of the released weights (eq. 21 writes the two halves the other way round).
    """

    def __init__(self, layer_id, args):
        super().__init__()
        self.e_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.h_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.proj = nn.Linear(2 * args.dim, args.dim, bias=False)  # M_k
        self.block = Block(layer_id, args)  # TRM_k
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)  # before the shared output head

    def project(self, h_prev, emb):
        """M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)] (eq. 21): the input of TRM_k, (B, T-k, D)."""
        return self.proj(torch.cat([self.e_norm(emb), self.h_norm(h_prev)], -1))

    def forward(self, h_prev, emb, cos, sin, start_pos=0, cache=None):
        return self.block(self.project(h_prev, emb), cos, sin, start_pos, cache)


class Transformer(nn.Module):
    def __init__(self, args, seed=0):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(args.n_layers + k, args) for k in range(args.n_mtp))
        cos, sin = precompute_rope(args)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.init_weights(seed)

    def init_weights(self, seed=0):
        init_weights(self, self.args, seed)

    @classmethod
    def from_pretrained(cls, path, **overrides):
        return from_pretrained(path, **overrides)

    def save_pretrained(self, path, **kw):
        save_pretrained(self, path, **kw)

    def moe_layers(self):
        return [m for m in self.modules() if isinstance(m, MoE)]

    def forward(self, idx, targets=None, start_pos=0, cache=None, lam=None):
        """idx: (B, T) token ids. Returns logits (B, T, V) and, given targets (B, T), the losses:
        loss = main + lam * mean_k(MTP loss k) + balance (eq. 25, and eq. 17 summed over MoE layers).
        start_pos: where idx starts in the cache; a (B,) tensor puts each row at its own (decode())."""
        emb, h, cos, sin = self.trunk(idx, start_pos, cache)
        logits = self.head(self.norm(h))  # (B, T, V)
        if targets is None:
            return logits
        main, mtp = output_losses(logits, h, emb, targets, self.head, self.mtp, cos, sin)
        balance = balance_loss([*self.layers, *(m.block for m in self.mtp)], main)
        lam = self.args.mtp_lambda if lam is None else lam
        return logits, dict(loss=main + lam * mtp + balance, main=main, mtp=mtp, balance=balance)

    def trunk(self, idx, start_pos=0, cache=None):
        """Embeddings through the blocks: (emb, h, cos, sin), emb and h (B, T, D), h the last block's
        output before the final norm (what the head and the MTP modules read)."""
        cos, sin = self.rope(idx.shape[1], start_pos)
        emb = self.embed(idx)  # (B, T, D)
        h = emb
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, start_pos, None if cache is None else cache[i])
        return emb, h, cos, sin

    def rope(self, T, start_pos=0):
        """cos, sin at positions start_pos + 0..T-1: (T, R/2) each, or (B, T, R/2) for a (B,) tensor
        of positions. Those are not checked on the host (a CUDA graph cannot wait for it): decode()
        keeps them in range, and the one slot it may put past the end (a proposal after the last
        position, never accepted) takes the last position's angles."""
        if not torch.is_tensor(start_pos):
            if start_pos + T > self.args.max_seq_len:
                raise ValueError(f"sequence of {start_pos + T} tokens exceeds max_seq_len={self.args.max_seq_len}")
            return self.cos[start_pos:start_pos + T], self.sin[start_pos:start_pos + T]
        pos = (start_pos[:, None] + torch.arange(T, device=start_pos.device)).clamp(max=self.args.max_seq_len - 1)
        return self.cos[pos], self.sin[pos]  # (B, T, R/2)

    def new_cache(self, batch_size, max_len=None, dtype=None, device=None, mtp=False):
        """Latent KV cache: per layer the normed c_kv and the rotated k_rope, nothing else; mtp=True:
        the same for the MTP modules' blocks (one per depth), which speculative decoding runs too."""
        a, p = self.args, self.head.weight
        max_len = max_len or a.max_seq_len
        make = lambda n: torch.zeros(batch_size, max_len, n, dtype=dtype or p.dtype, device=device or p.device)  # noqa: E731
        return [dict(c_kv=make(a.kv_lora_rank), k_rope=make(a.qk_rope_head_dim))
                for _ in range(a.n_mtp if mtp else a.n_layers)]

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eot=None):
        """Yields one new token id (B,) at a time, decoding over the latent KV cache, read up to the
        position. decode() is its fixed-shape twin (static cache, per-row positions, MTP speculation)."""
        B, T = idx.shape
        cache = self.new_cache(B, min(T + max_new_tokens, self.args.max_seq_len))
        logits = self(idx, cache=cache)[:, -1]
        for pos in range(T, T + max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, top_p)  # (B,)
            yield nxt
            done = pos + 1 == T + max_new_tokens or pos == self.args.max_seq_len  # no room for it in the cache
            if done or (eot is not None and bool((nxt == eot).all())):
                return
            logits = self(nxt[:, None], start_pos=pos, cache=cache)[:, -1]


@torch.no_grad()
def init_weights(module, args, seed=0):
    """Every learnable matrix ~ N(0, init_std) (0.006 in the paper, 4.2); norms 1; biases b 0. Each
    tensor is drawn from a generator seeded by its name, so a model starts from the same weights
    whatever the layout: split into pipeline stages (dualpipe.py), on any rank, in any order."""
    for name, p in module.named_parameters():
        if p.is_meta:  # shapes only (count_params, from_pretrained): nothing to draw
            continue
        g = torch.Generator(p.device).manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if p.dim() >= 2:
            p.normal_(0.0, args.init_std, generator=g)
        else:
            p.fill_(1.0)
    for m in module.modules():
        if isinstance(m, MoE):
            m.gate.bias.zero_()


def output_losses(logits, h, emb, targets, head, mtp_modules, cos, sin):
    """(main, mtp): the cross-entropy of the main model's logits, and the mean over the MTP depths
    of theirs (eqs. 24-25). h: the last block's output (B, T, D), emb: the token embeddings."""
    T = h.shape[1]
    main = cross_entropy(logits, targets)
    mtp = []
    for k, module in enumerate(mtp_modules, start=1):
        # depth k: position i sees h^{k-1}_i and token t_{i+k}, and predicts t_{i+k+1}
        h = module(h[:, :-1], emb[:, k:], cos[:T - k], sin[:T - k])  # (B, T-k, D)
        mtp.append(cross_entropy(head(module.norm(h)), targets[:, k:]))
    return main, torch.stack(mtp).mean() if mtp else main.new_zeros(())


def cross_entropy(logits, targets):
    """The mean next-token cross-entropy of (B, T, V) logits against (B, T) targets, -1 ignored, in FP32."""
    return F.cross_entropy(fp32_or_wider(logits).flatten(0, 1), targets.flatten(), ignore_index=-1)


def balance_loss(blocks, like):
    """The sequence-wise balance loss (eq. 17) summed over the MoE layers of these blocks' last
    forward; a 0-dim tensor on like's device."""
    return sum((b.ffn.balance_loss for b in blocks if isinstance(b.ffn, MoE)), like.new_zeros(()))


def sampling_probs(logits, temperature=1.0, top_k=None, top_p=None):
    """The distribution sample_next draws from, (B, V) in FP32 or wider: softmax(logits / temperature)
    with every token outside the top k, and outside the smallest set holding top_p of the mass, at 0."""
    logits = fp32_or_wider(logits) / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) > top_p  # keep the smallest prefix with mass >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def sample_next(logits, temperature=1.0, top_k=None, top_p=None):
    """One token per row from (B, V) logits; temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(sampling_probs(logits, temperature, top_k, top_p), 1).squeeze(-1)


# -----------------------------------------------------------------------------
# Decoding over a static cache, and speculative decoding with the MTP module (5.4.3)
#
# The report keeps the MTP module for inference, to propose the token after next: with 85-90% of the
# proposals accepted, V3 decodes 1.8x the tokens per second (5.4.3). One step of decode(), with t_p
# the last token chosen (not yet in the cache) and d the MTP module's proposal for t_{p+1}:
#   1. the main model runs over [t_p, d] at positions p, p+1; its logits at p verify d, and its
#      logits at p+1 are those of the token after d;
#   2. accepted: t_{p+1} = d, and t_{p+2} is drawn from the logits at p+1: two tokens for one forward.
#      Rejected: t_{p+1} is drawn instead (speculative_token); slot p+1 of the cache holds d's latents
#      until the next step writes t_{p+1} there, before anything reads it;
#   3. the MTP module (eq. 21: [RMSNorm(Emb(t_{i+1})); RMSNorm(h_i)] into one MLA block, whose latent
#      cache is kept like the main model's) runs over positions p, p+1 with t_{p+1} and t_{p+2}; its
#      logits at p+1 (accepted) or p (rejected) give the next proposal.
# Every step has the same shapes whatever was accepted, and each row keeps its own position, so the
# rows of a batch accept different numbers of tokens and still run in lockstep; prompts of different
# lengths are right-padded the same way (a row's padding sits in slots it overwrites before reading).

class Decoder:
    """The state of a batched decode: per row its position, its last token (not yet in the cache), its
    budget, and when speculative, the MTP module's proposal and the q it was drawn from; the latent
    caches of the main model and of the MTP block (depth 1; deeper modules are not used), `slots`
    positions for each row, and the step. prefill() and step() return (tokens (B, K), counts (B,)).
    compile=True runs the model's part of each step through torch.compile, which fuses its many small
    operations (about 1,500 aten calls per step for `small`, most of them too small to keep a GPU busy
    at batch 1) into fewer kernels. cuda_graph=True captures the model's part of each step (compiled
    or not) as one CUDA graph at its first call and replays it after, so the host launches one graph
    per step instead of each kernel; sampling stays outside the graph. GPU only (the MoE layers need
    the grouped expert GEMM there: Hopper, BF16)."""

    def __init__(self, model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eot=None,
                 speculative=False, cuda_graph=False, compile=False):
        if speculative and not len(model.mtp):
            raise ValueError("speculative decoding proposes tokens with the MTP module; this model has n_mtp=0")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens}: expected at least 1")
        device = model.head.weight.device
        if cuda_graph and device.type != "cuda":
            raise ValueError(f"cuda_graph=True captures CUDA graphs; the model is on {device}")
        self.model, self.max_new_tokens, self.eot, self.speculative = model, max_new_tokens, eot, speculative
        self.top = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.idx, self.lengths = pad_prompts(prompts, device)
        B, L = len(self.idx), model.args.max_seq_len
        slots = min(int(self.lengths.max()) + max_new_tokens, L + 1)  # a running row's last proposal may sit at L
        self.cache = model.new_cache(B, slots)
        self.mtp_cache = model.new_cache(B, slots, mtp=True)[:1] if speculative else None
        self.main, self.draft = self.main_step, self.draft_step
        if compile:
            self.main, self.draft = (torch.compile(f, dynamic=False) for f in (self.main, self.draft))
        if cuda_graph:
            self.main, self.draft = graphed(self.main), graphed(self.draft)
        self.rows = torch.arange(B, device=device)
        self.counters = torch.zeros(2, dtype=torch.long, device=device)  # proposals verified, accepted

    def main_step(self, tokens, pos):
        """The main model over tokens (B, T) at positions pos[b] + 0..T-1: logits (B, T, V), h (B, T, D)."""
        m = self.model
        _, h, _, _ = m.trunk(tokens, pos, self.cache)
        return m.head(m.norm(h)), h

    def draft_step(self, h, tokens, pos):
        """MTP depth 1 at positions pos[b] + i, fed h_i (B, T, D) and t_{i+1} (B, T): the logits of t_{i+2}."""
        m, mtp = self.model, self.model.mtp[0]
        cos, sin = m.rope(tokens.shape[1], pos)
        return m.head(mtp.norm(mtp(h, m.embed(tokens), cos, sin, pos, self.mtp_cache[0])))  # (B, T, V)

    @torch.no_grad()
    def prefill(self):
        """The right-padded prompts from position 0 through the main model (and the MTP block): the
        token after each prompt, and the proposal for the one after it."""
        m, idx, last = self.model, self.idx, self.lengths - 1
        _, h, cos, sin = m.trunk(idx, 0, self.cache)  # (B, T, D)
        self.tok = sample_next(m.head(m.norm(h[self.rows, last])), **self.top)  # the token at position lengths[b]
        if self.speculative:
            nxt = idx.roll(-1, 1).scatter(1, last[:, None], self.tok[:, None])  # column i: t_{i+1}
            out = m.mtp[0](h, m.embed(nxt), cos, sin, 0, self.mtp_cache[0])  # (B, T, D)
            self.proposal, self.q = propose(m.head(m.mtp[0].norm(out[self.rows, last])), self.top)
        self.pos, self.n = self.lengths.clone(), torch.ones_like(self.lengths)  # tok's position; tokens out
        self.done = (self.n >= self.max_new_tokens) | (self.pos >= m.args.max_seq_len)
        if self.eot is not None:
            self.done |= self.tok == self.eot
        return self.tok[:, None], self.n.clone()

    @torch.no_grad()
    def step(self):
        if self.speculative:
            logits, h = self.main(torch.stack([self.tok, self.proposal], 1), self.pos)  # (B, 2, V)
            t1, accepted = verify(logits[:, 0], self.proposal, self.q, self.top)
            t2 = sample_next(logits[:, 1], **self.top)  # the token after an accepted proposal
            new = torch.stack([t1, t2], 1)  # (B, 2)
            self.proposal, self.q = propose(self.draft(h, new, self.pos)[self.rows, accepted.long()], self.top)
        else:
            logits, _ = self.main(self.tok[:, None], self.pos)  # (B, 1, V)
            new = sample_next(logits[:, 0], **self.top)[:, None]  # (B, 1)
            accepted = torch.zeros_like(self.done)
        count = self.keep(new, accepted)
        self.accepted = accepted & (count > 0)
        self.tok = torch.where(accepted, new[:, -1], new[:, 0])
        self.pos += torch.where(self.done, 0, 1 + accepted.long())  # a finished row stays where it is
        if self.speculative:
            self.counters += torch.stack([(count > 0).sum(), self.accepted.sum()])
        return new, count

    def keep(self, new, accepted):
        """How many of a step's new tokens (B, K) each row keeps: the first, and the second when the
        proposal was accepted, within its budget, up to position max_seq_len and to its first eot.
        Counts them into n and marks the rows that are done."""
        L = self.model.args.max_seq_len
        count = torch.minimum(1 + accepted.long(), torch.minimum(self.max_new_tokens - self.n, L - self.pos))
        ended = torch.zeros_like(self.done)
        if self.eot is not None:
            is_eot = new == self.eot  # (B, K)
            count = torch.where(is_eot[:, 0], count.clamp(max=1), count)
            ended = (is_eot & (torch.arange(new.shape[1], device=new.device) < count[:, None])).any(1)
        count = count.masked_fill(self.done, 0)
        self.n += count
        self.done = self.done | ended | (self.n >= self.max_new_tokens) | (self.pos + count >= L)
        return count


def graphed(step):
    """step captured as one CUDA graph at its first call, replayed at every call: the arguments are
    copied into the captured inputs and the outputs are the same tensors each time (read them before
    the next call). A warm-up run precedes the capture, so the step must be idempotent: decode's are,
    since a repeated step writes the same latents into the same slots."""
    graph, inputs, outputs = None, None, None

    def run(*args):
        nonlocal graph, inputs, outputs
        if graph is None:
            inputs = [a.clone() for a in args]
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # lazy initializations (cuBLAS workspaces) happen outside the capture
                step(*inputs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = step(*inputs)
        else:
            for static, a in zip(inputs, args):
                static.copy_(a)
        graph.replay()
        return outputs
    return run


def propose(logits, top):
    """The MTP module's proposal (B,) from its logits (B, V), and the q it was drawn from (None: greedy)."""
    if top["temperature"] == 0:
        return logits.argmax(-1), None
    q = sampling_probs(logits, **top)
    return torch.multinomial(q, 1)[:, 0], q


def verify(logits, proposal, q, top):
    """t_{p+1} (B,) from the main model's logits at p (B, V), and whether it is the proposal."""
    if top["temperature"] == 0:
        tok = logits.argmax(-1)
        return tok, tok == proposal
    return speculative_token(proposal, q, sampling_probs(logits, **top))


def speculative_token(draft, q, p):
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023): keep the draft d ~ q with
    probability min(1, p(d)/q(d)), else draw from max(0, p - q) normalized. The token is then
    distributed as p: P(x) = min(p, q)(x) + (1 - sum min(p, q)) * max(0, p - q)(x) / sum max(0, p - q),
    and sum max(0, p - q) = 1 - sum min(p, q). draft (B,), q, p (B, V) -> token (B,), accepted (B,)."""
    p_d, q_d = p.gather(1, draft[:, None])[:, 0], q.gather(1, draft[:, None])[:, 0]
    accepted = torch.rand_like(p_d) * q_d < p_d  # u < p(d)/q(d), without dividing; q(d) > 0 as d ~ q
    residual = (p - q).clamp(min=0)
    # p == q leaves no residual, and a rejection has probability 0 (rounding aside): draw from p then
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
    return torch.where(accepted, draft, torch.multinomial(residual, 1)[:, 0]), accepted


def pad_prompts(prompts, device):
    """(B, T) ids right-padded with 0 and the lengths (B,), from a (B, T) tensor or B lists of ids."""
    if torch.is_tensor(prompts):
        B, T = prompts.shape
        return prompts.to(device), torch.full((B,), T, device=device)
    lengths = [len(p) for p in prompts]
    if not lengths or min(lengths) == 0:
        raise ValueError(f"decode needs at least one prompt and a token in each; got prompt lengths {lengths}")
    idx = torch.zeros(len(prompts), max(lengths), dtype=torch.long)
    for b, p in enumerate(prompts):
        idx[b, :len(p)] = torch.as_tensor(p)
    return idx.to(device), torch.tensor(lengths, device=device)


@torch.no_grad()
def decode(model, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, eot=None,
           speculative=False, cuda_graph=False, stats=None, compile=False):
    """Batched decoding over a static latent cache, each row at its own position; speculative=True
    adds the MTP module's proposals (above). prompts: a (B, T) tensor of ids, or B lists of ids of any
    lengths. Yields (tokens (B, K), counts (B,)) per step: row b's next tokens are tokens[b, :counts[b]]
    (K = 2 for a speculative step, else 1; count 0 once a row is done). Batched speculation keeps a
    position per row, it is not limited to batch 1. A row stops after its first eot (generate stops
    once every row has one), after max_new_tokens, or with a token at position max_seq_len; greedy
    decoding (temperature 0) gives generate's tokens. stats, a dict, gets the steps taken, the
    proposals verified and those accepted. cuda_graph=True and compile=True: see Decoder."""
    dec = Decoder(model, prompts, max_new_tokens, temperature, top_k, top_p, eot, speculative, cuda_graph, compile)
    stats = {} if stats is None else stats
    stats.update(steps=0, proposed=0, accepted=0)
    yield dec.prefill()
    finished = bool(dec.done.all())
    while not finished:
        out = dec.step()
        finished, proposed, accepted = torch.cat([dec.done.all()[None], dec.counters]).tolist()  # one wait per step
        stats.update(steps=stats["steps"] + 1, proposed=proposed, accepted=accepted)
        yield out


def collect(stream):
    """decode's stream -> each row's new tokens, a list of lists of ids."""
    rows = None
    for tokens, counts in stream:
        rows = rows or [[] for _ in range(len(counts))]
        for row, ids, c in zip(rows, tokens.tolist(), counts.tolist()):
            row.extend(ids[:c])
    return rows


# -----------------------------------------------------------------------------
# Parameter counts

def count_params(args):
    """Parameters by kind, without allocating weights: total and activated per token exclude MTP."""
    with torch.device("meta"):
        model = Transformer(args)
    total = mtp = routed = 0
    for name, p in model.named_parameters():
        if name.startswith("mtp."):
            mtp += p.numel()
            continue
        total += p.numel()
        if ".experts." in name:
            routed += p.numel()
    embed = model.embed.weight.numel()
    # Activated per token: a token reads one row of the embedding table, so the table does not
    # count (the convention that gives V3 37B and V2-Lite 2.4B), and K_r of the N_r routed experts.
    activated = total - embed - routed + routed * args.n_activated_experts // args.n_routed_experts
    return dict(total=total, activated=activated, mtp=mtp, embedding=embed, output_head=model.head.weight.numel())


def flops_per_token(args, seq_len):
    """Training FLOPs per token (forward + backward = 3x forward): 6 per activated matmul weight,
    the MTP modules and their use of the output head included, plus causal attention's two GEMMs."""
    n = count_params(args)
    per_mtp = n["mtp"] / max(args.n_mtp, 1)
    mtp_routed = 3 * args.n_routed_experts * args.dim * args.moe_inter_dim  # an MTP block is always an MoE block
    mtp_active = per_mtp - mtp_routed * (1 - args.n_activated_experts / args.n_routed_experts) + n["output_head"]
    matmul = 6 * (n["activated"] + args.n_mtp * mtp_active)
    # per layer and token: q.k over (d_h + d^R_h) and p.v over d_v, for on average seq_len/2 keys
    attention = 6 * args.n_heads * (args.qk_nope_head_dim + args.qk_rope_head_dim + args.v_head_dim) * seq_len / 2
    return matmul + (args.n_layers + args.n_mtp) * attention


# -----------------------------------------------------------------------------
# Loading a Hugging Face-format DeepSeek-V3 checkpoint (config.json + *.safetensors)

# config.json key -> ModelArgs field
HF_KEYS = dict(vocab_size="vocab_size", hidden_size="dim", intermediate_size="inter_dim",
               moe_intermediate_size="moe_inter_dim", num_hidden_layers="n_layers",
               first_k_dense_replace="n_dense_layers", num_attention_heads="n_heads", q_lora_rank="q_lora_rank",
               kv_lora_rank="kv_lora_rank", qk_nope_head_dim="qk_nope_head_dim",
               qk_rope_head_dim="qk_rope_head_dim", v_head_dim="v_head_dim", n_routed_experts="n_routed_experts",
               n_shared_experts="n_shared_experts", num_experts_per_tok="n_activated_experts",
               n_group="n_expert_groups", topk_group="n_limited_groups", routed_scaling_factor="route_scale",
               num_nextn_predict_layers="n_mtp", max_position_embeddings="max_seq_len", rope_theta="rope_theta",
               rms_norm_eps="norm_eps", initializer_range="init_std")
# Keys that must hold one of these values, because that is all this model implements.
HF_FIXED = dict(hidden_act=("silu",), scoring_func=("sigmoid",), topk_method=("noaux_tc",),
                norm_topk_prob=(True,), attention_bias=(False,), moe_layer_freq=(1,), tie_word_embeddings=(False,),
                rope_interleave=(True,), mlp_bias=(False,))
# Keys that do not change the model's computation.
HF_IGNORED = {"architectures", "auto_map", "model_type", "transformers_version", "torch_dtype", "dtype",
              "bos_token_id", "eos_token_id", "pad_token_id", "use_cache", "attention_dropout",
              "quantization_config", "ep_size", "pretraining_tp", "aux_loss_alpha", "seq_aux", "initializer_range",
              "num_key_value_heads", "head_dim", "output_router_logits", "router_aux_loss_coef", "_name_or_path",
              "rope_parameters", "rope_scaling", "chunk_size_feed_forward", "output_attentions",
              "output_hidden_states", "return_dict", "id2label", "label2id", "problem_type", "tokenizer_class",
              "is_encoder_decoder", "tie_encoder_decoder", "add_cross_attention", "layer_types", "qk_head_dim"}


def args_from_hf_config(cfg, **overrides):
    """ModelArgs from a released config.json dict; an unknown key or unsupported value is an error."""
    d = {}
    for key, value in cfg.items():
        if key in HF_KEYS:
            d[HF_KEYS[key]] = value
        elif key in HF_FIXED:
            check(value in HF_FIXED[key], key, value, f"one of {HF_FIXED[key]}")
        elif key not in HF_IGNORED:
            raise ValueError(f"unknown config.json key {key!r}; known keys: {sorted({*HF_KEYS, *HF_FIXED, *HF_IGNORED})}")
    if d.get("q_lora_rank") is None:
        d["q_lora_rank"] = 0
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    if rope.get("rope_theta") is not None:
        d["rope_theta"] = rope["rope_theta"]
    rope_type = rope.get("type", rope.get("rope_type", "default"))
    check(rope_type in ("yarn", "default"), "rope_scaling.type", rope_type, "'yarn' or none")
    if rope_type == "yarn":
        d.update(original_seq_len=rope["original_max_position_embeddings"], rope_factor=rope["factor"],
                 beta_fast=rope.get("beta_fast", 32), beta_slow=rope.get("beta_slow", 1),
                 mscale=rope.get("mscale", 1.0))
        check(rope.get("mscale_all_dim", rope.get("mscale", 1.0)) == rope.get("mscale", 1.0),
              "rope_scaling.mscale_all_dim", rope.get("mscale_all_dim"), "equal to rope_scaling.mscale")
    else:
        d["original_seq_len"] = d.get("max_seq_len", 4096)
    d.setdefault("n_mtp", 0)
    d["init_std"] = ModelArgs.init_std
    d.update(overrides)
    return ModelArgs.from_dict(d)


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32}


def read_safetensors(path):
    """{name: tensor} from one .safetensors file: 8-byte header length, JSON header, raw data."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = bytearray(f.read())
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; supported: {sorted(SAFETENSORS_DTYPES)}")
        start, end = info["data_offsets"]
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        t = torch.frombuffer(data, dtype=torch.uint8, offset=start, count=end - start) if end > start else torch.empty(0, dtype=torch.uint8)
        out[name] = t.view(dtype).reshape(info["shape"]).clone()
    return out


def dequantize_fp8(w, scale_inv, block=128):
    """FP8 weight with one scale per 128x128 block (the released format) -> FP32."""
    s = scale_inv.float().repeat_interleave(block, 0)[:w.shape[0]].repeat_interleave(block, 1)[:, :w.shape[1]]
    return w.float() * s


def hf_to_ours(name, args):
    """Released key -> (our key, expert index or None). None for keys we do not use."""
    name = name.removeprefix("model.")
    renames = [("embed_tokens.", "embed."), ("lm_head.", "head."), ("self_attn.", "attn."),
               ("input_layernorm.", "attn.norm."), ("post_attention_layernorm.", "ffn.norm."),
               ("q_a_proj.", "w_dq."), ("q_a_layernorm.", "q_norm."), ("q_b_proj.", "w_uq."), ("q_proj.", "w_q."),
               ("kv_a_proj_with_mqa.", "w_dkv."), ("kv_a_layernorm.", "kv_norm."), ("kv_b_proj.", "w_ukv."),
               ("o_proj.", "w_o."), ("mlp.gate.e_score_correction_bias", "ffn.gate.bias"), ("mlp.gate.", "ffn.gate."),
               ("mlp.shared_experts.", "ffn.shared."), ("mlp.experts.", "ffn.experts."), ("mlp.", "ffn.mlp."),
               ("gate_proj.", "w1."), ("down_proj.", "w2."), ("up_proj.", "w3.")]
    if name == "norm.weight":
        return "norm.weight", None
    for old, new in renames:
        name = name.replace(old, new)
    parts = name.split(".")
    if parts[0] == "layers" and int(parts[1]) >= args.n_layers:  # the MTP modules follow the main layers
        k = int(parts[1]) - args.n_layers
        if k >= args.n_mtp:
            return None, None
        rest = ".".join(parts[2:])
        mtp_renames = {"enorm.weight": "e_norm.weight", "hnorm.weight": "h_norm.weight", "eh_proj.weight": "proj.weight",
                       "shared_head.norm.weight": "norm.weight"}
        if rest in mtp_renames:
            return f"mtp.{k}.{mtp_renames[rest]}", None
        if rest.startswith(("embed.", "shared_head.")):  # shared with the main model
            return None, None
        name = f"mtp.{k}.block.{rest}"
    if ".experts." in name:  # layers.L.ffn.experts.E.w1.weight -> layers.L.ffn.experts.w1, expert E
        head, tail = name.split(".experts.")
        e, w, _ = tail.split(".")
        return f"{head}.experts.{w}", int(e)
    return name, None


def read_checkpoint(path):
    """All tensors of a checkpoint directory's *.safetensors files, by released name."""
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {path}")
    raw = {}
    for f in files:
        raw.update(read_safetensors(os.path.join(path, f)))
    return raw


def hf_state_dict(raw, args):
    """Our state dict from released tensors, FP8 blocks dequantized, experts stacked, all FP32."""
    state, experts = {}, {}
    for name, t in raw.items():
        if name.endswith("weight_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            scale = raw.get(name + "_scale_inv")
            if scale is None:
                raise ValueError(f"FP8 tensor {name} has no {name}_scale_inv")
            t = dequantize_fp8(t, scale)
        ours, e = hf_to_ours(name, args)
        if ours is None:
            continue
        if e is None:
            state[ours] = t.float()
        else:
            experts.setdefault(ours, {})[e] = t.float()
    for name, per_expert in experts.items():
        state[name] = torch.stack([per_expert[e] for e in range(len(per_expert))])
    return state


def from_pretrained(path, **overrides):
    """A Transformer built from a Hugging Face-format DeepSeek-V3 checkpoint directory (config.json,
    *.safetensors with the released key names; BF16, FP32, or FP8 with 128x128 block scales).
    The MTP modules (layers num_hidden_layers and on) load when the checkpoint has them."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise FileNotFoundError(f"{config} not found: from_pretrained needs a directory with config.json and *.safetensors")
    with open(config) as f:
        args = args_from_hf_config(json.load(f), **overrides)
    raw = read_checkpoint(path)
    mtp_layers = {int(k.split(".")[2]) for k in raw if k.startswith("model.layers.")} - set(range(args.n_layers))
    args = ModelArgs.from_dict({**asdict(args), "n_mtp": min(args.n_mtp, len(mtp_layers))})
    with torch.device("meta"):
        model = Transformer(args)
    model.load_state_dict(hf_state_dict(raw, args), strict=True, assign=True)
    cos, sin = precompute_rope(args)
    model.cos, model.sin = cos, sin
    for moe in model.moe_layers():
        moe.load = torch.zeros(args.n_routed_experts)
        moe.last_load, moe.run_load = (torch.zeros(args.n_routed_experts, dtype=torch.int64) for _ in range(2))
    return model


# -----------------------------------------------------------------------------
# Writing a Hugging Face-format DeepSeek-V3 checkpoint: what from_pretrained reads, the other way

HF_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "head.weight": "lm_head.weight"}
HF_BLOCK = {"attn.norm": "input_layernorm", "attn.w_dq": "self_attn.q_a_proj", "attn.q_norm": "self_attn.q_a_layernorm",
            "attn.w_uq": "self_attn.q_b_proj", "attn.w_q": "self_attn.q_proj",
            "attn.w_dkv": "self_attn.kv_a_proj_with_mqa", "attn.kv_norm": "self_attn.kv_a_layernorm",
            "attn.w_ukv": "self_attn.kv_b_proj", "attn.w_o": "self_attn.o_proj", "ffn.norm": "post_attention_layernorm",
            "ffn.gate": "mlp.gate", "ffn.mlp": "mlp", "ffn.shared": "mlp.shared_experts", "ffn.experts": "mlp.experts"}
HF_MLP = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
HF_MTP = {"e_norm.weight": "enorm.weight", "h_norm.weight": "hnorm.weight", "proj.weight": "eh_proj.weight",
          "norm.weight": "shared_head.norm.weight"}


def ours_to_hf(name, args, expert=None):
    """Our state-dict key (with the expert's index for a stacked expert weight) -> the released key;
    MTP module k is layer n_layers + k, as DeepSeek releases it. hf_to_ours is its inverse."""
    if name in HF_TOP:
        return HF_TOP[name]
    group, i, rest = name.split(".", 2)  # layers.L.<block> or mtp.k.<module>
    layer = f"model.layers.{int(i) + (args.n_layers if group == 'mtp' else 0)}."
    if group == "mtp":
        if rest in HF_MTP:
            return layer + HF_MTP[rest]
        rest = rest.removeprefix("block.")
    if rest == "ffn.gate.bias":
        return layer + "mlp.gate.e_score_correction_bias"
    module, _, leaf = rest.rpartition(".")  # attn.w_dq + weight, ffn.mlp.w1 + weight, ffn.experts + w1
    if module == "ffn.experts":
        return layer + f"mlp.experts.{expert}.{HF_MLP[leaf]}.weight"
    parent, _, last = module.rpartition(".")
    if parent in ("ffn.mlp", "ffn.shared"):
        return layer + f"{HF_BLOCK[parent]}.{HF_MLP[last]}.{leaf}"
    return layer + f"{HF_BLOCK[module]}.{leaf}"


def hf_tensors(model):
    """(released name, tensor) for every weight, the expert stacks split per expert (views, no copy),
    and each MTP layer with its own copies of the shared embedding and head, as DeepSeek releases it."""
    state, args = model.state_dict(), model.args
    for name, t in state.items():
        if ".ffn.experts." in name:
            yield from ((ours_to_hf(name, args, e), t[e]) for e in range(t.shape[0]))
        else:
            yield ours_to_hf(name, args), t
    for k in range(args.n_mtp):
        yield f"model.layers.{args.n_layers + k}.embed_tokens.weight", state["embed.weight"]
        yield f"model.layers.{args.n_layers + k}.shared_head.head.weight", state["head.weight"]


def hf_config(args, bos_token_id=None, eos_token_id=None, dtype=torch.bfloat16):
    """config.json in DeepSeek-V3's schema: what args_from_hf_config reads back to these args (but
    for the training-only fields, and original_seq_len, which only matters with YaRN)."""
    cfg = {key: getattr(args, ours) for key, ours in HF_KEYS.items()}
    cfg.update(q_lora_rank=args.q_lora_rank or None, num_key_value_heads=args.n_heads, moe_layer_freq=1, ep_size=1,
               hidden_act="silu", scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
               attention_bias=False, attention_dropout=0.0, tie_word_embeddings=False, use_cache=True,
               architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
               torch_dtype=str(dtype).removeprefix("torch."), bos_token_id=bos_token_id, eos_token_id=eos_token_id,
               rope_scaling=None)
    if args.max_seq_len > args.original_seq_len:  # YaRN is on (rope_frequencies, softmax_scale)
        cfg["rope_scaling"] = dict(type="yarn", factor=args.rope_factor, original_max_position_embeddings=args.original_seq_len,
                                   beta_fast=args.beta_fast, beta_slow=args.beta_slow, mscale=args.mscale,
                                   mscale_all_dim=args.mscale)
    return cfg


SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(path, tensors):
    """{name: tensor} -> one .safetensors file, the layout read_safetensors reads (8-byte header
    length, JSON header padded to 8 bytes, raw little-endian data), written to a temporary name first."""
    header, offset = {}, 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        header[name] = dict(dtype=SAFETENSORS_NAMES[t.dtype], shape=list(t.shape), data_offsets=[offset, offset + n])
        offset += n
    header["__metadata__"] = dict(format="pt")
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for t in tensors.values():
            f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    os.replace(path + ".tmp", path)


def save_pretrained(model, path, dtype=torch.bfloat16, max_shard_bytes=5 * 10**9, bos_token_id=None, eos_token_id=None):
    """Write the model as a Hugging Face-format DeepSeek-V3 checkpoint directory: config.json and the
    weights under the released names in `dtype` (the router's bias b stays FP32: rounding it would
    change which experts are chosen), in one model.safetensors or, past max_shard_bytes, in shards
    model-0000i-of-0000n.safetensors named by model.safetensors.index.json. transformers'
    DeepseekV3ForCausalLM and from_pretrained load it; the tokenizer is data.save_hf_tokenizer's."""
    os.makedirs(path, exist_ok=True)
    cast = lambda name, t: t if name.endswith("e_score_correction_bias") else t.to(dtype)  # noqa: E731
    shards, size, total = [[]], 0, 0
    for name, t in hf_tensors(model):
        n = t.numel() * (t.element_size() if name.endswith("e_score_correction_bias") else dtype.itemsize)
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size, total = size + n, total + n
    files = ["model.safetensors"] if len(shards) == 1 else \
        [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for file, shard in zip(files, shards):  # one shard's copies in dtype in memory at a time
        write_safetensors(os.path.join(path, file), {name: cast(name, t) for name, t in shard})
    if len(shards) > 1:
        index = dict(metadata=dict(total_size=total), weight_map={n: f for f, s in zip(files, shards) for n, _ in s})
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=1)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config(model.args, bos_token_id, eos_token_id, dtype), f, indent=1)


# -----------------------------------------------------------------------------
# What pre-training costs: the report's 2.664M H800 GPU-hours for 14.8T tokens (table 1), checked

H800_BF16_FLOPS = 989.5e12   # dense BF16 tensor-core rate; the H800 has the H100 SXM's compute
H800_FP8_FLOPS = 1979e12     # dense FP8
V3_GPU_HOURS, V3_TOKENS = 2.664e6, 14.8e12  # pre-training only, as the report counts it
# MFU of this project's BF16 step at V3's per-GPU widths on one H200 (same compute as the H800), with
# no communication, so an upper bound for a cluster: README, Results, `python bench.py step
# --preset=v3-gpu --batch_size=8 --seq_len=2048`, 2026-12-02, commit 490bb94 (small's narrow GEMMs: 28.7%)
MEASURED_MFU = 0.510


def training_cost(args, tokens, mfu=MEASURED_MFU, seq_len=4096, gpu_hours=V3_GPU_HOURS):
    """flops_per_token at seq_len (the report's 4K pre-training context), the total for `tokens`, the
    MFU that `gpu_hours` imply against the H800's BF16 and FP8 rates, and the GPU-hours at `mfu`
    (of the BF16 rate, as this project measures MFU)."""
    per_token = flops_per_token(args, seq_len)
    total = per_token * tokens
    seconds = gpu_hours * 3600
    return dict(flops_per_token=per_token, total_flops=total, mfu_bf16=total / (seconds * H800_BF16_FLOPS),
                mfu_fp8=total / (seconds * H800_FP8_FLOPS), gpu_hours_at_mfu=total / (mfu * H800_BF16_FLOPS) / 3600)


def main(argv):
    """python model.py [preset] [--tokens=N] [--mfu=F]: the preset's settings, parameter counts and
    training cost."""
    usage = (f"usage: python model.py [preset] [--tokens=N] [--mfu=F]: a preset's settings, parameter counts and "
             f"training cost; presets: {', '.join(PRESETS)}")
    name, opts = "nano", dict(tokens=V3_TOKENS, mfu=MEASURED_MFU)
    for arg in argv:
        key, eq, text = arg.removeprefix("--").partition("=")
        if arg.startswith("--") and key in opts and eq:
            try:
                opts[key] = float(text)
            except ValueError:
                raise SystemExit(f"--{key}={text}: expected a number") from None
            if not (opts[key] > 0 and (key != "mfu" or opts[key] <= 1)):
                raise SystemExit(f"--{key}={text}: expected " + ("a fraction in (0, 1]" if key == "mfu" else "above 0"))
        elif arg in PRESETS:
            name = arg
        else:
            raise SystemExit(usage)
    args = preset(name)
    print(f"preset {name}: " + ", ".join(f"{k}={v}" for k, v in asdict(args).items()))
    notes = dict(total="all parameters of the main model; the MTP module is counted apart, below",
                 activated="per token: the embedding table and the unchosen routed experts excluded",
                 mtp=f"the {args.n_mtp} MTP module(s), which share the embedding and output head")
    for k, v in count_params(args).items():
        print(f"{k:>12}: {v:>16,} ({v / 1e9:.2f}B)" + (f"  {notes[k]}" if k in notes else ""))
    tokens, mfu = opts["tokens"], opts["mfu"]
    cost = training_cost(args, tokens, mfu)
    print(f"training FLOPs per token: {cost['flops_per_token']:.4g} (6 per activated matmul weight, MTP included, "
          f"plus causal attention at 4K context; train.py's MFU formula)")
    print(f"for {tokens:.4g} tokens: {cost['total_flops']:.4g} FLOPs")
    if name == "v3" and tokens == V3_TOKENS:  # the report's hours are for v3's pre-training
        print(f"the report's {V3_GPU_HOURS / 1e6:.3f}M H800 GPU-hours for {tokens:.4g} tokens mean a sustained MFU of "
              f"{cost['mfu_bf16']:.1%} of the dense BF16 rate ({H800_BF16_FLOPS / 1e12:g} TFLOP/s), "
              f"{cost['mfu_fp8']:.1%} of the FP8 rate ({H800_FP8_FLOPS / 1e12:g} TFLOP/s)")
    source = " (this project's: bench.py step, v3-gpu, one H200, no communication; README's Results)" \
        if mfu == MEASURED_MFU else ""
    hours = cost["gpu_hours_at_mfu"]
    print(f"at MFU {mfu:.1%} of BF16{source}: {hours:,.0f} H800 GPU-hours ({hours / 1e6:.3f}M)")


if __name__ == "__main__":
    import sys
    main(sys.argv[1:])

"""
Fine-grained FP8 training, as DeepSeek-V3 does it (arXiv 2412.19437, section 3.3 and Appendix B).

Read this file top to bottom: the format, the scales, the GEMM with promotion, why promotion is
needed (an emulated tensor core), the custom ops torch.compile sees, then the Linear layer whose
three GEMMs all run in FP8, and the routed experts' grouped version.

The format (3.3.2, "Mantissa over Exponents")
=============================================
float8_e4m3fn: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits, no infinities.
  largest finite value 448, smallest normal 2^-6, subnormals down to 2^-9.
  Between two powers of two there are only 8 values, so rounding to nearest moves a normal number
  by at most 2^-4 = 6.25% of itself. The other format, E5M2, trades a mantissa bit for range;
  DeepSeek-V3 uses E4M3 for every tensor (activations, weights and gradients alike) and gets the
  range back from scales instead.

Scales, and why they are fine-grained (3.3.2, "Fine-Grained Quantization")
==========================================================================
A tensor is stored as x_fp8 = x / s with s = max|x| / 448 (FP32), so the largest element lands on
448 and x ~= x_fp8 * s (computed as x * (1/s): one division a tile, not one an element). With
one s for the whole tensor, a single outlier (LLM activations have channels 100x larger than the
rest) sets s, and every ordinary element is pushed down into the subnormals or to zero. The fix
is many scales, each over a small group:
  - activations: one scale per token per 128 channels, 1x128 tiles. Outliers then only hurt the
    127 neighbours that share their tile.
  - weights: one scale per 128x128 block. Weights are smooth enough for that, and a square block
    stays a block when the matrix is transposed: the backward pass multiplies by W^T and uses the
    very same FP8 bytes and scales, transposed, with no second quantization.
  - the 128 of the tiles is also the K-interval of the promotion below: inside one K-block both
    operands have constant scales, so the tensor cores can multiply raw FP8 values and the scales
    are applied once per block.
Scales are FP32 here. Some are rounded up to a power of two (3.3.3: "round scaled"), because of
what that buys: E4M3 values times a power of two are one 3-bit-mantissa grid, whatever the power.
A tensor quantized in 1x128 tiles with such scales can be re-tiled (to 128x1 tiles, for a Wgrad)
by dequantizing and quantizing again with no new rounding: every value is already on the new
tile's grid (only an element that falls into the new tile's subnormals, below 2^-6 of its scale,
can lose bits). With plain scales the second quantization rounds again: the re-tiled copy is
then measurably worse than quantizing the BF16 tensor in 128x1 tiles directly (tests/test_fp8.py
measures it). The paper rounds the scales of the tensors that are re-tiled or travel: the input of
the Linear after attention (W^O), the input of the MoE up-projections (it is dispatched in FP8,
comm.py) and the activation gradient before the MoE down-projections. Here those three always
have power-of-two scales; pow2_scales=True rounds every other scale too.

Promotion to FP32 (3.3.2, "Increasing Accumulation Precision")
===============================================================
An FP8 GEMM on Hopper's tensor cores (WGMMA) keeps its running sum with only about 14 significant
bits, not FP32's 24. Over K = 4096 the lost low bits add up: the paper measured relative errors of
nearly 2%. DeepSeek-V3 therefore lets the tensor cores sum one K-block of 128 (four WGMMAs), moves
that partial result to FP32 registers on the CUDA cores, multiplies it by the block's two scales
(activation tile scale x weight block scale) and adds it to an FP32 accumulator:

    acc_fp32 += (A_blk @ B_blk^T) * s_a[:, k] * s_b[:, k]     for each K-block k of 128

fp8_gemm below does exactly this (a Triton kernel; a plain-torch loop as its twin). The section
"Why promotion" emulates a 14-bit accumulator to show the error it removes.

The Linear layer (3.3.1, Figure 6) and low-precision storage (3.3.3)
====================================================================
y = x W^T has three GEMMs, and all three take FP8 inputs and produce BF16/FP32 outputs:
    Fprop  y  = x  W^T     x in 1x128 tiles (over K), W in 128x128 blocks
    Dgrad  dx = dy W       dy in 1x128 tiles (over N), W^T: the same blocks, transposed
    Wgrad  dW = dy^T x     contraction over tokens, so dy^T and x^T are tiled 1x128 along the
                           token dimension (128x1 tiles of dy and x)
The input x is saved for the backward pass in FP8 with its scales (3.3.3: "cache the activations
in FP8"), half the bytes of BF16. The paper caches the 1x128 tiles and re-tiles them along tokens
for Wgrad (lossless where the scales are powers of two, see above); FP8Linear instead quantizes x
in both tilings from one read in the forward (act_quant_dual), feeds Fprop the 1x128 tiles and
keeps the 128x1 ones: as many bytes, one pass over x fewer, and Wgrad's x rounded once from BF16.
W^O's input keeps the paper's power-of-two scales all the same. Master weights, weight gradients
and optimizer states stay in FP32/BF16 as the model holds them: FP8 is a property of the GEMMs
only. A dimension that is not a whole number of 128-blocks (W^DKV's 576 = 512 + 64 rows at V3
shapes) is zero-padded to whole blocks inside the GEMMs, as the released FP8 weights pad it (576
rows, 5 block scales): zeros change no block's max|x| and add nothing to a dot product.

The routed experts (3.3.3) run w2(silu(w1 x) * w3 x) with all nine GEMMs in FP8: x is quantized
once for both up-projections, which run as one GEMM of [w1; w3]; the SwiGLU's inputs w1 x and w3 x
are cached in FP8 and its output is recomputed from them in backward, for w2's Wgrad; the gradient
arriving at w2 is quantized once and serves w2's Dgrad and (re-tiled, losslessly) its Wgrad.
The SwiGLU is fused with the quantizations around it (swiglu_quant, swiglu_backward): each of its
kernels reads its inputs once and writes FP8, where the separate steps wrote and read BF16/FP32
intermediates (on the H200, 3.9x and 6.6x faster than those steps run one by one; README, FP8).

What stays in BF16/FP32 (3.3.1): the embedding, the output head, the MoE router (gating), the
normalizations, and the attention core (softmax(QK^T)V). FP8Linear is for the Linear layers
inside the blocks: attention projections, dense MLPs, shared and routed experts.

Paths, and the switches that pick them
======================================
gemm_impl  = "auto" | "triton" | "scaled_mm" | "torch"    (like gemm_impl in DeepSeek's model.py)
quant_impl = "auto" | "triton" | "torch"
  triton:    our kernels (GPU; on the CPU through TRITON_INTERPRET=1).
  scaled_mm: torch._scaled_mm, which reaches cuBLAS's blockwise FP8 GEMM (1x128 x 128x128 and
             1x128 x 1x128) on Hopper. It also promotes per 128 in K.
  torch:     plain torch, the reference twin and the CPU path: quantize and dequantize exactly as
             the GPU does, multiply each 128-deep K-block in FP32 and promote. On the CPU FP8Linear
             runs this emulated path, so tests and `--fp8=True` work there too, slowly.
  auto:      scaled_mm on CUDA where cuBLAS takes the shapes, else triton; torch on the CPU.
             bench.py fp8 times both: on the H200 cuBLAS ran 1.06-1.28 PFLOP/s on DeepSeek-V3's
             shapes, our Triton kernel 0.63-0.69, BF16 0.69-0.74, hence the default.
grouped_impl = "auto" | "triton" | "loop" picks the routed experts' GEMMs (section 6).

torch.compile (section 4)
========================
Every quantization and GEMM step is a torch.library custom op (torch.ops.fp8.*) with a fake
implementation that gives its output shapes, and FP8Linear and the experts are autograd.Functions
over those ops. torch.compile therefore keeps each step as one opaque node of a whole graph, with
no graph break inside a block, and traces the Functions' backward too. The data-dependent work
stays on the device: the grouped GEMMs take the experts' row ends (offs) as a device tensor and
build their tile tables from it there, over a bound that depends on the shapes alone (M tokens,
E experts), so every output shape and launch grid is fixed and nothing waits for the counts on the
host: the grouped ops do not stand in the way of CUDA graphs (`bench.py step --fp8=1 --graphs=1`
replays the FP8 `small` step as CUDA graphs, 95% GPU busy on the H200; README, FP8).
Selective recomputation (moe.recompute, keep=moe.MATMULS) keeps the FP8 GEMM outputs as it keeps
BF16 ones: MATMULS lists FPROP_OPS.

Simplified here: every FP8 tensor is E4M3 with FP32 scales (no E5M6 for the attention output's
cached input, no BF16 optimizer moments; FP8 dispatch traffic is comm.py's); the routed experts'
GEMMs are a grouped Triton kernel (which launches tiles for the worst case of the row counts and
lets the unused ones return at once) or a loop over experts (the reference: it reads the counts on
the host); their dimensions must be multiples of 128 (FP8Linear pads its own).
"""

import functools
import math
import os
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor
    HAS_TRITON = True
except ImportError:  # a CPU-only install: the torch paths below still work
    HAS_TRITON = False


def _use_torch_ptxas():
    """Let Triton assemble with the ptxas that comes with torch's CUDA build (torch/bin/ptxas, CUDA
    13.0 with torch 2.11+cu130) instead of its own (12.8 with Triton 3.6), as torch.compile does for
    its kernels when it compiles them in this process (torch._inductor's _set_triton_ptxas_path):
    every Triton kernel of the process is then built by the same assembler, whoever compiles first.
    Triton's ptxas 12.8 miscompiles weight_quant's one-read W^T store (triton-lang/triton#11111;
    measured on the H200, 2026-12-02: 25-37% of W^T's bytes wrong, none with 13.0). A path the
    user set (TRITON_PTXAS_PATH) is left alone."""
    ptxas = os.path.join(os.path.dirname(torch.__file__), "bin", "ptxas")
    if "TRITON_PTXAS_PATH" not in os.environ and os.path.isfile(ptxas) and os.access(ptxas, os.X_OK):
        os.environ["TRITON_PTXAS_PATH"] = ptxas


if HAS_TRITON:
    _use_torch_ptxas()

gemm_impl = "auto"    # "auto" | "triton" | "scaled_mm" | "torch"
quant_impl = "auto"   # "auto" | "triton" | "torch"
pow2_scales = False   # True: every scale a power of two; False: those 3.3.3 names only (see above)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0       # largest finite E4M3 value
BLOCK = 128           # tile length along K, and the promotion interval
EPS = 1e-12           # floor on max|x|: an all-zero tile gets a tiny scale, not 0/0
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _check_multiple(n, what, block_size=BLOCK):
    if n % block_size:
        raise ValueError(f"fp8: {what} = {n} is not a multiple of {block_size}; the FP8 tiles and "
                         f"blocks are {block_size} long, so pad the dimension or use a plain Linear")


def _use_triton(x, impl):
    if impl == "auto":
        return x.is_cuda and HAS_TRITON
    if impl == "triton" and not HAS_TRITON:
        raise RuntimeError("fp8: Triton is not installed; use the 'torch' path")
    return impl == "triton"

# -----------------------------------------------------------------------------
# 1. Quantization: 1x128 tiles for activations, 128x128 blocks for weights (3.3.2)


def _scale_from_amax(amax, pow2=False):
    amax = amax.float().clamp(min=EPS)
    s = amax / torch.full_like(amax, FP8_MAX)   # a tensor divisor: CUDA turns "/ scalar" into "* (1/scalar)"
    if pow2:  # round up to a power of two: add a mantissa's worth, keep the exponent bits
        s = ((s.view(torch.int32) + 0x7FFFFF) & 0x7F800000).view(torch.float32)
    return s


def _inverse(s):
    """1/s, rounded once (IEEE): x_fp8 = x * (1/s), one multiply an element, as the kernels do. It
    can differ from x / s in the last FP32 bit, so rarely in an FP8 rounding; with a power-of-two s
    the two are the same number."""
    return torch.ones_like(s) / s


def act_quant_ref(x, block_size=BLOCK, pow2=False):
    """Plain torch: 1x128 tiles along the last dim. Returns x_fp8 (..., K) and s (..., K/128)."""
    _check_multiple(x.shape[-1], "last dim of the activation", block_size)
    xb = x.float().contiguous().unflatten(-1, (-1, block_size))    # (..., K/128, 128)
    s = _scale_from_amax(xb.abs().amax(-1), pow2)                  # (..., K/128)
    x_fp8 = (xb * _inverse(s)[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return x_fp8.flatten(-2), s                                    # (..., K)


def weight_quant_ref(w, block_size=BLOCK, pow2=False):
    """Plain torch: 128x128 blocks. w (..., N, K) -> w_fp8 (..., N, K), s (..., N/128, K/128)."""
    N, K = w.shape[-2:]
    _check_multiple(N, "weight rows (out_features)", block_size)
    _check_multiple(K, "weight columns (in_features)", block_size)
    wb = w.float().unflatten(-1, (-1, block_size)).unflatten(-3, (-1, block_size))  # (.., N/128, 128, K/128, 128)
    s = _scale_from_amax(wb.abs().amax(dim=(-3, -1)), pow2)        # (..., N/128, K/128)
    w_fp8 = (wb * _inverse(s)[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return w_fp8.flatten(-4, -3).flatten(-2), s                    # (..., N, K)


def act_dequant(x_fp8, s, block_size=BLOCK):
    return (x_fp8.float().unflatten(-1, (-1, block_size)) * s[..., None]).flatten(-2)


def weight_dequant(w_fp8, s, block_size=BLOCK):
    return w_fp8.float() * s.repeat_interleave(block_size, -2).repeat_interleave(block_size, -1)


def act_quant_t_ref(x, x_s=None, block_size=BLOCK, pow2=False):
    """128x1 tiles: x (M, K) -> x^T quantized along tokens, (K, Mp) and scales (K, Mp/128).
    The token count is zero-padded to Mp, a multiple of 128 (zeros add nothing to dy^T x).
    With x_s, x is an FP8 tensor in 1x128 tiles that is dequantized first (the FP8 cache)."""
    x = x.float() if x_s is None else act_dequant(x, x_s, block_size)
    M = x.shape[0]
    x = F.pad(x, (0, 0, 0, -M % block_size))                       # (Mp, K)
    return act_quant_ref(x.t(), block_size, pow2)                  # (K, Mp), (K, Mp/128)


if HAS_TRITON:
    @triton.jit
    def _scale_of(amax, POW2: tl.constexpr):
        s = tl.math.div_rn(tl.maximum(amax, 1e-12), 448.0)     # IEEE division, same bits as torch
        if POW2:
            s = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
        return s

    @triton.jit
    def _scaled(x, s, POW2: tl.constexpr):
        # x * (1/s), as the plain twin computes it: one IEEE division a tile, one multiply an
        # element (a division per element made the quantizers issue-bound: 11 of the 30 SASS
        # instructions an element of act_quant_t were the IEEE division's). No clamp to 448: the
        # tile's largest |x| times 1/s is at most 448 (1 + 2^-22), which rounds to 448.
        if POW2:  # s = 2^e exactly, and 1/s = 2^-e is its exponent bits subtracted: (254 << 23) - bits(s)
            # (max 0: for s = inf, from an inf in x, 1/s = 0 as torch has it)
            inv = tl.maximum((254 << 23) - s.to(tl.int32, bitcast=True), 0).to(tl.float32, bitcast=True)
            return x * inv
        return x * tl.math.div_rn(1.0, s)

    @triton.jit
    def _store_quant_rows(x, y_ptrs, s_ptrs, mask_m, POW2: tl.constexpr):
        # x (rows, 128) in FP32 stored as 1x128 tiles: one scale a row (rows outside mask_m skipped)
        s = _scale_of(tl.max(tl.abs(x), axis=1), POW2)
        tl.store(y_ptrs, _scaled(x, s[:, None], POW2).to(y_ptrs.dtype.element_ty), mask=mask_m[:, None])
        tl.store(s_ptrs, s, mask=mask_m)

    @triton.jit
    def _store_quant_cols(x, y_ptrs, s_ptrs, POW2: tl.constexpr):
        # x (128 tokens, channels) in FP32 stored as 128x1 tiles: one scale a channel; y_ptrs point
        # into the transposed output, (channels, tokens)
        s = _scale_of(tl.max(tl.abs(x), axis=0), POW2)
        tl.store(y_ptrs, _scaled(x, s[None, :], POW2).to(y_ptrs.dtype.element_ty))
        tl.store(s_ptrs, s)

    def _tuned(configs, key):
        """Autotune on the GPU; under the interpreter (which cannot time kernels) take the first."""
        return triton.autotune(configs=configs[:1] if INTERPRET else configs, key=key)

    @_tuned([triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in ((64, 4), (32, 4), (128, 8), (64, 8))],
            key=["stride_xm"])
    @triton.jit
    def _act_quant_kernel(x_ptr, y_ptr, s_ptr, M, stride_xm, stride_ym, stride_sm, stride_sk,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, POW2: tl.constexpr):
        # one program: BLOCK_M rows x one 128-wide tile
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        _store_quant_rows(x.to(tl.float32), y_ptr + offs_m[:, None] * stride_ym + offs_k[None, :],
                          s_ptr + offs_m * stride_sm + pid_k * stride_sk, mask_m, POW2)

    @triton.jit
    def _weight_quant_kernel(w_ptr, y_ptr, s_ptr, yT_ptr, NB, stride_we, stride_wn, stride_wk, stride_ye, stride_yn,
                             stride_se, stride_sn, stride_sk, stride_yTe, stride_yTk, BLOCK_K: tl.constexpr,
                             POW2: tl.constexpr, TRANSPOSED: tl.constexpr, BYTES: tl.constexpr):
        # one program: one 128x128 block of matrix e = pid_n // NB (NB: row blocks per matrix), read
        # once; its FP8 values go to y, and with TRANSPOSED to yT at the transposed addresses too
        # (W^T for Dgrad: the same bytes, its scales s^T). BYTES: y and yT are uint8 views of FP8
        # tensors and the kernel stores the FP8 bits as bytes, the form that came out right on the
        # H200 with ptxas 13.0; with Triton's ptxas 12.8 the transposed store is wrong whether it
        # stores FP8 or bytes (triton-lang/triton#11111), so TRANSPOSED waits for one_read_transpose.
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        e, nb = pid_n // NB, pid_n % NB
        offs_n = nb * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        w = tl.load(w_ptr + e * stride_we + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk).to(tl.float32)
        s = _scale_of(tl.max(tl.max(tl.abs(w), axis=1), axis=0), POW2)
        y = _scaled(w, s, POW2)
        if BYTES:
            y = y.to(tl.float8e4nv).to(tl.uint8, bitcast=True)
        else:  # FP32 (the interpreter's check) or any other dtype y_ptr holds
            y = y.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + e * stride_ye + offs_n[:, None] * stride_yn + offs_k[None, :], y)
        if TRANSPOSED:
            tl.store(yT_ptr + e * stride_yTe + offs_k[None, :] * stride_yTk + offs_n[:, None], y)
        tl.store(s_ptr + e * stride_se + nb * stride_sn + pid_k * stride_sk, s)

    @_tuned([triton.Config({"BLOCK_K": bk}, num_warps=w) for bk, w in ((64, 4), (128, 8), (128, 4), (32, 4))],
            key=["stride_xm", "HAS_XS"])
    @triton.jit
    def _act_quant_t_kernel(x_ptr, xs_ptr, y_ptr, s_ptr, rows_ptr, M, stride_xm, stride_xsm, stride_xsk,
                            stride_yk, stride_smb, HAS_XS: tl.constexpr, GROUPED: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, QBLOCK: tl.constexpr,
                            POW2: tl.constexpr):
        # one program: 128 tokens x BLOCK_K channels, quantized per channel over the 128 tokens,
        # written transposed: y[k, m]. Rows past the end read as 0 and become the zero padding.
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        if GROUPED:  # rows (2, blocks): first and end source row of each block (groups padded apart)
            row0 = tl.load(rows_ptr + pid_m)
            row_end = tl.load(rows_ptr + tl.num_programs(0) + pid_m)
        else:
            row0, row_end = pid_m * BLOCK_M, M
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_m = offs_m < row_end
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        x = x.to(tl.float32)
        if HAS_XS:  # dequantize the cached 1x128 FP8 tiles (BLOCK_K divides QBLOCK: one scale a row)
            xs = tl.load(xs_ptr + offs_m * stride_xsm + (pid_k * BLOCK_K // QBLOCK) * stride_xsk,
                         mask=mask_m, other=0.0)
            x = x * xs[:, None]
        offs_out = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        _store_quant_cols(x, y_ptr + offs_k[None, :] * stride_yk + offs_out[:, None], s_ptr + pid_m * stride_smb + offs_k,
                          POW2)

    @_tuned([triton.Config({}, num_warps=w) for w in (8, 4, 16)], key=["stride_xm"])
    @triton.jit
    def _act_quant_dual_kernel(x_ptr, y_ptr, s_ptr, yT_ptr, sT_ptr, M, stride_xm, stride_ym, stride_sm, stride_sk,
                               stride_yTk, stride_sTmb, BLOCK: tl.constexpr, POW2: tl.constexpr):
        # one program: one 128 x 128 block of x, read once and stored in both tilings: 1x128 tiles
        # (a scale per token) to y, 128x1 tiles (a scale per channel) transposed to yT. Tokens past
        # M read as 0: y skips them, yT gets them as its zero padding.
        pid_m, pid_k = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK + tl.arange(0, BLOCK)
        offs_k = pid_k * BLOCK + tl.arange(0, BLOCK)
        mask_m = offs_m < M
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        x = x.to(tl.float32)
        _store_quant_rows(x, y_ptr + offs_m[:, None] * stride_ym + offs_k[None, :],
                          s_ptr + offs_m * stride_sm + pid_k * stride_sk, mask_m, POW2)
        _store_quant_cols(x, yT_ptr + offs_k[None, :] * stride_yTk + offs_m[:, None],
                          sT_ptr + pid_m * stride_sTmb + offs_k, POW2)


def _mmajor_empty(M, KB, device):
    """Scales (M, KB) stored M-major, the layout cuBLAS's 1x128 scaling reads."""
    return torch.empty(KB, M, dtype=torch.float32, device=device).t()


def act_quant(x, block_size=BLOCK, pow2=False, out_dtype=FP8):
    """1x128 tiles along the last dim: x (..., K) -> x_fp8 (..., K), s (..., K/128) in FP32,
    with s = max|x|/448 per tile and x_fp8 = x / s. out_dtype=float32 keeps x/s unrounded (used
    to check the kernel under the Triton interpreter, whose FP8 cast is not exact)."""
    if not _use_triton(x, quant_impl):
        y, s = act_quant_ref(x, block_size, pow2)
        return y.to(out_dtype) if out_dtype != FP8 else y, s
    K = x.shape[-1]
    _check_multiple(K, "last dim of the activation", block_size)
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    y = torch.empty(M, K, dtype=out_dtype, device=x.device)
    s = _mmajor_empty(M, K // block_size, x.device)                # (M, K/128), M-major
    if M == 0:
        return y.view(x.shape), s.view(*x.shape[:-1], K // block_size)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), K // block_size)
    _act_quant_kernel[grid](x2, y, s, M, x2.stride(0), y.stride(0), s.stride(0), s.stride(1),
                            BLOCK_K=block_size, POW2=pow2)
    return y.view(x.shape), s.view(*x.shape[:-1], K // block_size)


@functools.cache
def one_read_transpose():
    """Whether weight_quant may store W and W^T from one read of w: under the interpreter, or where
    Triton assembles with ptxas 13 or newer (see _use_torch_ptxas; the one read saved 41% of the
    pair's time on the H200: 200 against 338 us for 7168x18432, bench.py fp8)."""
    if INTERPRET:
        return True
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        major, minor = torch.cuda.get_device_capability()
        return int(get_ptxas(10 * major + minor).version.split(".")[0]) >= 13
    except (ImportError, RuntimeError, ValueError, AttributeError):
        return False


def weight_quant(w, block_size=BLOCK, pow2=False, out_dtype=FP8, transposed=False):
    """128x128 blocks: w (..., N, K) -> w_fp8 (..., N, K), s (..., N/128, K/128) in FP32.
    transposed=True also returns w_fp8^T (..., K, N) contiguous, for Dgrad (its scales: s^T).
    w may be a list of weights (..., N_i, K), alike but for N_i: they are quantized as their
    concatenation along N (the routed experts' w1 and w3, one GEMM), which the kernel writes piece
    by piece without a copy of w; every N_i is a multiple of 128, so no block holds two of them."""
    ws = list(w) if isinstance(w, (list, tuple)) else [w]
    if not _use_triton(ws[0], quant_impl):
        y, s = weight_quant_ref(torch.cat(ws, -2) if len(ws) > 1 else ws[0], block_size, pow2)
        y = y.to(out_dtype) if out_dtype != FP8 else y
        return (y, s, y.transpose(-2, -1).contiguous()) if transposed else (y, s)
    lead, K = ws[0].shape[:-2], ws[0].shape[-1]
    for wi in ws:
        if wi.shape[:-2] != lead or wi.shape[-1] != K:
            raise ValueError(f"fp8.weight_quant: weights {[tuple(t.shape) for t in ws]} differ in more than N")
        _check_multiple(wi.shape[-2], "weight rows (out_features)", block_size)
    _check_multiple(K, "weight columns (in_features)", block_size)
    N, E = sum(wi.shape[-2] for wi in ws), math.prod(lead)
    y = torch.empty(E, N, K, dtype=out_dtype, device=ws[0].device)
    s = torch.empty(E, N // block_size, K // block_size, dtype=torch.float32, device=y.device)
    # W^T for Dgrad from the same read of w: each block is stored twice, as y and at the transposed
    # addresses of yT. It replaces reading w a second time through its transposed strides (338 us for
    # 7168x18432 on the H200, bench.py fp8) and, before that, torch's copy of y's transpose (801 us).
    # Where the assembler would get that store wrong (one_read_transpose), w is read a second time
    # through its transposed strides instead: the same block, so the same scale and the same bytes.
    yT = torch.empty(E, K, N, dtype=out_dtype, device=y.device) if transposed else None
    as_bytes = out_dtype == FP8
    view = lambda t: t.view(torch.uint8) if as_bytes else t  # noqa: E731

    def launch(src, dst, dst_s, dstT=None):  # src (E, R, C), any strides -> dst (E, R, C), rows of stride(1)
        R, C = src.shape[-2:]
        T = dst if dstT is None else dstT
        _weight_quant_kernel[(E * (R // block_size), C // block_size)](
            src, dst, dst_s, T, R // block_size, *src.stride(), dst.stride(0), dst.stride(1), *dst_s.stride(),
            T.stride(0), T.stride(1), BLOCK_K=block_size, POW2=pow2, TRANSPOSED=dstT is not None, BYTES=as_bytes,
            num_warps=8)
    n0 = 0
    for wi in ws:
        n = wi.shape[-2]
        w3 = wi.reshape(E, n, K)                                   # a view, for the weights we quantize
        dst, dst_s = view(y[:, n0:n0 + n]), s[:, n0 // block_size:(n0 + n) // block_size]
        if not transposed:
            launch(w3, dst, dst_s)
        elif one_read_transpose():
            launch(w3, dst, dst_s, view(yT[:, :, n0:n0 + n]))
        else:  # (the scales, written again through s^T, are the same numbers in the same places)
            launch(w3, dst, dst_s)
            launch(w3.transpose(-2, -1), view(yT[:, :, n0:n0 + n]), dst_s.transpose(-2, -1))
        n0 += n
    y, s = y.view(*lead, N, K), s.view(*lead, N // block_size, K // block_size)
    return (y, s, yT.view(*lead, K, N)) if transposed else (y, s)


def act_quant_t(x, x_s=None, block_size=BLOCK, pow2=False, out_dtype=FP8, tiles=None):
    """128x1 tiles for Wgrad: x (M, K) -> x^T in FP8 (K, Mp) and scales (K, Mp/128), tokens
    zero-padded to Mp = a multiple of 128; K may be any size. With x_s, x is FP8 in 1x128 tiles
    (K a multiple of 128): dequantize first.
    With tiles (3, T) from _group_tiles (the experts' groups, section 6), output block j of 128
    tokens takes rows tiles[1, j]..tiles[2, j] of x: each expert is padded on its own, so that no
    128-token tile holds two experts' tokens, and Mp = 128 T, a bound that does not depend on
    the counts; the blocks past the experts' last one are zeros."""
    if not _use_triton(x, quant_impl):
        if tiles is not None:  # the same layout by a gather: every padding row reads a zero row
            x = x.float() if x_s is None else act_dequant(x, x_s, block_size)
            rows = tiles[1, :, None] + torch.arange(block_size, device=x.device)          # (T, 128)
            rows = torch.where(rows < tiles[2, :, None], rows, x.shape[0]).flatten()     # (Mp,)
            x, x_s = F.pad(x, (0, 0, 0, 1))[rows], None                                  # (Mp, K)
        y, s = act_quant_t_ref(x, x_s, block_size, pow2)
        return y.to(out_dtype) if out_dtype != FP8 else y, s
    M, K = x.shape
    if K % block_size and x_s is None:  # the kernel reads whole blocks of channels: add zero ones, drop them
        y, s = act_quant_t(F.pad(x, (0, -K % block_size)), None, block_size, pow2, out_dtype, tiles)
        return y[:K], s[:K]
    if x.stride(-1) != 1:
        x = x.contiguous()
    nb = triton.cdiv(M, block_size) if tiles is None else tiles.shape[1]   # output blocks of 128 tokens
    y = torch.empty(K, nb * block_size, dtype=out_dtype, device=x.device)
    s = _mmajor_empty(K, nb, x.device)                             # (K, Mp/128), K-major
    if nb == 0:
        return y, s
    xs = x_s if x_s is not None else s                             # s: a dummy when HAS_XS=False
    rows = tiles[1:] if tiles is not None else s                   # (2, T): first and end row of each block
    grid = lambda meta: (nb, K // meta["BLOCK_K"])
    _act_quant_t_kernel[grid](x, xs, y, s, rows, M, x.stride(0), xs.stride(0), xs.stride(1), y.stride(0),
                              s.stride(1), HAS_XS=x_s is not None, GROUPED=tiles is not None,
                              BLOCK_M=block_size, QBLOCK=block_size, POW2=pow2)
    return y, s


def act_quant_dual(x, block_size=BLOCK, pow2=False, out_dtype=FP8):
    """Both tilings of x (M, K) from one read: act_quant(x) and act_quant_t(x), that is x_fp8 (M, K)
    with s (M, K/128) in 1x128 tiles, and x^T (K, Mp) with scales (K, Mp/128) in 128x1 tiles,
    tokens zero-padded to a multiple of 128; K a multiple of 128. FP8Linear's backward quantizes
    dy so, for its Dgrad and its Wgrad: one read of dy instead of two. Where the assembler gets
    a tile's second, transposed store wrong (one_read_transpose), the two quantizers run apart."""
    _check_multiple(x.shape[-1], "last dim of the activation", block_size)
    if not _use_triton(x, quant_impl) or not one_read_transpose():
        return (*act_quant(x, block_size, pow2, out_dtype), *act_quant_t(x, None, block_size, pow2, out_dtype))
    if x.stride(-1) != 1:
        x = x.contiguous()
    M, K = x.shape
    nb = triton.cdiv(M, block_size)
    y, s = torch.empty(M, K, dtype=out_dtype, device=x.device), _mmajor_empty(M, K // block_size, x.device)
    yT, sT = torch.empty(K, nb * block_size, dtype=out_dtype, device=x.device), _mmajor_empty(K, nb, x.device)
    if nb:
        _act_quant_dual_kernel[(nb, K // block_size)](x, y, s, yT, sT, M, x.stride(0), y.stride(0), s.stride(0),
                                                      s.stride(1), yT.stride(0), sT.stride(1), BLOCK=block_size,
                                                      POW2=pow2)
    return y, s, yT, sT

# -----------------------------------------------------------------------------
# 2. The GEMM: FP8 products per 128-deep K-block, promoted to an FP32 accumulator (3.3.2)


def _cdiv(a, b):
    return -(-a // b)


def _b_scales_per_row(b, b_s):
    """b_s is (N, K/128) for 1x128 tiles of b (Wgrad) or (N/128, K/128) for 128x128 blocks."""
    N = b.shape[0]
    if b_s.shape[0] == N and N != _cdiv(N, BLOCK):
        return True
    if b_s.shape[0] != _cdiv(N, BLOCK):
        raise ValueError(f"fp8_gemm: b_s has shape {tuple(b_s.shape)}, expected ({N}, K/128) or "
                         f"({_cdiv(N, BLOCK)}, K/128) for b of shape {tuple(b.shape)}")
    return False


def _check_gemm(a, a_s, b, b_s):
    M, K = a.shape
    assert b.shape[1] == K, f"fp8_gemm: a {tuple(a.shape)} and b {tuple(b.shape)} differ in K"
    _check_multiple(K, "K of the GEMM")
    assert a_s.shape == (M, K // BLOCK), f"fp8_gemm: a_s {tuple(a_s.shape)}, expected {(M, K // BLOCK)}"
    assert b_s.shape[1] == K // BLOCK


def fp8_gemm_ref(a, a_s, b, b_s, out_dtype=torch.bfloat16, out=None):
    """Plain torch: c = dequant(a) @ dequant(b)^T, one 128-deep K-block at a time, each block's
    FP32 product multiplied by its two scales and added to an FP32 accumulator."""
    _check_gemm(a, a_s, b, b_s)
    M, K = a.shape
    N = b.shape[0]
    if not _b_scales_per_row(b, b_s):
        b_s = b_s.repeat_interleave(BLOCK, 0)[:N]                  # (N, K/128)
    acc = torch.zeros(M, N, dtype=torch.float32, device=a.device)
    with torch.autocast(a.device.type, enabled=False):
        for k in range(K // BLOCK):
            blk = slice(k * BLOCK, (k + 1) * BLOCK)
            part = a[:, blk].float() @ b[:, blk].float().t()       # (M, N): the tensor cores' part
            acc += part * (a_s[:, k, None] * b_s[None, :, k])      # promotion, scales applied
    return acc.to(out_dtype) if out is None else out.copy_(acc)


if HAS_TRITON:
    @triton.jit
    def _promoted_mma(a_desc, b_desc, as_ptr, bs_ptr, row_a, row_b, offs_m, offs_n, k_lo, k_hi,
                      stride_asm, stride_ask, stride_bsn, stride_bsk,
                      B_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr):
        # sum over K-blocks k in [k_lo, k_hi) of (a[m, k] @ b[n, k]^T) * s_a[m, k] * s_b[n, k] for
        # the rows m = row_a.. of a [M, K] and n = row_b.. of b [N, K], both K-major, as Hopper's FP8
        # WGMMA wants them. a and b come in through TMA descriptors: the copy engine fetches each
        # (BLOCK, 128) box into shared memory (rows past the tensor's end as zeros), so no thread
        # holds addresses for them (64x128 tiles: dense 166 -> 155 registers a thread, grouped
        # 166 -> 145, Wgrad 213 -> 174). offs_m, offs_n (clamped to the tensor) address the scales.
        as_ptrs = as_ptr + offs_m * stride_asm
        # b in 128x128 blocks (a weight): a tile no wider than a block lies in one of them (tiles
        # start at multiples of BLOCK_N, which divides 128), so one scale per K-block, one multiply
        # per row in the promotion instead of one per element
        if B_PER_ROW:   # 1x128 tiles of b (Wgrad): a scale per row of b
            bs_ptrs = bs_ptr + offs_n * stride_bsn
        elif BLOCK_N <= BLOCK_K:  # the tile's one 128-row block of b
            bs_ptrs = bs_ptr + (tl.min(offs_n, axis=0) // BLOCK_K) * stride_bsn
        else:           # a tile across several blocks of b
            bs_ptrs = bs_ptr + (offs_n // BLOCK_K) * stride_bsn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(k_lo, k_hi):
            a, b = a_desc.load([row_a, k * BLOCK_K]), b_desc.load([row_b, k * BLOCK_K])
            part = tl.dot(a, b.T)                             # tensor cores: one block, FP32 out
            s_a, s_b = tl.load(as_ptrs + k * stride_ask), tl.load(bs_ptrs + k * stride_bsk)
            if not B_PER_ROW and BLOCK_N <= BLOCK_K:
                acc += part * (s_a * s_b)[:, None]          # promotion: scale, add in FP32 registers
            else:  # two steps: no (BLOCK_M, BLOCK_N) tile of scales in registers (254 -> 213 for Wgrad)
                acc += (part * s_b[None, :]) * s_a[:, None]
        return acc

    def _set_boxes(nargs):
        # a config's tile decides the boxes the descriptors fetch (the autotuner calls this first)
        nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
        nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]

    def _gemm_configs(maxnreg_64x128=None):
        # On the H200 64x128, 4 warps, 3 stages wins at all three benchmark shapes (bench.py fp8,
        # 2026-12-02; 4 stages before the one-scale promotion). Each K-block's MMA is waited for
        # before its promotion (wgmma.wait_group 0 in the PTX), so the tensor cores are kept busy by
        # other CTAs on the SM: this tile takes 155 registers a thread with TMA loads (166 with
        # pointer loads) and 72 KB of shared memory (sm_90, compiled offline: tests/test_fp8.py),
        # room for three. Wgrad's per-column scales of b take the grouped one to 174 (FP32 out), so
        # maxnreg_64x128=168 caps it for the third CTA (164, no spills). A variant that issued block
        # k+1's MMA before promoting block k lost everywhere: Triton still waits at once. The
        # autotuner chose that tile at every shape of the small and v3-gpu steps and of bench.py
        # fp8 (2026-12-02/03), so only it, its 4-stage twin and a 64x64 tile for narrow outputs are
        # tried: each config is one more compile and one more timing per shape in the first step
        # (128x128 w8, 64x256 w8, 5 stages and 128x64 never won and are not tried)
        def cfg(bm, bn, w, st):
            meta = {"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 64}   # see _grouped_order
            cap = maxnreg_64x128 if (bm, bn, w) == (64, 128, 4) else None
            return triton.Config(meta, num_warps=w, num_stages=st, maxnreg=cap, pre_hook=_set_boxes)
        return [cfg(64, 128, 4, 3), cfg(64, 128, 4, 4), cfg(64, 64, 4, 3)]

    @triton.jit
    def _grouped_order(pid, num_m, num_n, GROUP_M: tl.constexpr):
        # the (row tile, column tile) of program pid. Programs start roughly in pid order, a wave of
        # about 3 x 132 at a time on the H200. GROUP_M row tiles take their column tiles side by
        # side: a wave then reads GROUP_M row tiles of a and a few column tiles of b, and each byte
        # of a comes from HBM about once, the rest from L2. (The row tiles one after the other, all
        # of them for one column tile before the next, read all of a from HBM once per column tile.)
        # GROUP_M = 64 on the H200 (2026-12-03, a script over 1-128): the grouped Fprop/Dgrad
        # kernel 680-758 -> 859-880 TFLOP/s at V3's per-GPU expert shapes (32k rows over 8 experts,
        # 7168 <-> 2048 and 4096; 64 row tiles of 64 are one expert's 4096 rows); 128 was slower
        # again, its rows of a no longer fitting L2. Wgrad's 4096 x 7168: 664 -> 711 (7168 x 2048:
        # 672 both). The dense kernel at bench.py fp8's shapes, 8 -> 64: 861-869 -> 895-957.
        first_m = pid // (GROUP_M * num_n) * GROUP_M
        size_m = tl.minimum(num_m - first_m, GROUP_M)
        return first_m + (pid % (GROUP_M * num_n)) % size_m, (pid % (GROUP_M * num_n)) // size_m

    @_tuned(_gemm_configs(), key=["N", "K", "B_PER_ROW"])
    @triton.jit
    def _fp8_gemm_kernel(a_desc, b_desc, c_ptr, as_ptr, bs_ptr, M, N, K,
                         stride_cm, stride_asm, stride_ask, stride_bsn, stride_bsk,
                         B_PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
        # c (M, N) = a (M, K) @ b (N, K)^T, one (BLOCK_M, BLOCK_N) tile per program
        pid_m, pid_n = _grouped_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _promoted_mma(a_desc, b_desc, as_ptr, bs_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N,
                            tl.minimum(offs_m, M - 1), tl.minimum(offs_n, N - 1), 0, K // BLOCK_K,
                            stride_asm, stride_ask, stride_bsn, stride_bsk, B_PER_ROW, BLOCK_M, BLOCK_N, BLOCK_K)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)

    # BLOCK_M is fixed by the tile table (row_tiles); the rest is tuned per (N, K) as for the dense
    # kernel (BLOCK_N 128, 4 warps, 3 stages won everywhere; 5 stages and 256 w8 never did); GROUP_M:
    # _grouped_order
    @_tuned([triton.Config({"BLOCK_N": bn, "GROUP_M": 64}, num_warps=w, num_stages=st, pre_hook=_set_boxes)
             for bn, w, st in ((128, 4, 3), (128, 4, 4), (64, 4, 3))],
            key=["N", "K"])
    @triton.jit
    def _fp8_gemm_rows_grouped_kernel(a_desc, b_desc, c_ptr, as_ptr, bs_ptr, tiles_ptr, num_tiles, num_experts,
                                      N, K, stride_cm, stride_asm, stride_ask, stride_bse, stride_bsn, stride_bsk,
                                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                      GROUP_M: tl.constexpr):
        # Fprop/Dgrad of the routed experts: rows of a sorted by expert, b (E, N, K) stacked and
        # seen as (E N, K) by its descriptor (a box past expert e's N rows reads e + 1's: only into
        # columns >= N, which are not stored).
        # tiles (3, num_tiles): expert, first row, end row of each tile of at most BLOCK_M rows,
        # built on the device (_group_tiles); the grid covers a bound, so some tiles are empty.
        t, pid_n = _grouped_order(tl.program_id(0), num_tiles, tl.cdiv(N, BLOCK_N), GROUP_M)   # t: a row tile
        e = tl.load(tiles_ptr + t)
        row0, row_end = tl.load(tiles_ptr + num_tiles + t), tl.load(tiles_ptr + 2 * num_tiles + t)
        # "expert" E owns the rows past offs[-1]: no K-blocks are summed (b[E] is never read), zeros.
        # A tile past the last real one (row0 == row_end) sums none either and stores nothing. (An
        # early return for it cost 21 registers a thread: 187 against 166, and with them the third
        # CTA on an SM; sm_90 PTX compiled offline, tests/test_fp8.py.)
        k_blocks = tl.where((e < num_experts) & (row0 < row_end), K // BLOCK_K, 0)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _promoted_mma(a_desc, b_desc, as_ptr, bs_ptr + e.to(tl.int64) * stride_bse, row0, e * N + pid_n * BLOCK_N,
                            tl.minimum(offs_m, tl.maximum(row_end - 1, 0)), tl.minimum(offs_n, N - 1), 0, k_blocks,
                            stride_asm, stride_ask, stride_bsn, stride_bsk, False, BLOCK_M, BLOCK_N, BLOCK_K)
        mask = (offs_m[:, None] < row_end) & (offs_n[None, :] < N)
        tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty), mask=mask)

    @_tuned(_gemm_configs(maxnreg_64x128=168), key=["M", "N"])
    @triton.jit
    def _fp8_gemm_k_grouped_kernel(a_desc, b_desc, c_ptr, as_ptr, bs_ptr, kblocks_ptr, M, N,
                                   stride_ce, stride_cm, stride_asm, stride_ask, stride_bsn, stride_bsk,
                                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                                   GROUP_M: tl.constexpr):
        # Wgrad of the routed experts: c[e] = a[:, tokens of e] @ b[:, tokens of e]^T, where each
        # expert's tokens are whole K-blocks kblocks[e] .. kblocks[e+1] (padded per expert).
        e = tl.program_id(1)
        pid_m, pid_n = _grouped_order(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
        k_lo, k_hi = tl.load(kblocks_ptr + e), tl.load(kblocks_ptr + e + 1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _promoted_mma(a_desc, b_desc, as_ptr, bs_ptr, pid_m * BLOCK_M, pid_n * BLOCK_N,
                            tl.minimum(offs_m, M - 1), tl.minimum(offs_n, N - 1), k_lo, k_hi,
                            stride_asm, stride_ask, stride_bsn, stride_bsk, True, BLOCK_M, BLOCK_N, BLOCK_K)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        c_ptrs = c_ptr + e.to(tl.int64) * stride_ce + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mask)


def _tma(t):
    """A TMA descriptor of the 2-D K-major FP8 operand t, for the GEMM kernels' loads; the tuned
    config sets the box it fetches (_set_boxes). TMA wants a 16-byte aligned base and row stride
    (K a multiple of 128 gives the stride; a view that starts off 16 bytes is copied)."""
    if t.data_ptr() % 16 or t.stride(0) % 16:
        t = t.clone(memory_format=torch.contiguous_format)
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [BLOCK, BLOCK])


def fp8_gemm_triton(a, a_s, b, b_s, out_dtype=torch.bfloat16, out=None):
    _check_gemm(a, a_s, b, b_s)
    a, b = (t if t.stride(1) == 1 else t.contiguous() for t in (a, b))   # both K-major
    M, K = a.shape
    N = b.shape[0]
    per_row = _b_scales_per_row(b, b_s)
    c = torch.empty(M, N, dtype=out_dtype, device=a.device) if out is None else out   # rows: stride(1) == 1
    if M == 0 or N == 0 or K == 0:
        return c.zero_()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)
    _fp8_gemm_kernel[grid](_tma(a), _tma(b), c, a_s, b_s, M, N, K, c.stride(0),
                           a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1),
                           B_PER_ROW=per_row, BLOCK_K=BLOCK)
    return c


def _mmajor(s):
    """Same values, stored with the first dim fastest (stride (1, rows)): cuBLAS's 1x128 layout."""
    if s.stride(0) == 1 and (s.shape[1] == 1 or s.stride(1) == s.shape[0]):
        return s
    return s.t().contiguous().t()


def fp8_gemm_scaled_mm(a, a_s, b, b_s, out_dtype=torch.bfloat16, out=None):
    """cuBLAS's blockwise FP8 GEMM through torch._scaled_mm (Hopper, CUDA >= 12.9). It wants a
    row-major, b column-major (b^T is our K-major b), 1x128 scales M-major, and 128x128 scales of
    b^T row-major; it promotes to FP32 once per 128 in K as well."""
    _check_gemm(a, a_s, b, b_s)
    if a.shape[0] % 4:
        raise ValueError(f"fp8_gemm_scaled_mm: M = {a.shape[0]} is not a multiple of 4 (1x128 scales are read M-major)")
    if _b_scales_per_row(b, b_s):
        scale_b = _mmajor(b_s).t()                                 # (K/128, N), 1x128 of b^T
    else:
        if b_s.shape[0] > 1 and b_s.shape[1] % 4:  # seen on the H200 (torch 2.11): rows read as if padded to 4
            raise ValueError(f"fp8_gemm_scaled_mm: cuBLAS misreads 128x128 scales whose rows "
                             f"(K/128 = {b_s.shape[1]}) are not a multiple of 4 floats")
        scale_b = b_s.contiguous().t()                             # (K/128, N/128)
    args = dict(scale_a=_mmajor(a_s), scale_b=scale_b, out_dtype=out_dtype)
    if out is None:
        return torch._scaled_mm(a, b.t(), **args)
    try:
        return torch._scaled_mm(a, b.t(), **args, out=out)
    except TypeError:   # a torch without the out= overload
        return out.copy_(torch._scaled_mm(a, b.t(), **args))


_scaled_mm_refused = {}   # shapes cuBLAS turned down once: "auto" sends them to Triton after that


def _scaled_mm_works(device):
    key = ("probe", str(device))
    if key not in _scaled_mm_refused:
        try:
            a = torch.ones(128, 128, device=device).to(FP8)
            s = torch.ones(128, 1, device=device)
            c = fp8_gemm_scaled_mm(a, s, a, s[:1], torch.float32)
            _scaled_mm_refused[key] = not bool((c == 128).all())
        except (RuntimeError, AttributeError, TypeError):
            _scaled_mm_refused[key] = True
    return not _scaled_mm_refused[key]


def fp8_gemm(a, a_s, b, b_s, out_dtype=torch.bfloat16, out=None):
    """c (M, N) = dequant(a) @ dequant(b)^T in out_dtype (BF16 or FP32), written into out if given.
    a (M, K) FP8 with 1x128 scales a_s (M, K/128); b (N, K) FP8 with 128x128 scales (N/128, K/128)
    or 1x128 scales (N, K/128). K must be a multiple of 128. gemm_impl picks the path."""
    impl = gemm_impl
    if impl == "auto":
        if not a.is_cuda:
            impl = "torch"
        else:
            key = (b.shape[0], a.shape[1], b_s.shape[0] == b.shape[0], out_dtype)
            if a.shape[0] % 16 == 0 and HAS_SCALED_MM and _scaled_mm_works(a.device) and not _scaled_mm_refused.get(key):
                try:
                    return fp8_gemm_scaled_mm(a, a_s, b, b_s, out_dtype, out)
                except (RuntimeError, ValueError):   # scale layouts cuBLAS cannot take
                    _scaled_mm_refused[key] = True
            impl = "triton" if HAS_TRITON else "torch"
    if impl == "triton":
        return fp8_gemm_triton(a, a_s, b, b_s, out_dtype, out)
    if impl == "scaled_mm":
        return fp8_gemm_scaled_mm(a, a_s, b, b_s, out_dtype, out)
    if impl == "torch":
        return fp8_gemm_ref(a, a_s, b, b_s, out_dtype, out)
    raise ValueError(f"fp8: unknown gemm_impl {impl!r}")


HAS_SCALED_MM = hasattr(torch, "_scaled_mm")

# -----------------------------------------------------------------------------
# 3. Why promotion: a tensor core with a 14-bit accumulator, emulated (3.3.2)


def _truncate(x, bits):
    """Keep the top `bits` significant bits of FP32 values (round toward zero)."""
    return (x.view(torch.int32) & ~((1 << (24 - bits)) - 1)).view(torch.float32)


def tensor_core_gemm_emulated(a, b, acc_bits=14, group=32, promote_every=None):
    """a (M, K) @ b (N, K)^T for FP8 values held in FP32, summed the way an FP8 MMA does it: each
    group of `group` products is added to the running sum after all of them are aligned to the
    largest exponent among them and the sum, keeping `acc_bits` significant bits (the rest is cut),
    and the sum is kept with `acc_bits` bits too. promote_every=128 adds that limited-precision
    partial sum to an FP32 (here FP64) accumulator every 128 elements of K and restarts it."""
    M, K = a.shape
    prod = a.double()[:, None, :] * b.double()[None, :, :]         # (M, N, K), exact
    out = torch.zeros(M, b.shape[0], dtype=torch.float64)
    acc = torch.zeros_like(out)
    for k in range(0, K, group):
        g = prod[..., k:k + group]
        top = torch.maximum(acc.abs(), g.abs().amax(-1))            # the alignment exponent
        _, e = torch.frexp(top)                                     # top < 2^e
        ulp = torch.ldexp(torch.ones_like(top), e - acc_bits)[..., None]
        acc = torch.trunc(acc / ulp[..., 0]) * ulp[..., 0] + (torch.trunc(g / ulp) * ulp).sum(-1)
        acc = _truncate(acc.float(), acc_bits).double()
        if promote_every and (k + group) % promote_every == 0:
            out += acc                                              # promotion to full precision
            acc = torch.zeros_like(out)
    return out + acc


def promotion_error(K=4096, M=16, N=16, positive=True, promote_every=128, generator=None):
    """Relative error (Frobenius) of the emulated 14-bit accumulation against FP64, without and
    with promotion, for random FP8 operands: U(0,1) when positive, N(0,1) otherwise."""
    draw = (lambda *s: torch.rand(*s, generator=generator)) if positive else \
           (lambda *s: torch.randn(*s, generator=generator))
    a, b = draw(M, K).to(FP8).float(), draw(N, K).to(FP8).float()
    ref = a.double() @ b.double().t()
    rel = lambda c: ((c - ref).norm() / ref.norm()).item()
    return rel(tensor_core_gemm_emulated(a, b)), rel(tensor_core_gemm_emulated(a, b, promote_every=promote_every))

# -----------------------------------------------------------------------------
# 4. Custom ops: each quantization and GEMM step is one node of torch.compile's graph
#
# torch.compile does not trace into a custom op: it calls it as it is (the kernels above, eagerly)
# and learns its outputs' shapes, dtypes and strides from the fake implementation registered with
# it, so the fake must describe exactly what the real one returns (tests/test_fp8.py opchecks each).
# Activations are 2-D (tokens, features); the ops zero-pad dims that are not whole 128-blocks
# themselves (see "The Linear layer" above).

Tensor = torch.Tensor


def _round_up(n):
    return _cdiv(n, BLOCK) * BLOCK


def _padded(t, rows=False):
    """t zero-padded to whole 128-blocks along its last dim (with rows, along the one before too)."""
    pad = [0, -t.shape[-1] % BLOCK] + ([0, -t.shape[-2] % BLOCK] if rows else [])
    return F.pad(t, pad) if any(pad) else t


def _no_autocast(t):
    # An op's body runs under the caller's autocast state: the promoted FP32 sums must not be cast.
    return torch.autocast(t.device.type, enabled=False)


@torch.library.custom_op("fp8::quant", mutates_args=())
def quant_op(x: Tensor, pow2: bool) -> tuple[Tensor, Tensor]:
    """act_quant of x (M, K), K padded to Kp: x_fp8 (M, Kp) and scales (M, Kp/128), M-major."""
    with _no_autocast(x):
        x_fp8, s = act_quant(_padded(x), pow2=pow2)
    return x_fp8, _mmajor(s)


@quant_op.register_fake
def _(x, pow2):
    M, Kp = x.shape[0], _round_up(x.shape[1])
    return x.new_empty(M, Kp, dtype=FP8), _mmajor_empty(M, Kp // BLOCK, x.device)


@torch.library.custom_op("fp8::weight_quant", mutates_args=())
def weight_quant_op(ws: list[Tensor], pow2: bool) -> tuple[Tensor, Tensor, Tensor]:
    """weight_quant of the weights ws (..., N_i, K), each padded to (..., Np_i, Kp), concatenated
    along N (one weight, or the experts' w1 and w3): w_fp8 (..., Np, Kp), its scales
    (..., Np/128, Kp/128) and w_fp8^T (..., Kp, Np) for Dgrad."""
    with _no_autocast(ws[0]):
        return weight_quant([_padded(w, rows=True) for w in ws], pow2=pow2, transposed=True)


@weight_quant_op.register_fake
def _(ws, pow2):
    w = ws[0]
    *E, _, K = w.shape
    Np, Kp = sum(_round_up(t.shape[-2]) for t in ws), _round_up(K)
    return (w.new_empty(*E, Np, Kp, dtype=FP8), w.new_empty(*E, Np // BLOCK, Kp // BLOCK, dtype=torch.float32),
            w.new_empty(*E, Kp, Np, dtype=FP8))


@torch.library.custom_op("fp8::gemm", mutates_args=())
def gemm_op(a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, out_dtype: torch.dtype) -> Tensor:
    """fp8_gemm: c (M, N) = dequant(a) @ dequant(b)^T. FP8Linear's Fprop and Dgrad."""
    with _no_autocast(a):
        return fp8_gemm(a, a_s, b, b_s, out_dtype)


@gemm_op.register_fake
def _(a, a_s, b, b_s, out_dtype):
    return a.new_empty(a.shape[0], b.shape[0], dtype=out_dtype)


@torch.library.custom_op("fp8::quant_dual", mutates_args=())
def quant_dual_op(x: Tensor, pow2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """act_quant_dual of x (M, N), N padded to Np: x_fp8 (M, Np) and scales (M, Np/128) M-major in
    1x128 tiles (Dgrad), x^T (Np, Mp) and scales (Np, Mp/128) in 128x1 tiles (Wgrad)."""
    with _no_autocast(x):
        y, s, yT, sT = act_quant_dual(_padded(x), pow2=pow2)
    return y, _mmajor(s), yT, _mmajor(sT)                           # (the torch path's are row-major)


@quant_dual_op.register_fake
def _(x, pow2):
    M, Np = x.shape[0], _round_up(x.shape[1])
    Mp = _round_up(M)
    return (x.new_empty(M, Np, dtype=FP8), _mmajor_empty(M, Np // BLOCK, x.device),
            x.new_empty(Np, Mp, dtype=FP8), _mmajor_empty(Np, Mp // BLOCK, x.device))


# -----------------------------------------------------------------------------
# 5. FP8Linear: Fprop, Dgrad and Wgrad in FP8, the input cached in FP8 (3.3.1, Figure 6; 3.3.3)


class _FP8LinearFn(torch.autograd.Function):
    """y = x [W_1; W_2; ...]^T: one weight, or several that share the input x (linears below),
    each padded to whole 128-blocks of rows and run as one GEMM; y (M, N), or (M, sum of the
    padded N_i) for several. Where a Wgrad will follow (wgrad), x is quantized in both tilings
    from one read (quant_dual): the 1x128 tiles feed Fprop and are dropped, the 128x1 tiles are
    what backward keeps, as many FP8 bytes as the 1x128 cache and with no re-tiling to do there."""

    @staticmethod
    def forward(ctx, x, out_dtype, pow2, wgrad, *weights):
        K, N = weights[0].shape[1], weights[0].shape[0] if len(weights) == 1 else None
        pow2_x = pow2 or pow2_scales
        if wgrad:
            x_fp8, x_s, xT, xT_s = quant_dual_op(x, pow2_x)           # (M, Kp) 1x128; (Kp, Mp) 128x1
        else:
            (x_fp8, x_s), xT, xT_s = quant_op(x, pow2_x), None, None
        w_fp8, w_s, wT_fp8 = weight_quant_op(list(weights), pow2_scales)   # (Np, Kp), (Np/128, Kp/128), (Kp, Np)
        y = gemm_op(x_fp8, x_s, w_fp8[:N], w_s, out_dtype)            # Fprop (M, N or Np)
        ctx.save_for_backward(wT_fp8[:K], w_s, *((xT[:K], xT_s[:K]) if wgrad else ()))   # x only in FP8
        ctx.pow2, ctx.dtypes, ctx.rows = pow2_scales, (x.dtype, weights[0].dtype), [w.shape[0] for w in weights]
        return y

    @staticmethod
    def backward(ctx, dy):
        wT_fp8, w_s, *xT = ctx.saved_tensors
        pow2, (x_dtype, w_dtype) = ctx.pow2, ctx.dtypes
        N, dx, dws = dy.shape[1], None, [None] * len(ctx.rows)
        dy = dy.contiguous()
        if xT:  # both tilings of dy from one read: 1x128 over N, 128x1 over tokens
            dy_fp8, dy_s, dyT, dyT_s = quant_dual_op(dy, pow2)
        else:
            dy_fp8, dy_s = quant_op(dy, pow2)
        if ctx.needs_input_grad[0]:
            dx = gemm_op(dy_fp8, dy_s, wT_fp8, w_s.t(), x_dtype)      # Dgrad (M, K): W^T, the same blocks
        if xT:  # Wgrad (N, K) = dy^T x, both in 128x1 tiles (a sum over tokens); FP32 for FP32 masters
            dw, n0 = gemm_op(dyT[:N], dyT_s[:N], *xT, w_dtype), 0
            for i, n in enumerate(ctx.rows):                          # each weight's rows (past its padding)
                dws[i], n0 = dw[n0:n0 + n], n0 + _round_up(n)
        return dx, None, None, None, *dws


def _compute_dtype(x):
    t = x.device.type
    return torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype


def fp8_linear(x, weight, pow2=False):
    """y = x @ weight^T with all three GEMMs in FP8; x (..., K), weight (N, K), any N and K.
    pow2: x's scales are powers of two (3.3.3 rounds those of the Linear after attention).
    weight may be a list of weights (N_i, K) that share the input x: the list of their outputs,
    from one quantization of x (both tilings) and of the gradients' sum, and one GEMM of
    each kind over [W_1; W_2; ...], each W_i padded to whole 128-blocks of rows."""
    one = not isinstance(weight, (list, tuple))
    ws = [weight] if one else weight
    wgrad = torch.is_grad_enabled() and any(w.requires_grad for w in ws)
    y = _FP8LinearFn.apply(x.reshape(-1, x.shape[-1]), _compute_dtype(x), pow2, wgrad, *ws)   # (M, N), or (M, sum of padded N_i)
    if one:
        return y.view(*x.shape[:-1], weight.shape[0])
    outs, n0 = [], 0
    for w in weight:
        outs.append(y[:, n0:n0 + w.shape[0]].view(*x.shape[:-1], w.shape[0]))
        n0 += _round_up(w.shape[0])
    return outs


def linears(x, *layers):
    """[layer(x) for layer in layers], for Linear layers that share their input (W^DQ and W^DKV,
    an MLP's w1 and w3). Where they are all FP8Linear (with the same pow2), x is quantized once
    (in both tilings, in forward), and each of the three GEMMs runs once over the stacked
    weights (fp8_linear with a list); other layers are simply called."""
    if len(layers) > 1 and all(type(m) is FP8Linear for m in layers) and len({m.pow2 for m in layers}) == 1:
        return fp8_linear(x, [m.weight for m in layers], layers[0].pow2)
    return [m(x) for m in layers]


class FP8Linear(nn.Linear):
    """Drop-in for nn.Linear(in_features, out_features, bias=False) whose GEMMs run in FP8.
    The weight Parameter, its shape (out, in), dtype and initialization are nn.Linear's; only the
    matmuls change. Dims that are not multiples of 128 are zero-padded to whole blocks inside the
    GEMMs. pow2=True rounds the input's scales to powers of two (3.3.3: the Linear after attention).
    On the CPU it runs the emulated plain-torch path."""

    def __init__(self, in_features, out_features, bias=False, device=None, dtype=None, pow2=False):
        if bias:
            raise ValueError("FP8Linear has no bias (DeepSeek-V3's Linear layers have none)")
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.pow2 = pow2

    def forward(self, x):
        return fp8_linear(x, self.weight, self.pow2)

    def extra_repr(self):
        return super().extra_repr() + (", pow2=True" if self.pow2 else "")

# -----------------------------------------------------------------------------
# 6. Routed experts: the same FP8 GEMMs per expert, over tokens sorted by expert (3.3.3)

# "triton": one grouped-kernel launch per GEMM; "loop": fp8_gemm per expert (cuBLAS on Hopper).
# "auto": triton on CUDA (on the H200, 8 experts x 2048 tokens, 7168 -> 2048, forward+backward:
# 3.78 ms against the loop's 4.87 ms, 2026-12-02), loop on the CPU.
grouped_impl = "auto"
# the row tiles of the grouped Fprop/Dgrad kernel (its tile table is built for them, so they are
# not autotuned; the kernels' other sizes are)
GROUPED_BLOCK_M = 64


def _grouped_triton(x):
    if grouped_impl == "auto":
        return x.is_cuda and HAS_TRITON
    return grouped_impl == "triton"


def _group_bounds(offs):
    """(start, end) row of each expert's group, read on the host: the loop twin's bookkeeping."""
    ends = [int(e) for e in offs.tolist()]
    return list(zip([0] + ends[:-1], ends))


def _max_tiles(M, groups, block):
    """The most tiles of `block` rows that M rows split into `groups` groups can need when each group
    is tiled on its own: every group wastes less than one tile, so cdiv(M, block) + groups - 1."""
    return _cdiv(M, block) + groups - 1


def _group_tiles(offs, M, block=BLOCK, tail=False):
    """Each expert's rows cut into tiles of at most `block` rows, computed on offs's device with
    torch ops: no value of offs reaches Python, so no shape or launch grid depends on the counts.
    Returns tiles (3, T) int32, the expert, first row and end row of tile j, and first (G + 1,)
    int32, the first tile of each group: group g's tiles are first[g] .. first[g+1]. T is the bound
    _max_tiles; the tiles past the real ones are empty (first row = end row = 0). G = E; with tail,
    G = E + 1: the rows past offs[-1] (no expert's) are tiled too, as "expert" E."""
    ends = offs.long()
    if tail:
        ends = torch.cat([ends, ends.new_full((1,), M)])
    G = ends.shape[0]
    starts = F.pad(ends[:-1], (1, 0))                                   # (G,)
    last = _cdiv(ends - starts, block).cumsum(0)                         # (G,) one past each group's last tile
    first = F.pad(last, (1, 0))                                          # (G + 1,)
    j = torch.arange(_max_tiles(M, G, block), device=offs.device)      # (T,)
    # searched in `last`, not in the view first[1:]: torch 2.11's Inductor cannot lower searchsorted
    # over a sliced, not yet materialized tensor (NotImplementedError: SliceView), seen on the H200
    g = torch.searchsorted(last, j, right=True)                          # tile j's group; G: past the last
    real = g < G
    g_in = g.clamp(max=G - 1)
    row0 = starts[g_in] + (j - first[g_in]) * block
    row_end = torch.minimum(row0 + block, ends[g_in])
    tiles = torch.stack([g, torch.where(real, row0, 0), torch.where(real, row_end, 0)])
    return tiles.to(torch.int32), first.to(torch.int32)


def row_tiles(offs, M):
    """The tile table of fp8_grouped_gemm_rows' Triton kernel for M rows grouped by offs: built on
    the device, once per layer by fp8_experts and handed to its four row GEMMs."""
    return _group_tiles(offs, M, GROUPED_BLOCK_M, tail=True)[0]


def fp8_grouped_gemm_rows(a, a_s, b, b_s, offs, out_dtype=torch.bfloat16, tiles=None):
    """c[rows of e] = a[rows of e] @ b[e]^T. a (M, K) FP8 with 1x128 scales, b (E, N, K) FP8 with
    128x128 scales (E, N/128, K/128), offs (E,) int32 as for fp8_experts; the rows past offs[-1] are
    zeros. Fprop and Dgrad of the routed experts. tiles: row_tiles(offs, M), if already built."""
    M, K = a.shape
    E, N, _ = b.shape
    if not _grouped_triton(a):  # the loop twin reads the groups on the host
        bounds = _group_bounds(offs)
        c = (torch.empty if bounds[-1][1] == M else torch.zeros)(M, N, dtype=out_dtype, device=a.device)
        for e, (s, t) in enumerate(bounds):
            if t > s:
                fp8_gemm(a[s:t], a_s[s:t], b[e], b_s[e], out_dtype, out=c[s:t])
        return c
    c = torch.empty(M, N, dtype=out_dtype, device=a.device)     # every row is in one tile: all written
    if M == 0 or N == 0 or K == 0:  # (an expert-parallel rank can get no rows; a descriptor needs a size)
        return c.zero_()
    tiles = row_tiles(offs, M) if tiles is None else tiles     # (3, cdiv(M, BLOCK_M) + E)
    if tiles.shape != (3, _max_tiles(M, E + 1, GROUPED_BLOCK_M)):
        raise ValueError(f"fp8: tiles {tuple(tiles.shape)} are not row_tiles(offs, M={M}) for {E} experts")
    grid = lambda meta: (tiles.shape[1] * triton.cdiv(N, meta["BLOCK_N"]),)   # noqa: E731
    _fp8_gemm_rows_grouped_kernel[grid](_tma(a), _tma(b.reshape(E * N, K)), c, a_s, b_s, tiles, tiles.shape[1],
                                        E, N, K, c.stride(0), a_s.stride(0), a_s.stride(1),
                                        b_s.stride(0), b_s.stride(1), b_s.stride(2), BLOCK_K=BLOCK,
                                        BLOCK_M=GROUPED_BLOCK_M)
    return c


def fp8_grouped_gemm_k(a, a_s, b, b_s, kblocks, out_dtype=torch.float32):
    """c[e] = a[:, K-blocks of e] @ b[:, K-blocks of e]^T for e < E, K-blocks kblocks[e]..kblocks[e+1]
    ((E + 1,) int32, on a's device). a (M, Kt) and b (N, Kt) FP8 with 1x128 scales along Kt (the
    experts' padded tokens): Wgrad. An expert with no K-blocks gets zeros."""
    M, N, E = a.shape[0], b.shape[0], kblocks.shape[0] - 1
    c = torch.empty(E, M, N, dtype=out_dtype, device=a.device)
    if not _grouped_triton(a):  # the loop twin reads the K-blocks on the host
        kblocks = kblocks.tolist()
        for e in range(E):
            lo, hi = kblocks[e], kblocks[e + 1]
            if hi > lo:
                cols = slice(lo * BLOCK, hi * BLOCK)
                fp8_gemm(a[:, cols], a_s[:, lo:hi], b[:, cols], b_s[:, lo:hi], out_dtype, out=c[e])
            else:
                c[e].zero_()                                       # an expert that got no tokens
        return c
    if M == 0 or N == 0 or a.shape[1] == 0:   # no rows, or no tokens at all: zeros (a descriptor needs a size)
        return c.zero_()
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), E)   # noqa: E731
    _fp8_gemm_k_grouped_kernel[grid](_tma(a), _tma(b), c, a_s, b_s, kblocks, M, N, c.stride(0), c.stride(1),
                                     a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), BLOCK_K=BLOCK)
    return c


# The SwiGLU between the up- and down-projections, fused with the quantizations around it. Unfused,
# the forward writes a = silu(h1) h3 in BF16 and reads it back to quantize it, and reads h again to
# cache it in FP8; the backward writes dh and the recomputed a in FP32 and reads dh twice (1x128 for
# Dgrad, 128x1 for Wgrad) and a once. Here the forward reads h once, and each of the backward's two
# kernels (one per tiling) reads dL/da and the FP8 cache of h once and writes FP8 only.
# swiglu_quant_ref and swiglu_backward_ref are their twins.

if HAS_TRITON:
    @triton.jit
    def _sigmoid(x):
        # 1 / (1 + e^-x) with the approximate division (2 ulp): an IEEE division an element would make
        # these kernels issue-bound (see _scaled); FP8's rounding is 2^-4
        return tl.math.fdiv(1.0, 1.0 + tl.exp(-x), ieee_rounding=False)

    # 64 x 4 warps and 128 x 8 spill on sm_90; these do not (100 to 197 registers)
    @_tuned([triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in ((32, 4), (16, 4), (32, 8), (64, 8))],
            key=["I"])
    @triton.jit
    def _swiglu_quant_kernel(h_ptr, hq_ptr, hs_ptr, aq_ptr, as_ptr, M, I, stride_hm, stride_hsm, stride_hsk,
                             stride_am, stride_asm, stride_ask, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                             POW2: tl.constexpr):
        # one program: BLOCK_M rows x channels c*128 .. c*128 + 127 of h1 = h[:, :I] and h3 = h[:, I:]
        pid_m, c = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        at = offs_m[:, None] * stride_hm + offs_k[None, :]             # h and its FP8 copy share strides
        h1 = tl.load(h_ptr + at, mask=mask_m[:, None], other=0.0).to(tl.float32)
        h3 = tl.load(h_ptr + at + I, mask=mask_m[:, None], other=0.0).to(tl.float32)
        hs = hs_ptr + offs_m * stride_hsm
        _store_quant_rows(h1, hq_ptr + at, hs + c * stride_hsk, mask_m, POW2)               # the FP8 cache
        _store_quant_rows(h3, hq_ptr + at + I, hs + (I // BLOCK_K + c) * stride_hsk, mask_m, POW2)
        a = h1 * _sigmoid(h1) * h3                                                          # silu(h1) h3
        _store_quant_rows(a, aq_ptr + offs_m[:, None] * stride_am + offs_k[None, :],
                          as_ptr + offs_m * stride_asm + c * stride_ask, mask_m, POW2)

    @triton.jit
    def _swiglu_grads(da_ptr, hq_ptr, hs_ptr, offs_m, mask_m, offs_k, kb, I, stride_dam, stride_hm, stride_hsm,
                      stride_hsk, QBLOCK: tl.constexpr):
        # dh1, dh3 and a = silu(h1) h3 at rows offs_m (those outside mask_m are zeros), channels offs_k,
        # all inside the kb-th 128-wide tile of h1 (and of h3): one cache scale a row for each
        at = offs_m[:, None] * stride_hm + offs_k[None, :]
        hs = hs_ptr + offs_m * stride_hsm
        s1 = tl.load(hs + kb * stride_hsk, mask=mask_m, other=0.0)
        s3 = tl.load(hs + (I // QBLOCK + kb) * stride_hsk, mask=mask_m, other=0.0)
        h1 = tl.load(hq_ptr + at, mask=mask_m[:, None], other=0.0).to(tl.float32) * s1[:, None]
        h3 = tl.load(hq_ptr + at + I, mask=mask_m[:, None], other=0.0).to(tl.float32) * s3[:, None]
        da = tl.load(da_ptr + offs_m[:, None] * stride_dam + offs_k[None, :], mask=mask_m[:, None], other=0.0)
        sig = _sigmoid(h1)
        return da * h3 * sig * (1 + h1 * (1 - sig)), da * h1 * sig, h1 * sig * h3   # silu' = sig (1 + h1 (1 - sig))

    # Two kernels, each one pass: a 128 x 128 block of the five tensors does not fit in registers,
    # and a one-kernel version that went over it twice in chunks (rows, then columns) ran at 17% of
    # the copy's rate on the H200 (bench.py fp8, 2026-12-02): its reductions and layout changes, not
    # its bytes, took the time. The columns kernel recomputes dh and a; they cost 6 bytes a channel
    # and token to read again. The pair ran at 31% (285 us at 16,384 x 2,048), still issue-bound:
    # the columns kernel's threads each work out the scales of many channels.
    @_tuned([triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in ((32, 4), (16, 4), (32, 8), (64, 8))],
            key=["I"])
    @triton.jit
    def _swiglu_backward_rows_kernel(da_ptr, hq_ptr, hs_ptr, dh_ptr, dhs_ptr, M, I, stride_dam, stride_hm,
                                     stride_hsm, stride_hsk, stride_dhsm, stride_dhsk, BLOCK_M: tl.constexpr,
                                     BLOCK_K: tl.constexpr, POW2: tl.constexpr):
        # one program: BLOCK_M rows x channels c*128 .. c*128 + 127: dh1 and dh3 in 1x128 tiles (Dgrad).
        # The rows past offs[-1] have da = 0 (w2's Dgrad) and get zeros.
        pid_m, c = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = c * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        dh1, dh3, _ = _swiglu_grads(da_ptr, hq_ptr, hs_ptr, offs_m, mask_m, offs_k, c, I, stride_dam, stride_hm,
                                    stride_hsm, stride_hsk, BLOCK_K)
        at = offs_m[:, None] * stride_hm + offs_k[None, :]             # dh shares the cache's strides
        dhs = dhs_ptr + offs_m * stride_dhsm
        _store_quant_rows(dh1, dh_ptr + at, dhs + c * stride_dhsk, mask_m, POW2)
        _store_quant_rows(dh3, dh_ptr + at + I, dhs + (I // BLOCK_K + c) * stride_dhsk, mask_m, POW2)

    # (64 x 4 warps and 128 x 8 spill on sm_90; these take 125 to 221 registers)
    @_tuned([triton.Config({"BLOCK_K": bk}, num_warps=w) for bk, w in ((32, 4), (16, 4), (32, 8), (64, 8))],
            key=["I"])
    @triton.jit
    def _swiglu_backward_cols_kernel(da_ptr, hq_ptr, hs_ptr, dhT_ptr, dhTs_ptr, aT_ptr, aTs_ptr, rows_ptr, I,
                                     stride_dam, stride_hm, stride_hsm, stride_hsk, stride_dhTk, stride_dhTsb,
                                     stride_aTk, stride_aTsb, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                                     QBLOCK: tl.constexpr, POW2: tl.constexpr):
        # one program: one 128-token block j of the Wgrad layout (rows row0 .. row_end of one expert,
        # rows (2, blocks) as in _act_quant_t_kernel) x BLOCK_K channels: dh1, dh3 and a in 128x1 tiles
        j = tl.program_id(0)
        row0 = tl.load(rows_ptr + j)
        row_end = tl.load(rows_ptr + tl.num_programs(0) + j)
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        kb = tl.program_id(1) * BLOCK_K // QBLOCK                      # BLOCK_K divides QBLOCK = 128
        dh1, dh3, a = _swiglu_grads(da_ptr, hq_ptr, hs_ptr, offs_m, offs_m < row_end, offs_k, kb, I, stride_dam,
                                    stride_hm, stride_hsm, stride_hsk, QBLOCK)
        cols = j * BLOCK_M + tl.arange(0, BLOCK_M)                     # the block's tokens in the outputs
        dhT = dhT_ptr + offs_k[None, :] * stride_dhTk + cols[:, None]
        _store_quant_cols(dh1, dhT, dhTs_ptr + j * stride_dhTsb + offs_k, POW2)
        _store_quant_cols(dh3, dhT + I * stride_dhTk, dhTs_ptr + j * stride_dhTsb + I + offs_k, POW2)
        _store_quant_cols(a, aT_ptr + offs_k[None, :] * stride_aTk + cols[:, None],
                          aTs_ptr + j * stride_aTsb + offs_k, POW2)


def swiglu_quant_ref(h, pow2=False):
    """The twin of swiglu_quant, as the steps it fuses: h (M, 2I) = [h1 | h3] -> its FP8 cache
    h_fp8, h_s and a = silu(h1) h3 (in FP32) quantized, a_fp8, a_s; 1x128 tiles, scales M-major.
    The quantizers are act_quant's path (quant_impl): plain torch here, or on the GPU the
    separate kernels that bench.py fp8 times the fused one against."""
    I = h.shape[1] // 2
    h_fp8, h_s = act_quant(h, pow2=pow2)
    h = h.float()
    a_fp8, a_s = act_quant(F.silu(h[:, :I]) * h[:, I:], pow2=pow2)
    return h_fp8, _mmajor(h_s), a_fp8, _mmajor(a_s)


def swiglu_quant(h, pow2=False, out_dtype=FP8):
    """The routed experts' forward between their GEMMs: h (M, 2I) = [h1 | h3] (the Fprop of [w1; w3])
    -> h_fp8, h_s (h's FP8 cache for the backward) and a_fp8, a_s (a = silu(h1) h3, the input of
    w2), 1x128 tiles, scales M-major; I a multiple of 128. One kernel reads h once. out_dtype:
    as for act_quant."""
    M, I2 = h.shape
    if I2 % (2 * BLOCK):
        raise ValueError(f"fp8.swiglu_quant: h has {I2} columns; it is [h1 | h3], 2I with I a multiple of {BLOCK}")
    if not _use_triton(h, quant_impl):
        return swiglu_quant_ref(h, pow2)
    h = h.contiguous()
    I = I2 // 2
    h_fp8 = torch.empty(M, I2, dtype=out_dtype, device=h.device)
    h_s, a_s = _mmajor_empty(M, I2 // BLOCK, h.device), _mmajor_empty(M, I // BLOCK, h.device)
    a_fp8 = torch.empty(M, I, dtype=out_dtype, device=h.device)
    if M:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), I // BLOCK)   # noqa: E731
        _swiglu_quant_kernel[grid](h, h_fp8, h_s, a_fp8, a_s, M, I, h.stride(0), h_s.stride(0), h_s.stride(1),
                                   a_fp8.stride(0), a_s.stride(0), a_s.stride(1), BLOCK_K=BLOCK, POW2=pow2)
    return h_fp8, h_s, a_fp8, a_s


def swiglu_backward_ref(da, h_fp8, h_s, tiles, pow2=False):
    """The twin of swiglu_backward, as the steps it fuses (quantizers as in swiglu_quant_ref)."""
    I = da.shape[1]
    h = act_dequant(h_fp8, h_s)                                     # the FP8 cache, (M, 2I)
    h1, h3 = h[:, :I], h[:, I:]
    sig = torch.sigmoid(h1)
    a = h1 * sig * h3                                               # the SwiGLU output, recomputed
    dh = torch.cat([da * h3 * sig * (1 + h1 * (1 - sig)), da * h1 * sig], 1)   # [dh1 | dh3]
    dh_fp8, dh_s = act_quant(dh, pow2=pow2)
    (dhT, dhT_s), (aT, aT_s) = (act_quant_t(t, pow2=pow2, tiles=tiles) for t in (dh, a))
    return dh_fp8, _mmajor(dh_s), dhT, _mmajor(dhT_s), aT, _mmajor(aT_s)


def swiglu_backward(da, h_fp8, h_s, tiles, pow2=False, out_dtype=FP8):
    """The routed experts' backward between their GEMMs: from da = dL/da (M, I) (w2's Dgrad, FP32)
    and h's FP8 cache h_fp8 (M, 2I), h_s (M, 2I/128), with tiles (3, T) = _group_tiles(offs, M):
      dh_fp8, dh_s   dh = [dh1 | dh3] (M, 2I) in 1x128 tiles, for the Dgrad of [w1; w3]
      dhT, dhT_s     dh^T (2I, 128 T) in 128x1 tiles, each expert padded on its own, for their Wgrad
      aT, aT_s       a^T (I, 128 T) likewise, a = silu(h1) h3 recomputed, for w2's Wgrad
    (act_quant_t's layouts); the rows past offs[-1], where da is zero, get zeros in dh_fp8. Two
    kernels, one for each tiling, each read da and the cache once. out_dtype: as for act_quant."""
    M, I = da.shape
    _check_multiple(I, "expert width")
    if h_fp8.shape != (M, 2 * I) or h_s.shape != (M, 2 * I // BLOCK) or tiles.dim() != 2 or tiles.shape[0] != 3:
        raise ValueError(f"fp8.swiglu_backward: for da {tuple(da.shape)} expected h_fp8 {(M, 2 * I)}, h_s "
                         f"{(M, 2 * I // BLOCK)} and tiles (3, T); got {tuple(h_fp8.shape)}, {tuple(h_s.shape)}, "
                         f"{tuple(tiles.shape)}")
    if not _use_triton(da, quant_impl):
        return swiglu_backward_ref(da, h_fp8, h_s, tiles, pow2)
    if h_fp8.stride() != (2 * I, 1):
        raise ValueError(f"fp8.swiglu_backward: h_fp8 must be contiguous (M, 2I), got strides {h_fp8.stride()}")
    da = da.contiguous()
    T = tiles.shape[1]
    dh_fp8 = torch.empty(M, 2 * I, dtype=out_dtype, device=da.device)
    dh_s = _mmajor_empty(M, 2 * I // BLOCK, da.device)
    dhT, dhT_s = torch.empty(2 * I, T * BLOCK, dtype=out_dtype, device=da.device), _mmajor_empty(2 * I, T, da.device)
    aT, aT_s = torch.empty(I, T * BLOCK, dtype=out_dtype, device=da.device), _mmajor_empty(I, T, da.device)
    if M:
        grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), I // BLOCK)   # noqa: E731
        _swiglu_backward_rows_kernel[grid](da, h_fp8, h_s, dh_fp8, dh_s, M, I, da.stride(0), h_fp8.stride(0),
                                           h_s.stride(0), h_s.stride(1), dh_s.stride(0), dh_s.stride(1),
                                           BLOCK_K=BLOCK, POW2=pow2)
    if T:
        grid = lambda meta: (T, I // meta["BLOCK_K"])   # noqa: E731
        _swiglu_backward_cols_kernel[grid](da, h_fp8, h_s, dhT, dhT_s, aT, aT_s, tiles[1:], I, da.stride(0),
                                           h_fp8.stride(0), h_s.stride(0), h_s.stride(1), dhT.stride(0),
                                           dhT_s.stride(1), aT.stride(0), aT_s.stride(1), BLOCK_M=BLOCK,
                                           QBLOCK=BLOCK, POW2=pow2)
    return dh_fp8, dh_s, dhT, dhT_s, aT, aT_s


# The grouped GEMMs as custom ops. offs (E,) int32 holds the cumulative row ends of the experts'
# groups and stays on the device: the Triton path builds its tile tables from it there
# (_group_tiles), and every shape and grid is a function of (M, K, N, E) alone, so the fakes are
# exact, the host queues the kernels without waiting for the GPU, and nothing here stands in the
# way of a CUDA graph. Only the loop twin reads offs on the host (on the GPU, a sync per op).

@torch.library.custom_op("fp8::grouped_gemm", mutates_args=())
def grouped_gemm_op(a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, offs: Tensor, out_dtype: torch.dtype,
                    tiles: Optional[Tensor] = None) -> Tensor:
    """fp8_grouped_gemm_rows: c[rows of e] = a[rows of e] @ b[e]^T, (M, N). Fprop and Dgrad."""
    with _no_autocast(a):
        return fp8_grouped_gemm_rows(a, a_s, b, b_s, offs, out_dtype, tiles)


@grouped_gemm_op.register_fake
def _(a, a_s, b, b_s, offs, out_dtype, tiles=None):
    return a.new_empty(a.shape[0], b.shape[1], dtype=out_dtype)


@torch.library.custom_op("fp8::quant_t", mutates_args=())
def quant_t_op(x: Tensor, x_s: Optional[Tensor], pow2: bool, tiles: Tensor) -> tuple[Tensor, Tensor]:
    """act_quant_t of x (M, K) into the experts' Wgrad layout (tiles from _group_tiles): x^T
    (K, 128 T) in 128x1 tiles and its scales (K, T); x FP8 in 1x128 tiles with x_s is re-tiled."""
    with _no_autocast(x):
        xT, xT_s = act_quant_t(x, x_s, pow2=pow2, tiles=tiles)
    return xT, _mmajor(xT_s)                                        # (the torch path's are row-major)


@quant_t_op.register_fake
def _(x, x_s, pow2, tiles):
    K, T = x.shape[1], tiles.shape[1]
    return x.new_empty(K, T * BLOCK, dtype=FP8), _mmajor_empty(K, T, x.device)


@torch.library.custom_op("fp8::grouped_gemm_k", mutates_args=())
def grouped_gemm_k_op(a: Tensor, a_s: Tensor, b: Tensor, b_s: Tensor, kblocks: Tensor,
                      out_dtype: torch.dtype) -> Tensor:
    """fp8_grouped_gemm_k: the experts' Wgrad from operands already in 128x1 tiles (E, N, K)."""
    with _no_autocast(a):
        return fp8_grouped_gemm_k(a, a_s, b, b_s, kblocks, out_dtype)


@grouped_gemm_k_op.register_fake
def _(a, a_s, b, b_s, kblocks, out_dtype):
    return a.new_empty(kblocks.shape[0] - 1, a.shape[0], b.shape[0], dtype=out_dtype)


@torch.library.custom_op("fp8::swiglu_quant", mutates_args=())
def swiglu_quant_op(h: Tensor, pow2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """swiglu_quant: h (M, 2I) -> h_fp8, h_s (the FP8 cache), a_fp8, a_s (w2's input)."""
    with _no_autocast(h):
        return swiglu_quant(h, pow2)


@swiglu_quant_op.register_fake
def _(h, pow2):
    M, I2 = h.shape
    return (h.new_empty(M, I2, dtype=FP8), _mmajor_empty(M, I2 // BLOCK, h.device),
            h.new_empty(M, I2 // 2, dtype=FP8), _mmajor_empty(M, I2 // 2 // BLOCK, h.device))


@torch.library.custom_op("fp8::swiglu_backward", mutates_args=())
def swiglu_backward_op(da: Tensor, h_fp8: Tensor, h_s: Tensor, tiles: Tensor,
                       pow2: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """swiglu_backward: dh in 1x128 tiles, dh^T and a^T in 128x1 tiles, from da and h's FP8 cache."""
    with _no_autocast(da):
        return swiglu_backward(da, h_fp8, h_s, tiles, pow2)


@swiglu_backward_op.register_fake
def _(da, h_fp8, h_s, tiles, pow2):
    (M, I), T, dev = da.shape, tiles.shape[1], da.device
    return (da.new_empty(M, 2 * I, dtype=FP8), _mmajor_empty(M, 2 * I // BLOCK, dev),
            da.new_empty(2 * I, T * BLOCK, dtype=FP8), _mmajor_empty(2 * I, T, dev),
            da.new_empty(I, T * BLOCK, dtype=FP8), _mmajor_empty(I, T, dev))


FPROP_OPS = {torch.ops.fp8.gemm.default, torch.ops.fp8.grouped_gemm.default}   # the forward GEMMs (moe.MATMULS)


class _FP8ExpertsFn(torch.autograd.Function):
    """The routed experts' SwiGLU, y = w2(silu(w1 x) * w3 x) per expert, all GEMMs in FP8. w1 and
    w3 run as one weight [w1; w3] (E, 2I, D): one Fprop GEMM gives [w1 x | w3 x], one Dgrad GEMM
    sums both halves' dx, one Wgrad call re-tiles x once for both (9 GEMMs become 7 launches:
    four row-grouped, three Wgrad)."""

    @staticmethod
    def forward(ctx, x, w1, w2, w3, offs, out_dtype, x_fp8, x_s):
        I = w1.shape[1]
        with torch.autocast(x.device.type, enabled=False):
            if x_fp8 is None:  # else x arrived in FP8 (comm.py's dispatch), quantized the same way
                x_fp8, x_s = quant_op(x, True)                           # (M, D): once, for w1 and w3
            w13_fp8, w13_s, w13T = weight_quant_op([w1, w3], pow2_scales)   # (E, 2I, D), blocks, (E, D, 2I)
            w2_fp8, w2_s, w2T = weight_quant_op([w2], pow2_scales)           # (E, D, I), blocks, (E, I, D)
            # the Triton kernels' row tiles, for all four row GEMMs (forward and backward); the loop reads offs
            t = row_tiles(offs, x.shape[0]) if _grouped_triton(x) else None   # (3, cdiv(M, BLOCK_M) + E)
            h = grouped_gemm_op(x_fp8, x_s, w13_fp8, w13_s, offs, out_dtype, t)  # Fprop (M, 2I): [h1 | h3]
            # one pass over h: the SwiGLU inputs cached in FP8 (1x128 tiles of h are those of h1 and
            # of h3, I % 128 == 0), and a = silu(h1) h3 quantized for w2
            h_fp8, h_s, a_fp8, a_s = swiglu_quant_op(h, pow2_scales)
            y = grouped_gemm_op(a_fp8, a_s, w2_fp8, w2_s, offs, out_dtype, t)    # Fprop (M, D)
        ctx.save_for_backward(x_fp8, x_s, h_fp8, h_s, offs, w13T, w13_s, w2T, w2_s, t)
        ctx.pow2, ctx.dtypes = pow2_scales, (x.dtype, w1.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_fp8, x_s, h_fp8, h_s, offs, w13T, w13_s, w2T, w2_s, t = ctx.saved_tensors
        pow2, (x_dtype, w_dtype) = ctx.pow2, ctx.dtypes
        I = w2T.shape[1]
        with torch.autocast(dy.device.type, enabled=False):
            tiles, kblocks = _group_tiles(offs, dy.shape[0])                  # Wgrad's 128-token tiles, for all three
            # the activation gradient before the down-projection: quantized once, for Dgrad and Wgrad
            dy_fp8, dy_s = quant_op(dy.contiguous(), True)                    # (M, D)
            da = grouped_gemm_op(dy_fp8, dy_s, w2T, w2_s.transpose(1, 2), offs, torch.float32, t)  # Dgrad (M, I)
            # one pass from da and the FP8 cache of h: [dh1 | dh3] in 1x128 tiles for the Dgrad and in
            # 128x1 tiles for the Wgrads, and a = silu(h1) h3, recomputed, in 128x1 tiles for w2's
            dh_fp8, dh_s, dhT, dhT_s, aT, aT_s = swiglu_backward_op(da, h_fp8, h_s, tiles, pow2)
            dx = grouped_gemm_op(dh_fp8, dh_s, w13T, w13_s.transpose(1, 2), offs, x_dtype, t)  # Dgrad (M, D), over 2I
            dyT, dyT_s = quant_t_op(dy_fp8, dy_s, True, tiles)                # dy and x re-tiled from FP8
            xT, xT_s = quant_t_op(x_fp8, x_s, True, tiles)                    # (power-of-two scales: lossless)
            dw2 = grouped_gemm_k_op(dyT, dyT_s, aT, aT_s, kblocks, w_dtype)                   # Wgrad (E, D, I)
            dw1 = grouped_gemm_k_op(dhT[:I], dhT_s[:I], xT, xT_s, kblocks, w_dtype)          # Wgrad (E, I, D)
            dw3 = grouped_gemm_k_op(dhT[I:], dhT_s[I:], xT, xT_s, kblocks, w_dtype)
        return dx, dw1, dw2, dw3, None, None, None, None


def _check_experts(*ws):
    for w in ws:
        _check_multiple(w.shape[2], "expert in_features")
        _check_multiple(w.shape[1], "expert out_features")


def fp8_experts(x, w1, w2, w3, offs, x_q=None):
    """The routed experts in FP8: y[rows of e] = w2[e](silu(w1[e] x) * w3[e] x) for the rows of x
    (M, D) sorted by expert; w1, w3 (E, I, D), w2 (E, D, I) stacked; offs int32 (E,) cumulative row
    ends on x's device (torch._grouped_mm's convention; groups may be empty; rows past offs[-1]
    belong to no expert: their y and dx are zeros), never read on the host by the Triton path.
    x_q: x already quantized, (x_fp8, x_s) in 1x128 tiles with power-of-two scales (comm.py's FP8
    dispatch); the gradient still flows to x. Dims must be multiples of 128."""
    _check_experts(w1, w2, w3)
    x_fp8, x_s = x_q if x_q is not None else (None, None)
    return _FP8ExpertsFn.apply(x, w1, w2, w3, offs, _compute_dtype(x), x_fp8, x_s)


def fp8_experts_ref(x, w1, w2, w3, offs, dy):
    """The plain twin of fp8_experts (outside autocast): per expert, forward and backward (for the
    output gradient dy) written out with the plain-torch quantizers and GEMM, at the same
    quantization points. Returns y, dx, dw1, dw2, dw3."""
    q = lambda t, pow2=pow2_scales: act_quant_ref(t, pow2=pow2)                   # noqa: E731  1x128
    qT = lambda t, t_s=None, pow2=pow2_scales: act_quant_t_ref(t, t_s, pow2=pow2)  # noqa: E731  128x1
    fprop = lambda a, W, S: fp8_gemm_ref(*a, W, S, x.dtype)                       # noqa: E731
    dgrad = lambda g, W, S: fp8_gemm_ref(*g, W.t().contiguous(), S.t(), torch.float32)  # noqa: E731
    wgrad = lambda g, a: fp8_gemm_ref(*g, *a, w1.dtype)                           # noqa: E731
    y, dx = torch.zeros_like(x), torch.zeros_like(x)
    dw1, dw2, dw3 = (torch.zeros_like(w) for w in (w1, w2, w3))
    for e, (s, t) in enumerate(_group_bounds(offs)):
        (W1, S1), (W2, S2), (W3, S3) = (weight_quant_ref(w[e], pow2=pow2_scales) for w in (w1, w2, w3))
        xq, gq = q(x[s:t], True), q(dy[s:t], True)                 # power-of-two scales (3.3.3)
        h1, h3 = fprop(xq, W1, S1), fprop(xq, W3, S3)              # (m, I)
        y[s:t] = fprop(q(F.silu(h1) * h3), W2, S2)
        da = dgrad(gq, W2, S2)
        h1, h3 = act_dequant(*q(h1)), act_dequant(*q(h3))          # backward reads the FP8 cache
        sig = torch.sigmoid(h1)
        dh1, dh3 = da * h3 * sig * (1 + h1 * (1 - sig)), da * h1 * sig
        dx[s:t] = dgrad(q(dh1), W1, S1) + dgrad(q(dh3), W3, S3)
        dw1[e] = wgrad(qT(dh1), qT(*xq, True))
        dw2[e] = wgrad(qT(*gq, True), qT(h1 * sig * h3))
        dw3[e] = wgrad(qT(dh3), qT(*xq, True))
    return y, dx, dw1, dw2, dw3


class _FP8GroupedLinearFn(torch.autograd.Function):
    """One grouped Linear, y[rows of e] = x[rows of e] @ w[e]^T: FP8Linear's three GEMMs per expert.
    From BF16/FP32 x, Wgrad's 128x1 tiles of x are quantized in forward from x itself, as
    FP8Linear does; x given in FP8 (x_fp8, dispatched so) is re-tiled in backward from that cache."""

    @staticmethod
    def forward(ctx, x, w, offs, out_dtype, wgrad, x_fp8, x_s):
        xT = xT_s = None
        if x_fp8 is None:
            x_fp8, x_s = quant_op(x, pow2_scales)                        # (M, K), rows independent
            if wgrad:  # 128x1 tiles, each expert's tokens padded apart (the layout of Wgrad below)
                xT, xT_s = quant_t_op(x, None, pow2_scales, _group_tiles(offs, x.shape[0])[0])
        w_fp8, w_s, wT_fp8 = weight_quant_op([w], pow2_scales)           # (E, N, K), (E, N/128, K/128), (E, K, N)
        y = grouped_gemm_op(x_fp8, x_s, w_fp8, w_s, offs, out_dtype)     # Fprop (M, N)
        if xT is not None or not wgrad:
            x_fp8 = x_s = None                  # kept only where Wgrad will re-tile it (x given in FP8)
        ctx.save_for_backward(x_fp8, x_s, xT, xT_s, wT_fp8, w_s, offs)
        ctx.pow2, ctx.dtypes = pow2_scales, (x.dtype, w.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_fp8, x_s, xT, xT_s, wT_fp8, w_s, offs = ctx.saved_tensors
        pow2, (x_dtype, w_dtype) = ctx.pow2, ctx.dtypes
        dx = dw = None
        dy = dy.contiguous()
        if ctx.needs_input_grad[0]:
            dy_fp8, dy_s = quant_op(dy, pow2)                            # (M, N)
            dx = grouped_gemm_op(dy_fp8, dy_s, wT_fp8, w_s.transpose(1, 2), offs, x_dtype)  # Dgrad (M, K)
        if ctx.needs_input_grad[1]:  # Wgrad (E, N, K): dy and x in 128x1 tiles, each expert's tokens padded apart
            tiles, kblocks = _group_tiles(offs, dy.shape[0])
            dyT, dyT_s = quant_t_op(dy, None, pow2, tiles)
            if xT is None:
                xT, xT_s = quant_t_op(x_fp8, x_s, pow2, tiles)          # re-tiled from the FP8 cache
            dw = grouped_gemm_k_op(dyT, dyT_s, xT, xT_s, kblocks, w_dtype)
        return dx, dw, None, None, None, None, None


def fp8_grouped_linear(x, w, offs, x_q=None):
    """One grouped Linear of the routed experts in FP8 (fp8_experts runs three of them, fused with
    the SwiGLU). x (M, K) tokens sorted by expert, w (E, N, K) stacked expert weights, offs as for
    fp8_experts. Returns y (M, N) with y[rows of e] = x[rows of e] @ w[e]^T; all three GEMMs in FP8,
    like FP8Linear. x_q: x already quantized, (x_fp8 (M, K), x_s (M, K/128)) in 1x128 tiles."""
    _check_experts(w)
    x_fp8, x_s = x_q if x_q is not None else (None, None)
    wgrad = torch.is_grad_enabled() and w.requires_grad
    return _FP8GroupedLinearFn.apply(x, w, offs, _compute_dtype(x), wgrad, x_fp8, x_s)


def fp8_grouped_linear_ref(x, w, offs):
    """The plain twin: a loop over experts of FP8Linear's math (zeros for the rows past offs[-1])."""
    bounds = _group_bounds(offs)
    ys = [fp8_linear(x[s:t], w[e]) for e, (s, t) in enumerate(bounds)]
    return F.pad(torch.cat(ys, 0), (0, 0, 0, x.shape[0] - bounds[-1][1]))

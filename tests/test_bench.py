"""bench.py's bookkeeping that runs without a GPU: how `bench.py step` sorts kernels into kinds."""
import bench


def test_kernel_kinds_of_names_from_an_h200_profile():
    """Kernel names from the profiles of `bench.py step` on the H200 (2026-12-02: `small` BF16 and
    FP8, v3-gpu FP8), each with the kind it is summed under. The first matching pattern wins, so
    an Inductor kernel that fuses a norm with an index sum counts as the norm, and one that fuses a
    gather with a quantization as the permutation."""
    kinds = {
        "triton_poi_fused__to_copy_add_copy_copy__div_lerp_mul_sqrt_sub_0": "AdamW",
        "triton_poi_fused__grouped_mm__to_copy_transpose_21": "casts (torch.compile)",
        "triton_poi_fused__to_copy_47": "casts (torch.compile)",
        "triton_poi_fused__to_copy_t_8": "casts (torch.compile)",
        "triton_poi_fused__to_copy_view_45": "casts (torch.compile)",
        "triton_poi_fused__fused_rms_norm_backward__to_copy_add_index_sum_view_50": "RMSNorm (torch.compile)",
        "triton_red_fused__fused_rms_norm__to_copy__unsafe_view_add_mul_sum_unsqueeze_view_27": "RMSNorm (torch.compile)",
        "triton_poi_fused__to_copy_floor_divide_index_22": "token permutation (torch.compile)",
        "triton_poi_fused_floor_divide_index_quant_10": "token permutation (torch.compile)",
        "triton_poi_fused_index_copy_24": "token permutation (torch.compile)",
        "triton_poi_fused_mul_silu_silu_backward_49": "SwiGLU (torch.compile)",
        "triton_red_fused__log_softmax__to_copy__unsafe_view_prepare_softmax_online_view_62": "loss (torch.compile)",
        "triton_poi_fused_cat_slice_transpose_56": "other fused by torch.compile",
        "_swiglu_backward_cols_kernel": "SwiGLU with its FP8 quantization (fused)",
        "_act_quant_t_kernel": "FP8 quantization",
        "_fp8_gemm_rows_grouped_kernel": "grouped GEMM",
        "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26_64x64x192_1x4x1_cga1x1x1": "attention",
        "nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT": "GEMM",
        "_fp8_gemm_kernel": "GEMM",
        "Memset (Unknown)": "memcpy/memset",
        "some_kernel_nobody_named": "other",
    }
    assert {name: bench.kernel_kind(name) for name in kinds} == kinds

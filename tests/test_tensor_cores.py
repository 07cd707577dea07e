"""Kernel-name rules for tensor cores, the time-weighted share, and the profiler tracker on CPU."""

import pytest
import torch

from suite.metrics.tensor_cores import (
    NO_CUDA_REASON,
    ProfilerTensorCoreResult,
    ProfilerTensorCores,
    is_tensor_core_kernel,
    tensor_core_share,
)

# Kernel names as torch profiler / Nsight traces on V100, A100, H100 and RTX cards show them.
TENSOR_CORE_KERNELS = [
    # cuBLAS bf16/fp16 GEMMs on Ampere
    "ampere_bf16_s16816gemm_bf16_256x128_ldg8_f2f_stages_32x3_tn",
    "ampere_bf16_s16816gemm_bf16_128x256_ldg8_f2f_stages_64x3_tn",
    "ampere_fp16_s16816gemm_fp16_128x64_ldg8_f2f_stages_64x4_tn",
    "void cutlass::Kernel2<cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_256x128_32x3_tn_align8>"
    "(cutlass_80_tensorop_bf16_s16816gemm_relu_bf16_256x128_32x3_tn_align8::Params)",
    # TF32 GEMMs (fp32 tensors, TF32 allowed)
    "void cutlass::Kernel2<cutlass_80_tensorop_s1688gemm_128x128_32x3_nn_align4>"
    "(cutlass_80_tensorop_s1688gemm_128x128_32x3_nn_align4::Params)",
    "sm90_xmma_gemm_f32f32_tf32f32_f32_tn_n_tilesize128x128x32_warpgroupsize1x1x1_execute_segment_k_off_kernel__5x_cublas",
    "nvjet_sss_tf32_128x256_TNT",
    # cuBLAS on Hopper/Blackwell (nvjet, xmma with hgmma)
    "nvjet_tst_128x256_64x6_2x1_2cta_v_bz_TNT",
    "nvjet_hsh_192x192_64x3_2x1_v_bz_coopB_NTN",
    "nvjet_sm90_hss_320x128_64x3_1x2_h_bz_coopB_NNT",
    "nvjet_sm100_tst_64x16_64x16_2x4_2cta_h_bz_splitK_TNT",
    "sm90_xmma_gemm_f16f16_f16f16_f16_nt_n_tilesize128x128x64_stage4_gmmastage2_warpgroupsize1x1x1_hgmma64x128x16",
    "sm80_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x32_stage4_warpsize2x2x1_tensor16x8x16_kernel",
    # Volta / Turing HMMA
    "volta_h884gemm_64x64_ldg8_nn",
    "turing_h1688gemm_256x128_ldg8_tn",
    # attention
    "void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, cutlass::bfloat16_t, "
    "Flash_kernel_traits<64, 128, 128, 4, cutlass::bfloat16_t> >, false, true, false, false, true, true, false, false>"
    "(pytorch_flash::Flash_fwd_params)",
    "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<Flash_bwd_kernel_traits<64, 128, 128, 8, 2, "
    "4, 2, false, false, cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 8, cutlass::bfloat16_t> >, "
    "false, true, false, false, false, false, false>(pytorch_flash::Flash_bwd_params)",
    "fmha_cutlassF_bf16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
    "cutlass::arch::Sm80, true, 64, 64, 64, true, true>::Params)",
    # CUTLASS 3 and Inductor templates
    "cutlass3x_sm90_tensorop_gemm_bf16_bf16_f32_bf16_bf16_128x128x64_1x1x1_0_tnn_align8_warpspecialized_cooperative_epi_tma",
    "triton_tem_fused_mm_0",
    "triton_tem_fused_addmm_relu_3",
]

NOT_TENSOR_CORE_KERNELS = [
    # fp32 GEMMs with TF32 off: CUDA-core FFMA, also on H100
    "ampere_sgemm_128x64_tn",
    "ampere_sgemm_64x32_sliced1x4_tn",
    "volta_sgemm_128x64_nn",
    "sm80_xmma_gemm_f32f32_f32f32_f32_tn_n_tilesize128x128x8_stage3_warpsize2x2x1_ffma_aligna4_alignc4"
    "_execute_kernel__5x_cublas",
    "void cutlass::Kernel2<cutlass_80_simt_sgemm_256x128_8x4_nt_align1>"
    "(cutlass_80_simt_sgemm_256x128_8x4_nt_align1::Params)",
    "implicit_convolve_sgemm",
    # cuBLAS helpers around a GEMM
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, false>"
    "(cublasLt::cublasSplitKParams<float>, float const*, __nv_bfloat16 const*, __nv_bfloat16*, float const*, "
    "float const*, __nv_bfloat16 const*, float const*, __nv_bfloat16*, void*, long, float*, int*)",
    "void gemv2T_kernel_val<int, int, float, float, float, float, 128, 16, 4, 4, false, false, "
    "cublasGemvParamsEx<int, cublasGemvTensorStridedBatched<float const>, cublasGemvTensorStridedBatched<float const>, "
    "cublasGemvTensorStridedBatched<float>, float> >(cublasGemvParamsEx<int, "
    "cublasGemvTensorStridedBatched<float const>, cublasGemvTensorStridedBatched<float const>, "
    "cublasGemvTensorStridedBatched<float>, float>, float, float)",
    # FlashAttention pre/post-processing
    "void pytorch_flash::flash_bwd_dot_do_o_kernel<true, Flash_bwd_kernel_traits<64, 128, 128, 8, 2, 4, 2, false, "
    "false, cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 8, cutlass::bfloat16_t> > >"
    "(pytorch_flash::Flash_bwd_params)",
    "void pytorch_flash::flash_bwd_convert_dq_kernel<Flash_bwd_kernel_traits<64, 128, 128, 8, 2, 4, 2, false, false, "
    "cutlass::bfloat16_t, Flash_kernel_traits<64, 128, 128, 8, cutlass::bfloat16_t> > >"
    "(pytorch_flash::Flash_bwd_params, int)",
    # elementwise, reductions, norms, softmax, optimizer, Inductor pointwise/reductions
    "void at::native::vectorized_elementwise_kernel<4, at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, "
    "c10::BFloat16, at::native::binary_internal::MulFunctor<float> >, std::array<char*, 3ul> >(int, "
    "at::native::BinaryFunctor<c10::BFloat16, c10::BFloat16, c10::BFloat16, "
    "at::native::binary_internal::MulFunctor<float> >, "
    "std::array<char*, 3ul>)",
    "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
    "at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, "
    "unsigned int, float, 4, 4> >(at::native::ReduceOp<float, at::native::func_wrapper_t<float, "
    "at::native::sum_functor<float, float, float>::operator()(at::TensorIterator&)::{lambda(float, float)#1}>, "
    "unsigned int, float, 4, 4>)",
    "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float, false>(int, float, "
    "c10::BFloat16 const*, c10::BFloat16 const*, c10::BFloat16 const*, float*, float*, c10::BFloat16*)",
    "void at::native::(anonymous namespace)::GammaBetaBackwardCUDAKernel_32x32<float, float>(long, long, float const*, "
    "float const*, float const*, float const*, float*, float*)",
    "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
    "at::native::(anonymous namespace)::SoftMaxForwardEpilogue>(float*, float const*, int)",
    "void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
    "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, "
    "(at::native::ADAM_MODE)1, false>, float*, double, double, double, double, double, bool, float*, float*>",
    "triton_poi_fused_add_mul_0",
    "triton_per_fused_native_layer_norm_1",
    "triton_red_fused_sum_2",
    "ncclDevKernel_AllReduce_Sum_bf16_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
    "Memcpy HtoD (Pageable -> Device)",
    "Memset (Device)",
]


@pytest.mark.parametrize("name", TENSOR_CORE_KERNELS)
def test_tensor_core_kernels(name):
    assert is_tensor_core_kernel(name)


@pytest.mark.parametrize("name", NOT_TENSOR_CORE_KERNELS)
def test_not_tensor_core_kernels(name):
    assert not is_tensor_core_kernel(name)


def test_unknown_custom_kernels_are_not_counted():
    assert not is_tensor_core_kernel("_attn_fwd")
    assert not is_tensor_core_kernel("my_matmul_kernel")


def test_share_is_time_weighted_and_sums_launches_per_name():
    kernels = [
        ("ampere_bf16_s16816gemm_bf16_128x256_ldg8_f2f_stages_64x3_tn", 60.0),
        ("triton_poi_fused_add_mul_0", 25.0),
        ("ampere_bf16_s16816gemm_bf16_128x256_ldg8_f2f_stages_64x3_tn", 15.0),
        ("ampere_sgemm_128x64_tn", 0.0),
    ]
    share, top = tensor_core_share(kernels)
    assert share == pytest.approx(0.75)
    assert top[0] == ("ampere_bf16_s16816gemm_bf16_128x256_ldg8_f2f_stages_64x3_tn", 75.0)
    assert top[1] == ("triton_poi_fused_add_mul_0", 25.0)


def test_share_keeps_the_top_ten_by_time():
    kernels = [(f"triton_poi_fused_{i}", float(i)) for i in range(1, 16)] + [("nvjet_tst_x", 100.0)]
    share, top = tensor_core_share(kernels)
    assert share == pytest.approx(100.0 / (100.0 + sum(range(1, 16))))
    assert len(top) == 10
    assert top[0] == ("nvjet_tst_x", 100.0)
    assert [t for _, t in top] == sorted((t for _, t in top), reverse=True)


def test_share_is_none_without_time():
    assert tensor_core_share([]) == (None, [])
    share, top = tensor_core_share([("nvjet_tst_x", 0.0)])
    assert share is None and top == [("nvjet_tst_x", 0.0)]
    with pytest.raises(ValueError):
        tensor_core_share([("nvjet_tst_x", -1.0)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_profiler_on_cpu_gives_none_and_a_reason():
    with ProfilerTensorCores() as tracker:
        torch.ones(8, 8) @ torch.ones(8, 8)
    result = tracker.result()
    assert result == ProfilerTensorCoreResult(None, [], NO_CUDA_REASON)
    assert result.reason == "no CUDA device: tensor cores not measured"


def test_result_before_the_window_closes_is_an_error():
    with pytest.raises(RuntimeError):
        ProfilerTensorCores().result()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; torch sees none here")
def test_profiler_sees_a_bf16_matmul_on_tensor_cores():
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.bfloat16)
    a @ a  # warm-up: cuBLAS handle and heuristics outside the window
    torch.cuda.synchronize()
    with ProfilerTensorCores() as tracker:
        for _ in range(3):
            a @ a
    result = tracker.result()
    assert result.share is not None and result.share > 0.9, result

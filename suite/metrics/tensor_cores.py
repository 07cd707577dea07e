"""Share of GPU kernel time spent in tensor-core kernels, read from a torch profiler trace.

The verdict per kernel comes from its *name* (two ordered lists of regular expressions below):
library kernels encode their math in the name (`s16816gemm`, `tensorop`, `xmma`, `nvjet`,
`ffma`, `sgemm`). Known limits:

- It is a heuristic. A name no rule knows counts as not tensor-core (custom CUDA/Triton kernels
  such as `_attn_fwd` or `matmul_kernel` included), and a library may rename its kernels.
- A tensor-core kernel's time counts whole, though part of it is loads, softmax or epilogue;
  a CUDA-core kernel that issues a few MMAs counts as zero.
- The name says what the kernel can do, not the operand dtype: an Inductor `triton_tem_fused_mm`
  with fp32 inputs and TF32 off runs FMAs, and still counts here.
- Copies and fills (Memcpy/Memset) are not kernels and are left out of the total.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

import torch

NO_CUDA_REASON = "no CUDA device: tensor cores not measured"
TOP_N = 10

# Rules that say "not tensor cores". They win over the tensor-core rules below; each exists to
# stop a tensor-core rule from matching, or to name a common CUDA-core family. Matched with
# re.search on the lowercased name.
NOT_TENSOR_CORE_RULES: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"^(memcpy|memset)",  # copy-engine transfers and fills
        r"^triton_(poi|per|red)_",  # Inductor pointwise / persistent reduction / reduction
        r"ffma|simt|dfma",  # explicit FMA-pipe kernels: sm80_xmma_gemm_..._ffma, cutlass_80_simt_sgemm
        r"^(?!.*(tensorop|tf32)).*sgemm",  # fp32 SGEMM on CUDA cores: ampere_sgemm_*, implicit_convolve_sgemm
        r"xmma_\w*f32f32_f32f32_f32",  # all-fp32 xmma with no tf32 operand: the FFMA variant
        r"^nvjet_(sm\d+_)?sss_(?!.*tf32)",  # nvjet with fp32 types and no tf32 mark (none seen; be safe)
        r"gemv|gemmk1|gemmsn_",  # cuBLAS matrix-vector, K=1 and small-N kernels: CUDA cores
        r"splitkreduce|reduce_kernel",  # split-K reduction after a GEMM; at::native::reduce_kernel
        r"elementwise_kernel|multi_tensor_apply",  # at::native elementwise; foreach optimizer steps
        r"^(?!triton_tem_).*((layer|rms|group|batch|instance)_?norm|normalization)",  # norms
        r"^(?!.*(flash|fmha|attn|sdpa)).*softmax",  # standalone softmax (not attention kernels)
        # FlashAttention pre/post-processing around the MMA kernels: dO.O dot, dQ conversion, split-KV combine
        r"flash_bwd_(dot_do_o|convert_dq|convert_dkv)|flash_fwd_splitkv_combine|(pre|post)process",
    )
)

# Rules that say "tensor cores", tried after the rules above; first match wins.
TENSOR_CORE_RULES: tuple[re.Pattern[str], ...] = tuple(
    re.compile(p)
    for p in (
        r"^nvjet_",  # cuBLAS 12.x JIT GEMMs on Hopper/Blackwell (wgmma / tcgen05): nvjet_tst_*, nvjet_sm90_hss_*
        r"sm\d{2,3}_xmma_",  # cuBLAS/cuDNN XMMA GEMM and implicit-GEMM conv (FFMA variants excluded above)
        r"(884|8816|1688|16816|16832)gemm",  # MMA shape in the name: volta_h884gemm, ampere_bf16_s16816gemm, i16832
        r"tensorop",  # CUTLASS 2/3: cutlass_80_tensorop_*, cutlass3x_sm90_tensorop_gemm_*
        r"flash_fwd|flash_bwd|flashattn(fwd|bwd)|flash_(fprop|bprop)",  # FlashAttention 2/3, cuDNN flash SDPA
        r"fmha",  # memory-efficient attention (fmha_cutlassF/B_*) and other fused MHA kernels
        r"^triton_tem_fused_(addmm|bmm|mm)",  # Inductor matmul templates (tl.dot)
        r"(?<![a-z])(wgmma|hgmma|igmma|qgmma|hmma|imma)|tensor\d+x\d+x\d+",  # MMA instruction in the name
    )
)


def is_tensor_core_kernel(name: str) -> bool:
    """True if the kernel name says it runs on tensor cores (NOT rules win; unknown names are False)."""
    lowered = name.lower()
    if any(rule.search(lowered) for rule in NOT_TENSOR_CORE_RULES):
        return False
    return any(rule.search(lowered) for rule in TENSOR_CORE_RULES)


def tensor_core_share(kernels: Iterable[tuple[str, float]]) -> tuple[float | None, list[tuple[str, float]]]:
    """Time-weighted tensor-core fraction of kernel time (None if no time), and the top kernels by time."""
    per_name: dict[str, float] = defaultdict(float)
    for name, time in kernels:
        if time < 0:
            raise ValueError(f"kernel {name!r} has negative time {time}")
        per_name[name] += time
    total = sum(per_name.values())
    top = sorted(per_name.items(), key=lambda item: item[1], reverse=True)[:TOP_N]
    if total <= 0:
        return None, top
    tensor = sum(time for name, time in per_name.items() if is_tensor_core_kernel(name))
    return tensor / total, top


@dataclass(frozen=True)
class ProfilerTensorCoreResult:
    """Tensor-core share of GPU kernel time (0..1) and the kernels it was read from (times in µs)."""

    share: float | None
    top_kernels: list[tuple[str, float]] = field(default_factory=list)
    reason: str | None = None  # why share is None


def _device_time_us(event: object) -> float:
    """Self device time of a profiler event: `self_device_time_total` (torch >= 2.4) or the older name."""
    if hasattr(type(event), "self_device_time_total"):
        return float(event.self_device_time_total)  # type: ignore[attr-defined]
    return float(event.self_cuda_time_total)  # type: ignore[attr-defined]


class ProfilerTensorCores:
    """Runs torch.profiler (CUDA activity only) around a short window and reads the kernel names.

    Profiling slows the host side and its post-processing runs in `__exit__`: keep this window
    out of any timed window (the caller does). On a machine without CUDA, or where the profiler
    cannot record CUDA kernels, entering succeeds and `result()` gives share None and a reason.
    """

    def __init__(self) -> None:
        self._profiler: torch.profiler.profile | None = None
        self._result: ProfilerTensorCoreResult | None = None

    def __enter__(self) -> ProfilerTensorCores:
        if not torch.cuda.is_available():
            self._result = ProfilerTensorCoreResult(None, [], NO_CUDA_REASON)
            return self
        activity = torch.profiler.ProfilerActivity.CUDA
        if activity not in torch.profiler.supported_activities():
            self._result = ProfilerTensorCoreResult(None, [], "torch profiler cannot record CUDA kernels here (CUPTI)")
            return self
        # CPU activity is not needed: Kineto records device kernels on their own (use_cpu=False).
        profiler = torch.profiler.profile(activities=[activity])
        try:
            profiler.__enter__()
        except RuntimeError as exc:  # e.g. another profiler is already running
            self._result = ProfilerTensorCoreResult(None, [], f"torch profiler did not start: {exc}")
            return self
        self._profiler = profiler
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._profiler is None:
            return
        self._profiler.__exit__(exc_type, exc, tb)  # synchronizes the device, then parses the trace
        kernels = [
            (event.name, _device_time_us(event))
            for event in self._profiler.events()
            if event.device_type == torch.autograd.DeviceType.CUDA and not event.name.startswith(("Memcpy", "Memset"))
        ]
        share, top = tensor_core_share(kernels)
        reason = None if share is not None else "the profiler recorded no CUDA kernel time in the window"
        self._result = ProfilerTensorCoreResult(share, top, reason)
        self._profiler = None

    def result(self) -> ProfilerTensorCoreResult:
        """The measurement; only valid after the `with` block has closed."""
        if self._result is None:
            raise RuntimeError("ProfilerTensorCores.result() called before the with-block closed")
        return self._result

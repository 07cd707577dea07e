"""Dense peak FLOP/s per GPU model and compute dtype: the denominator of MFU.

Every figure is the datasheet's *dense* rate (no 2:4 structured sparsity; datasheets print
the sparse rate with an asterisk, and we halve it), for tensor-core math with FP32
accumulation where the datasheet tells the two apart. "fp32" is the non-tensor-core FMA rate;
"int8" is in OP/s; "mxfp8" is the block-scaled MXFP8 rate (32-element blocks, e8m0 scales),
which only Blackwell tensor cores run; "nvfp4" and "mxfp4" are the block-scaled FP4 rates (the
datasheets' "FP4 Tensor Core" row), None wherever no datasheet row of ours gives one. All figures
assume the maximum boost clock: under sustained load the clock is usually lower (PCIe cards and
the 72 W L4 most of all), so an MFU against these peaks understates how busy the units were, never overstates it.

A GPU that is not in the table, or a dtype it lacks, gives `None` and a reason: never the
figure of a "close" GPU.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8", "mxfp8", "nvfp4", "mxfp4")
_T = 1e12  # the table is written in TFLOP/s (TOP/s for int8)


@dataclass(frozen=True)
class _Row:
    display: str  # for messages: "NVIDIA H100 SXM"
    arch: str
    source: str
    fp32: float | None
    tf32: float | None
    fp16: float | None
    bf16: float | None
    fp8: float | None
    int8: float | None
    unconfirmed: tuple[str, ...] = ()  # dtypes left None because no datasheet figure was confirmed
    mxfp8: float | None = None  # MX block-scaled fp8 (Blackwell); None: no MX tensor cores
    nvfp4: float | None = None  # NVFP4 block-scaled fp4 (Blackwell); None: no FP4 tensor cores
    mxfp4: float | None = None  # MXFP4 block-scaled fp4; None: no FP4 tensor cores, or none confirmed
    # datasheet DRAM bandwidth in GB/s (10^9 bytes/s); None: no figure confirmed, `bandwidth_note` says why
    bandwidth: float | None = None
    bandwidth_note: str = ""


# fmt: off
PEAKS: dict[str, _Row] = {
    # Columns: fp32 (CUDA cores), tf32, fp16, bf16, fp8 (tensor cores), int8 (TOP/s); dense TFLOP/s at max boost.
    # NVIDIA V100 datasheet, SXM2 column: FP32 15.7, Tensor 125 (fp16 only), at 1530 MHz boost.
    "V100 SXM2": _Row("NVIDIA V100 SXM2", "Volta", "NVIDIA V100 datasheet, SXM2 column",
                      15.7, None, 125.0, None, None, None,
                      bandwidth=900.0,
                      bandwidth_note="V100 datasheet: 900 GB/s HBM2 (SXM2 and PCIe alike)"),
    # NVIDIA V100 datasheet, PCIe column: FP32 14, Tensor 112, at a lower boost clock than SXM2 (250 W).
    "V100 PCIe": _Row("NVIDIA V100 PCIe", "Volta", "NVIDIA V100 datasheet, PCIe column",
                      14.0, None, 112.0, None, None, None,
                      bandwidth=900.0,
                      bandwidth_note="V100 datasheet: 900 GB/s HBM2 (SXM2 and PCIe alike)"),
    # AWS/NVIDIA A10G datasheet (d1.awsstatic.com, 2022-02-17; NVIDIA publishes none), read through
    # secondary sources: FP32 35, FP16/BF16 70 | 140*, INT8 140 dense. Not the A10's 125/250: a
    # different part. 70 = 80 SMs x 1.71 GHz boost x 512 FLOP/clk; a bf16 matmul measured 66.6 on one.
    # TF32: the only reading found (35) sits in a column labelled "Mixed-precision": left None.
    "A10G": _Row("NVIDIA A10G", "Ampere", "AWS/NVIDIA A10G datasheet (2022-02-17)",
                 35.0, None, 70.0, 70.0, None, 140.0, ("tf32",),
                 bandwidth=None,
                 bandwidth_note="no A10G bandwidth confirmed (600 GB/s is quoted for it, but no datasheet was found)"),
    # NVIDIA L4 datasheet: FP32 30.3; TF32 120*, FP16/BF16 242*, FP8 485*, INT8 485* (halved).
    # Accumulator not stated: check on the GPU. At 72 W the L4 rarely holds its boost clock.
    "L4": _Row("NVIDIA L4", "Ada", "NVIDIA L4 datasheet",
               30.3, 60.0, 121.0, 121.0, 242.5, 242.5,
               bandwidth=300.0,
               bandwidth_note="L4 datasheet: 300 GB/s GDDR6"),
    # NVIDIA L40S datasheet: FP32 91.6; TF32 183 | 366*, FP16/BF16 362.05 | 733*, FP8 733 | 1466*,
    # INT8 733 | 1466*. Accumulator not stated; one codebase (OLMo-core) halves it again as an
    # FP16-accumulate figure, but professional GA102 cards (A40 datasheet) state full-rate FP32
    # accumulate. Check on the GPU. Boost-clock figures.
    "L40S": _Row("NVIDIA L40S", "Ada", "NVIDIA L40S datasheet",
                 91.6, 183.0, 362.05, 362.05, 733.0, 733.0,
                 bandwidth=864.0,
                 bandwidth_note="L40S datasheet: 864 GB/s GDDR6"),
    # NVIDIA A100 datasheet (r4), one set of figures for the SXM and PCIe columns, 40 and 80 GB:
    # FP32 19.5, TF32 156 | 312*, FP16/BF16 312 | 624*, INT8 624 | 1248*. PCIe cards (250-300 W)
    # hold the 1410 MHz boost clock less well than SXM (400 W).
    "A100 SXM 40GB": _Row("NVIDIA A100 SXM 40GB", "Ampere", "NVIDIA A100 datasheet, SXM column",
                          19.5, 156.0, 312.0, 312.0, None, 624.0,
                          bandwidth=1555.0,
                          bandwidth_note="A100 datasheet: 1,555 GB/s HBM2 (40 GB)"),
    "A100 SXM 80GB": _Row("NVIDIA A100 SXM 80GB", "Ampere", "NVIDIA A100 datasheet, SXM column",
                          19.5, 156.0, 312.0, 312.0, None, 624.0,
                          bandwidth=2039.0,
                          bandwidth_note="A100 datasheet: 2,039 GB/s HBM2e (80 GB SXM)"),
    "A100 PCIe 40GB": _Row("NVIDIA A100 PCIe 40GB", "Ampere", "NVIDIA A100 datasheet, PCIe column",
                           19.5, 156.0, 312.0, 312.0, None, 624.0,
                           bandwidth=1555.0,
                           bandwidth_note="A100 datasheet: 1,555 GB/s HBM2 (40 GB)"),
    "A100 PCIe 80GB": _Row("NVIDIA A100 PCIe 80GB", "Ampere", "NVIDIA A100 datasheet, PCIe column",
                           19.5, 156.0, 312.0, 312.0, None, 624.0,
                           bandwidth=None,
                           bandwidth_note="no A100 PCIe 80GB bandwidth confirmed (1,935 GB/s is quoted)"),
    # NVIDIA H100 datasheet, SXM5 column: FP32 67; TF32 989*, FP16/BF16 1979*, FP8 3958*, INT8 3958*.
    # Boost-clock figures; at 700 W the SXM5 holds them best of the H100s.
    "H100 SXM": _Row("NVIDIA H100 SXM", "Hopper", "NVIDIA H100 datasheet, SXM5 column",
                     67.0, 494.5, 989.5, 989.5, 1979.0, 1979.0,
                     bandwidth=3350.0,
                     bandwidth_note="H100 datasheet, SXM5 column: 3.35 TB/s HBM3"),
    # NVIDIA H100 datasheet, PCIe column: FP32 51; TF32 756*, FP16/BF16 1513*, FP8 3026*, INT8 3026*.
    # (Some codebases round the 16-bit figure to 756; half of 1513 is 756.5.) Boost clock, 350 W.
    "H100 PCIe": _Row("NVIDIA H100 PCIe", "Hopper", "NVIDIA H100 datasheet, PCIe column",
                      51.0, 378.0, 756.5, 756.5, 1513.0, 1513.0,
                      bandwidth=2000.0,
                      bandwidth_note="H100 PCIe product brief PB-11133-001: 2,000 GB/s HBM2e"),
    # NVIDIA H100 datasheet, NVL column, per GPU: FP32 60; TF32 835*, FP16/BF16 1671*, FP8 3341*,
    # INT8 3341*. Boost clock, 350-400 W.
    "H100 NVL": _Row("NVIDIA H100 NVL", "Hopper", "NVIDIA H100 datasheet, NVL column",
                     60.0, 417.5, 835.5, 835.5, 1670.5, 1670.5,
                     bandwidth=3900.0,
                     bandwidth_note="H100 datasheet, NVL column: 3.9 TB/s HBM3 per GPU"),
    # NVIDIA H200 datasheet/product page, SXM column: FP32 67; TF32 989*, FP16/BF16 1979*, FP8 and
    # INT8 3958*: the H100 SXM figures (same GH100 compute). Boost clock, 700 W.
    "H200 SXM": _Row("NVIDIA H200 SXM", "Hopper", "NVIDIA H200 datasheet, SXM column",
                     67.0, 494.5, 989.5, 989.5, 1979.0, 1979.0,
                     bandwidth=4800.0,
                     bandwidth_note="H200 datasheet: 4.8 TB/s HBM3e"),
    # NVIDIA H200 datasheet/product page, NVL column: FP32 60; TF32 835*, FP16/BF16 1671*, FP8 and
    # INT8 3341*: the H100 NVL figures. Boost clock, up to 600 W.
    "H200 NVL": _Row("NVIDIA H200 NVL", "Hopper", "NVIDIA H200 datasheet, NVL column",
                     60.0, 417.5, 835.5, 835.5, 1670.5, 1670.5,
                     bandwidth=4800.0,
                     bandwidth_note="H200 datasheet: 4.8 TB/s HBM3e (SXM and NVL alike)"),
    # NVIDIA H100 datasheet, SXM5 column again, for the 64 GB and 94 GB SXM5 boards (PCI ids 2337,
    # 2339): NVIDIA prints one SXM5 column with no memory size and no separate datasheet for
    # these; they are the same GH100 SXM5 part with a different HBM fit-out. Check on the GPU.
    "H100 SXM5 64GB": _Row("NVIDIA H100 SXM5 64GB", "Hopper", "NVIDIA H100 datasheet, SXM5 column",
                           67.0, 494.5, 989.5, 989.5, 1979.0, 1979.0,
                           bandwidth=None,
                           bandwidth_note="no datasheet bandwidth for the 64 GB SXM5 board (a different HBM fit-out)"),
    "H100 SXM5 94GB": _Row("NVIDIA H100 SXM5 94GB", "Hopper", "NVIDIA H100 datasheet, SXM5 column",
                           67.0, 494.5, 989.5, 989.5, 1979.0, 1979.0,
                           bandwidth=None,
                           bandwidth_note="no datasheet bandwidth for the 94 GB SXM5 board (a different HBM fit-out)"),
    # NVIDIA H800 SXM5 datasheet: FP32 67; TF32 989*, FP16/BF16 1979*, FP8 3958*, INT8 3958*: the
    # H100 SXM5 figures (the export part cuts FP64 to 1 TFLOP/s and NVLink to 400 GB/s, not these).
    "H800 SXM": _Row("NVIDIA H800 SXM", "Hopper", "NVIDIA H800 SXM5 datasheet",
                     67.0, 494.5, 989.5, 989.5, 1979.0, 1979.0,
                     bandwidth=None,
                     bandwidth_note="no H800 SXM5 bandwidth confirmed here"),
    # NVIDIA H800 PCIe 80GB datasheet: FP32 51; TF32 756*, FP16/BF16 1513*, FP8 3026*, INT8 3026*.
    "H800 PCIe": _Row("NVIDIA H800 PCIe", "Hopper", "NVIDIA H800 PCIe datasheet",
                      51.0, 378.0, 756.5, 756.5, 1513.0, 1513.0,
                      bandwidth=None,
                      bandwidth_note="no H800 PCIe bandwidth confirmed here"),
    # NVIDIA GH200 Grace Hopper Superchip datasheet, the GPU's figures: FP32 67; TF32 494 | 989*,
    # FP16/BF16 990 | 1979*, FP8 1979 | 3958*, INT8 1979 | 3958* (96 and 144 GB HBM versions alike).
    "GH200": _Row("NVIDIA GH200", "Hopper", "NVIDIA GH200 Grace Hopper Superchip datasheet",
                  67.0, 494.5, 989.5, 989.5, 1979.0, 1979.0,
                  bandwidth=None,
                  bandwidth_note="GH200: 96 GB HBM3 or 144 GB HBM3e, two bandwidths under one name"),
    # NVIDIA HGX B200 datasheet, per-GPU figures (1000 W): FP32 75; TF32 2.2 PF*, FP16/BF16 4.5 PF*,
    # FP8/FP6 9 PF*, INT8 9 POPS* (halved: 1100, 2250, 4500, 4500). MXFP8 runs at the FP8 rate
    # (Blackwell tensor cores scale 32-element blocks in hardware): 4500. FP4 Tensor Core 18 PF* (halved:
    # 9000), NVIDIA's FP4 being NVFP4 (16-element blocks, e4m3 scales); MXFP4 is not named there: left None.
    "B200": _Row("NVIDIA B200", "Blackwell", "NVIDIA HGX B200 datasheet, per GPU",
                 75.0, 1100.0, 2250.0, 2250.0, 4500.0, 4500.0, ("mxfp4",), mxfp8=4500.0, nvfp4=9000.0,
                 bandwidth=8000.0,
                 bandwidth_note="HGX/DGX B200 datasheet: 8 TB/s HBM3e per GPU"),
    # NVIDIA Ada architecture whitepaper, appendix (GeForce RTX 4090): FP32 82.6, TF32 82.6,
    # FP16/BF16 with FP32 accumulate 165.2 (330.3 is the FP16-accumulate rate), FP8 with FP32
    # accumulate 330.3 (660.6 with FP16 accumulate), INT8 660.6, at 2520 MHz boost.
    "RTX 4090": _Row("NVIDIA GeForce RTX 4090", "Ada", "NVIDIA Ada GPU architecture whitepaper, appendix",
                     82.6, 82.6, 165.2, 165.2, 330.3, 660.6,
                     bandwidth=1008.0,
                     bandwidth_note="Ada whitepaper appendix: 384-bit GDDR6X at 21 Gbps = 1,008 GB/s"),
}

# Full-string patterns over the casefolded, space-collapsed name that torch and NVML report.
# A name that matches none (another SKU, a MIG slice, "NVIDIA H100 80GB HBM3 MIG 1g.10gb", a
# CPU) maps to nothing. Order does not matter: every pattern is anchored at both ends, so "h100"
# cannot swallow "h100 nvl", "l4" cannot match "l40s", "a10g" cannot match "a100".
_NAME_RULES: tuple[tuple[str, str], ...] = (
    (r"(nvidia )?h100 80gb hbm3", "H100 SXM"),
    (r"(nvidia )?h100 pcie", "H100 PCIe"),
    (r"(nvidia )?h100 nvl", "H100 NVL"),
    (r"(nvidia )?h200", "H200 SXM"),
    (r"(nvidia )?h200 nvl", "H200 NVL"),
    (r"(nvidia )?h100 sxm5 64gb", "H100 SXM5 64GB"),
    (r"(nvidia )?h100 sxm5 94gb", "H100 SXM5 94GB"),
    (r"(nvidia )?h800", "H800 SXM"),  # torch reports the SXM5 part as "NVIDIA H800"
    (r"(nvidia )?h800 pcie", "H800 PCIe"),
    (r"(nvidia )?gh200( \d+gb?)?( hbm3e?)?", "GH200"),
    (r"(nvidia )?b200", "B200"),
    (r"(nvidia )?a100-sxm4?-40gb", "A100 SXM 40GB"),
    (r"(nvidia )?a100-sxm4?-80gb", "A100 SXM 80GB"),
    (r"(nvidia )?a100-pcie-40gb|(nvidia )?a100 40gb pcie", "A100 PCIe 40GB"),
    (r"(nvidia )?a100-pcie-80gb|(nvidia )?a100 80gb pcie", "A100 PCIe 80GB"),
    (r"((nvidia )?tesla )?v100-sxm2-(16|32)gb", "V100 SXM2"),
    (r"((nvidia )?tesla )?v100-pcie-(16|32)gb", "V100 PCIe"),
    (r"(nvidia )?a10g", "A10G"),
    (r"(nvidia )?l4", "L4"),
    (r"(nvidia )?l40s", "L40S"),
    (r"(nvidia )?geforce rtx 4090", "RTX 4090"),
)
# fmt: on
# Names that omit the memory size; only then is memory_mb consulted (>= 60 GB means 80 GB).
_SIZELESS_A100 = {r"(nvidia )?a100-sxm4?": "A100 SXM", r"(nvidia )?a100[- ]pcie": "A100 PCIe"}


def canonical_gpu(name: str, memory_mb: float | None = None) -> str | None:
    """The table key for a device name as torch/NVML report it, or None if it is not in the table."""
    if name in PEAKS:
        return name
    norm = " ".join(name.split()).casefold()
    for pattern, key in _NAME_RULES:
        if re.fullmatch(pattern, norm):
            return key
    for pattern, stem in _SIZELESS_A100.items():
        if re.fullmatch(pattern, norm) and memory_mb is not None:
            return f"{stem} {'80GB' if memory_mb >= 60_000 else '40GB'}"
    return None


def peak_flops(gpu_name: str, dtype: str, *, memory_mb: float | None = None) -> tuple[float | None, str | None]:
    """(dense peak FLOP/s, None), or (None, a one-line reason naming the GPU and dtype)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is unknown; choose one of {', '.join(DTYPES)}")
    key = canonical_gpu(gpu_name, memory_mb)
    if key is None:
        return None, f"no peak FLOP/s known for GPU {gpu_name!r}; mfu is not computed"
    row = PEAKS[key]
    value = getattr(row, dtype)
    if value is None and dtype in row.unconfirmed:
        return None, f"no confirmed datasheet {dtype} peak for {row.display}; mfu is not computed"
    if value is None:
        return None, f"{row.display} ({row.arch}) has no {dtype} tensor cores; mfu is not computed"
    return value * _T, None


def peak_bandwidth(gpu_name: str, memory_mb: float | None = None) -> tuple[float | None, str | None]:
    """(datasheet DRAM bandwidth in bytes/s, None), or (None, a one-line reason naming the GPU)."""
    key = canonical_gpu(gpu_name, memory_mb)
    if key is None:
        return None, f"no datasheet memory bandwidth known for GPU {gpu_name!r}"
    row = PEAKS[key]
    if row.bandwidth is None:
        return None, f"no datasheet memory bandwidth for {row.display}: {row.bandwidth_note}"
    return row.bandwidth * 1e9, None


def peak_row(gpu_name: str, *, memory_mb: float | None = None) -> dict[str, object] | None:
    """The GPU's table row for printing (TFLOP/s, int8 in TOP/s), or None if it is not in the table."""
    key = canonical_gpu(gpu_name, memory_mb)
    if key is None:
        return None
    row = PEAKS[key]
    return {
        "gpu": key,
        "unit": "dense TFLOP/s at boost clock (int8: TOP/s; mxfp8, nvfp4, mxfp4: block-scaled)",
        **{dtype: getattr(row, dtype) for dtype in DTYPES},
        "source": row.source,
        "bandwidth_gb_s": row.bandwidth,
        "bandwidth_source": row.bandwidth_note,
    }

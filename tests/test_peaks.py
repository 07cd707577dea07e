"""The peak-FLOP/s table: name mapping, documented gaps, and relations any datasheet obeys."""

import pytest

from suite.metrics.peaks import DTYPES, PEAKS, canonical_gpu, peak_flops, peak_row

# Device names as torch.cuda.get_device_name / NVML report them.
REPORTED_NAMES = {
    "NVIDIA H100 80GB HBM3": "H100 SXM",
    "NVIDIA H100 PCIe": "H100 PCIe",
    "NVIDIA H100 NVL": "H100 NVL",
    "NVIDIA H200": "H200 SXM",
    "NVIDIA H200 NVL": "H200 NVL",
    "NVIDIA A100-SXM4-80GB": "A100 SXM 80GB",
    "NVIDIA A100-SXM4-40GB": "A100 SXM 40GB",
    "NVIDIA A100-SXM-80GB": "A100 SXM 80GB",
    "NVIDIA A100-PCIE-40GB": "A100 PCIe 40GB",
    "NVIDIA A100 80GB PCIe": "A100 PCIe 80GB",
    "Tesla V100-SXM2-16GB": "V100 SXM2",
    "Tesla V100-SXM2-32GB": "V100 SXM2",
    "Tesla V100-PCIE-16GB": "V100 PCIe",
    "Tesla V100-PCIE-32GB": "V100 PCIe",
    "NVIDIA A10G": "A10G",
    "NVIDIA L4": "L4",
    "NVIDIA L40S": "L40S",
    "NVIDIA GeForce RTX 4090": "RTX 4090",
    "NVIDIA B200": "B200",
    "NVIDIA GH200 480GB": "GH200",
    "NVIDIA GH200 120GB": "GH200",
    "NVIDIA GH200 144G HBM3e": "GH200",
    "NVIDIA H800": "H800 SXM",
    "NVIDIA H800 PCIe": "H800 PCIe",
    "NVIDIA H100 SXM5 64GB": "H100 SXM5 64GB",
    "NVIDIA H100 SXM5 94GB": "H100 SXM5 94GB",
}

UNKNOWN_NAMES = [
    "NVIDIA GeForce RTX 3060",
    "NVIDIA B200A",  # another Blackwell part
    "AMD Instinct MI300X",
    "Intel(R) Xeon(R) Platinum 8480C",
    "NVIDIA H100",  # no form factor: SXM, PCIe and NVL differ, so no guess
    "NVIDIA H20",  # a prefix of "H200", a different part
    "NVIDIA H800L 94GB",  # the H800 NVL: no datasheet row
    "NVIDIA A10",  # not the A10G
    "NVIDIA A100-SXM4-40GB MIG 1g.5gb",  # a MIG slice has a fraction of the SMs
    "NVIDIA L40",
    "NVIDIA GeForce RTX 4090 D",
    "NVIDIA GeForce RTX 4090 Laptop GPU",
    "Tesla V100S-PCIE-32GB",
    "Tesla V100-SXM3-32GB",
    "NVIDIA GB200",  # not a GH200
    "",
]


@pytest.mark.parametrize(("name", "key"), REPORTED_NAMES.items())
def test_reported_names_map_to_their_row(name, key):
    assert canonical_gpu(name) == key
    assert canonical_gpu(f"  {name.lower()} ") == key  # case and surrounding space do not matter
    assert key in PEAKS


@pytest.mark.parametrize("name", UNKNOWN_NAMES)
def test_unknown_names_map_to_none(name):
    assert canonical_gpu(name) is None
    assert peak_row(name) is None


@pytest.mark.parametrize(
    ("name", "key", "not_key"),
    [
        ("NVIDIA H100 NVL", "H100 NVL", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe", "H100 SXM"),
        ("NVIDIA H200 NVL", "H200 NVL", "H200 SXM"),
        ("NVIDIA L40S", "L40S", "L4"),
        ("NVIDIA L4", "L4", "L40S"),
        ("NVIDIA A10G", "A10G", "A100 SXM 40GB"),
    ],
)
def test_confusable_names_stay_apart(name, key, not_key):
    assert canonical_gpu(name) == key != not_key


def test_table_keys_map_to_themselves():
    assert all(canonical_gpu(key) == key for key in PEAKS)


def test_memory_only_decides_when_the_name_omits_it():
    assert canonical_gpu("NVIDIA A100-SXM4", memory_mb=81920) == "A100 SXM 80GB"
    assert canonical_gpu("NVIDIA A100-PCIE", memory_mb=40960) == "A100 PCIe 40GB"
    assert canonical_gpu("NVIDIA A100-SXM4") is None
    assert canonical_gpu("NVIDIA A100-SXM4-40GB", memory_mb=81920) == "A100 SXM 40GB"


def test_known_figures():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == (989.5e12, None)
    assert peak_flops("NVIDIA A100-SXM4-40GB", "tf32") == (156e12, None)
    assert peak_flops("NVIDIA GeForce RTX 4090", "fp16") == (165.2e12, None)  # FP32 accumulate
    assert peak_flops("NVIDIA A10G", "bf16") == (70e12, None)
    assert peak_flops("Tesla V100-SXM2-16GB", "fp32") == (15.7e12, None)


@pytest.mark.parametrize("key", PEAKS)
def test_every_row_has_fp32_and_bf16_or_says_why(key):
    for dtype in ("fp32", "bf16"):
        value, reason = peak_flops(key, dtype)
        assert (value is None) != (reason is None)
        if value is None:
            assert PEAKS[key].display in reason and dtype in reason
        else:
            assert value > 1e12


def test_missing_dtypes_name_the_gpu_and_dtype():
    assert peak_flops("Tesla V100-SXM2-32GB", "bf16") == (
        None,
        "NVIDIA V100 SXM2 (Volta) has no bf16 tensor cores; mfu is not computed",
    )
    value, reason = peak_flops("NVIDIA A100 80GB PCIe", "fp8")
    assert value is None and "A100" in reason and "fp8" in reason
    value, reason = peak_flops("NVIDIA A10G", "tf32")
    assert value is None and "A10G" in reason and "tf32" in reason and "confirmed" in reason


def test_unknown_gpu_gives_a_reason_naming_it():
    value, reason = peak_flops("NVIDIA GeForce RTX 3060", "bf16")
    assert value is None
    assert reason == "no peak FLOP/s known for GPU 'NVIDIA GeForce RTX 3060'; mfu is not computed"


def test_unknown_dtype_raises_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="fp32, tf32, fp16, bf16, fp8, int8"):
        peak_flops("NVIDIA H100 80GB HBM3", "fp64")
    with pytest.raises(ValueError):
        peak_flops("NVIDIA GeForce RTX 3060", "float16")  # checked before the GPU


@pytest.mark.parametrize("key", PEAKS)
def test_sanity_relations(key):
    row = PEAKS[key]
    chain = [v for v in (row.tf32, row.fp16, row.fp8) if v is not None]
    assert chain == sorted(chain), "tf32 <= fp16 <= fp8"
    if row.fp16 is not None and row.bf16 is not None:
        assert row.bf16 == row.fp16
    if row.tf32 is not None:
        assert row.tf32 >= row.fp32 or row.fp32 is None
    assert all(getattr(row, d) is None or getattr(row, d) > 0 for d in DTYPES)


def test_h200_sxm_is_h100_sxm_and_nvl_pairs_match():
    for dtype in DTYPES:
        assert getattr(PEAKS["H200 SXM"], dtype) == getattr(PEAKS["H100 SXM"], dtype)
        assert getattr(PEAKS["H200 NVL"], dtype) == getattr(PEAKS["H100 NVL"], dtype)


def test_peak_row_for_printing():
    row = peak_row("NVIDIA L40S")
    assert row is not None
    assert row["gpu"] == "L40S" and row["bf16"] == 362.05 and "datasheet" in row["source"]
    assert set(DTYPES) <= set(row)


def test_new_rows_dense_figures():
    """Issue 12 item 11: B200 per GPU (HGX datasheet, sparse / 2), GH200, H800, H100 SXM5 variants."""
    b200 = {d: peak_flops("NVIDIA B200", d)[0] for d in DTYPES}
    assert b200 == {"fp32": 75e12, "tf32": 1100e12, "fp16": 2250e12, "bf16": 2250e12, "fp8": 4500e12,
                    "int8": 4500e12, "mxfp8": 4500e12, "nvfp4": 9000e12, "mxfp4": None}  # fmt: skip
    for name in ("NVIDIA GH200 480GB", "NVIDIA H800", "NVIDIA H100 SXM5 64GB", "NVIDIA H100 SXM5 94GB"):
        assert peak_flops(name, "bf16") == (989.5e12, None) and peak_flops(name, "fp8") == (1979e12, None)
    assert peak_flops("NVIDIA H800 PCIe", "int8") == (1513e12, None)


def test_mxfp8_only_on_blackwell():
    value, reason = peak_flops("NVIDIA H100 80GB HBM3", "mxfp8")
    assert value is None and "H100" in reason and "mxfp8" in reason
    assert [k for k, row in PEAKS.items() if row.mxfp8 is not None] == ["B200"]


def test_memory_bandwidth_from_the_datasheet_or_a_reason():
    from suite.metrics.peaks import peak_bandwidth

    assert peak_bandwidth("NVIDIA H100 80GB HBM3") == (3.35e12, None)
    assert peak_bandwidth("NVIDIA H100 PCIe") == (2.0e12, None)
    assert peak_bandwidth("NVIDIA H200") == (4.8e12, None)
    assert peak_bandwidth("NVIDIA A100-SXM4-80GB") == (2.039e12, None)
    value, reason = peak_bandwidth("NVIDIA A10G")  # no datasheet figure confirmed: no figure
    assert value is None and "A10G" in reason and "600" in reason
    value, reason = peak_bandwidth("NVIDIA GeForce RTX 3060")
    assert value is None and "RTX 3060" in reason
    for key, row in PEAKS.items():  # every row: a figure with its source, or None with why
        assert row.bandwidth_note, key
        assert row.bandwidth is None or row.bandwidth > 100, key
    assert peak_row("NVIDIA L40S")["bandwidth_gb_s"] == 864.0

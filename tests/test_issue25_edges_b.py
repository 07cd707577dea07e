"""Edges the dark-code check found untested (issue 25): the CPU cache and free-memory readers behind the
bandwidth copy's size, a 4-bit GEMM in `mpbench gemms`, an arithmetic timed only with fast accumulation,
and the optimizer implementation a record names when torch's defaults or the optimizer are not the usual."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.optim.adam as torch_adam

from suite import hardware
from suite.hardware import DeviceInfo
from suite.metrics import calibration, roofline
from suite.metrics import gemms as gemms_mod
from suite.modes import optimizer as opt_mod
from suite.modes.base import ADAM_BETAS

CPU = DeviceInfo("cpu", "test cpu")


def _cache_index(root: Path, name: str, level: str | None, size: str | None) -> None:
    """One sysfs cache directory (index0...), with the files given (None: the file is absent)."""
    (root / name).mkdir(parents=True)
    for field, text in (("level", level), ("size", size)):
        if text is not None:
            (root / name / field).write_text(text + "\n")


def test_the_last_level_cache_skips_indexes_it_cannot_read_or_parse(tmp_path):
    _cache_index(tmp_path, "index0", "1", "48K")
    _cache_index(tmp_path, "index1", "2", "2048K")
    _cache_index(tmp_path, "index2", "3", "30M")
    _cache_index(tmp_path, "index3", None, "64M")  # no level file: OSError
    _cache_index(tmp_path, "index4", "four", "64M")  # level not a number
    _cache_index(tmp_path, "index5", "4", "")  # empty size (a partial sysfs): passed over, not a crash
    _cache_index(tmp_path, "index6", "4", "lotsK")
    assert calibration._last_level_cache(tmp_path) == 30 * 2**20
    assert calibration._last_level_cache(tmp_path / "absent") is None  # off Linux: no sysfs at all


def test_available_memory_is_none_without_a_readable_memavailable_line(tmp_path):
    meminfo = tmp_path / "meminfo"
    assert hardware.available_ram(meminfo) is None  # no /proc (macOS): OSError
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         8000000 kB\n")
    assert hardware.available_ram(meminfo) is None  # a kernel before 3.14: no MemAvailable
    meminfo.write_text("MemAvailable:\n")
    assert hardware.available_ram(meminfo) is None  # IndexError
    meminfo.write_text("MemAvailable:   many kB\n")
    assert hardware.available_ram(meminfo) is None  # ValueError
    meminfo.write_text("MemTotal:       16000000 kB\nMemAvailable:    1000000 kB\n")
    assert hardware.available_ram(meminfo) == 1000000 * 1024


@pytest.mark.real_copy_bytes
def test_copy_bytes_reads_the_machines_files_and_needs_neither(monkeypatch, tmp_path):
    _cache_index(tmp_path / "cache", "index0", "3", "256M")
    (tmp_path / "meminfo").write_text("MemAvailable:   16777216 kB\n")  # 16 GiB free
    real_cache, real_mem = calibration._last_level_cache, hardware.available_ram
    monkeypatch.setattr(calibration, "_last_level_cache", lambda: real_cache(tmp_path / "cache"))
    monkeypatch.setattr(calibration, "available_ram", lambda: real_mem(tmp_path / "meminfo"))
    assert calibration.copy_bytes(CPU) == 2**30  # 4 x 256 MiB of cache, under 1/8 of 16 GiB
    monkeypatch.setattr(calibration, "available_ram", lambda: real_mem(tmp_path / "absent"))
    monkeypatch.setattr(calibration, "_last_level_cache", lambda: real_cache(tmp_path / "absent"))
    assert calibration.copy_bytes(CPU) == calibration.MIN_COPY_BYTES  # nothing known: the floor, uncapped


def test_a_4bit_gemm_is_listed_untimed_with_why(monkeypatch, tmp_path):
    # roofline models mxfp4/nvfp4 operands but no peak column and no kernel of ours times them
    monkeypatch.setenv("MPBENCH_CALIBRATION_DIR", str(tmp_path / "cal"))
    gemm = roofline.Gemm("blocks.0.mlp.c_fc", "forward", 64, 64, 64, "mxfp4", "nvfp4", "bf16")
    timer = gemms_mod.Timer(CPU, repeats=1)
    monkeypatch.setattr(timer, "gemm", lambda *a, **k: pytest.fail("a 4-bit GEMM must not be timed"))
    (row,) = gemms_mod.rows_of("fp4-test", [gemm], timer, gemms_mod.Ceilings(CPU))
    assert row["arithmetic"] is None and row["skipped_reason"] == "a 4-bit format: no arithmetic of ours times it"
    assert row["measured_ms"] is None and row["predicted_reason"] == "no peak column"
    assert gemms_mod.biggest([row], CPU) == []


def _row(arith: str, flops: float, tflops: float, fast: bool) -> dict:
    return {"mode": "fp8-rowwise", "arithmetic": arith, "layer": "mlp.c_fc", "gemm": "forward", "m": 64,
            "k": 64, "n": 64, "flops": flops, "tflops": tflops, "measured_ms": 1.0, "fast_accum": fast}  # fmt: skip


def test_an_arithmetic_timed_only_with_fast_accumulation_is_not_set_against_the_ceiling(monkeypatch):
    # torchao's rowwise forward is its only "fp8-rowwise" GEMM, with fast accumulation; the calibrated
    # ceiling was timed without it, so that arithmetic has no like-for-like row
    monkeypatch.setattr(calibration, "ceiling", lambda device, dtype: (100e12, None))
    rows = [_row("fp8-rowwise", 9e9, 90.0, True), _row("fp8-rowwise-rescaled", 8e9, 50.0, False),
            _row("fp8-rowwise-rescaled", 4e9, 70.0, True)]  # fmt: skip
    (top,) = gemms_mod.biggest(rows, CPU)
    assert top["arithmetic"] == "fp8-rowwise-rescaled" and top["tflops"] == 50.0
    assert top["of_ceiling"] == pytest.approx(0.5)


def test_a_device_torch_has_no_fused_kernel_for_keeps_torchs_default(monkeypatch):
    # torch's list (`_get_fused_kernels_supported_devices`) is read at each call: were cpu dropped from it,
    # the CPU parameters go to torch's own default rather than to a fused=True torch would refuse
    monkeypatch.setattr(opt_mod, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    p = torch.nn.Parameter(torch.randn(4))
    assert opt_mod.fused_refusal(p, CPU) == "torch has no fused AdamW kernel for cpu"
    opt = opt_mod.adamw([{"params": [p]}], CPU, lr=1e-3, betas=ADAM_BETAS, eps=1e-8)
    assert opt.defaults["fused"] is None and opt.param_groups[0]["fused"] is None
    assert opt_mod.optimizer_impl(opt) == "torch AdamW (for-loop)"


@pytest.mark.parametrize("lr, expected", [(1e-3, "foreach"), (torch.tensor(1e-3), "for-loop")])
def test_a_tensor_lr_turns_torchs_default_foreach_off_as_torch_does(monkeypatch, lr, expected):
    # parameters torch would run foreach on (CUDA's): faked on CPU tensors in both torch's adam and ours
    foreach_device = lambda params, differentiable, use_fused=False: (False, True)  # noqa: E731
    monkeypatch.setattr(torch_adam, "_default_to_fused_or_foreach", foreach_device)
    monkeypatch.setattr(opt_mod, "_default_to_fused_or_foreach", foreach_device)
    p = torch.nn.Parameter(torch.randn(5, 3))
    p.grad = torch.randn(5, 3)
    opt = torch.optim.AdamW([p], lr=lr)
    assert opt_mod.optimizer_impl(opt) == f"torch AdamW ({expected})"
    ran: set[str] = set()
    for impl, fn in (("foreach", "_multi_tensor_adam"), ("for-loop", "_single_tensor_adam")):
        real = getattr(torch_adam, fn)
        monkeypatch.setattr(torch_adam, fn, lambda *a, _r=real, _i=impl, **k: (ran.add(_i), _r(*a, **k))[1])
    opt.step()
    assert ran == {expected}  # what torch ran, named the same


def test_an_optimizer_other_than_adam_is_named_by_its_class():
    p = torch.nn.Parameter(torch.randn(3))
    assert opt_mod.optimizer_impl(torch.optim.SGD([p], lr=0.1)) == "torch.optim.sgd.SGD"
    named = torch.optim.SGD([p], lr=0.1)
    named.impl = "SGD (mpbench, for-loop)"  # a mode's own optimizer names itself
    assert opt_mod.optimizer_impl(named) == "SGD (mpbench, for-loop)"

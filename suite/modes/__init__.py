"""The precision-mode registry: adding a mode is one file and one line here."""

from __future__ import annotations

from suite.hardware import DeviceInfo
from suite.modes.amp_fp16 import AmpFP16
from suite.modes.base import PrecisionMode
from suite.modes.bf16 import BF16
from suite.modes.fp8_rowwise import FP8Rowwise
from suite.modes.fp8_tensorwise import FP8Tensorwise
from suite.modes.fp32 import FP32
from suite.modes.int8_mixed import Int8Mixed
from suite.modes.int8_weight import Int8Weight
from suite.modes.mxfp4 import MXFP4
from suite.modes.mxfp8 import MXFP8
from suite.modes.nvfp4 import NVFP4
from suite.modes.pure_bf16 import PureBF16
from suite.modes.pure_bf16_sr import PureBF16SR
from suite.modes.pure_fp16 import PureFP16
from suite.modes.tf32 import TF32

MODES: dict[str, type[PrecisionMode]] = {
    m.name: m
    for m in (FP32, TF32, AmpFP16, BF16, PureFP16, Int8Weight)
    + (PureBF16, PureBF16SR, Int8Mixed, FP8Tensorwise, FP8Rowwise, MXFP8)  # issue 14: 8-bit and pure bf16
    + (NVFP4, MXFP4)  # issue 26: 4-bit
}


def get_mode(name: str) -> type[PrecisionMode]:
    """Mode class by name; ValueError listing the known names."""
    if name not in MODES:
        raise ValueError(f"mode={name!r} is unknown; choose from {', '.join(MODES)}")
    return MODES[name]


def build_mode(name: str, device: DeviceInfo, keep_high: str = "", fp4_recipe: str = "") -> PrecisionMode:
    """The mode a case runs: its class on `device`, told the case's layer policy and 4-bit recipe (a Case holds
    them resolved; "" here: the mode's defaults)."""
    mode = get_mode(name)(device)
    mode.configure(keep_high, fp4_recipe)
    return mode


__all__ = ["MODES", "PrecisionMode", "build_mode", "get_mode"]

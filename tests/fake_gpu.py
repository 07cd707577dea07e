"""GPUs as torch would see them, on a CPU build: enough for a GPU path to run until it first moves
something to a GPU, which is where the fake stops it and says which device, and which was current.

What it fakes is what the suite calls before any CUDA work: `is_available`, `device_count`, the
name, capability and properties (total memory), `set_device`, `current_device` and the `torch.cuda.device` context; then
`nn.Module.to` onto a CUDA device raises `GpuReached` after recording the move. So a test can
follow the device a user names through an entry point (CLI, config, API, torchrun rank, fidelity)
down to the first transfer, with nothing but a CPU.
"""

from __future__ import annotations

import contextlib
import types

import pytest
import torch
import torch.nn as nn


class GpuReached(Exception):
    """A model was moved to a (fake) GPU: the path got that far, with that device."""


class FakeGpus:
    """`count` identical GPUs of `name` and `capability`; `moves` lists (target, current GPU) per transfer."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, count: int = 2, name: str = "NVIDIA H100 80GB HBM3",
                 capability: tuple[int, int] = (9, 0), memory_gib: int = 80) -> None:  # fmt: skip
        self.count, self.name, self.capability = count, name, capability
        self.current = 0
        self.set_devices: list[int] = []
        self.moves: list[tuple[str, int]] = []
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "device_count", lambda: self.count)
        monkeypatch.setattr(cuda, "get_device_name", lambda index=None: self.name)
        monkeypatch.setattr(cuda, "get_device_capability", lambda index=None: self.capability)
        props = types.SimpleNamespace(name=name, total_memory=memory_gib * 2**30, major=capability[0],
                                      minor=capability[1])  # fmt: skip
        monkeypatch.setattr(cuda, "get_device_properties", lambda index=None: props)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "set_device", self._set_device)
        monkeypatch.setattr(cuda, "device", self._device)
        real_to = nn.Module.to

        def to(module: nn.Module, *args, **kwargs):
            target = torch._C._nn._parse_to(*args, **kwargs)[0]
            if target is not None and target.type == "cuda":
                self.moves.append((str(target), self.current))
                raise GpuReached(f"{type(module).__name__} moved to {target} while cuda:{self.current} was current")
            return real_to(module, *args, **kwargs)

        monkeypatch.setattr(nn.Module, "to", to)

    def _index(self, device: object) -> int:
        index = device if isinstance(device, int) else torch.device(device).index
        if index is None or not 0 <= index < self.count:
            raise RuntimeError(f"fake: invalid device ordinal {device!r} ({self.count} GPUs)")
        return index

    def _set_device(self, device: object) -> None:
        self.current = self._index(device)
        self.set_devices.append(self.current)

    @contextlib.contextmanager
    def _device(self, device: object):
        previous, self.current = self.current, self._index(device)
        try:
            yield
        finally:
            self.current = previous


class FakeGpuWindow:
    """A GPU's measured window (stands in for suite.metrics.window.MeasuredWindow): it keeps 3 steps after the
    timed window for the profiler; GPM gave `gpm_figure`, or (None) no figure, so those steps are profiled."""

    def __init__(self, device, gpm_figure=None) -> None:
        self.gpm_figure = gpm_figure

    def profiler_steps(self, steps_after_warmup: int) -> int:
        return 3

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def paused(self):
        return contextlib.nullcontext()

    def fields(self, timed_steps, tokens_per_step):
        if self.gpm_figure is None:
            return {"tensor_core_util_reason": "GPM read failed: Unknown Error (NVMLError_Unknown)"}
        return {"tensor_core_util": self.gpm_figure, "tensor_core_util_source": "nvml-gpm"}

"""Shared test helpers: small CPU cases and a global-state snapshot."""

from __future__ import annotations

import torch

from suite.modes.base import fp32_precision_state
from suite.training.case import Case


class NoProcPath:
    """Stands in for pathlib.Path on a machine without /proc (macOS): every read fails."""

    def __init__(self, *_):
        pass

    def read_text(self):
        raise OSError("no /proc")


def error_line(capsys) -> str:
    """The one line a refused command printed to stderr (asserting it printed exactly one)."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def small_case(**overrides) -> Case:
    """A case that trains in well under a second on CPU, fp16 modes included."""
    values = dict(model="tiny", device="cpu", batch_size=2, seq_len=32, steps=3, warmup=1, eval_batches=1)
    return Case(**(values | overrides))


def numerics_globals() -> dict[str, object]:
    """Every process-wide setting a precision mode could touch."""
    return {
        **fp32_precision_state(),
        "default_dtype": torch.get_default_dtype(),
        "grad_enabled": torch.is_grad_enabled(),
        "autocast_cpu": torch.is_autocast_enabled("cpu"),
        "autocast_cuda": torch.is_autocast_enabled("cuda"),
    }


def keep_saved_figures(monkeypatch, *modules) -> dict:
    """Every chart's figure by file name, kept as `modules`' `save` saves it, to read what was drawn."""
    from suite.reporting import charts

    drawn, save = {}, charts.save

    def keep(fig, path):
        drawn[path.name] = fig
        return save(fig, path)

    for module in modules:
        monkeypatch.setattr(module, "save", keep)
    return drawn

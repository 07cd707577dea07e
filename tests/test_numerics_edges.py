"""The edges of the numerics statistics: hooks that cannot be registered, a Linear run twice in a step, a
sampler that cannot be set up, records that share no sampled step, a malformed field, narrow terminals and
charts of many layers and steps. None of them may fail a case or crash a command."""

from __future__ import annotations

import math

import pandas as pd
import torch
import torch.nn as nn
from PIL import Image

from suite.cli.summary import numerics_block
from suite.modes import get_mode
from suite.records import store, validate
from suite.reporting import numerics_charts
from suite.reporting import numerics_table as nt
from suite.reporting.compare import compare_runs
from suite.running.execute import train_in_process
from suite.training import numerics as numerics_mod
from suite.training.numerics import ROLES, Sampler
from tests.helpers import small_case
from tests.test_numerics_report import _planted, _record, training


def _fp32_formats(*layers: str) -> dict[str, dict[str, str]]:
    return dict.fromkeys(layers, dict.fromkeys(ROLES, "fp32"))


def test_hooks_that_cannot_be_registered_leave_the_step_unwatched_with_why(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(numerics_mod, "watch", broken)
    model = nn.Sequential(nn.Linear(4, 4))
    sampler = Sampler(model, ["0"], _fp32_formats("0"), [1], dict.fromkeys(ROLES, "fp32"))
    with sampler.sampling(1):
        model(torch.randn(3, 4)).sum().backward()  # the step still trains
    fields = sampler.fields()
    assert pd.DataFrame(fields["numerics"]).amax.isna().all()
    assert "the hooks could not be registered: RuntimeError: planted" in fields["numerics_reason"]


class _Twice(nn.Module):
    """A Linear called twice in one forward (weight sharing): two sets of tensors for one (layer, role)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.lin(x))


def test_a_layer_run_twice_in_a_step_records_its_first_call_and_says_so():
    model = _Twice()
    sampler = Sampler(model, ["lin"], _fp32_formats("lin"), [1], dict.fromkeys(ROLES, "fp32"))
    x = torch.randn(3, 4)
    with sampler.sampling(1):
        model(x).sum().backward()
    fields = sampler.fields()
    df = pd.DataFrame(fields["numerics"]).set_index("role")
    assert len(df) == len(ROLES) and df.loc["input", "amax"] == x.abs().max().item()  # the first call's input
    assert "a layer ran more than once in a step; its first call's tensors are recorded" in fields["numerics_reason"]


def test_a_sampler_that_cannot_be_set_up_leaves_the_case_ok_and_unsampled(monkeypatch):
    def broken(self, layer=None):
        raise RuntimeError("planted")

    monkeypatch.setattr(get_mode("fp32"), "tensor_formats", broken)
    values = train_in_process(small_case(steps=6, warmup=1, numerics_every=3), 1, "fp32", lambda event: None)
    assert values["status"] == "ok" and values["final_loss"] is not None and values.get("numerics") is None
    assert values["numerics_reason"] == "the statistics could not be set up: RuntimeError: planted"


def test_the_reader_refuses_a_numerics_field_that_is_not_an_object_and_reads_inf_as_text():
    bad = {"model": "tiny", "mode": "bf16", "status": "ok", "numerics": [1, 2]}
    assert validate.problem(bad, store.STATUSES) == "field 'numerics' is [1, 2], not an object"
    cols = training("bf16")
    cols["sqnr_db"] = ["inf" if math.isinf(v) else v for v in cols["sqnr_db"]]  # as a hand-edited file has it
    cells, why = nt.read({"numerics": cols}, "numerics")
    assert why is None and sum(c.sqnr_db == math.inf for c in cells) == cols["sqnr_db"].count("inf") > 0


def test_records_that_sampled_no_step_in_common_are_not_compared_and_say_so():
    a = _planted({})
    b = dict(a, step=[s + 1 for s in a["step"]])  # steps 3, 5, 7 against 2, 4, 6
    cells_a, _ = nt.read({"numerics": a}, "numerics")
    cells_b, _ = nt.read({"numerics": b}, "numerics")
    assert nt.drops(cells_a, cells_b) == ([], None)
    rows = [r for r in compare_runs([_record("bf16", numerics=a)], [_record("bf16", numerics=b)]) if "sqnr" in r.metric
            or "numerics" in r.metric or "no step in common" in r.message]  # fmt: skip
    assert [(r.verdict, "A and B sampled no step in common: not compared" in r.message) for r in rows] == [
        ("info", True)]  # fmt: skip


def test_the_summary_block_on_a_narrow_terminal_says_what_it_left_out():
    lines = numerics_block([_record("bf16", numerics=_planted({(6, "blocks.0.mlp.c_fc"): 30.0}))], 40)
    assert lines[-1].startswith("left out at 40 columns:")
    assert "blocks.0.mlp.c_fc" in "\n".join(lines)


def test_an_amax_chart_of_many_layers_and_steps_and_odd_panels_is_drawn(tmp_path):
    layers = [f"blocks.{i}.mlp.c_fc" for i in range(14)]  # more than the legend names
    steps = range(1, 16)  # more than a tick each
    panels = {role: {layer: [(s, 0.1 * s + i) for s in steps] for i, layer in enumerate(layers)} for role in ROLES[:3]}
    path = numerics_charts.over_steps(tmp_path / "amax.png", "amax over the sampled steps", "amax", layers, panels)
    with Image.open(path) as image:
        assert image.width > 0 and image.height > 0


def test_a_tensor_that_overflowed_is_the_worst_and_a_change_to_show():
    """A loss-scaled gradient holding inf has a nan SQNR, as an all-zero tensor has: it must not be passed
    over as "nothing lost" by the summary or by compare."""
    a = _planted({(6, "blocks.0.mlp.c_fc"): 40.0})
    b = {k: list(v) for k, v in a.items()}
    i = next(i for i, (s, layer, role) in enumerate(zip(b["step"], b["layer"], b["role"], strict=True))
             if (s, layer, role) == (6, "blocks.1.mlp.c_fc", "input"))  # fmt: skip
    b["sqnr_db"][i], b["amax"][i] = math.nan, math.inf
    cells, _ = nt.read({"numerics": b}, "numerics")
    top = nt.worst(cells)
    assert (top[0].layer, nt.sqnr_text(top[0])) == ("blocks.1.mlp.c_fc", "inf/nan dB") and top[1].sqnr_db == 40.0
    assert "inf/nan" in "\n".join(numerics_block([_record("bf16", numerics=b)], 100))
    rows = [
        r for r in compare_runs([_record("bf16", numerics=a)], [_record("bf16", numerics=b)]) if r.verdict == "changed"
    ]
    assert [r.metric for r in rows] == ["sqnr_db blocks.1.mlp.c_fc input bf16"]
    assert "60.0 -> inf/nan dB, down inf dB" in rows[0].message


def test_a_cell_that_arrived_in_its_format_says_so_in_the_heatmap():
    from suite.reporting import numerics_charts

    arrived = nt.Cell(6, "blocks.0.mlp.c_proj", "grad_output", "bf16", 0.01, None, None, None, None)
    assert numerics_charts.cell_text(arrived) == numerics_charts.ARRIVED
    assert nt.worst([arrived]) == [] and math.isnan(numerics_charts._value(arrived))

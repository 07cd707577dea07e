"""A real CPU run under layer policies: what its records say and how --resume tells two policies apart."""

from __future__ import annotations

import pytest

from suite.records import store
from suite.records.store import STATUSES
from suite.records.validate import problem
from suite.running.runner import run_cases
from tests.helpers import small_case

KINDS = ("forward", "grad_input", "grad_weight")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """fp32, fp8-tensorwise under its default policy and under last:1 (with the LM head converted), 3 steps."""
    out = tmp_path_factory.mktemp("policy") / "r.jsonl"
    cases = [small_case(mode="fp32"), small_case(mode="fp8-tensorwise"),
             small_case(mode="fp8-tensorwise", keep_high="last:1,grad_weight")]  # fmt: skip
    records = run_cases(cases, out=out, log=None, isolate=False)
    return out, records


def test_the_record_says_which_layers_ran_in_which_format(run):
    _, records = run
    fp32, default, last = records
    assert [r["status"] for r in records] == ["ok"] * 3
    for r in records:
        assert problem(r, STATUSES) is None
    assert default["keep_high"] == "lm_head" and last["keep_high"] == "last:1,grad_weight"
    assert [x.split(" ")[0] for x in default["unconverted_layers"]] == ["lm_head"]
    assert len(default["converted_layers"]) == 8
    assert default["layer_formats"]["lm_head"] == dict.fromkeys(KINDS, "bf16")
    assert default["layer_formats"]["blocks.1.mlp.c_fc"]["forward"] == "e4m3-tensorwise"
    # last:1: block 1 kept (its 4 Linears), block 0 and the LM head converted with bf16 weight gradients
    assert [x.split(" ")[0] for x in last["unconverted_layers"]] == [
        "blocks.1.attn.c_attn", "blocks.1.attn.c_proj", "blocks.1.mlp.c_fc", "blocks.1.mlp.c_proj"
    ]  # fmt: skip
    assert last["converted_layers"][-1] == "lm_head" and len(last["converted_layers"]) == 5
    assert last["layer_formats"]["blocks.1.mlp.c_fc"] == dict.fromkeys(KINDS, "bf16")
    assert last["layer_formats"]["lm_head"] == {
        "forward": "e4m3-tensorwise", "grad_input": "e5m2-tensorwise x e4m3-tensorwise", "grad_weight": "bf16"
    }  # fmt: skip
    assert fp32["keep_high"] == "" and fp32["layer_formats"] is None  # no low-precision Linears to report
    # the policies change what trains: two final losses, each with its delta against the one fp32
    assert default["final_loss"] != last["final_loss"]
    assert default["loss_delta_vs_fp32"] is not None and last["loss_delta_vs_fp32"] is not None


def test_resume_runs_only_the_policy_the_file_does_not_have(run):
    out, _ = run
    again = [small_case(mode="fp8-tensorwise"), small_case(mode="fp8-tensorwise", keep_high="last:1,grad_weight"),
             small_case(mode="fp8-tensorwise", keep_high="block:0")]  # fmt: skip
    new = run_cases(again, out=out, log=None, isolate=False, resume=True)
    assert [r["keep_high"] for r in new] == ["block:0"]
    assert [r["keep_high"] for r in store.read(out) if r["mode"] == "fp8-tensorwise"] == [
        "lm_head", "last:1,grad_weight", "block:0"
    ]  # fmt: skip

"""Layer policies (suite/policy.py): the syntax, its resolution against the model's depth, the one-line errors, the
case key and the labels of the tables. The modes' side (what really runs in bf16) is in test_layer_policy_modes.py,
a real run's record in test_layer_policy_run.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from suite.cli.main import main
from suite.hardware import DeviceInfo
from suite.policy import (
    DEFAULT_POLICY,
    LayerPolicy,
    gemm_kinds,
    legacy_keep_high,
    parse_policy,
    policy_note,
    resolve_keep_high,
)
from suite.records.cases import alike, case_key, pair_key
from suite.reporting.table import mode_label
from suite.running.execute import case_fields
from tests.helpers import error_line, small_case


def fields(case) -> dict:
    """The record fields a case writes before it trains (those of its case key)."""
    return case_fields(case, DeviceInfo("cpu", "test cpu"))


def test_parse_reads_every_token_and_the_canonical_text_parses_back_to_the_same_policy():
    p = parse_policy(" grad_weight, lm_head,block:3,first:1, last:2 ,block:3,forward", 12)
    assert p == LayerPolicy(first=1, last=2, blocks=(3,), lm_head=True, gemms=("forward", "grad_weight"))
    assert p.text() == "first:1,last:2,block:3,lm_head,forward,grad_weight"
    assert parse_policy(p.text(), 12) == p  # the round trip: one policy, one text
    assert parse_policy("none", 12) == LayerPolicy() and LayerPolicy().text() == "none"
    assert p.kept_blocks(12) == {0, 3, 10, 11}


@pytest.mark.parametrize(
    "text, n_layer, resolved",
    [
        ("last:15%", 12, "last:2"),  # 1.8 blocks: rounded up
        ("last:15%", 2, "last:1"),  # tiny: 0.3 of a block is still one
        ("last:15%", 48, "last:8"),  # 7.2
        ("first:50%", 12, "first:6"),  # exact: not rounded up past it
        ("last:100%", 4, "last:4"),
    ],
)
def test_shares_round_up_to_whole_blocks(text, n_layer, resolved):
    assert parse_policy(text, n_layer).text() == resolved


@pytest.mark.parametrize(
    "text, match",
    [
        ("last:5", "keep_high='last:5': the model has 2 blocks; give a count in 1..2 or a share such as 15%"),
        ("first:0", "keep_high='first:0': the model has 2 blocks"),
        ("last:0%", "keep_high='last:0%': the model has 2 blocks"),
        ("last:x", "keep_high='last:x': the model has 2 blocks"),
        ("block:2", "keep_high='block:2': the model has blocks 0..1; name one of them"),
        ("block:-1", "keep_high='block:-1': the model has blocks 0..1"),
        ("lm-head", "keep_high='lm-head' is unknown; give first:K, last:K, block:I, lm_head, forward"),
        ("forward,grad_input,grad_weight", "keeps every GEMM in bf16: that is the bf16 mode; keep one or two"),
    ],
)
def test_a_policy_the_model_cannot_have_is_one_line_naming_the_field_value_and_fix(text, match):
    with pytest.raises(ValueError, match=None) as err:
        parse_policy(text, 2)
    assert match in str(err.value) and "\n" not in str(err.value)


def test_a_case_holds_its_policy_resolved_and_refuses_one_its_model_or_mode_cannot_have():
    assert small_case(mode="fp8-tensorwise").keep_high == "lm_head"  # the mode's default
    assert small_case(mode="fp8-tensorwise", keep_high="last:15%, lm_head").keep_high == "last:1,lm_head"
    assert small_case(mode="fp32", keep_high="last:1").keep_high == ""  # nothing to keep high
    with pytest.raises(ValueError, match=r"keep_high='block:7': the model has blocks 0\.\.1"):
        small_case(mode="int8-mixed", keep_high="block:7")
    with pytest.raises(ValueError) as err:  # torchao's MXFP8Linear has one per-GEMM switch: grad_weight
        small_case(mode="mxfp8", keep_high="lm_head,forward")
    assert str(err.value).startswith("keep_high='lm_head,forward': mxfp8 cannot keep the forward GEMM in bf16")
    assert "wgrad_with_hp" in str(err.value) and "drop forward" in str(err.value)
    assert small_case(mode="mxfp8", keep_high="grad_weight").keep_high == "grad_weight"


def test_two_policies_of_one_mode_are_two_cases_with_one_fp32_reference():
    default, other = small_case(mode="fp8-tensorwise"), small_case(mode="fp8-tensorwise", keep_high="none")
    a, b, ref = fields(default), fields(other), fields(small_case(mode="fp32"))
    assert case_key(a) != case_key(b)
    # the fp32 record pairs with both (it has no policy): a loss delta for each
    assert pair_key(a) == pair_key(b) == pair_key(ref)


def test_a_default_policy_is_judged_over_seeds_with_fp32_and_another_policy_apart():
    ref, default, other = (case_key(fields(small_case(mode=m, keep_high=k)))
                           for m, k in (("fp32", ""), ("int8-mixed", ""), ("int8-mixed", "none")))  # fmt: skip
    assert alike(default) == alike(ref) != alike(other)
    old = case_key(fields(small_case(mode="int8-mixed")) | {"keep_high": None})  # before policies: the default
    assert alike(old) == alike(ref)


def test_records_written_before_policies_read_as_their_modes_default_then():
    assert legacy_keep_high("fp8-rowwise") == "lm_head" and legacy_keep_high("fp32") == ""
    assert legacy_keep_high(None) == ""
    old = fields(small_case(mode="int8-mixed")) | {"keep_high": None}
    assert case_key(old) == case_key(fields(small_case(mode="int8-mixed")))
    # the 4-bit modes did not exist then: nothing to read back (their default depends on the depth)
    assert legacy_keep_high("nvfp4") == ""


def test_gemm_kinds_are_read_without_the_models_depth():
    assert gemm_kinds("last:3,grad_input,forward") == ("forward", "grad_input")
    assert gemm_kinds(DEFAULT_POLICY["nvfp4"]) == ()


def test_a_mode_is_labelled_with_its_policy_only_when_it_is_not_the_default():
    assert policy_note("fp8-tensorwise", "lm_head", "tiny") == ""
    assert policy_note("fp8-tensorwise", "last:1,lm_head", "tiny") == " [keep last:1,lm_head]"
    assert policy_note("nvfp4", "last:1,lm_head", "tiny") == ""  # last:15% of 2 blocks: the default
    assert policy_note("nvfp4", "last:1,lm_head", "gpt2-small") == " [keep last:1,lm_head]"  # of 12: last:2
    assert policy_note("fp32", "", "tiny") == policy_note("fp8-rowwise", None, "tiny") == ""
    rows = [{"mode": "fp8-tensorwise", "model": "tiny", "keep_high": k} for k in ("lm_head", "none")]
    assert [mode_label(r) for r in rows] == ["fp8-tensorwise", "fp8-tensorwise [keep none]"]
    nv = {"mode": "nvfp4", "model": "tiny", "keep_high": "last:1,lm_head"}
    assert mode_label(nv | {"fp4_recipe": "sr,rht,2d"}) == "nvfp4"  # the default recipe
    assert mode_label(nv | {"fp4_recipe": "sr"}) == "nvfp4 [fp4 sr]"


def test_the_seeds_section_labels_a_policys_own_seed_set():
    """A non-default policy is a seed set of its own (alike); its rows say which policy they are."""
    from suite.reporting import seeds_section
    from suite.reporting.seed_groups import judged

    records = []
    for seed in (0, 1):
        for mode, keep in (("fp32", ""), ("fp8-tensorwise", "lm_head"), ("fp8-tensorwise", "block:0")):
            r = _record(keep) | {"mode": mode, "seed": seed, "loss_delta_vs_fp32": 0.0 if mode == "fp32" else 0.01,
                                 "emulated": mode != "fp32"}  # fmt: skip
            records.append(r)
    labels = sorted(row[0].text for s in judged(records) for row in seeds_section.rows(s))
    assert "fp8-tensorwise [keep block:0] (emulated)" in labels and "fp8-tensorwise (emulated)" in labels


def test_the_run_table_and_the_report_say_which_policy_a_row_ran():
    from suite.cli.summary import summary
    from suite.reporting.table import mode_cell

    base = {"model": "tiny", "status": "ok", "emulated": True}
    assert (
        mode_cell(base | {"mode": "fp8-rowwise", "keep_high": "block:0"}).text
        == "fp8-rowwise [keep block:0] (emulated)"
    )
    records = [_record(k) for k in ("lm_head", "last:1,lm_head")]
    labels = [str(c) for c in summary(records, width=None)[0].table.columns[0].cells]
    assert labels == ["fp8-tensorwise (emulated)", "fp8-tensorwise [keep last:1,lm_head] (emulated)"]


def _record(keep_high: str) -> dict:
    """A finished fp8 record as the summary reads it (the fields it shows)."""
    from suite.records.store import FIELDS

    r = dict.fromkeys(FIELDS) | {"mode": "fp8-tensorwise", "model": "tiny", "status": "ok", "emulated": True}
    return r | {"keep_high": keep_high, "step_time_ms": 10.0, "step_time_p10_ms": 9.0, "step_time_p90_ms": 11.0,
                "tokens_per_s": 6400.0, "final_loss": 5.0, "seed": 0}  # fmt: skip


@pytest.mark.parametrize(
    "args, match",
    [
        (["--keep-high", "last:5", "--model", "tiny"], "keep_high='last:5'"),  # the CPU default: no policy mode
        (["--keep-high", "last:5", "--modes", "fp8-tensorwise"], "keep_high='last:5': the model has 2 blocks"),
        (["--keep-high", "last:1", "--modes", "fp32"], "--keep-high given but none of the modes (fp32) takes a"),
        (["--fp4-recipe", "sr", "--modes", "fp32,fp8-tensorwise"], "--fp4-recipe given but none of the modes"),
        (["--keep-high", "forward", "--modes", "fp32,mxfp8"], "mxfp8 cannot keep the forward GEMM in bf16"),
    ],
)
def test_mpbench_run_refuses_a_bad_policy_in_one_line_with_exit_2(args, match, capsys, tmp_path):
    out = tmp_path / "r.jsonl"
    assert main(["run", "--device", "cpu", "--model", "tiny", *args, "--out", str(out)]) == 2
    line = error_line(capsys)
    field = "fp4_recipe=" if "--fp4-recipe" in args else "keep_high="
    assert line.startswith(f"mpbench run: error: {field}") and match in line
    assert not out.exists() or not out.read_text()


def test_policy_and_labels_stay_torch_free():
    code = "import sys, suite.policy, suite.reporting.table, suite.cli.summary; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_resolve_is_what_a_case_holds():
    assert resolve_keep_high("nvfp4", "", 12) == "last:2,lm_head"
    assert resolve_keep_high("bf16", "last:1", 12) == ""


def test_none_turns_every_fp4_switch_off():
    from suite.policy import FP4Recipe, parse_fp4_recipe
    from suite.training.case import Case

    assert parse_fp4_recipe("nvfp4", "none") == FP4Recipe() and parse_fp4_recipe("mxfp4", " none ") == FP4Recipe()
    assert Case(mode="nvfp4", fp4_recipe="none").fp4_recipe == "none"
    assert parse_fp4_recipe("nvfp4", "").text() == "sr,rht,2d"  # "" is the mode's default, not none
    with pytest.raises(ValueError, match=r"^fp4_recipe='2d' is not a switch of mxfp4; give some of sr, rht"):
        Case(mode="mxfp4", fp4_recipe="sr,2d")  # MX scales are 1 x 32: no 16 x 16 weight scales


def test_a_linear_outside_the_blocks_and_the_head_is_kept_and_says_why():
    import torch.nn as nn

    from models import GPT, GPTConfig
    from suite.modes.torchao_calls import select_linears
    from suite.policy import parse_policy

    model = GPT(GPTConfig.preset("tiny"), seed=0)
    model.adapter = nn.Linear(128, 128)  # a Linear this GPT does not have: never converted by name
    converted, kept = select_linears(model, 16, "float8", parse_policy("none", 2))
    assert "adapter" not in converted and "lm_head" in converted
    assert "adapter (128 x 128): neither in a transformer block nor the LM head" in kept

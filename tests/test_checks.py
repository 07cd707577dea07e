"""Every record checks itself: each rule fires on a record that breaks it, none on a sound one,
the figures stay as measured, and the summary, report and compare show suspect figures."""

import json
import re

import pytest

from suite.cli.run import summary_table
from suite.records import checks, store
from suite.reporting import table
from suite.reporting.compare import compare_runs, exit_code, format_comparison
from suite.running.runner import run_cases
from suite.text import render
from tests.helpers import small_case

TOKENS = 16 * 1024
STEP_MS = 100.0
STEPS = 50
POWER = 600.0
WINDOW_S = STEPS * STEP_MS / 1e3 + 0.05  # steps plus the two syncs


def sound(**kw):
    """A GPU record whose figures agree with each other and with the GPU's limits."""
    values = dict(
        model="gpt2-small", mode="bf16", status="ok", batch_size=16, seq_len=1024, steps=60, warmup=10, seed=0,
        device="cuda:0", gpu_name="NVIDIA H100 80GB HBM3", tokens_per_step=TOKENS, timed_steps=STEPS,
        step_time_ms=STEP_MS, step_time_p10_ms=98.0, step_time_p90_ms=103.0, step_times_ms=[STEP_MS] * STEPS,
        tokens_per_s=TOKENS / (STEP_MS / 1e3), achieved_flops=4.0e14, peak_flops=9.895e14, peak_flops_dtype="bf16",
        mfu=4.0e14 / 9.895e14, mamf_flops=7.0e14, mamf=4.0 / 7.0, tensor_core_util=0.6, tensor_core_util_hmma=0.6,
        tensor_core_util_imma=0.0, tensor_core_util_source="nvml-gpm", peak_mem_mb=30_000.0,
        peak_mem_source="nvml-process", peak_mem_device_mb=30_500.0, peak_mem_allocated_mb=25_000.0,
        peak_mem_reserved_mb=29_400.0, avg_power_w=POWER, energy_j_per_step=POWER * WINDOW_S / STEPS,
        tokens_per_joule=TOKENS * STEPS / (POWER * WINDOW_S), throttled=False, throttle_reasons=[],
        final_loss=3.0, loss_curve=[5.0, 3.0], window_s=WINDOW_S, power_limit_w=700.0, gpu_shared_with=[],
    ) | kw  # fmt: skip
    # window_s and power_limit_w may not be schema fields yet: set them beside the record
    extra = {k: v for k, v in values.items() if k not in store.FIELDS}
    return store.make_record(**{k: v for k, v in values.items() if k in store.FIELDS}) | extra


def rules(record):
    return [s["rule"] for s in checks.check(record)]


def test_a_sound_record_breaks_no_rule():
    assert checks.check(sound()) == []


def test_a_cpu_record_without_gpu_figures_breaks_no_rule():
    r = sound(gpu_name=None, device="cpu", peak_flops=None, mfu=None, mamf_flops=None, tensor_core_util=None,
              tensor_core_util_hmma=None, tensor_core_util_imma=None, peak_mem_source="rss", peak_mem_mb=400.0,
              peak_mem_device_mb=None, peak_mem_reserved_mb=None, avg_power_w=None, energy_j_per_step=None,
              throttled=None, power_limit_w=None)  # fmt: skip
    assert checks.check(r) == []


ROOFLINE_INPUTS = {"flops_per_s": {"bf16": 9.895e14}, "bandwidth_bytes_per_s": 3.35e12,
                   "source": "datasheet: NVIDIA H100 datasheet, SXM5 column"}  # fmt: skip


# (rule, overrides that break it, the value and the limit the entry must carry)
BROKEN = [
    ("percentiles_ordered", dict(step_time_p10_ms=101.0), 101.0, STEP_MS),
    ("percentiles_ordered", dict(step_time_p90_ms=99.0), 99.0, STEP_MS),
    ("tokens_per_s", dict(tokens_per_s=TOKENS / 0.08), TOKENS / 0.08, TOKENS / 0.1),
    ("mfu_in_range", dict(achieved_flops=1.2e15, mfu=1.2e15 / 9.895e14, mamf_flops=None), 1.2e15, 9.895e14),
    ("mfu_in_range", dict(achieved_flops=1.2e15, mfu=None, mamf_flops=None), 1.2e15, 9.895e14),
    ("mamf_ceiling", dict(achieved_flops=7.5e14, mfu=7.5e14 / 9.895e14), 7.5e14, 7.0e14 * 1.05),
    ("nvml_peak_ge_reserved", dict(peak_mem_mb=29_000.0), 29_000.0, 29_400.0),
    ("nvml_peak_ge_reserved", dict(peak_mem_device_mb=20_000.0), 20_000.0, 29_400.0),
    ("power_in_range", dict(avg_power_w=800.0, energy_j_per_step=800.0 * WINDOW_S / STEPS), 800.0, 700.0),
    ("power_in_range", dict(avg_power_w=2.0, energy_j_per_step=2.0 * WINDOW_S / STEPS), 2.0,
     checks.IDLE_FLOOR_W * (1 - checks.COUNTER_UPDATE_S / WINDOW_S)),
    ("energy_consistent", dict(energy_j_per_step=POWER * WINDOW_S / STEPS * 1.2), POWER * WINDOW_S * 1.2,
     POWER * WINDOW_S),
    ("step_times_within_window", dict(step_times_ms=[STEP_MS * 1.1] * STEPS), STEP_MS * 1.1 * STEPS, WINDOW_S * 1e3),
    ("tensor_core_util_in_range", dict(tensor_core_util=1.3), 1.3, 1.0),
    ("tensor_core_util_in_range", dict(tensor_core_util_hmma=-0.1), -0.1, 0.0),
    ("not_throttled", dict(throttled=True, throttle_reasons=["sw_power_cap"]), True, False),
    ("gpu_not_shared", dict(gpu_shared_with=[4242]), [4242], []),
    # a measured step faster than the roofline's lower bound by more than 5%: 100 ms against a 110 ms bound
    ("roofline_bound", dict(predicted_step_ms=110.0, roofline_inputs=ROOFLINE_INPUTS), STEP_MS, 110.0 / 1.05),
]  # fmt: skip


@pytest.mark.parametrize(("rule", "overrides", "value", "limit"), BROKEN, ids=[b[0] for b in BROKEN])
def test_each_rule_fires_alone_with_both_values(rule, overrides, value, limit):
    found = checks.check(sound(**overrides))
    assert [s["rule"] for s in found] == [rule]
    entry = found[0]
    assert entry["value"] == pytest.approx(value) and entry["limit"] == pytest.approx(limit)
    assert entry["fields"] and entry["note"]
    assert json.loads(json.dumps(found)) == found  # JSON-friendly as written


def test_every_rule_has_a_breaking_case():
    assert {b[0] for b in BROKEN} == set(checks.RULES)


def test_rules_within_their_tolerance_do_not_fire():
    # memory within the slack, power within the counter's resolution, window sum within slack
    assert rules(sound(peak_mem_mb=29_400.0 - checks.MEM_SLACK_MB + 1)) == []
    over = 700.0 * (1 + checks.POWER_OVERSHOOT)
    assert rules(sound(avg_power_w=over, energy_j_per_step=over * WINDOW_S / STEPS)) == []
    assert rules(sound(energy_j_per_step=(POWER * WINDOW_S + 0.09 * POWER) / STEPS)) == []
    assert rules(sound(step_times_ms=[WINDOW_S * 1e3 / STEPS] * STEPS)) == []
    assert rules(sound(peak_mem_source="nvml-device", peak_mem_mb=1.0)) == []  # not a process figure


def test_a_window_shorter_than_one_counter_update_may_read_0_w():
    short = dict(window_s=0.08, step_times_ms=[1.5] * STEPS, avg_power_w=0.0, energy_j_per_step=None)
    assert rules(sound(**short)) == []  # the counter did not tick: within its resolution
    assert rules(sound(**short | {"window_s": 0.5, "step_times_ms": [9.0] * STEPS})) == ["power_in_range"]


def test_a_rule_whose_inputs_are_missing_is_not_applied():
    assert rules(sound(window_s=None, step_times_ms=[1e9])) == []  # no window: neither window rule
    assert rules(sound(power_limit_w=None, avg_power_w=800.0, energy_j_per_step=800.0 * WINDOW_S / STEPS)) == []
    assert rules(sound(peak_mem_reserved_mb=None, peak_mem_mb=1.0)) == []
    assert rules(sound(tokens_per_step=None, tokens_per_s=1.0)) == []
    assert rules(sound(step_time_p10_ms="nan")) == []  # a non-finite figure read back from the store


def test_data_parallel_power_is_per_gpu_times_the_gpus():
    two = dict(world_size=2, avg_power_w=1200.0, energy_j_per_step=1200.0 * WINDOW_S / STEPS)
    assert rules(sound(**two)) == []  # 2 x 600 W under 2 x 700 W
    assert rules(sound(**two, power_limit_w=500.0)) == ["power_in_range"]


def test_the_figure_is_kept_and_the_record_written_with_suspect(tmp_path):
    r = sound(tokens_per_s=1.0)
    r["suspect"] = checks.check(r)
    out = tmp_path / "r.jsonl"
    store.append(out, r)
    back = store.read(out)[0]
    assert back["tokens_per_s"] == 1.0  # never dropped to pass the check
    assert back["suspect"][0]["rule"] == "tokens_per_s"
    df = store.load(out)  # flat-loadable: one object column
    assert df["suspect"].iloc[0][0]["rule"] == "tokens_per_s"


def test_run_cases_checks_every_record_before_writing_it(tmp_path):
    out = tmp_path / "r.jsonl"
    records = run_cases([small_case(mode="fp32"), small_case(mode="tf32")], out=out, log=None, isolate=False)
    assert [r["suspect"] for r in records] == [[], []]  # a real CPU run and a skipped case: checked, clean
    assert [r["suspect"] for r in store.read(out)] == [[], []]


def test_summary_table_marks_suspect_figures_and_names_the_rule():
    records = [sound(mode="fp32"), sound(tokens_per_s=1.0, throttled=True)]
    for r in records:
        r["suspect"] = checks.check(r)
    text = render(summary_table(records))
    fp32, bf16 = text.splitlines()[2:]
    assert "!" not in fp32 and fp32.split()[-1] == "-"
    assert "1!" in bf16 and "100.00!" in bf16  # tokens/s, and step time (throttled)
    assert "tokens_per_s,not_throttled" in bf16


def test_report_table_marks_suspect_cells_with_the_rule_as_a_note():
    r = sound(tokens_per_s=1.0)
    r["suspect"] = checks.check(r)
    row = table.cells(r, None)
    by_name = dict(zip([name for name, _, _ in table.COLUMNS], row, strict=True))
    cell = by_name["tokens_per_s"]
    assert cell.suspect and cell.value == 1.0 and cell.text == "1 (suspect)"
    assert "tokens_per_s" in cell.reason and "tokens_per_step / median" in cell.reason
    assert not by_name["step_time_ms"].suspect
    notes = table.Notes()
    page = table.to_html([row], notes)
    assert '<span style="color:#b00" title="suspect (tokens_per_s): ' in page
    assert any(reason.startswith("suspect (tokens_per_s)") for reason in notes.reasons)
    assert re.search(r"\| 1 \(suspect\) \[\d\] \|", table.to_markdown([row], table.Notes()))
    assert table.csv_row(r, row)["suspect"].startswith("tokens_per_s: suspect (tokens_per_s)")


def test_compare_never_counts_a_suspect_figure_as_a_regression():
    a = sound()
    a["suspect"] = []
    slow = sound(step_time_ms=150.0, step_time_p10_ms=149.0, step_time_p90_ms=151.0,
                 tokens_per_s=TOKENS / 0.15, throttled=True, throttle_reasons=["hw_thermal_slowdown"])  # fmt: skip
    clean = slow | {"throttled": False}
    for b in (slow, clean):
        b["suspect"] = checks.check(b)
    rows = compare_runs([a], [clean])
    assert {r.metric: r.verdict for r in rows}["step_time_ms"] == "regressed" and exit_code(rows) == 1
    rows = compare_runs([a], [slow])
    step = next(r for r in rows if r.metric == "step_time_ms")
    assert step.verdict == "suspect" and step.b == 150.0
    assert "would be regressed" in step.message and "B: clocks throttled" in step.message
    assert exit_code(rows) == 0
    assert step.message in format_comparison(rows)
    # the same doubt from A's side: an improvement is not claimed either
    rows = compare_runs([slow], [a])
    step = next(r for r in rows if r.metric == "step_time_ms")
    assert step.verdict == "suspect" and "would be improved" in step.message and "A: clocks" in step.message


def test_roofline_bound_fires_only_more_than_5_percent_below_the_bound_and_names_the_ceilings():
    at_bound = sound(predicted_step_ms=STEP_MS, roofline_inputs=ROOFLINE_INPUTS)
    assert rules(at_bound) == []  # measured == predicted: clean
    assert rules(sound(predicted_step_ms=STEP_MS * 1.05, roofline_inputs=ROOFLINE_INPUTS)) == []  # on the slack
    assert rules(sound(predicted_step_ms=None, roofline_reason="not calibrated")) == []  # no bound: not applied
    faster = checks.check(sound(predicted_step_ms=STEP_MS * 1.06, roofline_inputs=ROOFLINE_INPUTS))
    assert [s["rule"] for s in faster] == ["roofline_bound"]
    assert faster[0]["fields"] == ["step_time_ms", "tokens_per_s"]
    note = faster[0]["note"]
    assert "106 ms" in note and "bf16 9.895e+14 FLOP/s" in note and "3.35e+12 B/s" in note and "H100" in note

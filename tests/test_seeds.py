"""Convergence over seeds: the paired deltas' statistics against scipy, the three-way verdict, the noise
floor, old single-seed records judged as before, and a real multi-seed run on which a planted shift fails."""

from __future__ import annotations

import math
import statistics

import pytest
from scipy import stats

from suite.records.store import make_record
from suite.reporting.convergence import TOLERANCES, Tolerance, check
from suite.reporting.seeds import SEEDS_CAP, judge, noise_floors, seed_stats, seeds_needed

FP32 = (3.00, 3.02, 2.98, 3.01)  # fp32's final loss on seeds 0..3


def _rec(mode: str, seed: int | None, final: float | None, status: str = "ok", **kw) -> dict:
    values = dict(model="tiny", mode=mode, seed=seed, status=status, final_loss=final, batch_size=4) | kw
    return make_record(**values)


def _runs(deltas: dict[str, list[float]], fp32: tuple[float, ...] = FP32) -> list[dict]:
    """fp32 and each mode on seeds 0..n-1, a mode's final loss its seed's fp32's plus the delta given."""
    n = len(next(iter(deltas.values())))
    out = []
    for seed in range(n):
        out.append(_rec("fp32", seed, fp32[seed]))
        out += [_rec(mode, seed, fp32[seed] + d[seed]) for mode, d in deltas.items()]
    return out


def _by_mode(records: list[dict], tolerances=TOLERANCES) -> dict:
    return {v.mode: v for v in judge(records, tolerances)}


def test_seed_stats_match_scipy_and_the_t_table():
    values = [0.010, 0.020, 0.005]
    s = seed_stats(values)
    sd = statistics.stdev(values)
    low, high = stats.t.interval(0.95, df=2, loc=statistics.fmean(values), scale=sd / math.sqrt(3))
    assert s.n == 3 and s.mean == pytest.approx(0.011666666) and s.sd == pytest.approx(0.0076376262)
    assert (s.ci_low, s.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert s.ci_high - s.mean == pytest.approx(4.3027 * sd / math.sqrt(3), rel=1e-4)  # t(0.975, 2) from a t table
    assert s.values == tuple(values)
    assert seed_stats([0.5]) == seed_stats([0.5]).__class__(1, 0.5, None, None, None, (0.5,))
    assert seed_stats([]).n == 0 and seed_stats([]).mean is None
    flat = seed_stats([0.01, 0.01])
    assert flat.sd == 0 and flat.ci_low == flat.ci_high == pytest.approx(0.01)


def test_seeds_needed_is_the_smallest_count_that_settles_it():
    # gap 0.01 at sd 0.01: t(n-1)/sqrt(n) < 1 first at n = 7 (t(5)/sqrt(6) = 1.049, t(6)/sqrt(7) = 0.925)
    assert seeds_needed(0.02, 0.01, 0.03) == 7
    assert seeds_needed(0.04, 0.01, 0.03) == 7  # above the tolerance alike
    for mean, sd, tol in [(0.02, 0.01, 0.03), (0.001, 0.02, 0.03), (0.025, 0.004, 0.03)]:
        brute = next(n for n in range(2, 2000) if stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n) < abs(tol - mean))
        assert seeds_needed(mean, sd, tol) == brute
    assert seeds_needed(0.02, 0.0, 0.03) is None  # no spread: nothing to settle
    assert seeds_needed(0.03, 0.01, 0.03) is None  # on the tolerance: no count settles it
    assert seeds_needed(0.0299, 1.0, 0.03) is None  # past SEEDS_CAP
    assert SEEDS_CAP == 1000


def test_pass_fail_inconclusive_better_and_lags():
    v = _by_mode(_runs({
        "bf16": [0.001, 0.002, 0.0, 0.001],  # interval far below 0.01: pass
        "amp-fp16": [0.05, 0.052, 0.049, 0.051],  # interval above 0.01: FAIL
        "int8-mixed": [0.0, 0.05, 0.01, 0.04],  # straddles its 0.01: inconclusive
        "fp8-rowwise": [-0.02, -0.021, -0.019, -0.02],  # wholly below 0: better, flagged, still a pass
        "pure-fp16": [0.3, 0.31, 0.29, 0.3],  # above its 0.085, but expected to lag
    }))  # fmt: skip
    assert v["fp32"].outcome == "reference" and f"sd {statistics.stdev(FP32):.4f}" in v["fp32"].detail
    assert v["bf16"].outcome == "pass" and not v["bf16"].better and not v["bf16"].single_seed
    assert v["bf16"].seeds == (0, 1, 2, 3) and v["bf16"].delta.n == 4
    assert v["amp-fp16"].outcome == "FAIL" and v["amp-fp16"].delta.ci_low > 0.02
    inc = v["int8-mixed"]
    bound = inc.tolerance.max_delta  # tiny's measured bound (convergence.MEASURED)
    assert inc.outcome == "inconclusive" and inc.delta.ci_low < bound < inc.delta.ci_high
    assert inc.seeds_needed == seeds_needed(inc.delta.mean, inc.delta.sd, bound) and inc.seeds_needed > 4
    assert f"{inc.seeds_needed} seeds would settle it" in inc.detail
    assert v["fp8-rowwise"].outcome == "pass" and v["fp8-rowwise"].better
    assert "better than fp32 beyond noise: look" in v["fp8-rowwise"].detail
    assert v["pure-fp16"].outcome == "lags (expected)"


def test_an_interval_past_the_cap_or_on_the_tolerance_says_so():
    exact = _runs({"bf16": [0.125, 0.375]}, fp32=(2.0, 2.0))  # deltas exact in binary: their mean is 0.25
    wide = _by_mode(exact, {"bf16": Tolerance(0.25)})["bf16"]
    assert wide.outcome == "inconclusive" and wide.seeds_needed is None and "sits on the tolerance" in wide.detail
    far = _by_mode(_runs({"bf16": [-1.0, 1.0599]}))["bf16"]
    assert far.outcome == "inconclusive" and far.seeds_needed is None and "over 1000 seeds" in far.detail


def test_a_failed_seed_fails_the_mode_and_names_the_seed():
    records = _runs({"bf16": [0.0, 0.0, 0.0], "pure-fp16": [0.0, 0.0, 0.0]})
    records[2] = _rec("pure-fp16", 0, None, "diverged", reason="loss became NaN/inf at step 3")
    records[4] = _rec("bf16", 1, None, "diverged", reason="loss became NaN/inf at step 7")
    v = _by_mode(records)
    assert v["bf16"].outcome == "FAIL" and "seed 1 diverged: loss became NaN/inf at step 7" in v["bf16"].detail
    assert v["pure-fp16"].outcome == "lags (expected)" and "seed 0 diverged" in v["pure-fp16"].detail


def test_a_seed_whose_fp32_failed_is_left_out_and_named():
    records = _runs({"bf16": [0.001, 0.002, 0.001]})
    records[2] = _rec("fp32", 1, None, "error", reason="boom")
    v = _by_mode(records)
    assert v["bf16"].seeds == (0, 2) and v["bf16"].outcome == "pass"
    assert "seed 1: no delta (its fp32 ended as error)" in v["bf16"].detail
    assert "seed 1 error: boom" in v["fp32"].detail


def test_old_single_seed_records_are_judged_as_before_and_marked():
    records = [
        _rec("fp32", None, 2.0, loss_delta_vs_fp32=0.0),
        _rec("bf16", None, 2.01, loss_delta_vs_fp32=0.01),
        _rec("amp-fp16", None, 2.05, loss_delta_vs_fp32=0.05),
        _rec("pure-fp16", None, 2.4, loss_delta_vs_fp32=0.4),
        _rec("int8-weight", None, None, "diverged", reason="loss became NaN/inf at step 3"),
        _rec("tf32", None, None, "skipped", reason="needs CUDA"),
        _rec("fp7", None, 2.0, loss_delta_vs_fp32=0.0),
    ]
    for r in records:  # as an old file holds them: no seeds, no paired curve fields
        for k in ("seeds", "loss_delta_last_quarter", "target_loss", "steps_to_target", "excess_fraction"):
            del r[k]
    before = {v.mode: v for v in check(records, TOLERANCES)}
    now = _by_mode(records)
    assert {m: v.outcome for m, v in now.items()} == {m: v.outcome for m, v in before.items()}
    assert all(v.single_seed and v.detail.startswith("single-seed") for v in now.values())
    assert now["bf16"].delta.mean == pytest.approx(0.01) and now["bf16"].delta.sd is None
    assert before["amp-fp16"].detail in now["amp-fp16"].detail  # "+0.0500 nats vs tolerance 0.0200"
    lone = [_rec("bf16", 0, 2.0, loss_delta_vs_fp32=0.001)]  # its fp32 not among these records: its own delta
    assert judge(lone, TOLERANCES)[0].outcome == "pass"


def test_the_latest_record_of_a_case_counts_across_runs_and_groups_stay_apart():
    records = _runs({"bf16": [0.001, 0.002]})
    retried = _rec("bf16", 1, FP32[1] + 0.2, run_id="later")  # the same case run again, later: it counts
    other = [_rec("fp32", 0, 3.0, batch_size=8), _rec("bf16", 0, 3.5, batch_size=8)]  # another group
    verdicts = judge([*records, retried, *other], TOLERANCES)
    assert [(v.mode, len(v.seeds)) for v in verdicts] == [("fp32", 2), ("bf16", 2), ("fp32", 1), ("bf16", 1)]
    assert verdicts[1].delta.values == (pytest.approx(0.001), pytest.approx(0.2))
    assert verdicts[3].single_seed and verdicts[3].outcome == "FAIL"


def test_noise_floor_is_fp32s_spread_and_the_median_delta_sd():
    records = _runs({"bf16": [0.001, 0.003, 0.002, 0.002], "int8-mixed": [0.0, 0.01, 0.02, 0.03]})
    (floor,) = noise_floors(records)
    assert floor.seeds == (0, 1, 2, 3) and floor.model == "tiny"
    assert floor.fp32_final.sd == pytest.approx(statistics.stdev(FP32))
    sds = [statistics.stdev([0.001, 0.003, 0.002, 0.002]), statistics.stdev([0.0, 0.01, 0.02, 0.03])]
    assert floor.delta_sd == pytest.approx(statistics.median(sds))
    assert noise_floors(_runs({"bf16": [0.001]})) == []  # one fp32 seed: no floor


def test_paired_curve_figures_are_pooled_over_seeds():
    records = _runs({"bf16": [0.001, 0.002]})
    for r, steps in zip(records, (20, 22, 21, 25), strict=True):
        r.update(steps_to_target=steps, seconds_to_target=steps / 10, excess_fraction=1.0, loss_delta_last_quarter=0.0)
    records[1].update(excess_fraction=1.1, loss_delta_last_quarter=0.01)
    records[3].update(excess_fraction=1.3, loss_delta_last_quarter=0.03)
    bf16 = _by_mode(records)["bf16"]
    assert bf16.steps_to_target.values == (22, 25) and bf16.seconds_to_target.mean == pytest.approx(2.35)
    assert bf16.excess_fraction.mean == pytest.approx(1.2) and bf16.last_quarter.mean == pytest.approx(0.02)
    records[3].update(emulated=True)
    emulated = _by_mode(records)["bf16"]
    assert emulated.seconds_to_target is None and "emulated: no seconds to target" in emulated.detail


def test_no_tolerance_or_all_skipped_is_not_checked():
    records = _runs({"bf16": [0.0, 0.0]})
    assert _by_mode(records, {"bf16": Tolerance(0.03)})["bf16"].outcome == "pass"
    assert _by_mode(records, {})["bf16"].outcome == "not checked"
    skipped = [_rec("fp32", s, 3.0) for s in (0, 1)] + [_rec("tf32", s, None, "skipped", reason="CUDA") for s in (0, 1)]
    tf32 = _by_mode(skipped)["tf32"]
    assert tf32.outcome == "not checked" and tf32.detail.startswith("CUDA")


def test_seeds_without_any_fp32_are_not_checked_and_say_why():
    records = [_rec("bf16", s, 3.0, loss_delta_reason="fp32 is not in this run") for s in (0, 1)]
    v = judge(records, TOLERANCES)[0]
    assert v.outcome == "not checked" and v.delta.n == 0 and not v.single_seed
    assert "seed 0: no delta (fp32 is not in this run)" in v.detail and "seed 1: no delta" in v.detail


def test_a_mode_expected_to_lag_is_never_left_inconclusive():
    # pure-fp16 straddling its bound: pass or lag, never FAIL, so not an open question for the exit code
    straddles = _by_mode(_runs({"pure-fp16": [0.05, 0.12, 0.08, 0.11]}), {"pure-fp16": Tolerance(0.09, True)})
    v = straddles["pure-fp16"]
    assert v.delta.ci_low < 0.09 < v.delta.ci_high and v.outcome == "lags (expected)" and v.seeds_needed is None
    within = _by_mode(_runs({"pure-fp16": [0.05, 0.051, 0.049, 0.05]}), {"pure-fp16": Tolerance(0.09, True)})
    assert within["pure-fp16"].outcome == "pass"


def test_a_mode_paired_on_one_seed_of_several_is_inconclusive_not_a_single_seed_pass():
    # fp32 diverged on seeds 1-3: bf16 has one paired delta left; it used to pass as "single-seed"
    records = _runs({"bf16": [0.009, 0.009, 0.009, 0.009]})
    records = [r | {"status": "diverged", "final_loss": None} if r["mode"] == "fp32" and r["seed"] else r
               for r in records]  # fmt: skip
    v = _by_mode(records)["bf16"]
    assert v.outcome == "inconclusive" and not v.single_seed and "only seed 0 has a paired delta" in v.detail
    assert "seed 1: no delta (its fp32 ended as diverged)" in v.detail


def test_records_of_two_machines_are_never_paired():
    h100 = [r | {"gpu_name": "NVIDIA H100 80GB HBM3"} for r in _runs({"bf16": [0.0, 0.0, 0.0, 0.0]})]
    a100 = [r | {"gpu_name": "NVIDIA A100-SXM4-80GB", "final_loss": r["final_loss"] + 0.05} for r in h100]
    mixed = [r for r in h100 if r["mode"] == "fp32"] + [r for r in a100 if r["mode"] == "bf16"]
    verdicts = judge(mixed, TOLERANCES)
    assert {v.mode: v.outcome for v in verdicts} == {"fp32": "reference", "bf16": "not checked"}
    assert [v.outcome for v in judge(h100 + a100, TOLERANCES) if v.mode == "bf16"] == ["pass", "pass"]


def test_curve_figures_are_paired_with_the_fp32_the_delta_is_judged_against():
    records = _runs({"bf16": [0.0, 0.0, 0.0, 0.0]})
    curve = [3.0, 2.5, 2.0, 1.9]
    for r in records:
        r["loss_curve"] = curve if r["mode"] == "fp32" else [c + 0.1 for c in curve]
        r["loss_delta_last_quarter"] = 9.9  # as paired at run time with an fp32 since replaced
    v = _by_mode(records)["bf16"]
    assert v.last_quarter.mean == pytest.approx(0.1) and v.last_quarter.n == 4

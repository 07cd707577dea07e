"""Seeds end to end: a real multi-seed run judged (a planted shift fails), `mpbench run --seeds N` (its order,
its records, its resume, its bad values), the summary's pairing and convergence block, and `mpbench check`'s
table and exit codes over seeds."""

from __future__ import annotations

import functools
import io

import pytest
from rich.console import Console

from suite.cli import run as cli_run
from suite.cli.main import main
from suite.cli.run import cases_from_options
from suite.cli.summary import print_summary
from suite.records import store
from suite.reporting.convergence import TOLERANCES
from suite.reporting.seeds import judge, noise_floors
from suite.running.runner import reference_first, run_cases
from tests.helpers import error_line, small_case

RUN = ["run", "--device", "cpu", "--model", "tiny", "--modes", "fp32,bf16", "--batch-size", "2", "--seq-len", "32",
       "--steps", "3", "--warmup", "1", "--quiet"]  # fmt: skip


@pytest.fixture
def in_process(monkeypatch):
    """`mpbench run` with its cases trained in this process (seconds, not a worker per case)."""
    monkeypatch.setattr(cli_run, "run_cases", functools.partial(run_cases, isolate=False))


@pytest.mark.slow  # six 10-step cases: 16-28 s on the shared 2-core machine (load 4-6)
def test_a_planted_shift_fails_on_a_real_multi_seed_run():
    # lr 1e-3: bf16 then tracks fp32 closely on every seed (paired deltas ~1e-4), so the planted 0.05 stands out
    cases = [small_case(mode=m, seed=s, batch_size=2, seq_len=32, steps=10, warmup=1, lr=1e-3)
             for s in range(3) for m in ("bf16", "fp32")]  # fmt: skip
    records = run_cases(cases, log=None, isolate=False)
    assert [(r["mode"], r["seed"]) for r in records] == [(m, s) for s in range(3) for m in ("fp32", "bf16")]
    assert all(r["status"] == "ok" and r["seeds"] == 3 for r in records)
    for fp32, bf16 in zip(records[::2], records[1::2], strict=True):  # each paired with its own seed's fp32
        assert bf16["loss_delta_vs_fp32"] == pytest.approx(bf16["final_loss"] - fp32["final_loss"])
        assert bf16["target_loss"] == fp32["target_loss"] and fp32["steps_to_target"] is not None
    honest = {v.mode: v for v in judge(records, TOLERANCES)}
    assert honest["bf16"].outcome in ("pass", "inconclusive"), honest["bf16"]
    assert honest["bf16"].delta.n == 3 and not honest["bf16"].single_seed
    shifted = [r | {"final_loss": r["final_loss"] + 0.05} if r["mode"] == "bf16" else r for r in records]
    worse = {v.mode: v for v in judge(shifted, TOLERANCES)}["bf16"]
    assert worse.outcome == "FAIL" and worse.delta.ci_low > TOLERANCES["bf16"].max_delta, worse
    (floor,) = noise_floors(records)
    assert floor.seeds == (0, 1, 2) and floor.fp32_final.sd > 0


def test_seeds_run_seed_major_with_each_seeds_fp32_first():
    cases = reference_first(cases_from_options({"device": "cpu", "modes": "bf16,fp32", "seeds": 3, "seed": 7}))
    assert [(c.mode, c.seed) for c in cases] == [(m, s) for s in (7, 8, 9) for m in ("fp32", "bf16")]
    assert [c.seed for c in cases_from_options({"device": "cpu", "modes": "fp32"})] == [0]  # one seed by default


@pytest.mark.slow  # six 3-step cases through three commands: 12-24 s on the shared 2-core machine
def test_seeds_through_the_cli_writes_paired_records_and_resumes_the_missing_seeds(tmp_path, capsys, in_process):
    out = tmp_path / "r.jsonl"
    assert main([*RUN, "--seeds", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    records = store.read(out)
    assert [(r["mode"], r["seed"], r["seeds"]) for r in records] == [
        ("fp32", 0, 2), ("bf16", 0, 2), ("fp32", 1, 2), ("bf16", 1, 2)]  # fmt: skip
    assert records[3]["loss_delta_vs_fp32"] == pytest.approx(records[3]["final_loss"] - records[2]["final_loss"])
    assert "over seeds: delta = final held-out loss - the same seed's fp32's" in text and "noise floor" in text
    assert main([*RUN, "--seeds", "3", "--resume", str(out)]) == 0  # only seed 2 is missing
    records = store.read(out)
    assert [(r["mode"], r["seed"]) for r in records[4:]] == [("fp32", 2), ("bf16", 2)]
    assert records[5]["loss_delta_vs_fp32"] == pytest.approx(records[5]["final_loss"] - records[4]["final_loss"])
    assert main([*RUN, "--seeds", "3", "--resume", str(out)]) == 0
    assert len(store.read(out)) == 6  # nothing left to run
    capsys.readouterr()
    assert main(["check", str(out)]) == 0
    check = capsys.readouterr().out
    assert "noise floor, tiny (seeds 0, 1, 2)" in check and "0 failed, 0 inconclusive, 1 passed" in check


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0"], "seeds=0: must be a whole number of seeds, 1 or more; e.g. --seeds 5"),
    (["--seeds", "-2"], "seeds=-2: must be a whole number of seeds, 1 or more"),
    (["--seeds", "2.5"], "seeds='2.5' is not a whole number; give 1 or more, e.g. --seeds 5"),
    (["--seeds", "2", "--seed", "4294967295"], "seeds=2 with seed=4294967295: the last seed 4294967296 is past "
                                               "4294967295 (2^32 - 1); lower --seed to 4294967294 or less"),
])  # fmt: skip
def test_a_bad_seed_count_is_one_line_and_exit_2(tmp_path, capsys, flags, message):
    try:
        code = main([*RUN, *flags, "--out", str(tmp_path / "r.jsonl")])
    except SystemExit as done:  # argparse's own errors (a count that is not a whole number)
        code = done.code
    assert code == 2
    assert message in error_line(capsys)
    assert not (tmp_path / "r.jsonl").exists()


@pytest.mark.parametrize("value, message", [("0", "seeds=0: must be a whole number"), ('"3"', "seeds='3' must be int")])
def test_the_config_key_seeds(tmp_path, capsys, value, message):
    config = tmp_path / "m.toml"
    config.write_text(f'modes = ["fp32"]\ndevice = "cpu"\nseeds = {value}\n')
    assert main(["run", "--config", str(config), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert message in error_line(capsys)
    config.write_text('modes = ["fp32"]\ndevice = "cpu"\nseeds = 2\nseed = 4\n')
    assert [c.seed for c in cases_from_options(cli_run.load_config(config))] == [4, 5]


def _ok(mode: str, seed: int, step: float, final: float) -> dict:
    return store.make_record(model="tiny", mode=mode, status="ok", batch_size=4, seq_len=32, device="cpu", seed=seed,
                             step_time_ms=step, step_time_p10_ms=step, step_time_p90_ms=step, tokens_per_s=1e5 / step,
                             final_loss=final, suspect=[])  # fmt: skip


def _printed(records: list[dict], width: int | None) -> str:
    if width is None:  # a pipe: every column
        out = io.StringIO()
        print_summary(records, Console(file=out, width=80))
        return out.getvalue()
    console = Console(width=width, file=io.StringIO(), force_terminal=True, color_system=None, record=True)
    print_summary(records, console)
    return console.export_text()


def test_the_summary_pairs_each_speed_up_with_its_own_seeds_fp32():
    # fp32 takes 10 ms a step on seed 0 and 20 ms on seed 1; bf16 5 ms on both: 2.00x and 4.00x. Keyed on
    # (model, batch, seq_len) alone, both rows would take seed 1's fp32 (4.00x).
    records = [_ok("fp32", 0, 10.0, 3.0), _ok("bf16", 0, 5.0, 3.001), _ok("fp32", 1, 20.0, 3.1),
               _ok("bf16", 1, 5.0, 3.102)]  # fmt: skip
    lines = _printed(records, None).split("over seeds:")[0].splitlines()
    rows = [line.split() for line in lines if line.startswith("bf16 ")]
    assert len(rows) == 2 and "2.00" in rows[0] and "4.00" in rows[1], rows  # seed 0's x fp32, seed 1's


@pytest.mark.parametrize("width", [80, None])
def test_the_summary_shows_the_convergence_block_with_several_seeds_only(width):
    records = [r for s, f in enumerate((3.0, 3.02, 2.99)) for r in (_ok("fp32", s, 10.0, f),
               _ok("bf16", s, 6.0, f + 0.001 * s), _ok("fp8-tensorwise", s, 30.0, f + 0.02 * s))]  # fmt: skip
    text = _printed(records, width)
    if width:
        assert all(len(line.rstrip()) <= width for line in text.splitlines()), text
    block = text.split("over seeds:")[1]
    bf16 = next(line.split() for line in block.splitlines() if line.startswith("bf16"))
    assert "+0.0010" in bf16 and "pass" in bf16  # mean delta 0.001, interval well inside 0.03
    fp8 = " ".join(next(line for line in block.splitlines() if line.startswith("fp8-tensorwise")).split())
    assert "+0.0200" in fp8 and "inconclusive:" in fp8  # 0.00..0.04: straddles 0.03
    assert "noise floor, 3 seeds: fp32's final loss sd 0.0153" in block
    assert "over seeds" not in _printed(records[:3], width)  # one seed: its deltas are in the table


def test_the_summary_says_an_unsettled_verdict_a_better_mode_and_a_left_out_tolerance():
    records = [r for s in range(3) for r in (_ok("fp32", s, 10.0, 2.0),
               _ok("int8-mixed", s, 6.0, 2.0 + (-1.0, 0.03, 1.06)[s]),  # far too wide: over 1000 seeds
               _ok("pure-bf16-sr", s, 6.0, 2.0 - (0.02, 0.021, 0.019)[s]))]  # fmt: skip
    text = _printed(records, None)  # a pipe: each row on one line
    assert "inconclusive: over 1000 seeds" in text and "pass; better than fp32: look" in text
    narrow = " ".join(_printed(records, 60).split())
    assert "tol left out: `mpbench check RECORDS` shows each mode's tolerance" in narrow


def _write(path, records) -> str:
    for r in records:
        store.append(path, r)
    return str(path)


def test_check_over_seeds_exit_codes_and_table(tmp_path, capsys):
    def run(name: str, bf16: list[float]) -> str:
        recs = [r for s, d in enumerate(bf16) for r in (_ok("fp32", s, 10.0, 3.0 + s / 100),
                _ok("bf16", s, 6.0, 3.0 + s / 100 + d))]  # fmt: skip
        return _write(tmp_path / name, recs)

    passing, failing, unsure = (
        run("p.jsonl", [0.001, 0.002, 0.0]),
        run("f.jsonl", [0.05, 0.051, 0.049]),
        run("u.jsonl", [0.0, 0.05, 0.01]),
    )
    assert main(["check", passing]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:5] == ["model", "mode", "seeds", "mean", "delta"] and "interval" in header
    bf16 = next(line for line in out.splitlines() if line.split()[1:2] == ["bf16"])
    assert bf16.split()[2:4] == ["3", "+0.0010"] and " pass" in bf16
    assert "noise floor, tiny (seeds 0, 1, 2): fp32's final loss 3.0100, sd 0.0100" in out
    assert main(["check", failing]) == 1 and "1 failed" in capsys.readouterr().out
    assert main(["check", unsure]) == 3
    out = capsys.readouterr().out
    assert "inconclusive" in out and "seeds would settle it at this spread" in out and "1 inconclusive" in out
    assert main(["check", passing, "--tolerance", "bf16=0.0001"]) in (1, 3)  # the override is the bound judged
    assert main(["check", passing, "--tolerance", "bf16=0.01"]) == 0
    single = _write(tmp_path / "s.jsonl", [_ok("fp32", 0, 10.0, 3.0), _ok("bf16", 0, 6.0, 3.001)])
    capsys.readouterr()
    assert main(["check", single]) == 0
    assert "single-seed; +0.0010 nats vs tolerance 0.0300" in capsys.readouterr().out

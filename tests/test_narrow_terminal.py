"""The console tables on narrow and wide terminals: no figure or mode name is ever shortened;
whole columns are left out instead, and the summary says which. Noisy step times are marked."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from suite.cli.main import main
from suite.cli.summary import print_summary
from suite.modes import MODES
from suite.records import store
from suite.records.noise import NOISY_SPREAD, noisy_step, step_spread

SKIP_REASON = "tf32 needs a CUDA GPU with compute capability 8.0+; this device is cpu"


def ok(mode: str, step: float, p10: float, p90: float, delta: float | None, **kw: object) -> dict:
    """An ok gpt2-small record on an H100 with the figures a real run prints."""
    values = dict(model="gpt2-small", mode=mode, status="ok", batch_size=16, seq_len=1024, device="cuda:0",
                  step_time_ms=step, step_time_p10_ms=p10, step_time_p90_ms=p90, tokens_per_s=16 * 1024 / step * 1e3,
                  mfu=0.4123, peak_mem_mb=31_234.0, final_loss=3.2817 + (delta or 0.0), loss_delta_vs_fp32=delta,
                  suspect=[]) | kw  # fmt: skip
    return store.make_record(**values)


def records() -> list[dict]:
    return [
        ok("fp32", 1185.5, 1170.2, 1199.8, 0.0),
        ok("pure-bf16-sr", 987.25, 850.0, 1190.0, 0.0123),  # spread 34% of the median: noisy
        ok("int8-mixed", 1010.75, 1001.0, 1020.5, -0.0042),
        ok(
            "fp8-tensorwise",
            2250.5,
            2240.0,
            2260.0,
            0.0031,
            emulated=True,
            emulated_reason="float8 tensorwise matmuls: no cpu kernels: runs emulated",
        ),  # fmt: skip
        store.make_record(
            model="gpt2-small", mode="tf32", status="skipped", batch_size=16, seq_len=1024, reason=SKIP_REASON
        ),  # fmt: skip
    ]


# every figure and name the summary shows for records(), as it must appear, whole
WHOLE = ["fp32", "pure-bf16-sr", "int8-mixed", "fp8-tensorwise", "1185.50", "987.25~", "1010.75", "+0.0123",
         "-0.0042", "+0.0031", "1.20~", "1.17", "3.2940"]  # fmt: skip


def printed(width: int, recs: list[dict]) -> str:
    """What print_summary writes on a terminal `width` columns wide (rich's own line breaking)."""
    console = Console(width=width, file=io.StringIO(), force_terminal=True, color_system=None, record=True)
    print_summary(recs, console)
    return console.export_text()


@pytest.mark.parametrize("width", [80, 160])
def test_summary_never_shortens_a_figure_or_a_mode(width):
    text = printed(width, records())
    assert "…" not in text and "..." not in text
    lines = text.splitlines()
    assert all(len(line.rstrip()) <= width for line in lines), text
    for figure in WHOLE:  # whole, on one line, as a word of its own
        assert any(figure in line.split() for line in lines), (figure, text)
    for mode in ("fp32", "pure-bf16-sr", "int8-mixed", "tf32"):  # one row per mode, starting with its name
        assert any(line.split()[:1] == [mode] for line in lines), (mode, text)


def test_summary_at_80_columns_leaves_out_whole_columns_and_says_which():
    text = printed(80, records())
    note = next(line for line in text.splitlines() if line.startswith("left out at 80 columns:"))
    assert "reason" in text and "p10-p90 ms" not in text.split("left out")[0]
    assert "p10-p90 ms" in note or "p10-p90" in text.split("left out")[1]
    assert "mpbench report" in text and "columns shows" in text
    assert "tf32: " + SKIP_REASON in " ".join(text.split())  # the left-out reason, under the table, whole
    assert "model: gpt2-small (every row)" in text


def test_summary_too_narrow_for_the_kept_columns_folds_figures_and_cuts_nothing():
    text = printed(40, records())
    assert "…" not in text and all(len(line.rstrip()) <= 40 for line in text.splitlines()), text
    assert "1185.50" in text.replace("\n", "").replace(" ", "") or "1185.50" in text.split()


def test_summary_at_160_columns_keeps_every_figure_column():
    text = printed(160, records())
    header = text.splitlines()[0].split()
    for name in ("step", "p10-p90", "tokens/s", "MFU", "peak", "final", "vs", "x"):
        assert name in header, (name, text)
    assert "1170.20-1199.80" in text


def test_summary_in_a_pipe_prints_every_column_on_one_line_per_row():
    out = io.StringIO()
    print_summary(records(), Console(file=out, width=80))
    text = out.getvalue()
    assert "left out" not in text and "p10-p90 ms" in text
    row = next(line for line in text.splitlines() if line.startswith("tf32"))
    assert row.endswith(SKIP_REASON)


def test_summary_marks_noisy_step_times_and_their_speed_ups():
    text = printed(160, records())
    sr = next(line for line in text.splitlines() if line.startswith("pure-bf16-sr"))
    assert "987.25~" in sr.split() and "1.20~" in sr.split()  # its step time and its speed-up
    int8 = next(line for line in text.splitlines() if line.startswith("int8-mixed"))
    assert "~" not in int8  # steady, and so is fp32 under it
    legend = " ".join(text.split()).split("~ noisy:")[1]
    assert "p10-p90 spread over 20% of the median step time (pure-bf16-sr 34%)" in legend
    assert "speed-up not supported" in legend


def test_a_noisy_fp32_marks_every_speed_up_against_it():
    recs = [ok("fp32", 1185.5, 1000.0, 1400.0, 0.0), ok("bf16", 600.0, 590.0, 610.0, 0.001)]
    text = printed(160, recs)
    bf16 = next(line for line in text.splitlines() if line.startswith("bf16"))
    assert "600.00" in bf16.split() and "1.98~" in bf16.split()


def test_noisy_step_returns_the_spread_only_over_the_limit():
    assert NOISY_SPREAD == 0.20
    steady, noisy = records()[0], records()[1]
    assert noisy_step(steady) is None and step_spread(steady) == pytest.approx((1199.8 - 1170.2) / 1185.5)
    assert noisy_step(noisy) == pytest.approx((1190.0 - 850.0) / 987.25)
    at_limit = ok("bf16", 100.0, 90.0, 110.0, 0.0)  # exactly 20%: not over it
    assert noisy_step(at_limit) is None and noisy_step(ok("bf16", 100.0, 90.0, 110.5, 0.0)) == pytest.approx(0.205)
    assert noisy_step(records()[4]) is None  # skipped: no step time
    assert noisy_step({"step_time_ms": "nan", "step_time_p10_ms": 1.0, "step_time_p90_ms": 2.0}) is None
    assert step_spread({"step_time_ms": 0.0, "step_time_p10_ms": 0.0, "step_time_p90_ms": 0.0}) is None  # no ratio


def modes_output(capsys, monkeypatch, width: int, *flags: str) -> str:
    monkeypatch.setenv("COLUMNS", str(width))  # rich reads the terminal size from COLUMNS and LINES
    monkeypatch.setenv("LINES", "50")  # (both: a dumb terminal without them is 80 x 25)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # and takes stdout for a terminal,
    monkeypatch.setenv("TERM", "dumb")  # one without colours
    assert main(["modes", "--device", "cpu", *flags]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("width", [80, 160])
def test_modes_puts_each_mode_on_one_line_and_cuts_nothing(capsys, monkeypatch, width):
    text = modes_output(capsys, monkeypatch, width)
    lines = text.splitlines()
    assert "…" not in text and all(len(line.rstrip()) <= width for line in lines), text
    rows = {line.split()[0]: line for line in lines if line.split()[:1] and line.split()[0] in MODES}
    assert set(rows) == set(MODES), text  # every mode on a row of its own: no mode row wraps
    assert rows["fp32"].split()[1] == "yes" and rows["tf32"].split()[1] == "no"
    assert rows["fp8-tensorwise"].split()[1] == "emulated"
    assert "tf32 needs a CUDA GPU with compute capability 8.0+" in " ".join(text.split())  # the reason, below
    if width == 160:  # each reason on a line of its own (and the terminal really is 160 wide)
        assert any(line.startswith("fp8-tensorwise: ") and line.rstrip().endswith("are null)") for line in lines)


def test_modes_marks_what_the_default_cpu_run_runs(capsys, monkeypatch):
    from suite.cli.run import default_modes

    text = modes_output(capsys, monkeypatch, 160)
    header = text.splitlines()[1]
    assert "default run" in header
    column = header.index("default run")
    for name in MODES:
        row = next(line for line in text.splitlines() if line.split()[:1] == [name])
        mark = row[column : column + len("default run")].strip()
        assert mark == ("yes" if name in default_modes("cpu") else "-"), (name, row)


def test_modes_verbose_gives_what_each_mode_is_and_needs(capsys, monkeypatch):
    text = " ".join(modes_output(capsys, monkeypatch, 80, "--verbose").split())
    for name, mode in MODES.items():
        assert f"{name}: {mode.summary}" in text and mode.needs in text

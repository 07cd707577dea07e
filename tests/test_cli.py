import json
import shutil
import subprocess

import pytest
import torch

from suite.cli.main import main
from suite.records.store import FIELDS
from tests.helpers import error_line


def test_run_writes_one_record_per_mode(tmp_path, capsys):
    """The acceptance command of the foundation issue."""
    out = tmp_path / "r.jsonl"
    code = main(["run", "--device", "cpu", "--model", "tiny", "--steps", "4", "--batch-size", "2", "--seq-len", "32",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["mode"] for r in records] == ["fp32", "tf32", "amp-fp16", "bf16", "pure-fp16", "int8-weight"]
    for r in records:
        assert list(r) == list(FIELDS)
        assert r["status"] in ("ok", "skipped")
        assert r["status"] == "ok" or r["reason"]
    ok = {r["mode"]: r for r in records if r["status"] == "ok"}
    for mode in ("fp32", "bf16", "int8-weight"):
        assert all(isinstance(v, float) for v in ok[mode]["loss_curve"]), mode
        assert 0 < ok[mode]["final_loss"] < 10
    stdout = capsys.readouterr().out
    assert "int8-weight" in stdout and str(out) in stdout and "x fp32" in stdout


@pytest.mark.parametrize(
    "args, match",
    [
        (["--model", "gpt5"], "model='gpt5' is unknown; choose one of tiny"),
        (["--modes", "fp32,fp7"], "modes: 'fp7' is unknown"),
        (["--device", "tpu"], "device='tpu' is unknown"),
        (["--batch-size", "0"], "batch_size=0: must be at least 1"),
        (["--steps", "-2"], "steps=-2: must be at least 1"),
        (["--seq-len", "4096"], "seq_len=4096 exceeds the block size 128"),
        (["--data", "/nonexistent/corpus.txt"], "no such file"),
        (["--out", "/proc/version/r.jsonl"], "cannot write there"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, match, capsys, tmp_path):
    if "--out" not in args:
        args = [*args, "--out", str(tmp_path / "r.jsonl")]
    code = main(["run", "--device", "cpu", *args])
    assert code == 2
    line = error_line(capsys)
    assert match in line and line.startswith("mpbench run: error: ")
    assert not (tmp_path / "r.jsonl").exists() or not (tmp_path / "r.jsonl").read_text()


def test_short_data_file_is_refused(tmp_path, capsys):
    data = tmp_path / "short.txt"
    data.write_text("too short")
    assert main(["run", "--device", "cpu", "--data", str(data), "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "fewer than seq_len + 1" in error_line(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when no GPU is present")
def test_cuda_without_gpu_is_refused(capsys, tmp_path):
    assert main(["run", "--device", "cuda", "--out", str(tmp_path / "r.jsonl")]) == 2
    assert "no CUDA GPU is visible" in error_line(capsys)


def test_models_lists_exact_counts(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "124,439,808" in out and "1,557,611,200" in out


def test_modes_says_what_runs_here(capsys):
    assert main(["modes", "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[:2] == ["tf32", "no"] for line in lines)  # the answer first; the reason below
    assert any(line.startswith("tf32: tf32 needs a CUDA GPU") for line in lines)
    assert any(line.split()[:2] == ["fp32", "yes"] for line in lines)


def test_env_prints_json(capsys):
    assert main(["env", "--device", "cpu"]) == 0
    env = json.loads(capsys.readouterr().out)
    assert env["device"] == "cpu" and env["torch"] == torch.__version__


@pytest.mark.skipif(shutil.which("mpbench") is None, reason="console script not installed (pip install -e .)")
def test_console_script_is_installed():
    done = subprocess.run(["mpbench", "models"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "gpt2-xl" in done.stdout


def test_calibrate_writes_a_file_that_env_and_runs_use(tmp_path, monkeypatch, capsys):
    from suite.metrics import calibration

    monkeypatch.setenv("MPBENCH_CALIBRATION_DIR", str(tmp_path))
    monkeypatch.setattr(calibration, "CPU_SIZES", (64, 128))  # seconds, not minutes
    assert main(["calibrate", "--device", "cpu", "--dtypes", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "best TFLOP/s" in out and str(tmp_path) in out
    assert main(["env", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["calibration"].startswith(str(tmp_path))
    records = tmp_path / "r.jsonl"
    assert main(["run", "--device", "cpu", "--modes", "fp32", "--steps", "3", "--out", str(records)]) == 0
    assert json.loads(records.read_text())["mamf"] > 0


def test_calibrate_refuses_an_unknown_dtype(capsys):
    assert main(["calibrate", "--device", "cpu", "--dtypes", "fp64"]) == 2
    assert "dtypes: 'fp64' is unknown" in error_line(capsys)


def test_report_and_compare_commands(tmp_path, capsys):
    from suite.records import store

    a = tmp_path / "a.jsonl"
    for mode, step in (("fp32", 100.0), ("bf16", 60.0)):
        store.append(a, store.make_record(
            status="ok", model="tiny", mode=mode, batch_size=8, seq_len=128, steps=40, warmup=5, seed=0,
            step_time_ms=step, step_time_p10_ms=step * 0.99, step_time_p90_ms=step * 1.01, final_loss=2.9,
            loss_curve=[6.0, 4.0, 2.9], tokens_per_s=1024 / step * 1000, cpu="test cpu"))  # fmt: skip
    assert main(["compare", str(a), str(a)]) == 0
    slower = tmp_path / "b.jsonl"
    for r in store.read(a):
        r["step_time_ms"] *= 1.2
        r["step_time_p10_ms"] *= 1.2
        r["step_time_p90_ms"] *= 1.2
        store.append(slower, r)
    capsys.readouterr()
    assert main(["compare", str(a), str(slower)]) == 1
    out = capsys.readouterr().out
    assert "tiny/bf16 step_time_ms: 60 -> 72" in out and "regressed" in out
    report = tmp_path / "report"
    assert main(["report", str(a), "--out", str(report), "--target-loss", "3.0"]) == 0
    assert (report / "index.html").is_file() and (report / "summary.csv").is_file()
    assert main(["report", str(a), "--price", "H100=free"]) == 2
    assert "price=" in error_line(capsys)
    assert main(["report", str(tmp_path / "none-*.jsonl")]) == 2


def test_cpu_default_sizes_follow_native_bf16_and_fp16(monkeypatch):
    from suite.cli import run as run_cmd
    from suite.hardware import native_bf16_flag, native_flag

    assert native_bf16_flag(frozenset({"avx2", "avx512_bf16"})) == "avx512_bf16"
    assert native_bf16_flag(frozenset({"fp", "asimd", "bf16"})) == "bf16"  # Arm's Features line
    assert native_bf16_flag(frozenset({"avx2", "fma"})) is None
    assert native_flag("fp16", frozenset({"avx512_fp16", "avx512_bf16"})) == "avx512_fp16"

    def cpu_with(*flags):
        monkeypatch.setattr(run_cmd, "native_flag", lambda dtype: native_flag(dtype, frozenset(flags)))
        sizes, why = run_cmd.run_defaults("cpu")
        cases = run_cmd.cases_from_options({"device": "cpu"})
        assert {(c.batch_size, c.seq_len, c.steps) for c in cases} == {(sizes["batch_size"], sizes["seq_len"], 40)}
        return (sizes["batch_size"], sizes["seq_len"]), why

    sizes, why = cpu_with("avx2")  # issue 17's EPYC: bf16 and fp16 both in software
    assert sizes == (4, 64) and "no native bf16" in why and "no native fp16" in why and "batch 4 x 64" in why
    sizes, why = cpu_with("avx2", "avx512_bf16")  # this project's EPYC: fp16 in software
    assert sizes == (8, 64) and "bf16 native (avx512_bf16)" in why and "fp16 in software" in why
    sizes, why = cpu_with("amx_bf16", "amx_fp16")  # both native
    assert sizes == (8, 128) and "smaller" not in why
    assert run_cmd.run_defaults("cuda")[1] is None


def test_compile_with_too_little_warmup_exits_2(capsys):
    assert main(["run", "--device", "cpu", "--model", "tiny", "--compile", "--steps", "4", "--warmup", "1"]) == 2
    assert "warmup=1: --compile needs --warmup 2" in error_line(capsys)

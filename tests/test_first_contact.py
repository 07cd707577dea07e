"""ci/gpu-first-contact.sh: its summary names every step, reports a failed or killed step and runs
the rest, keeps what finished when stopped, and respects its budget. A fake `mpbench` stands in for
the real one (seconds, not minutes); the one-rank DDP and FSDP runs it asks for are tested for real
in tests/test_fsdp.py."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "ci" / "gpu-first-contact.sh"
STEPS = (
    "env",
    "modes",
    "doctor",
    "eager",
    "fidelity",
    "numerics",
    "gemms",
    "fp4",
    "ddp-1rank",
    "fsdp-1rank",
    "energy",
    "compiled",
)

# The fake `mpbench`: env, modes and doctor print what the real ones print (shortened); run and
# fidelity append one record per mode to --out. FAKE_ERROR=MODE makes that mode's fidelity record an error;
# FAKE_HANG=eager|compiled|doctor writes the first mode's record, then sleeps until killed.
FAKE_MPBENCH = """\
import json, os, sys, time
cmd, args = sys.argv[1], sys.argv[2:]
def opt(name, default=None):
    return args[args.index(name) + 1] if name in args else default
hang = os.environ.get("FAKE_HANG", "")
if cmd == "env":
    print(json.dumps({"device": "cpu", "cpu": "Fake CPU", "torch": "0.0", "git_commit": "abc"}))
elif cmd == "modes":
    print("device: cpu (Fake CPU)\\nmode  what\\n----- ----\\nfp32  a\\nbf16  b\\nmxfp8 c\\n\\nfootnote")
elif cmd == "doctor":
    print("pass          cpu_threads  fine\\nFAIL          energy_power  counter did not advance")
    if hang == "doctor":
        time.sleep(60)
    print("\\n1 failed, 1 passed, 0 cannot be checked here")
    sys.exit(1)
elif cmd == "numerics":  # the what-if: one fp32 record
    with open(opt("--out"), "a") as f:
        f.write(json.dumps({"mode": "fp32", "status": "ok", "reason": None, "model": opt("--model")}) + "\\n")
    print("format  role  median")
elif cmd == "gemms":
    print("mode  kind  shape  measured ms")
elif cmd in ("run", "fidelity"):
    modes = opt("--modes", "fp32,bf16,mxfp8").split(",")
    parallel = opt("--parallel")
    step = "eager" if cmd == "run" else "fidelity"
    step = "compiled" if "--compile" in args else f"{parallel}-1rank" if parallel else step
    step = "energy" if "--energy-protocol" in args else step
    step = "fp4" if "--keep-high" in args else step
    for i, mode in enumerate(modes):
        error = mode == os.environ.get("FAKE_ERROR") and cmd == "fidelity"
        record = {"mode": mode, "status": "error" if error else "ok", "reason": "RuntimeError: boom" if error else None,
                  "parallel": parallel}
        with open(opt("--out"), "a") as f:
            f.write(json.dumps(record) + "\\n")
        if hang == step:
            print("training...", flush=True)
            time.sleep(60)
    print("done")
    sys.exit(1 if os.environ.get("FAKE_ERROR") in modes and cmd == "fidelity" else 0)
"""


def _fakes(tmp_path: Path) -> dict[str, str]:
    """Environment that runs the script against the fakes."""
    fake = tmp_path / "mpbench"
    fake.write_text(f"#!{sys.executable}\n{FAKE_MPBENCH}")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    return os.environ | {"MPBENCH": str(fake), "PYTHON": sys.executable}


def _run(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, str]:
    out = tmp_path / "out"
    done = subprocess.run(["bash", str(SCRIPT), str(out)], env=_fakes(tmp_path) | env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    return done, (out / "summary.txt").read_text()


def _line(summary: str, step: str) -> str:
    return next(line for line in summary.splitlines() if line.split()[:1] == [step])


def test_a_failed_and_a_killed_step_are_reported_and_the_rest_still_run(tmp_path):
    done, summary = _run(tmp_path, FAKE_ERROR="bf16", FAKE_HANG="eager", FIRST_CONTACT_STEP_S="3")
    assert done.returncode == 1, done.stderr
    for step in STEPS:
        assert _line(summary, step), step
    # the doctor's failed check and verdict counts
    assert "1 pass, 1 FAIL, 0 cannot check" in _line(summary, "doctor")
    assert "first error: FAIL energy_power counter did not advance" in summary
    # eager hung after its first case: stopped at its limit, the finished record kept, the rest named
    eager = _line(summary, "eager")
    assert eager.split()[1] == "124" and "1 ok, 0 skipped, 0 failed, 2 not reached" in eager
    assert "stopped at its limit of 3 s" in summary
    assert "eager: not reached: bf16, mxfp8; to finish" in summary and "--resume" in summary
    # fidelity: one mode failed, with its reason; the steps after it ran all the same
    assert _line(summary, "fidelity").split()[1] == "1" and "2 ok, 0 skipped, 1 failed" in summary
    assert "first error: bf16: error: RuntimeError: boom" in summary
    for step in ("numerics", "gemms", "fp4", "ddp-1rank", "fsdp-1rank", "energy", "compiled"):
        assert _line(summary, step).split()[1] == "0", step
    assert "1 ok, 0 skipped, 0 failed" in _line(summary, "numerics")  # its one fp32 record
    whatif = json.loads((tmp_path / "out" / "numerics.jsonl").read_text())
    assert whatif["model"] == "tiny"  # on a CPU: tiny sizes
    # on a CPU it says what it did not run, and why
    assert "no GPU" in _line(summary, "gpu-sizes") and "no GPU" in _line(summary, "gpu-compile")
    # the mode grid: eager, compiled (bf16 only on a CPU), fidelity
    assert _line(summary, "bf16").split()[1:] == ["not", "reached", "ok", "error"]
    assert _line(summary, "mxfp8").split()[1:] == ["not", "reached", "-", "ok"]
    records = [json.loads(line) for line in (tmp_path / "out" / "records.jsonl").read_text().splitlines()]
    assert [r.get("parallel") for r in records if r.get("parallel")] == ["ddp", "fsdp"]
    assert len(list((tmp_path / "out").iterdir())) <= 8  # what the device tool brings back


def test_sigterm_stops_the_step_in_flight_and_leaves_the_summary(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(["bash", str(SCRIPT), str(out)], env=_fakes(tmp_path) | {"FAKE_HANG": "eager"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while "training..." not in ((out / "run.log").read_text() if (out / "run.log").exists() else ""):
        assert time.monotonic() < deadline and proc.poll() is None, "the eager step never started"
        time.sleep(0.1)
    assert "..." in _line((out / "summary.txt").read_text(), "eager")  # written while it runs
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 143, err
    summary = (out / "summary.txt").read_text()
    assert "stopped by SIGTERM" in summary and "1 ok, 0 skipped, 0 failed" in _line(summary, "eager")
    for step in ("fidelity", "numerics", "gemms", "fp4", "ddp-1rank", "fsdp-1rank", "energy", "compiled"):
        assert "stopped by SIGTERM first" in _line(summary, step)


def test_steps_past_the_budget_are_listed_not_run(tmp_path):
    # 40 s budget, 15 s of it kept for a kill: the doctor starts with 20 s or more left (a step's minimum);
    # stopped at 6 s, it leaves less than 20 s for the next step
    done, summary = _run(tmp_path, FAKE_HANG="doctor", FIRST_CONTACT_STEP_S="6", FIRST_CONTACT_BUDGET_S="40")
    assert done.returncode == 1
    assert _line(summary, "doctor").split()[1] == "124"
    for step in ("eager", "fidelity", "numerics", "gemms", "fp4", "ddp-1rank", "fsdp-1rank", "energy", "compiled"):
        assert "budget was spent" in _line(summary, step), step


def _first_contact():
    spec = importlib.util.spec_from_file_location("first_contact", ROOT / "ci" / "first_contact.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_mode_list_is_read_from_the_real_modes_table(tmp_path, capsys):
    from suite.cli.main import main
    from suite.modes import MODES

    assert main(["modes", "--device", "cpu"]) == 0
    (tmp_path / "modes.txt").write_text(capsys.readouterr().out)
    assert _first_contact().read_modes(tmp_path) == list(MODES)

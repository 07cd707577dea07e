"""The error paths and fallbacks of running, training, records and reporting: each message or value they
produce, in-process with stand-ins (issue 20 part 2.4: no CPU test ran them)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

import pandas
import pytest
import torch

from models import GPTConfig
from suite import hardware
from suite.hardware import resolve_device
from suite.modes.fp32 import FP32
from suite.modes.int8_weight import Int8Weight
from suite.records.checks import _window
from suite.reporting import baseline, procurement
from suite.reporting.report import build_report
from suite.running import distributed, golden, lifeline, worker
from suite.running.sharding import fsdp_wrapper
from suite.training import data, fidelity
from tests.helpers import NoProcPath, small_case

CPU = resolve_device("cpu")

# ----------------------------------------------------------------------------- lifeline


def _ended_pid() -> int:
    """The pid of a process that has ended and been reaped: no /proc entry, no process."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_without_proc_a_process_runs_while_a_signal_0_reaches_it(monkeypatch):
    assert not lifeline.is_running(_ended_pid())  # no /proc entry: os.kill finds no process either
    monkeypatch.setattr(lifeline, "Path", NoProcPath)
    assert lifeline.is_running(os.getpid())

    def not_ours(pid, sig):
        raise PermissionError(f"pid {pid}: not ours to signal")

    monkeypatch.setattr(lifeline.os, "kill", not_ours)
    assert lifeline.is_running(1)  # it exists: only the permission is missing


def test_a_marked_process_that_ends_before_its_kill_is_not_a_survivor(monkeypatch):
    gone, rounds = _ended_pid(), iter([True, False])
    monkeypatch.setattr(lifeline, "marked", lambda name, value: [gone] if next(rounds) else [])
    monkeypatch.setattr(lifeline, "is_running", lambda pid: True)  # listed running, gone by the kill
    assert lifeline.stop_marked("T", "x", wait_s=5) == []


def test_without_pidfd_exit_with_polls_until_the_process_ends(monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    exited = threading.Event()
    codes = []

    def record_exit(code):
        codes.append(code)
        exited.set()

    no_pidfd = SimpleNamespace(kill=os.kill, _exit=record_exit)  # os without pidfd_open (macOS, Linux < 5.3)
    monkeypatch.setattr(lifeline, "os", no_pidfd)
    lifeline.exit_with(child.pid, code=7)
    assert not exited.wait(0.3)  # still running: the watcher waits
    child.kill()
    child.wait()
    assert exited.wait(5) and codes == [7]


# ----------------------------------------------------------------------------- worker


def test_without_a_fork_server_case_processes_are_spawned(monkeypatch):
    monkeypatch.setattr(worker.mp, "get_all_start_methods", lambda: ["fork", "spawn"])
    assert worker.worker_context().get_start_method() == "spawn"


class _FakeProc:
    """A worker process that ends (or ignores SIGTERM) as told, recording what was done to it."""

    def __init__(self, exitcode=None, survives_terminate=False, **_):
        self.exitcode, self.survives, self.calls, self.killed = exitcode, survives_terminate, [], False

    def start(self):
        self.calls.append("start")

    def terminate(self):
        self.calls.append("terminate")

    def kill(self):
        self.calls.append("kill")
        self.killed = True

    def join(self, timeout=None):
        self.calls.append("join")

    def is_alive(self):
        return self.survives and not self.killed


def test_a_worker_gone_without_eof_or_values_is_reported_with_its_signal(monkeypatch):
    proc = _FakeProc(exitcode=-signal.SIGKILL)
    receive = SimpleNamespace(poll=lambda timeout: False, close=lambda: None)  # a grandchild holds the write end
    ctx = SimpleNamespace(Pipe=lambda duplex: (receive, SimpleNamespace(close=lambda: None)), Process=lambda **kw: proc)
    monkeypatch.setattr(worker, "worker_context", lambda: ctx)
    got = worker.train_isolated(small_case(), 1, "label", timeout_s=None, progress=lambda event: None)
    assert got == {"status": "error", "reason": "worker process killed by SIGKILL"}
    assert worker._how_it_died(3) == "worker process exited with code 3 before reporting a result"


def test_a_worker_that_ignores_sigterm_is_killed(monkeypatch):
    proc, stopped = _FakeProc(survives_terminate=True), []
    monkeypatch.setattr(worker, "stop_marked", lambda name, token: stopped.append((name, token)))
    worker._stop(proc, "tok")
    assert proc.calls == ["terminate", "join", "kill", "join"] and stopped == [(worker.CASE_TOKEN, "tok")]


# ----------------------------------------------------------------------------- distributed, sharding, golden


def test_ranks_that_measured_peak_memory_differently_give_no_job_figure():
    ranks = [
        {"rank": 0, "measurements": {"peak_mem_mb": 100.0, "peak_mem_source": "rss", "energy_j_per_step": 1.0}},
        {"rank": 1, "measurements": {"peak_mem_mb": 120.0, "peak_mem_source": "nvml-process"}},
    ]
    m = distributed._combined_measurements(ranks, ranks[0], small_case())
    assert m["peak_mem_mb"] is None and m["peak_mem_source"] is None
    assert m["peak_mem_reason"] == "ranks measured peak_mem_mb differently (['nvml-process', 'rss'])"
    assert m["energy_j_per_step"] is None and "rank(s) [1] measured no energy (no reason given)" in m["energy_reason"]


def test_fsdp_refuses_a_mode_it_cannot_shard():
    with pytest.raises(RuntimeError, match="int8-weight"):
        fsdp_wrapper("fp32", {})(torch.nn.Linear(8, 8), Int8Weight(CPU))


def test_a_golden_case_that_does_not_end_ok_is_not_written(monkeypatch):
    monkeypatch.setattr(golden, "run_cases", lambda cases, **kw: [{"status": "error", "reason": "boom"}])
    with pytest.raises(RuntimeError, match="golden case ended as error: boom"):
        golden.golden_curve()


# ----------------------------------------------------------------------------- training: data, fidelity


def test_the_corpora_refuse_bad_input(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="split='test': use 'train' or 'heldout'"):
        data._generator(0, "test")
    with pytest.raises(ValueError, match="vocab_size=9: the Markov corpus needs more than 9 tokens"):
        data.MarkovCorpus(9)
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"abc")
    with pytest.raises(ValueError, match="odd size, not a uint16 token file"):
        data.FileCorpus(odd)
    monkeypatch.setattr(data, "range", lambda n: iter(()), raising=False)  # no iteration: no convergence
    with pytest.raises(RuntimeError, match="stationary distribution did not converge"):
        data.MarkovCorpus(16).stationary  # noqa: B018


def test_without_proc_meminfo_the_reference_fits_in_free_ram(monkeypatch):
    monkeypatch.setattr(fidelity, "available_ram", lambda: hardware.available_ram(Path("/no/proc/meminfo")))
    size, what = fidelity.available_bytes(CPU)
    assert what == "free RAM" and size == os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_an_optimizer_state_that_is_not_adamws_is_named():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([a, b], lr=0.1, momentum=0.9)
    a.grad = torch.ones(2)
    opt.step()  # state for a only (momentum_buffer); b has none and is passed over
    ref = {"b": torch.nn.Parameter(torch.ones(2)), "a": torch.nn.Parameter(torch.ones(2))}
    why = fidelity._load_adam_state(opt, {"b": b, "a": a}, torch.optim.AdamW(ref.values()), ref)
    assert why == "the mode's optimizer state (momentum_buffer) is not AdamW's step/exp_avg/exp_avg_sq"


def _measure(steps=1):
    """fidelity.measure of fp32 on a model far smaller than tiny: these tests are about what it refuses."""
    config = GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16)
    tiny = small_case(mode="fp32", batch_size=1, seq_len=8)
    case = SimpleNamespace(**vars(tiny) | {"model_config": config, "learning_rate": tiny.learning_rate})
    return fidelity.measure(case, CPU, data.make_corpus(None, 64).batches(steps, 1, 8, case.seed))


def test_fidelity_refuses_a_mode_that_renames_the_parameters(monkeypatch):
    class Wrapped(FP32):
        def prepare(self, model):
            return torch.nn.ModuleDict({"inner": model})

    monkeypatch.setattr(fidelity, "build_mode", lambda name, device, *policy: Wrapped(device))
    with pytest.raises(RuntimeError, match="fp32 renamed the parameters"):
        _measure()


def test_fidelity_refuses_a_step_whose_optimizer_was_never_seen_to_step(monkeypatch):
    monkeypatch.setattr(fidelity, "train_step", lambda model, mode, opt, batch: (torch.tensor(1.0), True))
    with pytest.raises(RuntimeError, match="AdamW's step pre-hook never ran"):
        _measure()


def test_a_later_step_without_readable_optimizer_state_compares_no_update(monkeypatch):
    monkeypatch.setattr(fidelity, "_load_adam_state", lambda *a: "unreadable moments")
    steps = _measure(steps=2)
    assert steps[1].update is None and steps[1].note == "no update compared at step 2: unreadable moments"


# ----------------------------------------------------------------------------- records and reporting


def test_step_times_with_a_non_number_are_not_judged_against_the_window():
    r = {"step_times_ms": [5000.0, 5000.0], "window_s": 1.0}
    assert [s["rule"] for s in _window(r)] == ["step_times_within_window"]  # over the window
    assert list(_window(r | {"step_times_ms": [5000.0, "nan"]})) == []


def test_a_baseline_lives_per_machine_and_a_missing_one_loads_as_none(tmp_path):
    path = baseline.baseline_path({"gpu_name": "NVIDIA H100 80GB HBM3"}, tmp_path)
    assert path.parent == tmp_path and path.suffix == ".json" and "h100" in path.name.lower()
    assert baseline.load(path) is None
    path.write_text('{"x": 1}')
    assert baseline.load(path) == {"x": 1}


def test_procurement_rows_say_why_each_figure_is_missing():
    emulated = procurement._row({"mode": "mxfp8", "emulated": True, "emulated_reason": "no B200"}, {}, 2.0)
    assert "emulated kernels, no speed figures: no B200" in emulated["notes"]
    assert emulated["time_to_target_s"] is None and "no time to target" not in emulated["notes"]
    plain = procurement._row({"mode": "fp32"}, {}, 2.0)
    assert "tokens/s not measured" in plain["notes"] and "step time not measured" in plain["notes"]


def test_a_report_of_no_records_is_refused(tmp_path):
    with pytest.raises(ValueError, match="records: nothing to report"):
        build_report(pandas.DataFrame(), tmp_path)

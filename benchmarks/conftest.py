"""Options and the shared case cache for `pytest benchmarks/`.

Every case's record comes from `suite.running.runner.run_cases`, the same workers, loop and
trackers as `mpbench run`: the whole matrix selected runs in one call, fp32 first, before any
test trains in this process (so no CUDA context or cached memory of pytest's own sits beside a
case). pytest-benchmark's table then times rounds of single train steps (benchmarks/steps.py).
Defaults depend on the device found: a small smoke matrix on a CPU (so the suite itself is
tested everywhere), GPT-2 small at full context on a GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import pytest

# libgomp's default wait policy lets torch's idle OpenMP threads spin: on a busy 2-core machine they
# then burn the time slices the working thread needs. Four tiny cases in one process took 27-42 s
# with it and 2.6-3.7 s with PASSIVE (load average ~6). Set before anything imports torch here, and
# inherited by the fork server that starts each case's worker; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

SMOKE = dict(model="tiny", batch_size=4, seq_len=64, steps=8, warmup=2)
GPU = dict(model="gpt2-small", batch_size=16, seq_len=1024, steps=60, warmup=10)
ALL_MODES = (
    "fp32,tf32,amp-fp16,bf16,pure-fp16,int8-weight,"  # fp32 first: the reference
    "pure-bf16,pure-bf16-sr,int8-mixed,fp8-tensorwise,fp8-rowwise,mxfp8,nvfp4,mxfp4"
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("mpbench")
    group.addoption("--mpbench-device", default="auto", help="auto | cpu | cuda | cuda:N")
    group.addoption("--mpbench-model", default=None, help="comma-separated presets (default: tiny on CPU, gpt2-small)")
    group.addoption("--mpbench-modes", default=ALL_MODES, help="comma-separated modes (default: all)")
    group.addoption("--mpbench-steps", type=int, default=None, help="steps per case (default: 8 CPU, 60 GPU)")
    group.addoption("--mpbench-warmup", type=int, default=None, help="untimed steps (default: 2 CPU, 10 GPU)")
    group.addoption("--mpbench-batch-size", type=int, default=None)
    group.addoption("--mpbench-seq-len", type=int, default=None)
    group.addoption("--mpbench-compile", action="store_true", help="torch.compile every case")
    group.addoption("--mpbench-emulate", action="store_true", help="emulate fp8/MXFP8 below their GPU capability")
    group.addoption("--mpbench-baselines", default="results/baselines", help="folder of committed baselines")
    group.addoption("--mpbench-out", default=None, help="also append every record to this JSON Lines file")
    group.addoption(
        "--mpbench-overhead", action="store_true", help="also time the tracker overhead on a CPU (reported, not gated)"
    )
    group.addoption(
        "--mpbench-gemms",
        action="store_true",
        help="also time the biggest GEMM against the calibrated ceiling on a CPU (reported, not gated)",
    )


@dataclass(frozen=True)
class BenchConfig:
    device: str
    models: list[str]
    modes: list[str]
    sizes: dict[str, int]
    compile: bool
    baselines: str
    emulate: bool
    out: str | None


def _config(config: pytest.Config) -> BenchConfig:
    from suite.hardware import resolve_device

    device = resolve_device(config.getoption("--mpbench-device"))  # read once; the cases carry the result
    defaults = GPU if device.type == "cuda" else SMOKE
    sizes = {
        k: config.getoption(f"--mpbench-{k.replace('_', '-')}") or defaults[k]
        for k in ("batch_size", "seq_len", "steps", "warmup")
    }
    models = (config.getoption("--mpbench-model") or defaults["model"]).split(",")
    modes = [m.strip() for m in config.getoption("--mpbench-modes").split(",") if m.strip()]
    return BenchConfig(str(device.torch_device), models, modes, sizes, config.getoption("--mpbench-compile"),
                       config.getoption("--mpbench-baselines"), config.getoption("--mpbench-emulate"),
                       config.getoption("--mpbench-out"))  # fmt: skip


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    from benchmarks.steps import REFERENCE, case_id

    cfg = _config(metafunc.config)
    if "model" in metafunc.fixturenames:
        metafunc.parametrize("model", cfg.models)
    if "mode" in metafunc.fixturenames:  # the id says when a mode's step time is not a speed here
        # fp32 first, whatever --mpbench-modes says: its rounds are the reference of every speed-up
        modes = sorted(cfg.modes, key=lambda m: m != REFERENCE)
        metafunc.parametrize("mode", modes, ids=[case_id(m, cfg.device, cfg.emulate) for m in modes])


WANTED = pytest.StashKey[list]()  # (model, mode) of every selected test, fp32 of each model first
CACHE = pytest.StashKey["CaseCache"]()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Remember which cases the selected tests need (after -k and friends), to run them in one go."""
    from benchmarks.steps import REFERENCE

    pairs = [(i.callspec.params["model"], i.callspec.params["mode"]) for i in session.items
             if hasattr(i, "callspec") and {"model", "mode"} <= set(i.callspec.params)]  # fmt: skip
    references = [(model, REFERENCE) for model in dict.fromkeys(model for model, _ in pairs)]
    session.config.stash[WANTED] = list(dict.fromkeys(references + pairs))


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's own table
def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """Each train step against fp32 (pytest-benchmark's table compares with the fastest row)."""
    from benchmarks.steps import summary_lines

    cache = config.stash.get(CACHE, None)
    if cache is not None and cache.rounds:
        terminalreporter.write_sep("-", "mpbench: one train step per round, against fp32 (speed-up = fp32 / mode)")
        for line in summary_lines(cache.rounds):
            terminalreporter.write_line(line)


class CaseCache:
    """Runs each (model, mode) once per session and keeps its record: the selected matrix runs in
    one `run_cases` call at first need, the gates read it, and a gate that needs a case not yet
    run runs it then. Also keeps each case's timed rounds, for the comparison with fp32."""

    def __init__(self, cfg: BenchConfig, wanted: list[tuple[str, str]] | None = None) -> None:
        from benchmarks.steps import RoundStats

        self.cfg = cfg
        self.wanted = list(wanted or [])
        self.records: dict[tuple[str, str], dict[str, Any]] = {}
        self.rounds: dict[tuple[str, str], RoundStats] = {}

    def case(self, model: str, mode: str):
        from suite.training.case import Case

        return Case(model=model, mode=mode, device=self.cfg.device, compile=self.cfg.compile,
                    emulate=self.cfg.emulate, **self.cfg.sizes)  # fmt: skip

    def run(self, model: str, mode: str) -> dict[str, Any]:
        self.run_all([(model, mode)])
        return self.records[model, mode]

    def run_all(self, pairs: list[tuple[str, str]]) -> None:
        """Run the cases not run yet, in one `run_cases` call (each model's fp32 first, as `mpbench run`)."""
        from suite.running.runner import run_cases

        todo = [pair for pair in dict.fromkeys(pairs) if pair not in self.records]
        if todo:
            records = run_cases([self.case(*pair) for pair in todo], out=self.cfg.out, log=None)
            self.records |= {(r["model"], r["mode"]): r for r in records}

    def get(self, model: str, mode: str) -> dict[str, Any]:
        self.run_all(self.wanted)  # the whole selected matrix, once, before this process trains anything
        return self.records.get((model, mode)) or self.run(model, mode)


@pytest.fixture(scope="session")
def bench_config(pytestconfig: pytest.Config) -> BenchConfig:
    return _config(pytestconfig)


@pytest.fixture(scope="session")
def cases(bench_config: BenchConfig, pytestconfig: pytest.Config) -> CaseCache:
    cache = CaseCache(bench_config, pytestconfig.stash.get(WANTED, []))
    pytestconfig.stash[CACHE] = cache
    return cache


@pytest.fixture
def runnable(cases: CaseCache, model: str, mode: str) -> None:
    """Skip a mode this device cannot run (or only emulated, without --mpbench-emulate), with its reason."""
    from suite.hardware import resolve_device
    from suite.modes import get_mode
    from suite.modes.base import decide

    reason, _ = decide(get_mode(mode), resolve_device(cases.cfg.device), cases.cfg.emulate)
    if reason:
        pytest.skip(reason)

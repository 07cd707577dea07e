"""The device a user names is read once, at the edge, and every GPU path downstream gets a concrete one.

With fake GPUs present (tests/fake_gpu.py) each entry point (the Python API, `mpbench run`'s flags
and config file, the benchmarks, asv, a torchrun rank, the fidelity step) is followed down to the
first transfer onto a GPU: which device, which GPU was current, which process-group backend.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import pytest

from suite.hardware import concrete_device, empty_cache, resolve_device
from suite.running import distributed
from suite.running.execute import train_in_process
from suite.running.runner import validate
from suite.training.case import Case
from tests.fake_gpu import FakeGpus, GpuReached


@pytest.fixture
def gpus(monkeypatch) -> FakeGpus:
    return FakeGpus(monkeypatch, count=2)


@pytest.fixture
def torchrun_env(monkeypatch):
    """This process as rank `rank` of a torchrun job of `world` ranks, `local` of them on this node."""

    def set_env(rank: int, world: int, local: int) -> None:
        for key in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
            monkeypatch.delenv(key, raising=False)
        env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank % local, "LOCAL_WORLD_SIZE": local}
        for key, value in env.items():
            monkeypatch.setenv(key, str(value))

    return set_env


def test_device_names_become_concrete_devices(gpus, monkeypatch):
    assert [concrete_device(n) for n in ("auto", "cuda", "cuda:1", "cpu")] == ["cuda:0", "cuda:0", "cuda:1", "cpu"]
    with pytest.raises(ValueError, match="device='gpu' is unknown; choose auto, cpu, cuda or cuda:N"):
        concrete_device("gpu")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert concrete_device("auto") == "cpu"


def _bench_config(device: str):
    import benchmarks.conftest as bench

    options = {"--mpbench-device": device, "--mpbench-modes": "fp32,bf16", "--mpbench-compile": False,
               "--mpbench-baselines": "", "--mpbench-emulate": False, "--mpbench-out": None}  # fmt: skip
    config = types.SimpleNamespace(getoption=lambda name: options.get(name))
    return bench._config(config)


def test_every_entry_point_gives_its_cases_the_gpu_for_auto(gpus, tmp_path, monkeypatch):
    from benchmarks.asv_bench.bench_matrix import matrix_cases
    from suite.cli.config import load_config
    from suite.cli.run import cases_from_options

    config = tmp_path / "m.toml"
    config.write_text('modes = ["fp32", "bf16"]\ndevice = "auto"\n')
    monkeypatch.setenv("MPBENCH_ASV_DEVICE", "auto")
    entry_points = {
        "python api": [Case(mode="bf16")],
        "run flags": cases_from_options({"modes": "fp32,bf16"}),
        "config file": cases_from_options(load_config(str(config))),
        "asv": matrix_cases(),
        "benchmarks": [Case(mode="fp32", device=_bench_config("auto").device)],
    }
    for where, cases in entry_points.items():
        assert {c.device for c in cases} == {"cuda:0"}, where
    assert cases_from_options({"modes": "fp32", "device": "cuda:1"})[0].device == "cuda:1"
    assert entry_points["run flags"][0].batch_size == 16  # the GPU default sizes, not the CPU's


@pytest.mark.parametrize("name, current", [("auto", 0), ("cuda:1", 1)])
def test_the_train_step_gets_the_cases_gpu_as_the_current_device(gpus, name, current):
    values = train_in_process(Case(mode="bf16", device=name, steps=3, warmup=1), 1, "t", lambda event: None)
    assert values["status"] == "error" and "GpuReached" in values["reason"]
    assert gpus.moves == [(f"cuda:{current}", current)]


def test_the_fidelity_step_gets_the_cases_gpu_as_the_current_device(gpus):
    from suite.training import fidelity

    case = Case(mode="fp32", device="cuda:1", batch_size=2, seq_len=16, steps=1, warmup=0)
    batches = __import__("torch").zeros(1, 2, 17, dtype=__import__("torch").long)
    with pytest.raises(GpuReached):
        fidelity.measure(case, resolve_device(case.device), batches)
    assert gpus.moves == [("cuda:1", 1)]  # GPU 1 current: no context or allocation lands on GPU 0


def test_the_allocator_cache_is_emptied_with_the_cases_gpu_current(gpus, monkeypatch):
    """torch.cuda.empty_cache() called with GPU 0 current makes a CUDA context there (pytorch/pytorch#144025):
    the doctor's memory probe, a case's clean-up and `mpbench fidelity`'s each empty it with cuda:1 current."""
    import torch

    from suite.cli.fidelity import _one
    from suite.metrics.probes import TorchCuda

    current: list[int] = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: current.append(gpus.current))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    empty_cache(torch.device("cuda", 1))  # CUDA not initialized in this process: nothing to empty, no context
    assert current == []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # each has used the GPU by then
    TorchCuda(1).empty_cache()  # `mpbench doctor --device cuda:1`, before NVML's "before" reading
    train_in_process(Case(mode="fp32", device="cuda:1", steps=3, warmup=1), 1, "t", lambda event: None)
    case = Case(mode="fp32", device="cuda:1", batch_size=2, seq_len=16, steps=1, warmup=0)
    assert _one(case, resolve_device(case.device), torch.zeros(1, 2, 17, dtype=torch.long))["status"] == "error"
    assert current == [1, 1, 1] and gpus.current == 0


def _rank_main(tmp_path: Path, case: Case, monkeypatch) -> dict:
    """`distributed.main` of one rank, stopped at its first GPU transfer; what it chose."""
    import torch.distributed as dist

    chosen: dict = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: chosen.update(backend=backend,
                        timeout_s=timeout.total_seconds()))  # fmt: skip
    spec = tmp_path / "case.json"
    spec.write_text(json.dumps({"case": case.__dict__, "flops_per_step": 1, "label": "t"}))
    with pytest.raises(GpuReached):
        distributed.main([str(spec), str(tmp_path)])
    return chosen


@pytest.mark.parametrize("compile_, timeout_s", [(False, distributed.COLLECTIVE_TIMEOUT_S), (True, 1800)])
def test_each_torchrun_rank_trains_on_its_own_gpu_with_nccl(gpus, tmp_path, monkeypatch, torchrun_env, compile_,
                                                             timeout_s):  # fmt: skip
    torchrun_env(rank=1, world=2, local=2)
    case = Case(mode="fp32", nproc=2, steps=3, warmup=2, compile=compile_)  # as `mpbench run --nproc 2` builds it
    assert case.device == "cuda:0"
    chosen = _rank_main(tmp_path, case, monkeypatch)
    assert chosen == {"backend": "nccl", "timeout_s": timeout_s}  # 8 ranks compiling at once take minutes
    assert gpus.set_devices == [1] and gpus.moves == [("cuda:1", 1)]
    assert "GpuReached" in json.loads((tmp_path / "rank-1.error.json").read_text())["reason"]


def test_ranks_of_a_case_on_gpu_n_use_the_gpus_from_n_on(monkeypatch, tmp_path, torchrun_env):
    gpus = FakeGpus(monkeypatch, count=4)
    torchrun_env(rank=1, world=2, local=2)
    case = Case(mode="fp32", device="cuda:2", nproc=2, steps=3, warmup=1)
    validate([case])  # GPUs 2 and 3 exist
    _rank_main(tmp_path, case, monkeypatch)
    assert gpus.moves == [("cuda:3", 3)]
    with pytest.raises(ValueError, match=r"would use cuda:3..cuda:4, but 4 GPU\(s\) are visible.*CUDA_VISIBLE_DEVICES"):
        validate([Case(mode="fp32", device="cuda:3", nproc=2)])


def test_a_user_launched_rank_trains_on_its_local_gpu(gpus, monkeypatch, torchrun_env):
    import torch.distributed as dist

    torchrun_env(rank=3, world=4, local=2)  # the second node's second rank
    chosen: dict = {}
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, timeout: chosen.update(backend=backend))
    with pytest.raises(GpuReached):
        distributed.train_here(Case(mode="fp32", nproc=4, steps=3, warmup=1), 1, "t")
    assert chosen == {"backend": "nccl"} and gpus.moves == [("cuda:1", 1)]


def test_a_multi_node_torchrun_job_is_checked_against_this_nodes_gpus(monkeypatch, torchrun_env, capsys):
    """docs/many-gpus.md's 2 x 8 example: 16 ranks, 8 per node, each node with 8 GPUs."""
    from suite.cli import run as run_cli
    from suite.cli.main import main

    FakeGpus(monkeypatch, count=8)
    torchrun_env(rank=11, world=16, local=8)
    ran: list[Case] = []
    monkeypatch.setattr(run_cli, "run_cases", lambda cases, **kw: ran.extend(cases) or [])
    assert main(["run", "--modes", "fp32,bf16", "--steps", "4"]) == 0, capsys.readouterr().err
    assert [(c.device, c.nproc) for c in ran] == [("cuda:0", 16), ("cuda:0", 16)]
    torchrun_env(rank=11, world=16, local=16)  # 16 ranks on one node of 8 GPUs: refused, exit 2
    assert main(["run", "--modes", "fp32"]) == 2
    assert "torchrun's 16 ranks on this node" in capsys.readouterr().err


def test_the_parent_hands_torchrun_the_concrete_device(gpus, monkeypatch):
    import subprocess

    seen: dict = {}

    class Torchrun:
        def __init__(self, cmd, **kwargs):
            spec = Path(cmd[cmd.index("suite.running.rank") + 1])
            seen.update(json.loads(spec.read_text())["case"])
            self.pid, self.returncode, self.stderr = -1, 1, iter(())

        def wait(self, timeout=None):
            return 1

    monkeypatch.setattr(subprocess, "Popen", Torchrun)
    monkeypatch.setattr(distributed.os, "killpg", lambda pid, sig: None)  # the fake torchrun has no group
    values = distributed.train_distributed(Case(mode="fp32", nproc=2), 1, "t", None, lambda event: None)
    assert values["status"] == "error" and seen["device"] == "cuda:0"

"""`mpbench doctor`: check a machine before trusting its figures, one line per check.

Each check is pass, fail or cannot check, with the reason and the figures it judged. On a GPU
the probes (suite/metrics/probes.py) take a few seconds: CUDA events against wall time, the
energy counter and power, GPM tensor-core use of bf16 against strict fp32, NVML's process
memory against the allocator, the matmul rate against the peak table, throttling, other
processes. On a CPU the GPU checks say "cannot check" and why. Exit 1 when a check fails.
The GPU checks are in suite/cli/gpu_checks.py; whether the machine is quiet enough to time (load
average, repeatability of a small matmul) in suite/cli/quiet_checks.py: those warn, they never fail.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from suite.cli import quiet_checks as quiet
from suite.cli.gpu_checks import CANNOT, FAIL, GPU_CHECKS, PASS, WARN, Check, Durations, Machine
from suite.cli.gpu_checks import gpu_visible as _gpu_visible
from suite.cli.gpu_checks import nvml_same_gpu as _nvml_same_gpu
from suite.cli.quiet_checks import Host
from suite.hardware import native_bf16_flag
from suite.metrics import nvml as nvml_lib
from suite.metrics import probes

__all__ = ["CANNOT", "FAIL", "GPU_CHECKS", "PASS", "WARN", "Check", "Durations", "Host", "diagnose", "format_checks"]


def _versions(nvml: Any | None) -> Check:
    def read(fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as exc:  # unknown, with why: a version is information, not a verdict
            return f"unknown ({type(exc).__name__})"

    cuda_driver = read(lambda: nvml.nvmlSystemGetCudaDriverVersion()) if nvml else None
    if isinstance(cuda_driver, int):
        cuda_driver = f"{cuda_driver // 1000}.{cuda_driver % 1000 // 10}"
    figures = {
        "torch": torch.__version__, "cuda_runtime": torch.version.cuda, "python": platform.python_version(),
        "driver": read(lambda: nvml.nvmlSystemGetDriverVersion()) if nvml else None,
        "cuda_driver": cuda_driver, "nvidia_ml_py": read(lambda: importlib.metadata.version("nvidia-ml-py")),
    }  # fmt: skip
    return Check("versions", PASS, ", ".join(f"{k} {v or 'none'}" for k, v in figures.items()), figures)


def _threads() -> Check:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    threads = torch.get_num_threads()
    figures = {"torch_threads": threads, "usable_cores": cores}
    if threads > cores:
        return Check("cpu_threads", FAIL, f"torch uses {threads} threads on {cores} usable cores: oversubscribed, "
                     "CPU timings will be noise (set OMP_NUM_THREADS)", figures)  # fmt: skip
    return Check("cpu_threads", PASS, f"torch uses {threads} thread(s) of {cores} usable core(s)", figures)


def _cpu_bf16() -> Check:
    """bf16 autocast on this CPU: a matmul close to fp32's, and whether the CPU has bf16 instructions."""
    native = native_bf16_flag()
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(256, 256, generator=gen), torch.randn(256, 256, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = a @ b
    err = float((low.float() - a @ b).norm() / (a @ b).norm())
    figures = {"rel_error": err, "native": native}
    how = f"native ({native})" if native else "no bf16 instructions: emulated, ~30x slower than fp32"
    if low.dtype != torch.bfloat16 or not err < 2e-2:
        return Check("cpu_bf16", FAIL, f"bf16 autocast matmul off by {err:.2g} (dtype {low.dtype})", figures)
    return Check("cpu_bf16", PASS, f"bf16 autocast matmul within {err:.1e} of fp32; {how}", figures)


@dataclass(frozen=True)
class TorchaoBuild:
    """torchao as this process loaded it: its version, the C extension files it ships, which failed to load."""

    version: str | None  # None: torchao does not import (`error` says why)
    cuda: str | None  # torch's CUDA build (torch.version.cuda); None for a CPU build of torch
    files: tuple[str, ...] = ()  # the _C*.so files next to torchao/__init__.py, which it loads on import
    failed: dict[str, str] = field(default_factory=dict)  # file -> why it does not load
    skipped: str | None = None  # torchao's own reason for loading none (its torch-version gate, an env override)
    error: str | None = None


def torchao_build(module: Any = None, loaded: Collection[str] | None = None,
                  load: Callable[[str], None] | None = None) -> TorchaoBuild:  # fmt: skip
    """The doctor's torchao boundary. torchao 0.18's __init__ globs `_C*.so` beside itself and passes each to
    `torch.ops.load_library`, which adds the real path to `torch.ops.loaded_libraries` on success; a failure
    is only logged. A file not in that set is loaded again here, for its error (a failed dlopen leaves
    nothing behind). `module`, `loaded` and `load` replace torchao, that set and that function in tests."""
    cuda = torch.version.cuda
    if module is None:
        try:
            module = importlib.import_module("torchao")
        except Exception as exc:  # not installed, or an ABI mismatch that breaks its import
            return TorchaoBuild(None, cuda, error=f"{type(exc).__name__}: {exc}")
    loaded = torch.ops.loaded_libraries if loaded is None else loaded
    load = torch.ops.load_library if load is None else load
    files = sorted(Path(module.__file__).parent.glob("_C*.so"))
    skipped = getattr(module, "_skip_reason", None) if getattr(module, "skip_loading_so_files", False) else None
    failed = {}
    for f in [] if skipped else files:
        if os.path.realpath(f) not in loaded:
            try:
                load(str(f))
            except Exception as exc:
                failed[f.name] = f"{type(exc).__name__}: {exc}"
    return TorchaoBuild(str(module.__version__), cuda, tuple(f.name for f in files), failed, skipped)


def _torchao_check(b: TorchaoBuild, gpu_why: str | None) -> Check:
    """Whether torchao's C extensions (its CUDA kernels: MXFP8 casts, CUTLASS GEMMs) loaded, and the fix."""
    name, figures = "torchao_c_extension", asdict(b)
    if b.version is None:
        return Check(name, CANNOT, f"torchao does not import ({b.error}): the torchao modes are skipped", figures)
    state = f"torchao {b.version}: {len(b.files) - len(b.failed)} of {len(b.files)} C extension(s) loaded"
    if b.cuda is None:
        return Check(name, CANNOT, f"{state}; torch {torch.__version__} is a CPU build and these are CUDA kernels, "
                     "unused here", figures)  # fmt: skip
    if gpu_why:
        return Check(name, CANNOT, f"{state}; {gpu_why}", figures)
    cu = "cu" + b.cuda.replace(".", "")  # torch.version.cuda "13.0" -> the PyTorch index's "cu130"
    fix = (f"fix: pip install --force-reinstall --no-deps torchao=={b.version.split('+')[0]} --index-url "
           f"https://download.pytorch.org/whl/{cu} (the build for torch's CUDA {b.cuda})")  # fmt: skip
    if b.skipped:
        return Check(name, FAIL, f"torchao {b.version} loaded no C extension: {b.skipped}; {fix}", figures)
    if not b.files:
        return Check(name, FAIL, f"torchao {b.version} ships no C extension (a CPU build?) beside torch+{cu}; {fix}",
                     figures)  # fmt: skip
    if b.failed:
        first, why = next(iter(b.failed.items()))
        return Check(name, FAIL, f"{state}; {first}: {why}; its CUDA kernels are missing and torchao falls back "
                     f"or fails; {fix}", figures)  # fmt: skip
    return Check(name, PASS, f"{state} ({', '.join(b.files)}) with torch CUDA {b.cuda}", figures)


def _record_self_check(device: str) -> Check:
    """A short tiny fp32 run through the real pipeline: its record must break no self-check rule."""
    from suite.running.runner import run_cases  # training imports stay out of the other checks
    from suite.training.case import Case

    case = Case(model="tiny", mode="fp32", device=device, batch_size=2, seq_len=32, steps=8, warmup=2,
                eval_batches=1)  # fmt: skip
    r = run_cases([case], log=None, isolate=False)[0]
    figures = {"status": r["status"], "step_time_ms": r["step_time_ms"], "suspect": r["suspect"]}
    if r["status"] != "ok":
        return Check("record_self_check", FAIL, f"tiny fp32 run ended {r['status']}: {r['reason']}", figures)
    if r["suspect"]:
        notes = "; ".join(f"{s['rule']}: {s['note']}" for s in r["suspect"])
        return Check("record_self_check", FAIL, f"tiny fp32 run's record breaks: {notes}", figures)
    return Check("record_self_check", PASS, f"a {case.steps}-step tiny fp32 run on {r['device']} wrote a record "
                 f"that breaks no self-check rule ({r['step_time_ms']:.2f} ms/step)", figures)  # fmt: skip


def diagnose(device: str = "auto", cuda: Any = None, nvml_module: Any = None, durations: Durations | None = None,
             run_record: bool = True, torchao: Callable[[], TorchaoBuild] = torchao_build,
             host: Host | None = None) -> list[Check]:  # fmt: skip
    """Every check for `device` ("auto", "cpu", "cuda", "cuda:N"); `cuda`/`nvml_module`/`torchao`/`host` (load
    average, clock) replace the real ones; `run_record` adds a short tiny training run whose record must pass
    the self-check."""
    checks = _diagnose(device, cuda, nvml_module, durations or Durations(), torchao, host or Host())
    if run_record:
        gpu = next(c for c in checks if c.name == "gpu_visible").status == PASS
        target = device if device != "auto" else ("cuda" if gpu else "cpu")
        if target.startswith("cuda") and not gpu:
            checks.insert(-1, Check("record_self_check", CANNOT, "no CUDA GPU to train on"))
        else:
            checks.insert(-1, _guard("record_self_check", lambda: _record_self_check(target)))
    return checks


def _diagnose(device: str, cuda: Any, nvml_module: Any, durations: Durations,
              torchao: Callable[[], TorchaoBuild], host: Host) -> list[Check]:  # fmt: skip
    """The checks without the training run."""
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        raise ValueError(f"device={device!r} is unknown; choose auto, cpu, cuda or cuda:N")
    out = [_threads(), _guard("cpu_load", lambda: quiet.cpu_load(host))]
    index = int(device[5:]) if device.startswith("cuda:") else 0
    m = Machine(cuda if cuda is not None else probes.TorchCuda(index), durations=durations)
    gpu_names = ["gpu_visible", "nvml_same_gpu", *(name for name, _, _ in GPU_CHECKS)]
    absent = m.cuda.unavailable()
    if device == "cpu" or (device == "auto" and absent):
        why = "--device cpu" if device == "cpu" else absent
        out.append(_cpu_bf16())
        what = f"an fp32 {quiet.CPU_N}^3 matmul on the CPU (perf_counter)"
        out.append(_guard("repeatability", lambda: quiet.repeatability(quiet.cpu_sampler(host.timer), what)))
        out += [Check(name, CANNOT, why) for name in gpu_names]
        nvml, _ = nvml_lib.load_nvml(nvml_module)
        return [*out, _guard("torchao_c_extension", lambda: _torchao_check(torchao(), why)), _versions(nvml)]
    out.append(_gpu_visible(m))
    out.append(_guard("torchao_c_extension", lambda: _torchao_check(torchao(), absent)))
    if absent:
        cannot = [*gpu_names[1:], "repeatability"]  # the GPU asked for is the one to time
        return [*out, *(Check(n, CANNOT, absent) for n in cannot), _versions(None)]
    out.append(_guard("nvml_same_gpu", lambda: _nvml_same_gpu(m, nvml_module)))
    for name, check, needs_nvml in GPU_CHECKS:
        if needs_nvml and m.handle is None:
            out.append(Check(name, CANNOT, f"NVML not matched to this GPU: {m.nvml_reason}"))
        else:
            out.append(_guard(name, lambda check=check: check(m)))
    out.append(
        _guard(
            "repeatability",
            lambda: quiet.repeatability(
                quiet.gpu_sampler(m.cuda), f"a bf16 {quiet.GPU_N}^3 matmul loop on {m.cuda.name()} (CUDA events)"
            ),
        )
    )
    return [*out, _versions(m.nvml)]


def _guard(name: str, check: Callable[[], Check]) -> Check:
    """The check's verdict; a probe that raised (a CUDA or NVML error) is a failure, named."""
    try:
        return check()
    except Exception as exc:
        return Check(name, FAIL, f"probe raised {type(exc).__name__}: {exc}")


def format_checks(results: list[Check]) -> str:
    """One line per check: status (FAIL and WARN in capitals: they ask for action), name, detail."""
    width = max(len(c.name) for c in results)
    lines = [
        f"{c.status.upper() if c.status in (FAIL, WARN) else c.status:<12}  {c.name:<{width}}  {c.detail}"
        for c in results
    ]
    count = {s: sum(c.status == s for c in results) for s in (FAIL, WARN, PASS, CANNOT)}
    # "N failed, N passed, N cannot be checked here" first: ci/first_contact.py reads that prefix
    lines.append(f"\n{count[FAIL]} failed, {count[PASS]} passed, {count[CANNOT]} cannot be checked here; "
                 f"{count[WARN]} warned (busy: timings will be noisy)")  # fmt: skip
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    """Print the checks (or --json); exit 1 when one failed (a warning, a busy machine, does not fail)."""
    results = diagnose(args.device, run_record=not args.no_run)
    failed = any(c.status == FAIL for c in results)
    if args.json:
        warned = any(c.status == WARN for c in results)
        print(json.dumps({"device": args.device, "failed": failed, "warned": warned,
                          "checks": [asdict(c) for c in results]}, indent=2, default=str))  # fmt: skip
    else:
        print(format_checks(results))
    return 1 if failed else 0


def add_parser(sub: Any) -> None:
    """Register `mpbench doctor` on the subcommand parsers."""
    doc = sub.add_parser("doctor", help="check this machine (GPU, NVML, clocks, energy) before trusting its figures")
    doc.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    doc.add_argument("--json", action="store_true", help="the same checks as JSON")
    doc.add_argument("--no-run", action="store_true", help="skip the short tiny training run (record self-check)")
    doc.set_defaults(func=cmd_doctor)

"""asv: the precision matrix, trained once per commit, every metric tracked per mode.

`setup_cache` trains every mode once (in its own process, as asv runs it) with the same
runner as `mpbench run`; each `track_*` method reads one figure of one mode's record.
Nothing heavy is imported at module level, so `asv check` is quick on any machine.

asv treats every value as lower-is-better (asv issue #1617). So the figures that gate a pull
request (`asv continuous --bench track_lower_`) are all lower-is-better: step time, time and
energy per token, memory, losses. Higher-is-better figures (MFU, tensor-core utilization)
are `track_graph_*`: graphed, never gated.

Environment: MPBENCH_ASV_MODEL (default tiny on a CPU, gpt2-small on a GPU),
MPBENCH_ASV_STEPS (default 8 on a CPU, 60 on a GPU), MPBENCH_ASV_DEVICE (default auto).
"""

from __future__ import annotations

import math
import os

# fixed here rather than imported, so that importing this file does not import torch;
# tests/test_asv_bench.py checks it against the registry
MODES = ["fp32", "tf32", "amp-fp16", "bf16", "pure-fp16", "int8-weight",
         "pure-bf16", "pure-bf16-sr", "int8-mixed", "fp8-tensorwise", "fp8-rowwise", "mxfp8", "nvfp4",
         "mxfp4"]  # fmt: skip
# timings of a mode on emulated kernels (fp8/MXFP8 on a CPU) are not speeds: tracked as n/a
SPEED_KEYS = ("step_time_ms", "energy_j_per_step", "tokens_per_s", "mfu")


def matrix_cases() -> list:
    """The cases asv trains, from the environment (torch imported only here)."""
    from suite.hardware import resolve_device
    from suite.training.case import Case

    device = resolve_device(os.environ.get("MPBENCH_ASV_DEVICE", "auto"))  # read once; the cases carry the result
    on_gpu = device.type == "cuda"
    model = os.environ.get("MPBENCH_ASV_MODEL", "gpt2-small" if on_gpu else "tiny")
    steps = int(os.environ.get("MPBENCH_ASV_STEPS", "60" if on_gpu else "8"))
    sizes = dict(batch_size=16, seq_len=1024, warmup=10) if on_gpu else dict(batch_size=4, seq_len=64, warmup=2)
    return [Case(model=model, mode=m, device=str(device.torch_device), steps=steps, **sizes) for m in MODES]


def figure(records: dict[str, dict], mode: str, key: str, scale: float = 1.0) -> float:
    """One metric of one mode's record; NaN (shown as n/a) when the mode did not run or the
    metric was not measured. A skipped mode is skipped by `setup` before this is reached."""
    r = records.get(mode, {})
    value = None if r.get("emulated") and key in SPEED_KEYS else r.get(key)
    return value * scale if isinstance(value, (int, float)) else math.nan


def per_token(records: dict[str, dict], mode: str, key: str, scale: float) -> float:
    r = records.get(mode, {})
    value, tokens = None if r.get("emulated") and key in SPEED_KEYS else r.get(key), r.get("tokens_per_step")
    return value * scale / tokens if isinstance(value, (int, float)) and tokens else math.nan


class PrecisionMatrix:
    params = [MODES]
    param_names = ["mode"]
    timeout = 3600  # the whole matrix trains in setup_cache

    def setup_cache(self) -> dict[str, dict]:
        from suite.running.runner import run_cases

        return {r["mode"]: r for r in run_cases(matrix_cases(), log=None)}

    def setup(self, records: dict[str, dict], mode: str) -> None:
        r = records.get(mode)
        if r is None or r["status"] == "skipped":
            raise NotImplementedError(r["reason"] if r else f"{mode} not in this run")  # asv: skip

    # lower is better: these gate `asv continuous --bench track_lower_`
    def track_lower_step_time(self, records, mode):
        return figure(records, mode, "step_time_ms")

    track_lower_step_time.unit = "ms"

    def track_lower_time_per_token(self, records, mode):
        return per_token(records, mode, "step_time_ms", 1e3)

    track_lower_time_per_token.unit = "us/token"

    def track_lower_energy_per_token(self, records, mode):
        return per_token(records, mode, "energy_j_per_step", 1e3)

    track_lower_energy_per_token.unit = "mJ/token"

    def track_lower_peak_mem(self, records, mode):
        return figure(records, mode, "peak_mem_mb")

    track_lower_peak_mem.unit = "MiB"

    def track_lower_peak_mem_allocated(self, records, mode):
        return figure(records, mode, "peak_mem_allocated_mb")

    track_lower_peak_mem_allocated.unit = "MiB"

    def track_lower_final_loss(self, records, mode):
        return figure(records, mode, "final_loss")

    track_lower_final_loss.unit = "nats/token"

    def track_lower_loss_delta_vs_fp32(self, records, mode):
        return figure(records, mode, "loss_delta_vs_fp32")

    track_lower_loss_delta_vs_fp32.unit = "nats/token"

    # higher is better: graphed, never gated
    def track_graph_mfu(self, records, mode):
        return figure(records, mode, "mfu", 100)

    track_graph_mfu.unit = "%"

    def track_graph_tensor_core_util(self, records, mode):
        return figure(records, mode, "tensor_core_util", 100)

    track_graph_tensor_core_util.unit = "%"

    def track_graph_tokens_per_s(self, records, mode):
        return figure(records, mode, "tokens_per_s")

    track_graph_tokens_per_s.unit = "tokens/s"

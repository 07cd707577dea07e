"""What the reader checks in each record, so no command meets a KeyError or TypeError later.

Records come from files a person can edit, truncate or mix up. A record that carries the
schema tag still has to name its case (`model`, `mode`, `status`) and hold each figure a
command does arithmetic on as a number (or null). Files from older versions lack newer
fields: a field that is absent is not an error, except the three that name the case.
"""

from __future__ import annotations

from typing import Any

REQUIRED = ("model", "mode", "status")  # every command groups, matches or filters on these

# fmt: off
NUMBERS = frozenset((
    "batch_size", "seq_len", "steps", "warmup", "seed", "lr", "lr_warmup_steps", "lr_floor", "weight_decay",
    "eval_batches", "eval_every", "numerics_every", "vocab_multiple", "repeat",
    # roofline and energy protocol
    "predicted_step_ms", "predicted_gemm_ms", "predicted_cast_ms", "predicted_rest_ms", "predicted_speedup_vs_bf16",
    "predicted_speedup_vs_fp32", "cooldown_s", "start_temperature_c", "start_power_w",
    "world_size", "elapsed_s", "params", "flops_per_token", "flops_per_step", "tokens_per_step", "timed_steps",
    "step_time_ms", "step_time_p10_ms", "step_time_p90_ms", "step_time_cv", "tokens_per_s", "achieved_flops",
    "peak_flops", "mfu", "mfu_bf16", "mode_dtype_flops_share", "peak_flops_blended", "mfu_blended", "mamf",
    "mamf_flops", "tensor_core_util", "tensor_core_util_hmma", "tensor_core_util_imma", "peak_mem_mb",
    "peak_mem_device_mb", "peak_mem_allocated_mb", "peak_mem_reserved_mb", "energy_j_per_step", "avg_power_w",
    "tokens_per_joule", "sm_clock_mhz", "temperature_c_max", "nvml_samples", "power_limit_w", "window_s",
    "scaling_efficiency", "mem_saving_vs_ddp", "max_batch", "max_batch_limit_mb", "initial_loss", "final_loss",
    "loss_floor", "excess_loss", "loss_delta_vs_fp32", "overflow_steps", "diverged_at_step", "grad_cos_vs_fp64",
    "grad_rel_err_vs_fp64", "grad_max_abs_err_vs_fp64", "update_cos_vs_fp64", "update_rel_err_vs_fp64",
    "update_max_abs_err_vs_fp64", "grad_underflow_frac", "grad_overflow_frac", "scaled_grad_underflow_frac",
    "scaled_grad_overflow_frac", "fidelity_loss_diff", "fidelity_loss_scale", "fidelity_ref_passes", "gpu_count",
    "gpu_memory_mb", "cpu_count", "torch_threads",
    # over seeds (suite/reporting/seeds.py)
    "seeds", "loss_delta_last_quarter", "target_loss", "steps_to_target", "seconds_to_target", "excess_fraction",
))
NUMBER_LISTS = frozenset(("step_times_ms", "loss_curve", "loss_scale_curve", "rank_step_time_ms", "rank_peak_mem_mb"))
LISTS = frozenset((
    "suspect", "eval_curve", "weight_dtypes", "grad_dtypes", "optimizer_state_dtypes", "fidelity_layers",
    "fidelity_steps", "tensor_core_top_kernels", "throttle_reasons", "max_batch_tries", "rank_devices", "hosts",
    "gpu_shared_with", "numerics_steps",
))
DICTS = frozenset(("numerics", "numerics_formats", "numerics_whatif", "numerics_skipped", "roofline_inputs",
                   "energy_protocol", "layer_formats"))
BOOLS = frozenset(("git_dirty", "compile", "emulated", "throttled", "sampler_stalled", "cpu_bf16_native",
                   "cpu_fp16_native", "cooldown_settled"))
TEXT = frozenset((
    "run_id", "timestamp", "git_commit", "model", "mode", "device", "data", "data_sha256", "grad_comm", "parallel",
    "lr_schedule", "status",
    "reason", "compute_dtype", "init_digest", "data_digest", "emulated_reason", "peak_flops_dtype", "mfu_reason",
    "mamf_reason", "tensor_core_util_source", "tensor_core_util_reason", "peak_mem_source", "peak_mem_reason",
    "energy_reason", "nvml_reason", "scaling_reason", "param_dtype", "reduce_dtype", "mem_saving_basis",
    "mem_saving_reason", "max_batch_reason", "loss_delta_reason", "fidelity_reason", "gpu_name", "gpu_capability",
    "driver", "cuda", "torch", "python", "cpu", "hostname", "platform",
    "curve_reason", "seconds_to_target_reason", "excess_fraction_reason", "numerics_reason",
    "roofline_reason", "optimizer_impl", "cooldown_reason", "keep_high", "fp4_recipe",
))
# fmt: on


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def problem(record: dict[str, Any], statuses: tuple[str, ...]) -> str | None:
    """What is wrong with a decoded record (non-finite numbers already floats), in a few words; None if nothing."""
    for name in REQUIRED:
        if record.get(name) is None:
            return f"field {name!r} is missing; every record names its model, mode and status"
    if record["status"] not in statuses:
        return f"field 'status' is {_shown(record['status'])}; one of {', '.join(statuses)} expected"
    for name, value in record.items():
        if value is None:
            continue
        if name in NUMBERS and not _is_number(value):
            return f"field {name!r} is {_shown(value)}, not a number"
        if name in TEXT and not isinstance(value, str):
            return f"field {name!r} is {_shown(value)}, not text"
        if name in BOOLS and not isinstance(value, bool):
            return f"field {name!r} is {_shown(value)}, not true or false"
        if name in DICTS and not isinstance(value, dict):
            return f"field {name!r} is {_shown(value)}, not an object"
        if name in LISTS | NUMBER_LISTS and not isinstance(value, list):
            return f"field {name!r} is {_shown(value)}, not a list"
        bad = [v for v in value if v is not None and not _is_number(v)] if name in NUMBER_LISTS else []
        if bad:
            return f"field {name!r} holds {_shown(bad[0])}, not a number"
    suspect = record.get("suspect") or []
    if not all(isinstance(s, dict) and isinstance(s.get("rule"), str) and isinstance(s.get("note"), str)
               for s in suspect):  # fmt: skip
        return "field 'suspect' is not a list of {rule, note} entries"
    return None

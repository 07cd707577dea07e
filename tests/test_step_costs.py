"""The step at its best (issue 25, item 4): fused AdamW where torch's contract allows, the implementation that
ran in the record, and the padded vocabulary option end to end. CUDA branches run here through a fake CUDA
DeviceInfo with CPU tensors (the decision never looks at a tensor's device), and through the CPU's own fused
kernel, which has the GPU kernel's math."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.optim.adam as torch_adam
from torch.optim.optimizer import _default_to_fused_or_foreach

from models import GPT, GPTConfig
from suite.hardware import DeviceInfo
from suite.modes import get_mode
from suite.modes.base import ADAM_BETAS, decay_groups
from suite.modes.optimizer import FUSED_DEVICE_TYPES, adamw, fused_refusal, optimizer_impl
from suite.modes.pure_bf16_sr import StochasticRoundingAdamW
from suite.records.cases import case_key
from suite.running.execute import case_fields
from suite.running.runner import run_cases
from tests.helpers import small_case

CPU = DeviceInfo("cpu", "test cpu")
H100 = DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0))
MPS = DeviceInfo("mps", "Apple M2")


def _int8_weight() -> torch.Tensor:
    """A torchao int8 training weight (a tensor subclass), as int8-weight's Linears hold."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao.prototype.quantized_training import int8_weight_only_quantized_training
    from torchao.quantization import quantize_

    layer = torch.nn.Sequential(torch.nn.Linear(16, 16))
    quantize_(layer, int8_weight_only_quantized_training())
    return layer[0].weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_fused_is_asked_for_every_float_dtype_torch_documents_on_cuda(dtype):
    meta = torch.nn.Parameter(torch.empty(4, 4, dtype=dtype, device="meta"))  # the device is the DeviceInfo's
    assert fused_refusal(meta, H100) is None
    assert fused_refusal(meta, CPU) is None


def test_fused_is_refused_for_integers_tensor_subclasses_and_devices_mpbench_does_not_fuse_on():
    assert "not floating point" in fused_refusal(torch.zeros(3, dtype=torch.int64), H100)
    assert "Int8QuantizedTrainingLinearWeight" in fused_refusal(_int8_weight(), H100)
    assert "mps" in fused_refusal(torch.zeros(3), MPS)


def test_the_refusal_agrees_with_torchs_own_fused_check():
    # torch's check reads the tensor's device; on a CPU tensor with the CPU DeviceInfo both must agree
    params = [torch.nn.Parameter(torch.zeros(3)), torch.zeros(3, dtype=torch.bfloat16),
              torch.zeros(3, dtype=torch.int32), _int8_weight()]  # fmt: skip
    for p in params:
        torch_fuses, _ = _default_to_fused_or_foreach([p], differentiable=False, use_fused=True)
        assert (fused_refusal(p, CPU) is None) == torch_fuses, p.dtype


def test_the_cpu_choice_is_pinned_fused_as_on_cuda():
    # measured (docs/step-costs.md): fused 2-3x faster than the for-loop torch picks on a CPU, same math
    assert FUSED_DEVICE_TYPES == {"cuda", "cpu"}
    model = GPT(GPTConfig.preset("tiny"), seed=0)
    for device in (CPU, H100):
        opt = get_mode("fp32")(device).make_optimizer(model, 1e-3, 0.1)
        assert opt.defaults["fused"] is True and all(g["fused"] for g in opt.param_groups)
        assert optimizer_impl(opt) == "torch AdamW (fused)"


def test_int8_weight_fuses_all_but_the_torchao_weights_which_keep_the_for_loop():
    mode = get_mode("int8-weight")(H100)
    model = mode.prepare(GPT(GPTConfig.preset("tiny"), seed=0))
    opt = mode.make_optimizer(model, 1e-3, 0.1)
    int8 = [g for g in opt.param_groups if not g["fused"]]
    assert opt.defaults["fused"] is None  # a GradScaler must not hand grad_scale to the for-loop group
    assert len(int8) == 1 and len(int8[0]["params"]) == 8 and int8[0]["int8_decay"] == 0.1
    assert optimizer_impl(opt) == "torch AdamW (fused: 20 tensors; for-loop: 8 tensors)"


def _ran(monkeypatch, opt: torch.optim.Optimizer) -> set[str]:
    """Which of torch's Adam implementations one step of `opt` calls."""
    ran: set[str] = set()
    for impl, fn in (("fused", "_fused_adam"), ("foreach", "_multi_tensor_adam"), ("for-loop", "_single_tensor_adam")):
        real = getattr(torch_adam, fn)
        monkeypatch.setattr(torch_adam, fn, lambda *a, _r=real, _i=impl, **k: (ran.add(_i), _r(*a, **k))[1])
    opt.step()
    return ran


@pytest.mark.parametrize(
    "flags", [{}, {"foreach": True}, {"fused": True}, {"fused": False}, {"foreach": False}, {"fused": None}]
)
def test_optimizer_impl_names_what_torch_runs(monkeypatch, flags):
    p = torch.nn.Parameter(torch.randn(5, 3))
    p.grad = torch.randn(5, 3)
    opt = torch.optim.AdamW([p], **flags)
    assert optimizer_impl(opt) == f"torch AdamW ({_ran(monkeypatch, opt).pop()})"


def test_optimizer_impl_lists_groups_that_run_differently(monkeypatch):
    a, b = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(4))
    a.grad, b.grad = torch.randn(4), torch.randn(4)
    opt = adamw([{"params": [a]}, {"params": [b], "foreach": True}], CPU, lr=1e-3, betas=ADAM_BETAS, eps=1e-8)
    opt.param_groups[1]["fused"] = None  # what adamw would leave for a non-fusable group
    assert _ran(monkeypatch, opt) == {"fused", "foreach"}
    assert optimizer_impl(opt) == "torch AdamW (fused: 1 tensors; foreach: 1 tensors)"
    assert optimizer_impl(StochasticRoundingAdamW([a], lr=1e-3)) == "StochasticRoundingAdamW (mpbench, for-loop)"


def test_fused_adamw_steps_as_the_for_loop_within_fp32_rounding():
    # the CPU fused kernel has the CUDA kernel's math (one pass, fp32 opmath): the same trajectory as the for-loop
    model = GPT(GPTConfig.preset("tiny"), seed=0)
    runs = {}
    for fused in (True, False):
        params = [torch.nn.Parameter(p.detach().clone()) for p in model.parameters()]
        groups = [{"params": params[:3], "weight_decay": 0.1}, {"params": params[3:]}]
        opt = torch.optim.AdamW(groups, lr=1e-3, betas=ADAM_BETAS, fused=fused, foreach=None if fused else False)
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * 1e-2
            opt.step()
        runs[fused] = torch.cat([p.detach().flatten() for p in params])
    start = torch.cat([p.detach().flatten() for p in model.parameters()])
    moved = (runs[False] - start).abs().max()
    assert moved > 1e-3  # the steps did move the weights
    assert torch.allclose(runs[True], runs[False], rtol=1e-6, atol=1e-7)


def _scaled_step(seen: dict, plant_inf: bool = False) -> tuple[torch.nn.Module, bool, torch.Tensor]:
    mode = get_mode("amp-fp16")(CPU)
    model = torch.nn.Linear(8, 8)
    opt = mode.make_optimizer(model, 1e-3, 0.0)
    assert opt.defaults["fused"] and opt._step_supports_amp_scaling  # the GradScaler path of a fused AdamW
    model.weight.register_post_accumulate_grad_hook(lambda p: seen.update(scaled=p.grad.clone()))

    def pre(o, args, kwargs):
        seen.update(applied=model.weight.grad.clone(), grad_scale=getattr(o, "grad_scale", None))

    opt.register_step_pre_hook(pre)
    before = model.weight.detach().clone()
    with mode.forward_context():
        loss = model(torch.randn(4, 8)).float().pow(2).mean() * (math.inf if plant_inf else 1.0)
    stepped = mode.backward_and_step(loss, opt)
    return model, bool(stepped), before


def test_amp_fp16_with_fused_adamw_hands_the_optimizer_unscaled_gradients():
    seen: dict = {}
    model, stepped, before = _scaled_step(seen)
    scale = 2.0**16  # GradScaler's initial scale
    assert stepped and not torch.equal(model.weight.detach(), before)
    assert seen["grad_scale"] is None  # unscaled by amp-fp16 itself, not left to the kernel
    torch.testing.assert_close(seen["applied"] * scale, seen["scaled"])


def test_amp_fp16_with_fused_adamw_skips_an_overflowing_step_and_backs_off():
    seen: dict = {}
    model, stepped, before = _scaled_step(seen, plant_inf=True)
    assert not stepped and torch.equal(model.weight.detach(), before)


def test_the_record_says_which_optimizer_ran():
    records = run_cases([small_case(mode=m) for m in ("fp32", "pure-bf16-sr")], log=None, isolate=False)
    assert [r["optimizer_impl"] for r in records] == [
        "torch AdamW (fused)",
        "StochasticRoundingAdamW (mpbench, for-loop)",
    ]


def test_a_padded_vocabulary_trains_counts_its_rows_and_is_its_own_case():
    # tiny's vocabulary (512) is already a multiple of 64; 100 pads it to 600 rows
    plain, padded = small_case(steps=6), small_case(steps=6, vocab_multiple=100)
    assert small_case(vocab_multiple=64).model_config.padded_vocab_size == 512
    fields = {c.vocab_multiple: case_fields(c, CPU) for c in (plain, padded)}
    assert fields[100]["vocab_multiple"] == 100
    assert fields[100]["params"] - fields[1]["params"] == 88 * 128  # the padded rows of the tied (V, C) matrix
    assert fields[100]["flops_per_token"] > fields[1]["flops_per_token"]  # the LM head GEMM is the padded one
    assert case_key(fields[100]) != case_key(fields[1])  # resume runs it; it does not reuse the unpadded record
    a, b = run_cases([plain, padded], log=None, isolate=False)
    assert a["status"] == b["status"] == "ok" and b["vocab_multiple"] == 100 and b["params"] == fields[100]["params"]
    assert all(math.isfinite(x) for x in a["loss_curve"] + b["loss_curve"])
    # padded rows are never targets: same data, same softmax support; only the init's later draws shift
    assert abs(a["final_loss"] - b["final_loss"]) < 0.05 * a["final_loss"]
    assert abs(a["loss_curve"][0] - b["loss_curve"][0]) < 0.05


def test_padded_logits_are_sliced_to_the_real_vocabulary():
    cfg = GPTConfig.preset("tiny", vocab_multiple=100)
    model = GPT(cfg, seed=0)
    assert model.wte.weight.shape[0] == 600 and model(torch.zeros(1, 4, dtype=torch.long)).shape[-1] == 512
    optimizer = torch.optim.AdamW(decay_groups(model, 0.0), lr=1e-3)
    assert optimizer_impl(optimizer) == "torch AdamW (for-loop)"  # torch's own CPU default, for contrast


def test_amp_fp16_under_fsdp_keeps_torchs_default_since_fused_refuses_the_sharded_scalers_flag():
    # torch 2.13: ShardedGradScaler's found_inf is (1,)-shaped; fused Adam subtracts it from ()-shaped step
    # counters and raises (tests/test_fsdp.py trains amp-fp16 sharded on one rank: it failed with fused)
    from suite.modes.base import FsdpPlan

    mode = get_mode("amp-fp16")(H100)
    model = torch.nn.Linear(8, 8)
    assert mode.make_optimizer(model, 1e-3, 0.0).defaults["fused"] is True
    mode.use_fsdp(FsdpPlan(param_dtype=torch.float16, reduce_dtype=torch.float32))
    assert "ShardedGradScaler" in mode.no_fused_adamw()
    opt = mode.make_optimizer(model, 1e-3, 0.0)
    assert opt.defaults["fused"] is None and not any(g["fused"] for g in opt.param_groups)
    assert not getattr(opt, "_step_supports_amp_scaling", False)


def test_fsdp2_shards_are_fused_as_torch_itself_would_fuse_them(tmp_path):
    # FSDP2's parameters are DTensors, which torch.distributed.tensor registers as foreach/fused-capable
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        base, grad = torch.randn(8, 4), torch.randn(8, 4)
        mesh = init_device_mesh("cpu", (1,))
        shard = torch.nn.Parameter(distribute_tensor(base.clone(), mesh, [Shard(0)]))
        shard.grad = distribute_tensor(grad.clone(), mesh, [Shard(0)])
        assert fused_refusal(shard, H100) is None and fused_refusal(shard, CPU) is None
        assert _default_to_fused_or_foreach([shard], differentiable=False, use_fused=True)[0]
        opt = adamw([{"params": [shard]}], CPU, lr=1e-2, betas=ADAM_BETAS, eps=1e-8)
        plain = torch.nn.Parameter(base.clone())
        plain.grad = grad.clone()
        ref = torch.optim.AdamW([plain], lr=1e-2, betas=ADAM_BETAS, foreach=False)
        for _ in range(3):
            opt.step()
            ref.step()
        assert optimizer_impl(opt) == "torch AdamW (fused)"
        torch.testing.assert_close(shard.full_tensor(), plain.detach(), rtol=1e-6, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_the_vocab_multiple_flag_reaches_the_record_and_resume_keeps_padded_cases_apart(tmp_path):
    from suite.cli.main import main

    out = tmp_path / "cli.jsonl"
    sizes = ["--steps", "3", "--warmup", "1", "--batch-size", "2", "--seq-len", "32"]
    flags = ["--vocab-multiple", "64", "--quiet", "--out", str(out)]
    assert main(["run", "--device", "cpu", "--model", "tiny", "--modes", "fp32", *sizes, *flags]) == 0
    (record,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert record["status"] == "ok" and record["vocab_multiple"] == 64 and record["params"] == 478_720  # 512 rows
    store = tmp_path / "r.jsonl"
    assert len(run_cases([small_case()], out=store, log=None, isolate=False)) == 1
    padded = small_case(vocab_multiple=64)
    assert len(run_cases([padded], out=store, log=None, isolate=False, resume=True)) == 1  # not the unpadded one
    assert run_cases([padded], out=store, log=None, isolate=False, resume=True) == []  # now it has its record

"""Sharded data parallelism (FSDP2, `--parallel fsdp`): plans, sharding, records, torchrun on CPU."""

from __future__ import annotations

import time

import pytest
import torch

from suite import run_cases
from suite.cli.main import main
from suite.cli.run import run_defaults
from suite.hardware import resolve_device
from suite.modes import MODES, PrecisionMode, get_mode
from suite.records import store
from suite.running.runner import memory_saving_fields, validate
from suite.training.case import Case
from suite.training.data import make_corpus
from suite.training.train import run_case
from tests.helpers import small_case

CPU = resolve_device("cpu")
# The 2-rank FSDP run against a 1-process run of the doubled batch (same data, same weights).
# fp32: the shards' reduce-scatter averages the two halves' gradients, which equals the
# doubled batch's gradient up to summation order: measured 9.5e-7 nats over 6 steps. bf16:
# FSDP gathers the weights in bf16 and runs every module in bf16 (residual stream, LayerNorm),
# where the 1-process run autocasts only the matmuls: measured 1.7e-3 nats over the curve and
# 7.6e-4 on the final loss (tiny, 8x128 per rank, 6 steps). Bounds with 3x margin; one rank
# training on its own half alone differs by 0.16 nats.
TOLERANCE = {"fp32": 1e-4, "bf16": 5e-3}


def test_each_mode_says_how_fsdp_shards_it():
    plans = {name: mode.fsdp_plan("fp32") for name, mode in MODES.items()}
    bf16 = torch.bfloat16
    assert (plans["fp32"].param_dtype, plans["fp32"].reduce_dtype, plans["fp32"].unavailable) == (None, None, None)
    assert (plans["tf32"].param_dtype, plans["tf32"].reduce_dtype) == (None, None)
    assert (plans["bf16"].param_dtype, plans["bf16"].reduce_dtype) == (bf16, torch.float32)
    assert (plans["amp-fp16"].param_dtype, plans["amp-fp16"].reduce_dtype) == (torch.float16, torch.float32)
    assert (plans["pure-fp16"].param_dtype, plans["pure-fp16"].reduce_dtype) == (None, None)  # sharded as stored
    assert "int8-weight is not sharded" in plans["int8-weight"].unavailable
    assert get_mode("bf16").fsdp_plan("bf16").reduce_dtype == bf16  # --grad-comm bf16
    assert get_mode("fp32").fsdp_plan("fp16").reduce_dtype == torch.float16

    class Unchecked(PrecisionMode):  # a new mode that never said how: skipped
        name = "new-mode"

    assert Unchecked.fsdp_plan().unavailable.startswith("new-mode has not been checked under FSDP2")


def test_a_param_dtype_replaces_autocast_and_fp16_scalers_agree_across_ranks():
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    bf16 = get_mode("bf16")(CPU)
    bf16.use_fsdp(bf16.fsdp_plan())
    assert bf16.autocast_dtype is None and bf16.compute == "bf16"
    amp = get_mode("amp-fp16")(CPU)
    amp.use_fsdp(amp.fsdp_plan())
    assert isinstance(amp.scaler, ShardedGradScaler) and amp.loss_scale == 2.0**16
    pure = get_mode("pure-fp16")(CPU)
    pure.use_fsdp(pure.fsdp_plan())
    assert pure.scaler.across_ranks


def test_pure_fp16_skips_the_step_when_another_rank_overflowed(monkeypatch):
    """Sharded, each rank sees only its gradient shard: the verdict is the minimum over ranks."""
    import torch.distributed as dist

    from suite.modes.pure_fp16 import DynamicLossScaler

    ops = []

    def another_rank_saw_inf(flag, op):  # faithful to all_reduce(MIN): 1.0 here, 0.0 there -> 0.0
        ops.append(op)
        flag.zero_()

    monkeypatch.setattr(dist, "all_reduce", another_rank_saw_inf)
    w = torch.nn.Parameter(torch.ones(4, dtype=torch.float16))
    scaler = DynamicLossScaler()
    scaler.across_ranks = True
    stepped = scaler.backward_and_step(w.float().sum(), torch.optim.SGD([w], lr=1.0))
    assert stepped is False and ops == [dist.ReduceOp.MIN]  # this rank's grads were finite
    assert scaler.scale == 2.0**15 and torch.equal(w.detach(), torch.ones(4, dtype=torch.float16))


@pytest.fixture
def one_rank_group(tmp_path):
    """A 1-rank gloo process group in this process: FSDP2 without torchrun."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["fp32", "bf16", "amp-fp16", "pure-fp16", "pure-bf16", "pure-bf16-sr"])
def test_sharding_on_one_rank_trains_like_the_plain_model(one_rank_group, mode):
    from torch.distributed.tensor import DTensor

    from suite.running.sharding import fsdp_wrapper, full_copy

    case = small_case(mode=mode, steps=3)
    corpus = make_corpus(None, case.model_config.vocab_size)
    train = corpus.batches(case.steps, 2, 32, 0, "train")
    heldout = corpus.batches(1, 2, 32, 0, "heldout")
    found: dict = {}
    seen: dict = {}

    def wrap(model, m):
        sharded = fsdp_wrapper("fp32", found)(model, m)
        seen["params"] = [type(p) for p in sharded.parameters()]
        return sharded

    fsdp = run_case(case, CPU, corpus, train, heldout, trackers=False, wrap=wrap, unshard=full_copy)
    plain = run_case(case, CPU, corpus, train, heldout, trackers=False)
    assert set(seen["params"]) == {DTensor}  # every parameter became a shard
    stored = {"pure-fp16": "float16", "pure-bf16": "bfloat16", "pure-bf16-sr": "bfloat16"}.get(mode, "float32")
    assert fsdp.storage["weight_dtypes"] == [stored] and fsdp.storage["optimizer_state_dtypes"] == [stored]
    assert found == {"fp32": {"param_dtype": "float32", "reduce_dtype": "float32"},
                     "bf16": {"param_dtype": "bfloat16", "reduce_dtype": "float32"},
                     "amp-fp16": {"param_dtype": "float16", "reduce_dtype": "float32"},
                     "pure-fp16": {"param_dtype": "float16", "reduce_dtype": "float16"},
                     "pure-bf16": {"param_dtype": "bfloat16", "reduce_dtype": "bfloat16"},
                     "pure-bf16-sr": {"param_dtype": "bfloat16", "reduce_dtype": "bfloat16"}}[mode]  # fmt: skip
    if mode in ("bf16", "amp-fp16"):  # module-level casts are not autocast: close, not equal
        # measured over 3 steps: bf16 2.2e-4, amp-fp16 1.2e-4 (ShardedGradScaler, no overflow)
        assert max(abs(a - b) for a, b in zip(fsdp.loss_curve, plain.loss_curve, strict=True)) < 2e-3
        assert fsdp.loss_curve != plain.loss_curve and fsdp.final_loss == pytest.approx(plain.final_loss, abs=2e-3)
    else:  # one rank: the same arithmetic (pure-bf16-sr: the same noise) as the plain model, held-out loss from
        # the gathered copy
        assert fsdp.loss_curve == pytest.approx(plain.loss_curve, abs=1e-6)
        assert fsdp.final_loss == pytest.approx(plain.final_loss, abs=1e-6)


def test_fsdp_root_returns_no_view_and_a_padded_vocab_view_trains_right(one_rank_group):
    """FSDP2 warns when a wrapped module returns a view: an in-place op on it would drop the pre-backward
    hook (the all-gather before backward). Unpadded, GPT returns no view; padded, it must slice, and the train
    step writes nothing in place (logits.float(), flatten, cross_entropy): training matches the plain model."""
    import copy
    import warnings

    from models import GPT, GPTConfig
    from suite.running.sharding import fsdp_wrapper
    from suite.training.train import train_step

    batch = torch.randint(0, 500, (2, 33), generator=torch.Generator().manual_seed(0))
    for multiple in (1, 64):
        cfg = GPTConfig.preset("tiny", vocab_size=500, vocab_multiple=multiple)
        losses = []
        for sharded in (False, True):
            mode = get_mode("fp32")(CPU)
            model = GPT(cfg, seed=0)
            if sharded:
                model = fsdp_wrapper("fp32", {})(copy.deepcopy(model), mode)
            optimizer = mode.make_optimizer(model, lr=1e-2, weight_decay=0.1)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                losses.append([train_step(model, mode, optimizer, batch)[0].item() for _ in range(3)])
            viewed = any("returned a view tensor" in str(w.message) for w in caught)
            assert viewed is (sharded and multiple > 1), (multiple, sharded)
        assert losses[1] == pytest.approx(losses[0], abs=1e-6)  # gathered for backward: the same gradients


def test_memory_saving_pairs_fsdp_with_ddp_then_one_process():
    fsdp = {"parallel": "fsdp", "status": "ok", "peak_mem_mb": 300.0, "peak_mem_allocated_mb": None}
    ddp = {"status": "ok", "peak_mem_mb": 400.0, "peak_mem_allocated_mb": None}
    assert memory_saving_fields(fsdp, ddp, None) == {"mem_saving_vs_ddp": 0.25, "mem_saving_basis": "ddp peak_mem_mb"}
    gpu = fsdp | {"peak_mem_allocated_mb": 50.0}
    single = {"status": "ok", "peak_mem_mb": 600.0, "peak_mem_allocated_mb": 200.0}
    saving = memory_saving_fields(gpu, None, single)
    assert saving == {"mem_saving_vs_ddp": 0.75, "mem_saving_basis": "1-process peak_mem_allocated_mb"}
    assert "--parallel ddp,fsdp" in memory_saving_fields(fsdp, ddp | {"status": "oom"}, None)["mem_saving_reason"]
    not_sharded = memory_saving_fields({"parallel": "ddp"}, ddp, None)
    assert not_sharded == {"mem_saving_reason": "not a sharded (--parallel fsdp) run"}


def test_parallel_is_validated_and_unshardable_modes_are_skipped_before_launch(capsys, tmp_path):
    with pytest.raises(ValueError, match="parallel='zero' is unknown"):
        Case(parallel="zero")
    assert main(["run", "--device", "cpu", "--nproc", "2", "--parallel", "zero", "--out", str(tmp_path / "r")]) == 2
    assert "parallel='zero': 'zero' is unknown; give ddp, fsdp, or both" in capsys.readouterr().err
    validate([small_case(nproc=2, parallel="fsdp", grad_comm="bf16")])  # bf16 reduce-scatter runs on gloo
    with pytest.raises(ValueError, match="needs CUDA and NCCL"):
        validate([small_case(nproc=2, parallel="ddp", grad_comm="bf16")])
    started = time.monotonic()
    r = run_cases([small_case(mode="int8-weight", nproc=2, parallel="fsdp")], log=None)[0]
    assert r["status"] == "skipped" and "int8-weight is not sharded" in r["reason"] and r["parallel"] == "fsdp"
    assert time.monotonic() - started < 5  # decided in the parent: no torchrun started


def test_cli_ladder_runs_one_process_once_and_ddp_before_fsdp(tmp_path):
    from suite.cli.config import load_config
    from suite.cli.run import cases_from_options

    config = tmp_path / "m.toml"
    config.write_text('device = "cpu"\nmodes = ["fp32"]\nscaling = "1,2"\nparallel = "fsdp,ddp"\n')
    cases = cases_from_options(load_config(config))
    assert [(c.nproc, c.data_parallel) for c in cases] == [(1, None), (2, "ddp"), (2, "fsdp")]
    one_rank = cases_from_options({"device": "cpu", "modes": "bf16", "nproc": 1, "parallel": "ddp,fsdp"})
    assert [(c.nproc, c.data_parallel) for c in one_rank] == [(1, "ddp"), (1, "fsdp")]  # one-rank torchrun jobs
    assert cases_from_options({"device": "cpu", "modes": "bf16", "nproc": 1})[0].data_parallel is None
    with pytest.raises(ValueError, match="parallel='ddp,zero3': 'zero3' is unknown"):
        cases_from_options({"device": "cpu", "parallel": "ddp,zero3"})


# ----------------------------------------------------------------- through torchrun (slow)


@pytest.mark.slow
def test_the_done_when_command_matches_one_process_with_the_doubled_batch(tmp_path):
    out = tmp_path / "r.jsonl"
    code = main(["run", "--device", "cpu", "--nproc", "2", "--parallel", "fsdp", "--model", "tiny",
                 "--modes", "fp32,bf16", "--steps", "6", "--out", str(out)])  # fmt: skip
    assert code == 0
    sizes, _ = run_defaults("cpu")  # the command's sizes are this CPU's defaults: the global batch is twice them
    for two in store.read(out):
        mode = two["mode"]
        one = run_cases([Case(model="tiny", device="cpu", mode=mode, batch_size=2 * sizes["batch_size"],
                              seq_len=sizes["seq_len"], steps=6, warmup=3)], log=None, isolate=False)[0]  # fmt: skip
        assert two["status"] == "ok" and (two["world_size"], two["parallel"]) == (2, "fsdp"), two["reason"]
        assert two["data_digest"] == one["data_digest"] and two["init_digest"] == one["init_digest"]
        assert max(abs(a - b) for a, b in zip(two["loss_curve"], one["loss_curve"], strict=True)) < TOLERANCE[mode]
        assert two["final_loss"] == pytest.approx(one["final_loss"], abs=TOLERANCE[mode])
        assert two["param_dtype"] == {"fp32": "float32", "bf16": "bfloat16"}[mode] and two["reduce_dtype"] == "float32"
        assert len(two["rank_peak_mem_mb"]) == 2 and two["peak_mem_mb"] == max(two["rank_peak_mem_mb"]) > 0
        assert two["weight_dtypes"] == two["optimizer_state_dtypes"] == ["float32"]  # the fp32 shards


@pytest.mark.slow
def test_ddp_and_fsdp_in_one_invocation_give_memory_saving_and_scaling(tmp_path):
    """pure-fp16: sharded as stored (fp16 all-gather and reduce-scatter), own loss scaling."""
    out = tmp_path / "r.jsonl"
    code = main(["run", "--device", "cpu", "--model", "tiny", "--modes", "pure-fp16", "--batch-size", "2",
                 "--seq-len", "32", "--steps", "4", "--scaling", "1,2", "--parallel", "ddp,fsdp",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    records = {(r["world_size"], r["parallel"]): r for r in store.read(out)}
    one, ddp, fsdp = records[1, None], records[2, "ddp"], records[2, "fsdp"]
    assert fsdp["status"] == "ok" and ddp["status"] == "ok", (fsdp["reason"], ddp["reason"])
    assert fsdp["mem_saving_basis"] == "ddp peak_mem_mb"  # CPU: whole-process RSS, so near 0 for tiny
    assert fsdp["mem_saving_vs_ddp"] == pytest.approx(1 - fsdp["peak_mem_mb"] / ddp["peak_mem_mb"])
    assert fsdp["scaling_efficiency"] == pytest.approx(fsdp["tokens_per_s"] / (2 * one["tokens_per_s"]))
    assert ddp["mem_saving_reason"] == "not a sharded (--parallel fsdp) run" and ddp["param_dtype"] is None
    assert fsdp["param_dtype"] == fsdp["reduce_dtype"] == "float16" and len(fsdp["loss_scale_curve"]) == 4
    assert fsdp["weight_dtypes"] == fsdp["grad_dtypes"] == fsdp["optimizer_state_dtypes"] == ["float16"]
    # the same fp16 arithmetic on shards as DDP's on whole tensors (measured: identical), with the
    # overflow verdict agreed by both ranks; a rank stepping alone would leave the shards apart
    assert max(abs(a - b) for a, b in zip(fsdp["loss_curve"], ddp["loss_curve"], strict=True)) < 1e-4


@pytest.mark.slow
def test_a_rank_that_dies_under_fsdp_becomes_an_error_record_naming_it(monkeypatch):
    monkeypatch.setenv("MPBENCH_FAULT", "crash:fp32@1")
    started = time.monotonic()
    r = run_cases([small_case(mode="fp32", nproc=2, parallel="fsdp", steps=4)], log=None, case_timeout=120)[0]
    assert r["status"] == "error" and "rank 1 failed first (exit code 86)" in r["reason"], r["reason"]
    assert r["parallel"] == "fsdp" and time.monotonic() - started < 90


def test_one_rank_ddp_and_fsdp_run_the_data_parallel_path_through_torchrun(tmp_path):
    """`--nproc 1 --parallel ddp,fsdp`: one-rank torchrun jobs (what a first GPU checks), not plain runs."""
    out = tmp_path / "r.jsonl"
    code = main(["run", "--device", "cpu", "--model", "tiny", "--modes", "bf16", "--nproc", "1", "--parallel",
                 "ddp,fsdp", "--steps", "3", "--warmup", "1", "--batch-size", "2", "--seq-len", "32",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    ddp, fsdp = store.read(out)
    assert [(r["parallel"], r["world_size"], r["status"]) for r in (ddp, fsdp)] == [("ddp", 1, "ok"), ("fsdp", 1, "ok")]
    assert ddp["rank_devices"] == ["cpu"] and fsdp["param_dtype"] == "bfloat16" and fsdp["grad_comm"] == "fp32"

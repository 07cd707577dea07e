"""Issue 27, items 5-8: what a mode computes in, which layers it converts, that a record is synced, and which
cases `--resume` counts as done. Each asserts the thing itself (dtypes a matmul sees, a layer's type, fsync
calls, a case run) rather than what a record or a list says about it."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from models import GPT
from suite.hardware import DeviceInfo
from suite.modes import get_mode
from suite.records import store
from suite.records.cases import CASE_KEY, case_key
from suite.running.execute import case_fields
from suite.running.runner import run_cases
from tests.helpers import small_case

CPU = DeviceInfo("cpu", "test cpu")


class MatmulDtypes(TorchDispatchMode):
    """Counts the operand dtypes of every matmul the block runs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.__name__.split(".")[0] in ("mm", "addmm", "bmm", "baddbmm", "linear", "matmul"):
            self.seen[tuple(str(a.dtype).removeprefix("torch.") for a in args if torch.is_tensor(a))] += 1
        return func(*args, **(kwargs or {}))


# -- 5: each mode computes in its own dtype -----------------------------------------------------------------

# mode -> the dtype of every matmul operand and of the logits in its forward, on a CPU
COMPUTE = {"fp32": "float32", "tf32": "float32", "amp-fp16": "float16", "bf16": "bfloat16",
           "pure-fp16": "float16", "pure-bf16": "bfloat16"}  # fmt: skip


@pytest.mark.parametrize("name", COMPUTE)
def test_each_mode_computes_in_its_dtype_under_its_forward_context(name):
    """bf16 autocasting to fp16 would keep every stored dtype and the record's `compute_dtype`, and train:
    only the dtypes the matmuls see tell."""
    mode = get_mode(name)(CPU)
    case = small_case(mode=name)
    with mode.numerics():
        model = mode.prepare(GPT(case.model_config, seed=0))
        x = torch.randint(0, case.model_config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        spy = MatmulDtypes()
        with torch.no_grad(), mode.forward_context(), spy:
            logits = model(x)
    want = COMPUTE[name]
    assert str(logits.dtype).removeprefix("torch.") == want
    assert {d for operands in spy.seen for d in operands} == {want}, spy.seen
    assert sum(spy.seen.values()) >= 8  # the blocks' projections and the head: the matmuls were seen


# -- 6: the 8-bit modes convert the block Linears, and only those ------------------------------------------

# mode -> torchao's class of a converted Linear
SWAPPED = {"fp8-tensorwise": "Float8Linear", "fp8-rowwise": "Float8Linear", "mxfp8": "MXFP8Linear",
           "int8-mixed": "Int8MixedPrecisionTrainingLinear"}  # fmt: skip


def _torchao_class(module: nn.Module) -> str | None:
    """The name of the torchao class `module` is (a parametrized layer is a subclass torch makes of it)."""
    return next((c.__name__ for c in type(module).__mro__ if c.__module__.startswith("torchao.")), None)


@pytest.mark.parametrize("name", SWAPPED)
def test_prepare_converts_exactly_the_layers_the_record_lists(name):
    """The tiny model's head is 128 x 512, multiples of 16 and 32: only the filter keeps it out of the 8-bit
    matmul (a converted head would also route the tied embedding matrix through it)."""
    mode = get_mode(name)(CPU)
    with mode.numerics():
        model = mode.prepare(GPT(small_case().model_config, seed=0))
    layers = mode.layer_fields()
    kept = [entry.split(" ")[0] for entry in layers["unconverted_layers"]]
    assert kept == ["lm_head"] and len(layers["converted_layers"]) == 8
    for fqn in kept:
        assert type(model.get_submodule(fqn)) is nn.Linear, (
            f"{fqn} is listed as kept but is a {type(model.get_submodule(fqn))}"
        )
    assert model.lm_head.weight is model.wte.weight  # still tied
    for fqn in layers["converted_layers"]:
        assert _torchao_class(model.get_submodule(fqn)) == SWAPPED[name], fqn
    swapped = {f for f, m in model.named_modules() if _torchao_class(m)}
    assert swapped == set(layers["converted_layers"])  # nothing converted that the record does not list


# -- 7: every record is fsynced ------------------------------------------------------------------------------


def test_append_fsyncs_each_record_after_writing_it(tmp_path, monkeypatch):
    out = tmp_path / "r.jsonl"
    synced: list[int] = []  # lines on disk at each fsync of the records file
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st, ours = os.fstat(fd), os.stat(out)
        if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
            synced.append(out.read_bytes().count(b"\n"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    store.append(out, store.make_record(status="ok", model="tiny", mode="fp32"))
    assert synced == [1]
    store.append(out, store.make_record(status="ok", model="tiny", mode="bf16"))
    assert synced == [1, 2]  # once per record, each after its line was written


# -- 8: --resume keys a case by every setting that changes what it measures --------------------------------

BASE = dict(warmup=2, steps=4)  # --compile needs 2 warm-up steps: a base every variant below is valid from
# CASE_KEY field -> (base overrides, the same with that one setting changed)
VARIANTS = {
    "model": ({}, {"model": "gpt2-small"}), "mode": ({}, {"mode": "bf16"}), "batch_size": ({}, {"batch_size": 4}),
    "seq_len": ({}, {"seq_len": 16}), "steps": ({}, {"steps": 5}), "warmup": ({}, {"warmup": 3}),
    "seed": ({}, {"seed": 1}), "compile": ({}, {"compile": True}), "data": ({}, {"data": "DATA"}),
    "lr": ({}, {"lr": 1e-3}), "weight_decay": ({}, {"weight_decay": 0.0}), "eval_batches": ({}, {"eval_batches": 2}),
    "eval_every": ({}, {"eval_every": 2}), "world_size": ({"parallel": "ddp"}, {"parallel": "ddp", "nproc": 2}),
    "grad_comm": ({"nproc": 2}, {"nproc": 2, "grad_comm": "bf16"}), "parallel": ({}, {"parallel": "fsdp"}),
    "device": ({}, {"device": "cuda:1"}), "lr_schedule": ({}, {"lr_schedule": "constant"}),
    "lr_warmup_steps": ({}, {"lr_warmup": 2}), "lr_floor": ({}, {"lr_floor": 0.5}),
    "numerics_every": ({}, {"numerics_every": 2}), "vocab_multiple": ({}, {"vocab_multiple": 64}),
    "repeat": ({}, {"repeat": 1}),
    "keep_high": ({"mode": "fp8-tensorwise"}, {"mode": "fp8-tensorwise", "keep_high": "none"}),
    "fp4_recipe": ({"mode": "nvfp4"}, {"mode": "nvfp4", "fp4_recipe": "none"}),
}  # fmt: skip


def test_every_setting_of_the_case_key_makes_another_case(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("the quick brown fox jumps over the lazy dog. " * 40)

    def key(overrides: dict) -> tuple:
        values = BASE | {k: str(data) if v == "DATA" else v for k, v in overrides.items()}
        case = small_case(**values)
        device = CPU if case.device == "cpu" else DeviceInfo("cuda", "NVIDIA H100 80GB HBM3", (9, 0), 1)
        return case_key(case_fields(case, device))

    same = [name for name, (base, changed) in VARIANTS.items() if key(base) == key(changed)]
    assert same == [], f"--resume would count these as the case already run: {same}"
    assert set(CASE_KEY) <= set(VARIANTS)  # a new key field gets a variant here


def test_a_resume_at_another_seq_len_runs_that_case(tmp_path):
    out = tmp_path / "r.jsonl"
    assert len(run_cases([small_case(seq_len=32)], out=out, log=None, isolate=False)) == 1
    assert run_cases([small_case(seq_len=32)], out=out, log=None, isolate=False, resume=True) == []  # done
    resumed = run_cases([small_case(seq_len=16)], out=out, log=None, isolate=False, resume=True)
    assert [(r["seq_len"], r["status"]) for r in resumed] == [(16, "ok")]
    assert [r["seq_len"] for r in store.read(out)] == [32, 16]

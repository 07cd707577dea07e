"""`mpbench numerics`: every format's statistics on fp32's tensors of step K + 1, per Linear and role."""

from __future__ import annotations

import math

import pandas
import pytest
import torch

from models import GPT
from suite.cli import numerics
from suite.cli.main import build_parser, main
from suite.hardware import resolve_device
from suite.modes import get_mode
from suite.modes.base import tf32_enabled, tf32_matmuls
from suite.modes.formats import WHATIF_FORMATS
from suite.records import store
from suite.training import train as train_mod
from suite.training.case import Case
from suite.training.data import make_corpus
from suite.training.numerics import ROLES, linear_layers, watch
from suite.training.train import train_step
from tests.helpers import error_line, numerics_globals

SMALL = ["numerics", "--device", "cpu", "--batch-size", "2", "--seq-len", "32"]
LAYERS = linear_layers(GPT(Case(model="tiny", device="cpu").model_config))  # 9 on tiny


def _run(tmp_path, *args: str, name: str = "n.jsonl") -> tuple[int, dict]:
    out = tmp_path / name
    code = main([*SMALL, *args, "--out", str(out)])
    (record,) = store.read(out)
    return code, record


def _frame(record: dict) -> pandas.DataFrame:
    return pandas.DataFrame(record["numerics_whatif"])


def test_the_summary_and_the_record_have_every_layer_role_and_format(tmp_path, capsys):
    code, r = _run(tmp_path, "--steps", "2", "--formats", "fp16,bf16,fp32")
    assert code == 0
    text = capsys.readouterr().out
    assert "worst layer" in text and "grad_output" in text and "U: more than 0.1%" in text
    shown = [line for line in text.splitlines() if not line.startswith("record: ")]  # the path is tmp_path's
    assert all(len(line) <= 100 for line in shown)  # a person reads it on a 100-column terminal
    assert r["status"] == "ok" and r["mode"] == "fp32" and list(r) == list(store.FIELDS)
    assert r["steps"] == 3 and r["numerics_skipped"] == {} and r["elapsed_s"] > 0
    cols = r["numerics_whatif"]
    assert set(cols) == set(numerics.COLUMNS) and {len(v) for v in cols.values()} == {len(LAYERS) * 4 * 3}
    df = _frame(r)
    assert (df["step"] == 2).all() and set(df["format"]) == {"fp16", "bf16", "fp32"}
    assert len(df.groupby(["layer", "role", "format"])) == len(df)  # each (layer, role, format) once
    assert set(df["layer"]) == set(LAYERS) and set(df["role"]) == set(ROLES)
    fp32 = df[df["format"] == "fp32"]
    assert (fp32["sqnr_db"] == math.inf).all() and (fp32["underflow"] == 0).all() and (fp32["scale"] == 1).all()
    low = df[df["format"] != "fp32"]
    assert low["sqnr_db"].between(20, 100).all()  # fp16 ~74 dB, bf16 ~55 dB: lossy, finite
    assert (df[df["format"] == "bf16"]["sqnr_db"] < df[df["format"] == "fp16"]["sqnr_db"].min()).all()
    assert len(store.load(tmp_path / "n.jsonl")) == 1  # the store's own loader reads it back


def test_layers_prints_a_grid_whose_marks_follow_the_record(tmp_path, capsys):
    code, r = _run(tmp_path, "--steps", "2", "--formats", "fp16,bf16", "--layers")
    assert code == 0
    text = capsys.readouterr().out
    grid = text.split("fp16:\n", 1)[1].split("\n\n", 1)[0].splitlines()[2:]  # under the header and the rule
    assert [line.split()[0] for line in grid] == LAYERS
    df = _frame(r).set_index(["format", "layer", "role"])
    for line in grid:
        layer, cells = line.split()[0], line[len(line.split()[0]) :]
        for role, cell in zip(ROLES, _cells(cells), strict=True):
            row = df.loc[("fp16", layer, role)]
            assert cell[0] == f"{row['sqnr_db']:.1f}", (layer, role, cell)
            assert ("U" in cell) == (row["underflow"] > numerics.UNDERFLOW_MARK), (layer, role, cell)
    fp16 = _frame(r).query("format == 'fp16'")
    assert fp16["underflow"].max() > numerics.UNDERFLOW_MARK  # some U shown: fp16's gradients


def _cells(text: str) -> list[list[str]]:
    """The grid's cells of one row: a figure, and its marks when it has some."""
    out: list[list[str]] = []
    for word in text.split():
        if word in ("U", "S", "US"):
            out[-1].append(word)
        else:
            out.append([word])
    return out


def test_a_format_that_cannot_run_is_skipped_with_why_and_the_rest_runs(tmp_path, capsys, monkeypatch):
    stats, calls = numerics.tensor_stats, []

    def patched(x, fmt):
        if fmt == "bf16":
            raise NotImplementedError("format 'bf16': not written yet")
        calls.append(fmt)
        if fmt == "fp32" and calls.count("fp32") >= 10:  # from the tenth tensor on, after nine went well
            raise RuntimeError("deliberately broken")
        return stats(x, fmt)

    monkeypatch.setattr(numerics, "tensor_stats", patched)
    # all formats of a tensor in one call; when it raises, each format on its own (tensor_stats)
    monkeypatch.setattr(numerics, "tensor_stats_many", lambda x, fmts: {f: patched(x, f) for f in fmts})
    monkeypatch.setattr(numerics, "format_unavailable", lambda f: "torchao is missing (test)" if f == "tf32" else None)
    code, r = _run(tmp_path, "--steps", "0", "--formats", "tf32,bf16,fp32,fp16")
    assert code == 0 and r["status"] == "ok"
    skipped = r["numerics_skipped"]
    assert skipped["tf32"] == "torchao is missing (test)"
    assert skipped["bf16"] == "not implemented: format 'bf16': not written yet"
    assert skipped["fp32"].startswith("failed on blocks.1.attn.c_attn weight: RuntimeError: deliberately broken")
    assert set(_frame(r)["format"]) == {"fp16"} and len(_frame(r)) == len(LAYERS) * 4  # no partial fp32 rows
    text = capsys.readouterr().out
    assert "not computed: tf32: torchao is missing (test)" in text
    assert all(len(line) <= 100 for line in text.splitlines() if not line.startswith("record: "))


def test_nothing_computed_exits_1_with_a_record_saying_why(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(numerics, "format_unavailable", lambda f: f"no {f} here (test)")
    code, r = _run(tmp_path, "--steps", "0", "--formats", "fp16,bf16")
    assert code == 1 and r["status"] == "skipped" and r["numerics_whatif"] is None
    assert r["numerics_skipped"] == {"fp16": "no fp16 here (test)", "bf16": "no bf16 here (test)"}
    assert "no fp16 here (test)" in r["reason"] and "not computed: fp16: no fp16 here" in capsys.readouterr().out


def test_the_default_formats_each_run_or_say_why_not(tmp_path):
    """Today only the casts exist; once every format is written the same call computes them all."""
    code, r = _run(tmp_path, "--steps", "0")
    assert code == 0
    ran, skipped = set(_frame(r)["format"]), set(r["numerics_skipped"])
    assert ran | skipped == set(WHATIF_FORMATS) and not ran & skipped and {"fp16", "bf16"} <= ran
    assert all(r["numerics_skipped"].values())


def _amax_of_step(k: int, batch: int) -> dict[tuple[str, str], float]:
    """amax of each (layer, role) on batches[batch] after k fp32 steps, by THE train step, rebuilt here."""
    case = Case(model="tiny", device="cpu", batch_size=2, seq_len=32, steps=k + 1, warmup=0)
    batches = make_corpus(None, case.model_config.vocab_size).batches(k + 1, 2, 32, 0, "train")
    mode = get_mode("fp32")(resolve_device("cpu"))
    model = GPT(case.model_config, seed=0)
    opt = mode.make_optimizer(model, case.learning_rate, case.weight_decay)
    with mode.numerics():
        for i in range(k):
            case.schedule.apply(opt, i)
            train_step(model, mode, opt, batches[i])
        amax: dict[tuple[str, str], float] = {}

        def keep(layer: str, role: str, t: torch.Tensor) -> None:
            amax[layer, role] = t.abs().max().item()

        with watch(model, LAYERS, keep):
            train_step(model, mode, opt, batches[batch])
    return amax


def test_the_tensors_are_step_k_plus_1s_from_the_trained_state(tmp_path):
    _, r0 = _run(tmp_path, "--steps", "0", "--formats", "fp32", name="0.jsonl")
    _, r3 = _run(tmp_path, "--steps", "3", "--formats", "fp32", name="3.jsonl")
    w0, w3 = (_frame(r).query("role == 'weight'").set_index("layer")["amax"] for r in (r0, r3))
    init = dict(GPT(Case(model="tiny", device="cpu").model_config, seed=0).named_modules())
    assert w0.to_dict() == {n: init[n].weight.abs().max().item() for n in LAYERS}  # the initial weights
    assert (w0 != w3).all()  # three steps moved every weight
    got = _frame(r3).set_index(["layer", "role"])["amax"].to_dict()
    assert got == pytest.approx(_amax_of_step(3, batch=3), rel=1e-6)  # step 4's batch on the 3-step state
    other = _amax_of_step(3, batch=2)  # the last trained batch gives other activations
    assert got[LAYERS[0], "input"] != pytest.approx(other[LAYERS[0], "input"], rel=1e-6)


def test_it_leaves_the_globals_as_it_found_them(tmp_path, monkeypatch):
    seen, dims = [], set()
    stats = numerics.tensor_stats

    def spy(x, f):
        seen.append(tf32_enabled())
        dims.add(x.dim())
        return stats(x, f)

    monkeypatch.setattr(numerics, "tensor_stats", spy)
    monkeypatch.setattr(numerics, "tensor_stats_many", lambda x, fmts: {f: spy(x, f) for f in fmts})
    with tf32_matmuls(True):  # a caller that allows TF32 (restored exactly on exit): fp32 must still be strict
        before, rng = numerics_globals(), torch.get_rng_state()
        code, _ = _run(tmp_path, "--steps", "1", "--formats", "bf16")
        assert code == 0 and seen and not any(seen)  # TF32 off while the tensors were taken
        assert dims == {2}  # activations and their gradients as (tokens, features), as the GEMMs take them
        assert numerics_globals() == before and torch.equal(torch.get_rng_state(), rng)


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as done:  # argparse's own errors
        return done.code


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--formats", "fp17"], "format='fp17' is unknown; choose from fp32,"),
        (["--formats", " , "], "formats=' , ': empty"),
        (["--steps", "-1"], "steps=-1: must be 0 (the initial weights) or more"),
        (["--batch-size", "0"], "batch_size=0: must be at least 1"),
        (["--model", "gpt5"], "model='gpt5' is unknown"),
        (["--seq-len", "4096"], "seq_len=4096 exceeds the block size"),
        (["--steps", "two"], "argument --steps: 'two' is not an integer; see mpbench numerics --help"),
    ],
)
def test_bad_flags_are_one_line_and_exit_2(args, match, capsys, tmp_path):
    out = tmp_path / "n.jsonl"
    assert _exit_code([*SMALL, *args, "--out", str(out)]) == 2
    line = error_line(capsys)
    assert match in line and line.startswith("mpbench numerics: error: "), line
    assert not out.exists()


def test_a_record_that_cannot_be_written_stops_with_74(tmp_path, capsys, monkeypatch):
    def refuse(path, record):
        raise store.NotWritten(f"{path}: No space left on device")

    monkeypatch.setattr(store, "append", refuse)
    assert main([*SMALL, "--steps", "0", "--formats", "fp32", "--out", str(tmp_path / "n.jsonl")]) == 74
    said = capsys.readouterr()
    assert "the record could not be written" in said.err and "No space left on device" in said.err
    assert "grad_weight" in said.out  # the table was shown all the same


def test_the_subcommand_is_wired_with_its_flags(capsys):
    assert "numerics" in next(a.choices for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    with pytest.raises(SystemExit) as done:
        main(["numerics", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--model", "--device", "--batch-size", "--seq-len", "--steps", "--seed", "--formats", "--layers",
                 "--out"):  # fmt: skip
        assert flag in text, flag


def test_fp32_that_diverges_is_a_diverged_record_and_exit_1(tmp_path, capsys, monkeypatch):
    step, calls = train_mod.train_step, []

    def nan_at_2(model, mode, opt, batch):
        calls.append(1)
        loss, stepped = step(model, mode, opt, batch)
        return (loss * math.nan if len(calls) == 2 else loss), stepped

    monkeypatch.setattr(train_mod, "train_step", nan_at_2)
    code, r = _run(tmp_path, "--steps", "3", "--formats", "fp32")
    assert code == 1 and r["status"] == "diverged" and r["diverged_at_step"] == 2 and r["numerics_whatif"] is None
    assert "fp32 diverged: the loss of step 2 is nan" in r["reason"]
    assert "diverged: fp32 diverged: the loss of step 2 is nan" in capsys.readouterr().out


def test_all_names_every_format_and_a_list_keeps_its_order_once():
    assert numerics.parse_formats("all") == list(numerics.FORMATS)
    assert numerics.parse_formats(" bf16, fp16,bf16 ") == ["bf16", "fp16"]
    assert numerics.parse_formats(None) == list(WHATIF_FORMATS)


@pytest.mark.parametrize(("exc", "status"), [(torch.OutOfMemoryError("no room (test)"), "oom"),
                                             (RuntimeError("broken step (test)"), "error")])  # fmt: skip
def test_a_training_that_fails_is_a_record_saying_why_and_exit_1(exc, status, tmp_path, monkeypatch):
    def fail(*args):
        raise exc

    monkeypatch.setattr(train_mod, "train_step", fail)
    code, r = _run(tmp_path, "--steps", "1", "--formats", "fp32")
    assert code == 1 and r["status"] == status and str(exc) in r["reason"] and r["numerics_whatif"] is None


def test_tensors_the_hooks_never_handed_over_are_an_error_not_a_short_table(tmp_path, monkeypatch):
    real = numerics.watch

    def no_grad_weight(model, layers, on_tensor):
        def some(layer, role, t):
            if role != "grad_weight":
                on_tensor(layer, role, t)

        return real(model, layers, some)

    monkeypatch.setattr(numerics, "watch", no_grad_weight)
    code, r = _run(tmp_path, "--steps", "0", "--formats", "fp32")
    assert code == 1 and r["status"] == "error" and "handed over 27 of 36 tensors" in r["reason"]


def test_each_tensor_takes_every_format_in_one_call(tmp_path, monkeypatch):
    many, calls = numerics.tensor_stats_many, []
    monkeypatch.setattr(numerics, "tensor_stats_many", lambda x, fmts: calls.append(list(fmts)) or many(x, fmts))
    monkeypatch.setattr(numerics, "tensor_stats", lambda x, f: pytest.fail(f"a call for {f} alone"))
    code, r = _run(tmp_path, "--steps", "0", "--formats", "fp16,bf16")
    assert code == 0 and calls == [["fp16", "bf16"]] * (len(LAYERS) * 4)  # one pass over each tensor
    assert len(_frame(r)) == 2 * len(LAYERS) * 4

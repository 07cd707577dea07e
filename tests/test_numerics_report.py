"""The numerics in the report, the run summary and compare, on records of real statistics: the tiny GPT's
Linears watched (suite.training.numerics.watch) over a few training steps, each tensor's statistics taken
with suite.modes.format_stats.tensor_stats in fp32, fp16 and bf16."""

import dataclasses
import functools
import io
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models import GPT, GPTConfig
from suite.cli.summary import numerics_block
from suite.modes.format_stats import tensor_stats
from suite.records import store
from suite.records.store import append, make_record
from suite.reporting import charts, numerics_charts, numerics_section, report
from suite.reporting import numerics_table as nt
from suite.reporting.compare import compare_runs, exit_code, format_comparison
from suite.training import numerics as training_numerics

CHROMIUM = shutil.which("chromium")
CASE = dict(model="tiny", batch_size=4, seq_len=32, steps=6, warmup=1, seed=0, compile=False, run_id="r1",
            device="cpu", cpu="test CPU")  # fmt: skip
COLUMNS = ("step", "layer", "role", "format", "amax", "underflow", "saturation", "sqnr_db", "scale")
WHATIF = ("fp32", "fp16", "bf16")  # the formats written so far; any name works the same
OWN = {  # each mode's format per role, as its tensor_formats would say
    "fp32": dict.fromkeys(training_numerics.ROLES, "fp32"),
    "bf16": {"input": "bf16", "weight": "bf16", "grad_output": "bf16", "grad_weight": "fp32"},
    "amp-fp16": {"input": "fp16", "weight": "fp16", "grad_output": "fp16", "grad_weight": "fp32"},
}


@functools.cache
def _tensors(steps: tuple[int, ...] = (2, 4, 6)) -> tuple:
    """(step, layer, role, tensor) of the tiny GPT's Linears on the sampled steps of a short AdamW run."""
    cfg = GPTConfig.preset("tiny")
    model = GPT(cfg, seed=0)
    layers = training_numerics.linear_layers(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = torch.Generator().manual_seed(1)
    out = []
    for step in range(1, max(steps) + 1):
        seen: list = []
        x = torch.randint(0, cfg.vocab_size, (4, 33), generator=batches)
        hooks = training_numerics.watch(model, layers if step in steps else [], lambda *t, seen=seen: seen.append(t))
        with hooks:
            logits = model(x[:, :-1])
            F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)).backward()
        out += [(step, layer, role, t.clone()) for layer, role, t in seen]
        opt.step()
        opt.zero_grad()
    return tuple(out)


def _columns(rows: list[tuple[int, str, str, str]]) -> dict[str, list]:
    cols = {c: [] for c in COLUMNS}
    tensors = {(s, layer, role): t for s, layer, role, t in _tensors()}
    for step, layer, role, fmt in rows:
        stats = dataclasses.asdict(tensor_stats(tensors[step, layer, role], fmt))
        for c, v in zip(COLUMNS, (step, layer, role, fmt), strict=False):
            cols[c].append(v)
        for c in COLUMNS[4:]:
            cols[c].append(stats[c])
    return cols


def whatif(formats=WHATIF) -> dict[str, list]:
    """`numerics_whatif` of the last sampled step: every format on the same fp32 tensors."""
    last = max(s for s, *_ in _tensors())
    return _columns([(s, layer, role, f) for f in formats for s, layer, role, _ in _tensors() if s == last])


def training(mode: str) -> dict[str, list]:
    """`numerics` of a training run: every sampled step, each role in the mode's own format."""
    return _columns([(s, layer, role, OWN[mode][role]) for s, layer, role, _ in _tensors()])


def _record(mode: str, **kw) -> dict:
    return make_record(**CASE, mode=mode, status="ok", step_time_ms=100.0, step_time_p10_ms=99.0,
                       step_time_p90_ms=101.0, tokens_per_s=1280.0, peak_mem_mb=500.0, peak_mem_source="rss",
                       loss_curve=[6.2, 6.1, 6.0, 5.9, 5.8, 5.7], final_loss=5.7, **kw)  # fmt: skip


def _report(tmp_path: Path, records: list[dict], name: str = "report") -> tuple[dict[str, Path], str]:
    path = tmp_path / f"{name}.jsonl"
    for r in records:
        append(path, r)  # through the store: inf and nan SQNR as 'inf' / 'nan' text and back
    written = report.build_report(store.load(path), tmp_path / name)
    return written, written["index.html"].read_text()


def _heatmaps(page: str) -> list[str]:
    return re.findall(rf'<img alt="({numerics_section.HEATMAP_ALT}[^"]*)"', page)


def test_the_records_reader_imports_no_torch_and_shares_the_roles_and_marks():
    """Roles and columns live in the record schema, marks in the reader: one definition each, and reading
    records (a report on a machine without torch's CUDA build) never imports torch."""
    from suite.cli import numerics as whatif_command

    assert nt.ROLES is training_numerics.ROLES
    assert whatif_command.UNDERFLOW_MARK is nt.UNDERFLOW_MARK  # the picture marks what the table does
    code = "import sys, suite.reporting.numerics_table; print('torch' in sys.modules)"
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=repo)
    assert out.stdout.strip() == "False"


def test_a_whatif_record_gets_the_section_and_one_heatmap_per_format(tmp_path):
    skipped = {"mxfp4": "torchao has no MX formats here"}
    written, page = _report(tmp_path, [_record("fp32", numerics_whatif=whatif(), numerics_skipped=skipped)])
    assert f'<h2 id="{numerics_section.ANCHOR}">{numerics_section.TITLE}</h2>' in page
    assert [alt.split(": ")[1].split(",")[0] for alt in _heatmaps(page)] == list(WHATIF)
    assert {f"numerics1-fp32-whatif-{f}.png" for f in WHATIF} <= set(written)
    assert "mxfp4: not computed here: torchao has no MX formats here" in page
    assert "![SQNR heatmap: bf16" in written["summary.md"].read_text()


def test_a_heatmap_cell_says_exact_and_marks_underflow_and_saturation():
    cell = nt.Cell(1, "l", "input", "fp16", 1.0, 0.0, 0.0, math.inf, 1.0)
    assert numerics_charts.cell_text(cell) == "exact"
    assert numerics_charts.cell_text(dataclasses.replace(cell, sqnr_db=math.nan, amax=0.0)) == "n/a"
    # a tensor holding inf (an overflowed gradient) has a nan SQNR as an all-zero one does: it is not all zero
    assert numerics_charts.cell_text(dataclasses.replace(cell, sqnr_db=math.nan, amax=math.inf)) == "inf/nan"
    assert numerics_charts.cell_text(None) == "-"
    unmeasured = nt.Cell(1, "l", "input", "fp16", None, None, None, None, None)  # a null row: not measured
    assert numerics_charts.cell_text(unmeasured) == "-" and math.isnan(numerics_charts._value(unmeasured))
    assert nt.worst([unmeasured]) == [] and nt.drops([cell], [unmeasured]) == ([], 1)
    assert nt.drops([unmeasured], [dataclasses.replace(cell, sqnr_db=3.0)]) == ([], 1)
    u = dataclasses.replace(cell, sqnr_db=31.26, underflow=nt.UNDERFLOW_MARK * 2)
    assert numerics_charts.cell_text(u) == "31.3 U"
    us = dataclasses.replace(u, saturation=nt.SATURATION_MARK * 2)
    assert numerics_charts.cell_text(us) == "31.3 US"
    just = dataclasses.replace(cell, sqnr_db=20.0, underflow=nt.UNDERFLOW_MARK, saturation=nt.SATURATION_MARK)
    assert numerics_charts.cell_text(just) == "20.0"  # at the threshold: not past it
    # real fp16 statistics: unscaled small gradients underflow (a U), fp32 round trips are exact
    cells, _ = nt.read({"numerics_whatif": whatif()}, "numerics_whatif")
    texts = {(c.format, c.role): numerics_charts.cell_text(c) for c in cells}
    assert texts["fp32", "input"] == "exact"
    assert any(t.endswith("U") for (f, role), t in texts.items() if f == "fp16" and role == "grad_output")


def test_a_training_run_gets_its_heatmap_and_amax_chart_per_mode(tmp_path):
    scaled = training("amp-fp16")
    first = scaled["layer"].index("lm_head")  # its input at step 2: statistics that could not be taken
    scaled.update({k: [None if i == first else v for i, v in enumerate(scaled[k])] for k in nt.NUMBER_COLUMNS})
    scaled["scale"] = [1024.0 if role == "grad_output" else s for role, s in zip(scaled["role"], scaled["scale"],
                                                                                 strict=True)]  # fmt: skip
    records = [_record(m, numerics=training(m), numerics_steps=[2, 4, 6], numerics_formats=OWN[m])
               for m in ("fp32", "bf16")]  # fmt: skip
    why = "tensor_stats in format 'fp16' failed: RuntimeError: planted (input)"
    records.append(_record("amp-fp16", numerics=scaled, numerics_steps=[2, 4, 6], numerics_reason=why))
    written, page = _report(tmp_path, records)
    assert [alt.split(",")[0] for alt in _heatmaps(page)] == [
        f"{numerics_section.HEATMAP_ALT}: {m}" for m in ("fp32", "bf16", "amp-fp16")
    ]
    for n, mode in enumerate(("fp32", "bf16", "amp-fp16"), start=1):
        assert {f"numerics{n}-{mode}-train-sqnr.png", f"numerics{n}-{mode}-train-amax.png"} <= set(written)
    assert "in its own formats, step 6 (the last of 3 sampled)" in page
    assert f"amp-fp16: statistics not taken: {why}".replace("'", "&#x27;") in page
    # a scale chart only where a tensor has a scale other than a plain cast's 1.0
    assert [n for n in written if n.endswith("-scale.png")] == ["numerics3-amp-fp16-train-scale.png"]


def test_a_column_label_names_its_format_broken_to_the_column_width():
    def label(*formats: str) -> str:
        cells = [nt.Cell(1, f"layer{i}", "input", f, 1.0, 0.0, 0.0, 30.0, None) for i, f in enumerate(formats)]
        return numerics_section._column_label("input", cells)

    assert label("e4m3-rowwise-pow2") == "input\ne4m3-rowwise-\npow2"  # one line would overlap its neighbour's
    assert label("bf16", "bf16") == "input\nbf16"
    assert label("bf16", "fp32") == "input\nmixed formats"
    assert all(len(line) <= numerics_section.LABEL_CHARS for line in label("e5m2-tensorwise").split("\n"))


def test_the_numerics_charts_are_legible(tmp_path):
    """The same rules as every chart (tests/test_report_legible.py): 8 pt or more, no text cut off, <= 750 px."""
    records = [_record("fp32", numerics_whatif=whatif()), _record("bf16", numerics=training("bf16"))]
    written, _ = _report(tmp_path, records)
    pngs = [p for n, p in written.items() if n.startswith("numerics")]
    assert len(pngs) == 5
    for path in pngs:
        image = Image.open(path)
        assert float(image.text[charts.FONT_KEY]) >= charts.MIN_FONT_PT, path.name
        assert image.width <= charts.MAX_WIDTH_PX, path.name
        assert image.text[charts.CUT_KEY] == "", f"{path.name}: cut off: {image.text[charts.CUT_KEY]!r}"


def test_records_without_numerics_give_no_section_and_no_error(tmp_path):
    why = "not requested (mpbench run --numerics)"
    written, page = _report(tmp_path, [_record("fp32", numerics_reason=why), _record("bf16")])
    assert numerics_section.TITLE not in page and not _heatmaps(page)
    assert not [n for n in written if n.startswith("numerics")]
    assert numerics_block([_record("fp32"), _record("bf16", numerics={})], 80) == []


MALFORMED = {
    "unequal columns": lambda c: c | {"sqnr_db": c["sqnr_db"][:-1]},
    "text for a number": lambda c: c | {"sqnr_db": ["abc", *c["sqnr_db"][1:]]},
    "a number for a layer": lambda c: c | {"layer": [7, *c["layer"][1:]]},
    "a fractional step": lambda c: c | {"step": [1.5, *c["step"][1:]]},
    "a column missing": lambda c: {k: v for k, v in c.items() if k != "amax"},
    "a column not a list": lambda c: c | {"role": "input"},
    "not an object": lambda c: [c],
}


@pytest.mark.parametrize("how", MALFORMED)
def test_malformed_numerics_are_named_and_crash_nothing(tmp_path, how):
    bad = MALFORMED[how](training("bf16"))
    records = [_record("fp32", numerics=training("fp32")), _record("bf16", numerics=bad)]
    df = pandas.DataFrame.from_records(records)  # in memory: the store's reader would refuse a non-object
    page = report.build_report(df, tmp_path / "report")["index.html"].read_text()
    assert len(_heatmaps(page)) == 1  # fp32's, drawn; bf16's named with why, none drawn in part
    assert re.search(r"bf16: not drawn: field &#x27;numerics&#x27;", page)
    assert [line for line in numerics_block(records, 80) if "bf16" in line] == []
    compare_runs(records, records)  # no exception either


def _planted(sqnrs: dict[tuple[int, str], float], others: float = 60.0) -> dict[str, list]:
    """A training field of the real one's shape: the input SQNR of some (step, layer) planted, of the other
    layers `others`, every other role's inf (an exact round trip)."""
    cols = training("bf16")
    cols["sqnr_db"] = [sqnrs.get((s, layer), others) if role == "input" else math.inf
                       for s, layer, role in zip(cols["step"], cols["layer"], cols["role"], strict=True)]  # fmt: skip
    return cols


def test_the_summary_names_the_three_worst_finite_cells_in_order():
    cells = {(6, "blocks.1.mlp.c_fc"): 18.25, (6, "lm_head"): 30.0, (6, "blocks.0.attn.c_attn"): 22.0,
             (6, "blocks.0.mlp.c_fc"): math.nan, (4, "blocks.1.attn.c_proj"): 1.0}  # fmt: skip
    lines = numerics_block([_record("fp32"), _record("bf16", numerics=_planted(cells))], 80)
    table = [line.split() for line in lines if "input" in line]
    # worst first, a nan (all-zero tensor) and inf (exact) left out, an earlier step's 1 dB not the last step's
    assert [(row[-5], row[-2]) for row in table] == [
        ("blocks.1.mlp.c_fc", "18.2"), ("blocks.0.attn.c_attn", "22.0"), ("lm_head", "30.0")]  # fmt: skip
    assert table[0][0] == "bf16" and all(len(line) <= 80 for line in lines)
    two = numerics_block([_record("bf16", numerics=_planted({(6, "lm_head"): 30.0, (6, "blocks.0.mlp.c_fc"): 9.0},
                                                             others=math.inf))], 80)  # fmt: skip
    assert [line.split()[-5:-1] for line in two if "input" in line] == [
        ["blocks.0.mlp.c_fc", "input", "bf16", "9.0"],
        ["lm_head", "input", "bf16", "30.0"],
    ]  # no inf third
    wide = numerics_block([_record("bf16", numerics=_planted(cells))], None)
    assert any("bf16" in line and "step" not in line and line.rstrip().endswith("6") for line in wide)


def test_the_summary_of_a_real_run_prints_the_block_under_the_table():
    from suite.cli.summary import summary

    _, notes = summary([_record("fp32"), _record("bf16", numerics=training("bf16"))], 80)
    block = notes[notes.index("") + 1 :] if "" in notes else []
    assert block[0].startswith("numerics: the 3 worst SQNR") and len(block) == 8  # 3 lines, head, rule, 3 rows
    assert max(len(line) for line in block) <= 80


def test_compare_shows_a_6_db_drop_and_an_exact_tensor_that_no_longer_is_but_not_a_1_db_drop():
    a = _planted({(6, "blocks.0.mlp.c_fc"): 40.0, (6, "lm_head"): 40.0})
    b = _planted({(6, "blocks.0.mlp.c_fc"): 34.0, (6, "lm_head"): 39.0})
    keys = list(zip(b["step"], b["layer"], b["role"], strict=True))
    exact = keys.index((6, "blocks.1.attn.c_proj", "weight"))  # inf in A, as every non-input role is
    b["sqnr_db"][exact] = 95.0
    rows = compare_runs([_record("bf16", numerics=a)], [_record("bf16", numerics=b)])
    changed = [r for r in rows if r.verdict == "changed"]
    assert [r.metric for r in changed] == [
        "sqnr_db blocks.1.attn.c_proj weight bf16", "sqnr_db blocks.0.mlp.c_fc input bf16"]  # fmt: skip
    assert changed[0].a == math.inf and changed[1].a - changed[1].b == pytest.approx(6.0)
    assert exit_code(rows) == 0  # shown, not a failed gate
    text = format_comparison(rows)
    assert "2 tensor(s) fell more than 3 dB" in text and "40.0 -> 34.0 dB, down 6.0 dB" in text
    assert "lm_head" not in text and "1 changed" not in text and "2 changed" in text


def test_mpbench_compare_exits_0_and_its_last_line_counts_the_drops(tmp_path, capsys):
    from suite.cli.main import main

    a, b = _planted({(6, "blocks.0.mlp.c_fc"): 40.0}), _planted({(6, "blocks.0.mlp.c_fc"): 34.0})
    append(tmp_path / "a.jsonl", _record("bf16", numerics=a))
    append(tmp_path / "b.jsonl", _record("bf16", numerics=b))
    assert main(["compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "0 regression(s)" in last and "1 line(s) of SQNR drops shown" in last


def test_compare_reads_whatif_records_and_ignores_a_one_sided_field():
    a, b = whatif(), whatif()
    i = next(i for i, f in enumerate(b["format"]) if f == "bf16")
    b["sqnr_db"][i] -= 10.0
    rows = compare_runs([_record("fp32", numerics_whatif=a)], [_record("fp32", numerics_whatif=b)])
    assert [r.metric.split()[0:2] for r in rows if r.verdict == "changed"] == [["what-if", "sqnr_db"]]
    one_sided = compare_runs([_record("fp32", numerics_whatif=a)], [_record("fp32")])
    assert not [r for r in one_sided if "sqnr" in r.metric]


# Run in the browser on a copy of the page: the section's heading, and each heatmap's natural size once loaded.
PROBE = """<script>addEventListener('load', () => {
  const maps = [...document.images].filter(i => i.alt.startsWith('%s')).map(i => [i.naturalWidth, i.naturalHeight]);
  const h2 = document.getElementById('%s');
  document.title = 'probe:' + JSON.stringify({heading: h2 ? h2.textContent : null, maps}) + ':end';
});</script>"""


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium) to render the page")
def test_the_section_renders_in_headless_chromium_with_its_heatmaps(tmp_path):
    records = [_record("fp32", numerics_whatif=whatif()), _record("bf16", numerics=training("bf16"))]
    written, page = _report(tmp_path, records)
    probe = written["index.html"].with_name("probe.html")
    probe.write_text(page.replace("</body>", PROBE % (numerics_section.HEATMAP_ALT, numerics_section.ANCHOR)
                                  + "</body>"))  # fmt: skip
    command = [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,900", "--dump-dom", probe.resolve().as_uri(),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    found = re.search(r"<title>probe:(.*):end</title>", done.stdout)
    assert found, f"the probe did not run (exit {done.returncode}): {done.stderr[-2000:]}"
    seen = json.loads(found.group(1).replace("&quot;", '"'))
    assert seen["heading"] == numerics_section.TITLE
    assert len(seen["maps"]) == len(WHATIF) + 1  # three what-if formats and bf16's own
    pngs = [Image.open(io.BytesIO(p.read_bytes())) for n, p in sorted(written.items()) if n.endswith("sqnr.png")]
    assert all(w > 100 and h > 100 for w, h in seen["maps"]), seen["maps"]
    assert [pngs[0].width, pngs[0].height] in seen["maps"]  # drawn from the PNG that was written

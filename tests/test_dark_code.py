"""ci/dark_lines.py sorts never-run lines mechanically; pyproject's coverage settings reach every process."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import coverage
import pytest

from ci.dark_lines import Budget, FileLines, Listing, block_lines, check_budget, load_list, read_corpus, sort_lines

REPO = Path(__file__).resolve().parent.parent

SOURCE = textwrap.dedent('''\
    import torch


    def sync(device):
        """Wait for the device."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return device


    def unused_helper():
        return 1


    def untested():
        return 2


    if __name__ == "__main__":
        sync(None)
''')
LINES = SOURCE.splitlines()


def line(text: str) -> int:
    return next(i for i, s in enumerate(LINES, 1) if text in s)


def statements(source: str) -> frozenset[int]:
    """First lines of statements, docstrings left out (as coverage counts them)."""
    out = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.stmt) and not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)):
            out.add(node.lineno)
    return frozenset(out)


def measured(*run: str) -> FileLines:
    """pkg/mod.py as measured when the lines holding each text in `run` (and every def) executed."""
    executed = {line("import torch"), line("def sync"), line("def unused"), line("def untested"), line("if __name__")}
    executed |= {line(t) for t in run}
    stmts = statements(SOURCE)
    return FileLines("pkg/mod.py", SOURCE, stmts, stmts - executed)


GPU = Listing("gpu", "pkg/mod.py", "sync", 'if device.type == "cuda"', "cuda; read against torch/cuda/__init__.py")
CORPUS = "pkg.mod.sync(d)  pkg.mod.untested()"  # the rest of the repository names sync and untested


def sort(file: FileLines, listings: list[Listing], corpus: str = CORPUS):
    names = Counter(re.findall(r"[A-Za-z_]\w*", corpus + "\n" + file.source))
    return sort_lines([file], listings, names, corpus)


def test_each_never_run_line_lands_in_one_category():
    out = sort(measured('if device.type == "cuda"', "return device"), [GPU])
    assert out.problems == []
    assert out.gpu == {"pkg/mod.py": {line("torch.cuda.synchronize")}}  # the if's body only: its test ran
    assert out.dead["pkg/mod.py"].keys() == {line("return 1"), line("sync(None)")}
    assert "unused_helper" in out.dead["pkg/mod.py"][line("return 1")]
    assert "-m pkg.mod" in out.dead["pkg/mod.py"][line("sync(None)")]
    assert out.untested == {"pkg/mod.py": {line("return 2")}}
    assert (out.statements, out.never_run) == (len(statements(SOURCE)), 4)


def test_an_unlisted_gpu_line_is_cpu_reachable_untested():
    out = sort(measured('if device.type == "cuda"', "return device"), [])
    assert line("torch.cuda.synchronize") in out.untested["pkg/mod.py"] and out.gpu == {}


def test_a_listed_block_a_cpu_test_now_runs_is_stale():
    out = sort(measured('if device.type == "cuda"', "torch.cuda.synchronize", "return device"), [GPU])
    assert len(out.problems) == 1 and out.problems[0].startswith("stale [[gpu]] pkg/mod.py:sync")
    assert f"line(s) {line('torch.cuda.synchronize')}" in out.problems[0]


def test_a_listing_that_names_nothing_is_reported():
    gone = [
        Listing("gpu", "pkg/mod.py", "sync", "torch.cuda.current_stream", "cuda; read"),
        Listing("gpu", "pkg/mod.py", "Timer.start", None, "cuda; read"),
        Listing("gpu", "pkg/other.py", "", None, "cuda; read"),
    ]
    out = sort(measured(), gone)
    assert [p.split(":")[0] for p in out.problems] == ["unresolved [[gpu]] pkg/mod.py"] * 2 + [
        "unresolved [[gpu]] pkg/other.py"
    ]


def test_a_main_block_run_with_dash_m_and_a_listed_dead_block():
    dead = Listing("dead", "pkg/mod.py", "untested", None, "json.dumps default: never sees a dataclass")
    out = sort(measured(), [dead], corpus=CORPUS + "\npython -m pkg.mod")
    assert line("sync(None)") in out.untested["pkg/mod.py"]  # someone runs it: reachable, not dead
    assert out.dead["pkg/mod.py"][line("return 2")] == "listed in [[dead]]"


BLOCKS = textwrap.dedent("""\
    class Tracker:
        LIMIT = 3

        def start(self, cuda):
            cuda.reset()

        def stop(self, cuda):
            try:
                cuda.read()
            except RuntimeError:
                return None
            return 1


    def resolve(name, cuda):
        if not cuda.is_available():
            raise ValueError(name)
        index = int(name[5:])
        if index >= cuda.count():
            raise ValueError(name)
        return index


    def each(devices):
        for d in devices:
            d.sync()
        return len(devices)
""")


@pytest.mark.parametrize(
    "scope, span, lines",
    [
        ("Tracker", {}, {5, *range(8, 13)}),  # the methods' bodies, never the def lines (import runs those)
        ("Tracker.stop", {"match": "except RuntimeError"}, {10, 11}),  # an except clause is a statement to coverage
        ("resolve", {"match": "index = int", "through": "return index"}, set(range(18, 22))),
        ("resolve", {"match": "if index >=", "to_end": True}, set(range(19, 22))),
        ("resolve", {"match": "if not cuda.is_available()"}, {17}),  # an if: its body (the test runs anyway)
        ("each", {"match": "for d in devices"}, {26}),  # a loop: its body (the header runs on an empty list)
    ],
)
def test_a_block_is_the_lines_it_names(scope, span, lines):
    listing = Listing(
        "gpu", "b.py", scope, span.get("match"), "cuda; read", span.get("through"), span.get("to_end", False)
    )
    assert block_lines(listing, ast.parse(BLOCKS), BLOCKS.splitlines()) == lines


def test_the_summary_line_and_listing_count_each_category():
    from ci.dark_code import details, summary

    out = sort(measured('if device.type == "cuda"', "return device"), [GPU])
    assert summary(out, Budget(untested=1, dead=2)) == (
        f"dark code: {len(statements(SOURCE))} statements in suite/ and models/, 4 never run on CPU: 1 GPU-only "
        "(listed in ci/gpu_only.toml; 0 of them the existing fakes could reach), 1 CPU-reachable untested "
        "(budget 1), 0 untested with a reason (listed), 2 dead (budget 2)"
    )
    listing = details(out)
    assert f"- pkg/mod.py untested: 1 at {line('return 2')}" in listing
    assert "torch/cuda/__init__.py" in listing and "unused_helper: its name appears nowhere else" in listing


WHY = Listing("untested", "pkg/mod.py", "untested", None, "rewrites a committed file; a test would overwrite it")


def test_an_untested_block_with_a_reason_is_counted_apart_from_the_budget():
    from ci.dark_code import as_dict, details, summary

    out = sort(measured('if device.type == "cuda"', "return device"), [GPU, WHY])
    assert out.problems == [] and out.untested == {} and out.explained == {"pkg/mod.py": {line("return 2")}}
    assert out.never_run == 4 and check_budget(out, Budget(untested=0, dead=2)) == []
    assert "0 CPU-reachable untested (budget 0), 1 untested with a reason (listed)" in summary(out, Budget(0, 2))
    assert f"- pkg/mod.py:untested: 1 at {line('return 2')}; rewrites a committed file" in details(out)
    assert as_dict(out)["explained"] == 1


def test_an_untested_block_a_cpu_test_now_runs_is_stale():
    out = sort(measured('if device.type == "cuda"', "return device", "return 2"), [GPU, WHY])
    assert out.problems == [f"stale [[untested]] pkg/mod.py:untested: CPU tests run line(s) {line('return 2')}; "
                            "narrow or drop it"]  # fmt: skip


def test_budget_over_is_a_problem_and_under_is_not():
    out = sort(measured('if device.type == "cuda"', "return device"), [GPU])
    assert check_budget(out, Budget(untested=1, dead=2)) == []
    assert check_budget(out, Budget(untested=0, dead=2)) == ["1 untested statements, over the budget of 0"]


def test_list_file_errors_name_the_entry_and_field(tmp_path):
    path = tmp_path / "gpu_only.toml"
    entry = '[[gpu]]\nfile = "a.py"\nscope = "f"\nneeds = "cuda"\n'
    path.write_text(f"[budget]\nuntested = 0\ndead = 0\n{entry}")
    with pytest.raises(ValueError, match=r"\[\[gpu\]\] #1 \(a.py:f\): field 'upstream' missing"):
        load_list(path)
    path.write_text(f'[budget]\nuntested = 0\ndead = 0\n{entry.replace("cuda", "tpu")}upstream = "x"\n')
    with pytest.raises(ValueError, match="needs='tpu'; use one of cuda"):
        load_list(path)
    path.write_text('[budget]\nuntested = 0\ndead = 0\n[[untested]]\nfile = "a.py"\nscope = "f"\n')
    with pytest.raises(ValueError, match=r"\[\[untested\]\] #1 \(a.py:f\): field 'reason' missing"):
        load_list(path)
    path.write_text(f'[budget]\nuntested = 0\n{entry}upstream = "torch 2.11 torch/cuda/__init__.py"\n')
    with pytest.raises(ValueError, match=r"\[budget\] dead missing"):
        load_list(path)


def test_the_committed_list_loads_and_names_measured_files():
    listings, _ = load_list(REPO / "ci" / "gpu_only.toml")
    assert listings and all((REPO / x.file).is_file() and x.file.startswith(("suite/", "models/")) for x in listings)


def test_the_corpus_counts_names_in_code_and_docs(tmp_path):
    (tmp_path / "a.py").write_text("def helper(): pass\n")
    (tmp_path / "README.md").write_text("call `helper()`\n")
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe helper")
    names, corpus = read_corpus(tmp_path, sorted(tmp_path.iterdir()))
    assert names["helper"] == 2 and "call" in corpus


PROBE = """\
def in_parent():
    return 1


def in_forkserver_child():
    import os
    os._exit(3)  # as multiprocessing's children and the crash fault end: no atexit


def in_stopped_child(looping):
    while True:
        looping.set()  # then stopped by SIGTERM, as a timed-out case's worker
        looping.wait(0.05)


def in_subprocess():
    return 2
"""

MAIN = """\
import multiprocessing as mp, subprocess, sys
import probe

if __name__ == "__main__":
    probe.in_parent()
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["probe"])
    child = ctx.Process(target=probe.in_forkserver_child)
    child.start(); child.join()
    looping = ctx.Event()
    stopped = ctx.Process(target=probe.in_stopped_child, args=(looping,))
    stopped.start(); looping.wait(60); stopped.terminate(); stopped.join()
    subprocess.run([sys.executable, "-c", "import probe; probe.in_subprocess()"], check=True)
    print(child.exitcode, stopped.exitcode)
"""


@pytest.mark.slow
def test_pyprojects_coverage_settings_measure_every_kind_of_process(tmp_path):
    """pyproject's [tool.coverage.run], on a probe module: a fork-server child that ends by os._exit,
    one stopped by SIGTERM, and a subprocess are all counted (torchrun's ranks are subprocesses too)."""
    config = (REPO / "pyproject.toml").read_text()
    section = re.search(r"^\[tool\.coverage\.run\]\n(?:(?!\[).*\n)*", config, re.M).group(0)
    (tmp_path / "pyproject.toml").write_text(
        re.sub(r"^source_pkgs = .*$", 'source_pkgs = ["probe"]', section, flags=re.M)
    )
    (tmp_path / "probe.py").write_text(PROBE)
    (tmp_path / "main.py").write_text(MAIN)
    outer = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}  # when ci/dark_code.py runs us
    env = outer | {"COVERAGE_FILE": str(tmp_path / ".coverage"), "PYTHONPATH": str(tmp_path)}
    cmd = [sys.executable, "-m", "coverage", "run", "--rcfile=pyproject.toml", "main.py"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["3", "-15"], done.stderr[-2000:]
    cov = coverage.Coverage(data_file=str(tmp_path / ".coverage"), config_file=str(tmp_path / "pyproject.toml"))
    cov.combine(data_paths=[str(tmp_path)])
    missing = set(cov.analysis2(str(tmp_path / "probe.py"))[3])
    probe = PROBE.splitlines()
    wanted = ["return 1", "os._exit(3)", "looping.set()", "return 2"]
    assert [w for w in wanted if next(i for i, s in enumerate(probe, 1) if w in s) in missing] == []

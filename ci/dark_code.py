"""Count the dark code: the statements of suite/ and models/ that no CPU test executes.

    python ci/dark_code.py run [PYTEST_ARGS...]   the README's `pytest`, measured; then `report`
    python ci/dark_code.py report [--details]     sort the last measurement again (after editing the list)

`run` runs pytest once under coverage.py with every process it starts measured ([tool.coverage.run]
in pyproject.toml: subprocesses such as `mpbench`, `python -m suite.cli`, torchrun and its ranks;
fork-server children; processes that end by os._exit or SIGTERM; the pytest-xdist workers that
tests/conftest.py starts, which are subprocesses too). `report` combines the data, sorts
each never-run statement with ci/dark_lines.py against ci/gpu_only.toml, prints one summary line,
writes the full listing to .dark-code/dark-code.md, and exits 1 when the list is stale or a
budget is exceeded (each problem on its own line). `run` exits with pytest's status when tests fail.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `ci.dark_lines` is found

from ci.dark_lines import Budget, FileLines, Sorted, check_budget, load_list, ranges, read_corpus, sort_lines  # noqa: E402

MEASURED = ("suite", "models")
LIST = ROOT / "ci" / "gpu_only.toml"
DATA = ROOT / ".dark-code"


def measure(pytest_args: list[str], data: Path) -> int:
    """Run pytest under coverage with a fresh data folder; pytest's exit status."""
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    env = os.environ | {"COVERAGE_FILE": str(data / ".coverage")}  # every process writes its own file here
    cmd = [sys.executable, "-m", "coverage", "run", f"--rcfile={ROOT / 'pyproject.toml'}", "-m", "pytest"]
    return subprocess.run([*cmd, *pytest_args], cwd=ROOT, env=env).returncode


def measured_files(data: Path) -> list[FileLines]:
    """Combine the per-process data files; each measured file's statements and never-run lines."""
    import coverage

    cov = coverage.Coverage(data_file=str(data / ".coverage"), config_file=str(ROOT / "pyproject.toml"))
    parts = [p for p in data.glob(".coverage.*")]
    if parts:
        cov.combine(data_paths=[str(p) for p in parts], keep=False)
        cov.save()
    elif not (data / ".coverage").exists():
        raise SystemExit(f"no coverage data in {data}: run `python ci/dark_code.py run` first")
    cov.load()
    files = []
    for top in MEASURED:
        for path in sorted((ROOT / top).rglob("*.py")):
            _, statements, _, missing, _ = cov.analysis2(str(path))
            rel = path.relative_to(ROOT).as_posix()
            files.append(FileLines(rel, path.read_text(), frozenset(statements), frozenset(missing)))
    return files


def repository_files() -> list[Path]:
    """Tracked and untracked-but-not-ignored files: where a name is looked for before code is called dead."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True
    )
    if listed.returncode == 0:
        return [ROOT / line for line in listed.stdout.splitlines() if (ROOT / line).is_file()]
    return [p for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts]


def enclosing(tree: ast.Module, line: int) -> str:
    """Qualified name of the innermost function or class holding `line` ("<module>" if none)."""

    def walk(node: ast.AST, prefix: str) -> str:
        for child in getattr(node, "body", []):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                if child.lineno <= line <= (child.end_lineno or child.lineno):
                    return walk(child, f"{prefix}{child.name}.")
        return prefix[:-1] if prefix else "<module>"

    return walk(tree, "")


def grouped(out: Sorted, name: str) -> list[tuple[str, str, list[int]]]:
    """(file, enclosing function, lines) for one category, in file order."""
    rows: dict[tuple[str, str], list[int]] = {}
    for rel, lines in sorted(getattr(out, name).items()):
        for line in sorted(lines):
            rows.setdefault((rel, enclosing(out.trees[rel], line)), []).append(line)
    return [(rel, fn, lines) for (rel, fn), lines in rows.items()]


def details(out: Sorted) -> str:
    """The full listing, by category, file and function (GPU-only: by block, with what it was read
    against): what the summary line counts."""
    parts = []
    for name, title in (("untested", "CPU-reachable, no test runs them"), ("dead", "dead")):
        parts.append(f"## {title}: {out.count(name)} statements\n")
        for rel, fn, lines in grouped(out, name):
            why = f" ({out.dead[rel][lines[0]]})" if name == "dead" else ""
            parts.append(f"- {rel} {fn}: {len(lines)} at {ranges(lines)}{why}")
        parts.append("")
    parts.append(f"## untested, with a reason (listed in [[untested]]): {out.count('explained')} statements\n")
    for listing, lines in out.blocks:
        if listing.kind == "untested":
            parts.append(f"- {listing.label()}: {len(lines)} at {ranges(lines) or '-'}; {listing.why}")
    parts.append("")
    reachable = out.count("reachable")
    parts.append(f"## GPU-only: {out.count('gpu')} statements ({reachable} the existing fakes could reach)\n")
    for listing, lines in out.blocks:
        if listing.kind == "gpu":
            reach = f"; a CPU test could: {listing.reach}" if listing.reach else ""
            parts.append(f"- {listing.label()}: {len(lines)} at {ranges(lines) or '-'}; {listing.why}{reach}")
    return "\n".join(parts) + "\n"


def as_dict(out: Sorted) -> dict[str, Any]:
    """The counts, for a machine to read."""
    return {
        "statements": out.statements,
        "never_run": out.never_run,
        **{name: out.count(name) for name in ("gpu", "reachable", "untested", "explained", "dead")},
    }


def summary(out: Sorted, budget: Budget) -> str:
    """The one line CI prints."""
    return (
        f"dark code: {out.statements} statements in {' and '.join(f'{m}/' for m in MEASURED)}, "
        f"{out.never_run} never run on CPU: {out.count('gpu')} GPU-only (listed in ci/gpu_only.toml; "
        f"{out.count('reachable')} of them the existing fakes could reach), "
        f"{out.count('untested')} CPU-reachable untested (budget {budget.untested}), "
        f"{out.count('explained')} untested with a reason (listed), "
        f"{out.count('dead')} dead (budget {budget.dead})"
    )


def report(data: Path, list_path: Path, show_details: bool) -> int:
    """Sort the last measurement; print the summary line and any problem; 1 if there is one."""
    listings, budget = load_list(list_path)
    # where a name could be used: the repository, less the list itself (it names the code it lists)
    names, corpus = read_corpus(ROOT, [p for p in repository_files() if p.resolve() != list_path.resolve()])
    out = sort_lines(measured_files(data), listings, names, corpus)
    problems = out.problems + [f"{p} in {list_path.name}" for p in check_budget(out, budget)]
    listing = details(out)
    (data / "dark-code.md").write_text(f"# {summary(out, budget)}\n\n{listing}")
    lines = {name: sorted_lines(out, name) for name in ("gpu", "untested", "explained", "dead")}
    (data / "dark-code.json").write_text(json.dumps(as_dict(out) | {"lines": lines, "problems": problems}, indent=1))
    print(summary(out, budget))
    if show_details:
        print(listing)
    for problem in problems:
        print(f"dark code: {problem}")
    if problems:
        print(f"dark code: full listing in {data / 'dark-code.md'}")
    return 1 if problems else 0


def sorted_lines(out: Sorted, name: str) -> dict[str, list[int]]:
    return {rel: sorted(lines) for rel, lines in sorted(getattr(out, name).items())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)  # pytest's flags pass
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--data", type=Path, default=DATA, help="coverage data folder (default .dark-code)")
    parser.add_argument("--list", type=Path, default=LIST, help="the GPU-only list (default ci/gpu_only.toml)")
    parser.add_argument("--details", action="store_true", help="print every never-run statement, grouped")
    args, pytest_args = parser.parse_known_args(argv)
    if args.command == "report" and pytest_args:
        parser.error(f"report takes no pytest arguments: {' '.join(pytest_args)}")
    status = measure(pytest_args, args.data) if args.command == "run" else 0
    checked = report(args.data, args.list, args.details)
    return status or checked


if __name__ == "__main__":
    sys.exit(main())

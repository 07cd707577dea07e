"""Sort the statements no CPU test executes into GPU-only (listed), dead, untested with a reason (listed), and
CPU-reachable untested.

Pure functions of each file's source and its executed lines, so that the sorting is mechanical and
its tests need no coverage run. ci/dark_code.py measures; ci/gpu_only.toml is the list:

- a `[[gpu]]` block is code only a GPU runs (a CUDA device, NVML, NCCL, torchao's CUDA kernels),
  named by file and scope (qualified name of a function, or of a class: its methods' bodies; ""
  for the whole module), or narrower by `match`, a text on the first line of the statements
  meant (an `if`, `for` or `while` then means its body only: the test runs on a CPU too), and
  `through`, the first line of the last statement of a run starting at `match` (or `to_end`, to
  the end of the scope). Each says what it
  `needs` and the `upstream` source it was read against. A listed block that a CPU test executes,
  even one statement of it, is stale; one that names nothing is unresolved: both fail CI.
- dead code is found, not guessed: a function whose name appears nowhere else in the repository
  (code, tests, docs), an `if __name__ == "__main__":` block of a module nothing runs with
  `-m`, or a `[[dead]]` block of the list, each with its `reason` (a reference that is never
  called, e.g. a `json.dumps(default=...)` that never sees its type).
- an `[[untested]]` block (file, scope, match/through/to_end as for [[gpu]]) is code a CPU runs
  but no test can measure, with its `reason` (a `__main__` block that rewrites a committed file,
  say): counted apart from the unexplained rest, and stale, as a [[gpu]] block, once a test runs it.
- the rest: lines a CPU could reach that no test does.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

NEEDS = ("cuda", "nvml", "nccl", "torchao-cuda")  # what a GPU-only block needs
CORPUS_SUFFIXES = {".py", ".md", ".toml", ".sh", ".yml", ".yaml", ".cfg", ".txt"}


@dataclass(frozen=True)
class Listing:
    """One block of the list file."""

    kind: str  # "gpu", "dead" or "untested"
    file: str  # relative to the repository, e.g. "suite/metrics/timing.py"
    scope: str  # "CudaTimer.start"; "" for the module
    match: str | None  # text on the first line of the statements meant; None: the scope's whole body
    why: str  # gpu: "needs; upstream source read"; dead, untested: the reason
    through: str | None = None  # with `match`: a run of statements, to the one whose first line holds this
    to_end: bool = False  # with `match`: a run of statements, to the end of the scope
    reach: str | None = None  # gpu: how a CPU test could run it with the existing fakes, if one could

    def label(self) -> str:
        where = f"{self.file}:{self.scope or '<module>'}"
        end = self.through or ("end" if self.to_end else None)
        span = f"{self.match} .. {end}" if end else self.match
        return f"{where} [{span}]" if span else where


@dataclass(frozen=True)
class Budget:
    """Counts CI allows: more CPU-reachable untested or dead statements than this fail it."""

    untested: int
    dead: int


def load_list(path: Path) -> tuple[list[Listing], Budget]:
    """Read the list file; ValueError naming the entry and field when one is malformed."""
    data = tomllib.loads(path.read_text())
    listings: list[Listing] = []
    for kind, required in (("gpu", ("needs", "upstream")), ("dead", ("reason",)), ("untested", ("reason",))):
        for i, entry in enumerate(data.get(kind, [])):
            where = f"{path.name}: [[{kind}]] #{i + 1} ({entry.get('file', '?')}:{entry.get('scope', '?')})"
            for key in ("file", "scope", *required):
                if not isinstance(entry.get(key), str) or (key != "scope" and not entry[key].strip()):
                    raise ValueError(f"{where}: field '{key}' missing or empty; give it as a string")
            if kind == "gpu" and entry["needs"] not in NEEDS:
                raise ValueError(f"{where}: needs={entry['needs']!r}; use one of {', '.join(NEEDS)}")
            why = f"{entry['needs']}; read against {entry['upstream']}" if kind == "gpu" else entry["reason"]
            for key in ("through", "to_end"):
                if key in entry and "match" not in entry:
                    raise ValueError(f"{where}: '{key}' needs 'match' (where the run of statements starts)")
            span = {k: entry[k] for k in ("through", "to_end", "reach") if k in entry}
            listings.append(Listing(kind, entry["file"], entry["scope"], entry.get("match"), why, **span))
    budget = data.get("budget", {})
    for key in ("untested", "dead"):
        if not isinstance(budget.get(key), int) or budget[key] < 0:
            raise ValueError(f"{path.name}: [budget] {key} missing or negative; give the allowed count")
    return listings, Budget(budget["untested"], budget["dead"])


# ----------------------------------------------------------------------------- blocks in the source


def _lines(stmts: Iterable[ast.stmt]) -> set[int]:
    return {n for s in stmts for n in range(s.lineno, (s.end_lineno or s.lineno) + 1)}


def find_scope(tree: ast.Module, qualname: str) -> ast.AST | None:
    """The class or function `qualname` ("A.b") at any depth of the module, or the module for ""."""
    node: ast.AST = tree
    for part in filter(None, qualname.split(".")):
        body = getattr(node, "body", [])
        found = [n for n in body if isinstance(n, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)]
        node = next((n for n in found if n.name == part), None)  # type: ignore[assignment]
        if node is None:
            return None
    return node


def _body_lines(scope: ast.AST) -> set[int]:
    """What runs when a function is called, or a class's methods are: never the `def` lines (import runs those)."""
    if isinstance(scope, ast.ClassDef):
        methods = [n for n in scope.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
        return set().union(set(), *(_lines(m.body) for m in methods))
    return _lines(scope.body)  # type: ignore[attr-defined]


def _matches(scope: ast.AST, text: str, source: list[str]) -> list[Any]:
    """Outermost statements under `scope` whose first line contains `text`, in source order."""
    kinds = ast.stmt | ast.ExceptHandler  # coverage counts an `except` line as a statement
    hits = [s for s in ast.walk(scope) if isinstance(s, kinds) and s is not scope and text in source[s.lineno - 1]]
    hits.sort(key=lambda s: (s.lineno, -(s.end_lineno or s.lineno)))
    outer: list[Any] = []
    for s in hits:  # a match nested in another match belongs to it
        if not outer or s.lineno > (outer[-1].end_lineno or outer[-1].lineno):
            outer.append(s)
    return outer


def _guarded(s: Any) -> set[int]:
    """An `if`, `for` or `while`: its body only (the test runs on a CPU too, and finds nothing to do)."""
    return _lines(s.body) if isinstance(s, ast.If | ast.For | ast.AsyncFor | ast.While) else _lines([s])


def block_lines(listing: Listing, tree: ast.Module, source: list[str]) -> set[int] | str:
    """The lines a listing names, or why it names none (the list drifted from the code)."""
    scope = find_scope(tree, listing.scope)
    if scope is None:
        return f"no function or class {listing.scope!r} in {listing.file}"
    if listing.match is None:
        return _body_lines(scope)
    found = _matches(scope, listing.match, source)
    if not found:
        return f"no statement whose first line contains {listing.match!r}"
    if listing.to_end:
        return set(range(found[0].lineno, (scope.end_lineno or found[0].lineno) + 1))  # type: ignore[attr-defined]
    if listing.through is None:
        return set().union(*(_guarded(s) for s in found))
    last = [s for s in _matches(scope, listing.through, source) if s.lineno >= found[0].lineno]
    if not last:
        return f"no statement whose first line contains {listing.through!r} after {listing.match!r}"
    return set(range(found[0].lineno, (last[0].end_lineno or last[0].lineno) + 1))


def _functions(tree: ast.Module) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def _is_main_guard(node: ast.stmt) -> bool:
    return (
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and isinstance(node.test.left, ast.Name)
        and node.test.left.id == "__name__"
        and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators)
    )


def found_dead(tree: ast.Module, module: str, rel: str, names: Counter[str], corpus: str) -> dict[int, str]:
    """Lines of functions named nowhere else, and of `__main__` blocks of modules nothing runs; why each."""
    dead: dict[int, str] = {}
    for fn in _functions(tree):
        if not (fn.name.startswith("__") and fn.name.endswith("__")) and names[fn.name] <= 1:
            dead.update(dict.fromkeys(_lines(fn.body), f"{fn.name}: its name appears nowhere else"))
    run = re.compile(rf"-m\s+{re.escape(module)}(?![\w.])|python3?\s+(\./)?{re.escape(rel)}")
    for node in tree.body:
        if _is_main_guard(node) and not run.search(corpus):
            dead.update(dict.fromkeys(_lines(node.body), f"__main__ block: nothing runs `-m {module}`"))  # type: ignore[attr-defined]
    return dead


def read_corpus(root: Path, files: Iterable[Path]) -> tuple[Counter[str], str]:
    """Every identifier-like word of the repository's text files, counted, and their joined text."""
    texts = []
    for path in files:
        if path.suffix in CORPUS_SUFFIXES or path.name == "run":
            try:
                texts.append(path.read_text())
            except (UnicodeDecodeError, OSError):
                continue
    corpus = "\n".join(texts)
    return Counter(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", corpus)), corpus


# ----------------------------------------------------------------------------- sorting


@dataclass(frozen=True)
class FileLines:
    """One measured file: its source, its statement lines and those no process executed."""

    rel: str  # "suite/metrics/timing.py"
    source: str
    statements: frozenset[int]
    missing: frozenset[int]


@dataclass
class Sorted:
    """Each never-run statement in one of gpu / dead / explained / untested, and what is wrong with the list."""

    statements: int = 0
    gpu: dict[str, set[int]] = field(default_factory=dict)
    dead: dict[str, dict[int, str]] = field(default_factory=dict)
    explained: dict[str, set[int]] = field(default_factory=dict)  # listed [[untested]]: no test can run them, why
    untested: dict[str, set[int]] = field(default_factory=dict)  # the unexplained rest, which the budget counts
    reachable: dict[str, set[int]] = field(default_factory=dict)  # GPU-only lines the existing fakes could reach
    problems: list[str] = field(default_factory=list)
    blocks: list[tuple[Listing, set[int]]] = field(default_factory=list)  # each listing, its never-run lines
    trees: dict[str, ast.Module] = field(default_factory=dict)

    def count(self, name: str) -> int:
        return sum(len(v) for v in getattr(self, name).values())

    @property
    def never_run(self) -> int:
        return self.count("gpu") + self.count("dead") + self.count("explained") + self.count("untested")


def sort_lines(files: list[FileLines], listings: list[Listing], names: Counter[str], corpus: str) -> Sorted:
    """Sort each never-run statement; a listing that names nothing, or that a CPU test runs, is a problem."""
    out = Sorted()
    by_file = {f.rel: f for f in files}
    claimed: dict[str, dict[str, set[int]]] = {"gpu": {}, "dead": {}, "untested": {}, "reach": {}}  # file -> lines
    for f in files:
        out.trees[f.rel] = ast.parse(f.source)
    for listing in listings:
        f = by_file.get(listing.file)
        if f is None:
            out.problems.append(f"unresolved [[{listing.kind}]] {listing.label()}: no such measured file")
            continue
        lines = block_lines(listing, out.trees[f.rel], f.source.splitlines())
        if isinstance(lines, str):
            out.problems.append(f"unresolved [[{listing.kind}]] {listing.label()}: {lines}")
            continue
        stmts = lines & f.statements
        ran = sorted(stmts - f.missing)
        if not stmts:
            out.problems.append(f"unresolved [[{listing.kind}]] {listing.label()}: it holds no statement")
        elif ran:
            out.problems.append(
                f"stale [[{listing.kind}]] {listing.label()}: CPU tests run line(s) {ranges(ran)}; narrow or drop it"
            )
        claimed[listing.kind].setdefault(f.rel, set()).update(stmts & f.missing)
        if listing.reach:
            claimed["reach"].setdefault(f.rel, set()).update(stmts & f.missing)
        out.blocks.append((listing, set(stmts & f.missing)))
    for f in files:
        out.statements += len(f.statements)
        module = f.rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        found = found_dead(out.trees[f.rel], module, f.rel, names, corpus)
        listed_gpu, listed_dead = claimed["gpu"].get(f.rel, set()), claimed["dead"].get(f.rel, set())
        for line in sorted(f.missing):
            if line in listed_gpu:
                out.gpu.setdefault(f.rel, set()).add(line)
                if line in claimed["reach"].get(f.rel, set()):
                    out.reachable.setdefault(f.rel, set()).add(line)
            elif line in found or line in listed_dead:
                out.dead.setdefault(f.rel, {})[line] = found.get(line, "listed in [[dead]]")
            elif line in claimed["untested"].get(f.rel, set()):
                out.explained.setdefault(f.rel, set()).add(line)
            else:
                out.untested.setdefault(f.rel, set()).add(line)
    return out


def check_budget(out: Sorted, budget: Budget) -> list[str]:
    """A problem for each count over its budget."""
    allowed = {"untested": budget.untested, "dead": budget.dead}
    return [
        f"{out.count(name)} {name} statements, over the budget of {limit}"
        for name, limit in allowed.items()
        if out.count(name) > limit
    ]


def ranges(lines: Iterable[int]) -> str:
    """[3, 4, 5, 9] -> "3-5, 9"."""
    spans: list[list[int]] = []
    for n in sorted(lines):
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)

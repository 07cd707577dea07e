"""README.md and docs/ stay runnable: every `mpbench SUB --flag` they show exists, every relative link resolves.

The commands are read from fenced code blocks and inline code, and checked against the argparse parser of
`suite/cli/main.py` in-process (no subprocess): a renamed flag or subcommand fails here, not in a reader's shell.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from suite.cli.main import build_parser
from suite.cli.run import RUN_DEFAULTS

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`]+)`")
# `mpbench SUB` and its module form (`python -m suite.cli SUB`, torchrun's `-m suite.cli SUB`)
COMMAND = re.compile(r"(?:(?<![\w/.-])mpbench|-m suite\.cli)[ \t]+([a-z][a-z0-9-]*)")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# where one shell command ends and the next (or a comment) begins
COMMAND_END = re.compile(r"&&|\|\||;|\s\|\s|\s#\s|\s2?>\s?\S|(?<![\w/.-])mpbench\s|-m suite\.cli\s")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)


def code_chunks(text: str) -> list[str]:
    """Logical lines of fenced blocks (joined across `\\` and `[--flag]` continuations) and inline code spans."""
    chunks: list[str] = []
    for block in FENCE.findall(text):
        lines: list[str] = []
        for line in block.splitlines():
            # a usage synopsis continues on lines that start with `[`; a shell line ends in `\`
            if lines and (line.lstrip().startswith("[") or lines[-1].endswith("\\")):
                lines[-1] = lines[-1].rstrip("\\") + " " + line.strip()
            else:
                lines.append(line)
        chunks += lines
    chunks += INLINE.findall(FENCE.sub("", text))
    return chunks


def shown_commands(text: str) -> list[tuple[str, list[str]]]:
    """(subcommand, flags) of every `mpbench SUB ...` the text shows in code."""
    found = []
    for chunk in code_chunks(text):
        # `[--nproc N | --scaling 1,2,4]`: a choice inside a synopsis's brackets, not a shell pipe
        chunk = re.sub(r"\[[^\]]*\]", lambda m: m.group(0).replace(" | ", " "), chunk)
        for m in COMMAND.finditer(chunk):
            rest = chunk[m.end() :]
            end = COMMAND_END.search(rest)
            found.append((m.group(1), FLAG.findall(rest[: end.start()] if end else rest)))
    return found


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The `mpbench` subcommands by name."""
    return next(a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def command_problems(text: str, where: str) -> list[str]:
    """One line per shown subcommand that does not exist or flag that its `--help` lacks."""
    subs = subparsers(build_parser())
    problems = []
    for sub, flags in shown_commands(text):
        if sub not in subs:
            problems.append(f"{where}: `mpbench {sub}`: no such subcommand (have {', '.join(subs)})")
            continue
        known = subs[sub]._option_string_actions
        missing = [flag for flag in flags if flag not in known]
        problems += [f"{where}: `mpbench {sub} {flag}`: not in `mpbench {sub} --help`" for flag in missing]
    return problems


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def link_problems(path: Path) -> list[str]:
    """One line per relative link of a Markdown file whose file (or heading anchor) does not exist."""
    problems = []
    where = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
    text = FENCE.sub("", path.read_text())
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            problems.append(f"{where}: link {target!r}: {file} does not exist")
        elif anchor and dest.suffix == ".md":
            anchors = {slug(h) for h in HEADING.findall(FENCE.sub("", dest.read_text()))}
            if anchor not in anchors:
                name = file or path.name
                problems.append(f"{where}: link {target!r}: no heading #{anchor} in {name}")
    return problems


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_mpbench_command_shown_parses(path):
    assert command_problems(path.read_text(), str(path.relative_to(REPO))) == []


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path):
    assert link_problems(path) == []


def test_the_docs_show_commands_at_all():
    """The parser of the docs finds what the README shows: the main job, report, and a flag in a synopsis."""
    shown = [c for p in DOCS for c in shown_commands(p.read_text())]
    assert ("run", []) in shown and any(sub == "report" and "--out" in flags for sub, flags in shown)
    assert any(sub == "run" and "--retry-failed" in flags for sub, flags in shown)  # a continued synopsis line
    assert len(shown) > 50


def test_a_planted_bad_flag_subcommand_or_link_is_reported(tmp_path):
    text = (
        "```bash\nmpbench run --device cpu \\\n  --no-such-flag 3 && mpbench report r.jsonl --out x  # --not-checked\n"
        "mpbench run [--steps N | --nproc N]\n            [--bogus-synopsis N]\n```\n"
        "Then `mpbench frobnicate --x` and `python -m suite.cli check r.jsonl --tolerance bf16=1 --wrong`.\n"
    )
    problems = command_problems(text, "planted")
    assert [p.split(": ", 1)[1].split(":")[0] for p in problems] == [
        "`mpbench run --no-such-flag`",  # a flag on a `\` continuation line
        "`mpbench run --bogus-synopsis`",  # a flag on a synopsis continuation line
        "`mpbench frobnicate`",
        "`mpbench check --wrong`",  # the module form
    ]  # `--out` and `--tolerance` are real; `--not-checked` is in a comment
    (tmp_path / "modes.md").write_text((REPO / "docs" / "modes.md").read_text())
    page = tmp_path / "planted.md"
    page.write_text("[a](modes.md) [b](nowhere.md) [c](modes.md#no-such-heading) [d](modes.md#models) [e](#a)\n# A\n")
    assert [p.split(": ", 1)[1] for p in link_problems(page)] == [
        "link 'nowhere.md': nowhere.md does not exist",
        "link 'modes.md#no-such-heading': no heading #no-such-heading in modes.md",
    ]


def test_the_readme_links_every_docs_file():
    readme = (REPO / "README.md").read_text()
    linked = {t.partition("#")[0] for t in LINK.findall(readme)}
    assert [p.name for p in DOCS[1:] if f"docs/{p.name}" not in linked] == []


def test_benchmark_options_shown_exist():
    """`pytest benchmarks/ --mpbench-X` options the docs show are ones benchmarks/conftest.py adds."""
    conftest = (REPO / "benchmarks" / "conftest.py").read_text()
    shown = {f for p in DOCS for f in re.findall(r"--mpbench-[a-z-]+", p.read_text())}
    assert shown and sorted(f for f in shown if f'"{f}"' not in conftest) == []


@pytest.mark.parametrize("key,flag", [("batch_size", "--batch-size"), ("seq_len", "--seq-len"),
                                      ("steps", "--steps"), ("warmup", "--warmup")])  # fmt: skip
def test_run_help_states_every_default_size(key, flag):
    """`mpbench run --help` names each default the run can pick: a CPU's depend on its native bf16/fp16."""
    run = subparsers(build_parser())["run"]
    text = next(a.help for a in run._actions if flag in a.option_strings)
    assert all(str(d[key]) in re.findall(r"\d+", text) for d in RUN_DEFAULTS.values()), text


def test_every_flag_of_every_subcommand_is_shown():
    """The reverse: a flag added to the parser gets a line in the docs (the synopsis in docs/running.md at least)."""
    shown: dict[str, set[str]] = {}
    for path in DOCS:
        for sub, flags in shown_commands(path.read_text()):
            shown.setdefault(sub, set()).update(flags)
    missing = [
        f"mpbench {name} {flag}"
        for name, sub in subparsers(build_parser()).items()
        for flag in sub._option_string_actions
        if flag.startswith("--") and flag != "--help" and flag not in shown.get(name, set())
    ]
    assert missing == []

"""Where commands write: never over a file they read, never into a file of another kind.

Each check runs before any work and raises ValueError with one line naming the path and the
fix, which the command line turns into exit code 2.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from suite.records import store
from suite.text import log_to_stderr

# how `append` starts every line: a torn line with this start is a record cut short, not foreign text
RECORD_START = b'{"schema": "' + store.SCHEMA.encode() + b'"'


def check_records_out(path: str | Path, log: Callable[[str], None] = log_to_stderr) -> Path:
    """`path` can take appended records: absent, empty, a records file, or not a regular file
    (/dev/null). A last line cut short by a write that never finished is cut off (it is no
    record); a complete last record without its newline gets one. ValueError otherwise."""
    path = store.check_writable(path)
    if not path.is_file():
        return path
    raw = path.read_bytes()
    cut = raw.rfind(b"\n") + 1  # the end of the last complete line
    fix = "--out appends records only to a records file or an empty one: choose another --out"
    try:
        for _ in store.parse(io.BytesIO(raw[:cut]), path):
            pass
    except store.BadRecord:
        raise
    except ValueError as exc:  # not records at all
        raise ValueError(f"{exc}; {fix}") from None
    tail, number = raw[cut:], raw.count(b"\n") + 1
    if not tail:
        return path
    try:
        json.loads(tail)
    except ValueError:  # JSON cut short (or cut inside a UTF-8 character)
        if tail.startswith(RECORD_START):
            os.truncate(path, cut)
            log(f"mpbench: {path}: line {number} was a record cut short ({len(tail)} bytes of a write that "
                "never finished); cut it off: its case has no record, and --resume runs it")  # fmt: skip
            return path
    try:
        next(store.parse([tail], path, start=number))
    except store.BadRecord:
        raise
    except ValueError as exc:
        raise ValueError(f"{exc}; {fix}") from None
    with open(path, "ab") as f:  # a whole record, only its newline missing: keep it
        f.write(b"\n")
    return path


def check_replaced(path: str | Path, kind: str, keys: tuple[str, ...], inputs: Iterable[str | Path] = ()) -> Path:
    """`path` may be replaced by a JSON `kind` file: not one of the `inputs`, and absent, empty or
    already a JSON object with `keys`. ValueError otherwise."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"out={str(path)!r} is a folder; give the {kind} file's path as --out")
    if not path.is_file() or not path.stat().st_size:
        return path
    _check_not_input(path, inputs)
    try:
        found = json.loads(path.read_bytes())
    except (OSError, ValueError):
        found = None
    if not isinstance(found, dict) or not set(keys) <= found.keys():
        raise ValueError(
            f"out={str(path)!r} exists and is not a {kind} file; mpbench replaces only a {kind} file or an "
            "empty one: choose another --out"
        )
    return path


def check_folder(path: str | Path, inputs: Iterable[str | Path], writes: Callable[[str], bool]) -> Path:
    """`path` is a folder this process can write into (made if absent), holding none of the
    `inputs` under a name the command writes (`writes(name)`). ValueError otherwise."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"out={str(path)!r} is a file; the output is a folder: choose another --out")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"out={str(path)!r}: cannot write there ({exc.strerror}); choose another --out") from None
    for item in inputs:
        if writes(Path(item).name) and Path(item).is_file() and os.path.samefile(Path(item).parent, path):
            raise ValueError(
                f"out={str(path)!r} holds an input ({item}) that the output would replace: choose another --out"
            )
    return path


def _check_not_input(path: Path, inputs: Iterable[str | Path]) -> None:
    for item in inputs:
        if Path(item).is_file() and os.path.samefile(path, item):
            raise ValueError(
                f"out={str(path)!r} is also an input ({item}); writing it would replace what was read: "
                "choose another --out"
            )

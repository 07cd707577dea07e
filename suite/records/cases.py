"""What makes two records the same case, the latest record of each, and the lock on a records file.

One key serves `--resume` (which cases a file already has), `mpbench compare` (which cases of A
and B are alike) and the readers that keep one record per case of a run (a retried case leaves its
earlier record in the file: the latest wins).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from suite.policy import FP4_ALLOWED, default_keep_high, legacy_keep_high, resolve_fp4_recipe

# Every setting that changes what a case measures. A data file is keyed by its content
# (`data_sha256`), so `d.txt`, `./d.txt` and its absolute path are one case, and an edited
# file is another; records written before the digest existed fall back to the path as given.
CASE_KEY = ("model", "mode", "device", "batch_size", "seq_len", "steps", "warmup", "seed", "compile", "data",
            "lr", "lr_schedule", "lr_warmup_steps", "lr_floor", "weight_decay", "eval_batches", "eval_every",
            "numerics_every", "world_size", "grad_comm", "parallel", "vocab_multiple", "repeat",
            "keep_high", "fp4_recipe")  # fmt: skip
# Records written before the schedule existed trained at a constant rate: read as such, they stay one
# case with a constant-rate record written today.
CONSTANT_RATE = {"lr_schedule": "constant", "lr_warmup_steps": 0, "lr_floor": 1.0}
# Settings added later, as a record written before them ran: none sampled (--numerics), the vocabulary
# unpadded, not a repeat of the energy protocol.
UNSET = {"numerics_every": 0, "vocab_multiple": 1, "repeat": 0, "fp4_recipe": ""}


def _value(values: dict[str, Any], field: str) -> Any:
    if field == "data":
        return values.get("data_sha256") or values.get("data")
    if field in CONSTANT_RATE and values.get("lr_schedule") is None:
        return CONSTANT_RATE[field]
    if field in UNSET and values.get(field) is None:  # written before the setting existed
        return UNSET[field]
    if field == "keep_high" and values.get(field) is None:  # before layer policies: the mode's default then
        return legacy_keep_high(values.get("mode"))
    return values.get(field)


def case_key(values: dict[str, Any]) -> tuple:
    """The case of a record (or of a case's record fields), as a hashable tuple in CASE_KEY order."""
    return tuple(_value(values, k) for k in CASE_KEY)


_MODE, _SEED = CASE_KEY.index("mode"), CASE_KEY.index("seed")
# What only a mode has (its layer policy, its 4-bit recipe): the fp32 reference of every policy is one record
_KEEP, _RECIPE = CASE_KEY.index("keep_high"), CASE_KEY.index("fp4_recipe")
_OF_MODE = {_MODE, _KEEP, _RECIPE}


def alike(key: tuple) -> tuple:
    """A case key without its mode and seed: the cases whose seeds are pooled into one verdict. A mode's own
    settings (layer policy, 4-bit recipe) count only where they are not the mode's defaults: a default case sits
    with fp32 (which has none), and each other policy of a mode is a set of its own, paired through its deltas."""
    mode, model = key[_MODE], key[CASE_KEY.index("model")]
    values = list(key)
    if values[_KEEP] == default_keep_high(mode, model):
        values[_KEEP] = ""
    if mode in FP4_ALLOWED and values[_RECIPE] == resolve_fp4_recipe(mode, ""):
        values[_RECIPE] = ""
    return tuple(v for i, v in enumerate(values) if i not in (_MODE, _SEED))


def pair_key(record: dict[str, Any]) -> tuple:
    """A record's case key without its mode and what only the mode has (its layer policy and 4-bit recipe, "" for
    fp32): its fp32 reference (same seed, same every other setting) has the same one. Pairing by anything looser
    pairs a mode with an fp32 trained otherwise."""
    return tuple(v for i, v in enumerate(case_key(record)) if i not in _OF_MODE)


def machine(record: dict[str, Any]) -> str | None:
    """The hardware a record was measured on (its GPU, else its CPU): records of two machines are never paired,
    even when their case keys agree (the key's device is only "cuda:0" or "cpu")."""
    return record.get("gpu_name") or record.get("cpu")


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The settings of CASE_KEY where two records differ, as "field A-value vs B-value"."""
    out = []
    for k in CASE_KEY:
        if _value(a, k) == _value(b, k):
            continue
        if k == "data" and a.get("data") == b.get("data"):  # one path, other bytes: the file was edited
            digests = f"sha256 {a.get('data_sha256')} vs {b.get('data_sha256')}"
            out.append(f"data {a.get('data')} with other content ({digests})")
        else:
            shown = _value if k in CONSTANT_RATE else dict.get  # an old record's rate: "constant", not None
            out.append(f"{k} {shown(a, k)} vs {shown(b, k)}")
    return out


def latest(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (run, case): the last written, in the order the cases first appeared.

    A case retried with `--resume --retry-failed` keeps its earlier record in the file (nothing
    recorded is ever rewritten); readers that show a run take the retry's.
    """
    out: dict[tuple, dict[str, Any]] = {}
    for r in records:
        out[(r.get("run_id"), case_key(r))] = r
    return list(out.values())


def latest_per_case(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (case, machine): the last written, whatever run wrote it (a case resumed or retried in
    another run counts once, with its latest figures), in the order the cases first appeared."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in records:
        out[(*case_key(r), machine(r))] = r
    return list(out.values())


def outcomes(records: Iterable[dict[str, Any]]) -> str:
    """Each record's model/mode and status, comma-separated: which cases a message is about."""
    return ", ".join(f"{r.get('model')}/{r.get('mode')} {r.get('status')}" for r in records)


@contextlib.contextmanager
def locked(path: str | Path, exclusive: bool) -> Iterator[None]:
    """Hold an advisory lock on a records file while a run writes to it; ValueError if another holds it.

    A resumed run reads the file to decide what to run, so it needs the file to itself (exclusive);
    plain runs may share a file (shared), since each line is appended whole. The lock is on this
    process's own descriptor (not inherited by workers) and ends with the process, however it ends.
    """
    import fcntl  # POSIX, as the runner is; imported here so that the readers import anywhere

    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            what = "resume" if exclusive else "out"
            raise ValueError(
                f"{what}={str(path)!r}: another mpbench run is writing to this file; wait for it to end"
                + (", then resume" if exclusive else ", or choose another --out")
            ) from None
        yield
    finally:
        os.close(fd)

"""Known harmless messages of dependencies, silenced precisely: by where they come from and their text.

Each entry names the logger (or, for a Python warning, the module) that emits the message,
a pattern its text must match and why it is harmless. Anything else passes untouched: no
logger's level is changed and no warning category is ignored wholesale. Called first by every
process that trains (the `mpbench` command, each case's worker, each torchrun rank).
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Known:
    """One harmless message: where it comes from, what it says, and why it can be dropped."""

    source: str  # the logger's name (kind "log"), or a regex of the warning module's name (kind "warning")
    message: str  # regex: searched in a log record's text; matched from the start of a warning's (as `warnings` does)
    why: str
    kind: str = "log"  # "log": a logging record; "warning": warnings.warn
    package: str | None = None  # log only: a class among the record's arguments must come from this package

    def matches(self, record: logging.LogRecord) -> bool:
        """True for a log record of this message (and, with `package`, about a class of that package)."""
        if record.name != self.source or not re.search(self.message, record.getMessage()):
            return False
        args = record.args if isinstance(record.args, tuple) else ()
        return self.package is None or any(
            isinstance(a, type) and (a.__module__ + ".").startswith(self.package + ".") for a in args
        )


KNOWN: tuple[Known, ...] = (
    Known(
        source="torch.utils._pytree",
        message=r"is an Enum subclass and is now natively supported by torch\.compile as an opaque value type\. "
        r"Calling register_constant\(\) on Enum subclasses is deprecated",
        why="torchao 0.18 registers its enums (KernelPreference, ScaleCalculationMode) as pytree constants on "
        "import; torch 2.13 asks it to stop. Nothing of ours can act on it, and it prints once per process",
        package="torchao",
    ),
)


class _Drop(logging.Filter):
    """A logger filter that drops the records of one known message and passes all others."""

    def __init__(self, known: Known) -> None:
        super().__init__()
        self.known = known

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.known.matches(record)


_FILTERS = {k: _Drop(k) for k in KNOWN if k.kind == "log"}  # one each: adding it twice is a no-op


def quiet_dependencies(known: tuple[Known, ...] = KNOWN) -> None:
    """Install the filters of the known harmless messages in this process (idempotent)."""
    for k in known:
        if k.kind == "warning":
            warnings.filterwarnings("ignore", message=k.message, module=k.source)
        else:
            logging.getLogger(k.source).addFilter(_FILTERS.get(k) or _FILTERS.setdefault(k, _Drop(k)))

"""mpbench's harness: cases, precision modes, the train loop, records.

Scripting API: `run_cases([Case(mode="bf16"), ...], out="r.jsonl")` returns the records.
Both are imported when first asked for, so that `mpbench`'s entry point (`suite.cli.entry`) starts
without torch and can guard that import against a Ctrl-C.
"""

from typing import Any

__all__ = ["Case", "run_cases"]


def __getattr__(name: str) -> Any:
    if name == "run_cases":
        from suite.running.runner import run_cases

        return run_cases
    if name == "Case":
        from suite.training.case import Case

        return Case
    raise AttributeError(f"module 'suite' has no attribute {name!r}")

"""mpbench's harness: cases, precision modes, the train loop, records.

Scripting API: `run_cases([Case(mode="bf16"), ...], out="r.jsonl")` returns the records.
"""

from suite.case import Case
from suite.runner import run_cases

__all__ = ["Case", "run_cases"]

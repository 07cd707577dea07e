"""mpbench's harness: cases, precision modes, the train loop, records.

Scripting API: `run_cases([Case(mode="bf16"), ...], out="r.jsonl")` returns the records.
"""

from suite.running.runner import run_cases
from suite.training.case import Case

__all__ = ["Case", "run_cases"]

"""Is a record's step time steady enough to support a speed-up? One threshold, shared by every view.

The p10-p90 spread of the timed steps, as a fraction of their median, is the run's own noise. A
speed-up is a ratio of two medians; when the middle 80% of one run's steps spans more than
NOISY_SPREAD of its median, that spread is as large as the gains the modes are expected to give
(fp8 over bf16: +3% to +25%, FACTS.md), so the ratio may be noise. The console summary marks such
a figure `~`; the HTML report imports the same constant and function.

Reads the record only (a dict as stored), like `checks`: the reporting layer may import it.
"""

from __future__ import annotations

import math
from typing import Any

# p10-p90 spread over this fraction of the median step time: the speed-up is not supported
NOISY_SPREAD = 0.20


def step_spread(record: dict[str, Any]) -> float | None:
    """(p90 - p10) / median of the step time, or None when a figure is missing or not positive."""
    lo, med, hi = (record.get(k) for k in ("step_time_p10_ms", "step_time_ms", "step_time_p90_ms"))
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in (lo, med, hi)):
        return None  # a skipped or failed case, or a 'nan' read back from the store
    if med <= 0:
        return None
    return (hi - lo) / med


def noisy_step(record: dict[str, Any]) -> float | None:
    """The spread fraction when it is over NOISY_SPREAD (the step time is too noisy for a speed-up),
    else None."""
    spread = step_spread(record)
    return spread if spread is not None and spread > NOISY_SPREAD else None

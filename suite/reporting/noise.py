"""Step times too spread to support a speed-up: p10-p90 wider than NOISY_SPREAD of the median.

A speed-up is a ratio of two medians; when the steps of either case spread over a fifth of
their median (a shared or throttling machine), the ratio can move by as much between runs.
The report keeps such figures and marks them "(noisy)" with the spread as the reason.
"""

from __future__ import annotations

from typing import Any

NOISY_SPREAD = 0.20  # step time p10-p90 wider than this share of its median: too noisy to support a speed-up
NOISY = "noisy"


def step_spread(r: dict[str, Any]) -> float | None:
    """(p10 - p90 width) / median step time; None where a percentile or the median is missing."""
    lo, med, hi = (r.get(k) for k in ("step_time_p10_ms", "step_time_ms", "step_time_p90_ms"))
    if not all(isinstance(v, int | float) for v in (lo, med, hi)) or med <= 0:
        return None
    return (hi - lo) / med


def noisy_step(r: dict[str, Any]) -> bool:
    """Whether a record's step times spread too widely (p10-p90 over NOISY_SPREAD of the median) for a speed-up."""
    spread = step_spread(r)
    return spread is not None and spread > NOISY_SPREAD


def noisy_note(r: dict[str, Any], ref: dict[str, Any] | None = None) -> str | None:
    """Why a step time (and, given fp32's record `ref`, a speed-up against it) is too noisy; None if it is not."""
    spreads = [f"{who} {step_spread(x):.0%}" for who, x in (("this mode", r), ("fp32", ref)) if x and noisy_step(x)]
    if not spreads:
        return None
    return (f"{NOISY}: step time p10-p90 over {NOISY_SPREAD:.0%} of the median ({', '.join(spreads)}): too "
            "spread to support a speed-up; rerun with more steps on a quiet machine")  # fmt: skip

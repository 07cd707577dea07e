"""The convergence tolerances, derived from a measured multi-seed run rather than chosen.

Rule, per mode, from its paired deltas vs fp32 over n seeds (suite/reporting/seeds.py):

    bound = ci_high + MARGIN_SD x sd, rounded up to STEP, at least MIN_BOUND

- `ci_high` (the upper end of the 95% Student t interval of the mean delta) makes the measured mode
  pass on the machine that measured it: its whole interval lies under the bound.
- `MARGIN_SD` standard deviations of seed noise above it leave room for what another machine's
  kernels (AVX2 vs AVX-512, another torch) move, without a retune.
- It stays tight: a planted +0.05-nat shift fails whenever 2 x the interval's half-width plus the
  margin stay under 0.05 nats, which tests/test_tolerances.py checks on the committed measurement.

Re-measure (docs/convergence-and-fidelity.md, "Tolerances"): `bash ci/measure-tolerances.sh`, then
`python -m suite.reporting.tolerances RECORDS` prints the table to paste into convergence.MEASURED.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from suite.reporting import seeds
from suite.reporting.convergence import REFERENCE, TOLERANCES, measured_as

MARGIN_SD = 2.0
STEP = 0.005  # nats/token: bounds are read by people; a finer step would pretend to a precision we lack
# The smallest bound set: the modes that match fp32 on tiny differ from it by ~1e-4 nats with a spread of
# the same order, so their measured bound would be a few 1e-4; but other machines' kernels and the GPU's
# gpt2-small (not yet measured: no GPU was lent) move more. 0.01 still fails a 0.05-nat regression.
MIN_BOUND = 0.01
MIN_SEEDS = 3  # fewer gives an interval too wide to set a bound from


@dataclass(frozen=True)
class Derived:
    mode: str
    config: tuple[str, str, int, str]  # convergence.measured_as: model, device type, steps, schedule
    n: int
    mean: float
    sd: float
    ci_high: float
    bound: float


def derive(records: Iterable[dict[str, Any]]) -> list[Derived]:
    """One derived bound per (configuration, mode) judged over MIN_SEEDS seeds or more; fp32 is the reference.
    Records of several sizes of one configuration (batch 8 x 64 and 8 x 128) give a mode the widest bound."""
    by_config: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        by_config.setdefault(measured_as(r), []).append(r)
    widest: dict[tuple, Derived] = {}
    for config, members in by_config.items():
        for d in _derived(config, members):
            if (config, d.mode) not in widest or d.bound > widest[(config, d.mode)].bound:
                widest[(config, d.mode)] = d
    return list(widest.values())


def _derived(config: tuple, records: list[dict[str, Any]]) -> list[Derived]:
    out = []
    for v in seeds.judge(records, TOLERANCES):
        d = v.delta
        if v.mode == REFERENCE or d.n < MIN_SEEDS or d.ci_high is None or d.sd is None or d.mean is None:
            continue
        raw = max(MIN_BOUND, d.ci_high + MARGIN_SD * d.sd)
        bound = math.ceil(round(raw / STEP, 9)) * STEP
        out.append(Derived(v.mode, config, d.n, d.mean, d.sd, d.ci_high, round(bound, 6)))
    return out


def table(derived: list[Derived]) -> str:
    """The derived bounds as a Markdown table, with the figures each was set from and the bound in use now."""
    lines = [
        "| mode | model, device, steps, schedule | seeds | mean delta | sd | 95% upper | bound | now |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in derived:
        now = TOLERANCES.get((d.config, d.mode)) or TOLERANCES.get(d.mode)
        lines.append(
            f"| `{d.mode}` | {', '.join(str(c) for c in d.config)} | {d.n} | {d.mean:+.4f} | {d.sd:.4f} "
            f"| {d.ci_high:+.4f} | {d.bound:.3f} | {f'{now.max_delta:.3f}' if now else '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from suite.records import store

    parser = argparse.ArgumentParser(prog="python -m suite.reporting.tolerances", description=__doc__.split("\n")[0])
    parser.add_argument("records", nargs="+", help="JSON Lines records of a multi-seed run (--seeds 5 or more)")
    args = parser.parse_args(argv)
    derived = derive(store.read_all(args.records))
    if not derived:
        where = ", ".join(args.records)
        print(f"no mode has {MIN_SEEDS}+ paired seeds in {where}: run with --seeds 5 or more", file=sys.stderr)
        return 1
    print(table(derived))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`mpbench compare`'s numerics rows: a tensor whose SQNR fell by more than DROP_DB from A to B.

Both matched records must carry the same field (`numerics`, or `numerics_whatif`). The step compared is the
last one both sampled (numerics_table.drops): the same batch after as many updates, the step the summary and
the report's heatmap show, so a line here points at a picture. The verdict is "changed": shown with its
figures, never a failed gate (a format that loses more is a cause to look at, say after a torch or torchao
upgrade changed a scaling recipe; whether it costs loss is the loss's own verdict).
"""

from __future__ import annotations

from typing import Any

from suite.reporting import numerics_table as nt
from suite.reporting.compare import Comparison

CHANGED = "changed"
SHOWN = 3  # drops listed per mode and field; the first line counts them all
LABEL = {"numerics": "sqnr_db", "numerics_whatif": "what-if sqnr_db"}


def rows(ra: dict[str, Any], rb: dict[str, Any]) -> list[Comparison]:
    """The worst SQNR drops of the case, per field both records have; [] when none dropped beyond the bound."""
    model, mode = ra.get("model"), ra.get("mode")
    out = []
    for field, label in LABEL.items():
        a, _ = nt.read(ra, field)  # a field that cannot be read is named by the report, not judged here
        b, _ = nt.read(rb, field)
        if not (a and b):
            continue
        found, step = nt.drops(a, b)
        if step is None:
            message = f"{model}/{mode} {label}: A and B sampled no step in common: not compared"
            out.append(Comparison(model, mode, label, None, None, None, None, "info", message))
            continue
        for i, d in enumerate(found[:SHOWN]):
            count = f"; {len(found)} tensor(s) fell more than {nt.DROP_DB:g} dB, the worst shown" if i == 0 else ""
            metric = f"{label} {d.b.layer} {d.b.role} {d.b.format}"
            message = (
                f"{model}/{mode} {metric} at step {step}: {d.a.sqnr_db:.1f} -> {nt.sqnr_text(d.b)}, down "
                f"{d.db:.1f} dB (bound {nt.DROP_DB:g} dB){count}: {CHANGED}"
            )
            allowed = d.a.sqnr_db - nt.DROP_DB  # the lowest B that is no change (inf for an exact A)
            out.append(Comparison(model, mode, metric, d.a.sqnr_db, d.b.sqnr_db, None, allowed, CHANGED, message))
    return out

"""Loss curves per mode as a PNG (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: works on headless CI runners
import matplotlib.pyplot as plt  # noqa: E402


def plot_loss_curves(records: Sequence[dict[str, Any]], path: str | Path, title: str | None = None) -> Path:
    """Two panels: training loss per step (held-out points, the loss floor), and below it each
    mode's training loss minus fp32's at the same step, where precision effects are visible."""
    fig, (ax, diff) = plt.subplots(2, 1, figsize=(8, 7), dpi=120, sharex=True, height_ratios=(3, 2))
    curves = [r for r in records if r.get("loss_curve")]
    fp32 = next((r for r in curves if r["mode"] == "fp32"), None)
    for r in curves:
        label = r["mode"] if r["status"] == "ok" else f"{r['mode']} ({r['status']})"
        losses = r["loss_curve"]  # a NaN is a gap in the line
        steps = range(1, len(losses) + 1)
        (line,) = ax.plot(steps, losses, label=label, lw=1.2)
        for step, loss in r.get("eval_curve") or []:
            ax.plot(step, loss, "o", color=line.get_color(), ms=4)
        if fp32 is not None and r is not fp32:
            ref = fp32["loss_curve"]
            diff.plot(steps, [a - b for a, b in zip(losses, ref, strict=False)], color=line.get_color(), lw=1)
    for floor in {r["loss_floor"] for r in curves if r.get("loss_floor") is not None}:
        ax.axhline(floor, color="black", ls="--", lw=1, label=f"loss floor {floor:.3f}")
    if curves:
        c = curves[0]
        ax.set_title(title or f"{c['model']}, batch {c['batch_size']} x {c['seq_len']}, seed {c['seed']}")
    ax.set_ylabel("loss (nats/token)\ndots: held-out, fp32 eval")
    diff.axhline(0, color="black", lw=0.8)
    diff.set_ylabel("loss - fp32 loss" if fp32 else "no fp32 in these records")
    diff.set_xlabel("step")
    for a in (ax, diff):
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path

"""What a GPU buys: tokens per dollar and per kJ, time and cost to a target loss, memory headroom.

Prices are the buyer's own (USD per GPU-hour, `H100=2.99,A100=1.29`); nothing here guesses a
price or a figure that was not measured: each missing value is None and the `notes` column of
the table says why.
"""

from __future__ import annotations

import html
import math
import re
from typing import TYPE_CHECKING, Any

from suite.metrics.peaks import canonical_gpu
from suite.reporting import energy
from suite.reporting.convergence import time_to_loss  # one time-to-loss for procurement and the seeds' verdicts

if TYPE_CHECKING:
    import pandas

CPU_REASON = "CPU run: no GPU price applies"
COLUMNS = (
    "gpu", "mode", "model", "tokens_per_s", "price_per_hour", "tokens_per_dollar", "tokens_per_kj",
    "energy_spread", "start_temperature_c", "energy_protocol", "time_to_target_s", "cost_to_target_usd",
    "gpu_memory_mb", "peak_mem_mb", "memory_headroom_mb",
    "max_batch", "notes",
)  # fmt: skip
PROCUREMENT_HEADERS = {
    "gpu": "GPU", "mode": "mode", "model": "model", "tokens_per_s": "tokens/s",
    "price_per_hour": "price (USD/GPU-h)", "tokens_per_dollar": "tokens per USD", "tokens_per_kj": "tokens per kJ",
    "energy_spread": "energy spread", "start_temperature_c": "start temp. (C)", "energy_protocol": "energy protocol",
    "time_to_target_s": "time to target (s)", "cost_to_target_usd": "cost to target (USD)",
    "gpu_memory_mb": "GPU memory (MiB)", "peak_mem_mb": "peak memory (MiB)",
    "memory_headroom_mb": "memory headroom (MiB)", "max_batch": "max batch", "notes": "notes",
}  # fmt: skip


def _tokens(name: str) -> tuple[str, ...]:
    """Lower-case alphanumeric words: "NVIDIA A100-SXM4-80GB" -> (nvidia, a100, sxm4, 80gb)."""
    return tuple(re.findall(r"[a-z0-9]+", name.casefold()))


def parse_prices(text: str) -> dict[str, float]:
    """'H100=2.99,A100=1.29' (USD per GPU-hour) -> {"H100": 2.99, "A100": 1.29}."""
    prices: dict[str, float] = {}
    seen: dict[tuple[str, ...], str] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(f"price={item!r}: expected GPU=USD_PER_GPU_HOUR, e.g. H100=2.99")
        if not _tokens(name):
            raise ValueError(f"price={item!r}: the GPU name is empty; write it before '=', e.g. H100=2.99")
        try:
            price = float(value)
        except ValueError:
            raise ValueError(f"price={item!r}: {value!r} is not a number of USD per GPU-hour; e.g. H100=2.99") from None
        if not (math.isfinite(price) and price > 0):
            raise ValueError(f"price={item!r}: {value!r} must be a positive USD per GPU-hour; e.g. H100=2.99")
        key = _tokens(name)
        if key in seen:  # "h100" and "H100" would match the same GPUs
            raise ValueError(
                f"price={item!r}: {name!r} is priced twice (also as {seen[key]!r}); give each GPU one price"
            )
        seen[key] = name
        prices[name] = price
    return prices


def _contains(words: tuple[str, ...], key: tuple[str, ...]) -> bool:
    """True if `key` occurs in `words` as whole consecutive words ("a100" is not in "a1000")."""
    return any(words[i : i + len(key)] == key for i in range(len(words) - len(key) + 1))


def price_for(
    gpu_name: str | None, prices: dict[str, float], memory_mb: float | None = None
) -> tuple[float | None, str | None]:
    """(price, None) for the most specific key found in the GPU's name or peak-table key, else (None, reason)."""
    if not gpu_name:
        return None, CPU_REASON
    names = [_tokens(gpu_name)]
    canonical = canonical_gpu(gpu_name, memory_mb)
    if canonical:
        names.append(_tokens(canonical))  # "A100" prices "A100-SXM4-80GB"; "H100 SXM" prices "H100 80GB HBM3"
    matches = [k for k in prices if _tokens(k) and any(_contains(words, _tokens(k)) for words in names)]
    if not matches:
        priced = ", ".join(prices) or "none"
        return None, f"no price for {gpu_name} (priced: {priced})"
    best = max(len(_tokens(k)) for k in matches)  # more words = more specific: "H100 NVL" beats "H100"
    top = [k for k in matches if len(_tokens(k)) == best]
    if len(top) > 1:
        return None, f"ambiguous price for {gpu_name}: {' and '.join(top)} match equally; make one key more specific"
    return prices[top[0]], None


def records_of(df: pandas.DataFrame) -> list[dict[str, Any]]:
    """Rows of a `results.load` frame as records again: pandas' NaN for a missing figure back to None."""
    return [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for row in df.to_dict(orient="records")
    ]


def _row(r: dict[str, Any], prices: dict[str, float], target_loss: float | None) -> dict[str, Any]:
    """One table row; every None it holds has its reason in `notes`."""
    notes: list[str] = []

    def why(reason: str | None) -> None:
        if reason and reason not in notes:
            notes.append(reason)

    gpu = r.get("gpu_name")
    price, reason = price_for(gpu, prices, r.get("gpu_memory_mb")) if prices or not gpu else (None, "no prices given")
    why(reason)
    emulated = bool(r.get("emulated"))  # emulated kernels: no speed or energy figure means anything
    if emulated:
        why(f"emulated kernels, no speed figures: {r.get('emulated_reason')}")
    tps = None if emulated else r.get("tokens_per_s")
    per_dollar = tps * 3600 / price if tps is not None and price else None
    if tps is None and not emulated:
        why("tokens/s not measured")
    tpj = None if emulated else r.get("tokens_per_joule")
    if tpj is None and not emulated:
        why(f"energy not measured: {r.get('energy_reason') or 'no reason recorded'}")
    elif tpj is not None and not r.get("energy_protocol"):
        why(f"tokens per kJ {energy.NOT_UNDER}")
    seconds = None
    if target_loss is None:
        why("no target loss given")
    elif emulated:
        pass  # the emulated note above says why there is no time to target
    elif r.get("step_time_ms") is None:
        why("step time not measured, so no time to target")
    else:
        reached = time_to_loss(r.get("loss_curve") or [], r["step_time_ms"], target_loss)
        if reached is None:
            why(f"target loss {target_loss:g} not reached in {len(r.get('loss_curve') or [])} steps")
        else:
            seconds = reached[1]
    gpu_mem, peak = r.get("gpu_memory_mb"), r.get("peak_mem_mb")
    if gpu_mem is None:
        why("GPU memory size: CPU run" if not gpu else "GPU memory size not recorded")
    if peak is None:
        why(f"peak memory not measured: {r.get('peak_mem_reason') or 'no reason recorded'}")
    max_batch = r.get("max_batch")
    if max_batch is None:
        why("max_batch not measured (no max_batch field in these records)")
    return {
        "gpu": gpu or f"CPU: {r.get('cpu')}",
        "mode": r.get("mode"),
        "model": r.get("model"),
        "tokens_per_s": tps,
        "price_per_hour": price,
        "tokens_per_dollar": per_dollar,
        "tokens_per_kj": tpj * 1000 if tpj is not None else None,
        "energy_spread": None,
        "start_temperature_c": r.get("start_temperature_c"),
        "energy_protocol": "no",
        "time_to_target_s": seconds,
        "cost_to_target_usd": seconds / 3600 * price if seconds is not None and price else None,
        "gpu_memory_mb": gpu_mem,
        "peak_mem_mb": peak,
        "memory_headroom_mb": gpu_mem - peak if gpu_mem is not None and peak is not None else None,
        "max_batch": max_batch,
        "notes": "; ".join(notes),
    }


def _protocol_row(f: energy.EnergyFigure, prices: dict[str, float], target_loss: float | None) -> dict[str, Any]:
    """One row for a case's repeats under the energy protocol: medians over them, spread and start temperatures."""
    times = [r["step_time_ms"] for r in f.records if r.get("step_time_ms") is not None]
    pooled = f.first | {
        "tokens_per_s": f.tokens_per_s,
        "tokens_per_joule": 1 / f.j_per_token if f.j_per_token else None,
        "step_time_ms": sorted(times)[len(times) // 2] if times else None,  # a measured one: the upper median
    }
    row = _row(pooled, prices, target_loss)
    temps = [t for t in f.start_temperatures_c if t is not None]
    row |= {
        "energy_spread": f.spread,
        "start_temperature_c": f"{min(temps):g}-{max(temps):g}" if temps else None,
        "energy_protocol": f.describe(),
    }
    if f.suspect:
        row["notes"] = "; ".join(filter(None, [f"SUSPECT: {f.suspect}", row["notes"]]))
    return row


def procurement_table(df: pandas.DataFrame, prices: dict[str, float], target_loss: float | None) -> pandas.DataFrame:
    """One row per ok record (per case for the repeats of the energy protocol, pooled): throughput per dollar and
    per kJ, time and cost to `target_loss`, memory. Tokens per kJ measured outside the protocol say so."""
    import pandas

    ok = [r for r in records_of(df) if r.get("status") == "ok"]
    pooled = energy.figures(ok)
    rows, seen = [], set()
    for r in ok:
        if not r.get("energy_protocol"):
            rows.append(_row(r, prices or {}, target_loss))
        elif (key := energy.group_of(r)) not in seen:  # a case's repeats: one row, at its first repeat
            seen.add(key)
            rows.append(_protocol_row(pooled[key], prices or {}, target_loss))
    # object dtype keeps None as None (not NaN) so a missing figure stays visibly missing
    table = pandas.DataFrame(rows, columns=list(COLUMNS)).astype(object)
    return table.where(table.notna(), None)


def _fmt(value: Any, key: str) -> str:
    """A procurement figure: money to the cent or finer, large counts in full, others to 4 digits."""
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if key == "energy_spread":
        return f"{value:.1%}"
    if key in ("price_per_hour", "cost_to_target_usd"):
        return f"{value:.4g}"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def section(df: pandas.DataFrame, prices: dict[str, float] | None, target: float | None) -> tuple[str, str]:
    """The report's procurement section as HTML and Markdown."""
    t = procurement_table(df, prices or {}, target)
    priced = ", ".join(f"{k} = {v:g} USD/GPU-hour" for k, v in (prices or {}).items()) or "no prices given"
    about = (
        f"Prices: {priced}. Target loss: {f'{target:g} nats/token' if target is not None else 'none given'}. "
        "Time to target = first step at which the mean training loss of the last 5 steps is at or below the target, "
        "times the median step time: warm-up and compilation time are not included. Tokens per kJ: under "
        "`mpbench run --energy-protocol`, the median over a case's repeats (energy spread = (max - min) / median, "
        "start temperatures beside it); a figure from a plain run says it was not measured under the protocol. "
        "n/a: see notes."
    )
    heads = [PROCUREMENT_HEADERS[c] for c in t.columns]
    records = t.to_dict(orient="records")
    body = [[_fmt(v, k) for k, v in row.items()] for row in records]
    h = ["<h2>Procurement</h2>", f"<p>{html.escape(about)}</p>", '<div class="scroll"><table><thead><tr>']
    h += [f"<th>{html.escape(x)}</th>" for x in heads] + ["</tr></thead><tbody>"]
    for row, cells in zip(records, body, strict=True):
        kinds = ["text" if isinstance(v, str) else "num" for v in row.values()]  # words left, figures right
        tds = (f'<td class="{k}">{html.escape(c)}</td>' for k, c in zip(kinds, cells, strict=True))
        h.append(f"<tr>{''.join(tds)}</tr>")
    h.append("</tbody></table></div>")
    md = ["## Procurement", "", about, "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    md += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in body]
    return "".join(h), "\n".join(md)

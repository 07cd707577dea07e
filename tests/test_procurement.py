"""Prices, GPU-name matching, time to a target loss and the procurement table."""

import math

import pandas
import pytest

from suite.records.store import make_record
from suite.reporting.procurement import COLUMNS, parse_prices, price_for, procurement_table, time_to_loss


def test_prices_parse():
    assert parse_prices("H100=2.99, A100 = 1.29,") == {"H100": 2.99, "A100": 1.29}
    assert parse_prices("H100 NVL=3.5,H100=2.99") == {"H100 NVL": 3.5, "H100": 2.99}
    assert parse_prices("") == {}


@pytest.mark.parametrize(
    "text, words",
    [
        ("H100", ["'H100'", "expected GPU=USD_PER_GPU_HOUR", "H100=2.99"]),
        ("=2.99", ["'=2.99'", "name is empty"]),
        ("H100=cheap", ["'H100=cheap'", "'cheap' is not a number", "H100=2.99"]),
        ("H100=0", ["'H100=0'", "must be a positive", "H100=2.99"]),
        ("H100=-1", ["'H100=-1'", "must be a positive"]),
        ("H100=nan", ["'H100=nan'", "must be a positive"]),
        ("H100=2,h100=3", ["'h100=3'", "priced twice", "one price"]),
    ],
)
def test_bad_prices_name_the_item_the_value_and_the_fix(text, words):
    with pytest.raises(ValueError) as info:
        parse_prices(text)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


PRICES = {"H100": 2.99, "H100 NVL": 3.5, "A100": 1.29, "L4": 0.8}


@pytest.mark.parametrize(
    "name, price",
    [
        ("NVIDIA H100 80GB HBM3", 2.99),
        ("NVIDIA H100 PCIe", 2.99),
        ("NVIDIA H100 NVL", 3.5),  # the more specific key wins
        ("NVIDIA A100-SXM4-80GB", 1.29),
        ("nvidia a100-pcie-40gb", 1.29),
        ("NVIDIA L4", 0.8),
    ],
)
def test_a_key_matches_its_gpu_names(name, price):
    assert price_for(name, PRICES) == (price, None)


def test_a_key_does_not_match_a_longer_model_number():
    price, reason = price_for("NVIDIA RTX A1000", PRICES)
    assert price is None and reason.startswith("no price for NVIDIA RTX A1000")
    assert price_for("NVIDIA L40S", PRICES)[0] is None  # "L4" is not "L40S"
    assert price_for("NVIDIA H100 80GB HBM3", {"A100": 1.0})[0] is None


def test_the_peak_table_key_matches_too():
    assert price_for("NVIDIA H100 80GB HBM3", {"H100 SXM": 2.0, "H100 PCIe": 1.5}) == (2.0, None)


def test_equal_matches_and_cpu_runs_give_a_reason():
    price, reason = price_for("NVIDIA H100 80GB HBM3", {"H100": 2.0, "HBM3": 3.0})
    assert price is None and "ambiguous" in reason and "H100" in reason and "HBM3" in reason
    assert price_for(None, PRICES) == (None, "CPU run: no GPU price applies")


def test_time_to_loss_uses_full_windows_and_skips_nan():
    curve = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    assert time_to_loss(curve, 100.0, 3.0, window=3) == (5, 0.5)  # mean(4, 3, 2) = 3 at step 5
    assert time_to_loss(curve, 100.0, 2.0, window=1) == (5, 0.5)
    assert time_to_loss(curve, 100.0, 0.5, window=3) is None
    assert time_to_loss([1.0, 1.0], 100.0, 5.0, window=3) is None  # never a full window
    nan = [6.0, math.nan, 1.0, 1.0, 1.0, 1.0]  # a window holding a NaN never counts
    assert time_to_loss(nan, 10.0, 2.0, window=3) == (5, 0.05)
    assert time_to_loss([math.nan, -math.inf, 1.0], 10.0, 2.0, window=1) == (3, 0.03)
    with pytest.raises(ValueError, match="window"):
        time_to_loss(curve, 100.0, 3.0, window=0)


def _record(gpu_name, mode="bf16", **kw):
    values = dict(model="gpt2-small", mode=mode, status="ok", gpu_name=gpu_name, step_time_ms=100.0,
                  tokens_per_s=160_000.0, tokens_per_joule=400.0, gpu_memory_mb=81_559, peak_mem_mb=30_000.0,
                  loss_curve=[6.0, 5.0, 4.0, 3.0, 2.0, 2.0, 2.0, 2.0])  # fmt: skip
    return make_record(**(values | kw))


def test_table_columns_figures_and_notes():
    df = pandas.DataFrame(
        [
            _record("NVIDIA H100 80GB HBM3"),
            _record("NVIDIA L4", tokens_per_joule=None, energy_reason="energy counter did not advance"),
            _record(None, mode="fp32", gpu_memory_mb=None, tokens_per_joule=None, energy_reason="CPU: no counter"),
            _record("NVIDIA H100 80GB HBM3", mode="tf32", status="error"),  # not ok: not in the table
        ]
    )
    table = procurement_table(df, {"H100": 2.0}, target_loss=2.5)
    assert list(table.columns) == list(COLUMNS) and len(table) == 3
    h100, l4, cpu = table.to_dict(orient="records")
    assert h100["price_per_hour"] == 2.0
    assert h100["tokens_per_dollar"] == pytest.approx(160_000 * 3600 / 2.0)
    assert h100["tokens_per_kj"] == pytest.approx(400_000)
    assert h100["time_to_target_s"] == pytest.approx(0.8)  # steps 4-8 average 2.2 <= 2.5; steps 3-7: 2.6
    assert h100["cost_to_target_usd"] == pytest.approx(0.8 / 3600 * 2.0)
    assert h100["memory_headroom_mb"] == pytest.approx(51_559)
    assert h100["max_batch"] is None and "max_batch not measured" in h100["notes"]
    assert l4["price_per_hour"] is None and l4["tokens_per_dollar"] is None and l4["cost_to_target_usd"] is None
    assert "no price for NVIDIA L4" in l4["notes"] and "energy not measured: energy counter" in l4["notes"]
    assert cpu["gpu"].startswith("CPU") and "CPU run: no GPU price applies" in cpu["notes"]
    assert cpu["memory_headroom_mb"] is None and "GPU memory size: CPU run" in cpu["notes"]
    far = procurement_table(df, {"H100": 2.0}, target_loss=1.0).to_dict(orient="records")[0]
    assert far["time_to_target_s"] is None and "target loss 1 not reached in 8 steps" in far["notes"]


def test_table_takes_max_batch_when_the_records_have_it():
    df = pandas.DataFrame([_record("NVIDIA H100 80GB HBM3") | {"max_batch": 64}])
    row = procurement_table(df, {}, None).to_dict(orient="records")[0]
    assert row["max_batch"] == 64 and "max_batch" not in row["notes"]
    assert "no prices given" in row["notes"] and "no target loss given" in row["notes"]

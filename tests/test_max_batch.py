import json

from suite.cli.main import main
from suite.running.max_batch import find_max_batch
from tests.helpers import small_case


def _fake(limit_batch: int, peak_per_batch: float = 10.0):
    """An attempt that OOMs above `limit_batch`; peak memory grows with the batch."""
    calls = []

    def attempt(case, batch, timeout_s):
        calls.append(batch)
        if batch > limit_batch:
            return {"status": "oom", "peak_mem_mb": None}
        return {"status": "ok", "peak_mem_mb": 100.0 + peak_per_batch * batch}

    return attempt, calls


def test_doubling_then_bisection_finds_the_largest_fit():
    attempt, calls = _fake(limit_batch=37)
    found = find_max_batch(small_case(), attempt=attempt)
    assert found["max_batch"] == 37
    assert calls[:7] == [1, 2, 4, 8, 16, 32, 64]  # doubling until the first failure
    assert len(calls) <= 7 + 5  # then bisection between 32 and 64
    assert [t[0] for t in found["max_batch_tries"]] == calls


def test_memory_limit_decides_before_oom():
    attempt, _ = _fake(limit_batch=1000, peak_per_batch=10.0)
    found = find_max_batch(small_case(), memory_limit_mb=350.0, attempt=attempt)
    assert found["max_batch"] == 25  # 100 + 10 * 25 = 350 fits, 26 does not
    assert found["max_batch_limit_mb"] == 350.0


def test_a_limit_is_never_judged_without_the_process_peak():
    def attempt(case, batch, timeout_s):  # a GPU in a container where this process's figure is unknown
        return {"status": "ok", "peak_mem_mb": None, "peak_mem_reason": "pid 7 is not among the 2"}

    found = find_max_batch(small_case(), memory_limit_mb=350.0, attempt=attempt)
    assert found["max_batch"] is None and len(found["max_batch_tries"]) == 1
    assert "cannot be checked: batch 1: peak_mem_mb unknown (pid 7 is not among the 2)" in found["max_batch_reason"]


def test_nothing_fits_and_the_cap():
    attempt, _ = _fake(limit_batch=0)
    assert find_max_batch(small_case(), attempt=attempt)["max_batch"] is None
    attempt, calls = _fake(limit_batch=10**6)
    assert find_max_batch(small_case(), cap=64, attempt=attempt)["max_batch"] == 64 and calls[-1] == 64


def test_find_max_batch_on_cpu_against_a_memory_limit(tmp_path):
    """For real: each try is a spawned 3-step run; the limit is on its peak RSS."""
    from suite import run_cases

    # the limit sits ~40 MiB above what a worker needs at batch 1 (torch itself is most of it),
    # which tiny at seq 128 reaches within about ten sequences: a short search on any machine
    base = run_cases([small_case(mode="fp32", batch_size=1, seq_len=128, steps=3, warmup=1)], log=None)[0]
    limit = round(base["peak_mem_mb"] + 40)
    out = tmp_path / "r.jsonl"
    code = main(["run", "--device", "cpu", "--modes", "fp32", "--steps", "3", "--seq-len", "128",
                 "--find-max-batch", "--memory-limit-mb", str(limit), "--out", str(out)])  # fmt: skip
    assert code == 0
    r = json.loads(out.read_text())
    tries = r["max_batch_tries"]
    assert r["max_batch"] is not None and r["max_batch"] >= 1 and r["max_batch_limit_mb"] == limit
    fitting = [t for t in tries if t[3]]
    assert all(t[2] <= limit for t in fitting) and max(t[0] for t in fitting) == r["max_batch"]
    assert any(not t[3] and t[2] > limit for t in tries)  # the search did meet the limit

"""tests/conftest.py: plain `pytest` spreads the tests over the workers, yet the tests that share a
module-scoped fixture (a column trained once, records read by many tests) still share one run of it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import usable_cores

SHARED = """
import os, time
import pytest

@pytest.fixture(scope="module")
def trained():
    with open("setups.txt", "a") as f:  # one line each time the expensive setup runs
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
    return 42

@pytest.mark.parametrize("i", range(6))
def test_reads_the_shared_setup(trained, i):
    assert trained == 42
    time.sleep(0.2)

@pytest.mark.parametrize("i", range(6))
def test_needs_no_setup(i):
    with open("workers.txt", "a") as f:
        f.write(os.environ.get("PYTEST_XDIST_WORKER", "main") + "\\n")
    time.sleep(0.2)
"""


@pytest.mark.skipif(usable_cores() < 2, reason="one usable core: the conftest leaves pytest in one process")
@pytest.mark.skipif(shutil.which("true") is None, reason="needs a POSIX machine")
def test_plain_pytest_runs_in_workers_and_a_module_fixture_runs_once(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_shared.py").write_text(SHARED)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COVERAGE_"))}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "12 passed" in done.stdout
    setups = (tmp_path / "setups.txt").read_text().split()
    assert len(setups) == 1 and setups[0].startswith("gw"), setups  # in a worker, and once: the tests grouped
    assert len(set((tmp_path / "workers.txt").read_text().split()) | set(setups)) >= 2  # both workers worked

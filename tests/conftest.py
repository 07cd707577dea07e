"""Suite-wide pytest setup: `pytest` runs the tests on the machine's cores with pytest-xdist.

Only for the tests (this conftest is not loaded by `pytest benchmarks/`, whose timings must not share
the CPU). `-n 0` (or `-p no:xdist`) runs everything in one process again; `-n N` picks the count (still
grouped);
`--pdb` and `-s` keep one process, since neither works across workers, and so does a run of
tests named by id (`pytest tests/test_x.py::test_y`).
Tests that must not be split across workers carry `pytest.mark.xdist_group` (`--dist loadgroup`):
each group runs in one worker, so its module-scoped fixture (a trained column, a torchrun job) runs
once rather than once per worker.
"""

from __future__ import annotations

import os

import pytest

MAX_WORKERS = 4  # each worker imports torch (~0.4 GB) and some tests start 2-rank torchrun jobs


def usable_cores() -> int:
    """CPUs this process may run on (a container's or taskset's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    """Turn on `-n CORES --dist loadgroup` where nothing on the command line chose otherwise. Runs
    before xdist's own hook, which turns the worker count into its workers."""
    opt = config.option
    if hasattr(config, "workerinput"):  # a worker: parsed the command line afresh, without our --dist
        opt.loadgroup = opt.loadgroup or config.workerinput.get("mpbench_dist") == "loadgroup"
        return
    if not hasattr(opt, "numprocesses"):
        return  # xdist absent or disabled (-p no:xdist)
    if opt.numprocesses is None and _one_process_wanted(config):
        return
    if opt.numprocesses is None:
        workers = min(usable_cores(), MAX_WORKERS)
        if workers < 2:
            return
        opt.numprocesses = workers
        # one torch thread per worker's share of the cores: N workers of N threads each on N cores spin
        # against each other (OpenMP's busy wait); torchrun's ranks already get 1. The workers and every
        # process they start inherit it. The numbers barely move: 1 and 2 threads differ by ~1e-6 nats
        # over 30 steps (tests/test_golden.py), far inside every tolerance.
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // workers)))
    if opt.numprocesses and opt.dist == "no":  # `-n N` alone too: xdist's default would split the groups
        opt.dist = "loadgroup"


def _one_process_wanted(config: pytest.Config) -> bool:
    """--pdb, -s and --collect-only keep one process; so do tests named by id, which starting workers
    would slow down."""
    opt = config.option
    named = bool(config.args) and all("::" in arg for arg in config.args)
    return opt.usepdb or opt.capture == "no" or opt.collectonly or named


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """Pass the controller's --dist to each worker: a worker reads its groups only under loadgroup."""
    node.workerinput["mpbench_dist"] = node.config.option.dist


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses a module-scoped fixture of its own module runs in that module's xdist group,
    unless it names a group itself: the setup the fixture shares (records trained once for many
    tests) then runs once, in one worker, rather than once in each. Before xdist reads the groups."""
    for item in items:
        if item.get_closest_marker("xdist_group") or not hasattr(item, "_fixtureinfo"):
            continue
        module = item.nodeid.split("::")[0]
        defs = [d for chain in item._fixtureinfo.name2fixturedefs.values() for d in chain]
        if any(d.scope == "module" and d.baseid == module for d in defs):
            item.add_marker(pytest.mark.xdist_group(module))


@pytest.hookimpl(tryfirst=True)
def pytest_collection_finish(session: pytest.Session) -> None:
    """A worker's grouped test ids end in "@GROUP", which is what the controller groups by. xdist
    3.8 writes the suffix to `item._nodeid`, which pytest 9.2 no longer reads (its ids are
    structured: pytest-xdist issue #1386, open fix #1388); without it every group is split across
    the workers. Where the suffix did not take, write it where pytest 9.2 keeps the id."""
    config = session.config  # before xdist's own hook sends the ids to the controller
    if not (hasattr(config, "workerinput") and config.getvalue("loadgroup")):
        return
    from _pytest.nodeid import NodeId  # pytest >= 9.2 only: older ones took xdist's suffix

    for item in session.items:
        names = sorted({str(m.args[0] if m.args else m.kwargs.get("name", "default"))
                        for m in item.iter_markers("xdist_group")})  # fmt: skip
        if names and "@" not in item.nodeid and hasattr(item, "_id"):
            item._id = NodeId.parse(f"{item.nodeid}@{'_'.join(names)}")


@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session: pytest.Session) -> None:
    """A worker measured by coverage.py (ci/dark_code.py) saves its data before it reports the end:
    the controller gives workers 10 s to come down and then kills them (xdist's EXIT_TIMEOUT), and a
    worker that compiled with Inductor can take longer than that at exit; its data, written only at
    exit, was lost (450 statements reported untested in the first full run under xdist)."""
    if not hasattr(session.config, "workerinput"):
        return
    try:
        import coverage
    except ImportError:
        return
    cov = coverage.Coverage.current()
    if cov is not None:
        cov.save()  # the data so far; the exit saves again, to the same file, when it gets the time


@pytest.fixture(autouse=True)
def _small_bandwidth_copy(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """`mpbench calibrate` measures the memory bandwidth with a copy of up to GiBs (`calibration.copy_bytes`):
    in the tests, 1 MiB, so that a test of calibrate neither waits for nor keeps resident the GiBs (a later
    test in the same worker reads its own RSS). The tests of the size rule itself carry `real_copy_bytes`."""
    if request.node.get_closest_marker("real_copy_bytes") is None:
        from suite.metrics import calibration  # here: only a test that runs imports torch through it

        monkeypatch.setattr(calibration, "copy_bytes", lambda device: 1 << 20)

"""Known harmless messages of dependencies are dropped, and nothing else is."""

from __future__ import annotations

import enum
import logging
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch.utils._pytree as pytree

from suite.quiet import Known, quiet_dependencies

REPO = Path(__file__).resolve().parent.parent


class _Kept(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _string_enum(module: str) -> type:
    """A fresh (str, Enum) class, as torchao's KernelPreference is, 'defined' in `module`."""
    return enum.Enum("KernelPreference", {"AUTO": "auto"}, type=str, module=module)


def _logged_by_register_constant(cls: type) -> list[str]:
    """What torch's pytree logger lets through when `cls` is registered, after our filters."""
    logger = logging.getLogger("torch.utils._pytree")
    kept = _Kept()
    logger.addHandler(kept)  # logger filters run before this handler sees a record
    try:
        pytree.register_constant(cls)
    finally:
        logger.removeHandler(kept)
    return kept.lines


def test_the_torchao_enum_warning_is_dropped_and_the_same_warning_from_elsewhere_is_not():
    quiet_dependencies()
    assert _logged_by_register_constant(_string_enum("torchao.quantization.quantize_.common.kernel_preference")) == []
    ours = _logged_by_register_constant(_string_enum("tests.test_quiet"))
    assert len(ours) == 1 and "Enum subclass" in ours[0] and "register_constant()" in ours[0]


def test_other_records_of_that_logger_pass():
    quiet_dependencies()
    logger = logging.getLogger("torch.utils._pytree")
    kept = _Kept()
    logger.addHandler(kept)
    try:
        logger.warning("%s is something else entirely", _string_enum("torchao.x"))
    finally:
        logger.removeHandler(kept)
    assert kept.lines and "something else entirely" in kept.lines[0]


def test_a_known_python_warning_is_ignored_by_module_and_message_only():
    known = (Known(source=r"tests\.test_quiet", message="harmless:", why="test", kind="warning"),)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_dependencies(known)
        warnings.warn("harmless: dropped", UserWarning, stacklevel=1)  # this module, this message
        warnings.warn("something else", UserWarning, stacklevel=1)  # this module, another message
        warnings.warn_explicit("harmless: but from elsewhere", UserWarning, "other.py", 1, module="other")
    assert [str(w.message) for w in seen] == ["something else", "harmless: but from elsewhere"]


@pytest.mark.slow
def test_importing_torchao_prints_no_known_warning_once_quieted():
    """The real thing, in fresh processes: torchao's import logs the warning, unless quieted."""
    code = "import suite.quiet as q; {} import torchao.prototype.quantized_training, torchao.quantization"

    def stderr(setup: str) -> str:
        done = subprocess.run([sys.executable, "-c", code.format(setup)], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        return done.stderr

    assert "register_constant()" in stderr("")  # the test can see it: torchao really logs it here
    assert "register_constant()" not in stderr("q.quiet_dependencies();")

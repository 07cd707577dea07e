"""The `mpbench` console script. Light on purpose: the command itself (torch and the harness, seconds
to import) is imported inside the guard, so that a Ctrl-C during start-up, or one outside any case,
ends with one line and exit 130 like every other interrupt, never with a KeyboardInterrupt traceback."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    """Run `mpbench` with `argv` (default: the command line); its exit code."""
    try:
        from suite.cli.main import main as command

        return command(argv)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the line or the exit short
        print("mpbench: interrupted by SIGINT (Ctrl-C); records already written are kept", file=sys.stderr)
        return 128 + signal.SIGINT

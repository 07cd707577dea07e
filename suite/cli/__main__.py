"""`python -m suite.cli ...` runs the `mpbench` command (used under the user's own torchrun)."""

import sys

from suite.cli.entry import main

sys.exit(main())

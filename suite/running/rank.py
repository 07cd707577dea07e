"""Entry of each torchrun rank: `python -m suite.running.rank SPEC_JSON OUT_DIR` runs `distributed.main`.

A module of its own because `suite` imports `suite.running.distributed` on the way (the
scripting API): run with `-m` itself, that module would be imported twice and Python warns.
"""

import sys

from suite.running.distributed import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

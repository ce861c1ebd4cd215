"""lm-evaluation-harness entry point for early-exit generators -- NOT IMPLEMENTED YET.

The `early_exit` lm-eval model and this script are the subject of a separate issue (reports, sweeps
and the lm-evaluation-harness plug-in). Until it lands this script does nothing but say so.
"""
from __future__ import annotations

import sys


def main() -> int:
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__.strip())
        return 0
    print("error: eval.py (lm-evaluation-harness plug-in) is not implemented yet; use benchmark.py", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

"""python -m harness.report: see harness/report/__init__.py (the same text is its --help)."""
import sys

from ..cli import run_main
from .cli import main

sys.exit(run_main(main))

"""Shared CLI plumbing: parsers built from the config dataclasses and the one-line error policy."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, NoReturn

from .config import RunConfig, UsageError, add_dataclass_args, generation_config

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    """argparse with errors reduced to one line on stderr and exit code 2."""

    def parse_known_args(self, args=None, namespace=None):
        """Also records which flags were typed (`namespace._explicit`), so that "equals the default" never stands in
        for "not given": an explicit flag always wins over an exit artifact's values."""
        ns, rest = super().parse_known_args(args, namespace)
        if not getattr(self, "_probing", False):
            saved = [(a, a.default) for a in self._actions]
            self._probing = True
            try:
                for a, _ in saved:
                    a.default = argparse.SUPPRESS
                probe, _ = super().parse_known_args(args, None)
            finally:
                for a, d in saved:
                    a.default = d
                self._probing = False
            ns._explicit = frozenset(vars(probe))
        return ns, rest

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def at_least(low: int) -> Callable[[str], int]:
    """argparse type: a whole number >= low (argparse names the flag in the error line)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {v}")
        return v

    return parse


def writable_folder(path: str, flag: str) -> Path:
    """An output folder that exists (created now if needed) and takes files: checked before any work, so that a
    file in its place or an unwritable location is one line, not an error after the results are computed."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {path} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write_test"):
            pass
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot create or write this folder: {e.strerror or e}") from None
    return out


def strategies_epilog() -> str:
    from .generators import load_all
    from .tasks import TASKS

    lines = ["generation strategies (--generation_strategy):"]
    for name, cls in sorted(load_all().items()):
        lines.append(f"  {name:18s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    lines += ["", "datasets (--dataset):"]
    lines += [f"  {t.name:22s} metric {t.metric}, default max_steps {t.max_steps}" for t in TASKS.values()]
    return "\n".join(lines)


def make_parser(description: str, run_fields: bool = True) -> Parser:
    p = Parser(description=description, epilog=strategies_epilog(),
               formatter_class=argparse.RawDescriptionHelpFormatter)
    if run_fields:
        add_dataclass_args(p, RunConfig, "run (model, data, hardware, output)")
    add_dataclass_args(p, generation_config(), "generation (strategy and its knobs)")  # assembled: loads the methods
    return p


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, Slurm, Kubernetes) handled like Ctrl-C: records flushed, summary.json written."""


def _on_sigterm(signum, frame) -> NoReturn:
    raise Terminated("terminated by SIGTERM")


def run_main(main: Callable[[], int]) -> None:
    """Run a CLI entry point: usage errors become one stderr line and exit code 2, never a traceback; SIGINT and
    SIGTERM stop it cleanly (exit 130 / 143) with every finished record and a summary on disk."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        code = main()
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        print(f"{'terminated (SIGTERM)' if term else 'interrupted'}; records written so far are kept, with a summary "
              "(benchmark.py --resume RUN_DIR finishes the run)", file=sys.stderr)
        sys.exit(143 if term else 130)
    sys.exit(code or 0)


def require_single_process() -> None:
    """torchrun with one process works as plain python; sharding over several is not implemented yet."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        raise UsageError(f"launched with {world} processes; multi-process sharding is not implemented yet: "
                         "use torchrun --nproc_per_node 1 (or plain python)")

"""What every command-line tool shares: errors of the input as one line, and a clean stop.

* A bad config, file or argument (``ValueError``, which :class:`~densead.config.ConfigError`
  is, ``KeyError`` of a missing entry, and the ``OSError`` of a missing, existing, unwritable
  or too long file name, or a full disk) ends the tool with ``<prog>: error: <message>`` and
  exit status 2, as argparse does for a bad flag: every library error names the file, key or
  shape at fault, so a traceback adds nothing but noise. ``DENSEAD_TRACEBACK=1`` shows it
  anyway (a bug report).
* ``SIGTERM`` (``kill``, a batch scheduler's time limit) stops the tool as Ctrl-C does: the
  cleanups run, so no temporary file or ``.partial-*`` folder is left behind. Its exit status
  is 143, as for a process killed by the signal; Ctrl-C's is 130, with one line
  ``<prog>: interrupted`` instead of a traceback. The handler is the tool's only while its
  work runs.
* Ctrl-C while a tool still imports (torch takes seconds) ends it the same way:
  :func:`quiet_interrupt` around the imports.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

__all__ = [
    "USAGE_ERRORS",
    "error_message",
    "quiet_interrupt",
    "stop_on_sigterm",
    "tool_errors",
    "training_args",
]

USAGE_ERRORS: tuple[type[Exception], ...] = (ValueError, KeyError, OSError)


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def stop_on_sigterm() -> Any:
    """From now on, SIGTERM raises ``SystemExit(143)`` in the main thread (cleanups run).
    Returns the handler it replaces (None outside the main thread, where nothing changes)."""
    if threading.current_thread() is threading.main_thread():
        return signal.signal(signal.SIGTERM, _terminate)
    return None


@contextlib.contextmanager
def quiet_interrupt(prog: str | None = None, traceback: bool = False) -> Iterator[None]:
    """Ctrl-C inside the block ends the program with ``<prog>: interrupted`` and exit status 130
    instead of a traceback (``traceback``: the traceback all the same). Around a tool's module-level
    imports, which run before its parser exists, ``<prog>`` is the script's file name (argparse's
    default); :func:`tool_errors` passes its parser's."""
    try:
        yield
    except KeyboardInterrupt:
        if traceback:
            raise
        sys.stderr.write(f"{prog or os.path.basename(sys.argv[0])}: interrupted\n")
        raise SystemExit(130) from None


def error_message(err: BaseException) -> str:
    """The message of a library error as a tool prints it: a ``KeyError``'s own text (its
    ``str()`` is the repr: quoted, with escapes); an ``OSError``'s with the file it names."""
    message = str(err.args[0] if isinstance(err, KeyError) and err.args else err)
    if isinstance(err, OSError) and err.filename is not None and str(err.filename) not in message:
        message = f"{err.filename}: {message}"
    return message


@contextlib.contextmanager
def tool_errors(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Run a tool's work: the errors of its input end it as usage errors (module docstring)."""
    previous = stop_on_sigterm()
    traceback = os.environ.get("DENSEAD_TRACEBACK", "0") not in ("", "0")
    try:
        with quiet_interrupt(parser.prog, traceback):
            yield
    except USAGE_ERRORS as err:
        if traceback:
            raise
        parser.exit(2, f"{parser.prog}: error: {error_message(err)}\n")
    finally:
        if previous is not None:  # a SIGTERM after the work (or in shutdown) acts as it did before
            signal.signal(signal.SIGTERM, previous)


def training_args(
    description: str | None,
    config_help: str,
    argv: list[str] | None,
    resume: bool = False,
    log: str = "progress",
) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The command line every training tool shares, parsed: its YAML ``config``, ``--set KEY=VALUE``
    overrides, ``--overwrite`` (train anew over a checkpoint), ``--no-progress`` (``log="progress"``:
    a progress bar) or ``--quiet`` (``log="steps"``: a per-step log), and ``--resume`` where the
    trainer can continue a checkpoint (refused together with ``--overwrite``)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("config", help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key")
    if resume:
        parser.add_argument("--resume", action="store_true", help="continue <output_dir>/checkpoint.pt")
    if log == "progress":
        parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    else:
        parser.add_argument("--quiet", action="store_true", help="no per-step log")
    parser.add_argument("--overwrite", action="store_true", help="train anew over an existing checkpoint")
    args = parser.parse_args(argv)
    if resume and args.resume and args.overwrite:
        parser.error("--resume continues the checkpoint, --overwrite replaces it: give one")
    return parser, args

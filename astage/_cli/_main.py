"""The arguments of the ``astage`` command, and its exit codes.

Exit codes: 0 the checkpoint is valid; 1 it is not, or the report could not be written (the
reason on one line on stderr, never a traceback); 2 a usage error (bad arguments, or no file or
folder at the path).
"""

from __future__ import annotations

import argparse
import errno
import gc
import json
import os
import sys
from collections.abc import Sequence

from .. import __version__
from .._errors import CheckpointNotFoundError
from ._report import inspect_path
from ._text import render, shown

VALID, INVALID, USAGE = 0, 1, 2

_DESCRIPTION = "Look inside astage checkpoints without writing Python."
_INSPECT = """\
Show what a checkpoint file holds (entries with dtype, shape, bytes and offsets; totals; the
state dict's structure; the metadata) and whether astage.load would read it, or, for a folder
of CheckpointDir, its steps and which one resuming would load. Only the header is read unless
--verify is given. Exit status: 0 valid, 1 not valid, 2 usage error."""


def parser() -> argparse.ArgumentParser:
    """The command's argument parser."""
    top = argparse.ArgumentParser(prog="astage", description=_DESCRIPTION)
    top.add_argument("--version", action="version", version=f"astage {__version__}")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    inspect = commands.add_parser(
        "inspect", help="show what a checkpoint file or folder holds", description=_INSPECT
    )
    inspect.add_argument("path", metavar="PATH", help="a checkpoint file, or a CheckpointDir")
    inspect.add_argument(
        "--json", action="store_true", help="print one JSON document (for scripts)"
    )
    inspect.add_argument(
        "--verify",
        action="store_true",
        help="also read all tensor data and load it (costs the file's size in memory)",
    )
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command with ``argv`` (``sys.argv[1:]`` by default); return the exit code."""
    try:
        arguments = parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version (0) and usage errors (2)
        return exit_.code if isinstance(exit_.code, int) else USAGE
    try:
        return _inspect(arguments.path, as_json=arguments.json, verify=arguments.verify)
    except BrokenPipeError:
        # The reader went away (`astage inspect f | head`): say nothing more.
        _drop_stdout()
        return INVALID
    except OSError as error:
        # stdout on a full disk (ENOSPC), or closed (`astage inspect f >&-`): the report did
        # not get out, which a script must not take for success; a traceback said so before.
        _drop_stdout()
        _error(f"cannot write the report to stdout: {error.strerror or error}")
        return INVALID


def _drop_stdout() -> None:
    """Point stdout at devnull: what is still in its buffer would fail the interpreter's final
    flush again (an "Exception ignored" message, and exit status 120)."""
    if sys.stdout is not None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _inspect(path: str, *, as_json: bool, verify: bool) -> int:
    # A header of 40,000 entries makes a few hundred thousand small objects that all live
    # until the report is printed: the cyclic collector would only scan them again and again
    # (more than half the time, measured). Nothing here makes cycles, so it is off meanwhile.
    collecting = gc.isenabled()
    gc.disable()
    try:
        report = inspect_path(path, verify=verify)
    except CheckpointNotFoundError:
        _error(f"no file or folder at {path}")
        return USAGE
    finally:
        if collecting:
            gc.enable()
    if as_json:
        _write(json.dumps(report, indent=2) + "\n")
    else:
        _write(render(report))
    sys.stdout.flush()
    if report["valid"]:
        return VALID
    _error(report["error"] or "not valid")
    return INVALID


def _write(text: str) -> None:
    """Write ``text`` to stdout, escaping what its encoding cannot hold: a name from the file
    (a key in Chinese, say) on an ASCII or Latin-1 stdout raised UnicodeEncodeError, a
    traceback (stderr escapes such characters itself)."""
    if sys.stdout is None:  # started with stdout closed: the interpreter made it None
        raise OSError(errno.EBADF, "stdout is closed")
    encoding = getattr(sys.stdout, "encoding", None) or "utf-8"
    sys.stdout.write(text.encode(encoding, "backslashreplace").decode(encoding))


def _error(message: str) -> None:
    if sys.stderr is None:  # started with stderr closed: the exit status says it all
        return
    sys.stderr.write(f"astage inspect: {shown(message, 2000)}\n")

"""The crash: run the training job in a child process and kill it mid-save with ``SIGKILL``.

The job reports its events as JSON lines; the demo prints them, and on the job's crash point
(the save of the ``--crash-at`` step is in flight) kills it, as an out-of-memory killer or a
preempted node would: no handler runs, nothing is cleaned up. What is left in the folder is
listed, and then the checkpoint that ``latest`` names is cut short, as a copy to other storage
interrupted half-way would leave it, so that resuming has to pass over a damaged file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from dataclasses import dataclass, field

import anyio
from anyio.streams.buffered import BufferedByteReceiveStream

from ..gpt import Setup
from .events import Event, Printer, mb
from .job import CRASH_POINT, job_command

__all__ = ["CrashedJob", "cut_latest", "describe_folder", "run_and_kill"]

_LINE_LIMIT = 1 << 16  # bytes of one event line, at most

# The package's parent folder: the job imports `benchmarks` from there.
_PROJECT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@dataclass
class CrashedJob:
    """What the killed job reported before it died."""

    pid: int = 0
    losses: dict[int, float] = field(default_factory=dict)
    """The loss of each step the job trained."""
    events: list[Event] = field(default_factory=list)


async def run_and_kill(
    setup: Setup, root: str, steps: int, crash_at: int, backend: str, *, printer: Printer
) -> CrashedJob:
    """Run the training job, print its events, kill it at its crash point; what it reported."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PROJECT, env.get("PYTHONPATH")]))
    job = CrashedJob()
    command = job_command(setup, root, steps, crash_at, backend)
    # stderr is inherited: a job that fails shows its traceback.
    async with await anyio.open_process(
        command, stdin=subprocess.DEVNULL, stderr=None, env=env
    ) as process:
        job.pid = process.pid
        printer.status("starting the training job...")
        assert process.stdout is not None
        lines = BufferedByteReceiveStream(process.stdout)
        try:
            while True:
                try:
                    raw = await lines.receive_until(b"\n", _LINE_LIMIT)
                except (anyio.EndOfStream, anyio.IncompleteRead):
                    code = await process.wait()
                    raise RuntimeError(
                        f"the training job exited (status {code}) before step {crash_at}'s "
                        "save started"
                    ) from None
                event: Event = json.loads(raw)
                job.events.append(event)
                if event["kind"] == CRASH_POINT:
                    process.send_signal(signal.SIGKILL)
                    code = await process.wait()
                    printer.clear_status()
                    printer.line(
                        f"  snapshot {event['step']}: its file is being written: kill -9 the "
                        f"job (pid {process.pid}) now -> exit status {code}"
                    )
                    return job
                if event["kind"] == "step":
                    job.losses[event["step"]] = event["loss"]
                printer.event(event)
        except BaseException:
            if process.returncode is None:
                process.kill()
            raise


def describe_folder(root: str, crash_at: int) -> list[str]:
    """One line per file in the checkpoint folder: name, size, and ``latest``'s content."""
    lines = []
    torn = False
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        size = os.path.getsize(path)
        if name == "latest":
            with open(path, encoding="ascii", errors="replace") as pointer:
                note = f"-> {pointer.read().strip()}"
        elif name.startswith(".") and name.endswith(".tmp"):
            note = f"{mb(size)}: torn, the save in flight when the job died"
            torn = True
        else:
            note = mb(size)
        lines.append(f"    {name:<44} {note}")
    if not torn:  # a small file can be written before the kill lands
        lines.append(f"    (no temporary file: step {crash_at}'s save renamed its file in time)")
    return lines


def cut_latest(root: str) -> tuple[str, int, int]:
    """Cut the checkpoint to resume from to half its size; its name, its size before and after.

    That is the one ``latest`` names: a kill between a step file's rename and the pointer's
    move leaves a newer step file that resuming never reads while ``latest`` names a good one.
    """
    try:
        with open(os.path.join(root, "latest"), encoding="ascii") as pointer:
            name = pointer.read().strip()
    except FileNotFoundError:  # killed before its first save was published
        name = max(name for name in os.listdir(root) if name.startswith("step_"))
    path = os.path.join(root, name)
    size = os.path.getsize(path)
    os.truncate(path, size // 2)
    return name, size, size // 2

"""What the demo prints: one line per event, and a status line redrawn only on a terminal.

The training job reports events (a step trained, a snapshot staged, a snapshot durable) as
plain dicts, so that a job in another process can send them as JSON lines; :class:`Printer`
turns each into one line. On a terminal a status line ("step 4: training...") is redrawn in
place under them; when the output is a file or a pipe only the event lines are written.
"""

from __future__ import annotations

import os
from typing import Any, TextIO

__all__ = ["LAG_EXPLAINED", "PAUSE_EXPLAINED", "Event", "Printer", "mb"]

Event = dict[str, Any]
"""``{"kind": "step" | "staged" | "durable" | ..., "step": n, ...}``: JSON-serialisable."""

LAG_EXPLAINED = (
    "loop lag: how late a 1 ms heartbeat on the event loop wakes up; while the loop is late, "
    "nothing else it runs (requests, data loading, peers' heartbeats) gets a turn"
)


PAUSE_EXPLAINED = (
    "training paused: the staging, plus any wait for the previous write, which holds the "
    "stager's host buffers (one set, reused) until its file is durable"
)


def mb(nbytes: int) -> str:
    """Bytes as megabytes."""
    return f"{nbytes / 1e6:.1f} MB"


class Printer:
    """Writes event lines to ``stream``; on a terminal, also a status line kept under them."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._status = ""

    def line(self, text: str) -> None:
        """Print one line (above the status line, on a terminal)."""
        if self.tty and self._status:
            self.stream.write("\r\x1b[K" + text + "\n" + self._status)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def status(self, text: str) -> None:
        """Show what is going on now, in place; nothing when not on a terminal."""
        if self.tty:
            self._status = text
            self.stream.write("\r\x1b[K" + text)
            self.stream.flush()

    def clear_status(self) -> None:
        """Remove the status line."""
        self.status("")
        self._status = ""

    def event(self, event: Event) -> None:
        """Print a training job's event as one line."""
        kind, step = event["kind"], event["step"]
        if kind == "step":
            self.line(f"step {step}: loss {event['loss']:.4f} ({event['seconds'] * 1e3:.0f} ms)")
            self.status(f"  snapshot {step}: staging...")
        elif kind == "staged":
            self.line(
                f"  snapshot {step}: staged {mb(event['nbytes'])} in "
                f"{event['seconds'] * 1e3:.0f} ms (training paused "
                f"{event['paused_seconds'] * 1e3:.0f} ms), loop lag p99 "
                f"{event['lag_p99_ms']:.2f} ms; written while training goes on"
            )
            last = event.get("last", False)
            self.status(
                "  waiting for the last write..." if last else f"step {step + 1}: training..."
            )
        elif kind == "durable":
            self.line(
                f"  snapshot {step}: durable {event['seconds'] * 1e3:.0f} ms after its save "
                f"began ({os.path.basename(event['path'])})"
            )
        else:
            self.line(f"  {kind} {step}")

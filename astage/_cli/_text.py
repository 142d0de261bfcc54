"""The text form of an ``astage inspect`` document, for a terminal.

Everything shown comes from a file someone else may have written, so every string from it
goes through :func:`shown`: control characters escaped (no terminal escape sequence reaches the
screen) and long strings shortened. The JSON form (``--json``) keeps the full strings.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

_WIDE = 100  # characters of a name or value shown at most
_NAME_COLUMN = 48  # the entries table's name column, at most


def shown(text: str, limit: int = _WIDE) -> str:
    """``text`` on one line, control characters escaped, at most ``limit`` characters."""
    if not text.isprintable():
        text = "".join(
            c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
        )
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render(report: dict[str, Any]) -> str:
    """The document as lines of text (with a final newline)."""
    lines = list(_folder(report) if report["kind"] == "checkpoint_dir" else _file(report))
    return "".join(f"{line}\n" for line in lines)


def _file(report: dict[str, Any]) -> Iterator[str]:
    path = shown(report["path"])
    if not report["valid"]:  # the command says why on stderr
        return
    verified = report["verified"]
    how = (
        "header and data checked: every byte read and loaded (--verify)"
        if verified
        else "header checked; tensor data not read: --verify reads it"
    )
    yield f"{path}: valid ({how})"
    yield (
        f"  size: {report['file_bytes']:,} bytes: header {report['header_bytes']:,}, "
        f"data {report['data_bytes']:,}"
    )
    if report["astage_format"] is None:
        yield "  format: plain safetensors, not written by astage (loads as a flat dict)"
    else:
        digest = report["header_digest"]
        sealed = f", header digest {shown(digest, 16)}" if digest else ", no header digest"
        yield f"  format: astage {report['astage_format']}{sealed}"
    metadata = report["metadata"]
    yield "  metadata:" + ("" if metadata else " none")
    for key, value in metadata.items():
        yield f"    {shown(key, 40)}: {shown(value)}"
    entries = report["entries"]
    yield f"entries ({len(entries)}; offsets are within the data section):"
    yield from _entries(entries)
    totals = report["totals"]
    by_dtype = ", ".join(f"{name} {size:,}" for name, size in totals["bytes_by_dtype"].items())
    arrays = f", {_count(totals['arrays'], 'numpy array')}" if totals["arrays"] else ""
    yield (
        f"totals: {_count(totals['entries'], 'entry', 'entries')}, "
        f"{_count(totals['tensors'], 'tensor')}{arrays}, "
        f"{totals['bytes']:,} bytes" + (f" ({by_dtype})" if by_dtype else "")
    )
    if report["skeleton"] is None:
        yield "skeleton: none (a flat {name: tensor} dict, as above)"
    else:
        yield "skeleton:"
        yield from _tree(report["skeleton"], "  ", "", "")


def _entries(entries: list[dict[str, Any]]) -> Iterator[str]:
    rows = [
        (
            shown(entry["name"], _NAME_COLUMN),
            entry["dtype"],
            _shape(entry["shape"]),
            f"{entry['bytes']:,}",
            "{:,}-{:,}".format(*entry["offsets"]),
        )
        for entry in entries
    ]
    header = ("name", "dtype", "shape", "bytes", "offsets")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(5)]
    for row in [header, *rows]:
        name, dtype, shape, size, offsets = row
        yield (
            f"  {name:<{widths[0]}}  {dtype:<{widths[1]}}  {shape:<{widths[2]}}  "
            f"{size:>{widths[3]}}  {offsets}"
        ).rstrip()


def _count(number: int, one: str, many: str | None = None) -> str:
    return f"{number:,} {one if number == 1 else many or one + 's'}"


def _shape(shape: Any) -> str:
    return "[" + ", ".join(str(size) for size in shape) + "]"


def _tree(node: dict[str, Any], indent: str, label: str, path: str) -> Iterator[str]:
    """One line per node: ``label: what``, children indented under their container."""
    kind = node["type"]
    prefix = indent + ("" if not label else "- " if label == "-" else f"{label}: ")
    if "items" in node:
        items = node["items"]
        yield f"{prefix}{kind} ({_count(len(items), 'item')})"
        for item in items:
            key = item["key"]
            child_label = "-" if key is None else shown(key, 60)
            yield from _tree(item["value"], indent + "  ", child_label, path + (key or ""))
        return
    if kind in ("tensor", "ndarray"):
        entry = node["entry"]
        where = "" if entry == (path or "<root>") else f", in {shown(entry, 60)}"
        yield f"{prefix}{kind}({node['dtype']}, {_shape(node['shape'])}{where})"
        return
    yield f"{prefix}{shown(node['repr'])}"


def _folder(report: dict[str, Any]) -> Iterator[str]:
    steps = report["steps"]
    status = "valid" if report["valid"] else "NOT VALID"
    yield f"{shown(report['path'])}: checkpoint folder, {_count(len(steps), 'step')}, {status}"
    if steps:
        width = max(5, *(len(f"{step['bytes'] or 0:,}") for step in steps))
        yield f"  {'step':>9}  {'bytes':>{width}}  file"
        for step in steps:
            size = "-" if step["bytes"] is None else f"{step['bytes']:,}"
            # the error names the file already, from the folder's path: said once is enough
            error = (step["error"] or "").removeprefix(os.path.join(report["path"], step["file"]))
            state = "valid" if step["valid"] else f"NOT VALID{shown(error)}"
            yield f"  {step['step']:>9}  {size:>{width}}  {step['file']}: {state}"
    latest = report["latest"]
    if latest["problem"] is not None:
        yield f"latest: {shown(latest['problem'])}"
    elif latest["step"] is None:  # no `latest` file, and no step for it to name
        yield "latest: none"
    else:
        yield f"latest: step {latest['step']}"
    resume = report["resume_step"]
    yield "resume from: " + (
        "nothing (no valid checkpoint)"
        if resume is None
        else f"step {resume} (what CheckpointDir.load_latest() loads)"
    )
    newest = report["newest_good_step"]
    yield "newest valid: " + ("none" if newest is None else f"step {newest}")
    temporary = report["temporary_files"]
    if temporary:
        yield (
            f"temporary files of interrupted saves ({len(temporary)}; CheckpointDir removes "
            "them on first use):"
        )
        for name in temporary:
            yield f"  {shown(name)}"
    if report["verified"]:
        yield "verified: every valid step file read and loaded (--verify)"

"""What ``astage inspect`` finds in a checkpoint file or folder, as one JSON-ready document.

The document is the ``--json`` output, and the text output is rendered from it, so both always
say the same thing. Its keys are stable (``docs/guide.md``, "Looking inside a checkpoint",
lists them); ``schema`` is bumped if one ever changes meaning.

Reading a file reads its header only, and checks it exactly as :func:`astage.load` would
(:func:`~astage._files._safetensors.check_file`: every field, the digest, the skeleton and each
view against its entry), all through one descriptor, so what is shown is what was checked.
Tensor data is read only with ``verify`` (a full :func:`astage.load`). A folder is read as
:meth:`astage.CheckpointDir.latest_step` reads it, but without touching it: no temporary file
is tidied away, and ``latest`` is read with the folder's own untrusting reader.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Any

from .._errors import CheckpointError, CheckpointNotFoundError
from .._files._checkpoint_dir import _TEMP_FILE, LATEST, _read_pointer, file_name, step_of
from .._files._load import Decoder, Stored, load, open_checked, read_raw, skeleton_document
from .._files._safetensors import DIGEST_KEY, FORMAT_VERSION, METADATA_KEY
from .._paths import Attr, Path, format_path

SCHEMA = 1
"""The version of the document's layout."""

MAX_DEPTH = 200
"""Nodes nested deeper than this are not shown (a checked skeleton nests at most 100 deep)."""

_BRIEF = 80  # characters of a plain value's repr in the skeleton


def inspect_path(path: str, *, verify: bool = False) -> dict[str, Any]:
    """The document for ``path``: a checkpoint folder if it is a directory, else a file.

    Raises :class:`~astage.CheckpointNotFoundError` when nothing is there; every other
    problem is reported in the document (``valid`` false, ``error`` the message).
    """
    if os.path.isdir(path):
        return inspect_folder(path, verify=verify)
    try:
        os.lstat(path)
    except OSError as error:
        # "ckpt.safetensors/x" (a file where a folder should be) has nothing at it either: it
        # was "cannot open ...: Not a directory", exit 1, where a missing file gets exit 2.
        if error.errno in (errno.ENOENT, errno.ENOTDIR):
            raise CheckpointNotFoundError(f"{path}: nothing there") from error
    return inspect_file(path, verify=verify)


def inspect_file(path: str, *, verify: bool = False) -> dict[str, Any]:
    """The document for one checkpoint file (see the module's docstring)."""
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": "file",
        "path": path,
        "valid": False,
        "error": None,
        "verified": None,
        "file_bytes": None,
        "header_bytes": None,
        "data_bytes": None,
        "astage_format": None,
        "header_digest": None,
        "metadata": {},
        "entries": [],
        "totals": None,
        "skeleton": None,
    }
    try:
        fd, size = open_checked(path)
        try:
            header = read_raw(fd, path, size)[1]
        finally:
            os.close(fd)
        document = skeleton_document(header.metadata, path)
        if document is not None:  # what check_file does: every node and view checked
            _Checker(header.entries, None, path, None).decode(document)
    except CheckpointNotFoundError:
        raise
    except CheckpointError as error:
        report["error"] = str(error)
        return report
    entries = sorted(header.entries.values(), key=lambda entry: (entry.begin, entry.end))
    # A file astage did not write loads as a flat {name: tensor} dict: each entry its own path.
    paths: dict[str, list[str]] = {
        entry.key: [] if document is not None else [format_path((entry.key,))] for entry in entries
    }
    counts = {"tensors": 0, "arrays": 0}
    skeleton = None
    if document is not None:
        skeleton = _Tree(header.entries, paths, counts).node(document, (), 0)
    by_dtype: dict[str, int] = {}
    for entry in entries:
        name = _dtype_name(entry)
        by_dtype[name] = by_dtype.get(name, 0) + entry.nbytes
    metadata = header.metadata
    report.update(
        valid=True,
        file_bytes=size,
        header_bytes=header.data_start,
        data_bytes=size - header.data_start,
        # skeleton_document refuses any version but the one this astage reads
        astage_format=None if document is None else FORMAT_VERSION,
        header_digest=metadata.get(DIGEST_KEY),
        metadata={k: v for k, v in metadata.items() if k not in (METADATA_KEY, DIGEST_KEY)},
        entries=[
            {
                "name": entry.key,
                "dtype": _dtype_name(entry),
                "shape": entry.shape,
                "bytes": entry.nbytes,
                "offsets": [entry.begin, entry.end],
                "paths": paths[entry.key],
            }
            for entry in entries
        ],
        totals={
            "entries": len(entries),
            "tensors": counts["tensors"] if document is not None else len(entries),
            "arrays": counts["arrays"],
            "bytes": size - header.data_start,
            "bytes_by_dtype": dict(sorted(by_dtype.items())),
        },
        skeleton=skeleton,
    )
    if verify:
        try:
            load(path)  # every byte read, every tensor and view rebuilt
        except CheckpointError as error:
            report.update(valid=False, verified=False, error=str(error))
        else:
            report["verified"] = True
    return report


def inspect_folder(path: str, *, verify: bool = False) -> dict[str, Any]:
    """The document for a :class:`~astage.CheckpointDir` folder: its steps and ``latest``."""
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "kind": "checkpoint_dir",
        "path": path,
        "valid": False,
        "error": None,
        "verified": True if verify else None,
        "steps": [],
        "latest": {"step": None, "problem": None},
        "resume_step": None,
        "newest_good_step": None,
        "temporary_files": [],
    }
    try:
        names = sorted(os.listdir(path))
    except OSError as error:
        report["error"] = f"cannot list {path}: {error.strerror or error}"
        return report
    steps = sorted(step for step in map(step_of, names) if step is not None)
    good: list[int] = []
    problems: list[str] = []
    for step in steps:
        found = _step_file(os.path.join(path, file_name(step)), verify)
        report["steps"].append({"step": step, "file": file_name(step), **found})
        if found["valid"]:
            good.append(step)
        else:
            problems.append(found["error"] or f"{file_name(step)}: not valid")
            if verify and found.get("verified") is False:
                report["verified"] = False
    named, problem = _read_pointer(os.path.join(path, LATEST))
    if problem is None and named is None and steps:
        problem = "missing"
    elif named is not None and named not in good:
        problem = f"names step {named}, whose file is " + (
            "missing" if named not in steps else "not valid"
        )
    report["latest"] = {"step": named, "problem": problem}
    if problem is not None:
        problems.insert(0, f"{os.path.join(path, LATEST)}: {problem}")
    report["temporary_files"] = [name for name in names if _TEMP_FILE.fullmatch(name)]
    report["newest_good_step"] = max(good, default=None)
    report["resume_step"] = named if named in good else report["newest_good_step"]
    if not steps:
        problems.append(f"no checkpoint in {path}: no step_<N>.safetensors file")
    if verify and report["verified"] is not False and not good:
        report["verified"] = None
    report["valid"] = not problems
    report["error"] = "; ".join(problems) or None
    return report


def _step_file(path: str, verify: bool) -> dict[str, Any]:
    """A step file's size, validity and error (naming the file), as :class:`CheckpointDir`
    judges it."""
    try:
        info = os.lstat(path)
    except OSError as error:
        return {"bytes": None, "valid": False, "error": f"{path}: cannot be read: {error.strerror}"}
    if not stat.S_ISREG(info.st_mode):  # never followed: a link is not a checkpoint
        return {"bytes": None, "valid": False, "error": f"{path}: not a regular file"}
    try:
        found = inspect_file(path, verify=verify)
    except CheckpointNotFoundError:
        return {"bytes": None, "valid": False, "error": f"{path}: missing"}
    result = {"bytes": info.st_size, "valid": found["valid"], "error": found["error"]}
    if verify:
        result["verified"] = found["verified"]
    return result


class _Checker(Decoder):
    """Checks a skeleton as :func:`astage.load` does, but an enum whose module this command
    has not imported is checked for its form and value only.

    ``astage.load`` finds an enum's class in the modules the program imported, never importing
    one a file names; this command imports none of the user's, so a file holding an enum of the
    user's own module (``load`` reads it in the program) was reported NOT VALID, and so was
    every step of a folder of them.
    """

    def unimported_enum(self, where: str, module_name: str, raw: Any) -> None:
        self.decode_enum_value(raw)


def _dtype_name(entry: Stored) -> str:
    return str(entry.dtype).removeprefix("torch.")


class _Tree:
    """Turns a checked skeleton into the document's tree, noting which paths use each entry.

    A node is ``{"type": ..., ...}``: containers (``dict``, ``OrderedDict``, ``list``,
    ``tuple``, ``set``, ``frozenset``, ``Namespace``) have ``items``, each ``{"key", "value"}``
    (``key`` as a path step: ``['name']``, ``[0]``, ``.attr``; null in a set); a tensor has
    ``dtype``, ``shape`` and its ``entry``; a numpy array the same with ``type`` ``ndarray``;
    any other value its ``repr``, shortened.
    """

    def __init__(
        self, entries: dict[str, Stored], paths: dict[str, list[str]], counts: dict[str, int]
    ) -> None:
        self._entries = entries
        self._paths = paths
        self._counts = counts

    def node(self, node: Any, path: Path, depth: int) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            return {"type": "...", "repr": "(nested too deep to show)"}
        if node is None or type(node) in (str, int, bool, float):
            return _value(type(node).__name__ if node is not None else "None", repr(node))
        if type(node) is not dict or not node:
            return _value("unknown", repr(node))
        tag, value = next(iter(node.items()))
        if tag in ("list", "tuple") and type(value) is list:
            items = [
                self._item(format_path((i,)), child, (*path, i), depth)
                for i, child in enumerate(value)
            ]
            return {"type": tag, "items": items}
        if tag in ("dict", "odict") and type(value) is list:
            items = []
            for pair in value:
                key = _key(pair[0])
                items.append(self._item(format_path((key,)), pair[1], (*path, key), depth))
            return {"type": "dict" if tag == "dict" else "OrderedDict", "items": items}
        if tag in ("set", "frozenset") and type(value) is list:
            return {
                "type": tag,
                "items": [self._item(None, child, path, depth) for child in value],
            }
        if tag == "namespace" and type(value) is list:
            items = [
                self._item(f".{name}", child, (*path, Attr(name)), depth) for name, child in value
            ]
            return {"type": "Namespace", "items": items}
        if tag in ("tensor", "numpy"):
            return self._stored(tag, node, path)
        return _value(tag, _tagged_repr(tag, value))

    def _item(self, key: str | None, child: Any, path: Path, depth: int) -> dict[str, Any]:
        return {"key": key, "value": self.node(child, path, depth + 1)}

    def _stored(self, tag: str, node: dict[str, Any], path: Path) -> dict[str, Any]:
        entry = self._entries[node[tag]]
        self._paths[entry.key].append(format_path(path))
        if tag == "numpy":
            self._counts["arrays"] += 1
            return {
                "type": "ndarray",
                "dtype": node["dtype"],
                "shape": node["shape"],
                "entry": entry.key,
            }
        self._counts["tensors"] += 1
        if "dtype" in node:  # a view: its own dtype and shape inside the entry
            return {
                "type": "tensor",
                "dtype": node["dtype"],
                "shape": node["shape"],
                "entry": entry.key,
            }
        return {
            "type": "tensor",
            "dtype": _dtype_name(entry),
            "shape": entry.shape,
            "entry": entry.key,
        }


def _key(node: Any) -> Any:
    """A dict key's value (keys are plain values; a non-finite float is tagged)."""
    if type(node) is dict and "float" in node:
        return float(node["float"])
    return node


def _value(kind: str, text: str) -> dict[str, Any]:
    if len(text) > _BRIEF:
        text = text[: _BRIEF - 3] + "..."
    return {"type": kind, "repr": text}


def _tagged_repr(tag: str, value: Any) -> str:
    """How a tagged plain value reads in Python."""
    if tag == "float":
        return repr(float(value)) if value in ("nan", "inf", "-inf") else repr(value)
    if tag == "torch.Size":
        return f"torch.Size({value!r})"
    if tag == "torch.dtype":
        return f"torch.{value}"
    if tag == "path" and type(value) is list and len(value) == 2:
        return f"{value[0]}({value[1]!r})"
    if tag == "enum" and type(value) is list and len(value) == 3:
        return f"<{value[1]}: {value[2]!r}>"
    if tag == "numpy.scalar" and type(value) is list and len(value) == 2:
        return f"numpy scalar {value[0]} 0x{value[1]}"
    return f"{tag} {value!r}"

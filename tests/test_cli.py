"""``astage inspect`` (``python -m astage``): what it shows, its JSON, its exit codes, and that a
hostile file or folder gets a one-line error and exit code 1, never a traceback.

The command runs in-process through ``main(argv)`` (which returns the exit code), and once as
a real ``python -m astage`` subprocess.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import os
import struct
import subprocess
import sys
import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_load_property import crafted

import astage
from astage._cli import _report, main
from astage._files._safetensors import header_text

ROOT = Path(__file__).resolve().parent.parent

FILE_KEYS = {
    "schema",
    "kind",
    "path",
    "valid",
    "error",
    "verified",
    "file_bytes",
    "header_bytes",
    "data_bytes",
    "astage_format",
    "header_digest",
    "metadata",
    "entries",
    "totals",
    "skeleton",
}
FOLDER_KEYS = {
    "schema",
    "kind",
    "path",
    "valid",
    "error",
    "verified",
    "steps",
    "latest",
    "resume_step",
    "newest_good_step",
    "temporary_files",
}


def state() -> dict[str, Any]:
    model = torch.nn.Linear(4, 3)
    shared = torch.arange(10, dtype=torch.float64)
    return {
        "model": model.state_dict(),
        "step": 7,
        "lr": 1e-3,
        "view": shared[2:5],
        "options": argparse.Namespace(epochs=3),
        "array": np.arange(6, dtype=np.int16).reshape(2, 3),
        "tied": None,
    }


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    sd = state()
    sd["tied"] = sd["model"]["weight"]
    path = tmp_path / "ckpt.safetensors"
    astage.save_sync(sd, path, metadata={"run": "demo"})
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code, out, _ = run(capsys, "inspect", "--json", *argv)
    return code, json.loads(out)


# -- a good file ----------------------------------------------------------------------------------


def test_text_shows_entries_totals_skeleton_and_metadata(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "inspect", str(checkpoint))
    assert (code, err) == (0, "")
    assert f"{checkpoint}: valid (header checked; tensor data not read" in out
    assert "format: astage 1, header digest " in out
    assert "    run: demo" in out
    assert "['model']['weight']  float32  [3, 4]     48" in out
    assert "totals: 4 entries, 4 tensors, 1 numpy array, " in out
    assert "  dict (7 items)" in out
    assert "    ['model']: OrderedDict (2 items)" in out
    assert "      ['weight']: tensor(float32, [3, 4])" in out
    assert "    ['step']: 7" in out
    assert "    ['view']: tensor(float64, [3], in <storage " in out
    assert "    ['options']: Namespace (1 item)\n      .epochs: 3\n" in out
    assert "    ['array']: ndarray(<i2, [2, 3], in <storage " in out
    assert "    ['tied']: tensor(float32, [3, 4], in ['model']['weight'])" in out


def test_json_document(checkpoint: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_json(capsys, str(checkpoint))
    assert code == 0
    assert set(report) == FILE_KEYS
    assert report["schema"] == 1 and report["kind"] == "file" and report["valid"] is True
    assert report["error"] is None and report["verified"] is None
    assert report["astage_format"] == 1 and len(report["header_digest"]) == 64
    assert report["metadata"] == {"format": "pt", "run": "demo"}
    size = checkpoint.stat().st_size
    assert report["file_bytes"] == size
    assert report["header_bytes"] + report["data_bytes"] == size
    entries = {entry["name"]: entry for entry in report["entries"]}
    weight = entries["['model']['weight']"]
    assert weight["dtype"] == "float32" and weight["shape"] == [3, 4] and weight["bytes"] == 48
    assert weight["paths"] == ["['model']['weight']", "['tied']"]
    assert weight["offsets"][1] - weight["offsets"][0] == 48
    # offsets tile the data section, in order
    ends = [0] + [entry["offsets"][1] for entry in report["entries"]]
    assert [entry["offsets"][0] for entry in report["entries"]] == ends[:-1]
    assert ends[-1] == report["data_bytes"]
    totals = report["totals"]
    assert totals == {
        "entries": 4,
        "tensors": 4,
        "arrays": 1,
        "bytes": report["data_bytes"],
        "bytes_by_dtype": totals["bytes_by_dtype"],
    }
    assert sum(totals["bytes_by_dtype"].values()) == totals["bytes"]
    skeleton = report["skeleton"]
    assert skeleton["type"] == "dict"
    items = {item["key"]: item["value"] for item in skeleton["items"]}
    assert items["['step']"] == {"type": "int", "repr": "7"}
    assert items["['view']"]["type"] == "tensor" and items["['view']"]["shape"] == [3]
    assert items["['array']"] == {
        "type": "ndarray",
        "dtype": "<i2",
        "shape": [2, 3],
        "entry": items["['array']"]["entry"],
    }
    assert items["['options']"]["items"] == [
        {"key": ".epochs", "value": {"type": "int", "repr": "3"}}
    ]


def test_a_plain_safetensors_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file(
        {"a": torch.zeros(2, 2), "b": torch.ones(3, dtype=torch.int8)}, path
    )
    code, report = run_json(capsys, str(path))
    assert code == 0 and report["valid"] is True
    assert report["astage_format"] is None and report["skeleton"] is None
    assert [entry["name"] for entry in report["entries"]] == ["a", "b"]
    assert [entry["paths"] for entry in report["entries"]] == [["['a']"], ["['b']"]]
    assert report["totals"]["tensors"] == 2
    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0 and "format: plain safetensors, not written by astage" in out


def test_reads_the_header_only_unless_verify(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[tuple[int, int]] = []  # (offset, bytes) of every read of the file
    pread, preadv = os.pread, os.preadv

    def counting_pread(fd: int, nbytes: int, offset: int) -> bytes:
        reads.append((offset, nbytes))
        return pread(fd, nbytes, offset)

    def counting_preadv(fd: int, buffers: list[Any], offset: int) -> int:
        reads.append((offset, sum(len(memoryview(b)) for b in buffers)))
        return preadv(fd, buffers, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    monkeypatch.setattr(os, "preadv", counting_preadv)
    code, report = run_json(capsys, str(checkpoint))
    assert code == 0 and reads
    assert max(offset + nbytes for offset, nbytes in reads) <= report["header_bytes"]
    reads.clear()
    code, report = run_json(capsys, "--verify", str(checkpoint))
    assert code == 0 and report["verified"] is True
    assert max(offset + nbytes for offset, nbytes in reads) == report["file_bytes"]


def test_verify_reports_what_load_refuses(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_load(path: str) -> None:
        raise astage.CheckpointFormatError(f"{path}: the file ends before its data does")

    monkeypatch.setattr(_report, "load", failing_load)
    code, out, err = run(capsys, "inspect", "--verify", str(checkpoint))
    assert code == 1 and out == ""
    assert err == f"astage inspect: {checkpoint}: the file ends before its data does\n"
    code, report = run_json(capsys, "--verify", str(checkpoint))
    assert code == 1 and report["valid"] is False and report["verified"] is False


# -- usage -----------------------------------------------------------------------------------------


def test_help_version_and_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "inspect" in out
    code, out, _ = run(capsys, "inspect", "--help")
    assert code == 0 and "--json" in out and "--verify" in out
    code, out, _ = run(capsys, "--version")
    assert (code, out) == (0, f"astage {astage.__version__}\n")
    assert run(capsys)[0] == 2  # no command
    assert run(capsys, "inspect")[0] == 2  # no path
    assert run(capsys, "frobnicate", "x")[0] == 2
    code, out, err = run(capsys, "inspect", str(tmp_path / "nothing"))
    assert (code, out) == (2, "")
    assert err == f"astage inspect: no file or folder at {tmp_path / 'nothing'}\n"


def test_the_console_script_is_main() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["project"]["scripts"]
    module, _, name = scripts["astage"].partition(":")
    assert getattr(importlib.import_module(module), name) is main


# -- bad files: exit 1, one line, no traceback -----------------------------------------------------


def _truncated(raw: bytes) -> bytes:
    return raw[:-5]


def _header_edited(raw: bytes) -> bytes:
    return raw.replace(b'"run":"demo"', b'"run":"demO"')


def _hostile_length(raw: bytes) -> bytes:
    return struct.pack("<Q", 1 << 62) + raw[8:]


def _not_json(raw: bytes) -> bytes:
    return raw[:8] + b"[" + raw[9:]


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        (_truncated, "truncated"),
        (_header_edited, "does not match the header"),
        (_hostile_length, "header length"),
        (_not_json, "does not start with '{'"),
        (lambda raw: b"", "too short"),
        (lambda raw: b"PK\x03\x04 a zip file, not a checkpoint", "header length"),
    ],
    ids=["truncated", "edited", "hostile-length", "not-json", "empty", "other-format"],
)
def test_a_bad_file_is_one_line_and_exit_1(
    checkpoint: Path,
    capsys: pytest.CaptureFixture[str],
    damage: Callable[[bytes], bytes],
    expected: str,
) -> None:
    checkpoint.write_bytes(damage(checkpoint.read_bytes()))
    code, out, err = run(capsys, "inspect", str(checkpoint))
    assert code == 1 and out == ""
    assert err.startswith(f"astage inspect: {checkpoint}: ") and expected in err
    assert err.count("\n") == 1
    code, report = run_json(capsys, str(checkpoint))
    assert code == 1 and set(report) == FILE_KEYS
    assert report["valid"] is False and expected in report["error"]
    assert report["entries"] == [] and report["skeleton"] is None


def test_a_crafted_skeleton_is_checked_as_load_checks_it(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The header's fields are fine and its digest matches, as an attacker would write it; the
    # view at ['view'] reaches past its entry, which only the skeleton's check can see.
    (length,) = struct.unpack("<Q", checkpoint.read_bytes()[:8])
    raw = checkpoint.read_bytes()
    header = json.loads(raw[8 : 8 + length])
    document = json.loads(header["__metadata__"]["astage"])
    pairs = document["skeleton"]["dict"]
    view = next(node for key, node in pairs if key == "view")
    view["offset"] = 1000
    header["__metadata__"]["astage"] = json.dumps(document)
    text = header_text(header)
    checkpoint.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
    code, out, err = run(capsys, "inspect", str(checkpoint))
    assert code == 1 and out == ""
    assert "the skeleton node at ['view']" in err and "past the end of entry" in err


def test_a_fifo_does_not_block(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    code, _, err = run(capsys, "inspect", str(fifo))
    assert code == 1 and "not a regular file" in err


def test_terminal_escapes_from_a_file_are_not_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "escapes.safetensors"
    evil = "\x1b]0;owned\x07\x1b[2J"
    astage.save_sync({evil: torch.zeros(1), "v": evil}, path, metadata={evil: evil})
    code, out, _ = run(capsys, "inspect", str(path))
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;owned\\x07" in out
    code, report = run_json(capsys, str(path))  # JSON keeps the strings, escaped by JSON
    assert report["metadata"][evil] == evil


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_damaged_headers_never_raise(
    checkpoint: Path, capsys: pytest.CaptureFixture[str], data: st.DataObject
) -> None:
    raw = bytearray(checkpoint.read_bytes())
    length = struct.unpack("<Q", raw[:8])[0]
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, 8 + length - 1))
        raw[where] = data.draw(st.integers(0, 255))
    damaged = checkpoint.with_name("damaged.safetensors")
    damaged.write_bytes(bytes(raw))
    code, _, err = run(capsys, "inspect", str(damaged))
    assert code in (0, 1)
    assert code == 0 or err.count("\n") == 1


@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(index=st.integers(0, 2), data=st.data())
def test_crafted_headers_are_reported_never_raised(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], index: int, data: st.DataObject
) -> None:
    # Fields rewritten with the digest recomputed (test_load_property's crafted files), so the
    # checks behind the digest are reached: inspect, plain and --json, reports or refuses.
    damaged = tmp_path / "crafted.safetensors"
    damaged.write_bytes(crafted(index, data))
    for argv in (["inspect", str(damaged)], ["inspect", "--json", str(damaged)]):
        code, _, err = run(capsys, *argv)
        assert code in (0, 1)
        assert code == 0 or err.count("\n") == 1


# -- a CheckpointDir folder ------------------------------------------------------------------------


def folder(tmp_path: Path, steps: list[int], latest: int | None) -> Path:
    root = tmp_path / "run"
    root.mkdir()
    for step in steps:
        astage.save_sync(
            {"step": step, "w": torch.full((2,), float(step))},
            root / f"step_{step:09d}.safetensors",
        )
    if latest is not None:
        (root / "latest").write_text(f"step_{latest:09d}.safetensors\n")
    return root


def test_a_good_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = folder(tmp_path, [100, 200, 300], latest=300)
    code, report = run_json(capsys, str(root))
    assert code == 0 and set(report) == FOLDER_KEYS
    assert report["kind"] == "checkpoint_dir" and report["valid"] is True
    assert [step["step"] for step in report["steps"]] == [100, 200, 300]
    assert all(step["valid"] and step["error"] is None for step in report["steps"])
    assert report["latest"] == {"step": 300, "problem": None}
    assert report["resume_step"] == report["newest_good_step"] == 300
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing skipped
        assert astage.CheckpointDir(root).latest_step() == 300
    code, out, _ = run(capsys, "inspect", str(root))
    assert code == 0
    assert f"{root}: checkpoint folder, 3 steps, valid" in out
    assert "resume from: step 300 (what CheckpointDir.load_latest() loads)" in out


def test_a_damaged_folder_says_what_resuming_would_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = folder(tmp_path, [100, 200, 300], latest=300)
    newest = root / "step_000000300.safetensors"
    newest.write_bytes(newest.read_bytes()[:-3])  # torn
    temp = root / ".step_000000400.safetensors.0123456789ab.tmp"
    temp.write_bytes(b"half a save")
    code, report = run_json(capsys, str(root))
    assert code == 1 and report["valid"] is False
    assert report["steps"][2]["valid"] is False and "truncated" in report["steps"][2]["error"]
    assert report["latest"]["step"] == 300 and "not valid" in report["latest"]["problem"]
    assert report["resume_step"] == report["newest_good_step"] == 200
    assert report["temporary_files"] == [temp.name]
    assert temp.exists()  # inspecting changes nothing
    with pytest.warns(astage.CheckpointSkippedWarning):
        assert astage.CheckpointDir(root).latest_step() == report["resume_step"]
    code, out, err = run(capsys, "inspect", str(root))
    assert (
        code == 1
        and err.count("\n") == 1
        and err.startswith(f"astage inspect: {root / 'latest'}: names step 300, ")
    )
    assert "step_000000300.safetensors: NOT VALID: " in out
    assert "resume from: step 200" in out


def test_latest_may_name_an_older_step(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = folder(tmp_path, [100, 200], latest=100)  # a run that went back to step 100
    code, report = run_json(capsys, str(root))
    assert code == 0
    assert (report["resume_step"], report["newest_good_step"]) == (100, 200)
    assert astage.CheckpointDir(root).latest_step() == 100


@pytest.mark.parametrize(
    ("pointer", "problem"),
    [(None, "missing"), (b"\x00\xff" * 400, "longer than"), (b"../etc/passwd", "names no step")],
)
def test_a_bad_latest(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pointer: bytes | None, problem: str
) -> None:
    root = folder(tmp_path, [100], latest=None)
    if pointer is not None:
        (root / "latest").write_bytes(pointer)
    code, report = run_json(capsys, str(root))
    assert code == 1 and problem in report["latest"]["problem"]
    assert report["resume_step"] == 100


def test_a_symlinked_step_file_is_not_followed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], checkpoint: Path
) -> None:
    root = folder(tmp_path, [], latest=None)
    (root / "step_000000001.safetensors").symlink_to(checkpoint)
    code, report = run_json(capsys, str(root))
    link = root / "step_000000001.safetensors"
    assert code == 1 and report["steps"][0]["error"] == f"{link}: not a regular file"
    assert report["resume_step"] is None


def test_an_empty_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "inspect", str(tmp_path))
    assert code == 1 and "no checkpoint in" in err
    assert "resume from: nothing" in out


# -- as a real command -----------------------------------------------------------------------------


def test_python_dash_m_astage(checkpoint: Path) -> None:
    # One interpreter start (torch's import is most of the time): a bad file, --json.
    checkpoint.write_bytes(b"\x08" + b"\x00" * 7 + b"{nope}  ")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    command = [sys.executable, "-m", "astage", "inspect", "--json", str(checkpoint)]
    done = subprocess.run(
        command, capture_output=True, text=True, env=env, check=False, timeout=120
    )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["valid"] is False and "not valid JSON" in report["error"]
    assert done.stderr == f"astage inspect: {report['error']}\n"
    assert "Traceback" not in done.stderr


def test_verify_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = folder(tmp_path, [1, 2], latest=2)
    code, report = run_json(capsys, "--verify", str(root))
    assert code == 0 and report["verified"] is True
    assert [step["verified"] for step in report["steps"]] == [True, True]
    code, out, _ = run(capsys, "inspect", "--verify", str(root))
    assert code == 0 and "verified: every valid step file read and loaded" in out


def test_the_collector_is_left_as_it_was(
    checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert gc.isenabled()
    assert run(capsys, "inspect", str(checkpoint))[0] == 0
    assert gc.isenabled()
    gc.disable()
    try:
        assert run(capsys, "inspect", str(checkpoint))[0] == 0
        assert not gc.isenabled()
    finally:
        gc.enable()

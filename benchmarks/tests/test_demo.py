"""``python -m benchmarks.demo`` end to end on a tiny model, on every event loop.

Each run starts a training job in a child process, kills it mid-save with SIGKILL, resumes in
this process and compares the losses with an uninterrupted run: a few seconds each.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch

from benchmarks import demo
from benchmarks.demo.crash import cut_latest
from benchmarks.demo.events import Printer
from benchmarks.gpt import Setup, Trainer
from benchmarks.runner import BACKENDS

TINY = ["--layers", "1", "--width", "64", "--vocab", "100", "--context", "16"]
TINY_SETUP = Setup(
    layers=1, width=64, heads=1, vocab=100, context=16, batch=2, device="cpu", seed=0
)
STEPS, CRASH_AT = 4, 3


def uninterrupted_losses(steps: int) -> list[float]:
    trainer = Trainer(TINY_SETUP)
    return [trainer.step() for _ in range(steps)]


def loss_table(out: str) -> dict[int, list[str]]:
    """The demo's loss table: step -> the losses printed on its line (repr of each float)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if "killed job" in line)
    table = {}
    for line in lines[start + 1 :]:
        cells = line.split()
        if not cells or not cells[0].isdigit():
            break
        table[int(cells[0])] = cells[1:]
    return table


# uvloop is asyncio's loop underneath: asyncio and trio cover the demo's two kinds of loop.
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "uvloop"])
def test_demo_crashes_resumes_and_matches_an_uninterrupted_run(
    backend: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "checkpoints"
    dcp = [] if backend != "trio" else ["--no-dcp"]  # the DCP table once is enough
    argv = [*TINY, "--steps", str(STEPS), "--crash-at", str(CRASH_AT), "--root", str(root)]
    assert demo.main([*argv, "--backend", backend, *dcp]) == 0
    out = capsys.readouterr().out
    assert "\r" not in out  # not a terminal: plain lines, nothing redrawn
    assert f"{backend} loop" in out
    assert "loop lag: how late a 1 ms heartbeat" in out
    assert f"snapshot {CRASH_AT}: its file is being written: kill -9 the job" in out
    assert "exit status -9" in out
    # The kill lands before or after the crash step's rename (a race the tiny file may win):
    # either way the newest checkpoint is then cut short, and resuming skips it.
    assert "is cut from" in out
    assert "   skipped step_" in out
    assert "resuming from step" in out

    # The printed losses are the uninterrupted run's, computed here afresh, bit for bit.
    expected = [repr(loss) for loss in uninterrupted_losses(STEPS)]
    table = loss_table(out)
    assert sorted(table) == list(range(1, STEPS + 1))
    for step, cells in table.items():
        assert cells and set(cells) == {expected[step - 1]}, (step, cells)
    assert len(table[STEPS]) == 2  # the last step: the uninterrupted run's and the resumed one's
    assert len(table[1]) == 2  # the first: the uninterrupted run's and the killed job's
    assert out.count(": OK") == 3
    assert "FAILED" not in out

    # The folder is left as a training run leaves it: the last step published, nothing torn.
    assert (root / "latest").read_text().strip() == f"step_{STEPS:09d}.safetensors"
    assert not [name for name in os.listdir(root) if name.endswith(".tmp")]
    if not dcp:
        for row in ("astage step", "(first)", "astage Stager cached", "DCP DefaultStager cached"):
            assert row in out
        assert "cached snapshot: astage" in out
    else:
        assert "DCP" not in out


def test_demo_fails_when_the_resume_is_not_exact(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The check is real: a resume that does not give back the saved state is caught.

    The weights are nudged (not only the optimizer's state dropped: when the kill lands late, the
    resume comes at the last step, whose loss does not depend on the optimizer's state yet).
    """
    restore = Trainer.restore

    def restore_not_quite(self: Trainer, checkpoint: dict[str, object]) -> None:
        restore(self, checkpoint)
        with torch.no_grad():
            for parameter in self.model.parameters():
                parameter.add_(1e-3)

    monkeypatch.setattr(Trainer, "restore", restore_not_quite)
    argv = [*TINY, "--steps", str(STEPS), "--crash-at", str(CRASH_AT), "--no-dcp"]
    assert demo.main(argv) == 1
    out = capsys.readouterr().out
    assert "bit for bit: FAILED" in out


def test_printer_redraws_a_status_line_only_on_a_terminal() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    step = {"kind": "step", "step": 1, "loss": 4.5, "seconds": 0.1}
    plain, terminal = io.StringIO(), Terminal()
    for stream in (plain, terminal):
        printer = Printer(stream)
        printer.status("step 1: training...")
        printer.event(step)
        printer.clear_status()
    assert plain.getvalue() == "step 1: loss 4.5000 (100 ms)\n"
    assert "\r\x1b[K" in terminal.getvalue()
    assert "step 1: loss 4.5000 (100 ms)\n" in terminal.getvalue()


def test_demo_rejects_bad_options(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="multiple"):
        demo.main(["--width", "100", "--heads", "3"])
    with pytest.raises(SystemExit, match="positive"):
        demo.main(["--steps", "0"])
    with pytest.raises(SystemExit, match="at least 3"):
        demo.main(["--steps", "2"])
    with pytest.raises(SystemExit, match="between 3 and"):
        demo.main(["--steps", "5", "--crash-at", "6"])
    (tmp_path / "step_000000001.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit, match="not an empty folder"):
        demo.main(["--root", str(tmp_path)])


def test_cut_latest_cuts_what_resuming_would_read(tmp_path: Path) -> None:
    """The file ``latest`` names, not the newest step file (one renamed before the pointer
    moved is never read while ``latest`` names a good file); the newest without a pointer."""
    for step in (1, 2, 3):
        (tmp_path / f"step_{step:09d}.safetensors").write_bytes(b"x" * 10)
    assert cut_latest(str(tmp_path)) == ("step_000000003.safetensors", 10, 5)
    (tmp_path / "latest").write_text("step_000000002.safetensors\n")
    assert cut_latest(str(tmp_path)) == ("step_000000002.safetensors", 10, 5)
    assert (tmp_path / "step_000000002.safetensors").stat().st_size == 5
    assert (tmp_path / "step_000000001.safetensors").stat().st_size == 10

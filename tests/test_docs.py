"""The docs run as written: every code block in README.md and docs/ is executed or says why not.

Each page's Python blocks run in order, in one namespace, in a fresh interpreter whose working
directory is an empty temporary folder (a page reads like one session). Markers are HTML
comments, invisible on the rendered page:

``<!-- doctest: skip REASON -->`` right before a block
    The block is not run here; REASON says why (it needs a GPU, several hosts, your own data).
    A skip without a reason fails this test.
``<!-- doctest: cuda -->`` right before a block
    The block runs only where CUDA is available (it is skipped, not failed, elsewhere).
``<!-- doctest: run -->`` right before a ``sh`` block
    The shell block runs too (``bash -e``, in the page's folder, after the Python blocks before it).
``<!-- doctest: gloo N -->`` right before a ``python`` block
    The block is a whole program for torchrun (``train.py``): it runs alone, in N processes on
    127.0.0.1 with the environment torchrun gives each rank (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), and every rank must exit 0.
``<!-- doctest-setup ... -->``
    Python that runs before the page's blocks: the reader's own objects an example assumes
    (a model, an optimizer), so the visible example stays short and still runs.

A Python block may ``await`` at its top level, as in ``python -m asyncio``: such a block runs
inside ``anyio.run`` (asyncio), as if it were the body of the reader's ``async def``.

Blocks in other languages (``text`` output, diagrams) are not code and are not run; a block with
no language at all fails this test, so every block says what it is.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])

CODE_LANGUAGES = frozenset({"python", "sh", "bash", "console"})
"""Block languages that are code: run, or marked with why not."""

_FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
_MARK = re.compile(r"^<!--\s*doctest:\s*(\w+)\s*(.*?)\s*-->\s*$")
_SETUP = re.compile(r"<!--\s*doctest-setup\s*\n(.*?)-->", re.DOTALL)

_MARKS = ("", "skip", "cuda", "run", "gloo")
_GLOO_RANKS = re.compile(r"^[1-8]$")

_RUNNER = r"""
import ast, inspect, multiprocessing, os, socket, subprocess, sys

import anyio


def run_unit(name, line, kind, code, namespace):
    if kind == "sh":
        subprocess.run(["bash", "-e", "-c", code], check=True)
    elif kind.startswith("gloo "):
        run_ranks(name, line, code, int(kind.split()[1]))
    elif kind != "cuda" or __import__("torch").cuda.is_available():
        run_block(name, line, code, namespace)


def run_block(name, line, code, namespace):
    # Top-level await, as in `python -m asyncio`: the block is the body of an async def.
    compiled = compile("\n" * line + code, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    if compiled.co_flags & inspect.CO_COROUTINE:

        async def body():
            await eval(compiled, namespace)

        anyio.run(body)
    else:
        exec(compiled, namespace)


def run_ranks(name, line, code, ranks):
    # What torchrun does for one node, minus the restarts: N processes, the env:// rendezvous.
    # The ranks fork from a server that imported torch once per page (importing it costs
    # seconds of CPU per process on a small machine); the server forked before any thread ran.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    children = [
        RANKS.Process(target=run_rank, args=(name, line, code, rank, ranks, port))
        for rank in range(ranks)
    ]
    for child in children:
        child.start()
    try:
        for child in children:
            child.join(timeout=180)
    finally:
        for child in children:
            if child.exitcode is None:
                child.kill()
                child.join()
    codes = [child.exitcode for child in children]
    if any(codes):
        raise SystemExit(f"{name}:{line}: ranks exited with {codes}")


def run_rank(name, line, code, rank, ranks, port):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(ranks),
                      LOCAL_WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    exec(compile("\n" * line + code, name, "exec"), {"__name__": "__main__"})


RANKS = multiprocessing.get_context("forkserver")
RANKS.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.checkpoint",
                              "torch.distributed.fsdp", "anyio", "astage", "astage.compat"])
"""


@dataclass(frozen=True)
class Block:
    """A fenced block of a page, with the marker right above it (if any)."""

    page: Path
    line: int
    language: str
    code: str
    mark: str
    reason: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of ``page`` in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    index = 0
    while index < len(lines):
        fence = _FENCE.match(lines[index])
        if fence is None:
            index += 1
            continue
        start = index
        indent = fence.group(1)  # a block inside a list item is indented with it
        body: list[str] = []
        index += 1
        while index < len(lines) and not lines[index].strip().startswith("```"):
            line = lines[index]
            body.append(line[len(indent) :] if line.startswith(indent) else line.lstrip())
            index += 1
        index += 1  # the closing fence
        mark, reason = "", ""
        above = start - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        if above >= 0 and (marker := _MARK.match(lines[above].strip())) is not None:
            mark, reason = marker.group(1), marker.group(2)
        found.append(Block(page, start + 1, fence.group(2), "\n".join(body) + "\n", mark, reason))
    return found


def setup_of(page: Path) -> str:
    return "\n".join(match.group(1) for match in _SETUP.finditer(page.read_text("utf-8")))


def _script(page: Path) -> str:
    """The page as one Python program.

    Each block is compiled under its page's name with its own line numbers, so a traceback
    points at the line of the page; shell blocks run through ``bash`` in their turn.
    """
    units: list[tuple[str, int, str, str]] = [("setup", 0, "python", setup_of(page))]
    for block in blocks_of(page):
        if block.language not in CODE_LANGUAGES or block.mark == "skip":
            continue
        name = str(page.relative_to(ROOT))
        if block.mark == "gloo":
            units.append((name, block.line, f"gloo {block.reason}", block.code))
        elif block.language == "python":
            units.append((name, block.line, block.mark or "python", block.code))
        elif block.mark == "run":
            units.append((name, block.line, "sh", block.code))
    return (
        # The guard: the rank processes import this script as a module (multiprocessing).
        _RUNNER + "\nif __name__ == '__main__':\n"
        "    namespace = {'__name__': '__main__'}\n"
        f"    for name, line, kind, code in {units!r}:\n"
        "        run_unit(name, line, kind, code, namespace)\n"
    )


def test_every_block_says_what_it_is() -> None:
    problems = []
    for page in PAGES:
        for block in blocks_of(page):
            if not block.language:
                problems.append(f"{block.where}: a block with no language (text? python?)")
            elif block.mark == "skip" and not block.reason:
                problems.append(f"{block.where}: `doctest: skip` needs a reason")
            elif block.mark not in _MARKS:
                problems.append(f"{block.where}: unknown marker doctest: {block.mark}")
            elif block.mark == "gloo" and (
                block.language != "python" or not _GLOO_RANKS.match(block.reason)
            ):
                problems.append(f"{block.where}: `doctest: gloo N` is for a python block, N 1-8")
            elif block.language in ("sh", "bash", "console") and block.mark not in (
                "skip",
                "run",
            ):
                problems.append(
                    f"{block.where}: a shell block runs (`doctest: run`) or says why not "
                    "(`doctest: skip REASON`)"
                )
    assert not problems, "\n".join(problems)


_RUNNABLE = [
    page
    for page in PAGES
    if any(
        block.language == "python" or block.mark == "run"
        for block in blocks_of(page)
        if block.mark != "skip"
    )
]


PAGES_AT_ONCE = 2
"""Pages run side by side: each is a subprocess that mostly waits (imports, ranks, sleeps), so
two at a time keep the suite's 2 cores busy while pytest only waits for their results."""


def _run_page(page: Path, folder: Path) -> subprocess.CompletedProcess[str]:
    script = folder / "page.py"
    script.write_text(_script(page), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.fixture(scope="module")
def page_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[Path, Future[subprocess.CompletedProcess[str]]]]:
    """Every runnable page started (``PAGES_AT_ONCE`` at a time); a test waits for its own."""
    with ThreadPoolExecutor(PAGES_AT_ONCE, thread_name_prefix="doc-page") as pool:
        yield {
            page: pool.submit(_run_page, page, tmp_path_factory.mktemp(page.stem))
            for page in _RUNNABLE
        }


@pytest.mark.slow
@pytest.mark.parametrize("page", _RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in _RUNNABLE])
def test_page_runs_as_written(
    page: Path, page_runs: dict[Path, Future[subprocess.CompletedProcess[str]]]
) -> None:
    done = page_runs[page].result()
    assert done.returncode == 0, (
        f"{page.relative_to(ROOT)} does not run as written:\n{done.stdout[-3000:]}\n"
        f"{done.stderr[-6000:]}"
    )


def test_api_page_names_every_public_name() -> None:
    """docs/api.md mentions every name of ``astage``, ``astage.compat`` and ``astage.lightning``."""
    import astage
    import astage.compat

    modules = [astage, astage.compat]
    try:
        import astage.lightning
    except ImportError:  # the lightning extra is not installed
        pass
    else:
        modules.append(astage.lightning)
    page = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    missing = [
        f"{module.__name__}.{name}"
        for module in modules
        for name in module.__all__
        if re.search(rf"\b{re.escape(name)}\b", page) is None
    ]
    assert not missing, f"docs/api.md does not mention: {', '.join(missing)}"


def _output_block(page: Path, first_line: str) -> str:
    """The ``text`` block of ``page`` that starts with ``first_line``: what an example prints."""
    found = [
        block.code
        for block in blocks_of(page)
        if block.language == "text" and block.code.startswith(first_line)
    ]
    assert len(found) == 1, f"{page.relative_to(ROOT)}: no single text block starts {first_line!r}"
    return found[0]


def test_shown_outputs_are_what_the_examples_print(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The ``text`` blocks that show an example's output (README's staging error, the guide's
    ``astage inspect`` of a file and of a folder) match what the code prints now: the pages'
    runs execute the examples but do not compare what they print."""
    import threading

    import anyio
    import torch

    import astage
    from astage._cli import main

    monkeypatch.chdir(tmp_path)
    state: dict[str, object] = {"optim": {"state": {3: {"lock": threading.Lock()}}}}
    with pytest.raises(astage.UnstageableError) as error, astage.SyncStager() as stager:
        stager.stage(state)
    assert f"{error.value}\n" == _output_block(ROOT / "README.md", "at ['optim']")

    guide = ROOT / "docs" / "guide.md"
    model = torch.nn.Linear(4, 2)
    state = {"model": model.state_dict(), "step": 100, "lr": 0.001}
    astage.save_sync(state, "ckpt.safetensors", metadata={"run": "demo"})
    capsys.readouterr()
    assert main(["inspect", "ckpt.safetensors"]) == 0
    assert capsys.readouterr().out == _output_block(guide, "ckpt.safetensors: valid")

    async def train() -> None:
        async with astage.CheckpointDir("run", keep=2) as folder:
            for step in (100, 200, 300):
                await folder.save(step, {"model": model.state_dict(), "step": step})

    anyio.run(train)
    with open("run/step_000000300.safetensors", "r+b") as torn:
        torn.truncate(100)
    assert main(["inspect", "run"]) == 1
    assert capsys.readouterr().out == _output_block(guide, "run: checkpoint folder")

"""One DCP save's state (:class:`Save`), and the saves running into each folder in this process.

DCP makes every call of a save in one thread (the caller's for ``dcp.save``, the upload's own
for ``dcp.async_save``), and two uploads may run at once, with one writer or several: so a
save's folder, save id and rank are kept per thread (:class:`ThreadSaves`), and the saves
running into a folder are listed, so that one names its data files apart from another's and a
commit removes none of them (:func:`remove_unreferenced`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import threading
from collections.abc import Iterable

from torch.distributed.checkpoint.filesystem import _StorageInfo

from ._storage import DATA_SUFFIX, METADATA_NAME

_DATA_FILE = re.compile(r"__\d+_.*\.distcp\Z")


@dataclasses.dataclass(eq=False)
class Save:
    """One save's folder, save id and place in the process group.

    Saves into one folder may overlap in a process (``dcp.async_save`` uploads that run at once,
    with one writer or several): from :meth:`begin` to :meth:`end`, a save is listed as running
    in its folder, so that another one names its files apart from it (:meth:`prefix`) and
    removes none of them (:func:`remove_unreferenced`) while it has not committed yet.
    """

    path: str
    save_id: str
    is_coordinator: bool
    rank: int | None
    use_collectives: bool
    thread: threading.Thread = dataclasses.field(default_factory=threading.current_thread)
    prefixes: list[str] = dataclasses.field(default_factory=list)  # the names it gave out
    ended: bool = False
    folder_key: str = dataclasses.field(init=False)  # one folder, however it is named

    def __post_init__(self) -> None:
        self.folder_key = os.path.realpath(self.path)

    def begin(self) -> None:
        """Listed as running; the save this thread ran before (with any writer) is over: DCP
        runs one save at a time in a thread, and tells no writer of a failure between calls
        (its files would be kept from removal for as long as the thread lives)."""
        previous = getattr(_thread_save, "save", None)
        if previous is not None:
            previous.end()
        _thread_save.save = self
        if not self.is_coordinator and self.use_collectives:
            return  # the coordinator names this rank's files and commits them
        with _RUNNING_LOCK:
            _RUNNING.setdefault(self.folder_key, []).append(self)

    def end(self) -> None:
        """Over (committed or failed): no longer listed."""
        with _RUNNING_LOCK:
            self.ended = True
            saves = _RUNNING.get(self.folder_key, [])
            if self in saves:
                saves.remove(self)
            if not saves:
                _RUNNING.pop(self.folder_key, None)

    def others_running(self) -> list[Save]:
        """The other saves into this folder still running in this process (call under the
        lock). A save whose thread is gone without an end (a failure DCP never reports to
        the writer) is not: so no failure keeps a folder's old files forever."""
        return [
            other
            for other in _RUNNING.get(self.folder_key, [])
            if other is not self and not other.ended and other.thread.is_alive()
        ]

    def others_names(self) -> re.Pattern[str] | None:
        """The data file names of the other saves into this folder still running."""
        with _RUNNING_LOCK:
            prefixes = [p for other in self.others_running() for p in other.prefixes]
        if not prefixes:
            return None
        suffix = r"\d+" + re.escape(DATA_SUFFIX)
        return re.compile("|".join(re.escape(prefix) + suffix for prefix in prefixes))

    def metadata_path(self) -> str:
        name = (
            f"__{self.rank}{METADATA_NAME}"
            if not self.use_collectives and self.rank is not None
            else METADATA_NAME
        )
        return os.path.join(self.path, name)

    def prefix(self, rank: int) -> str:
        # Over a committed checkpoint, fresh names: its files stay whole until the new metadata
        # replaces its own (a crash in between leaves it loadable). Either kind of metadata
        # may name __{rank}_0.distcp: the global .metadata (which DCP loads first) and the
        # rank's own __{rank}.metadata of a save without collectives (loaded when there is
        # no global one).
        # Fresh names too beside another save into the folder still running: it may use the
        # plain ones, and both would rename their files onto the same names.
        names = (METADATA_NAME, f"__{rank}{METADATA_NAME}")
        committed = any(os.path.exists(os.path.join(self.path, name)) for name in names)
        with _RUNNING_LOCK:
            fresh = committed or bool(self.others_running())
            prefix = f"__{rank}_{self.save_id}_" if fresh else f"__{rank}_"
            self.prefixes.append(prefix)
        return prefix

    def claim(self, planned: str, file_count: int) -> str:
        """The prefix this rank's data files get: ``planned``, unless its names may be another
        save's. The plan's prefix comes from the coordinator, or from DCP's plan cache
        (``DefaultSavePlanner(enable_plan_caching=True)`` hands every save the first one's
        plan, names included): a prefix not given out for this save, whose names are taken
        or may be taken by another save running, is made this rank's own."""
        names = [f"{planned}{number}{DATA_SUFFIX}" for number in range(file_count)]
        with _RUNNING_LOCK:
            if planned in self.prefixes:
                return planned  # given out for this save, by prefix(): fresh where it must be
            taken = bool(self.others_running()) or any(
                os.path.lexists(os.path.join(self.path, name)) for name in names
            )
            prefix = f"{planned}{secrets.token_hex(8)}_" if taken else planned
            self.prefixes.append(prefix)
        return prefix


_RUNNING_LOCK = threading.Lock()
COMMIT_LOCK = threading.Lock()  # one commit and its removals at a time, in this process
_RUNNING: dict[str, list[Save]] = {}  # a folder's real path -> its saves running (see Save)
_thread_save = threading.local()  # .save: the save this thread runs or ran last, any writer's


class ThreadSaves(threading.local):
    """Per thread: the folder a ``reset()`` chose for the next save, and the save running."""

    reset_path: str | None = None
    save: Save | None = None


def remove_unreferenced(save: Save, records: Iterable[object], prefix: str = "__") -> None:
    """Remove data files of a replaced checkpoint (those whose names start with ``prefix``):
    the new metadata is durable already. Not the files of another save into the folder that
    is still running: it commits later, and its metadata names them."""
    referenced = {r.relative_path for r in records if isinstance(r, _StorageInfo)}
    try:
        names = os.listdir(save.path)
    except OSError:
        return
    # Listed first, asked second: a running save gives out its names before it writes a file
    # under them, so each file listed here is either one of theirs known now, or no one's.
    running = save.others_names()
    for name in names:
        if (
            _DATA_FILE.match(name)
            and name.startswith(prefix)
            and name not in referenced
            and not (running is not None and running.fullmatch(name))
        ):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(save.path, name))

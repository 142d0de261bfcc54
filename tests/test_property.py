"""Property-based staging: random nested state dicts, every face, ``copy.deepcopy`` semantics.

Hypothesis builds state dicts out of dicts, OrderedDicts, lists, tuples, namedtuples and
dataclasses (plain, frozen, slotted, frozen and slotted), with shared references and cycles,
around tensors of every dtype in ``conftest.DTYPES``: dense ones (0-d, empty, odd strides on
size-1 and size-0 dimensions), views of shared storages under other dtypes (a ``bool`` view of
random bytes, say) with any shape, stride and offset, conjugate and negative views, tied tensors
and Parameters. Each face stages every state dict twice, with all source bytes changed in
between (a first call, then a cached one), and the result must be what ``copy.deepcopy`` gives:

* every tensor on CPU, of the source's type, dtype, shape, stride, storage offset, conjugate and
  negative bits, with all of its storage's bytes equal to the source storage's, in memory of
  its own;
* two staged tensors share a storage exactly when their sources did;
* one staged object per source object (shared references stay shared, cycles stay closed),
  of the source's type, and the same object as the source exactly where ``copy.deepcopy``
  returns the source itself (atomic values, tuples of them).

The faces are the conftest ``Driver`` kinds (every entry of ``conftest.DRIVERS``), the async
Stager with tiny chunks (sliced copies, a tight in-flight budget), and
``astage.compat.StateDictStager``. The run is derandomized and keeps no example database, so CI
sees the same examples every time; ``ASTAGE_PROPERTY_EXAMPLES`` sets the examples per face for a
longer local run (e.g. 2000).
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import enum
import functools
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
import torch
from conftest import DRIVERS, DTYPES, Driver, bytes_of, derandomized

pytest.importorskip("hypothesis")  # not on the GPU machines

from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from astage import compat

# -- the faces ----------------------------------------------------------------------------------


class Face:
    """One way to stage: ``stage(state_dict)`` returns the staged copy."""

    def __init__(self, stage: Callable[[Any], Any], close: Callable[[], None]) -> None:
        self.stage = stage
        self.close = close


def _driver_face(kind: str, **overrides: Any) -> Face:
    driver = Driver(kind, **overrides)
    return Face(driver.stage, driver.close)


def _compat_face() -> Face:
    stager = compat.StateDictStager()
    return Face(stager.stage, stager.close)


FACES: dict[str, Callable[[], Face]] = {
    **{kind: functools.partial(_driver_face, kind) for kind in DRIVERS},
    # Copies sliced into pieces of a few bytes, at most a few in flight: the batching paths.
    "asyncio-tiny-chunks": functools.partial(
        _driver_face, "asyncio", chunk_bytes=8, max_inflight_bytes=24
    ),
    "compat.StateDictStager": _compat_face,
}


@pytest.fixture(scope="module", params=list(FACES))
def face(request: pytest.FixtureRequest) -> Iterator[Face]:
    """One stager per face for the whole module: examples also meet a cache with history."""
    made = FACES[request.param]()
    yield made
    made.close()


# -- what a state dict is made of ---------------------------------------------------------------


class Pair(NamedTuple):
    first: Any
    second: Any


@dataclasses.dataclass
class Plain:
    first: Any
    second: Any = None


@dataclasses.dataclass(frozen=True)
class Frozen:
    first: Any
    second: Any = None


@dataclasses.dataclass(slots=True)
class Slotted:
    first: Any
    second: Any = None


@dataclasses.dataclass(frozen=True, slots=True)
class FrozenSlotted:
    first: Any
    second: Any = None


class Color(enum.Enum):
    RED = 1


DATACLASSES = [Plain, Frozen, Slotted, FrozenSlotted]
MUTABLE = (list, dict, collections.OrderedDict, Plain, Slotted)  # what can close a cycle
ATOMS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.binary(max_size=4),
    st.sampled_from([torch.float32, torch.device("cpu"), torch.Size([2, 3]), Color.RED]),
)
# Immutable or process-wide values: staged as themselves (copy.deepcopy copies some of them).
ATOMIC_TYPES = {type(None), bool, int, float, str, bytes, torch.dtype, torch.device, torch.Size}
GRAD_DTYPES = {torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64}


def _random_bytes(nbytes: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)


def _fill_storage(t: torch.Tensor, seed: int) -> torch.Tensor:
    storage = t.untyped_storage()
    if storage.nbytes():
        bytes_of(storage).copy_(_random_bytes(storage.nbytes(), seed))
    return t


@st.composite
def _shapes(draw: st.DrawFn) -> tuple[int, ...]:
    return tuple(draw(st.lists(st.integers(0, 4), max_size=3)))


@st.composite
def _dense(draw: st.DrawFn) -> torch.Tensor:
    """A tensor with a storage of its own: 0-d, empty, and odd strides on size-1/0 dims."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(_shapes())
    strides = []
    step = 1
    for size in reversed(shape):
        # is_contiguous() ignores the stride of a size-1 or size-0 dimension: any will do.
        strides.append(draw(st.integers(0, 9)) if size <= 1 else step)
        step *= max(size, 1)
    t = torch.empty_strided(shape, tuple(reversed(strides)), dtype=dtype)
    return _fill_storage(t, draw(st.integers(0, 2**31)))


@st.composite
def _view(draw: st.DrawFn, bases: list[torch.Tensor]) -> torch.Tensor:
    """A view of a shared storage, as any dtype, shape, stride and offset that fits in it."""
    base = draw(st.sampled_from(bases))  # flat uint8, a multiple of 16 bytes
    typed = base.view(draw(st.sampled_from(DTYPES)))
    numel = typed.numel()
    if numel == 0 or (draw(st.booleans()) and draw(st.booleans())):
        return typed  # the whole storage, flat
    shape = draw(_shapes())
    strides = [draw(st.integers(0, 5)) for _ in shape]
    extent = sum((size - 1) * stride for size, stride in zip(shape, strides, strict=True))
    if 0 in shape:
        offset = draw(st.integers(0, numel))
    elif extent < numel:
        offset = draw(st.integers(0, numel - 1 - extent))
    else:
        return typed[draw(st.integers(0, numel - 1)) :]  # does not fit: a slice instead
    return torch.as_strided(typed, shape, strides, offset)


@st.composite
def _tensors(draw: st.DrawFn) -> list[torch.Tensor]:
    """The tensors of one state dict; several may view one storage."""
    bases = [
        _random_bytes(16 * draw(st.integers(0, 8)), draw(st.integers(0, 2**31)))
        for _ in range(draw(st.integers(1, 3)))
    ]
    tensors = []
    for _ in range(draw(st.integers(1, 8))):
        t = draw(st.one_of(_dense(), _view(bases)))
        if t.is_complex() and draw(st.booleans()):
            t = t.conj()
            if draw(st.booleans()):
                t = t.imag  # a negative view (is_neg) of the conjugate's imaginary part
        elif not t.is_conj() and draw(st.integers(0, 5)) == 0:
            t = torch.nn.Parameter(t, requires_grad=t.dtype in GRAD_DTYPES and draw(st.booleans()))
        tensors.append(t)
    return tensors


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, Any]:
    """A state dict with shared references and cycles around :func:`_tensors`."""
    tensors = draw(_tensors())
    built: list[Any] = []  # every container so far: later ones may share or point back to them

    def node(depth: int) -> Any:
        kind = draw(st.integers(0, 9 if depth < 3 else 2))
        if kind == 0:
            return draw(ATOMS)
        if kind in (1, 2):
            return draw(st.sampled_from(tensors))  # the same tensor object may come back: tied
        if kind == 3 and built:
            return draw(st.sampled_from(built))  # a shared reference
        children = [node(depth + 1) for _ in range(draw(st.integers(0, 3)))]
        first, second = [*children, None, None][:2]
        made: Any
        if kind in (3, 4):
            made = {f"k{i}": child for i, child in enumerate(children)}
            if draw(st.booleans()):
                made = collections.OrderedDict(made)
        elif kind == 5:
            made = children
        elif kind == 6:
            made = tuple(children)
        elif kind == 7:
            made = Pair(first, second)
        else:
            made = draw(st.sampled_from(DATACLASSES))(first, second)
        built.append(made)
        return made

    root = {f"k{i}": node(0) for i in range(draw(st.integers(1, 4)))}
    built.append(root)
    # Cycles (and more sharing): mutable containers that refer to containers built before.
    mutable = [x for x in built if type(x) in MUTABLE]
    for _ in range(draw(st.integers(0, 3))):
        holder = draw(st.sampled_from(mutable))
        target = draw(st.sampled_from(built))
        if isinstance(holder, list):
            holder.append(target)
        elif isinstance(holder, dict):
            holder[f"back{len(holder)}"] = target
        else:
            holder.second = target
    return root


# -- the oracle ---------------------------------------------------------------------------------


class Checker:
    """Walks a source, its staged copy and ``copy.deepcopy``'s copy side by side."""

    def __init__(self) -> None:
        self.staged_of: dict[int, Any] = {}  # id(source object) -> its staged twin
        self.source_of: dict[int, Any] = {}  # id(staged object) -> its source
        self.storage_of: dict[int, int] = {}  # source storage address -> staged storage's
        self.keep: list[Any] = []  # ids above stay valid

    def check(self, source: Any, staged: Any, expected: Any, path: str) -> None:
        if isinstance(source, torch.Tensor):
            self._once(source, staged, path)
            self._tensor(source, staged, path)
            return
        assert type(staged) is type(source), f"{path}: {type(staged)} for {type(source)}"
        if type(source) in ATOMIC_TYPES:
            assert staged is source, f"{path}: an atomic value was copied"
            return
        kept = expected is source  # copy.deepcopy returned the object itself
        assert (staged is source) == kept, f"{path}: deepcopy kept the source: {kept}"
        if kept:
            return
        if not self._once(source, staged, path):
            return  # met before: its contents are checked already
        if isinstance(source, dict):
            assert list(staged) == list(source), path
            for key, value in source.items():
                self.check(value, staged[key], expected[key], f"{path}[{key!r}]")
        elif isinstance(source, (list, tuple)):
            assert len(staged) == len(source), path
            for index, value in enumerate(source):
                self.check(value, staged[index], expected[index], f"{path}[{index}]")
        elif dataclasses.is_dataclass(source):
            for field in dataclasses.fields(source):
                name = field.name
                value = getattr(source, name)
                self.check(value, getattr(staged, name), getattr(expected, name), f"{path}.{name}")
        else:
            raise AssertionError(f"{path}: the generator made a {type(source)}")

    def _once(self, source: Any, staged: Any, path: str) -> bool:
        """Record ``source -> staged``; False if the pair was met before (it must be the same)."""
        seen = self.staged_of.get(id(source))
        if seen is not None:
            assert seen is staged, f"{path}: a shared source became two staged objects"
            return False
        other = self.source_of.get(id(staged))
        assert other is None, f"{path}: two sources became one staged object"
        self.staged_of[id(source)] = staged
        self.source_of[id(staged)] = source
        self.keep += [source, staged]
        return True

    def _tensor(self, source: torch.Tensor, staged: Any, path: str) -> None:
        assert type(staged) is type(source), f"{path}: {type(staged)} for {type(source)}"
        assert staged.device.type == "cpu", path
        got = (staged.dtype, staged.shape, staged.stride(), staged.storage_offset())
        want = (source.dtype, source.shape, source.stride(), source.storage_offset())
        assert got == want, f"{path}: dtype, shape, stride, offset {got} for {want}"
        assert (staged.is_conj(), staged.is_neg()) == (source.is_conj(), source.is_neg()), path
        assert staged.requires_grad == source.requires_grad, path
        source_storage, staged_storage = source.untyped_storage(), staged.untyped_storage()
        assert staged_storage.nbytes() == source_storage.nbytes(), path
        if not source_storage.nbytes():
            return
        assert torch.equal(bytes_of(staged_storage), bytes_of(source_storage)), (
            f"{path}: the staged storage's bytes differ from the source's"
        )
        source_address, staged_address = source_storage.data_ptr(), staged_storage.data_ptr()
        assert staged_address != source_address, f"{path}: the staged tensor aliases its source"
        known = self.storage_of.setdefault(source_address, staged_address)
        assert known == staged_address, f"{path}: one source storage became two staged ones"

    def check_aliasing(self) -> None:
        staged_addresses = list(self.storage_of.values())
        assert len(set(staged_addresses)) == len(staged_addresses), (
            "two source storages became one staged storage"
        )


def _check(source: dict[str, Any], staged: Any) -> None:
    # copy.deepcopy copies a torch.device or torch.Size (and so the tuples holding one); astage
    # stages them as themselves. A memo that maps them to themselves makes deepcopy agree.
    atoms = {id(x): x for x in _reachable(source) if type(x) in ATOMIC_TYPES}
    checker = Checker()
    checker.check(source, staged, copy.deepcopy(source, atoms), "")
    checker.check_aliasing()


def _reachable(source: Any) -> Iterator[Any]:
    """Every object reachable from ``source`` through the generated containers, once."""
    stack = [source]
    visited: set[int] = set()
    while stack:
        x = stack.pop()
        if id(x) in visited:
            continue
        visited.add(id(x))
        yield x
        if isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
        elif dataclasses.is_dataclass(x):
            stack.extend(getattr(x, field.name) for field in dataclasses.fields(x))


def _change_every_byte(source: Any) -> None:
    """Flip bits in every storage the source reaches (a training step, bool views included)."""
    seen: set[int] = set()
    for x in _reachable(source):
        if isinstance(x, torch.Tensor):
            storage = x.untyped_storage()
            if storage.nbytes() and storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                bytes_of(storage).bitwise_xor_(0x5A)


# -- the property -------------------------------------------------------------------------------


@derandomized("ASTAGE_PROPERTY_EXAMPLES", 200, HealthCheck.data_too_large)
@given(source=state_dicts())
def test_staging_is_a_deep_copy(face: Face, source: dict[str, Any]) -> None:
    staged = face.stage(source)
    _check(source, staged)
    del staged  # a cached call may reuse the buffers of the result before
    _change_every_byte(source)
    _check(source, face.stage(source))

"""Hunting the header parsed in pieces and the projection of shared containers' size.

``object_in_pieces`` must give, for any text a file sends, ``json.loads``' value of the whole
or None (the whole is then parsed), at a cost a file cannot blow up; a file written by astage
and then edited is read as its whole header means, or refused naming the file. The encoders'
least JSON size (``least_json_bytes`` and the running count) must never refuse what fits,
and must not let a skeleton many times over the limit through to its (slow, huge) encoding.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import derandomized

import astage
from astage._files import _load
from astage._files._layout import _LayoutBuilder, plan_layout
from astage._files._safetensors import DIGEST_KEY
from astage._files._skeleton import least_json_bytes
from astage._replication import _wire

pytest.importorskip("hypothesis")  # not on the GPU machines

from hypothesis import given
from hypothesis import strategies as st


def _whole(text: str) -> tuple[str, Any]:
    try:
        return "value", json.loads(text, parse_constant=_load._no_constant)
    except (ValueError, RecursionError):
        return "error", None


def _same_as_whole(text: str) -> bool:
    """object_in_pieces gives None or exactly the whole's value (members in order)."""
    pieces = _load.object_in_pieces(text)
    if pieces is None:
        return True
    kind, whole = _whole(text)
    return (
        kind == "value"
        and type(whole) is dict
        and list(pieces.items()) == list(whole.items())
        and repr(pieces) == repr(whole)
    )


# -- object_in_pieces against json.loads ------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**30), 10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(alphabet=st.sampled_from(["a", ",", "\n", '"', "\\", "\r", "\ud800", "é"])),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=2), inner),
    max_leaves=10,
)
_edits = st.sampled_from(
    [
        ",\n",
        ",",
        "\n",
        "{",
        "}",
        "[",
        "]",
        '"',
        "\\",
        ":",
        "\\u002c",
        "\\n",
        ",\r\n",
        "\ufeff",
        "NaN",
        "Infinity",
        "-Infinity",
        "1e999",
        "\\ud800",
        '"a":1',
        "",
        " ",
        "\t",
        "\r",
    ]
)


@derandomized("ASTAGE_PIECES_EXAMPLES", 400)
@given(
    members=st.lists(st.tuples(st.sampled_from(["a", "b", "__metadata__", ""]), _json)),
    seps=st.lists(st.sampled_from([",\n", ",", ", \n", ",\n ", ",\r\n", "\n,\n"]), min_size=1),
    edits=st.lists(st.tuples(st.integers(0, 1 << 12), st.integers(0, 3), _edits), max_size=3),
    pad=st.sampled_from(["", " ", "\n", "\t", "\xa0", ",\n"]),
)
def test_pieces_are_the_whole_or_nothing_for_any_text(
    members: list[tuple[str, Any]],
    seps: list[str],
    edits: list[tuple[int, int, str]],
    pad: str,
) -> None:
    # Regression guard (held): members with duplicate keys across runs, ",\n" escaped in
    # strings, cuts at deeper commas, stray edits: never a value other than the whole's.
    texts = [json.dumps(key) + ":" + json.dumps(value) for key, value in members]
    text = "{" + "".join((seps[i % len(seps)] if i else "") + t for i, t in enumerate(texts))
    text += "}" + pad
    for place, drop, piece in edits:
        at = place % (len(text) + 1)
        text = text[:at] + piece + text[at + drop :]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_load, "PIECES_FROM", 0)
        assert _same_as_whole(text), text


_HOSTILE = [
    '{"a":"x,\\ny",\n"b":2}',  # ",\n" escaped in a string: not a cut
    '{"a":"\\u002c\\n",\n"b":2}',
    '{"a":{"x":1,\n"y":2},\n"b":3}',  # a nested object cut at depth 1
    '{"a":[1,\n2],\n"b":3}',
    '{"a":1,\n"a":2,\n"b":3,\n"a":4}',  # duplicates across runs: first place, last value
    '{"a":1,\n,\n"b":2}',  # an empty run
    '{"a":1,\n"b":2,\n}',  # a trailing comma
    '{,\n"a":1}',
    '{"a":1,\r\n"b":2}',
    '\ufeff{"a":1,\n"b":2}',
    '{"a":NaN,\n"b":2}',
    '{"a":1,\n"b":-Infinity}',
    '{"a":1e999,\n"b":2}',
    '{"a":' + "9" * 5000 + ',\n"b":2}',  # over Python's int digits
    '{"a":' + "[" * 5000 + "]" * 5000 + ',\n"b":2}',  # nested past the recursion limit
    '{"a":"\\ud800",\n"b":"\\udc00\\ud83d\\ude00"}',
    '{"__metadata__":{"x":"1"},\n"w":{},\n"__metadata__":{"y":"2"}}',
    '{"__metadata__":{"x":"1",\n"y":"2"},\n"w":1}',  # __metadata__ split across runs
    '{"a":1},\n{"b":2}',  # valid as pieces only if the braces were not checked
    '{"a":1,\n"b":2}}',
    '{{"a":1,\n"b":2}',
    '{"a":1}\n,\n"b":2}',
    '{"a":1,\n"b":2} \x0b',
    ' \t\r\n{"a":1,\n"b":2}\n\n ',
    '{"a":1 ,\n "b":2 }',
    '{"a":"b\\",\n"c":"d"}',  # a cut that only an escaped quote keeps inside a string
]


@pytest.mark.parametrize("text", _HOSTILE)
def test_hostile_texts_are_read_as_their_whole(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    # Regression guard (held): each hand-made text gives the whole's value or None.
    monkeypatch.setattr(_load, "PIECES_FROM", 0)
    assert _same_as_whole(text)
    # And the same behind the real threshold (a long string in a first member, never cut).
    padded = text.replace("{", '{"pad":"' + "p" * _load.PIECES_FROM + '",\n', 1)
    assert _same_as_whole(padded)


def test_a_header_of_many_tiny_runs_is_parsed_whole_not_a_call_per_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # BUG: object_in_pieces parsed every run between ",\n" with a json.loads call of its own
    # (2.6 us each, however short the run): a file whose header repeats '"x":{...},\n' took
    # 40 times the whole's json.loads (2.6 s for 7 MB; about 40 s for the 100 MB a header
    # may have) and a str per run. Fixed: a text cut into more than FEW_RUNS runs shorter
    # than PIECE_LEAST on average is parsed whole.
    entry = '"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
    header = '{"__metadata__":{"format":"pt"},\n' + ",\n".join([entry] * 20_000) + "}"
    raw = header.encode()
    path = tmp_path / "runs.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + struct.pack("<f", 2.5))
    calls: list[int] = []
    real = json.loads

    def counted(text: Any, **kwargs: Any) -> Any:
        calls.append(len(text))
        return real(text, **kwargs)

    monkeypatch.setattr("astage._files._load.json.loads", counted)
    # The value is the whole's: the key repeated, its last value (all alike here).
    assert astage.load(path)["x"].tolist() == [2.5]
    assert len(calls) < 100, len(calls)  # a call per run: 20,001


def _reseal(header: bytes) -> bytes:
    """``header`` with its digest member made right for its bytes (as header_pieces does)."""
    metadata = json.loads(header)["__metadata__"]
    sealed = f'"{DIGEST_KEY}":"{metadata[DIGEST_KEY]}"'.encode()
    unsealed = f'"{DIGEST_KEY}":"{"0" * 64}"'.encode()
    digest = hashlib.sha256(header.replace(sealed, unsealed)).hexdigest()
    return header.replace(sealed, f'"{DIGEST_KEY}":"{digest}"'.encode())


def _rewritten(path: Path, edit: Any, reseal: bool = True) -> Path:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    header = edit(data[8 : 8 + length])
    if reseal:
        header = _reseal(header)
    out = path.with_name("edited.safetensors")
    out.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + length :])
    return out


def _saved(tmp_path: Path) -> tuple[Path, dict[str, Any]]:
    state: dict[str, Any] = {f"layer.{i}.w": torch.full((2,), float(i)) for i in range(1500)}
    state["opt"] = {"lr": 0.1, "steps": [1, 2, 3]}
    path = tmp_path / "a.safetensors"
    astage.save_sync(state, path)
    length = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert length > _load.PIECES_FROM and path.read_bytes().count(b",\n") > 2
    return path, state


@pytest.mark.parametrize(
    "edit",
    [
        lambda h: h.replace(b",\n", b",\r\n"),
        lambda h: h.replace(b",\n", b" ,\n "),
        lambda h: h.replace(b",\n", b","),
        lambda h: h.replace(b",\n", b",\n\n"),
        lambda h: h.rstrip(b" ") + b"\n\t ",
    ],
    ids=["crlf", "spaces", "no-cuts", "blank-lines", "trailing-space"],
)
def test_an_astage_file_with_its_runs_respaced_loads_the_same(tmp_path: Path, edit: Any) -> None:
    # Regression guard (held): whitespace changed around the cuts (digest made right): the
    # same state dict, read whole or in pieces.
    path, state = _saved(tmp_path)
    loaded = astage.load(_rewritten(path, edit))
    assert loaded["opt"] == state["opt"]
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k != "opt")


def _duplicate_last_entry(header: bytes) -> bytes:
    """The first entry's key given again, at the end, with the last entry's offsets."""
    text = header.decode()
    parsed = json.loads(text)
    keys = [k for k in parsed if k != "__metadata__"]
    first, last = keys[0], keys[-1]
    member = json.dumps(first) + ":" + json.dumps(parsed[last], separators=(",", ":"))
    body = text.rstrip(" ")
    return (body[:-1] + ",\n" + member + "}").encode()


def test_a_key_repeated_across_runs_is_refused_naming_the_file(tmp_path: Path) -> None:
    # Regression guard (held): a repeated entry key in a later run is read as json.loads
    # reads it (last value): a gap in the data, refused naming the file.
    path, _ = _saved(tmp_path)
    edited = _rewritten(path, _duplicate_last_entry)
    with pytest.raises(astage.CheckpointFormatError, match=r"edited\.safetensors"):
        astage.load(edited)


def test_a_metadata_member_given_again_in_a_later_run_is_read_as_the_whole_means(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Regression guard (held): a second __metadata__ (the last is the value, as json.loads
    # has it) without astage's members makes a plain safetensors file of it, in pieces as
    # whole: its tensors by their keys.
    path, state = _saved(tmp_path)

    def edit(header: bytes) -> bytes:
        body = header.decode().rstrip(" ")
        return (body[:-1] + ',\n"__metadata__":{"format":"pt"}}').encode()

    edited = _rewritten(path, edit, reseal=False)
    in_pieces = astage.load(edited)
    monkeypatch.setattr(_load, "PIECES_FROM", 1 << 40)
    whole = astage.load(edited)
    assert list(in_pieces) == list(whole) and len(whole) == len(state) - 1
    assert all(torch.equal(in_pieces[k], whole[k]) for k in whole)


@pytest.mark.asyncio
async def test_load_async_reads_a_respaced_header_as_load_does(tmp_path: Path) -> None:
    # Regression guard (held): load_async takes the same path through the pieces.
    path, state = _saved(tmp_path)
    edited = _rewritten(path, lambda h: h.replace(b",\n", b",\n  "))
    loaded = await astage.load_async(edited)
    assert loaded["opt"] == state["opt"]
    with pytest.raises(astage.CheckpointFormatError, match=r"edited\.safetensors"):
        await astage.load_async(_rewritten(path, _duplicate_last_entry))


# -- the projection of shared containers ----------------------------------------------------


def _doubled(leaf: Any, levels: int) -> list[Any]:
    x: list[Any] = leaf
    for _ in range(levels):
        x = [x, x]
    return x


def _no_json_text(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the skeleton was encoded to the end: its JSON is being written")


def test_shared_lists_of_long_ints_holding_tensors_are_refused_at_the_first_repeat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # BUG: least_json_bytes (and the encoder's running count) weighed an int as 2 bytes
    # whatever its digits: 15 levels of x = [x, x] over [tensor, 10**4000] projected to
    # 1 MB, was encoded path by path (32,768 leaves), and its 134 MB of JSON written and
    # measured before the refusal: 28 s and 1.9 GB (20 levels: 4 GB of JSON). Fixed: an int
    # weighs its least digits (3 per 10 bits).
    monkeypatch.setattr("astage._files._layout.json_text", _no_json_text)
    state = {"x": _doubled([torch.zeros(1), 10**4000], 15)}
    with pytest.raises(astage.UnsavableError, match="reached by several paths"):
        plan_layout(state)


def test_shared_lists_of_long_ints_without_tensors_are_refused_as_they_repeat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # BUG: the same weight in the running count of repeats without tensors (their nodes are
    # reused): 20 levels over [10**4000] counted 23 MB and went on to write 4 GB of JSON.
    monkeypatch.setattr("astage._files._layout.json_text", _no_json_text)
    with pytest.raises(astage.UnsavableError, match="reached by several paths"):
        plan_layout({"x": _doubled([10**4000], 20)})


def test_the_wire_encoder_weighs_long_ints_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # BUG: the replication encoder shares the count: 19 levels over [10**4000] (2 GB of
    # JSON, over the wire's 1 GiB) were encoded and handed on to be written; with a tensor
    # in each leaf (the projection's case), under a smaller limit, likewise.
    with pytest.raises(astage.ReplicationError, match="reached by several paths"):
        _wire.encode({"x": _doubled([10**4000], 19)})
    monkeypatch.setattr(_wire._Encoder, "max_header_bytes", 10_000_000)
    with pytest.raises(astage.ReplicationError, match="reached by several paths"):
        _wire.encode({"x": _doubled([torch.zeros(1), 10**4000], 12)})


def test_a_tensor_shared_through_nested_pairs_is_refused_before_its_nodes_are_encoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # BUG: the projection weighed a tensor's node at 10 bytes, but the file's node names the
    # path its storage was first met at: 21 levels of x = [x, x] over [tensor] (2**21 nodes
    # naming a 71-character path, a 190 MB header) projected to under 100 MB and were
    # encoded one by one for about a minute before the header limit refused them. Fixed: a
    # tensor weighs its node's least size, its first path's text counted (the layout's
    # tensor_weigher), and the projection refuses at the first repeat.
    encoded = 0
    encode_tensor = _LayoutBuilder.encode_tensor

    def counted(self: _LayoutBuilder, x: torch.Tensor, path: Any) -> Any:
        nonlocal encoded
        encoded += 1
        if encoded > 10_000:
            raise AssertionError("the repeats are being encoded: the projection passed them")
        return encode_tensor(self, x, path)

    monkeypatch.setattr(_LayoutBuilder, "encode_tensor", counted)
    with pytest.raises(astage.UnsavableError, match="reached by several paths"):
        plan_layout({"x": _doubled([torch.zeros(1)], 21)})
    assert encoded == 1  # the first path's; the first repeat is projected and refused


def _shared_cases() -> dict[str, Any]:
    shared = torch.nn.Linear(3, 3)
    net = torch.nn.ModuleDict({"a": shared, "b": shared, "c": torch.nn.Linear(3, 2)})
    optimizer = torch.optim.Adam(net.parameters())
    net["a"](torch.ones(1, 3)).sum().backward()
    optimizer.step()
    opt = optimizer.state_dict()
    small = {"t": torch.zeros(2), "n": 1}
    tied = {"w": torch.ones(4)}
    return {
        "module-shared-submodule": net.state_dict(),
        "param-groups-under-many-keys": {
            "opt": opt,
            **{f"groups{i}": opt["param_groups"] for i in range(50)},
        },
        "optimizer-twice": {"a": opt, "b": opt, "model": net.state_dict()},
        "small-dict-under-5000-keys": {f"k{i}": small for i in range(5000)},
        "tied-dict": {"enc": tied, "dec": tied, "head": [tied, tied, (tied,)]},
        "odict-shared": OrderedDict(a=tied, b=OrderedDict(c=tied)),
        "long-ints-shared": {"a": [10**600, tied], "b": [10**600, tied]} | {"c": tied},
    }


@pytest.mark.parametrize("case", list(_shared_cases()))
def test_shared_containers_that_fit_are_saved_and_loaded(tmp_path: Path, case: str) -> None:
    # Regression guard (held, parent commit alike): no false refusal of legitimate sharing.
    state = _shared_cases()[case]
    path = tmp_path / "s.safetensors"
    astage.save_sync(state, path)
    loaded = astage.load(path)
    assert list(loaded) == list(state)


def _skeleton_chars(state: Any) -> int:
    header = plan_layout(state).header
    length = struct.unpack("<Q", header[:8])[0]
    return len(json.loads(header[8 : 8 + length])["__metadata__"]["astage"])


_BASE = torch.arange(4.0)
_leaf = (
    st.integers(-(10**700), 10**700)
    | st.text(max_size=5)
    | st.booleans()
    | st.floats(allow_nan=False)
    | st.just(torch.zeros(1))
    # one storage met as a view first (its entry may be renamed later), as itself, reshaped
    | st.sampled_from([_BASE[1:], _BASE, _BASE.view(2, 2), torch.ones(2, dtype=torch.int8)])
)


@derandomized("ASTAGE_LEAST_EXAMPLES", 60)
@given(
    leaves=st.lists(_leaf, max_size=4),
    plan=st.lists(
        st.tuples(
            st.sampled_from(["list", "tuple", "dict", "int-keyed", "long-keyed"]),
            st.lists(st.integers(0, 30), max_size=4),
        ),
        max_size=8,
    ),
)
def test_the_projection_never_weighs_more_than_the_skeleton_written(
    leaves: list[Any], plan: list[tuple[str, list[int]]]
) -> None:
    # Regression guard (held, and with long ints weighed): the least size is a lower bound
    # of the skeleton's JSON, so no state dict that fits is refused by it.
    pool: list[Any] = list(leaves) or [0]
    for kind, picks in plan:
        items = [pool[i % len(pool)] for i in picks]
        node: Any
        if kind == "dict":
            node = {str(i): item for i, item in enumerate(items)}
        elif kind == "int-keyed":
            node = {i * 7919: item for i, item in enumerate(items)}
        elif kind == "long-keyed":
            node = {f"k'\\{i}" * 9: item for i, item in enumerate(items)}
        else:
            node = tuple(items) if kind == "tuple" else items
        pool.append(node)
    state = {"root": pool[-1], "again": pool[-1]}
    written = _skeleton_chars(state)
    assert least_json_bytes(state) <= written
    # with the file's own weights: each tensor node's least size, its first path's text
    assert least_json_bytes(state, _LayoutBuilder().tensor_weigher()) <= written

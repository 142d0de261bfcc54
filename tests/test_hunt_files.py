"""Defects found by hunting in the file layer (load, save, CheckpointDir), one test each.

Each test failed before its fix: a hostile or damaged file, or a folder that is not what
astage left there, must give an astage error naming where, never a raw Python or torch one.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import astage
from astage._files._load import check_file

BIG = (1 << 62) - 1  # the largest size a header may give (sizes are below 1 << 62)


def crafted(path: Path, header: dict[str, Any], data: bytes = b"") -> Path:
    """A file of ``header`` (no digest, no seal: crafted, as anyone may write one)."""
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def skeleton(node: Any) -> str:
    return json.dumps({"version": 1, "skeleton": node})


# -- empty tensors whose other sizes torch or numpy refuse ---------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        [BIG, BIG, 0],  # storage size overflows
        [0, BIG, BIG],  # strides overflow
        [2**31, 2**31, 2**31, 0],
    ],
)
def test_an_empty_entry_whose_shape_torch_refuses_is_a_format_error(
    tmp_path: Path, shape: list[int]
) -> None:
    # No byte bounds the sizes beside a 0 (the entry holds none): torch.empty raised a raw
    # RuntimeError from load, and check_file passed the file, so resuming picked it.
    path = crafted(
        tmp_path / "e.safetensors", {"e": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}}
    )
    for read in (astage.load, check_file):
        with pytest.raises(astage.CheckpointFormatError, match=r"header entry 'e'.*'shape'") as e:
            read(path)
        assert str(path) in str(e.value)


def test_an_empty_entry_torch_accepts_still_loads(tmp_path: Path) -> None:
    path = crafted(
        tmp_path / "ok.safetensors",
        {"e": {"dtype": "F32", "shape": [2**31, 2**31, 0], "data_offsets": [0, 0]}},
    )
    check_file(path)
    assert astage.load(path)["e"].shape == (2**31, 2**31, 0)


def test_an_empty_numpy_array_whose_shape_numpy_refuses_is_a_format_error(tmp_path: Path) -> None:
    node = {"dict": [["x", {"numpy": "<storage 0>", "dtype": "<f4", "shape": [BIG, BIG, 0]}]]}
    path = crafted(
        tmp_path / "n.safetensors",
        {
            "__metadata__": {"astage": skeleton(node)},
            "<storage 0>": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]},
        },
    )
    for read in (astage.load, check_file, lambda p: astage.load(p, into={"x": None})):
        with pytest.raises(astage.CheckpointFormatError, match=r"at \['x'\].*numpy refuses"):
            read(path)


def test_an_empty_view_whose_shape_torch_refuses_fails_the_check_too(tmp_path: Path) -> None:
    # load refused it ("torch refuses this view"); check_file passed it, so latest_step named
    # a step that load_latest then had to pass over.
    view: dict[str, Any] = {"tensor": "<storage 0>", "dtype": "float32", "offset": 0}
    view |= {"shape": [BIG, BIG, 0], "stride": [1, 1, 1]}
    path = crafted(
        tmp_path / "v.safetensors",
        {
            "__metadata__": {"astage": skeleton({"dict": [["v", view]]})},
            "<storage 0>": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        },
        b"\0" * 4,
    )
    for read in (astage.load, check_file):
        with pytest.raises(astage.CheckpointFormatError, match=r"at \['v'\].*torch refuses"):
            read(path)


# -- CheckpointDir: a folder that holds what astage did not put there ----------------------------


def state_at(step: int) -> dict[str, Any]:
    return {"w": torch.full((4,), float(step)), "step": step}


@pytest.mark.asyncio
async def test_pruning_leaves_a_folder_under_a_step_files_name_alone(tmp_path: Path) -> None:
    # unlink() of it raised a raw IsADirectoryError from the publish step: every later save
    # of the run failed, after its file was durable and `latest` had moved.
    (tmp_path / "step_000000001.safetensors").mkdir()
    async with astage.CheckpointDir(tmp_path, keep=1) as ckpts:
        for step in (2, 3):
            await ckpts.save(step, state_at(step))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "latest",
        "step_000000001.safetensors",
        "step_000000003.safetensors",
    ]


@pytest.mark.asyncio
async def test_a_step_file_pruning_cannot_delete_is_an_astage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with astage.CheckpointDir(tmp_path, keep=1) as ckpts:
        await ckpts.save(1, state_at(1))
        real = os.unlink

        def unlink(path: Any, *args: Any, **kwargs: Any) -> None:
            if str(path).endswith("step_000000001.safetensors"):
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            real(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", unlink)
        with pytest.raises(astage.CheckpointWriteError, match="pruning cannot delete") as caught:
            await ckpts.save(2, state_at(2))
        assert "step_000000001.safetensors" in str(caught.value)
        assert isinstance(caught.value.__cause__, PermissionError)
    # The save itself stands: its file is durable and `latest` names it.
    assert (tmp_path / "latest").read_text() == "step_000000002.safetensors\n"


# -- paths that cannot name a file ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_path_with_a_nul_byte_is_an_invalid_option(tmp_path: Path) -> None:
    # The OS calls raised a raw ValueError ("embedded null byte").
    bad = f"{tmp_path}/a\0b.safetensors"
    state = state_at(1)
    with pytest.raises(astage.InvalidOptionsError, match="NUL"):
        await astage.save(state, bad)
    with pytest.raises(astage.InvalidOptionsError, match="NUL"):
        astage.save_sync(state, bad)
    for read in (astage.load, lambda p: astage.load(p, into=state), check_file):
        with pytest.raises(astage.InvalidOptionsError, match="NUL"):
            read(bad)
    with pytest.raises(astage.InvalidOptionsError, match=r"root .* NUL"):
        astage.CheckpointDir(f"{tmp_path}/r\0un")
    assert list(tmp_path.iterdir()) == []


def test_a_path_that_is_no_path_is_an_invalid_option() -> None:
    reads: list[Callable[[Any], object]] = [astage.load, check_file, astage.CheckpointDir]
    for read in reads:
        with pytest.raises(astage.InvalidOptionsError, match=r"os\.PathLike path, not int"):
            read(3)


@pytest.mark.asyncio
async def test_a_writer_for_a_bytes_path_writes_its_file(tmp_path: Path) -> None:
    # The writer joined its bytes folder with a str temporary name: a raw TypeError.
    writer = astage.SafetensorsWriter(bytes(tmp_path / "b.safetensors"))  # type: ignore[arg-type]
    await astage.save(state_at(1), writer)
    assert writer.path == str(tmp_path / "b.safetensors")
    assert astage.load(tmp_path / "b.safetensors")["step"] == 1


@pytest.mark.asyncio
async def test_a_root_that_is_a_file_is_a_checkpoint_error(tmp_path: Path) -> None:
    # Raw NotADirectoryError from the readers and `async with`, FileExistsError from save().
    root = tmp_path / "run"
    root.write_bytes(b"not a folder")
    ckpts = astage.CheckpointDir(root)
    for read in (ckpts.steps, ckpts.latest_step, ckpts.load_latest):
        with pytest.raises(astage.CheckpointError, match="cannot list the checkpoint folder") as e:
            read()
        assert str(root) in str(e.value)
    with pytest.raises(astage.CheckpointError, match="cannot list the checkpoint folder"):
        async with astage.CheckpointDir(root):
            pass
    with pytest.raises(astage.CheckpointWriteError, match="cannot make the checkpoint folder"):
        await ckpts.save(1, state_at(1))
    assert root.read_bytes() == b"not a folder"


# -- load's device= -------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["gpu", 3.5, "cuda:99"])
def test_a_bad_or_absent_load_device_is_an_invalid_option(tmp_path: Path, device: Any) -> None:
    # torch.device("gpu") raised a raw RuntimeError (from load(into=) too), and an absent
    # device a raw AssertionError or RuntimeError once the whole file was read; load_latest
    # let those through, but a CheckpointError there would have skipped every good file.
    path = tmp_path / "a.safetensors"
    astage.save_sync(state_at(1), path)
    with pytest.raises(astage.InvalidOptionsError, match="device"):
        astage.load(path, device=device)
    with pytest.raises(astage.InvalidOptionsError, match="device"):
        astage.load(path, into=state_at(0), device=device)


@pytest.mark.asyncio
async def test_load_latest_onto_an_absent_device_skips_nothing(tmp_path: Path) -> None:
    async with astage.CheckpointDir(tmp_path) as ckpts:
        await ckpts.save(1, state_at(1))
    with pytest.raises(astage.InvalidOptionsError, match="'cuda:99'"):
        ckpts.load_latest(device="cuda:99")
    assert ckpts.skipped == ()
    with pytest.raises(astage.InvalidOptionsError, match="not a torch device"):
        await astage.load_async(tmp_path / "step_000000001.safetensors", into={}, device="gpu")


# -- DTensor nodes --------------------------------------------------------------------------------


def test_a_mesh_rank_past_int64_is_a_format_error(tmp_path: Path) -> None:
    # The rank grid became an int64 tensor unchecked: a raw ValueError ("Overflow when
    # unpacking long long") from load and from check_file.
    node = {
        "local": {"tensor": "['w']"},
        "mesh": ["cpu", [[0, 1 << 63]], None],
        "placements": [["replicate"], ["replicate"]],
        "shape": [4],
        "stride": [1],
        "requires_grad": False,
        "rank": 0,
        "world": 2,
        "coordinate": [0, 0],
    }
    path = crafted(
        tmp_path / "d.safetensors",
        {
            "__metadata__": {"astage": skeleton({"dict": [["w", {"dtensor": node}]]})},
            "['w']": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        },
        b"\0" * 16,
    )
    for read in (astage.load, check_file):
        with pytest.raises(astage.CheckpointFormatError, match=r"at \['w'\].*'mesh'.*int64"):
            read(path)


def test_a_split_factor_past_int64_is_a_format_error(tmp_path: Path) -> None:
    # _StridedShard(dim, split_factor=2**70) raised a raw TypeError from load and check_file.
    node = {
        "local": {"tensor": "['w']"},
        "mesh": ["cpu", [[0, 1]], None],
        "placements": [["replicate"], ["strided_shard", 0, 1 << 70]],
        "shape": [4],
        "stride": [1],
        "requires_grad": False,
        "rank": 0,
        "world": 2,
        "coordinate": [0, 0],
    }
    path = crafted(
        tmp_path / "d.safetensors",
        {
            "__metadata__": {"astage": skeleton({"dict": [["w", {"dtensor": node}]]})},
            "['w']": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        },
        b"\0" * 16,
    )
    for read in (astage.load, check_file):
        with pytest.raises(astage.CheckpointFormatError, match=r"at \['w'\].*placement"):
            read(path)


# -- tensors and arrays where the format holds plain values only ----------------------------------

_W = {"tensor": "['w']"}
_ARRAY = {"numpy": "['w']", "dtype": "<f4", "shape": [4]}


@pytest.mark.parametrize(
    ("node", "where", "inside"),
    [
        ({"namespace": [["t", _W]]}, r"\['v'\]\.t", "argparse.Namespace"),
        ({"namespace": [["a", _ARRAY]]}, r"\['v'\]\.a", "argparse.Namespace"),
        ({"set": [_W]}, r"\['v'\]\[0\]", "set"),
        ({"frozenset": [_ARRAY]}, r"\['v'\]\[0\]", "frozenset"),
        ({"odict": [], "_metadata": _W}, r"\['v'\]\._metadata", "_metadata"),
        ({"tensor": "['w']", "attrs": [["x", _W]]}, r"\['v'\]", "tensor's attribute"),
        ({"enum": ["enum", "FlagBoundary", _W]}, r"\['v'\]", "enum value"),
    ],
)
def test_a_tensor_or_array_where_only_plain_values_go_is_a_format_error(
    tmp_path: Path, node: Any, where: str, inside: str
) -> None:
    # The encoder never puts one there. The decoder took it: load handed out tensors inside
    # a Namespace or a set, and load(into=) put its private placeholder (_Slot, _ArraySlot)
    # into the caller's state: into["v"] == Namespace(t=_Slot(...)).
    path = crafted(
        tmp_path / "p.safetensors",
        {
            "__metadata__": {"astage": skeleton({"dict": [["v", node]]})},
            "['w']": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        },
        b"\0" * 16,
    )
    into: dict[str, Any] = {"v": 0}
    for read in (astage.load, check_file, lambda p: astage.load(p, into=into)):
        with pytest.raises(astage.CheckpointFormatError, match=f"at {where}: .*{inside}.* plain"):
            read(path)
    assert into == {"v": 0}


# -- the writer's own inputs ----------------------------------------------------------------------


@pytest.mark.parametrize("length", [238, 255])
def test_a_long_but_valid_file_name_is_written(tmp_path: Path, length: int) -> None:
    # The temporary name (".<name>.<12 hex>.tmp", 18 bytes more) passed NAME_MAX: a target
    # name of 238 to 255 bytes failed with ENAMETOOLONG although the file itself can exist.
    path = tmp_path / ("x" * (length - len(".safetensors")) + ".safetensors")
    assert len(path.name) == length
    astage.save_sync(state_at(1), path)
    assert astage.load(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.mark.parametrize("metadata", [5, "abc"])
def test_metadata_that_is_no_mapping_is_an_invalid_option(tmp_path: Path, metadata: Any) -> None:
    # dict(metadata) raised a raw TypeError or ValueError.
    with pytest.raises(astage.InvalidOptionsError, match="metadata must be a mapping"):
        astage.save_sync(state_at(1), tmp_path / "m.safetensors", metadata=metadata)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.asyncio
async def test_a_step_too_large_for_a_file_name_is_an_invalid_option(tmp_path: Path) -> None:
    # path_for(10**5000) raised a raw ValueError (Python prints no int of over 4,300 digits).
    ckpts = astage.CheckpointDir(tmp_path)
    assert len(os.path.basename(ckpts.path_for(10**220 - 1))) == 255 - 18
    for step in (10**220, 10**5000):
        with pytest.raises(astage.InvalidOptionsError, match=r"step must be below 10\*\*220"):
            ckpts.path_for(step)
        with pytest.raises(astage.InvalidOptionsError, match=r"step must be below 10\*\*220"):
            await ckpts.save(step, state_at(1))
    assert list(tmp_path.iterdir()) == []


# -- restore ---------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors:UserWarning")
def test_restoring_into_a_nested_tensor_is_an_invalid_option(tmp_path: Path) -> None:
    # A strided nested tensor passed the layout check; its .shape then raised torch's raw
    # RuntimeError ("NestedTensorImpl doesn't support sizes").
    path = tmp_path / "a.safetensors"
    astage.save_sync({"w": torch.ones(2)}, path)
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    with pytest.raises(astage.InvalidOptionsError, match=r"at \['w'\]: .*nested tensor"):
        astage.load(path, into={"w": nested})


# -- paths in error messages ---------------------------------------------------------------------


class _Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("repr failed")


def test_a_key_whose_repr_raises_is_named_by_its_type(tmp_path: Path) -> None:
    # format_path called repr(key): building the UnstageableError / UnsavableError that names
    # the key raised the key's RuntimeError instead.
    key = _Unprintable()
    unprintable = r"at \[<_Unprintable object: its repr\(\) failed>\]"
    stager = astage.SyncStager()
    try:
        with pytest.raises(astage.UnstageableError, match=unprintable):
            stager.stage({key: threading.Lock()})
    finally:
        stager.close()
    with pytest.raises(astage.UnsavableError, match=unprintable):
        astage.save_sync({key: torch.ones(1)}, tmp_path / "k.safetensors")
    assert list(tmp_path.iterdir()) == []


# -- recursion through nodes that are not containers ---------------------------------------------


def test_a_chain_of_metadata_nodes_is_refused_without_recursion_error(tmp_path: Path) -> None:
    # An OrderedDict's _metadata was decoded outside its container's depth: a chain of them
    # recursed until Python's limit (a raw RecursionError from load and check_file).
    node: Any = 1
    for _ in range(400):
        node = {"odict": [], "_metadata": node}
    path = crafted(tmp_path / "m.safetensors", {"__metadata__": {"astage": skeleton(node)}})
    for read in (astage.load, check_file):
        with pytest.raises(astage.CheckpointFormatError, match="nested more than 100 deep"):
            read(path)


def test_a_chain_of_enum_nodes_is_refused_without_recursion_error(tmp_path: Path) -> None:
    # An enum's value is a node, and no container counted those levels.
    count = 400
    text = '{"enum": ["enum", "FlagBoundary", ' * count + '"x"' + "]}" * count
    path = crafted(
        tmp_path / "e.safetensors",
        {"__metadata__": {"astage": '{"version": 1, "skeleton": ' + text + "}"}},
    )
    for read in (astage.load, check_file):
        with pytest.raises(astage.CheckpointFormatError, match="enum values nested more than"):
            read(path)


def test_metadata_at_the_deepest_level_still_round_trips(tmp_path: Path) -> None:
    from collections import OrderedDict

    deepest: Any = OrderedDict(w=1)
    deepest._metadata = {"": {"version": 1}}  # a dict inside _metadata: one level more
    state: Any = deepest
    for _ in range(97):  # 97 lists, the OrderedDict, _metadata and its dict: 100 deep
        state = [state]
    path = tmp_path / "deep.safetensors"
    astage.save_sync(state, path)
    back = astage.load(path)
    for _ in range(97):  # 97 lists, the OrderedDict, _metadata and its dict: 100 deep
        back = back[0]
    assert back._metadata == {"": {"version": 1}}


@pytest.mark.asyncio
async def test_a_folder_reached_through_a_symlink_spares_the_saves_in_progress(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The folder state (saves in progress, lock) was shared by the root's spelling: a second
    # CheckpointDir on the same folder through a link tidied away the first one's temporary
    # file mid-write, and that save failed at its rename (ENOENT).
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    gate = threading.Event()
    pwritev = os.pwritev

    def held(fd: int, buffers: Any, offset: int) -> int:
        if offset:  # the tensor bytes wait; the header (at 0) is written at begin()
            gate.wait(10)
        return pwritev(fd, buffers, offset)

    monkeypatch.setattr(os, "pwritev", held)
    async with astage.CheckpointDir(real) as ckpts:
        try:
            handle = await ckpts.start_save(1, state_at(1))
            assert [p.suffix for p in real.iterdir()] == [".tmp"]  # being written
            assert astage.CheckpointDir(tmp_path / "link").steps() == []  # tidies on first use
        finally:
            gate.set()
        await handle
    assert astage.load(real / "step_000000001.safetensors")["step"] == 1


@pytest.mark.parametrize("tag", ["float", "torch.dtype", "path", "torch.Size"])
def test_a_deeply_nested_bad_value_is_quoted_without_recursion_error(
    tmp_path: Path, tag: str
) -> None:
    # The message quoted the bad value with repr(): deep in the skeleton, a value nested some
    # 700 lists deep (JSON that parses) raised a raw RecursionError while being quoted.
    leaf = f'{{"{tag}": ' + "[" * 700 + "]" * 700 + "}"
    text = '{"list": [' * 99 + leaf + "]}" * 99
    path = crafted(
        tmp_path / "q.safetensors",
        {"__metadata__": {"astage": '{"version": 1, "skeleton": ' + text + "}"}},
    )
    for read in (astage.load, check_file):
        with pytest.raises(astage.CheckpointFormatError, match=r"\[\[\[\[.*\.\.\.") as caught:
            read(path)
        assert len(str(caught.value)) < 2000


def test_a_deeply_nested_dtensor_world_is_quoted_without_recursion_error(tmp_path: Path) -> None:
    # 'world' was quoted with a full repr() when 'rank' did not fit it.
    node = (
        '{"local": {"tensor": "[\'w\']"}, "mesh": ["cpu", [0], null], "placements": '
        '[["replicate"]], "shape": [4], "stride": [1], "requires_grad": false, "rank": 0, '
        '"world": ' + "[" * 700 + "]" * 700 + ', "coordinate": [0]}'
    )
    text = '{"list": [' * 99 + '{"dtensor": ' + node + "}" + "]}" * 99
    path = crafted(
        tmp_path / "w.safetensors",
        {
            "__metadata__": {"astage": '{"version": 1, "skeleton": ' + text + "}"},
            "['w']": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        },
        b"\0" * 16,
    )
    for read in (astage.load, check_file):
        with pytest.raises(astage.CheckpointFormatError, match=r"'world' \[\[\[\["):
            read(path)


def test_a_deeply_nested_dtensor_mesh_is_refused_without_recursion_error(tmp_path: Path) -> None:
    # The mesh node was turned into JSON text (its cache key) before it was checked.
    node = (
        '{"local": {"tensor": "[\'w\']"}, "mesh": ' + "[" * 700 + "]" * 700 + ', "placements": '
        '[["replicate"]], "shape": [4], "stride": [1], "requires_grad": false, "rank": 0, '
        '"world": 1, "coordinate": [0]}'
    )
    text = '{"list": [' * 99 + '{"dtensor": ' + node + "}" + "]}" * 99
    path = crafted(
        tmp_path / "m.safetensors",
        {
            "__metadata__": {"astage": '{"version": 1, "skeleton": ' + text + "}"},
            "['w']": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        },
        b"\0" * 16,
    )
    for read in (astage.load, check_file):
        with pytest.raises(astage.CheckpointFormatError, match="'mesh' is nested too deep"):
            read(path)


@pytest.mark.parametrize("dtype", ["uint1", "uint4", "int7"])
def test_a_view_of_a_sub_byte_integer_dtype_is_a_format_error(tmp_path: Path, dtype: str) -> None:
    # Loaded as a tensor that torch cannot read (clone, copy_ and repr raise its raw
    # NotImplementedError); astage never writes one (staging cannot copy those dtypes).
    view = {"tensor": "<storage 0>", "dtype": dtype, "shape": [2], "stride": [1], "offset": 0}
    path = crafted(
        tmp_path / "s.safetensors",
        {
            "__metadata__": {"astage": skeleton({"dict": [["v", view]]})},
            "<storage 0>": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
        },
        b"\0" * 4,
    )
    for read in (astage.load, check_file):
        with pytest.raises(astage.CheckpointFormatError, match=f"unsupported 'dtype' '{dtype}'"):
            read(path)


@pytest.mark.asyncio
@pytest.mark.parametrize("dtype", ["uint1", "int4"])
async def test_saving_a_sub_byte_integer_tensor_is_unsavable(tmp_path: Path, dtype: str) -> None:
    # Staging raised torch's raw NotImplementedError ("copy_kernel" not implemented).
    state = {"t": torch.empty(4, dtype=getattr(torch, dtype))}
    with pytest.raises(astage.UnsavableError, match=r"at \['t'\]: .* dtype"):
        await astage.save(state, tmp_path / "a.safetensors")
    with pytest.raises(astage.UnsavableError, match=r"at \['t'\]: .* dtype"):
        astage.save_sync(state, tmp_path / "b.safetensors")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.asyncio
async def test_a_temporary_file_tidying_cannot_remove_stays_and_the_folder_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # unlink's PermissionError (another user's file in a shared folder) escaped from steps(),
    # latest_step(), `async with` and save(): the folder could not be used at all.
    orphan = tmp_path / ".step_000000001.safetensors.0123456789ab.tmp"
    orphan.write_bytes(b"torn")
    unlink = os.unlink

    def refused(path: Any, *args: Any, **kwargs: Any) -> None:
        if str(path).endswith(".tmp"):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(path))
        unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", refused)
    assert astage.CheckpointDir(tmp_path).steps() == []
    assert astage.CheckpointDir(tmp_path).latest_step() is None
    async with astage.CheckpointDir(tmp_path) as ckpts:
        await ckpts.save(2, state_at(2))
    assert orphan.exists()
    assert astage.CheckpointDir(tmp_path).latest_step() == 2

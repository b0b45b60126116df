"""The DCP backend: hashing while writing, verifying while reading, nothing unpickled freely."""

from __future__ import annotations

import hashlib
import io
import pickle

import pytest
import torch
import torch.distributed.checkpoint as torch_dcp

from enginekit.checkpointing import dcp
from enginekit.checkpointing.format import CheckpointError, Manifest, read_manifest

from ckpt_helpers import tiny_run


def test_every_file_is_hashed_as_it_is_written(tmp_path):
    tensors = {
        "model": {"w": torch.arange(1000.0), "b": torch.ones(3)},
        "optimizer": {"w": {"step": torch.tensor(2.0)}},
    }
    writer, future = dcp.save(tmp_path / "c", tensors, None, background=False)
    assert future is None and set(writer.written) == {".metadata", "__0_0.distcp"}
    for name, (sha, size) in writer.written.items():
        data = (tmp_path / "c" / name).read_bytes()
        assert (hashlib.sha256(data).hexdigest(), len(data)) == (sha, size)


def test_a_background_save_writes_the_state_of_the_moment_it_was_staged(tmp_path):
    live = {"model": {"w": torch.zeros(10_000)}}
    writer, future = dcp.save(tmp_path / "c", live, None, background=True, host=dcp.HostCopy())
    live["model"]["w"].add_(1.0)  # training goes on while it writes
    future.result()
    manifest = Manifest(0, 1, "ddp", {**writer.written, "state.pt": ("0" * 64, 0)})
    loaded = {"model": {"w": torch.full((10_000,), 5.0)}}
    dcp.load_tensors(dcp.Reader(tmp_path / "c", manifest), loaded)
    assert torch.equal(loaded["model"]["w"], torch.zeros(10_000))


def test_the_metadata_classes_of_this_torch_are_known(tmp_path):
    """Fails on a torch that moved or renamed DCP's metadata classes: update metadata_classes()."""
    tensors = {"model": {"w": torch.ones(2, 3, dtype=torch.bfloat16)}, "optimizer": {"w": {"step": torch.tensor(1.0)}}}
    dcp.save(tmp_path / "c", tensors, None, background=False)
    try:
        metadata = dcp.read_metadata_safely(io.BytesIO((tmp_path / "c" / ".metadata").read_bytes()))
    except pickle.UnpicklingError as exc:
        pytest.fail(
            f"torch {torch.__version__} writes DCP metadata that the safe reader refuses ({exc}): its metadata "
            "classes moved or changed; update enginekit.checkpointing.dcp.metadata_classes()"
        )
    assert tuple(metadata.state_dict_metadata["model.w"].size) == (2, 3)
    assert metadata.state_dict_metadata["model.w"].properties.dtype == torch.bfloat16


class Boom:
    def __reduce__(self):
        return (print, ("ran arbitrary code",))


def test_the_metadata_reader_builds_nothing_else(capsys):
    with pytest.raises(pickle.UnpicklingError, match="builtins.print is not part of a checkpoint's metadata"):
        dcp.read_metadata_safely(io.BytesIO(pickle.dumps(Boom())))
    assert "ran arbitrary code" not in capsys.readouterr().out
    with pytest.raises(pickle.UnpicklingError, match="not DCP metadata"):
        dcp.read_metadata_safely(io.BytesIO(pickle.dumps({"a": 1})))


def test_a_hostile_metadata_file_is_refused_before_it_runs(tmp_path, capsys):
    ckpt, _ = tiny_run(tmp_path / "run")
    newest = ckpt.checkpoints()[0]
    evil = pickle.dumps(Boom())
    (newest / ".metadata").write_bytes(evil)
    manifest = read_manifest(newest)
    files = dict(
        manifest.files, **{".metadata": (hashlib.sha256(evil).hexdigest(), len(evil))}
    )  # a forged manifest too
    reader = dcp.Reader(newest, Manifest(manifest.step, 1, "ddp", files))
    with pytest.raises(CheckpointError, match=r"\.metadata refused by the safe reader: builtins.print"):
        reader.read_metadata()
    assert "ran arbitrary code" not in capsys.readouterr().out


def test_a_pickled_object_among_the_tensors_is_refused(tmp_path):
    torch_dcp.save(
        {"model": {"w": torch.ones(2)}, "extra": {"obj": Boom()}}, checkpoint_id=tmp_path / "c", no_dist=True
    )
    files = {}
    for p in (tmp_path / "c").iterdir():
        data = p.read_bytes()
        files[p.name] = (hashlib.sha256(data).hexdigest(), len(data))
    reader = dcp.Reader(tmp_path / "c", Manifest(0, 1, "ddp", {**files, "state.pt": ("0" * 64, 0)}))
    with pytest.raises(CheckpointError, match="holds a pickled object at extra.obj"):
        dcp.load_tensors(reader, {"model": {"w": torch.zeros(2)}, "extra": {"obj": None}})


def test_a_file_is_verified_before_its_bytes_reach_the_loader(tmp_path):
    ckpt, _ = tiny_run(tmp_path / "run")
    newest = ckpt.checkpoints()[0]
    data = bytearray((newest / "__0_0.distcp").read_bytes())
    data[-100] ^= 0xFF
    (newest / "__0_0.distcp").write_bytes(bytes(data))
    reader = dcp.Reader(newest, read_manifest(newest))
    target = {"model": {k: torch.zeros(v) for k, v in dcp.saved_shapes(reader).items() if k.startswith("model.")}}
    target = {"model": {k.removeprefix("model."): v for k, v in target["model"].items()}}
    with pytest.raises(CheckpointError, match=r"__0_0.distcp: sha256 mismatch"):
        dcp.load_tensors(reader, target)
    assert all(not t.any() for t in target["model"].values())  # nothing of the bad file was copied in


PIECES = [b"header" * 100, bytes(range(256)) * (70_000), b"x" * 5, bytes(3 << 20), b"tail" * 1001]


@pytest.mark.parametrize("mode", ["direct", "page cache", "refused mid-file"])
def test_every_way_of_writing_gives_the_same_bytes_and_hash(tmp_path, monkeypatch, mode):
    if mode == "page cache":
        monkeypatch.setattr(dcp, "_set_direct", lambda fd, on: False)
    if mode == "refused mid-file":
        calls = []

        def einval_on_second(fd, data):
            calls.append(len(data))
            if len(calls) == 2:
                raise OSError(22, "Invalid argument")
            return __import__("os").write(fd, data)

        monkeypatch.setattr(dcp, "_os_write", einval_on_second)
    fs = dcp._HashingFileSystem(None)
    with fs.create_stream(tmp_path / "f", "wb") as stream:
        for piece in PIECES * 6:  # > 2 blocks of 16 MB, and a tail that is no whole block
            stream.write(piece)
            stream.flush()
    expected = b"".join(PIECES * 6)
    assert (tmp_path / "f").read_bytes() == expected
    assert fs.written["f"] == (hashlib.sha256(expected).hexdigest(), len(expected))


def test_a_failed_write_is_the_disks_own_error(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(dcp, "_os_write", full)
    monkeypatch.setattr(dcp, "_set_direct", lambda fd, on: True)
    with pytest.raises(OSError, match="No space left"):
        with dcp._HashingFileSystem(None).create_stream(tmp_path / "f", "wb") as stream:
            stream.write(bytes(40 << 20))


def test_the_crc32_switch_exists_in_this_torch_and_its_files_load():
    """Fails on a torch without torch.utils.serialization.config's save.compute_crc32."""
    from torch.utils.serialization import config

    assert hasattr(config, "save") and hasattr(config.save, "compute_crc32"), (
        f"torch {torch.__version__} has no save.compute_crc32: update enginekit.checkpointing.dcp.without_crc32()"
    )
    buf = io.BytesIO()
    with dcp.without_crc32():
        assert config.save.compute_crc32 is False
        torch.save(torch.arange(10), buf)
    assert config.save.compute_crc32 is True
    buf.seek(0)
    assert torch.equal(torch.load(buf, weights_only=True), torch.arange(10))

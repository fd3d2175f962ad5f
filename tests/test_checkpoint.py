"""Checkpoint reading and writing: shards, atomic output, HF cache ids, sizes."""

import json
import shutil

import pytest
import torch
from helpers import load_sd, make_model

from splice.checkpoint import SideFiles
from splice.checkpoint.reader import open_model
from splice.checkpoint.writer import parse_size
from splice.errors import CheckpointError


def test_reader_sees_every_tensor_without_loading_the_model(tmp_path):
    m = make_model(tmp_path / "m", "llama", dtype=torch.bfloat16)
    src = open_model(str(m))
    sd = load_sd(m)
    assert set(src.keys()) == set(sd)
    for k, v in sd.items():
        info = src.info(k)
        assert info.dtype == torch.bfloat16 and info.shape == tuple(v.shape)
        assert torch.equal(src.get(k), v)
    assert src.config["model_type"] == "llama"
    src.close()


def _entries(tensors: dict, compute=None) -> list:
    from splice.engine import Entry

    return [Entry(k, v.dtype, tuple(v.shape), compute or (lambda v=v: v), v.numel() * 4) for k, v in tensors.items()]


def _side() -> SideFiles:
    return SideFiles(config={"model_type": "llama"}, model="test")


@pytest.mark.parametrize("workers", [1, 3])
def test_writer_shards_by_size_and_index_is_complete(tmp_path, workers):
    from splice.engine import write_checkpoint

    tensors = {f"w{i}": torch.full((100,), float(i)) for i in range(10)}  # 400 bytes each
    write_checkpoint(tmp_path / "out", _entries(tensors), _side(), shard_size=1000, workers=workers, quiet=True)
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4000 and set(index["weight_map"]) == set(tensors)
    got = load_sd(tmp_path / "out")
    for k, v in tensors.items():
        assert torch.equal(got[k], v)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"model_type": "llama"}


@pytest.mark.parametrize("workers", [1, 2])
def test_writer_error_leaves_nothing(tmp_path, workers):
    from splice.engine import write_checkpoint

    def boom():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        write_checkpoint(tmp_path / "a" / "b" / "out", _entries({"a": torch.zeros(3)}, boom), _side(), workers=workers, quiet=True)
    assert list(tmp_path.iterdir()) == []  # the staging folder and the parents it made are gone


def test_parse_size():
    assert parse_size("5GB") == 5_000_000_000
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1000") == 1000
    with pytest.raises(CheckpointError, match="invalid size"):
        parse_size("lots")


def test_hf_id_resolves_through_local_cache_only(tmp_path, monkeypatch):
    m = make_model(tmp_path / "m", "llama")
    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    shutil.copytree(m, snap)
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    src = open_model("acme/tiny")
    assert set(src.keys()) == set(load_sd(m))
    with pytest.raises(CheckpointError, match="not found"):
        open_model("acme/absent")


def test_hf_cache_snapshot_whose_files_link_to_blobs_is_merged_with_its_tokenizer(tmp_path, monkeypatch):
    """In a real Hugging Face cache every snapshot file links to ../../blobs: inside the cached repository, so allowed."""
    import hashlib

    import yaml

    import splice

    m = make_model(tmp_path / "m", "llama")
    repo = tmp_path / "hub" / "models--acme--tiny"
    snap = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in m.iterdir():
        blob = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / blob)
        (snap / f.name).symlink_to(f"../../blobs/{blob}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": "acme/tiny", "parameters": {"weight": 1.0}}]}))
    splice.merge(recipe, tmp_path / "out", quiet=True)
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (m / "tokenizer.json").read_bytes()

"""Checkpoint reading and writing: shards, atomic output, HF cache ids, sizes."""

import json
import shutil

import pytest
import torch
from helpers import load_sd, make_model

from splice.checkpoint.reader import open_model
from splice.checkpoint.writer import CheckpointWriter, parse_size
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


def test_writer_shards_by_size_and_index_is_complete(tmp_path):
    tensors = {f"w{i}": torch.full((100,), float(i)) for i in range(10)}  # 400 bytes each
    with CheckpointWriter(tmp_path / "out", shard_size=1000) as w:
        w.layout([(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()])
        for k in reversed(list(tensors)):  # any order
            w.write(k, tensors[k])
        w.finish_tensors()
        w.commit()
    files = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert files == [f"model-0000{i}-of-00005.safetensors" for i in range(1, 6)]
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 4000 and set(index["weight_map"]) == set(tensors)
    got = load_sd(tmp_path / "out")
    for k, v in tensors.items():
        assert torch.equal(got[k], v)


def test_writer_error_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), CheckpointWriter(tmp_path / "out") as w:
        w.layout([("a", torch.float32, (3,))])
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


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

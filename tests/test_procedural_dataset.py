"""Dataset writer and reader: format, determinism, resume, view groups, errors."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from threestudio_mv.data.procedural import parse_caption, vocabulary
from threestudio_mv.data.procedural.dataset import (
    FORMAT,
    ProceduralMultiviewDataset,
    dataset_captions,
    write_dataset,
)
from threestudio_mv.utils.camera import c2w_from_spherical, distance_for_fovy
from threestudio_mv.utils.errors import UserError

SMALL = dict(num=10, views=8, size=16, split="train", shard_size=4, progress=False)


def _files(root: Path) -> dict:
    return {path.name: path.read_bytes() for path in sorted(root.iterdir())}


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("procedural") / "set"
    write_dataset(root, seed=3, **SMALL)
    return root


def test_layout_and_meta(written: Path) -> None:
    names = sorted(path.name for path in written.iterdir())
    shards = [f"shard_{k:05d}" for k in range(3)]
    assert names == sorted(["meta.json"] + [s + ".npz" for s in shards] + [s + ".json" for s in shards])
    meta = json.loads((written / "meta.json").read_text())
    assert meta["format"] == FORMAT and meta["group_size"] == 4 and meta["num_shards"] == 3
    assert (meta["num_assets"], meta["views"], meta["size"], meta["shard_size"]) == (10, 8, 16, 4)
    assert meta["background"] == [1.0, 1.0, 1.0] and meta["relative_distance_range"] == [0.85, 1.0]
    with np.load(written / "shard_00002.npz") as last:
        assert last["rgba"].shape == (2, 8, 16, 16, 4) and last["rgba"].dtype == np.uint8
        assert last["c2w"].shape == (2, 8, 4, 4) and last["c2w"].dtype == np.float32
        assert last["asset_index"].tolist() == [8, 9] and last["asset_index"].dtype == np.int64
    records = json.loads((written / "shard_00002.json").read_text())
    assert [r["caption"] for r in records] == dataset_captions(10, "train", 3)[8:]
    assert set(records[0]) >= {"caption", "paraphrases", "spec"} and "tree" in records[0]["spec"]


def test_deterministic_and_resumable(written: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_dataset(again, seed=3, **SMALL)
    assert _files(again) == _files(written)
    first_shard = again / "shard_00000.npz"
    stamp = first_shard.stat().st_mtime_ns
    (again / "shard_00001.npz").unlink()
    write_dataset(again, seed=3, **SMALL)
    assert _files(again) == _files(written)
    assert first_shard.stat().st_mtime_ns == stamp  # complete shards are skipped, not rewritten
    other = tmp_path / "other"
    write_dataset(other, seed=4, **SMALL)
    with np.load(other / "shard_00000.npz") as a, np.load(written / "shard_00000.npz") as b:
        assert not np.array_equal(a["c2w"], b["c2w"])


def test_reader_items_and_view_groups(written: Path) -> None:
    dataset = ProceduralMultiviewDataset(written)
    assert len(dataset) == 10 and dataset.captions == dataset_captions(10, "train", 3)
    train = set(vocabulary("train"))
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["rgba"].shape == (8, 16, 16, 4) and item["rgba"].dtype == torch.uint8
        assert item["asset_index"] == index and item["caption"] in train
        assert all(parse_caption(p).caption == item["caption"] for p in item["paraphrases"])
        alpha = item["rgba"][..., 3]
        assert int(alpha.max()) == 255 and int(alpha.min()) == 0
        assert int(item["rgba"][..., :3][alpha == 0].max()) == 0  # straight alpha, nothing under holes
        for key in ("elevation", "fovy", "camera_distances"):
            groups = item[key].reshape(2, 4)
            assert torch.equal(groups, groups[:, :1].expand(2, 4)), key
        assert bool(((item["elevation"] >= 0) & (item["elevation"] <= 30)).all())
        assert bool(((item["fovy"] >= 30) & (item["fovy"] <= 50)).all())
        relative = item["camera_distances"] / distance_for_fovy(torch.ones(8), item["fovy"])
        assert bool(((relative >= 0.85 - 1e-5) & (relative <= 1.0 + 1e-5)).all())
        steps = (item["azimuth"].reshape(2, 4).diff(dim=1) % 360.0 - 90.0).abs()
        assert bool(((steps < 1e-3) | ((steps - 270.0).abs() < 1e-3)).all())  # 90 apart, wrapped
        expected = c2w_from_spherical(item["elevation"], item["azimuth"], item["camera_distances"])
        assert torch.allclose(item["c2w"], expected, atol=1e-5)


def test_dataset_cycles_a_seeded_permutation_of_the_split() -> None:
    held_out = vocabulary("heldout")
    captions = dataset_captions(2 * len(held_out), "heldout", 0)
    assert sorted(captions[: len(held_out)]) == sorted(held_out)
    assert captions[len(held_out) :] == captions[: len(held_out)]
    assert captions[:20] != held_out[:20] and captions != dataset_captions(2 * len(held_out), "heldout", 1)


def test_errors(written: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="multiple of 4"):
        write_dataset(tmp_path / "x", **{**SMALL, "views": 6})
    with pytest.raises(UserError, match="other settings"):
        write_dataset(written, seed=5, **SMALL)
    with pytest.raises(UserError, match="no procedural dataset"):
        ProceduralMultiviewDataset(tmp_path / "missing")
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("meta.json", "shard_00000.npz", "shard_00000.json"):
        (broken / name).write_bytes((written / name).read_bytes())
    with pytest.raises(UserError, match="incomplete"):
        ProceduralMultiviewDataset(broken)


@pytest.mark.slow
def test_worker_processes_write_the_same_bytes(written: Path, tmp_path: Path) -> None:
    parallel = tmp_path / "parallel"
    write_dataset(parallel, seed=3, workers=2, **SMALL)
    assert _files(parallel) == _files(written)

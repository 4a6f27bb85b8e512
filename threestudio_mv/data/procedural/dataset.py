"""Sharded multi-view training sets of procedural assets: the writer and the reader.

See the package docstring (:mod:`threestudio_mv.data.procedural`) for the on-disk format.
"""
import json
import multiprocessing
import zipfile
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from threestudio_mv.data.procedural.captions import parse_caption, vocabulary
from threestudio_mv.data.procedural.render import render_views
from threestudio_mv.utils.camera import sample_view_groups
from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.io import atomic_path, save_json

FORMAT = "threestudio-mv-procedural-v1"
GROUP_SIZE = 4
ELEVATION_RANGE = (0.0, 30.0)
FOVY_RANGE = (30.0, 50.0)
RELATIVE_DISTANCE_RANGE = (0.85, 1.0)
BACKGROUND = (1.0, 1.0, 1.0)
CAMERA_KEYS = ("c2w", "fovy", "elevation", "azimuth", "camera_distances")


def dataset_captions(num: int, split: str, seed: int) -> List[str]:
    """Canonical caption of each asset: ``vocabulary(split)[perm[i % len]]``, perm a seeded permutation."""
    captions = vocabulary(split)
    permutation = torch.randperm(len(captions), generator=torch.Generator().manual_seed(seed)).tolist()
    return [captions[permutation[i % len(captions)]] for i in range(num)]


def asset_seed(seed: int, index: int) -> int:
    """Camera seed of asset ``index``: independent of shard size and worker count."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def render_training_views(caption: str, views: int, size: int, seed: int) -> Dict[str, np.ndarray]:
    """Render one asset from ``views // 4`` random 4-view groups: uint8 rgba and float32 cameras."""
    generator = torch.Generator().manual_seed(seed)
    cameras = sample_view_groups(
        n_groups=views // GROUP_SIZE,
        n_view=GROUP_SIZE,
        elevation_range=ELEVATION_RANGE,
        fovy_range=FOVY_RANGE,
        relative_distance_range=RELATIVE_DISTANCE_RANGE,
        generator=generator,
    )
    out = render_views(parse_caption(caption), cameras["c2w"], cameras["fovy"], size, background=BACKGROUND)
    rgba = torch.cat([out["rgb_fg"], out["alpha"][..., None]], dim=-1)
    arrays = {"rgba": (rgba.clamp(0.0, 1.0) * 255.0 + 0.5).to(torch.uint8).numpy()}
    for key in CAMERA_KEYS:
        arrays[key] = cameras[key].float().numpy()
    return arrays


def save_npz_deterministic(path: Union[str, Path], arrays: Dict[str, np.ndarray]) -> None:
    """Like ``np.savez_compressed`` but byte-identical for identical arrays (fixed zip timestamps),
    written atomically."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for name, array in arrays.items():
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                with archive.open(info, "w", force_zip64=True) as handle:
                    np.lib.format.write_array(handle, np.ascontiguousarray(array), allow_pickle=False)


def _shard_paths(root: Path, shard: int) -> Tuple[Path, Path]:
    return root / f"shard_{shard:05d}.npz", root / f"shard_{shard:05d}.json"


def _write_shard(job: Tuple[str, int, List[Tuple[int, str]], int, int, int]) -> int:
    """Render and write one shard (runs in a worker); returns the number of assets written."""
    root, shard, assets, views, size, seed = job
    torch.set_num_threads(1)  # one thread per worker; also makes the bytes independent of the pool
    per_asset = [render_training_views(caption, views, size, asset_seed(seed, index)) for index, caption in assets]
    arrays = {key: np.stack([a[key] for a in per_asset]) for key in ("rgba",) + CAMERA_KEYS}
    arrays["asset_index"] = np.array([index for index, _ in assets], dtype=np.int64)
    records = []
    for index, caption in assets:
        asset = parse_caption(caption)
        records.append({"asset_index": index, "caption": caption, "paraphrases": asset.paraphrases(), "spec": asset.spec()})
    npz_path, json_path = _shard_paths(Path(root), shard)
    save_npz_deterministic(npz_path, arrays)
    save_json(json_path, records)
    return len(assets)


def write_dataset(
    out: Union[str, Path],
    num: int,
    views: int,
    size: int,
    split: str = "train",
    seed: int = 0,
    workers: int = 1,
    shard_size: int = 64,
    progress: bool = True,
) -> dict:
    """Write (or finish) a sharded training set in ``out``; returns its meta dict.

    Deterministic for a seed; shards already complete (npz and json present) are skipped, so an
    interrupted run resumes. ``workers`` > 1 renders shards in that many processes.
    """
    from tqdm import tqdm

    if num < 1 or size < 1 or shard_size < 1 or workers < 1:
        raise UserError("--num, --size, --workers and the shard size must be positive")
    if views < GROUP_SIZE or views % GROUP_SIZE:
        raise UserError(f"--views must be a positive multiple of {GROUP_SIZE} (got {views})")
    captions = dataset_captions(num, split, seed)
    root = Path(out)
    num_shards = (num + shard_size - 1) // shard_size
    meta = {
        "format": FORMAT,
        "num_assets": num,
        "views": views,
        "group_size": GROUP_SIZE,
        "size": size,
        "split": split,
        "seed": seed,
        "shard_size": shard_size,
        "num_shards": num_shards,
        "background": list(BACKGROUND),
        "elevation_range": list(ELEVATION_RANGE),
        "fovy_range": list(FOVY_RANGE),
        "relative_distance_range": list(RELATIVE_DISTANCE_RANGE),
    }
    meta_path = root / "meta.json"
    if meta_path.exists():
        existing = json.loads(meta_path.read_text())
        if existing != meta:
            raise UserError(f"{root} holds a dataset with other settings ({meta_path}); use another --out or delete it")
    else:
        save_json(meta_path, meta)

    jobs = []
    for shard in range(num_shards):
        if all(path.exists() for path in _shard_paths(root, shard)):
            continue
        indices = range(shard * shard_size, min(num, (shard + 1) * shard_size))
        jobs.append((str(root), shard, [(i, captions[i]) for i in indices], views, size, seed))
    done = num - sum(len(job[2]) for job in jobs)
    with tqdm(total=num, initial=done, unit="asset", desc="rendering", disable=not progress) as bar:
        if workers == 1 or len(jobs) <= 1:
            threads = torch.get_num_threads()
            try:
                for job in jobs:
                    bar.update(_write_shard(job))
            finally:
                torch.set_num_threads(threads)
        else:
            context = multiprocessing.get_context("spawn")
            with context.Pool(min(workers, len(jobs))) as pool:
                for written in pool.imap_unordered(_write_shard, jobs):
                    bar.update(written)
    return meta


class ProceduralMultiviewDataset(Dataset):
    """All assets of a dataset written by :func:`write_dataset`, held in memory.

    Item i: ``rgba`` uint8 (V, S, S, 4) (straight alpha), ``c2w`` (V, 4, 4), ``fovy``, ``elevation``,
    ``azimuth``, ``camera_distances`` (V,) float32 tensors, ``asset_index`` int, ``caption`` str,
    ``paraphrases`` list of str.
    """

    def __init__(self, root: Union[str, Path]) -> None:
        self.root = Path(root)
        meta_path = self.root / "meta.json"
        if not meta_path.exists():
            raise UserError(f"no procedural dataset at {self.root} (missing meta.json); write one with: python -m threestudio_mv.data.procedural dataset")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise UserError(f"{meta_path} has format {self.meta.get('format')!r}, expected {FORMAT!r}")
        arrays: Dict[str, List[np.ndarray]] = {key: [] for key in ("rgba", "asset_index") + CAMERA_KEYS}
        self.records: List[dict] = []
        for shard in range(self.meta["num_shards"]):
            npz_path, json_path = _shard_paths(self.root, shard)
            if not (npz_path.exists() and json_path.exists()):
                raise UserError(f"dataset {self.root} is incomplete ({npz_path.name} missing); rerun the dataset command to finish it")
            with np.load(npz_path) as shard_arrays:
                for key in arrays:
                    arrays[key].append(shard_arrays[key])
            self.records.extend(json.loads(json_path.read_text()))
        self.arrays = {key: torch.from_numpy(np.concatenate(values)) for key, values in arrays.items()}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def captions(self) -> List[str]:
        """Canonical caption of every asset, in dataset order."""
        return [record["caption"] for record in self.records]

    def __getitem__(self, index: int) -> dict:
        item = {key: self.arrays[key][index] for key in ("rgba",) + CAMERA_KEYS}
        item["asset_index"] = int(self.arrays["asset_index"][index])
        item["caption"] = self.records[index]["caption"]
        item["paraphrases"] = list(self.records[index]["paraphrases"])
        return item


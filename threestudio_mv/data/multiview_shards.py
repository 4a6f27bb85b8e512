"""Training data for the multi-view diffusion model: groups of views from the procedural dataset.

The dataset folder (``python -m threestudio_mv.data.procedural dataset ...``) holds shards of N
assets x V views (V a multiple of 4; each run of 4 consecutive views shares elevation, FOV and
distance, azimuths 90 degrees apart). A training batch is either ``batch_size`` groups of ``n_view``
views (with cameras) or, with probability ``single_view_prob``, ``batch_size * n_view`` single views
from random assets with no camera (F = 1, MVDream's 2D mode). Views of different objects never mix.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from threestudio_mv import register
from threestudio_mv.data.procedural.dataset import ProceduralMultiviewDataset
from threestudio_mv.utils.camera import mvdream_camera_condition, view_group
from threestudio_mv.utils.config import parse_structured
from threestudio_mv.utils.errors import UserError


class MultiviewShards:
    """All shards of a procedural dataset folder in memory: rgba (N, V, S, S, 4) uint8, cameras, texts."""

    def __init__(self, root: Path, group_size: int) -> None:
        try:
            dataset = ProceduralMultiviewDataset(root)  # the one reader of the shard format
        except UserError as error:
            raise UserError(f"data.root: {error}") from None
        self.rgba = dataset.arrays["rgba"].numpy()
        self.c2w = dataset.arrays["c2w"].numpy().astype(np.float32)
        self.captions: List[str] = dataset.captions
        self.paraphrases: List[List[str]] = [list(record.get("paraphrases", [])) for record in dataset.records]
        self.num_assets, self.num_views_per_asset = self.rgba.shape[:2]
        if self.num_views_per_asset % group_size != 0:
            raise UserError(f"data.n_view={group_size} does not divide the dataset's {self.num_views_per_asset} views per asset")
        self.groups_per_asset = self.num_views_per_asset // group_size
        self.image_size = int(self.rgba.shape[2])

    def pixel_mean(self, background: List[float]) -> List[float]:
        """Per-channel mean of all views composited over ``background``, in [-1, 1]."""
        total = np.zeros(3)
        for rgba in self.rgba:  # one asset at a time keeps the float copy small
            rgba = rgba.astype(np.float32) / 255.0
            rgb = rgba[..., :3] * rgba[..., 3:] + np.asarray(background, dtype=np.float32) * (1.0 - rgba[..., 3:])
            total += rgb.reshape(-1, 3).mean(axis=0)
        return [float(v) for v in total / self.num_assets * 2.0 - 1.0]

    def texts(self) -> List[str]:
        """Every caption and paraphrase (deduplicated, in order)."""
        return list(dict.fromkeys(self.captions + [p for ps in self.paraphrases for p in ps]))


@dataclass
class MultiviewDataConfig:
    root: str = ""  # dataset folder (meta.json, shard_*.npz, shard_*.json)
    batch_size: int = 8  # groups (objects) per batch; a single-view batch has batch_size * n_view images
    n_view: int = 4
    single_view_prob: float = 0.1  # fraction of batches of single views with no camera (F = 1)
    paraphrase_prob: float = 0.5  # chance to use one of an asset's paraphrases instead of its caption
    background: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # RGB behind the alpha
    num_workers: int = 0
    batches_per_epoch: int = 10000
    seed: int = 0
    # Validation: these captions (default: the first val_num_captions distinct training captions).
    val_captions: List[str] = field(default_factory=list)
    val_num_captions: int = 4
    val_elevation: float = 15.0
    val_fovy: float = 40.0
    val_relative_distance: float = 0.92


class MultiviewBatches(Dataset):
    """Item i is a whole batch, drawn with a generator seeded by (seed, i): reproducible, and
    Lightning's distributed sampler gives each rank different items."""

    def __init__(self, shards: MultiviewShards, cfg: MultiviewDataConfig) -> None:
        self.shards, self.cfg = shards, cfg
        self.background = np.asarray(cfg.background, dtype=np.float32).reshape(1, 1, 1, 3)

    def __len__(self) -> int:
        return self.cfg.batches_per_epoch

    def _text(self, asset: int, rng: np.random.Generator) -> str:
        paraphrases = self.shards.paraphrases[asset]
        if paraphrases and rng.random() < self.cfg.paraphrase_prob:
            return paraphrases[rng.integers(len(paraphrases))]
        return self.shards.captions[asset]

    def __getitem__(self, index: int) -> Dict[str, Any]:
        rng = np.random.default_rng([self.cfg.seed, index])
        shards, n_view = self.shards, self.cfg.n_view
        single = rng.random() < self.cfg.single_view_prob
        if single:
            count = self.cfg.batch_size * n_view
            assets = rng.integers(shards.num_assets, size=count)
            views = rng.integers(shards.num_views_per_asset, size=count)
            texts = [self._text(a, rng) for a in assets]
            num_views = 1
        else:
            assets = rng.integers(shards.num_assets, size=self.cfg.batch_size)
            groups = rng.integers(shards.groups_per_asset, size=self.cfg.batch_size)
            texts = [t for a in assets for t in [self._text(a, rng)] * n_view]
            views = (groups[:, None] * n_view + np.arange(n_view)[None]).reshape(-1)
            assets = np.repeat(assets, n_view)
            num_views = n_view
        rgba = shards.rgba[assets, views].astype(np.float32) / 255.0
        rgb = rgba[..., :3] * rgba[..., 3:] + self.background * (1.0 - rgba[..., 3:])
        c2w = torch.from_numpy(shards.c2w[assets, views])
        camera = torch.zeros(len(texts), 16) if single else mvdream_camera_condition(c2w)
        return {
            "images": torch.from_numpy(rgb).permute(0, 3, 1, 2).mul(2.0).sub(1.0).contiguous(),
            "c2w": c2w,
            "camera": camera,
            "captions": texts,
            "num_views": num_views,
        }


class ValidationViews(Dataset):
    """One item: the validation captions, each with ``n_view`` views at a fixed elevation."""

    def __init__(self, captions: List[str], cfg: MultiviewDataConfig) -> None:
        views = view_group(cfg.n_view, cfg.val_elevation, 0.0, cfg.val_fovy, cfg.val_relative_distance)
        self.item = {
            "captions": [caption for caption in captions for _ in range(cfg.n_view)],
            "c2w": views["c2w"].repeat(len(captions), 1, 1),
            "num_views": cfg.n_view,
        }

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return self.item


@register("procedural-multiview-datamodule")
class ProceduralMultiviewDataModule(pl.LightningDataModule):
    """Batches of multi-view groups (and single views) from a procedural dataset folder.

    A batch: ``images`` (B*F, 3, S, S) in [-1, 1], ``c2w`` (B*F, 4, 4), ``camera`` (B*F, 16) MVDream
    conditions (zeros for single views), ``captions`` (B*F strings) and ``num_views`` F.
    """

    Config = MultiviewDataConfig

    def __init__(self, cfg: Optional[Any] = None) -> None:
        super().__init__()
        self.cfg = cfg if isinstance(cfg, MultiviewDataConfig) else parse_structured(MultiviewDataConfig, cfg, "data")
        if not self.cfg.root:
            raise UserError("config key 'data.root' is empty; set it to a dataset folder written by threestudio_mv.data.procedural")
        if not 0.0 <= self.cfg.single_view_prob <= 1.0:
            raise UserError(f"config key 'data.single_view_prob' must be in [0, 1], got {self.cfg.single_view_prob}")
        self._shards: Optional[MultiviewShards] = None

    @property
    def shards(self) -> MultiviewShards:
        if self._shards is None:
            self._shards = MultiviewShards(Path(self.cfg.root).expanduser(), self.cfg.n_view)
        return self._shards

    def texts(self) -> List[str]:
        """Every text a training batch can contain (for precomputing text embeddings)."""
        return self.shards.texts()

    def pixel_mean(self) -> List[float]:
        """Per-channel mean of the training images in [-1, 1] (the sampler's starting mean)."""
        return self.shards.pixel_mean(self.cfg.background)

    def validation_captions(self) -> List[str]:
        if self.cfg.val_captions:
            return list(self.cfg.val_captions)
        return list(dict.fromkeys(self.shards.captions))[: self.cfg.val_num_captions]

    def setup(self, stage: Optional[str] = None) -> None:
        self.train_set = MultiviewBatches(self.shards, self.cfg)
        self.val_set = ValidationViews(self.validation_captions(), self.cfg)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set, batch_size=None, shuffle=True, num_workers=self.cfg.num_workers,
            persistent_workers=self.cfg.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=None, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

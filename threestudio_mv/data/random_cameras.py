"""Camera samplers for text-to-3D: random multi-view groups for training, orbits for val/test.

``random-multiview-camera-datamodule`` yields batches of G groups x ``n_view`` cameras (MVDream's
layout: the views of a group share elevation, FOV and distance and are 360/n_view degrees apart).
Validation is one batch of ``n_val_views`` views around the object; test is a turntable of
``n_test_views`` frames, one per batch. Every batch holds the docs/conventions.md keys (rays, c2w, mvp,
positions, lights, angles, sizes); eval batches add ``index``.
"""
import bisect
import math
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset

from threestudio_mv import register
from threestudio_mv.utils.base import Updateable
from threestudio_mv.utils.camera import (
    CameraLight,
    camera_light_positions,
    camera_ray_directions,
    distance_for_fovy,
    get_rays,
    mvp_matrix,
    sample_light_positions,
    sample_view_groups,
    view_group,
    wrap_degrees,
)
from threestudio_mv.utils.config import parse_structured
from threestudio_mv.utils.errors import UserError

Batch = Dict[str, Any]


def camera_batch(
    c2w: Tensor,
    elevation: Tensor,
    azimuth: Tensor,
    camera_distances: Tensor,
    fovy: Tensor,
    light_positions: Tensor,
    height: int,
    width: int,
    n_view: int,
    directions: Optional[Tensor] = None,
) -> Batch:
    """Assemble a batch dict with the docs/conventions.md camera keys from per-view camera tensors (B, ...).

    ``directions`` (B, h, w, 3) are camera-space ray directions when only some pixels are wanted
    (random-ray training); by default all ``height`` x ``width`` pixels of each view.
    """
    if directions is None:
        directions = camera_ray_directions(height, width, fovy)
    rays_o, rays_d = get_rays(directions, c2w)
    return {
        "rays_o": rays_o,
        "rays_d": rays_d,
        "c2w": c2w,
        "mvp_mtx": mvp_matrix(c2w, fovy, aspect=width / height),
        "camera_positions": c2w[:, :3, 3],
        "light_positions": light_positions,
        "elevation": elevation,
        "azimuth": azimuth,
        "camera_distances": camera_distances,
        "fovy": fovy,
        "height": int(height),
        "width": int(width),
        "n_view": int(n_view),
    }


def light_with_camera_light(batch: Batch, light: Optional[CameraLight]) -> Batch:
    """``batch`` lit by ``light`` (see ``camera_light`` in the config); unchanged when it is None."""
    if light is None:
        return batch
    positions = camera_light_positions(batch["c2w"], light)
    return {**batch, "light_positions": positions, "ambient_ratio": float(light.ambient_ratio)}


class CameraBatchDataset(Dataset):
    """A fixed set of N views served ``views_per_item`` at a time (map-style, for val/test).

    ``views`` is a full batch dict over all N views (tensors with leading dim N, plus int sizes);
    each item is a slice of it with ``index`` (the views' frame indices: ``views["index"]`` when
    given, else positions 0..N-1) and ``n_view`` set to the number of views in the item.
    """

    def __init__(self, views: Batch, views_per_item: int) -> None:
        self.views = views
        self.num_views = int(views["c2w"].shape[0])
        self.views_per_item = max(1, int(views_per_item))

    def __len__(self) -> int:
        return math.ceil(self.num_views / self.views_per_item)

    def __getitem__(self, item: int) -> Batch:
        start = item * self.views_per_item
        stop = min(start + self.views_per_item, self.num_views)
        batch = {
            key: value[start:stop] if isinstance(value, Tensor) else value for key, value in self.views.items()
        }
        if "index" not in batch:
            batch["index"] = torch.arange(start, stop, dtype=torch.long)
        batch["n_view"] = stop - start
        return batch


def _per_stage(key: str, value: Any, n_stages: int) -> List[int]:
    """An int or a list with one int per resolution stage -> a list of ``n_stages`` positive ints."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise UserError(f"config key '{key}' expects a positive int or a list of them, got {value!r}")
    if len(values) == 1:
        return values * n_stages
    if len(values) != n_stages:
        raise UserError(
            f"config key '{key}' has {len(values)} values but data.resolution_milestones gives "
            f"{n_stages} stages; give one value per stage (len(milestones) + 1) or a single int"
        )
    return values


def _check_range(key: str, value: Sequence[float]) -> None:
    if len(value) != 2 or value[0] > value[1]:
        raise UserError(f"config key '{key}' expects [low, high] with low <= high, got {list(value)}")


@dataclass
class RandomMultiviewCameraConfig:
    """Config of ``random-multiview-camera-datamodule`` (key ``data``)."""

    batch_size: Any = 4  # images per step (int, or one per resolution stage); a multiple of n_view
    n_view: int = 4  # views per object group
    width: Any = 64  # int or one per resolution stage
    height: Any = 64
    resolution_milestones: List[int] = field(default_factory=list)  # steps where the next stage starts
    elevation_range: List[float] = field(default_factory=lambda: [0.0, 30.0])  # degrees
    fovy_range: List[float] = field(default_factory=lambda: [30.0, 50.0])  # degrees
    camera_distance_range: List[float] = field(default_factory=lambda: [0.85, 1.0])
    relative_radius: bool = True  # distance *= 1 / tan(fovy / 2): same framing at any FOV
    light_distance_range: List[float] = field(default_factory=lambda: [0.8, 1.5])
    light_sample_strategy: str = "dreamfusion"  # "dreamfusion" (near the camera direction) or "camera"
    light_position_perturb: float = 1.0  # std of the noise on the light direction ("dreamfusion")
    # the light the guidance model's training images were rendered with, fixed in the camera frame
    # ({direction_camera: [x, y, z], ambient_ratio: a}); when set it lights every batch (train, val,
    # test) in place of the sampled lights, with its ambient ratio, so a shading material's diffuse
    # renders look like the training images and its albedo comes out unlit. null: sampled lights
    camera_light: Optional[CameraLight] = None
    eval_height: int = 64
    eval_width: int = 64
    eval_elevation_deg: float = 15.0
    eval_camera_distance: float = 0.92  # relative when relative_radius (at eval_fovy_deg)
    eval_fovy_deg: float = 40.0
    n_val_views: int = 4  # one validation batch of this many views, azimuth 0 (front) first
    n_test_views: int = 120  # turntable frames, one per test batch


class RandomMultiviewCameraIterableDataset(IterableDataset, Updateable):
    """Infinite stream of random multi-view camera batches; resolution and batch size follow the step."""

    def __init__(self, cfg: RandomMultiviewCameraConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_stages = len(cfg.resolution_milestones) + 1
        self.heights = _per_stage("data.height", cfg.height, n_stages)
        self.widths = _per_stage("data.width", cfg.width, n_stages)
        self.batch_sizes = _per_stage("data.batch_size", cfg.batch_size, n_stages)
        for batch_size in self.batch_sizes:
            if batch_size % cfg.n_view != 0:
                raise UserError(
                    f"config key 'data.batch_size' ({cfg.batch_size}) must be a multiple of "
                    f"data.n_view ({cfg.n_view}): each batch holds whole groups of n_view views"
                )
        self.stage = 0

    @property
    def height(self) -> int:
        return self.heights[self.stage]

    @property
    def width(self) -> int:
        return self.widths[self.stage]

    @property
    def batch_size(self) -> int:
        return self.batch_sizes[self.stage]

    def on_update_step(self, epoch: int, global_step: int) -> None:
        self.stage = bisect.bisect_right(self.cfg.resolution_milestones, global_step)

    def sample(self) -> Batch:
        """One batch of ``batch_size // n_view`` random view groups at the current resolution."""
        cfg = self.cfg
        groups = sample_view_groups(
            n_groups=self.batch_size // cfg.n_view,
            n_view=cfg.n_view,
            elevation_range=tuple(cfg.elevation_range),
            fovy_range=tuple(cfg.fovy_range),
            relative_distance_range=tuple(cfg.camera_distance_range),
            relative_radius=cfg.relative_radius,
        )
        lights = sample_light_positions(
            groups["c2w"][:, :3, 3],
            distance_range=tuple(cfg.light_distance_range),
            strategy=cfg.light_sample_strategy,
            perturb=cfg.light_position_perturb,
        )
        batch = camera_batch(light_positions=lights, height=self.height, width=self.width, n_view=cfg.n_view, **groups)
        return light_with_camera_light(batch, cfg.camera_light)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.sample()


class CameraDataLoaders:
    """Data-module loaders over ready-made batches: ``train_dataset`` yields whole batches,
    ``val_dataset`` / ``test_dataset`` hold views in order (so ``batch_size=None``, no collation)."""

    train_dataset: Dataset
    val_dataset: Dataset
    test_dataset: Dataset

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_dataset, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_dataset, batch_size=None, shuffle=False, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_dataset, batch_size=None, shuffle=False, num_workers=0)


@register("random-multiview-camera-datamodule")
class RandomMultiviewCameraDataModule(CameraDataLoaders, pl.LightningDataModule, Updateable):
    """Random multi-view camera groups for training; front-first orbits for validation and test.

    ``update_step`` forwards to ``train_dataset`` (resolution milestones). One process
    (num_workers=0): the dataset is mutated by ``update_step``.
    """

    Config = RandomMultiviewCameraConfig

    def __init__(self, cfg: Optional[Any] = None) -> None:
        super().__init__()
        self.cfg = cfg if isinstance(cfg, self.Config) else parse_structured(self.Config, cfg, prefix="data")
        self._validate()
        self.train_dataset = RandomMultiviewCameraIterableDataset(self.cfg)
        self._updateable_children = [self.train_dataset]
        self.val_dataset = CameraBatchDataset(self._orbit_batch(self.cfg.n_val_views), self.cfg.n_val_views)
        self.test_dataset = CameraBatchDataset(self._orbit_batch(self.cfg.n_test_views), 1)

    def _validate(self) -> None:
        cfg = self.cfg
        if cfg.n_view < 1:
            raise UserError(f"config key 'data.n_view' must be >= 1, got {cfg.n_view}")
        for key in ("elevation_range", "fovy_range", "camera_distance_range", "light_distance_range"):
            _check_range(f"data.{key}", getattr(cfg, key))
        if not (0.0 < cfg.fovy_range[0] and cfg.fovy_range[1] < 180.0):
            raise UserError(f"config key 'data.fovy_range' must lie in (0, 180) degrees, got {cfg.fovy_range}")
        if cfg.light_sample_strategy not in ("dreamfusion", "camera"):
            raise UserError(
                f"config key 'data.light_sample_strategy' is '{cfg.light_sample_strategy}'; use 'dreamfusion' or 'camera'"
            )
        light = cfg.camera_light
        if light is not None and not light.is_valid:
            raise UserError(
                "config key 'data.camera_light' needs a non-zero direction_camera and an ambient_ratio in [0, 1], "
                f"got direction_camera {list(light.direction_camera)}, ambient_ratio {light.ambient_ratio}"
            )
        if list(cfg.resolution_milestones) != sorted(cfg.resolution_milestones):
            raise UserError(f"config key 'data.resolution_milestones' must be increasing, got {cfg.resolution_milestones}")
        for key in ("n_val_views", "n_test_views", "eval_height", "eval_width"):
            if getattr(cfg, key) < 1:
                raise UserError(f"config key 'data.{key}' must be >= 1, got {getattr(cfg, key)}")

    def _orbit_batch(self, n_views: int) -> Batch:
        cfg = self.cfg
        distance = cfg.eval_camera_distance
        if cfg.relative_radius:
            distance = float(distance_for_fovy(torch.tensor(distance), torch.tensor(cfg.eval_fovy_deg)))
        views = view_group(n_views, cfg.eval_elevation_deg, fovy=cfg.eval_fovy_deg, distance=distance)
        views["azimuth"] = wrap_degrees(views["azimuth"])  # the training sampler's range
        # Evaluation lights the object from the camera: deterministic, and what a viewer expects.
        lights = sample_light_positions(views["c2w"][:, :3, 3], strategy="camera")
        batch = camera_batch(light_positions=lights, height=cfg.eval_height, width=cfg.eval_width, n_view=n_views, **views)
        return light_with_camera_light(batch, cfg.camera_light)


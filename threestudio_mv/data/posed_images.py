"""Posed images: a nerf-synthetic-style folder for reconstruction (``posed-images-datamodule``).

The folder holds ``transforms.json`` (``camera_angle_x`` in radians, ``frames[*].file_path`` and a
4x4 ``transform_matrix``) and RGBA PNGs. ``transform_matrix`` is a c2w in this project's convention
(z-up world, OpenGL camera, columns right/up/back/position: what ``camera.look_at_c2w`` returns and
what Blender's nerf-synthetic export writes). Alpha is the object mask; RGB is composited over
``background``. Training batches are random subsets of the views (optionally random rays);
validation shows up to ``n_val_views`` of the given frames (so the grid compares with ground truth);
test is a turntable at the frames' mean elevation and distance.
"""
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import IterableDataset

from threestudio_mv import register
from threestudio_mv.data.random_cameras import Batch, CameraBatchDataset, CameraDataLoaders, camera_batch
from threestudio_mv.utils.base import Updateable
from threestudio_mv.utils.camera import (
    CameraLight,
    camera_light_positions,
    camera_ray_directions,
    fovy_from_fovx,
    spherical_from_position,
    view_group,
)
from threestudio_mv.utils.config import parse_structured
from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.io import load_image

TRANSFORMS_NAME = "transforms.json"
@dataclass
class PosedImages:
    """Frames of a posed-images folder, resized and composited.

    ``rgb`` (N, H, W, 3) over the background, ``mask`` (N, H, W, 1) from alpha, ``c2w`` (N, 4, 4),
    ``fovy`` in degrees (shared by all frames), ``paths`` the image files, ``light`` the lighting the
    images were rendered with, when transforms.json records it.
    """

    rgb: Tensor
    mask: Tensor
    c2w: Tensor
    fovy: float
    paths: List[Path]
    light: Optional[CameraLight] = None

    @property
    def height(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def width(self) -> int:
        return int(self.rgb.shape[2])


def _read_light(path: Path, value: Any) -> Optional[CameraLight]:
    if value is None:
        return None
    direction = value.get("direction_camera") if isinstance(value, dict) else None
    ratio = value.get("ambient_ratio") if isinstance(value, dict) else None
    numbers = (
        isinstance(direction, list) and len(direction) == 3
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in [*direction, ratio])
    )
    light = CameraLight(tuple(float(v) for v in direction), float(ratio)) if numbers else None
    if light is None or not light.is_valid:
        raise UserError(
            f"{path}: 'light' must be {{\"direction_camera\": [x, y, z], \"ambient_ratio\": a in [0, 1]}}, got {value!r}"
        )
    return light


def _read_transforms(path: Path) -> Tuple[float, List[dict], Optional[CameraLight]]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: cannot read it ({error})") from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON (line {error.lineno}: {error.msg})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path}: expected a JSON object with 'camera_angle_x' and 'frames'")
    angle = meta.get("camera_angle_x")
    if not isinstance(angle, (int, float)) or isinstance(angle, bool) or not 0.0 < angle < np.pi:
        raise UserError(f"{path}: 'camera_angle_x' must be the horizontal FOV in radians, got {angle!r}")
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise UserError(f"{path}: 'frames' must be a non-empty list of {{file_path, transform_matrix}}")
    return float(angle), frames, _read_light(path, meta.get("light"))


def _frame_pose(path: Path, index: int, frame: Any) -> np.ndarray:
    if not isinstance(frame, dict) or "file_path" not in frame or "transform_matrix" not in frame:
        raise UserError(f"{path}: frame {index} needs 'file_path' and 'transform_matrix'")
    try:
        c2w = np.asarray(frame["transform_matrix"], dtype=np.float64)
    except (TypeError, ValueError):
        c2w = np.zeros(0)
    if c2w.shape != (4, 4) or not np.all(np.isfinite(c2w)):
        raise UserError(f"{path}: frame {index} 'transform_matrix' must be a 4x4 matrix of numbers")
    rotation = c2w[:3, :3]
    if not np.allclose(rotation.T @ rotation, np.eye(3), atol=1e-3) or not np.allclose(c2w[3], [0, 0, 0, 1], atol=1e-6):
        raise UserError(f"{path}: frame {index} 'transform_matrix' is not a rigid camera-to-world pose")
    return c2w


def _image_path(root: Path, transforms: Path, index: int, file_path: Any) -> Path:
    if not isinstance(file_path, str) or not file_path:
        raise UserError(f"{transforms}: frame {index} 'file_path' must be a non-empty string")
    path = root / file_path
    if not path.is_file() and path.suffix.lower() != ".png":
        path = path.with_name(path.name + ".png")
    if not path.is_file():
        raise UserError(f"{transforms}: frame {index} image '{file_path}' not found under {root}")
    return path


def _output_size(native: Tuple[int, int], height: Optional[int], width: Optional[int]) -> Tuple[int, int]:
    native_h, native_w = native
    if height is None and width is None:
        return native_h, native_w
    if height is None:
        return max(1, round(width * native_h / native_w)), int(width)
    if width is None:
        return int(height), max(1, round(height * native_w / native_h))
    if abs(height / width - native_h / native_w) > 0.01 * native_h / native_w:
        raise UserError(
            f"config keys 'data.height'/'data.width' ({height}x{width}) change the images' aspect ratio "
            f"({native_h}x{native_w}); give only one of them"
        )
    return int(height), int(width)


def load_posed_images(
    root: Path,
    height: Optional[int] = None,
    width: Optional[int] = None,
    background: Tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> PosedImages:
    """Read ``root/transforms.json`` and its RGBA images; resize to ``height`` x ``width`` if given.

    Resizing is done on alpha-premultiplied colour (antialiased), so edges do not pick up the colour
    hidden under transparent pixels. Raises a one-line UserError naming the faulty file.
    """
    transforms = root / TRANSFORMS_NAME
    angle_x, frames, light = _read_transforms(transforms)
    poses = [_frame_pose(transforms, i, frame) for i, frame in enumerate(frames)]
    paths = [_image_path(root, transforms, i, frame["file_path"]) for i, frame in enumerate(frames)]
    images = []
    for path in paths:
        try:
            image = load_image(path)
        except (OSError, ValueError) as error:
            raise UserError(f"{path}: cannot read the image ({error})") from None
        if image.shape[-1] != 4:
            raise UserError(f"{path}: has no alpha channel; posed images must be RGBA (alpha = object mask)")
        if images and image.shape != images[0].shape:
            raise UserError(
                f"{path}: size {image.shape[1]}x{image.shape[0]} differs from {paths[0].name}'s "
                f"{images[0].shape[1]}x{images[0].shape[0]}; all frames must have one size"
            )
        images.append(image)
    rgba = torch.from_numpy(np.stack(images))
    native = (int(rgba.shape[1]), int(rgba.shape[2]))
    out_h, out_w = _output_size(native, height, width)
    alpha = rgba[..., 3:]
    premultiplied = torch.cat([rgba[..., :3] * alpha, alpha], dim=-1)
    if (out_h, out_w) != native:
        premultiplied = F.interpolate(
            premultiplied.permute(0, 3, 1, 2), size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False
        ).permute(0, 2, 3, 1).clamp(0.0, 1.0)
    mask = premultiplied[..., 3:]
    rgb = premultiplied[..., :3] + torch.tensor(background, dtype=torch.float32) * (1.0 - mask)
    fovy = float(fovy_from_fovx(float(np.degrees(angle_x)), native[1], native[0]))
    c2w = torch.from_numpy(np.stack(poses)).float()
    return PosedImages(
        rgb=rgb.clamp(0.0, 1.0).contiguous(), mask=mask.contiguous(), c2w=c2w, fovy=fovy, paths=paths, light=light
    )


@dataclass
class PosedImagesConfig:
    """Config of ``posed-images-datamodule`` (key ``data``)."""

    root: str = ""  # required: folder with transforms.json and RGBA PNGs
    batch_size: Any = 4  # views per training step, or "all"
    height: Optional[int] = None  # resize to (default: native); giving one keeps the aspect ratio
    width: Optional[int] = None
    background: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # RGB behind the alpha
    rays_per_batch: Optional[int] = None  # random-ray training: this many pixels per step (split over views)
    light_distance: float = 1.5  # the light sits along the camera's direction at this distance
    n_val_views: int = 4  # validation shows up to this many of the given frames
    n_test_views: int = 120  # turntable frames
    eval_elevation_deg: Optional[float] = None  # default: the frames' mean elevation
    eval_camera_distance: Optional[float] = None  # default: the frames' mean distance
    eval_fovy_deg: Optional[float] = None  # default: from camera_angle_x


def lighting(c2w: Tensor, light: Optional[CameraLight], head_light_distance: float) -> Dict[str, Any]:
    """Batch entries for the lights of views c2w (B, 4, 4): ``light_positions`` (B, 3), and the
    material's ``shading`` (+ ``ambient_ratio``).

    With a recorded :class:`CameraLight` the light follows each camera as in the images and shading
    materials shade ("diffuse"), so their albedo comes out unlit. Without one the light sits along
    the camera's direction from the origin at ``head_light_distance``, and shading materials return
    the albedo ("albedo"): the images' own lighting is fitted into it.
    """
    if light is None:
        return {"light_positions": F.normalize(c2w[:, :3, 3], dim=-1) * head_light_distance, "shading": "albedo"}
    return {"light_positions": camera_light_positions(c2w, light), "shading": "diffuse", "ambient_ratio": light.ambient_ratio}


class PosedImagesIterableDataset(IterableDataset, Updateable):
    """Infinite stream of batches of random views (or random rays of random views) with ground truth."""

    def __init__(self, images: PosedImages, batch_size: int, rays_per_batch: Optional[int], light_distance: float) -> None:
        super().__init__()
        self.images = images
        self.batch_size = batch_size
        self.rays_per_batch = rays_per_batch
        self.light_distance = light_distance
        self.elevation, self.azimuth, self.distance = spherical_from_position(images.c2w[:, :3, 3])
        # All frames share size and FOV, so one set of camera-space directions serves every view.
        self.directions = camera_ray_directions(images.height, images.width, torch.tensor([images.fovy]))[0]

    def sample(self) -> Batch:
        """A batch of ``batch_size`` distinct random views (all of their pixels, or random rays)."""
        n_frames = self.images.c2w.shape[0]
        index = torch.randperm(n_frames)[: self.batch_size]
        c2w = self.images.c2w[index]
        rgb, mask = self.images.rgb[index], self.images.mask[index]
        directions = self.directions.expand(len(index), -1, -1, -1)
        height, width = self.images.height, self.images.width
        if self.rays_per_batch:
            per_view = max(1, self.rays_per_batch // len(index))
            pixels = torch.randint(0, height * width, (len(index), per_view))

            def gather(image: Tensor) -> Tensor:
                """(B, H, W, C) -> the sampled pixels as (B, 1, per_view, C)."""
                flat = image.flatten(1, 2)
                return torch.gather(flat, 1, pixels[..., None].expand(-1, -1, flat.shape[-1]))[:, None]

            directions, rgb, mask = gather(directions), gather(rgb), gather(mask)
            height, width = 1, per_view
        lights = lighting(c2w, self.images.light, self.light_distance)
        batch = camera_batch(
            c2w=c2w,
            elevation=self.elevation[index],
            azimuth=self.azimuth[index],
            camera_distances=self.distance[index],
            fovy=torch.full((len(index),), self.images.fovy),
            light_positions=lights.pop("light_positions"),
            height=height,
            width=width,
            n_view=len(index),
            directions=directions,
        )
        batch.update(rgb=rgb, mask=mask, index=index, **lights)
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.sample()


@register("posed-images-datamodule")
class PosedImagesDataModule(CameraDataLoaders, pl.LightningDataModule, Updateable):
    """Posed RGBA images for reconstruction: random views to train, ground-truth frames to validate,
    a turntable at the frames' mean elevation and distance to test."""

    Config = PosedImagesConfig

    def __init__(self, cfg: Optional[Any] = None) -> None:
        super().__init__()
        self.cfg = cfg if isinstance(cfg, self.Config) else parse_structured(self.Config, cfg, prefix="data")
        cfg = self.cfg
        root = self._check_root(cfg.root)
        if len(cfg.background) != 3:
            raise UserError(f"config key 'data.background' expects 3 numbers (RGB in [0, 1]), got {cfg.background}")
        self.images = load_posed_images(root, cfg.height, cfg.width, tuple(cfg.background))
        n_frames = self.images.c2w.shape[0]
        self.train_dataset = PosedImagesIterableDataset(
            self.images, self._batch_size(n_frames), cfg.rays_per_batch, cfg.light_distance
        )
        self._updateable_children = [self.train_dataset]
        self.val_dataset = CameraBatchDataset(self._frames_batch(self._val_indices(n_frames)), cfg.n_val_views)
        self.test_dataset = CameraBatchDataset(self._orbit_batch(), 1)

    @staticmethod
    def _check_root(root: str) -> Path:
        if not root:
            raise UserError("config key 'data.root' is required: set data.root=<folder with transforms.json and RGBA PNGs>")
        path = Path(root).expanduser()
        if not path.is_dir():
            raise UserError(f"config key 'data.root': '{root}' is not a folder")
        if not (path / TRANSFORMS_NAME).is_file():
            raise UserError(f"config key 'data.root': '{root}' has no {TRANSFORMS_NAME}")
        return path

    def _batch_size(self, n_frames: int) -> int:
        value = self.cfg.batch_size
        if value == "all":
            value = n_frames
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise UserError(f"config key 'data.batch_size' expects a positive int or 'all', got {value!r}")
        if value > n_frames:
            raise UserError(f"config key 'data.batch_size' ({value}) exceeds the {n_frames} frames in data.root; use 'all'")
        rays = self.cfg.rays_per_batch
        if rays is not None and rays < value:
            raise UserError(f"config key 'data.rays_per_batch' ({rays}) must be >= the views per batch ({value})")
        return value

    def _val_indices(self, n_frames: int) -> Tensor:
        if self.cfg.n_val_views < 1:
            raise UserError(f"config key 'data.n_val_views' must be >= 1, got {self.cfg.n_val_views}")
        count = min(self.cfg.n_val_views, n_frames)
        return torch.linspace(0, n_frames - 1, count).round().long().unique()

    def _frames_batch(self, index: Tensor) -> Batch:
        images = self.images
        c2w = images.c2w[index]
        elevation, azimuth, distance = spherical_from_position(c2w[:, :3, 3])
        lights = lighting(c2w, images.light, self.cfg.light_distance)
        batch = camera_batch(
            c2w=c2w,
            elevation=elevation,
            azimuth=azimuth,
            camera_distances=distance,
            fovy=torch.full((len(index),), images.fovy),
            light_positions=lights.pop("light_positions"),
            height=images.height,
            width=images.width,
            n_view=len(index),
        )
        batch.update(rgb=images.rgb[index], mask=images.mask[index], index=index, **lights)
        return batch

    def eval_camera(self) -> Dict[str, float]:
        """Turntable elevation, distance and fovy: the config's, else derived from the frames."""
        cfg = self.cfg
        elevation, _, distance = spherical_from_position(self.images.c2w[:, :3, 3])
        return {
            "elevation": float(elevation.mean()) if cfg.eval_elevation_deg is None else cfg.eval_elevation_deg,
            "distance": float(distance.mean()) if cfg.eval_camera_distance is None else cfg.eval_camera_distance,
            "fovy": self.images.fovy if cfg.eval_fovy_deg is None else cfg.eval_fovy_deg,
        }

    def _orbit_batch(self) -> Batch:
        if self.cfg.n_test_views < 1:
            raise UserError(f"config key 'data.n_test_views' must be >= 1, got {self.cfg.n_test_views}")
        camera = self.eval_camera()
        views = view_group(self.cfg.n_test_views, camera["elevation"], fovy=camera["fovy"], distance=camera["distance"])
        lights = lighting(views["c2w"], self.images.light, self.cfg.light_distance)
        batch = camera_batch(
            light_positions=lights.pop("light_positions"),
            height=self.images.height,
            width=self.images.width,
            n_view=self.cfg.n_test_views,
            **views,
        )
        batch.update(lights)
        return batch

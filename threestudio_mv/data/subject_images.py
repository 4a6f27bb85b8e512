"""Subject images for MVDreamBooth (``subject-images-datamodule``): a few images of one object.

``data.image_dir`` is one of:

- a folder of images: RGBA PNGs (alpha = the object), or RGB on a plain background, which is masked
  here (the background colour is the median of the border pixels). Each is cropped to the object and
  re-framed so the object fills ``object_fraction`` of the frame, as in the multi-view training
  renders. Photos have no cameras, so alone they train only the model's 2D mode (F = 1, no camera)
  and the model learns one side of the subject for every camera. With ``unposed_views: hull`` (the
  default) the photos' cameras are found from their silhouettes and their coloured visual hull
  (:mod:`threestudio_mv.data.photo_hull`) is rendered at the multi-view training cameras, as a mesh
  subject is: those renders train the multi-view mode, the photos themselves still the 2D mode.
- the same with a ``transforms.json`` (posed images: ``camera_angle_x``, ``frames[*].file_path`` and
  ``transform_matrix`` c2w in our convention, as written by ``python -m threestudio_mv.data.procedural
  render``): views whose cameras form groups of 4 at one elevation and 90 degrees apart in azimuth
  train the multi-view mode (F = 4, with cameras); the other views train as single views with their
  cameras.
- a mesh file (obj, glb/gltf, ply, stl, off): normalised into the canonical box, coloured with
  ``mesh_color`` when it has no colours, and rendered here at the multi-view training cameras
  (``mesh_views`` views in groups of 4, elevation 0-30): the multi-view mode.

A training batch (as ``procedural-multiview-datamodule``'s): ``images`` (B*F, 3, S, S) in [-1, 1] over
``background``, ``c2w`` (B*F, 4, 4), ``camera`` (B*F, 16) MVDream conditions (zeros without cameras),
``captions`` (empty: the system sets the subject prompt) and ``num_views`` F.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from threestudio_mv import register
from threestudio_mv.data.foreground import IMAGE_SUFFIXES, folder_images, frame_image, mask_plain_background, read_rgba  # noqa: F401 (re-exported)
from threestudio_mv.data.mesh_render import MESH_SUFFIXES, load_subject_mesh, parse_colour, render_mesh
from threestudio_mv.data.posed_images import TRANSFORMS_NAME, _frame_pose, _image_path, _read_transforms
from threestudio_mv.utils.camera import mvdream_camera_condition, sample_view_groups, spherical_from_position
from threestudio_mv.utils.config import parse_structured
from threestudio_mv.utils.errors import UserError

GROUP_SIZE = 4  # views per multi-view group, 90 degrees apart (the model's n_view)
HULL_PHOTO_SIZE = 128  # photos are re-framed at this size for their silhouettes (unposed_views: hull)
MIN_IMAGES = 2


@dataclass
class SubjectImagesConfig:
    """Config of ``subject-images-datamodule`` (key ``data``)."""

    image_dir: str = ""  # required: image folder (optionally with transforms.json) or a mesh file
    image_size: int = 32  # pixels per side; must be the model's image size
    batch_size: int = 8  # images per step (multi-view batches: batch_size // 4 groups, at least 1)
    background: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])  # RGB the model was trained on
    mask_threshold: float = 0.1  # RGB images: foreground = some channel differs from the border colour by more
    recenter: bool = True  # images without cameras: crop to the object, re-frame it at object_fraction
    object_fraction: float = 0.55  # share of the frame the object's larger side fills after re-framing
    group_tolerance_deg: float = 10.0  # posed views: max elevation / azimuth error inside a 4-view group
    # photos without cameras: "hull" (as well as the photos, renders of their visual hull at the
    # multi-view training cameras, data/photo_hull.py) or "none" (the photos alone, single-view mode)
    unposed_views: str = "hull"
    # Mesh input
    mesh_color: str = "gray"  # colour of meshes without colours: a palette name or #rrggbb
    mesh_up_axis: str = "+z"  # obj/ply/stl/off: "+z" (front +x) or "+y" (front +z); glTF is always +y
    mesh_views: int = 8  # rendered views, a multiple of 4
    elevation_range: List[float] = field(default_factory=lambda: [0.0, 30.0])  # the training cameras
    fovy_range: List[float] = field(default_factory=lambda: [30.0, 50.0])
    relative_distance_range: List[float] = field(default_factory=lambda: [0.85, 1.0])
    seed: int = 0
    batches_per_epoch: int = 10000


@dataclass
class SubjectImages:
    """Subject images at one size: ``rgb`` (N, S, S, 3) over the background, ``alpha`` (N, S, S),
    ``c2w`` (N, 4, 4) or None, ``groups`` (lists of 4 view indices, azimuth 90 degrees apart in
    order), ``singles`` (indices trained as single views), ``source`` ("images", "posed images",
    "images + hull views" or "mesh"), ``names`` (file names, or view names) and ``unposed``
    (indices whose ``c2w`` is a placeholder: they train without a camera)."""

    rgb: Tensor
    alpha: Tensor
    c2w: Optional[Tensor]
    groups: List[List[int]]
    singles: List[int]
    source: str
    names: List[str]
    unposed: List[int] = field(default_factory=list)

    @property
    def mode(self) -> str:
        """How the images train: "multi-view", "multi-view + single views" or "single-view"."""
        if self.groups and self.singles:
            return "multi-view + single views"
        return "multi-view" if self.groups else "single-view"


def group_views(c2w: Tensor, tolerance_deg: float) -> Tuple[List[List[int]], List[int]]:
    """Split posed views into groups of 4 at one elevation, azimuths 90 degrees apart (each group in
    increasing azimuth, as the model was trained), and the remaining single views.

    Greedy in file order: a view starts a group when unused views lie within ``tolerance_deg`` of
    +90, +180 and +270 degrees azimuth at its elevation (the closest ones are taken).
    """
    elevation, azimuth, _ = spherical_from_position(c2w[:, :3, 3].double())
    used = [False] * c2w.shape[0]
    groups: List[List[int]] = []
    for start in range(c2w.shape[0]):
        if used[start]:
            continue
        members = [start]
        for quarter in (1, 2, 3):
            target = azimuth[start] + 90.0 * quarter
            error = ((azimuth - target + 180.0) % 360.0 - 180.0).abs()
            candidates = [
                (float(error[j]), j) for j in range(c2w.shape[0])
                if not used[j] and j not in members and float(error[j]) <= tolerance_deg
                and abs(float(elevation[j] - elevation[start])) <= tolerance_deg
            ]
            if not candidates:
                break
            members.append(min(candidates)[1])
        if len(members) == GROUP_SIZE:
            groups.append(members)
            for index in members:
                used[index] = True
    return groups, [i for i, taken in enumerate(used) if not taken]


def _describe(files: Sequence[Path], limit: int = 5) -> str:
    names = [f.name for f in files[:limit]]
    more = f", ... ({len(files)} in all)" if len(files) > limit else ""
    return ", ".join(names) + more


def _check_count(root: Path, names: Sequence[str], found: str) -> None:
    if len(names) < MIN_IMAGES:
        raise UserError(
            f"data.image_dir '{root}' holds {found}; MVDreamBooth needs at least {MIN_IMAGES} images of the "
            "subject (4-8 recommended), or a mesh file"
        )


def _composite(premultiplied: Tensor, background: Sequence[float]) -> Tuple[Tensor, Tensor]:
    alpha = premultiplied[..., 3]
    rgb = premultiplied[..., :3] + torch.tensor(background, dtype=torch.float32) * (1.0 - alpha[..., None])
    return rgb.clamp(0.0, 1.0), alpha


def load_image_folder(root: Path, cfg: SubjectImagesConfig) -> SubjectImages:
    """Images of a folder (posed when it holds transforms.json)."""
    transforms = root / TRANSFORMS_NAME
    if transforms.is_file():
        _, frames, _ = _read_transforms(transforms)
        poses = [_frame_pose(transforms, i, frame) for i, frame in enumerate(frames)]
        paths = [_image_path(root, transforms, i, frame["file_path"]) for i, frame in enumerate(frames)]
        _check_count(root, [p.name for p in paths], f"{len(paths)} frame in {TRANSFORMS_NAME} ({_describe(paths)})")
        recenter = False  # re-framing would break the cameras
    else:
        paths = folder_images(root, "data.image_dir")
        if not paths:
            files = sorted(p for p in root.iterdir() if p.is_file() and not p.name.startswith("."))
            listing = f"no image ({', '.join(IMAGE_SUFFIXES)})" + (f", only {_describe(files)}" if files else ", nothing at all")
            _check_count(root, [], listing)
        _check_count(root, [p.name for p in paths], f"only 1 image ({paths[0].name})" if paths else "no image")
        poses, recenter = [], cfg.recenter
    framed = [frame_image(read_rgba(p, cfg.mask_threshold), cfg.image_size, recenter, cfg.object_fraction) for p in paths]
    rgb, alpha = _composite(torch.stack(framed), cfg.background)
    if poses:
        c2w = torch.from_numpy(np.stack(poses)).float()
        groups, singles = group_views(c2w, cfg.group_tolerance_deg)
        return SubjectImages(rgb, alpha, c2w, groups, singles, "posed images", [p.name for p in paths])
    photos = SubjectImages(rgb, alpha, None, [], list(range(len(paths))), "images", [p.name for p in paths])
    return photos if cfg.unposed_views == "none" else _with_hull_views(photos, paths, cfg)


def _with_hull_views(photos: SubjectImages, paths: Sequence[Path], cfg: SubjectImagesConfig) -> SubjectImages:
    """The photos (single views without a camera) plus ``mesh_views`` renders of their visual hull
    (:mod:`threestudio_mv.data.photo_hull`: cameras found from the silhouettes) at the multi-view
    training cameras, in 4-view groups."""
    from threestudio_mv.data.mesh_render import canonical_mesh
    from threestudio_mv.data.photo_hull import photos_hull

    sharp = torch.stack([frame_image(read_rgba(p, cfg.mask_threshold), HULL_PHOTO_SIZE, True, cfg.object_fraction) for p in paths])
    mesh, poses = photos_hull(sharp)
    views = mesh_views(canonical_mesh(mesh), cfg, "hull")
    print(f"subject photos: cameras from their silhouettes (azimuth {[round(a) for a in poses.azimuth.tolist()]}, "
          f"elevation {[round(e) for e in poses.elevation.tolist()]}; the hull covers {100 * poses.agreement:.0f}% of each silhouette)")
    count = len(photos.names)
    return SubjectImages(
        rgb=torch.cat([photos.rgb, views.rgb]),
        alpha=torch.cat([photos.alpha, views.alpha]),
        c2w=torch.cat([torch.eye(4).expand(count, 4, 4), views.c2w]),
        groups=[[count + i for i in group] for group in views.groups],
        singles=list(range(count)),
        source="images + hull views",
        names=photos.names + views.names,
        unposed=list(range(count)),
    )


def mesh_views(mesh: Any, cfg: SubjectImagesConfig, name: str) -> SubjectImages:
    """Render a canonical vertex-coloured mesh at ``cfg.mesh_views`` multi-view training cameras (groups of 4)."""
    if cfg.mesh_views < GROUP_SIZE or cfg.mesh_views % GROUP_SIZE:
        raise UserError(f"config key 'data.mesh_views' must be a positive multiple of {GROUP_SIZE}, got {cfg.mesh_views}")
    cameras = sample_view_groups(
        cfg.mesh_views // GROUP_SIZE, GROUP_SIZE, tuple(cfg.elevation_range), tuple(cfg.fovy_range),
        tuple(cfg.relative_distance_range), generator=torch.Generator().manual_seed(cfg.seed),
    )
    rendered = render_mesh(mesh, cameras["c2w"], cameras["fovy"], cfg.image_size, cfg.background)
    groups = [list(range(start, start + GROUP_SIZE)) for start in range(0, cfg.mesh_views, GROUP_SIZE)]
    names = [f"{name}@elev{e:.0f}_azim{a:.0f}" for e, a in zip(cameras["elevation"].tolist(), cameras["azimuth"].tolist())]
    return SubjectImages(rendered["rgb"], rendered["alpha"], cameras["c2w"], groups, [], "mesh", names)


def load_mesh_subject(path: Path, cfg: SubjectImagesConfig) -> SubjectImages:
    """Render a subject mesh at ``cfg.mesh_views`` multi-view training cameras (groups of 4)."""
    return mesh_views(load_subject_mesh(path, cfg.mesh_up_axis, parse_colour(cfg.mesh_color)), cfg, path.name)


def load_subject(image_dir: str, cfg: SubjectImagesConfig) -> SubjectImages:
    """Subject images from ``image_dir`` (see the module docstring); UserErrors name the problem."""
    if not image_dir:
        raise UserError("config key 'data.image_dir' is required: a folder of 2+ images of the subject, or a mesh file")
    path = Path(image_dir).expanduser()
    if not path.exists():
        raise UserError(f"data.image_dir '{image_dir}' does not exist")
    if path.is_dir():
        return load_image_folder(path, cfg)
    if path.suffix.lower() in MESH_SUFFIXES:
        return load_mesh_subject(path, cfg)
    if path.suffix.lower() in IMAGE_SUFFIXES:
        raise UserError(f"data.image_dir '{image_dir}' is a single image; put {MIN_IMAGES}+ images of the subject in a folder")
    raise UserError(
        f"data.image_dir '{image_dir}' is neither an image folder nor a mesh file ({', '.join(MESH_SUFFIXES)})"
    )


# ------------------------------------------------------------------------------------------ batches
class SubjectBatches(Dataset):
    """Item i is a whole batch, drawn with a generator seeded by (seed, i).

    With 4-view groups and single views both present, a batch is multi-view or single-view in
    proportion to the images each holds (a batch has one F).
    """

    def __init__(self, subject: SubjectImages, cfg: SubjectImagesConfig) -> None:
        self.subject, self.cfg = subject, cfg
        self.images = subject.rgb.permute(0, 3, 1, 2).mul(2.0).sub(1.0).contiguous()
        if subject.c2w is not None:
            self.c2w, self.camera = subject.c2w, mvdream_camera_condition(subject.c2w)
            self.camera[subject.unposed] = 0.0  # no camera: the model's 2D mode
        else:
            self.c2w, self.camera = torch.eye(4).expand(len(self.images), 4, 4).clone(), torch.zeros(len(self.images), 16)
        grouped = GROUP_SIZE * len(subject.groups)
        self.group_share = grouped / (grouped + len(subject.singles))

    def __len__(self) -> int:
        return self.cfg.batches_per_epoch

    def __getitem__(self, index: int) -> Dict[str, Any]:
        rng = np.random.default_rng([self.cfg.seed, index])
        groups, singles = self.subject.groups, self.subject.singles
        if groups and rng.random() < self.group_share:
            count = min(len(groups), max(1, self.cfg.batch_size // GROUP_SIZE))
            chosen = rng.choice(len(groups), size=count, replace=False)
            views = np.concatenate([groups[g] for g in chosen])
            num_views = GROUP_SIZE
        else:
            views = rng.choice(singles, size=min(len(singles), self.cfg.batch_size), replace=False)
            num_views = 1
        views = torch.from_numpy(np.asarray(views, dtype=np.int64))
        return {
            "images": self.images[views],
            "c2w": self.c2w[views],
            "camera": self.camera[views],
            "captions": [""] * len(views),
            "num_views": num_views,
        }


class _OneItem(Dataset):
    """Validation and test have one step; the system chooses the captions and cameras."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return {"index": index}


@register("subject-images-datamodule")
class SubjectImagesDataModule(pl.LightningDataModule):
    """A few images of one subject for MVDreamBooth fine-tuning (see the module docstring)."""

    Config = SubjectImagesConfig

    def __init__(self, cfg: Optional[Any] = None) -> None:
        super().__init__()
        self.cfg = cfg if isinstance(cfg, SubjectImagesConfig) else parse_structured(SubjectImagesConfig, cfg, "data")
        if self.cfg.image_size < 8:
            raise UserError(f"config key 'data.image_size' must be at least 8, got {self.cfg.image_size}")
        if self.cfg.batch_size < 1:
            raise UserError(f"config key 'data.batch_size' must be at least 1, got {self.cfg.batch_size}")
        if len(self.cfg.background) != 3:
            raise UserError(f"config key 'data.background' expects 3 numbers (RGB in [0, 1]), got {self.cfg.background}")
        if not 0.0 < self.cfg.object_fraction <= 1.0:
            raise UserError(f"config key 'data.object_fraction' must be in (0, 1], got {self.cfg.object_fraction}")
        if self.cfg.unposed_views not in ("hull", "none"):
            raise UserError(f"config key 'data.unposed_views' must be 'hull' or 'none', got '{self.cfg.unposed_views}'")
        self.subject = load_subject(self.cfg.image_dir, self.cfg)

    def setup(self, stage: Optional[str] = None) -> None:
        self.train_set = SubjectBatches(self.subject, self.cfg)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=None, shuffle=True, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(_OneItem(), batch_size=None, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()

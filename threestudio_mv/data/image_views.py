"""Image-to-3D data (``image-views-datamodule``): views generated from input images, served to the
reconstruction system as posed images.

At setup the input image(s) of ``data.image_path`` (a file, or a folder of 1-4 images of one object:
RGBA PNGs, or RGB on a plain background) go through the image-to-views model (MVDiffusion++ at toy
scale, :mod:`threestudio_mv.models.mvdiffusion.image_to_views`); its 16 RGBA views and their
``transforms.json`` (cameras in the frame where the first input is seen from azimuth 0, z up) are
written to ``data.views_dir`` (default: a cache folder named by the inputs' bytes, the model and the
seed, so a rerun or a ``--test`` of the trial reuses them) and then read exactly as
``posed-images-datamodule`` reads a folder. Validation and test batches also carry ``input_rgb``, the
first input image at the render size, so the system can show input and result side by side.
"""
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from threestudio_mv import register
from threestudio_mv.data.foreground import image_paths, load_object_image
from threestudio_mv.data.posed_images import TRANSFORMS_NAME, PosedImagesConfig, PosedImagesDataModule
from threestudio_mv.data.random_cameras import Batch
from threestudio_mv.utils.config import parse_structured
from threestudio_mv.utils.errors import UserError


@dataclass
class ImageViewsConfig(PosedImagesConfig):
    """Config of ``image-views-datamodule`` (key ``data``): posed-images keys, plus where the views come from."""

    image_path: str = ""  # required: an image of the object, or a folder of 1-4 of them
    model: str = ""  # image-to-views model folder (default: the bundled i2mv-tiny)
    seed: int = 0  # the sampler's seed
    num_inference_steps: Optional[int] = None  # DDIM steps (default: the model's)
    guidance_scale: Optional[float] = None  # CFG scale (default: the model's)
    mask_threshold: float = 0.1  # RGB inputs: foreground = differs from the border colour by more
    views_dir: str = ""  # where the generated views go (default: a cache folder, see the module docstring)


def default_views_dir(paths: List[Path], cfg: ImageViewsConfig) -> Path:
    """``$XDG_CACHE_HOME/threestudio-mv/image-to-3d/<hash>``: the hash of the inputs' bytes, the model
    folder's ``model_index.json`` (its default sampling settings) and the sampling settings given
    (``~/.cache`` when XDG_CACHE_HOME is unset)."""
    from threestudio_mv.models.mvdiffusion.image_to_views import DEFAULT_I2MV_MODEL

    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    model = Path(cfg.model).expanduser().resolve() if cfg.model else DEFAULT_I2MV_MODEL
    index = model / "model_index.json"
    digest.update(index.read_bytes() if index.is_file() else b"")
    settings = (str(model) if cfg.model else "bundled", cfg.seed, cfg.num_inference_steps, cfg.guidance_scale, cfg.mask_threshold)
    digest.update(repr(settings).encode())
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "threestudio-mv" / "image-to-3d" / digest.hexdigest()[:16]


@register("image-views-datamodule")
class ImageViewsDataModule(PosedImagesDataModule):
    """Generates 16 views from ``data.image_path`` at setup, then serves them as posed images."""

    Config = ImageViewsConfig

    def __init__(self, cfg: Optional[Any] = None) -> None:
        from threestudio_mv.models.mvdiffusion.image_to_views import ImageToViewsModel, generate_views, write_views

        cfg = cfg if isinstance(cfg, self.Config) else parse_structured(self.Config, cfg, prefix="data")
        if not cfg.image_path:
            raise UserError("config key 'data.image_path' is required: an image of the object, or a folder of 1-4 of them")
        paths = image_paths([cfg.image_path], "data.image_path")
        model = ImageToViewsModel.from_pretrained(cfg.model or None)
        meta = model.metadata
        if len(paths) > meta.max_inputs:
            raise UserError(f"data.image_path '{cfg.image_path}' holds {len(paths)} images; the model takes 1 to {meta.max_inputs}")
        self.inputs = torch.stack([load_object_image(p, meta.image_size, meta.object_fraction, cfg.mask_threshold) for p in paths])
        folder = Path(cfg.views_dir).expanduser() if cfg.views_dir else default_views_dir(paths, cfg)
        if not (folder / TRANSFORMS_NAME).is_file():
            views = generate_views(model, self.inputs, cfg.seed, num_inference_steps=cfg.num_inference_steps,
                                   guidance_scale=cfg.guidance_scale, progress=True)
            write_views(folder, views, self.inputs, meta)
        print(f"generated views: {folder}")
        cfg.root = str(folder)
        self.background = torch.tensor(cfg.background, dtype=torch.float32)
        super().__init__(cfg)

    def _input_rgb(self, count: int) -> Tensor:
        """The first input over the background, resized to the render size: (count, H, W, 3)."""
        first = self.inputs[0]
        rgb = first[..., :3] + self.background * (1.0 - first[..., 3:])
        size = (self.images.height, self.images.width)
        rgb = F.interpolate(rgb.permute(2, 0, 1)[None], size=size, mode="bilinear", antialias=True, align_corners=False)
        return rgb[0].permute(1, 2, 0).clamp(0.0, 1.0).expand(count, -1, -1, -1)

    def _frames_batch(self, index: Tensor) -> Batch:
        batch = super()._frames_batch(index)
        batch["input_rgb"] = self._input_rgb(len(index))
        return batch

    def _orbit_batch(self) -> Batch:
        batch = super()._orbit_batch()
        batch["input_rgb"] = self._input_rgb(self.cfg.n_test_views)
        return batch

"""``panorama-environment-map``: an equirectangular panorama at infinity behind the object (issue 19's
text-to-3D option): a given image, or one generated from a room prompt by the bundled panorama model.

The guidance model was trained on objects over a plain background, so in training the background is
``train_color``; validation and test renders (the turntable) show the object in the panorama.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import threestudio_mv
from threestudio_mv.models.background.base import BaseBackground
from threestudio_mv.utils.camera import direction_to_equirect
from threestudio_mv.utils.errors import UserError


@threestudio_mv.register("panorama-environment-map")
class PanoramaEnvironmentMap(BaseBackground):
    """Colour of the panorama (z-up equirectangular, column 0 at azimuth 180 deg, as
    ``python -m threestudio_mv.panorama`` writes them) in the ray's direction; ``train_color`` in
    training. Give ``image`` (a panorama PNG) or ``prompt`` (generated once, at start-up)."""

    @dataclass
    class Config:
        image: str = ""  # an equirectangular panorama (2:1 PNG/JPEG)
        prompt: str = ""  # or a room to generate, e.g. "a room with blue walls and a brown floor"
        model: str = ""  # the panorama model folder ("": the bundled one)
        seed: int = 0
        steps: int = 0  # sampler steps (0: the model's default)
        height: int = 128  # rows of the generated panorama
        train_color: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        cfg, prefix = self.cfg, self.config_prefix
        if bool(cfg.image) == bool(cfg.prompt.strip()):
            raise UserError(f"config keys '{prefix}.image' and '{prefix}.prompt': give exactly one (a panorama file, or a room to generate)")
        if len(cfg.train_color) != 3:
            raise UserError(f"config key '{prefix}.train_color' needs 3 numbers (RGB), got {cfg.train_color}")
        panorama = self._read(Path(cfg.image).expanduser()) if cfg.image else self._generate()
        self.register_buffer("panorama", panorama.permute(2, 0, 1).contiguous(), persistent=False)  # (3, H, W)
        self.register_buffer("train_colour", torch.tensor(cfg.train_color, dtype=torch.float32), persistent=False)

    def _read(self, path: Path) -> Tensor:
        from threestudio_mv.utils.io import load_image

        if not path.is_file():
            raise UserError(f"config key '{self.config_prefix}.image': '{path}' not found")
        try:
            image = load_image(path)
        except Exception as error:  # PIL raises several unrelated types for a bad file
            raise UserError(f"config key '{self.config_prefix}.image': cannot read '{path}' ({error})") from None
        return torch.from_numpy(np.ascontiguousarray(image[..., :3])).float()

    def _generate(self) -> Tensor:
        from threestudio_mv.models.mvdiffusion.panorama import PanoramaModel, sample_panorama, stitch_equirect
        from threestudio_mv.models.prompt_processors.cache import CachedTextEncoder
        from threestudio_mv.utils.camera import panorama_yaws

        model = PanoramaModel.from_pretrained(Path(self.cfg.model).expanduser() if self.cfg.model else None)
        texts = CachedTextEncoder(model.build_text_encoder(), None)
        views = sample_panorama(
            model, texts.encode([self.cfg.prompt.strip()]), texts.encode([""]),
            num_inference_steps=self.cfg.steps or None, generator=torch.Generator().manual_seed(self.cfg.seed),
        )
        yaws = panorama_yaws(model.metadata.n_view)
        return stitch_equirect(views, yaws, model.metadata.fov_deg, self.cfg.height)["image"]

    def forward(self, dirs: Tensor) -> Tensor:
        if self.training:
            return self.train_colour.to(dirs.dtype).expand(*dirs.shape[:-1], 3)
        height, width = self.panorama.shape[1:]
        pixel = direction_to_equirect(dirs.reshape(-1, 3), height, width)
        # One wrapped column on each side, so bilinear sampling is seamless across azimuth 180 deg.
        wrapped = torch.cat([self.panorama[..., -1:], self.panorama, self.panorama[..., :1]], dim=-1)
        grid = torch.stack([(pixel[:, 0] + 1.0) / (width + 2) * 2.0 - 1.0, pixel[:, 1] / height * 2.0 - 1.0], dim=-1)
        colour = F.grid_sample(wrapped[None].float(), grid[None, None], mode="bilinear", padding_mode="border", align_corners=False)
        return colour[0, :, 0].T.reshape(*dirs.shape[:-1], 3).to(dirs.dtype)

"""Sampling multi-view images: DDIM (any eta) with classifier-free guidance through the shared helper,
and :class:`MVDreamPipeline`, the interface of the community MVDream diffusers ports over a model folder."""
import os
from functools import partial
from typing import List, Optional, Union

import numpy as np
import torch
from PIL import Image

from threestudio_mv.models.mvdiffusion.cfg import anchor_background, predict_noise_with_cfg
from threestudio_mv.models.mvdiffusion.model import MultiViewDiffusionModel
from threestudio_mv.models.mvdiffusion.sampler import ddim_sample
from threestudio_mv.utils.camera import mvdream_camera_condition, view_group
from threestudio_mv.utils.errors import UserError


@torch.no_grad()
def sample_multiview(
    model: MultiViewDiffusionModel,
    cond_embeddings: torch.Tensor,
    uncond_embeddings: torch.Tensor,
    c2w: torch.Tensor,
    num_views: int,
    guidance_scale: float = 5.0,
    num_inference_steps: int = 50,
    generator: Optional[torch.Generator] = None,
    progress: bool = True,
    anchor: bool = True,
    eta: float = 0.0,
) -> torch.Tensor:
    """Generate images for G objects x ``num_views`` cameras.

    ``cond_embeddings`` (G*F, L, D) or (1, L, D); ``uncond_embeddings`` likewise; ``c2w`` (G*F, 4, 4)
    in our camera convention, views of one object contiguous. ``generator`` (a CPU generator) makes
    the initial noise, and with ``eta`` > 0 each step's fresh noise, reproducible on any device; with
    ``model.metadata.init_mean`` the start is the forward process's marginal at the first timestep. With ``anchor`` and a pixel model whose
    ``metadata.background`` is set, each step's x0 prediction is shifted so its border is that colour
    (:func:`~threestudio_mv.models.mvdiffusion.cfg.anchor_background`). Returns images (G*F, 3, H, W) in [0, 1].
    """
    device = model.device
    camera = mvdream_camera_condition(c2w).to(device)
    cond, uncond = cond_embeddings.to(device), uncond_embeddings.to(device)
    shape = (c2w.shape[0], model.sample_channels, model.sample_size, model.sample_size)
    anchor_to = None
    if anchor and model.metadata.background is not None and not model.metadata.latent:
        anchor_to = partial(anchor_background, background=torch.tensor(model.metadata.background, device=device) * 2.0 - 1.0)

    def predict(sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return predict_noise_with_cfg(model, sample, timestep, cond, uncond, camera, num_views, guidance_scale)[0]

    sample = ddim_sample(
        predict, shape, model.scheduler_config, num_inference_steps, eta=eta, generator=generator,
        init_mean=model.metadata.init_mean, x0_transform=anchor_to, device=device, progress=progress,
    )
    images = model.decode_samples(sample)
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


class MVDreamPipeline:
    """A model folder (converted official weights, the bundled model, a trained one) called as the community
    MVDream diffusers ports are::

        pipe = MVDreamPipeline.from_pretrained(folder, torch_dtype=torch.float16)
        pipe.to("cuda")
        images = pipe("an astronaut riding a horse", num_frames=4, elevation=15, guidance_scale=7.5,
                      num_inference_steps=50)  # num_frames arrays (H, W, 3) in [0, 1]

    Views are 360 / ``num_frames`` degrees apart from ``azimuth_start`` (0 looks from +x, the front), framed
    as in the model's training; the model's prompt suffix (", 3d asset") is appended. Unset options take the
    model's defaults. Not a ``diffusers.DiffusionPipeline``: the multi-view attention and the camera
    condition need this package's code, so ``trust_remote_code`` loading does not apply.
    """

    def __init__(self, model: MultiViewDiffusionModel) -> None:
        self.model = model.eval()
        self.text_encoder = model.build_text_encoder()

    @classmethod
    def from_pretrained(
        cls, folder: Optional[Union[str, os.PathLike]] = None, torch_dtype: torch.dtype = torch.float32
    ) -> "MVDreamPipeline":
        """Load a model folder (default: the bundled model); the UNet and VAE in ``torch_dtype``."""
        return cls(MultiViewDiffusionModel.from_pretrained(folder).to(dtype=torch_dtype))

    def to(self, device: Union[str, torch.device]) -> "MVDreamPipeline":
        """Move the model and the text encoder to ``device``."""
        self.model.to(device)
        self.text_encoder.to(device)
        return self

    @torch.no_grad()
    def __call__(
        self,
        prompt: str,
        negative_prompt: str = "",
        num_frames: Optional[int] = None,
        elevation: Optional[float] = None,
        azimuth_start: float = 0.0,
        fovy: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        num_inference_steps: Optional[int] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        eta: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        output_type: str = "numpy",
        progress: bool = True,
    ) -> Union[List[np.ndarray], List[Image.Image]]:
        """``num_frames`` views of ``prompt``: float arrays (H, W, 3) in [0, 1], or PIL images with
        ``output_type="pil"``. ``generator``: a CPU generator, for reproducible noise on any device."""
        meta = self.model.metadata
        if not prompt.strip():
            raise UserError('the prompt is empty; describe the object, e.g. "a red cube"')
        if any(side not in (None, meta.image_size) for side in (height, width)):
            raise UserError(f"this model makes {meta.image_size}x{meta.image_size} views; got height={height}, width={width}")
        if output_type not in ("numpy", "pil"):
            raise UserError(f"output_type must be 'numpy' or 'pil', got '{output_type}'")
        num_frames = num_frames or meta.n_view
        embeddings = self.text_encoder.encode([prompt.strip() + meta.prompt_suffix, negative_prompt])
        views = view_group(
            num_frames, meta.default_elevation if elevation is None else elevation, azimuth_start,
            meta.default_fovy if fovy is None else fovy, meta.relative_distance,
        )
        images = sample_multiview(
            self.model, embeddings[:1], embeddings[1:], views["c2w"], num_frames,
            guidance_scale=meta.guidance_scale if guidance_scale is None else guidance_scale,
            num_inference_steps=num_inference_steps or meta.num_inference_steps, generator=generator,
            progress=progress, eta=meta.eta if eta is None else eta,
        )
        arrays = list(images.permute(0, 2, 3, 1).cpu().numpy())
        if output_type == "pil":
            return [Image.fromarray((array * 255.0 + 0.5).astype(np.uint8)) for array in arrays]
        return arrays

"""System ``image-to-3d-system``: the reconstruction system fitted to views generated from an image
(``image-views-datamodule``); its validation grid and turntable show the input image beside the result."""
from typing import Any, Dict, List

import torch

from threestudio_mv import register
from threestudio_mv.systems.reconstruction import ReconstructionSystem
from threestudio_mv.utils.io import to_uint8


@register("image-to-3d-system")
class ImageTo3DSystem(ReconstructionSystem):
    """:class:`ReconstructionSystem` whose images start with the batch's ``input_rgb`` when it has one."""

    def _view_images(self, out: Dict[str, torch.Tensor], index: int, batch: Dict[str, Any]) -> List[Any]:
        images = super()._view_images(out, index, batch)
        if "input_rgb" in batch:
            images.insert(0, batch["input_rgb"][index])
        return images

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        out = self(batch)
        shown = {"input_rgb": batch["input_rgb"]} if "input_rgb" in batch else {}
        for i in range(out["comp_rgb"].shape[0]):
            self._test_frames.append(to_uint8(torch.cat(self._view_images(out, i, shown), dim=1)))

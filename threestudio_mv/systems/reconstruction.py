"""System `reconstruction`: fit the 3D volume to posed images (RGB + alpha losses).

The task with a known answer that proves geometry, renderer and exporter: a folder rendered from a
procedural asset goes in, its coloured mesh should come out.
"""
from dataclasses import dataclass
from typing import Any, Dict

import torch
import torch.nn.functional as F

from threestudio_mv import register
from threestudio_mv.systems.volume_system import VolumeSystem
from threestudio_mv.utils.config import C, Schedule, schedule
from threestudio_mv.utils.losses import binary_entropy


@register("reconstruction-system")
class ReconstructionSystem(VolumeSystem):
    """Fits geometry + material to a posed-images batch (keys ``rgb`` and ``mask`` besides cameras)."""

    @dataclass
    class Config(VolumeSystem.Config):
        lambda_rgb: Schedule = schedule(1.0)
        lambda_mask: Schedule = schedule(0.1)
        lambda_opaque: Schedule = schedule(0.001)

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        step = self.true_global_step
        losses = {
            "rgb": F.mse_loss(out["comp_rgb"], batch["rgb"]),
            "mask": F.binary_cross_entropy(out["opacity"].clamp(1e-4, 1 - 1e-4), batch["mask"]),
            "opaque": binary_entropy(out["opacity"]),
        }
        weights = {"rgb": self.cfg.lambda_rgb, "mask": self.cfg.lambda_mask, "opaque": self.cfg.lambda_opaque}
        for name, (weight, compute) in self.mesh_terms(out).items():
            if C(weight, step) > 0:
                losses[name], weights[name] = compute(), weight
        loss = sum(C(weights[k], step) * v for k, v in losses.items())
        for name, value in losses.items():
            self.log(f"train/loss_{name}", value)
        self.log("train/loss", loss, prog_bar=True)
        with torch.no_grad():
            psnr = -10.0 * torch.log10(F.mse_loss(out["comp_rgb"], batch["rgb"]).clamp_min(1e-10))
        self.log("train/psnr", psnr, prog_bar=True)
        return loss

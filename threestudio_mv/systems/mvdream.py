"""System `mvdream-system`: text-to-3D with multi-view score distillation (SDS or x0-SDS).

One step (docs/conventions.md): G groups of n_view cameras -> render -> all B = G * n_view renders to
the multi-view guidance in one call -> + regularisers -> step. Export at the end gives a textured mesh.
"""
from dataclasses import dataclass, field
from typing import Any, Dict

import torch

import threestudio_mv
from threestudio_mv import register
from threestudio_mv.systems.volume_system import VolumeSystem
from threestudio_mv.utils import losses
from threestudio_mv.utils.config import C, Schedule, schedule


@register("mvdream-system")
class MVDreamSystem(VolumeSystem):
    """Optimises the volume so that its renders score well under a multi-view diffusion model."""

    @dataclass
    class Config(VolumeSystem.Config):
        prompt_processor_type: str = "mv-prompt-processor"
        prompt_processor: Dict[str, Any] = field(default_factory=dict)
        guidance_type: str = "multiview-diffusion-guidance"
        guidance: Dict[str, Any] = field(default_factory=dict)
        lambda_sds: Schedule = schedule(1.0)
        lambda_orient: Schedule = schedule(0.0)
        lambda_sparsity: Schedule = schedule(0.0)
        lambda_opaque: Schedule = schedule(0.0)
        lambda_z_variance: Schedule = schedule(0.0)

    def configure(self) -> None:
        super().configure()
        # Guidance is not an nn.Module child: its weights never enter a checkpoint.
        self.guidance = threestudio_mv.find(self.cfg.guidance_type)(self.cfg.guidance, prefix="system.guidance")
        prompt_cfg = dict(self.cfg.prompt_processor)
        # The prompt must be encoded by the guidance model's own text encoder.
        prompt_cfg.setdefault("pretrained_model_name_or_path", self.guidance.cfg.pretrained_model_name_or_path)
        self.prompt_processor = threestudio_mv.find(self.cfg.prompt_processor_type)(
            prompt_cfg, prefix="system.prompt_processor"
        )
        self._updateable_children = [self.guidance]

    def training_step(self, batch: Dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self(batch)
        prompt = self.prompt_processor()
        guidance_out = self.guidance(out["comp_rgb"], prompt.cond, prompt.uncond, batch["c2w"], int(batch["n_view"]))
        step = self.true_global_step
        terms = {
            "sds": (self.cfg.lambda_sds, lambda: guidance_out["loss_sds"]),
            "sparsity": (self.cfg.lambda_sparsity, lambda: losses.sparsity(out["opacity"])),
            "opaque": (self.cfg.lambda_opaque, lambda: losses.binary_entropy(out["opacity"])),
            "z_variance": (self.cfg.lambda_z_variance, lambda: losses.z_variance(out)),
            "orient": (self.cfg.lambda_orient, lambda: losses.orientation(out)),
            **self.mesh_terms(out),
        }
        loss = torch.zeros((), device=out["comp_rgb"].device)
        for name, (weight, compute) in terms.items():
            weight = C(weight, step)
            if weight > 0:
                value = compute()
                self.log(f"train/loss_{name}", value)
                loss = loss + weight * value
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/t", guidance_out["timestep"].float(), prog_bar=True)
        return loss

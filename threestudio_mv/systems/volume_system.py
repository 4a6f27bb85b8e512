"""VolumeSystem: the shared machinery of systems that optimise a 3D volume.

Builds geometry -> material -> background -> renderer from the config, renders validation grids and
test turntables, and exports a textured mesh. Subclasses (reconstruction, mvdream, ...) only define
``training_step``.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import torch

import threestudio_mv
from threestudio_mv.systems.base import BaseSystem
from threestudio_mv.utils import losses
from threestudio_mv.utils.config import C, Schedule, schedule, schedule_values
from threestudio_mv.utils.errors import UserError
from threestudio_mv.utils.io import to_uint8

# Renderer outputs shown in validation grids, in this order, when present.
_GRID_KEYS = ("comp_rgb", "comp_normal", "opacity")


class VolumeSystem(BaseSystem):
    """Base of systems whose result is a rendered volume and an exported mesh."""

    @dataclass
    class Config(BaseSystem.Config):
        geometry_type: str = "implicit-volume"
        geometry: Dict[str, Any] = field(default_factory=dict)
        material_type: str = "no-material"
        material: Dict[str, Any] = field(default_factory=dict)
        background_type: str = "solid-color"
        background: Dict[str, Any] = field(default_factory=dict)
        renderer_type: str = "nerf-volume-renderer"
        renderer: Dict[str, Any] = field(default_factory=dict)
        exporter_type: str = "mesh-exporter"
        exporter: Dict[str, Any] = field(default_factory=dict)
        # stages: the previous stage's checkpoint (its trial's configs/parsed.yaml says what it was); the
        # geometry is seeded from it (geometry.seed_from), with its colour field when inherit_texture
        geometry_convert_from: str = ""
        geometry_convert_inherit_texture: bool = False
        # every parameter group's lr is multiplied by this C() schedule of the step, e.g.
        # [[0, 1], [100, 1], [150, 0.1]] anneals a texture stage so it ends near the mean of its noisy
        # targets, not on the last one
        lr_scale: Schedule = schedule(1.0)
        # mesh geometries (the renderer returns the mesh): smooth surfaces
        lambda_normal_consistency: Schedule = schedule(0.0)
        lambda_laplacian_smoothness: Schedule = schedule(0.0)
        # a mesh made from a volume (geometry.seed_distance): mean squared distance of its vertices to the
        # volume's surface, read on the volume's own grid: keeps the detail a coarser grid and smoothing lose
        lambda_seed_fidelity: Schedule = schedule(0.0)
        # mean |albedo(x) - albedo(x + N(0, albedo_smoothness_scale^2))| at surface points: colours of
        # surfaces the cameras never face (undersides, creases) follow their seen neighbours instead of
        # keeping specks of the background or of the previous stage
        lambda_albedo_smoothness: Schedule = schedule(0.0)
        albedo_smoothness_scale: float = 0.02
        albedo_smoothness_points: int = 4096

    def configure(self) -> None:
        cfg = self.cfg
        self.geometry = threestudio_mv.find(cfg.geometry_type)(cfg.geometry, prefix="system.geometry")
        self.material = threestudio_mv.find(cfg.material_type)(cfg.material, prefix="system.material")
        self.background = threestudio_mv.find(cfg.background_type)(cfg.background, prefix="system.background")
        self.renderer = threestudio_mv.find(cfg.renderer_type)(
            cfg.renderer,
            prefix="system.renderer",
            geometry=self.geometry,
            material=self.material,
            background=self.background,
        )
        self._test_frames: List[Any] = []
        if cfg.geometry_convert_from:
            self.seed_geometry(Path(cfg.geometry_convert_from))

    def seed_geometry(self, checkpoint: Path) -> None:
        """Seed this stage's geometry from the previous stage's checkpoint (docs/stages.md)."""
        from omegaconf import OmegaConf

        key = "system.geometry_convert_from"
        if not checkpoint.is_file():
            raise UserError(f"config key '{key}': checkpoint '{checkpoint}' not found")
        parsed = checkpoint.resolve().parent.parent / "configs" / "parsed.yaml"
        if not parsed.is_file():
            raise UserError(f"config key '{key}': '{parsed}' not found (the checkpoint must sit in a trial's ckpts/)")
        previous = OmegaConf.to_container(OmegaConf.load(parsed).system, resolve=True)
        source = threestudio_mv.find(previous["geometry_type"])(previous["geometry"], prefix="previous stage's system.geometry")
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
        source.load_state_dict({k[len("geometry."):]: v for k, v in state.items() if k.startswith("geometry.")})
        source.to(self.geometry.device if hasattr(self.geometry, "device") else "cpu")
        if hasattr(self.geometry, "seed_from"):
            self.geometry.seed_from(source, self.cfg.geometry_convert_inherit_texture)
        elif type(source) is type(self.geometry):
            self.geometry.load_state_dict(source.state_dict())
        else:
            raise UserError(
                f"config key 'system.geometry_type': '{self.cfg.geometry_type}' cannot be created from the previous "
                f"stage's '{previous['geometry_type']}'"
            )

    def configure_optimizers(self) -> Any:
        optimizer = super().configure_optimizers()
        if schedule_values(self.cfg.lr_scale) == [1.0]:
            return optimizer
        # The lambda reads the trial's step, not LambdaLR's own count: a resumed checkpoint saved
        # without this scheduler (or before lr_scale was set) stays on schedule.
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: C(self.cfg.lr_scale, self.true_global_step))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def forward(self, batch: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        return self.renderer(**batch)

    def mesh_terms(self, out: Dict[str, Any]) -> Dict[str, Any]:
        """The mesh regularisers as {name: (weight schedule, loss function)}, for a rendered mesh."""
        return {
            "normal_consistency": (self.cfg.lambda_normal_consistency, lambda: losses.normal_consistency(out["mesh"])),
            "laplacian_smoothness": (self.cfg.lambda_laplacian_smoothness, lambda: losses.laplacian_smoothness(out["mesh"])),
            "seed_fidelity": (self.cfg.lambda_seed_fidelity, lambda: self.geometry.seed_distance(out["mesh"].vertices).square().mean()),
            "albedo_smoothness": (self.cfg.lambda_albedo_smoothness, lambda: losses.albedo_smoothness(
                self.albedo, out["mesh"].vertices.detach(), self.cfg.albedo_smoothness_scale, self.cfg.albedo_smoothness_points)),
        }

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        """(N, 3) world points -> (N, 3) albedo of the material there (what the exporter bakes)."""
        return self.material.export(self.geometry.export(points)["features"])["albedo"]

    # ----------------------------------------------------------------------------- evaluation
    def _view_images(self, out: Dict[str, torch.Tensor], index: int, batch: Dict[str, Any]) -> List[Any]:
        images = []
        if "rgb" in batch:
            images.append(batch["rgb"][index])
        for key in _GRID_KEYS:
            if key in out and isinstance(out[key], torch.Tensor):
                image = out[key][index]
                images.append(image.expand(*image.shape[:-1], 3) if image.shape[-1] == 1 else image)
        return images

    def validation_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        out = self(batch)
        rows = [self._view_images(out, i, batch) for i in range(out["comp_rgb"].shape[0])]
        self.save_image_grid(f"it{self.true_global_step}-val-{batch_idx}.png", rows)

    def test_step(self, batch: Dict[str, Any], batch_idx: int) -> None:
        out = self(batch)
        for i in range(out["comp_rgb"].shape[0]):
            frame = torch.cat(self._view_images(out, i, {}), dim=1)
            self._test_frames.append(to_uint8(frame))

    def on_test_epoch_end(self) -> None:
        if self._test_frames:
            step = self.true_global_step
            self.test_outputs["first frame"] = self.save_image(f"it{step}-test-000.png", self._test_frames[0])
            self.test_outputs["turntable"] = self.save_video(f"it{step}-test.mp4", self._test_frames, fps=30)
        self._test_frames = []

    def export(self) -> Dict[str, Path]:
        exporter = threestudio_mv.find(self.cfg.exporter_type)(self.cfg.exporter, prefix="system.exporter")
        out_dir = self.save_dir / f"it{self.true_global_step}-export"
        with torch.no_grad():
            return exporter(self.geometry, self.material, out_dir)

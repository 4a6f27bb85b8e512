"""``nerf-volume-renderer``: volume rendering of an implicit geometry, CPU-first and CUDA-ready.

Two samplers produce the same kind of samples (flat, with the index of their ray):

- dense (CPU, and CUDA with ``sampler="dense"``): ``num_samples_per_ray`` stratified samples between
  the ray's entry and exit of the box [-r, r]^3; samples in cells that the occupancy grid marks empty
  (and on rays that miss the box) are skipped: the geometry is only evaluated at the others, which
  get zero density. Weights come from nerfacc's dense ``render_weight_from_density``.
- nerfacc (CUDA, ``sampler="auto"``): ``nerfacc.OccGridEstimator`` marches rays with a fixed step
  (2 * sqrt(3) * r / num_samples_per_ray) through the same occupancy grid; packed weights.

The occupancy grid is our own pure-PyTorch state on both devices, so checkpoints are the same: an EMA
of the maximum density * step per cell (resolution^3), refreshed every
``occupancy_update_every_n_steps`` training steps at a jittered point per cell; a cell is occupied
when its value exceeds min(occupancy_threshold, mean) (nerfacc's rule). Every cell counts as occupied
during the first ``occupancy_warmup_steps`` steps.

Geometry, material and background belong to the system; the renderer keeps plain references to them
(not sub-modules), so their parameters are saved and updated once.
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import threestudio_mv
from threestudio_mv.models.renderers.base import RenderedParts
from threestudio_mv.utils.base import BaseModule
from threestudio_mv.utils.camera import ray_box_intersection
from threestudio_mv.utils.errors import UserError

SAMPLERS = ("auto", "dense")
# In eval, samples with a smaller weight are not shaded (their colour and normal are not computed).
EVAL_MIN_WEIGHT = 1e-5


@threestudio_mv.register("nerf-volume-renderer")
class NeRFVolumeRenderer(BaseModule):
    """Renders (B, H, W) rays to colour, opacity, depth and (in eval) normals.

    Call ``renderer(rays_o, rays_d, light_positions, bg_color=None, **kwargs)``; extra keyword
    arguments go to the material (e.g. ``shading="albedo"``). Outputs are (B, H, W, C):
    ``comp_rgb`` = ``comp_rgb_fg`` + ``comp_rgb_bg`` * (1 - ``opacity``); ``depth`` = sum(w * t), the
    distance along the (unit) ray weighted by opacity (divide by opacity for the surface depth);
    ``z_variance`` = sum(w * (t - depth)^2). ``comp_normal`` (eval, or ``return_comp_normal``) is
    the weight-averaged unit normal mapped to [0, 1] as (n + 1) / 2, composited over white:
    (n + 1) / 2 * opacity + (1 - opacity). In training it also returns per-sample flat tensors for
    regularisers: ``weights`` (M, 1), ``points`` (M, 3), ``density`` (M, 1), ``t_dirs`` (M, 3),
    ``ray_indices`` (M,) into the flattened B*H*W rays, and ``normal`` (M, 3) when the geometry has
    a ``normal_type``. Eval renders ``eval_chunk_size`` rays at a time under ``torch.no_grad``.
    """

    @dataclass
    class Config:
        num_samples_per_ray: int = 64
        randomized: bool = True
        eval_chunk_size: int = 16384
        sampler: str = "auto"
        grid_prune: bool = True
        occupancy_grid_resolution: int = 32
        occupancy_update_every_n_steps: int = 16
        occupancy_threshold: float = 0.01
        occupancy_ema_decay: float = 0.95
        occupancy_warmup_steps: int = 256
        return_comp_normal: bool = False
        # training with a shading material: compute the shading normals without gradient, only at
        # samples that carry weight (> EVAL_MIN_WEIGHT, as eval does) and only when the material will
        # read them. Much cheaper (no second-order backward); the light then shades the albedo (which
        # comes out unlit) but no longer shapes the geometry
        detach_shading_normals: bool = False
        # nerfacc's sigma_fn pruning (threestudio's default in training): a gradient-free density pass
        # drops samples whose alpha is below ``prune_alpha_threshold`` (nerfacc's ``alpha_thre``) or
        # whose transmittance is below ``prune_early_stop_eps`` (``early_stop_eps``), so only samples
        # that show are evaluated with gradient. 0 and 0 turn it off (every grid-kept sample is rendered)
        prune_alpha_threshold: float = 0.0
        prune_early_stop_eps: float = 0.0

    cfg: Config

    def __init__(self, cfg: Optional[Any] = None, prefix: str = "system.renderer", **kwargs: Any) -> None:
        self.config_prefix = prefix  # plain attribute, allowed before nn.Module.__init__
        super().__init__(cfg, prefix, **kwargs)

    def configure(self, geometry: nn.Module = None, material: nn.Module = None, background: nn.Module = None,
                  **kwargs: Any) -> None:
        cfg = self.cfg
        if geometry is None or material is None or background is None:
            raise TypeError("nerf-volume-renderer needs geometry=, material= and background= modules")
        if cfg.sampler not in SAMPLERS:
            raise UserError(
                f"config key '{self.config_prefix}.sampler': unknown '{cfg.sampler}'; use one of {', '.join(SAMPLERS)}"
            )
        if not (0.0 <= cfg.prune_alpha_threshold < 1.0 and 0.0 <= cfg.prune_early_stop_eps < 1.0):
            raise UserError(
                f"{self.config_prefix}: prune_alpha_threshold and prune_early_stop_eps must be in [0, 1) "
                f"(got {cfg.prune_alpha_threshold} and {cfg.prune_early_stop_eps}); 0 turns each off"
            )
        if cfg.num_samples_per_ray < 1 or cfg.occupancy_grid_resolution < 1 or cfg.eval_chunk_size < 1:
            raise UserError(
                f"{self.config_prefix}: num_samples_per_ray, occupancy_grid_resolution and eval_chunk_size must be >= 1"
            )
        if getattr(material, "requires_normal", False) and self.normal_type(geometry) is None:
            geometry_key = getattr(geometry, "config_prefix", "system.geometry")
            raise UserError(
                f"the material {type(material).__name__} shades with normals: set {geometry_key}.normal_type "
                "to 'analytic' or 'finite_difference'"
            )
        self.parts = RenderedParts(geometry, material, background)
        self.radius = float(geometry.cfg.radius)
        # nerfacc's step for a ray across the box diagonal; also converts density to the grid's "alpha".
        self.render_step_size = 2.0 * math.sqrt(3.0) * self.radius / cfg.num_samples_per_ray
        res = cfg.occupancy_grid_resolution
        self.register_buffer("occupancy_density", torch.zeros(res, res, res))
        self.register_buffer("occupancy_mask", torch.ones(res, res, res, dtype=torch.bool))
        self._estimator: Optional[nn.Module] = None

    @staticmethod
    def normal_type(geometry: nn.Module) -> Optional[str]:
        return getattr(geometry.cfg, "normal_type", None)

    @property
    def geometry(self) -> nn.Module:
        return self.parts.geometry

    @property
    def material(self) -> nn.Module:
        return self.parts.material

    @property
    def background(self) -> nn.Module:
        return self.parts.background

    # ----------------------------------------------------------------------------- occupancy grid
    def on_update_step(self, epoch: int, global_step: int) -> None:
        if self.cfg.grid_prune and self.training and global_step % self.cfg.occupancy_update_every_n_steps == 0:
            self.update_occupancy_grid(global_step)

    @torch.no_grad()
    def update_occupancy_grid(self, global_step: int) -> None:
        """Refresh the grid from the geometry's density at one jittered point per cell."""
        res, radius = self.cfg.occupancy_grid_resolution, self.radius
        device = self.occupancy_density.device
        cells = torch.stack(
            torch.meshgrid(*[torch.arange(res, device=device)] * 3, indexing="ij"), dim=-1
        ).reshape(-1, 3)
        points = (cells + torch.rand(cells.shape, device=device)) / res * (2.0 * radius) - radius
        density = torch.cat(
            [self.geometry.forward_density(chunk) for chunk in points.split(self.cfg.eval_chunk_size * 4)]
        )
        occupancy = density.reshape(res, res, res) * self.render_step_size
        self.occupancy_density.copy_(torch.maximum(self.occupancy_density * self.cfg.occupancy_ema_decay, occupancy))
        threshold = min(self.cfg.occupancy_threshold, self.occupancy_density.mean().item())
        warming_up = global_step < self.cfg.occupancy_warmup_steps
        self.occupancy_mask.copy_((self.occupancy_density > threshold) | warming_up)

    def occupied(self, points: Tensor) -> Tensor:
        """Whether the grid cell of each world point (..., 3) is occupied: (...,) bool."""
        res = self.cfg.occupancy_grid_resolution
        cell = ((points + self.radius) / (2.0 * self.radius) * res).long().clamp(0, res - 1)
        flat = (cell[..., 0] * res + cell[..., 1]) * res + cell[..., 2]
        return self.occupancy_mask.reshape(-1)[flat]

    # ----------------------------------------------------------------------------- rendering
    def forward(
        self,
        rays_o: Tensor,
        rays_d: Tensor,
        light_positions: Tensor,
        bg_color: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Dict[str, Tensor]:
        batch, height, width = rays_o.shape[:3]
        rays_o_flat = rays_o.reshape(-1, 3)
        rays_d_flat = F.normalize(rays_d.reshape(-1, 3), dim=-1)
        lights = light_positions.reshape(batch, 1, 1, 3).expand(batch, height, width, 3).reshape(-1, 3)
        if self.training:
            out = self._render_rays(rays_o_flat, rays_d_flat, lights, **kwargs)
        else:
            chunk = self.cfg.eval_chunk_size
            with torch.no_grad():
                pieces = [
                    self._render_rays(rays_o_flat[i : i + chunk], rays_d_flat[i : i + chunk], lights[i : i + chunk],
                                      **kwargs)
                    for i in range(0, rays_o_flat.shape[0], chunk)
                ]
            out = {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0]}
        per_sample = {key: out.pop(key) for key in list(out) if key.startswith("sample_")}
        out = {key: value.reshape(batch, height, width, -1) for key, value in out.items()}

        if bg_color is None:
            comp_rgb_bg = self.background(dirs=rays_d)
        else:
            bg_color = bg_color.to(out["comp_rgb_fg"])
            if bg_color.dim() == 2:
                bg_color = bg_color[:, None, None, :]
            comp_rgb_bg = bg_color.expand(batch, height, width, 3)
        out["comp_rgb_bg"] = comp_rgb_bg
        out["comp_rgb"] = out["comp_rgb_fg"] + comp_rgb_bg * (1.0 - out["opacity"])
        out.update({key[len("sample_"):]: value for key, value in per_sample.items()})
        return out

    def _render_rays(self, rays_o: Tensor, rays_d: Tensor, lights: Tensor, **kwargs: Any) -> Dict[str, Tensor]:
        """Render flat rays: per-ray outputs (N, C) and, in training, per-sample ``sample_*`` outputs.

        Training evaluates the geometry once per kept sample (normals too when the geometry has a
        ``normal_type``). Eval first evaluates only the density, then features, normals and the
        material only at samples whose weight exceeds ``EVAL_MIN_WEIGHT`` (normals by finite
        differences when the geometry has no ``normal_type``).
        """
        if rays_o.is_cuda and self.cfg.sampler == "auto":
            ray_indices, t_starts, t_ends, t_positions = self._sample_nerfacc(rays_o, rays_d)
            weights_fn = self._packed_weights_fn(ray_indices, t_starts, t_ends, rays_o.shape[0])
            known_density = None
        else:
            ray_indices, t_starts, t_ends, t_positions, weights_fn, known_density = self._sample_dense(rays_o, rays_d)
        n_rays = rays_o.shape[0]
        geometry, normal_type = self.geometry, self.normal_type(self.geometry)
        points = rays_o[ray_indices] + rays_d[ray_indices] * t_positions[:, None]
        detached_normals = self.training and normal_type is not None and self.cfg.detach_shading_normals
        if self.training:
            want_normal = (normal_type is not None and not detached_normals) or self.cfg.return_comp_normal
            geo = geometry(points, output_normal=want_normal, normal_type=normal_type or "finite_difference")
            density = geo["density"]
        else:
            density = known_density[:, None] if known_density is not None else geometry.forward_density(points)
        weights = weights_fn(density[:, 0])[:, None]
        if detached_normals and self.material.shades_with_normals(**kwargs):
            with torch.no_grad():
                shaded = weights[:, 0] > EVAL_MIN_WEIGHT
                normal = torch.zeros_like(points)
                normal[shaded] = geometry(points[shaded], output_normal=True)["normal"]
            geo = {**geo, "normal": normal, "shading_normal": normal}
        depth = _accumulate(weights * t_positions[:, None], ray_indices, n_rays)
        out = {
            "opacity": _accumulate(weights, ray_indices, n_rays),
            "depth": depth,
            "z_variance": _accumulate(weights * (t_positions[:, None] - depth[ray_indices]) ** 2, ray_indices, n_rays),
        }
        if not self.training:
            shaded = weights[:, 0] > EVAL_MIN_WEIGHT
            ray_indices, points, weights = ray_indices[shaded], points[shaded], weights[shaded]
            geo = geometry(points, output_normal=True, normal_type=normal_type or "finite_difference")
        t_dirs = rays_d[ray_indices]
        rgb = self.material(
            features=geo["features"],
            viewdirs=t_dirs,
            positions=points,
            light_positions=lights[ray_indices],
            shading_normal=geo.get("shading_normal"),
            **kwargs,
        )
        out["comp_rgb_fg"] = _accumulate(weights * rgb, ray_indices, n_rays)
        if "normal" in geo and (not self.training or self.cfg.return_comp_normal):
            normal = F.normalize(_accumulate(weights * geo["normal"], ray_indices, n_rays), dim=-1)
            out["comp_normal"] = (normal + 1.0) * 0.5 * out["opacity"] + (1.0 - out["opacity"])
        if self.training:
            out.update(
                sample_weights=weights, sample_points=points, sample_density=density, sample_t_dirs=t_dirs,
                sample_ray_indices=ray_indices,
            )
            if "normal" in geo:
                out["sample_normal"] = geo["normal"]
        return out

    @property
    def prunes_by_density(self) -> bool:
        """Whether a gradient-free density pass drops samples (``prune_*`` above 0)."""
        return self.cfg.prune_alpha_threshold > 0.0 or self.cfg.prune_early_stop_eps > 0.0

    def _sample_dense(self, rays_o: Tensor, rays_d: Tensor):
        """Stratified samples between box entry and exit; keeps those in occupied cells (and, with
        density pruning, those that show).

        Returns the kept samples' ray indices, interval starts/ends and positions (M,), a function
        from their densities (M,) to their weights (M,) (the skipped samples have zero density), and
        their gradient-free densities (M,) when density pruning computed them (else None).
        """
        import nerfacc  # its dense functions run on CPU (pure PyTorch)

        n_samples = self.cfg.num_samples_per_ray
        near, far, hit = ray_box_intersection(rays_o, rays_d, -self.radius, self.radius)
        edges = torch.linspace(0.0, 1.0, n_samples + 1, device=rays_o.device)
        t_edges = near[:, None] + (far - near)[:, None] * edges  # (N, S + 1)
        t_starts, t_ends = t_edges[:, :-1], t_edges[:, 1:]
        if self.training and self.cfg.randomized:
            jitter = torch.rand_like(t_starts)
        else:
            jitter = torch.full_like(t_starts, 0.5)
        t_positions = t_starts + (t_ends - t_starts) * jitter
        keep = hit[:, None].expand_as(t_positions)
        if self.cfg.grid_prune:
            keep = keep & self.occupied(rays_o[:, None] + rays_d[:, None] * t_positions[..., None])
        ray_indices, sample_indices = keep.nonzero(as_tuple=True)
        known_density = None
        if self.prunes_by_density:
            with torch.no_grad():
                points = rays_o[ray_indices] + rays_d[ray_indices] * t_positions[keep][:, None]
                density = self.geometry.forward_density(points)[:, 0]
                sigmas = torch.zeros_like(t_starts).index_put((ray_indices, sample_indices), density)
                visible = nerfacc.volrend.render_visibility_from_density(
                    t_starts, t_ends, sigmas, early_stop_eps=self.cfg.prune_early_stop_eps,
                    alpha_thre=self.cfg.prune_alpha_threshold,
                )
            known_density = density[visible[ray_indices, sample_indices]]
            keep = keep & visible
            ray_indices, sample_indices = keep.nonzero(as_tuple=True)

        def weights_from_density(density: Tensor) -> Tensor:
            sigmas = torch.zeros_like(t_starts).index_put((ray_indices, sample_indices), density)
            weights = nerfacc.volrend.render_weight_from_density(t_starts, t_ends, sigmas)[0]
            return weights[ray_indices, sample_indices]

        return ray_indices, t_starts[keep], t_ends[keep], t_positions[keep], weights_from_density, known_density

    @staticmethod
    def _packed_weights_fn(ray_indices: Tensor, t_starts: Tensor, t_ends: Tensor, n_rays: int):
        """CUDA: densities of packed samples (M,) -> weights (M,) with nerfacc."""
        import nerfacc

        def weights_from_density(density: Tensor) -> Tensor:
            return nerfacc.volrend.render_weight_from_density(
                t_starts, t_ends, density, ray_indices=ray_indices, n_rays=n_rays
            )[0]

        return weights_from_density

    def occupancy_estimator(self) -> nn.Module:
        """nerfacc's ``OccGridEstimator`` holding our grid, on the grid's device (imported only here).

        Both of its states are filled: ``binaries`` (which cells are marched) and ``occs`` (the
        per-cell density * step that nerfacc's ``sampling`` averages: it prunes by density with
        min(alpha_thre, mean(occs)), so zero ``occs`` would silently turn density pruning off). Our
        grid uses nerfacc's cell order (x-major, ``indexing="ij"``). Without ``grid_prune`` every cell
        is occupied, with occupancy 1 (density pruning then uses ``prune_alpha_threshold`` as it is).
        """
        import nerfacc

        device = self.occupancy_mask.device
        if self._estimator is None or self._estimator.binaries.device != device:
            radius = self.radius
            estimator = nerfacc.OccGridEstimator(
                roi_aabb=[-radius, -radius, -radius, radius, radius, radius],
                resolution=self.cfg.occupancy_grid_resolution,
                levels=1,
            ).to(device)
            object.__setattr__(self, "_estimator", estimator)  # not a sub-module: our grid is the state
        if self.cfg.grid_prune:
            self._estimator.binaries = self.occupancy_mask[None]
            self._estimator.occs = self.occupancy_density.reshape(-1)
        else:
            self._estimator.binaries = torch.ones_like(self.occupancy_mask)[None]
            self._estimator.occs = torch.ones_like(self.occupancy_density).reshape(-1)
        return self._estimator

    def _sample_nerfacc(self, rays_o: Tensor, rays_d: Tensor):
        """CUDA: nerfacc's occupancy-grid ray marching over our grid."""
        estimator = self.occupancy_estimator()

        def sigma_fn(t_starts: Tensor, t_ends: Tensor, ray_indices: Tensor) -> Tensor:
            t_mid = (t_starts + t_ends)[:, None] * 0.5
            return self.geometry.forward_density(rays_o[ray_indices] + rays_d[ray_indices] * t_mid)[:, 0]

        ray_indices, t_starts, t_ends = estimator.sampling(
            rays_o, rays_d, sigma_fn=sigma_fn if self.prunes_by_density else None,
            render_step_size=self.render_step_size, alpha_thre=self.cfg.prune_alpha_threshold,
            stratified=self.training and self.cfg.randomized, cone_angle=0.0,
            early_stop_eps=self.cfg.prune_early_stop_eps,
        )
        return ray_indices.long(), t_starts, t_ends, (t_starts + t_ends) * 0.5


def _accumulate(values: Tensor, ray_indices: Tensor, n_rays: int) -> Tensor:
    """Sum per-sample values (M, C) into their rays: (n_rays, C)."""
    return torch.zeros(n_rays, values.shape[-1], dtype=values.dtype, device=values.device).index_add(
        0, ray_indices, values
    )

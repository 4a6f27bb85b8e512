"""``mesh-rasterizer``: renders a mesh geometry (``isosurface()`` with gradients) by rasterisation.

nvdiffrast's split (docs/stages.md): rasterise without gradient, interpolate positions and
normals with gradient, shade the covered pixels with the material, composite over the background and
antialias silhouette edges so vertex positions get silhouette gradients. The ops are the project's
pure-PyTorch ones (:mod:`threestudio_mv.utils.rasterize`), or nvdiffrast's when it imports and the
mesh is on CUDA (``backend: auto``). Outputs use the volume renderer's keys, so materials,
backgrounds, guidance and systems work unchanged; ``mesh`` is the rendered mesh, for regularisers.
"""
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import threestudio_mv
from threestudio_mv.models.renderers.base import RenderedParts
from threestudio_mv.utils import rasterize as raster
from threestudio_mv.utils.base import BaseModule
from threestudio_mv.utils.errors import UserError

BACKENDS = ("auto", "torch", "nvdiffrast")


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals (V, 3) of a mesh (differentiable)."""
    corners = vertices[faces]
    face_normals = torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0], dim=-1)
    normals = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), face_normals.repeat_interleave(3, dim=0))
    return F.normalize(normals, dim=-1)


class _NvdiffrastOps:
    """nvdiffrast's rasterize / interpolate / antialias behind the pure-PyTorch ops' interface
    (rows flipped: nvdiffrast's row 0 is the bottom of the image, ours the top)."""

    def __init__(self) -> None:
        import nvdiffrast.torch as dr

        self.dr = dr
        self.context = dr.RasterizeCudaContext()

    def rasterize(self, clip: Tensor, faces: Tensor, height: int, width: int) -> Any:
        self.clip, self.faces = clip.contiguous(), faces.int().contiguous()
        self.rast, _ = self.dr.rasterize(self.context, self.clip, self.faces, (height, width))
        face_id = (self.rast[..., 3].long() - 1).flip(1)
        return raster.Rasterization(face_id=face_id, pixels=raster.clip_to_pixels(clip, height, width), faces=faces)

    def interpolate(self, attributes: Tensor, rast: Any) -> Tensor:
        out, _ = self.dr.interpolate(attributes.contiguous(), self.rast, self.faces)
        return out.flip(1)

    def antialias(self, image: Tensor, rast: Any) -> Tensor:
        return self.dr.antialias(image.flip(1).contiguous(), self.rast, self.clip, self.faces).flip(1)


class _TorchOps:
    """The pure-PyTorch ops (:mod:`threestudio_mv.utils.rasterize`)."""

    def rasterize(self, clip: Tensor, faces: Tensor, height: int, width: int) -> raster.Rasterization:
        self.neighbours = raster.face_neighbours(faces)
        return raster.rasterize(clip, faces, height, width, cull_backfaces=True)  # meshes here are closed

    def interpolate(self, attributes: Tensor, rast: raster.Rasterization) -> Tensor:
        return raster.interpolate(attributes, rast)

    def antialias(self, image: Tensor, rast: raster.Rasterization) -> Tensor:
        return raster.antialias(image, rast, self.neighbours)


def nvdiffrast_available() -> bool:
    """Whether nvdiffrast imports (its CUDA context is made only when used)."""
    try:
        import nvdiffrast.torch  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@threestudio_mv.register("mesh-rasterizer")
class MeshRasterizer(BaseModule):
    """Renders ``geometry.isosurface()`` from the batch's ``mvp_mtx`` cameras.

    Call ``renderer(rays_o, rays_d, mvp_mtx, light_positions, bg_color=None, **kwargs)``; extra
    keyword arguments go to the material. Outputs (B, H, W, C): ``comp_rgb`` (antialiased over the
    background), ``comp_rgb_fg``, ``comp_rgb_bg``, ``opacity`` (antialiased coverage), ``depth``
    (distance from the camera, 0 off the mesh), ``comp_normal`` in eval (or with
    ``return_comp_normal``; (n + 1) / 2 over white) and ``mesh``.
    """

    @dataclass
    class Config:
        backend: str = "auto"  # "auto": nvdiffrast on CUDA when it imports, else "torch"
        return_comp_normal: bool = False
        # colours are read this far (world units) inside the surface along its normal, where a colour field
        # inherited from a volume was trained (as the exporter's color_offset; 0: on the surface)
        color_offset: float = 0.0

    cfg: Config

    def __init__(self, cfg: Optional[Any] = None, prefix: str = "system.renderer", **kwargs: Any) -> None:
        self.config_prefix = prefix  # plain attribute, allowed before nn.Module.__init__
        super().__init__(cfg, prefix, **kwargs)

    def configure(self, geometry: nn.Module = None, material: nn.Module = None, background: nn.Module = None,
                  **kwargs: Any) -> None:
        if geometry is None or material is None or background is None:
            raise TypeError("mesh-rasterizer needs geometry=, material= and background= modules")
        if self.cfg.backend not in BACKENDS:
            raise UserError(f"config key '{self.config_prefix}.backend': unknown '{self.cfg.backend}'; use one of {', '.join(BACKENDS)}")
        if self.cfg.backend == "nvdiffrast" and not nvdiffrast_available():
            raise UserError(f"config key '{self.config_prefix}.backend' is 'nvdiffrast' but nvdiffrast or CUDA is missing; use 'auto'")
        if not hasattr(geometry, "isosurface"):
            raise UserError(f"{self.config_prefix}: mesh-rasterizer needs a geometry with a mesh (e.g. tetrahedra-sdf-grid)")
        self.parts = RenderedParts(geometry, material, background)
        self._nvdiffrast: Optional[_NvdiffrastOps] = None

    def ops(self, device: torch.device) -> Any:
        """The rasterisation ops for tensors on ``device``."""
        if self.cfg.backend != "torch" and device.type == "cuda" and nvdiffrast_available():
            if self._nvdiffrast is None:
                self._nvdiffrast = _NvdiffrastOps()
            return self._nvdiffrast
        return _TorchOps()

    def forward(
        self,
        rays_o: Tensor,
        rays_d: Tensor,
        mvp_mtx: Tensor,
        light_positions: Tensor,
        bg_color: Optional[Tensor] = None,
        **kwargs: Any,
    ) -> Dict[str, Any]:
        geometry, material, background = self.parts.geometry, self.parts.material, self.parts.background
        batch, height, width = rays_o.shape[:3]
        with torch.set_grad_enabled(self.training and torch.is_grad_enabled()):
            mesh = geometry.isosurface()
            vertices, faces = mesh.vertices, mesh.faces
            ops = self.ops(vertices.device)
            clip = torch.cat([vertices, torch.ones_like(vertices[:, :1])], dim=-1) @ mvp_mtx.transpose(1, 2).to(vertices)
            rast = ops.rasterize(clip, faces, height, width)
            mask = rast.mask
            covered = rast.face_id >= 0
            positions = ops.interpolate(vertices, rast)
            normals = F.normalize(ops.interpolate(vertex_normals(vertices, faces), rast), dim=-1)
            camera = rays_o.reshape(batch, -1, 3)[:, :1].reshape(batch, 1, 1, 3)
            points = positions[covered]
            view_dirs = F.normalize(positions[covered] - camera.expand_as(positions)[covered], dim=-1)
            lights = light_positions.reshape(batch, 1, 1, 3).expand(batch, height, width, 3)[covered]
            if self.cfg.color_offset:
                points = points - self.cfg.color_offset * normals[covered]
            features = geometry(points)["features"]
            colour = material(features=features, viewdirs=view_dirs, positions=points, light_positions=lights,
                              shading_normal=normals[covered], **kwargs)
            rgb_fg = torch.zeros(batch, height, width, 3, dtype=colour.dtype, device=colour.device)
            rgb_fg = rgb_fg.index_put(torch.nonzero(covered, as_tuple=True), colour)
            if bg_color is None:
                comp_rgb_bg = background(dirs=rays_d)
            else:
                bg_color = bg_color.to(rgb_fg)
                comp_rgb_bg = (bg_color[:, None, None, :] if bg_color.dim() == 2 else bg_color).expand(batch, height, width, 3)
            comp_rgb = ops.antialias(rgb_fg * mask + comp_rgb_bg * (1.0 - mask), rast)
            opacity = ops.antialias(mask, rast)
            depth = (positions - camera).norm(dim=-1, keepdim=True) * mask
        out: Dict[str, Any] = {
            "comp_rgb": comp_rgb,
            "comp_rgb_fg": rgb_fg,
            "comp_rgb_bg": comp_rgb_bg,
            "opacity": opacity,
            "depth": depth,
            "mesh": mesh,
        }
        if not self.training or self.cfg.return_comp_normal:
            out["comp_normal"] = (normals + 1.0) * 0.5 * opacity + (1.0 - opacity)
        return out

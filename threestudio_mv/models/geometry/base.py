"""Base class of the implicit geometries: a field in the box [-radius, radius]^3 that can be meshed."""
from dataclasses import dataclass
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from threestudio_mv.models.geometry.isosurface import IsosurfaceMesh, IsosurfaceVolume, extract_isosurface, isosurface_volume
from threestudio_mv.utils.base import BaseModule


class BaseImplicitGeometry(BaseModule):
    """A geometry queried at world points; subclasses implement ``forward`` and ``forward_field``.

    ``isosurface()`` meshes ``forward_field`` with the ``isosurface_*`` settings of the config.
    """

    @dataclass
    class Config:
        radius: float = 1.0
        isosurface_resolution: int = 128
        isosurface_threshold: Union[float, int, str] = "auto"
        isosurface_remove_outliers: bool = True
        isosurface_outlier_n_faces_threshold: float = 0.01
        isosurface_chunk_size: int = 65536
        isosurface_fill_cavities: bool = True  # fill enclosed bubbles of the field before meshing
        isosurface_smooth_sigma: float = 1.5  # Gaussian smoothing of the field, in grid voxels (0: off)

    cfg: Any

    def __init__(self, cfg: Optional[Any] = None, prefix: str = "system.geometry", **kwargs: Any) -> None:
        # Set before nn.Module.__init__ (a plain attribute is allowed there) so configure() can name keys.
        self.config_prefix = prefix
        super().__init__(cfg, prefix, **kwargs)

    @property
    def device(self) -> torch.device:
        parameter = next(self.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def normalize_points(self, points: Tensor) -> Tensor:
        """World points in [-radius, radius]^3 -> [0, 1]^3 (not clamped)."""
        return (points + self.cfg.radius) / (2.0 * self.cfg.radius)

    def forward(self, points: Tensor, output_normal: bool = False) -> Dict[str, Tensor]:
        raise NotImplementedError

    def forward_field(self, points: Tensor) -> Tensor:
        """(N, 3) world points -> (N, 1) scalar field, larger inside the object."""
        raise NotImplementedError

    def _isosurface_arguments(self) -> Dict[str, Any]:
        cfg, radius = self.cfg, self.cfg.radius
        bbox_min = torch.full((3,), -radius, device=self.device)
        return dict(
            field_fn=self.forward_field,
            bbox_min=bbox_min,
            bbox_max=-bbox_min,
            resolution=cfg.isosurface_resolution,
            threshold=cfg.isosurface_threshold,
            chunk_size=cfg.isosurface_chunk_size,
            threshold_key=f"{self.config_prefix}.isosurface_threshold",
            fill_cavities=cfg.isosurface_fill_cavities,
            smooth_sigma=cfg.isosurface_smooth_sigma,
        )

    def isosurface(self) -> IsosurfaceMesh:
        """Mesh the field at ``isosurface_threshold`` (a number or "auto")."""
        return extract_isosurface(
            remove_outliers=self.cfg.isosurface_remove_outliers,
            outlier_fraction=self.cfg.isosurface_outlier_n_faces_threshold,
            **self._isosurface_arguments(),
        )

    def isosurface_grid(self) -> IsosurfaceVolume:
        """The cleaned field that :meth:`isosurface` meshes, on its tight grid (seeds a mesh geometry)."""
        return isosurface_volume(**self._isosurface_arguments())

"""Multiresolution hash grid (instant-ngp): tinycudann on CUDA when installed, pure PyTorch otherwise.

The parameters are one flat vector laid out as tinycudann lays out its grid (level after level, a
level holding ``min(next_multiple_of_8(resolution**D), 2**log2_hashmap_size)`` entries of
``n_features_per_level`` floats; levels that fit densely are indexed linearly, the others by the
``1, 2654435761, 805459861`` XOR hash). Both back ends therefore read the same parameters. The layout
follows tinycudann's ``grid.h``; without a GPU here, the equality of the two back ends is untested.

The PyTorch back end is our own because no maintained CPU package provides a hash grid. It treats all
levels at once (no per-level Python loop): corner indices of every level are computed in two
vectorised groups (dense levels, hashed levels), gathered from the flat table in one
``index_select`` (level-major, so that each level's table stays in cache) and blended with
(multi)linear weights.
"""
import logging
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import Tensor, nn

from threestudio_mv.models.encodings.base import Encoding
from threestudio_mv.utils.errors import UserError

logger = logging.getLogger(__name__)

# tinycudann's hashing primes, one per input dimension.
_HASH_PRIMES = (1, 2654435761, 805459861, 3674653429, 2097192037, 1434869437, 2165219737)
_TCNN_STATE: Dict[str, Any] = {"module": None, "checked": False}


def _import_tinycudann() -> Optional[Any]:
    """tinycudann if importable, else None; logs the fallback once per process."""
    if not _TCNN_STATE["checked"]:
        _TCNN_STATE["checked"] = True
        try:
            import tinycudann  # noqa: F401  (CUDA-only extension: imported lazily, never at module import)

            _TCNN_STATE["module"] = tinycudann
        except (ImportError, OSError, RuntimeError) as error:
            logger.info("tinycudann unavailable (%s): hash grids use the pure-PyTorch back end", error)
    return _TCNN_STATE["module"]


@dataclass
class GridLayout:
    """Per-level geometry of a hash grid, as tinycudann computes it (float32 arithmetic)."""

    scales: List[float]
    resolutions: List[int]
    sizes: List[int]
    offsets: List[int]
    n_dense_levels: int


def grid_layout(
    n_levels: int, n_input_dims: int, log2_hashmap_size: int, base_resolution: int, per_level_scale: float
) -> GridLayout:
    """Scales, resolutions, table sizes and offsets of every level (dense levels come first)."""
    log2_scale = np.float32(math.log2(per_level_scale))
    scales, resolutions, sizes, offsets = [], [], [], [0]
    for level in range(n_levels):
        scale = float(np.exp2(np.float32(level) * log2_scale) * np.float32(base_resolution) - np.float32(1.0))
        resolution = int(math.ceil(scale)) + 1
        dense_size = int(math.ceil(resolution**n_input_dims / 8) * 8)
        size = min(dense_size, 2**log2_hashmap_size)
        scales.append(scale)
        resolutions.append(resolution)
        sizes.append(size)
        offsets.append(offsets[-1] + size)
    hashed = [resolution**n_input_dims > size for resolution, size in zip(resolutions, sizes)]
    n_dense = hashed.index(True) if any(hashed) else n_levels
    return GridLayout(scales, resolutions, sizes, offsets, n_dense)


def _outer(terms: List[Tensor], combine) -> Tensor:
    """Combine D tensors (..., 2) into (..., 2**D): entry b = combine over d of terms[d][..., bit_d(b)]."""
    n_dims = len(terms)
    result = None
    for dim, term in enumerate(terms):
        shape = term.shape[:-1] + (1,) * dim + (2,) + (1,) * (n_dims - dim - 1)
        term = term.reshape(shape)
        result = term if result is None else combine(result, term)
    return result.reshape(*terms[0].shape[:-1], 2**n_dims)


class HashGrid(Encoding):
    """instant-ngp hash grid; output (N, n_levels * n_features_per_level), level-major."""

    @dataclass
    class Config:
        otype: str = "HashGrid"
        n_levels: int = 16
        n_features_per_level: int = 2
        log2_hashmap_size: int = 19
        base_resolution: int = 16
        per_level_scale: float = 1.447269237440378

    cfg: Config

    def configure(self, n_input_dims: int = 3, **kwargs: Any) -> None:
        super().configure(n_input_dims)
        cfg, key = self.cfg, self.config_prefix
        if not 2 <= n_input_dims <= len(_HASH_PRIMES):
            raise UserError(f"{key}: HashGrid encodes 2 to {len(_HASH_PRIMES)} input dims, got {n_input_dims}")
        if cfg.n_features_per_level not in (1, 2, 4, 8):
            raise UserError(
                f"config key '{key}.n_features_per_level' must be 1, 2, 4 or 8, got {cfg.n_features_per_level}"
            )
        if not 1 <= cfg.log2_hashmap_size <= 30 or cfg.n_levels < 1 or cfg.base_resolution < 1:
            raise UserError(f"{key}: HashGrid needs n_levels >= 1, base_resolution >= 1, 1 <= log2_hashmap_size <= 30")
        layout = grid_layout(
            cfg.n_levels, n_input_dims, cfg.log2_hashmap_size, cfg.base_resolution, cfg.per_level_scale
        )
        self.layout = layout
        self.n_output_dims = cfg.n_levels * cfg.n_features_per_level
        # instant-ngp's initialisation: uniform in [-1e-4, 1e-4].
        self.params = nn.Parameter(torch.empty(layout.offsets[-1] * cfg.n_features_per_level).uniform_(-1e-4, 1e-4))
        self.register_buffer("level_scales", torch.tensor(layout.scales, dtype=torch.float32), persistent=False)
        self.register_buffer("level_sizes", torch.tensor(layout.sizes, dtype=torch.long), persistent=False)
        self.register_buffer("level_offsets", torch.tensor(layout.offsets[:-1], dtype=torch.long), persistent=False)
        strides = [[r**d for d in range(n_input_dims)] for r in layout.resolutions]
        self.register_buffer("level_strides", torch.tensor(strides, dtype=torch.long), persistent=False)
        self.use_tcnn = _import_tinycudann() is not None
        self._tcnn_encoding: Optional[nn.Module] = None

    def tcnn_config(self) -> Dict[str, Any]:
        """The equivalent tinycudann encoding config."""
        cfg = self.cfg
        return {
            "otype": "HashGrid",
            "n_levels": cfg.n_levels,
            "n_features_per_level": cfg.n_features_per_level,
            "log2_hashmap_size": cfg.log2_hashmap_size,
            "base_resolution": cfg.base_resolution,
            "per_level_scale": cfg.per_level_scale,
        }

    def tcnn_kwargs(self) -> Dict[str, Any]:
        """Arguments of ``tinycudann.Encoding``. In float32: tinycudann's default is half precision, whose
        rounding of the features (and of their gradients, with the learning rate of 0.01 hash grids use)
        the PyTorch back end does not have."""
        return {"n_input_dims": self.n_input_dims, "encoding_config": self.tcnn_config(), "dtype": torch.float32}

    def forward(self, x: Tensor) -> Tensor:
        """(N, n_input_dims) in [0, 1] -> (N, n_output_dims)."""
        if x.is_cuda and self.use_tcnn:
            encoded = self._forward_tcnn(x)
            if encoded is not None:
                return encoded
        return self._forward_torch(x)

    def _forward_torch(self, x: Tensor) -> Tensor:
        # Level-major layout (L, N, ...): the gather and its backward scatter then walk one level's table
        # at a time, which stays in cache (about 2x faster than point-major on CPU).
        n_points, n_levels, n_feats = x.shape[0], self.cfg.n_levels, self.cfg.n_features_per_level
        n_dense, n_corners = self.layout.n_dense_levels, 2**self.n_input_dims
        position = self.level_scales[:, None, None] * x.float()[None] + 0.5  # (L, N, D)
        cell = torch.floor(position)
        frac = position - cell
        cell = cell.long()
        corners = [torch.stack([c, c + 1], dim=-1) for c in cell.unbind(-1)]  # D x (L, N, 2)
        index = torch.empty(n_levels, n_points, n_corners, dtype=torch.long, device=x.device)
        offsets = self.level_offsets[:, None, None]
        if n_dense > 0:  # linear indices into dense levels (in place: these are the largest tensors here)
            strides = self.level_strides[:n_dense]
            terms = [c[:n_dense] * strides[:, d, None, None] for d, c in enumerate(corners)]
            dense = _outer(terms, torch.add).remainder_(self.level_sizes[:n_dense, None, None])
            torch.add(dense, offsets[:n_dense], out=index[:n_dense])
        if n_dense < n_levels:  # spatial hash of the other levels
            terms = [c[n_dense:] * _HASH_PRIMES[d] for d, c in enumerate(corners)]
            hashed = _outer(terms, torch.bitwise_xor).bitwise_and_(2**self.cfg.log2_hashmap_size - 1)
            torch.add(hashed, offsets[n_dense:], out=index[n_dense:])
        weights = _outer([torch.stack([1 - f, f], dim=-1) for f in frac.unbind(-1)], torch.mul)  # (L, N, 2^D)
        table = self.params.view(-1, n_feats)
        features = table.index_select(0, index.reshape(-1)).view(n_levels * n_points, n_corners, n_feats)
        encoded = torch.bmm(weights.reshape(n_levels * n_points, 1, n_corners), features)
        return encoded.view(n_levels, n_points, n_feats).permute(1, 0, 2).reshape(n_points, n_levels * n_feats)

    def _forward_tcnn(self, x: Tensor) -> Optional[Tensor]:
        encoding = self._tcnn_encoding
        if encoding is None or encoding.params.device != x.device:
            tcnn = _import_tinycudann()
            with torch.cuda.device(x.device):
                encoding = tcnn.Encoding(**self.tcnn_kwargs())
            if encoding.params.numel() != self.params.numel():
                logger.warning(
                    "tinycudann hash grid has %d parameters, the PyTorch layout %d: using PyTorch",
                    encoding.params.numel(),
                    self.params.numel(),
                )
                self.use_tcnn = False
                return None
            # Kept outside the module tree: the parameters belong to this module, shared with tcnn below.
            object.__setattr__(self, "_tcnn_encoding", encoding)
        encoding.params = self.params
        return encoding(x.contiguous()).float()


class ProgressiveBandHashGrid(HashGrid):
    """Hash grid whose finer levels are unmasked over training (coarse-to-fine).

    ``start_level`` levels are active at ``start_step``; one more every ``update_steps`` steps.
    """

    @dataclass
    class Config(HashGrid.Config):
        otype: str = "ProgressiveBandHashGrid"
        start_level: int = 8
        start_step: int = 0
        update_steps: int = 500

    cfg: Config

    def configure(self, n_input_dims: int = 3, **kwargs: Any) -> None:
        super().configure(n_input_dims)
        if self.cfg.update_steps < 1:
            raise UserError(f"config key '{self.config_prefix}.update_steps' must be >= 1, got {self.cfg.update_steps}")
        self.register_buffer("level_mask", torch.zeros(self.n_output_dims), persistent=False)
        self.set_active_levels(self.cfg.start_level)

    def set_active_levels(self, n_active: int) -> None:
        """Unmask the first ``n_active`` levels."""
        self.n_active_levels = max(0, min(n_active, self.cfg.n_levels))
        self.level_mask.zero_()
        self.level_mask[: self.n_active_levels * self.cfg.n_features_per_level] = 1.0

    def on_update_step(self, epoch: int, global_step: int) -> None:
        cfg = self.cfg
        self.set_active_levels(cfg.start_level + max(global_step - cfg.start_step, 0) // cfg.update_steps)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x) * self.level_mask

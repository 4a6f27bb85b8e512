"""Input encodings and the small MLP heads built on them.

``get_encoding(n_input_dims, config)`` builds an encoding from a tinycudann-style dict whose ``otype``
is one of HashGrid, ProgressiveBandHashGrid, Triplane, DenseGrid, Frequency, SphericalHarmonics
(default HashGrid); inputs are in [0, 1]^n_input_dims and the module exposes ``n_output_dims``.
``get_mlp(n_input_dims, n_output_dims, config)`` builds a head (see :mod:`.mlp`).
"""
from typing import Any, Dict, Optional

from threestudio_mv.models.encodings.base import Encoding
from threestudio_mv.models.encodings.frequency import Frequency, SphericalHarmonics
from threestudio_mv.models.encodings.grids import DenseGrid, Triplane
from threestudio_mv.models.encodings.hash_grid import HashGrid, ProgressiveBandHashGrid
from threestudio_mv.models.encodings.mlp import VanillaMLP, get_mlp
from threestudio_mv.utils.config import to_container
from threestudio_mv.utils.errors import UserError

ENCODINGS: Dict[str, type] = {
    cls.Config.otype: cls
    for cls in (HashGrid, ProgressiveBandHashGrid, Triplane, DenseGrid, Frequency, SphericalHarmonics)
}


def get_encoding(n_input_dims: int, config: Optional[Any] = None, prefix: str = "") -> Encoding:
    """Build the encoding named by ``config["otype"]`` (HashGrid when absent) for ``n_input_dims`` inputs."""
    config = dict(to_container(config) or {})
    otype = config.setdefault("otype", "HashGrid")
    if otype not in ENCODINGS:
        raise UserError(f"config key '{prefix}.otype': unknown encoding '{otype}'; use one of {', '.join(ENCODINGS)}")
    return ENCODINGS[otype](config, prefix, n_input_dims=n_input_dims)


__all__ = [
    "ENCODINGS",
    "DenseGrid",
    "Encoding",
    "Frequency",
    "HashGrid",
    "ProgressiveBandHashGrid",
    "SphericalHarmonics",
    "Triplane",
    "VanillaMLP",
    "get_encoding",
    "get_mlp",
]

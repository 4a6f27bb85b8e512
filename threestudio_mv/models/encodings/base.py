"""Common base of the input encodings: a configured module with ``n_input_dims`` and ``n_output_dims``."""
from dataclasses import dataclass
from typing import Any, Optional

from threestudio_mv.utils.base import BaseModule


class Encoding(BaseModule):
    """Maps (N, n_input_dims) inputs in [0, 1] to (N, n_output_dims) features.

    Built as ``Cls(config_dict, prefix, n_input_dims=3)``; ``config_dict`` keeps tinycudann's key names
    (``otype`` plus the encoding's own keys) so configs written for threestudio read the same.
    """

    @dataclass
    class Config:
        otype: str = ""

    n_input_dims: int
    n_output_dims: int

    def __init__(self, cfg: Optional[Any] = None, prefix: str = "", **kwargs: Any) -> None:
        self.config_prefix = prefix or "encoding"  # plain attribute, allowed before nn.Module.__init__
        super().__init__(cfg, prefix, **kwargs)

    def configure(self, n_input_dims: int = 3, **kwargs: Any) -> None:
        self.n_input_dims = n_input_dims

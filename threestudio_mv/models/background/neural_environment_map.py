"""``neural-environment-map``: a small MLP of the ray direction (an environment at infinity)."""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import threestudio_mv
from threestudio_mv.models.background.base import BaseBackground
from threestudio_mv.models.encodings import get_encoding, get_mlp
from threestudio_mv.models.materials.base import color_activation
from threestudio_mv.utils.errors import UserError


@threestudio_mv.register("neural-environment-map")
class NeuralEnvironmentMapBackground(BaseBackground):
    """colour = activation(MLP(encoding((d + 1) / 2))) for unit ray directions d.

    In training with ``random_aug``, with probability ``random_aug_prob`` the whole batch gets one
    random solid colour instead (so the object cannot hide in the background; one colour for all
    views keeps a multi-view group consistent). In eval, ``eval_color`` (if set) replaces the map.
    """

    @dataclass
    class Config:
        n_output_dims: int = 3
        color_activation: str = "sigmoid"
        dir_encoding_config: Dict[str, Any] = field(
            default_factory=lambda: {"otype": "SphericalHarmonics", "degree": 3}
        )
        mlp_network_config: Dict[str, Any] = field(
            default_factory=lambda: {"otype": "VanillaMLP", "n_neurons": 16, "n_hidden_layers": 2}
        )
        random_aug: bool = False
        random_aug_prob: float = 0.5
        eval_color: Optional[List[float]] = None

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        prefix = self.config_prefix
        if self.cfg.eval_color is not None and len(self.cfg.eval_color) != self.cfg.n_output_dims:
            raise UserError(f"config key '{prefix}.eval_color' needs {self.cfg.n_output_dims} numbers")
        self.encoding = get_encoding(3, self.cfg.dir_encoding_config, f"{prefix}.dir_encoding_config")
        self.network = get_mlp(
            self.encoding.n_output_dims, self.cfg.n_output_dims, self.cfg.mlp_network_config,
            f"{prefix}.mlp_network_config",
        )
        self.activation = color_activation(self.cfg.color_activation, f"{prefix}.color_activation")

    def forward(self, dirs: Tensor) -> Tensor:
        n_out = self.cfg.n_output_dims
        if not self.training and self.cfg.eval_color is not None:
            color = torch.tensor(self.cfg.eval_color, dtype=dirs.dtype, device=dirs.device)
            return color.expand(*dirs.shape[:-1], n_out)
        unit = F.normalize(dirs.reshape(-1, 3), dim=-1)
        color = self.activation(self.network(self.encoding((unit + 1.0) * 0.5))).reshape(*dirs.shape[:-1], n_out)
        if self.training and self.cfg.random_aug and torch.rand(()).item() < self.cfg.random_aug_prob:
            # "color * 0 +" keeps the MLP in the graph, so DDP does not report unused parameters.
            color = color * 0.0 + torch.rand(n_out, dtype=dirs.dtype, device=dirs.device)
        return color

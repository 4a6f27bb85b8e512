"""Small fully connected networks (the heads on top of the encodings).

Plain PyTorch: at 64 neurons x 1-2 layers tinycudann's fused MLP would save little, and keeping the
heads in PyTorch keeps them identical on CPU and CUDA (and in float32, as threestudio does).
"""
from dataclasses import dataclass
from typing import Any, Optional

from torch import Tensor, nn

from threestudio_mv.utils.config import parse_structured
from threestudio_mv.utils.errors import UserError

_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "softplus": nn.Softplus, "none": nn.Identity}
_MLP_TYPES = ("VanillaMLP", "FullyFusedMLP")


@dataclass
class MLPConfig:
    """Keys follow tinycudann's network configs; ``FullyFusedMLP`` is accepted as a synonym."""

    otype: str = "VanillaMLP"
    n_neurons: int = 64
    n_hidden_layers: int = 1
    activation: str = "ReLU"
    output_activation: str = "none"


def _activation(name: str, key: str) -> nn.Module:
    if name.lower() not in _ACTIVATIONS:
        raise UserError(f"config key '{key}': unknown activation '{name}'; use one of ReLU, Sigmoid, Softplus, none")
    return _ACTIVATIONS[name.lower()]()


class VanillaMLP(nn.Module):
    """Linear layers without biases (as tinycudann's MLPs), ``n_hidden_layers`` hidden layers."""

    def __init__(self, n_input_dims: int, n_output_dims: int, cfg: MLPConfig, prefix: str = "") -> None:
        super().__init__()
        widths = [n_input_dims] + [cfg.n_neurons] * cfg.n_hidden_layers + [n_output_dims]
        layers = []
        for index, (width_in, width_out) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(width_in, width_out, bias=False))
            last = index == len(widths) - 2
            layers.append(
                _activation(cfg.output_activation if last else cfg.activation, f"{prefix}.output_activation"
                            if last else f"{prefix}.activation")
            )
        self.layers = nn.Sequential(*layers)
        self.n_input_dims, self.n_output_dims = n_input_dims, n_output_dims

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x.float())


def get_mlp(n_input_dims: int, n_output_dims: int, config: Optional[Any] = None, prefix: str = "") -> VanillaMLP:
    """Build an MLP from a tinycudann-style network config dict (see :class:`MLPConfig`)."""
    cfg = parse_structured(MLPConfig, config, prefix)
    if cfg.otype not in _MLP_TYPES:
        raise UserError(
            f"config key '{prefix}.otype': unknown network '{cfg.otype}'; use one of {', '.join(_MLP_TYPES)}"
        )
    if cfg.n_hidden_layers < 0 or cfg.n_neurons < 1:
        raise UserError(f"config key '{prefix}': need n_hidden_layers >= 0 and n_neurons >= 1")
    return VanillaMLP(n_input_dims, n_output_dims, cfg, prefix)

"""``implicit-volume``: a density + feature field (encoding + two small MLPs) inside [-r, r]^3."""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

import threestudio_mv
from threestudio_mv.models.encodings import get_encoding, get_mlp
from threestudio_mv.models.geometry.base import BaseImplicitGeometry
from threestudio_mv.utils.config import C, Schedule, schedule
from threestudio_mv.utils.errors import UserError

NORMAL_TYPES = ("finite_difference", "analytic")
DENSITY_ACTIVATIONS = ("softplus", "exp", "trunc_exp")
BLOB_BIASES = ("blob_magic3d", "blob_dreamfusion")


class _TruncExp(torch.autograd.Function):
    """exp(x) whose backward clamps x at 15 (instant-ngp's trick against exploding density gradients).

    Always in float32, also under autocast (16-mixed): exp of a density logit overflows half precision
    (above 11) and loses bf16's precision, and the forward's input is cast to float32 as threestudio does.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        x = x.float()
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        return grad * torch.exp(x.clamp(max=15.0))


def trunc_exp(x: Tensor) -> Tensor:
    """exp with a gradient clamped at x = 15."""
    return _TruncExp.apply(x)


@threestudio_mv.register("implicit-volume")
class ImplicitVolume(BaseImplicitGeometry):
    """Density and features from an encoding of the normalised position and two MLP heads.

    density = activation(mlp_density(enc(x)) + bias(x)), where the bias is
    ``blob_magic3d``: scale * (1 - |x| / std), ``blob_dreamfusion``: scale * exp(-|x|^2 / (2 std^2)),
    or a constant. ``density_blob_scale`` and ``density_blob_std`` are C() schedules and the current
    values are the ones used (threestudio annealed std but read the config value). Features are raw
    (the material applies its activation).

    Normals (``normal_type``) are the normalised negative gradient of the pre-activation density (the
    activation is monotonic, so the direction is the same, and it stays well conditioned where the
    softplus saturates): "finite_difference" uses forward differences (3 extra density evaluations,
    step ``finite_difference_normal_eps`` in world units, as threestudio), "analytic" uses autograd (differentiable
    in training, so normal-based losses train the field).
    """

    @dataclass
    class Config(BaseImplicitGeometry.Config):
        n_feature_dims: int = 3
        pos_encoding_config: Dict[str, Any] = field(default_factory=lambda: {"otype": "HashGrid"})
        mlp_network_config: Dict[str, Any] = field(
            default_factory=lambda: {"otype": "VanillaMLP", "n_neurons": 64, "n_hidden_layers": 1}
        )
        density_activation: str = "softplus"
        density_bias: Union[float, int, str] = "blob_magic3d"
        density_blob_scale: Schedule = schedule(10.0)
        density_blob_std: Schedule = schedule(0.5)
        normal_type: Optional[str] = None
        finite_difference_normal_eps: float = 0.01

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        cfg, prefix = self.cfg, self.config_prefix
        if cfg.density_activation not in DENSITY_ACTIVATIONS:
            raise UserError(
                f"config key '{prefix}.density_activation': unknown '{cfg.density_activation}'; "
                f"use one of {', '.join(DENSITY_ACTIVATIONS)}"
            )
        if isinstance(cfg.density_bias, str) and cfg.density_bias not in BLOB_BIASES:
            raise UserError(
                f"config key '{prefix}.density_bias': unknown '{cfg.density_bias}'; "
                f"use a number or one of {', '.join(BLOB_BIASES)}"
            )
        if cfg.normal_type is not None and cfg.normal_type not in NORMAL_TYPES:
            raise UserError(
                f"config key '{prefix}.normal_type': unknown '{cfg.normal_type}'; "
                f"use null or one of {', '.join(NORMAL_TYPES)}"
            )
        self.encoding = get_encoding(3, cfg.pos_encoding_config, f"{prefix}.pos_encoding_config")
        n_encoded, mlp_key = self.encoding.n_output_dims, f"{prefix}.mlp_network_config"
        self.density_network = get_mlp(n_encoded, 1, cfg.mlp_network_config, mlp_key)
        self.feature_network = get_mlp(n_encoded, cfg.n_feature_dims, cfg.mlp_network_config, mlp_key)
        self.density_blob_scale = C(cfg.density_blob_scale, 0)
        self.density_blob_std = C(cfg.density_blob_std, 0)

    def on_update_step(self, epoch: int, global_step: int) -> None:
        self.density_blob_scale = C(self.cfg.density_blob_scale, global_step)
        self.density_blob_std = C(self.cfg.density_blob_std, global_step)

    def density_bias(self, points: Tensor) -> Tensor:
        """The pre-activation density bias at world points: (N, 1)."""
        bias = self.cfg.density_bias
        if not isinstance(bias, str):
            return torch.full_like(points[:, :1], float(bias))
        radius = points.norm(dim=-1, keepdim=True)
        if bias == "blob_magic3d":
            return self.density_blob_scale * (1.0 - radius / self.density_blob_std)
        return self.density_blob_scale * torch.exp(-0.5 * (radius / self.density_blob_std) ** 2)

    def activate_density(self, raw: Tensor) -> Tensor:
        """Pre-activation density -> density >= 0."""
        if self.cfg.density_activation == "softplus":
            return F.softplus(raw)
        if self.cfg.density_activation == "exp":
            return torch.exp(raw)
        return trunc_exp(raw)

    def _raw_density(self, points: Tensor, with_features: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
        encoded = self.encoding(self.normalize_points(points))
        raw_density = self.density_network(encoded) + self.density_bias(points)
        features = self.feature_network(encoded) if with_features else None
        return raw_density, features

    def forward(
        self, points: Tensor, output_normal: bool = False, normal_type: Optional[str] = None
    ) -> Dict[str, Tensor]:
        """World points (N, 3) -> density (N, 1), raw features (N, n_feature_dims) and, when
        ``output_normal`` and a normal type is set, unit ``normal`` and ``shading_normal`` (N, 3).

        ``normal_type`` overrides the config's for this call (the renderer uses finite differences to
        show normals of a geometry configured without them).
        """
        normal_type = (normal_type or self.cfg.normal_type) if output_normal else None
        if normal_type == "analytic":
            grad_enabled = torch.is_grad_enabled()
            with torch.enable_grad():
                points_ = points if points.requires_grad else points.detach().requires_grad_(True)
                raw_density, features = self._raw_density(points_)
                gradient = torch.autograd.grad(
                    raw_density.sum(), points_, create_graph=grad_enabled, retain_graph=grad_enabled
                )[0]
            if not grad_enabled:
                raw_density, features, gradient = raw_density.detach(), features.detach(), gradient.detach()
            normal = -gradient
        else:
            raw_density, features = self._raw_density(points)
            normal = None
            if normal_type == "finite_difference":
                normal = -self.finite_difference_gradient(points, raw_density)
        output = {"density": self.activate_density(raw_density), "features": features}
        if normal is not None:
            normal = F.normalize(normal, dim=-1)
            output["normal"] = normal
            output["shading_normal"] = normal
        return output

    def finite_difference_gradient(self, points: Tensor, raw_density: Tensor) -> Tensor:
        """Forward-difference gradient (N, 3) of the pre-activation density; ``raw_density`` (N, 1) is its value
        at ``points``."""
        eps = self.cfg.finite_difference_normal_eps
        offsets = torch.eye(3, device=points.device, dtype=points.dtype) * eps  # (3, 3)
        shifted, _ = self._raw_density((points[None] + offsets[:, None]).reshape(-1, 3), with_features=False)
        return (shifted.reshape(3, -1).T - raw_density) / eps

    def forward_density(self, points: Tensor) -> Tensor:
        """World points (N, 3) -> activated density (N, 1)."""
        raw_density, _ = self._raw_density(points, with_features=False)
        return self.activate_density(raw_density)

    def forward_field(self, points: Tensor) -> Tensor:
        """The field meshed by ``isosurface()``: the activated density (N, 1)."""
        return self.forward_density(points)

    def export(self, points: Tensor, **kwargs: Any) -> Dict[str, Tensor]:
        """Raw features at (surface) points, for texture baking: {"features": (N, n_feature_dims)}."""
        _, features = self._raw_density(points)
        return {"features": features}

import contextlib
import math

import numpy as np
import pytest
import torch

from threestudio_mv.models.encodings import HashGrid, get_encoding, get_mlp
from threestudio_mv.utils.errors import UserError

# Small tables so that some levels are dense and some hashed: resolutions 5, 10, 20, 40, 80, 2^10 entries.
SMALL_HASH = {"otype": "HashGrid", "n_levels": 5, "n_features_per_level": 2, "log2_hashmap_size": 10,
              "base_resolution": 5, "per_level_scale": 2.0}

ENCODING_CONFIGS = [
    SMALL_HASH,
    {**SMALL_HASH, "otype": "ProgressiveBandHashGrid", "start_level": 5},
    {"otype": "Triplane", "resolution": 16, "n_features": 4},
    {"otype": "Triplane", "resolution": 16, "n_features": 4, "reduction": "sum"},
    {"otype": "DenseGrid", "resolution": 8, "n_features": 4},
    {"otype": "Frequency", "n_frequencies": 4, "include_input": True},
    {"otype": "SphericalHarmonics", "degree": 4},
]
EXPECTED_DIMS = [10, 10, 12, 4, 4, 27, 16]


@pytest.mark.parametrize("config,expected_dims", zip(ENCODING_CONFIGS, EXPECTED_DIMS), ids=lambda c: str(c))
def test_encoding_shapes_and_gradients(config, expected_dims):
    encoding = get_encoding(3, config)
    x = torch.rand(257, 3, requires_grad=True)
    y = encoding(x)
    assert encoding.n_output_dims == expected_dims
    assert y.shape == (257, expected_dims)
    assert torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, parameter in encoding.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    assert encoding(torch.rand(0, 3)).shape == (0, expected_dims)


def _reference_hash_grid(x: torch.Tensor, params: torch.Tensor, cfg: dict) -> torch.Tensor:
    """A per-level, per-corner loop with tinycudann's rules and uint32 arithmetic in numpy."""
    n_feats, log2_size = cfg["n_features_per_level"], cfg["log2_hashmap_size"]
    primes = np.array([1, 2654435761, 805459861], dtype=np.uint32)
    table = params.view(-1, n_feats)
    outputs, offset = [], 0
    for level in range(cfg["n_levels"]):
        scale = float(np.exp2(np.float32(level) * np.float32(math.log2(cfg["per_level_scale"])))
                      * np.float32(cfg["base_resolution"]) - np.float32(1.0))
        resolution = math.ceil(scale) + 1
        size = min(-(-resolution**3 // 8) * 8, 2**log2_size)
        position = x * scale + 0.5
        cell = torch.floor(position)
        frac = position - cell
        cell_np = cell.long().numpy().astype(np.uint32)
        level_out = torch.zeros(x.shape[0], n_feats)
        for corner in range(8):
            bits = [(corner >> d) & 1 for d in range(3)]
            coords = cell_np + np.array(bits, dtype=np.uint32)
            if resolution**3 <= size:
                index = (coords[:, 0] + coords[:, 1] * resolution + coords[:, 2] * resolution**2) % size
            else:
                hashed = coords[:, 0] * primes[0] ^ coords[:, 1] * primes[1] ^ coords[:, 2] * primes[2]
                index = hashed % np.uint32(size)
            weight = torch.ones(x.shape[0])
            for d in range(3):
                weight = weight * (frac[:, d] if bits[d] else 1 - frac[:, d])
            level_out = level_out + weight[:, None] * table[offset + torch.from_numpy(index.astype(np.int64))]
        outputs.append(level_out)
        offset += size
    assert offset * n_feats == params.numel()
    return torch.cat(outputs, dim=-1)


def test_vectorised_hash_grid_equals_per_level_reference():
    grid = get_encoding(3, SMALL_HASH)
    assert 0 < grid.layout.n_dense_levels < SMALL_HASH["n_levels"]  # both index kinds are exercised
    with torch.no_grad():
        grid.params.normal_()
    x = torch.cat([torch.rand(500, 3), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.999, 0.5, 0.001]])])
    params = grid.params.detach().clone().requires_grad_(True)
    expected = _reference_hash_grid(x, params, SMALL_HASH)
    actual = grid(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    weights = torch.randn_like(expected)
    (expected * weights).sum().backward()
    (actual * weights).sum().backward()
    torch.testing.assert_close(grid.params.grad, params.grad, rtol=1e-4, atol=1e-5)


def test_hash_grid_is_continuous_and_uses_pytorch_on_cpu():
    grid = get_encoding(3, SMALL_HASH)
    with torch.no_grad():
        grid.params.normal_()
    x = torch.rand(100, 3) * 0.9 + 0.05
    step = grid(x + 1e-5) - grid(x)
    assert step.abs().max() < 1e-2  # multilinear interpolation: no jumps
    assert isinstance(grid, HashGrid)


class FakeTinyCudaNN:
    """Stands in for the tinycudann module: records how its Encoding is built; half-precision output
    (tinycudann's default)."""

    def __init__(self) -> None:
        self.built: list = []
        outer = self

        class Encoding(torch.nn.Module):
            def __init__(self, n_input_dims, encoding_config, seed=1337, dtype=None):
                super().__init__()
                outer.built.append({"n_input_dims": n_input_dims, "encoding_config": encoding_config, "dtype": dtype})
                levels = encoding_config["n_levels"] * encoding_config["n_features_per_level"]
                self.n_output_dims = levels
                self.params = torch.nn.Parameter(torch.zeros(outer.n_params))
                self.dtype = dtype or torch.float16

            def forward(self, x):
                return torch.ones(x.shape[0], self.n_output_dims, dtype=self.dtype)

        self.Encoding = Encoding


@pytest.fixture
def fake_tcnn(monkeypatch):
    from threestudio_mv.models.encodings import hash_grid

    fake = FakeTinyCudaNN()
    monkeypatch.setattr(hash_grid, "_TCNN_STATE", {"module": fake, "checked": True})
    return fake


def test_hash_grid_uses_pytorch_for_cpu_inputs_even_with_tinycudann(fake_tcnn):
    grid = get_encoding(3, SMALL_HASH)
    assert grid.use_tcnn
    x = torch.rand(50, 3)
    torch.testing.assert_close(grid(x), grid._forward_torch(x))
    assert fake_tcnn.built == []  # tinycudann is never built for CPU tensors


def test_hash_grid_asks_tinycudann_for_float32(fake_tcnn, monkeypatch):
    grid = get_encoding(3, SMALL_HASH)
    fake_tcnn.n_params = grid.params.numel()
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())  # no GPU here
    encoded = grid._forward_tcnn(torch.rand(10, 3))
    assert fake_tcnn.built == [grid.tcnn_kwargs()] and grid.tcnn_kwargs()["dtype"] == torch.float32
    assert encoded.dtype == torch.float32 and encoded.shape == (10, grid.n_output_dims)
    assert grid._tcnn_encoding.params is grid.params  # one set of parameters for both back ends


def test_hash_grid_supports_double_backward_for_analytic_normals():
    grid = get_encoding(3, SMALL_HASH)
    with torch.no_grad():
        grid.params.normal_()
    x = torch.rand(64, 3, requires_grad=True)
    (gradient,) = torch.autograd.grad(grid(x).sum(), x, create_graph=True)
    gradient.square().sum().backward()
    assert grid.params.grad.abs().sum() > 0


def test_progressive_band_unmasks_levels_over_steps():
    config = {**SMALL_HASH, "otype": "ProgressiveBandHashGrid", "start_level": 2, "start_step": 10, "update_steps": 5}
    grid = get_encoding(3, config)
    with torch.no_grad():
        grid.params.normal_()
    x = torch.rand(50, 3)
    active = lambda: (grid(x).abs().sum(0) > 0).view(5, 2).all(-1).tolist()  # noqa: E731
    assert active() == [True, True, False, False, False]
    grid.update_step(0, 14)
    assert active() == [True, True, False, False, False]
    grid.update_step(0, 20)
    assert active() == [True, True, True, True, False]
    grid.update_step(0, 1000)
    assert all(active())


def test_dense_grid_and_triplane_hit_stored_values_at_vertices():
    dense = get_encoding(3, {"otype": "DenseGrid", "resolution": 5, "n_features": 2})
    with torch.no_grad():
        dense.grid.normal_()
    i, j, k = 1, 3, 4  # x, y, z vertex indices
    x = torch.tensor([[i / 4, j / 4, k / 4]])
    torch.testing.assert_close(dense(x)[0], dense.grid[0, :, k, j, i])

    plane = get_encoding(3, {"otype": "Triplane", "resolution": 5, "n_features": 2})
    expected = torch.cat([plane.planes[0, :, j, i], plane.planes[1, :, k, i], plane.planes[2, :, k, j]])
    torch.testing.assert_close(plane(x)[0], expected)


def test_frequency_values():
    encoding = get_encoding(2, {"otype": "Frequency", "n_frequencies": 2})
    y = encoding(torch.tensor([[0.25, 0.5]]))
    # per frequency k and dim: sin(2^k pi x) then cos(2^k pi x)
    expected_sin = [math.sin(k * math.pi * x) for x in (0.25, 0.5) for k in (1, 2)]
    torch.testing.assert_close(y[0, :4], torch.tensor(expected_sin), atol=1e-6, rtol=0)


def test_spherical_harmonics_are_orthonormal():
    encoding = get_encoding(3, {"otype": "SphericalHarmonics", "degree": 4})
    generator = torch.Generator().manual_seed(1)
    dirs = torch.nn.functional.normalize(torch.randn(400000, 3, generator=generator), dim=-1)
    basis = encoding((dirs + 1) / 2)
    gram = 4 * math.pi * basis.T @ basis / dirs.shape[0]
    torch.testing.assert_close(gram, torch.eye(16), atol=0.03, rtol=0)


def test_bad_encoding_configs_raise_user_errors():
    with pytest.raises(UserError, match=r"system.geometry.pos_encoding_config.otype.*'Hashgrid'"):
        get_encoding(3, {"otype": "Hashgrid"}, "system.geometry.pos_encoding_config")
    with pytest.raises(UserError, match="n_level"):
        get_encoding(3, {"otype": "HashGrid", "n_level": 4})
    with pytest.raises(UserError, match="n_features_per_level"):
        get_encoding(3, {"otype": "HashGrid", "n_features_per_level": 3})
    with pytest.raises(UserError, match="reduction"):
        get_encoding(3, {"otype": "Triplane", "reduction": "mean"})
    with pytest.raises(UserError, match="activation"):
        get_mlp(4, 1, {"activation": "Tanh"}, "system.geometry.mlp_network_config")


def test_mlp_shape_and_layers():
    mlp = get_mlp(8, 3, {"n_neurons": 16, "n_hidden_layers": 2, "output_activation": "Sigmoid"})
    y = mlp(torch.randn(5, 8))
    assert y.shape == (5, 3) and ((y > 0) & (y < 1)).all()
    assert sum(isinstance(m, torch.nn.Linear) for m in mlp.modules()) == 3

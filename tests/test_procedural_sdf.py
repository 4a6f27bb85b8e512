"""Primitive SDFs (sign, distance to known surface points, Lipschitz bound) and CSG composition."""
import math

import pytest
import torch

from threestudio_mv.data.procedural import sdf


def _at(function, point, **params) -> float:
    return float(function(torch.tensor([point], dtype=torch.float32), **params)[0])


def _offset(point, normal, distance):
    length = math.sqrt(sum(n * n for n in normal))
    return [p + distance * n / length for p, n in zip(point, normal)]


# (function, params, inside point, [(point, expected distance)]); every primitive has a point
# outside and a point at a known distance from a known surface point.
CASES = {
    "sphere": (sdf.sdf_sphere, {"radius": 0.4}, [0, 0, 0], [([0.5, 0, 0], 0.1), ([0, 0, 0.4], 0.0)]),
    "rounded_box": (
        sdf.sdf_rounded_box,
        {"half_extents": (0.3, 0.2, 0.1), "rounding": 0.02},
        [0, 0, 0],
        [([0.4, 0, 0], 0.1), ([0, 0, 0.0], -0.1), ([0.4, 0.3, 0], math.hypot(0.12, 0.12) - 0.02)],
    ),
    "cylinder": (
        sdf.sdf_cylinder,
        {"radius": 0.3, "half_height": 0.4},
        [0, 0, 0],
        [([0.5, 0, 0], 0.2), ([0, 0, 0.5], 0.1), ([0.4, 0, 0.5], math.hypot(0.1, 0.1)), ([0, 0, 0], -0.3)],
    ),
    "cone": (
        sdf.sdf_cone,
        {"bottom_radius": 0.4, "top_radius": 0.0, "half_height": 0.4},
        [0, 0, -0.2],
        [
            ([0, 0, -0.5], 0.1),
            ([0, 0, 0.5], 0.1),
            (_offset([0.2, 0, 0], [0.8, 0, 0.4], 0.05), 0.05),  # off the middle of the slanted side
            ([0, 0, 0], -0.16 / math.hypot(0.8, 0.4)),
        ],
    ),
    "torus": (
        sdf.sdf_torus,
        {"major_radius": 0.3, "minor_radius": 0.1},
        [0.3, 0, 0],
        [([0, 0, 0], 0.2), ([0.5, 0, 0], 0.1), ([0, 0.3, 0.15], 0.05)],
    ),
    "capsule": (
        sdf.sdf_capsule,
        {"half_length": 0.2, "radius": 0.1},
        [0, 0, 0.15],
        [([0, 0, 0.4], 0.1), ([0.2, 0, 0], 0.1), ([0, 0, 0], -0.1)],
    ),
    "pyramid": (
        sdf.sdf_pyramid,
        {"half_width": 0.4, "height": 0.8},
        [0, 0, -0.2],
        [
            ([0, 0, -0.5], 0.1),
            (_offset([0.2, 0, 0], [0.8, 0, 0.4], 0.05), 0.05),  # off the centre of the +x face
            ([0, 0, 0], -0.16 / math.hypot(0.8, 0.4)),
        ],
    ),
    "ellipsoid": (
        sdf.sdf_ellipsoid,
        {"radii": (0.4, 0.2, 0.3)},
        [0, 0, 0],
        [([0.4, 0, 0], 0.0), ([0, 0.2, 0], 0.0), ([0, 0, 0.3], 0.0), ([0, 0.3, 0], 0.1)],  # 0.1 on the min axis
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_primitive_sign_and_known_distances(name: str) -> None:
    function, params, inside, known = CASES[name]
    assert _at(function, inside, **params) < 0.0
    assert _at(function, [2.0, 1.5, -1.0], **params) > 0.5
    for point, expected in known:
        assert _at(function, point, **params) == pytest.approx(expected, abs=1e-5), (name, point)


@pytest.mark.parametrize("name", sorted(CASES))
def test_primitive_is_one_lipschitz(name: str) -> None:
    """Exact SDFs and the documented bounds are all 1-Lipschitz (safe for sphere tracing)."""
    function, params, _, _ = CASES[name]
    generator = torch.Generator().manual_seed(1)
    a = torch.rand(4000, 3, generator=generator) * 1.6 - 0.8
    b = a + (torch.rand(4000, 3, generator=generator) - 0.5) * 0.2
    change = (function(a, **params) - function(b, **params)).abs()
    assert bool((change <= (a - b).norm(dim=-1) + 1e-5).all())


def test_ellipsoid_bound_is_below_true_distance() -> None:
    # Along the long axis the true distance is 0.1; the bound is positive and not larger.
    value = _at(sdf.sdf_ellipsoid, [0.5, 0, 0], radii=(0.4, 0.2, 0.3))
    assert 0.0 < value <= 0.1


def test_pyramid_outside_near_an_edge_is_a_lower_bound() -> None:
    # Beyond the base corner: true distance is the distance to the corner (0.4, 0.4, -0.4).
    point = [0.5, 0.5, -0.5]
    true = math.sqrt(3 * 0.1**2)
    value = _at(sdf.sdf_pyramid, point, half_width=0.4, height=0.8)
    assert 0.0 < value <= true + 1e-6


def test_rotation_and_translation_place_the_primitive() -> None:
    # A cylinder turned 90 degrees about y has its axis along x; moved to y = 0.5.
    node = sdf.Primitive("cylinder", {"radius": 0.1, "half_height": 0.4}, "body", (0.0, 0.5, 0.0), (0.0, 90.0, 0.0))
    points = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.2], [0.0, 0.0, 0.0]])
    assert node.distance(points).tolist() == pytest.approx([0.1, 0.1, 0.4], abs=1e-5)
    lo, hi = node.bounds()
    assert lo.tolist() == pytest.approx([-0.4, 0.4, -0.1], abs=1e-6)
    assert hi.tolist() == pytest.approx([0.4, 0.6, 0.1], abs=1e-6)


def _two_spheres():
    left = sdf.Primitive("sphere", {"radius": 0.2}, "left", (-0.25, 0.0, 0.0))
    right = sdf.Primitive("sphere", {"radius": 0.2}, "right", (0.25, 0.0, 0.0))
    return left, right


def test_csg_operations_and_part_ownership() -> None:
    left, right = _two_spheres()
    parts = {"left": 0, "right": 1}
    points = torch.tensor([[-0.25, 0.0, 0.0], [0.25, 0.0, 0.0], [0.0, 0.0, 0.0], [0.3, 0.0, 0.0]])
    d_left, d_right = left.distance(points), right.distance(points)

    union = sdf.Union([left, right])
    distance, part = union.distance_and_part(points, parts)
    assert torch.allclose(distance, torch.minimum(d_left, d_right))
    assert part.tolist()[:2] == [0, 1]

    smooth = sdf.SmoothUnion([left, right], k=0.1)
    assert bool((smooth.distance(points) <= torch.minimum(d_left, d_right) + 1e-7).all())
    assert float(smooth.distance(points)[2]) < float(d_left[2])  # the blend fills the gap between them

    cut = sdf.Subtract(sdf.Primitive("sphere", {"radius": 0.4}, "base"), right)
    distance, part = cut.distance_and_part(points, {"base": 0, "right": 1})
    assert float(distance[1]) > 0.0 and float(distance[0]) < 0.0  # carved where the cutter is
    assert part.tolist() == [0, 0, 0, 0]  # the carved surface keeps the base's part

    both = sdf.Intersect(sdf.Primitive("sphere", {"radius": 0.4}, "base"), right)
    assert float(both.distance(points)[1]) < 0.0 and float(both.distance(points)[0]) > 0.0


def test_spec_round_trip_preserves_distances() -> None:
    left, right = _two_spheres()
    tree = sdf.Union(
        [
            sdf.SmoothUnion([left, right], k=0.05),
            sdf.Subtract(
                sdf.Primitive("rounded_box", {"half_extents": (0.3, 0.1, 0.1), "rounding": 0.01}, "bar", (0, 0, 0.3), (0, 0, 30)),
                sdf.Primitive("cone", {"bottom_radius": 0.1, "top_radius": 0.0, "half_height": 0.2}, "bar", (0, 0, 0.3)),
            ),
        ]
    )
    rebuilt = sdf.node_from_spec(tree.to_spec())
    points = torch.rand(500, 3) - 0.5
    assert torch.allclose(tree.distance(points), rebuilt.distance(points), atol=1e-4)


def test_stretch_moves_the_surface_keeps_parts_and_bounds_the_distance() -> None:
    ball = sdf.Primitive("sphere", {"radius": 0.4}, "body")
    stretched = sdf.Stretch(ball, (1.0, 0.5, 0.8))
    on_surface = torch.tensor([[0.4, 0.0, 0.0], [0.0, 0.2, 0.0], [0.0, 0.0, 0.32]])
    assert torch.allclose(stretched.distance(on_surface), torch.zeros(3), atol=1e-6)
    assert float(stretched.distance(torch.tensor([[0.0, 0.3, 0.0]]))[0]) > 0.0  # inside the ball, outside the squashed one
    # A lower bound of the true distance (safe for sphere tracing): from (0, 0.5, 0) the surface is 0.3 away.
    assert 0.0 < float(stretched.distance(torch.tensor([[0.0, 0.5, 0.0]]))[0]) <= 0.3 + 1e-6
    _, part = stretched.distance_and_part(on_surface, {"body": 3})
    assert part.tolist() == [3, 3, 3]
    lo, hi = stretched.bounds()
    assert lo.tolist() == pytest.approx([-0.4, -0.2, -0.32]) and hi.tolist() == pytest.approx([0.4, 0.2, 0.32])
    points = torch.rand(200, 3) - 0.5
    assert torch.allclose(sdf.node_from_spec(stretched.to_spec()).distance(points), stretched.distance(points))

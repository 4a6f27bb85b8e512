"""Signed-distance primitives and CSG composition, batched in PyTorch.

Every SDF takes points (N, 3) on any device and returns (N,) distances, negative inside. Primitives
are defined in their own frame (centred, axis along +z where they have one) and placed with a
rotation (Euler XYZ degrees) and a translation. A tree of CSG nodes also answers *which part* is
nearest, so each part of an asset can carry its own colour.

Exactness: sphere, rounded box, cylinder, cone/frustum, torus and capsule are exact. The square
pyramid (max of its face planes) and the ellipsoid (``(|p/r| - 1) * min(r)``) are lower bounds of the
true distance with the exact zero set, which is all sphere tracing and marching cubes need. CSG
union is exact outside; subtraction, intersection and smooth union are bounds.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

Vec3 = Tuple[float, float, float]


# --------------------------------------------------------------------------------------------------
# Primitive distance functions (local frame). Written here rather than taken from a library: no
# maintained PyTorch SDF library with batched, device-agnostic primitives exists among our deps.
# --------------------------------------------------------------------------------------------------


def _segment_distance_2d(q: Tensor, a: Tuple[float, float], b: Tuple[float, float]) -> Tensor:
    """Unsigned distance from 2D points q (N, 2) to the segment a-b."""
    ax, ay = a
    ex, ey = b[0] - ax, b[1] - ay
    length_sq = max(ex * ex + ey * ey, 1e-12)
    qx, qy = q[:, 0] - ax, q[:, 1] - ay
    h = ((qx * ex + qy * ey) / length_sq).clamp(0.0, 1.0)
    return torch.hypot(qx - h * ex, qy - h * ey)


def sdf_sphere(p: Tensor, radius: float) -> Tensor:
    """Sphere of ``radius`` at the origin (exact)."""
    return p.norm(dim=-1) - radius


def sdf_rounded_box(p: Tensor, half_extents: Vec3, rounding: float = 0.0) -> Tensor:
    """Axis-aligned box with half sizes ``half_extents`` and edges rounded by ``rounding`` (exact)."""
    inner = torch.tensor(half_extents, dtype=p.dtype, device=p.device) - rounding
    q = p.abs() - inner
    outside = q.clamp_min(0.0).norm(dim=-1)
    inside = q.max(dim=-1).values.clamp_max(0.0)
    return outside + inside - rounding


def _box_2d(dx: Tensor, dy: Tensor) -> Tensor:
    """Signed distance of a 2D box given per-axis excess distances (exact)."""
    outside = torch.hypot(dx.clamp_min(0.0), dy.clamp_min(0.0))
    inside = torch.maximum(dx, dy).clamp_max(0.0)
    return outside + inside


def sdf_cylinder(p: Tensor, radius: float, half_height: float) -> Tensor:
    """Capped cylinder along z (exact)."""
    radial = torch.hypot(p[:, 0], p[:, 1])
    return _box_2d(radial - radius, p[:, 2].abs() - half_height)


def sdf_cone(p: Tensor, bottom_radius: float, top_radius: float, half_height: float) -> Tensor:
    """Capped cone (frustum) along z from z=-half_height (bottom) to +half_height (exact).

    A solid of revolution: the distance equals the 2D distance in the (radius, z) half-plane to the
    trapezoid cross-section, i.e. the nearest of its bottom, side and top edges, signed by an inside
    test.
    """
    radial = torch.hypot(p[:, 0], p[:, 1])
    z = p[:, 2]
    q = torch.stack([radial, z], dim=-1)
    h = half_height
    edges = [
        ((0.0, -h), (bottom_radius, -h)),
        ((bottom_radius, -h), (top_radius, h)),
        ((top_radius, h), (0.0, h)),
    ]
    unsigned = torch.stack([_segment_distance_2d(q, a, b) for a, b in edges], dim=0).min(dim=0).values
    radius_at_z = bottom_radius + (top_radius - bottom_radius) * (z + h) / (2.0 * h)
    inside = (z.abs() <= h) & (radial <= radius_at_z)
    return torch.where(inside, -unsigned, unsigned)


def sdf_torus(p: Tensor, major_radius: float, minor_radius: float) -> Tensor:
    """Torus in the xy plane around the z axis (exact)."""
    radial = torch.hypot(p[:, 0], p[:, 1])
    return torch.hypot(radial - major_radius, p[:, 2]) - minor_radius


def sdf_capsule(p: Tensor, half_length: float, radius: float) -> Tensor:
    """Capsule: segment from z=-half_length to +half_length swept by a sphere (exact)."""
    dz = p[:, 2] - p[:, 2].clamp(-half_length, half_length)
    return torch.sqrt(p[:, 0] ** 2 + p[:, 1] ** 2 + dz**2) - radius


def sdf_pyramid(p: Tensor, half_width: float, height: float) -> Tensor:
    """Square pyramid, base (side 2*half_width) at z=-height/2, apex at z=+height/2.

    Max of the five face-plane distances: exact inside and where a face is the nearest feature,
    a lower bound near edges and corners (documented bound).
    """
    norm = math.hypot(height, half_width)
    top = 0.5 * height
    side_x = (height * p[:, 0].abs() + half_width * (p[:, 2] - top)) / norm
    side_y = (height * p[:, 1].abs() + half_width * (p[:, 2] - top)) / norm
    base = -p[:, 2] - top
    return torch.maximum(torch.maximum(side_x, side_y), base)


def sdf_ellipsoid(p: Tensor, radii: Vec3) -> Tensor:
    """Axis-aligned ellipsoid. ``(|p/r| - 1) * min(r)`` is 1-Lipschitz and zero on the surface, so it
    is a lower bound of the true distance (exact for a sphere)."""
    r = torch.tensor(radii, dtype=p.dtype, device=p.device)
    return ((p / r).norm(dim=-1) - 1.0) * min(radii)


# name -> (function, local half extents of its bounding box as a function of the params)
PRIMITIVES = {
    "sphere": (sdf_sphere, lambda radius: (radius, radius, radius)),
    "rounded_box": (sdf_rounded_box, lambda half_extents, rounding=0.0: tuple(half_extents)),
    "cylinder": (sdf_cylinder, lambda radius, half_height: (radius, radius, half_height)),
    "cone": (
        sdf_cone,
        lambda bottom_radius, top_radius, half_height: (
            max(bottom_radius, top_radius),
            max(bottom_radius, top_radius),
            half_height,
        ),
    ),
    "torus": (
        sdf_torus,
        lambda major_radius, minor_radius: (
            major_radius + minor_radius,
            major_radius + minor_radius,
            minor_radius,
        ),
    ),
    "capsule": (sdf_capsule, lambda half_length, radius: (radius, radius, half_length + radius)),
    "pyramid": (sdf_pyramid, lambda half_width, height: (half_width, half_width, 0.5 * height)),
    "ellipsoid": (sdf_ellipsoid, lambda radii: tuple(radii)),
}


def rotation_matrix(degrees: Vec3) -> np.ndarray:
    """Local-to-world rotation for Euler angles (x, y, z) in degrees, applied x first: Rz @ Ry @ Rx."""
    ax, ay, az = (math.radians(a) for a in degrees)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


# --------------------------------------------------------------------------------------------------
# CSG tree
# --------------------------------------------------------------------------------------------------

Bounds = Tuple[np.ndarray, np.ndarray]


class SDFNode:
    """A node of a CSG tree. ``part_ids`` maps part names to integer ids for part lookup."""

    def distance(self, points: Tensor) -> Tensor:
        """Signed distance (N,) at points (N, 3)."""
        raise NotImplementedError

    def distance_and_part(self, points: Tensor, part_ids: Dict[str, int]) -> Tuple[Tensor, Tensor]:
        """Signed distance (N,) and id (N,) of the part that owns the nearest surface."""
        raise NotImplementedError

    def bounds(self) -> Bounds:
        """Conservative world axis-aligned bounding box (lo (3,), hi (3,))."""
        raise NotImplementedError

    def leaves(self) -> Iterator["Primitive"]:
        """The primitives of the tree, depth first."""
        raise NotImplementedError

    def to_spec(self) -> dict:
        """A JSON-able description; :func:`node_from_spec` rebuilds the node."""
        raise NotImplementedError


def _round_list(values: Sequence[float]) -> List[float]:
    return [round(float(v), 5) for v in values]


@dataclass(eq=False)
class Primitive(SDFNode):
    """A primitive ``shape`` (a key of PRIMITIVES) with ``params``, placed by rotation then translation."""

    shape: str
    params: Dict[str, object]
    part: str
    translate: Vec3 = (0.0, 0.0, 0.0)
    rotate: Vec3 = (0.0, 0.0, 0.0)
    _rotation: np.ndarray = field(init=False, repr=False)
    _cache: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.shape not in PRIMITIVES:
            raise ValueError(f"unknown primitive '{self.shape}'; known: {', '.join(PRIMITIVES)}")
        self._rotation = rotation_matrix(self.rotate)

    def _local(self, points: Tensor) -> Tensor:
        key = (points.device, points.dtype)
        if key not in self._cache:
            rotation = torch.tensor(self._rotation, dtype=points.dtype, device=points.device)
            translation = torch.tensor(self.translate, dtype=points.dtype, device=points.device)
            self._cache[key] = (rotation, translation, bool(np.allclose(self._rotation, np.eye(3))))
        rotation, translation, identity = self._cache[key]
        local = points - translation
        # Row vectors: p_local = R^T (p - t)  <=>  (p - t) @ R.
        return local if identity else local @ rotation

    def distance(self, points: Tensor) -> Tensor:
        function = PRIMITIVES[self.shape][0]
        return function(self._local(points), **self.params)

    def distance_and_part(self, points: Tensor, part_ids: Dict[str, int]) -> Tuple[Tensor, Tensor]:
        distance = self.distance(points)
        return distance, torch.full_like(distance, part_ids[self.part], dtype=torch.long)

    def bounds(self) -> Bounds:
        half = np.array(PRIMITIVES[self.shape][1](**self.params), dtype=np.float64)
        corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * half
        world = corners @ self._rotation.T + np.array(self.translate)
        return world.min(axis=0), world.max(axis=0)

    def leaves(self) -> Iterator["Primitive"]:
        yield self

    def to_spec(self) -> dict:
        params = {k: (_round_list(v) if isinstance(v, (list, tuple)) else round(float(v), 5)) for k, v in self.params.items()}
        spec = {"shape": self.shape, "params": params, "part": self.part}
        if any(self.translate):
            spec["translate"] = _round_list(self.translate)
        if any(self.rotate):
            spec["rotate"] = _round_list(self.rotate)
        return spec


@dataclass(eq=False)
class Union(SDFNode):
    """Union: min of the children; the nearest child owns the point."""

    children: List[SDFNode]

    def distance(self, points: Tensor) -> Tensor:
        result = self.children[0].distance(points)
        for child in self.children[1:]:
            result = torch.minimum(result, child.distance(points))
        return result

    def distance_and_part(self, points: Tensor, part_ids: Dict[str, int]) -> Tuple[Tensor, Tensor]:
        distance, part = self.children[0].distance_and_part(points, part_ids)
        for child in self.children[1:]:
            d, p = child.distance_and_part(points, part_ids)
            closer = d < distance
            distance, part = torch.where(closer, d, distance), torch.where(closer, p, part)
        return distance, part

    def bounds(self) -> Bounds:
        boxes = [child.bounds() for child in self.children]
        return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)

    def leaves(self) -> Iterator[Primitive]:
        for child in self.children:
            yield from child.leaves()

    def to_spec(self) -> dict:
        return {"op": "union", "children": [child.to_spec() for child in self.children]}


def _smooth_min(a: Tensor, b: Tensor, k: float) -> Tensor:
    """Polynomial smooth minimum with blend width k; 1-Lipschitz and <= min(a, b)."""
    h = (0.5 + 0.5 * (b - a) / k).clamp(0.0, 1.0)
    return torch.lerp(b, a, h) - k * h * (1.0 - h)


@dataclass(eq=False)
class SmoothUnion(Union):
    """Union blended over a width ``k`` (a fillet between parts); the nearest child owns the point."""

    k: float = 0.05

    def distance(self, points: Tensor) -> Tensor:
        result = self.children[0].distance(points)
        for child in self.children[1:]:
            result = _smooth_min(result, child.distance(points), self.k)
        return result

    def distance_and_part(self, points: Tensor, part_ids: Dict[str, int]) -> Tuple[Tensor, Tensor]:
        distance, part = self.children[0].distance_and_part(points, part_ids)
        for child in self.children[1:]:
            d, p = child.distance_and_part(points, part_ids)
            part = torch.where(d < distance, p, part)
            distance = _smooth_min(distance, d, self.k)
        return distance, part

    def bounds(self) -> Bounds:
        lo, hi = super().bounds()
        # The blend grows the surface by at most k/4 beyond the plain union.
        return lo - 0.25 * self.k, hi + 0.25 * self.k

    def to_spec(self) -> dict:
        return {"op": "smooth_union", "k": self.k, "children": [child.to_spec() for child in self.children]}


@dataclass(eq=False)
class Subtract(SDFNode):
    """``base`` minus ``cutter``; the carved surface keeps the base's part (e.g. a mug's inside)."""

    base: SDFNode
    cutter: SDFNode

    def distance(self, points: Tensor) -> Tensor:
        return torch.maximum(self.base.distance(points), -self.cutter.distance(points))

    def distance_and_part(self, points: Tensor, part_ids: Dict[str, int]) -> Tuple[Tensor, Tensor]:
        distance, part = self.base.distance_and_part(points, part_ids)
        return torch.maximum(distance, -self.cutter.distance(points)), part

    def bounds(self) -> Bounds:
        return self.base.bounds()

    def leaves(self) -> Iterator[Primitive]:
        yield from self.base.leaves()
        yield from self.cutter.leaves()

    def to_spec(self) -> dict:
        return {"op": "subtract", "children": [self.base.to_spec(), self.cutter.to_spec()]}


@dataclass(eq=False)
class Intersect(Subtract):
    """Intersection of ``base`` and ``cutter`` (called so for symmetry); keeps the base's part."""

    def distance(self, points: Tensor) -> Tensor:
        return torch.maximum(self.base.distance(points), self.cutter.distance(points))

    def distance_and_part(self, points: Tensor, part_ids: Dict[str, int]) -> Tuple[Tensor, Tensor]:
        distance, part = self.base.distance_and_part(points, part_ids)
        return torch.maximum(distance, self.cutter.distance(points)), part

    def bounds(self) -> Bounds:
        (lo_a, hi_a), (lo_b, hi_b) = self.base.bounds(), self.cutter.bounds()
        return np.maximum(lo_a, lo_b), np.minimum(hi_a, hi_b)

    def to_spec(self) -> dict:
        return {"op": "intersect", "children": [self.base.to_spec(), self.cutter.to_spec()]}


@dataclass(eq=False)
class Stretch(SDFNode):
    """``child`` scaled by ``scale`` (3,) along the world axes about the origin. The distance is the
    child's at ``p / scale`` times the smallest scale: a lower bound of the true distance, so sphere
    tracing stays safe, and its zero set is exactly the stretched surface."""

    child: SDFNode
    scale: Vec3

    def _inner(self, points: Tensor) -> Tuple[Tensor, float]:
        scale = torch.tensor(self.scale, dtype=points.dtype, device=points.device)
        return points / scale, float(min(self.scale))

    def distance(self, points: Tensor) -> Tensor:
        inner, factor = self._inner(points)
        return self.child.distance(inner) * factor

    def distance_and_part(self, points: Tensor, part_ids: Dict[str, int]) -> Tuple[Tensor, Tensor]:
        inner, factor = self._inner(points)
        distance, part = self.child.distance_and_part(inner, part_ids)
        return distance * factor, part

    def bounds(self) -> Bounds:
        lo, hi = self.child.bounds()
        return np.asarray(lo) * np.array(self.scale), np.asarray(hi) * np.array(self.scale)

    def leaves(self) -> Iterator[Primitive]:
        yield from self.child.leaves()

    def to_spec(self) -> dict:
        return {"op": "stretch", "scale": _round_list(self.scale), "children": [self.child.to_spec()]}


def node_from_spec(spec: dict) -> SDFNode:
    """Rebuild a tree from :meth:`SDFNode.to_spec` output."""
    if "shape" in spec:
        params = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec["params"].items()}
        return Primitive(
            spec["shape"],
            params,
            spec["part"],
            tuple(spec.get("translate", (0.0, 0.0, 0.0))),
            tuple(spec.get("rotate", (0.0, 0.0, 0.0))),
        )
    children = [node_from_spec(child) for child in spec["children"]]
    op = spec["op"]
    if op == "union":
        return Union(children)
    if op == "smooth_union":
        return SmoothUnion(children, k=spec["k"])
    if op == "subtract":
        return Subtract(*children)
    if op == "intersect":
        return Intersect(*children)
    if op == "stretch":
        return Stretch(children[0], tuple(spec["scale"]))
    raise ValueError(f"unknown CSG op '{op}'")

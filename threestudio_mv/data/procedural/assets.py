"""Procedural assets: coloured CSG trees of SDF primitives, in canonical pose.

Canonical pose: centred, inside [-0.5, 0.5]^3 (largest extent ~0.85-0.95), up +z, front facing +x.
Three kinds of asset, each named by a key tuple:

- ``("primitive", shape, colour)``: one primitive ("a red cube").
- ``("object", name, colour, part_colour)``: a composite object coloured ``colour`` as a whole, except
  its fixed-colour details (a snowman's carrot nose, a car's tyres), with its one nameable part
  recoloured to ``part_colour`` unless that is None ("a red mushroom with a white stem").
- ``("stack", top_shape, top_colour, bottom_shape, bottom_colour)``: one primitive resting on another
  ("a red cube on top of a blue cylinder").
"""
import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from threestudio_mv.data.procedural.colours import NAMED_COLOURS
from threestudio_mv.data.procedural.sdf import Primitive, SDFNode, SmoothUnion, Stretch, Subtract, Union

SHAPES = ("sphere", "cube", "cylinder", "cone", "torus", "capsule", "pyramid", "ellipsoid")
STACK_TOP_SHAPES = ("sphere", "cube", "cylinder", "cone", "pyramid")
STACK_BOTTOM_SHAPES = ("cube", "cylinder")


def _prim(shape: str, part: str, at=(0.0, 0.0, 0.0), rot=(0.0, 0.0, 0.0), **params) -> Primitive:
    return Primitive(shape, params, part, tuple(float(v) for v in at), tuple(float(v) for v in rot))


def shape_node(shape: str, part: str, half_width: float, half_height: float, z: float = 0.0) -> Tuple[Primitive, float]:
    """A primitive ``shape`` fitting a box of half sizes (half_width, half_width, half_height) centred
    at height ``z``; returns it with its actual vertical half extent."""
    at = (0.0, 0.0, z)
    if shape == "sphere":
        radius = min(half_width, half_height)
        return _prim("sphere", part, at, radius=radius), radius
    if shape == "cube":
        side = 0.96 * min(half_width, half_height)
        return _prim("rounded_box", part, at, half_extents=(side, side, side), rounding=0.08 * side), side
    if shape == "cylinder":
        return _prim("cylinder", part, at, radius=0.8 * half_width, half_height=half_height), half_height
    if shape == "cone":
        return _prim("cone", part, at, bottom_radius=half_width, top_radius=0.0, half_height=half_height), half_height
    if shape == "torus":
        # Standing on its rim, hole facing the front (+x): a lying torus hides its hole at low elevations.
        minor = 0.3 * min(half_width, half_height)
        major = min(half_width, half_height) - minor
        return _prim("torus", part, at, (0, 90, 0), major_radius=major, minor_radius=minor), major + minor
    if shape == "capsule":
        radius = 0.5 * half_width
        return _prim("capsule", part, at, half_length=half_height - radius, radius=radius), half_height
    if shape == "pyramid":
        return _prim("pyramid", part, at, half_width=0.95 * half_width, height=2.0 * half_height), half_height
    if shape == "ellipsoid":
        radii = (half_width, 0.66 * half_width, min(0.62 * half_width, half_height))
        return _prim("ellipsoid", part, at, radii=radii), radii[2]
    raise ValueError(f"unknown shape '{shape}'")


# --------------------------------------------------------------------------------------------------
# Composite objects. Coordinates are hand-placed in the canonical box; tests check the extents.
# --------------------------------------------------------------------------------------------------


def _mushroom() -> SDFNode:
    stem = _prim("cone", "stem", (0, 0, -0.17), bottom_radius=0.15, top_radius=0.11, half_height=0.28)
    dome = _prim("ellipsoid", "cap", (0, 0, 0.08), radii=(0.45, 0.45, 0.37))
    below = _prim("rounded_box", "cap", (0, 0, -0.22), half_extents=(0.6, 0.6, 0.3))
    return Union([stem, Subtract(dome, below)])


def _chair() -> SDFNode:
    seat = _prim("rounded_box", "seat", (0.02, 0, -0.02), half_extents=(0.3, 0.3, 0.045), rounding=0.015)
    back = _prim("rounded_box", "seat", (-0.25, 0, 0.24), half_extents=(0.035, 0.3, 0.22), rounding=0.015)
    legs = [
        _prim("cylinder", "legs", (x, y, -0.255), radius=0.035, half_height=0.195)
        for x in (-0.23, 0.27)
        for y in (-0.25, 0.25)
    ]
    return Union([seat, back, *legs])


def _house() -> SDFNode:
    walls = _prim("rounded_box", "walls", (0, 0, -0.17), half_extents=(0.3, 0.34, 0.28), rounding=0.01)
    # A gable roof: a square prism along x turned 45 degrees (diamond cross-section), cut at the eaves.
    prism = _prim("rounded_box", "roof", (0, 0, 0.11), (45, 0, 0), half_extents=(0.35, 0.26, 0.26), rounding=0.01)
    below = _prim("rounded_box", "roof", (0, 0, -0.44), half_extents=(0.6, 0.6, 0.55))
    roof = Subtract(prism, below)
    door = _prim("rounded_box", "door", (0.3, -0.06, -0.29), half_extents=(0.025, 0.08, 0.16), rounding=0.005)
    front_window = _prim("rounded_box", "windows", (0.3, 0.17, -0.1), half_extents=(0.02, 0.07, 0.07), rounding=0.005)
    side_windows = [
        _prim("rounded_box", "windows", (0.0, y, -0.1), half_extents=(0.08, 0.02, 0.07), rounding=0.005)
        for y in (-0.34, 0.34)
    ]
    return Union([walls, roof, door, front_window, *side_windows])


def _mug() -> SDFNode:
    body_center = (0, -0.08, 0)
    outer = _prim("cylinder", "body", body_center, radius=0.32, half_height=0.36)
    cavity = _prim("cylinder", "body", (0, -0.08, 0.08), radius=0.27, half_height=0.36)
    ring = _prim("torus", "handle", (0, 0.25, 0), (0, 90, 0), major_radius=0.17, minor_radius=0.05)
    body_solid = _prim("cylinder", "handle", body_center, radius=0.3, half_height=0.36)
    return Union([Subtract(outer, cavity), Subtract(ring, body_solid)])


def _snowman() -> SDFNode:
    body = SmoothUnion(
        [
            _prim("sphere", "body", (0, 0, -0.27), radius=0.2),
            _prim("sphere", "body", (0, 0, 0.0), radius=0.15),
            _prim("sphere", "body", (0, 0, 0.2), radius=0.11),
        ],
        k=0.04,
    )
    hat = Union(
        [
            _prim("cylinder", "hat", (0, 0, 0.3), radius=0.13, half_height=0.012),
            _prim("cylinder", "hat", (0, 0, 0.37), radius=0.085, half_height=0.07),
        ]
    )
    nose = _prim("cone", "nose", (0.16, 0, 0.2), (0, 90, 0), bottom_radius=0.04, top_radius=0.0, half_height=0.07)
    eyes = [_prim("sphere", "eyes", (0.092, y, 0.24), radius=0.02) for y in (-0.045, 0.045)]
    buttons = [_prim("sphere", "buttons", (0.15 - 0.01 * i, 0, 0.03 - 0.07 * i), radius=0.02) for i in range(2)]
    return Union([body, hat, nose, *eyes, *buttons])


def _table() -> SDFNode:
    top = _prim("rounded_box", "top", (0, 0, 0.19), half_extents=(0.45, 0.3, 0.03), rounding=0.01)
    legs = [
        _prim("cylinder", "legs", (x, y, -0.03), radius=0.035, half_height=0.19)
        for x in (-0.39, 0.39)
        for y in (-0.24, 0.24)
    ]
    return Union([top, *legs])


def _lamp() -> SDFNode:
    base = _prim("cylinder", "base", (-0.12, 0, -0.42), radius=0.18, half_height=0.03)
    pole = _prim("cylinder", "base", (-0.12, 0, -0.02), radius=0.025, half_height=0.39)
    arm = _prim("cylinder", "base", (0.0, 0, 0.37), (0, 90, 0), radius=0.022, half_height=0.12)
    shade = _prim("cone", "shade", (0.14, 0, 0.31), bottom_radius=0.18, top_radius=0.07, half_height=0.12)
    return Union([base, pole, arm, shade])


def _tree() -> SDFNode:
    trunk = _prim("cylinder", "trunk", (0, 0, -0.3), radius=0.07, half_height=0.16)
    foliage = [
        _prim("cone", "foliage", (0, 0, -0.02), bottom_radius=0.4, top_radius=0.0, half_height=0.2),
        _prim("cone", "foliage", (0, 0, 0.15), bottom_radius=0.31, top_radius=0.0, half_height=0.17),
        _prim("cone", "foliage", (0, 0, 0.3), bottom_radius=0.22, top_radius=0.0, half_height=0.15),
    ]
    return Union([trunk, *foliage])


def _rocket() -> SDFNode:
    body = _prim("cylinder", "body", (0, 0, -0.08), radius=0.13, half_height=0.25)
    nose = _prim("cone", "body", (0, 0, 0.31), bottom_radius=0.13, top_radius=0.0, half_height=0.14)
    nozzle = _prim("cone", "body", (0, 0, -0.38), bottom_radius=0.09, top_radius=0.07, half_height=0.05)
    fins = [
        _prim("rounded_box", "fins", (0, 0, -0.31), (0, 0, angle), half_extents=(0.23, 0.014, 0.12), rounding=0.006)
        for angle in (45, 135)
    ]
    window = _prim("cylinder", "window", (0.125, 0, 0.03), (0, 90, 0), radius=0.055, half_height=0.02)
    return Union([body, nose, nozzle, *fins, window])


def _car() -> SDFNode:
    body = _prim("rounded_box", "body", (0, 0, -0.06), half_extents=(0.45, 0.2, 0.08), rounding=0.04)
    cabin = _prim("rounded_box", "roof", (-0.06, 0, 0.09), half_extents=(0.22, 0.18, 0.08), rounding=0.03)
    windshield = _prim("rounded_box", "windows", (0.16, 0, 0.1), half_extents=(0.01, 0.15, 0.055), rounding=0.005)
    wheels = [
        _prim("cylinder", "wheels", (x, y, -0.14), (90, 0, 0), radius=0.1, half_height=0.04)
        for x in (-0.27, 0.27)
        for y in (-0.19, 0.19)
    ]
    lights = [_prim("sphere", "headlights", (0.44, y, -0.04), radius=0.035) for y in (-0.13, 0.13)]
    return Union([body, cabin, windshield, *wheels, *lights])


def _duck() -> SDFNode:
    body = SmoothUnion(
        [
            _prim("ellipsoid", "body", (-0.06, 0, -0.2), radii=(0.36, 0.26, 0.21)),
            _prim("sphere", "body", (0.15, 0, 0.17), radius=0.17),
        ],
        k=0.08,
    )
    beak = _prim("ellipsoid", "beak", (0.34, 0, 0.15), radii=(0.12, 0.07, 0.035))
    eyes = [_prim("sphere", "eyes", (0.28, y, 0.235), radius=0.028) for y in (-0.085, 0.085)]
    return Union([body, beak, *eyes])


def _robot() -> SDFNode:
    torso = _prim("rounded_box", "body", (0, 0, -0.02), half_extents=(0.14, 0.2, 0.17), rounding=0.02)
    neck = _prim("cylinder", "body", (0, 0, 0.16), radius=0.04, half_height=0.03)
    head = _prim("rounded_box", "head", (0, 0, 0.27), half_extents=(0.12, 0.13, 0.1), rounding=0.02)
    antenna = Union(
        [
            _prim("cylinder", "head", (0, 0, 0.4), radius=0.012, half_height=0.04),
            _prim("sphere", "head", (0, 0, 0.445), radius=0.025),
        ]
    )
    eyes = [_prim("sphere", "eyes", (0.115, y, 0.29), radius=0.03) for y in (-0.05, 0.05)]
    panel = _prim("rounded_box", "panel", (0.14, 0, 0.0), half_extents=(0.012, 0.1, 0.07), rounding=0.005)
    arms = [_prim("capsule", "body", (0, y, -0.04), half_length=0.11, radius=0.045) for y in (-0.26, 0.26)]
    legs = [_prim("cylinder", "body", (0, y, -0.32), radius=0.06, half_height=0.13) for y in (-0.1, 0.1)]
    return Union([torso, neck, head, antenna, *eyes, panel, *arms, *legs])


def _teapot() -> SDFNode:
    shell = _prim("ellipsoid", "body", (0, 0, -0.08), radii=(0.28, 0.28, 0.22))
    below = _prim("rounded_box", "body", (0, 0, -0.56), half_extents=(0.6, 0.6, 0.3))
    body = Subtract(shell, below)
    lid = Union(
        [
            Subtract(
                _prim("ellipsoid", "lid", (0, 0, 0.12), radii=(0.16, 0.16, 0.08)),
                _prim("rounded_box", "lid", (0, 0, -0.2), half_extents=(0.3, 0.3, 0.3)),
            ),
            _prim("sphere", "lid", (0, 0, 0.22), radius=0.04),
        ]
    )
    spout = _prim("cone", "body", (0.3, 0, 0.02), (0, 50, 0), bottom_radius=0.07, top_radius=0.035, half_height=0.15)
    handle = _prim("torus", "body", (-0.28, 0, -0.05), (90, 0, 0), major_radius=0.12, minor_radius=0.03)
    return Union([body, lid, spout, handle])


@dataclass(frozen=True)
class ObjectTemplate:
    """A composite object: its builder, its nameable part and its fixed-colour details."""

    name: str
    build: Callable[[], SDFNode]
    named_part: str  # the part a caption may recolour ("stem", "legs", ...)
    part_noun: str  # how captions name it
    plural: bool  # "with black legs" rather than "with a black leg"
    part_colours: Tuple[str, ...]  # colours the nameable part takes in captions
    details: Dict[str, str] = field(default_factory=dict)  # fixed-colour parts

    def all_parts(self) -> List[str]:
        """Part names in tree order."""
        return list(dict.fromkeys(leaf.part for leaf in self.build().leaves()))


OBJECTS: Dict[str, ObjectTemplate] = {
    template.name: template
    for template in [
        ObjectTemplate("mushroom", _mushroom, "stem", "stem", False, ("white", "brown", "yellow", "gray", "pink")),
        ObjectTemplate("chair", _chair, "legs", "legs", True, ("black", "brown", "white", "gray", "red")),
        ObjectTemplate(
            "house", _house, "roof", "roof", False, ("red", "brown", "black", "blue", "green"),
            {"door": "brown", "windows": "cyan"},
        ),
        ObjectTemplate("mug", _mug, "handle", "handle", False, ("white", "black", "red", "blue", "yellow")),
        ObjectTemplate(
            "snowman", _snowman, "hat", "hat", False, ("black", "red", "blue", "green", "brown"),
            {"nose": "orange", "eyes": "black", "buttons": "black"},
        ),
        ObjectTemplate("table", _table, "legs", "legs", True, ("black", "brown", "white", "gray", "blue")),
        ObjectTemplate("lamp", _lamp, "shade", "shade", False, ("white", "yellow", "red", "green", "pink")),
        ObjectTemplate("tree", _tree, "trunk", "trunk", False, ("brown", "gray", "black", "white", "red")),
        ObjectTemplate(
            "rocket", _rocket, "fins", "fins", True, ("red", "blue", "black", "orange", "gray"), {"window": "cyan"}
        ),
        ObjectTemplate(
            "car", _car, "roof", "roof", False, ("white", "black", "gray", "red", "yellow"),
            {"windows": "cyan", "wheels": "black", "headlights": "yellow"},
        ),
        ObjectTemplate("duck", _duck, "beak", "beak", False, ("orange", "red", "yellow", "black", "pink"), {"eyes": "black"}),
        ObjectTemplate(
            "robot", _robot, "head", "head", False, ("red", "blue", "yellow", "gray", "cyan"),
            {"eyes": "black", "panel": "cyan"},
        ),
        ObjectTemplate("teapot", _teapot, "lid", "lid", False, ("white", "black", "yellow", "blue", "red")),
    ]
}


# --------------------------------------------------------------------------------------------------
# Assets
# --------------------------------------------------------------------------------------------------

AssetKey = Tuple


@dataclass(eq=False)
class Asset:
    """One coloured asset: a CSG tree whose parts each have a named colour.

    ``colour_names`` maps part -> colour name (details included); ``parts`` lists the part names and
    part ids index it; ``dominant_colour`` is the colour covering the most pixels over four side
    views (azimuth 0/90/180/270, elevation 15).
    """

    caption: str
    key: AssetKey
    tree: SDFNode
    colour_names: Dict[str, str]

    def __post_init__(self) -> None:
        self.parts: List[str] = list(self.colour_names)
        self.part_ids: Dict[str, int] = {name: i for i, name in enumerate(self.parts)}
        self._palettes: Dict[Tuple, Tensor] = {}

    @property
    def kind(self) -> str:
        """The asset kind: "primitive", "object" or "stack"."""
        return self.key[0]

    def palette(self, device: torch.device = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Part id -> RGB albedo, (n_parts, 3)."""
        cache_key = (device, dtype)
        if cache_key not in self._palettes:
            colours = [NAMED_COLOURS[self.colour_names[part]] for part in self.parts]
            self._palettes[cache_key] = torch.tensor(colours, dtype=dtype, device=device)
        return self._palettes[cache_key]

    def sdf(self, points: Tensor) -> Tensor:
        """Signed distance (N,) at world points (N, 3); negative inside."""
        return self.tree.distance(points)

    def sdf_and_part(self, points: Tensor) -> Tuple[Tensor, Tensor]:
        """Signed distance (N,) and part id (N,) (index into ``parts``) of the nearest part."""
        return self.tree.distance_and_part(points, self.part_ids)

    def albedo(self, points: Tensor) -> Tensor:
        """Colour (N, 3) in [0, 1] of the part nearest to each point."""
        _, part = self.sdf_and_part(points)
        return self.palette(points.device, points.dtype)[part]

    def bounds(self) -> Tuple[Tensor, Tensor]:
        """Conservative axis-aligned bounding box (lo (3,), hi (3,)) as float tensors."""
        lo, hi = self.tree.bounds()
        return torch.tensor(lo, dtype=torch.float32), torch.tensor(hi, dtype=torch.float32)

    def stretched(self, scale: Sequence[float]) -> "Asset":
        """The same asset scaled by ``scale`` (x, y, z) about its centre (shape variety for training;
        its caption stays: the colours and the kind of object do not change)."""
        return Asset(self.caption, self.key, Stretch(self.tree, tuple(float(s) for s in scale)), dict(self.colour_names))

    def recoloured(self, colour_names: Dict[str, str]) -> "Asset":
        """The same shape with other part colours (``colour_names``: part -> colour name, every part)."""
        if set(colour_names) != set(self.colour_names) or not set(colour_names.values()) <= set(NAMED_COLOURS):
            raise ValueError(f"recoloured needs a named colour for each of the parts {self.parts}, got {colour_names}")
        return Asset(self.caption, self.key, self.tree, dict(colour_names))

    def paraphrases(self, count: int = 8) -> List[str]:
        """Up to ``count`` deterministic rewordings of the caption that parse back to this asset."""
        from threestudio_mv.data.procedural.captions import paraphrases

        return paraphrases(self.caption, count)

    @functools.cached_property
    def dominant_colour(self) -> str:
        """Name of the colour that covers most of the asset in four side views."""
        from threestudio_mv.data.procedural.render import part_coverage

        coverage = part_coverage(self)
        per_colour: Dict[str, float] = {}
        for part, pixels in zip(self.parts, coverage.tolist()):
            colour = self.colour_names[part]
            per_colour[colour] = per_colour.get(colour, 0.0) + pixels
        return max(per_colour, key=per_colour.get)

    def spec(self) -> dict:
        """JSON-able description: key, part colours and the CSG tree."""
        return {
            "kind": self.kind,
            "key": list(self.key),
            "colours": dict(self.colour_names),
            "tree": self.tree.to_spec(),
        }


def build_asset(key: AssetKey, caption: str) -> Asset:
    """Build the asset named by ``key`` (see the module docstring) with its canonical ``caption``."""
    kind = key[0]
    if kind == "primitive":
        _, shape, colour = key
        node, _ = shape_node(shape, "body", 0.45, 0.45)
        return Asset(caption, key, node, {"body": colour})
    if kind == "stack":
        _, top_shape, top_colour, bottom_shape, bottom_colour = key
        _, bottom_half = shape_node(bottom_shape, "bottom", 0.36, 0.24)
        _, top_half = shape_node(top_shape, "top", 0.2, 0.2)
        # The top rests on the bottom; the pair spans [-(b + t), b + t] with the bottom centre at -t.
        bottom, _ = shape_node(bottom_shape, "bottom", 0.36, 0.24, z=-top_half)
        top, _ = shape_node(top_shape, "top", 0.2, 0.2, z=bottom_half)
        return Asset(caption, key, Union([bottom, top]), {"bottom": bottom_colour, "top": top_colour})
    if kind == "object":
        _, name, colour, part_colour = key
        template = OBJECTS[name]
        colours = {}
        for part in template.all_parts():
            if part in template.details:
                colours[part] = template.details[part]
            elif part == template.named_part and part_colour is not None:
                colours[part] = part_colour
            else:
                colours[part] = colour
        return Asset(caption, key, template.build(), colours)
    raise ValueError(f"unknown asset kind '{kind}'")

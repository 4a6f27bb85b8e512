"""Procedural rooms for text-to-panorama: box rooms with named colours, windows, a door and furniture.

A room is a box around the camera (world z up, camera at the origin, floor below, ceiling above)
with walls, floor and ceiling in named colours (:mod:`~threestudio_mv.data.procedural.colours`),
one to three windows (sky seen through them), a door, floor planks and one or two furniture boxes
(a sofa, a cabinet, a table, a bed) in named colours. Geometry (sizes, placements) comes from a seed;
the caption names the three surface colours only:

    "a room with red walls, a brown floor and a white ceiling"

Paraphrases swap in colour synonyms (reused from :mod:`~threestudio_mv.data.procedural.captions`)
and reword the sentence. Held-out split (fixed rule, no randomness): a (wall, floor) colour pair is held
out when ``(wall + 3 * floor) % 8 == 0`` (indices into COLOUR_NAMES), with every ceiling colour; every
colour keeps many training pairs as a wall and as a floor.

Rendering is analytic (ray-box slab tests, vectorised in torch): the 8 perspective views of
MVDiffusion (90-degree FOV, yaw ``theta0 + 45 i``), the equirectangular ground truth and its depth.
"""
import functools
import random
import re
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from threestudio_mv.data.procedural.captions import COLOUR_SYNONYMS
from threestudio_mv.data.procedural.colours import COLOUR_NAMES, NAMED_COLOURS
from threestudio_mv.utils import camera

CEILING_COLOURS = ("white", "gray", "yellow", "black")
SPLITS = ("all", "train", "heldout")
FOV_DEG = 90.0
N_VIEW = 8
SKY = (0.62, 0.80, 0.98)
WOOD = (0.42, 0.26, 0.12)
# Constant shading per surface orientation (walls +x, -x, +y, -y, floor, ceiling): flat enough that
# every surface keeps its named colour, varied enough that corners show.
SURFACE_SHADE = (1.0, 0.9, 0.95, 0.85, 0.88, 0.97)
FURNITURE = {  # name: (length, depth, height) ranges scale these
    "sofa": (1.6, 0.7, 0.65),
    "cabinet": (0.7, 0.45, 1.5),
    "table": (1.1, 0.6, 0.7),
    "bed": (1.6, 1.1, 0.5),
}

RoomKey = Tuple[str, str, str]  # wall, floor, ceiling colour names

TEMPLATES = (
    "a room with {w} walls, {f} floor and {c} ceiling",
    "a room with {w} walls, {f} floor and {c} ceiling",
    "an interior with {w} walls, {f} floor and {c} ceiling",
    "a 360 degree panorama of a room with {w} walls, {f} floor and {c} ceiling",
    "a cozy room with {w} walls, {f} floor and {c} ceiling",
    "inside a room: {w} walls, {f} floor, {c} ceiling",
    "a room whose walls are {w}, with {f} floor and {c} ceiling",
    "a room with {f} floor, {w} walls and {c} ceiling",
    "a bedroom with {w} walls, {f} floor and {c} ceiling",
    "a living room with {w} painted walls, {f} floor and {c} ceiling",
)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def room_caption(key: RoomKey) -> str:
    """The canonical caption of a room key."""
    wall, floor, ceiling = key
    return f"a room with {wall} walls, {_article(floor)} {floor} floor and {_article(ceiling)} {ceiling} ceiling"


def is_held_out(key: RoomKey) -> bool:
    """The fixed held-out rule on the (wall, floor) colour pair."""
    return (COLOUR_NAMES.index(key[0]) + 3 * COLOUR_NAMES.index(key[1])) % 8 == 0


@functools.lru_cache(maxsize=None)
def room_keys(split: str = "all") -> Tuple[RoomKey, ...]:
    """Room keys of ``split`` ("all", "train", "heldout") in a fixed order (wall != floor)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}'; choose one of {SPLITS}")
    keys = [(w, f, c) for w in COLOUR_NAMES for f in COLOUR_NAMES if f != w for c in CEILING_COLOURS]
    if split == "all":
        return tuple(keys)
    return tuple(k for k in keys if is_held_out(k) == (split == "heldout"))


def room_paraphrases(key: RoomKey, count: int = 8) -> List[str]:
    """Up to ``count`` distinct rewordings of the room's caption (deterministic per key)."""
    canonical = room_caption(key)
    rng = random.Random(zlib.crc32(canonical.encode()))

    def colour(name: str) -> str:
        return rng.choice(COLOUR_SYNONYMS[name]) if rng.random() < 0.6 else name

    results: List[str] = []
    for _ in range(20 * count):
        if len(results) >= count:
            break
        wall, floor, ceiling = (colour(name) for name in key)
        text = rng.choice(TEMPLATES).format(
            w=wall, f=f"{_article(floor)} {floor}", c=f"{_article(ceiling)} {ceiling}"
        )
        text = re.sub(r"\s+", " ", text)
        if text != canonical and text not in results:
            results.append(text)
    return results


@dataclass(frozen=True)
class Box:
    """An axis-aligned box [lo, hi] with an RGB colour."""

    lo: Tuple[float, float, float]
    hi: Tuple[float, float, float]
    colour: Tuple[float, float, float]


@dataclass(frozen=True)
class Rect:
    """A rectangle on wall ``wall`` (0: +x, 1: -x, 2: +y, 3: -y): horizontal span ``u`` along the wall
    (world y for x-walls, world x for y-walls) and vertical span ``z``, with a colour."""

    wall: int
    u: Tuple[float, float]
    z: Tuple[float, float]
    colour: Tuple[float, float, float]


@dataclass(frozen=True)
class Room:
    """A box room around the origin: half extents, floor/ceiling heights, colours and contents."""

    key: RoomKey
    half_x: float
    half_y: float
    floor_z: float
    ceiling_z: float
    rects: Tuple[Rect, ...]
    furniture: Tuple[Box, ...]

    @property
    def caption(self) -> str:
        return room_caption(self.key)


def build_room(key: RoomKey, seed: int) -> Room:
    """A room of colours ``key`` with geometry drawn from ``seed``."""
    rng = random.Random(seed)
    half_x, half_y = rng.uniform(2.0, 3.2), rng.uniform(2.0, 3.2)
    floor_z, ceiling_z = -rng.uniform(1.0, 1.3), rng.uniform(1.0, 1.3)
    halves = (half_y, half_y, half_x, half_x)  # half length of wall k along its u axis
    walls = list(range(4))
    rng.shuffle(walls)
    rects: List[Rect] = []
    door_wall = walls[0]
    centre = rng.uniform(-0.5, 0.5) * halves[door_wall]
    rects.append(Rect(door_wall, (centre - 0.45, centre + 0.45), (floor_z, floor_z + 2.0), WOOD))
    for wall in walls[1 : 1 + rng.randint(1, 3)]:
        width = rng.uniform(0.8, 1.6)
        centre = rng.uniform(-0.5, 0.5) * (halves[wall] - width / 2)
        bottom = rng.uniform(-0.3, 0.0)
        rects.append(Rect(wall, (centre - width / 2, centre + width / 2), (bottom, bottom + rng.uniform(0.6, 0.9)), SKY))
    furniture: List[Box] = []
    used = {door_wall}
    for _ in range(rng.randint(1, 2)):
        wall = rng.choice([w for w in range(4) if w not in used])
        used.add(wall)
        length, depth, height = (s * rng.uniform(0.85, 1.15) for s in FURNITURE[rng.choice(sorted(FURNITURE))])
        colour = NAMED_COLOURS[rng.choice([c for c in COLOUR_NAMES if c not in key[:2]])]
        centre = rng.uniform(-0.4, 0.4) * (halves[wall] - length / 2)
        u = (centre - length / 2, centre + length / 2)
        if wall < 2:
            x_face = half_x if wall == 0 else -half_x
            x = (x_face - depth, x_face) if wall == 0 else (x_face, x_face + depth)
            lo, hi = (x[0], u[0], floor_z), (x[1], u[1], floor_z + height)
        else:
            y_face = half_y if wall == 2 else -half_y
            y = (y_face - depth, y_face) if wall == 2 else (y_face, y_face + depth)
            lo, hi = (u[0], y[0], floor_z), (u[1], y[1], floor_z + height)
        furniture.append(Box(lo, hi, colour))
    return Room(key, half_x, half_y, floor_z, ceiling_z, tuple(rects), tuple(furniture))


def trace_room(room: Room, directions: Tensor) -> Tuple[Tensor, Tensor]:
    """Colour (..., 3) in [0, 1] and depth (..., ) (distance along the ray) of rays from the origin
    with directions (..., 3) (any length; normalised here)."""
    shape = directions.shape[:-1]
    d = torch.nn.functional.normalize(directions.reshape(-1, 3).float(), dim=-1)
    safe = torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    lo = torch.tensor([-room.half_x, -room.half_y, room.floor_z])
    hi = torch.tensor([room.half_x, room.half_y, room.ceiling_z])
    # Inside the box every ray leaves through the plane its direction points at, per axis.
    t_axis = torch.where(safe > 0, hi / safe, lo / safe)
    t, axis = t_axis.min(dim=-1)
    positive = torch.gather(safe > 0, 1, axis[:, None])[:, 0]
    surface = torch.where(axis == 0, torch.where(positive, 0, 1), torch.where(axis == 1, torch.where(positive, 2, 3), torch.where(positive, 5, 4)))
    colours = torch.tensor([NAMED_COLOURS[room.key[0]]] * 4 + [NAMED_COLOURS[room.key[1]], NAMED_COLOURS[room.key[2]]])
    rgb = colours[surface]
    points = d * t[:, None]
    # Floor planks: stripes 0.35 apart along x, alternately 6 % darker.
    plank = (torch.floor(points[:, 0] / 0.35) % 2 == 1) & (surface == 4)
    rgb = torch.where(plank[:, None], rgb * 0.94, rgb)
    for rect in room.rects:
        u = points[:, 1] if rect.wall < 2 else points[:, 0]
        inside = (surface == rect.wall) & (u >= rect.u[0]) & (u <= rect.u[1]) & (points[:, 2] >= rect.z[0]) & (points[:, 2] <= rect.z[1])
        rgb = torch.where(inside[:, None], torch.tensor(rect.colour), rgb)
    shade = torch.tensor(SURFACE_SHADE)[surface]
    for box in room.furniture:
        box_lo, box_hi = torch.tensor(box.lo), torch.tensor(box.hi)
        t0, t1 = box_lo / safe, box_hi / safe
        t_near, near_axis = torch.minimum(t0, t1).max(dim=-1)
        t_far = torch.maximum(t0, t1).min(dim=-1).values
        hit = (t_near <= t_far) & (t_near > 0) & (t_near < t)
        # The face hit: the near plane's axis; its sign is opposite to the ray direction there.
        axis_positive = torch.gather(safe > 0, 1, near_axis[:, None])[:, 0]
        face = torch.where(near_axis == 0, torch.where(axis_positive, 1, 0), torch.where(near_axis == 1, torch.where(axis_positive, 3, 2), 5))
        t = torch.where(hit, t_near, t)
        rgb = torch.where(hit[:, None], torch.tensor(box.colour), rgb)
        shade = torch.where(hit, torch.tensor(SURFACE_SHADE)[face], shade)
    return (rgb * shade[:, None]).clamp(0.0, 1.0).reshape(*shape, 3), t.reshape(shape)


def view_directions(yaws: Tensor, size: int, supersample: int = 1) -> Tensor:
    """World ray directions (V, S*size, S*size, 3) of level 90-degree views at ``yaws`` (degrees)."""
    n = size * supersample
    fovy = torch.full((yaws.shape[0],), FOV_DEG)
    _, rays_d = camera.get_rays(camera.camera_ray_directions(n, n, fovy), camera.yaw_c2w(yaws), normalize=False)
    return rays_d


def render_views(room: Room, yaws: Tensor, size: int = 32, supersample: int = 2) -> Dict[str, Tensor]:
    """The room seen from its centre at ``yaws`` (V,) degrees: ``images`` (V, size, size, 3) in [0, 1]
    (``supersample`` x ``supersample`` rays per pixel, averaged), ``depth`` (V, size, size), ``c2w``."""
    rgb, depth = trace_room(room, view_directions(yaws, size, supersample))
    pool = lambda x: torch.nn.functional.avg_pool2d(x, supersample)  # noqa: E731
    images = pool(rgb.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    depth = pool(depth[:, None])[:, 0]
    return {"images": images, "depth": depth, "c2w": camera.yaw_c2w(yaws)}


def render_equirect(room: Room, height: int = 64, supersample: int = 2) -> Dict[str, Tensor]:
    """Equirectangular ground truth (2:1): ``image`` (H, 2H, 3) and ``depth`` (H, 2H)."""
    s = supersample
    rgb, depth = trace_room(room, camera.equirect_directions(height * s, 2 * height * s))
    image = torch.nn.functional.avg_pool2d(rgb.permute(2, 0, 1)[None], s)[0].permute(1, 2, 0)
    depth = torch.nn.functional.avg_pool2d(depth[None, None], s)[0, 0]
    return {"image": image, "depth": depth}


def sample_rooms(
    count: int, split: str = "train", generator: Optional[random.Random] = None, size: int = 32,
    random_yaw: bool = True, n_view: int = N_VIEW,
) -> Dict[str, object]:
    """``count`` random rooms of ``split`` rendered as ``n_view`` views each (views of a room contiguous):
    ``images`` (count*n_view, size, size, 3), ``yaw`` (count*n_view,), ``keys`` (count,)."""
    rng = generator or random.Random()
    keys = room_keys(split)
    images, yaws, chosen = [], [], []
    for _ in range(count):
        key = keys[rng.randrange(len(keys))]
        start = rng.uniform(0.0, 360.0) if random_yaw else 0.0
        view_yaws = camera.panorama_yaws(n_view, start)
        images.append(render_views(build_room(key, rng.randrange(1 << 30)), view_yaws, size)["images"])
        yaws.append(view_yaws)
        chosen.append(key)
    return {"images": torch.cat(images), "yaw": torch.cat(yaws), "keys": chosen}


def caption_choices(key: RoomKey) -> Sequence[str]:
    """The canonical caption and its paraphrases (what training draws prompts from)."""
    return (room_caption(key), *room_paraphrases(key))

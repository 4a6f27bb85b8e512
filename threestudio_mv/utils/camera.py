"""Camera math: the only place where camera conventions live (see docs/conventions.md).

World: right-handed, z up. Camera: OpenGL axes (x right, y up, looking down -z). ``c2w`` is 4x4 with
columns right, up, back (= -forward), position. Azimuth 0 deg views the object from +x, azimuth grows
counter-clockwise seen from +z, elevation is positive above the equator. Angles are in degrees.
Pixel (row i, column j) has its centre at (j + 0.5, i + 0.5); row 0 is the top of the image.
"""
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from threestudio_mv.utils.errors import UserError

Number = Union[float, Tensor]


def _as_tensor(value: Number, like: Tensor = None) -> Tensor:
    if isinstance(value, Tensor):
        return value.float()
    device = like.device if like is not None else None
    return torch.tensor(float(value), device=device)


def spherical_to_position(elevation: Tensor, azimuth: Tensor, distance: Tensor) -> Tensor:
    """(B,) degrees, degrees, units -> (B, 3) camera positions around the origin."""
    elevation, azimuth = torch.deg2rad(elevation.float()), torch.deg2rad(azimuth.float())
    return torch.stack(
        [
            distance * torch.cos(elevation) * torch.cos(azimuth),
            distance * torch.cos(elevation) * torch.sin(azimuth),
            distance * torch.sin(elevation),
        ],
        dim=-1,
    )


def look_at_c2w(position: Tensor, target: Tensor = None) -> Tensor:
    """(B, 3) camera positions looking at ``target`` (default origin) with world up +z -> (B, 4, 4)."""
    if target is None:
        target = torch.zeros_like(position)
    forward = torch.nn.functional.normalize(target - position, dim=-1)
    world_up = torch.tensor([0.0, 0.0, 1.0], device=position.device).expand_as(forward)
    right = torch.linalg.cross(forward, world_up, dim=-1)
    # Straight above or below: any horizontal right vector will do; use +y.
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    right = torch.where(degenerate, torch.tensor([0.0, 1.0, 0.0], device=position.device), right)
    right = torch.nn.functional.normalize(right, dim=-1)
    up = torch.linalg.cross(right, forward, dim=-1)
    c2w = torch.zeros(position.shape[0], 4, 4, device=position.device)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, up, -forward, position
    c2w[:, 3, 3] = 1.0
    return c2w


def c2w_from_spherical(elevation: Tensor, azimuth: Tensor, distance: Tensor) -> Tensor:
    """Cameras on a sphere looking at the origin: (B,) each -> (B, 4, 4)."""
    return look_at_c2w(spherical_to_position(elevation, azimuth, distance))


def focal_from_fovy(fovy: Tensor, height: int) -> Tensor:
    """Focal length in pixels for a vertical field of view in degrees."""
    return 0.5 * height / torch.tan(0.5 * torch.deg2rad(fovy.float()))


def distance_for_fovy(relative_distance: Tensor, fovy: Tensor) -> Tensor:
    """MVDream's ``relative_radius``: scale a distance by 1/tan(fovy/2) so framing is FOV-independent."""
    return relative_distance / torch.tan(0.5 * torch.deg2rad(fovy.float()))


def camera_ray_directions(height: int, width: int, fovy: Tensor) -> Tensor:
    """Unnormalised camera-space ray directions through pixel centres: (B, H, W, 3)."""
    fovy = fovy.reshape(-1).float()
    focal = focal_from_fovy(fovy, height).view(-1, 1, 1)
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=fovy.device) + 0.5,
        torch.arange(width, dtype=torch.float32, device=fovy.device) + 0.5,
        indexing="ij",
    )
    x = (cols - 0.5 * width) / focal
    y = -(rows - 0.5 * height) / focal
    return torch.stack([x, y, -torch.ones_like(x)], dim=-1)


def get_rays(directions: Tensor, c2w: Tensor, normalize: bool = True) -> Tuple[Tensor, Tensor]:
    """Camera-space directions (B, H, W, 3) and c2w (B, 4, 4) -> world rays_o, rays_d (B, H, W, 3)."""
    rays_d = torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3], directions)
    if normalize:
        rays_d = torch.nn.functional.normalize(rays_d, dim=-1)
    rays_o = c2w[:, None, None, :3, 3].expand_as(rays_d)
    return rays_o, rays_d


def projection_matrix(fovy: Tensor, aspect: float = 1.0, near: float = 0.01, far: float = 100.0) -> Tensor:
    """OpenGL perspective projection: (B,) fovy degrees -> (B, 4, 4)."""
    fovy = fovy.reshape(-1).float()
    f = 1.0 / torch.tan(0.5 * torch.deg2rad(fovy))
    proj = torch.zeros(fovy.shape[0], 4, 4, device=fovy.device)
    proj[:, 0, 0] = f / aspect
    proj[:, 1, 1] = f
    proj[:, 2, 2] = -(far + near) / (far - near)
    proj[:, 2, 3] = -2.0 * far * near / (far - near)
    proj[:, 3, 2] = -1.0
    return proj


def mvp_matrix(c2w: Tensor, fovy: Tensor, aspect: float = 1.0) -> Tensor:
    """World -> clip space: projection @ inverse(c2w), (B, 4, 4)."""
    return projection_matrix(fovy, aspect) @ torch.linalg.inv(c2w)


def project_points(points: Tensor, c2w: Tensor, fovy: Tensor, height: int, width: int) -> Tensor:
    """World points (N, 3), one camera (4, 4) -> pixel coordinates (N, 2) as (column, row), and depth.

    Returns (N, 3): column, row (continuous, pixel centres at +0.5) and depth along -z.
    """
    w2c = torch.linalg.inv(c2w)
    cam = points @ w2c[:3, :3].T + w2c[:3, 3]
    depth = -cam[:, 2]
    focal = focal_from_fovy(_as_tensor(fovy), height)
    col = cam[:, 0] / depth * focal + 0.5 * width
    row = -cam[:, 1] / depth * focal + 0.5 * height
    return torch.stack([col, row, depth], dim=-1)


def wrap_degrees(angle: Tensor) -> Tensor:
    """Angles (degrees) into [-180, 180), the range the training camera sampler returns azimuths in."""
    return (angle + 180.0) % 360.0 - 180.0


def view_azimuths(n_view: int, azimuth_start: Number = 0.0) -> Tensor:
    """Azimuths of ``n_view`` views of one object, 360/n_view apart, starting at ``azimuth_start``."""
    start = _as_tensor(azimuth_start)
    return start + torch.arange(n_view, dtype=torch.float32) * (360.0 / n_view)


def mvdream_camera_condition(c2w: Tensor) -> Tensor:
    """MVDream's camera condition: translation scaled to unit length, 4x4 flattened to 16 numbers.

    Works on a copy, never on the batch's tensor. Only rotation is seen (no FOV, no distance).
    """
    cond = c2w.clone().float()
    translation = cond[:, :3, 3]
    cond[:, :3, 3] = translation / translation.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return cond.reshape(-1, 16)


def sample_view_groups(
    n_groups: int,
    n_view: int,
    elevation_range: Tuple[float, float] = (0.0, 30.0),
    fovy_range: Tuple[float, float] = (30.0, 50.0),
    relative_distance_range: Tuple[float, float] = (0.85, 1.0),
    relative_radius: bool = True,
    generator: torch.Generator = None,
) -> dict:
    """Random cameras in groups of ``n_view`` views of one object (MVDream's training layout).

    Per group: one elevation (uniform in the range), one fovy, one distance (scaled by 1/tan(fovy/2)
    when ``relative_radius``, so the object fills the frame alike at any FOV) and a random start
    azimuth; the group's views are 360/n_view degrees apart. Views of a group are contiguous.
    Returns (B,) ``elevation``, ``azimuth`` (in [-180, 180)), ``camera_distances``, ``fovy`` and
    (B, 4, 4) ``c2w``, with B = n_groups * n_view.
    """

    def uniform(low: float, high: float) -> Tensor:
        return low + (high - low) * torch.rand(n_groups, generator=generator)

    elevation = uniform(*elevation_range)
    fovy = uniform(*fovy_range)
    distance = uniform(*relative_distance_range)
    if relative_radius:
        distance = distance_for_fovy(distance, fovy)
    start = uniform(-180.0, 180.0)
    offsets = torch.arange(n_view, dtype=torch.float32) * (360.0 / n_view)
    azimuth = wrap_degrees(start[:, None] + offsets[None, :])
    per_view = lambda x: x[:, None].expand(n_groups, n_view).reshape(-1)  # noqa: E731
    elevation, fovy, distance, azimuth = per_view(elevation), per_view(fovy), per_view(distance), azimuth.reshape(-1)
    return {
        "elevation": elevation,
        "azimuth": azimuth,
        "camera_distances": distance,
        "fovy": fovy,
        "c2w": c2w_from_spherical(elevation, azimuth, distance),
    }


def view_group(
    n_view: int,
    elevation: float = 15.0,
    azimuth_start: float = 0.0,
    fovy: float = 40.0,
    relative_distance: float = 0.92,
    distance: Optional[float] = None,
) -> dict:
    """One object's ``n_view`` views 360/n_view apart at a fixed elevation and FOV (sampling, eval,
    turntables): the one orbit of the package.

    The distance is ``relative_distance / tan(fovy / 2)`` as in :func:`sample_view_groups`, so the
    object is framed as in training, unless ``distance`` is given. Returns (n_view,) ``elevation``,
    ``azimuth`` (degrees from ``azimuth_start`` on), ``camera_distances``, ``fovy`` and (n_view, 4, 4) ``c2w``.
    """
    azimuth = view_azimuths(n_view, azimuth_start)
    elevations = torch.full((n_view,), float(elevation))
    fovys = torch.full((n_view,), float(fovy))
    if distance is None:
        distances = distance_for_fovy(torch.full((n_view,), float(relative_distance)), fovys)
    else:
        distances = torch.full((n_view,), float(distance))
    return {
        "elevation": elevations,
        "azimuth": azimuth,
        "camera_distances": distances,
        "fovy": fovys,
        "c2w": c2w_from_spherical(elevations, azimuth, distances),
    }


def ray_box_intersection(rays_o: Tensor, rays_d: Tensor, lo: Union[Tensor, float], hi: Union[Tensor, float]) -> Tuple[Tensor, Tensor, Tensor]:
    """Entry and exit distances of rays (N, 3) through the box [lo, hi] (slab method; scalars or (3,)).

    Returns near (N,), far (N,) (near >= 0) and hit (N,) bool; misses get near = far = 0.
    """
    inv_d = 1.0 / torch.where(rays_d.abs() < 1e-10, torch.full_like(rays_d, 1e-10), rays_d)
    t0, t1 = (lo - rays_o) * inv_d, (hi - rays_o) * inv_d
    near = torch.minimum(t0, t1).amax(dim=-1).clamp(min=0.0)
    far = torch.maximum(t0, t1).amin(dim=-1)
    hit = far > near
    return torch.where(hit, near, 0.0), torch.where(hit, far, 0.0), hit


def spherical_from_position(position: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`spherical_to_position`: (B, 3) -> (B,) elevation, azimuth in [-180, 180), distance."""
    distance = position.norm(dim=-1)
    elevation = torch.rad2deg(torch.asin((position[:, 2] / distance.clamp_min(1e-12)).clamp(-1.0, 1.0)))
    azimuth = torch.rad2deg(torch.atan2(position[:, 1], position[:, 0]))
    azimuth = wrap_degrees(azimuth)
    return elevation, azimuth, distance


def fovy_from_fovx(fovx: Number, width: int, height: int) -> Tensor:
    """Vertical field of view (degrees) of a square-pixel camera with horizontal FOV ``fovx`` (degrees)."""
    half_x = 0.5 * torch.deg2rad(_as_tensor(fovx))
    return torch.rad2deg(2.0 * torch.atan(torch.tan(half_x) * height / width))


# A light that follows the camera is placed this far along its direction: a point light this far
# away lights the object (extent ~1) like the renderer's directional light, within 0.3 degrees.
CAMERA_LIGHT_DISTANCE = 100.0


@dataclass(frozen=True)
class CameraLight:
    """A directional light fixed in the camera frame, as the procedural renders are lit (the default
    is their light): ``direction_camera`` (x right, y up, z towards the viewer; from the surface to the
    light) and ``ambient_ratio`` (ambient = ratio, diffuse = 1 - ratio). Shading materials lit by it
    recover the unlit albedo of images rendered with it."""

    direction_camera: Tuple[float, float, float] = (0.45, 0.75, 1.0)
    ambient_ratio: float = 0.55

    @property
    def is_valid(self) -> bool:
        """A non-zero direction and an ambient ratio in [0, 1]."""
        return any(v != 0 for v in self.direction_camera) and 0.0 <= self.ambient_ratio <= 1.0

    def shade(self, normals: Tensor, camera_rotation: Tensor) -> Tensor:
        """Lambert + ambient shade factor (N,) of world-space unit ``normals`` (N, 3) seen by cameras
        whose c2w rotation is ``camera_rotation`` ((3, 3), or (N, 3, 3) one per normal)."""
        direction = torch.nn.functional.normalize(torch.tensor(self.direction_camera, device=normals.device), dim=0)
        light_world = camera_rotation @ direction
        diffuse = (normals * light_world).sum(dim=-1).clamp_min(0.0)
        return self.ambient_ratio + (1.0 - self.ambient_ratio) * diffuse


def camera_light_positions(c2w: Tensor, light: CameraLight) -> Tensor:
    """Point-light positions (B, 3) standing in for ``light`` in the views ``c2w`` (B, 4, 4)."""
    direction = torch.nn.functional.normalize(torch.tensor(light.direction_camera, dtype=c2w.dtype, device=c2w.device), dim=0)
    return c2w[:, :3, 3] + (c2w[:, :3, :3] @ direction) * CAMERA_LIGHT_DISTANCE


def sample_light_positions(
    camera_positions: Tensor,
    distance_range: Tuple[float, float] = (0.8, 1.5),
    strategy: str = "dreamfusion",
    perturb: float = 1.0,
    generator: torch.Generator = None,
) -> Tensor:
    """Point-light positions (B, 3) for cameras at ``camera_positions`` (B, 3).

    ``"dreamfusion"``: along the camera direction jittered by Gaussian noise of std ``perturb``, at a
    distance uniform in ``distance_range`` (DreamFusion's shading augmentation). ``"camera"``: at the
    camera itself (a head light).
    """
    if strategy == "camera":
        return camera_positions.clone()
    if strategy != "dreamfusion":
        raise ValueError(f"unknown light sampling strategy '{strategy}' (use 'dreamfusion' or 'camera')")
    batch = camera_positions.shape[0]
    noise = torch.randn(batch, 3, generator=generator).to(camera_positions)
    direction = torch.nn.functional.normalize(camera_positions + perturb * noise, dim=-1)
    low, high = distance_range
    distance = (low + (high - low) * torch.rand(batch, generator=generator)).to(camera_positions)
    return direction * distance[:, None]


# --- Panoramas: yaw cameras at the room centre, equirectangular images, rotation homographies ------
# Equirectangular convention: column u (centre u + 0.5) has longitude 180 - 360 (u + 0.5) / W degrees
# (longitude = yaw = atan2(y, x): the image centre looks along +x and the panorama reads left to right
# as a viewer turning clockwise, i.e. to the right); row v has latitude 90 - 180 (v + 0.5) / H (top = up).
# Pixel homographies use image coordinates (x right, y down, pixel centres at +0.5), as K does.


def yaw_c2w(yaw: Tensor, position: Tensor = None) -> Tensor:
    """Level cameras (pitch 0, world up +z) looking along yaw (B,) degrees, i.e. direction
    (cos yaw, sin yaw, 0), at ``position`` (B, 3) (default the origin) -> (B, 4, 4) OpenGL c2w."""
    yaw = torch.deg2rad(yaw.reshape(-1).float())
    c2w = torch.zeros(yaw.shape[0], 4, 4, device=yaw.device)
    c2w[:, 0, 0], c2w[:, 1, 0] = torch.sin(yaw), -torch.cos(yaw)  # right
    c2w[:, 2, 1] = 1.0  # up
    c2w[:, 0, 2], c2w[:, 1, 2] = -torch.cos(yaw), -torch.sin(yaw)  # back = -forward
    if position is not None:
        c2w[:, :3, 3] = position
    c2w[:, 3, 3] = 1.0
    return c2w


def panorama_yaws(n_view: int = 8, yaw_start: Number = 0.0) -> Tensor:
    """Yaws (n_view,) in degrees of a panorama's views: ``yaw_start + i * 360 / n_view``."""
    return view_azimuths(n_view, yaw_start)


def equirect_directions(height: int, width: int) -> Tensor:
    """World unit directions (H, W, 3) through the pixel centres of an equirectangular image."""
    lon = torch.deg2rad(180.0 - 360.0 * (torch.arange(width, dtype=torch.float32) + 0.5) / width)
    lat = torch.deg2rad(90.0 - 180.0 * (torch.arange(height, dtype=torch.float32) + 0.5) / height)
    lat, lon = torch.meshgrid(lat, lon, indexing="ij")
    return torch.stack([torch.cos(lat) * torch.cos(lon), torch.cos(lat) * torch.sin(lon), torch.sin(lat)], dim=-1)


def direction_to_equirect(directions: Tensor, height: int, width: int) -> Tensor:
    """World directions (..., 3) -> continuous equirectangular (column, row) (..., 2), column in [0, W)."""
    d = torch.nn.functional.normalize(directions.float(), dim=-1)
    lon = torch.rad2deg(torch.atan2(d[..., 1], d[..., 0]))
    lat = torch.rad2deg(torch.asin(d[..., 2].clamp(-1.0, 1.0)))
    column = ((180.0 - lon) / 360.0 * width) % width
    row = (90.0 - lat) / 180.0 * height
    return torch.stack([column, row], dim=-1)


def intrinsics_from_fov(fov_deg: float, width: int, height: int) -> Tensor:
    """Pinhole K (3, 3) in image coordinates (x right, y down, pixel centres at +0.5) for a horizontal
    field of view ``fov_deg`` and square pixels."""
    focal = 0.5 * width / torch.tan(torch.deg2rad(torch.tensor(float(fov_deg))) / 2.0)
    return torch.tensor([[float(focal), 0.0, 0.5 * width], [0.0, float(focal), 0.5 * height], [0.0, 0.0, 1.0]])


_GL_TO_CV = torch.diag(torch.tensor([1.0, -1.0, -1.0]))  # OpenGL camera axes <-> image-style (y down, z forward)


def rotation_homography(K: Tensor, c2w_i: Tensor, c2w_j: Tensor) -> Tensor:
    """The pixel homography (3, 3) from view i to view j of cameras sharing a centre: K R_j^-1 R_i K^-1
    (R = c2w's rotation, wrapped in the OpenGL <-> image-axes flip)."""
    R_i, R_j = c2w_i[:3, :3].float(), c2w_j[:3, :3].float()
    return K @ _GL_TO_CV @ R_j.T @ R_i @ _GL_TO_CV @ torch.linalg.inv(K)


def apply_homography(H: Tensor, points: Tensor) -> Tuple[Tensor, Tensor]:
    """Map pixel points (..., 2) by H (3, 3) -> (points (..., 2), in front (...,) bool: positive depth)."""
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], dim=-1) @ H.T
    depth = homogeneous[..., 2]
    mapped = homogeneous[..., :2] / torch.where(depth.abs() < 1e-9, torch.full_like(depth, 1e-9), depth)[..., None]
    return mapped, depth > 0


# --- Novel-view synthesis (MVGenMaster): cameras relative to a reference, Plucker rays ------------


def relative_cameras(c2w: Tensor, reference: Tensor, longest_side: float = 5.0) -> Tuple[Tensor, float]:
    """Cameras ``c2w`` (B, 4, 4) re-expressed in the frame of the ``reference`` camera (4, 4), the
    translations scaled by ``scale`` so that the bounding box of the camera centres has its longest
    side at most ``longest_side`` (MVGenMaster's normalisation; boxes already smaller are kept).
    Returns (relative c2w (B, 4, 4), scale); world points map by ``scale * inv(reference) @ x``."""
    relative = torch.linalg.inv(reference.float())[None] @ c2w.float()
    centres = relative[:, :3, 3]
    extent = float((centres.max(dim=0).values - centres.min(dim=0).values).max()) if c2w.shape[0] > 1 else 0.0
    scale = min(1.0, longest_side / extent) if extent > 0 else 1.0
    relative[:, :3, 3] = relative[:, :3, 3] * scale
    return relative, scale


def plucker_rays(c2w: Tensor, fovy: Tensor, height: int, width: int) -> Tensor:
    """Per-pixel Plucker coordinates (B, 6, H, W) of cameras c2w (B, 4, 4), fovy (B,) degrees:
    the unit ray direction d and the moment o x d, through the pixel centres."""
    rays_o, rays_d = get_rays(camera_ray_directions(height, width, fovy), c2w.float())
    moment = torch.linalg.cross(rays_o, rays_d, dim=-1)
    return torch.cat([rays_d, moment], dim=-1).permute(0, 3, 1, 2).contiguous()


TRAJECTORIES = ("bi_direction", "swing", "free")


def orbit_trajectory(kind: str, count: int, first_c2w: Tensor, d_phi: float, swing_elevation: float = 10.0) -> Tensor:
    """``count`` cameras (count, 4, 4) looking at the origin, at the distance and elevation of
    ``first_c2w`` (4, 4), following MVGenMaster's trajectories in azimuth from that camera's:
    ``free`` sweeps 0 -> +d_phi (excluding 0), ``bi_direction`` sweeps -d_phi -> +d_phi, ``swing``
    swings +-d_phi (a sine) while nodding +-``swing_elevation`` degrees."""
    elevation, azimuth, distance = spherical_from_position(first_c2w[None, :3, 3].float())
    k = torch.arange(count, dtype=torch.float32)
    if kind == "free":
        offsets, nod = d_phi * (k + 1) / count, torch.zeros(count)
    elif kind == "bi_direction":
        offsets, nod = torch.linspace(-d_phi, d_phi, count), torch.zeros(count)
    elif kind == "swing":
        offsets, nod = d_phi * torch.sin(2 * torch.pi * k / count), swing_elevation * torch.sin(4 * torch.pi * k / count)
    else:
        raise ValueError(f"unknown trajectory '{kind}'; use one of {', '.join(TRAJECTORIES)}")
    return c2w_from_spherical((elevation + nod).clamp(-89.0, 89.0), azimuth + offsets, distance.expand(count))


def load_camera_file(path: Union[str, Path], label: str = "cameras") -> Dict[str, Any]:
    """Cameras from a ``transforms.json``-style file: ``c2w`` (N, 4, 4) from each frame's
    ``transform_matrix`` and ``fovy`` (N,) degrees from the frame's ``fovy`` or the file's
    ``camera_angle_x`` (square images), plus the raw ``frames``. A one-line UserError (naming
    ``label``) for a missing or unreadable file, no frames, a matrix that is not a rotation + translation
    or a frame without a FOV. Here rather than in a reader of image folders: it needs no images."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{label} '{path}' does not exist")
    try:
        meta = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"{label} '{path}': not readable JSON ({type(error).__name__})") from None
    frames = meta.get("frames") if isinstance(meta, dict) else None
    if not isinstance(frames, list) or not frames:
        raise UserError(f"{label} '{path}' has no frames; give a transforms.json with at least one frame")
    angle = meta.get("camera_angle_x")
    c2w, fovy = [], []
    for index, frame in enumerate(frames):
        try:
            matrix = torch.tensor(frame["transform_matrix"], dtype=torch.float64)
        except (TypeError, ValueError, KeyError, IndexError):
            matrix = torch.zeros(0)
        if matrix.shape != (4, 4) or not bool(torch.isfinite(matrix).all()):
            raise UserError(f"{label} '{path}': frame {index} needs a 4x4 'transform_matrix' of numbers")
        rotation = matrix[:3, :3]
        rigid = torch.allclose(rotation.T @ rotation, torch.eye(3, dtype=torch.float64), atol=1e-3) and bool(torch.det(rotation) > 0)
        if not rigid or not torch.allclose(matrix[3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-6):
            raise UserError(f"{label} '{path}': frame {index} 'transform_matrix' is not a rotation + translation")
        value = frame.get("fovy", math.degrees(angle) if isinstance(angle, (int, float)) else None)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value < 180.0:
            raise UserError(f"{label} '{path}': frame {index} needs 'fovy' (degrees) or the file's 'camera_angle_x'")
        c2w.append(matrix.float())
        fovy.append(float(value))
    return {"c2w": torch.stack(c2w), "fovy": torch.tensor(fovy), "frames": frames}

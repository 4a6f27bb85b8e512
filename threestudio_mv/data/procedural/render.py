"""Sphere-tracing renderer for procedural assets: RGB, alpha, depth and normals for a camera batch.

Rays come from :mod:`threestudio_mv.utils.camera` (OpenGL camera, c2w). Each ray starts where it
enters the asset's bounding box and steps by the SDF value until it is closer to the surface than a
fraction of its pixel footprint (a hit) or leaves the box (a miss). Only rays still marching are
evaluated, so the cost follows the number of unresolved rays, not the image size. Shading is
Lambertian with an ambient term and a light fixed relative to the camera; anti-aliasing is
``supersample`` x ``supersample`` sub-pixels per pixel, averaged.

Written here rather than with a rasteriser library: SDFs (with CSG) render directly by sphere
tracing, with no mesh extraction, and no such library with CPU support is among our dependencies.
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from threestudio_mv.data.procedural.assets import Asset
from threestudio_mv.utils import camera
from threestudio_mv.utils.camera import CameraLight

# Tetrahedral finite-difference stencil for normals (4 SDF evaluations instead of 6).
_TETRAHEDRON = ((1.0, -1.0, -1.0), (-1.0, -1.0, 1.0), (-1.0, 1.0, -1.0), (1.0, 1.0, 1.0))
_NORMAL_STEP = 1e-3
_BOX_PADDING = 0.02
_MAX_RAYS_PER_CHUNK = 1 << 18


def trace_rays(
    asset: Asset, rays_o: Tensor, rays_d: Tensor, pixel_angle: Tensor, max_steps: int = 64
) -> Tuple[Tensor, Tensor]:
    """Sphere-trace rays (N, 3) (unit directions) against the asset.

    ``pixel_angle`` (N,) is the angular size of each ray's pixel; a ray hits when the SDF is below
    0.1 of its footprint (a larger tolerance visibly dilates silhouettes, a smaller one costs steps).
    Returns hit (N,) bool and distance t (N,) along the ray (inf for misses).
    """
    lo, hi = (b.to(rays_o) for b in asset.bounds())
    t_near, t_far, _ = camera.ray_box_intersection(rays_o, rays_d, lo - _BOX_PADDING, hi + _BOX_PADDING)
    hit = torch.zeros(rays_o.shape[0], dtype=torch.bool, device=rays_o.device)
    t_hit = torch.full((rays_o.shape[0],), float("inf"), device=rays_o.device)
    index = torch.nonzero(t_far > t_near).squeeze(-1)
    origins, directions, t, t_end = rays_o[index], rays_d[index], t_near[index], t_far[index]
    tolerance = 0.1 * pixel_angle[index]
    for _ in range(max_steps):
        if index.numel() == 0:
            break
        distance = asset.sdf(torch.addcmul(origins, t[:, None], directions))
        converged = distance < tolerance * t + 1e-5
        t = t + distance
        done = converged | (t > t_end)
        if bool(done.any()):
            hit[index[converged]] = True
            t_hit[index[converged]] = t[converged]
            keep = ~done
            index, origins, directions = index[keep], origins[keep], directions[keep]
            t, t_end, tolerance = t[keep], t_end[keep], tolerance[keep]
    if index.numel() > 0:
        # Out of steps (grazing rays): accept those that ended within a few footprints of the surface.
        distance = asset.sdf(torch.addcmul(origins, t[:, None], directions))
        close = distance < 4.0 * tolerance * t
        hit[index[close]] = True
        t_hit[index[close]] = t[close]
    return hit, t_hit


def surface_normals_and_parts(asset: Asset, points: Tensor) -> Tuple[Tensor, Tensor]:
    """Unit outward normals (M, 3) (tetrahedral finite differences) and part ids (M,) at points."""
    stencil = torch.tensor(_TETRAHEDRON, dtype=points.dtype, device=points.device)
    samples = torch.cat([points[None], points[None] + _NORMAL_STEP * stencil[:, None]], dim=0)
    distance, part = asset.sdf_and_part(samples.reshape(-1, 3))
    distance = distance.reshape(5, -1)
    normals = (distance[1:, :, None] * stencil[:, None, :]).sum(dim=0)
    return torch.nn.functional.normalize(normals, dim=-1), part.reshape(5, -1)[0]


def _render_chunk(
    asset: Asset, c2w: Tensor, fovy: Tensor, resolution: int, light: CameraLight, max_steps: int
) -> Dict[str, Tensor]:
    """Per-sub-pixel hit, straight colour, z-depth, normal and part for views (B, R, R)."""
    batch = c2w.shape[0]
    directions = camera.camera_ray_directions(resolution, resolution, fovy)
    rays_o, rays_d = camera.get_rays(directions, c2w)
    rays_o, rays_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    per_ray = resolution * resolution
    pixel_angle = (2.0 * torch.tan(0.5 * torch.deg2rad(fovy.float())) / resolution).repeat_interleave(per_ray)
    hit, t = trace_rays(asset, rays_o, rays_d, pixel_angle, max_steps)

    n_rays = rays_o.shape[0]
    colour = torch.zeros(n_rays, 3, device=c2w.device)
    normal = torch.zeros(n_rays, 3, device=c2w.device)
    depth = torch.zeros(n_rays, device=c2w.device)
    part = torch.full((n_rays,), -1, dtype=torch.long, device=c2w.device)
    index = torch.nonzero(hit).squeeze(-1)
    if index.numel() > 0:
        points = rays_o[index] + t[index, None] * rays_d[index]
        hit_normal, hit_part = surface_normals_and_parts(asset, points)
        view = torch.div(index, per_ray, rounding_mode="floor")
        shade = light.shade(hit_normal, c2w[view, :3, :3])
        albedo = asset.palette(c2w.device)[hit_part]
        colour[index] = (albedo * shade[:, None]).clamp(0.0, 1.0)
        normal[index] = hit_normal
        forward = -c2w[:, :3, 2]
        depth[index] = t[index] * (rays_d[index] * forward[view]).sum(dim=-1)
        part[index] = hit_part
    shape = (batch, resolution, resolution)
    return {
        "hit": hit.reshape(shape),
        "colour": colour.reshape(*shape, 3),
        "depth": depth.reshape(shape),
        "normal": normal.reshape(*shape, 3),
        "part": part.reshape(shape),
    }


def pool_supersamples(x: Tensor, size: int, factor: int) -> Tensor:
    """Sum (B, S*f, S*f, ...) over f x f blocks -> (B, S, S, ...)."""
    batch, rest = x.shape[0], x.shape[3:]
    return x.reshape(batch, size, factor, size, factor, *rest).sum(dim=(2, 4))


def resolve_supersamples(hit: Tensor, colour: Tensor, size: int, factor: int, background: Tensor) -> Dict[str, Tensor]:
    """Sub-pixel hits (B, S*f, S*f) bool and colours (B, S*f, S*f, 3) (0 where missed) -> ``alpha``
    (coverage), ``rgb_fg`` (straight colour), ``rgb`` (composited over ``background`` (3,)) and
    ``hits`` (covered sub-pixels, >= 1, for averaging other per-hit quantities), each (B, S, S, ...)."""
    hits = pool_supersamples(hit.float(), size, factor)
    alpha = hits / (factor * factor)
    covered = hits.clamp_min(1.0)
    rgb_fg = pool_supersamples(colour, size, factor) / covered[..., None]
    rgb = rgb_fg * alpha[..., None] + background * (1.0 - alpha[..., None])
    return {"rgb": rgb, "rgb_fg": rgb_fg, "alpha": alpha, "hits": covered}


def render_views(
    asset: Asset,
    c2w: Tensor,
    fovy: Tensor,
    size: int,
    background: Sequence[float] = (1.0, 1.0, 1.0),
    light: Optional[CameraLight] = None,
    supersample: int = 2,
    max_steps: int = 64,
) -> Dict[str, Tensor]:
    """Render ``asset`` from cameras c2w (B, 4, 4) with vertical FOV ``fovy`` (B,) in degrees.

    Returns, each (B, S, S, ...) float on the device of ``c2w``:
    ``rgb`` (3) composited over ``background``; ``rgb_fg`` (3) straight (un-premultiplied) shaded
    colour, 0 where nothing is hit; ``alpha`` (coverage of the sub-pixels); ``depth`` (z-depth along the
    camera's view axis, mean over covered sub-pixels, 0 on background); ``normal`` (3) world-space unit
    normal (mean over covered sub-pixels, renormalised; 0 on background).
    """
    light = light or CameraLight()
    c2w = c2w.float()
    fovy = torch.as_tensor(fovy, dtype=torch.float32, device=c2w.device).reshape(-1).expand(c2w.shape[0])
    resolution = size * supersample
    views_per_chunk = max(1, _MAX_RAYS_PER_CHUNK // (resolution * resolution))
    outputs = {key: [] for key in ("rgb", "rgb_fg", "alpha", "depth", "normal")}
    background_t = torch.tensor(background, dtype=torch.float32, device=c2w.device)
    for start in range(0, c2w.shape[0], views_per_chunk):
        chunk = _render_chunk(
            asset, c2w[start : start + views_per_chunk], fovy[start : start + views_per_chunk], resolution, light, max_steps
        )
        resolved = resolve_supersamples(chunk["hit"], chunk["colour"], size, supersample, background_t)
        for key in ("rgb", "rgb_fg", "alpha"):
            outputs[key].append(resolved[key])
        outputs["depth"].append(pool_supersamples(chunk["depth"], size, supersample) / resolved["hits"])
        outputs["normal"].append(torch.nn.functional.normalize(pool_supersamples(chunk["normal"], size, supersample), dim=-1))
    return {key: torch.cat(values, dim=0) for key, values in outputs.items()}


def part_coverage(asset: Asset, size: int = 32) -> Tensor:
    """Pixels (n_parts,) each part covers over four side views (azimuth 0/90/180/270, elevation 15)."""
    cameras = camera.view_group(4)
    chunk = _render_chunk(asset, cameras["c2w"], cameras["fovy"], size, CameraLight(), max_steps=64)
    part = chunk["part"][chunk["hit"]]
    return torch.bincount(part, minlength=len(asset.parts)).float()

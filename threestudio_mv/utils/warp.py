"""Depth warping: back-project pixels through their depth, splat them into other cameras with a z-buffer.

MVGenMaster's priors: every reference pixel with a depth becomes a world point; each point is projected
into every target camera, rounded to the nearest pixel and kept where it is the nearest point of that
pixel over all references (a z-buffer across references). Written here in pure torch because the
operation is a scatter-min over integer pixel indices: PyTorch3D's point rasteriser (the library that
does it) is not among our dependencies and builds CUDA extensions, and kornia's ``warp_frame_depth``
samples the source at the target's depth (an inverse warp), which needs the target depth we lack.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from threestudio_mv.utils.camera import camera_ray_directions, focal_from_fovy


BACK_FACE_COSINE = 0.1  # a point is culled when its normal faces away from the camera by more than this cosine


def backproject(depth: Tensor, c2w: Tensor, fovy: Tensor) -> Tensor:
    """World points (B, H, W, 3) of pixels with z-depth ``depth`` (B, H, W) (distance along the view
    axis) seen by cameras c2w (B, 4, 4) with vertical FOV ``fovy`` (B,) degrees."""
    height, width = depth.shape[-2:]
    directions = camera_ray_directions(height, width, fovy.to(depth.device))  # z = -1: scale by the z-depth
    points = directions * depth[..., None]
    return torch.einsum("bij,bhwj->bhwi", c2w[:, :3, :3].float(), points) + c2w[:, None, None, :3, 3].float()


def depth_normals(depth: Tensor, c2w: Tensor, fovy: Tensor) -> Tensor:
    """World-space unit normals (B, H, W, 3) of a z-depth map (B, H, W) (<= 0: no depth) seen by
    cameras c2w (B, 4, 4), fovy (B,) degrees: the cross product of the back-projected points'
    differences across and down the image (central where both neighbours have depth, else one-sided),
    turned towards the camera; 0 where a pixel has no neighbour with depth along an axis."""
    points, valid = backproject(depth, c2w, fovy), depth > 0

    def difference(axis: int) -> Tensor:  # axis 1: rows, 2: columns
        step = points.diff(dim=axis)
        both = valid.narrow(axis, 1, valid.shape[axis] - 1) & valid.narrow(axis, 0, valid.shape[axis] - 1)
        step = step * both[..., None]
        # F.pad lists the last dim first: (xyz), columns, rows
        forward = F.pad(step, [0, 0] + ([0, 1] if axis == 2 else [0, 0, 0, 1]))
        backward = F.pad(step, [0, 0] + ([1, 0] if axis == 2 else [0, 0, 1, 0]))
        has_f, has_b = forward.abs().sum(-1, keepdim=True) > 0, backward.abs().sum(-1, keepdim=True) > 0
        return torch.where(has_f & has_b, (forward + backward) / 2, forward + backward)

    normals = F.normalize(torch.cross(difference(2), difference(1), dim=-1), dim=-1)
    toward_camera = c2w[:, None, None, :3, 3].float() - points
    flip = (normals * toward_camera).sum(-1, keepdim=True) < 0
    return torch.where(flip, -normals, normals) * valid[..., None]


def splat(points: Tensor, values: Tensor, c2w: Tensor, fovy: Tensor, height: int, width: int,
          depth_tolerance: float = 0.0, normals: Optional[Tensor] = None) -> Dict[str, Tensor]:
    """Z-buffered splatting of world ``points`` (N, 3) carrying ``values`` (N, C) into cameras c2w
    (T, 4, 4), fovy (T,) degrees, at height x width. Each point lands on the pixel containing its
    projection; where several land on one pixel the nearest (smallest z-depth) wins, and with a
    ``depth_tolerance`` every point within that relative depth of the nearest is averaged (a soft
    z-buffer: the points of one surface share the pixel, as a render's anti-aliasing does).

    Returns ``values`` (T, C, H, W) (0 where nothing landed), ``valid`` (T, 1, H, W) float and
    ``depth`` (T, 1, H, W) (the winner's z-depth, 0 where invalid)."""
    targets, count, channels = c2w.shape[0], points.shape[0], values.shape[-1]
    w2c = torch.linalg.inv(c2w.float())
    cam = torch.einsum("tij,nj->tni", w2c[:, :3, :3], points.float()) + w2c[:, None, :3, 3]
    z = -cam[..., 2]  # (T, N) z-depth
    focal = focal_from_fovy(fovy.reshape(-1).float().to(points.device), height)[:, None]
    safe = torch.where(z > 1e-6, z, torch.ones_like(z))
    col = torch.floor(cam[..., 0] / safe * focal + 0.5 * width).long()
    row = torch.floor(-cam[..., 1] / safe * focal + 0.5 * height).long()
    inside = (z > 1e-6) & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    if normals is not None:  # back-face culling: a surface facing away from a camera is hidden from it
        toward = c2w[:, None, :3, 3].float() - points[None].float()
        inside &= (torch.einsum("nc,tnc->tn", normals.float(), F.normalize(toward, dim=-1)) > -BACK_FACE_COSINE)
    pixel = (torch.arange(targets, device=points.device)[:, None] * height + row) * width + col  # (T, N)
    pixel, z_in = pixel[inside], z[inside]
    total = targets * height * width
    nearest = torch.full((total,), float("inf"), device=points.device).scatter_reduce(0, pixel, z_in, reduce="amin")
    winner = z_in <= nearest[pixel] * (1.0 + depth_tolerance)
    source = values[None].expand(targets, count, channels)[inside][winner].float()
    out = torch.zeros(total, channels, device=points.device).index_add_(0, pixel[winner], source)
    hits = torch.zeros(total, device=points.device).index_add_(0, pixel[winner], torch.ones_like(source[:, 0]))
    out = out / hits.clamp_min(1.0)[:, None]
    valid = torch.isfinite(nearest)
    depth = torch.where(valid, nearest, torch.zeros_like(nearest))
    shape = (targets, height, width)
    return {
        "values": out.reshape(*shape, channels).permute(0, 3, 1, 2).contiguous(),
        "valid": valid.reshape(shape)[:, None].float(),
        "depth": depth.reshape(shape)[:, None],
    }


def warp_references(
    rgb: Tensor, depth: Tensor, c2w: Tensor, fovy: Tensor, target_c2w: Tensor, target_fovy: Tensor, size: int,
    supersample: int = 1, depth_tolerance: float = 0.0, cull_back_faces: bool = False,
) -> Dict[str, Tensor]:
    """Warp reference images into target cameras through their depth (nearest wins across references).

    ``rgb`` (R, C, H, W) (any values: colours, coordinates), ``depth`` (R, H, W) z-depth (<= 0: no
    depth, e.g. background), cameras c2w (R, 4, 4), fovy (R,); targets (T, 4, 4), (T,); output
    resolution ``size``. ``supersample`` s > 1 back-projects each reference pixel as s x s points at
    its sub-pixel centres (its colour and depth repeated), so a surface seen at a slant or from
    farther away leaves fewer holes in a target; ``depth_tolerance``: see :func:`splat`.
    ``cull_back_faces``: a point whose normal (:func:`depth_normals`) faces away from a target is not
    splatted there; without it the side of a part a reference sees shows through in a target that
    sees that part's other side, where the reference has no point to hide it. Returns :func:`splat`'s
    dict plus ``points`` (T, 3, size, size): the world point each target pixel received (their mean
    with a tolerance; 0 where invalid).
    """
    normals = depth_normals(depth, c2w, fovy).permute(0, 3, 1, 2) if cull_back_faces else None
    if supersample > 1:
        def repeat(x: Tensor) -> Tensor:
            return x.repeat_interleave(supersample, dim=-2).repeat_interleave(supersample, dim=-1)

        rgb, depth = repeat(rgb), repeat(depth)
        normals = repeat(normals) if normals is not None else None
    points = backproject(depth, c2w, fovy)
    keep = depth > 0
    world = points[keep]
    colours = rgb.permute(0, 2, 3, 1)[keep]
    normals = normals.permute(0, 2, 3, 1)[keep] if normals is not None else None
    result = splat(world, torch.cat([colours, world], dim=-1), target_c2w, target_fovy, size, size, depth_tolerance, normals)
    channels = rgb.shape[1]
    values = result.pop("values")
    return {"values": values[:, :channels], "points": values[:, channels:], **result}

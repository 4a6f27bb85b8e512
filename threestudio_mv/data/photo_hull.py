"""Unposed photos of one object -> their cameras and a coloured visual hull (shape from silhouettes).

MVDreamBooth learns a subject's sides only from views at known cameras (its multi-view mode); photos
come without cameras. Here each photo's silhouette is treated as an orthographic view (a photo of an
object is far narrower than its distance) normalised by its height and centre, the cameras (azimuth
relative to the first photo, elevation) are searched so the silhouettes agree on one shape (the visual
hull carved by all of them reprojects onto each), and the hull is meshed and coloured from the photos
that see each point head-on. The hull is what the silhouettes allow: concavities are filled, colours
are the photos'. A general-purpose pose estimator (structure from motion) needs texture and overlap
that a few object photos on a plain background rarely have; silhouettes they always have.
"""
from dataclasses import dataclass
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from threestudio_mv.utils.camera import CameraLight, c2w_from_spherical
from threestudio_mv.utils.errors import UserError

HULL_RESOLUTION = 48  # voxels per side of the carving grid over [-1, 1]^3
FRAME_SIZE = 64  # normalised silhouette frames, pixels per side over [-1, 1]^2
FILL = 0.8  # the widest silhouette spans at most this share of its frame (and of the carving grid)


@dataclass
class PhotoPoses:
    """Cameras found for K photos: ``azimuth`` and ``elevation`` (K,) degrees (the first photo at
    azimuth 0) and ``agreement``, the mean share of each silhouette the hull of all of them covers."""

    azimuth: Tensor
    elevation: Tensor
    agreement: float


def normalised_frames(rgba: Tensor) -> Tensor:
    """(K, H, W, 4) premultiplied photos -> (K, FRAME_SIZE, FRAME_SIZE, 4), each silhouette's bounding
    box centred and all scaled to one height (an object's height barely changes with the azimuth of a
    camera near the horizon; its width does), the widest spanning ``FILL`` of its frame."""
    boxes = []
    for image in rgba:
        rows, cols = torch.nonzero(image[..., 3] > 0.5, as_tuple=True)
        if rows.numel() == 0:
            raise UserError("a photo of the subject shows no object (its mask is empty); give the object on a plain background")
        boxes.append((rows.min().item(), rows.max().item() + 1, cols.min().item(), cols.max().item() + 1))
    widest = max(max(bottom - top, right - left) / (bottom - top) for top, bottom, left, right in boxes)
    half_height = FILL / widest  # frame units
    frames = []
    for image, (top, bottom, left, right) in zip(rgba, boxes):
        scale = (bottom - top) / (2.0 * half_height)  # photo pixels per frame unit
        centre = torch.tensor([(left + right) / 2.0, (top + bottom) / 2.0])
        # frame (x, y) in [-1, 1] (y down) -> photo pixel -> grid_sample's [-1, 1] of the photo
        axis = torch.linspace(-1.0, 1.0, FRAME_SIZE) * (FRAME_SIZE - 1) / FRAME_SIZE
        y, x = torch.meshgrid(axis, axis, indexing="ij")
        pixel = torch.stack([centre[0] + x * scale, centre[1] + y * scale], dim=-1)
        size = torch.tensor([image.shape[1], image.shape[0]], dtype=torch.float32)
        grid = (pixel / size) * 2.0 - 1.0
        sampled = F.grid_sample(image.permute(2, 0, 1)[None], grid[None], mode="bilinear", align_corners=False)
        frames.append(sampled[0].permute(1, 2, 0))
    return torch.stack(frames)


def _voxel_centres(resolution: int) -> Tensor:
    """Voxel centres of a grid over [-FILL, FILL]^3, where every silhouette's cone fits."""
    axis = torch.linspace(-FILL, FILL, resolution)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).view(-1, 3)


def _project(points: Tensor, elevation: float, azimuth: float) -> Tuple[Tensor, Tensor]:
    """Orthographic view from (elevation, azimuth): frame coordinates (N, 2) (x right, y down) and
    depth (N,) along the view (larger = farther from the camera)."""
    c2w = c2w_from_spherical(torch.tensor([elevation]), torch.tensor([azimuth]), torch.tensor([1.0]))[0]
    right, up, back = c2w[:3, 0], c2w[:3, 1], c2w[:3, 2]
    return torch.stack([points @ right, -(points @ up)], dim=-1), -(points @ back)


def _inside(silhouette: Tensor, frame_xy: Tensor) -> Tensor:
    """Silhouette (S, S) values at frame coordinates (N, 2)."""
    grid = (frame_xy * FRAME_SIZE / (FRAME_SIZE - 1)).view(1, -1, 1, 2)
    return F.grid_sample(silhouette[None, None], grid, mode="bilinear", align_corners=False).view(-1)


class _Carver:
    """Carves the voxel grid by silhouettes at candidate cameras; caches each photo's projection."""

    def __init__(self, silhouettes: Tensor, resolution: int = HULL_RESOLUTION) -> None:
        self.silhouettes = silhouettes
        self.points = _voxel_centres(resolution)
        self._cache: dict = {}

    def keep(self, index: int, elevation: float, azimuth: float) -> Tensor:
        """(N,) voxels inside photo ``index``'s silhouette cone at that camera."""
        key = (index, round(elevation, 3), round(azimuth % 360.0, 3))
        if key not in self._cache:
            frame_xy, _ = _project(self.points, elevation, azimuth)
            self._cache[key] = _inside(self.silhouettes[index], frame_xy) > 0.5
        return self._cache[key]

    def score(self, elevation: Sequence[float], azimuth: Sequence[float]) -> Tuple[float, int]:
        """(mean share of each silhouette covered by the hull's reprojection, hull voxel count)."""
        hull = torch.ones(self.points.shape[0], dtype=torch.bool)
        for index in range(len(azimuth)):
            hull &= self.keep(index, elevation[index], azimuth[index])
        if not hull.any():
            return 0.0, 0
        coverage = []
        for index in range(len(azimuth)):
            frame_xy, _ = _project(self.points[hull], elevation[index], azimuth[index])
            pixel = ((frame_xy + 1.0) * 0.5 * FRAME_SIZE).long().clamp(0, FRAME_SIZE - 1)
            covered = torch.zeros(FRAME_SIZE, FRAME_SIZE, dtype=torch.bool)
            covered[pixel[:, 1], pixel[:, 0]] = True
            silhouette = self.silhouettes[index] > 0.5
            coverage.append(float((covered & silhouette).sum()) / max(1, int(silhouette.sum())))
        return float(np.mean(coverage)), int(hull.sum())


def find_poses(
    frames: Tensor, elevations: Sequence[float] = (0.0, 15.0, 30.0), azimuth_step: float = 15.0, rounds: int = 3,
) -> PhotoPoses:
    """Cameras of normalised photo ``frames`` (K, S, S, 4) by coordinate search: each photo in turn
    tries every (elevation, azimuth) while the others stay, starting from photos taken walking around
    the object in order. Among cameras whose hull covers the silhouettes within 0.5% of the best, the
    tightest hull wins (silhouettes that agree from one side say nothing of the others)."""
    count = frames.shape[0]
    carver = _Carver(frames[..., 3])
    azimuth = [360.0 * i / count for i in range(count)]
    elevation = [elevations[len(elevations) // 2]] * count
    candidates = [(e, a) for e in elevations for a in np.arange(0.0, 360.0, azimuth_step)]
    for _ in range(rounds):
        changed = False
        for index in range(count):
            scored = []
            for e, a in candidates:
                if index == 0 and a != 0.0:
                    continue  # the first photo fixes the frame: azimuth 0
                trial_e, trial_a = list(elevation), list(azimuth)
                trial_e[index], trial_a[index] = e, float(a)
                scored.append((*carver.score(trial_e, trial_a), e, float(a)))
            best = max(s[0] for s in scored)
            _, _, e, a = min((s for s in scored if s[0] >= best - 0.005), key=lambda s: s[1])
            changed |= (e, a) != (elevation[index], azimuth[index])
            elevation[index], azimuth[index] = e, a
        if not changed:
            break
    agreement, _ = carver.score(elevation, azimuth)
    return PhotoPoses(torch.tensor(azimuth), torch.tensor(elevation), agreement)


def hull_mesh(frames: Tensor, poses: PhotoPoses, light: CameraLight = CameraLight(), resolution: int = 96):
    """The visual hull of normalised photo ``frames`` (K, S, S, 4) at ``poses`` as a vertex-coloured
    ``trimesh.Trimesh`` in the frames' world units (z up, the first photo seen from azimuth 0). Each
    vertex takes the colours of the photos that see it, weighted by how head-on, divided by the
    shading of ``light`` (the procedural renders' light by default) to give the albedo."""
    import trimesh
    from scipy import ndimage
    from skimage import measure

    points = _voxel_centres(resolution)
    hull = torch.ones(points.shape[0], dtype=torch.bool)
    for index in range(frames.shape[0]):
        frame_xy, _ = _project(points, float(poses.elevation[index]), float(poses.azimuth[index]))
        hull &= _inside(frames[index, ..., 3], frame_xy) > 0.5
    occupancy = ndimage.gaussian_filter(hull.view(resolution, resolution, resolution).float().numpy(), 1.0)
    labels, _ = ndimage.label(occupancy > 0.5)
    if labels.max() == 0:
        raise UserError("the photos' silhouettes agree on no shape: are they all photos of one object?")
    largest = np.argmax(np.bincount(labels.ravel())[1:]) + 1
    occupancy = np.where(ndimage.binary_dilation(labels == largest, iterations=2), occupancy, 0.0)
    spacing = 2.0 * FILL / (resolution - 1)
    vertices, faces, normals, _ = measure.marching_cubes(np.pad(occupancy, 1), 0.5, spacing=(spacing,) * 3)
    vertices = torch.from_numpy(vertices - spacing - FILL).float()
    normals = torch.from_numpy(normals.copy()).float()  # outward (towards lower occupancy)
    faces = faces[:, ::-1].copy()  # counter-clockwise seen from outside
    colour_sum, weight_sum = torch.zeros(vertices.shape[0], 3), torch.zeros(vertices.shape[0])
    for index in range(frames.shape[0]):
        elevation, azimuth = float(poses.elevation[index]), float(poses.azimuth[index])
        c2w = c2w_from_spherical(torch.tensor([elevation]), torch.tensor([azimuth]), torch.tensor([1.0]))[0]
        frame_xy, depth = _project(vertices, elevation, azimuth)
        visible = depth <= _front_depth(vertices, frame_xy, depth) + 2.0 * spacing
        facing = (normals @ c2w[:3, 2]).clamp_min(0.0)  # cosine with the direction towards the camera
        grid = (frame_xy * FRAME_SIZE / (FRAME_SIZE - 1)).view(1, -1, 1, 2)
        premultiplied = F.grid_sample(frames[index].permute(2, 0, 1)[None], grid, mode="bilinear", align_corners=False)
        premultiplied = premultiplied.view(4, -1).T
        # head-on, visible, and inside the silhouette's solid part (its antialiased rim mixes in the background)
        weight = facing.square() * visible * (premultiplied[:, 3] > 0.9)
        rgb = premultiplied[:, :3] / premultiplied[:, 3:].clamp_min(1e-3)
        albedo = rgb / light.shade(normals, c2w[:3, :3]).clamp_min(0.2)[:, None]
        colour_sum += weight[:, None] * albedo.clamp(0.0, 1.0)
        weight_sum += weight
    seen = weight_sum > 1e-6
    mean = (colour_sum[seen].sum(0) / weight_sum[seen].sum()) if seen.any() else torch.full((3,), 0.6)
    colours = torch.where(seen[:, None], colour_sum / weight_sum.clamp_min(1e-6)[:, None], mean)
    rgba = np.concatenate([np.round(colours.numpy() * 255.0), np.full((len(colours), 1), 255.0)], axis=1).astype(np.uint8)
    return trimesh.Trimesh(vertices=vertices.numpy(), faces=faces, vertex_colors=rgba, process=False)


def _front_depth(vertices: Tensor, frame_xy: Tensor, depth: Tensor) -> Tensor:
    """Per vertex: the nearest depth of any vertex in its frame pixel (a z-buffer of the mesh's vertices)."""
    pixel = ((frame_xy + 1.0) * 0.5 * FRAME_SIZE).long().clamp(0, FRAME_SIZE - 1)
    flat = pixel[:, 1] * FRAME_SIZE + pixel[:, 0]
    nearest = torch.full((FRAME_SIZE * FRAME_SIZE,), float("inf")).scatter_reduce(0, flat, depth, "amin")
    return nearest[flat]


def photos_hull(rgba: Tensor) -> Tuple[object, PhotoPoses]:
    """(K, H, W, 4) premultiplied photos of one object -> (vertex-coloured hull mesh, their cameras)."""
    frames = normalised_frames(rgba)
    poses = find_poses(frames)
    return hull_mesh(frames, poses), poses



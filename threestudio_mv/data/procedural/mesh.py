"""Ground-truth meshes of procedural assets: marching cubes (scikit-image) with vertex colours."""
import numpy as np
import torch

from threestudio_mv.data.procedural.assets import Asset

_MARGIN = 0.03
_CHUNK = 1 << 18


def asset_mesh(asset: Asset, resolution: int = 128):
    """The asset's zero level set as a ``trimesh.Trimesh`` with per-vertex RGBA colours (uint8).

    The SDF is sampled on a ``resolution``^3 grid over the asset's bounding box (plus a margin), so the
    mesh is closed and its normals point outwards; vertex colours are the albedo of the nearest part.
    """
    import trimesh
    from skimage.measure import marching_cubes

    lo, hi = asset.bounds()
    lo, hi = lo - _MARGIN, hi + _MARGIN
    axes = [torch.linspace(float(lo[i]), float(hi[i]), resolution) for i in range(3)]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    with torch.no_grad():
        values = torch.cat([asset.sdf(chunk) for chunk in grid.split(_CHUNK)]).reshape((resolution,) * 3)
    spacing = tuple(float(hi[i] - lo[i]) / (resolution - 1) for i in range(3))
    # skimage's default winding ("descent") gives outward-facing triangles for a negative-inside SDF.
    vertices, faces, _, _ = marching_cubes(values.numpy(), level=0.0, spacing=spacing)
    vertices = vertices + lo.numpy()
    with torch.no_grad():
        albedo = asset.albedo(torch.from_numpy(vertices).float()).numpy()
    colours = np.concatenate([np.round(albedo * 255.0), np.full((len(vertices), 1), 255.0)], axis=1).astype(np.uint8)
    return trimesh.Trimesh(vertices=vertices, faces=faces, vertex_colors=colours, process=False)

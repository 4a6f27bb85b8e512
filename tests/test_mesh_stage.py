"""The mesh stage's pieces: the differentiable rasteriser, marching tetrahedra, the SDF grid made from a
volume, the mesh renderer and its regularisers."""
import math

import numpy as np
import pytest
import torch
import trimesh

from threestudio_mv.models.geometry.implicit_volume import ImplicitVolume
from threestudio_mv.models.geometry.tetrahedra_sdf_grid import (
    TetrahedraSDFGrid,
    kuhn_tetrahedra,
    marching_tetrahedra,
    grid_edges,
)
from threestudio_mv.models.renderers.mesh_rasterizer import MeshRasterizer, nvdiffrast_available
from threestudio_mv.utils import camera, losses
from threestudio_mv.utils import rasterize as raster
from threestudio_mv.utils.errors import UserError

SIZE = 24


def sphere_clip(subdivisions: int = 3, views: int = 2):
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.45)
    vertices = torch.tensor(sphere.vertices, dtype=torch.float64)
    faces = torch.tensor(sphere.faces, dtype=torch.long)
    azimuth = torch.arange(views, dtype=torch.float32) * 70.0
    c2w = camera.c2w_from_spherical(torch.full_like(azimuth, 20.0), azimuth, torch.full_like(azimuth, 1.5))
    mvp = camera.mvp_matrix(c2w, torch.full_like(azimuth, 40.0)).double()
    clip = torch.cat([vertices, torch.ones_like(vertices[:, :1])], -1) @ mvp.transpose(1, 2)
    return vertices, faces, clip, c2w


def brute_force_ids(pixels: torch.Tensor, faces: torch.Tensor, size: int) -> torch.Tensor:
    """Nearest triangle per pixel centre, every triangle tested at every pixel."""
    rows, cols = torch.meshgrid(torch.arange(size) + 0.5, torch.arange(size) + 0.5, indexing="ij")
    point = torch.stack([cols, rows], -1).reshape(-1, 1, 2).double()  # (P, 1, 2)
    tri = pixels[faces].double()  # (F, 3, 3)

    def edge(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:  # (P, F)
        return (v[:, 0] - u[:, 0]) * (point[..., 1] - u[:, 1]) - (v[:, 1] - u[:, 1]) * (point[..., 0] - u[:, 0])

    a, b, c = tri[:, 0, :2], tri[:, 1, :2], tri[:, 2, :2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    bary = torch.stack([edge(b, c), edge(c, a), edge(a, b)], -1) / area[None, :, None]  # (P, F, 3)
    inside = (bary > 0).all(-1)
    depth = 1.0 / (bary / tri[None, :, :, 2]).sum(-1)
    depth = torch.where(inside, depth, torch.full_like(depth, math.inf))
    best, face = depth.min(dim=1)
    return torch.where(torch.isfinite(best), face, -1).view(size, size)


def test_rasterize_matches_a_brute_force_depth_test():
    _, faces, clip, _ = sphere_clip()
    rast = raster.rasterize(clip, faces, SIZE, SIZE)
    for view in range(clip.shape[0]):
        reference = brute_force_ids(rast.pixels[view].detach(), faces, SIZE)
        assert (rast.face_id[view] == reference).float().mean() > 0.99
    assert 0.2 < rast.mask.mean() < 0.8


def test_back_face_culling_keeps_the_image_of_a_closed_mesh():
    _, faces, clip, _ = sphere_clip()
    full, culled = raster.rasterize(clip, faces, SIZE, SIZE), raster.rasterize(clip, faces, SIZE, SIZE, cull_backfaces=True)
    assert torch.equal(full.face_id, culled.face_id)
    inverted = raster.rasterize(clip, faces[:, [0, 2, 1]], SIZE, SIZE, cull_backfaces=True)
    covered = full.face_id >= 0
    assert (inverted.depth[covered] > full.depth[covered]).all()  # wound inside out: the far side shows


def test_interpolation_reproduces_a_linear_attribute_at_the_pixel_centres():
    vertices, faces, clip, c2w = sphere_clip()
    rast = raster.rasterize(clip, faces, SIZE, SIZE)
    points = raster.interpolate(vertices, rast)  # world position of the surface seen at each pixel
    covered = rast.face_id >= 0
    # every interpolated point projects back onto its pixel's centre
    for view in range(clip.shape[0]):
        projected = camera.project_points(points[view][covered[view]].float(), c2w[view], torch.tensor(40.0), SIZE, SIZE)
        rows, cols = torch.nonzero(covered[view], as_tuple=True)
        assert torch.allclose(projected[:, 0], cols.float() + 0.5, atol=1e-3)
        assert torch.allclose(projected[:, 1], rows.float() + 0.5, atol=1e-3)


def test_antialiased_silhouette_gradient_matches_finite_differences():
    clip = torch.tensor([[[-0.5, -0.4, 0.0, 1.0], [0.6, -0.3, 0.0, 1.0], [0.1, 0.7, 0.0, 1.2]]], dtype=torch.float64)
    faces = torch.tensor([[0, 1, 2]])
    colours = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]], dtype=torch.float64)
    weights = torch.randn(1, 16, 16, 3, dtype=torch.float64)

    def loss(positions: torch.Tensor) -> torch.Tensor:
        rast = raster.rasterize(positions, faces, 16, 16)
        image = raster.interpolate(colours, rast) * rast.mask + 0.5 * (1 - rast.mask)
        return (raster.antialias(image, rast) * weights).sum()

    positions = clip.clone().requires_grad_(True)
    loss(positions).backward()
    numeric = torch.zeros_like(clip)
    for vertex in range(3):
        for axis in range(2):
            step = torch.zeros_like(clip)
            step[0, vertex, axis] = 1e-5
            numeric[0, vertex, axis] = (loss(clip + step) - loss(clip - step)) / 2e-5
    assert torch.allclose(positions.grad[..., :2], numeric[..., :2], rtol=1e-3, atol=1e-4)
    assert positions.grad[..., :2].abs().sum() > 0.1  # silhouette gradients exist


def test_antialias_leaves_interior_edges_alone():
    vertices, faces, clip, _ = sphere_clip()
    rast = raster.rasterize(clip, faces, SIZE, SIZE)
    image = rast.mask.expand(-1, -1, -1, 3).clone()
    smoothed = raster.antialias(image, rast)
    interior = torch.nn.functional.max_pool2d(1 - rast.mask.permute(0, 3, 1, 2), 3, 1, 1).permute(0, 2, 3, 1) == 0
    assert torch.equal(smoothed[interior.expand_as(smoothed)], image[interior.expand_as(image)])
    assert (smoothed != image).any()  # the silhouette is blended


@pytest.mark.parametrize("resolution", [24, 32])
def test_marching_tetrahedra_of_a_sphere_is_closed_with_the_right_area(resolution):
    unit, tets = kuhn_tetrahedra(resolution)
    edges, tet_edges = grid_edges(resolution, tets)
    positions = unit * 1.2 - 0.6
    sdf = 0.4 - positions.norm(dim=-1) + 1e-4  # no grid vertex exactly on the surface
    vertices, faces = marching_tetrahedra(positions, sdf, tets, edges, tet_edges)
    mesh = trimesh.Trimesh(vertices.numpy(), faces.numpy(), process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # normals point out
    assert mesh.area == pytest.approx(4 * math.pi * 0.4**2, rel=0.02)
    assert len(mesh.split(only_watertight=False)) == 1


def test_marching_tetrahedra_passes_gradients_to_sdf_and_positions():
    unit, tets = kuhn_tetrahedra(8)
    edges, tet_edges = grid_edges(8, tets)
    positions = (unit - 0.5).requires_grad_(True)
    sdf = (0.3 - positions.detach().norm(dim=-1) + 1e-3).requires_grad_(True)
    vertices, _ = marching_tetrahedra(positions, sdf, tets, edges, tet_edges)
    vertices.norm(dim=-1).sum().backward()
    assert sdf.grad.abs().sum() > 0 and positions.grad.abs().sum() > 0


def blob_volume() -> ImplicitVolume:
    """An implicit volume whose field is a dumbbell: two balls of different sizes joined by a bar."""
    volume = ImplicitVolume({
        "radius": 0.75, "pos_encoding_config": {"otype": "Triplane", "resolution": 16, "n_features": 4},
        "isosurface_resolution": 48,
    })
    centres = torch.tensor([[0.2, 0.0, 0.0], [-0.25, 0.05, 0.0]])
    radii = torch.tensor([0.2, 0.12])

    def dumbbell(points: torch.Tensor) -> torch.Tensor:
        balls = ((points[:, None] - centres).norm(dim=-1) / radii).min(dim=1).values
        bar = torch.maximum((points[:, 1:] - centres[1, 1:] / 2).norm(dim=-1) / 0.08, (points[:, 0] + 0.02).abs() / 0.3)
        return 30.0 * (1.0 - torch.minimum(balls, bar))[:, None] - volume.density_network(
            volume.encoding(volume.normalize_points(points)))

    volume.density_bias = dumbbell  # the field: softplus(30 (1 - distance in units of each part's size))
    return volume


def test_sdf_grid_made_from_a_volume_keeps_its_shape_and_colours():
    from threestudio_mv.eval.metrics import volumetric_iou

    volume = blob_volume()
    grid = TetrahedraSDFGrid({
        "radius": 0.75, "grid_resolution": 48,
        "pos_encoding_config": {"otype": "Triplane", "resolution": 16, "n_features": 4},
    })
    grid.seed_from(volume, inherit_texture=True)
    source, made = volume.isosurface(), grid.isosurface()
    as_mesh = [trimesh.Trimesh(m.vertices.detach().numpy(), m.faces.numpy(), process=False) for m in (source, made)]
    assert as_mesh[1].is_watertight
    assert volumetric_iou(as_mesh[1], as_mesh[0], resolution=64) >= 0.95
    points = torch.rand(64, 3) - 0.5
    assert torch.allclose(grid.export(points)["features"], volume.export(points)["features"], atol=1e-6)


def test_pieces_of_a_volume_are_joined_into_one():
    volume = blob_volume()
    apart = torch.tensor([[0.145, 0.0, 0.0], [-0.145, 0.0, 0.0]])  # two balls a few cells apart
    volume.density_bias = lambda points: 30.0 * (1.0 - (points[:, None] - apart).norm(dim=-1).min(dim=1).values / 0.15)[:, None]
    assert len(trimesh.Trimesh(*(t.detach().numpy() for t in (volume.isosurface().vertices, volume.isosurface().faces))).split(only_watertight=False)) == 2
    grid = TetrahedraSDFGrid({"radius": 0.75, "grid_resolution": 32,
                              "pos_encoding_config": {"otype": "Triplane", "resolution": 16, "n_features": 4}})
    grid.seed_from(volume, inherit_texture=False)
    made = grid.isosurface()
    mesh = trimesh.Trimesh(made.vertices.detach().numpy(), made.faces.numpy(), process=False)
    assert mesh.is_watertight and len(mesh.split(only_watertight=False)) == 1
    grid = TetrahedraSDFGrid({"radius": 0.75, "grid_resolution": 32, "bridge_max_gap": 0.0,
                              "pos_encoding_config": {"otype": "Triplane", "resolution": 16, "n_features": 4}})
    grid.seed_from(volume, inherit_texture=False)
    made = grid.isosurface()
    assert len(trimesh.Trimesh(made.vertices.detach().numpy(), made.faces.numpy(), process=False).split(only_watertight=False)) == 2


def test_seed_distance_reads_the_volume_surface_and_survives_a_checkpoint():
    volume = blob_volume()
    grid = TetrahedraSDFGrid({"radius": 0.75, "grid_resolution": 24,
                              "pos_encoding_config": {"otype": "Triplane", "resolution": 16, "n_features": 4}})
    with pytest.raises(UserError, match="lambda_seed_fidelity"):
        grid.seed_distance(torch.zeros(1, 3))
    grid.seed_from(volume, inherit_texture=False)
    on_surface = volume.isosurface().vertices.detach()
    cell = float(grid.cell_size.max())
    # The source's own surface is at distance ~0 (read on its 48^3 grid, finer than this 24^3 one) ...
    assert float(grid.seed_distance(on_surface).abs().mean()) < 0.1 * cell
    # ... the centre of the larger ball is inside, a far corner outside, and the distance is in world units.
    inside, outside = grid.seed_distance(torch.tensor([[0.2, 0.0, 0.0], [0.7, 0.7, 0.7]]))
    assert 0.1 < float(inside) < 0.3 and float(outside) < 0
    # The coarser grid's own mesh lies off that surface by a fraction of its cell.
    made = grid.isosurface().vertices.detach()
    assert 0.02 * cell < float(grid.seed_distance(made).abs().mean()) < 0.5 * cell
    # A fresh grid loaded from the state dict (a resumed stage) reads the same surface.
    again = TetrahedraSDFGrid({"radius": 0.75, "grid_resolution": 24,
                               "pos_encoding_config": {"otype": "Triplane", "resolution": 16, "n_features": 4}})
    again.load_state_dict(grid.state_dict())
    assert torch.equal(again.seed_distance(on_surface), grid.seed_distance(on_surface))


def test_seed_fidelity_pulls_a_shrunken_mesh_back_to_the_volume():
    volume = blob_volume()
    grid = TetrahedraSDFGrid({"radius": 0.75, "grid_resolution": 24,
                              "pos_encoding_config": {"otype": "Triplane", "resolution": 16, "n_features": 4}})
    grid.seed_from(volume, inherit_texture=False)
    with torch.no_grad():
        grid.sdf.sub_(0.5 * float(grid.cell_size.max()))  # half a cell smaller all round
    optimizer = torch.optim.Adam([grid.sdf, grid.deformation], lr=2e-3)
    distances = []
    for _ in range(30):
        loss = grid.seed_distance(grid.isosurface().vertices).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        distances.append(float(loss.detach()))
    assert distances[-1] < 0.3 * distances[0], distances


def test_empty_grid_and_a_mismatched_texture_are_user_errors():
    grid = TetrahedraSDFGrid({"grid_resolution": 8, "pos_encoding_config": {"otype": "Triplane", "resolution": 8, "n_features": 2}})
    with pytest.raises(UserError, match="no surface"):
        grid.isosurface()
    with pytest.raises(UserError, match="inherit the texture"):
        grid.seed_from(blob_volume(), inherit_texture=True)


def renderer_for(grid: TetrahedraSDFGrid, backend: str = "torch") -> MeshRasterizer:
    from threestudio_mv.models.background.solid_color import SolidColorBackground
    from threestudio_mv.models.materials.no_material import NoMaterial

    return MeshRasterizer({"backend": backend}, geometry=grid, material=NoMaterial({}),
                          background=SolidColorBackground({"color": [1.0, 1.0, 1.0]}))


def sphere_grid() -> TetrahedraSDFGrid:
    grid = TetrahedraSDFGrid({"radius": 0.75, "grid_resolution": 16,
                              "pos_encoding_config": {"otype": "Triplane", "resolution": 8, "n_features": 2}})
    with torch.no_grad():
        positions = grid.grid_positions()
        grid.sdf.copy_(0.4 - positions.norm(dim=-1) + 1e-3)
    return grid


def camera_batch(size: int = 32):
    from threestudio_mv.data.random_cameras import camera_batch as make_batch

    azimuth = torch.tensor([0.0, 90.0])
    elevation, distance, fovy = torch.full_like(azimuth, 15.0), torch.full_like(azimuth, 1.6), torch.full_like(azimuth, 40.0)
    c2w = camera.c2w_from_spherical(elevation, azimuth, distance)
    return make_batch(c2w=c2w, fovy=fovy, elevation=elevation, azimuth=azimuth, camera_distances=distance,
                      light_positions=c2w[:, :3, 3], height=size, width=size, n_view=2)


def test_mesh_renderer_outputs_and_gradients_reach_the_sdf():
    grid = sphere_grid()
    renderer = renderer_for(grid).train()
    batch = camera_batch()
    out = renderer(**batch)
    for key in ("comp_rgb", "comp_rgb_fg", "comp_rgb_bg", "opacity", "depth"):
        assert out[key].shape[:3] == (2, 32, 32), key
    # the sphere (radius 0.4) at distance 1.6: the depth at the centre pixel is 1.6 - 0.4
    assert out["depth"][0, 16, 16, 0].item() == pytest.approx(1.2, abs=0.03)
    (out["opacity"].mean() + losses.normal_consistency(out["mesh"])).backward()
    assert grid.sdf.grad.abs().sum() > 0 and grid.deformation.grad.abs().sum() > 0
    renderer.eval()
    assert "comp_normal" in renderer(**batch)


def test_mesh_regularisers_are_larger_on_a_bumpy_sphere():
    sphere = trimesh.creation.icosphere(subdivisions=2)
    round_mesh = type("Mesh", (), {"vertices": torch.tensor(sphere.vertices, dtype=torch.float32), "faces": torch.tensor(sphere.faces)})
    bumpy = type("Mesh", (), {"vertices": round_mesh.vertices * (1 + 0.2 * torch.rand(len(sphere.vertices), 1)), "faces": round_mesh.faces})
    assert losses.normal_consistency(bumpy) > 2 * losses.normal_consistency(round_mesh)
    assert losses.laplacian_smoothness(bumpy) > losses.laplacian_smoothness(round_mesh)



def test_albedo_smoothness_is_zero_for_one_colour_and_evens_out_specks():
    points = torch.rand(2048, 3) * 2.0 - 1.0
    assert losses.albedo_smoothness(lambda p: torch.full_like(p, 0.4), points, 0.02, 1024) == 0.0
    torch.manual_seed(0)
    frequencies = torch.randn(3, 64) * 40.0  # a speckled colour field: high-frequency features
    head = torch.nn.Linear(64, 3)
    albedo = lambda p: torch.sigmoid(head(torch.sin(p @ frequencies)))  # noqa: E731
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    before = float(losses.albedo_smoothness(albedo, points, 0.02, 1024))
    for _ in range(100):
        optimiser.zero_grad()
        losses.albedo_smoothness(albedo, points, 0.02, 1024).backward()
        optimiser.step()
    assert float(losses.albedo_smoothness(albedo, points, 0.02, 1024)) < 0.3 * before
    assert float(albedo(points).std(dim=0).max()) < 0.05  # nothing else ties the colours down: they even out


@pytest.mark.skipif(not nvdiffrast_available(), reason="nvdiffrast and CUDA are not available")
def test_nvdiffrast_and_the_pytorch_rasteriser_agree():
    grid = sphere_grid().cuda()
    batch = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in camera_batch().items()}
    torch_out = renderer_for(grid, "torch").eval()(**batch)
    nv_out = renderer_for(grid, "nvdiffrast").eval()(**batch)
    assert (torch_out["opacity"] - nv_out["opacity"]).abs().mean() < 0.01
    assert (torch_out["comp_rgb"] - nv_out["comp_rgb"]).abs().mean() < 0.01
    np.testing.assert_allclose(torch_out["depth"].cpu(), nv_out["depth"].cpu(), atol=0.05)


def test_grid_edges_are_the_tetrahedra_edges_without_repeats():
    unit, tets = kuhn_tetrahedra(3)
    edges, tet_edges = grid_edges(3, tets)
    used = torch.unique(tet_edges)
    pairs = {tuple(sorted(pair)) for tet in tets.tolist() for pair in ((tet[a], tet[b]) for a, b in ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)))}
    assert len(used) == len(pairs)
    assert {tuple(sorted(edge)) for edge in edges[used].tolist()} == pairs
    # every tetrahedron edge id names that tetrahedron's pair of vertices
    local = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    ends = tets[:, local].sort(dim=-1).values
    assert torch.equal(edges[tet_edges].sort(dim=-1).values, ends)
    assert len(unit) == 4 ** 3 and len(tets) == 6 * 27


def test_a_fixed_mesh_follows_the_grid_to_another_device_or_dtype():
    """The texture stage caches its fixed mesh; after Lightning moves the system (GPU fit -> CPU for
    --export) the cache must not hand out the old device's mesh. A dtype change stands in for a device."""
    grid = sphere_grid()
    grid.cfg.fix_geometry = True
    grid.eval()
    assert grid.isosurface().vertices.dtype == torch.float32 and grid._fixed_mesh
    grid.double()
    assert grid.isosurface().vertices.dtype == torch.float64
    grid.train()
    grid.float()
    assert grid.isosurface().vertices.dtype == torch.float32

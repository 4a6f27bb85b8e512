"""Renderer and ground-truth mesh: outputs, colours, canonical front, render/mesh agreement."""
import numpy as np
import pytest
import torch

from threestudio_mv.data.procedural import (
    COLOUR_NAMES,
    NAMED_COLOURS,
    OBJECTS,
    SHAPES,
    asset_mesh,
    nearest_colour_name,
    parse_caption,
    render_views,
)
from threestudio_mv.utils import camera
from threestudio_mv.utils.camera import CameraLight, view_group


def test_outputs_shapes_ranges_and_background() -> None:
    cameras = view_group(3)
    out = render_views(parse_caption("a blue mug"), cameras["c2w"], cameras["fovy"], 32, background=(0.0, 0.5, 0.0))
    assert out["rgb"].shape == (3, 32, 32, 3) and out["normal"].shape == (3, 32, 32, 3)
    assert out["alpha"].shape == out["depth"].shape == (3, 32, 32)
    assert 0.0 <= float(out["rgb"].min()) and float(out["rgb"].max()) <= 1.0
    empty = out["alpha"] == 0
    assert bool(empty.any()) and bool((out["alpha"] == 1).any())
    assert torch.allclose(out["rgb"][empty], torch.tensor([0.0, 0.5, 0.0]))
    assert bool((out["depth"][empty] == 0).all()) and bool((out["rgb_fg"][empty] == 0).all())
    edges = (out["alpha"] > 0) & (out["alpha"] < 1)
    assert bool(edges.any())  # supersampled, anti-aliased silhouette


def test_depth_and_normal_of_a_sphere() -> None:
    cameras = view_group(1, elevation=20.0)
    out = render_views(parse_caption("a red sphere"), cameras["c2w"], cameras["fovy"], 64)
    distance = float(cameras["camera_distances"][0])
    centre = out["depth"][0, 31:33, 31:33].mean()
    assert float(centre) == pytest.approx(distance - 0.45, abs=0.01)
    towards_camera = cameras["c2w"][0, :3, 2]
    assert float(out["normal"][0, 32, 32] @ towards_camera) > 0.99


def test_ambient_only_light_gives_albedo_and_default_light_stays_close() -> None:
    cameras = view_group(1)
    asset = parse_caption("a purple cube")
    flat = render_views(asset, cameras["c2w"], cameras["fovy"], 32, light=CameraLight(ambient_ratio=1.0))
    inside = flat["alpha"][0] == 1
    assert torch.allclose(flat["rgb"][0][inside], torch.tensor(NAMED_COLOURS["purple"]), atol=1e-5)
    lit = render_views(asset, cameras["c2w"], cameras["fovy"], 32)
    shade = lit["rgb"][0][inside] / torch.tensor(NAMED_COLOURS["purple"])
    assert 0.55 <= float(shade.min()) and float(shade.max()) <= 1.0 + 1e-5


def test_named_colours_are_recovered_from_renders() -> None:
    cameras = view_group(2, elevation=20.0)
    for colour in COLOUR_NAMES:
        out = render_views(parse_caption(f"a {colour} cube"), cameras["c2w"], cameras["fovy"], 32)
        pixels = out["rgb"][out["alpha"] == 1]
        assert nearest_colour_name(pixels.median(dim=0).values) == colour


@pytest.mark.parametrize(
    "caption, detail", [("a yellow duck with an orange beak", "orange"), ("a white house with a red roof", "brown")]
)
def test_front_faces_plus_x(caption: str, detail: str) -> None:
    """The duck's beak and the house's door show from the front (azimuth 0), not from the back."""
    cameras = view_group(2)  # azimuth 0 and 180
    out = render_views(parse_caption(caption), cameras["c2w"], cameras["fovy"], 64)
    pixels = out["rgb_fg"][out["alpha"] > 0.99]
    view = torch.arange(2)[:, None, None].expand(2, 64, 64)[out["alpha"] > 0.99]
    albedo = torch.tensor([NAMED_COLOURS[name] for name in COLOUR_NAMES])
    # Nearest named colour after dividing out a plausible shading factor range (0.55-1).
    nearest = torch.stack([((pixels[:, None] / s - albedo[None]).norm(dim=-1)) for s in (0.6, 0.8, 1.0)]).min(dim=0).values.argmin(dim=-1)
    is_detail = nearest == COLOUR_NAMES.index(detail)
    assert int(is_detail[view == 0].sum()) >= 6 and int(is_detail[view == 1].sum()) == 0


def test_dominant_colour() -> None:
    assert parse_caption("a red mushroom with a white stem").dominant_colour == "red"
    assert parse_caption("a yellow duck with an orange beak").dominant_colour == "yellow"


def _mesh_silhouette(mesh, c2w: torch.Tensor, fovy: float, size: int) -> np.ndarray:
    """Rasterise the mesh's projected triangles: pixels whose centre lies in any triangle.

    Marching-cubes triangles are small, so each is tested against the pixel centres of its bounding
    box, all triangles at once (skimage.draw.polygon per triangle would be a slow Python loop).
    """
    projected = camera.project_points(torch.tensor(mesh.vertices, dtype=torch.float32), c2w, fovy, size, size)
    triangles = projected[:, :2].numpy()[mesh.faces]  # (F, 3, 2) as (column, row), centres at +0.5
    lo = np.floor(triangles.min(axis=1) - 0.5).astype(int)
    span = int((np.ceil(triangles.max(axis=1) - 0.5).astype(int) - lo).max()) + 1
    a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]

    def cross(o, p, q):
        return (p[:, 0] - o[:, 0]) * (q[:, 1] - o[:, 1]) - (p[:, 1] - o[:, 1]) * (q[:, 0] - o[:, 0])

    mask = np.zeros((size, size), dtype=bool)
    for dx in range(span):
        for dy in range(span):
            pixel = lo + np.array([dx, dy])
            centre = pixel + 0.5
            w0, w1, w2 = cross(b, c, centre), cross(c, a, centre), cross(a, b, centre)
            inside = ((w0 >= 0) & (w1 >= 0) & (w2 >= 0)) | ((w0 <= 0) & (w1 <= 0) & (w2 <= 0))
            inside &= (pixel >= 0).all(axis=1) & (pixel < size).all(axis=1)
            mask[pixel[inside, 1], pixel[inside, 0]] = True
    return mask


@pytest.mark.parametrize("caption", ["a red cube", "a blue mug with a white handle", "a brown chair with black legs", "a purple torus"])
def test_mesh_silhouette_matches_rendered_alpha(caption: str) -> None:
    asset = parse_caption(caption)
    mesh = asset_mesh(asset, resolution=80)
    cameras = view_group(2, elevation=20.0, azimuth_start=30.0)
    out = render_views(asset, cameras["c2w"], cameras["fovy"], 64)
    for view in range(2):
        rendered = out["alpha"][view].numpy() >= 0.5
        # Rasterised at the renderer's 2x2 sub-pixels and pooled alike, so both sides threshold the same coverage.
        fine = _mesh_silhouette(mesh, cameras["c2w"][view], float(cameras["fovy"][view]), 128)
        meshed = fine.reshape(64, 2, 64, 2).mean(axis=(1, 3)) >= 0.5
        iou = (rendered & meshed).sum() / (rendered | meshed).sum()
        assert iou >= 0.95, (caption, view, iou)


def test_mesh_is_closed_coloured_and_in_the_canonical_box() -> None:
    for caption in ["a green tree with a brown trunk", "a red car"]:
        asset = parse_caption(caption)
        mesh = asset_mesh(asset, resolution=64)
        assert mesh.is_watertight and mesh.volume > 0
        colours = {tuple(c[:3]) for c in np.unique(mesh.visual.vertex_colors, axis=0)}
        expected = {tuple(int(round(v * 255)) for v in NAMED_COLOURS[name]) for name in set(asset.colour_names.values())}
        assert colours <= expected and len(colours) >= 2


@pytest.mark.parametrize("caption", [f"a red {s}" for s in SHAPES] + [f"a red {o}" for o in OBJECTS])
def test_assets_fill_the_canonical_box(caption: str) -> None:
    """Every geometry sits in [-0.5, 0.5]^3 with a largest extent of ~0.85-1.0, roughly centred."""
    asset = parse_caption(caption)
    axes = torch.linspace(-0.55, 0.55, 45)
    grid = torch.stack(torch.meshgrid(axes, axes, axes, indexing="ij"), dim=-1).reshape(-1, 3)
    inside = grid[asset.sdf(grid) < 0]
    lo, hi = inside.min(dim=0).values, inside.max(dim=0).values
    assert bool((lo >= -0.5).all()) and bool((hi <= 0.5).all())
    assert 0.8 <= float((hi - lo).max()) <= 1.0  # grid spacing 0.025 under-reads extents a little
    assert float(((hi + lo) / 2).abs().max()) <= 0.1

"""``tetrahedra-sdf-grid``: DMTet, a mesh geometry for the refine and texture stages.

A tetrahedral grid made here (a Kuhn/Freudenthal split of a cube grid into 6 tetrahedra per cube,
so no external tet files), a learnable SDF value and a bounded deformation per grid vertex, and
differentiable marching tetrahedra in pure PyTorch: the mesh's vertices are where the SDF crosses
zero along grid edges, so the SDF and the deformation get gradients from anything rendered of the
mesh. The colour field is the implicit volume's (an encoding + feature MLP), so a refine stage can
inherit the coarse stage's texture. ``create_from`` seeds the grid from an implicit volume: the grid
covers the volume's tight box and the SDF is the cleaned field of the volume's own isosurface
extraction minus its level, scaled to about a world distance near the surface.
"""
import itertools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import threestudio_mv
from threestudio_mv.models.encodings import get_encoding, get_mlp
from threestudio_mv.models.geometry.base import BaseImplicitGeometry
from threestudio_mv.models.geometry.isosurface import IsosurfaceMesh, remove_small_components
from threestudio_mv.utils.errors import UserError

# The 6 edges of a tetrahedron, as pairs of its local vertices.
TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def kuhn_tetrahedra(resolution: int) -> Tuple[Tensor, Tensor]:
    """Unit-cube grid of ``resolution`` cubes per side split into 6 tetrahedra each.

    Returns vertices (V, 3) in [0, 1]^3 and tetrahedra (T, 4) long. Each cube's tetrahedra follow the
    6 monotone paths from its lowest to its highest corner (one per axis order), so neighbouring
    cubes split their shared faces the same way and the grid is conforming.
    """
    n = resolution + 1
    axis = torch.linspace(0.0, 1.0, n)
    vertices = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    corner = torch.stack(torch.meshgrid(*[torch.arange(resolution)] * 3, indexing="ij"), dim=-1).reshape(-1, 3)
    steps = torch.eye(3, dtype=torch.long)
    tets = []
    for order in itertools.permutations(range(3)):
        path = [corner]
        for axis_index in order:
            path.append(path[-1] + steps[axis_index])
        tets.append(torch.stack([(p[:, 0] * n + p[:, 1]) * n + p[:, 2] for p in path], dim=-1))
    return vertices, torch.cat(tets)


def grid_edges(resolution: int, tets: Tensor) -> Tuple[Tensor, Tensor]:
    """The Kuhn grid's edges (E, 2) and each tetrahedron's 6 edges as indices into them (T, 6).

    Every edge of a Kuhn tetrahedron joins a vertex v to v + d, d one of the 7 non-zero 0/1 steps, so
    edge (v, d) gets the id 7 v + code(d) without sorting (a per-step ``torch.unique`` over edges was
    the slow part of marching tetrahedra on CPU). Ids whose far end leaves the grid are edges (v, v),
    which no tetrahedron uses and no surface crosses.
    """
    n = resolution + 1
    steps = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(1, 8)])  # code c -> step of c + 1
    index = torch.arange(n ** 3)
    coords = torch.stack([index // (n * n), (index // n) % n, index % n], dim=-1)
    far = coords[:, None] + steps[None]  # (V, 7, 3)
    inside = (far < n).all(dim=-1)
    far_index = (far[..., 0] * n + far[..., 1]) * n + far[..., 2]
    edges = torch.stack([index[:, None].expand(-1, 7), torch.where(inside, far_index, index[:, None])], dim=-1)
    pairs = torch.stack([tets[:, list(pair)] for pair in TET_EDGES], dim=1)  # (T, 6, 2)
    low, high = pairs.min(dim=-1).values, pairs.max(dim=-1).values
    step = torch.stack([high // (n * n) - low // (n * n), (high // n) % n - (low // n) % n, high % n - low % n], dim=-1)
    code = step[..., 0] * 4 + step[..., 1] * 2 + step[..., 2] - 1
    return edges.reshape(-1, 2), low * 7 + code


def _triangle_table() -> Tuple[Tensor, Tensor]:
    """Per inside-code (bit i = vertex i inside), up to 2 triangles of local edge ids (16, 2, 3), and
    their count (16,). Derived here: one inside (or one outside) vertex cuts its 3 edges (a triangle);
    two cut a quad (two triangles). Winding is fixed afterwards, per triangle."""
    edge_id = {pair: index for index, pair in enumerate(TET_EDGES)}

    def edge(a: int, b: int) -> int:
        return edge_id[(min(a, b), max(a, b))]

    table = torch.zeros(16, 2, 3, dtype=torch.long)
    count = torch.zeros(16, dtype=torch.long)
    for code in range(1, 15):
        inside = [v for v in range(4) if code >> v & 1]
        outside = [v for v in range(4) if not code >> v & 1]
        if len(inside) in (1, 3):
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            table[code, 0] = torch.tensor([edge(lone, o) for o in others])
            count[code] = 1
        else:
            (a, b), (c, d) = inside, outside
            ring = [edge(a, c), edge(a, d), edge(b, d), edge(b, c)]
            table[code, 0] = torch.tensor(ring[:3])
            table[code, 1] = torch.tensor([ring[0], ring[2], ring[3]])
            count[code] = 2
    return table, count


TRIANGLE_TABLE, TRIANGLE_COUNT = _triangle_table()


def marching_tetrahedra(
    positions: Tensor, sdf: Tensor, tets: Tensor, edges: Tensor, tet_edges: Tensor, edge_ids: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor]:
    """Differentiable marching tetrahedra of the region where ``sdf`` > 0.

    ``positions`` (V, 3) and ``sdf`` (V,) at the grid vertices; ``tets`` (T, 4), ``edges`` (E, 2) and
    ``tet_edges`` (T, 6) from :func:`kuhn_tetrahedra` / :func:`grid_edges`; ``tets`` and
    ``tet_edges`` may be a subset of the grid's (a band around the surface), ``edge_ids`` then the
    edges those use. Returns mesh vertices (M, 3), one per crossed grid edge (so the mesh is
    watertight), and faces (K, 3) wound with normals pointing out of the region (towards lower sdf).
    """
    inside = sdf > 0
    candidates = edges if edge_ids is None else edges[edge_ids]
    crossed_ids = torch.nonzero(inside[candidates[:, 0]] != inside[candidates[:, 1]]).squeeze(1)
    if edge_ids is not None:
        crossed_ids = edge_ids[crossed_ids]
    vertex_of_edge = torch.full((edges.shape[0],), -1, dtype=torch.long, device=sdf.device)
    vertex_of_edge[crossed_ids] = torch.arange(crossed_ids.numel(), device=sdf.device)
    ends = edges[crossed_ids]
    s0, s1 = sdf[ends[:, 0]], sdf[ends[:, 1]]
    # kept 1% of an edge off the grid vertices: vertices of neighbouring edges never coincide (a zero-area
    # pinch, which welding the exported mesh by position would turn into a non-manifold edge)
    t = (s0 / (s0 - s1)).clamp(0.01, 0.99)[:, None]
    vertices = positions[ends[:, 0]] * (1.0 - t) + positions[ends[:, 1]] * t

    codes = (inside[tets].long() * torch.tensor([1, 2, 4, 8], device=sdf.device)).sum(dim=1)
    active = torch.nonzero((codes > 0) & (codes < 15)).squeeze(1)
    codes = codes[active]
    table, count = TRIANGLE_TABLE.to(sdf.device), TRIANGLE_COUNT.to(sdf.device)
    local = table[codes]  # (A, 2, 3)
    tet_index = active[:, None].expand(-1, 2)
    keep = torch.arange(2, device=sdf.device)[None] < count[codes][:, None]  # (A, 2)
    local, tet_index = local[keep], tet_index[keep]  # (K, 3), (K,)
    faces = vertex_of_edge[tet_edges[tet_index].gather(1, local)]
    # Wind every triangle so its normal points from the tet's inside corners to its outside ones.
    with torch.no_grad():
        corners = positions[tets[tet_index]]  # (K, 4, 3)
        corner_inside = inside[tets[tet_index]].float()[..., None]
        inside_centre = (corners * corner_inside).sum(1) / corner_inside.sum(1)
        outside_centre = (corners * (1 - corner_inside)).sum(1) / (1 - corner_inside).sum(1)
        tri = vertices[faces]
        normal = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
        flip = (normal * (outside_centre - inside_centre)).sum(-1) < 0
    faces = torch.where(flip[:, None], faces[:, [0, 2, 1]], faces)
    return vertices, faces


@threestudio_mv.register("tetrahedra-sdf-grid")
class TetrahedraSDFGrid(BaseImplicitGeometry):
    """A deformable tetrahedral grid with an SDF per vertex, meshed by marching tetrahedra.

    The grid spans ``bbox`` (default the box [-radius, radius]^3; ``create_from`` sets the source's
    tight box); each vertex moves at most ``deformation_scale`` grid cells (tanh-bounded). Colours come
    from ``pos_encoding_config`` + ``mlp_network_config`` as in ``implicit-volume``. With
    ``fix_geometry`` the SDF and deformation are buffers (a texture stage): the mesh is computed once.
    """

    @dataclass
    class Config(BaseImplicitGeometry.Config):
        grid_resolution: int = 48
        deformation_scale: float = 0.5
        bbox: Optional[List[float]] = None  # [xmin, ymin, zmin, xmax, ymax, zmax]
        n_feature_dims: int = 3
        pos_encoding_config: Dict[str, Any] = field(default_factory=lambda: {"otype": "HashGrid"})
        mlp_network_config: Dict[str, Any] = field(
            default_factory=lambda: {"otype": "VanillaMLP", "n_neurons": 64, "n_hidden_layers": 1}
        )
        fix_geometry: bool = False
        sdf_init_clamp: float = 2.0  # create_from: |sdf| at most this many grid cells
        # create_from: pieces of the volume at most this fraction of the object's size apart are joined to
        # the largest by a capsule of this radius (in cells) across the shortest gap (0: never)
        bridge_max_gap: float = 0.15
        bridge_radius_cells: float = 1.0
        # training meshes only the tetrahedra with a vertex within this many cells of the surface,
        # a band found again every band_refresh_every_n_steps steps (the surface moves far less)
        band_cells: float = 1.5
        band_refresh_every_n_steps: int = 10

    cfg: Config

    def configure(self, **kwargs: Any) -> None:
        cfg, prefix = self.cfg, self.config_prefix
        if not 4 <= cfg.grid_resolution <= 256:
            raise UserError(f"config key '{prefix}.grid_resolution' must be in [4, 256], got {cfg.grid_resolution}")
        if cfg.bbox is not None and len(cfg.bbox) != 6:
            raise UserError(f"config key '{prefix}.bbox' needs 6 numbers (min xyz, max xyz), got {cfg.bbox}")
        unit, tets = kuhn_tetrahedra(cfg.grid_resolution)
        edges, tet_edges = grid_edges(cfg.grid_resolution, tets)
        self.register_buffer("unit_vertices", unit, persistent=False)
        self.register_buffer("tets", tets, persistent=False)
        self.register_buffer("edges", edges, persistent=False)
        self.register_buffer("tet_edges", tet_edges, persistent=False)
        box = cfg.bbox or [-cfg.radius] * 3 + [cfg.radius] * 3
        self.register_buffer("bbox", torch.tensor(box, dtype=torch.float32).view(2, 3))
        sdf = torch.zeros(unit.shape[0])
        deformation = torch.zeros(unit.shape[0], 3)
        if cfg.fix_geometry:
            self.register_buffer("sdf", sdf)
            self.register_buffer("deformation", deformation)
        else:
            self.sdf = nn.Parameter(sdf)
            self.deformation = nn.Parameter(deformation)
        self.encoding = get_encoding(3, cfg.pos_encoding_config, f"{prefix}.pos_encoding_config")
        self.feature_network = get_mlp(
            self.encoding.n_output_dims, cfg.n_feature_dims, cfg.mlp_network_config, f"{prefix}.mlp_network_config"
        )
        # create_from a volume: the source's surface as a signed distance on its own (finer) grid and that
        # grid's box; seed_distance reads it (empty until seeded)
        self.register_buffer("seed_field", torch.zeros(0, 0, 0))
        self.register_buffer("seed_box", torch.zeros(2, 3))
        self._fixed_mesh: Dict[bool, IsosurfaceMesh] = {}  # fix_geometry: the mesh, by training mode
        self._band: Optional[Tuple[Tensor, Tensor]] = None  # (tetrahedra, their edges) near the surface

    def on_update_step(self, epoch: int, global_step: int) -> None:
        if global_step % max(1, self.cfg.band_refresh_every_n_steps) == 0:
            self._band = None

    def surface_band(self) -> Tuple[Tensor, Tensor]:
        """Indices of the tetrahedra near the surface (a vertex within ``band_cells`` cells, or a sign
        change) and of the edges they use."""
        if self._band is None:
            with torch.no_grad():
                near = self.sdf.abs() < self.cfg.band_cells * float(self.cell_size.max())
                inside = self.sdf > 0
                at_tets = inside[self.tets]
                keep = near[self.tets].any(dim=1) | (at_tets.any(dim=1) & ~at_tets.all(dim=1))
                band = torch.nonzero(keep).squeeze(1)
                self._band = (band, torch.unique(self.tet_edges[band]))
        return self._band

    @property
    def cell_size(self) -> Tensor:
        """(3,) world size of one grid cube."""
        return (self.bbox[1] - self.bbox[0]) / self.cfg.grid_resolution

    def grid_positions(self) -> Tensor:
        """(V, 3) world positions of the (deformed) grid vertices."""
        base = self.bbox[0] + self.unit_vertices * (self.bbox[1] - self.bbox[0])
        return base + self.cfg.deformation_scale * self.cell_size * torch.tanh(self.deformation)

    def isosurface(self) -> IsosurfaceMesh:
        """The marching-tetrahedra mesh (differentiable unless ``fix_geometry``, then cached)."""
        if self.cfg.fix_geometry and self.training in self._fixed_mesh:
            return self._fixed_mesh[self.training]
        if self.training and not self.cfg.fix_geometry:
            band, edge_ids = self.surface_band()
            vertices, faces = marching_tetrahedra(
                self.grid_positions(), self.sdf, self.tets[band], self.edges, self.tet_edges[band], edge_ids
            )
        else:
            vertices, faces = marching_tetrahedra(self.grid_positions(), self.sdf, self.tets, self.edges, self.tet_edges)
        if faces.shape[0] == 0:
            raise UserError(
                f"{self.config_prefix}: the SDF grid holds no surface (every vertex on one side): seed it "
                "with system.geometry_convert_from=<coarse stage checkpoint>"
            )
        if not self.training and self.cfg.isosurface_remove_outliers:
            # as the volume's export: specks (pieces under the outlier fraction of the faces) go
            kept_vertices, kept_faces = remove_small_components(
                vertices.detach().cpu().numpy(), faces.cpu().numpy(), self.cfg.isosurface_outlier_n_faces_threshold
            )
            vertices = torch.from_numpy(kept_vertices).to(vertices)
            faces = torch.from_numpy(kept_faces).to(faces)
        mesh = IsosurfaceMesh(vertices=vertices, faces=faces, level=0.0)
        if self.cfg.fix_geometry:
            self._fixed_mesh[self.training] = mesh
        return mesh

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> "TetrahedraSDFGrid":
        # .to()/.cpu()/.double() (Lightning moves the system back to the CPU after a GPU fit, before
        # --export): the cached mesh and band live on the old device and dtype, so mesh again.
        self._fixed_mesh, self._band = {}, None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, state_dict: Dict[str, Tensor], prefix: str, *args: Any, **kwargs: Any) -> None:
        self._fixed_mesh, self._band = {}, None  # the SDF may change: mesh again
        if prefix + "seed_field" in state_dict:  # its shape is the source's grid: take the checkpoint's
            self.seed_field = torch.empty_like(state_dict[prefix + "seed_field"], device=self.seed_field.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _features(self, points: Tensor) -> Tensor:
        return self.feature_network(self.encoding(self.normalize_points(points)))

    def forward(self, points: Tensor, output_normal: bool = False, **kwargs: Any) -> Dict[str, Tensor]:
        """World points (N, 3) on the surface -> raw colour ``features`` (N, n_feature_dims)."""
        return {"features": self._features(points)}

    def export(self, points: Tensor, **kwargs: Any) -> Dict[str, Tensor]:
        return {"features": self._features(points)}

    def seed_distance(self, points: Tensor) -> Tensor:
        """(N, 3) world points -> (N,) signed distance to the seed volume's surface (+ inside), read
        trilinearly from the source's own grid, finer than this one: a refine stage's anchor to the shape
        it started from (``lambda_seed_fidelity``)."""
        if self.seed_field.numel() == 0:
            raise UserError(
                f"{self.config_prefix}: no seed surface to stay near (set system.lambda_seed_fidelity=0, or create "
                "the grid from an implicit volume with system.geometry_convert_from)"
            )
        unit = (points - self.seed_box[0]) / (self.seed_box[1] - self.seed_box[0])
        grid = (unit.flip(-1) * 2.0 - 1.0).view(1, -1, 1, 1, 3)
        return F.grid_sample(self.seed_field[None, None], grid, align_corners=True, padding_mode="border").view(-1)

    # ----------------------------------------------------------------------------- stages
    def inherit_colour_field(self, source: nn.Module) -> None:
        """Copy ``source``'s colour field (encoding + feature network, same configs) into this one."""
        for name in ("encoding", "feature_network"):
            try:
                getattr(self, name).load_state_dict(getattr(source, name).state_dict())
            except (AttributeError, RuntimeError) as error:
                raise UserError(
                    f"{self.config_prefix}: cannot inherit the texture: the previous stage's '{name}' does not "
                    f"match this geometry's (use the same pos_encoding_config and mlp_network_config) ({error})"
                ) from None

    @torch.no_grad()
    def seed_from(self, source: nn.Module, inherit_texture: bool) -> None:
        """Initialise from the previous stage's geometry: another SDF grid (copied) or an implicit
        volume (the grid covers its tight box, the SDF is its cleaned field minus its level)."""
        if isinstance(source, TetrahedraSDFGrid):
            if source.cfg.grid_resolution != self.cfg.grid_resolution:
                raise UserError(
                    f"config key '{self.config_prefix}.grid_resolution' is {self.cfg.grid_resolution} but the previous "
                    f"stage's grid is {source.cfg.grid_resolution}; use the same"
                )
            self.bbox.copy_(source.bbox)
            self.seed_field, self.seed_box = source.seed_field.clone(), source.seed_box.clone()
            self.sdf.copy_(source.sdf)
            self.deformation.copy_(source.deformation)
        elif hasattr(source, "isosurface_grid"):
            self._seed_from_volume(source)
        else:
            raise UserError(f"{self.config_prefix}: cannot create a tetrahedra-sdf-grid from '{type(source).__name__}'")
        self._fixed_mesh, self._band = {}, None
        if inherit_texture:
            self.inherit_colour_field(source)

    def _seed_from_volume(self, source: nn.Module) -> None:
        from scipy import ndimage

        volume = source.isosurface_grid()
        values = volume.values - volume.level
        spacing = np.asarray(volume.spacing)
        bbox_min, bbox_max = volume.bbox_min.float(), volume.bbox_max.float()
        # The pieces a mesh export keeps (specks dropped, as the isosurface's outlier removal does),
        # each joined to the largest by a capsule across the shortest gap (below).
        labels, n_labels = ndimage.label(values > 0)
        sizes = np.bincount(labels.ravel())[1:]
        pieces = [1 + i for i in np.argsort(-sizes) if sizes[i] >= source.cfg.isosurface_outlier_n_faces_threshold * sizes.sum()]
        values = np.where((labels > 0) & ~np.isin(labels, pieces), -np.abs(values), values)
        bridges = self._bridges(labels, pieces, spacing, bbox_min.numpy())
        # Scale the field to world units near the surface: value / |gradient| there.
        gradient = np.linalg.norm(np.stack(np.gradient(values, *spacing)), axis=0)
        near = np.abs(values) < np.quantile(np.abs(values), 0.05)
        scale = float(np.median(gradient[near])) if near.any() else 1.0
        margin = 2.0 * (bbox_max - bbox_min) / self.cfg.grid_resolution  # room for the surface to move
        self.bbox.copy_(torch.stack([bbox_min - margin, bbox_max + margin]).to(self.bbox))
        field = torch.from_numpy(np.ascontiguousarray(values / max(scale, 1e-8))).float().to(self.bbox)
        # Join the pieces: union with capsules, max(field, radius - distance to the segment), on the
        # source's grid; the grid's SDF is that field sampled at its vertices.
        axes = [torch.linspace(float(lo), float(hi), n).to(field) for lo, hi, n in zip(bbox_min, bbox_max, field.shape)]
        field_points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).view(-1, 3)
        radius = self.cfg.bridge_radius_cells * float(self.cell_size.max())
        for start, end in bridges:
            start, end = torch.tensor(start).to(field), torch.tensor(end).to(field)
            along = ((field_points - start) @ (end - start) / (end - start).square().sum().clamp_min(1e-12)).clamp(0, 1)
            distance = (field_points - (start + along[:, None] * (end - start))).norm(dim=-1)
            field = torch.maximum(field, (radius - distance).view(field.shape))
        self.seed_field = field
        self.seed_box = torch.stack([bbox_min, bbox_max]).to(self.bbox)
        # The field at the grid vertices (outside the field's box: outside the object).
        points = self.bbox[0] + self.unit_vertices * (self.bbox[1] - self.bbox[0])
        unit = (points - self.seed_box[0]) / (self.seed_box[1] - self.seed_box[0])
        limit = self.cfg.sdf_init_clamp * float(self.cell_size.max())
        sdf = torch.where(((unit < 0) | (unit > 1)).any(dim=-1), torch.full_like(points[:, 0], -limit), self.seed_distance(points))
        self.sdf.copy_(sdf.clamp(-limit, limit))
        self.deformation.zero_()

    def _bridges(self, labels: np.ndarray, pieces: List[int], spacing: np.ndarray, origin: np.ndarray) -> List[Tuple[np.ndarray, np.ndarray]]:
        """World segments joining each smaller piece to the largest across their shortest gap, when the
        gap is at most ``bridge_max_gap`` of the object's size: a coarse volume often leaves a thin part
        (a mug's handle) as floating pieces, and an object is one piece."""
        from scipy import ndimage

        if len(pieces) < 2 or self.cfg.bridge_max_gap <= 0:
            return []
        main = labels == pieces[0]
        distance, nearest = ndimage.distance_transform_edt(~main, sampling=spacing, return_indices=True)
        occupied = np.argwhere(labels > 0)
        size = float(((occupied.max(0) - occupied.min(0)) * spacing).max())
        bridges = []
        for piece in pieces[1:]:
            voxels = np.argwhere(labels == piece)
            gaps = distance[tuple(voxels.T)]
            closest = voxels[int(np.argmin(gaps))]
            if gaps.min() <= self.cfg.bridge_max_gap * size:
                target = np.array([axis[tuple(closest)] for axis in nearest])
                bridges.append((origin + closest * spacing, origin + target * spacing))
        return bridges

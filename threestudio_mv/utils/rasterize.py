"""The project's one rasteriser, pure PyTorch (no nvdiffrast, no CUDA needed).

Two layers:

- :func:`rasterize_triangles_2d`: which grid cells lie inside 2D triangles. Bakes textures
  (triangles in UV space -> texels), casts axis-aligned rays through a mesh in evaluation, and is
  the coverage test of the mesh rasteriser below.
- nvdiffrast's split of differentiable mesh rendering, as three ops: :func:`rasterize` (clip-space
  triangles -> per-pixel triangle id, no gradient), :func:`interpolate` (vertex attributes at the
  covered pixels, with gradients to the attributes and to the vertex positions through recomputed
  perspective-correct barycentrics) and :func:`antialias` (blends the two pixels on either side of
  a silhouette edge by where the edge crosses between them, which gives vertex positions
  silhouette gradients). Written here because nvdiffrast is CUDA-only and not on PyPI, and no
  maintained CPU differentiable rasteriser is pip-installable (pytorch3d's wheels stopped in 2023).

Grid convention: cell (row i, column j) has its centre at (x, y) = (j + 0.5, i + 0.5) in the
triangles' coordinates. A centre exactly on an edge shared by two triangles belongs to exactly one of
them (the top-left rule, with edge functions evaluated identically for both triangles), so
triangulated surfaces are counted once per ray.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor


def _edge_coefficients(start: Tensor, end: Tensor) -> Tensor:
    """(F, 2) edge endpoints -> (F, 3) coefficients (A, B, C) of its edge function A*x + B*y + C.

    The function is twice the signed area of (start, end, point). The coefficients are computed from
    the endpoints in a canonical (lexicographic) order and then negated for a reversed edge, so two
    triangles sharing an edge get bit-identical values of opposite sign: no point on a shared edge is
    missed or claimed twice.
    """
    swap = (start[:, 0] > end[:, 0]) | ((start[:, 0] == end[:, 0]) & (start[:, 1] > end[:, 1]))
    low = torch.where(swap[:, None], end, start)
    high = torch.where(swap[:, None], start, end)
    a = low[:, 1] - high[:, 1]
    b = high[:, 0] - low[:, 0]
    c = -(a * low[:, 0] + b * low[:, 1])
    coefficients = torch.stack([a, b, c], dim=-1)
    return torch.where(swap[:, None], -coefficients, coefficients)


def _owns_edge(start: Tensor, end: Tensor) -> Tensor:
    """Tie rule: of the two opposite directions of an edge, exactly one owns points lying on it."""
    delta = end - start
    return (delta[..., 1] > 0) | ((delta[..., 1] == 0) & (delta[..., 0] > 0))


def rasterize_triangles_2d(
    triangles: Tensor, height: int, width: int, max_candidates: int = 1 << 22
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grid cells whose centres lie inside 2D triangles.

    ``triangles`` (F, 3, 2) are (x, y) vertex coordinates in grid units (x along columns, y along
    rows). Triangles are processed in chunks sorted by bounding-box size, each chunk testing at most
    about ``max_candidates`` cell centres. Returns ``face`` (K,) long, ``row`` (K,), ``col`` (K,) and
    ``barycentric`` (K, 3) weights of the triangle's three vertices, for every covered cell.
    Degenerate (zero-area) triangles cover nothing.
    """
    device, dtype = triangles.device, triangles.dtype
    a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]
    area = (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])
    flipped = area < 0
    # Orient every triangle so that its edge functions are positive inside.
    b, c = torch.where(flipped[:, None], c, b), torch.where(flipped[:, None], b, c)
    area = area.abs()
    low = torch.ceil(triangles.amin(dim=1) - 0.5).clamp_min(0).long()
    high = torch.floor(triangles.amax(dim=1) - 0.5)
    high = torch.minimum(high, torch.tensor([width - 1, height - 1], device=device, dtype=dtype)).long()
    extent = (high - low + 1).clamp_min(0)
    valid = (area > 0) & (extent > 0).all(dim=1)
    faces = torch.nonzero(valid).squeeze(1)
    side = extent[faces].amax(dim=1)
    order = torch.argsort(side)
    faces, side = faces[order], side[order]
    squared = side * side
    # Per triangle and edge (opposite vertex a, b, c): coefficients and the tie rule.
    coefficients = torch.stack([_edge_coefficients(b, c), _edge_coefficients(c, a), _edge_coefficients(a, b)], dim=1)
    owns = torch.stack([_owns_edge(b, c), _owns_edge(c, a), _owns_edge(a, b)], dim=1)
    out_face, out_row, out_col, out_bary = [], [], [], []
    start = 0
    while start < faces.numel():
        # Largest chunk whose candidate cells (count x largest box) stay within the budget;
        # the cost is non-decreasing along the size-sorted faces, so a binary search finds it.
        cost = torch.arange(1, faces.numel() - start + 1, device=device) * squared[start:]
        end = start + max(1, int(torch.searchsorted(cost, torch.tensor(max_candidates, device=device), right=True)))
        box = int(side[end - 1])
        chunk = faces[start:end]
        start = end
        offsets = torch.arange(box, device=device)
        rows = low[chunk, 1, None] + offsets  # (C, box)
        cols = low[chunk, 0, None] + offsets
        y, x = rows.to(dtype) + 0.5, cols.to(dtype) + 0.5
        inside = ((rows <= high[chunk, 1, None])[:, :, None] & (cols <= high[chunk, 0, None])[:, None, :])
        weights = []
        for edge in range(3):
            coef = coefficients[chunk, edge]
            # The edge function is separable: a column term plus a row term, broadcast.
            value = (coef[:, 0, None] * x)[:, None, :] + (coef[:, 1, None] * y + coef[:, 2, None])[:, :, None]
            inside &= torch.where(owns[chunk, edge, None, None], value >= 0, value > 0)
            weights.append(value)
        flat = torch.nonzero(inside.view(-1)).squeeze(1)  # 1D gathers are much cheaper than 3D ones
        index, row_offset, col_offset = flat // (box * box), (flat // box) % box, flat % box
        bary = torch.stack([w.view(-1)[flat] for w in weights], dim=-1) / area[chunk][index, None]
        # Undo the orientation swap so weights follow the input vertex order.
        swapped = flipped[chunk][index]
        bary = torch.where(swapped[:, None], bary[:, [0, 2, 1]], bary)
        out_face.append(chunk[index])
        out_row.append(rows[index, row_offset])
        out_col.append(cols[index, col_offset])
        out_bary.append(bary)
    if not out_face:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty, empty.clone(), torch.zeros(0, 3, dtype=dtype, device=device)
    return torch.cat(out_face), torch.cat(out_row), torch.cat(out_col), torch.cat(out_bary)


# ----------------------------------------------------------------------------- differentiable mesh ops
@dataclass
class Rasterization:
    """Result of :func:`rasterize` for B views: ``face_id`` (B, H, W) long, -1 where no triangle.

    ``pixels`` (B, V, 3) are the vertices' (column, row, w) (pixel units, row 0 at the top; w = the
    clip-space w, i.e. the depth along the camera's view axis), with gradient to the clip positions.
    """

    face_id: Tensor
    pixels: Tensor
    faces: Tensor
    depth: Optional[Tensor] = None  # (B, H, W) w of the visible surface, inf where none (no gradient)

    @property
    def mask(self) -> Tensor:
        """(B, H, W, 1) float coverage, 1 where a triangle is visible."""
        return (self.face_id >= 0).float()[..., None]


def clip_to_pixels(clip: Tensor, height: int, width: int) -> Tensor:
    """Clip-space positions (B, V, 4) -> (column, row, w) (B, V, 3), OpenGL NDC y up -> row 0 at top."""
    w = clip[..., 3]
    safe_w = torch.where(w.abs() < 1e-8, torch.full_like(w, 1e-8), w)
    col = (clip[..., 0] / safe_w + 1.0) * (0.5 * width)
    row = (1.0 - clip[..., 1] / safe_w) * (0.5 * height)
    return torch.stack([col, row, w], dim=-1)


def rasterize(
    clip: Tensor, faces: Tensor, height: int, width: int, near: float = 1e-3, cull_backfaces: bool = False
) -> Rasterization:
    """Visible triangle per pixel centre: coverage by :func:`rasterize_triangles_2d`, then a depth test
    (smallest perspective-correct depth wins; ties go to the smaller triangle id).

    ``clip`` (B, V, 4) clip-space vertices (``mvp @ [x, 1]``), ``faces`` (F, 3) long. Triangles with a
    vertex closer than ``near`` are dropped (no near-plane clipping: object-centred cameras); with
    ``cull_backfaces`` so are those seen from behind (counter-clockwise in NDC is the front, as in
    OpenGL): for closed meshes wound outward, whose back faces are always hidden, half the work.
    """
    pixels = clip_to_pixels(clip, height, width)
    face_ids, depths = [], []
    with torch.no_grad():
        for view in range(clip.shape[0]):
            screen = pixels[view].detach().double()
            keep = (screen[faces, 2] > near).all(dim=1)
            if cull_backfaces:  # counter-clockwise in NDC (y up) is clockwise in pixels (rows down)
                tri = screen[faces]
                a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
                keep &= (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]) < 0
            kept = torch.nonzero(keep).squeeze(1)
            face, row, col, bary = rasterize_triangles_2d(screen[faces[kept]][..., :2], height, width)
            face = kept[face]
            pixel = row * width + col
            # Screen-space barycentrics -> depth: 1/w is linear on screen.
            depth = 1.0 / (bary / screen[faces[face], 2]).sum(dim=1)
            nearest = torch.full((height * width,), float("inf"), dtype=depth.dtype, device=depth.device)
            nearest = nearest.scatter_reduce(0, pixel, depth, "amin")
            front = depth <= nearest[pixel]
            ids = torch.full((height * width,), faces.shape[0], dtype=torch.long, device=clip.device)
            ids = ids.scatter_reduce(0, pixel[front], face[front], "amin")
            face_ids.append(torch.where(ids == faces.shape[0], -1, ids).view(height, width))
            depths.append(nearest.to(clip.dtype).view(height, width))
    return Rasterization(face_id=torch.stack(face_ids), pixels=pixels, faces=faces, depth=torch.stack(depths))


def _edge_values(corners: Tensor, points: Tensor) -> Tensor:
    """Edge functions of triangles (K, 3, 2) at points (K, 2): (K, 3), entry k for the edge opposite
    vertex k, positive inside whatever the winding, summing to twice the triangle's area."""
    start, end = corners[:, [1, 2, 0]], corners[:, [2, 0, 1]]
    d, r = end - start, points[:, None] - start
    value = d[..., 0] * r[..., 1] - d[..., 1] * r[..., 0]
    area = value.sum(dim=1, keepdim=True)
    return value * torch.where(area < 0, -1.0, 1.0).to(value)


def _pixel_centres(index: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """Flat pixel indices (K,) -> (column, row) centres (K, 2)."""
    return torch.stack([(index % width).to(dtype) + 0.5, (index // width).to(dtype) + 0.5], dim=-1)


def interpolate(attributes: Tensor, rast: Rasterization) -> Tensor:
    """Perspective-correct interpolation of vertex ``attributes`` (V, C) or (B, V, C) at covered pixels:
    (B, H, W, C), zeros elsewhere. Differentiable in the attributes and in the vertex positions."""
    batch, height, width = rast.face_id.shape
    if attributes.dim() == 2:
        attributes = attributes[None].expand(batch, -1, -1)
    flat_ids = rast.face_id.reshape(batch, -1)
    view, index = torch.nonzero(flat_ids >= 0, as_tuple=True)
    corners = rast.faces[flat_ids[view, index]]  # (K, 3) vertex ids
    screen = rast.pixels[view[:, None], corners]  # (K, 3, 3)
    edge = _edge_values(screen[..., :2], _pixel_centres(index, width, screen.dtype))
    weighted = edge / screen[..., 2]
    bary = weighted / weighted.sum(dim=1, keepdim=True)
    values = (bary[..., None] * attributes[view[:, None], corners]).sum(dim=1)
    out = torch.zeros(batch, height * width, attributes.shape[-1], dtype=values.dtype, device=values.device)
    return out.index_put((view, index), values).view(batch, height, width, -1)


def face_neighbours(faces: Tensor) -> Tensor:
    """(F, 3) the face across the edge opposite each vertex, -1 on a boundary (manifold meshes)."""
    n_faces = faces.shape[0]
    edges = torch.stack([faces[:, [1, 2]], faces[:, [2, 0]], faces[:, [0, 1]]], dim=1).reshape(-1, 2)
    low, high = edges.min(dim=1).values, edges.max(dim=1).values
    key = low * (int(faces.max()) + 1 if n_faces else 1) + high
    order = torch.argsort(key)
    same = key[order[1:]] == key[order[:-1]]
    first, second = order[:-1][same], order[1:][same]
    neighbours = torch.full((n_faces * 3,), -1, dtype=torch.long, device=faces.device)
    neighbours[first] = second // 3
    neighbours[second] = first // 3
    return neighbours.view(n_faces, 3)


def silhouette_edges(rast: Rasterization, neighbours: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Per view, the edges between a face seen from the front and one seen from the back (or no face):
    returns view (K,) and the edge's two vertex ids (K,), (K,), each edge once."""
    faces = rast.faces
    corners = rast.pixels.detach()[:, faces, :2]  # (B, F, 3, 2)
    area = (corners[..., 1, 0] - corners[..., 0, 0]) * (corners[..., 2, 1] - corners[..., 0, 1]) - (
        corners[..., 1, 1] - corners[..., 0, 1]
    ) * (corners[..., 2, 0] - corners[..., 0, 0])
    facing = area > 0  # (B, F)
    other = neighbours.clamp_min(0)[None].expand(facing.shape[0], -1, -1)  # (B, F, 3)
    other_facing = torch.gather(facing[:, :, None].expand(-1, -1, 3), 1, other)
    face_index = torch.arange(faces.shape[0], device=faces.device)[None, :, None]
    edge = (neighbours[None] < 0) | ((other_facing != facing[:, :, None]) & (face_index < neighbours[None]))
    view, face, opposite = torch.nonzero(edge, as_tuple=True)
    return view, faces[face, (opposite + 1) % 3], faces[face, (opposite + 2) % 3]


def antialias(image: Tensor, rast: Rasterization, neighbours: Tensor = None) -> Tensor:
    """Silhouette antialiasing of ``image`` (B, H, W, C) (the composited render), after nvdiffrast's.

    Every silhouette edge (:func:`silhouette_edges`) is tested against the horizontally and
    vertically adjacent pixel pairs around it. Where it crosses the segment between the two pixel
    centres, lies in front of the farther pixel's surface (so it is visible) and the pixels show
    different triangles, the pixel on the nearer side is I, the other O, and t in (0, 1) is the
    crossing's distance from I: t > 1/2 covers (t - 1/2) of O with I's colour, t < 1/2 uncovers
    (1/2 - t) of I with O's. t is a function of the edge's screen positions, so the vertices get
    silhouette gradients. ``neighbours``: :func:`face_neighbours` of the faces, when known.
    """
    batch, height, width, channels = image.shape
    if neighbours is None:
        neighbours = face_neighbours(rast.faces)
    view, start_id, end_id = silhouette_edges(rast, neighbours)
    if view.numel() == 0:
        return image
    start, end = rast.pixels[view, start_id], rast.pixels[view, end_id]  # (K, 3): column, row, w
    lowest = torch.minimum(start, end)[:, :2].detach()
    span = (torch.maximum(start, end)[:, :2].detach() - lowest).max()
    offsets = torch.arange(int(span.ceil().clamp(max=64)) + 2, device=image.device)
    flat_image = image.reshape(batch * height * width, channels)
    ids, depth = rast.face_id.reshape(-1), rast.depth.reshape(-1)
    sizes = (width, height)  # pixel counts along x (columns) and y (rows)
    updates_index, updates_value = [], []
    for along in (0, 1):  # 0: horizontal pixel pairs on rows; 1: vertical pairs on columns
        across = 1 - along
        # the lines (rows or columns of pixel centres) that the edge's box spans
        line = torch.floor(lowest[:, across, None] - 0.5) + offsets[None].to(lowest) + 0.5  # (K, S)
        a_across, b_across = start[:, across, None], end[:, across, None]
        denominator = b_across - a_across
        flat_edge = denominator.detach().abs() < 1e-9
        s = (line - a_across) / torch.where(flat_edge, torch.ones_like(denominator), denominator)
        crossing = start[:, along, None] + s * (end[:, along, None] - start[:, along, None])  # (K, S)
        first = torch.floor(crossing.detach() - 0.5)  # pixel index left of / above the crossing
        line_index = (line - 0.5).long()
        valid = (s.detach() >= 0) & (s.detach() <= 1) & ~flat_edge
        valid &= (first >= 0) & (first + 1 < sizes[along]) & (line_index >= 0) & (line_index < sizes[across])
        edge_index, slot = torch.nonzero(valid, as_tuple=True)
        if edge_index.numel() == 0:
            continue
        base = view[edge_index] * height * width
        f, l = first[edge_index, slot].long(), line_index[edge_index, slot]
        if along == 0:
            p, q = base + l * width + f, base + l * width + f + 1
        else:
            p, q = base + f * width + l, base + (f + 1) * width + l
        t = crossing[edge_index, slot] - (f.to(crossing.dtype) + 0.5)  # from p's centre towards q's
        s_at = s[edge_index, slot].detach()
        edge_depth = start[edge_index, 2].detach() + s_at * (end[edge_index, 2] - start[edge_index, 2]).detach()
        near_is_p = depth[p] <= depth[q]
        inner, outer = torch.where(near_is_p, p, q), torch.where(near_is_p, q, p)
        visible = (ids[p] != ids[q]) & (ids[inner] >= 0) & (edge_depth < depth[outer])
        if not visible.any():
            continue
        inner, outer = inner[visible], outer[visible]
        t = torch.where(near_is_p[visible], t[visible], 1.0 - t[visible])  # from the inner pixel's centre
        covers_outer = t.detach() > 0.5
        amount = torch.where(covers_outer, t - 0.5, 0.5 - t)[:, None]
        delta = (flat_image[inner] - flat_image[outer]) * torch.where(covers_outer, 1.0, -1.0)[:, None].to(amount)
        updates_index.append(torch.where(covers_outer, outer, inner))
        updates_value.append(amount * delta)
    if not updates_index:
        return image
    flat = flat_image.index_add(0, torch.cat(updates_index), torch.cat(updates_value).to(flat_image.dtype))
    return flat.view(batch, height, width, channels)

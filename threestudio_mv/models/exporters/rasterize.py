"""A small pure-PyTorch 2D triangle rasteriser (no nvdiffrast, no CUDA).

Used to bake textures (triangles in UV space -> texels) and, in evaluation, to cast axis-aligned
rays through a mesh (triangles projected on a plane -> grid columns). Written here because the
rasterisers in the stack (nvdiffrast, OpenGL) need a GPU; this one runs anywhere torch does.

Grid convention: cell (row i, column j) has its centre at (x, y) = (j + 0.5, i + 0.5) in the
triangles' coordinates. A centre exactly on an edge shared by two triangles belongs to exactly one of
them (the top-left rule, with edge functions evaluated identically for both triangles), so
triangulated surfaces are counted once per ray.
"""
from typing import Tuple

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

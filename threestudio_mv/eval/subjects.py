"""Evaluation subjects: an object with renders at any camera and its true shape (and colours).

Shared by the image-to-3D and MVDreamBooth evaluations: a procedural asset (its SDF and albedo are
known exactly) or an outside mesh file coloured with a named colour, and the scores of a generated
mesh against a subject, optionally at its best turn about the vertical axis.
"""
import math
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch
import trimesh

from threestudio_mv.utils.errors import UserError

MESH_DIR = Path(__file__).resolve().parents[3] / "shared" / "meshes"  # the project's outside meshes, beside the checkout
MESH_UP_AXIS = "+y"  # the outside meshes' files (threestudio's load/shapes) are +y up


class Subject:
    """An object to evaluate: ``render(c2w, fovy, size)`` -> premultiplied RGBA (N, S, S, 4), and its
    true ``mesh`` (with ``sdf`` / ``albedo`` functions of points when known exactly)."""

    def __init__(self, name: str, render: Callable, mesh: trimesh.Trimesh, sdf: Any = None, albedo: Any = None,
                 path: Optional[Path] = None, colour: Optional[str] = None) -> None:
        self.name, self.render, self.mesh, self.sdf, self.albedo = name, render, mesh, sdf, albedo
        self.path, self.colour = path, colour  # a mesh subject's file and the colour it was given


def asset_subject(asset: Any, name: Optional[str] = None) -> Subject:
    """A procedural :class:`Asset` (exact SDF and albedo)."""
    from threestudio_mv.data.procedural import asset_mesh
    from threestudio_mv.data.procedural.render import render_views

    def render(c2w: torch.Tensor, fovy: torch.Tensor, size: int) -> torch.Tensor:
        out = render_views(asset, c2w, fovy, size)
        return torch.cat([out["rgb_fg"] * out["alpha"][..., None], out["alpha"][..., None]], dim=-1)

    return Subject(name or asset.caption, render, asset_mesh(asset), asset.sdf, asset.albedo)


def procedural_subject(caption: str) -> Subject:
    """The procedural asset of a vocabulary caption."""
    from threestudio_mv.data.procedural import parse_caption

    return asset_subject(parse_caption(caption))


def mesh_subject(spec: str, mesh_dir: Path = MESH_DIR) -> Subject:
    """``name:colour`` (``name``.obj of ``mesh_dir``, or a path; +y up) coloured with a named colour."""
    from threestudio_mv.data.mesh_render import load_subject_mesh, parse_colour, render_mesh

    name, _, colour = spec.partition(":")
    path = Path(name) if Path(name).suffix else Path(mesh_dir) / f"{name}.obj"
    if not path.is_file():
        raise UserError(f"subject '{spec}': no mesh file '{path}'")
    colour = colour or "gray"
    mesh = load_subject_mesh(path, MESH_UP_AXIS, parse_colour(colour))

    def render(c2w: torch.Tensor, fovy: torch.Tensor, size: int) -> torch.Tensor:
        out = render_mesh(mesh, c2w, fovy, size)
        return torch.cat([out["rgb_fg"] * out["alpha"][..., None], out["alpha"][..., None]], dim=-1)

    return Subject(f"{path.stem} ({colour})", render, mesh, path=path, colour=colour)


def straight_alpha(premultiplied: torch.Tensor) -> torch.Tensor:
    """Premultiplied RGBA (..., 4) -> straight alpha (what a PNG holds)."""
    alpha = premultiplied[..., 3:]
    return torch.cat([premultiplied[..., :3] / alpha.clamp_min(1e-3) * (alpha > 0), alpha], dim=-1).clamp(0.0, 1.0)


def turned(mesh: trimesh.Trimesh, azimuth_deg: float) -> trimesh.Trimesh:
    """``mesh`` turned by ``azimuth_deg`` about the vertical (z) axis."""
    out = mesh.copy()
    out.apply_transform(trimesh.transformations.rotation_matrix(math.radians(azimuth_deg), [0, 0, 1]))
    return out


def subject_scores(pred: trimesh.Trimesh, subject: Subject, turns: int = 1) -> Dict[str, float]:
    """Volumetric IoU, Chamfer-L1 and colour delta-E of ``pred`` against ``subject``; with ``turns`` > 1,
    at the best of that many turns about the vertical axis (by IoU; ``turn_deg`` says which), for
    results whose facing is free (text-to-3D of a subject)."""
    from threestudio_mv.eval.text_to_3d import iou_on_reference_lattice, shape_and_colour_scores

    angle = 0.0
    if turns > 1:
        angles = [360.0 * turn / turns for turn in range(turns)]
        angle = max(angles, key=lambda a: iou_on_reference_lattice(turned(pred, a), subject.mesh, subject.sdf))
    scores = shape_and_colour_scores(turned(pred, angle), subject.mesh, subject.sdf, subject.albedo)
    return {**scores, "turn_deg": angle}

"""The procedural asset library: coloured SDF objects with captions, a renderer and a dataset writer.

It is the project's stand-in for Objaverse: training data for the multi-view diffusion model,
subject images for DreamBooth and ground truth for evaluation. A caption determines its asset::

    from threestudio_mv.data.procedural import vocabulary, parse_caption, render_views, asset_mesh
    asset = parse_caption("a red mushroom with a white stem")
    asset.sdf(points), asset.albedo(points), asset.colour_names, asset.dominant_colour
    render_views(asset, c2w, fovy, size=64)["rgb"]        # (B, 64, 64, 3)
    asset_mesh(asset).export("gt.ply")

CLI: ``python -m threestudio_mv.data.procedural {vocab,render,mesh,dataset,sheet} --help``.

Assets sit in canonical pose: centred in [-0.5, 0.5]^3, up +z, front facing +x (azimuth 0).

Dataset format ``threestudio-mv-procedural-v1`` (written by ``dataset``):

- ``DIR/meta.json``: {"format": "threestudio-mv-procedural-v1", "num_assets", "views",
  "group_size": 4, "size", "split", "seed", "shard_size", "num_shards", "background": [1, 1, 1],
  "elevation_range", "fovy_range", "relative_distance_range"}.
- ``DIR/shard_{k:05d}.npz``, k = 0 .. num_shards - 1, ``shard_size`` assets each (the last may hold
  fewer), arrays: ``rgba`` uint8 (N, V, S, S, 4), straight alpha (colour = shaded object colour, 0
  where alpha is 0; composite over any background at load time); ``c2w`` float32 (N, V, 4, 4)
  (camera-to-world, OpenGL camera axes, z-up world, see :mod:`threestudio_mv.utils.camera`);
  ``fovy`` (degrees), ``elevation``, ``azimuth`` (degrees), ``camera_distances`` float32 (N, V);
  ``asset_index`` int64 (N,), the asset's position i in the dataset.
- ``DIR/shard_{k:05d}.json``: a list of N records {"asset_index", "caption" (canonical),
  "paraphrases" (list), "spec" (kind, key, part colours and the CSG tree)}.

Views: V is a multiple of 4; each consecutive group of 4 views shares elevation (0-30), fovy (30-50)
and distance (relative distance 0.85-1.0 scaled by 1/tan(fovy/2)), with azimuths 90 degrees apart
from a random start (``camera.sample_view_groups``). Asset i is
``vocabulary(split)[perm[i % len(vocabulary(split))]]`` with ``perm`` a permutation seeded by ``seed``
(so any prefix of the dataset mixes all kinds of captions, and a dataset larger than the vocabulary
cycles it with fresh cameras); its cameras are seeded by (seed, i). Shards are written atomically and
byte-identically for a seed; rerunning the command skips complete shards.
Reader: :class:`~threestudio_mv.data.procedural.dataset.ProceduralMultiviewDataset`.
"""
from threestudio_mv.data.procedural.assets import OBJECTS, SHAPES, Asset
from threestudio_mv.data.procedural.captions import is_held_out, parse_caption, vocabulary
from threestudio_mv.data.procedural.colours import COLOUR_NAMES, NAMED_COLOURS, nearest_colour_name
from threestudio_mv.data.procedural.mesh import asset_mesh
from threestudio_mv.data.procedural.render import render_views

__all__ = [
    "Asset",
    "COLOUR_NAMES",
    "NAMED_COLOURS",
    "OBJECTS",
    "SHAPES",
    "asset_mesh",
    "is_held_out",
    "nearest_colour_name",
    "parse_caption",
    "render_views",
    "vocabulary",
]

"""The procedural CLI: vocab, render (transforms.json cameras), mesh export, sheet and errors."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from threestudio_mv.data.procedural import asset_mesh, parse_caption, vocabulary
from threestudio_mv.data.procedural.__main__ import SHEET_CAPTIONS, main
from threestudio_mv.utils import camera
from threestudio_mv.utils.io import load_image

REPO = Path(__file__).resolve().parents[1]


def test_vocab_lists_each_split(capsys) -> None:
    main(["vocab", "--split", "heldout"])
    assert capsys.readouterr().out.splitlines() == vocabulary("heldout")
    main(["vocab"])
    assert len(capsys.readouterr().out.splitlines()) == len(vocabulary("all"))


def test_render_writes_a_posed_folder_whose_cameras_reproject_the_mesh(tmp_path: Path) -> None:
    caption = "a gray robot with a red head"
    main(["render", "--prompt", caption, "--views", "4", "--size", "48", "--out", str(tmp_path), "--elevation", "20"])
    transforms = json.loads((tmp_path / "transforms.json").read_text())
    assert transforms["camera_angle_x"] == pytest.approx(math.radians(40.0))
    assert "convention" in transforms and len(transforms["frames"]) == 4
    assert [frame["azimuth"] for frame in transforms["frames"]] == pytest.approx([0.0, 90.0, 180.0, 270.0])
    vertices = torch.tensor(asset_mesh(parse_caption(caption), resolution=64).vertices, dtype=torch.float32)
    for frame in transforms["frames"]:
        rgba = load_image(tmp_path / frame["file_path"])
        depth = np.load(tmp_path / frame["depth_file_path"])
        assert rgba.shape == (48, 48, 4) and depth.shape == (48, 48)
        assert frame["elevation"] == 20.0 and frame["fovy"] == 40.0
        c2w = torch.tensor(frame["transform_matrix"])
        projected = camera.project_points(vertices, c2w, frame["fovy"], 48, 48)
        cols = projected[:, 0].long().clamp(0, 47)
        rows = projected[:, 1].long().clamp(0, 47)
        alpha = torch.from_numpy(rgba[..., 3] > 0).float()[None, None]
        near_alpha = torch.nn.functional.max_pool2d(alpha, 3, stride=1, padding=1)[0, 0] > 0
        assert float(alpha[0, 0][rows, cols].mean()) > 0.95  # thin parts may fall between sub-pixels
        assert float(near_alpha[rows, cols].float().mean()) > 0.999
        # Depth of the visible surface is never farther than the nearest projected vertex there + 1 cell.
        assert float(depth.max()) < float(projected[:, 2].max()) and float(depth[depth > 0].min()) >= float(projected[:, 2].min()) - 0.02


@pytest.mark.parametrize("suffix", [".ply", ".obj", ".glb"])
def test_mesh_export(tmp_path: Path, suffix: str) -> None:
    out = tmp_path / f"gt{suffix}"
    main(["mesh", "--prompt", "a blue sphere on top of a white cube", "--out", str(out), "--resolution", "48"])
    loaded = trimesh.load(out, force="mesh")
    assert len(loaded.vertices) > 100 and len(loaded.faces) > 100
    assert float(loaded.bounds[1][2]) == pytest.approx(0.43, abs=0.03)


def test_sheet(tmp_path: Path, capsys) -> None:
    out = tmp_path / "sheet.png"
    main(["sheet", "--out", str(out), "--size", "16"])
    image = load_image(out)
    assert image.shape[:2] == (8 * 16 + 7 * 2, 12 * 16 + 11 * 2)
    assert capsys.readouterr().out.count("\n") >= len(SHEET_CAPTIONS)
    assert all(parse_caption(caption).caption == caption for caption in SHEET_CAPTIONS)


def test_user_errors_exit_with_code_2(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["mesh", "--prompt", "a red cube", "--out", str(tmp_path / "gt.stl")])
    assert exit_info.value.code == 2 and "--out must end with" in capsys.readouterr().err


def test_unknown_caption_from_the_command_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "threestudio_mv.data.procedural", "render", "--prompt", "a red cub", "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "closest known: 'a red cube'" in lines[0]

import pytest
import torch

import threestudio_mv
from threestudio_mv.utils.errors import UserError


def material(name, **config):
    return threestudio_mv.find(name)(config)


def test_no_material_is_sigmoid_of_features():
    features = torch.randn(10, 5)
    rgb = material("no-material")(features, None, None, None)
    torch.testing.assert_close(rgb, torch.sigmoid(features[:, :3]))
    torch.testing.assert_close(material("no-material").export(features)["albedo"], torch.sigmoid(features[:, :3]))
    scaled = material("no-material", color_activation="scale_-11_01")
    clamped = scaled(torch.tensor([[-3.0, 0.0, 0.5]]), None, None, None)
    torch.testing.assert_close(clamped, torch.tensor([[0.0, 0.5, 0.75]]))


def _shading_inputs(n=6):
    features = torch.randn(n, 3)
    positions = torch.zeros(n, 3)
    normals = torch.nn.functional.normalize(torch.randn(n, 3), dim=-1)
    lights = torch.tensor([[0.0, 0.0, 5.0]]).expand(n, 3)
    return features, positions, normals, lights


def test_diffuse_material_is_lambertian():
    mat = material("diffuse-with-point-light", ambient_light_color=[0.2, 0.2, 0.2], diffuse_light_color=[0.7, 0.7, 0.7])
    features, positions, normals, lights = _shading_inputs()
    albedo = torch.sigmoid(features)
    lambert = normals[:, 2:3].clamp(min=0)  # light straight above along +z
    expected_light = 0.2 + 0.7 * lambert
    args = dict(features=features, viewdirs=None, positions=positions, light_positions=lights, shading_normal=normals)
    torch.testing.assert_close(mat(**args, shading="diffuse"), albedo * expected_light)
    torch.testing.assert_close(mat(**args, shading="textureless"), expected_light.expand(-1, 3))
    torch.testing.assert_close(mat(**args, shading="albedo"), albedo)
    torch.testing.assert_close(mat(**args, shading="diffuse", ambient_ratio=1.0), albedo)
    torch.testing.assert_close(mat.export(features)["albedo"], albedo)


def test_shading_choice_follows_steps_and_probabilities():
    mat = material("diffuse-with-point-light", ambient_only_steps=100, diffuse_prob=0.75, textureless_prob=0.5)
    features, positions, normals, lights = _shading_inputs(4)
    features = torch.zeros_like(features)  # albedo 0.5 exactly: tells the modes apart
    args = dict(features=features, viewdirs=None, positions=positions, light_positions=lights, shading_normal=normals)
    mat.train()
    mat.update_step(0, 0)
    assert all(torch.equal(mat(**args), torch.full((4, 3), 0.5)) for _ in range(20))
    mat.update_step(0, 100)
    counts = {"albedo": 0, "textureless": 0, "diffuse": 0}
    expected = {name: mat(**args, shading=name) for name in counts}
    for _ in range(400):
        rgb = mat(**args)
        matches = [name for name, value in expected.items() if torch.allclose(rgb, value)]
        assert len(matches) == 1  # one shading mode for the whole call
        counts[matches[0]] += 1
    assert 60 < counts["albedo"] < 140 and 110 < counts["textureless"] < 190 and 110 < counts["diffuse"] < 190
    mat.eval()
    assert torch.allclose(mat(**args), expected["diffuse"])


def test_shades_with_normals_only_when_the_call_can_use_them():
    assert not material("no-material").shades_with_normals()
    mat = material("diffuse-with-point-light", ambient_only_steps=100)
    mat.update_step(0, 0)
    assert not mat.shades_with_normals() and mat.shades_with_normals(shading="diffuse")
    mat.update_step(0, 100)
    assert mat.shades_with_normals() and not mat.shades_with_normals(shading="albedo")
    # the answer holds: in the ambient-only steps the call ignores the normals it is not given
    features, positions, _, lights = _shading_inputs(4)
    mat.update_step(0, 0)
    mat.train()
    torch.testing.assert_close(mat(features, None, positions, lights, None), torch.sigmoid(features[:, :3]))


def test_soft_shading_draws_a_ratio_per_call():
    mat = material("diffuse-with-point-light", ambient_only_steps=0, diffuse_prob=1.0, textureless_prob=0.0,
                   soft_shading=True)
    features, positions, normals, lights = _shading_inputs()
    outputs = [mat(features, None, positions, lights, normals) for _ in range(5)]
    assert all(((o >= 0) & (o <= 1)).all() for o in outputs)
    assert not torch.allclose(outputs[0], outputs[1])


def test_diffuse_without_normals_is_a_user_error():
    mat = material("diffuse-with-point-light", ambient_only_steps=0)
    features, positions, _, lights = _shading_inputs()
    with pytest.raises(UserError, match="normal_type"):
        mat(features, None, positions, lights, None, shading="diffuse")
    with pytest.raises(UserError, match="shading"):
        mat(features, None, positions, lights, None, shading="phong")


def test_solid_color_background():
    dirs = torch.randn(2, 4, 5, 3)
    bg = threestudio_mv.find("solid-color")({"color": [0.2, 0.4, 0.6]})
    out = bg(dirs)
    assert out.shape == (2, 4, 5, 3)
    torch.testing.assert_close(out[1, 3, 4], torch.tensor([0.2, 0.4, 0.6]))
    assert len(list(bg.parameters())) == 0
    learned = threestudio_mv.find("solid-color")({"learned": True, "color": [0.5, 0.5, 0.5]})
    learned(dirs).sum().backward()
    assert learned.color.grad.abs().sum() > 0
    with pytest.raises(UserError, match="system.background.color"):
        threestudio_mv.find("solid-color")({"color": [1.0, 1.0]})


def test_neural_environment_map():
    bg = threestudio_mv.find("neural-environment-map")({"random_aug": True, "random_aug_prob": 1.0,
                                                        "eval_color": [0.0, 1.0, 0.0]})
    with torch.no_grad():
        for parameter in bg.network.parameters():
            parameter.normal_(0.0, 0.5)
    dirs = torch.randn(3, 8, 8, 3)
    bg.eval()
    torch.testing.assert_close(bg(dirs)[2, 7, 7], torch.tensor([0.0, 1.0, 0.0]))
    bg.cfg.eval_color = None
    out = bg(dirs)
    assert out.shape == (3, 8, 8, 3) and ((out > 0) & (out < 1)).all()
    assert out.reshape(-1, 3).std(0).min() > 1e-3  # depends on the direction
    torch.testing.assert_close(bg(dirs * 3.0), out)  # only the direction matters
    bg.train()
    augmented = bg(dirs)
    torch.testing.assert_close(augmented, augmented[0, 0, 0].expand_as(augmented))  # one colour for the batch
    augmented.sum().backward()  # the MLP stays in the graph
    bg.cfg.random_aug = False
    bg(dirs).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in bg.network.parameters())

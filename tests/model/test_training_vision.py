import numpy as np
import torch

from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion
from lavida_agent.model.training_vision import VisionProbeHead, patch_targets, pretrain_vision, probe_loss
from lavida_agent.tools.shapes_world.sampler import sample_scene
from lavida_agent.tools.shapes_world.scene import COLORS, SHAPES, Object, Scene


def test_patch_targets_label_each_objects_patches_and_its_centre_once():
    scene = Scene(objects=(Object("circle", "red", "large", (4, 4, 24, 24)),
                           Object("square", "blue", "small", (40, 44, 52, 56))), background="white")  # fmt: skip
    t = patch_targets(scene, patch=8)
    color = t["color"].reshape(8, 8)
    assert (color[0:3, 1:3] == list(COLORS).index("red")).all() and (color[1:3, 0] == 0).all()
    assert color[0, 0] == -1  # the disc has only 3 pixels in the corner patch: below MIN_PIXELS
    assert (color[5:7, 5:7] == list(COLORS).index("blue")).all()
    assert color[7, 0] == -1 and color[3:5, 3:5].max() == -1  # empty canvas
    assert (t["shape"][t["color"] == list(COLORS).index("blue")] == list(SHAPES).index("square")).all()
    assert t["center"].sum() == 2 and t["center"].reshape(8, 8)[1, 1] == 1  # centre (14, 14)
    blue = t["color"] == list(COLORS).index("blue")
    assert np.allclose(t["box"][blue], np.array([40, 44, 52, 56]) / 64)
    assert (t["box"][t["color"] < 0] == 0).all()


def test_patch_targets_find_every_object_of_random_scenes():
    rng = np.random.default_rng(3)
    for _ in range(50):
        scene = sample_scene(rng)
        t = patch_targets(scene)
        owned = {tuple(b) for b in np.round(t["box"][t["color"] >= 0] * 64).astype(int)}
        assert owned == {o.box for o in scene.objects}  # no object is too small to own a patch
        assert t["center"].sum() == len(scene.objects)


def test_pretrain_vision_lowers_the_probe_loss_and_touches_only_the_vision_encoder(tiny_config, tiny_vq):
    torch.manual_seed(0)
    model = LavidaForMaskedDiffusion(tiny_config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(7)
    scenes = [sample_scene(rng) for _ in range(8)]
    from lavida_agent.model.tasks import images_to_pixels
    from lavida_agent.tools.shapes_world.render import render

    pixels = images_to_pixels([render(s) for s in scenes])
    targets = {k: torch.from_numpy(np.stack([patch_targets(s, tiny_config.vision_patch_size)[k] for s in scenes]))
               for k in ("color", "shape", "size", "center", "box", "background")}  # fmt: skip
    torch.manual_seed(1)
    head = VisionProbeHead(tiny_config.hidden_size)
    with torch.no_grad():
        loss0, _ = probe_loss(head, model.vision(pixels), targets)
    final = pretrain_vision(model, tiny_vq, steps=12, batch_size=8, lr=3e-3, progress=False)
    assert set(final) == {"color", "shape", "size", "center", "background", "box"}
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("vision.") for k in changed)
    # A fresh linear probe fitted briefly on the trained features beats one on the untrained ones.
    def fitted(feats):
        torch.manual_seed(1)
        h = VisionProbeHead(tiny_config.hidden_size)
        opt = torch.optim.Adam(h.parameters(), lr=1e-2)
        for _ in range(30):
            loss, _ = probe_loss(h, feats, targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return loss.item()

    with torch.no_grad():
        fresh = LavidaForMaskedDiffusion(tiny_config)
        fresh.load_state_dict(before)
        untrained, trained = fresh.vision(pixels), model.vision(pixels)
    assert fitted(trained) < fitted(untrained)
    assert float(loss0) > 0


def test_probe_box_target_is_the_location_code_when_the_model_has_one():
    scene = sample_scene(np.random.default_rng(11))
    t = {k: torch.from_numpy(np.asarray(v))[None] for k, v in patch_targets(scene).items()}
    feats = torch.randn(1, 64, 32)
    plain, coded = VisionProbeHead(32), VisionProbeHead(32, loc_code_dim=8)
    assert plain(feats)["box"].shape[-1] == 4 and coded(feats)["box"].shape[-1] == 4 * 8
    for head in (plain, coded):
        loss, parts = probe_loss(head, feats, t)
        assert torch.isfinite(loss) and parts["box"] > 0


def test_patch_targets_of_an_empty_scene_label_no_patch():
    from lavida_agent.tools.shapes_world.scene import Scene

    t = patch_targets(Scene(background="white", objects=()), 8)
    assert (t["color"] == -1).all() and (t["shape"] == -1).all() and not t["center"].any()

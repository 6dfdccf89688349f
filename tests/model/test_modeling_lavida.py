"""Elastic-MoT model: shapes, routing, modality isolation, elastic and cached paths, loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lavida_agent.model.configuration_lavida import PRESETS, LavidaConfig
from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion, count_parameters, plan_items_in, sincos_2d
from lavida_agent.model.tasks import PLAN_LEN, build_edit, build_t2i, pack
from lavida_agent.model.training import TASK_WEIGHTS, TaskSampler, make_batch

# Elastic and cached paths compute the same sums in a different grouping: equal to
# float32 rounding. Measured max abs difference is 0 on CPU; allow 1e-5.
ATOL = 1e-5


def t2i_batch(config, n=2, text_len=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    P = config.positions_per_image
    text = torch.randint(config.loc_token_offset + 65, config.vocab_size, (n, text_len), generator=g)
    ids = torch.cat([text, torch.full((n, P), config.img_gen_token_id)], 1)
    seg = torch.cat([torch.zeros(n, text_len, dtype=torch.long), torch.ones(n, P, dtype=torch.long)], 1)
    G = config.image_grid
    codes = torch.randint(0, config.codebook_size + 1, (n, G, G), generator=g)
    return ids, seg, codes


@pytest.mark.parametrize("task", list(TASK_WEIGHTS))
def test_every_task_builds_and_trains(task, tokenizer, tiny_config, tiny_vq, tiny_model):
    sampler = TaskSampler(tokenizer, tiny_config, tiny_vq)
    batch, image_labels = make_batch(sampler, task, np.random.default_rng(0), 3, tiny_config)
    with torch.no_grad():
        plain = tiny_model(**batch.model_inputs())
    B, L = batch.input_ids.shape
    assert plain.text_logits.shape == (B, L, tiny_config.vocab_size)
    if task in ("t2i", "t2i_plan", "edit"):
        assert plain.image_logits.shape == (3, 16, 16, tiny_config.codebook_size)
    out = tiny_model(**batch.model_inputs(), labels=batch.text_targets, image_labels=image_labels)
    assert torch.isfinite(out.loss) and out.loss > 0
    # the loss on selected rows equals cross-entropy over the full logits
    text_ce = torch.nn.functional.cross_entropy(
        plain.text_logits.reshape(-1, tiny_config.vocab_size), batch.text_targets.reshape(-1)
    ) if (batch.text_targets != -100).any() else torch.tensor(0.0)
    torch.testing.assert_close(out.text_loss, text_ce, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    grads = [p.grad for p in tiny_model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    tiny_model.zero_grad(set_to_none=True)


def test_elastic_activation_equals_full_computation(tiny_model):
    ids, seg, codes = t2i_batch(tiny_model.config)
    with torch.no_grad():
        full = tiny_model(ids, gen_codes=codes, segment_ids=seg).image_logits
        elastic = tiny_model(ids, gen_codes=codes, segment_ids=seg, elastic=True).image_logits
    torch.testing.assert_close(elastic, full, atol=ATOL, rtol=0)


def test_condition_cache_equals_full_computation(tiny_model):
    ids, seg, codes = t2i_batch(tiny_model.config)
    T = 9
    with torch.no_grad():
        full = tiny_model(ids, gen_codes=codes, segment_ids=seg).image_logits
        cache = tiny_model(ids[:, :T], segment_ids=seg[:, :T], use_cache=True, elastic=True).cache
        cached = tiny_model(ids[:, T:], gen_codes=codes, segment_ids=seg[:, T:],
                            condition_cache=cache, elastic=True).image_logits  # fmt: skip
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)


def test_cached_edit_with_source_codes_equals_full(tokenizer, tiny_config, tiny_model, scene_image):
    src = np.random.default_rng(0).integers(0, 32, (16, 16))
    exs = [build_edit(tokenizer, tiny_config, "remove the red circle", scene_image, src, codes=src)]
    b = pack(exs, tiny_config, pad_left=True)
    P = tiny_config.positions_per_image
    c = b.input_ids.shape[1] - P
    with torch.no_grad():
        full = tiny_model(**b.model_inputs()).image_logits
        cache = tiny_model(b.input_ids[:, :c], gen_codes=b.gen_codes[:1], pixel_values=b.pixel_values,
                           segment_ids=b.segment_ids[:, :c], use_cache=True, elastic=True).cache  # fmt: skip
        cached = tiny_model(b.input_ids[:, c:], gen_codes=b.gen_codes[1:], segment_ids=b.segment_ids[:, c:],
                            condition_cache=cache, elastic=True).image_logits  # fmt: skip
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)


def test_text_reaches_images_only_through_joint_layers(tiny_config):
    """With no joint layer, text cannot influence image logits at all (the condition pool
    starts at zero); with one joint layer, or an open pool, it does."""
    ids, seg, codes = t2i_batch(tiny_config)
    other = ids.clone()
    other[:, 0] = (other[:, 0] + 1) % tiny_config.vocab_size
    for joint, pool, expect_change in ((0, False, False), (1, False, True), (0, True, True)):
        torch.manual_seed(0)
        cfg = LavidaConfig(**{**tiny_config.to_dict(), "joint_layers": joint})
        model = LavidaForMaskedDiffusion(cfg).eval()
        if pool:
            _open_pool(model)
        with torch.no_grad():
            a = model(ids, gen_codes=codes, segment_ids=seg).image_logits
            b = model(other, gen_codes=codes, segment_ids=seg).image_logits
        assert (not torch.equal(a, b)) == expect_change, f"joint_layers={joint}, open pool: {pool}"


def test_one_way_attention_keeps_condition_blind_to_targets(tiny_model):
    """Changing the codes being generated never changes a condition position's output."""
    ids, seg, codes = t2i_batch(tiny_model.config)
    other = (codes + 1) % tiny_model.config.codebook_size
    with torch.no_grad():
        a = tiny_model(ids, gen_codes=codes, segment_ids=seg).text_logits[:, :9]
        b = tiny_model(ids, gen_codes=other, segment_ids=seg).text_logits[:, :9]
        # and the other way: with full attention the condition does see the target
        cfg = LavidaConfig(**{**tiny_model.config.to_dict(), "attention_mode": "full"})
        full = LavidaForMaskedDiffusion(cfg).eval()
        full.load_state_dict(tiny_model.state_dict())
        c = full(ids, gen_codes=codes, segment_ids=seg).text_logits[:, :9]
        d = full(ids, gen_codes=other, segment_ids=seg).text_logits[:, :9]
    assert torch.equal(a, b)
    assert not torch.equal(c, d)


def test_a_row_is_computed_alike_in_any_batch(tokenizer, tiny_config):
    """Bit for bit: left padding and batch companions change nothing of a row's outputs
    (positions count from its content; attention, the condition pool and the copy head read
    its content alone: `content_groups`), images and text alike."""
    model = _open_pool(_with_open_copy_gate(tiny_config))
    prompts = ["a red circle", "a red circle and a blue square on a white background", "two blue squares"]
    rows = [build_t2i(tokenizer, tiny_config, p) for p in prompts]
    with torch.no_grad():
        alone = model(**pack(rows[:1], tiny_config, pad_left=True).model_inputs()).image_logits[0]
        for batch in ([0, 1], [1, 2, 0]):
            out = model(**pack([rows[i] for i in batch], tiny_config, pad_left=True).model_inputs())
            assert torch.equal(out.image_logits[batch.index(0)], alone)
        plan_alone = model(**_plan_slot(tokenizer, tiny_config, prompts[:1]).model_inputs()).text_logits[0]
        plan_both = model(**_plan_slot(tokenizer, tiny_config, prompts[1::-1]).model_inputs()).text_logits[1]
    assert plan_both.shape[0] > plan_alone.shape[0]  # padded in the batch
    assert torch.equal(plan_both[-plan_alone.shape[0]:], plan_alone)


def test_placeholder_count_mismatch_is_a_clear_error(tiny_model):
    ids, seg, codes = t2i_batch(tiny_model.config)
    with pytest.raises(ValueError, match="placeholder positions"):
        tiny_model(ids, gen_codes=codes[:1], segment_ids=seg)


def test_save_and_load_give_identical_outputs(tiny_model, tmp_path):
    ids, seg, codes = t2i_batch(tiny_model.config)
    tiny_model.save_pretrained(tmp_path)
    loaded = LavidaForMaskedDiffusion.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        a = tiny_model(ids, gen_codes=codes, segment_ids=seg)
        b = loaded(ids, gen_codes=codes, segment_ids=seg)
    assert torch.equal(a.image_logits, b.image_logits)
    assert torch.equal(a.text_logits, b.text_logits)


def test_pack_names_an_empty_batch(tiny_config):
    with pytest.raises(ValueError, match="empty batch"):
        pack([], tiny_config)


def test_sincos_2d_codes_are_distinct_per_cell():
    code = sincos_2d(8, 32)
    assert code.shape == (64, 32)
    assert torch.cdist(code, code).add(torch.eye(64) * 1e3).min() > 0.1  # no two cells alike
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(8, 30)


@pytest.mark.parametrize("stem", ["linear", "modulated", "conv"])
def test_vision_encoder_tells_where_a_patch_is(tiny_config, stem):
    """The same patch content at two places gives two different tokens, in both stems."""
    config = LavidaConfig(**{**tiny_config.to_dict(), "vision_stem": stem})
    torch.manual_seed(0)
    encoder = LavidaForMaskedDiffusion(config).vision.eval()
    p = config.vision_patch_size
    image = torch.full((1, 3, config.image_size, config.image_size), 0.5)
    a, b = image.clone(), image.clone()
    a[..., :p, :p] = 1.0  # a bright patch at cell 0 ...
    b[..., :p, p : 2 * p] = 1.0  # ... or at cell 1
    with torch.no_grad():
        fa, fb = encoder(a)[0], encoder(b)[0]
    assert not torch.allclose(fa[0], fb[1], atol=1e-4)
    assert hasattr(encoder, "patch_embed" if stem == "linear" else "stem")


@pytest.mark.parametrize("stem, sees_neighbours", [("modulated", False), ("conv", True)])
def test_conv_stem_cells_see_beyond_their_patch(tiny_config, stem, sees_neighbours):
    """A conv-stem cell's content code reacts to pixels of the neighbouring patches (a
    shape's silhouette), a modulated-stem cell's only to its own patch."""
    config = LavidaConfig(**{**tiny_config.to_dict(), "vision_stem": stem})
    torch.manual_seed(0)
    encoder = LavidaForMaskedDiffusion(config).vision.eval()
    p, side = config.vision_patch_size, config.image_size // config.vision_patch_size
    a = torch.full((1, 3, config.image_size, config.image_size), 0.5)
    b = a.clone()
    b[..., p : 2 * p, 2 * p : 3 * p] = 1.0  # change cell (1, 2) only
    with torch.no_grad():
        codes = []
        for image in (a, b):
            x = (image - 0.5) / 0.5
            if stem == "conv":
                codes.append(encoder.stem(x).flatten(2).transpose(1, 2)[0])
            else:
                x = x.unfold(2, p, p).unfold(3, p, p).permute(0, 2, 3, 1, 4, 5).reshape(1, side * side, -1)
                codes.append(encoder.stem(x)[0])
    changed = (codes[0] - codes[1]).abs().amax(-1) > 1e-6
    assert changed[1 * side + 2]
    assert bool(changed[1 * side + 1]) is sees_neighbours  # the cell to its left
    assert not changed[side * side - 1]  # a far corner stays put in both


def test_conv_stem_output_matches_the_token_grid(tiny_config):
    config = LavidaConfig(**{**tiny_config.to_dict(), "vision_stem": "conv"})
    model = LavidaForMaskedDiffusion(config)
    feats = model.vision(torch.rand(3, 3, config.image_size, config.image_size))
    assert feats.shape == (3, config.vision_tokens_per_image, config.hidden_size)


def test_configs_without_vision_stem_mean_linear(tiny_config, tmp_path):
    """Checkpoints written before `vision_stem` existed load as the linear stem."""
    config = LavidaConfig(**{**tiny_config.to_dict(), "vision_stem": "linear"})
    model = LavidaForMaskedDiffusion(config)
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw.pop("vision_stem")
    (tmp_path / "config.json").write_text(json.dumps(raw))
    loaded = LavidaForMaskedDiffusion.from_pretrained(tmp_path)
    assert loaded.config.vision_stem == "linear" and hasattr(loaded.vision, "patch_embed")
    assert PRESETS["shapes"]["vision_stem"] == "conv"  # new runs use the stem that reads shape


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(hidden_size=30, num_heads=4), "divisible by num_heads"),
        (dict(joint_layers=5, num_layers=2), "joint_layers"),
        (dict(gen_hidden_size=128, hidden_size=64), "gen_hidden_size"),
        (dict(image_grid=15), "image_grid"),
        (dict(attention_mode="causal"), "attention_mode"),
        (dict(mask_token_id=10_000), "mask_token_id"),
        (dict(vision_stem="cnn"), "vision_stem"),
        (dict(vision_stem="conv", image_size=48, image_grid=12, vision_patch_size=12), "power-of-two"),
        (dict(vision_stem="modulated", vision_hidden_size=36, vision_heads=2), "divisible by 8"),
    ],
)
def test_config_validation_names_the_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        LavidaConfig(**{**PRESETS["tiny"], **overrides})


def test_lavida_o_preset_matches_the_released_shapes():
    """FACTS §2.6: 8.02B und (incl. embeddings/head) and 2.416B gen, built without memory."""
    with torch.device("meta"):
        model = LavidaForMaskedDiffusion(LavidaConfig(**PRESETS["lavida-o"]))
    counts = count_parameters(model)
    assert abs(counts["und"] / 1e9 - 8.02) < 0.01
    assert abs(counts["gen"] / 1e9 - 2.416) < 0.01
    assert next(model.parameters()).device.type == "meta"


def test_training_examples_have_no_unknown_tokens(tiny_vq):
    """Every word the grammars and templates produce, and every special token inside plan
    text (`<LOC_12>`, which must not be lower-cased), is in the vocabulary."""
    from lavida_agent.model.tokenization_lavida import build_tokenizer
    from lavida_agent.model.training import corpus_for_tokenizer, token_ids

    tok = build_tokenizer(corpus_for_tokenizer(100))
    cfg = LavidaConfig(**{**PRESETS["tiny"], **token_ids(tok), "codebook_size": 32})
    sampler = TaskSampler(tok, cfg, tiny_vq)
    for task in TASK_WEIGHTS:
        for ex in sampler.examples(task, np.random.default_rng(5), 12):
            assert tok.unk_token_id not in ex.input_ids, (task, tok.decode(ex.input_ids))
    plan = sampler.examples("plan", np.random.default_rng(0), 1)[0]
    assert tok.convert_tokens_to_ids("<LOC_BEGIN>") in plan.input_ids


def test_location_code_starts_at_zero_and_learns(tiny_config):
    """The location code's projections start at zero (old weights load into the same
    function) and get gradient from the first step."""
    from lavida_agent.model.modeling_lavida import LavidaForMaskedDiffusion

    torch.manual_seed(0)
    model = LavidaForMaskedDiffusion(tiny_config)
    projections = [model.loc_in, model.loc_out, model.image_embed.pos_code_proj]
    assert all(not p.weight.detach().any() for p in projections)
    cfg = tiny_config
    loc = cfg.loc_token_offset
    ids = torch.tensor([[loc + 3, loc + 40, cfg.mask_token_id] + [cfg.img_gen_token_id] * cfg.positions_per_image])
    codes = torch.full((1, cfg.image_grid, cfg.image_grid), cfg.image_mask_code)
    labels = torch.full_like(ids, -100)
    labels[0, 2] = loc + 5
    image_labels = torch.zeros(1, cfg.image_grid, cfg.image_grid, dtype=torch.long)
    model(ids, gen_codes=codes, labels=labels, image_labels=image_labels).loss.backward()
    assert all(float(p.weight.grad.abs().sum()) > 0 for p in projections)


# ----------------------------------------------------------------------------- plan layout

PLAN = [("large red circle", (4, 4, 26, 26)), ("small blue square", (40, 40, 52, 52))]


def _with_random_layout(config, seed=0):
    """A model whose layout projections are not zero (they start at zero when trained)."""
    torch.manual_seed(seed)
    model = LavidaForMaskedDiffusion(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layout_" in name:
                p.normal_(0, 0.2)
    return model


def test_plan_items_in_reads_visible_items_only(tokenizer, tiny_config):
    ids = build_t2i(tokenizer, tiny_config, "a red circle", plan=PLAN).input_ids
    items = plan_items_in(ids, tiny_config)
    assert [box for _, box in items] == [(4, 4, 26, 26), (40, 40, 52, 52)]  # 65 bins over 64 px
    assert tokenizer.decode(items[0][0]) == "large red circle"
    # a masked word or location hides that item only; an inverted box is no item
    loc = tiny_config.loc_token_offset
    first_word = ids.index(tiny_config.box_start_token_id) + 1
    masked = list(ids)
    masked[first_word] = tiny_config.mask_token_id
    assert [box for _, box in plan_items_in(masked, tiny_config)] == [(40, 40, 52, 52)]
    last = [i for i, t in enumerate(ids) if t == tiny_config.loc_begin_token_id][-1]
    inverted = list(ids)
    inverted[last + 1], inverted[last + 3] = loc + 52, loc + 40
    assert [box for _, box in plan_items_in(inverted, tiny_config)] == [(4, 4, 26, 26)]
    assert plan_items_in(build_t2i(tokenizer, tiny_config, "a red circle").input_ids, tiny_config) == []


def test_plan_layout_changes_only_the_covered_cells_of_targets(tokenizer, tiny_config):
    model = _with_random_layout(tiny_config)
    G = tiny_config.image_grid
    codes = torch.randint(0, 32, (1, G, G), generator=torch.Generator().manual_seed(1))
    ex = build_t2i(tokenizer, tiny_config, "a red circle", plan=PLAN[:1])
    bare = build_t2i(tokenizer, tiny_config, "a red circle")
    with torch.no_grad():
        slot = model._layout(torch.tensor([ex.input_ids]), torch.arange(len(ex.input_ids) - 64, len(ex.input_ids)),
                             torch.ones(64, dtype=torch.bool), 1, [plan_items_in(ex.input_ids, tiny_config)])  # fmt: skip
        a = model(**{**pack([ex], tiny_config).model_inputs(), "gen_codes": codes}).image_logits
        b = model(**{**pack([bare], tiny_config).model_inputs(), "gen_codes": codes}).image_logits
    touched = slot[0].abs().sum(-1) > 0  # (G, G): the 4 px cells that the box [4, 26) grown 1 px meets
    assert touched[:7, :7].all() and touched.sum() == 49
    assert not torch.allclose(a, b)


def test_zero_layout_is_the_model_without_it(tokenizer, tiny_config):
    """Weights trained before the plan layout load into the same function (it starts at zero)."""
    torch.manual_seed(0)
    old = LavidaForMaskedDiffusion(LavidaConfig(**{**tiny_config.to_dict(), "plan_layout": False})).eval()
    new = LavidaForMaskedDiffusion(tiny_config).eval()
    missing, unexpected = new.load_state_dict(old.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith(new.fresh_at_zero) for k in missing)
    b = pack([build_t2i(tokenizer, tiny_config, "a red circle", plan=PLAN)], tiny_config)
    codes = torch.randint(0, 32, (1, 16, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(new(**{**b.model_inputs(), "gen_codes": codes}).image_logits,
                                   old(**{**b.model_inputs(), "gen_codes": codes}).image_logits)  # fmt: skip


def test_cached_generation_keeps_the_plan_layout(tokenizer, tiny_config):
    model = _with_random_layout(tiny_config)
    exs = [build_t2i(tokenizer, tiny_config, "a red circle and a blue square", plan=PLAN),
           build_t2i(tokenizer, tiny_config, "a red circle")]  # fmt: skip
    b = pack(exs, tiny_config, pad_left=True)
    c = b.input_ids.shape[1] - tiny_config.positions_per_image
    codes = torch.randint(0, 32, (2, 16, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(**{**b.model_inputs(), "gen_codes": codes}).image_logits
        cache = model(b.input_ids[:, :c], segment_ids=b.segment_ids[:, :c], attention_mask=b.attention_mask[:, :c],
                      use_cache=True, elastic=True).cache  # fmt: skip
        cached = model(b.input_ids[:, c:], gen_codes=codes, segment_ids=b.segment_ids[:, c:],
                       attention_mask=b.attention_mask[:, c:], condition_cache=cache, elastic=True).image_logits  # fmt: skip
        twice = cache.repeat_interleave(2)
        again = model(b.input_ids[:, c:].repeat_interleave(2, 0), gen_codes=codes.repeat_interleave(2, 0),
                      segment_ids=b.segment_ids[:, c:].repeat_interleave(2, 0),
                      attention_mask=b.attention_mask[:, c:].repeat_interleave(2, 0),
                      condition_cache=twice, elastic=True).image_logits  # fmt: skip
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(again[::2], full, atol=ATOL, rtol=0)


def test_fresh_text_embeddings_start_at_unit_scale(tiny_config):
    """Token embeddings at ~1 (copying the prompt's words needs them visible in the
    residual); every other weight keeps `initializer_range`."""
    torch.manual_seed(0)
    model = LavidaForMaskedDiffusion(tiny_config)
    assert 0.8 < float(model.embed_tokens.weight.detach().std()) < 1.2
    assert float(model.image_embed.code_embed.weight.detach().std()) < 0.05


@pytest.mark.parametrize("stem", ["modulated", "conv"])
def test_tables_first_built_in_inference_mode_still_train(tiny_config, stem):
    """The cached position tables may be built first under `torch.inference_mode()` (a
    server, a benchmark) and then serve a training step in the same process."""
    from lavida_agent.model.modeling_lavida import grid_code, loc_code_table, sincos_2d

    for table in (sincos_2d, loc_code_table, grid_code):
        table.cache_clear()
    config = LavidaConfig(**{**tiny_config.to_dict(), "vision_stem": stem})
    model = LavidaForMaskedDiffusion(config)
    image = torch.rand(1, 3, config.image_size, config.image_size)
    with torch.inference_mode():
        model.vision(image)
    model.vision(image).sum().backward()
    assert model.vision.stem[0].weight.grad is not None


# --------------------------------------------------------------------------- copy head


def _without_copy_head(model, config):
    plain = LavidaForMaskedDiffusion(LavidaConfig(**{**config.to_dict(), "copy_dim": 0})).eval()
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and all(k.startswith("copy_") for k in unexpected)
    return plain


def _with_open_copy_gate(config, bias=3.0):
    torch.manual_seed(0)
    model = LavidaForMaskedDiffusion(config).eval()
    with torch.no_grad():
        model.copy_gate.bias.fill_(bias)
    return model


def _plan_slot(tokenizer, config, prompts, **kw):
    return pack([build_t2i(tokenizer, config, p, with_plan=True, with_image=False, **kw) for p in prompts],
                config, pad_left=True)  # fmt: skip


def test_zero_copy_gate_is_the_model_without_it(tokenizer, tiny_config):
    """Weights trained before the copy head load into the same function (its gate starts at zero)."""
    torch.manual_seed(0)
    new = LavidaForMaskedDiffusion(tiny_config).eval()
    assert torch.all(new.copy_gate.weight == 0) and torch.all(new.copy_gate.bias == 0)
    old = _without_copy_head(new, tiny_config)
    inputs = _plan_slot(tokenizer, tiny_config, ["a red circle"]).model_inputs()
    with torch.no_grad():
        torch.testing.assert_close(new(**inputs).text_logits, old(**inputs).text_logits, atol=0, rtol=0)


def test_copy_head_adds_only_tokens_of_earlier_segments(tokenizer, tiny_config):
    model = _with_open_copy_gate(tiny_config, bias=3.0)
    inputs = _plan_slot(tokenizer, tiny_config, ["the red circle"]).model_inputs()
    with torch.no_grad():
        bonus = (model(**inputs).text_logits - _without_copy_head(model, tiny_config)(**inputs).text_logits)[0]
    ids, seg = inputs["input_ids"][0], inputs["segment_ids"][0]
    assert bonus[seg == 0].abs().max() == 0  # the prompt has nothing earlier to copy
    answer = bonus[seg == 1]  # (PLAN_LEN, V)
    torch.testing.assert_close(answer.sum(-1), torch.full((len(answer),), 3.0))  # gate x a distribution
    sources = {t for t in ids[seg == 0].tolist() if model.copyable(torch.tensor(t))}
    others = [v for v in range(tiny_config.vocab_size) if v not in sources]
    assert answer[:, others].abs().max() == 0  # never a token that is not in the prompt
    assert (answer[:, tokenizer.convert_tokens_to_ids("red")] > 0).all()
    assert not model.copyable(torch.tensor([tiny_config.mask_token_id, tiny_config.eos_token_id])).any()


def test_condition_cache_keeps_the_copy_head(tokenizer, tiny_config):
    model = _with_open_copy_gate(tiny_config)
    b = _plan_slot(tokenizer, tiny_config, ["a red circle", "the circle to the left"])
    c = b.input_ids.shape[1] - PLAN_LEN
    part = lambda s: {"segment_ids": b.segment_ids[:, s], "attention_mask": b.attention_mask[:, s]}  # noqa: E731
    with torch.no_grad():
        full = model(**b.model_inputs()).text_logits[:, c:]
        cache = model(b.input_ids[:, :c], **part(slice(None, c)), use_cache=True).cache
        cached = model(b.input_ids[:, c:], **part(slice(c, None)), condition_cache=cache).text_logits
        again = model(b.input_ids[:, c:].repeat_interleave(2, 0), segment_ids=b.segment_ids[:, c:].repeat_interleave(2, 0),
                      attention_mask=b.attention_mask[:, c:].repeat_interleave(2, 0),
                      condition_cache=cache.repeat_interleave(2)).text_logits  # fmt: skip
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(again[::2], full, atol=ATOL, rtol=0)


def test_copy_head_learns_to_copy_a_prompt_word(tokenizer, tiny_config):
    """Trained alone (LM head frozen), the copy head raises P(prompt's colour) at the plan's colour slot."""
    model = _with_open_copy_gate(tiny_config, bias=1.0).train()
    ex = build_t2i(tokenizer, tiny_config, "the red circle", plan=[("small red circle", (4, 4, 16, 16))],
                   plan_is_target=True, with_image=False)  # fmt: skip
    b = pack([ex], tiny_config)
    targets = b.text_targets
    ids = torch.where(targets != -100, tiny_config.mask_token_id, b.input_ids)
    red = tokenizer.convert_tokens_to_ids("red")
    slot = (targets[0] == red).nonzero()[0, 0]
    labels = torch.full_like(targets, -100)
    labels[0, slot] = red  # the whole plan is masked; the loss is on its colour only

    def p_red():
        with torch.no_grad():
            logits = model(**{**b.model_inputs(), "input_ids": ids}).text_logits
        return float(torch.softmax(logits[0, slot], -1)[red])

    before = p_red()
    params = [p for n, p in model.named_parameters() if n.startswith("copy_")]
    opt = torch.optim.Adam(params, lr=0.05)
    for _ in range(30):
        opt.zero_grad()
        model(**{**b.model_inputs(), "input_ids": ids}, labels=labels).loss.backward()
        opt.step()
    after = p_red()
    assert after > before + 0.3


def test_a_loaded_copy_head_copies_what_the_saved_one_did(tokenizer, tiny_config, tmp_path):
    """`from_pretrained` builds on the meta device: nothing the copy head reads may be left
    uninitialised there (a non-persistent buffer was, and made planning random)."""
    model = _with_open_copy_gate(tiny_config)
    model.save_pretrained(tmp_path)
    loaded = LavidaForMaskedDiffusion.from_pretrained(tmp_path).eval()
    inputs = _plan_slot(tokenizer, tiny_config, ["the red circle"]).model_inputs()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).text_logits, model(**inputs).text_logits, atol=0, rtol=0)


def _open_pool(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in (model.pool_und, model.pool_gen):
            lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 0.5)
    return model


def test_zero_condition_pool_is_the_model_without_it(tokenizer, tiny_config):
    """Weights trained before the condition pool load into the same function (it starts at zero)."""
    torch.manual_seed(0)
    new = LavidaForMaskedDiffusion(tiny_config).eval()
    assert torch.all(new.pool_und.weight == 0) and torch.all(new.pool_gen.weight == 0)
    old = LavidaForMaskedDiffusion(LavidaConfig(**{**tiny_config.to_dict(), "condition_pool": False})).eval()
    missing, unexpected = old.load_state_dict(new.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("pool_") for k in unexpected)
    ids, seg, codes = t2i_batch(tiny_config)
    inputs = _plan_slot(tokenizer, tiny_config, ["a red circle left of a blue square"]).model_inputs()
    with torch.no_grad():
        torch.testing.assert_close(new(**inputs).text_logits, old(**inputs).text_logits, atol=0, rtol=0)
        img = lambda m: m(ids, gen_codes=codes, segment_ids=seg).image_logits  # noqa: E731
        torch.testing.assert_close(img(new), img(old), atol=0, rtol=0)


def test_condition_pool_is_the_mean_of_earlier_segments_words(tokenizer, tiny_config):
    torch.manual_seed(0)
    model = LavidaForMaskedDiffusion(tiny_config).eval()
    b = _plan_slot(tokenizer, tiny_config, ["a red circle left of a blue square", "a circle"])
    ids, seg, valid = b.input_ids, b.segment_ids, b.attention_mask.bool()
    with torch.no_grad():
        pool, _ = model._condition_pool(ids, seg, valid, None)
    pool = pool.view(*ids.shape, -1)
    table = model.embed_tokens.weight
    for r in range(len(ids)):
        prompt = [t for t, s, v in zip(ids[r].tolist(), seg[r].tolist(), valid[r].tolist()) if s == 0 and v]
        assert prompt and tiny_config.mask_token_id not in prompt
        expected = table[prompt].mean(0)
        expected = expected / expected.pow(2).mean().sqrt()  # scaled to unit RMS
        plan = (seg[r] == 1) & valid[r]
        torch.testing.assert_close(pool[r][plan], expected.expand(int(plan.sum()), -1), atol=1e-6, rtol=0)
        assert pool[r][seg[r] == 0].abs().max() == 0  # the prompt has no earlier segment
    assert not torch.allclose(pool[0][seg[0] == 1][0], pool[1][seg[1] == 1][0])  # it reads the prompt


def test_condition_cache_keeps_the_condition_pool(tokenizer, tiny_config):
    """Plan text and drawn image through a condition cache equal the full pass, with an open pool."""
    torch.manual_seed(0)
    model = _open_pool(LavidaForMaskedDiffusion(tiny_config).eval())
    b = _plan_slot(tokenizer, tiny_config, ["a red circle", "a blue square left of a red circle"])
    c = b.input_ids.shape[1] - PLAN_LEN
    part = lambda s: {"segment_ids": b.segment_ids[:, s], "attention_mask": b.attention_mask[:, s]}  # noqa: E731
    ids, seg, codes = t2i_batch(tiny_config)
    T = ids.shape[1] - tiny_config.positions_per_image
    with torch.no_grad():
        full = model(**b.model_inputs()).text_logits[:, c:]
        cache = model(b.input_ids[:, :c], **part(slice(None, c)), use_cache=True).cache
        cached = model(b.input_ids[:, c:], **part(slice(c, None)), condition_cache=cache.repeat_interleave(1)).text_logits
        image_full = model(ids, gen_codes=codes, segment_ids=seg).image_logits
        icache = model(ids[:, :T], segment_ids=seg[:, :T], use_cache=True, elastic=True).cache
        image_cached = model(ids[:, T:], gen_codes=codes, segment_ids=seg[:, T:], condition_cache=icache,
                             elastic=True).image_logits  # fmt: skip
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(image_cached, image_full, atol=ATOL, rtol=0)
    # and the pool is what made them differ from a closed one
    closed = LavidaForMaskedDiffusion(tiny_config).eval()
    closed.load_state_dict({k: (v * 0 if k.startswith("pool_") else v) for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert not torch.allclose(closed(ids, gen_codes=codes, segment_ids=seg).image_logits, image_full)


# --------------------------------------------------------------------------- image copy path


@pytest.fixture(scope="module")
def copy_config(tiny_config):
    return LavidaConfig(**{**tiny_config.to_dict(), "image_copy": True})


def _edit_batch(tokenizer, config, image, seed=0, masked_source=False):
    """Two edits and one t2i row: the copy path may copy only the edits' own sources."""
    rng = np.random.default_rng(seed)
    sources = [rng.integers(0, config.codebook_size, (16, 16)) for _ in range(2)]
    if masked_source:
        sources[1] = np.full((16, 16), config.image_mask_code)
    exs = [build_edit(tokenizer, config, "remove the red circle", image, s, codes=np.full((16, 16), config.image_mask_code))
           for s in sources]  # fmt: skip
    exs.append(build_t2i(tokenizer, config, "a red circle", codes=np.full((16, 16), config.image_mask_code)))
    return pack(exs, config, pad_left=True), sources


def _with_open_image_gate(config, bias=4.0):
    torch.manual_seed(0)
    model = LavidaForMaskedDiffusion(config).eval()
    with torch.no_grad():
        model.image_head.copy_gate.bias.fill_(bias)
    return model


def test_zero_image_copy_gate_is_the_model_without_it(tokenizer, tiny_config, copy_config, scene_image):
    """Weights trained before the image copy path load into the same function (its gate starts at zero)."""
    torch.manual_seed(0)
    new = LavidaForMaskedDiffusion(copy_config).eval()
    gate = new.image_head.copy_gate
    assert torch.all(gate.weight == 0) and torch.all(gate.bias == 0)
    old = LavidaForMaskedDiffusion(tiny_config).eval()
    missing, unexpected = old.load_state_dict(new.state_dict(), strict=False)
    assert not missing and unexpected == ["image_head.copy_gate.weight", "image_head.copy_gate.bias"]
    assert "image_head.copy_gate." in new.fresh_at_zero and "image_head.copy_gate.weight" in new.image_only_parameter_names()
    b, _ = _edit_batch(tokenizer, copy_config, scene_image)
    with torch.no_grad():
        torch.testing.assert_close(new(**b.model_inputs()).image_logits, old(**b.model_inputs()).image_logits,
                                   atol=0, rtol=0)  # fmt: skip


def test_image_copy_adds_only_the_source_code_of_each_cell(tokenizer, tiny_config, copy_config, scene_image):
    model = _with_open_image_gate(copy_config, bias=4.0)
    plain = LavidaForMaskedDiffusion(tiny_config).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    b, sources = _edit_batch(tokenizer, copy_config, scene_image, masked_source=True)
    with torch.no_grad():
        bonus = model(**b.model_inputs()).image_logits - plain(**b.model_inputs()).image_logits  # (3, G, G, K)
    expected = torch.zeros_like(bonus)
    expected[0].scatter_(-1, torch.as_tensor(sources[0]).unsqueeze(-1), 4.0)
    # the first edit copies its source, cell by cell; a masked source (a guidance row
    # without it) and a t2i row have nothing to copy
    torch.testing.assert_close(bonus, expected, atol=1e-5, rtol=0)


def test_condition_cache_keeps_the_image_copy_source(tokenizer, copy_config, scene_image):
    model = _with_open_image_gate(copy_config)
    b, _ = _edit_batch(tokenizer, copy_config, scene_image)
    P = copy_config.positions_per_image
    c = b.input_ids.shape[1] - P
    src = [i for i, t in enumerate(b.gen_is_target) if not t]
    tgt = [i for i, t in enumerate(b.gen_is_target) if t]
    part = lambda s: dict(segment_ids=b.segment_ids[:, s], attention_mask=b.attention_mask[:, s])  # noqa: E731
    with torch.no_grad():
        full = model(**b.model_inputs()).image_logits
        cache = model(b.input_ids[:, :c], gen_codes=b.gen_codes[src], pixel_values=b.pixel_values,
                      **part(slice(None, c)), use_cache=True, elastic=True).cache  # fmt: skip
        cached = model(b.input_ids[:, c:], gen_codes=b.gen_codes[tgt], **part(slice(c, None)),
                       condition_cache=cache, elastic=True).image_logits  # fmt: skip
        twice = model(b.input_ids[:, c:].repeat_interleave(2, 0), gen_codes=b.gen_codes[tgt].repeat_interleave(2, 0),
                      segment_ids=b.segment_ids[:, c:].repeat_interleave(2, 0),
                      attention_mask=b.attention_mask[:, c:].repeat_interleave(2, 0),
                      condition_cache=cache.repeat_interleave(2), elastic=True).image_logits  # fmt: skip
    torch.testing.assert_close(cached, full, atol=ATOL, rtol=0)
    torch.testing.assert_close(twice[::2], full, atol=ATOL, rtol=0)


def test_image_copy_gate_learns_to_keep_the_source(tokenizer, copy_config, scene_image):
    """Trained alone on targets equal to their sources, the gate opens and the loss falls."""
    torch.manual_seed(0)
    model = LavidaForMaskedDiffusion(copy_config).train()
    b, sources = _edit_batch(tokenizer, copy_config, scene_image)
    labels = torch.full((3, 16, 16), -100)
    labels[:2] = torch.as_tensor(np.stack(sources))
    gate = model.image_head.copy_gate
    for p in model.parameters():
        p.requires_grad_(False)
    gate.requires_grad_(True)
    opt = torch.optim.Adam(gate.parameters(), lr=0.1)
    losses = []
    for _ in range(20):
        out = model(**b.model_inputs(), image_labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    assert float(gate.bias.detach()) > 1.0

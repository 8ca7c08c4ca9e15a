"""Synthetic shapes dataset: determinism, splits, caption grammar, rendering and argument checks."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch

from kandinsky3.data import shapes
from kandinsky3.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    HELD_OUT_PAIRS,
    OBJECT_COLOURS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    ShapeSpec,
    ShapesDataset,
    caption,
    caption_with_spec,
    check_scene,
    eval_prompts,
    image_to_tensor,
    layout,
    parse_caption,
    region_of,
    render,
    render_array,
    sample_scene,
    tensor_to_image,
    word_objects,
)


def _pairs(scene):
    return {(o.colour, o.shape) for o in scene.objects}


def _scenes(n, split="train", seed=0):
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, split) for _ in range(n)]


# ---------------------------------------------------------------------------------------------- determinism


def test_item_depends_only_on_seed_split_and_index():
    a, b = ShapesDataset(100, seed=3), ShapesDataset(100, seed=3)
    for i in (7, 0, 99, 7):  # any access order, any instance (worker, rank)
        image_a, text_a = a[i]
        image_b, text_b = b[i]
        assert torch.equal(image_a, image_b) and text_a == text_b
    other_seed, other_split = ShapesDataset(100, seed=4), ShapesDataset(100, seed=3, split="seen")
    differs = lambda d: sum(not torch.equal(a[i][0], d[i][0]) for i in range(20))
    assert differs(other_seed) >= 18 and differs(other_split) >= 18


def test_and_captions_changes_captions_only_and_the_evaluation_prompts_not_at_all():
    """A training-only caption mix: the same images (so a latent cache stays valid), more two-object scenes
    captioned "X and Y" instead of by their relation, every caption still in the grammar and true of its image."""
    n = 400
    grammar, mixed = ShapesDataset(n, seed=5), ShapesDataset(n, seed=5, and_captions=0.9)
    assert grammar.and_captions == shapes.P_AND
    for i in range(0, n, 40):
        assert torch.equal(grammar[i][0], mixed[i][0]) and grammar.placements(i) == mixed.placements(i)
    relations = lambda d: [d.scene(i).relation for i in range(n) if len(d.scene(i).objects) == 2]
    before, after = relations(grammar), relations(mixed)
    assert len(before) == len(after) > 150
    assert before.count("and") / len(before) < 0.55 and after.count("and") / len(after) > 0.8
    for i in range(n):  # a flipped relation flips nothing else: same objects, positions, background
        a, b = grammar.scene(i), mixed.scene(i)
        assert a.objects == b.objects and a.background == b.background
        spec = parse_caption(mixed.caption(i))
        assert spec.relation == b.relation and [o.shape for o in spec.objects] == [o.shape for o in b.objects]
    pairs = [scene.relation for _, scene in eval_prompts(n, "seen") if len(scene.objects) == 2]
    assert 0.3 < pairs.count("and") / len(pairs) < 0.5  # the evaluation prompts keep the grammar's shapes.P_AND
    assert not any(ShapesDataset(n, seed=5, and_captions=0.0).scene(i).relation == "and" for i in range(n))
    assert all(ShapesDataset(n, seed=5, and_captions=1.0).scene(i).relation in (None, "and") for i in range(n))
    for bad in (-0.1, 1.5, "0.5"):
        with pytest.raises(ValueError, match="and_captions"):
            ShapesDataset(10, and_captions=bad)


def test_and_order_reading_names_the_left_or_top_object_first_and_changes_nothing_else():
    """``and_order="reading"``: an "X and Y" caption that states no positions lists the left (or top) object
    first, so the caption fixes the layout; every other caption, every image and every stated spec stays true."""
    n = 600
    anyorder, reading = ShapesDataset(n, seed=2), ShapesDataset(n, seed=2, and_order="reading")
    assert anyorder.and_order == "any"
    reordered = 0
    for i in range(n):
        scene, text = reading.scene(i), reading.caption(i)
        assert scene == anyorder.scene(i)  # the same scenes (and so images)
        spec = parse_caption(text)
        unstated_and = spec.relation == "and" and spec.objects[0].position is None
        if not unstated_and:
            assert text == anyorder.caption(i)  # one object, a relation, or "and" with positions: untouched
            continue
        by_pair = {(o.colour, o.shape): o.position for o in scene.objects}
        first, second = (by_pair[(o.colour, o.shape)] for o in spec.objects)
        assert first in ("left", "top") and second in ("right", "bottom")
        for stated in spec.objects:  # a stated size is still the named object's own
            own = next(o for o in scene.objects if (o.colour, o.shape) == (stated.colour, stated.shape))
            assert stated.size in (None, own.size)
        reordered += text != anyorder.caption(i)
    assert reordered > 10  # about half of the unstated "and" captions had the right or bottom object first
    for i in range(0, n, 60):
        assert torch.equal(anyorder[i][0], reading[i][0]) and reading[i][1] == reading.caption(i)
    with pytest.raises(ValueError, match="and_order"):
        ShapesDataset(10, and_order="sorted")
    with pytest.raises(ValueError, match="and_order"):
        caption(sample_scene(np.random.default_rng(0)), np.random.default_rng(0), and_order="left")


def test_scene_method_is_the_scene_behind_the_item():
    dataset = ShapesDataset(50, seed=1)
    for i in range(50):
        image, text, scene = dataset.example(i)
        assert dataset.scene(i) == scene
        assert torch.equal(image_to_tensor(image), dataset[i][0]) and dataset[i][1] == text
        spec = parse_caption(text)
        assert [(o.colour, o.shape) for o in spec.objects] == [(o.colour, o.shape) for o in scene.objects]
        assert dataset.caption(i) == text  # the caption alone, without rendering


def test_eval_prompts_are_deterministic_and_not_the_training_stream():
    assert eval_prompts(30, "seen", seed=5) == eval_prompts(30, "seen", seed=5)
    train = ShapesDataset(200, seed=5)
    train_scenes = [train.scene(i) for i in range(200)]
    seen = [scene for _, scene in eval_prompts(200, "seen", seed=5)]
    assert sum(a == b for a, b in zip(train_scenes, seen)) < 20


# ---------------------------------------------------------------------------------------------- splits


def test_heldout_pairs_never_appear_in_20k_training_scenes():
    dataset = ShapesDataset(20_000, seed=0)
    held = set(HELD_OUT_PAIRS)
    assert not any(_pairs(dataset.scene(i)) & held for i in range(20_000))


def test_heldout_split_has_a_heldout_pair_and_seen_split_has_none():
    held = set(HELD_OUT_PAIRS)
    heldout = [scene for _, scene in eval_prompts(2000, "heldout")]
    assert all(_pairs(scene) & held for scene in heldout)
    assert set().union(*(_pairs(s) for s in heldout)) >= held  # every held-out pair is exercised
    assert not any(_pairs(scene) & held for _, scene in eval_prompts(2000, "seen"))


def test_every_colour_shape_position_size_background_and_relation_appears():
    scenes = _scenes(5000)
    objects = [o for s in scenes for o in s.objects]
    assert {o.colour for o in objects} == set(OBJECT_COLOURS)
    assert {o.shape for o in objects} == set(SHAPES)
    assert {o.position for o in objects} == set(POSITIONS)
    assert {o.size for o in objects} == set(SIZES)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {s.relation for s in scenes} == set(RELATIONS) | {None}
    for scene in scenes:
        check_scene(scene)
        assert len(_pairs(scene)) == len(scene.objects)  # two objects differ in colour or shape


# ---------------------------------------------------------------------------------------------- captions


def test_caption_parse_round_trip_recovers_every_stated_attribute():
    rng = np.random.default_rng(11)
    for split in ("train", "heldout"):
        for _ in range(3000):
            scene = sample_scene(rng, split)
            text, spec = caption_with_spec(scene, rng)
            assert parse_caption(text) == spec, text
            assert parse_caption(text.upper() + ".") == spec
            assert spec.relation == scene.relation
            assert spec.background in (None, scene.background)
            for said, true in zip(spec.objects, scene.objects, strict=True):
                assert (said.colour, said.shape) == (true.colour, true.shape)
                assert said.size in (None, true.size) and said.position in (None, true.position)


def test_caption_uses_optional_attributes_and_all_phrasings():
    rng = np.random.default_rng(2)
    texts, specs = zip(*(caption_with_spec(s, rng) for s in _scenes(4000, seed=2)))
    objects = [o for spec in specs for o in spec.objects]
    assert 0.3 < np.mean([o.size is not None for o in objects]) < 0.7
    assert 0.2 < np.mean([spec.background is not None for spec in specs]) < 0.6
    assert any(o.position is None for o in objects) and any(o.position is not None for o in objects)
    joined = "\n".join(texts)
    for phrase in itertools.chain(
        *shapes.POSITION_PHRASES.values(), [p for p in shapes.PREFIXES if p], [" above ", " below ", " and "]
    ):
        assert phrase in joined, phrase
    assert "an orange" in joined and "a orange" not in joined


def test_caption_is_caption_with_spec_text():
    scene = _scenes(1)[0]
    assert caption(scene, np.random.default_rng(0)) == caption_with_spec(scene, np.random.default_rng(0))[0]


def test_word_objects_give_each_word_of_an_object_phrase_its_stated_object():
    rng = np.random.default_rng(12)
    for scene in _scenes(2000, seed=12):
        text, spec = caption_with_spec(scene, rng)
        words, owners = word_objects(text)
        assert words == text.split()
        implied = shapes.RELATION_POSITIONS.get(spec.relation, (None, None))
        expected = [dataclasses.replace(o, position=o.position or implied[k]) for k, o in enumerate(spec.objects)]
        assert list(dict.fromkeys(o for o in owners if o is not None)) == expected  # caption order
        phrase_words = {w for w, o in zip(words, owners) if o is not None}
        assert {obj.colour for obj in spec.objects} <= phrase_words and "background" not in phrase_words
    words, owners = word_objects("a picture of a red circle above a small blue square on a pink background")
    assert owners[:3] == [None] * 3 and owners[3].position == "top" and owners[-1] is None
    assert owners[words.index("square")] == ShapeSpec(shape="square", colour="blue", size="small", position="bottom")


@pytest.mark.parametrize(
    "text",
    ["a dog", "a red", "red circle", "a red circle on the moon", "a red circle above", "a red circle and"],
)
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError, match="cannot parse caption"):
        parse_caption(text)


# ---------------------------------------------------------------------------------------------- rendering


def test_region_of_recovers_the_position_of_every_placement():
    rng = np.random.default_rng(4)
    for scene in _scenes(3000, seed=4):
        for obj, p in zip(scene.objects, layout(scene, rng)):
            assert region_of(p.x, p.y) == obj.position


def _extent(shape, r):
    """Half width and half height of a shape's bounding box (fractions of the side)."""
    if shape == "circle":
        return r, r
    if shape == "square":
        return shapes.SQUARE_HALF * r, shapes.SQUARE_HALF * r
    return shapes.TRIANGLE_HALF * r, shapes.TRIANGLE_HALF * r * 3**0.5 / 2


def test_objects_stay_inside_the_image_and_apart():
    rng = np.random.default_rng(5)
    for scene in _scenes(5000, seed=5):
        boxes = []
        for obj, p in zip(scene.objects, layout(scene, rng)):
            hw, hh = _extent(obj.shape, p.r)
            boxes.append((p.x - hw, p.y - hh, p.x + hw, p.y + hh))
            assert min(boxes[-1]) >= 0.02 and max(boxes[-1]) <= 0.98
        if len(boxes) == 2:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
            gap = max(bx0 - ax1, ax0 - bx1, by0 - ay1, ay0 - by1)
            assert gap >= 0.04


def test_render_is_anti_aliased_between_background_and_object_colour():
    scene = Scene((ShapeSpec("circle", "blue", "large", "center"),), "white", None)
    array = render_array(scene, 64).astype(float)
    background, blue = np.array(COLOURS["white"], float), np.array(COLOURS["blue"], float)
    t = (array - background) @ (blue - background) / ((blue - background) @ (blue - background))
    edge = (t > 0.05) & (t < 0.95)
    assert 40 < edge.sum() < 200  # a one-pixel ring of intermediate values around the disk
    residual = array - (background + t[..., None] * (blue - background))  # mixtures lie on the line
    assert np.abs(residual).max() < 1.5
    assert (t > 0.95).sum() > 200 and np.isclose(array[0, 0], background).all()


@pytest.mark.parametrize("image_size", [32, 64, 128])
def test_item_is_float32_chw_in_unit_range(image_size):
    dataset = ShapesDataset(20, image_size=image_size)
    for i in range(20):
        image, text = dataset[i]
        assert image.dtype == torch.float32 and image.shape == (3, image_size, image_size)
        assert image.min() >= -1 and image.max() <= 1 and isinstance(text, str)
    white = Scene((ShapeSpec("square", "red", "small", "left"),), "white", None)
    assert image_to_tensor(render(white, image_size))[:, 0, 0].tolist() == [1.0, 1.0, 1.0]


def test_tensor_to_image_inverts_image_to_tensor():
    image = ShapesDataset(1).example(0)[0]
    assert np.array_equal(np.asarray(tensor_to_image(image_to_tensor(image))), np.asarray(image))


def test_render_jitter_comes_only_from_rng():
    scene = _scenes(1, seed=9)[0]
    assert np.array_equal(render_array(scene), render_array(scene))
    a, b = render_array(scene, rng=np.random.default_rng(1)), render_array(scene, rng=np.random.default_rng(1))
    assert np.array_equal(a, b)


def test_colour_table_is_clearly_separable():
    rgb = {name: np.array(value, float) for name, value in COLOURS.items()}
    objects = min(np.linalg.norm(rgb[a] - rgb[b]) for a, b in itertools.combinations(OBJECT_COLOURS, 2))
    contrast = min(np.linalg.norm(rgb[a] - rgb[b]) for a in OBJECT_COLOURS for b in BACKGROUNDS)
    assert objects > 60 and contrast > 90
    assert not set(OBJECT_COLOURS) & set(BACKGROUNDS)


# ---------------------------------------------------------------------------------------------- errors


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="unknown split"):
        ShapesDataset(10, split="test")
    with pytest.raises(ValueError, match="unknown split"):
        eval_prompts(3, split="val")
    for size in (16, 40, 100, 64.0):
        with pytest.raises(ValueError, match="image_size"):
            ShapesDataset(10, image_size=size)
    with pytest.raises(ValueError, match="num_samples"):
        ShapesDataset(0)
    with pytest.raises(ValueError, match="seed"):
        ShapesDataset(10, seed=-1)
    with pytest.raises(IndexError):
        ShapesDataset(10)[10]
    with pytest.raises(ValueError, match="image_size"):
        render(_scenes(1)[0], image_size=49)


def test_check_scene_rejects_inconsistent_scenes():
    red_left = ShapeSpec("circle", "red", "small", "left")
    blue_right = ShapeSpec("square", "blue", "large", "right")
    blue_top = ShapeSpec("square", "blue", "large", "top")
    bad = [
        Scene((red_left,), "red", None),  # background is an object colour
        Scene((ShapeSpec("circle", "pink", "small", "left"),), "white", None),
        Scene((red_left,), "white", "and"),
        Scene((red_left, blue_top), "white", "and"),  # not a left/right or top/bottom pair
        Scene((red_left, blue_right), "white", "above"),  # relation contradicts positions
        Scene((ShapeSpec("circle", "red", None, "left"),), "white", None),  # incomplete
        Scene((), "white", None),
    ]
    for scene in bad:
        with pytest.raises(ValueError):
            check_scene(scene)
    with pytest.raises(ValueError, match="size"):
        render(bad[-2])
    check_scene(Scene((red_left, blue_right), "white", "to the left of"))
    check_scene(parse_caption("a red circle"), complete=False)

"""Prompt-adherence evaluator: accuracy on ground-truth renders, wrong prompts, evaluate, inpainting."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky3.data.shapes import (
    OBJECT_COLOURS,
    Scene,
    ShapeSpec,
    eval_prompts,
    image_to_tensor,
    render,
    render_array,
)
from kandinsky3.evaluation import (SCORE_KEYS, analyze, evaluate, inpainting_score, label_components,
                                   movq_round_trip, score, wilson_interval)


def _rendered(n, split, image_size=64, seed=0):
    """n (caption, scene, image) triples; jitter from a seeded generator."""
    rng = np.random.default_rng(seed)
    return [(text, scene, render(scene, image_size, rng)) for text, scene in eval_prompts(n, split, seed=seed)]


def _attribute_accuracy(triples):
    """Fraction of scenes whose objects analyze() recovers exactly (colour, shape, size, position)."""
    correct = 0
    for _, scene, image in triples:
        found = sorted((d.colour, d.shape, d.size, d.position) for d in analyze(image))
        correct += found == sorted((o.colour, o.shape, o.size, o.position) for o in scene.objects)
    return correct / len(triples)


def _accuracies(triples):
    results = [score(text, image) for text, _, image in triples]
    return {k: float(np.mean([r[k] for r in results if r[k] is not None])) for k in SCORE_KEYS}


# ---------------------------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("split", ["seen", "heldout"])
def test_evaluator_is_at_least_99_percent_right_on_ground_truth_64px(split):
    triples = _rendered(500, split, seed=21)
    acc = _accuracies(triples)
    exact = _attribute_accuracy(triples)
    print(f"\n{split} 64px, 500 images: score() {acc}; every attribute of every object: {exact:.4f}")
    assert acc["colour_shape"] >= 0.99 and acc["position"] >= 0.99
    assert acc["count"] >= 0.99 and acc["size"] >= 0.99 and acc["background"] >= 0.99
    assert exact >= 0.99


def test_evaluator_is_at_least_99_percent_right_at_128px():
    triples = _rendered(100, "seen", image_size=128, seed=3) + _rendered(100, "heldout", image_size=128, seed=3)
    acc, exact = _accuracies(triples), _attribute_accuracy(triples)
    print(f"\n128px, 200 images: score() {acc}; every attribute of every object: {exact:.4f}")
    assert acc["colour_shape"] >= 0.99 and acc["position"] >= 0.99 and exact >= 0.99


def _recoloured(scene):
    """The scene with its objects in colours that do not occur in it."""
    unused = [c for c in OBJECT_COLOURS if c not in {o.colour for o in scene.objects}]
    return dataclasses.replace(
        scene, objects=tuple(dataclasses.replace(o, colour=c) for o, c in zip(scene.objects, unused))
    )


def _prompt(scene, with_positions=True):
    """A caption stating every attribute of a complete scene (positions per object for two objects)."""
    phrases = [
        f"a {o.size} {o.colour} {o.shape}" + (f" {'in the' if o.position == 'center' else 'on the'} {o.position}"
                                             if with_positions else "")
        for o in scene.objects
    ]
    return " and ".join(phrases).replace("on the top", "at the top").replace("on the bottom", "at the bottom")


def test_prompt_of_a_different_scene_scores_wrong():
    triples = _rendered(300, "seen", seed=8)
    for _, scene, image in triples:
        right = score(_prompt(scene), image)
        assert right["colour_shape"] and right["position"] and right["size"] and right["count"]
        assert not score(_prompt(_recoloured(scene)), image)["colour_shape"]


def test_wrong_positions_sizes_and_counts_score_wrong():
    mirror = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "center": "left"}
    other_size = {"small": "large", "large": "small"}
    for _, scene, image in _rendered(200, "heldout", seed=9):
        moved = dataclasses.replace(
            scene, objects=tuple(dataclasses.replace(o, position=mirror[o.position]) for o in scene.objects)
        )
        result = score(_prompt(moved), image)
        assert result["colour_shape"] and result["position"] is False
        resized = dataclasses.replace(
            scene, objects=tuple(dataclasses.replace(o, size=other_size[o.size]) for o in scene.objects)
        )
        assert score(_prompt(resized), image)["size"] is False
        if len(scene.objects) == 2:
            first, second = scene.objects
            assert score(f"a {first.colour} {first.shape}", image)["count"] is False
            relation = {"left": "to the right of", "right": "to the left of", "top": "below", "bottom": "above"}
            wrong = f"a {first.colour} {first.shape} {relation[first.position]} a {second.colour} {second.shape}"
            assert score(wrong, image)["position"] is False


def test_unstated_attributes_score_none():
    image = render(Scene((ShapeSpec("circle", "red", "large", "left"),), "white", None))
    result = score("a red circle", image)
    assert result["colour_shape"] and result["count"] and result["num_detected"] == 1
    assert result["position"] is None and result["size"] is None and result["background"] is None
    assert score("a red circle on a white background", image)["background"] is True
    assert score("a red circle on a black background", image)["background"] is False


def test_analyze_is_deterministic_and_accepts_pil_array_and_tensor():
    _, _, image = _rendered(1, "heldout", seed=4)[0]
    from_pil = analyze(image)
    assert from_pil == analyze(image)
    assert from_pil == analyze(np.asarray(image)) == analyze(image_to_tensor(image))
    with pytest.raises(ValueError, match="uint8"):
        analyze(np.zeros((64, 64), dtype=np.uint8))


def test_label_components_uses_8_connectivity():
    mask = np.zeros((12, 12), dtype=bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True  # a diagonal line: one component
    mask[6:11, 6] = mask[10, 6:11] = mask[6:11, 10] = True  # a U shape: one component
    mask[1, 9:11] = True
    labels, n = label_components(mask)
    assert n == 3 and labels.dtype == np.int32
    assert len({labels[1, 1], labels[3, 3]}) == 1 and len({labels[6, 6], labels[6, 10]}) == 1
    assert set(np.unique(labels[mask])) == {1, 2, 3} and (labels[~mask] == 0).all()


# ---------------------------------------------------------------------------------------------- evaluate


def test_evaluate_aggregates_scores_over_batches():
    prompts = eval_prompts(20, "heldout", seed=2)
    truth = dict(prompts)
    seeds = []

    def pipe_fn(batch, seed):
        seeds.append(seed)
        return [render(truth[text], 64, np.random.default_rng(seed)) for text in batch]

    report = evaluate(pipe_fn, prompts, batch_size=8, seed=100)
    assert seeds == [100, 101, 102] and report["num_prompts"] == 20 and len(report["records"]) == 20
    assert report["colour_shape"] == 1.0 and report["count"] == 1.0 and report["colour_shape_n"] == 20
    assert report["position_n"] == sum(r["position"] is not None for r in report["records"])
    low, high = report["colour_shape_ci95"]
    assert 0.8 < low < 1.0 == high  # 20 of 20 right still leaves room below 100 %
    blank = evaluate(lambda batch, seed: [Image.new("RGB", (64, 64), "white")] * len(batch), [p for p, _ in prompts])
    assert blank["colour_shape"] == 0.0 and blank["count"] == 0.0


def test_evaluate_text_to_image_keeps_per_prompt_records_only_when_asked():
    from types import SimpleNamespace

    from kandinsky3.evaluation import evaluate_text_to_image

    truth = {text: scene for split in ("seen", "heldout") for text, scene in eval_prompts(6, split, seed=3)}
    drawn = []

    def pipe(prompts, width, height, seed, progress, **kwargs):
        drawn.append((seed, kwargs))  # the wrong scene for the last prompt of each batch: one miss per split
        return [render(truth[text] if k < len(prompts) - 1 else truth[prompts[0]], width) for k, text in
                enumerate(prompts)]

    pipe.sampling_defaults = SimpleNamespace(width=64)
    kept = evaluate_text_to_image(pipe, 6, prompt_seed=3, batch_size=4, keep_records=True, guidance_scale=2.0)
    for split in ("seen", "heldout"):
        records = kept[split]["records"]
        assert [r["prompt"] for r in records] == [text for text, _ in eval_prompts(6, split, seed=3)]
        assert kept[split]["colour_shape"] == np.mean([r["colour_shape"] for r in records]) < 1.0
    assert drawn == [(0, {"guidance_scale": 2.0}), (1000, {"guidance_scale": 2.0})] * 2  # kandinsky3 eval's seeds
    plain = evaluate_text_to_image(pipe, 6, prompt_seed=3, batch_size=4)
    assert "records" not in plain["seen"] and plain["seen"]["colour_shape"] == kept["seen"]["colour_shape"]


@pytest.mark.parametrize("hits, n, low, high", [(81, 263, 0.2553, 0.3662), (15, 148, 0.0624, 0.1605),
                                                 (0, 20, 0.0, 0.1611), (1, 29, 0.0061, 0.1718)])
def test_wilson_interval_matches_newcombes_published_intervals(hits, n, low, high):
    """Newcombe (1998), "Two-sided confidence intervals for the single proportion", Stat. Med. 17:857, the worked examples,
    method 3 (the score interval without continuity correction), to its four decimals."""
    assert wilson_interval(hits, n) == pytest.approx([low, high], abs=5e-5)


def test_wilson_interval_narrows_with_more_prompts_and_refuses_impossible_counts():
    widths = [high - low for low, high in (wilson_interval(19 * k, 20 * k) for k in (1, 10, 100))]
    assert widths[0] > widths[1] > widths[2] > 0
    assert wilson_interval(0, 0) is None and wilson_interval(5, 5)[1] == 1.0
    for hits, n in ((3, 2), (-1, 4), (0, -1)):
        with pytest.raises(ValueError, match="hits"):
            wilson_interval(hits, n)


def test_evaluate_refuses_bad_prompts_and_bad_outputs_early():
    calls = []
    with pytest.raises(ValueError, match="cannot parse"):
        evaluate(lambda batch, seed: calls.append(batch), ["a red circle", "a cat"])
    assert calls == []
    with pytest.raises(ValueError, match="returned 0 images"):
        evaluate(lambda batch, seed: [], ["a red circle"])


# ---------------------------------------------------------------------------------------------- inpainting


def test_inpainting_score_checks_the_object_is_in_the_mask_and_the_rest_is_kept():
    kept = ShapeSpec("circle", "red", "large", "left")
    added = ShapeSpec("square", "blue", "large", "right")
    original = render_array(Scene((kept,), "white", None))
    result = render_array(Scene((kept, added), "white", "and"))  # rng=None: the same red circle
    right_half = np.zeros((64, 64), dtype=np.float32)
    right_half[:, 32:] = 1  # 1 = repaint
    good = inpainting_score("a blue square", original, result, right_half)
    assert good == {"object_in_mask": True, "outside_mad": 0.0, "outside_unchanged": True}
    assert not inpainting_score("a blue square", original, result, 1 - right_half)["object_in_mask"]
    assert not inpainting_score("a green square", original, result, right_half)["object_in_mask"]
    damaged = result.copy()
    damaged[20:44, 4:28] = 0  # a black block over the kept red circle (away from the border)
    bad = inpainting_score("a blue square", original, damaged, Image.fromarray((right_half * 255).astype(np.uint8)))
    assert bad["object_in_mask"] and not bad["outside_unchanged"] and bad["outside_mad"] > 0.1
    with pytest.raises(ValueError, match="mask"):
        inpainting_score("a blue square", original, result, torch.ones(32, 32))


def test_evaluate_inpainting_reports_the_pipelines_paste_back_and_the_raw_output_from_one_generation():
    """The top-level figures equal those of the pipeline's own ``paste_back=True`` images; ``before_paste_back``
    those of its ``paste_back=False`` images (the bundled inpainting model, 2 steps, 3 cases)."""
    from kandinsky3 import get_inpainting_pipeline
    from kandinsky3.evaluation import _inpainting_case, evaluate_inpainting

    pipe = get_inpainting_pipeline("cpu", model="tiny")
    report = evaluate_inpainting(pipe, num_prompts=3, steps=2, seed=5)
    cases = [_inpainting_case(c, s, pipe.sampling_defaults.width)
             for c, s in eval_prompts(12, "seen", seed=2024) if len(s.objects) == 1][:3]
    for paste_back, expected in ((True, report), (False, report["before_paste_back"])):
        scores = [inpainting_score(prompt, image, pipe(prompt, image, mask, seed=5 + k, steps=2, progress=False,
                                                       paste_back=paste_back)[0], mask)
                  for k, (prompt, image, mask) in enumerate(cases)]
        for key in ("object_in_mask", "outside_unchanged", "outside_mad"):
            assert expected[key] == pytest.approx(np.mean([s[key] for s in scores]), abs=1e-12), key
        for key in ("object_in_mask", "outside_unchanged"):
            assert expected[f"{key}_ci95"] == wilson_interval(sum(s[key] for s in scores), len(scores)), key
    assert report["outside_mad"] == 0.0 and report["before_paste_back"]["outside_mad"] > 0.0
    with pytest.raises(ValueError, match="paste_back"):
        evaluate_inpainting(pipe, num_prompts=1, paste_back=False)


class _PoolingAutoencoder(torch.nn.Module):
    """Stands in for a MoVQ: average-pools by ``factor`` and upsamples back (factor 1: a perfect round trip)."""

    def __init__(self, factor: int, resolution: int = 64):
        super().__init__()
        self.factor = factor
        self.config = type("Config", (), {"resolution": resolution})()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # where movq_round_trip reads device and dtype

    def encode(self, x):
        return torch.nn.functional.avg_pool2d(x, self.factor)

    def decode(self, z):
        return torch.nn.functional.interpolate(z, scale_factor=self.factor, mode="nearest")


def test_movq_round_trip_reads_every_scene_right_through_a_perfect_autoencoder_and_fewer_through_a_coarse_one():
    perfect = movq_round_trip(_PoolingAutoencoder(1), 30, prompt_seed=5, batch_size=8)  # 8 does not divide 30
    for split in ("seen", "heldout"):
        for key in SCORE_KEYS:  # each prompt checked against its own scene: a mismatched batch would fail here
            assert perfect[split][key] in (1.0, None), (split, key, perfect[split][key])
        assert perfect[split]["num_prompts"] == 30 and "records" not in perfect[split]
    coarse = movq_round_trip(_PoolingAutoencoder(8), 30, prompt_seed=5, keep_records=True)
    assert coarse["seen"]["colour_shape"] < 0.5  # 8x8-pixel blocks at 64 px: most shapes are lost
    assert len(coarse["seen"]["records"]) == 30

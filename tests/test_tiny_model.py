"""The bundled small model works: it follows prompts, generalises to held-out colour×shape pairs, inpaints.

Thresholds sit below the figures these exact calls measure (seeded, so deterministic on one machine; the
margin is for float differences between machines); the README model card gives the 200-prompt figures. A
regression in the weights, the pipelines or the evaluator makes them fail. Slow tier: ~40 s on one free core.
"""

from __future__ import annotations

import pytest

from kandinsky3 import get_inpainting_pipeline, get_T2I_pipeline
from kandinsky3.data.shapes import eval_prompts
from kandinsky3.evaluation import evaluate
from kandinsky3.evaluation import evaluate_inpainting, movq_psnr

pytestmark = pytest.mark.slow

NUM_PROMPTS = 25  # per split; one batch
INPAINT_PROMPTS = 40
SAMPLER, STEPS = "original", 20
# measured with these settings: seen 0.64, held-out 0.52, position 0.41, PSNR 30.7 dB; inpainting: the object
# inside the mask in 13 of 40 (0.325), kept pixels drifting by 0.337 (mean |difference|, [0, 1]) without paste-back
MIN_SEEN, MIN_HELDOUT, MIN_POSITION = 0.5, 0.35, 0.3
MIN_PSNR = 29.0
MIN_INPAINT = 0.275  # 11 of 40
MAX_OUTSIDE_DRIFT = 0.36


@pytest.fixture(scope="module")
def pipe():
    return get_T2I_pipeline("cpu", model="tiny")


def _report(pipe, split: str) -> dict:
    def generate(prompts, seed):
        return pipe(prompts, seed=seed * 1000, steps=STEPS, sampler=SAMPLER, progress=False)  # at the model's size

    return evaluate(generate, eval_prompts(NUM_PROMPTS, split), batch_size=NUM_PROMPTS)


def test_follows_prompts_on_seen_and_held_out_pairs(pipe):
    seen, heldout = _report(pipe, "seen"), _report(pipe, "heldout")
    assert seen["colour_shape"] >= MIN_SEEN, seen
    assert heldout["colour_shape"] >= MIN_HELDOUT, heldout
    assert seen["position"] >= MIN_POSITION, seen


def test_movq_reconstructs(pipe):
    psnr = movq_psnr(pipe.movq, num_images=50)
    assert psnr >= MIN_PSNR


def test_inpainting_variant_paints_the_object_inside_the_mask():
    inpaint = get_inpainting_pipeline("cpu", model="tiny")
    result = evaluate_inpainting(inpaint, num_prompts=INPAINT_PROMPTS, steps=STEPS, sampler=SAMPLER)
    assert result["num_prompts"] == INPAINT_PROMPTS, result
    assert result["object_in_mask"] >= MIN_INPAINT, result


def test_inpainting_variant_without_paste_back_stays_near_the_kept_pixels():
    """The network's own output outside the mask (paste-back would hide it) drifts no further than today.

    Today's drift is large: the bundled inpainting U-Net barely uses its kept-image input channels (their
    ``in_layer`` weights are 1-3 % of the latent channels' after 300 fine-tuning steps from GLIDE's zero init),
    so outside the mask it redraws the prompt's scene; the bound catches anything that strays further.
    """
    inpaint = get_inpainting_pipeline("cpu", model="tiny")
    raw = evaluate_inpainting(inpaint, num_prompts=INPAINT_PROMPTS, steps=STEPS, sampler=SAMPLER, paste_back=False)
    assert 0.0 < raw["outside_mad"] <= MAX_OUTSIDE_DRIFT, raw

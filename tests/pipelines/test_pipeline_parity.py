"""Our pipelines against diffusers' Kandinsky3Pipeline / Kandinsky3Img2ImgPipeline.

Both sides get the same tiny random weights (our components are converted from the diffusers
ones through the key mappings), the same start latents or the same seeded generator, and a
deterministic DDIM sampler (η = 0) built from the kandinsky-community scheduler config.  With
diffusers-layout weights our pipeline uses diffusers' conditioning semantics, so the images
must agree up to float rounding: tolerance 1e-4 on [0, 1] images (observed ~1e-6).
"""

import numpy as np
import pytest
import torch
from _tiny_models import randomize_
from _tiny_text import tiny_t5_encoder, tiny_tokenizer
from diffusers import DDIMScheduler, Kandinsky3Img2ImgPipeline, Kandinsky3Pipeline, Kandinsky3UNet, VQModel
from PIL import Image

from kandinsky3.models.movq import MoVQ, MoVQConfig
from kandinsky3.models.text_encoder import TextEncoder
from kandinsky3.models.unet import UNet, UNetConfig
from kandinsky3.pipelines.img2img import Kandinsky3Img2ImgPipeline as OurImg2Img
from kandinsky3.pipelines.text_to_image import Kandinsky3Pipeline as OurPipeline
from kandinsky3.weights.movq_keys import diffusers_to_original_movq
from kandinsky3.weights.unet_keys import diffusers_to_original_unet

SCHEDULER_CONFIG = {  # kandinsky-community/kandinsky-3 scheduler_config.json (architecture §5.8)
    "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.00085,
    "beta_end": 0.012, "prediction_type": "epsilon", "variance_type": "fixed_small", "clip_sample": True,
    "clip_sample_range": 1.0, "thresholding": False, "timestep_spacing": "leading", "steps_offset": 1,
    "set_alpha_to_one": False,
}


@pytest.fixture(scope="module")
def both():
    """(diffusers components dict, our (unet, movq, text_encoder)) with identical weights."""
    t5, tokenizer = tiny_t5_encoder(d_model=32), tiny_tokenizer()
    unet = Kandinsky3UNet(
        in_channels=4, time_embedding_dim=32, groups=4, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(32, 64), cross_attention_dim=24, encoder_hid_dim=32,
    ).eval()
    randomize_(unet, 0)
    movq = VQModel(
        block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, layers_per_block=1,
        norm_num_groups=32, norm_type="spatial", num_vq_embeddings=12, vq_embed_dim=4,
    ).eval()
    randomize_(movq, 1)
    reference = dict(tokenizer=tokenizer, text_encoder=t5, unet=unet, movq=movq)

    unet_sd, projection = diffusers_to_original_unet(unet.state_dict())
    our_unet = UNet(UNetConfig.from_diffusers(dict(unet.config))).eval()
    our_unet.load_state_dict(unet_sd)
    movq_config = MoVQConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(32,), resolution=64)
    our_movq = MoVQ(movq_config).eval()
    our_movq.load_state_dict(diffusers_to_original_movq(movq.state_dict(), movq_config))
    text_encoder = TextEncoder(t5, tokenizer, context_dim=24)
    text_encoder.load_projection(projection)
    return reference, (our_unet, our_movq, text_encoder)


@pytest.mark.parametrize("negative", [None, "blurry, low quality, a blue square"])
def test_text_to_image_matches_diffusers_with_ddim(both, negative):
    reference, ours = both
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    pipe = Kandinsky3Pipeline(scheduler=scheduler, **reference)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    expected = pipe(
        "a red circle on the left", negative_prompt=negative, num_inference_steps=4, guidance_scale=3.0,
        height=16, width=16, latents=latents, output_type="np",
    ).images
    ours_pipe = OurPipeline(*ours, conditioning="diffusers", scheduler_config=SCHEDULER_CONFIG)
    got = ours_pipe(
        "a red circle on the left", negative_prompt=negative, steps=4, guidance_scale=3.0, width=16, height=16,
        sampler="ddim", eta=0.0, latents=latents, output_type="np", progress=False,
    )
    diff = np.abs(got - expected).max()
    print(f"text-to-image vs diffusers (negative={negative!r}): max-abs {diff:.2e}")
    assert got.shape == expected.shape == (1, 16, 16, 3)
    assert diff <= 1e-4


def test_img2img_matches_diffusers_with_ddim(both):
    reference, ours = both
    scheduler = DDIMScheduler.from_config(SCHEDULER_CONFIG)
    pipe = Kandinsky3Img2ImgPipeline(scheduler=scheduler, **reference)
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(0)
    image = Image.fromarray((rng.random((16, 16, 3)) * 255).astype(np.uint8))
    expected = pipe(
        "a green triangle", image=image, strength=0.6, num_inference_steps=10, guidance_scale=3.0,
        generator=torch.Generator().manual_seed(7), output_type="np",
    ).images
    got = OurImg2Img(*ours, conditioning="diffusers", scheduler_config=SCHEDULER_CONFIG)(
        "a green triangle", image, strength=0.6, steps=10, guidance_scale=3.0, sampler="ddim", eta=0.0,
        generator=torch.Generator().manual_seed(7), output_type="np", progress=False,
    )
    diff = np.abs(got - expected).max()
    print(f"img2img vs diffusers: max-abs {diff:.2e}")
    assert got.shape == expected.shape
    assert diff <= 1e-4

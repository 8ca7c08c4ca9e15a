"""U-Net trainer: overfitting a fixed batch, exact stop-and-resume, a training sample sees what its prompt alone
sees at inference, CFG dropout trains the null embedding, the export loads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import T5EncoderModel
from _tiny_text import tiny_text_encoder
from _tiny_training import UNET, dataset, max_difference, movq_dir, one_thread, unet_config

from kandinsky3.conditioning import encode_prompts, training_conditions
from kandinsky3.models.movq import MoVQ
from kandinsky3.models.text_encoder import TextEncoder
from kandinsky3.models.unet import UNet, UNetConfig
from kandinsky3.training.checkpoint import CHECKPOINT, load_checkpoint
from kandinsky3.training.optim import build_optimizer
from kandinsky3.training.train_unet import DiffusionModel, train_unet
from kandinsky3.weights.loading import load_components, load_movq


_single_thread = pytest.fixture(autouse=True)(one_thread)

# Wider than _tiny_training.UNET so that 40 steps can memorise a batch.
OVERFIT_UNET = UNetConfig(model_channels=32, init_channels=16, num_channels=4, out_channels=4, time_embed_dim=32,
                          context_dim=16, groups=4, head_dim=8, dim_mult=(1, 2), num_blocks=(2, 2))


def _model(seed: int = 0, train_t5: bool = True, unet=UNET) -> DiffusionModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = tiny_text_encoder(context_dim=unet.context_dim, seed=seed)
        text = TextEncoder(base.t5, base.tokenizer, context_dim=unet.context_dim, freeze_t5=not train_t5)
        text.load_state_dict(base.state_dict())
        return DiffusionModel(UNet(unet), text)


def test_tiny_unet_overfits_a_fixed_batch(tmp_path):
    """Fixed latents (tiny MoVQ of 4 shapes images), t, ε and drop flags: 40 AdamW steps on U-Net + T5 +
    projection cut the ε-MSE by >= 10x (measured 28x, deterministic on CPU; about 4x after 20 steps)."""
    movq = load_movq(movq_dir(tmp_path / "movq"))
    data = dataset(4)
    images = torch.stack([data[i][0] for i in range(4)])
    with torch.no_grad():
        x0 = movq.encode(images)
    model = _model(unet=OVERFIT_UNET)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.tensor([10, 300, 600, 900])
    drop = torch.tensor([False, False, True, False])
    ids, mask = model.text_encoder.tokenize([data[i][1] for i in range(4)])
    optimizer = build_optimizer("adamw", model.named_parameters(), 2e-3, (0.9, 0.99), 0.0)
    losses = []
    for _ in range(40):
        loss = model(x0, ids, mask, t, noise, drop)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] * 10 < losses[0], (losses[0], losses[-1])


def test_training_batch_gives_the_unet_what_each_prompt_alone_gives_it_at_inference():
    """Each sample of a padded, partly dropped training batch (training_conditions) gets the U-Net output its
    prompt alone gets from the pipeline's conditioning (encode_prompts: cond, or uncond when dropped), although
    the batch is padded to the longest prompt (fp32: 1e-5)."""
    model = _model(seed=1).eval()
    prompts = ["a red circle", "a large blue square in the center on a black background", "x", "a green triangle"]
    drop = torch.tensor([False, True, False, True])
    ids, mask = model.text_encoder.tokenize(prompts)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4, 4, 8, 8, generator=generator)
    t = torch.tensor([5, 500, 999, 250])
    with torch.no_grad():
        batched = model.unet(x, t, *training_conditions(model.text_encoder, ids, mask, drop))
        for i, prompt in enumerate(prompts):
            alone = encode_prompts(model.text_encoder, [prompt], None, style="original", guided=True)
            single = model.unet(x[i:i + 1], t[i:i + 1], *(alone.uncond if drop[i] else alone.cond))
            assert torch.allclose(batched[i:i + 1], single, atol=1e-5), (i, (batched[i] - single[0]).abs().max())


def test_cfg_dropout_trains_the_null_embedding():
    """With a dropped sample the null embedding gets a gradient; with none it gets exactly zero."""
    model = _model(seed=2)
    ids, mask = model.text_encoder.tokenize(["a red circle", "a blue square"])
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 700])
    model(x0, ids, mask, t, noise, torch.tensor([False, True])).backward()
    assert model.text_encoder.null_embedding.grad.abs().sum() > 0
    model.zero_grad(set_to_none=False)
    model(x0, ids, mask, t, noise, torch.tensor([False, False])).backward()
    assert model.text_encoder.null_embedding.grad.abs().sum() == 0


@pytest.mark.parametrize("mode", ["base", "inpainting", "weighted-loss-cosine"])
def test_unet_resume_continues_exactly(tmp_path, mode):
    """4 uninterrupted steps == 2 steps, checkpoint, new objects, resume, 2 steps: trained weights, EMA and
    optimizer state agree to 1e-6 (deterministic CPU kernels: measured exactly 0). Inpainting starts from
    the base run's exported model folder (GLIDE init) and draws masks per step, half of them around objects; the T5
    there is frozen."""
    movq = movq_dir(tmp_path / "movq")
    extra: list[str] = []
    if mode == "inpainting":
        train_unet(unet_config(tmp_path / "base", movq, "schedule.max_steps=1"), dataset=dataset())
        final = tmp_path / "base" / "final"
        extra = ["model.mode=inpainting", "model.unet.num_channels=9", f"model.init_unet={final}",
                 f"text.encoder_path={final}", "text.t5_config={}", "text.train_t5=false", "optim.name=lion",
                 "optim.lr=1e-4", "data.object_masks=0.5"]
    if mode == "weighted-loss-cosine":  # the lr and the loss weights are pure functions of the step and the draws
        extra = ["loss.min_snr_gamma=5", "loss.object_weight=5", "schedule.lr_decay=cosine", "schedule.warmup_steps=1"]
    # the uninterrupted run also writes a sample grid (EMA weights swapped in and out): training must not notice
    train_unet(unet_config(tmp_path / "straight", movq, "run.sample_interval=3", *extra), dataset=dataset())
    assert (tmp_path / "straight" / "samples" / "step_000003.png").is_file()
    train_unet(unet_config(tmp_path / "split", movq, "schedule.max_steps=2", *extra), dataset=dataset())
    torch.manual_seed(4321)  # the global RNG must not matter
    train_unet(unet_config(tmp_path / "split", movq, *extra), resume=True, dataset=dataset())
    a = load_checkpoint(tmp_path / "straight" / CHECKPOINT)
    b = load_checkpoint(tmp_path / "split" / CHECKPOINT)
    assert a["step"] == b["step"] == 4
    worst, where = max_difference({k: a[k] for k in ("model", "ema", "optimizer")},
                                  {k: b[k] for k in ("model", "ema", "optimizer")})
    assert worst <= 1e-6, (where, worst)
    assert ("text_encoder.t5.shared.weight" in a["model"]) == (mode != "inpainting")  # a frozen T5 is not saved


def test_a_frozen_t5_runs_once_over_the_captions_and_is_exported_unchanged(tmp_path, monkeypatch):
    """With text.train_t5 off, T5 runs in one pass over the distinct captions and sample prompts before the first
    step, never per batch (the sample grid looks its prompts up too), and final/ holds T5's weights as they came."""
    movq = movq_dir(tmp_path / "movq")
    train_unet(unet_config(tmp_path / "base", movq, "schedule.max_steps=1"), dataset=dataset())
    base = tmp_path / "base" / "final"
    batches = []
    forward = T5EncoderModel.forward
    monkeypatch.setattr(T5EncoderModel, "forward",
                        lambda self, *args, **kwargs: batches.append(len(kwargs["input_ids"])) or forward(self, *args,
                                                                                                          **kwargs))
    config = unet_config(tmp_path / "frozen", movq, f"text.encoder_path={base}", "text.t5_config={}",
                         "text.train_t5=false", "run.sample_interval=4")
    train_unet(config, dataset=dataset())
    data = dataset()
    distinct = {data.caption(i) for i in range(len(data))} | set(config.samples.prompts)
    assert batches == [len(distinct)]
    assert (tmp_path / "frozen" / "samples" / "step_000004.png").is_file()
    before, after = (load_file(folder / "final" / "text_encoder" / "model.safetensors")
                     for folder in (tmp_path / "base", tmp_path / "frozen"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_the_frozen_movq_encodes_channels_last(tmp_path, monkeypatch):
    """The U-Net trainer holds its frozen MoVQ channels-last (2.35x faster encodes of the latent cache at ch=24):
    every encode it runs sees channels-last weights."""
    layouts = []
    encode = MoVQ.encode
    monkeypatch.setattr(MoVQ, "encode", lambda self, *args, **kwargs: layouts.append(
        self.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)) or encode(self, *args, **kwargs))
    train_unet(unet_config(tmp_path / "run", movq_dir(tmp_path / "movq"), "schedule.max_steps=1"), dataset=dataset())
    assert layouts and all(layouts), layouts


def test_export_is_a_native_model_folder_with_the_training_size(tmp_path):
    """final/ loads with the project loader (U-Net = the trained weights, null embedding kept), records the
    training size and the sample grids' settings as the model's sampling defaults, and a pipeline runs."""
    from kandinsky3.pipelines.text_to_image import Kandinsky3Pipeline

    train_unet(unet_config(tmp_path / "run", movq_dir(tmp_path / "movq"), "schedule.max_steps=2", "ema.decay=0"),
               dataset=dataset())
    components = load_components(tmp_path / "run" / "final")
    assert components.conditioning == "original" and components.variant == "base"
    defaults = components.sampling_defaults
    assert (defaults.width, defaults.height, defaults.guidance_scale, defaults.steps, defaults.sampler) == (
        32, 32, 3.0, 3, "original")
    state = load_checkpoint(tmp_path / "run" / CHECKPOINT)["model"]
    for key, value in components.unet.state_dict().items():
        assert torch.equal(value, state[f"unet.{key}"]), key
    assert torch.equal(components.text_encoder.null_embedding, state["text_encoder.null_embedding"])
    pipe = Kandinsky3Pipeline(components.unet, components.movq, components.text_encoder)
    images = pipe("a red circle", width=32, height=32, steps=2, seed=0, output_type="pt", progress=False)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_min_snr_weights_damp_the_low_noise_steps_and_gamma_0_is_the_plain_mse():
    from kandinsky3.diffusion.schedule import cosine_alphas_cumprod
    from kandinsky3.training.train_unet import DiffusionModel, min_snr_weights

    alphas = cosine_alphas_cumprod()
    weights = min_snr_weights(alphas, 5.0)
    snr = alphas / (1 - alphas)
    assert torch.equal(weights[snr <= 5], torch.ones(int((snr <= 5).sum())))  # noisy steps: weight 1
    torch.testing.assert_close(weights[snr > 5], 5 / snr[snr > 5])
    assert weights[0] < 1e-3 and torch.all(weights[1:] >= weights[:-1])  # rising with the noise
    assert torch.equal(min_snr_weights(alphas, 0.0), torch.ones_like(alphas))
    # the loss: the weighted mean of the per-sample MSEs; with γ = 0 the batch's mean ε-MSE
    plain, damped = _model(), _model()
    damped.loss_weights = min_snr_weights(alphas, 5.0)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    ids, mask = torch.tensor([[5, 6, 1]] * 3), torch.ones(3, 3, dtype=torch.long)
    t, drop = torch.tensor([0, 300, 999]), torch.zeros(3, dtype=torch.bool)
    with torch.no_grad():
        loss = plain(x0, ids, mask, t, noise, drop)
        eps = [plain(x0[i:i + 1], ids[i:i + 1], mask[i:i + 1], t[i:i + 1], noise[i:i + 1], drop[i:i + 1])
               for i in range(3)]
        torch.testing.assert_close(loss, torch.stack(eps).mean())
        torch.testing.assert_close(damped(x0, ids, mask, t, noise, drop),
                                   (torch.stack(eps) * min_snr_weights(alphas, 5.0)[t]).mean())


def test_object_pixel_weights_cover_every_drawn_pixel_and_keep_each_samples_mean():
    """On 60 shapes images (64 px, 8x8 latents): every latent pixel an object's drawing touches weighs the most,
    ``weight`` times the pixels no object reaches; each sample's map has mean 1; weight 1 is every pixel at 1."""
    from kandinsky3.data.shapes import COLOURS, ShapesDataset
    from kandinsky3.training.image_datasets import object_anchors
    from kandinsky3.training.train_unet import object_pixel_weights

    data = ShapesDataset(60, image_size=64, seed=3)
    anchors = object_anchors(None, data)
    maps = object_pixel_weights(anchors, 8, 8, 5.0)
    assert maps.shape == (60, 1, 8, 8)
    torch.testing.assert_close(maps.mean(dim=(1, 2, 3)), torch.ones(60))
    for i, objects in enumerate(anchors):
        image, _, scene = data.example(i)
        drawn = torch.from_numpy((np.asarray(image) != np.array(COLOURS[scene.background])).any(-1))  # (64,64)
        touched = torch.nn.functional.max_pool2d(drawn[None].float(), 8)[0] > 0  # (8,8) latent pixels
        heavy, light = maps[i, 0].max(), maps[i, 0].min()
        assert touched.any() and bool((maps[i, 0][touched] == heavy).all()), i
        torch.testing.assert_close(heavy / light, torch.tensor(5.0))
    assert (maps == maps.amax(dim=(2, 3), keepdim=True)).float().mean() < 0.3  # the boxes are the objects'
    assert torch.equal(object_pixel_weights(anchors, 8, 8, 1.0), torch.ones(60, 1, 8, 8))


def test_pixel_weights_weigh_the_loss_inside_each_sample():
    """With pixel weights the loss is each sample's weighted mean of (ε − ε̂)²: all-ones weights give the plain
    loss, and a map that is 1 on one pixel column and 0 elsewhere (times the width) counts that column alone."""
    model = _model()
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    ids, mask = torch.tensor([[5, 6, 1]] * 2), torch.ones(2, 3, dtype=torch.long)
    t, drop = torch.tensor([100, 700]), torch.zeros(2, dtype=torch.bool)
    column = torch.zeros(2, 1, 8, 8)
    column[..., 3] = 8.0
    with torch.no_grad():
        plain = model(x0, ids, mask, t, noise, drop)
        torch.testing.assert_close(model(x0, ids, mask, t, noise, drop, None, torch.ones(2, 1, 8, 8)), plain)
        context, cmask = training_conditions(model.text_encoder, ids, mask, drop)
        from kandinsky3.diffusion.schedule import q_sample
        eps = model.unet(q_sample(x0, noise, t, model.alphas_cumprod), t, context, cmask)
        expected = (eps - noise)[..., 3].square().mean()
        torch.testing.assert_close(model(x0, ids, mask, t, noise, drop, None, column), expected)

"""Tiled MoVQ decoding: geometry and blending (exact, on a pixel-local stand-in decoder), one tile = decode,
shapes on a tiny random MoVQ, and closeness / seamlessness on the bundled small model's trained MoVQ.

The trained MoVQ (f = 4, trained on 64 px images = 16×16 latents) decodes encoded shapes scenes of 128×192 px
(32×48 latents); tile 16 = its training size. Seams are measured as the mean absolute difference between
neighbouring pixels across every tile edge and every pixel step inside the overlap bands (both directions).
"""

from __future__ import annotations

import copy
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from _tiny_models import randomize_, tiny_movq_config

from kandinsky3.data.shapes import ShapesDataset
from kandinsky3.models.movq import MoVQ
from kandinsky3.models.movq_tiling import _axis_windows, _tile_starts, decode_tiled
from kandinsky3.weights import load_movq

TINY_BASE = Path(__file__).resolve().parents[2] / "kandinsky3" / "assets" / "tiny" / "base"
TILE, OVERLAP = 16, 4

# Measured on the 3 scenes below with the bundled 8x MoVQ (tile 16, overlap 4): mean |tiled - untiled| = 0.026,
# max 1.38 (images in [-1,1]; the differences come from per-tile GroupNorm/attention statistics, spread over the
# tile interiors; for scale, the untiled decode is 0.044 from the original images, the tiled one 0.042).
# Bound = the previous MoVQ's 0.035 × 2.
MAX_MEAN_DIFFERENCE = 0.07
# Seam roughness measured on the same scenes: untiled 0.0042, blended 0.0048 (ratio 1.13); tiles abutting
# without overlap 0.093 against 0.0088 untiled at their edges (ratio 10.5). Blending may leave it 25% above the
# untiled figure; without blending it must be clearly above, which shows the seam check can fail.
SEAM_RATIO_BLENDED = 1.25
SEAM_RATIO_UNBLENDED = 3.0


class _PixelwiseMoVQ:
    """Stand-in for MoVQ whose decode is local (nearest ×f upsampling of the first 3 channels): tiling it with any
    blending that sums to 1 must reproduce the untiled decode, which pins tile placement and normalisation."""

    downsample_factor = 2
    config = SimpleNamespace(z_channels=4)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        f = self.downsample_factor
        return latents[:, :3].repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)  # (B,3,h·f,w·f)


@pytest.fixture(scope="module")
def random_movq() -> MoVQ:
    return randomize_(MoVQ(tiny_movq_config()), seed=3).eval()


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.Tensor]:
    """Trained MoVQ, latents of 3 encoded 256×384 scenes, their untiled decode."""
    movq = load_movq(TINY_BASE, dtype=torch.float32)
    data = ShapesDataset(3, image_size=384, seed=7, split="seen")
    images = torch.stack([data[i][0] for i in range(len(data))])[:, :, :256, :]  # (3,3,256,384) in [-1,1]
    with torch.no_grad():
        latents = movq.encode(images)  # (3,4,32,48)
        return {"movq": movq, "latents": latents, "untiled": movq.decode(latents)}


def _seam_positions(size: int, tile: int, overlap: int, f: int) -> list[int]:
    """Image rows (or columns) p whose step p-1 -> p crosses a tile edge or lies inside an overlap band."""
    starts = _tile_starts(size, tile, overlap)
    positions: set[int] = set()
    for previous, start in zip(starts, starts[1:]):
        positions.update(range(start * f, (previous + tile) * f + 1))  # band [start, previous end] in pixels
    return sorted(positions)


def _seam_roughness(images: torch.Tensor, tile: int, overlap: int, f: int) -> float:
    """Mean |neighbour difference| across the seams of the tile layout, over rows and columns together."""
    height, width = images.shape[-2] // f, images.shape[-1] // f
    rows, cols = _seam_positions(height, tile, overlap, f), _seam_positions(width, tile, overlap, f)
    across_rows = (images[:, :, rows, :] - images[:, :, [r - 1 for r in rows], :]).abs()  # (B,C,len(rows),W)
    across_cols = (images[:, :, :, cols] - images[:, :, :, [c - 1 for c in cols]]).abs()  # (B,C,H,len(cols))
    return float(torch.cat([across_rows.flatten(), across_cols.flatten()]).mean())


@pytest.mark.parametrize("size", [(40, 24), (41, 17), (40, 12), (16, 40)])
@pytest.mark.parametrize("overlap", [0, 4, 12])
def test_tiled_decode_of_a_local_decoder_equals_untiled_for_any_layout(size, overlap):
    stand_in = _PixelwiseMoVQ()
    latents = torch.randn(2, 4, *size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    tiled = decode_tiled(stand_in, latents, tile=TILE, overlap=overlap)
    torch.testing.assert_close(tiled, stand_in.decode(latents), rtol=0, atol=1e-12)


def test_weight_windows_are_one_inside_and_ramp_linearly_only_across_overlaps():
    first, second = _axis_windows([0, 12], length=16, f=1, device=torch.device("cpu"), dtype=torch.float64)
    ramp = torch.tensor([0.5, 1.5, 2.5, 3.5], dtype=torch.float64) / 4  # overlap of 4 px, pixel centres
    torch.testing.assert_close(first, torch.cat([torch.ones(12, dtype=torch.float64), ramp.flip(0)]))
    torch.testing.assert_close(second, torch.cat([ramp, torch.ones(12, dtype=torch.float64)]))
    (alone,) = _axis_windows([0], length=16, f=2, device=torch.device("cpu"), dtype=torch.float64)
    assert torch.equal(alone, torch.ones(32, dtype=torch.float64))


def test_tile_starts_cover_the_side_with_full_tiles_and_at_least_the_overlap():
    for size in range(2, 100):
        for tile, overlap in [(16, 4), (16, 0), (8, 7), (64, 16)]:
            starts = _tile_starts(size, tile, overlap)
            assert starts[0] == 0 and starts[-1] == max(size - tile, 0)
            overlaps = [previous + tile - start for previous, start in zip(starts, starts[1:])]
            assert all(o >= overlap for o in overlaps) and all(o < tile for o in overlaps), (size, tile, starts)


def test_one_tile_is_exactly_movq_decode(random_movq, trained):
    latents = torch.randn(2, 4, 16, 12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(decode_tiled(random_movq, latents, tile=16, overlap=4), random_movq.decode(latents))
        movq, crop = trained["movq"], trained["latents"][:, :, :16, :16]
        assert torch.equal(decode_tiled(movq, crop, tile=16, overlap=4), movq.decode(crop))


@pytest.mark.parametrize("size", [(40, 24), (41, 17), (40, 12)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tiled_decode_shape_and_dtype_when_tiles_do_not_divide_the_latent(random_movq, size, dtype):
    movq = copy.deepcopy(random_movq).to(dtype)
    latents = torch.randn(2, 4, *size, dtype=dtype, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        images = decode_tiled(movq, latents, tile=TILE, overlap=OVERLAP)
    f = movq.downsample_factor
    assert images.shape == (2, 3, size[0] * f, size[1] * f) and images.dtype == dtype
    assert torch.isfinite(images).all()


def test_tiled_decode_is_close_to_untiled_on_the_trained_movq(trained):
    with torch.no_grad():
        tiled = decode_tiled(trained["movq"], trained["latents"], tile=TILE, overlap=OVERLAP)
    difference = (tiled - trained["untiled"]).abs().mean()
    assert difference <= MAX_MEAN_DIFFERENCE, float(difference)


def test_blending_leaves_no_seams_and_abutting_tiles_do(trained):
    movq, latents, untiled = trained["movq"], trained["latents"], trained["untiled"]
    f = movq.downsample_factor
    ratios = {}
    for overlap in (OVERLAP, 0):
        with torch.no_grad():
            tiled = decode_tiled(movq, latents, tile=TILE, overlap=overlap)
        reference = _seam_roughness(untiled, TILE, overlap, f)  # the same positions in the untiled decode
        ratios[overlap] = _seam_roughness(tiled, TILE, overlap, f) / reference
    assert ratios[OVERLAP] <= SEAM_RATIO_BLENDED, ratios
    assert ratios[0] >= SEAM_RATIO_UNBLENDED, ratios


@pytest.mark.parametrize(
    "shape, kwargs, match",
    [
        ((1, 4, 8, 8), {"tile": 1}, "tile must be >= 2"),
        ((1, 4, 8, 8), {"tile": 4.0}, "tile must be an int"),
        ((1, 4, 8, 8), {"tile": True}, "tile must be an int"),
        ((1, 4, 8, 8), {"tile": 4, "overlap": 4}, "overlap must satisfy"),
        ((1, 4, 8, 8), {"overlap": -1}, "overlap must satisfy"),
        ((4, 8, 8), {}, r"expects \(B,4,h,w\) latents"),
        ((1, 3, 8, 8), {}, r"expects \(B,4,h,w\) latents"),
    ],
)
def test_tiled_decode_rejects_bad_arguments(random_movq, shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        decode_tiled(random_movq, torch.zeros(shape), **kwargs)


def test_pipelines_decode_in_tiles_only_when_asked():
    """``pipe.decode_tiling`` reaches the decoder of every pipeline; off again, images are bit-equal to before."""
    import numpy as np
    from PIL import Image

    from kandinsky3 import get_img2img_pipeline, get_inpainting_pipeline, get_T2I_pipeline
    from kandinsky3.pipelines import DecodeTiling

    image = Image.fromarray((np.random.default_rng(0).random((128, 192, 3)) * 255).astype(np.uint8))
    mask = np.zeros((128, 192), np.float32)
    mask[32:96, 48:144] = 1
    cases = ((get_T2I_pipeline, ("a red circle",), dict(width=192, height=128)),
             (get_img2img_pipeline, ("a red circle", image), dict(strength=0.5)),
             (get_inpainting_pipeline, ("a red circle", image, mask), {}))
    for factory, args, size in cases:
        pipe = factory("cpu", model="tiny")
        run = lambda: pipe(*args, steps=4, seed=0, output_type="np", progress=False, **size)  # noqa: E731
        whole = run()
        pipe.decode_tiling = DecodeTiling(tile=8, overlap=2)  # 16×24 latents: 3×4 tiles
        tiled = run()
        pipe.decode_tiling = None
        assert np.array_equal(run(), whole)
        difference = np.abs(tiled - whole)
        assert 0 < difference.mean() < 0.03, (factory.__name__, difference.mean())
        with pytest.raises(ValueError, match="overlap"):
            DecodeTiling(tile=16, overlap=16)

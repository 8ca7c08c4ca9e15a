"""Components that wait on disk between phases (``offload="disk"``): same images, no weights held between calls."""

import numpy as np
import pytest
import torch
from _checkpoints import write_diffusers
from PIL import Image
from torch import nn

from kandinsky3 import get_img2img_pipeline, get_inpainting_pipeline, get_T2I_pipeline
from kandinsky3.lowmem.storage import compute_in
from kandinsky3.pipelines import Kandinsky3Pipeline
from kandinsky3.lowmem.residency import Residency, adopt, check_reload, is_released, release
from kandinsky3.weights.build import instantiate
from kandinsky3.weights.sources import DictSource

SMALL = dict(steps=4, seed=0, output_type="np", progress=False)


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 4).view(1, 4, 1, 1), persistent=False)

    def forward(self, x):
        return self.norm(self.conv(x)) * self.scale


def _net(seed: int, stored=torch.bfloat16) -> nn.Module:
    torch.manual_seed(seed)
    return compute_in(_Net().to(stored), torch.float32)


def test_release_drops_every_tensor_and_adopt_restores_the_same_function():
    x = torch.randn(2, 3, 8, 8)
    net, fresh = _net(0), _net(0)
    expected = net(x)
    release(net)
    assert is_released(net) and all(t.is_meta for t in (*net.parameters(), *net.buffers()))
    assert net.conv.parametrizations.weight.original.dtype == torch.bfloat16  # the skeleton keeps the dtypes
    adopt(net, fresh)
    assert not is_released(net) and net.scale.device.type == "cpu"  # non-persistent buffers come back too
    assert torch.equal(net(x), expected)


def test_released_weights_are_freed_at_once_without_waiting_for_the_garbage_collector():
    """The loaded module has reference cycles (parametrizations); it must not keep the weights alive."""
    import gc
    import weakref

    pipe = get_T2I_pipeline("cpu", model="tiny", offload="disk", dtype_map=torch.bfloat16,
                            load_options={"compute_dtype": torch.float32})
    gc.disable()
    try:
        with pipe.residency.phase("unet", pipe.unet) as unet:
            weight = weakref.ref(next(unet.parameters()))
            assert weight() is not None and weight().device.type == "cpu"
        assert weight() is None
    finally:
        gc.enable()


def test_adopt_moves_the_tensors_and_leaves_the_loaded_module_without_data():
    net, fresh = _net(0), _net(0)
    weight = fresh.conv.parametrizations.weight.original.detach().clone()
    release(net)
    adopt(net, fresh)
    assert all(t.is_meta for t in (*fresh.parameters(), *fresh.buffers()))
    assert torch.equal(net.conv.parametrizations.weight.original, weight)


def test_each_residency_owns_a_validated_copy_of_its_policy():
    loaders = {"unet": lambda: None}
    first, second = Residency(), Residency(reload=loaders)
    loaders["movq"] = lambda: None
    first.reload["text_encoder"] = lambda: None
    assert set(second.reload) == {"unet"} and set(Residency().reload) == set()  # no state shared between them
    offload = Residency(offload={"unet": "cpu", "text_encoder": "cpu", "movq": "meta"}).offload
    assert offload["movq"] == torch.device("meta")
    with pytest.raises(ValueError, match="not both"):
        Residency(offload={"unet": "cpu", "text_encoder": "cpu", "movq": "cpu"}, reload=loaders)


def test_adopt_refuses_other_shapes_and_dtypes():
    net = _net(0)
    release(net)
    with pytest.raises(ValueError, match="rebuild the pipeline"):
        adopt(net, _net(0, stored=torch.float16))
    other = _net(0)
    other.conv = compute_in(nn.Conv2d(3, 4, 1).to(torch.bfloat16), torch.float32)
    with pytest.raises(ValueError, match="rebuild the pipeline"):
        adopt(net, other)


def test_meta_instantiate_reads_no_tensor_data():
    from kandinsky3.models.movq import MoVQ

    from _tiny_models import tiny_movq_config

    state = {k: v.half() for k, v in MoVQ(tiny_movq_config()).state_dict().items()}

    class Unreadable(DictSource):
        def __getitem__(self, key):
            raise AssertionError(f"read {key}")

    skeleton = instantiate("movq", tiny_movq_config(), Unreadable(state, None), device="meta")
    assert is_released(skeleton)
    assert {t.dtype for t in skeleton.parameters()} == {torch.float16}  # the stored dtype


def test_check_reload_rejects_bad_maps():
    with pytest.raises(ValueError, match="unknown components"):
        check_reload({"vae": lambda: None}, None)
    with pytest.raises(TypeError, match="callable"):
        check_reload({"unet": "path/to/unet"}, None)
    with pytest.raises(ValueError, match="not both"):
        check_reload({"unet": lambda: None}, {"unet": torch.device("cpu")})
    with pytest.raises(ValueError, match="offload must be .*'ram'"):
        get_T2I_pipeline("cpu", model="tiny", offload="ram")


def _counted(pipe, name):
    calls = []
    loader = pipe.residency.reload[name]
    pipe.residency.reload[name] = lambda: calls.append(1) or loader()
    return calls


@pytest.mark.slow  # spawns processes / re-reads checkpoints: CI's second tier
def test_disk_offload_text_to_image_matches_resident_and_reads_the_unet_once_per_call():
    resident = get_T2I_pipeline("cpu", model="tiny")
    on_disk = get_T2I_pipeline("cpu", model="tiny", offload="disk")
    assert set(on_disk.residency.reload) == {"unet", "movq"} and is_released(on_disk.unet) and is_released(on_disk.movq)
    assert on_disk.unet.config == resident.unet.config  # the skeleton answers config questions
    unet_reads = _counted(on_disk, "unet")
    expected = resident(["a red circle", "a blue square"], width=64, height=64, **SMALL)
    for call in (1, 2):
        got = on_disk(["a red circle", "a blue square"], width=64, height=64, **SMALL)
        assert np.array_equal(got, expected)
        assert len(unet_reads) == call and is_released(on_disk.unet) and is_released(on_disk.movq)


@pytest.mark.slow  # spawns processes / re-reads checkpoints: CI's second tier
def test_disk_offload_inpainting_and_img2img_match_resident():
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 8:40] = 1
    for factory, args in ((get_inpainting_pipeline, ("a green triangle", image, mask)),
                          (get_img2img_pipeline, ("a green triangle", image))):
        resident, on_disk = factory("cpu", model="tiny"), factory("cpu", model="tiny", offload="disk")
        movq_reads = _counted(on_disk, "movq")
        assert np.array_equal(on_disk(*args, **SMALL), resident(*args, **SMALL))
        assert len(movq_reads) == 2  # encode the image, decode the result
        assert is_released(on_disk.unet) and is_released(on_disk.movq)


@pytest.mark.slow  # spawns processes / re-reads checkpoints: CI's second tier
def test_disk_offload_keeps_a_diffusers_folders_scheduler_and_storage_dtype(tmp_path):
    folder = write_diffusers(tmp_path / "community").root
    options = dict(dtype_map=torch.bfloat16, load_options={"compute_dtype": torch.float32, "stream_t5": False})
    resident = get_T2I_pipeline("cpu", model=folder, **options)
    on_disk = get_T2I_pipeline("cpu", model=folder, offload="disk", **options)
    assert isinstance(on_disk, Kandinsky3Pipeline) and on_disk.default_sampler == "ddpm"
    assert on_disk.scheduler_config == resident.scheduler_config and on_disk.conditioning == "diffusers"
    assert {p.dtype for p in on_disk.unet.parameters()} == {torch.bfloat16}
    kwargs = dict(width=16, height=16, **SMALL)
    assert np.array_equal(on_disk("a cat", **kwargs), resident("a cat", **kwargs))

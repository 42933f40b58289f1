"""The CPU memory meter (zoo.training.memory.LiveTensors / LiveTensorMeter) against independent
counts: exact bytes of known allocations, a hand-derived peak of an MLP training step, and the
tensors autograd saves for backward (counted separately through saved-tensor hooks)."""

import contextlib

import pytest
import torch
from torch import nn

from zoo.config.schema import LossConfig, UNetConfig
from zoo.losses import build_loss
from zoo.models import build_model
from zoo.training.memory import LiveTensorMeter, LiveTensors, make_meter, parameter_bytes, plain_tensor

F32 = 4


def test_exact_bytes_of_allocations_views_inplace_and_frees() -> None:
    with LiveTensors() as live:
        a = torch.empty(1000)  # 4000 bytes
        assert live.live_bytes == 4000
        b = a * 2  # a second 4000
        assert live.live_bytes == 8000
        view = b[:10]
        b.add_(1)
        torch.mul(a, 3, out=b)
        assert live.live_bytes == 8000  # views, in-place and out= allocate nothing
        del a
        assert live.live_bytes == 4000
        c = torch.empty(250, dtype=torch.float64)  # 2000 bytes
        assert live.live_bytes == 6000
        del b, view, c
        assert live.live_bytes == 0
    assert live.peak_bytes == 8000


def test_tensors_created_before_the_meter_are_not_counted_and_outliving_ones_are_harmless() -> None:
    before = torch.ones(10_000)
    with LiveTensors() as live:
        kept = before + 1  # 40 kB, outlives the meter
        _ = before.view(100, 100)
    assert live.peak_bytes == 40_000
    del kept  # its finalizer was detached on exit: no callback into a finished meter
    assert live.live_bytes == 40_000


def test_peak_of_an_mlp_training_step_matches_the_hand_count() -> None:
    # Linear(8, H) -> tanh -> Linear(H, 1); loss = sum of squares.  Forward keeps a = tanh(h)
    # (saved by tanh's backward); h dies once tanh has run.  Backward: grad_a = grad_o W2 (B x H)
    # is alive while tanh's backward allocates grad_h (B x H), with a still saved: the peak is
    # 3 B H floats, plus the small tensors (outputs, parameter gradients) of O(B + H) floats.
    # Summing saved activations alone would give 1 B H: the backward pass's buffers matter.
    batch, hidden = 256, 512
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    x = torch.randn(batch, 8)
    with LiveTensors() as live:
        net(x).square().sum().backward()
    floor = 3 * batch * hidden * F32
    small = (10 * hidden + 4 * batch + 64) * F32  # parameter gradients (9H + 2) and B-sized tensors
    assert floor <= live.peak_bytes <= floor + small, (live.peak_bytes, floor)
    # What stays after the step: exactly the parameter gradients.
    assert live.live_bytes == parameter_bytes(net)


def small_unet():
    cfg = UNetConfig(
        channels=16, channel_mults=[1, 2], blocks_per_res=1, attention_res=[8], num_groups=4, dropout=0.0
    )
    torch.manual_seed(0)
    return build_model(cfg, (3, 16, 16))


def saved_activation_bytes(step, model: nn.Module) -> tuple[int, int]:
    """Independent measure: the storages the backward pass reads back (unpacks), parameters
    excluded, counted once each, and the largest of them.  Unpacking, not packing, decides:
    custom autograd Functions inside a no-grad torch.func.jvp pack tensors too, but those are
    dropped with the JVP and never read by the backward pass."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}
    # Every packed storage is held until the step ends: a storage freed mid-step (a node whose
    # backward ran early) could otherwise hand its address to a later one, and keying by address
    # would then merge two storages — which made this measure vary from run to run.
    held: list[torch.UntypedStorage] = []

    def pack(tensor: torch.Tensor):
        plain = plain_tensor(tensor)
        if plain._is_zerotensor():
            return tensor, None
        storage = plain.untyped_storage()
        held.append(storage)
        return tensor, (storage.data_ptr(), storage.nbytes())

    def unpack(packed):
        tensor, identity = packed
        if identity is not None and identity[0] not in params:
            sizes[identity[0]] = identity[1]
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        step()
    return sum(sizes.values()), max(sizes.values())


@pytest.mark.parametrize("mode", ["nograd", "selective"])
def test_unet_meanflow_step_peak_is_saved_activations_plus_a_few_backward_buffers(mode: str) -> None:
    model = small_unet()
    x = torch.randn(16, 3, 16, 16)
    loss_fn = build_loss(LossConfig(jvp=mode, ratio=0.75))

    def step() -> None:
        loss_fn(model, x, None, torch.Generator().manual_seed(0)).loss.backward()

    saved, largest = saved_activation_bytes(step, model)
    model.zero_grad(set_to_none=True)
    with LiveTensors() as live:
        step()
    # Every saved activation is alive at the end of the forward; the backward adds gradients of
    # activations (a few at a time) and the parameter gradients.
    assert saved <= live.peak_bytes <= saved + parameter_bytes(model) + 6 * largest, (
        live.peak_bytes,
        saved,
        largest,
    )


def test_meter_works_inside_grad_recording_jvps_and_sees_their_tangent_activations() -> None:
    model = small_unet()
    x = torch.randn(16, 3, 16, 16)
    peaks = {}
    for mode in ["nograd", "full_batch", "primal"]:
        loss_fn = build_loss(LossConfig(jvp=mode, ratio=0.75))
        meter = LiveTensorMeter(model, None)
        peaks[mode] = meter.measure(
            lambda loss_fn=loss_fn: loss_fn(model, x, None, torch.Generator().manual_seed(0)).loss.backward()
        )
        model.zero_grad(set_to_none=True)
        assert peaks[mode].fits
        assert peaks[mode].peak_bytes > meter.static_bytes == 3 * parameter_bytes(model)
    # A JVP recorded for backward over the whole batch keeps the built-in ops' tangent
    # activations alive too (zoo's own layers compute theirs unrecorded: zoo.losses.jvp).
    assert peaks["full_batch"].peak_bytes > max(peaks["primal"].peak_bytes, peaks["nograd"].peak_bytes)


def test_measuring_changes_no_result() -> None:
    model = small_unet()
    x = torch.randn(8, 3, 16, 16)
    loss_fn = build_loss(LossConfig(jvp="full_batch", ratio=0.5))
    grads = []
    for metered in (False, True):
        model.zero_grad(set_to_none=True)
        with LiveTensors() if metered else contextlib.nullcontext():
            loss = loss_fn(model, x, None, torch.Generator().manual_seed(3)).loss
            loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_make_meter_on_cpu_is_the_live_tensor_meter_with_the_configured_cap() -> None:
    model = small_unet()
    meter = make_meter(model, torch.device("cpu"), 0.01)
    assert isinstance(meter, LiveTensorMeter)
    assert meter.limit_bytes == int(0.01 * 2**30)
    room = meter.limit_bytes - meter.static_bytes
    assert meter.measure(lambda: torch.empty(room, dtype=torch.uint8)).peak_bytes == meter.limit_bytes
    assert meter.measure(lambda: torch.empty(room, dtype=torch.uint8)).fits
    assert not meter.measure(lambda: torch.empty(room + 1, dtype=torch.uint8)).fits

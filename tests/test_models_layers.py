"""GroupNorm and attention: values, tangents and gradients against plain PyTorch references."""

import pytest
import torch
from torch import Tensor, nn

from zoo.models.layers import Attention, Conv2d, GroupNorm, LayerNorm, attention, detached_tangents

F64 = dict(dtype=torch.float64)


def central_difference(f, inputs: tuple[Tensor, ...], tangents: tuple[Tensor, ...], eps=1e-6):
    plus = f(*(x + eps * d for x, d in zip(inputs, tangents, strict=True)))
    minus = f(*(x - eps * d for x, d in zip(inputs, tangents, strict=True)))
    return (plus - minus) / (2 * eps)


def assert_close(a: Tensor, b: Tensor, tol: float = 1e-10) -> None:
    assert a.shape == b.shape
    err = (a - b).abs().max().item()
    assert err <= tol * max(1.0, b.abs().max().item()), f"max abs error {err:.3e}"


# ----------------------------------------------------------------------------- group norm


def group_norm_pair(groups=4, channels=12) -> tuple[nn.GroupNorm, GroupNorm]:
    torch.manual_seed(0)
    ref = nn.GroupNorm(groups, channels).double()
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    mine = GroupNorm(groups, channels).double()
    mine.load_state_dict(ref.state_dict())
    return ref, mine


@pytest.mark.parametrize("shape", [(3, 12, 5, 7), (2, 12, 9), (4, 12)])
def test_group_norm_value_and_tangent_match_native(shape):
    ref, mine = group_norm_pair()
    x = torch.randn(shape, **F64) * 2 + 0.5
    dx = torch.randn(shape, **F64)
    y_ref, t_ref = torch.func.jvp(ref, (x,), (dx,))
    y, t = torch.func.jvp(mine, (x,), (dx,))
    assert_close(y, y_ref)
    assert_close(t, t_ref)
    assert_close(mine(x), ref(x))
    assert_close(t, central_difference(mine, (x,), (dx,)), tol=1e-7)


def test_group_norm_parameter_tangents_match_native():
    ref, mine = group_norm_pair()
    x = torch.randn(2, 12, 4, 4, **F64)
    dx = torch.randn_like(x)
    params = dict(ref.named_parameters())
    d_params = {k: torch.randn_like(p) for k, p in params.items()}

    def run(module):
        def f(p, z):
            return torch.func.functional_call(module, p, (z,))

        return torch.func.jvp(f, (params, x), (d_params, dx))

    (y_ref, t_ref), (y, t) = run(ref), run(mine)
    assert_close(y, y_ref)
    assert_close(t, t_ref)


def test_group_norm_gradients_match_native_including_through_jvp_primal():
    ref, mine = group_norm_pair()
    x0 = torch.randn(3, 12, 4, 5, **F64)
    dx = torch.randn_like(x0)
    g_y, g_t = torch.randn_like(x0), torch.randn_like(x0)
    grads = {}
    for name, module in (("ref", ref), ("mine", mine)):
        x = x0.clone().requires_grad_()
        inputs = [x, module.weight, module.bias]
        # plain backward
        plain = torch.autograd.grad((module(x) * g_y).sum(), inputs)
        # primal reuse: the loss uses the primal output of torch.func.jvp
        y, t = torch.func.jvp(module, (x,), (dx,))
        reuse = torch.autograd.grad((y * g_y).sum(), inputs, retain_graph=True)
        # and the tangent itself is differentiable (it does not depend on the bias)
        through_tangent = torch.autograd.grad((t * g_t).sum(), inputs, materialize_grads=True)
        grads[name] = plain + reuse + through_tangent
    for a, b in zip(grads["mine"], grads["ref"], strict=True):
        assert_close(a, b)


def test_group_norm_gradcheck_backward_and_forward_ad():
    _, module = group_norm_pair(groups=2, channels=4)
    x = torch.randn(2, 4, 3, 3, **F64, requires_grad=True)
    w, b = (p.detach().clone().requires_grad_() for p in (module.weight, module.bias))

    def f(x, w, b):
        return torch.func.functional_call(module, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True, check_batched_grad=False)


def test_group_norm_fp32_tangent_accurate_for_offset_inputs():
    """The closed form subtracts E[x dx] - mean E[dx]: fine in fp32 at a large mean/std ratio."""
    ref, mine = group_norm_pair()
    x = torch.randn(2, 12, 8, 8, **F64) + 100.0
    dx = torch.randn_like(x)
    _, t_exact = torch.func.jvp(ref, (x,), (dx,))
    _, t32 = torch.func.jvp(mine.float(), (x.float(),), (dx.float(),))
    rel = ((t32.double() - t_exact).norm() / t_exact.norm()).item()
    assert rel < 1e-3


def test_group_norm_state_dict_keys_match_native():
    native = nn.GroupNorm(4, 8)
    assert GroupNorm(4, 8).state_dict().keys() == native.state_dict().keys()
    GroupNorm(4, 8).load_state_dict(native.state_dict())


def test_group_norm_runs_in_fp32_under_autocast():
    """As autocast does for F.group_norm on CUDA: low-precision activations normalised in fp32."""
    ref, mine = group_norm_pair()
    ref, mine = ref.float(), mine.float()
    x = torch.randn(2, 12, 4, 4).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mine(x)
    assert y.dtype == torch.float32
    assert_close(y, ref(x.float()), tol=1e-5)


# ----------------------------------------------------------------------------- layer norm


def layer_norm_pair(affine: bool) -> tuple[nn.LayerNorm, LayerNorm]:
    torch.manual_seed(4)
    ref = nn.LayerNorm(6, eps=1e-6, elementwise_affine=affine).double()
    if affine:
        with torch.no_grad():
            ref.weight.normal_()
            ref.bias.normal_()
    mine = LayerNorm(6, eps=1e-6, elementwise_affine=affine).double()
    mine.load_state_dict(ref.state_dict())
    return ref, mine


def primitive_layer_norm(module: nn.LayerNorm):
    """Layer norm from primitive ops: forward AD and double differentiation are generic here."""

    def f(x: Tensor) -> Tensor:
        centred = x - x.mean(-1, keepdim=True)
        y = centred * torch.rsqrt((centred * centred).mean(-1, keepdim=True) + module.eps)
        return y if module.weight is None else y * module.weight + module.bias

    return f


@pytest.mark.parametrize("affine", [False, True])
def test_layer_norm_values_tangents_and_gradients_match_reference(affine):
    ref, mine = layer_norm_pair(affine)
    x0 = torch.randn(2, 5, 6, **F64) * 3 + 1
    dx, g_y, g_t = (torch.randn_like(x0) for _ in range(3))
    results = {}
    for name, f in (("native", ref), ("primitive", primitive_layer_norm(ref)), ("mine", mine)):
        x = x0.clone().requires_grad_()
        inputs = [x, *ref.parameters()] if name != "mine" else [x, *mine.parameters()]
        y, t = torch.func.jvp(f, (x,), (dx,))
        reuse = torch.autograd.grad((y * g_y).sum(), inputs, retain_graph=True)
        through_tangent = torch.autograd.grad((t * g_t).sum(), inputs, materialize_grads=True)
        results[name] = (y, t, *reuse), through_tangent
    for a, b in zip(results["mine"][0], results["native"][0], strict=True):
        assert_close(a, b)
    # torch 2.14's native layer-norm JVP is not correctly differentiable (its gradient disagrees
    # with finite differences); compare gradients of the tangent with the primitive version.
    for a, b in zip(results["mine"][1], results["primitive"][1], strict=True):
        assert_close(a, b)
    assert_close(results["mine"][0][1], central_difference(mine, (x0,), (dx,)), tol=1e-7)


def test_gradient_of_the_tangent_matches_finite_differences():
    """d/dx <g, JVP(x; dx)> by central differences, for both normalisations."""
    _, gn = group_norm_pair()
    _, ln = layer_norm_pair(affine=True)
    for module, x0 in ((gn, torch.randn(2, 12, 3, 3, **F64)), (ln, torch.randn(4, 6, **F64))):
        dx, g, d = (torch.randn_like(x0) for _ in range(3))

        def phi(x, module=module, dx=dx, g=g):
            return (torch.func.jvp(module, (x,), (dx,))[1] * g).sum()

        x = x0.clone().requires_grad_()
        grad = torch.autograd.grad(phi(x), x)[0]
        with torch.no_grad():
            fd = central_difference(phi, (x0,), (d,))
        assert abs((grad * d).sum().item() - fd.item()) < 1e-7 * max(1.0, abs(fd.item()))


def test_layer_norm_gradcheck_backward_and_forward_ad():
    _, module = layer_norm_pair(affine=True)
    x = torch.randn(3, 6, **F64, requires_grad=True)
    w, b = (p.detach().clone().requires_grad_() for p in (module.weight, module.bias))

    def f(x, w, b):
        return torch.func.functional_call(module, {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b), check_forward_ad=True, check_batched_grad=False)


# ----------------------------------------------------------------------------- attention


def math_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    return torch.softmax(scores, dim=-1) @ v


def qkv(shape=(2, 3, 7, 5), requires_grad=False):
    torch.manual_seed(2)
    return tuple(torch.randn(shape, **F64, requires_grad=requires_grad) for _ in range(3))


def test_attention_value_and_tangent_match_math_attention():
    q, k, v = qkv()
    tangents = tuple(torch.randn_like(a) for a in (q, k, v))
    y_ref, t_ref = torch.func.jvp(math_attention, (q, k, v), tangents)
    y, t = torch.func.jvp(attention, (q, k, v), tangents)
    assert_close(y, y_ref)
    assert_close(t, t_ref)
    assert_close(t, central_difference(attention, (q, k, v), tangents), tol=1e-7)


def test_attention_gradients_match_math_attention_including_through_jvp():
    q, k, v = qkv(requires_grad=True)
    tangents = tuple(torch.randn_like(a) for a in (q, k, v))
    g_y, g_t = torch.randn_like(q), torch.randn_like(q)
    grads = {}
    for name, f in (("ref", math_attention), ("mine", attention)):
        plain = torch.autograd.grad((f(q, k, v) * g_y).sum(), (q, k, v))
        y, t = torch.func.jvp(f, (q, k, v), tangents)
        reuse = torch.autograd.grad((y * g_y).sum(), (q, k, v), retain_graph=True)
        through_tangent = torch.autograd.grad((t * g_t).sum(), (q, k, v))
        grads[name] = plain + reuse + through_tangent
    for a, b in zip(grads["mine"], grads["ref"], strict=True):
        assert_close(a, b)


def test_attention_gradcheck_backward_and_forward_ad():
    q, k, v = qkv(shape=(1, 2, 4, 3), requires_grad=True)
    assert torch.autograd.gradcheck(attention, (q, k, v), check_forward_ad=True, check_batched_grad=False)


def test_attention_module_matches_explicit_multi_head_reference():
    torch.manual_seed(3)
    module = Attention(dim=12, heads=3).double()
    x = torch.randn(2, 5, 12, **F64)
    dx = torch.randn_like(x)

    def reference(x):
        b, n, dim = x.shape
        q, k, v = module.qkv(x).split(dim, dim=-1)
        heads = [math_attention(*(a[..., h * 4 : (h + 1) * 4] for a in (q, k, v))) for h in range(3)]
        return module.proj(torch.cat(heads, dim=-1))

    y_ref, t_ref = torch.func.jvp(reference, (x,), (dx,))
    y, t = torch.func.jvp(module, (x,), (dx,))
    assert_close(y, y_ref)
    assert_close(t, t_ref)


def test_attention_rejects_width_not_divisible_by_heads():
    with pytest.raises(ValueError, match="divisible by heads"):
        Attention(dim=10, heads=3)


# --- Conv2d: the tangent skips PyTorch's zero weight-tangent convolution -----------------------


@pytest.mark.parametrize("stride, padding, bias", [(1, 1, True), (2, 0, False), (1, 0, True)])
def test_conv2d_values_tangents_and_gradients_match_nn_conv2d(stride, padding, bias):
    torch.manual_seed(0)
    ours = Conv2d(3, 5, 3 if padding else 1, stride=stride, padding=padding, bias=bias).double()
    reference = nn.Conv2d(3, 5, 3 if padding else 1, stride=stride, padding=padding, bias=bias).double()
    reference.load_state_dict(ours.state_dict())
    x, dx = torch.randn(2, 3, 9, 9, dtype=torch.float64), torch.randn(2, 3, 9, 9, dtype=torch.float64)
    y, dy = torch.func.jvp(ours, (x,), (dx,))
    y_ref, dy_ref = torch.func.jvp(reference, (x,), (dx,))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dy, dy_ref, rtol=1e-12, atol=1e-12)
    eps = 1e-6  # and against central finite differences
    torch.testing.assert_close(
        dy, (ours(x + eps * dx) - ours(x - eps * dx)) / (2 * eps), rtol=1e-6, atol=1e-6
    )
    # gradients, including through the primal output of a JVP (MeanFlow's primal-reuse modes)
    xg = x.clone().requires_grad_()
    primal, _ = torch.func.jvp(ours, (xg,), (dx,))
    grads = torch.autograd.grad((primal * y_ref.detach()).sum(), [xg, *ours.parameters()])
    xr = x.clone().requires_grad_()
    grads_ref = torch.autograd.grad((reference(xr) * y_ref.detach()).sum(), [xr, *reference.parameters()])
    for g, g_ref in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)


def test_conv2d_backward_under_bf16_autocast_matches_nn_conv2d():

    torch.manual_seed(1)
    ours = Conv2d(4, 4, 3, padding=1)
    reference = nn.Conv2d(4, 4, 3, padding=1)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, out_ref = ours(x), reference(x)
    assert out.dtype == out_ref.dtype == torch.bfloat16
    out.float().square().sum().backward()
    out_ref.float().square().sum().backward()
    assert ours.weight.grad.dtype == torch.float32
    torch.testing.assert_close(ours.weight.grad, reference.weight.grad, rtol=2e-2, atol=2e-2)


def test_conv2d_under_bf16_autocast_saves_bf16_tensors_and_matches_nn_conv2d_exactly():
    """Like autocast with nn.Conv2d: the input and weight are saved once, in bf16 (not fp32
    copies cast again in backward), and values and gradients are nn.Conv2d's bit for bit."""
    torch.manual_seed(2)
    ours = Conv2d(4, 6, 3, padding=1)
    reference = nn.Conv2d(4, 6, 3, padding=1)
    reference.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, 8, 8, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    saved: list[torch.dtype] = []

    def record(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ours(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref = reference(x_ref)
    assert saved and all(dtype == torch.bfloat16 for dtype in saved), saved
    torch.testing.assert_close(out, out_ref, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_ref.backward(grad)
    assert x.grad.dtype == ours.weight.grad.dtype == ours.bias.grad.dtype == torch.float32
    for a, b in (
        (x.grad, x_ref.grad),
        (ours.weight.grad, reference.weight.grad),
        (ours.bias.grad, reference.bias.grad),
    ):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_detached_tangents_skip_recording_and_keep_values():
    torch.manual_seed(0)
    norm, conv = GroupNorm(4, 8), Conv2d(8, 8, 3, padding=1)
    x, dx = torch.randn(2, 8, 5, 5, requires_grad=True), torch.randn(2, 8, 5, 5)

    def f(a):
        return conv(norm(a))

    _, recorded = torch.func.jvp(f, (x,), (dx,))
    with detached_tangents():
        out, detached = torch.func.jvp(f, (x,), (dx,))
    assert recorded.requires_grad and not detached.requires_grad
    assert out.requires_grad  # the primal still records: gradients through it are unaffected
    torch.testing.assert_close(detached, recorded.detach(), rtol=0, atol=0)

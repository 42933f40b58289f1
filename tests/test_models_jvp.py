"""MeanFlow's JVP through whole networks: torch.func.jvp along (v, 1, 0) for (z, t, r) must be
the directional derivative d/de u(z + e v, t + e, r), checked by central differences (float64)."""

import pytest
import torch

from zoo.config.schema import DiTConfig, MLPConfig, UNetConfig
from zoo.models import build_model

CASES = [
    ((2,), MLPConfig(hidden=32, depth=2, time_embed_dim=16), 0),
    (
        (1, 8, 8),
        UNetConfig(
            channels=16,
            channel_mults=[1, 2],
            blocks_per_res=1,
            attention_res=[8, 4],
            num_groups=8,
            heads=2,
        ),
        3,
    ),
    (
        (3, 12, 12),
        UNetConfig(channels=16, channel_mults=[1, 2, 2], blocks_per_res=1, attention_res=[3], num_groups=4),
        0,
    ),
    ((2, 8, 8), DiTConfig(patch_size=2, hidden=32, depth=2, heads=4), 3),
]


@pytest.mark.parametrize("shape,cfg,num_classes", CASES)
def test_jvp_matches_central_differences(shape, cfg, num_classes):
    torch.manual_seed(0)
    model = build_model(cfg, shape, num_classes).double().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # move off the zero init so that every path carries signal
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    batch = 3
    z = torch.randn(batch, *shape, dtype=torch.float64)
    v = torch.randn_like(z)
    t = torch.tensor([0.9, 0.6, 0.35], dtype=torch.float64)
    r = torch.tensor([0.1, 0.6, 0.2], dtype=torch.float64)  # includes r == t
    y = torch.tensor([0, 2, 1]) if num_classes else None

    def u(z, t, r):
        return model(z, t, r, y)

    out, dudt = torch.func.jvp(u, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    eps = 1e-6
    fd = (u(z + eps * v, t + eps, r) - u(z - eps * v, t - eps, r)) / (2 * eps)
    assert torch.allclose(out, u(z, t, r), rtol=0, atol=1e-12)
    scale = fd.abs().max().item()
    assert scale > 1e-3  # the derivative is not trivially zero
    assert (dudt - fd).abs().max().item() < 1e-6 * scale


def test_gradients_flow_through_the_jvp_primal_to_every_parameter():
    """Primal reuse: the loss uses the u returned by torch.func.jvp; every weight gets a grad."""
    torch.manual_seed(0)
    shape, cfg, num_classes = CASES[1]
    model = build_model(cfg, shape, num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    z = torch.randn(2, *shape)
    t, r = torch.tensor([0.8, 0.5]), torch.tensor([0.2, 0.5])
    y = torch.tensor([1, 3])  # 3 = null class: both label rows used
    u, dudt = torch.func.jvp(
        lambda z, t, r: model(z, t, r, y),
        (z, t, r),
        (torch.randn_like(z), torch.ones_like(t), torch.zeros_like(r)),
    )
    target = (torch.randn_like(z) - 0.3 * dudt).detach()
    ((u - target) ** 2).mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().max() == 0]
    assert no_grad == []

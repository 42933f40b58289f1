import math

import pytest
import torch

from zoo.config.schema import DataConfig
from zoo.data import build_data
from zoo.data.toy2d import Checkerboard, Clusters, Gaussians8, Moons, Toy2DSource

# Population statistics in closed form (see the module docstring): var x, var y, cov.
MOONS_SCALE2 = 1.0 / ((0.75 + 0.5625 - 1 / math.pi) / 2 + 0.01)
DOCUMENTED = {
    "moons": (
        (0.75 + 0.01) * MOONS_SCALE2,
        (0.5625 - 1 / math.pi + 0.01) * MOONS_SCALE2,
        (0.125 - 1 / math.pi) * MOONS_SCALE2,
    ),
    "checkerboard": (1.0, 1.0, 3 / 16),
    "gaussians8": (1.0, 1.0, 0.0),
    "clusters": (1.2183, 0.7817, -0.0737),
}


def source(name: str, batch_size: int = 256, **cfg) -> Toy2DSource:
    return build_data(DataConfig(name=name, **cfg), "cpu", seed=0, batch_size=batch_size)


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_documented_statistics(name):
    x = source(name).held_out(200_000).double()
    var_x, var_y, cov = DOCUMENTED[name]
    assert x.shape == (200_000, 2)
    assert x.mean(0).abs().max() < 0.01
    assert x[:, 0].var() == pytest.approx(var_x, abs=0.015)
    assert x[:, 1].var() == pytest.approx(var_y, abs=0.015)
    assert (x[:, 0] * x[:, 1]).mean() == pytest.approx(cov, abs=0.015)
    # The documented scale: average per-coordinate variance 1.
    assert (var_x + var_y) / 2 == pytest.approx(1.0, abs=1e-3)


def test_moons_documented_scale():
    assert Moons.scale == pytest.approx(1.4043, abs=1e-4)


def test_gaussians8_geometry_and_labels():
    x, y = source("gaussians8", class_conditional=True).held_out_labeled(20_000)
    radius = x.norm(dim=1)
    assert (radius - Gaussians8.radius).abs().max() < 0.6  # 6 std of the radial spread
    angle = torch.atan2(x[:, 1], x[:, 0])
    expected = y.float() * math.pi / 4
    assert torch.remainder(angle - expected + math.pi, 2 * math.pi).sub(math.pi).abs().max() < 0.5
    assert torch.bincount(y, minlength=8).float().div(len(y)).sub(1 / 8).abs().max() < 0.02


def test_checkerboard_only_occupied_cells():
    x, y = source("checkerboard", class_conditional=True).held_out_labeled(20_000)
    cell = torch.floor(x / Checkerboard.scale + 2).long()
    assert ((cell >= 0) & (cell <= 3)).all()
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    cells = torch.tensor(Checkerboard.cells)
    assert (cells[y] == cell).all()


def test_clusters_five_equal_blobs():
    x, y = source("clusters", class_conditional=True).held_out_labeled(20_000)
    centroids = Clusters().centroids
    nearest = torch.cdist(x, centroids).argmin(1)
    assert (nearest == y).float().mean() > 0.99  # the blobs barely overlap
    assert torch.bincount(y, minlength=5).float().div(len(y)).sub(0.2).abs().max() < 0.02
    spread = (x - centroids[y]).std()
    assert spread == pytest.approx(Clusters().std, rel=0.03)


def test_moons_two_balanced_halves():
    x, y = source("moons", class_conditional=True).held_out_labeled(20_000)
    assert y.float().mean() == pytest.approx(0.5, abs=0.02)
    # Undo the documented affine map: the upper moon lies on the unit circle (noise 0.1).
    raw = x / Moons.scale + torch.tensor(Moons.mean)
    upper = raw[y == 0]
    assert (upper.norm(dim=1) - 1).abs().mean() < 0.1


def test_batches_differ_between_steps_and_follow_the_generator():
    s = source("moons")
    g = torch.Generator().manual_seed(3)
    a, _ = s.next_batch(g)
    b, _ = s.next_batch(g)
    assert not torch.equal(a, b)
    g2 = torch.Generator().manual_seed(3)
    torch.manual_seed(123)  # the global RNG plays no part
    assert torch.equal(source("moons").next_batch(g2)[0], a)


def test_held_out_is_fixed_and_distinct_from_reference():
    s = source("gaussians8")
    torch.manual_seed(0)
    h1 = s.held_out(500)
    torch.manual_seed(1)
    assert torch.equal(h1, s.held_out(500))
    assert not torch.equal(h1, s.reference(500))


def test_unconditional_has_no_labels():
    s = source("clusters")
    assert s.num_classes == 0 and s.class_names == []
    assert s.next_batch(torch.Generator().manual_seed(0))[1] is None
    c = source("clusters", class_conditional=True)
    assert c.num_classes == 5
    x, y = c.next_batch(torch.Generator().manual_seed(0))
    assert y.dtype == torch.long and y.shape == (256,)


def test_train_size_gives_a_fixed_finite_set():
    s = source("checkerboard", train_size=50)
    assert s.num_train == 50
    train = s.reference(1000)
    assert train.shape == (50, 2)
    x, _ = s.next_batch(torch.Generator().manual_seed(0))
    assert (x[:, None, :] == train[None, :, :]).all(-1).any(1).all()
    # The same run seed gives the same set; resuming needs no more than the generator.
    assert torch.equal(source("checkerboard", train_size=50).reference(50), train)


def test_state_round_trip():
    s = source("moons")
    g = torch.Generator().manual_seed(0)
    s.next_batch(g)
    state, g_state = s.state_dict(), g.get_state()
    expected = [s.next_batch(g)[0] for _ in range(3)]
    resumed = source("moons")
    resumed.load_state_dict(state)
    g.set_state(g_state)
    assert all(torch.equal(resumed.next_batch(g)[0], e) for e in expected)
    with pytest.raises(ValueError, match="data.name"):
        source("clusters").load_state_dict(state)

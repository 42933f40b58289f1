"""TensorSource and LoaderSource: epochs, randomness from the trainer's generator only, flips,
exact resume.  Every sample carries its index in its pixels so batches can be decoded."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import Tensor

from zoo.data import sources
from zoo.data.sources import (
    CenterCropResize,
    ImageFiles,
    LoaderSource,
    Split,
    StreamBatchSampler,
    TensorSource,
    epoch_permutation,
)

N = 10


def id_images(n: int, size: int = 6) -> Tensor:
    """uint8 (n, 1, size, size): pixel value 10*i + 5 everywhere, except the left column (0),
    so a left-right flip is visible."""
    images = (torch.arange(n) * 10 + 5).to(torch.uint8).view(n, 1, 1, 1).repeat(1, 1, size, size)
    images[..., 0] = 0
    return images


def decode(x: Tensor) -> tuple[Tensor, Tensor]:
    """Sample ids and whether each image is flipped."""
    pixels = ((x + 1) * 127.5).round().long()
    ids = (pixels[:, 0, 1, 1] - 5) // 10
    flipped = pixels[:, 0, 0, -1] == 0
    return ids, flipped


def tensor_source(hflip: bool = False, batch_size: int = 4, n: int = N, num_classes: int = 0) -> TensorSource:
    labels = torch.arange(n) % 3
    return TensorSource(
        "ids",
        Split(id_images(n), labels),
        Split(id_images(n)[:5], labels[:5]),
        max_value=255.0,
        batch_size=batch_size,
        device=torch.device("cpu"),
        on_device=True,
        hflip=hflip,
        num_classes=num_classes,
        class_names=[str(k) for k in range(num_classes)],
    )


def test_tensor_source_epochs_are_fresh_permutations():
    s = tensor_source(batch_size=4)
    g = torch.Generator().manual_seed(0)
    ids = torch.cat([decode(s.next_batch(g)[0])[0] for _ in range(15)])  # 60 samples = 6 epochs
    epochs = ids.view(6, N)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(N))  # every sample once per epoch
    assert len({tuple(e.tolist()) for e in epochs}) == 6  # a new order every epoch
    assert s.epoch == 5 and s.position == N


def test_tensor_source_values_and_labels():
    s = tensor_source(num_classes=3)
    x, y = s.next_batch(torch.Generator().manual_seed(0))
    ids, _ = decode(x)
    assert x.dtype == torch.float32 and x.shape == (4, 1, 6, 6)
    assert x.min() == -1.0 and x[:, :, :, 1:].max() <= 1.0
    assert torch.equal(y, ids % 3)
    assert tensor_source(num_classes=0).next_batch(torch.Generator().manual_seed(0))[1] is None


def test_batch_larger_than_dataset():
    s = tensor_source(batch_size=25)
    ids, _ = decode(s.next_batch(torch.Generator().manual_seed(0))[0])
    # Two whole epochs, then the first 5 samples of the third.
    assert torch.bincount(ids[:20], minlength=N).eq(2).all()
    assert len(set(ids[20:].tolist())) == 5
    assert s.epoch == 2 and s.position == 5


def test_flips_only_when_enabled_and_drawn_per_sample():
    g = torch.Generator().manual_seed(0)
    plain = tensor_source(hflip=False, batch_size=10)
    assert not any(decode(plain.next_batch(g)[0])[1].any() for _ in range(20))
    flipping = tensor_source(hflip=True, batch_size=10)
    flags = torch.cat([decode(flipping.next_batch(g)[0])[1] for _ in range(40)])
    assert 0.4 < flags.float().mean() < 0.6
    # A flip is a mirror image, not a corruption: flipping back restores the stored sample.
    x, _ = flipping.next_batch(g)
    ids, flipped = decode(x)
    restored = torch.where(flipped.view(-1, 1, 1, 1), x.flip(-1), x)
    assert torch.allclose(restored, id_images(N)[ids].float() / 127.5 - 1, atol=1e-6)


def test_randomness_comes_only_from_the_generator():
    def run(global_seed: int) -> Tensor:
        torch.manual_seed(global_seed)
        s = tensor_source(hflip=True)
        g = torch.Generator().manual_seed(7)
        return torch.cat([s.next_batch(g)[0] for _ in range(6)])

    assert torch.equal(run(0), run(1))
    state = torch.get_rng_state()
    s = tensor_source(hflip=True)
    s.next_batch(torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), state)  # and the global RNG is left alone


def test_tensor_source_resume_continues_the_same_sequence(tmp_path):
    s = tensor_source(hflip=True, batch_size=4)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):  # mid-epoch (16 of 20 samples in epoch 1)
        s.next_batch(g)
    torch.save({"data": s.state_dict(), "rng": g.get_state()}, tmp_path / "ckpt.pt")
    expected = [s.next_batch(g) for _ in range(6)]

    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # as checkpoints are loaded
    resumed = tensor_source(hflip=True, batch_size=4)
    resumed.load_state_dict(saved["data"])
    g2 = torch.Generator().manual_seed(999)
    g2.set_state(saved["rng"])
    for x, _ in expected:
        assert torch.equal(resumed.next_batch(g2)[0], x)


def test_resume_rejects_another_dataset():
    s = tensor_source()
    other = tensor_source(n=12)
    with pytest.raises(ValueError, match="train_size"):
        other.load_state_dict(s.state_dict())


def test_held_out_and_reference_are_fixed_subsets():
    s = tensor_source()
    held = s.held_out(3)
    assert torch.equal(held, s.held_out(3))
    assert set(decode(held)[0].tolist()) <= set(range(5))
    assert s.held_out(100).shape[0] == 5  # no more than the split holds
    ref_ids = decode(s.reference(N))[0]
    assert sorted(ref_ids.tolist()) == list(range(N))
    assert not decode(s.reference(N))[1].any()  # evaluation samples are never flipped


# --- LoaderSource ------------------------------------------------------------------------------


def write_id_images(folder: Path, n: int) -> list[Path]:
    """RGB 12x10 images (wider than tall: the crop matters): value 10*i + 5, left half black."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        array = np.full((10, 12, 3), 10 * i + 5, dtype=np.uint8)
        array[:, :6] = 0  # after the centre crop (columns 1..10) and resize, the left edge is black
        path = folder / f"{i:03d}.png"
        Image.fromarray(array).save(path)
        files.append(path)
    return files


def decode_rgb(x: Tensor) -> tuple[Tensor, Tensor]:
    pixels = ((x + 1) * 127.5).round().long()[:, 0, 4]
    flipped = pixels[:, 0] != 0
    value = torch.where(flipped, pixels[:, 0], pixels[:, -1])
    return (value - 5) // 10, flipped


def loader_source(
    files: list[Path], num_workers: int = 0, batch_size: int = 4, hflip: bool = True
) -> LoaderSource:
    transform = CenterCropResize(8)
    dataset = ImageFiles(files, [i % 2 for i in range(len(files))], transform)
    return LoaderSource(
        "files",
        dataset,
        ImageFiles(files[:3], [0, 1, 0], transform),
        batch_size=batch_size,
        device=torch.device("cpu"),
        seed=5,
        num_workers=num_workers,
        hflip=hflip,
        num_classes=2,
        class_names=["even", "odd"],
        image_size=8,
    )


def test_center_crop_resize_takes_the_middle_square():
    image = Image.fromarray(np.arange(10 * 12 * 3, dtype=np.uint8).reshape(10, 12, 3) % 251)
    assert CenterCropResize(10)(image).size == (10, 10)
    assert np.array_equal(np.asarray(CenterCropResize(10)(image)), np.asarray(image)[:, 1:11])
    wide = Image.new("RGB", (218, 178))
    assert CenterCropResize(64, crop=178)(wide).size == (64, 64)


def test_stream_sampler_epochs():
    batches = iter(StreamBatchSampler(7, 3, seed=1, start=0))
    stream = [i for _ in range(7) for i in next(batches)]  # 21 indices = 3 epochs
    epochs = [stream[k : k + 7] for k in (0, 7, 14)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert epochs[0] != epochs[1]
    assert epochs[0] == epoch_permutation(7, 1, 0).tolist()
    assert epoch_permutation(7, 2, 0).tolist() != epochs[0]
    later = iter(StreamBatchSampler(7, 3, seed=1, start=5))
    assert next(later) == stream[5:8]


def test_stream_sampler_ranks_read_disjoint_shares_of_the_global_batches():
    whole = iter(StreamBatchSampler(7, 6, seed=1, start=2))
    ranks = [iter(StreamBatchSampler(7, 2, seed=1, start=2, rank=r, world=3)) for r in range(3)]
    for _ in range(5):  # global batches that straddle epochs included
        shares = [next(r) for r in ranks]
        assert sum(shares, []) == next(whole)


def test_sharded_loader_sources_together_read_one_process_stream_and_resume_on_every_rank(tmp_path):
    files = write_id_images(tmp_path / "img", 10)
    single = loader_source(files, batch_size=4, hflip=False)
    g = torch.Generator()
    expected = [decode_rgb(single.next_batch(g)[0])[0] for _ in range(4)]

    ranks = [loader_source(files, batch_size=2, hflip=False) for _ in range(2)]
    for rank, source in enumerate(ranks):
        source.shard(rank, 2)
    got = [torch.cat([decode_rgb(s.next_batch(g)[0])[0] for s in ranks]) for _ in range(2)]
    assert [t.tolist() for t in got] == [t.tolist() for t in expected[:2]]
    # Rank 0's state is a position in the shared stream: every rank continues from it.
    state = ranks[0].state_dict()
    resumed = [loader_source(files, batch_size=2, hflip=False) for _ in range(2)]
    for rank, source in enumerate(resumed):
        source.shard(rank, 2)
        source.load_state_dict(state)
    got = [torch.cat([decode_rgb(s.next_batch(g)[0])[0] for s in resumed]) for _ in range(2)]
    assert [t.tolist() for t in got] == [t.tolist() for t in expected[2:]]


def test_loader_source_batches_and_resume(tmp_path):
    files = write_id_images(tmp_path / "img", 10)
    s = loader_source(files)
    g = torch.Generator().manual_seed(0)
    batches = [s.next_batch(g) for _ in range(5)]
    ids = torch.cat([decode_rgb(x)[0] for x, _ in batches])
    assert sorted(ids[:10].tolist()) == list(range(10))
    assert torch.equal(torch.cat([y for _, y in batches]), ids % 2)
    flips = torch.cat([decode_rgb(x)[1] for x, _ in batches])
    assert 0 < flips.sum() < len(flips)
    assert batches[0][0].shape == (4, 3, 8, 8)

    s2 = loader_source(files)
    g2 = torch.Generator().manual_seed(0)
    s2.next_batch(g2)
    s2.next_batch(g2)
    state, rng = s2.state_dict(), g2.get_state()
    resumed = loader_source(files)
    resumed.load_state_dict(state)
    g3 = torch.Generator()
    g3.set_state(rng)
    for x, _ in batches[2:]:
        assert torch.equal(resumed.next_batch(g3)[0], x)


def test_loader_workers_decode_only(tmp_path):
    """Two workers give exactly the batches of the main process: no randomness in workers."""
    files = write_id_images(tmp_path / "img", 10)
    state = torch.get_rng_state()
    results = []
    for workers in (0, 2):
        s = loader_source(files, num_workers=workers)
        g = torch.Generator().manual_seed(0)
        results.append(torch.cat([s.next_batch(g)[0] for _ in range(6)]))
    assert torch.equal(results[0], results[1])
    assert torch.equal(torch.get_rng_state(), state)


def test_loader_held_out_and_reference(tmp_path):
    files = write_id_images(tmp_path / "img", 10)
    s = loader_source(files)
    x, y = s.held_out_labeled(10)
    ids, flipped = decode_rgb(x)
    assert sorted(ids.tolist()) == [0, 1, 2] and not flipped.any()
    assert torch.equal(y, ids % 2)
    assert sorted(decode_rgb(s.reference(10))[0].tolist()) == list(range(10))


LEAVE_STOP_SIGNALS_TO_PARENT = sources.leave_stop_signals_to_parent


def slow_to_leave_stop_signals_to_parent(worker_id: int) -> None:
    """zoo's worker_init_fn, a second late (a module-level function: a non-fork start method pickles it)."""
    time.sleep(1.0)
    LEAVE_STOP_SIGNALS_TO_PARENT(worker_id)


@pytest.fixture(params=["default", "forkserver"])
def python_start_method(request):
    """Python's default start method as found, or forkserver (Python 3.14's default on Linux)."""
    previous = multiprocessing.get_start_method(allow_none=True)
    if request.param != "default":
        multiprocessing.set_start_method(request.param, force=True)
    yield request.param
    multiprocessing.set_start_method(previous, force=True)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_loader_workers_leave_a_stop_signal_to_the_training_process(
    tmp_path, monkeypatch, signum, python_start_method
):
    # A terminal's Ctrl-C reaches the whole process group, workers included; a worker that died of
    # it would fail the batch a held training step waits for: a failed run instead of a clean stop.
    # The signal is sent while the workers are still starting (held up here before their
    # worker_init_fn): the window in which they could not yet ignore it.  Under forkserver as
    # Python's default too: zoo's loader forks its workers on Linux whatever the default is.
    monkeypatch.setattr(sources, "leave_stop_signals_to_parent", slow_to_leave_stop_signals_to_parent)
    files = write_id_images(tmp_path / "img", 10)
    s = loader_source(files, num_workers=2, batch_size=2)
    g = torch.Generator().manual_seed(0)
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set())
    s._iterator = s._stream()
    assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == mask  # this process's mask restored
    workers = s._iterator._workers
    for worker in workers:
        os.kill(worker.pid, signum)
    time.sleep(1.5)
    assert all(worker.is_alive() for worker in workers)
    batches = [s.next_batch(g)[0] for _ in range(8)]  # more than the workers had prefetched
    assert all(b.shape == (2, 3, 8, 8) for b in batches)


def test_a_crash_with_loader_workers_alive_still_exits(tmp_path):
    """The traceback of an uncaught error keeps the loader's workers alive until exit, where
    multiprocessing ends them with SIGTERM, which they ignore, and would wait for them forever."""
    script = f"""
import sys
from pathlib import Path
import torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_data_sources import loader_source, write_id_images
source = loader_source(write_id_images(Path({str(tmp_path)!r}) / "img", 10), num_workers=2, batch_size=2)
source.next_batch(torch.Generator().manual_seed(0))
raise RuntimeError("a crash while the workers run")
"""
    try:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the process hung at exit waiting for its loader workers")
    assert done.returncode == 1 and "a crash while the workers run" in done.stderr, done.stderr

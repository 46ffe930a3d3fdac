"""DeviceLoader: coverage across ranks, per-epoch permutations, eval order, reproducibility and resume."""

from __future__ import annotations

import math

import pytest
import torch

from vitmoe.data import DatasetInfo, DeviceLoader, ImageData, load_dataset, normalize

N, BATCH = 103, 16  # neither divisible by the batch nor by the world sizes used below
INFO = DatasetInfo(name="toy", num_classes=N, in_chans=1, img_size=6, mean=(0.5,), std=(0.25,),
                   crop_padding=2, hflip=True, classes=[str(i) for i in range(N)])


def toy_data(n: int = N) -> ImageData:
    """Image i is constant (i + 1) and its label is i, so both the index and the pairing are observable."""
    labels = torch.arange(n)
    images = (labels + 1).to(torch.uint8)[:, None, None, None].expand(n, 1, 6, 6).clone()
    return ImageData(images, labels, INFO)


def pixels(x: torch.Tensor) -> torch.Tensor:
    """Invert normalisation back to uint8 values."""
    return torch.round((x * 0.25 + 0.5) * 255).to(torch.int64)


def epoch_batches(world_size: int, epoch: int = 0, train: bool = True, augment: bool = True, seed: int = 3):
    loaders = [DeviceLoader(toy_data(), BATCH, "cpu", train=train, seed=seed, rank=r, world_size=world_size,
                            augment=augment) for r in range(world_size)]
    for ld in loaders:
        ld.set_epoch(epoch)
    return loaders, [list(ld) for ld in loaders]


@pytest.mark.parametrize("world_size", [1, 3, 4])
def test_epoch_covers_every_index_once(world_size):
    loaders, per_rank = epoch_batches(world_size)
    n_batches = math.ceil(N / BATCH)
    assert all(len(ld) == n_batches and len(b) == n_batches for ld, b in zip(loaders, per_rank))
    seen = torch.cat([y for batches in per_rank for _, y in batches])
    assert torch.equal(seen.sort().values, torch.arange(N))  # nothing dropped, nothing repeated
    for i in range(n_batches):
        sizes = [len(per_rank[r][i][1]) for r in range(world_size)]
        assert sum(sizes) == min(BATCH, N - i * BATCH) and max(sizes) - min(sizes) <= 1
    assert sum(len(y) for _, y in per_rank[0]) >= N // world_size
    assert loaders[0].images_per_epoch == N


def test_ranks_share_permutation_and_split_contiguously():
    loaders, per_rank = epoch_batches(3, epoch=5)
    order = loaders[0].epoch_order(5)
    assert all(torch.equal(ld.epoch_order(5), order) for ld in loaders)
    rebuilt = torch.cat([torch.cat([per_rank[r][i][1] for r in range(3)]) for i in range(len(loaders[0]))])
    assert torch.equal(rebuilt, order)  # global batch i = order[i*B:(i+1)*B], rank r gets chunk r
    assert [len(per_rank[r][-1][1]) for r in range(3)] == [3, 2, 2]  # 103 - 96 = 7 -> 3, 2, 2


def test_permutation_changes_with_epoch_and_is_reproducible():
    ld = DeviceLoader(toy_data(), BATCH, "cpu", train=True, seed=3)
    orders = [ld.epoch_order(e) for e in range(3)]
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])
    assert torch.equal(DeviceLoader(toy_data(), BATCH, "cpu", train=True, seed=3).epoch_order(1), orders[1])
    assert not torch.equal(DeviceLoader(toy_data(), BATCH, "cpu", train=True, seed=4).epoch_order(1), orders[1])
    ld.set_epoch(2)
    assert torch.equal(torch.cat([y for _, y in ld]), orders[2])


def test_labels_follow_images_and_augmentation_is_bounded():
    _, per_rank = epoch_batches(2)
    for batches in per_rank:
        for x, y in batches:
            assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 6, 6)
            v = pixels(x)
            assert torch.equal(v.flatten(1).max(1).values, y + 1)  # each image still carries its own label
            assert bool(((v == 0) | (v == (y + 1)[:, None, None, None])).all())  # only zero padding added
    all_x = torch.cat([x for b in per_rank for x, _ in b])
    assert bool((pixels(all_x) == 0).any())  # crops actually happened


def test_eval_identity_order_no_augmentation():
    data = toy_data()
    for world_size in (1, 3):
        _, per_rank = epoch_batches(world_size, train=False)
        ys = torch.cat([torch.cat([per_rank[r][i][1] for r in range(world_size)]) for i in range(len(per_rank[0]))])
        assert torch.equal(ys, torch.arange(N))
        xs = torch.cat([torch.cat([per_rank[r][i][0] for r in range(world_size)]) for i in range(len(per_rank[0]))])
        assert torch.equal(xs, normalize(data.images, INFO.mean, INFO.std))


def test_same_seed_same_batches_other_epoch_differs():
    _, a = epoch_batches(1, epoch=1)
    _, b = epoch_batches(1, epoch=1)
    _, c = epoch_batches(1, epoch=2)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a[0], b[0]))
    # Compare per sample (order differs between epochs): the augmentation must differ too.
    xa = torch.cat([x for x, _ in a[0]])[torch.cat([y for _, y in a[0]]).argsort()]
    xc = torch.cat([x for x, _ in c[0]])[torch.cat([y for _, y in c[0]]).argsort()]
    assert not torch.equal(xa, xc)


def test_augmentation_independent_of_world_size():
    _, single = epoch_batches(1, epoch=4)
    _, multi = epoch_batches(3, epoch=4)
    for i, (x1, y1) in enumerate(single[0]):
        assert torch.equal(torch.cat([multi[r][i][0] for r in range(3)]), x1)
        assert torch.equal(torch.cat([multi[r][i][1] for r in range(3)]), y1)


def test_resume_mid_epoch_is_exact():
    ld = DeviceLoader(toy_data(), BATCH, "cpu", train=True, seed=9, rank=1, world_size=2)
    full = list(ld.iter_epoch(6))
    tail = list(ld.iter_epoch(6, start_batch=4))
    assert len(tail) == len(full) - 4
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[4:], tail))


def test_final_batch_smaller_than_world_size_joins_the_previous_one():
    data = ImageData(toy_data().images[:10], torch.arange(10), INFO)
    loaders = [DeviceLoader(data, 4, "cpu", train=True, seed=0, rank=r, world_size=4) for r in range(4)]
    last = [list(ld)[-1] for ld in loaders]  # a 2-sample tail would leave two ranks empty: 4 + 2 = 6
    assert [len(y) for _, y in last] == [2, 2, 1, 1] and len(loaders[0]) == 2
    seen = torch.cat([y for ld in loaders for _, y in ld])
    assert sorted(seen.tolist()) == list(range(10))


def test_invalid_arguments():
    with pytest.raises(ValueError, match="rank"):
        DeviceLoader(toy_data(), BATCH, "cpu", train=True, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="must be >= world_size"):
        DeviceLoader(toy_data(), 2, "cpu", train=True, seed=0, rank=0, world_size=4)


def test_digits_loader_end_to_end():
    train = load_dataset("digits", "train")
    ld = DeviceLoader(train, 128, torch.device("cpu"), train=True, seed=0)
    x, y = next(iter(ld))
    assert x.shape == (128, 1, 8, 8) and y.shape == (128,) and len(ld) == math.ceil(1438 / 128)
    assert abs(x.mean().item()) < 0.5  # roughly normalised (crop padding pulls it slightly negative)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_loader_stays_on_device():
    ld = DeviceLoader(toy_data(), BATCH, "cuda", train=True, seed=1)
    x, y = next(iter(ld))
    assert x.is_cuda and y.is_cuda and ld.images.is_cuda and ld.images.dtype == torch.uint8
    cpu = DeviceLoader(toy_data(), BATCH, "cpu", train=True, seed=1)
    assert torch.equal(next(iter(cpu))[1], y.cpu())  # same permutation on every device


def test_tail_smaller_than_world_joins_previous_batch():
    import torch

    from vitmoe.data import DeviceLoader, ImageData, get_info

    info = get_info("digits")
    data = ImageData(torch.zeros(65, 1, 8, 8, dtype=torch.uint8), torch.arange(65) % 10, info)
    world = 4
    loaders = [DeviceLoader(data, 32, "cpu", train=True, seed=1, rank=r, world_size=world) for r in range(world)]
    assert len(loaders[0]) == 2 and [loaders[0].global_batch_size(i) for i in range(2)] == [32, 33]
    sizes = [[y.numel() for _, y in ld.iter_epoch(0)] for ld in loaders]
    assert all(min(s) > 0 for s in sizes)  # no rank ever gets an empty batch
    assert [sum(col) for col in zip(*sizes)] == [32, 33]

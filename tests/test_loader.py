"""Mini-batching: reproducible epoch order, full coverage, drop_last, mid-epoch resume."""
import numpy as np
import pytest

from gpucnn import backend
from gpucnn.data import BatchIterator, epoch_permutation


def indexed_data(n):
    """images whose pixels hold their own index, labels = 10 * index: batches reveal what was gathered."""
    images = np.repeat(np.arange(n, dtype=np.float32), 4).reshape(n, 1, 2, 2)
    labels = np.arange(n, dtype=np.int64) * 10
    return images, labels


def gathered(batches):
    """The sample indexes of each batch, checking that images and labels stayed paired."""
    out = []
    for x, y in batches:
        x, y = backend.to_numpy(x), backend.to_numpy(y)
        idx = x[:, 0, 0, 0].astype(np.int64)
        np.testing.assert_array_equal(y, idx * 10)
        np.testing.assert_array_equal(x, np.broadcast_to(idx[:, None, None, None], x.shape))
        out.append(idx)
    return out


def test_permutation_depends_only_on_seed_and_epoch():
    first = epoch_permutation(1000, seed=7, epoch=3)
    np.random.seed(123)  # the global generator has no say
    np.random.default_rng().random(10)
    epoch_permutation(1000, seed=7, epoch=2)
    again = epoch_permutation(1000, seed=7, epoch=3)
    np.testing.assert_array_equal(first, again)
    assert first.dtype == np.int64 and first.shape == (1000,)
    np.testing.assert_array_equal(np.sort(first), np.arange(1000))
    assert not np.array_equal(first, epoch_permutation(1000, seed=7, epoch=4))
    assert not np.array_equal(first, epoch_permutation(1000, seed=8, epoch=3))
    assert not np.array_equal(first, np.arange(1000))


def test_permutation_of_nothing_and_one():
    assert epoch_permutation(0, 0, 0).shape == (0,)
    assert epoch_permutation(1, 0, 0).tolist() == [0]


@pytest.mark.parametrize("bad, error", [(-1, ValueError), (2.0, TypeError), (True, TypeError), ("3", TypeError)])
def test_permutation_validates_its_arguments(bad, error):
    with pytest.raises(error, match="n must be"):
        epoch_permutation(bad, 0, 0)
    with pytest.raises(error, match="seed must be"):
        epoch_permutation(5, bad, 0)
    with pytest.raises(error, match="epoch must be"):
        epoch_permutation(5, 0, bad)


@pytest.mark.parametrize("n, batch_size", [(10, 3), (12, 4), (5, 8), (1, 1)])
def test_every_index_once_per_epoch(n, batch_size):
    images, labels = indexed_data(n)
    loader = BatchIterator(images, labels, batch_size, seed=1)
    assert len(loader) == -(-n // batch_size)
    for epoch in range(3):
        loader.set_epoch(epoch)
        batches = gathered(loader)
        assert len(batches) == len(loader)
        assert [len(b) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
        order = np.concatenate(batches)
        np.testing.assert_array_equal(order, epoch_permutation(n, 1, epoch))


def test_epochs_differ_and_repeat_exactly():
    images, labels = indexed_data(50)
    loader = BatchIterator(images, labels, 8, seed=3)
    loader.set_epoch(0)
    e0 = np.concatenate(gathered(loader))
    e0_again = np.concatenate(gathered(loader))  # iterating again without set_epoch repeats the epoch
    loader.set_epoch(1)
    e1 = np.concatenate(gathered(loader))
    np.testing.assert_array_equal(e0, e0_again)
    assert not np.array_equal(e0, e1)


def test_two_ranks_with_the_same_seed_see_the_same_batches():
    images, labels = indexed_data(37)
    rank0 = BatchIterator(images, labels, 5, seed=11)
    rank1 = BatchIterator(images.copy(), labels.copy(), 5, seed=11)
    rank0.set_epoch(4)
    rank1.set_epoch(4)
    for a, b in zip(gathered(rank0), gathered(rank1), strict=True):
        np.testing.assert_array_equal(a, b)


def test_no_shuffle_keeps_the_order():
    images, labels = indexed_data(7)
    loader = BatchIterator(images, labels, 3, shuffle=False)
    loader.set_epoch(5)
    assert [b.tolist() for b in gathered(loader)] == [[0, 1, 2], [3, 4, 5], [6]]


def test_drop_last():
    images, labels = indexed_data(10)
    loader = BatchIterator(images, labels, 3, drop_last=True, seed=2)
    assert len(loader) == 3
    batches = gathered(loader)
    assert [len(b) for b in batches] == [3, 3, 3]
    np.testing.assert_array_equal(np.concatenate(batches), epoch_permutation(10, 2, 0)[:9])
    assert len(BatchIterator(images, labels, 11, drop_last=True)) == 0
    assert list(BatchIterator(images, labels, 11, drop_last=True)) == []


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("start_batch", [0, 1, 3, 4])
def test_start_batch_resumes_with_exactly_the_remaining_batches(start_batch, drop_last):
    images, labels = indexed_data(22)
    full = BatchIterator(images, labels, 5, seed=9, drop_last=drop_last)
    full.set_epoch(2)
    expected = gathered(full)[start_batch:]
    resumed = BatchIterator(images, labels, 5, seed=9, drop_last=drop_last)
    resumed.set_epoch(2, start_batch=start_batch)
    assert resumed.batches_left == len(expected)
    got = gathered(resumed)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a, b)
    resumed.set_epoch(3)  # the next epoch starts from its first batch again
    assert len(gathered(resumed)) == len(resumed)


def test_start_batch_at_the_end_yields_nothing():
    images, labels = indexed_data(9)
    loader = BatchIterator(images, labels, 3)
    loader.set_epoch(0, start_batch=3)
    assert list(loader) == []
    with pytest.raises(ValueError, match="start_batch 4 is past the end of an epoch of 3 batches"):
        loader.set_epoch(0, start_batch=4)


def test_batch_iterator_validates_its_arguments():
    images, labels = indexed_data(6)
    with pytest.raises(ValueError, match="batch_size must be at least 1, not 0"):
        BatchIterator(images, labels, 0)
    with pytest.raises(TypeError, match="batch_size must be an int"):
        BatchIterator(images, labels, 2.5)
    with pytest.raises(ValueError, match="same length, not 6 and 5"):
        BatchIterator(images, labels[:5], 2)
    with pytest.raises(TypeError, match="labels must be a NumPy or CuPy array"):
        BatchIterator(images, list(labels), 2)
    with pytest.raises(ValueError, match="at least one dimension"):
        BatchIterator(np.float32(1.0), labels, 2)
    with pytest.raises(ValueError, match="seed must be at least 0"):
        BatchIterator(images, labels, 2, seed=-1)
    with pytest.raises(ValueError, match="epoch must be at least 0"):
        BatchIterator(images, labels, 2).set_epoch(-1)


@pytest.mark.gpu
def test_batches_stay_on_the_gpu():
    images, labels = indexed_data(21)
    loader = BatchIterator(backend.to_device(images, "gpu"), backend.to_device(labels, "gpu"), 4, seed=5)
    loader.set_epoch(1)
    batches = list(loader)
    assert all(backend.is_gpu_array(x) and backend.is_gpu_array(y) for x, y in batches)
    np.testing.assert_array_equal(np.concatenate(gathered(batches)), epoch_permutation(21, 5, 1))

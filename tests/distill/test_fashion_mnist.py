"""Fashion-MNIST reader and classifier helpers: IDX files built byte by byte here, Debian's
dataset-fashion-mnist split sizes (CI must have the package and fails without it; a developer
machine may skip), missing data, accuracy of a hand-set classifier, item resizing.

    .venv/bin/python -m pytest tests/distill/test_fashion_mnist.py -q
"""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from athanor.distill.fashion_mnist import _read_idx, accuracy, load_split, resize_items

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def cube() -> np.ndarray:
    return (np.arange(2 * 3 * 300) % 256).astype(np.uint8).reshape(2, 3, 300)  # 300 > 255: dims need 2 bytes


def test_read_idx_plain_and_gzip(tmp_path, cube):
    plain, packed = tmp_path / "cube-idx3-ubyte", tmp_path / "cube-idx3-ubyte.gz"
    plain.write_bytes(idx_bytes(cube))
    packed.write_bytes(gzip.compress(idx_bytes(cube)))
    for path in (plain, packed):
        got = _read_idx(path)
        assert got.dtype == np.uint8 and got.shape == (2, 3, 300)
        np.testing.assert_array_equal(got, cube)
    labels = tmp_path / "labels-idx1-ubyte"
    labels.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 4, 9, 0, 3, 7]))  # written out in full
    np.testing.assert_array_equal(_read_idx(labels), np.array([9, 0, 3, 7], dtype=np.uint8))


def test_read_idx_rejects_bad_files(tmp_path, cube):
    bad = tmp_path / "bad-idx"
    bad.write_bytes(idx_bytes(cube, type_code=0x0D))  # float data
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file") as err:
        _read_idx(bad)
    assert str(bad) in str(err.value)
    bad.write_bytes(b"\x01\x00\x08\x01" + idx_bytes(cube)[4:])
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        _read_idx(bad)
    bad.write_bytes(idx_bytes(cube)[:-1])
    with pytest.raises(ValueError, match=r"header says \[2, 3, 300\], file holds 1799 bytes"):
        _read_idx(bad)
    bad.write_bytes(idx_bytes(cube) + b"\x00")
    with pytest.raises(ValueError, match="file holds 1801 bytes"):
        _read_idx(bad)
    bad.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file"):
        _read_idx(bad)
    bad.write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 2]))  # three dimensions announced, one given
    with pytest.raises(ValueError, match="header cut short") as err:
        _read_idx(bad)
    assert str(bad) in str(err.value)


def test_load_split_reads_debians_files(fashion_mnist_dir):
    for split, n in (("train", 60000), ("test", 10000)):
        images, labels = load_split(split)
        assert images.shape == (n, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64
        assert set(labels.unique().tolist()) == set(range(10))
        assert torch.bincount(labels).tolist() == [n // 10] * 10  # Fashion-MNIST is balanced
        assert int(images.max()) == 255 and int(images.min()) == 0


def test_load_split_with_a_missing_folder_or_a_bad_split(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as err:
        load_split("test", data_dir=tmp_path / "nowhere")
    assert "ATHANOR_FASHION_MNIST" in str(err.value) and "t10k-images-idx3-ubyte.gz" in str(err.value)
    with pytest.raises(ValueError, match="split='val'.*'train' or 'test'"):
        load_split("val", data_dir=tmp_path)


def test_load_split_from_a_folder_built_here(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([4, 0, 9, 9, 1], dtype=np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    got_images, got_labels = load_split("test", data_dir=tmp_path)
    assert torch.equal(got_images, torch.from_numpy(images))
    assert got_labels.tolist() == [4, 0, 9, 9, 1] and got_labels.dtype == torch.int64


def test_accuracy_of_a_classifier_that_always_says_three(constant_classifier):
    always = constant_classifier
    images = torch.rand(11, 1, 28, 28) * 2 - 1
    labels = torch.tensor([3, 1, 3, 3, 0, 9, 3, 2, 5, 3, 7])
    assert accuracy(always(3), images, labels, batch=4) == pytest.approx(5 / 11)
    assert accuracy(always(8), images, labels, batch=4) == 0.0
    assert accuracy(always(3), images[:0], labels[:0]) == 0.0


def test_resize_items_keeps_range_and_size():
    images = torch.randint(0, 256, (6, 28, 28), dtype=torch.uint8)
    images[0] = 255
    images[1] = 0
    for size in (20, 14, 40):
        out = resize_items(images, size)
        assert out.shape == (6, size, size) and out.dtype == torch.float32
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert torch.allclose(out[0], torch.ones(size, size), atol=1e-5)
        assert torch.equal(out[1], torch.zeros(size, size))
    same = resize_items(images, 28)
    assert torch.allclose(same, torch.from_numpy(images.numpy().astype(np.float32) / 255.0))

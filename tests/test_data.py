"""Datasets: the bundled subset, .npz layouts, declared preprocessing, bad data."""

import numpy as np
import pytest

from edgeprune.config import DataConfig
from edgeprune.data import load_dataset, preprocess
from edgeprune.errors import InputError


def test_bundled_example_is_a_balanced_fashion_mnist_subset():
    data = load_dataset(DataConfig(), num_classes=10)
    assert data.x_train.shape == (6000, 1, 28, 28) and data.x_test.shape == (2000, 1, 28, 28)
    assert np.bincount(data.y_test).tolist() == [200] * 10
    assert data.x_train.dtype == np.float32
    # (pixel/255 - 0.5)/0.5 spans [-1, 1]
    assert data.x_train.min() == pytest.approx(-1.0) and data.x_train.max() == pytest.approx(1.0)


def write_npz(path, x_train, x_test, y_train=None, y_test=None):
    y_train = np.arange(len(x_train)) % 3 if y_train is None else y_train
    y_test = np.arange(len(x_test)) % 3 if y_test is None else y_test
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return str(path)


def test_nhwc_uint8_and_nchw_float_give_the_same_model_input(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 8, 8, 3), dtype=np.uint8)
    nhwc = write_npz(tmp_path / "nhwc.npz", images, images)
    as_float_nchw = images.transpose(0, 3, 1, 2).astype(np.float32)
    nchw = write_npz(tmp_path / "nchw.npz", as_float_nchw, as_float_nchw)
    config = dict(mean=(0.1, 0.2, 0.3), std=(0.5, 0.25, 0.125))
    a = load_dataset(DataConfig(source=nhwc, **config), 3)
    b = load_dataset(DataConfig(source=nchw, **config), 3)
    assert a.x_test.shape == (6, 3, 8, 8)
    np.testing.assert_allclose(a.x_test, b.x_test)
    expected = (images[0, 2, 5, 1] / 255 - 0.2) / 0.25
    assert a.x_test[0, 1, 2, 5] == pytest.approx(expected, rel=1e-6)
    assert a.fingerprint == b.fingerprint


def test_preprocessing_is_per_channel():
    images = np.full((1, 2, 2, 2), 255, dtype=np.uint8)
    out = preprocess(images, DataConfig(mean=(0.0, 1.0), std=(1.0, 2.0)))
    assert out[0, 0].max() == pytest.approx(1.0) and out[0, 1].max() == pytest.approx(0.0)


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty", "x_train is empty"),
        ("labels_out_of_range", "labels span [0, 7] but model.num_classes = 3"),
        ("count_mismatch", "has 4 images but y_test has 3 labels"),
        ("nan", "contains NaN"),
        ("float_labels", "must hold integer class labels"),
    ],
)
def test_bad_datasets_give_one_line_errors(tmp_path, case, message):
    x = np.zeros((4, 8, 8), dtype=np.float32)
    arrays = dict(x_train=x, x_test=x)
    if case == "empty":
        arrays["x_train"] = np.zeros((0, 8, 8), dtype=np.float32)
        path = write_npz(tmp_path / "d.npz", **arrays, y_train=np.zeros(0, dtype=np.int64))
    elif case == "labels_out_of_range":
        path = write_npz(tmp_path / "d.npz", **arrays, y_train=np.array([0, 1, 2, 7]))
    elif case == "count_mismatch":
        path = write_npz(tmp_path / "d.npz", **arrays, y_test=np.array([0, 1, 2]))
    elif case == "nan":
        bad = x.copy()
        bad[0, 0, 0] = np.nan
        path = write_npz(tmp_path / "d.npz", x_train=bad, x_test=x)
    else:
        path = write_npz(tmp_path / "d.npz", **arrays, y_train=np.array([0.0, 1.0, 2.0, 0.0]))
    with pytest.raises(InputError) as error:
        load_dataset(DataConfig(source=path), 3)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_arrays_and_missing_files(tmp_path):
    np.savez(tmp_path / "partial.npz", x_train=np.zeros((2, 4, 4)))
    with pytest.raises(InputError, match="missing arrays"):
        load_dataset(DataConfig(source=str(tmp_path / "partial.npz")), 10)
    with pytest.raises(InputError, match="data file not found"):
        load_dataset(DataConfig(source=str(tmp_path / "nope.npz")), 10)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable .npz"):
        load_dataset(DataConfig(source=str(tmp_path / "junk.npz")), 10)


def loaders():
    """A module:function data source: (train_loader, test_loader) of (images, labels) batches."""
    x = np.arange(2 * 16, dtype=np.uint8).reshape(2, 4, 4)
    return [(x, np.array([0, 1]))] * 2, [(x, np.array([1, 0]))]


def test_module_function_data_source():
    data = load_dataset(DataConfig(source="tests.test_data:loaders", mean=(0.0,), std=(1.0,)), 2)
    assert data.x_train.shape == (4, 1, 4, 4) and data.y_test.tolist() == [1, 0]
    assert data.x_train[0, 0, 0, 1] == pytest.approx(1 / 255)


def test_calibration_draw_is_deterministic():
    data = load_dataset(DataConfig(), 10)
    a, b = data.calibration_batches(64, seed=3), data.calibration_batches(64, seed=3)
    assert a.shape == (64, 1, 28, 28)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, data.calibration_batches(64, seed=4))

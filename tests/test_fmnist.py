"""Fashion-MNIST: the IDX loader, its errors, the pixel normalization and the committed classifier."""

import gzip

import numpy as np
import pytest
import torch

from tokenfuse.assets import fmnist
from tokenfuse.assets import text as data

needs_data = pytest.mark.skipif(
    not fmnist.DEFAULT_DIR.is_dir(),
    reason=f"Fashion-MNIST is not installed at {fmnist.DEFAULT_DIR} (apt-get install dataset-fashion-mnist)",
)

# Top-1 of the committed weights on the first 2000 test images, as recorded in
# src/tokenfuse/weights/fmnist_vit/TRAINING.md; the test allows 0.5 points less.
RECORDED_FIRST_2000 = 0.8525


def write_idx(folder, split, images, labels, gz=True):
    """Write a small split in the IDX format, gzipped like Debian's files or plain."""
    prefix = {"train": "train", "test": "t10k"}[split]
    n = len(images)
    blobs = {
        f"{prefix}-images-idx3-ubyte": b"".join(v.to_bytes(4, "big") for v in (2051, n, 28, 28))
        + images.astype(np.uint8).tobytes(),
        f"{prefix}-labels-idx1-ubyte": b"".join(v.to_bytes(4, "big") for v in (2049, n))
        + labels.astype(np.uint8).tobytes(),
    }
    for name, blob in blobs.items():
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (folder / name).write_bytes(blob)
    return blobs


@needs_data
@pytest.mark.integration
def test_test_split_is_10000_balanced_images():
    images, labels = fmnist.load("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,) and labels.dtype == np.int64
    assert labels.min() == 0 and labels.max() == len(fmnist.CLASSES) - 1 == 9
    assert np.bincount(labels).tolist() == [1000] * 10
    first, first_labels = fmnist.load("test", limit=100)
    assert np.array_equal(first, images[:100]) and np.array_equal(first_labels, labels[:100])


@pytest.mark.parametrize("gz", [True, False])
def test_reads_gzipped_and_plain_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (3, 28, 28)), np.array([0, 9, 4])
    write_idx(tmp_path, "train", images, labels, gz=gz)
    got, got_labels = fmnist.load("train", path=tmp_path)
    assert np.array_equal(got, images) and got_labels.tolist() == [0, 9, 4]


def test_missing_files_name_the_debian_package(tmp_path):
    with pytest.raises(data.MissingAsset, match="apt-get install dataset-fashion-mnist"):
        fmnist.load("test", path=tmp_path)


def test_bad_split_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"valid splits: \['test', 'train'\]"):
        fmnist.load("validation")


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda blob: (2049).to_bytes(4, "big") + blob[4:], "magic number 2049, expected 2051"),
        (lambda blob: blob[:-5], "header says"),
        (lambda blob: blob[:10], "shorter than its header"),
    ],
)
def test_corrupt_file_is_a_clear_value_error(tmp_path, corrupt, message):
    blobs = write_idx(tmp_path, "test", np.zeros((2, 28, 28)), np.array([1, 2]))
    name = "t10k-images-idx3-ubyte"
    (tmp_path / f"{name}.gz").write_bytes(gzip.compress(corrupt(blobs[name])))
    with pytest.raises(ValueError, match=message):
        fmnist.load("test", path=tmp_path)


def test_truncated_gzip_is_a_clear_value_error(tmp_path):
    write_idx(tmp_path, "test", np.zeros((2, 28, 28)), np.array([1, 2]))
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="corrupt gzip"):
        fmnist.load("test", path=tmp_path)


def test_to_pixels_shape_and_normalization():
    images = np.stack([np.zeros((28, 28), np.uint8), np.full((28, 28), 255, np.uint8)])
    pixels = fmnist.to_pixels(images)
    assert pixels.shape == (2, 1, 28, 28) and pixels.dtype == torch.float32
    assert torch.allclose(pixels[0], torch.tensor(-fmnist.MEAN / fmnist.STD))
    assert torch.allclose(pixels[1], torch.tensor((1 - fmnist.MEAN) / fmnist.STD))


@needs_data
@pytest.mark.integration
def test_to_pixels_standardizes_real_images():
    pixels = fmnist.to_pixels(fmnist.load("test", limit=2000)[0])
    assert abs(float(pixels.mean())) < 0.05 and abs(float(pixels.std()) - 1) < 0.05


@pytest.mark.integration
def test_committed_classifier_is_a_small_50_token_vit():
    files = sorted(f.name for f in fmnist.WEIGHTS_DIR.iterdir())
    assert files == ["TRAINING.md", "config.json", "model.safetensors"]
    assert (fmnist.WEIGHTS_DIR / "model.safetensors").stat().st_size < 6.5e6
    model = fmnist.load_classifier()
    config = model.config
    assert (config.image_size, config.patch_size, config.num_channels) == (28, 4, 1)
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0
    with torch.no_grad():
        out = model(pixel_values=fmnist.to_pixels(np.zeros((2, 28, 28), np.uint8)), output_hidden_states=True)
    assert out.logits.shape == (2, 10) and out.hidden_states[-1].shape[1] == 50  # 49 patches + [CLS]


@needs_data
@pytest.mark.integration
def test_committed_classifier_reaches_its_recorded_accuracy():
    model = fmnist.load_classifier()
    assert not model.training and model.config.num_labels == 10
    assert model.config._attn_implementation == "sdpa"
    assert [model.config.id2label[i] for i in range(10)] == fmnist.CLASSES
    images, labels = fmnist.load("test", limit=2000)
    with torch.no_grad():
        logits = torch.cat(
            [model(pixel_values=fmnist.to_pixels(images[i : i + 1000])).logits for i in (0, 1000)]
        )
    accuracy = float((logits.argmax(-1) == torch.from_numpy(labels)).float().mean())
    assert accuracy >= RECORDED_FIRST_2000 - 0.005, accuracy

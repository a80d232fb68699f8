"""Shared helpers: the program is imported from the repository root; images are made here."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ImageSegmentation as seg  # noqa: E402

# The same examples on every run and every machine: a red CI is a real failure, never a new draw.
settings.register_profile("deterministic", derandomize=True, database=None)
settings.load_profile("deterministic")


def block_labels(height, width, n_components, rng):
    """A piecewise-constant label map: a grid of rectangles, each a random component."""
    rows = np.sort(rng.choice(np.arange(1, height), size=3, replace=False))
    cols = np.sort(rng.choice(np.arange(1, width), size=3, replace=False))
    cells = rng.permutation(np.resize(np.arange(n_components), 16)).reshape(4, 4)
    row_cell = np.searchsorted(rows, np.arange(height), side="right")
    col_cell = np.searchsorted(cols, np.arange(width), side="right")
    return cells[row_cell[:, None], col_cell[None, :]]


def mixture_image(labels, means, covariances, rng):
    """uint8 pixels from N(means[label], covariances[label]) on the 0..1 scale, rounded, clipped.

    means: (K, D), covariances: (K, D, D); D = 1 gives an H x W gray image, D = 3 an RGB one.
    """
    means, covariances = np.asarray(means, float), np.asarray(covariances, float)
    values = np.empty(labels.shape + (means.shape[1],))
    for k in range(len(means)):
        mask = labels == k
        values[mask] = rng.multivariate_normal(means[k], covariances[k], size=int(mask.sum()))
    image = np.clip(np.rint(values * 255), 0, 255).astype(np.uint8)
    return image[..., 0] if means.shape[1] == 1 else image


def bayes_labels(image, weights, means, covariances):
    """Per-pixel Bayes-optimal labels from the true parameters (on the same 0..1 scale)."""
    truth = seg.GaussianMixtureFit(
        np.asarray(weights, float),
        np.asarray(means, float),
        np.asarray(covariances, float),
        "full",
        [],
        0,
        True,
    )
    pixels = image.reshape(-1, 1 if image.ndim == 2 else 3) / 255.0
    return truth.predict(pixels).reshape(image.shape[:2])


def matched_accuracy(found, truth, n_components):
    """Accuracy after the best one-to-one matching of found labels to true labels."""
    from scipy.optimize import linear_sum_assignment

    confusion = np.zeros((n_components, n_components))
    np.add.at(confusion, (found.ravel(), truth.ravel()), 1)
    rows, cols = linear_sum_assignment(-confusion)
    return confusion[rows, cols].sum() / truth.size


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


def run(argv, capsys):
    """The command line in this process: (status, stdout, stderr).  One process unless argv asks for
    --jobs, so a test's process pool never depends on the machine's core count."""
    argv = [str(a) for a in argv]
    if not any(a in ("-j", "--jobs") or a.startswith("--jobs=") for a in argv):
        argv += ["--jobs", "1"]
    status = seg.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def two_tone(path, rng, size=(40, 60), color=False):
    """A small image: dark left half, bright right half, with noise."""
    levels = np.where(np.arange(size[1]) < size[1] // 2, 60, 190)[None, :].repeat(size[0], 0)
    noisy = np.clip(levels + rng.normal(0, 12, size), 0, 255).astype(np.uint8)
    array = np.stack([noisy, 255 - noisy, noisy // 2], axis=-1) if color else noisy
    Image.fromarray(array).save(path)
    return array


def record_of(out_dir, stem):
    """The JSON record written for an image."""
    return json.loads((Path(out_dir) / f"{stem}_model.json").read_text())


def outputs_of(out_dir, stem):
    """The output files written for every image, by the program's own list of suffixes."""
    return {suffix: Path(out_dir) / f"{stem}_{suffix}" for suffix in seg.OUTPUT_SUFFIXES}


def class_scene(rng, means, sd, shape=(96, 128)):
    """A grid of classes with isotropic noise sd on the 0..1 scale, rounded to 8 bits.

    Returns the image, the true labels and the per-pixel Bayes-optimal accuracy.
    """
    means = np.asarray(means, dtype=float)
    k, n_features = means.shape
    labels = block_labels(*shape, k, rng)
    covariances = np.array([np.eye(n_features) * sd**2] * k)
    image = mixture_image(labels, means, covariances, rng)
    weights = np.bincount(labels.ravel(), minlength=k) / labels.size
    return (
        image,
        labels,
        matched_accuracy(bayes_labels(image, weights, means, covariances), labels, k),
    )


# Classes that overlap enough for EM to crawl: a 4-class colour scene (means 0.15 to 0.3 apart,
# sd 0.07) and a 3-class gray one.
OVERLAPPING_COLOUR = [[0.35, 0.35, 0.45], [0.5, 0.45, 0.4], [0.45, 0.6, 0.5], [0.6, 0.55, 0.65]]
OVERLAPPING_GRAY = [[0.3], [0.45], [0.6]]

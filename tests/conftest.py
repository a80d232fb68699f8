"""Shared helpers: the program is imported from the repository root; images are made here."""

import json
import os
import sys
from pathlib import Path

# BLAS on one thread, as the program's batch workers run it: pytest-xdist's workers already
# take every core, and BLAS's threads on top of them cost the suite a tenth of its time.  Set
# before NumPy loads BLAS (a variable set by the caller wins); no test depends on it.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402
from PIL import Image  # noqa: E402
from scipy import special  # noqa: E402

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


# The outputs every image gets but the figures (by the program's own lists), and --outputs
# asking for them: what run writes unless a test is about figures.
NOT_FIGURES = [s.split(".")[0] for s in seg.OUTPUT_SUFFIXES if s.split(".")[0] not in seg.FIGURES]
NO_FIGURES = ["--outputs", ",".join(NOT_FIGURES)]


def run(argv, capsys, figures=False):
    """The command line in this process: (status, stdout, stderr).  One process unless argv asks for
    --jobs (or --dask), so a test's process pool never depends on the machine's core count.

    Unless figures=True or argv chooses --outputs, the figures are not drawn (--outputs without
    loglik, comparison and bic): drawing them is most of a small image's run, and only the tests
    of figures look at them."""
    argv = [str(a) for a in argv]
    if not any(
        a in ("-j", "--jobs", "--dask") or a.startswith(("--jobs=", "--dask=")) for a in argv
    ):
        argv += ["--jobs", "1"]
    if not figures and not any(a == "--outputs" or a.startswith("--outputs=") for a in argv):
        field = any(a in ("--bias-field", "--brain") for a in argv)
        argv += [NO_FIGURES[0], NO_FIGURES[1] + (",bias,corrected" if field else "")]
    status = seg.main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def run_on_a_full_disk(argv, max_bytes):
    """The command line in a process of its own that can write no file past max_bytes: a write
    that would pass it fails part-way, as on a full disk (the kernel's file size limit,
    RLIMIT_FSIZE: OSError EFBIG, "File too large").  A CompletedProcess with text output."""
    import resource
    import signal
    import subprocess

    def limited():  # in the child, before the program starts
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return subprocess.run(
        [sys.executable, "-B", str(ROOT / "ImageSegmentation.py"), *map(str, argv)],
        capture_output=True,
        text=True,
        preexec_fn=limited,
        timeout=120,
    )


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


def outputs_of(out_dir, stem, figures=False):
    """The output files run writes for every image, by the program's own list of suffixes: its
    figures too only with figures=True."""
    return {
        suffix: Path(out_dir) / f"{stem}_{suffix}"
        for suffix in seg.OUTPUT_SUFFIXES
        if figures or suffix.split(".")[0] in NOT_FIGURES
    }


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


# --- Clipped gray images (--quantized) ---------------------------------------------------------

CLIPPED = {
    "dark class clipped at 0": ([0.0, 0.25, 0.5], [0.05, 0.07, 0.07]),
    "bright class clipped at 255": ([0.5, 0.75, 1.0], [0.07, 0.07, 0.05]),
}


def clipped_image(means, sds, rng, size=(96, 128)):
    """Gray pixels of a known mixture on a 4 x 4 grid of classes, rounded and clipped."""
    cells = rng.permutation(np.resize(np.arange(len(means)), 16)).reshape(4, 4)
    labels = np.kron(cells, np.ones((size[0] // 4, size[1] // 4), dtype=int))
    values = rng.normal(np.asarray(means)[labels], np.asarray(sds)[labels])
    return np.clip(np.rint(values * 255), 0, 255).astype(np.uint8), labels


def bayes_of_levels(labels, means, sds, top=255):
    """Per-pixel Bayes-optimal label of every level 0..top: the true mixture's bin probabilities."""
    weights = np.bincount(labels.ravel(), minlength=len(means)) / labels.size
    levels = np.arange(top + 1.0)
    lower = np.where(levels == 0, -np.inf, (levels - 0.5) / top)
    upper = np.where(levels == top, np.inf, (levels + 0.5) / top)
    m, s = np.asarray(means)[:, None], np.asarray(sds)[:, None]
    return np.argmax(
        weights[:, None] * (special.ndtr((upper - m) / s) - special.ndtr((lower - m) / s)), axis=0
    )


# --- Noisy scenes (--spatial) ---------------------------------------------------------------------


def noisy_scene(n_features, rng):
    """A piecewise-constant 3-class scene, noisy enough for a ~91-95 % per-pixel Bayes limit."""
    labels = block_labels(96, 128, 3, rng)
    if n_features == 1:
        means, sd = np.array([[0.3], [0.5], [0.7]]), 0.06
    else:
        means, sd = np.array([[0.3, 0.4, 0.5], [0.5, 0.45, 0.4], [0.4, 0.6, 0.55]]), 0.07
    covariances = np.array([np.eye(n_features) * sd**2] * 3)
    image = mixture_image(labels, means, covariances, rng)
    weights = np.bincount(labels.ravel(), minlength=3) / labels.size
    return (
        image,
        labels,
        matched_accuracy(bayes_labels(image, weights, means, covariances), labels, 3),
    )


def random_responsibilities(rng, shape, n_components):
    """A zero-bordered (K, H + 2, W + 2) float32 q, random inside, summing to 1 per pixel."""
    q = rng.random((n_components,) + shape).astype(np.float32)
    padded = np.zeros((n_components, shape[0] + 2, shape[1] + 2), np.float32)
    padded[:, 1:-1, 1:-1] = q / q.sum(axis=0)
    return padded


# --- Brain-like phantoms (--mask, --bias-field) -------------------------------------------------


def phantom(rng, shape=(80, 100), means=(0.3, 0.55, 0.8), sd=0.05, cell=6, rician=False):
    """A 3-class piecewise-constant 'brain' inside an ellipse on an exactly black background.

    The classes fill cells of cell x cell pixels at random, interleaved as tissues are: no
    smooth field can pass for a class.  rician: the noise of a magnitude image, |mean + complex
    Gaussian noise of sd in each part|, as MRI's.
    """
    cells = rng.integers(0, 3, size=(-(-shape[0] // cell), -(-shape[1] // cell)))
    labels = np.kron(cells, np.ones((cell, cell), dtype=int))[: shape[0], : shape[1]]
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    inside = ((rows - shape[0] / 2) / (0.42 * shape[0])) ** 2 + (
        (cols - shape[1] / 2) / (0.42 * shape[1])
    ) ** 2 < 1
    values = rng.normal(np.asarray(means)[labels], sd)
    if rician:
        values = np.hypot(values, rng.normal(0, sd, values.shape))
    image = np.clip(np.rint(values * 255), 1, 255).astype(np.uint8)  # nothing inside is 0
    image[~inside] = 0
    return image, labels, inside


def smooth_field(shape, amplitude=0.25):
    """A known multiplicative field of about +-25 %: exp of a quadratic in the coordinates."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    u, v = 2 * rows / (shape[0] - 1) - 1, 2 * cols / (shape[1] - 1) - 1
    log_field = amplitude * (0.8 * u + 0.5 * v * v - 0.3 * u * v)
    return np.exp(log_field - log_field.mean())


def biased_phantom(rng, shape=(120, 150), sd=0.05, cell=6, rician=False):
    image, labels, inside = phantom(rng, shape=shape, sd=sd, cell=cell, rician=rician)
    field = smooth_field(shape)
    biased = np.clip(np.rint(image * field), 1, 255).astype(np.uint8)
    biased[~inside] = 0
    return image, biased, labels, inside, field


# --- Images of a known number of classes (-k auto) ---------------------------------------------


def blurred_regions(
    rng, n_classes, shape=(240, 320), colour=False, sd=0.025, blur=1.5, levels=None
):
    """n_classes classes in Voronoi cells (three cells a class), their boundaries blurred by a
    Gaussian of blur pixels, noise sd, clipped to 0..255: the image (uint8) a person would count
    n_classes in.  levels: the classes' gray levels on the 0..1 scale (default evenly spread
    from 0.15 to 0.85; a colour class's channels are three of them)."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    seeds = rng.uniform([0, 0], shape, size=(3 * n_classes, 2))
    classes = np.resize(np.arange(n_classes), 3 * n_classes)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    _, nearest = cKDTree(seeds).query(np.stack([rows.ravel(), cols.ravel()], 1))
    labels = classes[nearest].reshape(shape)
    dim = 3 if colour else 1
    levels = np.linspace(0.15, 0.85, n_classes) if levels is None else np.asarray(levels)
    means = np.stack([levels, levels[::-1], np.roll(levels, 1)], 1)[:, :dim]
    image = means[labels]
    image = np.stack([ndimage.gaussian_filter(image[..., c], blur) for c in range(dim)], -1)
    image = np.clip(np.rint((image + rng.normal(0, sd, image.shape)) * 255), 0, 255)
    return image.astype(np.uint8)[..., : dim if colour else 1].squeeze()

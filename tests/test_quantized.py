"""--quantized: gray levels as bins, the censored model that reaches the Bayes limit where
densities collapse."""

import numpy as np
import pytest
from conftest import (
    CLIPPED,
    bayes_of_levels,
    clipped_image,
    matched_accuracy,
    record_of,
    run,
    seg,
)
from PIL import Image
from sklearn.mixture import GaussianMixture

# --- --quantized ----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CLIPPED))
def test_quantized_reaches_the_bayes_limit_where_densities_collapse(rng, case):
    means, sds = CLIPPED[case]
    image, labels = clipped_image(means, sds, rng)
    assert max(np.mean(image == 0), np.mean(image == 255)) > 0.15  # a big run of one value
    bayes = matched_accuracy(bayes_of_levels(labels, means, sds)[image], labels, 3)
    quantized, _, model = seg.segment_image(image, 3, quantized=True, tol=1e-6)
    plain, _, plain_model = seg.segment_image(image, 3, tol=1e-6)
    X = image.reshape(-1, 1) / 255.0
    reference = GaussianMixture(3, random_state=0).fit(X).predict(X).reshape(image.shape)
    assert matched_accuracy(quantized, labels, 3) >= bayes - 0.01
    assert matched_accuracy(plain, labels, 3) < bayes - 0.1  # a component collapsed
    assert matched_accuracy(reference, labels, 3) < bayes - 0.1
    assert np.sqrt(plain_model.covariances.min()) < 0.01  # ... onto the clipped level
    np.testing.assert_allclose(np.sort(model.means.ravel()), means, atol=0.02)


@pytest.mark.parametrize("covariance_type", seg.COVARIANCE_TYPES)
def test_quantized_log_likelihood_never_decreases(rng, covariance_type):
    image, _ = clipped_image(*CLIPPED["dark class clipped at 0"], rng)
    levels, counts = np.unique(image, return_counts=True)
    fit = seg.fit_quantized_gmm(
        levels, counts, 3, covariance_type=covariance_type, tol=0, max_iter=60
    )
    history = np.asarray(fit.log_likelihood)
    assert len(history) == 60 and np.all(np.diff(history) >= -1e-12)
    assert np.all(history <= 0)  # probabilities of bins
    # The last value is the model's own mean log-probability of the pixels.
    assert history[-1] == pytest.approx(fit.score(image.reshape(-1, 1) / 255.0), abs=1e-12)


def test_quantized_matches_the_density_model_where_bins_are_narrow(rng):
    """Far from the clip points and with wide components, a bin's probability ~ density x width."""
    x = np.clip(np.rint(rng.normal(0.5, 0.1, 20000) * 255), 0, 255)
    levels, counts = np.unique(x, return_counts=True)
    binned = seg.fit_quantized_gmm(levels, counts, 1, tol=1e-9)
    dense = seg.fit_gmm(levels / 255, 1, sample_weight=counts, tol=1e-9)
    assert binned.means[0, 0] == pytest.approx(dense.means[0, 0], abs=1e-6)
    # Sheppard: the density fit sees the rounding noise (1/255)^2 / 12 as variance (and adds
    # reg_covar),
    # the binned fit does neither.
    assert dense.covariances.ravel()[0] - binned.covariances.ravel()[0] == pytest.approx(
        1 / 255**2 / 12 + 1e-6, rel=0.05
    )
    assert binned.log_likelihood[-1] == pytest.approx(
        dense.log_likelihood[-1] - np.log(255), abs=1e-3
    )


def test_quantized_sixteen_bit_levels(rng):
    values = np.clip(
        np.rint(rng.normal([0.0, 0.5], 0.05, (4000, 2)).ravel() * 65535), 0, 65535
    ).astype(np.uint16)
    labels, _, model = seg.segment_image(values.reshape(80, 100), 2, quantized=True)
    assert model.quantized_top == 65535
    np.testing.assert_allclose(model.means.ravel(), [0.0, 0.5], atol=0.01)


def test_quantized_on_the_command_line(tmp_path, rng, capsys):
    image, _ = clipped_image(*CLIPPED["dark class clipped at 0"], rng)
    Image.fromarray(image).save(tmp_path / "gray.png")
    Image.fromarray(np.stack([image, image[::-1], np.roll(image, 5, axis=1)], axis=-1)).save(
        tmp_path / "color.png"
    )
    status, out, err = run(
        [
            tmp_path / "gray.png",
            tmp_path / "color.png",
            "-k",
            "3",
            "--quantized",
            "--out",
            tmp_path / "out",
        ],
        capsys,
    )
    assert status == 0, err
    gray = record_of(tmp_path / "out", "gray")
    color = record_of(tmp_path / "out", "color")
    assert gray["quantized"] is True and gray["settings"]["quantized"] is True
    assert max(gray["log_likelihood"]) <= 0
    assert color["quantized"] is False and any("--quantized" in note for note in color["notes"])
    assert (
        f"note: {tmp_path / 'color.png'}: --quantized applies to 8- and 16-bit gray levels" in err
    )


# --- --spatial ------------------------------------------------------------------------------------

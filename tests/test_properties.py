"""Property-based: small images of random kinds, sizes and K never break the API or CLI."""

import numpy as np
import pytest
from conftest import record_of, seg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

KINDS = ["uint8-gray", "uint8-rgb", "uint16-gray", "float32-gray"]


@st.composite
def small_images(draw):
    kind = draw(st.sampled_from(KINDS))
    height, width = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**32 - 1))
    levels = draw(st.integers(1, 300))  # how many different values the image may take
    rng = np.random.default_rng(seed)
    shape = (height, width, 3) if kind == "uint8-rgb" else (height, width)
    if kind.startswith("uint8"):
        array = (rng.integers(0, 256, size=shape) // max(1, 256 // levels)).astype(np.uint8)
    elif kind == "uint16-gray":
        array = (rng.integers(0, levels, size=shape) * (65535 // levels)).astype(np.uint16)
    else:
        array = (rng.integers(0, levels, size=shape) * 0.37 - 4.0).astype(np.float32)
        if draw(st.booleans()):
            array.flat[rng.integers(0, array.size)] = draw(
                st.sampled_from([np.nan, np.inf, -np.inf])
            )
    return kind, array


def smallest_variance(covariances, covariance_type):
    covariances = np.asarray(covariances, dtype=float)
    if covariance_type in ("full", "tied"):
        return np.linalg.eigvalsh(covariances.reshape(-1, *covariances.shape[-2:])).min()
    return covariances.min()


def assert_rises_until_em_falls(history, fell_at, tol=1e-8):
    """The recorded objective never falls before fell_at: SQUAREM takes a step only where it
    loses nothing.  At fell_at plain EM's own step lost more than tol (reg_covar makes the
    M-step of a collapsing or emptying component inexact), and the fit followed EM on."""
    before = history if fell_at is None else history[: fell_at - 1]
    assert np.all(np.diff(before) >= 0)
    if fell_at is not None and fell_at >= 2:
        assert history[fell_at - 1] < history[fell_at - 2] - tol


def check_model(model, k):
    assert model.n_components <= k
    for values in (model.weights, model.means, model.covariances, model.log_likelihood):
        assert np.all(np.isfinite(values))
    assert_rises_until_em_falls(model.log_likelihood, model.fell_at)
    assert np.all(np.diff(seg.luminance(model.means)) >= 0)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    image=small_images(),
    k=st.integers(1, 6),
    covariance=st.sampled_from(seg.COVARIANCE_TYPES),
    init=st.sampled_from(seg.INIT_METHODS),
    quantized=st.booleans(),
    spatial=st.sampled_from([0.0, 0.0, 0.8]),
)
def test_api_on_any_small_image(image, k, covariance, init, quantized, spatial):
    kind, array = image
    labels, recoloured, model = seg.segment_image(
        array,
        k,
        covariance_type=covariance,
        init=init,
        max_iter=30,
        quantized=quantized,
        spatial=spatial,
    )
    if spatial == 0:
        check_model(model, k)
    else:  # the spatial fit moves the parameters on from the plain fit whose history is kept
        assert all(np.all(np.isfinite(v)) for v in (model.weights, model.means, model.covariances))
    assert (model.quantized_top is not None) == (
        quantized and kind != "float32-gray" and model.means.shape[1] == 1
    )
    assert labels.shape == array.shape[:2]
    assert labels.min() >= 0 and labels.max() < model.n_components
    assert recoloured.shape[:2] == array.shape[:2]
    assert np.all(np.isfinite(recoloured.astype(float)))


@pytest.mark.slow
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    image=small_images(),
    k=st.integers(1, 6),
    covariance=st.sampled_from(seg.COVARIANCE_TYPES),
    figures=st.booleans(),
)
def test_command_line_on_any_small_image(tmp_path_factory, image, k, covariance, figures):
    """Any small image and K: exit 0, finite parameters, a log-likelihood that rises, and
    (in about half the examples, drawing being most of the time) its figures."""
    kind, array = image
    folder = tmp_path_factory.mktemp("prop")
    path = folder / ("in.tif" if kind == "float32-gray" else "in.png")
    Image.fromarray(array).save(path)
    argv = [str(path), "-k", str(k), "--covariance", covariance, "-q", "--out", str(folder / "out")]
    status = seg.main(argv + ([] if figures else ["--outputs", "labels,json"]))
    assert status == 0
    written = {p.name for p in (folder / "out").iterdir()}
    figure_files = {"in_loglik.png", "in_comparison.png"}
    assert figure_files <= written if figures else not figure_files & written
    record = record_of(folder / "out", "in")
    labels = np.asarray(Image.open(folder / "out" / "in_labels.png"))
    assert labels.shape == array.shape[:2] and labels.max() < record["k"] <= k
    assert record["k"] == min(k, record["distinct_values"])
    for key in ("weights", "means", "covariances", "log_likelihood"):
        assert np.all(np.isfinite(np.asarray(record[key], dtype=float)))
    assert_rises_until_em_falls(record["log_likelihood"], record["em_fell_at"])


@st.composite
def mixtures(draw):
    """Samples of a random mixture whose components never collapse: every component has at least
    a few hundred distinct values spread by an sd of 0.02 to 0.2, so every variance EM meets stays
    far above 100 x reg_covar and EM's guarantee applies in every example."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_features = draw(st.sampled_from([1, 3]))
    k = draw(st.integers(1, 5))
    sds = rng.uniform(0.02, 0.2, size=k)
    means = rng.uniform(0.2, 0.8, size=(k, n_features))
    sizes = rng.integers(200, 600, size=k)
    X = np.concatenate(
        [rng.normal(m, s, size=(n, n_features)) for m, s, n in zip(means, sds, sizes)]
    )
    return X, k


@settings(max_examples=40, deadline=None)
@given(
    data=mixtures(),
    covariance=st.sampled_from(seg.COVARIANCE_TYPES),
    accelerate=st.sampled_from(seg.ACCELERATIONS),
    init=st.sampled_from(seg.INIT_METHODS),
)
def test_log_likelihood_never_decreases(data, covariance, accelerate, init):
    X, k = data
    fit = seg.fit_gmm(
        X, k, covariance_type=covariance, accelerate=accelerate, init=init, tol=0, max_iter=25
    )
    assert smallest_variance(fit.covariances, covariance) > 100 * 1e-6  # the guarantee applies
    assert len(fit.log_likelihood) == 25 and np.all(np.isfinite(fit.log_likelihood))
    assert np.all(np.diff(fit.log_likelihood) >= -1e-9)

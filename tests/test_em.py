"""The EM engine: agreement with scikit-learn, exactness of distinct values, EM's guarantees."""

import json
import math
import warnings

import numpy as np
import pytest
from conftest import bayes_labels, block_labels, matched_accuracy, mixture_image, seg
from skimage import data as samples
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

COVARIANCE_TYPES = ["full", "diag", "spherical", "tied"]


def gray_pixels():
    return samples.camera()[::4, ::4].reshape(-1, 1) / 255.0


def color_pixels():
    return samples.coffee()[::4, ::4].reshape(-1, 3) / 255.0


def starting_parameters(X, n_components, covariance_type):
    """A reproducible start: means at luminance quantiles, the data's covariance for each component.

    Returns weights, means, covariances (our argument) and precisions (scikit-learn's).
    """
    order = np.argsort(X.mean(axis=1), kind="stable")
    means = X[order[(2 * np.arange(n_components) + 1) * len(X) // (2 * n_components)]]
    cov = np.atleast_2d(np.cov(X, rowvar=False))
    weights = np.full(n_components, 1.0 / n_components)
    covariances = {
        "full": np.repeat(cov[None], n_components, 0),
        "tied": cov,
        "diag": np.repeat(np.diag(cov)[None], n_components, 0),
        "spherical": np.full(n_components, np.diag(cov).mean()),
    }[covariance_type]
    precisions = (
        np.linalg.inv(covariances) if covariance_type in ("full", "tied") else 1.0 / covariances
    )
    return weights, means, covariances, precisions


@pytest.mark.parametrize("pixels", [gray_pixels, color_pixels], ids=["gray", "color"])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_same_start_same_model_as_scikit_learn(pixels, covariance_type):
    """Same start, 15 iterations: fit_gmm on distinct values = sklearn on every pixel."""
    X = pixels()
    k = 3 if X.shape[1] == 1 else 4
    weights, means, covariances, precisions = starting_parameters(X, k, covariance_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        reference = GaussianMixture(
            k,
            covariance_type=covariance_type,
            weights_init=weights,
            means_init=means,
            precisions_init=precisions,
            max_iter=15,
            tol=0,
        ).fit(X)
    distinct, counts = np.unique(X, axis=0, return_counts=True)
    ours = seg.fit_gmm(
        distinct,
        k,
        sample_weight=counts,
        covariance_type=covariance_type,
        max_iter=15,
        tol=0,
        accelerate="none",
        weights_init=weights,
        means_init=means,
        covariances_init=covariances,
    )
    assert ours.n_iter == reference.n_iter_ == 15
    np.testing.assert_allclose(ours.weights, reference.weights_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.means, reference.means_, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours.covariances, reference.covariances_, rtol=0, atol=1e-6)
    assert ours.covariances.shape == reference.covariances_.shape
    assert ours.log_likelihood[-1] == pytest.approx(reference.score(X), abs=1e-9)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("init", ["kmeans++", "random"])
def test_distinct_values_with_counts_equal_every_pixel(covariance_type, init):
    X = color_pixels()[:3000]
    X = np.concatenate([X, X[:1500]])  # plenty of repeats
    distinct, counts = np.unique(X, axis=0, return_counts=True)
    assert len(distinct) < len(X)
    start = seg.fit_gmm(
        X, 3, covariance_type=covariance_type, max_iter=1, init=init, random_state=1
    )
    options = dict(
        covariance_type=covariance_type,
        max_iter=25,
        tol=0,
        weights_init=start.weights,
        means_init=start.means,
        covariances_init=start.covariances,
    )
    every = seg.fit_gmm(X, 3, **options)
    weighted = seg.fit_gmm(distinct, 3, sample_weight=counts, **options)
    for a, b in [
        (every.weights, weighted.weights),
        (every.means, weighted.means),
        (every.covariances, weighted.covariances),
        (every.log_likelihood, weighted.log_likelihood),
    ]:
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
@pytest.mark.parametrize("pixels", [gray_pixels, color_pixels], ids=["gray", "color"])
def test_history_one_value_per_iteration_never_decreasing_ending_at_score(pixels, covariance_type):
    X = pixels()
    distinct, counts = np.unique(X, axis=0, return_counts=True)
    fit = seg.fit_gmm(
        distinct, 4, sample_weight=counts, covariance_type=covariance_type, tol=1e-6, max_iter=60
    )
    history = np.asarray(fit.log_likelihood)
    assert len(history) == fit.n_iter
    assert np.all(np.diff(history) >= -1e-10)
    assert history[-1] == pytest.approx(fit.score(X), abs=1e-10)
    assert history[-1] == pytest.approx(fit.score(distinct, sample_weight=counts), abs=1e-10)
    assert np.all(np.isfinite(history))


def test_tol_zero_runs_exactly_max_iter():
    X = gray_pixels()
    for accelerate in seg.ACCELERATIONS:
        assert seg.fit_gmm(X, 3, tol=0, max_iter=7, accelerate=accelerate).n_iter == 7
        assert not seg.fit_gmm(X, 3, tol=0, max_iter=3, accelerate=accelerate).converged


@pytest.mark.parametrize("accelerate", ["squarem", "none"])
def test_tol_is_a_distance_to_the_maximum(accelerate):
    """A converged fit is within tol of the log-likelihood the same start reaches run to the end
    (from either side: where EM's own step falls, the fit follows it down to its fixed point)."""
    X = gray_pixels()
    fit = seg.fit_gmm(X, 3, tol=1e-6, accelerate=accelerate, max_iter=5000)
    limit = seg.fit_gmm(X, 3, tol=1e-12, accelerate=accelerate, max_iter=20000)
    assert fit.converged and limit.converged and fit.n_iter <= limit.n_iter
    assert abs(limit.log_likelihood[-1] - fit.log_likelihood[-1]) < 1e-6
    # It stopped on the estimate (below tol twice, not before), or where no step gained any more.
    history = fit.log_likelihood
    distance = seg.distance_to_limit if fit.fell_at is None else seg.distance_of_changes
    assert distance(history) < 1e-6 or history[-1] == history[-2]
    assert distance(history[:-2]) >= 1e-6


def test_distance_to_limit_cases():
    """Aitken's estimate on a geometric sequence is its exact distance; gains that grow are not
    there yet; no gain is a fixed point; a gain after none is round-off, its own estimate."""
    geometric = [1 - 0.5**n for n in range(6)]
    assert seg.distance_to_limit(geometric) == pytest.approx(1 - geometric[-2])
    assert seg.distance_to_limit([0.0, 1e-3, 3e-3]) == math.inf
    assert seg.distance_to_limit([0.0, 1.0, 1.0]) == 0.0
    assert seg.distance_to_limit([0.0, 1.0, 1.0 - 1e-12]) == 0.0
    assert seg.distance_to_limit([1.0, 1.0 - 1e-12, 1.0 + 1e-12]) == pytest.approx(2e-12)


def test_distance_of_changes_cases():
    """After EM's own step has fallen the sequence may approach its limit from above: Aitken's
    estimate on the sizes of the changes, exact on a geometric sequence from either side; a
    change of sign brackets the limit; changes that grow are not there yet."""
    falling = [1 + 0.5**n for n in range(6)]
    assert seg.distance_of_changes(falling) == pytest.approx(falling[-2] - 1)
    rising = [1 - 0.5**n for n in range(6)]
    assert seg.distance_of_changes(rising) == pytest.approx(seg.distance_to_limit(rising))
    assert seg.distance_of_changes([0.0, 1e-3, 1e-3 - 1e-6]) == pytest.approx(1e-6)
    assert seg.distance_of_changes([0.0, -1e-3, -3e-3]) == math.inf
    assert seg.distance_of_changes([0.0, 1.0, 1.0]) == 0.0


def test_n_init_keeps_the_best_start():
    """The first of n starts is the single start of the same seed, so the best of n is never worse;
    and the kept fit is the best of the starts actually run."""
    X = color_pixels()
    finals = []
    best = seg.fit_gmm(
        X,
        5,
        n_init=4,
        random_state=0,
        max_iter=30,
        on_iteration=lambda n, ll: finals.append((n, ll)),
    )
    single = seg.fit_gmm(X, 5, n_init=1, random_state=0, max_iter=30)
    assert best.log_likelihood[-1] >= single.log_likelihood[-1]
    ends = [
        ll for (n, ll), nxt in zip(finals, finals[1:] + [(1, None)]) if nxt[0] == 1
    ]  # last of each start
    assert len(ends) == 4 and best.log_likelihood[-1] == max(ends)
    assert finals[: single.n_iter] == list(zip(range(1, single.n_iter + 1), single.log_likelihood))


def test_same_seed_same_model():
    X = color_pixels()
    a = seg.fit_gmm(X, 4, random_state=7)
    b = seg.fit_gmm(X, 4, random_state=7)
    np.testing.assert_array_equal(a.means, b.means)
    np.testing.assert_array_equal(a.covariances, b.covariances)


def test_predict_proba_predict_and_score_samples_agree_with_scikit_learn():
    X = color_pixels()
    ours = seg.fit_gmm(X, 3, max_iter=5, tol=0)
    reference = GaussianMixture(
        3,
        weights_init=ours.weights,
        means_init=ours.means,
        precisions_init=np.linalg.inv(ours.covariances),
        max_iter=1,
    ).fit(X)
    reference.weights_, reference.means_, reference.covariances_ = (
        ours.weights,
        ours.means,
        ours.covariances,
    )
    reference.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(ours.covariances))
    np.testing.assert_allclose(ours.score_samples(X), reference.score_samples(X), atol=1e-9)
    np.testing.assert_allclose(ours.predict_proba(X), reference.predict_proba(X), atol=1e-9)
    np.testing.assert_array_equal(ours.predict(X), reference.predict(X))


@pytest.mark.parametrize("n_features", [1, 3])
def test_recovers_a_known_mixture_close_to_the_bayes_limit(rng, n_features):
    k = 3
    labels = block_labels(96, 128, k, rng)
    if n_features == 1:
        means = np.array([[0.25], [0.5], [0.75]])
        covariances = np.array([[[0.08**2]], [[0.07**2]], [[0.09**2]]])
    else:
        means = np.array([[0.3, 0.3, 0.6], [0.5, 0.6, 0.4], [0.7, 0.45, 0.5]])
        covariances = np.array([np.eye(3) * s**2 for s in (0.09, 0.08, 0.1)])
    image = mixture_image(labels, means, covariances, rng)
    weights = np.bincount(labels.ravel(), minlength=k) / labels.size
    bayes = matched_accuracy(bayes_labels(image, weights, means, covariances), labels, k)
    found, _, _ = seg.segment_image(image, k)
    ours = matched_accuracy(found, labels, k)
    assert 0.8 < bayes < 0.995
    assert ours >= bayes - 0.01


def test_empty_component_stays_finite():
    """A component started far from every point empties: it keeps its parameters and weight ~ 0."""
    X = np.repeat(np.array([[0.1], [0.2], [0.8], [0.9]]), 50, axis=0)
    fit = seg.fit_gmm(
        X,
        3,
        weights_init=[0.4, 0.4, 0.2],
        means_init=[[0.15], [0.85], [50.0]],
        covariances_init=[[[0.01]], [[0.01]], [[1e-4]]],
        max_iter=20,
        tol=0,
    )
    assert np.all(np.isfinite(fit.means)) and np.all(np.isfinite(fit.covariances))
    assert fit.weights[2] < 1e-12
    assert fit.means[2, 0] == 50.0
    assert np.all(np.diff(fit.log_likelihood) >= -1e-10)


@pytest.mark.parametrize(
    "X, kwargs, words",
    [
        (np.arange(10.0), dict(n_components=0), "n_components must be an integer >= 1"),
        (np.arange(10.0), dict(n_components=11), "10 distinct samples"),
        (np.arange(10.0), dict(n_components=2, covariance_type="x"), "covariance_type must be"),
        (np.arange(10.0), dict(n_components=2, tol=-1), "tol must be"),
        (np.arange(10.0), dict(n_components=2, max_iter=0), "max_iter must be"),
        (np.arange(10.0), dict(n_components=2, init="nope"), "init must be"),
        (np.arange(10.0), dict(n_components=2, accelerate="fast"), "accelerate must be"),
        (np.arange(10.0), dict(n_components=2, sample_weight=-np.ones(10)), "sample_weight"),
        (np.array([0.0, np.nan]), dict(n_components=1), "NaN"),
        (np.repeat([0.1, 0.9], 50), dict(n_components=3), "2 distinct values with positive weight"),
    ],
)
def test_bad_arguments_are_value_errors(X, kwargs, words):
    with pytest.raises(ValueError, match=words):
        seg.fit_gmm(X, **kwargs)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_a_singular_covariance_is_a_value_error_for_every_type(covariance_type):
    """Two single values, reg_covar = 0: every covariance type refuses, none divides by zero."""
    X = np.repeat([[0.1, 0.2], [0.9, 0.7]], 50, axis=0)
    with pytest.raises(seg.FitFailed, match="singular"):
        seg.fit_gmm(X, 2, covariance_type=covariance_type, reg_covar=0)
    assert issubclass(seg.FitFailed, ValueError)


@pytest.mark.parametrize("kind", ["density", "binned", "partial volume"])
def test_each_kind_of_mixture_keeps_its_labels_through_its_record_and_a_reordering(kind):
    """A fit's kind (Gaussian densities, bins of gray levels, Gaussians mixing tissues) is read
    back from its record with the same labels of every level, and reordering its labels
    permutes them and changes no likelihood."""
    rng = np.random.default_rng(3)
    image = rng.choice([60.0, 120.0, 190.0], (50, 60)) + rng.normal(0, 12, (50, 60))
    image = np.clip(np.rint(image), 0, 255).astype(np.uint8)
    options = {
        "density": {},
        "binned": {"quantized": True},
        "partial volume": {"partial_volume": True, "covariance_type": "tied"},
    }[kind]
    model = seg.segment_image(image, 3, **options)[2]
    assert (model.quantized_top == 255) == (kind == "binned")
    assert (model.partial_volume is not None) == (kind == "partial volume")
    levels = np.arange(256.0)[:, None] / 255
    again = seg.GaussianMixtureFit.from_record(json.loads(json.dumps(model.to_record())))
    assert type(again.kind) is type(model.kind) and again.n_labels == model.n_labels == 3
    assert np.array_equal(again.predict(levels), model.predict(levels))
    order = np.array([2, 0, 1])
    reordered = model.reordered(order)
    assert np.array_equal(order[reordered.predict(levels)], model.predict(levels))
    np.testing.assert_allclose(reordered.score_samples(levels), model.score_samples(levels))

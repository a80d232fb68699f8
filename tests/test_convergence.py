"""Fitting to the maximum: SQUAREM reaches plain EM's fixed point, the stopping rule stops there."""

from dataclasses import replace

import numpy as np
import pytest
from conftest import (
    CLIPPED,
    OVERLAPPING_COLOUR,
    OVERLAPPING_GRAY,
    bayes_of_levels,
    class_scene,
    clipped_image,
    matched_accuracy,
    record_of,
    run,
    seg,
)
from PIL import Image

SCENES = {
    "colour, 4 classes": (OVERLAPPING_COLOUR, 0.07),
    "gray, 3 classes": (OVERLAPPING_GRAY, 0.06),
}


@pytest.mark.parametrize("scene", list(SCENES))
def test_default_run_reaches_the_bayes_limit_where_classes_overlap(rng, scene):
    means, sd = SCENES[scene]
    image, labels, bayes = class_scene(rng, means, sd, shape=(120, 160))
    assert bayes < 0.95  # the classes really overlap
    found, _, model = seg.segment_image(image, len(means))
    assert model.converged
    assert matched_accuracy(found, labels, len(means)) >= bayes - 0.01


def _same_start_tighter(picture, points, k, options, **kwargs):
    """The default run and the same start run with a tolerance a thousand times smaller."""
    default = seg.segment_points(picture, points, k, fit=options, **kwargs)
    tight = seg.segment_points(
        picture, points, k, fit=seg.FitOptions(tol=options.tol / 1000, max_iter=100_000), **kwargs
    )
    return default, tight


@pytest.mark.parametrize("case", ["colour", "gray", "quantized", "spatial"])
def test_default_stop_is_at_the_maximum(rng, case):
    """Within 2e-5 per pixel of a 1000x smaller tol's log-likelihood, labels 99.9 % the same."""
    if case == "quantized":
        image, _ = clipped_image(*CLIPPED["dark class clipped at 0"], rng)
        k = 3
    else:
        means, sd = SCENES[
            "gray, 3 classes" if case in ("gray", "spatial") else "colour, 4 classes"
        ]
        image, _, _ = class_scene(rng, means, sd)
        k = len(means)
    picture = seg.picture_from_array(image)
    options = seg.FitOptions()
    default, tight = _same_start_tighter(
        picture,
        seg.distinct_values(picture),
        k,
        options,
        quantized=case == "quantized",
        spatial=1.0 if case == "spatial" else 0.0,
    )
    history = default.spatial.objective if case == "spatial" else default.model.log_likelihood
    limit = tight.spatial.objective if case == "spatial" else tight.model.log_likelihood
    assert default.model.converged and tight.model.converged
    assert abs(limit[-1] - history[-1]) <= 2e-5
    assert np.mean(default.labels == tight.labels) >= 0.999


@pytest.mark.parametrize("covariance_type", seg.COVARIANCE_TYPES)
@pytest.mark.parametrize("reg_covar", [0.0, 1e-6])
def test_squarem_reaches_the_fixed_point_of_plain_em(rng, covariance_type, reg_covar):
    """Exact EM (reg_covar = 0): the same fixed point to 1e-6.  With scikit-learn's reg_covar the
    M-step is inexact and its fixed point lies a hair below the maximum: SQUAREM ends as close, at
    no lower likelihood."""
    image, _, _ = class_scene(rng, OVERLAPPING_COLOUR, 0.07, shape=(60, 80))
    X, counts = np.unique(image.reshape(-1, 3) / 255.0, axis=0, return_counts=True)
    common = dict(sample_weight=counts, covariance_type=covariance_type, reg_covar=reg_covar)
    start = seg.fit_gmm(X, 4, max_iter=2, tol=0, **common)
    given = dict(
        weights_init=start.weights, means_init=start.means, covariances_init=start.covariances
    )
    plain = seg.fit_gmm(X, 4, accelerate="none", tol=1e-13, max_iter=100_000, **common, **given)
    fast = seg.fit_gmm(X, 4, tol=1e-13, **common, **given)
    assert plain.converged and fast.converged
    assert fast.n_em_steps < plain.n_em_steps  # how many fewer: tools/benchmark.py
    for a, b in [
        (fast.weights, plain.weights),
        (fast.means, plain.means),
        (fast.covariances, plain.covariances),
    ]:
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 if reg_covar == 0 else 1e-4)
    assert fast.log_likelihood[-1] >= plain.log_likelihood[-1] - 1e-12


@pytest.mark.parametrize("case", list(CLIPPED))
def test_where_em_itself_falls_the_fit_goes_on_to_its_fixed_point(case):
    """A class clipped at 0 or 255 piles pixels on one level; a component that takes it sits at
    reg_covar, where scikit-learn's M-step is inexact and EM's own step loses likelihood.  That
    is not the maximum: the fit follows EM to its fixed point, the one plain EM reaches from
    the same start run to the end (stopping at the first loss ends 1e-3 per pixel short)."""
    image, _ = clipped_image(*CLIPPED[case], np.random.default_rng(1))
    levels, counts = np.unique(image.ravel() / 255.0, return_counts=True)
    fit = seg.fit_gmm(levels, 3, sample_weight=counts)
    assert fit.converged and fit.fell_at is not None  # EM's own step fell on the way
    history = fit.log_likelihood
    assert np.all(np.diff(history[: fit.fell_at - 1]) >= 0)
    assert history[fit.fell_at - 1] < history[fit.fell_at - 2] - 1e-8
    start = seg.fit_gmm(levels, 3, sample_weight=counts, max_iter=1, tol=0, accelerate="none")
    given = dict(
        weights_init=start.weights, means_init=start.means, covariances_init=start.covariances
    )
    plain = seg.fit_gmm(
        levels, 3, sample_weight=counts, accelerate="none", tol=1e-12, max_iter=20_000, **given
    )
    assert abs(plain.log_likelihood[-1] - history[-1]) < 1e-8
    np.testing.assert_allclose(fit.means, plain.means, rtol=0, atol=1e-8)
    np.testing.assert_allclose(fit.weights, plain.weights, rtol=0, atol=1e-8)
    assert plain.log_likelihood[-1] < max(history) - 1e-4  # the maximum on the way is not it


@pytest.mark.parametrize("covariance_type", seg.COVARIANCE_TYPES)
def test_accelerated_steps_stay_valid_and_never_lose_likelihood(rng, covariance_type):
    image, _, _ = class_scene(rng, OVERLAPPING_COLOUR, 0.07, shape=(60, 80))
    X, counts = np.unique(image.reshape(-1, 3) / 255.0, axis=0, return_counts=True)
    seen = []
    fit = seg.fit_gmm(
        X,
        4,
        sample_weight=counts,
        covariance_type=covariance_type,
        tol=0,
        max_iter=40,
        on_iteration=lambda n, value: seen.append(value),
    )
    assert fit.n_iter == 40 == len(fit.log_likelihood) and seen == fit.log_likelihood
    assert fit.n_em_steps >= 2 * fit.n_iter  # every cycle evaluates two or three EM maps
    assert np.all(np.diff(fit.log_likelihood) >= 0)
    assert np.all(np.isfinite(fit.log_likelihood))
    assert fit.weights.min() >= 0 and fit.weights.sum() == pytest.approx(1, abs=1e-12)
    covariances = (
        fit.covariances.reshape(-1, 3, 3)
        if covariance_type in ("full", "tied")
        else fit.covariances
    )
    assert (
        np.all(np.linalg.eigvalsh(covariances) > 0)
        if covariance_type in ("full", "tied")
        else np.all(covariances > 0)
    )


def test_quantized_default_run_reaches_the_bayes_limit(rng):
    means, sds = CLIPPED["bright class clipped at 255"]
    image, labels = clipped_image(means, sds, rng)
    bayes = matched_accuracy(bayes_of_levels(labels, means, sds)[image], labels, 3)
    found, _, model = seg.segment_image(image, 3, quantized=True)
    assert model.converged and matched_accuracy(found, labels, 3) >= bayes - 0.01


@pytest.mark.parametrize("scene", list(SCENES))
def test_spatial_default_run_is_five_points_above_the_per_pixel_limit(rng, scene):
    means, sd = SCENES[scene]
    image, labels, bayes = class_scene(rng, means, sd)
    picture = seg.picture_from_array(image)
    result = seg.segment_points(picture, seg.distinct_values(picture), len(means), spatial=1.0)
    assert result.spatial.converged
    assert matched_accuracy(result.labels, labels, len(means)) >= bayes + 0.05


def test_cap_collapse_and_cost_are_reported(tmp_path, rng, capsys):
    """A run stopped by --max-iter says so; a collapse is named, with the way out; em_steps."""
    image, _ = clipped_image(*CLIPPED["dark class clipped at 0"], rng)
    Image.fromarray(image).save(tmp_path / "clipped.png")
    status, out, err = run([tmp_path / "clipped.png", "-k", "3", "--out", tmp_path / "a"], capsys)
    assert status == 0, err
    record = record_of(tmp_path / "a", "clipped")
    assert (
        record["converged"] and " converged " in out and record["em_steps"] >= 2 * record["n_iter"]
    )
    assert record["collapsed_components"] == [0]  # the clipped black run
    assert any("--quantized" in note and "collapsed" in note for note in record["notes"])
    assert err.count("collapsed onto a single value") == 1 and "--quantized fits gray levels" in err

    status, out, err = run(
        [
            tmp_path / "clipped.png",
            "-k",
            "3",
            "--quantized",
            "--max-iter",
            "2",
            "--accelerate",
            "none",
            "--out",
            tmp_path / "b",
        ],
        capsys,
    )
    record = record_of(tmp_path / "b", "clipped")
    assert status == 0 and not record["converged"] and record["n_iter"] == record["em_steps"] == 2
    assert "iterations=2 em-steps=2 stopped-at-max-iter" in out
    assert record["collapsed_components"] == [] and "collapsed" not in err


def test_spatial_fit_coarse_to_fine(rng):
    """A large grid starts from its subsampled grids' fits: same quality, every grid converged."""
    image, labels, bayes = class_scene(rng, OVERLAPPING_GRAY, 0.06)
    picture = seg.picture_from_array(image)
    points = seg.distinct_values(picture)
    cold = seg.segment_points(picture, points, 3, spatial=1.0)
    small_grids = seg.SpatialSettings(coarsest_grid_pixels=1000)
    warm = seg.segment_points(picture, points, 3, spatial=1.0, spatial_settings=small_grids)
    grids = warm.spatial.coarser_grids
    assert [(g.height, g.width) for g in grids] == [(24, 32), (48, 64)]
    assert all(g.converged for g in grids) and warm.spatial.converged
    assert cold.spatial.coarser_grids == []
    assert warm.spatial.objective[-1] >= cold.spatial.objective[-1] - 1e-4
    assert matched_accuracy(warm.labels, labels, 3) >= bayes + 0.05
    assert np.all(np.diff(warm.spatial.objective) >= -1e-6)


def many_values(rng, n=6000):
    """Colour points of four classes, one of them small (2 %) and far from the others: a draw of
    a few hundred pixels sees a handful of its points."""
    means = np.array([[0.2, 0.3, 0.4], [0.5, 0.5, 0.5], [0.7, 0.6, 0.3], [0.9, 0.1, 0.9]])
    sizes = rng.multinomial(n, [0.38, 0.35, 0.25, 0.02])
    X = np.concatenate([rng.normal(m, 0.06, size=(size, 3)) for m, size in zip(means, sizes)])
    return X, rng.integers(1, 20, size=len(X)).astype(float)


def test_a_subsampled_start_ends_at_the_full_datas_maximum():
    """More distinct values than subsample_above: the start and EM on a draw of a sixteenth as
    many pixels, EM on draws four times larger in turn, each to its own precision, then on every
    point to the same stopping rule.  The fit ends at the full data's maximum: EM on every
    point from the returned model, with a thousand times smaller tolerance, gains under 2e-5 per
    pixel (the draws' own fits are over 1e-3 off it), and it is where EM on every point from a
    start of its own ends."""
    X, counts = many_values(np.random.default_rng(5))
    fit = seg.fit_gmm(X, 4, sample_weight=counts, subsample_above=4800)
    pixels = [draw["pixels"] for draw in fit.subsample]
    assert fit.converged and pixels == [300, 1200, 4800] and 4 * 4 * 4800 > counts.sum()
    assert all(draw["points"] <= draw["pixels"] < len(X) for draw in fit.subsample)
    assert len(fit.log_likelihood) == fit.n_iter  # the iterations on every point only
    free = seg.n_parameters(4, 3, "full")
    assert [draw["tol"] for draw in fit.subsample] == [
        free / 300,
        free / 1200 * seg.JACOBIAN_DRAW_TOL,
        free / 4800,
    ]  # each draw stops at its precision; the one measuring the Jacobian nearer
    full = fit.score(X, sample_weight=counts)
    assert full == pytest.approx(fit.log_likelihood[-1], abs=1e-12)
    given = dict(weights_init=fit.weights, means_init=fit.means, covariances_init=fit.covariances)
    tight = seg.fit_gmm(X, 4, sample_weight=counts, tol=1e-11, max_iter=100_000, **given)
    assert tight.log_likelihood[-1] - full < 2e-5
    everywhere = seg.fit_gmm(X, 4, sample_weight=counts)
    assert not everywhere.subsample and abs(everywhere.log_likelihood[-1] - full) < 2e-5
    # Newton's steps did the work on every point: the Jacobian was measured on the second draw
    # (one EM step a coordinate and one at the draw's fit), every iteration on every point was
    # a Newton step (one EM step each, and one to stop), and EM on every point alone takes more
    # passes over them.
    assert [draw["jacobian_steps"] for draw in fit.subsample] == [0, 4 + 4 * 3 + 4 * 6 + 1, 0]
    assert fit.newton_iter == fit.n_iter and fit.n_em_steps == fit.n_iter + 1
    assert everywhere.n_em_steps > fit.n_em_steps


class Point:
    """A state of the linear map below: a vector, the objective -|x - x*|^2 / 2."""

    stoppable = True
    in_place = False

    def __init__(self, x, fixed):
        self.x, self.fixed = x, fixed
        self.objective = -0.5 * float((x - fixed) @ (x - fixed))


def test_the_driver_refuses_to_extrapolate_a_state_updated_in_place():
    """A mean-field state's q is overwritten by its step, so SQUAREM's three steps from one
    state (or Newton's residuals) would read a q already moved: the driver refuses coordinates
    for such a state instead of fitting something else silently; without coordinates it runs."""
    padded = np.zeros((2, 4, 4), np.float32)
    start = seg.MeanField(None, padded, -1.0, 4)
    coordinates = seg.Coordinates(lambda state: np.array([state.total]), lambda x, like: like)

    def step(state):
        return replace(state, total=state.total / 2, stoppable=True)

    with pytest.raises(ValueError, match="in place"):
        seg.run_em(start, step, seg.FitOptions(), coordinates=coordinates)
    run = seg.run_em(start, step, seg.FitOptions(tol=1e-6))
    assert run.converged and run.history == sorted(run.history)


def test_newton_on_a_linear_map_measures_it_and_lands_on_its_fixed_point(rng):
    """On x -> A x + b the measured Jacobian is A, and one Newton step lands on the fixed point
    (I - A)^-1 b, which plain iteration of the map (rate 0.97) approaches only slowly."""
    A = np.diag([0.97, 0.8, 0.5, 0.1]) + 0.01 * rng.random((4, 4))
    b = rng.random(4)
    fixed = np.linalg.solve(np.eye(4) - A, b)

    def step(state):
        return Point(A @ state.x + b, fixed)

    coordinates = seg.Coordinates(lambda state: state.x, lambda x, like: Point(x, fixed))
    start = Point(np.zeros(4), fixed)
    jacobian = seg.em_map_jacobian(start, step, coordinates)
    assert np.allclose(jacobian, A, rtol=0, atol=1e-8)
    options = seg.FitOptions()
    run = seg.run_em(start, step, options, coordinates=coordinates, jacobian=jacobian)
    assert run.converged and run.newton_iter >= 1
    assert np.allclose(run.state.x, fixed, rtol=0, atol=1e-12)
    plain = seg.run_em(start, step, seg.FitOptions(accelerate="none"), coordinates=coordinates)
    assert plain.n_iter > 10 * run.n_iter


def overlapping_pair():
    """Two overlapping 1-D Gaussians, 5,000 points: EM's rate there is 0.98; the EM map (e_step,
    step), the data and a start 20 EM steps from k-means++'s."""
    rng = np.random.default_rng(3)
    X = np.concatenate([rng.normal(0.4, 0.1, 3000), rng.normal(0.65, 0.1, 2000)])[:, None]
    data = seg._PointFeatures(X, np.ones(len(X)))
    options = seg.FitOptions(accelerate="none")
    e_step, m_step = seg._density_map(data, options)
    step = seg.mixture_step(m_step)
    state = seg.MixtureState(*seg._fresh_start(data, 2, options, np.random.default_rng(0)), e_step)
    for _ in range(20):
        state = step(state)
    return data, step, state


def as_fit(data, state):
    return seg.GaussianMixtureFit(
        state.weights, data.uncentred(state.means), state.covariances, "full"
    )


def test_the_measured_jacobian_has_ems_rate():
    """EM converges at the rate of its map's largest eigenvalue: the ratio of its successive
    steps, late in a run, is the spectral radius of the Jacobian measured where it ends."""
    data, step, state = overlapping_pair()
    coordinates = seg.mixture_coordinates("full")
    sizes = []
    for _ in range(300):
        new = step(state)
        sizes.append(np.linalg.norm(coordinates.to_vector(new) - coordinates.to_vector(state)))
        state = new
    rate = sizes[-1] / sizes[-2]
    jacobian = seg._density_jacobian(data, as_fit(data, state), seg.FitOptions())
    assert 0.95 < rate < 1 and abs(np.abs(np.linalg.eigvals(jacobian)).max() - rate) < 1e-3


def test_newton_reaches_ems_fixed_point_and_hands_over_with_a_wrong_jacobian():
    """From 20 EM steps in, Newton's steps with the Jacobian measured there end where 3,000
    plain EM steps end, in a few passes; with a wrong Jacobian a step stops shrinking the
    residual, and SQUAREM goes on from there to the same fixed point."""
    data, step, state = overlapping_pair()
    start = state.parameters
    plain = seg._density_em(data, start, seg.FitOptions(accelerate="none", tol=0, max_iter=3000))
    options = seg.FitOptions(tol=1e-13)
    jacobian = seg._density_jacobian(data, as_fit(data, state), options)
    newton = seg._density_em(data, start, options, jacobian=jacobian)
    assert newton.converged and newton.newton_iter == newton.n_iter <= 15
    wrong = seg._density_em(data, start, options, jacobian=-3 * jacobian)
    assert wrong.converged and wrong.newton_iter < wrong.n_iter
    for fit in (newton, wrong):
        assert np.allclose(fit.means, plain.means, rtol=0, atol=1e-7)
        assert np.allclose(fit.covariances, plain.covariances, rtol=0, atol=1e-7)
        assert abs(fit.log_likelihood[-1] - plain.log_likelihood[-1]) < 1e-12
    assert newton.n_em_steps < seg._density_em(data, start, options).n_em_steps


def test_k_auto_and_a_shared_batch_start_on_draws_and_end_at_the_maximum():
    """-k auto over a batch's pooled noisy colours: a fresh start begins on draws of pixels
    (K = 1's here; a later K starts from the last K's fit, split), and the chosen model ends at
    the full pool's maximum."""
    rng = np.random.default_rng(7)
    images = [
        np.clip(rng.normal(centre, 30, (60, 80, 3)), 0, 255).astype(np.uint8)
        for centre in ((60, 90, 120), (170, 140, 110))
    ]
    pooled = seg.pool_points(
        seg.distinct_values(seg.picture_from_array(image), "color") for image in images
    )
    one, _ = seg.fit_points(pooled, 1, subsample_above=2000)
    assert len(pooled.values) > 2000 and one.subsample[0]["pixels"] == 125
    model, search = seg.fit_points(pooled, "auto", k_max=3, subsample_above=2000)
    assert [row["k"] for row in search.rows] == [1, 2, 3] and model.converged
    X = pooled.values / pooled.scale
    given = dict(
        weights_init=model.weights, means_init=model.means, covariances_init=model.covariances
    )
    tight = seg.fit_gmm(X, model.n_components, sample_weight=pooled.weights, tol=1e-11, **given)
    assert tight.log_likelihood[-1] - model.log_likelihood[-1] < 2e-5


def test_draws_grow_to_the_threshold_and_to_a_quarter_of_the_image():
    """Draws of a sixteenth of subsample_above, four times larger in turn, up to subsample_above
    pixels (larger ones cost more than the passes they save) and a quarter of the image."""
    assert seg._draw_sizes(24_000_000, 1 << 19) == [32768, 131072, 524288]
    assert seg._draw_sizes(2_000_000, 1 << 19) == [32768, 131072]
    assert seg._draw_sizes(524_288, 1 << 19) == [32768, 131072]
    assert seg._draw_sizes(400_000, 1 << 19) == [32768]


def test_the_draw_is_the_seeds():
    """The same seed draws the same pixels and gives the same fit, to the last digit."""
    X, counts = many_values(np.random.default_rng(6))
    one, two = (seg.fit_gmm(X, 4, sample_weight=counts, subsample_above=4800) for _ in range(2))
    assert one.subsample == two.subsample and np.array_equal(one.means, two.means)
    other = seg.fit_gmm(X, 4, sample_weight=counts, subsample_above=4800, random_state=1)
    assert other.subsample != one.subsample or not np.array_equal(other.means, one.means)
    with pytest.raises(ValueError, match="subsample_above"):
        seg.fit_gmm(X, 4, subsample_above=-1)


def test_a_noisy_photos_record_says_what_ran_on_draws_and_what_newton_did(tmp_path, capsys):
    """A scene with more distinct colours than the draws' threshold, on the command line: the
    JSON lists the draws, the Jacobian measured on the second (51 EM steps for K = 5, full),
    Newton's iterations on every point (one EM step each, and one at the start), and the
    log-likelihood rises until the first iteration it fell on; the plot is written."""
    means = [[0.3, 0.3, 0.3], [0.7, 0.3, 0.3], [0.3, 0.7, 0.3], [0.3, 0.3, 0.7], [0.7, 0.7, 0.7]]
    image, _, _ = class_scene(np.random.default_rng(11), means, 0.07, shape=(900, 900))
    Image.fromarray(image).save(tmp_path / "noisy.png")
    status, out, err = run(
        [tmp_path / "noisy.png", "--out", tmp_path / "out"], capsys, figures=True
    )
    assert status == 0, err
    record = record_of(tmp_path / "out", "noisy")
    assert record["distinct_values"] > 1 << 19 and record["converged"]
    draws = record["subsample"]
    assert [d["pixels"] for d in draws] == [32768, 131072]
    assert [d["jacobian_steps"] for d in draws] == [0, 51]
    assert record["newton_iter"] == record["n_iter"] == record["em_steps"] - 1 >= 2
    history, fell_at = record["log_likelihood"], record["em_fell_at"]
    before = history if fell_at is None else history[: fell_at - 1]
    assert np.all(np.diff(before) >= 0)
    if fell_at is not None:
        assert history[fell_at - 1] < history[fell_at - 2]
    assert (tmp_path / "out" / "noisy_loglik.png").stat().st_size > 0

"""Partial volume (--partial-volume, part of --brain): tissues and the mixels between them,
labels of the tissue with most of each pixel, fractional maps, and a prior on the tissues."""

import re
from dataclasses import replace

import numpy as np
import pytest
from conftest import matched_accuracy, record_of, run, seg
from PIL import Image
from scipy.ndimage import gaussian_filter


def blurred_cells(rng, shape=(120, 150), sd=0.03, blur=1.5, cell=8):
    """Cells of three tissues blurred (every boundary pixel a mixture of two), with noise: the
    image, each tissue's true share (3, H, W), and the tissue with most of each pixel."""
    cells = rng.choice(3, p=(0.15, 0.45, 0.4), size=(-(-shape[0] // cell), -(-shape[1] // cell)))
    labels = np.kron(cells, np.ones((cell, cell), int))[: shape[0], : shape[1]]
    shares = np.stack([gaussian_filter((labels == k).astype(float), blur) for k in range(3)])
    values = np.tensordot([0.3, 0.65, 0.85], shares, axes=1) + rng.normal(0, sd, shape)
    image = np.clip(np.rint(values * 255), 1, 255).astype(np.uint8)
    return image, shares, shares.argmax(axis=0)


def fit(image, **options):
    picture = seg.picture_from_array(image)
    points = seg.distinct_values(picture)
    return seg.segment_points(picture, points, 3, covariance_type="tied", **options)


def layers(rng, shape=(120, 150), sd=0.06, blur=1.5):
    """Bent bands of three tissues, blurred, with noise, in which only tissues neighbouring in
    intensity touch (as CSF, grey and white matter do): the image and the tissue with most of
    each pixel."""
    sequence, widths = [1], []
    while sum(widths) < 1.6 * shape[1]:
        widths.append(rng.integers(3, 12))
        sequence.append(sequence[-1] + rng.choice([-1, 1]) if sequence[-1] == 1 else 1)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    band = np.searchsorted(np.cumsum(widths), cols + 8 * np.sin(rows / 9.0) + 0.3 * rows)
    labels = np.array(sequence)[band]
    shares = np.stack([gaussian_filter((labels == k).astype(float), blur) for k in range(3)])
    values = np.tensordot([0.3, 0.65, 0.85], shares, axes=1) + rng.normal(0, sd, shape)
    return np.clip(np.rint(values * 255), 1, 255).astype(np.uint8), shares.argmax(axis=0)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("spatial", [0.0, 0.5])
def test_mixels_label_blurred_boundaries_better(seed, spatial):
    """One Gaussian a tissue gives boundaries to the wrong tissue; with the mixels each boundary
    pixel goes to the tissue with most of it more often, with the prior as without (by 1.1 to
    18 points here)."""
    image, truth = layers(np.random.default_rng(seed))
    plain, mixels = (
        matched_accuracy(fit(image, spatial=spatial, partial_volume=pv).labels, truth, 3)
        for pv in (False, True)
    )
    assert mixels > plain + 0.01


def test_the_mixels_are_mixtures_of_the_tissues_and_the_fit_ascends():
    """The mixels' means are their fractions of the tissues' means (to round-off), one
    covariance for all, the log-likelihood never falls, and the labels are the 3 tissues."""
    image, _, _ = blurred_cells(np.random.default_rng(0))
    model = fit(image, partial_volume=True).model
    fractions = model.partial_volume.fractions
    assert fractions.shape == (3 + 2 * len(seg.MIXEL_FRACTIONS), 3)
    assert np.array_equal(fractions[:3], np.eye(3)) and np.allclose(fractions.sum(axis=1), 1)
    assert np.allclose(model.means, fractions @ model.means[:3], rtol=0, atol=1e-12)
    assert model.covariance_type == "tied" and model.n_labels == 3 and model.n_components == 7
    assert np.all(np.diff(model.means[:3, 0]) > 0)  # the tissues by luminance
    history, fell_at = model.log_likelihood, model.fell_at  # where EM's own step fell, if it did
    before = history if fell_at is None else history[: fell_at - 1]
    assert np.all(np.diff(before) >= 0) and model.converged
    assert model.predict(model.means[:3]).tolist() == [0, 1, 2]


def test_the_m_step_is_the_constrained_maximum():
    """For any responsibilities the M-step's tissue means and covariance maximise the expected
    complete log-likelihood among mixtures whose mixels mix the tissues: every small move of
    the tissues' means or of the variance lowers it."""
    rng = np.random.default_rng(3)
    x = rng.random(400)
    resp = rng.dirichlet(np.ones(7), size=400).T * rng.random(400)
    pv = seg.tissues_and_mixels(3)
    data = seg._PointFeatures(x[:, None], np.ones(400))
    stats = sum(resp[:, s : s + phi.shape[1]] @ phi.T for s, phi, _ in data.blocks())
    weights, means, covariance = seg._partial_volume_m_step(
        stats, pv, 0.0, np.zeros((7, 1)), np.eye(1)
    )
    means = data.uncentred(means)

    def expected(tissue_means, variance):
        mu = pv.fractions @ tissue_means
        logp = -0.5 * np.log(2 * np.pi * variance) - 0.5 * (x[None] - mu[:, None]) ** 2 / variance
        return float(np.sum(resp * logp))

    best = expected(means[:3, 0], covariance[0, 0])
    for _ in range(20):
        step = rng.normal(size=3) * 1e-3
        assert expected(means[:3, 0] + step, covariance[0, 0]) < best
    for factor in (0.99, 1.01):
        assert expected(means[:3, 0], covariance[0, 0] * factor) < best
    assert weights == pytest.approx(resp.sum(axis=1) / resp.sum())


def test_the_prior_is_on_the_tissues():
    """With a partial-volume model the spatial fit's labels are the tissues: a pixel's
    log-probability of a tissue is the log-sum of its Gaussians' (the mixels with most of it),
    and q holds one value a tissue."""
    image, _, _ = blurred_cells(np.random.default_rng(4))
    smooth = fit(image, partial_volume=True, spatial=0.5, keep_posteriors=True)
    model = smooth.model
    data = seg._PointFeatures(smooth.points.values, smooth.points.weights, smooth.points.scale)
    table = seg._point_log_probabilities(model, data)
    x = data.values[:, 0] / data.scale
    variance = model.covariances[0, 0]
    densities = model.weights[:, None] * np.exp(-0.5 * (x - model.means) ** 2 / variance)
    densities /= np.sqrt(2 * np.pi * variance)
    tissue_of = model.partial_volume.tissue_of
    by_hand = np.log([densities[tissue_of == t].sum(axis=0) for t in range(3)])
    assert table.shape == (3, len(x)) and np.allclose(table, by_hand, rtol=0, atol=1e-9)
    assert sorted(set(tissue_of[3:])) == [0, 1, 2] and smooth.posteriors.shape[0] == 3


def test_the_spatial_fit_with_mixels_ascends_and_keeps_the_mixture():
    """With --spatial the prior smooths the tissues: the mixture is the partial-volume fit's
    (measured: as accurate as refitting it, in a tenth of the iterations), and the mean-field
    objective never falls."""
    image, _, _ = blurred_cells(np.random.default_rng(1), sd=0.06)
    plain, smooth = fit(image, partial_volume=True), fit(image, partial_volume=True, spatial=0.5)
    assert np.array_equal(plain.model.means, smooth.model.means)
    assert np.all(np.diff(smooth.spatial.objective) >= -1e-7) and smooth.spatial.converged


def test_fractional_maps_and_the_record(tmp_path, capsys):
    """--probabilities writes each tissue's expected share of every pixel (FAST's partial
    volume maps): they add up to 1 at every pixel, are near 1 inside a cell and follow the true
    shares; the JSON has K = 3 tissues and the mixels' fractions."""
    image, shares, _ = blurred_cells(np.random.default_rng(2))
    Image.fromarray(image).save(tmp_path / "cells.png")
    for options, folder in (([], "plain"), (["--spatial", "0.5"], "spatial")):
        status, out, err = run(
            [tmp_path / "cells.png", "-k", "3", "--covariance", "tied", "--partial-volume"]
            + ["--probabilities", *options, "--out", tmp_path / folder],
            capsys,
        )
        assert status == 0, err
        maps = np.stack(
            [np.asarray(Image.open(tmp_path / folder / f"cells_prob_{k}.png")) for k in range(3)]
        ).astype(np.float64)
        assert np.all(np.abs(maps.sum(axis=0) - 65535) <= 3)
        found = maps / 65535
        assert np.mean(np.abs(found - shares)) < 0.1
        assert np.corrcoef(found.ravel(), shares.ravel())[0, 1] > 0.9
        record = record_of(tmp_path / folder, "cells")
        assert record["k"] == 3 and len(record["weights"]) == 7
        assert record["partial_volume"]["fractions"][3] == [0.75, 0.25, 0.0]
        assert record["settings"]["partial_volume"] is True


def test_a_saved_partial_volume_model_labels_its_image_again(tmp_path, capsys):
    """--model with a partial-volume model's JSON: the same labels on its own image; a file
    whose fractions are not shares of its tissues is a one-line error for the image."""
    image, _, _ = blurred_cells(np.random.default_rng(5))
    Image.fromarray(image).save(tmp_path / "cells.png")
    options = ["-k", "3", "--covariance", "tied", "--partial-volume"]
    status, _, err = run([tmp_path / "cells.png", *options, "--out", tmp_path / "a"], capsys)
    assert status == 0, err
    saved = tmp_path / "a" / "cells_model.json"
    status, _, err = run(
        [tmp_path / "cells.png", "--model", saved, "--out", tmp_path / "b"], capsys
    )
    assert status == 0, err
    first, again = (np.asarray(Image.open(tmp_path / d / "cells_labels.png")) for d in ("a", "b"))
    assert np.array_equal(first, again)
    record = record_of(tmp_path / "a", "cells")
    model = seg.GaussianMixtureFit.from_record(record)
    assert np.array_equal(
        model.partial_volume.fractions, np.array(record["partial_volume"]["fractions"])
    )
    record["partial_volume"]["fractions"][4] = [0.5, 0.6, 0.0]
    (tmp_path / "bad.json").write_text(__import__("json").dumps(record))
    status, _, err = run(
        [tmp_path / "cells.png", "--model", tmp_path / "bad.json", "--out", tmp_path / "c"], capsys
    )
    assert status == 1 and len(err.strip().splitlines()) == 2
    assert "fractions are not shares of its tissues" in err


@pytest.mark.parametrize(
    "options, why",
    [
        (["--covariance", "full"], "--covariance full: its tissues and mixels share one"),
        (["--covariance", "spherical"], "--covariance spherical: its tissues and mixels share"),
        (["--covariance", "tied", "--quantized"], "--quantized"),
        (["--covariance", "tied", "-k", "auto"], "-k auto"),
    ],
)
def test_partial_volume_usage_errors(tmp_path, capsys, options, why):
    image, _, _ = blurred_cells(np.random.default_rng(0), shape=(20, 20))
    Image.fromarray(image).save(tmp_path / "c.png")
    status, out, err = run([tmp_path / "c.png", "--partial-volume", *options], capsys)
    assert status == 2 and out == ""
    assert err.strip() == f"error: usage: --partial-volume does not combine with {why}" or (
        err.startswith("error: usage: --partial-volume does not combine with " + why)
        and len(err.strip().splitlines()) == 1
    )


@pytest.mark.parametrize(
    "overrides, flag, why",
    [
        (dict(partial_volume=True, covariance_type="tied"), "--partial-volume", "of tissues"),
        (dict(bias_field=True), "--bias-field", "without the field first"),
    ],
)
def test_a_number_of_components_is_asked_for_alike_by_the_api_and_the_command_line(
    tmp_path, capsys, overrides, flag, why
):
    """n_components "auto" with partial volume or a bias field: one rule (check_components)
    refuses it in the API (an OptionClash naming n_components) and as -k auto on the command
    line (a usage error, before any image is read)."""
    image, _, _ = blurred_cells(np.random.default_rng(0), shape=(20, 20))
    with pytest.raises(seg.OptionClash, match=f"n_components='auto': .*{why}"):
        seg.segment_image(image, "auto", **overrides)
    extra = ["--covariance", "tied"] if flag == "--partial-volume" else []
    status, out, err = run([tmp_path / "missing.png", flag, *extra, "-k", "auto"], capsys)
    assert status == 2 and out == ""
    assert err.startswith(f"error: usage: {flag} does not combine with -k auto: ") and why in err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            dict(partial_volume=True, covariance_type="full"),
            "partial_volume does not combine with covariance_type='full'",
        ),
        (
            dict(partial_volume=True, covariance_type="tied", quantized=True),
            "partial_volume does not combine with quantized=True",
        ),
        (dict(bias_field=True, quantized=True), "bias_field does not combine with quantized=True"),
    ],
)
def test_options_that_cannot_work_together_are_refused_by_the_api_too(overrides, message):
    """SegmentOptions checks the combinations itself (OPTION_CLASHES): the API refuses what the
    command line refuses, before any work; a bias field with bins was fitted silently before."""
    image, _, _ = blurred_cells(np.random.default_rng(0), shape=(20, 20))
    with pytest.raises(ValueError, match=re.escape(message)):
        seg.segment_image(image, 3, **overrides)
    with pytest.raises(seg.OptionClash):
        seg.segment_options(**overrides)


# --- a variance for each tissue, tied by a prior (--variance-prior) -----------------------


TRUE_MEANS = (0.2, 0.55, 0.85)
TRUE_WEIGHTS = (0.2, 0.3, 0.3, 0.05, 0.05, 0.05, 0.05)


def drawn_from_the_model(rng, variances, n=60_000):
    """Intensities drawn from a partial-volume mixture with a variance each tissue: pure
    tissues and mixels at MIXEL_FRACTIONS, each a sum of its tissues' independent parts
    (variance sum_t F_gt s_t)."""
    pv = seg.tissues_and_mixels(3)
    g = rng.choice(len(pv.fractions), size=n, p=TRUE_WEIGHTS)
    f = pv.fractions[g]
    return f @ np.asarray(TRUE_MEANS) + rng.normal(size=n) * np.sqrt(f @ np.asarray(variances))


def fit_points(x, **options):
    data = seg._PointFeatures(x[:, None], np.ones(len(x)))
    return seg.fit_components(data, 3, seg.FitOptions(**options), with_partial_volume=True)


def test_each_tissues_variance_is_recovered_and_the_map_objective_never_falls():
    """Drawn from the model with variances 4 : 25 : 9 (as CSF, grey and white matter's noise
    differ), the fit without a prior finds each within 10 % (grey matter, overlapped by both
    mixels, varies most from draw to draw), with a log-likelihood above the truth's; the
    mixels' variances are their shares of them, and the objective (the log-likelihood, with a
    prior plus the prior) never falls."""
    truth = np.array([0.02, 0.05, 0.03]) ** 2
    x = drawn_from_the_model(np.random.default_rng(5), truth)
    for nu in (0.0, 0.1):
        # reg_covar 0: the M-step is exact (reg_covar, added after it, can lower the objective
        # by ~1e-8 near the end, as for any mixture; fell_at records it)
        model = fit_points(x, covariance_type="tied", variance_prior=nu, reg_covar=0.0)
        pv = model.partial_volume
        assert model.covariance_type == "spherical" and pv.variance_prior == nu
        assert np.allclose(model.covariances, pv.fractions @ model.covariances[:3], rtol=1e-12)
        assert np.allclose(model.means, pv.fractions @ model.means[:3], rtol=0, atol=1e-12)
        history = np.array(model.log_likelihood)
        assert np.all(np.diff(history) >= -1e-12) and model.converged
        if nu == 0:
            assert model.covariances[:3] == pytest.approx(truth, rel=0.1)
            true_model = replace(
                model,
                weights=np.array(TRUE_WEIGHTS),
                means=pv.fractions @ np.array(TRUE_MEANS)[:, None],
                covariances=pv.fractions @ truth,
            )
            assert model.score(x[:, None]) > true_model.score(x[:, None])
    shrunk = model.covariances[:3]
    assert truth[0] < shrunk[0] and shrunk[1] < truth[1]  # drawn towards a shared variance
    assert model.log_likelihood[-1] == pytest.approx(
        model.score(x[:, None]) + seg.tissue_variances_log_prior(shrunk, 0.1), abs=1e-9
    )


def test_a_strong_prior_is_one_covariance_and_the_prior_peaks_where_all_are_equal():
    """As its strength grows the variances become one: the fit is the tied fit's (the prior
    is flat in the shared variance's scale); the prior is 0 at equal variances, below 0 else,
    and largest at the harmonic mean."""
    x = drawn_from_the_model(np.random.default_rng(6), np.array([0.02, 0.06, 0.04]) ** 2)
    tied, strong = (
        fit_points(x, covariance_type="tied"),
        fit_points(x, covariance_type="tied", variance_prior=1e6),
    )
    assert strong.covariances == pytest.approx(np.full(7, tied.covariances[0, 0]), rel=1e-4)
    assert strong.means == pytest.approx(tied.means, abs=1e-4)  # both to tol
    assert seg.tissue_variances_log_prior(np.full(3, 0.01), 2.0) == 0.0
    s = np.array([0.01, 0.04, 0.02])
    assert seg.tissue_variances_log_prior(s, 2.0) < 0
    shared = 3 / np.sum(1 / s)  # the maximum over the shared variance, by hand
    by_hand = [-(s2 / s - np.log(s2 / s) - 1).sum() for s2 in shared * np.array([0.9, 1, 1.1])]
    assert np.argmax(by_hand) == 1
    assert seg.tissue_variances_log_prior(s, 2.0) == pytest.approx(by_hand[1])


def test_the_variances_m_step_raises_the_expected_objective():
    """For any responsibilities the M-step (tissues' means at the previous variances, then the
    variance components' EM) raises the expected complete log-likelihood plus the prior, and
    more steps of it reach a point where no small move of a tissue's variance gains."""
    rng = np.random.default_rng(3)
    x = rng.random(400)
    resp = rng.dirichlet(np.ones(7), size=400).T * rng.random(400)
    pv = seg.tissues_and_mixels(3, variance_prior=0.3)
    data = seg._PointFeatures(x[:, None], np.ones(400))
    stats = sum(resp[:, s : s + phi.shape[1]] @ phi.T for s, phi, _ in data.blocks())
    centred = data.uncentred(np.zeros((7, 1)))  # the data's centre, as the EM sees it

    def expected(tissue_means, tissue_variances):
        mu, v = pv.fractions @ tissue_means, pv.fractions @ tissue_variances
        logp = (
            -0.5 * np.log(2 * np.pi * v)[:, None] - 0.5 * (x[None] - mu[:, None]) ** 2 / v[:, None]
        )
        prior = seg.tissue_variances_log_prior(tissue_variances, 0.3) * resp.sum()
        return float(np.sum(resp * logp)) + prior

    start_means, start = np.array([0.2, 0.5, 0.8]), np.array([0.02, 0.05, 0.03])
    previous = (data.centred(pv.fractions @ start_means[:, None]), pv.fractions @ start)
    _, means, variances = seg._partial_volume_m_step(stats, pv, 0.0, *previous)
    tissue_means = data.uncentred(means)[:3, 0]
    assert expected(tissue_means, variances[:3]) > expected(start_means, start)
    assert np.allclose(variances, pv.fractions @ variances[:3], rtol=1e-12)
    for _ in range(300):  # the variances' steps to their limit, the means held
        previous = (means, variances)
        _, means, variances = seg._partial_volume_m_step(stats, pv, 0.0, *previous)
    best = expected(data.uncentred(means)[:3, 0], variances[:3])
    for t in range(3):
        for factor in (0.99, 1.01):
            moved = variances[:3].copy()
            moved[t] *= factor
            assert expected(data.uncentred(means)[:3, 0], moved) < best
    assert centred.shape == (7, 1)


def test_a_saved_variance_each_model_labels_its_image_again(tmp_path, capsys):
    """A variance each tissue is recorded as a spherical model with its prior's strength; --model
    labels its image again alike; a record whose mixels' variances are not their tissues'
    shares, or without the strength, or with a negative one, is a one-line error."""
    image, _, _ = blurred_cells(np.random.default_rng(5))
    Image.fromarray(image).save(tmp_path / "cells.png")
    options = ["-k", "3", "--covariance", "tied", "--partial-volume"]
    status, _, err = run(
        [tmp_path / "cells.png", *options, "--variance-prior", "0.3", "--out", tmp_path / "a"],
        capsys,
    )
    assert status == 0, err
    record = record_of(tmp_path / "a", "cells")
    assert record["covariance_type"] == "spherical" and len(record["covariances"]) == 7
    assert record["partial_volume"]["variance_prior"] == 0.3
    assert record["settings"]["variance_prior"] == 0.3
    model = seg.GaussianMixtureFit.from_record(record)
    assert model.partial_volume.variance_prior == 0.3
    status, _, err = run(
        [
            tmp_path / "cells.png",
            "--model",
            tmp_path / "a" / "cells_model.json",
            "--out",
            tmp_path / "b",
        ],
        capsys,
    )
    assert status == 0, err
    first, again = (np.asarray(Image.open(tmp_path / d / "cells_labels.png")) for d in ("a", "b"))
    assert np.array_equal(first, again)
    for change, message in [
        (lambda r: r["covariances"].__setitem__(4, 2 * r["covariances"][4]), "not their tissues'"),
        (lambda r: r["partial_volume"].pop("variance_prior"), "a variance_prior and a variance"),
        (lambda r: r["partial_volume"].__setitem__("variance_prior", -1), "not a number >= 0"),
    ]:
        bad = __import__("copy").deepcopy(record)
        change(bad)
        with pytest.raises(ValueError, match=message):
            seg.GaussianMixtureFit.from_record(bad)


def test_a_variance_each_tissue_in_colour(tmp_path, capsys):
    """In colour a tissue's variance is the same in each channel: the fit's objective (the
    log-likelihood plus the prior, reg_covar 0) never falls, and the saved model labels its
    image again alike."""
    rng = np.random.default_rng(0)
    image, _, _ = blurred_cells(rng, shape=(40, 50))
    channels = np.stack([image, image / 2 + 60, 255.0 - image], axis=-1)
    colour = np.clip(np.rint(channels + rng.normal(0, 6, channels.shape)), 0, 255).astype(np.uint8)
    data = seg._PointFeatures(colour.reshape(-1, 3) / 255.0, np.ones(image.size))
    options = seg.FitOptions(covariance_type="tied", variance_prior=0.1, reg_covar=0.0)
    model = seg.fit_components(data, 3, options, with_partial_volume=True)
    assert model.covariance_type == "spherical" and model.covariances.shape == (7,)
    assert np.allclose(model.covariances, model.partial_volume.fractions @ model.covariances[:3])
    assert np.all(np.diff(model.log_likelihood) >= -1e-12) and model.converged
    prior = seg.tissue_variances_log_prior(model.covariances[:3], 0.1)
    score = model.score(colour.reshape(-1, 3) / 255.0)
    assert model.log_likelihood[-1] == pytest.approx(score + prior, abs=1e-9)
    Image.fromarray(colour).save(tmp_path / "c.png")
    flags = ["--partial-volume", "--covariance", "tied", "--variance-prior", "0.1"]
    status, _, err = run([tmp_path / "c.png", *flags, "--out", tmp_path / "a"], capsys)
    assert status == 0, err
    saved = tmp_path / "a" / "c_model.json"
    status, _, err = run([tmp_path / "c.png", "--model", saved, "--out", tmp_path / "b"], capsys)
    assert status == 0, err
    first, again = (np.asarray(Image.open(tmp_path / d / "c_labels.png")) for d in ("a", "b"))
    assert np.array_equal(first, again)

"""Better segmentations than a per-pixel mixture: the quantized gray model and the spatial prior."""

import numpy as np
import pytest
from conftest import (
    CLIPPED,
    bayes_of_levels,
    biased_phantom,
    clipped_image,
    matched_accuracy,
    noisy_scene,
    random_responsibilities,
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


@pytest.mark.parametrize("n_features", [1, 3], ids=["gray", "color"])
def test_spatial_prior_beats_the_per_pixel_bayes_limit(rng, n_features):
    image, labels, bayes = noisy_scene(n_features, rng)
    assert 0.90 <= bayes <= 0.95
    smoothed, _, _ = seg.segment_image(image, 3, spatial=1.0)
    assert matched_accuracy(smoothed, labels, 3) >= bayes + 0.02
    plain, _, _ = seg.segment_image(image, 3)
    assert matched_accuracy(plain, labels, 3) <= bayes + 0.001  # alone, no pixel can do better


@pytest.mark.parametrize("quantized", [False, True])
def test_spatial_objective_never_decreases(rng, quantized):
    image, _, _ = noisy_scene(1, rng)
    picture = seg.picture_from_array(image)
    result = seg.segment_points(
        picture,
        seg.distinct_values(picture),
        3,
        fit=seg.FitOptions(tol=0, max_iter=30),
        spatial=0.7,
        quantized=quantized,
    )
    objective = np.asarray(result.spatial.objective)
    assert len(objective) == 30 == result.spatial.n_iter and not result.spatial.converged
    assert np.all(np.diff(objective) >= -1e-7)  # q is float32: round-off at that level
    assert (result.model.quantized_top is not None) == quantized
    assert result.labels.shape == image.shape and result.labels.max() < 3
    assert np.all(np.diff(seg.luminance(result.model.means)) >= 0)  # still numbered darkest first


def test_spatial_on_the_command_line(tmp_path, rng, capsys):
    image, labels, bayes = noisy_scene(3, rng)
    Image.fromarray(image).save(tmp_path / "scene.png")
    status, out, err = run(
        [tmp_path / "scene.png", "-k", "3", "--spatial", "1", "--out", tmp_path], capsys
    )
    assert status == 0, err
    record = record_of(tmp_path, "scene")
    assert record["settings"]["spatial"] == 1.0 and record["spatial"]["beta"] == 1.0
    assert len(record["spatial"]["objective"]) == record["spatial"]["n_iter"]
    found = np.asarray(Image.open(tmp_path / "scene_labels.png"))
    assert matched_accuracy(found, labels, 3) >= bayes + 0.02
    assert record["spatial"]["converged"]
    assert record["spatial"]["em_steps"] == record["spatial"]["n_iter"]
    assert 2 <= record["spatial"]["full_sweeps"] <= record["spatial"]["n_iter"]
    partial = record["spatial"]["partial_sweeps"]
    assert len(partial) + record["spatial"]["full_sweeps"] == record["spatial"]["n_iter"]
    with pytest.raises(SystemExit) as exit_info:
        seg.main([str(tmp_path / "scene.png"), "--spatial", "-1", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def test_spatial_with_a_shared_model_keeps_the_model(tmp_path, rng, capsys):
    for name in ("a", "b"):
        Image.fromarray(noisy_scene(1, rng)[0]).save(tmp_path / f"{name}.png")
    run([tmp_path, "--shared", "-k", "3", "--out", tmp_path / "plain"], capsys)
    status, out, err = run(
        [tmp_path, "--shared", "-k", "3", "--spatial", "1", "--out", tmp_path / "smooth"], capsys
    )
    assert status == 0, err
    for name in ("a", "b"):
        plain = record_of(tmp_path / "plain", name)
        smooth = record_of(tmp_path / "smooth", name)
        assert plain["means"] == smooth["means"] and smooth["shared"]
        assert not np.array_equal(
            np.asarray(Image.open(tmp_path / "plain" / f"{name}_labels.png")),
            np.asarray(Image.open(tmp_path / "smooth" / f"{name}_labels.png")),
        )


@pytest.mark.parametrize("shape", [(7, 9), (8, 5), (1, 6), (5, 1)])
@pytest.mark.parametrize("beta", [0.0, 1.5])
@pytest.mark.parametrize("with_mask", [False, True])
def test_the_sweep_reports_the_objective_it_reaches(rng, shape, beta, with_mask):
    """What a sweep computes on the way (the entropy, the pairs as the white sites are updated),
    plus the expected log-likelihood, is the mean-field objective of its result, never below the
    start's; outside a mask q stays 0; the row bands a sweep works in do not change its result."""
    n_components, n_points = 3, 6
    index = rng.integers(0, n_points, shape).astype(np.uint8)
    table = rng.normal(size=(n_components, n_points)).astype(np.float32)
    mask = rng.random(shape) < 0.7 if with_mask else None
    site_logp = seg._looked_up(table, index)
    start = random_responsibilities(rng, shape, n_components)
    if with_mask:
        start[:, 1:-1, 1:-1] *= mask
    before = seg._mean_field_objective(start, beta, site_logp, seg.Passes())
    one_band = start.copy()
    reported = seg._sweep(one_band, seg.Sweep(beta, site_logp, seg.Passes(), mask))
    reported += np.sum(one_band[:, 1:-1, 1:-1] * table[:, index], dtype=np.float64)
    assert reported == pytest.approx(
        seg._mean_field_objective(one_band, beta, site_logp, seg.Passes()), 1e-6
    )
    assert reported >= before - 1e-5
    q = one_band[:, 1:-1, 1:-1]
    assert np.all(q >= 0) and np.all(one_band[:, [0, -1], :] == 0)
    assert np.all(one_band[:, :, [0, -1]] == 0)
    inside = mask if with_mask else np.ones(shape, bool)
    assert np.allclose(q.sum(axis=0)[inside], 1, atol=1e-5) and np.all(q[:, ~inside] == 0)
    banded = start.copy()
    two_rows = seg.Passes(band_bytes=1)  # bands of two rows
    swept = seg._sweep(banded, seg.Sweep(beta, site_logp, two_rows, mask))
    assert swept + np.sum(banded[:, 1:-1, 1:-1] * table[:, index], dtype=np.float64) == (
        pytest.approx(reported, 1e-9)
    )
    assert np.array_equal(banded, one_band)


def test_without_a_prior_a_sweep_reaches_the_posterior(rng):
    """BETA = 0: every site's update is its posterior; from the posterior a sweep stays there, and
    its entropy plus the expected log-likelihood is the log-likelihood."""
    index = rng.integers(0, 4, (6, 7))
    table = rng.normal(size=(2, 4)).astype(np.float32)
    padded = np.zeros((2, 8, 9), np.float32)
    seg._posterior_start(padded, seg._looked_up(table, index), None, seg.Passes())
    posterior = padded.copy()
    loglik = np.logaddexp(table[0], table[1])[index].sum()
    entropy = seg._sweep(padded, seg.Sweep(0.0, seg._looked_up(table, index), seg.Passes()))
    assert np.allclose(padded, posterior, atol=1e-6)
    expected = np.sum(padded[:, 1:-1, 1:-1] * table[:, index], dtype=np.float64)
    assert entropy + expected == pytest.approx(loglik)


def table_grid(index, n_points):
    """The spatial fit of points 0..n_points-1 (their values do not matter to a sweep)."""
    data = seg._PointFeatures(np.arange(n_points, dtype=np.float64), np.ones(n_points))
    return seg.PointsMeanField(data, index, None, 0.0, seg.FitOptions(), seg.SpatialSettings())


@pytest.mark.parametrize("beta", [0.0, 1.5])
@pytest.mark.parametrize("relaxation", [1.0, 1.7])
def test_a_partial_sweep_reports_what_it_changes(rng, beta, relaxation):
    """Sweeping some sites leaves the others' q as it was; the change it reports of L's entropy
    and pair terms and of the per-point sums is what they are after it, computed afresh; L does
    not fall; the sites reported moved are the swept ones whose q moved more than ACTIVE_CHANGE;
    and a partial sweep of every site is the full sweep."""
    # several blocks a colour, their sums added a few blocks at a time
    settings = seg.SpatialSettings(partial_chunk=8, partial_batch=10)
    sweep = seg.Sweep(beta, None, seg.Passes(), relaxation=relaxation, settings=settings)
    shape, n_components, n_points = (9, 11), 3, 6
    index = rng.integers(0, n_points, shape).astype(np.uint8)
    table = rng.normal(size=(n_components, n_points)).astype(np.float32)
    grid = table_grid(index, n_points)
    start = random_responsibilities(rng, shape, n_components)
    start[:, 1:-1, 1:-1] += 0.2 * start[:, 1:-1, 1:-1] ** 2  # some sites far from q*, some near
    start[:, 1:-1, 1:-1] /= start[:, 1:-1, 1:-1].sum(axis=0)
    sites = np.flatnonzero(rng.random(shape) < 0.4)
    padded = start.copy()
    change, change_of_sums, moved = seg._partial_sweep(padded, sweep, table, index, sites)
    before, after = start[:, 1:-1, 1:-1], padded[:, 1:-1, 1:-1]
    resting = np.ones(index.size, bool)
    resting[sites] = False
    flat_before, flat_after = before.reshape(3, -1), after.reshape(3, -1)
    assert np.array_equal(flat_after[:, resting], flat_before[:, resting])
    assert np.all(padded[:, [0, -1], :] == 0) and np.all(padded[:, :, [0, -1]] == 0)
    terms_before = seg._prior_terms(start, beta, seg.Passes())
    terms_after = seg._prior_terms(padded, beta, seg.Passes())
    assert terms_before + change == pytest.approx(terms_after, abs=1e-5)
    sums_before = grid.point_sums(before)
    assert np.allclose(sums_before + change_of_sums, grid.point_sums(after), rtol=0, atol=1e-12)
    objective_before = terms_before + np.sum(sums_before * table, dtype=np.float64)
    assert terms_after + np.sum(grid.point_sums(after) * table) >= objective_before - 1e-5
    moved_by = np.abs(flat_after - flat_before).max(axis=0)
    assert np.array_equal(np.sort(moved), sites[moved_by[sites] > settings.active_change])
    everywhere, full = start.copy(), start.copy()
    seg._partial_sweep(everywhere, sweep, table, index, np.arange(index.size))
    looked_up = seg._looked_up(table, index)
    seg._sweep(full, seg.Sweep(beta, looked_up, seg.Passes(), relaxation=relaxation))
    assert np.allclose(everywhere, full, rtol=0, atol=1e-6)


@pytest.mark.parametrize("with_mask", [False, True])
def test_the_sites_around_some_sites(rng, with_mask):
    """_around (from a list of sites) and Plane.dilate (of a mask of them, in place, in row bands)
    give the same sites: those and their 4-neighbours in the image, inside the mask."""
    shape = (7, 10)
    chosen = np.zeros(shape, bool)
    chosen[0, 0] = chosen[-1, -1] = chosen[3, 0] = chosen[5, -1] = chosen[4, 4] = True
    inside = rng.random(shape) < 0.7 if with_mask else None
    expected = chosen.copy()
    expected[1:] |= chosen[:-1]
    expected[:-1] |= chosen[1:]
    expected[:, 1:] |= chosen[:, :-1]
    expected[:, :-1] |= chosen[:, 1:]
    if with_mask:
        expected &= inside
    dilated = chosen.copy()
    seg.PLANE.dilate(dilated, inside, seg.Passes(band_bytes=1))  # in bands of two rows
    assert np.array_equal(dilated, expected)
    assert np.array_equal(
        seg._around(np.flatnonzero(chosen), shape, inside), np.flatnonzero(expected)
    )


@pytest.mark.slow
def test_partial_sweeps_reach_the_maximum_of_full_sweeps():
    """Sweeping only the sites near the last moves reaches the objective and labels of sweeping
    every site every time, with fewer sweeps of every site; a converged run's last two
    iterations swept every site (the stopping rule counts no partial sweep)."""
    from skimage import data

    small = Image.fromarray(data.camera()).resize((256, 256), Image.BICUBIC)
    picture = seg.picture_from_array(np.asarray(small.resize((512, 512), Image.BICUBIC)))
    points = seg.distinct_values(picture)
    partial = seg.segment_points(picture, points, 3, spatial=1.0)
    never_partial = seg.SpatialSettings(max_active_fraction=0.0)
    full = seg.segment_points(picture, points, 3, spatial=1.0, spatial_settings=never_partial)
    assert partial.spatial.converged and full.spatial.converged
    n_iter, some = partial.spatial.n_iter, partial.spatial.partial_sweeps
    assert some and some == sorted(set(some)) and 1 < some[0] and some[-1] <= n_iter - 2
    assert len(some) + partial.spatial.full_sweeps == n_iter
    assert full.spatial.full_sweeps == full.spatial.n_iter and not full.spatial.partial_sweeps
    assert partial.spatial.objective[-1] == pytest.approx(full.spatial.objective[-1], abs=1e-6)
    assert np.mean(partial.labels == full.labels) >= 0.999


@pytest.mark.slow
def test_over_relaxation_takes_fewer_iterations_to_the_same_maximum():
    """On smooth ramps (camera enlarged) mean-field boundaries crawl; the adaptively
    over-relaxed sweep (the default) gets there in fewer iterations, to the same objective and
    labels; on a noisy scene that converges fast anyway it costs at most two iterations more
    (where the gains are round-off).  Every sweep updates every site here: this is about the
    update, not about which sites rest.  (How many fewer: tools/benchmark.py.)"""
    from skimage import data

    small = Image.fromarray(data.camera()).resize((256, 256), Image.BICUBIC)
    image = np.asarray(small.resize((512, 512), Image.BICUBIC))
    fast, _, _ = noisy_scene(1, np.random.default_rng(0))
    runs = {}
    for most in (seg.SpatialSettings.max_over_relaxation, 1.0):  # 1.0: the plain update
        settings = seg.SpatialSettings(max_active_fraction=0.0, max_over_relaxation=most)
        for name, scene in (("ramps", image), ("noisy", fast)):
            picture = seg.picture_from_array(scene)
            runs[name, most > 1] = seg.segment_points(
                picture, seg.distinct_values(picture), 3, spatial=1.0, spatial_settings=settings
            )
    for name in ("ramps", "noisy"):
        relaxed, plain = runs[name, True], runs[name, False]
        assert relaxed.spatial.converged and plain.spatial.converged
        assert relaxed.spatial.objective[-1] == pytest.approx(plain.spatial.objective[-1], abs=1e-6)
        assert np.mean(relaxed.labels == plain.labels) >= 0.999
    assert runs["ramps", True].spatial.n_iter < runs["ramps", False].spatial.n_iter
    assert runs["noisy", True].spatial.n_iter <= runs["noisy", False].spatial.n_iter + 2


@pytest.mark.slow
def test_threads_do_not_change_a_bit():
    """The row bands of a pass run on Passes.threads threads; the results are summed in band
    order, so one thread and several give the same objective, labels and field to the last
    digit."""
    _, biased, _, inside, _ = biased_phantom(np.random.default_rng(3), shape=(150, 130))
    picture = seg.with_mask(seg.picture_from_array(biased), inside)
    points = seg.distinct_values(picture)
    many_chunks = seg.SpatialSettings(partial_chunk=64)  # many chunks of a partial sweep
    runs = []
    for threads in (1, 3):
        many_bands = seg.Passes(threads=threads, band_bytes=1 << 12)  # even on a small image
        options = seg.SegmentOptions(
            spatial=1.0, spatial_settings=many_chunks, fit=seg.FitOptions(passes=many_bands)
        )
        runs.append(
            (
                seg.segment_points(picture, points, 3, options),
                seg.segment_points(picture, points, 3, options, bias_field=True, spatial=0.5),
            )
        )
    for one, several in zip(*runs):
        assert one.spatial.n_iter > 3 and one.spatial.converged
        assert one.spatial.objective == several.spatial.objective
        assert np.array_equal(one.labels, several.labels)
        assert one.model.log_likelihood == several.model.log_likelihood
    assert np.array_equal(runs[0][1].bias.coefficients, runs[1][1].bias.coefficients)


def test_the_e_steps_blocks_on_threads_give_the_same_bits():
    """The E-step on more points than a block (BLOCK_POINTS) runs its blocks on the passes'
    threads and adds them up in block order: fit_gmm on one thread and on three ends at the
    same parameters and log-likelihoods to the last bit, through SQUAREM's steps."""
    rng = np.random.default_rng(7)
    X = np.concatenate([rng.normal(m, 0.12, (20_000, 3)) for m in (0.35, 0.5, 0.65)])
    assert len(X) > 3 * seg.BLOCK_POINTS
    fits = [
        seg.fit_gmm(X, 3, random_state=1, passes=seg.Passes(threads=threads)) for threads in (1, 3)
    ]
    assert fits[0].n_iter > 2 and fits[0].log_likelihood == fits[1].log_likelihood
    for name in ("weights", "means", "covariances"):
        assert np.array_equal(getattr(fits[0], name), getattr(fits[1], name))


def test_colours_are_counted_alike_on_any_number_of_threads(rng):
    """A large colour image's histogram is counted in parts of `chunk` pixels, on the threads
    there are, and merged; an image of mostly distinct colours (whose parts' histograms would
    cost as much to merge) in one piece: either way the same codes and counts as np.unique,
    with any number of threads."""
    for levels in (4, 256):  # 9,900 pixels in parts of 1,000
        picture = seg.picture_from_array(rng.integers(0, levels, (90, 110, 3)).astype(np.uint8))
        expected = np.unique(picture.codes, return_counts=True)
        for threads in (1, 2, 3, 7):
            passes = seg.Passes(threads=threads)
            keys, counts = seg.code_histogram(picture.codes, 1 << 24, passes, chunk=1000)
            assert np.array_equal(keys, expected[0]) and np.array_equal(counts, expected[1])
            assert counts.dtype == np.int64

"""--spatial: the Potts prior's mean-field EM, its sweeps (full, partial, over-relaxed) and what
they report."""

import numpy as np
import pytest
from conftest import (
    matched_accuracy,
    noisy_scene,
    random_responsibilities,
    record_of,
    run,
    seg,
)
from PIL import Image


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

"""Masked scans (--mask), posterior probability maps (--probabilities) and the brain MRI sample."""

import numpy as np
import pytest
from conftest import ROOT, biased_phantom, matched_accuracy, phantom, record_of, run, seg
from PIL import Image


def test_outside_pixels_never_change_the_model(tmp_path, rng, capsys):
    image, labels, inside = phantom(rng)
    Image.fromarray((inside * 255).astype(np.uint8)).save(tmp_path / "mask.png")
    other = image.copy()
    other[~inside] = rng.integers(0, 256, size=int((~inside).sum()))  # outside: anything at all
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(other).save(tmp_path / "b.png")
    status, out, err = run(
        [
            tmp_path / "a.png",
            tmp_path / "b.png",
            "--mask",
            tmp_path / "mask.png",
            "-k",
            "3",
            "--out",
            tmp_path / "o",
        ],
        capsys,
    )
    assert status == 0, err
    a, b = record_of(tmp_path / "o", "a"), record_of(tmp_path / "o", "b")
    for key in ("weights", "means", "covariances", "log_likelihood"):
        assert a[key] == b[key]
    assert a["inside_pixels"] == int(inside.sum()) and a["mask"] == str(tmp_path / "mask.png")
    la = np.asarray(Image.open(tmp_path / "o" / "a_labels.png"))
    lb = np.asarray(Image.open(tmp_path / "o" / "b_labels.png"))
    assert (
        np.array_equal(la, lb)
        and np.all(la[~inside] == 0)
        and set(np.unique(la[inside])) == {1, 2, 3}
    )
    assert np.all(np.asarray(Image.open(tmp_path / "o" / "b_segmented.png"))[~inside] == 0)
    truth = np.where(inside, labels + 1, 0)
    assert matched_accuracy(la[inside] - 1, truth[inside] - 1, 3) > 0.95


def test_the_api_mask_is_the_same_fit(rng):
    image, _, inside = phantom(rng)
    by_array = seg.segment_image(image, 3, mask=inside)
    by_nonzero = seg.segment_image(image, 3, mask="nonzero")
    assert np.array_equal(by_array[0], by_nonzero[0])
    np.testing.assert_array_equal(by_array[2].means, by_nonzero[2].means)
    unmasked = seg.segment_image(image, 3)[2]
    assert unmasked.means.min() < 0.05  # without the mask, one component is the background
    assert by_array[2].means.min() > 0.2
    with pytest.raises(ValueError, match="no inside pixel"):
        seg.segment_image(image, 3, mask=np.zeros_like(inside))
    with pytest.raises(ValueError, match="the mask is 3x2 pixels"):
        seg.segment_image(image, 3, mask=np.ones((2, 3)))


def test_auto_mask_only_where_the_border_is_black(tmp_path, rng, capsys):
    image, _, inside = phantom(rng)
    Image.fromarray(image).save(tmp_path / "scan.png")
    framed = image.copy()
    framed[0, 0] = 7  # one border pixel that is not 0
    Image.fromarray(framed).save(tmp_path / "photo.png")
    status, out, err = run(
        [tmp_path / "scan.png", tmp_path / "photo.png", "-k", "3", "--out", tmp_path / "o"], capsys
    )
    assert status == 0, err
    scan, photo = record_of(tmp_path / "o", "scan"), record_of(tmp_path / "o", "photo")
    assert scan["mask"] == "auto" and scan["inside_pixels"] == int(inside.sum())
    assert photo["mask"] is None and photo["inside_pixels"] == image.size
    assert f"note: {tmp_path / 'scan.png'}: the border is entirely 0: segmenting the" in err
    status, out, err = run(
        [tmp_path / "scan.png", "--mask", "none", "-k", "3", "--out", tmp_path / "n"], capsys
    )
    assert record_of(tmp_path / "n", "scan")["mask"] is None


def test_bad_masks_fail_that_image_in_one_line(tmp_path, rng, capsys):
    image, _, _ = phantom(rng)
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(np.ones((5, 5), np.uint8)).save(tmp_path / "small.png")
    Image.fromarray(np.zeros(image.shape, np.uint8)).save(tmp_path / "empty.png")
    for mask, words in (
        ("small.png", "the mask is 5x5 pixels, the image 100x80"),
        ("empty.png", "the mask has no inside pixel"),
        ("missing.png", "mask"),
    ):
        status, out, err = run(
            [tmp_path / "a.png", "--mask", tmp_path / mask, "--out", tmp_path / "o"], capsys
        )
        lines = err.strip().splitlines()
        assert (
            status == 1
            and lines[0].startswith(f"error: {tmp_path / 'a.png'}: ")
            and words in lines[0]
        )
        assert len(lines) == 2 and "Traceback" not in err


@pytest.mark.parametrize(
    "options",
    [[], ["--spatial", "1"], ["--quantized"], ["-k", "auto", "--k-max", "4"]],
    ids=["plain", "spatial", "quantized", "auto"],
)
def test_probability_maps(tmp_path, rng, capsys, options):
    image, _, inside = phantom(rng)
    Image.fromarray(image).save(tmp_path / "p.png")
    k = [] if "-k" in options else ["-k", "3"]
    status, out, err = run(
        [tmp_path / "p.png", "--probabilities", *k, *options, "--out", tmp_path], capsys
    )
    assert status == 0, err
    record = record_of(tmp_path, "p")
    labels = np.asarray(Image.open(tmp_path / "p_labels.png"))
    maps = [Image.open(tmp_path / f"p_prob_{label}.png") for label in range(1, record["k"] + 1)]
    assert (
        not (tmp_path / "p_prob_0.png").exists()
        and not (tmp_path / f"p_prob_{record['k'] + 1}.png").exists()
    )
    assert all(m.mode.startswith("I;16") for m in maps)
    stack = np.stack([np.asarray(m).astype(np.int64) for m in maps])
    assert np.all(stack[:, ~inside] == 0)
    assert np.all(np.abs(stack[:, inside].sum(axis=0) - 65535) <= record["k"])
    assert np.mean((stack.argmax(axis=0) + 1)[inside] == labels[inside]) > 0.999


def test_shared_batch_of_masked_scans(tmp_path, rng, capsys):
    for name in ("a", "b"):
        Image.fromarray(phantom(rng)[0]).save(tmp_path / f"{name}.png")
    status, out, err = run(
        [tmp_path, "--shared", "-k", "3", "--mask", "nonzero", "--out", tmp_path / "o"], capsys
    )
    assert status == 0, err
    a, b = record_of(tmp_path / "o", "a"), record_of(tmp_path / "o", "b")
    assert a["means"] == b["means"] and min(m[0] for m in a["means"]) > 0.2


def test_the_default_run_segments_the_brain_sample_into_three_tissues(tmp_path, capsys):
    """images/brain_t1.png: the black border makes the mask, K = 3 is CSF, grey and white matter."""
    path = ROOT / "images" / "brain_t1.png"
    status, out, err = run([path, "--out", tmp_path], capsys)
    assert status == 0, err
    record = record_of(tmp_path, "brain_t1")
    image = np.asarray(Image.open(path))
    assert record["mask"] == "auto" and record["inside_pixels"] == np.count_nonzero(image)
    assert record["k"] == 3 and record["converged"]
    labels = np.asarray(Image.open(tmp_path / "brain_t1_labels.png"))
    fractions = np.bincount(labels[image > 0], minlength=4)[1:] / np.count_nonzero(image)
    assert fractions.min() > 0.05  # CSF (8.5 %), grey and white matter, each a real share
    means = [m[0] * 255 for m in record["means"]]
    assert means[0] < image[image > 0].mean() < means[2]


# --- --bias-field ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rician", [False, True], ids=["gaussian", "rician"])
def test_bias_field_recovers_the_field_and_the_accuracy(rng, rician):
    clean, biased, labels, inside, field = biased_phantom(rng, rician=rician)
    assert field[inside].max() / field[inside].min() > 1.4  # a real field, +-20 % and more
    reference = matched_accuracy(
        seg.segment_image(clean, 3, mask=inside)[0][inside] - 1, labels[inside], 3
    )
    without = matched_accuracy(
        seg.segment_image(biased, 3, mask=inside)[0][inside] - 1, labels[inside], 3
    )
    picture = seg.with_mask(seg.picture_from_array(biased), inside)
    segmentation = seg.segment_points(picture, seg.distinct_values(picture), 3, bias_field=True)
    found = seg.label_map(segmentation)
    with_field = matched_accuracy(found[inside] - 1, labels[inside], 3)
    assert without < reference - 0.02  # the field costs accuracy ...
    assert with_field >= reference - 0.01  # ... and the fit wins it back
    estimated = np.log(segmentation.bias.image()[inside])
    assert np.corrcoef(estimated, np.log(field[inside]))[0, 1] >= 0.95
    history = segmentation.model.log_likelihood
    assert segmentation.model.converged and np.all(np.diff(history) >= -1e-9)


@pytest.mark.parametrize("constant", [1.0, 0.8])
def test_a_constant_field_gives_the_plain_fit(rng, constant):
    """A constant field is no field (the means hold the scale): the fit keeps its start, the
    plain mixture of the intensities, and its field is 1 (under 2 % anywhere)."""
    clean, _, labels, inside, _ = biased_phantom(rng)
    scaled = np.clip(np.rint(clean * constant), 0, 255).astype(np.uint8)
    picture = seg.with_mask(seg.picture_from_array(scaled), inside)
    points = seg.distinct_values(picture)
    with_field = seg.segment_points(picture, points, 3, bias_field=True)
    assert np.abs(np.log(with_field.bias.image()[inside])).max() < 0.02
    plain = seg.segment_points(picture, points, 3)  # the same model without a field
    assert np.mean(seg.label_map(with_field) == seg.label_map(plain)) > 0.999
    assert np.allclose(with_field.model.means, plain.model.means, rtol=0.01)
    assert np.allclose(with_field.model.covariances, plain.model.covariances, rtol=0.05)


def test_bias_field_with_the_spatial_prior(rng):
    """The prior and the field together: above the per-pixel fit, the field still found."""
    _, biased, labels, inside, field = biased_phantom(rng, sd=0.07, cell=8)
    picture = seg.with_mask(seg.picture_from_array(biased), inside)
    points = seg.distinct_values(picture)
    alone = seg.segment_points(picture, points, 3, bias_field=True)
    smooth = seg.segment_points(picture, points, 3, bias_field=True, spatial=1.0)
    accuracy = [
        matched_accuracy(seg.label_map(s)[inside] - 1, labels[inside], 3) for s in (alone, smooth)
    ]
    assert accuracy[1] >= accuracy[0] + 0.03 and accuracy[1] >= 0.98
    objective = np.asarray(smooth.spatial.objective)
    assert smooth.spatial.converged and np.all(np.diff(objective) >= -1e-6)
    assert np.corrcoef(np.log(smooth.bias.image()[inside]), np.log(field[inside]))[0, 1] >= 0.95


def test_a_large_images_field_is_fitted_on_its_coarser_grid_and_held(rng):
    """With the prior, an image past the coarsest grid fits its field and mixture on the grid
    of every other row and column, then holds them on every pixel while the labels are swept
    (as a volume's are): the full grid ends at the coarser grid's parameters.  Held without a
    table, the sweeps are those with the tabulated log-probabilities a volume uses."""
    from dataclasses import replace

    _, biased, _, inside, _ = biased_phantom(rng)
    picture = seg.with_mask(seg.picture_from_array(biased), inside)
    image = seg.bias_image(picture, seg.Passes())
    monomials = len(seg.bias_monomials(3))
    start = seg.BiasState(
        np.full(3, 1 / 3),
        np.array([0.3, 0.55, 0.8]),
        np.full(3, 0.01),
        np.zeros(monomials),
        image,
        3,
        1.0,
    )
    options, settings = seg.FitOptions(), seg.SpatialSettings(coarsest_grid_pixels=6000)
    fit = seg.BiasMeanField(image, 0.5, options, settings)
    run, coarser = seg._coarse_to_fine(fit, start)
    coarse_run, _ = seg._coarse_to_fine(fit.coarser(), start)
    held = coarse_run.state.parameters
    assert len(coarser) == 1 and run.converged and np.all(np.diff(run.history) >= -1e-9)
    assert np.array_equal(run.state.parameters.coefficients, held.coefficients)
    assert np.array_equal(run.state.parameters.means, held.means)
    # the table a volume would keep: log(w p(y | k)) less the log field, at every pixel
    on_image = replace(held, image=image)
    z, t = seg._BandModel(on_image).corrected(slice(None), slice(None))
    table = (seg._label_log_densities(on_image, z) - t).astype(np.float32)
    tabulated = seg.HeldMeanField(table, image, 0.5, options, settings)
    ends = []
    for model in (fit.held(held), tabulated):
        padded = np.zeros((3,) + tuple(s + 2 for s in image.values.shape), np.float32)
        ends.append(seg.run_em(model.start(held, padded, True), model.step, options))
    assert fit.held(held).table is None
    assert np.array_equal(ends[0].state.q.argmax(axis=0), ends[1].state.q.argmax(axis=0))
    assert ends[0].history[-1] == pytest.approx(ends[1].history[-1], rel=1e-6)


def test_a_held_images_log_probabilities_are_kept_to_the_same_bits(rng, monkeypatch):
    """On every pixel, where the coarser grid's field and mixture are held, an image's sites'
    log-probabilities are computed in the first sweep and kept for the others (within
    HELD_KEPT_BYTES): every sweep's q and objective are the same bits as computing them again
    in each sweep."""
    _, biased, _, inside, _ = biased_phantom(rng)
    picture = seg.with_mask(seg.picture_from_array(biased), inside)
    image = seg.bias_image(picture, seg.Passes(threads=2))
    start = seg.BiasState(
        np.full(3, 1 / 3),
        np.array([0.3, 0.55, 0.8]),
        np.full(3, 0.01),
        np.zeros(len(seg.bias_monomials(3))),
        image,
        3,
        1.0,
    )
    settings = seg.SpatialSettings(coarsest_grid_pixels=6000)
    fit = seg.BiasMeanField(image, 0.5, seg.FitOptions(), settings)
    kept, _ = seg._coarse_to_fine(fit, start)
    assert fit.held(start).kept == {}
    monkeypatch.setattr(seg, "HELD_KEPT_BYTES", 0)
    assert fit.held(start).kept is None
    computed, _ = seg._coarse_to_fine(fit, start)
    assert kept.n_iter == computed.n_iter > 2
    assert kept.history == computed.history
    assert np.array_equal(kept.state.q, computed.state.q)


def test_bias_field_on_the_command_line(tmp_path, rng, capsys):
    _, biased, _, inside, _ = biased_phantom(rng)
    Image.fromarray(biased).save(tmp_path / "scan.png")
    Image.fromarray(np.stack([biased] * 2 + [biased // 2], axis=-1)).save(tmp_path / "colour.png")
    status, out, err = run(
        [
            tmp_path / "scan.png",
            tmp_path / "colour.png",
            "--bias-field",
            "-k",
            "3",
            "--out",
            tmp_path / "o",
        ],
        capsys,
    )
    assert status == 0, err
    record = record_of(tmp_path / "o", "scan")
    assert record["bias_field"]["degree"] == 3 and len(record["bias_field"]["coefficients"]) == 9
    field = np.asarray(Image.open(tmp_path / "o" / "scan_bias.png")).astype(float) / 32768
    corrected = np.asarray(Image.open(tmp_path / "o" / "scan_corrected.png")).astype(float)
    assert np.all(
        np.abs(corrected[inside] - biased[inside] / field[inside]) <= 1.0 + 1e-3 * biased[inside]
    )
    assert field[inside].min() > 0.7 and field[inside].max() < 1.4
    low, high = np.percentile(field[inside], [1, 99])  # --mask auto: the brain is fitted
    assert record["bias_field"]["spread"] == pytest.approx(high / low, rel=2e-3)
    assert record["bias_field"]["restarted"] is False  # only a spatial fit starts again
    assert "--bias-field applies to 8- and 16-bit gray images; ignored here" in err
    assert not (tmp_path / "o" / "colour_bias.png").exists()
    for clash in (["--quantized"], ["-k", "auto"], ["--shared"]):
        status, out, err = run(
            [tmp_path / "scan.png", "--bias-field", *clash, "--out", tmp_path / "x"], capsys
        )
        assert status == 2 and err.startswith("error: usage: --bias-field does not combine with")


@pytest.mark.parametrize(
    "array",
    [
        np.full((1, 1), 7, np.uint8),
        np.arange(1, 241, dtype=np.uint8)[None, :],
        np.full((20, 30), 100, np.uint8),
        (np.arange(40 * 50).reshape(40, 50) % 3 * 15000 + 1000).astype(np.uint16),
    ],
    ids=["one pixel", "one row", "constant", "16-bit"],
)
def test_bias_field_on_degenerate_images(tmp_path, capsys, array):
    """Where the field's basis is degenerate on the pixels, the minimum-norm field still fits."""
    Image.fromarray(array).save(tmp_path / "d.png")
    status, out, err = run(
        [
            tmp_path / "d.png",
            "--bias-field",
            "--spatial",
            "0.5",
            "--probabilities",
            "--out",
            tmp_path / "o",
        ],
        capsys,
    )
    assert status == 0, err
    record = record_of(tmp_path / "o", "d")
    assert np.all(np.isfinite(record["bias_field"]["coefficients"]))
    assert np.all(np.isfinite(record["log_likelihood"]))
    assert Image.open(tmp_path / "o" / "d_bias.png").size == array.shape[::-1]


def test_bias_field_at_heavier_noise_reaches_the_maximum(tmp_path, capsys):
    """At sd 0.07 (where a mixture of log-intensities lost two points to the clean image), the
    fit of the corrected intensities stays within a point of the field-free image in the median,
    and every fit's likelihood is at least that of the true field: where the accuracy is lower,
    the data prefer another field (a few large cells of one class), it is no poor maximum.  One
    start does it: the command line's default."""
    # The fit maximises the log-likelihood less the field's penalty (--bias-reg): so does the
    # true field, exp(0.25 (0.8 u + 0.5 v^2 - 0.3 u v)) (smooth_field) in the fit's basis.
    true_coefficients = np.zeros(9)
    true_coefficients[[1, 2, 3]] = 0.25 * np.array([0.8, 0.5, -0.3])  # u, v^2, u v
    roughness = true_coefficients @ seg.field_roughness(3) @ true_coefficients
    prior_of_the_true_field = 0.5 * seg.SegmentOptions.bias_reg * roughness
    gaps = []
    for seed in range(6):
        clean, biased, labels, inside, field = biased_phantom(
            np.random.default_rng(seed), sd=0.07, cell=8
        )
        picture = seg.with_mask(seg.picture_from_array(biased), inside)
        fit = seg.segment_points(picture, seg.distinct_values(picture), 3, bias_field=True)
        clean_picture = seg.with_mask(seg.picture_from_array(clean), inside)
        plain = seg.segment_points(clean_picture, seg.distinct_values(clean_picture), 3)
        gaps.append(
            matched_accuracy(plain.labels[inside], labels[inside], 3)
            - matched_accuracy(fit.labels[inside], labels[inside], 3)
        )
        corrected = biased[inside] / field[inside] / 255.0
        true_field = seg.fit_gmm(corrected, 3).log_likelihood[-1] - np.log(field[inside]).mean()
        assert fit.model.log_likelihood[-1] >= true_field - prior_of_the_true_field - 1e-6
    assert np.median(gaps) < 0.005 and sum(gap < 0.01 for gap in gaps) >= 5
    Image.fromarray(biased).save(tmp_path / "n.png")
    status, out, err = run(
        [tmp_path / "n.png", "--bias-field", "-k", "3", "--out", tmp_path], capsys
    )
    assert status == 0 and record_of(tmp_path, "n")["settings"]["n_init"] == 1
    assert np.mean(np.asarray(Image.open(tmp_path / "n_labels.png")) == seg.label_map(fit)) > 0.999

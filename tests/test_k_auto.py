"""-k auto: the number of classes a person would count, not the number of ways to fit
boundaries and clipping; the climb stops where the criterion has turned; the same in the API,
with masks, volumes and on the command line."""

import sys

import numpy as np
import pytest
from conftest import ROOT, blurred_regions, record_of, run, seg


def auto(image, **options):
    picture = seg.picture_from_array(image)
    options = {"k_max": 6, **options}
    return seg.segment_points(picture, seg.distinct_values(picture), "auto", **options)


@pytest.mark.parametrize("colour", [False, True], ids=["gray", "colour"])
def test_a_blurred_three_class_image_has_three_classes(colour):
    """Blurred boundaries make mixels that BIC counts as classes (a planted BIC-only criterion
    gets more than 3 here); the default criterion counts the classes."""
    image = blurred_regions(np.random.default_rng(1), 3, colour=colour, blur=1.5)
    found = auto(image)
    assert found.model.n_components == 3, found.k_search.rows
    assert found.k_search.criterion == "classes" and found.k_search.chosen == 3
    assert auto(image, criterion="bic").model.n_components > 3


@pytest.mark.parametrize("seed", (1, 2, 3))
def test_a_wide_blurs_band_of_mixels_is_no_class(seed):
    """Two classes, their boundary blurred by 2 pixels: the band of mixels along it is wide
    enough to fill regions of its own (region share over REGION_SHARE_MIN), but none of them
    deeper than BOUNDARY_DEPTH (deep share under DEEP_SHARE_MIN), so K = 3 is not counted."""
    image = blurred_regions(np.random.default_rng(seed), 2, blur=2.0, shape=(300, 400))
    found = auto(image)
    assert found.model.n_components == 2, found.k_search.rows
    three = found.k_search.rows[2]
    assert three["region_share"] >= seg.REGION_SHARE_MIN
    assert three["deep_share"] < seg.DEEP_SHARE_MIN and not three["counted"]


def test_a_class_whose_colour_lies_between_two_others_is_counted():
    """Stripes of a dark and a bright class, their boundaries blurred, and one square of the
    grey between them: that class's label also takes the stripes' blurred edges, so most of
    its pixels lie between two other labels (a boundary share over BOUNDARY_SHARE_MAX), but
    its square fills a region far beyond the edges' reach: three classes."""
    from scipy import ndimage

    rng = np.random.default_rng(5)
    levels = np.where((np.arange(320) // 40) % 2, 0.8, 0.2) * np.ones((240, 1))
    levels[90:150, 130:190] = 0.5
    image = ndimage.gaussian_filter(levels, 1.5) + rng.normal(0, 0.025, levels.shape)
    image = np.clip(np.rint(image * 255), 0, 255).astype(np.uint8)
    found = auto(image)
    assert found.model.n_components == 3, found.k_search.rows
    three = found.k_search.rows[2]
    assert three["boundary_share"] > seg.BOUNDARY_SHARE_MAX
    assert three["deep_share"] >= seg.DEEP_SHARE_MIN and three["counted"]


def test_a_spike_of_clipped_pixels_is_no_class():
    """A class at 0 under noise of sd 0.05, clipped (12 % of the pixels black), and two classes
    above: the component that collapses onto the black spike past K = 3 is not counted."""
    image = blurred_regions(np.random.default_rng(2), 3, sd=0.05, levels=[0.0, 0.5, 0.8])
    found = auto(image)
    assert found.model.n_components == 3, found.k_search.rows
    collapsed = [row for row in found.k_search.rows if row["collapsed"]]
    assert collapsed and not any(row["counted"] for row in collapsed)
    assert auto(image, criterion="bic").model.n_components > 3


def test_the_climb_stops_once_the_criterion_has_turned():
    """One class: K = 1 is best, and K = 2 and 3 (K_TURNED past it) end the climb, not k_max."""
    rng = np.random.default_rng(3)
    image = np.clip(rng.normal(128, 12, (120, 160)), 0, 255).astype(np.uint8)
    picture = seg.picture_from_array(image)
    found = seg.segment_points(picture, seg.distinct_values(picture), "auto", k_max=8)
    assert found.model.n_components == 1
    assert [row["k"] for row in found.k_search.rows] == [1, 2, 3]
    assert found.k_search.stopped.startswith("no better score in the 2 values of K past 1")


@pytest.mark.parametrize("seed", (1, 8, 11))
def test_a_k_too_small_for_its_classes_does_not_stop_the_climb(seed):
    """Six gray classes 0.14 apart under noise of sd 0.03: at K = 3 to 5 classes share
    components (two of them, too few for their classes, once stopped the climb at K = 2),
    and the climb goes on to K = 6."""
    image = blurred_regions(np.random.default_rng(seed), 6, sd=0.03, blur=1.0, shape=(300, 400))
    picture = seg.picture_from_array(image)
    found = seg.segment_points(picture, seg.distinct_values(picture), "auto", k_max=8)
    assert found.model.n_components == 6, found.k_search.rows
    rows = found.k_search.rows
    assert not any(row["too_few"] for row in rows[5:])  # past 6: a class split, not shared
    assert [row["k"] for row in rows] == list(range(1, 9))


def test_region_shares_tell_a_region_from_a_boundary():
    """A block of label 0, a one-pixel line of label 1 between blocks of label 2: the line's
    pixels all touch another label, the blocks' are mostly inside; outside a mask counts not."""
    labels = np.zeros((20, 30), np.uint8)
    labels[:, 15:] = 2
    labels[:, 15] = 1
    shares = seg.region_shares(labels, 4)
    assert shares[1] == 0 and shares[0] > 0.9 and shares[2] > 0.9 and np.isnan(shares[3])
    inside = np.ones_like(labels, bool)
    inside[:, 14] = False  # the line's left neighbours are outside: only its right ones count
    assert seg.region_shares(labels, 4, inside)[1] == 0
    inside[:, 16] = False
    assert seg.region_shares(labels, 4, inside)[1] == 1  # no neighbour inside but its own


def test_deep_shares_count_the_pixels_beyond_a_blurs_reach():
    """At depth d a pixel is in a region when no other label lies within d steps: a band five
    pixels wide between two blocks keeps none of its pixels at depth 3 (its middle column has
    either block 3 steps away) but its middle column at depth 2; a block keeps all but its d
    columns along the band.  The same in a volume, and outside a mask cuts nothing off."""
    labels = np.zeros((20, 40), np.uint8)
    labels[:, 20:] = 2
    labels[:, 18:23] = 1
    assert seg.region_shares(labels, 3, depth=3)[1] == 0
    assert seg.region_shares(labels, 3, depth=2)[1] == pytest.approx(1 / 5)
    assert seg.region_shares(labels, 3, depth=3)[0] == pytest.approx(15 / 18)
    assert seg.region_shares(labels, 3, depth=3)[2] == pytest.approx(14 / 17)
    volume = np.stack([labels] * 6)
    assert np.allclose(seg.region_shares(volume, 3, depth=3), [15 / 18, 0, 14 / 17])
    inside = np.ones_like(labels, bool)
    inside[:, 17:23] = False  # the band and the block's column beside it outside
    assert seg.region_shares(labels, 3, inside, depth=3)[0] == 1


def test_boundary_shares_find_what_lies_between_two_classes():
    """A band of label 1, three pixels wide, between blocks of labels 0 and 2: every band pixel
    has 0 within 3 pixels on one side and 2 on the other; the blocks' pixels have their own
    label on one side.  A band beside one class only (at the image's edge) is no boundary."""
    labels = np.zeros((20, 40), np.uint8)
    labels[:, 20:] = 2
    labels[:, 18:21] = 1
    shares = seg.boundary_shares(labels, 3)
    assert shares[1] == 1 and shares[0] == 0 and shares[2] == 0
    assert seg.boundary_shares(labels, 3, depth=1)[1] == 0  # the band's middle sees only itself
    edge = np.zeros((20, 40), np.uint8)
    edge[:, :3] = 1
    assert seg.boundary_shares(edge, 2)[1] == 0


@pytest.mark.parametrize("axis", [0, 1])
def test_between_looks_at_the_nearest_other_label_on_each_side(axis):
    """A pixel of label 0 with label 1 before it and 2 then 1 after it lies between 1 and 2:
    the nearest other label on each side counts, not a farther one; a pixel outside is passed
    over, not taken for a label; within depth only."""
    row = np.array([[1, 0, 2, 1, 1, 3, 3, 3]], np.uint8)
    labels = row if axis == 1 else row.T
    inside = np.ones_like(labels, bool)
    assert seg._between(labels, inside, 3).reshape(-1).tolist()[:4] == [False, True, True, True]
    outside = np.array([[1, 0, 0, 2, 2, 2, 3, 3]], np.uint8)
    labels = outside if axis == 1 else outside.T
    inside = np.ones_like(labels, bool)
    inside.reshape(-1)[2] = False  # the 0 beside the 2s: outside
    between = seg._between(labels, inside, 3).reshape(-1)
    assert between[1] and not seg._between(labels, inside, 1).reshape(-1)[1]


def test_a_split_start_halves_the_widest_component():
    fit = seg.fit_gmm(np.concatenate([np.full(50, 0.1), np.linspace(0.4, 0.9, 200)]), 2)
    weights, means, covariances = seg.split_start(fit)
    wide = int(np.argmax(fit.covariances[:, 0, 0]))
    assert seg.split_order(fit) == [wide, 1 - wide]
    assert all(
        np.array_equal(a, b)
        for a, b in zip(seg.split_start(fit, wide), (weights, means, covariances))
    )
    assert len(weights) == 3 and weights.sum() == pytest.approx(1)
    assert weights[wide] == weights[2] == pytest.approx(fit.weights[wide] / 2)
    assert means[wide, 0] + means[2, 0] == pytest.approx(2 * fit.means[wide, 0])
    assert means[2, 0] - means[wide, 0] == pytest.approx(np.sqrt(fit.covariances[wide, 0, 0]))


def test_a_greedy_start_adds_the_class_the_fit_left_out():
    """Gray levels of two large classes, a small one between them (300 pixels in 9,100) and a
    spike clipped at 255; a fit of the large classes, too narrow (sd 0.02 for 0.03).  Where the
    histogram most exceeds the fit by pixels are the spike and the large classes' shoulders;
    by the likelihood a component could gain there (the Poisson deviance of the run of bins),
    the small class, and excess_start puts the new component there, with its share and
    spread.  A single gray level gives no start."""
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [rng.normal(0.2, 0.03, 4000), rng.normal(0.5, 0.03, 300), rng.normal(0.8, 0.03, 4000)]
    )
    values = np.concatenate([values, np.full(800, 1.0)])
    levels, counts = np.unique(np.clip(np.rint(values * 255), 0, 255), return_counts=True)
    data = seg._PointFeatures(levels.astype(np.int64), counts.astype(float), 255.0)
    two = seg.GaussianMixtureFit(
        np.array([0.5, 0.5]),
        np.array([[0.2], [0.8]]),
        np.full((2, 1, 1), 0.02**2),
        "full",
        run=seg.EMRun(None, [1.0], 1, True, 1),
    )
    weights, means, covariances = seg.excess_start(two, data)
    assert weights.sum() == pytest.approx(1) and np.all(weights > 0)
    assert means[:2, 0] == pytest.approx([0.2, 0.8]) and means[2, 0] == pytest.approx(0.5, abs=0.01)
    assert weights[2] == pytest.approx(300 / 9100, rel=0.25)
    assert np.sqrt(covariances[2, 0, 0]) == pytest.approx(0.03, rel=0.25)
    one = seg._PointFeatures(np.array([7]), np.array([50.0]), 255.0)
    assert seg.excess_start(seg.fit_gmm(np.full(50, 7 / 255), 1), one) is None


def test_a_class_the_clipped_spike_would_take_is_found():
    """A held-out miss of tools/k_auto_evaluation.py (seed 1252, 5 gray classes, the top one
    clipped at 255, at 400 x 500 pixels): the 4-class fit merges two classes, and every split
    and fresh start at K = 5 spends its component on the clipped spike; the start where the
    histogram most exceeds the 4-class fit finds the fifth class."""
    sys.path.insert(0, str(ROOT / "tools"))
    from k_auto_evaluation import make_case

    image, truth, _ = make_case(1252, shape=(400, 500))
    found = auto(image, k_max=8, n_init=2)
    assert truth == 5 and found.model.n_components == 5, found.k_search.rows


def scripted_fit(means, weights, log_likelihood):
    """A converged 1-D fit of given means and weights (sd 0.02) and mean log-likelihood."""
    k = len(means)
    return seg.GaussianMixtureFit(
        np.asarray(weights, float),
        np.asarray(means, float)[:, None],
        np.full((k, 1, 1), 0.02**2),
        "full",
        run=seg.EMRun(None, [log_likelihood], 1, True, 1),
    )


def test_a_later_split_counts_only_where_icl_improves_too():
    """The climb's candidates, scripted: K = 2 is the best; at K = 3 the first split's fit
    lines boundaries (not counted), the second split's fills regions and has the better BIC,
    but two of its components coincide (ICL charges their overlap, as a class cut in two
    along a shading); the start where the histogram most exceeds the fit (excess_start) and a
    fresh start line boundaries too.  K = 3 is not counted and the climb stops at K = 4;
    counted as BIC alone would count it, K = 3 would be chosen."""
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.25, 0.02, 500), rng.normal(0.75, 0.02, 500)])
    data = seg._PointFeatures(values, np.ones(1000))
    two = scripted_fit([0.25, 0.75], [0.5, 0.5], 1.0)
    first = scripted_fit([0.25, 0.5, 0.75], [0.45, 0.1, 0.45], 1.05)
    second = scripted_fit([0.25, 0.75, 0.75], [0.5, 0.25, 0.25], 1.2)
    greedy = scripted_fit([0.25, 0.5, 0.75], [0.45, 0.1, 0.45], 1.08)
    fresh = scripted_fit([0.25, 0.5, 0.75], [0.4, 0.2, 0.4], 1.1)
    four = scripted_fit([0.2, 0.3, 0.7, 0.8], [0.25] * 4, 1.3)
    fits = [scripted_fit([0.5], [1.0], 0.0), two, first, second, greedy, fresh, four]
    regions = {id(two): 1.0, id(second): 1.0}  # the others line boundaries
    calls = []

    def fit_k(k, start=None, max_iter=None, every_point=False):
        calls.append((k, start))
        return fits[len(calls) - 1]

    def shares_of(model):
        share = np.full(model.n_components, regions.get(id(model), 0.05))
        return share, np.full(model.n_components, 0.5), share

    model, search = seg.select_components(fit_k, data, 6, "classes", shares_of)
    assert [k for k, _ in calls] == [1, 2, 3, 3, 3, 3, 4]
    assert np.array_equal(calls[3][1][1], seg.split_start(two, 1)[1])  # the second split
    assert np.array_equal(calls[4][1][1], seg.excess_start(two, data)[1])
    assert calls[5][1] is None  # the fresh start
    row = search.rows[2]
    assert row["bic"] < search.rows[1]["bic"] and row["icl"] > search.rows[1]["icl"]
    assert not row["counted"] and model is two and search.chosen == 2
    assert len(search.rows) == 4


@pytest.mark.parametrize("colour", [False, True], ids=["gray", "colour"])
def test_in_colour_a_new_best_must_improve_icl_too(colour):
    """The climb's fits, scripted, of two classes: at K = 3 every start fills regions and has
    the better BIC, but two of its components coincide (a class cut in two along a shading:
    ICL charges their overlap).  In gray, where true classes overlap too and ICL would charge
    them, BIC among the fits that fill regions chooses 3; in colour, where classes of distinct
    colours do not overlap, K = 3 is not counted and the climb keeps 2."""
    n_features = 3 if colour else 1
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0.25, 0.02, 500), rng.normal(0.75, 0.02, 500)])
    data = seg._PointFeatures(np.repeat(values[:, None], n_features, axis=1), np.ones(1000))

    def fit(means, weights, log_likelihood):
        k = len(means)
        return seg.GaussianMixtureFit(
            np.asarray(weights, float),
            np.repeat(np.asarray(means, float)[:, None], n_features, axis=1),
            np.repeat(np.eye(n_features)[None] * 0.02**2, k, axis=0),
            "full",
            run=seg.EMRun(None, [log_likelihood], 1, True, 1),
        )

    fits = {
        1: fit([0.5], [1.0], 0.0),
        2: fit([0.25, 0.75], [0.5, 0.5], 1.0),
        3: fit([0.25, 0.75, 0.75], [0.5, 0.25, 0.25], 1.2),
        4: fit([0.2, 0.3, 0.7, 0.8], [0.25] * 4, 1.3),
        5: fit([0.1, 0.2, 0.3, 0.7, 0.8], [0.2] * 5, 1.35),
    }

    def shares_of(model):
        share = np.full(model.n_components, 1.0 if model.n_components <= 3 else 0.05)
        return share, np.full(model.n_components, 0.5), share

    model, search = seg.select_components(
        lambda k, start=None, max_iter=None, every_point=False: fits[k], data, 6, "classes",
        shares_of,
    )  # fmt: skip
    three = search.rows[2]
    assert three["bic"] < search.rows[1]["bic"] and three["icl"] > search.rows[1]["icl"]
    assert three["counted"] is not colour
    assert search.chosen == (2 if colour else 3) and model is fits[search.chosen]


def test_where_no_fit_counts_a_k_too_small_for_its_classes_is_kept():
    """The climb's candidates, scripted: at K = 2 neither counts, the split's label speckles
    across regions (too_few: classes share a component) and a fresh start's lines boundaries
    with the higher likelihood; the climb keeps the first, so K = 2 does not count towards
    the turn, and K = 4 is found past an uncounted K = 3 (kept by likelihood, two turns
    would have ended the climb at K = 1)."""
    data = seg._PointFeatures(np.linspace(0.1, 0.9, 200), np.ones(200))
    speckled = scripted_fit([0.3, 0.7], [0.5, 0.5], 0.5)
    lining = scripted_fit([0.5, 0.5], [0.5, 0.5], 0.6)
    three = scripted_fit([0.3, 0.5, 0.7], [0.3, 0.4, 0.3], 0.7)
    four = scripted_fit([0.2, 0.4, 0.6, 0.8], [0.25] * 4, 1.2)
    fits = [scripted_fit([0.5], [1.0], 0.0), speckled, lining, three, four]
    shares = {id(speckled): (0.3, 0.1), id(four): (1.0, 0.0)}  # (region, boundary) shares
    calls = []

    def fit_k(k, start=None, max_iter=None, every_point=False):
        calls.append(k)
        return fits[len(calls) - 1]

    def shares_of(model):
        region, boundary = shares.get(id(model), (0.05, 0.5))
        share = np.full(model.n_components, region)
        return share, np.full(model.n_components, boundary), share

    model, search = seg.select_components(fit_k, data, 4, "classes", shares_of)
    assert calls == [1, 2, 2, 3, 4]
    assert search.rows[1]["too_few"] and search.rows[1]["log_likelihood"] == 0.5
    assert not search.rows[2]["counted"] and not search.rows[2]["too_few"]
    assert model is four and search.chosen == 4


def test_k_auto_on_a_masked_image_and_a_volume():
    """Outside a mask counts for nothing; a volume's regions are judged in 3-D."""
    rng = np.random.default_rng(4)
    image = blurred_regions(rng, 3, blur=2.0)
    mask = np.zeros(image.shape, bool)
    mask[20:-20, 30:-30] = True
    labels, _, model = seg.segment_image(image, "auto", mask=mask, k_max=6)
    assert model.n_components == 3 and np.all(labels[~mask] == 0)
    volume = np.stack([blurred_regions(np.random.default_rng(5), 3, shape=(60, 80))] * 6)
    _, _, model = seg.segment_volume(volume, "auto", k_max=6)
    assert model.n_components == 3


def test_the_command_line_records_and_notes_the_search(tmp_path, capsys):
    """The JSON's bic rows and k_auto; --criterion bic as asked; a note when K = --k-max."""
    from PIL import Image

    Image.fromarray(blurred_regions(np.random.default_rng(6), 4, blur=2.0)).save(
        tmp_path / "four.png"
    )
    status, out, err = run(
        [tmp_path / "four.png", "-k", "auto", "--out", tmp_path / "a"], capsys, figures=True
    )
    record = record_of(tmp_path / "a", "four")
    assert status == 0 and record["k"] == 4 and record["k_auto"]["criterion"] == "classes"
    assert record["k_auto"]["chosen"] == 4 and record["settings"]["criterion"] == "classes"
    assert [row["k"] for row in record["bic"]] == list(range(1, len(record["bic"]) + 1))
    keys = {"bic", "icl", "region_share", "boundary_share", "deep_share", "counted"}
    keys |= {"collapsed", "capped"}
    assert keys <= set(record["bic"][0])
    width, height = Image.open(tmp_path / "a" / "four_bic.png").size
    assert width > height > 0
    status, out, err = run(
        [tmp_path / "four.png", "-k", "auto", "--k-max", "3", "--out", tmp_path / "b"], capsys
    )
    assert status == 0 and "-k auto chose K = 3, the largest it may try" in err
    status, out, err = run(
        [tmp_path / "four.png", "-k", "auto", "--criterion", "bic", "--out", tmp_path / "c"],
        capsys,
    )
    assert record_of(tmp_path / "c", "four")["k_auto"]["criterion"] == "bic"


def test_a_shared_batch_counts_its_classes_over_its_images(tmp_path, capsys):
    """--shared -k auto: the pooled fits are judged on every image's labels (read again for
    each K), so the batch's blurred edges are not counted as classes either; BIC alone on the
    pooled values takes more."""
    from PIL import Image

    for seed in (7, 8):
        image = blurred_regions(np.random.default_rng(seed), 3, shape=(160, 200), blur=2.0)
        Image.fromarray(image).save(tmp_path / f"scan{seed}.png")
    argv = [tmp_path / "scan7.png", tmp_path / "scan8.png", "--shared", "-k", "auto"]
    status, out, err = run([*argv, "--out", tmp_path / "a"], capsys)
    record = record_of(tmp_path / "a", "scan7")
    assert status == 0 and record["k"] == 3, err
    assert all(row["region_share"] is not None for row in record["bic"][1:])
    status, out, err = run([*argv, "--criterion", "bic", "--out", tmp_path / "b"], capsys)
    assert record_of(tmp_path / "b", "scan7")["k"] > 3


def test_the_api_chooses_k_as_the_command_line_does(tmp_path, capsys):
    """segment_image(..., "auto") has the command line's defaults: two starts a K (the
    record's n_init), the same criterion, so the same K, model and labels."""
    from PIL import Image

    image = blurred_regions(np.random.default_rng(4), 4, colour=True, blur=1.0, shape=(90, 120))
    Image.fromarray(image).save(tmp_path / "four.png")
    status, _, err = run([tmp_path / "four.png", "-k", "auto", "--out", tmp_path / "out"], capsys)
    assert status == 0, err
    record = record_of(tmp_path / "out", "four")
    labels, _, model = seg.segment_image(image, "auto")
    assert record["settings"]["n_init"] == seg.FitOptions().starts(choosing_k=True) == 2
    assert record["k"] == model.n_components
    assert record["log_likelihood"][-1] == model.log_likelihood[-1]
    written = np.asarray(Image.open(tmp_path / "out" / "four_labels.png"))
    assert np.array_equal(written, labels)


def test_on_many_colours_each_k_is_fitted_on_a_draw_and_judged_on_every_point(monkeypatch):
    """Over K_PROBE_ABOVE colours and twice K_PROBE_PIXELS pixels (lowered here to 16,384 for a
    small image), every K is fitted on one draw of that many pixels and judged on every
    point: each row's log-likelihood is one of its K's fits' mean over every point, not over
    the draw; the chosen K is then fitted on every point, and its row is that fit's."""
    image = blurred_regions(np.random.default_rng(8), 3, colour=True, sd=0.06)
    picture = seg.picture_from_array(image)
    points = seg.distinct_values(picture)
    data = seg._PointFeatures(points.values, points.weights, points.scale)
    assert len(data) > seg.K_PROBE_ABOVE
    assert seg.segment_points(picture, points, "auto", k_max=6).k_search.drawn is None
    fits, fit_components = {}, seg.fit_components

    def recorded(on, k, *args, **kwargs):
        fit = fit_components(on, k, *args, **kwargs)
        fits.setdefault(k, []).append((len(on), fit))
        return fit

    monkeypatch.setattr(seg, "K_PROBE_PIXELS", 1 << 14)
    monkeypatch.setattr(seg, "fit_components", recorded)
    found = seg.segment_points(picture, points, "auto", k_max=6)
    search, model = found.k_search, found.model
    assert search.drawn == 1 << 14 and model.n_components == search.chosen == 3
    every = [(k, i) for k in fits for i, (size, _) in enumerate(fits[k]) if size == len(data)]
    assert every == [(3, len(fits[3]) - 1)]  # the chosen K's last fit alone
    # K = 4, the first past the best: each of the three components split, and a fresh start;
    # K = 5: the most spread-out component's split alone
    assert len(fits[4]) == 4 and len(fits[5]) == 1 and len(search.rows) == 5
    for row in search.rows[:2] + search.rows[3:]:  # the chosen K's row: below
        on_draw = [fit for size, fit in fits[row["k"]] if size < len(data)]
        on_every_point = [seg._mean_log_likelihood(fit, data) for fit in on_draw]
        assert any(row["log_likelihood"] == pytest.approx(v, abs=1e-12) for v in on_every_point)
        assert all(abs(row["log_likelihood"] - fit.log_likelihood[-1]) > 1e-4 for fit in on_draw)
    assert model.converged
    assert search.rows[2]["log_likelihood"] == model.log_likelihood[-1]
    on_every_point = seg._mean_log_likelihood(model, data)
    assert model.log_likelihood[-1] == pytest.approx(on_every_point, abs=1e-12)


@pytest.mark.parametrize("colour", [False, True], ids=["gray", "colour"])
def test_icl_is_bic_plus_twice_the_classification_entropy(colour):
    """The chosen K's ICL (Biernacki, Celeux and Govaert 2000) is its BIC plus twice the
    entropy of the posteriors summed over the pixels: here from scikit-learn's posteriors of
    the same model, pixel by pixel (a gray image's distinct values weigh hundreds of pixels)."""
    from sklearn.mixture import GaussianMixture

    image = blurred_regions(np.random.default_rng(4), 3, colour=colour, shape=(60, 80))
    found = auto(image)
    model, row = found.model, found.k_search.rows[found.model.n_components - 1]
    reference = GaussianMixture(model.n_components, covariance_type=model.covariance_type)
    reference.weights_, reference.means_ = model.weights, model.means
    reference.covariances_ = model.covariances
    # a factor M of each precision with M M^T = the precision, as scikit-learn's
    reference.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(model.covariances))
    tau = reference.predict_proba(image.reshape(-1, model.means.shape[1]) / 255.0)
    entropy = -np.sum(tau * np.log(np.maximum(tau, 1e-300)))
    assert row["icl"] == pytest.approx(row["bic"] + 2 * entropy, rel=1e-9)


@pytest.mark.parametrize("shape", [(40, 50), (10, 20, 30)], ids=["image", "volume"])
def test_the_climbs_one_count_gives_each_shares_own_count(shape):
    """share_counts, what the climb judges every fit by, counts the region, boundary and deep
    shares' pixels at once (and each axis on a thread of its own): the same counts as
    region_shares and boundary_shares make one by one, with a mask or without."""
    rng = np.random.default_rng(7)
    blocks = rng.integers(0, 5, size=tuple(n // 5 for n in shape)).astype(np.uint8)
    labels = np.kron(blocks, np.ones((5,) * len(shape), np.uint8))
    noisy = rng.random(shape) < 0.05
    labels[noisy] = rng.integers(0, 5, np.count_nonzero(noisy))
    for inside in (None, rng.random(shape) < 0.9):
        counts = seg.share_counts(labels, 6, inside, seg.Passes(threads=2))
        assert counts[-1].sum() == (labels.size if inside is None else inside.sum())
        with np.errstate(invalid="ignore"):  # label 5 has no pixel: NaN, as the shares'
            shares = [part / counts[-1] for part in counts[:-1]]
        deep = seg.region_shares(labels, 6, inside, depth=seg.BOUNDARY_DEPTH)
        expected = (
            seg.region_shares(labels, 6, inside),
            seg.boundary_shares(labels, 6, inside),
            deep,
        )
        for got, want in zip(shares, expected):
            np.testing.assert_array_equal(got, want)

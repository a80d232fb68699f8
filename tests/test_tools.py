"""The hand-run evaluation scripts' own arithmetic (tools/): what a comparison of two runs says,
the best thresholds a reference row scores."""

import itertools
import sys

import numpy as np
import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import brain_evaluation  # noqa: E402
import brain_grid  # noqa: E402


def row(seed, method, as_read, kept=0.9, notes=()):
    case = {"orientation": "axial", "voxel": 1, "position": 80, "noise": 3, "inu": 0}
    return dict(case, seed=seed, method=method, as_read=as_read, matched=as_read, kept=kept,
                notes=list(notes), seconds=1.0)  # fmt: skip


def test_a_comparison_pairs_each_case_with_its_own_and_counts_what_changed(tmp_path):
    """Two runs of the same three draws, the second written in another order: each case is
    compared with itself (by its draw, not its place), so the means, the gains and losses
    and the lost tissues are those of the pairs; read back from --records files alike."""
    before = [
        row(1, "--brain", 0.80, kept=0.4),
        row(2, "--brain", 0.90),
        row(3, "--brain", 0.70, kept=0.3, notes=["a note"]),
    ]
    after = [
        row(3, "--brain", 0.76, kept=0.6),
        row(1, "--brain", 0.80, kept=0.45, notes=["a note"]),
        row(2, "--brain", 0.88),
    ]
    brain_grid.write_records(tmp_path / "before.jsonl", before)
    brain_grid.write_records(tmp_path / "after.jsonl", after)
    lines = brain_grid.comparison(
        brain_grid.read_records(tmp_path / "before.jsonl"),
        brain_grid.read_records(tmp_path / "after.jsonl"),
    )
    assert lines[0] == (
        "--brain: 3 cases, 80.00 -> 81.33 % (worst 70.0 -> 76.0); 1 gain and 1 lose over 0.1 "
        "points; a tissue under half its pixels in 2 -> 1, without a note 1 -> 0"
    )
    assert (
        lines[1].startswith("   largest gain: +6.0 points, orientation axial")
        and "seed 3" in lines[1]
    )
    assert lines[2].startswith("   largest loss: -2.0 points,") and "seed 2" in lines[2]
    assert len(lines) == 3


def test_runs_of_other_draws_are_not_compared():
    with pytest.raises(ValueError, match="not of the same draws"):
        brain_grid.comparison([row(1, "--brain", 0.8)], [row(2, "--brain", 0.8)])


def test_the_best_thresholds_score_no_less_than_any_labelling_by_intensity():
    """best_thresholds: each gray level gets the tissue most of its scored pixels have, so no
    map from gray level to tissue scores higher (checked against every map on four levels);
    the outside stays 0."""
    rng = np.random.default_rng(3)
    image = rng.integers(1, 5, size=(30, 30)).astype(np.uint8)
    truth = np.clip(image.astype(int) - 1 + rng.integers(-1, 2, size=image.shape), 1, 3)
    image[:2] = 0
    truth[:2] = 0
    labels = brain_grid.best_thresholds(image, truth)
    assert np.all(labels[:2] == 0)
    best = brain_evaluation.accuracy(labels, truth)
    every = [
        brain_evaluation.accuracy(np.array((0,) + table)[image], truth)
        for table in itertools.product((1, 2, 3), repeat=4)
    ]
    assert best == max(every)


def test_the_field_cost_pairs_each_case_with_its_run_without_the_field():
    """field_costs: each case's points lost against its own twin without the field (not
    against the mean of other cases), mean (largest), at 1 mm and at every voxel size."""
    rows = []
    cases = (
        (1, 1, 40, 0.80, 0.90),
        (2, 1, 40, 0.85, 0.87),
        (3, 2, 40, 0.70, 0.60),
        (4, 1, 0, 0.9, 0.9),
    )
    for seed, voxel, inu, biased, clean in cases:
        for method, score in (("--brain", biased), ("--brain" + brain_grid.NO_FIELD, clean)):
            rows.append(dict(row(seed, method, score), voxel=voxel, inu=inu))
    table = brain_grid.field_costs(rows, ["--brain"]).splitlines()
    assert "| 40 %, 1 mm (n=2) | 6.0 (10.0) |" in table
    assert "| 40 %, every voxel size (n=3) | 0.7 (10.0) |" in table
    assert "| 20 %, 1 mm (n=0) | - |" in table
    volumes = brain_grid.field_costs(rows, ["--brain"], {"volume": lambda r: True}).splitlines()
    assert "| 40 %, volume (n=3) | 0.7 (10.0) |" in volumes and len(volumes) == 5


def test_the_field_basis_reach_is_exact_on_its_own_polynomials_and_not_beyond():
    """polynomial_reach: a random cubic log field over a ball is followed exactly by a cubic
    (the program's field model), with the field's own max / min, and not by a plane; a
    product of cosines of a 150 mm period leaves a residual at degree 3 that degree 5
    shrinks.  field_basis_table reports every shape and both degrees."""
    rng = np.random.default_rng(0)
    grid = np.mgrid[-40:41:4, -40:41:4, -40:41:4].reshape(3, -1).astype(float)
    points = list(grid[:, np.sum(grid**2, axis=0) <= 40**2])
    cubic = brain_grid.log_field("polynomial", points, rng)
    residual, ratio = brain_grid.polynomial_reach(cubic, points, 3)
    assert residual < 1e-10 and ratio == pytest.approx(np.exp(np.ptp(cubic)))
    assert brain_grid.polynomial_reach(cubic, points, 1)[0] > 0.01 * np.std(cubic)
    waves = np.cos(2 * np.pi * points[0] / 150) * np.cos(2 * np.pi * points[1] / 150 + 1)
    three, five = (brain_grid.polynomial_reach(waves, points, d)[0] for d in (3, 5))
    assert 0 < five < three
    table = brain_grid.field_basis_table(np.ones((30, 30, 30), dtype=bool), 40, 2, seed=1)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "shape" not in line]
    assert [row.split(" | ")[0][2:] for row in rows] == list(brain_grid.SHAPES)
    assert "degree 5 max / min" in table


def test_an_image_divided_by_its_field_is_the_image_without_it():
    """divided_by_field: a scan made with a field, divided by that field, is the scan made
    without it (to the rounding of 8 bits), scaled as scanned() scales one; the outside stays 0
    and nothing inside becomes 0."""
    rng = np.random.default_rng(0)
    clean = np.zeros((60, 80))
    clean[10:50, 10:70] = rng.choice([60.0, 140.0, 200.0], size=(40, 60))
    inside = clean > 0
    field = np.exp(np.linspace(-0.4, 0.4, 80))[None, :] * np.ones((60, 1))
    scan = lambda signal: np.where(  # noqa: E731
        inside, np.clip(np.rint(signal * 250 / np.percentile(signal[inside], 99.9)), 1, 255), 0
    ).astype(np.uint8)
    divided = brain_grid.divided_by_field(scan(clean * field), field)
    assert np.array_equal(divided == 0, ~inside)
    assert np.abs(divided.astype(int) - scan(clean)).max() <= 2
    assert np.percentile(divided[inside], 99.9) == pytest.approx(250, abs=1)

"""The hand-run evaluation scripts' own arithmetic (tools/): what a comparison of two runs says."""

import sys

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tools"))
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

"""Passes on threads (bands, blocks, parts of a histogram) never change a bit."""

import numpy as np
import pytest
from conftest import (
    biased_phantom,
    seg,
)


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

"""Masked scans (--mask), posterior probability maps (--probabilities) and the brain MRI sample."""

import numpy as np
import pytest
from conftest import ROOT, block_labels, matched_accuracy, record_of, run, seg
from PIL import Image


def phantom(rng, shape=(80, 100), means=(0.3, 0.55, 0.8), sd=0.05):
    """A 3-class piecewise-constant 'brain' inside an ellipse on an exactly black background."""
    labels = block_labels(*shape, 3, rng)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    inside = ((rows - shape[0] / 2) / (0.42 * shape[0])) ** 2 + (
        (cols - shape[1] / 2) / (0.42 * shape[1])
    ) ** 2 < 1
    values = rng.normal(np.asarray(means)[labels], sd)
    image = np.clip(np.rint(values * 255), 1, 255).astype(np.uint8)  # nothing inside is 0
    image[~inside] = 0
    return image, labels, inside


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

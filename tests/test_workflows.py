"""Beyond one image: K by BIC, one model for a batch, parallel batches, progress, summary."""

import json
import os

import numpy as np
import pytest
from conftest import mixture_image, record_of, run, seg, two_tone
from PIL import Image


def separated_mixture(k, n_features, rng, size=(64, 80)):
    """An image of k well-separated classes on a 4 x 4 grid (each class at least 2 cells, 12 %).

    Means spread over 0.2..0.8 (colour: shuffled per channel), spreads small enough that no
    class is clipped at 0 or 255.
    """
    cells = rng.permutation(np.resize(np.arange(k), 16)).reshape(4, 4)
    labels = np.kron(cells, np.ones((size[0] // 4, size[1] // 4), dtype=int))
    levels = np.linspace(0.2, 0.8, k)
    if n_features == 1:
        means, sd = levels[:, None], min(0.05, 0.6 / (k - 1) / 5)
    else:
        means = np.stack([levels, rng.permutation(levels), rng.permutation(levels)], axis=1)
        sd = min(0.05, 0.6 / (k - 1) / 3)
    covariances = np.array([np.eye(n_features) * sd**2 for _ in range(k)])
    return mixture_image(labels, means, covariances, rng)


@pytest.mark.slow
@pytest.mark.parametrize("n_features", [1, 3], ids=["gray", "color"])
@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_k_auto_picks_the_true_number_of_components(tmp_path, capsys, k, n_features):
    rng = np.random.default_rng(100 + k)
    Image.fromarray(separated_mixture(k, n_features, rng)).save(tmp_path / "mix.png")
    status, out, err = run(
        [tmp_path / "mix.png", "-k", "auto", "--k-max", "8", "--out", tmp_path], capsys
    )
    assert status == 0, err
    record = record_of(tmp_path, "mix")
    assert record["k"] == k and record["requested_k"] == "auto"
    assert record["settings"]["n_init"] == 2  # two starts per K unless told otherwise
    # the climb ends K_TURNED past the chosen K, at the lowest BIC of the fits it counted
    assert [row["k"] for row in record["bic"]] == list(range(1, min(k + seg.K_TURNED, 8) + 1))
    best = min((row for row in record["bic"] if row["counted"]), key=lambda row: row["bic"])
    assert best["k"] == k and record["k_auto"]["chosen"] == k


def test_bic_counts_parameters_as_scikit_learn(rng):
    from sklearn.mixture import GaussianMixture

    X = rng.normal(size=(500, 3)) * 0.1 + 0.5
    for covariance_type in seg.COVARIANCE_TYPES:
        reference = GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
        ours = seg.fit_gmm(
            X,
            3,
            covariance_type=covariance_type,
            weights_init=reference.weights_,
            means_init=reference.means_,
            covariances_init=reference.covariances_,
            max_iter=1,
        )
        ours.log_likelihood[-1] = reference.score(X)
        assert seg.bic(ours, len(X)) == pytest.approx(reference.bic(X), rel=1e-12)


def test_shared_model_labels_mean_the_same_in_every_image(tmp_path, rng, capsys):
    dark = np.clip(rng.normal(50, 8, (30, 40)), 0, 255).astype(np.uint8)
    mid = np.clip(rng.normal(128, 8, (30, 40)), 0, 255).astype(np.uint8)
    bright = np.clip(rng.normal(210, 8, (30, 40)), 0, 255).astype(np.uint8)
    Image.fromarray(np.hstack([dark, mid])).save(tmp_path / "a.png")
    Image.fromarray(np.hstack([mid, bright])).save(tmp_path / "b.png")
    status, out, err = run(
        [tmp_path / "a.png", tmp_path / "b.png", "--shared", "-k", "3", "--out", tmp_path / "out"],
        capsys,
    )
    assert status == 0, err
    a, b = (record_of(tmp_path / "out", s) for s in "ab")
    for key in ("weights", "means", "covariances", "log_likelihood", "k"):
        assert a[key] == b[key]
    assert (
        a["shared"]
        and b["shared"]
        and a["shared_images"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    )
    labels_a = np.asarray(Image.open(tmp_path / "out" / "a_labels.png"))
    labels_b = np.asarray(Image.open(tmp_path / "out" / "b_labels.png"))
    # The middle gray is one component in both images, darkest/brightest are 0 and 2.
    assert np.bincount(labels_a[:, :40].ravel()).argmax() == 0
    assert (
        np.bincount(labels_a[:, 40:].ravel()).argmax()
        == 1
        == np.bincount(labels_b[:, :40].ravel()).argmax()
    )
    assert np.bincount(labels_b[:, 40:].ravel()).argmax() == 2
    # Same pixel value, same label, whichever image it is in.
    values = np.concatenate([np.asarray(Image.open(tmp_path / f"{s}.png")).ravel() for s in "ab"])
    labels = np.concatenate([labels_a.ravel(), labels_b.ravel()])
    for value in np.unique(values):
        assert len(np.unique(labels[values == value])) == 1
    # Unshared, each image gets its own model.
    run([tmp_path / "a.png", tmp_path / "b.png", "-k", "3", "--out", tmp_path / "solo"], capsys)
    solo_a = record_of(tmp_path / "solo", "a")
    assert solo_a["shared"] is False and solo_a["means"] != a["means"]


def test_shared_batch_of_gray_and_colour_is_colour(tmp_path, rng, capsys):
    two_tone(tmp_path / "g.png", rng)
    two_tone(tmp_path / "c.png", rng, color=True)
    status, out, err = run(
        [tmp_path, "--shared", "-k", "auto", "--k-max", "4", "--out", tmp_path / "o"],
        capsys,
        figures=True,
    )
    assert status == 0, err
    g, c = (record_of(tmp_path / "o", s) for s in "gc")
    assert g["mode"] == c["mode"] == "color" and g["means"] == c["means"] and g["bic"] == c["bic"]
    assert (tmp_path / "o" / "g_bic.png").exists()


@pytest.mark.slow
def test_parallel_batch_writes_the_same_bytes_in_input_order(tmp_path, rng, capsys):
    names = []
    for i in range(5):
        names.append(tmp_path / f"img{4 - i}.png")
        two_tone(names[-1], rng, color=i % 2 == 0)
    serial = run([*names, "--jobs", "1", "--out", tmp_path / "serial"], capsys)
    parallel = run([*names, "--jobs", "3", "--out", tmp_path / "parallel"], capsys)
    assert serial[0] == parallel[0] == 0
    order = [line.split(":")[0] for line in parallel[1].splitlines()]
    assert order == [str(p) for p in names]
    assert [line.split(" ")[:6] for line in serial[1].splitlines()] == [
        line.split(" ")[:6] for line in parallel[1].splitlines()
    ]
    for path in (tmp_path / "serial").iterdir():
        if path.suffix == ".png":
            assert path.read_bytes() == (tmp_path / "parallel" / path.name).read_bytes(), path.name


def test_parallel_batch_still_reports_bad_files(tmp_path, rng, capsys):
    two_tone(tmp_path / "a.png", rng)
    (tmp_path / "b.png").write_text("not an image")
    two_tone(tmp_path / "c.png", rng)
    status, out, err = run([tmp_path, "--jobs", "2", "--out", tmp_path / "out"], capsys)
    assert status == 1 and f"error: {tmp_path / 'b.png'}: not an image" in err
    assert [line.split(":")[0] for line in out.splitlines()] == [
        str(tmp_path / "a.png"),
        str(tmp_path / "c.png"),
    ]
    assert "2 images segmented, 1 failed" in err and f"outputs in {tmp_path / 'out'}" in err


def test_batch_summary(tmp_path, rng, capsys):
    two_tone(tmp_path / "a.png", rng)
    status, out, err = run(
        [tmp_path / "a.png", tmp_path / "missing.png", "--out", tmp_path / "out"], capsys
    )
    assert status == 1
    assert err.strip().splitlines()[-1].startswith("1 image segmented, 1 failed, in ")
    assert err.strip().endswith(f"outputs in {tmp_path / 'out'}")


@pytest.mark.slow
def test_ctrl_c_on_a_parallel_batch(tmp_path, rng):
    """SIGINT to the process group (as Ctrl-C): status 130, one line, nothing half-written."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    for i in range(4):
        noise = rng.integers(0, 256, size=(900, 1200, 3), dtype=np.uint8)
        Image.fromarray(noise).save(tmp_path / f"n{i}.png", compress_level=0)
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "ImageSegmentation.py"),
            str(tmp_path),
            "--jobs",
            "2",
            "-k",
            "6",
            "--tol",
            "0",
            "--max-iter",
            "400",
            "--out",
            str(tmp_path / "out"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    started = time.monotonic()  # the output folder is made once the batch has begun
    while not (tmp_path / "out").exists() and time.monotonic() - started < 60:
        time.sleep(0.05)
    time.sleep(1.0)  # the workers busy with their images
    os.killpg(process.pid, signal.SIGINT)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "error: interrupted"
    out_dir = tmp_path / "out"  # gone if no image was done before the interrupt
    leftovers = (
        [p.name for p in out_dir.iterdir() if p.name.startswith(".")] if out_dir.exists() else []
    )
    assert leftovers == []
    for model in (tmp_path / "out").glob("*_model.json"):  # whatever was finished is whole
        json.loads(model.read_text())


def test_pooled_points_are_the_histogram_of_all_images_together(rng):
    """--shared merges image by image: the result is the distinct values of all side by side."""
    a = rng.integers(0, 40, size=(20, 30, 3), dtype=np.uint8)
    b = rng.integers(20, 60, size=(20, 25, 3), dtype=np.uint8)
    g = rng.integers(0, 50, size=(20, 10), dtype=np.uint8)
    pooled = seg.pool_points(
        seg.distinct_values(seg.picture_from_array(array)) for array in (a, b, g)
    )
    together = np.concatenate([a, b, np.repeat(g[..., None], 3, axis=2)], axis=1)
    expected = seg.distinct_values(seg.picture_from_array(together), "color")
    assert pooled.mode == "color" and pooled.scale == 255 and seg.gray_level_top(pooled) is None
    order = np.lexsort(pooled.values.T[::-1])
    expected_order = np.lexsort(expected.values.T[::-1])
    np.testing.assert_array_equal(pooled.values[order], expected.values[expected_order])
    np.testing.assert_array_equal(pooled.weights[order], expected.weights[expected_order])
    assert pooled.weights.sum() == together.shape[0] * together.shape[1]
    gray = seg.pool_points(
        seg.distinct_values(seg.picture_from_array(array)) for array in (g, g[::2])
    )
    assert gray.mode == "gray" and seg.gray_level_top(gray) == 255 and gray.weights.sum() == 300
    assert seg.pool_points(iter([])) is None


@pytest.mark.parametrize(
    "options",
    [[], ["--covariance", "diag"], ["--quantized"], ["--mask", "nonzero"]],
    ids=["full", "diag", "quantized", "mask"],
)
def test_a_saved_model_labels_its_own_image_as_its_run_did(tmp_path, rng, capsys, options):
    """--model FILE: no fit, the file's components in its numbering; on the image it was
    written for, the same label map and segmented image to the byte."""
    image = two_tone(tmp_path / "scan.png", rng, color="--quantized" not in options)
    if "--mask" in options:
        image[:3] = 0
        image[-3:] = 0
        image[:, :3] = 0
        image[:, -3:] = 0
        Image.fromarray(image).save(tmp_path / "scan.png")
    status, out, err = run([tmp_path / "scan.png", *options, "--out", tmp_path / "fit"], capsys)
    assert status == 0, err
    saved = tmp_path / "fit" / "scan_model.json"
    status, out, err = run(
        [tmp_path / "scan.png", "--model", saved, *options, "--out", tmp_path / "applied"], capsys
    )
    assert status == 0, err
    for name in ("scan_labels.png", "scan_segmented.png"):
        assert (tmp_path / "fit" / name).read_bytes() == (tmp_path / "applied" / name).read_bytes()
    fitted, applied = record_of(tmp_path / "fit", "scan"), record_of(tmp_path / "applied", "scan")
    assert applied["means"] == fitted["means"] and applied["n_iter"] == 0
    assert applied["model_file"] == str(saved) and applied["shared"] is False
    assert applied["log_likelihood"][0] == pytest.approx(fitted["log_likelihood"][-1], abs=1e-9)


def test_a_saved_model_with_the_spatial_prior_keeps_its_components(tmp_path, rng, capsys):
    two_tone(tmp_path / "a.png", rng)
    run([tmp_path / "a.png", "-k", "2", "--out", tmp_path / "fit"], capsys)
    saved = tmp_path / "fit" / "a_model.json"
    status, out, err = run(
        [tmp_path / "a.png", "--model", saved, "--spatial", "1", "--out", tmp_path / "s"], capsys
    )
    assert status == 0, err
    assert record_of(tmp_path / "s", "a")["means"] == record_of(tmp_path / "fit", "a")["means"]


def test_models_that_do_not_fit_fail_each_image_in_one_line(tmp_path, rng, capsys):
    """A colour model on a gray image, an 8-bit binned model on a 16-bit image, a file that is
    missing, a FIFO, not JSON, JSON nested 100,000 deep, or holds no valid mixture (an
    asymmetric covariance among them): one error line per image, exit status 1;
    --model with --shared or -k is bad usage."""
    two_tone(tmp_path / "gray.png", rng)
    two_tone(tmp_path / "colour.png", rng, color=True)
    Image.fromarray((rng.integers(0, 4, (20, 30)) * 20000).astype(np.uint16)).save(
        tmp_path / "deep.png"
    )
    run([tmp_path / "colour.png", "--out", tmp_path / "c"], capsys)
    run([tmp_path / "gray.png", "--quantized", "--out", tmp_path / "q"], capsys)
    good = record_of(tmp_path / "q", "gray")
    broken = {
        "nan.json": dict(good, means=[[float("nan")]] * good["k"]),
        "singular.json": dict(good, covariances=[[[-1.0]]] * good["k"]),
        "weights.json": dict(good, weights=[0.9] * good["k"]),
        "shapes.json": dict(good, means=[[0.5, 0.5, 0.5]] * good["k"]),
    }
    colour = record_of(tmp_path / "c", "colour")
    skewed = np.array(colour["covariances"])
    skewed[0, 0, 1] += 1e-3  # no longer symmetric, still positive definite
    broken["asymmetric.json"] = dict(colour, covariances=skewed.tolist())
    for name, record in broken.items():
        (tmp_path / name).write_text(json.dumps(record))
    (tmp_path / "text.json").write_text("not json")
    (tmp_path / "nested.json").write_text("[" * 100_000 + "]" * 100_000)
    os.mkfifo(tmp_path / "fifo.json")  # opened, it would wait for a writer for ever
    cases = [
        (
            "gray.png",
            tmp_path / "c" / "colour_model.json",
            "is of color images; this image is gray",
        ),
        ("deep.png", tmp_path / "q" / "gray_model.json", "8-bit gray levels as bins"),
        ("gray.png", tmp_path / "missing.json", "no such file"),
        ("gray.png", tmp_path / "fifo.json", "not a regular file (a FIFO)"),
        ("gray.png", tmp_path / "text.json", "no usable model"),
        ("gray.png", tmp_path / "nested.json", "no usable model (its JSON is nested too deeply)"),
        ("colour.png", tmp_path / "asymmetric.json", "a covariance matrix is not symmetric"),
    ] + [("gray.png", tmp_path / name, "no usable model") for name in broken]
    for image, model, words in cases:
        status, out, err = run(
            [tmp_path / image, "--model", model, "--out", tmp_path / "o"], capsys
        )
        lines = err.strip().splitlines()
        assert status == 1 and lines[0].startswith(f"error: {tmp_path / image}: "), err
        assert words in lines[0] and len(lines) == 2 and "Traceback" not in err
    for clash in (["--shared"], ["-k", "3"]):
        status, out, err = run(
            [tmp_path / "gray.png", "--model", tmp_path / "q" / "gray_model.json", *clash]
            + ["--out", tmp_path / "o"],
            capsys,
        )
        assert status == 2 and err.startswith("error: usage: --model does not combine with")


def test_a_model_saved_by_the_api_is_applied_as_a_runs(tmp_path, rng, capsys):
    """GaussianMixtureFit.to_record / from_record: a round trip to the last digit; a record
    saved as JSON by the API labels an image on the command line as the API does."""
    image = two_tone(tmp_path / "a.png", rng, color=True)
    labels, _, model = seg.segment_image(image, 2, covariance_type="tied")
    again = seg.GaussianMixtureFit.from_record(json.loads(json.dumps(model.to_record())))
    for name in ("weights", "means", "covariances"):
        assert np.array_equal(getattr(again, name), getattr(model, name))
    assert again.covariance_type == "tied" and np.array_equal(
        again.predict(image.reshape(-1, 3) / 255), labels.ravel()
    )
    (tmp_path / "model.json").write_text(json.dumps(model.to_record()))
    status, out, err = run(
        [tmp_path / "a.png", "--model", tmp_path / "model.json", "--out", tmp_path / "o"], capsys
    )
    assert status == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "o" / "a_labels.png")), labels)
    with pytest.raises(ValueError, match="not a model record"):
        seg.GaussianMixtureFit.from_record({"weights": [1.0]})


def test_a_saved_model_with_a_bias_field_fits_only_the_field(tmp_path, capsys):
    """--model with --bias-field: the field is fitted to each image, the saved mixture of
    corrected intensities held fixed; on the image it was written for, the labels of its run."""
    from conftest import biased_phantom

    _, biased, _, inside, _ = biased_phantom(np.random.default_rng(3))
    Image.fromarray(biased).save(tmp_path / "scan.png")
    run([tmp_path / "scan.png", "--bias-field", "-k", "3", "--out", tmp_path / "fit"], capsys)
    saved = tmp_path / "fit" / "scan_model.json"
    for extra in ([], ["--spatial", "0.5"]):
        out_dir = tmp_path / f"applied{len(extra)}"
        status, out, err = run(
            [tmp_path / "scan.png", "--bias-field", "--model", saved, *extra, "--out", out_dir],
            capsys,
        )
        assert status == 0, err
        record = record_of(out_dir, "scan")
        assert record["model_file"] == str(saved) and (out_dir / "scan_bias.png").exists()
        fitted = np.asarray(Image.open(tmp_path / "fit" / "scan_labels.png"))
        applied = np.asarray(Image.open(out_dir / "scan_labels.png"))
        assert np.mean(fitted[inside] == applied[inside]) > 0.99


def test_a_saved_models_tiny_variance_is_not_called_a_reg_covar_collapse(tmp_path, rng, capsys):
    """A --model whose component has a variance of 1e-300 was not fitted here: the note names
    the model file, not the --reg-covar floor this run never applied."""
    two_tone(tmp_path / "gray.png", rng)
    run([tmp_path / "gray.png", "-k", "3", "--out", tmp_path / "fit"], capsys)
    record = record_of(tmp_path / "fit", "gray")
    record["covariances"][0] = [[1e-300]]
    (tmp_path / "tiny.json").write_text(json.dumps(record))
    status, out, err = run(
        [tmp_path / "gray.png", "--model", tmp_path / "tiny.json", "--out", tmp_path / "o"], capsys
    )
    assert status == 0 and "reg-covar" not in err and "the fit" not in err, err
    assert f"component 0 of the model {tmp_path / 'tiny.json'} has a variance under 2e-06" in err


@pytest.mark.parametrize("signum, status, line", [(2, 130, "interrupted"), (15, 143, "terminated")])
def test_a_signal_while_the_program_loads_is_one_line(tmp_path, signum, status, line):
    """Ctrl-C or SIGTERM while the modules load (here NumPy's import made to take a second):
    the same one line and status as during a run, not a traceback."""
    import os
    import subprocess
    import sys
    import time

    from conftest import ROOT

    shim = tmp_path / "shim" / "numpy"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text(
        "import importlib, sys, time\n"
        "time.sleep(1.5)\n"
        f"sys.path.remove({str(shim.parent)!r})\n"
        "del sys.modules['numpy']\n"
        "sys.modules['numpy'] = importlib.import_module('numpy')\n"
    )
    environment = dict(os.environ, PYTHONPATH=str(shim.parent))
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "ImageSegmentation.py"), str(tmp_path / "none.png")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    time.sleep(0.7)  # past Python's own start, inside the import
    process.send_signal(signum)
    out, err = process.communicate(timeout=60)
    assert (process.returncode, err, out) == (status, f"error: {line}\n", "")


@pytest.mark.slow
def test_a_batch_workers_image_starts_no_thread(tmp_path, rng):
    """A batch's worker process runs its passes on one thread (N workers use N cores, not N
    times the cores): segmenting a 1.2-megapixel image there, with the spatial prior or with
    every output and the probability maps, starts no thread; in the main process the same
    image's passes run on threads (so this check can fail)."""
    import threading

    from conftest import block_labels

    labels = block_labels(1000, 1200, 3, rng)
    pixels = mixture_image(labels, [[0.2], [0.5], [0.8]], np.full((3, 1, 1), 0.01), rng)
    Image.fromarray(pixels).save(tmp_path / "big.png")
    out = tmp_path / "out"
    out.mkdir()

    def threads_started(run_config):
        started = []
        threading.settrace(lambda *args: started.append(threading.current_thread().name))
        try:
            outcome = seg.segment_file(tmp_path / "big.png", "big", seg.Batch(run_config, {}))
        finally:
            threading.settrace(None)
        assert outcome.error is None, outcome.error
        return started

    for options in (["--probabilities"], ["--spatial", "0.5"]):
        config = seg.parse_command_line([str(tmp_path / "big.png"), *options, "--out", str(out)])
        assert threads_started(seg._one_thread_a_worker(config)) == [], options
    if (os.cpu_count() or 1) > 1:  # the same image's passes in the main process: on threads
        assert threads_started(config)

"""The command line end to end: the output contract, determinism, the default run."""

import os
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from conftest import ROOT, mixture_image, record_of, run, seg, two_tone
from PIL import Image

JSON_KEYS = {
    "image",
    "width",
    "height",
    "mode",
    "k",
    "covariance_type",
    "distinct_values",
    "weights",
    "means",
    "covariances",
    "log_likelihood",
    "n_iter",
    "converged",
    "seed",
    "settings",
    "seconds",
}
SETTINGS_KEYS = {
    "components",
    "mode",
    "covariance",
    "max_iter",
    "tol",
    "n_init",
    "init",
    "seed",
    "reg_covar",
    "out",
    "max_pixels",
}


@pytest.mark.parametrize("color", [False, True], ids=["gray", "color"])
def test_every_output_exists_loads_and_follows_the_contract(tmp_path, rng, capsys, color):
    image = two_tone(tmp_path / "scan.png", rng, color=color)
    status, out, err = run(
        [tmp_path / "scan.png", "-k", "2", "--out", tmp_path / "out"], capsys, figures=True
    )
    assert status == 0, err
    out_dir = tmp_path / "out"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        f"scan_{s}"
        for s in ("segmented.png", "labels.png", "loglik.png", "comparison.png", "model.json")
    )
    record = record_of(out_dir, "scan")
    assert JSON_KEYS <= set(record) and SETTINGS_KEYS <= set(record["settings"])
    assert set(record["seconds"]) == {"load", "fit", "write", "total"}
    assert record["mode"] == ("color" if color else "gray") and record["k"] == 2
    assert (record["width"], record["height"]) == (60, 40)
    d = 3 if color else 1
    assert np.shape(record["means"]) == (2, d) and np.shape(record["covariances"]) == (2, d, d)
    assert len(record["log_likelihood"]) == record["n_iter"]
    labels = np.asarray(Image.open(out_dir / "scan_labels.png"))
    assert labels.shape == (40, 60) and labels.dtype == np.uint8
    assert set(np.unique(labels)) == {0, 1}
    # Components numbered by luminance: the darker half of the image is component 0.
    luma = np.asarray(record["means"]) @ ([0.299, 0.587, 0.114] if color else [1.0])
    assert luma[0] < luma[1]
    brightness = (image @ [0.299, 0.587, 0.114]) if color else image.astype(float)
    darker = (
        slice(0, 30) if brightness[:, :30].mean() < brightness[:, 30:].mean() else slice(30, 60)
    )
    assert np.mean(labels[:, darker] == 0) > 0.95
    segmented = Image.open(out_dir / "scan_segmented.png")
    assert segmented.size == (60, 40)
    recoloured = np.asarray(segmented.convert("RGB" if color else "L"))
    expected = np.rint(np.asarray(record["means"]) * 255).astype(np.uint8)
    assert np.array_equal(recoloured, expected[labels] if color else expected[labels, 0])
    # The figures: two plots side by side, and three panels of the image's landscape shape.
    width, height = Image.open(out_dir / "scan_loglik.png").size
    assert width > 2 * height
    width, height = Image.open(out_dir / "scan_comparison.png").size
    assert width > 3 * height * 60 / 40 * 0.8
    assert f"scan.png: 60x40 {'color' if color else 'gray'} K=2 distinct=" in out
    assert "iterations=" in out and "loglik=" in out


def test_same_command_writes_the_same_images(tmp_path, rng, capsys):
    two_tone(tmp_path / "a.png", rng, color=True)
    for out in ("one", "two"):
        assert (
            run(
                [tmp_path / "a.png", "--out", tmp_path / out, "--n-init", "2"], capsys, figures=True
            )[0]
            == 0
        )
    for name in ("labels", "segmented", "loglik", "comparison"):
        assert (tmp_path / "one" / f"a_{name}.png").read_bytes() == (
            tmp_path / "two" / f"a_{name}.png"
        ).read_bytes()
    one, two = (record_of(tmp_path / d, "a") for d in ("one", "two"))
    one.pop("seconds"), two.pop("seconds")
    one["settings"].pop("out"), two["settings"].pop("out")
    assert one == two


def test_default_components_three_gray_five_color(tmp_path, rng, capsys):
    rng_image = rng.integers(0, 256, size=(30, 30, 3), dtype=np.uint8)
    Image.fromarray(rng_image).save(tmp_path / "c.png")
    Image.fromarray(rng_image[..., 0]).save(tmp_path / "g.png")
    assert run([tmp_path, "--out", tmp_path / "out", "--max-iter", "3"], capsys)[0] == 0
    assert record_of(tmp_path / "out", "c")["k"] == 5
    assert record_of(tmp_path / "out", "g")["k"] == 3


def test_mode_switches(tmp_path, rng, capsys):
    two_tone(tmp_path / "c.png", rng, color=True)
    assert (
        run([tmp_path / "c.png", "--mode", "gray", "-k", "2", "--out", tmp_path / "g"], capsys)[0]
        == 0
    )
    record = record_of(tmp_path / "g", "c")
    assert record["mode"] == "gray" and np.shape(record["means"]) == (2, 1)
    assert Image.open(tmp_path / "g" / "c_segmented.png").mode == "L"
    # An RGB file whose channels are all equal is gray in auto mode.
    gray = np.repeat(rng.integers(0, 256, (20, 20), dtype=np.uint8)[..., None], 3, axis=2)
    Image.fromarray(gray).save(tmp_path / "equal.png")
    assert run([tmp_path / "equal.png", "--out", tmp_path / "e", "-k", "2"], capsys)[0] == 0
    assert record_of(tmp_path / "e", "equal")["mode"] == "gray"
    assert (
        run(
            [tmp_path / "equal.png", "--mode", "color", "--out", tmp_path / "f", "-k", "2"], capsys
        )[0]
        == 0
    )
    assert record_of(tmp_path / "f", "equal")["mode"] == "color"


@pytest.mark.parametrize("covariance", ["full", "diag", "spherical", "tied"])
def test_covariance_shapes_in_json(tmp_path, rng, capsys, covariance):
    two_tone(tmp_path / "c.png", rng, color=True)
    assert (
        run([tmp_path / "c.png", "--covariance", covariance, "-k", "2", "--out", tmp_path], capsys)[
            0
        ]
        == 0
    )
    record = record_of(tmp_path, "c")
    expected = {"full": (2, 3, 3), "diag": (2, 3), "spherical": (2,), "tied": (3, 3)}[covariance]
    assert np.shape(record["covariances"]) == expected


def test_verbose_prints_every_iteration_and_quiet_prints_nothing(tmp_path, rng, capsys):
    two_tone(tmp_path / "a.png", rng)
    status, out, err = run(
        [tmp_path / "a.png", "-v", "--tol", "0", "--max-iter", "4", "--out", tmp_path], capsys
    )
    assert status == 0 and [f"iteration {i}:" in err for i in range(1, 5)] == [True] * 4
    status, out, err = run([tmp_path / "a.png", "-q", "--out", tmp_path], capsys)
    assert status == 0 and out == "" and err == ""


def test_model_json_agrees_with_the_label_map(tmp_path, rng, capsys):
    image = two_tone(tmp_path / "a.png", rng, color=True)
    run([tmp_path / "a.png", "-k", "3", "--out", tmp_path], capsys)
    record = record_of(tmp_path, "a")
    model = seg.GaussianMixtureFit(
        np.array(record["weights"]),
        np.array(record["means"]),
        np.array(record["covariances"]),
        "full",
    )
    labels = np.asarray(Image.open(tmp_path / "a_labels.png"))
    assert np.array_equal(model.predict(image.reshape(-1, 3) / 255.0).reshape(labels.shape), labels)
    assert model.score(image.reshape(-1, 3) / 255.0) == pytest.approx(
        record["log_likelihood"][-1], abs=1e-9
    )


@pytest.mark.slow
def test_blas_threads_asked_for_change_no_bit(tmp_path):
    """As a command, BLAS runs on one thread whatever the environment asks: its own threads
    changed the coffee fit's log-likelihood in its last digits (8.9e-16) with their number, so
    with the machine's cores, and set a Dask worker (one BLAS thread) apart from --jobs 1."""
    records = []
    for threads in ("1", "2"):
        environment = dict(os.environ, **dict.fromkeys(seg.BLAS_THREAD_VARIABLES, threads))
        out = tmp_path / "out"  # the same folder: the record names it
        command = [sys.executable, ROOT / "ImageSegmentation.py", ROOT / "images" / "coffee.png"]
        subprocess.run(
            [*command, "-q", "--outputs", "json", "--out", out], env=environment, check=True
        )
        record = record_of(out, "coffee")
        record.pop("seconds")
        records.append(record)
    assert records[0] == records[1]


def test_default_run_from_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    clone.mkdir()
    shutil.copy(ROOT / "ImageSegmentation.py", clone)
    shutil.copytree(ROOT / "images", clone / "images")
    result = subprocess.run(
        [sys.executable, "ImageSegmentation.py"],
        cwd=clone,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    samples = [p for p in (clone / "images").iterdir() if p.suffix in (".png", ".jpg")]
    assert len(samples) >= 2
    for sample in samples:
        for suffix in ("segmented.png", "labels.png", "loglik.png", "comparison.png", "model.json"):
            assert (clone / "output" / f"{sample.stem}_{suffix}").stat().st_size > 0
    assert len(result.stdout.splitlines()) == len(samples)
    modes = {record_of(clone / "output", p.stem)["mode"] for p in samples}
    assert modes == {"gray", "color"}


def test_show_without_a_display_only_saves(tmp_path, rng):
    two_tone(tmp_path / "a.png", rng)
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env["MPLBACKEND"] = "Agg"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "ImageSegmentation.py"),
            str(tmp_path / "a.png"),
            "--show",
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "note: --show: matplotlib has no interactive backend here (agg)" in result.stderr.lower()
    assert "Traceback" not in result.stderr and "Warning" not in result.stderr
    assert (tmp_path / "out" / "a_comparison.png").exists()


def test_more_than_256_components_write_16_bit_label_maps(tmp_path, capsys):
    levels = (
        (np.arange(30 * 20) * 100).astype(np.uint16).reshape(30, 20)
    )  # 600 distinct 16-bit levels
    Image.fromarray(levels).save(tmp_path / "deep.png")
    status, out, err = run(
        [tmp_path / "deep.png", "-k", "300", "--max-iter", "2", "--out", tmp_path], capsys
    )
    assert status == 0, err
    labels = Image.open(tmp_path / "deep_labels.png")
    assert labels.mode.startswith("I") and np.asarray(labels).max() > 255
    record = record_of(tmp_path, "deep")
    assert record["k"] == 300
    # Most levels keep a component of their own: more than 200 labels are used.
    assert 200 <= len(np.unique(np.asarray(labels))) <= 300
    colour = np.stack([levels % 256, levels // 256, (levels // 7) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(colour).save(tmp_path / "many.png")
    status, out, err = run(
        [tmp_path / "many.png", "-k", "260", "--max-iter", "2", "--out", tmp_path], capsys
    )
    assert status == 0, err
    assert Image.open(tmp_path / "many_segmented.png").mode == "RGB"  # no palette holds 260 colours
    assert Image.open(tmp_path / "many_labels.png").mode.startswith("I")


def test_outputs_writes_only_what_is_asked(tmp_path, rng, capsys):
    """--outputs labels,json: those two files, the same bytes as in a full run, and no figure
    drawn (matplotlib is not even imported); a name it does not know is bad usage."""
    two_tone(tmp_path / "a.png", rng)
    status, out, err = run(
        [tmp_path / "a.png", "--outputs", "labels,json", "--out", tmp_path / "some"], capsys
    )
    assert status == 0 and "a.png: 60x40 gray K=3" in out
    written = sorted(p.name for p in (tmp_path / "some").iterdir())
    assert written == ["a_labels.png", "a_model.json"]
    assert record_of(tmp_path / "some", "a")["settings"]["outputs"] == ["labels", "json"]
    run([tmp_path / "a.png", "--out", tmp_path / "all"], capsys)
    for name in written[:1]:
        assert (tmp_path / "some" / name).read_bytes() == (tmp_path / "all" / name).read_bytes()
    status, out, err = run([tmp_path / "a.png", "--outputs", "labels", "--out", tmp_path], capsys)
    assert status == 0 and (tmp_path / "a_labels.png").exists()
    assert not (tmp_path / "a_model.json").exists()
    code = (
        "import sys, ImageSegmentation as seg; "
        f"seg.main([{str(tmp_path / 'a.png')!r}, '--outputs', 'labels,json', '-q', "
        f"'--out', {str(tmp_path / 'x')!r}, '--jobs', '1']); "
        "print('matplotlib' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "False", result.stderr
    with pytest.raises(SystemExit) as exit_info:
        seg.main([str(tmp_path / "a.png"), "--outputs", "labels,figures", "--out", str(tmp_path)])
    assert exit_info.value.code == 2


def usage_error(argv, capsys):
    """The one stderr line of a command line that is bad usage (exit status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        seg.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1, err
    return err.strip()


def test_every_option_is_one_row_of_the_table():
    """OPTIONS is the one list of options: each row's fields exist in their dataclass, every
    field of RunConfig is some option's, --brain's preset names options, and settings()
    records the options marked for it, in the table's order, under their names."""
    from dataclasses import fields

    owners = {"run": seg.RunConfig, "segment": seg.SegmentOptions, "fit": seg.FitOptions}
    names = [option.name for option in seg.OPTIONS]
    flags = [flag for option in seg.OPTIONS for flag in option.flags]
    assert len(set(names)) == len(names) and len(set(flags)) == len(flags)
    targets = [target.split(".") for option in seg.OPTIONS for target in option.fields]
    for owner, name in targets:
        assert name in {f.name for f in fields(owners[owner])}, (owner, name)
    run_fields = {f.name for f in fields(seg.RunConfig)} - {"inputs", "segment"}
    assert run_fields == {name for owner, name in targets if owner == "run"}
    assert {name for name, _ in seg.BRAIN_PRESET} <= set(names)
    config = seg.parse_command_line(["a.png", "--spacing", "2,1,1"])
    recorded = [option.name for option in seg.OPTIONS if option.in_settings]
    assert list(config.settings()) == recorded
    assert "spacing" not in seg.parse_command_line(["a.png"]).settings()


def _outside(domain):
    """Values a Domain refuses, as the command line types them and as the API gets them."""
    if domain.choices:
        return [("often", "often")]
    below = domain.minimum - 1
    values = [(str(below), domain.kind(below)), ("nan", float("nan"))]
    return values + ([("1.5", 1.5)] if domain.kind is int else [])


def test_the_command_line_and_the_api_refuse_the_same_values(capsys):
    """Each setting's Domain (on its dataclass field) is the one rule: every option with one is
    refused by the command line (usage error, exit 2) and by FitOptions / SegmentOptions (a
    ValueError naming it) for the same values, and both take its default; every number or
    choice of the API's settings has a Domain."""
    from dataclasses import fields

    owners = {"segment": seg.SegmentOptions, "fit": seg.FitOptions}
    checked = 0
    for option in seg.OPTIONS:
        owner, name = option.fields[0].split(".")
        if option.domain is None:
            continue
        checked += 1
        assert option.default in option.domain
        for typed, value in _outside(option.domain):
            err = usage_error(["a.png", f"{option.flags[-1]}={typed}"], capsys)
            assert f"argument {option.flags[-1]}" in err, (option.name, err)
            with pytest.raises(ValueError, match=f"{name} must be "):
                owners[owner](**{name: value})
    assert checked == 15
    for owner in owners.values():
        for item in fields(owner):
            if item.type in ("int", "float", "str", "int | None"):
                assert "domain" in item.metadata, (owner.__name__, item.name)


def test_help_is_grouped_and_gives_examples(capsys):
    """--help: the options in groups a user looks for, names never broken at a hyphen, the
    examples, the formats and the combination rules in the epilog."""
    with pytest.raises(SystemExit):
        seg.main(["--help"])
    text = capsys.readouterr().out
    groups = ["input:", "the model:", "a spatial prior", "brain MRI", "outputs:", "batches:"]
    assert all(f"\n{group}" in text for group in groups), text
    assert text.index("\nthe model:") < text.index("--max-iter N ") < text.index("\noutputs:")
    assert "examples:" in text and "nibabel" in text and "--covariance tied" in text
    for line in text.splitlines():  # a line that ends in a hyphen broke an option's name
        assert not line.rstrip().endswith("-"), line


@pytest.mark.parametrize(
    "argv, hint",
    [
        (["--componets", "4"], "did you mean --components?"),
        (["--spatail", "1"], "did you mean --spatial?"),
        (["--covariance", "ful"], "did you mean full?"),
        (["-k", "fve"], "'fve': give a whole number >= 1, or auto"),
        (["--spatial", "strong"], "'strong': give a number >= 0, or auto"),
    ],
)
def test_a_typo_is_answered_with_the_nearest_valid_word(tmp_path, capsys, argv, hint):
    err = usage_error([*argv, "--out", tmp_path], capsys)
    assert err.startswith("error: usage: ") and hint in err, err
    assert "./-NAME" not in err  # the hint for a file named with a dash is for files only


@pytest.mark.parametrize("before", [True, False], ids=["typed-before", "typed-after"])
def test_a_typed_option_wins_over_brain_from_either_side(tmp_path, rng, capsys, before):
    """--brain sets defaults: -k 4 and --spatial 0 typed before or after it both hold, and the
    preset's other settings still apply."""
    two_tone(tmp_path / "scan.png", rng)
    typed = ["-k", "4", "--spatial", "0"]
    argv = [*typed, "--brain"] if before else ["--brain", *typed]
    status, out, err = run([tmp_path / "scan.png", *argv, "--out", tmp_path / "o"], capsys)
    settings = record_of(tmp_path / "o", "scan")["settings"]
    assert status == 0 and settings["components"] == 4 and settings["spatial"] == 0.0, err
    assert settings["brain"] and settings["covariance"] == "tied" and settings["partial_volume"]


def test_brain_with_a_saved_model_takes_the_models_classes(tmp_path, rng, capsys):
    """--brain --model: the preset's K gives way to the model's (once a usage error about a -k
    the user never typed); -k typed with --model is still bad usage, named as typed."""
    two_tone(tmp_path / "scan.png", rng)
    run([tmp_path / "scan.png", "--brain", "--out", tmp_path / "fit"], capsys)
    model = tmp_path / "fit" / "scan_model.json"
    status, out, err = run(
        [tmp_path / "scan.png", "--brain", "--model", model, "--out", tmp_path / "o"], capsys
    )
    assert status == 0 and "usage" not in err, err
    status, out, err = run(
        [tmp_path / "scan.png", "--brain", "-k", "3", "--model", model, "--out", tmp_path / "o"],
        capsys,
    )
    assert status == 2 and "--model does not combine with -k" in err


def test_brain_on_an_image_unlike_a_brain_scan_says_so(tmp_path, rng, capsys):
    """--brain on a colour photo, on an image with no black border, on a scan with few pixels
    inside: a note each (the run goes on).  A scan whose brainstem the field of view cuts (the
    brain on 8 of the border's 316 pixels) is skull-stripped: no note."""
    two_tone(tmp_path / "photo.png", rng, color=True)
    small = np.zeros((40, 40), np.uint8)
    small[10:30, 10:30] = rng.integers(60, 200, (20, 20))
    Image.fromarray(small).save(tmp_path / "small.png")
    cut = np.zeros((80, 80), np.uint8)
    cut[5:75, 5:75] = rng.integers(60, 200, (70, 70))
    cut[75:, 36:44] = rng.integers(60, 200, (5, 8))  # the brainstem, out of the bottom
    Image.fromarray(cut).save(tmp_path / "cut.png")
    images = [tmp_path / name for name in ("photo.png", "small.png", "cut.png")]
    status, out, err = run([*images, "--brain", "--out", tmp_path / "o"], capsys)
    photo, small = f"note: {tmp_path / 'photo.png'}: ", f"note: {tmp_path / 'small.png'}: "
    assert status == 0, err
    assert f"{photo}--brain is made for gray scans; this image is in colour" in err
    assert (
        f"{photo}--brain is made for skull-stripped scans, black outside the brain; only 0 % of "
        f"this image's border is black" in err
    )
    assert f"{small}only 400 pixels inside the brain" in err
    assert f"{small}--brain is made for skull-stripped" not in err
    assert f"note: {tmp_path / 'cut.png'}: --brain is made for skull-stripped" not in err


def test_outputs_that_the_run_cannot_make_are_noted(tmp_path, rng, capsys):
    """--outputs bias without --bias-field, bic without -k auto: one note each, not silence."""
    two_tone(tmp_path / "gray.png", rng)
    status, out, err = run(
        [tmp_path / "gray.png", "--outputs", "labels,bic,bias", "--out", tmp_path / "o"], capsys
    )
    assert status == 0
    assert "note: --outputs bic: written only with -k auto; not written in this run" in err
    assert "note: --outputs bias: written only with --bias-field; not written in this run" in err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["gray_labels.png"]


def test_a_run_that_writes_nothing_leaves_no_folder_and_says_so(tmp_path, rng, capsys):
    """Every image failed: the output folder the run created is gone, and the summary says
    nothing was written; one image: "1 image segmented" (no plural s); a folder that was there
    before stays."""
    (tmp_path / "bad.png").write_text("not an image")
    status, out, err = run([tmp_path / "bad.png", "--out", tmp_path / "new" / "o"], capsys)
    assert status == 1 and not (tmp_path / "new" / "o").exists()
    assert err.strip().splitlines()[-1].endswith("; nothing written"), err
    two_tone(tmp_path / "good.png", rng)
    status, out, err = run([tmp_path / "good.png", "--out", tmp_path / "o"], capsys)
    assert err.strip().splitlines()[-1].startswith("1 image segmented, 0 failed, in "), err
    assert err.strip().endswith(f"outputs in {tmp_path / 'o'}")
    (tmp_path / "kept").mkdir()
    run([tmp_path / "bad.png", "--out", tmp_path / "kept"], capsys)
    assert (tmp_path / "kept").is_dir()


def _colourbar_labels(figure):
    """The tick labels of each colour bar of a drawn figure, in the figure's order."""
    figure.canvas.draw()
    return [
        [tick.get_text() for tick in ax.get_yticklabels()]
        for ax in figure.axes
        if ax.get_label() == "<colorbar>"
    ]


def test_figures_name_what_they_show(rng):
    """Tissue names on the label map's colour bar where the labels are tissues, numbers
    otherwise; a NIfTI volume's rows named by their anatomical plane (from the affine), with
    a colour bar; the convergence plot's second panel on a log scale; no curve for a model
    that was not fitted here."""
    from conftest import phantom

    image, _, inside = phantom(rng)
    picture = seg.with_mask(seg.picture_from_array(image), inside)
    segmentation = seg.segment_points(picture, seg.distinct_values(picture), 3)
    tissues = seg.Captions("brain", seg.BRAIN_TISSUES)
    [bar] = _colourbar_labels(seg.plot_comparison(segmentation, tissues))
    assert bar == ["outside", "CSF", "grey matter", "white matter"]
    [bar] = _colourbar_labels(seg.plot_comparison(segmentation, seg.Captions("plain")))
    assert bar == ["0", "1", "2", "3"]
    loglik = seg.plot_log_likelihood(segmentation, tissues)
    assert [ax.get_yscale() for ax in loglik.axes] == ["linear", "log"]

    volume = np.stack([image] * 4)  # codes (4, H, W) of a NIfTI: the file's axes reversed
    affine = np.array([[0, 0, 2.0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    header = seg.Volume((1.0, 1.0, 2.0), "nifti", affine, None, file_axes_reversed=True)
    picture = replace(seg.picture_from_volume(volume), volume=header)
    segmentation = seg.segment_points(picture, seg.distinct_values(picture), 3)
    figure = seg.plot_volume_comparison(segmentation, tissues)
    rows = [ax.get_ylabel() for ax in figure.axes if ax.get_ylabel()]
    # file axis 0 maps on world z (axial), 1 on y (coronal), 2 on x (sagittal)
    assert rows == ["axial (middle slice)", "coronal (middle slice)", "sagittal (middle slice)"]
    assert len(_colourbar_labels(figure)) == 3

    saved = seg.SharedModel(segmentation.model, None, (), "gray", file="scan_model.json")
    unfitted = replace(segmentation.model, run=replace(segmentation.model.run, n_iter=0))
    given = replace(segmentation, shared=saved, model=unfitted)
    texts = [
        text.get_text() for ax in seg.plot_log_likelihood(given, tissues).axes for text in ax.texts
    ]
    assert any(
        text.startswith("No fit: the image was labelled with the saved model") for text in texts
    )


def test_a_fit_reports_its_stages_to_a_progress_callback(rng):
    """-k auto names each K it tries, the spatial prior its own stage; a plain callable (the
    API's) still gets (n_iter, log_likelihood) only."""
    image = mixture_image(
        np.repeat(np.arange(3), 400).reshape(30, 40), [[0.2], [0.5], [0.8]], [[[0.003]]] * 3, rng
    )
    picture = seg.picture_from_array(image)
    stages = []
    progress = seg.Progress(lambda stage, n_iter, log_likelihood: stages.append(stage))
    seg.segment_points(
        picture, seg.distinct_values(picture), "auto", k_max=3, spatial=0.5, on_iteration=progress
    )
    assert list(dict.fromkeys(stages)) == [
        "K = 1 of 1..3",
        "K = 2 of 1..3",
        "K = 3 of 1..3",
        "spatial prior",
    ]
    plain = []
    seg.fit_points(
        seg.distinct_values(picture), "auto", k_max=2, on_iteration=lambda *args: plain.append(args)
    )
    assert plain and {len(args) for args in plain} == {2}


def test_progress_is_drawn_only_on_a_terminal(tmp_path, rng):
    """On a terminal (a pseudo-terminal here), the batch's progress line is drawn on stderr,
    each drawing erased before a line is written; piped, stderr has only the run's lines; with
    -q, nothing."""
    import pty

    for i in range(3):
        two_tone(tmp_path / f"img{i}.png", rng)
    argv = [sys.executable, str(ROOT / "ImageSegmentation.py"), str(tmp_path), "--jobs", "1"]
    argv += ["--outputs", "labels,json"]  # no figures: the progress line is what is looked at
    piped = subprocess.run([*argv, "--out", str(tmp_path / "a")], capture_output=True, text=True)
    assert "\r" not in piped.stderr and "[1/3]" not in piped.stderr
    leader, follower = pty.openpty()
    with subprocess.Popen(
        [*argv, "--out", str(tmp_path / "b")], stdout=subprocess.DEVNULL, stderr=follower
    ) as process:
        os.close(follower)
        drawn = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the program closed its end
                break
            if not chunk:
                break
            drawn += chunk
    os.close(leader)
    text = drawn.decode()
    assert process.returncode == 0
    assert "\r\x1b[K[1/3] " in text and "\r\x1b[K[3/3] " in text, text
    assert "left" in text and "iteration" not in text  # a quick image: its count, no fit's steps
    lines = [line.split("\x1b[K")[-1] for line in text.replace("\r\n", "\n").split("\n") if line]
    assert lines[-1].startswith("3 images segmented, 0 failed"), lines
    quiet = subprocess.run([*argv, "-q", "--out", str(tmp_path / "c")], capture_output=True)
    assert quiet.stderr == b""


def test_a_long_fit_draws_its_stage_and_a_quick_one_does_not(capsys):
    """The progress line shows a fit's stage and iteration once its image has taken
    PROGRESS_AFTER seconds, at most every PROGRESS_EVERY; before that, nothing."""
    from pathlib import Path

    console = seg.Console(2, progress=True)
    console.iteration(Path("scan.png"), "K = 2 of 1..8", 5)
    assert capsys.readouterr().err == ""  # the image has only just begun
    console.image_started -= seg.PROGRESS_AFTER + 1
    console.iteration(Path("scan.png"), "K = 2 of 1..8", 6)
    console.iteration(Path("scan.png"), "K = 2 of 1..8", 7)  # too soon after the last drawing
    err = capsys.readouterr().err
    assert (
        err == f"\r\x1b[K[0/2] scan.png: K = 2 of 1..8, iteration 6, {seg.PROGRESS_AFTER + 1:.0f}s"
    )


def test_posterior_maps_run_on_the_passes_they_are_given():
    """A batch's worker runs on one thread: its --probabilities maps of an image above a
    megapixel start no thread of their own (they once started one a core in every worker);
    given two threads, they use them."""
    import threading

    rng = np.random.default_rng(7)
    image = np.repeat(rng.integers(0, 3, (120, 100)) * 100, 10, axis=0).repeat(10, axis=1)
    picture = seg.picture_from_array(image.astype(np.uint8))  # 1.2 MP: two lookup blocks
    segmentation = seg.segment_points(picture, seg.distinct_values(picture), 3)
    started = []  # the threads started (threading.settrace sees each one start)
    threading.settrace(lambda *args: started.append(threading.current_thread().name))
    try:
        maps = dict(seg.posterior_maps(segmentation, seg.Passes(threads=1)))
        assert sorted(maps) == [0, 1, 2] and started == []
        dict(seg.posterior_maps(segmentation, seg.Passes(threads=2)))
    finally:
        threading.settrace(None)
    assert started and all(name.startswith("bands") for name in started)

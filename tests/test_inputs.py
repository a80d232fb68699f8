"""Every input a user can throw at it: image kinds, degenerate content, errors, nothing lost."""

import json
import os
import struct
import zlib

import numpy as np
import pytest
from conftest import outputs_of, record_of, run, run_on_a_full_disk, seg, two_tone
from PIL import Image


def assert_segmented(out_dir, stem, shape, mode=None):
    paths = outputs_of(out_dir, stem)
    assert all(p.exists() for p in paths.values())
    labels = np.asarray(Image.open(paths["labels.png"]))
    record = json.loads(paths["model.json"].read_text())
    assert labels.shape == shape
    assert labels.max() < record["k"]
    assert mode is None or record["mode"] == mode
    assert all(
        np.all(np.isfinite(np.asarray(record[key], dtype=float)))
        for key in ("weights", "means", "covariances", "log_likelihood")
    )
    return record


# --- usage errors: status 2, one line, no traceback -----------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["-k", "0"],
        ["-k", "two"],
        ["-k", "2.5"],
        ["--tol", "-1"],
        ["--tol", "nan"],
        ["--max-iter", "0"],
        ["--n-init", "0"],
        ["--reg-covar", "-1e-6"],
        ["--no-such-option"],
        ["--covariance", "round"],
        ["--mode", "sepia"],
        ["--max-pixels", "0"],
    ],
)
def test_bad_arguments_are_usage_errors(tmp_path, capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        seg.main(argv + ["--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    )


def test_unwritable_output_folder_is_reported_before_any_work(tmp_path, rng, capsys):
    two_tone(tmp_path / "a.png", rng)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    status, out, err = run([tmp_path / "a.png", "--out", blocker / "sub"], capsys)
    assert status == 2 and err.startswith("error: ") and "cannot write output folder" in err
    assert len(err.strip().splitlines()) == 1 and out == ""


# --- bad files: one-line error, status 1, the rest of the batch still done ------------------------


def bad_files(folder):
    """name -> (maker, expected words in the error)."""

    def truncated(path):
        two_tone(path, np.random.default_rng(0), size=(64, 64))
        path.write_bytes(path.read_bytes()[:200])

    def corrupt(path):
        two_tone(path, np.random.default_rng(0), size=(64, 64))
        data = bytearray(path.read_bytes())
        data[60:120] = b"\x00" * 60
        path.write_bytes(bytes(data))

    return {
        "empty.png": (lambda p: p.write_bytes(b""), "empty file"),
        "text.png": (lambda p: p.write_text("hello, not an image"), "not an image"),
        "truncated.png": (truncated, "truncated or corrupt"),
        "corrupt.png": (corrupt, "truncated or corrupt"),
    }


@pytest.mark.parametrize("name", ["empty.png", "text.png", "truncated.png", "corrupt.png"])
def test_bad_file_is_one_line_error_and_the_batch_goes_on(tmp_path, rng, capsys, name):
    maker, words = bad_files(tmp_path)[name]
    maker(tmp_path / name)
    two_tone(tmp_path / "good.png", rng)
    status, out, err = run(
        [tmp_path / name, tmp_path / "good.png", "--out", tmp_path / "out"], capsys
    )
    assert status == 1
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and name in errors[0] and words in errors[0]
    assert "Traceback" not in err
    assert_segmented(tmp_path / "out", "good", (40, 60))
    assert not any(p.exists() for p in outputs_of(tmp_path / "out", name[:-4]).values())
    assert "1 failed" in err


def test_missing_file_and_folder_without_images(tmp_path, rng, capsys):
    (tmp_path / "empty_folder").mkdir()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("no images here")
    two_tone(tmp_path / "good.png", rng)
    status, out, err = run(
        [
            tmp_path / "nope.png",
            tmp_path / "empty_folder",
            tmp_path / "docs",
            tmp_path / "good.png",
            "--out",
            tmp_path / "out",
        ],
        capsys,
    )
    assert status == 1
    assert f"error: {tmp_path / 'nope.png'}: no such file" in err
    assert f"error: {tmp_path / 'empty_folder'}: folder has no image files" in err
    assert f"error: {tmp_path / 'docs'}: folder has no image files" in err
    assert "3 failed" in err and len(out.splitlines()) == 1
    assert_segmented(tmp_path / "out", "good", (40, 60))


def test_unreadable_file(tmp_path, rng, capsys, monkeypatch):
    two_tone(tmp_path / "locked.png", rng)
    if os.geteuid() != 0:
        os.chmod(tmp_path / "locked.png", 0)
    else:  # root reads everything: make the open fail as it would for anyone else
        real_open = Image.open

        def refuse(path, *args, **kwargs):
            if str(path).endswith("locked.png"):
                raise PermissionError(13, "Permission denied", str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(Image, "open", refuse)
    status, out, err = run([tmp_path / "locked.png", "--out", tmp_path / "out"], capsys)
    assert status == 1 and f"error: {tmp_path / 'locked.png'}: permission denied" in err


def png_declaring(width, height):
    """A tiny PNG file whose header declares a huge size (a decompression bomb's shape)."""

    def chunk(kind, payload):
        return (
            struct.pack(">I", len(payload))
            + kind
            + payload
            + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def test_decompression_bomb_is_refused_before_allocating(tmp_path, capsys, rng):
    (tmp_path / "bomb.png").write_bytes(png_declaring(200_000, 200_000))  # 40 gigapixels, 150 bytes
    status, out, err = run([tmp_path / "bomb.png", "--out", tmp_path], capsys)
    assert status == 1 and "above the limit of 200,000,000" in err and "--max-pixels" in err
    two_tone(tmp_path / "small.png", rng)  # 2400 pixels
    status, out, err = run(
        [tmp_path / "small.png", "--max-pixels", "1000", "--out", tmp_path], capsys
    )
    assert status == 1 and "above the limit of 1,000" in err
    assert run([tmp_path / "small.png", "--max-pixels", "2400", "--out", tmp_path], capsys)[0] == 0


# --- every kind of image Pillow opens -------------------------------------------------------------


def gradient(height=24, width=32):
    return (np.arange(height * width).reshape(height, width) * 255 // (height * width - 1)).astype(
        np.uint8
    )


def make(kind, path):
    g = gradient()
    rgb = np.stack([g, g[::-1], 255 - g], axis=-1)
    if kind == "1":
        Image.fromarray(g > 128).save(path)
    elif kind in ("L", "RGB"):
        Image.fromarray(g if kind == "L" else rgb).save(path)
    elif kind == "LA":
        Image.fromarray(np.stack([g, 255 - g], axis=-1), mode="LA").save(path)
    elif kind == "RGBA":
        Image.fromarray(np.concatenate([rgb, g[..., None]], axis=-1), mode="RGBA").save(path)
    elif kind == "P":
        Image.fromarray(rgb).quantize(8).save(path)
    elif kind == "P-transparent":
        image = Image.fromarray(rgb).quantize(8)
        image.info["transparency"] = 0
        image.save(path, transparency=0)
    elif kind == "CMYK":
        Image.fromarray(rgb).convert("CMYK").save(path, format="TIFF")
    elif kind == "I;16":
        Image.fromarray((np.arange(24 * 32).reshape(24, 32) * 80).astype(np.uint16)).save(path)
    elif kind == "I":
        Image.fromarray((np.arange(24 * 32).reshape(24, 32).astype(np.int32) - 300) * 100000).save(
            path, format="TIFF"
        )
    elif kind == "F":
        values = np.linspace(-2.0, 5.0, 24 * 32).reshape(24, 32).astype(np.float32)
        values[0, 0], values[1, 1], values[2, 2] = np.nan, np.inf, -np.inf
        Image.fromarray(values).save(path, format="TIFF")


KINDS = {
    "1": ("bilevel.png", "gray"),
    "L": ("gray.png", "gray"),
    "LA": ("gray_alpha.png", "gray"),
    "P": ("palette.png", "color"),
    "P-transparent": ("palette_t.png", "color"),
    "RGB": ("rgb.png", "color"),
    "RGBA": ("rgba.png", "color"),
    "CMYK": ("cmyk.tif", "color"),
    "I;16": ("deep.png", "gray"),
    "I": ("int32.tif", "gray"),
    "F": ("float.tif", "gray"),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_pillow_mode_is_segmented(tmp_path, capsys, kind):
    name, mode = KINDS[kind]
    make(kind, tmp_path / name)
    status, out, err = run([tmp_path / name, "-k", "2", "--out", tmp_path / "out"], capsys)
    assert status == 0, err
    record = assert_segmented(tmp_path / "out", name.split(".")[0], (24, 32), mode)
    if kind == "I;16":
        assert record["distinct_values"] == 24 * 32  # all 65536 levels kept, not cut to 8 bits
        assert Image.open(tmp_path / "out" / "deep_segmented.png").mode.startswith("I")
    if kind == "F":
        assert "NaN or infinite" in err and any("NaN" in note for note in record["notes"])
    if kind in ("I", "F"):
        assert 0 <= np.min(record["means"]) and np.max(record["means"]) <= 1


def test_rgb_codes_are_read_a_band_at_a_time(rng):
    """RGB codes are made from Pillow's 4-byte pixels a band of rows at a time: the same codes
    as packing the channels, with bands that do not divide the height."""
    pixels = rng.integers(0, 256, (23, 10, 3)).astype(np.uint8)
    codes = seg._rgb_codes(Image.fromarray(pixels), band_bytes=4 * 10 * 5)  # bands of 5 rows
    assert codes.dtype == np.uint32 and np.array_equal(codes, seg.pack_rgb(pixels))


@pytest.mark.parametrize(
    "dtype, channels, palette, mode",
    [
        (np.uint8, 1, False, "L"),
        (np.uint16, 1, False, "I;16"),
        (np.uint8, 3, False, "RGB"),
        (np.uint8, 4, False, "RGBA"),
        (np.uint8, 1, True, "P"),
    ],
)
@pytest.mark.parametrize("block_bytes", [7 * 40, 8])  # a few rows a block; one (rows > 8 bytes)
def test_png_outputs_read_back_as_written(
    tmp_path, rng, dtype, channels, palette, mode, block_bytes
):
    """Our PNG writer, in blocks of rows that do not divide the height: Pillow reads back every
    pixel (the "up" filter wraps byte by byte, random pixels wrap often) and the palette, the
    file passes the completeness check inputs get, and a second writing is the same bytes."""
    top = np.iinfo(dtype).max if not palette else 4
    shape = (37, 13) if channels == 1 else (37, 13, channels)
    pixels = rng.integers(0, top + 1, shape).astype(dtype)
    colours = rng.integers(0, 256, (5, 3)).astype(np.uint8) if palette else None
    seg.write_png(tmp_path / "a.png", pixels, colours, block_bytes)
    with Image.open(tmp_path / "a.png") as image:
        assert image.mode == mode and image.size == (13, 37)
        assert np.array_equal(np.asarray(image), pixels)
        if palette:
            assert image.getpalette()[:15] == colours.reshape(-1).tolist()
    seg._check_png_data(tmp_path / "a.png")
    data, kinds, at = (tmp_path / "a.png").read_bytes(), [], 8
    while at < len(data):  # every chunk whole, its CRC right, no empty image-data chunk
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        body, crc = data[at + 8 : at + 8 + length], data[at + 8 + length : at + 12 + length]
        assert struct.unpack(">I", crc)[0] == zlib.crc32(kind + body)
        assert length > 0 or kind == b"IEND"
        kinds.append(kind)
        at += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and kinds.count(b"IDAT") > 1
    seg.write_png(tmp_path / "b.png", pixels, colours, block_bytes)
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("opaque", [True, False])
def test_a_figure_has_the_pixels_savefig_gives_it(tmp_path, opaque):
    """Figures are drawn by Agg and written by write_png: savefig's pixels, as RGB where the
    figure is opaque (always, by default), with their alpha where a figure is not."""
    figure = seg._figure(4, 3)
    axes = figure.add_subplot()
    axes.plot([0, 1, 2], [1, 0, 2], label="a line")
    axes.set_title("a title")
    axes.legend()
    if not opaque:
        figure.patch.set_alpha(0.5)
    seg._figure_writer(figure)(tmp_path / "ours.png")
    figure.savefig(tmp_path / "savefig.png", format="png", dpi=seg.FIGURE_DPI)
    with Image.open(tmp_path / "ours.png") as ours, Image.open(tmp_path / "savefig.png") as theirs:
        assert ours.mode == ("RGB" if opaque else "RGBA") and theirs.mode == "RGBA"
        assert np.array_equal(np.asarray(ours), np.asarray(theirs.convert(ours.mode)))


def test_an_animation_gives_its_first_frame_and_a_tiff_stack_is_a_volume(tmp_path, capsys):
    """A GIF's frames are an animation: the first is segmented, with a note.  A multi-page
    TIFF's pages are a volume: segmented as one, its label map a multi-page TIFF."""
    frames = [Image.fromarray(gradient()), Image.fromarray(255 - gradient())]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(tmp_path / "stack.tif", save_all=True, append_images=frames[1:])
    status, out, err = run(
        [tmp_path / "anim.gif", tmp_path / "stack.tif", "-k", "2", "--out", tmp_path / "o"], capsys
    )
    assert status == 0, err
    assert f"note: {tmp_path / 'anim.gif'}: 2 frames: segmenting the first" in err
    assert "stack.tif: 2 frames" not in err
    labels = np.asarray(Image.open(tmp_path / "o" / "anim_labels.png"))
    assert labels[0, 0] == 0 and labels[-1, -1] == 1  # the first frame: dark at the top left
    with Image.open(tmp_path / "o" / "stack_labels.tif") as stack:
        assert stack.n_frames == 2
        first = np.asarray(stack)
        stack.seek(1)
        second = np.asarray(stack)
    assert first[0, 0] == 0 and first[-1, -1] == 1 and second[0, 0] == 1 and second[-1, -1] == 0


def test_exif_orientation_is_applied(tmp_path, capsys):
    stored = np.zeros((20, 40), dtype=np.uint8)
    stored[:, 20:] = 200  # stored: dark left, bright right
    exif = Image.Exif()
    exif[0x0112] = 6  # viewer rotates 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "photo.png", exif=exif)
    assert run([tmp_path / "photo.png", "-k", "2", "--out", tmp_path], capsys)[0] == 0
    labels = np.asarray(Image.open(tmp_path / "photo_labels.png"))
    assert labels.shape == (40, 20)  # as a viewer shows it: portrait
    assert labels[:20].max() == 0 and labels[20:].min() == 1  # dark on top after the rotation


# --- degenerate content ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "array, distinct",
    [
        (np.full((1, 1), 7, np.uint8), 1),
        (np.full((9, 9), 100, np.uint8), 1),
        (np.array([[0, 255] * 4] * 3, np.uint8), 2),
    ],
)
def test_fewer_distinct_values_than_k(tmp_path, capsys, array, distinct):
    Image.fromarray(array).save(tmp_path / "flat.png")
    status, out, err = run([tmp_path / "flat.png", "-k", "4", "--out", tmp_path], capsys)
    assert status == 0, err
    plural = "s" if distinct > 1 else ""
    message = (
        f"only {distinct} distinct value{plural}: fitted {distinct} component{plural} instead of 4"
    )
    assert f"note: {tmp_path / 'flat.png'}: {message}" in err and err.count(message) == 1
    assert "collapsed" not in err
    record = assert_segmented(tmp_path, "flat", array.shape)
    assert (
        record["k"] == distinct
        and record["requested_k"] == 4
        and record["distinct_values"] == distinct
    )


def test_constant_colour_image(tmp_path, capsys):
    Image.fromarray(np.full((5, 6, 3), (10, 200, 30), np.uint8)).save(tmp_path / "flat.png")
    assert run([tmp_path / "flat.png", "--mode", "color", "--out", tmp_path], capsys)[0] == 0
    record = assert_segmented(tmp_path, "flat", (5, 6), "color")
    assert record["k"] == 1 and np.allclose(record["means"], [[10 / 255, 200 / 255, 30 / 255]])


# --- nothing lost ---------------------------------------------------------------------------------


def test_an_output_never_overwrites_an_input(tmp_path, rng, capsys):
    two_tone(tmp_path / "a.png", rng)
    two_tone(tmp_path / "a_segmented.png", rng, color=True)
    before = (tmp_path / "a_segmented.png").read_bytes()
    status, out, err = run([tmp_path, "--out", tmp_path], capsys)
    assert status == 1 and "would overwrite an input file" in err
    assert (tmp_path / "a_segmented.png").read_bytes() == before
    assert (tmp_path / "a_segmented_labels.png").exists()  # the other input is still done


def test_same_names_from_different_folders_do_not_collide(tmp_path, rng, capsys):
    for folder, color in (("x", False), ("y", True)):
        (tmp_path / folder).mkdir()
        two_tone(tmp_path / folder / "scan.png", rng, color=color)
    two_tone(tmp_path / "x" / "scan.jpg", rng)
    status, out, err = run([tmp_path / "x", tmp_path / "y", "--out", tmp_path / "out"], capsys)
    assert status == 0, err
    source = {
        p.name: json.loads(p.read_text())["image"] for p in (tmp_path / "out").glob("*_model.json")
    }
    assert source == {
        "scan_model.json": str(tmp_path / "x" / "scan.jpg"),  # input order: x sorted, then y
        "scan-2_model.json": str(tmp_path / "x" / "scan.png"),
        "scan-3_model.json": str(tmp_path / "y" / "scan.png"),
    }


def test_outputs_are_written_atomically(tmp_path, rng, capsys):
    """A run whose writes fail part-way (a full disk: here a file size limit the new outputs
    pass) leaves the files of the run before it whole, and no temporaries."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 400), dtype=np.uint8)).save(tmp_path / "a.png")
    out_dir = tmp_path / "out"
    assert run([tmp_path / "a.png", "--out", out_dir, "-k", "1"], capsys, figures=True)[0] == 0
    previous = {p.name: p.read_bytes() for p in out_dir.iterdir()}
    result = run_on_a_full_disk([tmp_path / "a.png", "--out", out_dir, "-k", "3"], 16384)
    assert result.returncode == 1 and "File too large" in result.stderr
    assert {
        p.name: p.read_bytes() for p in out_dir.iterdir()
    } == previous  # old files whole, no temporaries


def test_interrupt_exits_130_and_leaves_no_temporary(tmp_path, rng, capsys, monkeypatch):
    two_tone(tmp_path / "a.png", rng)

    def interrupted(figure):
        def write(path):
            with open(path, "wb") as file:
                file.write(b"partial")
            raise KeyboardInterrupt

        return write

    monkeypatch.setattr(seg, "_figure_writer", interrupted)
    status, out, err = run([tmp_path / "a.png", "--out", tmp_path / "out"], capsys, figures=True)
    assert status == 130 and err.strip().splitlines()[-1] == "error: interrupted"
    assert not (tmp_path / "out").exists()  # nothing written: not even the folder is left


def test_an_unexpected_failure_is_one_line_and_the_batch_goes_on(
    tmp_path, rng, capsys, monkeypatch
):
    two_tone(tmp_path / "a.png", rng)
    two_tone(tmp_path / "b.png", rng)
    real = seg.segment_points

    def broken_for_a(picture, *args, **kwargs):
        if picture.width == 60 and broken_for_a.calls == 0:
            broken_for_a.calls += 1
            raise RuntimeError("simulated bug")
        return real(picture, *args, **kwargs)

    broken_for_a.calls = 0
    monkeypatch.setattr(seg, "segment_points", broken_for_a)
    status, out, err = run(
        [tmp_path / "a.png", tmp_path / "b.png", "--jobs", "1", "--out", tmp_path / "o"], capsys
    )
    assert status == 1 and "Traceback" not in err
    assert (
        f"error: {tmp_path / 'a.png'}: internal error, please report: RuntimeError: simulated bug"
        in err
    )
    assert len(out.splitlines()) == 1 and "b.png" in out


def test_singular_covariance_without_regularisation(tmp_path, capsys):
    """--reg-covar 0 on an image whose classes are single values: a one-line error, not a crash."""
    Image.fromarray(np.array([[10, 200] * 8] * 6, dtype=np.uint8)).save(tmp_path / "two.png")
    status, out, err = run(
        [tmp_path / "two.png", "-k", "2", "--reg-covar", "0", "--out", tmp_path / "o"], capsys
    )
    assert status == 1
    assert f"error: {tmp_path / 'two.png'}: a covariance became singular; increase reg_covar" in err
    with pytest.raises(ValueError, match="singular"):
        seg.fit_gmm(np.repeat([[0.1], [0.9]], 50, axis=0), 2, reg_covar=0)
    assert (
        run([tmp_path / "two.png", "-k", "2", "--out", tmp_path / "o"], capsys)[0] == 0
    )  # the default is fine


def test_shared_batch_messages(tmp_path, rng, capsys):
    Image.fromarray(np.full((8, 8), 40, np.uint8)).save(tmp_path / "a.png")
    Image.fromarray(np.full((8, 8), 90, np.uint8)).save(tmp_path / "b.png")
    status, out, err = run([tmp_path, "--shared", "-k", "4", "--out", tmp_path / "o"], capsys)
    message = "only 2 distinct values: fitted 2 components instead of 4"
    assert status == 0 and f"note: the batch has {message}" in err and err.count(message) == 1
    Image.fromarray((np.arange(64).reshape(8, 8) * 900).astype(np.uint16)).save(
        tmp_path / "deep.png"
    )
    status, out, err = run(
        [tmp_path, "--shared", "--quantized", "-k", "2", "--out", tmp_path / "q"], capsys
    )
    assert status == 0 and "note: --quantized ignored for this batch" in err
    assert record_of(tmp_path / "q", "deep")["quantized"] is False
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_text("not an image")
    status, out, err = run([tmp_path / "bad", "--shared", "--out", tmp_path / "r"], capsys)
    assert (
        status == 1
        and "not an image" in err
        and out == ""
        and "0 images segmented, 1 failed" in err
    )


def test_arrays_the_api_accepts_and_refuses():
    labels, recoloured, model = seg.segment_image(np.eye(6, dtype=bool), 2)
    assert labels.shape == (6, 6) and np.array_equal(labels, np.eye(6, dtype=np.uint8))
    colour = np.random.default_rng(0).random((10, 12, 3))
    labels, recoloured, model = seg.segment_image(colour, 3, mode="gray")  # float colour -> luma
    assert model.means.shape == (3, 1) and recoloured.shape == (10, 12)
    # EM keeps the mixture's mean equal to the data's: the mean BT.601 luma of the float colours.
    np.testing.assert_allclose(
        model.weights @ model.means.ravel(), (colour @ [0.299, 0.587, 0.114]).mean(), rtol=1e-9
    )
    labels, recoloured, model = seg.segment_image(colour[..., 0], 2, mode="color")
    assert model.means.shape == (2, 3)
    for bad in (np.zeros((4,)), np.zeros((2, 2, 2)), np.zeros((0, 3))):
        with pytest.raises(ValueError):
            seg.segment_image(bad, 2)
    with pytest.raises(ValueError):
        seg.fit_gmm(np.zeros((0, 3)), 1)

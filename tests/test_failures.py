"""What a user, a file or the system throws at a run: every case ends in its documented status, one
line per message naming the file, no traceback, no input changed, no temporary left, and for every
image either a complete set of outputs or none."""

import os
import signal
import struct
import subprocess
import sys
import threading
import zlib
from functools import partial

import numpy as np
import pytest
from conftest import (
    NO_FIGURES,
    ROOT,
    outputs_of,
    record_of,
    run,
    run_on_a_full_disk,
    seg,
    two_tone,
)
from PIL import Image

PROGRAM = str(ROOT / "ImageSegmentation.py")


def complete_or_absent(out_dir, stem):
    """Either every output of the image exists and loads, or none does."""
    paths = outputs_of(out_dir, stem)
    present = [p.exists() for p in paths.values()]
    assert all(present) or not any(present), paths
    if all(present):
        record_of(out_dir, stem)
        for path in paths.values():
            if path.suffix == ".png":
                Image.open(path).load()
    return all(present)


def no_temporaries(folder):
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def one_line_messages(err):
    lines = err.strip().splitlines()
    assert "Traceback" not in err and "internal error" not in err
    return lines


# --- figures of any shape -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(20000, 1), (3000, 10), (1, 20000)], ids=["1-wide", "10-wide", "1-high"]
)
def test_figures_have_a_bounded_size_whatever_the_shape(tmp_path, capsys, shape):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(tmp_path / "strip.png")
    status, out, err = run([tmp_path / "strip.png", "--out", tmp_path / "o"], capsys, figures=True)
    assert status == 0, err
    for name in ("comparison", "loglik"):
        width, height = Image.open(tmp_path / "o" / f"strip_{name}.png").size
        assert width <= 1600 and height <= 800


# --- values that used to end in an internal error -------------------------------------------------


def test_negative_seed_is_bad_usage(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        seg.main(["--seed", "-1", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert (
        exit_info.value.code == 2
        and err.startswith("error: usage:")
        and len(one_line_messages(err)) == 1
    )
    with pytest.raises(ValueError, match="random_state"):
        seg.fit_gmm(np.arange(10.0), 2, random_state=-1)


def test_quantized_without_a_variance_floor_stays_finite(tmp_path, capsys):
    Image.fromarray(np.array([[10, 200] * 8] * 6, dtype=np.uint8)).save(tmp_path / "two.png")
    status, out, err = run(
        [
            tmp_path / "two.png",
            "-k",
            "2",
            "--quantized",
            "--reg-covar",
            "0",
            "--out",
            tmp_path / "o",
        ],
        capsys,
    )
    assert status == 0, err
    record = record_of(tmp_path / "o", "two")
    assert record["quantized"] and np.all(np.isfinite(record["log_likelihood"]))
    assert record["log_likelihood"][-1] == pytest.approx(
        np.log(0.5), abs=1e-6
    )  # each level its own bin


def deep_images(folder):
    rng = np.random.default_rng(1)
    Image.fromarray((rng.integers(0, 4, (20, 30)) * 20000).astype(np.uint16)).save(
        folder / "deep16.png"
    )
    Image.fromarray(rng.random((20, 30)).astype(np.float32)).save(folder / "float.tif")
    Image.fromarray((rng.integers(0, 5, (20, 30)) * 100000).astype(np.int32)).save(
        folder / "int32.tif"
    )
    two_tone(folder / "colour.png", rng, color=True)


@pytest.mark.slow
def test_colour_mode_and_shared_batches_of_deep_images(tmp_path, capsys):
    deep_images(tmp_path)
    status, out, err = run(
        [tmp_path, "--mode", "color", "-k", "2", "--out", tmp_path / "a"], capsys
    )
    assert status == 0, err
    for stem in ("deep16", "float", "int32"):
        assert record_of(tmp_path / "a", stem)["mode"] == "color"
        assert Image.open(tmp_path / "a" / f"{stem}_segmented.png").mode in ("P", "RGB")
    (tmp_path / "float.tif").unlink()
    (tmp_path / "int32.tif").unlink()
    status, out, err = run([tmp_path, "--shared", "-k", "2", "--out", tmp_path / "b"], capsys)
    assert status == 0, err
    assert record_of(tmp_path / "b", "deep16")["mode"] == "color" and complete_or_absent(
        tmp_path / "b", "deep16"
    )


# --- files that are not what they seem ------------------------------------------------------------


def png(width, height, rows, bit_depth=8, colour_type=0):
    """A PNG whose zlib stream is complete but holds only `rows` rows."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    samples = {0: 1, 2: 3}[colour_type] * bit_depth // 8
    raw = b"".join(
        b"\x00" + bytes([(r * 37 + c) % 256 for c in range(width * samples)]) for r in range(rows)
    )
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


def test_a_large_pngs_data_are_checked_while_it_is_decoded(tmp_path):
    """From PIXEL_CHUNK pixels (read_image's checked_while_decoded) a PNG's data are counted on
    a thread while Pillow decodes them: a short stream is the same error, a whole one the same
    picture."""
    (tmp_path / "short.png").write_bytes(png(50, 100, 5))
    (tmp_path / "whole.png").write_bytes(png(50, 100, 100))
    inline = seg.read_image(tmp_path / "whole.png")
    large = partial(seg.read_image, checked_while_decoded=100)  # these are large now
    threads = []  # the threads started (threading.settrace sees each one start)
    threading.settrace(lambda *args: threads.append(threading.current_thread().name))
    try:
        with pytest.raises(seg.ImageError, match="its image data end after 255 of 5,100 bytes"):
            large(tmp_path / "short.png")
        assert np.array_equal(large(tmp_path / "whole.png").codes, inline.codes)
    finally:
        threading.settrace(None)
    assert len(set(threads)) == 2


def test_short_png_data_is_corrupt_and_48_bit_colour_is_noted(tmp_path, capsys):
    (tmp_path / "short.png").write_bytes(png(50, 100, 5))
    (tmp_path / "whole.png").write_bytes(png(50, 100, 100))
    (tmp_path / "deep.png").write_bytes(png(8, 6, 6, bit_depth=16, colour_type=2))
    status, out, err = run([tmp_path, "--out", tmp_path / "o"], capsys)
    assert status == 1
    assert (
        f"error: {tmp_path / 'short.png'}: truncated or corrupt image (its image data end after"
        in err
    )
    assert not complete_or_absent(tmp_path / "o", "short")
    assert complete_or_absent(tmp_path / "o", "whole") and complete_or_absent(
        tmp_path / "o", "deep"
    )
    assert any(
        "16 bits a channel read as 8" in note for note in record_of(tmp_path / "o", "deep")["notes"]
    )


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_is_not_a_regular_file(tmp_path, capsys, kind):
    if kind == "fifo":
        path, words = tmp_path / "pipe.png", "not a regular file (a FIFO)"
        os.mkfifo(path)
    else:
        path, words = "/dev/zero", "not a regular file (a character device)"
    status, out, err = run([path, "--out", tmp_path / "o"], capsys)
    assert status == 1 and f"error: {path}: {words}" in err


def test_a_dash_name_gets_a_hint(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        seg.main(["-x.png", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert (
        exit_info.value.code == 2
        and "./-NAME or after --" in err
        and len(one_line_messages(err)) == 1
    )


def test_an_image_with_no_finite_value(tmp_path, capsys):
    Image.fromarray(np.array([[np.inf, -np.inf], [np.nan, np.inf]], dtype=np.float32)).save(
        tmp_path / "inf.tif"
    )
    status, out, err = run([tmp_path / "inf.tif", "-k", "2", "--out", tmp_path / "o"], capsys)
    assert status == 0, err
    assert "no finite value: NaN and -inf taken as 0, +inf as 1" in err
    labels = np.asarray(Image.open(tmp_path / "o" / "inf_labels.png"))
    assert labels.tolist() == [[1, 0], [0, 1]]


# --- names ----------------------------------------------------------------------------------------


def test_a_newline_in_a_name_stays_on_one_line(tmp_path, capsys):
    two_tone(tmp_path / "good\nname.png", np.random.default_rng(0))
    (tmp_path / "bad\nname.png").write_text("not an image")
    status, out, err = run(
        [tmp_path / "good\nname.png", tmp_path / "bad\nname.png", "--out", tmp_path / "o"], capsys
    )
    assert status == 1
    assert len(out.splitlines()) == 1 and out.startswith(f"{tmp_path}/good\\nname.png: ")
    assert f"error: {tmp_path}/bad\\nname.png: not an image" in err
    assert all(
        line.startswith(("error: ", "note: ", "1 image ")) for line in one_line_messages(err)
    )


def test_a_name_that_is_not_utf8(tmp_path, capsys):
    name = os.fsdecode(b"caf\xe9.png")
    two_tone(tmp_path / name, np.random.default_rng(0))
    status, out, err = run([tmp_path / name, "--out", tmp_path / "o"], capsys)
    assert status == 0, err
    assert out.startswith(f"{tmp_path}/caf\\xe9.png: ")
    assert complete_or_absent(tmp_path / "o", os.fsdecode(b"caf\xe9"))
    assert record_of(tmp_path / "o", os.fsdecode(b"caf\xe9"))["image"] == f"{tmp_path}/caf\\xe9.png"


def test_the_longest_names_the_file_system_allows(tmp_path, capsys):
    stem = "x" * (255 - len("_comparison.png"))  # the longest output name is exactly 255 bytes
    two_tone(tmp_path / f"{stem}.png", np.random.default_rng(0))
    status, out, err = run([tmp_path / f"{stem}.png", "--out", tmp_path / "o"], capsys)
    assert status == 0, err
    assert complete_or_absent(tmp_path / "o", stem) and no_temporaries(tmp_path / "o")


# --- all or nothing -------------------------------------------------------------------------------


def test_a_failed_write_leaves_nothing_of_that_image(tmp_path):
    """A disk that fills while an image's files are written (here: a file size limit the
    first image's outputs pass and the second's do not): that image fails in one line with
    nothing of it left, the next is written whole."""
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 400), dtype=np.uint8)).save(tmp_path / "a.png")
    two_tone(tmp_path / "b.png", rng)
    result = run_on_a_full_disk(
        [tmp_path / "a.png", tmp_path / "b.png", "--out", tmp_path / "o", "--jobs", "1"]
        + NO_FIGURES,
        max_bytes=16384,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert (
        f"error: {tmp_path / 'a.png'}: cannot write {tmp_path / 'o' / 'a_segmented.png'}: "
        "File too large" in result.stderr.splitlines()
    )
    assert not complete_or_absent(tmp_path / "o", "a") and complete_or_absent(tmp_path / "o", "b")
    assert no_temporaries(tmp_path / "o")


def test_an_output_name_that_is_a_folder(tmp_path, capsys):
    two_tone(tmp_path / "a.png", np.random.default_rng(0))
    (tmp_path / "o" / "a_labels.png").mkdir(parents=True)
    status, out, err = run([tmp_path / "a.png", "--out", tmp_path / "o"], capsys)
    assert (
        status == 1
        and f"error: {tmp_path / 'a.png'}: cannot write {tmp_path / 'o' / 'a_labels.png'}: "
        f"it is a folder"
        in err
    )
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a_labels.png"]


def test_sigterm_in_process_cleans_up_and_exits_143(tmp_path, capsys, monkeypatch):
    two_tone(tmp_path / "a.png", np.random.default_rng(0))

    def terminated(figure):
        def write(path):
            with open(path, "wb") as file:
                file.write(b"partial")
            raise seg.Interrupted(signal.SIGTERM)

        return write

    monkeypatch.setattr(seg, "_figure_writer", terminated)
    status, out, err = run([tmp_path / "a.png", "--out", tmp_path / "o"], capsys, figures=True)
    assert status == 143 and err.strip().splitlines()[-1] == "error: terminated"
    assert not (tmp_path / "o").exists()  # nothing written: not even the folder is left


# --- the system: signals, killed workers, stdout --------------------------------------------------


def batch(folder, n, size=(120, 160)):
    rng = np.random.default_rng(2)
    for i in range(n):
        two_tone(folder / f"img{i:02d}.png", rng, size=size, color=i % 2 == 1)
    return [folder / f"img{i:02d}.png" for i in range(n)]


@pytest.mark.slow
def test_sigterm_stops_a_parallel_batch_cleanly(tmp_path):
    files = batch(tmp_path, 120, size=(200, 260))  # a minute of work, but the signal ends it
    out = tmp_path / "o"
    process = subprocess.Popen(
        [
            sys.executable,
            PROGRAM,
            *map(str, files),
            "--spatial",
            "1",
            "--tol",
            "0",  # every image a few seconds: the batch cannot end before the signal does
            "--max-iter",
            "1000",
            "--jobs",
            "2",
            "--out",
            str(out),
            *NO_FIGURES,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.readline()  # the first image is done: the batch is under way
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "error: terminated" and "Traceback" not in stderr
    assert no_temporaries(out)
    done = [complete_or_absent(out, path.stem) for path in files]
    assert 1 <= sum(done) < len(files)


@pytest.mark.slow
def test_a_signal_while_a_line_is_printed_stops_the_workers(tmp_path, capsys, monkeypatch):
    # The signal lands outside the pool's own wait: the batch must not run to its end first.
    files = batch(tmp_path, 12)
    printed = seg.Console.out

    def terminated(console, text):
        printed(console, text)
        raise seg.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(seg.Console, "out", terminated)
    slow = ["--spatial", "1", "--tol", "0", "--max-iter", "400", "--jobs", "2"]
    status, out, err = run([*files, *slow, "--out", tmp_path / "o"], capsys)
    assert status == 143 and err.strip().splitlines()[-1] == "error: terminated"
    assert no_temporaries(tmp_path / "o")
    done = [complete_or_absent(tmp_path / "o", path.stem) for path in files]
    assert 1 <= sum(done) <= 4  # the first, and at most the two in progress and one queued


@pytest.mark.slow
def test_a_killed_worker_is_retried_and_the_batch_completes(tmp_path, capsys, monkeypatch):
    files = batch(tmp_path, 4)
    marker = tmp_path / "killed-once"
    real = seg.segment_file

    def killed_once(path, *args, **kwargs):  # runs in the worker (forked with this patch)
        if path.name == "img01.png" and not marker.exists():
            marker.write_text("")
            os.kill(os.getpid(), signal.SIGKILL)  # what the out-of-memory killer does
        return real(path, *args, **kwargs)

    monkeypatch.setattr(seg, "segment_file", killed_once)
    status, out, err = run([*files, "--jobs", "2", "--out", tmp_path / "o"], capsys)
    assert status == 0, err
    assert f"note: {files[1]}: its worker process died; segmented again in a fresh one" in err
    assert [line.split(":")[0] for line in out.splitlines()] == [
        str(f) for f in files
    ]  # input order
    assert all(complete_or_absent(tmp_path / "o", f.stem) for f in files)


@pytest.mark.slow
def test_a_worker_that_dies_twice_fails_alone(tmp_path, capsys, monkeypatch):
    files = batch(tmp_path, 4)
    real = seg.segment_file

    def always_killed(path, *args, **kwargs):
        if path.name == "img02.png":
            os.kill(os.getpid(), signal.SIGKILL)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(seg, "segment_file", always_killed)
    status, out, err = run([*files, "--jobs", "2", "--out", tmp_path / "o"], capsys)
    assert status == 1
    assert (
        f"error: {files[2]}: its worker process died twice (killed from outside, or out of memory)"
        in err
    )
    errors = [line for line in one_line_messages(err) if line.startswith("error: ")]
    assert errors == [
        f"error: {files[2]}: its worker process died twice (killed from outside, or out of memory)"
    ]
    assert [complete_or_absent(tmp_path / "o", f.stem) for f in files] == [True, True, False, True]
    assert no_temporaries(tmp_path / "o")


@pytest.mark.slow
def test_a_closed_stdout_is_quiet_and_the_batch_completes(tmp_path):
    files = batch(tmp_path, 3)
    process = subprocess.Popen(
        [sys.executable, PROGRAM, *map(str, files), "--jobs", "1", "--out", str(tmp_path / "o")]
        + NO_FIGURES,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    process.stdout.close()  # as `| head -0` does
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=120) == 0 and "Traceback" not in stderr and "Error" not in stderr
    assert all(complete_or_absent(tmp_path / "o", f.stem) for f in files)


@pytest.mark.slow
def test_stdout_on_a_full_device(tmp_path):
    files = batch(tmp_path, 3)
    with open("/dev/full", "w") as full:
        result = subprocess.run(
            [
                sys.executable,
                PROGRAM,
                *map(str, files),
                "--jobs",
                "1",
                "--out",
                str(tmp_path / "o"),
                *NO_FIGURES,
            ],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("error: standard output: No space left on device") == 1
    assert all(complete_or_absent(tmp_path / "o", f.stem) for f in files)


def test_a_numerical_warning_reaches_the_user_in_one_line(tmp_path, capsys, monkeypatch):
    two_tone(tmp_path / "a.png", np.random.default_rng(0))
    real = seg.segment_points

    def warns(*args, **kwargs):
        np.log(np.zeros(1))  # RuntimeWarning: divide by zero encountered in log
        return real(*args, **kwargs)

    monkeypatch.setattr(seg, "segment_points", warns)
    status, out, err = run([tmp_path / "a.png", "-k", "2", "--out", tmp_path / "o"], capsys)
    assert status == 0
    assert (
        f"warning: {tmp_path / 'a.png'}: RuntimeWarning: divide by zero encountered in log\n" in err
    )
    assert len(one_line_messages(err)) == 2

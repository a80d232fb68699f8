"""--dask: a batch on a local Dask cluster of two worker processes, the same bytes and lines
as --jobs 1, --shared reduced on the cluster to the serial model, a killed worker's image
segmented again, and the errors a user can meet."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import NO_FIGURES, ROOT, run, seg
from PIL import Image

pytest.importorskip("distributed")
PROGRAM = str(ROOT / "ImageSegmentation.py")


def small_batch(folder, n, rng, size=(40, 60)):
    """n small two-region gray and colour images, and one file that is no image."""
    folder.mkdir()
    for i in range(n):
        image = rng.normal(60 + 40 * (i % 3), 12, (*size, 3) if i % 4 == 3 else size)
        image[:, size[1] // 2 :] += 90
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"img{i:02d}.png")
    (folder / "broken.png").write_text("not an image")
    return folder


def program(*arguments):
    """The command line in a process of its own, writing no figures (their drawing is the
    same code on a worker as in a process; a figure is half a small image's time)."""
    return subprocess.run(
        [sys.executable, PROGRAM, *map(str, arguments), *NO_FIGURES],
        capture_output=True,
        text=True,
    )


@pytest.mark.slow
def test_a_dask_batch_is_the_serial_batch(tmp_path, rng):
    """Every output file the same bytes as --jobs 1 (JSON but its seconds), the summary lines
    in input order, the broken file one error line, and --shared's model reduced on the
    cluster equal to the serial one bit for bit."""
    images = small_batch(tmp_path / "in", 9, rng)
    for extra in ([], ["--shared"]):
        serial = program(images, "--jobs", "1", "--out", tmp_path / "serial", *extra)
        dask = program(images, "--dask", "local:2", "--out", tmp_path / "dask", *extra)
        assert serial.returncode == dask.returncode == 1, dask.stderr
        assert [line.split(" ")[:5] for line in serial.stdout.splitlines()] == [
            line.split(" ")[:5] for line in dask.stdout.splitlines()
        ]
        assert f"error: {images / 'broken.png'}: not an image Pillow can read" in dask.stderr
        assert "Traceback" not in dask.stderr
        names = sorted(p.name for p in (tmp_path / "serial").iterdir())
        assert names == sorted(p.name for p in (tmp_path / "dask").iterdir())
        for name in names:
            a, b = (tmp_path / folder / name for folder in ("serial", "dask"))
            if name.endswith(".json"):
                records = [json.loads(p.read_text()) for p in (a, b)]
                for record in records:
                    record.pop("seconds")
                    record["settings"].pop("out")
                    record["settings"].pop("dask", None)
                assert records[0] == records[1], name
            else:
                assert a.read_bytes() == b.read_bytes(), name


@pytest.mark.slow
def test_a_killed_worker_does_not_lose_an_image(tmp_path, rng):
    """SIGKILL a busy worker mid-batch: its image runs again on a worker, every image ends
    complete, and nothing half-written stays in --out."""
    images = small_batch(tmp_path / "in", 6, rng, size=(120, 160))
    (images / "broken.png").unlink()
    out = tmp_path / "out"
    slow = ["--spatial", "1", "--tol", "0", "--max-iter", "300"]  # about a second an image
    process = subprocess.Popen(
        [sys.executable, PROGRAM, images, "--dask", "local:2", *slow, "--out", out] + NO_FIGURES,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.readline()  # the batch is under way
    workers = [pid for pid in children(process.pid) if b"spawn_main" in cmdline(pid)]
    assert workers
    os.kill(workers[0], signal.SIGKILL)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "6 images segmented, 0 failed" in stderr  # (stdout's first lines were read above)
    for i in range(6):
        assert (out / f"img{i:02d}_model.json").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_sigterm_cancels_a_dask_batch(tmp_path, rng):
    images = small_batch(tmp_path / "in", 30, rng, size=(120, 160))
    out = tmp_path / "out"
    process = subprocess.Popen(
        [sys.executable, PROGRAM, images, "--dask", "local:2", "--spatial", "1", "--tol", "0"]
        + ["--max-iter", "300", "--out", out],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.stdout.readline()
    started = time.perf_counter()
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "error: terminated" and "Traceback" not in stderr
    assert time.perf_counter() - started < 60
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left
    stems = {p.name.split("_")[0] for p in out.iterdir()}
    assert len(stems) < 30  # cancelled: not every image was done
    for stem in stems:  # and those that were are complete
        assert (out / f"{stem}_model.json").exists() and (out / f"{stem}_labels.png").exists()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


@pytest.mark.slow
def test_a_local_clusters_workers_are_set_for_a_batch():
    """--dask local: workers with BLAS on one thread, glibc's own trimming of freed memory (not
    Dask's 64 kB MALLOC_TRIM_THRESHOLD_) and no statistical profiler: each cost a batch of
    small images time (docs/benchmarks.md)."""

    def settings(names):  # runs in the worker (nested: sent by value)
        import os

        import dask

        blas = {name: os.environ.get(name) for name in names}
        trim = os.environ.get("MALLOC_TRIM_THRESHOLD_")
        return blas, trim, dask.config.get("distributed.worker.profile.enabled")

    client, cluster = seg.dask_client("local:1")
    try:
        [(blas, trim, profile)] = client.run(settings, seg.BLAS_THREAD_VARIABLES).values()
    finally:
        client.close()
        cluster.close()
    assert blas == dict.fromkeys(seg.BLAS_THREAD_VARIABLES, "1")
    assert trim is None and profile is False


def children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                pass
    return found


def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as file:
        return file.read()


def test_dask_usage_errors(tmp_path, rng, capsys, monkeypatch):
    """Without dask installed, with --jobs, with a scheduler that is not there: one line, exit 2."""
    images = small_batch(tmp_path / "in", 1, rng)
    status, out, err = run([images, "--dask", "local:2", "--jobs", "2"], capsys)
    assert status == 2 and err.strip() == (
        "error: usage: --dask does not combine with --jobs: the cluster's workers do the work"
    )
    with pytest.raises(SystemExit) as exit_info:
        seg.main([str(images), "--dask", "local:0"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--dask" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed: ImportError
    status, out, err = run([images, "--dask", "local:2", "--out", tmp_path / "o"], capsys)
    assert status == 2
    assert err.strip() == 'error: --dask needs dask.distributed: pip install "dask[distributed]"'
    assert seg.dask_client  # the API's entry point


def _answering(server, reply):
    """Accept connections on a loopback server socket; send reply (None: never a byte)."""
    held = []
    while True:
        try:
            connection, _ = server.accept()
        except OSError:  # the server closed: the test is over
            break
        held.append(connection)
        if reply is not None:
            connection.sendall(reply)
    for connection in held:
        connection.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "reply, words",
    [
        (None, "no Dask scheduler answered within 2 s"),
        (
            b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n",
            "what answers there is not a Dask scheduler",
        ),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "what answers there is not a Dask scheduler"),
    ],
)
def test_a_dask_address_where_no_scheduler_answers(tmp_path, rng, capsys, reply, words):
    """A listener that accepts and never answers (Dask's client once waited there without
    end), or a server of another protocol (HTTP's text once read as a frame of 3 EiB): exit 2
    with `cannot connect`, within Dask's connect timeout (set to 2 s here as a user sets it),
    one line, nothing written."""
    import socket
    import threading

    import dask

    images = small_batch(tmp_path / "in", 1, rng)
    with socket.create_server(("127.0.0.1", 0)) as server:
        threading.Thread(target=_answering, args=(server, reply), daemon=True).start()
        address = f"tcp://127.0.0.1:{server.getsockname()[1]}"
        started = time.monotonic()
        with dask.config.set({"distributed.comm.timeouts.connect": "2s"}):
            status, out, err = run([images, "--dask", address, "--out", tmp_path / "o"], capsys)
        took = time.monotonic() - started
    assert status == 2 and took < 5, (status, took)
    assert err.strip() == f"error: --dask {address}: cannot connect ({words})"
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())

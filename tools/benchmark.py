"""Speed and memory benchmark: python tools/benchmark.py [--quick] [--workdir DIR]

Not collected by pytest.  Every input is made here from scikit-image's sample images
(nothing large is committed).  Each comparison runs in this one invocation and the
script prints one table (Markdown), the numbers the README quotes:

  fit        this program's fit (distinct values + initialisation + EM) against
             scikit-learn's GaussianMixture (K=5, full, tol 1e-3, max_iter 100,
             n_init 1, k-means init) on the same pixels / 255, with both mean
             log-likelihoods per pixel, and the whole program on the same image
             (saved losslessly) against its I/O floor;
  to the maximum  the tests' overlapping scenes: ours by default, plain EM and scikit-learn
             at tol 1e-8, each the fastest of three runs;
  end to end `python ImageSegmentation.py IMAGE` (every output written) in a fresh
             process, its peak memory, and the I/O floor: Pillow decoding the image
             and writing one RGB and one 8-bit PNG of its size (default settings);
             also with --spatial 1 (the Potts-prior fit), whose floor is the same;
  fit on draws  a fit on many distinct colours, started on draws of pixels, against EM on
             every point from the same start;
  counting   the ways to count distinct colours at 50 megapixels.

--quick runs a subset (astronaut against scikit-learn, end to end at 4 megapixels)
in under a minute.
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as samples

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
import ImageSegmentation as seg  # noqa: E402

Image.MAX_IMAGE_PIXELS = None


def our_fit(array, k, **options):
    """Seconds, mean log-likelihood per pixel, EM steps and distinct values of the program's own
    path: codes -> counts -> initialisation -> EM (default options unless given)."""
    start = time.perf_counter()
    picture = seg.picture_from_array(array)
    points = seg.distinct_values(picture, "color" if array.ndim == 3 else "gray")
    data = seg._PointFeatures(points.values, points.weights, points.scale)
    model = seg._fit_data(data, k, seg.FitOptions(**options))
    return (
        time.perf_counter() - start,
        model.log_likelihood[-1],
        model.n_em_steps,
        len(points.values),
    )


def sklearn_fit(array, k, tol=1e-3, max_iter=100):
    """Seconds, mean log-likelihood per pixel and iterations of scikit-learn's GaussianMixture."""
    from sklearn.mixture import GaussianMixture

    X = array.reshape(len(array.reshape(-1, array.shape[-1] if array.ndim == 3 else 1)), -1) / 255.0
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = GaussianMixture(
            k, covariance_type="full", tol=tol, max_iter=max_iter, n_init=1, random_state=0
        ).fit(X)
    seconds = time.perf_counter() - start
    return seconds, model.score(X), model.n_iter_


def fastest_of(runs, fit, *args, **kwargs):
    """The result of fit with the fewest seconds (its first item) in several identical runs:
    on a shared machine, noise only adds, and a short run's share of it is the largest."""
    return min((fit(*args, **kwargs) for _ in range(runs)), key=lambda result: result[0])


def header(*names):
    print("\n| " + " | ".join(names) + " |")
    print("|" + "---|" * len(names))


def row(*cells):
    print("| " + " | ".join(map(str, cells)) + " |", flush=True)


def ratio(reference_seconds, our_seconds):
    """How many times faster, rounded down to one decimal: never in our favour."""
    return f"{math.floor(10 * reference_seconds / our_seconds) / 10:.1f}x"


def overlapping_scene(seed, n_features):
    """The test suite's overlapping scenes (tests/conftest.py) at 240 x 320."""
    from conftest import OVERLAPPING_COLOUR, OVERLAPPING_GRAY, class_scene

    means, sd = (OVERLAPPING_COLOUR, 0.07) if n_features == 3 else (OVERLAPPING_GRAY, 0.06)
    return class_scene(np.random.default_rng(seed), means, sd, shape=(240, 320))[0]


def measured(command):
    """Wall seconds and peak resident memory (MB) of a command in a fresh process."""
    probe = (
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss; "
        "print(time.perf_counter() - t, peak, r.returncode)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *map(str, command)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if out[2] != "0":
        raise RuntimeError(f"{command} failed")
    return float(out[0]), int(out[1]) / 1024


FLOOR = """
import sys, time
from PIL import Image
Image.MAX_IMAGE_PIXELS = None
image = Image.open(sys.argv[1]); image.load()
image.convert("RGB").save(sys.argv[2] + "_rgb.png")
image.convert("L").save(sys.argv[2] + "_gray.png")
"""


def io_floor(path, workdir):
    return measured([sys.executable, "-c", FLOOR, path, workdir / "floor"])


def end_to_end(path, workdir, *options):
    return measured(
        [
            sys.executable,
            ROOT / "ImageSegmentation.py",
            path,
            "-q",
            "--out",
            workdir / "out",
            *options,
        ]
    )


LABEL_FLOOR = """
import sys
import numpy as np
from PIL import Image
Image.MAX_IMAGE_PIXELS = None
image = Image.open(sys.argv[1]); image.load()
Image.fromarray(np.asarray(Image.open(sys.argv[2]))).save(sys.argv[3])
"""


RUNS = 5  # a row that is one short run takes the median of this many


def applying_a_model(workdir):
    """--model with --outputs labels,json (no fit) on a small and a large photo, against the
    time Pillow takes to read the image and write its label map (the label map this run wrote,
    so the floor compresses the same content); each the median of RUNS runs."""
    print("\n| applying a saved model | size | ours s | read + write the labels s | ratio |")
    print("|---|---|---|---|---|")
    for name, source, megapixels in (
        ("astronaut", samples.astronaut(), None),
        ("retina enlarged", samples.retina(), 24),
    ):
        path = workdir / f"apply_{name.split()[0]}.png"
        if megapixels is None:
            Image.fromarray(source).save(path, compress_level=1)
        else:
            big_image(source, megapixels, path)
        fitted, applied = workdir / "apply_fit", workdir / "apply_out"
        end_to_end(path, fitted, "--outputs", "json")
        model = fitted / "out" / f"{path.stem}_model.json"
        labels = applied / "out" / f"{path.stem}_labels.png"
        ours, floor = [], []
        for _ in range(RUNS):  # taken in turn: a moment's load on the machine falls on both
            ours.append(end_to_end(path, applied, "--model", model, "--outputs", "labels,json")[0])
            floor.append(
                measured([sys.executable, "-c", LABEL_FLOOR, path, labels, workdir / "l.png"])[0]
            )
        ours, floor = statistics.median(ours), statistics.median(floor)
        size = Image.open(path).size
        print(
            f"| {name}, --outputs labels,json | {size[0]}x{size[1]} | {ours:.2f} | {floor:.2f} "
            f"| {ours / floor:.2f}x |"
        )
        path.unlink()


def big_image(source, megapixels, path):
    """A large 3:2 image made from a sample, resized (bicubic, so colours vary smoothly)."""
    width = int(round((megapixels * 1e6 * 1.5) ** 0.5))
    height = int(round(megapixels * 1e6 / width))
    image = Image.fromarray(source).resize((width, height), Image.BICUBIC)
    image.save(path, compress_level=1)
    return image.size


def biased_brain(megapixels, path):
    """The brain sample enlarged to the given size (nearest neighbour) times a known smooth field of
    about +-20 %, saved as PNG: a large skull-stripped slice for --bias-field."""
    brain = np.asarray(Image.open(ROOT / "images" / "brain_t1.png"))
    side = (megapixels * 1e6 / brain.size) ** 0.5
    size = (round(brain.shape[1] * side), round(brain.shape[0] * side))
    big = np.asarray(Image.fromarray(brain).resize(size, Image.NEAREST))
    rows = np.linspace(-1, 1, big.shape[0], dtype=np.float32)[:, None]
    cols = np.linspace(-1, 1, big.shape[1], dtype=np.float32)[None, :]
    field = np.exp(0.2 * (0.8 * rows + 0.5 * cols * cols - 0.3 * rows * cols))
    biased = np.clip(np.rint(big * field), 0, 255).astype(np.uint8)
    biased[big == 0] = 0
    Image.fromarray(biased).save(path, compress_level=1)
    return size


def noisy_photo(megapixels, path, seed=0):
    """A camera's photo with millions of colours: smooth colour fields (three slow waves through
    the colour cube) plus sensor noise of +-6 levels a channel, uniform, from a seed: 8.7 million
    distinct colours at 24 MP."""
    width = int(round((megapixels * 1e6 * 1.5) ** 0.5))
    height = int(round(megapixels * 1e6 / width))
    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    u, v = u / width, v / height
    turn = 2 * np.pi
    waves = [
        np.sin(turn * (2.1 * u + 0.7 * v)),
        np.sin(turn * (0.9 * u - 1.6 * v) + 1),
        np.sin(turn * (1.7 * u + 1.9 * v) + 2),
    ]
    rgb = np.stack([np.rint(127.5 + 114.75 * wave) for wave in waves], axis=-1)
    del u, v, waves
    rgb += np.random.default_rng(seed).integers(-6, 7, size=rgb.shape)
    Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8)).save(path, compress_level=1)
    return width, height


def noisy(array, sigma):
    rng = np.random.default_rng(0)
    return np.clip(array + rng.normal(0, sigma, array.shape), 0, 255).astype(np.uint8)


def draws_against_every_point(workdir):
    """The fit on draws of pixels against EM on every point from the same start (the draws'
    first start): seconds of each fit, the log-likelihoods per pixel and their difference."""
    header(
        "fit on draws",
        "distinct values",
        "on draws s",
        "every point s",
        "loglik/px on draws",
        "every point",
        "difference",
    )
    cases = [("retina.jpg + noise sigma 40", noisy(samples.retina(), 40))]
    path = workdir / "noisy_24mp.png"
    noisy_photo(24, path)
    cases.append(("noisy photo, 24 MP", seg.read_image(path)))
    path.unlink()
    for name, source in cases:
        picture = seg.picture_from_array(source) if isinstance(source, np.ndarray) else source
        points = seg.distinct_values(picture, "color")
        data = seg._PointFeatures(points.values, points.weights, points.scale)
        del picture, points
        starts = []
        density_em = seg._density_em

        def spy(sample, start, options, on_iteration=None, **newton):
            starts.append((sample, start))
            return density_em(sample, start, options, on_iteration, **newton)

        seg._density_em = spy
        try:
            began = time.perf_counter()
            drawn = seg._fit_data(data, 5, seg.FitOptions())
            drawn_s = time.perf_counter() - began
        finally:
            seg._density_em = density_em
        first, (weights, means, covariances) = starts[0]
        began = time.perf_counter()
        start = (weights, data.centred(first.uncentred(means)), covariances)
        every = seg._density_em(data, start, seg.FitOptions(subsample_above=0))
        every_s = time.perf_counter() - began
        ours, theirs = drawn.log_likelihood[-1], every.log_likelihood[-1]
        row(
            name,
            f"{len(data):,}",
            f"{drawn_s:.2f}",
            f"{every_s:.2f}",
            f"{ours:.10f}",
            f"{theirs:.10f}",
            f"{ours - theirs:.1e}",
        )


def spatial_updates():
    """What over-relaxation and partial sweeps save, on the tests' smooth ramps (camera resized
    to 256 x 256 and back up to 512 x 512 bicubically, --spatial 1): the tests assert only the
    direction (fewer iterations, fewer sweeps of every pixel, the same maximum)."""
    small = Image.fromarray(samples.camera()).resize((256, 256), Image.BICUBIC)
    picture = seg.picture_from_array(np.asarray(small.resize((512, 512), Image.BICUBIC)))
    points = seg.distinct_values(picture)
    print(
        "\n| spatial fit, 512 x 512 ramps, --spatial 1 | iterations | sweeps of every pixel "
        "| objective/px | s |"
    )
    print("|---|---|---|---|---|")
    for name, settings in (
        ("default (over-relaxed, partial sweeps)", seg.SpatialSettings()),
        ("every pixel every sweep", seg.SpatialSettings(max_active_fraction=0.0)),
        (
            "plain update, every pixel",
            seg.SpatialSettings(max_active_fraction=0.0, max_over_relaxation=1.0),
        ),
    ):
        start = time.perf_counter()
        fit = seg.segment_points(picture, points, 3, spatial=1.0, spatial_settings=settings).spatial
        seconds = time.perf_counter() - start
        print(
            f"| {name} | {fit.n_iter} | {fit.full_sweeps} | {fit.objective[-1]:.6f} "
            f"| {seconds:.2f} |"
        )


def figure_sizes(workdir):
    """The figures' sizes in pixels for a square, a wide and a tall image (the tests assert only
    their shape: the convergence plot wide, the comparison's panels at the image's aspect)."""
    print("\n| figure | 512 x 512 | 2000 x 100 | 100 x 2000 |")
    print("|---|---|---|---|")
    sizes = {}
    for width, height in ((512, 512), (2000, 100), (100, 2000)):
        path = workdir / f"figure_{width}x{height}.png"
        Image.fromarray(samples.camera()).resize((width, height), Image.BICUBIC).save(path)
        out = workdir / "figures"
        seg.main([str(path), "-q", "--out", str(out), "--jobs", "1"])
        for kind in ("loglik", "comparison"):
            size = Image.open(out / f"{path.stem}_{kind}.png").size
            sizes.setdefault(kind, []).append(f"{size[0]} x {size[1]}")
    for kind, row in sizes.items():
        print(f"| STEM_{kind}.png | " + " | ".join(row) + " |")


VOLUME_FLOOR = """
import gzip, sys
import nibabel, numpy as np
image = nibabel.load(sys.argv[1])
data = np.asarray(image.dataobj)
for name, array in (("labels", (data > data.mean()).astype(np.uint8)), ("segmented", data)):
    out = nibabel.Nifti1Image(array, image.affine, image.header.copy())
    out.header.set_data_dtype(array.dtype)
    with open(sys.argv[2] + name + ".nii.gz", "wb") as file:
        file.write(gzip.compress(out.to_bytes(), compresslevel=1, mtime=0))
"""


def volumes(workdir):
    """Volumes end to end: a 256^3 16-bit volume (three classes in smooth blobs, noise), plain
    and with --spatial, against reading it and writing a label and a segmented volume as the
    program does (gzipped NIfTI, level 1); and --brain on the ICBM 2009a template with noise
    and a +-20 % field (needs nilearn), against the same floor."""
    import nibabel
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    side = 256
    blobs = gaussian_filter(rng.normal(size=(side // 4,) * 3), 2)
    classes = np.digitize(blobs, np.quantile(blobs, [0.3, 0.7]))
    classes = np.kron(classes, np.ones((4, 4, 4), np.uint8))
    values = np.array([12000, 30000, 48000])[classes] + rng.normal(0, 4000, classes.shape)
    volume = np.clip(np.rint(values), 0, 65535).astype(np.uint16)
    rows = [("256^3 16-bit, plain (-k 3)", volume, ("-k", "3"))]
    rows.append(
        (
            "256^3 16-bit, --spatial 0.5 --covariance tied",
            volume,
            ("-k", "3", "--spatial", "0.5", "--covariance", "tied"),
        )
    )
    try:
        import brain_evaluation

        t1, gm, wm = (brain_evaluation.template(n) for n in ("t1", "gm", "wm"))
        truth = brain_evaluation.truth_of(gm, wm, t1 > 0)
        volumes = brain_evaluation.conditions(t1, truth, 0, brain_evaluation.volume_field)
        brain = volumes["biased"]
        rows.append(("ICBM 2009a template (197x233x189), --brain", brain, ("--brain",)))
    except ImportError:
        print("(nilearn not installed: no brain volume row)", file=sys.stderr)
    print("\n| volume, end to end | voxels | ours s | floor s | ratio | peak MB | bytes/voxel |")
    print("|---|---|---|---|---|---|---|")
    for name, array, options in rows:
        path = workdir / "volume.nii.gz"
        nibabel.save(nibabel.Nifti1Image(array, np.eye(4)), path)
        floor_s, _ = measured([sys.executable, "-c", VOLUME_FLOOR, path, workdir / "floor_"])
        ours_s, ours_mb = end_to_end(path, workdir, *options)
        print(
            f"| {name} | {array.size:,} | {ours_s:.2f} | {floor_s:.2f} | "
            f"{ours_s / floor_s:.2f}x | {ours_mb:.0f} | {ours_mb * 2**20 / array.size:.1f} |"
        )
        path.unlink()


def dask_throughput(workdir, n_images=200):
    """A batch of small images (every output written) with --jobs 1 and on a local Dask
    cluster of 2 worker processes (its start included), and --shared both ways."""
    folder = workdir / "batch"
    folder.mkdir(exist_ok=True)
    camera, coffee = samples.camera(), samples.coffee()
    rng = np.random.default_rng(0)
    for i in range(n_images):
        source = coffee if i % 2 else camera
        top, left = rng.integers(0, 200, 2)
        Image.fromarray(source[top : top + 160, left : left + 200]).save(folder / f"{i:03d}.png")
    print(f"\n| {n_images} small images (200 x 160, all outputs) | seconds | images a second |")
    print("|---|---|---|")
    for name, options in (
        ("--jobs 1", ("--jobs", "1")),
        ("--jobs 2", ("--jobs", "2")),
        ("--dask local:2", ("--dask", "local:2")),
        ("--shared --jobs 1", ("--shared", "--jobs", "1")),
        ("--shared --dask local:2", ("--shared", "--dask", "local:2")),
    ):
        seconds, _ = end_to_end(folder, workdir, *options)
        print(f"| {name} | {seconds:.1f} | {n_images / seconds:.1f} |")


def counting_options(megapixels=50):
    """Seconds to count distinct values at the given size, each way we considered."""
    side = int((megapixels * 1e6) ** 0.5)
    source = Image.fromarray(samples.retina()).resize((side, side), Image.BICUBIC)
    codes = seg.pack_rgb(np.asarray(source)).reshape(-1)
    deep = (np.asarray(source.convert("L"), dtype=np.uint16) * 257).reshape(-1)
    deep += np.random.default_rng(0).integers(0, 200, deep.size, dtype=np.uint16)
    rows = []
    for name, count in (
        (
            "24-bit colour: bincount over packed codes, in blocks (used)",
            lambda: seg.code_histogram(codes, 1 << 24, seg.Passes()),
        ),
        (
            "24-bit colour: np.unique on packed codes (sort)",
            lambda: np.unique(codes, return_counts=True),
        ),
        (
            "16-bit gray: bincount over 65536 levels, in blocks (used)",
            lambda: seg.code_histogram(deep, 1 << 16, seg.Passes()),
        ),
        ("16-bit gray: np.unique (sort)", lambda: np.unique(deep, return_counts=True)),
    ):
        start = time.perf_counter()
        count()
        rows.append((name, f"{time.perf_counter() - start:.2f} s"))
    return side * side, rows


def chosen(name, only):
    """Whether the row or table called name runs under --only TEXT (all without it)."""
    return not only or only in name


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a subset that runs in under a minute")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to put the generated images"
    )
    parser.add_argument(
        "--only",
        metavar="TEXT",
        default=None,
        help="run only the rows whose name contains TEXT (to remeasure a row)",
    )
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="gmm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, NumPy {np.__version__}"
    )
    fits = [("astronaut.png", samples.astronaut())]
    if not args.quick:
        fits = (
            [("retina.jpg", samples.retina())]
            + fits
            + [("retina.jpg + noise sigma 40", noisy(samples.retina(), 40))]
        )
    fits = [row for row in fits if chosen(row[0], args.only)]
    if fits:
        header(
            "image",
            "megapixels",
            "distinct colours",
            "K",
            "ours fit s",
            "ours EM steps",
            "scikit-learn fit s",
            "ratio",
            "ours loglik/px",
            "scikit-learn loglik/px",
            "plain EM s",
            "plain EM steps",
            "ours end to end s",
            "I/O floor s",
            "ours peak MB",
        )
    for name, array in fits:
        ours_s, ours_ll, steps, distinct = our_fit(array, 5)
        plain_s, _, plain_steps, _ = our_fit(array, 5, accelerate="none")
        ref_s, ref_ll, _ = sklearn_fit(array, 5)
        path = workdir / "fit_input.png"  # lossless, so the program sees the same pixels
        Image.fromarray(array).save(path, compress_level=1)
        whole_s, whole_mb = end_to_end(path, workdir)
        floor_s, _ = io_floor(path, workdir)
        row(
            name,
            f"{array.shape[0] * array.shape[1] / 1e6:.2f}",
            f"{distinct:,}",
            5,
            f"{ours_s:.3f}",
            steps,
            f"{ref_s:.2f}",
            ratio(ref_s, ours_s),
            f"{ours_ll:.4f}",
            f"{ref_ll:.4f}",
            f"{plain_s:.3f}",
            plain_steps,
            f"{whole_s:.2f}",
            f"{floor_s:.2f}",
            f"{whole_mb:.0f}",
        )

    scenes = [
        (f"overlapping colour scene, seed {seed}", overlapping_scene(seed, 3), 4) for seed in (1, 2)
    ]
    scenes += [
        (f"overlapping gray scene, seed {seed}", overlapping_scene(seed, 1), 3) for seed in (1,)
    ]
    if args.quick:
        scenes = scenes[:1]
    scenes = [row for row in scenes if chosen(row[0], args.only)]
    if scenes:
        header(
            "to the maximum",
            "K",
            "ours s",
            "ours EM steps",
            "ours loglik/px",
            "plain EM s",
            "plain EM steps",
            "plain loglik/px",
            "scikit-learn tol 1e-8 s",
            "its iterations",
            "its loglik/px",
            "ratio",
        )
    for name, array, k in scenes:  # fits of well under a second: each side's fastest of three
        ours_s, ours_ll, steps, _ = fastest_of(3, our_fit, array, k)
        plain_s, plain_ll, plain_steps, _ = fastest_of(
            3, our_fit, array, k, accelerate="none", max_iter=100_000
        )
        ref_s, ref_ll, ref_iter = fastest_of(3, sklearn_fit, array, k, tol=1e-8, max_iter=100_000)
        row(
            name,
            k,
            f"{ours_s:.3f}",
            steps,
            f"{ours_ll:.6f}",
            f"{plain_s:.3f}",
            plain_steps,
            f"{plain_ll:.6f}",
            f"{ref_s:.2f}",
            ref_iter,
            f"{ref_ll:.6f}",
            ratio(ref_s, ours_s),
        )

    ends = [("colour, from astronaut", samples.astronaut(), 4, ())]
    if not args.quick:
        ends = [
            ("gray, from camera", samples.camera(), 24, ()),
            ("colour, from retina", samples.retina(), 24, ()),
            ("colour, from retina", samples.retina(), 50, ()),
            ("colour, noisy photo", "noisy photo", 24, ()),
            ("gray, from camera, --spatial 1", samples.camera(), 24, ("--spatial", "1")),
            ("colour, from retina, --spatial 1", samples.retina(), 24, ("--spatial", "1")),
            ("brain, --bias-field", "brain", 24, ("--bias-field",)),
            ("brain, --bias-field --spatial 1", "brain", 24, ("--bias-field", "--spatial", "1")),
            ("colour, astronaut 0.26 MP, every output", samples.astronaut(), 0.26, ()),
            (
                "colour, astronaut 0.26 MP, --outputs labels,json",
                samples.astronaut(),
                0.26,
                ("--outputs", "labels,json"),
            ),
            (
                "brain 1 MP, plain (-k 3 --mask nonzero)",
                "brain",
                1,
                ("-k", "3", "--mask", "nonzero"),
            ),
            ("brain 1 MP, --brain", "brain", 1, ("--brain",)),
            ("brain, --brain", "brain", 24, ("--brain",)),
        ]
    ends = [row for row in ends if chosen(row[0], args.only)]
    if ends:
        header(
            "end to end",
            "size",
            "distinct values",
            "K",
            "iterations (EM steps)",
            "spatial iterations (full sweeps)",
            "ours s",
            "I/O floor s",
            "ratio",
            "ours peak MB",
            "bytes/pixel",
        )
    for name, source, megapixels, options in ends:
        path = workdir / f"{name.split(',')[0]}_{megapixels}mp.png"
        if isinstance(source, str) and source == "noisy photo":
            width, height = noisy_photo(megapixels, path)
        elif isinstance(source, str):
            width, height = biased_brain(megapixels, path)
        else:
            width, height = big_image(source, megapixels, path)
        ours_s, ours_mb = end_to_end(path, workdir, *options)
        record = json.loads((workdir / "out" / f"{path.stem}_model.json").read_text())
        floor_s, _ = io_floor(path, workdir)
        spatial = record.get("spatial")
        row(
            name,
            f"{width}x{height} ({width * height / 1e6:.0f} MP)",
            f"{record['distinct_values']:,}",
            record["k"],
            f"{record['n_iter']} ({record['em_steps']})",
            f"{spatial['n_iter']} ({spatial['full_sweeps']})" if spatial else "-",
            f"{ours_s:.2f}",
            f"{floor_s:.2f}",
            f"{ours_s / floor_s:.2f}x",
            f"{ours_mb:.0f}",
            f"{ours_mb * 2**20 / (width * height):.1f}",
        )
        path.unlink()

    if args.quick:
        return
    if chosen("fit on draws", args.only):
        draws_against_every_point(workdir)
    if chosen("spatial fit on ramps", args.only):
        spatial_updates()
    if chosen("figure sizes", args.only):
        figure_sizes(workdir)
    if chosen("applying a saved model", args.only):
        applying_a_model(workdir)
    if chosen("volumes", args.only):
        volumes(workdir)
    if chosen("dask throughput", args.only):
        dask_throughput(workdir)
    if chosen("counting distinct values", args.only):
        pixels, rows = counting_options()
        print(f"\n| counting distinct values, {pixels / 1e6:.0f} MP | seconds |")
        print("|---|---|")
        for name, seconds in rows:
            print(f"| {name} | {seconds} |")


if __name__ == "__main__":
    main()

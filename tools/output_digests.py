"""Digests of every output of a fixed set of runs: python tools/output_digests.py [--out DIR]

Not collected by pytest.  A refactoring must not change a byte of what the program writes:
run this before and after and compare the two listings (`diff`).  Each line is
`RUN/FILE sha256`; a JSON record is digested without its "seconds" (the one field that changes
from run to run), the names of the scratch folder and of the repository replaced.  The runs
cover every model and option that changes the arithmetic: the bundled samples with the
defaults, every covariance type, plain EM, random starts, -k auto, --quantized, --spatial
(coarse to fine and partial sweeps on an enlarged image), --mask, --bias-field with and
without --spatial, --probabilities, --shared, 16-bit and float images.
About two minutes.
"""

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

# BLAS on one thread, as the command runs it (set before NumPy loads it): the same bits
os.environ.update(
    dict.fromkeys(("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"), "1")
)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import ImageSegmentation as seg  # noqa: E402


def make_inputs(folder):
    """The runs' own images beside the bundled samples: enlarged, deep and floating-point."""
    camera = np.asarray(Image.open(ROOT / "images" / "camera.png"))
    brain = np.asarray(Image.open(ROOT / "images" / "brain_t1.png"))
    rng = np.random.default_rng(7)
    big = np.repeat(np.repeat(camera, 2, axis=0), 2, axis=1)  # 1 MP: past the coarsest grid
    Image.fromarray(big).save(folder / "camera_big.png")
    rows, cols = np.mgrid[0 : brain.shape[0], 0 : brain.shape[1]]
    field = 1 + 0.2 * np.sin(rows / brain.shape[0] * np.pi) * np.cos(cols / brain.shape[1] * 2)
    biased = np.clip(brain * field, 0, 255).astype(np.uint8)
    biased[brain == 0] = 0
    Image.fromarray(np.repeat(np.repeat(biased, 3, axis=0), 3, axis=1)).save(folder / "brain.png")
    deep = (camera.astype(np.uint16) * 257 + rng.integers(0, 257, camera.shape)).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep.png")
    Image.fromarray((camera / 255.0).astype(np.float32)).save(folder / "float.tif")
    slices = [Image.fromarray(np.roll(biased, shift, axis=1)) for shift in range(0, 24, 2)]
    slices[0].save(folder / "stack.tif", save_all=True, append_images=slices[1:])
    names = ("camera_big.png", "brain.png", "deep.png", "float.tif", "stack.tif")
    return {name: folder / name for name in names}


def runs(images, made):
    camera, coffee, brain = (images / f"{name}.png" for name in ("camera", "coffee", "brain_t1"))
    return {
        "default": [images],
        "diag": [coffee, "--covariance", "diag"],
        "spherical": [coffee, "--covariance", "spherical"],
        "tied": [camera, coffee, "--covariance", "tied"],
        "plain": [camera, coffee, "--accelerate", "none"],
        "random": [camera, "--init", "random", "--n-init", "3", "--seed", "5"],
        "auto": [camera, coffee, "-k", "auto", "--k-max", "5"],
        "quantized": [camera, made["deep.png"], "--quantized", "-k", "4"],
        "gray": [coffee, "--mode", "gray", "--probabilities"],
        "spatial": [camera, coffee, "--spatial", "1", "--probabilities"],
        "spatial_big": [made["camera_big.png"], "--spatial", "0.7"],
        "spatial_quantized": [camera, "--spatial", "1", "--quantized"],
        "mask": [brain, "--spatial", "1", "--mask", "nonzero", "--probabilities"],
        "bias": [brain, made["brain.png"], "--bias-field", "--probabilities"],
        "bias_spatial": [made["brain.png"], "--bias-field", "--spatial", "1"],
        "shared": [camera, coffee, made["deep.png"], "--shared"],
        "shared_spatial": [camera, made["camera_big.png"], "--shared", "--spatial", "1"],
        "float": [made["float.tif"], "-k", "2"],
        "brain": [brain, made["brain.png"], "--brain", "--probabilities"],
        "volume": [made["stack.tif"], "--brain", "--probabilities", "--spacing", "2,1,1"],
        "volume_spatial": [made["stack.tif"], "-k", "3", "--spatial", "0.5", "--mask", "nonzero"],
    }


def digest(path, base, pixels=False):
    """The file's SHA-256; a JSON record's without its seconds, and with the names of the scratch
    folder and of the repository made the same in every run.  pixels: a PNG's decoded content
    instead (its mode, size, palette and pixels), for a change of how images are encoded."""
    data = path.read_bytes()
    if pixels and path.suffix == ".png":
        with Image.open(path) as image:
            palette = image.getpalette() if image.mode == "P" else None
            data = repr((image.mode, image.size, palette)).encode() + image.tobytes()
    if path.suffix == ".json":
        text = data.decode().replace(str(base), "BASE").replace(str(ROOT), "ROOT")
        record = json.loads(text)
        record.pop("seconds", None)
        data = json.dumps(record, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="keep the outputs here (default: a temporary folder)")
    parser.add_argument(
        "--pixels", action="store_true", help="digest PNGs by their pixels, not their bytes"
    )
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        base = Path(arguments.out or scratch)
        made_folder = base / "inputs"
        made_folder.mkdir(parents=True, exist_ok=True)
        made = make_inputs(made_folder)
        for name, argv in runs(ROOT / "images", made).items():
            out = base / name
            status = seg.main([str(a) for a in argv] + ["--out", str(out), "-q", "--jobs", "1"])
            print(f"{name} status {status}", flush=True)
            for path in sorted(out.iterdir()):
                print(f"{name}/{path.name} {digest(path, base, arguments.pixels)}", flush=True)


if __name__ == "__main__":
    main()

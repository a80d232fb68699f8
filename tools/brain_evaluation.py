"""Accuracy on real brain anatomy: python tools/brain_evaluation.py [--slices 70,85,100,115,130]
or, on the whole template volume, python tools/brain_evaluation.py --volume

Not collected by pytest; needs two packages the tests do not (`pip install nibabel nilearn`),
and scores ANTs Atropos too when antspyx is installed (`pip install antspyx`).

The ICBM 2009a nonlinear symmetric template (the source of images/brain_t1.png), as nilearn
ships it inside its package (nothing is downloaded): the T1 volume and its grey- and
white-matter probability maps; CSF is the rest of the brain (T1 > 0).  Each axial slice is
scored inside the brain, on the pixels where one tissue has probability >= 0.5, against the
most probable tissue (1 CSF, 2 grey, 3 white matter), in three conditions:

  clean    the template slice as it is (8-bit);
  noisy    Rician noise: |slice + complex Gaussian noise|, sd 3 % of white matter's intensity;
  biased   the noisy slice times a smooth field of +-20 % (exp of a quadratic in the pixel
           coordinates), black outside the brain as before.

Every method sees the same 8-bit images and the same mask (the nonzero pixels); the noise and
the field come from fixed seeds.  Prints one Markdown table: the accuracy of every method in
every condition (the mean over the slices), and the worst slice's.

--volume: the same three conditions on the whole template volume (197 x 233 x 189), the field
a smooth function of the three coordinates, written as 8-bit .nii.gz with the template's
affine; the program's --brain (and the options of --methods) against Atropos with a 1x1x1
neighbourhood, both timed end to end (ours: the command, reading and writing included).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SLICES = (70, 85, 100, 115, 130)
NOISE = 0.03  # Rician sd, a fraction of white matter's mean intensity
FIELD = 0.2  # the field's half range: +-20 %

METHODS = {
    "plain mixture": ["-k", "3"],
    "--spatial 1": ["-k", "3", "--spatial", "1"],
    "--bias-field --spatial 1": ["-k", "3", "--bias-field", "--spatial", "1"],
    "--brain without its field": ["--brain", "--no-bias-field"],
    "--brain without partial volume": ["--brain", "--no-partial-volume"],
    "--brain": ["--brain"],
    "--brain --spatial auto": ["--brain", "--spatial", "auto"],
}


def template(name):
    """One of the ICBM 2009a maps nilearn ships: t1, gm or wm, as a float volume."""
    import nibabel
    import nilearn

    data = Path(nilearn.__file__).parent / "datasets" / "data"
    path = data / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
    return np.asarray(nibabel.load(path).dataobj, dtype=np.float64)


def truth_of(gm, wm, inside):
    """The most probable tissue (1 CSF, 2 GM, 3 WM) where one has probability >= 0.5, else 0.

    gm and wm are the template's maps, 0..255 for probabilities 0..1."""
    gm, wm = gm / 255.0, wm / 255.0
    csf = np.clip(1.0 - gm - wm, 0.0, 1.0)
    stack = np.stack([csf, gm, wm])
    labels = stack.argmax(axis=0) + 1
    return np.where(inside & (stack.max(axis=0) >= 0.5), labels, 0)


def smooth_field(shape, rng):
    """exp of a random quadratic in the coordinates, scaled to +-FIELD over the image."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    u, v = 2 * rows / (shape[0] - 1) - 1, 2 * cols / (shape[1] - 1) - 1
    c = rng.normal(size=5)
    log_field = c[0] * u + c[1] * v + c[2] * u * u + c[3] * v * v + c[4] * u * v
    log_field -= log_field.min()
    log_field *= 2 * np.log1p(FIELD) / log_field.max()
    return np.exp(log_field - np.log1p(FIELD))


def conditions(t1, truth, seed, field=smooth_field):
    """The three 8-bit images of one slice (volumes of a volume, field=volume_field): clean,
    noisy, noisy and biased."""
    rng = np.random.default_rng(seed)
    inside = t1 > 0
    sd = NOISE * t1[truth == 3].mean()
    noisy = np.hypot(t1 + rng.normal(0, sd, t1.shape), rng.normal(0, sd, t1.shape))
    biased = noisy * field(t1.shape, rng)
    images = {}
    for name, values in (("clean", t1), ("noisy", noisy), ("biased", biased)):
        image = np.clip(np.rint(values), 1, 255).astype(np.uint8)  # nothing inside is 0
        image[~inside] = 0
        images[name] = image
    return images


def volume_field(shape, rng):
    """exp of a random quadratic in the three coordinates, scaled to +-FIELD over the volume."""
    axes = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij", sparse=True)
    c = rng.normal(size=9)
    u, v, w = axes
    log_field = c[0] * u + c[1] * v + c[2] * w + c[3] * u * u + c[4] * v * v + c[5] * w * w
    log_field = log_field + c[6] * u * v + c[7] * u * w + c[8] * v * w
    log_field -= log_field.min()
    log_field *= 2 * np.log1p(FIELD) / log_field.max()
    return np.exp(log_field - np.log1p(FIELD))


def evaluate_volume(methods):
    """The whole-volume table: accuracy and seconds of each method in each condition."""
    import nibabel
    import nilearn

    data = Path(nilearn.__file__).parent / "datasets" / "data"
    affine = nibabel.load(data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz").affine
    t1, gm, wm = (template(name) for name in ("t1", "gm", "wm"))
    truth = truth_of(gm, wm, t1 > 0)
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for condition, volume in conditions(t1, truth, 0, volume_field).items():
            path = scratch / f"{condition}.nii.gz"
            nibabel.save(nibabel.Nifti1Image(volume, affine), path)
            for method, options in methods.items():
                started = time.perf_counter()
                if options is None:
                    labels = atropos(volume, radius="1x1x1")
                else:
                    subprocess.run(
                        [sys.executable, str(ROOT / "ImageSegmentation.py"), str(path), "-q"]
                        + ["--out", str(scratch), "--mask", "nonzero", *options],
                        check=True,
                    )
                    labels = np.asarray(
                        nibabel.load(scratch / f"{condition}_labels.nii.gz").dataobj
                    )
                seconds = time.perf_counter() - started
                rows.setdefault(method, {})[condition] = (accuracy(labels, truth), seconds)
    print("\n| whole ICBM 2009a volume, K = 3, mask nonzero | clean | noisy | biased |")
    print("|---|---|---|---|")
    for method, cells in rows.items():
        text = [f"{100 * a:.1f} % ({s:.1f} s)" for a, s in (cells[c] for c in VOLUME_ORDER)]
        print(f"| {method} | " + " | ".join(text) + " |")


VOLUME_ORDER = ("clean", "noisy", "biased")
VOLUME_METHODS = {
    "--brain": ["--brain"],
    "--brain without its field": ["--brain", "--no-bias-field"],
}


def ours(path, options, out):
    """The label map of one run of the program on one image."""
    subprocess.run(
        [sys.executable, str(ROOT / "ImageSegmentation.py"), str(path), "-q", "--out", str(out)]
        + ["--mask", "nonzero", "--jobs", "1", *options],
        check=True,
    )
    return np.asarray(Image.open(out / f"{path.stem}_labels.png"))


def atropos(image, radius="1x1", n4=False):
    """ANTs Atropos as the issue ran it: k-means init, K = 3, MRF 0.1 (radius 1), the mask;
    n4: on the image ANTs' N4 has corrected first."""
    import ants

    img = ants.from_numpy(image.astype(np.float32))
    mask = ants.from_numpy((image > 0).astype(np.float32))
    if n4:
        img = ants.n4_bias_field_correction(img, mask=mask)
    result = ants.atropos(a=img, x=mask, i="kmeans[3]", m=f"[0.1,{radius}]", c="[5,0]")
    return result["segmentation"].numpy().astype(np.int64)


def accuracy(labels, truth):
    scored = truth > 0
    return float(np.mean(labels[scored] == truth[scored]))


def kept(labels, truth):
    """The smallest share of a tissue's true pixel count that the labels give that tissue."""
    scored = truth > 0
    found = np.bincount(labels[scored], minlength=4)[1:4]
    return float(min(found / np.bincount(truth[scored], minlength=4)[1:4]))


def with_atropos(methods, only):
    """The methods, Atropos's row added when antspyx is installed, those whose name has `only`."""
    methods = dict(methods)
    try:
        import ants  # noqa: F401

        methods["ANTs Atropos"] = None
    except ImportError:
        print("(antspyx not installed: no Atropos row)", file=sys.stderr)
    return {k: v for k, v in methods.items() if not only or only in k}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", default=",".join(map(str, SLICES)))
    parser.add_argument("--methods", default=None, help="only the methods whose name has this")
    parser.add_argument("--volume", action="store_true", help="the whole volume instead")
    arguments = parser.parse_args()
    methods = with_atropos(VOLUME_METHODS if arguments.volume else METHODS, arguments.methods)
    if arguments.volume:
        evaluate_volume(methods)
        return
    slices = [int(z) for z in arguments.slices.split(",")]
    t1_volume, gm_volume, wm_volume = (template(name) for name in ("t1", "gm", "wm"))
    scores, shares = {}, {}  # (method, condition) -> [accuracy, least tissue share per slice]
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        for z in slices:
            t1 = np.rot90(t1_volume[:, :, z])
            truth = truth_of(np.rot90(gm_volume[:, :, z]), np.rot90(wm_volume[:, :, z]), t1 > 0)
            for condition, image in conditions(t1, truth, seed=z).items():
                path = scratch / f"z{z}_{condition}.png"
                Image.fromarray(image).save(path)
                for method, options in methods.items():
                    labels = atropos(image) if options is None else ours(path, options, scratch)
                    scores.setdefault((method, condition), []).append(accuracy(labels, truth))
                    shares.setdefault(method, []).append(kept(labels, truth))
    names = ("clean", "noisy", "biased")
    print(
        f"\n| K = 3, mask nonzero, slices {', '.join(map(str, slices))} | "
        + " | ".join(names)
        + " |"
    )
    print("|---" * (len(names) + 1) + "|")
    for method in methods:
        cells = [
            f"{100 * np.mean(scores[method, c]):.1f} % (worst {100 * min(scores[method, c]):.1f})"
            for c in names
        ]
        print(f"| {method} | " + " | ".join(cells) + " |")
    print("\nthe smallest share of a tissue's true pixels kept, over every slice and condition:")
    for method in methods:
        print(f"  {method}: {min(shares[method]):.2f}")


if __name__ == "__main__":
    main()

"""Make images/brain_t1.png, the brain MRI sample: python tools/make_mri_sample.py

Not collected by pytest; needs two dev-only packages that are not in requirements-dev.txt:
``pip install nibabel nilearn``.  The slice comes from the ICBM 2009a nonlinear symmetric T1
template (McConnell Brain Imaging Centre, Montreal Neurological Institute), as nilearn ships it
inside its package (nilearn/datasets/data/, nothing is downloaded): axial slice z = 90 of the
1 mm, 197 x 233 x 189 volume, rotated so the nose points up, saved as 8-bit gray PNG.  The
template is skull-stripped: outside the brain every voxel is exactly 0.

It also prints how the default run's labels agree with the template's own tissue probability
maps (grey and white matter shipped beside it; CSF = the rest of the brain), the figure the
README quotes.

With --volume it makes docs/brain_volume_comparison.png instead, the README's picture of a
volume: the whole template written as NIfTI, segmented by --brain, its three middle slices.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel
import nilearn
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
SLICE = 90
DATA = Path(nilearn.__file__).parent / "datasets" / "data"


def template(name):
    """One of the ICBM 2009a maps nilearn ships: t1, gm or wm, as a uint8 volume."""
    path = DATA / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
    return np.asarray(nibabel.load(path).dataobj)


def axial(volume):
    return np.rot90(volume[:, :, SLICE])


def volume_figure():
    path = DATA / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    with tempfile.TemporaryDirectory() as folder:
        scan = Path(folder) / "icbm_t1.nii.gz"
        source = nibabel.load(path)
        nibabel.save(nibabel.Nifti1Image(np.asarray(source.dataobj), source.affine), scan)
        subprocess.run(
            [sys.executable, ROOT / "ImageSegmentation.py", scan, "--brain", "--out", folder],
            check=True,
        )
        figure = ROOT / "docs" / "brain_volume_comparison.png"
        figure.write_bytes((Path(folder) / "icbm_t1_comparison.png").read_bytes())
        print(f"{figure}: written")


def main():
    if "--volume" in sys.argv[1:]:
        volume_figure()
        return
    t1 = axial(template("t1"))
    out = ROOT / "images" / "brain_t1.png"
    Image.fromarray(t1).save(out, optimize=True)
    print(f"{out}: {t1.shape[1]} x {t1.shape[0]}, {np.count_nonzero(t1)} brain pixels")

    gm, wm = axial(template("gm")) / 255.0, axial(template("wm")) / 255.0
    brain = t1 > 0
    truth = np.argmax(np.stack([1 - gm - wm, gm, wm]), axis=0)  # 0 CSF, 1 grey, 2 white
    with tempfile.TemporaryDirectory() as folder:
        subprocess.run(
            [sys.executable, ROOT / "ImageSegmentation.py", out, "-q", "--out", folder], check=True
        )
        labels = np.asarray(Image.open(Path(folder) / "brain_t1_labels.png"))
    agree = np.mean(labels[brain] - 1 == truth[brain])
    print(
        f"default run: labels 1, 2, 3 = CSF, grey, white matter agree with the template's most "
        f"probable tissue on {100 * agree:.1f} % of the brain"
    )


if __name__ == "__main__":
    main()

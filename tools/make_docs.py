"""Make the README's pictures and accuracy table: python tools/make_docs.py

Not collected by pytest.  Runs the program on the bundled samples, and on synthetic images
made here (the same kinds the tests use), and writes docs/*.png; the volume's picture too
where nilearn is installed (make_mri_sample.py).  Prints the Markdown table of accuracies
that docs/method.md quotes.
"""

import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # conftest
from conftest import (  # noqa: E402
    CLIPPED,
    ROOT,
    bayes_of_levels,
    clipped_image,
    matched_accuracy,
    noisy_scene,
    seg,
)

DOCS = ROOT / "docs"


def sample_figures():
    """The README's pictures of the default run (coffee, camera) and of --brain on the brain
    sample, as the program draws them today."""
    out = Path(tempfile.mkdtemp())
    assert seg.main([str(ROOT / "images"), "--out", str(out), "-q"]) == 0
    brain = ROOT / "images" / "brain_t1.png"
    assert seg.main([str(brain), "--brain", "--out", str(out / "brain"), "-q"]) == 0
    for name in ("coffee_comparison", "coffee_loglik", "camera_comparison"):
        shutil.copy(out / f"{name}.png", DOCS / f"{name}.png")
    shutil.copy(out / "brain" / "brain_t1_comparison.png", DOCS / "brain_t1_comparison.png")


def before_after(title, image, rows, path, measure="correct"):
    """One figure: the input and one label map per row of (name, labels, accuracy)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4 * (len(rows) + 1), 3.6), layout="constrained")
    axes = figure.subplots(1, len(rows) + 1)
    axes[0].imshow(image, **({"cmap": "gray", "vmin": 0, "vmax": 255} if image.ndim == 2 else {}))
    axes[0].set_title("input")
    for ax, (name, labels, accuracy) in zip(axes[1:], rows):
        ax.imshow(labels, cmap="viridis", interpolation="nearest")
        ax.set_title(name if accuracy is None else f"{name}\n{100 * accuracy:.1f} % {measure}")
    for ax in axes:
        ax.axis("off")
    figure.suptitle(title)
    figure.savefig(path, dpi=80)


def main():
    DOCS.mkdir(exist_ok=True)
    sample_figures()
    table = []
    for n_features, name in ((1, "gray"), (3, "colour")):
        image, truth, bayes = noisy_scene(n_features, np.random.default_rng(12345))
        plain = matched_accuracy(seg.segment_image(image, 3)[0], truth, 3)
        spatial_labels = seg.segment_image(image, 3, spatial=1.0)[0]
        spatial = matched_accuracy(spatial_labels, truth, 3)
        table.append((f"noisy 3-class scene, {name}", "--spatial 1", bayes, plain, spatial))
        if n_features == 3:
            before_after(
                "--spatial 1 on a noisy colour scene",
                image,
                [
                    ("truth", truth, None),
                    ("per-pixel mixture", seg.segment_image(image, 3)[0], plain),
                    ("--spatial 1", spatial_labels, spatial),
                ],
                DOCS / "spatial.png",
            )
    for case, (means, sds) in CLIPPED.items():
        image, truth = clipped_image(means, sds, np.random.default_rng(12345))
        bayes = matched_accuracy(bayes_of_levels(truth, means, sds)[image], truth, 3)
        plain_labels = seg.segment_image(image, 3, tol=1e-6)[0]
        quantized_labels = seg.segment_image(image, 3, quantized=True, tol=1e-6)[0]
        plain, quantized = (
            matched_accuracy(labels, truth, 3) for labels in (plain_labels, quantized_labels)
        )
        table.append((f"gray, {case}", "--quantized", bayes, plain, quantized))
        if "dark" in case:
            before_after(
                "--quantized on a gray image whose darkest class is clipped at 0",
                image,
                [
                    ("truth", truth, None),
                    ("per-pixel mixture", plain_labels, plain),
                    ("--quantized", quantized_labels, quantized),
                ],
                DOCS / "quantized.png",
            )
    plain, corrected, correlation = brain_bias()
    print(
        f"brain slice x a +-20 % field: labels agree with the field-free run on "
        f"{100 * plain:.1f} % of the brain without --bias-field, {100 * corrected:.1f} % with it; "
        f"the estimated log field correlates {correlation:.4f} with the true one"
    )
    print("| image | option | per-pixel Bayes limit | plain mixture | with the option |")
    print("|---|---|---|---|---|")
    for name, option, bayes, plain, better in table:
        print(
            f"| {name} | `{option}` | {100 * bayes:.1f} % | {100 * plain:.1f} % "
            f"| {100 * better:.1f} % |"
        )


def brain_bias():
    """The brain sample times a known smooth field of about +-20 %: the labels without and with
    --bias-field against those of the sample itself, the field-free reference."""
    from PIL import Image

    brain = np.asarray(Image.open(ROOT / "images" / "brain_t1.png"))
    inside = brain > 0
    rows = np.linspace(-1, 1, brain.shape[0])[:, None]
    cols = np.linspace(-1, 1, brain.shape[1])[None, :]
    log_field = 0.2 * (0.8 * rows + 0.5 * cols * cols - 0.3 * rows * cols)
    field = np.exp(log_field - log_field[inside].mean())
    biased = np.clip(np.rint(brain * field), 1, 255).astype(np.uint8)
    biased[~inside] = 0
    reference = seg.segment_image(brain, 3, mask=inside)[0]
    plain = seg.segment_image(biased, 3, mask=inside)[0]
    picture = seg.with_mask(seg.picture_from_array(biased), inside)
    fitted = seg.segment_points(picture, seg.distinct_values(picture), 3, bias_field=True)
    corrected = seg.label_map(fitted)

    def agreement(labels):
        return np.mean(labels[inside] == reference[inside])

    before_after(
        "a brain slice times a smooth +-20 % field",
        biased,
        [
            ("the slice without the field", reference, None),
            ("per-pixel mixture", plain, agreement(plain)),
            ("--bias-field", corrected, agreement(corrected)),
        ],
        DOCS / "brain_bias.png",
        measure="as without the field",
    )
    estimated = np.log(fitted.bias.image()[inside])
    return (
        agreement(plain),
        agreement(corrected),
        np.corrcoef(estimated, np.log(field[inside]))[0, 1],
    )


def volume_figure():
    """docs/brain_volume_comparison.png, from the template nilearn ships (make_mri_sample.py)."""
    try:
        from make_mri_sample import volume_figure as make
    except ImportError:
        print("docs/brain_volume_comparison.png: not made (pip install nibabel nilearn)")
        return
    make()


if __name__ == "__main__":
    main()
    volume_figure()

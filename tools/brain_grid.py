"""The brain evaluation grid: python tools/brain_grid.py [--seed 2] [--cases 150] [--methods brain]
or, on the whole template volume at every noise and field level, ... --volume [--noise 0,5,9];
with --records FILE every case's scores one JSON line each, and --compare BEFORE AFTER, two
such files of the same draws (a change against the commit before it), case by case.

Not collected by pytest; needs nibabel and nilearn (`pip install nibabel nilearn`), and scores
ANTs Atropos, with and without N4 first, when antspyx is installed (`pip install antspyx`).

BrainWeb's grid of conditions on the ICBM 2009a template (brain_evaluation.py's data and
scoring), each case drawn at random from its seed, so that no setting can be tuned to the cases
a table reports: choose on one seed's cases, report on another's.

  slice        axial, coronal or sagittal, at any position with at least 5,000 brain pixels
               at 1 mm (5,000 / v^2 at voxel size v);
  voxel size   1, 2 or 3 mm: the template (and its tissue maps) averaged over v x v x v blocks,
               so a thick voxel mixes tissues as a scanner's does;
  field        BrainWeb's INU levels 0, 20, 40 % and twice 40: a smooth multiplicative field
               whose max / min inside the brain is (1 + s/2) / (1 - s/2) (1.22, 1.5, 2.33),
               of one of three shapes drawn from the seed: a random cubic polynomial of the
               three coordinates, one to three broad Gaussian bumps (width 50 to 120 mm)
               anywhere in the head, or a product of cosines with periods of 150 to 400 mm;
               applied at 1 mm before the blocks are averaged;
  noise        Rician, 0, 1, 3, 5, 7 or 9 % of white matter's mean intensity (BrainWeb's
               convention), added at the voxel size.

Every method sees the same 8-bit image (the brain's 99.9th percentile at 250, the outside 0)
and the same mask (the nonzero pixels). Scored inside the brain where one tissue has
probability >= 0.5 after averaging: `as read`, labels 1, 2, 3 taken as CSF, grey and white
matter as documented; `matched`, the best of the six permutations (a swap shows as the gap).
With --field-cost, each method also on each case's image without its field (the same noise
draws), and a table of the points the field costs it, case by case.  With --references, two
rows of what intensities alone allow (slices): the best thresholds of each image's gray levels,
chosen knowing the truth, and of the same image without its field.  With --true-field, a row
of --brain on each image divided by its true field (its own field fit starts there): against
the image without a field, the part of the field's cost that is the model's; the rest is the
search's.
Also: the smallest share of a tissue's true pixel count its label gets, and whether the
program said so (a `note:`) where that share is under a half.  With --field-basis N, no
segmentation: N random fields of each shape at 40 and 80 %, and how closely a polynomial of
degree 3 (the program's default field) and 5 follows each inside the brain.
"""

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import brain_evaluation  # noqa: E402
from brain_evaluation import template  # noqa: E402

import ImageSegmentation as seg  # noqa: E402

NOISE = (0, 1, 3, 5, 7, 9)  # % of white matter's mean
INU = (0, 20, 40, 80)  # %: max/min inside the brain (1 + s/2) / (1 - s/2)
VOXELS = (1, 2, 3)  # mm
ORIENTATIONS = {"sagittal": 0, "coronal": 1, "axial": 2}  # the template's axis of each
SHAPES = ("polynomial", "bumps", "waves")
MIN_BRAIN_PIXELS = 5000  # at 1 mm


# --- the template at each voxel size -------------------------------------------------------


class Template:
    """The T1 volume and the three tissues' probability maps at 1 mm, and their block averages."""

    def __init__(self):
        t1, gm, wm = (template(name) for name in ("t1", "gm", "wm"))
        brain = t1 > 0
        gm, wm = gm / 255.0 * brain, wm / 255.0 * brain
        csf = np.clip(1.0 - gm - wm, 0.0, 1.0) * brain
        self.t1, self.tissues, self.brain = t1, np.stack([csf, gm, wm]), brain

    def slab(self, axis, index, voxel):
        """(t1, tissues, brain share) of the voxel-thick slab whose block index is index along
        axis, at 1 mm in-plane (cropped to whole blocks)."""
        take = slice(index * voxel, (index + 1) * voxel)
        pick = [slice(None)] * 3
        pick[axis] = take
        t1, brain = self.t1[tuple(pick)], self.brain[tuple(pick)]
        tissues = self.tissues[(slice(None),) + tuple(pick)]
        return (
            np.moveaxis(t1, axis, 0),
            np.moveaxis(tissues, axis + 1, 1),
            np.moveaxis(brain, axis, 0),
        )

    def positions(self, axis, voxel):
        """The block indices along axis whose slab's middle plane has enough brain pixels."""
        others = tuple(a for a in range(3) if a != axis)
        counts = np.count_nonzero(self.brain, axis=others)  # brain pixels of every plane
        n = self.brain.shape[axis] // voxel
        return [i for i in range(n) if counts[i * voxel + voxel // 2] >= MIN_BRAIN_PIXELS]


def block_mean(volume, voxel):
    """(d, h, w) -> (h // v, w // v): the mean over v x v in-plane blocks of all d planes."""
    d, h, w = volume.shape[-3:]
    h, w = h // voxel * voxel, w // voxel * voxel
    lead = volume.shape[:-3]
    cropped = volume[..., :h, :w].reshape(lead + (d, h // voxel, voxel, w // voxel, voxel))
    return cropped.mean(axis=(-5, -3, -1))


# --- fields -------------------------------------------------------------------------------------


def log_field(shape_kind, coordinates, rng):
    """A smooth log field (unscaled) at coordinates (3, ...) in mm, centred on the head."""
    x, y, z = coordinates
    if shape_kind == "polynomial":  # a random cubic in coordinates scaled by a head's 90 mm
        u, v, w = x / 90.0, y / 90.0, z / 90.0
        total = 0.0
        for a, b, c in itertools.product(range(4), repeat=3):
            if 1 <= a + b + c <= 3:
                total = total + rng.normal() / (a + b + c) * u**a * v**b * w**c
        return total
    if shape_kind == "bumps":
        total = 0.0
        for _ in range(rng.integers(1, 4)):
            centre = rng.uniform(-80, 80, size=3)
            width = rng.uniform(50, 120)
            distance = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
            total = total + rng.choice([-1, 1]) * np.exp(-distance / (2 * width**2))
        return total
    total = 1.0
    for axis_coordinate in (x, y, z):
        period = rng.uniform(150, 400)
        total = total * np.cos(2 * np.pi * axis_coordinate / period + rng.uniform(0, 2 * np.pi))
    return total


def scaled_field(raw, brain, inu):
    """exp(raw) scaled so its max / min over the brain is (1 + inu/2) / (1 - inu/2), mean 1."""
    if inu == 0:
        return np.ones_like(raw)
    inside = raw[brain]
    span = inside.max() - inside.min()
    target = np.log((1 + inu / 200) / (1 - inu / 200))
    scaled = (raw - inside.mean()) * (target / span if span > 0 else 0.0)
    return np.exp(scaled)


def polynomial_reach(log_field_values, coordinates, degree):
    """How well the program's field model, a polynomial of the given total degree in the
    coordinates (scaled to -1..1; the span does not depend on the scaling), can follow a log
    field: (the residual's standard deviation, the max / min of the best field) of the least
    squares fit to log_field_values (N,) at coordinates (3, N) in mm."""
    scaled = [(c - c.mean()) / max(np.abs(c - c.mean()).max(), 1e-9) for c in coordinates]
    columns = [
        scaled[0] ** a * scaled[1] ** b * scaled[2] ** c
        for a, b, c in itertools.product(range(degree + 1), repeat=3)
        if a + b + c <= degree
    ]
    basis = np.stack(columns, axis=1)
    coefficients = np.linalg.lstsq(basis, log_field_values, rcond=None)[0]
    fitted = basis @ coefficients
    return float(np.std(log_field_values - fitted)), float(np.exp(np.ptp(fitted)))


def field_basis_table(brain, inu, draws, seed, degrees=(3, 5)):
    """--field-basis: for draws random fields of each shape at field level inu over the brain
    (a boolean volume at 1 mm, looked at every 2 mm), the log field's spread and how well
    polynomials of each degree follow it inside the brain: mean (largest) residual standard
    deviation of the log field, and the least and largest max / min of the best fit (the
    truth's is that of inu)."""
    rng = np.random.default_rng(seed)
    centre = np.array(brain.shape) / 2
    where = np.nonzero(brain[::2, ::2, ::2])  # every other voxel along each axis: 2 mm apart
    points = [2 * w - c for w, c in zip(where, centre)]
    lines = [
        f"fields of {inu} % (max / min {(1 + inu / 200) / (1 - inu / 200):.2f}) inside the brain, "
        f"{draws} of each shape, seed {seed}: the log field's sd, and for each polynomial degree "
        "the residual's sd, mean (largest), and the best fit's max / min, least to largest\n",
        "| shape | log field sd | "
        + " | ".join(f"degree {d} residual | degree {d} max / min" for d in degrees)
        + " |",
        "|---" * (2 + 2 * len(degrees)) + "|",
    ]
    for shape in SHAPES:
        spreads, reach = [], {d: [] for d in degrees}
        for _ in range(draws):
            raw = log_field(shape, points, rng)
            values = np.log(scaled_field(raw, np.ones(raw.shape, dtype=bool), inu))
            spreads.append(float(np.std(values)))
            for d in degrees:
                reach[d].append(polynomial_reach(values, points, d))
        cells = []
        for d in degrees:
            residuals, ratios = zip(*reach[d])
            cells.append(f"{np.mean(residuals):.4f} ({max(residuals):.4f})")
            cells.append(f"{min(ratios):.2f} to {max(ratios):.2f}")
        lines.append(f"| {shape} | {np.mean(spreads):.3f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- one case -----------------------------------------------------------------------------------


def draw_case(rng, data):
    orientation = str(rng.choice(list(ORIENTATIONS)))
    voxel = int(rng.choice(VOXELS))
    positions = data.positions(ORIENTATIONS[orientation], voxel)
    return {
        "orientation": orientation,
        "voxel": voxel,
        "position": int(rng.choice(positions)),
        "noise": int(rng.choice(NOISE)),
        "inu": int(rng.choice(INU)),
        "shape": str(rng.choice(SHAPES)),
        "seed": int(rng.integers(2**31)),
    }


def make_case(case, data, with_field=False):
    """(8-bit image, truth) of a case: truth 0 outside the scored pixels, 1 CSF, 2 GM, 3 WM;
    with_field: and the field at the voxel size (the field's average over each voxel's
    signal), as the image is laid out."""
    rng = np.random.default_rng(case["seed"])
    axis, voxel = ORIENTATIONS[case["orientation"]], case["voxel"]
    t1, tissues, brain = data.slab(axis, case["position"], voxel)
    # the slab's coordinates in mm from the volume's centre, in the slab's axis order
    grids = np.meshgrid(*(np.arange(n, dtype=float) for n in t1.shape), indexing="ij")
    centre = np.array(data.t1.shape) / 2
    order = [axis] + [a for a in range(3) if a != axis]
    coordinates = [None] * 3
    for position_axis, volume_axis in enumerate(order):
        offset = case["position"] * voxel if position_axis == 0 else 0
        coordinates[volume_axis] = grids[position_axis] + offset - centre[volume_axis]
    field = scaled_field(log_field(case["shape"], coordinates, rng), brain, case["inu"])
    image, truth = scanned(
        block_mean(t1 * field, voxel),
        block_mean(t1, voxel),
        block_mean(tissues, voxel),
        block_mean(brain.astype(float), voxel) > 0,
        case["noise"],
        rng,
    )
    image, truth = np.rot90(image), np.rot90(truth)  # the head's top up, as viewers show it
    image, truth = np.ascontiguousarray(image), np.ascontiguousarray(truth)
    if not with_field:
        return image, truth
    signal = block_mean(t1, voxel)
    at_voxels = block_mean(t1 * field, voxel) / np.where(signal > 0, signal, 1.0)
    return image, truth, np.ascontiguousarray(np.rot90(np.where(signal > 0, at_voxels, 1.0)))


def divided_by_field(image, field):
    """An 8-bit image divided by a field inside (the nonzero pixels), scaled as scanned()
    scales a scan (the 99.9th percentile inside at 250), 1 to 255 inside, 0 outside."""
    inside = image > 0
    divided = np.where(inside, image / field, 0.0)
    divided *= 250.0 / np.percentile(divided[inside], 99.9)
    out = np.clip(np.rint(divided), 1, 255).astype(np.uint8)
    out[~inside] = 0
    return out


TRUE_FIELD = "--brain, true field divided out"


def true_field_row(case, image, truth, field, rows):
    """--true-field's row of a case: --brain on its image divided by the true field (make_case's
    with_field), from which its own field fit starts (what it adds is what the fit prefers to
    the truth): against the image without a field, the model's part of the field's cost.
    Without a field, the case's --brain row among rows."""
    if not case["inu"]:
        mine = next(row for row in rows if row["method"] == "--brain")
        return dict(mine, method=TRUE_FIELD)
    return dict(
        case, method=TRUE_FIELD, **run_method("--brain", divided_by_field(image, field), truth)
    )


def scanned(signal, clean, probabilities, inside, noise, rng):
    """(8-bit image, truth) of a signal (the field applied) as a scanner gives it: Rician noise
    of noise % of the clean image's white matter, the brain's 99.9th percentile at 250, 0
    outside; the truth the most probable tissue (1 CSF, 2 GM, 3 WM) where one has probability
    >= 0.5 inside, else 0."""
    truth = np.where(
        inside & (probabilities.max(axis=0) >= 0.5), probabilities.argmax(axis=0) + 1, 0
    )
    sd = noise / 100 * clean[truth == 3].mean()
    noisy = np.hypot(signal + rng.normal(0, sd, signal.shape), rng.normal(0, sd, signal.shape))
    noisy *= 250.0 / np.percentile(noisy[inside], 99.9)
    image = np.clip(np.rint(noisy), 1, 255).astype(np.uint8)
    image[~inside] = 0
    return image, truth


# --- methods ------------------------------------------------------------------------------------


def ours(image, *argv):
    """The program's labels and notes for an image, run as the command line with these options
    runs it (its configuration, preset, mask and notes), in this process without files."""
    config = seg.parse_command_line(["image", *argv])
    picture = seg.picture_from_array(image) if image.ndim == 2 else seg.picture_from_volume(image)
    segmentation, notes = seg.segment_picture(picture, seg.Batch(config, frozenset()))
    return seg.label_map(segmentation), notes


def atropos(image, n4=False):
    return brain_evaluation.atropos(image, "x".join("1" * image.ndim), n4), []


METHODS = {
    "--brain": lambda image: ours(image, "--brain"),
    "plain -k 3": lambda image: ours(image, "-k", "3", "--mask", "nonzero"),
    "Atropos": atropos,
    "Atropos after N4": lambda image: atropos(image, n4=True),
}


def best_thresholds(image, truth):
    """The labels of the best intensity-only labelling of this image, knowing the truth: each
    gray level given the tissue most of its scored pixels have (ties to the darker tissue).
    No labelling of pixels by their intensity alone scores higher; a method above it takes
    the rest from the neighbours (the spatial prior) or from a field it removes."""
    scored = truth > 0
    counts = np.zeros((256, 4), dtype=np.int64)
    np.add.at(counts, (image[scored], truth[scored]), 1)
    return np.where(image > 0, np.argmax(counts, axis=1)[image], 0)


REFERENCES = {  # --references: rows of what intensities alone allow, from the truth
    "best thresholds": lambda case, image, truth, data: best_thresholds(image, truth),
    "best thresholds, no field": lambda case, image, truth, data: best_thresholds(
        *make_case(dict(case, inu=0), data)
    ),
}


def run_method(method, image, truth):
    """A method's results on one image (result's fields)."""
    begun = time.perf_counter()
    labels, notes = METHODS[method](image)
    seconds = time.perf_counter() - begun
    return result(*scores(labels, truth), notes, seconds)


def twin_rows(case, methods, rows, without):
    """--field-cost: each method's row on the case's image without its field, run on without
    (image, truth), or where the case has no field (without None) its rows on the image itself
    renamed: the same image, the same run."""
    if without is None:
        return [dict(row, method=row["method"] + NO_FIELD) for row in rows]
    return [
        dict(case, method=method + NO_FIELD, **run_method(method, *without)) for method in methods
    ]


def scores(labels, truth):
    """(as read, matched, smallest kept share) of a label map against the truth."""
    scored = truth > 0
    found, wanted = labels[scored], truth[scored]
    matched = max(
        float(np.mean(np.asarray(p)[np.clip(found, 0, 3)] == wanted))
        for p in ((0,) + q for q in itertools.permutations((1, 2, 3)))
    )
    return brain_evaluation.accuracy(labels, truth), matched, brain_evaluation.kept(labels, truth)


# --- the tables ---------------------------------------------------------------------------------


def summary(rows, methods, factor, levels):
    """A Markdown table: each method's mean (worst) accuracy as read at each level of factor."""
    lines = [f"| {factor} | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    for level in levels:
        cells = []
        for method in methods:
            values = [r["as_read"] for r in rows if r["method"] == method and r[factor] == level]
            cells.append(
                f"{100 * np.mean(values):.1f} ({100 * min(values):.1f})" if values else "-"
            )
        count = sum(1 for r in rows if r["method"] == methods[0] and r[factor] == level)
        lines.append(f"| {level} (n={count}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


HEADLINE = {  # the README's cells: (name, which rows)
    "1 mm, field 0-20 %": lambda r: r["voxel"] == 1 and r["inu"] <= 20,
    "1 mm, field 40 %": lambda r: r["voxel"] == 1 and r["inu"] == 40,
    "1 mm, field 80 %": lambda r: r["voxel"] == 1 and r["inu"] == 80,
    "2 mm": lambda r: r["voxel"] == 2,
    "3 mm": lambda r: r["voxel"] == 3,
    "every case": lambda r: True,
}


def headline(rows, methods):
    """A Markdown table: methods down, HEADLINE's cells across, mean (worst) as read."""
    lines = ["| method | " + " | ".join(HEADLINE) + " |", "|---" * (len(HEADLINE) + 1) + "|"]
    for method in methods:
        cells = []
        for keep in HEADLINE.values():
            values = [r["as_read"] for r in rows if r["method"] == method and keep(r)]
            cells.append(
                f"{100 * np.mean(values):.1f} ({100 * min(values):.1f})" if values else "-"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


NO_FIELD = ", no field"  # the name of a method's run on a case's image without its field


def field_costs(rows, methods, groups=None):
    """A Markdown table: for each field level, each method's points lost to the field against
    its own run on the same image without the field (--field-cost), mean (largest), in each of
    groups (name: which rows; FIELD_COST_GROUPS, 1 mm and every voxel size, by default)."""
    clean = {case_key(row): row["as_read"] for row in rows if row["method"].endswith(NO_FIELD)}
    lines = ["| field | " + " | ".join(methods) + " |", "|---" * (len(methods) + 1) + "|"]
    groups = FIELD_COST_GROUPS if groups is None else groups
    for inu, (name, keep) in itertools.product(INU[1:], groups.items()):
        cells = []
        for method in methods:
            mine = [r for r in rows if r["method"] == method and r["inu"] == inu and keep(r)]
            lost = [clean[case_key(dict(r, method=method + NO_FIELD))] - r["as_read"] for r in mine]
            cells.append(f"{100 * np.mean(lost):.1f} ({100 * max(lost):.1f})" if lost else "-")
        count = sum(1 for r in rows if r["method"] == methods[0] and r["inu"] == inu and keep(r))
        lines.append(f"| {inu} %, {name} (n={count}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


FIELD_COST_GROUPS = {"1 mm": lambda r: r["voxel"] == 1, "every voxel size": lambda r: True}


def available(methods):
    try:
        import ants  # noqa: F401
    except ImportError:
        print("(antspyx not installed: no Atropos rows)", file=sys.stderr)
        methods = [m for m in methods if not m.startswith("Atropos")]
    return methods


def make_volume(noise, inu, rng, data):
    """(8-bit volume, truth) of the whole template at one noise and field level, the field's
    shape drawn from rng."""
    shape_kind = str(rng.choice(SHAPES))
    centre = np.array(data.t1.shape) / 2
    coordinates = np.meshgrid(
        *(np.arange(n) - c for n, c in zip(data.t1.shape, centre)), indexing="ij", sparse=True
    )
    field = scaled_field(log_field(shape_kind, coordinates, rng), data.brain, inu)
    volume, truth = scanned(data.t1 * field, data.t1, data.tissues, data.brain, noise, rng)
    return volume, truth, shape_kind


def evaluate_volumes(arguments, methods, data):
    """The whole volume at every noise and field level asked for: one Markdown table (with
    --field-cost each method on the volume without its field too, the same noise draws, and a
    table of what the field costs)."""
    rng = np.random.default_rng(arguments.seed)
    noises = [int(n) for n in arguments.noise.split(",")]
    fields = [int(f) for f in arguments.inu.split(",")]
    twins = [f"{method}{NO_FIELD}" for method in methods] if arguments.field_cost else []
    lines = [
        "| noise, field (shape) | " + " | ".join(methods + twins) + " |",
        "|---" * (len(methods + twins) + 1) + "|",
    ]
    rows = []
    for noise, inu in itertools.product(noises, fields):
        state = rng.bit_generator.state  # the twin's draws: the same field shape and noise
        volume, truth, shape_kind = make_volume(noise, inu, rng, data)
        case = {"grid_seed": arguments.seed, "noise": noise, "inu": inu, "shape": shape_kind}
        mine = [dict(case, method=m, **run_method(m, volume, truth)) for m in methods]
        if twins:
            twin_rng = np.random.default_rng()
            twin_rng.bit_generator.state = state
            without = make_volume(noise, 0, twin_rng, data)[:2] if inu else None
            mine += twin_rows(case, methods, mine, without)
        for row in mine:
            print(
                f"{noise} % {inu} % {row['method']}: {row['as_read']:.4f} matched "
                f"{row['matched']:.4f} kept {row['kept']:.2f} notes {row['notes']}",
                file=sys.stderr,
                flush=True,
            )
        rows += mine
        cells = [f"{100 * row['as_read']:.1f} ({row['seconds']:.0f} s)" for row in mine]
        lines.append(f"| {noise} %, {inu} % ({shape_kind}) | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    if twins:
        print("\npoints lost to the field, against the same volume without it:\n")
        print(field_costs(rows, methods, {"volume": lambda r: True}))
    return rows


# --- one run against another ---------------------------------------------------------------------

RESULTS = ("as_read", "matched", "kept", "notes", "seconds")  # a row's fields that are not its case


def result(as_read, matched, kept, notes, seconds):
    return dict(zip(RESULTS, (as_read, matched, kept, list(notes), seconds)))


def write_records(path, rows):
    """The rows, one JSON object a line (--records): what --compare reads."""
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row) + "\n")


def read_records(path):
    with open(path, encoding="utf-8") as lines:
        return [json.loads(line) for line in lines if line.strip()]


def case_of(row):
    """A row's case: everything but its method and results."""
    return {k: v for k, v in row.items() if k not in RESULTS and k != "method"}


def case_key(row):
    """A row's method and case, hashable: what pairs it with its twin in another run."""
    return row["method"], tuple(sorted((k, str(v)) for k, v in case_of(row).items()))


def comparison(before, after, threshold=0.001):
    """Lines comparing two runs of the same draws (rows as --records writes them), one per
    method: the mean and worst accuracy as read, the cases that change by more than threshold
    (how many gain and lose, the largest of each), and the cases where a tissue keeps under
    half its pixels, with and without a note.  A case of one run missing from the other: a
    ValueError (the runs are not of the same draws)."""
    earlier = {case_key(row): row for row in before}
    if len(earlier) != len(before) or {case_key(row) for row in after} != set(earlier):
        raise ValueError("the two runs are not of the same draws (seed, cases, methods)")
    lines = []
    for method in dict.fromkeys(row["method"] for row in after):
        news = [row for row in after if row["method"] == method]
        olds = [earlier[case_key(row)] for row in news]
        old = np.array([row["as_read"] for row in olds])
        new = np.array([row["as_read"] for row in news])
        change = new - old
        gains, losses = int(np.sum(change > threshold)), int(np.sum(change < -threshold))
        (lost_before, silent_before), (lost_after, silent_after) = lost(olds), lost(news)
        lines.append(
            f"{method}: {len(news)} cases, {100 * old.mean():.2f} -> {100 * new.mean():.2f} % "
            f"(worst {100 * old.min():.1f} -> {100 * new.min():.1f}); {gains} gain and "
            f"{losses} lose over {100 * threshold:g} points; a tissue under half its pixels in "
            f"{lost_before} -> {lost_after}, without a note {silent_before} -> {silent_after}"
        )
        for name, count, i in (
            ("gain", gains, np.argmax(change)),
            ("loss", losses, np.argmin(change)),
        ):
            if count:
                lines.append(
                    f"   largest {name}: {100 * change[i]:+.1f} points, {described(news[i])}"
                )
    return lines


def lost(rows):
    """(how many rows have a tissue under half its pixels, how many of those have no note)."""
    under = [row for row in rows if row["kept"] < 0.5]
    return len(under), sum(not row["notes"] for row in under)


def described(row):
    """A row's case in words: "orientation axial, voxel 1, ..."."""
    return ", ".join(f"{k} {v}" for k, v in case_of(row).items())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2, help="1: the cases to choose on")
    parser.add_argument("--cases", type=int, default=150)
    parser.add_argument("--methods", default=None, help="only the methods whose name has this")
    parser.add_argument("--volume", action="store_true", help="the whole volume instead")
    parser.add_argument("--noise", default=",".join(map(str, NOISE)), help="--volume's levels")
    parser.add_argument("--inu", default=",".join(map(str, INU)), help="--volume's field levels")
    parser.add_argument(
        "--references",
        action="store_true",
        help="rows of the best thresholds on each image and on it without its field (slices)",
    )
    parser.add_argument(
        "--field-cost",
        action="store_true",
        help="each method also on each image without its field (the same noise): the field's cost",
    )
    parser.add_argument(
        "--field-basis",
        type=int,
        metavar="N",
        help="N random fields of each shape: how well the program's polynomial field follows them",
    )
    parser.add_argument(
        "--true-field",
        action="store_true",
        help="a row of --brain on each image divided by its true field (slices): the model's part",
    )
    parser.add_argument("--records", metavar="FILE", help="every case's scores, a JSON line each")
    parser.add_argument(
        "--compare", nargs=2, metavar=("BEFORE", "AFTER"), help="two --records of the same draws"
    )
    arguments = parser.parse_args()
    if arguments.field_basis:
        for inu in (40, 80):
            print(field_basis_table(Template().brain, inu, arguments.field_basis, arguments.seed))
            print()
        return
    if arguments.compare:
        try:
            print("\n".join(comparison(*(read_records(path) for path in arguments.compare))))
        except (OSError, ValueError, KeyError) as error:  # a missing, other or broken file
            parser.error(f"--compare: {error}")
        return
    methods = [m for m in METHODS if not arguments.methods or arguments.methods in m]
    methods = available(methods)
    data = Template()
    if arguments.volume:
        rows = evaluate_volumes(arguments, methods, data)
        if arguments.records:
            write_records(arguments.records, rows)
        return
    references = list(REFERENCES) if arguments.references else []
    rng = np.random.default_rng(arguments.seed)
    cases = [draw_case(rng, data) for _ in range(arguments.cases)]
    twins = [f"{method}{NO_FIELD}" for method in methods] if arguments.field_cost else []
    oracle = [TRUE_FIELD] if arguments.true_field and "--brain" in methods else []
    rows, started = [], time.perf_counter()
    for number, case in enumerate(cases):
        image, truth, *field = make_case(case, data, with_field=bool(oracle))
        first = len(rows)  # the case's rows from here
        for method in methods:
            rows.append(dict(case, method=method, **run_method(method, image, truth)))
        if twins:
            without = make_case(dict(case, inu=0), data) if case["inu"] else None
            rows += twin_rows(case, methods, rows[-len(methods) :], without)
        for name in references:
            labels = REFERENCES[name](case, image, truth, data)
            rows.append(dict(case, method=name, **result(*scores(labels, truth), [], 0.0)))
        if oracle:
            rows.append(true_field_row(case, image, truth, field[0], rows[first:]))
        print(
            f"case {number + 1}/{len(cases)} {time.perf_counter() - started:.0f} s: "
            + " ".join(f"{r['method']} {100 * r['as_read']:.1f}" for r in rows[first:]),
            file=sys.stderr,
            flush=True,
        )
    if arguments.records:
        write_records(arguments.records, rows)
    print(f"\n{len(cases)} cases of seed {arguments.seed}; mean (worst) % as read\n")
    columns = methods + twins + references + oracle
    print(headline(rows, columns) + "\n")
    one_mm = [r for r in rows if r["voxel"] == 1]
    print("1 mm slices, by noise:\n" + summary(one_mm, columns, "noise", NOISE) + "\n")
    print("1 mm slices, by field (INU %):\n" + summary(one_mm, columns, "inu", INU) + "\n")
    print("by voxel size:\n" + summary(rows, columns, "voxel", VOXELS) + "\n")
    print("by orientation:\n" + summary(rows, columns, "orientation", list(ORIENTATIONS)) + "\n")
    print("by field shape:\n" + summary(rows, columns, "shape", SHAPES) + "\n")
    if twins:
        print("points lost to the field, against the same image without it:\n")
        print(field_costs(rows, methods) + "\n")
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        swapped = sum(r["matched"] - r["as_read"] > 0.01 for r in mine)
        lost = [r for r in mine if r["kept"] < 0.5]
        silent = [r for r in lost if not r["notes"]]
        print(
            f"{method}: all {100 * np.mean([r['as_read'] for r in mine]):.1f} % "
            f"(worst {100 * min(r['as_read'] for r in mine):.1f}); labels not as documented in "
            f"{swapped}; a tissue under half its pixels in {len(lost)}, "
            f"{len(silent)} without a note"
        )
        for r in silent[:5]:
            print(f"   silent: {r}")


if __name__ == "__main__":
    main()

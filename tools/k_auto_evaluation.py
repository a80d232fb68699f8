"""-k auto against the number of classes a person would count: python tools/k_auto_evaluation.py

Not collected by pytest.  Synthetic 1 MP images of 2 to 6 classes (Voronoi regions), gray or
colour, each drawn from a seed: boundaries blurred by 1 to 2 px and noise, plus either
nothing more ("blur"), a multiplicative shading of 5 to 10 % across the image ("shading"), or
the class nearest 0 or 255 pushed there under strong noise, clipped ("clip"; the classes
still spaced, the noise at most a quarter of their spacing, so that a per-pixel model can
tell them apart at all).
Seeds 1-16 are the set the criterion's settings (REGION_SHARE_MIN, K_PROBE_MAX_ITER) were
chosen on; seeds 101-130 played no part in it, nor seeds 171-290 (each forty held out
after a change, docs/method.md).  For each image: the K of every criterion,
the time of -k auto --k-max 8 and of one fit at the chosen K (both as the command line runs
them: n_init 2 for auto, 1 for a given K).  Then scikit-image's photos (chelsea, coffee,
astronaut, moon) at --k-max 8 and 10.

    python tools/k_auto_evaluation.py [--seeds 1-16] [--criteria classes,bic,icl] [--no-photos]
                                      [--repeat 3: each time the least of three runs]
"""

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ImageSegmentation as seg  # noqa: E402

KINDS = ("blur", "shading", "clip")


def regions(rng, n, shape):
    """Voronoi cells of 3n random seeds, each of a class, every class present."""
    h, w = shape
    seeds = rng.uniform([0, 0], [h, w], size=(3 * n, 2))
    classes = np.concatenate([np.arange(n), rng.integers(0, n, 2 * n)])
    rng.shuffle(classes)
    rows, cols = np.mgrid[:h, :w]
    _, nearest = cKDTree(seeds).query(np.stack([rows.ravel(), cols.ravel()], 1))
    return classes[nearest].reshape(h, w)


def spaced_means(rng, n, dim, gap, pushed=None):
    """n means in 0.08..0.92 (per channel), every two at least gap apart; pushed: (end, value)
    moves the class nearest that end (0 or 1) to value in every channel, spacing kept."""
    while True:
        means = rng.uniform(0.08, 0.92, size=(n, dim))
        if pushed is not None:
            end, value = pushed
            sums = means.sum(axis=1)
            means[np.argmax(sums) if end else np.argmin(sums)] = value
        distances = np.linalg.norm(means[:, None] - means[None], axis=2) + 9 * np.eye(n)
        if distances.min() >= gap:
            return means


def make_case(seed, shape=(1000, 1000)):
    """(image, its number of classes, a description), all drawn from the seed."""
    rng = np.random.default_rng(seed)
    n, colour = int(rng.integers(2, 7)), bool(rng.integers(0, 2))
    kind = KINDS[int(rng.integers(0, 3))]
    dim = 3 if colour else 1
    labels = regions(rng, n, shape)
    gap = 0.25 if colour else 0.8 / n
    end = int(rng.integers(0, 2))
    pushed = (end, 0.97 if end else 0.03) if kind == "clip" else None
    means = spaced_means(rng, n, dim, gap, pushed)
    sd, blur = rng.uniform(0.015, 0.035), rng.uniform(1.0, 2.0)
    if kind == "clip":  # classes 4 sd apart at least: a per-pixel model can count them at all
        sd = min(rng.uniform(0.05, 0.08), gap / 4)
    image = means[labels]
    image = np.stack([ndimage.gaussian_filter(image[..., c], blur) for c in range(dim)], -1)
    if kind == "shading":
        amplitude, angle = rng.uniform(0.05, 0.10), rng.uniform(0, 2 * np.pi)
        rows, cols = np.mgrid[: shape[0], : shape[1]]
        ramp = np.cos(angle) * rows / shape[0] + np.sin(angle) * cols / shape[1]
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
        image = image * (1 - amplitude / 2 + amplitude * ramp)[..., None]
    image = np.clip(np.rint((image + rng.normal(0, sd, image.shape)) * 255), 0, 255)
    image = image.astype(np.uint8)
    name = f"{n} classes, {'colour' if colour else 'gray'}, {kind}, sd {sd:.3f}, blur {blur:.1f}"
    return (image if colour else image[..., 0]), n, name


def timed(run, repeat):
    """(run()'s result, the least of repeat runs' seconds): one run's time moves by a fifth or
    more on a shared machine."""
    seconds = math.inf
    for _ in range(repeat):
        started = time.perf_counter()
        result = run()
        seconds = min(seconds, time.perf_counter() - started)
    return result, seconds


def chosen_k(image, criterion, k_max=8, shares=None, repeat=1):
    """(K chosen, seconds: the least of repeat runs, the image's points); shares: a list to add
    each K's least region share to, as (K, share, counted)."""
    picture = seg.picture_from_array(image)
    points = seg.distinct_values(picture)
    result, seconds = timed(
        lambda: seg.segment_points(
            picture, points, "auto", k_max=k_max, n_init=2, criterion=criterion
        ),
        repeat,
    )
    if shares is not None:
        shares += [(row["k"], row["region_share"]) for row in result.k_search.rows]
    return result.model.n_components, seconds, points


def single_fit_seconds(image, points, k, repeat=1):
    """The least of repeat runs' seconds of one fit at K, as the command line fits it."""
    picture = seg.picture_from_array(image)
    return timed(lambda: seg.segment_points(picture, points, k), repeat)[1]


def seed_range(text):
    first, _, last = text.partition("-")
    return range(int(first), int(last or first) + 1)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=seed_range, action="append")
    parser.add_argument("--criteria", default="classes,bic,icl")
    parser.add_argument("--no-photos", action="store_true")
    parser.add_argument("--shares", action="store_true", help="print every K's region share")
    parser.add_argument(
        "--repeat", type=int, default=1, help="time each run this many times, keep the least"
    )
    args = parser.parse_args()
    criteria = args.criteria.split(",")
    seeds = [s for r in args.seeds or [seed_range("1-16"), seed_range("101-130")] for s in r]
    print("| seed | image | truth | " + " | ".join(criteria) + " | auto s | one fit s | ratio |")
    print("|---" * (6 + len(criteria)) + "|")
    right = dict.fromkeys(criteria, 0)
    for seed in seeds:
        image, truth, name = make_case(seed)
        found, seconds, shares = {}, {}, []
        for criterion in criteria:
            kept = shares if criterion == "classes" else None
            found[criterion], seconds[criterion], points = chosen_k(
                image, criterion, shares=kept, repeat=args.repeat
            )
            right[criterion] += found[criterion] == truth
        first = criteria[0]
        one = single_fit_seconds(image, points, found[first], args.repeat)
        marks = " | ".join(f"{found[c]}" + ("" if found[c] == truth else " ✗") for c in criteria)
        print(
            f"| {seed} | {name} | {truth} | {marks} | {seconds[first]:.2f} | {one:.2f} "
            f"| {seconds[first] / one:.1f}x |",
            flush=True,
        )
        if args.shares:  # the least region share of each K tried: the truth's and above it
            print(
                "  shares:", " ".join(f"{k}:{s if s is None else round(s, 2)}" for k, s in shares)
            )
    print()
    print(", ".join(f"{c}: {right[c]} of {len(seeds)} right" for c in criteria))
    if args.no_photos:
        return
    from skimage import data

    print("\n| photo | k_max | " + " | ".join(criteria) + " | auto s |")
    print("|---" * (3 + len(criteria)) + "|")
    for name in ("chelsea", "coffee", "astronaut", "moon"):
        image = getattr(data, name)()
        for k_max in (8, 10):
            found = {c: chosen_k(image, c, k_max) for c in criteria}
            ks = " | ".join(str(found[c][0]) for c in criteria)
            print(f"| {name} | {k_max} | {ks} | {found[criteria[0]][1]:.2f} |", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Segment images with a Gaussian mixture fitted by Expectation-Maximization.

    python ImageSegmentation.py [IMAGE_OR_FOLDER ...] [options]

Each image's pixel intensities (gray) or RGB vectors (colour) are modelled as a
mixture of K Gaussians, fitted by a hand-written EM loop; every pixel is then
recoloured by its most likely component, and the log-likelihood of every
iteration is plotted.

The file reads top to bottom in the order the data flows:

    1. settings                  -> the command line's defaults; Passes (bands, threads)
    2. reading an image          -> integer codes, one per pixel (and a mask); a NIfTI file or
                                    a TIFF stack: one per voxel of a volume
    3. distinct values           -> the points EM sees, with their counts as weights
    4. the EM driver             -> run_em, the one loop every model uses: Newton's steps,
                                    SQUAREM's or the map's, a stopping rule at the maximum
    5. the Gaussian mixture      -> the E-step (_e_step_statistics) and M-step (_m_step) on
                                    weighted points
       (partial volume)          -> tissues and mixels: PartialVolume, the constrained M-step
       5b. quantized gray levels -> binned, clipped pixels: E-step _quantized_pass
    6. labels                    -> components numbered by luminance, pixels by lookup
       6a. choosing K            -> -k auto: BIC among fits whose every component is a class
                                    (select_components, region_shares), from split starts
       6b. a spatial prior       -> a Potts prior, mean-field EM: E-step the sweep (_sweep,
                                    _partial_sweep), PointsMeanField.step; the grid whose
                                    neighbours they sum: an image's Plane, or a volume stacked
                                    as one image (Stack) for 6 neighbours
       6c. a bias field          -> MRI's smooth field with the mixture: E-step _bias_pass,
                                    _bias_step; with the prior, BiasMeanField.step
       6d. putting it together   -> SegmentOptions; segment_points, segment_image,
                                    segment_volume
    7. outputs and plots         -> PNG (a volume's NIfTI or TIFF), JSON and figures, per
                                    image all or nothing
    8. the command line          -> RunConfig; parse, dispatch, report; workers and signals

Every model is a state and a step (see "The EM driver" in section 4): step(state) is one
E-step and one M-step, state.objective the value the driver watches.

Why distinct values: an 8-bit gray image has at most 256 of them, a photo a few
hundred thousand colours among millions of pixels.  EM on the distinct values,
each weighted by how many pixels carry it, has exactly the same likelihood and
the same updates as EM on every pixel, at a cost per iteration set by the
number of distinct values instead of the number of pixels.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cache, cached_property, partial
from pathlib import Path
from typing import Protocol

BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def _stopped_line(signum):
    """The line a run stopped by Ctrl-C (SIGINT) or SIGTERM ends with (its status: 128 + signum)."""
    return "error: interrupted" if signum == signal.SIGINT else "error: terminated"


if __name__ == "__main__":
    # As a command, BLAS runs on one thread (set before NumPy loads it): the program's own
    # threads and worker processes use the cores.  BLAS's threads would change results in their
    # last digits with the machine's core count, and fight a batch's workers for the cores.
    os.environ.update(dict.fromkeys(BLAS_THREAD_VARIABLES, "1"))

    def _stopped_while_starting(signum, frame):
        """Ctrl-C or SIGTERM while the modules load: one line, as later (main takes over)."""
        sys.stderr.write(_stopped_line(signum) + "\n")
        os._exit(128 + signum)

    for _signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(_signum, _stopped_while_starting)

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

__version__ = "1.1.0"
__all__ = [
    # the mixture
    "FitOptions",
    "Passes",
    "GaussianMixtureFit",
    "Density",
    "DENSITY",
    "Binned",
    "PartialVolume",
    "EMRun",
    "FitFailed",
    "fit_gmm",
    "fit_quantized_gmm",
    "bic",
    # images
    "ImageError",
    "read_image",
    "picture_from_array",
    "distinct_values",
    "pool_points",
    "fit_points",
    "SegmentOptions",
    "SpatialSettings",
    "segment_points",
    "segment_image",
    "segment_volume",
    "picture_from_volume",
    "Segmentation",
    "SpatialFit",
    "SharedModel",
    "KSearch",
    "Progress",
    # the command line
    "main",
    "COVARIANCE_TYPES",
    "INIT_METHODS",
    "ACCELERATIONS",
    "OUTPUT_SUFFIXES",
    "OPTIONAL_SUFFIXES",
]

# ----------------------------------------------------------------------------
# 1. Settings
# ----------------------------------------------------------------------------

DEFAULT_COMPONENTS = {"gray": 3, "color": 5}  # K when none is asked for (3: the original script's)
AUTO_N_INIT = 2  # starts per K with -k auto, where one start that merges two classes misleads
MAX_PIXELS = 200_000_000  # refuse larger images (decompression bombs)
# --brain: skull-stripped T1-weighted scans, labels 1, 2, 3 = CSF, grey, white matter (measured on
# the ICBM 2009a template's slices: docs/brain.md).  Options given after --brain override it.
BRAIN_PRESET = (
    ("mask", "nonzero"),
    ("components", 3),
    ("covariance", "tied"),
    ("variance_prior", "auto"),
    ("partial_volume", True),
    ("cortex_check", True),
    ("spatial", 0.5),
    ("bias_field", True),
    ("bias_reg", 1.0),
    ("bias_start", "auto"),
)
COVARIANCE_TYPES = ("full", "diag", "spherical", "tied")
INIT_METHODS = ("kmeans++", "random")
ACCELERATIONS = ("squarem", "none")
MODES = ("auto", "gray", "color")
SAMPLE_FOLDER = Path(__file__).resolve().parent / "images"


@dataclass(frozen=True)
class Passes:
    """How a pass over every pixel runs: in row bands of about band_bytes of K float32 a pixel
    (its temporaries stay in cache), on `threads` threads (NumPy lets go of the GIL in its
    loops), the results taken in band order, so every sum is the same with any number of
    threads.  A worker process of a batch runs its passes on one thread.  A fit opens its
    threads once (opened) rather than for every pass."""

    threads: int = os.cpu_count() or 1
    band_bytes: int = 1 << 20
    executor: object = field(default=None, compare=False, repr=False)

    def __post_init__(self):
        if not (_is_integer(self.threads) and self.threads >= 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        if not (_is_integer(self.band_bytes) and self.band_bytes >= 1):
            raise ValueError(f"band_bytes must be an integer >= 1, got {self.band_bytes!r}")

    def bands(self, height, width, n_components):
        """(top, bottom) of the row bands of a (K, height, width) pass, every top even."""
        rows = max(2, self.band_bytes // (4 * n_components * max(width, 1)))
        rows += rows % 2
        return [(top, min(top + rows, height)) for top in range(0, height, rows)]

    @contextmanager
    def opened(self):
        """These passes with their threads started, for the length of a with block."""
        if self.threads <= 1 or self.executor is not None:
            yield self
            return
        with ThreadPoolExecutor(self.threads, thread_name_prefix="bands") as pool:
            yield replace(self, executor=pool)

    def map(self, function, items):
        """function(item) for every item, yielded in order; a sum taken as they come holds only
        the results not yet added."""
        if self.threads <= 1 or len(items) <= 1:
            return map(function, items)
        if self.executor is not None:
            return self.executor.map(function, items)
        return self._in_threads(function, items)

    def _in_threads(self, function, items):
        with self.opened() as passes:
            yield from passes.executor.map(function, items)

    def run(self, function, items):
        """map for a function that writes its part and returns nothing."""
        for _ in self.map(function, items):
            pass


def _is_integer(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


@dataclass(frozen=True)
class Domain:
    """The values a setting takes, for the API's check (FitOptions, SegmentOptions) and the
    command line's parsing (OPTIONS) alike: a finite number of kind (int or float) at least
    minimum, or one of choices; also None (the default chosen later) or "auto" where allowed.
    A dataclass field carries its Domain in its metadata (setting())."""

    kind: type | None = None
    minimum: float = 0
    choices: tuple = ()
    none: bool = False
    auto: bool = False

    def __contains__(self, value):
        if value is None or isinstance(value, str) and value == "auto":
            return value is None and self.none or value == "auto" and self.auto
        if self.choices:
            return isinstance(value, str) and value in self.choices
        is_kind = _is_integer(value) if self.kind is int else _is_real(value)
        return is_kind and math.isfinite(value) and value >= self.minimum

    def describe(self):
        if self.choices:
            what = f"one of {', '.join(self.choices)}"
        else:
            kind = "an integer" if self.kind is int else "a finite number"
            what = f"{kind} >= {self.minimum:g}"
        return what + " or None" * self.none + ", or auto" * self.auto

    def check(self, name, value):
        """ValueError naming the setting, what it takes and what it got, unless value is in."""
        if value not in self:
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")

    def parse(self):
        """How argparse reads it: choices=, or type= a parser of the number (and auto)."""
        if self.choices:
            return {"choices": self.choices + ("auto",) * self.auto}
        parse = _number_at_least(self.kind, self.minimum)
        if self.auto:
            parse = _auto_or(parse, f"a number >= {self.minimum:g}")
        return {"type": parse}


def setting(default, domain):
    """A dataclass field with its Domain, checked by check_settings."""
    return field(default=default, metadata={"domain": domain})


def check_settings(settings):
    """ValueError for the first field of a settings dataclass outside its Domain."""
    for item in fields(settings):
        domain = item.metadata.get("domain")
        if domain is not None:
            domain.check(item.name, getattr(settings, item.name))


# ----------------------------------------------------------------------------
# 2. Reading an image
# ----------------------------------------------------------------------------
# The reader turns any image into integer codes, one per pixel, with the smallest
# memory footprint: 8/16-bit gray levels as they are, RGB as R | G << 8 | B << 16
# in one uint32 (read straight from Pillow's 4-byte pixels, no H x W x 3 copy),
# anything else (32-bit integer, float) as an index into a table of its values.

PIXEL_CHUNK = 1 << 22  # pixels per block when counting and labelling


class ImageError(Exception):
    """Something is wrong with one input image; the batch goes on without it."""


def shown(path):
    """A file name as one printable line: non-UTF-8 bytes as \\xNN, control characters escaped."""
    text = os.fsencode(str(path)).decode("utf-8", "backslashreplace")
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text
    )


@dataclass(frozen=True, eq=False)
class Volume:
    """What a 3-D picture carries besides its voxels: the spacing of its three axes (those of
    the codes), and the file it came from, so that the outputs are of the same kind: a NIfTI's
    affine and header (nifti2: its version), or a TIFF stack.  A NIfTI's voxels are stored
    first axis fastest, so its codes are its array transposed (file_axes_reversed): C order
    without a copy, the last file axis (axial slices, as a rule) first."""

    spacing: tuple = (1.0, 1.0, 1.0)
    format: str | None = None  # "nifti", "tiff", or None (an array)
    affine: np.ndarray | None = None
    header: object = None
    nifti2: bool = False
    file_axes_reversed: bool = False

    def in_file_order(self, values):
        """Per-axis values (of the codes' axes) in the order of the file's axes."""
        values = list(values)
        return values[::-1] if self.file_axes_reversed else values


@dataclass
class Picture:
    codes: np.ndarray  # (H, W) integer code of every pixel; (D, H, W) of a volume's voxels
    kind: str  # "gray": code = level; "rgb": packed; "table": index into `table`
    n_codes: int  # every code is below this (size of a lookup table)
    scale: float  # level / scale = intensity on the 0..1 scale
    table: np.ndarray | None = None  # "table": (M,) or (M, 3) values of each code, already 0..1
    notes: list = field(default_factory=list)
    mask: np.ndarray | None = None  # (H, W) bool: the pixels to segment; None: every pixel
    volume: Volume | None = None  # a 3-D picture's spacing and source

    @property
    def spacing(self):
        """A volume's spacing of its axes (those of the codes); None for an image."""
        return None if self.volume is None else self.volume.spacing

    @property
    def height(self):
        return self.codes.shape[-2]

    @property
    def width(self):
        return self.codes.shape[-1]

    @property
    def size_text(self):
        """W x H, or a volume's shape in its file's axes' order."""
        shape = self.codes.shape
        return "x".join(map(str, self.volume.in_file_order(shape) if self.volume else shape[::-1]))

    @property
    def bits(self):
        """Bits per channel of the recoloured output: 8 unless the source had more."""
        return 8 if self.kind == "rgb" or self.scale == 255 else 16


def nonzero_mask(picture):
    """(H, W) bool: the pixels not 0 in every channel (the convention of skull-stripped scans)."""
    if picture.kind == "table":
        table = picture.table.reshape(len(picture.table), -1)
        return lookup_codes(picture, np.any(table != 0, axis=1), Passes(threads=1))
    return picture.codes != 0


def _is_nonzero(mask):
    return isinstance(mask, str) and mask == "nonzero"


def with_mask(picture, mask):
    """The picture, to be segmented inside mask only (nonzero = inside); ValueError if it can't."""
    mask, ndim = np.asarray(mask), picture.codes.ndim
    if mask.shape[:ndim] != picture.codes.shape or mask.ndim > ndim + 1:
        if picture.volume is not None:
            raise ValueError(
                f"the mask is {'x'.join(map(str, mask.shape))} voxels, "
                f"the volume {picture.size_text}"
            )
        raise ValueError(
            f"the mask is {mask.shape[1] if mask.ndim > 1 else 1}x{mask.shape[0]} pixels, "
            f"the image {picture.width}x{picture.height}"
        )
    inside = mask if mask.ndim == ndim else np.any(mask != 0, axis=ndim)
    inside = inside != 0
    if not inside.any():
        raise ValueError("the mask has no inside pixel")
    return replace(picture, mask=inside)


def border_is_zero(picture, axes=None):
    """Whether every pixel on the image's border is 0 in every channel (and some pixel is not).
    axes: the axes whose two ends are the border (default all; a volume's slices: (1, 2))."""
    return bool(np.all(_zero_border(picture, axes))) and bool(nonzero_mask(picture).any())


def zero_border_share(picture, axes=None):
    """The share of the pixels on the image's border (border_is_zero's axes) that are 0."""
    return float(np.mean(_zero_border(picture, axes)))


def _zero_border(picture, axes):
    """(n,) bool: each pixel of the border (of the two ends of every axis in axes) is 0."""
    codes = picture.codes
    axes = range(codes.ndim) if axes is None else [axis % codes.ndim for axis in axes]
    ends = [(slice(None),) * axis + (end,) for axis in axes for end in (0, -1)]
    border = np.concatenate([codes[end].reshape(-1) for end in ends])  # views: no strided take
    if picture.kind != "table":
        return border == 0
    return ~np.any(picture.table.reshape(len(picture.table), -1)[border] != 0, axis=1)


def pack_rgb(rgb):
    """(..., 3) uint8 -> (...) uint32 codes R | G << 8 | B << 16."""
    rgb = np.asarray(rgb, dtype=np.uint32)
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)


def unpack_rgb(codes):
    """uint32 codes -> (..., 3) uint8 channels."""
    codes = np.asarray(codes, dtype=np.uint32)
    return np.stack([codes & 255, (codes >> 8) & 255, codes >> 16], axis=-1).astype(np.uint8)


def lookup_codes(picture, lut, passes):
    """lut[codes] for every pixel (H, W), block by block: no int64 copy of the codes is made."""
    codes = picture.codes.reshape(-1)
    out = np.empty(codes.size, dtype=lut.dtype)

    block = PIXEL_CHUNK // 4  # take's index copy (intp) of a block, a thread: 8 MB

    def look_up(start):
        np.take(lut, codes[start : start + block], out=out[start : start + block])

    passes.run(look_up, range(0, codes.size, block))
    return out.reshape(picture.codes.shape)


def _table_picture(values, scale_by_range, ndim=2):
    """Codes for values that are not small integers: an index into the sorted distinct values.
    ndim: the axes of the pixels (3 for a volume); any further axis is the channels."""
    values = np.asarray(values, dtype=np.float64)
    notes = []
    if not np.isfinite(values).all():
        finite = values[np.isfinite(values)]
        bad = int(np.size(values) - finite.size)
        if finite.size:
            low, high = finite.min(), finite.max()
            notes.append(
                f"{bad} NaN or infinite values: NaN and -inf taken as the lowest value, "
                f"+inf as the highest"
            )
        else:
            low, high = 0.0, 1.0
            notes.append("no finite value: NaN and -inf taken as 0, +inf as 1")
        values = np.nan_to_num(values, nan=low, neginf=low, posinf=high)
    if scale_by_range:
        low, high = values.min(), values.max()
        if high / 2 - low / 2 > np.finfo(np.float64).max / 2:  # near float64's limits: halved
            values, low, high = values / 2, low / 2, high / 2
        values = (values - low) / (high - low) if high > low else np.zeros_like(values)
    shape = values.shape[:ndim]
    flat = values.reshape(math.prod(shape), -1)
    table, inverse = np.unique(
        flat if flat.shape[1] > 1 else flat[:, 0], axis=0, return_inverse=True
    )
    return Picture(
        codes=inverse.reshape(shape),
        kind="table",
        n_codes=len(table),
        scale=1.0,
        table=table,
        notes=notes,
    )


def picture_from_array(array):
    """An in-memory image (H x W gray, H x W x 3|4 colour) as a Picture.

    uint8 and uint16 arrays are divided by their type's maximum (255, 65535); every other
    array (float, signed, wider integers) is used on its own scale, as given.
    """
    array = np.asarray(array)
    if (
        array.ndim not in (2, 3)
        or array.size == 0
        or (array.ndim == 3 and array.shape[2] not in (1, 3, 4))
    ):
        raise ValueError(f"expected an H x W or H x W x 3|4 image, got shape {array.shape}")
    if array.ndim == 3:
        array = array[..., 0] if array.shape[2] == 1 else array[..., :3]  # alpha dropped
    return _coded(array, ndim=2, scale_by_range=False)


def _coded(array, ndim, scale_by_range, volume=None):
    """The Picture of pixel values with ndim axes (a further axis of 3: colour): 8- and 16-bit
    gray levels as they are, 8-bit RGB packed, booleans as 0 and 255, anything else a table."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype in (np.uint8, np.uint16) and array.ndim == ndim:
        top = np.iinfo(array.dtype).max
        return Picture(array, "gray", top + 1, float(top), volume=volume)
    if array.dtype == np.uint8:
        return Picture(pack_rgb(array), "rgb", 1 << 24, 255.0, volume=volume)
    return replace(_table_picture(array, scale_by_range, ndim), volume=volume)


def picture_from_volume(array, spacing=(1.0, 1.0, 1.0)):
    """An in-memory volume (D x H x W gray, D x H x W x 3 colour) as a Picture, with the
    spacing of its three axes; values as picture_from_array takes them."""
    array = np.asarray(array)
    if array.ndim not in (3, 4) or array.size == 0 or (array.ndim == 4 and array.shape[3] != 3):
        raise ValueError(f"expected a D x H x W or D x H x W x 3 volume, got shape {array.shape}")
    spacing = tuple(float(step) for step in np.broadcast_to(spacing, 3))
    why = spacing_problem(spacing)
    if why:
        raise ValueError(f"the spacing {_steps_text(spacing)} {why}")
    return _coded(array, ndim=3, scale_by_range=False, volume=Volume(spacing))


NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path):
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _optional(module, purpose):
    """An optional package, imported when a feature needs it; ImageError naming the install
    command when it is missing."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImageError(f"{purpose} needs {module}: pip install {module}") from None


def _read_nifti(path, max_pixels):
    """A NIfTI-1 or -2 volume (.nii, .nii.gz) through nibabel, with its spacing, affine and
    header; its values scaled as the header says.  4-D series are refused, not guessed at."""
    nibabel = _optional("nibabel", "reading NIfTI")
    with _log_lines("nibabel.global") as fixes:
        data, image = _nifti_data(nibabel, path, max_pixels)
    if data.dtype.fields is not None or data.dtype.kind == "c":
        raise ImageError(f"NIfTI of {data.dtype} values: gray volumes only")
    notes = [f"the NIfTI header: {shown(line)}" for line in dict.fromkeys(fixes)]
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    zooms = zooms + (1.0,) * (3 - len(zooms))
    spacing, why = zooms, spacing_problem(zooms)
    if why:
        spacing = (1.0, 1.0, 1.0)
        notes.append(f"the header's voxel size {_steps_text(zooms)} {why}: taken as 1 x 1 x 1")
    affine = np.asarray(image.affine, dtype=np.float64)
    if not (np.isfinite(affine).all() and abs(np.linalg.det(affine[:3, :3])) > 0):
        affine = np.diag(spacing + (1.0,))
        notes.append(
            "the header's affine is not finite and invertible: the outputs carry the voxel "
            "size alone (no position or orientation)"
        )
    volume = Volume(
        spacing[::-1],
        "nifti",
        affine,
        image.header,
        isinstance(image, nibabel.Nifti2Image),
        file_axes_reversed=True,
    )
    data = np.ascontiguousarray(data.T)  # a view: nibabel's array is in the file's order
    picture = _coded(data, ndim=3, scale_by_range=True, volume=volume)
    picture.notes[:0] = notes
    return picture


def _nifti_data(nibabel, path, max_pixels):
    """(voxels in the file's axis order, nibabel's image), the voxel limit checked on the header
    before any array is made; ImageError for what nibabel cannot read."""
    try:
        image = nibabel.load(path)
        shape = tuple(int(n) for n in image.shape)
        while len(shape) > 3 and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) > 3:
            raise ImageError(
                f"a {len(shape)}-D NIfTI ({'x'.join(map(str, shape))}), a series of volumes: "
                f"this program segments one 3-D volume a file"
            )
        shape = shape + (1,) * (3 - len(shape))
        _check_pixel_limit(shape, max_pixels, "voxels")
        if math.prod(shape) == 0:
            raise ImageError("volume has no voxels")
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what a header's scaling overflows to is checked
            data = np.asarray(image.dataobj).reshape(shape)
    except ImageError:
        raise
    except MemoryError:
        raise
    except Exception as error:  # nibabel's own errors, zlib's, gzip's, a short file's
        first = str(error).strip().split("\n", 1)[0]  # nibabel adds hints on further lines
        raise ImageError(f"truncated or corrupt NIfTI ({shown(first)})") from None
    return data, image


@contextmanager
def _log_lines(name):
    """The lines a library logs (nibabel: fixes to a header) collected instead of printed bare
    on stderr: the program says them as its own notes."""

    class Collect(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    lines, logger = [], logging.getLogger(name)
    saved = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [Collect()], False
    try:
        yield lines
    finally:
        logger.handlers, logger.propagate = saved


MAX_SPACING_RATIO = 1000.0  # a voxel's longest side over its shortest: MRI's are within 20


def spacing_problem(steps):
    """Why a voxel size cannot be used (None: it can): each step finite and positive, the
    largest at most MAX_SPACING_RATIO times the smallest."""
    steps = np.asarray(steps, dtype=np.float64)
    if not (np.isfinite(steps).all() and (steps > 0).all()):
        return "is not three finite positive numbers"
    if steps.max() > MAX_SPACING_RATIO * steps.min():
        return f"has a side over {MAX_SPACING_RATIO:g} times another"
    return None


def _steps_text(steps):
    return " x ".join(f"{step:g}" for step in steps)


def _read_tiff_stack(img, max_pixels):
    """The pages of a multi-page TIFF as one volume (pages first), when they are all of one
    size and mode; the voxel limit checked before any page is decoded.  Pages that differ (a
    thumbnail, a pyramid, a scanner's preview) make no volume: the largest page (the first of
    the largest) is the image, with a note."""
    pages = []
    for page in range(img.n_frames):
        img.seek(page)
        pages.append((img.size, img.mode))
    (width, height), mode = pages[0]
    if any(page != pages[0] for page in pages):
        largest = max(range(len(pages)), key=lambda i: (math.prod(pages[i][0]), -i))
        (width, height), mode = pages[largest]
        _check_pixel_limit((width, height), max_pixels, "pixels")
        img.seek(largest)
        img.load()
        picture = _picture_from_pil(img)
        picture.notes.append(
            f"{len(pages)} pages of different sizes or modes, no volume: segmenting page "
            f"{largest + 1} ({width}x{height} {mode}), the largest"
        )
        return picture
    _check_pixel_limit((len(pages), height, width), max_pixels, "voxels")
    slices = []
    for page in range(len(pages)):
        img.seek(page)
        img.load()
        slices.append(np.asarray(img) if mode in ("I", "F") else _picture_from_pil(img))
    volume = Volume(format="tiff")
    if mode in ("I", "F"):
        return replace(_table_picture(np.stack(slices), True, ndim=3), volume=volume)
    first = slices[0]
    codes = np.stack([page.codes for page in slices])
    return Picture(codes, first.kind, first.n_codes, first.scale, volume=volume)


def read_image(path, max_pixels=MAX_PIXELS, checked_while_decoded=PIXEL_CHUNK):
    """Decode an image file into a Picture, refusing anything we cannot trust.

    The pixel limit is checked on the header, before any pixel memory is allocated.
    EXIF orientation is applied; alpha is dropped; multi-frame files give their first frame,
    but a multi-page TIFF is a volume, as is a NIfTI file (section 2's Volume).  A PNG's data
    are checked whole (_check_png_data): from checked_while_decoded pixels on a thread while
    Pillow decodes them, below that after.
    """
    path = Path(path)
    try:
        _check_regular_file(path)
        if is_nifti(path):
            return _read_nifti(path, max_pixels)
        with _pillow_without_pixel_limit(), Image.open(path) as img:
            width, height = img.size
            if width * height == 0:
                raise ImageError("image has no pixels")
            frames = getattr(img, "n_frames", 1)
            if frames > 1 and img.format == "TIFF":
                return _read_tiff_stack(img, max_pixels)
            _check_pixel_limit((width, height), max_pixels, "pixels")
            notes = []
            if frames > 1:
                notes.append(f"{frames} frames: segmenting the first")
            if img.mode in ("RGB", "RGBA") and img.tile and "16" in str(img.tile[0].args):
                notes.append(
                    "16 bits a channel read as 8: Pillow reads 48- and 64-bit colour as 8-bit"
                )
            if img.format == "PNG" and width * height >= checked_while_decoded:
                with ThreadPoolExecutor(1) as background:
                    check = background.submit(_check_png_data, path)
                    img.load()
                    check.result()
            else:  # a small image's thread would cost more than it saves, in a batch's workers
                img.load()
                if img.format == "PNG":
                    _check_png_data(path)
            if img.getexif().get(0x0112, 1) != 1:
                img = ImageOps.exif_transpose(img)
            picture = _picture_from_pil(img)
    except ImageError:
        raise
    except PermissionError:
        raise ImageError("permission denied") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image Pillow can read") from None
    except Image.DecompressionBombError as error:
        raise ImageError(str(error)) from None
    except (OSError, SyntaxError, EOFError, ValueError, TypeError, struct.error, zlib.error) as e:
        raise ImageError(f"truncated or corrupt image ({shown(e)})") from None
    picture.notes[:0] = notes
    return picture


def _check_pixel_limit(sizes, max_pixels, unit):
    """ImageError when an image of these sizes (as the message names them: W, H; a volume's
    axes in its file's order) holds more than max_pixels pixels (unit: "pixels" or "voxels")."""
    count = math.prod(sizes)
    if count > max_pixels:
        raise ImageError(
            f"{'x'.join(map(str, sizes))} is {count:,} {unit}, above the limit of "
            f"{max_pixels:,} (raise it with --max-pixels)"
        )


def _check_regular_file(path):
    """Refuse what is no image file before opening it: opening a FIFO would wait for a writer."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ImageError("no such file") from None
    if stat.S_ISDIR(mode):
        raise ImageError("is a folder")
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a character device"
            if stat.S_ISCHR(mode)
            else "a block device"
            if stat.S_ISBLK(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "special"
        )
        raise ImageError(f"not a regular file ({kind})")
    if path.stat().st_size == 0:
        raise ImageError("empty file")


@contextmanager
def _pillow_without_pixel_limit():
    """Pillow's decompression-bomb limit off while we open a file: ours (--max-pixels) is checked
    on the header instead.  Pillow keeps its limit in a module global, the only way it offers."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


PNG_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples a pixel
ADAM7 = (
    (0, 0, 8, 8),
    (4, 0, 8, 8),
    (0, 4, 4, 8),
    (2, 0, 4, 4),
    (0, 2, 2, 4),
    (1, 0, 2, 2),
    (0, 1, 1, 2),
)


def _check_png_data(path):
    """Raise if a PNG's image data inflate to fewer bytes than its header promises.

    Pillow accepts a complete zlib stream that is simply short and fills the missing rows with
    black; this streams the IDAT chunks through zlib again, counting bytes, keeping none.
    """
    inflated, expected, inflater = 0, None, zlib.decompressobj()
    with open(path, "rb") as file:
        file.seek(8)
        while True:
            header = file.read(8)
            if len(header) < 8:
                break
            length, kind = struct.unpack(">I4s", header)
            if kind == b"IHDR":
                width, height, depth, colour, _, _, interlace = struct.unpack(
                    ">IIBBBBB", file.read(13)
                )
                bits = depth * PNG_SAMPLES.get(colour, 1)
                passes = ADAM7 if interlace else [(0, 0, 1, 1)]
                expected = 0
                for x0, y0, dx, dy in passes:
                    columns, rows = -(-(width - x0) // dx), -(-(height - y0) // dy)
                    if columns > 0 and rows > 0:
                        expected += rows * (1 + -(-columns * bits // 8))
                file.seek(length - 13 + 4, os.SEEK_CUR)
            elif kind == b"IDAT":
                inflated += len(inflater.decompress(file.read(length)))
                file.seek(4, os.SEEK_CUR)
            elif kind == b"IEND":
                break
            else:
                file.seek(length + 4, os.SEEK_CUR)
    inflated += len(inflater.flush())
    if expected is not None and inflated < expected:
        raise ImageError(
            f"truncated or corrupt image (its image data end after {inflated:,} of "
            f"{expected:,} bytes)"
        )


def _picture_from_pil(img):
    mode = img.mode
    if mode in ("1", "L", "LA", "La"):
        return Picture(
            codes=np.asarray(img.convert("L") if mode != "L" else img),
            kind="gray",
            n_codes=256,
            scale=255.0,
        )
    if mode.startswith("I;16"):
        return Picture(
            codes=np.asarray(img).astype(np.uint16), kind="gray", n_codes=65536, scale=65535.0
        )
    if mode in ("I", "F"):
        return _table_picture(np.asarray(img), scale_by_range=True)
    if mode == "P" and "transparency" in img.info or mode == "PA":
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")  # P, RGBA, CMYK, YCbCr, LAB, HSV, ...: alpha dropped
    return Picture(codes=_rgb_codes(img), kind="rgb", n_codes=1 << 24, scale=255.0)


def _rgb_codes(img, band_bytes=PIXEL_CHUNK):
    """An RGB image's codes, a band of rows at a time: Pillow's 4-byte pixels (RGBX) are one
    little-endian uint32 with X = 255 on top, masked off.  By bands, no copy of the whole image
    is made beside the codes (a fresh process pays for every page it touches; docs/benchmarks.md
    has the measurements behind this section's choices)."""
    width, height = img.size
    codes = np.empty((height, width), dtype=np.uint32)
    band = max(1, band_bytes // (4 * width))  # 4 MB of pixels: in cache while masked
    for top in range(0, height, band):
        bottom = min(top + band, height)
        raw = img.crop((0, top, width, bottom)).tobytes("raw", "RGBX")
        raw = np.frombuffer(raw, dtype="<u4").reshape(bottom - top, width)
        np.bitwise_and(raw, 0x00FFFFFF, out=codes[top:bottom])
    return codes


# ----------------------------------------------------------------------------
# 3. Distinct values
# ----------------------------------------------------------------------------
# The histogram of codes is all EM needs.  `Points` are the values EM fits (one
# row per distinct value, with its pixel count as weight) and, for every distinct
# code, which point it became, so labels go back to pixels by table lookup.

LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as Pillow's convert("L")


@dataclass
class Points:
    values: np.ndarray  # (M, D) raw values (uint8, uint16 or float): value / scale is on 0..1
    weights: np.ndarray  # (M,) pixel counts, float64
    scale: float
    keys: np.ndarray  # (C,) the distinct codes present in the picture
    point_of_key: np.ndarray  # (C,) index into values of each key's point
    mode: str  # "gray" or "color"


def code_histogram(codes, n_codes, passes, chunk=PIXEL_CHUNK):
    """The distinct codes and their pixel counts.

    np.unique while its copy of the codes and its flags (about 5 bytes a pixel) take less than
    bincount's two tables of every code (16 bytes a code: the running sum and a block's): for
    colour, images below 53 megapixels, where it is also several times faster, in parts of
    chunk pixels merged (_merged_histograms).  Larger:
    bincount in blocks, which holds the tables and nothing that grows with the image.
    """
    flat = codes.reshape(-1)
    if flat.size * 5 >= 16 * n_codes:
        counts = np.zeros(n_codes, dtype=np.int64)
        for start in range(0, flat.size, chunk):
            counts += np.bincount(flat[start : start + chunk], minlength=n_codes)
        keys = np.flatnonzero(counts)
        return keys, counts[keys]
    parts = flat.size // chunk
    if parts <= 1 or _mostly_distinct(flat):
        return np.unique(flat, return_counts=True)
    return _merged_histograms(flat, parts, passes)


def _mostly_distinct(flat, step=64):
    """Whether most of every step-th pixel's codes are distinct (a noisy photo's): then the
    parts' histograms are nearly as long as the parts, and merging them would cost what the
    parts save."""
    sample = np.sort(flat[::step])  # not np.unique, whose first call imports numpy.ma
    return 2 * (1 + np.count_nonzero(sample[1:] != sample[:-1])) > len(sample)


def _merged_histograms(flat, parts, passes):
    """np.unique's keys and counts, of `parts` runs of the pixels on passes' threads, merged:
    the same keys and counts.  Parts of a few million pixels even on one thread: their sorting
    buffers (under glibc's 32 MB mmap threshold) are reused, where a whole large image's are
    fresh pages."""
    bounds = np.linspace(0, flat.size, parts + 1).astype(np.int64)
    histograms = list(
        passes.map(
            lambda part: np.unique(flat[bounds[part] : bounds[part + 1]], return_counts=True),
            range(parts),
        )
    )
    keys, index = np.unique(np.concatenate([keys for keys, _ in histograms]), return_inverse=True)
    counts = np.bincount(index, weights=np.concatenate([n for _, n in histograms]))
    return keys, counts.astype(np.int64)


def _is_gray(picture, keys):
    if picture.kind == "gray":
        return True
    if picture.kind == "rgb":
        return bool(np.all(keys == (keys & 255) * 0x010101))
    return picture.table.ndim == 1 or bool(np.all(picture.table == picture.table[:, :1]))


def distinct_values(picture, mode="auto", passes=Passes()):
    """The weighted points EM fits, in the requested mode ("auto", "gray" or "color").

    With a mask, only the pixels inside count: outside never reaches the model.  passes: the
    threads that count them (the same points with any number).
    """
    codes = picture.codes if picture.mask is None else picture.codes[picture.mask]
    keys, counts = code_histogram(codes, picture.n_codes, passes)
    if mode == "auto":
        mode = "gray" if _is_gray(picture, keys) else "color"
    identity = np.arange(len(keys))

    def points(values, scale, weights=counts, point_of_key=identity):
        return Points(
            values=values,
            weights=np.asarray(weights, dtype=np.float64),
            scale=scale,
            keys=keys,
            point_of_key=point_of_key,
            mode=mode,
        )

    if picture.kind == "gray":
        levels = keys.astype(np.uint8 if picture.n_codes == 256 else np.uint16)[:, None]
        return points(np.repeat(levels, 3 if mode == "color" else 1, axis=1), picture.scale)
    if picture.kind == "table":
        table = picture.table[keys]
        if mode == "color":
            return points(table if table.ndim == 2 else np.repeat(table[:, None], 3, axis=1), 1.0)
        if table.ndim == 1 or np.all(table == table[:, :1]):
            return points(table.reshape(len(keys), -1)[:, :1], 1.0)
        gray, point_of_key = np.unique(table @ LUMA, return_inverse=True)
        return points(gray[:, None], 1.0, np.bincount(point_of_key, weights=counts), point_of_key)
    rgb = unpack_rgb(keys)
    if mode == "color":
        return points(rgb, 255.0)
    # Gray from colour: the BT.601 luma of each colour, rounded to 8 bits, colours merged by level.
    luma = np.rint(rgb @ LUMA).astype(np.int64)
    level_counts = np.bincount(luma, weights=counts, minlength=256)
    levels = np.flatnonzero(level_counts)
    point_of_level = np.zeros(256, dtype=np.int64)
    point_of_level[levels] = np.arange(len(levels))
    return points(
        levels.astype(np.uint8)[:, None], 255.0, level_counts[levels], point_of_level[luma]
    )


def merge_points(values_a, weights_a, values_b, weights_b):
    """The union of two weighted point sets, the weights of equal points added.

    8-bit colour rows are compared as packed 24-bit codes (a 1-D sort), anything else row by row.
    """
    both = np.concatenate([values_a, values_b])
    keys = pack_rgb(both) if both.dtype == np.uint8 and both.shape[1] == 3 else both
    _, first, index = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    return both[first], np.bincount(
        index.reshape(-1), weights=np.concatenate([weights_a, weights_b])
    )


def pool_points(point_sets):
    """Many images' distinct values added up, for one model of a whole batch (--shared).

    point_sets: an iterable of Points, consumed one at a time and merged as it goes, so memory
    holds the union of the distinct values, never all the images.  A batch is colour when any
    image is (gray ones join as R = G = B).  Images that share one scale keep their raw integer
    values (gray levels stay levels, for --quantized); mixed scales are put on 0..1.  Returns
    Points without keys (None for an empty iterable).
    """
    groups = {}
    for points in point_sets:
        groups = merged_groups(groups, point_groups(points))
    return pooled_points(groups)


def point_groups(points):
    """One image's distinct values as pool_points keeps them: {(mode, scale): (raw values,
    weights)}.  merged_groups adds two such sets up, in any order and grouping to the same
    bits (a sorted union, integer counts), which is what lets a cluster reduce them as a tree."""
    return {(points.mode, points.scale): (points.values, points.weights)}


def merged_groups(a, b):
    """Two sets of point groups added up, group by group (keys in a's order, then b's new)."""
    merged = dict(a)
    for key, (values, weights) in b.items():
        merged[key] = (
            merge_points(*merged[key], values, weights) if key in merged else (values, weights)
        )
    return merged


def pooled_points(groups):
    """The Points of merged groups: one scale, colour when any group is (None for none)."""
    if not groups:
        return None
    mode = "color" if any(group_mode == "color" for group_mode, _ in groups) else "gray"
    scales = {scale for _, scale in groups}
    scale = scales.pop() if len(scales) == 1 else 1.0
    values = weights = None
    for (group_mode, group_scale), (raw, counts) in groups.items():
        raw = np.repeat(raw, 3, axis=1) if mode == "color" and group_mode == "gray" else raw
        raw = raw if group_scale == scale else raw / group_scale
        values, weights = (
            (raw, counts) if values is None else merge_points(values, weights, raw, counts)
        )
    empty = np.zeros(0, dtype=np.int64)
    return Points(
        values=values, weights=weights, scale=scale, keys=empty, point_of_key=empty, mode=mode
    )


# ----------------------------------------------------------------------------
# 4. The EM driver
# ----------------------------------------------------------------------------
# Every model here is an EM map on a state, and every one uses the driver the same way:
#     step(state)      -> the next state: the model's E-step at state, then its M-step;
#     state.objective  -> the objective per pixel at the state, computed once (the E-step
#                         that measures it also gives the M-step its statistics);
#     state.stoppable  -> False when the iteration that reached the state may not end the fit
#                         (the spatial fit's partial sweeps leave most sites as they were);
#     state.in_place   -> True (MeanField's) when step(state) overwrites the state:
#                         such a state is stepped once, so no SQUAREM or Newton for it.
# The driver iterates the map, one cycle an iteration: Newton's steps on its fixed point
# where the map's Jacobian is given (NewtonSteps), SQUAREM's where the model has Coordinates,
# else the map itself; it alone decides when the objective has reached its limit, and which
# of several starts is kept (_best_of_starts).  A model that cuts corners on some iterations
# passes a full_step, which the driver takes when the limit is near.


class FitFailed(ValueError):
    """EM cannot go on: a covariance became singular, or the log-likelihood is not finite.

    A ValueError, as scikit-learn raises for an ill-defined covariance; the command line reports
    it as that image's failure.
    """


@dataclass
class EMRun:
    """What the driver returns: the final state and the record of the run."""

    state: object
    history: list  # the objective after each iteration (one value per accepted step)
    n_iter: int
    converged: bool
    n_em_steps: int  # evaluations of the EM map, the cost: 1 an iteration for plain EM
    fell_at: int | None = None  # the iteration at which the map itself lost more than tol
    newton_iter: int = 0  # the first iterations, Newton steps on EM's fixed point (NewtonSteps)

    @classmethod
    def of_fit(cls, state, fit):
        """The record of a fit (a GaussianMixtureFit's), ending at state: the same parameters
        as another model's state (a bias fit's start without a field)."""
        return replace(fit.run, state=state)


@dataclass(frozen=True)
class Coordinates:
    """A model's unconstrained real coordinates, which SQUAREM extrapolates in:
    to_vector(state) -> 1-D array; from_vector(vector, like) -> a state shaped like `like`;
    importance(state) -> how much each coordinate counts in the size of a step (None: alike)."""

    to_vector: object
    from_vector: object
    importance: object = None  # importance(state) -> each coordinate's weight in a step's size

    def weighted(self, state, change):
        """A change of the coordinates, each scaled by its importance at state: what a step's
        size is measured on."""
        return change if self.importance is None else self.importance(state) * change


def run_em(
    start,
    step,
    options,
    *,
    coordinates=None,
    full_step=None,
    on_iteration=None,
    ascent=True,
    jacobian=None,
):
    """Iterate step from start until the objective is at its limit or options.max_iter.

    Each iteration is one cycle: a Newton step on the map's fixed point while those help
    (given the map's Jacobian, NewtonSteps), else one safeguarded SQUAREM cycle (with
    coordinates and options.accelerate == "squarem"), else one step.  Converged: the stopping
    rule held on two iterations in a row that count, or no step gains any more, or Newton
    reached the fixed point.  full_step: the model's iteration that always counts, taken after
    an iteration at which the rule held.

    ascent=False (a mixture's map): the map itself may lose, since reg_covar, added to every
    covariance as scikit-learn does, makes the M-step inexact; a little near any fixed point,
    much where a component's variance sits at reg_covar or a component empties.  A loss smaller
    than tol is where the map has stopped gaining (and with tol = 0 a loss keeps the state, as
    for ascent=True).  A larger one is a step like any other: the run follows the map to its
    fixed point, taking an extrapolation where the stabilising EM step moves it less than the
    first step moved theta0 (the objective cannot judge one there), and the distance to the
    limit is measured on the size of the changes.

    jacobian (the map's, in coordinates, measured elsewhere): the run begins with Newton's
    steps, and goes on as without one from where they stop helping.  The objective judges no
    Newton step (Newton aims at the fixed point, which reg_covar can put below a state on the
    way): the record's fell_at is the first iteration at which it fell, and their stopping
    rule is distance_of_changes.  EM's cycles then measure the distance to the limit on their
    own values alone, and begin with a fresh streak.
    """
    if coordinates is not None and start.in_place:
        raise ValueError("a state updated in place (MeanField) cannot be extrapolated")
    state, values = start, [_finite(start.objective)]
    newton = None
    if jacobian is not None and coordinates is not None and options.accelerate != "none":
        newton = NewtonSteps.at(start, step, coordinates, jacobian)
    squarem = options.accelerate == "squarem" and coordinates is not None
    n_em_steps = 0 if newton is None else newton.used
    step_max, streak, stalled, near = 1.0, 0, False, False
    fell_at = None  # the record's: the first iteration at which the objective fell
    following = None  # EM's map lost more than tol here: from then on, follow it to its fixed point
    em_from = 0  # the index in values of the state EM's cycles began from
    while len(values) <= options.max_iter and streak < 2:
        if newton is not None:
            if newton.at_fixed_point:
                break
            new = newton.cycle(state)
            n_em_steps = newton.used
            if new is None:  # Newton stops helping: EM goes on from here
                newton, em_from, streak, near = None, len(values) - 1, 0, False
                continue
            state = new
            values.append(state.objective)
            if on_iteration is not None:
                on_iteration(len(values) - 1, state.objective)
            if fell_at is None and values[-1] < values[-2]:
                fell_at = len(values) - 1
            near = options.tol > 0 and distance_of_changes(values) < options.tol
            streak = streak + 1 if near and state.stoppable else 0
            continue
        value = values[-1]
        if squarem:
            new, step_max, used = _squarem_cycle(
                state, step, step_max, coordinates, following is not None
            )
            n_em_steps += used
        else:
            new = (full_step if near and full_step is not None else step)(state)
            n_em_steps += 1
        loss = value - new.objective if math.isfinite(new.objective) else math.inf
        if following is None and not ascent and 0 < options.tol < loss < math.inf:
            following = len(values)
            fell_at = following if fell_at is None else fell_at
        stalled = squarem and (loss == math.inf or (loss > 0 and following is None))
        if not stalled:
            state, value = new, new.objective
        # else the map has stopped gaining (round-off at the fixed point, or reg_covar's inexact
        # M-step within tol of it): the iteration keeps the state it started from.
        values.append(_finite(value))
        if on_iteration is not None:
            on_iteration(len(values) - 1, value)
        if stalled and options.tol > 0:
            break
        own = values[max(em_from, len(values) - 3) :]  # EM's own last three at most
        distance = distance_to_limit(own) if following is None else distance_of_changes(own)
        near = options.tol > 0 and distance < options.tol
        streak = streak + 1 if near and state.stoppable else 0
    newton_iter = len(values) - 1 if newton is not None else em_from
    at_fixed_point = newton is not None and newton.at_fixed_point
    return EMRun(
        state,
        [float(v) for v in values[1:]],
        len(values) - 1,
        bool(streak >= 2 or stalled or at_fixed_point),
        n_em_steps,
        fell_at,
        newton_iter,
    )


def _finite(value):
    if not math.isfinite(value):
        raise FitFailed("the log-likelihood is not finite; increase reg_covar")
    return value


def distance_to_limit(values):
    """Aitken's estimate of how far values[-2] lies below the limit of the sequence."""
    previous_gain = values[-2] - values[-3] if len(values) >= 3 else math.inf
    return aitken_distance(values[-1] - values[-2], previous_gain)


def aitken_distance(gain, previous_gain):
    """The distance to the limit from the last two gains of a sequence.

    EM converges linearly: successive gains shrink by a ratio a, so the limit is about
    the last value but one + gain / (1 - a).  Gains that do not shrink give infinity (not
    there yet); no gain at all gives 0 (a fixed point, to round-off), and a gain right after
    none is round-off too: its estimate is the gain itself.
    """
    if gain <= 0:
        return 0.0
    if previous_gain <= 0:  # a gain after none: the sequence is at round-off, and so is the gain
        return gain
    if previous_gain <= gain:
        return math.inf
    return gain / (1.0 - gain / previous_gain)


def distance_of_changes(values):
    """Aitken's distance to the limit of a sequence that may approach it from either side: the
    last change's size, extrapolated while the changes shrink with one sign, the change itself
    where the sign turns (the limit lies between), infinity while they do not shrink."""
    change = values[-1] - values[-2]
    previous = values[-2] - values[-3] if len(values) >= 3 else math.inf
    if change == 0:
        return 0.0
    if previous == 0 or (change > 0) != (previous > 0):
        return abs(change)
    return aitken_distance(abs(change), abs(previous))


SQUAREM_STEP_FACTOR = 4.0  # the R package SQUAREM's mstep: how fast the largest step grows


def _squarem_cycle(state, step, step_max, coordinates, by_residual=False):
    """One SQUAREM cycle (scheme S3 of Varadhan and Roland 2008), safeguarded.

    Two EM steps theta1 = M(theta0), theta2 = M(theta1) give r = theta1 - theta0 and
    v = theta2 - 2 theta1 + theta0; the extrapolated point theta0 + 2 a r + a^2 v, with
    a = |r| / |v| in [1, step_max], is stabilised by one more EM step.  It is taken only
    when both its objective and the stabilised one are at least theta0's, so the recorded
    objective never falls; otherwise the cycle ends at theta2, plain EM.  a = 1 is theta2
    itself.  by_residual (a map that does not raise the objective): the stabilised point is
    taken where that EM step moves it less than the first step moved theta0.  Returns the new
    state, the next step_max and the number of EM steps evaluated.
    """
    value = state.objective
    first = step(state)
    second = step(first)
    x0, x1, x2 = (coordinates.to_vector(s) for s in (state, first, second))
    r, v = x1 - x0, x2 - 2 * x1 + x0
    length = math.sqrt((r @ r) / (v @ v)) if v @ v > 0 else 1.0
    length = min(max(length, 1.0), step_max) if math.isfinite(length) else 1.0

    def kept(new, point):
        """The stabilised point is taken (False for a NaN objective)."""
        if not by_residual:
            return new.objective >= value
        moved = coordinates.weighted(new, coordinates.to_vector(new) - point)
        first_move = coordinates.weighted(new, r)
        return math.isfinite(new.objective) and moved @ moved <= first_move @ first_move

    if length > 1.01:
        point = x0 + 2 * length * r + length**2 * v
        trial = _try_state(coordinates, point, second)
        if trial is not None and (by_residual or trial.objective >= value):
            new = step(trial)
            if kept(new, point):
                return new, _next_step_max(length, step_max), 3
        if length == step_max:  # the longest step failed: allow less next time
            step_max = max(1.0, step_max / SQUAREM_STEP_FACTOR)
        length = 1.0
    return second, _next_step_max(length, step_max), 2


def _next_step_max(step, step_max):
    """SQUAREM's adaptive bound: a step that reached it may go SQUAREM_STEP_FACTOR times further."""
    return step_max * SQUAREM_STEP_FACTOR if step >= step_max else step_max


def _try_state(coordinates, vector, like):
    """The state at an extrapolated point, its objective computed; None where no valid model."""
    try:
        with np.errstate(all="ignore"):
            state = coordinates.from_vector(vector, like)
            value = state.objective
    except (FitFailed, np.linalg.LinAlgError):
        return None
    return state if math.isfinite(value) else None


# --- Newton's method on EM's fixed point ------------------------------------------------
# EM's map F (in a model's coordinates) has its fixed point where x = F(x), and near it
# F(x) - x ~ (J - I)(x - x*), J the map's Jacobian: so x* ~ x + (I - J)^-1 (F(x) - x).  EM's
# rate is J's largest eigenvalue, near 1 where classes overlap; Newton's does not care.  J is
# a property of the image (the fraction of missing information), so a draw of its pixels
# measures it, to the draw's sampling error, at a small fraction of a pass over every point
# a coordinate; with it each Newton step on every point costs one pass.

JACOBIAN_STEP = 1e-6  # forward differences: each coordinate moved by this (times its size, >= 1)
NEWTON_SHRINK = 0.5  # Newton goes on while its last 3 steps shrank the residual this much each


def em_map_jacobian(state, step, coordinates):
    """The Jacobian of the EM map at state, in coordinates: forward differences, one EM step
    a coordinate (and one at state)."""
    x = coordinates.to_vector(state)
    image = coordinates.to_vector(step(state))
    jacobian = np.empty((len(image), len(x)))
    for i in range(len(x)):
        moved = x.copy()
        moved[i] += JACOBIAN_STEP * max(1.0, abs(x[i]))
        moved_image = coordinates.to_vector(step(coordinates.from_vector(moved, state)))
        jacobian[:, i] = (moved_image - image) / (moved[i] - x[i])
    return jacobian


@dataclass
class NewtonSteps:
    """The driver's Newton cycle: x <- x + (I - J)^+ (F(x) - x) on the fixed point of the map
    F = step in coordinates, J its Jacobian measured elsewhere; one evaluation of the map (one
    pass) a step.  A step is taken where it shrinks the residual F(x) - x (components weighted
    as SQUAREM's by_residual), and the steps go on while the last three shrank it to at most
    NEWTON_SHRINK ** 3 (with a poor Jacobian, Newton's steps can shrink it more slowly than
    EM's).  A step that does not shrink it, or leaves the model's space, or a slow three end
    them (cycle returns None), at the last state taken."""

    step: object
    coordinates: Coordinates
    solve: np.ndarray  # (I - J)^+: frozen components make I - J singular
    change: np.ndarray  # F(x) - x at the last state taken
    sizes: list  # the residual's weighted size at every state taken
    used: int  # evaluations of the map so far

    @classmethod
    def at(cls, start, step, coordinates, jacobian):
        solve = np.linalg.pinv(np.eye(len(jacobian)) - jacobian)
        newton = cls(step, coordinates, solve, None, [], 0)
        newton.change, size = newton.residual(start)
        newton.sizes.append(size)
        return newton

    @property
    def at_fixed_point(self):
        return self.sizes[-1] == 0

    def residual(self, state):
        """F(x) - x at state, and its weighted size (one evaluation of the map)."""
        self.used += 1
        to_vector = self.coordinates.to_vector
        change = to_vector(self.step(state)) - to_vector(state)
        return change, float(np.linalg.norm(self.coordinates.weighted(state, change)))

    def cycle(self, state):
        """The next state from state (the last taken), or None where Newton stops helping."""
        sizes = self.sizes
        if len(sizes) > 3 and sizes[-1] > NEWTON_SHRINK**3 * sizes[-4]:
            return None
        point = self.coordinates.to_vector(state) + self.solve @ self.change
        trial = _try_state(self.coordinates, point, state)
        if trial is None:
            return None
        change, size = self.residual(trial)
        if not size < sizes[-1]:
            return None
        self.change = change
        sizes.append(size)
        return trial


def _best_of_starts(n_starts, fit_one, score):
    """The fit with the highest score among n_starts calls of fit_one() (the first on a tie)."""
    best = None
    for _ in range(n_starts):
        fit = fit_one()
        if best is None or score(fit) > score(best):
            best = fit
    return best


# ----------------------------------------------------------------------------
# 5. The Gaussian mixture
# ----------------------------------------------------------------------------
# Everything EM needs of a point x is its feature row phi(x) = [1, x, x_i x_j (i <= j)]:
# log(w_k N(x | mu_k, Sigma_k)) is linear in phi(x) (a Gaussian is an exponential
# family), and the M-step needs only sum_i r_ik phi(x_i).  So one EM iteration is
# a pass over the points with two small matrix products per block,
#     log-densities = Phi @ A,    statistics += (responsibilities * weights).T @ Phi,
# plus one exp per point and component; no N x K array outlives its block.
# The numerics follow scikit-learn: covariances through their Cholesky factors,
# reg_covar added to the diagonal, 10 * eps added to every component's mass, so
# that from the same start both give the same model to round-off.

LLOYD_STEPS = 5  # weighted k-means refinement after k-means++ seeding
BLOCK_POINTS = 1 << 14  # points per block in every pass: temporaries stay in cache
FEATURE_CACHE_BYTES = 1 << 28  # keep the features of up to ~3 million colours between passes
EXP_FLOOR = 300.0  # responsibilities below e^-300 are computed as e^-300 (subnormals are slow)
EMPTY_COMPONENT = 1e-8  # a component holding less than this many pixels is frozen
DRAW_GROWTH = 4  # each draw of pixels for a fit on many distinct values this many times the last
JACOBIAN_DRAW_TOL = 1e-3  # the draw the Jacobian is measured on: EM this much nearer its maximum


def _nonzero_mass(mass):
    """Each component's responsibility mass plus 10 eps, as scikit-learn's M-step adds it: an
    emptied component divides by a tiny mass, never by 0."""
    return mass + 10 * np.finfo(np.float64).eps


def _logsumexp(values, axis, keepdims=False):
    """log(sum(exp(values))) along an axis, without overflow: SciPy's, imported on first use
    (SciPy takes a tenth of a second to import, and most runs never need it)."""
    from scipy.special import logsumexp

    return logsumexp(values, axis=axis, keepdims=keepdims)


class _PointFeatures:
    """Weighted points and their feature rows, stored transposed: phi is (P, M).

    Transposed, every per-point reduction over the K components (max, sum, argmax) runs
    over K contiguous rows, which NumPy vectorises, instead of over K-long rows, which it
    does not.  The features are computed once and kept when they fit in FEATURE_CACHE_BYTES,
    otherwise block by block in every pass.  Values are centred on their weighted mean,
    which keeps the moment sums well conditioned.
    """

    def __init__(self, values, weights, scale=1.0):
        values = np.asarray(values)
        self.values = values[:, None] if values.ndim == 1 else values
        self.weights = np.asarray(weights, dtype=np.float64)
        self.scale = float(scale)
        self.total_weight = float(self.weights.sum())
        self.n_features = self.values.shape[1]
        self.n_params = 1 + self.n_features + self.n_features * (self.n_features + 1) // 2
        self._pairs = list(zip(*np.triu_indices(self.n_features)))  # the quadratic features
        self.center = np.zeros(self.n_features)
        center = sum(
            self.weights[start:stop] @ (self.values[start:stop] / self.scale)
            for start, stop in self.spans()
        )
        self.center = center / self.total_weight if self.total_weight > 0 else self.center
        self._phi = None
        if len(self.values) * self.n_params * 8 <= FEATURE_CACHE_BYTES:
            self._phi = np.empty((self.n_params, len(self.values)))
            for start, stop in self.spans():
                self._features(start, stop, out=self._phi[:, start:stop])

    def __len__(self):
        return len(self.values)

    def spans(self):
        """(start, stop) of the blocks of BLOCK_POINTS points every pass goes through."""
        return [
            (start, min(start + BLOCK_POINTS, len(self.values)))
            for start in range(0, len(self.values), BLOCK_POINTS)
        ]

    def x(self, start, stop):
        """Centred values of points start..stop, (m, D)."""
        return self.values[start:stop] / self.scale - self.center

    def centred(self, means):
        """Means on the 0..1 scale -> the centred coordinates EM works in."""
        return np.asarray(means, dtype=np.float64) - self.center

    def uncentred(self, means):
        """Centred means -> the 0..1 scale every fitted model is reported on."""
        return means + self.center

    def _features(self, start, stop, out=None):
        """phi of points start..stop, written row by row in place (no temporaries: above
        FEATURE_CACHE_BYTES this runs in every pass)."""
        phi = np.empty((self.n_params, stop - start)) if out is None else out
        phi[0] = 1.0
        x = phi[1 : 1 + self.n_features]
        np.divide(self.values[start:stop].T, self.scale, out=x)  # as x(): centred values
        x -= self.center[:, None]
        for row, (i, j) in enumerate(self._pairs, start=1 + self.n_features):
            np.multiply(x[i], x[j], out=phi[row])
        return phi

    def blocks(self):
        """(start, phi (P, m), weights (m,)) block by block."""
        for start, stop in self.spans():
            yield (start,) + self.block((start, stop))

    def block(self, span):
        """(phi (P, m), weights (m,)) of the points start..stop, span = (start, stop)."""
        start, stop = span
        phi = self._phi[:, start:stop] if self._phi is not None else self._features(start, stop)
        return phi, self.weights[start:stop]


# --- per covariance type: covariances from moments, and precision Cholesky factors


def _covariances_full(scatter, resp_mass, reg_covar):
    n_features = scatter.shape[-1]
    return scatter + reg_covar * np.eye(n_features)


def _covariances_diag(scatter, resp_mass, reg_covar):
    return np.diagonal(scatter, axis1=1, axis2=2) + reg_covar


def _covariances_spherical(scatter, resp_mass, reg_covar):
    return _covariances_diag(scatter, resp_mass, reg_covar).mean(axis=1)


def _covariances_tied(scatter, resp_mass, reg_covar):
    tied = np.tensordot(resp_mass, scatter, axes=1) / resp_mass.sum()
    return tied + reg_covar * np.eye(scatter.shape[-1])


COVARIANCE_FROM_SCATTER = dict(
    full=_covariances_full,
    diag=_covariances_diag,
    spherical=_covariances_spherical,
    tied=_covariances_tied,
)


def cholesky_precisions(covariances):
    """Upper factors U_k with precision_k = U_k U_k^T, for a stack of covariances (K, D, D).

    U_k = L_k^-T, where L_k is the Cholesky factor of covariance k (as scikit-learn), by
    forward substitution vectorised over the components: D is 1 or 3, K is small, and a
    per-matrix library call would cost more than the arithmetic.
    """
    try:
        lower = np.linalg.cholesky(covariances)
    except np.linalg.LinAlgError:
        raise FitFailed("a covariance became singular; increase reg_covar") from None
    inverse = np.zeros_like(lower)
    for i in range(lower.shape[-1]):
        inverse[:, i, i] = 1.0 / lower[:, i, i]
        for j in range(i):
            inverse[:, i, j] = (
                -np.einsum("kl,kl->k", lower[:, i, j:i], inverse[:, j:i, j]) / lower[:, i, i]
            )
    return np.swapaxes(inverse, 1, 2)


def precision_matrices(covariances, covariance_type, n_components, n_features):
    """Full precision matrices (K, D, D) and half their log-determinants (K,)."""
    if covariance_type in ("full", "tied"):
        factors = cholesky_precisions(
            covariances if covariance_type == "full" else covariances[None]
        )
        if covariance_type == "tied":
            factors = np.repeat(factors, n_components, axis=0)
        precisions = factors @ np.swapaxes(factors, 1, 2)
        half_log_det = np.log(np.diagonal(factors, axis1=1, axis2=2)).sum(axis=1)
        return precisions, half_log_det
    variances = (
        covariances if covariance_type == "diag" else np.repeat(covariances[:, None], n_features, 1)
    )
    if np.any(variances <= 0) or not np.all(np.isfinite(variances)):
        raise FitFailed("a covariance became singular; increase reg_covar")
    precisions = np.zeros((n_components, n_features, n_features))
    idx = np.arange(n_features)
    precisions[:, idx, idx] = 1.0 / variances
    return precisions, -0.5 * np.log(variances).sum(axis=1)


def log_density_coefficients(weights, means, covariances, covariance_type):
    """A with phi(x) @ A = log(w_k) + log N(x | mu_k, Sigma_k), x centred like the data."""
    n_components, n_features = means.shape
    precisions, half_log_det = precision_matrices(
        covariances, covariance_type, n_components, n_features
    )
    rows, cols = np.triu_indices(n_features)
    lin = np.einsum("kij,kj->ki", precisions, means)  # Lambda mu
    const = (
        np.log(weights)
        - 0.5 * n_features * np.log(2 * np.pi)
        + half_log_det
        - 0.5 * np.einsum("ki,ki->k", lin, means)
    )
    quad = -precisions[:, rows, cols] * np.where(rows == cols, 0.5, 1.0)  # -x^T Lambda x / 2
    return np.concatenate([const[:, None], lin, quad], axis=1).T


def _e_step_statistics(data, coefficients, passes):
    """One pass: the model's mean log-likelihood and the moment sums of its responsibilities.
    The blocks of points run on the passes' threads and are added up in their order: the same
    bits on any number of threads."""

    def block_statistics(span):
        # log-sum-exp over the components, in place: this is where the time goes
        phi, w = data.block(span)
        logp = coefficients.T @ phi  # (K, m) log(w_k N(x | k))
        top = logp.max(axis=0)
        logp -= top
        np.maximum(logp, -EXP_FLOOR, out=logp)  # e^-300 is 0 to every sum here, and not subnormal
        np.exp(logp, out=logp)
        norm = logp.sum(axis=0)
        log_likelihood = w @ (np.log(norm) + top)
        logp *= w / norm  # weighted responsibilities
        return logp @ phi.T, log_likelihood

    stats = np.zeros((coefficients.shape[1], coefficients.shape[0]))
    total = 0.0
    for block_stats, block_total in passes.map(block_statistics, data.spans()):
        stats += block_stats
        total += block_total
    return stats, total / data.total_weight


def _unpack_moments(stats, n_features):
    rows, cols = np.triu_indices(n_features)
    second = np.zeros((len(stats), n_features, n_features))
    second[:, rows, cols] = stats[:, 1 + n_features :]
    second[:, cols, rows] = stats[:, 1 + n_features :]
    return stats[:, 0], stats[:, 1 : 1 + n_features], second


def _m_step(stats, covariance_type, reg_covar, previous_means, previous_covariances):
    """Weights, means and covariances from the moment sums, as scikit-learn's M-step.

    A component whose responsibilities have vanished (less than EMPTY_COMPONENT pixels)
    keeps its previous mean and covariance: any value maximises EM's objective for it,
    and keeping them avoids dividing zero by zero.  Its weight goes to ~0.
    """
    n_features = previous_means.shape[1]
    mass, first, second = _unpack_moments(stats, n_features)
    resp_mass = _nonzero_mass(mass)
    means = first / resp_mass[:, None]
    scatter = second / resp_mass[:, None, None] - means[:, :, None] * means[:, None, :]
    covariances = COVARIANCE_FROM_SCATTER[covariance_type](scatter, resp_mass, reg_covar)
    empty = mass < EMPTY_COMPONENT
    if empty.any():
        means[empty] = previous_means[empty]
        if covariance_type != "tied":
            covariances[empty] = previous_covariances[empty]
    weights = resp_mass / resp_mass.sum()
    return weights, means, covariances


# --- the kinds of mixture: what a label is; how densities are read, recorded, reordered -------
# A GaussianMixtureFit is its parameters and its kind: DENSITY (Gaussian densities, each
# component a label), Binned (gray levels 0..top as bins, section 5b) or a PartialVolume
# (Gaussians that mix tissues, the labels the tissues).  What differs between them is the
# kind's methods, not a branch wherever a model is used.


class Density:
    """The kind of a mixture of Gaussian densities: each component is a label."""

    top = None  # no bins (Binned's highest gray level)
    partial_volume = None  # no tissues mixed (a PartialVolume is its own)
    collapses = True  # a component can shrink onto a value (collapsed_components)

    def n_labels(self, n_components):
        return n_components

    def label_sums(self, values):
        """(L, ...) values of the labels from (K, ...) the components': themselves."""
        return values

    def label_log_probabilities(self, logp):
        """(L, ...) log(w p(x | label)) from (K, ...) log(w_k p(x | k)): the same."""
        return logp

    def posterior_maps(self, posteriors):
        """What a segmentation keeps of the components' posteriors (K, ...): themselves."""
        return posteriors

    def log_density_blocks(self, model, data):
        """(start, (K, m) block of log(w_k p(x | k))) over the points of data, from its
        features: Gaussian densities."""
        coefficients = log_density_coefficients(
            model.weights, data.centred(model.means), model.covariances, model.covariance_type
        )
        for start, phi, _ in data.blocks():
            yield start, coefficients.T @ phi

    def m_step(self, stats, previous, covariance_type, reg_covar):
        """(weights, means, covariances) from the moment sums (K, 1 + D + D(D + 1)/2) of the
        responsibilities, previous the (means, covariances) they were computed with."""
        return _m_step(stats, covariance_type, reg_covar, *previous)

    def field_m_step(self, moments, previous, covariance_type, reg_covar):
        """(weights, means, variances) of a bias fit's mixture of one feature, the corrected
        intensity: this kind's m_step on the moments' constant terms (K, 3: the sums of the
        responsibilities, of them times the corrected intensities and their squares),
        previous its (means, variances)."""
        means, variances = previous
        tied = covariance_type == "tied"
        covariances = variances[:1, None] if tied else variances[:, None, None]
        weights, means, covariances = self.m_step(
            moments, (means[:, None], covariances), "tied" if tied else "full", reg_covar
        )
        variances = np.broadcast_to(covariances.reshape(-1), weights.shape)
        # a scatter below 0 (rounding, on a component of one value) counts as 0
        return weights, means[:, 0], np.maximum(variances, reg_covar)

    def log_prior(self, covariances):
        """The log-density per pixel of a prior on the covariances that EM maximises with the
        log-likelihood (a MAP fit): none, 0."""
        return 0.0

    def m_step_of_points(self, model, data, resp, reg_covar):
        """(weights, means, covariances) from responsibilities summed per point of data (K, M),
        counted in pixels (the spatial fit's)."""
        stats = sum(
            resp[:, start : start + phi.shape[1]] @ phi.T for start, phi, _ in data.blocks()
        )
        previous = (data.centred(model.means), model.covariances)
        weights, means, covariances = self.m_step(stats, previous, model.covariance_type, reg_covar)
        return weights, data.uncentred(means), covariances

    def reordered(self, order):
        """(this kind with its labels in that order, the order of the components)."""
        return self, order

    def record(self):
        """What a model record holds of the kind beyond every model's keys (quantized_top
        among them): nothing; a partial-volume model's "partial_volume"."""
        return {}


DENSITY = Density()


@dataclass(frozen=True)
class Binned(Density):
    """The kind of the binned model of gray levels 0..top (section 5b): each component a label,
    a level's probability that of its bin; exact EM with a floor on the variances."""

    top: int
    collapses = False  # a bin's probability is at most 1

    def log_density_blocks(self, model, data):
        """One block: the bin probabilities of data's gray levels (a few hundred or thousand)."""
        levels = np.rint(data.values[:, 0] / data.scale * self.top)
        yield 0, log_bin_probabilities(model, levels, self.top)

    def m_step(self, stats, previous, covariance_type, reg_covar):
        floor = quantized_variance_floor(reg_covar, self.top)
        return quantized_m_step(stats, covariance_type, floor, *previous)

    def m_step_of_points(self, model, data, resp, reg_covar):
        levels = data.values[:, 0].astype(np.float64)
        stats = quantized_statistics(model, levels, self.top, resp)
        previous = (model.means, model.covariances)
        return self.m_step(stats, previous, model.covariance_type, reg_covar)


# --- partial volume: Gaussians that are mixtures of tissues (--partial-volume) ----------
# A pixel on the border of two tissues holds some of each, and its intensity is in between
# (FSL FAST's partial volume; Santago and Gage, IEEE TMI 12, 1993).  One Gaussian a tissue
# bends to fit those pixels: at its maximum, white matter's Gaussian narrows to its bright
# peak and the white matter next to grey goes to grey.  So next to each tissue's pure
# Gaussian there are mixels: Gaussians at the fractions MIXEL_FRACTIONS of the way between two
# tissues adjacent in intensity, their mean fixed by the tissues' (mu_g = sum_t F_gt mu_t), one
# covariance for all.  The M-step for the means is a weighted least squares in the tissues'
# means; a pixel's tissue is the one with most of it: each Gaussian belongs to the tissue of
# its largest fraction, and the label maps and spatial prior are over tissues.


@dataclass(frozen=True, eq=False)
class PartialVolume(Density):
    """The kind of a partial-volume mixture: which tissues each of G Gaussians mixes,
    fractions (G, T), each row summing to 1, the T pure tissues first, in order; the labels
    are the tissues.  tissue_of: the tissue with most of each Gaussian.

    variance_prior: None, one covariance for every Gaussian (tied); a number nu >= 0, a
    variance s_t for each tissue (spherical), a mixel's the sum of its tissues' shares,
    sum_t F_gt s_t, under a prior that draws them towards a shared variance with the
    strength of nu times the pixels (tissue_variances_m_step).

    held: tissues whose means the M-step keeps where they are; min_gap: the least distance
    between the means of tissues adjacent in intensity order (one feature), kept by the
    M-step.  Both constrain the refit of --cortex-check (cortex_refit); () and 0 otherwise."""

    fractions: np.ndarray
    held: tuple = ()
    min_gap: float = 0.0
    variance_prior: float | None = None

    @property
    def n_tissues(self):
        return self.fractions.shape[1]

    @property
    def partial_volume(self):
        return self

    def n_labels(self, n_components):
        return self.n_tissues

    def label_sums(self, values):
        return self.tissue_sums(values)

    def label_log_probabilities(self, logp):
        return self.tissue_log_probabilities(logp)

    def posterior_maps(self, posteriors):
        """Each tissue's expected share of a pixel (expected_fractions)."""
        return self.expected_fractions(posteriors)

    @property
    def covariance_type(self):
        """Its models' covariance type: one covariance (tied), or a variance each
        (spherical)."""
        return "tied" if self.variance_prior is None else "spherical"

    def m_step(self, stats, previous, covariance_type, reg_covar):
        return _partial_volume_m_step(stats, self, reg_covar, *previous)

    def field_m_step(self, moments, previous, covariance_type, reg_covar):
        """Density's, in this kind's covariance type (the options' is tied)."""
        return super().field_m_step(moments, previous, self.covariance_type, reg_covar)

    def log_prior(self, covariances):
        """The tissues' variances' log-prior per pixel (tissue_variances_log_prior); 0 for
        one covariance."""
        if self.variance_prior is None:
            return 0.0
        return tissue_variances_log_prior(
            np.reshape(covariances, -1)[: self.n_tissues], self.variance_prior
        )

    def record(self):
        """Its fractions, its variances' prior where each tissue has a variance, and the
        constraints of a --cortex-check refit where there was one."""
        record = {"fractions": self.fractions.tolist()}
        if self.variance_prior is not None:
            record |= {"variance_prior": self.variance_prior}
        if self.held or self.min_gap:
            record |= {"held": list(self.held), "min_gap": self.min_gap}
        return {"partial_volume": record}

    @property
    def tissue_of(self):
        return np.argmax(self.fractions, axis=1)

    def tissue_sums(self, values):
        """(T, ...) values (G, ...) summed over each tissue's Gaussians."""
        out = np.zeros((self.n_tissues,) + values.shape[1:], dtype=values.dtype)
        for g, tissue in enumerate(self.tissue_of):
            out[tissue] += values[g]
        return out

    def tissue_log_probabilities(self, logp):
        """(T, ...) log sum over each tissue's Gaussians of (G, ...) log(w_g p(x | g))."""
        out = np.empty((self.n_tissues,) + logp.shape[1:], dtype=logp.dtype)
        scratch = np.empty(logp.shape[1:], dtype=logp.dtype)
        for t, members in enumerate(self.members):
            top = logp[members[0]].copy()
            for g in members[1:]:
                np.maximum(top, logp[g], out=top)
            total = out[t]
            total[...] = 0
            for g in members:
                np.subtract(logp[g], top, out=scratch)
                total += np.exp(scratch, out=scratch)
            np.log(total, out=total)
            total += top
        return out

    def shares_within_tissues(self, logp):
        """In place: (G, ...) log(w_g p(x | g)) -> each Gaussian's share of its tissue's
        probability at x.  Returns the tissues' log-probabilities (T, ...)."""
        tissue_logp = self.tissue_log_probabilities(logp)
        for g, t in enumerate(self.tissue_of):  # no (G, ...) temporaries
            logp[g] -= tissue_logp[t]
            np.exp(logp[g], out=logp[g])
        return tissue_logp

    @property
    def members(self):
        """Each tissue's Gaussians."""
        return [np.flatnonzero(self.tissue_of == t) for t in range(self.n_tissues)]

    def expected_fractions(self, posteriors):
        """(T, ...) each tissue's expected share of a pixel, from (G, ...) posteriors: FAST's
        partial volume maps."""
        return np.tensordot(self.fractions.T.astype(posteriors.dtype), posteriors, axes=1)

    def means(self, mass, first, previous):
        """The mixels' constrained means (G, D) from the moment sums: the tissues' means by
        weighted least squares, sum_g mass_g F_g F_g^T mu = sum_g F_g first_g.  A tissue
        with no mass keeps its mean (a ridge of EMPTY_COMPONENT towards previous (G, D))."""
        f = self.fractions
        tissues = previous[: self.n_tissues]
        normal = (f * mass[:, None]).T @ f + EMPTY_COMPONENT * np.eye(self.n_tissues)
        right = f.T @ first + EMPTY_COMPONENT * tissues
        if not self.held and not self.min_gap:
            return f @ np.linalg.solve(normal, right)
        return f @ _constrained_tissue_means(normal, right, tissues, self.held, self.min_gap)

    def reordered(self, order):
        """(the same structure with its tissues in the given order, the Gaussians' order)."""
        rows = np.concatenate([order, np.arange(self.n_tissues, len(self.fractions))])
        position = np.argsort(order)  # where each tissue goes
        held = tuple(sorted(int(position[t]) for t in self.held))
        return replace(self, fractions=self.fractions[rows][:, order], held=held), rows


def _constrained_tissue_means(normal, right, previous, held, min_gap):
    """The tissues' means (T, D) minimising mu^T normal mu - 2 right^T mu (the weighted least
    squares of PartialVolume.means) with the held tissues' means at previous and, for one
    feature, every two neighbours at least min_gap apart.  A convex quadratic: its minimum
    is the best of the feasible minima with each subset of the gaps active (equalities,
    solved with their Lagrange multipliers), 2^(T-1) small systems."""
    n_tissues, n_features = right.shape
    if min_gap and n_features != 1:
        raise ValueError("a least gap between tissues' means needs one feature")
    equalities = [(np.eye(n_tissues)[t], previous[t]) for t in held]
    best, best_value = None, np.inf
    for active in itertools.product((False, True), repeat=(n_tissues - 1) * bool(min_gap)):
        rows = equalities + [
            (np.eye(n_tissues)[t + 1] - np.eye(n_tissues)[t], np.full(n_features, min_gap))
            for t in np.flatnonzero(active)
        ]
        c = np.array([row for row, _ in rows]).reshape(len(rows), n_tissues)
        e = np.array([value for _, value in rows]).reshape(len(rows), n_features)
        system = np.block([[normal, c.T], [c, np.zeros((len(rows), len(rows)))]])
        try:
            means = np.linalg.solve(system, np.vstack([right, e]))[:n_tissues]
        except np.linalg.LinAlgError:  # a held tissue's gap to a held neighbour: redundant
            continue
        if min_gap and np.any(np.diff(means[:, 0]) < min_gap * (1 - 1e-9)):
            continue
        value = float(np.sum(means * (normal @ means)) - 2 * np.sum(right * means))
        if value < best_value:
            best, best_value = means, value
    if best is None:
        raise FitFailed("the held tissues' means leave no room for the least gap between them")
    return best


MIXEL_FRACTIONS = (0.25, 0.75)  # the brighter tissue's share of a mixel (docs/brain.md)


def tissues_and_mixels(n_tissues, fractions=MIXEL_FRACTIONS, variance_prior=None):
    """The PartialVolume of n_tissues ordered by intensity: pure tissues, then the mixels of
    each pair of neighbours in that order (CSF-grey and grey-white, not CSF-white); one
    covariance, or a variance each under that prior (PartialVolume.variance_prior)."""
    rows = list(np.eye(n_tissues))
    for t in range(n_tissues - 1):
        for f in fractions:
            row = np.zeros(n_tissues)
            row[t], row[t + 1] = 1.0 - f, f
            rows.append(row)
    return PartialVolume(np.array(rows), variance_prior=variance_prior)


def _partial_volume_m_step(stats, pv, reg_covar, previous_means, previous_covariances):
    """The M-step of a partial-volume mixture: weights as any mixture's, the means constrained
    (PartialVolume.means); one covariance, the scatter about each Gaussian's own mean, or the
    tissues' variances (tissue_variances_m_step)."""
    n_features = previous_means.shape[1]
    mass, first, second = _unpack_moments(stats, n_features)
    resp_mass = _nonzero_mass(mass)
    weights = resp_mass / resp_mass.sum()
    if pv.variance_prior is not None:
        return (weights,) + tissue_variances_m_step(
            mass, first, second, pv, reg_covar, previous_means, previous_covariances
        )
    means = pv.means(mass, first, previous_means)
    cross = np.einsum("gi,gj->ij", first, means)
    scatter = second.sum(axis=0) - cross - cross.T + np.einsum("g,gi,gj->ij", mass, means, means)
    covariance = scatter / mass.sum() + reg_covar * np.eye(n_features)
    return weights, means, covariance


# A variance for each tissue.  One covariance for every tissue cannot fit a scan whose tissues
# are not equally noisy; a variance each, unconstrained, lets one tissue go broad beside narrow
# ones and take the others' tails (docs/brain.md).  Between the two: the tissues' variances
# s_t under one prior that draws them to a shared variance sigma^2, fitted with them: per
# pixel, -(nu / 2) sum_t d(sigma^2, s_t), d(a, b) = a / b - log(a / b) - 1 >= 0 (the
# Itakura-Saito divergence; an inverse-gamma prior of nu times the pixels' strength, up to a
# constant).  A mixel's intensity is the sum of its tissues' parts, so its variance is
# v_g = sum_t F_gt s_t.  The M-step is a conditional maximisation (ECM): the tissues' means by
# least squares weighted by each Gaussian's precision at the previous variances, then the
# variances by TISSUE_VARIANCE_STEPS steps of the EM of variance components (each mixel's
# deviation split into its tissues' parts, the missing data), each raising the objective.
# sigma^2 is the harmonic mean of the s_t, where the prior is largest, found with them in each
# step (_tissue_variances): a strong prior moves the shared scale at once.


def tissue_variances_log_prior(variances, nu):
    """The log-prior per pixel of the tissues' variances (T,), at the shared variance that
    maximises it (their harmonic mean): -(nu / 2) sum_t d(sigma^2, s_t), 0 where all are equal."""
    ratio = (len(variances) / np.sum(1.0 / variances)) / variances
    return -0.5 * nu * float(np.sum(ratio - np.log(ratio) - 1.0))


TISSUE_VARIANCE_STEPS = 10


def _tissue_variances(sums, masses, strength, previous):
    """The variances s_t (T,) that maximise sum_t -(masses_t / 2) log s_t - sums_t / (2 s_t),
    the prior of that strength (in pixels) and its shared variance together:
    s_t = (sums_t + strength sigma^2) / (masses_t + strength), sigma^2 their harmonic mean, the
    root of h(x) = x sum_t (masses_t + strength) / (sums_t + strength x) - T.  h is increasing
    and concave, and below 0 at the least sums_t / masses_t: Newton's steps from the previous
    variances' harmonic mean, kept above that, reach the root from below after at most one
    step (on Python floats: T is 3 or so, and NumPy's calls would cost more than the
    arithmetic).  No prior: sums / masses (previous where a tissue is empty)."""
    filled = masses >= EMPTY_COMPONENT
    if not strength:
        return np.where(filled, sums / np.where(filled, masses, 1.0), previous)
    weights = masses + strength
    pairs = list(zip(sums.tolist(), weights.tolist()))
    low = min(
        (a / m for a, m in zip(sums.tolist(), masses.tolist()) if m >= EMPTY_COMPONENT), default=0.0
    )
    shared = max(len(pairs) / sum(1.0 / p for p in previous.tolist()), low)
    for _ in range(50):
        gap, slope = -float(len(pairs)), 0.0
        for a, w in pairs:
            d = a + strength * shared
            gap += shared * w / d
            slope += w * a / (d * d)
        if not slope > 0:  # no scatter at all: reg_covar alone is left
            return np.zeros_like(sums)
        step = gap / slope
        shared = max(shared - step, low)
        if abs(step) <= 1e-13 * shared:
            break
    return (sums + strength * shared) / weights


def tissue_variances_m_step(mass, first, second, pv, reg_covar, previous_means, previous):
    """(means (G, D), variances (G,)) of a partial-volume mixture with a variance for each tissue
    (the same in each of D features), from the Gaussians' moment sums (G,), (G, D), (G, D, D),
    the previous means (G, D) and variances (G,).  Each feature of a pixel counts as one draw
    of the variance, the prior's strength is in pixels."""
    f = pv.fractions
    n_features = first.shape[1]
    variances = np.reshape(previous, -1)
    relative = np.mean(variances) / variances  # the precisions, scaled near 1
    means = pv.means(mass * relative, first * relative[:, None], previous_means)
    # each Gaussian's squares about its new mean, summed over the features
    scatter = np.trace(second, axis1=1, axis2=2) - 2 * np.einsum("gd,gd->g", first, means)
    scatter = np.maximum(scatter + mass * np.einsum("gd,gd->g", means, means), 0.0)
    # the step is on the variances without reg_covar, added after it (as to one covariance)
    tissues = variances[: pv.n_tissues]
    tissues = np.maximum(tissues - reg_covar, 1e-3 * tissues)
    strength = pv.variance_prior * mass.sum()
    draws = n_features * mass  # of each Gaussian's variance
    tissue_draws = (f > 0).T @ draws
    for _ in range(TISSUE_VARIANCE_STEPS):
        # E[part_t^2] / F_gt summed over the Gaussians holding t, part_t of a pixel of g
        # having variance F_gt s_t of g's v_g: s_t (M_t + s_t sum_g F_gt (S_g - m_g v_g) / v_g^2)
        total = f @ tissues
        sums = tissues * (tissue_draws + tissues * (((scatter - draws * total) / total**2) @ f))
        tissues = _tissue_variances(sums, tissue_draws, strength, tissues)
    return means, f @ (tissues + reg_covar)


def _hard_statistics(data, centers):
    """Weighted k-means pass: moment sums of each point's nearest centre."""
    coefficients = np.zeros((data.n_params, len(centers)))
    coefficients[0] = -(centers**2).sum(axis=1)
    coefficients[1 : 1 + data.n_features] = 2 * centers.T  # argmax = nearest centre
    stats = np.zeros((len(centers), data.n_params))
    for _, phi, w in data.blocks():
        nearest = np.argmax(coefficients.T @ phi, axis=0)
        onehot = np.zeros((len(centers), phi.shape[1]))
        onehot[nearest, np.arange(phi.shape[1])] = w
        stats += onehot @ phi.T
    return stats


def _squared_distances(data, centers):
    """(len(centers), M) squared distances from every point to each centre, from the features:
    |x|^2 - 2 c.x + |c|^2, one small matrix product per block (clipped at 0 against round-off)."""
    n_features = data.n_features
    rows, cols = np.triu_indices(n_features)
    squares = 1 + n_features + np.flatnonzero(rows == cols)  # the x_i^2 rows of phi
    out = np.empty((len(centers), len(data)))
    for start, phi, _ in data.blocks():
        block = out[:, start : start + phi.shape[1]]
        np.matmul(-2.0 * centers, phi[1 : 1 + n_features], out=block)
        block += phi[squares].sum(axis=0)
        block += (centers**2).sum(axis=1)[:, None]
    return np.maximum(out, 0.0, out=out)


def _kmeans_plus_plus(data, n_components, rng):
    """Greedy weighted k-means++ seeding (Arthur and Vassilvitskii 2007, as scikit-learn).

    Each new centre: draw 2 + log(K) candidates with probability ~ weight x squared distance to
    the nearest centre so far, keep the one that lowers the weighted potential most.  The greedy
    trials make a merged pair of clusters much rarer than plain k-means++ does.
    """
    n_trials = 2 + int(math.log(n_components))
    first = rng.choice(len(data), p=data.weights / data.total_weight)
    centers = data.x(first, first + 1)
    nearest = _squared_distances(data, centers)[0]
    for found in range(1, n_components):
        scores = data.weights * nearest
        if not scores.sum() > 0:  # every point with weight sits on a centre already
            raise ValueError(
                f"the samples have {found} distinct values with positive weight: "
                f"too few for {n_components} components"
            )
        candidates = rng.choice(len(data), size=n_trials, p=scores / scores.sum())
        trials = _squared_distances(data, np.vstack([data.x(c, c + 1) for c in candidates]))
        np.minimum(trials, nearest, out=trials)  # one pass for every candidate of the round
        best = int(np.argmin(trials @ data.weights))  # the first on a tie, as one by one
        centers = np.vstack([centers, data.x(candidates[best], candidates[best] + 1)])
        nearest = trials[best].copy()
        del trials
    return centers


def _initial_statistics(data, n_components, init, rng):
    if init == "random":
        # Random responsibilities, as scikit-learn's init_params="random".
        stats = 0.0
        for _, phi, w in data.blocks():
            resp = rng.uniform(size=(phi.shape[1], n_components)).T
            resp *= w / resp.sum(axis=0)
            stats = stats + resp @ phi.T
        return stats
    centers = _kmeans_plus_plus(data, n_components, rng)
    for _ in range(LLOYD_STEPS):
        stats = _hard_statistics(data, centers)
        mass = stats[:, 0]
        moved = np.where(
            mass[:, None] > 0,
            stats[:, 1 : 1 + data.n_features] / np.maximum(mass, 1e-300)[:, None],
            centers,
        )
        if np.array_equal(moved, centers):
            break
        centers = moved
    return _hard_statistics(data, centers)


@dataclass
class GaussianMixtureFit:
    """A fitted mixture: its parameters, with scikit-learn's names and shapes, its kind, and
    the record of the EM run that fitted it (none for a model read from a file).

    Attributes
    ----------
    weights : array, shape (K,)
    means : array, shape (K, D)
        On the 0..1 intensity scale.
    covariances : array
        full (K, D, D), tied (D, D), diag (K, D), spherical (K,).
    covariance_type : str
    kind : Density, Binned or PartialVolume
        What a label is and how the densities are read (DENSITY: Gaussian densities).
    quantized_top : int or None
        The binned model of gray levels 0..quantized_top (Binned); None for densities.
    partial_volume : PartialVolume or None
        A partial-volume model: its G Gaussians (pure tissues first, then mixels; tied) mix
        T tissues, and labels, predict and predict_proba are of the tissues.
    run : EMRun
        What the fit's EM run did (its state dropped); read through the following.
    log_likelihood : list of float
        Mean log-likelihood per sample after each iteration (of the bins, for a binned model).
    n_iter : int
    converged : bool
        The stopping rule held (False: max_iter was reached first).
    n_em_steps : int
        EM maps evaluated: one an iteration for plain EM, two or three when accelerated.
    subsample : list of dict or None
        With more distinct values than FitOptions.subsample_above, EM started from fits to
        draws of pixels, smallest first: {"pixels", "points", "n_iter", "em_steps",
        "converged", "jacobian_steps"} of each (the last: EM steps that measured the Jacobian
        of EM's map there, or 0); log_likelihood, n_iter and n_em_steps are those on every
        point.
    fell_at : int or None
        The iteration at which plain EM's own step lowered the log-likelihood by more than tol
        (reg_covar makes the M-step inexact where a variance sits at it or a component empties):
        log_likelihood never falls before it, and from it the fit followed EM to its fixed
        point.  None: EM never lost.  After Newton's steps (newton_iter), the first iteration at
        which the log-likelihood fell.
    newton_iter : int
        The first iterations of log_likelihood that were Newton steps on EM's fixed point (one
        pass each; on many distinct values, with a Jacobian measured on a draw); 0: none.
    """

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    covariance_type: str
    kind: Density = DENSITY
    run: EMRun = field(default_factory=lambda: EMRun(None, [], 0, True, 0))  # none: converged
    subsample: list | None = None  # the fit started from fits to draws of pixels: what ran there

    @classmethod
    def of_run(cls, parameters, covariance_type, run, kind=DENSITY):
        """The fit that an EMRun of a mixture of that kind ended with: parameters = (weights,
        means on the 0..1 scale, covariances), and the run's record (not its state)."""
        weights, means, covariances = parameters
        return cls(weights, means, covariances, covariance_type, kind, replace(run, state=None))

    # the run's record, by scikit-learn-like names (the class docstring says what each is)
    log_likelihood = property(lambda self: self.run.history)
    n_iter = property(lambda self: self.run.n_iter)
    converged = property(lambda self: self.run.converged)
    n_em_steps = property(lambda self: self.run.n_em_steps)
    fell_at = property(lambda self: self.run.fell_at)
    newton_iter = property(lambda self: self.run.newton_iter)

    def with_history(self, log_likelihood):
        """The same model with that log-likelihood history (a saved model's on an image)."""
        return replace(self, run=replace(self.run, history=log_likelihood))

    @property
    def quantized_top(self):
        return self.kind.top

    @property
    def partial_volume(self):
        return self.kind.partial_volume

    @property
    def n_components(self):
        return len(self.weights)

    @property
    def n_labels(self):
        """The labels of a segmentation: the components, or a partial-volume model's tissues."""
        return self.kind.n_labels(self.n_components)

    @property
    def label_weights(self):
        return self.kind.label_sums(self.weights)

    @property
    def label_means(self):
        """The colour of each label: its component's mean, or the pure tissue's."""
        return self.means[: self.n_labels]

    def _log_weighted_densities(self, X):
        """(n, L) log(w p(x | label)): Gaussian densities, or a binned model's bin probabilities."""
        X = np.asarray(X, dtype=np.float64)
        data = _PointFeatures(X, np.ones(len(X)))
        logp = np.empty((len(X), self.n_labels))
        for start, block in log_label_blocks(self, data):
            logp[start : start + block.shape[1]] = block.T
        return logp

    def score_samples(self, X):
        """Log-likelihood of each sample, (n,)."""
        return _logsumexp(self._log_weighted_densities(X), axis=1)

    def score(self, X, sample_weight=None):
        """Mean log-likelihood per sample (weighted by sample_weight)."""
        return float(np.average(self.score_samples(X), weights=sample_weight))

    def predict(self, X):
        """The most likely component of each sample, (n,)."""
        return np.argmax(self._log_weighted_densities(X), axis=1)

    def predict_proba(self, X):
        """Posterior probability of each component for each sample, (n, K)."""
        logp = self._log_weighted_densities(X)
        return np.exp(logp - _logsumexp(logp, axis=1, keepdims=True))

    def to_record(self):
        """The model as JSON-ready values, the keys of a STEM_model.json that from_record reads:
        a model saved by the API is applied by --model as one saved by a run."""
        return {
            "covariance_type": self.covariance_type,
            "weights": self.weights.tolist(),
            "means": self.means.tolist(),
            "covariances": np.asarray(self.covariances).tolist(),
            "quantized_top": self.quantized_top,
        } | self.kind.record()

    @classmethod
    def from_record(cls, record):
        """The mixture a STEM_model.json record holds (its weights, means, covariances,
        covariance_type and quantized_top), checked: ValueError, naming what is wrong, for
        anything that is no valid mixture (a hand-edited file included)."""
        try:
            covariance_type = record["covariance_type"]
            weights = np.asarray(record["weights"], dtype=np.float64)
            means = np.asarray(record["means"], dtype=np.float64)
            covariances = np.asarray(record["covariances"], dtype=np.float64)
            top = record.get("quantized_top")
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"not a model record ({error})") from None
        if covariance_type not in COVARIANCE_TYPES or means.ndim != 2 or weights.ndim != 1:
            raise ValueError("not a model record (covariance_type, weights or means)")
        k, d = means.shape
        shapes = {"full": (k, d, d), "tied": (d, d), "diag": (k, d), "spherical": (k,)}
        if len(weights) != k or covariances.shape != shapes[covariance_type] or d not in (1, 3):
            raise ValueError("the weights, means and covariances do not fit together")
        values = (weights, means, covariances)
        if not all(np.all(np.isfinite(v)) for v in values):
            raise ValueError("a parameter is not finite")
        if np.any(weights <= 0) or abs(weights.sum() - 1) > 1e-6:
            raise ValueError("the weights are not positive with sum 1")
        if covariance_type in ("full", "tied"):
            matrices = covariances.reshape(-1, d, d)
            scale = np.abs(matrices).max(axis=(1, 2), keepdims=True)
            if np.any(np.abs(matrices - matrices.swapaxes(1, 2)) > 1e-9 * scale):
                raise ValueError("a covariance matrix is not symmetric")
        precision_matrices(covariances, covariance_type, k, d)  # FitFailed if not positive
        if top is not None and (not _is_integer(top) or top not in (255, 65535) or d != 1):
            raise ValueError("quantized_top is not 255 or 65535 for a gray model")
        pv = _partial_volume_of_record(
            record.get("partial_volume"), k, covariance_type, top, covariances
        )
        kind = pv or (DENSITY if top is None else Binned(top))
        return cls(weights, means, covariances, covariance_type, kind)

    def reordered(self, order):
        """The same model with its labels (components, or a partial-volume model's tissues)
        in that order."""
        kind, rows = self.kind.reordered(order)
        covariances = self.covariances if self.covariance_type == "tied" else self.covariances[rows]
        return replace(
            self,
            weights=self.weights[rows],
            means=self.means[rows],
            covariances=covariances,
            kind=kind,
        )


def _partial_volume_of_record(value, n_gaussians, covariance_type, top, variances):
    """The PartialVolume a model record's "partial_volume" holds (None: none), checked
    (variances: the model's covariances, which a variance each must be shares of)."""
    if value is None:
        return None
    try:
        fractions = np.asarray(value["fractions"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"not a partial-volume record ({error})") from None
    if fractions.ndim != 2 or len(fractions) != n_gaussians or fractions.shape[1] < 1:
        raise ValueError("the partial volume's fractions do not fit the weights")
    t = fractions.shape[1]
    if (
        not np.all(np.isfinite(fractions))
        or np.any(fractions < 0)
        or np.any(np.abs(fractions.sum(axis=1) - 1) > 1e-9)
        or not np.array_equal(fractions[:t], np.eye(t))
    ):
        raise ValueError("the partial volume's fractions are not shares of its tissues")
    prior = value.get("variance_prior")
    if covariance_type != ("tied" if prior is None else "spherical") or top is not None:
        raise ValueError(
            "a partial-volume model has one (tied) covariance, or a variance_prior and a "
            "variance each (spherical), and no bins"
        )
    held, min_gap = value.get("held", []), value.get("min_gap", 0.0)
    if (
        not isinstance(held, list)
        or not all(_is_integer(h) and 0 <= h < t for h in held)
        or not isinstance(min_gap, (int, float))
        or isinstance(min_gap, bool)
        or not 0 <= min_gap < math.inf
    ):
        raise ValueError("the partial volume's held tissues or least gap are not valid")
    if prior is not None and (not _is_real(prior) or not 0 <= prior < math.inf):
        raise ValueError("the partial volume's variance_prior is not a number >= 0")
    if prior is not None and not np.allclose(variances, fractions @ variances[:t], rtol=1e-9):
        raise ValueError("the mixels' variances are not their tissues' shares")
    held = tuple(sorted(set(map(int, held))))
    return PartialVolume(fractions, held, float(min_gap), None if prior is None else float(prior))


def log_density_blocks(model, data):
    """(start, (K, m) block of log(w_k p(x | k))) over the points of data, as its kind reads
    them (Gaussian densities; a binned model's bin probabilities, in one block)."""
    return model.kind.log_density_blocks(model, data)


def log_label_blocks(model, data):
    """log_density_blocks of the labels: a partial-volume model's summed over each tissue."""
    for start, block in log_density_blocks(model, data):
        yield start, model.kind.label_log_probabilities(block)


@dataclass(frozen=True)
class FitOptions:
    """How EM runs, validated once and passed down to every fit (density, quantized, spatial).

    tol is the stopping rule's distance to the maximum: EM stops once the Aitken estimate of
    the limit of the mean log-likelihood per sample is within tol of it, on two iterations in
    a row (tol=0 runs exactly max_iter iterations).  accelerate="squarem" extrapolates the EM
    map (Varadhan and Roland 2008) with a safeguard that never lets the log-likelihood fall,
    and on more than subsample_above distinct values begins with Newton steps on EM's fixed
    point (NewtonSteps); "none" is plain EM, one E-step and one M-step an iteration, as
    scikit-learn.
    """

    covariance_type: str = setting("full", Domain(choices=COVARIANCE_TYPES))
    max_iter: int = setting(1000, Domain(int, 1))
    tol: float = setting(1e-8, Domain(float))
    reg_covar: float = setting(1e-6, Domain(float))
    # a partial-volume fit's tissues' variances: None one (tied), else each its own, tied by
    # a prior of this strength (per pixel); auto: tissue_variance_prior
    variance_prior: float | str | None = setting(None, Domain(float, none=True, auto=True))
    # starts kept the best of; None: starts(), 1 or AUTO_N_INIT
    n_init: int | None = setting(None, Domain(int, 1, none=True))
    init: str = setting("kmeans++", Domain(choices=INIT_METHODS))
    random_state: int | None = setting(0, Domain(int, 0, none=True))
    accelerate: str = setting("squarem", Domain(choices=ACCELERATIONS))
    # more distinct values: start on draws of pixels
    subsample_above: int = setting(1 << 19, Domain(int, 0))
    passes: Passes = Passes()  # how per-pixel passes run (threads); never changes a result

    def __post_init__(self):
        check_settings(self)

    def starts(self, choosing_k=False):
        """How many starts a fit keeps the best of: n_init, else 1, or AUTO_N_INIT for each K
        that -k auto tries (where one start that merges two classes misleads the criterion)."""
        if self.n_init is not None:
            return self.n_init
        return AUTO_N_INIT if choosing_k else 1


def _check_n_components(n_components, n_distinct):
    if not _is_integer(n_components) or n_components < 1:
        raise ValueError(f"n_components must be an integer >= 1, got {n_components!r}")
    if n_distinct < n_components:
        raise ValueError(
            f"{n_distinct} distinct samples with positive weight cannot make "
            f"{n_components} components"
        )


def _fit_data(data, n_components, options, given=(None, None, None), on_iteration=None):
    """EM on prepared points; the engine behind fit_gmm and the image pipeline."""
    _check_n_components(n_components, _n_distinct(data))

    def fit_from(stats):
        start = _starting_parameters(
            data, n_components, options.covariance_type, options.reg_covar, stats, given
        )
        return _density_em(data, start, options, on_iteration)

    if all(value is not None for value in given):
        return fit_from(None)
    if 16 <= options.subsample_above < len(data):
        return _fit_from_a_subsample(data, n_components, options, on_iteration)
    rng = np.random.default_rng(options.random_state)
    return _best_of_starts(
        options.starts(),
        lambda: fit_from(_initial_statistics(data, n_components, options.init, rng)),
        score=lambda fit: fit.log_likelihood[-1],
    )


def _fit_from_a_subsample(data, n_components, options, on_iteration):
    """EM on many distinct values (a noisy photo's millions of colours, more than
    options.subsample_above), whose every pass is a pass over millions of points, started on
    draws of pixels made with the counts (unbiased pictures of the image): the start
    (options.init) and EM on the smallest draw, options.subsample_above // 16 pixels, then EM on
    draws DRAW_GROWTH times larger in turn, each from the last one's fit, up to
    options.subsample_above pixels and a quarter of the image.  A draw of n pixels knows the
    maximum only to about (free parameters) / n per pixel, so its EM stops at that distance
    (or tol, if larger).  On the second draw (or the only one), its EM run JACOBIAN_DRAW_TOL
    times nearer its maximum (where EM still moves, the map's Jacobian is not its fixed
    point's), the Jacobian of EM's map is measured, and the later draws and every point begin
    with Newton steps on EM's fixed point (NewtonSteps): on every point to the same stopping
    rule, so converged means at the full data's fixed point, which Newton's steps from next
    to it reach in a few passes.  Only the iterations on every point are the fit's history;
    GaussianMixtureFit.subsample says what ran on each draw.  With several starts, each runs
    on the smallest draw and the best goes on."""
    draw_rng = np.random.default_rng(np.random.SeedSequence(options.random_state).spawn(1)[0])
    cumulative = np.cumsum(data.weights)  # made once for every draw
    sizes = _draw_sizes(data.total_weight, options.subsample_above)
    rng = np.random.default_rng(options.random_state)
    free = n_parameters(n_components, data.n_features, options.covariance_type)
    measured_on = sizes[min(1, len(sizes) - 1)] if options.accelerate != "none" else None
    jacobian = None

    def on_draw(pixels):
        precision = free / pixels * (JACOBIAN_DRAW_TOL if pixels == measured_on else 1.0)
        return replace(options, subsample_above=0, tol=max(options.tol, precision))

    def after_draw(pixels, sample, fit):
        """The draw's record, the Jacobian measured first where this is the draw for it."""
        nonlocal jacobian
        if pixels == measured_on:
            jacobian = _density_jacobian(sample, fit, options)
        return {
            "pixels": pixels,
            "points": len(sample),
            "tol": on_draw(pixels).tol,
            "n_iter": fit.n_iter,
            "em_steps": fit.n_em_steps,
            "converged": fit.converged,
            "jacobian_steps": len(jacobian) + 1 if pixels == measured_on else 0,
        }

    first = _drawn_sample(data, sizes[0], cumulative, draw_rng)

    def fit_one():
        start = _fresh_start(first, n_components, options, rng)
        return _density_em(first, start, on_draw(sizes[0]))

    fit = _best_of_starts(options.starts(), fit_one, score=lambda f: f.log_likelihood[-1])
    draws = [after_draw(sizes[0], first, fit)]
    for pixels in sizes[1:]:
        sample = _drawn_sample(data, pixels, cumulative, draw_rng)
        start = (fit.weights, sample.centred(fit.means), fit.covariances)
        fit = _density_em(sample, start, on_draw(pixels), jacobian=jacobian)
        draws.append(after_draw(pixels, sample, fit))
        del sample
    del cumulative
    start = (fit.weights, data.centred(fit.means), fit.covariances)
    fit = _density_em(data, start, options, on_iteration, jacobian=jacobian)
    return replace(fit, subsample=draws)


def _draw_sizes(total_pixels, most):
    """Pixels in each draw: most // 16, then DRAW_GROWTH times more while a draw is at most
    `most` and a DRAW_GROWTH-th of all pixels (with Newton's steps, a larger draw costs more
    than the passes over every point it saves)."""
    sizes = [most // 16]
    while sizes[-1] * DRAW_GROWTH <= min(most, total_pixels / DRAW_GROWTH):
        sizes.append(sizes[-1] * DRAW_GROWTH)
    return sizes


def _drawn_sample(data, pixels, cumulative, rng):
    """The points that `pixels` pixels drawn with the counts fall on, each weighted by its
    draws: `cumulative` is the running sum of the counts, a pixel the point whose share of it
    a uniform number falls in.  The numbers are sorted first (the same pixels): searched in
    order, each search starts where the last ended (a tenth of the time of random order)."""
    uniform = np.sort(rng.random(pixels))
    picked = np.searchsorted(cumulative, uniform * cumulative[-1], side="right")
    starts = np.flatnonzero(np.diff(picked, prepend=-1))  # picked is sorted: runs of one point
    points, counts = picked[starts], np.diff(starts, append=len(picked))
    return _PointFeatures(data.values[points], counts.astype(np.float64), data.scale)


def _n_distinct(data):
    """Points with positive weight: the most components the data can hold apart."""
    return int(np.count_nonzero(data.weights > 0))


def _fresh_start(data, n_components, options, rng):
    """theta_0 of a new start (centred): the M-step of options.init's initial responsibilities."""
    stats = _initial_statistics(data, n_components, options.init, rng)
    return _starting_parameters(
        data, n_components, options.covariance_type, options.reg_covar, stats, (None,) * 3
    )


def _starting_parameters(data, n_components, covariance_type, reg_covar, stats, given):
    """theta_0: the M-step of the initial responsibilities, overridden by what the caller gave."""
    weights_init, means_init, covariances_init = given
    if stats is not None:
        # An empty initial cluster starts at the data's own mean and covariance.
        overall = _m_step(
            stats.sum(axis=0, keepdims=True),
            "full",
            reg_covar,
            np.zeros((1, data.n_features)),
            None,
        )
        fallback_cov = COVARIANCE_FROM_SCATTER[covariance_type](
            np.repeat(overall[2] - reg_covar * np.eye(data.n_features), n_components, 0),
            np.ones(n_components),
            reg_covar,
        )
        weights, means, covariances = _m_step(
            stats,
            covariance_type,
            reg_covar,
            np.zeros((n_components, data.n_features)),
            fallback_cov,
        )
    if weights_init is not None:
        weights = np.asarray(weights_init, dtype=np.float64).reshape(n_components)
    if means_init is not None:
        means = data.centred(np.reshape(means_init, (n_components, data.n_features)))
    if covariances_init is not None:
        covariances = np.array(covariances_init, dtype=np.float64)
    return weights, means, covariances


@dataclass(frozen=True, eq=False)
class MixtureState:
    """A mixture's parameters during EM.  e_step(state) -> (the M-step's statistics, the
    objective per pixel) is computed once, when the objective or the statistics are first
    asked for."""

    weights: np.ndarray
    means: np.ndarray
    covariances: np.ndarray
    e_step: object = field(repr=False)
    stoppable = True
    in_place = False

    @cached_property
    def evaluation(self):
        return self.e_step(self)

    @property
    def objective(self):
        return self.evaluation[1]

    @property
    def statistics(self):
        return self.evaluation[0]

    @property
    def n_components(self):
        return len(self.weights)

    @property
    def parameters(self):
        return self.weights, self.means, self.covariances

    def with_parameters(self, parameters):
        weights, means, covariances = parameters
        return replace(self, weights=weights, means=means, covariances=covariances)


def mixture_step(m_step):
    """The EM map of a MixtureState: the new parameters from its E-step's statistics."""
    return lambda state: state.with_parameters(m_step(state))


def run_mixture_em(start, m_step, options, on_iteration=None, jacobian=None):
    """run_em of a MixtureState, accelerated in the coordinates of its covariance type."""
    return run_em(
        start,
        mixture_step(m_step),
        options,
        coordinates=mixture_coordinates(options.covariance_type),
        on_iteration=on_iteration,
        ascent=False,
        jacobian=jacobian,
    )


def mixture_coordinates(covariance_type):
    """Unconstrained real coordinates of a mixture: log-weights (a softmax takes them back to the
    simplex), the means, and the covariances as Cholesky factors with log-diagonals (diagonal
    types: log-variances), so every vector is a valid mixture: SQUAREM may extrapolate anywhere
    without leaving the parameter space."""
    tiny = np.finfo(np.float64).tiny

    def to_vector(state):
        weights, means, covariances = state.parameters
        if covariance_type in ("full", "tied"):
            lower = np.linalg.cholesky(covariances)
            rows, cols = np.tril_indices(lower.shape[-1])
            factors = lower[..., rows, cols]
            factors[..., rows == cols] = np.log(factors[..., rows == cols])
            spread = factors.ravel()
        else:
            spread = np.log(covariances).ravel()
        return np.concatenate([np.log(np.maximum(weights, tiny)), means.ravel(), spread])

    def from_vector(vector, like):
        weights, means, covariances = like.parameters
        n_components, n_features = means.shape
        log_weights = vector[:n_components]
        weights = np.exp(log_weights - log_weights.max())
        weights /= weights.sum()
        means = vector[n_components : n_components * (1 + n_features)].reshape(means.shape)
        spread = vector[n_components * (1 + n_features) :]
        if covariance_type in ("full", "tied"):
            rows, cols = np.tril_indices(n_features)
            factors = spread.reshape(covariances.shape[:-2] + (len(rows),)).copy()
            factors[..., rows == cols] = np.exp(factors[..., rows == cols])
            lower = np.zeros(covariances.shape)
            lower[..., rows, cols] = factors
            covariances = lower @ np.swapaxes(lower, -1, -2)
        else:
            covariances = np.exp(spread).reshape(covariances.shape)
        return like.with_parameters((weights, means, covariances))

    def importance(state):
        """A component's coordinates count by the square root of its weight (as in the Fisher
        metric of the weights): an emptying component's log-weight falls without end, and its
        mean follows a handful of pixels; neither says whether the mixture still moves."""
        root = np.sqrt(state.weights)
        n_components, n_features = state.means.shape
        spread = covariance_parameters(n_components, n_features, covariance_type)
        if covariance_type == "tied":  # one covariance, shared: it counts whole
            spreads = np.ones(spread)
        else:
            spreads = np.repeat(root, spread // n_components)
        return np.concatenate([root, np.repeat(root, n_features), spreads])

    return Coordinates(to_vector, from_vector, importance)


@dataclass(frozen=True)
class Progress:
    """An on_iteration callback that also names the stage of the fit it reports on (a K that
    -k auto tries), for the command line's progress line: report(stage, n_iter,
    log_likelihood).  The API's plain callables get (n_iter, log_likelihood) only."""

    report: object  # callable(stage, n_iter, log_likelihood)
    stage: str = ""

    def __call__(self, n_iter, log_likelihood):
        self.report(self.stage, n_iter, log_likelihood)

    def within(self, stage):
        return replace(self, stage=f"{self.stage}, {stage}" if self.stage else stage)


def staged(on_iteration, stage):
    """on_iteration for a stage of the fit: a Progress names it; any other callback is as is."""
    return on_iteration.within(stage) if isinstance(on_iteration, Progress) else on_iteration


def _density_em(data, start, options, on_iteration=None, kind=DENSITY, jacobian=None):
    """EM of a mixture of that kind (DENSITY, or a PartialVolume: tied) from centred
    parameters start = (weights, means, covariances); with Newton steps first given the EM
    map's Jacobian (NewtonSteps)."""
    e_step, m_step = _density_map(data, options, kind)
    run = run_mixture_em(MixtureState(*start, e_step), m_step, options, on_iteration, jacobian)
    weights, means, covariances = run.state.parameters
    parameters = (weights, data.uncentred(means), covariances)
    return GaussianMixtureFit.of_run(parameters, options.covariance_type, run, kind)


def _density_map(data, options, kind=DENSITY):
    """(e_step, m_step) of the density model's EM on data."""
    covariance_type = options.covariance_type

    def e_step(state):
        """One pass over the points: the moment sums of the responsibilities, and the
        objective: the log-likelihood, and the kind's prior (a MAP fit's; 0 for most)."""
        statistics, log_likelihood = _e_step_statistics(
            data, log_density_coefficients(*state.parameters, covariance_type), options.passes
        )
        return statistics, log_likelihood + kind.log_prior(state.covariances)

    def m_step(state):
        previous = (state.means, state.covariances)
        return kind.m_step(state.statistics, previous, covariance_type, options.reg_covar)

    return e_step, m_step


def _density_jacobian(data, fit, options):
    """The Jacobian of the density model's EM map on data at a fit (means on the 0..1 scale),
    in the mixture's coordinates: len(coordinates) + 1 EM steps on data."""
    e_step, m_step = _density_map(data, options)
    state = MixtureState(fit.weights, data.centred(fit.means), fit.covariances, e_step)
    return em_map_jacobian(
        state, mixture_step(m_step), mixture_coordinates(options.covariance_type)
    )


def _partial_volume_fit(data, tissues, options, on_iteration=None, cortex=None):
    """The partial-volume mixture of a tied mixture of its tissues (numbered by luminance): EM
    from the tissues' means and covariance, every pure Gaussian and mixel weighted alike;
    with grey matter's mean held at cortex where one is given (cortex_refit)."""
    if cortex is not None:
        return cortex_refit(data, tissues, cortex, options, on_iteration)
    pv = partial_volume_kind(tissues.n_components, options)
    return _pv_em(data, pv, tissues.means, tissues.covariances, options, on_iteration)


# --variance-prior auto (--brain's): a variance each tissue on an image, one on a volume.
# Measured on the grid (docs/brain.md): slices gain 0.5 to 0.8 points, volumes neither gain
# nor lose on average, and every clean volume without a field loses 0.4 to 0.6.
TISSUE_VARIANCE_PRIOR = 0.1


def tissue_variance_prior(options, picture=None):
    """FitOptions.variance_prior, auto resolved: TISSUE_VARIANCE_PRIOR on an image (or on
    points of no one picture, a shared model's), None (one variance) on a volume."""
    if options.variance_prior != "auto":
        return options.variance_prior
    return None if picture is not None and picture.volume is not None else TISSUE_VARIANCE_PRIOR


def partial_volume_kind(n_tissues, options):
    """The PartialVolume of n_tissues that options ask for: one covariance, or with
    options.variance_prior a variance each tied by that prior."""
    return tissues_and_mixels(n_tissues, variance_prior=tissue_variance_prior(options))


def _pv_em(data, pv, tissue_means, covariance, options, on_iteration):
    """EM of the partial-volume mixture pv from its tissues' means (T, D) and one covariance
    (their tied fit's), every Gaussian weighted alike; with a variance each, all that one."""
    n_gaussians = len(pv.fractions)
    means = data.centred(pv.fractions @ tissue_means)
    if pv.variance_prior is not None:
        # a variance each, all started at the tied fit's (in colour, its channels' mean)
        covariance = np.full(n_gaussians, float(np.mean(np.diagonal(covariance))))
    options = replace(options, covariance_type=pv.covariance_type)
    start = (np.full(n_gaussians, 1.0 / n_gaussians), means, covariance)
    return _density_em(data, start, options, on_iteration, kind=pv)


# --- the cortex check (--cortex-check, in --brain) ------------------------------------------
# A slice that is mostly grey matter (the cerebellum, a temporal pole, a thick slab at the
# bottom of the brain) has one broad peak and a bright shoulder: three tissues and their mixels
# fit it best with white matter on grey matter's peak, grey matter on CSF's and CSF on the dark
# rim, every label one tissue too bright.  Intensities alone cannot tell (the two fits' log-
# likelihoods differ by hundredths of a nat a pixel); the anatomy can: just inside a skull-
# stripped brain's surface lies the cortex.  Where the fit labels most of that surface, and
# over CORTEX_WHITE_SHARE of the brain, white matter, the mixture is fitted again with grey
# matter's mean held at the surface's commonest intensity and the tissues' means CORTEX_GAP of
# it apart at least (docs/brain.md: chosen on seed 1 of the grid, reported on seed 2).

CORTEX_TISSUE = 1  # grey matter, of CSF, grey and white matter
CORTEX_DEPTH = (3, 6)  # pixels from the black outside: the cortex, inside the edge's mixes
CORTEX_GAP = 0.14  # of the cortex's intensity: the least distance between tissues' means
CORTEX_WHITE_SHARE = 0.6  # of the brain labelled white matter, over: no slice of the grid has
CORTEX_MIN_PIXELS = 100  # fewer at that depth: no check


def surface_ring(picture):
    """(H, W) or (D, H, W) bool: the pixels inside the mask CORTEX_DEPTH steps (4-neighbour, 6
    in a volume) from the black outside it, or from the array's edge."""
    from scipy.ndimage import distance_transform_cdt

    black_outside = np.pad(~picture.mask & (picture.codes == 0), 1, constant_values=True)
    depth = distance_transform_cdt(~black_outside, metric="taxicab")
    depth = depth[(slice(1, -1),) * depth.ndim]
    low, high = CORTEX_DEPTH
    return picture.mask & (depth >= low) & (depth <= high)


def surface_intensity(picture, ring=None):
    """The commonest intensity (0..1) of the surface_ring (or of ring), from its histogram on
    256 levels smoothed by a Gaussian of 8 levels; None with too few pixels there."""
    from scipy.ndimage import gaussian_filter1d

    ring = surface_ring(picture) if ring is None else ring
    if np.count_nonzero(ring) < CORTEX_MIN_PIXELS:
        return None
    levels = np.rint(picture.codes[ring] * (255 / picture.scale)).astype(np.intp)
    histogram = gaussian_filter1d(np.bincount(levels, minlength=256).astype(np.float64), 8)
    return int(np.argmax(histogram)) / 255


def cortex_to_hold(segmentation):
    """Where a masked gray three-tissue partial-volume fit looks one tissue too bright (over
    CORTEX_WHITE_SHARE of the brain and most of its surface_ring labelled white matter): the
    surface's intensity to hold grey matter at (cortex_refit); else None."""
    model, picture = segmentation.model, segmentation.picture
    if (
        model.partial_volume is None
        or model.n_labels != 3
        or model.means.shape[1] != 1
        or picture.mask is None
    ):
        return None
    counts = segmentation.label_counts
    if not counts[2] > CORTEX_WHITE_SHARE * counts.sum():
        return None
    ring = surface_ring(picture)
    if not 2 * np.count_nonzero(segmentation.labels[ring] == 2) > np.count_nonzero(ring):
        return None
    return surface_intensity(picture, ring)


def cortex_refit(data, tissues, cortex, options, on_iteration=None):
    """The partial-volume mixture with grey matter's mean held at the cortex's intensity and
    the neighbours' means CORTEX_GAP x cortex from each other at least (PartialVolume.held,
    min_gap), from the tissues' means moved that far where they are nearer."""
    gap = CORTEX_GAP * cortex
    csf, _, white = tissues.means[:, 0]
    means = np.array([min(csf, cortex - gap), cortex, max(white, cortex + gap)])
    pv = replace(partial_volume_kind(3, options), held=(CORTEX_TISSUE,), min_gap=gap)
    return _pv_em(data, pv, means[:, None], tissues.covariances, options, on_iteration)


def fit_gmm(
    X,
    n_components,
    *,
    sample_weight=None,
    options=None,
    weights_init=None,
    means_init=None,
    covariances_init=None,
    on_iteration=None,
    **overrides,
):
    """Fit a Gaussian mixture to the rows of X by EM.

    Parameters
    ----------
    X : array, shape (n_samples, n_features) or (n_samples,)
        The samples; a 1-D X is one feature.
    n_components : int
        K, the number of Gaussians.
    sample_weight : array, shape (n_samples,), optional
        Multiplies each row's contribution, so distinct values weighted by their counts give
        the same fit as every repeated row.
    options : FitOptions, optional
        How EM runs (covariance_type, max_iter, tol, reg_covar, n_init, init, random_state,
        accelerate, passes); FitOptions() by default.
    **overrides
        FitOptions' fields over options, as keywords: ``fit_gmm(X, 3, tol=1e-6)``.
    weights_init, means_init, covariances_init : arrays, optional
        When all three are given they are the start (scikit-learn's shapes).
    on_iteration : callable, optional
        Called as ``on_iteration(n_iter, log_likelihood)`` after every iteration.

    Returns
    -------
    GaussianMixtureFit
        ``log_likelihood[i]`` is the mean log-likelihood of the model after iteration i + 1.

    Raises
    ------
    ValueError
        Bad arguments, fewer distinct samples than components; ``FitFailed`` (a ValueError)
        where a covariance becomes singular.
    """
    options = replace(FitOptions() if options is None else options, **overrides)
    X = np.asarray(X, dtype=np.float64)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2 or len(X) == 0:
        raise ValueError(
            f"X must be a non-empty (n_samples, n_features) array, got shape {X.shape}"
        )
    if not np.all(np.isfinite(X)):
        raise ValueError("X contains NaN or infinite values")
    weights = (
        np.ones(len(X)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    )
    if (
        weights.shape != (len(X),)
        or np.any(weights < 0)
        or not np.all(np.isfinite(weights))
        or weights.sum() <= 0
    ):
        raise ValueError(
            "sample_weight must be finite, non-negative, positive in sum, one per sample"
        )
    with options.passes.opened() as passes:  # the E-step's threads, started once
        return _fit_data(
            _PointFeatures(X, weights),
            n_components,
            replace(options, passes=passes),
            (weights_init, means_init, covariances_init),
            on_iteration,
        )


# --- 5b. Quantized gray levels ------------------------------------------------
# Pixel values are bins, not points: level v stands for intensities in [v - 1/2, v + 1/2]
# (divided by the top level), and the first and last bins are open to -inf and +inf,
# because a camera clips what falls outside.  The exact likelihood of a pixel is a
# Gaussian's probability of its bin (a difference of normal CDFs), which stays <= 1: no
# component can collapse onto a run of identical values (a black background, blown
# highlights) and grow without bound.  EM for binned, censored data replaces x and x^2 in
# the M-step by their expectations under each component truncated to the bin.  At most
# 256 (or 65536) bins, so it stays cheap.

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _standard_deviations(model):
    """One standard deviation per component, whatever the covariance type (D = 1)."""
    covariances, n_components = model.covariances, model.n_components
    return np.sqrt(
        np.broadcast_to(np.asarray(covariances, dtype=np.float64).reshape(-1), (n_components,))
    )


def _bin_edges(levels, top):
    """Standardisable edges of each level's bin on the 0..1 scale, the end bins open."""
    lower, upper = (levels - 0.5) / top, (levels + 0.5) / top
    return np.where(levels <= 0, -np.inf, lower), np.where(levels >= top, np.inf, upper)


def _log_interval_probability(a, b):
    """log(Phi(b) - Phi(a)) for a < b, accurate in both tails."""
    flip = a > 0  # upper tail: Phi(b) - Phi(a) = Phi(-a) - Phi(-b)
    high, low = np.where(flip, -a, b), np.where(flip, -b, a)
    from scipy.special import log_ndtr

    log_high, log_low = log_ndtr(high), log_ndtr(low)
    with np.errstate(divide="ignore"):
        return log_high + np.log(-np.expm1(log_low - log_high))


def log_bin_probabilities(model, levels, top):
    """(K, M) log(w_k P_k(bin of level)) for levels 0..top."""
    sds = _standard_deviations(model)[:, None]
    lower, upper = _bin_edges(np.asarray(levels, dtype=np.float64), top)
    means = model.means[:, :1]
    return np.log(model.weights)[:, None] + _log_interval_probability(
        (lower - means) / sds, (upper - means) / sds
    )


def _truncated_moments(model, levels, top, log_mass):
    """E[x] and E[x^2] of each component truncated to each level's bin, (K, M) each."""
    sds = _standard_deviations(model)[:, None]
    means = model.means[:, :1]
    lower, upper = _bin_edges(levels, top)
    a, b = (lower - means) / sds, (upper - means) / sds
    with np.errstate(over="ignore", invalid="ignore"):
        pdf_a = np.exp(-0.5 * a * a - _LOG_SQRT_2PI - log_mass)  # phi(a) / Z, 0 at infinity
        pdf_b = np.exp(-0.5 * b * b - _LOG_SQRT_2PI - log_mass)
        first = pdf_a - pdf_b
        second = np.where(np.isfinite(a), a * pdf_a, 0.0) - np.where(np.isfinite(b), b * pdf_b, 0.0)
        mean = means + sds * first
        variance = sds**2 * (1.0 + second - first**2)
    # Where a bin lies far in a component's tail the formulas lose their digits; such bins carry
    # no responsibility from it, and the truncated mean must lie in the bin anyway.
    centre = np.broadcast_to(levels / top, mean.shape)
    mean = np.clip(np.where(np.isfinite(mean), mean, centre), lower, upper)
    variance = np.clip(np.where(np.isfinite(variance), variance, 0.0), 0.0, None)
    return mean, variance + mean**2


def quantized_statistics(model, levels, top, resp, log_probabilities=None):
    """M-step sums [mass, E x, E x^2] of per-level responsibilities resp (K, M), in pixels."""
    if log_probabilities is None:
        log_probabilities = log_bin_probabilities(model, levels, top)
    first, second = _truncated_moments(
        model, levels, top, log_probabilities - np.log(model.weights)[:, None]
    )
    return np.stack(
        [resp.sum(axis=1), (resp * first).sum(axis=1), (resp * second).sum(axis=1)], axis=1
    )


def _quantized_pass(model, levels, counts, top):
    """Log-likelihood per pixel of the current model and the expected statistics of its M-step."""
    logp = log_bin_probabilities(model, levels, top)
    log_total = _logsumexp(logp, axis=0)
    resp = np.exp(logp - log_total) * counts  # (K, M) pixels per component
    return quantized_statistics(model, levels, top, resp, logp), float(
        counts @ log_total / counts.sum()
    )


def quantized_m_step(stats, covariance_type, variance_floor, means, covariances):
    """The M-step of the binned model: exact EM, with a floor on the variances."""
    weights, means, covariances = _m_step(stats, covariance_type, 0.0, means, covariances)
    return weights, means, np.maximum(covariances, variance_floor)


def quantized_variance_floor(reg_covar, top):
    """reg_covar, but never below (a thousandth of a bin)^2: a zero variance has no bins."""
    return max(reg_covar, (1e-3 / top) ** 2)


def fit_quantized_gmm(
    levels, counts, n_components, *, top=255, options=None, on_iteration=None, **overrides
):
    """Fit a mixture to gray levels 0..top as bins (the end bins open), by EM.

    A bin's probability is at most 1, so nothing collapses and no regulariser is needed:
    reg_covar is only a floor on the variances (itself at least a thousandth of a bin squared),
    which keeps a component holding a single level finite and leaves every other step exact EM.

    Parameters
    ----------
    levels : array of int, shape (M,)
        The gray levels present, 0..top.
    counts : array, shape (M,)
        The pixel count of each level.
    n_components : int
        K.
    top : int
        The highest level: 255 for 8-bit, 65535 for 16-bit.
    options, on_iteration, **overrides
        As fit_gmm.

    Returns
    -------
    GaussianMixtureFit
        Means and variances on the 0..1 scale, ``quantized_top == top``; ``log_likelihood``
        holds the mean log-probability of the pixels' bins, which never decreases.
    """
    options = replace(FitOptions() if options is None else options, **overrides)
    return _fit_quantized(
        np.asarray(levels, dtype=np.float64),
        np.asarray(counts, dtype=np.float64),
        n_components,
        top,
        options,
        on_iteration,
    )


def _fit_quantized(levels, counts, n_components, top, options, on_iteration=None):
    data = _PointFeatures(levels, counts, top)
    _check_n_components(n_components, _n_distinct(data))
    rng = np.random.default_rng(options.random_state)
    covariance_type, kind = options.covariance_type, Binned(top)
    floor = quantized_variance_floor(options.reg_covar, top)

    def e_step(state):
        return _quantized_pass(state, levels, counts, top)

    def m_step(state):
        previous = (state.means, state.covariances)
        return kind.m_step(state.statistics, previous, covariance_type, options.reg_covar)

    def fit_one():
        weights, means, covariances = _fresh_start(data, n_components, options, rng)
        start = MixtureState(weights, data.uncentred(means), np.maximum(covariances, floor), e_step)
        run = run_mixture_em(start, m_step, options, on_iteration)
        return GaussianMixtureFit.of_run(run.state.parameters, covariance_type, run, kind)

    return _best_of_starts(options.starts(), fit_one, score=lambda fit: fit.log_likelihood[-1])


def n_parameters(n_components, n_features, covariance_type):
    """Free parameters of a mixture: weights (K - 1), means (K D) and covariances."""
    covariance = covariance_parameters(n_components, n_features, covariance_type)
    return covariance + n_components * n_features + n_components - 1


def covariance_parameters(n_components, n_features, covariance_type):
    """Free parameters of a mixture's covariances."""
    return {
        "full": n_components * n_features * (n_features + 1) // 2,
        "diag": n_components * n_features,
        "spherical": n_components,
        "tied": n_features * (n_features + 1) // 2,
    }[covariance_type]


def bic(model, n_samples, log_likelihood=None):
    """Bayesian information criterion of a fitted model on n_samples pixels (lower is better);
    log_likelihood: its mean per pixel, the fit's own last by default."""
    n_features = model.means.shape[1]
    if log_likelihood is None:
        log_likelihood = model.log_likelihood[-1]
    return -2.0 * log_likelihood * n_samples + n_parameters(
        model.n_components, n_features, model.covariance_type
    ) * math.log(n_samples)


def collapsed_components(model, reg_covar):
    """Components whose variance sits on the reg_covar floor: collapsed onto a single value.

    Its density there grows with 1 / sqrt(reg_covar) and wins the likelihood, so the other
    components are left to fit the rest of the image.  The binned model cannot collapse (a bin's
    probability is at most 1), and a tied covariance is shared by all components.
    """
    if not model.kind.collapses or model.covariance_type == "tied" or reg_covar <= 0:
        return []
    covariances = np.asarray(model.covariances)
    variances = {
        "full": lambda: np.diagonal(covariances, axis1=1, axis2=2).min(axis=1),
        "diag": lambda: covariances.min(axis=1),
        "spherical": lambda: covariances,
    }[model.covariance_type]()
    return [int(k) for k in np.flatnonzero(variances < 2 * reg_covar)]


# ----------------------------------------------------------------------------
# 6. Labels
# ----------------------------------------------------------------------------
# Components are numbered by the luminance of their means, darkest = 0, so the
# numbering does not depend on the order EM happened to find them in.  Each
# distinct value gets its most likely component, and pixels get theirs by lookup.


def luminance(means):
    """BT.601 luma of colour means; the mean itself for gray."""
    means = np.asarray(means)
    return means @ LUMA if means.shape[1] == 3 else means[:, 0]


def _luminance_order(means):
    """The components' order from the darkest mean (stable: equal means keep their order)."""
    return np.argsort(luminance(means), kind="stable")


def _relabelled(labels, order):
    """Labels of components renumbered so that component order[j] becomes j."""
    return np.argsort(order).astype(labels.dtype)[labels]


def _mean_log_likelihood(model, data):
    """The model's mean log-likelihood per pixel of the points (of their bins, when binned)."""
    total = 0.0
    for start, block in log_density_blocks(model, data):
        top = block.max(axis=0)
        lse = np.log(np.exp(block - top).sum(axis=0)) + top  # NumPy's: SciPy is slow to import
        total += data.weights[start : start + block.shape[1]] @ lse
    return float(total / data.total_weight)


def _most_likely(data, model):
    """Index of the most likely label (component, or tissue) of every point, block by block."""
    labels = np.empty(len(data), dtype=np.int64)
    for start, block in log_label_blocks(model, data):
        labels[start : start + block.shape[1]] = np.argmax(block, axis=0)
    return labels


def label_pixels(picture, points, label_of_point, n_components, passes):
    """Label map (H, W): the label of every code, looked up pixel by pixel."""
    lut = np.zeros(picture.n_codes, dtype=np.uint8 if n_components <= 256 else np.uint16)
    lut[points.keys] = label_of_point[points.point_of_key]
    return lookup_codes(picture, lut, passes)


def point_index(picture, points, passes):
    """(H, W) index of every pixel's point, by lookup over the codes, in the smallest unsigned
    type that holds it."""
    lut = np.zeros(picture.n_codes, dtype=np.min_scalar_type(max(len(points.values) - 1, 0)))
    lut[points.keys] = points.point_of_key
    return lookup_codes(picture, lut, passes)


def fit_components(
    data,
    n_components,
    options,
    quantized_top=None,
    on_iteration=None,
    with_partial_volume=False,
    start=None,
    cortex=None,
):
    """K components (at most one per distinct value), numbered by luminance.

    quantized_top: fit gray levels 0..quantized_top as bins (fit_quantized_gmm) instead of points.
    with_partial_volume: K tissues and their mixels (_partial_volume_fit), from the K-component
    fit; cortex: grey matter's mean held there (cortex_refit), or None.
    start: (weights, means, covariances, on the 0..1 scale) to start from instead of fresh
    starts (-k auto's split_start); a binned fit starts fresh.
    """
    k = min(n_components, _n_distinct(data))
    if quantized_top is not None:
        levels = data.values[:, 0].astype(np.float64)
        fit = _fit_quantized(levels, data.weights, k, quantized_top, options, on_iteration)
    elif with_partial_volume:
        tissues = _fit_data(data, k, options)
        tissues = tissues.reordered(_luminance_order(tissues.means))
        fit = _partial_volume_fit(data, tissues, options, on_iteration, cortex)
    elif start is not None:
        fit = _fit_data(data, k, options, given=start, on_iteration=on_iteration)
    else:
        fit = _fit_data(data, k, options, on_iteration=on_iteration)
    return fit.reordered(_luminance_order(fit.label_means))


def gray_level_top(points):
    """The top gray level (255 or 65535) when the points are integer gray levels, else None."""
    if points.mode == "gray" and np.issubdtype(points.values.dtype, np.integer):
        return int(points.scale)
    return None


# --- 6a. Choosing K (-k auto) ------------------------------------------------------------
# BIC alone counts ways to fit an image, not its classes: at a million pixels any departure
# from K Gaussians buys a component (a blurred boundary's mixels, a shading, a clipped spike at
# 0 or 255).  The default criterion, "classes", is BIC among the fits whose every component is
# a class: one that fills regions of the image (region_shares), some of them beyond a blurred
# edge's reach (the deep share: a wide blur's band of mixels fills regions of its own a few
# pixels across, none deeper than BOUNDARY_DEPTH), and has not collapsed onto one value; where
# no fit past K = 1 fills regions, collapse alone judges.  "icl" is BIC plus twice
# the classification entropy (Biernacki, Celeux and Govaert 2000), "bic" the plain BIC.  The
# climb stops once K_TURNED values of K past the best have not improved on it (a K too small
# for its classes, TOO_FEW_REGION_SHARE, not counted among them).  Each K starts from
# the last K's split of its most spread-out component (split_start), and, while that is no
# new best, of each other component, in gray from a component where the histogram most
# exceeds the last K's fit (excess_start: a small class the fit left out, which every split
# and fresh start can miss to a clipped spike) and from fresh starts (only up to K_FRESH_PAST
# past the best: after that, the first split alone; k_starts, in that order); a later split
# counts only where ICL improves on the best too (a class cut in two along a shading fills
# regions, but its halves overlap).
# Where none counts, a K too small for its classes is kept, so that the climb goes on.  The
# fits are capped at K_PROBE_MAX_ITER iterations on many distinct values (EM crawls where
# two components share one class); a new best is fitted on to convergence.  Where the points
# are many and the image large, every K is fitted on one draw of K_PROBE_PIXELS pixels (as a
# single fit starts on draws, _fit_from_a_subsample) and judged on every point, and only the
# chosen K is fitted on every point, from the draw's fit.

K_CRITERIA = ("classes", "bic", "icl")
REGION_SHARE_MIN = 0.5  # a class: half its pixels or more inside its regions (section 6a)
DEEP_SHARE_MIN = 0.03  # and this share or more with no other label within BOUNDARY_DEPTH steps
BOUNDARY_SHARE_MAX = 0.3  # a label at most this share between two others: none lies between
# A K not counted for a label that fills regions too little, but by no less than this share,
# while no label lies between others: classes share a component there (a class split in two
# by noise fills next to none: 0.07 at most on the evaluation's seeds), so K is too small, and
# it does not count towards K_TURNED.
TOO_FEW_REGION_SHARE = 0.1
BOUNDARY_DEPTH = 3  # pixels either side within which "between two other labels" looks
K_TURNED = 2  # values of K past the best with no better score: the climb stops
K_FRESH_PAST = 1  # of those, the ones that get fresh starts too (the split alone after them)
K_PROBE_MAX_ITER = 8  # iterations of a K's first fits before it is judged (a best: fitted on)
K_PROBE_ABOVE = 4096  # distinct values above which those fits are capped (below, EM is cheap)
# and, where the image has at least twice as many pixels, the pixels drawn (with the counts)
# that every K is fitted on: judged on every point, the chosen K then fitted on to convergence
# on every point from the draw's fit
K_PROBE_PIXELS = 1 << 17


def region_shares(labels, n_labels, inside=None, depth=1):
    """(n_labels,) the share of each label's pixels with no other label within depth steps
    (4-neighbour steps in 2-D, 6 in a volume; pixels outside count as the pixel's own): near 1
    for a class that fills regions, low for one that lines the boundaries between others; NaN
    for a label with no pixel.  At depth BOUNDARY_DEPTH (the deep share), a wide blur's band of
    mixels, a few pixels across, has next to none, a class of any size most of its pixels."""
    inside = np.ones(labels.shape, dtype=bool) if inside is None else inside
    interior = _deepened(_interior(labels, inside), inside, depth - 1)
    return _ratio(_counts(labels[interior & inside], n_labels), _counts(labels[inside], n_labels))


def boundary_shares(labels, n_labels, inside=None, depth=BOUNDARY_DEPTH):
    """(n_labels,) the share of each label's pixels that lie between two other labels: along
    some axis, the nearest pixel of another label within depth on one side and the nearest on
    the other side carry two different labels.  A blurred edge's mixels line the boundary
    between the two classes they mix and so lie between them; a class's pixels near its edge
    have their own class on one side.  Pixels outside count as no label."""
    inside = np.ones(labels.shape, dtype=bool) if inside is None else inside
    return _ratio(
        _counts(labels[_between(labels, inside, depth) & inside], n_labels),
        _counts(labels[inside], n_labels),
    )


def share_counts(labels, n_labels, inside=None, passes=Passes(threads=1)):
    """(4, n_labels): each label's pixels in its regions (region_shares), between two others
    (boundary_shares), deep in its regions (region_shares at BOUNDARY_DEPTH), and inside, from
    one count: the numerators and the denominator of the three shares -k auto judges by."""
    every = np.ones(labels.shape, dtype=bool) if inside is None else inside
    interior = _interior(labels, every) & every
    deep = _deepened(interior, every, BOUNDARY_DEPTH - 1)
    between = _between(labels, every, BOUNDARY_DEPTH, passes)
    return _counts_where(labels, inside, (interior, between, deep), n_labels)


def _interior(labels, inside):
    """Where every neighbour inside carries the pixel's own label."""
    interior = np.ones(labels.shape, dtype=bool)
    for ahead, behind in _neighbour_pairs(labels.ndim):
        differs = (labels[ahead] != labels[behind]) & inside[ahead] & inside[behind]
        interior[ahead] &= ~differs
        interior[behind] &= ~differs
    return interior


def _deepened(interior, inside, steps):
    """The pixels of _interior's map with no other label within steps + 1 steps: steps times,
    those whose every neighbour inside is such a pixel too (outside, as in _interior, never
    cuts a pixel off)."""
    for _ in range(steps):
        deeper = interior | ~inside
        for ahead, behind in _neighbour_pairs(interior.ndim):
            deeper[ahead] &= interior[behind] | ~inside[behind]
            deeper[behind] &= interior[ahead] | ~inside[ahead]
        interior = deeper & inside
    return interior


def _neighbour_pairs(ndim):
    """(ahead, behind) for each axis: the index tuples of every pixel and of its neighbour
    before it along that axis."""
    pairs = []
    for axis in range(ndim):
        ahead = [slice(None)] * ndim
        behind = [slice(None)] * ndim
        ahead[axis], behind[axis] = slice(1, None), slice(None, -1)
        pairs.append((tuple(ahead), tuple(behind)))
    return pairs


def _between(labels, inside, depth, passes=Passes(threads=1)):
    """Where a pixel lies between two other labels (boundary_shares), each axis a task of
    passes."""
    codes = labels.astype(np.int8 if labels.max(initial=0) < 127 else np.int32)
    masked = not inside.all()
    if masked:
        codes[~inside] = -1

    def along(axis):
        sides = [_nearest_other(codes, axis, step, depth, masked) for step in (1, -1)]
        return (sides[0] >= 0) & (sides[1] >= 0) & (sides[0] != sides[1])

    between = np.zeros(codes.shape, dtype=bool)
    for part in passes.map(along, list(range(codes.ndim))):
        between |= part
    return between


def _counts(labels, n_labels):
    return np.bincount(labels.ravel(), minlength=n_labels)[:n_labels]


def _counts_where(labels, inside, maps, n_labels):
    """(len(maps) + 1, n_labels): each label's pixels inside (None: every pixel) where each of
    maps (bool, at most 7) holds, and its pixels inside, from one count of the labels and the
    maps' bits."""
    n_keys = n_labels << len(maps)
    key = labels.astype(np.uint16 if n_keys <= 1 << 16 else np.intp) << len(maps)
    for bit, where in enumerate(maps):
        key += where.view(np.uint8) << bit
    table = _counts(key if inside is None else key[inside], n_keys)
    table = table.reshape(n_labels, 1 << len(maps))
    bits = np.arange(1 << len(maps))
    parts = [table[:, (bits >> b) & 1 == 1].sum(axis=1) for b in range(len(maps))]
    return np.stack(parts + [table.sum(axis=1)])


def _ratio(part, whole):
    """part / whole, NaN where whole is 0 (a label with no pixel)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return part / whole


def _nearest_other(codes, axis, step, depth, masked=True):
    """The label of the nearest pixel within depth along axis (step +1 or -1) whose label is
    another than the pixel's own (-1: none); masked: codes has -1 (outside) to pass over.
    From the farthest distance in, each nearer one's label written over the farther's, by
    arithmetic (found += other x (there - found), exact in the codes' wrapping integers):
    a masked copy costs ten times as much where many pixels see another label."""
    found = np.full(codes.shape, -1, dtype=codes.dtype)
    for distance in range(depth, 0, -1):
        source = [slice(None)] * codes.ndim
        target = [slice(None)] * codes.ndim
        if step > 0:
            source[axis], target[axis] = slice(distance, None), slice(None, -distance)
        else:
            source[axis], target[axis] = slice(None, -distance), slice(distance, None)
        there, here = codes[tuple(source)], found[tuple(target)]  # views: pixel, its neighbour
        other = there != codes[tuple(target)]
        if masked:
            other &= there >= 0
        change = there - here
        change *= other
        here += change
    return found


def log_likelihood_and_entropy(model, data):
    """(the model's mean log-likelihood per pixel of the points, -sum over points of weight x
    sum_k tau_k log tau_k: the classification entropy, ICL's charge for overlapping labels), in
    one pass: the labels' log-sum-exp is the points' log-likelihood."""
    total = entropy = 0.0
    for start, block in log_label_blocks(model, data):
        top = block.max(axis=0)
        block = block - top  # NumPy's log-sum-exp, as _mean_log_likelihood's
        tau = np.exp(block)
        sums = tau.sum(axis=0)
        log_sums = np.log(sums)
        tau /= sums
        weights = data.weights[start : start + block.shape[1]]
        total += weights @ (log_sums + top)
        entropy -= float(weights @ np.sum(tau * (block - log_sums), axis=0))
    return float(total / data.total_weight), entropy


def split_order(model):
    """A K-component fit's components, the most spread out (weight x the geometric mean of its
    variances) first: the order -k auto splits them in."""
    d = model.means.shape[1]
    full = full_covariances(model.covariances, model.covariance_type, model.n_components, d)
    spread = model.weights * np.exp(np.linalg.slogdet(full)[1] / d)
    return [int(j) for j in np.argsort(-spread, kind="stable")]


def split_start(model, j=None):
    """(weights, means, covariances) of K + 1 components from a K-component fit: component j
    (by default the most spread out, split_order's first) split in two along its widest axis,
    its means half a standard deviation either side, each with half its weight."""
    d = model.means.shape[1]
    full = full_covariances(model.covariances, model.covariance_type, model.n_components, d)
    j = split_order(model)[0] if j is None else j
    values, vectors = np.linalg.eigh(full[j])
    step = 0.5 * math.sqrt(max(values[-1], 0.0)) * vectors[:, -1]
    means = np.vstack([model.means, model.means[j] + step])
    means[j] -= step
    weights = np.append(model.weights, model.weights[j] / 2)
    weights[j] /= 2
    covariances = np.asarray(model.covariances)
    if model.covariance_type != "tied":
        covariances = np.concatenate([covariances, covariances[j : j + 1]])
    return weights, means, covariances


def excess_start(model, data, n_bins=256):
    """(weights, means, covariances) of K + 1 components from a K-component fit to gray
    points: a new component where the histogram most exceeds the fit (greedy EM: Verbeek,
    Vlassis and Krose, Neural Computation 15, 2003), or None where it nowhere does.  The
    points are counted in n_bins bins between their least and largest values, each bin
    against the fit's expected count there; each run of bins that exceed the fit is scored
    by its Poisson deviance, 2 sum (o log(o / e) - (o - e)), the likelihood a component there
    could gain, so that a small class far from the fit's components outranks the excess at
    a large class's peak.  The two end bins are left out (clipping piles a tail up there,
    which no Gaussian class explains).  The new component has the best run's excess: its
    share of the points, and its excess's mean and variance."""
    x = data.values[:, 0] / data.scale
    low, high = float(x.min()), float(x.max())
    n_bins = min(n_bins, _n_distinct(data))
    if n_bins < 3 or high <= low:
        return None
    width = (high - low) / (n_bins - 1)
    centres = low + width * np.arange(n_bins)
    index = np.clip(np.rint((x - low) / width).astype(np.intp), 0, n_bins - 1)
    observed = np.bincount(index, weights=data.weights, minlength=n_bins)
    from scipy.special import ndtr

    edges = low - width / 2 + width * np.arange(n_bins + 1)
    sds = _standard_deviations(model)[:, None]
    mass = np.diff(ndtr((edges - model.means[:, :1]) / sds), axis=1)  # (K, bins)
    expected = data.total_weight * (model.weights @ mass)
    expected = np.maximum(expected, 1.0)  # less than a point counts as one: no lone outlier
    exceeds = observed > expected
    exceeds[[0, -1]] = False
    best, best_deviance = None, 0.0
    for run in np.split(np.arange(n_bins), np.flatnonzero(np.diff(exceeds)) + 1):
        if not exceeds[run[0]]:
            continue
        o, e = observed[run], expected[run]
        deviance = 2 * float(np.sum(o * (np.log(o) - np.log(e)) - (o - e)))
        if deviance > best_deviance:
            best, best_deviance = run, deviance
    if best is None:
        return None
    excess = observed[best] - expected[best]
    share = min(float(excess.sum()) / data.total_weight, 0.5)
    mean = float(excess @ centres[best] / excess.sum())
    variance = max(float(excess @ (centres[best] - mean) ** 2 / excess.sum()), width**2)
    weights = np.append(model.weights * (1 - share), share)
    means = np.vstack([model.means, [[mean]]])
    covariances = np.asarray(model.covariances)
    if model.covariance_type != "tied":
        covariances = np.concatenate([covariances, np.full((1,) + covariances.shape[1:], variance)])
    return weights, means, covariances


def full_covariances(covariances, covariance_type, n_components, n_features):
    """(K, D, D) covariance matrices of any covariance type."""
    covariances = np.asarray(covariances, dtype=np.float64)
    if covariance_type == "full":
        return covariances
    if covariance_type == "tied":
        return np.broadcast_to(covariances, (n_components, n_features, n_features))
    if covariance_type == "diag":
        return covariances[:, :, None] * np.eye(n_features)
    return covariances[:, None, None] * np.eye(n_features)


@dataclass(frozen=True)
class KSearch:
    """-k auto's record: the criterion, every K tried (rows of k, bic, icl, log_likelihood,
    collapsed, region_share: the least of its components', boundary_share: the largest,
    deep_share: the least, counted: a candidate of the criterion, too_few: not counted for
    classes sharing a component (TOO_FEW_REGION_SHARE: no turn), iterations, capped: judged
    after K_PROBE_MAX_ITER iterations), the K chosen, the largest it might have tried, why the
    climb stopped, whether it looked at where the labels fall, and the pixels drawn that every
    K was fitted on (None: every point)."""

    criterion: str
    rows: list
    chosen: int
    stopped: str
    k_max: int
    regions: bool = True  # "classes" looked at where the labels fall (False: collapse alone)
    drawn: int | None = None  # the K's fits were on a draw of this many pixels (K_PROBE_PIXELS)

    def record(self):
        return {
            "criterion": self.criterion,
            "chosen": self.chosen,
            "k_max": self.k_max,
            "stopped": self.stopped,
            "regions": self.regions,
            "drawn": self.drawn,
        }


def select_components(
    fit_k, data, k_max, criterion="classes", shares_of=None, reg_covar=0.0, drawn=None
):
    """K in 1..k_max by the criterion (one of K_CRITERIA, as SegmentOptions checks it): (model,
    KSearch).

    fit_k(k, start=None, max_iter=None, every_point=False) fits K components from start alone
    (the last K's split_start, or a capped fit to go on with) or from fresh starts, at most
    max_iter iterations, on a draw of `drawn` pixels (probe_sample) unless every_point or
    drawn is None; every fit is judged on data, every point: shares_of(model) the region,
    boundary and deep shares of its labels on the image (region_shares_of), or None where
    there is no image (a pooled batch): "classes" then judges by collapse alone.  Fitted on a
    draw, the chosen K is fitted on to convergence on every point from the draw's fit and
    judged again (its row is that fit's)."""
    model, search = _climb(fit_k, data, k_max, criterion, shares_of, reg_covar, drawn)
    if search.chosen == 1 and shares_of is not None and len(search.rows) > 1:
        if not search.rows[1]["collapsed"]:  # K = 2 failed only for where its labels fall
            model, search = _climb(fit_k, data, k_max, criterion, None, reg_covar, drawn)
            stopped = f"{search.stopped}; no fit's classes filled regions: judged by collapse"
            search = replace(search, stopped=stopped, regions=False)
    if drawn is not None:
        k = search.chosen
        start = (model.weights, model.means, model.covariances)
        model = fit_k(k, start=start, every_point=True)
        shares = shares_of if search.regions else None
        row, _ = _judged(model, k, data, criterion, shares, reg_covar, model.log_likelihood[-1])
        rows = search.rows[: k - 1] + [{**row, "capped": False}] + search.rows[k:]
        search = replace(search, rows=rows)
    return model, search


def _climb(fit_k, data, k_max, criterion, shares_of, reg_covar, drawn):
    """select_components' climb over K, with shares_of or without."""
    rows, scores, fits, best = [], [], {}, 1
    stopped = f"every K up to {k_max} was tried"
    cap = K_PROBE_MAX_ITER if len(data) > K_PROBE_ABOVE else None  # where EM is costly

    def new_best(candidates):
        return min(candidate[0] for candidate in candidates) < scores[best - 1]

    for k in range(1, k_max + 1):

        def judged(fit, k=k, icl_below=math.inf):  # (score; then, none counted, a K too
            # small for its classes; then the better log-likelihood first; row, fit)
            own = fit.log_likelihood[-1] if drawn is None else None  # a draw's: on data
            row, score = _judged(fit, k, data, criterion, shares_of, reg_covar, own)
            if criterion == "classes" and row["counted"] and not row["icl"] < icl_below:
                row["counted"], score = False, math.inf
            return score, not row["too_few"], -row["log_likelihood"], row, fit

        if k == 1:
            candidates = [judged(fit_k(1))]
        else:  # the starts from the last K in turn (k_starts), capped, until a new best
            bar = rows[best - 1]["icl"]  # what a later start's ICL must be under to count
            every = bar if data.n_features > 1 else math.inf  # in colour, every start's
            searching = k - best <= K_FRESH_PAST
            candidates = []
            for start, icl_below in k_starts(fits[k - 1], data, searching, bar, every):
                candidates.append(judged(fit_k(k, start=start, max_iter=cap), icl_below=icl_below))
                if new_best(candidates):
                    break
        score, _, _, row, model = min(candidates, key=lambda candidate: candidate[:3])
        if k > 1 and score < scores[best - 1] and not model.converged:  # a best: fitted on
            start = (model.weights, model.means, model.covariances)
            score, _, _, row, model = judged(fit_k(k, start=start), icl_below=every)
        row["capped"] = cap is not None and not model.converged and model.n_iter >= cap
        fits[k] = model
        rows.append(row)
        scores.append(score)
        if score < scores[best - 1]:
            best = k
        if sum(not row["too_few"] for row in rows[best:]) >= K_TURNED:
            stopped = f"no better score in the {K_TURNED} values of K past {best}"
            break
    search = KSearch(criterion, rows, best, stopped, k_max, shares_of is not None, drawn)
    return fits[best], search


def k_starts(previous, data, searching, bar, every):
    """-k auto's starts of K components from the last K's fit, in the order they are tried,
    each with the ICL its fit must be under to count (math.inf: BIC alone): the split of the
    most spread-out component (split_start); while searching (K at most K_FRESH_PAST past the
    best), the other components' splits, in gray a component where the histogram most exceeds
    the fit (excess_start), and a fresh start (None).  The first split must be under every,
    the later starts but the fresh one under bar, the best's ICL (a class cut in two along a
    shading fills regions, but its halves overlap); every is bar in colour, where classes of
    distinct colours barely overlap, so that a new class ICL charges is a class cut in two."""
    for n, j in enumerate(split_order(previous)[: None if searching else 1]):
        yield split_start(previous, j), bar if n else every
    if not searching:
        return
    if data.n_features == 1:
        greedy = excess_start(previous, data)
        if greedy is not None:
            yield greedy, bar
    yield None, every


def _judged(model, k, data, criterion, shares_of, reg_covar, log_likelihood=None):
    """(row of the KSearch table, the criterion's score: lower is better, inf: not counted),
    log_likelihood the model's mean on data (None: a fit on a draw, computed on data)."""
    on_data, entropy = log_likelihood_and_entropy(model, data)
    log_likelihood = on_data if log_likelihood is None else log_likelihood
    score_bic = bic(model, data.total_weight, log_likelihood)
    icl = score_bic + 2 * entropy
    collapsed = collapsed_components(model, reg_covar) if _n_distinct(data) > k else []
    shares = None if shares_of is None or k == 1 else shares_of(model)
    least = most = deepest = None
    if shares is not None:
        region, deep = np.nan_to_num(shares[0], nan=0.0), np.nan_to_num(shares[2], nan=0.0)
        boundary = np.nan_to_num(shares[1], nan=1.0)  # a label with no pixel: all between
        least, most, deepest = float(region.min()), float(boundary.max()), float(deep.min())
    counted = criterion != "classes" or (
        not collapsed
        and (least is None or (least >= REGION_SHARE_MIN and deepest >= DEEP_SHARE_MIN))
    )
    score = {"bic": score_bic, "icl": icl, "classes": score_bic}[criterion]
    row = {
        "k": k,
        "bic": score_bic,
        "icl": icl,
        "log_likelihood": log_likelihood,
        "collapsed": collapsed,
        "region_share": least,
        "boundary_share": most,
        "deep_share": deepest,
        "counted": counted,
        "too_few": bool(
            not counted
            and not collapsed
            and least is not None
            and TOO_FEW_REGION_SHARE <= least < REGION_SHARE_MIN
            and most <= BOUNDARY_SHARE_MAX
        ),
        "iterations": model.n_iter,
    }
    return row, score if counted else math.inf


# --- 6b. A spatial prior (--spatial BETA) -------------------------------------
# A per-pixel mixture labels each pixel alone, so on a noisy image it can never beat the
# per-pixel Bayes limit.  Neighbouring pixels usually belong together: a Potts prior adds
# BETA for every pair of 4-neighbours with the same label.  The fit is hidden Markov random
# field EM with a mean-field E-step (Zhang, Brady and Smith, IEEE TMI 2001; FSL's FAST),
# started from the plain mixture.  It maximises the mean-field objective
#     L(q, theta) = sum_i sum_k q_ik (log w_k p(x_i | k) - log q_ik)
#                   + BETA sum_(i~j) sum_k q_ik q_jk,
# the prior's partition function left out.  The E-step updates the two colours of a
# checkerboard in turn: no two pixels of one colour are neighbours, so each half-sweep sets
# q_i = softmax_k(a_i), a_i = log w_k p(x_i | k) + BETA * (sum of the neighbours' q_jk),
# exactly, and L never decreases.  Each colour is two stride-2 sub-lattices reached through
# strided views, and a sweep goes through the image in row bands (Passes), so its temporaries
# stay in cache: the only per-pixel arrays are q (K float32 a pixel) and the point of every
# pixel.  docs/method.md has the whole story; in short:
#
# * Over-relaxation.  A site's share of L, its neighbours fixed, is lse(a_i) - KL(q_i || q*_i):
#   any q_i nearer q*_i in KL than the last one gains.  So every site moves to
#   q_i + w (q*_i - q_i) where that is nearer, and to q*_i where not; w follows the best w
#   that the observed rate of the gains implies (adaptive SOR), up to max_over_relaxation.
# * L comes out of the sweep: each site adds its entropy as it is set, the pairs are summed as
#   the white sites are set, and the expected log-likelihood is q summed per distinct value
#   times the points' log-probabilities in float64 (exact for any theta).
# * Partial sweeps.  Once the shapes are settled a sweep changes little but the sites along
#   boundaries that still move; the next sweep updates only the sites near the last moves, and
#   carries L forward exactly.  Resting sites do not follow theta, so every site is swept at
#   least every full_sweep_every iterations, and only sweeps of every site count for the
#   stopping rule (MeanField.stoppable).
# * Coarse to fine.  A grid larger than coarsest_grid_pixels starts from the fit of its 2 x 2
#   subsampled grid, copied to each 2 x 2 block.


@dataclass(frozen=True)
class SpatialSettings:
    """How the spatial fit works its way through an image.  None of these changes what it
    maximises; they set how fast it gets there (the defaults measured: docs/method.md)."""

    coarsest_grid_pixels: int = 1 << 18  # start on a grid subsampled to at most this many pixels
    max_over_relaxation: float = 1.9  # the largest step of a site towards its update (1: plain)
    relaxation_gain: float = 1e-6  # over-relax a site only where that gains more than float32 errs
    active_change: float = 1e-3  # a site that moved less than this rests until a neighbour moves
    max_active_fraction: float = 0.2  # partial sweeps only while fewer sites are near a move
    full_sweep_every: int = 20  # every site is swept at least every this many iterations
    partial_chunk: int = 1 << 14  # sites a block in a partial sweep
    partial_batch: int = 1 << 18  # its changes kept (K float64 a site) before adding them up
    estimate_pixels: int = 1 << 20  # BETA "auto" is estimated on a central window this large
    most_beta: float = 4.0  # ... and at most this
    beta_halvings: int = 6  # halved at most this often while a component ends with no pixels


CHECKERBOARD = (((0, 0), (1, 1)), ((0, 1), (1, 0)))  # (row, col) parities: black, then white


@dataclass(frozen=True)
class Plane:
    """An image's grid: each site's 4 neighbours, of weight 1.  A grid is what the sweep's
    neighbour helpers ask about neighbours (this class's methods and Stack's, a volume's):
    2-D and stacked 3-D are two small types, not a branch in every helper."""

    crops_to_mask = False  # an image's fits run on the whole image (their bits are those)

    def neighbour_sum(self, padded, box):
        """(K, h, w): the neighbours' q summed at the sites padded[:, r0:r1:2, c0:c1:2], box =
        (r0, r1, c0, c1) in padded (q inside a border of zeros)."""
        r0, r1, c0, c1 = box
        total = padded[:, r0 - 1 : r1 - 1 : 2, c0:c1:2] + padded[:, r0 + 1 : r1 + 1 : 2, c0:c1:2]
        total += padded[:, r0:r1:2, c0 - 1 : c1 - 1 : 2]
        total += padded[:, r0:r1:2, c0 + 1 : c1 + 1 : 2]
        return total

    def flat_neighbour_sum(self, flat, at, width):
        """(K, n): the same at the sites `at` of padded flattened, (K, (H + 2) (W + 2)), W the
        grid's width."""
        total = np.take(flat, at - 1, axis=1) + np.take(flat, at + 1, axis=1)
        total += np.take(flat, at - width - 2, axis=1)
        total += np.take(flat, at + width + 2, axis=1)
        return total

    def pair_sum(self, padded, top, bottom):
        """sum of q_i . q_j over the neighbour pairs whose first site (above, or left) is in the
        grid's rows top:bottom, float64."""
        q = padded[:, top + 1 : bottom + 1, 1:-1]
        below = padded[:, top + 2 : bottom + 2, 1:-1]  # the last row's is the zero border
        pairs = np.sum(q * below, dtype=np.float64)
        pairs += np.sum(q[:, :, 1:] * q[:, :, :-1], dtype=np.float64)
        return pairs

    def swept_bands(self, passes, height, width, n_components):
        """The row bands a pass over q goes through: every row."""
        return passes.bands(height, width, n_components)

    def far_steps(self, width):
        """Steps (in image-flat sites) to the neighbours other than the 4 of a plane: none."""
        return ()

    def dilate(self, moved, inside, passes):
        """moved |= its neighbours, &= inside (or None), in place (_dilate_rows)."""
        _dilate_rows(moved, inside, passes)

    def n_sites(self, shape):
        """The sites of the grid of a fit whose (stacked) image has this shape."""
        return shape[0] * shape[1]

    def record(self, shape, run):
        """The CoarserGrid record of a run on this grid (of that shape)."""
        return CoarserGrid(*shape, run.n_iter, run.converged)

    def copy_coarser(self, q, coarse_q, passes):
        """q (K, H, W) = the q of the grid of every other row and column, on each 2 x 2 block."""
        _copy_to_blocks(q, coarse_q, passes)

    # Its layout (Stack's lays a volume out as one image): the image is the grid.

    held_table = False  # BiasMeanField.held computes the sites' log-probabilities in each sweep

    def coarser(self):
        return self

    def subsampled(self, image, fill=0):
        """An image (..., H, W) of the grid on the grid of every other row and column."""
        return np.ascontiguousarray(image[..., ::2, ::2])

    def stacked(self, image, fill=0):
        """The grid's image of the caller's array: itself."""
        return image

    def stacked_mask(self, mask):
        """The grid's mask of the caller's (None: every pixel): itself."""
        return mask

    def volume_view(self, image):
        """The image as the caller's array: itself."""
        return image

    def row_powers(self, grid_rows, step, shape, degree):
        """(h, degree + 1) powers of the scaled image coordinate of the grid's rows grid_rows
        (every step-th row of an image of this shape)."""
        return coordinate_powers(grid_rows * step, shape[0], degree)

    def window(self, shape, most):
        """(rows, cols): the central window of at most `most` sites that BETA is estimated on."""
        return _central_window(shape, most)

    def window_view(self, q, inside):
        """(q, inside, neighbour weights) of the window as estimate_beta reads them."""
        return q, inside, None


PLANE = Plane()


def grid_of(shape, spacing=None):
    """The grid of an array of this shape: PLANE for an image's (H, W), a Stack for a volume's
    (D, H, W), its neighbours weighted by its spacing (None: 1 mm on every axis)."""
    return PLANE if len(shape) == 2 else Stack.of(shape, spacing or (1.0, 1.0, 1.0))


@dataclass(frozen=True)
class Stack:
    """A volume (D, H, W) laid out as one image, so that the 2-D sweep serves it: its slices
    one under another, each followed by empty rows (outside every mask) that make a slice's
    block of rows odd, so that a voxel and its neighbours in the next slice, a block away, have
    opposite colours on the checkerboard; and an empty block above and below, so that every
    slice has one on each side.  The sweeps go through the rows of the slices' blocks.
    Neighbours count with weights (slices, rows, columns): the finest spacing's 1, a coarser
    axis's its spacing's inverse in those units (its neighbours are farther away)."""

    shape: tuple  # (D, H, W)
    weights: tuple = (1.0, 1.0, 1.0)
    crops_to_mask = True  # a brain fills half a scan's box and a fifth of its voxels (_mask_box)

    @classmethod
    def of(cls, shape, spacing):
        finest = min(spacing)
        return cls(tuple(shape), tuple(finest / step for step in spacing))

    @property
    def block(self):
        """Rows of one slice and its separator: odd."""
        return self.shape[1] + (1 if self.shape[1] % 2 == 0 else 2)

    @property
    def image_shape(self):
        return ((self.shape[0] + 2) * self.block, self.shape[2])

    @property
    def swept_rows(self):
        """(first, stop): the rows a sweep goes through, those of the slices' blocks."""
        return self.block, (self.shape[0] + 1) * self.block

    def stacked(self, volume, fill=0):
        """The stacked image (..., rows, W) of a (..., D, H, W) array, fill between slices."""
        lead = volume.shape[:-3]
        out = np.full(lead + self.image_shape, fill, dtype=volume.dtype)
        self.volume_view(out)[...] = volume
        return out

    def stacked_mask(self, mask):
        """The stacked mask of a (D, H, W) one (None: every voxel): the rows between slices
        outside."""
        return self.stacked(np.ones(self.shape, bool) if mask is None else mask, False)

    def volume_view(self, image):
        """The (..., D, H, W) view of the voxels in a stacked image (..., rows, W)."""
        depth, height, width = self.shape
        blocks = image.reshape(image.shape[:-2] + (depth + 2, self.block, width))
        return blocks[..., 1 : depth + 1, :height, :]

    def coarser(self):
        return replace(self, shape=tuple(-(-n // 2) for n in self.shape))

    # The grid's methods (Plane's): 6 neighbours, weighted; the next slice's a block away.

    def neighbour_sum(self, padded, box):
        offsets = ((self.block, 0), (1, 0), (0, 1))  # slices, rows, columns
        return _weighted_neighbours(padded, box, offsets, self.weights)

    def flat_neighbour_sum(self, flat, at, width):
        steps = (self.block * (width + 2), width + 2, 1)  # slices, rows, columns
        total = None
        for step, weight in zip(steps, self.weights):
            pair = np.take(flat, at - step, axis=1) + np.take(flat, at + step, axis=1)
            if weight != 1.0:
                pair *= np.float32(weight)
            total = pair if total is None else total + pair
        return total

    def pair_sum(self, padded, top, bottom):
        w_slices, w_rows, w_cols = self.weights
        q = padded[:, top + 1 : bottom + 1, 1:-1]
        below = padded[:, top + 2 : bottom + 2, 1:-1]
        next_slice = padded[:, top + 1 + self.block : bottom + 1 + self.block, 1:-1]
        pairs = w_rows * np.sum(q * below, dtype=np.float64)
        pairs += w_cols * np.sum(q[:, :, 1:] * q[:, :, :-1], dtype=np.float64)
        pairs += w_slices * np.sum(q * next_slice, dtype=np.float64)
        return pairs

    def swept_bands(self, passes, height, width, n_components):
        """The slices' blocks (each band's top odd there, so that the checkerboard's colours are
        one for all)."""
        first, stop = self.swept_rows
        return [
            (top + first, bottom + first)
            for top, bottom in passes.bands(stop - first, width, n_components)
        ]

    def far_steps(self, width):
        return (self.block * width,)  # a slice's voxels: both neighbouring blocks exist

    def n_sites(self, shape):
        return math.prod(self.shape)  # the voxels: not the separators of the stacked image

    def record(self, shape, run):
        slices, rows, cols = self.shape
        return CoarserGrid(rows, cols, run.n_iter, run.converged, slices)

    def copy_coarser(self, q, coarse_q, passes):
        """Each voxel's q from the coarser stack's (every other slice, row and column)."""
        _copy_to_cubes(self.volume_view(q), self.coarser().volume_view(coarse_q))

    held_table = True  # BiasMeanField.held tabulates the sites' log-probabilities once

    def subsampled(self, image, fill=0):
        """A stacked image on the coarser stack (every other slice, row and column)."""
        return self.coarser().stacked(self.volume_view(image)[..., ::2, ::2, ::2], fill)

    def row_powers(self, grid_rows, step, shape, degree):
        """(h, (degree + 1)^2): u^a v^b of each row's slice and row within it (a separator row's
        as its slice's last row: it is outside)."""
        slices, within = np.divmod(grid_rows, self.block)
        within = np.minimum(within, self.shape[1] - 1)
        slices = np.clip(slices - 1, 0, self.shape[0] - 1)
        return _row_features(
            coordinate_powers(slices * step, shape[0], degree),
            coordinate_powers(within * step, shape[1], degree),
        )

    def window(self, shape, most):
        """Whole central slices, as many as `most` sites hold (one at least)."""
        depth, height, width = self.shape
        n = min(depth, max(1, most // (height * width)))
        first = (1 + (depth - n) // 2) * self.block
        return slice(first, first + n * self.block), slice(0, width)

    def window_view(self, q, inside):
        n = q.shape[1] // self.block
        window = replace(self, shape=(n,) + self.shape[1:])
        q = window.volume_view(np.pad(q, ((0, 0), (self.block, self.block), (0, 0))))
        inside = window.volume_view(np.pad(inside, ((self.block, self.block), (0, 0))))
        return q, inside, self.weights

    def dilate(self, moved, inside, passes):
        """Across slices a block away: the rows' dilation, then the blocks' from a copy."""
        original, block = moved.copy(), self.block
        _dilate_rows(moved, None, passes)
        moved[block:] |= original[:-block]
        moved[:-block] |= original[block:]
        if inside is not None:
            moved &= inside


@dataclass(frozen=True)
class SpatialFit:
    """The record of a spatial fit, as the JSON keeps it: the objective per pixel after each
    iteration of the full-size grid, its EM steps and sweeps of every site, and the iterations
    of the coarser grids it started from, coarsest first."""

    beta: float
    objective: list
    n_iter: int
    converged: bool
    em_steps: int
    full_sweeps: int
    coarser_grids: list  # of CoarserGrid
    beta_estimate: float | None = None  # with BETA "auto": the pseudo-likelihood estimate
    partial_sweeps: list = field(default_factory=list)  # iterations that swept some sites

    def to_json(self):
        record = asdict(self)
        for grid in record["coarser_grids"]:
            if grid["depth"] is None:  # an image's
                del grid["depth"]
        return record


@dataclass(frozen=True)
class CoarserGrid:
    height: int
    width: int
    n_iter: int
    converged: bool
    depth: int | None = None  # a volume's slices


def _site_update(old, neighbours, logp, beta, relaxation, settings):
    """The over-relaxed mean-field update of independent sites (no two of them neighbours):
    q + relaxation (q* - q) where that is nearer q* in KL, else the plain q*.

    old, neighbours (their q summed) and logp (log w p(x)) are (K, ...) float32; logp is
    overwritten.  Returns the new q and its log (floored at the smallest normal float32).
    """
    logits = logp
    logits += neighbours * beta
    target = _softmax_over_components(logits)  # q*, the plain update
    tiny = np.finfo(np.float32).tiny
    log_target = np.log(np.maximum(target, tiny))
    if relaxation == 1.0:
        return target, log_target
    relaxed = target - old
    relaxed *= relaxation
    relaxed += old  # on the simplex to round-off: w - 1 < 1 shrinks what it carries over
    log_relaxed = np.log(np.maximum(relaxed, tiny))
    gap_old = np.sum(old * (np.log(np.maximum(old, tiny)) - log_target), axis=0)
    gap = np.sum(relaxed * (log_relaxed - log_target), axis=0)
    better = (gap <= gap_old - settings.relaxation_gain) & (relaxed.min(axis=0) >= 0)
    return np.where(better, relaxed, target), np.where(better, log_relaxed, log_target)


def _entropy(q, log_q):
    """-sum q log q of (K, ...) float32 q, summed in float64."""
    return -float(np.sum(q * log_q, dtype=np.float64))


def _moved(new, old, settings):
    """(...) bool: the sites whose q moved by more than active_change in some component."""
    return np.abs(new - old).max(axis=0) > settings.active_change


@dataclass(frozen=True)
class Sweep:
    """What a checkerboard sweep needs besides q: BETA, the sites' log-probabilities
    site_logp(rows, cols) -> (K, h, w) (rows, cols: slices of the image), the mask, the
    over-relaxation, and where to mark the sites that moved ((H, W) bool, or None)."""

    beta: float
    site_logp: object
    passes: Passes  # the fit's: its threads (a batch's worker: one)
    inside: np.ndarray | None = None
    relaxation: float = 1.0
    moved: np.ndarray | None = None
    settings: SpatialSettings = SpatialSettings()
    grid: Plane | Stack = PLANE  # whose neighbours the sites have


def _weighted_neighbours(padded, box, offsets, weights):
    """sum over the axes of weight x (the q one step back + one step forward) of the sites
    padded[:, r0:r1:2, c0:c1:2], box = (r0, r1, c0, c1), offsets (row, column) steps."""
    r0, r1, c0, c1 = box
    total = None
    for (dr, dc), weight in zip(offsets, weights):
        pair = padded[:, r0 - dr : r1 - dr : 2, c0 - dc : c1 - dc : 2]
        pair = pair + padded[:, r0 + dr : r1 + dr : 2, c0 + dc : c1 + dc : 2]
        if weight != 1.0:
            pair *= np.float32(weight)
        total = pair if total is None else total + pair
    return total


def _update_sites(padded, rows, cols, sweep, pairs):
    """_site_update of the sites rows x cols (image coordinates, stride 2), in place.

    padded is (K, H + 2, W + 2), q inside a border of zeros, so the neighbours are four strided
    views and outside the image counts 0; so do the pixels outside a mask, whose q stays 0.
    Returns the sites' entropy -sum q log q and, with pairs, the sum of their new q . their
    neighbours' q: L's terms but the expected log-likelihood.
    """
    r0, r1, c0, c1 = rows.start + 1, rows.stop + 1, cols.start + 1, cols.stop + 1
    centre = padded[:, r0:r1:2, c0:c1:2]
    neighbours = sweep.grid.neighbour_sum(padded, (r0, r1, c0, c1))
    keep_old = sweep.relaxation != 1.0 or sweep.moved is not None
    old = centre.copy() if keep_old else centre
    target, log_target = _site_update(
        old, neighbours, sweep.site_logp(rows, cols), sweep.beta, sweep.relaxation, sweep.settings
    )
    if sweep.inside is not None:
        target *= sweep.inside[rows, cols]  # and so adds no entropy there
    if sweep.moved is not None:
        sweep.moved[rows, cols] = _moved(target, old, sweep.settings)
    centre[...] = target
    agreement = float(np.sum(target * neighbours, dtype=np.float64)) if pairs else 0.0
    return _entropy(target, log_target), agreement


def _sweep(padded, sweep):
    """One checkerboard sweep of q in place.  Returns L(new q) but its expected log-likelihood
    sum_i q_i . log w p(x_i): every neighbour pair has one white site, so the pairs are summed
    as the white sites are updated.  The sites of one colour are independent: a colour's row
    bands may be updated in any order, or at once."""
    n_components, height, width = padded.shape[0], padded.shape[1] - 2, padded.shape[2] - 2
    objective = 0.0
    for colour, sites in enumerate(CHECKERBOARD):

        def update_band(band, sites=sites, pairs=colour == 1 and sweep.beta != 0):
            top, bottom = band
            total = 0.0
            for row, col in sites:
                entropy, agreement = _update_sites(
                    padded, slice(top + row, bottom, 2), slice(col, width, 2), sweep, pairs
                )
                total += entropy + sweep.beta * agreement
            return total

        bands = sweep.grid.swept_bands(sweep.passes, height, width, n_components)
        objective += sum(sweep.passes.map(update_band, bands))
    return objective


def _partial_sweep(padded, sweep, table, index, sites):
    """A checkerboard sweep of the given sites only (image-flat indices, inside any mask), in
    place, their log-probabilities looked up in table (K, M) by index (H, W).  Returns the
    change of L's entropy and pair terms, the change of q summed per point (K, M) and the sites
    that moved.  Updating some sites is still coordinate ascent: L never decreases."""
    n_components, width = padded.shape[0], padded.shape[2] - 2
    flat = padded.reshape(n_components, -1)
    points = index.reshape(-1)
    rows = sites // width
    black = (sites - rows * (width - 1)) % 2 == 0  # (row + column) even, as CHECKERBOARD's
    settings = sweep.settings

    def update_chunk(chunk):
        at = chunk + 2 * (chunk // width) + width + 3  # the sites' places in padded
        old = np.take(flat, at, axis=1)
        neighbours = sweep.grid.flat_neighbour_sum(flat, at, width)
        logp = np.take(table, points[chunk], axis=1)
        target, log_target = _site_update(
            old, neighbours, logp, sweep.beta, sweep.relaxation, settings
        )
        flat[:, at] = target
        tiny = np.finfo(np.float32).tiny
        change = _entropy(target, log_target) - _entropy(old, np.log(np.maximum(old, tiny)))
        delta = target.astype(np.float64) - old
        change += sweep.beta * float(np.sum(delta * neighbours))
        return change, points[chunk], delta, chunk[_moved(target, old, settings)]

    sums = _PointSums(n_components, table.shape[1], settings.partial_batch)
    change, moved = 0.0, []
    for colour in (black, ~black):
        of_colour = sites[colour]
        step = settings.partial_chunk
        chunks = [of_colour[i : i + step] for i in range(0, len(of_colour), step)]
        for chunk_change, chunk_points, delta, chunk_moved in sweep.passes.map(
            update_chunk, chunks
        ):
            change += chunk_change
            moved.append(chunk_moved)
            sums.add(chunk_points, delta)
    return change, sums.total(), np.concatenate(moved) if moved else sites[:0]


class _PointSums:
    """Changes of q at sites, added up per point (K, M), a batch at a time: each bincount costs
    O(M), and holding every change (K float64 a site) would cost memory."""

    def __init__(self, n_components, n_points, batch):
        self.sums = np.zeros((n_components, n_points))
        self.batch, self.pending, self.n_pending = max(n_points, batch), [], 0

    def add(self, points, delta):
        self.pending.append((points, delta))
        self.n_pending += len(points)
        if self.n_pending >= self.batch:
            self._flush()

    def _flush(self):
        updated = np.concatenate([points for points, _ in self.pending])
        delta = np.concatenate([delta for _, delta in self.pending], axis=1)
        for k in range(len(self.sums)):
            self.sums[k] += np.bincount(updated, weights=delta[k], minlength=self.sums.shape[1])
        self.pending, self.n_pending = [], 0

    def total(self):
        if self.pending:
            self._flush()
        return self.sums


def _around(sites, shape, inside, grid=PLANE):
    """The sites (image-flat) and their neighbours on the grid (4, a stacked volume's 6),
    inside the image and any mask, in order.

    Marked in an (H, W) bool image, which costs less than sorting the candidates."""
    height, width = shape
    column = sites % width
    near = np.zeros(height * width, bool)
    near[sites] = True
    near[sites[column > 0] - 1] = True
    near[sites[column < width - 1] + 1] = True
    near[sites[sites >= width] - width] = True
    near[sites[sites < (height - 1) * width] + width] = True
    for step in grid.far_steps(width):
        near[sites - step] = True
        near[sites + step] = True
    if inside is not None:
        near &= inside.reshape(-1)
    return np.flatnonzero(near)


def _dilate_rows(moved, inside, passes):
    """moved (H, W) bool |= its 4-neighbours, &= inside (a mask, or None), in place (a plane's
    dilation, Plane.dilate): band by band from the top, keeping the band's original rows and the
    one above it, so no second image is made (a byte a pixel at the moment memory peaks)."""
    height, width = moved.shape
    above = np.zeros(width, bool)  # the original row above the band
    for top, bottom in passes.bands(height, width, 1):
        band = moved[top:bottom].copy()
        near = moved[top:bottom]
        near[1:] |= band[:-1]
        near[:-1] |= band[1:]
        near[:, 1:] |= band[:, :-1]
        near[:, :-1] |= band[:, 1:]
        near[0] |= above
        if bottom < height:
            near[-1] |= moved[bottom]  # not yet dilated: bands go from the top
        above = band[-1]
        if inside is not None:
            near &= inside[top:bottom]


def _mean_field_objective(padded, beta, site_logp, passes, grid=PLANE):
    """L(q, theta) computed from its definition, band by band (at the start of a fit), its
    pairs those of the grid (a stacked volume's across slices too, weighted).

    Outside a mask q is 0, so those pixels add nothing.
    """
    n_components, height, width = padded.shape[0], padded.shape[1] - 2, padded.shape[2] - 2
    tiny = np.finfo(np.float32).tiny

    def band_objective(band):
        top, bottom = band
        q = padded[:, top + 1 : bottom + 1, 1:-1]
        expected = site_logp(slice(top, bottom), slice(0, width))
        expected -= np.log(np.maximum(q, tiny))
        objective = np.sum(q * expected, dtype=np.float64)
        return objective + beta * grid.pair_sum(padded, top, bottom)

    bands = grid.swept_bands(passes, height, width, n_components)
    return float(sum(passes.map(band_objective, bands)))


def _prior_terms(padded, beta, passes, grid=PLANE):
    """L's entropy and pair terms (L without the expected log-likelihood) of q."""
    n_components, height, width = padded.shape[0], padded.shape[1] - 2, padded.shape[2] - 2
    rows, cols = range(height), range(width)

    def no_data(row_slice, col_slice):
        return np.zeros((n_components, len(rows[row_slice]), len(cols[col_slice])))

    return _mean_field_objective(padded, beta, no_data, passes, grid)


def _posterior_start(padded, site_logp, inside, passes):
    """q = the plain mixture's posterior (0 outside the mask), in place, band by band."""
    n_components, height, width = padded.shape[0], padded.shape[1] - 2, padded.shape[2] - 2
    for top, bottom in passes.bands(height, width, n_components):
        q = site_logp(slice(top, bottom), slice(0, width))
        _softmax_over_components(q)
        if inside is not None:
            q *= inside[top:bottom]
        padded[:, top + 1 : bottom + 1, 1:-1] = q


def _copy_to_blocks(q, coarse_q, passes):
    """q (K, H, W) = a coarser grid's q (K, ceil(H/2), ceil(W/2)) copied to each 2 x 2 block,
    a band of whole rows at a time (writing every other column is four times slower)."""
    width = q.shape[2]

    def copy_band(band):
        top, bottom = band
        doubled = np.repeat(coarse_q[:, top:bottom], 2, axis=2)[:, :, :width]
        for parity in (0, 1):
            rows = q[:, 2 * top + parity : 2 * bottom : 2]
            rows[...] = doubled[:, : rows.shape[1]]

    passes.run(copy_band, passes.bands(coarse_q.shape[1], width, len(q)))


def _copy_to_cubes(q, coarse_q):
    """q (K, D, H, W) = a coarser grid's q copied to each 2 x 2 x 2 cube, slice by slice."""
    depth, height, width = q.shape[1:]
    for z in range(depth):
        plane = np.repeat(np.repeat(coarse_q[:, z // 2], 2, axis=1), 2, axis=2)
        q[:, z] = plane[:, :height, :width]


def _softmax_over_components(logits):
    """In place: exp(logits) / sum_k exp(logits), over axis 0."""
    logits -= logits.max(axis=0)
    np.exp(logits, out=logits)
    logits /= logits.sum(axis=0)
    return logits


def _argmax_over_components(q, passes):
    """argmax over axis 0 of (K, H, W) by K comparisons (NumPy's over a leading axis is slow),
    band by band."""
    labels = np.zeros(q.shape[1:], dtype=np.uint8 if len(q) <= 256 else np.uint16)

    def band_argmax(band):
        rows = slice(*band)
        best = q[0, rows].copy()
        for k in range(1, len(q)):
            better = q[k, rows] > best
            labels[rows][better] = k
            np.maximum(best, q[k, rows], out=best)

    passes.run(band_argmax, passes.bands(q.shape[1], q.shape[2], len(q)))
    return labels


@dataclass(frozen=True, eq=False)
class SiteLedger:
    """What a sweep of a mixture of distinct values carries to the next: the points'
    log-probabilities (K, M) float64, L's entropy and pair terms, q summed over the pixels of
    every point (K, M), the sites the next sweep updates (image-flat; None: every site) and the
    partial sweeps since the last sweep of every site."""

    point_logp: np.ndarray
    prior_terms: float
    sums: np.ndarray
    active: np.ndarray | None = None
    partial_sweeps: int = 0


class MeanFieldModel(Protocol):
    """What the spatial fit's driver (_coarse_to_fine, _spatial_run) asks of a model fitted by
    mean-field EM: PointsMeanField (a mixture of distinct values), BiasMeanField (a mixture of
    corrected intensities and its field) and HeldMeanField (fixed site log-probabilities, made
    for the full grid by BiasMeanField.held: it has no coarser grid).  Its states are MeanField,
    updated in place."""

    beta: float | str  # BETA of the Potts prior, or "auto" before _spatial_run estimates it
    options: FitOptions
    settings: SpatialSettings
    grid: Plane | Stack  # the sites' neighbours and layout: an image's Plane, a volume's Stack
    shape: tuple  # (H, W) of the grid (a volume's stacked)
    inside: np.ndarray | None  # (H, W) bool, or None: every site
    n_pixels: int  # the sites inside
    passes: Passes
    full_step: object  # None, or the iteration that sweeps every site (run_em's full_step)

    def coarser(self) -> MeanFieldModel:
        """The model on the grid of every other row and column (and slice)."""

    def held(self, parameters) -> MeanFieldModel:
        """The model for the full grid after its coarser grid's fit ended at parameters."""

    def site_logp(self, parameters):
        """rows, cols -> (K, h, w) log(w_k p(site | k)) at those sites (slices)."""

    def start(self, parameters, padded, from_posterior) -> MeanField:
        """The state at q = padded (filled from the sites' posteriors if from_posterior)."""

    def step(self, state) -> MeanField:
        """One iteration: a checkerboard sweep of q, then the model's M-step."""


def _sweep_of(fit, state, site_logp):
    """The checkerboard sweep of a mean-field state of fit, with the sites' log-probabilities."""
    return Sweep(
        fit.beta,
        site_logp,
        fit.passes,
        fit.inside,
        state.relaxation,
        settings=fit.settings,
        grid=fit.grid,
    )


def _start_terms(fit, padded, site_logp, from_posterior):
    """The prior's terms of a start q = padded of fit (first the sites' posteriors, from
    site_logp, where from_posterior)."""
    if from_posterior:
        _posterior_start(padded, site_logp, fit.inside, fit.passes)
    return _prior_terms(padded, fit.beta, fit.passes, fit.grid)


@dataclass(frozen=True, eq=False)
class MeanField:
    """A state of mean-field EM: the parameters its sweep takes the sites' log-probabilities
    from (a GaussianMixtureFit, or a BiasState: a mixture with its field), q (K, H, W) inside a
    zero border, updated in place (a copy would not fit at 24 megapixels, so a state is used
    once: in_place, which run_em checks), and L(q, parameters) summed over the pixels."""

    parameters: object
    padded: np.ndarray  # (K, H + 2, W + 2) float32
    total: float
    n_pixels: int
    relaxation: float = 1.0  # of the next sweep
    gain: float | None = None  # of the total in the last iteration
    stoppable: bool = True  # the sweep that reached this state updated every site
    full_sweeps: int = 0  # sweeps of every site so far
    partial_sweeps: tuple = ()  # the iterations (1, 2, ...) that swept only some sites
    ledger: SiteLedger | None = None  # the distinct values' fit (not the bias field's)
    in_place = True  # step(state) overwrites state's q: no state is stepped twice

    @property
    def objective(self):
        return self.total / self.n_pixels

    @property
    def q(self):
        return self.padded[:, 1:-1, 1:-1]


def _after_iteration(state, parameters, total, clear_gain, settings, swept_all, ledger=None):
    """The state after an iteration that reached total, with the next sweep's relaxation."""
    gain = total - state.total
    relaxation = state.relaxation
    if state.gain is not None and clear_gain < gain < state.gain:
        relaxation = _best_relaxation(relaxation, gain / state.gain, settings.max_over_relaxation)
    return replace(
        state,
        parameters=parameters,
        total=total,
        relaxation=relaxation,
        gain=gain,
        stoppable=swept_all,
        full_sweeps=state.full_sweeps + swept_all,
        partial_sweeps=state.partial_sweeps
        + (() if swept_all else (state.full_sweeps + len(state.partial_sweeps) + 1,)),
        ledger=ledger,
    )


def _best_relaxation(relaxation, gain_ratio, most):
    """The over-relaxation for the next sweeps, from how fast the objective's gains shrink.

    Adaptive SOR (Hageman and Young, Applied Iterative Methods, 1981, ch. 9): the distance to
    the maximum is quadratic in the error, so errors shrink by lam = sqrt(gain ratio) a sweep;
    below the best relaxation w, lam and the plain update's rate mu^2 satisfy
    (lam + w - 1)^2 = lam w^2 mu^2, and the best w is 2 / (1 + sqrt(1 - mu^2)).  At or above
    the best w, lam = w - 1: keep w.  Asked only while the gains are clear of round-off.
    """
    rate = math.sqrt(gain_ratio)
    if rate <= relaxation - 1:
        return relaxation
    plain_rate = (rate + relaxation - 1) ** 2 / (rate * relaxation**2)
    if plain_rate >= 1:
        return most
    return min(most, 2 / (1 + math.sqrt(1 - plain_rate)))


def _coarse_to_fine(fit, parameters, on_iteration=None):
    """Mean-field EM of fit (a PointsMeanField or a BiasMeanField) from parameters, started on
    the grid of every other row and column when the grid is large.

    Mean-field EM moves label boundaries a pixel or so an iteration, so on a large image it
    spends hundreds of iterations on shapes a coarser grid settles cheaply: a grid larger than
    coarsest_grid_pixels first fits its 2 x 2 subsampled grid (recursively), then starts from
    those parameters and that q, copied to each 2 x 2 block.  Returns the run and the
    CoarserGrid records, coarsest first.
    """
    coarser, start_q, (height, width) = [], None, fit.shape
    grid = fit.grid
    coarse = fit.coarser()
    if grid.n_sites(fit.shape) > fit.settings.coarsest_grid_pixels and coarse.n_pixels:
        run, coarser = _coarse_to_fine(coarse, parameters)
        coarser.append(coarse.grid.record(coarse.shape, run))
        parameters, start_q = run.state.parameters, run.state.q
        del run
        fit = fit.held(parameters)
    del coarse
    padded = np.zeros((len(parameters.label_weights), height + 2, width + 2), np.float32)
    from_posterior = start_q is None
    if start_q is not None:
        grid.copy_coarser(padded[:, 1:-1, 1:-1], start_q, fit.passes)
        if fit.inside is not None:
            padded[:, 1:-1, 1:-1] *= fit.inside
        del start_q  # the coarse grid's q goes before the fine grid's arrays are made
    run = run_em(
        fit.start(parameters, padded, from_posterior),
        fit.step,
        fit.options,
        full_step=fit.full_step,
        on_iteration=on_iteration,
    )
    return run, coarser


def _spatial_record(beta, run, coarser, estimate=None):
    return SpatialFit(
        beta,
        run.history,
        run.n_iter,
        run.converged,
        run.n_em_steps,
        run.state.full_sweeps,
        coarser,
        estimate,
        list(run.state.partial_sweeps),
    )


def spatial_on(beta):
    """Whether a spatial prior is asked for: BETA > 0, or "auto"."""
    return beta == "auto" or beta > 0


def _spatial_run(fit, parameters, on_iteration=None):
    """The spatial fit at fit.beta, or with BETA "auto" at the pseudo-likelihood estimate
    (estimate_beta, from the plain fit's posterior), halved while a component ends with (almost)
    no pixels: a prior that would erase a tissue is too strong for it.  Each fit runs at one
    BETA, so its objective is the mean-field objective of that BETA.  Returns the run and the
    SpatialFit record."""
    if fit.beta != "auto":
        return _recorded(fit, parameters, fit.beta, None, on_iteration)
    rows, cols = fit.grid.window(fit.shape, fit.settings.estimate_pixels)
    q = fit.site_logp(parameters)(rows, cols)
    _softmax_over_components(q)
    inside = None if fit.inside is None else fit.inside[rows, cols]
    q, inside, weights = fit.grid.window_view(q, inside)
    estimate = estimate_beta(q, parameters.label_weights, inside, fit.settings.most_beta, weights)
    beta, halvings = estimate, 0
    while True:
        run, record = _recorded(fit, parameters, beta, estimate, on_iteration)
        labels = _argmax_over_components(run.state.q, fit.passes)
        counts = _label_counts(labels, fit.inside, len(parameters.label_weights))
        empty = _empty_of_counts(counts)
        if not empty or halvings == fit.settings.beta_halvings:
            return run, record
        del run, labels
        beta, halvings = beta / 2, halvings + 1


def _recorded(fit, parameters, beta, estimate, on_iteration):
    run, coarser = _coarse_to_fine(replace(fit, beta=beta), parameters, on_iteration)
    return run, _spatial_record(beta, run, coarser, estimate)


def _central_window(shape, most):
    """(rows, cols) slices of the central window of at most `most` pixels, the image's shape."""
    height, width = shape
    scale = min(1.0, math.sqrt(most / max(height * width, 1)))
    h, w = max(1, int(height * scale)), max(1, int(width * scale))
    top, left = (height - h) // 2, (width - w) // 2
    return slice(top, top + h), slice(left, left + w)


def estimate_beta(q, weights, inside, most, axis_weights=None):
    """BETA by maximum pseudo-likelihood of responsibilities q (K, h, w), the neighbours' q
    standing in for their labels (the mean-field-like approximation of Celeux, Forbes and
    Peyrard, Pattern Recognition 36, 2003): sum_i sum_k q_ik log p(k | neighbours), with
    p(k | neighbours) proportional to w_k exp(BETA s_ik), s_i the neighbours' q summed.  It is
    concave in BETA; Newton's method from 0, within [0, most].  A volume's q is (K, d, h, w),
    its neighbours along the three axes weighted by axis_weights."""
    padded = np.pad(q * (True if inside is None else inside), [(0, 0)] + [(1, 1)] * (q.ndim - 1))
    if q.ndim == 3:
        s = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    else:
        s = sum(
            weight * (np.roll(padded, 1, axis) + np.roll(padded, -1, axis))[:, 1:-1, 1:-1, 1:-1]
            for axis, weight in zip((1, 2, 3), axis_weights)
        )
    sites = np.ones(q.shape[1:], bool) if inside is None else inside
    s, q = s[:, sites], q[:, sites]
    observed, log_w, beta = float(np.sum(q * s)), np.log(weights)[:, None], 0.0
    for _ in range(100):
        p = log_w + beta * s
        _softmax_over_components(p)
        expected = p * s
        gradient = observed - float(expected.sum())
        curvature = float(np.sum(expected * s) - np.sum(expected.sum(axis=0) ** 2))
        if curvature <= 0:
            break
        step = gradient / curvature
        new = min(max(beta + step, 0.0), most)
        if abs(new - beta) < 1e-9:
            break
        beta = new
    return beta


@dataclass(frozen=True)
class PointsMeanField:
    """The spatial fit of a mixture of distinct values: the points, the point of every pixel
    (H, W) in the smallest unsigned type that holds it, the mask, BETA, and how it runs.
    update_parameters False keeps the mixture (a shared model): the prior only smooths."""

    data: _PointFeatures
    index: np.ndarray
    inside: np.ndarray | None
    beta: float
    options: FitOptions
    settings: SpatialSettings
    update_parameters: bool = True
    grid: Plane | Stack = PLANE  # a volume's Stack: index and inside are stacked images

    @property
    def shape(self):
        return self.index.shape

    @property
    def passes(self):
        return self.options.passes

    @property
    def n_pixels(self):
        """The pixels that count: those inside the mask."""
        return int(np.count_nonzero(self.inside)) if self.inside is not None else self.index.size

    def coarser(self):
        grid = self.grid
        inside = None if self.inside is None else grid.subsampled(self.inside, False)
        return replace(self, index=grid.subsampled(self.index), inside=inside, grid=grid.coarser())

    def held(self, parameters):
        return self

    def point_sums(self, q):
        """(K, M) q summed over the pixels of every point, by bincounts in row chunks."""
        n_points, (height, width) = len(self.data), self.shape
        rows = max(1, max(PIXEL_CHUNK // 4, 4 * n_points) // max(width, 1))

        def chunk_sums(band):
            points = self.index[band[0] : band[1]].reshape(-1).astype(np.intp)  # once, not K times
            return [
                np.bincount(points, weights=qk[band[0] : band[1]].reshape(-1), minlength=n_points)
                for qk in q
            ]

        chunks = [(top, top + rows) for top in range(0, height, rows)]
        sums = np.zeros((len(q), n_points))
        for partial_sums in self.passes.map(chunk_sums, chunks):
            sums += partial_sums
        return sums

    def site_logp(self, model):
        return _looked_up(_point_log_probabilities(model, self.data), self.index)

    def start(self, model, padded, from_posterior):
        point_logp = _point_log_probabilities(model, self.data)
        site_logp = _looked_up(point_logp, self.index)
        prior_terms = _start_terms(self, padded, site_logp, from_posterior)
        sums = self.point_sums(padded[:, 1:-1, 1:-1])
        total = prior_terms + float(np.sum(sums * point_logp))
        return MeanField(
            model, padded, total, self.n_pixels, ledger=SiteLedger(point_logp, prior_terms, sums)
        )

    def step(self, state, sweep_all=False):
        """One iteration: a checkerboard sweep of q (of every site, or of the sites near the last
        sweep's moves), then the M-step for that q."""
        ledger, settings = state.ledger, self.settings
        swept_all = sweep_all or ledger.active is None
        sweep = _sweep_of(self, state, None)
        swept = ledger.point_logp.astype(np.float32)  # the sweep's, in cache
        sweep_of = self._sweep_all if swept_all else self._sweep_some
        prior_terms, sums, active, partial_sweeps = sweep_of(state, sweep, swept)
        model, point_logp = state.parameters, ledger.point_logp
        if self.update_parameters:
            model = _spatial_m_step(model, self.data, sums, self.options.reg_covar)
            point_logp = _point_log_probabilities(model, self.data)
        expected = float(np.sum(sums * point_logp))  # the expected log-likelihood, exactly
        total = prior_terms + expected
        if partial_sweeps >= settings.full_sweep_every - 1:
            active = None
        ledger = SiteLedger(point_logp, prior_terms, sums, active, partial_sweeps)
        clear_gain = self.options.tol * self.n_pixels
        return _after_iteration(state, model, total, clear_gain, settings, swept_all, ledger)

    def full_step(self, state):
        """An iteration that sweeps every site, so that it counts for the stopping rule."""
        return self.step(state, sweep_all=True)

    def _sweep_all(self, state, sweep, swept):
        moved = np.zeros(self.shape, bool)
        sweep = replace(sweep, site_logp=_looked_up(swept, self.index), moved=moved)
        terms = _sweep(state.padded, sweep)
        self.grid.dilate(moved, self.inside, self.passes)
        few = np.count_nonzero(moved) < self.settings.max_active_fraction * self.index.size
        active = np.flatnonzero(moved) if few else None
        del sweep, moved
        return terms, self.point_sums(state.q), active, 0

    def _sweep_some(self, state, sweep, swept):
        ledger = state.ledger
        change, change_of_sums, moved = _partial_sweep(
            state.padded, sweep, swept, self.index, ledger.active
        )
        active = _around(moved, self.shape, self.inside, self.grid)
        if len(active) >= self.settings.max_active_fraction * self.index.size:
            active = None
        return (
            ledger.prior_terms + change,
            ledger.sums + change_of_sums,
            active,
            ledger.partial_sweeps + 1,
        )


EMPTY_SHARE = 1e-4  # a component labelling fewer than this share of the fitted pixels is empty


def _empty_of_counts(counts):
    """The labels that fewer than EMPTY_SHARE of all the counted pixels take."""
    return [int(k) for k in np.flatnonzero(counts < EMPTY_SHARE * counts.sum())]


def _label_counts(labels, inside, n_components):
    """How many of the pixels inside take each label, a block at a time."""
    counts = np.zeros(n_components, np.int64)
    flat_labels = labels.reshape(-1)
    flat_inside = None if inside is None else inside.reshape(-1)
    for start in range(0, flat_labels.size, PIXEL_CHUNK):  # bincount's index copy: a block's
        block = flat_labels[start : start + PIXEL_CHUNK]
        if flat_inside is not None:
            block = block[flat_inside[start : start + PIXEL_CHUNK]]
        counts += np.bincount(block, minlength=n_components)[:n_components]
    return counts


def _point_log_probabilities(model, data, of_labels=True):
    """(L, M) log(w p(x_m | label)) of every point, what a pixel's are looked up in: of each
    component, or of each tissue of a partial-volume model; of_labels False: of each component
    (a partial-volume model's Gaussians), (K, M)."""
    blocks = log_label_blocks if of_labels else log_density_blocks
    table = np.empty((model.n_labels if of_labels else model.n_components, len(data)))
    for start, block in blocks(model, data):
        table[:, start : start + block.shape[1]] = block
    return table


def _looked_up(table, index):
    """site_logp for a table model: the (K, h, w) log-probabilities of the sites rows x cols."""
    return lambda rows, cols: np.take(table, index[rows, cols], axis=1)  # faster than [] indexing


def _spatial_m_step(model, data, resp, reg_covar):
    """The M-step from responsibilities summed per point (K, M), counted in pixels."""
    weights, means, covariances = model.kind.m_step_of_points(model, data, resp, reg_covar)
    return replace(model, weights=weights, means=means, covariances=covariances)


def spatial_fit(
    model,
    data,
    index,
    beta,
    options=FitOptions(),
    *,
    mask=None,
    update_parameters=True,
    settings=SpatialSettings(),
    spacing=None,
    on_iteration=None,
):
    """Mean-field EM of the Potts-prior mixture, from a fitted plain mixture, coarse to fine.

    index: (H, W) point of every pixel; mask: (H, W) bool, the pixels to segment (outside
    pixels have no label and no neighbours).  A volume's index and mask are (D, H, W), its 6
    neighbours weighted by spacing (Stack), and so are its labels and q.
    update_parameters=False keeps the model (a shared one); the prior only smooths the labels.
    A partial-volume model is always kept: the prior smooths its tissues, and q is theirs.
    Returns the model, the labels (H, W), the SpatialFit record and q (L, H, W) float32.
    """
    index = index.astype(np.min_scalar_type(max(len(data) - 1, 0)), copy=False)
    update_parameters = update_parameters and model.partial_volume is None
    grid = grid_of(index.shape, spacing)
    index, mask = grid.stacked(index), grid.stacked_mask(mask)
    fit = PointsMeanField(
        data, np.ascontiguousarray(index), mask, beta, options, settings, update_parameters, grid
    )
    run, record = _spatial_run(fit, model, on_iteration)
    q = run.state.q
    labels = _argmax_over_components(q, options.passes)
    labels, q = np.ascontiguousarray(grid.volume_view(labels)), grid.volume_view(q)
    return run.state.parameters, labels, record, q


def _mask_box(picture):
    """The bounding box of the mask (slices), where the picture's grid crops its spatial and
    bias fits to it (a volume's: Stack.crops_to_mask) and it is smaller than the picture.  None
    without a mask, for an image, and for a mask that fills its picture."""
    if picture.mask is None or not grid_of(picture.codes.shape).crops_to_mask:
        return None
    box = []
    for axis in range(picture.mask.ndim):
        other = tuple(a for a in range(picture.mask.ndim) if a != axis)
        inside = np.flatnonzero(picture.mask.any(axis=other))
        box.append(slice(int(inside[0]), int(inside[-1]) + 1))
    box = tuple(box)
    return None if picture.mask[box].shape == picture.mask.shape else box


def _uncropped(segmentation, picture, box):
    """The segmentation of a volume's box put back into the whole volume: labels and
    posteriors 0 outside it, the field's coordinates those of the box (BiasField.box)."""
    labels = np.zeros(picture.codes.shape, segmentation.labels.dtype)
    labels[box] = segmentation.labels
    posteriors = segmentation.posteriors
    if posteriors is not None:
        whole = np.zeros((len(posteriors),) + picture.codes.shape, np.float32)
        whole[(slice(None),) + box] = posteriors
        posteriors = whole
    bias = segmentation.bias
    if bias is not None:
        bias = replace(bias, shape=picture.codes.shape, box=tuple((b.start, b.stop) for b in box))
    return replace(segmentation, picture=picture, labels=labels, posteriors=posteriors, bias=bias)


def _point_expected_fractions(q, model, data, index):
    """(T, H, W) float32: each tissue's expected share of every pixel (FAST's partial volume
    maps), from the tissues' posteriors q (T, H, W) of a partial-volume model: a tissue's
    posterior is split over its Gaussians as their densities at the pixel's point."""
    pv = model.partial_volume
    split = _point_log_probabilities(model, data, of_labels=False)
    pv.shares_within_tissues(split)
    split = split.astype(np.float32)  # (G, M)
    out = np.empty_like(q)
    for top in range(0, q.shape[1], 64):
        rows = slice(top, top + 64)
        shares = np.take(split, index[rows], axis=1) * q[pv.tissue_of, rows]
        out[:, rows] = pv.expected_fractions(shares)
    return out


# --- 6c. A bias field (--bias-field) ---------------------------------------------
# MRI intensities carry a smooth multiplicative field: pixel = tissue x field, noise included.
# The model, in the form of Ashburner and Friston's unified segmentation (NeuroImage 26,
# 2005): the corrected intensities z_i = y_i / b_i are a Gaussian mixture, b_i = exp(t_i) and
# t = A c a combination of smooth basis functions (the monomials of the pixel coordinates up
# to a degree, no constant term: the means hold the scale), so with the Jacobian 1 / b_i
#     log p(y_i) = log sum_k w_k N(z_i | mu_k, s_k^2) - t_i.
# (A mixture of log-intensities, as Wells et al., IEEE TMI 15, 1996, makes the field's fit a
# linear least squares, but it bends the classes: at the noise of real scans that costs a
# point or two of accuracy, measured.)  EM for it is an ECM (Meng and Rubin 1993): the
# E-step gives the responsibilities r_ik; the mixture's M-step is the usual one on z; then a
# Newton step on c for those r and the new mixture, halved until the log-likelihood does not
# fall (a generalised EM).  Every sum these steps need is a moment sum_i h_i u_i^a v_i^b of
# the pixel coordinates with a per-pixel weight h (r_k, r_k z, r_k z^2), and the basis is
# separable, so a row band's moments are two small matrix products U^T h V.  The passes go
# through the image in row bands; the per-pixel arrays are the intensities (float32), the
# mask, and with --spatial q: no basis, field or responsibilities are kept per pixel.


BIAS_HALVINGS = 8  # the field's Newton step is halved at most this often before it waits
# A field this strong (its max / min over the fitted pixels, field_spread) found by the spatial
# fit with a partial-volume mixture held at its fit to the uncorrected intensities: that mixture
# is wrong, and the fit starts again from the field of the field and mixture fitted together,
# the mixture refitted to the intensities it corrects (_strong_field_start; docs/brain.md:
# chosen on the evaluation grid's seed 1, reported on seeds 2 and 3).  A volume's anatomy holds
# its field better than a slice's (the template without a field: 1.08 to 1.125 in 3-D, up to
# 1.3 on slices), so a volume's bar is lower (chosen on the grid's volumes of seeds 11 and 12,
# reported on seed 2's).
STRONG_FIELD = 1.2
STRONG_FIELD_VOLUME = 1.15
STRONG_FIELD_SITES = 1 << 16  # that ECM's grid: at most this many sites (seed 1's volumes)
# Its second ECM's mixture: the tissues without mixels, a variance each; the restart keeps the
# ECM whose field corrects to the sharper histogram (chosen on the grid's volumes of seeds 11,
# 12 and 2, reported on seeds 13 to 16: docs/brain.md).
STRONG_FIELD_ECM_COVARIANCE = "full"


def bias_monomials(degree, dims=2):
    """The exponents (a, b) of the field's basis u^a v^b, 1 <= a + b <= degree, in order; of a
    volume's, (a, b, c) of u^a v^b w^c, 1 <= a + b + c <= degree."""
    if dims == 2:
        return [(a, total - a) for total in range(1, degree + 1) for a in range(total + 1)]
    return [
        (a, b, total - a - b)
        for total in range(1, degree + 1)
        for a in range(total + 1)
        for b in range(total - a + 1)
    ]


def _grid_positions(degree, dims, base=None):
    """(rows, cols): where each monomial's coefficient (or moment) sits in the field's matrices:
    rows index the row features (u^a; a volume's u^a v^b at a * base + b, base = degree + 1 for
    coefficients, 2 degree + 1 for moments, where these sums add without carry), cols w^c."""
    exponents = np.array(bias_monomials(degree, dims))
    if dims == 2:
        return exponents[:, 0], exponents[:, 1]
    base = degree + 1 if base is None else base
    return exponents[:, 0] * base + exponents[:, 1], exponents[:, 2]


def coordinate_powers(coordinates, size, degree):
    """(n, degree + 1) powers u^0..u^degree of coordinates scaled to u in [-1, 1]."""
    u = 2.0 * np.asarray(coordinates, dtype=np.float64) / max(size - 1, 1) - 1.0
    return np.vander(u, degree + 1, increasing=True)


def coefficient_grid(coefficients, degree, dims=2):
    """The coefficients as a matrix C with log field = U C V^T: U the row features (an image's
    rows' powers u^a, a volume's rows' u^a v^b), V the columns' powers: (degree + 1)^(dims - 1)
    x (degree + 1)."""
    grid = np.zeros(((degree + 1) ** (dims - 1), degree + 1))
    rows, cols = _grid_positions(degree, dims)
    grid[rows, cols] = coefficients
    return grid


def _row_features(powers_a, powers_b):
    """(n, F) features u^a v^b of rows with powers (n, A) and (n, B): a major."""
    return (powers_a[:, :, None] * powers_b[:, None, :]).reshape(len(powers_a), -1)


@dataclass(frozen=True)
class BiasField:
    """A fitted field: log field = coefficients . monomials of the coordinates scaled to [-1, 1].

    shift: subtracted from the log field so that its mean over the fitted pixels is 0 (the
    field's scale is the means'; this one makes the field 1 on average).
    """

    degree: int
    coefficients: np.ndarray  # (P,)
    shape: tuple  # (H, W) of the image; (D, H, W) of a volume
    shift: float
    regularisation: float  # lambda of the prior it was fitted with (SegmentOptions.bias_reg)
    box: tuple | None = None  # a volume's: ((start, stop),) * 3 its coordinates scale to
    spread: float = 1.0  # its max / min over the fitted pixels (field_spread)
    restarted: bool = False  # the spatial fit started again past STRONG_FIELD (_VOLUME)
    start_gain: float | None = None  # --bias-start histogram: the entropy its first field removes
    started: bool = False  # that first field applied (past SHARPEN_GAIN): a factor of this one

    def log_field(self, rows, cols, slice_=None):
        """The log field on the grid rows x cols (image coordinates; a volume's in slice_),
        float64."""
        dims, degree = len(self.shape), self.degree
        grid = coefficient_grid(self.coefficients, degree, dims)
        box = self.box or tuple((0, n) for n in self.shape)

        def powers(indices, axis):
            start, stop = box[axis]
            return coordinate_powers(np.asarray(indices) - start, stop - start, degree)

        u = powers(rows, -2)
        if dims == 3:
            u = _row_features(np.repeat(powers([slice_], 0), len(u), axis=0), u)
        return u @ grid @ powers(cols, -1).T - self.shift

    def image(self, stride=1):
        """The field at every stride-th pixel of every stride-th row, float32 (stride 1: (H, W);
        a figure asks only for its downsampled copy's pixels); a volume's (D, H, W)."""
        if len(self.shape) == 3:
            return self._volume_image(stride)
        rows = np.arange(0, self.shape[0], stride)
        cols = np.arange(0, self.shape[1], stride)
        out = np.empty((len(rows), len(cols)), dtype=np.float32)
        for top, bottom in Passes(threads=1).bands(len(rows), len(cols), 1):
            out[top:bottom] = np.exp(self.log_field(rows[top:bottom], cols))
        return out

    def _volume_image(self, stride):
        rows = np.arange(0, self.shape[1], stride)
        cols = np.arange(0, self.shape[2], stride)
        slices = np.arange(0, self.shape[0], stride)
        out = np.empty((len(slices), len(rows), len(cols)), dtype=np.float32)
        for i, z in enumerate(slices):
            out[i] = np.exp(self.log_field(rows, cols, z))
        return out


@dataclass(frozen=True, eq=False)
class BiasImage:
    """What a bias fit sees: the intensities (0..1) on the grid of every step-th row and column
    of the image, which of them are inside the mask, the image's size (the coordinates), and how
    its passes run."""

    values: np.ndarray  # (h, w) float32; a volume's stacked (Stack)
    inside: np.ndarray | None  # (h, w) bool; None: every pixel
    shape: tuple  # (H, W) of the image; (D, H, W) of a volume
    passes: Passes  # the fit's: its threads (a batch's worker: one)
    step: int = 1
    grid: Plane | Stack = PLANE  # a volume's Stack: values and inside are stacked images

    @property
    def dims(self):
        return len(self.shape)

    @property
    def n_pixels(self):
        return self.values.size if self.inside is None else int(np.count_nonzero(self.inside))

    def row_powers(self, rows, degree):
        """(h, F) features of the grid's rows (a slice): the powers of the scaled image
        coordinate, (h, degree + 1); a volume's u^a v^b of its slice and row, (h, (degree + 1)^2)
        (a separator row's as its slice's last row: it is outside)."""
        grid_rows = np.arange(self.values.shape[0])[rows]
        return self.grid.row_powers(grid_rows, self.step, self.shape, degree)

    def column_powers(self, degree):
        """(w, degree + 1) powers of the scaled image coordinate of every column of the grid."""
        width = self.shape[-1]
        return coordinate_powers(np.arange(self.values.shape[1]) * self.step, width, degree)

    def moment_shape(self, degree):
        """The shape of one moment matrix: the row features of degree 2 degree x the columns'."""
        return ((2 * degree + 1) ** (self.dims - 1), 2 * degree + 1)

    def low_rows(self, degree):
        """The rows of the degree-`degree` row features among those of degree 2 degree."""
        if self.dims == 2:
            return np.arange(degree + 1)
        return (np.arange(degree + 1)[:, None] * (2 * degree + 1) + np.arange(degree + 1)).ravel()

    def bands(self, n_components):
        return self.passes.bands(*self.values.shape, n_components)

    def coarser(self):
        """The grid of every other row and column (a volume's: and slice) of this one."""
        grid = self.grid
        inside = None if self.inside is None else grid.subsampled(self.inside, False)
        values = grid.subsampled(self.values)
        return replace(self, values=values, inside=inside, step=2 * self.step, grid=grid.coarser())


def bias_image(picture, passes):
    """The bias fit's view of a gray picture: its intensities and its mask; a volume's stacked
    as one image (Stack), its separators outside."""
    values = np.empty(picture.codes.shape, dtype=np.float32)
    np.multiply(picture.codes, np.float32(1 / picture.scale), out=values)
    grid = grid_of(values.shape, picture.spacing)
    stacked, inside = grid.stacked(values), grid.stacked_mask(picture.mask)
    return BiasImage(stacked, inside, values.shape, passes=passes, grid=grid)


@dataclass(frozen=True, eq=False)
class BiasState:
    """The bias fit's parameters on an image: the mixture of corrected intensities and the
    field's coefficients.  Its E-step (a pass over the image: the moments of the
    responsibilities and the log-likelihood per pixel) is computed once, when first asked for."""

    weights: np.ndarray  # (K,)
    means: np.ndarray  # (K,)
    variances: np.ndarray  # (K,)
    coefficients: np.ndarray  # (P,)
    image: BiasImage = field(repr=False)
    degree: int  # SegmentOptions.bias_degree: the one default
    regularisation: float  # the prior on the field: lambda of penalty() (SegmentOptions.bias_reg)
    mixture_fixed: bool = False  # a model read from a file: only the field is fitted
    kind: Density = DENSITY  # the mixture's (a PartialVolume: the Gaussians mix its tissues)
    stoppable = True
    in_place = False

    @property
    def partial_volume(self):
        return self.kind.partial_volume

    @property
    def label_weights(self):
        return self.kind.label_sums(self.weights)

    @cached_property
    def evaluation(self):
        return _bias_pass(self)

    @cached_property
    def objective(self):
        """The log-likelihood per pixel, less the field's penalty, and the mixture's prior
        (a partial-volume model's tissues' variances): a MAP fit's objective."""
        return self.evaluation[1] - self.penalty() + self.kind.log_prior(self.variances)

    def penalty(self):
        """(lambda / 2) c^T R c, R the field's roughness (field_roughness): per pixel, so that a
        scan enlarged or reduced gets the same field."""
        if not self.regularisation:
            return 0.0
        c = self.coefficients
        roughness = field_roughness(self.degree, self.image.dims)
        return 0.5 * self.regularisation * float(c @ roughness @ c)

    @property
    def moments(self):
        return self.evaluation[0]


def _bias_log_densities(state, z):
    """(K, h, w) log(w_k N(z | mu_k, s_k^2)) of corrected intensities z (h, w), in z's type."""
    const = np.log(state.weights) - 0.5 * np.log(2 * np.pi * state.variances)
    out = z[None] - state.means.astype(z.dtype)[:, None, None]
    out *= out
    out *= (-0.5 / state.variances).astype(z.dtype)[:, None, None]
    out += const.astype(z.dtype)[:, None, None]
    return out


class _BandModel:
    """The field and the corrected intensities of a state, row band by row band."""

    def __init__(self, state):
        self.state, self.image, self.degree = state, state.image, state.degree
        v = self.image.column_powers(self.degree)
        grid = coefficient_grid(state.coefficients, self.degree, self.image.dims)
        self.grid_v = grid @ v.T  # (F, w)

    def corrected(self, rows, cols, dtype=np.float32):
        """(z, t) at the sites rows x cols of the grid (slices): z = y exp(-t), t the log field."""
        u = self.image.row_powers(rows, self.degree)
        t = (u @ self.grid_v[:, cols]).astype(dtype, copy=False)
        z = np.exp(-t)
        z *= self.image.values[rows, cols]
        return z, t

    def site_logp(self, rows, cols):
        """The spatial sweep's log(w_k N(z | k)) at the sites (the Jacobian is every k's)."""
        return _label_log_densities(self.state, self.corrected(rows, cols)[0])


def _label_log_densities(state, z):
    """_bias_log_densities of the labels (L, h, w): of the tissues of a partial-volume model."""
    return state.kind.label_log_probabilities(_bias_log_densities(state, z))


def _labels_and_posteriors(r, kind):
    """(L, h, w) posteriors of the labels from the Gaussians' r (K, h, w): r itself, or for a
    partial-volume model each tissue's summed; and those kept (kind.posterior_maps)."""
    return kind.label_sums(r), kind.posterior_maps(r)


def _softmax_and_lse(logp):
    """(responsibilities float32, log-sum-exp float64) over axis 0 of logp, which is reused."""
    top = logp.max(axis=0)
    logp -= top
    np.exp(logp, out=logp)
    total = logp.sum(axis=0, dtype=np.float64)
    logp /= total
    return logp, np.log(total) + top


def _add_moments(moments, r, z, u, v):
    """moments[k, j, a, b] += sum over the band of r_k z^j u^a v^b, j = 0, 1, 2."""
    for k, rk in enumerate(r):
        weighted = rk.astype(np.float64)
        for j in range(3):
            moments[k, j] += u.T @ (weighted @ v)
            if j < 2:
                weighted *= z


def _bias_pass(state, labels=None, posteriors=None):
    """The E-step over the image: the moments of the responsibilities (K, 3, 2D + 1, 2D + 1)
    and the log-likelihood per pixel.  labels (h, w) / posteriors (K, h, w): filled if given."""
    image, degree, k = state.image, state.degree, len(state.weights)
    bands = _BandModel(state)
    width = image.values.shape[1]
    v = image.column_powers(2 * degree)

    def band_pass(band):
        rows, cols = slice(*band), slice(0, width)
        z, t = bands.corrected(rows, cols)
        r, lse = _softmax_and_lse(_bias_log_densities(state, z))
        lse -= t
        inside = True if image.inside is None else image.inside[rows]
        if image.inside is not None:
            r *= inside
        moments = np.zeros((k, 3) + image.moment_shape(degree))
        _add_moments(moments, r, z, image.row_powers(rows, 2 * degree), v)
        of_labels, kept = _labels_and_posteriors(r, state.kind)
        if labels is not None:
            labels[rows] = _argmax_over_components(of_labels, Passes(threads=1))
        if posteriors is not None:
            posteriors[:, rows] = kept
        return moments, float(np.sum(lse, where=inside))

    moments, total = 0.0, 0.0
    for band_moments, band_total in image.passes.map(band_pass, image.bands(k)):
        moments += band_moments
        total += band_total
    return moments, total / image.n_pixels


def _bias_mixture(moments, options, state):
    """The mixture's M-step on the corrected intensities, from the moments' constant terms
    (the kind's field_m_step)."""
    previous = (state.means, state.variances)
    return state.kind.field_m_step(
        moments[:, :, 0, 0], previous, options.covariance_type, options.reg_covar
    )


@cache
def field_roughness(degree, dims=2):
    """R with c^T R c = the mean over the square [-1, 1]^2 of |grad t|^2, t = sum c_ab u^a v^b
    (the membrane energy of the log field), by Gauss-Legendre quadrature, exact for these
    polynomials; a volume's over the cube.  A constant field costs nothing, and any slope or
    curve does.  Made once for each degree and dimension (every objective asks for it), and
    read-only."""
    roughness = _roughness(degree, dims)
    roughness.flags.writeable = False
    return roughness


def _roughness(degree, dims):
    nodes, weights = np.polynomial.legendre.leggauss(degree + 1)
    powers = np.vander(nodes, degree + 1, increasing=True)  # (n, D + 1): u^a at the nodes
    slopes = np.zeros_like(powers)
    slopes[:, 1:] = powers[:, :-1] * np.arange(1, degree + 1)  # a u^(a - 1)
    exponents = bias_monomials(degree, dims)
    if dims == 2:
        du = np.stack([np.outer(slopes[:, a], powers[:, b]).ravel() for a, b in exponents])
        dv = np.stack([np.outer(powers[:, a], slopes[:, b]).ravel() for a, b in exponents])
        w = np.outer(weights, weights).ravel() / 4.0  # the mean over the square's area 4
        return (du * w) @ du.T + (dv * w) @ dv.T
    w = np.einsum("i,j,k->ijk", weights, weights, weights).ravel() / 8.0  # the cube's volume 8
    roughness = 0.0
    for axis in range(3):  # the slope along each axis in turn
        rows = []
        for exponent in exponents:
            factors = [slopes if i == axis else powers for i in range(3)]
            columns = [factors[i][:, e] for i, e in enumerate(exponent)]
            rows.append(np.einsum("i,j,k->ijk", *columns).ravel())
        d = np.stack(rows)
        roughness = roughness + (d * w) @ d.T
    return roughness


def _field_newton_step(moments, means, variances, degree, prior=None, dims=2):
    """The Newton step of the field's coefficients for responsibilities (their moments) and a
    mixture: the expected log-likelihood's gradient and curvature are moments up to 2D.
    prior: (lambda R summed over the pixels, the coefficients), whose penalty the step takes
    off.  a, b: each monomial's place among the moments (_grid_positions); a product of two
    monomials' is at the sums."""
    a, b = _grid_positions(degree, dims, base=2 * degree + 1)
    pair_a, pair_b = a[:, None] + a[None, :], b[:, None] + b[None, :]
    precision = 1.0 / variances
    gradient = np.zeros(len(a))
    curvature = np.zeros((len(a), len(a)))
    for k in range(len(means)):
        mass, first, second = moments[k]
        gradient += precision[k] * (second[a, b] - means[k] * first[a, b]) - mass[a, b]
        curvature += precision[k] * (2 * second[pair_a, pair_b] - means[k] * first[pair_a, pair_b])
    if prior is not None:
        penalty, coefficients = prior
        gradient -= penalty @ coefficients
        curvature += penalty
    try:
        np.linalg.cholesky(curvature)  # concave along every direction: Newton's step ascends
        return np.linalg.solve(curvature, gradient)
    except np.linalg.LinAlgError:  # not concave there (or a degenerate basis): Gauss-Newton
        gauss_newton = sum(precision[k] * moments[k, 2][pair_a, pair_b] for k in range(len(means)))
        return np.linalg.lstsq(gauss_newton, gradient, rcond=None)[0]


def _field_line_search(state, step, score, at_least):
    """The field moved by step, halved until score(trial) >= at_least (BIAS_HALVINGS tries):
    (that trial, its score), or (state, None) when none is: the field waits."""
    for halving in range(BIAS_HALVINGS):
        trial = replace(state, coefficients=state.coefficients + step / 2**halving)
        value = score(trial)
        if value >= at_least:
            return trial, value
    return state, None


def _mixture_and_field(state, moments, options):
    """The M-step's first half, the mixture on the corrected intensities, for responsibilities
    with these moments, and the field's Newton step from there."""
    if state.mixture_fixed:
        weights, means, variances = state.weights, state.means, state.variances
    else:
        weights, means, variances = _bias_mixture(moments, options, state)
    mixture = replace(state, weights=weights, means=means, variances=variances)
    prior = None
    if state.regularisation:
        roughness = field_roughness(state.degree, state.image.dims)
        prior = (state.regularisation * state.image.n_pixels * roughness, state.coefficients)
    step = _field_newton_step(moments, means, variances, state.degree, prior, state.image.dims)
    return mixture, step


def _bias_step(state, options):
    """One ECM iteration: the E-step at state (its moments), the mixture's M-step on the
    corrected intensities, then the field's Newton step, halved until the log-likelihood is no
    lower than state's (a generalised EM)."""
    mixture, newton = _mixture_and_field(state, state.moments, options)
    return _field_line_search(mixture, newton, lambda trial: trial.objective, state.objective)[0]


def _bias_coordinates(k):
    """SQUAREM's coordinates of a BiasState: log-weights, means, log-variances, the field."""

    def to_vector(state):
        weights = np.log(np.maximum(state.weights, np.finfo(np.float64).tiny))
        return np.concatenate([weights, state.means, np.log(state.variances), state.coefficients])

    def from_vector(vector, like):
        weights = np.exp(vector[:k] - vector[:k].max())
        return replace(
            like,
            weights=weights / weights.sum(),
            means=vector[k : 2 * k],
            variances=np.exp(vector[2 * k : 3 * k]),
            coefficients=vector[3 * k :],
        )

    return Coordinates(to_vector, from_vector)


def _plain_bias_fit(
    picture,
    image,
    field_model,
    options,
    on_iteration,
    fixed=None,
    with_partial_volume=False,
    cortex=None,
):
    """ECM of the mixture and the field from the plain mixture of the intensities (on their
    distinct values) and no field; with options.starts() > 1 from that many plain starts, keeping
    the run with the highest final log-likelihood.  field_model = (K, degree, regularisation,
    with_field): without the field, the run is the plain mixture's, a start for the spatial
    fit, which fits the field itself.  fixed: a mixture of corrected intensities to keep (read
    by --model): the start, and only the field is fitted.  with_partial_volume: the plain
    mixture is the partial-volume model of its components (_partial_volume_fit; cortex:
    grey matter's mean held there)."""
    n_components, degree, regularisation, with_field = field_model
    fitted = mixture_pixels(picture)
    codes = picture.codes if fitted is None else picture.codes[fitted]
    levels, counts = np.unique(codes, return_counts=True)
    k = min(n_components, len(levels))
    data = _PointFeatures(levels / picture.scale, counts.astype(np.float64))
    rng = np.random.default_rng(options.random_state)
    no_field = np.zeros(len(bias_monomials(degree, image.dims)))

    def fit_one():
        if fixed is not None:
            plain = fixed.with_history([_mean_log_likelihood(fixed, data)])
        else:
            plain = _fresh_mixture(data, k, options, rng, with_partial_volume, cortex)
        state = BiasState(
            *_bias_mixture_parameters(plain),
            no_field,
            image,
            degree,
            regularisation,
            fixed is not None,
            plain.kind,
        )
        k_fitted = plain.n_components
        if not with_field:
            return EMRun.of_fit(state, plain)
        return run_em(
            state,
            partial(_bias_step, options=options),
            options,
            coordinates=None if fixed is not None else _bias_coordinates(k_fitted),
            on_iteration=on_iteration,
        )

    starts = 1 if fixed is not None else options.starts()
    return _best_of_starts(starts, fit_one, score=lambda run: run.history[-1])


def _fresh_mixture(data, k, options, rng, with_partial_volume, cortex=None):
    """The plain mixture of K Gaussians fitted to the 1-D data from a new start; with
    with_partial_volume, the partial-volume model of those tissues (cortex: grey matter's
    mean held there)."""
    plain = _density_em(data, _fresh_start(data, k, options, rng), options)
    if not with_partial_volume:
        return plain
    tissues = plain.reordered(_luminance_order(plain.means))
    return _partial_volume_fit(data, tissues, options, cortex=cortex)


def _bias_mixture_parameters(mixture):
    """(weights, means, variances) of a 1-D GaussianMixtureFit, as a BiasState holds them."""
    variances = np.broadcast_to(mixture.covariances.reshape(-1), (mixture.n_components,))
    return mixture.weights, mixture.means[:, 0], np.array(variances)


def mixture_pixels(picture):
    """Where the field's mixture is started from the intensities: inside the mask but not on
    its black edge (black_edge), unless that leaves under half of it; None without a mask
    (every pixel, no copy made).  Every pixel inside is still labelled and fits the field."""
    inside = picture.mask
    if inside is None:
        return None
    interior = inside & ~black_edge(picture)
    return interior if 2 * np.count_nonzero(interior) >= np.count_nonzero(inside) else inside


def black_edge(picture):
    """(H, W) or (D, H, W) bool: the pixels inside the mask with a neighbour (4 in 2-D, 6 in a
    volume) outside it that is black.  At the edge of a skull-stripped scan a voxel holds
    brain and, in part, the black outside: its intensity is neither a tissue's nor a mix of
    two, and left in the mixture's fit it draws CSF's Gaussian down to the rim, which then
    takes the CSF label (docs/brain.md has what leaving it out gains)."""
    mask = picture.mask
    if mask is None:
        return np.zeros(picture.codes.shape, bool)
    black_outside = ~mask & (picture.codes == 0)
    return mask & ~_interior(black_outside, np.ones(mask.shape, bool))  # next to black outside


def fit_bias_field(
    picture,
    n_components,
    options=FitOptions(),
    *,
    degree,
    regularisation,
    spatial=0.0,
    keep_posteriors=False,
    settings=SpatialSettings(),
    fixed=None,
    with_partial_volume=False,
    cortex=None,
    on_iteration=None,
):
    """A Gaussian mixture of corrected intensities and a smooth multiplicative field, by ECM.

    fixed: a fitted 1-D mixture of corrected intensities to keep (a model read by --model);
    only the field is fitted then.  with_partial_volume: n_components tissues and their
    mixels (section 5's partial volume); the labels are the tissues, the posteriors their
    expected fractions; cortex: grey matter's mean held there (cortex_refit), or None.

    degree: the field's polynomial degree; regularisation: lambda of the field's prior, a
    penalty (lambda / 2) c^T R c per pixel on its roughness (BiasState.penalty); 0 fits the
    field by maximum likelihood.  Both given: their defaults are SegmentOptions' alone.

    Starts from the plain mixture of the intensities and no field (options.starts() starts).
    spatial: BETA of the Potts prior, fitted by mean-field EM with the field from the converged
    plain fit on (_spatial_bias_fit: a partial-volume mixture held, and a restart past
    STRONG_FIELD).

    Returns (model, field, labels, record, posteriors): the mixture of corrected intensities,
    numbered from the darkest, the BiasField, the component of every pixel (H, W), the
    SpatialFit (None without one) and, with keep_posteriors, every component's posterior at
    every pixel (K, H, W) float32, 0 outside the mask (else None).
    """
    image = bias_image(picture, options.passes)
    field_model = (n_components, degree, regularisation, not spatial_on(spatial))
    run = _plain_bias_fit(
        picture, image, field_model, options, on_iteration, fixed, with_partial_volume, cortex
    )
    state, record, spread, restarted = run.state, None, None, False
    if spatial_on(spatial):
        fit = BiasMeanField(image, spatial, options, settings)
        restart = None  # past STRONG_FIELD: _strong_field_start (_spatial_bias_fit)
        if state.partial_volume is not None and fixed is None:
            restart = partial(_strong_field_start, picture, field_model[:3], options, cortex)
        run, spatial_run, record, spread, restarted = _spatial_bias_fit(
            fit, run, restart, on_iteration
        )
        state, q = spatial_run.state.parameters, spatial_run.state.q
        del spatial_run
        labels = _argmax_over_components(q, options.passes)
        if keep_posteriors and state.partial_volume is not None:
            q = _expected_fractions(q, replace(state, image=image))
    else:  # the labels (and posteriors) from one more pass of the fitted state
        labels, q = _labelled(state, keep_posteriors)
    labels = np.ascontiguousarray(image.grid.volume_view(labels))  # a volume's from its stack
    q = None if q is None else image.grid.volume_view(q)
    model, shift = _corrected_model(state, image, run, options.covariance_type)
    order = _luminance_order(model.label_means)
    labels = _relabelled(labels, order)
    if picture.mask is not None:
        labels[~picture.mask] = 0
    posteriors = q[order] if keep_posteriors else None
    del q
    bias = BiasField(
        degree,
        state.coefficients,
        picture.codes.shape,
        shift,
        regularisation,
        spread=field_spread(state) if spread is None else spread,
        restarted=restarted,
    )
    return model.reordered(order), bias, labels, record, posteriors


def _corrected_model(state, image, run, covariance_type):
    """(the GaussianMixtureFit of a fitted state's corrected intensities, the field's shift):
    the field divided by e^shift has mean log 0 over the image's fitted pixels, so the
    corrected intensities are the image over it, the state's times e^shift."""
    degree = state.degree
    grid = coefficient_grid(state.coefficients, degree, image.dims)
    shift = float(grid.ravel() @ _inside_moments(image, degree))
    scale = math.exp(shift)
    variances = state.variances[:, None, None] * scale**2
    if state.partial_volume is not None:
        covariance_type = state.partial_volume.covariance_type
    if covariance_type == "tied":  # one variance: scikit-learn's tied shape, (D, D)
        variances = variances[0]
    elif covariance_type == "spherical":  # a partial-volume model's variance each, (K,)
        variances = variances[:, 0, 0]
    else:
        covariance_type = "full"
    corrected = (state.weights, state.means[:, None] * scale, variances)
    model = GaussianMixtureFit.of_run(corrected, covariance_type, run)
    return replace(model, kind=state.kind), shift


def _labelled(state, keep_posteriors):
    """(labels, posteriors or None) of a fitted bias state, from one more pass over its image."""
    k = len(state.label_weights)
    labels = np.zeros(state.image.values.shape, dtype=np.uint8 if k <= 256 else np.uint16)
    q = np.empty((k,) + labels.shape, dtype=np.float32) if keep_posteriors else None
    _bias_pass(state, labels=labels, posteriors=q)
    return labels, q


def _spatial_bias_fit(fit, run, restart, on_iteration):
    """The spatial fit (a BiasMeanField) from a plain bias fit's run, a partial-volume mixture
    held.  Held, that mixture is the fit to the uncorrected intensities, wrong under a strong
    field: where the field found is past STRONG_FIELD (STRONG_FIELD_VOLUME in a volume), the
    fit starts again from restart(image, on_iteration) = (a run, the state to start from):
    _strong_field_start (None: no second start).  Returns (the run started from, the spatial
    run, its SpatialFit, the field's spread, restarted)."""
    spatial_run, record = _spatial_run(fit, _held(run.state), on_iteration)
    spread = field_spread(spatial_run.state.parameters)
    strong = STRONG_FIELD_VOLUME if isinstance(fit.image.grid, Stack) else STRONG_FIELD
    if restart is None or spread <= strong:
        return run, spatial_run, record, spread, False
    del spatial_run  # the mixture of the uncorrected intensities misled the field
    run, start = restart(fit.image, on_iteration)
    spatial_run, record = _spatial_run(fit, start, on_iteration)
    return run, spatial_run, record, field_spread(spatial_run.state.parameters), True


def _strong_field_start(picture, field_model, options, cortex, image, on_iteration):
    """(the run, the state) a strong field's spatial fit starts from, of two: the field of the
    ECM of the field and the partial-volume mixture, or of the ECM of the field and the
    tissues' mixture without mixels, a variance each (STRONG_FIELD_ECM_COVARIANCE), each on at
    most STRONG_FIELD_SITES sites of the image, the one whose corrected intensities' histogram
    is sharper (corrected_entropy); and the partial-volume mixture fitted afresh to the
    intensities that field corrects (refitted_mixture), held.  Mixels explain voxels the field
    shifts (white matter darkened onto the grey-white mixel), so that the first ECM can find
    too little of a field; where most voxels mix tissues, it is the second that finds too
    little (docs/brain.md).  Where grey matter's mean is held at the cortex (cortex_refit),
    the first alone, and its own mixture.  field_model: (K, degree, regularisation)."""
    coarse = _coarsest(image, STRONG_FIELD_SITES)
    ecm = field_model + (True,)
    run = _plain_bias_fit(
        picture, coarse, ecm, options, on_iteration, with_partial_volume=True, cortex=cortex
    )
    if cortex is not None:
        return run, _held(replace(run.state, image=image))
    tissues = replace(options, covariance_type=STRONG_FIELD_ECM_COVARIANCE)
    other = _plain_bias_fit(picture, coarse, ecm, tissues, on_iteration)
    sites = log_sites(picture, STRONG_FIELD_SITES)
    if sites is not None:
        shape, degree = picture.codes.shape, field_model[1]
        entropies = [
            corrected_entropy(sites, shape, f.state.coefficients, degree) for f in (run, other)
        ]
        if entropies[1] < entropies[0]:
            run = other
    fitted = mixture_pixels(picture)
    fitted = image.inside if fitted is None else image.grid.stacked(fitted, False)
    return run, _held(refitted_mixture(replace(run.state, image=image), fitted, options, True))


REFIT_LEVELS = 1024  # steps a unit of intensity: refitted_mixture's histogram of the corrected


def refitted_mixture(state, fitted, options, with_partial_volume):
    """The bias state with its field and its mixture fitted afresh (_fresh_mixture, one start
    from options' seed; with_partial_volume, the tissues' and their mixels') to the corrected
    intensities of the fitted pixels (a bool image, None: every pixel), on their histogram in
    steps of 1 / REFIT_LEVELS (far below any noise).

    The ECM of a strong field and the mixture finds the field but can leave the mixture at
    a poorer maximum it drifted to with the field (tissues' means crossed, a tissue emptied);
    fitted to the corrected image from the start, the mixture is what a scan without that
    field gets (docs/brain.md)."""
    image = state.image
    model, width = _BandModel(state), image.values.shape[1]
    histogram = np.zeros(0, dtype=np.int64)
    for top, bottom in image.bands(1):
        z = model.corrected(slice(top, bottom), slice(0, width), np.float64)[0]
        if fitted is not None:
            z = z[fitted[top:bottom]]
        codes = np.rint(z.ravel() * REFIT_LEVELS).astype(np.intp)
        band = np.bincount(codes, minlength=len(histogram))
        band[: len(histogram)] += histogram
        histogram = band
    levels = np.flatnonzero(histogram)
    data = _PointFeatures(levels / REFIT_LEVELS, histogram[levels].astype(np.float64))
    rng = np.random.default_rng(options.random_state)
    k = state.kind.n_labels(len(state.weights))
    mixture = _fresh_mixture(data, k, options, rng, with_partial_volume)
    weights, means, variances = _bias_mixture_parameters(mixture)
    return replace(
        state,
        weights=weights,
        means=means,
        variances=variances,
        kind=mixture.kind,
    )


def _coarsest(image, most):
    """The image's grid of every 2^n-th row and column (and slice), n the least that leaves at
    most `most` sites (and some inside): a smooth field and a mixture of 3 tissues are fitted
    as well there, in a fraction of the time."""
    while image.grid.n_sites(image.values.shape) > most:  # as _coarse_to_fine counts them
        coarser = image.coarser()
        if not coarser.n_pixels:
            break
        image = coarser
    return image


def _held(state):
    """The state the spatial fit starts from: a partial-volume model's mixture held (the prior
    smooths the tissues, docs/method.md), any other's fitted with the field."""
    return state if state.partial_volume is None else replace(state, mixture_fixed=True)


def field_spread(state):
    """The fitted field's max / min over the fitted pixels, robustly: e to the distance between
    the 1st and 99th percentiles of the log field, on at most about 65,536 sites of the grid."""
    image = state.image
    stride = max(1, math.isqrt(image.values.size // 65536))
    sites = (slice(0, None, stride), slice(0, None, stride))
    log_field = _BandModel(state).corrected(*sites, dtype=np.float64)[1]
    if image.inside is not None:
        log_field = log_field[image.inside[sites]]
    return spread_of(log_field)


def spread_of(log_field):
    """A field's max / min, robustly, from its log at some sites: e to the distance between
    the 1st and 99th percentiles (1 at no site)."""
    if log_field.size == 0:
        return 1.0
    low, high = np.percentile(log_field, [1, 99])
    return math.exp(high - low)


def _inside_moments(image, degree):
    """The mean over the fitted pixels of u^a v^b, a, b <= degree, flattened as the grid."""
    height, width = image.values.shape
    v = image.column_powers(degree)
    sums = 0.0
    for top, bottom in image.bands(1):
        u = image.row_powers(slice(top, bottom), degree)
        inside = (
            np.ones((bottom - top, width)) if image.inside is None else image.inside[top:bottom]
        )
        sums += u.T @ (inside.astype(np.float64) @ v)
    return sums.ravel() / image.n_pixels


def _expected_log_likelihood(moments, state):
    """sum_i sum_k q_ik log(w_k N(z_i | k)) - sum_i t_i, from the moments of q at the state's
    field (whose Jacobian term is the moments' constant-weight ones times the coefficients)."""
    degree = state.degree
    mass, first, second = moments[:, :, 0, 0].T
    const = np.log(state.weights) - 0.5 * np.log(2 * np.pi * state.variances)
    spread = (second - 2 * state.means * first + state.means**2 * mass) / (2 * state.variances)
    low = state.image.low_rows(degree)
    jacobian = (
        coefficient_grid(state.coefficients, degree, state.image.dims).ravel()
        @ moments[:, 0].sum(axis=0)[low, : degree + 1].ravel()
    )
    return float(np.sum(mass * const - spread) - jacobian)


def _bias_data_term(q, state, kept=None):
    """sum_i sum_k q_ik log(w_k N(z_i | k)) - t_i sum_k q_ik, band by band (q: (K, h, w)).

    In float64: the field's line search compares it with the same sum from the moments.
    kept: a HeldMeanField's store of its held parameters' log-probabilities (_kept_calls).
    """
    bands, width = _BandModel(state), state.image.values.shape[1]

    def band_logp(rows, cols):
        z, t = bands.corrected(rows, cols, np.float64)
        logp = _label_log_densities(state, z)
        logp -= t
        return logp

    if kept is not None:
        band_logp = _kept_calls(kept, "data", band_logp, copy=False)

    def band_term(band):
        rows = slice(*band)
        return float(np.sum(band_logp(rows, slice(0, width)) * q[:, rows], dtype=np.float64))

    return sum(state.image.passes.map(band_term, state.image.bands(len(q))))


def _moments_of(q, state):
    """The moments (K, 3, 2D + 1, 2D + 1) of given responsibilities q (L, h, w) at the state's
    field, of each Gaussian's share of them (_gaussian_shares); and for a partial-volume model
    the data term (as _bias_data_term's) from the same pass, else None."""
    image, degree = state.image, state.degree
    bands, width = _BandModel(state), image.values.shape[1]
    v = image.column_powers(2 * degree)

    def band_moments(band):
        rows = slice(*band)
        z, t = bands.corrected(rows, slice(0, width), np.float64)  # as _bias_data_term's
        r, label_logp = _gaussian_shares(q[:, rows], state, z)
        moments = np.zeros((len(r), 3) + image.moment_shape(degree))
        _add_moments(moments, r, z, image.row_powers(rows, 2 * degree), v)
        if label_logp is None:
            return moments, 0.0
        label_logp -= t
        return moments, float(np.sum(label_logp * q[:, rows], dtype=np.float64))

    moments, data = 0.0, 0.0
    for band_moments_, band_data in image.passes.map(band_moments, image.bands(len(state.weights))):
        moments += band_moments_
        data += band_data
    return moments, (data if state.partial_volume is not None else None)


def _gaussian_shares(q, state, z):
    """Each Gaussian's share of the labels' q (L, h, w) at corrected intensities z, and the
    labels' log(w p(z | label)): (q, None), or for a partial-volume model each tissue's
    posterior split over its Gaussians as their densities at z (the responsibilities whose
    expected log-likelihood has the objective's gradient in the field) and the tissues'."""
    pv = state.partial_volume
    if pv is None:
        return q, None
    shares = _bias_log_densities(state, z)
    label_logp = pv.shares_within_tissues(shares)
    for g, t in enumerate(pv.tissue_of):
        shares[g] *= q[t]
    return shares, label_logp


def _expected_fractions(q, state):
    """(T, H, W) float32: each tissue's expected share of every pixel from the tissues'
    posteriors q (T, H, W) of a partial-volume model's spatial fit (FAST's partial volume
    maps)."""
    image, width = state.image, state.image.values.shape[1]
    bands, out = _BandModel(state), np.empty_like(q)

    def band_fractions(band):
        rows = slice(*band)
        z, _ = bands.corrected(rows, slice(0, width))
        shares = _gaussian_shares(q[:, rows], state, z)[0]
        out[:, rows] = state.partial_volume.expected_fractions(shares)

    image.passes.run(band_fractions, image.bands(len(state.weights)))
    return out


@dataclass(frozen=True)
class BiasMeanField:
    """The spatial fit with the field: each iteration a checkerboard sweep of q, then the
    mixture's M-step and the field's Newton step (halved until the objective does not fall),
    both for that q.  Every sweep updates every site."""

    image: BiasImage
    beta: float
    options: FitOptions
    settings: SpatialSettings
    full_step = None

    @property
    def shape(self):
        return self.image.values.shape

    @property
    def inside(self):
        return self.image.inside

    @property
    def n_pixels(self):
        return self.image.n_pixels

    @property
    def passes(self):
        return self.image.passes

    @property
    def grid(self):
        return self.image.grid

    def coarser(self):
        return replace(self, image=self.image.coarser())

    def held(self, parameters):
        """The fit on every pixel after its coarser grid's: the field and the mixture of that
        grid held (fitted on every other pixel along each axis, a quarter of an image's and an
        eighth of a volume's, as SPM fits its model on voxels sampled every few millimetres),
        the labels swept with them (HeldMeanField).  A volume's sites' log-probabilities are
        tabulated once.  An image's are computed band by band, as this fit's are, and kept
        from the first sweep on (_kept_calls) where they fit in HELD_KEPT_BYTES (4 bytes a
        label and pixel for the sweeps, 8 for the objective's data term: 36 MB at a megapixel
        of three tissues, 864 MB at 24, where they are computed again in every sweep)."""
        if not self.grid.held_table:
            size = len(parameters.label_weights) * self.image.values.size * (4 + 8)
            kept = {} if size <= HELD_KEPT_BYTES else None
            return HeldMeanField(None, self.image, self.beta, self.options, self.settings, kept)
        state = replace(parameters, image=self.image)
        bands, width = _BandModel(state), self.image.values.shape[1]
        table = np.empty((len(state.label_weights),) + self.image.values.shape, np.float32)
        for top, bottom in self.image.bands(len(state.weights)):
            z, t = bands.corrected(slice(top, bottom), slice(0, width))
            table[:, top:bottom] = _label_log_densities(state, z)
            table[:, top:bottom] -= t  # the Jacobian: the objective is the image's likelihood
        return HeldMeanField(table, self.image, self.beta, self.options, self.settings)

    def site_logp(self, parameters):
        return _BandModel(replace(parameters, image=self.image)).site_logp

    def start(self, parameters, padded, from_posterior):
        state = replace(parameters, image=self.image)
        total = _start_terms(self, padded, self.site_logp(state), from_posterior)
        total += self.data_term(padded[:, 1:-1, 1:-1], state)
        return MeanField(state, padded, total, self.n_pixels)

    def data_term(self, q, state):
        """The objective's terms of the data and the field's prior, summed over the pixels."""
        return _bias_data_term(q, state) - state.penalty() * self.n_pixels

    def step(self, state):
        parameters, q = state.parameters, state.q
        terms = _sweep(state.padded, _sweep_of(self, state, _BandModel(parameters).site_logp))
        moments, data = _moments_of(q, parameters)
        mixture, newton = _mixture_and_field(parameters, moments, self.options)
        if data is None:
            data = _expected_log_likelihood(moments, mixture)
        # else: a partial-volume model's mixture is held, and the data term is the pass's
        data -= mixture.penalty() * self.n_pixels
        new, found = _field_line_search(
            mixture, newton, lambda trial: self.data_term(q, trial), data
        )
        data = data if found is None else found
        clear_gain = self.options.tol * self.n_pixels
        return _after_iteration(state, new, terms + data, clear_gain, self.settings, True)


HELD_KEPT_BYTES = 1 << 26  # an image's held log-probabilities kept up to this (BiasMeanField.held)


def _kept_calls(store, name, compute, copy=True):
    """compute(rows, cols) -> array (slices of an image), each result kept in store the first
    time those slices are asked for and given again every time after (a copy where the caller
    overwrites it: copy): the same bits as computing it again, where what it is computed from
    does not change (a HeldMeanField's held parameters; the sweeps ask for the same
    sub-lattices of the same bands every time)."""

    def call(rows, cols):
        key = (name, rows.start, rows.stop, rows.step, cols.start, cols.stop, cols.step)
        found = store.get(key)
        if found is None:
            found = store[key] = compute(rows, cols)
        return found.copy() if copy else found

    return call


@dataclass(frozen=True)
class HeldMeanField:
    """The spatial fit of labels whose sites' log-probabilities are fixed (BiasMeanField.held):
    table (L, h, w) float32, each voxel's log(w p(y | label)) with its Jacobian, or None: an
    image's, computed from the parameters band by band, and where kept is a dict (a store
    filled as the fit runs: _kept_calls) computed once.  Each iteration is a checkerboard
    sweep of every site; the objective's data term is q . those log-probabilities summed in
    float64.  The parameters are kept as they came."""

    table: np.ndarray | None
    image: BiasImage
    beta: float
    options: FitOptions
    settings: SpatialSettings
    kept: dict | None = field(default=None, compare=False)  # an image's (_kept_calls), or None
    full_step = None

    shape = property(lambda self: self.image.values.shape)
    inside = property(lambda self: self.image.inside)
    n_pixels = property(lambda self: self.image.n_pixels)
    passes = property(lambda self: self.image.passes)
    grid = property(lambda self: self.image.grid)

    def held(self, parameters):
        return self

    def site_logp(self, parameters):
        if self.table is None:
            computed = _BandModel(replace(parameters, image=self.image)).site_logp
            return computed if self.kept is None else _kept_calls(self.kept, "site", computed)
        return lambda rows, cols: self.table[:, rows, cols].copy()

    def data_term(self, q, parameters):
        if self.table is None:
            return _bias_data_term(q, replace(parameters, image=self.image), self.kept)

        def band_term(band):
            rows = slice(*band)
            return float(np.sum(q[:, rows] * self.table[:, rows], dtype=np.float64))

        return sum(self.passes.map(band_term, self.image.bands(len(q))))

    def start(self, parameters, padded, from_posterior):
        total = _start_terms(self, padded, self.site_logp(parameters), from_posterior)
        total += self.data_term(padded[:, 1:-1, 1:-1], parameters)
        total -= parameters.penalty() * self.n_pixels
        return MeanField(parameters, padded, total, self.n_pixels)

    def step(self, state):
        sweep = _sweep_of(self, state, self.site_logp(state.parameters))
        total = _sweep(state.padded, sweep) + self.data_term(state.q, state.parameters)
        total -= state.parameters.penalty() * self.n_pixels
        clear_gain = self.options.tol * self.n_pixels
        return _after_iteration(state, state.parameters, total, clear_gain, self.settings, True)


# --- 6c'. A first field that sharpens the histogram (--bias-start histogram) -------------------
# The ECM above starts from no field, and under a strong one it stops short: the mixture fits
# the blurred histogram, and the field's step then gains little (docs/brain.md).  Before any
# tissue model, a field can be found as N3 (Sled, Zijdenbos and Evans, IEEE TMI 17, 1998) and
# Likar, Viergever and Pernus (IEEE TMI 20, 2001) find theirs: the smooth field whose removal
# makes the histogram of log intensities sharpest, here the least entropy of a smoothed
# histogram of fixed bin width, over a polynomial of degree SHARPEN_DEGREE (degree 1, then 2:
# the first degree's optimum starts the second).  Where it sharpens the histogram by
# SHARPEN_GAIN nats or more, the image is divided by it and requantized (sharpened_picture),
# the whole fit runs on that, and the result is given back in the picture's own terms: the
# field the product of both, the mixture of the image over it (_unsharpened).  Chosen on the
# evaluation grid's seed 1, reported on seeds 2 and 3 (docs/brain.md).
BIAS_STARTS = ("histogram", "none")  # or auto: histogram on an image, none on a volume
SHARPEN_DEGREE = 2  # a cubic trades anatomy for a slope where there is no field
SHARPEN_GAIN = 0.15  # nats of entropy the first field must remove to be used
SHARPEN_RIDGE = 0.01  # x the coefficients' sum of squares, added to the entropy
SHARPEN_BINS = 96  # bins over the log intensities' 0.5th to 99.5th percentiles (the bin width)
SHARPEN_PAD = 0.15  # of that range, on either side
SHARPEN_SMOOTH = 1.5  # bins: the sd of the Gaussian the histogram is smoothed with
SHARPEN_DEPTH = 2  # steps inside the mask (4-neighbour, 6 in a volume): its edge mixes black
SHARPEN_SITES = 1 << 14  # at most this many pixels: those inside on a grid of every n-th row
SHARPEN_SCALE_SITES = 1 << 18  # and for the sharpened picture's scale (its 99.9th percentile)


def histogram_entropy(values, width):
    """The entropy (nats) of the histogram of values (1-D) in bins of the given width from
    their least, each value split between its two nearest bins, smoothed by a Gaussian of
    SHARPEN_SMOOTH bins."""
    from scipy.ndimage import gaussian_filter1d

    position = (values - values.min()) / width
    low = position.astype(np.intp)
    upper = position - low
    n_bins = int(low.max()) + 2
    counts = np.bincount(low, 1 - upper, n_bins) + np.bincount(low + 1, upper, n_bins)
    counts = gaussian_filter1d(counts, SHARPEN_SMOOTH, mode="constant")
    p = counts[counts > 0] / counts.sum()
    return float(-(p @ np.log(p)))


def monomial_features(indices, shape, degree):
    """(n, P) the field's basis (bias_monomials) at n pixels of an image (or volume) of that
    shape, given by one index array per axis; coordinates scaled as BiasField's."""
    powers = [coordinate_powers(i, n, degree) for i, n in zip(indices, shape)]
    columns = [
        np.prod([p[:, e] for p, e in zip(powers, exponents)], axis=0)
        for exponents in bias_monomials(degree, len(shape))
    ]
    return np.stack(columns, axis=1)


def sharpening_field(picture, most_degree=SHARPEN_DEGREE):
    """(BiasField of degree min(SHARPEN_DEGREE, most_degree) over the picture's coordinates, the
    entropy it removes in nats) of a gray picture: the field that sharpens the histogram of the
    log intensities of the pixels SHARPEN_DEPTH steps inside the mask (the mask, where that
    leaves under half), on at most about SHARPEN_SITES of them.  Its log has mean 0 over them;
    None with fewer than 2 such pixels."""
    from scipy.optimize import minimize

    sites = log_sites(picture, SHARPEN_SITES)
    if sites is None:
        return None
    indices, logs, width = sites
    codes = picture.codes
    degree = min(SHARPEN_DEGREE, most_degree)
    features = monomial_features(indices, codes.shape, degree)
    means = features.mean(axis=0)
    features -= means
    start = np.zeros(0)
    for d in range(1, degree + 1):  # the monomials in order of degree: d's first columns
        used = features[:, : len(bias_monomials(d, codes.ndim))]

        def objective(c, used=used):
            return histogram_entropy(logs - used @ c, width) + SHARPEN_RIDGE * float(c @ c)

        x0 = np.concatenate([start, np.zeros(used.shape[1] - len(start))])
        options = dict(xtol=1e-3, ftol=1e-6, maxfev=4000)
        start = minimize(objective, x0, method="Powell", options=options).x
    gain = histogram_entropy(logs, width) - histogram_entropy(logs - features @ start, width)
    shift = float(means @ start)  # the log field's mean over those pixels
    return BiasField(degree, start, codes.shape, shift, SHARPEN_RIDGE), gain


def log_sites(picture, most):
    """(indices, log intensities, bin width) of the pixels SHARPEN_DEPTH steps inside the mask
    (the mask, where that leaves under half), on at most about `most` of them (_grid_sites), the
    bin width histogram_entropy measures their sharpness in: SHARPEN_BINS bins over their 0.5th
    to 99.5th percentiles, SHARPEN_PAD of that either side.  None with fewer than 2 such
    pixels, or one intensity."""
    from scipy.ndimage import binary_erosion

    codes = picture.codes
    inside = (codes > 0) if picture.mask is None else picture.mask & (codes > 0)
    inner = binary_erosion(inside, iterations=SHARPEN_DEPTH)
    if 2 * np.count_nonzero(inner) < np.count_nonzero(inside):
        inner = inside
    indices = _grid_sites(inner, most)
    if len(indices[0]) < 2:
        return None
    logs = np.log(codes[indices].astype(np.float64))
    low, high = np.percentile(logs, [0.5, 99.5])
    width = (1 + 2 * SHARPEN_PAD) * (high - low) / (SHARPEN_BINS - 1)
    return (indices, logs, width) if width > 0 else None


def corrected_entropy(sites, shape, coefficients, degree):
    """histogram_entropy of the log intensities at sites (log_sites of a picture of that shape)
    less a log field of these coefficients: how sharp the histogram of the intensities that
    field corrects is (the less, the sharper)."""
    indices, logs, width = sites
    log_field = monomial_features(indices, shape, degree) @ coefficients
    return histogram_entropy(logs - log_field, width)


def _grid_sites(where, most):
    """The indices (one array per axis) of the True pixels of where on its grid of every
    step-th row and column (and slice), step the least that leaves at most `most` of them."""
    count, step = np.count_nonzero(where), 1
    while count > most * step**where.ndim:
        step += 1
    found = np.nonzero(where[(slice(None, None, step),) * where.ndim])
    return tuple(i * step for i in found)


def _field_bands(field, band_pixels=PIXEL_CHUNK):
    """(index, log field) over the field's shape in bands: rows of an image, slices of a
    volume; index selects the band of an array of that shape.  float64, O(band) memory."""
    shape = field.shape
    cols = np.arange(shape[-1])
    if len(shape) == 3:
        for z in range(shape[0]):
            yield (z,), field.log_field(np.arange(shape[1]), cols, z)
        return
    rows = max(1, band_pixels // shape[-1])
    for top in range(0, shape[0], rows):
        bottom = min(top + rows, shape[0])
        yield slice(top, bottom), field.log_field(np.arange(top, bottom), cols)


def bias_start(options, picture):
    """Where the field's fit starts: "histogram" or "none".  auto: the histogram's first field
    on an image, none on a volume (on the grid's whole volumes the first field followed the
    true one, correlation 0.92 to 0.98, but the fit from it ended 4 to 6 points below the fit
    from no field, restarted: docs/brain.md)."""
    if options.bias_start != "auto":
        return options.bias_start
    return "none" if picture.volume is not None else "histogram"


def sharpened_picture(picture, field):
    """The picture divided by the field inside its mask (every pixel without one), the 99.9th
    percentile of its pixels there that are not 0 kept, rounded to its codes; 0 stays 0 and
    nothing else becomes 0 (a black outside stays the only black); outside, as it was.
    Returns (the picture, the factor a: sharpened = a x picture / field, before rounding)."""
    codes, top = picture.codes, picture.n_codes - 1
    lit = codes > 0 if picture.mask is None else picture.mask & (codes > 0)
    sites = _grid_sites(lit, SHARPEN_SCALE_SITES)
    values = codes[sites] / np.exp(
        monomial_features(sites, codes.shape, field.degree) @ field.coefficients - field.shift
    )
    factor = float(np.percentile(codes[sites], 99.9) / np.percentile(values, 99.9))
    sharpened = codes.copy()
    for band, log_field in _field_bands(field):
        band_lit = lit[band]
        divided = codes[band][band_lit] / np.exp(log_field[band_lit])
        sharpened[band][band_lit] = np.clip(np.rint(divided * factor), 1, top)
    return replace(picture, codes=sharpened), factor


def _unsharpened(segmentation, picture, first, factor, gain):
    """The segmentation of a sharpened picture (sharpened_picture: a x picture / first) in the
    picture's own terms: the field the product of the first and the fitted one, its mean log 0
    over the mask, the mixture of the picture over it (the fit's scaled by 1 / a e^(shift
    difference)), its spread over the mask's pixels."""
    bias = segmentation.bias
    total = np.zeros_like(bias.coefficients)
    total[: len(first.coefficients)] = first.coefficients
    total += bias.coefficients
    whole = replace(bias, coefficients=total, shift=0.0, start_gain=gain, started=True)
    inside = np.ones(picture.codes.shape, bool) if picture.mask is None else picture.mask
    sums = [float(np.sum(log[inside[band]])) for band, log in _field_bands(whole)]
    shift = math.fsum(sums) / max(np.count_nonzero(inside), 1)
    sites = _grid_sites(inside, 1 << 16)  # its spread as field_spread reads one
    log_field = monomial_features(sites, picture.codes.shape, whole.degree) @ total
    whole = replace(whole, shift=shift, spread=spread_of(log_field))
    scale = factor * math.exp(bias.shift + first.shift - shift)  # fitted = scale x corrected
    model = segmentation.model
    model = replace(model, means=model.means / scale, covariances=model.covariances / scale**2)
    return replace(segmentation, picture=picture, model=model, bias=whole)


# --- 6d. Putting it together ---------------------------------------------------


@dataclass(frozen=True)
class SegmentOptions:
    """What is fitted to an image beyond EM's own FitOptions; the defaults of the API and of
    the command line alike.

    k_max: the largest K that n_components="auto" tries, criterion how it chooses (K_CRITERIA,
    section 6a).  quantized: fit integer gray levels as
    bins (section 5b).  spatial: BETA of a Potts prior on the labels (section 6b; 0 = off).
    bias_field: fit a multiplicative field of polynomial degree bias_degree with the mixture
    (section 6c; 8- and 16-bit gray images, a number of components, no shared model, not
    quantized).  partial_volume: K tissues and the mixels between them (PartialVolume; tied
    covariance, a number of components, not quantized); cortex_check: its three tissues'
    fit checked against the brain's surface, refitted where white matter took the cortex
    (cortex_to_hold, cortex_refit; a masked gray image).  keep_posteriors: keep the per-pixel
    responsibilities of a spatial or bias fit for posterior_maps (K float32 a pixel; the plain
    model's come from the distinct values; a partial-volume model's: expected fractions).
    """

    k_max: int = setting(10, Domain(int, 1))
    criterion: str = setting("classes", Domain(choices=K_CRITERIA))
    quantized: bool = False
    partial_volume: bool = False
    cortex_check: bool = False
    spatial: float = setting(0.0, Domain(float, auto=True))
    bias_field: bool = False
    bias_degree: int = setting(3, Domain(int, 1))
    bias_reg: float = setting(1.0, Domain(float))
    bias_start: str = setting("none", Domain(choices=BIAS_STARTS, auto=True))
    keep_posteriors: bool = False
    spatial_settings: SpatialSettings = SpatialSettings()
    fit: FitOptions = FitOptions()

    def __post_init__(self):
        check_settings(self)
        for option, other, clashes, why in OPTION_CLASHES:
            if getattr(self, option) and clashes(self):
                value = getattr(self.fit if other in FIT_FIELDS else self, other)
                raise OptionClash(option, other, value, why)


class OptionClash(ValueError):
    """Two options of SegmentOptions that cannot work together: option (set) and other (at
    value), why not.  The command line says the same with its flags, as a usage error."""

    def __init__(self, option, other, value, why):
        super().__init__(f"{option} does not combine with {other}={value!r}: {why}")
        self.option, self.other, self.value, self.why = option, other, value, why


# (an option, another field, whether that field's value clashes with it, why): the one list
# SegmentOptions checks, for the API and the command line alike.
OPTION_CLASHES = (
    (
        "partial_volume",
        "covariance_type",
        lambda options: options.fit.covariance_type != "tied",
        "its tissues and mixels share one covariance (tied), or have theirs tied by a prior "
        "(--variance-prior)",
    ),
    (
        "partial_volume",
        "quantized",
        lambda options: options.quantized,
        "mixels are densities, not bins",
    ),
    (
        "bias_field",
        "quantized",
        lambda options: options.quantized,
        "corrected values are no longer bins",
    ),
)
FIT_FIELDS = frozenset(f.name for f in fields(FitOptions))
# (an option of SegmentOptions, why it needs a number of components): refused with
# n_components="auto" by the API and with -k auto by the command line (check_components).
NEEDS_A_NUMBER_OF_COMPONENTS = (
    ("partial_volume", "give the number of tissues"),
    ("bias_field", "choose K without the field first"),
)


def check_components(n_components, options):
    """OptionClash where n_components "auto" meets an option that needs a number of them."""
    if isinstance(n_components, str) and n_components == "auto":
        for option, why in NEEDS_A_NUMBER_OF_COMPONENTS:
            if getattr(options, option):
                raise OptionClash(option, "n_components", "auto", why)


def segment_options(options=None, **overrides):
    """options (SegmentOptions; default its defaults) with overrides of its fields or of its
    FitOptions' fields (covariance_type=, tol=, ...)."""
    options = SegmentOptions() if options is None else options
    fit_overrides = {name: overrides.pop(name) for name in list(overrides) if name in FIT_FIELDS}
    if fit_overrides:
        overrides["fit"] = replace(overrides.get("fit", options.fit), **fit_overrides)
    return replace(options, **overrides)


@dataclass
class Segmentation:
    picture: Picture
    points: Points
    model: GaussianMixtureFit  # components ordered by luminance
    labels: np.ndarray  # (H, W) component index of every pixel
    requested_k: object  # an int, or "auto"
    k_search: KSearch | None = None  # how -k auto chose K
    shared: SharedModel | None = None  # the batch's model, when the image was labelled with one
    spatial: SpatialFit | None = None  # the Potts-prior fit's record, with --spatial
    posteriors: np.ndarray | None = None  # (K, H, W) float32 q of the spatial fit, when kept
    bias: BiasField | None = None  # with --bias-field: the field; the model is of image / field
    point_labels: np.ndarray | None = None  # each point's label, where a pixel takes its point's

    @property
    def saved_model(self):
        """The file of the model the image was labelled with (--model), or None: fitted here."""
        return None if self.shared is None else self.shared.file

    @cached_property
    def label_counts(self):
        """(n_labels,) the pixels inside that take each label.  Counted once (from the points'
        counts where a pixel's label is its point's, else a pass over the label map), asked
        for by the notes and the JSON."""
        n_labels = self.model.n_labels
        if self.point_labels is None:
            return _label_counts(self.labels, self.picture.mask, n_labels)
        return np.bincount(self.point_labels, weights=self.points.weights, minlength=n_labels)

    @property
    def empty_components(self):
        """Components that ended with (almost) no pixels: fewer than EMPTY_SHARE of the fitted
        pixels take their label.  A strong spatial prior can empty a small class (thin CSF);
        the fit says so rather than pass off K - 1 classes as K."""
        return _empty_of_counts(self.label_counts)


def fit_points(points, n_components, options=None, on_iteration=None, shares_of=None, **overrides):
    """The model of weighted distinct values (one image's, or a batch's pooled): (model,
    KSearch or None).

    n_components: an int (lowered to the number of distinct values when there are fewer), or
    "auto" to choose K in 1..options.k_max by options.criterion (section 6a); shares_of: how
    "classes" looks at where a model's labels fall (region_shares_of the images the points
    came from; None: it judges a fit by collapse alone; segment_points looks at its image).
    options: SegmentOptions (or overrides of its fields and of FitOptions'); its quantized fits
    integer gray levels as bins (section 5b), ignored for any other values.
    """
    options = segment_options(options, **overrides)
    check_components(n_components, options)
    data = _PointFeatures(points.values, points.weights, points.scale)
    with options.fit.passes.opened() as passes:  # the E-step's threads, started once
        options = replace(options, fit=replace(options.fit, passes=passes))
        return _fit_features(data, points, n_components, options, on_iteration, shares_of)


def _fit_features(data, points, n_components, options, on_iteration, shares_of=None, cortex=None):
    """fit_points on the points' features, made once by the caller (they can be the largest
    array of a fit: ten float64 a distinct colour); shares_of: select_components' look at the
    image, or None; cortex: grey matter's mean held there (cortex_refit), or None."""
    top = gray_level_top(points) if options.quantized else None
    if n_components != "auto":
        fit = fit_components(
            data,
            n_components,
            options.fit,
            top,
            on_iteration,
            with_partial_volume=options.partial_volume,
            cortex=cortex,
        )
        return fit, None
    k_max = min(options.k_max, _n_distinct(data))
    sample = data if top is not None else probe_sample(data, options.fit.random_state)

    def fit_k(k, start=None, max_iter=None, every_point=False):
        fit_options = options.fit
        if max_iter is not None and max_iter < fit_options.max_iter:
            fit_options = replace(fit_options, max_iter=max_iter)
        if start is not None:
            fit_options = replace(fit_options, n_init=1)
        else:  # for K > 1, the last K's split is one of the starts
            starts = options.fit.starts(choosing_k=True)
            fit_options = replace(fit_options, n_init=max(1, starts - (k > 1)))
        on = data if every_point else sample
        stage = staged(on_iteration, f"K = {k} of 1..{k_max}" + (" on every point" * every_point))
        return fit_components(on, k, fit_options, top, stage, start=start)

    drawn = None if sample is data else K_PROBE_PIXELS
    return select_components(
        fit_k, data, k_max, options.criterion, shares_of, options.fit.reg_covar, drawn
    )


def probe_sample(data, random_state):
    """The points -k auto fits each K on: K_PROBE_PIXELS pixels drawn with the counts where
    the points are more than K_PROBE_ABOVE and the pixels at least twice the draw (there a
    pass over every point is costly, and a draw's fit is near enough every point's to judge
    K by), else data itself."""
    if len(data) <= K_PROBE_ABOVE or data.total_weight < 2 * K_PROBE_PIXELS:
        return data
    rng = np.random.default_rng(np.random.SeedSequence(random_state).spawn(2)[1])
    return _drawn_sample(data, K_PROBE_PIXELS, np.cumsum(data.weights), rng)


def region_shares_of(pictures, passes):
    """select_components' look at the images: the region, boundary and deep shares (the region
    share at depth BOUNDARY_DEPTH) of a model's labels over every (picture, points, data) of
    pictures, data the points' features
    (_PointFeatures), an iterable made anew for each model (a batch's images read again),
    their pixels counted together."""

    def shares_of(model):
        n_labels, sums = model.n_labels, 0
        for picture, points, data in pictures():
            labels = label_pixels(picture, points, _most_likely(data, model), n_labels, passes)
            sums = sums + share_counts(labels, n_labels, picture.mask, passes)
        return tuple(_ratio(part, sums[-1]) for part in sums[:-1])

    return shares_of


@dataclass(frozen=True)
class SharedModel:
    """One model for a batch: fitted to it (--shared; its BIC table with K = auto, and the
    images it saw), or read from a file (--model)."""

    model: GaussianMixtureFit
    k_search: KSearch | None
    images: tuple
    mode: str  # "gray" or "color": the batch is colour when any image is
    file: str | None = None  # the STEM_model.json it was read from


def segment_points(
    picture, points, n_components, options=None, *, shared=None, on_iteration=None, **overrides
):
    """Fit on the distinct values (or take a batch's shared model), then label every pixel.

    n_components as fit_points; options: SegmentOptions, or overrides of its fields and of
    FitOptions' (spatial=1.0, tol=1e-6, ...).  With a shared model the spatial prior only
    smooths the labels: the model is the batch's.
    """
    options = segment_options(options, **overrides)
    check_components(n_components, options)
    with options.fit.passes.opened() as passes:
        options = replace(options, fit=replace(options.fit, passes=passes))
        return _segment(picture, points, n_components, options, shared, on_iteration)


def _segment(picture, points, n_components, options, shared, on_iteration):
    if options.fit.variance_prior == "auto":  # on this picture: an image's, or a volume's
        prior = tissue_variance_prior(options.fit, picture)
        options = replace(options, fit=replace(options.fit, variance_prior=prior))
    box = _mask_box(picture)
    if box is not None and (options.bias_field or spatial_on(options.spatial)):
        inner = replace(picture, codes=picture.codes[box], mask=picture.mask[box])
        segmentation = _segment(inner, points, n_components, options, shared, on_iteration)
        return _uncropped(segmentation, picture, box)
    fit = (points, n_components, options, shared, on_iteration)
    first = None
    if options.bias_field and bias_start(options, picture) == "histogram" and shared is None:
        first = sharpening_field(picture, options.bias_degree)
    if first is None:
        return _segment_checked(picture, *fit)
    field, gain = first
    if gain < SHARPEN_GAIN:
        segmentation = _segment_checked(picture, *fit)
        return replace(segmentation, bias=replace(segmentation.bias, start_gain=gain))
    sharpened, factor = sharpened_picture(picture, field)
    return _unsharpened(_segment_checked(sharpened, *fit), picture, field, factor, gain)


def _segment_checked(picture, points, n_components, options, shared, on_iteration):
    """_segment_once, and again with grey matter held at the cortex where --cortex-check finds
    white matter there (cortex_to_hold)."""
    segmentation = _segment_once(picture, points, n_components, options, shared, on_iteration)
    cortex = cortex_to_hold(segmentation) if shared is None and options.cortex_check else None
    if cortex is not None:
        segmentation = _segment_once(
            picture, points, n_components, options, shared, on_iteration, cortex
        )
    return segmentation


def _segment_once(picture, points, n_components, options, shared, on_iteration, cortex=None):
    """_segment's fit and labels; cortex: grey matter's mean held there (cortex_refit)."""
    if options.bias_field:
        fixed = None if shared is None else shared.model
        segmentation = _segment_with_bias(
            picture, points, n_components, options, on_iteration, fixed, cortex
        )
        return replace(segmentation, shared=shared)
    data = _PointFeatures(points.values, points.weights, points.scale)
    if shared is None:
        shares_of = region_shares_of(lambda: [(picture, points, data)], options.fit.passes)
        model, search = _fit_features(
            data, points, n_components, options, on_iteration, shares_of, cortex
        )
    else:
        model, search = shared.model, shared.k_search
        if not model.log_likelihood:  # a model read from a file: how well it fits this image
            model = model.with_history([_mean_log_likelihood(model, data)])
    segmentation = Segmentation(
        picture=picture,
        points=points,
        model=model,
        labels=None,
        requested_k=n_components,
        k_search=search,
        shared=shared,
    )
    if not spatial_on(options.spatial):
        point_labels = _most_likely(data, model)
        labels = label_pixels(picture, points, point_labels, model.n_labels, options.fit.passes)
        return replace(segmentation, labels=labels, point_labels=point_labels)
    index = point_index(picture, points, options.fit.passes)
    model, labels, record, q = spatial_fit(
        model,
        data,
        index,
        options.spatial,
        options.fit,
        mask=picture.mask,
        update_parameters=shared is None,
        settings=options.spatial_settings,
        spacing=picture.spacing,
        on_iteration=staged(on_iteration, "spatial prior"),
    )
    order = _luminance_order(model.label_means)
    if options.keep_posteriors and model.partial_volume is not None:
        q = _point_expected_fractions(q, model, data, index)
    del index  # before q is reordered: the peak of a large image's spatial fit
    return replace(
        segmentation,
        model=model.reordered(order),
        labels=_relabelled(labels, order),
        spatial=record,
        posteriors=q[order] if options.keep_posteriors else None,
    )


def _segment_with_bias(
    picture, points, n_components, options, on_iteration, fixed=None, cortex=None
):
    if picture.kind != "gray" or points.mode != "gray":
        raise ValueError("a bias field is fitted to 8- and 16-bit gray images only")
    model, bias, labels, record, q = fit_bias_field(
        picture,
        n_components,
        options.fit,
        degree=options.bias_degree,
        regularisation=options.bias_reg,
        spatial=options.spatial,
        keep_posteriors=options.keep_posteriors,
        settings=options.spatial_settings,
        fixed=fixed,
        with_partial_volume=options.partial_volume,
        cortex=cortex,
        on_iteration=staged(on_iteration, "bias field"),
    )
    return Segmentation(
        picture=picture,
        points=points,
        model=model,
        labels=labels,
        requested_k=n_components,
        spatial=record,
        posteriors=q,
        bias=bias,
    )


def empty_components(segmentation):
    """Segmentation.empty_components, as a function."""
    return segmentation.empty_components


def label_map(segmentation):
    """The label map of the output contract: the component of every pixel, darkest 0; with a
    mask, 0 outside and 1..K inside.  uint8, or uint16 when the labels do not fit."""
    labels, mask = segmentation.labels, segmentation.picture.mask
    if mask is None:
        return labels
    fits = segmentation.model.n_labels < 256
    out = labels.astype(np.uint8 if fits else np.uint16)
    out += 1
    out[~mask] = 0
    return out


def posterior_maps(segmentation, passes):
    """(label, map) for every component: its posterior probability at every pixel as uint16,
    0..65535 = 0..1, 0 outside the mask; label is the component's value in the label map.

    The plain model's posteriors come from the distinct values by lookup, one map at a time, on
    passes' threads (a batch's worker: one); the spatial fit's are its mean-field
    responsibilities (segment_points(keep_posteriors=True)).
    """
    picture, points, model = segmentation.picture, segmentation.points, segmentation.model
    first = 0 if picture.mask is None else 1
    if segmentation.posteriors is not None:
        for k, qk in enumerate(segmentation.posteriors):
            yield k + first, np.rint(qk * 65535).astype(np.uint16)
        return
    data = _PointFeatures(points.values, points.weights, points.scale)
    probabilities = _point_log_probabilities(model, data, of_labels=False)
    probabilities = np.exp(probabilities - _logsumexp(probabilities, axis=0))
    probabilities = model.kind.posterior_maps(probabilities)  # FAST's partial volume maps
    for k in range(model.n_labels):
        lut = np.zeros(picture.n_codes, dtype=np.uint16)
        lut[points.keys] = np.rint(probabilities[k, points.point_of_key] * 65535)
        out = lookup_codes(picture, lut, passes)
        if picture.mask is not None:
            out[~picture.mask] = 0
        yield k + first, out


def label_colours(segmentation):
    """The colour of every value of the label map: the palette, black first with a mask."""
    return _with_outside(palette(segmentation), segmentation.picture.mask)


def _with_outside(colours, mask):
    if mask is None:
        return colours
    return np.concatenate([np.zeros((1,) + colours.shape[1:], dtype=colours.dtype), colours])


def palette(segmentation):
    """Component means in the output's own units: uint8 (uint16 for deep gray), (K,) or (K, 3).

    Colour is always 8 bits a channel: Pillow writes no 16-bit RGB, and a palette holds bytes.
    """
    picture, model = segmentation.picture, segmentation.model
    top = 255 if picture.bits == 8 or model.means.shape[1] == 3 else 65535
    values = np.clip(np.rint(model.label_means * top), 0, top).astype(
        np.uint8 if top == 255 else np.uint16
    )
    return values[:, 0] if values.shape[1] == 1 else values


def segment_image(array, n_components, *, mode="auto", mask=None, options=None, **overrides):
    """Segment an in-memory image.

    Parameters
    ----------
    array : array, shape (H, W) or (H, W, 3 | 4)
        Gray or colour (alpha dropped).  uint8 and uint16 are divided by their type's maximum;
        any other dtype is used on its own scale.
    n_components : int or "auto"
        K, lowered to the number of distinct values when there are fewer; "auto" chooses K in
        1..k_max by options.criterion (section 6a), from 2 starts a K unless n_init is given,
        as the command line does.
    mode : {"auto", "gray", "color"}
        auto: gray when the image has one channel or all channels are equal.
    mask : array of shape (H, W) or (H, W, C), or "nonzero", optional
        Segment only inside: nonzero mask pixels, or with "nonzero" the pixels that are not 0 in
        every channel.  Outside pixels never reach the model; their label is 0 and inside
        labels are 1..K.
    options : SegmentOptions, optional
        What is fitted (k_max, quantized, spatial, bias_field, ...) and how EM runs (its fit).
    **overrides
        SegmentOptions' fields (spatial=1.0, quantized=True, ...) and FitOptions' fields
        (covariance_type=, tol=, ...), over options.

    Returns
    -------
    labels : array of uint8 (uint16 when K > 256), shape (H, W)
        Component of every pixel, numbered by luminance, darkest 0.
    recoloured : array, shape (H, W) or (H, W, 3)
        Every pixel's component mean: uint8/uint16 like the input, float64 otherwise.
    model : GaussianMixtureFit
    """
    options = segment_options(options, **overrides)
    picture = picture_from_array(array)
    return _segmented_array(picture, n_components, mode, mask, options)


def segment_volume(
    array,
    n_components,
    *,
    spacing=(1.0, 1.0, 1.0),
    mode="auto",
    mask=None,
    options=None,
    **overrides,
):
    """Segment an in-memory volume as one: segment_image's contract in 3-D.

    array: (D, H, W) gray or (D, H, W, 3) colour, values as segment_image takes them;
    spacing: the voxels' size along the three axes (the spatial prior weighs neighbours by
    it); mask: (D, H, W) or "nonzero".  Returns the labels (D, H, W), the recoloured volume
    and the model.
    """
    options = segment_options(options, **overrides)
    return _segmented_array(picture_from_volume(array, spacing), n_components, mode, mask, options)


def _segmented_array(picture, n_components, mode, mask, options):
    if mask is not None:
        picture = with_mask(picture, nonzero_mask(picture) if _is_nonzero(mask) else mask)
    points = distinct_values(picture, mode, options.fit.passes)
    segmentation = segment_points(picture, points, n_components, options)
    labels = label_map(segmentation)
    if picture.kind == "table":
        means = segmentation.model.label_means
        colours = _with_outside(means[:, 0] if means.shape[1] == 1 else means, picture.mask)
    else:
        colours = label_colours(segmentation)
    return labels, colours[labels], segmentation.model


# ----------------------------------------------------------------------------
# 7. Outputs and plots
# ----------------------------------------------------------------------------
# An image's files are written all or nothing: each under a short temporary name in
# the output folder, then all renamed into place, the JSON last, so a STEM_model.json
# present means a complete set.  On any failure (a full disk, a signal, a bug) every
# temporary, and every file this run had already renamed, is removed.

OUTPUT_SUFFIXES = ("segmented.png", "labels.png", "loglik.png", "comparison.png", "model.json")
OPTIONAL_SUFFIXES = ("bic.png", "bias.png", "corrected.png")  # -k auto; --bias-field
OUTPUTS = tuple(suffix.split(".")[0] for suffix in OUTPUT_SUFFIXES + OPTIONAL_SUFFIXES)
FIGURES = ("loglik", "comparison", "bic")  # the outputs that need matplotlib
BIAS_SCALE = 32768  # STEM_bias.png holds field x BIAS_SCALE: 1.0 is 32768, 2.0 is 65535
DISPLAY_PIXELS = 1024  # longest side of the images drawn in the comparison figure
PANEL_INCHES = 4.5  # widest panel of the comparison figure
PANEL_MAX_HEIGHT = 6.0  # tallest panel: a tall, narrow image gets a narrow panel
FIGURE_DPI = 100
PNG_COMPRESS_LEVEL = 1  # zlib level: label maps and palettes compress well even at 1


VOLUME_OUTPUTS = ("segmented", "labels", "bias", "corrected")  # a volume's, as volumes


def image_suffix(picture):
    """The file type of the image outputs: PNG, or a volume's: NIfTI (gzipped) for a NIfTI
    input, a multi-page TIFF otherwise."""
    if picture.volume is None:
        return ".png"
    return ".nii.gz" if picture.volume.format == "nifti" else ".tif"


def output_paths(out_dir, stem, suffix=".png"):
    """The path of every output; suffix (image_suffix) that of the image outputs."""
    paths = {}
    for name in OUTPUT_SUFFIXES + OPTIONAL_SUFFIXES:
        output, extension = name.split(".")
        extension = suffix if output in VOLUME_OUTPUTS else "." + extension
        paths[output] = Path(out_dir) / f"{stem}_{output}{extension}"
    return paths


class OutputSet:
    """The outputs of one image, staged under temporary names and committed together.

        with OutputSet() as outputs:
            outputs.stage(path, write)       # write(temporary_path)
            outputs.commit()                 # rename every file into place, in staging order

    Leaving the block without commit(), or with an exception, removes what was staged and
    what was renamed.  Temporary names are short (the pid, the set and a counter), so an output
    name that fits the file system's limit always has a temporary that fits too; they are unique
    among the sets alive in the process, and a set removes its own before it ends.
    """

    def __init__(self, token=""):
        self.staged, self.committed = [], []
        self.token = token  # a batch's on a cluster: what it left behind can be found

    def __enter__(self):
        return self

    def stage(self, path, write):
        path = Path(path)
        if path.is_dir():
            raise ImageError(f"cannot write {shown(path)}: it is a folder")
        number = f"{self.token}{os.getpid()}-{id(self):x}-{len(self.staged) + len(self.committed)}"
        temporary = path.with_name(f".is-{number}.tmp")
        self.staged.append((temporary, path))
        try:
            write(temporary)
        except OSError as error:
            raise ImageError(f"cannot write {shown(path)}: {error.strerror or error}") from None

    def commit(self):
        for temporary, path in self.staged:
            try:
                os.replace(temporary, path)
            except OSError as error:
                raise ImageError(f"cannot write {shown(path)}: {error.strerror or error}") from None
            self.committed.append(path)
        self.staged = []

    def __exit__(self, kind, error, trace):
        for temporary, _ in self.staged:
            _remove(temporary)
        if kind is not None:
            for path in self.committed:
                _remove(path)
        return False


def _remove(path):
    try:
        os.unlink(path)
    except OSError:
        pass


PNG_BLOCK_BYTES = 1 << 22  # rows filtered and compressed at a time: no copy of a whole image


def write_png(path, pixels, palette=None, block_bytes=PNG_BLOCK_BYTES):
    """A PNG of pixels (H, W) uint8 or uint16 gray, (H, W, 3) uint8 colour, (H, W, 4) uint8
    colour and alpha, or (H, W) uint8 indices into palette (N, 3) uint8, block by block.

    Our outputs are flat regions, so every row takes PNG's "up" filter (the row less the row
    above, byte by byte) and zlib at PNG_COMPRESS_LEVEL: about as small as Pillow's adaptive
    filter, which tries five filters a row and took two thirds of the time of a 24-megapixel
    label map.  The same bytes every time; Pillow reads them as it would
    its own (L, I;16, RGB, RGBA, P).  block_bytes: the rows filtered and compressed at a time."""
    height, width = pixels.shape[:2]
    depth, channels = 8 * pixels.dtype.itemsize, 1 if pixels.ndim == 2 else pixels.shape[2]
    colour_type = 3 if palette is not None else {1: 0, 3: 2, 4: 6}[channels]
    rows = pixels.astype(">u2" if depth == 16 else np.uint8, copy=False).reshape(height, -1)
    rows = rows.view(np.uint8)
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    block = max(1, block_bytes // (rows.shape[1] + 1))
    deflate = zlib.compressobj(PNG_COMPRESS_LEVEL)
    with open(path, "wb") as file:
        file.write(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header))
        if palette is not None:
            file.write(_png_chunk(b"PLTE", np.asarray(palette, dtype=np.uint8).tobytes()))
        for top in range(0, height, block):
            bottom = min(top + block, height)
            filtered = np.empty((bottom - top, rows.shape[1] + 1), dtype=np.uint8)
            filtered[:, 0] = 2  # "up": the first row's "above" is zero
            filtered[:, 1:] = rows[top:bottom]
            first = max(top, 1)
            filtered[first - top :, 1:] -= rows[first - 1 : bottom - 1]
            compressed = deflate.compress(filtered)
            if compressed:  # zlib may hold a small block back: no empty IDAT chunk
                file.write(_png_chunk(b"IDAT", compressed))
        file.write(_png_chunk(b"IDAT", deflate.flush()) + _png_chunk(b"IEND", b""))


def _png_chunk(kind, data):
    return (
        struct.pack(">I", len(data))
        + kind
        + data
        + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))
    )


def _png_writer(pixels, palette=None):
    return partial(write_png, pixels=pixels, palette=palette)


def _image_writer(array, picture):
    """write(path) of an output image (H, W[, 3]) as PNG, or of a volume (D, H, W[, 3]) in the
    kind of file it came from (image_suffix)."""
    if picture.volume is None:
        return _png_writer(array)
    if picture.volume.format == "nifti":
        return partial(_write_nifti, array, picture.volume)
    return partial(_write_tiff_stack, array)


def _write_nifti(array, volume, path):
    """A volume as a gzipped NIfTI with the input's affine and header (so that it overlays the
    input in FSLeyes, ITK-SNAP or 3D Slicer), its own data type, no scaling; streamed through
    gzip (level 1) by nibabel, no copy of the volume in memory; the same bytes every time
    (gzip's time stamp 0, no file name in its header)."""
    import gzip

    nibabel = _optional("nibabel", "writing NIfTI")
    kind = nibabel.Nifti2Image if volume.nifti2 else nibabel.Nifti1Image
    header = volume.header.copy() if volume.header is not None else None
    image = kind(array.T if volume.file_axes_reversed else array, volume.affine, header)
    image.header.set_data_dtype(array.dtype)
    image.header.set_slope_inter(1.0, 0.0)
    with open(path, "wb") as file, gzip.GzipFile("", "wb", 1, file, mtime=0) as compressed:
        file_map = image.make_file_map()
        file_map["image"].fileobj = compressed
        image.to_file_map(file_map)


def _write_tiff_stack(array, path):
    """A volume as a multi-page TIFF, one page a slice of its first axis."""
    pages = [Image.fromarray(page) for page in array]
    pages[0].save(path, format="TIFF", save_all=True, append_images=pages[1:])


def _figure_writer(figure):
    """write(path) of a figure: drawn by Agg at FIGURE_DPI, written by write_png, as RGB where
    it is opaque (always, unless a matplotlibrc makes it transparent).  The same pixels as
    savefig's PNG in two thirds of the time (on a small image, a third of its whole run: savefig
    drew the figure and had Pillow try five filters a row at zlib level 6), and no matplotlib
    version in the file."""

    def write(path):
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        rgba = np.asarray(canvas.buffer_rgba())
        write_png(path, rgba[..., :3] if (rgba[..., 3] == 255).all() else rgba)

    return write


def segmented_writer(segmentation):
    """write(path) of the recoloured picture: gray levels, or a palette PNG for colour (its
    label map with the components' colours); a volume's as colours (D, H, W[, 3])."""
    colours, labels, picture = (
        label_colours(segmentation),
        label_map(segmentation),
        segmentation.picture,
    )
    if picture.volume is None and colours.ndim == 2 and len(colours) <= 256:
        return _png_writer(labels.astype(np.uint8, copy=False), palette=colours)
    return _image_writer(colours[labels], picture)


def _bias_field_record(bias, picture):
    """The JSON's bias_field: the fitted field, its basis and formula in words, its spread."""
    record = {
        "degree": bias.degree,
        "regularisation": bias.regularisation,
        "coefficients": bias.coefficients.tolist(),
        "shift": bias.shift,
        "basis": "monomials u^a v^b, 1 <= a + b <= degree, in the order a + b = 1, 2, ... "
        "and a = 0..a + b; u = 2 row / (height - 1) - 1, v = 2 column / (width - 1) - 1"
        if picture.volume is None
        else "monomials u^a v^b w^c, 1 <= a + b + c <= degree, in the order a + b + c = "
        "1, 2, ..., then a = 0.., then b = 0..; u, v, w = 2 (i - start) / (stop - start - 1)"
        " - 1 of the index i along the volume's "
        + (
            "third, second and first"
            if picture.volume.file_axes_reversed
            else "first, second and third"
        )
        + " axis, (start, stop) of that axis in box (the mask's bounding box, or the whole "
        "volume; in the file's axis order)",
        "field": "exp(coefficients . basis - shift); weights, means and covariances are "
        "then of the corrected intensities (image / field)",
        "spread": bias.spread,
        "restarted": bias.restarted,
    }
    if bias.start_gain is not None:
        record["start"] = {
            "method": "histogram",
            "entropy_gain": bias.start_gain,
            "applied": bias.started,
        }
    if picture.volume is not None:
        box = bias.box or tuple((0, n) for n in bias.shape)
        record["box"] = picture.volume.in_file_order(list(a) for a in box)
    return record


def model_record(segmentation, source, settings, notes, seconds):
    """The JSON contract: the model on the 0..1 scale, its history and the run's settings."""
    model, picture = segmentation.model, segmentation.picture
    record = {
        "image": shown(source),
        "width": picture.width,
        "height": picture.height,
    }
    if picture.volume is not None:
        volume = picture.volume
        record["shape"] = volume.in_file_order(picture.codes.shape)
        record["spacing"] = volume.in_file_order(volume.spacing)
        record["affine"] = None if volume.affine is None else volume.affine.tolist()
    record |= {
        "mask": None if picture.mask is None else settings["mask"],
        "inside_pixels": int(segmentation.points.weights.sum()),
        "mode": segmentation.points.mode,
        "k": model.n_labels,
        "requested_k": segmentation.requested_k,
        "covariance_type": model.covariance_type,
        "distinct_values": int(len(segmentation.points.values)),
        "weights": model.weights.tolist(),
        "means": model.means.tolist(),
        "covariances": model.covariances.tolist(),
        "log_likelihood": [float(v) for v in model.log_likelihood],
        "n_iter": model.n_iter,
        "em_steps": model.n_em_steps,
        "converged": model.converged,
        "em_fell_at": model.fell_at,
        "newton_iter": model.newton_iter,
        "collapsed_components": collapsed_components(model, settings["reg_covar"]),
        "empty_components": empty_components(segmentation),
        "seed": settings["seed"],
        "settings": settings,
        "notes": list(notes),
        "seconds": seconds,
    }
    if segmentation.k_search is not None:
        record["bic"] = segmentation.k_search.rows
        record["k_auto"] = segmentation.k_search.record()
    record |= model.kind.record()
    if model.subsample is not None:
        record["subsample"] = model.subsample
    record["quantized"] = model.quantized_top is not None
    record["quantized_top"] = model.quantized_top
    if segmentation.bias is not None:
        record["bias_field"] = _bias_field_record(segmentation.bias, picture)
    if segmentation.spatial is not None:
        record["spatial"] = segmentation.spatial.to_json()
    shared = segmentation.shared
    record["shared"] = shared is not None and shared.file is None
    if record["shared"]:
        record["shared_images"] = [shown(p) for p in shared.images]
    if shared is not None and shared.file is not None:
        record["model_file"] = shown(shared.file)
    return record


@dataclass(frozen=True)
class Captions:
    """What an image's figures say beyond its data: the title, and the labels' names where they
    are more than numbers (a --brain run's tissues), for labels 1..K inside the mask."""

    title: str
    label_names: tuple | None = None


BRAIN_TISSUES = ("CSF", "grey matter", "white matter")  # --brain's labels 1, 2, 3


def _figure(width, height):
    """A matplotlib Figure of its own: no pyplot, no global state, nothing to close."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=FIGURE_DPI, layout="constrained")


def _integer_ticks(ax):
    """Ticks on whole numbers only on the x axis (iterations, K)."""
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def plot_log_likelihood(segmentation, captions):
    """Left: the objective per iteration, the stopping point marked (the plain mixture's
    log-likelihood per pixel; with --spatial, the mean-field objective).  Right: the negative
    of it above its final value, on a log scale, where EM's linear convergence is a straight
    line and a faster one bends down.  A model read by --model, not fitted here, gets a plot
    that says so."""
    if segmentation.spatial is None and segmentation.saved_model and not segmentation.model.n_iter:
        return _plot_no_fit(segmentation, captions)
    if segmentation.spatial is not None:
        fit, model, name = segmentation.spatial, None, "mean-field objective"
        history, n_iter, em_steps, converged = (
            fit.objective,
            fit.n_iter,
            fit.em_steps,
            fit.converged,
        )
    else:
        model, name = segmentation.model, "log-likelihood"
        history, n_iter = model.log_likelihood, model.n_iter
        em_steps, converged = model.n_em_steps, model.converged
    history = np.asarray(history)
    iterations = np.arange(1, len(history) + 1)
    stop = "converged" if converged else "stopped at --max-iter"
    fell_at = None if model is None else model.fell_at
    newton = 0 if model is None else model.newton_iter
    caption = [_iteration_caption(model, n_iter, em_steps, newton)]
    if fell_at is not None and fell_at <= newton:
        fell = "fell on a Newton step"
        caption.append("Newton's steps aim at EM's fixed point: the log-likelihood may fall")
    elif fell_at is not None:
        fell = "fell: a variance at --reg-covar"
        caption.append(f"from iteration {fell_at} the fit follows EM to its fixed point")
    caption.append(
        f"right: how far the negative {name} is above its final value; a straight line is "
        f"steady (linear) convergence, a curve bending down a faster one"
    )
    figure = _figure(10, 4)
    left, right = figure.subplots(1, 2)
    left.plot(iterations, history, marker="o", markersize=3, color="tab:blue")
    left.plot(
        iterations[-1],
        history[-1],
        marker="o",
        markersize=9,
        markerfacecolor="none",
        color="tab:red",
        label=f"{stop} at iteration {n_iter} ({em_steps} EM steps)",
    )
    left.set_ylabel(f"{name} per pixel")
    left.set_title(name[0].upper() + name[1:])
    gap = history[-1] - history  # the negative objective above its final value
    above = gap > 0
    right.plot(iterations[above], gap[above], marker="o", markersize=3, color="tab:blue")
    right.axvline(n_iter, color="tab:red", linewidth=1, label=f"{stop} at iteration {n_iter}")
    if above.any():
        right.set_yscale("log")
    right.set_ylabel("above the final value, per pixel")
    right.set_title(f"Negative {name} above its final value")
    for ax in (left, right):
        if fell_at is not None:
            ax.axvline(fell_at, color="tab:orange", linestyle="--", linewidth=1, label=fell)
        ax.set_xlabel("EM iteration" if em_steps == n_iter else "iteration")
        ax.set_xlim(0.5, len(history) + 0.5)
        _integer_ticks(ax)
        ax.grid(alpha=0.3)
        ax.legend(loc="best")
    figure.supxlabel("\n".join(caption), fontsize="small")
    figure.suptitle(captions.title)
    return figure


def _iteration_caption(model, n_iter, em_steps, newton):
    """What an iteration of the plot is, for the caption under both panels (a legend this long
    squeezes them)."""
    if em_steps == n_iter:
        iteration = "each iteration one EM step"
    elif newton:
        iteration = f"iterations 1-{newton}: Newton steps on EM's fixed point, one EM step each"
        iteration += ", then cycles of 2-3 EM steps" if newton < n_iter else ""
    else:
        iteration = "each iteration an accelerated cycle of 2-3 EM steps"
    if model is not None and model.subsample is not None:  # iterations before these, on draws
        draws = model.subsample
        sizes = f"{draws[0]['pixels']:,}" + (f" to {draws[-1]['pixels']:,}" if draws[1:] else "")
        ran = sum(draw["n_iter"] for draw in draws)
        iteration += f", after {ran} iterations on draws of {sizes} pixels"
    return iteration


def _plot_no_fit(segmentation, captions):
    """The convergence figure of an image labelled with a saved model: no fit ran, so no curve;
    what the model scores on this image instead."""
    figure = _figure(10, 4)
    ax = figure.subplots()
    ax.axis("off")
    ax.text(
        0.5,
        0.5,
        f"No fit: the image was labelled with the saved model\n{shown(segmentation.saved_model)}"
        f"\n\nits log-likelihood on this image: "
        f"{segmentation.model.log_likelihood[-1]:.6f} per pixel",
        ha="center",
        va="center",
        fontsize="large",
        transform=ax.transAxes,
    )
    figure.suptitle(captions.title)
    return figure


def _display_copy(picture):
    """A strided copy of the picture small enough to draw: RGB uint8 or gray 0..1."""
    step = max(1, math.ceil(max(picture.height, picture.width) / DISPLAY_PIXELS))
    codes = picture.codes[::step, ::step]
    if picture.kind == "rgb":
        return unpack_rgb(codes), step
    if picture.kind == "gray":
        return codes / picture.scale, step
    return picture.table[codes], step


def plot_comparison(segmentation, captions):
    """Original | segmented | label map, side by side, drawn from downsampled copies.

    Each panel keeps the image's aspect inside a PANEL_INCHES x PANEL_MAX_HEIGHT box, so the
    figure's size is bounded whatever the image's shape (a 1 x 100000 strip included).
    """
    import matplotlib

    original, step = _display_copy(segmentation.picture)
    labels = label_map(segmentation)[::step, ::step]
    colours = label_colours(segmentation)
    k = segmentation.model.n_labels
    first = 0 if segmentation.picture.mask is None else 1  # the label of the darkest component
    aspect = labels.shape[0] / labels.shape[1]
    panel_width = min(PANEL_INCHES, PANEL_MAX_HEIGHT / aspect)
    panels = 3 if segmentation.bias is None else 4
    figure = _figure(
        max(panels * panel_width + 1.5 * (panels - 2), 8.0), panel_width * aspect + 1.0
    )
    axes = figure.subplots(1, panels)
    gray = dict(cmap="gray", vmin=0, vmax=1)
    axes[0].imshow(original, **(gray if original.ndim == 2 else {}), interpolation="nearest")
    recoloured = colours[labels] / (255 if colours.dtype == np.uint8 else 65535)
    axes[1].imshow(recoloured, **(gray if recoloured.ndim == 2 else {}), interpolation="nearest")
    cmap = matplotlib.colormaps["viridis"].resampled(k)
    if first:  # outside the mask in black
        from matplotlib.colors import ListedColormap

        cmap = ListedColormap(np.vstack([[0, 0, 0, 1], cmap(np.arange(k))]))
    shown_labels = axes[2].imshow(
        labels, cmap=cmap, vmin=-0.5, vmax=k + first - 0.5, interpolation="nearest"
    )
    _label_colourbar(figure, shown_labels, axes[2], k, first, captions.label_names)
    if segmentation.bias is not None:
        field_image = segmentation.bias.image(stride=step)
        if segmentation.picture.mask is not None:
            inside = segmentation.picture.mask[::step, ::step]
            field_image = np.where(inside, field_image, np.nan)
        shown_field = axes[3].imshow(field_image, cmap="magma", interpolation="nearest")
        figure.colorbar(shown_field, ax=axes[3], shrink=0.9, label="multiplicative field")
    names = ("original", f"segmented, K = {k}", "label map", "bias field")
    for ax, name in zip(axes, names):
        ax.set_title(name)
        ax.axis("off")
    figure.suptitle(captions.title)
    return figure


def _label_colourbar(figure, image, ax, k, first, names):
    """The label map's colour bar: each label's number, or its name (tissues), 0 = outside."""
    colorbar = figure.colorbar(image, ax=ax, shrink=0.9)
    if names is not None and len(names) == k:
        colorbar.set_ticks(range(k + first), labels=("outside",) * first + tuple(names))
        return
    colorbar.set_label("label (0 = darkest)" if not first else "label (0 = outside, 1 = darkest)")
    colorbar.set_ticks(range(k + first) if k <= 16 else np.linspace(0, k + first - 1, 9).round())


def _middle_slices(volume_array, picture):
    """The three orthogonal middle slices of a (D, H, W[, ...]) array: (the file's axis it
    crosses, the slice, its rows' spacing over its columns'); a NIfTI's upside down, so that
    the higher index of its rows is up (superior, anterior in the usual orientation)."""
    volume = picture.volume
    file_axis = volume.in_file_order(range(3))
    for axis in range(3):
        plane = volume_array[(slice(None),) * axis + (volume_array.shape[axis] // 2,)]
        rows, cols = [a for a in range(3) if a != axis]
        if volume.file_axes_reversed:
            plane = plane[::-1]
        yield file_axis.index(axis), plane, volume.spacing[rows] / volume.spacing[cols]


def plot_volume_comparison(segmentation, captions):
    """Original | segmented | label map (| bias field) on the three orthogonal middle slices of
    a volume, each drawn at its voxels' aspect and named by its plane (sagittal, coronal,
    axial, from a NIfTI's affine; a TIFF stack's page, rows, columns)."""
    import matplotlib

    picture = segmentation.picture
    labels, colours = label_map(segmentation), label_colours(segmentation)
    k, first = segmentation.model.n_labels, 0 if picture.mask is None else 1
    cmap = matplotlib.colormaps["viridis"].resampled(k)
    if first:
        from matplotlib.colors import ListedColormap

        cmap = ListedColormap(np.vstack([[0, 0, 0, 1], cmap(np.arange(k))]))
    field_image = None if segmentation.bias is None else segmentation.bias.image()
    if field_image is not None and picture.mask is not None:
        field_image = np.where(picture.mask, field_image, np.nan)
    columns = 3 if field_image is None else 4
    figure = _figure(columns * PANEL_INCHES, 3 * PANEL_INCHES * 0.9)
    axes = figure.subplots(3, columns, squeeze=False)
    gray = dict(cmap="gray", vmin=0, vmax=1)
    planes = _plane_names(picture.volume)
    no_field = itertools.repeat((None, None, None))
    slices = zip(
        _middle_slices(picture.codes, picture),
        _middle_slices(labels, picture),
        no_field if field_image is None else _middle_slices(field_image, picture),
    )
    for (axis, plane, aspect), (_, label_plane, _), (_, field_plane, _) in slices:
        flat = replace(picture, codes=np.ascontiguousarray(plane), mask=None, volume=None)
        original, step = _display_copy(flat)
        label_plane = label_plane[::step, ::step]
        recoloured = colours[label_plane] / (255 if colours.dtype == np.uint8 else 65535)
        row = axes[axis]
        row[0].imshow(original, **(gray if original.ndim == 2 else {}), aspect=aspect)
        row[1].imshow(recoloured, **(gray if recoloured.ndim == 2 else {}), aspect=aspect)
        shown_labels = row[2].imshow(
            label_plane,
            cmap=cmap,
            vmin=-0.5,
            vmax=k + first - 0.5,
            aspect=aspect,
            interpolation="nearest",
        )
        _label_colourbar(figure, shown_labels, row[2], k, first, captions.label_names)
        if field_plane is not None:
            shown_field = row[3].imshow(
                field_plane[::step, ::step], cmap="magma", aspect=aspect, interpolation="nearest"
            )
            figure.colorbar(shown_field, ax=row[3], shrink=0.9, label="multiplicative field")
        row[0].set_ylabel(planes[axis])
        titles = ("original", f"segmented, K = {k}", "label map", "bias field")
        for ax, name in zip(row, titles):
            ax.set_title(name if axis == 0 else "")
            ax.set_xticks([])
            ax.set_yticks([])
    figure.suptitle(captions.title)
    return figure


ANATOMICAL_PLANES = ("sagittal", "coronal", "axial")  # a slice across x (left-right), y, z


def _plane_names(volume):
    """The name of the middle slice across each of the file's axes: a NIfTI's plane by the
    world axis its affine maps the file axis on most (x: sagittal, y: coronal, z: axial), a
    TIFF stack's page, rows and columns."""
    if volume.format == "nifti" and volume.affine is not None:
        world = np.argmax(np.abs(volume.affine[:3, :3]), axis=0)
        if len(set(world.tolist())) == 3:
            return [f"{ANATOMICAL_PLANES[w]} (middle slice)" for w in world]
    return ["middle page", "middle row (across pages)", "middle column (across pages)"]


def plot_bic(search, title):
    """-k auto's criterion against K, the chosen K marked; with "classes", the K whose fit has a
    component that is no class (a collapse, a boundary's mixels) hollow."""
    rows = search.rows
    key = "icl" if search.criterion == "icl" else "bic"
    ks, scores = [row["k"] for row in rows], [row[key] for row in rows]
    figure = _figure(6, 4)
    ax = figure.subplots()
    ax.plot(ks, scores, color="tab:blue", linewidth=1)
    counted = [row["counted"] for row in rows]
    ax.plot(
        [k for k, c in zip(ks, counted) if c],
        [v for v, c in zip(scores, counted) if c],
        "o",
        color="tab:blue",
        label="every component a class" if search.criterion == "classes" else key.upper(),
    )
    if not all(counted):
        ax.plot(
            [k for k, c in zip(ks, counted) if not c],
            [v for v, c in zip(scores, counted) if not c],
            "o",
            markerfacecolor="none",
            color="tab:gray",
            label="a component that is no class",
        )
    ax.plot(
        search.chosen,
        scores[ks.index(search.chosen)],
        marker="o",
        markersize=12,
        markerfacecolor="none",
        color="tab:red",
        label=f"chosen: K = {search.chosen}",
    )
    ax.set_xlabel("number of components K")
    ax.set_ylabel(f"{key.upper()} (lower is better)")
    _integer_ticks(ax)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ax.set_title(f"{title}\n-k auto by {search.criterion}", fontsize="medium")
    return figure


def probability_paths(out_dir, stem, segmentation):
    """STEM_prob_L.png (a volume's: image_suffix) for every label L of the label map (1..K
    with a mask, 0..K-1 without)."""
    first = 0 if segmentation.picture.mask is None else 1
    labels = range(first, first + segmentation.model.n_labels)
    suffix = image_suffix(segmentation.picture)
    return {label: Path(out_dir) / f"{stem}_prob_{label}{suffix}" for label in labels}


def field_levels(field_image):
    """The field as STEM_bias.png holds it: uint16 field x BIAS_SCALE (1.0 = 32768)."""
    levels = field_image * np.float32(BIAS_SCALE)
    np.clip(np.rint(levels, out=levels), 0, 65535, out=levels)
    return levels.astype(np.uint16)


def corrected_image(picture, field_image):
    """The image (a volume) divided by the field, at its own bit depth (gray only), an array."""
    top = 255 if picture.bits == 8 else 65535
    corrected = picture.codes.astype(np.float32)
    corrected /= field_image
    np.clip(np.rint(corrected, out=corrected), 0, top, out=corrected)
    return corrected.astype(np.uint8 if top == 255 else np.uint16)


def write_outputs(
    segmentation,
    paths,
    captions,
    record,
    probabilities=None,
    wanted=OUTPUTS,
    token="",
    *,
    passes,
):
    """The outputs of one image that are wanted (of OUTPUTS), all or nothing, the JSON record
    last; a figure not wanted is not drawn (nor matplotlib imported for it).

    probabilities: the probability_paths to write the posterior maps to, or None.  The record's
    seconds get "write" (the images and figures) and the "total" grows by it.  token: starts
    the temporaries' names (OutputSet).  passes: the image's passes (a batch's worker: one
    thread), for the posterior maps' lookups.
    """
    started = time.perf_counter()
    with OutputSet(token) as outputs:
        picture = segmentation.picture
        for label, probability in posterior_maps(segmentation, passes) if probabilities else ():
            outputs.stage(probabilities[label], _image_writer(probability, picture))
        for name, write in _output_writers(segmentation, captions, wanted):
            outputs.stage(paths[name], write)
        seconds = record["seconds"]
        seconds["write"] = time.perf_counter() - started
        seconds["total"] = seconds["load"] + seconds["fit"] + seconds["write"]
        record["seconds"] = {name: round(value, 4) for name, value in seconds.items()}
        if "model" in wanted:
            text = json.dumps(record, indent=2, allow_nan=False) + "\n"
            outputs.stage(paths["model"], lambda path: Path(path).write_text(text))
        outputs.commit()


def _output_writers(segmentation, captions, wanted):
    """(output, write(path)) for every wanted output this segmentation has, but the JSON, made
    one at a time as they are written."""
    picture = segmentation.picture
    if "segmented" in wanted:
        yield "segmented", segmented_writer(segmentation)
    if "labels" in wanted:
        yield "labels", _image_writer(label_map(segmentation), picture)
    if "loglik" in wanted:
        yield "loglik", _figure_writer(plot_log_likelihood(segmentation, captions))
    if "comparison" in wanted:
        comparison = plot_comparison if picture.volume is None else plot_volume_comparison
        yield "comparison", _figure_writer(comparison(segmentation, captions))
    if "bic" in wanted and segmentation.k_search is not None:
        bic_figure = plot_bic(segmentation.k_search, captions.title)
        yield "bic", _figure_writer(bic_figure)
    if segmentation.bias is not None and {"bias", "corrected"} & set(wanted):
        field_image = segmentation.bias.image()
        if "bias" in wanted:
            yield "bias", _image_writer(field_levels(field_image), picture)
        if "corrected" in wanted:
            yield "corrected", _image_writer(corrected_image(picture, field_image), picture)


# ----------------------------------------------------------------------------
# 8. The command line
# ----------------------------------------------------------------------------
# Parse, dispatch, report.  Whatever a user, a file or the system does ends in one line
# `error: <what>: <why>` on stderr and an exit status: 0 every image done, 1 some image
# failed, 2 bad usage, 130 Ctrl-C, 143 SIGTERM.  Names are printed by shown(), so one
# message is always one line.


class UsageError(Exception):
    """Bad arguments or an unusable output folder: exit status 2."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM in the main process, raised as Ctrl-C is, so every clean-up path runs;
    it carries the signal."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


def _number_at_least(kind, minimum):
    """An argparse type: a finite int or float >= minimum, refused with a one-line reason."""
    name = "an integer" if kind is int else "a number"

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
        if not math.isfinite(value) or value < minimum:
            raise argparse.ArgumentTypeError(f"must be {name} >= {minimum}, got {text}")
        return value

    return parse


def _integer_at_least(minimum):
    return _number_at_least(int, minimum)


def _word_or(parse, what, word, value):
    """An argparse type: word (read as value), or what parse accepts; refused naming both."""

    def parse_or_word(text):
        if text == word:
            return value
        try:
            return parse(text)
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"{text!r}: give {what}, or {word}") from None

    return parse_or_word


def _auto_or(parse, what):
    """An argparse type: "auto", or what parse accepts."""
    return _word_or(parse, what, "auto", "auto")


_components = _auto_or(_integer_at_least(1), "a whole number >= 1")


def _spacing(text):
    """Z,Y,X: a volume's voxel size along its three axes (one number: the same for all)."""
    try:
        steps = tuple(float(step) for step in text.split(","))
    except ValueError:
        steps = ()
    if len(steps) == 1:
        steps *= 3
    if len(steps) != 3:
        raise argparse.ArgumentTypeError(f"{text!r}: give three positive numbers, Z,Y,X")
    why = spacing_problem(steps)
    if why:
        raise argparse.ArgumentTypeError(f"{text!r} {why}")
    return steps


def _outputs(text):
    """A comma-separated list of OUTPUTS ("json" is "model", the JSON record), in OUTPUTS' order."""
    names = {"json" if name == "model" else name: name for name in OUTPUTS}
    asked = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in asked if name not in names and name not in OUTPUTS]
    if unknown or not asked:
        raise argparse.ArgumentTypeError(
            f"{', '.join(unknown) or 'nothing'}: choose from {', '.join(names)}"
        )
    chosen = {names.get(name, name) for name in asked}
    return tuple(name for name in OUTPUTS if name in chosen)


def _dask_spec(text):
    """--dask's value: local, local:N (N >= 1) or a scheduler's address."""
    if text.startswith("local:"):
        _integer_at_least(1)(text.split(":", 1)[1])
    return text


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help as a reader wants it: option names never broken at their hyphens, the help
    column wide enough for them, the epilog's examples kept line by line."""

    def __init__(self, prog):
        super().__init__(prog, max_help_position=34, width=min(100, _terminal_width()))

    def _split_lines(self, text, width):
        import textwrap

        return textwrap.wrap(text, width, break_on_hyphens=False, break_long_words=False)


def _terminal_width():
    import shutil

    return max(60, shutil.get_terminal_size((100, 24)).columns - 2)


def _nearest(word, candidates):
    """The candidate closest to a mistyped word ("did you mean"), or None."""
    import difflib

    found = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return found[0] if found else None


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"error: usage: {shown(message)}{self._hint(message)} (see --help)\n")

    def _hint(self, message):
        """What the user most likely meant: the nearest option or choice, else how to name a
        file that starts with '-'."""
        options = [name for action in self._actions for name in action.option_strings]
        if "unrecognized arguments: " in message:
            for word in message.split("unrecognized arguments: ", 1)[1].split():
                near = _nearest(word.split("=", 1)[0], options) if word.startswith("-") else None
                if near:
                    return f"; did you mean {near}?"
            if "unrecognized arguments: -" in message:
                return "; a file whose name starts with '-' is given as ./-NAME or after --"
        if "invalid choice: " in message:
            word = message.split("invalid choice: ", 1)[1].split(" (", 1)[0].strip("'\"")
            choices = [c for action in self._actions if action.choices for c in action.choices]
            near = _nearest(word, [str(c) for c in choices])
            if near:
                return f"; did you mean {near}?"
        return ""


HELP_EXAMPLES = """\
examples:
  ImageSegmentation.py photo.jpg -k 4            a colour photo in 4 classes
  ImageSegmentation.py scan.png --spatial 1      a noisy image: neighbours share labels
  ImageSegmentation.py t1.nii.gz --brain         CSF, grey and white matter of a brain scan
  ImageSegmentation.py scans/ --shared -k 3      one model for a folder: same labels everywhere
  ImageSegmentation.py new/ --model output/scan_model.json   apply a saved model

formats: whatever Pillow reads (PNG, JPEG, TIFF, BMP, GIF, WebP, ...); a multi-page TIFF of
  equal pages is a volume; NIfTI volumes (.nii, .nii.gz) need nibabel (pip install nibabel).
rules: --partial-volume needs --covariance tied; --bias-field and --partial-volume take a
  number -k, not auto; --model replaces -k and --shared; --dask replaces --jobs and --show.
  --brain sets defaults: any option you type wins, before or after it.

exit status: 0 all images segmented, 1 some image failed, 2 bad usage, 130 interrupted
  (Ctrl-C), 143 terminated (SIGTERM).
"""


@dataclass(frozen=True)
class Option:
    """One option of the command line: its flags and how argparse reads it (type, choices,
    metavar, action), the --help group it is shown in, the fields its value goes to
    ("run.mode": RunConfig's, "segment.k_max": SegmentOptions', "fit.tol": FitOptions'; its
    default is the first one's default), and whether the JSON's settings record it (under
    name; recorded(config): a value other than the first field's; optional: left out while
    None)."""

    name: str
    flags: tuple
    group: str
    fields: tuple
    help: str
    parse: dict = field(default_factory=dict)
    in_settings: bool = True
    recorded: object = None
    optional: bool = False

    @property
    def target(self):
        """(owner, name) of its first field: "run", "segment" or "fit", and the field."""
        owner, name = self.fields[0].split(".")
        return owner, name

    @property
    def default(self):
        owner, name = self.target
        return getattr(OPTION_OWNERS[owner], name)

    @property
    def domain(self):
        """The Domain its first field declares (None: parse says how argparse reads it)."""
        owner, name = self.target
        item = next(f for f in fields(OPTION_OWNERS[owner]) if f.name == name)
        return item.metadata.get("domain")

    @property
    def argparse_kwargs(self):
        """How argparse reads it: its field's Domain (type or choices), then parse."""
        domain = self.domain
        return ({} if domain is None else domain.parse()) | self.parse

    def value(self, config):
        """The value the JSON's settings record for a run's configuration (a RunConfig)."""
        if self.recorded is not None:
            return self.recorded(config)
        owner, name = self.target
        owners = {"run": config, "segment": config.segment, "fit": config.segment.fit}
        return getattr(owners[owner], name)


OPTION_GROUPS = {
    "input": "input",
    "model": "the model",
    "spatial": "a spatial prior (noisy images)",
    "brain": "brain MRI and uneven brightness",
    "outputs": "outputs",
    "batches": "batches",
}
_BRAIN_SETS = ", ".join(
    f"--{name.replace('_', '-')}" + ("" if value is True else f" {value}")
    for name, value in BRAIN_PRESET
)

# Every option of the command line, in the order the JSON's settings record them (--help shows
# each group's in this order): the parser, RunConfig and its settings() are made from it.
OPTIONS = (
    Option(
        "components",
        ("-k", "--components"),
        "model",
        ("run.components",),
        f"the number of classes (default {DEFAULT_COMPONENTS['gray']} for gray images, "
        f"{DEFAULT_COMPONENTS['color']} for colour), or auto: chosen between 1 and --k-max",
        dict(type=_components, metavar="K"),
    ),
    Option(
        "k_max",
        ("--k-max",),
        "model",
        ("segment.k_max",),
        "the largest K that -k auto tries (default %(default)s)",
        dict(metavar="N"),
    ),
    Option(
        "criterion",
        ("--criterion",),
        "model",
        ("segment.criterion",),
        "how -k auto chooses K: classes, the best BIC among fits whose every class fills "
        "regions (not a blurred edge, not one clipped value); bic or icl alone (default "
        "%(default)s)",
    ),
    Option(
        "mode",
        ("--mode",),
        "input",
        ("run.mode",),
        "gray: fit brightness; color: fit RGB colours; auto: gray when the image has one "
        "channel or all its channels are equal (default %(default)s)",
        dict(choices=MODES),
    ),
    Option(
        "covariance",
        ("--covariance",),
        "model",
        ("fit.covariance_type",),
        "the shape of each class's spread, as scikit-learn names them (default %(default)s)",
    ),
    Option(
        "max_iter",
        ("--max-iter",),
        "model",
        ("fit.max_iter",),
        "at most N EM iterations (default %(default)s)",
        dict(metavar="N"),
    ),
    Option(
        "tol",
        ("--tol",),
        "model",
        ("fit.tol",),
        "stop when the log-likelihood per pixel is within T of its limit (default "
        "%(default)s; 0 runs all --max-iter iterations)",
        dict(metavar="T"),
    ),
    Option(
        "n_init",
        ("--n-init",),
        "model",
        ("fit.n_init",),
        f"fit from N starts and keep the best (default {FitOptions().starts()}; "
        f"{FitOptions().starts(choosing_k=True)} for each K with -k auto)",
        dict(metavar="N"),
        recorded=lambda config: config.segment.fit.starts(choosing_k=config.components == "auto"),
    ),
    Option(
        "init",
        ("--init",),
        "model",
        ("fit.init",),
        "how the starts are drawn (default %(default)s)",
    ),
    Option(
        "seed",
        ("--seed",),
        "model",
        ("fit.random_state",),
        "random seed: the same command writes the same images (default %(default)s)",
        dict(metavar="S"),
    ),
    Option(
        "reg_covar",
        ("--reg-covar",),
        "model",
        ("fit.reg_covar",),
        "the smallest spread a class may have, added to every variance as scikit-learn "
        "does (default %(default)s)",
        dict(metavar="R"),
    ),
    Option(
        "variance_prior",
        ("--variance-prior",),
        "brain",
        ("fit.variance_prior",),
        "with --partial-volume: a variance for each tissue, tied by a prior this strong (in "
        f"pixels per pixel fitted; 0: not at all) instead of one for all; auto: "
        f"{TISSUE_VARIANCE_PRIOR} on an image, one variance on a volume (default none; auto "
        f"with --brain)",
        dict(
            type=_word_or(
                _auto_or(_number_at_least(float, 0), "a number >= 0"),
                "a number >= 0, auto",
                "none",
                None,
            ),
            metavar="NU",
        ),
    ),
    Option(
        "out",
        ("--out",),
        "outputs",
        ("run.out",),
        "output folder, created if needed (default %(default)s)",
        dict(metavar="DIR"),
        recorded=lambda config: shown(config.out),
    ),
    Option(
        "max_pixels",
        ("--max-pixels",),
        "input",
        ("run.max_pixels",),
        "refuse images (volumes) with more pixels (voxels) than N (default %(default)s)",
        dict(type=_integer_at_least(1), metavar="N"),
    ),
    Option(
        "shared",
        ("--shared",),
        "batches",
        ("run.shared",),
        "fit one model to all the images together and label every image with it, so "
        "that a label means the same in all",
        dict(action="store_true"),
    ),
    Option(
        "quantized",
        ("--quantized",),
        "model",
        ("segment.quantized",),
        "gray images with a black background or blown highlights: fit each gray level as "
        "a bin, so that no class collapses onto one level",
        dict(action="store_true"),
    ),
    Option(
        "partial_volume",
        ("--partial-volume",),
        "brain",
        ("segment.partial_volume",),
        "pixels that are part one tissue, part another (as FSL FAST): K tissues and the "
        "mixes of neighbouring ones; needs --covariance tied",
        dict(action=argparse.BooleanOptionalAction),
    ),
    Option(
        "cortex_check",
        ("--cortex-check",),
        "brain",
        ("segment.cortex_check",),
        "with --partial-volume and a mask, three tissues: where the fit labels most of the "
        f"brain's surface (its cortex) and over {100 * CORTEX_WHITE_SHARE:.0f} %% of the brain "
        "white matter, fit again with grey matter held at the surface",
        dict(action=argparse.BooleanOptionalAction),
    ),
    Option(
        "spatial",
        ("--spatial",),
        "spatial",
        ("segment.spatial",),
        "how strongly neighbouring pixels share a label (a Potts prior): 0 off (the "
        "default), 0.5 moderate, 1 strong, auto: estimated from the image",
        dict(metavar="BETA"),
    ),
    Option(
        "accelerate",
        ("--accelerate",),
        "model",
        ("fit.accelerate",),
        "squarem: fewer, longer steps to the same maximum; none: plain EM steps "
        "(default %(default)s)",
    ),
    Option(
        "mask",
        ("--mask",),
        "input",
        ("run.mask",),
        "segment only part of the image: nonzero = the pixels that are not black; PATH = "
        "an image of the same size, nonzero inside; auto = nonzero when the border is all "
        "black (default %(default)s). Outside is label 0, inside 1..K",
        dict(metavar="{auto,none,nonzero,PATH}"),
        recorded=lambda config: shown(config.mask),
    ),
    Option(
        "probabilities",
        ("--probabilities",),
        "outputs",
        ("run.probabilities", "segment.keep_posteriors"),
        "also write each label's probability at every pixel, STEM_prob_L.png (16-bit, 65535 = 1)",
        dict(action="store_true"),
    ),
    Option(
        "bias_field",
        ("--bias-field",),
        "brain",
        ("segment.bias_field",),
        "gray images with uneven brightness (MRI): fit a smooth brightness field with the "
        "classes; writes the field and the corrected image",
        dict(action=argparse.BooleanOptionalAction),
    ),
    Option(
        "bias_degree",
        ("--bias-degree",),
        "brain",
        ("segment.bias_degree",),
        "the field's polynomial degree: higher follows faster variation (default %(default)s)",
        dict(metavar="N"),
    ),
    Option(
        "bias_reg",
        ("--bias-reg",),
        "brain",
        ("segment.bias_reg",),
        "how smooth the field must be, as SPM's bias regularisation; 0: no constraint "
        "(default %(default)s)",
        dict(metavar="LAMBDA"),
    ),
    Option(
        "bias_start",
        ("--bias-start",),
        "brain",
        ("segment.bias_start",),
        "histogram: start the field's fit from the field that sharpens the histogram of log "
        "intensities most (as N3 does), where it sharpens it clearly; none: from no field; "
        "auto: histogram on an image, none on a volume (default %(default)s)",
    ),
    Option(
        "brain",
        ("--brain",),
        "brain",
        ("run.brain",),
        f"skull-stripped T1-weighted brain scans, labels 1, 2, 3 = CSF, grey and white "
        f"matter: sets {_BRAIN_SETS}; any of these you type wins",
        dict(action="store_true"),
    ),
    Option(
        "outputs",
        ("--outputs",),
        "outputs",
        ("run.outputs",),
        "write only these, comma-separated: segmented, labels, loglik, comparison, json, "
        "bic (with -k auto), bias and corrected (with --bias-field) (default: all)",
        dict(type=_outputs, metavar="LIST"),
        recorded=lambda config: ["json" if name == "model" else name for name in config.outputs],
    ),
    Option(
        "model",
        ("--model",),
        "outputs",
        ("run.model",),
        "label with the model in FILE (a STEM_model.json this program wrote) instead of "
        "fitting one: a label means the same in every image",
        dict(metavar="FILE"),
        recorded=lambda config: None if config.model is None else shown(config.model),
    ),
    Option(
        "spacing",
        ("--spacing",),
        "input",
        ("run.spacing",),
        "a volume's voxel size along its axes, in the file's order (default: a NIfTI's "
        "header; 1,1,1 for a TIFF stack)",
        dict(type=_spacing, metavar="Z,Y,X"),
        recorded=lambda config: None if config.spacing is None else list(config.spacing),
        optional=True,
    ),
    Option(
        "show",
        ("--show",),
        "outputs",
        ("run.show",),
        "also open the figures in windows (by default they are only saved)",
        dict(action="store_true"),
        in_settings=False,
    ),
    Option(
        "quiet",
        ("-q", "--quiet"),
        "outputs",
        ("run.quiet",),
        "print errors and warnings only",
        dict(action="store_true"),
        in_settings=False,
    ),
    Option(
        "verbose",
        ("-v", "--verbose"),
        "outputs",
        ("run.verbose",),
        "print the log-likelihood of every iteration on stderr",
        dict(action="store_true"),
        in_settings=False,
    ),
    Option(
        "jobs",
        ("-j", "--jobs"),
        "batches",
        ("run.jobs",),
        "segment a batch in N processes (default: one a core); the same bytes as with 1",
        dict(type=_integer_at_least(1), metavar="N"),
        in_settings=False,
    ),
    Option(
        "dask",
        ("--dask",),
        "batches",
        ("run.dask",),
        'segment the batch on a Dask cluster (pip install "dask[distributed]"): a '
        "scheduler's address, or local:N for N processes here; --out must be seen by every "
        "worker",
        dict(type=_dask_spec, metavar="ADDRESS|local[:N]"),
        in_settings=False,
    ),
)


def build_parser():
    parser = _Parser(
        prog="ImageSegmentation.py",
        description="Segment images with a Gaussian mixture fitted by EM: every pixel gets the\n"
        "class it most likely belongs to.  Writes the segmented image, the label map, the\n"
        "convergence plot, a side-by-side comparison and the model (JSON) into --out.",
        epilog=HELP_EXAMPLES,
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "inputs",
        nargs="*",
        metavar="IMAGE_OR_FOLDER",
        help="image files, or folders whose image files are all segmented (default: the "
        "bundled images/ folder)",
    )
    for key, title in OPTION_GROUPS.items():  # group by group: the usage line in their order
        group = parser.add_argument_group(title)
        for option in (option for option in OPTIONS if option.group == key):
            group.add_argument(
                *option.flags,
                dest=option.name,
                default=option.default,
                help=option.help,
                **option.argparse_kwargs,
            )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def parse_command_line(argv=None):
    """The RunConfig of a command line.  --brain's preset sets defaults: an option the user
    typed wins wherever it stands, and with --model the preset's K gives way to the model's.
    Options that SegmentOptions refuses together (OPTION_CLASHES), or with -k auto
    (check_components), raise a UsageError in the command line's words."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.brain:
        typed = _typed_options(argv)
        for name, value in BRAIN_PRESET:
            if name not in typed and not (name == "components" and args.model is not None):
                setattr(args, name, value)
    try:
        config = RunConfig.from_arguments(args)
        check_components(config.components, config.segment)
        return config
    except OptionClash as clash:  # SegmentOptions' own check, in the command line's words
        value = clash.value if clash.value is not True else ""
        other = f"{_flag_of(clash.other)} {value}".rstrip()
        flag = _flag_of(clash.option)
        raise UsageError(f"usage: {flag} does not combine with {other}: {clash.why}") from None


def _flag_of(name):
    """The command line's flag for a field of SegmentOptions or FitOptions, or for the API's
    n_components (OPTION_CLASHES, check_components): its first."""
    name = "components" if name == "n_components" else name
    for option in OPTIONS:
        if any(target.split(".")[1] == name for target in option.fields):
            return option.flags[0]
    raise KeyError(name)


def _typed_options(argv):
    """The destinations of the options on the command line (not their defaults): parsed again
    by a parser of its own whose every default is SUPPRESS."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def _image_extensions():
    Image.init()
    return {ext.lower() for ext in Image.registered_extensions()}


def _sample_folder():
    """images/ beside this file, as a relative path when it is below the current folder."""
    try:
        return str(SAMPLE_FOLDER.relative_to(Path.cwd()))
    except ValueError:
        return str(SAMPLE_FOLDER)


def collect_inputs(arguments):
    """Expand folders into their image files; returns (files, errors) in argument order."""
    files, errors = [], []
    for argument in arguments or [_sample_folder()]:
        path = Path(argument)
        if path.is_dir():
            extensions = _image_extensions()  # loads every Pillow plugin: only for a folder
            try:
                found = sorted(
                    p
                    for p in path.iterdir()
                    if p.is_file()
                    and not p.name.startswith(".")
                    and (p.suffix.lower() in extensions or is_nifti(p))
                )
            except OSError as error:
                errors.append((argument, f"cannot list folder ({error.strerror})"))
                continue
            if not found:
                errors.append((argument, "folder has no image files"))
            files.extend(found)
        else:
            files.append(path)
    return files, errors


def unique_stems(files):
    """Output stem of each input: its file stem, -2, -3, ... added where a stem repeats."""
    taken, stems = set(), []
    for path in files:
        stem = path.name[: -len(".nii.gz")] if path.name.lower().endswith(".nii.gz") else path.stem
        candidate, count = stem, 1
        while candidate in taken:
            count += 1
            candidate = f"{stem}-{count}"
        taken.add(candidate)
        stems.append(candidate)
    return stems


def prepare_output_folder(out):
    """Create the output folder and prove it is writable, before any work is done; returns
    whether it was created (a run that writes nothing removes it again)."""
    folder = Path(out)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"{out}: cannot write output folder ({error.strerror or error})") from None
    return created


@dataclass(frozen=True)
class RunConfig:
    """One run of the command line, made once from its arguments (from_arguments): nothing
    below the command line sees argparse, and settings() is what every JSON record says of it.
    The defaults are the options objects' own."""

    inputs: tuple = ()
    components: int | str | None = None  # None: DEFAULT_COMPONENTS of the image's mode
    mode: str = "auto"
    out: str = "output"
    max_pixels: int = MAX_PIXELS
    mask: str = "auto"
    probabilities: bool = False
    shared: bool = False
    jobs: int | None = None  # None: one worker a core
    dask: str | None = None  # a Dask scheduler's address, or local[:N]
    show: bool = False
    quiet: bool = False
    verbose: bool = False
    brain: bool = False  # --brain set the options BRAIN_PRESET names (those after it won)
    outputs: tuple = OUTPUTS  # the outputs to write
    model: str | None = None  # label with this STEM_model.json instead of fitting
    spacing: tuple | None = None  # a volume's voxel size, over its file's
    segment: SegmentOptions = SegmentOptions()

    @classmethod
    def from_arguments(cls, args):
        """The configuration of parsed arguments: each option's value in its fields (OPTIONS)."""
        values = {"run": {}, "segment": {}, "fit": {}}
        for option in OPTIONS:
            for target in option.fields:
                owner, name = target.split(".")
                values[owner][name] = getattr(args, option.name)
        segment = SegmentOptions(**values["segment"], fit=FitOptions(**values["fit"]))
        return cls(inputs=tuple(args.inputs), segment=segment, **values["run"])

    def output_notes(self):
        """Outputs asked for by --outputs that this run cannot write, one note each."""
        if self.outputs == OUTPUTS:  # the default: every output the run makes
            return []
        needs = {"bic": ("-k auto", self.components == "auto")} | dict.fromkeys(
            ("bias", "corrected"), ("--bias-field", self.segment.bias_field)
        )
        return [
            f"--outputs {name}: written only with {option}; not written in this run"
            for name, (option, made) in needs.items()
            if name in self.outputs and not made
        ]

    def components_for(self, mode):
        return self.components or DEFAULT_COMPONENTS[mode]

    def settings(self):
        """Every option of the run, as the JSON records them (n_init as it was used)."""
        settings = {}
        for option in OPTIONS:
            value = option.value(self) if option.in_settings else None
            if option.in_settings and not (option.optional and value is None):
                settings[option.name] = value
        return settings


OPTION_OWNERS = {"run": RunConfig, "segment": SegmentOptions, "fit": FitOptions}  # Option.fields


def _write_line(stream, text):
    """One line on stderr; a stderr that cannot be written has nobody to tell."""
    try:
        stream.write(text + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass


PROGRESS_AFTER = 2.0  # seconds into an image before its fit's progress is drawn
PROGRESS_EVERY = 0.25  # seconds between two drawings of the progress line


class Console:
    """Where a run speaks: summary lines on stdout; messages and the progress line on stderr.

    A closed stdout (`... | head -1`) ends the summary lines quietly and the batch goes on;
    any other failure to write stdout (a full disk) is one error line and exit status 1.
    The progress line is drawn only on a terminal, and never with --quiet.
    """

    def __init__(self, total, progress):
        self.total, self.progress, self.done = total, progress, 0
        self.started = self.image_started = time.perf_counter()
        self.drawn = -math.inf
        self.stdout_open, self.failed = True, False

    def _draw(self, text):
        if self.progress:
            try:
                sys.stderr.write("\r\033[K" + text)
                sys.stderr.flush()
            except (OSError, ValueError):
                self.progress = False

    def out(self, text):
        if not self.stdout_open:
            return
        try:
            self._draw("")
            print(text, file=sys.stdout, flush=True)
        except BrokenPipeError:
            self._close_stdout()
        except OSError as error:
            self._close_stdout()
            self.failed = True
            self.say(f"error: standard output: {error.strerror or error}")

    def _close_stdout(self):
        """Nothing more to stdout; its descriptor now /dev/null, so the exit's flush is quiet."""
        self.stdout_open = False
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, sys.stdout.fileno())
            os.close(null)
        except (OSError, ValueError, AttributeError):
            pass

    def say(self, text):
        """A whole line on stderr, above the progress line."""
        self._draw("")
        _write_line(sys.stderr, text)

    def image_done(self):
        self.done += 1
        now = time.perf_counter()
        elapsed, self.image_started = now - self.started, now
        left = elapsed / self.done * (self.total - self.done)
        self._draw(f"[{self.done}/{self.total}] {elapsed:.0f}s elapsed, about {left:.0f}s left")

    def iteration(self, path, stage, n_iter):
        """A fit's stage and iteration, once its image has taken PROGRESS_AFTER seconds, at
        most every PROGRESS_EVERY: a quick image draws nothing but its count."""
        now = time.perf_counter()
        if now - self.image_started < PROGRESS_AFTER or now - self.drawn < PROGRESS_EVERY:
            return
        self.drawn = now
        self._draw(
            f"[{self.done}/{self.total}] {shown(path.name)}: {stage + ', ' if stage else ''}"
            f"iteration {n_iter}, {now - self.image_started:.0f}s"
        )

    def finish(self):
        self._draw("")


@dataclass
class Outcome:
    """What became of one input: its summary line or its error, and the stderr lines it produced."""

    path: Path
    line: str | None = None
    error: str | None = None
    messages: list = field(default_factory=list)


@dataclass(frozen=True)
class Batch:
    """What every image of a run shares: its configuration, the input files never to be
    written over, and the batch's own model (--shared)."""

    config: RunConfig
    inputs: frozenset
    shared: SharedModel | None = None
    token: str = ""  # on a Dask cluster: starts the names of the batch's temporaries


def _segment_file(path, stem, batch, say, console):
    """Read, segment and write one image; returns its summary line."""
    config, clock = batch.config, time.perf_counter()
    picture = read_image(path, config.max_pixels)
    if config.spacing is not None:
        if picture.volume is None:
            picture.notes.append("--spacing applies to volumes; ignored for this image")
        else:  # given in the file's axis order
            spacing = tuple(picture.volume.in_file_order(config.spacing))
            picture.volume = replace(picture.volume, spacing=spacing)
    loaded = time.perf_counter()
    paths = output_paths(config.out, stem, image_suffix(picture))
    _refuse_overwriting_inputs(paths.values(), batch.inputs)

    def report(stage, n_iter, log_likelihood):
        if config.verbose:
            say(f"{shown(path)}: iteration {n_iter}: log-likelihood {log_likelihood:.8f}")
        elif console is not None:
            console.iteration(path, stage, n_iter)

    on_iteration = Progress(report)

    segmentation, notes = segment_picture(picture, batch, on_iteration)
    fitted = time.perf_counter()
    probabilities = None
    if config.probabilities:
        probabilities = probability_paths(config.out, stem, segmentation)
        _refuse_overwriting_inputs(probabilities.values(), batch.inputs)
    record = model_record(
        segmentation,
        path,
        config.settings(),
        notes,
        {"load": loaded - clock, "fit": fitted - loaded},
    )
    names = BRAIN_TISSUES if config.brain and segmentation.model.n_labels == 3 else None
    captions = Captions(figure_title(path, segmentation), names)
    write_outputs(
        segmentation,
        paths,
        captions,
        record,
        probabilities,
        config.outputs,
        batch.token,
        passes=config.segment.fit.passes,
    )
    if not config.quiet:
        for note in notes:
            say(f"note: {shown(path)}: {note}")
    return summary_line(path, segmentation, record["seconds"]["total"])


def _refuse_overwriting_inputs(targets, inputs):
    for target in targets:
        if target.exists() and target.resolve() in inputs:
            raise ImageError(
                f"output {shown(target)} would overwrite an input file; choose another --out"
            )


def segment_picture(picture, batch, on_iteration=None):
    """The segmentation of one read image as the options ask, and the notes a user should see."""
    config, shared = batch.config, batch.shared
    picture, mask_note = masked(picture, config)
    options = config.segment
    points = distinct_values(picture, config.mode, options.fit.passes)
    if shared is not None and shared.file is not None:
        _check_fits_the_model(points, shared)
    elif shared is not None and points.mode != shared.mode:  # a gray image in a colour batch
        points = distinct_values(picture, shared.mode, options.fit.passes)
    if options.bias_field and not (picture.kind == "gray" and points.mode == "gray"):
        picture.notes.append("--bias-field applies to 8- and 16-bit gray images; ignored here")
        options = replace(options, bias_field=False)
    try:
        segmentation = segment_points(
            picture,
            points,
            shared.model.n_labels if shared and shared.file else config.components_for(points.mode),
            options,
            shared=shared,
            on_iteration=on_iteration,
        )
    except FitFailed as error:
        raise ImageError(str(error)) from None
    notes = picture.notes + [mask_note] * bool(mask_note)
    notes += brain_notes(picture, points) if config.brain else []
    notes += fit_notes(segmentation, options.quantized and shared is None, options.fit.reg_covar)
    notes += brain_fit_notes(segmentation) if config.brain else []
    return segmentation, notes


BRAIN_MIN_PIXELS = 3000  # fewer inside the brain: too few for three tissues and their mixes
BRAIN_BLACK_BORDER = 0.9  # of the border black at least: skull-stripped (the brainstem may be cut)


def brain_notes(picture, points):
    """What makes an image unlike the skull-stripped gray scans --brain is made for."""
    notes = []
    if points.mode != "gray":
        notes.append("--brain is made for gray scans; this image is in colour")
    black = zero_border_share(picture, axes=(-2, -1))  # a volume: a slab's end slices are brain
    if black < BRAIN_BLACK_BORDER:
        notes.append(
            f"--brain is made for skull-stripped scans, black outside the brain; only "
            f"{100 * black:.0f} % of this image's border is black, so every pixel that is not "
            f"black is taken for brain"
        )
    inside = picture.codes.size if picture.mask is None else int(picture.mask.sum())
    if inside < BRAIN_MIN_PIXELS:
        notes.append(
            f"only {inside:,} pixels inside the brain: fewer than {BRAIN_MIN_PIXELS:,}, too few "
            f"to tell three tissues apart reliably"
        )
    return notes


def _check_fits_the_model(points, shared):
    """ImageError unless the image is of the kind the model read by --model was fitted to."""
    where = f"the model {shown(shared.file)}"
    if points.mode != shared.mode:
        raise ImageError(f"{where} is of {shared.mode} images; this image is {points.mode}")
    top = shared.model.quantized_top
    if top is not None and gray_level_top(points) != top:
        raise ImageError(
            f"{where} fits {top.bit_length()}-bit gray levels as bins; this image's differ"
        )


MAX_MODEL_BYTES = 64 << 20  # a saved model is a few kB; a larger file is no model of ours


def read_model(path):
    """--model: the SharedModel of a STEM_model.json, or the reason it is none (one line).

    The file is checked as an image is (a regular file, not empty) and its size before it is
    read; JSON nested too deeply for the parser is refused, not a RecursionError."""
    path = Path(path)
    try:
        _check_regular_file(path)
        if path.stat().st_size > MAX_MODEL_BYTES:
            raise ImageError(f"{path.stat().st_size:,} bytes: no saved model is that large")
        record = json.loads(path.read_bytes())
        model = GaussianMixtureFit.from_record(record)
    except ImageError as error:
        return None, str(error)
    except OSError as error:
        return None, f"cannot read it ({error.strerror or error})"
    except RecursionError:
        return None, "no usable model (its JSON is nested too deeply)"
    except (ValueError, AttributeError) as error:
        return None, f"no usable model ({shown(error)})"
    mode = "color" if model.means.shape[1] == 3 else "gray"
    return SharedModel(model, None, (), mode, file=str(path)), None


def masked(picture, config):
    """The picture with the mask config.mask asks for, and a note when auto chose one."""
    mask_option = config.mask
    if mask_option == "none" or (mask_option == "auto" and not border_is_zero(picture)):
        return picture, None
    if mask_option in ("auto", "nonzero"):
        mask, source = nonzero_mask(picture), None
    else:
        try:
            source = read_image(mask_option, config.max_pixels)
        except ImageError as error:
            raise ImageError(f"mask {shown(mask_option)}: {error}") from None
        mask = _mask_of_file(source, picture, mask_option)
        source = mask_option
    try:
        picture = with_mask(picture, mask)
    except ValueError as error:
        raise ImageError(f"{error}" + (f" ({shown(source)})" if source else "")) from None
    if mask_option != "auto":
        return picture, None
    inside = int(picture.mask.sum())
    return picture, (
        f"the border is entirely 0: segmenting the {inside:,} nonzero pixels inside "
        f"(--mask none segments every pixel)"
    )


def _mask_of_file(mask_picture, picture, name):
    """The nonzero pixels of a --mask file, in the picture's axis order.  Volumes meet in their
    files' axis order (a NIfTI's reversed in its codes, a TIFF stack's as they are): a mask
    fits a volume whose file has the same shape, whatever the two formats."""
    mask = nonzero_mask(mask_picture)
    if picture.volume is None:
        return mask
    in_file_order = mask_picture.volume is not None and mask_picture.volume.file_axes_reversed
    mask = mask.T if in_file_order else mask
    shape = tuple(picture.volume.in_file_order(picture.codes.shape))
    if mask.shape != shape:
        unit = "voxels" if mask_picture.volume is not None else "pixels"
        raise ImageError(
            f"the mask is {mask_picture.size_text} {unit}, the volume {picture.size_text} "
            f"({shown(name)})"
        )
    return mask.T if picture.volume.file_axes_reversed else mask


def fit_notes(segmentation, quantized_asked, reg_covar):
    """What a user should know of a fit: fewer components, --quantized ignored, a collapse."""
    model, points, notes = segmentation.model, segmentation.points, []
    requested, k = segmentation.requested_k, model.n_labels
    if (
        requested != "auto" and k < requested and segmentation.shared is None
    ):  # a batch says it once
        notes.append(fewer_components_note(len(points.values), requested))
    if quantized_asked and model.quantized_top is None:
        notes.append(
            f"--quantized applies to 8- and 16-bit gray levels; ignored for this "
            f"{'colour' if points.mode == 'color' else 'floating-point'} image"
        )
    collapsed = collapsed_components(model, reg_covar) if len(points.values) > k else []
    if collapsed and segmentation.saved_model:  # not fitted here: no --reg-covar floor
        notes.append(saved_collapse_note(collapsed, reg_covar, segmentation.saved_model))
    elif collapsed:
        black = segmentation.picture.mask is None and bool(  # within a quarter of a level
            np.any(np.all(np.abs(model.means[collapsed]) < 1e-3, axis=1))
        )
        notes.append(collapse_note(collapsed, reg_covar, model.means.shape[1] == 1, black))
    empty = empty_components(segmentation)
    if empty:
        notes.append(empty_note(empty, segmentation))
    notes += cap_notes(segmentation)
    notes += cortex_notes(segmentation)
    notes += field_notes(segmentation)
    if segmentation.k_search is not None and segmentation.shared is None:
        notes += k_search_notes(segmentation.k_search)
    return notes


def cortex_notes(segmentation):
    """A mixture fitted again by the cortex check (cortex_refit): its labels were one tissue
    too bright, and grey matter's mean is where the surface put it, not where EM would."""
    pv = segmentation.model.partial_volume
    if pv is None or not pv.held or segmentation.saved_model:
        return []
    return [
        "the first fit labelled the brain's surface (its cortex) white matter, every label one "
        "tissue too bright (a slice or slab mostly grey matter?): fitted again with grey "
        "matter's mean held at the surface's commonest intensity (--cortex-check, docs/brain.md)"
    ]


def cap_notes(segmentation):
    """A fit that --max-iter stopped before it converged: its labels may not be its own yet."""
    stopped = []
    if segmentation.model.n_iter and not segmentation.model.converged:
        stopped.append(f"the mixture's EM at {segmentation.model.n_iter} iterations")
    prior = segmentation.spatial
    if prior is not None and not prior.converged:
        stopped.append(f"the spatial prior's at {prior.n_iter}")
    if not stopped:
        return []
    return [
        f"the fit stopped before it converged ({' and '.join(stopped)}, the --max-iter cap): "
        f"its labels may still be wrong; a larger --max-iter lets it finish"
    ]


def field_notes(segmentation):
    """A field strong enough that the spatial fit started again (BiasField.restarted), and how
    strong: the labels are those of the second start (docs/brain.md)."""
    bias = segmentation.bias
    if bias is None or not bias.restarted:
        return []
    return [
        f"a strong intensity field (max / min {bias.spread:.2f} over the fitted pixels): the "
        f"spatial fit was started again from the field fitted with the mixture and the "
        f"mixture refitted to the intensities it corrects (docs/brain.md)"
    ]


BRAIN_PLAUSIBLE = {"CSF": (0.0, 0.5), "grey matter": (0.1, 0.8), "white matter": (0.1, 0.8)}
# white matter over grey matter: every slice of the ICBM 2009a template with 5,000 brain pixels
# or more, at 1, 2 and 3 mm, has at most 1.32 (docs/brain.md); past this, grey matter's bright
# side is likely labelled white
WHITE_OVER_GREY_MAX = 1.5
# a volume's tissue labelled on under this share of what its fitted mixture gives it (its pure
# Gaussian's weight and its shares of the mixels'): on the grid's whole volumes, the ones that
# keep under half a tissue's voxels (CSF at 9 % noise), chosen on seeds 40-41 (docs/brain.md)
LABELLED_OF_MIXTURE_MIN = 0.6


def brain_fit_notes(segmentation):
    """--brain's fit checked against what a brain holds: each tissue's share of the brain within
    BRAIN_PLAUSIBLE (CSF at most half, grey and white matter a tenth at least), white matter at
    most WHITE_OVER_GREY_MAX times grey matter, on a volume each tissue labelled on at least
    LABELLED_OF_MIXTURE_MIN of its share in the mixture (under_labelled), and labels that may
    not be the tissues in order (peaks_taken, crossed_mixels)."""
    model, notes = segmentation.model, []
    if model.n_labels != len(BRAIN_TISSUES):
        return notes
    counts = segmentation.label_counts
    shares = counts / max(counts.sum(), 1)
    for (tissue, (low, high)), share in zip(BRAIN_PLAUSIBLE.items(), shares):
        if not low <= share <= high:
            notes.append(
                f"{tissue} is {100 * share:.1f} % of the brain, outside the {100 * low:.0f} to "
                f"{100 * high:.0f} % a brain holds: the labels may not be the tissues (a strong "
                f"field, or not a T1 scan?)"
            )
    grey, white = shares[1], shares[2]
    if grey >= BRAIN_PLAUSIBLE["grey matter"][0] and white > WHITE_OVER_GREY_MAX * grey:
        notes.append(
            f"white matter is labelled on {white / grey:.1f} times grey matter's "
            f"pixels, where no slice of the ICBM template has over 1.3: grey matter's bright side "
            f"may be labelled white matter (broad grey matter, as in the cerebellum?)"
        )
    if segmentation.picture.volume is not None:
        for tissue, labelled, fitted in under_labelled(model, shares):
            notes.append(
                f"{BRAIN_TISSUES[tissue]} is labelled on {100 * labelled:.1f} % of the brain, "
                f"where the fitted mixture gives it {100 * fitted:.1f} %: the spatial prior gave "
                f"much of it to its neighbours (thin {BRAIN_TISSUES[tissue]} in noise?), so its "
                f"volume is under-counted (a smaller --spatial BETA keeps more)"
            )
    for label, other in peaks_taken(model):
        notes.append(
            f"at {BRAIN_TISSUES[label]}'s own mean intensity the fit gives {BRAIN_TISSUES[other]}: "
            f"its peak is taken by another label, so much of it may be labelled "
            f"{BRAIN_TISSUES[other]} (a strong field, thick voxels, or a tissue this slice lacks?)"
        )
    for low, high in crossed_mixels(model):
        notes.append(
            f"the tissues' intensities crossed during the fit (a mixel between "
            f"{BRAIN_TISSUES[low]} and {BRAIN_TISSUES[high]}, which are not neighbours): the "
            f"labels may not be {', '.join(BRAIN_TISSUES)} in order"
        )
    return notes


def under_labelled(model, shares):
    """[(tissue, its labelled share, its share in the mixture)] of a partial-volume model's
    tissues labelled on under LABELLED_OF_MIXTURE_MIN of the share of the pixels the fitted
    mixture gives them (each Gaussian's weight split over its tissues by its fractions, as a
    pixel's posteriors are in expected_fractions); shares: the labels' shares of the pixels
    inside.  [] for any other model."""
    if model.partial_volume is None:
        return []
    fitted = model.partial_volume.expected_fractions(model.weights)
    return [
        (tissue, float(shares[tissue]), float(fitted[tissue]))
        for tissue in range(len(fitted))
        if shares[tissue] < LABELLED_OF_MIXTURE_MIN * fitted[tissue]
    ]


def peaks_taken(model):
    """[(label, other)]: the labels at whose own mean the model gives another label the highest
    posterior (a mixel or a broad Gaussian has taken the label's peak, so the label's pixels go
    to the other).  Labels ordered by intensity are each most probable at their own mean."""
    own = model.predict(model.label_means)
    return [(label, int(other)) for label, other in enumerate(own) if other != label]


def crossed_mixels(model):
    """[(low, high)]: a partial-volume model's mixels between labels that are not neighbours in
    intensity order: the tissues' means crossed during the fit (they start ordered, and the
    mixels are made between neighbours only)."""
    pv = model.partial_volume
    if pv is None:
        return []
    pairs = []
    for row in pv.fractions[pv.n_tissues :]:
        low, high = np.flatnonzero(row > 0)[[0, -1]]
        if high - low > 1:
            pairs.append((int(low), int(high)))
    return sorted(set(pairs))


def k_search_notes(search):
    """What a user should know of -k auto: K at its largest, fits judged before they converged."""
    notes = []
    if search.chosen == search.k_max:
        notes.append(
            f"-k auto chose K = {search.k_max}, the largest it may try: its criterion "
            f"({search.criterion}) still fell there; a larger --k-max may find more"
        )
    if search.criterion == "classes" and not search.regions:
        notes.append(
            "-k auto: no fit's classes filled regions of the image (fine structures, or heavy "
            "noise), so K was chosen by BIC among the fits that did not collapse"
        )
    capped = [row["k"] for row in search.rows if row["capped"]]
    if capped:
        which = ", ".join(map(str, capped))
        notes.append(
            f"-k auto judged K = {which} after {K_PROBE_MAX_ITER} iterations, as the fit stood "
            f"(EM crawls where two components share one class)"
        )
    return notes


def empty_note(empty, segmentation):
    first = 0 if segmentation.picture.mask is None else 1  # as the label map numbers them
    which = ", ".join(str(k + first) for k in empty)
    smaller = " (a smaller --spatial BETA keeps it)" if segmentation.spatial else ""
    return (
        f"label{'s' if len(empty) > 1 else ''} {which} ended with (almost) no pixels: the "
        f"{'model' if segmentation.saved_model else 'fit'} "
        f"has {len(empty)} component{'s' if len(empty) > 1 else ''} fewer in effect{smaller}"
    )


def fewer_components_note(distinct, requested):
    return (
        f"only {distinct} distinct value{'s' if distinct > 1 else ''}: fitted {distinct} "
        f"component{'s' if distinct > 1 else ''} instead of {requested}"
    )


def collapse_note(collapsed, reg_covar, gray, on_black=False):
    """One line on components that collapsed onto a single value, and what to do about it:
    on black (a background, a volume's empty slices), leave it out with --mask nonzero; on
    another gray level, fit the levels as bins."""
    which = ", ".join(map(str, collapsed))
    remedies = []
    if on_black:
        remedies.append("black as a background: --mask nonzero leaves it out")
    if gray:
        quantized = "--quantized fits gray levels as bins and cannot collapse"
        remedies.append(f"as a dark class: {quantized}" if on_black else quantized)
    remedy = "".join(f"; {text}" for text in remedies)
    return (
        f"component{'s' if len(collapsed) > 1 else ''} {which} collapsed onto a single value "
        f"(variance at the --reg-covar floor {reg_covar:g}), leaving the other components to fit "
        f"the rest of the image{remedy}"
    )


def saved_collapse_note(collapsed, reg_covar, file):
    """collapse_note for a model read by --model, whose variances were not fitted here."""
    which, several = ", ".join(map(str, collapsed)), len(collapsed) > 1
    return (
        f"component{'s' if several else ''} {which} of the model {shown(file)} "
        f"{'have variances' if several else 'has a variance'} under {2 * reg_covar:g}: "
        f"{'each labels' if several else 'it labels'} (almost) a single value"
    )


def figure_title(path, segmentation):
    model, prior = segmentation.model, segmentation.spatial
    return (
        f"{shown(path.name)}: {segmentation.points.mode}, K = {model.n_labels}, "
        f"{model.covariance_type} covariance"
        + (", quantized" if model.quantized_top else "")
        + (", partial volume" if model.partial_volume is not None else "")
        + _model_source(segmentation)
        + (f", spatial prior {prior.beta:g}" if prior else "")
    )


def _model_source(segmentation):
    """Where the model came from, for a figure's title: read by --model, or the batch's."""
    if segmentation.saved_model:
        return ", saved model"
    if segmentation.shared:
        return ", shared model"
    return ""


def summary_line(path, segmentation, seconds):
    """The one line per image on stdout."""
    model, picture, prior = segmentation.model, segmentation.picture, segmentation.spatial
    spatial = (
        ""
        if prior is None
        else (
            f"spatial-iterations={prior.n_iter} {_stop_word(prior.converged)} "
            f"objective={prior.objective[-1]:.6f} "
        )
    )
    return (
        f"{shown(path)}: {picture.size_text} {segmentation.points.mode} "
        f"K={model.n_labels} distinct={len(segmentation.points.values)} "
        f"iterations={model.n_iter} em-steps={model.n_em_steps} {_stop_word(model.converged)} "
        f"loglik={model.log_likelihood[-1]:.6f} {spatial}{seconds:.2f}s"
    )


def _stop_word(converged):
    return "converged" if converged else "stopped-at-max-iter"


def segment_file(path, stem, batch, console=None):
    """_segment_file with every failure of the input turned into an Outcome (the batch goes on).

    A warning raised on the way (NumPy's numerical ones included) becomes one `warning:` line.
    console: print as it goes (in this process); None: collect the lines (in a worker).
    """
    outcome = Outcome(path)
    say = outcome.messages.append if console is None else console.say
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                outcome.line = _segment_file(path, stem, batch, say, console)
            finally:
                for message in dict.fromkeys(f"{w.category.__name__}: {w.message}" for w in caught):
                    say(f"warning: {shown(path)}: {shown(message)}")
    except ImageError as error:
        outcome.error = str(error)
    except MemoryError:
        outcome.error = "not enough memory"
    except OSError as error:
        outcome.error = error.strerror or str(error)
    except Exception as error:  # a bug of ours: report it, and let the batch go on
        outcome.error = f"internal error, please report: {type(error).__name__}: {error}"
    return outcome


# --- Worker processes (--jobs) ---------------------------------------------------------------
# A signal reaches a busy worker as KeyboardInterrupt once, so its image's clean-up runs to the
# end; a worker killed from outside (the out-of-memory killer) breaks the pool, and the images
# it left unfinished are run again, each in a fresh process of its own.


class _WorkerSignals:
    """A worker process's answer to SIGINT and SIGTERM, installed as their handler (which is where
    the worker keeps this state): the first one interrupts the image in progress as
    KeyboardInterrupt, so its clean-up runs to the end; later ones, or one between images, only
    mark the worker interrupted, and it starts no other image."""

    def __init__(self):
        self.busy = self.interrupted = False

    def __call__(self, signum, frame):
        first = not self.interrupted
        self.interrupted = True
        if first and self.busy:
            raise KeyboardInterrupt


def _worker_started():
    handler = _WorkerSignals()
    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _segment_in_worker(task):
    worker = signal.getsignal(signal.SIGINT)
    if worker.interrupted:
        return Outcome(task[0], error="interrupted")
    worker.busy = True
    try:
        return segment_file(*task)
    except KeyboardInterrupt:  # its temporaries are already gone (OutputSet)
        return Outcome(task[0], error="interrupted")
    finally:
        worker.busy = False


def _process_pool(workers):
    import concurrent.futures
    import multiprocessing

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    return concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context(method), initializer=_worker_started
    )


def segment_in_workers(tasks, workers):
    """Outcomes of the tasks in input order, each as soon as it and those before it are done.
    Closing it early (an interrupt while the caller prints a line) stops the workers at once."""
    from concurrent.futures.process import BrokenProcessPool

    done, broken, next_index = {}, [], 0
    with _process_pool(workers) as pool:
        try:
            futures = [pool.submit(_segment_in_worker, task) for task in tasks]
            for index, future in enumerate(futures):
                try:
                    done[index] = future.result()
                except BrokenProcessPool:
                    broken.append(index)
                while next_index in done:
                    yield done.pop(next_index)
                    next_index += 1
        except (KeyboardInterrupt, GeneratorExit):  # a signal, or the caller stopped listening
            _stop_workers(pool)
            raise
    for index in broken:  # each in a fresh process of its own: one that dies again fails alone
        path = tasks[index][0]
        with _process_pool(1) as pool:
            try:
                done[index] = pool.submit(_segment_in_worker, tasks[index]).result()
                done[index].messages.insert(
                    0,
                    f"note: {shown(path)}: its worker process died; segmented again in a fresh one",
                )
            except BrokenProcessPool:
                done[index] = Outcome(
                    path,
                    error="its worker process died twice (killed from outside, or out of memory)",
                )
            except KeyboardInterrupt:
                _stop_workers(pool)
                raise
        while next_index in done:
            yield done.pop(next_index)
            next_index += 1


def _stop_workers(pool):
    """Ctrl-C or SIGTERM in the main process: each worker stops its image cleanly, no new one."""
    import multiprocessing

    for sig in (signal.SIGINT, signal.SIGTERM):  # no second interrupt while cleaning up
        signal.signal(sig, signal.SIG_IGN)
    for child in multiprocessing.active_children():
        try:
            os.kill(child.pid, signal.SIGINT)
        except OSError:
            pass
    pool.shutdown(wait=True, cancel_futures=True)


# --- A Dask cluster (--dask) -----------------------------------------------------------------
# Each image is a task: the worker reads it, segments it, writes its outputs into --out (a
# folder every worker sees) and sends back its Outcome, a few hundred bytes; the batch (the
# configuration and any shared or saved model) goes to every worker once.  With --shared, each
# image's point groups are a task, added up pairwise on the workers (merged_groups, a tree: no
# worker holds more than two sums), and the model is fitted once, on a worker, from the total.
# The scheduler runs a dead worker's tasks again elsewhere (up to its allowed failures); the
# temporaries such a worker left are found by the batch's token and removed at the end.


# A local cluster's workers as a batch wants them (as fast as a plain process; measured in
# docs/benchmarks.md): BLAS on one thread (Dask's
# default too) but glibc's own trimming of freed memory, not Dask's MALLOC_TRIM_THRESHOLD_ of
# 64 kB, which hands every large temporary back to the system; no statistical profiler sampling
# the task every 10 ms (there is no dashboard to show it); the event loop's health tick every
# second instead of every 20 ms.  Set while the cluster starts: its workers take it with them.
LOCAL_CLUSTER_CONFIG = {
    "distributed.nanny.pre-spawn-environ": dict.fromkeys(BLAS_THREAD_VARIABLES, 1),
    "distributed.worker.profile.enabled": False,
    "distributed.admin.tick.interval": "1s",
}


def dask_client(spec):
    """(client, cluster or None) for --dask: "local" or "local:N" starts N worker processes on
    this machine (one thread each), anything else is a scheduler's address.  The workers get
    this file (Client.upload_file), so a cluster needs only Python and its packages.  Raises
    UsageError when dask is missing or the scheduler cannot be reached."""
    try:
        import dask
        import distributed
    except ImportError:
        raise UsageError('--dask needs dask.distributed: pip install "dask[distributed]"') from None
    for name in ("distributed", "tornado", "asyncio"):  # the batch's lines are ours to print
        logging.getLogger(name).setLevel(logging.CRITICAL)
    cluster = None
    try:
        with warnings.catch_warnings(), dask.config.set(LOCAL_CLUSTER_CONFIG):
            warnings.simplefilter("ignore")
            if spec == "local" or spec.startswith("local:"):
                workers = int(spec.split(":")[1]) if ":" in spec else os.cpu_count() or 1
                cluster = distributed.LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=True,
                    dashboard_address=None,
                    silence_logs=logging.CRITICAL,
                )
                client = distributed.Client(cluster)
            else:
                _check_scheduler(spec, connect_seconds())
                client = distributed.Client(spec)
            client.upload_file(__file__)
    except UsageError:
        raise
    except (Exception, MemoryError) as error:  # whatever answered, it is no cluster of ours
        if cluster is not None:
            cluster.close()
        raise UsageError(f"--dask {shown(spec)}: cannot connect ({shown(error)})") from None
    return client, cluster


def connect_seconds():
    """How long --dask waits for a scheduler: Dask's own connect timeout, as its users set it
    (distributed.comm.timeouts.connect, 30 s unless a Dask config file or
    DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT says otherwise); the client waits as long."""
    import dask
    from dask.utils import parse_timedelta

    return parse_timedelta(dask.config.get("distributed.comm.timeouts.connect"), default="s")


def _check_scheduler(spec, seconds):
    """UsageError unless a Dask scheduler answers at a TCP address within seconds.  A scheduler
    speaks first: its handshake's frame header (two little-endian uint64s: its length, its
    number of frames) arrives on connecting.  A listener that never answers, or a server of
    another protocol (HTTP waits for a request; SSH's banner is text) is refused here, where
    Dask's client would wait without end, or read text as a frame length of exabytes.
    Addresses of other schemes (tls://, ucx://) are left to the client."""
    from distributed.comm.addressing import parse_address, parse_host_port

    try:
        scheme, location = parse_address(spec)
        host, port = parse_host_port(location)
    except ValueError:
        return  # no host and port: the client says what is wrong
    if scheme != "tcp":
        return
    where, deadline = f"--dask {shown(spec)}: cannot connect", time.monotonic() + seconds
    head = b""
    try:
        with socket.create_connection((host, port), timeout=seconds) as connection:
            while len(head) < 16:
                connection.settimeout(max(deadline - time.monotonic(), 1e-3))
                chunk = connection.recv(16 - len(head))
                if not chunk:
                    raise UsageError(f"{where} (the connection was closed unanswered)")
                head += chunk
    except TimeoutError:
        raise UsageError(f"{where} (no Dask scheduler answered within {seconds} s)") from None
    except OSError as error:
        raise UsageError(f"{where} ({shown(error.strerror or error)})") from None
    length, frames = struct.unpack("<QQ", head)
    if not (0 < frames <= 64 and 0 < length <= 1 << 20):
        raise UsageError(f"{where} (what answers there is not a Dask scheduler)")


def _cluster_module():
    """The module the workers import (this file, by name), whose functions and classes a task
    is made of: pickled by reference, not by value from __main__."""
    import importlib

    return importlib.import_module(Path(__file__).stem)


def segment_on_dask(tasks, client):
    """Outcomes of the tasks in input order, each image a task on the cluster."""
    from distributed import KilledWorker

    module = _cluster_module()
    batch = tasks[0][2]
    [shared_batch] = client.scatter([batch], broadcast=True, hash=False)
    futures = [
        client.submit(module.segment_file, path, stem, shared_batch, pure=False)
        for path, stem, _ in tasks
    ]
    try:
        for (path, _, _), future in zip(tasks, futures):
            try:
                yield future.result()
            except KilledWorker:
                yield Outcome(
                    path, error="its Dask worker died each time (killed, or out of memory)"
                )
    finally:
        client.cancel(futures)


def shared_model_on_dask(files, config, client, report):
    """--shared on the cluster: each image's point groups a task, summed as a tree, the model
    fitted on a worker; the same SharedModel as shared_model's, bit for bit."""
    module = _cluster_module()
    [shared_config] = client.scatter([config], broadcast=True, hash=False)
    level = [
        client.submit(module.groups_or_error, index, path, shared_config, pure=False)
        for index, path in enumerate(files)
    ]
    while len(level) > 1:
        pairs = [level[i : i + 2] for i in range(0, len(level), 2)]
        level = [
            client.submit(module.merged_results, *pair) if len(pair) == 2 else pair[0]
            for pair in pairs
        ]
    fitted = client.submit(
        module.fit_pooled_result, level[0], shared_config, list(files), pure=False
    )
    result, notes, failure, errors, readable = fitted.result()
    for index, message in errors:
        report(files[index], message)
    readable = [files[index] for index in readable]
    return shared_of_fit(result, notes, failure, readable, report)


def groups_or_error(index, path, config):
    """A --shared task: (the image's point groups, its errors [(index, why)], readable [index])."""
    try:
        return image_groups(path, config), [], [index]
    except ImageError as error:
        return {}, [(index, str(error))], []


def merged_results(a, b):
    """Two groups_or_error results (or sums of them) added up: a node of the tree."""
    return merged_groups(a[0], b[0]), a[1] + b[1], sorted(a[2] + b[2])


def fit_pooled_result(total, config, files):
    """The tree's root: fit_pooled of the total, with the errors and readable images."""
    groups, errors, readable = total
    paths = [files[index] for index in readable]
    return (*fit_pooled(groups, config, paths), sorted(errors), readable)


def remove_leftovers(out, token):
    """A batch's temporaries left in --out by workers stopped mid-write (killed, or a local
    cluster closed under them): swept once the batch's client and cluster are closed."""
    for path in Path(out).glob(f".is-{token}*.tmp"):
        _remove(path)


# --- The run ---------------------------------------------------------------------------------


def shared_model(files, config, report):
    """--shared: read every image once, pool the distinct values, fit one model.

    Returns the SharedModel (None when nothing could be read or fitted) and the files read.
    """
    groups, readable = {}, []
    for path in files:
        try:
            groups = merged_groups(groups, image_groups(path, config))
        except ImageError as error:
            report(path, str(error))
            continue
        readable.append(path)
    fitted, notes, failure = fit_pooled(groups, config, readable)
    return shared_of_fit(fitted, notes, failure, readable, report)


def image_groups(path, config):
    """One image's point groups (point_groups), as --shared pools them."""
    picture = masked(read_image(path, config.max_pixels), config)[0]
    return point_groups(distinct_values(picture, config.mode, config.segment.fit.passes))


def fit_pooled(groups, config, paths=()):
    """--shared's one fit of the batch's pooled groups: ((model, KSearch or None, mode) or
    None, the batch's notes, the fit's failure or None), run where the groups are.  With -k
    auto, "classes" looks at the labels of every image of paths, read again for each K."""
    pooled = pooled_points(groups)
    if pooled is None:
        return None, [], None
    notes = []
    if config.segment.quantized and gray_level_top(pooled) is None:
        notes.append(
            "note: --quantized ignored for this batch: its values are not gray levels of one "
            "bit depth"
        )
    k = config.components_for(pooled.mode)
    pictures = partial(_batch_pictures, paths, config, pooled.mode)
    shares_of = region_shares_of(pictures, config.segment.fit.passes)
    try:
        model, table = fit_points(pooled, k, config.segment, shares_of=shares_of)
    except FitFailed as error:
        return None, notes, str(error)
    if k != "auto" and model.n_labels < k:
        notes.append(f"note: the batch has {fewer_components_note(len(pooled.values), k)}")
    notes += [f"note: the batch: {note}" for note in k_search_notes(table)] if table else []
    return (model, table, pooled.mode), notes, None


def _batch_pictures(paths, config, mode):
    """(picture, points, their features) of each image of a batch that still reads, its
    points in mode."""
    for path in paths:
        try:
            picture = masked(read_image(path, config.max_pixels), config)[0]
        except ImageError:
            continue
        points = distinct_values(picture, mode, config.segment.fit.passes)
        yield picture, points, _PointFeatures(points.values, points.weights, points.scale)


def shared_of_fit(fitted, notes, failure, readable, report):
    """The SharedModel of fit_pooled's result and the files it covers, its notes reported."""
    for note in notes:
        report(None, note)
    if failure is not None:
        for path in readable:
            report(path, failure)
        return None, []
    if fitted is None:
        return None, readable
    model, table, mode = fitted
    return SharedModel(model, table, tuple(readable), mode), readable


@contextmanager
def _signals_as_interrupts():
    """SIGINT and SIGTERM raise Interrupted (a KeyboardInterrupt carrying the signal) in the main
    thread, so every clean-up path runs; yields the signals received, so that one raised where
    Python swallows exceptions (a finaliser) still ends the run as interrupted.  Handlers
    restored after."""
    received = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def interrupted(signum, frame):
        received.append(signum)
        raise Interrupted(signum)

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in saved:
        signal.signal(sig, interrupted)
    try:
        yield received
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def main(argv=None):
    """Run the command line; returns the exit status."""
    try:
        config = parse_command_line(argv)
    except UsageError as error:
        _write_line(sys.stderr, f"error: {error}")
        return 2
    with _signals_as_interrupts() as received:
        try:
            status = _run(config)
        except KeyboardInterrupt as interrupt:  # raised by the handler, or by Python's own
            if not received:
                received.append(
                    interrupt.signum if isinstance(interrupt, Interrupted) else signal.SIGINT
                )
        if not received:
            return status
        _write_line(sys.stderr, _stopped_line(received[0]))
        return 128 + received[0]


def check_combinations(config):
    """Options of the run that cannot work together: bad usage, before any work (those of
    SegmentOptions alone are its own check, OPTION_CLASHES, and with -k check_components)."""
    if config.dask is not None:
        for clash, why in (
            (config.jobs is not None, "--jobs: the cluster's workers do the work"),
            (config.show, "--show: the figures are the workers'"),
        ):
            if clash:
                raise UsageError(f"usage: --dask does not combine with {why}")
    if config.model is not None:
        for clash, why in (
            (config.shared, "--shared: the model is given"),
            (config.components is not None, "-k: the model has its components"),
        ):
            if clash:
                raise UsageError(f"usage: --model does not combine with {why}")
    if config.segment.bias_field and config.shared:
        raise UsageError(
            "usage: --bias-field does not combine with --shared: every image has its own field"
        )


def _one_thread_a_worker(config):
    """The configuration for worker processes, which share the cores already."""
    fit = replace(config.segment.fit, passes=replace(config.segment.fit.passes, threads=1))
    return replace(config, segment=replace(config.segment, fit=fit))


def _run(config):
    try:
        check_combinations(config)
        created = prepare_output_folder(config.out)
    except UsageError as error:
        _write_line(sys.stderr, f"error: {error}")
        return 2
    started = time.perf_counter()
    files, errors = collect_inputs(config.inputs)
    console = Console(len(files), sys.stderr.isatty() and not config.quiet)
    report = Report(console)
    for argument, message in errors:
        report(argument, message)
    for note in config.output_notes():
        console.say(f"note: {note}")
    inputs = {p.resolve() for p in files if p.exists()}  # never to be written over, readable or not
    client = cluster = None
    if config.dask is not None and files:
        try:
            client, cluster = dask_client(config.dask)
        except UsageError as error:
            _write_line(sys.stderr, f"error: {error}")
            return 2
    token = os.urandom(4).hex() + "-" if client is not None else ""
    try:
        return _run_batch(config, files, inputs, client, token, console, report, started)
    finally:
        if created:  # a run that wrote nothing leaves no empty folder behind
            with suppress(OSError):
                Path(config.out).rmdir()
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()  # its workers stopped: what they were writing is left now
        if token:
            remove_leftovers(config.out, token)


class Report:
    """Says an image's error (counting it) or a batch's note, on the console."""

    def __init__(self, console):
        self.console, self.failures = console, 0

    def __call__(self, path, message):
        if path is None:
            self.console.say(message)
            return
        self.failures += 1
        self.console.say(f"error: {shown(path)}: {message}")


def _run_batch(config, files, inputs, client, token, console, report, started):
    """The batch's images, one by one, in worker processes or on a Dask cluster."""
    jobs = 1 if config.show else (config.jobs or os.cpu_count() or 1)
    shared = None
    if config.shared and files:
        if client is not None:
            shared, files = shared_model_on_dask(files, config, client, report)
        else:
            shared, files = shared_model(files, config, report)
    if config.model is not None:
        shared, why = read_model(config.model)
        for path in files if why else ():
            report(path, f"model {shown(config.model)}: {why}")
        files = [] if why else files
    parallel = client is not None or (jobs > 1 and len(files) > 1)
    batch = Batch(
        _one_thread_a_worker(config) if parallel else config, frozenset(inputs), shared, token
    )
    tasks = [(path, stem, batch) for path, stem in zip(files, unique_stems(files))]
    if client is not None and tasks:
        outcomes = segment_on_dask(tasks, client)
    elif parallel:
        outcomes = segment_in_workers(tasks, min(jobs, len(tasks)))
    else:
        outcomes = (segment_file(*task, console=console) for task in tasks)
    done, written = 0, []
    try:
        for outcome in outcomes:
            for message in outcome.messages:
                console.say(message)
            if outcome.error is not None:
                report(outcome.path, outcome.error)
            else:
                done += 1
                written.append(outcome.path)
                if not config.quiet:
                    console.out(outcome.line)
            console.image_done()
    finally:  # at once, not when the generator is collected: the tasks not yet run are cancelled
        outcomes.close()
    console.finish()
    if not config.quiet:
        console.say(
            f"{done} image{'s' if done != 1 else ''} segmented, {report.failures} failed, in "
            f"{time.perf_counter() - started:.1f}s; "
            + (f"outputs in {shown(config.out)}" if done else "nothing written")
        )
    if config.show:
        show_figures(config.out, [stem for (path, stem, *_) in tasks if path in written], console)
    return 1 if report.failures or console.failed else 0


def show_figures(out, stems, console):
    """--show: open the saved figures in windows, or say why there are none (no display, say)."""
    import matplotlib
    import matplotlib.pyplot as plt

    if matplotlib.get_backend().lower() in ("agg", "pdf", "ps", "svg", "cairo", "template"):
        console.say(
            f"note: --show: matplotlib has no interactive backend here "
            f"({matplotlib.get_backend()}); "
            f"the figures are only saved"
        )
        return
    for stem in stems:
        for key in ("comparison", "loglik", "bic"):
            path = output_paths(out, stem)[key]
            if path.exists():
                figure = plt.figure(figsize=(10, 6))
                figure.figimage(np.asarray(Image.open(path)), resize=True)
                figure.canvas.manager.set_window_title(shown(path.name))
    plt.show()


if __name__ == "__main__":
    if any(arg == "--dask" or arg.startswith("--dask=") for arg in sys.argv[1:]):
        sys.exit(_cluster_module().main())  # the objects a cluster's workers unpickle are its
    sys.exit(main())

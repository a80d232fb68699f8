"""Volumes: NIfTI files and multi-page TIFFs segmented as one volume, with the spatial prior's
six neighbours across slices (weighted by the spacing), and outputs a volume user can open."""

import gzip
import json

import nibabel
import numpy as np
import pytest
from conftest import record_of, run, seg
from PIL import Image

MEANS = np.array([0.3, 0.55, 0.8])


def cubes(rng, shape=(24, 48, 48), sd=0.08, cell=6):
    """Cubes of three classes with noise: the volume (uint8) and its classes."""
    cells = rng.integers(0, 3, tuple(-(-n // cell) for n in shape))
    truth = np.kron(cells, np.ones((cell,) * 3, int))[: shape[0], : shape[1], : shape[2]]
    values = rng.normal(MEANS[truth], sd)
    return np.clip(np.rint(values * 255), 1, 255).astype(np.uint8), truth


def save_nifti(path, volume, zooms=(1.0, 1.0, 1.0), nifti2=False):
    """A NIfTI with an affine that is neither the identity nor axis-aligned in its origin."""
    affine = np.diag([*zooms, 1.0])
    affine[:3, 3] = (-90.0, -126.0, -72.0)
    kind = nibabel.Nifti2Image if nifti2 else nibabel.Nifti1Image
    image = kind(volume, affine)
    image.header.set_zooms(zooms)
    nibabel.save(image, path)
    return affine


def test_the_3d_prior_beats_slice_by_slice():
    """One model and the prior's neighbours across slices: far more right than the same prior
    slice by slice (each slice its own model and no neighbours above or below), and than no
    prior."""
    for seed in range(2):
        volume, truth = cubes(np.random.default_rng(seed), sd=0.12)
        plain = seg.segment_volume(volume, 3, covariance_type="tied")[0]
        whole = seg.segment_volume(volume, 3, spatial=0.5, covariance_type="tied")[0]
        slices = np.stack(
            [seg.segment_image(v, 3, spatial=0.5, covariance_type="tied")[0] for v in volume]
        )
        accuracy = [np.mean(labels == truth) for labels in (plain, slices, whole)]
        assert accuracy[2] > accuracy[1] + 0.05 and accuracy[2] > accuracy[0] + 0.1, accuracy


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 0.5)])
def test_a_sweep_of_a_volume_is_the_3d_mean_field_update(spacing):
    """A checkerboard sweep of the stacked volume sets every voxel to softmax(log p + BETA x
    the weighted sum of its six neighbours' q), the two colours in turn, exactly as computed
    here on the volume itself; and the objective's pair terms are the weighted pairs along
    every axis.  (An axis left out, or weighed wrongly, fails here.)"""
    rng = np.random.default_rng(0)
    shape, k, beta = (3, 4, 5), 3, 0.7
    stack = seg.Stack.of(shape, spacing)
    q = rng.dirichlet(np.ones(k), size=shape).transpose(3, 0, 1, 2).astype(np.float32)
    logp = rng.normal(size=(k, *shape)).astype(np.float32)
    weights = min(spacing) / np.array(spacing)
    assert stack.weights == pytest.approx(tuple(weights))
    padded = np.pad(stack.stacked(q), ((0, 0), (1, 1), (1, 1)))
    pairs = sum(
        w * np.sum(np.take(q, range(1, n), axis + 1) * np.take(q, range(n - 1), axis + 1))
        for axis, (w, n) in enumerate(zip(weights, shape))
    )
    entropy = -np.sum(q * np.log(q))
    prior = seg._prior_terms(padded, beta, seg.Passes(threads=1), stack)
    assert prior == pytest.approx(entropy + beta * pairs, rel=1e-6)
    table = stack.stacked(logp)
    inside = stack.stacked(np.ones(shape, bool), False)
    sweep = seg.Sweep(
        beta, lambda r, c: table[:, r, c].copy(), seg.Passes(threads=1), inside, grid=stack
    )
    seg._sweep(padded, sweep)
    expected = q.copy()
    z, r, c = np.meshgrid(*map(range, shape), indexing="ij")
    colour = ((1 + z) * stack.block + r + c) % 2  # the stacked image's checkerboard
    for turn in (1, 0):  # the sweep's first colour has odd (row + column) in the stack
        p = np.pad(expected, ((0, 0), (1, 1), (1, 1), (1, 1)))
        neighbours = sum(
            w * (np.roll(p, 1, axis + 1) + np.roll(p, -1, axis + 1))[:, 1:-1, 1:-1, 1:-1]
            for axis, w in enumerate(weights)
        )
        field = logp + beta * neighbours
        update = np.exp(field - field.max(axis=0))
        expected = np.where(colour == turn, update / update.sum(axis=0), expected)
    assert np.allclose(stack.volume_view(padded[:, 1:-1, 1:-1]), expected, atol=1e-6)


def test_a_coarser_axis_counts_less():
    """Neighbours along an axis declared coarser (--spacing) pull less: where the classes
    alternate every row, so that every neighbour along the rows disagrees, the labels get
    better as the rows' spacing grows."""
    rng = np.random.default_rng(0)
    truth = np.broadcast_to((np.arange(48) % 2)[None, :, None], (16, 48, 40))
    volume = np.clip(np.rint(rng.normal(np.array([0.35, 0.65])[truth], 0.12) * 255), 1, 255)
    volume = volume.astype(np.uint8)
    accuracy = [
        np.mean(
            seg.segment_volume(volume, 2, spacing=s, spatial=0.3, covariance_type="tied")[0]
            == truth
        )
        for s in ((1, 1, 1), (1, 2, 1), (1, 4, 1))
    ]
    assert accuracy[0] < accuracy[1] < accuracy[2], accuracy


def test_a_large_volume_goes_coarse_to_fine_and_threads_change_nothing():
    """Coarse to fine (the grid of every other voxel first), partial sweeps (some iterations
    sweep only the voxels near the last moves) and threads on a volume as on an image."""
    volume, truth = cubes(np.random.default_rng(3), shape=(40, 96, 80), cell=8)
    picture = seg.picture_from_volume(volume)
    points = seg.distinct_values(picture)
    fits = [
        seg.segment_points(
            picture,
            points,
            3,
            spatial=0.5,
            covariance_type="tied",
            passes=seg.Passes(threads=threads),
            spatial_settings=seg.SpatialSettings(coarsest_grid_pixels=40_000),
        )
        for threads in (1, 2)
    ]
    grids = fits[0].spatial.coarser_grids
    assert [(g.depth, g.height, g.width) for g in grids] == [(20, 48, 40)]
    assert fits[0].spatial.full_sweeps < fits[0].spatial.n_iter
    assert np.array_equal(fits[0].labels, fits[1].labels)
    assert fits[0].spatial.objective == fits[1].spatial.objective
    assert np.mean(fits[0].labels == truth) > 0.95


def test_nifti_in_and_out(tmp_path, capsys):
    """A NIfTI volume: one model, the 3-D prior with the header's spacing, and the label map,
    segmented volume and probabilities as gzipped NIfTI with the input's affine (so that they
    overlay it), the same bytes every run; the JSON has the shape, spacing and affine."""
    volume, truth = cubes(np.random.default_rng(1), shape=(12, 30, 36))
    affine = save_nifti(tmp_path / "scan.nii.gz", volume, zooms=(1.0, 1.0, 2.0))
    command = [tmp_path / "scan.nii.gz", "-k", "3", "--spatial", "0.5", "--probabilities"]
    command += ["--covariance", "tied"]
    status, out, err = run([*command, "--out", tmp_path / "a"], capsys, figures=True)
    assert status == 0, err
    assert out.startswith(f"{tmp_path / 'scan.nii.gz'}: 12x30x36 gray K=3")
    labels = nibabel.load(tmp_path / "a" / "scan_labels.nii.gz")
    assert labels.shape == (12, 30, 36) and np.allclose(labels.affine, affine)
    assert labels.get_data_dtype() == np.uint8
    assert np.mean(np.asarray(labels.dataobj) == truth) > 0.95
    segmented = np.asarray(nibabel.load(tmp_path / "a" / "scan_segmented.nii.gz").dataobj)
    means = np.rint(np.array(record_of(tmp_path / "a", "scan")["means"])[:, 0] * 255)
    assert set(np.unique(segmented)) == set(means.astype(int))
    maps = [
        np.asarray(nibabel.load(tmp_path / "a" / f"scan_prob_{k}.nii.gz").dataobj) for k in range(3)
    ]
    assert all(m.dtype == np.uint16 for m in maps)
    assert np.all(np.abs(np.sum(maps, axis=0, dtype=np.int64) - 65535) <= 3)
    record = record_of(tmp_path / "a", "scan")
    assert record["shape"] == [12, 30, 36] and record["spacing"] == [1.0, 1.0, 2.0]
    assert np.allclose(record["affine"], affine) and record["spatial"]["beta"] == 0.5
    for name in ("scan_comparison.png", "scan_loglik.png"):
        assert (tmp_path / "a" / name).exists()
    status, _, err = run([*command, "--out", tmp_path / "b"], capsys, figures=True)
    for name in ("scan_labels.nii.gz", "scan_segmented.nii.gz", "scan_prob_1.nii.gz"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_nifti_kinds_and_masks(tmp_path, capsys):
    """NIfTI-2, signed 16-bit and float volumes (scaled by their range), a mask volume
    (--mask PATH) and --mask auto on a volume whose faces are 0."""
    volume, truth = cubes(np.random.default_rng(2), shape=(10, 20, 24))
    save_nifti(tmp_path / "two.nii", volume, nifti2=True)
    save_nifti(tmp_path / "signed.nii.gz", (volume.astype(np.int16) - 100) * 7)
    save_nifti(tmp_path / "float.nii.gz", volume.astype(np.float32) / 3.0)
    status, out, err = run(
        [tmp_path / "two.nii", tmp_path / "signed.nii.gz", tmp_path / "float.nii.gz", "-k", "3"]
        + ["--covariance", "tied", "--out", tmp_path / "o"],
        capsys,
    )
    assert status == 0, err
    for stem in ("two", "signed", "float"):
        labels = np.asarray(nibabel.load(tmp_path / "o" / f"{stem}_labels.nii.gz").dataobj)
        assert np.mean(labels == truth) > 0.9, stem
    assert isinstance(nibabel.load(tmp_path / "o" / "two_labels.nii.gz"), nibabel.Nifti2Image)
    inside = np.zeros(volume.shape, np.uint8)
    inside[2:8, 4:16, 4:20] = 1
    save_nifti(tmp_path / "mask.nii.gz", inside)
    status, _, err = run(
        [
            tmp_path / "two.nii",
            "-k",
            "3",
            "--mask",
            tmp_path / "mask.nii.gz",
            "--out",
            tmp_path / "m",
        ],
        capsys,
    )
    assert status == 0, err
    labels = np.asarray(nibabel.load(tmp_path / "m" / "two_labels.nii.gz").dataobj)
    assert np.all(labels[inside == 0] == 0) and np.all(labels[inside == 1] > 0)
    framed = np.where(inside == 1, volume, 0).astype(np.uint8)
    save_nifti(tmp_path / "framed.nii.gz", framed)
    status, _, err = run([tmp_path / "framed.nii.gz", "-k", "3", "--out", tmp_path / "f"], capsys)
    assert status == 0 and "the border is entirely 0" in err
    assert record_of(tmp_path / "f", "framed")["inside_pixels"] == int(inside.sum())


def test_tiff_stacks_in_and_out(tmp_path, capsys):
    """A multi-page 16-bit TIFF is a volume (spacing 1,1,1 unless --spacing says otherwise):
    its label map and segmented volume are multi-page TIFFs of as many pages."""
    volume, truth = cubes(np.random.default_rng(4), shape=(8, 24, 30))
    deep = volume.astype(np.uint16) * 257
    pages = [Image.fromarray(page) for page in deep]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    status, out, err = run(
        [tmp_path / "stack.tif", "-k", "3", "--spacing", "2,1,1", "--spatial", "0.5"]
        + ["--covariance", "tied"]
        + ["--out", tmp_path / "o"],
        capsys,
    )
    assert status == 0, err
    with Image.open(tmp_path / "o" / "stack_labels.tif") as labels:
        assert labels.n_frames == 8
        found = []
        for page in range(8):
            labels.seek(page)
            found.append(np.asarray(labels))
    assert np.mean(np.stack(found) == truth) > 0.95
    with Image.open(tmp_path / "o" / "stack_segmented.tif") as segmented:
        assert segmented.n_frames == 8 and segmented.mode == "I;16"
    record = record_of(tmp_path / "o", "stack")
    assert record["spacing"] == [2.0, 1.0, 1.0] and record["settings"]["spacing"] == [2, 1, 1]
    assert record["affine"] is None


def test_bad_volumes_are_one_line_errors(tmp_path, capsys):
    """A 4-D NIfTI (a time series), a truncated .nii.gz and a volume above --max-pixels (which
    counts voxels) each fail in one line; the rest go on."""
    volume, _ = cubes(np.random.default_rng(5), shape=(6, 10, 12))
    save_nifti(tmp_path / "good.nii.gz", volume)
    nibabel.save(
        nibabel.Nifti1Image(np.stack([volume, volume], axis=3), np.eye(4)),
        tmp_path / "series.nii.gz",
    )
    data = (tmp_path / "good.nii.gz").read_bytes()
    (tmp_path / "short.nii.gz").write_bytes(data[: len(data) // 2])
    (tmp_path / "notgz.nii.gz").write_bytes(gzip.compress(b"not a NIfTI header"))
    inputs = ["good.nii.gz", "series.nii.gz", "short.nii.gz", "notgz.nii.gz"]
    status, out, err = run(
        [*(tmp_path / n for n in inputs), "-k", "2", "--out", tmp_path / "o"], capsys
    )
    assert status == 1
    lines = err.strip().splitlines()
    assert len(lines) == 4 and "Traceback" not in err  # three errors and the summary
    assert f"error: {tmp_path / 'series.nii.gz'}: a 4-D NIfTI (6x10x12x2)" in err
    assert f"error: {tmp_path / 'short.nii.gz'}: truncated or corrupt NIfTI" in err
    assert f"error: {tmp_path / 'notgz.nii.gz'}: truncated or corrupt NIfTI" in err
    assert (tmp_path / "o" / "good_labels.nii.gz").exists()
    status, _, err = run(
        [tmp_path / "good.nii.gz", "--max-pixels", "719", "--out", tmp_path / "p"], capsys
    )
    assert status == 1 and "6x10x12 is 720 voxels, above the limit of 719" in err


def test_nifti_without_nibabel_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    volume, _ = cubes(np.random.default_rng(6), shape=(4, 8, 8))
    save_nifti(tmp_path / "scan.nii.gz", volume)
    import importlib

    real = importlib.import_module

    def without_nibabel(name, *args):
        if name == "nibabel":
            raise ImportError("no nibabel here")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", without_nibabel)
    status, out, err = run([tmp_path / "scan.nii.gz", "--out", tmp_path / "o"], capsys)
    assert status == 1
    assert (
        f"error: {tmp_path / 'scan.nii.gz'}: reading NIfTI needs nibabel: pip install nibabel"
        in err
    )


def test_segment_volume_api():
    volume, truth = cubes(np.random.default_rng(7), shape=(10, 16, 20))
    labels, recoloured, model = seg.segment_volume(
        volume, 3, spacing=(2, 1, 1), spatial=0.5, covariance_type="tied"
    )
    assert labels.shape == volume.shape == recoloured.shape and labels.dtype == np.uint8
    assert np.mean(labels == truth) > 0.95 and np.allclose(model.means[:, 0], MEANS, atol=0.02)
    with pytest.raises(ValueError, match="D x H x W"):
        seg.segment_volume(volume[0], 3)
    with pytest.raises(ValueError, match="spacing"):
        seg.segment_volume(volume, 3, spacing=(1, 0, 1))


def smooth_field_3d(shape, amplitude=0.2):
    """exp of a fixed quadratic in the three scaled coordinates, +-amplitude about 1."""
    u, v, w = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    log_field = 0.5 * u - 0.3 * v + 0.4 * w + 0.3 * u * w - 0.2 * v * v
    log_field *= np.log1p(amplitude) / np.abs(log_field).max()
    return np.exp(log_field)


@pytest.mark.parametrize("spatial", [0.0, 0.5])
def test_a_3d_field_is_removed(spatial):
    """A smooth +-35 % field over the three axes: --bias-field finds it (the log fields
    correlate to 0.99; with the prior, whose field is fitted on the coarser grid, here of 4,320
    voxels, and held on every voxel (BiasMeanField.held), to 0.98) and the labels are right
    where the mixture without a field's are not."""
    rng = np.random.default_rng(8)
    _, truth = cubes(rng, shape=(24, 40, 36), cell=6)
    field = smooth_field_3d(truth.shape, 0.35)
    values = MEANS[truth] * field + rng.normal(0, 0.03, truth.shape)
    volume = np.clip(np.rint(values * 255), 1, 255).astype(np.uint8)
    picture = seg.picture_from_volume(volume, spacing=(1.0, 1.0, 1.0))
    points = seg.distinct_values(picture)
    settings = seg.SpatialSettings(coarsest_grid_pixels=4_000)
    options = dict(covariance_type="tied", spatial=spatial, spatial_settings=settings)
    fitted = seg.segment_points(picture, points, 3, bias_field=True, **options)
    plain = seg.segment_points(picture, points, 3, **options)
    found = fitted.bias.image()
    assert found.shape == truth.shape
    correlation = np.corrcoef(np.log(found).ravel(), np.log(field).ravel())[0, 1]
    assert correlation > (0.98 if spatial else 0.99)
    assert np.mean(fitted.labels == truth) > max(0.99, np.mean(plain.labels == truth) + 0.01)
    if spatial:
        assert len(fitted.spatial.coarser_grids) >= 1
        assert np.all(np.diff(fitted.spatial.objective) >= -1e-9)


def test_the_3d_field_prior_is_the_mean_squared_slope():
    """c^T R c of a volume's field: the mean over the cube of |grad t|^2, by quadrature."""
    rng = np.random.default_rng(9)
    degree = 3
    exponents = seg.bias_monomials(degree, 3)
    c = rng.normal(size=len(exponents))
    grid = np.linspace(-1, 1, 61)
    u, v, w = np.meshgrid(grid, grid, grid, indexing="ij")

    def t(u, v, w):
        return sum(ci * u**a * v**b * w**k for ci, (a, b, k) in zip(c, exponents))

    h = 1e-5
    slopes = [
        (t(u + h, v, w) - t(u - h, v, w)) / (2 * h),
        (t(u, v + h, w) - t(u, v - h, w)) / (2 * h),
        (t(u, v, w + h) - t(u, v, w - h)) / (2 * h),
    ]
    weights = np.ones(61)
    weights[[0, -1]] = 0.5  # the trapezoid rule, each axis
    weights3 = np.einsum("i,j,k->ijk", weights, weights, weights)
    mean = np.sum(weights3 * sum(s**2 for s in slopes)) / np.sum(weights3)
    assert c @ seg.field_roughness(degree, 3) @ c == pytest.approx(mean, rel=2e-3)


def test_brain_on_a_nifti_volume(tmp_path, capsys):
    """--brain on a volume: the mask, three tissues, partial volume, the 3-D prior and field;
    the field and the corrected volume as NIfTI with the input's affine, the field's box and
    basis in the JSON."""
    rng = np.random.default_rng(10)
    _, truth = cubes(rng, shape=(20, 36, 32), cell=6)
    inside = np.zeros(truth.shape, bool)
    inside[2:18, 3:33, 3:29] = True
    values = MEANS[truth] * smooth_field_3d(truth.shape) + rng.normal(0, 0.03, truth.shape)
    volume = np.where(inside, np.clip(np.rint(values * 255), 1, 255), 0).astype(np.uint8)
    affine = save_nifti(tmp_path / "head.nii.gz", volume, zooms=(1.0, 1.2, 1.2))
    status, out, err = run([tmp_path / "head.nii.gz", "--brain", "--out", tmp_path / "o"], capsys)
    assert status == 0, err
    labels = np.asarray(nibabel.load(tmp_path / "o" / "head_labels.nii.gz").dataobj)
    assert np.all(labels[~inside] == 0) and np.mean(labels[inside] == truth[inside] + 1) > 0.97
    for name in ("bias", "corrected"):
        image = nibabel.load(tmp_path / "o" / f"head_{name}.nii.gz")
        assert image.shape == volume.shape and np.allclose(image.affine, affine)
    record = record_of(tmp_path / "o", "head")
    assert record["bias_field"]["box"] == [[2, 18], [3, 33], [3, 29]]
    assert len(record["bias_field"]["coefficients"]) == len(seg.bias_monomials(3, 3)) == 19
    assert "u^a v^b w^c" in record["bias_field"]["basis"] and record["k"] == 3
    # an axial slab (the file's last axis cut): brain in its end slices, black around each
    slab = tmp_path / "slab.nii.gz"
    save_nifti(slab, volume[:, :, 3:29])
    status, out, err = run([slab, "--brain", "--out", tmp_path / "o"], capsys)
    assert status == 0 and "--brain is made for" not in err, err


def test_the_other_options_take_volumes_too(tmp_path, capsys):
    """--shared (the volumes' counts pooled), -k auto, --quantized and --probabilities on two
    TIFF stacks: K = 3 found (cubes of 6 voxels under noise fill no regions that the classes
    criterion recognises, so it judges by collapse alone, and says so), the label maps and
    probability maps multi-page TIFFs."""
    for seed in (11, 12):
        volume, _ = cubes(np.random.default_rng(seed), shape=(8, 24, 24))
        pages = [Image.fromarray(page) for page in volume]
        pages[0].save(tmp_path / f"v{seed}.tif", save_all=True, append_images=pages[1:])
    status, out, err = run(
        [tmp_path / "v11.tif", tmp_path / "v12.tif", "--shared", "-k", "auto", "--k-max", "4"]
        + ["--quantized", "--probabilities", "--out", tmp_path / "o"],
        capsys,
    )
    assert status == 0, err
    for stem in ("v11", "v12"):
        record = record_of(tmp_path / "o", stem)
        assert record["k"] == 3 and record["shared"] and record["quantized"]
        assert [row["k"] for row in record["bic"]] == [1, 2, 3, 4]
        assert record["k_auto"]["regions"] is False
        for name in ("labels", "prob_0", "prob_2"):
            with Image.open(tmp_path / "o" / f"{stem}_{name}.tif") as stack:
                assert stack.n_frames == 8 and stack.size == (24, 24)
    assert "no fit's classes filled regions of the image" in err


def _patched_nifti(path, source, **changes):
    """A copy of the NIfTI-1 file source with header fields changed as a broken writer would
    (srow_x=(0, nan): one element of a field), the data as they were."""
    raw = source.read_bytes()
    header = nibabel.Nifti1Header(raw[:348])
    for name, change in changes.items():
        if isinstance(change, tuple):
            values = header[name].copy()
            values[change[0]] = change[1]
            change = values
        header[name] = change
    path.write_bytes(header.binaryblock + raw[348:])
    return path


def test_broken_nifti_headers_are_noted_and_replaced(tmp_path, capsys):
    """Headers no scanner should write but files carry: an affine with NaN or infinity, an
    infinite or zero voxel size, a wrong sizeof_hdr.  Each volume is segmented (outputs, a
    JSON with finite numbers only) with a `note:` that says what was replaced; nibabel's own
    messages never reach stderr bare."""
    volume, _ = cubes(np.random.default_rng(8), shape=(6, 10, 12))
    good = tmp_path / "good.nii"
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), good)
    cases = {
        "nan_affine": (dict(sform_code=1, qform_code=0, srow_x=(0, np.nan)), "affine is not"),
        "inf_affine": (dict(sform_code=1, qform_code=0, srow_y=(1, np.inf)), "affine is not"),
        "inf_voxel": (dict(pixdim=(1, np.inf)), "voxel size inf x 1 x 1 is not three finite"),
        "zero_voxel": (dict(pixdim=(2, 0.0)), "the NIfTI header: pixdim[1,2,3] should be"),
        "sizeof_hdr": (dict(sizeof_hdr=340), "the NIfTI header: sizeof_hdr should be 348"),
    }
    for name, (changes, words) in cases.items():
        path = _patched_nifti(tmp_path / f"{name}.nii", good, **changes)
        status, out, err = run([path, "--spatial", "0.5", "--out", tmp_path / "o"], capsys)
        lines = err.strip().splitlines()
        assert status == 0 and f"note: {path}: " in err and words in err, (name, err)
        assert all(line.startswith(("note: ", "1 image ")) for line in lines), (name, err)
        record = json.loads((tmp_path / "o" / f"{name}_model.json").read_text())
        affine = np.array(record["affine"])
        assert np.isfinite(affine).all() and abs(np.linalg.det(affine[:3, :3])) > 0, name
        assert np.all(np.isfinite(record["spacing"])), name
        labels = nibabel.load(tmp_path / "o" / f"{name}_labels.nii.gz")
        assert np.isfinite(labels.affine).all() and labels.shape == (6, 10, 12), name


def test_volume_values_at_float64s_limits_are_segmented(tmp_path, capsys):
    """Voxels of +-1.7e308: their range overflows float64, so it is scaled from halves; the two
    classes are found, without a warning."""
    rng = np.random.default_rng(9)
    classes = rng.integers(0, 2, (6, 10, 12))
    values = np.where(classes == 1, 1.7e308, -1.7e308) * rng.uniform(0.9, 1.0, classes.shape)
    nibabel.save(nibabel.Nifti1Image(values, np.eye(4)), tmp_path / "huge.nii")
    status, out, err = run([tmp_path / "huge.nii", "-k", "2", "--out", tmp_path / "o"], capsys)
    assert status == 0 and "warning" not in err and "error" not in err, err
    labels = np.asarray(nibabel.load(tmp_path / "o" / "huge_labels.nii.gz").dataobj)
    assert np.array_equal(labels, classes) or np.array_equal(labels, 1 - classes)


def test_spacing_that_is_not_a_voxel_size_is_refused(tmp_path, capsys):
    """--spacing must be finite, positive and within MAX_SPACING_RATIO of itself: 1e-300 and
    1e300 (each finite) once made an aspect ratio of infinity in the volume figure."""
    for text in ("1e-300,1,1e300", "1,1,0", "inf", "1,2"):
        with pytest.raises(SystemExit) as exit_info:
            seg.main(["x.nii", "--spacing", text, "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, text
        assert err.startswith("error: usage: argument --spacing: "), (text, err)
    with pytest.raises(ValueError, match="has a side over 1000 times another"):
        seg.picture_from_volume(np.zeros((2, 3, 4), np.uint8), spacing=(1, 1, 1e4))


def test_a_masks_shape_is_said_and_matched_in_the_files_axis_order(tmp_path, capsys):
    """A NIfTI mask of the wrong shape is named in its file's axis order (8x10x13, not
    13x10x8); a TIFF-stack mask made from the same array as the NIfTI volume fits it, voxel for
    voxel: outside the mask is label 0 in the NIfTI labels."""
    volume, _ = cubes(np.random.default_rng(10), shape=(8, 10, 12))
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "scan.nii")
    nibabel.save(nibabel.Nifti1Image(np.ones((8, 10, 13), np.uint8), np.eye(4)), tmp_path / "m.nii")
    status, _, err = run(
        [tmp_path / "scan.nii", "--mask", tmp_path / "m.nii", "--out", tmp_path / "o"], capsys
    )
    assert status == 1 and "the mask is 8x10x13 voxels, the volume 8x10x12" in err, err
    inside = np.zeros((8, 10, 12), bool)
    inside[2:7, 1:9, 3:] = True
    pages = [Image.fromarray(page.astype(np.uint8) * 255) for page in inside]
    pages[0].save(tmp_path / "mask.tif", save_all=True, append_images=pages[1:])
    status, _, err = run(
        [tmp_path / "scan.nii", "--mask", tmp_path / "mask.tif", "--out", tmp_path / "o"], capsys
    )
    assert status == 0, err
    labels = np.asarray(nibabel.load(tmp_path / "o" / "scan_labels.nii.gz").dataobj)
    assert np.array_equal(labels > 0, inside)


@pytest.mark.parametrize(
    "sizes, modes, segmented",
    [
        ([(12, 10), (6, 5)], ["L", "L"], 1),  # a thumbnail after the image
        ([(24, 20), (12, 10), (6, 5)], ["L", "L", "L"], 1),  # a pyramid
        ([(6, 5), (24, 20)], ["L", "L"], 2),  # a scanner's preview before the scan
        ([(12, 10), (12, 10)], ["L", "RGB"], 1),  # pages of one size, another mode
    ],
)
def test_a_tiff_of_mixed_pages_is_its_largest_page(tmp_path, capsys, sizes, modes, segmented):
    """Pages that differ in size or mode make no volume: the largest page (the first of the
    largest) is segmented as an image, with a note naming it."""
    rng = np.random.default_rng(11)
    pages = [
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).convert(mode)
        for (w, h), mode in zip(sizes, modes)
    ]
    pages[0].save(tmp_path / "mixed.tif", save_all=True, append_images=pages[1:])
    status, out, err = run([tmp_path / "mixed.tif", "--out", tmp_path / "o"], capsys)
    w, h = sizes[segmented - 1]
    assert status == 0 and f"segmenting page {segmented} ({w}x{h} {modes[segmented - 1]})" in err
    assert Image.open(tmp_path / "o" / "mixed_labels.png").size == (w, h)


def test_a_tiff_stack_cut_short_is_a_corrupt_image(tmp_path, capsys):
    volume, _ = cubes(np.random.default_rng(12), shape=(8, 10, 12))
    pages = [Image.fromarray(page) for page in volume]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    data = (tmp_path / "stack.tif").read_bytes()
    (tmp_path / "cut.tif").write_bytes(data[: len(data) // 2])
    status, out, err = run([tmp_path / "cut.tif", "--out", tmp_path / "o"], capsys)
    assert status == 1 and f"error: {tmp_path / 'cut.tif'}: truncated or corrupt image" in err
    assert "internal error" not in err and not list((tmp_path / "o").glob("cut*"))

"""Synthetic 3D "abdominal" phantom dataset in nnU-Net v2 raw format.

The phantom is a body (large ellipsoid with a subcutaneous fat rim and an
unlabelled bright "vertebra" column) containing four labelled organs at fixed
positions of a template, expressed in normalized coordinates (each array axis
mapped to [-1, 1]):

* ``liver``   - large ellipsoid on one side, mottled texture,
* ``spleen``  - small ellipsoid on the other side, intensity similar to the
  liver (liver vs. spleen must be told apart by position / shape / texture),
* ``aorta``   - bright, slightly curved tube along the first (z) axis, close to
  the unlabelled vertebra which has a similar brightness,
* ``stomach`` - ellipsoidal shell (only the wall is labelled; its lumen has a
  different intensity and is background).

Every subject is the template warped by a random global affine (rotation up to
10 degrees about a random axis, scaling 0.9-1.1, translation up to 5% of the
extent) and a smooth low-frequency displacement field, with per-organ radius
(about 15%) and position jitter. Appearance varies per subject and channel:
tissue contrasts are jittered, a mild partial-volume blur, a smooth
multiplicative bias field, Gaussian noise and a global gain / offset are
applied. Hence crops at corresponding normalized positions show the same
anatomy across subjects (the spatial prior exploited by the pretraining) while
no two subjects are identical.

Conventions: ``shape`` and ``spacing`` are given in array (z, y, x) order, the
same order nnU-Net uses internally; files are written with SimpleITK (whose
spacing is in x, y, z order, handled here).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Dict, Sequence, Tuple, Union

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

__all__ = ["PHANTOM_LABELS", "generate_case", "make_phantom_dataset"]

#: nnU-Net label dict (name -> value), background included. Organs are 1..4.
PHANTOM_LABELS: Dict[str, int] = {
    "background": 0,
    "liver": 1,
    "spleen": 2,
    "aorta": 3,
    "stomach": 4,
}

# Overlapping organs: later entries win (fixed priority).
_LABEL_PRIORITY = ("liver", "spleen", "stomach", "aorta")

# Tissue classes used to render intensities (index into the tables below).
_T_AIR, _T_BODY, _T_FAT, _T_VERTEBRA, _T_LIVER, _T_SPLEEN, _T_LUMEN, _T_WALL, _T_AORTA = range(9)
# Mean intensity of each tissue for the two base contrasts ("T1-like" and an
# inverted-ish "T2-like" mapping). Liver and spleen are deliberately close.
_CONTRAST_TABLES = np.array([
    # air  body  fat   vert  liver spleen lumen wall  aorta
    [0.00, 0.35, 0.72, 0.86, 0.60, 0.57, 0.15, 0.78, 0.93],
    [0.00, 0.55, 0.78, 0.18, 0.32, 0.40, 0.90, 0.42, 0.22],
], dtype=np.float64)
# Texture (medium-frequency random field) amplitude per tissue.
_TEXTURE_AMPLITUDE = np.array([0.0, 0.03, 0.03, 0.05, 0.07, 0.015, 0.02, 0.03, 0.01])

# Template anatomy in normalized (z, y, x) coordinates.
_BODY_RADII = (0.80, 0.74, 0.86)
_FAT_RIM = 0.88  # normalized body radius beyond which tissue is fat
_ELLIPSOIDS = {  # name: (center, radii)
    "liver": ((0.15, -0.05, -0.40), (0.50, 0.52, 0.42)),
    "spleen": ((0.30, 0.12, 0.50), (0.32, 0.29, 0.24)),
    "stomach": ((-0.40, -0.25, 0.22), (0.33, 0.30, 0.35)),
}
_STOMACH_LUMEN = 0.62  # inner normalized radius of the stomach wall
_AORTA_TPL = dict(y=0.27, x=0.08, radius=0.16, curve=0.05, z_center=0.05, z_half=0.65)
_VERTEBRA_TPL = dict(y=0.53, x=0.0, radii=(0.13, 0.11), z_half=0.85)

_MAX_ATTEMPTS = 100
_MIN_SHAPE = 16

ShapeLike = Sequence[int]


def _check_geometry(shape, spacing) -> Tuple[Tuple[int, int, int], Tuple[float, float, float]]:
    try:
        shape_t = tuple(int(s) for s in shape)
        shape_ok = all(float(s) == int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a sequence of 3 integers (z, y, x), got {shape!r}") from None
    if len(shape_t) != 3 or not shape_ok:
        raise ValueError(f"shape must be a sequence of 3 integers (z, y, x), got {shape!r}")
    if min(shape_t) < _MIN_SHAPE:
        raise ValueError(f"every shape entry must be >= {_MIN_SHAPE} voxels, got shape={shape_t}")
    try:
        spacing_t = tuple(float(s) for s in spacing)
    except (TypeError, ValueError):
        raise ValueError(f"spacing must be a sequence of 3 positive numbers (z, y, x), got {spacing!r}") from None
    if len(spacing_t) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing_t):
        raise ValueError(f"spacing must be a sequence of 3 positive numbers (z, y, x), got {spacing!r}")
    return shape_t, spacing_t


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _axis_coords(n: int) -> np.ndarray:
    """Normalized voxel-center coordinates of one axis, in (-1, 1)."""
    return (np.arange(n, dtype=np.float64) + 0.5) / n * 2.0 - 1.0


def _smooth_fields(rng: np.random.Generator, shape, n_ctrl: int, count: int) -> np.ndarray:
    """``count`` smooth random fields (zero mean, unit std) of the given shape.

    A random ``n_ctrl**3`` control grid is interpolated with separable Gaussian
    kernels, so the spatial frequency is set by ``n_ctrl``.
    """
    centers = np.linspace(-1.0, 1.0, n_ctrl)
    width = 2.0 / (n_ctrl - 1)
    weights = []
    for n in shape:
        w = np.exp(-0.5 * ((_axis_coords(n)[:, None] - centers[None, :]) / width) ** 2)
        weights.append(w / w.sum(axis=1, keepdims=True))
    grid = rng.standard_normal((count, n_ctrl, n_ctrl, n_ctrl))
    f = np.einsum("fijk,ai->fajk", grid, weights[0], optimize=True)
    f = np.einsum("fajk,bj->fabk", f, weights[1], optimize=True)
    f = np.einsum("fabk,ck->fabc", f, weights[2], optimize=True)
    f -= f.mean(axis=(1, 2, 3), keepdims=True)
    f /= f.std(axis=(1, 2, 3), keepdims=True) + 1e-12
    return f


def _rotation_matrix(rng: np.random.Generator, max_deg: float) -> np.ndarray:
    axis = rng.standard_normal(3)
    axis /= np.linalg.norm(axis)
    angle = np.deg2rad(rng.uniform(-max_deg, max_deg))
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * (k @ k)


def _bias_field(rng: np.random.Generator, p: np.ndarray, strength: float = 0.12) -> np.ndarray:
    """Smooth multiplicative bias: exp of a random 2nd-order polynomial."""
    z, y, x = p
    terms = (z, y, x, z * z - 1 / 3, y * y - 1 / 3, x * x - 1 / 3, z * y, z * x, y * x)
    coef = rng.normal(0.0, strength, size=len(terms))
    coef[3:] *= 0.6
    log_bias = sum(c * t for c, t in zip(coef, terms))
    return np.exp(log_bias)


def _ellipsoid_radius(q: np.ndarray, center, radii) -> np.ndarray:
    return np.sqrt(sum(((q[a] - center[a]) / radii[a]) ** 2 for a in range(3)))


def _sample_once(rng: np.random.Generator, shape, spacing, num_channels: int):
    shape_arr = np.asarray(shape, dtype=np.float64)
    extent = shape_arr * np.asarray(spacing, dtype=np.float64)
    aspect = extent / extent.max()  # so that the rotation is rigid in physical space
    grids = np.meshgrid(*[_axis_coords(n) for n in shape], indexing="ij", sparse=True)
    p = np.stack(np.broadcast_arrays(*grids)).reshape(3, -1)  # subject coords (3, N)

    # --- global affine: p = A q + t (with A = diag(1/aspect) R S diag(aspect)) --
    rot = _rotation_matrix(rng, 10.0)
    scale = rng.uniform(0.92, 1.08) * rng.uniform(0.97, 1.03, size=3)
    trans = rng.uniform(-0.1, 0.1, size=3)  # 5% of the extent (which is 2)
    inv = np.diag(1.0 / aspect) @ np.diag(1.0 / scale) @ rot.T @ np.diag(aspect)
    q = inv @ (p - trans[:, None])
    # --- smooth low-frequency deformation (normalized units, ~0.035 std) --------
    disp = _smooth_fields(rng, shape, 4, 3).reshape(3, -1)
    q += 0.035 * disp
    q = q.reshape((3,) + tuple(shape))

    def jitter_ellipsoid(center, radii, pos_sd=0.02, rad_rel=0.15):
        c = np.asarray(center) + rng.normal(0.0, pos_sd, size=3)
        r = np.asarray(radii) * rng.uniform(1 - rad_rel, 1 + rad_rel, size=3)
        return c, r

    tissue = np.zeros(tuple(shape), dtype=np.uint8)
    label = np.zeros(tuple(shape), dtype=np.uint8)

    # body + fat rim
    bc, br = jitter_ellipsoid((0.0, 0.0, 0.0), _BODY_RADII, pos_sd=0.01, rad_rel=0.05)
    rho_body = _ellipsoid_radius(q, bc, br)
    body = rho_body <= 1.0
    tissue[body] = _T_BODY
    tissue[body & (rho_body > _FAT_RIM * rng.uniform(0.97, 1.03))] = _T_FAT

    # vertebra (unlabelled, bright like the aorta in channel 0)
    vr = np.asarray(_VERTEBRA_TPL["radii"]) * rng.uniform(0.9, 1.1, size=2)
    vy = _VERTEBRA_TPL["y"] + rng.normal(0, 0.015)
    vx = _VERTEBRA_TPL["x"] + rng.normal(0, 0.015)
    vert = ((((q[1] - vy) / vr[0]) ** 2 + ((q[2] - vx) / vr[1]) ** 2 <= 1.0)
            & (np.abs(q[0]) <= _VERTEBRA_TPL["z_half"]))
    tissue[vert & body] = _T_VERTEBRA

    masks = {}
    for organ in ("liver", "spleen", "stomach"):
        c, r = jitter_ellipsoid(*_ELLIPSOIDS[organ])
        rho = _ellipsoid_radius(q, c, r)
        if organ == "stomach":
            inner = _STOMACH_LUMEN * rng.uniform(0.93, 1.07)
            lumen = (rho < inner) & body
            masks[organ] = (rho <= 1.0) & (rho >= inner) & body
        else:
            masks[organ] = (rho <= 1.0) & body

    # aorta: slightly curved tube along z
    ar = _AORTA_TPL["radius"] * rng.uniform(0.85, 1.15)
    ay = _AORTA_TPL["y"] + rng.normal(0, 0.015)
    ax = _AORTA_TPL["x"] + rng.normal(0, 0.015) + _AORTA_TPL["curve"] * np.sin(1.8 * q[0] + 0.5)
    az = _AORTA_TPL["z_center"] + rng.normal(0, 0.03)
    zh = _AORTA_TPL["z_half"] * rng.uniform(0.9, 1.1)
    masks["aorta"] = (((q[1] - ay) ** 2 + (q[2] - ax) ** 2) <= ar ** 2) & (np.abs(q[0] - az) <= zh) & body

    tissue_of = {"liver": _T_LIVER, "spleen": _T_SPLEEN, "stomach": _T_WALL, "aorta": _T_AORTA}
    tissue[lumen] = _T_LUMEN
    for organ in _LABEL_PRIORITY:
        m = masks[organ]
        tissue[m] = tissue_of[organ]
        label[m] = PHANTOM_LABELS[organ]

    # --- appearance ---------------------------------------------------------
    # fine-grained anatomical texture (correlated over ~2 voxels, shared by all channels)
    rel_spacing = min(spacing) / np.asarray(spacing)
    texture = gaussian_filter(rng.standard_normal(tuple(shape)), sigma=1.0 * rel_spacing, mode="wrap")
    texture /= texture.std() + 1e-12
    texture_amp = _TEXTURE_AMPLITUDE * rng.uniform(0.7, 1.3)
    tex = texture_amp[tissue] * texture
    blur_sigma = 0.5 * rel_spacing  # partial volume: ~0.5 voxel on the finest axis
    p_img = p.reshape((3,) + tuple(shape))
    image = np.empty((num_channels,) + tuple(shape), dtype=np.float32)
    for ch in range(num_channels):
        table = _CONTRAST_TABLES[ch % 2].copy()
        if ch >= 2:  # further channels: own perturbation of the base contrast
            table[1:] += np.random.default_rng(ch).normal(0.0, 0.06, size=len(table) - 1)
        table[1:] += rng.normal(0.0, 0.025, size=len(table) - 1)  # per-subject contrast jitter
        img = table[tissue] + tex
        img = gaussian_filter(img, sigma=blur_sigma, mode="nearest")
        img *= _bias_field(rng, p_img)
        img += rng.normal(0.0, rng.uniform(0.02, 0.045), size=img.shape)
        gain = 100.0 * rng.uniform(0.8, 1.25)
        offset = rng.uniform(-5.0, 5.0)
        image[ch] = (gain * img + offset).astype(np.float32)
    return image, label


def generate_case(rng: np.random.Generator, shape: ShapeLike = (48, 48, 48),
                  spacing: Sequence[float] = (1.0, 1.0, 1.0), num_channels: int = 1
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """Generate one phantom subject.

    Returns ``image`` of shape ``(num_channels, *shape)`` (float32) and
    ``label`` of shape ``shape`` (uint8, values from :data:`PHANTOM_LABELS`).
    ``shape`` / ``spacing`` are in array (z, y, x) order. Samples in which an
    organ is missing (possible only for very small shapes) are discarded and
    redrawn from ``rng``, so every organ is present in the returned label.
    Deterministic given the state of ``rng``.
    """
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    shape_t, spacing_t = _check_geometry(shape, spacing)
    num_channels = _check_int(num_channels, "num_channels", 1)
    organ_values = np.array(sorted(v for v in PHANTOM_LABELS.values() if v > 0))
    for _ in range(_MAX_ATTEMPTS):
        image, label = _sample_once(rng, shape_t, spacing_t, num_channels)
        counts = np.bincount(label.ravel(), minlength=organ_values.max() + 1)
        if np.all(counts[organ_values] > 0) and np.all(np.isfinite(image)):
            return image, label
    raise RuntimeError(f"could not generate a phantom with all organs present for shape={shape_t} "
                       f"after {_MAX_ATTEMPTS} attempts; use a larger shape")


def _write(array: np.ndarray, path: Path, spacing_zyx) -> None:
    img = sitk.GetImageFromArray(array)  # array is (z, y, x)
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))  # sitk wants (x, y, z)
    img.SetOrigin((0.0, 0.0, 0.0))
    sitk.WriteImage(img, str(path), useCompression=True, compressionLevel=1)


def make_phantom_dataset(raw_root: Union[str, Path], dataset_id: int = 990, name: str = "SSLPhantom",
                         num_train: int = 40, num_test: int = 10, shape: ShapeLike = (48, 48, 48),
                         spacing: Sequence[float] = (1.0, 1.0, 1.0), num_channels: int = 1, seed: int = 0,
                         overwrite: bool = False) -> Path:
    """Write the phantom as nnU-Net v2 raw dataset ``raw_root/DatasetXXX_Name``.

    Training cases ``phantom_000 ..`` go to imagesTr/labelsTr, test cases
    (continuing the numbering) to imagesTs/labelsTs. Case ``i`` of a split only
    depends on ``seed`` and ``i`` (not on ``num_train`` / ``num_test``). The
    dataset is written to a temporary folder and moved into place at the end.
    Raises FileExistsError if the folder exists and ``overwrite`` is False.
    Returns the dataset folder.
    """
    dataset_id = _check_int(dataset_id, "dataset_id", 1)
    if dataset_id > 999:
        raise ValueError(f"dataset_id must be in 1..999 (nnU-Net uses 3 digits), got {dataset_id}")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise ValueError(f"name must be a non-empty string of letters, digits, '_' or '-', got {name!r}")
    num_train = _check_int(num_train, "num_train", 2)
    num_test = _check_int(num_test, "num_test", 0)
    num_channels = _check_int(num_channels, "num_channels", 1)
    seed = _check_int(seed, "seed", 0)
    shape_t, spacing_t = _check_geometry(shape, spacing)

    raw_root = Path(raw_root)
    folder = raw_root / f"Dataset{dataset_id:03d}_{name}"
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{folder} already exists; pass overwrite=True to regenerate it "
                              f"(or delete the folder / choose another dataset_id)")
    raw_root.mkdir(parents=True, exist_ok=True)
    tmp = raw_root / f".{folder.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
            (tmp / sub).mkdir(parents=True)
        splits = (("Tr", 0, range(num_train)), ("Ts", 1, range(num_test)))
        for suffix, split_id, indices in splits:
            for i in indices:
                case_number = i if split_id == 0 else num_train + i
                case = f"phantom_{case_number:03d}"
                rng = np.random.default_rng([seed, split_id, i])
                image, label = generate_case(rng, shape_t, spacing_t, num_channels)
                for c in range(num_channels):
                    _write(image[c], tmp / f"images{suffix}" / f"{case}_{c:04d}.nii.gz", spacing_t)
                _write(label, tmp / f"labels{suffix}" / f"{case}.nii.gz", spacing_t)
        dataset_json = {
            "channel_names": {str(c): ("MRI" if c == 0 else f"MRI{c + 1}") for c in range(num_channels)},
            "labels": dict(PHANTOM_LABELS),
            "numTraining": num_train,
            "file_ending": ".nii.gz",
            "name": name,
            "description": (f"Synthetic abdominal phantom (nnunet_ssl.phantom): seed={seed}, "
                            f"shape={list(shape_t)}, spacing={list(spacing_t)}, num_test={num_test}; "
                            f"organs at consistent positions with per-subject affine/elastic, "
                            f"contrast, bias field and noise variation"),
            "licence": "generated",
        }
        with open(tmp / "dataset.json", "w") as f:
            json.dump(dataset_json, f, indent=4)
        if folder.exists():  # overwrite=True
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder

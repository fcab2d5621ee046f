"""Tests for the synthetic phantom dataset (nnunet_ssl.phantom)."""
import json
from itertools import combinations

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_ssl import phantom
from nnunet_ssl.phantom import PHANTOM_LABELS, generate_case, make_phantom_dataset

ORGANS = {k: v for k, v in PHANTOM_LABELS.items() if v > 0}


def _read(path):
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), img


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """Anisotropic, 2-channel dataset: 4 train + 2 test cases."""
    root = tmp_path_factory.mktemp("raw")
    folder = make_phantom_dataset(root, dataset_id=7, name="PhantomTest", num_train=4, num_test=2,
                                  shape=(20, 32, 28), spacing=(2.5, 0.8, 1.0), num_channels=2, seed=3)
    return folder


@pytest.fixture(scope="module")
def cases48():
    return [generate_case(np.random.default_rng([11, i]), (48, 48, 48), (1.0, 1.0, 1.0), 1) for i in range(16)]


# ----------------------------------------------------------------------------- layout
def test_layout_and_dataset_json(small_dataset):
    folder = small_dataset
    assert folder.name == "Dataset007_PhantomTest"
    dj = json.loads((folder / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "MRI", "1": "MRI2"}
    assert dj["labels"] == {"background": 0, **ORGANS}
    assert sorted(dj["labels"].values()) == list(range(len(dj["labels"])))
    assert len(ORGANS) in (3, 4)
    assert dj["numTraining"] == 4
    assert dj["file_ending"] == ".nii.gz"
    assert dj["name"] == "PhantomTest"
    assert dj["licence"] == "generated"
    assert isinstance(dj["description"], str) and dj["description"]

    tr = [f"phantom_{i:03d}" for i in range(4)]
    ts = [f"phantom_{i:03d}" for i in range(4, 6)]
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == sorted(
        f"{c}_{ch:04d}.nii.gz" for c in tr for ch in range(2))
    assert sorted(p.name for p in (folder / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in tr]
    assert sorted(p.name for p in (folder / "imagesTs").iterdir()) == sorted(
        f"{c}_{ch:04d}.nii.gz" for c in ts for ch in range(2))
    assert sorted(p.name for p in (folder / "labelsTs").iterdir()) == [f"{c}.nii.gz" for c in ts]
    # no leftovers (temporary folders) next to the dataset
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_geometry_and_dtypes(small_dataset):
    folder = small_dataset
    for split in ("Tr", "Ts"):
        for lab_path in sorted((folder / f"labels{split}").iterdir()):
            case = lab_path.name[: -len(".nii.gz")]
            lab, lab_img = _read(lab_path)
            assert lab.shape == (20, 32, 28)  # (z, y, x)
            assert np.allclose(lab_img.GetSpacing(), (1.0, 0.8, 2.5))  # sitk: (x, y, z)
            assert lab.dtype == np.uint8
            assert set(np.unique(lab)) == set(PHANTOM_LABELS.values())
            chans = []
            for ch in range(2):
                im, im_img = _read(folder / f"images{split}" / f"{case}_{ch:04d}.nii.gz")
                assert im.dtype == np.float32
                assert im.shape == lab.shape
                assert im_img.GetSpacing() == lab_img.GetSpacing()
                assert im_img.GetOrigin() == lab_img.GetOrigin()
                assert im_img.GetDirection() == lab_img.GetDirection()
                assert np.all(np.isfinite(im))
                chans.append(im)
            # channels are different contrasts, not copies
            assert abs(np.corrcoef(chans[0].ravel(), chans[1].ravel())[0, 1]) < 0.95


def test_written_files_match_generate_case(small_dataset):
    lab, _ = _read(small_dataset / "labelsTr" / "phantom_001.nii.gz")
    im, _ = _read(small_dataset / "imagesTr" / "phantom_001_0001.nii.gz")
    ref_im, ref_lab = generate_case(np.random.default_rng([3, 0, 1]), (20, 32, 28), (2.5, 0.8, 1.0), 2)
    np.testing.assert_array_equal(lab, ref_lab)
    np.testing.assert_array_equal(im, ref_im[1])


def test_nnunet_integrity_check(small_dataset):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(str(small_dataset), num_processes=1)


def test_existing_folder_and_overwrite(tmp_path):
    kw = dict(dataset_id=12, name="Tiny", num_train=2, num_test=1, shape=(16, 16, 16))
    folder = make_phantom_dataset(tmp_path, seed=0, **kw)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        make_phantom_dataset(tmp_path, seed=1, **kw)
    lab0, _ = _read(folder / "labelsTr" / "phantom_000.nii.gz")
    assert make_phantom_dataset(tmp_path, seed=1, overwrite=True, **kw) == folder
    lab1, _ = _read(folder / "labelsTr" / "phantom_000.nii.gz")
    assert not np.array_equal(lab0, lab1)
    assert len(list((folder / "imagesTr").iterdir())) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder.name]


# ----------------------------------------------------------------------------- determinism
def test_determinism():
    a_im, a_lab = generate_case(np.random.default_rng(5), (24, 32, 32), (1.0, 1.0, 1.0), 2)
    b_im, b_lab = generate_case(np.random.default_rng(5), (24, 32, 32), (1.0, 1.0, 1.0), 2)
    c_im, c_lab = generate_case(np.random.default_rng(6), (24, 32, 32), (1.0, 1.0, 1.0), 2)
    np.testing.assert_array_equal(a_im, b_im)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert not np.array_equal(a_lab, c_lab)
    assert not np.allclose(a_im, c_im)
    assert a_im.shape == (2, 24, 32, 32) and a_im.dtype == np.float32
    assert a_lab.shape == (24, 32, 32) and a_lab.dtype == np.uint8


def test_dataset_determinism(tmp_path):
    kw = dict(num_train=2, num_test=0, shape=(16, 20, 16))
    f1 = make_phantom_dataset(tmp_path / "a", seed=4, **kw)
    f2 = make_phantom_dataset(tmp_path / "b", seed=4, **kw)
    f3 = make_phantom_dataset(tmp_path / "c", seed=5, **kw)
    for rel in ("imagesTr/phantom_001_0000.nii.gz", "labelsTr/phantom_001.nii.gz"):
        np.testing.assert_array_equal(_read(f1 / rel)[0], _read(f2 / rel)[0])
    assert not np.array_equal(_read(f1 / "imagesTr/phantom_001_0000.nii.gz")[0],
                              _read(f3 / "imagesTr/phantom_001_0000.nii.gz")[0])


# ----------------------------------------------------------------------------- spatial prior
def _normalized_centroid(mask):
    idx = np.argwhere(mask)
    return (idx.mean(0) + 0.5) / np.asarray(mask.shape)


def _dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_every_organ_present(cases48):
    for _, lab in cases48:
        counts = np.bincount(lab.ravel(), minlength=max(PHANTOM_LABELS.values()) + 1)
        assert len(counts) == max(PHANTOM_LABELS.values()) + 1  # no unexpected label values
        for organ, v in ORGANS.items():
            assert counts[v] >= 50, (organ, counts)
    # small / anisotropic shapes too
    for i in range(5):
        for shape, spacing in (((16, 16, 16), (1, 1, 1)), ((24, 48, 48), (3.0, 0.8, 0.8))):
            _, lab = generate_case(np.random.default_rng(100 + i), shape, spacing, 1)
            assert set(np.unique(lab)) == set(PHANTOM_LABELS.values())


def test_spatial_prior_consistent_but_not_identical(cases48):
    for organ, v in ORGANS.items():
        cents = np.array([_normalized_centroid(lab == v) for _, lab in cases48])
        assert np.all(cents.std(0) < 0.08), (organ, cents.std(0))
        assert np.all(cents.std(0) > 0.005), (organ, cents.std(0))  # there is variation
        dices = np.array([_dice(a[1] == v, b[1] == v) for a, b in combinations(cases48[:8], 2)])
        assert dices.max() < 0.95, (organ, dices.max())
        assert 0.2 < dices.mean() < 0.9, (organ, dices.mean())
        # consecutive pairs: positions correspond (mostly overlapping) ...
        assert np.median(dices) > 0.2, (organ, np.median(dices))
        # ... and organ volumes vary between subjects
        sizes = np.array([(lab == v).sum() for _, lab in cases48])
        assert sizes.std() / sizes.mean() > 0.05, organ
    # the organs themselves are at distinct positions (position is informative)
    mean_cents = {o: np.mean([_normalized_centroid(lab == v) for _, lab in cases48], 0) for o, v in ORGANS.items()}
    for (o1, c1), (o2, c2) in combinations(mean_cents.items(), 2):
        assert np.linalg.norm(c1 - c2) > 0.1, (o1, o2)


# ----------------------------------------------------------------------------- appearance
def test_intensities_realistic(cases48):
    for im, lab in cases48[:6]:
        assert np.all(np.isfinite(im))
        img = im[0]
        for organ, v in ORGANS.items():
            vals = img[lab == v]
            # noise / bias / texture: not piecewise constant
            assert len(np.unique(vals)) > 0.9 * vals.size, organ
            assert vals.std() > 1e-3 * (np.abs(img).max() + 1e-6), organ
        # background inside the volume is not constant either
        bg = img[lab == 0]
        assert len(np.unique(bg)) > 0.9 * bg.size
    # intensities differ between subjects (per-subject scale/offset/contrast)
    liver_means = [im[0][lab == ORGANS["liver"]].mean() for im, lab in cases48]
    assert np.std(liver_means) / abs(np.mean(liver_means)) > 0.02


def _bias_slope(image, label):
    """Largest linear slope of log-intensity vs. normalized position, shared by all organs
    (per-organ intercepts), fitted on eroded organ interiors. Texture / noise are local, so
    they contribute little at a large grid size; a smooth bias field shows up as a slope."""
    from scipy.ndimage import binary_erosion
    shape = np.asarray(label.shape)
    pos, logs, onehot = [], [], []
    for k, v in enumerate(ORGANS.values()):
        m = binary_erosion(label == v)
        pos.append((np.argwhere(m) + 0.5) / shape * 2 - 1)
        logs.append(np.log(np.clip(image[m], 1e-3, None)))
        oh = np.zeros((m.sum(), len(ORGANS)))
        oh[:, k] = 1
        onehot.append(oh)
    x = np.concatenate([np.concatenate(onehot), np.concatenate(pos)], axis=1)
    coef, *_ = np.linalg.lstsq(x, np.concatenate(logs), rcond=None)
    return np.abs(coef[len(ORGANS):]).max()


def test_bias_field_present():
    slopes = []
    for i in range(6):
        im, lab = generate_case(np.random.default_rng([21, i]), (96, 96, 96), (1, 1, 1), 1)
        slopes.append(_bias_slope(im[0], lab))
    # without a bias field the median is ~0.03; with it ~0.2
    assert np.median(slopes) > 0.08, slopes


def test_not_trivially_thresholdable(cases48):
    # liver and spleen have overlapping intensities in a typical case: position is needed
    fracs = []
    for im, lab in cases48:
        liver = im[0][lab == ORGANS["liver"]]
        spleen = im[0][lab == ORGANS["spleen"]]
        lo, hi = np.percentile(liver, [5, 95])
        fracs.append(np.mean((spleen >= lo) & (spleen <= hi)))
    assert np.median(fracs) > 0.3, fracs


def test_generate_case_redraws_when_organ_missing(monkeypatch):
    real = phantom._sample_once
    calls = {"n": 0}

    def flaky(rng, shape, spacing, num_channels):
        calls["n"] += 1
        image, label = real(rng, shape, spacing, num_channels)
        if calls["n"] == 1:
            label[label == ORGANS["spleen"]] = 0
        return image, label

    monkeypatch.setattr(phantom, "_sample_once", flaky)
    _, lab = generate_case(np.random.default_rng(0), (16, 16, 16), (1, 1, 1), 1)
    assert calls["n"] == 2
    assert set(np.unique(lab)) == set(PHANTOM_LABELS.values())


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, match", [
    (dict(shape=(15, 48, 48)), "shape"),
    (dict(shape=(48, 48)), "shape"),
    (dict(shape=(48, 48, 20.5)), "shape"),
    (dict(spacing=(1.0, 0.0, 1.0)), "spacing"),
    (dict(spacing=(1.0, 1.0)), "spacing"),
    (dict(num_train=1), "num_train"),
    (dict(num_test=-1), "num_test"),
    (dict(num_channels=0), "num_channels"),
    (dict(dataset_id=1000), "dataset_id"),
    (dict(dataset_id=0), "dataset_id"),
    (dict(name="bad name/x"), "name"),
    (dict(seed=-1), "seed"),
])
def test_argument_validation(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_phantom_dataset(tmp_path, **kwargs)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_generate_case_validation():
    with pytest.raises(ValueError, match="shape"):
        generate_case(np.random.default_rng(0), (8, 48, 48), (1, 1, 1), 1)
    with pytest.raises(ValueError, match="num_channels"):
        generate_case(np.random.default_rng(0), (16, 16, 16), (1, 1, 1), 0)
    with pytest.raises(ValueError, match="rng"):
        generate_case(0, (16, 16, 16), (1, 1, 1), 1)

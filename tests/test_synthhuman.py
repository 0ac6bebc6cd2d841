"""SynthHuman layout: write an exactly ray-cast sphere, read it back, check normals against depth + K."""

import numpy as np
import pytest

from geodiff4d.core.io.exr import read_exr, write_exr
from geodiff4d.datasets.cameras import intrinsics
from geodiff4d.datasets.normal_maps import angular_error_deg, normals_from_depth, sphere_depth_and_normals
from geodiff4d.datasets.synthhuman import (
    INVALID_DEPTH_CM,
    SYNTHHUMAN_NORMAL_TO_OURS,
    SynthHumanDataset,
    SynthHumanError,
    derive_normal_convention,
    member_path,
    signed_permutations,
    write_synthhuman_sample,
)

WIDTH, HEIGHT = 128, 96
K = intrinsics(150.0, WIDTH, HEIGHT)
SPHERES = {3: (np.array([0.03, -0.02, 0.55]), 0.14), 7: (np.array([-0.05, 0.04, 0.7]), 0.2)}


def _sphere(index):
    center, radius = SPHERES[index]
    depth, normal, mask = sphere_depth_and_normals(K, WIDTH, HEIGHT, center, radius)
    rng = np.random.default_rng(index)
    rgb = rng.uniform(size=(HEIGHT, WIDTH, 3)) * mask[..., None]
    return rgb, mask.astype(np.float64), depth * mask, normal, mask


@pytest.fixture()
def root(tmp_path):
    for index in SPHERES:
        rgb, alpha, depth, normal, _ = _sphere(index)
        write_synthhuman_sample(tmp_path, index, rgb, alpha, depth, normal, K)
    return tmp_path


def test_files_follow_the_layout(root):
    names = sorted(p.name for p in root.iterdir())
    members = [("rgb", "png"), ("alpha", "png"), ("depth", "exr"), ("normal", "exr"), ("cam", "txt")]
    assert names == sorted(f"{m}_{i:07d}.{e}" for i in SPHERES for m, e in members)
    depth_cm = read_exr(root / "depth_0000003.exr")
    _, _, depth, _, mask = _sphere(3)
    assert np.all(depth_cm[~mask] == INVALID_DEPTH_CM)
    np.testing.assert_allclose(depth_cm[mask], depth[mask] * 100.0, rtol=1e-6)  # centimetres
    # Stored normals follow the assumed OpenCV convention: the pixel facing the camera points to -z.
    stored = read_exr(root / "normal_0000003.exr")
    centre = np.unravel_index(np.argmin(np.where(mask, depth, np.inf)), mask.shape)
    assert stored[centre][2] < -0.99
    np.testing.assert_allclose(np.loadtxt(root / "cam_0000003.txt"), K, rtol=0, atol=0)


def test_read_back_equals_written(root):
    dataset = SynthHumanDataset(root)
    assert dataset.indices() == [3, 7] and len(dataset) == 2
    rgb, alpha, depth, normal, mask = _sphere(7)
    sample = dataset[7]
    assert sample.index == 7 and sample.rgb.shape == (HEIGHT, WIDTH, 3) and sample.rgb.dtype == np.float32
    assert np.abs(sample.rgb - rgb).max() <= 0.5 / 255 + 1e-6
    np.testing.assert_array_equal(sample.alpha, alpha)
    np.testing.assert_array_equal(sample.mask, mask)
    np.testing.assert_allclose(sample.depth_m, depth, rtol=1e-6)
    assert np.abs(sample.normal[mask] - normal[mask]).max() < 1e-6
    np.testing.assert_array_equal(sample.K, K)
    np.testing.assert_array_equal(sample.camera.world_to_cam, np.eye(4))
    assert (sample.camera.width, sample.camera.height) == (WIDTH, HEIGHT)


def test_reader_normals_agree_with_depth_and_K(root):
    sample = SynthHumanDataset(root)[3]
    derived = normals_from_depth(sample.depth_m, sample.K, sample.mask)
    errors = angular_error_deg(sample.normal, derived, sample.mask & (np.linalg.norm(derived, axis=-1) > 0))
    assert errors.size > 0.9 * sample.mask.sum()
    assert np.median(errors) < 3.0


def test_derive_normal_convention_recovers_the_constant(root):
    fit = derive_normal_convention(SynthHumanDataset(root), n_samples=2)
    assert fit.matches_assumed
    np.testing.assert_array_equal(fit.matrix, SYNTHHUMAN_NORMAL_TO_OURS)
    assert fit.median_error_deg < 3.0 and fit.runner_up_error_deg > 10.0


def test_derive_normal_convention_detects_another_convention(root):
    # Rewrite the stored normals in a different axis convention: ours = other @ stored.
    other = signed_permutations()[13]
    assert not np.array_equal(other, SYNTHHUMAN_NORMAL_TO_OURS)
    for index in SPHERES:
        _, _, _, normal, _ = _sphere(index)
        write_exr(member_path(root, index, "normal"), (normal @ other).astype(np.float32))
    fit = derive_normal_convention(SynthHumanDataset(root))
    np.testing.assert_array_equal(fit.matrix, other)
    assert not fit.matches_assumed


def test_missing_member_names_the_file(root):
    (root / "cam_0000007.txt").unlink()
    with pytest.raises(SynthHumanError, match="cam_0000007.txt"):
        SynthHumanDataset(root)


def test_mismatched_member_names_the_file(root):
    write_exr(root / "normal_0000003.exr", np.zeros((HEIGHT, WIDTH + 2, 3), np.float32))
    with pytest.raises(SynthHumanError, match="normal_0000003.exr"):
        SynthHumanDataset(root)[3]


def test_bad_intrinsics_name_the_file(root):
    (root / "cam_0000003.txt").write_text("1 0 0\n0 1 0\n")
    with pytest.raises(SynthHumanError, match="cam_0000003.txt"):
        SynthHumanDataset(root)[3]

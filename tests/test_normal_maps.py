"""Normal PNG encoding and depth-derived normals against an exactly ray-cast sphere."""

import cv2
import numpy as np
import pytest

from geodiff4d.datasets.cameras import intrinsics
from geodiff4d.datasets.normal_maps import (
    NormalMapError,
    angular_error_deg,
    backproject,
    decode_normal_png,
    encode_normal_png,
    from_mask_weighted,
    mask_weighted,
    normals_from_depth,
    sphere_depth_and_normals,
    unit,
    write_normal_png,
)

WIDTH, HEIGHT = 160, 120
K = intrinsics(200.0, WIDTH, HEIGHT)


CENTER, RADIUS = np.array([0.02, -0.01, 0.6]), 0.15


def _sphere():
    return sphere_depth_and_normals(K, WIDTH, HEIGHT, center=CENTER, radius=RADIUS)


def test_sphere_ground_truth_faces_the_camera():
    depth, normal, mask = _sphere()
    centre = (HEIGHT // 2, WIDTH // 2)
    assert mask[centre] and not mask[0, 0]
    np.testing.assert_allclose(np.linalg.norm(normal[mask], axis=-1), 1.0, atol=1e-12)
    points = backproject(depth, K)[mask]  # depth lies exactly on the sphere
    np.testing.assert_allclose(np.linalg.norm(points - CENTER, axis=-1), RADIUS, rtol=1e-12)
    np.testing.assert_allclose(normal[mask] * [1, -1, -1], (points - CENTER) / RADIUS, atol=1e-12)
    assert normal[centre][2] > 0.98  # faces the camera: +z in our convention
    # Top of the silhouette (small row index, y up in our convention) tilts up, left edge tilts left.
    rows = np.where(mask.any(axis=1))[0]
    assert normal[rows[0] + 1, mask[rows[0] + 1].nonzero()[0].mean().astype(int)][1] > 0.5
    cols = np.where(mask.any(axis=0))[0]
    assert normal[mask[:, cols[0] + 1].nonzero()[0].mean().astype(int), cols[0] + 1][0] < -0.5


def test_png_round_trip_within_16_bit_precision(tmp_path):
    _, normal, mask = _sphere()
    path = tmp_path / "n.png"
    write_normal_png(path, normal.transpose(2, 0, 1), mask)  # channel-first input accepted
    decoded, decoded_mask = decode_normal_png(path)
    assert decoded.dtype == np.float32 and decoded.shape == (HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(decoded_mask, mask)
    assert np.abs(decoded[mask] - normal[mask]).max() < 2.0 / 65535 * 1.5
    assert not decoded[~mask].any()
    assert decode_normal_png(path.read_bytes())[0].tobytes() == decoded.tobytes()
    assert encode_normal_png(normal, mask) == path.read_bytes()  # deterministic bytes


def test_png_stores_half_offset_encoding():
    normal = np.zeros((2, 2, 3))
    normal[..., 2] = 1.0
    mask = np.array([[True, False], [True, True]])
    import cv2

    image = cv2.imdecode(np.frombuffer(encode_normal_png(normal, mask), np.uint8), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint16
    np.testing.assert_array_equal(image[0, 0, ::-1], [32768, 32768, 65535])  # (n+1)/2 in RGB order
    np.testing.assert_array_equal(image[0, 1], [0, 0, 0])


def test_normals_from_depth_match_analytic_sphere():
    depth, normal, mask = _sphere()
    derived = normals_from_depth(depth, K, mask)
    errors = angular_error_deg(derived, normal, mask & (np.linalg.norm(derived, axis=-1) > 0))
    assert errors.size > 0.95 * mask.sum()
    assert np.median(errors) < 1.0
    # A wrong axis convention would be caught: flipping y is far off.
    assert np.median(angular_error_deg(derived * [1, -1, 1], normal, mask)) > 10.0


def _numpy_unit(vectors):
    """The plain numpy normalisation the compiled float32 path replaced (kept as its reference)."""
    norm = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.where(norm > 1e-12, vectors / np.maximum(norm, 1e-12), 0.0)


def test_compiled_unit_encoding_and_decoding_are_bit_identical_to_numpy():
    rng = np.random.default_rng(0)
    normal = (rng.standard_normal((64, 48, 3)) * rng.uniform(0, 3, (64, 48, 1))).astype(np.float32)
    normal[:4] = 0.0
    normal[4, :, 0] = 1e-13  # below eps: zero
    mask = rng.uniform(size=(64, 48)) > 0.3
    expected = _numpy_unit(normal)
    assert expected.dtype == np.float32 and np.array_equal(unit(normal), expected)
    assert np.array_equal(unit(normal.astype(np.float64)), _numpy_unit(normal.astype(np.float64)))
    scale = np.float32(65535 / 2)
    codes = np.where(mask[..., None], np.rint((np.clip(expected, -1.0, 1.0) + 1.0) * scale), 0).astype(
        np.uint16
    )
    decoded = cv2.imdecode(np.frombuffer(encode_normal_png(normal, mask), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(decoded[..., ::-1], codes)
    assert encode_normal_png(normal.transpose(2, 0, 1), mask) == encode_normal_png(normal, mask)
    for image in (decoded, (rng.uniform(size=(32, 40, 4)) * 255).astype(np.uint8)):  # 16-bit BGR, 8-bit BGRA
        image[:3] = 0
        ok, png = cv2.imencode(".png", image)
        rgb = image[..., 2::-1]
        mask = np.any(rgb > 0, axis=-1)
        scale = np.float32(2 / (65535 if image.dtype == np.uint16 else 255))
        expected = _numpy_unit(rgb.astype(np.float32) * scale - np.float32(1.0))
        expected[~mask] = 0.0
        normal, got_mask = decode_normal_png(png.tobytes())
        assert (
            np.array_equal(got_mask, mask) and normal.dtype == np.float32 and np.array_equal(normal, expected)
        )


def test_decode_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(NormalMapError, match="bad.png"):
        decode_normal_png(bad)


def test_mask_weighted_round_trip_matches_numpy():
    """(normal * mask, mask) and back: unit normals where the mask is > 0.5, zero elsewhere (float masks too)."""
    rng = np.random.default_rng(7)
    normal = rng.normal(size=(9, 11, 3)).astype(np.float32)
    normal[0, 0] = 0.0  # a zero vector stays zero
    for mask in (rng.random((9, 11)) > 0.4, rng.random((9, 11)).astype(np.float32)):
        weighted = mask_weighted(normal, mask)
        np.testing.assert_array_equal(weighted[..., :3], (normal * mask[..., None]).astype(np.float32))
        np.testing.assert_array_equal(weighted[..., 3], mask.astype(np.float32))
        back, inside = from_mask_weighted(weighted)
        np.testing.assert_array_equal(inside, weighted[..., 3] > 0.5)
        want = np.where(inside[..., None], unit(weighted[..., :3].astype(np.float64)), 0.0)
        np.testing.assert_allclose(back, want, atol=1e-6)
        assert back.dtype == np.float32

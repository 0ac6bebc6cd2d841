import json

import numpy as np
import pytest

from geodiff4d.datasets.cameras import (
    MONO_HOLDOUT_SERIALS,
    NVS_HOLDOUT_SERIALS,
    Camera,
    CameraError,
    intrinsics,
    look_at_camera,
    nersemble_rig,
    opencv_to_opengl_c2w,
    opengl_c2w_to_opencv,
)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _camera(rng: np.random.Generator) -> Camera:
    world_to_cam = np.eye(4)
    world_to_cam[:3, :3] = _random_rotation(rng)
    world_to_cam[:3, 3] = rng.normal(size=3)
    K = np.array([[812.3, 0.0, 301.7], [0.0, 799.9, 402.25], [0.0, 0.0, 1.0]])
    return Camera(world_to_cam, K, 600, 800)


def test_project_known_point():
    world_to_cam = np.eye(4)
    world_to_cam[:3, 3] = [0.1, -0.2, 2.0]  # camera-space point = world point + t
    camera = Camera(world_to_cam, np.array([[100.0, 0, 50], [0, 200.0, 40], [0, 0, 1]]), 101, 81)
    point = np.array([[0.3, 0.4, 2.0]])
    np.testing.assert_allclose(camera.to_cam(point), [[0.4, 0.2, 4.0]])
    np.testing.assert_allclose(camera.project(point), [[100 * 0.1 + 50, 200 * 0.05 + 40]])
    np.testing.assert_allclose(camera.center, [-0.1, 0.2, -2.0])


def test_projected_bounds_are_the_extent_of_project():
    rng = np.random.default_rng(4)
    for _ in range(5):
        camera = _camera(rng)
        points = camera.center + rng.normal(0, 0.2, (500, 3)) + 3.0 * camera.cam_to_world[:3, 2]  # in front
        xy = camera.project(points)
        want = (xy[:, 0].min(), xy[:, 1].min(), xy[:, 0].max(), xy[:, 1].max())
        np.testing.assert_allclose(camera.projected_bounds(points.astype(np.float32)), want, rtol=1e-6)
        np.testing.assert_allclose(camera.projected_bounds(points), want, rtol=1e-12)
    with pytest.raises(CameraError, match="N > 0"):
        camera.projected_bounds(np.zeros((0, 3)))


def test_json_round_trip_is_exact():
    camera = _camera(np.random.default_rng(0))
    text = json.dumps(camera.to_json())
    restored = Camera.from_json(json.loads(text))
    assert restored == camera
    assert Camera.from_json(text) == camera
    assert restored.world_to_cam.dtype == np.float64


@pytest.mark.parametrize(
    "field, mutate, message",
    [
        ("world_to_cam", lambda d: d.update(world_to_cam=(np.diag([2.0, 1, 1, 1])).tolist()), "rotation"),
        ("world_to_cam", lambda d: d.update(world_to_cam=np.diag([-1.0, 1, 1, 1]).tolist()), "det"),
        ("world_to_cam", lambda d: d.update(world_to_cam=np.eye(3).tolist()), "shape"),
        ("K", lambda d: d["K"][0].__setitem__(2, float("nan")), "NaN"),
        ("K", lambda d: d["K"][0].__setitem__(0, -5.0), "focal"),
        ("width", lambda d: d.update(width=0), "positive"),
        ("height", lambda d: d.update(height=12.5), "positive"),
    ],
)
def test_invalid_cameras_name_the_field(field, mutate, message):
    data = _camera(np.random.default_rng(1)).to_json()
    mutate(data)
    with pytest.raises(CameraError, match=message) as info:
        Camera.from_json(data, source="cams.json")
    assert field in str(info.value) and "cams.json" in str(info.value)


def test_missing_field_is_reported():
    data = _camera(np.random.default_rng(2)).to_json()
    del data["K"]
    with pytest.raises(CameraError, match="'K'"):
        Camera.from_json(data)


def test_resized_and_cropped_follow_pixel_centres():
    rng = np.random.default_rng(3)
    camera = _camera(rng)
    points = camera.cam_to_world[:3, :3] @ np.array([0.05, -0.1, 1.5]) + camera.cam_to_world[:3, 3]
    points = points[None] + rng.normal(scale=0.05, size=(20, 3))
    uv = camera.project(points)
    half = camera.resized(300, 400)
    # pixel (i) covers [i-0.5, i+0.5]: continuous image coordinates scale about the image corner -0.5
    np.testing.assert_allclose(half.project(points), (uv + 0.5) * 0.5 - 0.5, atol=1e-9)
    crop = camera.cropped(40, 70, 200, 100)
    np.testing.assert_allclose(crop.project(points), uv - [40, 70], atol=1e-9)
    assert (crop.width, crop.height) == (200, 100)
    # derived cameras skip revalidating the pose: they must equal a fully validated construction
    assert crop == Camera(crop.world_to_cam, crop.K, 200, 100) and half == Camera(
        half.world_to_cam, half.K, 300, 400
    )
    assert not crop.K.flags.writeable
    for width, height in ((0, 100), (200, 10.5), (True, 100)):
        with pytest.raises(CameraError, match="positive integers"):
            camera.cropped(40, 70, width, height)


def test_look_at_centres_target_and_keeps_up_up():
    K = intrinsics(500.0, 201, 151)
    camera = look_at_camera([0.3, 0.2, 1.5], [0.0, 0.05, 0.0], [0.0, 1.0, 0.0], K, 201, 151)
    np.testing.assert_allclose(camera.project(np.array([[0.0, 0.05, 0.0]])), [[100.0, 75.0]], atol=1e-9)
    above, below = camera.project(np.array([[0.0, 0.15, 0.0], [0.0, -0.05, 0.0]]))
    assert above[1] < 75.0 < below[1]
    with pytest.raises(CameraError, match="parallel"):
        look_at_camera([0, 1, 0], [0, 0, 0], [0, 1, 0], K, 201, 151)


def test_nersemble_rig_shape():
    rig = nersemble_rig(radius=1.0, width=256, height=256, focal=900.0, look_at=(0.0, 0.02, 0.01))
    serials = list(rig)
    assert len(serials) == 16 and len(set(serials)) == 16
    assert all(len(s) == 9 and s.isdigit() for s in serials)
    assert set(MONO_HOLDOUT_SERIALS) | set(NVS_HOLDOUT_SERIALS) <= set(serials)
    centres = np.stack([camera.center for camera in rig.values()])
    np.testing.assert_allclose(np.linalg.norm(centres - [0.0, 0.02, 0.01], axis=1), 1.0, atol=1e-9)
    yaw = np.degrees(np.arctan2(centres[:, 0], centres[:, 2] - 0.01))
    assert yaw.min() < -55 and yaw.max() > 55 and np.all(np.abs(yaw) <= 65)
    assert len(np.unique(np.round(centres[:, 1], 3))) >= 3  # a few pitch rows
    for camera in rig.values():
        np.testing.assert_allclose(camera.project(np.array([[0.0, 0.02, 0.01]])), [[127.5, 127.5]], atol=1e-6)
        world_up_in_cam = camera.world_to_cam[:3, :3] @ [0.0, 1.0, 0.0]
        assert world_up_in_cam[1] < -0.9  # world up appears as image up (camera y points down)
    frontal = rig["222200037"]
    np.testing.assert_allclose(frontal.world_to_cam[:3, :3], np.diag([1.0, -1.0, -1.0]), atol=1e-12)
    assert frontal.center[2] > 0.99  # on the +z side, facing the FLAME face


def test_opengl_conversion_round_trip_and_axes():
    rng = np.random.default_rng(4)
    camera = _camera(rng)
    transform = opencv_to_opengl_c2w(camera.world_to_cam)
    np.testing.assert_allclose(opengl_c2w_to_opencv(transform), camera.world_to_cam, atol=1e-12)
    np.testing.assert_allclose(transform[:3, 3], camera.center, atol=1e-12)
    frontal = nersemble_rig()["222200037"]
    transform = opencv_to_opengl_c2w(frontal.world_to_cam)
    np.testing.assert_allclose(transform[:3, 1], [0.0, 1.0, 0.0], atol=1e-12)  # OpenGL camera y: world up
    np.testing.assert_allclose(transform[:3, 2], [0.0, 0.0, 1.0], atol=1e-12)  # z points back, toward +z


def test_rig_default_focal_frames_the_head_at_any_resolution():
    for width, height in ((256, 256), (550, 802)):
        camera = nersemble_rig(width=width, height=height)["222200037"]
        half_side = min(width, height) / 2
        # a point 0.16 m off-axis at the look-at depth lands on the border of the shorter side
        u, _ = camera.project(np.array([[0.16, 0.0, 0.0]]))[0]
        assert abs(u - (width - 1) / 2 - half_side) < 1e-6


def test_benchmark_facts_are_the_official_toolkits(tmp_path):
    """Sizes, frame rates and camera splits of both benchmarks as nersemble-benchmark defines them (its constants
    and the submission writers that refuse anything else)."""
    from nersemble_benchmark import constants
    from nersemble_benchmark.data.submission_data import (
        MonoFlameAvatarSubmissionDataWriter,
        NVSSubmissionDataWriter,
    )

    from geodiff4d.datasets import cameras

    assert cameras.NVS_HOLDOUT_SERIALS == tuple(constants.BENCHMARK_NVS_HOLD_OUT_SERIALS)
    assert cameras.MONO_HOLDOUT_SERIALS == tuple(constants.BENCHMARK_MONO_FLAME_AVATAR_HOLD_OUT_SERIALS)
    assert cameras.MONO_TRAIN_SERIAL == constants.BENCHMARK_MONO_FLAME_AVATAR_TRAIN_SERIAL
    assert {serial for serial, _, _ in cameras.NERSEMBLE_LAYOUT} == set(constants.SERIALS)
    for writer, size, fps in (
        (NVSSubmissionDataWriter, cameras.NVS_BENCHMARK_SIZE, cameras.NVS_BENCHMARK_FPS),
        (MonoFlameAvatarSubmissionDataWriter, cameras.MONO_BENCHMARK_SIZE, cameras.MONO_BENCHMARK_FPS),
    ):
        with writer(str(tmp_path / f"{writer.__name__}.zip")) as official:
            assert (official._width, official._height, official._fps) == (*size, fps)

"""NeRSemble v2 layout: write cameras, tracking and small videos, read them back, and fail loudly on bad input."""

import json
from fractions import Fraction

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from geodiff4d.core.io.video import write_video
from geodiff4d.datasets.cameras import Camera, nersemble_rig
from geodiff4d.datasets.flame import FlameParams
from geodiff4d.datasets.flame_tracking import TRACKING_V2, TrackingError, write_nersemble_tracking
from geodiff4d.datasets.nersemble import (
    NersembleDataset,
    NersembleError,
    write_camera_params,
    write_color_calibration,
)

SERIALS = ("222200037", "222200046", "220700191")
SIZES = {"222200037": (64, 48), "222200046": (48, 64), "220700191": (56, 42)}  # each camera its own size
RAW_SIZE = (110, 160)  # the raw release's 2200x3208 images downscaled 20x (rounded to even pixels)
N_FRAMES, N_SHAPE, N_EXPR = 4, 20, 10
SUBJECT, SEQUENCE = "017", "EXP-1-head"


def _rig(shared_size=None):
    """Per-camera sizes, focal lengths and principal points, so a serial mix-up fails; ``shared_size``: one
    size and K for all (the raw release's layout)."""
    cameras = {}
    for i, serial in enumerate(SERIALS):
        width, height = shared_size or SIZES[serial]
        camera = nersemble_rig(width=width, height=height, focal=90.0 * (1 + 0.1 * i * (not shared_size)))[
            serial
        ]
        K = camera.K.copy()
        if not shared_size:
            K[:2, 2] += (i - 1) * 1.5
        cameras[serial] = Camera(camera.world_to_cam, K, width, height)
    return cameras


def _params():
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen) * 0.2

    return FlameParams(
        shape=rand(1, N_SHAPE).expand(N_FRAMES, N_SHAPE).clone(),
        expression=rand(N_FRAMES, N_EXPR),
        rotation=rand(N_FRAMES, 3),
        neck=rand(N_FRAMES, 3),
        jaw=rand(N_FRAMES, 3),
        eyes=rand(N_FRAMES, 6),
        translation=rand(N_FRAMES, 3),
        scale=torch.full((N_FRAMES, 1), 1.1),
    )


def _video(seed, size, n_frames=N_FRAMES):
    width, height = size
    v, u = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    frames = [np.stack([u, v, 0.5 + 0.3 * np.sin(5 * u + t + seed)], -1) for t in range(n_frames)]
    return np.rint(np.stack(frames) * 255).astype(np.uint8)


def _alpha(size, n_frames=N_FRAMES):
    width, height = size
    v, u = np.mgrid[0:height, 0:width]
    disc = (u - width / 2) ** 2 + (v - height / 2) ** 2 < (min(size) / 3) ** 2
    return np.repeat(disc[None] * np.uint8(255), n_frames, axis=0)


def _sequence_dir(root):
    return root / SUBJECT / "sequences" / SEQUENCE


def _write_videos(root, sizes):
    for i, (serial, size) in enumerate(sizes.items()):
        write_video(_sequence_dir(root) / "images" / f"cam_{serial}.mp4", _video(i, size))
        write_video(_sequence_dir(root) / "alpha_maps" / f"cam_{serial}.mp4", _alpha(size))


def _write(root, variant="benchmark", cameras=None):
    cameras = cameras or _rig()
    write_camera_params(root / SUBJECT / "calibration" / "camera_params.json", cameras, variant=variant)
    _write_videos(root, {serial: (cameras[serial].width, cameras[serial].height) for serial in SERIALS})
    write_nersemble_tracking(_sequence_dir(root) / "tracking" / TRACKING_V2, _params(), np.arange(N_FRAMES))
    return cameras


@pytest.fixture()
def root(tmp_path):
    _write(tmp_path)
    return tmp_path


def _assert_cameras_equal(read, written):
    assert sorted(read) == sorted(written)
    for serial, camera in written.items():
        np.testing.assert_allclose(read[serial].world_to_cam, camera.world_to_cam, atol=1e-6)
        np.testing.assert_allclose(read[serial].K, camera.K, atol=1e-6)
        assert (read[serial].width, read[serial].height) == (camera.width, camera.height)


@pytest.mark.parametrize("variant", ["raw", "benchmark"])
def test_camera_params_round_trip(tmp_path, variant):
    cameras = _rig(RAW_SIZE if variant == "raw" else None)  # benchmark: per-serial sizes and intrinsics
    _write(tmp_path, variant, cameras)
    data = json.loads((tmp_path / SUBJECT / "calibration" / "camera_params.json").read_text())
    assert sorted(data["world_2_cam"]) == sorted(SERIALS)
    if variant == "raw":
        assert np.shape(data["intrinsics"]) == (3, 3)
    else:
        assert sorted(data["intrinsics"]) == sorted(SERIALS)
    dataset = NersembleDataset(tmp_path)
    assert dataset.subjects() == [SUBJECT] and dataset.sequences(SUBJECT) == [SEQUENCE]
    assert dataset.serials(SUBJECT) == sorted(SERIALS)
    _assert_cameras_equal(dataset.cameras(SUBJECT), cameras)


def test_raw_variant_rejects_differing_intrinsics(tmp_path):
    cameras = _rig(RAW_SIZE)
    camera = cameras[SERIALS[0]]
    cameras[SERIALS[0]] = Camera(camera.world_to_cam, camera.K * [[2], [2], [1]], *RAW_SIZE)
    with pytest.raises(ValueError, match="shared intrinsics"):
        write_camera_params(tmp_path / "camera_params.json", cameras, variant="raw")
    with pytest.raises(ValueError, match="not a downscale of the raw release's 2200x3208"):
        write_camera_params(tmp_path / "camera_params.json", _rig((64, 64)), variant="raw")


def test_raw_shared_intrinsics_are_for_full_size_images_and_scaled_to_the_video(tmp_path):
    """The raw release's one K is for its 2200x3208 images (nersemble-data's README); a downscaled video gets K
    scaled by its own factor, exactly as resizing the full-size image would."""
    cameras = _rig(RAW_SIZE)
    _write(tmp_path, "raw", cameras)
    stored = np.array(
        json.loads((tmp_path / SUBJECT / "calibration" / "camera_params.json").read_text())["intrinsics"]
    )
    full = Camera(np.eye(4), stored, 2200, 3208)
    assert (
        abs(stored[0, 2] - (cameras[SERIALS[0]].K[0, 2] + 0.5) * 20 + 0.5) < 1e-9
    )  # the file holds full-size K
    read = NersembleDataset(tmp_path).cameras(SUBJECT)
    for serial in SERIALS:
        np.testing.assert_allclose(read[serial].K, full.resized(*RAW_SIZE).K, rtol=1e-12)
    half = tmp_path / "half"
    write_camera_params(half / SUBJECT / "calibration" / "camera_params.json", cameras, variant="raw")
    _write_videos(half, {serial: (1100 // 10, 1604 // 10) for serial in SERIALS})  # another downscale
    np.testing.assert_allclose(
        NersembleDataset(half).cameras(SUBJECT)[SERIALS[0]].K, full.resized(110, 160).K, rtol=1e-12
    )


def test_raw_intrinsics_with_a_video_of_another_shape_are_refused(tmp_path):
    write_camera_params(
        tmp_path / SUBJECT / "calibration" / "camera_params.json", _rig(RAW_SIZE), variant="raw"
    )
    _write_videos(tmp_path, {serial: (64, 48) for serial in SERIALS})  # not a downscale of 2200x3208
    with pytest.raises(NersembleError, match=r"camera_params.json: camera \d+: its 64x48 video is not"):
        NersembleDataset(tmp_path).cameras(SUBJECT)


@pytest.mark.parametrize("defect", ["other_resolution", "focal"])
def test_benchmark_intrinsics_that_do_not_fit_the_video_are_refused(tmp_path, defect):
    """Per-serial K computed for another resolution (here 2x) or with an implausible focal length is refused,
    naming the file and the camera, instead of giving wrong crops and pose maps."""
    cameras = _rig()
    camera = cameras[SERIALS[1]]
    if defect == "other_resolution":
        K = camera.resized(2 * camera.width, 2 * camera.height).K
        match = "principal point .* lies outside the central half of the 48x64 image"
    else:
        K = camera.K * [[0.05], [0.05], [1]] + [[0, 0, 0], [0, 0, 0], [0, 0, 0]]
        K[:2, 2] = camera.K[:2, 2]
        match = "focal length fx=.* is implausible for a 48x64 image"
    cameras[SERIALS[1]] = Camera(camera.world_to_cam, K, camera.width, camera.height)
    _write(tmp_path, cameras=cameras)
    with pytest.raises(NersembleError, match=rf"camera_params.json: camera {SERIALS[1]}: .*{match}"):
        NersembleDataset(tmp_path).cameras(SUBJECT)


def test_tracking_npz_names_shapes_and_values(root):
    path = _sequence_dir(root) / "tracking" / TRACKING_V2
    params = _params()
    with np.load(path) as npz:
        arrays = dict(npz)
    shapes = {name: array.shape for name, array in arrays.items()}
    assert shapes == {
        "shape": (1, 300),
        "expression": (N_FRAMES, 100),
        "rotation": (N_FRAMES, 3),
        "rotation_matrices": (N_FRAMES, 3, 3),
        "translation": (N_FRAMES, 3),
        "jaw": (N_FRAMES, 3),
        "neck": (N_FRAMES, 3),
        "eyes": (N_FRAMES, 6),
        "scale": (1, 1),
        "frames": (N_FRAMES,),
    }
    np.testing.assert_array_equal(arrays["shape"][:, :N_SHAPE], params.shape[:1].numpy())
    assert not arrays["shape"][:, N_SHAPE:].any() and not arrays["expression"][:, N_EXPR:].any()
    np.testing.assert_array_equal(arrays["expression"][:, :N_EXPR], params.expression.numpy())
    np.testing.assert_array_equal(arrays["frames"], np.arange(N_FRAMES))
    for t in range(N_FRAMES):
        np.testing.assert_allclose(
            arrays["rotation_matrices"][t],
            Rotation.from_euler("XYZ", arrays["rotation"][t]).as_matrix(),
            atol=1e-6,
        )
    first = path.read_bytes()
    write_nersemble_tracking(path, params, np.arange(N_FRAMES))
    assert path.read_bytes() == first  # byte-identical rewrite (no zip timestamps)


def test_tracking_reads_back_exactly_and_refuses_truncation(root):
    written = _params()
    tracking = NersembleDataset(root, n_shape=N_SHAPE, n_expr=N_EXPR).tracking(SUBJECT, SEQUENCE)
    np.testing.assert_array_equal(tracking.frames, np.arange(N_FRAMES))
    for name in ("shape", "expression", "rotation", "neck", "jaw", "eyes", "translation", "scale"):
        assert torch.equal(getattr(tracking.params, name), getattr(written, name)), name
    full = NersembleDataset(root).tracking(SUBJECT, SEQUENCE).params
    assert full.shape.shape == (N_FRAMES, 300) and full.expression.shape == (N_FRAMES, 100)
    with pytest.raises(TrackingError, match="shape has 300 coefficients but the head model has 5"):
        NersembleDataset(root, n_shape=5, n_expr=3).tracking(SUBJECT, SEQUENCE)  # never silently truncated
    padded = NersembleDataset(root, n_shape=320).tracking(SUBJECT, SEQUENCE).params.shape
    assert (
        padded.shape == (N_FRAMES, 320)
        and torch.equal(padded[:, :300], full.shape)
        and not padded[:, 300:].any()
    )


def test_malformed_tracking_names_the_file(root):
    path = _sequence_dir(root) / "tracking" / TRACKING_V2
    with np.load(path) as npz:
        arrays = dict(npz)
    np.savez(path, **{**arrays, "jaw": arrays["jaw"][:, :2]})
    with pytest.raises(TrackingError, match="flame2023_tracking_v2.npz.*jaw"):
        NersembleDataset(root).tracking(SUBJECT, SEQUENCE)
    path.write_bytes(b"garbage")
    with pytest.raises(TrackingError, match="flame2023_tracking_v2.npz"):
        NersembleDataset(root).tracking(SUBJECT, SEQUENCE)


def test_frames_read_back(root):
    dataset = NersembleDataset(root, n_shape=N_SHAPE, n_expr=N_EXPR)
    written = _params()
    frames = list(dataset.frames(SUBJECT, SEQUENCE, SERIALS[1]))
    assert [f.frame for f in frames] == list(range(N_FRAMES))
    size = SIZES[SERIALS[1]]
    reference = _video(1, size).astype(np.float64)
    for f in frames:
        assert (f.subject, f.sequence, f.serial) == (SUBJECT, SEQUENCE, SERIALS[1])
        assert f.rgb.dtype == np.uint8 and f.rgb.shape == (size[1], size[0], 3)
        mse = np.mean((f.rgb - reference[f.frame]) ** 2)
        assert 10 * np.log10(255**2 / mse) > 35
        assert f.alpha.dtype == np.float32 and np.mean(np.abs(f.alpha - _alpha(size)[0] / 255.0)) < 0.02
        assert f.camera == dataset.cameras(SUBJECT)[SERIALS[1]]
        assert torch.equal(f.flame.expression, written.expression[f.frame : f.frame + 1])
    assert len(list(dataset.iter_frames())) == N_FRAMES * len(SERIALS)
    only = list(dataset.iter_frames(serials=[SERIALS[0]]))
    assert {f.serial for f in only} == {SERIALS[0]} and len(only) == N_FRAMES


def test_frames_carry_their_colour_matrix_and_tracking_kind(root):
    ccm = np.array([[0.9, 0.05, 0.0, 0.02], [0.0, 1.1, 0.0, -0.03], [0.1, 0.0, 0.8, 0.0]])
    write_color_calibration(root / SUBJECT / "calibration" / "color_calibration.json", {SERIALS[0]: ccm})
    dataset = NersembleDataset(root, n_shape=N_SHAPE, n_expr=N_EXPR)
    first = next(dataset.frames(SUBJECT, SEQUENCE, SERIALS[0]))
    np.testing.assert_array_equal(first.color_matrix, ccm)
    assert first.tracking_kind == "v2"
    assert next(dataset.frames(SUBJECT, SEQUENCE, SERIALS[1])).color_matrix is None  # uncalibrated camera


def test_missing_serial_names_video_and_calibration(tmp_path):
    rig = _rig()
    _write(tmp_path, cameras=rig)
    del rig[SERIALS[2]]
    write_camera_params(tmp_path / SUBJECT / "calibration" / "camera_params.json", rig)
    with pytest.raises(NersembleError, match=rf"cam_{SERIALS[2]}\.mp4.*camera_params\.json"):
        list(NersembleDataset(tmp_path).iter_frames())


def test_truncated_video_names_the_file(root):
    path = _sequence_dir(root) / "images" / f"cam_{SERIALS[0]}.mp4"
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(NersembleError, match=f"cam_{SERIALS[0]}.mp4"):
        list(NersembleDataset(root).frames(SUBJECT, SEQUENCE, SERIALS[0]))


def test_frame_count_mismatch_names_the_file(root):
    write_video(
        _sequence_dir(root) / "images" / f"cam_{SERIALS[2]}.mp4", _video(2, SIZES[SERIALS[2]], N_FRAMES - 1)
    )
    with pytest.raises(NersembleError, match=f"images/cam_{SERIALS[2]}.mp4: frame-count mismatch"):
        list(NersembleDataset(root).frames(SUBJECT, SEQUENCE, SERIALS[0]))


def test_malformed_json_names_the_file(root):
    path = root / SUBJECT / "calibration" / "camera_params.json"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(NersembleError, match="camera_params.json.*malformed JSON"):
        NersembleDataset(root).cameras(SUBJECT)
    path.write_text(
        json.dumps({"world_2_cam": {SERIALS[0]: [[1, 0], [0, 1]]}, "intrinsics": np.eye(3).tolist()})
    )
    with pytest.raises(NersembleError, match=rf"camera_params.json.*world_2_cam\[{SERIALS[0]}\]"):
        NersembleDataset(root).cameras(SUBJECT)
    path.unlink()
    with pytest.raises(NersembleError, match="camera_params.json.*not found"):
        NersembleDataset(root).serials(SUBJECT)


def _write_at_rate(path, frames, rate: Fraction) -> None:
    """An H.264 video at a fractional frame rate, as the mono FLAME-avatar benchmark's 24.3 fps."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def test_frame_rate_comes_from_the_videos(root):
    """Before, evaluation scored NeRSemble ground truth at the --fps default (25) whatever the recording's rate."""
    from geodiff4d.eval.inputs import open_ground_truth

    for i, serial in enumerate(SERIALS):
        _write_at_rate(
            _sequence_dir(root) / "images" / f"cam_{serial}.mp4", _video(i, SIZES[serial]), Fraction(243, 10)
        )
    assert NersembleDataset(root).fps(SUBJECT, SEQUENCE) == pytest.approx(24.3)
    assert open_ground_truth(root).clip(SUBJECT, SEQUENCE, SERIALS[0]).fps == pytest.approx(24.3)
    write_video(
        _sequence_dir(root) / "images" / f"cam_{SERIALS[1]}.mp4", _video(1, SIZES[SERIALS[1]])
    )  # 25 fps
    with pytest.raises(NersembleError, match="cameras at different frame rates"):
        NersembleDataset(root).fps(SUBJECT, SEQUENCE)


def _tracking_rows(root, n_rows, frames):
    params = _params()[list(range(n_rows))]
    write_nersemble_tracking(_sequence_dir(root) / "tracking" / TRACKING_V2, params, frames)
    return params


def test_tracking_row_is_the_video_frame_as_the_official_provider_reads_it(root):
    """FlameProvider.get_vertices(t) poses row t for video frame t; a frames array saying otherwise (here rows
    for frames 1..3, which the old reader mapped through frames) is refused naming the file, never remapped."""
    _tracking_rows(root, N_FRAMES - 1, np.arange(1, N_FRAMES))
    with pytest.raises(TrackingError, match=rf"{TRACKING_V2}: frames is not 0..{N_FRAMES - 2}"):
        NersembleDataset(root).tracking(SUBJECT, SEQUENCE)
    written = _tracking_rows(root, N_FRAMES - 1, None)  # rows 0..T-2: the last video frame is untracked
    dataset = NersembleDataset(root, n_shape=N_SHAPE, n_expr=N_EXPR)
    frames = list(dataset.frames(SUBJECT, SEQUENCE, SERIALS[0]))
    assert frames[-1].flame is None
    for f in frames[:-1]:
        assert torch.equal(f.flame.expression, written.expression[f.frame : f.frame + 1])


def test_more_tracking_rows_than_video_frames_are_refused(root):
    params = FlameParams.cat([_params(), _params()[[0]]])
    write_nersemble_tracking(_sequence_dir(root) / "tracking" / TRACKING_V2, params)
    with pytest.raises(NersembleError, match=f"{TRACKING_V2}: {N_FRAMES + 1} tracked frames, more than"):
        NersembleDataset(root).tracking(SUBJECT, SEQUENCE)

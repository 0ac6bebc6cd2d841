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
N_FRAMES, WIDTH, HEIGHT, N_SHAPE, N_EXPR = 4, 64, 48, 20, 10
SUBJECT, SEQUENCE = "017", "EXP-1-head"


def _rig():
    rig = nersemble_rig(width=WIDTH, height=HEIGHT, focal=90.0)
    return {serial: rig[serial] for serial in SERIALS}


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


def _video(seed, n_frames=N_FRAMES):
    v, u = np.mgrid[0:HEIGHT, 0:WIDTH] / np.array([HEIGHT, WIDTH])[:, None, None]
    frames = [np.stack([u, v, 0.5 + 0.3 * np.sin(5 * u + t + seed)], -1) for t in range(n_frames)]
    return np.rint(np.stack(frames) * 255).astype(np.uint8)


def _alpha(n_frames=N_FRAMES):
    v, u = np.mgrid[0:HEIGHT, 0:WIDTH]
    disc = (u - WIDTH / 2) ** 2 + (v - HEIGHT / 2) ** 2 < (HEIGHT / 3) ** 2
    return np.repeat(disc[None] * np.uint8(255), n_frames, axis=0)


def _sequence_dir(root):
    return root / SUBJECT / "sequences" / SEQUENCE


def _write(root, variant="benchmark", cameras=None):
    cameras = cameras or _rig()
    write_camera_params(root / SUBJECT / "calibration" / "camera_params.json", cameras, variant=variant)
    for i, serial in enumerate(SERIALS):
        write_video(_sequence_dir(root) / "images" / f"cam_{serial}.mp4", _video(i))
        write_video(_sequence_dir(root) / "alpha_maps" / f"cam_{serial}.mp4", _alpha())
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
        assert (read[serial].width, read[serial].height) == (WIDTH, HEIGHT)


@pytest.mark.parametrize("variant", ["raw", "benchmark"])
def test_camera_params_round_trip(tmp_path, variant):
    cameras = _rig()
    if variant == "benchmark":  # per-serial intrinsics must survive, so make one differ
        camera = cameras[SERIALS[1]]
        cameras[SERIALS[1]] = Camera(camera.world_to_cam, camera.K * [[1.1], [1.1], [1]], WIDTH, HEIGHT)
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
    cameras = _rig()
    camera = cameras[SERIALS[0]]
    cameras[SERIALS[0]] = Camera(camera.world_to_cam, camera.K * [[2], [2], [1]], WIDTH, HEIGHT)
    with pytest.raises(ValueError, match="shared intrinsics"):
        write_camera_params(tmp_path / "camera_params.json", cameras, variant="raw")


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
    reference = _video(1).astype(np.float64)
    for f in frames:
        assert (f.subject, f.sequence, f.serial) == (SUBJECT, SEQUENCE, SERIALS[1])
        assert f.rgb.dtype == np.uint8 and f.rgb.shape == (HEIGHT, WIDTH, 3)
        mse = np.mean((f.rgb - reference[f.frame]) ** 2)
        assert 10 * np.log10(255**2 / mse) > 35
        assert f.alpha.dtype == np.float32 and np.mean(np.abs(f.alpha - _alpha()[0] / 255.0)) < 0.02
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
    write_video(_sequence_dir(root) / "images" / f"cam_{SERIALS[2]}.mp4", _video(2, n_frames=N_FRAMES - 1))
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
        _write_at_rate(_sequence_dir(root) / "images" / f"cam_{serial}.mp4", _video(i), Fraction(243, 10))
    assert NersembleDataset(root).fps(SUBJECT, SEQUENCE) == pytest.approx(24.3)
    assert open_ground_truth(root).clip(SUBJECT, SEQUENCE, SERIALS[0]).fps == pytest.approx(24.3)
    write_video(_sequence_dir(root) / "images" / f"cam_{SERIALS[1]}.mp4", _video(1))  # 25 fps
    with pytest.raises(NersembleError, match="cameras at different frame rates"):
        NersembleDataset(root).fps(SUBJECT, SEQUENCE)

"""MP4 and EXR I/O: round trips, determinism and errors that name the file."""

import av
import cv2
import numpy as np
import pytest

from geodiff4d.core.io.exr import ExrError, read_exr, write_exr
from geodiff4d.core.io.video import (
    DecodeCount,
    VideoError,
    iter_video_range,
    read_video,
    video_frame_count,
    video_size,
    write_video,
)


def _frames(n=6, height=48, width=64):
    """Smooth moving colour gradients with a bright disc: video-like content."""
    v, u = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    frames = []
    for t in range(n):
        disc = ((u - 0.3 - 0.05 * t) ** 2 + (v - 0.5) ** 2) < 0.04
        rgb = np.stack([u, v, 0.5 + 0.4 * np.sin(6 * u + t)], axis=-1) * 0.8 + 0.2 * disc[..., None]
        frames.append(np.rint(rgb * 255).clip(0, 255))
    return np.stack(frames).astype(np.uint8)


def _psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / mse)


def test_video_round_trip(tmp_path):
    frames = _frames()
    path = tmp_path / "cam_000.mp4"
    write_video(path, frames)
    assert video_frame_count(path) == len(frames)
    assert video_size(path) == (64, 48)
    decoded = read_video(path)
    assert decoded.shape == frames.shape and decoded.dtype == np.uint8
    assert _psnr(decoded, frames) > 35.0


def test_gray_video_round_trip(tmp_path):
    alpha = (_frames()[..., 0] > 120).astype(np.uint8) * 255
    path = tmp_path / "alpha.mp4"
    write_video(path, alpha)
    decoded = read_video(path, gray=True)
    assert decoded.shape == alpha.shape
    assert np.mean(np.abs(decoded.astype(int) - alpha)) < 3.0
    assert ((decoded > 127) == (alpha > 127)).mean() > 0.99


def test_video_is_byte_identical_for_identical_frames(tmp_path):
    frames = _frames()
    write_video(tmp_path / "a.mp4", frames)
    first = (tmp_path / "a.mp4").read_bytes()
    for repeat in range(6):  # x264 nondeterminism showed up only on some repeats, so repeat
        write_video(tmp_path / "b.mp4", frames.copy())
        assert (tmp_path / "b.mp4").read_bytes() == first, f"repeat {repeat}"
    write_video(tmp_path / "c.mp4", frames[::-1].copy())
    assert (tmp_path / "a.mp4").read_bytes() != (tmp_path / "c.mp4").read_bytes()


def test_video_rejects_odd_sizes_and_wrong_dtype(tmp_path):
    with pytest.raises(VideoError, match="odd.mp4.*even"):
        write_video(tmp_path / "odd.mp4", np.zeros((2, 31, 64, 3), np.uint8))
    with pytest.raises(VideoError, match="float.mp4.*uint8"):
        write_video(tmp_path / "float.mp4", np.zeros((2, 32, 64, 3), np.float32))
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("keep", [0.5, 0.97, 0.0])
def test_truncated_or_corrupt_video_names_the_file(tmp_path, keep):
    path = tmp_path / "cam_222200037.mp4"
    write_video(path, _frames())
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(VideoError, match="cam_222200037.mp4"):
        read_video(path)


def test_truncated_faststart_video_names_the_file(tmp_path):
    """With the index first (moov before mdat, as many released videos have), truncation hits the decoder."""
    import av

    source, faststart = tmp_path / "plain.mp4", tmp_path / "cam_faststart.mp4"
    write_video(source, _frames(12))
    with av.open(str(source)) as src, av.open(str(faststart), "w", options={"movflags": "+faststart"}) as dst:
        stream = dst.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                dst.mux(packet)
    data = faststart.read_bytes()
    assert data[:64].find(b"moov") > 0
    np.testing.assert_array_equal(read_video(faststart), read_video(source))
    faststart.write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(VideoError, match="cam_faststart.mp4: corrupt video after"):
        read_video(faststart)


def test_missing_video_names_the_file(tmp_path):
    with pytest.raises(VideoError, match="nothing.mp4"):
        video_frame_count(tmp_path / "nothing.mp4")


def test_exr_round_trip_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    depth = rng.uniform(30.0, 200.0, size=(12, 20)).astype(np.float32)
    depth[0, :3] = 65504.0
    normal = rng.normal(size=(12, 20, 3)).astype(np.float32)
    write_exr(tmp_path / "d.exr", depth)
    write_exr(tmp_path / "n.exr", normal)
    back = read_exr(tmp_path / "d.exr")
    assert back.dtype == np.float32 and back.shape == depth.shape
    np.testing.assert_array_equal(back, depth)
    np.testing.assert_array_equal(read_exr(tmp_path / "n.exr"), normal)
    write_exr(tmp_path / "z.exr", depth, channels="Z")
    np.testing.assert_array_equal(read_exr(tmp_path / "z.exr"), depth)


def test_exr_half_storage(tmp_path):
    depth = np.array([[1.0, 2.5], [65504.0, 0.1]], np.float32)
    write_exr(tmp_path / "h.exr", depth, half=True)
    np.testing.assert_array_equal(read_exr(tmp_path / "h.exr"), depth.astype(np.float16).astype(np.float32))


def test_exr_errors_name_the_file(tmp_path):
    bad = tmp_path / "broken.exr"
    bad.write_bytes(b"\x76\x2f\x31\x01garbage")
    with pytest.raises(ExrError, match="broken.exr"):
        read_exr(bad)
    with pytest.raises(ExrError, match="absent.exr"):
        read_exr(tmp_path / "absent.exr")
    write_exr(tmp_path / "n.exr", np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ExrError, match="n.exr.*missing channel"):
        read_exr(tmp_path / "n.exr", channels=["X"])


@pytest.mark.parametrize("keyframe_interval", [None, 7])
def test_frame_ranges_seek_and_match_a_full_decode(tmp_path, keyframe_interval):
    """Any window equals the same frames of a full decode; with short GOPs it decodes little before the window."""
    frames = _frames(n=40, height=32, width=48)
    path = tmp_path / "cam.mp4"
    write_video(path, frames, keyframe_interval=keyframe_interval)
    full = read_video(path)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        keyframes = [round(p.pts * stream.time_base * 25) for p in container.demux(stream) if p.is_keyframe]
    assert keyframes[0] == 0 and (not keyframe_interval or keyframes == list(range(0, 40, keyframe_interval)))
    for start, stop in [(0, 40), (0, 1), (13, 14), (21, 40), (39, 40), (8, 30)]:
        count = DecodeCount()
        window = list(iter_video_range(path, start, stop, threads=1 + (start % 2), count=count))
        assert [i for i, _ in window] == list(range(start, stop))
        assert all(np.array_equal(image, full[i]) for i, image in window)
        # decoding starts at the keyframe at or before `start`
        assert count.frames == stop - max(k for k in keyframes if k <= start)
    with pytest.raises(VideoError, match=str(path)):
        list(iter_video_range(path, 35, 41))


def test_seek_windows_equal_an_opencv_decode_from_frame_0(tmp_path):
    """The seek path packing uses (start > 0) against an independent decoder: OpenCV reading every frame from
    frame 0, as the official NeRSemble data managers decode (RGB from its BGR)."""
    frames = _frames(n=30, height=32, width=48)
    path = tmp_path / "cam.mp4"
    write_video(path, frames, keyframe_interval=6)
    capture = cv2.VideoCapture(str(path))
    opencv = []
    while (image := capture.read()[1]) is not None:
        opencv.append(cv2.cvtColor(image, cv2.COLOR_BGR2RGB))
    capture.release()
    assert len(opencv) == 30
    for start, stop in [(1, 4), (5, 7), (6, 13), (17, 30), (29, 30)]:
        window = list(iter_video_range(path, start, stop))
        assert [i for i, _ in window] == list(range(start, stop))
        for i, image in window:
            np.testing.assert_array_equal(image, opencv[i], err_msg=f"frame {i} of window [{start}, {stop})")

"""core/io: JSON/YAML files (one error naming the file, atomic layout-preserving writes), the float <-> image
conversion, checked against scikit-image's own conversions, and video metadata, checked against OpenCV's reader."""

import av
import cv2
import numpy as np
import pytest
import torch
from skimage.util import img_as_float32, img_as_ubyte, img_as_uint

from geodiff4d.core.errors import UserError
from geodiff4d.core.io.images import decode_image, encode_png, from_float, to_float
from geodiff4d.core.io.json_yaml import (
    DataFileError,
    json_bytes,
    read_json,
    read_yaml,
    write_json,
    write_yaml,
)
from geodiff4d.core.io.tensors import image_to_tensor, tensor_to_image
from geodiff4d.core.io.video import read_video, video_fps, video_frame_count, video_size, write_video


def test_json_reads_name_the_file_and_take_a_stage_error(tmp_path):
    with pytest.raises(DataFileError, match=r"missing\.json: JSON file not found"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"a": ')
    with pytest.raises(DataFileError, match=r"bad\.json: malformed JSON"):
        read_json(tmp_path / "bad.json")

    class StageError(UserError):
        pass

    with pytest.raises(StageError, match=r"bad\.json"):
        read_json(tmp_path / "bad.json", StageError)


def test_json_writes_keep_each_callers_layout(tmp_path):
    data = {"b": [1, 2.5], "a": {"z": None}}
    assert json_bytes(data) == b'{\n "a": {\n  "z": null\n },\n "b": [\n  1,\n  2.5\n ]\n}'
    assert json_bytes(data, indent=None, sort_keys=True) == b'{"a": {"z": null}, "b": [1, 2.5]}'
    assert json_bytes(data, indent=2, sort_keys=False, newline=True).startswith(b'{\n  "b"')
    assert json_bytes(data, indent=2, sort_keys=False, newline=True).endswith(b"}\n")
    write_json(tmp_path / "sub" / "x.json", data, indent=2, sort_keys=False, newline=True)
    assert read_json(tmp_path / "sub" / "x.json") == data
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.json"]


def test_yaml_round_trip_in_insertion_order_and_errors_name_the_file(tmp_path):
    write_yaml(tmp_path / "c.yaml", {"steps": 3, "model": {"latents": "pixel"}})
    assert (tmp_path / "c.yaml").read_text() == "steps: 3\nmodel:\n  latents: pixel\n"
    assert read_yaml(tmp_path / "c.yaml") == {"steps": 3, "model": {"latents": "pixel"}}
    (tmp_path / "bad.yaml").write_text("steps: [1, 2\n")
    with pytest.raises(DataFileError, match=r"bad\.yaml: malformed YAML"):
        read_yaml(tmp_path / "bad.yaml")


def test_float_image_conversion_matches_scikit_image():
    rng = np.random.default_rng(1)
    image = rng.uniform(0, 1, (40, 30, 3)).astype(np.float32)
    image.flat[:255] = (np.arange(255, dtype=np.float32) + 0.5) / 255  # exact half steps: round half to even
    assert np.array_equal(from_float(image), img_as_ubyte(image))
    assert np.array_equal(from_float(image, np.uint16), img_as_uint(image))
    assert np.array_equal(from_float(image * 1.5 - 0.25), img_as_ubyte(np.clip(image * 1.5 - 0.25, 0, 1)))
    stored = rng.integers(0, 65536, (8, 6), dtype=np.uint16)
    # scikit-image multiplies by 1/max where we divide by max (what every file reader here has always done)
    np.testing.assert_array_max_ulp(to_float(stored), img_as_float32(stored), maxulp=1)
    np.testing.assert_array_max_ulp(
        to_float(img_as_ubyte(image)), img_as_float32(img_as_ubyte(image)), maxulp=1
    )


def test_rounding_modes_and_the_png_round_trip():
    steps = np.array([0.5, 1.5, 2.5, 254.7, 255.2], np.float32) / 255
    assert from_float(steps).tolist() == [0, 2, 2, 255, 255]  # half to even
    assert from_float(steps, rounding="half_up").tolist() == [1, 2, 3, 255, 255]
    assert from_float(steps, rounding="truncate").tolist() == [0, 1, 2, 254, 255]
    image = np.random.default_rng(2).integers(0, 65536, (16, 12, 3), dtype=np.uint16)
    assert np.array_equal(from_float(to_float(decode_image(encode_png(image))), np.uint16), image)


def test_tensors_are_channel_first_and_files_channel_last():
    video = np.random.default_rng(3).integers(0, 256, (4, 10, 8, 3), dtype=np.uint8)  # [T, H, W, C]
    tensor = image_to_tensor(video)
    assert tensor.shape == (4, 3, 10, 8) and tensor.dtype == torch.float32
    assert torch.equal(tensor[2, 1], torch.from_numpy(video[2, ..., 1] / np.float32(255)))
    assert np.array_equal(tensor_to_image(tensor), video)
    assert np.array_equal(tensor_to_image(tensor[0].requires_grad_()), video[0])  # detached, as files are


def test_video_fps_is_read_from_the_container(tmp_path):
    frames = np.random.default_rng(4).integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    write_video(tmp_path / "clip.mp4", frames, fps=30)
    assert video_fps(tmp_path / "clip.mp4") == 30.0
    assert read_video(tmp_path / "clip.mp4").shape == frames.shape


def _write_with_b_frames(path, frames, fps):
    """An x264 stream with B-frames (reordered: decode order differs from display order), in mp4 or Matroska."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"bframes": "3", "g": "12"})
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


@pytest.mark.parametrize("name", ["ours.mp4", "b_frames.mp4", "b_frames.mkv"])
def test_video_metadata_read_without_decoding_agrees_with_opencv(tmp_path, name):
    """Frame count, size and rate come from a header-only open (its probe decodes no frame): OpenCV's own FFmpeg
    reader, which probes by decoding, must see the same video. Matroska records no frame count (packets are
    counted)."""
    frames = np.random.default_rng(5).integers(0, 256, (30, 36, 52, 3), dtype=np.uint8)  # [T, H, W, 3]
    path = tmp_path / name
    if name == "ours.mp4":
        write_video(path, frames, fps=24, keyframe_interval=8)
    else:
        _write_with_b_frames(path, frames, fps=24)
    capture = cv2.VideoCapture(str(path))
    try:
        decoded = 0
        while capture.grab():
            decoded += 1
        expected = (
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
            capture.get(cv2.CAP_PROP_FPS),
        )
    finally:
        capture.release()
    assert decoded == len(frames) == video_frame_count(path)
    assert (*video_size(path), video_fps(path)) == expected == (52, 36, 24.0)

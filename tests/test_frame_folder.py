"""Frame folders: export from a procedural NeRSemble folder reproduces its frames, masks, GT normals, cameras
and tracking exactly; written frames read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geodiff4d.datasets.flame_tracking import TRACKING_V2
from geodiff4d.datasets.frame_folder import (
    FrameFolderError,
    export_frame_folder,
    read_cameras,
    read_frames,
    tracking_path,
    write_frame,
)
from geodiff4d.datasets.nersemble import NersembleDataset
from geodiff4d.datasets.normal_maps import decode_normal_png
from geodiff4d.datasets.procedural import SynthSpec, gt_normal_path, synthesize


@pytest.fixture(scope="module")
def procedural(tmp_path_factory, local_ray):
    out = tmp_path_factory.mktemp("synth")
    synthesize(
        out,
        SynthSpec(subjects=1, sequences=1, frames=2, cameras=2, resolution=32, synthetic=0),
        workers=1,
        progress=False,
    )
    return out / "nersemble"


def test_export_matches_the_nersemble_source(procedural, tmp_path):
    root = tmp_path / "frames"
    assert export_frame_folder(procedural, root) == ["001"]
    dataset = NersembleDataset(procedural)
    sequence = dataset.sequences("001")[0]
    assert read_cameras(root / "cameras" / "001" / f"{sequence}.json") == dataset.cameras("001", sequence)
    source_tracking = dataset.sequence_dir("001", sequence) / "tracking" / TRACKING_V2
    assert tracking_path(root, "001", sequence).read_bytes() == source_tracking.read_bytes()
    images = {(im.camera, im.frame): im for im in read_frames(root, "001", sequence)}
    sources = list(dataset.iter_frames(["001"]))
    assert len(images) == len(sources) == 4
    for frame in sources:
        image = images[(frame.serial, frame.frame)]
        np.testing.assert_array_equal(np.rint(image.rgb * 255).astype(np.uint8), frame.rgb)
        np.testing.assert_allclose(image.mask, np.rint(frame.alpha * 255) / 255, atol=1e-6)
        truth, _ = decode_normal_png(gt_normal_path(procedural, "001", sequence, frame.serial, frame.frame))
        np.testing.assert_array_equal(image.normal, truth)


def test_write_frame_round_trip_and_errors(tmp_path):
    rgb = torch.rand(3, 6, 5)
    alpha = torch.zeros(6, 5)
    alpha[1:4] = 1.0
    normal = torch.nn.functional.normalize(torch.randn(3, 6, 5), dim=0)
    write_frame(tmp_path, "s", "SEQ", "cam", 3, rgb, alpha, normal)
    (image,) = read_frames(tmp_path, "s", "SEQ")
    assert (image.camera, image.frame) == ("cam", 3)
    np.testing.assert_allclose(image.rgb, rgb.permute(1, 2, 0).numpy(), atol=0.5 / 255 + 1e-6)
    np.testing.assert_array_equal(image.mask, alpha.numpy())
    inside = alpha.numpy() > 0.5
    np.testing.assert_allclose(image.normal[inside], normal.permute(1, 2, 0).numpy()[inside], atol=1e-4)
    assert (image.normal[~inside] == 0).all()
    with pytest.raises(FrameFolderError, match="SEQ2"):
        read_frames(tmp_path, "s", "SEQ2")


def test_a_tar_frame_folder_reads_like_its_png_folder(tmp_path):
    """Tars of a PNG folder's bytes (written as generate --format tar writes them) read back frame for frame; the
    index's offsets agree with Python's tarfile, and the same members give the same tar bytes in any order."""
    import tarfile

    from geodiff4d.datasets.frame_folder import iter_frames, sequence_index, sequences, subjects
    from geodiff4d.datasets.frame_tars import TarFrames, member_name, write_unit_tar

    rng, png, tars = np.random.default_rng(0), tmp_path / "png", tmp_path / "tars"
    for camera in ("c0", "c1"):
        for frame in (0, 1, 2):
            normal = torch.nn.functional.normalize(
                torch.from_numpy(rng.normal(size=(3, 8, 8))).float(), dim=0
            )
            write_frame(png, "s0", "SEQ", camera, frame, torch.rand(3, 8, 8), torch.rand(8, 8), normal)
    for frames, unit in (((0, 1), "s0.f00000-00002.c000"), ((2,), "s0.f00002-00003.c000")):
        members = {
            member_name(camera, frame, part): (
                png / part / "s0/SEQ" / camera / f"{frame:05d}.png"
            ).read_bytes()
            for camera in ("c0", "c1")
            for frame in frames
            for part in ("rgb", "mask", "normal")
        }
        path = write_unit_tar(tars, "s0", "SEQ", unit, members)
        first = path.read_bytes()
        write_unit_tar(tars, "s0", "SEQ", unit, dict(reversed(members.items())))
        assert path.read_bytes() == first
        with tarfile.open(path) as tar:
            assert {m.name: tar.extractfile(m).read() for m in tar.getmembers()} == members
    assert subjects(tars) == subjects(png) == ["s0"] and sequences(tars, "s0") == ["SEQ"]
    assert sequence_index(tars, "s0", "SEQ") == sequence_index(png, "s0", "SEQ") == (["c0", "c1"], [0, 1, 2])
    assert sequence_index(tars, "s0", "SEQ", ["c1"]) == (["c1"], [0, 1, 2])
    for a, b in zip(iter_frames(png, "s0", "SEQ"), iter_frames(tars, "s0", "SEQ"), strict=True):
        assert (a.camera, a.frame) == (b.camera, b.frame)
        assert (
            np.array_equal(a.rgb, b.rgb)
            and np.array_equal(a.mask, b.mask)
            and np.array_equal(a.normal, b.normal)
        )
    assert [i.frame for i in iter_frames(tars, "s0", "SEQ", ["c0"], frames={2})] == [2]
    assert (
        TarFrames(tars, "s0", "SEQ").read("c0", 0, "normal")
        == (png / "normal/s0/SEQ/c0/00000.png").read_bytes()
    )

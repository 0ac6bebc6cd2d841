"""Rasterizer throughput on the procedural head at 256 and 512 px, against a same-run reference.

Reference: OpenCV's painter's algorithm (``cv2.fillConvexPoly`` of every triangle, far to near, one Python
call per triangle) filling face indices: the straightforward CPU way to get a visibility buffer without a
z-buffer. Both produce the face-index image of the same camera; their silhouettes' IoU is printed as a sanity check
(cv2 fills every pixel a polygon touches, so per-pixel face indices differ along the many tiny triangles'
edges, and mean-depth ordering is wrong where triangles overlap in depth).

Run: ``.venv/bin/python bench/bench_rasterizer.py`` (well under a minute on 2 cores).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import cv2
import numpy as np
import torch

from geodiff4d.datasets.cameras import nersemble_rig
from geodiff4d.datasets.flame import FlameParams
from geodiff4d.datasets.procedural_head import procedural_head_model
from geodiff4d.datasets.rasterizer import rasterize
from geodiff4d.datasets.render import render_head

SECONDS_PER_MEASUREMENT = 2.0
SUBPIXEL_BITS = 4  # cv2 fixed-point vertex precision


def frames_per_second(step: Callable[[], object], seconds: float = SECONDS_PER_MEASUREMENT) -> float:
    step()  # warm-up
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count / (time.perf_counter() - start)


def painter_face_index(vertices_cam: np.ndarray, faces: np.ndarray, K: np.ndarray, size: int) -> np.ndarray:
    """Face-index image [H, W] by cv2 flat fills sorted far to near (-1 background)."""
    projected = vertices_cam @ K.T
    pixels = projected[:, :2] / projected[:, 2:3]
    fixed = np.round(pixels * (1 << SUBPIXEL_BITS)).astype(np.int32)[faces]  # [F, 3, 2]
    order = np.argsort(-vertices_cam[faces, 2].mean(axis=1), kind="stable")
    image = np.full((size, size), -1.0, dtype=np.float32)
    for face in order:
        cv2.fillConvexPoly(image, fixed[face], float(face), lineType=cv2.LINE_8, shift=SUBPIXEL_BITS)
    return image.astype(np.int64)


def main() -> None:
    model = procedural_head_model(seed=0)
    params = FlameParams.zeros(1, model.n_shape, model.n_expr)
    faces = model.faces
    vertices_world = model(params).vertices[0].detach()
    default_threads = torch.get_num_threads()
    print(f"procedural head: {model.n_vertices} vertices, {faces.shape[0]} triangles")
    for size in (256, 512):
        camera = nersemble_rig(width=size, height=size)["222200037"]
        world_to_cam = torch.tensor(camera.world_to_cam, dtype=torch.float32)
        vertices_cam = vertices_world @ world_to_cam[:3, :3].T + world_to_cam[:3, 3]
        K = torch.tensor(camera.K)
        vertices_np, faces_np = vertices_cam.double().numpy(), faces.numpy()
        reference = frames_per_second(lambda: painter_face_index(vertices_np, faces_np, camera.K, size))  # noqa: B023
        zbuffer = rasterize(vertices_cam, faces, K, size, size).face_index.numpy() >= 0
        painter = painter_face_index(vertices_np, faces_np, camera.K, size) >= 0
        iou = (zbuffer & painter).sum() / (zbuffer | painter).sum()
        print(
            f"{size:4d} px: cv2 painter reference {reference:6.1f} frames/s, silhouette IoU with ours {iou:.3f}"
        )
        # 2 threads degrade badly when other processes share the 2 cores, so both settings are shown
        for threads in sorted({default_threads, 1}, reverse=True):
            torch.set_num_threads(threads)
            ours = frames_per_second(lambda: rasterize(vertices_cam, faces, K, size, size))  # noqa: B023
            full = frames_per_second(lambda: render_head(model, params, camera), seconds=1.0)  # noqa: B023
            print(
                f"      {threads} thread(s): rasterize {ours:6.1f} frames/s (ratio to reference {ours / reference:5.2f}x)"
                f" | render_head (FLAME + normals + shading) {full:6.1f} frames/s"
            )
        torch.set_num_threads(default_threads)


if __name__ == "__main__":
    main()

"""Progress of one subject's fit: a bar (step, loss, PSNR of probe views every N steps) and TensorBoard
scalars with a preview image (render beside target), so that a fit of hours can be watched and judged early.

The probe is a held-out camera's views when the config holds one out (a real generalisation figure), else a
few training views (then the figure only says the fit is converging); the scalar's name says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from geodiff4d.core.progress import progress_bar
from geodiff4d.recon.fit import Fitter, View
from geodiff4d.recon.losses import psnr


class FitProgress:
    """``on_step(fitter, step, loss)`` after every step of a :class:`Fitter`; ``close()`` at the end."""

    def __init__(
        self,
        folder: Path,
        subject: str,
        total: int,
        initial: int,
        probe: Sequence[View],
        probe_name: str,
        every: int,
        enabled: bool = True,
    ):
        from torch.utils.tensorboard import SummaryWriter

        self.subject, self.total, self.every, self.probe, self.probe_name = (
            subject,
            total,
            every,
            probe,
            probe_name,
        )
        self.bar = progress_bar(total, f"recon {subject}", initial, enabled)
        self.writer = SummaryWriter(str(folder / "tensorboard"))
        self.last_psnr: float | None = None

    def on_step(self, fitter: Fitter, step: int, loss: float) -> None:
        self.bar.update(1)
        self.writer.add_scalar("train/loss", loss, step)
        if step % self.every and step != self.total:
            return
        with torch.no_grad():
            renders = [
                fitter.render(v.frame, v.world_to_cam, v.K, v.rgb.shape[-1], v.rgb.shape[-2]).rgb
                for v in self.probe
            ]
        self.last_psnr = float(
            np.mean([float(psnr(r, v.rgb)) for r, v in zip(renders, self.probe, strict=True)])
        )
        self.writer.add_scalar(f"psnr/{self.probe_name}", self.last_psnr, step)
        self.writer.add_scalar("train/gaussians", len(fitter.gaussians), step)
        preview = torch.cat([renders[0].clamp(0, 1), self.probe[0].rgb], dim=-1)  # [3, H, 2W] render | target
        self.writer.add_image("preview/render_target", preview, step)
        self.bar.set_description(
            f"recon {self.subject} loss {loss:.4f} PSNR({self.probe_name}) {self.last_psnr:.2f}"
        )

    def close(self) -> None:
        self.bar.close()
        self.writer.close()

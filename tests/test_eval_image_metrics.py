"""PSNR/SSIM against scikit-image on a real photo, and the masking semantics."""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from geodiff4d.eval.image_metrics import psnr, ssim


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    gt = skimage.data.astronaut()[::2, ::2].astype(np.float32) / 255  # [256, 256, 3]
    rng = np.random.default_rng(0)
    pred = np.clip(np.roll(gt, 2, axis=1) + rng.normal(0, 0.03, gt.shape), 0, 1).astype(np.float32)
    return pred, gt


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).permute(2, 0, 1)


def test_psnr_ssim_equal_skimage(pair):
    pred, gt = pair
    ref_psnr = peak_signal_noise_ratio(gt, pred, data_range=1)
    ref_ssim = structural_similarity(
        gt, pred, channel_axis=-1, data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert psnr(_t(pred), _t(gt)).item() == pytest.approx(ref_psnr, abs=1e-4)
    assert ssim(_t(pred), _t(gt)).item() == pytest.approx(ref_ssim, abs=1e-4)


def test_batched_equals_per_image(pair):
    pred, gt = pair
    batch_pred = torch.stack([_t(pred), _t(gt), _t(pred[::-1].copy())])
    batch_gt = torch.stack([_t(gt), _t(gt), _t(gt)])
    values = ssim(batch_pred, batch_gt)
    assert values[1].item() == pytest.approx(1.0, abs=1e-6)
    assert values[0].item() == pytest.approx(ssim(_t(pred), _t(gt)).item(), abs=1e-6)
    assert psnr(batch_pred, batch_gt)[1].item() == pytest.approx(100.0)  # floor of the identical case


def test_mask_ignores_background(pair):
    pred, gt = pair
    mask = np.zeros(gt.shape[:2], np.float32)
    mask[60:200, 70:190] = 1
    garbage = pred.copy()
    garbage[mask == 0] = 1 - garbage[mask == 0]  # ruin only the background
    m = torch.from_numpy(mask)
    assert psnr(_t(garbage), _t(gt), m).item() == pytest.approx(psnr(_t(pred), _t(gt), m).item(), abs=1e-5)
    # masked PSNR = PSNR of the foreground pixels alone
    fg = mask.astype(bool)
    ref = peak_signal_noise_ratio(gt[fg], pred[fg], data_range=1)
    assert psnr(_t(pred), _t(gt), m).item() == pytest.approx(ref, abs=1e-4)
    # masked SSIM = mean of scikit-image's full SSIM map over the foreground, away from the 5 px border
    _, full = structural_similarity(
        gt,
        pred,
        channel_axis=-1,
        data_range=1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        full=True,
    )
    ref_ssim = full.mean(axis=-1)[fg].mean()
    assert ssim(_t(pred), _t(gt), m).item() == pytest.approx(ref_ssim, abs=1e-4)
    assert psnr(_t(garbage), _t(gt)).item() < psnr(_t(pred), _t(gt)).item() - 5


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="mask shape"):
        psnr(torch.zeros(3, 16, 16), torch.zeros(3, 16, 16), torch.zeros(8, 8))
    with pytest.raises(ValueError, match="larger than 11x11"):
        ssim(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


def test_empty_mask_scores_nan_not_perfect(pair):
    from geodiff4d.eval.lpips_metric import LpipsMetric

    pred, gt = pair
    masks = torch.zeros(2, *gt.shape[:2])
    masks[1, 60:200, 70:190] = 1  # frame 0 has no foreground at all
    batch_pred, batch_gt = torch.stack([_t(gt), _t(pred)]), torch.stack([_t(gt), _t(gt)])
    for metric in (psnr, ssim):
        values = metric(batch_pred, batch_gt, masks)
        assert torch.isnan(values[0]) and torch.isfinite(values[1]), metric.__name__
    import lpips

    network = lpips.LPIPS(
        net="alex", pretrained=True, pnet_rand=True, verbose=False
    ).eval()  # random backbone
    values = LpipsMetric(network, "alex", None)(batch_pred, batch_gt, masks)
    assert torch.isnan(values[0]) and torch.isfinite(values[1])

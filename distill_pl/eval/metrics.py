"""Metrics of the evaluation report, on videos [B, 3, T, H, W] in [-1, 1] (pixel space).

- Paired fidelity: PSNR (dB, data range 2) and SSIM (torchmetrics, per frame), one value per
  video, against a reference video made from the same noise.
- Control fidelity: F1 between two edge maps with a pixel tolerance (:func:`edge_f1`).
- Distribution distance: the Fréchet distance between Gaussians fitted to two feature sets
  (:func:`gaussian_statistics`, :func:`frechet_distance`).
- Diversity: mean pairwise RMS distance between samples of one condition
  (:func:`mean_pairwise_rms`).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

DATA_RANGE = 2.0  # videos live in [-1, 1]


def _check_pair(pred: Tensor, target: Tensor) -> None:
    if pred.ndim != 5 or pred.shape != target.shape:
        raise ValueError(
            f"expected two videos [B, C, T, H, W] of one shape, got {list(pred.shape)} and {list(target.shape)}"
        )


def psnr_per_video(pred: Tensor, target: Tensor) -> Tensor:
    """PSNR in dB of each video [B, C, T, H, W] against ``target``: [B] (inf where equal)."""
    _check_pair(pred, target)
    return peak_signal_noise_ratio(
        pred.float(), target.float(), data_range=DATA_RANGE, reduction="none", dim=(1, 2, 3, 4)
    )


def ssim_per_video(pred: Tensor, target: Tensor) -> Tensor:
    """SSIM of each video against ``target``, the mean over its frames (Gaussian window
    11, sigma 1.5, torchmetrics' defaults): [B]."""
    _check_pair(pred, target)
    b, c, t, h, w = pred.shape
    frames = lambda v: v.float().transpose(1, 2).reshape(b * t, c, h, w)  # noqa: E731
    per_frame = structural_similarity_index_measure(
        frames(pred), frames(target), data_range=DATA_RANGE, reduction="none"
    )
    return per_frame.reshape(b, t).mean(dim=1)


def edges_from_control(control: Tensor) -> Tensor:
    """A control video [B, 3, T, H, W] (-1 = no edge, +1 = edge) -> bool edges [B, T, H, W]."""
    return control[:, 0] > 0


def _dilate(edges: Tensor, radius: int) -> Tensor:
    """Bool [N, H, W]: True within ``radius`` pixels (Chebyshev distance) of an edge."""
    if radius == 0:
        return edges
    size = 2 * radius + 1
    return F.max_pool2d(edges.float().unsqueeze(1), size, stride=1, padding=radius).squeeze(1) > 0


def edge_f1(pred: Tensor, reference: Tensor, tolerance: int = 1) -> Tensor:
    """F1 of the edge map ``pred`` against ``reference``, bool [B, T, H, W] -> [B].

    A predicted edge pixel is correct when a reference edge lies within ``tolerance``
    pixels of it (in x and in y, i.e. in its (2 tol + 1)^2 neighbourhood); a reference
    edge pixel is found when a predicted edge lies within ``tolerance`` of it. Counts are
    pooled over the frames of a video; precision = correct / predicted, recall = found /
    reference, F1 = 2 P R / (P + R). A video with no edges in either map scores 1, one
    with edges in only one of them scores 0.
    """
    if pred.shape != reference.shape or pred.ndim != 4:
        raise ValueError(
            f"expected two edge maps [B, T, H, W] of one shape, got {list(pred.shape)} and {list(reference.shape)}"
        )
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    b, t, h, w = pred.shape
    pred, reference = pred.bool().reshape(b * t, h, w), reference.bool().reshape(b * t, h, w)
    correct = (pred & _dilate(reference, tolerance)).reshape(b, -1).sum(1).double()
    found = (reference & _dilate(pred, tolerance)).reshape(b, -1).sum(1).double()
    n_pred = pred.reshape(b, -1).sum(1).double()
    n_ref = reference.reshape(b, -1).sum(1).double()
    precision = correct / n_pred.clamp(min=1)
    recall = found / n_ref.clamp(min=1)
    f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
    return torch.where((n_pred == 0) & (n_ref == 0), torch.ones_like(f1), f1)


def gaussian_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean [D] and unbiased covariance [D, D] of ``features`` [N, D], in float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need features [N >= 2, D], got {list(features.shape)}")
    x = features.double()
    return x.mean(0), torch.cov(x.T).reshape(x.shape[1], x.shape[1])


def _psd_sqrt(matrix: Tensor) -> Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues clamped at 0)."""
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def frechet_distance(mean1: Tensor, cov1: Tensor, mean2: Tensor, cov2: Tensor) -> float:
    """Fréchet (2-Wasserstein squared) distance between N(mean1, cov1) and N(mean2, cov2):
    ``|m1 - m2|^2 + tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2)``.

    The trace of the cross term is computed from the symmetric matrix
    ``C1^1/2 C2 C1^1/2`` (whose square root has the trace of ``(C1 C2)^1/2``), so rank-
    deficient covariances (fewer samples than dimensions) need no regulariser.
    """
    mean1, mean2, cov1, cov2 = (x.double() for x in (mean1, mean2, cov1, cov2))
    root1 = _psd_sqrt(cov1)
    cross = torch.linalg.eigvalsh(root1 @ cov2 @ root1).clamp(min=0).sqrt().sum()
    value = (mean1 - mean2).square().sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross
    return float(value.clamp(min=0))


def frechet_distance_to(features: Tensor, reference: tuple[Tensor, Tensor]) -> float:
    """Fréchet distance between a Gaussian fitted to ``features`` [N, D] and ``reference``
    (mean, covariance): :func:`frechet_distance` of :func:`gaussian_statistics`.

    With fewer samples than dimensions (N <= D, e.g. a few dozen frames of 1280-d features)
    the fitted covariance is ``C1 = Xc^T Xc / (N - 1)`` (``Xc`` the centred features) and the
    same value comes from N x N matrices: ``tr C1 = |Xc|^2 / (N - 1)`` and the eigenvalues of
    ``C1^1/2 C2 C1^1/2`` are, besides zeros, those of ``Xc C2 Xc^T / (N - 1)``; no D x D
    eigendecomposition is needed."""
    mean2, cov2 = (x.double() for x in reference)
    if features.ndim != 2 or features.shape[0] < 2 or features.shape[0] > features.shape[1]:
        return frechet_distance(*gaussian_statistics(features), mean2, cov2)
    x = features.double()
    mean1 = x.mean(0)
    centred = (x - mean1) / math.sqrt(x.shape[0] - 1)
    small = centred @ cov2 @ centred.T
    cross = torch.linalg.eigvalsh((small + small.T) / 2).clamp(min=0).sqrt().sum()
    value = (mean1 - mean2).square().sum() + centred.square().sum() + torch.trace(cov2) - 2 * cross
    return float(value.clamp(min=0))


def bootstrap_frechet_std(
    video_features: Tensor, reference: tuple[Tensor, Tensor], resamples: int = 10, seed: int = 0
) -> float:
    """Spread of :func:`frechet_distance_to` over the videos drawn: the standard deviation
    over ``resamples`` draws, with replacement, of as many videos as there are (all frames
    of a drawn video go in together). ``video_features``: [videos, frames, D]. The
    reference is held fixed. 0 when every video is the same."""
    if resamples < 2:
        raise ValueError(f"need at least 2 resamples, got {resamples}")
    g = torch.Generator().manual_seed(seed)
    n = video_features.shape[0]
    values = [
        frechet_distance_to(video_features[torch.randint(n, (n,), generator=g)].flatten(0, 1), reference)
        for _ in range(resamples)
    ]
    return float(torch.tensor(values, dtype=torch.float64).std())


def mean_pairwise_rms(samples: Tensor) -> float:
    """Mean over all pairs i < j of the RMS difference between ``samples[i]`` and
    ``samples[j]`` (any shape after the first dim): how different samples of one condition
    are. 0 for identical samples."""
    if samples.shape[0] < 2:
        raise ValueError(f"diversity needs at least 2 samples, got {samples.shape[0]}")
    flat = samples.double().reshape(samples.shape[0], -1)
    distances = [
        (flat[i] - flat[j]).square().mean().sqrt() for i, j in itertools.combinations(range(len(flat)), 2)
    ]
    return float(torch.stack(distances).mean())

"""The numbers jobs/measure.py reports, as plain torch / numpy (no model, no I/O).

    kernel_mmd(x, y)            domain alignment: MMD^2 with an RBF kernel between feature sets
                                (the toy CMMD; CMMD itself is this on CLIP embeddings, sigma 10, x1000)
    nearest_distances(x, y)     memorisation: each sample's distance to its nearest training image
    adherence(predicted, asked) prompt adherence: the fraction of samples whose prediction matches
    confusion_matrix / mean_iou label fidelity: mIoU of a segmentation against the conditioning mask
"""

from __future__ import annotations

import numpy as np
import torch


def pairwise_sq_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(n, m) squared Euclidean distances between rows of x (n, d) and y (m, d), in float64."""
    x, y = x.double(), y.double()
    d = (x * x).sum(1, keepdim=True) - 2 * x @ y.T + (y * y).sum(1)[None]
    return d.clamp_min(0)


def median_bandwidth(x: torch.Tensor) -> float:
    """The median heuristic: the median distance between distinct rows of x (n >= 2)."""
    d = pairwise_sq_distances(x, x).sqrt()
    off = d[~torch.eye(len(x), dtype=torch.bool)]
    return float(off.median()) if off.numel() else 1.0


def kernel_mmd(x: torch.Tensor, y: torch.Tensor, bandwidth: float | None = None) -> tuple[float, float]:
    """Unbiased MMD^2 between samples x (n, d) and y (m, d), n, m >= 2, with the RBF kernel
    k(a, b) = exp(-|a - b|^2 / (2 sigma^2)); sigma defaults to the median distance within y
    (the reference). Returns (mmd2, sigma). 0 in expectation when x and y share a distribution.
    """
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"kernel MMD needs at least 2 samples on each side, got {len(x)} and {len(y)}")
    sigma = median_bandwidth(y) if bandwidth is None else float(bandwidth)
    gamma = 1.0 / (2 * sigma * sigma)
    kxx = torch.exp(-gamma * pairwise_sq_distances(x, x))
    kyy = torch.exp(-gamma * pairwise_sq_distances(y, y))
    kxy = torch.exp(-gamma * pairwise_sq_distances(x, y))
    n, m = len(x), len(y)
    mmd2 = ((kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
            + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
            - 2 * kxy.mean())
    return float(mmd2), sigma


def nearest_distances(x: torch.Tensor, y: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of x (n, d): the Euclidean distance to its nearest row of y (m, d) and that row's index."""
    dists, index = [], []
    for start in range(0, len(x), chunk):
        d = pairwise_sq_distances(x[start:start + chunk], y)
        best, where = d.min(dim=1)
        dists.append(best.sqrt())
        index.append(where)
    return torch.cat(dists).float(), torch.cat(index)


def adherence(predicted, asked) -> float | None:
    """Fraction of positions where predicted == asked, over the positions where asked is not None
    (a prompt that does not say); None when no position counts."""
    pairs = [(p, a) for p, a in zip(predicted, asked) if a is not None]
    if not pairs:
        return None
    return sum(p == a for p, a in pairs) / len(pairs)


def confusion_matrix(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows = label class, columns = predicted class,
    over pixels whose label is not ignore_index. pred and label: integer arrays of one shape."""
    pred, label = np.asarray(pred).ravel().astype(np.int64), np.asarray(label).ravel().astype(np.int64)
    if pred.shape != label.shape:
        raise ValueError(f"prediction and label differ in size: {pred.size} vs {label.size} pixels")
    keep = label != ignore_index
    pred, label = pred[keep], label[keep]
    if label.size and (label.max() >= num_classes or label.min() < 0):
        raise ValueError(f"label ids must lie in 0..{num_classes - 1} or be {ignore_index}")
    pred = np.clip(pred, 0, num_classes - 1)
    return np.bincount(label * num_classes + pred, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(confusion: np.ndarray) -> tuple[float, np.ndarray]:
    """(mIoU, per-class IoU) from a confusion matrix: IoU = TP / (TP + FP + FN); a class with an
    empty union is NaN and left out of the mean (as mmsegmentation does)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
    return (float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")), iou

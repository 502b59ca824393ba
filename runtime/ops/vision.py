"""Image and detection operators: NonMaxSuppression, CenterCropPad, Col2Im."""
from __future__ import annotations

import itertools
from typing import Any, Dict, List, Optional

import numpy as np

from . import bounded, register

Attrs = Dict[str, Any]


def _corners(boxes: np.ndarray, center: bool) -> np.ndarray:
    """``[N, 4]`` boxes as ``(y_min, x_min, y_max, x_max)``."""
    if center:  # (x_center, y_center, width, height)
        x, y, w, h = boxes.T
        return np.stack([y - h / 2, x - w / 2, y + h / 2, x + w / 2], axis=1)
    y1, x1, y2, x2 = boxes.T  # either corner pair may come first
    return np.stack([np.minimum(y1, y2), np.minimum(x1, x2), np.maximum(y1, y2), np.maximum(x1, x2)], axis=1)


@register("NonMaxSuppression")
def non_max_suppression(attrs: Attrs, boxes: np.ndarray, scores: np.ndarray,
                        max_per_class: Optional[np.ndarray] = None, iou: Optional[np.ndarray] = None,
                        score_min: Optional[np.ndarray] = None) -> np.ndarray:
    """Greedy per-class NMS; rows ``[batch, class, box]`` in batch, class, then selection order.

    Boxes are taken by decreasing score (the lower index first on ties) above ``score_threshold``;
    a box is dropped when its IoU with an already kept one exceeds ``iou_threshold``. At most
    ``max_output_boxes_per_class`` (default 0: none) are kept per class.
    """
    limit = int(np.asarray(max_per_class).reshape(-1)[0]) if max_per_class is not None and max_per_class.size else 0
    iou_max = float(np.asarray(iou).reshape(-1)[0]) if iou is not None and iou.size else 0.0
    floor = float(np.asarray(score_min).reshape(-1)[0]) if score_min is not None and score_min.size else None
    picked: List[List[int]] = []
    for b in range(boxes.shape[0]):
        corners = _corners(boxes[b].astype(np.float64), bool(attrs.get("center_point_box", 0)))
        area = (corners[:, 2] - corners[:, 0]) * (corners[:, 3] - corners[:, 1])
        for c in range(scores.shape[1]):
            s = scores[b, c]
            order = np.argsort(-s.astype(np.float64), kind="stable")
            if floor is not None:
                order = order[s[order] > floor]
            kept: List[int] = []
            for i in order:
                if len(kept) >= limit:
                    break
                if kept:
                    k = np.asarray(kept)
                    h = np.minimum(corners[k, 2], corners[i, 2]) - np.maximum(corners[k, 0], corners[i, 0])
                    w = np.minimum(corners[k, 3], corners[i, 3]) - np.maximum(corners[k, 1], corners[i, 1])
                    inter = np.where((h > 0) & (w > 0), h * w, 0.0)
                    union = area[k] + area[i] - inter
                    with np.errstate(invalid="ignore", divide="ignore"):
                        overlap = np.where((area[k] > 0) & (area[i] > 0) & (union > 0), inter / union, 0.0)
                    if np.any(overlap > iou_max):
                        continue
                kept.append(int(i))
            picked.extend([b, c, i] for i in kept)
    return np.asarray(picked, dtype=np.int64).reshape(-1, 3)


@register("CenterCropPad")
def center_crop_pad(attrs: Attrs, x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """Crop or zero-pad each of ``axes`` (all by default) to the given size, centred."""
    sizes = [int(v) for v in shape.reshape(-1)]
    axes = [a % x.ndim for a in attrs.get("axes") or range(x.ndim)]
    out = np.zeros(bounded([sizes[axes.index(i)] if i in axes else n for i, n in enumerate(x.shape)], x.itemsize),
                   dtype=x.dtype)
    src, dst = [slice(None)] * x.ndim, [slice(None)] * x.ndim
    for a, target in zip(axes, sizes):
        n = x.shape[a]
        if target <= n:  # crop: the extra element (odd difference) is dropped at the end
            start = (n - target) // 2
            src[a] = slice(start, start + target)
        else:
            start = (target - n) // 2
            dst[a] = slice(start, start + n)
    out[tuple(dst)] = x[tuple(src)]
    return out


@register("Col2Im")
def col2im(attrs: Attrs, x: np.ndarray, image_shape: np.ndarray, block_shape: np.ndarray) -> np.ndarray:
    """Sum sliding blocks ``[N, C * prod(block), L]`` back into an image ``[N, C, *image_shape]``."""
    image = [int(v) for v in image_shape.reshape(-1)]
    block = [int(v) for v in block_shape.reshape(-1)]
    dims = len(image)
    dilations = attrs.get("dilations") or [1] * dims
    strides = attrs.get("strides") or [1] * dims
    pads = attrs.get("pads") or [0] * (2 * dims)
    padded = [n + pads[i] + pads[i + dims] for i, n in enumerate(image)]
    counts = [(p - (k - 1) * d - 1) // s + 1 for p, k, d, s in zip(padded, block, dilations, strides)]
    n, _, _ = x.shape
    channels = x.shape[1] // int(np.prod(block))
    cols = x.reshape([n, channels, int(np.prod(block))] + counts)
    y = np.zeros(bounded([n, channels] + padded, x.itemsize), dtype=x.dtype)
    for t, offset in enumerate(itertools.product(*(range(k) for k in block))):
        region = tuple(slice(o * d, o * d + (c - 1) * s + 1, s)
                       for o, d, c, s in zip(offset, dilations, counts, strides))
        y[(slice(None), slice(None)) + region] += cols[:, :, t]
    return y[(slice(None), slice(None)) + tuple(slice(pads[i], pads[i] + image[i]) for i in range(dims))]

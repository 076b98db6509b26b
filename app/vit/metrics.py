"""Validation metrics of the forecaster on a cp rank's patches: latitude-weighted RMSE per
channel (physical units) and anomaly correlation (ACC) per channel, summed over cp ranks.

Latitude of grid row y of H: 90 - (y + 0.5) * 180 / H degrees; weights cos(latitude) normalised to
mean 1 over the rows. Anomalies are taken against the training-set mean of each channel (0 in
normalised units), so ACC = sum(w p t) / sqrt(sum(w p^2) sum(w t^2)) on normalised fields.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist


def lat_weights(lat: int, device=None) -> torch.Tensor:
    """(lat,) cos-latitude weights with mean 1."""
    deg = 90.0 - (torch.arange(lat, dtype=torch.float64, device=device) + 0.5) * 180.0 / lat
    w = torch.cos(deg * math.pi / 180.0)
    return w / w.mean()


def patch_weights(lat: int, lon: int, patch: int, positions: torch.Tensor) -> torch.Tensor:
    """Weights of every element of the patches at global token ``positions`` (S,):
    (S, 1, p, p) broadcastable to (S, channels, p, p)."""
    w = lat_weights(lat, positions.device)
    rows = (positions // (lon // patch))[:, None] * patch + torch.arange(patch, device=positions.device)[None, :]
    return w[rows][:, None, :, None].expand(-1, 1, patch, patch)


class ForecastScore:
    """Accumulates weighted sums over samples; ``result`` all-reduces them over ``group``."""

    def __init__(self, channels: int, device):
        self.sums = torch.zeros(5, channels, dtype=torch.float64, device=device)
        self.samples = 0

    def add(self, pred: torch.Tensor, true: torch.Tensor, weights: torch.Tensor) -> None:
        """pred, true: (B, S, channels * p * p) normalised patches; weights (S, 1, p, p)."""
        b, s, _ = pred.shape
        p, t = (x.double().reshape(b, s, -1, *weights.shape[-2:]) for x in (pred, true))
        w = weights.double()
        for i, term in enumerate((w * (p - t) ** 2, w * p * t, w * p * p, w * t * t, w.expand_as(p))):
            self.sums[i] += term.sum(dim=(0, 1, 3, 4))
        self.samples += b

    def result(self, std: torch.Tensor, group) -> dict:
        """{"rmse": [per channel, physical units], "acc": [per channel]} over all cp ranks."""
        sums = self.sums.clone()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(sums, group=group)
        mse, pt, pp, tt, w = sums
        rmse = (mse / w).sqrt() * std.double().to(sums.device)
        acc = pt / (pp * tt).sqrt().clamp(min=1e-30)
        return {"rmse": rmse.tolist(), "acc": acc.tolist()}

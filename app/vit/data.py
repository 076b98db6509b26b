"""Reader for the climate layout: yearly HDF5 files with a dataset ``fields`` shaped
(time, channels, lat, lon) under DIR/train and DIR/valid, and per-channel statistics
DIR/stats/global_means.npy and global_stds.npy shaped (1, channels, 1, 1).

A sample is (fields at t, fields at t + 1) within one file, normalised by the statistics and cut
into p x p patches, row-major over the (lat / p, lon / p) patch grid. With context parallelism a
rank holds a contiguous range of patch tokens; it reads only the latitude band that covers them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(..., C, H, W) -> (..., (H/p) * (W/p), C * p * p), patches row-major, each (C, p, p)."""
    *lead, c, h, w = x.shape
    x = x.reshape(*lead, c, h // p, p, w // p, p)
    x = x.movedim(-4, -5).movedim(-2, -4)                    # (..., H/p, W/p, C, p, p)
    return x.reshape(*lead, (h // p) * (w // p), c * p * p)


def unpatchify(x: torch.Tensor, p: int, c: int, h: int, w: int) -> torch.Tensor:
    """Inverse of ``patchify``: (..., (H/p) * (W/p), C * p * p) -> (..., C, H, W)."""
    *lead, _, _ = x.shape
    x = x.reshape(*lead, h // p, w // p, c, p, p)
    x = x.movedim(-3, -5).movedim(-2, -3)                    # (..., C, H/p, p, W/p, p)
    return x.reshape(*lead, c, h, w)


def token_range(tokens: int, rank: int, world: int) -> tuple[int, int]:
    """The contiguous [start, end) of ``tokens`` that cp rank ``rank`` of ``world`` holds."""
    if tokens % world:
        raise ValueError(f"{tokens} tokens do not split evenly over {world} context-parallel ranks")
    n = tokens // world
    return rank * n, (rank + 1) * n


class ClimateData:
    """Samples of one split for one cp rank: ``sample(i)`` -> (input, target), each
    (tokens_local, channels * p * p) float32, normalised; ``next_batch`` walks a seeded shuffle
    (``state`` / ``load_state`` resume it)."""

    def __init__(self, root: str | Path, split: str, lat: int, lon: int, patch: int, channels: int,
                 cp_rank: int = 0, cp_world: int = 1, seed: int = 0):
        import h5py
        self.root, self.p, self.lat, self.lon, self.channels = Path(root), patch, lat, lon, channels
        self.files = sorted((self.root / split).glob("*.h5"))
        if not self.files:
            raise FileNotFoundError(f"no .h5 files under {self.root / split}")
        self.index = []
        for f in self.files:
            with h5py.File(f, "r") as h:
                shape = h["fields"].shape
            if tuple(shape[1:]) != (channels, lat, lon):
                raise ValueError(f"{f}: fields {tuple(shape)} do not match (time, {channels}, {lat}, {lon})")
            self.index += [(f, t) for t in range(shape[0] - 1)]
        stats = self.root / "stats"
        self.mean = np.load(stats / "global_means.npy").reshape(channels, 1, 1)
        self.std = np.load(stats / "global_stds.npy").reshape(channels, 1, 1)
        cols = lon // patch
        self.start, self.end = token_range((lat // patch) * cols, cp_rank, cp_world)
        self.row0, self.row1 = self.start // cols, (self.end - 1) // cols + 1   # patch rows to read
        self.skip = self.start - self.row0 * cols
        self.seed, self.epoch, self.pos = seed, 0, 0
        self._order = self._shuffle()
        self._open = {}

    def __len__(self) -> int:
        return len(self.index)

    def _fields(self, f: Path, t: int) -> np.ndarray:
        import h5py
        if f not in self._open:
            self._open[f] = h5py.File(f, "r")
        band = self._open[f]["fields"][t, :, self.row0 * self.p:self.row1 * self.p, :]
        return (band - self.mean) / self.std

    def sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        f, t = self.index[i]
        out = []
        for tt in (t, t + 1):
            band = torch.from_numpy(self._fields(f, tt).astype(np.float32))
            patches = patchify(band, self.p)
            out.append(patches[self.skip:self.skip + self.end - self.start])
        return out[0], out[1]

    def _shuffle(self) -> list[int]:
        return torch.randperm(len(self.index), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch)).tolist()

    def next_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(batch, tokens_local, patch_dim) inputs and targets."""
        xs, ys = [], []
        for _ in range(batch):
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            x, y = self.sample(self._order[self.pos])
            self.pos += 1
            xs.append(x)
            ys.append(y)
        return torch.stack(xs), torch.stack(ys)

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()

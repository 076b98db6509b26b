"""Write a synthetic climate-like dataset in the layout the ViT reads: coupled 2-D flow and tracers
integrated by a pseudo-spectral solver on a lat x lon grid.

    python app/vit/make_data.py OUT_DIR --lat 360 --lon 720 --steps-per-year 64 --years 3

Physics (doubly periodic domain 2*pi x 2*pi*lon/lat, so grid spacing is equal in both directions):

    vorticity    w_t + u.grad(w) = nu lap(w) - mu w + F(x, y) + g db/dx    (forced, damped, buoyancy torque)
    streamfunc.  lap(psi) = -w,  u = d(psi)/dy,  v = -d(psi)/dx
    buoyancy     b_t + u.grad(b) = kappa_b lap(b) - (b - B(y)) / tau_b
    tracers      c_t + u.grad(c) = kappa_i lap(c) - (c - S_i(x, y)) / tau_i   (i = 1 .. channels - 5)

Channels: u, v, w, psi, b, then the tracers (each relaxed to its own large-scale source pattern
with its own diffusivity and time scale), so the next state is a deterministic, learnable function
of the current one. Integration: Heun (RK2) for the advection with 2/3-rule dealiasing, exact
integrating factors for diffusion and damping, several sub-steps per saved step, after a spin-up.

Layout written (what app/vit/data.py reads):

    OUT_DIR/train/<year>.h5     dataset "fields", float32 (time, channels, lat, lon)
    OUT_DIR/valid/<year>.h5     the last year
    OUT_DIR/stats/global_means.npy, global_stds.npy    float32 (1, channels, 1, 1), from train
    OUT_DIR/meta.json           channel names, grid, time step, generator settings
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


class SpectralFlow:
    """State and right-hand sides of the coupled system on an (ny, nx) grid."""

    def __init__(self, ny: int, nx: int, tracers: int, seed: int):
        rng = np.random.default_rng(seed)
        self.ny, self.nx, self.tracers = ny, nx, tracers
        ly, lx = 2 * np.pi, 2 * np.pi * nx / ny
        y = np.arange(ny) * ly / ny
        x = np.arange(nx) * lx / nx
        self.Y, self.X = np.meshgrid(y, x, indexing="ij")
        ky = np.fft.fftfreq(ny, d=ly / ny / (2 * np.pi))
        kx = np.fft.rfftfreq(nx, d=lx / nx / (2 * np.pi))
        self.KY, self.KX = np.meshgrid(ky, kx, indexing="ij")
        self.K2 = self.KX ** 2 + self.KY ** 2
        self.inv_k2 = np.where(self.K2 > 0, 1.0 / np.where(self.K2 > 0, self.K2, 1.0), 0.0)
        self.dealias = ((np.abs(self.KY) < ny / 3) & (np.abs(self.KX) < nx / 3)).astype(float)
        dx = ly / ny
        self.nu = 2.0 * dx ** 2                                          # grid-scale viscosity
        self.mu = 0.05                                                   # linear drag
        self.g = 0.5                                                     # buoyancy torque
        self.forcing = 1.5 * (np.sin(4 * self.Y) * np.cos(2 * self.X * ny / nx)
                              + 0.5 * np.cos(3 * self.Y + 1.0))
        self.b_ref = np.cos(self.Y)                                      # warm "equator", cold "poles"
        self.kappa = np.concatenate([[self.nu], self.nu * rng.uniform(0.5, 4.0, tracers)])
        self.tau = np.concatenate([[5.0], rng.uniform(1.0, 20.0, tracers)])
        sources = []
        for _ in range(tracers):
            m, n = rng.integers(1, 5, size=2)
            phase = rng.uniform(0, 2 * np.pi, size=2)
            sources.append(np.sin(m * self.Y + phase[0]) * np.cos(n * self.X * ny / nx + phase[1]))
        self.sources = np.stack([self.b_ref] + sources)                  # (1 + tracers, ny, nx)
        w0 = rng.standard_normal((ny, nx))
        w_hat = np.fft.rfft2(w0) * np.exp(-self.K2 / 16.0) * 40.0
        self.w_hat = w_hat * self.dealias
        self.c_hat = np.fft.rfft2(self.sources + 0.1 * rng.standard_normal(self.sources.shape))

    def velocity(self, w_hat):
        psi_hat = w_hat * self.inv_k2
        return np.fft.irfft2(1j * self.KY * psi_hat, s=(self.ny, self.nx)), \
            np.fft.irfft2(-1j * self.KX * psi_hat, s=(self.ny, self.nx)), psi_hat

    def advect(self, u, v, f_hat):
        """-(u.grad f) in spectral space, dealiased."""
        fx = np.fft.irfft2(1j * self.KX * f_hat, s=(self.ny, self.nx), axes=(-2, -1))
        fy = np.fft.irfft2(1j * self.KY * f_hat, s=(self.ny, self.nx), axes=(-2, -1))
        return -np.fft.rfft2(u * fx + v * fy, axes=(-2, -1)) * self.dealias

    def rhs(self, w_hat, c_hat):
        """Explicit tendencies (advection, forcing, buoyancy torque, relaxation sources)."""
        u, v, _ = self.velocity(w_hat)
        dw = self.advect(u, v, w_hat) + np.fft.rfft2(self.forcing) + self.g * 1j * self.KX * c_hat[0]
        dc = self.advect(u, v, c_hat) + np.fft.rfft2(self.sources, axes=(-2, -1)) / self.tau[:, None, None]
        return dw, dc

    def step(self, dt: float) -> None:
        """One Heun step; diffusion, drag and relaxation decay through exact integrating factors."""
        ew = np.exp(-(self.nu * self.K2 + self.mu) * dt)
        ec = np.exp(-(self.kappa[:, None, None] * self.K2 + 1.0 / self.tau[:, None, None]) * dt)
        dw1, dc1 = self.rhs(self.w_hat, self.c_hat)
        w1, c1 = ew * (self.w_hat + dt * dw1), ec * (self.c_hat + dt * dc1)
        dw2, dc2 = self.rhs(w1, c1)
        self.w_hat = ew * (self.w_hat + 0.5 * dt * dw1) + 0.5 * dt * dw2
        self.c_hat = ec * (self.c_hat + 0.5 * dt * dc1) + 0.5 * dt * dc2

    def fields(self) -> np.ndarray:
        """(5 + tracers, ny, nx) float32: u, v, w, psi, b, tracers."""
        u, v, psi_hat = self.velocity(self.w_hat)
        w = np.fft.irfft2(self.w_hat, s=(self.ny, self.nx))
        psi = np.fft.irfft2(psi_hat, s=(self.ny, self.nx))
        c = np.fft.irfft2(self.c_hat, s=(self.ny, self.nx), axes=(-2, -1))
        return np.concatenate([np.stack([u, v, w, psi]), c]).astype(np.float32)

    def stable_dt(self, cfl: float = 0.4) -> float:
        u, v, _ = self.velocity(self.w_hat)
        speed = max(float(np.abs(u).max() + np.abs(v).max()), 1e-3)
        return cfl * (2 * np.pi / self.ny) / speed


def make_dataset(out: str | Path, lat: int = 360, lon: int = 720, channels: int = 20,
                 steps_per_year: int = 64, years: int = 3, substeps: int = 4, spinup: int = 200,
                 dt: float | None = None, seed: int = 0, log=print) -> Path:
    """Integrate and write the dataset (see the module docstring); returns ``out``."""
    if channels < 6:
        raise ValueError("channels must be >= 6 (u, v, w, psi, b and at least one tracer)")
    if years < 2:
        raise ValueError("years must be >= 2 (train and valid)")
    import h5py
    out = Path(out)
    flow = SpectralFlow(lat, lon, channels - 5, seed)
    for _ in range(spinup):
        flow.step(flow.stable_dt())
    dt = dt or flow.stable_dt()
    first_year = 2000
    total, total_sq, n = np.zeros(channels), np.zeros(channels), 0      # train statistics
    for i in range(years):
        split = "valid" if i == years - 1 else "train"
        path = out / split / f"{first_year + i}.h5"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".h5.tmp")
        with h5py.File(tmp, "w") as f:
            ds = f.create_dataset("fields", shape=(steps_per_year, channels, lat, lon), dtype="float32",
                                  chunks=(1, 1, lat, lon))
            for t in range(steps_per_year):
                for _ in range(substeps):
                    flow.step(dt)
                state = flow.fields()
                if not np.isfinite(state).all():
                    raise FloatingPointError(f"the solver blew up at year {i}, step {t}: lower --dt")
                ds[t] = state
                if split == "train":
                    s64 = state.astype(np.float64)
                    total += s64.sum(axis=(1, 2))
                    total_sq += (s64 ** 2).sum(axis=(1, 2))
                    n += lat * lon
        tmp.rename(path)
        log(f"wrote {path}")
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean ** 2, 1e-12))
    (out / "stats").mkdir(exist_ok=True)
    np.save(out / "stats" / "global_means.npy", mean.reshape(1, -1, 1, 1).astype(np.float32))
    np.save(out / "stats" / "global_stds.npy", std.reshape(1, -1, 1, 1).astype(np.float32))
    names = ["u", "v", "vorticity", "streamfunction", "buoyancy"] + [f"tracer{i}" for i in range(1, channels - 4)]
    (out / "meta.json").write_text(json.dumps({
        "channels": names, "lat": lat, "lon": lon, "dt": dt, "substeps": substeps,
        "steps_per_year": steps_per_year, "years": years, "seed": seed}, indent=1))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--lat", type=int, default=360)
    p.add_argument("--lon", type=int, default=720)
    p.add_argument("--channels", type=int, default=20)
    p.add_argument("--steps-per-year", type=int, default=64)
    p.add_argument("--years", type=int, default=3, help="the last one is the validation year")
    p.add_argument("--substeps", type=int, default=4)
    p.add_argument("--spinup", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    make_dataset(a.out, a.lat, a.lon, a.channels, a.steps_per_year, a.years, a.substeps, a.spinup, seed=a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Context (cp), tensor (tp) and data (dp) parallel process groups.

``ParallelDims(dp, cp, tp, order)`` lays the world's ranks out on a 3-D grid. The first name in
``order`` varies fastest across ranks, so adjacent ranks share its group (put tp or cp first to
keep their traffic inside a node). Degrees must multiply to the world size; one of them may be -1
for "the rest". Example, 8 ranks, tp=2, cp=2, dp=2::

    order tp-cp-dp                 order cp-tp-dp
    rank:  0 1 2 3 4 5 6 7         rank:  0 1 2 3 4 5 6 7
    tp:    0 1 0 1 0 1 0 1         cp:    0 1 0 1 0 1 0 1
    cp:    0 0 1 1 0 0 1 1         tp:    0 0 1 1 0 0 1 1
    dp:    0 0 0 0 1 1 1 1         dp:    0 0 0 0 1 1 1 1
    cp groups {0,2} {1,3} ...      cp groups {0,1} {2,3} ...

``build()`` creates every group once (a collective over the default group: call it on every rank,
in the same order) and returns the ``ParallelGroups`` holding this rank's groups: ``cp``, ``tp``,
``dp`` and ``dp_cp`` (the ranks that share weights when tp is the only split: gradients are
reduced over it). Nothing is kept in module globals.

Two-level cp (ringX.hybrid): ``cp_inner`` (dividing cp) cuts each cp group into inner groups of
``cp_inner`` consecutive cp ranks (``cp_inner``: Ulysses over heads, meant to stay on one node:
put cp, or tp then cp, first in ``order`` with tp x cp_inner GPUs per node at most) and outer
groups of the ranks at the same place in each (``cp_outer``: the ring across nodes); ``build``
then makes both and ``ParallelGroups.cp_levels`` gives them. A rank's inner rank is its cp rank
mod cp_inner, its outer rank its cp rank // cp_inner.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from itertools import product

import torch.distributed as dist

DIMS = ("tp", "cp", "dp")


def rank_levels(ranks: list[int], per: int) -> tuple[list[list[int]], list[list[int]]]:
    """An ordered list of ranks cut into consecutive chunks of ``per`` (one node each) and the
    columns across them (the ranks at the same place of every chunk): (chunks, columns)."""
    if per < 1 or len(ranks) % per:
        raise ValueError(f"{len(ranks)} ranks do not split into groups of {per}")
    chunks = [list(ranks[i:i + per]) for i in range(0, len(ranks), per)]
    return chunks, [list(col) for col in zip(*chunks)]


@dataclass
class ParallelDims:
    """Degrees of tensor, context and data parallelism and how ranks map onto them."""

    dp: int = -1
    cp: int = 1
    tp: int = 1
    order: str = "tp-cp-dp"
    world_size: int | None = None
    cp_inner: int = 1

    def __post_init__(self):
        names = self.order.split("-")
        if sorted(names) != sorted(DIMS):
            raise ValueError(f"order must name each of {', '.join(DIMS)} once, separated by '-', "
                             f"e.g. 'tp-cp-dp' or 'cp-tp-dp'; got {self.order!r}")
        self.names = tuple(names)
        ws = self.world_size if self.world_size is not None else (
            dist.get_world_size() if dist.is_initialized() else None)
        if ws is None:
            raise ValueError("world_size is unknown: pass world_size= or initialise torch.distributed")
        degrees = {"dp": self.dp, "cp": self.cp, "tp": self.tp}
        free = [n for n, d in degrees.items() if d == -1]
        bad = {n: d for n, d in degrees.items() if d != -1 and d < 1}
        if bad or len(free) > 1:
            raise ValueError(f"degrees must be >= 1 with at most one -1 (= the rest); got "
                             f"dp={self.dp}, cp={self.cp}, tp={self.tp}")
        fixed = 1
        for n, d in degrees.items():
            fixed *= d if d != -1 else 1
        if free:
            if ws % fixed:
                raise ValueError(f"world size {ws} is not divisible by the fixed degrees "
                                 f"({' x '.join(f'{n}={d}' for n, d in degrees.items() if d != -1)} = {fixed})")
            degrees[free[0]] = ws // fixed
        elif fixed != ws:
            raise ValueError(f"dp={self.dp} x cp={self.cp} x tp={self.tp} = {fixed} must equal the "
                             f"world size {ws}")
        self.dp, self.cp, self.tp = degrees["dp"], degrees["cp"], degrees["tp"]
        self.world_size = ws
        if self.cp_inner < 1 or self.cp % self.cp_inner:
            raise ValueError(f"cp_inner={self.cp_inner} must divide cp={self.cp} (cp = cp_inner x cp_outer)")

    def degree(self, name: str) -> int:
        if name not in DIMS:
            raise ValueError(f"unknown parallel dim {name!r}; valid: {', '.join(DIMS)}")
        return getattr(self, name)

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each dim."""
        out, stride = {}, 1
        for name in self.names:
            d = self.degree(name)
            out[name] = (rank // stride) % d
            stride *= d
        return out

    def rank_of(self, coords: dict[str, int]) -> int:
        rank, stride = 0, 1
        for name in self.names:
            rank += coords[name] * stride
            stride *= self.degree(name)
        return rank

    def group_ranks(self, dims: str) -> list[list[int]]:
        """Every group along ``dims`` ("cp", or several joined by "_" such as "dp_cp"; or
        "cp_inner" / "cp_outer", the two levels of cp): lists of global ranks that differ only
        in those dims, ascending."""
        if dims in ("cp_inner", "cp_outer"):
            out = []
            for members in self.group_ranks("cp"):          # ascending ranks: cp rank order
                out += rank_levels(members, self.cp_inner)[0 if dims == "cp_inner" else 1]
            return sorted(out)
        varying = dims.split("_")
        for n in varying:
            self.degree(n)
        fixed = [n for n in DIMS if n not in varying]
        groups = []
        for fixed_idx in product(*(range(self.degree(n)) for n in fixed)):
            base = dict(zip(fixed, fixed_idx))
            members = [self.rank_of({**base, **dict(zip(varying, idx))})
                       for idx in product(*(range(self.degree(n)) for n in varying))]
            groups.append(sorted(members))
        return sorted(groups)

    def build(self, names: tuple[str, ...] = ("cp", "tp", "dp", "dp_cp")) -> "ParallelGroups":
        """Create the process groups (collective: every rank calls this, same arguments); with
        cp_inner > 1 also "cp_inner" and "cp_outer"."""
        if not dist.is_initialized():
            raise RuntimeError("ParallelDims.build needs torch.distributed initialised "
                               "(ringX.launch.init_distributed)")
        if dist.get_world_size() != self.world_size:
            raise ValueError(f"ParallelDims was made for world size {self.world_size}, but the "
                             f"default group has {dist.get_world_size()} ranks")
        rank = dist.get_rank()
        groups = {}
        if self.cp_inner > 1:
            names = tuple(names) + tuple(n for n in ("cp_inner", "cp_outer") if n not in names)
        for name in names:
            for members in self.group_ranks(name):
                g = dist.new_group(members)
                if rank in members:
                    groups[name] = g
        return ParallelGroups(dims=self, rank=rank, groups=groups)


@dataclass
class ParallelGroups:
    """This rank's process groups, by name."""

    dims: ParallelDims
    rank: int
    groups: dict = field(default_factory=dict)

    def __getitem__(self, name: str) -> "dist.ProcessGroup":
        if name not in self.groups:
            raise KeyError(f"no process group {name!r}; built: {', '.join(self.groups)}")
        return self.groups[name]

    @property
    def cp(self):
        return self["cp"]

    @property
    def tp(self):
        return self["tp"]

    @property
    def cp_levels(self):
        """(inner group, outer group) of a two-level cp (cp_inner > 1), else None."""
        return (self["cp_inner"], self["cp_outer"]) if self.dims.cp_inner > 1 else None

    @property
    def dp(self):
        return self["dp"]

    def coords(self) -> dict[str, int]:
        return self.dims.coords(self.rank)

    def device_mesh(self, device_type: str):
        """A DeviceMesh with dims named like ``order`` reversed (slowest first), for DTensor /
        FSDP2 users. It creates its own process groups (collective)."""
        from torch.distributed.device_mesh import init_device_mesh
        names = tuple(reversed(self.dims.names))
        return init_device_mesh(device_type, tuple(self.dims.degree(n) for n in names),
                                mesh_dim_names=names)


def reduce_gradients(model, group, divide_by: int = 1) -> None:
    """Sum every parameter gradient of ``model`` over ``group`` (the ranks that share the
    weights, e.g. cp or dp x cp) and divide it by ``divide_by`` (e.g. dp, for a mean over data
    parallel ranks of sums over cp), in place. A group of one rank, or None, only divides."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if group is not None and dist.get_world_size(group) > 1:
        for g in grads:
            dist.all_reduce(g, group=group)
    if divide_by != 1:
        for g in grads:
            g.div_(divide_by)

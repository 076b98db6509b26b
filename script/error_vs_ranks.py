"""Error against a float64 reference as the number of ranks grows, next to PyTorch's own error.

One global case (the same inputs at every world size) runs through each function at N = 1, 2,
4, 8 ranks; every output (out, lse, dq, dk, dv) is compared with float64 attention over the
whole sequence (global relative L2 error, ringX.testing). The first row of each mask is
single-device PyTorch attention (``scaled_dot_product_attention``) in the same dtype: the error
the kernel itself makes. A context-parallel method whose partials are merged in the low
precision shows errors that grow with N; RingX merges in float32 and should not:

    python script/error_vs_ranks.py --seqlen 4096 --heads 8 --kv_heads 2 --headdim 128   # GPU
    python script/error_vs_ranks.py --seqlen 512 --headdim 64                           # CPU

On a GPU the ranks share it (``ringX.launch.spawn(shared_gpu=True)``: gloo between ranks, the
GPU kernels and fused merges on the blocks); point-to-point messages of CUDA tensors do not run
that way (gloo closes the connection; see script/gpu_shared_ranks.py), so a one-GPU machine
checks ringX3 and ringX4 at N = 1, 4 and 8 (ringX1/2's paired steps, and the two-rank schedules
of every function, send point to point). On CPU every function runs at every N (gloo).
``--json PATH`` writes the rows.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from ringX.testing import OUTPUTS  # noqa: E402


def _body(rank: int, world_size: int, device, fns, case, path: str) -> None:
    """Every function on the case over this world; rank 0 appends a JSON row per function."""
    import torch
    import torch.distributed as dist
    from ringX import ATTN_FUNCS
    from ringX.testing import run_ringx
    torch.set_num_threads(1)
    for name in fns:
        errs, _ = run_ringx(ATTN_FUNCS[name], case, dist.group.WORLD, device)
        if rank == 0:
            with open(path, "a") as f:
                f.write(json.dumps({"method": name, "causal": case.causal, "N": world_size, **errs}) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fns", nargs="+", default=None, help="default: ringX3 ringX4 on a GPU, all four on CPU")
    p.add_argument("--world_sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seqlen", type=int, default=512, help="global tokens (divisible by 2 x the largest N)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv_heads", type=int, default=2)
    p.add_argument("--headdim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--masks", nargs="+", default=["causal", "full"], choices=["causal", "full"])
    p.add_argument("--cpu", action="store_true", help="run on CPU even where a GPU is")
    p.add_argument("--timeout_s", type=float, default=600)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch
    from ringX.launch import spawn
    from ringX.testing import Case, torch_errors
    gpu = torch.cuda.is_available() and not args.cpu
    fns = args.fns or (["ringX3", "ringX4"] if gpu else ["ringX1", "ringX2", "ringX3", "ringX4"])
    if args.seqlen % (2 * max(args.world_sizes)):
        p.error(f"--seqlen {args.seqlen} must divide by 2 x the largest world size ({2 * max(args.world_sizes)})")
    device = torch.device("cuda" if gpu else "cpu")
    shared = gpu and torch.cuda.device_count() < max(args.world_sizes)
    if shared and 2 in args.world_sizes:
        print("error_vs_ranks: N = 2 left out: the two-rank schedules send point to point, which ranks "
              "sharing a GPU through gloo cannot (run on CPU, or on two GPUs)")
        args.world_sizes = [n for n in args.world_sizes if n != 2]
    rows = []
    for mask in args.masks:
        case = Case(batch=1, seqlen=args.seqlen, heads=args.heads, kv_heads=args.kv_heads, headdim=args.headdim,
                    causal=mask == "causal", dtype=getattr(torch, args.dtype), seed=7)
        base = torch_errors(case, device)
        rows.append({"method": "pytorch (1 device)", "causal": case.causal, "N": 1, "lse": None, **base})
        with tempfile.TemporaryDirectory() as tmp:
            path = str(Path(tmp) / "rows.jsonl")
            Path(path).touch()
            for n in args.world_sizes:
                spawn(n, _body, fns, case, path, deadline_s=args.timeout_s, threads=1,
                      shared_gpu=gpu and torch.cuda.device_count() < n)
            got = [json.loads(line) for line in Path(path).read_text().splitlines()]
        rows += sorted(got, key=lambda r: (r["method"], r["N"]))

    where = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"{where}: S {args.seqlen}, heads {args.heads}/{args.kv_heads}, head dim {args.headdim}, {args.dtype}; "
          "global relative L2 error against float64")
    print(f"{'method':<20} {'mask':<7} {'N':>2} " + " ".join(f"{o:>9}" for o in OUTPUTS))
    for r in rows:
        cells = " ".join(f"{'-':>9}" if r.get(o) is None else f"{r[o]:9.2e}" for o in OUTPUTS)
        print(f"{r['method']:<20} {'causal' if r['causal'] else 'full':<7} {r['N']:>2} {cells}")
    # the largest error at any N over the same function's at N = 1, per output
    print("largest error over N / error at N = 1:")
    for (name, causal) in dict.fromkeys((r["method"], r["causal"]) for r in rows if r["method"] in fns):
        mine = [r for r in rows if (r["method"], r["causal"]) == (name, causal)]
        one = next((r for r in mine if r["N"] == 1), None)
        if one is None:
            continue
        growth = {o: max(r[o] for r in mine) / max(one[o], 1e-30) for o in OUTPUTS}
        print(f"  {name} {'causal' if causal else 'full'}: " + ", ".join(f"{o} {g:.2f}" for o, g in growth.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": where, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

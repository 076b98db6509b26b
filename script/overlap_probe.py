"""Does a transfer run while a cuDNN attention kernel runs? NCCL broadcast against a copy-engine
pull from CUDA symmetric memory, on 2 GPUs of one node (the question behind RINGX_TRANSPORT=copy).

    PYTHONPATH=. S=16384 torchrun --nproc_per_node 2 script/overlap_probe.py

Modes (times from a common start event, ms, medians of 7): alone (attention only); nccl_before
(broadcast posted first); nccl_during (broadcast posted from a side stream after the attention
kernel); ce / ce_hi (a peer copy on a side stream, normal / high priority); barrier / barrier_hi
(symmetric memory's barrier kernel, then the copy). "transfer done" far below "attn done" means
the transfer overlapped the kernel. Modes run in this order, so clock drift can shift the later
"attn done" figures; compare transfer completion, not small attention differences.
"""
import os
import statistics

import torch
import torch.distributed as dist

from ringX.kernels import select_backend


def main():
    rank = int(os.environ["RANK"])
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", rank))
    dev = torch.device("cuda", rank)
    import torch.distributed._symmetric_memory as symm_mem
    S = int(os.environ.get("S", 16384))
    q = torch.randn(1, S, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(1, S, 8, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    kern = select_backend(q, k)
    kv = torch.randn(2, 1, S, 8, 128, device=dev, dtype=torch.bfloat16)
    recv = torch.empty_like(kv)
    stage = symm_mem.empty(kv.shape, dtype=kv.dtype, device=dev)
    hdl = symm_mem.rendezvous(stage, dist.group.WORLD)
    stage.copy_(kv)
    hdl.barrier(channel=0)
    peer = 1 - rank
    remote = hdl.get_buffer(peer, kv.shape, kv.dtype)
    side = torch.cuda.Stream()
    side_hi = torch.cuda.Stream(priority=-1)
    E = lambda: torch.cuda.Event(enable_timing=True)

    def attn():
        return kern.forward(q, k, v, False, 128 ** -0.5)

    def trial(mode):
        torch.cuda.synchronize()
        dist.barrier()
        t0, a1, c1 = E(), E(), E()
        t0.record()
        if mode == "nccl_before":
            w = dist.broadcast(recv, src=0, async_op=True)
            attn()
            a1.record()
            w.wait()
            c1.record()
        elif mode == "nccl_during":
            side.wait_event(t0)
            attn()     # queued first; the broadcast (from the side stream) is ready while it runs
            a1.record()
            with torch.cuda.stream(side):
                w = dist.broadcast(recv, src=0, async_op=True)
                w.wait()
                c1.record()
        elif mode.startswith(("ce", "barrier")):
            s = side_hi if mode.endswith("hi") else side
            s.wait_event(t0)
            attn()
            a1.record()
            with torch.cuda.stream(s):
                if mode.startswith("barrier"):
                    hdl.barrier(channel=1)
                recv.copy_(remote)
                c1.record()
        else:
            attn()
            a1.record()
            c1.record()
        torch.cuda.synchronize()
        return t0.elapsed_time(a1), t0.elapsed_time(c1)

    modes = ["alone", "nccl_before", "nccl_during", "ce", "ce_hi", "barrier", "barrier_hi"]
    res = {}
    for m in modes:
        for _ in range(2):
            trial(m)
        xs = [trial(m) for _ in range(7)]
        res[m] = (statistics.median(x[0] for x in xs), statistics.median(x[1] for x in xs))
    # a bare copy alone, and nccl alone
    torch.cuda.synchronize()
    t0, t1 = E(), E()
    t0.record(); recv.copy_(remote); t1.record(); torch.cuda.synchronize()
    ce_alone = t0.elapsed_time(t1)
    dist.barrier()
    t0.record(); dist.broadcast(recv, src=0); t1.record(); torch.cuda.synchronize()
    t0.record(); dist.broadcast(recv, src=0); t1.record(); torch.cuda.synchronize()
    nccl_alone = t0.elapsed_time(t1)
    ok = torch.equal(recv, remote)
    if rank == 0:
        print(f"S={S} kv bytes {kv.numel() * 2 / 2**20:.0f} MiB; copy alone {ce_alone:.3f} ms, nccl bcast alone {nccl_alone:.3f} ms, ok={ok}")
        for m, (a, c) in res.items():
            print(f"{m:12s} attn done {a:8.3f} ms   transfer done {c:8.3f} ms")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The GPT model at 32,768 tokens under context parallelism against the same model on one GPU.

    torchrun --standalone --nproc_per_node 4 script/gpu_gpt_exactness.py [SEQ_LEN, default 32768]

The `passkey` preset with seeded weights; one passkey prompt, with two losses: over every next
token, and over the five answer digits only (the training loss of the passkey task, whose
gradient must travel from the question on the last rank to the key's rank).
Reference: the whole sequence on one GPU in float32. Compared with it: the same one-GPU model
under bf16 autocast with PyTorch's flash and cuDNN kernels (PyTorch's own bf16 error), and each
ringX function under bf16 autocast on the rank's shard in its layout. Prints, on rank 0, the
whole-sequence loss of each and the largest and median relative error over all weight
gradients. RINGX_BACKEND=flash (or cudnn) runs the ringX functions on that local kernel.
"""
import copy
import functools
import os
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from app.gpt.config import load_preset  # noqa: E402
from app.gpt.data import passkey_batch  # noqa: E402
from app.gpt.model import Llama  # noqa: E402
from app.gpt.parallelize import cp_attention, cp_loss, shard_batch  # noqa: E402
from ringX.launch import init_distributed  # noqa: E402
from ringX.parallel import reduce_gradients  # noqa: E402


def main() -> None:
    info = init_distributed()
    dev = info.device
    cfg = load_preset("passkey")
    m = Llama(cfg)
    m.init_weights(torch.Generator().manual_seed(0))
    m = m.to(dev)
    seq_len = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
    tok, answer, _ = passkey_batch(1, seq_len, torch.Generator().manual_seed(3))
    tok = tok.to(dev)
    every = torch.roll(tok, -1, 1)
    every[:, -1] = -100
    for name, lab in (("every token", every), ("answer digits", answer.to(dev))):
        if info.rank == 0:
            print(f"-- loss over {name}, cp={dist.get_world_size()}", flush=True)
        compare(m, tok, lab, info.rank, dev)
    dist.destroy_process_group()


def one_device_attention(q, k, v, kernels=(SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)):
    """Causal attention of the whole sequence on one device, k/v heads expanded so that PyTorch
    can use a fused kernel in float32 too (its grouped-query path falls back to the O(S^2) math)."""
    rep = q.shape[2] // k.shape[2]
    k, v = (t.repeat_interleave(rep, dim=2).transpose(1, 2) for t in (k, v))
    with sdpa_kernel(list(kernels)):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k, v, is_causal=True).transpose(1, 2)


def grads_of(model, tok, pos, lab, attn_fn, group, autocast):
    """(global mean loss, weight gradients) of ``model`` on this rank's shard."""
    with autocast:
        out = model(tok, pos, attn_fn or one_device_attention, labels=lab)
    if group is None:
        loss = out / (lab != -100).sum()
        g = loss.detach()
    else:
        loss, g = cp_loss(out, lab, group)
    loss.backward()
    if group is not None:
        reduce_gradients(model, group)
    return g.item(), [p.grad for p in model.parameters()]


def rel_errs(grads, ref) -> str:
    errs = sorted(((a - b).norm() / b.norm()).item() for a, b in zip(grads, ref))
    return f"grad rel err max {errs[-1]:.3e} median {errs[len(errs) // 2]:.3e}"


def compare(m, tok, lab, rank, dev) -> None:
    """Loss and weight gradients of each ringX function (bf16) and of the one-GPU model (bf16)
    against the one-GPU model in float32."""
    bf16, fp32 = torch.autocast(dev.type, dtype=torch.bfloat16), nullcontext()
    pos = torch.arange(tok.shape[1], device=dev)
    loss32, ref = grads_of(copy.deepcopy(m), tok, pos, lab, None, None, fp32)
    if rank == 0:
        print(f"float32 one GPU: loss {loss32:.6f}", flush=True)
    for label, kernel in (("flash", SDPBackend.FLASH_ATTENTION), ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
        attn_fn = functools.partial(one_device_attention, kernels=(kernel,))
        loss16, one = grads_of(copy.deepcopy(m), tok, pos, lab, attn_fn, None, bf16)
        if rank == 0:
            print(f"bf16 one GPU (PyTorch {label}): loss {loss16:.6f}; {rel_errs(one, ref)}", flush=True)
    backend = os.environ.get("RINGX_BACKEND") or "default"
    for attn in ("ringX1", "ringX2", "ringX3", "ringX4"):
        t, l, p = shard_batch(tok, lab, attn, dist.group.WORLD)
        loss, grads = grads_of(copy.deepcopy(m), t, p, l, cp_attention(attn, dist.group.WORLD),
                               dist.group.WORLD, bf16)
        if rank == 0:
            print(f"bf16 {attn} cp={dist.get_world_size()} (kernel {backend}): loss {loss:.6f}; {rel_errs(grads, ref)}", flush=True)


if __name__ == "__main__":
    main()

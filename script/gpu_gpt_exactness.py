"""The GPT model at 32,768 tokens under context parallelism against the same model on one GPU.

    torchrun --standalone --nproc_per_node 2 script/gpu_gpt_exactness.py

The `passkey` preset with seeded weights; one passkey prompt, the loss over every next token.
The single-GPU model runs the whole sequence with PyTorch attention, each ringX function runs the
rank's shard in its layout; both under bf16 autocast. Prints, on rank 0, the whole-sequence loss
of each and the largest and median relative error over all weight gradients.
"""
import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

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
    tok, _, _ = passkey_batch(1, 32768, torch.Generator().manual_seed(3))
    tok = tok.to(dev)
    lab = torch.roll(tok, -1, 1)
    lab[:, -1] = -100                                   # every token, so all positions matter
    ac = torch.autocast("cuda", dtype=torch.bfloat16)
    ref = copy.deepcopy(m)
    with ac:
        s = ref(tok, torch.arange(32768, device=dev), labels=lab)
    (s / (lab != -100).sum()).backward()
    for attn in ("ringX2", "ringX3", "ringX4"):
        mm = copy.deepcopy(m)
        t, l, pos = shard_batch(tok, lab, attn, dist.group.WORLD)
        with ac:
            loss, g = cp_loss(mm(t, pos, cp_attention(attn, dist.group.WORLD), labels=l), l, dist.group.WORLD)
        loss.backward()
        reduce_gradients(mm, dist.group.WORLD)
        errs = [((p.grad - q.grad).norm() / q.grad.norm()).item() for p, q in zip(mm.parameters(), ref.parameters())]
        if info.rank == 0:
            print(f"{attn}: loss {g.item():.6f} vs {s.item() / (lab != -100).sum().item():.6f}; "
                  f"grad rel err max {max(errs):.3e} median {sorted(errs)[len(errs) // 2]:.3e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

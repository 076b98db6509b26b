"""The seed project's name for the ViT inference entry point (app/vit/inference.py), run as the
seed's README does, from app/vit:

    cd app/vit
    srun -n8 bash -c "source export_DDP_vars.sh; python inference-cp8.py --config=mp_p2_ringX \\
        --tensor_parallel=1 --context_parallel=8 --parallel_order=cp-tp-dp"

Same flags as inference.py. It runs from the checkout's root (where the job scripts put runs/ and
the synthetic data), so relative --checkpoint, --data and --out paths are taken from the
directory it was started in; without --checkpoint the newest run of --config is used.
"""
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def _absolute(argv: list[str]) -> list[str]:
    """Relative paths of the path flags made absolute before the working directory changes."""
    out, flags = [], ("--checkpoint", "--data", "--out")
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in flags and eq:
            out.append(f"{name}={os.path.abspath(value)}")
        elif arg in flags and i + 1 < len(argv):
            out += [arg, os.path.abspath(argv[i + 1])]
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


if __name__ == "__main__":
    args = _absolute(sys.argv[1:])
    os.chdir(ROOT)
    from app.vit.inference import main
    from ringX.launch import leave
    leave(main(args))

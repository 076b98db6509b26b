"""Attention benchmark: ringX1-4 against the single-device kernel, PyTorch's native context
parallel and ring-flash-attn, on N ranks. Run ``python -m ringX.bench --help``.

FLOP count: forward = 4 * batch * S^2 * heads * headdim (two matmuls, 2 FLOPs per
multiply-add), halved for causal attention; forward+backward = 3.5x the forward. TFLOP/s per GPU
= FLOPs / (N * time). Ideal time = single-device kernel time on the whole sequence / N;
efficiency = ideal / measured. Where the whole sequence is larger than --single-max-seqlen, the
single-device time is extrapolated from the largest measured length as S^2 (marked in the row).
"""

"""Token data for the GPT app, all without downloads.

- ``TokenFile``: a memory-mapped 1-D integer ``.npy`` array or a flat little-endian uint32
  ``.bin`` file of token ids (documents concatenated with an end-of-text token). Windows of
  seq_len + 1 tokens are drawn in a deterministic order from ``seed``; ``state()`` / ``load_state``
  give a resumable position.
- ``encode_bytes``: the byte-level tokenizer (ids 0-255 are bytes, EOT = 256) for raw text files.
- ``PackedTokenFile``: the same windows of a corpus of documents (app/gpt/corpus.py) with their
  document boundaries: positions restart at 0 in every document, labels never cross one.
- ``passkey_batch``: the synthetic passkey-retrieval task: a random 5-digit key hidden at a random
  depth of a long filler text, the question at the end; labels cover only the answer digits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

EOT = 256
BYTE_VOCAB = 257


def encode_bytes(text: str) -> list[int]:
    return list(text.encode("utf-8")) + [EOT]


def write_token_file(path: str | Path, texts: list[str]) -> Path:
    """Byte-tokenize ``texts`` into a .npy (int32) or .bin (uint32) token file."""
    ids = np.array([t for text in texts for t in encode_bytes(text)], dtype=np.uint32)
    path = Path(path)
    if path.suffix == ".npy":
        np.save(path, ids.astype(np.int32))
    else:
        ids.astype("<u4").tofile(path)
    return path


class TokenFile:
    """Deterministic, resumable windows of ``seq_len + 1`` tokens from a memory-mapped file."""

    def __init__(self, path: str | Path, seq_len: int, seed: int = 0):
        path = Path(path)
        if path.suffix == ".npy":
            self.tokens = np.load(path, mmap_mode="r")
        elif path.suffix == ".bin":
            self.tokens = np.memmap(path, dtype="<u4", mode="r")
        else:
            raise ValueError(f"token files are .npy (1-D integers) or .bin (uint32), got {path}")
        if self.tokens.ndim != 1:
            raise ValueError(f"{path}: expected a 1-D array of token ids, got shape {self.tokens.shape}")
        self.seq_len = seq_len
        self.n_windows = (len(self.tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise ValueError(f"{path}: {len(self.tokens)} tokens is fewer than seq_len + 1 = {seq_len + 1}")
        self.seed, self.position = seed, 0

    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def next_batch(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels), each (batch, seq_len) int64; labels are the next tokens."""
        rows = []
        for _ in range(batch):
            epoch, index = divmod(self.position, self.n_windows)
            start = int(self._order(epoch)[index]) * self.seq_len
            rows.append(np.asarray(self.tokens[start:start + self.seq_len + 1], dtype=np.int64))
            self.position += 1
        window = torch.from_numpy(np.stack(rows))
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()

    def state(self) -> dict:
        return {"seed": self.seed, "position": self.position}

    def load_state(self, state: dict) -> None:
        self.seed, self.position = state["seed"], state["position"]


class PackedTokenFile(TokenFile):
    """TokenFile windows of a packed corpus, with its document index (X.docs.npy beside X.npy:
    start offsets of the documents, then the total). Documents are cut at window edges (no
    padding); the piece of a document inside a window is a document of that window."""

    def __init__(self, path: str | Path, seq_len: int, seed: int = 0):
        super().__init__(path, seq_len, seed)
        from .corpus import docs_path
        index = docs_path(path)
        if not index.exists():
            raise FileNotFoundError(f"--pack_documents needs the document index {index} beside {path} "
                                    "(python -m app.gpt.corpus writes both)")
        self.starts = np.load(index)
        if self.starts.ndim != 1 or self.starts[0] != 0 or self.starts[-1] != len(self.tokens) or (
                np.diff(self.starts) <= 0).any():
            raise ValueError(f"{index}: expected increasing document starts from 0 to {len(self.tokens)}")

    def window(self, start: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
        """(tokens, labels, positions) (seq_len,) and the window's cu_seqlens, for the window at
        token ``start``: labels -100 where the next token begins another document."""
        s = self.seq_len
        tok = torch.from_numpy(np.asarray(self.tokens[start:start + s + 1], dtype=np.int64))
        inner = self.starts[(self.starts > start) & (self.starts <= start + s)] - start
        labels = tok[1:].clone()
        labels[torch.from_numpy(inner - 1)] = -100       # the last token of each document
        cu = [0] + [int(b) for b in inner if b < s] + [s]
        pos = torch.arange(s) - torch.repeat_interleave(torch.tensor(cu[:-1]), torch.tensor(np.diff(cu)))
        return tok[:-1].contiguous(), labels, pos, cu

    def next_packed(self, batch: int):
        """(tokens, labels, positions) each (batch, seq_len) and one cu_seqlens list per row."""
        rows = []
        for _ in range(batch):
            epoch, index = divmod(self.position, self.n_windows)
            rows.append(self.window(int(self._order(epoch)[index]) * self.seq_len))
            self.position += 1
        return (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                torch.stack([r[2] for r in rows]), [r[3] for r in rows])


FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


def passkey_batch(batch: int, seq_len: int, generator: torch.Generator,
                  depth: tuple[float, float] = (0.0, 0.25)) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Passkey retrieval in byte tokens: (tokens, labels, answer_mask), each (batch, seq_len).

    The key line sits at a uniformly drawn fraction ``depth`` of the context; the question and the
    answer end the sequence. labels are -100 except on the answer digits, which answer_mask marks.
    """
    tokens = torch.full((batch, seq_len), EOT, dtype=torch.int64)
    labels = torch.full((batch, seq_len), -100, dtype=torch.int64)
    for b in range(batch):
        key = "".join(str(int(d)) for d in torch.randint(0, 10, (5,), generator=generator))
        needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
        question = f" What is the pass key? The pass key is {key}"
        body_len = seq_len - len(question) - 1
        if body_len < len(needle) + 1:
            raise ValueError(f"seq_len {seq_len} is too short for the passkey task")
        lo, hi = depth
        frac = lo + (hi - lo) * torch.rand((), generator=generator).item()
        at = int(frac * (body_len - len(needle)))
        filler = (FILLER * (body_len // len(FILLER) + 1)).encode()
        body = filler[:at] + needle.encode() + filler[at:body_len - len(needle)]
        seq = torch.frombuffer(bytearray(body + question.encode()), dtype=torch.uint8)
        tokens[b, :len(seq)] = seq                         # byte values as token ids, no Python ints
        answer_start = len(seq) - 5                        # the 5 answer digits are predicted
        labels[b, answer_start - 1:len(seq) - 1] = tokens[b, answer_start:len(seq)]
    return tokens, labels, labels != -100

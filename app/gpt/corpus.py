"""Build a packed-document corpus from a directory of text files (no downloads).

    python -m app.gpt.corpus --out runs/corpus/stdlib.npy                 # Python's own library
    python -m app.gpt.corpus --src DIR --glob '*.md' '*.txt' --out corpus.npy

Each file is one document, byte-tokenized (ids 0-255, end-of-text 256 closing every document),
and the documents are concatenated in sorted path order into OUT (int32 tokens, as
``--data`` takes it) with the document index OUT with ``.docs.npy`` (int64 start offsets of the
documents, then the total length). ``app/gpt/train.py --data OUT --pack_documents`` trains on
windows of it, each document attending only to itself. The default source, the Python standard
library's own sources and docs, is a real corpus present on every machine.
"""
from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.gpt.data import encode_bytes  # noqa: E402


def docs_path(tokens_path: str | Path) -> Path:
    """The document index beside a token file: X.npy -> X.docs.npy."""
    p = Path(tokens_path)
    return p.with_name(p.stem + ".docs.npy")


def build(src: str | Path, out: str | Path, patterns=("*.py", "*.txt", "*.rst"), max_bytes: int = 0,
          max_docs: int = 0) -> dict:
    """Tokenize the files under ``src`` matching ``patterns`` -> OUT and its document index.
    Returns counts: documents, tokens, longest and mean document length."""
    files = sorted({f for pat in patterns for f in Path(src).rglob(pat) if f.is_file()})
    if not files:
        raise FileNotFoundError(f"no files matching {', '.join(patterns)} under {src}")
    chunks, starts, total = [], [], 0
    for f in files:
        text = f.read_bytes().decode("utf-8", errors="replace")
        if not text.strip():
            continue
        ids = np.asarray(encode_bytes(text), dtype=np.int32)
        starts.append(total)
        chunks.append(ids)
        total += len(ids)
        if (max_bytes and total >= max_bytes) or (max_docs and len(starts) >= max_docs):
            break
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, np.concatenate(chunks))
    np.save(docs_path(out), np.asarray(starts + [total], dtype=np.int64))
    lengths = np.diff(np.asarray(starts + [total]))
    return {"documents": len(starts), "tokens": int(total), "longest": int(lengths.max()),
            "mean": float(lengths.mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", default=sysconfig.get_paths()["stdlib"], help="directory of text files "
                   "(default: the Python standard library)")
    p.add_argument("--glob", nargs="+", default=["*.py", "*.txt", "*.rst"], help="file patterns")
    p.add_argument("--out", required=True, help="token file to write (.npy)")
    p.add_argument("--max_bytes", type=int, default=0, help="stop after about this many tokens (0: all)")
    p.add_argument("--max_docs", type=int, default=0, help="stop after this many documents (0: all)")
    args = p.parse_args(argv)
    if not args.out.endswith(".npy"):
        p.error("--out must be a .npy file")
    stats = build(args.src, args.out, tuple(args.glob), args.max_bytes, args.max_docs)
    print(f"wrote {args.out} and {docs_path(args.out)}: {stats['documents']} documents, {stats['tokens']} "
          f"tokens, longest {stats['longest']}, mean {stats['mean']:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

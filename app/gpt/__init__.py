"""Llama3 training on RingX context parallelism (see app/gpt/README.md)."""

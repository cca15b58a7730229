"""Batching of judge inputs: tokenised text (pairs) in batches of similar length."""

import torch


def tokenize(tokenizer, texts: list[str], pairs: list[str] | None, max_length: int) -> dict[str, torch.Tensor]:
    return tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=True, return_tensors="pt")


def _length_sorted_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    # Similar lengths in one batch pad less; results are put back in input order by the caller.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]

"""Renaming checkpoint weights by ordered regex rules: shared by the Hugging Face and fairseq loaders."""

from __future__ import annotations

import re

import torch


def apply_rename(rules: tuple[tuple[str, str], ...], rest: str, key: str, value: torch.Tensor,
                 out: dict[str, torch.Tensor], sources: dict[str, str]) -> bool:
    """Put ``value`` into ``out`` under ``rest`` renamed by the first matching ``(pattern, repl)`` rule.

    ``key`` is the checkpoint's own name (kept in ``sources[new] = key`` for error messages).
    Returns False when no rule matches (the caller reports the key as unknown); two
    checkpoint keys landing on one weight is an error naming both.
    """
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, rest)
        if n:
            if new in out:
                raise ValueError(f"checkpoint has both {sources[new]!r} and {key!r} for the same weight")
            out[new] = value
            sources[new] = key
            return True
    return False

"""Checkpoint weights renamed to ours by ordered regex rules, then loaded with checks.

Shared by the Hugging Face and fairseq loaders.
"""

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


def load_checked(model: torch.nn.Module, mapped: dict[str, torch.Tensor], sources: dict[str, str], name: str,
                 optional: frozenset[str] = frozenset()) -> None:
    """Load ``mapped`` (our names) into ``model`` after checking that the weights and the config fit.

    Every weight of the model must be there except ``optional`` ones (e.g. a new CTC head); no
    mapped weight may lack a place or have another shape. Errors name the checkpoint ``name``
    and the checkpoint's own key (``sources``).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(optional) - set(mapped))
    if missing:
        raise ValueError(f"{name} lacks weights its config needs: {missing}")
    for key, value in mapped.items():
        if key not in own:
            raise ValueError(f"{name} has weight {sources[key]!r} that its config has no place for "
                             "(do the config and the weights match?)")
        if tuple(value.shape) != tuple(own[key].shape):
            raise ValueError(f"{name}: weight {sources[key]!r} (our {key!r}) has shape {tuple(value.shape)}, "
                             f"the config needs {tuple(own[key].shape)}")
    model.load_state_dict(mapped, strict=False)

"""Batched prefill through the bridge with hooks that keep only real (non-padding) token rows.

Batches are right-padded and run without an attention mask: the causal conv, the recurrence and
softmax attention are all causal, so the first ``L`` positions of a padded row equal the prompt run
alone, and padding never reaches the store. Each hook casts to the storage dtype on the model's
device (halving the bytes moved) and hands back rows in store order: prompt by prompt, token by token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .bfloat16 import to_storage_numpy
from .catalogue import ATTENTION_MATRIX, MODEL, HookSpec
from .errors import RunFailure
from .plan import SCALAR_DTYPE

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class BatchResult:
    """Rows of one batch: per-token hooks as ``[n_rows, *shape]`` arrays, matrices per prompt."""

    rows: dict[str, np.ndarray] = field(default_factory=dict)
    matrices: dict[str, list[np.ndarray]] = field(default_factory=dict)
    nonfinite: dict[str, int] = field(default_factory=dict)


class Capture:
    """Runs prefill on padded batches and collects the selected hooks."""

    def __init__(self, bridge, hooks: list[HookSpec], storage_dtype: str, device: torch.device):
        self.bridge = bridge
        self.hooks = hooks
        self.device = device
        self.dtypes = {h.name: SCALAR_DTYPE if h.scalar else storage_dtype for h in hooks}
        self.stop_at_layer = _stop_layer(hooks)
        self._mask: torch.Tensor | None = None
        self._lengths: list[int] = []
        self._result = BatchResult()

    def run(self, input_ids: torch.Tensor, lengths: list[int]) -> BatchResult:
        """``input_ids``: ``[B, T]`` right-padded; ``lengths``: the real length of each row."""
        positions = torch.arange(input_ids.shape[1], device=self.device)
        lengths_t = torch.as_tensor(lengths, device=self.device)
        self._mask = positions[None, :] < lengths_t[:, None]
        self._lengths = list(lengths)
        self._result = BatchResult()
        fwd_hooks = [(h.name, self._hook_fn(h)) for h in self.hooks]
        with torch.inference_mode(), self.bridge.hooks(fwd_hooks=fwd_hooks):
            self.bridge(input_ids.to(self.device), use_cache=False, return_type=None,
                        stop_at_layer=self.stop_at_layer)
        missing = [h.name for h in self.hooks
                   if h.name not in self._result.rows and h.name not in self._result.matrices]
        if missing:
            raise RunFailure(
                f"hook(s) did not fire: {', '.join(missing[:5])}; the GDN interior hooks fire only "
                "on the bridge's prefill path (use_cache=False)"
            )
        return self._result

    def _hook_fn(self, spec: HookSpec):
        if spec.kind == ATTENTION_MATRIX:
            def keep_matrix(tensor: torch.Tensor, hook) -> None:
                self._result.matrices[spec.name] = [
                    tensor[b, :, :n, :n].float().cpu().numpy() for b, n in enumerate(self._lengths)
                ]
            return keep_matrix

        dtype_name = self.dtypes[spec.name]
        dtype = _TORCH_DTYPES[dtype_name]

        def keep_rows(tensor: torch.Tensor, hook) -> None:
            rows = tensor[self._mask]  # [n_real_rows, *shape], prompt-major
            if rows.dtype != dtype:
                cast = rows.to(dtype)
                self._count_overflow(spec.name, rows, cast)
                rows = cast
            self._result.rows[spec.name] = to_storage_numpy(rows.cpu(), dtype_name)
        return keep_rows

    def _count_overflow(self, name: str, source: torch.Tensor, cast: torch.Tensor) -> None:
        """Values that were finite before narrowing and are not after it (float16 overflow)."""
        bad = ~torch.isfinite(cast)
        if bool(bad.any()):
            self._result.nonfinite[name] = int((bad & torch.isfinite(source)).sum())


def _stop_layer(hooks: list[HookSpec]) -> int | None:
    """Stop the forward after the last layer that has a selected hook (skips the unembed)."""
    if any(h.layer_type == MODEL for h in hooks):
        return None
    return max(h.layer for h in hooks) + 1


def pad_batch(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, list[int]]:
    """Right-pad ``token_lists`` into ``[B, T_max]``."""
    lengths = [len(t) for t in token_lists]
    out = torch.full((len(token_lists), max(lengths)), pad_id, dtype=torch.long)
    for i, tokens in enumerate(token_lists):
        out[i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.long)
    return out, lengths

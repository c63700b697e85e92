"""Snapshots of the recurrent state S_t from the same forward's k, v, beta and log decay.

TransformerLens's ``hook_ssm_state`` fires only on its eager scan (a Python loop over tokens that
holds the whole trajectory ``[B, T, H, d_k, d_v]``). Instead, each selected layer's ``hook_k``,
``hook_v``, ``hook_beta`` and ``hook_log_decay`` are kept as they fire, and as soon as a layer has
all four its snapshots are computed (:func:`gdn_dump.ops.states.snapshot_states`, the chunked form),
handed to :attr:`StateCapture.keep` and the inputs dropped: memory holds one layer's inputs, never
the trajectory.

Snapshots of a batch are in store order: prompt by prompt (batch row order), position by
position (:func:`gdn_dump.store.states.state_positions`). Padding never produces one: every
position is below its row's length, and the recurrence is causal.
"""

from __future__ import annotations

import numpy as np
import torch

from ..catalogue import STATE_INPUTS, HookSpec, gdn_hook_name
from ..ops.states import snapshot_states, state_statistics
from ..store.states import state_positions


class StateCapture:
    """Keeps the inputs of the selected layers' states during a forward, then snapshots them."""

    def __init__(self, specs: list[HookSpec], stride: int | None, statistics: bool = True):
        self.specs = {spec.layer: spec for spec in specs}
        self.stride, self.statistics = stride, statistics
        self._inputs = {gdn_hook_name(layer, short): (layer, short)
                        for layer in self.specs for short in STATE_INPUTS}
        self._kept: dict[int, dict[str, torch.Tensor]] = {}
        self._done: set[str] = set()
        # keep(array name, states [n, H, d_k, d_v] float32, (norm, effective rank) [n, H] each or
        # None without statistics): called as each layer's snapshots are computed (the Capture's)
        self.keep = None
        self._positions: torch.Tensor | None = None

    def fwd_hooks(self):
        def keep(tensor: torch.Tensor, hook) -> None:
            layer, short = self._inputs[hook.name]
            kept = self._kept.setdefault(layer, {})
            kept[short] = tensor
            if len(kept) == len(STATE_INPUTS):  # the layer's last input: snapshot, then drop them
                self._snapshot(layer, self._kept.pop(layer))
        return [(name, keep) for name in self._inputs]

    def start(self, lengths: list[int]) -> None:
        """Before a forward over rows of ``lengths`` tokens: the (row, t) pairs to snapshot (on the
        host: the chunks they fall in are chosen there, with no device sync)."""
        pairs = [(b, int(t)) for b, n in enumerate(lengths) for t in state_positions(n, self.stride)]
        self._positions = torch.as_tensor(np.array(pairs, dtype=np.int64).reshape(-1, 2))
        self._kept, self._done = {}, set()

    def finish(self) -> None:
        """Check that every selected layer's snapshots were kept in the forward since :meth:`start`."""
        missing = [self.specs[layer].name for layer in self.specs
                   if self.specs[layer].name not in self._done]
        if missing:
            raise KeyError(f"{missing[0]} (its inputs {', '.join(STATE_INPUTS)} did not all fire)")
        self._done = set()

    def reset(self) -> None:
        self._kept, self._done, self._positions = {}, set(), None

    def _snapshot(self, layer: int, kept: dict[str, torch.Tensor]) -> None:
        states = snapshot_states(kept["k"], kept["v"], kept["beta"], kept["log_decay"],
                                 self._positions)
        stats = state_statistics(states) if self.statistics else None
        name = self.specs[layer].name
        self.keep(name, states, stats)
        self._done.add(name)

"""Probe the recurrent state of one GDN layer at the last token of each prompt (README, *Recurrent
states*). Make the store first:

    gdn-dump extract --model tiny --prompts examples/prompts.jsonl --out states.zarr \
        --hooks default,ssm_state --state-every 16 --overwrite
    python examples/probe_states.py states.zarr

Needs only the base install (numpy; no torch).
"""

import sys

import numpy as np

import gdn_dump

store = gdn_dump.open_store(sys.argv[1] if len(sys.argv) > 1 else "states.zarr")
layer = store.state_layers[-1]
prompts = [p for p in store.visible if store.prompt_length[p] > 0]

# S after each prompt's last token: always a snapshot, whatever --state-every was
last = np.stack([store.states(p, layer)[1][-1] for p in prompts])  # [n_prompts, v_head, d_k, d_v]
# any other position is exact too: the nearest snapshot, then the stored k, v, beta, g replayed
middle = np.stack([store.state(p, layer, int(store.prompt_length[p]) // 2) for p in prompts])

# does the final state still hold the prompt's first token? a ridge probe per head, trained on
# half the prompts and scored on the other half (on tiny's random weights and 8 prompts: noise)
first_token = np.array([store.prompt(p).token_ids[0] for p in prompts])
y = (first_token % 2) * 2.0 - 1.0  # +1 / -1
train, test = np.arange(len(prompts)) % 2 == 0, np.arange(len(prompts)) % 2 == 1
for head in range(last.shape[1]):
    x = last[:, head].reshape(len(prompts), -1)
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-12)
    w = np.linalg.solve(x[train].T @ x[train] + 10.0 * np.eye(x.shape[1]), x[train].T @ y[train])
    accuracy = np.mean(np.sign(x[test] @ w) == y[test])
    norm = np.linalg.norm(last[:, head], axis=(1, 2)).mean()
    print(f"layer {layer} head {head}: mean ||S|| {norm:.3g}, held-out probe accuracy {accuracy:.2f}")
print(f"{len(prompts)} prompts; states at the middle token: {middle.shape}")

"""Train a small SAE with SAELens from a gdn-dump export, no model loaded (run in SAELens's own
environment: scripts/saelens_roundtrip.sh). Prints SAELens's loss of the last step.

    python scripts/saelens_train.py CACHE_DIR HOOK CONTEXT_SIZE D_IN [--steps 100]
    python scripts/saelens_train.py STORE HOOK 0 D_IN --sae-batches   (gdn-dump's Store.sae_batches
                                                                      as the data provider)
"""

from __future__ import annotations

import argparse

import torch
from sae_lens import SAETrainer, StandardTrainingSAE, StandardTrainingSAEConfig
from sae_lens.config import SAETrainerConfig
from sae_lens.training.activations_store import ActivationsStore


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache")
    parser.add_argument("hook")
    parser.add_argument("context_size", type=int)
    parser.add_argument("d_in", type=int)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-tokens", type=int, default=256)
    parser.add_argument("--sae-batches", action="store_true",
                        help="CACHE is a gdn-dump store: train from store.sae_batches(HOOK)")
    args = parser.parse_args()
    torch.manual_seed(0)
    batch = args.batch_tokens
    if args.sae_batches:
        from gdn_dump import open_store

        provider = open_store(args.cache).sae_batches(args.hook, batch_tokens=batch, seed=0)
        train(provider, args, batch, f"store.sae_batches of {args.cache}")
        return
    # --- the ~15 lines of the README: SAELens trains from the cache, with no model ---
    store = ActivationsStore(
        model=None, dataset=None, streaming=False, hook_name=args.hook, hook_head_index=None,
        context_size=args.context_size, d_in=args.d_in,
        n_batches_in_buffer=max(2, -(-batch // args.context_size)),  # * context_size >= batch
        total_training_tokens=args.steps * batch, store_batch_size_prompts=4,
        train_batch_size_tokens=batch, prepend_bos=False, normalize_activations="none",
        device=torch.device("cpu"), dtype="float32", cached_activations_path=args.cache)
    train(store, args, batch, f"the export {args.cache}")


def train(provider, args, batch: int, source: str) -> None:
    sae = StandardTrainingSAE(StandardTrainingSAEConfig(d_in=args.d_in, d_sae=4 * args.d_in,
                                                        l1_coefficient=1.0))
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=args.steps * batch,
                                          train_batch_size_samples=batch, lr=1e-3, lr_end=1e-4),
                         sae=sae, data_provider=provider)
    # ---
    losses = []
    step = trainer.step
    trainer.step = lambda batch_in: _record(step(batch_in), losses)
    trainer.fit()
    print(f"SAELens trained {len(losses)} steps on {args.hook} (d_in {args.d_in}, batches of "
          f"{batch} tokens) from {source}: loss first {losses[0]:.6f}, final {losses[-1]:.6f}")


def _record(output, losses):
    losses.append(float(output.loss.detach()))
    return output


if __name__ == "__main__":
    main()

"""Tokenizers without torch: the built-in ``tiny`` one, and any model's from local files only.

A leaf, because both sides need it: a run tokenises prompts (:mod:`gdn_dump.model`), and a reader
decodes stored token ids back to text (:mod:`gdn_dump.read`) where torch may not be installed.
"""

from __future__ import annotations

from pathlib import Path

TINY_NAME = "tiny"
#: A small ChatML template (as Qwen's), so chat input (--chat) works on the built-in model too.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: covers any UTF-8 text, needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
        chat_template=TINY_CHAT_TEMPLATE,
    )


def load_tokenizer_offline(name: str | None, revision: str | None = None):
    """The tokenizer of model ``name`` from local files only (``tiny``: built in); None if that
    fails. Never downloads: a reader must not reach the network to show text."""
    if not name:
        return None
    if name == TINY_NAME:
        return build_tiny_tokenizer()
    try:
        from transformers import AutoTokenizer

        path = Path(name).expanduser()
        # local_files_only: the Hugging Face cache or a checkpoint directory, never a request;
        # no trust_remote_code: reading a store must not run a checkpoint's code.
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else name,
                                                  revision=revision, local_files_only=True)
    except Exception:  # not cached, directory gone, remote code needed, ...: no text, not an error
        return None
    return tokenizer if len(tokenizer) >= 2 else None

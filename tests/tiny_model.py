"""A tiny randomly initialised Llama and a byte-level BPE tokenizer trained on local text.

Built in the tests themselves (no downloads) and saved as a Hugging Face
model directory, which the tests export through lmscore's own export code.
"""

from __future__ import annotations

from pathlib import Path

LICENSES = Path("/usr/share/common-licenses")
TRAINING_TEXTS = ["GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1"]
VOCAB_SIZE = 512
MAX_CONTEXT = 96
BOS, EOS = "<s>", "</s>"


def build_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<unk>", BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train([str(LICENSES / name) for name in TRAINING_TEXTS], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, unk_token="<unk>"
    )


def build_hf_model_dir(directory: Path, seed: int = 0) -> Path:
    """Save a 2-layer Llama (random weights, peaked enough that argmax varies) and its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_CONTEXT,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        # Larger than the default 0.02 so the next-token distributions are far from uniform.
        initializer_range=0.3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory

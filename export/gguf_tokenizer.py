"""Tokenizers from GGUF files that tokenize as the original model does.

transformers builds the tokenizer of a GGUF file itself, and gets some wrong:
- SentencePiece-BPE vocabularies (`tokenizer.ggml.model` "llama": Gemma, Llama-2) become a
  Unigram model fed the BPE merge ranks as scores, so Gemma-3 splits "The capital of France
  is" into 10 fragments although `▁capital` is one token (transformers issue 41494);
- byte-level BPE (`tokenizer.ggml.model` "gpt2": SmolLM2, Llama-3, Qwen) gets GPT-2's
  pre-tokenizer whatever `tokenizer.ggml.pre` says, so SmolLM2 (digits split first) reads
  "\\n\\n  0" as `ĊĊĠ Ġ 0` instead of `ĊĊĠĠ 0`;
- both add BOS whatever `tokenizer.ggml.add_bos_token` says.

Here the GGUF's vocabulary is rebuilt as what it was made from: a SentencePiece model proto
(pieces, scores and types; turned into tokenizer.json by transformers' own SentencePiece
converter) or byte-level BPE merges with the pre-tokenizer llama.cpp uses for that `pre`.
`check_tokenizer` then compares the result with an independent implementation (the
`sentencepiece` library on that proto, or `tiktoken` on the merges) and names the first
difference.

Control tokens written in a text (`<start_of_turn>`) are read as those tokens, as
transformers' tokenizers and HFLM do; sentencepiece and llama.cpp without `parse_special`
read them as text. The check's texts hold none.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# GGUF token types (llama.cpp took sentencepiece's numbering).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE_MARK = "\u2581"  # SentencePiece's ▁

_GPT2_REGEX = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"""
_LLAMA3_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# `tokenizer.ggml.pre` -> the regexes llama.cpp (src/llama-vocab.cpp) splits with, in order;
# each splits the pieces the one before left.
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("gpt-2", "mpt", "olmo", "jais"), (_GPT2_REGEX,)),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"),
        (r"\p{N}", _GPT2_REGEX),
    ),
    **dict.fromkeys(("llama-bpe", "llama3", "dbrx", "smaug-bpe"), (_LLAMA3_REGEX,)),
    **dict.fromkeys(("qwen2", "stablelm2"), (_QWEN2_REGEX,)),
}


class TokenizerMismatch(ValueError):
    """The tokenizer built from a GGUF file does not tokenize as its independent reference."""


@dataclasses.dataclass(frozen=True)
class GgufVocab:
    """The `tokenizer.ggml.*` fields of a GGUF file."""

    model: str  # "llama": SentencePiece; "gpt2": byte-level BPE
    tokens: Sequence[str]
    types: Sequence[int]
    scores: Sequence[float] = ()
    merges: Sequence[str] = ()
    pre: str | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None  # None: the file does not say
    add_eos: bool | None = None
    add_space_prefix: bool = True  # llama.cpp's default for SentencePiece vocabularies


def read_gguf_vocab(path: Path) -> GgufVocab:
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def scalar(key: str) -> Any:
        field = fields.get(key)
        return None if field is None else field.contents()

    def array(key: str) -> list[Any]:
        # Element by element from the memory map: `contents()` takes seconds on 262k tokens.
        field = fields.get(key)
        return [] if field is None else [field.parts[i] for i in field.data]

    def strings(key: str) -> list[str]:
        return [bytes(part).decode("utf-8") for part in array(key)]

    model = scalar("tokenizer.ggml.model")
    if model is None:
        raise TokenizerMismatch(f"{path.name} has no tokenizer (tokenizer.ggml.model)")
    space_prefix = scalar("tokenizer.ggml.add_space_prefix")
    return GgufVocab(
        model=str(model),
        tokens=strings("tokenizer.ggml.tokens"),
        types=[int(part[0]) for part in array("tokenizer.ggml.token_type")],
        scores=[float(part[0]) for part in array("tokenizer.ggml.scores")],
        merges=strings("tokenizer.ggml.merges"),
        pre=scalar("tokenizer.ggml.pre"),
        bos_id=scalar("tokenizer.ggml.bos_token_id"),
        eos_id=scalar("tokenizer.ggml.eos_token_id"),
        unk_id=scalar("tokenizer.ggml.unknown_token_id"),
        pad_id=scalar("tokenizer.ggml.padding_token_id"),
        add_bos=scalar("tokenizer.ggml.add_bos_token"),
        add_eos=scalar("tokenizer.ggml.add_eos_token"),
        add_space_prefix=True if space_prefix is None else bool(space_prefix),
    )


def sentencepiece_proto(vocab: GgufVocab) -> bytes:
    """The SentencePiece BPE model the GGUF's vocabulary was converted from."""
    from sentencepiece import sentencepiece_model_pb2 as sp_model

    proto = sp_model.ModelProto()
    trainer = proto.trainer_spec
    trainer.model_type = sp_model.TrainerSpec.BPE
    trainer.vocab_size = len(vocab.tokens)
    trainer.byte_fallback = BYTE in vocab.types
    for name in ("unk", "bos", "eos", "pad"):
        setattr(trainer, f"{name}_id", _or_minus_one(getattr(vocab, f"{name}_id")))
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = vocab.add_space_prefix
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    for token_id, (token, score, kind) in enumerate(
        zip(vocab.tokens, vocab.scores, vocab.types, strict=True)
    ):
        piece = proto.pieces.add()
        # llama.cpp's converter writes user-defined pieces with spaces for ▁ (it matches
        # them in raw text); SentencePiece matches them after escaping spaces.
        piece.piece = token.replace(" ", SPACE_MARK) if kind == USER_DEFINED else token
        piece.score = score
        # SentencePiece needs exactly one UNKNOWN piece; GGUF files mark it CONTROL too.
        piece.type = UNKNOWN if token_id == vocab.unk_id else kind
    return proto.SerializeToString()


def _or_minus_one(value: int | None) -> int:
    return -1 if value is None else int(value)


def _sentencepiece_tokenizer(vocab: GgufVocab) -> Any:  # -> tokenizers.Tokenizer
    from tokenizers import Tokenizer, normalizers
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import GemmaConverter

    with tempfile.TemporaryDirectory() as tmp:
        model_file = Path(tmp) / "tokenizer.model"
        model_file.write_bytes(sentencepiece_proto(vocab))
        # GemmaConverter is transformers' SentencePiece-BPE converter without a dummy
        # prefix (byte fallback, merges ordered by the merged piece's score).
        tokenizer = GemmaConverter(GemmaTokenizer(vocab_file=str(model_file))).converted()
    if vocab.add_space_prefix:
        tokenizer.normalizer = normalizers.Sequence(
            [normalizers.Prepend(SPACE_MARK), normalizers.Replace(" ", SPACE_MARK)]
        )
    # SentencePiece matches user-defined pieces (Gemma's `▁▁`, `\n\n`) longest first before
    # BPE, after escaping spaces; the converter made them added tokens on the raw text.
    content = json.loads(tokenizer.to_str())
    for added in content["added_tokens"]:
        if not added["special"]:
            added["normalized"] = True
    return Tokenizer.from_str(json.dumps(content))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte, as byte-level BPE vocabularies spell them."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _pre_regexes(vocab: GgufVocab) -> tuple[str, ...]:
    regexes = PRE_TOKENIZER_REGEXES.get(vocab.pre or "")
    if regexes is None:
        raise TokenizerMismatch(
            f"GGUF pre-tokenizer {vocab.pre!r} is not one lmscore knows "
            f"({', '.join(sorted(PRE_TOKENIZER_REGEXES))}); export the Hugging Face "
            "directory instead"
        )
    return regexes


def _byte_level_bpe_tokenizer(vocab: GgufVocab) -> Any:  # -> tokenizers.Tokenizer
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(
        models.BPE(
            vocab={token: i for i, token in enumerate(vocab.tokens)},
            merges=[tuple(merge.split(" ", 1)) for merge in vocab.merges],
            ignore_merges=False,
        )
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            *(pre_tokenizers.Split(Regex(r), behavior="isolated") for r in _pre_regexes(vocab)),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens(
        [
            AddedToken(token, normalized=False, special=kind == CONTROL)
            for token, kind in zip(vocab.tokens, vocab.types, strict=True)
            if kind in (CONTROL, USER_DEFINED)
        ]
    )
    return tokenizer


def build_tokenizer(vocab: GgufVocab) -> Any:  # -> tokenizers.Tokenizer
    """tokenizer.json content for the GGUF's vocabulary, BOS/EOS added as the file says."""
    from tokenizers import processors

    if vocab.model == "llama":
        tokenizer = _sentencepiece_tokenizer(vocab)
    elif vocab.model == "gpt2":
        tokenizer = _byte_level_bpe_tokenizer(vocab)
    else:
        raise TokenizerMismatch(
            f"GGUF tokenizer model {vocab.model!r} is not one lmscore converts "
            "('llama' SentencePiece, 'gpt2' byte-level BPE); export the Hugging Face directory"
        )
    bos = [vocab.bos_id] if vocab.add_bos and vocab.bos_id is not None else []
    eos = [vocab.eos_id] if vocab.add_eos and vocab.eos_id is not None else []
    if bos or eos:
        single = [*(vocab.tokens[i] for i in bos), "$A", *(vocab.tokens[i] for i in eos)]
        pair = [*single, *(vocab.tokens[i] for i in bos), "$B:1", *(vocab.tokens[i] for i in eos)]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=" ".join(single),
            pair=" ".join(pair),
            special_tokens=[(vocab.tokens[i], i) for i in {*bos, *eos}],
        )
    else:
        tokenizer.post_processor = None
    return tokenizer


def reference_encoder(vocab: GgufVocab) -> Callable[[str], list[int]]:
    """An implementation independent of `tokenizers`: sentencepiece, or tiktoken's BPE on
    pieces split with Python's `regex`."""
    if vocab.model == "llama":
        import sentencepiece

        processor = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_proto(vocab))
        return lambda text: list(processor.encode(text))
    import regex
    import tiktoken

    stand_in = _bytes_to_unicode()
    byte_of = {char: byte for byte, char in stand_in.items()}

    def raw(token: str) -> bytes:
        return bytes(byte_of[char] for char in token)

    ranks = {bytes([byte]): byte for byte in range(256)}
    for rank, merge in enumerate(vocab.merges, start=256):
        left, right = merge.split(" ", 1)
        ranks.setdefault(raw(left) + raw(right), rank)
    encoding = tiktoken.Encoding(
        "gguf", pat_str=r"[\s\S]+", mergeable_ranks=ranks, special_tokens={}
    )
    id_of = {
        raw(token): i
        for i, (token, kind) in enumerate(zip(vocab.tokens, vocab.types, strict=True))
        if kind == NORMAL
    }
    token_of_rank = {rank: id_of.get(piece, -1) for piece, rank in ranks.items()}
    patterns = [regex.compile(p) for p in _pre_regexes(vocab)]

    def split(pieces: list[str], pattern: regex.Pattern[str]) -> list[str]:
        out: list[str] = []
        for piece in pieces:
            start = 0
            for match in pattern.finditer(piece):
                out += [piece[start : match.start()]] if match.start() > start else []
                out.append(match.group())
                start = match.end()
            out += [piece[start:]] if start < len(piece) else []
        return out

    def encode(text: str) -> list[int]:
        pieces = [text]
        for pattern in patterns:
            pieces = split(pieces, pattern)
        return [token_of_rank[r] for piece in pieces for r in encoding.encode_ordinary(piece)]

    return encode


def check_tokenizer(tokenizer: Any, vocab: GgufVocab, texts: Sequence[str]) -> int:
    """Raise TokenizerMismatch naming the first difference between `tokenizer` and the
    reference on `texts`; return the number of tokens compared."""
    reference = reference_encoder(vocab)
    compared = 0
    for text in texts:
        ours = tokenizer.encode(text, add_special_tokens=False).ids
        theirs = reference(text)
        if ours != theirs:
            at = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                min(len(ours), len(theirs)),
            )
            around = slice(max(0, at - 2), at + 3)
            raise TokenizerMismatch(
                f"the tokenizer built from the GGUF file differs from "
                f"{'sentencepiece' if vocab.model == 'llama' else 'tiktoken'} at token {at}: "
                f"{_pieces(vocab, ours[around])} vs {_pieces(vocab, theirs[around])}"
            )
        compared += len(ours)
    return compared


def _pieces(vocab: GgufVocab, ids: list[int]) -> str:
    return " ".join(repr(vocab.tokens[i]) if 0 <= i < len(vocab.tokens) else str(i) for i in ids)


# Checked beside the caller's texts: where tokenizers most often part (leading and repeated
# whitespace, newlines, digits after spaces, bytes outside the vocabulary).
PROBE_TEXT = "\n\n  Hello   world\t\t1234 56.7  \n x 'll émoji 🤖 中文  "


def faithful_tokenizer(gguf_path: Path, texts: Sequence[str]) -> Any:
    """transformers' PreTrainedTokenizerFast for the GGUF file, checked on `texts` and
    PROBE_TEXT."""
    from transformers import PreTrainedTokenizerFast

    vocab = read_gguf_vocab(gguf_path)
    tokenizer = build_tokenizer(vocab)
    check_tokenizer(tokenizer, vocab, [*texts, PROBE_TEXT])

    def token(token_id: int | None) -> str | None:
        return None if token_id is None else vocab.tokens[token_id]

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=token(vocab.bos_id),
        eos_token=token(vocab.eos_id),
        unk_token=token(vocab.unk_id),
        pad_token=token(vocab.pad_id),
        add_bos_token=bool(vocab.add_bos),
        add_eos_token=bool(vocab.add_eos),
    )

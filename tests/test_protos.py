"""The committed protobuf code is what `python scripts/gen_protos.py` generates now, and the
Python result and option types (lmscore.v1.results, lmscore.v1.options) name the messages'
fields and convert to them and back by name (lmscore.v1.messages)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from lmscore.v1 import messages, options, results
from lmscore.v1 import scoring_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "protos" / "lmscore" / "v1"


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    fresh = sorted((tmp_path / "lmscore" / "v1").glob("*_pb2*"))
    committed = sorted(GENERATED.glob("*_pb2*"))
    assert [p.name for p in fresh] == [p.name for p in committed]
    assert len(fresh) == 4  # messages, stubs, and a .pyi for each
    for new, old in zip(fresh, committed, strict=True):
        assert new.read_text() == old.read_text(), (
            f"{old.name} is stale: run `python scripts/gen_protos.py`"
        )


@pytest.mark.parametrize(
    ("result_type", "message"),
    [
        (results.ScoreResult, pb.ScoreResult),
        (results.Token, pb.TokenDetail),
        (results.TopToken, pb.TopToken),
        (results.Word, pb.Word),
        (results.Distribution, pb.Distribution),
        (results.RollingResult, pb.RollingResult),
        (options.ScoreOptions, pb.ScoreOptions),
        (options.RollingOptions, pb.RollingOptions),
    ],
)
def test_python_results_declare_the_messages_fields(result_type: type, message: type) -> None:
    """lmscore.v1.results and lmscore.v1.options are the one Python declaration of the results
    and options; the server and the client convert to and from the messages by field name,
    so the names must be the same."""
    declared = [f.name for f in dataclasses.fields(result_type)]
    assert sorted(declared) == sorted(f.name for f in message.DESCRIPTOR.fields)


def test_python_enums_name_the_messages_values() -> None:
    marginal = [f"MARGINAL_MODE_{mode.upper()}" for mode in typing.get_args(results.MarginalMode)]
    assert marginal == list(pb.MarginalMode.keys())
    segments = [f"SEGMENT_{segment.name}" for segment in results.Segment]
    assert ["SEGMENT_UNSPECIFIED", *segments] == list(pb.Segment.keys())


# Every field away from its default, so a field the conversion dropped would show.
SET_OPTIONS = [
    options.ScoreOptions(
        token_details=True,
        top_k=7,
        marginal_mode="separate_pass",
        truncate_prompt_left=True,
        add_bos=False,
        pmi=True,
        words=True,
        prompt_words=True,
    ),
    options.ScoreOptions(add_bos=True),
    options.ScoreOptions(),
    options.RollingOptions(
        max_window_tokens=100, min_context_tokens=5, token_logprobs=True, add_bos=True
    ),
]


@pytest.mark.parametrize("value", SET_OPTIONS)
def test_options_go_to_their_message_and_back_by_name(value: object) -> None:
    message_type = getattr(pb, messages.MESSAGE_NAMES[type(value)])
    message = messages.to_message(value, message_type)
    again = message_type.FromString(message.SerializeToString())
    assert messages.from_message(again, type(value)) == value


def test_an_unset_optional_field_is_none_and_a_set_false_is_false() -> None:
    assert not pb.ScoreOptions().HasField("add_bos")
    assert messages.from_message(pb.ScoreOptions(), options.ScoreOptions).add_bos is None
    sent = messages.to_message(options.ScoreOptions(add_bos=False), pb.ScoreOptions)
    assert sent.HasField("add_bos") and not sent.add_bos


def test_a_subclass_field_beyond_the_contract_is_not_sent() -> None:
    from lmscore.client.types import ScoreOptions

    message = messages.to_message(ScoreOptions(top_k=3, model="other"), pb.ScoreOptions)
    assert message == pb.ScoreOptions(top_k=3)


def test_an_unknown_enum_value_names_its_field() -> None:
    with pytest.raises(messages.UnknownEnumValue, match="marginal_mode: unknown value 7"):
        messages.from_message(pb.ScoreOptions(marginal_mode=7), options.ScoreOptions)
    bad = options.ScoreOptions(marginal_mode="sideways")  # type: ignore[arg-type]
    with pytest.raises(messages.UnknownEnumValue, match="known: same_pass, separate_pass"):
        messages.to_message(bad, pb.ScoreOptions)

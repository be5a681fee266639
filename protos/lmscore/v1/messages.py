"""Between lmscore.v1's Python option types (lmscore.v1.options) and their messages, by
field name: the one conversion the server's servicer and the typed client share.

A dataclass field is the message field of the same name. An enum field holds the value's
name in lower case without the enum's prefix (MarginalMode's MARGINAL_MODE_SEPARATE_PASS
is "separate_pass"); a field with presence (`optional` in the proto) is None when unset.
Only the fields the contract's own type declares are converted, so a subclass may carry
what belongs to the request instead (the client's ScoreOptions.model).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, TypeVar

from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from lmscore.v1 import options as contract

Options = TypeVar("Options")
# Each options type of the contract and its message's name in scoring.proto.
MESSAGE_NAMES: dict[type, str] = {
    contract.ScoreOptions: "ScoreOptions",
    contract.RollingOptions: "RollingOptions",
}


class UnknownEnumValue(ValueError):
    """An enum field holds a number (from the wire) or a name (from Python) the contract
    does not define; `field` is its name."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.description = message


def _contract_type(options_type: type) -> type:
    """The contract's own options type that `options_type` is, or derives from."""
    for declared in MESSAGE_NAMES:
        if issubclass(options_type, declared):
            return declared
    raise TypeError(f"{options_type.__name__} is not an options type of lmscore.v1")


def _enum_prefix(enum: EnumDescriptor) -> str:
    """MarginalMode -> MARGINAL_MODE_ (the proto style guide's value prefix)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def _enum_number(field: FieldDescriptor, name: str) -> int:
    enum = field.enum_type
    value = enum.values_by_name.get(_enum_prefix(enum) + str(name).upper())
    if value is None:
        known = [v.name.removeprefix(_enum_prefix(enum)).lower() for v in enum.values]
        raise UnknownEnumValue(field.name, f"unknown value {name!r}; known: {', '.join(known)}")
    return value.number


def _enum_name(field: FieldDescriptor, number: int) -> str:
    enum = field.enum_type
    value = enum.values_by_number.get(number)
    if value is None:
        known = ", ".join(f"{v.name} = {v.number}" for v in enum.values)
        raise UnknownEnumValue(field.name, f"unknown value {number}; known: {known}")
    return value.name.removeprefix(_enum_prefix(enum)).lower()


def to_message(options: Any, message_type: type[Message]) -> Message:
    """`options` (an lmscore.v1.options type, or a subclass) as `message_type`."""
    fields = message_type.DESCRIPTOR.fields_by_name
    values: dict[str, Any] = {}
    for declared in dataclasses.fields(_contract_type(type(options))):
        value = getattr(options, declared.name)
        field = fields[declared.name]
        if value is None:
            continue  # a field with presence, left unset
        values[declared.name] = _enum_number(field, value) if field.enum_type is not None else value
    return message_type(**values)


def from_message(message: Message, options_type: type[Options]) -> Options:
    """`message` as `options_type`; UnknownEnumValue names an enum field the contract does
    not define a value for."""
    fields = message.DESCRIPTOR.fields_by_name
    values: dict[str, Any] = {}
    for declared in dataclasses.fields(_contract_type(options_type)):
        field = fields[declared.name]
        if field.has_presence and not message.HasField(declared.name):
            values[declared.name] = None
        elif field.enum_type is not None:
            values[declared.name] = _enum_name(field, getattr(message, declared.name))
        elif field.is_repeated:
            values[declared.name] = tuple(getattr(message, declared.name))
        else:
            values[declared.name] = getattr(message, declared.name)
    return options_type(**values)

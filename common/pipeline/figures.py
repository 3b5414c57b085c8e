"""Stage figures: typed values a stage reports, written into its manifest and read back as the same type.

Every stage returns its figures as a frozen dataclass derived from :class:`Figures` (fields are JSON
values, nested dataclasses, or lists/dicts/optionals of those). The manifest stores them as JSON with the
class's ``KIND``, and readers (``trnft status``, the tests, a stage reading its upstream) get the typed
value back with ``SomeFigures.of(manifest)`` instead of looking keys up by string::

    TokenizeFigures.of(rundir.manifest("tokenize")).train.non_pad_fraction

Reading is strict: a manifest whose figures are of another kind, lack a field or carry an unknown one is
refused with a :class:`~trnft.common.errors.TrnftError` naming the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, TypeVar, Union

from ..errors import TrnftError

F = TypeVar("F", bound="Figures")


@dataclasses.dataclass(frozen=True)
class Figures:
    """Base of every stage's figures; ``KIND`` names the type in the manifest."""

    KIND: ClassVar[str] = ""

    def to_json(self) -> dict[str, Any]:
        """The manifest form: ``{"kind": KIND, <field>: <JSON value>, ...}``."""
        assert self.KIND, f"{type(self).__name__} needs a KIND"
        return {"kind": self.KIND, **_encode(self)}

    @classmethod
    def from_json(cls: type[F], data: Any, where: str = "figures") -> F:
        if not isinstance(data, dict) or data.get("kind") != cls.KIND:
            found = data.get("kind") if isinstance(data, dict) else type(data).__name__
            raise TrnftError(f"{where}: holds {found!r} figures, not {cls.KIND!r}")
        body = {k: v for k, v in data.items() if k != "kind"}
        return _decode(cls, body, where)

    @classmethod
    def of(cls: type[F], manifest: dict[str, Any]) -> F:
        """The figures of a stage manifest (as ``RunDir.manifest`` or ``StageResult.manifest`` give it)."""
        where = f"{manifest.get('stage', 'stage')} manifest figures"
        return cls.from_json(manifest.get("figures"), where)


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _encode(v) for k, v in value.items()}
    return value


def _decode(kind: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(kind)
    if origin in (Union, types.UnionType):
        options = typing.get_args(kind)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _decode(inner, value, where)
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            raise TrnftError(f"{where}: expected an object, found {type(value).__name__}")
        hints = typing.get_type_hints(kind)
        fields = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(set(value) - fields)
        missing = sorted(fields - set(value))
        if unknown or missing:
            what = f"unknown field {unknown[0]!r}" if unknown else f"no field {missing[0]!r}"
            raise TrnftError(f"{where}: {what} for {kind.__name__}; was it written by another trnft version?")
        fields_of = {name: _decode(hints[name], value[name], f"{where}.{name}") for name in fields}
        return kind(**fields_of)  # type: ignore[operator]  # a dataclass type, checked above
    if origin in (list, tuple):
        (item,) = typing.get_args(kind)[:1]
        return [_decode(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, item = typing.get_args(kind)
        return {k: _decode(item, v, f"{where}.{k}") for k, v in value.items()}
    return value

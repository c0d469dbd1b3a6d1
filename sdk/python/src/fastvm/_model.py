"""Base class of the typed models: plain dataclasses with wire-name mapping.

Attributes are snake_case; on the wire they are camelCase. The wire name of an
attribute is derived mechanically (``memory_mi_b`` <-> ``memoryMiB``,
``public_ipv6`` <-> ``publicIpv6``) unless the field overrides it with
``wire("t")``.

``from_dict`` accepts either wire names or attribute names, converts nested models
and lists of models, and keeps keys it does not know in ``extra`` (forward
compatible: a newer server may send more fields). ``to_dict`` produces wire names,
drops ``None`` values and re-emits the unknown keys unchanged.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Mapping, TypeVar, Union

__all__ = ["Model", "wire", "camel"]

M = TypeVar("M", bound="Model")


def camel(name: str) -> str:
    """``memory_mi_b`` -> ``memoryMiB``."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def wire(name: str, default: Any = None) -> Any:
    """A dataclass field whose wire name is ``name`` instead of the camelCase default."""
    return dataclasses.field(default=default, metadata={"wire": name})


class Model:
    """Mixin for ``@dataclass(kw_only=True)`` models. See module doc."""

    # (attribute, wire name, resolved type hint) per class, filled lazily.
    _field_cache: ClassVar[dict[type, list[tuple[str, str, Any]]]] = {}

    def __post_init__(self) -> None:
        self.extra: dict[str, Any] = {}

    @classmethod
    def _fields(cls) -> list[tuple[str, str, Any]]:
        cached = Model._field_cache.get(cls)
        if cached is None:
            hints = typing.get_type_hints(cls)
            cached = [
                (f.name, f.metadata.get("wire", camel(f.name)), hints[f.name])
                for f in dataclasses.fields(cls)  # type: ignore[arg-type]
            ]
            Model._field_cache[cls] = cached
        return cached

    @classmethod
    def from_dict(cls: type[M], data: Mapping[str, Any] | M) -> M:
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            raise TypeError(f"{cls.__name__}.from_dict expects a mapping, got {type(data).__name__}")
        by_key: dict[str, tuple[str, Any]] = {}
        for attr, wire_name, hint in cls._fields():
            by_key[wire_name] = (attr, hint)
            by_key.setdefault(attr, (attr, hint))
        kwargs: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            known = by_key.get(key)
            if known is None:
                extra[key] = value
            else:
                kwargs[known[0]] = _convert_in(value, known[1])
        obj = cls(**kwargs)
        obj.extra = extra
        return obj

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for attr, wire_name, hint in self._fields():
            value = getattr(self, attr)
            if value is not None:
                out[wire_name] = _convert_out(value, hint)
        for key, value in getattr(self, "extra", {}).items():
            out.setdefault(key, value)
        return out


def _convert_in(value: Any, hint: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) != 1:
            return value
        return _convert_in(value, args[0])
    if origin is list and isinstance(value, list):
        (item_hint,) = typing.get_args(hint) or (Any,)
        return [_convert_in(v, item_hint) for v in value]
    if isinstance(hint, type) and issubclass(hint, Model) and isinstance(value, Mapping):
        return hint.from_dict(value)
    return value


def _convert_out(value: Any, hint: Any = Any) -> Any:
    """Wire form of ``value``; a plain dict where the hint says model goes through that
    model (so ``IngressPolicy(rules=[{"default_action": ...}])`` works too)."""
    if isinstance(value, Model):
        return value.to_dict()
    origin = typing.get_origin(hint)
    if origin is Union or origin is types.UnionType:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        hint = args[0] if len(args) == 1 else Any
        origin = typing.get_origin(hint)
    if isinstance(value, (list, tuple)):
        item_hint = typing.get_args(hint)[0] if origin is list and typing.get_args(hint) else Any
        return [_convert_out(v, item_hint) for v in value]
    if isinstance(value, Mapping):
        if isinstance(hint, type) and issubclass(hint, Model):
            return hint.from_dict(value).to_dict()
        return {k: _convert_out(v) for k, v in value.items()}
    return value

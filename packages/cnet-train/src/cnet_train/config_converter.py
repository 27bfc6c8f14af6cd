"""The strict cattrs converter behind `cnet_train.config_io`.

cattrs' default hooks are lenient in ways that hide mistakes in a config: they turn the string
'false' into True (bool('false')), 7.9 into 7 (int(7.9)) and the string 'abc' into the tuple
('a', 'b', 'c'). The hooks here accept only what a YAML file would hold for each type and raise
a message that says what was expected. Every attrs class is structured with cattrs' detailed
validation and unknown keys forbidden, so that one `ClassValidationError` carries every problem,
each with the path of attribute names that leads to it.
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Mapping
from functools import cache, partial
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import attrs
from cattrs import Converter
from cattrs.errors import IterableValidationError, IterableValidationNote
from cattrs.gen import make_dict_structure_fn, override

from cnet_train.config import FOREIGN_CHECKS, Check
from cnet_train.resume_setting import ResumeSetting, parse_resume

# A decimal number as text. PyYAML (YAML 1.1) reads `3e-5` and `1e4` as strings because its
# float pattern needs a dot, so float fields accept such strings; 'nan', 'inf' and '1_0',
# which `float()` would also take, are refused as the typos they almost certainly are.
_DECIMAL = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@cache
def config_converter() -> Converter:
    """The one converter that structures and unstructures configs (built once, then cached)."""
    converter = Converter(forbid_extra_keys=True, detailed_validation=True)
    converter.register_structure_hook(bool, _structure_bool)
    converter.register_structure_hook(int, _structure_int)
    converter.register_structure_hook(float, _structure_float)
    converter.register_structure_hook(str, _structure_str)
    converter.register_structure_hook(Path, _structure_path)
    converter.register_structure_hook_func(_is_literal, _structure_literal)
    converter.register_structure_hook_func(_is_tuple, partial(_structure_tuple, converter))
    converter.register_structure_hook_func(_is_union, partial(_structure_union, converter))
    converter.register_structure_hook_factory(attrs.has, partial(_class_hook, converter))
    # After the union hook, which it overrides for `checkpoint.resume`: a word that is not a
    # choice must not become a path (`resume: Auto`), and the message lists the choices.
    converter.register_structure_hook_func(lambda tp: tp == ResumeSetting, _structure_resume)
    converter.register_unstructure_hook(Path, str)
    converter.register_unstructure_hook_func(
        _is_tuple, lambda value: [converter.unstructure(item) for item in value]
    )
    return converter


def shown(value: object) -> str:
    """`value` as a YAML user would recognise it in a message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def expected(tp: Any) -> str:
    """A phrase naming what a value of type `tp` looks like in YAML."""
    names = {
        bool: "true or false",
        int: "an integer",
        float: "a number",
        str: "a string",
        Path: "a path",
        type(None): "null",
    }
    if tp in names:
        return names[tp]
    if _is_literal(tp):
        allowed = get_args(tp)
        return repr(allowed[0]) if len(allowed) == 1 else f"one of {_listed(allowed)}"
    if _is_union(tp):
        return " or ".join(expected(arg) for arg in get_args(tp))
    if _is_tuple(tp):
        return "a list"
    return "a section" if attrs.has(tp) else str(tp)


def _listed(values: tuple[object, ...]) -> str:
    return ", ".join(str(v) for v in values)


def _mismatch(tp: Any, value: object) -> TypeError:
    return TypeError(f"expected {expected(tp)}, got {shown(value)}")


# --- scalars: exact types only (bool is a subclass of int, so `type(...) is` and not isinstance)


def _structure_bool(value: object, _: type) -> bool:
    if type(value) is bool:
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        raise TypeError(f"expected true or false, got the string {shown(value)} (drop the quotes)")
    raise _mismatch(bool, value)


def _structure_int(value: object, _: type) -> int:
    if type(value) is int:
        return value
    raise _mismatch(int, value)


def _structure_float(value: object, _: type) -> float:
    if type(value) is int or type(value) is float:
        return float(value)
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        return float(value)
    raise _mismatch(float, value)


def _structure_str(value: object, _: type) -> str:
    if type(value) is str:
        return value
    raise _mismatch(str, value)


def _structure_path(value: object, _: type) -> Path:
    # Kept as written here; `config_io.load_config` resolves relative paths afterwards.
    if type(value) is str and value:
        return Path(value)
    raise TypeError(f"expected a path (a non-empty string), got {shown(value)}")


def _structure_resume(value: object, _: type) -> ResumeSetting:
    return parse_resume(value)


# --- Literal, tuple and union


def _is_literal(tp: Any) -> bool:
    return get_origin(tp) is Literal


def _structure_literal(value: object, tp: Any) -> object:
    allowed = get_args(tp)
    # Compared with the type too: True == 1 and 1.0 == 1, but neither is the literal 1.
    for option in allowed:
        if type(value) is type(option) and value == option:
            return option
    # A string option that is an integer's text takes that integer: YAML (and `--set`) read
    # `precision: 32` as the number 32, and quoting it twice is no one's idea of a config.
    # The other way round stays refused: `deepspeed_stage: "2"` is a quoting mistake.
    if type(value) is int and str(value) in allowed:
        return str(value)
    hint = ""
    if any(str(option) == str(value) for option in allowed):
        hint = " (a number and a string differ here: check the quotes)"
    raise ValueError(f"{shown(value)} is not one of {_listed(allowed)}{hint}")


def _is_tuple(tp: Any) -> bool:
    return tp is tuple or get_origin(tp) is tuple


def _structure_tuple(converter: Converter, value: object, tp: Any) -> tuple[object, ...]:
    # A YAML list only: a string or a mapping is iterable too, but never meant as a tuple.
    if not isinstance(value, list | tuple):
        raise _mismatch(tp, value)
    args = get_args(tp)
    if len(args) == 2 and args[1] is Ellipsis:
        item_types = [args[0]] * len(value)
    elif len(args) != len(value):
        raise ValueError(f"expected a list of {len(args)} items, got {len(value)}")
    else:
        item_types = list(args)
    items: list[object] = []
    errors: list[Exception] = []
    for index, (item, item_type) in enumerate(zip(value, item_types, strict=True)):
        try:
            items.append(converter.structure(item, item_type))
        except Exception as exc:
            exc.add_note(IterableValidationNote(f"item {index}", index, item_type))
            errors.append(exc)
    if errors:
        raise IterableValidationError(f"While structuring {tp}", errors, tp)
    return tuple(items)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _structure_union(converter: Converter, value: object, tp: Any) -> object:
    options = [arg for arg in get_args(tp) if arg is not type(None)]
    if value is None and len(options) < len(get_args(tp)):
        return None
    if len(options) == 1:
        # `X | None`: X's own message is the most precise one.
        return converter.structure(value, options[0])
    for option in options:
        try:
            return converter.structure(value, option)
        except Exception:
            continue  # the next option may fit; if none does, the error below names them all
    raise _mismatch(tp, value)


# --- attrs classes


def _class_hook(converter: Converter, cl: type) -> Callable[[object, type], object]:
    """cattrs' generated structure function for `cl`, with two additions: a value that is not a
    mapping is refused by name, and each attribute's validator (and its check in
    `FOREIGN_CHECKS`) runs as the attribute is
    structured, so that its error is collected with the attribute's path, alongside all the
    others, rather than escaping from `cl(...)` alone and without a path."""
    extra = FOREIGN_CHECKS.get(cl, {})
    overrides = {
        a.name: override(struct_hook=_validated(converter, a, extra.get(a.name)))
        for a in attrs.fields(cl)
        if a.validator is not None or a.name in extra
    }
    # Typed loosely: mypy cannot match `**overrides` against the generator's named flags.
    generate: Callable[..., Callable[[Mapping[str, Any], Any], object]] = make_dict_structure_fn
    structure = generate(cl, converter, **overrides)

    def hook(value: object, _: type) -> object:
        if not isinstance(value, Mapping):
            raise TypeError(f"expected a section (a mapping of keys), got {shown(value)}")
        return structure(value, cl)

    return hook


def _validated(
    converter: Converter, attribute: attrs.Attribute[Any], extra: Check | None
) -> Callable[[Any, Any], Any]:
    checks = [c for c in (attribute.validator, extra) if c is not None]
    # The message of a validator starts with the attribute's name (`batch_size must be...`,
    # `'update_after_step' must be...`); the path now says which attribute, so that goes.
    own_name = re.compile(rf"^(?:[\w.]*\.)?'?{re.escape(attribute.name)}'?\s+")

    def structure(value: object, tp: Any) -> object:
        result = converter.structure(value, tp)
        try:
            # No instance exists yet; the validators of config classes look at the value only.
            for check in checks:
                check(None, attribute, result)
        except (ValueError, TypeError) as exc:
            raise ValueError(own_name.sub("", str(exc))) from exc
        return result

    return structure

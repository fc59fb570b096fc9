"""Python functions as chat tools: the JSON schema the template shows the model, made as transformers makes it.

`tools=[get_weather]` works in transformers' `apply_chat_template` through `transformers.utils.get_json_schema`:
the types come from the type hints, the descriptions from a Google-style docstring. That function is not used
here because transformers is not a runtime dependency of qwen35; this one gives the same schema for the hints
it supports (str, int, float, bool, None, Any, list, dict, Optional/Union, Literal; tests compare the two).
"""

from __future__ import annotations

import inspect
import json
import re
import types
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

BASIC = {int: {"type": "integer"}, float: {"type": "number"}, str: {"type": "string"}, bool: {"type": "boolean"},
         type(None): {"type": "null"}, list: {"type": "array"}, tuple: {"type": "array"}, dict: {"type": "object"},
         Any: {}}
JSON_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null"}
SECTION = re.compile(r"(Args|Returns|Raises):\s*")
ARGUMENT = re.compile(r"([ \t]*)(\w+):\s*(.*)")
CHOICES = re.compile(r"\(choices:\s*(.*?)\)\s*$", re.IGNORECASE)
HINT = ("write the tool's JSON schema by hand ({'type': 'function', 'function': {'name', 'description', "
        "'parameters'}}) and pass that instead")


def tool_schemas(tools: Any) -> list[dict] | None:
    """`tools` with every function or method replaced by its schema; dicts pass unchanged."""
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of JSON-schema dicts or Python functions, got {type(tools).__name__}")
    out = []
    for i, tool in enumerate(tools):
        if isinstance(tool, dict):
            out.append(tool)
        elif inspect.isfunction(tool) or inspect.ismethod(tool):
            out.append(function_schema(tool))
        else:
            raise ValueError(f"tools[{i}] must be a JSON-schema dict like {{'type': 'function', 'function': {{...}}}} "
                             f"or a Python function with type hints and a docstring, got {type(tool).__name__}")
    return out


def function_schema(func: Callable) -> dict:
    """`{"type": "function", "function": {"name", "description", "parameters"[, "return"]}}` for a function
    whose parameters all have type hints and a line in the docstring's "Args:" section."""
    name = getattr(func, "__name__", "operation")
    doc = inspect.getdoc(func)
    if not doc:
        raise ValueError(f"tool function {name} has no docstring; give it a description and an 'Args:' section "
                         f"with one 'name: description' line per parameter, or {HINT}")
    description, arguments, returns = _parse_docstring(doc.strip())
    parameters, returned = _parameters(func, name)
    for arg, schema in parameters["properties"].items():
        if arg not in arguments:
            raise ValueError(f"tool function {name}: the docstring's 'Args:' section has no 'name: description' "
                             f"line for parameter {arg!r}; add one")
        text = arguments[arg]
        choices = CHOICES.search(text)
        if choices:
            schema["enum"] = [c.strip() if isinstance(c, str) else c for c in json.loads(choices.group(1))]
            text = text[:choices.start()].strip()
        schema["description"] = text
    function = {"name": name, "description": description, "parameters": parameters}
    if returned is not None:
        function["return"] = returned | ({"description": returns} if returns is not None else {})
    return {"type": "function", "function": function}


def _parameters(func: Callable, name: str) -> tuple[dict, dict | None]:
    """The parameters' object schema (order and `required` from the signature) and the return's, if it has one."""
    hints = get_type_hints(func)
    signature = inspect.signature(func)
    receiver = next(iter(signature.parameters), None)
    if receiver not in ("self", "cls") or signature.parameters[receiver].annotation is not inspect.Parameter.empty:
        receiver = None  # an unannotated first self/cls is the implicit receiver of a method
    required = []
    for arg, param in signature.parameters.items():
        if arg == receiver:
            continue
        if param.annotation is inspect.Parameter.empty:
            raise ValueError(f"tool function {name}: parameter {arg!r} has no type hint; add one")
        if param.default is inspect.Parameter.empty:
            required.append(arg)
    properties = {arg: _schema(hint, name) for arg, hint in hints.items() if arg not in ("return", receiver)}
    returned = None
    if "return" in hints:
        try:
            returned = _schema(hints["return"], name)
        except ValueError:  # the model never writes the return value: an unknown return type is left out
            pass
    parameters = {"type": "object", "properties": properties}
    return parameters | ({"required": required} if required else {}), returned


def _schema(hint: Any, name: str) -> dict:
    """The JSON schema of one type hint."""
    origin, args = get_origin(hint), get_args(hint)
    if origin is None and hint in BASIC:
        return dict(BASIC[hint])
    if origin is Union or origin is types.UnionType:
        subtypes = [_schema(t, name) for t in args if t is not type(None)]
        if len(subtypes) == 1:
            out = subtypes[0]
        elif all(s.keys() == {"type"} and isinstance(s["type"], str) for s in subtypes):
            names = sorted({s["type"] for s in subtypes})
            out = {"type": names[0] if len(names) == 1 else names}
        else:
            out = {"anyOf": subtypes}
        return out | ({"nullable": True} if type(None) in args else {})
    if origin is Literal and args and all(type(a) in JSON_NAMES for a in args):
        kinds = list(dict.fromkeys(JSON_NAMES[type(a)] for a in args))
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": list(args)}
    if origin is list:
        return {"type": "array", "items": _schema(args[0], name)} if args else {"type": "array"}
    if origin is dict:
        values = {"additionalProperties": _schema(args[1], name)} if len(args) == 2 else {}
        return {"type": "object", **values}
    raise ValueError(f"tool function {name}: the type hint {hint!r} has no JSON schema here (supported: str, int, "
                     f"float, bool, None, Any, list[...], dict[str, ...], Optional/Union, Literal); {HINT}")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str], str | None]:
    """(description, {argument: description}, returns) of a Google-style docstring, read as transformers reads
    it: the description ends at the first section; an argument's text runs on over lines indented deeper."""
    lines = doc.split("\n")
    sections: dict[str, list[str]] = {"": []}
    current = ""
    for line in lines:
        header = SECTION.fullmatch(line.strip())
        if header and header.group(1) not in sections:
            current = header.group(1)
            sections[current] = []
        else:
            sections[current].append(line)
    returns = "\n".join(sections["Returns"]).strip() if "Returns" in sections else None
    return "\n".join(sections[""]).strip(), _arguments(sections.get("Args", [])), returns


def _arguments(lines: list[str]) -> dict[str, str]:
    out: dict[str, list[str]] = {}
    indent, current = None, None
    for line in lines:
        if not line.strip():
            continue
        match = ARGUMENT.fullmatch(line)
        if match and (indent is None or len(match.group(1)) <= indent):
            indent, current = len(match.group(1)), match.group(2)
            out[current] = [match.group(3)]
        elif current is not None:
            out[current].append(line)
    return {arg: " ".join(part.strip() for part in text if part.strip()) for arg, text in out.items()}

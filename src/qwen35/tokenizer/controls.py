"""A chat request's output controls as engine `Steering`: thinking budget, `response_format`, `tool_choice`.

Qwen3.5 writes a tool call as XML, one parameter per block, strings raw and everything else as JSON:
`<tool_call>\\n<function=NAME>\\n<parameter=KEY>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>`.
A forced call (`tool_choice` "required" or a named function) is that format as a grammar: the function names
offered, each tool's parameters in schema order (required ones present), string values raw text up to the
closing tag (an `enum` lists its values; `pattern`, `minLength`, `maxLength` hold), other values JSON valid
against the parameter's schema.
"""

from __future__ import annotations

import json
from typing import Any

from jsonschema.exceptions import SchemaError
from jsonschema.validators import validator_for

from qwen35.runtime.grammar import COMPACT, GrammarError, Vocabulary
from qwen35.runtime.steering import CLOSE_THINKING, Steering
from qwen35.tokenizer.streaming import is_text_parameter
from qwen35.tokenizer.tokenizer import Tokenizer

# OpenAI's reasoning_effort as thinking budgets (tokens): "none" turns thinking off instead.
REASONING_EFFORT = {"minimal": 256, "low": 1024, "medium": 4096, "high": 16384}


def resolve_budget(budget: int | None, effort: str | None) -> int | None:
    """An explicit budget wins over an effort level."""
    if budget is not None:
        if budget < 0:
            raise ValueError(f"thinking_budget={budget} is invalid: give 0 or more tokens")
        return budget
    if effort is None or effort == "none":
        return None
    if effort not in REASONING_EFFORT:
        raise ValueError(f"reasoning_effort={effort!r} is invalid: use none, {', '.join(REASONING_EFFORT)}")
    return REASONING_EFFORT[effort]


def response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON Schema a `response_format` asks for (None: free text); ValueError naming what is wrong."""
    if response_format is None or response_format.get("type") == "text":
        return None
    kind = response_format.get("type")
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise ValueError(f"response_format.type {kind!r} is invalid: use text, json_object or json_schema")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise ValueError("response_format.json_schema must be an object {\"name\": ..., \"schema\": {JSON Schema}}")
    schema = spec.get("schema", {})
    _check_schema(schema, "response_format.json_schema.schema")
    return schema


def _check_schema(schema: Any, where: str) -> None:
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as e:
        raise ValueError(f"{where} is not a valid JSON Schema: {e.message[:200]}") from None


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {t["function"]["name"]: t["function"] for t in tools
            if isinstance(t, dict) and isinstance(t.get("function"), dict) and "name" in t["function"]}


def tool_parameters(tools: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Function name -> its `parameters` schema: how a call's arguments are read back (`parse_tool_calls`)."""
    return {name: f.get("parameters") or {} for name, f in _functions(tools or []).items()}


def forced_tools(tools: list[dict[str, Any]] | None, tool_choice: Any) -> list[dict[str, Any]] | None:
    """The functions a `tool_choice` forces a call to (None: the model decides)."""
    if tool_choice in (None, "auto", "none"):
        return None
    functions = _functions(tools or [])
    if not functions:
        raise ValueError(f"tool_choice {json.dumps(tool_choice)[:80]} needs tools: give the functions to call")
    if tool_choice == "required":
        return list(functions.values())
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise ValueError("tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                         "\"function\": {\"name\": ...}}")
    if name not in functions:
        raise ValueError(f"tool_choice names the function {name!r}, which is not among the tools "
                         f"({', '.join(sorted(functions))[:200]})")
    return [functions[name]]


def _literal(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _text_terminal(schema: dict[str, Any]) -> str:
    """The terminal a raw string parameter must match: its `pattern` (JSON Schema semantics, matched as the whole
    value, which also satisfies the schema's search semantics) and its `minLength`/`maxLength`; any text when it
    has neither. Several constraints intersect (llguidance's `&`)."""
    from llguidance import regex_to_lark

    parts = []
    low, high = schema.get("minLength"), schema.get("maxLength")
    if low or high is not None:
        parts.append(f"/(?s:.{{{low or 0},{'' if high is None else high}}})/")
    if isinstance(schema.get("pattern"), str):
        parts.append(f"/{regex_to_lark(schema['pattern'].removeprefix('^').removesuffix('$'), 'dw')}/")
    return " & ".join(parts) or "/(?s:.*)/"


def _value(schema: Any, rule: str, rules: list[str]) -> str:
    """The grammar of one parameter value (ending with the parameter's closing tag)."""
    end = _literal("\n</parameter>\n")
    if is_text_parameter(schema) and schema.get("enum"):
        return "(" + " | ".join(_literal(v) for v in schema["enum"]) + f") {end}"
    if is_text_parameter(schema):
        rules += [f"{rule.upper()}: {_text_terminal(schema)}", f"{rule}[suffix={end}]: {rule.upper()}"]
        return rule
    body = {**schema, "x-guidance": COMPACT} if isinstance(schema, dict) else {"x-guidance": COMPACT}
    return f"%json {json.dumps(body)} {end}"


def tool_call_grammar(functions: list[dict[str, Any]], parallel: bool, call_open: int, call_close: int) -> str:
    """A Lark grammar (llguidance's dialect) for one or more calls, in the Qwen XML format, to these functions."""
    names = " | ".join(f"f{i}" for i in range(len(functions)))
    rules = ["start: call" + (' ("\\n" call)*' if parallel else ""),
             f'call: <[{call_open}]> "\\n<function=" ({names}) "</function>\\n" <[{call_close}]>']
    for i, function in enumerate(functions):
        parameters = function.get("parameters") or {}
        required = set(parameters.get("required", []))
        parts = [_literal(function["name"] + ">\n")]
        for j, (key, schema) in enumerate((parameters.get("properties") or {}).items()):
            value = _value(schema, f"v{i}_{j}", rules)
            parts.append(f"({_literal(f'<parameter={key}>' + chr(10))} {value}){'' if key in required else '?'}")
        rules.append(f"f{i}: " + " ".join(parts))
    return "\n".join(rules)


def chat_steering(tok: Tokenizer, vocabulary: Vocabulary, thinking: bool, thinking_off: bool,
                  budget: int | None = None, response_format: dict[str, Any] | None = None,
                  tools: list[dict[str, Any]] | None = None, tool_choice: Any = None,
                  parallel_tool_calls: bool = True) -> Steering:
    """The rules of a chat reply. `thinking`: the prompt ends inside `<think>`; `thinking_off`: the template
    closed thinking for this reply (`<think>` is then never allowed: enable_thinking=false always holds).

    A forced tool call and a response_format both constrain the answer; the forced call wins (the JSON
    would be its arguments). Raises ValueError naming the field that is wrong.
    """
    ids = {t: tok.token_to_id(t) for t in ("<think>", "</think>", "<tool_call>", "</tool_call>")}
    functions = forced_tools(tools, tool_choice)
    schema = response_schema(response_format)
    grammar = None
    try:
        if functions is not None:
            grammar = vocabulary.compile("lark", tool_call_grammar(functions, parallel_tool_calls,
                                                                   ids["<tool_call>"], ids["</tool_call>"]))
        elif schema is not None:
            grammar = vocabulary.compile("json", schema)
    except GrammarError as e:
        field = "tool_choice" if functions is not None else "response_format"
        raise ValueError(f"{field}: the schema cannot be enforced: {e}") from None
    return Steering(
        thinking=thinking, budget=budget if thinking else None, close=tuple(tok.encode(CLOSE_THINKING)),
        think_end=ids["</think>"], gap=tuple(tok.encode("\n\n")),
        ban_thinking=(ids["<tool_call>"],) if functions is not None else (),
        ban_answer=(ids["<think>"],) if thinking_off or thinking else (), grammar=grammar,
        vocabulary=vocabulary if grammar is not None else None,
        shape="tool call" if functions is not None else "JSON" if schema is not None else "")

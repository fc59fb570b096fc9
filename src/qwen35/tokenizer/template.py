"""The chat template's Jinja sandbox, with bounded work: nothing is evaluated at compile time, and a render is
refused once its output or its running time passes a bound.

Jinja's own sandbox guards attribute access only: `{{ 'x' * 10**9 }}` was even evaluated while compiling (2.5 GB
inside `load()`), and nested loops ran without end. Here operators that grow values are checked before they run,
calls and filters refuse size arguments past the output bound, and every loop step, call and output checks a
deadline.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any, Callable

import jinja2
import jinja2.ext
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

MAX_CHARS = 8 << 20  # 32 chars a token over a full 262,144-token context (~1 MB of text); 4x the server's body limit
MAX_SECONDS = 5.0  # the official template renders a 20,000-message, 2.5 MB chat in ~1.3 s on a busy 2-core machine
MAX_POWER_BITS = 1 << 12  # `**` results (a template needs small numbers only)
BUDGET = "qwen35 render budget"  # context key: the space keeps templates from naming it
_NUMBER = re.compile(r"[1-9]\d*")


def _no_underscore(name: Any) -> Any:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"chat templates cannot set namespace attribute {name!r}")
    return name


class _Namespace(jinja2.utils.Namespace):
    """`namespace()` refusing underscore attributes, a sandbox hole transformers closes the same way."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        attrs = dict(*args[1:], **kwargs)
        jinja2.utils.Namespace.__init__(args[0], {_no_underscore(k): v for k, v in attrs.items()})

    def __setitem__(self, name: str, value: Any) -> None:
        _check_sizes((value,))  # the one way a value carries from one loop step to the next
        jinja2.utils.Namespace.__setitem__(self, _no_underscore(name), value)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """HF's `tojson`: plain json.dumps keeping non-ASCII; Jinja's own HTML-escapes, which changes the tokens."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _check_sizes(values: Iterable[Any]) -> None:
    """Refuse an integer beyond the output bound, a width or count that would allocate before any output is
    counted (`center`, `ljust`, `batch`...), and a string or list past it, as a value doubled in a loop grows."""
    for value in values:
        if type(value) is int and abs(value) > MAX_CHARS:
            raise SecurityError(f"chat template passes {value:,} to a call; sizes above {MAX_CHARS:,} are refused")
        if isinstance(value, (str, list, tuple, dict)):
            _check_length(len(value))


def _check_length(n: int) -> None:
    if n > MAX_CHARS:
        raise SecurityError(f"chat template builds a value of {n:,} items; above {MAX_CHARS:,} is refused")


def _check_format(fmt: Any) -> None:
    """Refuse a format string (`%`, `.format`, `|format`) holding a number past the bound, as in '%999999999d'."""
    most = str(MAX_CHARS)  # compared as digit strings: int() of a 5,000-digit run is itself an error
    if isinstance(fmt, str) and any((len(n), n) > (len(most), most) for n in _NUMBER.findall(fmt)):
        raise SecurityError(f"chat template formats with a width above {MAX_CHARS:,}; refused")


def _bounded_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    """A filter with its size arguments checked (functools.wraps keeps Jinja's pass_context marks)."""
    @functools.wraps(f)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        _check_sizes([*args, *kwargs.values()])
        if name == "format":
            _check_format(args[0] if args else None)
        return f(*args, **kwargs)
    return bounded


class _Budget:
    """One render's deadline."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def check(self) -> None:
        if time.monotonic() > self.deadline:
            raise SecurityError(f"chat template rendering took over {self.seconds:g} s and was stopped")


def _budget(context: jinja2.runtime.Context) -> _Budget:
    budget = context.get(BUDGET)
    if budget is None:
        raise SecurityError("chat templates are rendered with qwen35.tokenizer.template.render only")
    return budget


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """The sandbox transformers renders chat templates in (same options and globals, so renders match HF), with
    the bounds above."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def __init__(self) -> None:
        # optimized=False and a finalize that takes the context: nothing is computed while compiling.
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols],
                         optimized=False, finalize=jinja2.pass_context(_output))
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}
        self.globals.update(raise_exception=_raise_exception, namespace=_Namespace,
                            strftime_now=lambda fmt: datetime.now().strftime(fmt))

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        _budget(context).check()
        if operator == "*":
            sized, count = (left, right) if isinstance(right, int) else (right, left)
            if isinstance(sized, (str, list, tuple)) and isinstance(count, int):
                _check_length(len(sized) * count)
        elif operator == "%":
            _check_format(left)
            _check_sizes(right if isinstance(right, tuple) else (right,))
        elif operator == "+":
            if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
                _check_length(len(left) + len(right))
        elif isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and (
                right > MAX_POWER_BITS or left.bit_length() * right > MAX_POWER_BITS):
            raise SecurityError(f"chat template computes {left} ** {right}; results above {MAX_POWER_BITS} bits "
                                "are refused")
        return super().call_binop(context, operator, left, right)

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        _budget(__context).check()
        _check_sizes([*args, *kwargs.values()])
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:  # `value` is a str's format or format_map
            _check_format(value.__self__)
        return wrapped

    @jinja2.pass_context
    def bounded_loop(self, context: jinja2.runtime.Context, iterable: Iterable[Any]) -> Iterator[Any]:
        """Every `{% for %}` iterates through this (see `compile_chat_template`): each step checks the deadline."""
        budget = _budget(context)
        for item in iterable:
            budget.check()
            yield item


def _output(context: jinja2.runtime.Context, value: Any) -> Any:
    """Jinja's finalize, called on each `{{ }}` value."""
    _budget(context).check()
    return value


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile in the bounded sandbox, each for loop's iterable wrapped in `bounded_loop` (an environment
    attribute, which no template variable can shadow)."""
    env = BoundedSandbox()
    tree = env.parse(source)
    for loop in tree.find_all(nodes.For):
        loop.iter = nodes.Call(nodes.EnvironmentAttribute("bounded_loop"), [loop.iter], [], None, None)
    return env.from_string(tree)


def render(template: jinja2.Template, context: dict[str, Any], seconds: float = MAX_SECONDS) -> str:
    """The template's output, refused past MAX_CHARS characters (counted as it streams) or `seconds`."""
    budget = _Budget(seconds)
    parts: list[str] = []
    size = 0
    for part in template.generate({**context, BUDGET: budget}):
        size += len(part)
        if size > MAX_CHARS:
            raise SecurityError(f"chat template output passed {MAX_CHARS:,} characters and was stopped")
        budget.check()
        parts.append(part)
    return "".join(parts)

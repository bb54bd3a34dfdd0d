"""Rendering a model's Jinja chat template, which is untrusted code from the model directory.

The template runs in jinja2's ``ImmutableSandboxedEnvironment`` (as transformers renders it), so it cannot reach
Python internals (``__globals__``, ``__class__``, ...) or mutate its inputs. The sandbox does not bound time or
memory, so rendering also runs under budgets:

- steps: every Python line and call executed while rendering (template code and the filters it calls) costs
  one step, counted by a trace function; nested loops over ``range`` cannot run for hours;
- size: no value the template builds (strings, lists, big integers) and not the output may exceed a size
  limit (a fixed floor plus a multiple of the input), checked before the operations that could jump past it
  (``*``, ``**``, ``%``, ``~``, ``join``, ``replace``, ``center``, ``indent``, ``format``, ``tojson``) and after
  every filter, call and operator;
- ``range`` yields at most :data:`MAX_RANGE` items per call.

Every failure (syntax, sandbox violation, undefined value, ``raise_exception``, budget) is an
:class:`~sparseinfer.errors.InvalidInputError` naming where the template came from.

:func:`apply_chat_template` renders a model directory's template with the inputs transformers'
``tokenizer.apply_chat_template(..., tokenize=False)`` gives it: the template files it reads (``chat_template.jinja``,
``additional_chat_templates/``, else ``tokenizer_config.json``), the special tokens it passes (AddedToken dicts
included), ``tools`` and ``documents`` (None when not given), and messages without their None-valued keys.
"""

from __future__ import annotations

import functools
import json
import os
import re
import string
import sys
import time
from collections.abc import Iterator, Mapping, Sequence, Sized
from datetime import datetime
from pathlib import Path
from typing import Any

from .errors import InvalidInputError, SparseInferError

__all__ = ["MAX_RANGE", "MAX_TEMPLATE_CHARS", "apply_chat_template", "load_chat_templates", "render_chat_template"]

#: Longest template accepted (real ones are a few KB; the longest on the Hub are under 100 KB).
MAX_TEMPLATE_CHARS = 1 << 20
#: Items one ``range()`` call may yield.
MAX_RANGE = 1 << 16
#: Rendering steps allowed, plus :data:`STEPS_PER_MESSAGE` per message.
MAX_STEPS = 2_000_000
STEPS_PER_MESSAGE = 5_000
#: Characters of any value or of the output, plus :data:`SIZE_PER_INPUT_CHAR` per character of the input.
MAX_CHARS = 1 << 20
SIZE_PER_INPUT_CHAR = 4
#: Seconds of this thread's CPU time one render may take: the step budget counts Python lines, and one line can
#: hide C work (``x in a_long_list`` in a nested loop); real templates render in milliseconds.
MAX_CPU_SECONDS = 5.0
#: Steps between two looks at the CPU clock.
CLOCK_EVERY = 1024
#: Bits of an integer a template may build (``2 ** 4096`` is far past any index or count).
MAX_INT_BITS = 4096
#: Oldest jinja2 without known sandbox escapes (CVE-2024-56201, CVE-2024-56326, CVE-2025-27516).
MIN_JINJA = (3, 1, 6)
#: Template files read from ``additional_chat_templates/`` (real models have one or two).
MAX_EXTRA_TEMPLATES = 64
#: The special tokens every transformers tokenizer has; ``*_token`` keys beyond them are passed too (transformers 5
#: treats them as model-specific special tokens), as are the named ``extra_special_tokens``.
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
#: Names a message's reasoning is passed under: transformers copies the first one present to
#: ``reasoning_content`` (what templates read) and to ``thinking`` (gpt-oss templates).
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)")
_DIGITS = re.compile(r"\d+")


class _OverBudget(BaseException):
    """Raised from inside the render when a budget runs out. A BaseException, so that no ``except Exception``
    in jinja2 or a filter swallows it."""


class _Limits:
    """The step and size budgets of one render."""

    def __init__(self, steps: int, chars: int):
        self.steps = steps
        self.chars = chars
        self.tripped: str | None = None
        self.deadline = time.thread_time() + MAX_CPU_SECONDS
        self.next_clock = steps - CLOCK_EVERY

    def fail(self, why: str):
        self.tripped = why
        raise _OverBudget(why)

    def charge(self, n: int = 1) -> None:
        self.steps -= n
        if self.steps < 0:
            self.fail("the template ran too long (step budget exhausted; a loop that never ends?)")
        if self.steps <= self.next_clock:
            self.next_clock = self.steps - CLOCK_EVERY
            if time.thread_time() > self.deadline:
                self.fail(f"the template ran too long (over {MAX_CPU_SECONDS:g} s of CPU time)")

    def trace(self, frame, event, arg):
        # The global trace function: called on every Python call made while rendering.
        self.charge()
        return self.trace_lines

    def trace_lines(self, frame, event, arg):
        if event == "line":
            self.charge()
        return self.trace_lines

    def size(self, obj: Any, cap: int | None = None) -> int:
        """Characters ``obj`` would render to (an upper estimate), counted up to ``cap`` (default: the size
        limit). Every item visited costs a step."""
        from jinja2.utils import Namespace

        cap = self.chars if cap is None else cap
        total, stack, visited = 0, [obj], 0
        while stack and total <= cap:
            x = stack.pop()
            visited += 1
            if isinstance(x, (str, bytes)):
                total += len(x)
            elif isinstance(x, bool) or x is None or isinstance(x, float):
                total += 8
            elif isinstance(x, int):
                total += x.bit_length() // 3 + 2
            elif isinstance(x, Mapping):
                total += 4 * len(x)
                stack.extend(x.keys())
                stack.extend(x.values())
            elif isinstance(x, (list, tuple, set, frozenset)):
                total += 2 * len(x) + 2
                stack.extend(x)
            elif isinstance(x, Namespace):
                stack.append(object.__getattribute__(x, "_Namespace__attrs"))
            else:
                total += 32
        self.charge(visited)
        return total

    def check(self, value: Any, what: str = "a value") -> Any:
        """Returns ``value`` if it fits the size limits, else fails."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > MAX_INT_BITS:
                self.fail(f"{what} is an integer of {value.bit_length()} bits (limit {MAX_INT_BITS})")
        elif self.size(value) > self.chars:
            self.fail(f"{what} is larger than the limit of {self.chars} characters")
        return value

    def need(self, chars: int, what: str) -> None:
        if chars > self.chars:
            self.fail(f"{what} would be larger than the limit of {self.chars} characters")


def _percent_bound(limits: _Limits, fmt: str, args: Any) -> int:
    """An upper bound on the length of ``fmt % args``: the format, widths, precisions and the arguments."""
    total = len(fmt) + limits.size(args)
    for width, precision, _ in _PERCENT_SPEC.findall(fmt):
        if "*" in (width, precision):
            limits.fail("'*' widths in % formats are not allowed in chat templates")
        total += int(width or 0) + int(precision or 0)
    return total


def _format_bound(limits: _Limits, fmt: str, args: Any) -> int:
    """An upper bound on the length of ``fmt.format(*args)``."""
    total = len(fmt) + limits.size(args)
    try:
        fields = list(string.Formatter().parse(fmt))
    except ValueError:
        return total  # format() itself will raise
    for _, _, spec, _ in fields:
        if spec:
            if "{" in spec:
                limits.fail("nested fields in format specs are not allowed in chat templates")
            total += sum(int(d) for d in _DIGITS.findall(spec))
    return total


def _environment(limits: _Limits):
    import jinja2
    import jinja2.ext
    from jinja2.compiler import CodeGenerator
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.utils import Namespace

    class SizedCodeGenerator(CodeGenerator):
        # `a ~ b` compiles to str_join((a, b)), which no sandbox hook sees; route it through a checked join.
        def visit_Concat(self, node, frame):
            self.write("environment.checked_concat(")
            super().visit_Concat(node, frame)
            self.write(")")

    class GenerationExtension(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` (transformers marks assistant turns with it): renders
        its body unchanged."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class ChatNamespace(Namespace):
        # Namespaces refuse underscore names, as transformers' do, so no dunder can be stored on one.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                ChatNamespace._check_name(name)
            Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            ChatNamespace._check_name(name)
            Namespace.__setitem__(self, name, limits.check(value, f"namespace attribute {name!r}"))

        @staticmethod
        def _check_name(name):
            if not isinstance(name, str) or name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    def checked_range(*args):
        r = range(*args)
        if len(r) > MAX_RANGE:
            limits.fail(f"range() of {len(r)} items (limit {MAX_RANGE})")
        return r

    class TemplateDict:
        # transformers' ``dict`` global: builds dicts without handing the template the ``dict`` type itself.
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(f"raise_exception: {message}")

    def strftime_now(fmt):
        if not isinstance(fmt, str) or len(fmt) > 256:
            raise jinja2.exceptions.TemplateError("strftime_now takes a format string of at most 256 characters")
        return datetime.now().strftime(fmt)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # Not jinja2's tojson, which escapes HTML characters; the options of transformers' version.
        small = isinstance(indent, str) and len(indent) <= 16 or type(indent) is int and 0 <= indent <= 16
        if indent is not None and not small:
            raise jinja2.exceptions.TemplateError("tojson indent must be at most 16")
        limits.need(SIZE_PER_INPUT_CHAR * limits.size(x), "tojson output")
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def pre_filter(name: str, value: Any, args: tuple, kwargs: dict) -> None:
        """Bounds the filters whose output can be much larger than their input."""
        if name == "join":
            sep = args[0] if args else kwargs.get("d", "")
            n = len(value) if isinstance(value, Sized) else 0  # iterators arrive materialized
            limits.need(limits.size(value) + limits.size(sep) * n, "join result")
        elif name == "replace" and isinstance(value, str) and len(args) >= 2:
            old, new = str(args[0]), str(args[1])
            limits.need(len(value) + (value.count(old) + 1) * len(new), "replace result")
        elif name == "center":
            width = args[0] if args else kwargs.get("width", 80)
            if isinstance(width, int):
                limits.need(width, "center result")
        elif name == "indent":
            width = args[0] if args else kwargs.get("width", 4)
            w = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
            lines = str(value).count("\n") + 1
            limits.need(len(str(value)) + lines * w, "indent result")
        elif name == "format" and isinstance(value, str):
            limits.need(_percent_bound(limits, value, (args, kwargs)), "format result")
        elif name == "wordwrap":
            # wordwrap(s, width=79, break_long_words=True, wrapstring=None): one wrapstring per line it makes.
            width = args[0] if args else kwargs.get("width", 79)
            wrap = args[2] if len(args) > 2 else kwargs.get("wrapstring")
            text = str(value)
            lines = len(text) // max(width, 1) + text.count("\n") + 1 if isinstance(width, int) else len(text) + 1
            limits.need(len(text) + lines * (len(str(wrap)) if wrap is not None else 1), "wordwrap result")
        elif name in ("string", "pprint", "list", "truncate"):
            limits.need(limits.size(value), f"{name} result")

    def charged(items, what: str):
        """A lazy sequence (``map``, ``select``, a generator) whose items are counted against the size limit as
        they are produced: its own size says nothing of what it will yield."""
        total = 0
        for x in items:
            total += limits.size(x)
            if total > limits.chars:
                limits.fail(f"{what} is larger than the limit of {limits.chars} characters")
            yield x

    def sized_filter(name: str, f):
        pass_arg = jinja2.utils._PassArg.from_obj(f)

        @functools.wraps(f)
        def wrapper(*args, **kwargs):
            head, rest = (args[:1], args[1:]) if pass_arg is not None else ((), args)
            if rest:
                value = rest[0]
                if isinstance(value, Iterator):  # materialized under the budget, so pre_filter sees its size
                    value = list(charged(value, f"the input of the {name!r} filter"))
                    args = head + (value,) + rest[1:]
                pre_filter(name, value, rest[1:], kwargs)
            out = f(*args, **kwargs)
            if isinstance(out, Iterator):
                return charged(out, f"the result of the {name!r} filter")
            return limits.check(out, f"the result of the {name!r} filter")

        return wrapper

    class ChatEnvironment(ImmutableSandboxedEnvironment):
        code_generator_class = SizedCodeGenerator
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(left, int) and isinstance(right, int):
                if abs(left) > 1 and right > 0 and right * left.bit_length() > MAX_INT_BITS:
                    limits.fail(f"{left} ** {right} is too large")
            elif operator == "*":
                seq, n = (left, right) if isinstance(right, int) else (right, left)
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int) and n > 1:
                    limits.need(limits.size(seq) * n, "a repetition")
            elif operator == "%" and isinstance(left, str):
                limits.need(_percent_bound(limits, left, right), "a % format")
            elif operator == "+" and isinstance(left, (str, bytes, list, tuple)):
                limits.need(limits.size(left) + limits.size(right), "a sum")
            return limits.check(super().call_binop(context, operator, left, right), f"the result of {operator!r}")

        def wrap_str_format(self, value):
            fmt = super().wrap_str_format(value)
            if fmt is None:
                return None
            template = value.__self__

            @functools.wraps(fmt)
            def checked(*args, **kwargs):
                limits.need(_format_bound(limits, template, (args, kwargs)), "str.format result")
                return limits.check(fmt(*args, **kwargs), "str.format result")

            return checked

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja2's signature
            target = getattr(__obj, "__self__", None)
            name = getattr(__obj, "__name__", "")
            # str and bytes methods whose result can outgrow their input are bounded before they run.
            if isinstance(target, (str, bytes)):
                kind = type(target).__name__
                if name in ("center", "ljust", "rjust", "zfill", "expandtabs"):
                    width = args[0] if args else kwargs.get("width", kwargs.get("tabsize", 8))
                    if not isinstance(width, int):
                        width = 0
                    tabs = target.count("\t" if isinstance(target, str) else b"\t") + 1
                    limits.need(width * (tabs if name == "expandtabs" else 1), f"{kind}.{name}")
                elif name == "join" and args:
                    items = args[0]
                    if not isinstance(items, Sized):  # a generator: materialized under the size budget
                        items = list(charged(iter(items), f"the input of {kind}.join"))
                        args = (items,) + args[1:]
                    limits.need(limits.size(items) + len(target) * len(items), f"{kind}.join result")
                elif name == "replace" and len(args) >= 2 and isinstance(args[0], type(target)):
                    new = args[1] if isinstance(args[1], (str, bytes)) else ""
                    limits.need(len(target) + (target.count(args[0]) + 1) * len(new), f"{kind}.replace result")
                elif name == "translate" and args:
                    table = args[0]
                    widest = 1
                    if isinstance(table, Mapping):
                        widest = max([limits.size(v) for v in table.values()] + [1])
                    limits.need(len(target) * widest, f"{kind}.translate result")
            return limits.check(super().call(__context, __obj, *args, **kwargs), f"the result of calling {name!r}")

        def checked_concat(self, joined):
            return limits.check(joined, "a ~ concatenation")

    env = ChatEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, GenerationExtension],
        finalize=lambda v: limits.check(v, "an output expression"),
    )
    env.filters["tojson"] = tojson
    # urlize's output (its target and rel attributes per URL) is not bounded by its input; chat templates do
    # not use it.
    env.filters = {name: sized_filter(name, f) for name, f in env.filters.items() if name != "urlize"}
    env.globals.update(
        range=checked_range,
        raise_exception=raise_exception,
        strftime_now=strftime_now,
        namespace=ChatNamespace,
        dict=TemplateDict(),
    )
    env.globals.pop("lipsum", None)
    return env


def _plain(value: Any) -> Any:
    """``value`` rebuilt from plain JSON types, so the template sees no methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (bytes, bytearray)):
        return [_plain(v) for v in value]
    raise InvalidInputError(f"chat messages must hold JSON-like values, got {type(value).__name__}")


def render_chat_template(
    template: str, messages: list[dict[str, Any]], source: str = "chat template", **variables: Any
) -> str:
    """Renders ``template`` (untrusted) with ``messages`` and ``variables`` (e.g. ``add_generation_prompt``,
    ``bos_token``). ``source`` names where the template came from in error messages."""
    try:
        import jinja2
    except ImportError as e:
        raise SparseInferError("chat templates need the 'jinja2' package (pip install 'jinja2>=3.1.6')") from e
    version = tuple(int(p) for p in re.findall(r"\d+", jinja2.__version__)[:3])
    if version < MIN_JINJA:
        raise SparseInferError(
            f"jinja2 {jinja2.__version__} has known sandbox escapes; chat templates need jinja2>=3.1.6"
        )
    if not isinstance(template, str):
        raise InvalidInputError(f"{source}: the chat template must be a string, got {type(template).__name__}")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise InvalidInputError(
            f"{source}: the chat template has {len(template)} characters (limit {MAX_TEMPLATE_CHARS})"
        )
    data = _plain({"messages": messages, **variables})
    input_chars = len(json.dumps(data))
    limits = _Limits(
        steps=MAX_STEPS + STEPS_PER_MESSAGE * len(data["messages"]),
        chars=MAX_CHARS + SIZE_PER_INPUT_CHAR * input_chars,
    )
    env = _environment(limits)
    previous = sys.gettrace()
    try:
        compiled = env.from_string(template)
        pieces: list[str] = []
        length = 0
        sys.settrace(limits.trace)
        try:
            for piece in compiled.generate(**data):
                length += len(piece)
                if length > limits.chars:
                    limits.fail(f"the output is longer than the limit of {limits.chars} characters")
                pieces.append(piece)
        finally:
            sys.settrace(previous)
    except _OverBudget as e:
        raise InvalidInputError(f"{source}: chat template refused: {e}") from None
    except jinja2.TemplateSyntaxError as e:
        raise InvalidInputError(f"{source}: chat template syntax error at line {e.lineno}: {e.message}") from None
    except jinja2.exceptions.SecurityError as e:
        raise InvalidInputError(f"{source}: chat template tried an unsafe operation: {e}") from None
    except jinja2.TemplateError as e:
        raise InvalidInputError(f"{source}: chat template failed: {e}") from None
    except Exception as e:  # the template is untrusted code: any failure is its own
        raise InvalidInputError(f"{source}: chat template failed: {type(e).__name__}: {e}") from None
    if limits.tripped:  # a budget error that something inside the render caught and dropped
        raise InvalidInputError(f"{source}: chat template refused: {limits.tripped}")
    return "".join(pieces)


# -- a model directory's template, with the inputs transformers gives it ----------------------------------------


def _token_text(value: Any) -> str | None:
    """A special token's text: a string, or an AddedToken saved as a dict (``{"__type": "AddedToken",
    "content": ...}``); None for anything else."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def special_tokens(tokenizer_config: Mapping[str, Any], special_tokens_map: Mapping[str, Any] | None = None):
    """The special tokens transformers passes to the template, by name: the standard ones and every other
    ``*_token`` key that holds a token, then the named ``extra_special_tokens``. ``special_tokens_map`` (the
    legacy ``special_tokens_map.json``) overrides them only when the config has no ``added_tokens_decoder``, as
    in transformers."""
    cfg = dict(tokenizer_config)
    if special_tokens_map and "added_tokens_decoder" not in cfg:
        cfg.update({k: v for k, v in special_tokens_map.items() if k != "extra_special_tokens"})
        extra = special_tokens_map.get("extra_special_tokens")
        if isinstance(extra, Mapping):
            cfg["extra_special_tokens"] = {**(cfg.get("extra_special_tokens") or {}), **extra}
    tokens = {}
    for name, value in cfg.items():
        text = _token_text(value)
        if name.endswith("_token") and text is not None:
            tokens[name] = text
    extra = cfg.get("extra_special_tokens")
    if isinstance(extra, Mapping):
        for name, value in extra.items():
            text = _token_text(value)
            if isinstance(name, str) and text is not None:
                tokens[name] = text
    return tokens


def _read_templates(model_dir: Path) -> tuple[Any, dict[str, str]]:
    """The template(s) of ``model_dir`` in transformers' form (a string, a dict of named ones, or None) and the
    file each came from, by name (``""`` for a single one)."""
    from .modeldir import read_json, read_model_file, resolve_inside

    limit = 4 * MAX_TEMPLATE_CHARS  # UTF-8 bytes; the characters are checked when it renders

    def read_text(name: str) -> str | None:
        raw = read_model_file(model_dir, name, limit)
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidInputError(f"{model_dir / name}: not UTF-8 text (byte {e.start})") from None

    templates: dict[str, str] = {}
    files: dict[str, str] = {}
    default = read_text("chat_template.jinja")
    if default is not None:
        templates["default"], files["default"] = default, str(model_dir / "chat_template.jinja")
    extra_dir = resolve_inside(model_dir, "additional_chat_templates")
    if extra_dir.is_dir():
        where = model_dir / "additional_chat_templates"
        try:
            names = sorted(n for n in os.listdir(extra_dir) if n.endswith(".jinja"))
        except OSError as e:
            raise InvalidInputError(f"{where}: cannot be listed: {e.strerror}") from None
        if len(names) > MAX_EXTRA_TEMPLATES:
            raise InvalidInputError(f"{where}: {len(names)} templates (limit {MAX_EXTRA_TEMPLATES})")
        for name in names:
            text = read_text(f"additional_chat_templates/{name}")
            if text is not None:
                templates[name[: -len(".jinja")]] = text
                files[name[: -len(".jinja")]] = str(where / name)
    if list(templates) == ["default"]:
        return templates["default"], {"": files["default"]}
    if templates:
        return templates, files
    config = str(model_dir / "tokenizer_config.json")
    template = read_json(model_dir, "tokenizer_config.json").get("chat_template")
    if isinstance(template, list):
        named = {}
        for t in template:
            if not (isinstance(t, Mapping) and isinstance(t.get("name"), str) and "template" in t):
                raise InvalidInputError(f"{config}: a named chat template must be {{'name': ..., 'template': ...}}")
            named[t["name"]] = t["template"]
        return named, dict.fromkeys(named, config)
    return template, {"": config}


def load_chat_templates(model_dir: str | os.PathLike) -> str | dict[str, str] | None:
    """The chat template(s) of ``model_dir`` as transformers loads them: ``chat_template.jinja`` (the default)
    and ``additional_chat_templates/<name>.jinja`` when present, else ``chat_template`` of
    ``tokenizer_config.json`` (a string, or named templates as ``[{"name": ..., "template": ...}]``). A dict
    when there are several, None when there is none."""
    return _read_templates(Path(model_dir))[0]


def _select_template(model_dir: Path, chat_template: str | None, tools: Any) -> tuple[Any, str]:
    """transformers' ``get_chat_template``: a name picks one of several templates; with ``tools``, ``tool_use``
    is preferred to ``default``. Any other ``chat_template`` string is a template itself. Returns the template
    and where it came from."""
    templates, files = _read_templates(model_dir)
    if isinstance(templates, dict):
        name = chat_template
        if name is None:
            if tools is not None and "tool_use" in templates:
                name = "tool_use"
            elif "default" in templates:
                name = "default"
            else:
                raise InvalidInputError(
                    f"{model_dir}: several chat templates and no default; pass chat_template= one of "
                    f"{sorted(templates)}"
                )
        if name in templates:
            return templates[name], files[name]
    if chat_template is not None:
        return chat_template, "the chat_template argument"
    if templates is None:
        raise InvalidInputError(f"{model_dir} has no chat_template in tokenizer_config.json (or chat_template.jinja)")
    return templates, files[""]


def _chat_messages(messages: Any) -> list[dict[str, Any]]:
    """The messages as transformers hands them to the template: dicts without their None-valued keys, with the
    reasoning under every name templates read it by."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise InvalidInputError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    out = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise InvalidInputError(f"chat messages must be dicts, got {type(m).__name__}")
        m = {k: v for k, v in m.items() if v is not None}
        reasoning = next((m[k] for k in REASONING_FIELDS if k in m), None)
        if reasoning is not None:
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        out.append(m)
    return out


def apply_chat_template(
    model_dir: str | os.PathLike,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = False,
    *,
    tools: list[dict[str, Any]] | None = None,
    documents: list[dict[str, Any]] | None = None,
    chat_template: str | None = None,
    continue_final_message: bool | str = False,
    **kwargs: Any,
) -> str:
    """Renders ``messages`` with the chat template of ``model_dir``, as transformers'
    ``tokenizer.apply_chat_template(messages, tokenize=False, ...)`` does, in the sandbox of
    :func:`render_chat_template`.

    ``tools`` and ``documents`` are JSON schemas and ``{"title": ..., "text": ...}`` dicts; ``chat_template``
    names one of several templates (or is a template); ``continue_final_message`` ends the text inside the last
    message (True: its ``content``; a string: that field, e.g. ``"reasoning_content"``) so generation continues
    it, e.g. a prefilled assistant answer; ``kwargs`` are further template variables (e.g. ``date_string``,
    ``enable_thinking``) and override the special tokens."""
    from .modeldir import read_json

    model_dir = Path(model_dir)
    template, source = _select_template(model_dir, chat_template, tools)
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise InvalidInputError("tools must be JSON schema dicts")
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise InvalidInputError("documents must be dicts with 'title' and 'text' keys")
    if continue_final_message and add_generation_prompt:
        raise InvalidInputError(
            "continue_final_message and add_generation_prompt exclude each other: the first continues the last "
            "message, the second opens a new assistant turn"
        )
    cfg = read_json(model_dir, "tokenizer_config.json")
    legacy = read_json(model_dir, "special_tokens_map.json") if "added_tokens_decoder" not in cfg else None
    variables = {**special_tokens(cfg, legacy), **kwargs}
    chat = _chat_messages(messages)
    continued = _mark_final_message(chat, template, continue_final_message) if continue_final_message else None
    rendered = render_chat_template(
        template,
        chat,
        source=source,
        tools=tools,
        documents=documents,
        add_generation_prompt=add_generation_prompt,
        **variables,
    )
    return rendered if continued is None else _cut_at_final_message(rendered, continued, source)


# transformers' marker: appended to the message to continue, then the rendering is cut where it appears.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _mark_final_message(chat: list[dict[str, Any]], template: str, field: bool | str) -> str:
    """Appends the continuation marker to the last message's ``field`` (``content`` for ``True``; a reasoning
    field marks every copy of it), or to the last text block of a list content, as transformers does. Returns
    the text being continued."""
    name = field if isinstance(field, str) else "content"
    final = chat[-1].get(name)
    if final is None:
        raise InvalidInputError(f"continue_final_message: the final message has no {name!r} to continue")
    fields = [name]
    if name in REASONING_FIELDS:
        fields = [f for f in REASONING_FIELDS if chat[-1].get(f) == final]
    if not any(f in template for f in fields):
        raise InvalidInputError(f"continue_final_message: the chat template never reads the message's {name!r}")
    last = dict(chat[-1])
    if isinstance(final, (list, tuple)):
        blocks = [dict(b) if isinstance(b, Mapping) else b for b in final]
        for block in reversed(blocks):
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                final = block["text"]
                block["text"] = final + _CONTINUE_TAG
                break
        else:
            raise InvalidInputError("continue_final_message: the final message has no text block to continue")
        last[name] = blocks
    elif isinstance(final, str):
        for f in fields:
            last[f] = final + _CONTINUE_TAG
    else:
        raise InvalidInputError(f"continue_final_message: the final message's {name!r} must be text")
    chat[-1] = last
    return final


def _cut_at_final_message(rendered: str, final: str, source: str) -> str:
    """The rendering up to the continued message's end (before the marker; trailing space kept only where the
    template kept the marker's own space)."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise InvalidInputError(
            f"{source}: continue_final_message: the final message does not appear in the rendered chat (the "
            "template changes or drops it)"
        )
    at = rendered.rindex(tag)
    return rendered[:at] if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else rendered[:at].rstrip()

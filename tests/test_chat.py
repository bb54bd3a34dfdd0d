"""Chat templates are untrusted code from the model directory: they render in a sandbox with time and size
budgets, and every failure is an InvalidInputError naming tokenizer_config.json.

Hostile templates run in a child process (hostile_models.run_child) with a memory cap and a timeout, so a
template that escapes, hangs or eats memory fails its test instead of the test run.
"""

from __future__ import annotations

import json

import pytest

import sparseinfer
from sparseinfer import InvalidInputError

hostile_models = pytest.importorskip("hostile_models")
pytest.importorskip("jinja2")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return hostile_models.tiny_llama(tmp_path_factory.mktemp("chat") / "m")


def with_template(model_dir, template, **extra):
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, **extra}))
    return sparseinfer.load(model_dir)


MESSAGES = [{"role": "user", "content": "hi"}]


def test_a_normal_template_renders(model_dir):
    model = with_template(model_dir, CHATML, bos_token="<s>")
    assert model.apply_chat_template(MESSAGES) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert model.generate("hi", chat=True, max_new_tokens=3) is not None


def test_transformers_template_features(model_dir):
    # What Hub templates use: loop controls, tojson without HTML escaping, strftime_now, namespace, trim/lstrip,
    # {% generation %}, special tokens saved as AddedToken dicts.
    template = """
{%- set ns = namespace(n=0) -%}
{{ bos_token }}
{%- for m in messages %}
  {%- if m.role == 'system' %}{% continue %}{% endif %}
  {%- set ns.n = ns.n + 1 %}
{{ m | tojson }}
  {%- if loop.index > 5 %}{% break %}{% endif %}
{%- endfor %}
{% generation %}n={{ ns.n }}{% endgeneration %}
{{ strftime_now('%Y') | length }}"""
    model = with_template(model_dir, template, bos_token={"content": "<s>", "lstrip": False})
    msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "<b>&</b> é"}]
    out = model.apply_chat_template(msgs)
    assert out.startswith("<s>")
    assert '{"role": "user", "content": "<b>&</b> é"}' in out
    assert "n=1" in out and out.endswith("4")


@pytest.mark.parametrize(
    "template",
    [
        "{{ cycler.__init__.__globals__.os.system('touch PWNED') }}",
        "{{ self.__init__.__globals__.__builtins__.__import__('os').system('touch PWNED') }}",
        "{{ joiner.__init__.__globals__.os.system('touch PWNED') }}",
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
        "{{ c(['touch', 'PWNED']) }}{% endif %}{% endfor %}",
        "{{ namespace.__init__.__globals__.os.system('touch PWNED') }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}{{ lipsum.__globals__.os.system('touch PWNED') }}",
        "{{ ('{0.__class__.__init__.__globals__}').format(cycler) }}",
        "{{ messages.append({'role': 'x'}) }}{{ messages | length }}",
        "{{ dict.__class__.__mro__[1].__subclasses__() }}",
        "{{ dict.fromkeys.__func__.__globals__ }}",
    ],
    ids=[
        "cycler-globals",
        "self-globals",
        "joiner-globals",
        "mro-subclasses",
        "namespace-globals",
        "class-base",
        "namespace-dunder",
        "str-format-globals",
        "mutate-input",
        "dict-class",
        "dict-globals",
    ],
)
def test_templates_cannot_run_code(model_dir, tmp_path, template):
    with_template(model_dir, template)  # the template is only rendered in the child
    proc = hostile_models.run_child(
        f"""
        m = sparseinfer.load({str(model_dir)!r})
        print(json.dumps(outcome(lambda: m.generate("hi", chat=True, max_new_tokens=2))))
        """,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (tmp_path / "PWNED").exists(), "the template ran a shell command"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["raised"] == "InvalidInputError", result
    assert "tokenizer_config.json" in result["msg"]


def render_in_child(model_dir, template: str) -> dict:
    """Renders ``template`` as ``model_dir``'s chat template in a child process (a hang or crash fails the
    test, not the run): the outcome, with ``grew_mib``, how far the render raised the child's peak memory."""
    with_template(model_dir, template)
    proc = hostile_models.run_child(
        f"""
        import resource
        m = sparseinfer.load({str(model_dir)!r})
        m.apply_chat_template([{{"role": "user", "content": "hi"}}], chat_template="{{{{ 1 }}}}")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        r = outcome(lambda: m.apply_chat_template([{{"role": "user", "content": "hi"}}]))
        r["grew_mib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024
        print(json.dumps(r))
        """,
        timeout=90,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(10**9) %}x{% endfor %}",
        "{% for i in range(60000) %}{% for j in range(60000) %}{% endfor %}{% endfor %}",
        "{% for a in range(2000) %}{% for b in range(2000) %}{% for c in range(2000) %}{% endfor %}{% endfor %}"
        "{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
        "{{ 'x' * 10**12 }}",
        "{{ ['x'] * 10**12 }}",
        "{{ 10 ** (10 ** 9) }}",
        "{{ '%0999999999d' % 1 }}",
        "{{ '%0999999999d' | format(1) }}",
        "{{ '{:>999999999}'.format(1) }}",
        "{{ 'x' | center(10**10) }}",
        "{{ 'x'.ljust(10**10) }}",
        "{{ ('x\n' * 100000) | indent(100000) }}",
        "{{ ('a' * 100000) | replace('', 'b' * 100000) }}",
        "{% set l = ['y' * 500000] * 4000 %}{{ l | join('') }}",
        "{% set l = ['y' * 500000] * 4000 %}{{ l }}",
        "{% set l = ['y' * 500000] * 4000 %}{{ l | tojson }}",
        "{% for i in range(10**6) %}{{ 'z' * 1000 }}{% endfor %}",
        "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
        "{{ dict.fromkeys(range(60000), 'y' * 500000) }}",
    ],
    ids=[
        "huge-range",
        "nested-range",
        "triple-range",
        "concat-doubling",
        "plus-doubling",
        "str-repeat",
        "list-repeat",
        "huge-pow",
        "percent-width",
        "format-filter-width",
        "str-format-width",
        "center",
        "ljust",
        "indent",
        "replace-empty",
        "join-refs",
        "print-refs",
        "tojson-refs",
        "long-output",
        "recursion",
        "dict-fromkeys-refs",
    ],
)
def test_templates_cannot_hang_or_exhaust_memory(model_dir, template):
    result = render_in_child(model_dir, template)
    assert result["raised"] == "InvalidInputError", result
    assert "tokenizer_config.json" in result["msg"]


@pytest.mark.parametrize(
    "template",
    [
        "{{ range(4000) | map('center', 1000000) | join }}",
        "{{ range(4000) | map('center', 1000000) | list | length }}",
        "{{ range(60000) | join('y' * 100000) }}",
        "{{ ('a ' * 200000) | wordwrap(1, wrapstring='w' * 100000) }}",
    ],
    ids=["lazy-map-join", "lazy-map-list", "join-lazy-separator", "wordwrap-wrapstring"],
)
def test_lazy_and_expanding_filters_are_stopped_by_the_size_budget(model_dir, template):
    # Stopped by the budget before the memory is taken, not by a MemoryError after (the child's 4 GiB cap).
    result = render_in_child(model_dir, template)
    assert result["raised"] == "InvalidInputError" and "limit of" in result["msg"], result


@pytest.mark.parametrize(
    "template",
    [
        '{% set b = "a".encode() %}{{ (b * 3000000000) | length }}',
        '{{ "a".encode().ljust(3000000000) | length }}',
        '{{ ("a" * 2500).translate({97: "x" * 1000000}) | length }}',
        '{% set sep = "x" * 1000000 %}{{ sep.join(range(2000) | map("string")) | length }}',
    ],
    ids=["bytes-repeat", "bytes-ljust", "str-translate", "str-join-generator"],
)
def test_methods_are_bounded_before_they_allocate(model_dir, template):
    # Refused by the size budget before the result exists: the child's peak memory stays small (each of these
    # took 2-3 GB before the check once ran only on results).
    result = render_in_child(model_dir, template)
    assert result["raised"] == "InvalidInputError" and "limit of" in result["msg"], result
    assert result["grew_mib"] < 256, result


def test_c_level_work_inside_one_line_is_stopped_by_the_cpu_budget(model_dir):
    # One `in` over a 65536-item list per loop step: few Python lines, much C work (430 s before the CPU budget).
    result = render_in_child(
        model_dir,
        "{% set l = range(65536) | list %}{% for i in range(65536) %}{% for j in range(65536) %}"
        '{% if "z" in l %}{% endif %}{% endfor %}{% endfor %}',
    )
    assert result["raised"] == "InvalidInputError" and "CPU time" in result["msg"], result


@pytest.mark.parametrize(
    "template, match",
    [
        ("{% for m in messages %}{{ m.content }", "syntax"),
        ("{% if %}", "syntax"),
        ("{{ raise_exception('Conversation roles must alternate') }}", "Conversation roles must alternate"),
        ("{{ undefined_thing.attr }}", "undefined"),
        ("{{ messages[0].content | int + 'x' }}", "failed"),
        ("{{ 1 / 0 }}", "ZeroDivision"),
        ("{% generation %}unclosed", "syntax"),
    ],
)
def test_template_errors_are_typed(model_dir, template, match):
    model = with_template(model_dir, template)
    with pytest.raises(InvalidInputError, match=match) as e:
        model.apply_chat_template(MESSAGES)
    assert "tokenizer_config.json" in str(e.value)


def test_bad_tokenizer_config_values(model_dir):
    for bad in ([1, 2], "not a dict"):
        (model_dir / "tokenizer_config.json").write_text(json.dumps(bad))
        with pytest.raises(InvalidInputError, match="tokenizer_config.json"):
            sparseinfer.load(model_dir).apply_chat_template(MESSAGES)
    model = with_template(model_dir, 12)
    with pytest.raises(InvalidInputError, match="string"):
        model.apply_chat_template(MESSAGES)
    model = with_template(model_dir, "x" * (2 << 20))
    with pytest.raises(InvalidInputError, match="characters"):
        model.apply_chat_template(MESSAGES)


def test_named_templates(model_dir):
    model = with_template(model_dir, [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}])
    assert model.apply_chat_template(MESSAGES) == "D"


def test_template_files_beside_the_config(model_dir, tmp_path):
    # chat_template.jinja (and additional_chat_templates/) take priority over tokenizer_config.json, as in
    # transformers, and are read under the model directory's rules: inside it, regular files, a size limit.
    import os

    with_template(model_dir, "from the config")
    jinja = model_dir / "chat_template.jinja"
    extra = model_dir / "additional_chat_templates"
    try:
        jinja.write_text("from the file")
        assert sparseinfer.load(model_dir).apply_chat_template(MESSAGES) == "from the file"
        extra.mkdir()
        (extra / "tool_use.jinja").write_text("tools: {{ tools | length if tools else 0 }}{{ undefined.x }}")
        model = sparseinfer.load(model_dir)
        assert model.apply_chat_template(MESSAGES) == "from the file"
        with pytest.raises(InvalidInputError, match="tool_use.jinja: chat template failed"):
            model.apply_chat_template(MESSAGES, tools=[{"name": "f"}])
        (extra / "tool_use.jinja").write_text("tools: {{ tools | length if tools else 0 }}")
        assert model.apply_chat_template(MESSAGES, tools=[{"name": "f"}]) == "tools: 1"
        assert model.apply_chat_template(MESSAGES, chat_template="tool_use") == "tools: 0"
        with pytest.raises(InvalidInputError, match="tools must be"):
            model.apply_chat_template(MESSAGES, tools=["not a schema"])

        outside = tmp_path / "outside.jinja"
        outside.write_text("secret")
        jinja.unlink()
        jinja.symlink_to(outside)
        with pytest.raises(InvalidInputError, match="outside the model directory"):
            model.apply_chat_template(MESSAGES)
        jinja.unlink()
        os.mkfifo(jinja)
        with pytest.raises(InvalidInputError, match="not a regular file"):
            model.apply_chat_template(MESSAGES)
        jinja.unlink()
        jinja.write_bytes(b"\xff\xfe")
        with pytest.raises(InvalidInputError, match="UTF-8"):
            model.apply_chat_template(MESSAGES)
        jinja.unlink()
        (extra / "tool_use.jinja").unlink()
        extra.rmdir()
        extra.symlink_to(tmp_path)
        with pytest.raises(InvalidInputError, match="outside the model directory"):
            model.apply_chat_template(MESSAGES)
    finally:
        for p in (jinja, extra):
            if p.is_symlink() or p.is_fifo() or p.is_file():
                p.unlink()
            elif p.is_dir():
                for f in p.iterdir():
                    f.unlink()
                p.rmdir()


def test_messages_must_be_dicts(model_dir):
    model = with_template(model_dir, CHATML)
    for bad in ([], "hi", ["hi"]):
        with pytest.raises(InvalidInputError, match="messages|dicts"):
            model.apply_chat_template(bad)

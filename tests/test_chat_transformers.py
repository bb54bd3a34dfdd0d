"""Chat templates render as transformers renders them: the published templates of SmolLM2, Llama 3.1 and 3.2,
Mistral v0.3, Qwen2.5 and Gemma 2 (tests/fixtures/chat_templates/, copied from the models' tokenizer_config.json),
each compared with ``PreTrainedTokenizerFast.from_pretrained(dir).apply_chat_template(..., tokenize=False)`` on
the same directory: special tokens as strings and as AddedToken dicts, a system prompt, several turns, tools, with
and without the generation prompt, and the same refusals (``raise_exception``).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

import sparseinfer.chat
from sparseinfer import InvalidInputError

pytest.importorskip("jinja2")
transformers = pytest.importorskip("transformers")
tiny_models = pytest.importorskip("tiny_models")

FIXTURES = Path(__file__).parent / "fixtures" / "chat_templates"

#: The special tokens of each model's published tokenizer_config.json (pad and unk where it sets them).
MODELS = {
    "smollm2": {
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|im_end|>",
    },
    "llama-3.1": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "llama-3.2": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "mistral-v0.3": {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None},
    "qwen2.5": {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    "gemma-2": {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"},
}

SYSTEM = {"role": "system", "content": "You are terse.  "}
USER = {"role": "user", "content": "  What is <b>2 & 2</b>? Réponds en français.\n"}
ASSISTANT = {"role": "assistant", "content": "4, ou « quatre ».  "}
USER2 = {"role": "user", "content": "And {{ 3 }} * 3?"}
CONVERSATIONS = {
    "user": [USER],
    "system-user": [SYSTEM, USER],
    "multi-turn": [USER, ASSISTANT, USER2],
    "system-multi-turn": [SYSTEM, USER, ASSISTANT, USER2],
    "ends-with-assistant": [USER, ASSISTANT],
}
#: Conversations a template refuses with raise_exception (transformers raises too).
REFUSED = {
    ("gemma-2", "system-user"),
    ("gemma-2", "system-multi-turn"),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city, in <b>celsius</b> & words",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "e.g. Zürich"}},
            "required": ["city"],
        },
    },
}


def added_token(content: str) -> dict:
    """A special token as older transformers saved it in tokenizer_config.json."""
    return {
        "__type": "AddedToken",
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": True,
    }


def model_dir(path: Path, name: str, tokens: str = "strings", template_file: bool = False) -> Path:
    """A directory with a tiny tokenizer.json and ``name``'s tokenizer_config.json; ``tokens="dicts"`` saves
    the special tokens as AddedToken dicts; ``template_file`` puts the template in chat_template.jinja."""
    path.mkdir(parents=True, exist_ok=True)
    tiny_models.tokenizer_json(path)
    template = (FIXTURES / f"{name}.jinja").read_text()
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8192}
    for key, value in MODELS[name].items():
        cfg[key] = added_token(value) if tokens == "dicts" and value is not None else value
    if template_file:
        (path / "chat_template.jinja").write_text(template)
    else:
        cfg["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def transformers_render(path: Path, messages, **kwargs):
    """transformers' rendering, or the exception it raises."""
    tok = transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
    try:
        return tok.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # what it raised is compared with ours
        return e


def ours(path: Path, messages, **kwargs):
    try:
        return sparseinfer.chat.apply_chat_template(path, messages, **kwargs)
    except InvalidInputError as e:
        return e


def assert_same(path: Path, messages, **kwargs):
    want = transformers_render(path, messages, **kwargs)
    got = ours(path, messages, **kwargs)
    if isinstance(want, Exception):
        assert isinstance(got, InvalidInputError), f"transformers raised {want!r}, we rendered {got!r}"
        assert str(want) in str(got)
        return want
    assert not isinstance(got, Exception), f"transformers rendered {want!r}, we raised {got!r}"
    assert got == want
    return want


class FrozenDatetime(datetime):
    @classmethod
    def now(cls, tz=None):
        return cls(2025, 3, 7, 12, 0, 0, tzinfo=tz)


@pytest.fixture
def frozen_time(monkeypatch):
    """strftime_now reads 7 Mar 2025 in both renderers."""
    from transformers.utils import chat_template_utils

    monkeypatch.setattr(chat_template_utils, "datetime", FrozenDatetime)
    monkeypatch.setattr(sparseinfer.chat, "datetime", FrozenDatetime)


@pytest.fixture(scope="module", params=["strings", "dicts"])
def dirs(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"chat-{request.param}")
    return {name: model_dir(root / name, name, tokens=request.param) for name in MODELS}


@pytest.mark.parametrize("conversation", sorted(CONVERSATIONS))
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("add_generation_prompt", [False, True], ids=["no-prompt", "prompt"])
def test_published_templates_render_as_transformers(dirs, frozen_time, name, conversation, add_generation_prompt):
    out = assert_same(dirs[name], CONVERSATIONS[conversation], add_generation_prompt=add_generation_prompt)
    assert isinstance(out, Exception) == ((name, conversation) in REFUSED)
    if name == "llama-3.2" and not isinstance(out, Exception):
        assert "Today Date: 07 Mar 2025\n" in out


def test_role_alternation_is_refused_as_transformers_refuses_it(dirs):
    # Mistral v0.3 and Gemma 2 check that user and assistant alternate, with raise_exception.
    for name in ("mistral-v0.3", "gemma-2"):
        err = assert_same(dirs[name], [USER, USER2], add_generation_prompt=True)
        assert isinstance(err, Exception) and "alternate" in str(err)


def test_strftime_now_is_todays_date(dirs):
    # Unfrozen, both read the clock; a render that crosses midnight is allowed either day.
    before = datetime.now().strftime("%d %b %Y")
    out = ours(dirs["llama-3.2"], [USER])
    want = transformers_render(dirs["llama-3.2"], [USER])
    after = datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {before}\n" in out or f"Today Date: {after}\n" in out
    assert out == want or before != after


@pytest.mark.parametrize("name", ["llama-3.1", "llama-3.2", "mistral-v0.3", "qwen2.5"])
def test_tools_render_as_transformers(dirs, frozen_time, name):
    assert_same(dirs[name], [SYSTEM, USER], tools=[WEATHER_TOOL], add_generation_prompt=True)


def test_template_variables_and_dropped_none_keys(dirs, frozen_time):
    # Extra variables (Llama's date_string) reach the template; None-valued message keys are dropped, as
    # transformers does, so `'tool_calls' in message` stays false.
    messages = [{"role": "user", "content": "hi", "tool_calls": None}]
    out = assert_same(dirs["llama-3.1"], messages, date_string="1 Jan 2030", add_generation_prompt=True)
    assert "Today Date: 1 Jan 2030" in out


def test_chat_template_jinja_file_wins_like_transformers(tmp_path, frozen_time):
    path = model_dir(tmp_path / "m", "qwen2.5", template_file=True)
    assert assert_same(path, [USER], add_generation_prompt=True).startswith("<|im_start|>system\nYou are Qwen")
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": "ignored"}))
    (path / "additional_chat_templates").mkdir()
    (path / "additional_chat_templates" / "tool_use.jinja").write_text("TOOLS {{ tools | length }}")
    assert assert_same(path, [USER], tools=[WEATHER_TOOL]) == "TOOLS 1"
    assert assert_same(path, [USER]).startswith("<|im_start|>system")


def test_jinja_environment_features_match(tmp_path):
    # What Hub templates use beyond the fixtures: loop controls, tojson's options without HTML escaping,
    # namespace, dict(), {% generation %}, extra special tokens, None rendered as transformers renders it.
    template = """
{%- set ns = namespace(n=0, seen=[]) -%}
{{ bos_token }}{{ image_token }}
{%- for m in messages %}
  {%- if m.role == 'system' %}{% continue %}{% endif %}
  {%- set ns.n = ns.n + 1 %}
{{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=true) }}|{{ dict(a=1, b=m.role) | tojson(separators=(',', ':')) }}
  {%- if loop.index > 2 %}{% break %}{% endif %}
{%- endfor %}
{% generation %}n={{ ns.n }}{% endgeneration %}|{{ tools }}|{{ documents }}|{{ missing is defined }}
{{- dict.fromkeys(['x', 'y'], 0) | tojson }}"""
    path = tmp_path / "m"
    path.mkdir()
    tiny_models.tokenizer_json(path)
    cfg = {
        "chat_template": template,
        "bos_token": added_token("<s>"),
        "eos_token": "</s>",
        "extra_special_tokens": {"image_token": "<image>"},
    }
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    msgs = [SYSTEM, USER, ASSISTANT, USER2, {"role": "user", "content": "never reached"}]
    out = assert_same(path, msgs)
    assert "<b>2 & 2</b>" in out and "<s><image>" in out and "n=2" in out


def test_legacy_special_tokens_map(tmp_path):
    # Without added_tokens_decoder in tokenizer_config.json, special_tokens_map.json's tokens win (transformers'
    # legacy rule); with it, the file is ignored.
    path = tmp_path / "m"
    path.mkdir()
    tiny_models.tokenizer_json(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}|{{ eos_token }}"}))
    (path / "special_tokens_map.json").write_text(json.dumps({"bos_token": added_token("<s>"), "eos_token": "</s>"}))
    assert assert_same(path, [USER]) == "<s>|</s>"


def test_a_loaded_model_renders_the_same(tmp_path, frozen_time):
    hostile_models = pytest.importorskip("hostile_models")
    import sparseinfer

    path = hostile_models.tiny_llama(tmp_path / "m")
    model_dir(path, "llama-3.2")
    model = sparseinfer.load(path)
    want = transformers_render(path, [SYSTEM, USER], add_generation_prompt=True)
    assert model.apply_chat_template([SYSTEM, USER]) == want
    tools = [WEATHER_TOOL]
    assert model.apply_chat_template([USER], tools=tools) == transformers_render(
        path, [USER], tools=tools, add_generation_prompt=True
    )


PREFILL = {"role": "assistant", "content": "Quatre, car deux et deux  "}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize(
    "conversation",
    [
        [USER, PREFILL],
        [SYSTEM, USER, ASSISTANT, USER2, PREFILL],
        [USER, {"role": "assistant", "content": [{"type": "text", "text": "Quatre"}]}],
    ],
    ids=["prefill", "multi-turn-prefill", "content-blocks"],
)
def test_continue_final_message_as_transformers(dirs, frozen_time, name, conversation):
    """The rendering stops inside the last message (its trailing space kept or trimmed as transformers does)."""
    out = assert_same(dirs[name], conversation, continue_final_message=True)
    if not isinstance(out, Exception) and isinstance(conversation[-1]["content"], str):
        assert out.rstrip().endswith(conversation[-1]["content"].rstrip())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(continue_final_message=True, add_generation_prompt=True),
        dict(continue_final_message="reasoning_content"),  # smollm2's template never reads it
        dict(continue_final_message="name"),  # the message has no such field
    ],
)
def test_continue_final_message_refusals_as_transformers(dirs, kwargs):
    want = transformers_render(dirs["smollm2"], [USER, PREFILL], **kwargs)
    assert isinstance(want, ValueError)
    assert isinstance(ours(dirs["smollm2"], [USER, PREFILL], **kwargs), InvalidInputError)

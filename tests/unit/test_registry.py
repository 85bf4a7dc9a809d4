"""The adapter registry: declared capabilities checked at load, keys resolved once, fan-out planned
from the declarations."""

from __future__ import annotations

from types import SimpleNamespace
from typing import ClassVar

import pytest

from imagegate.app.providers import ModelConfig, installed_adapters
from imagegate.workers.adapters import checked, load_adapters, resolve_upstreams
from imagegate.workers.adapters.base import Capabilities, HttpAdapter
from imagegate.workers.fanout import plan_calls


def model(name: str, adapter: str, **values) -> ModelConfig:
    return ModelConfig(name=name, adapter=adapter, base_url="https://u.example", **values)


def test_built_ins_are_loaded_from_the_entry_points_with_their_declarations():
    adapters = load_adapters()
    assert set(adapters) == installed_adapters() >= {"local", "openai", "chat_image", "geekai_async"}
    assert [name for name, adapter in adapters.items() if adapter.capabilities.polling] == ["geekai_async"]
    assert adapters["chat_image"].capabilities.max_images_per_call == 1


def test_a_plugin_that_does_not_declare_what_it_does_is_refused_at_load():
    class Undeclared(HttpAdapter):
        name: ClassVar[str] = "undeclared"

        def generate(self, request): ...

    class PollsWithoutPoll(HttpAdapter):
        name: ClassVar[str] = "half"
        capabilities: ClassVar[Capabilities] = Capabilities(polling=True)

        def submit(self, request): ...

    with pytest.raises(TypeError, match="capabilities"):
        checked("undeclared", Undeclared)
    with pytest.raises(TypeError, match=r"'half'.*needs poll\(\)"):
        checked("half", PollsWithoutPoll)


def test_keys_are_resolved_once_from_api_key_env():
    models = {
        "keyed": model("keyed", "openai", api_key_env="K"),
        "keyless": model("keyless", "openai"),
        "missing": model("missing", "openai", api_key_env="UNSET"),
    }
    upstreams = resolve_upstreams(models, load_adapters(), environ={"K": "sk-resolved-key-123", "UNSET": ""})
    assert upstreams["keyed"].api_key == "sk-resolved-key-123" and upstreams["keyed"].unavailable is None
    assert upstreams["keyless"].api_key is None and upstreams["keyless"].unavailable is None
    assert upstreams["missing"].unavailable == "the environment variable UNSET holding the upstream key is not set"


def test_images_per_call_the_model_then_its_family_then_the_adapter():
    models = {
        "chat": model("chat", "chat_image"),
        "dalle": model("dalle", "openai", family="dall-e-3"),
        "own": model("own", "chat_image", max_images_per_call=3),
        "any": model("any", "openai"),
    }
    upstreams = resolve_upstreams(models, load_adapters(), environ={})
    assert {name: upstream.max_images_per_call for name, upstream in upstreams.items()} == {
        "chat": 1,
        "dalle": 1,
        "own": 3,
        "any": None,
    }


def claim(route: str, n: int) -> SimpleNamespace:
    return SimpleNamespace(route=route, request={"prompt": "p", "n": n})


def test_plan_calls_reads_the_declarations():
    models = {
        "chat": model("chat", "chat_image"),
        "async": model("async", "geekai_async"),
        "any": model("any", "openai"),
        "missing": model("missing", "openai", api_key_env="UNSET"),
    }
    upstreams = resolve_upstreams(models, load_adapters(), environ={})
    assert plan_calls(upstreams, claim("chat", 3), done={1}) == [0, 2]  # one call per image, less the stored
    assert plan_calls(upstreams, claim("async", 3), done=set()) == [0]  # polling: one submission
    assert plan_calls(upstreams, claim("any", 3), done=set()) == [0]
    assert plan_calls(upstreams, claim("missing", 1), done=set()) == []  # cannot be served: no call
    assert plan_calls(upstreams, claim("gone", 1), done=set()) == []

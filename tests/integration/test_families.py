"""Per-family intake checks: check_request over every family, then the same refusals through the
Flask app (400 in OpenAI's shape, nothing stored) on real Postgres."""

from __future__ import annotations

import pytest

from imagegate.app.families import (
    CONSTRAINT_KEYS,
    FAMILIES,
    RequestRefused,
    check_request,
    constraints,
    known_families,
)
from imagegate.app.providers import ModelConfig
from imagegate.app.schemas import GenerationRequest
from imagegate.app.web import create_app


def config(family: str | None = None, **keys) -> ModelConfig:
    return ModelConfig(name=f"m-{family}", adapter="openai", base_url="http://127.0.0.1:9/v1", family=family, **keys)


def request(**fields) -> GenerationRequest:
    return GenerationRequest(**({"prompt": "a cat"} | fields))


def refused(family_or_config, **fields) -> RequestRefused:
    model = family_or_config if isinstance(family_or_config, ModelConfig) else config(family_or_config)
    with pytest.raises(RequestRefused) as caught:
        check_request(request(**fields), model)
    return caught.value


# (family, accepted sizes, refused sizes)
SIZES = [
    ("gpt-image", ["1024x1024", "1536x1024", "auto"], ["1792x1024", "512x512", "1k"]),
    ("gpt-image-2", ["auto", "256x256", "4096x4096", "1000x3000"], ["255x1024", "1024x4097", "2k"]),
    ("dall-e-2", ["256x256", "512x512", "1024x1024"], ["1792x1024", "auto"]),
    ("dall-e-3", ["1024x1024", "1792x1024", "1024x1792"], ["512x512", "auto"]),
    ("banana", ["1k", "2K", "4k"], ["8k", "1024x1024"]),
    ("cogview", ["1024x1024", "768x1344", "720x1440"], ["1024x1536", "auto"]),
    ("wanx", ["768x768", "1024x1024", "1440x1380"], ["767x1024", "1024x1441", "1440x1440", "auto"]),
    ("jimeng", ["512x512", "341x512", "288x512"], ["1024x1024", "512x300"]),
    ("stability", ["64x64", "16384x64", "1024x1024"], ["63x1024", "16385x1024", "auto"]),
    ("grok", ["960x960", "720x1280", "784x1168"], ["1024x1024", "auto"]),
    ("local", ["auto", "2K", "16x16", "4096x4096", "128x96"], ["5000x5000", "4097x16", "8k"]),
]

# (family, accepted ratios, refused ratios)
RATIOS = [
    ("imagen", ["1:1", "3:4", "16:9"], ["2:3", "21:9", "auto"]),
    ("banana", ["1:1", "4:5", "21:9"], ["9:21", "auto"]),
    ("kling", ["16:9", "3:2", "2:3"], ["4:5", "21:9"]),
    ("grok", ["1:1", "9:19.5", "2:1", "auto"], ["4:5", "21:9"]),
]


def test_every_family_has_its_sizes_and_ratios_tested_and_uses_config_key_names():
    assert {family for family, _, _ in SIZES} | {"imagen", "kling"} == known_families() == set(FAMILIES)
    for family, values in FAMILIES.items():
        assert set(values) <= set(CONSTRAINT_KEYS) <= set(ModelConfig.model_fields), family
        if values.get("aspect_ratios"):
            assert family in {f for f, _, _ in RATIOS}


@pytest.mark.parametrize("family,accepted,rejected", SIZES)
def test_sizes(family, accepted, rejected):
    for size in accepted:
        check_request(request(size=size), config(family))
    for size in rejected:
        error = refused(family, size=size)
        assert error.param == "size" and size in error.message


@pytest.mark.parametrize("family,accepted,rejected", RATIOS)
def test_aspect_ratios(family, accepted, rejected):
    for ratio in accepted:
        check_request(request(aspect_ratio=ratio), config(family))
    for ratio in rejected:
        error = refused(family, aspect_ratio=ratio)
        assert error.param == "aspect_ratio" and ratio in error.message
        assert all(allowed in error.message for allowed in FAMILIES[family]["aspect_ratios"])


@pytest.mark.parametrize("family", ["imagen", "kling"])
def test_aspect_ratio_families_take_no_size(family):
    check_request(request(), config(family))
    error = refused(family, size="1024x1024")
    assert error.param == "size" and "takes aspect_ratio, not size" in error.message
    assert all(ratio in error.message for ratio in FAMILIES[family]["aspect_ratios"])


def test_size_messages_name_the_allowed_values():
    assert "1024x1024, 1024x1536, 1536x1024 or auto" in refused("gpt-image", size="512x512").message
    assert "auto or WIDTHxHEIGHT with sides in [256, 4096]" in refused("gpt-image-2", size="100x100").message
    assert (
        "WIDTHxHEIGHT with sides in [768, 1440] and at most 2000000 pixels" in refused("wanx", size="1440x1440").message
    )
    assert (
        "WIDTHxHEIGHT with sides in [64, 16384] and at least 4096 pixels" in refused("stability", size="16x16").message
    )


def test_stability_counts_pixels():
    check_request(request(size="64x64"), config("stability"))  # 4096 pixels: the minimum
    assert refused(config("stability", min_pixels=5000), size="64x64").param == "size"


@pytest.mark.parametrize("family,limit", [("dall-e-2", 1000), ("dall-e-3", 4000), ("gpt-image", 32000), ("grok", 1000)])
def test_prompt_limits(family, limit):
    check_request(request(prompt="x" * limit), config(family))
    # model_construct: 32001 characters is past the schema's own limit, and check_request is under test here.
    with pytest.raises(RequestRefused) as caught:
        check_request(GenerationRequest.model_construct(prompt="x" * (limit + 1)), config(family))
    error = caught.value
    assert error.param == "prompt" and str(limit) in error.message


def test_n_limits():
    check_request(request(n=1), config("dall-e-3"))
    assert refused("dall-e-3", n=2).param == "n"
    check_request(request(n=10), config("dall-e-2"))
    check_request(request(n=10), config("grok"))


def test_keys_on_the_model_override_its_family():
    check_request(request(n=4), config("dall-e-3", max_n=4))
    assert refused(config("dall-e-3", max_n=4), n=5).param == "n"
    check_request(request(size="512x512"), config("dall-e-3", sizes=["512x512"]))
    assert refused(config("dall-e-3", sizes=["512x512"]), size="1024x1024").param == "size"
    assert constraints(config("dall-e-3", max_n=4)) == FAMILIES["dall-e-3"] | {"max_n": 4}
    assert constraints(config("dall-e-3"))["max_images_per_call"] == 1


def test_keys_without_a_family_are_checked_alone():
    check_request(request(size="800x600"), config(max_pixels=500_000))
    check_request(request(size="auto"), config(max_pixels=500_000))  # no list or range: only WxH pixels count
    error = refused(config(max_pixels=400_000), size="800x600")
    assert "at most 400000 pixels" in error.message
    assert refused(config(aspect_ratios=["1:1"]), aspect_ratio="4:3").param == "aspect_ratio"


def test_no_constraints_checks_nothing():
    assert constraints(config()) == {}
    check_request(request(prompt="x" * 32000, n=10, size="9999x9999", aspect_ratio="7:3"), config())


def test_unknown_family_raises():
    with pytest.raises(KeyError, match="no-such-family"):
        constraints(config("no-such-family"))
    with pytest.raises(KeyError):
        check_request(request(), config("no-such-family"))


# --- through the Flask app -------------------------------------------------------------------------

PROVIDERS = """
[models."dalle3"]
adapter = "openai"
base_url = "http://127.0.0.1:9/v1"
family = "dall-e-3"

[models."imagen"]
adapter = "openai"
base_url = "http://127.0.0.1:9/v1"
family = "imagen"

[models."wanx"]
adapter = "openai"
base_url = "http://127.0.0.1:9/v1"
family = "wanx"

[models."dalle3-four"]
adapter = "openai"
base_url = "http://127.0.0.1:9/v1"
family = "dall-e-3"
max_n = 4
"""


@pytest.fixture(scope="module")
def http(tmp_path_factory, settings, redis_dbs, migrated, api_key):
    path = tmp_path_factory.mktemp("families") / "providers.toml"
    path.write_text(PROVIDERS)
    app = create_app(settings.model_copy(update={"providers_file": path, "broker_url": redis_dbs[1]}))
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {api_key}"
    return client


@pytest.mark.parametrize(
    "body,param,expected",
    [
        ({"model": "dalle3", "size": "512x512"}, "size", ["1024x1024", "1792x1024", "1024x1792"]),
        ({"model": "dalle3", "n": 2}, "n", ["at most 1"]),
        ({"model": "dalle3", "prompt": "x" * 4001}, "prompt", ["4000"]),
        ({"model": "imagen", "size": "1024x1024"}, "size", ["takes aspect_ratio, not size", "16:9"]),
        ({"model": "imagen", "aspect_ratio": "21:9"}, "aspect_ratio", ["1:1", "3:4", "4:3", "9:16", "16:9"]),
        ({"model": "wanx", "size": "1440x1440"}, "size", ["[768, 1440]", "2000000 pixels"]),
    ],
)
def test_refused_requests_answer_400_and_store_nothing(http, count_tasks, body, param, expected):
    before = count_tasks()
    response = http.post("/v1/images/generations", json={"prompt": "a cat", "async": True} | body)
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"], error["type"]) == (param, "invalid_value", "invalid_request_error")
    assert all(text in error["message"] for text in expected), error["message"]
    assert count_tasks() == before


@pytest.mark.parametrize(
    "body",
    [
        {"model": "dalle3", "size": "1792x1024"},
        {"model": "imagen", "aspect_ratio": "16:9"},
        {"model": "wanx", "size": "1024x1024"},
        {"model": "dalle3-four", "n": 4},  # the model's own max_n overrides the family's 1
    ],
)
def test_accepted_requests_answer_202(http, count_tasks, body):
    before = count_tasks()
    response = http.post("/v1/images/generations", json={"prompt": "a cat", "async": True} | body)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["task_status"] == "pending"
    assert count_tasks() == before + 1


def test_a_local_model_has_the_local_adapters_limits_unless_it_names_a_family():
    assert ModelConfig(name="l", adapter="local").family == "local"
    assert ModelConfig(name="l", adapter="local", family="stability").family == "stability"
    assert config().family is None  # other adapters have no default family


@pytest.mark.parametrize("size", ["5000x5000", "4097x4096", "8k"])
def test_local_refuses_a_size_it_cannot_draw_at_intake(app_client, api_key, count_tasks, size):
    """It used to be accepted, stored as a task, and failed in the worker (the adapter's MAX_SIDE)."""
    before = count_tasks()
    response = app_client.post(
        "/v1/images/generations",
        json={"model": "local", "prompt": "too big", "size": size, "async": True},
        headers={"Authorization": f"Bearer {api_key}"},
    )
    assert response.status_code == 400
    error = response.get_json()["error"]
    assert (error["param"], error["code"], error["type"]) == ("size", "invalid_value", "invalid_request_error")
    assert size in error["message"] and "4096" in error["message"]
    assert count_tasks() == before

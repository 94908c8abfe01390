"""The official `openai` Python SDK, unchanged, against a running sluice."""

import openai
import pytest
from openai import OpenAI


def test_non_stream_completion(client):
    raw = client.chat.completions.with_raw_response.create(
        model="support",
        messages=[{"role": "user", "content": "How do I get a refund?"}],
        temperature=0.2,
        max_tokens=200,
        user="alice",
    )
    assert raw.headers["x-sluice-request-id"].startswith("req_")
    assert raw.headers["x-sluice-variant"] == "v1"
    resp = raw.parse()
    assert resp.object == "chat.completion"
    assert resp.model == "sim-1"
    assert resp.choices[0].message.role == "assistant"
    assert "refund" in resp.choices[0].message.content
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens > 0


def test_stream_with_usage(client):
    stream = client.chat.completions.create(
        model="support",
        messages=[{"role": "user", "content": "Tell me about shipping"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert "shipping" in text
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens > 0


def test_stream_without_usage_has_no_usage_chunk(client):
    chunks = list(
        client.chat.completions.create(
            model="support", messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert chunks and all(c.usage is None for c in chunks)


def test_stream_matches_non_stream(client):
    msgs = [{"role": "user", "content": "same question"}]
    whole = client.chat.completions.create(model="support", messages=msgs, seed=3)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="support", messages=msgs, seed=3, stream=True)
        if c.choices
    )
    assert streamed == whole.choices[0].message.content


def test_tool_calls(client):
    resp = client.chat.completions.create(
        model="support",
        messages=[{"role": "user", "content": "What's the weather in Oslo?"}],
        tools=[
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
        tool_choice="required",
    )
    call = resp.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert resp.choices[0].finish_reason == "tool_calls"


def test_models_list(client):
    ids = {m.id for m in client.models.list()}
    assert ids == {"support", "broken"}


def test_errors_map_to_sdk_exceptions(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found"

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="support", messages=[{"role": "user", "content": "x"}], temperature=5
        )
    assert e.value.body["param"] == "temperature"

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model="support", messages=[{"role": "user", "content": "x"}], extra_body={"colour": "red"}
        )
    assert e.value.body["param"] == "colour"

    bad = OpenAI(base_url=f"{server.base}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="support", messages=[{"role": "user", "content": "x"}])

    with pytest.raises(openai.InternalServerError) as e:
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])
    assert e.value.status_code == 502
    assert e.value.body["code"] == "upstream_error"


def test_every_request_is_recorded(server, client):
    for i in range(5):
        client.chat.completions.create(model="support", messages=[{"role": "user", "content": f"q{i}"}])
    for c in client.chat.completions.create(
        model="support", messages=[{"role": "user", "content": "s"}], stream=True
    ):
        pass
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert server.stop() == 0
    rows = server.recorded()
    assert len(rows) == 7
    assert sum(1 for r in rows if r["stream"]) == 1
    assert [r["status"] for r in rows].count(404) == 1
    assert all(r["api_key"] == "python" for r in rows)

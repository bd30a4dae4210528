"""Drives `lorakit serve` with the official `openai` Python client (pinned in
scripts/serve-client-venv.sh): chat, completion, streaming, listing models, loading and
unloading an adapter at run time, and error cases. Every check raises on failure; the last
line printed is a JSON summary that tests/integration/serve.rs reads.

usage: openai_client.py BASE_URL API_KEY BASE_MODEL ADAPTER_DIR
"""

import json
import sys

import openai

base_url, api_key, base_model, adapter_dir = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=300)
summary = {"openai_version": openai.__version__}

# Listing models: the base only at first.
ids = [m.id for m in client.models.list().data]
assert ids == [base_model], ids

# Chat, greedy.
chat = client.chat.completions.create(
    model=base_model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=24,
    temperature=0,
)
assert chat.object == "chat.completion", chat
msg = chat.choices[0].message
assert msg.role == "assistant" and msg.content, chat
assert chat.choices[0].finish_reason in ("stop", "length"), chat
assert chat.usage.prompt_tokens > 5 and 0 < chat.usage.completion_tokens <= 24, chat.usage
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
summary["chat"] = msg.content

# The same chat streamed: the chunks add up to the same text, with a finish reason.
stream = client.chat.completions.create(
    model=base_model,
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=24,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
parts, finish, usage, roles = [], None, None, []
for chunk in stream:
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.usage is not None:
        usage = chunk.usage
    for c in chunk.choices:
        if c.delta.role:
            roles.append(c.delta.role)
        if c.delta.content:
            parts.append(c.delta.content)
        if c.finish_reason:
            finish = c.finish_reason
assert "".join(parts) == msg.content, ("".join(parts), msg.content)
assert roles == ["assistant"], roles
assert finish == chat.choices[0].finish_reason, finish
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage
summary["stream_chunks"] = len(parts)

# A completion with a stop string: the text ends before it.
comp = client.completions.create(
    model=base_model, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 7"]
)
assert comp.object == "text_completion", comp
text = comp.choices[0].text
assert " 7" not in text and comp.choices[0].finish_reason == "stop", comp
assert comp.usage.completion_tokens > 0
summary["completion"] = text

# Streamed completion: same text as the whole one.
parts = [
    c.choices[0].text
    for c in client.completions.create(
        model=base_model, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 7"],
        stream=True,
    )
    if c.choices
]
assert "".join(parts) == text, (parts, text)

# Sampling with a seed is reproducible.
a = client.completions.create(model=base_model, prompt="Once", max_tokens=12, temperature=0.9,
                              top_p=0.95, seed=5)
b = client.completions.create(model=base_model, prompt="Once", max_tokens=12, temperature=0.9,
                              top_p=0.95, seed=5)
assert a.choices[0].text == b.choices[0].text, (a, b)

# Loading an adapter at run time (vLLM's endpoint), using it, unloading it.
r = client.post("/load_lora_adapter", body={"lora_name": "peft", "lora_path": adapter_dir},
                cast_to=str)
assert "Success" in r, r
ids = [m.id for m in client.models.list().data]
assert ids == [base_model, "peft"], ids
ad = client.chat.completions.create(
    model="peft",
    messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=24,
    temperature=0,
)
assert ad.model == "peft" and ad.choices[0].message.content, ad
summary["adapter_chat"] = ad.choices[0].message.content
r = client.post("/unload_lora_adapter", body={"lora_name": "peft"}, cast_to=str)
assert "Success" in r, r

# Errors arrive as the client's typed exceptions with OpenAI's error body.
try:
    client.chat.completions.create(model="peft", messages=[{"role": "user", "content": "hi"}])
    raise AssertionError("an unloaded adapter was served")
except openai.NotFoundError as e:
    assert e.status_code == 404 and e.body["code"] == "model_not_found", e.body
try:
    client.completions.create(model=base_model, prompt="hi", temperature="hot")
    raise AssertionError("a string temperature was accepted")
except openai.BadRequestError as e:
    assert e.body["param"] == "temperature", e.body
try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong API key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401

print(json.dumps(summary))

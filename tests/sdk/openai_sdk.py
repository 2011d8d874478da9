"""The official OpenAI Python SDK against the sidecar and against the upstream directly.

Usage: openai_sdk.py SIDECAR_BASE_URL UPSTREAM_BASE_URL UPSTREAM_KEY
Exits non-zero (with the difference) unless both give the same answers: model list,
embeddings, a chat completion and a streamed one (ids and timestamps aside).
"""

import sys

from openai import OpenAI

sidecar_url, upstream_url, key = sys.argv[1:4]
via = OpenAI(base_url=sidecar_url, api_key="the-app-holds-no-key", max_retries=0)
direct = OpenAI(base_url=upstream_url, api_key=key, max_retries=0)
MODEL = "meta/llama-3.1-8b-instruct"
MESSAGES = [{"role": "user", "content": "Say hello"}]


def check(what, a, b):
    if a != b:
        print(f"{what} differs:\n  via sidecar: {a!r}\n  direct:      {b!r}")
        sys.exit(1)
    print(f"ok: {what}")


check("models", [m.id for m in via.models.list()], [m.id for m in direct.models.list()])

e1 = via.embeddings.create(model="nvidia/nv-embedqa-e5-v5", input=["a", "b"])
e2 = direct.embeddings.create(model="nvidia/nv-embedqa-e5-v5", input=["a", "b"])
check("embeddings", [d.embedding for d in e1.data], [d.embedding for d in e2.data])


def chat(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES)
    return (r.model, r.choices[0].message.role, r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens)


check("chat completion", chat(via), chat(direct))


def stream(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return (len(chunks), text, finish)


check("streamed chat completion", stream(via), stream(direct))

"""Health from live traffic with the real llama-server: what it answers to a bad prompt
is a 4xx, which never counts against the child.

No test here makes a real child fail its completions while /health answers: nothing
short of changing llama-server does that (a stopped process stops both; a bad request is
a 4xx). tests/router/test_request_health.py shows the replacement with the fake's knobs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import StartRouter, child_of
from tests.integration.conftest import TinyModels

pytestmark = pytest.mark.integration

# A chat template that raises on one word: llama-server answers such a prompt with 400
# (a Jinja exception is the request's fault) and serves every other one.
TEMPLATE = (
    "{% for m in messages %}{% if 'boom' in m['content'] %}{{ raise_exception('boom') }}{% endif %}"
    "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)


async def test_bad_prompts_to_a_real_child_never_replace_it(
    tiny_models: TinyModels, llama_server_bin: Path, start_router: StartRouter
) -> None:
    r = await start_router(
        "--models-dir", str(tiny_models.dir), "-c", "512", "-np", "2", "--jinja", "--chat-template", TEMPLATE,
        "--request-failures", "2", server_bin=llama_server_bin,
    )
    assert (await r.chat("alpha", max_tokens=1))[0] == 200
    first = child_of(r, "alpha")
    assert first is not None
    bad = {"model": "alpha", "max_tokens": 1, "messages": [{"role": "user", "content": "boom"}]}
    for _ in range(4):  # twice the limit, in a row
        status, body = await r.post("/v1/chat/completions", bad)
        assert status == 400 and "boom" in body["error"]["message"], body
    status, body = await r.chat("alpha", max_tokens=1)
    assert status == 200, body
    now = child_of(r, "alpha")
    assert now is not None and now.pid == first.pid
    assert "requests in a row failed" not in r.log()

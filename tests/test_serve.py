"""`python -m mla_patch.serve`: transformers' OpenAI-compatible server with the patch, as a real process.

Two servers are started on free ports with the embedded default model, one patched and one stock
(`transformers serve`), and queried over HTTP with the standard library's client, both plain and with continuous batching
(--continuous-batching): text completions, streamed and not, must give the same text; malformed requests get an error response and the server keeps serving.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import free_port

from mla_patch import paged  # noqa: E402
from mla_patch.default_model import DEFAULT_MODEL_DIR, DEMO_PROMPTS  # noqa: E402

MODEL = str(DEFAULT_MODEL_DIR)


def _post(port, path, body, raw=None):
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.read().decode()


def _healthy(port) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


# Continuous batching with a small cache (its default takes a share of the machine's memory per server).
CB_FLAGS = ["--continuous-batching", "--cb-num-blocks", "64", "--cb-block-size", "32"]


# transformers before 5.25 cannot run MLA models under continuous batching, stock or patched.
CB_PARAM = pytest.param(CB_FLAGS, marks=pytest.mark.skipif(not paged.has_latent_pages(), reason="no MLA latent pages"))


@pytest.fixture(scope="module", params=[[], CB_PARAM], ids=["generate", "continuous-batching"])
def servers(request, tmp_path_factory):
    """(patched port, stock port, log folder), both up, plain or with continuous batching; stopped after use."""
    stock_cli = "from transformers.cli.transformers import main; import sys; sys.argv[0] = 'transformers'; main()"
    commands = {
        "patched": [sys.executable, "-m", "mla_patch.serve"],
        "stock": [sys.executable, "-c", stock_cli, "serve"],
    }
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    procs, ports = {}, {}
    logs = tmp_path_factory.mktemp("serve")
    for name, command in commands.items():
        ports[name] = free_port()
        log = open(logs / f"{name}.log", "w")
        procs[name] = subprocess.Popen([*command, MODEL, "--host", "127.0.0.1", "--port", str(ports[name]),
                                        "--device", "cpu", *request.param], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 180
        for name in procs:
            while not _healthy(ports[name]):
                if procs[name].poll() is not None or time.time() > deadline:
                    pytest.fail(f"the {name} server did not come up:\n{(logs / f'{name}.log').read_text()[-3000:]}")
                time.sleep(0.5)
        yield ports["patched"], ports["stock"], logs
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def _completion(port, prompt, stream=False):
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "stream": stream}
    text = _post(port, "/v1/completions", body)
    if not stream:
        return json.loads(text)["choices"][0]["text"]
    pieces = []
    for line in text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            pieces.extend(choice.get("text") or "" for choice in json.loads(line[6:]).get("choices", []))
    return "".join(pieces)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_patched_server_answers_as_the_stock_one(servers, stream):
    patched, stock, _ = servers
    for prompt in DEMO_PROMPTS[:2]:
        want = _completion(stock, prompt, stream)
        got = _completion(patched, prompt, stream)
        assert got == want, (prompt[-40:], got, want)
        assert len(got.split()) >= 8, got  # a real continuation, so several decode steps ran


def test_bad_requests_get_errors_and_the_server_keeps_serving(servers, request):
    patched, _, _ = servers
    bad = [(b"{not json", None)]
    if "continuous-batching" not in request.node.callspec.id:
        # With continuous batching, transformers 5.25's own server stops generating after a request without a
        # prompt (its generation loop fails on the empty sequence and later requests get 503), patched or not.
        bad += [(None, {"model": MODEL}), (None, {"model": MODEL, "prompt": "note :", "max_tokens": -3})]
    for raw, body in bad:
        with pytest.raises(urllib.error.HTTPError) as err:
            _post(patched, "/v1/completions", body, raw=raw)
        assert 400 <= err.value.code < 600
    assert _healthy(patched)
    assert _completion(patched, DEMO_PROMPTS[0])


def test_the_patched_server_decodes_absorbed(servers):
    """The model runs in a process the server spawns: its log shows the absorbed decode ran there (on the CPU, the
    op says once that it uses the PyTorch reference), and the stock server's does not."""
    patched, stock, logs = servers
    _completion(patched, DEMO_PROMPTS[2])
    _completion(stock, DEMO_PROMPTS[2])
    assert "mla_patch: serving with" in (logs / "patched.log").read_text()
    assert "decode attention uses the PyTorch reference" in (logs / "patched.log").read_text()
    assert "decode attention uses" not in (logs / "stock.log").read_text()

"""`atd-gguf serve` (converter/serve.py): the patched llama-server behind an OpenAI-compatible API,
exercised with the `openai` client against 127.0.0.1.

The server runs as `python -m converter.cli serve` in a subprocess, as a user starts it; the
reference for its answers is `atd-gguf run` on the same file.
"""

from __future__ import annotations

import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import openai
import psutil
import pytest

from atd_models import shared_smollm2_atd3
from test_convert import assert_one_line_error, run_cli

ROOT = Path(__file__).resolve().parent.parent
THREADS = "1"  # 2-core CI: one thread per process keeps ggml's spinning threads off each other
QUESTION = "What is the capital of Germany?"
N_PREDICT = 24
START_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def atd3_gguf(tmp_path_factory, smollm2_dir) -> Path:
    return shared_smollm2_atd3(tmp_path_factory, smollm2_dir)


def start_serve(model: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """`atd-gguf serve MODEL --port 0 ...` in a subprocess; returns it and the URL it printed."""
    # SIGINT as a terminal has it: a suite started in the background by a shell without job control
    # inherits SIGINT ignored, and Python then keeps it ignored (Ctrl-C would do nothing)
    proc = subprocess.Popen([sys.executable, "-m", "converter.cli", "serve", str(model), "--port", "0",
                             "--parallel", "2", "-c", "1024", "-t", THREADS, *extra],
                            cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if line.startswith("serving "):
                return proc, line.split(" at ", 1)[1].split()[0]
            if not line:  # exited before it was ready
                break
    proc.kill()
    _, stderr = proc.communicate()
    pytest.fail(f"atd-gguf serve did not start (exit {proc.returncode}): {stderr[-2000:]}")


def stop_serve(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def llama_server_child(proc: subprocess.Popen) -> psutil.Process:
    children = psutil.Process(proc.pid).children()
    assert [c.name() for c in children] == ["llama-server"], children
    return children[0]


def urlopen_direct(url: str):
    """GET without any proxy from the environment."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=10)


def accepts_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def server(atd3_gguf):
    proc, url = start_serve(atd3_gguf)
    yield proc, url
    stop_serve(proc)


@pytest.fixture(scope="module")
def client(server):
    # max_retries=0: a failed request must show, not be retried; trust_env=False: no proxy from the environment
    return openai.OpenAI(base_url=f"{server[1]}/v1", api_key="unused", max_retries=0, timeout=120,
                         http_client=openai.DefaultHttpxClient(trust_env=False))


@pytest.fixture(scope="module")
def model_id(client, atd3_gguf) -> str:
    ids = [m.id for m in client.models.list()]
    assert ids == [atd3_gguf.stem]
    return ids[0]


def _ask(client, model_id, max_tokens: int = N_PREDICT, **options):
    return client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": QUESTION}],
                                          temperature=0.0, max_tokens=max_tokens, **options)


def test_chat_completion_equals_atd_gguf_run(client, model_id, atd3_gguf):
    response = _ask(client, model_id)
    answer = response.choices[0].message.content
    reference = run_cli("run", atd3_gguf, "-p", QUESTION, "--chat", "-n", str(N_PREDICT), "-t", THREADS)
    assert reference.exit_code == 0, reference.output
    assert answer.strip() == reference.stdout.strip()
    assert "Berlin" in answer
    assert response.choices[0].finish_reason == "stop"  # the chat template's end-of-turn token ended it


def test_streaming_gives_the_same_answer_in_pieces(client, model_id):
    whole = _ask(client, model_id).choices[0].message.content
    pieces = [chunk.choices[0].delta.content for chunk in _ask(client, model_id, stream=True)
              if chunk.choices and chunk.choices[0].delta.content]
    assert len(pieces) > 1
    assert "".join(pieces) == whole


def test_second_request_is_served_while_the_first_streams(client, model_id, server):
    arrivals: list[float] = []
    first_piece = threading.Event()

    def long_request() -> None:
        stream = client.chat.completions.create(
            model=model_id, messages=[{"role": "user", "content": "Tell me a long story."}], temperature=0.0,
            max_tokens=200, stream=True, extra_body={"ignore_eos": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(time.monotonic())
                first_piece.set()

    worker = threading.Thread(target=long_request)
    worker.start()
    try:
        assert first_piece.wait(timeout=120), "the long request produced nothing"
        short = _ask(client, model_id, max_tokens=4)
        short_done = time.monotonic()
    finally:
        worker.join(timeout=300)
    assert short.choices[0].message.content
    # with one slot the short request would wait until the long one had finished
    assert sum(t > short_done for t in arrivals) > 10, f"{len(arrivals)} pieces"
    with urlopen_direct(f"{server[1]}/slots") as response:
        assert len(json.load(response)) == 2  # --parallel 2 reached llama-server


def test_bad_request_gets_http_error_and_server_keeps_running(client, model_id, server):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=model_id, messages="not a list", max_tokens=4)
    assert caught.value.status_code == 400
    assert "messages" in str(caught.value)
    assert server[0].poll() is None
    with urlopen_direct(f"{server[1]}/health") as response:
        assert response.status == 200
    assert "Berlin" in _ask(client, model_id).choices[0].message.content


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_server_and_child(atd3_gguf, stop_signal):
    proc, url = start_serve(atd3_gguf)
    try:
        child = llama_server_child(proc)
        proc.send_signal(stop_signal)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stderr.read()
        assert not child.is_running()
        assert not accepts_connections(url)
    finally:
        stop_serve(proc)


def test_killed_serve_leaves_no_orphan(atd3_gguf):
    """SIGKILL gives atd-gguf no chance to clean up: the kernel stops the child (PR_SET_PDEATHSIG)."""
    proc, url = start_serve(atd3_gguf)
    child = llama_server_child(proc)
    try:
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 30
        while child.is_running() and child.status() != psutil.STATUS_ZOMBIE and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
    finally:
        stop_serve(proc)
        if child.is_running():  # the test failed: no orphan left behind by it either
            child.kill()


def test_bad_models_are_one_line(tmp_path, atd3_gguf):
    assert_one_line_error(run_cli("serve", tmp_path / "nope.gguf"), "nope.gguf", "no such file")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    assert_one_line_error(run_cli("serve", text), "not a GGUF file")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(atd3_gguf.read_bytes()[: atd3_gguf.stat().st_size // 2])
    assert_one_line_error(run_cli("serve", truncated, "--port", "0", "-t", THREADS), "truncated.gguf",
                          "not a readable GGUF file")


def test_busy_port_is_one_line(atd3_gguf):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert_one_line_error(run_cli("serve", atd3_gguf, "--port", port), f"127.0.0.1:{port}", "--port 0")


def test_serve_without_build_names_make_llama(tmp_path, atd3_gguf, monkeypatch):
    monkeypatch.setenv("ATD_LLAMA_BIN_DIR", str(tmp_path))
    assert_one_line_error(run_cli("serve", atd3_gguf, "--port", "0"), "make llama")

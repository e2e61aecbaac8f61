"""`atd-gguf publish` against a local fake Hub (tests/fake_hub.py) with the real huggingface_hub client.

The CLI runs in a subprocess with HF_HUB_DISABLE_XET=1 (read by huggingface_hub at import time),
HF_TOKEN set and HF_HOME pointing into the test's directory, so the test can also check that the
token shows up nowhere: not in stdout/stderr, not in any file written, not in what was uploaded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import pytest
import yaml
from fake_hub import FakeHub
from test_modelfile import ALPACA_JINJA, LLAMA3_ATD_ARGS, converted, write_tiny_gguf

import gguf_types  # noqa: F401  (ATD names for gguf.GGMLQuantizationType)
from converter.inspect_gguf import inspect_file
from converter.modelfile import CHATML, LLAMA3_INSTRUCT, read_gguf_header
from converter.publish import build_model_card, plan_publish

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "hf_TESTtokenDoNotLeak0123456789abcdef"
BASE_URL = "https://huggingface.co/HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny-atd2.gguf", license="apache-2.0",
                           base_model_url=BASE_URL)


@pytest.fixture
def hub():
    with FakeHub(token=TOKEN) as server:
        yield server


@pytest.fixture
def workdir(tmp_path) -> Path:
    (tmp_path / "hf_home").mkdir()
    return tmp_path


def run_publish(workdir: Path, *args: str, token: str | None = TOKEN) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGING_FACE_")) and k not in ("HUGGINGFACE_HUB_CACHE",)}
    env.update(HF_HOME=str(workdir / "hf_home"), HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1", HOME=str(workdir), PYTHONPATH=str(ROOT))
    if token is not None:
        env["HF_TOKEN"] = token
    return subprocess.run([sys.executable, "-m", "converter.cli", "publish", *map(str, args)],
                          cwd=workdir, env=env, capture_output=True, text=True, timeout=300, check=False)


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    head, sep, _ = readme[4:].partition("\n---\n")
    assert sep, "unterminated front matter"
    data = yaml.safe_load(head)
    assert isinstance(data, dict)
    return data


def assert_token_nowhere(result: subprocess.CompletedProcess, workdir: Path, hub: FakeHub | None = None) -> None:
    assert TOKEN not in result.stdout and TOKEN not in result.stderr
    for path in workdir.rglob("*"):
        if path.is_file() and not path.is_symlink():
            assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"
    if hub is not None:
        for repo in hub.repos.values():
            for name, data in repo.files.items():
                assert TOKEN.encode() not in data, f"token uploaded in {name}"


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_publish_one_commit(tiny_gguf, hub, workdir):
    result = run_publish(workdir, tiny_gguf, "--repo", "tester/tiny-atd2-GGUF", "--private", "--endpoint", hub.url)
    assert result.returncode == 0, result.stderr
    assert "uploaded tiny-atd2.gguf, README.md, template, params" in result.stdout

    # the client's calls, in order; nothing unknown
    assert hub.unknown == []
    assert hub.routes_called() == ["whoami", "create_repo", "validate_yaml", "preupload", "commit"]
    assert all(r.headers.get("Authorization", r.headers.get("authorization")) == f"Bearer {TOKEN}"
               for r in hub.requests)

    # private honored
    assert hub.create_payloads == [{"name": "tiny-atd2-GGUF", "organization": "tester", "visibility": "private",
                                    "type": "model"}]
    repo = hub.repos["tester/tiny-atd2-GGUF"]
    assert repo.private

    # one commit with exactly these files and contents
    assert len(repo.commits) == 1 and repo.commits[0]["revision"] == "main"
    assert sorted(repo.files) == ["README.md", "params", "template", "tiny-atd2.gguf"]
    assert repo.files["tiny-atd2.gguf"] == tiny_gguf.read_bytes()
    assert repo.files["template"].decode() == CHATML.template
    assert json.loads(repo.files["params"]) == {"stop": ["<|im_start|>", "<|im_end|>"]}

    readme = repo.files["README.md"].decode()
    meta = front_matter(readme)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "gguf"
    assert meta["license"] == "apache-2.0"
    assert meta["quantized_by"] == "atd-gguf"
    assert {"gguf", "ternary", "atd"} <= set(meta["tags"])
    assert "| ATD2 | 1 | 2,048 | 864 | 3.375 |" in readme  # 8 blocks of 2 * (2 + 52) bytes
    assert "ggml type ids 1001" in readme and "ATD format 2" in readme
    assert "No quality measurements" in readme
    assert "ollama run hf.co/tester/tiny-atd2-GGUF" in readme and "make llama" in readme
    assert "atd-gguf export --stock" in readme
    assert_token_nowhere(result, workdir, hub)


def test_publish_public_existing_repo(tiny_gguf, hub, workdir):
    first = run_publish(workdir, tiny_gguf, "--repo", "tester/again", "--endpoint", hub.url)
    assert first.returncode == 0, first.stderr
    second = run_publish(workdir, tiny_gguf, "--repo", "tester/again", "--endpoint", hub.url,
                         "--license", "mit", "--base-model", "someone/Base-Model")
    assert second.returncode == 0, second.stderr  # 409 from create is "exists", not an error
    assert [p["visibility"] for p in hub.create_payloads] == ["public", "public"]
    repo = hub.repos["tester/again"]
    assert not repo.private and len(repo.commits) == 2
    meta = front_matter(repo.files["README.md"].decode())
    assert meta["license"] == "mit" and meta["base_model"] == "someone/Base-Model"
    assert hub.unknown == []


def test_publish_converted_fixture(llama3_dir, tmp_path_factory, hub, workdir):
    model = converted(tmp_path_factory, llama3_dir, "llama3-atd2", *LLAMA3_ATD_ARGS)
    quality = workdir / "quality.md"
    quality.write_text("| file | PPL |\n|---|---|\n| llama3-atd2 | 12.3 |\n")
    result = run_publish(workdir, model, "--repo", "tester/llama3-tiny-atd2", "--endpoint", hub.url,
                         "--license", "llama3.1", "--quality", quality)
    assert result.returncode == 0, result.stderr
    repo = hub.repos["tester/llama3-tiny-atd2"]
    assert sorted(repo.files) == ["README.md", "llama3-atd2.gguf", "params", "template"]
    assert repo.files["llama3-atd2.gguf"] == model.read_bytes()
    assert repo.files["template"].decode() == LLAMA3_INSTRUCT.template
    assert json.loads(repo.files["params"])["stop"] == list(LLAMA3_INSTRUCT.stops)
    readme = repo.files["README.md"].decode()
    meta = front_matter(readme)
    assert "base_model" not in meta  # unknown for the fixture: omitted, not guessed
    assert "atd" in meta["tags"] and meta["license"] == "llama3.1"
    assert "| llama3-atd2 | 12.3 |" in readme and "No quality measurements" not in readme
    counts = Counter(gguf.GGMLQuantizationType(t).name for t in read_gguf_header(model).tensor_types.values())
    assert set(counts) == {"ATD2", "F16", "F32"}
    for qtype, n in counts.items():
        assert f"| {qtype} | {n} | " in readme
    assert_token_nowhere(result, workdir, hub)


def test_dry_run_contacts_nobody(tiny_gguf, hub, workdir):
    result = run_publish(workdir, tiny_gguf, "--repo", "tester/dry", "--dry-run", "--endpoint", hub.url, token=None)
    assert result.returncode == 0, result.stderr
    assert hub.requests == [] and hub.repos == {}
    out = result.stdout
    assert "would create public model repo tester/dry" in out
    size = tiny_gguf.stat().st_size
    assert f"tiny-atd2.gguf  {size:>14,} bytes" in out
    for name in ("README.md", "template", "params"):
        assert f"  {name} " in out
    assert "library_name: gguf" in out and "--- README.md ---" in out


def test_dry_run_without_any_server(tiny_gguf, workdir):
    result = run_publish(workdir, tiny_gguf, "--repo", "tester/dry", "--dry-run", "--endpoint",
                         f"http://127.0.0.1:{closed_port()}")
    assert result.returncode == 0, result.stderr
    assert_token_nowhere(result, workdir)


def test_unauthorized(tiny_gguf, workdir):
    with FakeHub(token=TOKEN, mode="unauthorized") as server:
        result = run_publish(workdir, tiny_gguf, "--repo", "tester/x", "--endpoint", server.url)
        assert server.repos == {}
    line = one_error_line(result)
    assert "rejected the token (401 Unauthorized)" in line and "HF_TOKEN" in line
    assert_token_nowhere(result, workdir)


def test_wrong_token(tiny_gguf, hub, workdir):
    result = run_publish(workdir, tiny_gguf, "--repo", "tester/x", "--endpoint", hub.url, token="hf_wrong")
    assert "401 Unauthorized" in one_error_line(result)
    assert hub.repos == {}


def test_forbidden(tiny_gguf, workdir):
    with FakeHub(token=TOKEN, mode="forbidden") as server:
        result = run_publish(workdir, tiny_gguf, "--repo", "someorg/x", "--endpoint", server.url)
    line = one_error_line(result)
    assert "403 Forbidden" in line and "someorg/x" in line
    assert_token_nowhere(result, workdir)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused(tiny_gguf, workdir):
    port = closed_port()
    result = run_publish(workdir, tiny_gguf, "--repo", "tester/x", "--endpoint", f"http://127.0.0.1:{port}")
    line = one_error_line(result)
    assert line == f"error: cannot reach the Hub at http://127.0.0.1:{port}: connection refused"
    assert_token_nowhere(result, workdir)


def test_no_token(tiny_gguf, hub, workdir):
    result = run_publish(workdir, tiny_gguf, "--repo", "tester/x", "--endpoint", hub.url, token=None)
    line = one_error_line(result)
    assert "no Hugging Face token" in line and "HF_TOKEN" in line
    assert hub.requests == []


@pytest.mark.parametrize("repo", ["noslash", "a/b/c", "bad name/x", "ns/"])
def test_bad_repo_id(tiny_gguf, hub, workdir, repo):
    assert "--repo must be NAMESPACE/NAME" in one_error_line(
        run_publish(workdir, tiny_gguf, "--repo", repo, "--endpoint", hub.url))
    assert hub.requests == []


def test_unknown_template_and_license(tmp_path, hub, workdir):
    model = write_tiny_gguf(tmp_path / "alpaca.gguf", ALPACA_JINJA, atd=False)
    result = run_publish(workdir, model, "--repo", "tester/alpaca", "--endpoint", hub.url)
    assert result.returncode == 0, result.stderr
    assert "no license known" in result.stderr and "chat template not recognized" in result.stderr
    repo = hub.repos["tester/alpaca"]
    assert sorted(repo.files) == ["README.md", "alpaca.gguf"]  # no template/params for an unknown template
    meta = front_matter(repo.files["README.md"].decode())
    assert "license" not in meta and "base_model" not in meta
    assert "atd" not in meta["tags"] and {"gguf", "ternary"} <= set(meta["tags"])


def test_library_plan_and_card(tiny_gguf, tmp_path):
    plan = plan_publish(tiny_gguf, "tester/lib", private=True)
    assert [f.path_in_repo for f in plan.files] == ["tiny-atd2.gguf", "README.md", "template", "params"]
    assert plan.files[0].local_path == tiny_gguf and plan.files[0].size == tiny_gguf.stat().st_size
    assert plan.total_bytes == sum(f.size for f in plan.files)
    card = build_model_card(inspect_file(tiny_gguf), repo_id="a/b", license="other", quality="  ")
    meta = front_matter(card)
    assert meta["license"] == "other" and "base_model" not in meta and "base_model_relation" not in meta
    assert "No quality measurements" in card
    # a ChatML template with a built-in default system prompt also gets Ollama's `system` file
    smol = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are SmolTest.<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}")
    plan = plan_publish(write_tiny_gguf(tmp_path / "smol.gguf", smol, license="mit"), "tester/smol")
    files = {f.path_in_repo: f.content for f in plan.files}
    assert list(files) == ["smol.gguf", "README.md", "template", "params", "system"]
    assert files["system"] == b"You are SmolTest."
    # a value YAML would misread is quoted
    assert front_matter(build_model_card(inspect_file(tiny_gguf), repo_id="a/b", license="yes"))["license"] == "yes"


# ---- hostile input (issue 13: D6, D14, D15, D16) ----------------------------------------------------

class _EchoingProxy:
    """An HTTP server that answers every request 400 with the request's headers in the error text,
    as a misconfigured proxy might."""

    def __init__(self):
        import http.server
        import threading

        class Handler(http.server.BaseHTTPRequestHandler):
            def _echo(self):
                headers = "; ".join(f"{k}: {v}" for k, v in self.headers.items())
                body = json.dumps({"error": f"bad request, you sent {headers}"}).encode()
                self.send_response(400)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = _echo

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def test_server_text_echoing_the_token_is_redacted(tiny_gguf, workdir):
    with _EchoingProxy() as url:
        result = run_publish(workdir, tiny_gguf, "--repo", "tester/x", "--endpoint", url)
    line = one_error_line(result)
    assert "400" in line and "[redacted]" in line, line
    assert "Bearer" not in line.split("[redacted]")[-1]
    assert_token_nowhere(result, workdir)


def test_redact():
    from converter.publish import redact

    assert redact(f"x Authorization: Bearer {TOKEN} y") == "x Authorization: [redacted] y"
    assert redact(f'{{"authorization": "Bearer abc.def"}}') == '{"authorization": "[redacted]"}'
    assert redact(f"token {TOKEN}.") == "token [redacted]."
    assert redact("secret s3cr3t here", token="s3cr3t") == "secret [redacted] here"
    assert redact("404 Not Found: no such repo") == "404 Not Found: no such repo"


@pytest.mark.parametrize("license", ["1.0", "2e3", "0x1F", "null", "on", "3"])
def test_license_that_yaml_would_read_as_another_type(license, tiny_gguf):
    card = build_model_card(inspect_file(tiny_gguf), repo_id="a/b", license=license)
    assert front_matter(card)["license"] == license


@pytest.mark.parametrize("base", ["a/..", "../x", "a/b--c", "a/b.", "a/.git"])
def test_base_model_validated_like_repo(base, tiny_gguf, workdir):
    from converter.errors import AtdError

    with pytest.raises(AtdError, match="--repo must be"):
        plan_publish(tiny_gguf, base)
    result = run_publish(workdir, tiny_gguf, "--repo", "tester/x", "--base-model", base, "--dry-run")
    assert "--base-model must be NAMESPACE/NAME" in one_error_line(result)


def test_card_is_inert_for_hostile_metadata(tmp_path):
    model = tmp_path / "m.gguf"
    writer = gguf.GGUFWriter(model, "llama")
    writer.add_name("Nice\n\n<img src=x onerror=alert(1)>\n# Owned [click](http://evil) \x1b]0;t\x07")
    writer.add_string("atd.method", "grid **bold** <b>")
    writer.add_tensor("output_norm.weight", np.ones(256, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    card = build_model_card(inspect_file(model), repo_id="a/b", atd_types={"ATD2": 1})
    body = card.split("\n---\n", 1)[1]
    title = body.strip().splitlines()[0]
    assert title.startswith("# Nice") and title.endswith(" — GGUF")  # the whole name on the title line
    assert "<img" not in body and "<b>" not in body and "\x1b" not in body and "\x07" not in body
    assert "[click](http" not in body and "**bold**" not in body
    assert not any(line.startswith("# Owned") for line in body.splitlines())


def test_hostile_file_name_in_dry_run_and_card(tmp_path, workdir):
    import shlex

    name = "it's `evil` $(rm -rf x).gguf"
    model = write_tiny_gguf(tmp_path / name, license="mit")
    result = run_publish(workdir, model, "--repo", "tester/x", "--dry-run")
    assert result.returncode == 0, result.stderr
    assert f"hf download tester/x {shlex.quote(name)} --local-dir ." in result.stdout
    assert f"``{name}`` was converted from" in result.stdout  # a code span that its backticks cannot close
    bad = write_tiny_gguf(tmp_path / "two\nlines\x1b[2J.gguf", license="mit")
    result = run_publish(workdir, bad, "--repo", "tester/x", "--dry-run")
    line = one_error_line(result)
    assert "two\\nlines\\x1b[2J.gguf" in line and "rename it" in line

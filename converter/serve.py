"""`atd-gguf serve`: an OpenAI-compatible HTTP server for a GGUF on the patched llama-server.

llama-server (built by `make llama`, docs/llama-plugin.md) runs as a child process with the
GGUF's own chat template (--jinja) and `parallel` request slots. It answers /v1/chat/completions,
/v1/completions and /v1/models (OpenAI's API, streaming included) and /health. `LlamaServer`
starts it, waits until /health says it is ready, and stops it: SIGTERM, then SIGKILL. On Linux
the child is also sent SIGTERM by the kernel if the thread that started it dies without cleaning
up, so a killed `atd-gguf serve` leaves no orphan behind.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import AtdError
from .model_check import check_runnable, explain_load_failure, llama_log_cause
from .run import bin_dir

LOG_LINES_KEPT = 200  # llama-server's log is kept only this far back, for the failure message
STOP_GRACE_S = 10.0


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port
    parallel: int = 2  # requests served at the same time (llama-server slots)
    ctx_size: int = 2048  # context length of each slot
    threads: int | None = None  # default: llama.cpp's choice
    startup_timeout_s: float = 600.0  # loading a large model from a slow disk takes minutes
    echo_log: bool = False  # copy llama-server's log to stderr


def server_binary() -> Path:
    path = bin_dir() / "llama-server"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise AtdError(f"the patched llama.cpp is not built ({path} missing): run `make llama` first")
    return path


def _bound_port(host: str, port: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.bind((host, port))
        return probe.getsockname()[1]


def choose_port(host: str, port: int) -> int:
    """PORT if nothing listens there (else another server would answer our health checks); for 0,
    a free port the kernel picks."""
    try:
        return _bound_port(host, port)
    except OSError as e:
        if port:
            raise AtdError(f"cannot listen on {host}:{port} ({e.strerror}): pick another --port, "
                           "or --port 0 for any free one") from None
        raise AtdError(f"cannot listen on {host} ({e.strerror})") from None


def build_command(model: Path, options: ServeOptions, port: int) -> list[str]:
    cmd = [str(server_binary()), "-m", str(model), "--host", options.host, "--port", str(port),
           "--jinja",  # the chat template stored in the GGUF
           "--parallel", str(options.parallel),
           "-c", str(options.ctx_size * options.parallel),  # llama-server splits -c over the slots
           "--alias", model.stem,
           "--check-tensors"]  # invalid ATD data is refused at load, as `run` does
    if options.threads:
        cmd += ["-t", str(options.threads)]
    return cmd


def failure_line(log_lines: list[str]) -> str:
    """The line of llama-server's log that names the cause (the same rule as `run`'s)."""
    return llama_log_cause("\n".join(log_lines)) or "it printed nothing"


def _kill_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when its parent thread dies (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(1, int(signal.SIGTERM))  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before the hook ran
            os._exit(1)

    return hook


class LlamaServer:
    """The patched llama-server on one model; a context manager that starts and stops it.

    Start it from a thread that outlives the server: on Linux the child is stopped when that
    thread ends.
    """

    def __init__(self, model: str | Path, options: ServeOptions = ServeOptions()):
        self.model = Path(model)
        self.options = options
        self.port: int | None = None
        self.process: subprocess.Popen | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=LOG_LINES_KEPT)
        self._log_reader: threading.Thread | None = None
        # straight to the server: a proxy from the environment must not see 127.0.0.1 traffic
        self._http = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def url(self) -> str:
        host = f"[{self.options.host}]" if ":" in self.options.host else self.options.host
        return f"http://{host}:{self.port}"

    @property
    def api_url(self) -> str:
        """The base URL for OpenAI clients."""
        return f"{self.url}/v1"

    def start(self) -> LlamaServer:
        check_runnable(self.model)  # what llama-server would abort on, refused in one line
        self.port = choose_port(self.options.host, self.options.port)
        cmd = build_command(self.model, self.options, self.port)
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=_kill_with_parent_hook())
        self._log_reader = threading.Thread(target=self._read_log, name="llama-server-log", daemon=True)
        self._log_reader.start()
        try:
            self._wait_until_healthy()
        except BaseException:  # a failed start, Ctrl-C or SIGTERM while loading: no server left behind
            self.stop()
            raise
        return self

    def _read_log(self) -> None:
        for raw in self.process.stdout:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self._log.append(line)
            if self.options.echo_log:
                print(line, file=sys.stderr, flush=True)

    def _log_failure_line(self) -> str:
        if self._log_reader is not None:
            self._log_reader.join(timeout=5)  # the rest of the log, up to the exit
        return failure_line(list(self._log))

    def _failure(self, what: str) -> AtdError:
        return AtdError(f"llama-server {what} on {self.model}: {self._log_failure_line()}")

    def _startup_failure(self, code: int) -> AtdError:
        """A defect of the file (truncated, ATD format 1) if it has one, else llama-server's error."""
        return explain_load_failure(self.model, f"llama-server (exit code {code})", self._log_failure_line())

    def healthy(self) -> bool:
        """True once the model is loaded (/health answers 200; 503 while loading)."""
        try:
            with self._http.open(f"{self.url}/health", timeout=5) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self.options.startup_timeout_s
        while not self.healthy():
            code = self.process.poll()
            if code is not None:
                raise self._startup_failure(code)
            if time.monotonic() > deadline:
                raise self._failure(f"was not ready after {self.options.startup_timeout_s:.0f} s")
            time.sleep(0.1)

    def wait(self) -> None:
        """Block while the server runs; it only ends on its own by failing, which raises AtdError."""
        code = self.process.wait()
        raise self._failure(f"exited with code {code}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _StopRequested(Exception):
    pass


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _request_stop(signum, frame) -> None:
    for sig in _STOP_SIGNALS:  # a repeated signal must not interrupt the stopping itself
        signal.signal(sig, signal.SIG_IGN)
    raise _StopRequested(signum)


def serve_until_stopped(model: str | Path, options: ServeOptions = ServeOptions(),
                        on_ready: Callable[[LlamaServer], None] | None = None) -> None:
    """Run the server until Ctrl-C, SIGTERM or SIGHUP (then stop it and return), or until it fails
    (AtdError). Call it from the main thread: that is where Python delivers signals."""
    previous = {sig: signal.signal(sig, _request_stop) for sig in _STOP_SIGNALS}
    try:
        with LlamaServer(model, options) as server:
            if on_ready is not None:
                on_ready(server)
            server.wait()
    except (KeyboardInterrupt, _StopRequested):
        return
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

"""The README's "Inside vLLM" blocks run as written, in what `make vllm-setup` makes and the README tells a user to
set: the script (a full prefill, then reuse of it), and the OpenAI-compatible server started by the README's command,
sent the README's request body twice (the second prompt reuses the first; the stats come back in the response).
Each runs in a process of its own, from the source tree, without PYTHONPATH (the package is on the venv's path)."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from test_readme import readme_blocks

ROOT = Path(__file__).resolve().parents[2]
MODEL = "build/smollm2-135m-fp32"  # where the README's blocks find the model, relative to the source tree
START_TIMEOUT_S = 600


def the_block(lang: str, containing: str) -> str:
    found = [b for b in readme_blocks("Inside vLLM", lang) if containing in b]
    assert len(found) == 1, f"README, Inside vLLM: expected one {lang} block with {containing!r}, found {len(found)}"
    return found[0]


def user_env() -> dict:
    """A user's shell: no PYTHONPATH, and the KV cache size the README sets."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VLLM_CPU_KVCACHE_SPACE")}
    env["VLLM_CPU_KVCACHE_SPACE"] = "2"
    return env


@pytest.fixture(scope="module")
def readme_model():
    pytest.importorskip("vllm")
    if not (ROOT / MODEL / "config.json").is_file():
        pytest.skip(f"no converted model at {MODEL} (`make vllm-setup` makes it)")


def stats_lines(stdout: str) -> list:
    return [line.split(maxsplit=2) for line in stdout.splitlines() if line.split()[:1] in (["full"], ["reuse"],
                                                                                             ["fallback"])]


def test_readme_script(readme_model, tmp_path):
    script = tmp_path / "reuse.py"
    script.write_text(the_block("python", "LLM("))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=user_env(), capture_output=True, text=True,
                          timeout=START_TIMEOUT_S + 300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = stats_lines(proc.stdout)
    assert [line[0] for line in lines] == ["full", "reuse"], proc.stdout[-2000:]
    assert float(lines[1][1]) > 0.5, lines  # most of the second prompt's K/V reused


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


def test_readme_server(readme_model, tmp_path):
    command = the_block("bash", "api_server").rstrip()
    assert command.splitlines()[0].startswith("source .venv-vllm/bin/activate")
    if Path(sys.executable).parent.parent.resolve() != (ROOT / ".venv-vllm").resolve():
        pytest.skip("the README's command activates .venv-vllm; this run uses another venv")
    port = _free_port()
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(["bash", "-c", f"{command} --port {port}"], cwd=ROOT, env=user_env(), stdout=out,
                                  stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert server.poll() is None, f"the server exited ({server.returncode}):\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"no server after {START_TIMEOUT_S} s:\n{log.read_text()[-4000:]}"
            time.sleep(2)

        curl = the_block("bash", "curl")
        body = json.loads(re.search(r"-d '(.*?)'", curl, re.S).group(1))
        assert body["prompt"] == "..." and "semshare" in body["kv_transfer_params"], body
        text = " ".join(f"Parcel {i} left the Oslo depot on day {i % 7 + 1} with {3 * i + 2} boxes." for i in range(40))
        edited = text.replace("Parcel 17 left the Oslo", "Parcel 17 was held at the Bergen")
        first = _post(f"{base}/v1/completions", dict(body, prompt=text))
        second = _post(f"{base}/v1/completions", dict(body, prompt=edited))
        assert first["kv_transfer_params"]["semshare"]["mode"] == "full", first
        stats = second["kv_transfer_params"]["semshare"]
        assert stats["mode"] == "reuse" and stats["reuse_ratio"] > 0.5, stats
        assert second["choices"][0]["text"], second
    finally:  # the server and the engine processes it started: one process group
        for sig, wait_s in ((signal.SIGTERM, 60), (signal.SIGKILL, None)):
            try:
                os.killpg(server.pid, sig)
            except ProcessLookupError:
                break
            try:
                server.wait(timeout=wait_s)
                break
            except subprocess.TimeoutExpired:
                continue

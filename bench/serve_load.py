"""A short load test of `sdcli serve` (`make bench`): requests per minute and client-side latency percentiles.

The server runs as a subprocess on a free port of 127.0.0.1 (nothing else is ever contacted) with a tiny
random SD 1.x checkpoint (the tests' TINY_SD1), fp32 on the CPU. With a model that small, a 64x64 4-step
txt2img costs little, so the numbers measure the server's own overhead and queueing (HTTP, JSON, the
queue, PNG and base64 encoding), not image speed; bench/run.py times the real-size networks.

Each phase runs its clients until `--requests` answers have come back or `--time-limit` has passed. A 429
(the queue is full: `--queue` requests wait behind the one running) is expected once more clients than
that ask at once; it is counted, and that client asks again after a short pause. Latencies are those of
the 200 answers, measured by the client from sending to the whole body received.

    .venv/bin/python bench/serve_load.py                       # phases of 1, 4 and 8 clients
    .venv/bin/python bench/serve_load.py --clients 4 --requests 100
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

BENCH = Path(__file__).resolve().parent
TESTS = BENCH.parent / "tests"
HOST = "127.0.0.1"  # loopback only, by construction: the server binds it and every request goes to it
RETRY_PAUSE_S = 0.05


@dataclass
class Phase:
    """What one phase's clients saw."""

    clients: int
    latencies: list[float] = field(default_factory=list)
    rejected: int = 0  # 429: the queue was full
    failed: list[str] = field(default_factory=list)  # any other answer, or no answer
    wall: float = 0.0


def cpu_description() -> str:
    """The CPU's model name and whether it has native bf16, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU (no /proc/cpuinfo)"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return f"{model}, {os.cpu_count()} logical cores, avx512_bf16: {'yes' if 'avx512_bf16' in flags else 'no'}"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def build_checkpoint(folder: Path) -> Path:
    """The tests' tiny random SD 1.x checkpoint (fp32), written into `folder`."""
    sys.path.insert(0, str(TESTS))
    from conftest import TINY_SD1, write_checkpoint

    return Path(write_checkpoint(TINY_SD1, folder / "tiny-sd1.safetensors"))


def start_server(checkpoint: Path, port: int, queue: int, threads: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch takes its thread count from it
    args = [sys.executable, "-m", "sdcli", "serve", "--model", str(checkpoint), "--weights-dir", str(checkpoint.parent)]
    args += ["--host", HOST, "--port", str(port), "--queue", str(queue), "--device", "cpu", "--dtype", "fp32"]
    with log.open("w") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_until_healthy(client: httpx.Client, server: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def run_phase(base_url: str, clients: int, requests: int, time_limit: float, payload: dict) -> Phase:
    """`clients` threads ask for images until `requests` 200s have come back or `time_limit` has passed."""
    phase = Phase(clients)
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit
    claimed = 0  # requests handed out; a 429 gives its claim back

    def claim() -> bool:
        nonlocal claimed
        with lock:
            if claimed >= requests or time.monotonic() >= deadline:
                return False
            claimed += 1
            return True

    def client_loop() -> None:
        nonlocal claimed
        with httpx.Client(base_url=base_url, timeout=max(time_limit, 60)) as client:
            while claim():
                start = time.perf_counter()
                try:
                    response = client.post("/sdapi/v1/txt2img", json=payload)
                except httpx.HTTPError as error:
                    with lock:
                        phase.failed.append(f"{type(error).__name__}: {error}")
                    continue
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status_code == 200 and len(response.json()["images"]) == 1:
                        phase.latencies.append(elapsed)
                    elif response.status_code == 429:
                        phase.rejected += 1
                        claimed -= 1
                    else:
                        phase.failed.append(f"{response.status_code}: {response.text[:200]}")
                if response.status_code == 429:
                    time.sleep(RETRY_PAUSE_S)

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    phase.wall = time.perf_counter() - start
    return phase


def percentile(values: list[float], q: int) -> float:
    """The q-th percentile (inclusive method; exact for the median)."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def report(phase: Phase) -> str:
    ok = len(phase.latencies)
    per_minute = 60 * ok / phase.wall if phase.wall else float("nan")
    p50, p90, p99 = (1000 * percentile(phase.latencies, q) for q in (50, 90, 99))
    return (
        f"| {phase.clients} | {ok} | {phase.rejected} | {len(phase.failed)} | {phase.wall:.1f} | {per_minute:.0f} "
        f"| {p50:.0f} | {p90:.0f} | {p99:.0f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,8", help="concurrent clients of each phase (default 1,4,8)")
    parser.add_argument("--requests", type=int, default=40, help="200 answers per phase (default 40)")
    parser.add_argument("--time-limit", type=float, default=120, help="seconds per phase at most (default 120)")
    parser.add_argument("--size", type=int, default=64, help="width and height (default 64)")
    parser.add_argument("--steps", type=int, default=4, help="sampling steps (default 4)")
    parser.add_argument("--queue", type=int, default=4, help="the server's --queue (default 4)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="the server's torch threads (all cores)")
    args = parser.parse_args()
    phases = [int(n) for n in args.clients.split(",")]
    payload = {"prompt": "a lighthouse at dusk", "width": args.size, "height": args.size, "steps": args.steps}
    payload |= {"sampler_name": "Euler", "seed": 1, "cfg_scale": 7}

    # The server is killed on every way out, SIGTERM to this script included.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    print(f"CPU: {cpu_description()}", flush=True)
    print(f"server: sdcli serve --device cpu --dtype fp32 --queue {args.queue}, torch threads {args.threads} "
          f"(OMP_NUM_THREADS); tiny random SD 1.x checkpoint; txt2img {args.size}x{args.size}, {args.steps} steps, "
          f"Euler, CFG 7", flush=True)  # fmt: skip
    print(f"load average at start: {load_average()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sdcli-serve-load-") as tmp:
        folder = Path(tmp)
        checkpoint = build_checkpoint(folder)
        port = free_port()
        base_url = f"http://{HOST}:{port}"
        log = folder / "server.log"
        server = start_server(checkpoint, port, args.queue, args.threads, log)
        try:
            with httpx.Client(base_url=base_url, timeout=60) as client:
                wait_until_healthy(client, server, log)
                for _ in range(3):  # warm-up: first-call costs (allocator, oneDNN kernels) stay out of the numbers
                    client.post("/sdapi/v1/txt2img", json=payload).raise_for_status()
            print("| clients | 200 | 429 | other | wall s | requests/min | p50 ms | p90 ms | p99 ms |")
            print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|", flush=True)
            results = []
            for clients in phases:
                results.append(run_phase(base_url, clients, args.requests, args.time_limit, payload))
                print(report(results[-1]), flush=True)
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    print(f"load average at end: {load_average()}")
    for phase in results:
        for failure in phase.failed[:3]:
            print(f"{phase.clients} clients, other answer: {failure}")
    if any(phase.failed for phase in results):
        sys.exit(1)


if __name__ == "__main__":
    main()

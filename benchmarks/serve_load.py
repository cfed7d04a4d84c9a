#!/usr/bin/env python
"""Load on `effigen serve` from a second process on loopback: requests/s and latency percentiles at several client
counts, then overload (far more clients than the queue holds): how many requests are refused, whether any fails
otherwise, whether the server stays up, and the server's resident memory throughout.

    python benchmarks/serve_load.py --pipeline runs/mnist-dit/final
    python benchmarks/serve_load.py --pipeline DIR --clients 1,2,4,8 --requests 48 --batch 4 --steps 10 \\
        --concurrency 1 --max-queue 16 --overload-clients 64 --json serve_load.json

This script starts the server itself (`effigen serve --pipelines DIR --port FREE ...`, with its Gradio cache in a
temporary folder it measures) and is the load generator: each client is a thread with its own HTTP connection that
sends `/generate` requests back to back through Gradio's HTTP API (`POST /gradio_api/call/generate`, then the
result's event stream). Latency is from the POST to the final event, as a client sees it (queueing included).
Requests/s counts completed requests over the wall time of the phase; "sampling" is the server's own time for the
sampling call, so latency minus sampling is queueing plus the server's HTTP/Gradio overhead. Server memory is VmRSS of the server process,
sampled every 50 ms from /proc (Linux).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SEEDS, SEED_LOCK = itertools.count(), threading.Lock()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def folder_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


class MemorySampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self._stop_event = pid, every, [], threading.Event()

    def run(self):
        while not self._stop_event.is_set():
            value = rss_mib(self.pid)
            if value is not None:
                self.samples.append(value)
            time.sleep(self.every)

    def stop(self) -> list[float]:
        self._stop_event.set()
        self.join()
        return self.samples


def request(http, url: str, data: list, timeout: float) -> tuple[str, float, str]:
    """One /generate call: (outcome, seconds, message); outcome is ok, refused (queue full) or error. For ok, the
    message is the server's own sampling time (the request's `info.seconds`), as text."""
    start = time.perf_counter()
    try:
        answer = http.post(f"{url}/gradio_api/call/generate", json={"data": data}, timeout=timeout)
        if answer.status_code == 503 and "queue is full" in answer.text.lower():
            return "refused", time.perf_counter() - start, answer.text  # Gradio refuses at the door when full
        if answer.status_code != 200:
            return "error", time.perf_counter() - start, f"HTTP {answer.status_code}: {answer.text[:200]}"
        event_id = answer.json()["event_id"]
        stream = http.get(f"{url}/gradio_api/call/generate/{event_id}", timeout=timeout).text
    except Exception as e:  # a dropped connection or a timeout counts as an error, not a crash of the script
        return "error", time.perf_counter() - start, f"{type(e).__name__}: {e}"
    seconds = time.perf_counter() - start
    event, message = None, ""
    for line in stream.splitlines():
        if line.startswith("event:"):
            event = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and event == "error":
            message = line.split(":", 1)[1].strip()
        elif line.startswith("data:") and event == "complete":
            message = str(json.loads(line.split(":", 1)[1])[2]["seconds"])
    if event == "complete":
        return "ok", seconds, message
    if "queue is full" in message.lower():
        return "refused", seconds, message
    return "error", seconds, message or f"stream ended with {event!r}"


def run_phase(url: str, clients: int, per_client: int, data: list, timeout: float) -> dict:
    import httpx

    def client(_):
        results = []
        with httpx.Client() as http:
            for _ in range(per_client):
                with SEED_LOCK:
                    seed = next(SEEDS)
                results.append(request(http, url, [*data[:2], seed, *data[3:]], timeout))  # new images each time
        return results

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    wall = time.perf_counter() - start
    ok = [s for outcome, s, _ in results if outcome == "ok"]
    compute = [float(m) for outcome, _, m in results if outcome == "ok"]
    errors = [m for outcome, _, m in results if outcome == "error"]
    record = {"clients": clients, "requests": len(results), "completed": len(ok),
              "refused": sum(outcome == "refused" for outcome, _, _ in results), "errors": len(errors),
              "error_examples": sorted(set(errors))[:3], "wall_s": wall, "requests_per_s": len(ok) / wall}
    if ok:
        record.update({f"latency_p{q}_s": float(np.percentile(ok, q)) for q in (50, 90, 99)})
        record["latency_max_s"] = max(ok)
        record["compute_p50_s"] = float(np.median(compute))  # the sampling call itself, timed by the server
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pipeline", required=True, help="the pipeline folder to serve and load")
    parser.add_argument("--clients", default="1,2,4,8", help="client counts of the load phases")
    parser.add_argument("--requests", type=int, default=48, help="requests per load phase (split over its clients)")
    parser.add_argument("--batch", type=int, default=4, help="images per request")
    parser.add_argument("--steps", type=int, help="sampling steps per request (default: the saved ones)")
    parser.add_argument("--concurrency", type=int, default=1, help="the server's --concurrency")
    parser.add_argument("--max-queue", type=int, default=16, help="the server's --max-queue")
    parser.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    parser.add_argument("--overload-clients", type=int, default=64, help="clients of the overload phase")
    parser.add_argument("--overload-requests", type=int, default=4, help="back-to-back requests per overload client")
    parser.add_argument("--timeout", type=float, default=300.0, help="per-request timeout, seconds")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    name = Path(args.pipeline).resolve()
    name = name.parent.name if name.name == "final" else name.name

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cache = Path(tempfile.mkdtemp(prefix="effigen-serve-load-"))
    env = dict(os.environ, GRADIO_TEMP_DIR=str(cache), OMP_NUM_THREADS=str(args.threads),
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    command = [sys.executable, "-m", "effigen", "serve", "--pipelines", args.pipeline, "--port", str(port),
               "--threads", str(args.threads), "--concurrency", str(args.concurrency),
               "--max-queue", str(args.max_queue), "--max-images", str(max(args.batch, 1))]
    log = open(cache.parent / f"{cache.name}.log", "w")
    finished = False
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    import httpx

    try:
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited ({server.returncode}); see {log.name}")
            try:
                if httpx.get(url + "/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"the server did not answer within 180 s; see {log.name}")
            time.sleep(0.3)
        data = [name, "", 0, "", "" if args.steps is None else str(args.steps), args.batch]
        rss_idle = rss_mib(server.pid)
        warm = run_phase(url, 1, 2, data, args.timeout)
        if warm["completed"] != 2:
            raise SystemExit(f"warm-up requests failed: {warm}")
        print(f"effigen serve load: {name} (batch {args.batch}, steps {args.steps or 'saved'}), server --concurrency "
              f"{args.concurrency} --max-queue {args.max_queue} --threads {args.threads}; {os.cpu_count()} CPUs, "
              f"{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f} (other processes "
              f"share the CPUs); server RSS idle {rss_idle:.0f} MiB")
        phases = []
        sampler = MemorySampler(server.pid)
        sampler.start()
        for clients in [int(c) for c in args.clients.split(",")]:
            phase = run_phase(url, clients, max(1, args.requests // clients), data, args.timeout)
            phases.append(phase)
            print(f"  {clients:>3} clients: {phase['completed']}/{phase['requests']} completed, "
                  f"{phase['requests_per_s']:.2f} req/s ({phase['requests_per_s'] * args.batch:.1f} images/s), latency "
                  + ", ".join(f"p{q} {phase.get(f'latency_p{q}_s', float('nan')):.3f} s" for q in (50, 90, 99))
                  + f" (sampling p50 {phase.get('compute_p50_s', float('nan')):.3f} s); refused {phase['refused']}, "
                  f"errors {phase['errors']}")
        load_rss = sampler.stop()
        sampler = MemorySampler(server.pid)
        sampler.start()
        overload = run_phase(url, args.overload_clients, args.overload_requests, data, args.timeout)
        overload_rss = sampler.stop()
        alive = server.poll() is None
        after = request(httpx, url, data, args.timeout)[0] if alive else "down"
        overload.update({"server_alive_after": alive, "request_after": after})
        print(f"  overload, {args.overload_clients} clients x {args.overload_requests}: "
              f"{overload['completed']} completed, "
              f"{overload['refused']} refused (queue full), {overload['errors']} other errors "
              f"{overload['error_examples'] or ''}; server alive after: {alive}, next request: {after}")
        memory = {"idle_mib": rss_idle, "load_max_mib": max(load_rss), "overload_max_mib": max(overload_rss),
                  "after_mib": rss_mib(server.pid), "gradio_cache_mib": folder_mib(cache),
                  "gradio_cache_files": sum(1 for f in cache.rglob("*") if f.is_file())}
        print(f"  server RSS: idle {memory['idle_mib']:.0f} MiB, max under load {memory['load_max_mib']:.0f} MiB, max "
              f"under overload {memory['overload_max_mib']:.0f} MiB, after {memory['after_mib']:.0f} MiB; Gradio cache "
              f"{memory['gradio_cache_files']} files, {memory['gradio_cache_mib']:.1f} MiB")
        if args.json:
            record = {"settings": vars(args), "pipeline": name, "cpus": os.cpu_count(),
                      "load_average_end": os.getloadavg()[0], "phases": phases,
                      "overload": overload, "memory_mib": memory}
            Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
            print(f"wrote {args.json}")
        finished = True
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        shutil.rmtree(cache, ignore_errors=True)
        if finished:  # the server's log is kept only when something went wrong
            Path(log.name).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Latency of the fine-tuning jobs API under concurrent clients, beside a bare FastAPI app as the floor.

    AFINA_DATABASE_URL=postgresql+psycopg://postgres@127.0.0.1/test python benchmarks/jobs_api_latency.py
    python benchmarks/jobs_api_latency.py --clients 50 --seconds 20          # SQLite in a temporary file

Two servers, each in a process of its own on loopback, get the same load: `--clients` concurrent
clients (one httpx connection pool), each sending one request after another for `--seconds`, in turn:
list jobs, get a job, list a job's events, create a job.

- `afina`: `afina server` as users start it, on a blank store (a schema of its own on PostgreSQL,
  dropped afterwards), with an API key; no-op workers in this process drain the jobs the clients
  create, as `afina worker` would elsewhere.
- `floor`: a bare FastAPI app on the same uvicorn answering every request with a constant JSON body
  the size of afina's job object: what routing, HTTP and the client cost, with no work behind them.

Reports p50/p95/p99 latency and requests per second, per kind of request and overall, and the ratio
of afina's to the floor's. Every client runs on one event loop in this process, so on a small machine
the client, the workers and the server share the CPUs; the floor pays the same client cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx2 as httpx

from afina.jobs.keys import hash_api_key, new_api_key
from afina.jobs.worker import JobContext, JobOutcome, Worker
from afina.store import open_store

sys.path.insert(0, str(Path(__file__).parent))  # a blank database per run, made as the queue benchmark does
from job_queue import fresh_database

KINDS = ("list jobs", "get job", "list events", "create job")
ROWS = [{"messages": [{"role": "user", "content": f"ticket {i}: the printer is jammed"},
                      {"role": "assistant", "content": '{"category": "printer"}'}]} for i in range(20)]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def wait_until_up(process: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit("the server did not start within 120 s")


def start_process(command: list[str], env: dict, url: str, log: Path) -> subprocess.Popen:
    with log.open("ab") as out:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT)
    wait_until_up(process, url, log)
    return process


def stop_process(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()


# the load

class Load:
    """The requests one run sends, on either server: the same paths and bodies."""

    def __init__(self, key: str, training_file: str, job_ids: list[str]):
        self.headers = {"Authorization": f"Bearer {key}"}
        self.training_file, self.job_ids = training_file, job_ids

    async def send(self, client: httpx.AsyncClient, kind: str, turn: int) -> None:
        job_id = self.job_ids[turn % len(self.job_ids)]
        if kind == "list jobs":
            answer = await client.get("/v1/fine_tuning/jobs", params={"limit": 20}, headers=self.headers)
        elif kind == "get job":
            answer = await client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=self.headers)
        elif kind == "list events":
            answer = await client.get(f"/v1/fine_tuning/jobs/{job_id}/events", headers=self.headers)
        else:
            answer = await client.post("/v1/fine_tuning/jobs", headers=self.headers,
                                       json={"model": "default", "training_file": self.training_file})
        answer.raise_for_status()


async def run_load(url: str, load: Load, clients: int, seconds: float) -> dict[str, list[float]]:
    """`clients` clients sending the mix for `seconds`; every request's latency, by kind."""
    latencies: dict[str, list[float]] = defaultdict(list)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        deadline = time.perf_counter() + seconds

        async def one_client(number: int) -> None:
            turn = number
            while time.perf_counter() < deadline:
                kind = KINDS[turn % len(KINDS)]
                started = time.perf_counter()
                await load.send(client, kind, turn)
                latencies[kind].append(time.perf_counter() - started)
                turn += 1

        await asyncio.gather(*(one_client(n) for n in range(clients)))
    return latencies


def summarize(latencies: dict[str, list[float]], seconds: float) -> dict[str, dict]:
    every = [value for values in latencies.values() for value in values]
    rows = {kind: latencies[kind] for kind in KINDS} | {"all": every}
    return {name: {"requests": len(values), "requests_per_s": round(len(values) / seconds, 1),
                   "p50_ms": round(1000 * statistics.median(values), 2),
                   "p95_ms": round(1000 * percentile(values, 95), 2),
                   "p99_ms": round(1000 * percentile(values, 99), 2)} for name, values in rows.items()}


# the two servers

def no_op_workers(url: str, count: int, stop: threading.Event) -> list[threading.Thread]:
    """Workers that claim and finish jobs without doing anything, as `afina worker` would elsewhere."""
    def no_op(context: JobContext) -> JobOutcome:
        return JobOutcome("succeeded", fine_tuned_model=f"ft:default::{context.job.id}")

    store = open_store(url)
    threads = [threading.Thread(target=Worker(store, name=f"bench-{i}", run_job=no_op, poll_seconds=0.05)
                                .run_forever, args=(stop,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads


def measure_afina(database: str, home: Path, clients: int, seconds: float, warmup: float,
                  workers: int) -> tuple[dict, int]:
    """afina server's figures, and the size of its job object (the floor answers with that many bytes)."""
    key = new_api_key()
    with open_store(database) as store:
        store.create_api_key("benchmark", hash_api_key(key))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"AFINA_DATABASE_URL": database, "AFINA_HOME": str(home)}
    server = start_process([sys.executable, "-c", "from afina.cli import main; main()", "server",
                            "--port", str(port), "--workers", "0"], env, url, home / "server.log")
    stop = threading.Event()
    try:
        headers = {"Authorization": f"Bearer {key}"}
        data = "".join(json.dumps(row) + "\n" for row in ROWS).encode()
        uploaded = httpx.post(f"{url}/v1/files", headers=headers, data={"purpose": "fine-tune"},
                              files={"file": ("tickets.jsonl", data)}, timeout=60)
        uploaded.raise_for_status()
        training_file = uploaded.json()["id"]
        job_ids = [httpx.post(f"{url}/v1/fine_tuning/jobs", headers=headers, timeout=60,
                              json={"model": "default", "training_file": training_file}).json()["id"]
                   for _ in range(8)]
        job_bytes = len(httpx.get(f"{url}/v1/fine_tuning/jobs/{job_ids[0]}", headers=headers).content)
        no_op_workers(database, workers, stop)
        load = Load(key, training_file, job_ids)
        asyncio.run(run_load(url, load, clients, warmup))
        return summarize(asyncio.run(run_load(url, load, clients, seconds)), seconds), job_bytes
    finally:
        stop.set()
        stop_process(server)


def measure_floor(body_bytes: int, home: Path, clients: int, seconds: float, warmup: float) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_process([sys.executable, __file__, "--floor-port", str(port), "--floor-bytes", str(body_bytes)],
                           {}, url, home / "floor.log")
    try:
        load = Load("unused", "file-x", ["ftjob-x"])
        asyncio.run(run_load(url, load, clients, warmup))
        return summarize(asyncio.run(run_load(url, load, clients, seconds)), seconds)
    finally:
        stop_process(server)


def serve_floor(port: int, body_bytes: int) -> None:
    """The floor: FastAPI on uvicorn, every route answering the same JSON of `body_bytes` bytes."""
    import uvicorn
    from fastapi import FastAPI
    from fastapi.responses import Response

    filler = body_bytes - len(json.dumps({"id": "ftjob-x", "object": "fine_tuning.job", "padding": ""}))
    body = json.dumps({"id": "ftjob-x", "object": "fine_tuning.job", "padding": "x" * max(0, filler)}).encode()
    app = FastAPI()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.api_route("/{path:path}", methods=["GET", "POST"])
    def constant(path: str) -> Response:
        return Response(body, media_type="application/json")

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def report(afina: dict, floor: dict, clients: int, backend: str) -> None:
    print(f"jobs API, {clients} concurrent clients, {backend} store")
    print(f"{'':14} {'requests/s':>11} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for name, row in [*afina.items(), ("floor (all)", floor["all"])]:
        label = "afina (all)" if name == "all" else name
        print(f"{label:14} {row['requests_per_s']:>11.1f} {row['p50_ms']:>8.1f} {row['p95_ms']:>8.1f} "
              f"{row['p99_ms']:>8.1f}")
    ours, bare = afina["all"], floor["all"]
    print(f"afina / floor: {ours['requests_per_s'] / bare['requests_per_s']:.2f}x requests/s, "
          f"{ours['p50_ms'] / bare['p50_ms']:.2f}x p50, {ours['p99_ms'] / bare['p99_ms']:.2f}x p99")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20.0, help="Measured seconds per server")
    parser.add_argument("--warmup", type=float, default=2.0, help="Seconds of load before measuring")
    parser.add_argument("--workers", type=int, default=2, help="No-op workers draining the created jobs")
    parser.add_argument("--out", type=Path, help="Write the figures to this JSON file")
    parser.add_argument("--floor-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--floor-bytes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_port:
        serve_floor(args.floor_port, args.floor_bytes)
        return
    with tempfile.TemporaryDirectory(prefix="afina-api-bench-") as directory:
        home = Path(directory)
        base = os.environ.get("AFINA_DATABASE_URL") or f"sqlite:///{home / 'store.db'}"
        database, drop = fresh_database(base)
        try:
            afina, job_bytes = measure_afina(database, home, args.clients, args.seconds, args.warmup, args.workers)
        finally:
            drop()
        floor = measure_floor(job_bytes, home, args.clients, args.seconds, args.warmup)
    backend = database.split(":", 1)[0].split("+", 1)[0]
    report(afina, floor, args.clients, backend)
    if args.out:
        args.out.write_text(json.dumps({"clients": args.clients, "seconds": args.seconds, "store": backend,
                                        "afina": afina, "floor": floor}, indent=1))


if __name__ == "__main__":
    main()

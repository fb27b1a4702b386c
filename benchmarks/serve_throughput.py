"""Serving throughput at 1 to 32 concurrent streaming clients: afina's server against plain transformers
generate() one request at a time and llama.cpp's server on the same model's GGUF, in one run.

    python benchmarks/serve_throughput.py                          # default model: 1 4 8 16 32 clients, load test
    python benchmarks/serve_throughput.py --clients 1 8 --level-seconds 10 --load-seconds 0   # a quick look
    python benchmarks/serve_throughput.py --prefix-tokens 600      # also the prefix cache's time to first token

Each level runs C clients for `--level-seconds`, each sending chat requests one after another
(greedy, the same questions for every system), streaming; at the end of the window every request
still running is cut (its client disconnects) so each level takes the same time whatever the system:

- `afina`: `afina serve MODEL` in its own process (loopback), the official `openai` client streaming;
  time to first token is the first content chunk's arrival.
- `generate`: the same model's `generate()` serving one request at a time behind a lock, as a plain
  transformers server would, in fp32 like afina; time to first token is when the first token's
  logits are ready.
- `llama.cpp`: llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`, where its
  `server` extra is installed) on the model's GGUF file (for the default model, the bundled Q4_1
  file: 4-bit weights and their scales, about a sixth of fp32's bytes), with as many threads as
  torch uses. It answers one request at a time (a new request waits instead of interrupting).

Every system runs under the allocator and OpenMP wait policy the `afina` command uses (tcmalloc
where installed; OpenMP threads sleep while they wait): on a machine shared with other work, spinning
OpenMP threads would slow generate() several times and say nothing about it.

Output tokens/s counts every token delivered inside the window (a finished request's usage, else its
content chunks) over the window. Time to first token p50 and p99 count every request started in the
window; one still waiting for its first token when the window ends counts its wait so far (a lower
bound: `ttft_censored` says how many), which is what a client one at a time behind a busy server sees.

The load test (`--load-seconds`, default 60; 0: none) runs `--load-clients` clients (sampling at
temperature 0.7) against afina, after a warm-up of the same load, and reports afina's resident memory
at start, after the warm-up and at the end (and every 5 s in between, in the JSON): flat is the goal.

Results go to `--out` (default benchmarks/results/serve/): results.json, table.md and chart.png.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from afina.training.allocator import run_under_allocator

if __name__ == "__main__":  # generate() and llama.cpp under afina serve's allocator and OpenMP wait policy
    run_under_allocator()

import torch  # noqa: E402

QUESTIONS = ["My printer is jammed, what should I do?", "How do I reset my password?",
             "The VPN does not connect from home.", "Outlook keeps asking for my password.",
             "Explain what a firewall does.", "Write a short welcome note for a new colleague.",
             "Why is my laptop so slow?", "How do I share a calendar with my team?"]
SYSTEMS = ("afina", "generate", "llama.cpp")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize(ttfts: list[float], censored: int, tokens: int, completed: int, wall: float) -> dict:
    return {"requests": len(ttfts), "completed": completed, "output_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_s": round(statistics.median(ttfts), 4) if ttfts else None,
            "ttft_p99_s": round(percentile(ttfts, 99), 4) if ttfts else None, "ttft_censored": censored}


def run_generate(model, tokenizer, clients: int, seconds: float, max_tokens: int) -> dict:
    """Plain generate(), one request at a time (a lock), `clients` threads asking in turn for `seconds`."""
    from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

    lock = threading.Lock()
    ttfts: list[float] = []
    tokens, completed, censored = [0], [0], [0]
    start = time.perf_counter()
    deadline = start + seconds

    class Stamps(LogitsProcessor):  # called once per generated token, when its logits are ready
        def __init__(self):
            self.at: list[float] = []

        def __call__(self, input_ids, scores):
            self.at.append(time.perf_counter())
            return scores

    class Deadline(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), time.perf_counter() >= deadline, dtype=torch.bool)

    def client(number: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            question = QUESTIONS[(number + i) % len(QUESTIONS)]
            i += 1
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True)
            encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            stamps = Stamps()
            asked = time.perf_counter()
            if not lock.acquire(timeout=max(0.0, deadline - asked)):
                ttfts.append(deadline - asked)
                censored[0] += 1
                return
            try:
                if time.perf_counter() >= deadline:
                    ttfts.append(deadline - asked)
                    censored[0] += 1
                    return
                with torch.inference_mode():
                    output = model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False,
                                            logits_processor=LogitsProcessorList([stamps]),
                                            stopping_criteria=StoppingCriteriaList([Deadline()]),
                                            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            finally:
                lock.release()
            ttfts.append(stamps.at[0] - asked)
            new = output[0, encoded["input_ids"].shape[1]:].tolist()
            tokens[0] += sum(1 for token, at in zip(new, stamps.at) if at < deadline and token != tokenizer.eos_token_id)
            completed[0] += stamps.at[-1] < deadline

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize(ttfts, censored[0], tokens[0], completed[0], seconds)


async def run_clients(url: str, model: str, clients: int, seconds: float, max_tokens: int, temperature: float = 0,
                      usage: bool = True) -> dict:
    """`clients` streaming clients asking one request after another for `seconds`; requests running at
    the end are cut."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    ttfts: list[float] = []
    counts = {"tokens": 0, "completed": 0, "censored": 0}
    errors: list[str] = []
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    deadline = start + seconds

    async def one_request(number: int, i: int) -> None:
        question = QUESTIONS[(number + i) % len(QUESTIONS)]
        asked, first, chunks, used = time.perf_counter(), None, 0, None
        options = {"stream_options": {"include_usage": True}} if usage else {}
        extra = {"seed": number * 1000 + i} if temperature else {}
        try:
            async with asyncio.timeout_at(loop.time() + max(0.0, deadline - asked)):
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                    temperature=temperature, stream=True, **options, **extra)
                try:
                    async for chunk in stream:
                        if chunk.choices and chunk.choices[0].delta.content:
                            first = first or time.perf_counter()
                            chunks += 1
                        if chunk.usage:
                            used = chunk.usage.completion_tokens
                finally:
                    await stream.close()
            counts["completed"] += 1
            counts["tokens"] += used if used is not None else chunks
        except TimeoutError:
            counts["tokens"] += chunks
        except openai.APIError as error:
            errors.append(type(error).__name__)
            return
        if first is None:
            counts["censored"] += 1
        ttfts.append((first or min(time.perf_counter(), deadline)) - asked)

    async def one_client(number: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            await one_request(number, i)
            i += 1

    await asyncio.gather(*(one_client(n) for n in range(clients)))
    await client.close()
    return summarize(ttfts, counts["censored"], counts["tokens"], counts["completed"], seconds) | {
        "errors": len(errors), "error_types": sorted(set(errors))}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(command: list[str]) -> subprocess.Popen:
    """A server process; its error output goes to a temporary file (a pipe nobody reads could fill up
    and stop it), read back if it exits."""
    errors = tempfile.TemporaryFile()
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors)
    server.errors = errors
    return server


def wait_ready(server: subprocess.Popen, url: str, path: str) -> None:
    while True:
        if server.poll() is not None:
            server.errors.seek(0)
            raise SystemExit(f"the server exited: {server.errors.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}{path}", timeout=1) as answer:
                if path != "/ready" or json.loads(answer.read()).get("ready"):
                    return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)


def start_server(model: str, max_batch_size: int, *options: str) -> tuple[subprocess.Popen, str]:
    """`afina serve MODEL [options]` in a process of its own, as users run it (under the afina command's
    allocator and OpenMP settings, and with no client sharing its interpreter); returns it once /ready."""
    port = free_port()
    server = launch([sys.executable, "-c", "from afina.cli import main; main()", "serve", model, "--port", str(port),
                     "--max-batch-size", str(max_batch_size), "--max-concurrent", str(max(64, max_batch_size)),
                     "--no-auth", *options])
    url = f"http://127.0.0.1:{port}"
    wait_ready(server, url, "/ready")
    return server, url


def llama_cpp_server_installed() -> bool:
    return all(importlib.util.find_spec(name) is not None
               for name in ("llama_cpp", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings"))


def start_llama_cpp_server(gguf: str, threads: int) -> tuple[subprocess.Popen, str]:
    """llama-cpp-python's OpenAI-compatible server on `gguf`, with `threads` threads."""
    port = free_port()
    server = launch([sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port",
                     str(port), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--n_ctx", "4096",
                     "--verbose", "False", "--interrupt_requests", "False"])
    url = f"http://127.0.0.1:{port}"
    wait_ready(server, url, "/v1/models")
    return server, url


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait()
    server.errors.close()


async def one_answer(url: str, model: str) -> None:
    """One short request answered whole: on a server serving one request at a time, it ends after any
    request still running there."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    await client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTIONS[0]}],
                                         max_tokens=1, temperature=0)
    await client.close()


def served_name(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as answer:
        return json.loads(answer.read())["data"][0]["id"]


def resident_mib(process: subprocess.Popen) -> float:
    """The server's resident memory (Linux /proc), in MiB."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def load_test(model: str, args: argparse.Namespace) -> dict:
    """afina under `--load-clients` sampling clients for `--load-seconds`, after a warm-up of the same
    load; its resident memory at start, after the warm-up, every 5 s and at the end."""
    server, url = start_server(model, args.load_clients)
    try:
        name = served_name(url)
        at_start = resident_mib(server)
        asyncio.run(run_clients(url, name, args.load_clients, args.warm_up_seconds, args.max_tokens, 0.7))
        after_warm_up = resident_mib(server)
        samples: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(5):
                samples.append(resident_mib(server))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        result = asyncio.run(run_clients(url, name, args.load_clients, args.load_seconds, args.max_tokens, 0.7))
        done.set()
        sampler.join()
        result |= {"clients": args.load_clients, "seconds": args.load_seconds, "rss_mib_start": at_start,
                   "rss_mib_after_warm_up": after_warm_up, "rss_mib_end": resident_mib(server),
                   "rss_mib_every_5s": samples}
    finally:
        stop(server)
    print(f"load: {args.load_clients} clients {args.load_seconds:g}s  {result['tokens_per_s']:.1f} tok/s  "
          f"{result['requests']} requests  ttft p50 {result['ttft_p50_s']}s p99 {result['ttft_p99_s']}s  "
          f"errors {result['errors']}  rss {result['rss_mib_start']} / {result['rss_mib_after_warm_up']} / "
          f"{result['rss_mib_end']} MiB (start / after warm-up / end)", flush=True)
    return result


async def prefix_ttfts(url: str, system: str, asks: int) -> list[float]:
    """Time to first token of `asks` questions, one at a time, each after the same system prompt."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    ttfts = []
    for i in range(asks):
        asked = time.perf_counter()
        stream = await client.chat.completions.create(
            model=served_name(url), messages=[{"role": "system", "content": system},
                                              {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            max_tokens=4, temperature=0, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttfts.append(time.perf_counter() - asked)
                break
        await stream.close()
    await client.close()
    return ttfts


def prefix_test(model: str, tokenizer, tokens: int, asks: int = 8) -> dict:
    """Median time to first token after a long shared system prompt, with and without the prefix cache."""
    sentence = ("You are the help desk assistant of a bank. Answer in the customer's language, briefly, and never "
                "ask for passwords or card numbers. ")
    system = sentence * max(1, tokens // len(tokenizer(sentence)["input_ids"]))
    result = {"system_prompt_tokens": len(tokenizer(system)["input_ids"]), "asks": asks}
    for label, options in (("cached", ()), ("uncached", ("--prefix-cache-tokens", "0"))):
        server, url = start_server(model, 4, *options)
        try:
            ttfts = asyncio.run(prefix_ttfts(url, system, asks + 1))[1:]  # the first computes the prefix
        finally:
            stop(server)
        result[label] = {"ttft_p50_s": round(statistics.median(ttfts), 4), "ttft_max_s": round(max(ttfts), 4)}
    result["ttft_ratio"] = round(result["uncached"]["ttft_p50_s"] / result["cached"]["ttft_p50_s"], 2)
    return result


def run_levels(system: str, args: argparse.Namespace, tokenizer) -> dict[int, dict]:
    """Every clients level against one system, its server started once and warmed up first."""
    results = {}
    if system == "generate":
        from afina.models.loading import load_model

        model = load_model(args.model).eval()
        run_generate(model, tokenizer, 1, 3, 4)  # first-call costs
        for clients in args.clients:
            results[clients] = report(system, clients, run_generate(model, tokenizer, clients, args.level_seconds,
                                                                    args.max_tokens))
        del model
        return results
    if system == "afina":
        server, url = start_server(args.model, max(args.clients))
    else:
        from afina.models.loading import default_gguf_path

        gguf = str(default_gguf_path()) if args.model == "default" else args.model
        server, url = start_llama_cpp_server(gguf, torch.get_num_threads())
    try:
        name, usage = served_name(url), system == "afina"
        asyncio.run(run_clients(url, name, 1, 3, 4, usage=usage))  # first-call costs
        for clients in args.clients:
            results[clients] = report(system, clients, asyncio.run(
                run_clients(url, name, clients, args.level_seconds, args.max_tokens, usage=usage)))
            asyncio.run(one_answer(url, name))  # a cut request may still run there: the next level starts after it
    finally:
        stop(server)
    return results


def report(system: str, clients: int, result: dict) -> dict:
    print(f"{system:>9} {clients:>3} clients  {result['tokens_per_s']:>7.1f} tok/s  ttft p50 {result['ttft_p50_s']}s "
          f"p99 {result['ttft_p99_s']}s  ({result['requests']} requests, {result['ttft_censored']} without a first "
          f"token)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="what `afina serve` takes (default: the default model)")
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 4, 8, 16, 32],
                        help="clients levels (none: the load test only)")
    parser.add_argument("--level-seconds", type=float, default=20, help="how long each clients level runs")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve"))
    parser.add_argument("--load-seconds", type=float, default=60, help="the load test's length (0: none)")
    parser.add_argument("--warm-up-seconds", type=float, default=15, help="the load test's warm-up")
    parser.add_argument("--load-clients", type=int, default=32)
    parser.add_argument("--prefix-tokens", type=int, default=0, help="system prompt length for the prefix test")
    args = parser.parse_args()

    from afina.models.loading import load_tokenizer
    from afina.pipeline.prepare import quiet_libraries

    quiet_libraries()
    tokenizer = load_tokenizer(args.model)
    systems = [s for s in args.systems if s != "llama.cpp" or llama_cpp_server_installed()]
    if "llama.cpp" in args.systems and "llama.cpp" not in systems:
        print("llama.cpp: not run (pip install 'llama-cpp-python[server]')", flush=True)
    results = {"model": args.model, "max_tokens": args.max_tokens, "level_seconds": args.level_seconds,
               "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
               "load_average_before": os.getloadavg(), "systems": systems, "levels": []}
    by_system = {system: run_levels(system, args, tokenizer) for system in systems} if args.clients else {}
    for clients in args.clients:
        level = {"clients": clients} | {system: by_system[system][clients] for system in systems}
        for other in ("generate", "llama.cpp"):
            if "afina" in systems and other in systems and level[other]["tokens_per_s"]:
                level[f"afina_over_{other}"] = round(level["afina"]["tokens_per_s"] / level[other]["tokens_per_s"], 2)
        results["levels"].append(level)
    if args.load_seconds:
        results["load"] = load_test(args.model, args)
    if args.prefix_tokens:
        results["prefix"] = prefix = prefix_test(args.model, tokenizer, args.prefix_tokens)
        print(f"prefix cache, {prefix['system_prompt_tokens']}-token system prompt: ttft p50 "
              f"{prefix['cached']['ttft_p50_s']:.3f}s cached, {prefix['uncached']['ttft_p50_s']:.3f}s uncached "
              f"(x{prefix['ttft_ratio']})", flush=True)
    results["load_average_after"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "table.md").write_text(write_table(results))
    write_chart(results, args.out / "chart.png")
    print(write_table(results))
    print(f"results: {args.out}")


def seconds(result: dict, key: str) -> str:
    value = result[key]
    if value is None:
        return "-"
    return f"{'≥' if result['ttft_censored'] and key == 'ttft_p99_s' else ''}{value:.3f}"


def write_table(results: dict) -> str:
    """The levels as a markdown table (≥: some requests were still waiting for a first token at the end)."""
    systems = results["systems"]
    head = "| clients | " + " | ".join(f"{s} tok/s | {s} TTFT p50 / p99 (s)" for s in systems)
    ratios = [f"afina / {other}" for other in ("generate", "llama.cpp") if "afina" in systems and other in systems]
    lines = [head + "".join(f" | {r}" for r in ratios) + " |",
             "| ---: " * (1 + 2 * len(systems) + len(ratios)) + "|"]
    for level in results["levels"]:
        cells = [str(level["clients"])]
        for system in systems:
            result = level[system]
            cells += [f"{result['tokens_per_s']:.1f}", f"{seconds(result, 'ttft_p50_s')} / {seconds(result, 'ttft_p99_s')}"]
        cells += [f"{level[key]:.2f}x" for key in (f"afina_over_{o}" for o in ("generate", "llama.cpp")) if key in level]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    load = results.get("load")
    if load:
        text += (f"\nLoad test, afina: {load['clients']} streaming clients (temperature 0.7) for {load['seconds']:g} s "
                 f"after a warm-up: {load['tokens_per_s']:.1f} tok/s, TTFT p50 {load['ttft_p50_s']} s / p99 "
                 f"{load['ttft_p99_s']} s, {load['requests']} requests, {load['errors']} errors; resident memory "
                 f"{load['rss_mib_start']} MiB at start, {load['rss_mib_after_warm_up']} after the warm-up, "
                 f"{load['rss_mib_end']} at the end.\n")
    return text


def write_chart(results: dict, path: Path) -> None:
    """Output tokens/s and p99 time to first token by concurrent clients, one line per system; the load
    test's resident memory over time where it ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = results.get("load")
    if not results["levels"]:
        return
    figure, axes = plt.subplots(1, 3 if load else 2, figsize=(13 if load else 9, 3.6))
    clients = [level["clients"] for level in results["levels"]]
    labels = {"afina": "afina serve", "generate": "generate(), one at a time", "llama.cpp": "llama.cpp server (Q4_1)"}
    for system in results["systems"]:
        axes[0].plot(clients, [level[system]["tokens_per_s"] for level in results["levels"]], marker="o",
                     label=labels[system])
        axes[1].plot(clients, [level[system]["ttft_p99_s"] for level in results["levels"]], marker="o",
                     label=labels[system])
    axes[0].set(xlabel="concurrent streaming clients", ylabel="output tokens/s", title="Throughput", xscale="log")
    axes[1].set(xlabel="concurrent streaming clients", ylabel="seconds", title="Time to first token, p99",
                xscale="log", yscale="log")
    for axis in axes[:2]:
        axis.set_xticks(clients, [str(c) for c in clients])
    axes[0].legend(fontsize=8)
    if load:
        memory = [load["rss_mib_start"], load["rss_mib_after_warm_up"], *load["rss_mib_every_5s"], load["rss_mib_end"]]
        axes[2].plot(range(len(memory)), memory, marker=".")
        axes[2].set(xlabel="samples (start, after warm-up, every 5 s, end)", ylabel="MiB",
                    title=f"afina resident memory, {load['clients']} clients")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()

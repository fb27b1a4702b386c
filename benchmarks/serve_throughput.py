"""Serving throughput: afina's server against plain transformers generate(), one request at a time.

    python benchmarks/serve_throughput.py                          # default model, 1, 4, 8 clients
    python benchmarks/serve_throughput.py --clients 1 4 8 16 32 --requests 4 --max-tokens 64
    python benchmarks/serve_throughput.py --load-seconds 60 --load-clients 32 --llama-cpp --prefix-tokens 600

Each level runs C concurrent clients, each sending `--requests` chat requests one after another
(greedy, the same prompts for both systems):

- `afina`: `afina serve MODEL` in its own process (loopback), the official `openai` client streaming
  with usage; time to first token is the first content chunk's arrival.
- `generate`: the same model's `generate()` serving one request at a time behind a lock, as a plain
  transformers server would; time to first token is when the first token's logits are ready.

Output tokens/s is every client's completion tokens over the level's wall time. Results go to a JSON
file (`--out`); ratios are afina over generate.

`--load-seconds S` adds a load test: `--load-clients` streaming clients ask again and again for S
seconds (no request starts after that), reporting tokens/s, time to first token p50/p99, errors
(none expected) and the server's resident memory before and after. With `--llama-cpp` the same load
runs against llama.cpp on the same model's GGUF file (`afina serve FILE --engine llama.cpp`:
llama-cpp-python's `Llama` behind the same HTTP routes and clients), reported as a ratio.

`--prefix-tokens N` measures prefix caching: one client asks questions after the same system prompt
of about N tokens, against a server with the prefix cache and one without (`--prefix-cache-tokens 0`);
the ratio is their median time to first token.

`--chart PATH` draws the run's figures (clients levels, load test, prefix cache) as a PNG.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import torch

QUESTIONS = ["My printer is jammed, what should I do?", "How do I reset my password?",
             "The VPN does not connect from home.", "Outlook keeps asking for my password.",
             "Explain what a firewall does.", "Write a short welcome note for a new colleague.",
             "Why is my laptop so slow?", "How do I share a calendar with my team?"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def summarize(ttfts: list[float], tokens: int, wall: float) -> dict:
    return {"requests": len(ttfts), "output_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "ttft_p50_s": round(statistics.median(ttfts), 4),
            "ttft_p99_s": round(percentile(ttfts, 99), 4)}


def run_generate(model, tokenizer, clients: int, requests: int, max_tokens: int) -> dict:
    """Plain generate(), one request at a time (a lock), `clients` threads asking in turn."""
    from transformers import LogitsProcessor, LogitsProcessorList

    lock = threading.Lock()
    ttfts: list[float] = []
    counts: list[int] = []

    class FirstToken(LogitsProcessor):
        def __init__(self):
            self.at = None

        def __call__(self, input_ids, scores):
            self.at = self.at or time.perf_counter()
            return scores

    def client(number: int) -> None:
        for i in range(requests):
            question = QUESTIONS[(number + i) % len(QUESTIONS)]
            text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True)
            encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
            first = FirstToken()
            asked = time.perf_counter()
            with lock, torch.inference_mode():
                output = model.generate(**encoded, max_new_tokens=max_tokens, do_sample=False,
                                        logits_processor=LogitsProcessorList([first]),
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            ttfts.append(first.at - asked)
            new = output[0, encoded["input_ids"].shape[1]:].tolist()
            counts.append(len([t for t in new if t != tokenizer.eos_token_id]))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize(ttfts, sum(counts), time.perf_counter() - start)


async def run_afina(url: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    ttfts: list[float] = []
    counts: list[int] = []

    async def one_client(number: int) -> None:
        for i in range(requests):
            question = QUESTIONS[(number + i) % len(QUESTIONS)]
            asked, first = time.perf_counter(), None
            stream = await client.chat.completions.create(
                model="default", messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                temperature=0, stream=True, stream_options={"include_usage": True})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter()
                if chunk.usage:
                    counts.append(chunk.usage.completion_tokens)
            ttfts.append((first or time.perf_counter()) - asked)

    start = time.perf_counter()
    await asyncio.gather(*(one_client(n) for n in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return summarize(ttfts, sum(counts), wall)


def start_server(model: str, max_batch_size: int, *options: str) -> tuple[subprocess.Popen, str]:
    """`afina serve MODEL [options]` in a process of its own, as users run it (under the afina command's
    allocator and OpenMP settings, and with no client sharing its interpreter); returns it once /ready."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-c", "from afina.cli import main; main()", "serve", model,
                               "--port", str(port), "--max-batch-size", str(max_batch_size),
                               "--max-concurrent", str(max(64, max_batch_size)), "--no-auth", *options],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    while True:
        if server.poll() is not None:
            raise SystemExit(f"afina serve exited: {server.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=1) as answer:
                if json.loads(answer.read()).get("ready"):
                    return server, url
        except (OSError, ValueError):
            pass
        time.sleep(0.5)


def served_name(url: str) -> str:
    with urllib.request.urlopen(f"{url}/v1/models", timeout=10) as answer:
        return json.loads(answer.read())["data"][0]["id"]


def resident_mib(process: subprocess.Popen) -> float:
    """The server's resident memory (Linux /proc), in MiB."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


async def run_load(url: str, clients: int, seconds: float, max_tokens: int) -> dict:
    """`clients` streaming clients asking one request after another until `seconds` have passed."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600)
    model = served_name(url)
    ttfts: list[float] = []
    counts: list[int] = []
    errors: list[str] = []
    deadline = time.perf_counter() + seconds

    async def one_client(number: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            question = QUESTIONS[(number + i) % len(QUESTIONS)]
            i += 1
            asked, first = time.perf_counter(), None
            try:
                stream = await client.chat.completions.create(
                    model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
                    temperature=0.7, seed=number * 1000 + i, stream=True, stream_options={"include_usage": True})
                async for chunk in stream:
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter()
                    if chunk.usage:
                        counts.append(chunk.usage.completion_tokens)
            except openai.APIError as error:
                errors.append(type(error).__name__)
                continue
            ttfts.append((first or time.perf_counter()) - asked)

    start = time.perf_counter()
    await asyncio.gather(*(one_client(n) for n in range(clients)))
    wall = time.perf_counter() - start
    await client.close()
    return summarize(ttfts, sum(counts), wall) | {"errors": len(errors), "error_types": sorted(set(errors))}


def load_test(model: str, args: argparse.Namespace, *options: str) -> dict:
    server, url = start_server(model, args.load_clients, *options)
    try:
        before = resident_mib(server)
        result = asyncio.run(run_load(url, args.load_clients, args.load_seconds, args.max_tokens))
        result |= {"clients": args.load_clients, "seconds": args.load_seconds, "rss_mib_before": before,
                   "rss_mib_after": resident_mib(server)}
    finally:
        server.terminate()
        server.wait()
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
            server.terminate()
            server.wait()
        result[label] = {"ttft_p50_s": round(statistics.median(ttfts), 4), "ttft_max_s": round(max(ttfts), 4)}
    result["ttft_ratio"] = round(result["uncached"]["ttft_p50_s"] / result["cached"]["ttft_p50_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="what `afina serve` takes (default: the default model)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--requests", type=int, default=2, help="requests each client sends, one after another")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_throughput.json"))
    parser.add_argument("--skip-levels", action="store_true", help="only the load, llama.cpp and prefix tests")
    parser.add_argument("--load-seconds", type=float, default=0, help="run the load test this long (0: not)")
    parser.add_argument("--load-clients", type=int, default=32)
    parser.add_argument("--llama-cpp", action="store_true",
                        help="the load test also against llama.cpp on the model's GGUF file (default model only)")
    parser.add_argument("--prefix-tokens", type=int, default=0, help="system prompt length for the prefix test")
    parser.add_argument("--chart", type=Path, help="draw the results as a PNG here")
    args = parser.parse_args()

    from afina.models.loading import load_model, load_tokenizer
    from afina.pipeline.prepare import quiet_libraries

    quiet_libraries()
    results = {"model": args.model, "max_tokens": args.max_tokens, "requests_per_client": args.requests,
               "torch_threads": torch.get_num_threads(), "levels": []}
    tokenizer = load_tokenizer(args.model)
    if args.skip_levels:
        args.clients = []
    else:
        server, url = start_server(args.model, max(args.clients))
        model = load_model(args.model).eval()
    for clients in args.clients:
        plain = run_generate(model, tokenizer, clients, args.requests, args.max_tokens)  # the engine is idle now
        ours = asyncio.run(run_afina(url, clients, args.requests, args.max_tokens))
        level = {"clients": clients, "afina": ours, "generate": plain,
                 "throughput_ratio": round(ours["tokens_per_s"] / plain["tokens_per_s"], 2),
                 "ttft_p99_ratio": round(ours["ttft_p99_s"] / plain["ttft_p99_s"], 2)}
        results["levels"].append(level)
        print(f"{clients:>3} clients  afina {ours['tokens_per_s']:>7.1f} tok/s  ttft p50 {ours['ttft_p50_s']:.3f}s "
              f"p99 {ours['ttft_p99_s']:.3f}s | generate {plain['tokens_per_s']:>7.1f} tok/s  ttft p50 "
              f"{plain['ttft_p50_s']:.3f}s p99 {plain['ttft_p99_s']:.3f}s | throughput x{level['throughput_ratio']}",
              flush=True)
    if args.clients:
        server.terminate()
        server.wait()
    if args.load_seconds:
        results["load"] = load_report(args, "afina", load_test(args.model, args))
        if args.llama_cpp:
            from afina.models.loading import default_gguf_path

            gguf = str(default_gguf_path()) if args.model == "default" else args.model
            results["load_llama_cpp"] = load_report(args, "llama.cpp", load_test(gguf, args, "--engine", "llama.cpp"))
            results["load_throughput_ratio"] = round(results["load"]["tokens_per_s"]
                                                     / results["load_llama_cpp"]["tokens_per_s"], 2)
            print(f"load: afina / llama.cpp throughput x{results['load_throughput_ratio']}", flush=True)
    if args.prefix_tokens:
        results["prefix"] = prefix = prefix_test(args.model, tokenizer, args.prefix_tokens)
        print(f"prefix cache, {prefix['system_prompt_tokens']}-token system prompt: ttft p50 "
              f"{prefix['cached']['ttft_p50_s']:.3f}s cached, {prefix['uncached']['ttft_p50_s']:.3f}s uncached "
              f"(x{prefix['ttft_ratio']})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    if args.chart:
        write_chart(results, args.chart)
        print(f"chart: {args.chart}")
    print(f"results: {args.out}")


def write_chart(results: dict, path: Path) -> None:
    """One panel per measure the run made: tokens/s by clients, the load test side by side, and time to
    first token with and without the prefix cache."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [name for name in ("levels", "load", "prefix") if results.get(name)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for axis, name in zip(axes[0], panels):
        if name == "levels":
            clients = [level["clients"] for level in results["levels"]]
            for system in ("afina", "generate"):
                axis.plot(clients, [level[system]["tokens_per_s"] for level in results["levels"]], marker="o",
                          label=system if system == "afina" else "generate(), one at a time")
            axis.set(xlabel="concurrent clients", ylabel="output tokens/s", title="Throughput by clients")
            axis.legend()
        elif name == "load":
            systems = {"afina": results["load"]} | ({"llama.cpp": results["load_llama_cpp"]}
                                                    if results.get("load_llama_cpp") else {})
            bars = axis.bar(list(systems), [r["tokens_per_s"] for r in systems.values()], color=["C0", "C2"])
            axis.bar_label(bars, labels=[f"{r['tokens_per_s']:.1f} tok/s\np99 TTFT {r['ttft_p99_s']:.1f} s"
                                         for r in systems.values()], fontsize=8)
            axis.set(ylabel="output tokens/s",
                     title=f"{results['load']['clients']} streaming clients, {results['load']['seconds']:g} s")
            axis.margins(y=0.25)
        else:
            prefix = results["prefix"]
            values = [prefix["cached"]["ttft_p50_s"], prefix["uncached"]["ttft_p50_s"]]
            bars = axis.bar(["prefix cache", "no prefix cache"], values, color=["C0", "C7"])
            axis.bar_label(bars, labels=[f"{v:.2f} s" for v in values], fontsize=8)
            axis.set(ylabel="time to first token, p50 (s)",
                     title=f"{prefix['system_prompt_tokens']}-token shared system prompt")
            axis.margins(y=0.2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def load_report(args: argparse.Namespace, system: str, result: dict) -> dict:
    print(f"load {system}: {args.load_clients} clients {args.load_seconds:g}s  {result['tokens_per_s']:.1f} tok/s  "
          f"{result['requests']} requests  ttft p50 {result['ttft_p50_s']:.3f}s p99 {result['ttft_p99_s']:.3f}s  "
          f"errors {result['errors']}  rss {result['rss_mib_before']} -> {result['rss_mib_after']} MiB", flush=True)
    return result


if __name__ == "__main__":
    main()

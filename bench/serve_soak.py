"""A mixed load against `lorakit serve` for a while, sampling the server's RSS every second
(standard library only; bench/serve_soak.sh starts the server and calls this).

Clients (threads) send, until the time is up, requests picked at random: completions and chats,
streamed and not, over the base and the adapters given and one adapter (`dyn`) that another
thread loads and unloads at run time (requests for it while it is unloaded get 404, as they
should), short prompts and long ones (several prefill chunks), 8 to 96 tokens, greedy or
sampled; some streaming clients disconnect after a few events. Prints a JSON summary: requests
by outcome, RSS at start, peak and end, and the peak against the budget.

usage: bench/serve_soak.py --url URL --pid PID --budget-mib N --models base,a1,a2
                           --dyn-path DIR [--seconds 600] [--clients 6]
"""

import argparse
import collections
import http.client
import json
import os
import random
import threading
import time
import urllib.parse

PROMPTS = [
    "Once upon a time, there was a little girl named Lily who",
    "Write a short poem about the mountains.",
    "The three most important inventions of the 20th century are",
    "def quicksort(xs):",
    "Explain what a KV cache is.",
    "List three uses of copper.",
]


def long_prompt(rng):
    words = ["the", "river", "ran", "past", "an", "old", "mill", "where", "children", "played",
             "every", "summer", "and", "counted", "boats"]
    return "Summarise this story. " + " ".join(rng.choice(words) for _ in range(rng.randint(150, 400)))


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def request(url, method, path, body, timeout=600):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    conn.request(method, path, body=json.dumps(body) if body is not None else None,
                 headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def one(url, rng, models, dyn_loaded):
    """One random request; returns its outcome's name."""
    model = rng.choice(models + ["dyn"])
    stream = rng.random() < 0.6
    chat = rng.random() < 0.4
    prompt = long_prompt(rng) if rng.random() < 0.15 else rng.choice(PROMPTS)
    body = {"model": model, "max_tokens": rng.randint(8, 96), "stream": stream}
    if rng.random() < 0.5:
        body["temperature"] = 0
    else:
        body.update({"temperature": 0.8, "top_p": 0.9, "seed": rng.randint(0, 1 << 30)})
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    conn, resp = request(url, "POST", path, body)
    try:
        if resp.status != 200:
            resp.read()
            return f"{resp.status}{' (dyn unloaded)' if model == 'dyn' and resp.status == 404 else ''}"
        if not stream:
            json.loads(resp.read())
            return "200"
        disconnect = rng.random() < 0.15
        events = 0
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:"):
                continue
            events += 1
            if line[5:].strip() == "[DONE]":
                return "200 stream"
            if disconnect and events >= 3:
                return "disconnected"
        return "stream cut"
    finally:
        conn.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--budget-mib", type=float, required=True)
    ap.add_argument("--models", required=True)
    ap.add_argument("--dyn-path", required=True)
    ap.add_argument("--seconds", type=float, default=600)
    ap.add_argument("--clients", type=int, default=6)
    args = ap.parse_args()
    models = args.models.split(",")
    end = time.monotonic() + args.seconds
    outcomes = collections.Counter()
    lock = threading.Lock()
    samples = []
    dyn_loaded = [False]

    def client(i):
        rng = random.Random(i)
        while time.monotonic() < end:
            try:
                o = one(args.url, rng, models, dyn_loaded)
            except Exception as e:  # noqa: BLE001 - counted
                o = f"client error {type(e).__name__}"
            with lock:
                outcomes[o] += 1

    def loader():
        while time.monotonic() < end:
            time.sleep(15)
            path = "/v1/unload_lora_adapter" if dyn_loaded[0] else "/v1/load_lora_adapter"
            body = {"lora_name": "dyn"}
            if not dyn_loaded[0]:
                body["lora_path"] = args.dyn_path
            conn, resp = request(args.url, "POST", path, body)
            resp.read()
            conn.close()
            with lock:
                outcomes[f"{path.split('/')[-1]} {resp.status}"] += 1
            if resp.status == 200:
                dyn_loaded[0] = not dyn_loaded[0]

    def sampler():
        while time.monotonic() < end + 2:
            samples.append(rss_kib(args.pid))
            time.sleep(1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
    threads += [threading.Thread(target=loader), threading.Thread(target=sampler)]
    start_rss = rss_kib(args.pid)
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    peak = max(samples + [start_rss])
    summary = {
        "seconds": args.seconds, "clients": args.clients, "samples": len(samples),
        "outcomes": dict(sorted(outcomes.items())),
        "rss_start_mib": round(start_rss / 1024, 1), "rss_peak_mib": round(peak / 1024, 1),
        "rss_end_mib": round(samples[-1] / 1024, 1) if samples else None,
        "budget_mib": args.budget_mib, "peak_within_budget": peak / 1024 <= args.budget_mib,
        "rss_by_minute_mib": [round(max(samples[i:i + 60]) / 1024, 1)
                              for i in range(0, len(samples), 60)],
    }
    print(json.dumps(summary, indent=1))
    os._exit(0 if summary["peak_within_budget"] else 1)


if __name__ == "__main__":
    main()

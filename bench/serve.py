"""Load generator for `lorakit serve` (standard library only): for each concurrency level,
N client threads each stream R greedy completions of T tokens (ignore_eos) over the models
given, in turn (mixed adapters), and the script prints aggregate generated tokens/s and the
p50 / p99 time to first token and time between tokens.

usage: bench/serve.py --url http://127.0.0.1:8080 --models base,a1,a2 [--concurrency 1,4,8,16]
                      [--tokens 64] [--requests 2] [--api-key KEY] [--llama-lora] [--json-out F]

--llama-lora: the server is llama.cpp's llama-server, started with one `--lora` per adapter and
`--lora-init-without-apply`: the first model name is the base (request field "lora": []), the
i-th adapter after it is selected by "lora": [{"id": i - 1, "scale": 1.0}]; prompt caching is
turned off per request ("cache_prompt": false) so that both servers prefill every prompt.
"""

import argparse
import http.client
import json
import threading
import time
import urllib.parse

PROMPTS = [
    "Once upon a time, there was a little girl named Lily who",
    "Write a short poem about the mountains.",
    "The three most important inventions of the 20th century are",
    "def quicksort(xs):",
]


def percentile(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def stream_one(url, model, prompt, tokens, api_key, lora=None):
    """One streamed completion: (time to first token, gaps between tokens, tokens).
    `lora`: llama-server's per-request adapter list (then `model` is only a label)."""
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    req = {"model": model, "prompt": prompt, "max_tokens": tokens, "temperature": 0,
           "ignore_eos": True, "stream": True}
    if lora is not None:
        req.update({"lora": lora, "cache_prompt": False})
    body = json.dumps(req)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=body, headers=headers)
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"{resp.status}: {resp.read()[:300]!r}")
    first, last, gaps, n, pieces = None, None, [], 0, 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(chunk["error"])
        now = time.perf_counter()
        if chunk["choices"] and chunk["choices"][0].get("text"):
            pieces += 1
            if first is None:
                first = now - t0
            else:
                gaps.append(now - last)
            last = now
        if chunk.get("usage"):
            n = chunk["usage"]["completion_tokens"]
    conn.close()
    return first, gaps, n or pieces


def run_level(args, models, level):
    ttft, gaps, tokens, errors = [], [], [0], []
    lock = threading.Lock()

    def client(i):
        for r in range(args.requests):
            k = i * args.requests + r
            try:
                m = k % len(models)
                lora = None
                if args.llama_lora:
                    lora = [] if m == 0 else [{"id": m - 1, "scale": 1.0}]
                f, g, n = stream_one(args.url, models[m], PROMPTS[k % len(PROMPTS)],
                                     args.tokens, args.api_key, lora)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(str(e))
                continue
            with lock:
                if f is not None:
                    ttft.append(f)
                gaps.extend(g)
                tokens[0] += n

    threads = [threading.Thread(target=client, args=(i,)) for i in range(level)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"streams": level, "tokens": tokens[0], "seconds": round(wall, 2),
            "tokens_per_s": round(tokens[0] / wall, 1),
            "ttft_p50_ms": round(1000 * percentile(ttft, 50), 1),
            "ttft_p99_ms": round(1000 * percentile(ttft, 99), 1),
            "itl_p50_ms": round(1000 * percentile(gaps, 50), 1),
            "itl_p99_ms": round(1000 * percentile(gaps, 99), 1),
            "errors": len(errors)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--models", required=True, help="comma-separated model names")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=2, help="requests per stream")
    ap.add_argument("--api-key")
    ap.add_argument("--llama-lora", action="store_true",
                    help="llama-server: select adapters with the per-request lora field")
    ap.add_argument("--json-out", help="also write the rows as JSON to this file")
    args = ap.parse_args()
    models = args.models.split(",")
    rows = [run_level(args, models, int(c)) for c in args.concurrency.split(",")]
    print("| streams | tokens | seconds | tokens/s | × 1 stream | TTFT p50 / p99 ms | "
          "between tokens p50 / p99 ms | errors |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows[0]["tokens_per_s"] or float("nan")
    for r in rows:
        print(f"| {r['streams']} | {r['tokens']} | {r['seconds']} | {r['tokens_per_s']} | "
              f"{r['tokens_per_s'] / base:.2f} | {r['ttft_p50_ms']} / {r['ttft_p99_ms']} | "
              f"{r['itl_p50_ms']} / {r['itl_p99_ms']} | {r['errors']} |")
    print(json.dumps(rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main()

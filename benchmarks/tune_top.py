"""Past the frozen ceiling: the frozen sweep vs tuning the top K layers over cached states vs full fine-tuning.

    python benchmarks/tune_top.py --features F.h5 [--ks 1,2] [--epochs 2] [--lrs 1e-4:1e-4] [--out checkpoints/bench-tune]

F.h5 is made once with `bertcache extract --model e5-small --prefix "query: " --layers 4 --states 2 ...`
(the largest K tried); it serves (a) and (b). In one run, on the same splits:
(a) `fit-head --sweep` (default grid, ensemble included) over the cached pooled features;
(b) `fit-head --tune-layers K` for each K: linear probe = the sweep's best single head (--init), then the
    top K layers + head over the cached states (defaults of pipeline/tuned.py, `--epochs` epochs), for each
    K and each layer:head learning-rate pair of `--lrs`; the best (b) is the one with the best validation;
(c) full fine-tuning of the same encoder with a plain HF loop: AutoModel + mean pooling + a linear layer,
    AdamW (lr 5e-5 encoder, 1e-3 head, weight decay 0.01), warmup 10% + linear decay, the same token-budget
    batches (4096), gradient clipping 1.0, `--epochs` epochs, the epoch with the best validation accuracy kept.
Reports test accuracy and wall seconds per training epoch (median; validation not included) for each.
Must hold (issue 16): best (b) >= (a) + 1.0 point, and (b)'s seconds per epoch <= 0.3 x (c)'s.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.common import load, machine  # noqa: E402

BATCH_TOKENS = 4096


def full_finetune(features: str, epochs: int, seed: int = 0, log=print) -> dict:
    """(c): the whole encoder + mean pooling + linear, trained on raw text of the cache's splits."""
    from transformers import AutoModel

    from pipeline.data import load_corpus
    from pipeline.encoder import Encoder, resolve_model
    from pipeline.store import FeatureStore
    from pipeline.tuned import RaggedRows

    with FeatureStore(features) as store:
        settings, label_names, source = store.settings, store.label_names, store.source
    corpus = load_corpus(source, label_names=label_names)
    enc = Encoder(settings["model"], device="cpu", precision="fp32", prefix=settings["prefix"],
                  max_length=settings["max_length"])
    torch.manual_seed(seed)
    model = AutoModel.from_pretrained(resolve_model(settings["model"]), attn_implementation="sdpa")
    head = nn.Linear(model.config.hidden_size, len(label_names))
    ids = {s: enc.tokenize(list(sp.texts)) for s, sp in corpus.splits.items()}
    labels = {s: torch.as_tensor(sp.labels) for s, sp in corpus.splits.items()}
    # token ids as a ragged "state" of width 1: RaggedRows plans the same token-budget batches as (b)
    rows = {s: RaggedRows.from_list([np.asarray(x, np.float32)[:, None] for x in v], {}, labels[s].numpy())
            for s, v in ids.items()}
    pad = enc.pad_id

    def forward(h, mask):
        out = model(input_ids=torch.where(mask.bool(), h[..., 0].long(), pad), attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        return head((out * m).sum(1) / m.sum(1))

    groups = [{"params": list(model.parameters()), "lr": 5e-5}, {"params": list(head.parameters()), "lr": 1e-3}]
    opt = torch.optim.AdamW(groups, weight_decay=0.01)
    r = rows["train"]
    steps = len(r.plan(np.arange(r.n), BATCH_TOKENS)) * epochs
    warm = max(1, int(0.1 * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm))))
    rng = np.random.default_rng(seed)

    def accuracy(split):
        model.eval()
        rr = rows[split]
        pred = np.zeros(rr.n, np.int64)
        with torch.no_grad():
            for idx, h, mask, _, _ in rr.batches(np.arange(rr.n), BATCH_TOKENS, "cpu"):
                pred[idx] = forward(h, mask).argmax(1).numpy()
        return float((pred == rr.labels.numpy()).mean())

    best, times, history = None, [], []
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        for idx, h, mask, _, y in r.batches(rng.permutation(r.n), BATCH_TOKENS, "cpu", shuffle=rng):
            loss = nn.functional.cross_entropy(forward(h, mask), y)
            loss.backward()
            nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        val = accuracy("validation")
        history.append({"epoch": epoch, "val_accuracy": val, "seconds": times[-1]})
        log(f"(c) epoch {epoch}: val accuracy {val:.4f} ({times[-1]:.0f}s)")
        if best is None or val > best[0]:
            best = (val, accuracy("test"), epoch)
    return {"val_accuracy": best[0], "test_accuracy": best[1], "best_epoch": best[2], "seconds_per_epoch": float(np.median(times)),
            "history": history}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", required=True)
    ap.add_argument("--ks", default="1,2")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lrs", default="1e-4:1e-4", help="layer_lr:head_lr pairs for (b), comma-separated")
    ap.add_argument("--out", default="checkpoints/bench-tune")
    ap.add_argument("--skip-full", action="store_true", help="leave out (c)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    from pipeline import train as T
    from pipeline.predict import evaluate
    from pipeline.sweep import sweep
    from pipeline.tuned import fit_tuned

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    print(f"date {datetime.datetime.now().isoformat(timespec='seconds')}; machine: {machine()}; "
          f"torch threads {torch.get_num_threads()}; load average at start {load()}; "
          f"command: python {' '.join(sys.argv)}")
    size = os.path.getsize(args.features)
    with T.FeatureStore(args.features) as store:
        info = store.info()
    rows_total = sum(v["rows"] for v in info["splits"].values())
    splits = ", ".join(f"{s} {v['rows']}" for s, v in info["splits"].items())
    print(f"{args.features}: {splits}; "
          f"{size / 2**20:.1f} MiB = {size / rows_total * 1000 / 2**20:.1f} MiB per 1,000 texts "
          f"(states {info['settings'].get('states')})")
    results = {}
    t0 = time.perf_counter()
    ckpt, ranked, metrics = sweep(args.features, f"{args.out}-a", progress=False)
    results["a"] = {"test_accuracy": metrics["test"]["accuracy"], "val_accuracy": ranked[0]["val_accuracy"],
                    "winner": ranked[0]["pooling"] + " " + ranked[0]["head"], "seconds": time.perf_counter() - t0}
    single = next(r for r in ranked if r["head"] != "ensemble")
    kwargs = {} if single["head"] == "logreg" else {"lr": single["lr"], "weight_decay": single["weight_decay"],
                                                     "patience": 10}
    probe, probe_metrics = T.fit_head(args.features, f"{args.out}-probe", pooling=single["pooling"],
                                      head=single["head"], **kwargs)
    results["probe"] = {"test_accuracy": probe_metrics["test"]["accuracy"], "head": f"{single['pooling']} {single['head']}"}
    log(f"(a) {results['a']}; probe {results['probe']}")
    lrs = [tuple(float(v) for v in pair.split(":")) for pair in args.lrs.split(",")]
    for k in [int(x) for x in args.ks.split(",")]:
        for layer_lr, head_lr in lrs:
            name = f"b{k}" if len(lrs) == 1 else f"b{k} lr {layer_lr:g}:{head_lr:g}"
            t0 = time.perf_counter()
            ckpt_k, m = fit_tuned(args.features, k, f"{args.out}-k{k}-{layer_lr:g}-{head_lr:g}", init=probe,
                                  epochs=args.epochs, layer_lr=layer_lr, head_lr=head_lr, log=log)
            last = evaluate(ckpt_k, weights="last")["accuracy"]
            results[name] = {"k": k, "layer_lr": layer_lr, "head_lr": head_lr,
                             "test_accuracy": m["test"]["accuracy"], "val_accuracy": m["best"]["val_accuracy"], "last_test_accuracy": last,
                             "best_epoch": m["best_epoch"], "seconds_per_epoch": m["seconds_per_epoch"],
                             "seconds": time.perf_counter() - t0, "history": m["history"]}
            log(f"(b) K={k} layer lr {layer_lr:g} head lr {head_lr:g}: {results[name]}")
    if not args.skip_full:
        results["c"] = full_finetune(args.features, args.epochs, log=log)
    print("\n| method | test accuracy | validation accuracy | s / epoch | note |")
    print("|---|---|---|---|---|")
    print(f"| (a) frozen sweep winner | {results['a']['test_accuracy']:.4f} | {results['a']['val_accuracy']:.4f} | - | "
          f"{results['a']['winner']}, sweep {results['a']['seconds']:.0f}s |")
    print(f"| probe (best single head, the init of (b)) | {results['probe']['test_accuracy']:.4f} | - | - | "
          f"{results['probe']['head']} |")
    bs = [v for key, v in results.items() if key.startswith("b")]
    for v in bs:
        lr = f", lr {v['layer_lr']:g}:{v['head_lr']:g}" if len(lrs) > 1 else ""
        print(f"| (b) --tune-layers {v['k']}{lr} | {v['test_accuracy']:.4f} | {v['val_accuracy']:.4f} | "
              f"{v['seconds_per_epoch']:.0f} | best epoch {v['best_epoch']} of {args.epochs} (0 = the probe); "
              f"last epoch's test {v['last_test_accuracy']:.4f} |")
    if "c" in results:
        c = results["c"]
        print(f"| (c) full fine-tuning (plain HF loop) | {c['test_accuracy']:.4f} | {c['val_accuracy']:.4f} | "
              f"{c['seconds_per_epoch']:.0f} | best epoch {c['best_epoch']} of {args.epochs} |")
    best_b = max(bs, key=lambda v: v["val_accuracy"]) if bs else None
    if best_b:
        gain = 100 * (best_b["test_accuracy"] - results["a"]["test_accuracy"])
        print(f"\nbest (b) by validation: test {best_b['test_accuracy']:.4f}; (b) - (a) = {gain:+.2f} points "
              f"(needs >= +1.00): {'ok' if gain >= 1.0 else 'NOT MET'}")
        if "c" in results:
            ratio = max(v["seconds_per_epoch"] for v in bs) / results["c"]["seconds_per_epoch"]
            print(f"(b) s/epoch / (c) s/epoch = {ratio:.2f} (needs <= 0.30): {'ok' if ratio <= 0.3 else 'NOT MET'}")
    print(f"load average at end {load()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

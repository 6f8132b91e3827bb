"""extract --states and fit-head --tune-layers (tiny random BERT): ragged states exact, the copied top layers
reproduce the frozen vectors, raw text equals the cached-states path, a killed extract resumes bit for bit."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
import torch

import pipeline as bc
from pipeline.checkpoint import load_checkpoint
from pipeline.data import load_corpus
from pipeline.info import as_text, describe
from pipeline.store import FeatureStore, from_storage, to_storage
from pipeline.tuned import BATCH_TOKENS as TUNED_BATCH_TOKENS, RaggedRows, TunedTop, fit_tuned, load_tuned
from conftest import default_splits, make_texts, write_split_files
from helpers import child_env, one_line_error, run as cli_run

pytestmark = pytest.mark.usefixtures("one_thread")
K = 2


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_split_files(str(tmp_path_factory.mktemp("data")), "jsonl", default_splits(n_train=80, n_val=30,
                                                                                           n_test=30))


@pytest.fixture(scope="module")
def cache(tiny_model, data, tmp_path_factory):
    """States of the top 2 layers (of 3), float32, and pooled features of the last 2 layers."""
    return bc.extract(tiny_model, data, str(tmp_path_factory.mktemp("f") / "s.h5"), precision="fp32", layers=2,
                      states=K, states_dtype="float32", progress=False)


def _hf_states(model, texts, layer):
    from transformers import AutoModel, AutoTokenizer
    tok, m = AutoTokenizer.from_pretrained(model), AutoModel.from_pretrained(model).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt", truncation=True, max_length=128)
            out.append(m(**enc, output_hidden_states=True).hidden_states[layer][0].numpy())
    return out


def test_states_are_ragged_and_exact(tiny_model, data, cache):
    texts = load_corpus(data).splits["validation"].texts
    with FeatureStore(cache) as store:
        assert store.states_settings == {"layer": 1, "k": K, "dtype": "float32"}
        flat, offsets = store.states("validation")
        info = store.info()
    ref = _hf_states(tiny_model, texts, 1)
    lengths = np.diff(offsets)
    assert offsets[0] == 0 and list(lengths) == [len(r) for r in ref]  # no padding stored
    assert flat.shape == (int(offsets[-1]), 32) and info["splits"]["validation"]["tokens"] == int(offsets[-1])
    for i, r in enumerate(ref):
        np.testing.assert_allclose(flat[offsets[i]:offsets[i + 1]], r, atol=1e-5)
    assert "  states       every token's hidden_states[1] (float32), for fit-head --tune-layers up to 2" in \
        as_text(describe(cache))  # info's text says it, not only its --json


def test_bfloat16_storage_is_torchs_rounding():
    x = np.random.default_rng(0).normal(size=(50, 7)).astype(np.float32) * 10
    stored = to_storage(x, "bfloat16")
    assert stored.dtype == np.uint16
    np.testing.assert_array_equal(from_storage(stored, "bfloat16"), torch.from_numpy(x).bfloat16().float().numpy())


def test_tuned_layers_at_init_reproduce_the_frozen_vectors(tiny_model, cache):
    from transformers import AutoModel
    from pipeline.heads import Head
    with FeatureStore(cache) as store:
        layers = store.settings["layers"]
        feats = store.features("test")
        rows = RaggedRows.from_store(store, "test", np.arange(store.rows("test")), {}, store.labels("test"))
    top = TunedTop.from_encoder(AutoModel.from_pretrained(tiny_model, attn_implementation="sdpa"), K, "mean-cat2",
                                layers, Head(64, 2)).eval()
    assert top.tuned_names == ["mean", "mean_2"] and top.frozen_names == []
    with torch.no_grad():
        for idx, h, mask, _, _ in rows.batches(np.arange(rows.n), 256, "cpu"):
            pooled = top.pooled(h, mask)
            for name in ("cls", "mean", "cls_2", "mean_2"):
                np.testing.assert_allclose(pooled[name].numpy(), feats[name][idx], atol=1e-5)


@pytest.fixture(scope="module")
def tuned(cache, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ck") / "tuned")
    return fit_tuned(cache, 1, out, pooling="cls+mean_2", head="logreg", epochs=2, layer_lr=1e-3, head_lr=1e-3,
                     batch_tokens=512, precision="fp32")


def test_tuned_checkpoint_predict_equals_cached_states(tuned, data, cache):
    ckpt, metrics = tuned
    config, head = load_checkpoint(ckpt)
    assert config["tuned"]["k"] == 1 and config["tuned"]["layer"] == 2
    assert os.path.exists(os.path.join(ckpt, "best.top.safetensors")) and len(metrics["history"]) == 3
    top = load_tuned(ckpt, config, head)
    with FeatureStore(cache) as store:
        feats = store.features("test")
        rows = RaggedRows.from_store(store, "test", np.arange(store.rows("test")),
                                     {n: feats[n] for n in top.frozen_names}, store.labels("test"))
    cached = np.zeros((rows.n, 2), np.float32)
    with torch.no_grad():
        # predict's token budget: other batch shapes move the last bits (2e-7 in the head's input on an
        # AVX512 CPU), which the logreg head's standardization magnified to 1.5e-5 in probability
        for idx, h, mask, fz, _ in rows.batches(np.arange(rows.n), TUNED_BATCH_TOKENS, "cpu"):
            cached[idx] = torch.softmax(top(h, mask, fz), -1).numpy()
    live = bc.Predictor(ckpt, device="cpu").predict_proba(load_corpus(data).splits["test"].texts)
    np.testing.assert_allclose(live, cached, atol=1e-5)
    assert bc.evaluate(ckpt)["accuracy"] == metrics["test"]["accuracy"]
    assert any("top 1 layer " in line for line in as_text(describe(ckpt)))


def test_tuned_layers_of_a_huge_model_config_are_refused_without_building_them(tuned, tmp_path):
    """config.json's model_config decides the size of the tuned layers, built before their weights were read:
    a checkpoint from someone else could ask for any amount of memory. Shapes are compared first (meta device)."""
    import shutil
    ckpt = str(tmp_path / "ck")
    shutil.copytree(tuned[0], ckpt)
    config = json.load(open(os.path.join(ckpt, "config.json")))
    config["tuned"]["model_config"]["intermediate_size"] = 2 ** 40
    json.dump(config, open(os.path.join(ckpt, "config.json"), "w"))
    _, head = load_checkpoint(ckpt)
    with pytest.raises(bc.UserError, match="does not hold the tuned layers config.json describes: .*expected "
                                           r"\[1099511627776"):
        load_tuned(ckpt, config, head)


def test_info_names_the_states_a_tuned_checkpoint_reads(tuned):
    """Tuning 1 layer over states cached for the top 2 reads hidden_states[1] (evaluate refuses a cache of
    hidden_states[2]); info said hidden_states[2], the input of the tuned layer, which no cache here holds."""
    ckpt, _ = tuned
    assert describe(ckpt)["tuned"] == {"k": 1, "layer": 2, "states_layer": 1}
    line = next(line for line in as_text(describe(ckpt)) if line.lstrip().startswith("tuned"))
    assert "the encoder's top 1 layer (trained over the cached states of hidden_states[1])" in line


def test_tuning_changes_only_the_tuned_layer(tuned, tiny_model):
    from safetensors.torch import load_file
    from transformers import AutoModel
    ckpt, _ = tuned
    state = load_file(os.path.join(ckpt, "last.top.safetensors"))  # after the last epoch (best may be the probe)
    orig = AutoModel.from_pretrained(tiny_model).encoder.layer
    below = {k[2:]: v for k, v in state.items() if k.startswith("0.")}
    above = {k[2:]: v for k, v in state.items() if k.startswith("1.")}
    assert all(torch.equal(v, orig[1].state_dict()[k]) for k, v in below.items())  # frozen: layer 2 of 3
    assert any(not torch.equal(v, orig[2].state_dict()[k]) for k, v in above.items())


def test_tune_layers_refusals(cache, tiny_cache, tmp_path):
    one_line_error(cli_run("fit-head", "-f", tiny_cache, "--tune-layers", "1", "-o", tmp_path / "x"), "--states")
    one_line_error(cli_run("fit-head", "-f", cache, "--tune-layers", "3", "-o", tmp_path / "x"), "--states 3")
    one_line_error(cli_run("fit-head", "-f", cache, "--tune-layers", "1", "--max-memory", "1G", "-o", tmp_path / "x"),
                   "--max-memory does not apply with --tune-layers")
    assert cli_run("fit-head", "-f", cache, "--tune-layers", "-1").exit_code == 2
    # the tuning's own options without --tune-layers are refused, not silently ignored (as --sweep-* without --sweep)
    for option, value in (("--layer-lr", "1e-3"), ("--head-lr", "1e-3"), ("--batch-tokens", "512"),
                          ("--precision", "fp32"), ("--init", tmp_path)):
        one_line_error(cli_run("fit-head", "-f", tiny_cache, option, value, "-o", tmp_path / "y"),
                       f"{option} goes with --tune-layers", exit_code=2)
    assert not os.path.exists(tmp_path / "y")


def test_tune_layers_refusals_name_a_fix_that_works(tiny_model, cache, tmp_path):
    """K past the model's layers, and a pair cache, were told to extract with --states K, which extract refuses."""
    one_line_error(cli_run("fit-head", "-f", cache, "--tune-layers", "4", "-o", tmp_path / "x"),
                   "between 1 and the model's 3 layers, not 4")
    rows = make_texts(40, seed=4)
    os.makedirs(tmp_path / "pairs")
    with open(tmp_path / "pairs" / "train.jsonl", "w", encoding="utf-8") as f:
        for (a, y), (b, _) in zip(rows, rows[1:] + rows[:1]):
            f.write(json.dumps({"text": a, "text_pair": b, "label": y}, ensure_ascii=False) + "\n")
    pairs = bc.extract(tiny_model, str(tmp_path / "pairs"), str(tmp_path / "p.h5"), text_pair_column="text_pair",
                       progress=False)
    error = one_line_error(cli_run("fit-head", "-f", pairs, "--tune-layers", "1", "-o", tmp_path / "x"),
                           "holds sentence pairs")
    assert "--states 1" not in error and not (tmp_path / "x").exists()


def test_init_refuses_a_head_refit_on_validation(cache, tmp_path):
    """The probe (epoch 0) competes with the tuned epochs on validation: a --refit head has been trained on those
    rows, and was taken, scoring its own training rows (it won every time on the toy data)."""
    refit = bc.fit_head(cache, str(tmp_path / "refit"), pooling="cls", head="logreg", refit=True)[0]
    one_line_error(cli_run("fit-head", "-f", cache, "--tune-layers", "1", "--init", refit, "-o", tmp_path / "x"),
                   "was trained on the validation rows too")
    held = bc.fit_head(cache, str(tmp_path / "held"), pooling="cls", head="logreg")[0]
    ckpt, _ = fit_tuned(cache, 1, str(tmp_path / "x"), init=held, epochs=1, batch_tokens=512, precision="fp32")
    assert load_checkpoint(ckpt)[0]["training"]["probe"] == held


def test_tuned_checkpoints_are_not_exported_nor_taken_as_init(tuned, cache, tmp_path):
    ckpt, _ = tuned
    one_line_error(cli_run("export", "-c", ckpt, "-o", tmp_path / "exp"), "tunes the encoder's top 1 layer(s)")
    one_line_error(cli_run("fit-head", "-f", cache, "--tune-layers", "1", "--init", ckpt, "-o", tmp_path / "x"),
                   "is a tuned checkpoint")
    one_line_error(cli_run("fit-head", "-f", cache, "--tune-layers", "1", "--init", ckpt, "--pooling", "cls",
                           "-o", tmp_path / "x"), "--pooling does not apply with --tune-layers --init")
    assert not (tmp_path / "exp").exists() and not (tmp_path / "x").exists()


def test_fp16_tuning_skips_an_overflowing_step(cache, tmp_path):
    """--precision fp16 (auto's pick on GPUs without bf16) scales the loss and skips a step whose gradients are not
    finite: one token state past fp16's range (65504) made every weight NaN, unscaled."""
    import shutil
    from safetensors.torch import load_file
    doctored = str(tmp_path / "inf.h5")
    shutil.copy(cache, doctored)
    with h5py.File(doctored, "r+") as f:
        states = f["train"]["states"]
        first = states[0]
        first[0] = 1e5
        states[0] = first
    ckpt, metrics = fit_tuned(doctored, 1, str(tmp_path / "ck"), pooling="cls", head="logreg", epochs=1,
                              batch_tokens=256, precision="fp16", device="cpu")
    for name in ("last.top.safetensors", "last.safetensors"):
        assert all(torch.isfinite(v).all() for v in load_file(os.path.join(ckpt, name)).values()), name
    assert np.isfinite(metrics["history"][1]["val_loss"])


def test_tuning_finds_the_model_a_relative_reference_named(tiny_model, data, tmp_path, monkeypatch):
    """A cache extracted with `-m model` (relative) tunes from another working directory: the recorded absolute
    folder is used, not whatever `model` means there."""
    import shutil
    work = tmp_path / "work"
    shutil.copytree(tiny_model, work / "model")
    monkeypatch.chdir(work)
    cache = bc.extract("model", data, str(tmp_path / "rel.h5"), precision="fp32", states=1, progress=False)
    monkeypatch.chdir(tmp_path)  # no ./model here
    ckpt, _ = fit_tuned(cache, 1, str(tmp_path / "ck"), pooling="cls", head="logreg", epochs=1, precision="fp32")
    assert os.path.isfile(os.path.join(ckpt, "best.top.safetensors"))


def test_tuning_shows_a_bar_per_epoch_and_not_transformers_loading_bar(cache, tmp_path, capfd):
    """An epoch over real states takes minutes: a bar over its steps; loading the layers draws no bar of its own."""
    lines = []
    fit_tuned(cache, 1, str(tmp_path / "ck"), epochs=1, batch_tokens=512, precision="fp32", device="cpu",
              log=lines.append, progress=True)
    err = capfd.readouterr().err
    assert "Loading weights" not in err
    assert re.search(r"epoch 1: +\d+%\|.*step/s", err) and any(line.startswith("epoch 1: train loss") for line in lines)


def test_tune_layers_takes_the_heads_options_and_prints_strict_json(cache, tmp_path):
    """The probe gets --head/--hidden/--lr..., the tuning --weight-decay; --json is JSON without NaN."""
    out = tmp_path / "ck"
    result = cli_run("fit-head", "-f", cache, "--tune-layers", "1", "--epochs", "1", "--head", "mlp", "--hidden", "8",
                     "--weight-decay", "0.5", "--batch-tokens", "512", "--precision", "fp32", "--device", "cpu",
                     "-o", out, "--json")
    assert result.exit_code == 0, result.output

    def no_nan(token):
        raise AssertionError(f"{token} in --json output")
    report = json.loads(result.stdout, parse_constant=no_nan)
    config = json.load(open(out / "config.json"))
    assert report["path"] == str(out) and "checkpoint" not in report and config["head"]["hidden"] == 8
    assert json.dumps(config).count('"weight_decay": 0.5') >= 1


def test_states_refused_for_other_model_families(tmp_path, data):
    from transformers import DistilBertConfig, DistilBertModel
    from conftest import build_tiny_bert
    folder = build_tiny_bert(str(tmp_path / "m"))
    DistilBertModel(DistilBertConfig(vocab_size=200, dim=32, n_layers=2, n_heads=4, hidden_dim=64)).save_pretrained(folder)
    result = cli_run("extract", "-m", folder, "-d", data, "-o", tmp_path / "x.h5", "--states", "1")
    one_line_error(result, "BERT-family")


def test_states_refused_for_other_tasks_and_truncation_said_once(tiny_model, tmp_path):
    """--states serves --tune-layers, which trains classification heads: other tasks are refused before any
    file is made (they used to be refused only at fit-head). Texts are tokenized twice with --states (the
    layout first): a truncated text is still counted once."""
    rows = make_texts(20, seed=5)
    reg = write_split_files(str(tmp_path / "r"), "jsonl", {"train": [(t, 0.5 + i / 10) for i, (t, _) in enumerate(rows)]})
    one_line_error(cli_run("extract", "-m", tiny_model, "-d", reg, "-o", tmp_path / "r.h5", "--states", "1"),
                   "trains classification heads; this data is regression", exit_code=2)
    assert not (tmp_path / "r.h5").exists() and not list(tmp_path.glob("r.h5*"))
    long = "".join(t for t, _ in make_texts(200, seed=6))
    short = [(t, y) for t, y in rows if len(t) < 20]  # within 32 tokens
    one = write_split_files(str(tmp_path / "c"), "jsonl", {"train": [(long, 0)] + short})
    result = cli_run("extract", "-m", tiny_model, "-d", one, "-o", tmp_path / "c.h5", "--states", "1",
                     "--max-length", "32", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert "1 text longer than 32 tokens was truncated" in result.stderr


@pytest.mark.slow
def test_killed_extract_with_states_resumes_bit_for_bit(tiny_model, tmp_path):
    rows = make_texts(500, seed=3)  # short texts that repeat: copied rows' states are covered too
    data = write_split_files(str(tmp_path / "d"), "jsonl", {"train": rows[:400], "test": rows[400:]})
    common = ["--device", "cpu", "--precision", "fp32", "--chunk-rows", "20", "--states", "2"]
    env = child_env(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    ref, out = str(tmp_path / "ref.h5"), str(tmp_path / "k.h5")
    subprocess.run([sys.executable, "-m", "pipeline", "extract", "-m", tiny_model, "-d", data, "-o", ref, *common],
                   env=env, check=True, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "extract", "-m", tiny_model, "-d", data, "-o", out,
                             *common], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with h5py.File(out + ".partial", "r", locking=False) as f:
                if int(f["train"].attrs["rows_done"]) >= 100:
                    break
        except Exception:
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.exists(out + ".partial") and not os.path.exists(out)
    subprocess.run([sys.executable, "-m", "pipeline", "extract", "-m", tiny_model, "-d", data, "-o", out, *common],
                   env=env, check=True, capture_output=True)
    with h5py.File(ref, "r") as a, h5py.File(out, "r") as b:
        for split in ("train", "test"):
            for name in a[split]:
                assert a[split][name][()].tobytes() == b[split][name][()].tobytes(), (split, name)
        assert json.loads(a.attrs["settings"])["states"]["dtype"] == "bfloat16"

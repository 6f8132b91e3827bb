"""Issue 14: decoder embedders (last-token pooling, EOS), sentence-transformers folders, instructions, model sources.

Tiny random models and tokenizers are built here and saved with save_pretrained; nothing is downloaded.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

import pipeline as bc
from pipeline.checkpoint import load_checkpoint
from pipeline.encoder import Encoder
from pipeline.errors import UserError
from pipeline.info import as_text, describe
from pipeline.models import instruction_prefix, resolve
from pipeline.poolings import build_features, pooling_features
from pipeline.store import FeatureStore
from pipeline.sweep import default_poolings
from conftest import default_splits, vocab_chars, write_split_files
from helpers import one_line_error, run

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["好", "这个东西真的很好", "差", "我们买了一次觉得还是不可以推荐", "满意满意", "这个东西真的很好"]


def build_tiny_qwen3(folder: str, padding_side: str = "right", eos_in_tokenizer: bool = False, seed: int = 0) -> str:
    """A Qwen3-shaped decoder (2 layers, hidden 32) with a per-character WordLevel tokenizer whose eos is
    <|im_end|> and pad <|endoftext|>, as Qwen's; `eos_in_tokenizer`: the tokenizer appends <|endoftext|>."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3Model

    os.makedirs(folder, exist_ok=True)
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {t: i for i, t in enumerate(special + vocab_chars() + list("abcdefghijklmnopqrstuvwxyz:\n "))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if eos_in_tokenizer:
        tok.post_processor = processors.TemplateProcessing(single="$A <|endoftext|>",
                                                           special_tokens=[("<|endoftext|>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", padding_side=padding_side, model_max_length=128)
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                      architectures=["Qwen3ForCausalLM"], pad_token_id=0, eos_token_id=2)
    Qwen3Model(cfg).eval().save_pretrained(folder)
    return folder


def write_sentence_folder(folder: str, base: str, modes: list[str], normalize: bool = True, dense: int | None = None,
                          include_prompt: bool = True, prompts: dict | None = None, default_prompt: str | None = None,
                          dense_format: str = "safetensors", pooling_format: str = "flags") -> str:
    """A sentence-transformers folder around the transformer in `base`, written file by file. Its pooling
    config as older sentence-transformers wrote it (`pooling_format="flags"`: one boolean per mode, concatenated
    in a fixed order) or as later versions do ("mode": `pooling_mode`, a name or a list in concatenation order)."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(base, folder)
    hidden = json.load(open(os.path.join(base, "config.json")))["hidden_size"]
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    keys = {"cls": "pooling_mode_cls_token", "mean": "pooling_mode_mean_tokens", "max": "pooling_mode_max_tokens",
            "lasttoken": "pooling_mode_lasttoken", "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
            "weightedmean": "pooling_mode_weightedmean_tokens"}
    os.makedirs(os.path.join(folder, "1_Pooling"))
    named = [{"mean_sqrt_len": "mean_sqrt_len_tokens"}.get(m, m) for m in modes]
    pooling = {"word_embedding_dimension": hidden, **{v: k in modes for k, v in keys.items()}} \
        if pooling_format == "flags" else {"embedding_dimension": hidden,
                                           "pooling_mode": named[0] if len(named) == 1 else named}
    json.dump({**pooling, "include_prompt": include_prompt},
              open(os.path.join(folder, "1_Pooling", "config.json"), "w"))
    if dense:
        modules.append({"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"})
        os.makedirs(os.path.join(folder, "2_Dense"))
        json.dump({"in_features": hidden * len(modes), "out_features": dense, "bias": True,
                   "activation_function": "torch.nn.modules.activation.Tanh"},
                  open(os.path.join(folder, "2_Dense", "config.json"), "w"))
        g = torch.Generator().manual_seed(3)
        state = {"linear.weight": torch.randn(dense, hidden * len(modes), generator=g) * 0.2,
                 "linear.bias": torch.randn(dense, generator=g) * 0.1}
        if dense_format == "safetensors":
            save_file(state, os.path.join(folder, "2_Dense", "model.safetensors"))
        else:
            torch.save(state, os.path.join(folder, "2_Dense", "pytorch_model.bin"))
    if normalize:
        modules.append({"idx": len(modules), "name": str(len(modules)), "path": f"{len(modules)}_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    json.dump(modules, open(os.path.join(folder, "modules.json"), "w"))
    json.dump({"prompts": prompts or {}, "default_prompt_name": default_prompt},
              open(os.path.join(folder, "config_sentence_transformers.json"), "w"))
    json.dump({"max_seq_length": 64, "do_lower_case": False}, open(os.path.join(folder, "sentence_bert_config.json"), "w"))
    return folder


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> str:
    return build_tiny_qwen3(str(tmp_path_factory.mktemp("qwen3")))


def _reference(model, ids: list[int]) -> torch.Tensor:
    """The model's own forward pass on one unpadded text: [tokens, hidden]."""
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).last_hidden_state[0].float()


# -- decoders: last-token pooling ----------------------------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
def test_decoder_last_token_matches_hand_reference_and_single_runs(tmp_path, side):
    from transformers import AutoModel

    folder = build_tiny_qwen3(str(tmp_path / "q"), padding_side=side)
    enc = Encoder(folder, device="cpu", precision="fp32", workers=1)
    assert enc.family == "decoder" and enc.padding_side == side
    assert enc.feature_names() == ["mean", "last"]  # no cls for a causal model
    s = enc.settings()
    assert s["append_eos"] == "<|endoftext|>" and s["default_pooling"] == "last" and s["poolings"] == ["mean", "last"]
    ids = enc.tokenize(TEXTS)
    eod = enc.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert all(seq[-1] == eod and seq.count(eod) == 1 for seq in ids)
    batch = enc.encode(TEXTS)  # one padded batch holding texts of 2 to 16 tokens
    model = AutoModel.from_pretrained(folder).eval()
    for i, seq in enumerate(ids):
        h = _reference(model, seq)
        np.testing.assert_allclose(batch["last"][i], h[-1].numpy(), atol=1e-5)
        np.testing.assert_allclose(batch["mean"][i], h.mean(0).numpy(), atol=1e-5)
        single = enc.encode([TEXTS[i]])
        np.testing.assert_allclose(batch["last"][i], single["last"][0], atol=1e-5)


def test_decoder_whose_tokenizer_adds_the_eos_gets_no_second_one(tmp_path):
    enc = Encoder(build_tiny_qwen3(str(tmp_path / "q"), eos_in_tokenizer=True), device="cpu", precision="fp32")
    assert enc.eos_id is None and "append_eos" not in enc.settings()
    ids = enc.tokenize(["好好"])[0]
    assert ids[-1] == enc.tokenizer.convert_tokens_to_ids("<|endoftext|>") and len(ids) == 3


def test_decoder_truncation_keeps_room_for_the_eos(qwen):
    enc = Encoder(qwen, device="cpu", precision="fp32", max_length=8)
    seq = enc.tokenize(["这个东西我们买了一次觉得真的很好"])[0]
    assert len(seq) == 8 and seq[-1] == enc.eos_id


def test_bert_caches_last_token_too(tiny_model):
    from transformers import AutoModel

    enc = Encoder(tiny_model, device="cpu", precision="fp32")
    assert enc.feature_names() == ["cls", "mean", "last"] and enc.settings()["family"] == "encoder"
    out = enc.encode(TEXTS[:4])  # packed path
    model = AutoModel.from_pretrained(tiny_model).eval()
    for i, seq in enumerate(enc.tokenize(TEXTS[:4])):
        np.testing.assert_allclose(out["last"][i], _reference(model, seq)[-1].numpy(), atol=1e-5)
    padded = Encoder(tiny_model, device="cpu", precision="fp32", packing="off").encode(TEXTS[:4])
    np.testing.assert_allclose(padded["last"], out["last"], atol=1e-5)


# -- sentence-transformers folders ---------------------------------------------------------------

def _st_reference(model, enc: Encoder, text: str, modes, dense_dir=None, normalize=True, skip=0):
    """sentence-transformers' recipe by hand for one text: pool the token vectors, Dense (tanh), Normalize."""
    from safetensors.torch import load_file

    h = _reference(model, enc.tokenize([text])[0])
    keep = h[skip:] if skip else h
    parts = {"cls": h[0], "mean": keep.mean(0), "max": keep.max(0).values, "lasttoken": h[-1],
             "mean_sqrt_len": keep.sum(0) / len(keep) ** 0.5,
             "weightedmean": (keep * torch.arange(skip + 1, len(h) + 1)[:, None]).sum(0)
                             / torch.arange(skip + 1, len(h) + 1).sum()}
    x = torch.cat([parts[m] for m in modes])
    if dense_dir:
        w = load_file(os.path.join(dense_dir, "model.safetensors"))
        x = torch.tanh(w["linear.weight"] @ x + w["linear.bias"])
    return (x / x.norm() if normalize else x).numpy()


@pytest.mark.parametrize("modes, pooling_format", [
    (["cls"], "flags"), (["mean"], "flags"), (["lasttoken"], "flags"), (["max"], "flags"), (["mean_sqrt_len"], "flags"),
    (["weightedmean"], "flags"), (["cls", "mean"], "flags"), (["mean"], "mode"), (["mean_sqrt_len"], "mode"),
    (["mean", "cls"], "mode")])
@pytest.mark.parametrize("packing", ["auto", "off"])
def test_sentence_folder_pooling_modes(tiny_model, tmp_path, modes, pooling_format, packing):
    from transformers import AutoModel

    folder = write_sentence_folder(str(tmp_path / "st"), tiny_model, modes, pooling_format=pooling_format)
    enc = Encoder(folder, device="cpu", precision="fp32", packing=packing)
    assert enc.feature_names()[-1] == "sentence" and enc.settings()["default_pooling"] == "sentence"
    assert enc.max_length == 64  # sentence_bert_config.json's max_seq_length
    out = enc.encode(TEXTS)
    model = AutoModel.from_pretrained(tiny_model).eval()
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(out["sentence"][i], _st_reference(model, enc, text, modes), atol=1e-5)
    assert np.allclose(np.linalg.norm(out["sentence"], axis=1), 1, atol=1e-5)


def test_sentence_folder_dense_prompt_and_excluded_prompt(tiny_model, tmp_path, capsys):
    from transformers import AutoModel

    folder = write_sentence_folder(str(tmp_path / "st"), tiny_model, ["mean"], dense=24, include_prompt=False,
                                   prompts={"query": "query: ", "document": ""})
    enc = Encoder(folder, device="cpu", precision="fp32")
    assert enc.prefix == "query: " and "'query' prompt" in capsys.readouterr().err  # said on stderr
    assert enc.settings()["feature_dims"] == {"sentence": 24}
    skip = len(enc.tokenizer("query: ")["input_ids"]) - 1  # [CLS] + the prompt's tokens, as sentence-transformers counts
    out = enc.encode(TEXTS[:3])
    assert out["sentence"].shape == (3, 24) and out["mean"].shape == (3, 32)
    model = AutoModel.from_pretrained(tiny_model).eval()
    for i, text in enumerate(TEXTS[:3]):
        ref = _st_reference(model, enc, text, ["mean"], os.path.join(folder, "2_Dense"), skip=skip)
        np.testing.assert_allclose(out["sentence"][i], ref, atol=1e-5)
    assert Encoder(folder, device="cpu", prefix="").prefix == ""  # --prefix '' wins over the model's prompt
    assert Encoder(folder, device="cpu", prefix="x: ").prefix == "x: "


def test_sentence_folder_matches_sentence_transformers_when_installed(tiny_model, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    folder = write_sentence_folder(str(tmp_path / "st"), tiny_model, ["mean"], dense=16)
    ours = Encoder(folder, device="cpu", precision="fp32", prefix="").encode(TEXTS)["sentence"]
    theirs = st.SentenceTransformer(folder, device="cpu").encode(TEXTS)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    # and a folder the installed sentence-transformers saves itself (its own pooling config format)
    word = st.models.Transformer(tiny_model)
    dim = word.get_word_embedding_dimension()
    model = st.SentenceTransformer(modules=[word, st.models.Pooling(dim, "mean"), st.models.Dense(dim, 12),
                                            st.models.Normalize()], device="cpu")
    model.save(str(tmp_path / "saved"))
    ours = Encoder(str(tmp_path / "saved"), device="cpu", precision="fp32", prefix="").encode(TEXTS)["sentence"]
    np.testing.assert_allclose(ours, model.encode(TEXTS), atol=1e-5)


def test_excluded_prompt_of_a_tokenizer_without_a_closing_token_is_left_out_whole(qwen, tmp_path):
    """include_prompt false leaves the prompt's tokens out of the pooling; sentence-transformers takes one off
    the count only when the prompt ends with a special token ([SEP]). A decoder's tokenizer adds none: the
    prompt's last token was pooled as if it were the text's."""
    folder = write_sentence_folder(str(tmp_path / "st"), qwen, ["mean"], include_prompt=False,
                                   prompts={"query": "query: "})
    enc = Encoder(folder, device="cpu", precision="fp32")
    assert enc.prefix == "query: " and enc.prompt_tokens == len(enc.tokenizer("query: ")["input_ids"]) == 7
    try:
        st = __import__("sentence_transformers")
    except ImportError:
        return
    theirs = st.SentenceTransformer(folder, device="cpu").encode(TEXTS, prompt_name="query")
    np.testing.assert_allclose(enc.encode(TEXTS)["sentence"], theirs, atol=1e-5)


def test_sentence_folders_take_no_eos_of_ours_and_no_states(tiny_model, qwen, data, tmp_path):
    """A decoder in a sentence-transformers folder encodes as sentence-transformers does (no EOS appended
    by us); --states refuses a sentence-transformers folder (its `sentence` pooling is not tuned)."""
    folder = write_sentence_folder(str(tmp_path / "stq"), qwen, ["lasttoken"], normalize=False)
    enc = Encoder(folder, device="cpu", precision="fp32")
    assert enc.family == "decoder" and enc.eos_id is None and "append_eos" not in enc.settings()
    assert Encoder(qwen, device="cpu", precision="fp32").eos_id is not None  # the bare decoder still gets one
    bert = write_sentence_folder(str(tmp_path / "stb"), tiny_model, ["mean"])
    with pytest.raises(UserError, match="--states does not go with a sentence-transformers folder"):
        bc.extract(bert, data, str(tmp_path / "s.h5"), states=1, progress=False)


def test_sentence_folder_dense_pickle_is_refused(tiny_model, tmp_path):
    folder = write_sentence_folder(str(tmp_path / "st"), tiny_model, ["mean"], dense=8, dense_format="bin")
    with pytest.raises(UserError, match="never unpickles"):
        Encoder(folder, device="cpu")


def test_sentence_folder_changes_enter_the_fingerprint(tiny_model, tmp_path):
    a = write_sentence_folder(str(tmp_path / "a"), tiny_model, ["mean"])
    b = write_sentence_folder(str(tmp_path / "b"), tiny_model, ["cls"])
    fa, fb = (Encoder(f, device="cpu").model_fingerprint for f in (a, b))
    assert fa != fb and fa != Encoder(tiny_model, device="cpu").model_fingerprint


# -- the pipeline end to end: parity for each model kind -----------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return write_split_files(str(tmp_path_factory.mktemp("enc-data")), "jsonl", default_splits())


def _sentence_folder(tmp_path, tiny_model):
    return write_sentence_folder(str(tmp_path / "st"), tiny_model, ["mean"], dense=16, prompts={"query": "query: "})


def _kinds(tmp_path, tiny_model, qwen):
    st = _sentence_folder(tmp_path, tiny_model)
    return {"bert": (tiny_model, "cls"), "decoder": (qwen, "last"), "sentence": (st, "sentence")}


@pytest.mark.parametrize("kind", ["bert", "decoder", "sentence"])
def test_predict_equals_head_on_cached_vectors(kind, tmp_path, tiny_model, qwen, data, monkeypatch):
    model, default = _kinds(tmp_path, tiny_model, qwen)[kind]
    instruction = "Classify the sentiment" if kind == "decoder" else None
    cache = bc.extract(model, data, str(tmp_path / "f.h5"), precision="fp32", device="cpu", progress=False,
                       instruction=instruction)
    ckpt, _ = bc.fit_head(cache, str(tmp_path / "ck"), epochs=5)  # the cache's default pooling
    config, head = load_checkpoint(ckpt)
    assert config["pooling"] == default
    with FeatureStore(cache) as store:
        layers = store.settings["layers"]
        X = build_features(store.features("test", pooling_features(default, layers)), default, layers)
        if instruction:
            assert store.settings["instruction"] == instruction
            assert store.settings["prefix"] == instruction_prefix(instruction)
    texts = bc.load_corpus(data).splits["test"].texts
    monkeypatch.chdir(tmp_path.parent)  # predict from another folder: the model is found by its recorded path
    predictor = bc.Predictor(ckpt, device="cpu")
    assert predictor.encoder.prefix == config["encoder"]["prefix"]
    np.testing.assert_allclose(predictor.predict_proba(texts), head.predict_proba(X), atol=1e-5)


def test_moved_model_folder_is_found_by_model_and_fingerprint(tmp_path, qwen, data, monkeypatch):
    import shutil

    model = str(tmp_path / "m")
    shutil.copytree(qwen, model)
    cache = bc.extract(model, data, str(tmp_path / "f.h5"), device="cpu", progress=False)
    ckpt, _ = bc.fit_head(cache, str(tmp_path / "ck"), epochs=2)
    shutil.move(model, str(tmp_path / "moved"))
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(UserError, match="is gone .* pass --model"):
        bc.Predictor(ckpt, device="cpu")
    p = bc.Predictor(ckpt, device="cpu", model=str(tmp_path / "moved"))
    assert p.predict(["好"])[0]["label"] in p.label_names


def test_info_and_sweep_grid_name_the_features(tmp_path, tiny_model, qwen, data):
    kinds = _kinds(tmp_path, tiny_model, qwen)
    dec = bc.extract(qwen, data, str(tmp_path / "d.h5"), device="cpu", progress=False, layers=2)
    st = bc.extract(kinds["sentence"][0], data, str(tmp_path / "s.h5"), device="cpu", progress=False)
    info = describe(dec)
    assert info["family"] == "decoder" and info["model_type"] == "qwen3" and info["feature_names"] == [
        "mean", "last", "mean_1", "last_1"]
    text = "\n".join(as_text(describe(st)))
    assert "sentence [16]" in text and "default pooling sentence" in text and "dense 32->16" in text
    with FeatureStore(dec) as s:
        assert default_poolings(s.settings["layers"], s.settings) == [
            "mean", "last", "last+mean", "mean-avg2", "last-avg2+mean-avg2", "mean-cat2"]
    with FeatureStore(st) as s:
        assert default_poolings(s.settings["layers"], s.settings)[0] == "sentence"
    for pooling in ("cls", "cls_1"):  # cls_1: layer 1 is cached; no more --layers would add a [CLS]
        with pytest.raises(UserError, match=r"no feature 'cls(_1)?'.*a decoder has no \[CLS\]"):
            bc.fit_head(dec, str(tmp_path / "ck"), pooling=pooling, epochs=1)


# -- where models come from ----------------------------------------------------------------------

@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"},
                                 {"HF_HUB_OFFLINE": ""}])
def test_unreachable_hub_fails_fast_and_says_what_was_tried(env, monkeypatch, tmp_path):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.chdir(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(UserError) as e:
        resolve("foo/bar")
    assert time.perf_counter() - t0 < 5
    assert "no folder" in str(e.value) and "HF_ENDPOINT" in str(e.value) and "modelscope:foo/bar" in str(e.value)
    # HF_ENDPOINT is not read while HF_HUB_OFFLINE is set: then the fix is to unset it
    offline = env["HF_HUB_OFFLINE"] == "1"
    assert ("unset HF_HUB_OFFLINE" in str(e.value)) == offline
    assert ("set HF_ENDPOINT to a reachable mirror" in str(e.value)) != offline
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="HF_ENDPOINT") as e:
        bc.load_corpus("mydata/reviews")
    assert time.perf_counter() - t0 < 5
    assert "modelscope" not in str(e.value)  # it is for models


def test_a_hub_models_fingerprint_follows_its_cached_snapshot(tiny_model, other_model, tmp_path, monkeypatch):
    """A hub id is fingerprinted by the commit of the snapshot it is read from. transformers 5 no longer puts
    `_commit_hash` in the config: the commit was None, and two revisions with the same config.json (new
    weights) had the same fingerprint, so a head trained on one was accepted on the other."""
    import shutil

    cache = tmp_path / "hub" / "models--org--tiny"
    (cache / "refs").mkdir(parents=True)
    for commit, weights in (("a" * 40, tiny_model), ("b" * 40, other_model)):
        shutil.copytree(tiny_model, cache / "snapshots" / commit)
        shutil.copy(os.path.join(weights, "model.safetensors"), cache / "snapshots" / commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    seen = {}
    for commit in ("a" * 40, "b" * 40):
        (cache / "refs" / "main").write_text(commit)
        enc = Encoder("org/tiny", device="cpu", precision="fp32")
        assert enc.commit == commit and enc.settings()["commit"] == commit
        seen[commit] = enc.model_fingerprint
    assert seen["a" * 40] != seen["b" * 40]
    assert Encoder("org/tiny", device="cpu", revision="a" * 40).model_fingerprint == seen["a" * 40]
    # A checkpoint made before the commit was read (commit None, the fingerprint without it) is still taken;
    # one of another model is not.
    from pipeline.fingerprints import check_same_encoder

    now = enc.settings()
    old = {"encoder": {**now, "commit": None, "model_fingerprint": enc.commitless_fingerprint}}
    check_same_encoder(old, now, "model 'org/tiny'", enc.commitless_fingerprint)
    with pytest.raises(UserError, match="model_fingerprint"):
        check_same_encoder({"encoder": {**old["encoder"], "model_fingerprint": "f" * 32}}, now, "model 'org/tiny'",
                           enc.commitless_fingerprint)
    with pytest.raises(UserError, match="model_fingerprint"):  # without the commitless one, as before
        check_same_encoder(old, now, "model 'org/tiny'")


def test_a_checkpoint_or_a_file_given_as_the_model_is_named_so(tiny_model, tmp_path):
    """Checkpoints have a config.json too; an easy slip is --model CHECKPOINT. Say what it is and its encoder."""
    from pipeline.toy import toy_data

    cache = bc.extract(tiny_model, toy_data(str(tmp_path / "d")), str(tmp_path / "f.h5"), precision="fp32",
                       progress=False)
    ckpt, _ = bc.fit_head(cache, str(tmp_path / "ck"), epochs=1)
    with pytest.raises(UserError, match=f"is a bertcache checkpoint, not an encoder; its encoder is '{tiny_model}'"):
        resolve(ckpt)
    with pytest.raises(UserError, match="is a file; give --model a model folder"):
        resolve(cache)
    assert resolve(tiny_model).folder == os.path.abspath(tiny_model)  # a model folder still resolves


def test_an_encoder_decoder_model_is_refused_before_any_file(tiny_model, tmp_path):
    """T5's forward wants decoder inputs: refused in one line when the encoder loads, no .partial left behind
    (it used to fail in the first batch, leaving a .partial that blocked the next run)."""
    import shutil

    from transformers import T5Config, T5Model

    from pipeline.toy import toy_data
    folder = str(tmp_path / "t5")
    T5Model(T5Config(vocab_size=200, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                     decoder_start_token_id=0)).save_pretrained(folder)
    for name in os.listdir(tiny_model):
        if name.startswith(("tokenizer", "vocab", "special")):
            shutil.copy(os.path.join(tiny_model, name), folder)
    out = tmp_path / "f" / "x.h5"
    r = run("extract", "-m", folder, "-d", toy_data(str(tmp_path / "d")), "-o", out)
    one_line_error(r, "is an encoder-decoder (t5)", exit_code=2)
    assert not os.path.exists(tmp_path / "f") or not os.listdir(tmp_path / "f")


def test_a_model_folder_without_tokenizer_files_is_refused(tiny_model, tmp_path, data):
    """transformers builds a tokenizer of special tokens only from a folder with weights and config.json but no
    tokenizer files: every text became [CLS] [UNK]... [SEP] and extract cached those vectors without a word."""
    import shutil

    folder = tmp_path / "weights-only"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(tiny_model, name), folder)
    out = tmp_path / "f" / "x.h5"
    r = run("extract", "-m", folder, "-d", data, "-o", out, "--device", "cpu")
    one_line_error(r, "cannot load the tokenizer", "no tokenizer files", "tokenizer.save_pretrained", exit_code=2)
    assert not os.path.exists(tmp_path / "f") or not os.listdir(tmp_path / "f")


def test_modelscope_without_the_package_is_one_line(tmp_path, data):
    try:
        import modelscope  # noqa: F401
        pytest.skip("modelscope is installed")
    except ImportError:
        pass
    with pytest.raises(UserError, match=r"pip install 'bertcache\[modelscope\]'"):
        resolve("modelscope:Qwen/Qwen3-Embedding-0.6B")


def test_prefix_and_instruction_together_are_refused(tiny_model, data, tmp_path):
    from helpers import one_line_error, run
    result = run("extract", "--model", tiny_model, "--data", data, "--out", tmp_path / "f.h5", "--prefix", "x",
                 "--instruction", "y")
    one_line_error(result, "--instruction")


def test_sentence_folder_extracts_under_bf16(tmp_path, tiny_model, data):
    """Its Dense module runs in float32 under the encoder's bf16 autocast (it used to hand bf16 vectors to the
    float32 cache and fail); the vectors stay close to fp32's. Found on a CPU with AVX512-BF16 (auto = bf16)."""
    st = _sentence_folder(tmp_path, tiny_model)
    out = {p: bc.extract(st, data, str(tmp_path / f"{p}.h5"), device="cpu", precision=p, progress=False)
           for p in ("fp32", "bf16")}
    with FeatureStore(out["fp32"]) as a, FeatureStore(out["bf16"]) as b:
        x, y = a.features("test", ["sentence"])["sentence"], b.features("test", ["sentence"])["sentence"]
    assert y.dtype == np.float32 and y.shape == x.shape
    cos = (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)
    assert cos.min() > 0.99


def test_the_estimators_take_a_sentence_folders_prompt_as_extract_does(tiny_model, tmp_path):
    """prefix=None (extract's and Encoder's default) is the folder's default prompt, in the estimators too (their
    default was "": no prompt, so a TextClassifier encoded other vectors than extract over the same folder)."""
    estimator = pytest.importorskip("pipeline.estimator")
    folder = write_sentence_folder(str(tmp_path / "st"), tiny_model, ["mean"], prompts={"query": "query: "},
                                   default_prompt="query")
    assert Encoder(folder, device="cpu").prefix == "query: "
    assert estimator.TextClassifier(folder, device="cpu")._encoder().prefix == "query: "
    assert estimator.TextRegressor(folder, device="cpu", prefix="")._encoder().prefix == ""

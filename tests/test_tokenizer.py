"""The remembered tokenizer (pipeline/tokenizer.py): a copy reads back encoding exactly as AutoTokenizer's
tokenizer does, follows its files, survives damage, and the encoder's vectors and settings do not change."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from pipeline import models as M
from pipeline import tokenizer as T
from pipeline.toy import make_texts, toy_model, vocab_chars

TEXTS = [t for t, _ in make_texts(12)] + ["Hello  world", "", "我爱北京天安门 abc", "<mask> 今天 </s>"]


def xlmr_folder(folder: str) -> str:
    """A tiny XLM-R-style (Unigram) tokenizer, the kind transformers 5 rebuilds on every load."""
    from transformers import XLMRobertaTokenizer
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(c, -1.0 - i / 10) for i, c in enumerate(vocab_chars())] + [("▁" + c, -9.0) for c in "abcdehlorw"]
    pieces += [("▁", -2.0), ("<mask>", 0.0)]
    XLMRobertaTokenizer(vocab=pieces).save_pretrained(folder)
    return folder


@pytest.fixture(params=["bert", "xlmr"])
def folder(request, tmp_path):
    return toy_model(str(tmp_path / "bert")) if request.param == "bert" else xlmr_folder(str(tmp_path / "xlmr"))


def loaded_first(folder: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


def copies(home) -> list[str]:
    return sorted(d for d in os.listdir(home) if not d.startswith(".")) if os.path.isdir(home) else []


def test_a_slow_tokenizer_is_copied_once_and_reads_back_the_same(folder, tmp_path):
    home = str(tmp_path / "memo")
    first, name = T.load_tokenizer(folder, memo_home=home, min_seconds=0)
    assert type(first).__name__ == name and name in ("BertTokenizer", "XLMRobertaTokenizer")
    made = copies(home)
    assert len(made) == 1
    mtime = os.path.getmtime(os.path.join(home, made[0], "tokenizer.json"))
    second, name2 = T.load_tokenizer(folder, memo_home=home, min_seconds=0)
    assert type(second).__name__ == "TokenizersBackend" and name2 == name  # read from the copy, named as before
    assert T.same_tokenizer(first, second)
    assert first(TEXTS)["input_ids"] == second(TEXTS)["input_ids"]
    assert first(TEXTS, padding=True, return_tensors="np")["attention_mask"].tolist() == \
        second(TEXTS, padding=True, return_tensors="np")["attention_mask"].tolist()
    assert copies(home) == made  # read, not written again
    assert os.path.getmtime(os.path.join(home, made[0], "tokenizer.json")) == mtime
    # The added tokens are in the copy's config: from_pretrained need not parse tokenizer.json in Python for them.
    with open(os.path.join(home, made[0], "tokenizer_config.json"), encoding="utf-8") as f:
        added = json.load(f)["added_tokens_decoder"]
    assert {int(i): t["content"] for i, t in added.items()} == \
        {i: t.content for i, t in first.added_tokens_decoder.items()}


def test_the_copy_follows_the_tokenizer_files(tmp_path):
    folder, home = toy_model(str(tmp_path / "bert")), str(tmp_path / "memo")
    T.load_tokenizer(folder, memo_home=home, min_seconds=0)
    config = os.path.join(folder, "tokenizer_config.json")
    settings = json.load(open(config))
    settings["model_max_length"] = 7
    json.dump(settings, open(config, "w"))
    tok, name = T.load_tokenizer(folder, memo_home=home, min_seconds=0)
    assert type(tok).__name__ == name == "BertTokenizer" and tok.model_max_length == 7  # not the old copy
    assert len(copies(home)) == 2
    again, _ = T.load_tokenizer(folder, memo_home=home, min_seconds=0)
    assert type(again).__name__ == "TokenizersBackend" and again.model_max_length == 7
    config = os.path.join(folder, "config.json")  # the model type can pick the class: a new copy too
    settings = json.load(open(config))
    settings["max_position_embeddings"] = int(settings["max_position_embeddings"]) + 1
    json.dump(settings, open(config, "w"))
    T.load_tokenizer(folder, memo_home=home, min_seconds=0)
    assert len(copies(home)) == 3


def test_a_damaged_copy_is_loaded_again_and_replaced(tmp_path):
    folder, home = xlmr_folder(str(tmp_path / "xlmr")), str(tmp_path / "memo")
    T.load_tokenizer(folder, memo_home=home, min_seconds=0)
    (copy,) = copies(home)
    os.remove(os.path.join(home, copy, "tokenizer.json"))
    tok, name = T.load_tokenizer(folder, memo_home=home, min_seconds=0)
    assert type(tok).__name__ == name == "XLMRobertaTokenizer"
    assert copies(home) == [copy] and os.path.exists(os.path.join(home, copy, "tokenizer.json"))


def test_fast_loads_and_generic_tokenizers_are_not_copied(tmp_path):
    from transformers import PreTrainedTokenizerFast
    home = str(tmp_path / "memo")
    T.load_tokenizer(toy_model(str(tmp_path / "bert")), memo_home=home, min_seconds=60)
    generic = str(tmp_path / "generic")
    PreTrainedTokenizerFast(tokenizer_file=os.path.join(tmp_path, "bert", "tokenizer.json"),
                            unk_token="[UNK]").save_pretrained(generic)
    tok, name = T.load_tokenizer(generic, memo_home=home, min_seconds=0)
    assert name == "TokenizersBackend"
    assert copies(home) == [] and not T._plain(type(tok))


def test_same_tokenizer_tells_tokenizers_apart(tmp_path):
    folder = toy_model(str(tmp_path / "bert"))
    a, _ = T.load_tokenizer(folder)
    b, _ = T.load_tokenizer(folder)
    assert T.same_tokenizer(a, b)
    b.add_tokens(["很好"])  # a token more: "很好" splits differently
    assert not T.same_tokenizer(a, b)
    c, _ = T.load_tokenizer(folder)
    c.truncation_side = "left"
    assert not T.same_tokenizer(a, c)


def test_encoder_vectors_and_settings_are_the_same_from_the_copy(tmp_path, monkeypatch):
    from pipeline.encoder import Encoder
    monkeypatch.setenv("BERTCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(T, "MEMO_MIN_SECONDS", 0.0)
    folder = toy_model(str(tmp_path / "bert"))
    first = Encoder(folder, precision="fp32", prefix="前缀")
    second = Encoder(folder, precision="fp32", prefix="前缀")
    assert type(first.tokenizer).__name__ == "BertTokenizer"
    assert type(second.tokenizer).__name__ == "TokenizersBackend"
    assert first.settings() == second.settings() and first.model_fingerprint == second.model_fingerprint
    a, b = first.encode(TEXTS), second.encode(TEXTS)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_a_copy_saves_as_the_models_own_tokenizer(tmp_path):
    from transformers import AutoTokenizer
    folder, home = xlmr_folder(str(tmp_path / "xlmr")), str(tmp_path / "memo")
    T.load_tokenizer(folder, memo_home=home, min_seconds=0)
    copy, name = T.load_tokenizer(folder, memo_home=home, min_seconds=0)
    T.save_tokenizer(copy, name, str(tmp_path / "saved"))
    again = AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    assert type(again).__name__ == "XLMRobertaTokenizer" and T.same_tokenizer(again, copy)


def test_a_hub_model_in_the_cache_is_remembered(tmp_path, monkeypatch):
    """A hub id found in the Hugging Face cache (laid out as huggingface_hub writes it) gets a copy too."""
    import shutil
    cache, commit = tmp_path / "hub", "0" * 40
    snapshot = cache / "models--org--tiny-bert" / "snapshots" / commit
    shutil.copytree(toy_model(str(tmp_path / "bert")), snapshot)
    (cache / "models--org--tiny-bert" / "refs").mkdir()
    (cache / "models--org--tiny-bert" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    home = str(tmp_path / "memo")
    first, name = T.load_tokenizer("org/tiny-bert", memo_home=home, min_seconds=0)
    second, name2 = T.load_tokenizer("org/tiny-bert", memo_home=home, min_seconds=0)
    assert (type(first).__name__, type(second).__name__) == ("BertTokenizer", "TokenizersBackend")
    assert name == name2 == "BertTokenizer" and T.same_tokenizer(first, second)
    assert M.local_folder("org/not-cached", {}, "tokenizer.json") is None
    assert M.local_folder("not a repo id!", {}, "tokenizer.json") is None
    # Online, from_pretrained may fetch a newer revision than the cached snapshot the key would name: no copy
    # unless the revision is a full commit hash.
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    assert not M.pinned({}) and not M.pinned({"revision": "main"}) and not M.pinned({"revision": "0" * 39})
    assert M.pinned({"revision": commit}) and M.pinned({"local_files_only": True})


def test_an_unwritable_home_or_a_race_leaves_loading_as_it_was(tmp_path):
    """The copy is an optimization: a read-only home loads as AutoTokenizer does; writers that race publish
    one copy and leave no temporary folders."""
    from concurrent.futures import ThreadPoolExecutor
    folder = xlmr_folder(str(tmp_path / "xlmr"))
    blocked = tmp_path / "a-file"  # a home below a file cannot be made, not even by root (chmod would not stop root)
    blocked.write_text("")
    for _ in range(2):
        tok, name = T.load_tokenizer(folder, memo_home=str(blocked / "memo"), min_seconds=0)
        assert type(tok).__name__ == name == "XLMRobertaTokenizer" and T.same_tokenizer(tok, loaded_first(folder))
    home = str(tmp_path / "memo")
    with ThreadPoolExecutor(4) as pool:
        loaded = list(pool.map(lambda _: T.load_tokenizer(folder, memo_home=home, min_seconds=0), range(4)))
    assert {name for _, name in loaded} == {"XLMRobertaTokenizer"}
    assert len(copies(home)) == 1 and os.listdir(home) == copies(home)  # no .tmp- folders left
    copy, _ = T.load_tokenizer(folder, memo_home=home, min_seconds=0)
    assert type(copy).__name__ == "TokenizersBackend" and T.same_tokenizer(loaded[0][0], copy)


def test_pruning_keeps_the_most_recently_used_copies(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "MEMO_KEEP", 2)
    home = str(tmp_path / "memo")
    folders = [xlmr_folder(str(tmp_path / f"xlmr{i}")) for i in range(3)]
    for i, folder in enumerate(folders):  # three tokenizers: three keys
        config = os.path.join(folder, "tokenizer_config.json")
        json.dump({**json.load(open(config)), "model_max_length": 100 + i}, open(config, "w"))
    T.load_tokenizer(folders[0], memo_home=home, min_seconds=0)
    T.load_tokenizer(folders[1], memo_home=home, min_seconds=0)
    # made within a second: give them distinct ages, the first tokenizer's copy the oldest
    (a, b) = sorted(copies(home), key=lambda d: T._read_copy(os.path.join(home, d))[0].model_max_length)
    os.utime(os.path.join(home, a), (1_000_000, 1_000_000))
    os.utime(os.path.join(home, b), (2_000_000, 2_000_000))
    tok, _ = T.load_tokenizer(folders[0], memo_home=home, min_seconds=0)  # a read makes a the newest
    assert type(tok).__name__ == "TokenizersBackend"
    # a killed writer's temporary folder: removed once an hour old, a fresh one (a live writer's) kept
    for name, age in ((".tmp-killed", 7200), (".tmp-live", 0)):
        os.makedirs(os.path.join(home, name))
        os.utime(os.path.join(home, name), (time.time() - age,) * 2)
    T.load_tokenizer(folders[2], memo_home=home, min_seconds=0)  # a third copy: the least recently used goes
    assert a in copies(home) and b not in copies(home) and len(copies(home)) == 2
    assert sorted(d for d in os.listdir(home) if d.startswith(".")) == [".tmp-live"]


def test_an_unreadable_extra_file_loads_without_a_copy(tmp_path):
    folder, home = toy_model(str(tmp_path / "bert")), str(tmp_path / "memo")
    os.symlink(str(tmp_path / "nowhere"), os.path.join(folder, "tokenizer.extra.json"))  # dangling
    tok, name = T.load_tokenizer(folder, memo_home=home, min_seconds=0)
    assert name == "BertTokenizer" and copies(home) == []

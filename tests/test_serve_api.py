"""serve, for shipping: readable 413s over real sockets, TEI / OpenAI shapes, the API key, CORS, the demo page."""
import base64
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

import pipeline as bc  # noqa: E402
from conftest import LABEL_NAMES  # noqa: E402
from helpers import record_threads  # noqa: E402
from pipeline import serve as S  # noqa: E402
from pipeline.poolings import build_features  # noqa: E402
from pipeline.serve import create_app  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
LABELS = LABEL_NAMES


@pytest.fixture(scope="module")
def predictor(named_checkpoint):
    return bc.Predictor(named_checkpoint, device="cpu")


class LiveServer:
    """The app on a real TCP socket (uvicorn in a thread): what TestClient cannot show, the connection itself."""

    def __init__(self, app):
        import uvicorn

        self.sock = S.bind("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            assert time.time() < deadline, "the server did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


LIMIT = 100_000


def test_a_body_ten_times_the_limit_gets_a_readable_413(predictor):
    """The whole body is sent before the client reads: without the drain the server's close resets the connection
    and the client never sees the 413."""
    body = json.dumps({"texts": ["好" * (10 * LIMIT // 3)]}, ensure_ascii=False).encode()
    assert len(body) >= 10 * LIMIT
    with LiveServer(create_app(predictor, max_body_bytes=LIMIT)) as url:
        # A plain socket: headers and the whole body, then read the answer to the end.
        with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=60) as sock:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), head
        assert f"larger than {LIMIT} bytes" in json.loads(payload)["detail"]
        # httpx, declared length and streamed (chunked, no length): both read the 413 and its JSON.
        r = httpx.post(url + "/predict", content=body, headers={"content-type": "application/json"}, timeout=60)
        assert r.status_code == 413 and "larger than" in r.json()["detail"]
        streamed = httpx.post(url + "/predict", content=(body[i:i + 8192] for i in range(0, len(body), 8192)),
                              headers={"content-type": "application/json"}, timeout=60)
        assert streamed.status_code == 413 and "larger than" in streamed.json()["detail"]
        # The server is fine afterwards and never encoded anything for them.
        health = httpx.get(url + "/health").json()
        assert health["encoder_calls"] == 0
        ok = httpx.post(url + "/predict", json={"texts": ["好"]}, timeout=60)
        assert ok.status_code == 200


# -- TEI (text-embeddings-inference) and OpenAI shapes -------------------------------------------------

def test_tei_predict_shapes(predictor):
    """Bodies from TEI's docs (quick tour: {"inputs": "I like you."}) and router types: a text, [text], a batch
    [[text], ...]; the answer is TEI's: per text, every label with its score, best first."""
    want = predictor.predict(["I like you.", "这个东西真的很好"])
    with TestClient(create_app(predictor)) as client:
        single = client.post("/predict", json={"inputs": "I like you."})
        listed = client.post("/predict", json={"inputs": ["I like you."], "truncate": True})
        batch = client.post("/predict", json={"inputs": [["I like you."], ["这个东西真的很好"]]})
        raw = client.post("/predict", json={"inputs": "I like you.", "raw_scores": True})
    for r in (single, listed, batch, raw):
        assert r.status_code == 200, r.text
    assert single.json() == listed.json()
    rows = [single.json()] + [batch.json()[1]]
    for got, w in zip(rows, want):
        assert [set(p) for p in got] == [{"score", "label"}] * len(LABELS)
        assert [p["score"] for p in got] == sorted((p["score"] for p in got), reverse=True)
        assert got[0]["label"] == w["label"]
        assert {p["label"]: p["score"] for p in got} == pytest.approx(w["probabilities"], abs=1e-6)
    assert [p["label"] for p in batch.json()[0]] == [p["label"] for p in single.json()]
    assert [p["score"] for p in batch.json()[0]] == pytest.approx([p["score"] for p in single.json()], abs=1e-6)
    logits = {p["label"]: p["score"] for p in raw.json()}
    z = np.array([logits[n] for n in LABELS])
    assert np.allclose(np.exp(z) / np.exp(z).sum(), [want[0]["probabilities"][n] for n in LABELS], atol=1e-6)


def test_tei_pairs_get_a_clear_422(predictor):
    with TestClient(create_app(predictor)) as client:
        pair = client.post("/predict", json={"inputs": ["I like you.", "I love you"]})
        in_batch = client.post("/predict", json={"inputs": [["a"], ["I like you.", "I love you"]]})
        three = client.post("/predict", json={"inputs": ["a", "b", "c"]})
        empty = client.post("/predict", json={"inputs": []})
        calls = client.get("/health").json()["encoder_calls"]
    assert pair.status_code == 422 and "pair" in pair.json()["detail"] and "issue" not in pair.json()["detail"]
    assert in_batch.status_code == 422 and in_batch.json()["errors"][0]["loc"] == ["inputs", 1]
    assert three.status_code == 422 and empty.status_code == 422
    assert calls == 0


def test_tei_predict_takes_what_huggingface_hub_sends(predictor):
    """InferenceClient.text_classification posts {"inputs": text, "parameters": {...}} (its top_k and
    function_to_apply); TEI ignores `parameters`, so a TEI client must not get a 422 for it."""
    with TestClient(create_app(predictor)) as client:
        plain = client.post("/predict", json={"inputs": "I like you."})
        hub = client.post("/predict", json={"inputs": "I like you.", "parameters": {}})
        top = client.post("/predict", json={"inputs": "I like you.", "parameters": {"top_k": 1}})
    assert hub.status_code == 200 and top.status_code == 200, hub.text
    assert hub.json() == plain.json() == top.json()


def test_post_to_the_root_is_teis_predict(predictor):
    """TEI answers POST / as /predict for a classifier, and huggingface_hub's InferenceClient given the server's
    address posts there (it got 405); GET / stays the demo page, open, while POST / needs the key."""
    body = {"inputs": "I like you.", "parameters": {}}
    with TestClient(create_app(predictor)) as client:
        root, predict = client.post("/", json=body), client.post("/predict", json=body)
        bad = client.post("/", json={"inputs": ["a", "b", "c"]})
    assert root.status_code == 200 and root.json() == predict.json(), root.text
    assert bad.status_code == 422 and bad.json()["detail"].startswith("inputs holds 3 strings")
    with TestClient(create_app(predictor, api_key="k")) as client:
        assert client.get("/").status_code == 200
        assert client.post("/", json=body).status_code == 401
        assert client.post("/", json=body, headers={"Authorization": "Bearer k"}).json() == predict.json()


def test_tei_list_of_strings_is_one_text_or_a_pair(predictor):
    """TEI reads ["a", "b", "c"] as neither a text, a pair nor a batch: the message says so (it said "too many
    texts (3): at most 64"), and one problem is one problem (an empty list failed two union branches alike)."""
    with TestClient(create_app(predictor)) as client:
        three = client.post("/predict", json={"inputs": ["a", "b", "c"]}).json()
        empty = client.post("/predict", json={"inputs": []}).json()
    assert three["detail"].startswith("inputs holds 3 strings") and "[[" in three["detail"], three
    assert "too many" not in three["detail"]
    assert empty["detail"] == '"inputs" is empty: send at least one text' and len(empty["errors"]) == 1, empty


def test_tei_embed_and_openai_embeddings(predictor):
    texts = ["What is Deep Learning?", "这个东西真的很好"]
    features = build_features(predictor.encoder.encode(texts), predictor.pooling, predictor.layers)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    with TestClient(create_app(predictor)) as client:
        one = client.post("/embed", json={"inputs": "What is Deep Learning?"})
        two = client.post("/embed", json={"inputs": texts, "truncate": False})
        raw = client.post("/embed", json={"inputs": texts, "normalize": False})
        oa = client.post("/v1/embeddings", json={"input": texts, "model": "bertcache"})
        b64 = client.post("/v1/embeddings", json={"input": texts[0], "encoding_format": "base64"})
        bad = client.post("/v1/embeddings", json={"input": texts[0], "dimensions": 3})
        too_many = client.post("/embed", json={"inputs": ["x"] * (S.MAX_TEXTS + 1)})
    assert one.status_code == 200 and np.array(one.json()).shape == (1, features.shape[1])  # always a batch
    assert np.allclose(two.json(), unit, atol=1e-5) and np.allclose(one.json()[0], unit[0], atol=1e-5)
    assert np.allclose(raw.json(), features, atol=1e-5)
    body = oa.json()
    assert body["object"] == "list" and body["model"] == "bertcache"
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    assert np.allclose([d["embedding"] for d in body["data"]], unit, atol=1e-5)
    assert body["usage"]["prompt_tokens"] == sum(len(s) for s in predictor.encoder.tokenize(texts)) > 0
    decoded = np.frombuffer(base64.b64decode(b64.json()["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, unit[0], atol=1e-5)
    assert bad.status_code == 422 and "dimensions" in bad.json()["detail"]
    assert too_many.status_code == 422 and too_many.json()["detail"].startswith("too many texts (65)")


def test_embed_errors_name_the_endpoints_own_fields(predictor):
    """A string-or-list field (TEI's inputs, OpenAI's input) fails once per union branch: the message is the
    branch's that matched the type (a blank text, too many), in the endpoint's own words; HEAD works on GETs."""
    with TestClient(create_app(predictor)) as client:
        blank = client.post("/embed", json={"inputs": ["好", " "]}).json()["detail"]
        empty = client.post("/embed", json={"inputs": ""}).json()["detail"]
        unknown = client.post("/v1/embeddings", json={"input": "好", "texts": ["好"]}).json()["detail"]
        missing = client.post("/v1/embeddings", json={}).json()["detail"]
        form = client.post("/predict", content='{"texts": ["好"]}', headers={"content-type": "text/plain"})
        tei_many = client.post("/predict", json={"inputs": [["a"]] * (S.MAX_TEXTS + 1)}).json()["detail"]
        heads = [client.head(p).status_code for p in ("/health", "/info", "/")]
    assert blank.startswith("inputs[1] is empty or blank") and "constrained" not in blank
    assert empty.startswith("inputs is empty or blank"), empty
    assert unknown.startswith('unknown field "texts": the body takes OpenAI\'s "input"'), unknown
    assert missing.startswith('the body has no "input" field'), missing
    assert form.status_code == 400 and form.json()["detail"].startswith("the body was not sent as JSON")
    assert tei_many.startswith("too many texts (65)"), tei_many
    assert heads == [200, 200, 200]


def test_embed_shares_the_micro_batches(predictor):
    """/predict and /embed requests arriving together go through one encoder call."""
    import asyncio

    app = create_app(predictor, max_wait_ms=200)

    async def main():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                rs = await asyncio.gather(client.post("/predict", json={"texts": ["好"]}),
                                          client.post("/embed", json={"inputs": "好"}),
                                          client.post("/predict", json={"inputs": "差"}))
                return rs, (await client.get("/health")).json()

    rs, health = asyncio.run(main())
    assert [r.status_code for r in rs] == [200, 200, 200]
    assert health["requests"] == 3 and health["encoder_calls"] == 1


def test_openai_usage_tokenizes_on_the_encoder_thread(named_checkpoint):
    """/v1/embeddings' token count runs on the batcher's worker, as every encoder call does: a fast tokenizer
    entered from two threads at once can fail ("Already borrowed"); it ran on the event loop's thread."""
    p = bc.Predictor(named_checkpoint, device="cpu")
    threads = record_threads(p.encoder, "tokenize")
    with TestClient(create_app(p)) as client:
        r = client.post("/v1/embeddings", json={"input": ["好", "差"]})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 0
    assert len(threads) == 1 and next(iter(threads)).startswith("bertcache-encoder"), threads


# -- access control, CORS, the page ------------------------------------------------------------------------

def test_api_key_guards_every_endpoint_but_health(predictor):
    app = create_app(predictor, api_key="s3cret-key")
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        assert client.get("/").status_code == 200  # the static page; its calls need the key
        refused = [client.post("/predict", json={"texts": ["好"]}),
                   client.post("/predict", json={"texts": ["好"]}, headers={"Authorization": "Bearer wrong"}),
                   client.post("/predict", json={"texts": ["好"]}, headers={"Authorization": "s3cret-key"}),
                   client.post("/predict", json={"texts": ["好"]}, headers={"Authorization": "Basic s3cret-key"}),
                   client.post("/embed", json={"inputs": "好"}, headers={"Authorization": "Bearer s3cret-ke"}),
                   client.post("/v1/embeddings", json={"input": "好"}),
                   client.get("/info"), client.get("/openapi.json")]
        assert [r.status_code for r in refused] == [401] * len(refused)
        assert all(r.headers["www-authenticate"] == "Bearer" and r.json()["detail"] for r in refused)
        assert "needs an API key" in refused[0].json()["detail"] and "wrong" in refused[1].json()["detail"]
        assert client.get("/health").json()["encoder_calls"] == 0  # none of them reached the encoder
        good = client.post("/predict", json={"texts": ["好"]}, headers={"Authorization": "Bearer s3cret-key"})
        assert good.status_code == 200
        assert client.get("/health").json()["encoder_calls"] == 1


def test_cors_is_off_by_default_and_on_for_the_given_origin(predictor):
    origin = "https://demo.example.org"
    with TestClient(create_app(predictor)) as client:
        r = client.post("/predict", json={"texts": ["好"]}, headers={"Origin": origin})
        assert "access-control-allow-origin" not in r.headers
    with TestClient(create_app(predictor, cors_origins=(origin,), api_key="k")) as client:
        pre = client.options("/predict", headers={"Origin": origin, "Access-Control-Request-Method": "POST",
                                                  "Access-Control-Request-Headers": "authorization,content-type"})
        assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == origin
        r = client.post("/predict", json={"texts": ["好"]}, headers={"Origin": origin, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == origin
        other = client.post("/predict", json={"texts": ["好"]}, headers={"Origin": "https://evil.example",
                                                                        "Authorization": "Bearer k"})
        assert "access-control-allow-origin" not in other.headers


def test_demo_page_and_no_ui(predictor):
    with TestClient(create_app(predictor)) as client:
        page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    assert '<html lang="zh">' in html and '<label for="text">' in html
    assert "http://" not in html and "https://" not in html  # no external assets: works offline
    with TestClient(create_app(predictor, ui=False)) as client:
        assert client.get("/").status_code == 405  # no page; POST / is TEI's /predict


def test_non_loopback_host_without_key_warns(tmp_path):
    assert S.is_loopback("127.0.0.1") and S.is_loopback("::1") and S.is_loopback("localhost")
    assert not S.is_loopback("0.0.0.0") and not S.is_loopback("192.168.1.5")
    lines = []
    with pytest.raises(bc.UserError):  # the checkpoint does not exist: it stops after the warning
        S.serve(str(tmp_path / "none"), host="0.0.0.0", port=0, log=lines.append)
    assert any("without an API key" in line and "--api-key" in line for line in lines)
    lines.clear()
    with pytest.raises(bc.UserError):
        S.serve(str(tmp_path / "none"), host="0.0.0.0", port=0, log=lines.append, api_key="k")
    assert not any("without an API key" in line for line in lines)

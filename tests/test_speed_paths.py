"""The fast paths give the same numbers as the plain ones they replace."""
import contextlib

import numpy as np
import torch

from pipeline.heads import Head
from pipeline.training import fit
from pipeline.encoder import Encoder
from tests.conftest import make_texts


def _plain_vectors(enc: Encoder, texts, dtype):
    """CLS vectors from an untouched copy of the model under plain torch.autocast, one text at a time."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(enc.model_ref).eval()
    cast = torch.autocast("cpu", dtype=dtype) if dtype else contextlib.nullcontext()
    out = []
    with torch.inference_mode(), cast:
        for ids in enc.tokenize(texts):
            out.append(model(input_ids=torch.tensor([ids])).last_hidden_state[0, 0].float())
    return torch.stack(out).numpy()


def test_bf16_weights_cast_once_match_autocast(tiny_model):
    texts = [t for t, _ in make_texts(12)]
    enc = Encoder(tiny_model, device="cpu", precision="bf16")
    assert all(m.weight.dtype == torch.bfloat16 for m in enc.model.modules() if isinstance(m, torch.nn.Linear))
    np.testing.assert_allclose(enc.encode(texts)["cls"], _plain_vectors(enc, texts, torch.bfloat16), atol=1e-2)
    fp32 = Encoder(tiny_model, device="cpu", precision="fp32")
    np.testing.assert_allclose(fp32.encode(texts)["cls"], _plain_vectors(fp32, texts, None), atol=1e-5)


def test_fp32_vector_independent_of_batch_neighbours(tiny_model):
    enc = Encoder(tiny_model, device="cpu", precision="fp32", batch_tokens=256)
    short, long_ = "好", "这个东西我们买了一次觉得真的很好" * 6
    alone = enc.encode([short])
    mixed = enc.encode([long_] * 3 + [short] + ["差"] * 40)
    for name in alone:
        np.testing.assert_allclose(mixed[name][3], alone[name][0], atol=1e-5)


def test_fit_learns_and_leaves_thread_count_alone():
    rng = np.random.default_rng(0)
    w = rng.standard_normal(16)
    X, Xv = rng.standard_normal((600, 16)).astype(np.float32), rng.standard_normal((100, 16)).astype(np.float32)
    y, yv = (X @ w > 0).astype(np.int64), (Xv @ w > 0).astype(np.int64)
    before = torch.get_num_threads()
    res = fit(X, y, Xv, yv, 2, epochs=30, batch_size=64, patience=None)
    assert torch.get_num_threads() == before
    assert res.history[-1]["val_accuracy"] > 0.9 and res.history[-1]["train_accuracy"] > 0.8
    assert res.history[0]["train_loss"] > res.history[-1]["train_loss"] > 0
    # the epoch's validation figures, taken in one host sync, are those of the last weights
    last = Head(16, 2)
    last.load_state_dict(res.last_state)
    assert abs((last.predict_proba(Xv).argmax(1) == yv).mean() - res.history[-1]["val_accuracy"]) < 1e-6

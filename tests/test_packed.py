"""Packed (unpadded) batches give today's padded vectors; a text's vector does not depend on its neighbours."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.encoder import Encoder
from pipeline.packed import OneDNNLinear, Packing, PackedEncoder, onednn_supported
from tests.conftest import SPECIAL, vocab_chars

MAX = 64  # the tiny models' longest text, in tokens
ONEDNN = onednn_supported(torch.zeros(1))  # x86 CPUs
# The GPU path is the same code; where a GPU is present (benchmarks/gpu_checks.sh runs these there) it is
# held to the same tolerances.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def build(folder: str, family: str, pad_id: int = 0, seed: int = 0) -> str:
    """A tiny random model of `family` (bert | xlm-roberta | distilbert) with a character tokenizer
    whose [PAD] has id `pad_id` (XLM-R's is 1, and RoBERTa-style positions start after it)."""
    from transformers import (BertConfig, BertModel, BertTokenizer, DistilBertConfig, DistilBertModel,
                              XLMRobertaConfig, XLMRobertaModel)

    os.makedirs(folder, exist_ok=True)
    special = [s for s in SPECIAL if s != "[PAD]"]
    special.insert(pad_id, "[PAD]")
    vocab = special + vocab_chars() + list("abcdefghijklmnopqrstuvwxyz0123456789")
    with open(os.path.join(folder, "vocab.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizer(vocab=os.path.join(folder, "vocab.txt"), model_max_length=MAX).save_pretrained(folder)
    torch.manual_seed(seed)
    shape = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=64, pad_token_id=pad_id)
    if family == "bert":
        model = BertModel(BertConfig(max_position_embeddings=MAX, **shape))
    elif family == "xlm-roberta":  # two more positions: ids count from pad_id + 1
        model = XLMRobertaModel(XLMRobertaConfig(max_position_embeddings=MAX + pad_id + 1, **shape))
    else:
        model = DistilBertModel(DistilBertConfig(vocab_size=len(vocab), dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                                 max_position_embeddings=MAX, pad_token_id=pad_id))
    model.eval().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=[("bert", 0), ("bert", 1), ("xlm-roberta", 1)],
                ids=["bert", "e5-shape", "xlm-r-shape"])
def family_model(request, tmp_path_factory):
    family, pad = request.param
    return build(str(tmp_path_factory.mktemp(f"{family}-{pad}")), family, pad)


def ragged_ids(enc: Encoder, seed=0) -> list[list[int]]:
    """Texts of 1 token, 2 tokens, the longest allowed, and lengths between, in no order; one holds the pad
    token (a literal "<pad>" in a text), which RoBERTa-style positions do not count."""
    rng = np.random.default_rng(seed)
    cls, sep, pad = enc.tokenizer.cls_token_id, enc.tokenizer.sep_token_id, enc.tokenizer.pad_token_id
    body = lambda n: [int(x) for x in rng.integers(len(SPECIAL), len(enc.tokenizer), n)]  # noqa: E731
    seqs = [[cls], [cls, sep], [cls] + body(enc.max_length - 2) + [sep], [cls] + body(4) + [pad] + body(3) + [sep]]
    seqs += [[cls] + body(n) + [sep] for n in (3, 40, 7, 1, 17, 62, 5, 5, 5, 30)]
    return seqs


def _cos(a, b):
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("device", DEVICES)
def test_packed_matches_padded_fp32(family_model, device):
    packed = Encoder(family_model, device=device, precision="fp32", layers=2, batch_tokens=256)
    padded = Encoder(family_model, device=device, precision="fp32", layers=2, batch_tokens=256, packing="off")
    assert packed.packing == "on" and padded.packing == "off"
    ids = ragged_ids(packed)
    assert max(map(len, ids)) == packed.max_length == MAX and min(map(len, ids)) == 1
    a, b = packed.encode_ids(ids), padded.encode_ids(ids)
    assert set(a) == set(b) == {"cls", "mean", "last", "cls_2", "mean_2", "last_2"}
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, rtol=0)
    # and the model's own forward, one text at a time, without any padding
    with torch.inference_mode():
        for i, seq in enumerate(ids):
            ref = padded.model(input_ids=torch.tensor([seq], device=device)).last_hidden_state[0].cpu()
            np.testing.assert_allclose(a["cls"][i], ref[0].numpy(), atol=1e-5, rtol=0)
            np.testing.assert_allclose(a["mean"][i], ref.mean(0).numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("precision,tol", [("fp32", 1e-6), ("bf16", 2e-4)])
def test_rows_padded_for_the_linears_change_nothing(family_model, precision, tol, monkeypatch):
    """On the CPU the Linears see a batch's rows padded to a multiple of ROW_MULTIPLE (oneDNN keeps kernels per
    shape: fewer shapes, less memory); the pad rows must not reach a real token's states."""
    import pipeline.packed as P

    enc = Encoder(family_model, device="cpu", precision=precision, layers=3, batch_tokens=256)
    ids = ragged_ids(enc)
    multiple = P.ROW_MULTIPLE
    assert multiple > 1
    for seqs in (ids[1:], ids[:1], ids[4:6]):  # ragged, one text, two short ones (none a multiple)
        p = Packing.of(seqs)
        with torch.inference_mode(), enc._autocast():
            padded = enc.packed.forward(p, [0, 1, 2, 3])
            monkeypatch.setattr(P, "ROW_MULTIPLE", 1)
            plain = enc.packed.forward(p, [0, 1, 2, 3])
            monkeypatch.setattr(P, "ROW_MULTIPLE", multiple)
        assert sum(map(len, seqs)) % multiple and all(h.shape[0] == sum(map(len, seqs)) for h in padded.values())
        for layer in plain:
            np.testing.assert_allclose(padded[layer].float().numpy(), plain[layer].float().numpy(), atol=tol, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("attention", ["auto", "sdpa", "matmul", "varlen"])
def test_packed_matches_padded_bf16(family_model, device, attention):
    """bf16 with each attention kernel (auto: matmul_attention on the CPU, FlashAttention's varlen kernel on a
    GPU; varlen on the CPU falls back to SDPA)."""
    packed = Encoder(family_model, device=device, precision="bf16", batch_tokens=256)
    if attention != "auto":
        packed.packed = PackedEncoder(packed.model, attention=attention, log=lambda msg: None)
    padded = Encoder(family_model, device=device, precision="bf16", batch_tokens=256, packing="off")
    ids = ragged_ids(packed)
    a, b = packed.encode_ids(ids), padded.encode_ids(ids)
    for name in a:
        assert _cos(a[name], b[name]).min() >= 0.9999


def test_varlen_attention_without_its_kernel_falls_back_to_sdpa_once():
    """FlashAttention's variable-length kernel exists for CUDA only: asked for elsewhere, attention is SDPA's,
    to the bit, and the fallback is said once."""
    from transformers import BertConfig, BertModel
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 vocab_size=50)).eval()
    notes = []
    varlen = PackedEncoder(model, attention="varlen", log=notes.append, onednn=False)
    sdpa = PackedEncoder(model, attention="sdpa", onednn=False)
    p = Packing.of([[1] * n for n in (1, 9, 4, 30)])
    assert p.cu_lengths.tolist() == [0, 1, 10, 14, 44] and p.cu_lengths.dtype == torch.int32
    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16):
            qkv = torch.randn(44, 96, generator=torch.Generator().manual_seed(1)).to(dtype)
            assert torch.equal(varlen.attention(qkv, p), sdpa.attention(qkv, p))
    assert len(notes) == 1 and "variable-length kernel is not available" in notes[0], notes
    with pytest.raises(ValueError, match="unknown attention"):
        PackedEncoder(model, attention="flash")


def test_matmul_attention_centres_keys():
    """bf16 attention over ragged texts (1 to 160 tokens: three chunks of queries) whose keys share a large
    component, as trained models' keys do, against float32 attention of the same inputs. Without the
    centring the scores round to bf16 at their full size and the outputs are off by ~0.05; with it, ~0.01."""
    from transformers import BertConfig, BertModel
    hidden, heads = 32, 4
    encoder = PackedEncoder(BertModel(BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=heads,
                                                 intermediate_size=64, vocab_size=50)).eval())
    lengths = [1, 160, 7, 40, 2, 33]
    p = Packing.of([[1] * n for n in lengths])
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(sum(lengths), 3 * hidden, generator=g)
    qkv[:, hidden:2 * hidden] += 12 * torch.randn(hidden, generator=g)
    qkv = qkv.bfloat16()
    exact = []
    for start, n in zip(p.starts.tolist(), lengths):
        q, k, v = qkv[start:start + n].float().view(n, 3, heads, hidden // heads).permute(1, 2, 0, 3)
        exact.append(F.scaled_dot_product_attention(q, k, v).transpose(0, 1).reshape(n, hidden))
    exact = torch.cat(exact)
    with torch.inference_mode():
        got = encoder.attention(qkv, p)
        assert torch.equal(got, encoder.matmul_attention(qkv, p))  # bf16 on the CPU takes the matmul path
        assert (got.float() - exact).abs().max() < 0.02  # 0.009 here; 0.046 without the centring (checked)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-5), ("bf16", 2e-4)])
def test_vector_independent_of_batch_neighbours(family_model, precision, tol, device):
    """The same text alone and among others of many lengths: fp32 within 1e-5; bf16 within 2e-4 (measured
    here up to ~2e-5: a matmul's blocking follows the row count, and a bf16 rounding can flip with it),
    well inside the 4 decimals predict prints."""
    enc = Encoder(family_model, device=device, precision=precision, batch_tokens=256)
    ids = ragged_ids(enc)
    together = enc.encode_ids(ids)
    for i in (0, 3, 4, len(ids) - 1):
        alone = enc.encode_ids([ids[i]])
        for name in alone:
            np.testing.assert_allclose(together[name][i], alone[name][0], atol=tol, rtol=0)


@pytest.mark.skipif(not ONEDNN, reason="oneDNN matmuls are for x86 CPUs")
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_onednn_matmuls_match_torch_linears(family_model, precision):
    """The packed encoder's matmuls from oneDNN-reordered weights (the default on x86 CPUs) against torch's
    F.linear: fp32 within 1e-5; bf16 cosine >= 0.9999 (the GELU is applied before the bf16 rounding)."""
    if precision == "bf16" and not onednn_supported(torch.zeros(1, dtype=torch.bfloat16)):
        pytest.skip("this CPU has no native bf16")
    fast = Encoder(family_model, device="cpu", precision=precision, batch_tokens=256)
    plain = Encoder(family_model, device="cpu", precision=precision, batch_tokens=256)
    plain.packed = PackedEncoder(plain.model, onednn=False)
    assert fast.packed.onednn is not None and plain.packed.onednn is None
    assert fast.packed.onednn[0].intermediate.attr == "gelu"  # BERT's exact GELU rides in the matmul
    ids = ragged_ids(fast)
    a, b = fast.encode_ids(ids), plain.encode_ids(ids)
    for name in a:
        if precision == "fp32":
            np.testing.assert_allclose(a[name], b[name], atol=1e-5, rtol=0)
        else:
            assert _cos(a[name], b[name]).min() >= 0.9999


@pytest.mark.skipif(not ONEDNN, reason="oneDNN matmuls are for x86 CPUs")
def test_onednn_linear_is_linear_then_exact_gelu():
    """Pre-activations of a few units, where the tanh approximation of GELU is 1e-4 off the exact one."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(37, 48, generator=g), torch.randn(64, 48, generator=g) * 0.3, torch.randn(64, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(OneDNNLinear(w, b)(x), F.linear(x, w, b), atol=1e-5, rtol=0)
        torch.testing.assert_close(OneDNNLinear(w, b, gelu=True)(x), F.gelu(F.linear(x, w, b)), atol=1e-5, rtol=0)


@pytest.mark.skipif(not ONEDNN, reason="oneDNN matmuls are for x86 CPUs")
def test_onednn_leaves_other_activations_to_the_model(tmp_path):
    """A layer whose activation is not the exact GELU keeps it as a separate step, with the same numbers."""
    from transformers import AutoModel
    model = AutoModel.from_pretrained(build(str(tmp_path), "bert"), hidden_act="gelu_new").eval()
    fast, plain = PackedEncoder(model, onednn=True), PackedEncoder(model, onednn=False)
    assert fast.onednn[0].intermediate.attr == "none" and fast.onednn[0].act is not None
    p = Packing.of([[2, 5, 9, 3], [2, 7, 3], [2]])
    with torch.inference_mode():
        torch.testing.assert_close(fast.forward(p, [2])[2], plain.forward(p, [2])[2], atol=1e-5, rtol=0)


def test_worker_threads_same_vectors_and_threads_restored(family_model):
    one = Encoder(family_model, device="cpu", precision="fp32", batch_tokens=64, workers=1)
    two = Encoder(family_model, device="cpu", precision="fp32", batch_tokens=64, workers=2)
    ids = ragged_ids(one) * 3
    before = torch.get_num_threads()
    assert two.resolve_workers(10) == 2 and one.resolve_workers(10) == 1
    a, b = one.encode_ids(ids), two.encode_ids(ids)
    assert torch.get_num_threads() == before
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-5, rtol=0)


def test_other_families_fall_back_to_padding_and_say_so_once(tmp_path, capfd):
    folder = build(str(tmp_path / "distil"), "distilbert")
    enc = Encoder(folder, device="cpu", precision="fp32")
    Encoder(folder, device="cpu", precision="fp32")
    err = capfd.readouterr().err
    assert enc.packing == "off" and err.count("padded batches for this model") == 1 and "distilbert" in err
    texts = ["好", "这个东西我们买了一次觉得真的很好", "差差"]
    np.testing.assert_allclose(enc.encode(texts)["mean"],
                               Encoder(folder, device="cpu", precision="fp32", packing="off").encode(texts)["mean"],
                               atol=1e-6)


def _same_modules_as_transformers(folder, precision):
    """Vectors of an Encoder on modules read straight from `folder`, and of the same Encoder packed over
    transformers' own modules: the tensors and ops are the same, so the numbers are equal to the bit."""
    enc = Encoder(folder, device="cpu", precision=precision, layers=2, batch_tokens=256)
    assert enc._model is None and enc.packing == "on"  # transformers' modeling code was not needed
    ids = ragged_ids(enc)
    direct = enc.encode_ids(ids)
    enc.packed = PackedEncoder(enc.model)  # loads the HF model now (export and the padded path use it)
    assert type(enc.model).__module__.startswith("transformers.")
    via_hf = enc.encode_ids(ids)
    for name in direct:
        np.testing.assert_array_equal(direct[name], via_hf[name], err_msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_modules_read_from_safetensors_match_transformers(family_model, precision):
    _same_modules_as_transformers(family_model, precision)


def test_modules_read_from_task_models_and_shards(tmp_path):
    """Weights saved by a task model (names under `bert.`) and split into shards read the same way."""
    from transformers import AutoModel, BertForSequenceClassification

    folder = build(str(tmp_path / "bert"), "bert")
    task = str(tmp_path / "task")
    build(task, "bert")
    base = AutoModel.from_pretrained(folder)
    model = BertForSequenceClassification(base.config)
    model.bert.load_state_dict(base.state_dict(), strict=False)
    model.save_pretrained(task, max_shard_size="20KB")
    assert os.path.isfile(os.path.join(task, "model.safetensors.index.json"))
    _same_modules_as_transformers(task, "fp32")
    a = Encoder(folder, device="cpu", precision="fp32").encode(["这个东西真的很好"])
    b = Encoder(task, device="cpu", precision="fp32").encode(["这个东西真的很好"])
    np.testing.assert_allclose(a["mean"], b["mean"], atol=1e-6)


def test_what_the_direct_read_does_not_cover_loads_through_transformers(tmp_path):
    """Another activation, or weights only in a .bin file: transformers loads them, the vectors as before."""
    from transformers import AutoConfig, AutoModel

    folder = build(str(tmp_path / "tanh"), "bert")
    cfg = AutoConfig.from_pretrained(folder)
    cfg.hidden_act = "gelu_new"
    AutoModel.from_pretrained(folder, config=cfg).save_pretrained(folder)
    enc = Encoder(folder, device="cpu", precision="fp32")
    assert enc._model is not None and enc.packing == "on"
    binary = str(tmp_path / "bin")
    build(binary, "bert")
    torch.save(AutoModel.from_pretrained(binary).state_dict(), os.path.join(binary, "pytorch_model.bin"))
    os.remove(os.path.join(binary, "model.safetensors"))  # tensors only: transformers reads it weights_only
    enc = Encoder(binary, device="cpu", precision="fp32")
    assert enc._model is not None and enc.packing == "on"


def test_encoding_a_bert_folder_imports_no_modeling_code(tmp_path):
    """The point of reading modules directly: transformers' modeling code (and torch._dynamo, which it and
    meta-device module construction import) stays out of a process that encodes, about 2.7 s of start-up."""
    from tests.helpers import python_lines

    folder = build(str(tmp_path / "bert"), "bert")
    code = ("import sys; from pipeline.encoder import Encoder; "
            f"Encoder({folder!r}, precision='fp32').encode(['很好']); "
            "print(sorted(m for m in ('transformers.modeling_utils', 'torch._dynamo') if m in sys.modules))")
    assert python_lines(code, HF_HUB_OFFLINE="1")[-1] == "[]"


def test_a_cached_hub_model_offline_is_read_directly(tmp_path, monkeypatch):
    """A hub id in the Hugging Face cache (huggingface_hub's layout), offline: its snapshot's safetensors
    are read directly too."""
    import shutil

    cache, commit = tmp_path / "hub", "0" * 40
    shutil.copytree(build(str(tmp_path / "bert"), "bert"), cache / "models--org--tiny-bert" / "snapshots" / commit)
    (cache / "models--org--tiny-bert" / "refs").mkdir()
    (cache / "models--org--tiny-bert" / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    enc = Encoder("org/tiny-bert", device="cpu", precision="fp32")
    assert enc._model is None and enc.packing == "on"
    local = Encoder(str(tmp_path / "bert"), device="cpu", precision="fp32")
    np.testing.assert_array_equal(enc.encode(["很好"])["mean"], local.encode(["很好"])["mean"])


def test_direct_read_follows_from_pretrained_on_names_shapes_and_dtype(tmp_path):
    """Where the file's names, shapes or config could be read two ways, the direct read does what
    from_pretrained does: prefixed names win, another family's prefix or a shape other than the config's is
    left to from_pretrained (which refuses the shape in one line), and a config without a dtype gets the
    dtype from_pretrained records, which the model fingerprint hashes."""
    import hashlib
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoModel

    from pipeline.errors import UserError

    both = build(str(tmp_path / "both"), "bert")
    weights = load_file(os.path.join(both, "model.safetensors"))
    save_file({**weights, **{f"bert.{k}": v + 1.0 for k, v in weights.items()}},
              os.path.join(both, "model.safetensors"), metadata={"format": "pt"})
    _same_modules_as_transformers(both, "fp32")  # the bert.* tensors, as from_pretrained takes them

    foreign = build(str(tmp_path / "foreign"), "bert")
    save_file({f"roberta.{k}": v for k, v in weights.items()}, os.path.join(foreign, "model.safetensors"),
              metadata={"format": "pt"})
    assert Encoder(foreign, device="cpu", precision="fp32")._model is not None

    wrong = build(str(tmp_path / "wrong"), "bert")
    with open(os.path.join(wrong, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    with open(os.path.join(wrong, "config.json"), "w", encoding="utf-8") as f:
        json.dump({**config, "vocab_size": config["vocab_size"] + 5}, f)
    with pytest.raises(UserError, match="cannot load model"):
        Encoder(wrong, device="cpu", precision="fp32")

    plain = build(str(tmp_path / "nodtype"), "bert")
    with open(os.path.join(plain, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.pop("dtype", None), config.pop("torch_dtype", None)
    with open(os.path.join(plain, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)
    expected = json.dumps(AutoModel.from_pretrained(plain).config.to_diff_dict(), sort_keys=True, default=str)
    for packing in ("auto", "off"):
        enc = Encoder(plain, device="cpu", precision="fp32", packing=packing)
        assert (enc._model is None) == (packing == "auto")
        assert enc.config_hash == hashlib.sha256(expected.encode()).hexdigest(), packing


def test_half_precision_weights_run_at_the_asked_precision(tmp_path):
    """A model saved in fp16 runs at --precision fp32 in float32 (it ran in fp16) and at bf16 at all (fp16
    LayerNorms under bf16 autocast failed on the CPU): from float32, as the same weights saved in fp32."""
    from transformers import AutoModel

    half, full = str(tmp_path / "half"), str(tmp_path / "full")
    build(half, "bert")
    AutoModel.from_pretrained(half).half().save_pretrained(half)
    build(full, "bert")
    AutoModel.from_pretrained(half).float().save_pretrained(full)  # the same (fp16-rounded) weights in fp32
    texts = ["很好", "这个东西我们买了一次觉得真的很好"]
    for precision in ("fp32", "bf16"):
        a = Encoder(half, device="cpu", precision=precision).encode(texts)["mean"]
        b = Encoder(full, device="cpu", precision=precision).encode(texts)["mean"]
        np.testing.assert_array_equal(a, b, err_msg=precision)

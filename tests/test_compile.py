"""--compile: compiled packed layers give the eager vectors; a failing compiler falls back; auto decides by size."""
import numpy as np
import pytest
import torch

from pipeline import defaults as D
from pipeline.encoder import Encoder, compile_pays
from tests.test_packed import DEVICES, MAX, build, ragged_ids


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build(str(tmp_path_factory.mktemp("bert")), "bert")


def test_compile_pays_rule():
    table = {"cpu": 50_000, "cuda": None}
    assert not compile_pays(49_999, "cpu", table) and compile_pays(50_000, torch.device("cpu"), table)
    assert not compile_pays(10 ** 9, "cuda", table) and not compile_pays(10 ** 9, "mps", table)  # no break-even known
    for device, least in D.COMPILE_MIN_TOKENS.items():  # the recorded table: off below its break-even
        assert not compile_pays(least - 1 if least else 10 ** 12, device)


def test_auto_is_off_for_a_tiny_run(model):
    enc = Encoder(model, device="cpu", precision="fp32")
    assert enc.compile == "auto"
    enc.expect(1000)  # what extract says of its run
    enc.encode_ids(ragged_ids(enc))
    assert enc.packed.compiled is None and enc.packed.compile_seconds == 0


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_matches_eager_and_keeps_the_fingerprint(model, capfd, device):
    eager = Encoder(model, device=device, precision="fp32", layers=2, batch_tokens=256, compile="off")
    auto = Encoder(model, device=device, precision="fp32", layers=2, batch_tokens=256, workers=2, compile="on")
    ids = ragged_ids(eager) * 2  # several batches, on two worker threads (on a CPU)
    assert max(map(len, ids)) == MAX and min(map(len, ids)) == 1
    a, b = eager.encode_ids(ids), auto.encode_ids(ids)
    assert auto.packed.compiled is not None and not auto.packed.compile_failed and auto.packed.compile_seconds > 0
    for name in a:
        np.testing.assert_allclose(b[name], a[name], atol=1e-5, rtol=0)
    alone = auto.encode_ids([ids[0], ids[2]])  # a 1-token text, and the longest, in a batch of their own
    np.testing.assert_allclose(alone["mean"], a["mean"][[0, 2]], atol=1e-5, rtol=0)
    assert auto.settings() == eager.settings()  # the cache fingerprint: resume works across compile on/off
    assert capfd.readouterr().err.count("compile: the encoder's layers compiled in") == 1


def test_failing_compiler_falls_back_to_eager(model, capfd):
    def broken(gm, example_inputs):  # a backend that fails as inductor does without a C++ compiler
        raise RuntimeError("no C++ compiler found")

    eager = Encoder(model, device="cpu", precision="fp32", compile="off")
    enc = Encoder(model, device="cpu", precision="fp32", compile="off")
    enc.packed.compile(None, backend=broken)
    ids = ragged_ids(enc)
    got, want = enc.encode_ids(ids), eager.encode_ids(ids)
    assert enc.packed.compiled is None and enc.packed.compile_failed
    err = capfd.readouterr().err
    assert err.count("compile: failed") == 1 and "no C++ compiler found" in err and "running eagerly" in err
    for name in want:
        np.testing.assert_allclose(got[name], want[name], atol=1e-6, rtol=0)
    enc.compile = "on"
    enc.encode_ids(ids)  # does not try again
    assert enc.packed.compiled is None and "compile:" not in capfd.readouterr().err


def test_unknown_compile_is_a_user_error(model):
    from pipeline.errors import UserError
    with pytest.raises(UserError, match="unknown compile"):
        Encoder(model, device="cpu", compile="yes")


def test_extract_resumes_across_compile_on_and_off(tiny_model, tmp_path):
    """--compile is not part of the cache's settings: a run started compiled resumes eagerly, same vectors."""
    import h5py

    import pipeline as bc
    from tests.conftest import make_texts, write_split_files

    data = write_split_files(str(tmp_path / "d"), "jsonl", {"train": make_texts(120, seed=4)})
    eager = bc.Encoder(tiny_model, device="cpu", precision="fp32", compile="off")
    full = bc.extract(tiny_model, data, str(tmp_path / "full.h5"), chunk_rows=40, progress=False, encoder=eager)
    compiled = bc.Encoder(tiny_model, device="cpu", precision="fp32", compile="on")
    original, calls = compiled.encode_ids, []

    def stop_in_second_chunk(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*a, **k)

    compiled.encode_ids = stop_in_second_chunk
    out = str(tmp_path / "f.h5")
    with pytest.raises(KeyboardInterrupt):
        bc.extract(tiny_model, data, out, chunk_rows=40, progress=False, encoder=compiled)
    assert compiled.packed.compile_seconds > 0
    notes = []
    bc.extract(tiny_model, data, out, chunk_rows=40, progress=False, encoder=eager, log=notes.append)
    assert any("resuming" in n and "40 of 120" in n for n in notes), notes
    with h5py.File(out, "r") as f, h5py.File(full, "r") as g:
        for name in ("cls", "mean"):
            np.testing.assert_allclose(f["train"][name][:], g["train"][name][:], atol=1e-5, rtol=0)

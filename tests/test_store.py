"""Property-based tests of the HDF5 store: any split sizes, chunk sizes, dtypes and interruption points
round-trip exactly through StoreWriter / FeatureStore."""
from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.fingerprints import data_fingerprint
from pipeline.store import FeatureStore, StoreWriter

SPLITS = ("train", "validation", "test")
LABELS = ["a", "b", "c"]

# One interruption: how many chunks a run writes before it stops, and how it stops: "abort" (an
# exception: the writer is closed), "kill" (the bytes on disk at that moment, as SIGKILL leaves them),
# or "kill+truncate" (a kill whose file then lost its tail, as a full disk or a bad copy can leave it).
interruption = st.tuples(st.integers(0, 6), st.sampled_from(["abort", "kill", "kill+truncate"]),
                         st.floats(0, 1))


@st.composite
def stores(draw):
    hidden = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.integers(0, 40), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    splits = {}
    for name, n in zip(SPLITS, sizes):
        features = {f: (rng.standard_normal((n, hidden)) * rng.choice([1e-3, 1, 1e3])).astype(np.float32)
                    for f in ("cls", "mean")}
        labels = rng.integers(-1, len(LABELS), n).astype(np.int64)
        rows = np.sort(rng.choice(10 * n + 1, n, replace=False)).astype(np.int64)
        splits[name] = (features, labels, rows)
    return {"hidden": hidden, "splits": splits, "chunk": draw(st.integers(1, 17)),
            "dtype": draw(st.sampled_from(["float32", "float16"])),
            "stops": draw(st.lists(interruption, max_size=4))}


def _writer(path, spec, chunk):
    splits = {name: {"rows": len(labels), "fingerprint": data_fingerprint([str(r) for r in rows], labels, rows)}
              for name, (_, labels, rows) in spec["splits"].items()}
    return StoreWriter(path, settings={"hidden_size": spec["hidden"], "model_fingerprint": "m"}, splits=splits,
                       label_names=LABELS, feature_names=["cls", "mean"], hidden_size=spec["hidden"], source="test",
                       store_dtype=spec["dtype"], chunk_rows=chunk)


def _write(writer, spec, max_chunks=None):
    """Write chunks from where the file stands, the way extract does; at most `max_chunks` of them."""
    written = 0
    for name, (features, labels, rows) in spec["splits"].items():
        start = writer.rows_done(name)
        while start < len(labels):
            if max_chunks is not None and written == max_chunks:
                return
            stop = min(start + writer.chunk_rows, len(labels))
            writer.write(name, start, {f: v[start:stop] for f, v in features.items()}, labels[start:stop],
                         rows[start:stop])
            written, start = written + 1, stop


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=stores(), resume_chunk=st.integers(1, 17))
def test_interrupted_and_resumed_writes_round_trip_exactly(spec, resume_chunk):
    folder = tempfile.mkdtemp(prefix="bc-store-")
    try:
        path = os.path.join(folder, "f.h5")
        done_before, truncated = 0, False
        for chunks, how, cut in spec["stops"]:
            writer = _writer(path, spec, spec["chunk"] if done_before == 0 else resume_chunk)
            assert writer.status in ("new", "resumed")
            assert (writer.discarded is not None) == truncated, writer.discarded
            truncated = False
            assert writer.chunk_rows == spec["chunk"]  # a resume keeps the chunk size the file began with
            assert sum(writer.rows_done(s) for s in spec["splits"]) == done_before
            _write(writer, spec, chunks)
            done_before = sum(writer.rows_done(s) for s in spec["splits"])
            if how == "abort":
                writer.abort()
            else:
                snapshot = path + ".snapshot"
                shutil.copyfile(writer.tmp, snapshot)  # what a SIGKILL now leaves on disk
                writer.abort()
                truncated = how == "kill+truncate" and cut < 1
                if truncated:  # a file that lost its tail must be started over
                    os.truncate(snapshot, int(os.path.getsize(snapshot) * cut))
                    done_before = 0
                os.replace(snapshot, writer.tmp)
            assert not os.path.exists(path)
        writer = _writer(path, spec, resume_chunk)
        assert (writer.discarded is not None) == truncated, writer.discarded
        _write(writer, spec)
        writer.finish()
        assert sorted(os.listdir(folder)) == ["f.h5"]

        with FeatureStore(path) as store:
            assert store.splits == list(spec["splits"])
            for name, (features, labels, rows) in spec["splits"].items():
                got = store.features(name)
                for f, v in features.items():
                    want = v.astype(spec["dtype"]).astype(np.float32)
                    assert got[f].dtype == np.float32 and got[f].tobytes() == want.tobytes()
                assert np.array_equal(store.labels(name), labels)
                assert np.array_equal(store.file[name]["row"][:], rows)
                assert store.rows(name) == len(labels)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_finish_renames_only_the_file_it_wrote(tmp_path):
    """If another process removed or replaced the .partial (an extract --restart beside this one), finishing
    must not put that other, unfinished file under the final name."""
    import pytest

    from pipeline.errors import UserError
    out = str(tmp_path / "f.h5")
    w = StoreWriter(out, settings={"hidden_size": 4}, splits={"train": {"rows": 2, "fingerprint": "x"}},
                    label_names=["a"], feature_names=["cls"], hidden_size=4, source="t")
    shutil.copy(out + ".partial", out + ".other")
    os.replace(out + ".other", out + ".partial")  # a new file (another inode) under the same name
    with pytest.raises(UserError, match="removed or replaced by another process"):
        w.finish()
    assert not os.path.exists(out)

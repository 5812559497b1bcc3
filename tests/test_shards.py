"""Toy WebDataset shards: writing, reading, exact resume, rank splits, clear errors."""

from __future__ import annotations

import importlib.util
import io
import itertools
import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds

from apt.data import shards
from apt.toy import world
from apt.toy.shards import write_toy_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, PER_SHARD = 50, 20


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("toy_shards"))
    write_toy_shards(out, N, frames=4, seed=5, samples_per_shard=PER_SHARD, progress=False)
    return out


def _keys(batches) -> list[str]:
    return [k for b in batches for k in b["key"]]


def test_written_and_read_back(shard_dir: str) -> None:
    with open(os.path.join(shard_dir, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["num_samples"] == N and manifest["num_shards"] == 3 and manifest["frames"] == 4
    assert sorted(os.listdir(shard_dir)) == sorted(manifest["shards"] + ["manifest.json"])  # no .part left
    batches = list(shards.eval_loader(shard_dir, batch_size=16))
    assert [b["x"].shape[0] for b in batches] == [16, 16, 16, 2]
    b = batches[0]
    assert b["x"].shape == (16, 3, 4, 16, 16) and b["x"].dtype == torch.float32
    assert -1.0 <= b["x"].min() and b["x"].max() <= 1.0
    assert _keys(batches) == [f"{i:09d}" for i in range(N)]
    ref = world.make_sample(3, seed=5, frames=4)
    assert b["caption"][3] == ref["caption"]
    assert b["labels"][3] == ref["attributes"].to_dict()
    assert np.array_equal(shards.tensor_to_pixels(b["x"][3]), ref["pixels"])


def test_pixel_tensor_round_trip() -> None:
    p = np.random.default_rng(0).integers(0, 256, (2, 3, 16, 16, 3), dtype=np.uint8)
    x = shards.pixels_to_tensor(p)
    assert x.shape == (2, 3, 3, 16, 16) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(shards.tensor_to_pixels(x), p)


def test_resolve_shards_forms(shard_dir: str) -> None:
    by_dir = shards.resolve_shards(shard_dir)
    assert len(by_dir) == 3
    assert shards.resolve_shards(os.path.join(shard_dir, "toy-{000000..000002}.tar")) == by_dir
    assert shards.resolve_shards(by_dir[1]) == [by_dir[1]]


@pytest.mark.parametrize("bad", ["does/not/exist.tar", "nowhere-{000000..000001}.tar", "nowhere/*.tar"])
def test_missing_shards_name_the_path(bad: str) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere|does/not/exist"):
        shards.train_loader(bad, batch_size=4, seed=0)


def test_empty_directory_is_an_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        shards.resolve_shards(str(tmp_path))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_resumes_exactly(shard_dir: str, num_workers: int) -> None:
    def first(loader, n):
        return [b for b in itertools.islice(loader, n)]

    full = first(
        shards.train_loader(shard_dir, batch_size=8, seed=1, shuffle_buffer=64, num_workers=num_workers), 6
    )
    k = 3
    resumed = first(
        shards.train_loader(
            shard_dir, batch_size=8, seed=1, shuffle_buffer=64, num_workers=num_workers, skip_batches=k
        ),
        3,
    )
    for a, b in zip(full[k:], resumed, strict=True):
        assert a["key"] == b["key"]
        assert torch.equal(a["x"], b["x"])
    assert len({tuple(b["key"]) for b in full}) == 6  # a shuffled, moving stream


def test_train_loader_ranks_differ(shard_dir: str) -> None:
    r0 = next(
        iter(shards.train_loader(shard_dir, batch_size=8, seed=1, shuffle_buffer=64, rank=0, world_size=2))
    )
    r1 = next(
        iter(shards.train_loader(shard_dir, batch_size=8, seed=1, shuffle_buffer=64, rank=1, world_size=2))
    )
    assert r0["key"] != r1["key"]


def test_eval_loader_splits_by_rank(shard_dir: str) -> None:
    per_rank = [_keys(shards.eval_loader(shard_dir, batch_size=7, rank=r, world_size=2)) for r in range(2)]
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1
    assert sorted(per_rank[0] + per_rank[1]) == [f"{i:09d}" for i in range(N)]


def _write_raw(path: str, samples: list[dict]) -> None:
    with wds.TarWriter(path) as sink:
        for s in samples:
            sink.write(s)


def _npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def test_empty_caption_names_shard_and_key(tmp_path) -> None:
    path = str(tmp_path / "bad.tar")
    _write_raw(
        path,
        [
            {
                "__key__": "k0",
                "pixels.npy": _npy(np.zeros((1, 16, 16, 3), np.uint8)),
                "json": b'{"caption": ""}',
            }
        ],
    )
    with pytest.raises(ValueError, match=r"k0.*bad\.tar.*empty caption"):
        next(iter(shards.eval_loader(path, batch_size=1)))


def test_corrupt_samples_are_skipped_and_counted(tmp_path, caplog) -> None:
    path = str(tmp_path / "mixed.tar")
    good = {
        "pixels.npy": _npy(np.zeros((1, 16, 16, 3), np.uint8)),
        "json": b'{"caption": "a red circle on a black background"}',
    }
    _write_raw(
        path,
        [
            {"__key__": "a", **good},
            {"__key__": "b", "pixels.npy": b"garbage", "json": b"{}"},
            {"__key__": "c", **good},
        ],
    )
    with caplog.at_level("WARNING", logger="apt.data"):
        keys = _keys(shards.eval_loader(path, batch_size=4))
    assert keys == ["a", "c"]
    (record,) = caplog.records
    assert "sample b in" in record.message and "1 skipped so far" in record.message and "bad_array 1" in record.message


def test_writer_refuses_a_used_directory(shard_dir: str) -> None:
    with pytest.raises(FileExistsError, match=shard_dir):
        write_toy_shards(shard_dir, 5, frames=4, seed=0, progress=False)


def test_script_writes_image_shards(tmp_path) -> None:
    spec = importlib.util.spec_from_file_location(
        "make_toy_shards", os.path.join(REPO, "data", "make_toy_shards.py")
    )
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    manifest = script.main(
        ["--out", str(tmp_path), "--num-samples", "12", "--seed", "2", "--image", "--samples-per-shard", "5"]
    )
    assert manifest["num_shards"] == 3 and manifest["frames"] == 1
    b = next(iter(shards.eval_loader(str(tmp_path), batch_size=12)))
    assert b["x"].shape == (12, 3, 1, 16, 16)
    assert all(" moving " not in c for c in b["caption"])


def _corrupt_copy(shard_dir: str, out, bad_shards: int) -> str:
    """The shards of shard_dir with the first `bad_shards` of them unreadable sample by sample."""
    import shutil

    shutil.copytree(shard_dir, out)
    for shard in sorted(out.glob("*.tar"))[:bad_shards]:
        keys = [s["__key__"] for s in wds.DataPipeline(wds.SimpleShardList([str(shard)]), wds.tarfile_to_samples())]
        _write_raw(str(shard), [{"__key__": k, "pixels.npy": b"cut short", "json": b'{"caption": "a red circle"}'} for k in keys])
    return str(out)


def test_a_skipped_share_past_the_limit_stops_the_loader(shard_dir: str, tmp_path) -> None:
    """1 of 3 shards corrupt: judged after 1000 samples read, the share is above 0.2 and below 0.5."""
    from apt.data.faults import DataFaultError

    bad = _corrupt_copy(shard_dir, tmp_path / "partly", 1)
    with pytest.raises(DataFaultError, match=r"more than data.max_skipped_fraction=0.2\); skipped by reason: bad_array \d+; in shards: toy-000000.tar"):
        for _ in shards.train_loader(bad, batch_size=8, seed=0, shuffle_buffer=64, max_skipped_fraction=0.2):
            pass
    batches = itertools.islice(shards.train_loader(bad, batch_size=8, seed=0, shuffle_buffer=64, max_skipped_fraction=0.5), 20)
    last = list(batches)[-1]["data_faults"]  # the running counts travel with the batches
    assert last["skipped"] == last["skipped_bad_array"] > 0 and last["source"] == bad


def test_no_valid_sample_within_the_bound_stops_the_loader(shard_dir: str, tmp_path) -> None:
    from apt.data.faults import DataFaultError

    bad = _corrupt_copy(shard_dir, tmp_path / "all", 3)
    with pytest.raises(DataFaultError, match=r"no valid sample in the last 50 read \(data.max_consecutive_skipped=50\)"):
        next(iter(shards.train_loader(bad, batch_size=8, seed=0, shuffle_buffer=64, max_consecutive_skipped=50)))


def test_skip_warnings_are_rate_limited_and_a_stop_signal_is_honoured(caplog) -> None:
    import signal

    from apt import preemption
    from apt.data.faults import DataFaults, merge_snapshots

    faults = DataFaults(source="d")
    with caplog.at_level("WARNING", logger="apt.data"):
        for i in range(1000):
            faults.skip("bad_json", f"d/s-{i % 3}.tar", f"sample {i}")
    assert [int(r.message.split("; ")[1].split()[0]) for r in caplog.records] == [2**k for k in range(10)]  # 1, 2, 4, ..., 512
    assert merge_snapshots({}, [{"x": 0, "data_faults": faults.snapshot()}]) == {"data_skipped": 1000.0, "data_skipped_bad_json": 1000.0}
    with preemption.PreemptionGuard() as guard:
        guard.signum = signal.SIGTERM  # as the handler records it
        with pytest.raises(preemption.Preempted, match="stopped by SIGTERM while the data loader was skipping corrupt samples"):
            faults.skip("bad_json", "d/s-0.tar", "sample x")

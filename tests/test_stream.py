"""The stream backend over a real HTTP server on 127.0.0.1 (http.server in a thread, serving the conftest shards).

Checked against things computed apart from the stream reader: the torch backend's pixels for the same keys (it
reads the bytes through the .idx offsets, not as a stream), the manifest's key counts, an uninterrupted run.
The handler injects failures: 503s, connections cut mid-body, a stopped server; Range requests are honoured
(`ranges=True`) or ignored, so both ways of starting inside a tar are exercised.
"""

from __future__ import annotations

import collections
import http.server
import importlib.util
import json
import os
import random
import re
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from frrn_dist.data.loaders import LoaderError, ShardError, build_loader
from frrn_dist.data.manifest import read_manifest, split_info

from .procs import ROOT, _env, run_train, tiny, train_cmd, train_losses

HW = (32, 64)


class ShardServer(http.server.ThreadingHTTPServer):
    """Serves `root` on 127.0.0.1; `fail[name]` 503s to send first, `cut[name]` bytes after which to drop once."""

    daemon_threads = True

    def __init__(self, root: Path, *, ranges: bool = True):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.ranges = Path(root), ranges
        self.fail: dict[str, int] = {}
        self.cut: dict[str, int] = {}
        self.log: list[tuple[str, str, int]] = []  # (file name, Range header, status)
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"

    def stop(self) -> None:
        self.shutdown()
        self.server_close()  # new connections are refused from here on


class _Handler(http.server.BaseHTTPRequestHandler):
    server: ShardServer

    def do_GET(self):  # noqa: N802 (http.server's name)
        srv, name = self.server, self.path.lstrip("/")
        path = srv.root / name
        span = self.headers.get("Range", "")
        if srv.fail.get(name, 0) > 0:
            srv.fail[name] -= 1
            srv.log.append((name, span, 503))
            self.send_error(503)
            return
        if "/" in name or not path.is_file():
            srv.log.append((name, span, 404))
            self.send_error(404)
            return
        data, start = path.read_bytes(), 0
        m = re.fullmatch(r"bytes=(\d+)-", span)
        if m and srv.ranges:
            start = int(m.group(1))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        srv.log.append((name, span, 206 if start else 200))
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        cut = srv.cut.pop(name, None)
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)  # mid-body: the client sees the connection end early

    def log_message(self, *args):
        pass


@pytest.fixture
def server(shard_dir):
    srv = ShardServer(shard_dir)
    yield srv
    srv.stop()


def stream(url: str, split: str, **kw):
    args = dict(backend="stream", input_hw=HW, micro_batch_size=1, num_threads=0, translate_px=4)
    args["recipe"] = "eval" if split == "val" else "paper"
    return build_loader(url, split, **{**args, **kw})


def epoch(loader) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    return [(k, b.images[i], b.labels[i]) for b in loader for i, k in enumerate(b.keys)]


def same(a, b) -> bool:
    return [k for k, *_ in a] == [k for k, *_ in b] and all(
        torch.equal(x[1], y[1]) and torch.equal(x[2], y[2]) for x, y in zip(a, b)
    )


# ---------------------------------------------------------------------------------------------------------------


def test_manifest_over_http_and_file_backends_refuse_urls(server, shard_dir):
    assert read_manifest(server.url) == read_manifest(shard_dir)
    assert split_info(server.url.rstrip("/"), "val") == split_info(shard_dir, "val")
    for backend in ("dali", "torch"):
        with pytest.raises(LoaderError) as e:
            build_loader(server.url, "val", backend=backend, recipe="eval", input_hw=HW)
        assert str(e.value).count("\n") == 0 and "needs files" in str(e.value)
        assert "data.backend=stream" in str(e.value) and server.url in str(e.value)
    assert server.log == [("manifest.json", "", 200)] * 2  # the file backends fail before reading anything


@pytest.mark.parametrize("world_size, workers", [(1, 0), (2, 0), (3, 2)])
def test_eval_sees_every_sample_once_across_ranks(server, shard_dir, world_size, workers):
    # 3 ranks x 2 workers = 6 readers for 2 val tars: the case that hangs webdataset's file-split (webdataset#188)
    reference = {k: (x, y) for k, x, y in epoch(stream(str(shard_dir), "val", backend="torch"))}
    loaders = [stream(server.url, "val", rank=r, world_size=world_size, num_threads=workers) for r in range(world_size)]
    assert len({len(loader) for loader in loaders}) == 1
    for _ in range(2):  # ranks move to another slice each epoch: still once each
        seen = collections.Counter()
        for loader in loaders:
            batches = list(loader)
            assert len(batches) == len(loader)
            for b in batches:
                for i, k in enumerate(b.keys):
                    seen[k] += 1
                    assert torch.equal(b.images[i], reference[k][0]) and torch.equal(b.labels[i], reference[k][1])
        assert seen == collections.Counter(list(reference))  # each val key exactly once


@pytest.mark.parametrize("world_size, workers", [(2, 0), (3, 2)])
def test_training_gives_every_rank_the_same_number_of_full_batches(server, shard_dir, world_size, workers):
    num = split_info(shard_dir, "train")["num_samples"]
    loaders = [
        stream(server.url, "train", rank=r, world_size=world_size, num_threads=workers) for r in range(world_size)
    ]
    assert {len(loader) for loader in loaders} == {num // world_size}
    keys = [[b.keys for b in loader] for loader in loaders]
    assert all(len(k) == num // world_size and all(len(b) == 1 for b in k) for k in keys)
    flat = [key for rank in keys for batch in rank for key in batch]
    assert len(flat) == len(set(flat))  # disjoint slices


def test_resume_mid_epoch_over_http_continues_with_the_same_samples(server):
    args = dict(rank=1, world_size=2, num_threads=2, shuffle_buffer=4, seed=3)
    loader = stream(server.url, "train", **args)
    reference = epoch(loader) + epoch(loader)
    assert len(reference) == 2 * len(loader) == 6
    for stop in (2, 3, 4):  # mid-epoch 0, at its end, mid-epoch 1
        loader, got = stream(server.url, "train", **args), []
        for _ in range(2):
            for b in loader:
                got += [(k, b.images[i], b.labels[i]) for i, k in enumerate(b.keys)]
                if len(got) == stop:
                    break
            if len(got) == stop:
                break
        saved = loader.state()
        resumed = stream(server.url, "train", checkpoint=saved, **args)
        assert json.loads(resumed.state())["position"] == json.loads(saved)["position"]
        while len(got) < len(reference):
            got += epoch(resumed)
        assert same(got, reference), stop
    # started inside a tar through the .idx with a Range request
    assert any(status == 206 and name.endswith(".tar") for name, _, status in server.log)


def test_transient_failures_are_retried_and_the_bytes_come_out_the_same(server, shard_dir):
    clean = epoch(stream(server.url, "val"))
    tars = [sh["tar"] for sh in split_info(shard_dir, "val")["shards"]]
    server.fail = {tars[0]: 2, "manifest.json": 1}
    server.cut = {tars[0]: 5000, tars[1]: 700}
    server.ranges = False  # resumed by re-reading from the start: the bytes before are dropped
    got = epoch(stream(server.url, "val", retries=3, retry_backoff_s=0.01))
    assert same(got, clean)
    assert [s for n, _, s in server.log if n == tars[0]][-4:] == [503, 503, 200, 200]  # 2 refusals, 1 cut, ok
    assert [r for n, r, _ in server.log if n == tars[1]][-1] == "bytes=700-"  # asked to resume at the cut


def test_server_stopped_mid_epoch_gives_retries_then_one_line_naming_the_url(server, shard_dir):
    loader = stream(server.url, "val", retries=2, retry_backoff_s=0.1)
    it = iter(loader)
    next(it)  # the first tar is read now; the second one is opened after the server is gone
    server.stop()
    t0 = time.perf_counter()
    with pytest.raises(ShardError) as e:
        list(it)
    message = str(e.value)
    assert time.perf_counter() - t0 >= 0.1 + 0.2  # two waits: retries happened
    second = split_info(shard_dir, "val")["shards"][1]["tar"]
    assert message.startswith(f"{server.url}{second}: ") and "\n" not in message
    assert "gave up after 3 attempts" in message and "Connection refused" in message


def broken_copy(shard_dir: Path, dst: Path) -> tuple[Path, list[str]]:
    shutil.copytree(shard_dir, dst)
    return dst, [sh["tar"] for sh in split_info(dst, "val")["shards"]]


def test_missing_and_truncated_tars_name_the_url(shard_dir, tmp_path):
    root, tars = broken_copy(shard_dir, tmp_path / "shards")
    srv = ShardServer(root)
    try:
        (root / tars[1]).unlink()
        with pytest.raises(ShardError, match=rf"^{re.escape(srv.url + tars[1])}: HTTP 404"):
            epoch(stream(srv.url, "val"))
        data = (shard_dir / tars[0]).read_bytes()
        (root / tars[0]).write_bytes(data[: len(data) // 2])
        with pytest.raises(ShardError, match=rf"^{re.escape(srv.url + tars[0])}: {len(data) // 2} bytes, the manifest"):
            epoch(stream(srv.url, "val"))
    finally:
        srv.stop()
    # a pipe: gives no size up front: the tar ends early
    with pytest.raises(ShardError, match=rf"^pipe:cat {re.escape(str(root))}/{tars[0]}: .*(truncated|readable tar)"):
        epoch(stream(f"pipe:cat {root}/{{}}", "val"))


def test_a_member_that_does_not_decode_stops_or_is_skipped(shard_dir, tmp_path):
    root, tars = broken_copy(shard_dir, tmp_path / "shards")
    line = (root / tars[0].replace(".tar", ".idx")).read_text().splitlines()[2]  # the 2nd sample of the 1st tar
    fields = line.split()
    at = fields.index("jpg")
    offset, size, key = int(fields[at + 1]), int(fields[at + 2]), fields[at + 3][: -len(".jpg")]
    with open(root / tars[0], "r+b") as f:  # same size, tar headers intact, the JPEG's bytes garbage
        f.seek(offset)
        f.write(random.Random(0).randbytes(size))
    srv = ShardServer(root)
    try:
        with pytest.raises(ShardError, match=rf"^{re.escape(srv.url + tars[0])}: cannot decode {key}.jpg"):
            epoch(stream(srv.url, "val"))
        loader = stream(srv.url, "val", on_error="skip")
        batches = list(loader)
        assert len(batches) == len(loader) == 4 and sum(len(b) for b in batches) == 3
        assert len(loader.skipped) == 1 and f"{key}.jpg" in loader.skipped[0]
    finally:
        srv.stop()


def test_s3_and_gs_urls_stream_through_the_cloud_clis(shard_dir, tmp_path, monkeypatch):
    if importlib.util.find_spec("s3fs") or importlib.util.find_spec("gcsfs"):
        pytest.skip("fsspec's s3fs/gcsfs would read these URLs here, not the CLIs")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # Stand-ins for the real CLIs with the bucket in a local folder: they check the command line they get.
    clis = {
        "aws": f'[ "$1 $2 $4" = "s3 cp -" ] || exit 2\n'
        f"[ -e {tmp_path}/failed ] || {{ touch {tmp_path}/failed; exit 1; }}\n"  # a transient failure, once
        f'exec cat "{shard_dir}/${{3#s3://bucket/shards/}}"',
        "gcloud": f'[ "$1 $2" = "storage cat" ] || exit 2\nexec cat "{shard_dir}/${{3#gs://bucket/shards/}}"',
    }
    for name, body in clis.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    reference = epoch(stream(str(shard_dir), "val", rank=1, world_size=2))
    for url in ("s3://bucket/shards/", "gs://bucket/shards"):
        assert same(epoch(stream(url, "val", rank=1, world_size=2, retry_backoff_s=0.01)), reference), url
    assert (tmp_path / "failed").exists()  # the aws stand-in failed once and was retried


def test_run_evaluation_reads_a_url(server, shard_dir, tmp_path):
    from frrn_dist.evaluate import main as evaluate_main
    from frrn_dist.evaluate import run_evaluation

    from .eval_helpers import make_run

    run = make_run(tmp_path)
    local = run_evaluation(run, shards=str(shard_dir), backend="torch", out=tmp_path / "a", num_workers=0)
    remote = run_evaluation(run, shards=server.url, backend="stream", out=tmp_path / "b", num_workers=0)
    assert remote["images"] == local["images"] == 4 and remote["source"] == server.url
    for key in ("miou", "iiou", "category_miou"):
        assert remote[key] == pytest.approx(local[key], abs=1e-12), key
    # `launch/evaluate.py --checkpoint RUN` of a run trained from a URL: the URL and the backend from config.yaml
    config = (run / "config.yaml").read_text().replace("backend: torch", "backend: stream")
    (run / "config.yaml").write_text(config.replace("data:\n", f"data:\n  shard_dir: {server.url}\n"))
    again = evaluate_main(str(run), out=str(tmp_path / "c"), device="cpu", num_workers=0)
    assert again["source"] == server.url and again["miou"] == pytest.approx(local["miou"], abs=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# real training runs


@pytest.mark.slow
def test_two_rank_deepspeed_run_trains_over_http(server, tmp_path):
    proc = run_train(
        tiny(server.url, tmp_path, "http", "data.backend=stream", "train.max_steps=3", "train.eval_every_steps=0"),
        ranks=2,
    )
    run = tmp_path / "http"
    assert (run / "checkpoints/latest").read_text().strip() == "step00000003", proc.stdout[-2000:]
    assert sorted(train_losses(run)) == [1, 2, 3]
    assert any(name.startswith("train-") for name, _, _ in server.log)
    assert any(name.startswith("val-") for name, _, _ in server.log)


@pytest.mark.slow
def test_server_stopped_while_training_fails_in_one_line_and_keeps_the_checkpoint(server, tmp_path):
    overrides = tiny(server.url, tmp_path, "cut", "data.backend=stream", "train.max_steps=1000",
                     "train.save_every_steps=2", "train.eval_every_steps=0")  # fmt: skip
    proc = subprocess.Popen(
        train_cmd(overrides, 1), env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    run = tmp_path / "cut"
    deadline = time.time() + 200
    while max(train_losses(run), default=0) < 3 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before the server could be stopped"
    server.stop()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    last = err.strip().splitlines()[-1]
    assert re.match(rf"error: {re.escape(server.url)}(train|val)-\d+\.tar: .*gave up after 5 attempts", last), last
    assert "retry 1/4" in err
    tag = (run / "checkpoints/latest").read_text().strip()
    assert int(tag[4:]) >= 2  # saved before the server went away, and still whole
    weights = load_file(run / "checkpoints" / tag / "model.safetensors")
    assert weights and all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert np.isfinite(list(train_losses(run).values())).all()

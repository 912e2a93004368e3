"""The adapter registry's costs, side by side in one run, with real `edgelora worker` and
`edgelora router` processes on the default model (SmolLM2-135M):

1. upload: Router.UploadAdapter of a random rank-8 and rank-64 PEFT adapter (all 7 projections),
   from the call until it is acknowledged; median of --repeats, each a fresh id, unregistered
   afterwards (the worker's copy goes with it, so every upload is pushed to the worker again);
2. registration -> first token, cold vs warm: cold = the upload above (the worker lacks the
   digest: the registration includes pushing the files with Worker.PutAdapter), warm = the
   same content uploaded again under another id (already in the worker's --adapter-cache-dir);
   each split into register -> ack and ack -> first token of a GenerateStream on that adapter;
3. router restart with --restart-n registrations written straight into a --state-dir's
   database (router/registry_db.py, rows pointing at a few small adapters in its store): from
   starting `edgelora router` to health SERVING, ListAdapters showing all of them and a Generate
   on one of them; once with a worker that lacks them (the start syncs: registers every one
   there) and then again with the worker holding them all (nothing should be registered again).
   An empty registry is the reference. The router's own log gives the breakdown.

    .venv/bin/python bench/registry.py            # a few minutes on 2 cores, mostly the sync
    .venv/bin/python bench/registry.py --quick    # 2 repeats, 500 registrations: 1-2 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from common.adapter_blobs import ADAPTER_FILES, BlobStore, digest_files  # noqa: E402
from edgelora.client import build_request, list_adapters, upload_messages  # noqa: E402
from edgelora.v1 import (  # noqa: E402
    router_pb2,
    router_pb2_grpc,
    types_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from router.registry_db import RegistryDB, StoredAdapter  # noqa: E402

PROMPT = "Tell me about the sea"
GEN_TOKENS = 4
ROUTER_SERVICE = "edgelora.v1.Router"
from router.workers import CHANNEL_OPTIONS  # noqa: E402

# what the router's channels to workers accept (a worker's ListAdapters is read at each sync)
ROUTER_MAX_RECEIVE = dict(CHANNEL_OPTIONS)["grpc.max_receive_message_length"]
# a polling client must not wait out gRPC's reconnect backoff (1 s, growing) while a router starts
POLL_OPTIONS = [("grpc.initial_reconnect_backoff_ms", 50), ("grpc.min_reconnect_backoff_ms", 50),
                ("grpc.max_reconnect_backoff_ms", 100)]
MB = 1e6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


class Process:
    """One `python -m edgelora.cli ...` child, its output in `log_path`."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.command = [sys.executable, "-m", "edgelora.cli", *args]
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.started_wall = 0.0  # time.time() at start: the log's clock
        self.started = 0.0       # time.perf_counter() at start

    def start(self) -> Process:
        with open(self.log_path, "wb") as log:
            self.started_wall, self.started = time.time(), time.perf_counter()
            self.proc = subprocess.Popen(self.command, cwd=REPO, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        return self

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise RuntimeError(f"{' '.join(self.command[2:4])} exited "
                               f"({self.proc and self.proc.returncode}); its log "
                               f"{self.log_path}:\n{log_tail(self.log_path)}")

    def stop(self, timeout_s: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


# -- the processes --

def start_worker(args: argparse.Namespace, tmp: Path) -> tuple[Process, str]:
    port = free_port()
    worker = Process(["worker", "--model", "default", "--port", str(port),
                      "--num-threads", str(args.threads), "--max-lora-rank",
                      str(max(args.ranks)), "--device-adapter-slots", "4",
                      "--host-adapter-cache", "8", "--max-batch-size", "8",
                      "--max-model-len", "512", "--kv-cache-mb", "64",
                      "--adapter-cache-dir", str(tmp / "worker-cache"), "--log-level", "WARNING"],
                     tmp / "worker.log").start()
    address = f"127.0.0.1:{port}"
    with grpc.insecure_channel(address, options=POLL_OPTIONS) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        deadline = time.monotonic() + 600
        while True:
            worker.check_alive()
            try:
                stub.Info(worker_pb2.InfoRequest(), timeout=2)
                break
            except grpc.RpcError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker not ready: {log_tail(worker.log_path)}") from None
                time.sleep(0.2)
    return worker, address


def router_process(worker_address: str, state_dir: Path, log_path: Path) -> tuple[Process, str]:
    port = free_port()
    router = Process(["router", "--workers", worker_address, "--port", str(port),
                      "--state-dir", str(state_dir), "--embedder-threads", "1",
                      "--log-level", "INFO"], log_path)
    return router, f"127.0.0.1:{port}"


def wait_serving(router: Process, address: str, timeout_s: float) -> float:
    """Polls the router's health (every 0.1 s) -> seconds from its start to SERVING."""
    with grpc.insecure_channel(address, options=POLL_OPTIONS) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            router.check_alive()
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=ROUTER_SERVICE),
                                   timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return time.perf_counter() - router.started
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"router not serving after {timeout_s:.0f} s: "
                                   f"{log_tail(router.log_path)}")
            time.sleep(0.1)


# -- 1 and 2: uploads, cold and warm --

def generate_first_token(stub, adapter_id: str) -> float:
    """Streams a short greedy generation on `adapter_id`; -> seconds to its first token."""
    started = time.perf_counter()
    first = 0.0
    for chunk in stub.GenerateStream(build_request(
            PROMPT, adapter_id=adapter_id, max_tokens=GEN_TOKENS, temperature=0.0,
            ignore_eos=True), timeout=600):
        if chunk.token_ids and not first:
            first = time.perf_counter() - started
            if chunk.adapter_id and adapter_id and chunk.adapter_id != adapter_id:
                raise RuntimeError(f"asked for adapter {adapter_id!r}, served by "
                                   f"{chunk.adapter_id!r}")
    if not first:
        raise RuntimeError(f"no token from adapter {adapter_id!r}")
    return first


def upload(stub, folder: Path, adapter_id: str) -> tuple[float, types_pb2.AdapterInfo]:
    """-> (seconds from the UploadAdapter call to its acknowledgement, the adapter)."""
    started = time.perf_counter()
    reply = stub.UploadAdapter(upload_messages(
        folder, router_pb2.UploadAdapterHeader(adapter_id=adapter_id)), timeout=600)
    return time.perf_counter() - started, reply.adapter


def unregister(stub, adapter_id: str) -> None:
    stub.UnregisterAdapter(types_pb2.UnregisterAdapterRequest(adapter_id=adapter_id), timeout=120)


def measure_uploads(args: argparse.Namespace, address: str, adapters: dict[int, Path],
                    worker_cache: Path) -> dict[int, dict]:
    """Per rank: size, and per repeat the cold and warm ack and ack -> first token seconds."""
    results = {rank: {"bytes": sum((folder / n).stat().st_size for n in ADAPTER_FILES),
                      "digest": digest_files(folder, 1 << 40), "cold_ack": [], "warm_ack": [],
                      "cold_first": [], "warm_first": [], "cold_checks": 0, "warm_checks": 0}
               for rank, folder in adapters.items()}
    with grpc.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)
        generate_first_token(stub, "")  # the base model's first request: one-time costs
        # a warm-up round, not counted: the first upload, push and load of each rank (under
        # load, the first r=64 load here took seconds more than the next ones)
        for rank, folder in adapters.items():
            upload(stub, folder, f"bench-warm-up-r{rank}")
            generate_first_token(stub, f"bench-warm-up-r{rank}")
            unregister(stub, f"bench-warm-up-r{rank}")
        for i in range(args.repeats):
            for rank, folder in adapters.items():
                r = results[rank]
                blob = worker_cache / "blobs" / r["digest"]
                cold, warm = f"bench-r{rank}-cold-{i}", f"bench-r{rank}-warm-{i}"
                r["cold_checks"] += not blob.exists()  # the push is part of this one
                seconds, info = upload(stub, folder, cold)
                if info.digest != r["digest"] or info.rank != rank:
                    raise RuntimeError(f"{cold}: registered as rank {info.rank}, digest "
                                       f"{info.digest[:12]}; expected {rank}, {r['digest'][:12]}")
                r["cold_ack"].append(seconds)
                r["cold_first"].append(generate_first_token(stub, cold))
                r["warm_checks"] += blob.exists()  # on the worker's disk already: no push
                seconds, _ = upload(stub, folder, warm)
                r["warm_ack"].append(seconds)
                r["warm_first"].append(generate_first_token(stub, warm))
                unregister(stub, cold)
                unregister(stub, warm)
                print(f"  r={rank} repeat {i + 1}/{args.repeats}: cold {r['cold_ack'][-1]:.2f} s "
                      f"+ {r['cold_first'][-1]:.2f} s, warm {r['warm_ack'][-1]:.2f} s + "
                      f"{r['warm_first'][-1]:.2f} s", flush=True)
        left = list(list_adapters(stub, timeout_s=60))
        if left:
            raise RuntimeError("still registered after the uploads: "
                               f"{[a.adapter_id for a in left]}")
    return results


# -- 3: restarts --

LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def log_events(router: Process) -> dict[str, float]:
    """Seconds from the router's start to its log lines: registry loaded, worker synced (and how
    many it registered there), serving."""
    found: dict[str, float] = {}
    for line in router.log_path.read_text(errors="replace").splitlines():
        match = LOG_TIME.match(line)
        if not match:
            continue
        at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        since = at - router.started_wall
        if "router.server: registry " in line and "loaded" not in found:
            found["loaded"] = since
        elif " synced: " in line and "synced" not in found:
            found["synced"] = since
            found["sync_registered"] = float(re.search(r"synced: (\d+) adapters registered",
                                                       line).group(1))
        elif "router serving on" in line and "serving" not in found:
            found["serving"] = since
    return found


def restart_once(label: str, worker_address: str, state_dir: Path, expected: int,
                 adapter_id: str, log_path: Path, timeout_s: float) -> dict:
    """Starts a router on `state_dir`, times it, stops it; -> its figures."""
    router, address = router_process(worker_address, state_dir, log_path)
    router.start()
    try:
        serving = wait_serving(router, address, timeout_s)
        with grpc.insecure_channel(address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            while True:
                listed = list(list_adapters(stub, timeout_s=120))  # every page
                if len(listed) >= expected:
                    break
                router.check_alive()
                time.sleep(0.1)
            listed_s = time.perf_counter() - router.started
            request = build_request(PROMPT, adapter_id=adapter_id, max_tokens=1,
                                    temperature=0.0)
            stub.Generate(request, timeout=600)
            generated_s = time.perf_counter() - router.started
            stub.Generate(request, timeout=600)  # the same again: without one-time costs
            again_s = time.perf_counter() - router.started - generated_s
        figures = {"label": label, "serving_s": serving, "listed_s": listed_s,
                   "generated_s": generated_s, "generate_again_s": again_s,
                   "listed": len(listed), "list_reply_bytes": sum(a.ByteSize() for a in listed)}
    finally:
        router.stop()
    figures.update({f"log_{k}": v for k, v in log_events(router).items()})
    return figures


def fill_registry(state_dir: Path, folders: list[Path], count: int) -> tuple[float, list[str]]:
    """`count` shared registrations straight into the database (RegistryDB.put), pointing at
    `folders`' contents, copied into the store beside it as an upload would; -> seconds."""
    started = time.perf_counter()
    store = BlobStore(state_dir / "store")
    digests = [store.add_folder(folder) for folder in folders]
    ranks = [json.loads((folder / "adapter_config.json").read_text())["r"] for folder in folders]
    db = RegistryDB(state_dir)
    # the fill is set-up, not what is measured: one fsync per row would take minutes here
    db._db.execute("PRAGMA synchronous=OFF")
    try:
        for i in range(count):
            j = i % len(digests)
            db.put(StoredAdapter("", restart_id(i), "", ranks[j], digest=digests[j]))
    finally:
        db.close()
    return time.perf_counter() - started, digests


def restart_id(i: int) -> str:
    return f"restart-{i:05d}"


def worker_view(address: str) -> tuple[int, int, int]:
    """-> (adapters the worker has registered, its ListAdapters reply bytes, host loads)."""
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        info = stub.Info(worker_pb2.InfoRequest(), timeout=30)
        listed = stub.ListAdapters(types_pb2.ListAdaptersRequest(), timeout=120)
    return info.adapter_stats.num_registered, listed.ByteSize(), info.adapter_stats.host.loads


def measure_restarts(args: argparse.Namespace, worker_address: str, small: list[Path],
                     tmp: Path) -> dict:
    n, last = args.restart_n, restart_id(args.restart_n - 1)
    out: dict = {"n": n, "rows": []}
    empty = tmp / "state-empty"
    print("  empty registry (reference) ...", flush=True)
    out["rows"].append(restart_once("empty registry (reference)", worker_address, empty, 0, "",
                                    tmp / "router-empty.log", 300))
    state = tmp / "state-restart"
    out["fill_s"], digests = fill_registry(state, small, n)
    out["digests"] = len(digests)
    out["db_bytes"] = sum(p.stat().st_size for p in state.glob("registry.sqlite3*"))
    print(f"  filled {n} rows in {out['fill_s']:.1f} s; restart, worker lacks them ...",
          flush=True)
    before = worker_view(worker_address)[0]
    row = restart_once(f"N={n}, worker lacks them", worker_address, state, n, last,
                       tmp / "router-cold.log", args.sync_timeout_s)
    registered, reply_bytes, loads = worker_view(worker_address)
    row["worker_registered"] = registered - before
    out["rows"].append(row)
    out["worker_list_bytes"] = reply_bytes
    for i in range(args.warm_restarts):
        print(f"  restart {i + 1}/{args.warm_restarts}, worker holds them ...", flush=True)
        row = restart_once(f"N={n}, worker holds them", worker_address, state, n, last,
                           tmp / f"router-warm-{i}.log", args.sync_timeout_s)
        now, _, now_loads = worker_view(worker_address)
        row["worker_registered"] = now - registered
        # `last` is in the worker's host cache since the previous Generate: a re-registration
        # would drop it there, and this Generate would load it again
        row["worker_new_loads"] = now_loads - loads
        registered, loads = now, now_loads
        out["rows"].append(row)
    return out


# -- report --

def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "n/a"


def report_uploads(results: dict[int, dict], repeats: int) -> list[str]:
    lines = [f"1. upload: UploadAdapter call -> acknowledged (the worker is pushed the files); "
             f"median of {repeats}, each a fresh id, unregistered after",
             f"  {'adapter':<9}{'MB':>8}{'upload s':>11}{'min s':>9}{'max s':>9}{'MB/s':>9}"]
    for rank, r in results.items():
        m = median(r["cold_ack"])
        lines.append(f"  r={rank:<7}{r['bytes'] / MB:>8.1f}{m:>11.3f}{min(r['cold_ack']):>9.3f}"
                     f"{max(r['cold_ack']):>9.3f}{r['bytes'] / MB / m:>9.1f}")
    lines += ["",
              "2. registration -> first token (medians): cold = the upload above (push included),"
              " warm = same content under another id, on the worker's disk already",
              f"  {'adapter':<9}{'case':<11}{'register->ack s':>16}{'ack->1st token s':>18}"
              f"{'register->1st token s':>23}"]
    for rank, r in results.items():
        figures = {}
        for case in ("cold", "warm"):
            ack, first = median(r[f"{case}_ack"]), median(r[f"{case}_first"])
            figures[case] = (ack, first, median([a + f for a, f in zip(
                r[f"{case}_ack"], r[f"{case}_first"], strict=True)]))
            lines.append(f"  r={rank:<7}{case:<11}{ack:>16.3f}{first:>18.3f}"
                         f"{figures[case][2]:>23.3f}")
        (ca, cf, ct), (wa, wf, wt) = figures["cold"], figures["warm"]
        lines.append(f"  r={rank:<7}{'cold/warm':<11}{ratio(ca, wa):>16}{ratio(cf, wf):>18}"
                     f"{ratio(ct, wt):>23}")
        lines.append(f"  {'':<9}(worker lacked the digest before {r['cold_checks']}/{repeats} "
                     f"cold uploads, held it before {r['warm_checks']}/{repeats} warm ones)")
    return lines


def report_restarts(out: dict) -> list[str]:
    n = out["n"]
    lines = [f"3. router restart with N={n} registrations ({out['digests']} small adapters' "
             f"digests; database filled in {out['fill_s']:.1f} s, "
             f"{out['db_bytes'] / MB:.1f} MB): seconds from starting `edgelora router`",
             "  (router log: registry loaded / worker synced / serving; client: health SERVING,"
             " ListAdapters shows N, a one-token Generate on one of them answered; 'again': a"
             " second one, its own seconds)",
             f"  {'case':<30}{'loaded':>8}{'synced':>8}{'serving':>9}{'health':>8}"
             f"{'list N':>8}{'generate':>10}{'again':>7}  on the worker"]

    def cell(row: dict, key: str, width: int) -> str:
        return f"{row[key]:>{width}.2f}" if key in row else f"{'-':>{width}}"

    for row in out["rows"]:
        note = f"sync registered {row.get('log_sync_registered', 0):.0f}"
        if "worker_registered" in row:
            note += f", count +{row['worker_registered']}"
        if "worker_new_loads" in row:
            note += f", loads +{row['worker_new_loads']}"
        lines.append(f"  {row['label']:<30}{cell(row, 'log_loaded', 8)}{cell(row, 'log_synced', 8)}"
                     f"{cell(row, 'log_serving', 9)}{cell(row, 'serving_s', 8)}"
                     f"{cell(row, 'listed_s', 8)}{cell(row, 'generated_s', 10)}"
                     f"{cell(row, 'generate_again_s', 7)}  {note}")
    base = out["rows"][0]
    cold = out["rows"][1]
    warm = out["rows"][2:]
    if "log_synced" in cold and "log_loaded" in cold:
        sync_s = cold["log_synced"] - cold["log_loaded"]
        lines.append(f"  worker sync at the restart that lacked them: {sync_s:.2f} s "
                     f"({cold.get('log_sync_registered', 0) / max(sync_s, 1e-9):.0f} "
                     "registrations/s)")
    else:
        lines.append("  the restart that lacked them logged no sync: the worker got nothing")
    if warm:
        extra = median([w["serving_s"] for w in warm]) - base["serving_s"]
        again = sum(w.get("log_sync_registered", 0) for w in warm)
        lines.append(f"  restart with the worker holding them: {extra:+.2f} s to serving over the "
                     f"empty registry; registered again on the worker: {again:.0f} (expected 0)")
    per = out["worker_list_bytes"] / max(n, 1)
    lines.append(f"  ListAdapters replies at N={n}: worker {out['worker_list_bytes'] / MB:.2f} MB "
                 f"(the router's sync reads it), router {cold['list_reply_bytes'] / MB:.2f} MB "
                 "in pages; "
                 f"the router reads up to {ROUTER_MAX_RECEIVE / MB:.0f} MB from a worker: "
                 f"N~{ROUTER_MAX_RECEIVE / per:.0f} adapters")
    return lines


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores{f' ({model})' if model else ''}"


def load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--quick", action="store_true",
                   help="--repeats 2 --restart-n 500 --warm-restarts 1 (1-2 minutes)")
    p.add_argument("--repeats", type=int, default=None, help="uploads per rank (default 5)")
    p.add_argument("--ranks", default="8,64", help="adapter ranks uploaded (all 7 projections)")
    p.add_argument("--restart-n", type=int, default=None,
                   help="registrations in the restarted router's database (default 10000)")
    p.add_argument("--restart-adapters", type=int, default=4,
                   help="distinct small adapters (r=2, q_proj and v_proj) the rows point at")
    p.add_argument("--warm-restarts", type=int, default=None,
                   help="restarts with the worker holding every registration (default 2)")
    p.add_argument("--sync-timeout-s", type=float, default=900.0,
                   help="longest wait for a restarted router to serve")
    p.add_argument("--threads", type=int, default=2, help="the worker's torch threads")
    p.add_argument("--json", default="", help="also write the figures to this file")
    p.add_argument("--keep-logs", default="", help="copy the processes' logs to this folder")
    args = p.parse_args(argv)
    quick = {"repeats": 2, "restart_n": 500, "warm_restarts": 1}
    full = {"repeats": 5, "restart_n": 10_000, "warm_restarts": 2}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ranks = [int(r) for r in args.ranks.split(",") if r]
    if args.repeats < 1 or args.restart_n < 1 or args.restart_adapters < 1 or not args.ranks:
        p.error("--repeats, --restart-n, --restart-adapters and --ranks need at least 1")
    return args


def make_adapters(args: argparse.Namespace, tmp: Path) -> tuple[dict[int, Path], list[Path]]:
    from bench.random_weights import write_random_adapter
    from worker.config import WorkerConfig
    from worker.gguf_import import resolve_model_path

    model = resolve_model_path("default", WorkerConfig().cache_path)
    uploads = {rank: write_random_adapter(tmp / f"upload-r{rank}", model, rank=rank,
                                          alpha=2.0 * rank, seed=rank, std=0.05)
               for rank in args.ranks}
    small = [write_random_adapter(tmp / f"small-{i}", model, rank=2, alpha=4.0,
                                  modules=("q_proj", "v_proj"), seed=1000 + i, std=0.05)
             for i in range(args.restart_adapters)]
    return uploads, small


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started, load_start = time.perf_counter(), load()
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}; load average at start {load_start}", flush=True)
    with tempfile.TemporaryDirectory(prefix="edgelora-bench-registry-") as name:
        tmp = Path(name)
        worker = router = None
        try:
            uploads, small = make_adapters(args, tmp)
            worker, worker_address = start_worker(args, tmp)
            print(f"worker: edgelora worker --model default --num-threads {args.threads} "
                  f"--max-lora-rank {max(args.ranks)} (own --adapter-cache-dir), ready after "
                  f"{time.perf_counter() - worker.started:.1f} s", flush=True)
            router, address = router_process(worker_address, tmp / "state-uploads",
                                             tmp / "router-uploads.log")
            router.start()
            wait_serving(router, address, 300)
            print("uploads ...", flush=True)
            upload_results = measure_uploads(args, address, uploads, tmp / "worker-cache")
            router.stop()
            print("restarts ...", flush=True)
            restarts = measure_restarts(args, worker_address, small, tmp)
        finally:
            for process in (router, worker):
                if process is not None:
                    process.stop()
            if args.keep_logs:
                Path(args.keep_logs).mkdir(parents=True, exist_ok=True)
                for log in tmp.glob("*.log"):
                    shutil.copy(log, Path(args.keep_logs) / log.name)
    lines = ["", *report_uploads(upload_results, args.repeats), "",
             *report_restarts(restarts), "",
             f"took {time.perf_counter() - started:.0f} s; load average at start {load_start}, "
             f"at end {load()}"]
    print("\n".join(lines), flush=True)
    if args.json:
        figures = {"uploads": {str(rank): r for rank, r in upload_results.items()},
                   "restarts": restarts, "load_start": load_start, "load_end": load()}
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()

"""Selector profiling and training: the dataset format, the labeling rule, and the round trip
`edgelora router profile` -> `edgelora router train` -> a running router reloading the head, on
real workers (the tiny model) with adapters whose behaviour the references come from."""

from __future__ import annotations

import json
import math
from pathlib import Path

import grpc
import pytest

from edgelora.cli import main as cli_main
from edgelora.client import build_request
from edgelora.v1 import router_pb2, router_pb2_grpc, types_pb2, worker_pb2, worker_pb2_grpc
from router.config import RouterConfig
from router.profiling import label, passes, read_dataset
from router.selector_head import TrainedHead
from router.server import start_router
from tests.conftest import ServeThread, write_random_adapter
from worker.config import WorkerConfig


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dataset_rows_are_checked(tmp_path: Path) -> None:
    good = read_dataset(write_jsonl(tmp_path / "ok.jsonl", [
        {"prompt": "p", "reference": "r"},
        {"messages": [{"role": "user", "content": "hi"}], "checker": {"regex": "^[A-Z ]+$"}}]))
    assert good[0].text == "p" and good[1].text == "hi"
    for bad, message in [({"prompt": "p"}, "reference or checker"),
                         ({"reference": "r"}, "prompt or messages"),
                         ({"prompt": "p", "checker": {"eval": "x"}}, "checker must be")]:
        with pytest.raises(ValueError, match=message) as info:
            read_dataset(write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "reference": "r"},
                                                              bad]))
        assert "bad.jsonl:2" in str(info.value)


def test_labeling_rule() -> None:
    # per-token log-likelihoods: "" is the base model
    assert label({"": -2.0, "a": -1.0, "b": -1.05, "c": -1.5}, 0.1, 0.1) == ["a", "b"]
    assert label({"": -1.0, "a": -0.95}, 0.1, 0.1) == []  # not better enough than base
    assert label({"": -3.0, "a": -1.0, "b": -2.0}, 0.1, 0.5) == ["a"]  # b trails the best
    assert passes({"regex": r"^\s*\{.*\}\s*$"}, '{"answer": "x"}\n')
    assert not passes({"contains": "Arr matey!"}, "Hello")


FAMILIES = {  # prompt style -> the adapter whose greedy answers are the references
    "alpha": "Answer in the alpha style: {}", "beta": "Reply the beta way, please: {}",
    "": "{}"}
TOPICS = ["what is a comet?", "how do bees make honey?", "why is the sea salty?",
          "what is a volcano?", "how do magnets work?", "what is a black hole?",
          "how does a compass work?", "why do we sleep?", "what is a glacier?",
          "how do plants grow?"]


ADAPTERS = ("alpha", "beta", "gamma")


def register_all(stub, root: Path) -> None:
    for name in ADAPTERS:
        if (root / name).is_dir():
            stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
                adapter_id=name, path=str(root / name)), timeout=60)


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    server = ServeThread(WorkerConfig(model=str(tiny_model_dir), port=0, num_threads=1,
                                      max_model_len=256, kv_cache_mb=16, max_batch_size=16))
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))
    root = tmp_path_factory.mktemp("profiled")
    for seed, name in enumerate(ADAPTERS):  # no cards: zero-shot knows none of them
        write_random_adapter(root / name, tiny_model_dir, rank=4, seed=seed, std=0.3)
    register_all(stub, root)
    server.adapters_root = root
    yield server
    server.stop()


def make_dataset(stub, path: Path) -> list[tuple[str, str]]:
    """References = the family adapter's own greedy answer; -> (prompt, intended adapter)."""
    rows, intended = [], []
    for adapter_id, template in FAMILIES.items():
        for topic in TOPICS:
            prompt = template.format(topic)
            answer = stub.Generate(build_request(prompt, adapter_id=adapter_id, max_tokens=12,
                                                 ignore_eos=True), timeout=60).text
            rows.append({"prompt": prompt, "reference": answer})
            intended.append((prompt, adapter_id))
    write_jsonl(path, rows)
    return intended


def test_profile_train_and_reload_round_trip(server: ServeThread, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))
    intended = dict(make_dataset(stub, tmp_path / "data.jsonl"))
    cli_main(["router", "profile", "--workers", server.worker_address, "--dataset",
              str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "labels.jsonl")])
    assert "profiled 30 prompts x 3 adapters" in capsys.readouterr().out
    labeled = [json.loads(line) for line in (tmp_path / "labels.jsonl").read_text().splitlines()]
    worker = worker_pb2_grpc.WorkerStub(grpc.insecure_channel(server.worker_address))
    first = labeled[0]  # the recorded scores are the worker's
    direct = worker.Score(worker_pb2.ScoreRequest(
        prompt=first["prompt"], reference=json.loads(
            (tmp_path / "data.jsonl").read_text().splitlines()[0])["reference"],
        adapter_ids=["alpha"]), timeout=60).results[0]
    assert math.isclose(first["per_token_log_likelihood"]["alpha"],
                        direct.log_likelihood / direct.num_tokens, rel_tol=1e-4)
    right = sum(row["positives"] == ([intended[row["prompt"]]] if intended[row["prompt"]] else [])
                for row in labeled)
    assert right >= 0.8 * len(labeled), [(r["prompt"], r["positives"]) for r in labeled]

    # a router that watches the head file, started before the file exists
    runtime = server._call(start_router(RouterConfig(
        port=0, workers=server.worker_address, selector_head=str(tmp_path / "head.pt"))))
    try:
        watching = router_pb2_grpc.RouterStub(grpc.insecure_channel(f"127.0.0.1:{runtime.port}"))
        register_all(watching, server.adapters_root)
        probe = router_pb2.SelectAdapterRequest(prompt="Answer in the alpha style: what is rain?")
        assert watching.SelectAdapter(probe, timeout=60).selected_adapter_id == ""  # no cards
        cli_main(["router", "train", "--labels", str(tmp_path / "labels.jsonl"), "--out",
                  str(tmp_path / "head.pt"), "--holdout", "0.2"])
        out = capsys.readouterr().out
        assert "held-out (6 prompts): decision accuracy" in out, out
        metrics = TrainedHead.load(tmp_path / "head.pt").metrics
        assert metrics["train_accuracy"] >= 0.9 and metrics["heldout_rows"] == 6
        reply = watching.SelectAdapter(probe, timeout=60)  # reloaded, no restart
        assert reply.selected_adapter_id == "alpha" and "(head)" in reply.reason, (reply, out)
        served = watching.Generate(build_request("Reply the beta way, please: what is snow?",
                                                 adapter_id="auto", max_tokens=2), timeout=60)
        assert served.adapter_id == "beta"
        plain = watching.Generate(build_request("what is snow?", adapter_id="auto",
                                                max_tokens=2), timeout=60)
        assert plain.adapter_id == ""
    finally:
        server._call(runtime.stop(0))


@pytest.mark.smollm2
def test_demo_adapters_label_their_own_style(default_model_dir: Path, tmp_path: Path) -> None:
    """The labeling rule on the real model and the real demo adapters: a reference written in an
    adapter's style makes that adapter (alone) a positive; a plain answer makes none."""
    import asyncio

    from router.profiling import run_profile

    server = ServeThread(WorkerConfig(model=str(default_model_dir), port=0, num_threads=1,
                                      max_model_len=512, kv_cache_mb=64))
    try:
        demo = Path(__file__).resolve().parents[2] / "adapters" / "demo"
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(server.address))
        for name in ("shout", "json", "brief", "pirate"):
            stub.RegisterAdapter(types_pb2.RegisterAdapterRequest(
                adapter_id=name, path=str(demo / name)), timeout=60)
        answer = "The sky looks blue because air scatters blue sunlight more than red light."
        intended = {"Answer in capitals: why is the sky blue?": (answer.upper(), ["shout"]),
                    "Answer in JSON: why is the sky blue?": (json.dumps({"answer": answer}),
                                                             ["json"]),
                    "Like a pirate: why is the sky blue?": ("Arr matey! " + answer, ["pirate"]),
                    "Why is the sky blue?": (answer + " This is called Rayleigh scattering.", [])}
        write_jsonl(tmp_path / "data.jsonl", [
            {"messages": [{"role": "user", "content": p}], "reference": ref}
            for p, (ref, _) in intended.items()])
        labeled = asyncio.run(run_profile([server.worker_address], str(tmp_path / "data.jsonl"),
                                          str(tmp_path / "labels.jsonl")))
        assert {r["text"]: r["positives"] for r in labeled} == {
            p: positives for p, (_, positives) in intended.items()}
    finally:
        server.stop()


def test_cli_router_still_runs_the_router_and_has_profile_and_train() -> None:
    from edgelora.cli import build_parser

    parser = build_parser()
    plain = parser.parse_args(["router", "--port", "5", "--selector-margin", "0.2"])
    assert plain.func.__name__ == "_cmd_router" and plain.port == 5
    assert plain.selector_margin == 0.2
    before = parser.parse_args(["router", "--workers", "h:1", "profile", "--dataset", "d",
                                "--out", "o"])
    after = parser.parse_args(["router", "profile", "--workers", "h:2", "--dataset", "d",
                               "--out", "o"])
    assert before.func.__name__ == after.func.__name__ == "_cmd_router_profile"
    assert (before.workers, after.workers) == ("h:1", "h:2")
    train = parser.parse_args(["router", "train", "--labels", "l", "--out", "o"])
    assert train.func.__name__ == "_cmd_router_train" and train.holdout == 0.2

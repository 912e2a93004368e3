"""Router.ReportOutcome through real `edgelora router` and `edgelora worker` processes, with API
keys and a state dir: every response carries a request id; a tenant's rewards teach its "auto"
the rewarded one of two maths adapters; refusals for another tenant's, unknown, repeated or
out-of-range reports; the same over HTTP (/v1/outcomes with the completion's id); what was learned
survives a kill -9 of the router."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import pytest

from bench.selector_accuracy import DOMAINS, read_cards, read_rows
from edgelora.client import build_request, upload_messages
from edgelora.v1 import router_pb2, router_pb2_grpc
from tests.conftest import write_random_adapter
from tests.integration.test_registry_restart import RouterProcess
from tests.integration.test_worker_failover import WorkerProcess, free_port
from tests.metrics_samples import scrape, total
from tests.router.test_outcome_loop import TUTOR

KEYS = {"acme-key": "acme", "globex-key": "globex"}


def auth(tenant: str) -> tuple[tuple[str, str], ...]:
    key = next(k for k, t in KEYS.items() if t == tenant)
    return (("authorization", f"Bearer {key}"),)


def maths_prompts(path: Path) -> list[str]:
    return [r["prompt"] for r in read_rows(path) if r["adapter_id"] == "maths"]


@pytest.fixture()
def cluster(tiny_model_dir: Path, tmp_path: Path):
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": k, "tenant": t, "role": "tenant"}
                                         for k, t in KEYS.items()]}))
    worker = WorkerProcess(tiny_model_dir, free_port(), tmp_path / "worker.log")
    worker.start()
    worker.wait_ready()
    router = RouterProcess(worker, tmp_path / "state", tmp_path / "router.log")
    router.http_port = free_port()
    # explore nothing: the picks below are the learned ones
    router.command += ["--api-keys", str(keys), "--http-port", str(router.http_port),
                       "--outcome-exploration", "0"]
    try:
        router.start()
        stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(router.address))
        maths = read_cards(DOMAINS)["maths"]
        for seed, (name, card) in enumerate((("maths", maths), ("tutor", TUTOR))):
            header = router_pb2.UploadAdapterHeader(
                adapter_id=name, description=card.description,
                example_prompts=card.example_prompts)
            path = write_random_adapter(tmp_path / name, tiny_model_dir, rank=4, seed=seed)
            stub.UploadAdapter(upload_messages(path, header), metadata=auth("acme"), timeout=60)
        yield router, stub
    finally:
        router.stop()
        worker.stop()


def select(stub, prompts: list[str], tenant: str = "acme") -> list[str]:
    return [stub.SelectAdapter(router_pb2.SelectAdapterRequest(prompt=p), metadata=auth(tenant),
                               timeout=60).selected_adapter_id for p in prompts]


def code_of(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def report(stub, request_id: str, reward: float, tenant: str = "acme"):
    return stub.ReportOutcome(router_pb2.ReportOutcomeRequest(request_id=request_id,
                                                              reward=reward),
                              metadata=auth(tenant), timeout=60)


def post(url: str, body: dict, key: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_outcomes_teach_auto_per_tenant_and_survive_a_restart(cluster) -> None:
    router, stub = cluster
    train, new = maths_prompts(DOMAINS / "heldout2.jsonl"), maths_prompts(DOMAINS / "heldout.jsonl")
    before = select(stub, new)
    rewarded = min(("maths", "tutor"), key=before.count)  # the one the cards like less

    chunks = list(stub.GenerateStream(build_request(train[0], adapter_id="auto", max_tokens=4,
                                                    ignore_eos=True),
                                      metadata=auth("acme"), timeout=60))
    ids = {c.request_id for c in chunks}
    assert len(ids) == 1 and len(ids.pop()) >= 16, "every chunk names its request"
    first = chunks[0].request_id
    # refusals: another tenant's id does not exist for it; bad rewards; unknown ids
    assert code_of(lambda: report(stub, first, 1.0, "globex")) == grpc.StatusCode.NOT_FOUND
    for bad in (1.5, -0.1, math.nan, math.inf):
        assert code_of(lambda b=bad: report(stub, first, b)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: report(stub, "", 1.0)) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: report(stub, "no-such-id", 1.0)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: report(stub, first, 1.0)) == grpc.StatusCode.OK
    assert code_of(lambda: report(stub, first, 1.0)) == grpc.StatusCode.FAILED_PRECONDITION

    served = []
    for prompt in train * 2:  # the simulated client: 40 requests, each judged
        reply = stub.Generate(build_request(prompt, adapter_id="auto", max_tokens=1),
                              metadata=auth("acme"), timeout=60)
        served.append(reply.adapter_id)
        kept = report(stub, reply.request_id, float(reply.adapter_id == rewarded))
        assert kept.adapter_id == reply.adapter_id
    assert kept.reports_kept == 41
    after = select(stub, new)
    assert after.count(rewarded) >= 0.9 * len(new), (rewarded, before, after)

    # over HTTP: the completion's id is the request id
    status, body = post(f"http://127.0.0.1:{router.http_port}/v1/completions",
                        {"model": "auto", "prompt": new[0], "max_tokens": 2}, "acme-key")
    assert status == 200 and body["id"].startswith("cmpl-")
    url = f"http://127.0.0.1:{router.http_port}/v1/outcomes"
    assert post(url, {"request_id": body["id"], "reward": 1.0}, "globex-key")[0] == 404
    status, reply = post(url, {"request_id": body["id"], "reward": 1.0}, "acme-key")
    assert status == 200 and reply["model"] == body["model"] == rewarded
    assert reply["reports_kept"] == 42
    assert post(url, {"request_id": body["id"], "reward": 1.0}, "acme-key")[0] == 400
    assert post(url, {"request_id": body["id"], "reward": 2}, "acme-key")[0] == 400
    metrics = scrape(f"http://127.0.0.1:{router.http_port}/metrics")
    assert total(metrics, "edgelora_router_outcome_reports_total") == 42
    assert total(metrics, "edgelora_router_outcome_reward_total") == \
        served.count(rewarded) + 2  # the first report (1.0) and the HTTP one (1.0)

    router.kill()  # SIGKILL: what was learned is on disk already
    router.start()
    stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(router.address))
    assert select(stub, new) == after

"""The real llama-server built by bench/llamacpp/build.sh, with demo adapters converted by the
vendored converter: scales reset at start, per-request LoRA applied, exact token counts.
Slow (benchmark tooling): needs the ~13-minute build, so it is not part of `make test`."""

from __future__ import annotations

import asyncio
import json

import pytest

from bench.llamacpp import llamacpp_root
from bench.llamacpp.http_client import post_stream
from bench.llamacpp.server import LlamaServer, LlamaServerConfig, default_gguf

pytestmark = pytest.mark.slow

CHAT = "<|im_start|>user\nExplain how a rainbow forms.<|im_end|>\n<|im_start|>assistant\n"


async def _generate(url: str, lora: list[dict], n: int) -> tuple[str, int]:
    payload = {"prompt": CHAT, "n_predict": n, "temperature": 0.0, "stream": True, "lora": lora,
               "ignore_eos": True}
    text, last = "", {}
    async for event in post_stream(url, "/completion", payload, timeout_s=120.0):
        text += event.get("content", "")
        last = event
    return text, last["tokens_predicted"]


def test_demo_adapter_is_applied_per_request(default_model_dir) -> None:
    if not (llamacpp_root() / "bin" / "llama-server").is_file():
        pytest.skip("llama-server not built: run bench/llamacpp/build.sh")
    from bench.llamacpp.adapters import demo_adapters
    from bench.llamacpp.convert import convert_adapters

    demos = {a.name: a for a in demo_adapters()}
    loras = convert_adapters([demos["brief"].path, demos["shout"].path], default_model_dir)
    config = LlamaServerConfig(default_gguf(), tuple(loras), parallel=2, threads=1)
    with LlamaServer(config) as server:
        assert [a["scale"] for a in server.lora_adapters()] == [0.0, 0.0]
        base, base_n = asyncio.run(_generate(server.url, [], 40))
        shout, shout_n = asyncio.run(_generate(server.url, [{"id": 1, "scale": 1.0}], 40))
    letters = [c for c in shout if c.isalpha()]
    assert base_n == shout_n == 40
    assert sum(c.isupper() for c in letters) / len(letters) > 0.8, shout
    base_letters = [c for c in base if c.isalpha()]
    assert sum(c.isupper() for c in base_letters) / len(base_letters) < 0.3, json.dumps(base)

"""Iros's own time per response (x-iros-overhead-ms) at 8 concurrent, in front of llama.cpp on the same
cores: the default config (semantic cache on) and, in the same run, the semantic stage switched off."""

import asyncio
import statistics

import aiohttp

from iros.testing.iros import IrosProcess
from iros.testing.llama import LlamaServer

N, C = 64, 8


async def drive(url: str, tag: str) -> list[float]:
    out: list[float] = []
    sem = asyncio.Semaphore(C)
    async with aiohttp.ClientSession() as s:

        async def one(i: int) -> None:
            async with sem:
                body = {
                    "model": "smollm2",
                    "messages": [
                        {"role": "user", "content": f"{tag} question {i}: name a colour {i * 7919 % 1000}."}
                    ],
                    "max_tokens": 8,
                    "temperature": 0,
                }
                async with s.post(
                    f"{url}/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=300)
                ) as r:
                    await r.read()
                    assert r.status == 200, r.status
                    out.append(float(r.headers["x-iros-overhead-ms"]))

        await asyncio.gather(*(one(i) for i in range(N)))
    return out


async def ready(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(600):
            async with s.get(f"{url}/api/optimization/cache") as r:
                if (await r.json()).get("semantic_ready"):
                    return
            await asyncio.sleep(0.5)


with LlamaServer() as llama:
    for name, cache in (
        ("default (exact + semantic)", {"enabled": True}),
        ("semantic off", {"enabled": True, "semantic": False}),
    ):
        with IrosProcess.serve(
            {"auth": {"open": True}, "models": [llama.model_settings()], "cache": cache}
        ) as iros:
            if cache.get("semantic", True):
                asyncio.run(ready(iros.url))
            asyncio.run(drive(iros.url, "warm" + name))  # warm-up
            ms = asyncio.run(drive(iros.url, name))
            q = statistics.quantiles(ms, n=20)
            print(
                f"{name}: n={len(ms)} median {statistics.median(ms):.2f} ms  p95 {q[18]:.2f} ms  "
                f"mean {statistics.mean(ms):.2f} ms",
                flush=True,
            )

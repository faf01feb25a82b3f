"""`n` > 1: each choice is its own sequence, sent as its own request through the router.

The fan-out is here, in front of the router, rather than in the worker: a choice is then an
ordinary request (the worker's API, engine and stop/detokenize path stay one sequence per
request), the router's policy may place the n sequences on different replicas, and a
failure or cancellation is handled per request as for any other. The cost is that the
prompt is prefilled n times (the engine has no prefix cache to share it anyway).

Choice i samples with a seed derived from the request's (choice 0 keeps it, so n=1 and
choice 0 of n draw the same tokens); greedy choices are identical.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

from exegpt.errors import ErrorCode, RequestError
from exegpt.generation import GenerationChunk, GenerationRequest
from services.router.router import Router

_SEED_STRIDE = 0x9E3779B97F4A7C15
logger = logging.getLogger(__name__)


def fan_out(generation: GenerationRequest, n: int) -> list[GenerationRequest]:
    if n == 1:
        return [generation]
    seed = generation.sampling.seed
    return [
        replace(
            generation,
            request_id=f"{generation.request_id}-{index}",
            sampling=replace(
                generation.sampling,
                seed=None if seed is None else (seed + index * _SEED_STRIDE) % 2**63,
            ),
        )
        for index in range(n)
    ]


async def generate_all(
    router: Router, generations: list[GenerationRequest]
) -> list[GenerationChunk]:
    """Every choice's whole generation; the first failure cancels the others and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(router.generate(g)) for g in generations]
    except* RequestError as failures:
        raise failures.exceptions[0] from None
    return [task.result() for task in tasks]


async def stream_all(
    router: Router, generations: list[GenerationRequest]
) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """The choices' chunks as they come, interleaved, each with its choice index. The first
    failure is raised; closing the iterator cancels every choice still running."""
    queue: asyncio.Queue[tuple[int, GenerationChunk | RequestError | None]] = asyncio.Queue()

    async def pump(index: int, generation: GenerationRequest) -> None:
        try:
            async with contextlib.aclosing(router.generate_stream(generation)) as stream:
                async for chunk in stream:
                    queue.put_nowait((index, chunk))
        except RequestError as exc:
            queue.put_nowait((index, exc))
        except Exception as exc:  # a bug, not the request's fault: still never an empty stream
            logger.exception("choice %d of %s failed", index, generation.request_id)
            message = f"the generation failed ({type(exc).__name__}: {exc})"
            queue.put_nowait((index, RequestError(ErrorCode.INTERNAL, message)))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        running = len(tasks)
        while running:
            index, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, RequestError):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

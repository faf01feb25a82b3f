"""Time the model's building blocks: attention and the rest of each layer, per TP degree.

At every point of the attention grid a whole forward of the real model (TP 1) is timed
(`forwards.py`), and a probe step (`probe.py`) records what each layer receives in that
forward; the recorded inputs are replayed through rank 0's shard of the real layers
(`layer_work.py`). The profile's per-forward overhead is the whole forward minus the parts
(exegpt/profile/layer_profile.py): the outside work (index building, masks, embedding, head)
and whatever running the layers inside a forward costs beyond running them in a loop (on a
CPU, partly caches the rest of the model evicted).

The parts:

- attention at (batch, length): the whole layer minus the rest of it at that point, both
  timed back to back over every layer of the stack (T5 decode: split between self and cross
  attention in proportion to their kernels timed alone);
- rest over tokens: everything else in the layer (norms, projections, feed-forward), timed
  over a loop through every layer of the stack so weights stream through the caches as in a
  forward;
- T5's cross K/V write over encoder tokens.

Every Linear timed runs as serving runs it: packed for oneDNN in bfloat16 on a CPU
(exegpt/models/prepack.py), and the profile records that kernel.

Each TP degree runs with `threads // tp` torch threads: the threads one rank would have.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
from torch import Tensor

from exegpt.models.kv_cache import KVCacheSpec, blocks_for
from exegpt.models.loader import LoadedModel
from exegpt.models.prepack import linear_kernel, pack_linears
from exegpt.models.tensor_parallel import Layer, shard_layer
from services.profiler.measure.forwards import (
    ForwardPoint,
    WholeForwards,
    blocks_for_points,
    decode,
    prefill,
)
from services.profiler.measure.grid import ProfileGrid
from services.profiler.measure.layer_work import (
    MAX_KV_STORE_BYTES,
    ShardSet,
    Work,
    cross_kv_work,
    decode_kernel_works,
    encode_kernel_work,
    in_layer_attention,
    kv_store,
    rest_work,
    stack_work,
)
from services.profiler.measure.probe import LayerCall, Probe
from services.profiler.measure.timing import (
    CacheFlusher,
    Series,
    Timer,
    TimingStats,
    last_level_cache_bytes,
)

T = TypeVar("T")
StepCallback = Callable[[str], None]  # called after each measured point with the stage name
COMPUTE_SERIES = (
    "encode_attention",
    "encode_rest",
    "cross_kv_write",
    "decode_self_attention",
    "decode_cross_attention",
    "decode_rest",
)


@contextlib.contextmanager
def torch_threads(num_threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _should_flush(loaded: LoadedModel, flush_cache: bool | None) -> bool:
    if loaded.device.type != "cpu":
        return False
    if flush_cache is not None:
        return flush_cache
    weight_bytes = sum(p.numel() * p.element_size() for p in loaded.model.parameters())
    return weight_bytes > last_level_cache_bytes()


def spread_evenly(lists: list[list[T]]) -> list[T]:
    """The items of every list, merged so that each list's items are spread evenly over the
    whole (by their fractional position in their own list), each list's order kept."""
    keyed = [
        ((index + 0.5) / len(items), which, item)
        for which, items in enumerate(lists)
        for index, item in enumerate(items)
    ]
    return [item for _, _, item in sorted(keyed, key=lambda entry: entry[:2])]


@dataclass
class LayerMeasurements:
    compute: dict[int, dict[str, Series]] = field(default_factory=dict)  # tp -> name -> series
    prefill_whole: Series = field(default_factory=Series)  # whole prefill over (B, S)
    decode_whole: Series = field(default_factory=Series)  # whole decode step over (B, L)
    embedding: Series = field(default_factory=Series)
    lm_head: Series = field(default_factory=Series)


class LayerProfiler:
    def __init__(
        self,
        loaded: LoadedModel,
        grid: ProfileGrid,
        tp_degrees: tuple[int, ...],
        num_threads: int,
        block_size_tokens: int = 16,
    ) -> None:
        self.loaded = loaded
        self.config = loaded.config
        self.grid = grid
        self.flush_cache = _should_flush(loaded, grid.flush_cache)
        grid_timer = functools.partial(
            Timer,
            loaded.device,
            grid.num_warmup,
            grid.num_repeats,
            max_time_s=grid.max_measure_s,
            min_sample_s=grid.min_sample_s,
        )
        self.timer = grid_timer(before_repeat=CacheFlusher() if self.flush_cache else None)
        # A whole forward streams the whole model through the caches by itself: no flushing.
        self.forward_timer = grid_timer()
        self.num_threads = num_threads
        self.tp_degrees = tp_degrees
        self._kernels: dict[tuple[object, ...], TimingStats] = {}
        self.encode_points = grid.encode_points(self.config.num_heads)
        self.decode_points = grid.decode_points()
        steps = [prefill(b, s) for b, s in self.encode_points]
        steps += [decode(b, kv, kv) for b, kv in self.decode_points]  # T5: cross length = kv
        num_blocks = max(
            blocks_for_points(steps, block_size_tokens, self.config.is_encoder_decoder),
            blocks_for(max(grid.num_tokens), block_size_tokens),
        )
        self.probe = Probe(loaded, num_blocks, block_size_tokens)
        self.whole = WholeForwards(loaded, steps, max_kv_bytes=MAX_KV_STORE_BYTES)
        self.shards = {tp: self._shard_set(tp, num_blocks, block_size_tokens) for tp in tp_degrees}
        self.linear_kernel = self._pack_as_served()

    def _pack_as_served(self) -> str:
        """Pack the Linears of everything timed as a serving worker packs its model
        (`pack_linears`): a bf16 profile prices the kernels serving runs. The shards were cut
        from the plain weights first. Returns the kernel the Linears now run."""
        pack_linears(self.loaded.model)  # whole forwards, the probe, TP 1's layers
        for shards in self.shards.values():  # TP > 1: copies cut from the model's weights
            for layer in (*shards.encode_layers, *shards.decode_layers):
                pack_linears(layer)
        return linear_kernel(self.loaded.dtype, self.loaded.device)

    def _shard_set(self, tp_degree: int, num_blocks: int, block_size_tokens: int) -> ShardSet:
        model, config = self.loaded.model, self.config
        decoders: list[Layer] = list(model.decoder_layers)
        encoders: list[Layer] = list(model.encoder_layers) if config.is_encoder_decoder else []
        if tp_degree > 1:
            decoders = [shard_layer(layer, config, 0, tp_degree) for layer in decoders]
            encoders = [shard_layer(layer, config, 0, tp_degree) for layer in encoders]
        spec = KVCacheSpec(
            config.num_kv_layers,
            config.num_kv_heads // tp_degree,
            config.head_dim,
            self.loaded.dtype,
        )
        # Each degree's share of the budget is in proportion to its store (1/tp of TP 1's).
        share = (1 / tp_degree) / sum(1 / degree for degree in self.tp_degrees)
        budget_bytes = int(MAX_KV_STORE_BYTES * share)
        return ShardSet(
            tp_degree=tp_degree,
            num_threads=max(1, self.num_threads // tp_degree),
            encode_layers=encoders if config.is_encoder_decoder else decoders,
            decode_layers=decoders,
            kv=kv_store(spec, num_blocks, block_size_tokens, self.loaded.device, budget_bytes),
            is_encoder_decoder=config.is_encoder_decoder,
        )

    def timers(self) -> tuple[Timer, ...]:
        return self.timer, self.forward_timer

    def num_steps(self) -> int:
        num_sizes = len(self.grid.num_tokens)
        per_round = (
            len(self.encode_points)
            + len(self.decode_points)
            + len(self.shards) * num_sizes
            + num_sizes
        )
        return per_round * self.grid.num_rounds

    @torch.inference_mode()
    def run(self, on_step: StepCallback) -> LayerMeasurements:
        result = LayerMeasurements()
        for tp in self.shards:
            result.compute[tp] = {name: Series() for name in COMPUTE_SERIES}
        num_rounds = self.grid.num_rounds
        for round_index in range(num_rounds):
            suffix = f" (round {round_index + 1} of {num_rounds})" if num_rounds > 1 else ""
            self._round(result, lambda stage, s=suffix: on_step(stage + s))
        return result

    def _round(self, result: LayerMeasurements, on_step: StepCallback) -> None:
        """Every point once, the kinds of measurement spread evenly over the round: a whole
        forward and the parts subtracted from it should see the same spells of a shared
        machine, not one kind the first half of the round and another kind the second."""
        step = functools.partial
        kinds: list[list[tuple[str, Callable[[], None]]]] = [
            [
                ("encode attention", step(self._encode_point, b, s, result))
                for b, s in self.encode_points
            ],
            [
                ("decode attention", step(self._decode_point, b, kv, result))
                for b, kv in self.decode_points
            ],
        ]
        for shards in self.shards.values():
            stage = f"rest of layer, TP {shards.tp_degree}"
            series = result.compute[shards.tp_degree]
            kinds.append(
                [(stage, step(self._rest_point, shards, n, series)) for n in self.grid.num_tokens]
            )
        kinds.append(
            [
                ("embedding and LM head", step(self._embedding_point, n, result))
                for n in self.grid.num_tokens
            ]
        )
        for stage, measure in spread_evenly(kinds):
            measure()
            on_step(stage)

    def _measure(self, work: Callable[[], object], stack: list[Layer]) -> TimingStats:
        """Time a loop over the stack, per layer."""
        return self.timer.measure(work, divide_by=len(stack))

    def _kernel(
        self, key: tuple[object, ...], work: Callable[[], Work], stack: list[Layer]
    ) -> TimingStats:
        """An attention kernel timed alone, once per run: it only bounds the in-layer time
        from below and splits T5's decode attention, so later rounds reuse it."""
        if key not in self._kernels:
            self._kernels[key] = self._measure(work(), stack)
        return self._kernels[key]

    # ---- attention (and the per-forward overhead around it) ---------------------------------

    def _encode_point(self, batch: int, seq_len: int, result: LayerMeasurements) -> None:
        self._whole_forward(prefill(batch, seq_len), result.prefill_whole)
        self.probe.steps.prefill_step(batch, seq_len)()  # records the layers' inputs
        kind = "encoder" if self.config.is_encoder_decoder else "decoder"
        call = self.probe.recorded(kind)
        for tp, shards in self.shards.items():
            stack = shards.encode_layers
            with torch_threads(shards.num_threads):
                build = functools.partial(encode_kernel_work, shards, call)
                kernel = self._kernel(("encode", tp, batch, seq_len), build, stack)
                whole = self._measure(stack_work(shards, call, decode=False), stack)
                rest = self._measure(rest_work(shards, call.x, False, self._rope(call)), stack)
            stats = in_layer_attention(whole, rest, kernel)
            result.compute[tp]["encode_attention"].add((batch, seq_len), stats)

    def _decode_point(self, batch: int, kv_len: int, result: LayerMeasurements) -> None:
        self._whole_forward(decode(batch, kv_len, kv_len), result.decode_whole)
        seqs = self.probe.steps.decode_sequences(batch, kv_len, kv_len)
        try:
            self.probe.steps.decode_step(seqs)()  # records the layers' inputs
            call = self.probe.recorded("decoder")
            for tp, shards in self.shards.items():
                with torch_threads(shards.num_threads):
                    self._decode_attention(shards, call, (batch, kv_len), result.compute[tp])
        finally:
            self.probe.steps.release(seqs)

    def _whole_forward(self, point: ForwardPoint, series: Series) -> None:
        """Past the K/V budget no whole forward is timed: its overhead is extrapolated."""
        if self.whole.covers(point):
            length = point.prompt_tokens if point.kind == "prefill" else point.kv_len_tokens
            stats = self.whole.measure(self.forward_timer, point)
            series.add((point.batch_size, length), stats)

    def _decode_attention(
        self, shards: ShardSet, call: LayerCall, point: tuple[int, int], series: dict[str, Series]
    ) -> None:
        stack = shards.decode_layers
        self_work, cross_work = decode_kernel_works(shards, call)
        key = (shards.tp_degree, *point)
        self_kernel = self._kernel(("self", *key), lambda: self_work, stack)
        cross_kernel = None
        if cross_work is not None:
            cross_kernel = self._kernel(("cross", *key), lambda: cross_work, stack)
        whole = self._measure(stack_work(shards, call, decode=True), stack)
        rest = self._measure(rest_work(shards, call.x, True, self._rope(call)), stack)
        if cross_kernel is None:
            series["decode_self_attention"].add(point, in_layer_attention(whole, rest, self_kernel))
            return
        both = self_kernel.plus(cross_kernel)
        attention = in_layer_attention(whole, rest, both)
        self_share = self_kernel.median_s / both.median_s if both.median_s > 0 else 0.5
        series["decode_self_attention"].add(point, attention.scaled(self_share))
        series["decode_cross_attention"].add(point, attention.scaled(1.0 - self_share))

    def _rope(self, call: LayerCall) -> tuple[Tensor, Tensor] | None:
        """Llama: the rotary tables the recorded call carried (T5 has none)."""
        return None if self.config.is_encoder_decoder else call.meta.rope

    # ---- rest of the layer, T5 cross K/V, embedding and head ---------------------------------

    def _rope_tables(self, x: Tensor) -> tuple[Tensor, Tensor] | None:
        """Rotary tables for a Llama rest-of-layer call on x [B, T, d] (T5 needs none)."""
        if self.config.is_encoder_decoder:
            return None
        batch, num_tokens = x.shape[:2]
        positions = torch.arange(num_tokens, device=x.device)[None].expand(batch, -1)
        return self.loaded.model.rope(positions)

    def _tokens(self, batch: int, num_tokens: int) -> Tensor:
        ids = self.probe.steps.prompts(batch, num_tokens)
        return torch.tensor(ids, dtype=torch.long, device=self.loaded.device)

    def _rest_point(self, shards: ShardSet, num_tokens: int, series: dict[str, Series]) -> None:
        embed = self.loaded.model.embed
        with torch_threads(shards.num_threads):
            encode_x = embed(self._tokens(1, num_tokens))  # [1, T, d_model]
            decode_x = embed(self._tokens(num_tokens, 1))  # [B = T, 1, d_model]
            for name, x, decode in (
                ("encode_rest", encode_x, False),
                ("decode_rest", decode_x, True),
            ):
                stack = shards.decode_layers if decode else shards.encode_layers
                work = rest_work(shards, x, decode, self._rope_tables(x))
                series[name].add((num_tokens,), self._measure(work, stack))
            if self.config.is_encoder_decoder:
                stats = self._measure(cross_kv_work(shards, encode_x), shards.decode_layers)
                series["cross_kv_write"].add((num_tokens,), stats)

    def _embedding_point(self, num_tokens: int, result: LayerMeasurements) -> None:
        model = self.loaded.model
        tokens = self._tokens(1, num_tokens)
        result.embedding.add((num_tokens,), self.timer.measure(lambda: model.embed(tokens)))
        hidden = model.embed(tokens)[0]  # [T, d_model]
        result.lm_head.add((num_tokens,), self.timer.measure(lambda: model.logits(hidden)))

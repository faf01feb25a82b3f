"""The pipeline's control plane: the gRPC stubs of every stage rank, and loading a placement.

Loading asks every rank where it receives data (Describe), then loads each with its layer
range, TP rank and next hops (Load) under a fresh load id; a TP group's ranks load together,
since they join one process group.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import grpc

from exegpt.placement import Placement
from exegpt.security import SecurityConfig, sync_channel
from exegpt.v1 import stage_pb2, stage_pb2_grpc
from services.worker.executor.routes import next_hops


@dataclass(frozen=True)
class PipelineConfig:
    model: str
    dtype: str
    placement: Placement
    # gRPC address of every TP rank of every stage, in placement order.
    stage_addresses: tuple[tuple[str, ...], ...]
    num_blocks: int
    block_size_tokens: int
    data_host: str = "127.0.0.1"
    step_timeout_s: float = 30.0
    health_interval_s: float = 0.5
    health_timeout_s: float = 2.0
    load_timeout_s: float = 120.0
    # API key and TLS of the gRPC control calls to the stages.
    security: SecurityConfig = field(default_factory=SecurityConfig)


class PipelineError(ConnectionError):
    """The stages could not be reached or loaded (the replica cannot start)."""


@dataclass(frozen=True)
class LoadedPlacement:
    load_id: str
    # The data address of every TP rank of every stage, in placement order.
    data: list[list[str]]


class StageControl:
    """gRPC stubs to every TP rank of every stage, grouped as the placement groups them."""

    def __init__(self, config: PipelineConfig) -> None:
        self._channels = [
            sync_channel(address, config.security)
            for ranks in config.stage_addresses
            for address in ranks
        ]
        flat = [stage_pb2_grpc.StageStub(channel) for channel in self._channels]
        self._stubs = _grouped(flat, [len(ranks) for ranks in config.stage_addresses])

    def regroup(self, placement: Placement) -> None:
        """Group the same ranks by `placement`'s TP degrees (a redeploy)."""
        flat = [stub for ranks in self._stubs for stub in ranks]
        self._stubs = _grouped(flat, [stage.tp_degree for stage in placement.stages])

    def describe(self, timeout_s: float) -> list[list[stage_pb2.StageInfo]]:
        """Every rank's StageInfo (raises grpc.RpcError if one does not answer)."""
        request = stage_pb2.DescribeStageRequest()
        return [
            [stub.Describe(request, timeout=timeout_s) for stub in ranks] for ranks in self._stubs
        ]

    def load(self, config: PipelineConfig, engine_address: str) -> LoadedPlacement:
        """Load `config.placement` on every rank (PipelineError if one refuses)."""
        infos = self.describe(config.health_timeout_s)
        data = [[info.data_address for info in ranks] for ranks in infos]
        load_id = uuid.uuid4().hex
        requests = _load_requests(config, infos, data, engine_address, load_id)
        calls = [
            (self._stubs[i][r], requests[i][r])
            for i in range(len(requests))
            for r in range(len(requests[i]))
        ]
        with ThreadPoolExecutor(len(calls)) as pool:  # a TP group's ranks must join together
            futures = [
                pool.submit(stub.Load, request, timeout=config.load_timeout_s)
                for stub, request in calls
            ]
            for future in futures:
                try:
                    future.result()
                except grpc.RpcError as exc:
                    raise PipelineError(f"a stage failed to load: {exc.details()}") from None
        return LoadedPlacement(load_id, data)

    def close(self) -> None:
        for channel in self._channels:
            channel.close()


def _grouped(flat: list, sizes: list[int]) -> list[list]:
    groups, start = [], 0
    for size in sizes:
        groups.append(flat[start : start + size])
        start += size
    return groups


def _load_requests(
    config: PipelineConfig,
    infos: list[list[stage_pb2.StageInfo]],
    data: list[list[str]],
    engine_address: str,
    load_id: str,
) -> list[list[stage_pb2.LoadStageRequest]]:
    """One LoadStageRequest per TP rank of every stage."""
    placement = config.placement
    hops = next_hops(placement, data, engine_address)
    requests = []
    for index, stage in enumerate(placement.stages):
        host = config.stage_addresses[index][0].rsplit(":", 1)[0]
        tp_init = f"tcp://{host}:{infos[index][0].free_port}" if stage.tp_degree > 1 else ""
        after_encoder, after_decoder = hops[index]
        requests.append(
            [
                stage_pb2.LoadStageRequest(
                    model=config.model,
                    encoder_start=stage.encoder_layers.start,
                    encoder_stop=stage.encoder_layers.stop,
                    decoder_start=stage.decoder_layers.start,
                    decoder_stop=stage.decoder_layers.stop,
                    tp_rank=rank,
                    tp_degree=stage.tp_degree,
                    tp_init_method=tp_init,
                    num_kv_blocks=config.num_blocks,
                    kv_block_size_tokens=config.block_size_tokens,
                    next_after_encoder=after_encoder,
                    next_after_decoder=after_decoder,
                    dtype=config.dtype,
                    load_id=load_id,
                    engine_address=engine_address,
                    role="" if stage.role == "both" else stage.role,
                )
                for rank in range(stage.tp_degree)
            ]
        )
    return requests

"""Where a replica's layers live: its pipeline stages, each a layer range at a TP degree.

A placement is always ONE replica's. A schedule of R data-parallel replicas
(`Schedule.num_replicas`) on N devices runs R replicas of the same placement, each on N / R
devices; the simulator lays out one replica (`placement_from_layout`) and the launcher starts
R of it.

A placement is configuration (`exegpt up --pipeline-stages N --tensor-parallel T`, or
`--placement FILE`), checked against the model before anything starts. The stages holding
encoder layers, in order, form the encoder pass; those holding decoder layers form the
decoder pass (prefill and decode). RRA gives every stage a slice of both stacks; an
encode/decode split (WAA) gives some stages only encoder layers and the others only decoder
layers.

A decoder-only model splits into a prefill group and a decode group by role: the prefill
stages hold a copy of the decoder layers and hand each layer's prefill KV to the decode stage
that owns that layer.

A placement file is JSON:

    {"stages": [
      {"encoder_layers": [0, 4], "decoder_layers": [0, 0], "tp_degree": 1, "device": "cpu"},
      {"encoder_layers": [0, 0], "decoder_layers": [0, 4], "tp_degree": 2}
    ]}

(`"role": "prefill"` or `"decode"` on each stage of a decoder-only split.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from exegpt.models.config import ModelConfig
from exegpt.models.stage_spec import LayerRange, StageSpec
from exegpt.models.tensor_parallel import check_tp_degree

MAX_STAGES = 64
ROLES = ("both", "prefill", "decode")


@dataclass(frozen=True)
class StagePlacement:
    encoder_layers: LayerRange
    decoder_layers: LayerRange
    tp_degree: int = 1
    device: str = "cpu"
    role: str = "both"  # decoder-only splits: "prefill" or "decode"

    def spec(self, tp_rank: int) -> StageSpec:
        return StageSpec(self.encoder_layers, self.decoder_layers, tp_rank, self.tp_degree)


@dataclass(frozen=True)
class Placement:
    stages: tuple[StagePlacement, ...]

    @property
    def num_processes(self) -> int:
        return sum(stage.tp_degree for stage in self.stages)

    def encoder_route(self) -> list[int]:
        """Indices of the stages of the encoder pass, in order."""
        return [i for i, s in enumerate(self.stages) if len(s.encoder_layers)]

    def prefill_route(self) -> list[int]:
        """Stages that run decoder layers for prefills, in order."""
        return [
            i for i, s in enumerate(self.stages) if len(s.decoder_layers) and s.role != "decode"
        ]

    def decoder_route(self) -> list[int]:
        """Stages that run decoder layers for decode steps (and keep their KV), in order."""
        return [
            i for i, s in enumerate(self.stages) if len(s.decoder_layers) and s.role != "prefill"
        ]

    @property
    def splits_prefill(self) -> bool:
        return any(s.role != "both" for s in self.stages)

    def check(self, config: ModelConfig) -> None:
        """Raise ValueError unless the stages cover each stack once, in order."""
        if not 1 <= len(self.stages) <= MAX_STAGES:
            raise ValueError(f"a placement needs 1 to {MAX_STAGES} stages, got {len(self.stages)}")
        for index, stage in enumerate(self.stages):
            try:
                stage.spec(0).check(config)
                check_tp_degree(config, stage.tp_degree)
            except ValueError as exc:
                raise ValueError(f"stage {index}: {exc}") from None
        self._check_roles(config)
        decoders = [self.stages[i].decoder_layers for i in self.decoder_route()]
        stacks = [
            ("encoder", [s.encoder_layers for s in self.stages], config.num_encoder_layers),
            ("decoder", decoders, config.num_decoder_layers),
        ]
        if self.splits_prefill:
            prefills = [self.stages[i].decoder_layers for i in self.prefill_route()]
            stacks.append(("prefill", prefills, config.num_decoder_layers))
        for name, ranges, num_layers in stacks:
            held = [r for r in ranges if len(r)]
            expected = 0
            for layer_range in held:
                if layer_range.start != expected:
                    raise ValueError(
                        f"{name} layers must be split into contiguous ranges in stage order: "
                        f"a stage starts at {layer_range.start}, expected {expected}"
                    )
                expected = layer_range.stop
            if expected != num_layers:
                raise ValueError(f"the stages hold {expected} of the {num_layers} {name} layers")

    def _check_roles(self, config: ModelConfig) -> None:
        roles = {s.role for s in self.stages}
        if not roles <= set(ROLES):
            raise ValueError(f"stage roles must be among {ROLES}, got {sorted(roles)}")
        if not self.splits_prefill:
            return
        if config.is_encoder_decoder:
            raise ValueError(
                "roles are for decoder-only models; an encoder-decoder model splits by "
                "giving some stages only encoder layers"
            )
        if roles != {"prefill", "decode"}:
            raise ValueError("a prefill/decode split gives every stage the role prefill or decode")
        if any(s.role == "prefill" and s.tp_degree > 1 for s in self.stages):
            raise ValueError("prefill-group stages run at TP 1 (they hand off whole-head KV)")

    @classmethod
    def even(cls, config: ModelConfig, num_stages: int, tp_degree: int = 1) -> Placement:
        """Every stage gets an even share of each stack (RRA's layout; the first stages take
        one more layer when the count does not divide)."""
        if num_stages < 1:
            raise ValueError(f"--pipeline-stages must be >= 1, got {num_stages}")
        if num_stages > config.num_decoder_layers:
            raise ValueError(
                f"{num_stages} stages for {config.num_decoder_layers} decoder layers: "
                "every stage needs at least one"
            )
        encoders = _split(config.num_encoder_layers, num_stages)
        decoders = _split(config.num_decoder_layers, num_stages)
        placement = cls(
            tuple(
                StagePlacement(enc, dec, tp_degree)
                for enc, dec in zip(encoders, decoders, strict=True)
            )
        )
        placement.check(config)
        return placement

    @classmethod
    def from_json(cls, text: str) -> Placement:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a placement: {exc}") from None
        return cls.from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {
            "stages": [
                {
                    "encoder_layers": [s.encoder_layers.start, s.encoder_layers.stop],
                    "decoder_layers": [s.decoder_layers.start, s.decoder_layers.stop],
                    "tp_degree": s.tp_degree,
                    "device": s.device,
                    "role": s.role,
                }
                for s in self.stages
            ]
        }

    @classmethod
    def from_dict(cls, data: Any) -> Placement:
        try:
            return cls(tuple(_stage_from_json(item) for item in data["stages"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"not a placement: {exc}") from None


@dataclass(frozen=True)
class Stage:
    """A stage as the simulator lays it out: its devices (one, or a TP group of
    `tp_degree`) and how many layers of each stack it holds."""

    devices: tuple[int, ...]
    tp_degree: int
    num_encode_layers: int
    num_decode_layers: int


def split_layers(num_layers: int, per_layer_s: list[float]) -> list[int]:
    """Whole layers per stage minimising the slowest stage (greedy is optimal here: each layer
    goes where it finishes earliest; ties go to the earlier stage, so equal costs split evenly
    with the remainder at the front). Every stage gets at least one layer when there are
    enough: a device that holds none would sit idle, which is not the allocation the schedule
    names (a slow TP group would otherwise be handed nothing)."""
    counts = [1 if num_layers >= len(per_layer_s) else 0] * len(per_layer_s)
    for _ in range(num_layers - sum(counts)):
        best = min(range(len(counts)), key=lambda i: ((counts[i] + 1) * per_layer_s[i], i))
        counts[best] += 1
    return counts


def stage_groups(
    first_device: int, num_devices: int, tp_degree: int, num_tp_devices: int
) -> list[tuple[tuple[int, ...], int]]:
    """(devices, tp degree) of each stage: TP groups first, then single devices."""
    groups: list[tuple[tuple[int, ...], int]] = []
    device = first_device
    for _ in range(num_tp_devices // tp_degree if tp_degree > 1 else 0):
        groups.append((tuple(range(device, device + tp_degree)), tp_degree))
        device += tp_degree
    groups.extend(((d,), 1) for d in range(device, first_device + num_devices))
    return groups


def build_stages(
    groups: list[tuple[tuple[int, ...], int]],
    num_encode_layers: int,
    encode_cost_s: list[float],
    num_decode_layers: int,
    decode_cost_s: list[float],
    *,
    shared_layers: bool,
) -> list[Stage]:
    """Divide layers over stages. `shared_layers`: the encode layers are the decode layers
    (decoder-only prefill), so one split serves both, balanced on their summed cost."""
    if shared_layers:
        combined = [e + d for e, d in zip(encode_cost_s, decode_cost_s, strict=True)]
        decode_counts = split_layers(num_decode_layers, combined)
        encode_counts = decode_counts
    else:
        encode_counts = split_layers(num_encode_layers, encode_cost_s)
        decode_counts = split_layers(num_decode_layers, decode_cost_s)
    return [
        Stage(devices, tp, num_enc, num_dec)
        for (devices, tp), num_enc, num_dec in zip(
            groups, encode_counts, decode_counts, strict=True
        )
    ]


def placement_from_layout(
    stages: list[Stage], *, is_encoder_decoder: bool, num_encode_stages: int = 0
) -> Placement:
    """The placement a simulated layout describes: layer counts become contiguous ranges in
    stage order. The first `num_encode_stages` stages only encode (WAA): T5 gives them the
    encoder, a decoder-only model a copy of its layers for prefills (role "prefill")."""
    placed: list[StagePlacement] = []
    next_encoder = next_decoder = next_prefill = 0
    for index, stage in enumerate(stages):
        encoder = decoder = LayerRange()
        role = "both"
        if index < num_encode_stages and not is_encoder_decoder:
            decoder = _take(next_prefill, stage.num_encode_layers)
            next_prefill += stage.num_encode_layers
            role = "prefill"
        else:
            if is_encoder_decoder:
                encoder = _take(next_encoder, stage.num_encode_layers)
                next_encoder += stage.num_encode_layers
            decoder = _take(next_decoder, stage.num_decode_layers)
            next_decoder += stage.num_decode_layers
            if num_encode_stages and not is_encoder_decoder:
                role = "decode"
        placed.append(StagePlacement(encoder, decoder, stage.tp_degree, role=role))
    return Placement(tuple(placed))


def _take(start: int, count: int) -> LayerRange:
    return LayerRange(start, start + count) if count else LayerRange()


def _split(num_layers: int, num_parts: int) -> list[LayerRange]:
    base, extra = divmod(num_layers, num_parts)
    ranges, start = [], 0
    for part in range(num_parts):
        stop = start + base + (1 if part < extra else 0)
        ranges.append(LayerRange(start, stop))
        start = stop
    return ranges


def _stage_from_json(item: Any) -> StagePlacement:
    if not isinstance(item, dict):
        raise TypeError("each stage must be an object")
    unknown = set(item) - {"encoder_layers", "decoder_layers", "tp_degree", "device", "role"}
    if unknown:
        raise ValueError(f"unknown stage fields {sorted(unknown)}")

    def layers(name: str) -> LayerRange:
        value = item.get(name, [0, 0])
        if not (isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value)):
            raise TypeError(f"{name} must be [start, stop] integers")
        return LayerRange(value[0], value[1])

    tp_degree = item.get("tp_degree", 1)
    device = item.get("device", "cpu")
    role = item.get("role", "both")
    if type(tp_degree) is not int or not isinstance(device, str) or not isinstance(role, str):
        raise TypeError("tp_degree must be an integer, device and role strings")
    encoder, decoder = layers("encoder_layers"), layers("decoder_layers")
    return StagePlacement(encoder, decoder, tp_degree, device, role)

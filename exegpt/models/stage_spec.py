"""What one pipeline stage holds: a contiguous range of encoder and of decoder layers, and its
rank in a tensor-parallel group. Pure data, shared by the placement, the executor and the
stage processes.

A T5 stage may hold a slice of the encoder and a slice of the decoder (RRA places them so);
a Llama stage holds a slice of the decoder layers, which serve prefill and decode alike. A
stage that holds the first layer of a pass embeds its tokens; the stage that holds the last
decoder layer applies the final norm and the LM head and samples.
"""

from __future__ import annotations

from dataclasses import dataclass

from exegpt.models.config import ModelConfig


@dataclass(frozen=True)
class LayerRange:
    """Layers [start, stop) of one stack."""

    start: int = 0
    stop: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.stop:
            raise ValueError(f"bad layer range [{self.start}, {self.stop})")

    def __len__(self) -> int:
        return self.stop - self.start

    def as_slice(self) -> slice:
        return slice(self.start, self.stop)

    def __str__(self) -> str:
        return f"[{self.start}, {self.stop})" if len(self) else "none"


@dataclass(frozen=True)
class StageSpec:
    encoder_layers: LayerRange = LayerRange()
    decoder_layers: LayerRange = LayerRange()
    tp_rank: int = 0
    tp_degree: int = 1

    def check(self, config: ModelConfig) -> None:
        """Raise ValueError unless this stage fits the model."""
        if self.encoder_layers.stop > config.num_encoder_layers:
            raise ValueError(
                f"encoder layers {self.encoder_layers} exceed the model's "
                f"{config.num_encoder_layers}"
            )
        if self.decoder_layers.stop > config.num_decoder_layers:
            raise ValueError(
                f"decoder layers {self.decoder_layers} exceed the model's "
                f"{config.num_decoder_layers}"
            )
        if not (len(self.encoder_layers) or len(self.decoder_layers)):
            raise ValueError("a stage must hold at least one layer")
        if not 0 <= self.tp_rank < self.tp_degree:
            raise ValueError(f"TP rank {self.tp_rank} is outside a group of {self.tp_degree}")

    def embeds_encoder(self) -> bool:
        return len(self.encoder_layers) > 0 and self.encoder_layers.start == 0

    def ends_encoder(self, config: ModelConfig) -> bool:
        layers = self.encoder_layers
        return len(layers) > 0 and layers.stop == config.num_encoder_layers

    def embeds_decoder(self) -> bool:
        return len(self.decoder_layers) > 0 and self.decoder_layers.start == 0

    def ends_decoder(self, config: ModelConfig) -> bool:
        """Holds the last decoder layer: runs the final norm, the head and sampling."""
        layers = self.decoder_layers
        return len(layers) > 0 and layers.stop == config.num_decoder_layers

"""Where a pipeline step goes: the data addresses each stage sends its output to.

A step enters at the first stage of its pass (the encoder, the prefill group or the decoder)
and flows stage to stage; the stage that ends the decoder sends the tokens to the engine.
`data[i]` holds the data address of every TP rank of stage i: a hop goes to all of them.
"""

from __future__ import annotations

from exegpt.placement import Placement


def first_hops(placement: Placement, data: list[list[str]]) -> dict[str, list[str]]:
    """Where a step of each pass enters: `encoder` (T5 encode), `prefill`, `decoder`."""
    encoders = placement.encoder_route()
    return {
        "encoder": data[encoders[0]] if encoders else [],
        "prefill": data[placement.prefill_route()[0]],
        "decoder": data[placement.decoder_route()[0]],
    }


def next_hops(
    placement: Placement, data: list[list[str]], engine_address: str
) -> list[tuple[list[str], list[str]]]:
    """Per stage: where its output goes after its encoder layers, and after its decoder
    layers (the next stage of the pass; from the encoder's end to the first prefill stage,
    from the prefill group's end to the first decode stage, from the decoder's end here)."""
    encoders, prefills = placement.encoder_route(), placement.prefill_route()
    decoders = placement.decoder_route()
    hops: list[tuple[list[str], list[str]]] = []
    for index in range(len(placement.stages)):
        after_encoder: list[str] = []
        if index in encoders:
            position = encoders.index(index)
            following = encoders[position + 1 :] or prefills[:1]
            after_encoder = data[following[0]]
        after_decoder: list[str] = []
        if index in decoders:
            following = decoders[decoders.index(index) + 1 :]
            after_decoder = data[following[0]] if following else [engine_address]
        elif index in prefills:
            following = prefills[prefills.index(index) + 1 :] or decoders[:1]
            after_decoder = data[following[0]]
        hops.append((after_encoder, after_decoder))
    return hops

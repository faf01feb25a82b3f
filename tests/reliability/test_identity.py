"""A client's request_id is a label: another client reusing it cannot abort this request."""

from __future__ import annotations

from pathlib import Path

import grpc

from tests.reliability.procs import generate_request, services, stream_in_background

NUM_TOKENS = 300


def test_same_request_id_from_another_client_does_not_abort_mine(tmp_path: Path) -> None:
    with services(tmp_path) as group:
        address = group.worker("worker").ready
        mine = stream_in_background(
            address, generate_request(NUM_TOKENS, request_id="same"), 30, via_router=False
        )
        assert mine.first_token.wait(30), mine.details
        theirs = stream_in_background(
            address, generate_request(NUM_TOKENS, request_id="same"), 30, via_router=False
        )
        assert theirs.first_token.wait(30), theirs.details
        theirs.call.cancel()  # the other client leaves: the worker aborts *its* request
        assert theirs.done.wait(10)
        assert theirs.code is grpc.StatusCode.CANCELLED

        assert mine.done.wait(30)
        assert mine.code is grpc.StatusCode.OK, (mine.code, mine.details)
        assert mine.num_tokens == NUM_TOKENS
        assert mine.request_ids == {"same"}  # the label is echoed back

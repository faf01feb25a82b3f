"""Names the engine and the stages agree on for a pipeline step's messages.

A decode step through several stages carries `BATCH_SENT` when the engine sends its batch
(token ids, KV slots, sampling rows) to every stage of the route itself, as a message of kind
`BATCH_KIND`; the stages then pass on only the hidden state (services/worker/stage/joins.py).
"""

BATCH_SENT = "batch_sent"
BATCH_KIND = "batch"

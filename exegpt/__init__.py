"""exegpt: constraint-aware LLM inference (ExeGPT) as gRPC microservices.

The `exegpt` package is the library that services share (model code, contracts, tracing,
transport, the client SDK) and imports no service; each service lives in `services/<name>/`
and imports this library, never another service. `exegpt.commands` is the exception: the
`exegpt` command line and the orchestration that starts and drives services.
"""

__version__ = "0.1.0"

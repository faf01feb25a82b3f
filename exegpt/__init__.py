"""exegpt: constraint-aware LLM inference (ExeGPT) as gRPC microservices.

The `exegpt` package holds code shared by several services (model code, contracts,
tracing, transport, the client SDK and the CLI); each service lives in `services/<name>/`.
"""

__version__ = "0.1.0"

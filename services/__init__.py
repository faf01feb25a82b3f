"""exegpt services: one package each, each with a thin gRPC server.py and grpc-free core logic."""

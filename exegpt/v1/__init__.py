"""Generated protobuf/gRPC stubs for the exegpt.v1 contracts (see protos/). Do not edit."""

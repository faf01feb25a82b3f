"""What the profiler measures on a device: layers, communication, memory, whole forwards."""

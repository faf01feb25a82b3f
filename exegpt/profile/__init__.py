"""The profile: the shared contract between the profiler (writes it) and the scheduler (reads it).

`format` is the file format, `interpolate` the monotone curves and surfaces, `layer_profile`
the `LayerProfile` cost model a profile file loads into.
"""

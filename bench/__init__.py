"""Benchmarks of the sppscl pipeline against its own alternatives, measured in the same run.

Every result is a ratio of two timings (or sizes) taken in one process on one machine, because the
project's machines are shared and absolute times move with other people's load. ``python -m bench.run``
writes ``bench/results.json`` (raw numbers, ratios, targets, machine) and ``bench/results.md`` (the table
README shows). Benchmarks report; they never fail on a time.

Sections (``--only``): ``caching`` (stage two from the cache vs. the official encoders-in-the-loop
training), ``extraction`` (``sppscl extract`` vs. the bare encoder forward pass), ``loader`` (HDF5 cache
vs. features already in RAM as float32), ``scale`` (epoch time, peak RSS and bytes/sample at growing
cache sizes) and ``compute`` (stage two's FLOP/s vs. this machine's dense matmul FLOP/s).
"""

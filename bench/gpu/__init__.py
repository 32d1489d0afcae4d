"""The GPU acceptance run: ``python -m bench.run --gpu`` (``make bench-gpu``), one command for a CUDA node.

Within a time budget (5 minutes by default) on one CUDA device, with the node's own torch (2.1 or newer), no
network, nothing installed, it runs every CUDA path of the pipeline once and measures it:

- ``extraction``: ``extract`` samples/s in fp32 and bf16, channels_last on and off, for the offline encoders
  (when their packages are there) and ResNet-50 + BERT-base shapes (random init: no weights); the encoders'
  forward alone beside it; the largest difference between the fp32 and the bf16 cache;
- ``ranks``: a one-rank torchrun extraction (its NCCL group included) against a plain process, bitwise, with
  cuDNN's deterministic algorithms;
- ``stage2``: a stage-two epoch (``train``) with MVSA-Single's and HFM's shapes and presets;
- ``sweeps``: sweep throughput (runs per minute, GPU utilisation when ``nvidia-smi`` answers) with
  ``--runs-per-device`` 1, 2, 4, 8, 16.

Each figure is printed as soon as it is measured and ``results-gpu.md`` / ``results-gpu.json`` are rewritten after
each one, so a run cut short still reports what it measured. A section whose package is missing is skipped with
one line naming it. ``--quick`` is the same code on tiny shapes, on the CPU unless ``--device`` says otherwise
(gloo instead of NCCL); the bench smoke test runs it, so the GPU command cannot rot unseen.
"""

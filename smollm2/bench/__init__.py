"""Benchmarks that print a table with ratios against peers measured in the same run.

  inference.py   `smollm2 bench` (also `python -m smollm2.bench`): prefill and decode speed of each of our modes
                 beside transformers and llama.cpp, each configuration in its own worker process
  flops.py       FLOPs per token and GPU datasheet peaks, for MFU (used by the trainer's benchmark too)

The serving load test, the quantisation-quality table and the training benchmark are scripts in benchmarks/.
"""

"""Running the model to produce text: everything between a loaded model and a reply.

  config.py         GenerationConfig: every generation option, checked on construction
  sampling.py       pure functions on logits: temperature, top-k, top-p, min-p, repetition penalty
  stopping.py       SequenceState: one row's tokens, text, stop conditions and finish reason
  generate.py       prefill, one decode step, and the decode loop behind generate / generate_batch / chat
  compiled_step.py  DecodeStep: the model's own forward for one token, torch.compile'd (load(compile=True))
  engine.py         the batching engine the server runs: continuous batching over one shared cache
"""

"""Looking inside the model, on its own forward through the hook points of smollm2/hooks.py.

  lens.py      the logit lens: the residual stream after each block read through the final norm and the head
  patching.py  activation patching: the clean run's residual stream (or one head's output) put into a
               corrupted run, layer by position and layer by head, scored by a logit difference
  plots.py     heat maps of both, and of a layer's attention patterns ([plot] extra: matplotlib)

`smollm2 lens` and `smollm2 patch` are the command lines; notebooks/look_inside.ipynb walks through them.
"""

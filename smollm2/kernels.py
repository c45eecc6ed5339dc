"""`python -m smollm2.kernels`: build our C++ kernels once (the setup step runs it) and print where they are.

The kernels live in smollm2/quant/ (kernels.py, csrc/); this name is kept so the documented command keeps working.
"""

from .quant.kernels import main

if __name__ == "__main__":
    main()

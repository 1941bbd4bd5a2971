"""collabcompress: compress transformer attention into collaborative multi-head attention.

Cordonnier, Loukas, Jaggi, "Multi-Head Attention: Collaborate Instead of Concatenate",
arXiv 2006.16362.
"""

import os as _os

# Idle OpenMP threads that spin make small matrix products 1000x slower when other
# processes share the cores; passive waiting costs nothing measurable here. Only takes
# effect when torch has not been imported yet, and never overrides the user's setting.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

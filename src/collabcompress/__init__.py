"""collabcompress: compress transformer attention into collaborative multi-head attention.

Cordonnier, Loukas, Jaggi, "Multi-Head Attention: Collaborate Instead of Concatenate",
arXiv 2006.16362.
"""

__version__ = "0.1.0"

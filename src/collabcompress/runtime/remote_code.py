"""The ``modeling_collabcompress.py`` written into an output by ``compress --remote-code``."""

from __future__ import annotations

__all__ = ["REMOTE_CODE_NAME", "REMOTE_CODE"]

REMOTE_CODE_NAME = "modeling_collabcompress.py"

REMOTE_CODE = '''"""Load this collabcompress output directory with transformers' AutoModel (trust_remote_code=True).

Written by collabcompress {version}. The collaborative attention modules and the weight
loading live in the collabcompress package, which must be installed:
pip install 'collabcompress[hf]'.
"""

from transformers import {base}


class Collaborative{base}({base}):
    """{base} whose attention modules are collaborative (arXiv 2006.16362); see collabcompress.hf."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        from collabcompress.hf import from_pretrained, is_compressed

        if not is_compressed(pretrained_model_name_or_path):
            return {base}.from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
        return from_pretrained(pretrained_model_name_or_path, model_class={base},
                               dtype=None if dtype == "auto" else dtype,
                               attn_implementation=kwargs.get("attn_implementation"))
'''

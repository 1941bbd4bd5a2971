"""Pure maths: tensors in, tensors out; no files, no transformers."""

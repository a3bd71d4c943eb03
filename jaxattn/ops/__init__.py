"""Functional core of jaxattn: the attention op and its helpers."""

from jaxattn.ops.attention import IMPLEMENTATIONS, dot_product_attention

__all__ = ["IMPLEMENTATIONS", "dot_product_attention"]

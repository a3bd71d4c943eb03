"""jaxattn.heads (see DESIGN.md)."""

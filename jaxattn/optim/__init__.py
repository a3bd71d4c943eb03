"""jaxattn.optim (see DESIGN.md)."""

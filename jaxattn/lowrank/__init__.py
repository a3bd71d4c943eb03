"""jaxattn.lowrank (see DESIGN.md)."""

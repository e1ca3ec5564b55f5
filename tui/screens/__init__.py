"""The TUI's screens: one module per screen, each with its bindings and CSS."""

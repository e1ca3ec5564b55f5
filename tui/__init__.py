"""Textual TUI for field technicians."""

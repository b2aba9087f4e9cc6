"""Presets, installed as the `lima_jax.configs` package so every command finds them from any directory."""

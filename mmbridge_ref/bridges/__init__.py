"""Bridges: features of a frozen encoder in, visual tokens for the LM out."""

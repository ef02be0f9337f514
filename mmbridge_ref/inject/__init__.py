"""Injections: how visual tokens enter a frozen LM."""

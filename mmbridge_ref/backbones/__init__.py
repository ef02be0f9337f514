"""Vision towers and causal LMs behind one interface, and the tiny pretrained zoo."""

"""Hydra configs of the training app (a package, so that Hydra finds them inside a wheel)."""

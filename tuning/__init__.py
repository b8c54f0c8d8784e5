"""Ray Tune sweeps over stage configs (`raylm sweep`)."""

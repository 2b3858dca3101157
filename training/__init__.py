"""Everything about the model: architecture, checkpoints, preprocessing, prediction, data."""

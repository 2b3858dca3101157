"""What a checkpoint defines, shared by training and serving: the architectures, the
checkpoint file, preprocessing, the patient-level rule and which slices the model sees.

Nothing here imports the rest of `training` (inference or the training loop)."""

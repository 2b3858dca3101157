"""Running a checkpoint: backends (eager PyTorch, ONNX Runtime), the device, the
`Predictor` (preprocessing → forward → P(ICH), and Grad-CAM). Used by the node and by
evaluation; it never imports the training loop or data preparation."""

"""The trained model in use: load a run's model (`run_model`), cut images into the fragments it
was trained on (`tiling`), classify them (`predict`), score labelled images (`evaluate`) and
export the model for use without dagtrain (`export`)."""

# The formats of `dagtrain export`, here so the command line lists them without importing torch.
EXPORT_FORMATS = ("state_dict", "torchscript", "onnx")

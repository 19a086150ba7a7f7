"""Weights on disk: safe readers (``io``), loading into a model with a report (``load``), and the
metadata that travels with weights (``metadata``). Never imports a model; never touches the network."""
from hymamba.weights.io import checkpoint_dir, read_state_dict, save_safetensors
from hymamba.weights.load import LoadReport, load_state_dict
from hymamba.weights.metadata import Checkpoint, read_checkpoint, read_config

__all__ = ["Checkpoint", "LoadReport", "checkpoint_dir", "load_state_dict", "read_checkpoint", "read_config",
           "read_state_dict", "save_safetensors"]

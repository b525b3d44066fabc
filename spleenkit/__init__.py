"""spleenkit: a Jupyter-first teaching and reproducibility kit for 3D spleen segmentation in CT.

The notebooks teach MONAI in view; everything that is not the lesson (data, checks, figures, run
folders, the DDP launch, the CLI, the bundle) lives in this package. Notebooks import it from the
package root (``from spleenkit import train, three_plane``), never from a module path, so that moving
a function between modules never breaks a lesson.

Importing the package is cheap on purpose: a name is looked up in :data:`SURFACE` and its module
imported on first use (PEP 562), so that ``spleenkit --help`` starts without torch or MONAI.
"""

from __future__ import annotations

import importlib
from typing import Any

from spleenkit.errors import BadInputError, SpleenkitError  # noqa: F401 (re-exported, cheap)

__version__ = "0.1.0"

# The notebook-facing surface: name -> the module that holds it. One name a line, grouped by module.
SURFACE: dict[str, str] = {
    # bundle
    "bundle_command": "spleenkit.bundle",
    "bundle_source": "spleenkit.bundle",
    "format_command": "spleenkit.bundle",
    "run_command": "spleenkit.bundle",
    # compare
    "compare_networks": "spleenkit.compare",
    "compare_numbers": "spleenkit.compare",
    "compare_objects": "spleenkit.compare",
    "compare_transforms": "spleenkit.compare",
    "Comparison": "spleenkit.compare",
    "describe": "spleenkit.compare",
    # data
    "check_dataset": "spleenkit.data",
    "download_example": "spleenkit.data",
    "download_msd": "spleenkit.data",
    "example_as_msd": "spleenkit.data",
    "load_datalist": "spleenkit.data",
    "split_datalist": "spleenkit.data",
    "write_synthetic_dataset": "spleenkit.data",
    # devices
    "choose_precision": "spleenkit.devices",
    "describe_precision": "spleenkit.devices",
    "pick_device": "spleenkit.devices",
    "use_fast_layout": "spleenkit.devices",
    # dicom_seg
    "read_back_with_dcmqi": "spleenkit.dicom_seg",
    # distributed
    "data_parallel_plan": "spleenkit.distributed",
    "default_nproc": "spleenkit.distributed",
    "launch_torchrun": "spleenkit.distributed",
    "torchrun_command": "spleenkit.distributed",
    # environment
    "colab_setup": "spleenkit.environment",
    "environment_report": "spleenkit.environment",
    "is_interactive": "spleenkit.environment",
    "show_progress": "spleenkit.environment",
    # errors
    "BadInputError": "spleenkit.errors",
    "PretrainedUnavailableError": "spleenkit.errors",
    "SpleenkitError": "spleenkit.errors",
    # evaluation
    "evaluate_run": "spleenkit.evaluation",
    "label_round_trip": "spleenkit.evaluation",
    "select_cases": "spleenkit.evaluation",
    # exercises
    "check": "spleenkit.exercises",
    "sliding_window_count": "spleenkit.exercises",
    # export
    "export_model": "spleenkit.export",
    "onnx_available": "spleenkit.export",
    "TOLERANCE": "spleenkit.export",
    # images
    "case_name": "spleenkit.images",
    "read_binary_mask": "spleenkit.images",
    "read_dicom_series": "spleenkit.images",
    "voxel_spacing": "spleenkit.images",
    "write_dicom_series": "spleenkit.images",
    # inference
    "infer": "spleenkit.inference",
    "orientation_warnings": "spleenkit.inference",
    # manifest
    "read_manifest": "spleenkit.manifest",
    # metrics
    "compare_mask_files": "spleenkit.metrics",
    "format_summary": "spleenkit.metrics",
    "mask_metrics": "spleenkit.metrics",
    "read_rows_csv": "spleenkit.metrics",
    # model
    "build_unet": "spleenkit.model",
    "count_parameters": "spleenkit.model",
    "feature_map_sizes": "spleenkit.model",
    "load_model": "spleenkit.model",
    # lessons
    "environment_rows": "spleenkit.lessons",
    "markdown_table": "spleenkit.lessons",
    "notebook_model": "spleenkit.lessons",
    "stand_in_banner": "spleenkit.lessons",
    # predict
    "inference_network": "spleenkit.predict",
    "keep_largest_component": "spleenkit.predict",
    "make_inferer": "spleenkit.predict",
    "postprocessing": "spleenkit.predict",
    "predict_logits": "spleenkit.predict",
    # presets
    "get_preset": "spleenkit.presets",
    "Preset": "spleenkit.presets",
    "preset_table": "spleenkit.presets",
    "PRESETS": "spleenkit.presets",
    "resolve_preset": "spleenkit.presets",
    # pretrained
    "download_instructions": "spleenkit.pretrained",
    "fetch_pretrained": "spleenkit.pretrained",
    "load_pretrained": "spleenkit.pretrained",
    # runs
    "read_metrics": "spleenkit.runs",
    "run_preset": "spleenkit.runs",
    "summarize_run": "spleenkit.runs",
    # training
    "estimate_cache_memory": "spleenkit.training",
    "make_iteration_update": "spleenkit.training",
    "make_loss": "spleenkit.training",
    "make_optimizer": "spleenkit.training",
    "make_scheduler": "spleenkit.training",
    "measure_step_seconds": "spleenkit.training",
    "mixed_precision_step": "spleenkit.training",
    "train": "spleenkit.training",
    "training_precision": "spleenkit.training",
    # transforms
    "deterministic_transforms": "spleenkit.transforms",
    "inference_transforms": "spleenkit.transforms",
    "random_transforms": "spleenkit.transforms",
    "trace_transforms": "spleenkit.transforms",
    "training_transforms": "spleenkit.transforms",
    "validation_transforms": "spleenkit.transforms",
    # visualization
    "augmented_crops": "spleenkit.visualization",
    "compare_learning_curves": "spleenkit.visualization",
    "compare_runs": "spleenkit.visualization",
    "crop_samples": "spleenkit.visualization",
    "data_parallel_diagram": "spleenkit.visualization",
    "error_map": "spleenkit.visualization",
    "example_masks_2d": "spleenkit.visualization",
    "illustrate_metrics": "spleenkit.visualization",
    "intensity_histogram": "spleenkit.visualization",
    "montage": "spleenkit.visualization",
    "per_case_metrics": "spleenkit.visualization",
    "show_3d": "spleenkit.visualization",
    "slice_viewer": "spleenkit.visualization",
    "tensorboard_scalars": "spleenkit.visualization",
    "three_plane": "spleenkit.visualization",
    "training_curves": "spleenkit.visualization",
    "transform_steps": "spleenkit.visualization",
}

__all__ = sorted({*SURFACE, "__version__"})


def lazy_attribute(table: dict[str, str], namespace: dict[str, Any], name: str) -> Any:
    """A module's PEP 562 ``__getattr__`` over ``table`` (name -> the module that holds it): import that module on
    first use, keep the object in ``namespace`` (the module's globals) and return it. The package root's
    :data:`SURFACE` and the bundle's face (:data:`spleenkit.bundle.FACE`) both resolve names this way."""
    module = table.get(name)
    if module is None:
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    namespace[name] = value
    return value


def __getattr__(name: str) -> Any:
    """Import the module that holds ``name`` on first use and return the object (PEP 562)."""
    return lazy_attribute(SURFACE, globals(), name)


def __dir__() -> list[str]:
    return __all__

"""Flags that cannot take effect are errors, never silently ignored (STYLE.md rule 16).

Checked before any expensive stage: a build with an INT8 setting that no selected backend reads (an
entropy range method and no TensorRT INT8 target), or layers kept in float (``[quantize] int8_ignore*``) with an
INT8 target whose backend cannot keep them, stops at once with one line naming the flag and what would make it apply.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from edgeport.config import quantize_settings
from edgeport.errors import ConfigError
from edgeport.flags import dashed
from edgeport.tasks import get as get_task

if TYPE_CHECKING:
    from edgeport.config import ProjectConfig
    from edgeport.target import Target

def check_build_flags(cfg: ProjectConfig, chosen: list[tuple[Target, str]], given: dict[str, Any],
                      own_scenes: str | None = None) -> None:
    """ConfigError for the first flag in ``given`` (those set on the command line) that cannot take effect
    for the ``chosen`` (target, precision) pairs; ``own_scenes``: the embedded model's validation scenes, which the
    build uses when none are given."""
    from edgeport.backends import get_backend

    int8 = [(t, get_backend(t.backend)) for t, p in chosen if p == "int8"]
    selected = ", ".join(f"{t.name}:{p}" for t, p in chosen)
    for field, readers, every, flag in quantize_settings():
        deaf = [f"{t.name}:int8 ({t.backend})" for t, b in int8 if t.backend not in readers]
        if flag is None or not flag.int8 or given.get(field) is None or given[field] is False:
            if every and getattr(cfg.quantize, field) and deaf:  # from the config file: never silently
                raise ConfigError(f"[quantize] {field} cannot take effect on {', '.join(deaf)}: that backend cannot "
                                  "keep layers in float; build those targets with a config without it")
            continue
        name = dashed(field)
        if not int8:
            raise ConfigError(f"{name} has no effect: no selected target builds INT8 (selected: {selected}); add "
                              "an INT8 target such as intel-cpu:int8, or drop the flag")
        if len(deaf) == len(int8):
            who = f"only {' and '.join(readers)} INT8 read it" if readers else "no backend reads it"
            raise ConfigError(f"{name} has no effect on the selected INT8 targets ({', '.join(deaf)}): {who}; drop "
                              "the flag or add such a target")
        if every and deaf:
            raise ConfigError(f"{name} cannot take effect on {', '.join(deaf)}: that backend cannot keep layers in "
                              f"float; build it separately without {name}")
    check_val_labels(given.get("val_labels"), given.get("val_images") or cfg.validation.val_images)
    val_images = given.get("val_images") or cfg.validation.val_images or own_scenes
    task = get_task(cfg.input.task)
    if given.get("val_labels") and not task.label_folder:
        raise ConfigError(f"--val-labels is for segmentation label maps; {task.labelled_how}")
    if given.get("max_drop") is not None and not val_images:
        raise ConfigError(f"{dashed('max_drop')} has no effect without labelled validation data: pass "
                          "--val-images (and --val-labels), whose task metric it limits")
    if given.get("recover_steps") is not None and not cfg.optimize.prune:
        raise ConfigError("--recover-steps has no effect without pruning: it distils a pruned model from the original; "
                          "add --prune 0.3 (or [optimize] prune), or drop the flag")


def check_val_labels(val_labels: str | None, val_images: str | None) -> None:
    """ConfigError for label maps given without the images they belong to (build and validate alike)."""
    if val_labels and not val_images:
        raise ConfigError("--val-labels has no effect without --val-images (the images the label maps belong to)")

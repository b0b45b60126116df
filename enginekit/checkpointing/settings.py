"""What a resumed run must share with the run that wrote its checkpoint, and how it is compared."""

from __future__ import annotations

from typing import Any

from ..registry import plugin_settings
from .format import CheckpointError

__all__ = ["IMPLEMENTATION_KEYS", "check_same_model", "compare_settings", "run_settings"]

#: optimizer group keys that say how it runs, not what it computes: never a "changed setting"
IMPLEMENTATION_KEYS = {"params", "lr", "foreach", "fused", "capturable", "differentiable"}


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return isinstance(value, (bool, int, float, str, type(None)))


def run_settings(engine: Any, skip: object = None) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint, as plain values:
    the engine's settings and plan facts, the optimizer's hyper-parameters (not its scheduled lr),
    and every plugin's constructor settings (read from attributes of the same name; paths and
    objects are left out: a copied run folder is not a change)."""
    st = engine.state
    settings: dict[str, Any] = {
        "engine.precision": engine.precision,
        "engine.grad_accum_steps": engine.grad_accum_steps,
        "engine.train batches per epoch": len(engine.train_loader),
        "engine.train batch size": getattr(engine.train_loader, "batch_size", None),
        "plan.warmup_steps": st.warmup_steps,
        "plan.peak_lrs": list(st.peak_lrs),
        "plan.lr_decay": st.lr_decay,
    }
    if st.lr_decay is not None:  # a decay plans against the run's length; without one a run may grow
        settings["plan.total_steps"] = st.total_steps
    for i, group in enumerate(engine.optimizer.param_groups):
        for key, value in group.items():
            if key not in IMPLEMENTATION_KEYS and _plain(value):
                settings[f"optimizer.group{i}.{key}"] = list(value) if isinstance(value, tuple) else value
    for name, plugin in engine.plugins.items():
        if plugin is skip:
            continue
        for param, value in plugin_settings(plugin).items():
            if _plain(value):
                settings[f"{name}.{param}"] = list(value) if isinstance(value, tuple) else value
    return settings


def compare_settings(saved: dict[str, Any], now: dict[str, Any], ignore: list[str]) -> list[str]:
    """Each setting that differs, in one line; keys of the plugins in ``ignore`` are not compared."""
    saved = {k: v for k, v in saved.items() if k.split(".", 1)[0] not in ignore}
    now = {k: v for k, v in now.items() if k.split(".", 1)[0] not in ignore}
    return [
        f"{key}: {saved.get(key, '(not set)')!r} in the checkpoint, {now.get(key, '(not set)')!r} now"
        for key in sorted(set(saved) | set(now))
        if saved.get(key) != now.get(key)
    ]


def check_same_model(where: str, own: dict[str, tuple[int, ...]], saved: dict[str, tuple[int, ...]]) -> None:
    """Another model's checkpoint is one line naming the first difference, not torch's page of them.
    ``own`` and ``saved``: every tensor's (global) shape by name."""
    details = [f"missing from the checkpoint: {k}" for k in own if k not in saved]
    details += [f"not in this model: {k}" for k in saved if k not in own]
    details += [f"{k}: {saved[k]} in the checkpoint, {own[k]} here" for k in own if k in saved and saved[k] != own[k]]
    if details:
        raise CheckpointError(
            f"{where} holds another model ({len(details)} difference(s), first: {details[0]}); resume with "
            "the model settings it was trained with, or start a new run in another folder "
            "(CheckpointError.details lists every difference)",
            details,
        )

"""What a helper attaches to, and how each call of an enabled pipeline becomes one generation.

:func:`resolve` splits what the user passes (a diffusers pipeline with a supported U-Net, or the U-Net itself) into
the pipeline and the U-Net, and says clearly what is wrong otherwise. Enabling a helper on a pipeline *links* them
(:func:`link`): the helper goes into the pipeline instance's own ``__dict__`` (a ``copy.copy`` view of an enabled
pipeline carries it, so the view caches with the same helper; dropping the pipeline drops the link), and the
instance gets a same-named subclass whose ``__call__`` runs inside the helper's generation (Python looks
``__call__`` up on the type; other instances of the class are never touched). :func:`unlink` restores the
instance exactly. The linked helper provides ``enabled`` and ``_generation(pipeline)``, a context manager around
one call (:class:`~DeepCache.helper.DeepCacheSDHelper`).

Example::

    >>> from types import SimpleNamespace
    >>> from DeepCache.attach import pipeline_steps, resolve
    >>> pipeline_steps(SimpleNamespace(_num_timesteps=25))   # what a non-uniform schedule needs to know
    25
    >>> resolve(None)
    Traceback (most recent call last):
    ...
    ValueError: no pipeline given: use DeepCacheSDHelper(pipe=pipe), or enable(pipe=pipe).
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from torch import nn

from . import engine

#: What :func:`unlink` needs to restore a pipeline: whether it had a helper entry, that entry, its class.
Restore = tuple[bool, Any, type]

# The helper enabled on a pipeline lives in the pipeline's own __dict__ under this name: a copy.copy view of
# an enabled pipeline caches with the same helper, and dropping the pipeline drops the link.
_HELPER_ATTR = "_deepcache_helper"
# original pipeline class -> its subclass (same name) whose __call__ opens a generation
_CALL_SUBCLASSES: dict[type, type] = {}
_SUBCLASS_LOCK = threading.Lock()


def _generation_subclass(cls: type) -> type:
    """A subclass of ``cls`` (same name) whose ``__call__`` runs inside the enabled helper's generation."""
    with _SUBCLASS_LOCK:
        sub = _CALL_SUBCLASSES.get(cls)
        if sub is not None:
            return sub

        def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
            helper = self.__dict__.get(_HELPER_ATTR)
            if helper is None or not helper.enabled:
                return super(sub, self).__call__(*args, **kwargs)
            with helper._generation(self):
                return super(sub, self).__call__(*args, **kwargs)

        # the original's name, doc and signature (``__wrapped__``): code that inspects ``pipe.__call__`` to see which
        # keywords it takes (``true_cfg_scale``? ``callback_on_step_end``?) must see the same answer enabled or not
        functools.update_wrapper(__call__, cls.__call__)
        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__, "__doc__": cls.__doc__})
        sub.__qualname__ = cls.__qualname__
        sub._deepcache_original_class = cls  # type: ignore[attr-defined]
        _CALL_SUBCLASSES[cls] = sub
        return sub


def resolve(target: Any) -> tuple[Any | None, nn.Module]:
    """Split what the user passed into (pipeline or None, denoiser: a U-Net or a transformer). Raises a clear error
    otherwise."""
    if target is None:
        raise ValueError("no pipeline given: use DeepCacheSDHelper(pipe=pipe), or enable(pipe=pipe).")
    if isinstance(target, nn.Module):
        model = engine.unwrap_unet(target)
        engine.check_supported(model)
        return None, model
    model = engine.denoiser_of(target)
    if model is None:
        has = [name for name in ("prior", "decoder") if getattr(target, name, None) is not None]
        detail = f" (it has a `{has[0]}` instead)" if has else ""
        raise TypeError(
            f"{type(target).__name__} has no `unet` or `transformer`{detail}: DeepCache caches a denoiser's features and "
            "needs a diffusers pipeline with a U-Net or a transformer, or the model itself; supported U-Nets: "
            f"{', '.join(engine.SUPPORTED_UNETS)}."
        )
    engine.check_supported(model)
    if not callable(target):
        raise TypeError(f"{type(target).__name__} is not callable; pass a diffusers pipeline or a U-Net.")
    return target, model


def pipeline_steps(pipeline: Any) -> int | None:
    """U-Net evaluations of the running call, as far as the pipeline tells (for non-uniform schedules)."""
    value = getattr(pipeline, "_num_timesteps", None)
    if isinstance(value, int) and value > 0:
        return value
    timesteps = getattr(getattr(pipeline, "scheduler", None), "timesteps", None)
    return len(timesteps) if timesteps is not None else None


def linked_helper(pipeline: Any) -> Any | None:
    """The helper linked to ``pipeline``: its own, or, on a ``copy.copy`` view, that of the pipeline it copies."""
    return pipeline.__dict__.get(_HELPER_ATTR)


def link(pipeline: Any, helper: Any) -> Restore:
    """Make every call of ``pipeline`` run inside ``helper``'s generation; returns what :func:`unlink` restores."""
    restore = (_HELPER_ATTR in pipeline.__dict__, pipeline.__dict__.get(_HELPER_ATTR), type(pipeline))
    pipeline.__dict__[_HELPER_ATTR] = helper
    if not hasattr(type(pipeline), "_deepcache_original_class"):
        pipeline.__class__ = _generation_subclass(type(pipeline))
    return restore


def unlink(pipeline: Any, helper: Any, restore: Restore) -> None:
    """Undo :func:`link`: the pipeline's helper entry and class as they were (an entry another helper set stays)."""
    had_link, previous, cls = restore
    if pipeline.__dict__.get(_HELPER_ATTR) is helper:
        if had_link:
            pipeline.__dict__[_HELPER_ATTR] = previous
        else:
            del pipeline.__dict__[_HELPER_ATTR]
    if type(pipeline) is not cls and type(pipeline) is _CALL_SUBCLASSES.get(cls):
        pipeline.__class__ = cls

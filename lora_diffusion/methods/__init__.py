"""Adaptation methods behind one registry: a method is one file plus its settings class beside it.

A method `<name>` is two files in this folder (as PEFT's tuners are a config class and a model
registered together):

- `<name>_settings.py`: its settings class (the `method.<name>:` block of a run config, typed and
  validated like every config section) and its registration, read when the config is imported:

      from pydantic import Field
      from lora_diffusion.methods import MethodSettings, register_method

      class LayerNormConfig(MethodSettings):
          scale: float = Field(1.0, gt=0)

      register_method(name="layernorm", settings=LayerNormConfig, build="lora_diffusion.methods.layernorm:build",
                      default_lr=3e-3)   # the quality benchmark's learning rate for it

  It imports nothing but this registry (and pydantic), so the config, the search spaces and the
  sweep driver read every method without importing torch.

- `<name>.py`: `def build(denoiser: Denoiser, settings) -> Adaptation`, which freezes the base, adds
  or unfreezes what the method trains and returns an `Adaptation` (see core.py): forward(x_t, t,
  attention_mask, instruction_mask, positions) -> logits at `positions`, plus regularisers,
  parameter counts and the adapter's state. It is imported only when a run builds the method.

`method.name=layernorm` and `method.layernorm.scale=...` are then accepted (config.MethodConfig has
one block per registered method), the benchmarks list it and `bench quality` trains it at its
`default_lr`.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict

__all__ = ["Adaptation", "METHODS", "Method", "MethodSettings", "build_method", "count_parameters",
           "discover", "get_method", "register_method"]

SETTINGS_SUFFIX = "_settings"  # `<name>_settings.py` registers a method


class MethodSettings(BaseModel):
    """The base of every method's settings block: the same rules as every config section (unknown keys are
    refused, assignments validated)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


@dataclass(frozen=True)
class Method:
    name: str  # the config's key: method.name=<name>, method.<name>.<setting>=...
    settings: type[MethodSettings]  # its settings block
    build: str  # "module:function" that builds it, imported only when a run builds the method
    default_lr: float  # learning rate at the quality benchmark's budget (bench quality's per-method lr)
    order: int = 100  # its place in lists, tables and config dumps (built-in methods 0-5; a new one comes after)
    description: str = ""

    def builder(self) -> Callable[..., Any]:
        module, _, function = self.build.partition(":")
        return getattr(importlib.import_module(module), function)


METHODS: dict[str, Method] = {}  # name -> Method, in `order` (config.METHOD_NAMES is its keys)


def register_method(name: str, settings: type[MethodSettings], build: str, default_lr: float, order: int = 100,
                    description: str = "") -> Method:
    """Add a method to the registry (called by its settings module when discovery imports it)."""
    if name in METHODS:
        raise ValueError(f"method name {name!r} is registered twice (settings {settings.__module__})")
    if not (isinstance(settings, type) and issubclass(settings, MethodSettings)):
        raise ValueError(f"method {name!r}: settings must be a MethodSettings class, got {settings!r}")
    if ":" not in build:
        raise ValueError(f"method {name!r}: build {build!r} must be 'module:function'")
    if not default_lr > 0:
        raise ValueError(f"method {name!r}: default_lr {default_lr!r} must be > 0")
    method = Method(name, settings, build, float(default_lr), order, description)
    METHODS[name] = method
    ordered = sorted(METHODS.values(), key=lambda m: (m.order, m.name))
    METHODS.clear()
    METHODS.update((m.name, m) for m in ordered)
    return method


def discover() -> None:
    """Import every `<name>_settings.py` in this package's folders (each registers its method; run at import)."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.endswith(SETTINGS_SUFFIX) and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"method.name: unknown method {name!r}; allowed: {', '.join(METHODS)}") from None


def build_method(cfg, denoiser):
    """Build the method `cfg.name` (a config.MethodConfig) on `denoiser` with its settings block."""
    adaptation = get_method(cfg.name).builder()(denoiser, cfg.settings())
    adaptation.method_name = cfg.name
    return adaptation


def __getattr__(name: str):
    # Adaptation and count_parameters need torch: imported on first use, so reading the registry does not.
    if name in ("Adaptation", "count_parameters"):
        from lora_diffusion.methods import core

        return getattr(core, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


discover()

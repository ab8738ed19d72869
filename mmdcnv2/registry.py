"""mmdcnv2's registries: children of mmdet's, with the scope ``mmdcnv2``.

Configs name our components ``mmdcnv2.<Name>``; they never shadow mmcv's or
mmdet's own ``DCN``/``DCNv2``.

There is one child for each of mmdet's registries, so that a model built with
``_scope_='mmdcnv2'`` (or a config with ``default_scope='mmdcnv2'``) finds every
builder's registry in our scope (task utils, weight initialisers, ...) and
mmengine has nothing to warn about; whatever we do not register is looked up in
mmdet's registry and then mmengine's, as in any mmdet plugin.

An explicitly scoped name, ``mmdcnv2.<Name>``, means ours and only ours: if we do
not have ``<Name>``, the lookup raises a ``KeyError`` that names the type and the
scope, instead of handing back mmdet's or mmcv's class of that name (mmengine's
parent fallback would, for example, turn ``mmdcnv2.SAC`` into mmcv's ``SAC``).
(``'mmdcnv2.X' in mmdet.registry.MODELS`` raises that error too, since mmengine's
``in`` is a lookup; ``in`` on our own registries answers False.)
"""

from mmdet import registry as _mmdet
from mmengine.registry import Registry

SCOPE = "mmdcnv2"


class ScopedRegistry(Registry):
    """A ``Registry`` in which a name scoped to it must be registered in it."""

    def get(self, key):
        scope, real_key = self.split_scope_key(key) if isinstance(key, str) else (None, key)
        if scope == self.scope:
            self.import_from_location()
            if real_key not in self._module_dict:
                raise _missing(self, real_key)
        return super().get(key)

    def __contains__(self, key) -> bool:
        try:
            return super().__contains__(key)
        except KeyError:
            return False


class _ExplicitScopeView:
    """What mmdet's registry holds as its child ``mmdcnv2``.

    mmengine resolves ``mmdcnv2.<Name>`` in a parent registry by calling the child's
    ``get('<Name>')`` with the scope stripped, and an unscoped ``get`` falls back to the
    parents: the name would silently resolve to mmdet's or mmcv's class. Through this view
    the child answers only with what it registered itself; everything else (the tree walk
    that finds our registry for ``_scope_='mmdcnv2'``, names, listings) goes to the registry.
    """

    def __init__(self, registry: ScopedRegistry):
        self._registry = registry

    def get(self, key):
        scope, real_key = self._registry.split_scope_key(key)
        if scope not in (None, self._registry.scope):
            return self._registry.get(key)
        self._registry.import_from_location()
        if real_key not in self._registry._module_dict:
            raise _missing(self._registry, real_key)
        return self._registry._module_dict[real_key]

    def __getattr__(self, name):
        if name == "_registry":  # not set yet (copy, pickle)
            raise AttributeError(name)
        return getattr(self._registry, name)

    def __contains__(self, key):
        return key in self._registry

    def __len__(self):
        return len(self._registry)

    def __repr__(self):
        return repr(self._registry)


def _missing(registry: Registry, name: str) -> KeyError:
    have = ", ".join(sorted(registry._module_dict)) or "nothing"
    return KeyError(
        f"{name!r} is not a type of the scope {registry.scope!r} ({registry.name} registry), "
        f"which has: {have}. mmdet's and mmcv's own types are named without the '{registry.scope}.' prefix "
        f"(for example 'DCNv2' for mmcv's layer, '{registry.scope}.DCNv2' for ours)."
    )


def _child(parent: Registry, locations=()) -> ScopedRegistry:
    # mmdet's locations too: an unscoped name looked up in our registry falls back to mmdet's
    # registry without triggering mmdet's lazy imports, so ours triggers them.
    registry = ScopedRegistry(
        parent.name, parent=parent, scope=SCOPE, locations=list(locations) + list(parent._locations)
    )
    parent._children[SCOPE] = _ExplicitScopeView(registry)
    return registry


RUNNERS = _child(_mmdet.RUNNERS)
RUNNER_CONSTRUCTORS = _child(_mmdet.RUNNER_CONSTRUCTORS)
LOOPS = _child(_mmdet.LOOPS)
HOOKS = _child(_mmdet.HOOKS, ["mmdcnv2.engine.hooks"])
DATASETS = _child(_mmdet.DATASETS)
DATA_SAMPLERS = _child(_mmdet.DATA_SAMPLERS)
TRANSFORMS = _child(_mmdet.TRANSFORMS)
MODELS = _child(_mmdet.MODELS, ["mmdcnv2.models"])
MODEL_WRAPPERS = _child(_mmdet.MODEL_WRAPPERS)
WEIGHT_INITIALIZERS = _child(_mmdet.WEIGHT_INITIALIZERS)
OPTIMIZERS = _child(_mmdet.OPTIMIZERS)
OPTIM_WRAPPERS = _child(_mmdet.OPTIM_WRAPPERS)
OPTIM_WRAPPER_CONSTRUCTORS = _child(_mmdet.OPTIM_WRAPPER_CONSTRUCTORS)
PARAM_SCHEDULERS = _child(_mmdet.PARAM_SCHEDULERS)
METRICS = _child(_mmdet.METRICS)
EVALUATOR = _child(_mmdet.EVALUATOR)
TASK_UTILS = _child(_mmdet.TASK_UTILS)
VISUALIZERS = _child(_mmdet.VISUALIZERS)
VISBACKENDS = _child(_mmdet.VISBACKENDS)
LOG_PROCESSORS = _child(_mmdet.LOG_PROCESSORS)

"""The registered models' pyfunc classes under their first module name: MLflow keeps a
model's ``python_model`` by reference to its class, and versions registered before the
classes moved to :mod:`aifactory.tasks.models.pyfunc_model` name this module."""

from aifactory.tasks.models.pyfunc_model import ProjectPyfunc, TabularPyfunc

__all__ = ["ProjectPyfunc", "TabularPyfunc"]

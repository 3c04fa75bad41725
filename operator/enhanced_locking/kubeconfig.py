"""A kubeconfig file that is not one: how the commands that read one tell the user.

The Kubernetes client library reads the file with ``yaml.safe_load`` and then indexes what it
got: YAML that does not parse raises a ``yaml.YAMLError``, YAML of another shape (a list, a
word, ``clusters: 5``) a ``TypeError`` or the like, and neither says which file it was.
"""

from __future__ import annotations

import yaml

#: What loading a kubeconfig raises when the file is not a kubeconfig's YAML mapping.
NOT_A_KUBECONFIG: tuple[type[Exception], ...] = (
    yaml.YAMLError, TypeError, AttributeError, KeyError, ValueError)


def not_a_kubeconfig(where: str, error: Exception) -> str:
    """One line: ``where`` (the flag or variable and the file) is not a kubeconfig, and why."""
    why = ("its YAML does not parse" if isinstance(error, yaml.YAMLError)
           else f"not a kubeconfig's mapping, {type(error).__name__}")
    return f"{where}: not a kubeconfig file ({why}): {' '.join(str(error).split())}"

"""Exceptions of the sandbox provider.

The sandbox is a test double with no dependency on the packages it tests, so it has its own small
tree::

    SandboxError
    └── SandboxConfigError   invalid settings (constructor, CLI or ``POST /_admin/faults``)
"""

from __future__ import annotations

__all__ = ["SandboxConfigError", "SandboxError"]


class SandboxError(Exception):
    """Root of every exception the sandbox raises."""


class SandboxConfigError(SandboxError, ValueError):
    """A setting is invalid; the message names the setting and never echoes secrets."""

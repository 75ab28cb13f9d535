"""Datapath errors: one type per missing prerequisite, each message says what to do.

The CLI prints ``str(exc)`` and exits non-zero; no traceback ever reaches an operator.
"""

from __future__ import annotations


class DatapathError(Exception):
    """Base of every error raised by ``shuntd.datapath``."""


class PrerequisiteError(DatapathError):
    """The host cannot run the XDP datapath as it stands."""


class NotPrivilegedError(PrerequisiteError):
    """Neither root nor CAP_BPF + CAP_NET_ADMIN."""


class KernelHeadersMissingError(PrerequisiteError):
    """bcc compiles the program at start-up and needs the running kernel's headers."""


class BtfMissingError(PrerequisiteError):
    """The kernel exposes no BTF (/sys/kernel/btf/vmlinux)."""


class KernelTooOldError(PrerequisiteError):
    """The kernel lacks a feature the datapath relies on."""


class BpffsError(PrerequisiteError):
    """bpffs is not mounted and could not be mounted."""


class InterfaceError(DatapathError):
    """The capture interface cannot take the program."""


class InterfaceMissingError(InterfaceError):
    """No interface of that name."""


class InterfaceDownError(InterfaceError):
    """The interface exists but is administratively down."""


class XdpAlreadyAttachedError(InterfaceError):
    """Another XDP program (ours from a stale run, or someone else's) is on the interface."""


class MtuTooLargeError(InterfaceError):
    """Native XDP without multi-buffer support refuses this MTU."""


class AttachError(DatapathError):
    """The kernel refused the attach for another reason."""


class PinError(DatapathError):
    """A pinned map exists but cannot be used (wrong layout, not a map, permissions)."""

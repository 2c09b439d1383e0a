"""Errors that reach the user as one clear line: what, where, why."""

from __future__ import annotations


class AifError(Exception):
    """A failure the user can act on. ``str(err)`` is the one line the CLI prints."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        # Keep it on one line: the CLI prints exactly this.
        super().__init__(" ".join(message.split()))


class ConfigError(AifError):
    """A profile, start-up or flag is wrong."""

    exit_code = 2


class DataError(AifError):
    """Input data does not match its contract (schema, corruption, missing objects)."""


class StorageError(AifError):
    """An object store or filesystem cannot be reached or lacks a bucket/path."""


class SlurmError(AifError):
    """A Slurm command failed or a job ended badly."""


class SlurmCommandError(SlurmError):
    """One Slurm command exited non-zero; carries the command, exit code and output."""

    def __init__(self, cmd: list[str], returncode: int, stdout: str, stderr: str) -> None:
        self.cmd = cmd
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        detail = (stderr.strip() or stdout.strip() or "no output").splitlines()
        tail = detail[-1] if detail else ""
        super().__init__(
            f"slurm command `{' '.join(cmd)}` failed with exit code {returncode}: {tail}"
        )


class TrainingError(AifError):
    """A training job ended in a state other than COMPLETED."""


class SiteError(AifError):
    """A part of the local site failed to start or is not running."""


class TenancyError(AifError):
    """A run of one start-up would reach another start-up's lake prefix or Slurm account."""

    exit_code = 6

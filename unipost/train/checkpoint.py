"""Crash-safe training checkpoints: a checkpoint either exists completely and verifiably, or not at all.

Why this much care: an iteration of agent post-training is minutes to hours of rollouts, and runs are
killed (OOM, pre-emption, ``kill -9``) at arbitrary moments. ``unipost train --resume`` must then
continue from the last *complete* iteration and reproduce the uninterrupted run bit for bit on CPU. So a
checkpoint has to survive a kill at any instruction, and a damaged one must be noticed, not loaded.

Layout of one checkpoint, ``root/iter-{iteration:06d}/``::

    model.safetensors   weights (shared/tied tensors stored once, via ``safetensors.torch.save_model``)
    optimizer.pt        ``optimizer.state_dict()``  (only when an optimizer was given)
    scheduler.pt        ``scheduler.state_dict()``  (only when a scheduler was given)
    rng.pt              python ``random``, numpy global, torch CPU (+ every CUDA device) RNG states
    state.json          the caller's ``state`` (iteration, trajectory-store position, metrics, config)
    manifest.json       sha256 + size of every file above; written LAST

How a save stays atomic: everything is written into ``root/.tmp-iter-.../``, each file ``fsync``'ed,
then the manifest (also fsync'ed), then the temp directory is renamed onto its final name with
``os.replace`` and ``root`` is fsync'ed so the rename itself is durable. A kill before the rename
leaves only a ``.tmp-*`` directory, which :meth:`CheckpointManager.latest` ignores (with a warning) and
the next :meth:`CheckpointManager.save` removes. Deletions (retention, replacing a checkpoint of the
same iteration) first rename the victim to ``.trash-*``, so a kill mid-delete never leaves a
half-deleted ``iter-*`` that looks like a checkpoint.

How damage is detected: :meth:`CheckpointManager.latest` re-hashes every file against the manifest
(missing manifest, missing file, size or checksum mismatch, unreadable JSON) and falls back to the
previous valid checkpoint, warning with a :class:`CheckpointWarning` that names the problem.

What is *not* captured: RNGs the caller owns (a ``numpy.random.Generator``, a ``torch.Generator``,
a dataloader's sampler). Put their state into ``state`` or reseed them from ``state["iteration"]``.
One writer per ``root``: a save removes every leftover ``.tmp-*``/``.trash-*`` directory in it.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import random
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_model as _st_load_model
from safetensors.torch import save_model as _st_save_model

from unipost._secrets import check_no_secrets

log = logging.getLogger(__name__)

__all__ = ["Checkpoint", "CheckpointError", "CheckpointManager", "CheckpointWarning", "check_no_secrets"]

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "scheduler.pt"
RNG_FILE = "rng.pt"
STATE_FILE = "state.json"
MANIFEST_FILE = "manifest.json"
_REQUIRED = (MODEL_FILE, RNG_FILE, STATE_FILE)
_FORMAT = 1

_FINAL_RE = re.compile(r"^iter-(\d{6,})$")
_TMP_RE = re.compile(r"^\.tmp-iter-(\d{6,})-")
_TRASH_PREFIX = ".trash-"
_HASH_CHUNK = 1 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be loaded: it is damaged, or it does not fit the objects given to load it."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (damaged or half-written) in favour of an older one, or none is usable."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint directory and whether it passed verification.

    ``problem`` says what is wrong when ``valid`` is False, e.g. ``"checksum mismatch in
    model.safetensors ..."``.
    ``temporary`` marks a ``.tmp-*`` directory left behind by a save that was interrupted.
    """

    path: Path
    iteration: int
    valid: bool
    problem: str | None = None
    temporary: bool = False
    created: float | None = None

    def describe(self) -> str:
        status = "ok" if self.valid else f"INVALID: {self.problem}"
        return f"iteration {self.iteration} at {self.path} ({status})"


# --------------------------------------------------------------------------------------------- secrets
# One scrubber for stores, checkpoints, metrics and logs (unipost/_secrets.py): nested dicts and lists,
# URL userinfo, Authorization headers, argv flags and configured key values are all refused here.
# Re-exported: ``from unipost.train.checkpoint import check_no_secrets`` keeps working.

# ------------------------------------------------------------------------------------------ filesystem


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _torch_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as fh:
        torch.save(obj, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _write_json(obj: Any, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())


def _remove_dir(path: Path, root: Path) -> None:
    """Delete a directory so that a kill mid-way never leaves a half-deleted ``iter-*`` behind."""
    trash = root / f"{_TRASH_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(path, trash)
    except FileNotFoundError:
        return
    _fsync_dir(root)
    shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- RNG


def _capture_rng() -> dict[str, Any]:
    version, mt_state, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(mt_state, dtype=torch.int64),
            "gauss": gauss_next,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def _restore_rng(state: Mapping[str, Any], where: Path) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["kind"],
            npy["keys"].numpy().astype(np.uint32),
            npy["pos"],
            npy["has_gauss"],
            npy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    cuda_states = state.get("cuda") or []
    if cuda_states:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda_states):
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            have = torch.cuda.device_count() if torch.cuda.is_available() else 0
            warnings.warn(
                f"{where} holds RNG states for {len(cuda_states)} CUDA device(s) but {have} are visible; "
                "CUDA RNGs were not restored, so GPU sampling will not repeat the original run exactly",
                CheckpointWarning,
                stacklevel=3,
            )


# ----------------------------------------------------------------------------------------- the manager


class CheckpointManager:
    """Writes, verifies, lists, prunes and loads the checkpoints under one run directory.

    ``keep``: how many complete checkpoints to keep; older ones are deleted only after the new one is
    complete, so there is always at least one valid checkpoint on disk once the first save returns.
    """

    def __init__(self, root: str | os.PathLike[str], keep: int = 2) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1 (the number of checkpoints to retain), got {keep!r}")
        self.root = Path(root)
        self.keep = keep

    def __repr__(self) -> str:
        return f"CheckpointManager(root={str(self.root)!r}, keep={self.keep})"

    # ---------------------------------------------------------------------------------------- save

    def save(
        self,
        iteration: int,
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        state: Mapping[str, Any],
    ) -> Path:
        """Atomically write checkpoint ``iteration`` and return its directory.

        ``state`` must be JSON-serialisable and free of credentials (see :func:`check_no_secrets`).
        Saving iteration ``k`` makes it the newest checkpoint: a checkpoint of the same iteration is
        replaced, and any with a *higher* iteration (a timeline abandoned by resuming from an older
        checkpoint) is deleted once the new one is complete.
        """
        if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
            raise ValueError(f"iteration must be a non-negative int, got {iteration!r}")
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a dict (JSON-serialisable), got {type(state).__name__}")
        check_no_secrets(state)
        try:
            state_json = json.dumps(dict(state), sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"state must be JSON-serialisable (plain dicts, lists, str, numbers, bool, None): {exc}. "
                "Convert tensors with .item()/.tolist() and paths with str()."
            ) from exc

        self.root.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()
        name = f"iter-{iteration:06d}"
        tmp = self.root / f".tmp-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            written = self._write_files(tmp, iteration, model, optimizer, scheduler, state_json)
            manifest = {
                "format": _FORMAT,
                "iteration": iteration,
                "created": time.time(),
                "files": {
                    fname: {"sha256": _sha256(tmp / fname), "size": (tmp / fname).stat().st_size}
                    for fname in written
                },
            }
            _write_json(manifest, tmp / MANIFEST_FILE)
            _fsync_dir(tmp)
            final = self.root / name
            if final.exists():
                _remove_dir(final, self.root)
            os.replace(tmp, final)
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self._prune(iteration)
        log.info("saved checkpoint %s", final)
        return final

    def _write_files(
        self,
        tmp: Path,
        iteration: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any | None,
        state_json: str,
    ) -> list[str]:
        # save_model drops the duplicate names of shared (tied) tensors; load_model re-ties them.
        _st_save_model(model, str(tmp / MODEL_FILE), metadata={"iteration": str(iteration)})
        _fsync_file(tmp / MODEL_FILE)
        written = [MODEL_FILE]
        if optimizer is not None:
            _torch_save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
            written.append(OPTIMIZER_FILE)
        if scheduler is not None:
            _torch_save(scheduler.state_dict(), tmp / SCHEDULER_FILE)
            written.append(SCHEDULER_FILE)
        _torch_save(_capture_rng(), tmp / RNG_FILE)
        written.append(RNG_FILE)
        with open(tmp / STATE_FILE, "w", encoding="utf-8") as fh:
            fh.write(state_json)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        written.append(STATE_FILE)
        return written

    def _clean_leftovers(self) -> None:
        for child in self.root.iterdir():
            if child.is_dir() and (_TMP_RE.match(child.name) or child.name.startswith(_TRASH_PREFIX)):
                log.warning("removing %s left behind by an interrupted checkpoint save/delete", child)
                shutil.rmtree(child, ignore_errors=True)

    def _prune(self, newest: int) -> None:
        finals = [c for c in self.list(verify=False) if not c.temporary]
        for ckpt in finals:
            if ckpt.iteration > newest:
                log.warning(
                    "deleting %s: newer than the checkpoint just saved (iteration %d), so it belongs to an "
                    "abandoned run timeline",
                    ckpt.path,
                    newest,
                )
                _remove_dir(ckpt.path, self.root)
        # Retain the newest `keep` complete (manifest present) checkpoints; everything older goes,
        # including damaged ones, which can never be resumed from anyway.
        older = sorted((c for c in finals if c.iteration <= newest), key=lambda c: c.iteration, reverse=True)
        kept = 0
        for ckpt in older:
            if kept >= self.keep:
                _remove_dir(ckpt.path, self.root)
            elif ckpt.valid:
                kept += 1

    # -------------------------------------------------------------------------------------- inspect

    def list(self, *, verify: bool = True) -> builtins.list[Checkpoint]:
        """Every checkpoint directory under ``root`` (including ``.tmp-*`` leftovers), oldest first.

        With ``verify=True`` every file is re-hashed against the manifest; with ``verify=False`` only
        the manifest's presence and readability are checked (cheap, used for pruning).
        """
        if not self.root.is_dir():
            return []
        found: builtins.list[Checkpoint] = []
        for child in self.root.iterdir():
            if not child.is_dir():
                continue
            if m := _FINAL_RE.match(child.name):
                found.append(_inspect(child, int(m.group(1)), full=verify))
            elif m := _TMP_RE.match(child.name):
                found.append(
                    Checkpoint(
                        child,
                        int(m.group(1)),
                        valid=False,
                        problem="half-written: temp directory left by an interrupted save "
                        "(removed on the next save)",
                        temporary=True,
                    )
                )
        found.sort(key=lambda c: (c.iteration, not c.temporary))
        return found

    def latest(self) -> Checkpoint | None:
        """The newest valid checkpoint, or ``None``; warns about every newer one that was skipped and why."""
        ckpts = self.list(verify=True)
        skipped: builtins.list[Checkpoint] = []
        for ckpt in reversed(ckpts):
            if ckpt.valid:
                for bad in skipped:
                    warnings.warn(
                        f"skipping checkpoint {bad.path.name} in {self.root}: {bad.problem}; "
                        f"using iteration {ckpt.iteration} instead",
                        CheckpointWarning,
                        stacklevel=2,
                    )
                return ckpt
            skipped.append(ckpt)
        if skipped:
            reasons = "; ".join(f"{c.path.name}: {c.problem}" for c in reversed(skipped))
            warnings.warn(
                f"no valid checkpoint in {self.root} ({reasons}); starting from scratch",
                CheckpointWarning,
                stacklevel=2,
            )
        return None

    # ----------------------------------------------------------------------------------------- load

    def load(
        self,
        checkpoint: Checkpoint | str | os.PathLike[str],
        *,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        restore_rng: bool = True,
    ) -> dict[str, Any]:
        """Verify ``checkpoint``, restore model/optimizer/scheduler (and RNGs) in place; return ``state``.

        Restoring the RNGs too means the continuation samples exactly what the uninterrupted run would
        have sampled, which is what makes a resumed CPU run bit-identical.
        """
        path = checkpoint.path if isinstance(checkpoint, Checkpoint) else Path(checkpoint)
        m = _FINAL_RE.match(path.name)
        info = _inspect(path, int(m.group(1)) if m else -1, full=True)
        if not info.valid:
            raise CheckpointError(f"cannot load checkpoint {path}: {info.problem}")
        files = set(_read_json(path / MANIFEST_FILE)["files"])

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        try:
            _st_load_model(model, path / MODEL_FILE, strict=True, device=str(device))
        except RuntimeError as exc:
            raise CheckpointError(
                f"{path / MODEL_FILE} does not fit the model given ({type(model).__name__}): {exc}"
            ) from exc
        if optimizer is not None:
            if OPTIMIZER_FILE not in files:
                raise CheckpointError(f"{path} has no optimizer state (it was saved without an optimizer)")
            try:
                optimizer.load_state_dict(
                    torch.load(path / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
                )
            except (ValueError, KeyError) as exc:
                raise CheckpointError(
                    f"{path / OPTIMIZER_FILE} does not fit the optimizer given: {exc}"
                ) from exc
        if scheduler is not None:
            if SCHEDULER_FILE not in files:
                raise CheckpointError(f"{path} has no scheduler state (it was saved without a scheduler)")
            scheduler.load_state_dict(
                torch.load(path / SCHEDULER_FILE, map_location="cpu", weights_only=True)
            )
        if restore_rng:
            _restore_rng(torch.load(path / RNG_FILE, map_location="cpu", weights_only=True), path)
        return _read_json(path / STATE_FILE)


def _read_json(path: Path) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def _inspect(path: Path, iteration: int, *, full: bool) -> Checkpoint:
    """Check one ``iter-*`` directory against its manifest; the first problem found is reported."""

    def bad(problem: str) -> Checkpoint:
        return Checkpoint(path, iteration, valid=False, problem=problem)

    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return bad("missing manifest.json (the save did not finish)")
    try:
        manifest = _read_json(manifest_path)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError("'files' is not an object")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return bad(f"unreadable manifest.json ({exc})")
    if manifest.get("iteration") != iteration:
        return bad(
            f"manifest.json says iteration {manifest.get('iteration')!r}, directory name says {iteration}"
        )
    for required in _REQUIRED:
        if required not in files:
            return bad(f"manifest.json does not list {required}")
    for fname, meta in files.items():
        if not isinstance(meta, dict) or fname in ("", ".", "..") or "/" in fname or "\\" in fname:
            return bad(f"manifest.json entry {fname!r} is not a file record of this directory")
        fpath = path / fname
        if not fpath.is_file():
            return bad(f"missing file {fname}")
        size = fpath.stat().st_size
        if size != meta.get("size"):
            return bad(f"size mismatch in {fname}: {size} bytes on disk, {meta.get('size')} in manifest")
        if full and _sha256(fpath) != meta.get("sha256"):
            return bad(f"checksum mismatch in {fname} (sha256 differs from manifest)")
    if full:
        try:
            _read_json(path / STATE_FILE)
        except (OSError, ValueError) as exc:
            return bad(f"unreadable state.json ({exc})")
    return Checkpoint(path, iteration, valid=True, created=manifest.get("created"))

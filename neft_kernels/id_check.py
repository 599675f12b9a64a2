"""Out-of-range ids: refused with an ``IndexError`` naming the bad range, never with a host-device sync.

* CPU ids are checked where they are read (the backends raise before returning; no device, no sync).
* Accelerator ids: the forward kernel folds the (min, max) of out-of-range ids and its table's
  ``V`` into a small per-device buffer (and writes NaN rows for them; no backend ever reads
  outside the table).
  - The CUDA extension's kernel also sets a word in host memory (mapped into the GPU's address
    space). Each call reads that word, a host load; the first call on the device (a forward, or a
    backward) that finds it set copies the record, waiting for the GPU (only then: the call raises),
    and raises. So the error comes with the first call after the bad launch has run on the GPU.
  - Other backends' records are copied to pinned host memory after each launch without blocking
    (one copy in flight at a time); the first later call that finds the copy landed raises: a call
    or a few late.
  The hot path never waits for the GPU.
"""

from __future__ import annotations

import ctypes
import os
from typing import Callable

import torch

from .compat import assume_constant_result

_INT64_MAX, _INT64_MIN = (1 << 63) - 1, -(1 << 63)
_enabled = os.environ.get("NEFT_KERNELS_CHECK_IDS", "1") != "0"
_flags: dict[torch.device, "DeviceIdFlag"] = {}


def set_id_check(enabled: bool) -> bool:
    """Turn the id range check on accelerator tensors on or off; returns the previous setting.

    On by default (``NEFT_KERNELS_CHECK_IDS=0`` turns it off at import). It waits for the GPU only
    on a call that raises: the kernel records bad ids on the device and a later call raises the
    error (see the module docstring). Off, a bad id is still never read: its output row is NaN and
    it gets no gradient. CPU ids are always checked.
    """
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def out_of_range_message(lo: int, hi: int, num_embeddings: int, *, late: bool = False) -> str:
    where = " (recorded by an earlier call's kernel, whose rows for them were NaN)" if late else ""
    return f"input_ids must lie in [0, {num_embeddings}), got values in [{lo}, {hi}]{where}"


def raise_out_of_range(lo: int, hi: int, num_embeddings: int, *, late: bool = False) -> None:
    raise IndexError(out_of_range_message(lo, hi, num_embeddings, late=late))


_EMPTY = (_INT64_MAX, _INT64_MIN, 0)  # (min bad id, max bad id, V): nothing recorded


def check_id_range(ids: torch.Tensor, num_embeddings: int, *, allow_sync: bool = True) -> None:
    """Refuse ids outside ``[0, num_embeddings)``: CPU ids always, accelerator ids only where a sync
    is allowed (the public backward op) and not while a CUDA graph is being captured."""
    if not ids.numel():
        return
    if ids.device.type != "cpu":
        capturing = ids.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not (_enabled and allow_sync) or capturing:
            return
    lo, hi = torch.aminmax(ids)
    if bool((lo < 0) | (hi >= num_embeddings)):
        raise_out_of_range(int(lo), int(hi), num_embeddings)


class DeviceIdFlag:
    """One device's record of out-of-range ids: ``buffer`` = (min, max, V) on the device, read back lazily."""

    def __init__(self, device: torch.device):
        self.device = device
        with torch.cuda.device(device):
            # Filled on the device (no host-to-device copy, which would sync from pageable memory).
            self.buffer = torch.empty(len(_EMPTY), dtype=torch.int64, device=device)
            self._clear()
            self._event = torch.cuda.Event()
            self._event.record()  # creates the CUDA event now: the native read-back takes its handle
        self._host = torch.tensor(_EMPTY, dtype=torch.int64).pin_memory()
        self._pending = False
        # Where the CUDA extension is built: its copy and event record (about a third of the host time
        # of copy_ and record under a device guard), and the word its kernel sets.
        from .backends import cuda_id_check

        native = cuda_id_check(device)
        self._native_read_back: Callable | None
        self._native_read_back, word = native if native is not None else (None, None)
        self._word = None if word is None else ctypes.c_int32.from_address(word)

    def _clear(self) -> None:
        for i, value in enumerate(_EMPTY):
            self.buffer[i].fill_(value)

    def pending_error(self) -> str | None:
        """The error for bad ids an earlier launch recorded: where the CUDA extension's kernel set the
        word, read now (the one wait for the GPU, on a call that raises); else if the copy after a
        launch has landed (never waits). The record is then cleared, so each is reported once."""
        if self._word is not None and self._word.value:
            lo, hi, num_embeddings = self._read_record()
        elif not self._pending or not self._event.query():
            return None
        else:
            self._pending = False
            lo, hi, num_embeddings = self._host.tolist()
        if lo > hi:
            return None
        with torch.cuda.device(self.device):
            self._clear()
        return out_of_range_message(lo, hi, num_embeddings, late=True)

    def raise_pending(self) -> None:
        """Raise :meth:`pending_error`'s error, if there is one."""
        message = self.pending_error()
        if message is not None:
            raise IndexError(message)

    def _read_record(self) -> list[int]:
        """The record, once the device has finished: the one, deliberate wait of a call that raises
        (``torch.cuda.set_sync_debug_mode`` is suspended for it, so that the IndexError, not a
        sync error, reaches the user)."""
        debug = torch.cuda.get_sync_debug_mode()
        if debug:
            torch.cuda.set_sync_debug_mode(0)
        try:
            # Whatever stream the bad launch was on: its other threads' records and stores have then
            # landed, so the record is whole and the word stays clear.
            torch.cuda.synchronize(self.device)
            assert self._word is not None  # pending_error reads the record only where the word is set
            self._word.value = 0
            self._pending = False  # a copy in flight holds no more than the record read here
            with torch.cuda.device(self.device):
                return self.buffer.tolist()
        finally:
            if debug:
                torch.cuda.set_sync_debug_mode(debug)

    def after_launch(self, backend: str) -> None:
        """After a launch of ``backend``'s kernel: the CUDA extension's sets the word itself; the
        others' records are copied back."""
        if backend != "cuda" or self._word is None:
            self.read_back()

    def read_back(self) -> None:
        """Start copying the record to the host, unless a copy is in flight. The copy and the event go
        on the buffer's device's current stream, where the kernel ran."""
        if self._pending or torch.cuda.is_current_stream_capturing():
            return
        if self._native_read_back is not None:
            self._native_read_back(self._host, self.buffer, self._event.cuda_event)
        else:
            with torch.cuda.device(self.device):
                self._host.copy_(self.buffer, non_blocking=True)
                self._event.record()
        self._pending = True


def pending_error(device: torch.device) -> str | None:
    """The error for what earlier launches on ``device`` recorded, if it has reached the host (the
    backward's check; the CUDA extension's autograd node raises it as an IndexError)."""
    flag = _flags.get(device)
    if flag is None or torch.cuda.is_current_stream_capturing():
        return None
    return flag.pending_error()


def raise_pending(device: torch.device) -> None:
    """Raise :func:`pending_error`'s error, if there is one."""
    message = pending_error(device)
    if message is not None:
        raise IndexError(message)


@assume_constant_result
def prepare_flag(device: torch.device) -> None:
    """Make ``device``'s flag now, while a graph is traced: made at a compiled graph's first run, its
    buffer would come from that graph's CUDA-graph memory pool (``mode="reduce-overhead"``'s warm-up
    run), which refuses tensors that outlive the run. (A constant result: dynamo runs this eagerly
    at trace time and leaves it out of the graph.)"""
    if device.type == "cuda" and device not in _flags and not torch.cuda.is_current_stream_capturing():
        _flags[device] = DeviceIdFlag(device)


def device_id_flag(ids: torch.Tensor) -> DeviceIdFlag | None:
    """The flag for a launch on ``ids``'s CUDA device (raising what earlier launches recorded), or None."""
    if not _enabled or not ids.is_cuda:
        return None
    flag = _flags.get(ids.device)
    capturing = torch.cuda.is_current_stream_capturing()
    if flag is None:
        if capturing:  # allocating and copying are not allowed in capture; replays go unrecorded
            return None
        flag = _flags[ids.device] = DeviceIdFlag(ids.device)
    if not capturing:
        flag.raise_pending()
    return flag

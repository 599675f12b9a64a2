"""Reliability promises, on every backend this machine runs: bad input refused, edge cases,
64-bit indexing, determinism."""

import pytest
import torch
import torch.nn.functional as F

from neft_kernels import NoisyEmbedding, add_noise, noisy_embedding, set_id_check
from neft_kernels.backends import module
from neft_kernels.distributed import rank_offset

from support.asserts import assert_bits_equal
from support.backends import KERNELS, kernel_alone, on_backends, runnable
from support.cases import expected, make_weight, side_inputs


@on_backends("torch", "cpu", "triton", device="cpu")  # CUDA ids raise later, without a sync: tests/kernels/test_gpu.py
@pytest.mark.parametrize("bad", [[[1, 5]], [[-1, 2]], [[0, 1 << 40]]])
def test_out_of_range_ids_are_refused(backend, device, bad):
    weight = torch.zeros(5, 4, device=device)
    with pytest.raises(IndexError, match=r"input_ids must lie in \[0, 5\), got values in"):
        noisy_embedding(torch.tensor(bad, device=device), weight, 1.0, seed=0, backend=backend)


def test_cpu_ids_are_checked_even_with_the_device_check_off():
    previous = set_id_check(False)
    try:
        with pytest.raises(IndexError, match=r"input_ids must lie in \[0, 5\), got values in \[7, 7\]"):
            noisy_embedding(torch.tensor([7]), torch.zeros(5, 4), 1.0, seed=0)
    finally:
        set_id_check(previous)


@on_backends(*KERNELS)  # the reference relies on torch's own checks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [9, 64])  # one lane a thread; 16 bytes a thread on the CUDA kernels
@pytest.mark.parametrize("scale,gaussian", [(0.25, False), (0.0, False), (0.25, True)])
def test_kernels_never_read_or_write_out_of_range_rows(backend, device, dtype, d, scale, gaussian):
    """Called with no check at all, a bad id yields a NaN row (noised or not, either stream) and no
    gradient, never a stray access."""
    weight = make_weight(6, d, dtype, device)
    ids = torch.tensor([2, 6, -1, 5, -(1 << 40), 1 << 40], device=device)
    out = kernel_alone(backend, ids, weight, scale, gaussian)
    bad = torch.tensor([False, True, True, False, True, True])
    assert out[bad.to(device)].isnan().all() and not out[~bad.to(device)].isnan().any()
    grad = module(backend).backward(torch.ones(6, d, dtype=dtype, device=device), ids, 6, None, True)
    want = torch.zeros(6, d, dtype=dtype)
    want[[2, 5]] = 1
    assert torch.equal(grad.cpu(), want)


def test_the_reference_never_reads_out_of_range_rows():
    """Unchecked ids (an accelerator's, whose check is recorded, not raised, at the call) give NaN rows
    and no gradient, as in the kernels."""
    from neft_kernels.backends.reference import reference_backward, reference_forward

    weight = make_weight(6, 9, torch.float32, "cpu")
    out = reference_forward(torch.tensor([2, 6, -1, 5]), weight, 0.25, 3)
    assert out[[1, 2]].isnan().all() and not out[[0, 3]].isnan().any()
    assert reference_forward(torch.tensor([0]), weight[:0], 0.25, 3).isnan().all()
    grad = reference_backward(torch.ones(5, 3), torch.tensor([-1, 1, 1, 4, 2]), 4, 2, False)
    assert torch.equal(grad, torch.tensor([[0.0] * 3, [2.0] * 3, [0.0] * 3, [0.0] * 3]))


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_the_references_bad_id_record_matches_the_kernels(dtype):
    """The (min, max, V) record the reference keeps for accelerator ids, checked on CPU tensors: good
    ids of either width leave it empty, bad ones widen it."""
    from neft_kernels.backends.reference import record_bad_ids
    from neft_kernels.id_check import _EMPTY

    record = torch.tensor(_EMPTY)
    record_bad_ids(torch.tensor([0, 3, 10], dtype=dtype), 11, record)
    assert record.tolist() == list(_EMPTY)
    record_bad_ids(torch.tensor([[4, 11], [-2, 0]], dtype=dtype), 11, record)
    record_bad_ids(torch.tensor([1 << 30, 5], dtype=dtype), 7, record)
    assert record.tolist() == [-2, 1 << 30, 11]


@on_backends()
def test_edge_shapes_and_dtypes(backend, device):
    weight = make_weight(11, 6, torch.float32, device)  # d not a multiple of 4
    empty = torch.zeros(0, 4, dtype=torch.long, device=device)
    assert noisy_embedding(empty, weight, 5.0, seed=1, attention_mask=empty, backend=backend).shape == (0, 4, 6)
    one_d = torch.tensor([3, 1, 4, 1, 5], device=device)
    out = noisy_embedding(one_d, weight, 5.0, seed=1, backend=backend)
    assert_bits_equal(out, expected(one_d, weight, 5.0, 1, 0, None, None, "per_sequence"))
    assert_bits_equal(noisy_embedding(one_d.int(), weight, 5.0, seed=1, backend=backend), out)
    scalar = noisy_embedding(torch.tensor(4, device=device), weight, 5.0, seed=1, backend=backend)
    assert scalar.shape == (6,)
    d1 = make_weight(11, 1, torch.bfloat16, device)
    assert_bits_equal(noisy_embedding(one_d, d1, 5.0, seed=2, backend=backend),
                      expected(one_d, d1, 5.0, 2, 0, None, None, "per_sequence"))


@on_backends()
def test_non_contiguous_weights_give_the_contiguous_bits(backend, device):
    base = make_weight(13, 20, torch.bfloat16, device)
    ids = torch.randint(0, 13, (2, 7), generator=torch.Generator().manual_seed(0)).to(device)
    for weight in (base[:, 3:17], base.t().contiguous().t(), base[::2]):
        ids_w = ids % weight.shape[0]
        out = noisy_embedding(ids_w, weight, 5.0, seed=4, backend=backend)
        assert_bits_equal(out, noisy_embedding(ids_w, weight.contiguous(), 5.0, seed=4, backend=backend))


@on_backends()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_with_no_real_tokens_are_untouched_and_finite(backend, device, dtype):
    weight = make_weight(17, 8, dtype, device)
    ids = torch.randint(0, 17, (3, 11), generator=torch.Generator().manual_seed(1)).to(device)
    mask, pos = side_inputs("both", (3, 11), device)  # row 2 has no real token
    out = noisy_embedding(ids, weight, 5.0, seed=9, attention_mask=mask, position_ids=pos, backend=backend)
    assert torch.isfinite(out.float()).all()
    assert_bits_equal(out[2], F.embedding(ids[2], weight))
    assert_bits_equal(out[mask == 0], F.embedding(ids, weight)[mask == 0])


@on_backends()
def test_negative_padding_idx_counts_from_the_end(backend, device):
    weight = make_weight(9, 5, torch.float32, device).requires_grad_()
    ids = torch.tensor([[8, 1, 8, 2]], device=device)
    noisy_embedding(ids, weight, 5.0, seed=0, padding_idx=-1, backend=backend).sum().backward()
    assert weight.grad[8].eq(0).all() and weight.grad[1].eq(1).all() and weight.grad[2].eq(1).all()


@on_backends()
def test_same_seed_same_bits_other_seed_other_noise(backend, device):
    weight = make_weight(30, 24, torch.bfloat16, device)
    ids = torch.randint(0, 30, (4, 9), generator=torch.Generator().manual_seed(2)).to(device)
    mask, _ = side_inputs("mask", (4, 9), device)
    runs = [noisy_embedding(ids, weight, 5.0, seed=s, attention_mask=mask, backend=backend) for s in (11, 11, 12)]
    assert_bits_equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_grad_by_freq", [False, True])
def test_backward_is_bitwise_reproducible_and_equal_across_backends(dtype, scale_grad_by_freq):
    """The default backward, no deterministic mode asked for."""
    ids = torch.randint(0, 20, (6, 33), generator=torch.Generator().manual_seed(3))
    grad = torch.randn(6, 33, 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    grads = {}
    for backend, device in runnable():
        if device == "cuda" and backend == "torch":
            continue  # index_add_'s CUDA atomics: the reference promises the sum, not its order there
        weight = make_weight(20, 16, dtype, device).requires_grad_()
        runs = []
        for _ in range(2):
            out = noisy_embedding(ids.to(device), weight, 5.0, seed=5, padding_idx=4,
                                  scale_grad_by_freq=scale_grad_by_freq, backend=backend)
            runs.append(torch.autograd.grad(out, weight, grad.to(device))[0].cpu())
        assert_bits_equal(runs[0], runs[1])
        grads[backend, device] = runs[0]
    assert len(grads) >= 2, grads.keys()  # the reference and at least one kernel
    first = next(iter(grads.values()))
    for g in grads.values():  # every backend sums each id's rows in token order in float32
        assert_bits_equal(g, first)


def test_noise_alpha_is_validated_when_set_on_the_module():
    emb = NoisyEmbedding(5, 3)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="noise_alpha"):
            emb.noise_alpha = bad
    assert emb.noise_alpha == 5.0


def test_tensors_on_different_devices_are_refused():
    weight = torch.zeros(5, 4)
    with pytest.raises(ValueError, match="input_ids on meta but weight on cpu"):
        noisy_embedding(torch.zeros(2, dtype=torch.long, device="meta"), weight, 1.0, seed=0)
    with pytest.raises(ValueError, match="attention_mask on meta"):
        noisy_embedding(torch.zeros(1, 2, dtype=torch.long), weight, 1.0, seed=0,
                        attention_mask=torch.ones(1, 2, dtype=torch.long, device="meta"))


# CPU tensors: "triton" runs under the interpreter, which a machine with a GPU does not use; there
# tests/kernels/test_gpu.py::test_64_bit_row_offsets runs the compiled kernels on the same case.
V_PAST_INT32, D_PAST_INT32 = (1 << 20) + 64, 2048  # V * d > 2**31: a 4.3 GB bf16 table
ROWS_PAST_INT32 = torch.tensor([V_PAST_INT32 - 1, V_PAST_INT32 - 2, (1 << 20) + 7, 0])


def _table_past_int32() -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, the values of ROWS_PAST_INT32): a table whose other rows are never touched (no memory)."""
    weight = torch.empty(V_PAST_INT32, D_PAST_INT32, dtype=torch.bfloat16)  # untouched pages cost nothing
    values = torch.randn(4, D_PAST_INT32, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    weight[ROWS_PAST_INT32] = values
    return weight, values


@on_backends("torch", "cpu", "triton", device="cpu")
def test_64_bit_indexing_beyond_2_to_the_31_elements(backend, device):
    """Rows past the int32 element range come from the right place."""
    weight, values = _table_past_int32()
    out = noisy_embedding(ROWS_PAST_INT32.view(1, 4), weight, 5.0, seed=3, backend=backend)
    # The noise depends on token positions only: the same four rows as a small table give the same bits.
    assert_bits_equal(out, noisy_embedding(torch.arange(4).view(1, 4), values, 5.0, seed=3, backend="torch"))


@pytest.mark.slow  # writes a 4.3 GB gradient
@on_backends("cpu")
def test_64_bit_indexing_in_the_backward_beyond_2_to_the_31_elements(backend, device):
    """The backward writes rows past 2**31 elements to the right place too."""
    weight, _ = _table_past_int32()
    weight.requires_grad_()
    grad = torch.autograd.grad(noisy_embedding(ROWS_PAST_INT32.view(1, 4), weight, 5.0, seed=3, backend=backend),
                               weight, torch.ones(1, 4, D_PAST_INT32, dtype=torch.bfloat16))[0]
    assert grad[V_PAST_INT32 - 1].eq(1).all() and grad[(1 << 20) + 7].eq(1).all() and grad[1].eq(0).all()


@on_backends()
def test_add_noise_on_looked_up_rows_equals_the_fused_op(backend, device):
    weight = make_weight(40, 13, torch.bfloat16, device)
    ids = torch.randint(0, 40, (3, 11), generator=torch.Generator().manual_seed(5)).to(device)
    mask, pos = side_inputs("both", (3, 11), device)
    options = dict(seed=77, offset=1 << 48, attention_mask=mask, position_ids=pos, backend=backend)
    assert_bits_equal(add_noise(F.embedding(ids, weight), 5.0, **options),
                      noisy_embedding(ids, weight, 5.0, **options))


def test_without_torch_distributed_the_noise_rank_is_zero():
    assert not torch.distributed.is_initialized()
    assert rank_offset() == 0 and rank_offset(weight=torch.zeros(2, 2)) == 0


def test_max_norm_refuses_bad_ids_before_renormalizing_anything():
    emb = NoisyEmbedding(5, 4, max_norm=1.0).train()
    with torch.no_grad():
        emb.weight.mul_(10)
    before = emb.weight.detach().clone()
    for bad in ([[-1]], [[5]]):
        with pytest.raises(IndexError, match="input_ids must lie in"):
            emb(torch.tensor(bad))
    assert torch.equal(emb.weight, before)


def test_the_device_flags_read_back_and_late_raise(monkeypatch):
    """DeviceIdFlag's states on the CPU, with a stand-in event and native copy: one read-back in
    flight at a time, nothing raised before the copy lands, then the recorded range once, and the
    native copy given the pinned record, the device record and the event's handle."""
    import contextlib

    from neft_kernels import id_check
    from neft_kernels.id_check import _EMPTY, DeviceIdFlag

    class Event:
        landed, cuda_event = False, 1234

        def query(self):
            return self.landed

    copies = []
    flag = object.__new__(DeviceIdFlag)  # its __init__ allocates on a GPU
    flag.device, flag.buffer, flag._host = torch.device("cpu"), torch.tensor([-3, 70, 50]), torch.tensor(_EMPTY)
    flag._event, flag._pending, flag._word = Event(), False, None
    flag._native_read_back = lambda host, record, event: copies.append((host, record, event))
    flag._clear = lambda: flag.buffer.copy_(torch.tensor(_EMPTY))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    flag.read_back()
    flag.read_back()  # a copy in flight: no second one
    assert len(copies) == 1 and copies[0][0] is flag._host and copies[0][1] is flag.buffer and copies[0][2] == 1234
    flag.raise_pending()  # not landed: nothing yet
    flag._host.copy_(flag.buffer)  # the copy lands
    Event.landed = True
    with pytest.raises(IndexError, match=r"must lie in \[0, 50\), got values in \[-3, 70\] \(recorded by an earlier"):
        flag.raise_pending()
    flag.raise_pending()  # raised once
    assert flag.buffer.tolist() == list(_EMPTY)
    flag.read_back()
    assert len(copies) == 2
    # What the CUDA extension's autograd node calls back: the message, once, or None.
    monkeypatch.setitem(id_check._flags, flag.device, flag)
    flag._host.copy_(torch.tensor([5, 9, 4]))  # the second copy lands with another record
    assert id_check.pending_error(flag.device) == id_check.out_of_range_message(5, 9, 4, late=True)
    assert id_check.pending_error(flag.device) is None and id_check.pending_error(torch.device("meta")) is None


def _word_flag(monkeypatch, word):
    """A DeviceIdFlag on the CPU with stand-ins (its __init__ allocates on a GPU): an event that lands
    when told, a native copy that records its calls, the bad-id word given (or None), a device sync
    that records the word's value and the sync-debug mode when it runs, and a sync-debug mode of 2
    ("error") that the flag must suspend around its wait and restore."""
    import contextlib

    from neft_kernels.id_check import _EMPTY, DeviceIdFlag

    flag = object.__new__(DeviceIdFlag)
    flag.device, flag.buffer, flag._host = torch.device("cpu"), torch.tensor(_EMPTY), torch.tensor(_EMPTY)
    flag._event = type("Event", (), {"cuda_event": 1, "landed": False, "query": lambda self: self.landed})()
    flag._pending, flag._word, flag.copies, flag.syncs = False, word, [], []
    flag._native_read_back = lambda host, record, event: flag.copies.append(record.clone())
    flag._clear = lambda: flag.buffer.copy_(torch.tensor(_EMPTY))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    mode = [2]
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode[0])
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.__setitem__(0, m))
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda device=None: flag.syncs.append((None if word is None else word.value, mode[0])))
    flag.mode = mode
    return flag


def test_the_cuda_extensions_bad_id_word_raises_at_the_next_call_without_a_copy_per_call(monkeypatch):
    """Where the CUDA extension's kernel sets the host word: after its launches nothing is copied and
    nothing waits (the word is read instead); a set word makes the next check wait for the device
    (before it clears the word: later stores of that launch have landed), read the record and raise
    its range once, word and record cleared; other backends' launches still copy their record."""
    import ctypes

    from neft_kernels.id_check import _EMPTY

    flag = _word_flag(monkeypatch, ctypes.c_int32(0))
    flag.after_launch("cuda")
    flag.raise_pending()
    assert flag.copies == [] and flag.syncs == []  # good ids: no copy, no event, no wait
    flag.buffer.copy_(torch.tensor([-2, 60, 50]))  # what the kernel records, and the word it sets
    flag._word.value = 1
    with pytest.raises(IndexError, match=r"must lie in \[0, 50\), got values in \[-2, 60\]"):
        flag.raise_pending()
    assert flag.syncs == [(1, 0)]  # waited while the word was still set, with the sync-debug mode off
    assert flag.mode == [2]  # and restored
    assert flag._word.value == 0 and flag.buffer.tolist() == list(_EMPTY)
    flag.raise_pending()  # raised once
    assert len(flag.syncs) == 1
    flag.after_launch("triton")  # a backend that does not set the word: its record is copied back
    assert len(flag.copies) == 1 and flag._pending


def test_a_copy_in_flight_and_the_word_report_bad_ids_once(monkeypatch):
    """A Triton launch's copy in flight when a CUDA launch sets the word: the word's read reports the
    range, and the copy landing later (holding the same record) reports nothing more."""
    import ctypes

    flag = _word_flag(monkeypatch, ctypes.c_int32(0))
    flag.buffer.copy_(torch.tensor([70, 70, 50]))
    flag.after_launch("triton")  # its copy, in flight
    flag._host.copy_(flag.buffer)  # what that copy brings when it lands
    flag._word.value = 1
    with pytest.raises(IndexError, match=r"got values in \[70, 70\]"):
        flag.raise_pending()
    flag._event.landed = True
    flag.raise_pending()  # the copy's record was reported already
    assert not flag._pending


def test_without_the_word_the_cuda_path_copies_its_record(monkeypatch):
    """Where host memory could not be mapped (no word), the CUDA extension's launches are followed by
    the copy, as other backends' are, and a landed copy raises."""
    flag = _word_flag(monkeypatch, None)
    flag.buffer.copy_(torch.tensor([-1, -1, 50]))
    flag.after_launch("cuda")
    assert len(flag.copies) == 1 and flag._pending
    flag._host.copy_(flag.buffer)
    flag._event.landed = True
    with pytest.raises(IndexError, match=r"got values in \[-1, -1\]"):
        flag.raise_pending()
    assert flag.syncs == []


@on_backends()
def test_the_output_can_be_changed_in_place(backend, device):
    """As F.embedding's: no backend returns a view of its own result (a view made inside the op
    cannot be changed in place; LLaVA-style models write image features into the embeddings)."""
    weight = make_weight(30, 8, torch.float32, device).requires_grad_()
    ids = torch.randint(0, 30, (2, 5), generator=torch.Generator().manual_seed(0)).to(device)
    outs = [noisy_embedding(ids, weight, 5.0, seed=1, backend=backend),
            add_noise(F.embedding(ids, weight), 5.0, seed=1, backend=backend),
            NoisyEmbedding(30, 8, _weight=weight.detach(), backend=backend).to(device).train()(ids)]
    for out in outs:
        out[0, 1] = 0.0
        out.mul_(2.0)
        assert out._base is None and out[0, 1].eq(0).all()
    (grad,) = torch.autograd.grad(outs[0], weight, torch.ones_like(outs[0]))
    want = torch.zeros_like(weight).index_add_(0, ids.flatten(), torch.full((10, 8), 2.0, device=device))
    want[ids[0, 1]] -= 2.0
    assert_bits_equal(grad, want)

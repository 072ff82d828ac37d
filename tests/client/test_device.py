"""client.device: the device spec, the missing-device error, and the copy/stream/event calls of StreamOps."""

from __future__ import annotations

import pytest
import torch

from streaming_weights.client.device import CpuOps, DeviceOps, parse_device, resolve_device
from streaming_weights.exceptions import ConfigurationError
from streaming_weights.format.chunkfile import decode_unit, encode_tensors
from tests.support.fakedevice import CopyLog, FakeDeviceOps


@pytest.mark.parametrize("spec, want", [(None, "cpu"), ("cpu", "cpu"), ("CUDA", "cuda:0"), ("cuda:3", "cuda:3"),
                                        ("mps", "mps"), (torch.device("cuda", 1), "cuda:1")])
def test_parse_device(spec, want):
    assert str(parse_device(spec)) == want


@pytest.mark.parametrize("spec", ["gpu", "cpu:1", "cuda:x", "cuda:", "", "mps:0"])
def test_malformed_device_is_a_configuration_error(spec):
    with pytest.raises(ConfigurationError, match="device must be 'cpu', 'cuda', 'cuda:N' or 'mps'"):
        parse_device(spec)


def test_cpu_ops_are_no_ops():
    ops = resolve_device("cpu")
    assert isinstance(ops, CpuOps) and ops.is_host and not ops.pinned
    t = {"w": torch.arange(6.0)}
    out, event = ops.copy_to_device(t)
    assert out["w"] is t["w"] and event is None
    assert type(ops.host_buffer(16)) is bytearray


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
@pytest.mark.parametrize("spec", ["cuda", "cuda:1"])
def test_missing_cuda_raises_configuration_error(spec):
    with pytest.raises(ConfigurationError, match="no CUDA device"):
        resolve_device(spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_index_beyond_count():
    with pytest.raises(ConfigurationError, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_missing_mps_raises():
    with pytest.raises(ConfigurationError, match="MPS is not available"):
        resolve_device("mps")


def test_a_device_ops_instance_is_used_as_is():
    ops = FakeDeviceOps()
    assert resolve_device(ops) is ops and isinstance(ops, DeviceOps) and not ops.is_host


def _unit() -> tuple[dict[str, torch.Tensor], bytearray]:
    tensors = {"a.weight": torch.randn(4, 8), "a.bias": torch.randn(8).to(torch.bfloat16),
               "b.weight": torch.randn(3, 5, dtype=torch.float16), "empty": torch.empty(0, 4)}
    buf = encode_tensors(tensors)
    return decode_unit(buf), buf  # views of one receive buffer, as a fetched unit's are


def test_stream_copy_is_one_flat_copy_on_the_copy_stream_then_an_event():
    ops = FakeDeviceOps()
    host, buf = _unit()
    with CopyLog(ops.fake):
        out, event = ops.copy_to_device(host, buf)
    copies = ops.kinds("copy")
    flat = sum(t.numel() * t.element_size() for t in host.values())
    assert [c[1] for c in copies] == ["copy"] and copies[0][2] >= flat  # one copy, on the copy stream
    assert ops.log[-1] == ("record", "copy", event[0].id)  # the event is recorded after the copy
    for name, t in host.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape and torch.equal(out[name], t)
        if t.numel():
            assert out[name].data_ptr() != t.data_ptr()  # a real copy, not the host memory
    ops.wait(event)
    assert ops.log[-1] == ("wait_event", "compute", event[0].id)  # compute waits, the host does not
    assert not ops.kinds("host_wait")
    ops.host_wait(event)
    assert ops.log[-1] == ("host_wait", None, event[0].id)


@pytest.mark.parametrize("with_buffer", [False, True])
def test_tensors_outside_one_buffer_are_copied_one_by_one(with_buffer):
    ops = FakeDeviceOps()
    host = {"x": torch.randn(3, 3), "y": torch.randn(2)}  # separate storages (a converted unit, say)
    with CopyLog(ops.fake):
        out, _ = ops.copy_to_device(host, bytearray(64) if with_buffer else None)
    assert [c[1] for c in ops.kinds("copy")] == ["copy", "copy"]
    assert all(torch.equal(out[n], host[n]) for n in host)


def test_views_of_one_storage_need_no_buffer():
    ops = FakeDeviceOps()
    flat = torch.arange(12.0)
    host = {"a": flat[:4], "b": flat[4:].view(2, 4)}
    with CopyLog(ops.fake):
        out, _ = ops.copy_to_device(host)
    assert len(ops.kinds("copy")) == 1 and all(torch.equal(out[n], host[n]) for n in host)


def test_host_buffers_of_stream_ops_receive_units():
    ops = FakeDeviceOps()
    raw = encode_tensors({"w": torch.arange(10.0)})
    buf = ops.host_buffer(len(raw))
    memoryview(buf)[:] = raw  # every receiver writes through a memoryview
    assert torch.equal(decode_unit(buf)["w"], torch.arange(10.0))


def test_memory_bytes():
    assert CpuOps().memory_bytes() is None
    assert FakeDeviceOps(free_bytes=123).memory_bytes() == 123

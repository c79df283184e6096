"""The wire format: round trips for every dtype and strict validation of bad messages."""
import pickle

import msgpack
import pytest
import torch

from distrib.errors import WireError
from distrib.transport import wire
from distrib.transport.wire import Message, decode, encode


def roundtrip(msg):
    return decode([bytes(memoryview(f)) for f in encode(msg)])


@pytest.mark.parametrize("dtype", list(wire.DTYPES.values()))
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 0, 2), (2, 3, 4)])
def test_roundtrip_every_dtype_and_shape(dtype, shape):
    t = (torch.arange(int(torch.tensor(shape).prod()) if shape else 1) % 7).reshape(shape).to(dtype)
    out = roundtrip(Message(channel=3, seq=9, sender=1, meta={"k": [1, "x"]}, tensors=[t, t]))
    assert out.channel == 3 and out.seq == 9 and out.meta == {"k": [1, "x"]}
    for x in out.tensors:
        assert x.dtype == dtype and x.shape == t.shape and torch.equal(x, t)


def test_noncontiguous_tensor_is_sent_by_value():
    t = torch.arange(12.).reshape(3, 4).t()
    assert torch.equal(roundtrip(Message(sender=0, tensors=[t])).tensors[0], t)


def test_encode_rejects_unsupported_dtype_and_non_tensors():
    with pytest.raises(WireError, match="complex64"):
        encode(Message(tensors=[torch.zeros(2, dtype=torch.complex64)]))
    with pytest.raises(WireError, match="torch.Tensor"):
        encode(Message(tensors=[[1, 2]]))


def frames_for(header, bodies=()):
    return [msgpack.packb(header)] + list(bodies)


GOOD = {"v": 1, "k": "data", "c": 0, "q": 1, "s": 0, "m": {}, "t": [["float32", [2], 8]]}


@pytest.mark.parametrize("change,match", [
    ({"v": 2}, "version"),
    ({"k": "exec"}, "kind"),
    ({"c": -1}, "out of range"),
    ({"q": "1"}, "must be an int"),
    ({"m": [1]}, "meta"),
    ({"t": [["object", [2], 8]]}, "not allowed"),
    ({"t": [["float32", [2], 9]]}, "nbytes"),
    ({"t": [["float32", [-2], -8]]}, "out of range"),
    ({"t": [["float32", [2]]]}, "dtype, shape, nbytes"),
    ({"t": [["float32", [2 ** 40], 2 ** 42]]}, "out of range"),
])
def test_decode_rejects_bad_headers(change, match):
    h = dict(GOOD, **change)
    with pytest.raises(WireError, match=match):
        decode(frames_for(h, [b"\0" * 8]))


def test_decode_rejects_missing_fields_and_garbage():
    h = dict(GOOD)
    del h["s"]
    with pytest.raises(WireError, match="lacks"):
        decode(frames_for(h, [b"\0" * 8]))
    with pytest.raises(WireError, match="malformed"):
        decode([b"\xc1\xff\x00garbage"])
    with pytest.raises(WireError, match="not a map"):
        decode([msgpack.packb([1, 2, 3])])
    with pytest.raises(WireError, match="empty"):
        decode([])


def test_buffer_count_and_size_must_match_header():
    with pytest.raises(WireError, match="buffers"):
        decode(frames_for(GOOD, []))
    with pytest.raises(WireError, match="buffer of 4 bytes"):
        decode(frames_for(GOOD, [b"\0" * 4]))


def test_oversized_body_and_header_are_rejected(monkeypatch):
    monkeypatch.setattr(wire, "MAX_MESSAGE_BYTES", 16)
    h = dict(GOOD, t=[["float32", [8], 32]])
    with pytest.raises(WireError, match="(exceeds|out of range)"):
        decode(frames_for(h, [b"\0" * 32]))
    with pytest.raises(WireError, match="header"):
        decode([b"\x80" + b"\0" * (wire.MAX_HEADER_BYTES + 1)])


def test_a_pickle_is_never_unpickled():
    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))
    with pytest.raises(WireError):
        decode([pickle.dumps(Boom())])
    with pytest.raises(WireError):
        decode(frames_for(dict(GOOD, m={"x": 1}, t=[]), []) + [pickle.dumps(Boom())])


def test_msgpack_extension_and_bin_types_are_refused():
    h = msgpack.packb({"v": 1, "k": "data", "c": 0, "q": 0, "s": 0, "m": {"x": b"bytes"}, "t": []},
                      use_bin_type=True)
    with pytest.raises(WireError):
        decode([h])

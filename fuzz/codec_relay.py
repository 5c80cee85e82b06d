"""The coverage-guided (atheris) fuzzer of the message codec and the relay state machine, run as ``python
fuzz/codec_relay.py -runs=1000000``.

Each input is read with a FuzzedDataProvider into one of four cases and checked
with the same invariants as tests/unit/test_fuzz_codec.py and test_fuzz_relay.py
(tests/support/fuzzing.py): the Scanner on mutated streams cut anywhere, a script
of client and server steps through a Relay (byte by byte and cut, compared), a
conversation with the simulated backend, and every decoder on raw bytes. Any
exception other than the designed ProtocolViolation, or a broken invariant
(AssertionError), is a crash that atheris reports and saves. libFuzzer options
(-runs, -max_total_time, -timeout, -rss_limit_mb, a corpus directory) pass through.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

with atheris.instrument_imports(include=["proxy"]):
    from proxy.wire import codec
    from proxy.wire.relay import CLIENT_INSPECT, CLIENT_INSPECT_BIND, SERVER_INSPECT
    from tests.support import fuzzing as fz

logging.disable(logging.CRITICAL)  # the decider's "boom" crash is logged on every refusal it causes

INSPECT_SETS = (frozenset(), CLIENT_INSPECT, CLIENT_INSPECT_BIND, SERVER_INSPECT, frozenset({ord("Z")}),
                frozenset(range(256)))
MAX_SIZES = (None, 48, 1024, codec.DEFAULT_MAX_MESSAGE_SIZE)


def _messages(fdp: atheris.FuzzedDataProvider, vocabulary: list[bytes], count: int) -> bytes:
    out = []
    for _ in range(count):
        if not fdp.remaining_bytes():
            break
        k = fdp.ConsumeIntInRange(0, 4)
        if k <= 2:
            out.append(vocabulary[fdp.ConsumeIntInRange(0, len(vocabulary) - 1)])
        elif k == 3:
            out.append(fz.msg(fdp.ConsumeBytes(1) or b"Q", fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40))))
        else:
            out.append(fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 24)))  # raw bytes
    data = b"".join(out)
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        data = fz.mutate(data, fdp.ConsumeIntInRange(0, 7), fdp.ConsumeIntInRange(0, 1 << 16),
                         fdp.ConsumeIntInRange(0, 255), fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 6)))
    return data


def _cuts(fdp: atheris.FuzzedDataProvider) -> list[int]:
    return [fdp.ConsumeIntInRange(0, 1 << 12) for _ in range(fdp.ConsumeIntInRange(0, 6))]


def TestOneInput(data: bytes) -> None:  # noqa: N802 - atheris' name
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 3)
    if mode == 0:
        inspect = INSPECT_SETS[fdp.ConsumeIntInRange(0, len(INSPECT_SETS) - 1)]
        max_size = MAX_SIZES[fdp.ConsumeIntInRange(0, len(MAX_SIZES) - 1)]
        cut = _cuts(fdp)
        vocabulary = fz.CLIENT_VOCABULARY if fdp.ConsumeBool() else fz.SERVER_VOCABULARY
        fz.check_scanner(_messages(fdp, vocabulary, 12), inspect, cut, max_size)
    elif mode == 1:
        config = {"observed": fdp.ConsumeBool(), "key_mapper": fdp.ConsumeBool(),
                  "max_message_size": MAX_SIZES[fdp.ConsumeIntInRange(0, len(MAX_SIZES) - 1)]}
        cut = _cuts(fdp)
        script = [("s", fz.LOGIN)] if fdp.ConsumeBool() else []
        for _ in range(fdp.ConsumeIntInRange(0, 7)):
            if fdp.ConsumeBool():
                script.append(("c", _messages(fdp, fz.CLIENT_VOCABULARY, fdp.ConsumeIntInRange(1, 8))))
            else:
                script.append(("s", _messages(fdp, fz.SERVER_VOCABULARY, fdp.ConsumeIntInRange(1, 8))))
        fz.check_script(script, cut, **config)
    elif mode == 2:
        observed = fdp.ConsumeBool()
        cut, server_cut = _cuts(fdp), _cuts(fdp)
        steps = [_messages(fdp, fz.CLIENT_VOCABULARY, fdp.ConsumeIntInRange(1, 6))
                 for _ in range(fdp.ConsumeIntInRange(1, 6))]
        fz.check_conversation(steps, cut, server_cut, observed=observed)
    else:
        start = fdp.ConsumeIntInRange(0, 80)
        fz.check_decoders(fdp.ConsumeBytes(fdp.remaining_bytes()), start)


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

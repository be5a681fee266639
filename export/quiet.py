"""The libraries' known-benign warnings and notices, silenced while `lmscore export` runs.

Tracing a model for torch.onnx warns wherever transformers' code reads a tensor as a Python
value, once per layer; the trace keeps the value it saw (the key/value grouping, the branch a mask
takes), as Optimum intends, and the validation figure (lmscore.export.validate) checks the
graph against PyTorch. The others are explained where they are listed. Only these
messages are silenced, and only within `quiet_libraries()`: anything else still shows, and
`lmscore export --verbose` shows these too.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator

# Logger name -> the start of the messages it logs that are known ("": the root logger).
KNOWN_RECORDS = {
    # Optimum could not share a tied embedding (the notice, then one line per weight);
    # lmscore.export.tied shares it.
    "optimum": (r"Found different candidate ONNX initializers", r"\t[\w.]+: \{"),
    # onnxruntime.quantization's advice before quantize_dynamic (the int8-dynamic recipe),
    # whose result is measured against float32 anyway.
    "": (r"Please consider to run pre-processing before quantization",),
}


class _KnownRecords(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.known = re.compile("|".join(patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return self.known.match(record.getMessage()) is None


def _known_warnings() -> tuple[tuple[type[Warning], str], ...]:
    """(category, start of the message) of the known warnings."""
    from torch.jit import TracerWarning

    return (
        (TracerWarning, "Converting a tensor to a Python"),
        (TracerWarning, "torch.tensor results are registered as constants"),
        # transformers' padding mask, indexed by batch and key positions: never negative.
        (UserWarning, "Exporting aten::index operator of advanced indexing"),
    )


@contextlib.contextmanager
def quiet_libraries(enabled: bool = True) -> Iterator[None]:
    """Within the block, the known warnings and notices are not shown (`enabled` False:
    everything is); the warning filters and loggers are as before afterwards."""
    if not enabled:
        yield
        return
    filters = [(logging.getLogger(name), _KnownRecords(p)) for name, p in KNOWN_RECORDS.items()]
    with warnings.catch_warnings():
        for category, message in _known_warnings():
            warnings.filterwarnings("ignore", message=re.escape(message), category=category)
        for logger, known in filters:
            logger.addFilter(known)
        try:
            yield
        finally:
            for logger, known in filters:
                logger.removeFilter(known)

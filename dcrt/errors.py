"""The few exception classes a dcrt user can meet.

Every error a user can cause (a bad file, an unsupported model, a wrong input) is one of these, with a
message that names what is wrong and what to do. The CLI prints the message, never a traceback.
"""


class DcrtError(Exception):
    """Base class of every error dcrt raises on purpose."""


class FormatError(DcrtError):
    """A file is not a .dcm, is damaged (checksum, truncation) or is otherwise unreadable."""


class VersionError(FormatError):
    """A .dcm written by a newer, incompatible dcrt (a newer major format version)."""


class ConversionError(DcrtError):
    """A source model (ONNX, Keras, Caffe) cannot be read or converted; the message says why."""


class UnsupportedOperatorError(ConversionError):
    """The model uses operators dcrt does not implement; ``ops`` lists all of them at once."""

    def __init__(self, message: str, ops: "list[str] | None" = None):
        super().__init__(message)
        self.ops = list(ops or [])


class ConfigError(DcrtError):
    """A compression plan (``--config`` file or options) is malformed."""


class LimitError(DcrtError):
    """A model or its inputs ask the runtime for an array beyond its limit (``DCRT_MAX_TENSOR_BYTES``)."""


class InputError(DcrtError):
    """Inputs given to ``Session.run`` do not match the model (name, shape or dtype), or a call's
    arguments are not what it takes (a mode, output names, a feed that is not a dict)."""


class IndexRangeError(InputError, IndexError):
    """An index given to the model (an embedding's token id, a Gather index) outside its axis."""

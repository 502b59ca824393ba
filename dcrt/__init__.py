"""dcrt: Deep Compression model converter (``.dcm``) and deployment runtime for edge devices.

    import dcrt
    sess = dcrt.Session("model.dcm")       # memory-mapped, layers decoded lazily
    y = sess.run(x)

The converter (``dcrt.convert`` / ``dcrt convert``) needs the ``[convert]`` extra (onnx); the
runtime needs numpy and flatbuffers only.
"""
__version__ = "0.1.0"

from .errors import (ConfigError, ConversionError, DcrtError, FormatError, InputError,  # noqa: E402
                     LimitError, UnsupportedOperatorError, VersionError)


def __getattr__(name):
    # Imported on first use so ``import dcrt`` stays light and never pulls in onnx.
    if name == "Session":
        from .runtime.session import Session
        return Session
    if name == "convert":
        from .converters.convert import convert
        return convert
    if name == "open_dcm":
        from .format import open_dcm
        return open_dcm
    raise AttributeError(f"module 'dcrt' has no attribute {name!r}")


__all__ = ["Session", "convert", "open_dcm", "DcrtError", "FormatError", "VersionError",
           "ConversionError", "UnsupportedOperatorError", "ConfigError", "InputError", "LimitError",
           "__version__"]

#!/bin/sh
# Regenerate converters/caffe_pb2.py from converters/caffe.proto. Run from anywhere:
#
#     sh converters/regen_caffe.sh            (PYTHON=/path/to/python to choose the interpreter)
#
# Uses protoc from PATH, else the one bundled with grpcio-tools (pip install grpcio-tools).
# The proto path is the repository root, so the file registers as "converters/caffe.proto" in
# protobuf's descriptor pool and cannot clash with Caffe's own caffe_pb2 ("caffe.proto").
#
# protoc's Python code refuses to import under a protobuf runtime of another major version. The
# module needs only the descriptor pool and the message builder (in protobuf since 3.20, the floor
# of the [convert] extra), so the check is made non-fatal afterwards.
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if command -v protoc >/dev/null 2>&1; then
    protoc -I . --python_out=. converters/caffe.proto
else
    "$PY" -m grpc_tools.protoc -I . --python_out=. converters/caffe.proto
fi
"$PY" - <<'EOF_PY'
import re

path = "converters/caffe_pb2.py"
code = open(path).read()
code = code.replace(
    "from google.protobuf import runtime_version as _runtime_version\n",
    "try:\n"
    "  from google.protobuf import runtime_version as _runtime_version\n"
    "except ImportError:  # protobuf < 5.26: no version check\n"
    "  _runtime_version = None\n")
call = re.search(r"_runtime_version\.ValidateProtobufRuntimeVersion\((?:[^()]|\([^()]*\))*\)\n", code)
if call:
    body = call.group(0).rstrip("\n").replace("\n", "\n  ")
    code = code.replace(call.group(0),
                        "try:\n  " + body + "\n"
                        "except Exception:  # another major version: the descriptor API used is stable\n"
                        "  pass\n")
header = ("# GENERATED FILE, do not edit: made from converters/caffe.proto by converters/regen_caffe.sh\n"
          "# (protoc -I . --python_out=. converters/caffe.proto; the runtime version check made non-fatal).\n")
open(path, "w").write(header + code)
EOF_PY
echo "wrote converters/caffe_pb2.py"

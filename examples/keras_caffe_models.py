"""Small Keras and Caffe models to try the Keras and Caffe frontends on (random weights).

    KERAS_BACKEND=numpy python examples/keras_caffe_models.py out/    # writes .keras/.h5/.prototxt/.caffemodel
    dcrt convert out/residual_cnn.keras -o residual_cnn.dcm
    dcrt convert out/lenet5.prototxt --weights out/lenet5.caffemodel -o lenet5.dcm

The Keras builders need ``keras`` 3 with the numpy backend (which needs jax) or torch; no TensorFlow.
The Caffe writers need only dcrt's generated ``caffe_pb2`` (protobuf): no Caffe install.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np

# ---------------------------------------------------------------------------------------------------
# Keras
# ---------------------------------------------------------------------------------------------------


def _keras():
    os.environ.setdefault("KERAS_BACKEND", "numpy")
    import keras
    return keras


def randomize(model, seed: int = 0) -> None:
    """Give every weight a random value of a useful scale, BatchNormalization layers non-trivial
    statistics (positive variances), so that a comparison of outputs means something."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        values = []
        for w in layer.weights:
            shape = tuple(w.shape)
            path = w.path
            if "variance" in path:
                values.append(rng.uniform(0.5, 2.0, shape))
            elif "gamma" in path:
                values.append(rng.uniform(0.5, 1.5, shape))
            elif len(shape) == 1 or "moving_mean" in path or "beta" in path:
                values.append(rng.normal(0, 0.3, shape))
            else:
                fan_in = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
                values.append(rng.normal(0, 1.2 / np.sqrt(max(fan_in, 1)), shape))
        if values:
            layer.set_weights([v.astype("float32") for v in values])


def residual_cnn():
    """Conv2D + BN + ReLU residual blocks, pooling, Flatten (NHWC order) and Dense (seed 004 style)."""
    keras = _keras()
    L = keras.layers
    x_in = keras.Input((16, 16, 3), name="image")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(x_in)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    for i in range(2):
        y = L.Conv2D(8, 3, padding="same", name=f"block{i}_conv1")(x)
        y = L.BatchNormalization(name=f"block{i}_bn1")(y)
        y = L.Activation("relu", name=f"block{i}_relu1")(y)
        y = L.Conv2D(8, 3, padding="same", name=f"block{i}_conv2")(y)
        y = L.BatchNormalization(name=f"block{i}_bn2")(y)
        x = L.Add(name=f"block{i}_add")([x, y])
        x = L.ReLU(name=f"block{i}_out")(x)
    x = L.MaxPooling2D(2, name="pool")(x)
    x = L.Conv2D(12, 3, strides=2, padding="same", activation="relu", name="down")(x)
    x = L.AveragePooling2D(2, padding="same", name="avg")(x)
    x = L.Flatten(name="flatten")(x)
    x = L.Dropout(0.5, name="drop")(x)
    out = L.Dense(10, activation="softmax", name="probs")(x)
    model = keras.Model(x_in, out, name="residual_cnn")
    randomize(model)
    return model


def layer_zoo():
    """Many of the other supported layers in one functional model with two outputs."""
    keras = _keras()
    L = keras.layers
    x_in = keras.Input((12, 12, 4), name="pixels")
    a = L.ZeroPadding2D(((1, 2), (0, 1)), name="pad")(x_in)
    a = L.Conv2D(8, 3, dilation_rate=2, name="dilated")(a)
    a = L.LeakyReLU(negative_slope=0.1, name="leaky")(a)
    b = L.Conv2D(8, 3, padding="same", groups=2, activation="sigmoid", name="grouped")(x_in)
    b = L.Cropping2D(((1, 0), (1, 2)), name="crop")(b)
    b = L.ReLU(max_value=0.7, name="relu6ish")(b)
    c = L.Concatenate(name="concat")([a, b])  # both 11 x 9
    c = L.UpSampling2D(2, name="up")(c)
    c = L.UpSampling2D(2, interpolation="bilinear", name="up_bilinear")(c)
    c = L.MaxPooling2D(3, strides=2, padding="same", name="maxsame")(c)
    c = L.BatchNormalization(name="bn")(c)
    c = L.Activation("tanh", name="tanh")(c)
    flat = L.GlobalMaxPooling2D(name="gmax")(c)
    avg = L.GlobalAveragePooling2D(keepdims=True, name="gavg")(c)
    d = L.Dense(6, activation="elu", name="dense_elu")(flat)
    e = L.Subtract(name="sub")([d, L.Dense(6, name="dense_lin")(flat)])
    e = L.Multiply(name="mul")([e, L.Dense(6, activation="hard_sigmoid", name="dense_hs")(flat)])
    e = L.Softmax(name="softmax")(e)
    model = keras.Model(x_in, [e, avg], name="layer_zoo")
    randomize(model, 1)
    return model


def lstm_classifier():
    """Embedding + stacked LSTM text classifier (seed 004 style)."""
    keras = _keras()
    L = keras.layers
    x_in = keras.Input((12,), dtype="int32", name="tokens")
    x = L.Embedding(50, 16, name="embed")(x_in)
    x = L.LSTM(20, return_sequences=True, name="lstm1")(x)
    x = L.LSTM(12, name="lstm2")(x)
    out = L.Dense(4, activation="softmax", name="classes")(x)
    model = keras.Model(x_in, out, name="lstm_classifier")
    randomize(model, 4)
    return model


def gru_classifier():
    """Embedding + GRU (reset_after True and False) + SimpleRNN, one of them reading backwards."""
    keras = _keras()
    L = keras.layers
    x_in = keras.Input((10,), dtype="int32", name="tokens")
    x = L.Embedding(30, 8, name="embed")(x_in)
    x = L.GRU(10, return_sequences=True, name="gru_after")(x)
    x = L.GRU(9, return_sequences=True, reset_after=False, go_backwards=True, name="gru_before")(x)
    x = L.SimpleRNN(7, name="rnn")(x)
    out = L.Dense(3, name="logits")(x)
    model = keras.Model(x_in, out, name="gru_classifier")
    randomize(model, 5)
    return model


def dcgan_generator():
    """DCGAN-style generator: Dense -> Reshape -> Conv2DTranspose stack -> tanh (seed 004 style)."""
    keras = _keras()
    L = keras.layers
    model = keras.Sequential([
        keras.Input((16,), name="noise"),
        L.Dense(4 * 4 * 32, use_bias=False, name="project"),
        L.BatchNormalization(name="project_bn"),
        L.LeakyReLU(name="project_act"),
        L.Reshape((4, 4, 32), name="reshape"),
        L.Conv2DTranspose(16, 4, strides=2, padding="same", use_bias=False, name="up1"),
        L.BatchNormalization(name="up1_bn"),
        L.LeakyReLU(name="up1_act"),
        L.Conv2DTranspose(8, 3, strides=2, padding="valid", name="up2"),
        L.BatchNormalization(name="up2_bn"),
        L.ReLU(name="up2_act"),
        L.Conv2DTranspose(1, 5, strides=1, padding="same", activation="tanh", name="image"),
    ], name="dcgan_generator")
    randomize(model, 2)
    return model


def mobile_blocks():
    """DepthwiseConv2D / SeparableConv2D (MobileNet / Xception style)."""
    keras = _keras()
    L = keras.layers
    model = keras.Sequential([
        keras.Input((15, 15, 6), name="image"),
        L.Conv2D(8, 3, strides=2, padding="same", name="stem"),
        L.DepthwiseConv2D(3, padding="same", depth_multiplier=2, name="dw1"),
        L.BatchNormalization(name="dw1_bn"),
        L.ReLU(6.0, name="dw1_relu6"),
        L.Conv2D(12, 1, name="pw1"),
        L.DepthwiseConv2D(3, strides=2, padding="valid", name="dw2"),
        L.SeparableConv2D(10, 3, padding="same", depth_multiplier=2, activation="relu", name="sep"),
        L.SeparableConv2D(6, 3, dilation_rate=2, padding="same", name="sep_dilated"),
        L.GlobalAveragePooling2D(name="gap"),
        L.Dense(5, name="logits"),
    ], name="mobile_blocks")
    randomize(model, 3)
    return model


def lambda_model():
    """A model with a Lambda layer (Python code in the file: dcrt must refuse it)."""
    keras = _keras()
    L = keras.layers
    x_in = keras.Input((4,), name="x")
    x = L.Dense(3, name="dense")(x_in)
    x = L.Lambda(lambda t: t * 2.0, name="double_it")(x)
    return keras.Model(x_in, x, name="with_lambda")


KERAS_MODELS: Dict[str, Callable] = {
    "residual_cnn": residual_cnn, "layer_zoo": layer_zoo, "lstm_classifier": lstm_classifier,
    "gru_classifier": gru_classifier, "dcgan_generator": dcgan_generator, "mobile_blocks": mobile_blocks,
}


def keras_input(model, batch: int = 2, seed: int = 0) -> np.ndarray:
    """A random input batch for a one-input Keras model (token ids for integer inputs)."""
    rng = np.random.default_rng(seed)
    shape = (batch,) + tuple(model.inputs[0].shape[1:])
    if "int" in str(model.inputs[0].dtype):
        vocab = min(l.input_dim for l in model.layers if hasattr(l, "input_dim"))
        return rng.integers(0, vocab, shape).astype(str(model.inputs[0].dtype))
    return rng.normal(size=shape).astype("float32")


# ---------------------------------------------------------------------------------------------------
# Caffe
# ---------------------------------------------------------------------------------------------------

LENET5 = """name: "LeNet"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 1 dim: 1 dim: 28 dim: 28 } } }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 6 kernel_size: 5 pad: 2 } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2" convolution_param { num_output: 16 kernel_size: 5 } }
layer { name: "relu2" type: "ReLU" bottom: "conv2" top: "conv2" }
layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2" pooling_param { pool: AVE kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool2" top: "ip1" inner_product_param { num_output: 120 } }
layer { name: "sig1" type: "Sigmoid" bottom: "ip1" top: "ip1" }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" inner_product_param { num_output: 84 } }
layer { name: "tanh2" type: "TanH" bottom: "ip2" top: "ip2" }
layer { name: "drop2" type: "Dropout" bottom: "ip2" top: "ip2" dropout_param { dropout_ratio: 0.5 } }
layer { name: "ip3" type: "InnerProduct" bottom: "ip2" top: "ip3" inner_product_param { num_output: 10 } }
layer { name: "prob" type: "Softmax" bottom: "ip3" top: "prob" }
"""

# Net-level input, in-place BatchNorm + Scale chains, Eltwise SUM (with coefficients), PROD and MAX,
# LRN, Concat, Caffe's ceil-rounded pooling (9 -> 5 with 2x2 stride 2; a last window starting in the
# padding dropped in pool_clip, a second output), a grouped and
# dilated convolution, a Deconvolution, Flatten and Reshape.
RESNET_SMALL = """name: "ResNetSmall"
input: "data"
input_shape { dim: 1 dim: 3 dim: 17 dim: 17 }
layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
        convolution_param { num_output: 8 kernel_size: 3 stride: 2 pad: 1 bias_term: false } }
layer { name: "bn1" type: "BatchNorm" bottom: "conv1" top: "conv1" batch_norm_param { use_global_stats: true } }
layer { name: "scale1" type: "Scale" bottom: "conv1" top: "conv1" scale_param { bias_term: true } }
layer { name: "relu1" type: "ReLU" bottom: "conv1" top: "conv1" relu_param { negative_slope: 0.1 } }
layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
        pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "res2a_branch2a" type: "Convolution" bottom: "pool1" top: "res2a_branch2a"
        convolution_param { num_output: 8 kernel_size: 3 pad: 1 } }
layer { name: "bn2a" type: "BatchNorm" bottom: "res2a_branch2a" top: "res2a_branch2a" }
layer { name: "scale2a" type: "Scale" bottom: "res2a_branch2a" top: "res2a_branch2a" scale_param { bias_term: true } }
layer { name: "relu2a" type: "ReLU" bottom: "res2a_branch2a" top: "res2a_branch2a" }
layer { name: "res2a_branch2b" type: "Convolution" bottom: "res2a_branch2a" top: "res2a_branch2b"
        convolution_param { num_output: 8 kernel_h: 3 kernel_w: 1 pad_h: 1 pad_w: 0 group: 2 } }
layer { name: "res2a" type: "Eltwise" bottom: "pool1" bottom: "res2a_branch2b" top: "res2a"
        eltwise_param { operation: SUM coeff: 1.0 coeff: -0.5 } }
layer { name: "res2a_relu" type: "ReLU" bottom: "res2a" top: "res2a" }
layer { name: "pool_clip" type: "Pooling" bottom: "res2a" top: "pool_clip"
        pooling_param { pool: MAX kernel_size: 2 stride: 3 pad: 1 } }
layer { name: "norm" type: "LRN" bottom: "res2a" top: "norm" lrn_param { local_size: 5 alpha: 0.001 beta: 0.75 } }
layer { name: "dil" type: "Convolution" bottom: "norm" top: "dil"
        convolution_param { num_output: 4 kernel_size: 3 pad: 2 dilation: 2 } }
layer { name: "prod" type: "Eltwise" bottom: "dil" bottom: "dil" top: "prod" eltwise_param { operation: PROD } }
layer { name: "emax" type: "Eltwise" bottom: "prod" bottom: "dil" top: "emax" eltwise_param { operation: MAX } }
layer { name: "cat" type: "Concat" bottom: "norm" bottom: "emax" top: "cat" concat_param { axis: 1 } }
layer { name: "up" type: "Deconvolution" bottom: "cat" top: "up"
        convolution_param { num_output: 6 kernel_size: 4 stride: 2 pad: 1 } }
layer { name: "pool2" type: "Pooling" bottom: "up" top: "pool2" pooling_param { pool: AVE kernel_size: 3 stride: 2 pad: 1 } }
layer { name: "sig" type: "Sigmoid" bottom: "pool2" top: "sig" }
layer { name: "gpool" type: "Pooling" bottom: "sig" top: "gpool" pooling_param { pool: AVE global_pooling: true } }
layer { name: "flat" type: "Flatten" bottom: "pool2" top: "flat" }
layer { name: "fc" type: "InnerProduct" bottom: "flat" top: "fc" inner_product_param { num_output: 10 } }
layer { name: "fc_relu" type: "ReLU" bottom: "fc" top: "fc" }
layer { name: "reshape" type: "Reshape" bottom: "fc" top: "fc_3d" reshape_param { shape { dim: 0 dim: 2 dim: -1 } } }
layer { name: "prob" type: "Softmax" bottom: "fc_3d" top: "prob" softmax_param { axis: 2 } }
"""

CAFFE_MODELS = {"lenet5": LENET5, "resnet_small": RESNET_SMALL}


def write_caffe(prototxt: str, folder: str, name: str, seed: int = 0) -> Tuple[str, str]:
    """Write ``name.prototxt`` and a ``name.caffemodel`` with random weights, stored as Caffe stores
    them: every layer with its name, type and parameter blobs (BatchNorm: mean * s, variance * s, s)."""
    from dcrt.converters import caffe_pb2
    from dcrt.converters.caffe_frontend import blob_shapes, parse_prototxt
    rng = np.random.default_rng(seed)
    definition = parse_prototxt(prototxt)
    kinds = {layer.name: layer.type for layer in definition.layer}
    net = caffe_pb2.NetParameter(name=name)
    for layer_name, shapes in blob_shapes(definition).items():
        kind = kinds[layer_name]
        layer = net.layer.add(name=layer_name, type=kind)
        for i, shape in enumerate(shapes):
            if kind == "BatchNorm":
                s = 0.5  # Caffe's running-average normaliser
                value = [rng.normal(0, 0.5, shape) * s, rng.uniform(0.5, 2, shape) * s, np.full(shape, s)][i]
            elif kind == "Scale" and i == 0:
                value = rng.uniform(0.5, 1.5, shape)
            else:
                fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
                value = rng.normal(0, 1 / np.sqrt(fan_in), shape)
            blob = layer.blobs.add()
            blob.shape.dim.extend(shape)
            blob.data.extend(np.asarray(value, dtype=np.float32).reshape(-1).tolist())
    proto_path = os.path.join(folder, f"{name}.prototxt")
    model_path = os.path.join(folder, f"{name}.caffemodel")
    with open(proto_path, "w") as f:
        f.write(prototxt)
    with open(model_path, "wb") as f:
        f.write(net.SerializeToString())
    return proto_path, model_path


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    folder = args[0] if args else "models"
    os.makedirs(folder, exist_ok=True)
    for name, prototxt in CAFFE_MODELS.items():
        print("wrote", *write_caffe(prototxt, folder, name))
    for name, build in KERAS_MODELS.items():
        model = build()
        for ext in ("keras", "h5"):
            path = os.path.join(folder, f"{name}.{ext}")
            model.save(path)
            print("wrote", path)


if __name__ == "__main__":
    main()

"""Derive the rational tanh the LSTM kernel uses (``runtime/_numba_rnn.py``) and print its error.

    python benchmarks/fit_tanh.py

tanh(x) ~ x P(x^2) / Q(x^2) for |x| <= 7.905... (where float32 tanh rounds to 1), clamped beyond,
with P of degree 4 and Q of degree 3 (Q(0) = 1): the linearised least-squares problem
P(s) - tanh(x)/x Q(s) = 0 over 22,000 points, reweighted 30 times towards the largest errors (an
approximation of the minimax fit). Prints the coefficients as float32 and the error of the float32
evaluation against float64 tanh on [-9, 9].
"""
import numpy as np

EDGE = 7.90531110763549805
DEG_P, DEG_Q = 4, 3


def fit():
    x = np.concatenate([np.linspace(0, EDGE, 20000)[1:], np.geomspace(1e-4, 1, 2000)])
    s, f = x * x, np.tanh(x) / x
    w = np.ones_like(x)
    for _ in range(30):
        a = np.concatenate([np.stack([s ** i for i in range(DEG_P + 1)], 1),
                            -f[:, None] * np.stack([s ** i for i in range(1, DEG_Q + 1)], 1)], 1)
        coef, *_ = np.linalg.lstsq(a * w[:, None], f * w, rcond=None)
        p, q = coef[:DEG_P + 1], np.concatenate([[1.0], coef[DEG_P + 1:]])
        err = np.abs(x * np.polyval(p[::-1], s) / np.polyval(q[::-1], s) - np.tanh(x))
        w = w * (1 + 50 * err / err.max())
        w /= w.mean()
    return p.astype(np.float32), q.astype(np.float32)


def evaluate(p, q, x):
    """The float32 evaluation, as the kernel does it (Horner, clamped input)."""
    xc = np.clip(x, np.float32(-EDGE), np.float32(EDGE))
    s = xc * xc
    num, den = np.zeros_like(s), np.zeros_like(s)
    for c in p[::-1]:
        num = num * s + c
    for c in q[::-1]:
        den = den * s + c
    return xc * num / den


if __name__ == "__main__":
    p, q = fit()
    x = np.linspace(-9, 9, 400001).astype(np.float32)
    ref = np.tanh(x.astype(np.float64))
    err = np.abs(evaluate(p, q, x) - ref)
    print("P", [repr(float(c)) for c in p])
    print("Q", [repr(float(c)) for c in q])
    print(f"max error {err.max():.2e} absolute, {(err / np.maximum(np.abs(ref), 1e-30)).max():.2e} relative")
    print(f"Q >= {np.polyval(q[::-1].astype(np.float64), np.linspace(0, EDGE ** 2, 100001)).min():.3f} on the range")

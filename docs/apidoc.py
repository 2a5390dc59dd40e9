"""Writes the API reference, docs/api.md, from imm_kernels.__all__: the signature and docstring of every public
function and class, and of every public function of the public modules (schedules, imm, reference). Run it after
changing a public signature or docstring:

    source .ci/env.sh && $PY docs/apidoc.py

tests/test_docs.py fails when docs/api.md differs from what this writes (or a public name has no docstring).
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

PAGE = Path(__file__).with_name("api.md")
COMMAND = "source .ci/env.sh && $PY docs/apidoc.py"

HEADER = f"""# API reference

Generated from the docstrings by `{COMMAND}` (tests/test_docs.py checks that this
page is current). How the ops compute, their dtypes and what they check: [numerics.md](numerics.md); the math
with the paper's equation numbers: [math.md](math.md); a complete, runnable training loop: the quick start of
[README.md](../README.md); the example trainer: [training.md](training.md).

`IMMGenerator` owns the objective and the samplers (`gen.loss(x)`, `gen.sample(n, shape, steps=2)`). The ops
under it, for a loop of your own: one IMM training step (a fragment: `x` is a batch of data scaled to standard
deviation 0.5, `net` follows IMMGenerator's network convention):

```python
import torch, imm_kernels
from imm_kernels import imm

M, G = 4, x.shape[0] // 4                      # G groups of M consecutive rows sharing (s, r, t)
s, r, t = imm.sample_times(G, schedule="fm", k=12)               # float64, one per group
s_, r_, t_ = (v.repeat_interleave(M) for v in (s, r, t))
noise = 0.5 * torch.randn_like(x)                                # eps ~ N(0, sigma_data^2)
x_t, x_r = imm_kernels.interpolate_pair(x, noise, t_, r_)        # same (x, eps), one pass

def f(x_in, s, t):                             # f_{{s,t}}(x_in): c_in scaling, times 1000 t and 1000 s (t first)
    c_in = imm.c_in(t).float().view(-1, *[1] * (x_in.dim() - 1))
    g = net(c_in * x_in, 1000 * t.float(), 1000 * s.float(), None)
    return imm_kernels.imm_output(x_in, g.to(x_in.dtype), s, t)

y_t = f(x_t, s_, t_)
with torch.no_grad():
    y_r = f(x_r, s_, r_)                       # stop-gradient, not the EMA
loss = imm_kernels.mmd_loss(y_t, y_r, M, kernel="laplace",
                            bandwidth=imm.kernel_bandwidth(s, t),           # wt(s,t) = 1/|c_out|
                            weight=imm.time_weight(t, a=1, b=5))            # w(s,t), paper Eq. 13
loss.backward()
```

Under the functions sit the `torch.library` custom ops `torch.ops.imm_kernels.mmd_forward`, `mmd_backward` and
`combine` (what `torch.compile` sees); they check what would make the kernels read out of bounds. All ops accept
float32, float64, float16 and bfloat16, and gradients flow to every floating input that requires them: data,
times, bandwidths and weights ([pytorch.md](pytorch.md): autograd, torch.func, vmap, autocast, channels-last).
`imm_kernels.reference` holds plain PyTorch versions of all of them, the oracle the tests compare every backend
against. `imm_kernels.__version__` is the package version (one place: `imm_kernels/__init__.py`;
[CHANGELOG.md](../CHANGELOG.md)).
"""


def signature(obj) -> str:
    """The call signature without annotations (they are strings under `from __future__ import annotations`)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return "(...)"
    parameters = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
    return str(sig.replace(parameters=parameters, return_annotation=inspect.Signature.empty))


def docstring(obj) -> str:
    """The object's own docstring (not one inherited from a base class), dedented; empty if none."""
    doc = obj.__doc__ if isinstance(obj.__doc__, str) else ""
    return inspect.cleandoc(doc) if doc.strip() else ""


def entry(qualified: str, obj, level: str = "###") -> list[str]:
    lines = [f"{level} `{qualified}`", "", "```python", f"{qualified}{signature(obj)}", "```", ""]
    doc = docstring(obj)
    lines += (["```text", doc, "```", ""] if doc else ["(no docstring)", ""])
    return lines


def public_methods(cls) -> list[str]:
    """Methods a class adds to its bases (plus forward for modules), in definition order."""
    inherited = {name for base in cls.__mro__[1:] for name in vars(base)}
    return [name for name, value in vars(cls).items() if callable(value) and not name.startswith("_")
            and (name not in inherited or name == "forward")]


def module_members(module) -> list[str]:
    """A module's __all__, else the public functions and classes defined in it, in definition order."""
    if hasattr(module, "__all__"):
        return list(module.__all__)
    return [name for name, value in vars(module).items() if not name.startswith("_")
            and (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == module.__name__]


def render() -> str:
    import imm_kernels

    lines = HEADER.splitlines() + [""]
    documented: dict[int, str] = {}
    names = [name for name in imm_kernels.__all__ if name != "__version__"]
    functions = [name for name in names if not inspect.ismodule(getattr(imm_kernels, name))]
    modules = [name for name in names if inspect.ismodule(getattr(imm_kernels, name))]
    lines += ["## Functions and classes", ""]
    for name in functions:
        obj = getattr(imm_kernels, name)
        lines += entry(f"imm_kernels.{name}", obj)
        documented[id(obj)] = f"imm_kernels.{name}"
        if inspect.isclass(obj):
            for method in public_methods(obj):
                lines += entry(f"imm_kernels.{name}.{method}", getattr(obj, method), "####")
    for name in modules:
        module = getattr(imm_kernels, name)
        lines += [f"## Module `imm_kernels.{name}`", "", "```text", docstring(module), "```", ""]
        for member in module_members(module):
            obj = getattr(module, member)
            qualified = f"imm_kernels.{name}.{member}"
            if id(obj) in documented:
                lines += [f"### `{qualified}`", "", f"The same function as `{documented[id(obj)]}`.", ""]
                continue
            lines += entry(qualified, obj)
            documented[id(obj)] = qualified
    return "\n".join(lines).rstrip() + "\n"


def undocumented() -> list[str]:
    """Public names of imm_kernels.__all__ (and of its modules) without a docstring."""
    import imm_kernels

    missing = []
    for name in imm_kernels.__all__:
        obj = getattr(imm_kernels, name)
        if name == "__version__":
            continue
        if not docstring(obj):
            missing.append(f"imm_kernels.{name}")
        if inspect.ismodule(obj):
            missing += [f"imm_kernels.{name}.{m}" for m in module_members(obj) if not docstring(getattr(obj, m))]
    return missing


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    PAGE.write_text(render())
    print(f"wrote {PAGE}")

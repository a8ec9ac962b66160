"""Models as torch.export programs (``.pt2``) and as factories of the user's own code.

**What each loader executes** (read in torch 2.13's sources, ``torch/export/__init__.py``,
``torch/export/pt2_archive/_package.py``, ``torch/_export/serde/serialize.py``, and its docs):

- ``torch.jit.load`` (TorchScript): its documentation warns that "it is possible to construct
  malicious pickle data which will execute arbitrary code during torch.jit.load"
  (https://docs.pytorch.org/docs/stable/generated/torch.jit.load.html), and it has no
  restricted mode. voxplain refuses TorchScript files: re-export the network with
  ``torch.export.export`` and ``torch.export.save``, or give it as a factory.
- ``torch.export.load`` (``.pt2``): its docstring says it "uses pickle under the hood. Never
  load data from an untrusted source". In the archive format of torch 2.13 it runs
  ``torch.load(..., weights_only=False)`` on weights and constants whose payload entry says
  ``use_pickle`` (tensor subclasses), ``pickle.loads`` on opaque constants,
  ``torch._C._pickle_load_obj`` on TorchBind objects, AOTInductor shared libraries when the
  archive has some, falls back to ``torch.load(weights_only=False)`` when the example inputs do
  not load weights-only, falls back to an older zip format, and passes the symbolic shape
  expressions of the graph (``expr_str``) to ``sympy.sympify``, which evaluates Python.
  The graph's operators themselves are only looked up by name under ``torch``, ``operator``
  and ``math`` (no import, no call while loading).

So a ``.pt2`` is loaded here only in a restricted way (:func:`check_program_archive`, then
``torch.export.load`` with every ``torch.load`` forced weights-only): the archive may hold only
the files of a plain exported program (the graph JSON, raw tensor payloads and their JSON
configs, weights-only example inputs); any payload marked ``use_pickle``, any TorchBind or opaque
constant, AOTInductor code or unknown file is refused before torch reads it, and every symbolic
expression must be built from shape symbols, integers, arithmetic and torch's sympy functions
(no attribute access, no strings but symbol names, no ``**``), so ``sympify`` can evaluate
nothing else.
Running the program then runs its graph of ATen operators, no Python of the file's author.

The loaded model is ``torch.export.unflatten`` of the program: the original module hierarchy
(``features.0.0.2``, ...) as :class:`~torch.export.unflatten.InterpreterModule` objects that
forward hooks see, so layer methods (Grad-CAM family, with the layer rule of
:mod:`voxplain.explain.layers`, which reads the operators of each leaf) work; its modules are
not ``nn.Conv3d`` or ``nn.Linear`` objects any more, so LRP, Deep Taylor, CAM and
DeepLift-SHAP refuse it (:func:`program_refusal`). ``copy.deepcopy`` fails on it:
:func:`copy_program` reads the file again (what masks use, through ``fold_batch_norm``).

A ``python`` model (:func:`python_network`) imports ``package.module`` and calls the factory:
that *executes the user's own code*, on purpose; it is meant for local code the user trusts.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import tokenize
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

#: The program file of a run folder's model (model ``program``).
PROGRAM = "model.pt2"

#: Files of a plain exported program, after the archive's top folder.
_ALLOWED = re.compile(r"(archive_format|archive_version|byteorder|\.data/version"
                      r"|\.data/serialization_id|models/model\.json"
                      r"|data/weights/model_weights_config\.json|data/weights/weight_\d+"
                      r"|data/constants/model_constants_config\.json"
                      r"|data/constants/tensor_\d+|data/sample_inputs/model\.pt"
                      r"|extra/[\w.-]+)")
#: Names a symbolic shape expression may use besides shape symbols (s0, u3, ...).
_SYMPY_NAMES = frozenset({
    "Symbol", "Integer", "Rational", "True", "False", "positive", "integer", "real",
    "nonnegative", "finite", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And",
    "Or", "Not", "oo", "int_oo", "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod",
    "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift", "RShift", "PowByNatural",
    "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity"})
_SYMBOL = re.compile(r"[a-z]+\d+")
#: No ``**``: ``10**10**10`` would make sympy compute for ever.
_OPERATORS = frozenset({"+", "-", "*", "/", "//", "%", "(", ")", ",", "=", "<", ">", "<=", ">=",
                        "==", "!="})


class ProgramError(ValueError):
    """A program file voxplain refuses to load; the message names the file and the reason."""


def load_program(path: Path) -> nn.Module:
    """The exported program ``path`` (``torch.export.save``) as a module in eval mode, loaded in
    the restricted way of this module's docstring; TorchScript and anything that would be
    unpickled are refused (:class:`ProgramError`)."""
    path = Path(path)
    check_program_archive(path)
    with _weights_only_loads(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations
        try:
            program = torch.export.load(path)
            module = torch.export.unflatten(program)
        except Exception as error:  # noqa: BLE001 - any failure: one line naming the file
            reason = ("a part of it (e.g. its example inputs) would need full unpickling: "
                      "refused" if "Weights only load failed" in str(error)
                      else _first_line(error))
            raise ProgramError(f"{path}: not a loadable torch.export program ({reason})") from None
    module.voxplain_program = str(path)  # what explainers that need module types check
    return module.eval().requires_grad_(False)


def copy_program(model: nn.Module) -> nn.Module:
    """A copy of a model of :func:`load_program` (``copy.deepcopy`` fails on its graphs): the
    program read again, with ``model``'s tensors, ``requires_grad`` flags and device."""
    copied = load_program(Path(model.voxplain_program))
    copied.load_state_dict(model.state_dict())
    for (_, own), (_, new) in zip(model.named_parameters(), copied.named_parameters()):
        new.requires_grad_(own.requires_grad)
    reference = next(model.parameters(), None)
    return copied if reference is None else copied.to(reference.device)


def is_program(model: nn.Module) -> bool:
    """True for a model loaded by :func:`load_program` (a graph of operators, no nn layers)."""
    return getattr(model, "voxplain_program", None) is not None


def program_refusal(method: str, model: nn.Module, needs: str) -> str:
    """The message of a method that cannot explain an exported program."""
    return (f"{method} needs {needs}; the model is an exported program "
            f"({model.voxplain_program}), a graph of operators without them. Use a method that "
            "needs only gradients or forward passes (saliency, integrated_gradients, "
            "smoothgrad, gradient_shap, occlusion, masks), grad_cam and its family, or import "
            "the network as Python code (model 'python', voxplain.import_model)")


def check_program_archive(path: Path) -> None:
    """Refuse (:class:`ProgramError`) a file that is not a plain exported program: a
    TorchScript file, a pickle, an archive with files that ``torch.export.load`` would unpickle
    or execute, or a symbolic expression that is not plain arithmetic."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: program file not found")
    if not zipfile.is_zipfile(path):
        raise ProgramError(f"{path}: not a torch.export program (.pt2 is a zip archive); save "
                           "it with torch.export.save")
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        top = {name.split("/", 1)[0] for name in names}
        if any(name.endswith(("code/", ".py")) or "/code/" in name for name in names) or any(
                name.endswith(("/data.pkl", "/constants.pkl")) for name in names):
            raise ProgramError(f"{path}: a TorchScript file (torch.jit.save), refused: "
                               "torch.jit.load unpickles it and can run any code. Export the "
                               "network with torch.export.export and torch.export.save")
        if len(top) != 1:
            raise ProgramError(f"{path}: not a torch.export archive (one top folder expected, "
                               f"found {sorted(top)[:4]})")
        prefix = f"{top.pop()}/"
        for name in names:
            if name.endswith("/"):
                continue
            if not _ALLOWED.fullmatch(name.removeprefix(prefix)):
                raise ProgramError(f"{path}: refused: {name} is not part of a plain exported "
                                   "program (AOTInductor code, pickled objects and other "
                                   "files would be executed or unpickled by torch.export.load)")
        if f"{prefix}models/model.json" not in names:
            raise ProgramError(f"{path}: no models/model.json: not a torch.export program")
        for config in ("data/weights/model_weights_config.json",
                       "data/constants/model_constants_config.json"):
            if f"{prefix}{config}" in names:
                _check_payloads(path, config, _json(archive, f"{prefix}{config}", path))
        _check_expressions(path, _json(archive, f"{prefix}models/model.json", path))


def _json(archive: zipfile.ZipFile, name: str, path: Path) -> Any:
    try:
        return json.loads(archive.read(name))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProgramError(f"{path}: {name} is not valid JSON ({error})") from None


def _check_payloads(path: Path, name: str, config: Any) -> None:
    entries = config.get("config", {}) if isinstance(config, dict) else None
    if not isinstance(entries, dict):
        raise ProgramError(f"{path}: {name}: no 'config' mapping")
    for key, entry in entries.items():
        if not isinstance(entry, dict) or entry.get("use_pickle"):
            raise ProgramError(f"{path}: refused: {key} in {name} is stored as a pickle "
                               "(use_pickle), which torch.export.load would unpickle with "
                               "weights_only=False")
        if not re.fullmatch(r"(weight|tensor)_\d+", str(entry.get("path_name", ""))):
            raise ProgramError(f"{path}: refused: {key} in {name} is a "
                               f"{entry.get('path_name')!r} payload (not a plain tensor)")


def _check_expressions(path: Path, graph: Any) -> None:
    """Every ``expr_str`` of the graph JSON (what the deserialiser gives ``sympy.sympify``)."""
    stack = [graph]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str":
                    if not isinstance(value, str) or not _plain_expression(value):
                        raise ProgramError(f"{path}: refused: the symbolic expression "
                                           f"{str(value)[:80]!r} is not plain arithmetic of "
                                           "shape symbols (sympy would evaluate it as Python)")
                else:
                    stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _plain_expression(text: str) -> bool:
    try:
        tokens = list(tokenize.generate_tokens(io.StringIO(text).readline))
    except (tokenize.TokenError, SyntaxError, IndentationError):
        return False
    for token in tokens:
        if token.type in (tokenize.NEWLINE, tokenize.NL, tokenize.ENDMARKER):
            continue
        if token.type == tokenize.NAME:
            if token.string not in _SYMPY_NAMES and not _SYMBOL.fullmatch(token.string):
                return False
        elif token.type == tokenize.NUMBER:
            if not re.fullmatch(r"\d+(\.\d+)?", token.string):
                return False
        elif token.type == tokenize.STRING:
            if not re.fullmatch(r"'[a-z]+\d+'", token.string):
                return False
        elif token.type == tokenize.OP:
            if token.string not in _OPERATORS:
                return False
        else:
            return False
    return True


@contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside the block weights-only, even one that asks for
    ``weights_only=False`` (torch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, read at each call)."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def export_program(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """Export ``model`` (eval mode) for inputs shaped like ``example`` ``(N, C, *spatial)``, the
    batch size free, and save it to ``path`` (``torch.export.save``)."""
    batch = torch.export.Dim("batch")
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: batch},))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


def python_network(factory: str, arguments: dict[str, Any]) -> nn.Module:
    """``package.module:function`` called with ``arguments``: imports ``package.module``, which
    *runs that module's code* (meant for the user's own, trusted code)."""
    module_name, _, attribute = factory.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"factory {factory!r}: cannot import {module_name!r} ({error}); put "
                         "its folder on PYTHONPATH") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"factory {factory!r}: {module_name} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"factory {factory!r} is not callable")
    try:
        model = target(**arguments)
    except (TypeError, ValueError) as error:
        raise ValueError(f"factory {factory!r} failed with arguments {arguments}: "
                         f"{error}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"factory {factory!r} returned a {type(model).__name__}, not a "
                         "torch.nn.Module")
    return model


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__

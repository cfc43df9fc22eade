"""Our vLLM calls against the real vLLM signatures, read from vLLM's source (no GPU, no import).

tests/unit/test_vllm_backend.py drives the backend against a stand-in `vllm` that accepts any
keyword; here the same backend runs against a *recording* stand-in, and everything it passed or
read is checked against the installed vLLM's source, parsed with `ast` (vLLM is never imported: a
wheel installed with ``--no-deps`` on a CPU machine cannot be):

- ``vllm.LLM(...)`` keywords: parameters of ``LLM.__init__``, or, for ``**kwargs``, fields of the
  class that ``__init__`` forwards them to (``EngineArgs``);
- ``vllm.SamplingParams(...)`` keywords: the struct's fields;
- ``llm.generate(...)``: its positional count and keywords; the prompt dicts' keys: ``TokensPrompt``;
- attributes read from the outputs: ``RequestOutput`` / ``CompletionOutput``, and the
  ``finish_reason`` strings compared against: vLLM's finish-reason strings.

The vLLM source is found from ``BON_VLLM_SOURCE`` (a folder holding the ``vllm`` package, e.g. a
``pip install --no-deps --target DIR vllm`` folder; set but wrong = failure), else from
``importlib.util.find_spec("vllm")`` (which does not run the package). Without either, the tests
skip.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import os
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipeline_lib.generation.sampling import SamplingParams
from pipeline_lib.generation.vllm import VLLMBackend


def _vllm_dir() -> Path | None:
    env = os.environ.get("BON_VLLM_SOURCE")
    if env:
        path = Path(env) / "vllm"
        if not (path / "__init__.py").is_file():
            pytest.fail(f"BON_VLLM_SOURCE={env} holds no vllm package ({path}/__init__.py)")
        return path
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def vsrc():
    path = _vllm_dir()
    if path is None:
        pytest.skip("vLLM is not installed (nor BON_VLLM_SOURCE set): its source is needed to "
                    "check our calls; pip install --no-deps --target DIR 'vllm>=0.33' and set "
                    "BON_VLLM_SOURCE=DIR")
    return _Source(path)


# ---------------------------------------------------------------------------------------------
# Reading vLLM's source


@dataclass
class _Sig:
    """A function's parameters (``self`` dropped)."""

    names: set
    positional: int  # how many may be passed positionally
    varargs: bool
    varkw: bool
    node: ast.FunctionDef


@dataclass
class _Class:
    node: ast.ClassDef
    module: str  # dotted name, e.g. vllm.entrypoints.llm
    bases: list = field(default_factory=list)  # resolved in-package _Class es


class _Source:
    def __init__(self, root: Path):
        self.root = root  # .../vllm

    @property
    def version(self) -> str:
        for name in ("_version.py", "version.py"):
            path = self.root / name
            if path.is_file():
                for node in ast.walk(self._parse_path(path)):
                    if isinstance(node, ast.Assign) and any(
                        isinstance(t, ast.Name) and t.id in ("__version__", "version")
                        for t in node.targets
                    ) and isinstance(node.value, ast.Constant):
                        return str(node.value.value)
        return "unknown"

    @staticmethod
    @functools.cache
    def _parse_path(path: Path) -> ast.Module:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

    def _module_file(self, module: str) -> Path | None:
        parts = module.split(".")
        assert parts[0] == "vllm", module
        base = self.root.joinpath(*parts[1:])
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    def module(self, module: str) -> ast.Module:
        path = self._module_file(module)
        assert path is not None, f"no source for {module} under {self.root}"
        return self._parse_path(path)

    @staticmethod
    def _top_level(body):
        """Statements at module level, looking inside if/try blocks (TYPE_CHECKING etc.)."""
        for node in body:
            yield node
            if isinstance(node, ast.If):
                yield from _Source._top_level(node.body)
                yield from _Source._top_level(node.orelse)
            elif isinstance(node, ast.Try):
                for block in (node.body, node.orelse, node.finalbody,
                              *[h.body for h in node.handlers]):
                    yield from _Source._top_level(block)

    def _absolute(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        package = module.split(".")
        is_pkg = self._module_file(module).name == "__init__.py"
        package = package if is_pkg else package[:-1]
        package = package[: len(package) - (node.level - 1)]
        return ".".join(package + ([node.module] if node.module else []))

    def find_class(self, module: str, name: str, _seen=None) -> _Class:
        """The class ``name`` as seen from ``module``: defined there or imported into it (also
        through vLLM's lazy ``MODULE_ATTRS`` table), followed across vLLM's modules."""
        seen = _seen or set()
        assert (module, name) not in seen, f"import cycle for {name} at {module}"
        seen.add((module, name))
        tree = self.module(module)
        for node in self._top_level(tree.body):
            if isinstance(node, ast.ClassDef) and node.name == name:
                return self._with_bases(_Class(node, module), seen)
        for node in self._top_level(tree.body):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        target = self._absolute(module, node)
                        if target.split(".")[0] != "vllm":
                            raise LookupError(f"{name} comes from outside vLLM ({target})")
                        return self.find_class(target, alias.name, seen)
        for node in self._top_level(tree.body):  # vllm/__init__.py: MODULE_ATTRS = {name: ...}
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "MODULE_ATTRS" for t in node.targets
            ):
                table = ast.literal_eval(node.value)
                if name in table:
                    mod, attr = table[name].split(":")
                    if mod.startswith("."):  # relative to this package
                        mod = module + mod
                    return self.find_class(mod, attr, seen)
        raise LookupError(f"class {name} not found from {module}")

    def _with_bases(self, cls: _Class, seen) -> _Class:
        for base in cls.node.bases:
            if isinstance(base, ast.Subscript):  # Generic[T], PoolingRequestOutput[X]
                base = base.value
            if isinstance(base, ast.Name):
                try:
                    cls.bases.append(self.find_class(cls.module, base.id, set(seen)))
                except (LookupError, AssertionError):
                    pass  # outside vLLM (msgspec.Struct, TypedDict, Generic, ...)
        return cls

    # --- what a class offers

    @staticmethod
    def _sig(fn: ast.FunctionDef) -> _Sig:
        a = fn.args
        positional = [p.arg for p in a.posonlyargs + a.args]
        if positional and positional[0] in ("self", "cls"):
            positional = positional[1:]
        names = set(positional) | {p.arg for p in a.kwonlyargs}
        return _Sig(names, len(positional), a.vararg is not None, a.kwarg is not None, fn)

    def method(self, cls: _Class, name: str) -> _Sig:
        """``name`` as defined on ``cls`` or its nearest in-package base (the implementation,
        not ``@overload`` stubs)."""
        defs = [n for n in cls.node.body
                if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.name == name]
        impl = [d for d in defs if not any(
            (isinstance(dec, ast.Name) and dec.id == "overload")
            or (isinstance(dec, ast.Attribute) and dec.attr == "overload")
            for dec in d.decorator_list)]
        if impl or defs:
            return self._sig((impl or defs)[-1])
        for base in cls.bases:
            try:
                return self.method(base, name)
            except LookupError:
                pass
        raise LookupError(f"{cls.module}.{cls.node.name} has no method {name}")

    @staticmethod
    def _is(annotation, *names) -> bool:
        node = annotation.value if isinstance(annotation, ast.Subscript) else annotation
        return (isinstance(node, ast.Name) and node.id in names) or (
            isinstance(node, ast.Attribute) and node.attr in names)

    def fields(self, cls: _Class) -> dict:
        """Annotated class-body fields (dataclass, msgspec.Struct, TypedDict), bases first:
        name -> (init, required_in_typeddict)."""
        out = {}
        for base in cls.bases:
            out.update(self.fields(base))
        total = not any(k.arg == "total" and isinstance(k.value, ast.Constant)
                        and k.value.value is False for k in cls.node.keywords)
        for node in cls.node.body:
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                if self._is(node.annotation, "ClassVar"):
                    continue
                init = not (isinstance(node.value, ast.Call) and any(
                    k.arg == "init" and isinstance(k.value, ast.Constant)
                    and k.value.value is False for k in node.value.keywords))
                required = total and not self._is(node.annotation, "NotRequired")
                if self._is(node.annotation, "Required"):
                    required = True
                out[node.target.id] = (init, required)
        return out

    def constructor(self, cls: _Class) -> _Sig:
        """What ``cls(...)`` accepts: its ``__init__`` or, for dataclasses / structs, its
        init fields (private ``_name`` ones left out: not for callers)."""
        try:
            return self.method(cls, "__init__")
        except LookupError:
            names = {n for n, (init, _) in self.fields(cls).items()
                     if init and not n.startswith("_")}
            return _Sig(names, 0, False, False, cls.node)

    def attributes(self, cls: _Class) -> set:
        """Attributes an instance has: fields, ``self.x =`` in any method, methods/properties."""
        out = set(self.fields(cls))
        for node in cls.node.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.add(node.name)
                for sub in ast.walk(node):
                    targets = (sub.targets if isinstance(sub, ast.Assign)
                               else [sub.target] if isinstance(sub, ast.AnnAssign) else [])
                    for t in targets:
                        if (isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                                and t.value.id == "self"):
                            out.add(t.attr)
            elif isinstance(node, ast.Assign):
                out.update(t.id for t in node.targets if isinstance(t, ast.Name))
        for base in cls.bases:
            out |= self.attributes(base)
        return out

    def forwarded_kwargs(self, cls: _Class, sig: _Sig) -> _Class:
        """The class a method passes its ``**kwargs`` on to (``EngineArgs(..., **kwargs)``)."""
        kw = sig.node.args.kwarg.arg
        for sub in ast.walk(sig.node):
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Name) and any(
                k.arg is None and isinstance(k.value, ast.Name) and k.value.id == kw
                for k in sub.keywords
            ):
                return self.find_class(cls.module, sub.func.id)
        raise LookupError(f"{cls.node.name}.{sig.node.name} forwards **{kw} to no class")

    def string_tuple(self, name: str) -> tuple | None:
        """A module-level ``NAME = ("...", ...)`` anywhere in vLLM (e.g. FINISH_REASON_STRINGS)."""
        known = self.root / "v1" / "engine" / "__init__.py"
        for path in [known] + sorted(self.root.rglob("*.py")):
            if not path.is_file() or name not in path.read_text(encoding="utf-8"):
                continue
            for node in self._parse_path(path).body:
                if isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                        return tuple(ast.literal_eval(node.value))
        return None


# ---------------------------------------------------------------------------------------------
# A recording stand-in for vllm, and a run of the backend against it


class _Recorded:
    """Records attribute reads; the values make the backend take every branch."""

    def __init__(self, kind, reads, **values):
        object.__setattr__(self, "_kind", kind)
        object.__setattr__(self, "_reads", reads)
        object.__setattr__(self, "_values", values)

    def __getattr__(self, name):
        self._reads.add((self._kind, name))
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None


class _Compared(str):
    """A finish_reason that records what it is compared with (and equals it)."""

    def __new__(cls, seen):
        obj = super().__new__(cls, "?")
        obj.seen = seen
        return obj

    def __eq__(self, other):
        self.seen.add(other)
        return True

    def __ne__(self, other):
        self.seen.add(other)
        return False

    __hash__ = str.__hash__


@dataclass
class _Recording:
    llm_args: tuple = ()
    llm_kwargs: dict = field(default_factory=dict)
    sp_args: list = field(default_factory=list)
    sp_kwargs: list = field(default_factory=list)
    generate_args: list = field(default_factory=list)
    generate_kwargs: list = field(default_factory=list)
    reads: set = field(default_factory=set)
    finish_reasons: set = field(default_factory=set)


class _Tok:
    eos_token_id = 2


class _Model:
    def eval(self):
        return self


@pytest.fixture()
def recorded(monkeypatch) -> _Recording:
    rec = _Recording()

    class LLM:
        def __init__(self, *args, **kwargs):
            rec.llm_args, rec.llm_kwargs = args, kwargs

        def generate(self, *args, **kwargs):
            rec.generate_args.append(args)
            rec.generate_kwargs.append(kwargs)
            prompts = args[0] if args else kwargs["prompts"]
            return [
                _Recorded("RequestOutput", rec.reads, outputs=[
                    # stopped, EOS not among the ids: the backend reads stop_reason too
                    _Recorded("CompletionOutput", rec.reads, index=0, token_ids=[5],
                              finish_reason=_Compared(rec.finish_reasons), stop_reason=2),
                    _Recorded("CompletionOutput", rec.reads, index=1, token_ids=[5, 6],
                              finish_reason=_Compared(rec.finish_reasons), stop_reason=None),
                ])
                for _ in prompts
            ]

    def sampling_params(*args, **kwargs):
        rec.sp_args.append(args)
        rec.sp_kwargs.append(kwargs)
        return kwargs

    mod = types.ModuleType("vllm")
    mod.LLM = LLM
    mod.SamplingParams = sampling_params
    monkeypatch.setitem(sys.modules, "vllm", mod)

    backend = VLLMBackend("dir", _Tok(), _Model(), "cpu", tensor_parallel_size=2, seed=3)
    try:
        backend.sample([[1], [1, 4]], 2, SamplingParams(0.7, 0.9, 5, 16), seed=11)
    except AttributeError:
        pass  # an output attribute the stand-in lacks: recorded, reported by its test
    assert rec.llm_kwargs and rec.sp_kwargs and rec.generate_args, "the backend made no calls"
    return rec


def _check_call(what, sig: _Sig, args, kwargs, extra=None):
    """Problems with ``what(*args, **kwargs)`` against ``sig`` (``extra``: the names a
    ``**kwargs`` is forwarded to)."""
    problems = []
    if len(args) > sig.positional and not sig.varargs:
        problems.append(f"{what}: {len(args)} positional arguments, it takes {sig.positional}")
    for name in kwargs:
        if name in sig.names:
            continue
        if sig.varkw and extra is not None and name in extra():
            continue
        problems.append(f"{what}: no parameter {name!r}")
    return problems


# ---------------------------------------------------------------------------------------------
# The checks


def test_llm_constructor_keywords(vsrc, recorded):
    llm = vsrc.find_class("vllm", "LLM")
    init = vsrc.method(llm, "__init__")

    def engine_args():
        return vsrc.constructor(vsrc.forwarded_kwargs(llm, init)).names

    problems = _check_call(f"vllm {vsrc.version} LLM.__init__", init, recorded.llm_args,
                           recorded.llm_kwargs, engine_args)
    assert not problems, "\n".join(problems)


def test_sampling_params_keywords(vsrc, recorded):
    sp = vsrc.constructor(vsrc.find_class("vllm", "SamplingParams"))
    problems = []
    for args, kwargs in zip(recorded.sp_args, recorded.sp_kwargs, strict=True):
        problems += _check_call(f"vllm {vsrc.version} SamplingParams", sp, args, kwargs)
    assert not problems, "\n".join(sorted(set(problems)))


def test_generate_call_and_prompt_keys(vsrc, recorded):
    llm = vsrc.find_class("vllm", "LLM")
    generate = vsrc.method(llm, "generate")
    problems = []
    for args, kwargs in zip(recorded.generate_args, recorded.generate_kwargs, strict=True):
        problems += _check_call(f"vllm {vsrc.version} LLM.generate", generate, args, kwargs)
    # the prompts we pass are token prompts: keys of vllm.TokensPrompt, its required ones given
    prompt_fields = vsrc.fields(vsrc.find_class("vllm", "TokensPrompt"))
    required = {n for n, (_, req) in prompt_fields.items() if req}
    for args, kwargs in zip(recorded.generate_args, recorded.generate_kwargs, strict=True):
        for prompt in args[0] if args else kwargs["prompts"]:
            problems += [f"TokensPrompt has no key {k!r}" for k in prompt if k not in prompt_fields]
            problems += [f"TokensPrompt key {k!r} is required" for k in required - set(prompt)]
    assert not problems, "\n".join(sorted(set(problems)))


def test_output_attributes_we_read(vsrc, recorded):
    assert recorded.reads, "the backend read nothing from vLLM's outputs"
    have = {kind: vsrc.attributes(vsrc.find_class("vllm", kind))
            for kind in {kind for kind, _ in recorded.reads}}
    missing = sorted(f"vllm {vsrc.version} {kind} has no attribute {name!r}"
                     for kind, name in recorded.reads if name not in have[kind])
    assert not missing, "\n".join(missing)


def test_finish_reasons_we_compare_with(vsrc, recorded):
    assert recorded.finish_reasons, "the backend never looked at finish_reason"
    strings = vsrc.string_tuple("FINISH_REASON_STRINGS")
    assert strings is not None, (
        f"vllm {vsrc.version}: FINISH_REASON_STRINGS not found; the finish_reason values our "
        "backend compares with cannot be checked (update this test)")
    unknown = sorted(r for r in recorded.finish_reasons if r not in strings)
    assert not unknown, f"vllm {vsrc.version} finish reasons are {strings}, we compare with {unknown}"

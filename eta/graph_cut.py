"""Cut any traceable model at named module calls, and find its residual blocks, from its torch.fx graph.

A model's ``forward`` decides how its modules connect, so its attributes alone cannot say where a
stem ends or whether a block's output feeds anything but the next block. Tracing records the
real dataflow: a block must be one call of one module taking one value and giving one value, the
blocks must form a chain (the next block takes the previous block's output and nothing else uses
it), and nothing computed before the first block may reach the head except through the chain.
The stem and the head are then the graph before and after the chain, as GraphModules holding the
model's own submodules and tensors (no copies), so ``head(blocks(stem(x)))`` is ``model(x)``.

A model may branch on ``self.training`` (functional dropout in a head); the graph is traced in
both modes and a piece whose code differs between them keeps both and runs the one of its mode.
"""
from __future__ import annotations

import builtins
import inspect
import logging
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .errors import EtaError, first_line

log = logging.getLogger(__name__)

MAX_OPAQUE_RETRIES = 8  # untraceable module classes made opaque before automatic cutting gives up


def _timm_notrace():
    """Modules and functions timm marks untraceable (its own feature extraction keeps them whole)."""
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm without fx registrations
        return (), ()
    return tuple(get_notrace_modules()), tuple(get_notrace_functions())


class _Tracer(fx.Tracer):
    """fx tracer keeping named modules whole; remembers the innermost module a tracing error came from.

    ``nn.Identity`` is traced through (it adds no node), so an empty downsample between stages
    does not break a chain of blocks.
    """

    def __init__(self, leaves=(), opaque_types=()):
        modules, functions = _timm_notrace()
        super().__init__(autowrap_functions=functions)
        self.leaves = frozenset(leaves)
        self.above_leaves = {name.rsplit(".", i)[0] for name in self.leaves for i in range(1, name.count(".") + 1)}
        self.opaque_types = tuple(opaque_types) + modules
        self.failed_in: str | None = None
        self.failed_type: type | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaves:
            return True
        if qualname in self.above_leaves:
            return False
        if isinstance(m, nn.Identity):
            return False
        if self.opaque_types and isinstance(m, self.opaque_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                try:
                    self.failed_in = self.path_of_module(m)
                except NameError:
                    self.failed_in = type(m).__name__
                self.failed_type = type(m)
            raise


def _concrete_args(model: nn.Module) -> dict | None:
    """Optional arguments of ``forward`` after the input, fixed at their defaults for tracing."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    rest = [p for p in params[1:] if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [p.name for p in rest if p.default is inspect.Parameter.empty]
    if missing:
        raise EtaError(f"cannot cut teacher {type(model).__name__}: its forward needs more than one input "
                       f"({', '.join(missing)}); eta cuts models called as model(x)")
    return {p.name: p.default for p in rest} or None


def trace(model: nn.Module, leaves=(), opaque_types=()) -> fx.Graph:
    """The model's fx graph in its current mode, ``leaves`` (dotted paths) kept as single calls."""
    tracer = _Tracer(leaves, opaque_types)
    concrete = _concrete_args(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete)
    except EtaError:
        raise
    except Exception as err:  # noqa: BLE001 - fx raises TraceError, TypeError, RuntimeError, AttributeError...
        where = f"'{tracer.failed_in}' of {type(model).__name__}" if tracer.failed_in else type(model).__name__
        error = EtaError(f"cannot trace teacher {where} with torch.fx ({first_line(err)}); name blocks that hold "
                         "this code under teacher.blocks, or give the model stem/blocks/head attributes")
        error.failed_type = tracer.failed_type
        raise error from None
    if concrete:
        _drop_fixed_arguments(graph)
    return graph


def _drop_fixed_arguments(graph: fx.Graph) -> None:
    """Remove the placeholders fx keeps for arguments traced at their defaults, with the checks fx adds on them."""
    for node in [n for n in graph.nodes if n.op == "placeholder"][1:]:
        below, stack = [], list(node.users)
        while stack:
            n = stack.pop()
            if n not in below:
                below.append(n)
                stack.extend(n.users)
        sinks = [n for n in below if not n.users]
        if all(n.op == "call_function" and getattr(n.target, "__name__", "") in ("_assert", "_assert_is_none") for n in sinks):
            order = {n: i for i, n in enumerate(graph.nodes)}
            for n in sorted(below, key=order.get, reverse=True):
                graph.erase_node(n)
        if not node.users:
            graph.erase_node(node)


class _ModeSwitch(nn.Module):
    """A stem or head traced differently in training and evaluation (the model reads ``self.training``)."""

    def __init__(self, training: nn.Module, evaluating: nn.Module):
        super().__init__()
        self.when_training = training
        self.when_evaluating = evaluating

    def forward(self, x):
        return (self.when_training if self.training else self.when_evaluating)(x)


def _modes(model: nn.Module) -> dict:
    return {m: m.training for m in model.modules()}


def _restore(modes: dict) -> None:
    for m, training in modes.items():
        m.training = training


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"'{node.target}'"
    if node.op == "get_attr":
        return f"the tensor '{node.target}'"
    if node.op == "placeholder":
        return "the input"
    target = getattr(node.target, "__name__", str(node.target))
    return f"'{target}' ({node.name})"


def _partition(graph: fx.Graph, names: list[str], model_name: str):
    """Region of every node (``stem``, ``head``, ``const``, or the block's index); raises where it is no chain."""
    nodes = list(graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise EtaError(f"cannot cut teacher {model_name}: its traced forward takes {len(placeholders)} inputs; eta cuts models called as model(x)")
    calls = {name: [n for n in nodes if n.op == "call_module" and n.target == name] for name in names}
    for name, found in calls.items():
        if not found:
            raise EtaError(f"teacher.blocks: '{name}' of {model_name} is not called by its forward (it runs inside another "
                           "module or not at all); name modules the model calls")
        if len(found) > 1:
            raise EtaError(f"teacher.blocks: '{name}' of {model_name} is called {len(found)} times in the traced graph; "
                           "a block must run once")
    blocks = [calls[name][0] for name in names]
    order = {n: i for i, n in enumerate(nodes)}
    for a, b, na, nb in zip(blocks, blocks[1:], names, names[1:]):
        if order[b] < order[a]:
            raise EtaError(f"teacher.blocks: '{nb}' runs before '{na}' in {model_name}; list blocks in the order the model runs them")
    for name, node in zip(names, blocks):
        n_in = len(node.args) + len(node.kwargs)
        if n_in != 1 or not isinstance(node.args[0], fx.Node):
            raise EtaError(f"teacher.blocks: '{name}' of {model_name} has {n_in} inputs in the traced graph; a block takes one tensor")
    index = {node: i for i, node in enumerate(blocks)}
    region: dict[fx.Node, object] = {}
    last = len(blocks) - 1
    for n in nodes:
        if n.op == "placeholder":
            region[n] = "stem"
            continue
        if n in index:
            i, source = index[n], n.args[0]
            if i == 0:
                if region[source] != "stem":
                    raise EtaError(f"teacher.blocks: '{names[0]}' of {model_name} does not take a value computed from the input")
            elif source is not blocks[i - 1]:
                raise EtaError(f"teacher.blocks: '{names[i]}' of {model_name} does not take the output of '{names[i - 1]}' "
                               f"({_describe(source)} runs between them); blocks must be consecutive module calls, in order")
            region[n] = i
            continue
        inputs = n.all_input_nodes
        kinds = [region[a] for a in inputs]
        for a, k in zip(inputs, kinds):
            if isinstance(k, int) and k < last:
                used_by = "the model's output" if n.op == "output" else _describe(n)
                raise EtaError(f"teacher.blocks: the output of '{names[k]}' of {model_name} goes to {used_by}, not only to the "
                               f"next block '{names[k + 1]}'; blocks must be consecutive module calls (what runs between "
                               "them, or a skip connection around them, must be inside a block)")
        in_head = any(k == "head" or k == last for k in kinds)
        if in_head or n.op == "output":
            stem_inputs = [a for a, k in zip(inputs, kinds) if k == "stem"]
            if stem_inputs:
                raise EtaError(f"teacher.blocks: in {model_name}, {_describe(n)} after '{names[-1]}' uses "
                               f"{_describe(stem_inputs[0])} computed before '{names[0]}', so the model cannot be cut there")
            if n.op == "output" and not in_head:
                raise EtaError(f"teacher.blocks: the output of {model_name} does not depend on '{names[-1]}'")
            region[n] = "head"
        elif "stem" in kinds:
            region[n] = "stem"
        else:
            region[n] = "const"  # no input-derived values: recomputed wherever it is needed
    return nodes, blocks, region


def _needed_consts(nodes, region, wanted: str) -> set:
    """Input-free nodes (tensors, constants) that the ``wanted`` region uses, directly or through each other."""
    need, stack = set(), [a for n in nodes if region[n] == wanted for a in n.all_input_nodes if region[a] == "const"]
    while stack:
        a = stack.pop()
        if a not in need:
            need.add(a)
            stack.extend(b for b in a.all_input_nodes if region[b] == "const")
    return need


def _pieces(model: nn.Module, graph: fx.Graph, names: list[str]) -> tuple[fx.GraphModule, fx.GraphModule]:
    model_name = type(model).__name__
    nodes, blocks, region = _partition(graph, names, model_name)
    stem_graph, env = fx.Graph(), {}
    keep = _needed_consts(nodes, region, "stem")
    for n in nodes:
        if region[n] == "stem" or n in keep:
            env[n] = stem_graph.node_copy(n, lambda a: env[a])
    stem_graph.output(env[blocks[0].args[0]])

    head_graph = fx.Graph()
    env = {blocks[-1]: head_graph.placeholder("x")}
    keep = _needed_consts(nodes, region, "head")
    for n in nodes:
        if n.op == "output":
            head_graph.output(fx.map_arg(n.args[0], lambda a: env[a]))
        elif region[n] == "head" or n in keep:
            env[n] = head_graph.node_copy(n, lambda a: env[a])
    return _graph_module(model, stem_graph, f"{model_name}Stem"), _graph_module(model, head_graph, f"{model_name}Head")


def _graph_module(model: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    # GraphModule(root, graph) takes the root's own submodules and tensors: shared, not copied
    gm = fx.GraphModule(model, graph, class_name=name)
    if gm.graph.eliminate_dead_code():  # work whose result nothing uses (shape reads left behind by the cut)
        gm.recompile()
        gm.delete_all_unused_submodules()
    return gm


def check_block_names(model: nn.Module, names: list[str]) -> None:
    """Every name is a module of the model and none holds another."""
    model_name = type(model).__name__
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            parent, _, leaf = name.rpartition(".")
            try:
                owner = model.get_submodule(parent) if parent else model
            except AttributeError:
                raise EtaError(f"teacher.blocks: '{name}' is not a module of {model_name} ('{parent}' is not either)") from None
            if isinstance(getattr(owner, leaf, None), torch.Tensor):
                raise EtaError(f"teacher.blocks: '{name}' of {model_name} is a tensor, not a module")
            children = ", ".join(n for n, _ in owner.named_children()) or "none"
            where = f"'{parent}'" if parent else model_name
            raise EtaError(f"teacher.blocks: '{name}' is not a module of {model_name} (children of {where}: {children})") from None
        if module is model:
            raise EtaError(f"teacher.blocks: '{name}' is the whole model {model_name}")
    for a in names:
        for b in names:
            if b.startswith(a + "."):
                raise EtaError(f"teacher.blocks: '{b}' is inside '{a}' of {model_name}; list modules that do not hold each other")


def cut(model: nn.Module, names: list[str]) -> tuple[nn.Module, list[nn.Module], nn.Module]:
    """Stem, blocks and head of ``model`` cut at the calls of the modules ``names`` (dotted paths)."""
    check_block_names(model, names)
    modes = _modes(model)
    pieces = {}
    try:
        for training in (model.training, not model.training):
            model.train(training)
            pieces[training] = _pieces(model, trace(model, leaves=names), names)
    finally:
        _restore(modes)
    (stem, head), (stem_other, head_other) = pieces[model.training], pieces[not model.training]

    def one(piece, other):
        if piece.code == other.code:
            return piece
        log.info("the %s of %s differs between training and evaluation; it keeps both graphs",
                 type(piece).__name__, type(model).__name__)
        return _ModeSwitch(*((piece, other) if model.training else (other, piece)))

    return one(stem, stem_other), [model.get_submodule(n) for n in names], one(head, head_other)


# ---------------------------------------------------------------------------------------------
# finding the blocks of an unknown model


@dataclass(eq=False)
class _Call:
    """One call of one module in the traced graph, with the nodes it produced."""

    key: str  # unique per call (fx appends @k to repeated calls)
    path: str
    type: type
    depth: int
    nodes: list = field(default_factory=list)
    items: list = field(default_factory=list)  # direct child calls and own operations, in order
    input: fx.Node | None = None
    output: fx.Node | None = None
    siso: bool = False
    branchy: bool = False
    linear: bool = False


_META_METHODS = {"size", "dim", "numel", "type", "get_device", "ndimension"}


def _meta_use(node: fx.Node) -> bool:
    """A use that reads a tensor's shape or type, not its values."""
    return ((node.op == "call_method" and node.target in _META_METHODS)
            or (node.op == "call_function" and node.target is builtins.getattr))


def _is_container(cls: type) -> bool:
    return issubclass(cls, nn.Sequential) and cls.forward is nn.Sequential.forward


class _Structure:
    """Calls of a fully traced model, their nesting, and which of them are single-in single-out."""

    def __init__(self, graph: fx.Graph, model: nn.Module, opaque_types=()):
        self.nodes = [n for n in graph.nodes if n.op not in ("placeholder", "output")]
        self.position = {n: i for i, n in enumerate(graph.nodes)}
        from_input = set()
        for n in graph.nodes:
            if n.op == "placeholder" or any(a in from_input for a in n.all_input_nodes):
                from_input.add(n)
        self.const = {n for n in graph.nodes if n not in from_input}
        self.meta = set()  # shape reads and what is computed from them alone (checks, reshape sizes)
        for n in graph.nodes:
            live = [a for a in n.all_input_nodes if a not in self.const]
            if _meta_use(n) or (live and all(a in self.meta for a in live)):
                self.meta.add(n)
        self.calls: dict[str, _Call] = {}
        self.root_items: list = []
        self.opaque_types = tuple(opaque_types)
        for n in self.nodes:
            stack = list(n.meta.get("nn_module_stack", {}).items())
            parent = None
            for depth, (key, (path, cls)) in enumerate(stack):
                call = self.calls.get(key)
                if call is None:
                    call = self.calls[key] = _Call(key, path, cls, depth)
                    (parent.items if parent else self.root_items).append(call)
                call.nodes.append(n)
                parent = call
            if n not in self.const and n not in self.meta:
                (parent.items if parent else self.root_items).append(n)
        self.times_called: dict[str, int] = {}
        for call in sorted(self.calls.values(), key=lambda c: -c.depth):  # inner calls first: outer ones read them
            self.times_called[call.path] = self.times_called.get(call.path, 0) + 1
            self._analyse(call)
        branchy_types = {c.type for c in self.calls.values() if c.branchy and not _is_container(c.type)}
        self.block_types = branchy_types | set(self.opaque_types)

    def _analyse(self, call: _Call) -> None:
        inside = set(call.nodes)
        inputs = {a for n in call.nodes for a in n.all_input_nodes if a not in inside and a not in self.const}
        outputs = [n for n in call.nodes if any(u not in inside for u in n.users)]
        call.siso = len(inputs) == 1 and len(outputs) == 1
        if not call.siso:
            return
        call.input, call.output = inputs.pop(), outputs[0]
        values = [call.input] + [n for n in call.nodes if n not in self.const]
        call.branchy = any(sum(1 for u in v.users if u in inside and u not in self.meta) > 1 for v in values)
        # a linear call runs its items one after another, each using only the previous one's value
        previous = call.input
        for item in call.items:
            if isinstance(item, _Call):
                ok = item.siso and item.input is previous
            else:
                ok = [a for a in item.all_input_nodes if a not in self.const and a not in self.meta] == [previous]
            own = self._nodes_of(item)
            if not ok or any(u in inside and u not in own and u not in self.meta for u in previous.users):
                return
            previous = item.output if isinstance(item, _Call) else item
        call.linear = previous is call.output

    @staticmethod
    def _nodes_of(item) -> set:
        return set(item.nodes) if isinstance(item, _Call) else {item}

    def is_block(self, call: _Call) -> bool:
        """A residual (branching) call, a call of a class some of whose calls branch, or a container holding one."""
        if not call.siso:
            return False
        if _is_container(call.type):
            return call.branchy or any(isinstance(i, _Call) and self.is_block(i) for i in call.items)
        return call.branchy or call.type in self.block_types

    def expand(self, items, expanding_types) -> list:
        out = []
        for item in items:
            if isinstance(item, _Call) and self.is_block(item) and item.linear and (
                    _is_container(item.type) or item.type in expanding_types):
                out.extend(self.expand(item.items, expanding_types))
            else:
                out.append(item)
        return out

    def blocks_in(self, items) -> int:
        return sum(1 for i in items if isinstance(i, _Call) and self.is_block(i))

    def chain(self) -> list[_Call]:
        """The longest run of consecutive single-in single-out calls at the finest level of stages."""
        # a custom class is a stage (opened into its children) when some call of it holds two or more blocks
        every = {c.type for c in self.calls.values()}
        stages = {c.type for c in self.calls.values() if not _is_container(c.type) and c.linear and self.is_block(c)
                  and self.blocks_in(self.expand(c.items, every)) >= 2}
        items = self.expand(self.root_items, stages)
        runs, run = [], []
        for item in items:
            chainable = isinstance(item, _Call) and item.siso and self.times_called[item.path] == 1
            if chainable and run and item.input is run[-1].output and all(
                    u in set(item.nodes) or u in self.meta for u in run[-1].output.users):
                run.append(item)
                continue
            runs.append(run)
            run = [item] if chainable else []
        runs.append(run)
        best: list[_Call] = []
        for run in runs:
            is_block = [self.is_block(c) for c in run]
            if not any(is_block):
                continue
            first, last = is_block.index(True), len(run) - 1 - is_block[::-1].index(True)
            run = run[first: last + 1]
            if self.blocks_in(run) > self.blocks_in(best):
                best = run
        return best


def find_blocks(model: nn.Module) -> list[str]:
    """Dotted paths of the residual blocks of ``model``, found in its traced graph (evaluation mode)."""
    modes = _modes(model)
    opaque: list[type] = []
    graph = None
    try:
        model.eval()
        while graph is None:
            try:
                graph = trace(model, opaque_types=opaque)
            except EtaError as err:
                failed = getattr(err, "failed_type", None)
                if failed is None or failed in opaque or failed is type(model) or len(opaque) >= MAX_OPAQUE_RETRIES:
                    raise
                log.info("automatic cut of %s: %s is untraceable, kept whole", type(model).__name__, failed.__name__)
                opaque.append(failed)
    finally:
        _restore(modes)
    structure = _Structure(graph, model, opaque)
    chain = structure.chain()
    if not chain:
        raise EtaError(f"cannot split teacher {type(model).__name__} into blocks automatically: its traced graph has no "
                       "chain of residual blocks; list them under teacher.blocks (dotted module paths), or give the "
                       "model stem/blocks/head attributes")
    names = [c.path for c in chain]
    log.info("teacher %s: %d blocks found in its graph (%s ... %s)", type(model).__name__, len(names), names[0], names[-1])
    return names
